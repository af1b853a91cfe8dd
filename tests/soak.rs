//! Soak: rounds of hostile and normal connections against one `donate serve`
//! process per runtime. After a warm-up, the node's memory must stop
//! climbing, and its threads and file descriptors must come back to where
//! they were once every round's connections are gone.
//!
//! `DONATE_SOAK_ROUNDS=500 cargo test --release --test soak -- --nocapture`
//! runs it for longer (default 6 rounds, about 10 s per runtime).
#![cfg(target_os = "linux")]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_donate");
const MIB: u32 = 1024 * 1024;
/// Connections of each case per round, all at once.
const PER_CASE: usize = 2;
/// Rounds before the baseline is taken: allocator pools and thread caches fill.
const WARM_UP: usize = 2;
/// Growth allowed from the warmed-up baseline to any later round. Today's
/// node stays within ~1 MiB; glibc's defaults made it climb by 20+ MiB a round.
const ALLOWED_GROWTH_KIB: u64 = 8 * 1024;

/// A `donate serve` process on a loopback port, with a model store.
struct Serve {
    child: Child,
    addr: SocketAddr,
    _store: tempfile::TempDir,
}

impl Serve {
    fn start(runtime: &str) -> Serve {
        let store = tempfile::tempdir().expect("a store directory");
        let mut child = Command::new(BIN)
            .args(["serve", "--addr", "127.0.0.1:0", "--runtime", runtime])
            .arg("--store")
            .arg(store.path())
            .args(["--store-max", "64MiB"])
            // Short timers so that stalled peers are closed within a round.
            .args(["--stall-timeout", "1", "--handshake-timeout", "5"])
            .args(["--max-outbound", "1048576", "--backpressure-timeout", "1"])
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn donate serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("listening line");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        Serve {
            child,
            addr,
            _store: store,
        }
    }

    fn proc_path(&self, what: &str) -> String {
        format!("/proc/{}/{what}", self.child.id())
    }

    fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(self.proc_path("status"))
            .expect("status")
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// The lowest RSS seen within `wait`, returning early once it is at most
    /// `limit`: memory still held by a connection that just closed (its task
    /// ends a moment after its socket) must not read as growth, while memory
    /// that stays is still seen.
    fn rss_settled_kib(&self, limit: u64, wait: Duration) -> u64 {
        let deadline = Instant::now() + wait;
        let mut lowest = self.rss_kib();
        while lowest > limit && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
            lowest = lowest.min(self.rss_kib());
        }
        lowest
    }

    fn count(&self, dir: &str) -> usize {
        std::fs::read_dir(self.proc_path(dir)).expect(dir).count()
    }

    /// Threads and open files now.
    fn counts(&self) -> (usize, usize) {
        (self.count("task"), self.count("fd"))
    }

    /// Threads and open files, once they settle back to `expected` (within 5 s).
    fn settled(&self, expected: (usize, usize)) -> (usize, usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let now = self.counts();
            if now == expected || Instant::now() > deadline {
                return now;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One hostile or normal peer. Each returns once its connection is closed.
type Case = fn(SocketAddr);

/// Which of four store models a store peer pushes: consecutive peers differ,
/// and every model comes back in later rounds (mounted from the store then).
static STORE_MODEL: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn store_model() -> Vec<u8> {
    let seed = STORE_MODEL.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 4;
    (0..MIB).map(|i| (i as usize * 7 + seed) as u8).collect()
}

const CASES: [(&str, Case); 11] = [
    (
        "store: a model pushed through the store, then 10 jobs",
        |addr| {
            let model = store_model();
            let hash: [u8; 32] = sha2::Digest::finalize(sha2::Digest::chain_update(
                <sha2::Sha256 as sha2::Digest>::new(),
                &model,
            ))
            .into();
            let mut client = donate_std::Client::connect(addr).unwrap();
            client
                .push_stored(
                    "{}",
                    std::io::Cursor::new(&model),
                    model.len() as u64,
                    hash,
                    |_| {},
                )
                .unwrap();
            for _ in 0..10 {
                assert_eq!(
                    client.infer(&[9, 9], 3).unwrap().output_ids,
                    [9, 9, 1, 2, 3]
                );
            }
        },
    ),
    (
        "store: an upload broken at 2 MiB of 4, then close",
        |addr| {
            let mut raw = Raw::connect(addr);
            raw.frame();
            raw.send(&fj(
                r#"{"v":1,"type":"hello","role":"client","capabilities":["store"]}"#,
            ));
            let hash = "5".repeat(64);
            raw.send(&fj(&format!(
            r#"{{"v":1,"type":"model_begin","config_json":"{{}}","weights_len":{},"weights_sha256":"{hash}"}}"#,
            4 * MIB
        )));
            let piece = vec![5u8; MIB as usize];
            for index in 0..2 {
                let _ = raw.try_send(&chunk(index, false, &piece));
            }
        },
    ),
    ("store: bad queries and an unknown model", |addr| {
        let mut raw = Raw::connect(addr);
        raw.frame();
        raw.send(&fj(
            r#"{"v":1,"type":"hello","role":"client","capabilities":["store"]}"#,
        ));
        let many = vec![format!("\"{}\"", "a".repeat(64)); 1025].join(",");
        raw.send(&fj(&format!(
            r#"{{"v":1,"type":"model_query","hashes":[{many}]}}"#
        )));
        raw.expect_error_code("query_too_large", "model_query");
        raw.send(&fj(
            r#"{"v":1,"type":"model_query","hashes":["../../etc/passwd"]}"#,
        ));
        raw.expect_error_code("bad_weights_sha256", "bad weights_sha256");
        raw.send(&fj(&format!(
            r#"{{"v":1,"type":"model_use","config_json":"{{}}","weights_sha256":"{}"}}"#,
            "0".repeat(64)
        )));
        let (ok, message) = raw.expect_status();
        assert!(!ok && message.contains("upload it"), "{message}");
    }),
    ("64 MiB header, then close", |addr| {
        let mut raw = Raw::connect(addr);
        raw.send(&header(64 * MIB));
    }),
    ("64 MiB header and 256 KiB of body, then close", |addr| {
        let mut raw = Raw::connect(addr);
        raw.send(&header(64 * MIB));
        let _ = raw.try_send(&vec![b'{'; 256 * 1024]);
    }),
    ("weights_len 0 upload", |addr| {
        let mut raw = Raw::session(addr);
        raw.send(&[begin("{}", 0, None), commit()].concat());
        raw.expect_status();
        raw.expect_in_step();
    }),
    ("bad json, then a session", |addr| {
        let mut raw = Raw::session(addr);
        raw.send(&frame(b"nope!"));
        raw.expect_error_code("bad_json", "bad json");
        raw.expect_in_step();
    }),
    ("6 GB model claim, 4 MiB sent, then close", |addr| {
        let mut raw = Raw::session(addr);
        raw.send(&begin("{}", 6_000_000_000, None));
        let chunk_bytes = vec![7u8; MIB as usize];
        for index in 0..4 {
            let _ = raw.try_send(&chunk(index, false, &chunk_bytes));
        }
    }),
    (
        "slowloris: half a frame, then silence until closed",
        |addr| {
            let mut raw = Raw::session(addr);
            raw.send(&header(1000));
            raw.send(br#"{"v":1"#);
            raw.expect_error_code("stalled", "stalled");
            raw.expect_closed();
        },
    ),
    ("a reader that never reads", |addr| {
        let mut raw = Raw::connect(addr);
        let requests = queue_status().repeat(1024);
        for _ in 0..128 {
            if raw.try_send(&requests).is_err() {
                break; // closed for backpressure
            }
        }
    }),
    ("a normal session: 1 MiB model, 20 jobs", |addr| {
        let mut raw = Raw::session(addr);
        let weights: Vec<u8> = (0..MIB).map(|i| i as u8).collect();
        let mut upload = begin(r#"{"ok":true}"#, weights.len() as i64, None);
        for (index, piece) in weights.chunks(256 * 1024).enumerate() {
            upload.extend(chunk(index as i64, index == 3, piece));
        }
        upload.extend(commit());
        raw.send(&upload);
        assert_eq!(raw.expect_status(), (true, "mounted".to_owned()));
        for job in 0..20 {
            let job_id = format!("j{job}");
            raw.send(&infer(&job_id, &[9, 9], 3));
            let answer = raw.frame();
            // queue_depth depends on the other peers: not compared.
            assert_eq!(
                (&answer["job_id"], &answer["ok"], &answer["output_ids"]),
                (
                    &job_id.into(),
                    &true.into(),
                    &serde_json::json!([9, 9, 1, 2, 3])
                ),
                "{answer}"
            );
        }
    }),
];

/// Every case `PER_CASE` times at once; panics if a normal peer was not served.
fn round(addr: SocketAddr) {
    let peers: Vec<_> = CASES
        .iter()
        .flat_map(|&(name, case)| (0..PER_CASE).map(move |_| (name, case)))
        .map(|(name, case)| (name, thread::spawn(move || case(addr))))
        .collect();
    for (name, peer) in peers {
        if peer.join().is_err() {
            panic!("case {name:?} failed");
        }
    }
}

/// One node at a time: the rounds are heavy enough for a small machine.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn soak(runtime: &str) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let rounds: usize = std::env::var("DONATE_SOAK_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(6)
        .max(WARM_UP + 2);
    let node = Serve::start(runtime);
    thread::sleep(Duration::from_millis(100));
    let idle = node.counts();
    let mut baseline = None;
    let mut trace = Vec::new();
    for i in 0..rounds {
        round(node.addr);
        let after = node.settled(idle);
        assert_eq!(
            after, idle,
            "{runtime}: threads and fds after round {i}, against idle"
        );
        let rss = match baseline {
            Some(base) => node.rss_settled_kib(base + ALLOWED_GROWTH_KIB, Duration::from_secs(3)),
            None => node.rss_settled_kib(0, Duration::from_millis(500)),
        };
        trace.push(rss / 1024);
        match baseline {
            None if i + 1 == WARM_UP => baseline = Some(rss),
            Some(base) => assert!(
                rss <= base + ALLOWED_GROWTH_KIB,
                "{runtime}: RSS grew from {base} KiB to {rss} KiB by round {i} (MiB per round: {trace:?})"
            ),
            None => {}
        }
    }
    eprintln!("{runtime}: RSS MiB per round {trace:?}; threads, fds {idle:?}");
}

#[test]
fn std_node_stays_flat() {
    soak("std");
}

#[test]
fn smol_node_stays_flat() {
    soak("smol");
}

#[test]
fn tokio_node_stays_flat() {
    soak("tokio");
}
