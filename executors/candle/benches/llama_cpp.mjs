// llama.cpp beside `cargo bench -p donate-candle --bench generate` (docs/CANDLE.md):
// greedy ids and tokens/s of the prebuilt CPU llama.cpp in the npm package
// node-llama-cpp, on the same GGUF file, input ids and thread count.
// The bench copies this file next to node_modules and runs
//   node llama_cpp.mjs MODEL IDS N RUNS THREADS
// printing `ids A,B,…` (F32 KV cache, as the correctness comparison) and
// `rates PROMPT_TOK_S GEN_TOK_S` (llama.cpp's default settings).
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const [modelPath, idsArg, nArg, runsArg, threadsArg] = process.argv.slice(2);
const ids = idsArg.split(",").map(Number);
const n = Number(nArg), runs = Number(runsArg), threads = Number(threadsArg);
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
const median = (a) => a.sort((x, y) => x - y)[Math.floor(a.length / 2)];
const short = [], long = [];
for (let r = 0; r < runs; r++) {
  let t = performance.now();
  await generate(sequence, 1);
  short.push(performance.now() - t);
  t = performance.now();
  await generate(sequence, n);
  long.push(performance.now() - t);
}
const s = median(short) / 1000, l = median(long) / 1000;
console.log(`rates ${ids.length / s} ${(n - 1) / (l - s)}`);
process.exit(0);
