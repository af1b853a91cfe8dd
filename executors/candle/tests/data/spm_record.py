#!/usr/bin/env python3
"""Records llama.cpp's token ids for the SentencePiece test vocabulary.

Writes spm_vocab.json as a vocab-only llama GGUF, then tokenizes each case with
llama.cpp (node-llama-cpp's prebuilt CPU build, special tokens parsed, no BOS)
and prints the ids as a Rust array for executors/candle/src/chat.rs's test:

    python3 spm_record.py /path/with/node_modules
"""
import json
import os
import struct
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def vocab():
    """(tokens, scores, types) in id order, as chat.rs's test builds them."""
    spec = json.load(open(os.path.join(HERE, "spm_vocab.json"), encoding="utf-8"))
    tokens, scores, types = ["<unk>", "<s>", "</s>"], [0.0, 0.0, 0.0], [2, 3, 3]
    for b in range(256):
        tokens.append("<0x%02X>" % b)
        scores.append(0.0)
        types.append(6)
    for piece, score in spec["pieces"]:
        tokens.append(piece)
        scores.append(score)
        types.append(1)
    for special in spec["special"]:
        tokens.append(special)
        scores.append(0.0)
        types.append(4)
    return tokens, scores, types, spec["cases"]


def gguf(path, tokens, scores, types):
    def string(s):
        b = s.encode("utf-8")
        return struct.pack("<Q", len(b)) + b

    kv = []

    def put(key, ty, payload):
        kv.append(string(key) + struct.pack("<I", ty) + payload)

    put("general.architecture", 8, string("llama"))
    for key, value in [("block_count", 1), ("context_length", 64), ("embedding_length", 8),
                       ("feed_forward_length", 16), ("attention.head_count", 2),
                       ("attention.head_count_kv", 2)]:
        put("llama." + key, 4, struct.pack("<I", value))
    put("llama.attention.layer_norm_rms_epsilon", 6, struct.pack("<f", 1e-5))
    put("tokenizer.ggml.model", 8, string("llama"))
    put("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, len(tokens)) + b"".join(map(string, tokens)))
    put("tokenizer.ggml.scores", 9, struct.pack("<IQ", 6, len(scores)) + b"".join(struct.pack("<f", s) for s in scores))
    put("tokenizer.ggml.token_type", 9, struct.pack("<IQ", 5, len(types)) + b"".join(struct.pack("<i", t) for t in types))
    for key, value in [("unknown_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)]:
        put("tokenizer.ggml." + key, 4, struct.pack("<I", value))
    with open(path, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kv)) + b"".join(kv))


SCRIPT = """
import {getLlama, LlamaLogLevel} from "node-llama-cpp";
const [modelPath, casesJson] = process.argv.slice(2);
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath, vocabOnly: true});
for (const text of JSON.parse(casesJson)) console.log(JSON.stringify(Array.from(model.tokenize(text, true))));
process.exit(0);
"""

if __name__ == "__main__":
    modules = sys.argv[1]
    tokens, scores, types, cases = vocab()
    path = os.path.join(modules, "spm-test.gguf")
    gguf(path, tokens, scores, types)
    script = os.path.join(modules, "spm-record.mjs")
    open(script, "w").write(SCRIPT)
    out = subprocess.run(["node", script, path, json.dumps(cases)], check=True,
                         capture_output=True, text=True, cwd=modules).stdout
    for case, ids in zip(cases, out.split("\n")):
        print("(%s, &%s)," % (json.dumps(case), ids))
