//! Helpers shared by the executor tests: worker argvs, bigram tables and the
//! rule the example workers follow.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("executors/ has a parent")
        .to_owned()
}

/// `python3 examples/worker.py`.
pub fn python_worker() -> Vec<String> {
    vec![
        "python3".into(),
        repo().join("examples/worker.py").display().to_string(),
    ]
}

/// `python3 executors/tests/workers/NAME`.
pub fn test_worker(name: &str) -> Vec<String> {
    vec![
        "python3".into(),
        repo()
            .join("executors/tests/workers")
            .join(name)
            .display()
            .to_string(),
    ]
}

/// The `ngram_worker` example, built by `cargo test` beside this test binary.
pub fn rust_worker() -> Vec<String> {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps/<test>");
    let worker = profile_dir
        .join("examples")
        .join(format!("ngram_worker{}", std::env::consts::EXE_SUFFIX));
    assert!(
        worker.exists(),
        "{} is missing: run `cargo build --examples -p donate-exec` (plain `cargo test` builds it)",
        worker.display()
    );
    vec![worker.display().to_string()]
}

/// A 256×256 bigram table of pseudo-random scores from `seed`.
pub fn table(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..65536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 56) as u8
        })
        .collect()
}

/// What the example workers answer: the input, then `n` greedy bigram steps
/// (n = 16 when `max_tokens` <= 0, at most 4096), lowest byte on a tie.
pub fn bigram(table: &[u8], input: &[i32], max_tokens: i64) -> Vec<i32> {
    let n = if max_tokens <= 0 {
        16
    } else {
        max_tokens.min(4096)
    };
    let mut out = input.to_vec();
    let mut last = input.last().copied().unwrap_or(0) as usize;
    for _ in 0..n {
        let row = &table[last * 256..last * 256 + 256];
        let best = row.iter().max().expect("256 scores");
        last = row
            .iter()
            .position(|s| s == best)
            .expect("max is in the row");
        out.push(last as i32);
    }
    out
}

/// Polls `done` until it holds or `limit` passes.
pub fn eventually(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    done()
}

/// Entries of a directory.
pub fn entries(dir: &std::path::Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("dir entry").path())
        .collect()
}
