// llama.cpp beside `cargo bench -p donate-candle --bench generate` (docs/CANDLE.md):
// greedy ids and timed jobs of the prebuilt CPU llama.cpp in the npm package
// node-llama-cpp, on the same GGUF file, input ids and thread count.
// The bench copies this file next to node_modules and runs
//   node llama_cpp.mjs MODEL IDS N THREADS
// which prints `ids A,B,…` (N greedy ids with an F32 KV cache, as the
// correctness comparison), then `ready` once a context with llama.cpp's
// default settings is warm. Then each line read from stdin, a count K, runs
// one job (the same prompt, K tokens, from an empty cache) and prints
// `ms T`, its time in milliseconds; so the bench interleaves llama.cpp's jobs
// with its own ways, under the same load.
import {createInterface} from "node:readline";
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const [modelPath, idsArg, nArg, threadsArg] = process.argv.slice(2);
const ids = idsArg.split(",").map(Number);
const n = Number(nArg), threads = Number(threadsArg);
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath, gpuLayers: 0});

async function generate(sequence, count) {
  await sequence.clearHistory();
  const out = [];
  for await (const token of sequence.evaluate(ids, {temperature: 0})) {
    out.push(token);
    if (out.length >= count) break;
  }
  return out;
}

const exact = await model.createContext({
  threads, contextSize: 512, flashAttention: false,
  experimentalKvCacheKeyType: "F32", experimentalKvCacheValueType: "F32",
});
console.log("ids " + (await generate(exact.getSequence(), n)).join(","));
await exact.dispose();

const context = await model.createContext({threads, contextSize: 512});
const sequence = context.getSequence();
await generate(sequence, n); // warm-up
console.log("ready");
for await (const line of createInterface({input: process.stdin})) {
  const count = Number(line);
  if (!(count > 0)) break;
  const t = performance.now();
  await generate(sequence, count);
  console.log(`ms ${performance.now() - t}`);
}
process.exit(0);
