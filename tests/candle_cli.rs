//! `donate serve --executor candle` driven as a process. With the `candle`
//! feature: a tiny random llama written here (safetensors by hand) is pushed
//! with `donate infer --model DIR` and `donate push --model DIR`, and the ids
//! equal what donate-candle computes in process (itself checked against candle
//! run directly in executors/candle/tests). Without it: a clear error.
#![cfg(unix)]

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_donate");
/// Longest a node may take to start.
const LIMIT: Duration = Duration::from_secs(30);

/// Runs `donate ARGS` to the end, killing it (and failing) past `LIMIT`.
fn donate(args: &[&str]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn donate");
    let read = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = read(Box::new(child.stdout.take().unwrap()));
    let stderr = read(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("donate {args:?} did not finish in time");
        }
        thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

#[cfg(not(feature = "candle"))]
#[test]
fn candle_executor_needs_the_feature() {
    let out = donate(&["serve", "--addr", "127.0.0.1:0", "--executor", "candle"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("built without the candle feature: cargo build --features candle"),
        "{stderr}"
    );
}

#[cfg(feature = "candle")]
mod with_candle {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::path::{Path, PathBuf};
    use std::process::Child;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    /// A `donate serve` process and the address it printed; killed when dropped.
    struct Node {
        child: Child,
        addr: String,
    }

    impl Node {
        /// Starts `donate serve --addr 127.0.0.1:0 ARGS` and reads `listening on <addr>`.
        fn start(args: &[&str]) -> Node {
            let mut child = Command::new(BIN)
                .args(["serve", "--addr", "127.0.0.1:0"])
                .args(args)
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn donate serve");
            let stdout = child.stdout.take().expect("piped stdout");
            let (tx, rx) = mpsc::channel();
            thread::spawn(move || {
                let mut line = String::new();
                let _ = BufReader::new(stdout).read_line(&mut line);
                let _ = tx.send(line);
            });
            let line = rx
                .recv_timeout(LIMIT)
                .expect("serve printed no address in time");
            let addr = line
                .trim_end()
                .strip_prefix("listening on ")
                .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
                .to_owned();
            Node { child, addr }
        }
    }

    impl Drop for Node {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

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

    /// A fresh directory holding config.json and model.safetensors.
    fn model_dir() -> PathBuf {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "candle-cli-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), config_json()).unwrap();
        std::fs::write(dir.join("model.safetensors"), safetensors()).unwrap();
        dir
    }

    fn path(p: &Path) -> &str {
        p.to_str().expect("UTF-8 temp path")
    }

    /// What the executor computes in process for `ids`.
    fn expected(ids: &[i32], max_tokens: i64) -> String {
        let executor = CandleExecutor::new(CandleConfig::default()).unwrap();
        let model = executor.load(&config_json(), safetensors()).unwrap();
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
        let dir = model_dir();
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
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            expected(&[3, 1, 4, 1, 5], 6)
        );
        // The default is 8 tokens.
        let out = infer(&["--ids", "9"]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            expected(&[9], 0)
        );
        // An id outside the vocabulary is a job error, reported as such.
        let out = infer(&["--ids", "1,999", "--json"]);
        assert!(!out.status.success());
        let frame: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
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
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["message"], "mounted");
        let broken = dir.join("broken");
        std::fs::create_dir_all(&broken).unwrap();
        std::fs::write(broken.join("config.json"), config_json()).unwrap();
        std::fs::write(broken.join("model.safetensors"), &safetensors()[..1000]).unwrap();
        let out = donate(&["push", "--addr", &node.addr, "--model", path(&broken)]);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("not a valid safetensors file"), "{stderr}");
        drop(node);
    }

    #[test]
    fn local_lm_candle_needs_a_complete_directory() {
        let out = donate(&[
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--mode",
            "local_lm",
            "--executor",
            "candle",
        ]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("needs --local-lm-path DIR"));
        // model_dir has no tokenizer.json.
        let dir = model_dir();
        let out = donate(&[
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--mode",
            "local_lm",
            "--executor",
            "candle",
            "--local-lm-path",
            path(&dir),
        ]);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("tokenizer.json is missing"), "{stderr}");
        let out = donate(&[
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--executor",
            "candle",
            "--candle-device",
            "tpu",
        ]);
        assert!(String::from_utf8_lossy(&out.stderr).contains("unknown device"));
    }
}
