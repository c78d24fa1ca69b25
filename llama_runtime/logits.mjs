// llama.cpp's logits for a list of token ids (node-llama-cpp's prebuilt CPU binaries), for comparing with transformers.
// Usage: node logits.mjs MODEL.gguf TOKENS.json OUT.bin   (TOKENS.json: [token ids], BOS included where wanted)
// Writes the logits after each token (float32, tokens x vocabulary, row-major) to OUT.bin and prints one JSON
// line: the vocabulary size, the token count, what node-llama-cpp decided about flash attention for the file
// (its `flashAttentionSupported`, and the default context's setting) and the llama.cpp release.
// SLEB_FLASH_ATTENTION=1: evaluate with flash attention (default: off).
import {readFileSync, writeFileSync} from "node:fs";
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const [modelPath, tokensPath, outPath] = process.argv.slice(2);
const tokens = JSON.parse(readFileSync(tokensPath, "utf8"));
const llama = await getLlama({build: "never", gpu: false, logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath});
// One thread: spinning worker threads crawl on a busy shared machine.
const context = await model.createContext({contextSize: Math.max(64, tokens.length), batchSize: tokens.length,
                                           threads: 1, flashAttention: process.env.SLEB_FLASH_ATTENTION === "1"});
const sequence = context.getSequence();
const out = await sequence.controlledEvaluate(tokens.map(token => [token, {generateNext: {logits: true}}]));
// Each step's logits are a Map from token id to logit, every token of the vocabulary in it.
const vocabulary = out[0].next.logits.size;
const all = new Float32Array(tokens.length * vocabulary);
out.forEach((step, i) => {
    for (const [token, logit] of step.next.logits) all[i * vocabulary + token] = logit;
});
writeFileSync(outPath, Buffer.from(all.buffer));
console.log(JSON.stringify({n_vocab: vocabulary, n_tokens: tokens.length,
                            flash_attention_supported: model.flashAttentionSupported,
                            default_context_flash_attention: model.defaultContextFlashAttention,
                            llama_cpp: llama.llamaCppRelease}));
await context.dispose();
await model.dispose();
await llama.dispose();
