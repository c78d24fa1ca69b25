// Load a GGUF file with llama.cpp (node-llama-cpp's prebuilt CPU binaries) and generate greedily.
// Usage: node run.mjs MODEL.gguf PROMPT MAX_TOKENS
// Prints one JSON line: n_layer as llama.cpp's loader reports it, and the generated text.
import {getLlama, LlamaCompletion, LlamaLogLevel} from "node-llama-cpp";

const [modelPath, prompt, maxTokens] = process.argv.slice(2);
const logs = [];
// build: "never" -- use the prebuilt binaries, never download or compile llama.cpp.
const llama = await getLlama({build: "never", gpu: false, logLevel: LlamaLogLevel.info,
                              logger: (level, message) => logs.push(message)});
let model;
try {
    model = await llama.loadModel({modelPath});
} catch (error) {
    console.error(logs.join(""));  // llama.cpp's own account of why the file did not load
    throw error;
}
// One thread: spinning worker threads crawl on a busy shared machine.
const context = await model.createContext({contextSize: 256, threads: 1});
const completion = new LlamaCompletion({contextSequence: context.getSequence()});
const text = await completion.generateCompletion(prompt, {maxTokens: Number(maxTokens), temperature: 0});
// Read after generating: llama.cpp's log lines arrive asynchronously.
const loaderLine = logs.join("").match(/n_layer\s*=\s*(\d+)/);
console.log(JSON.stringify({n_layer: loaderLine ? Number(loaderLine[1]) : null,
                            block_count: model.fileInsights.totalLayers - 1, text,
                            llama_cpp: llama.llamaCppRelease}));
await context.dispose();
await model.dispose();
await llama.dispose();
