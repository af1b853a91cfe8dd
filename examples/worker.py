#!/usr/bin/env python3
"""A donate worker (docs/WORKER-PROTOCOL.md): a byte-level bigram model whose
table is the pushed weights. Python 3, standard library only.

    donate serve --executor 'cmd:python3 examples/worker.py'

Weights: exactly 65,536 bytes, w[a * 256 + b] the score of byte b following
byte a. `infer` returns the input ids followed by `max_tokens` generated ids
(16 when max_tokens <= 0, at most 4096): each one is the b with the highest
score in the row of the id before it (the lowest b on a tie; row 0 for an empty
input). Ids must be bytes (0..=255).

`prompt` needs no model: it counts the byte pairs of the prompt and continues
its text greedily from its last byte by those counts, for max_out bytes (64
when <= 0), stopping early at a byte never followed by anything. The same rules
as executors/examples/ngram_worker.rs.

Requests come one JSON object per line on stdin; each gets exactly one JSON
line on stdout. Diagnostics go to stderr (the node logs them). The worker exits
when stdin closes.
"""

import json
import sys

TABLE = 256 * 256
models = {}


def next_byte(table, last):
    row = table[last * 256:last * 256 + 256]
    return row.index(max(row))  # index() finds the lowest on a tie


def infer(table, input_ids, max_tokens):
    for i in input_ids:
        if not isinstance(i, int) or not 0 <= i <= 255:
            raise ValueError(f"input id {i} is not a byte (0..=255)")
    n = 16 if max_tokens <= 0 else min(max_tokens, 4096)
    out = list(input_ids)
    last = input_ids[-1] if input_ids else 0
    for _ in range(n):
        last = next_byte(table, last)
        out.append(last)
    return out


def prompt(text, max_out):
    data = text.encode("utf-8", "surrogatepass")
    if not data:
        return ""
    counts = [0] * TABLE
    for a, b in zip(data, data[1:]):
        counts[a * 256 + b] += 1
    n = 64 if max_out <= 0 else max_out
    out = bytearray()
    last = data[-1]
    for _ in range(n):
        row = counts[last * 256:last * 256 + 256]
        best = max(row)
        if best == 0:
            break
        last = row.index(best)
        out.append(last)
    return out.decode("utf-8", "replace")


def handle(req):
    op = req.get("op")
    if op == "mount":
        path = req["weights_path"]
        with open(path, "rb") as f:
            table = f.read()
        if len(table) != TABLE:
            raise ValueError(
                f"bigram weights must be {TABLE} bytes (a 256x256 table), got {len(table)}")
        models[req["model"]] = table
        return {"ok": True}
    if op == "unmount":
        models.pop(req["model"], None)
        return {"ok": True}
    if op == "infer":
        table = models.get(req["model"])
        if table is None:
            raise ValueError(f"model {req['model']} is not mounted")
        ids = infer(table, req.get("input_ids") or [], req.get("max_tokens") or 0)
        return {"ok": True, "output_ids": ids}
    if op == "prompt":
        return {"ok": True, "text": prompt(req.get("prompt") or "", req.get("max_out") or 0)}
    raise ValueError(f"unknown op {op!r}")


def main():
    out = sys.stdout
    for line in sys.stdin.buffer:
        try:
            req = json.loads(line)
            if req.get("op") == "cancel":
                # This worker answers each request before reading the next, so
                # a cancel always comes too late: it is not answered.
                continue
            reply = handle(req)
        except Exception as e:  # every request gets exactly one reply
            reply = {"ok": False, "error": str(e)}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    print(f"stdin closed, {len(models)} model(s) mounted; exiting", file=sys.stderr)


if __name__ == "__main__":
    main()
