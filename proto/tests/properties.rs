//! quickcheck properties: every message round-trips; any split of a byte stream
//! gives the same frames and the same answers; arbitrary bytes never panic and
//! never grow memory past the limits.

use std::borrow::Cow;
use std::time::Instant;

use donate_proto::frame::{encode_frame, FrameDecoder, HEADER_LEN};
use donate_proto::message::{
    encode_weights_chunk, ChatMessage, ErrorFrame, FinishReason, Hello, Infer, InferResult,
    ModelBegin, ModelStatus, Prompt, PromptResult, QueueStatus, Usage, WeightsChunk,
};
use donate_proto::{
    run_job, run_mount, run_upload, Event, Message, Mode, Node, ServerConfig, Stub,
};
use quickcheck::{quickcheck, Arbitrary, Gen, QuickCheck, TestResult};

#[allow(clippy::disallowed_methods)]
fn base_instant() -> Instant {
    Instant::now()
}

// ---------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------

/// Any message, with any field values.
#[derive(Clone, Debug)]
struct Msg(Message<'static>);

fn small_int(g: &mut Gen) -> i64 {
    *g.choose(&[0, 1, 2, 3, -1, 64]).unwrap()
}

fn any_int(g: &mut Gen) -> i64 {
    if bool::arbitrary(g) {
        small_int(g)
    } else {
        i64::arbitrary(g)
    }
}

fn text(g: &mut Gen) -> String {
    if bool::arbitrary(g) {
        (*g.choose(&["", "j1", "model_push", "local_lm", "{}", "hello world?"])
            .unwrap())
        .to_owned()
    } else {
        String::arbitrary(g)
    }
}

fn base64_text(g: &mut Gen) -> String {
    if bool::arbitrary(g) {
        let raw = Vec::<u8>::arbitrary(g);
        let mut wire = Vec::new();
        encode_weights_chunk(0, false, &raw, &mut wire);
        let body = std::str::from_utf8(&wire[HEADER_LEN..]).unwrap();
        let start = body.find("\"data_b64\":\"").unwrap() + 12;
        body[start..body.len() - 2].to_owned()
    } else {
        text(g)
    }
}

impl Arbitrary for Msg {
    fn arbitrary(g: &mut Gen) -> Msg {
        let msg = match u8::arbitrary(g) % 12 {
            0 => Message::Hello(Hello {
                mode: text(g),
                role: text(g),
                local_lm_path: text(g),
                queue_capacity: any_int(g),
                capabilities: Vec::new(),
            }),
            1 => Message::ModelBegin(ModelBegin {
                config_json: text(g),
                weights_len: any_int(g),
                weights_sha256: text(g),
                offset: 0,
                name: text(g),
            }),
            2 => Message::WeightsChunk(WeightsChunk {
                index: any_int(g),
                last: bool::arbitrary(g),
                data_b64: Cow::Owned(base64_text(g)),
            }),
            3 => Message::ModelCommit,
            4 => Message::ModelStatus(ModelStatus {
                ok: bool::arbitrary(g),
                message: text(g),
            }),
            5 => Message::Infer(Infer {
                job_id: text(g),
                input_ids: Vec::arbitrary(g),
                max_tokens: any_int(g),
                deadline_ms: 0,
                sampling: Default::default(),
            }),
            6 => Message::InferResult(InferResult {
                job_id: text(g),
                ok: bool::arbitrary(g),
                output_ids: Vec::arbitrary(g),
                error: text(g),
                code: text(g),
                queue_depth: any_int(g),
            }),
            7 => Message::Prompt(Prompt {
                job_id: text(g),
                prompt: text(g),
                max_out: any_int(g),
                deadline_ms: 0,
                sampling: Default::default(),
                messages: (0..u8::arbitrary(g) % 3)
                    .map(|_| ChatMessage {
                        role: text(g),
                        content: text(g),
                    })
                    .collect(),
                raw: bool::arbitrary(g),
            }),
            8 => Message::PromptResult(PromptResult {
                job_id: text(g),
                ok: bool::arbitrary(g),
                text: text(g),
                error: text(g),
                code: text(g),
                queue_depth: any_int(g),
                usage: bool::arbitrary(g).then(|| Usage {
                    prompt_tokens: any_int(g),
                    completion_tokens: any_int(g),
                    finish_reason: if bool::arbitrary(g) {
                        FinishReason::Stop
                    } else {
                        FinishReason::Length
                    },
                }),
            }),
            9 => Message::QueueStatusRequest,
            10 => Message::QueueStatus(QueueStatus {
                depth: any_int(g),
                capacity: any_int(g),
                in_progress: bool::arbitrary(g),
            }),
            _ => Message::Error(ErrorFrame {
                code: text(g),
                error: text(g),
                job_id: text(g),
            }),
        };
        Msg(msg)
    }
}

/// One frame of a client's byte stream: a message, or a body that is not one.
#[derive(Clone, Debug)]
enum Item {
    Msg(Msg),
    /// A well-framed body of arbitrary bytes (bad JSON, not an object…).
    Body(Vec<u8>),
    /// A well-framed JSON object of arbitrary key/values.
    Object(Vec<(String, u8)>),
}

impl Arbitrary for Item {
    fn arbitrary(g: &mut Gen) -> Item {
        match u8::arbitrary(g) % 8 {
            0 => Item::Body(Vec::arbitrary(g)),
            1 => Item::Object(Vec::arbitrary(g)),
            _ => Item::Msg(Msg::arbitrary(g)),
        }
    }

    fn shrink(&self) -> Box<dyn Iterator<Item = Item>> {
        match self {
            Item::Msg(Msg(Message::ModelCommit)) => quickcheck::empty_shrinker(),
            _ => quickcheck::single_shrinker(Item::Msg(Msg(Message::ModelCommit))),
        }
    }
}

impl Item {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Item::Msg(Msg(m)) => m.encode(out),
            Item::Body(b) if b.is_empty() => encode_frame(b" ", out),
            Item::Body(b) => encode_frame(b, out),
            Item::Object(fields) => {
                let values = ["1", "\"x\"", "null", "[1,2]", "{}", "true", "-7", "1.5"];
                let body: Vec<String> = fields
                    .iter()
                    .map(|(k, v)| {
                        let key = match v % 4 {
                            0 => "type",
                            1 => "job_id",
                            2 => "v",
                            _ => k.as_str(),
                        };
                        format!(
                            "{}:{}",
                            serde_json::to_string(key).unwrap(),
                            values[*v as usize % values.len()]
                        )
                    })
                    .collect();
                encode_frame(format!("{{{}}}", body.join(",")).as_bytes(), out);
            }
        }
    }
}

fn stream(items: &[Item]) -> Vec<u8> {
    let mut out = Vec::new();
    for item in items {
        item.encode(&mut out);
    }
    out
}

/// Cuts `bytes` into pieces at the given (wrapped) positions.
fn split<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    if bytes.is_empty() {
        return vec![];
    }
    let mut points: Vec<usize> = cuts.iter().map(|c| c % bytes.len()).collect();
    points.push(0);
    points.push(bytes.len());
    points.sort_unstable();
    points.dedup();
    points.windows(2).map(|w| &bytes[w[0]..w[1]]).collect()
}

fn frames_of(decoder: &mut FrameDecoder, pieces: &[&[u8]]) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    for piece in pieces {
        decoder
            .feed(piece, |body| frames.push(body.to_vec()))
            .unwrap();
    }
    frames
}

// ---------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------

#[test]
fn every_message_round_trips() {
    fn prop(msg: Msg) -> TestResult {
        let body = msg.0.to_json();
        let parsed = match Message::parse(&body) {
            Ok(m) => m,
            Err(e) => return TestResult::error(format!("{e}: {}", String::from_utf8_lossy(&body))),
        };
        if parsed != msg.0 {
            return TestResult::error(format!(
                "{parsed:?} from {}",
                String::from_utf8_lossy(&body)
            ));
        }
        // Encoding is a pure function of the value: parse then encode gives the same bytes.
        if parsed.to_json() != body {
            return TestResult::failed();
        }
        // The frame is the body behind its little-endian length.
        let mut framed = Vec::new();
        msg.0.encode(&mut framed);
        TestResult::from_bool(
            framed[..HEADER_LEN] == (body.len() as u32).to_le_bytes()
                && framed[HEADER_LEN..] == body[..],
        )
    }
    QuickCheck::new()
        .tests(2000)
        .quickcheck(prop as fn(Msg) -> TestResult);
}

#[test]
fn chunks_encoded_from_raw_bytes_round_trip() {
    fn prop(index: i64, last: bool, raw: Vec<u8>) -> bool {
        let mut wire = Vec::new();
        encode_weights_chunk(index, last, &raw, &mut wire);
        let mut frames = Vec::new();
        FrameDecoder::new(1 << 20)
            .feed(&wire, |b| frames.push(b.to_vec()))
            .unwrap();
        let [body] = &frames[..] else { return false };
        match Message::parse(body) {
            Ok(Message::WeightsChunk(c)) => {
                c.index == index
                    && c.last == last
                    && c.data_b64.len() == raw.len().div_ceil(3) * 4
                    && matches!(c.data_b64, Cow::Borrowed(_))
            }
            _ => false,
        }
    }
    quickcheck(prop as fn(i64, bool, Vec<u8>) -> bool);
}

// ---------------------------------------------------------------------------
// Splitting
// ---------------------------------------------------------------------------

#[test]
fn any_split_through_the_decoder_yields_the_same_frames() {
    fn prop(items: Vec<Item>, cuts: Vec<usize>) -> bool {
        let bytes = stream(&items);
        let whole = frames_of(&mut FrameDecoder::new(1 << 20), &[&bytes]);
        let pieces = split(&bytes, &cuts);
        let mut decoder = FrameDecoder::new(1 << 20);
        let parts = frames_of(&mut decoder, &pieces);
        whole.len() == items.len() && parts == whole && !decoder.has_partial()
    }
    quickcheck(prop as fn(Vec<Item>, Vec<usize>) -> bool);
}

#[test]
fn one_byte_at_a_time_yields_the_same_frames() {
    fn prop(items: Vec<Item>) -> bool {
        let bytes = stream(&items);
        let pieces: Vec<&[u8]> = bytes.chunks(1).collect();
        let mut decoder = FrameDecoder::new(1 << 20);
        frames_of(&mut decoder, &pieces) == frames_of(&mut FrameDecoder::new(1 << 20), &[&bytes])
    }
    QuickCheck::new()
        .rng(Gen::new(40))
        .quickcheck(prop as fn(Vec<Item>) -> bool);
}

/// Feeds `pieces` to one connection of a fresh node, then runs every mount and
/// job; returns everything the connection transmitted and how many jobs and mounts there were.
fn serve(config: &ServerConfig, pieces: &[&[u8]]) -> (Vec<u8>, usize, usize, bool) {
    let now = base_instant();
    let stub = Stub::new(config.local_lm_path.clone());
    let mut node: Node<()> = Node::new(config.clone());
    let conn = node.accept(now);
    let mut out = Vec::new();
    for piece in pieces {
        node.handle_input(conn, piece, now);
    }
    let (mut jobs, mut mounts) = (0, 0);
    while let Some(event) = node.poll_event() {
        match event {
            Event::Mount(m) => {
                mounts += 1;
                node.mount_done(run_mount(&stub, m), now);
            }
            Event::JobQueued => {
                // None: a closing connection's jobs were dropped unrun.
                let Some(job) = node.next_job() else { continue };
                jobs += 1;
                let outcome = run_job(&stub, &job);
                node.complete(job.id, outcome, now);
            }
            Event::Wake(_) | Event::Resume(_) => {}
            Event::Upload(mut work) => {
                run_upload(&Stub::default(), &mut work);
                node.upload_work_done(work, now);
            }
            other => panic!("no extension is offered: {other:?}"),
        }
    }
    node.poll_transmit(conn, &mut out);
    (out, jobs, mounts, node.is_closing(conn))
}

#[test]
fn any_split_through_a_node_yields_the_same_answers() {
    fn prop(items: Vec<Item>, cuts: Vec<usize>, local_lm: bool, bad_end: bool) -> bool {
        let config = ServerConfig::default()
            .mode(if local_lm {
                Mode::LocalLm
            } else {
                Mode::ModelPush
            })
            .local_lm_path(if local_lm { "/m".into() } else { String::new() })
            .queue_capacity(4)
            .max_frame_len(1 << 20);
        let mut bytes = stream(&items);
        if bad_end {
            bytes.extend_from_slice(&[0, 0, 0, 0, 1, 2]);
        }
        let whole = serve(&config, &[&bytes]);
        let pieces = split(&bytes, &cuts);
        let parts = serve(&config, &pieces);
        whole == parts && whole.3 == bad_end
    }
    QuickCheck::new()
        .rng(Gen::new(40))
        .tests(300)
        .quickcheck(prop as fn(Vec<Item>, Vec<usize>, bool, bool) -> bool);
}

/// A client session a node fully understands, in arbitrary pieces.
#[test]
fn a_valid_session_split_anywhere_mounts_and_answers() {
    fn prop(weights: Vec<u8>, chunk: u8, inputs: Vec<Vec<i32>>, cuts: Vec<usize>) -> bool {
        let chunk = usize::from(chunk.max(1));
        let mut bytes = Vec::new();
        Message::Hello(Hello {
            mode: "model_push".into(),
            role: "client".into(),
            ..Hello::default()
        })
        .encode(&mut bytes);
        Message::ModelBegin(ModelBegin {
            config_json: "{}".into(),
            weights_len: weights.len() as i64,
            ..ModelBegin::default()
        })
        .encode(&mut bytes);
        let n = weights.len().div_ceil(chunk);
        for (i, slice) in weights.chunks(chunk).enumerate() {
            encode_weights_chunk(i as i64, i + 1 == n, slice, &mut bytes);
        }
        Message::ModelCommit.encode(&mut bytes);
        let pieces = split(&bytes, &cuts);
        let (out, _, mounts, closing) = serve(&ServerConfig::default(), &pieces);
        let mut expected = Vec::new();
        encode_frame(
            br#"{"v":1,"type":"hello","mode":"model_push","role":"server","queue_capacity":64}"#,
            &mut expected,
        );
        encode_frame(
            br#"{"v":1,"type":"model_status","ok":true,"message":"mounted"}"#,
            &mut expected,
        );
        if out != expected || mounts != 1 || closing {
            return false;
        }
        // Then jobs, again split anywhere, on a node where the model is mounted.
        let now = base_instant();
        let stub = Stub::default();
        let mut node: Node<()> = Node::new(ServerConfig::default());
        let conn = node.accept(now);
        node.handle_input(conn, &bytes, now);
        while let Some(event) = node.poll_event() {
            if let Event::Mount(m) = event {
                node.mount_done(run_mount(&stub, m), now);
            }
        }
        let mut jobs = Vec::new();
        for (i, ids) in inputs.iter().enumerate() {
            Message::Infer(Infer {
                job_id: format!("j{i}"),
                input_ids: ids.clone(),
                max_tokens: i as i64,
                deadline_ms: 0,
                sampling: Default::default(),
            })
            .encode(&mut jobs);
        }
        for piece in split(&jobs, &cuts) {
            node.handle_input(conn, piece, now);
        }
        let mut answered = 0;
        while let Some(job) = node.next_job() {
            let outcome = run_job(&stub, &job);
            node.complete(job.id, outcome, now);
            answered += 1;
        }
        answered == inputs.len().min(64)
    }
    quickcheck(prop as fn(Vec<u8>, u8, Vec<Vec<i32>>, Vec<usize>) -> bool);
}

// ---------------------------------------------------------------------------
// Hostile bytes and memory
// ---------------------------------------------------------------------------

#[test]
fn arbitrary_bytes_never_panic_the_decoder_and_memory_follows_input() {
    fn prop(bytes: Vec<u8>, cuts: Vec<usize>, max: u16) -> bool {
        let max = usize::from(max.max(1));
        let mut decoder = FrameDecoder::new(max);
        for piece in split(&bytes, &cuts) {
            let buffered_before = decoder.buffered_len();
            match decoder.feed(piece, |body| assert!(!body.is_empty() && body.len() <= max)) {
                Ok(()) => {}
                Err(_) => {
                    // Fatal, and the buffer is released.
                    if decoder.allocated() != 0 || decoder.feed(b"x", |_| {}).is_ok() {
                        return false;
                    }
                    return true;
                }
            }
            // Never more than the frame can hold, never more than twice what arrived.
            let allocated = decoder.allocated();
            if allocated > (HEADER_LEN + max).max(16) {
                return false;
            }
            if allocated > (2 * (buffered_before + piece.len())).max(16) {
                return false;
            }
        }
        true
    }
    QuickCheck::new()
        .tests(2000)
        .quickcheck(prop as fn(Vec<u8>, Vec<usize>, u16) -> bool);
}

/// Limits small enough that the memory bound means something.
fn hostile_config(local_lm: bool) -> ServerConfig {
    ServerConfig::default()
        .mode(if local_lm {
            Mode::LocalLm
        } else {
            Mode::ModelPush
        })
        .queue_capacity(3)
        .max_frame_len(256)
        .max_outbound(1024)
        .max_model_len(512)
}

/// What a connection may hold: a partial frame, a model buffer of at most
/// `max_model_len` with its `config_json` (one frame), and unsent answers.
/// Unsent answers are checked against `max_outbound` only between reads, and
/// a `Vec` grows by doubling, so the outbound buffer may reach twice the limit
/// plus the answers to one read (at most one error frame per 5-byte frame).
fn memory_bound(config: &ServerConfig, read: usize) -> usize {
    const ERROR_FRAME: usize = 512;
    let decoder = (HEADER_LEN + config.max_frame_len).max(16);
    let upload = config.max_model_len as usize + config.max_frame_len;
    let outbound = 2 * (config.max_outbound + (read / 5 + 1) * ERROR_FRAME);
    decoder + upload + outbound
}

#[test]
fn arbitrary_bytes_never_panic_a_connection_and_memory_stays_bounded() {
    fn prop(raw: Vec<u8>, items: Vec<Item>, cuts: Vec<usize>, drain: Vec<bool>, lm: bool) -> bool {
        let config = hostile_config(lm);
        let now = base_instant();
        let stub = Stub::default();
        let mut node: Node<()> = Node::new(config.clone());
        let conn = node.accept(now);
        // Frames a node understands and arbitrary bytes, interleaved.
        let mut bytes = stream(&items);
        let at = if bytes.is_empty() {
            0
        } else {
            raw.len() % bytes.len()
        };
        bytes.splice(at..at, raw);
        let mut drain = drain.into_iter().cycle();
        for piece in split(&bytes, &cuts) {
            if !node.wants_read(conn) {
                if node.is_closing(conn) {
                    break;
                }
                // A peer that is not reading is not read from.
                if drain.next() != Some(true) {
                    continue;
                }
                node.poll_transmit(conn, &mut Vec::new());
            }
            node.handle_input(conn, piece, now);
            while let Some(event) = node.poll_event() {
                match event {
                    Event::Mount(m) => node.mount_done(run_mount(&stub, m), now),
                    Event::JobQueued => {
                        // None: a closing connection's jobs were dropped unrun.
                        let Some(job) = node.next_job() else { continue };
                        let outcome = run_job(&stub, &job);
                        node.complete(job.id, outcome, now);
                    }
                    Event::Wake(_) | Event::Resume(_) => {}
                    Event::Upload(mut work) => {
                        run_upload(&Stub::default(), &mut work);
                        node.upload_work_done(work, now);
                    }
                    other => panic!("no extension is offered: {other:?}"),
                }
            }
            let Some(c) = node.connection(conn) else {
                return false;
            };
            if c.allocated() > memory_bound(&config, piece.len()) {
                eprintln!(
                    "allocated {} over {}",
                    c.allocated(),
                    memory_bound(&config, piece.len())
                );
                return false;
            }
            if drain.next() == Some(true) {
                node.poll_transmit(conn, &mut Vec::new());
            }
        }
        node.handle_timeout(now + std::time::Duration::from_secs(3600));
        node.is_closing(conn) || node.poll_timeout().is_none()
    }
    QuickCheck::new()
        .rng(Gen::new(40))
        .tests(300)
        .quickcheck(prop as fn(Vec<u8>, Vec<Item>, Vec<usize>, Vec<bool>, bool) -> bool);
}

#[test]
fn a_peer_that_keeps_sending_stays_within_the_bound() {
    // Many tiny bad frames in one read: the worst answer-to-input ratio.
    let config = hostile_config(false);
    let now = base_instant();
    let mut node: Node<()> = Node::new(config.clone());
    let conn = node.accept(now);
    let mut read = Vec::new();
    for _ in 0..200 {
        encode_frame(b"x", &mut read);
    }
    let mut max_seen = 0;
    while node.wants_read(conn) {
        node.handle_input(conn, &read, now);
        let allocated = node.connection(conn).unwrap().allocated();
        max_seen = max_seen.max(allocated);
        assert!(
            allocated <= memory_bound(&config, read.len()),
            "{allocated}"
        );
    }
    assert!(
        max_seen > config.max_outbound,
        "the test must cross the limit"
    );
}

#[test]
fn a_64_mib_header_then_nothing_costs_at_most_64_kib() {
    let mut decoder = FrameDecoder::new(64 * 1024 * 1024);
    decoder
        .feed(&(64u32 * 1024 * 1024).to_le_bytes(), |_| panic!("no frame"))
        .unwrap();
    assert!(decoder.has_partial());
    assert!(decoder.allocated() <= 64 * 1024, "{}", decoder.allocated());
    // Header bytes one at a time, then a few body bytes: still small.
    let mut decoder = FrameDecoder::new(64 * 1024 * 1024);
    for byte in (64u32 * 1024 * 1024).to_le_bytes() {
        decoder.feed(&[byte], |_| panic!("no frame")).unwrap();
    }
    decoder.feed(b"{\"v\":1", |_| panic!("no frame")).unwrap();
    assert_eq!(decoder.buffered_len(), HEADER_LEN + 6);
    assert!(decoder.allocated() <= 64 * 1024, "{}", decoder.allocated());
    // The same through a node connection with the default limits.
    let now = base_instant();
    let mut node: Node<()> = Node::new(ServerConfig::default());
    let conn = node.accept(now);
    node.handle_input(conn, &(64u32 * 1024 * 1024).to_le_bytes(), now);
    assert!(!node.is_closing(conn));
    let allocated = node.connection(conn).unwrap().allocated();
    assert!(allocated <= 64 * 1024, "{allocated}");
    // And one byte over the limit is refused at the header, before any body.
    let mut decoder = FrameDecoder::new(64 * 1024 * 1024);
    assert!(decoder
        .feed(&(64u32 * 1024 * 1024 + 1).to_le_bytes(), |_| {})
        .is_err());
    assert_eq!(decoder.allocated(), 0);
}

#[test]
fn a_big_frame_grows_with_the_bytes_that_arrive() {
    let len = 1 << 20;
    let mut wire = Vec::new();
    let body = format!(
        r#"{{"v":1,"type":"queue_status","pad":"{}"}}"#,
        "x".repeat(len - 39)
    );
    encode_frame(body.as_bytes(), &mut wire);
    let mut decoder = FrameDecoder::new(64 * 1024 * 1024);
    let mut frames = 0;
    for piece in wire.chunks(4096) {
        decoder
            .feed(piece, |b| {
                assert_eq!(b, body.as_bytes());
                frames += 1;
            })
            .unwrap();
        assert!(decoder.allocated() <= (2 * decoder.buffered_len()).max(wire.len()));
        if decoder.has_partial() {
            assert!(decoder.allocated() <= 2 * decoder.buffered_len());
        }
    }
    assert_eq!(frames, 1);
    // A big buffer is not kept once the frame is out.
    assert!(decoder.allocated() <= 64 * 1024);
}
