//! A donate worker (docs/WORKER-PROTOCOL.md) running a byte-level bigram model
//! whose table is the pushed weights.
//!
//! ```sh
//! cargo build --release --example ngram_worker -p donate-exec
//! donate serve --executor 'cmd:target/release/examples/ngram_worker'
//! ```
//!
//! Weights: exactly 65,536 bytes, `w[a * 256 + b]` the score of byte `b`
//! following byte `a`. `infer` returns the input ids followed by `max_tokens`
//! generated ids (16 when `max_tokens` <= 0, at most 4096): each one is the `b`
//! with the highest score in the row of the id before it (the lowest `b` on a
//! tie; row 0 for an empty input). Ids must be bytes (0..=255).
//!
//! `prompt` needs no model: it counts the byte pairs of the prompt and
//! continues its text greedily from its last byte by those counts, for
//! `max_out` bytes (64 when <= 0), stopping early at a byte never followed by
//! anything. The same rules as `examples/worker.py`.

use std::collections::HashMap;
use std::io::{self, BufRead, Write};

use serde_json::{json, Value};

const TABLE: usize = 256 * 256;

/// The byte after `last` by the scores in `table` (lowest on a tie).
fn next(table: &[u8], last: usize) -> usize {
    let row = &table[last * 256..last * 256 + 256];
    let mut best = 0;
    for (b, &score) in row.iter().enumerate() {
        if score > row[best] {
            best = b;
        }
    }
    best
}

fn infer(table: &[u8], input_ids: &[i64], max_tokens: i64) -> Result<Vec<i64>, String> {
    if let Some(bad) = input_ids.iter().find(|&&id| !(0..=255).contains(&id)) {
        return Err(format!("input id {bad} is not a byte (0..=255)"));
    }
    let n = if max_tokens <= 0 {
        16
    } else {
        max_tokens.min(4096)
    };
    let mut out = input_ids.to_vec();
    let mut last = input_ids.last().copied().unwrap_or(0) as usize;
    for _ in 0..n {
        last = next(table, last);
        out.push(last as i64);
    }
    Ok(out)
}

fn prompt(text: &str, max_out: i64) -> String {
    let bytes = text.as_bytes();
    let mut counts = vec![0u32; TABLE];
    for pair in bytes.windows(2) {
        counts[pair[0] as usize * 256 + pair[1] as usize] += 1;
    }
    let n = if max_out <= 0 { 64 } else { max_out };
    let mut out = Vec::new();
    let Some(&last) = bytes.last() else {
        return String::new();
    };
    let mut last = last as usize;
    for _ in 0..n {
        let row = &counts[last * 256..last * 256 + 256];
        let mut best = 0;
        for (b, &c) in row.iter().enumerate() {
            if c > row[best] {
                best = b;
            }
        }
        if row[best] == 0 {
            break;
        }
        out.push(best as u8);
        last = best;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn handle(models: &mut HashMap<u64, Vec<u8>>, request: &Value) -> Result<Value, String> {
    let model_id = || {
        request["model"]
            .as_u64()
            .ok_or_else(|| "missing model".to_owned())
    };
    match request["op"].as_str().unwrap_or("") {
        "mount" => {
            let path = request["weights_path"]
                .as_str()
                .ok_or("missing weights_path")?;
            let table = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
            if table.len() != TABLE {
                return Err(format!(
                    "bigram weights must be {TABLE} bytes (a 256x256 table), got {}",
                    table.len()
                ));
            }
            models.insert(model_id()?, table);
            Ok(json!({"ok": true}))
        }
        "unmount" => {
            models.remove(&model_id()?);
            Ok(json!({"ok": true}))
        }
        "infer" => {
            let id = model_id()?;
            let table = models
                .get(&id)
                .ok_or_else(|| format!("model {id} is not mounted"))?;
            let input_ids: Vec<i64> = request["input_ids"]
                .as_array()
                .map(|ids| ids.iter().filter_map(Value::as_i64).collect())
                .unwrap_or_default();
            let max_tokens = request["max_tokens"].as_i64().unwrap_or(0);
            let output_ids = infer(table, &input_ids, max_tokens)?;
            Ok(json!({"ok": true, "output_ids": output_ids}))
        }
        "prompt" => {
            let text = request["prompt"].as_str().unwrap_or("");
            let max_out = request["max_out"].as_i64().unwrap_or(0);
            Ok(json!({"ok": true, "text": prompt(text, max_out)}))
        }
        other => Err(format!("unknown op {other:?}")),
    }
}

fn main() -> io::Result<()> {
    let mut models = HashMap::new();
    let stdin = io::stdin().lock();
    let mut stdout = io::stdout().lock();
    for line in stdin.lines() {
        let line = line?;
        let reply = match serde_json::from_str::<Value>(&line) {
            // Requests are answered one at a time, so a cancel always comes
            // after the job it names was answered: it gets no reply.
            Ok(request) if request["op"] == "cancel" => continue,
            Ok(request) => handle(&mut models, &request)
                .unwrap_or_else(|error| json!({"ok": false, "error": error})),
            Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
        };
        serde_json::to_writer(&mut stdout, &reply)?;
        stdout.write_all(b"\n")?;
        stdout.flush()?;
    }
    eprintln!("stdin closed, {} model(s) mounted; exiting", models.len());
    Ok(())
}
