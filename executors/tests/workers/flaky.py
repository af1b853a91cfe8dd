#!/usr/bin/env python3
"""A test worker that misbehaves on request.

mount: checks the weights file (size and sha256) and remembers the model;
refuses configs containing "refuse". infer: output_ids = input_ids + [pid],
unless input_ids[0] is a magic number:
  666 crash mid-reply (half a line, then exit 3)
  777 hang (sleep for an hour)
  888 print a line that is not JSON
  999 print a reply line of 2 MiB
  444 write "hello from the worker" to stderr, then answer normally
  555 answer ok:false with code "bad_input"
  333 sleep 50 ms, then answer normally
  321 answer with the bytes of the request's job_id
infer on a model this process has not mounted answers ok:false (so a missing
replay shows). prompt: echoes the prompt. Every op is logged on stderr.
"""

import hashlib
import json
import os
import sys
import time

models = {}


def reply(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


for line in sys.stdin:
    req = json.loads(line)
    op = req["op"]
    print(f"op {op} model {req.get('model')}", file=sys.stderr, flush=True)
    if op == "mount":
        if "refuse" in req["config_json"]:
            reply({"ok": False, "error": "refused by the test worker"})
            continue
        with open(req["weights_path"], "rb") as f:
            data = f.read()
        if len(data) != req["weights_len"] or hashlib.sha256(data).hexdigest() != req["sha256"]:
            reply({"ok": False, "error": "weights file does not match"})
            continue
        models[req["model"]] = req["weights_path"]
        reply({"ok": True})
    elif op == "unmount":
        models.pop(req["model"], None)
        print(f"unmounted {req['model']}", file=sys.stderr, flush=True)
        reply({"ok": True})
    elif op == "infer":
        ids = req.get("input_ids") or []
        magic = ids[0] if ids else None
        if magic == 666:
            sys.stdout.write('{"ok": tr')
            sys.stdout.flush()
            os._exit(3)
        if magic == 777:
            time.sleep(3600)
        if magic == 888:
            reply("this is not the protocol")  # a JSON string, not an object
            print("definitely not json", flush=True)
            continue
        if magic == 999:
            sys.stdout.write('{"ok": true, "output_ids": [' + "1," * (1024 * 1024) + "1]}\n")
            sys.stdout.flush()
            continue
        if magic == 444:
            print("hello from the worker", file=sys.stderr, flush=True)
        if magic == 333:
            time.sleep(0.05)
        if magic == 321:
            reply({"ok": True, "output_ids": list(req["job_id"].encode())})
            continue
        if magic == 555:
            reply({"ok": False, "error": "555 is not welcome", "code": "bad_input"})
            continue
        if req["model"] not in models:
            reply({"ok": False, "error": f"model {req['model']} not mounted in {os.getpid()}"})
            continue
        reply({"ok": True, "output_ids": ids + [os.getpid()]})
    elif op == "prompt":
        reply({"ok": True, "text": req["prompt"]})
    else:
        reply({"ok": False, "error": f"unknown op {op}"})
