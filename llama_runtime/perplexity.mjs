// Negative log-likelihood of token windows in llama.cpp (node-llama-cpp's prebuilt CPU binaries).
// Usage: node perplexity.mjs MODEL.gguf WINDOWS.json   (WINDOWS.json: [[token ids], ...], BOS included)
// Prints one JSON line: {"nll": [sum per window], "tokens": [predicted tokens per window], "perplexity": ...}.
// Each window runs in a fresh sequence state; token i+1 is scored from llama.cpp's full logits after token i.
import {readFileSync} from "node:fs";
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const [modelPath, windowsPath] = process.argv.slice(2);
const windows = JSON.parse(readFileSync(windowsPath, "utf8"));
const llama = await getLlama({build: "never", gpu: false, logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath});
const longest = Math.max(...windows.map(w => w.length));
const context = await model.createContext({contextSize: longest, batchSize: longest, threads: 2});
const sequence = context.getSequence();
const nll = [], counts = [];
const CHUNK = 32;  // full logit rows are 4 bytes x vocabulary each: hold a few dozen at a time
for (const window of windows) {
    await sequence.clearHistory();
    let sum = 0;
    // Evaluated in chunks on the same sequence; after every token but the last, score the next one.
    for (let start = 0; start < window.length; start += CHUNK) {
        const part = window.slice(start, start + CHUNK);
        const out = await sequence.controlledEvaluate(part.map((token, j) =>
            start + j + 1 < window.length ? [token, {generateNext: {logits: true}}] : token));
        for (let j = 0; j < part.length && start + j + 1 < window.length; j++) {
            const logits = out[j].next.logits;
            let max = -Infinity;
            for (const v of logits.values()) if (v > max) max = v;
            let weight = 0;
            for (const v of logits.values()) weight += Math.exp(v - max);
            // -log softmax of the window's next token
            sum -= logits.get(window[start + j + 1]) - max - Math.log(weight);
        }
    }
    nll.push(sum);
    counts.push(window.length - 1);
}
const total = nll.reduce((a, b) => a + b, 0), n = counts.reduce((a, b) => a + b, 0);
console.log(JSON.stringify({nll, tokens: counts, perplexity: Math.exp(total / n), llama_cpp: llama.llamaCppRelease}));
await context.dispose();
await model.dispose();
await llama.dispose();
