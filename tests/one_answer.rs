//! "One answer per request" (docs/PROTOCOL.md): a raw client that behaves like the Go
//! client (writes `model_begin`, every chunk and `model_commit`, and only then
//! reads one frame) stays in step after every kind of failed upload: it reads
//! exactly one error frame, and its next requests get their own answers.

mod common;

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use donate_proto::{Mode, ServerConfig};
use quickcheck::{Arbitrary, Gen, QuickCheck};
use serde_json::json;

use common::*;

const CONFIG: &str = r#"{"ok":true}"#;
const MIB: usize = 1024 * 1024;

const ALL_SERVERS: [ServerKind; 4] = [
    ServerKind::Std,
    ServerKind::Smol,
    ServerKind::SmolOnTokio,
    ServerKind::Tokio,
];

/// What the Go client does after its upload's one answer: a request of its own
/// (answered by exactly its answer), then a good upload and a job.
fn next_requests_in_step(raw: &mut Raw) {
    raw.send(&queue_status());
    assert_eq!(
        raw.frame(),
        json!({"v": 1, "type": "queue_status", "depth": 0, "capacity": 64, "in_progress": false})
    );
    raw.mount();
    raw.expect_infer("after");
    raw.expect_silence(Duration::from_millis(50));
}

/// An upload as the Go client writes it: `model_begin`, the chunks, `model_commit`.
fn go_upload(weights_len: i64, chunks: &[Vec<u8>]) -> Vec<u8> {
    let mut out = begin(CONFIG, weights_len, None);
    for c in chunks {
        out.extend_from_slice(c);
    }
    out.extend(commit());
    out
}

fn each_server(mode: Mode, check: fn(SocketAddr)) {
    for kind in ALL_SERVERS {
        bounded(
            &format!("{kind:?} server"),
            Duration::from_secs(30),
            move || {
                let config = ServerConfig::default().mode(mode);
                let node = start(kind, config, TestExec::default());
                check(node.addr());
                node.shutdown();
            },
        );
    }
}

#[test]
fn bad_base64_in_the_middle_of_an_upload() {
    each_server(Mode::ModelPush, |addr| {
        let mut raw = Raw::session(addr);
        let upload = go_upload(
            12,
            &[
                chunk(0, false, &[1, 2, 3, 4]),
                chunk_b64(1, false, "!!!!!!!!"),
                chunk(2, true, &[9, 10, 11, 12]),
            ],
        );
        raw.send(&upload);
        raw.expect_error("weights b64 decode");
        next_requests_in_step(&mut raw);
    });
}

#[test]
fn chunks_out_of_order() {
    each_server(Mode::ModelPush, |addr| {
        let mut raw = Raw::session(addr);
        let upload = go_upload(
            12,
            &[
                chunk(0, false, &[1, 2, 3, 4]),
                chunk(2, false, &[9, 10, 11, 12]),
                chunk(1, true, &[5, 6, 7, 8]),
            ],
        );
        raw.send(&upload);
        raw.expect_error("weights chunk out of order: got index 2, expected 1");
        next_requests_in_step(&mut raw);
    });
}

#[test]
fn overflow() {
    each_server(Mode::ModelPush, |addr| {
        let mut raw = Raw::session(addr);
        let upload = go_upload(
            8,
            &[
                chunk(0, false, &[1, 2, 3, 4]),
                chunk(1, false, &[5, 6, 7, 8, 9]),
                chunk(2, true, &[9]),
            ],
        );
        raw.send(&upload);
        raw.expect_error("weights overflow");
        next_requests_in_step(&mut raw);
    });
}

#[test]
fn refused_model_begin() {
    each_server(Mode::ModelPush, |addr| {
        let mut raw = Raw::session(addr);
        raw.send(&go_upload(-4, &[chunk(0, true, &[1, 2, 3, 4])]));
        raw.expect_error("bad weights_len");
        next_requests_in_step(&mut raw);

        let mut upload = begin(CONFIG, 4, Some("not-a-hash"));
        upload.extend(chunk(0, true, &[1, 2, 3, 4]));
        upload.extend(commit());
        raw.send(&upload);
        raw.expect_error("bad weights_sha256: want 64 hex digits");
        next_requests_in_step(&mut raw);
    });
}

/// Go's own 1 MiB chunks, with the third of five broken: still one answer.
#[test]
fn a_large_upload_failing_midway() {
    each_server(Mode::ModelPush, |addr| {
        let mut raw = Raw::session(addr);
        let piece = vec![0xa5; MIB];
        let chunks: Vec<Vec<u8>> = (0..5)
            .map(|i| {
                if i == 2 {
                    chunk_b64(i, false, &"*".repeat(4 * MIB / 3 + 4))
                } else {
                    chunk(i, i == 4, &piece)
                }
            })
            .collect();
        raw.send(&go_upload(5 * MIB as i64, &chunks));
        raw.expect_error("weights b64 decode");
        next_requests_in_step(&mut raw);
    });
}

/// On a local_lm node, `model_begin` is refused once; its chunks and commit get nothing.
#[test]
fn upload_to_a_local_lm_node() {
    each_server(Mode::LocalLm, |addr| {
        let mut raw = Raw::session(addr);
        raw.send(&go_upload(4, &[chunk(0, true, &[1, 2, 3, 4])]));
        raw.expect_error("model_push not enabled on this node");
        raw.send(&prompt("p1", "hello"));
        assert_eq!(raw.frame()["text"], "[prompt stub] stub says: hello");
        raw.expect_silence(Duration::from_millis(50));
    });
}

/// Failed uploads back to back in one write: exactly one answer each, in order;
/// then a good one gets its `model_status`. (A good upload's `model_status`
/// comes when the mount is done, so a Go client reads it before writing more.)
#[test]
fn failed_uploads_in_one_write() {
    each_server(Mode::ModelPush, |addr| {
        let mut raw = Raw::session(addr);
        let out_of_order = go_upload(4, &[chunk(1, true, &[1, 2, 3, 4])]);
        let missing = go_upload(4, &[chunk(0, false, &[1, 2])]);
        let no_config = [begin("", 1, None), chunk(0, true, &[1]), commit()].concat();
        let overflow = go_upload(1, &[chunk(0, true, &[1, 2])]);
        raw.send(&[out_of_order, missing, no_config, overflow].concat());
        raw.expect_error("weights chunk out of order: got index 1, expected 0");
        assert_eq!(
            raw.expect_status(),
            (false, "weights size mismatch: got 2 expect 4".to_owned())
        );
        assert_eq!(raw.expect_status(), (false, "no config".to_owned()));
        raw.expect_error("weights overflow");
        next_requests_in_step(&mut raw);
    });
}

// ---------------------------------------------------------------------------
// The same, for any upload and any failure.

/// An upload of `chunks` 3-byte chunks whose chunk `at` fails as `how`.
#[derive(Debug, Clone)]
struct Failing {
    chunks: usize,
    at: usize,
    how: u8,
}

impl Arbitrary for Failing {
    fn arbitrary(g: &mut Gen) -> Failing {
        let chunks = 1 + usize::arbitrary(g) % 8;
        Failing {
            chunks,
            at: usize::arbitrary(g) % chunks,
            how: u8::arbitrary(g) % 3,
        }
    }
}

static NODE: Mutex<Option<SocketAddr>> = Mutex::new(None);

fn any_failed_upload_gets_one_answer(f: Failing) -> bool {
    let addr = NODE.lock().unwrap().expect("node");
    let mut raw = Raw::session(addr);
    let weights_len = 3 * f.chunks as i64;
    let chunks: Vec<Vec<u8>> = (0..f.chunks)
        .map(|i| {
            let last = i + 1 == f.chunks;
            if i != f.at {
                return chunk(i as i64, last, &[i as u8; 3]);
            }
            match f.how {
                0 => chunk_b64(i as i64, last, "A*=="),
                1 => chunk(i as i64 + 1, last, &[0; 3]),
                _ => chunk(i as i64, last, &[0; 4]),
            }
        })
        .collect();
    raw.send(&go_upload(weights_len, &chunks));
    let want = match f.how {
        0 => "weights b64 decode".to_owned(),
        1 => format!(
            "weights chunk out of order: got index {}, expected {}",
            f.at + 1,
            f.at
        ),
        _ => "weights overflow".to_owned(),
    };
    raw.expect_error(&want);
    next_requests_in_step(&mut raw);
    true
}

#[test]
fn property_any_failed_upload_gets_one_answer() {
    for kind in ALL_SERVERS {
        let node = start(kind, ServerConfig::default(), TestExec::default());
        *NODE.lock().unwrap() = Some(node.addr());
        bounded(&format!("{kind:?}"), Duration::from_secs(60), || {
            QuickCheck::new()
                .tests(30)
                .quickcheck(any_failed_upload_gets_one_answer as fn(Failing) -> bool)
        });
        node.shutdown();
    }
}
