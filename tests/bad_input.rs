//! The bad-input battery over a raw TCP stream, against a node of every adapter.
//!
//! Each case gets the answer docs/PROTOCOL.md documents: a framing error (bad length)
//! gets an error frame and a close; a well-framed body that is not a valid
//! message gets an error frame and the connection keeps serving. After every
//! case a fresh client runs a whole session (hello, push, infer) on the same
//! node, and the node's memory (this process's RSS: the servers run in-process)
//! stays bounded when a peer announces 64 MiB frames or 6.4 GB models.
//!
//! The tests of this file run one at a time, so RSS readings see only their own case.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use donate_proto::{
    Capabilities, Capability, Executor, JobContext, JobError, Mode, NoSpool, Partial, ServerConfig,
    Stub, Weights,
};
use quickcheck::{Arbitrary, Gen, QuickCheck};
use serde_json::json;

use common::*;

const MIB: u32 = 1024 * 1024;
const MAX_FRAME: u32 = 64 * MIB;
const CONFIG: &str = r#"{"ok":true}"#;
const STALL: Duration = Duration::from_millis(300);

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn config() -> ServerConfig {
    ServerConfig::default().stall_timeout(STALL)
}

/// Runs `case` against a fresh node of every adapter, then checks the node
/// still serves a fresh client and shuts down cleanly.
fn each_adapter(case: fn(SocketAddr)) {
    each_adapter_with(config(), case)
}

fn each_adapter_with(config: ServerConfig, case: fn(SocketAddr)) {
    let _serial = serial();
    for kind in ADAPTERS {
        let config = config.clone();
        bounded(
            &format!("{kind:?} server"),
            Duration::from_secs(30),
            move || {
                let node = start(kind, config, TestExec::default());
                case(node.addr());
                assert_serves(node.addr());
                node.shutdown();
            },
        );
    }
}

/// A connection that is still open and answering.
fn still_open(raw: &mut Raw) {
    raw.expect_in_step();
}

#[test]
fn length_zero_is_a_framing_error() {
    each_adapter(|addr| {
        let mut raw = Raw::session(addr);
        raw.send(&header(0));
        raw.expect_error("bad frame length 0 (must be 1..=67108864)");
        raw.expect_closed();
    });
}

#[test]
fn length_over_the_limit_is_a_framing_error() {
    each_adapter(|addr| {
        for len in [MAX_FRAME + 1, u32::MAX] {
            let mut raw = Raw::session(addr);
            raw.send(&header(len));
            let e = raw.expect_error(&format!("bad frame length {len} (must be 1..=67108864)"));
            assert_eq!(e["code"], "bad_frame");
            raw.expect_closed();
        }
        // Frames before the bad header in the same write are still answered.
        let mut raw = Raw::session(addr);
        raw.send(
            &[
                queue_status(),
                header(MAX_FRAME + 1).to_vec(),
                queue_status(),
            ]
            .concat(),
        );
        assert_eq!(raw.frame()["type"], "queue_status");
        raw.expect_error_code("bad_frame", "bad frame length");
        raw.expect_closed();
    });
}

/// A smaller configured limit is enforced the same way.
#[test]
fn configured_frame_limit_is_enforced() {
    let config = config().max_frame_len(1024);
    each_adapter_with(config, |addr| {
        let mut raw = Raw::session(addr);
        raw.send(&fj(&format!(
            r#"{{"v":1,"type":"hello","pad":"{}"}}"#,
            "x".repeat(900)
        )));
        still_open(&mut raw);
        raw.send(&header(1025));
        raw.expect_error("bad frame length 1025 (must be 1..=1024)");
        raw.expect_closed();
    });
}

/// Sixteen peers each announce a 64 MiB frame, send 1 KiB of it and go silent:
/// no memory is set aside for what has not arrived, and each is closed by the
/// stall timeout with an error frame.
#[test]
fn huge_header_then_silence_costs_nothing_and_is_closed_by_the_stall_timeout() {
    each_adapter(|addr| {
        // Warm up the same path (threads, buffers) so the baseline includes them.
        let mut warm: Vec<Raw> = (0..16).map(|_| Raw::session(addr)).collect();
        for raw in &mut warm {
            raw.send(&header(100));
            raw.send(&[b'{'; 50]);
        }
        for raw in &mut warm {
            raw.expect_error("stalled in the middle of a frame");
        }
        drop(warm);
        thread::sleep(Duration::from_millis(50));

        let before = rss_kib();
        let started = Instant::now();
        let mut peers: Vec<Raw> = (0..16).map(|_| Raw::session(addr)).collect();
        for raw in &mut peers {
            raw.send(&header(MAX_FRAME));
            raw.send(&[b' '; 1024]);
        }
        thread::sleep(STALL / 2);
        let during = rss_kib();
        for raw in &mut peers {
            let e = raw.expect_error("stalled in the middle of a frame");
            assert_eq!(e["code"], "stalled");
            raw.expect_closed();
        }
        let elapsed = started.elapsed();
        assert!(
            elapsed >= STALL,
            "closed after {elapsed:?}, before the stall timeout"
        );
        assert!(
            elapsed < STALL + Duration::from_secs(3),
            "closed only after {elapsed:?}"
        );
        let grew = during.saturating_sub(before);
        assert!(
            grew < 8 * 1024,
            "RSS grew by {grew} KiB with 16 peers announcing 64 MiB frames"
        );
    });
}

/// A frame cut short by the peer closing its side: no answer, the node closes too.
#[test]
fn truncated_frame_then_close() {
    each_adapter(|addr| {
        let mut raw = Raw::session(addr);
        raw.send(&header(100));
        raw.send(br#"{"v":1,"type":"#);
        raw.close_write();
        let started = Instant::now();
        raw.expect_closed();
        assert!(
            started.elapsed() < STALL,
            "the close must not wait for the stall timeout"
        );

        // Answers already queued when the peer closes are still delivered.
        let mut raw = Raw::session(addr);
        raw.send(&[queue_status(), header(10).to_vec()].concat());
        raw.close_write();
        assert_eq!(raw.frame()["type"], "queue_status");
        raw.expect_closed();
    });
}

/// Bodies that are not a JSON object: an error frame, and the stream stays in step.
#[test]
fn bodies_that_are_not_json_objects() {
    each_adapter(|addr| {
        let mut raw = Raw::session(addr);
        let cases: [(&[u8], &str, &str); 10] = [
            (b"\xff\xfe\xfd", "bad_json", "bad json: "),
            (
                b"{\"v\":1,\"type\":\"hel\xfflo\"}",
                "bad_json",
                "bad json: ",
            ),
            (b"hello", "bad_json", "bad json: "),
            (b"{", "bad_json", "bad json: "),
            (b"{\"v\":1,\"type\":\"hello\"} {}", "bad_json", "bad json: "),
            (b"[1,2]", "not_object", "bad message: not a JSON object"),
            (b"[]", "not_object", "bad message: not a JSON object"),
            (b"null", "not_object", "bad message: not a JSON object"),
            (b"42", "not_object", "bad message: not a JSON object"),
            (b"\"hello\"", "not_object", "bad message: not a JSON object"),
        ];
        for (body, code, prefix) in cases {
            raw.send(&frame(body));
            raw.expect_error_code(code, prefix);
            still_open(&mut raw);
        }
        raw.mount();
        raw.expect_infer("after-garbage");
    });
}

#[test]
fn missing_unknown_and_reversed_types() {
    each_adapter(|addr| {
        let mut raw = Raw::session(addr);
        let cases = [
            (r#"{"v":1}"#, "unknown type: "),
            (r#"{}"#, "unknown type: "),
            (r#"{"v":1,"type":""}"#, "unknown type: "),
            (r#"{"v":1,"type":null}"#, "unknown type: "),
            (r#"{"v":1,"type":"bogus"}"#, "unknown type: bogus"),
            (r#"{"v":1,"type":"HELLO"}"#, "unknown type: HELLO"),
            (
                r#"{"v":1,"type":"model_status","ok":true}"#,
                "unknown type: model_status",
            ),
            (
                r#"{"v":1,"type":"error","error":"x"}"#,
                "unknown type: error",
            ),
            (
                r#"{"v":1,"type":"prompt_result","job_id":"p"}"#,
                "unknown type: prompt_result",
            ),
        ];
        for (body, text) in cases {
            raw.send(&fj(body));
            let e = raw.expect_error(text);
            assert_eq!(e["code"], "unknown_type");
            still_open(&mut raw);
        }
        // A version we do not speak.
        raw.send(&fj(r#"{"v":2,"type":"hello"}"#));
        raw.expect_error_code("bad_version", "unsupported protocol version 2");
        // Unknown fields are ignored; `v` may be missing.
        raw.send(&fj(
            r#"{"type":"queue_status","future":{"a":[1,2]},"x":null}"#,
        ));
        assert_eq!(raw.frame()["type"], "queue_status");
    });
}

#[test]
fn wrongly_typed_fields() {
    each_adapter(|addr| {
        let mut raw = Raw::session(addr);
        raw.mount();
        let cases = [
            (
                r#"{"v":1,"type":"infer","job_id":"j7","input_ids":"nope"}"#,
                "j7",
            ),
            (
                r#"{"v":1,"type":"infer","job_id":"j8","input_ids":[1,2,4294967296]}"#,
                "j8",
            ),
            (
                r#"{"v":1,"type":"infer","job_id":"j9","input_ids":[1],"max_tokens":1.5}"#,
                "j9",
            ),
            (
                r#"{"v":1,"type":"infer","job_id":"j10","max_tokens":"3"}"#,
                "j10",
            ),
            (r#"{"v":1,"type":"prompt","job_id":"p1","prompt":7}"#, "p1"),
            (r#"{"v":1,"type":"infer","job_id":5}"#, ""),
            (r#"{"v":"1","type":"hello"}"#, ""),
            (r#"{"v":1,"type":5}"#, ""),
            (
                r#"{"v":1,"type":"model_begin","config_json":"{}","weights_len":"4"}"#,
                "",
            ),
            (
                r#"{"v":1,"type":"model_begin","config_json":{},"weights_len":4}"#,
                "",
            ),
            (
                r#"{"v":1,"type":"model_begin","config_json":"{}","weights_len":1e20}"#,
                "",
            ),
            (
                r#"{"v":1,"type":"weights_chunk","index":"0","last":true,"data_b64":""}"#,
                "",
            ),
            (
                r#"{"v":1,"type":"weights_chunk","index":0,"last":"yes","data_b64":""}"#,
                "",
            ),
            (
                r#"{"v":1,"type":"weights_chunk","index":0,"last":true,"data_b64":[1]}"#,
                "",
            ),
        ];
        for (body, job_id) in cases {
            raw.send(&fj(body));
            let e = raw.expect_error_code("bad_field", "bad field: ");
            assert_eq!(e["job_id"].as_str().unwrap_or_default(), job_id, "{body}");
            still_open(&mut raw);
        }
        // The mounted model survived all of it.
        raw.expect_infer("j11");
    });
}

#[test]
fn bad_base64_out_of_order_and_overflow() {
    each_adapter(|addr| {
        let mut raw = Raw::session(addr);
        for bad in ["@@@@", "AQI", "AQIDBA=", "AQ=DBA==", "AQID\nBA=="] {
            raw.send(&begin(CONFIG, 4, None));
            raw.send(&chunk_b64(0, true, bad));
            raw.expect_error("weights b64 decode");
            still_open(&mut raw);
        }
        for (index, expected) in [(1, 0), (-1, 0), (7, 0)] {
            raw.send(&begin(CONFIG, 8, None));
            raw.send(&chunk(index, false, &[1, 2, 3, 4]));
            let e = raw.expect_error(&format!(
                "weights chunk out of order: got index {index}, expected {expected}"
            ));
            assert_eq!(e["code"], "chunk_out_of_order");
            still_open(&mut raw);
        }
        raw.send(&begin(CONFIG, 8, None));
        raw.send(&chunk(0, false, &[1, 2, 3, 4]));
        raw.send(&chunk(0, true, &[1, 2, 3, 4]));
        raw.expect_error("weights chunk out of order: got index 0, expected 1");
        still_open(&mut raw);

        raw.send(&begin(CONFIG, 4, None));
        raw.send(&chunk(0, false, &[1, 2, 3]));
        raw.send(&chunk(1, true, &[4, 5]));
        raw.expect_error("weights overflow");
        still_open(&mut raw);

        // After a failed upload its stray chunks get no answer; on a fresh
        // connection a chunk or commit without model_begin is refused.
        raw.send(&chunk(1, true, &[1]));
        still_open(&mut raw);
        let mut raw = Raw::session(addr);
        raw.send(&chunk(0, true, &[1]));
        raw.expect_error("weights_chunk without model_begin");
        raw.send(&commit()); // the failed "upload"'s commit: no answer
        still_open(&mut raw);
        let mut raw = Raw::session(addr);
        raw.send(&commit());
        assert_eq!(
            raw.expect_status(),
            (false, "model_commit without model_begin".to_owned())
        );
        raw.mount();
        raw.expect_infer("j1");
    });
}

/// Absurd `weights_len`s are refused; the largest accepted one reserves nothing:
/// sixteen peers announcing 6.4 GB models and sending 64 KiB each cost kilobytes.
#[test]
fn absurd_and_negative_weights_len() {
    each_adapter(|addr| {
        let mut raw = Raw::session(addr);
        for len in [-1, -6_710_886_400, i64::MIN, 6_710_886_401, i64::MAX] {
            raw.send(&begin(CONFIG, len, None));
            let e = raw.expect_error("bad weights_len");
            assert_eq!(e["code"], "bad_weights_len");
            // The refused upload's chunks and commit get no answer.
            raw.send(&chunk(0, true, &[1, 2, 3, 4]));
            raw.send(&commit());
            still_open(&mut raw);
        }
        raw.send(&begin(CONFIG, 4, Some("abc")));
        raw.expect_error("bad weights_sha256: want 64 hex digits");

        let mut warm: Vec<Raw> = (0..16).map(|_| Raw::session(addr)).collect();
        for raw in &mut warm {
            raw.send(&begin(CONFIG, 1024, None));
            raw.send(&chunk(0, true, &[7; 1024]));
            raw.send(&commit());
            raw.expect_status();
        }
        thread::sleep(Duration::from_millis(50));

        let before = rss_kib();
        let mut peers: Vec<Raw> = (0..16).map(|_| Raw::session(addr)).collect();
        let piece = [0x5a; 64 * 1024];
        for raw in &mut peers {
            raw.send(&begin(CONFIG, 100 * 64 * 1024 * 1024, None));
            raw.send(&chunk(0, false, &piece));
        }
        for raw in &mut peers {
            still_open(raw);
        }
        let grew = rss_kib().saturating_sub(before);
        assert!(
            grew < 8 * 1024,
            "RSS grew by {grew} KiB with 16 uploads announcing 6.4 GB"
        );
        // Each upload is in progress: a commit now reports the missing bytes.
        for raw in &mut peers {
            raw.send(&commit());
            assert_eq!(
                raw.expect_status(),
                (
                    false,
                    "weights size mismatch: got 65536 expect 6710886400".to_owned()
                )
            );
        }
        drop(warm);
    });
}

/// The client hello is optional: jobs and uploads before it are served, and the
/// server's hello always comes first, even to a client that writes at once.
#[test]
fn jobs_before_hello() {
    each_adapter(|addr| {
        let mut raw = Raw::connect(addr);
        raw.send(&[infer("early", &[1], 1), queue_status()].concat());
        assert_eq!(raw.frame()["type"], "hello");
        raw.expect_error("model not mounted");
        assert_eq!(raw.frame()["type"], "queue_status");

        let mut raw = Raw::connect(addr);
        raw.send(&small_upload());
        assert_eq!(raw.frame()["type"], "hello");
        assert_eq!(raw.expect_status(), (true, "mounted".to_owned()));
        raw.expect_infer("j1");
        // A late client hello changes nothing.
        raw.send(&client_hello("model_push"));
        raw.expect_infer("j2");
    });
}

#[test]
fn prompt_before_hello_on_local_lm() {
    let config = config().mode(Mode::LocalLm);
    let _serial = serial();
    for kind in ADAPTERS {
        let config = config.clone();
        bounded(&format!("{kind:?}"), LIMIT, move || {
            let node = start(kind, config, TestExec::default());
            let mut raw = Raw::connect(node.addr());
            raw.send(&prompt("p1", "hello"));
            assert_eq!(raw.frame()["type"], "hello");
            let v = raw.frame();
            assert_eq!(v["text"], "[prompt stub] stub says: hello");
            node.shutdown();
        });
    }
}

/// 10,000 small frames in one write: every request answered once, in order.
#[test]
fn ten_thousand_frames_in_one_write() {
    each_adapter(|addr| {
        let mut raw = Raw::session(addr);
        raw.mount();
        let mut batch = Vec::new();
        for i in 0..10_000 {
            batch.extend(match i % 3 {
                0 => queue_status(),
                1 => infer(&format!("j{i}"), &[i], 1),
                _ => client_hello("model_push"), // no answer
            });
        }
        batch.extend(queue_status());
        let mut writer = raw.stream.try_clone().expect("clone");
        let write = thread::spawn(move || std::io::Write::write_all(&mut writer, &batch));
        let mut statuses = 0;
        let mut jobs = std::collections::BTreeSet::new();
        let mut full = 0;
        let expected = (0..10_000).filter(|i| i % 3 != 2).count() + 1;
        for _ in 0..expected {
            let v = raw.frame();
            match v["type"].as_str() {
                Some("queue_status") => statuses += 1,
                Some("infer_result") => {
                    let id = v["job_id"].as_str().unwrap().to_owned();
                    let i: i32 = id[1..].parse().unwrap();
                    assert_eq!(v["output_ids"], json!([i, 1]));
                    assert!(jobs.insert(id), "answered twice: {v}");
                }
                Some("error") => {
                    assert_eq!(v["error"], "queue full", "{v}");
                    assert!(jobs.insert(v["job_id"].as_str().unwrap().to_owned()));
                    full += 1;
                }
                _ => panic!("unexpected {v}"),
            }
        }
        write.join().unwrap().expect("write");
        assert_eq!(statuses, 3334 + 1);
        assert_eq!(jobs.len(), 3333);
        assert!(full < 3333, "some jobs ran");
        raw.expect_silence(Duration::from_millis(100));
    });
}

/// Streams `max_tokens` partials of one token each when its client agreed
/// `stream` (the stub's answer otherwise), and says when it is done.
#[derive(Clone, Default)]
struct Streamer {
    done: Arc<AtomicUsize>,
}

impl Executor for Streamer {
    type Model = ();
    type Spool = NoSpool;

    fn extensions(&self) -> Capabilities {
        Capabilities::NONE.with(Capability::Stream)
    }

    fn mount(&self, config_json: String, weights: Weights<NoSpool>) -> Result<(), String> {
        Stub::default().mount(config_json, weights)
    }

    fn infer(
        &self,
        m: &(),
        input_ids: &[i32],
        max_tokens: i64,
        job: &JobContext<'_>,
    ) -> Result<Vec<i32>, JobError> {
        if !job.streams() {
            return Stub::default().infer(m, input_ids, max_tokens, job);
        }
        for _ in 0..max_tokens {
            job.partial(Partial::Tokens(&[7]));
        }
        self.done.fetch_add(1, Ordering::SeqCst);
        Ok([input_ids, &vec![7; max_tokens as usize]].concat())
    }
}

/// A client that agreed `stream` and stops reading: an 8 MiB `job_id` is
/// refused with a short error, and a job that makes 300,000 partials under
/// the longest `job_id` allowed (about 100 MB of frames) costs the node no
/// more than its `max_outbound`. Others are served meanwhile; once the client
/// reads it gets a prefix of the tokens as partials, then the whole result.
#[test]
fn a_streaming_client_that_does_not_read_does_not_grow_the_node() {
    const TOKENS: usize = 300_000;
    let _serial = serial();
    for kind in ADAPTERS {
        bounded(
            &format!("{kind:?} server"),
            Duration::from_secs(60),
            move || {
                let exec = Streamer::default();
                let done = Arc::clone(&exec.done);
                let config = config().max_outbound(256 * 1024);
                let node = start(kind, config, exec);
                let addr = node.addr();
                let mut raw = Raw::connect(addr);
                raw.frame();
                raw.send(&fj(
                r#"{"v":1,"type":"hello","mode":"model_push","role":"client","capabilities":["stream"]}"#,
            ));
                raw.mount();
                let huge = infer(&"j".repeat(8 * MIB as usize), &[1], 250);
                raw.send(&huge);
                drop(huge);
                let body = raw.read_body().expect("an answer");
                assert!(body.len() < 200, "{} byte answer", body.len());
                let e: serde_json::Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(
                    (&e["code"], e.get("job_id")),
                    (&json!("bad_field"), None),
                    "{e}"
                );
                thread::sleep(Duration::from_millis(50));

                let before = rss_kib();
                let job_id = "j".repeat(256);
                raw.send(&infer(&job_id, &[1], TOKENS as i64));
                let deadline = Instant::now() + Duration::from_secs(30);
                while done.load(Ordering::SeqCst) == 0 {
                    assert!(Instant::now() < deadline, "the job did not finish");
                    thread::sleep(Duration::from_millis(5));
                }
                thread::sleep(Duration::from_millis(50));
                let grew = rss_kib().saturating_sub(before);
                assert!(
                    grew < 32 * 1024,
                    "RSS grew by {grew} KiB for a client that does not read"
                );
                assert_serves(addr);

                let mut partials = 0;
                let result = loop {
                    let v = raw.frame();
                    match v["type"].as_str() {
                        Some("infer_partial") => {
                            assert_eq!(
                                (&v["job_id"], &v["output_ids"]),
                                (&json!(job_id), &json!([7]))
                            );
                            partials += 1;
                        }
                        _ => break v,
                    }
                };
                assert_eq!(result["type"], "infer_result", "{result:.200}");
                assert_eq!(result["output_ids"].as_array().unwrap().len(), TOKENS + 1);
                assert!(
                    partials > 0 && partials < TOKENS / 10,
                    "{partials} partials sent"
                );
                raw.expect_in_step();
                node.shutdown();
            },
        );
    }
}

// ---------------------------------------------------------------------------
// Properties over real sockets.

static PROPERTY_NODE: Mutex<Option<SocketAddr>> = Mutex::new(None);

fn property_node() -> SocketAddr {
    PROPERTY_NODE.lock().unwrap().expect("node set")
}

/// One piece of a hostile byte stream.
#[derive(Debug, Clone)]
enum Piece {
    /// Arbitrary bytes.
    Bytes(Vec<u8>),
    /// A well-framed arbitrary body.
    Body(Vec<u8>),
    /// A valid or nearly valid message.
    Message(usize, i64),
}

impl Arbitrary for Piece {
    fn arbitrary(g: &mut Gen) -> Piece {
        match u8::arbitrary(g) % 4 {
            0 => Piece::Bytes(Vec::arbitrary(g)),
            1 => Piece::Body(Vec::arbitrary(g)),
            _ => Piece::Message(usize::arbitrary(g), i64::arbitrary(g) % 16),
        }
    }

    fn shrink(&self) -> Box<dyn Iterator<Item = Piece>> {
        match self {
            Piece::Bytes(b) => Box::new(b.shrink().map(Piece::Bytes)),
            Piece::Body(b) => Box::new(b.shrink().map(Piece::Body)),
            Piece::Message(..) => Box::new(std::iter::empty()),
        }
    }
}

impl Piece {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Piece::Bytes(b) => b.clone(),
            Piece::Body(b) if b.is_empty() => header(0).to_vec(),
            Piece::Body(b) => frame(b),
            Piece::Message(which, n) => match which % 8 {
                0 => begin(CONFIG, *n, None),
                1 => chunk(*n, n % 2 == 0, &[1, 2, 3]),
                2 => commit(),
                3 => infer("q", &[*n as i32], *n),
                4 => prompt("p", "x"),
                5 => queue_status(),
                6 => client_hello("model_push"),
                _ => chunk_b64(*n, true, "A==="),
            },
        }
    }
}

/// Whatever a peer sends, the node answers only with well-formed frames, closes
/// when the peer closes, and keeps serving fresh clients.
fn hostile_stream_never_breaks_the_node(pieces: Vec<Piece>) -> bool {
    let addr = property_node();
    let (mut raw, _) = Raw::hello(addr);
    let bytes: Vec<u8> = pieces.iter().flat_map(Piece::bytes).collect();
    let _ = raw.try_send(&bytes); // the node may already have closed
    raw.close_write();
    loop {
        match raw.read_frame() {
            Ok(v) if v["type"].is_string() => {}
            Ok(v) => panic!("frame without a type: {v}"),
            Err(Ended::Closed) => break,
            Err(e) => panic!("after {pieces:?}: {e:?}"),
        }
    }
    assert_serves(addr);
    true
}

#[test]
fn property_hostile_streams() {
    let _serial = serial();
    for kind in ADAPTERS {
        let node = start(kind, config(), TestExec::default());
        *PROPERTY_NODE.lock().unwrap() = Some(node.addr());
        bounded(&format!("{kind:?}"), Duration::from_secs(60), || {
            QuickCheck::new()
                .tests(40)
                .quickcheck(hostile_stream_never_breaks_the_node as fn(Vec<Piece>) -> bool)
        });
        node.shutdown();
    }
}

/// A Go client's session with some refusals in it: what it writes before each
/// read, and how many answers it then reads (as a Go client, it sends `infer`
/// only after reading the commit's `model_status`).
fn go_session() -> Vec<(Vec<u8>, usize)> {
    vec![
        (
            [
                client_hello("model_push"),
                infer("j0", &[1], 1),
                small_upload(),
            ]
            .concat(),
            2,
        ),
        (
            [
                infer("j1", &[9, 9], 3),
                fj("[1]"),
                begin(CONFIG, 8, None),
                chunk(0, false, &[1, 2, 3, 4]),
                chunk_b64(1, true, "!!!!!!!!"),
                commit(),
                fj(r#"{"v":1,"type":"bogus"}"#),
                fj(r#"{"v":2,"type":"hello"}"#),
                prompt("p1", "x"),
                infer("j2", &[2], 0),
            ]
            .concat(),
            7,
        ),
    ]
}

/// Writes `session`, each step cut at the points of `cuts` that fall inside it,
/// and reads each step's answers (without `queue_depth`, which depends on how
/// the worker's timing meets the reads).
fn run_session(raw: &mut Raw, session: &[(Vec<u8>, usize)], cuts: &[usize]) -> Vec<String> {
    let mut answers = Vec::new();
    let mut offset = 0;
    for (bytes, count) in session {
        let mut from = 0;
        let inside = cuts
            .iter()
            .filter(|c| **c > offset && **c < offset + bytes.len())
            .map(|c| c - offset);
        for cut in inside.chain([bytes.len()]) {
            raw.send(&bytes[from..cut]);
            from = cut;
            thread::sleep(Duration::from_micros(300));
        }
        offset += bytes.len();
        // Job results come when the worker is done, so only the set of a
        // step's answers is fixed, not their order.
        let mut step: Vec<String> = (0..*count)
            .map(|_| {
                let mut v = raw.frame();
                v.as_object_mut().expect("object").remove("queue_depth");
                v.to_string()
            })
            .collect();
        step.sort();
        answers.extend(step);
    }
    answers
}

/// Any split of a session into separate writes yields the same answers.
fn any_split_gives_the_same_answers(cuts: Vec<u16>) -> bool {
    let addr = property_node();
    let session = go_session();
    let total: usize = session.iter().map(|(b, _)| b.len()).sum();
    let (mut reference, _) = Raw::hello(addr);
    let expected = run_session(&mut reference, &session, &[]);

    let mut cuts: Vec<usize> = cuts.iter().map(|c| *c as usize % total).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let (mut raw, _) = Raw::hello(addr);
    let got = run_session(&mut raw, &session, &cuts);
    raw.expect_silence(Duration::from_millis(20));
    if got != expected {
        eprintln!("cuts {cuts:?}\nexpected {expected:#?}\ngot {got:#?}");
    }
    got == expected
}

#[test]
fn property_any_split() {
    let _serial = serial();
    for kind in ADAPTERS {
        let node = start(kind, config(), TestExec::default());
        *PROPERTY_NODE.lock().unwrap() = Some(node.addr());
        bounded(&format!("{kind:?}"), Duration::from_secs(60), || {
            QuickCheck::new()
                .tests(25)
                .quickcheck(any_split_gives_the_same_answers as fn(Vec<u16>) -> bool)
        });
        node.shutdown();
    }
}
