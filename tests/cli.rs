//! The `donate` binary driven as processes: `serve` on port 0, then `push`,
//! `infer`, `prompt` and `status` against it, with and without `--json`, and
//! the error exits. Every wait is bounded; every server is stopped with SIGTERM
//! and must exit 0.
#![cfg(unix)]

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_donate");
/// Longest any one process may take.
const LIMIT: Duration = Duration::from_secs(20);

/// A `donate serve` process and the address it printed.
struct Node {
    child: Child,
    addr: String,
    /// The node's stderr so far, when started with [`Node::start_logged`].
    log: Arc<Mutex<String>>,
}

impl Node {
    /// Starts `donate serve --addr 127.0.0.1:0 ARGS` and reads `listening on <addr>`.
    fn start(args: &[&str]) -> Node {
        Node::start_at("127.0.0.1:0", args)
    }

    /// Starts `donate serve --addr ADDR ARGS` and reads `listening on <addr>`.
    fn start_at(addr: &str, args: &[&str]) -> Node {
        Node::spawn(addr, args, false)
    }

    /// [`start`](Node::start), keeping its warnings and errors in `log`.
    fn start_logged(args: &[&str]) -> Node {
        Node::spawn("127.0.0.1:0", args, true)
    }

    /// Waits (bounded) until the node's log contains `want`; returns the log.
    fn wait_for_log(&self, want: &str) -> String {
        let deadline = Instant::now() + LIMIT;
        loop {
            let log = self.log.lock().unwrap().clone();
            if log.contains(want) {
                return log;
            }
            assert!(Instant::now() < deadline, "{want:?} not in the log: {log}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn spawn(addr: &str, args: &[&str], logged: bool) -> Node {
        let mut child = Command::new(BIN)
            .args(["serve", "--addr", addr])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(if logged {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("spawn donate serve");
        let log = Arc::new(Mutex::new(String::new()));
        if let Some(stderr) = child.stderr.take() {
            let log = Arc::clone(&log);
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { return };
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let mut node = Node {
            child,
            addr: String::new(),
            log,
        };
        let line = rx
            .recv_timeout(LIMIT)
            .expect("serve printed no address in time");
        node.addr = line
            .trim_end()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        node
    }

    /// Sends `signal` and checks that the node exits 0 (graceful shutdown).
    fn stop_with(mut self, signal: i32) {
        let pid = self.child.id() as i32;
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "kill {pid}");
        let status = wait_bounded(&mut self.child).expect("serve did not stop in time");
        assert!(status.success(), "serve exited with {status}");
    }

    fn stop(self) {
        self.stop_with(libc::SIGTERM);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Only reached with the process still running when a test failed.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits for `child` at most `LIMIT`; `None` (after killing it) when it takes longer.
fn wait_bounded(child: &mut Child) -> Option<ExitStatus> {
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// What a client command did.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Asserts success and returns stdout.
    fn ok(&self) -> &str {
        assert!(
            self.status.success(),
            "exit {}: stdout {:?} stderr {:?}",
            self.status,
            self.stdout,
            self.stderr
        );
        &self.stdout
    }

    /// Asserts a failure reported as one `donate: ...` line on stderr containing `want`.
    fn fails_with(&self, want: &str) -> &Run {
        assert!(
            !self.status.success(),
            "succeeded: stdout {:?}",
            self.stdout
        );
        let line = self.stderr.trim_end();
        assert!(
            line.starts_with("donate: ") && !line.contains('\n'),
            "stderr is not one `donate:` line: {:?}",
            self.stderr
        );
        assert!(line.contains(want), "{line:?} does not mention {want:?}");
        self
    }

    /// Stdout as exactly one JSON object.
    fn json(&self) -> Value {
        let out = self.stdout.trim_end();
        assert!(!out.contains('\n'), "more than one line: {out:?}");
        let value: Value = serde_json::from_str(out).expect("stdout is JSON");
        assert!(value.is_object(), "not an object: {out}");
        value
    }
}

/// Runs `donate ARGS` with a bounded wait.
fn donate(args: &[&str]) -> Run {
    donate_env(args, &[])
}

/// A fresh directory holding `config.json` and `model.safetensors` of `len` bytes.
fn model_dir(len: usize) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "cli-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), r#"{"ok":true}"#).unwrap();
    let weights: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(dir.join("model.safetensors"), weights).unwrap();
    dir
}

fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

/// An address nothing listens on.
fn closed_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    addr
}

#[test]
fn serve_stops_gracefully_on_sigterm_and_sigint() {
    let node = Node::start(&[]);
    assert!(node.addr.starts_with("127.0.0.1:"), "{}", node.addr);
    assert_ne!(node.addr, "127.0.0.1:0");
    node.stop();
    Node::start(&[]).stop_with(libc::SIGINT);
}

#[test]
fn status_reports_hello_and_queue() {
    let node = Node::start(&["--queue", "7"]);
    let status = donate(&["status", "--addr", &node.addr, "--json"]).json();
    assert_eq!(
        status,
        json!({
            "hello": {"v": 1, "type": "hello", "mode": "model_push", "role": "server", "queue_capacity": 7,
                      "capabilities": ["cancel", "deadline", "queue_position"]},
            "queue_status": {"v": 1, "type": "queue_status", "depth": 0, "capacity": 7, "in_progress": false},
        })
    );
    let human = donate(&["status", "--addr", &node.addr]);
    assert!(human.ok().contains("model_push"), "{}", human.stdout);
    assert!(
        !human.stdout.contains("jobs:"),
        "no stats offered: {}",
        human.stdout
    );
    node.stop();
}

#[test]
fn status_shows_the_counters_of_a_node_that_offers_stats() {
    let node = Node::start(&["--stats", "--mode", "local_lm"]);
    donate(&["prompt", "--addr", &node.addr, "hi"]).ok();
    let status = donate(&["status", "--addr", &node.addr, "--json"]).json();
    assert_eq!(
        status["stats"],
        json!({"v": 1, "type": "stats", "connections": 1, "connections_accepted": 2, "depth": 0,
               "jobs_running": 0, "jobs_done": 1, "jobs_failed": 0, "jobs_cancelled": 0,
               "jobs_expired": 0, "jobs_dropped": 0})
    );
    let human = donate(&["status", "--addr", &node.addr]);
    assert!(
        human.ok().contains("jobs:    0 running, 1 done, 0 failed"),
        "{}",
        human.stdout
    );
    node.stop();
}

#[test]
fn push_with_and_without_sha256() {
    let node = Node::start(&[]);
    // More than one 1 MiB chunk, not a multiple of it.
    let len = 3 * 1024 * 1024 + 5;
    let dir = model_dir(len);
    let (config, weights) = (dir.join("config.json"), dir.join("model.safetensors"));
    let base = ["push", "--addr", &node.addr, "--config", path(&config)];

    let human = donate(&[&base[..], &[path(&weights)]].concat());
    assert!(human.ok().starts_with("mounted: "), "{}", human.stdout);
    // The spelling infer and batch use works too.
    let flag = donate(&[&base[..], &["--weights", path(&weights)]].concat());
    assert!(flag.ok().starts_with("mounted: "), "{}", flag.stdout);

    for extra in [&[][..], &["--sha256"]] {
        let run = donate(&[&base[..], extra, &[path(&weights), "--json"]].concat());
        run.ok();
        let report = run.json();
        let keys: Vec<&str> = report
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys.len(), 7, "{report}");
        assert_eq!(report["ok"], true);
        assert_eq!(report["reused"], false, "this node has no store");
        assert_eq!(report["resumed_from"], 0);
        assert_eq!(report["message"], "mounted");
        assert_eq!(report["bytes"], len as u64);
        assert!(report["seconds"].as_f64().unwrap() >= 0.0);
        assert!(report["mib_s"].as_f64().unwrap() >= 0.0);
    }
    node.stop();
}

#[test]
fn infer_json_is_the_result_frame() {
    let node = Node::start(&[]);
    let dir = model_dir(4);
    let run = donate(&[
        "infer",
        "--addr",
        &node.addr,
        "--model",
        path(&dir),
        "--ids",
        "9,9",
        "--max-tokens",
        "3",
        "--json",
    ]);
    run.ok();
    let job_id = run.json()["job_id"].as_str().unwrap().to_owned();
    assert!(!job_id.is_empty());
    assert_eq!(
        run.stdout,
        format!(
            r#"{{"v":1,"type":"infer_result","job_id":"{job_id}","ok":true,"output_ids":[9,9,1,2,3],"queue_depth":0}}"#
        ) + "\n"
    );

    let human = donate(&[
        "infer",
        "--addr",
        &node.addr,
        "--config",
        path(&dir.join("config.json")),
        "--weights",
        path(&dir.join("model.safetensors")),
        "--sha256",
        "--ids",
        "1",
    ]);
    assert_eq!(human.ok(), "1,1,2,3,4,5,6,7,1\n");
    node.stop();
}

#[test]
fn every_runtime_serves_and_stops_gracefully() {
    let dir = model_dir(4);
    for runtime in ["std", "smol", "tokio"] {
        let node = Node::start(&["--runtime", runtime, "--workers", "2"]);
        let run = donate(&[
            "infer",
            "--addr",
            &node.addr,
            "--model",
            path(&dir),
            "--ids",
            "9,9",
            "--max-tokens",
            "3",
        ]);
        assert_eq!(run.ok(), "9,9,1,2,3\n", "runtime {runtime}");
        let status = donate(&["status", "--addr", &node.addr, "--json"]);
        assert_eq!(
            status.json()["queue_status"]["capacity"],
            64,
            "runtime {runtime}"
        );
        node.stop();
    }
}

#[test]
fn prompt_on_a_local_lm_node() {
    let node = Node::start(&["--mode", "local_lm", "--local-lm-path", "/models/m"]);
    let run = donate(&["prompt", "--addr", &node.addr, "hello there", "--json"]);
    run.ok();
    let job_id = run.json()["job_id"].as_str().unwrap().to_owned();
    assert_eq!(
        run.stdout,
        format!(
            r#"{{"v":1,"type":"prompt_result","job_id":"{job_id}","ok":true,"text":"[local_lm stub @ /models/m] stub says: hello there","queue_depth":0}}"#
        ) + "\n"
    );
    let human = donate(&["prompt", "--addr", &node.addr, "--max-out", "5", "is it?"]);
    assert_eq!(human.ok(), "[local_lm stub @ /models/m] stub says: maybe\n");

    let status = donate(&["status", "--addr", &node.addr, "--json"]).json();
    assert_eq!(status["hello"]["mode"], "local_lm");
    assert_eq!(status["hello"]["local_lm_path"], "/models/m");
    let human = donate(&["status", "--addr", &node.addr]);
    assert!(
        human.ok().contains("\nmodel:   /models/m\n"),
        "{}",
        human.stdout
    );
    // The stub does not sample: sampling flags are refused before sending.
    donate(&["prompt", "--addr", &node.addr, "--seed", "7", "hi"])
        .fails_with("does not offer the sampling extension");
    node.stop();
}

#[test]
fn prompt_dash_reads_the_prompt_from_stdin() {
    let node = Node::start(&["--mode", "local_lm", "--executor", "lm:cat"]);
    // Its last line break is the pipe's, not the prompt's.
    let piped = donate_stdin(
        &["prompt", "--addr", &node.addr, "-"],
        "line one\n  line two\n",
    );
    assert_eq!(piped.ok(), "line one\n  line two\n");
    node.stop();
}

#[test]
fn refused_connection_fails_cleanly() {
    let addr = closed_addr();
    donate(&["status", "--addr", &addr]).fails_with("cannot connect");
    let run = donate(&["prompt", "--addr", &addr, "hi", "--json"]);
    run.fails_with("cannot connect");
    assert_eq!(run.stdout, "");
}

#[test]
fn wrong_mode_fails_cleanly() {
    let lm = Node::start(&["--mode", "local_lm"]);
    let dir = model_dir(4);
    let infer = donate(&[
        "infer",
        "--addr",
        &lm.addr,
        "--model",
        path(&dir),
        "--ids",
        "9,9",
    ]);
    infer.fails_with("model_push not enabled on this node");
    assert_eq!(infer.stdout, "");

    let push = donate(&[
        "push",
        "--addr",
        &lm.addr,
        "--config",
        path(&dir.join("config.json")),
        path(&dir.join("model.safetensors")),
        "--json",
    ]);
    push.fails_with("model_push not enabled on this node");
    assert_eq!(push.json()["ok"], false);
    lm.stop();

    // Refused before sending, from the hello's mode, saying what to do instead.
    let mp = Node::start(&["--stats"]);
    let prompt = donate(&["prompt", "--addr", &mp.addr, "hi", "--json"]);
    prompt
        .fails_with("runs pushed models (model_push)")
        .fails_with("use `donate infer --model …` (or `donate push`)");
    assert_eq!(prompt.stdout, "", "the node answered nothing");
    let stats = donate(&["status", "--addr", &mp.addr, "--json"]).json();
    assert_eq!(stats["stats"]["jobs_done"], 0);
    assert_eq!(stats["stats"]["jobs_failed"], 0);
    mp.stop();
}

#[test]
fn model_refused_fails_with_the_report() {
    let node = Node::start(&[]);
    let dir = model_dir(4);
    std::fs::write(dir.join("config.json"), "").unwrap();
    let run = donate(&[
        "push",
        "--addr",
        &node.addr,
        "--config",
        path(&dir.join("config.json")),
        path(&dir.join("model.safetensors")),
        "--json",
    ]);
    run.fails_with("no config");
    let report = run.json();
    assert_eq!(report["ok"], false);
    assert_eq!(report["message"], "no config");

    // Over --max-model: refused before any byte is stored.
    node.stop();
    let small = Node::start(&["--max-model", "3"]);
    donate(&[
        "infer",
        "--addr",
        &small.addr,
        "--model",
        path(&dir),
        "--ids",
        "1",
    ])
    .fails_with("bad weights_len");
    small.stop();
}

#[test]
fn missing_files_fail_before_connecting() {
    let addr = closed_addr();
    let dir = model_dir(4);
    let missing = dir.join("missing.safetensors");
    donate(&[
        "push",
        "--addr",
        &addr,
        "--config",
        path(&dir.join("config.json")),
        path(&missing),
    ])
    .fails_with("missing.safetensors");
    donate(&[
        "infer",
        "--addr",
        &addr,
        "--model",
        path(&dir.join("nope")),
        "--ids",
        "1",
    ])
    // Neither a directory nor a file: the path is named.
    .fails_with("nope: No such file");
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    donate(&[
        "infer",
        "--addr",
        &addr,
        "--model",
        path(&empty),
        "--ids",
        "1",
    ])
    .fails_with("config.json");
    donate(&[
        "push",
        "--addr",
        &addr,
        "--config",
        path(&dir.join("nope.json")),
        path(&dir.join("model.safetensors")),
    ])
    .fails_with("nope.json");
}

#[test]
fn serve_refuses_what_it_cannot_run() {
    donate(&["serve", "--addr", "127.0.0.1:0", "--executor", "gpu"]).fails_with("unknown executor");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    donate(&["serve", "--addr", &addr]).fails_with("cannot listen");
    // A worker program that runs but exits at once is found at start, with
    // its reason (the worker's stderr, logged too, is left out here).
    let missing = temp_dir().join("no-such-worker.py");
    let worker = format!("cmd:python3 {}", path(&missing));
    let args = ["serve", "--addr", "127.0.0.1:0", "--executor", &worker];
    donate_env(&args, &[("RUST_LOG", std::path::Path::new("warn"))])
        .fails_with("cannot start the worker processes: worker w0[")
        .fails_with("exited at start (exit status: 2); its last stderr line: ")
        .fails_with("no-such-worker.py");
}

/// A node that speaks like the Go one: it answers `queue_status` with `unknown type`.
fn go_like_node() -> (String, thread::JoinHandle<()>) {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let handle = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(LIMIT)).unwrap();
        let frame = |body: &str| {
            let mut out = (body.len() as u32).to_le_bytes().to_vec();
            out.extend(body.as_bytes());
            out
        };
        stream
            .write_all(&frame(
                r#"{"v":1,"type":"hello","mode":"model_push","role":"server","queue_capacity":64}"#,
            ))
            .unwrap();
        loop {
            let mut len = [0; 4];
            if stream.read_exact(&mut len).is_err() {
                return;
            }
            let mut body = vec![0; u32::from_le_bytes(len) as usize];
            stream.read_exact(&mut body).unwrap();
            let message: Value = serde_json::from_slice(&body).unwrap();
            if message["type"] == "queue_status" {
                stream
                    .write_all(&frame(
                        r#"{"error":"unknown type: queue_status","type":"error","v":1}"#,
                    ))
                    .unwrap();
            }
        }
    });
    (addr, handle)
}

#[test]
fn status_of_a_go_node_has_null_queue_status() {
    let (addr, node) = go_like_node();
    let status = donate(&["status", "--addr", &addr, "--json"]).json();
    assert_eq!(
        status,
        json!({
            "hello": {"v": 1, "type": "hello", "mode": "model_push", "role": "server", "queue_capacity": 64},
            "queue_status": null,
        })
    );
    node.join().unwrap();
}

#[test]
fn a_silent_node_times_out() {
    // Accepts, never says hello.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let started = Instant::now();
    donate(&["status", "--addr", &addr, "--timeout", "0.3"]).fails_with("cannot connect");
    assert!(started.elapsed() < LIMIT);
    drop(listener);
}

// ---------------------------------------------------------------------------
// --executor candle

#[test]
fn serve_model_implies_the_candle_executor() {
    let dir = temp_dir();
    let gguf = dir.join("m.gguf");
    // A GGUF header and nothing after it: the stub would serve, candle refuses it.
    std::fs::write(&gguf, b"GGUF\x03\0\0\0").unwrap();
    let serve = |extra: &[&str]| {
        let base = ["serve", "--addr", "127.0.0.1:0", "--mode", "local_lm"];
        donate(&[&base[..], &["--model", path(&gguf)], extra].concat())
    };
    #[cfg(feature = "candle")]
    serve(&[]).fails_with("cannot start the candle executor");
    #[cfg(not(feature = "candle"))]
    serve(&[]).fails_with("--model needs the candle executor: build with --features candle");
    serve(&["--executor", "stub"])
        .fails_with("--model needs the candle executor, not --executor stub");
}

#[cfg(not(feature = "candle"))]
#[test]
fn candle_executor_needs_the_feature() {
    donate(&["serve", "--addr", "127.0.0.1:0", "--executor", "candle"])
        .fails_with("built without the candle feature: cargo build --features candle");
}

/// With the `candle` feature: a tiny random llama written here (safetensors
/// by hand) is pushed with `donate infer --model DIR` and `donate push --model
/// DIR`, and the ids equal what donate-candle computes in process (itself
/// checked against candle run directly in executors/candle/tests).
#[cfg(feature = "candle")]
mod candle {
    use super::*;
    use donate_candle::{CandleConfig, CandleExecutor};

    const HIDDEN: usize = 32;
    const INTER: usize = 64;
    const LAYERS: usize = 2;
    const VOCAB: usize = 256;

    fn config_json() -> String {
        format!(
            r#"{{"model_type":"llama","hidden_size":{HIDDEN},"intermediate_size":{INTER},
                "num_hidden_layers":{LAYERS},"num_attention_heads":4,"num_key_value_heads":4,
                "vocab_size":{VOCAB},"max_position_embeddings":128,"rms_norm_eps":1e-5}}"#
        )
    }

    /// A safetensors file of random F32 tensors, written by hand: an 8-byte
    /// little-endian header length, the JSON header, then the data.
    fn safetensors() -> Vec<u8> {
        let mut tensors: Vec<(String, Vec<usize>)> = vec![
            ("model.embed_tokens.weight".into(), vec![VOCAB, HIDDEN]),
            ("model.norm.weight".into(), vec![HIDDEN]),
            ("lm_head.weight".into(), vec![VOCAB, HIDDEN]),
        ];
        for l in 0..LAYERS {
            let p = format!("model.layers.{l}");
            for (name, shape) in [
                ("self_attn.q_proj", vec![HIDDEN, HIDDEN]),
                ("self_attn.k_proj", vec![HIDDEN, HIDDEN]),
                ("self_attn.v_proj", vec![HIDDEN, HIDDEN]),
                ("self_attn.o_proj", vec![HIDDEN, HIDDEN]),
                ("mlp.gate_proj", vec![INTER, HIDDEN]),
                ("mlp.up_proj", vec![INTER, HIDDEN]),
                ("mlp.down_proj", vec![HIDDEN, INTER]),
                ("input_layernorm", vec![HIDDEN]),
                ("post_attention_layernorm", vec![HIDDEN]),
            ] {
                tensors.push((format!("{p}.{name}.weight"), shape));
            }
        }
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut data = Vec::new();
        let mut header = serde_json::Map::new();
        for (name, shape) in tensors {
            let start = data.len();
            for _ in 0..shape.iter().product::<usize>() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let unit = (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
                let value = if shape.len() == 1 {
                    1.0 + 0.1 * unit
                } else {
                    unit * 0.3
                };
                data.extend_from_slice(&value.to_le_bytes());
            }
            header.insert(
                name,
                serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
            );
        }
        let mut header = serde_json::Value::Object(header).to_string().into_bytes();
        while header.len() % 8 != 0 {
            header.push(b' ');
        }
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend(header);
        file.extend(data);
        file
    }

    /// A fresh directory holding the tiny llama's config.json and model.safetensors.
    fn llama_dir() -> PathBuf {
        let dir = model_dir(0);
        std::fs::write(dir.join("config.json"), config_json()).unwrap();
        std::fs::write(dir.join("model.safetensors"), safetensors()).unwrap();
        dir
    }

    /// What the executor computes in process for `ids`.
    fn expected(ids: &[i32], max_tokens: i64) -> String {
        let executor = CandleExecutor::new(CandleConfig::default()).unwrap();
        let model = executor.load(&config_json(), &safetensors()).unwrap();
        let out = executor.generate(&model, ids, max_tokens).unwrap();
        assert_eq!(
            out.len(),
            ids.len()
                + if max_tokens > 0 {
                    max_tokens as usize
                } else {
                    8
                }
        );
        out.iter().map(i32::to_string).collect::<Vec<_>>().join(",")
    }

    #[test]
    fn serve_candle_generates_over_the_cli() {
        let dir = llama_dir();
        let node = Node::start(&["--executor", "candle"]);
        let infer = |extra: &[&str]| {
            let args = [
                &["infer", "--addr", &node.addr, "--model", path(&dir)][..],
                extra,
            ]
            .concat();
            donate(&args)
        };
        let out = infer(&["--ids", "3,1,4,1,5", "--max-tokens", "6"]);
        assert_eq!(out.ok().trim(), expected(&[3, 1, 4, 1, 5], 6));
        // The default is 8 tokens.
        assert_eq!(infer(&["--ids", "9"]).ok().trim(), expected(&[9], 0));
        // An id outside the vocabulary is a job error, reported as such.
        let out = infer(&["--ids", "1,999", "--json"]);
        assert!(!out.status.success());
        let frame: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(frame["code"], "bad_input", "{frame}");

        // push --model DIR mounts; a broken directory is refused with the reason.
        let out = donate(&[
            "push",
            "--addr",
            &node.addr,
            "--model",
            path(&dir),
            "--json",
        ]);
        assert_eq!(out.json()["message"], "mounted");
        let broken = model_dir(0);
        std::fs::write(broken.join("config.json"), config_json()).unwrap();
        std::fs::write(broken.join("model.safetensors"), &safetensors()[..1000]).unwrap();
        donate(&["push", "--addr", &node.addr, "--model", path(&broken)])
            .fails_with("not a valid safetensors file");
        node.stop();
    }

    #[test]
    fn batch_sends_its_sampling_flags_with_every_job() {
        let dir = llama_dir();
        let node = Node::start(&["--executor", "candle"]);
        let sampling = ["--temperature", "1.5", "--seed", "7", "--top-k", "50"];
        let infer = donate(
            &[
                &["infer", "--addr", &node.addr, "--model", path(&dir)][..],
                &["--ids", "3,1,4", "--max-tokens", "12"],
                &sampling,
            ]
            .concat(),
        );
        let want = infer.ok().trim().to_owned();
        assert_ne!(want, expected(&[3, 1, 4], 12), "sampled, not greedy");
        let input = dir.join("jobs.jsonl");
        std::fs::write(
            &input,
            r#"{"job_id":"a","input_ids":[3,1,4],"max_tokens":12}"#,
        )
        .unwrap();
        let batch = donate(
            &[
                &["batch", "--node", &node.addr, "--model", path(&dir)][..],
                &["--input", path(&input)],
                &sampling,
            ]
            .concat(),
        );
        let line: Value = serde_json::from_str(batch.ok().trim_end()).unwrap();
        let ids: Vec<String> = line["output_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|id| id.to_string())
            .collect();
        assert_eq!(ids.join(","), want, "{line}");
        node.stop();
    }

    #[test]
    fn serve_candle_refuses_what_it_cannot_load() {
        let serve = |extra: &[&str]| {
            donate(
                &[
                    &["serve", "--addr", "127.0.0.1:0", "--executor", "candle"][..],
                    extra,
                ]
                .concat(),
            )
        };
        serve(&["--mode", "local_lm"]).fails_with("needs --local-lm-path DIR");
        // llama_dir has no tokenizer.json.
        let dir = llama_dir();
        serve(&["--mode", "local_lm", "--local-lm-path", path(&dir)])
            .fails_with("tokenizer.json is missing");
        serve(&["--candle-device", "tpu"]).fails_with("unknown device");
    }

    #[test]
    fn serve_model_names_a_missing_file_or_one_that_is_not_gguf() {
        let serve = |model: &std::path::Path| {
            donate(&[
                "serve",
                "--addr",
                "127.0.0.1:0",
                "--mode",
                "local_lm",
                "--model",
                path(model),
            ])
        };
        let dir = temp_dir();
        let nope = dir.join("nope.gguf");
        serve(&nope).fails_with(&format!("{}: no such file", path(&nope)));
        let text = dir.join("notes.txt");
        std::fs::write(&text, "not a model").unwrap();
        serve(&text).fails_with(&format!("{}: not a GGUF file", path(&text)));
    }
}

#[test]
fn every_runtime_serves_a_unix_socket() {
    let dir = model_dir(4);
    let sock = dir.join("node.sock");
    // A socket file left by a node that is gone: replaced, not refused.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let addr = format!("unix:{}", path(&sock));
    for runtime in ["std", "smol", "tokio"] {
        let node = Node::start_at(&addr, &["--runtime", runtime]);
        assert_eq!(node.addr, addr, "{runtime}");
        // A second node on the same socket is refused while the first listens.
        let second = donate(&["serve", "--addr", &addr]);
        second.fails_with("a node already listens on");
        let status = donate(&["status", "--addr", &addr, "--json"]).json();
        assert_eq!(status["hello"]["mode"], "model_push", "{runtime}");
        let run = donate(&[
            "infer",
            "--addr",
            &addr,
            "--model",
            path(&dir),
            "--ids",
            "9,9",
        ]);
        assert_eq!(run.ok(), "9,9,1,2,3,4,5,6,7,1\n", "{runtime}");
        node.stop();
        assert!(
            !sock.exists(),
            "{runtime}: the node removes its socket file"
        );
    }
    donate(&["status", "--addr", &addr]).fails_with(&format!("connecting to {addr}"));
}

// ---------------------------------------------------------------------------
// Secure mode: keygen, the exposure rule, trust on first use, exit statuses

/// Runs `donate ARGS` with extra environment variables.
fn donate_env(args: &[&str], env: &[(&str, &std::path::Path)]) -> Run {
    let mut command = Command::new(BIN);
    command.args(args);
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn donate");
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let stdout = thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).map(|_| s)
    });
    let stderr = thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).map(|_| s)
    });
    let status = wait_bounded(&mut child).unwrap_or_else(|| panic!("donate {args:?} timed out"));
    Run {
        status,
        stdout: stdout.join().unwrap().expect("stdout is UTF-8"),
        stderr: stderr.join().unwrap().expect("stderr is UTF-8"),
    }
}

/// Runs `donate ARGS` with `input` on its stdin.
fn donate_stdin(args: &[&str], input: &str) -> Run {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn donate");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).unwrap();
    drop(stdin);
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let stderr = thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).map(|_| s)
    });
    let mut stdout = String::new();
    out.read_to_string(&mut stdout).unwrap();
    let status = wait_bounded(&mut child).unwrap_or_else(|| panic!("donate {args:?} timed out"));
    Run {
        status,
        stdout,
        stderr: stderr.join().unwrap().unwrap(),
    }
}

impl Run {
    /// Asserts the exit status.
    fn code(&self, code: i32) -> &Run {
        assert_eq!(
            self.status.code(),
            Some(code),
            "stdout {:?} stderr {:?}",
            self.stdout,
            self.stderr
        );
        self
    }
}

/// An empty temporary directory.
fn temp_dir() -> PathBuf {
    let dir = model_dir(1);
    for f in ["config.json", "model.safetensors"] {
        std::fs::remove_file(dir.join(f)).unwrap();
    }
    dir
}

/// `donate keygen DIR/NAME`: the fingerprint it printed.
fn keygen(dir: &std::path::Path, name: &str) -> String {
    let run = donate(&["keygen", path(&dir.join(name))]);
    run.ok().trim().to_owned()
}

#[test]
fn keygen_writes_a_0600_key_and_a_pub_file_and_refuses_to_overwrite() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = temp_dir();
    let key = dir.join("id");
    let fingerprint = keygen(&dir, "id");
    assert!(
        fingerprint.starts_with("SHA256:") && fingerprint.len() == 50,
        "{fingerprint}"
    );
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let secret = std::fs::read_to_string(&key).unwrap();
    let public = std::fs::read_to_string(dir.join("id.pub")).unwrap();
    assert!(secret.starts_with("donate-x25519-secret "), "{secret}");
    assert!(public.starts_with("donate-x25519 "), "{public}");
    let key_of = donate_proto::PublicKey::parse(&public).unwrap();
    assert_eq!(key_of.fingerprint(), fingerprint);
    donate(&["keygen", path(&key)]).fails_with("refusing to overwrite");
    assert_eq!(std::fs::read_to_string(&key).unwrap(), secret);
}

#[test]
fn keygen_creates_the_missing_folders_for_its_owner_only() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = temp_dir();
    let key = dir.join(".donate").join("keys").join("node");
    // --timeout is taken as by every other command.
    donate(&["keygen", "--timeout", "5", path(&key)]).ok();
    assert!(key.exists() && dir.join(".donate/keys/node.pub").exists());
    for folder in [dir.join(".donate"), dir.join(".donate/keys")] {
        let mode = std::fs::metadata(&folder).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", folder.display());
    }
    // A folder that exists is left as it is.
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    donate(&["keygen", path(&dir.join("second"))]).ok();
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        mode
    );
}

#[test]
fn serve_on_a_reachable_address_needs_key_or_insecure() {
    let run = donate(&["serve", "--addr", "0.0.0.0:0"]);
    run.fails_with("--key").fails_with("--insecure").code(18);
    let node = Node::start_at("0.0.0.0:0", &["--insecure"]);
    assert!(node.addr.starts_with("0.0.0.0:"), "{}", node.addr);
    node.stop();
    // Loopback and unix: need neither.
    Node::start(&[]).stop();
}

/// One HTTP GET to `addr` (host:port): the status and the body.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).expect("connect to --metrics");
    s.set_read_timeout(Some(LIMIT)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    (
        head.split(' ').nth(1).unwrap().parse().unwrap(),
        body.to_owned(),
    )
}

#[test]
fn serve_metrics_on_loopback_and_refuses_an_exposed_address() {
    let refused = donate(&["serve", "--metrics", "0.0.0.0:0"]);
    refused
        .fails_with("refusing to serve --metrics on 0.0.0.0:0: other machines could read the node's counters; use a loopback address")
        .code(18);
    assert!(!refused.stderr.contains("  "), "{:?}", refused.stderr);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let node = Node::start(&["--metrics", &metrics]);
    assert_eq!(http_get(&metrics, "/healthz"), (200, "ok\n".to_owned()));
    donate(&["status", "--addr", &node.addr, "--json"]).json();
    let deadline = Instant::now() + LIMIT;
    loop {
        let (code, body) = http_get(&metrics, "/metrics");
        assert_eq!(code, 200);
        if body.contains("\ndonate_connections_total 1\n")
            && body.contains("\ndonate_connections_open 0\n")
        {
            assert!(body.ends_with("# EOF\n"), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "{body}");
        thread::sleep(Duration::from_millis(20));
    }
    node.stop();
}

#[test]
fn infer_that_times_out_cancels_its_job_on_the_node() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let worker = format!(
        "cmd:python3 {}/executors/tests/workers/cancellable.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let node = Node::start(&["--executor", &worker, "--metrics", &metrics]);
    let dir = model_dir(4);
    // Input [5] keeps cancellable.py busy for 30 s unless it is cancelled.
    let started = Instant::now();
    donate(&[
        "infer",
        "--addr",
        &node.addr,
        "--model",
        path(&dir),
        "--ids",
        "5",
        "--timeout",
        "1",
    ])
    .fails_with("donate: ");
    loop {
        let (_, body) = http_get(&metrics, "/metrics");
        if body.contains("donate_jobs_failed_total{kind=\"infer\",code=\"cancelled\"} 1\n")
            && body.contains("\ndonate_jobs_running 0\n")
        {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{body}");
        thread::sleep(Duration::from_millis(20));
    }
    node.stop();
}

/// A secure node with a node key and one authorized client key.
struct SecureSetup {
    dir: PathBuf,
    node: Node,
    node_fp: String,
    client_key: String,
}

fn secure_node() -> SecureSetup {
    let dir = temp_dir();
    let node_fp = keygen(&dir, "node");
    keygen(&dir, "client");
    std::fs::copy(dir.join("client.pub"), dir.join("authorized")).unwrap();
    chmod(&dir.join("authorized"), 0o600);
    let node = Node::start(&[
        "--key",
        path(&dir.join("node")),
        "--authorized-keys",
        path(&dir.join("authorized")),
    ]);
    let client_key = path(&dir.join("client")).to_owned();
    SecureSetup {
        dir,
        node,
        node_fp,
        client_key,
    }
}

fn chmod(path: &std::path::Path, mode: u32) {
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
}

/// `donate status` with `--key KEY` and `extra`.
fn secure_status(addr: &str, key: &str, extra: &[&str]) -> Run {
    let mut args = vec!["status", "--addr", addr, "--key", key];
    args.extend(extra);
    donate(&args)
}

#[test]
fn serve_refuses_an_authorized_keys_file_it_cannot_use() {
    let dir = temp_dir();
    keygen(&dir, "node");
    let node_key = path(&dir.join("node")).to_owned();
    let serve = |authorized: &str| {
        donate(&[
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--key",
            &node_key,
            "--authorized-keys",
            authorized,
        ])
    };
    let missing = dir.join("nope");
    serve(path(&missing))
        .fails_with(&format!(
            "cannot read the authorized keys {}",
            path(&missing)
        ))
        .code(17);
    let shared = dir.join("shared");
    std::fs::copy(dir.join("node.pub"), &shared).unwrap();
    for mode in [0o664, 0o646] {
        chmod(&shared, mode);
        serve(path(&shared))
            .fails_with("writable by group or others")
            .fails_with(&format!("chmod go-w {}", path(&shared)))
            .code(17);
    }
}

#[test]
fn authorized_keys_that_become_writable_by_others_refuse_every_client_with_a_logged_reason() {
    let dir = temp_dir();
    let node_fp = keygen(&dir, "node");
    keygen(&dir, "client");
    let authorized = dir.join("authorized");
    std::fs::copy(dir.join("client.pub"), &authorized).unwrap();
    chmod(&authorized, 0o600);
    let node = Node::start_logged(&[
        "--key",
        path(&dir.join("node")),
        "--authorized-keys",
        path(&authorized),
    ]);
    let client = path(&dir.join("client")).to_owned();
    secure_status(&node.addr, &client, &["--node-key", &node_fp]).ok();
    chmod(&authorized, 0o666);
    secure_status(&node.addr, &client, &["--node-key", &node_fp])
        .fails_with("does not know your key")
        .code(10);
    let log = node.wait_for_log("client refused");
    assert!(log.contains("writable by group or others"), "{log}");
    chmod(&authorized, 0o600);
    secure_status(&node.addr, &client, &["--node-key", &node_fp]).ok();
    node.stop();
}

#[test]
fn a_private_key_pasted_into_authorized_keys_is_skipped_and_never_logged() {
    let dir = temp_dir();
    let node_fp = keygen(&dir, "node");
    keygen(&dir, "client");
    keygen(&dir, "pasted");
    let secret = std::fs::read_to_string(dir.join("pasted")).unwrap();
    let secret_b64 = secret.split_whitespace().nth(1).unwrap().to_owned();
    let authorized = dir.join("authorized");
    let client_pub = std::fs::read_to_string(dir.join("client.pub")).unwrap();
    std::fs::write(&authorized, format!("{client_pub}{secret}")).unwrap();
    chmod(&authorized, 0o600);
    let node = Node::start_logged(&[
        "--key",
        path(&dir.join("node")),
        "--authorized-keys",
        path(&authorized),
    ]);
    let client = path(&dir.join("client")).to_owned();
    secure_status(&node.addr, &client, &["--node-key", &node_fp]).ok();
    let log = node.wait_for_log("looks like a private key");
    assert!(log.contains("line=2"), "{log}");
    assert!(!log.contains(&secret_b64), "key material logged: {log}");
    node.stop();
}

#[test]
fn a_line_of_known_nodes_that_is_not_utf8_is_skipped_with_a_warning() {
    let s = secure_node();
    let config = temp_dir();
    let known = config.join("donate").join("known_nodes");
    std::fs::create_dir_all(known.parent().unwrap()).unwrap();
    let node_pub = std::fs::read_to_string(s.dir.join("node.pub")).unwrap();
    let node_line = node_pub
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    let mut bytes = b"other:1 \xff\xfe not text\n".to_vec();
    bytes.extend(format!("{} {node_line}\n", s.node.addr).as_bytes());
    std::fs::write(&known, bytes).unwrap();
    let run = donate_env(
        &["status", "--addr", &s.node.addr, "--key", &s.client_key],
        &[("XDG_CONFIG_HOME", config.as_path())],
    );
    run.ok();
    assert!(
        run.stderr.contains("line 1: not UTF-8, skipped"),
        "{}",
        run.stderr
    );
    s.node.stop();
}

#[test]
fn a_malformed_node_key_is_a_usage_error() {
    let s = secure_node();
    let truncated = &s.node_fp[..s.node_fp.len() - 1];
    for bad in ["SHA256:nonsense", truncated, "donate-x25519 AAAA"] {
        let run = secure_status(&s.node.addr, &s.client_key, &["--node-key", bad]);
        run.code(2);
        assert!(
            run.stderr.contains("not a key fingerprint")
                || run.stderr.contains("not a donate public key"),
            "{bad}: {}",
            run.stderr
        );
    }
    s.node.stop();
}

#[test]
fn a_public_key_passed_as_key_is_named_as_one() {
    let s = secure_node();
    let want = "this is a public key; pass the private key file (without .pub)";
    let client_pub = format!("{}.pub", s.client_key);
    secure_status(&s.node.addr, &client_pub, &["--node-key", &s.node_fp])
        .fails_with(want)
        .code(17);
    // The same text under another name.
    let renamed = s.dir.join("client-key");
    std::fs::copy(&client_pub, &renamed).unwrap();
    chmod(&renamed, 0o600);
    secure_status(&s.node.addr, path(&renamed), &["--node-key", &s.node_fp])
        .fails_with(want)
        .code(17);
    donate(&[
        "serve",
        "--addr",
        "127.0.0.1:0",
        "--key",
        path(&s.dir.join("node.pub")),
        "--authorized-keys",
        path(&s.dir.join("authorized")),
    ])
    .fails_with(want)
    .code(17);
    s.node.stop();
}

#[test]
fn secure_clients_and_their_exit_statuses() {
    let s = secure_node();
    let addr = s.node.addr.as_str();
    let model = model_dir(8);
    // Pinned by fingerprint: works end to end.
    donate(&[
        "status",
        "--addr",
        addr,
        "--key",
        &s.client_key,
        "--node-key",
        &s.node_fp,
    ])
    .ok();
    let out = donate(&[
        "infer",
        "--addr",
        addr,
        "--key",
        &s.client_key,
        "--node-key",
        &s.node_fp,
        "--model",
        path(&model),
        "--ids",
        "4,5",
        "--max-tokens",
        "2",
    ]);
    assert_eq!(out.ok().trim(), "4,5,1,2");
    // Unknown client key.
    let stranger = keygen(&s.dir, "stranger");
    donate(&[
        "status",
        "--addr",
        addr,
        "--key",
        path(&s.dir.join("stranger")),
        "--node-key",
        &s.node_fp,
    ])
    .fails_with(&format!(
        "this node does not know your key {stranger}; ask its owner"
    ))
    .code(10);
    // Node key mismatch.
    donate(&[
        "status",
        "--addr",
        addr,
        "--key",
        &s.client_key,
        "--node-key",
        &stranger,
    ])
    .fails_with(&format!(
        "the node at {addr} presented key {}, expected {stranger}",
        s.node_fp
    ))
    .code(11);
    // A plain client meets the secure node.
    donate(&["status", "--addr", addr])
        .fails_with("requires an encrypted connection")
        .code(15);
    // A private key others can read.
    let loose = s.dir.join("loose");
    std::fs::copy(&s.client_key, &loose).unwrap();
    std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    donate(&[
        "status",
        "--addr",
        addr,
        "--key",
        path(&loose),
        "--node-key",
        &s.node_fp,
    ])
    .fails_with(&format!("chmod 600 {}", path(&loose)))
    .code(17);
    // A secure client meets a plain node.
    let plain = Node::start(&[]);
    donate(&[
        "status",
        "--addr",
        &plain.addr,
        "--key",
        &s.client_key,
        "--node-key",
        &s.node_fp,
    ])
    .fails_with("does not offer an encrypted connection")
    .code(12);
    plain.stop();
    s.node.stop();
}

#[test]
fn trust_on_first_use_records_the_node_and_pins_it_later() {
    let s = secure_node();
    let addr = s.node.addr.clone();
    let config = temp_dir();
    let env = [("XDG_CONFIG_HOME", config.as_path())];
    let status = |extra: &[&str]| {
        let mut args = vec![
            "status",
            "--addr",
            addr.as_str(),
            "--key",
            s.client_key.as_str(),
        ];
        args.extend(extra);
        donate_env(&args, &env)
    };
    // Unknown and not trusted: stops at the node's key, naming it.
    status(&[])
        .fails_with(&format!("--node-key {}", s.node_fp))
        .code(16);
    status(&["--trust-on-first-use"]).ok();
    let known = config.join("donate").join("known_nodes");
    let text = std::fs::read_to_string(&known).unwrap();
    let node_pub = std::fs::read_to_string(s.dir.join("node.pub")).unwrap();
    let node_line = node_pub
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    assert_eq!(text, format!("{addr} {node_line}\n"));
    // Pinned from now on, without the flag.
    status(&[]).ok();
    // A changed key for that address is an error that says so.
    keygen(&s.dir, "impostor");
    let impostor = std::fs::read_to_string(s.dir.join("impostor.pub")).unwrap();
    let impostor_fp = donate_proto::PublicKey::parse(&impostor)
        .unwrap()
        .fingerprint();
    let impostor_line = impostor
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    std::fs::write(&known, format!("{addr} {impostor_line}\n")).unwrap();
    status(&["--trust-on-first-use"])
        .fails_with(&format!(
            "presented key {}, expected {impostor_fp}",
            s.node_fp
        ))
        .fails_with(path(&known))
        .code(11);
    // HOME is the fallback when XDG_CONFIG_HOME is unset.
    let home = temp_dir();
    let mut args = vec![
        "status",
        "--addr",
        addr.as_str(),
        "--key",
        s.client_key.as_str(),
    ];
    args.push("--trust-on-first-use");
    let mut command = Command::new(BIN);
    let out = command
        .args(&args)
        .env_remove("XDG_CONFIG_HOME")
        .env("HOME", &home)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(home.join(".config/donate/known_nodes").exists());
    s.node.stop();
}

#[test]
fn batch_sampling_flags_need_donors_that_offer_sampling() {
    let node = Node::start(&["--mode", "local_lm"]);
    let dir = temp_dir();
    let input = dir.join("jobs.jsonl");
    std::fs::write(&input, r#"{"job_id":"a","prompt":"hi"}"#).unwrap();
    let base = ["batch", "--node", &node.addr, "--input", path(&input)];
    let line: Value = serde_json::from_str(donate(&base).ok().trim_end()).unwrap();
    assert_eq!(line["type"], "prompt_result", "{line}");
    // The stub does not sample: its donor is refused before any job is sent.
    let run = donate(&[&base[..], &["--seed", "7", "--max-attempts", "0"]].concat());
    assert!(!run.status.success(), "{}", run.stdout);
    assert!(
        run.stderr
            .contains("the node does not offer the sampling extension"),
        "{}",
        run.stderr
    );
    node.stop();
}

#[test]
fn batch_refuses_infer_jobs_without_a_model_before_sending() {
    let node = Node::start(&["--stats"]);
    let dir = temp_dir();
    let input = dir.join("jobs.jsonl");
    std::fs::write(&input, r#"{"job_id":"a","input_ids":[1],"max_tokens":2}"#).unwrap();
    donate(&["batch", "--node", &node.addr, "--input", path(&input)]).fails_with(
        "job \"a\" is an infer job: infer jobs run on a pushed model, give it with --model",
    );
    let stats = donate(&["status", "--addr", &node.addr, "--json"]).json();
    assert_eq!(
        stats["stats"]["connections_accepted"], 1,
        "nothing was sent"
    );
    node.stop();
}

#[test]
fn batch_takes_timeout_and_node_key_as_the_other_client_commands_do() {
    let s = secure_node();
    let addr = s.node.addr.clone();
    let model = model_dir(8);
    let input = s.dir.join("jobs.jsonl");
    std::fs::write(&input, r#"{"job_id":"a","input_ids":[4,5],"max_tokens":2}"#).unwrap();
    // No known_nodes: the pinned key is all the trust there is.
    let config = temp_dir();
    let env = [("XDG_CONFIG_HOME", config.as_path())];
    let batch = |node_key: &str| {
        let args = [
            "batch",
            "--node",
            &addr,
            "--key",
            &s.client_key,
            "--node-key",
            node_key,
            "--timeout",
            "5",
            "--max-attempts",
            "0",
            "--model",
            path(&model),
            "--input",
            path(&input),
        ];
        donate_env(&args, &env)
    };
    let run = batch(&s.node_fp);
    let line: Value = serde_json::from_str(run.ok().trim_end()).unwrap();
    assert_eq!(line["output_ids"], json!([4, 5, 1, 2]), "{line}");
    // Another key pinned: the donor is not used.
    let other = keygen(&s.dir, "other");
    let run = batch(&other);
    assert!(!run.status.success(), "{}", run.stdout);
    assert!(
        run.stderr.contains(&format!("expected {other}")),
        "{}",
        run.stderr
    );
    s.node.stop();
}

#[test]
fn a_stalled_handshake_and_a_tampered_record_have_their_own_exit_statuses() {
    let s = secure_node();
    let client = [
        "--key",
        s.client_key.as_str(),
        "--node-key",
        s.node_fp.as_str(),
    ];
    // A node that says a secure hello, then nothing.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    let holder = thread::spawn(move || {
        let (mut conn, _) = silent.accept().unwrap();
        let hello = br#"{"v":1,"type":"hello","mode":"model_push","role":"server","capabilities":["secure"]}"#;
        std::io::Write::write_all(&mut conn, &(hello.len() as u32).to_le_bytes()).unwrap();
        std::io::Write::write_all(&mut conn, hello).unwrap();
        thread::sleep(Duration::from_secs(3));
    });
    let mut args = vec!["status", "--addr", silent_addr.as_str(), "--timeout", "0.5"];
    args.extend(client);
    donate(&args).fails_with("handshake").code(13);
    holder.join().unwrap();
    // A proxy that flips one bit in the node's first record after the handshake.
    let proxy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_addr = proxy.local_addr().unwrap().to_string();
    let node_addr = s.node.addr.clone();
    thread::spawn(move || {
        use std::io::{Read as _, Write as _};
        let (mut client, _) = proxy.accept().unwrap();
        let mut node = std::net::TcpStream::connect(node_addr).unwrap();
        let (mut c2, mut n2) = (client.try_clone().unwrap(), node.try_clone().unwrap());
        thread::spawn(move || std::io::copy(&mut c2, &mut n2));
        // hello frame, message 2, then records: alter the third unit.
        for unit in 0.. {
            let mut header = [0u8; 4];
            if node.read_exact(&mut header).is_err() {
                return;
            }
            let mut body = vec![0; u32::from_le_bytes(header) as usize];
            node.read_exact(&mut body).unwrap();
            if unit == 2 {
                body[0] ^= 1;
            }
            let _ = client.write_all(&header);
            let _ = client.write_all(&body);
        }
    });
    let mut args = vec!["status", "--addr", proxy_addr.as_str()];
    args.extend(client);
    donate(&args)
        .fails_with("decryption failed: the connection was altered in transit")
        .code(14);
    s.node.stop();
}

#[test]
fn help_lists_the_exit_statuses() {
    let out = donate(&["--help"]);
    let help = out.ok();
    for line in [
        "Exit status:",
        "10  the node does not know your key",
        "14  a record",
    ] {
        assert!(help.contains(line), "{help}");
    }
}
