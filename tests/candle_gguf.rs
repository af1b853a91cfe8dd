//! End to end with the real SmolLM2-135M-Instruct GGUF: `donate serve --mode
//! local_lm --executor candle --model FILE.gguf`, then `donate prompt`, gives
//! llama.cpp's greedy answer (executors/candle/tests/smollm2.rs has the ids
//! and docs/CANDLE.md how they were recorded). `DONATE_TEST_GGUF` names the
//! file; without it the test fails under CI (`CI` set) and is skipped with a
//! note otherwise.
#![cfg(feature = "candle")]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_donate");

/// llama.cpp's 48 greedy tokens for the chat prompt, as text.
const FRANCE: &str = "L'\u{c9}toile, la Marseillaise, la femme, la femme au martyre, la femme au martyre, la femme au martyre, la femme au martyre, la femme au";

#[test]
fn serve_model_gguf_answers_donate_prompt_as_llama_cpp_does() {
    let path = match std::env::var("DONATE_TEST_GGUF") {
        Ok(path) => path,
        Err(_) if std::env::var_os("CI").is_some() => {
            panic!("CI is set but DONATE_TEST_GGUF is not: .ci/run fetches the SmolLM2 GGUF")
        }
        Err(_) => {
            eprintln!("note: skipped, DONATE_TEST_GGUF is unset (docs/CANDLE.md)");
            return;
        }
    };
    let mut child = Command::new(BIN)
        .args(["serve", "--addr", "127.0.0.1:0", "--mode", "local_lm"])
        .args([
            "--executor",
            "candle",
            "--model",
            &path,
            "--job-timeout",
            "600",
        ])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn donate serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim_end()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    let out = Command::new(BIN)
        .args(["prompt", "--addr", &addr, "--max-out", "48"])
        .arg("What is the capital of France?")
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end(), FRANCE);
}
