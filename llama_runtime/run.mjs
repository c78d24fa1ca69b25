// Load a GGUF file with llama.cpp (node-llama-cpp's prebuilt CPU binaries) and generate greedily.
// Usage: node run.mjs MODEL.gguf PROMPT MAX_TOKENS
// Prints one JSON line: n_layer as llama.cpp's loader reports it, the prompt's token ids (with BOS
// where the file asks for it), the generated token ids and their text. SLEB_LLAMA_SWA=1: also each
// layer's sliding-window flag as the loader set it ("is_swa", from its debug log).
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const [modelPath, prompt, maxTokens] = process.argv.slice(2);
const logs = [];
const swa = process.env.SLEB_LLAMA_SWA === "1";
// build: "never" -- use the prebuilt binaries, never download or compile llama.cpp.
const llama = await getLlama({build: "never", gpu: false, logLevel: swa ? LlamaLogLevel.debug : LlamaLogLevel.info,
                              logger: (level, message) => logs.push(message)});
let model;
try {
    model = await llama.loadModel({modelPath});
} catch (error) {
    console.error(logs.join(""));  // llama.cpp's own account of why the file did not load
    throw error;
}
// One thread: spinning worker threads crawl on a busy shared machine.
// SLEB_FLASH_ATTENTION=1: flash attention, with which llama.cpp sizes each layer's V cache by its own heads.
const context = await model.createContext({contextSize: 256, threads: 1,
                                           flashAttention: process.env.SLEB_FLASH_ATTENTION === "1"});
const sequence = context.getSequence();
const promptTokens = model.tokenize(prompt);
const bos = model.tokens.bos;
const input = model.fileInfo.metadata.tokenizer?.ggml?.add_bos_token && bos != null ? [bos, ...promptTokens] : promptTokens;
const generated = [];
// Greedy decoding of raw tokens: no chat template, no stop on end-of-text, so the count is exact.
for await (const token of sequence.evaluate(input, {temperature: 0})) {
    generated.push(token);
    if (generated.length >= Number(maxTokens)) break;
}
// Read after generating: llama.cpp's log lines arrive asynchronously.
const loaderLine = logs.join("").match(/n_layer\s*=\s*(\d+)/);
// The KV cache llama.cpp allocated for the 256-token context, in MiB, from its own log.
const kvLine = logs.join("").match(/llama_kv_cache[^\n]*?size\s*=\s*([\d.]+)\s*MiB/);
// "load_tensors: layer 3 assigned to device CPU, is_swa = 0"; the entry at n_layer is the output layer.
const isSwa = [...logs.join("").matchAll(/layer\s+(\d+) assigned to device [^,]*, is_swa = ([01])/g)]
    .filter(m => !loaderLine || Number(m[1]) < Number(loaderLine[1])).map(m => Number(m[2]));
console.log(JSON.stringify({n_layer: loaderLine ? Number(loaderLine[1]) : null, kv_cache_mib: kvLine ? Number(kvLine[1]) : null,
                            prompt_tokens: input, ...(swa ? {is_swa: isSwa} : {}),
                            tokens: generated, text: model.detokenize(generated),
                            llama_cpp: llama.llamaCppRelease}));
await context.dispose();
await model.dispose();
await llama.dispose();
