// One measurement of a GGUF file in llama.cpp (node-llama-cpp's prebuilt binaries), for `sleb bench --runtime llama.cpp`.
// Run by sleb.llamacpp_bench as a file (node-llama-cpp re-runs node with the same arguments to test its binaries).
// Input (the last argument, JSON): {runtime, model, text_file, prefill_len, gen_prompt, gen_tokens, threads, warmup,
// samples, flash_attention}; each timed part runs `samples` times and its fastest run is kept (the others met
// interference). Flash attention is passed to the context as given (true/false), never left to node-llama-cpp's
// "auto", which turns it off for files whose head count is a per-layer array (deci).
// node-llama-cpp is imported from the runtime folder's node_modules.
// Prints one JSON line: the token ids' count and a checksum (every file must see the same ids), the fastest prefill
// and generation seconds, llama.cpp's release, and llama.cpp's log lines that state its layer count and whether
// the context got flash attention (sleb.llamacpp_bench.read_llama_log reads them).
import {readFileSync} from "node:fs";
import {createRequire} from "node:module";
import {join} from "node:path";
import {pathToFileURL} from "node:url";

const job = JSON.parse(process.argv[process.argv.length - 1]);
const entry = createRequire(join(job.runtime, "package.json")).resolve("node-llama-cpp");
const {getLlama, LlamaLogLevel} = await import(pathToFileURL(entry).href);
const logs = [];
const llama = await getLlama({build: "never", gpu: false, logLevel: LlamaLogLevel.info,
                              logger: (level, message) => logs.push(message)});
let model;
try {
    model = await llama.loadModel({modelPath: job.model});
} catch (error) {
    console.error(logs.join("\n"));
    throw error;
}
const need = Math.max(job.prefill_len, job.gen_prompt + job.gen_tokens) + 8;
const context = await model.createContext({contextSize: need, batchSize: Math.max(job.prefill_len, job.gen_prompt),
                                           threads: {ideal: job.threads, min: job.threads},
                                           flashAttention: job.flash_attention});
const sequence = context.getSequence();
const all = model.tokenize(readFileSync(job.text_file, "utf8"));
if (all.length < Math.max(job.prefill_len, job.gen_prompt)) {
    throw new Error(`the text gives ${all.length} tokens, fewer than the ${Math.max(job.prefill_len, job.gen_prompt)} asked for`);
}
const prefillIds = all.slice(0, job.prefill_len);
const promptIds = all.slice(0, job.gen_prompt);

async function prefill() {
    await sequence.clearHistory();
    const start = process.hrtime.bigint();
    await sequence.evaluateWithoutGeneratingNewTokens(prefillIds);
    return Number(process.hrtime.bigint() - start) / 1e9;
}

async function generate(count) {
    // The prompt but its last token first (not timed); then each of `count` steps decodes one token.
    await sequence.clearHistory();
    await sequence.evaluateWithoutGeneratingNewTokens(promptIds.slice(0, -1));
    const start = process.hrtime.bigint();
    let made = 0;
    for await (const token of sequence.evaluate(promptIds.slice(-1), {temperature: 0})) {
        made += 1;
        if (made >= count) break;
    }
    return Number(process.hrtime.bigint() - start) / 1e9;
}

for (let i = 0; i < job.warmup; i++) {
    await prefill();
    await generate(Math.min(4, job.gen_tokens));
}
async function fastest(run) {
    let best = Infinity;
    for (let i = 0; i < job.samples; i++) best = Math.min(best, await run());
    return best;
}
const prefillSeconds = job.prefill_len > 0 ? await fastest(prefill) : null;
const genSeconds = job.gen_tokens > 0 ? await fastest(() => generate(job.gen_tokens)) : null;
let checksum = 0;
for (const id of all.slice(0, Math.max(job.prefill_len, job.gen_prompt))) checksum = (checksum * 31 + id) % 2147483647;
const log = logs.join("\n").split("\n").filter((line) => /n_layer|flash_attn|Flash Attention/.test(line)).join("\n");
console.log(JSON.stringify({prefill_s: prefillSeconds, gen_s: genSeconds, tokens: prefillIds.length,
                            ids_checksum: checksum, log, llama_cpp: llama.llamaCppRelease}));
await context.dispose();
await model.dispose();
await llama.dispose();
