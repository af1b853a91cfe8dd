#!/usr/bin/env python3
"""A test worker that stops a job when told to (docs/WORKER-PROTOCOL.md, cancel).

mount / unmount: ok. infer: works in 5 ms steps for up to 30 s, looking at
stdin between steps; a cancel line makes it answer ok:false, code cancelled,
at once. input_ids [1] finish at once with output_ids = input_ids + [pid].
A cancel line that arrives while idle is ignored (it gets no reply).
Reads stdin unbuffered, so a line that arrives mid-job is seen mid-job.
"""

import json
import os
import select
import sys

buf = b""


def read_more(timeout):
    """Reads what stdin has within `timeout` seconds; False at end of input."""
    global buf
    ready, _, _ = select.select([0], [], [], timeout)
    if ready:
        chunk = os.read(0, 65536)
        if not chunk:
            return False
        buf += chunk
    return True


def next_line():
    global buf
    while b"\n" not in buf:
        if not read_more(None):
            return None
    line, buf = buf.split(b"\n", 1)
    return line


def reply(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def cancelled():
    """Whether a cancel line arrived (the node sends nothing else mid-job)."""
    global buf
    if not read_more(0.005):
        sys.exit(0)
    if b"\n" in buf:
        line, buf = buf.split(b"\n", 1)
        return json.loads(line).get("op") == "cancel"
    return False


while True:
    line = next_line()
    if line is None:
        break
    if not line.strip():
        continue
    req = json.loads(line)
    op = req["op"]
    if op == "cancel":
        continue
    if op in ("mount", "unmount"):
        reply({"ok": True})
    elif op == "infer":
        ids = req.get("input_ids") or []
        if ids == [1]:
            reply({"ok": True, "output_ids": ids + [os.getpid()]})
            continue
        for _ in range(6000):
            if cancelled():
                print(f"cancelled {req.get('job_id')}", file=sys.stderr, flush=True)
                reply({"ok": False, "code": "cancelled", "error": "stopped"})
                break
        else:
            reply({"ok": True, "output_ids": ids})
    else:
        reply({"ok": False, "error": f"unknown op {op}"})
