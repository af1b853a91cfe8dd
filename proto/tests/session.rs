//! Whole sessions with no sockets, on `donate_proto::sim`: one `Node<()>` with the
//! stub wired to several peers in memory. A peer is either a `ClientConnection` or
//! a raw byte pipe carrying hand-made frames (a Go client, or a hostile one). Time
//! is the simulation's clock: a base `Instant` plus the `Duration`s a test adds.

use std::time::{Duration, Instant};

use donate_proto::error::{ClientError, FrameError};
use donate_proto::frame::{encode_frame, FrameDecoder};
use donate_proto::message::{ErrorFrame, Hello, InferResult, ModelStatus, PromptResult};
use donate_proto::sim::{Peer, Sim};
use donate_proto::{
    run_job, run_mount, run_upload, Answer, ApiMisuse, ClientConfig, ClientConnection, ClientEvent,
    Executor, Job, JobContext, JobError, JobOutcome, JobOutput, Message, Mode, NoSpool, RequestId,
    ServerConfig, Stub, UploadHandling, Weights,
};
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------
// The tests' vocabulary on top of the simulation
// ---------------------------------------------------------------------------

type P = Peer;

fn local_lm(path: &str) -> Sim<Stub> {
    Sim::stub(
        ServerConfig::default()
            .mode(Mode::LocalLm)
            .local_lm_path(path.to_owned()),
    )
}

/// What the tests say, in terms of the simulation's single steps and `run`.
trait Session {
    /// Every event of a client peer.
    fn events(&mut self, p: P) -> Vec<ClientEvent>;
    /// The next event, which must be the answer to `request`.
    fn answer(&mut self, p: P, request: RequestId) -> Answer;
    /// Bytes from a peer, then run.
    fn send(&mut self, p: P, bytes: &[u8]);
    /// One frame holding `json` from a raw peer, then run.
    fn send_json(&mut self, p: P, json: &str);
    /// Exactly one frame arrived at a raw peer; returns it.
    fn one_frame(&mut self, p: P) -> String;
    /// Exactly one frame arrived, an error frame; returns it.
    fn one_error(&mut self, p: P) -> ErrorFrame;
    /// Proves a raw peer has no answer pending: a `queue_status` request must
    /// be answered by the very next frame.
    fn assert_in_step(&mut self, p: P);
    /// A raw peer that has read the server hello.
    fn raw_connected(&mut self) -> P;
    /// Starts an upload on a client peer and runs.
    fn send_upload(
        &mut self,
        p: P,
        config: &str,
        weights: &[u8],
        sha: Option<[u8; 32]>,
    ) -> RequestId;
    /// Pushes a model and checks that it mounted.
    fn mount(&mut self, p: P);
    /// Advances the clock to `at`.
    fn advance_to(&mut self, at: Instant);
    /// Runs the `i`-th held job on the stub, then runs; returns whether its result was delivered.
    fn finish(&mut self, i: usize) -> bool;
    /// Hands back `outcome` for a held job, then runs.
    fn finish_with(&mut self, job: Job<()>, outcome: JobOutcome) -> bool;
}

impl Session for Sim<Stub> {
    fn events(&mut self, p: P) -> Vec<ClientEvent> {
        std::iter::from_fn(|| self.client_core(p).poll_event()).collect()
    }

    #[track_caller]
    fn answer(&mut self, p: P, request: RequestId) -> Answer {
        match self.client_core(p).poll_event() {
            Some(ClientEvent::Answer { request: r, answer }) if r == request => answer,
            other => panic!("expected the answer to {request:?}, got {other:?}"),
        }
    }

    fn send(&mut self, p: P, bytes: &[u8]) {
        self.write(p, bytes);
        self.run();
    }

    fn send_json(&mut self, p: P, json: &str) {
        self.send(p, &frame(json));
    }

    #[track_caller]
    fn one_frame(&mut self, p: P) -> String {
        let frames = self.frames(p);
        assert_eq!(frames.len(), 1, "expected one frame, got {frames:#?}");
        frames.into_iter().next().unwrap()
    }

    #[track_caller]
    fn one_error(&mut self, p: P) -> ErrorFrame {
        let text = self.one_frame(p);
        match Message::parse(text.as_bytes()) {
            Ok(Message::Error(e)) => e,
            other => panic!("expected an error frame, got {text} ({other:?})"),
        }
    }

    #[track_caller]
    fn assert_in_step(&mut self, p: P) {
        self.send_json(p, r#"{"v":1,"type":"queue_status"}"#);
        let text = self.one_frame(p);
        assert!(
            text.starts_with(r#"{"v":1,"type":"queue_status","#),
            "out of step: {text}"
        );
    }

    fn raw_connected(&mut self) -> P {
        let p = self.raw();
        self.run();
        let hello = self.one_frame(p);
        assert!(hello.starts_with(r#"{"v":1,"type":"hello","#), "{hello}");
        p
    }

    fn send_upload(
        &mut self,
        p: P,
        config: &str,
        weights: &[u8],
        sha: Option<[u8; 32]>,
    ) -> RequestId {
        let request = self.upload(p, config, weights, sha).unwrap();
        self.run();
        request
    }

    fn mount(&mut self, p: P) {
        let request = self.send_upload(p, r#"{"ok":true}"#, &[1, 2, 3, 4], None);
        assert_eq!(
            self.answer(p, request),
            Answer::ModelStatus(ModelStatus {
                ok: true,
                message: "mounted".into()
            })
        );
    }

    fn advance_to(&mut self, at: Instant) {
        assert!(at >= self.now());
        self.advance(at - self.now());
    }

    fn finish(&mut self, i: usize) -> bool {
        let delivered = self.finish_job(i);
        self.run();
        delivered
    }

    fn finish_with(&mut self, job: Job<()>, outcome: JobOutcome) -> bool {
        let delivered = self.complete(job, outcome);
        self.run();
        delivered
    }
}

fn frame(json: &str) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(json.as_bytes(), &mut out);
    out
}

fn header(len: u32) -> [u8; 4] {
    len.to_le_bytes()
}

fn parse(text: &str) -> Message<'static> {
    Message::parse(text.as_bytes()).unwrap().into_owned()
}

fn infer_ok(job_id: &str, output_ids: Vec<i32>, queue_depth: i64) -> Answer {
    Answer::Infer(InferResult {
        job_id: job_id.into(),
        ok: true,
        output_ids,
        error: String::new(),
        code: String::new(),
        queue_depth,
    })
}

fn error_answer(code: &str, error: &str, job_id: &str) -> Answer {
    Answer::Error(ErrorFrame {
        code: code.into(),
        error: error.into(),
        job_id: job_id.into(),
    })
}

fn status(ok: bool, message: &str) -> Answer {
    Answer::ModelStatus(ModelStatus {
        ok,
        message: message.into(),
    })
}

fn b64(raw: &[u8]) -> String {
    let mut wire = Vec::new();
    donate_proto::message::encode_weights_chunk(0, true, raw, &mut wire);
    let text = String::from_utf8(wire[4..].to_vec()).unwrap();
    let start = text.find("\"data_b64\":\"").unwrap() + 12;
    text[start..text.len() - 2].to_owned()
}

fn begin(config: &str, len: i64) -> String {
    format!(
        r#"{{"v":1,"type":"model_begin","config_json":{},"weights_len":{len}}}"#,
        serde_json::to_string(config).unwrap()
    )
}

fn chunk(index: i64, last: bool, raw: &[u8]) -> String {
    format!(
        r#"{{"v":1,"type":"weights_chunk","index":{index},"last":{last},"data_b64":"{}"}}"#,
        b64(raw)
    )
}

const COMMIT: &str = r#"{"v":1,"type":"model_commit"}"#;

/// Every frame in a byte stream, as text.
fn split_frames(bytes: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    FrameDecoder::new(usize::MAX >> 1)
        .feed(bytes, |b| out.push(String::from_utf8(b.to_vec()).unwrap()))
        .unwrap();
    out
}

const SECOND: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);

// ---------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------

#[test]
fn hello_both_ways() {
    let mut sim = Sim::stub(ServerConfig::default());
    let p = sim.client();
    let events = sim.events(p);
    assert_eq!(
        events,
        [ClientEvent::Connected(Hello {
            mode: "model_push".into(),
            role: "server".into(),
            local_lm_path: String::new(),
            queue_capacity: 64,
            capabilities: Vec::new(),
        })]
    );
    assert_eq!(
        sim.client_core(p).server_hello().unwrap().queue_capacity,
        64
    );
    // The client answered with the Go client's hello, byte for byte.
    assert_eq!(
        split_frames(sim.sent(p)),
        [r#"{"v":1,"type":"hello","mode":"model_push","role":"client"}"#]
    );
    // The server's hello, byte for byte, as a raw peer sees it.
    let raw = sim.raw();
    sim.run();
    assert_eq!(
        sim.frames(raw),
        [r#"{"v":1,"type":"hello","mode":"model_push","role":"server","queue_capacity":64}"#]
    );
    // A client hello gets no answer.
    sim.send_json(
        raw,
        r#"{"v":1,"type":"hello","mode":"model_push","role":"client"}"#,
    );
    assert_eq!(sim.frames(raw), Vec::<String>::new());
    assert_in_step_and_open(&mut sim, raw);
}

fn assert_in_step_and_open(sim: &mut Sim<Stub>, p: P) {
    sim.assert_in_step(p);
    assert!(!sim.is_closed(p));
}

#[test]
fn local_lm_hello_names_its_path_and_the_client_echoes_the_mode() {
    let mut sim = Sim::stub(
        ServerConfig::default()
            .mode(Mode::LocalLm)
            .local_lm_path("/m/tiny.gguf".into())
            .queue_capacity(3),
    );
    let raw = sim.raw();
    sim.run();
    assert_eq!(
        sim.frames(raw),
        [
            r#"{"v":1,"type":"hello","mode":"local_lm","role":"server","local_lm_path":"/m/tiny.gguf","queue_capacity":3}"#
        ]
    );
    let p = sim.client();
    assert!(matches!(&sim.events(p)[..], [ClientEvent::Connected(h)] if h.mode == "local_lm"));
    assert_eq!(
        split_frames(sim.sent(p)),
        [r#"{"v":1,"type":"hello","mode":"local_lm","role":"client"}"#]
    );
}

#[test]
fn the_client_hello_is_optional() {
    let mut sim = Sim::stub(ServerConfig::default());
    let raw = sim.raw_connected();
    sim.send_json(
        raw,
        r#"{"v":1,"type":"infer","job_id":"j1","input_ids":[9,9],"max_tokens":3}"#,
    );
    assert_eq!(
        sim.frames(raw),
        [
            r#"{"code":"model_not_mounted","error":"model not mounted","job_id":"j1","type":"error","v":1}"#
        ]
    );
}

#[test]
fn a_go_client_session_byte_for_byte() {
    let mut sim = Sim::stub(ServerConfig::default());
    let go = sim.raw_connected();
    // The Go client writes its hello and streams the model, then reads one answer.
    let mut upload = frame(r#"{"v":1,"type":"hello","mode":"model_push","role":"client"}"#);
    upload.extend(frame(
        r#"{"v":1,"type":"model_begin","config_json":"{\"ok\":true}","weights_len":4}"#,
    ));
    upload.extend(frame(
        r#"{"v":1,"type":"weights_chunk","index":0,"last":true,"data_b64":"AQIDBA=="}"#,
    ));
    upload.extend(frame(r#"{"v":1,"type":"model_commit"}"#));
    sim.send(go, &upload);
    assert_eq!(
        sim.frames(go),
        [r#"{"v":1,"type":"model_status","ok":true,"message":"mounted"}"#]
    );
    assert!(sim.node.connection(sim.conn(go)).unwrap().has_model());
    sim.send_json(
        go,
        r#"{"v":1,"type":"infer","job_id":"j1","input_ids":[9,9],"max_tokens":3}"#,
    );
    assert_eq!(
        sim.frames(go),
        [
            r#"{"v":1,"type":"infer_result","job_id":"j1","ok":true,"output_ids":[9,9,1,2,3],"queue_depth":0}"#
        ]
    );
}

// ---------------------------------------------------------------------------
// Model push
// ---------------------------------------------------------------------------

#[test]
fn model_push_without_sha256_then_infer() {
    let mut sim = Sim::stub(ServerConfig::default());
    let p = sim.client();
    sim.events(p);
    sim.mount(p);
    assert!(sim.node.connection(sim.conn(p)).unwrap().has_model());
    let job = sim.client_core(p).infer(&[9, 9], 3).unwrap();
    sim.run();
    assert_eq!(sim.answer(p, job), infer_ok("j2", vec![9, 9, 1, 2, 3], 0));
    let job = sim.client_core(p).infer(&[1], 0).unwrap();
    sim.run();
    assert_eq!(
        sim.answer(p, job),
        infer_ok("j3", vec![1, 1, 2, 3, 4, 5, 6, 7, 1], 0)
    );
    assert_eq!(sim.client_core(p).outstanding(), 0);
    assert!(sim.client_error(p).is_none());
}

#[test]
fn model_push_in_many_chunks_with_sha256() {
    let mut sim = Sim::stub(ServerConfig::default());
    let p = sim.client_with(ClientConfig::default().chunk_size(3).upload_window(8));
    sim.events(p);
    let weights: Vec<u8> = (0..10).collect();
    let sha: [u8; 32] = Sha256::digest(&weights).into();
    let request = sim.send_upload(p, r#"{"layers":2}"#, &weights, Some(sha));
    assert_eq!(sim.answer(p, request), status(true, "mounted"));
    // What went out: hello, begin with the hash, chunks 0..=3 of 3,3,3,1 bytes, commit.
    let sent = split_frames(sim.sent(p));
    let hex: String = sha.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        sent[1],
        format!(
            r#"{{"v":1,"type":"model_begin","config_json":"{{\"layers\":2}}","weights_len":10,"weights_sha256":"{hex}"}}"#
        )
    );
    assert_eq!(
        sent[2..],
        [
            chunk(0, false, &[0, 1, 2]),
            chunk(1, false, &[3, 4, 5]),
            chunk(2, false, &[6, 7, 8]),
            chunk(3, true, &[9]),
            COMMIT.to_owned(),
        ]
    );
}

#[test]
fn sha256_mismatch_is_refused_with_the_reason() {
    let mut sim = Sim::stub(ServerConfig::default());
    let p = sim.client();
    sim.events(p);
    let weights = [1u8, 2, 3, 4];
    let claimed: [u8; 32] = Sha256::digest(b"something else").into();
    let request = sim.send_upload(p, r#"{"ok":true}"#, &weights, Some(claimed));
    let got: String = Sha256::digest(weights)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let expect: String = claimed.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        sim.answer(p, request),
        status(
            false,
            &format!("weights_sha256 mismatch: got {got} expect {expect}")
        )
    );
    assert!(!sim.node.connection(sim.conn(p)).unwrap().has_model());
    let job = sim.client_core(p).infer(&[1], 1).unwrap();
    sim.run();
    assert_eq!(
        sim.answer(p, job),
        error_answer("model_not_mounted", "model not mounted", "j2")
    );
}

#[test]
fn sha256_in_upper_case_is_accepted_and_a_malformed_one_refused() {
    let mut sim = Sim::stub(ServerConfig::default());
    let p = sim.raw_connected();
    let weights = [5u8, 6, 7];
    let hex: String = Sha256::digest(weights)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    let begin_with = |sha: &str| {
        format!(
            r#"{{"v":1,"type":"model_begin","config_json":"{{}}","weights_len":3,"weights_sha256":"{sha}"}}"#
        )
    };
    sim.send_json(p, &begin_with(&hex));
    sim.send_json(p, &chunk(0, true, &weights));
    sim.send_json(p, COMMIT);
    assert_eq!(
        sim.one_frame(p),
        r#"{"v":1,"type":"model_status","ok":true,"message":"mounted"}"#
    );
    for bad in ["abc", &"g".repeat(64), &"a".repeat(63), &"a".repeat(65)] {
        sim.send_json(p, &begin_with(bad));
        let e = sim.one_error(p);
        assert_eq!(e.error, "bad weights_sha256: want 64 hex digits");
        assert_eq!(e.code, "bad_weights_sha256");
        // The refused upload's chunk and commit get no answer.
        sim.send_json(p, &chunk(0, true, &weights));
        sim.send_json(p, COMMIT);
        sim.assert_in_step(p);
    }
}

#[test]
fn wrong_chunk_order_fails_the_upload_once() {
    let mut sim = Sim::stub(ServerConfig::default());
    let p = sim.raw_connected();
    sim.send_json(p, &begin(r#"{"ok":true}"#, 4));
    sim.send_json(p, &chunk(1, false, &[1, 2]));
    let e = sim.one_error(p);
    assert_eq!(
        e.error,
        "weights chunk out of order: got index 1, expected 0"
    );
    assert_eq!(e.code, "chunk_out_of_order");
    assert_eq!(e.job_id, "");
    // The rest of the failed upload gets no answer at all.
    sim.send_json(p, &chunk(0, false, &[1, 2]));
    sim.send_json(p, &chunk(1, true, &[3, 4]));
    sim.send_json(p, COMMIT);
    assert_eq!(sim.frames(p), Vec::<String>::new());
    sim.assert_in_step(p);
    // A repeated index is out of order too.
    sim.send_json(p, &begin(r#"{"ok":true}"#, 4));
    sim.send_json(p, &chunk(0, false, &[1, 2]));
    sim.send_json(p, &chunk(0, false, &[1, 2]));
    assert_eq!(
        sim.one_error(p).error,
        "weights chunk out of order: got index 0, expected 1"
    );
    // A negative one too.
    sim.send_json(p, &begin(r#"{"ok":true}"#, 4));
    sim.send_json(p, &chunk(-1, false, &[1, 2]));
    assert_eq!(
        sim.one_error(p).error,
        "weights chunk out of order: got index -1, expected 0"
    );
    // The next model_begin starts afresh.
    sim.send_json(p, &begin(r#"{"ok":true}"#, 4));
    sim.send_json(p, &chunk(0, false, &[1, 2]));
    sim.send_json(p, &chunk(1, true, &[3, 4]));
    sim.send_json(p, COMMIT);
    assert_eq!(
        sim.one_frame(p),
        r#"{"v":1,"type":"model_status","ok":true,"message":"mounted"}"#
    );
}

#[test]
fn overflow_fails_the_upload_once() {
    let mut sim = Sim::stub(ServerConfig::default());
    let p = sim.raw_connected();
    // One chunk too big.
    sim.send_json(p, &begin("{}", 4));
    sim.send_json(p, &chunk(0, true, &[1, 2, 3, 4, 5]));
    assert_eq!(sim.one_error(p).error, "weights overflow");
    sim.send_json(p, COMMIT);
    sim.assert_in_step(p);
    // The second chunk crosses the line.
    sim.send_json(p, &begin("{}", 4));
    sim.send_json(p, &chunk(0, false, &[1, 2, 3]));
    assert_eq!(sim.frames(p), Vec::<String>::new());
    sim.send_json(p, &chunk(1, true, &[4, 5]));
    let e = sim.one_error(p);
    assert_eq!(
        (e.code.as_str(), e.error.as_str()),
        ("weights_overflow", "weights overflow")
    );
    sim.send_json(p, &chunk(2, true, &[1]));
    sim.send_json(p, COMMIT);
    sim.assert_in_step(p);
    assert!(!sim.node.connection(sim.conn(p)).unwrap().has_model());
}

#[test]
fn nothing_may_follow_the_last_chunk() {
    let mut sim = Sim::stub(ServerConfig::default());
    let p = sim.raw_connected();
    // Marked last with a byte missing, then one more chunk: refused once.
    sim.send_json(p, &begin("{}", 4));
    sim.send_json(p, &chunk(0, true, &[1, 2, 3]));
    assert_eq!(sim.frames(p), Vec::<String>::new());
    sim.send_json(p, &chunk(1, true, &[4]));
    let e = sim.one_error(p);
    assert_eq!(
        (e.code.as_str(), e.error.as_str()),
        (
            "chunk_after_last",
            "weights_chunk after the chunk marked last"
        )
    );
    sim.send_json(p, COMMIT);
    sim.assert_in_step(p);
    // An empty chunk after the last is refused too.
    sim.send_json(p, &begin("{}", 1));
    sim.send_json(p, &chunk(0, true, &[1]));
    sim.send_json(p, &chunk(1, true, &[]));
    assert_eq!(sim.one_error(p).code, "chunk_after_last");
    // Marked last with bytes missing, then commit: Go's size mismatch.
    sim.send_json(p, &begin("{}", 4));
    sim.send_json(p, &chunk(0, true, &[1, 2, 3]));
    sim.send_json(p, COMMIT);
    assert_eq!(
        sim.one_frame(p),
        r#"{"v":1,"type":"model_status","ok":false,"message":"weights size mismatch: got 3 expect 4"}"#
    );
}

#[test]
fn missing_bytes_at_commit() {
    let mut sim = Sim::stub(ServerConfig::default());
    let p = sim.raw_connected();
    sim.send_json(p, &begin("{}", 4));
    sim.send_json(p, &chunk(0, false, &[1, 2, 3]));
    sim.send_json(p, COMMIT);
    assert_eq!(
        parse(&sim.one_frame(p)),
        Message::ModelStatus(ModelStatus {
            ok: false,
            message: "weights size mismatch: got 3 expect 4".into()
        })
    );
    // No chunk at all.
    sim.send_json(p, &begin("{}", 9));
    sim.send_json(p, COMMIT);
    assert_eq!(
        sim.one_frame(p),
        r#"{"v":1,"type":"model_status","ok":false,"message":"weights size mismatch: got 0 expect 9"}"#
    );
    // The commit ended that upload: another commit has no upload to commit.
    sim.send_json(p, COMMIT);
    assert_eq!(
        sim.one_frame(p),
        r#"{"v":1,"type":"model_status","ok":false,"message":"model_commit without model_begin"}"#
    );
}

#[test]
fn empty_config_at_commit() {
    let mut sim = Sim::stub(ServerConfig::default());
    let p = sim.raw_connected();
    sim.send_json(p, &begin("", 4));
    sim.send_json(p, &chunk(0, true, &[1, 2, 3, 4]));
    sim.send_json(p, COMMIT);
    assert_eq!(
        sim.one_frame(p),
        r#"{"v":1,"type":"model_status","ok":false,"message":"no config"}"#
    );
    // Same through the client core.
    let c = sim.client();
    sim.events(c);
    let request = sim.send_upload(c, "", &[1, 2, 3, 4], None);
    assert_eq!(sim.answer(c, request), status(false, "no config"));
}

#[test]
fn an_empty_model_mounts() {
    let mut sim = Sim::stub(ServerConfig::default());
    let p = sim.client();
    sim.events(p);
    let request = sim.send_upload(p, "{}", &[], None);
    assert_eq!(sim.answer(p, request), status(true, "mounted"));
    assert_eq!(
        split_frames(sim.sent(p))[1..],
        [begin("{}", 0), COMMIT.to_owned()]
    );
}

#[test]
fn a_huge_weights_len_allocates_nothing_up_front() {
    let mut sim = Sim::stub(ServerConfig::default());
    let p = sim.raw_connected();
    let max = 100 * 64 * 1024 * 1024_i64;
    sim.send_json(p, &begin("{}", max));
    assert_eq!(sim.frames(p), Vec::<String>::new());
    let allocated = sim.node.connection(sim.conn(p)).unwrap().allocated();
    assert!(allocated < 64 * 1024, "allocated {allocated}");
    sim.send_json(p, &chunk(0, false, &[7; 1000]));
    let allocated = sim.node.connection(sim.conn(p)).unwrap().allocated();
    assert!(allocated < 64 * 1024, "allocated {allocated}");
    sim.send_json(p, COMMIT);
    assert_eq!(
        parse(&sim.one_frame(p)),
        Message::ModelStatus(ModelStatus {
            ok: false,
            message: format!("weights size mismatch: got 1000 expect {max}")
        })
    );
}

#[test]
fn a_model_belongs_to_its_connection() {
    let mut sim = Sim::stub(ServerConfig::default());
    let a = sim.client();
    let b = sim.client();
    sim.events(a);
    sim.events(b);
    sim.mount(a);
    let job = sim.client_core(b).infer(&[1], 1).unwrap();
    sim.run();
    assert_eq!(
        sim.answer(b, job),
        error_answer("model_not_mounted", "model not mounted", "j1")
    );
    let job = sim.client_core(a).infer(&[1], 1).unwrap();
    sim.run();
    assert_eq!(sim.answer(a, job), infer_ok("j2", vec![1, 1], 0));
}

#[test]
fn a_slow_mount_is_answered_when_the_executor_is_done() {
    let mut sim = Sim::stub(ServerConfig::default());
    sim.hold_mounts = true;
    let p = sim.client();
    sim.events(p);
    let request = sim.send_upload(p, "{}", &[1, 2], None);
    assert_eq!(sim.events(p), []);
    assert_eq!(sim.held_mounts.len(), 1);
    // Not idle while mounting: no idle deadline.
    assert_eq!(sim.node.poll_timeout(), None);
    let mount = sim.held_mounts.pop().unwrap();
    assert_eq!(mount.model.weights, [1, 2]);
    assert_eq!(mount.model.config_json, "{}");
    struct Refuses;
    impl Executor for Refuses {
        type Model = ();
        type Spool = NoSpool;
        fn mount(&self, _: String, weights: Weights<NoSpool>) -> Result<(), String> {
            let Weights::Memory(weights) = weights;
            Err(format!("cannot load {} bytes", weights.len()))
        }
        fn infer(
            &self,
            _: &(),
            _: &[i32],
            _: i64,
            _: &JobContext<'_>,
        ) -> Result<Vec<i32>, JobError> {
            unreachable!()
        }
        fn prompt(&self, _: &str, _: i64, _: &JobContext<'_>) -> Result<String, JobError> {
            unreachable!()
        }
    }
    let outcome = run_mount(&Refuses, mount);
    sim.node.mount_done(outcome, sim.now());
    sim.run();
    assert_eq!(sim.answer(p, request), status(false, "cannot load 2 bytes"));
}

#[test]
fn a_second_upload_waits_until_the_first_is_answered() {
    let mut sim = Sim::stub(ServerConfig::default());
    sim.hold_mounts = true;
    let p = sim.client();
    sim.events(p);
    let first = sim.send_upload(p, "{}", &[1], None);
    // Sent in full but unanswered: a refusal could not be told apart.
    assert_eq!(
        sim.client_core(p).begin_upload("{}", 1, None),
        Err(ClientError::Misuse(ApiMisuse::UploadInProgress))
    );
    let mount = sim.held_mounts.pop().unwrap();
    sim.node
        .mount_done(run_mount(&Stub::default(), mount), sim.now());
    sim.run();
    assert_eq!(sim.answer(p, first), status(true, "mounted"));
    assert!(sim.client_core(p).begin_upload("{}", 1, None).is_ok());
}

#[test]
fn jobs_pipelined_after_a_commit_wait_for_the_mount() {
    let mut sim = Sim::stub(ServerConfig::default());
    sim.hold_mounts = true;
    let p = sim.client();
    sim.events(p);
    let first = sim.send_upload(p, "{}", &[1, 2], None);
    let job = sim.client_core(p).infer(&[9, 9], 3).unwrap();
    sim.run();
    // Nothing answered yet: the job waits for the model, not "model not mounted".
    assert_eq!(sim.events(p), []);
    let mount = sim.held_mounts.pop().unwrap();
    sim.node
        .mount_done(run_mount(&Stub::default(), mount), sim.now());
    sim.run();
    assert_eq!(sim.answer(p, first), status(true, "mounted"));
    assert_eq!(sim.answer(p, job), infer_ok("j2", vec![9, 9, 1, 2, 3], 0));

    // A refused mount refuses the jobs that waited for it.
    let second = sim.send_upload(p, "", &[1], None);
    sim.run();
    assert_eq!(sim.answer(p, second), status(false, "no config"));
    let failing = sim.send_upload(p, "{}", &[3], None);
    let job = sim.client_core(p).infer(&[1], 1).unwrap();
    sim.run();
    let mount = sim.held_mounts.pop().unwrap();
    struct Refuses;
    impl Executor for Refuses {
        type Model = ();
        type Spool = NoSpool;
        fn mount(&self, _: String, _: Weights<NoSpool>) -> Result<(), String> {
            Err("no".into())
        }
        fn infer(
            &self,
            _: &(),
            _: &[i32],
            _: i64,
            _: &JobContext<'_>,
        ) -> Result<Vec<i32>, JobError> {
            unreachable!()
        }
        fn prompt(&self, _: &str, _: i64, _: &JobContext<'_>) -> Result<String, JobError> {
            unreachable!()
        }
    }
    sim.node.mount_done(run_mount(&Refuses, mount), sim.now());
    sim.run();
    assert_eq!(sim.answer(p, failing), status(false, "no"));
    // The earlier model is still mounted: the job runs on it.
    assert_eq!(sim.answer(p, job), infer_ok("j5", vec![1, 1], 0));
}

#[test]
fn workers_hash_an_upload_while_it_arrives() {
    let weights: Vec<u8> = (0..10 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let sha: [u8; 32] = Sha256::digest(&weights).into();
    let mut wrong = sha;
    wrong[0] ^= 1;
    for (expected, ok) in [(sha, true), (wrong, false)] {
        let mut sim = Sim::with_uploads(
            Stub::default(),
            ServerConfig::default(),
            UploadHandling::HashAsItArrives,
        );
        sim.hold_uploads = true;
        let p = sim.client();
        sim.events(p);
        let request = sim.send_upload(p, "{}", &weights, Some(expected));
        // The hash state went to a worker after the first 4 MiB and the commit
        // waits for it to come back: no answer yet.
        assert_eq!(sim.held_uploads.len(), 1);
        assert!(sim.held_uploads[0].len() >= 4 * 1024 * 1024);
        assert_eq!(sim.events(p), []);
        // Hand the work back; the rest is hashed at mount time.
        let mut work = sim.held_uploads.pop().unwrap();
        run_upload(&Stub::default(), &mut work);
        assert!(work.is_empty());
        sim.node.upload_work_done(work, sim.now());
        sim.hold_uploads = false;
        sim.run();
        let answer = sim.answer(p, request);
        match answer {
            Answer::ModelStatus(s) => {
                assert_eq!(s.ok, ok, "{s:?}");
                if !ok {
                    assert!(s.message.starts_with("weights_sha256 mismatch"), "{s:?}");
                }
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn hash_work_returned_after_its_connection_left_is_dropped() {
    let mut sim = Sim::with_uploads(
        Stub::default(),
        ServerConfig::default(),
        UploadHandling::HashAsItArrives,
    );
    sim.hold_uploads = true;
    let p = sim.client();
    sim.events(p);
    let weights = vec![7u8; 5 * 1024 * 1024];
    let sha: [u8; 32] = Sha256::digest(&weights).into();
    sim.send_upload(p, "{}", &weights, Some(sha));
    let mut work = sim.held_uploads.pop().unwrap();
    let conn = sim.conn(p);
    sim.node.remove(conn);
    run_upload(&Stub::default(), &mut work);
    sim.node.upload_work_done(work, sim.now());
    assert!(sim.node.poll_event().is_none());
    // Shutdown is not held up by the dropped commit.
    sim.node.begin_shutdown();
    assert!(sim.node.is_drained());
}

// ---------------------------------------------------------------------------
// What we answer (docs/PROTOCOL.md §5) and one answer per request
// ---------------------------------------------------------------------------

/// Sends `request` from a fresh raw peer and returns the one error frame it gets.
fn refusal(sim: &mut Sim<Stub>, setup: &[String], request: &str) -> ErrorFrame {
    let p = sim.raw_connected();
    for json in setup {
        sim.send_json(p, json);
    }
    assert_eq!(sim.frames(p), Vec::<String>::new(), "setup was answered");
    sim.send_json(p, request);
    let e = sim.one_error(p);
    sim.assert_in_step(p);
    assert!(!sim.is_closed(p));
    e
}

#[test]
fn server_answers_table() {
    let mut push = Sim::stub(ServerConfig::default());
    let mut lm = local_lm("/m/x");
    let none: &[String] = &[];

    let e = refusal(&mut lm, none, &begin("{}", 4));
    assert_eq!(e.error, "model_push not enabled on this node");
    assert_eq!(e.code, "model_push_disabled");

    for len in [-1, 100 * 64 * 1024 * 1024 + 1, i64::MIN, i64::MAX] {
        let e = refusal(&mut push, none, &begin("{}", len));
        assert_eq!(e.error, "bad weights_len", "weights_len {len}");
        assert_eq!(e.code, "bad_weights_len");
    }

    for data in [
        "!!!!", "AQI", "AQIDBA", "AQIDBA=", "AQ==AQ==", "AQIDB===", "AR==",
    ] {
        let e = refusal(
            &mut push,
            &[begin("{}", 4)],
            &format!(
                r#"{{"v":1,"type":"weights_chunk","index":0,"last":true,"data_b64":"{data}"}}"#
            ),
        );
        assert_eq!(e.error, "weights b64 decode", "data_b64 {data:?}");
        assert_eq!(e.code, "weights_b64");
    }

    let e = refusal(&mut push, &[begin("{}", 1)], &chunk(0, true, &[1, 2]));
    assert_eq!(e.error, "weights overflow");

    let infer = r#"{"v":1,"type":"infer","job_id":"j1","input_ids":[1]}"#;
    let e = refusal(&mut lm, none, infer);
    assert_eq!(
        (e.error.as_str(), e.code.as_str(), e.job_id.as_str()),
        (
            "this node is local_lm; send prompt, not infer",
            "wrong_mode",
            "j1"
        )
    );

    let e = refusal(&mut push, none, infer);
    assert_eq!(
        (e.error.as_str(), e.code.as_str(), e.job_id.as_str()),
        ("model not mounted", "model_not_mounted", "j1")
    );

    let prompt = r#"{"v":1,"type":"prompt","job_id":"p1","prompt":"hi"}"#;
    let e = refusal(&mut push, none, prompt);
    assert_eq!(
        (e.error.as_str(), e.code.as_str(), e.job_id.as_str()),
        (
            "this node is model_push; mount model and send infer",
            "wrong_mode",
            "p1"
        )
    );

    for (local_lm, request, text) in [
        (false, r#"{"v":1,"type":"bogus"}"#, "unknown type: bogus"),
        (true, r#"{"v":1,"type":"Hello"}"#, "unknown type: Hello"),
        (false, r#"{"v":1}"#, "unknown type: "),
        (false, r#"{"v":1,"type":""}"#, "unknown type: "),
        // Server-to-client messages are unknown requests.
        (
            false,
            r#"{"v":1,"type":"model_status","ok":true}"#,
            "unknown type: model_status",
        ),
        (
            false,
            r#"{"v":1,"type":"infer_result","job_id":"j1"}"#,
            "unknown type: infer_result",
        ),
        (
            true,
            r#"{"v":1,"type":"prompt_result","job_id":"p1"}"#,
            "unknown type: prompt_result",
        ),
        (
            false,
            r#"{"error":"x","type":"error","v":1}"#,
            "unknown type: error",
        ),
    ] {
        let sim = if local_lm { &mut lm } else { &mut push };
        let e = refusal(sim, none, request);
        assert_eq!(e.error, text);
        assert_eq!(e.code, "unknown_type");
    }
}

#[test]
fn one_answer_per_request() {
    let mut sim = Sim::stub(ServerConfig::default());
    let p = sim.raw_connected();
    // A refused model_begin: one error, then silence for its chunks and commit.
    sim.send_json(p, &begin("{}", -1));
    assert_eq!(sim.one_error(p).error, "bad weights_len");
    sim.send_json(p, &chunk(0, false, &[1]));
    sim.send_json(p, &chunk(1, true, &[2]));
    sim.send_json(p, COMMIT);
    sim.assert_in_step(p);
    // A bad chunk: one error, then silence (Go answers each again).
    sim.send_json(p, &begin("{}", 8));
    sim.send_json(
        p,
        r#"{"v":1,"type":"weights_chunk","index":0,"data_b64":"!!!!"}"#,
    );
    assert_eq!(sim.one_error(p).error, "weights b64 decode");
    for i in 1..4 {
        sim.send_json(
            p,
            &format!(r#"{{"v":1,"type":"weights_chunk","index":{i},"data_b64":"!!!!"}}"#),
        );
    }
    sim.send_json(p, COMMIT);
    sim.assert_in_step(p);
    // The next model_begin starts afresh.
    sim.send_json(p, &begin("{}", 2));
    sim.send_json(p, &chunk(0, true, &[1, 2]));
    sim.send_json(p, COMMIT);
    assert_eq!(
        sim.one_frame(p),
        r#"{"v":1,"type":"model_status","ok":true,"message":"mounted"}"#
    );
    // A chunk with no upload: one error; the commit after it gets none.
    sim.send_json(p, &chunk(0, true, &[1]));
    let e = sim.one_error(p);
    assert_eq!(
        (e.error.as_str(), e.code.as_str()),
        ("weights_chunk without model_begin", "chunk_without_begin")
    );
    sim.send_json(p, COMMIT);
    sim.assert_in_step(p);
    // A model_begin in the middle of an upload starts over.
    sim.send_json(p, &begin("{}", 4));
    sim.send_json(p, &chunk(0, false, &[1, 2]));
    sim.send_json(p, &begin("{}", 3));
    sim.send_json(p, &chunk(0, true, &[1, 2, 3]));
    sim.send_json(p, COMMIT);
    assert_eq!(
        sim.one_frame(p),
        r#"{"v":1,"type":"model_status","ok":true,"message":"mounted"}"#
    );
}

#[test]
fn chunks_and_commit_on_a_local_lm_node_get_no_answer() {
    let mut sim = local_lm("/m/x");
    let p = sim.raw_connected();
    sim.send_json(p, &begin("{}", 4));
    assert_eq!(
        sim.one_error(p).error,
        "model_push not enabled on this node"
    );
    sim.send_json(p, &chunk(0, false, &[1, 2]));
    sim.send_json(p, &chunk(1, true, &[3, 4]));
    sim.send_json(p, COMMIT);
    sim.assert_in_step(p);
    // Even without a model_begin, and even out of order.
    sim.send_json(p, &chunk(5, true, &[3, 4]));
    sim.send_json(p, COMMIT);
    sim.assert_in_step(p);
}

// ---------------------------------------------------------------------------
// Jobs
// ---------------------------------------------------------------------------

#[test]
fn prompt_on_a_local_lm_node() {
    let mut sim = local_lm("/models/tiny.gguf");
    let p = sim.client();
    assert!(
        matches!(&sim.events(p)[..], [ClientEvent::Connected(h)] if h.local_lm_path == "/models/tiny.gguf")
    );
    let job = sim.client_core(p).prompt("  hello   world  ", 0).unwrap();
    sim.run();
    assert_eq!(
        sim.answer(p, job),
        Answer::Prompt(PromptResult {
            job_id: "p1".into(),
            ok: true,
            text: "[local_lm stub @ /models/tiny.gguf] stub says: hello world".into(),
            error: String::new(),
            code: String::new(),
            queue_depth: 0,
            ..Default::default()
        })
    );
    // infer is refused, and the client matches the refusal to it.
    let job = sim.client_core(p).infer(&[1], 1).unwrap();
    sim.run();
    assert_eq!(
        sim.answer(p, job),
        error_answer(
            "wrong_mode",
            "this node is local_lm; send prompt, not infer",
            "j2"
        )
    );
    // The Go client's prompt, byte for byte.
    let go = sim.raw_connected();
    sim.send_json(
        go,
        r#"{"v":1,"type":"prompt","job_id":"p1","prompt":"hello world"}"#,
    );
    assert_eq!(
        sim.frames(go),
        [
            r#"{"v":1,"type":"prompt_result","job_id":"p1","ok":true,"text":"[local_lm stub @ /models/tiny.gguf] stub says: hello world","queue_depth":0}"#
        ]
    );
}

#[test]
fn queue_full_with_capacity_2_and_2_workers() {
    let mut sim = Sim::stub(ServerConfig::default().queue_capacity(2).workers(2));
    sim.hold_jobs = true;
    let p = sim.client();
    sim.events(p);
    sim.mount(p);
    let running: Vec<RequestId> = (0..2)
        .map(|i| sim.client_core(p).infer(&[i], 1).unwrap())
        .collect();
    sim.run();
    assert_eq!(sim.held_jobs.len(), 2);
    let queued: Vec<RequestId> = (2..4)
        .map(|i| sim.client_core(p).infer(&[i], 1).unwrap())
        .collect();
    sim.run();
    assert_eq!(sim.held_jobs.len(), 2);
    assert!(sim.node.has_job());
    let status = sim.node.queue_status();
    assert_eq!(
        (status.depth, status.capacity, status.in_progress),
        (2, 2, true)
    );
    // The fifth is refused at once, by its job_id.
    let fifth = sim.client_core(p).infer(&[4], 1).unwrap();
    sim.run();
    assert_eq!(
        sim.answer(p, fifth),
        error_answer("queue_full", "queue full", "j6")
    );
    // Another connection is refused too: one queue for the whole node.
    let q = sim.raw_connected();
    sim.send_json(q, r#"{"v":1,"type":"prompt","job_id":"x"}"#);
    assert_eq!(
        sim.one_error(q).error,
        "this node is model_push; mount model and send infer"
    );
    // Finish a job: a queued one starts, and a slot opens.
    assert!(sim.finish(0));
    // Both arrived in one read, so one was still waiting when a worker took the first.
    assert_eq!(sim.answer(p, running[0]), infer_ok("j2", vec![0, 1], 1));
    assert_eq!(sim.held_jobs.len(), 2);
    assert_eq!(sim.node.queue_status().depth, 1);
    let sixth = sim.client_core(p).infer(&[5], 1).unwrap();
    sim.run();
    assert_eq!(sim.events(p), []);
    assert_eq!(sim.node.queue_status().depth, 2);
    while !sim.held_jobs.is_empty() {
        assert!(sim.finish(0));
    }
    let answered: Vec<RequestId> = sim
        .events(p)
        .into_iter()
        .map(|e| match e {
            ClientEvent::Answer {
                request,
                answer: Answer::Infer(r),
            } if r.ok => request,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(answered, [running[1], queued[0], queued[1], sixth]);
    assert_eq!(sim.client_core(p).outstanding(), 0);
}

#[test]
fn queue_depth_is_what_was_still_waiting() {
    let mut sim = Sim::stub(ServerConfig::default());
    sim.hold_jobs = true;
    let p = sim.client();
    sim.events(p);
    sim.mount(p);
    let jobs: Vec<RequestId> = (0..3)
        .map(|i| sim.client_core(p).infer(&[i], 1).unwrap())
        .collect();
    sim.run();
    assert_eq!(sim.held_jobs.len(), 1);
    assert_eq!(sim.held_jobs[0].queue_depth, 2);
    let mut depths = Vec::new();
    for job in jobs {
        sim.finish(0);
        match sim.answer(p, job) {
            Answer::Infer(r) => depths.push(r.queue_depth),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(depths, [2, 1, 0]);
}

#[test]
fn queue_status_reports_depth_capacity_and_in_progress() {
    let mut sim = Sim::stub(ServerConfig::default().queue_capacity(5));
    sim.hold_jobs = true;
    let p = sim.client();
    sim.events(p);
    sim.mount(p);
    let ask = |sim: &mut Sim<Stub>| {
        let request = sim.client_core(p).queue_status().unwrap();
        sim.run();
        match sim.client_core(p).take_answer(request).unwrap() {
            Answer::QueueStatus(s) => (s.depth, s.capacity, s.in_progress),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(ask(&mut sim), (0, 5, false));
    let jobs: Vec<RequestId> = (0..3)
        .map(|i| sim.client_core(p).infer(&[i], 1).unwrap())
        .collect();
    sim.run();
    assert_eq!(ask(&mut sim), (2, 5, true));
    sim.finish(0);
    assert_eq!(ask(&mut sim), (1, 5, true));
    sim.finish(0);
    sim.finish(0);
    assert_eq!(ask(&mut sim), (0, 5, false));
    assert_eq!(sim.events(p).len(), jobs.len());
    // A raw request is answered with every field, even the zero ones.
    let raw = sim.raw_connected();
    sim.send_json(raw, r#"{"v":1,"type":"queue_status"}"#);
    assert_eq!(
        sim.frames(raw),
        [r#"{"v":1,"type":"queue_status","depth":0,"capacity":5,"in_progress":false}"#]
    );
}

#[test]
fn pipelined_jobs_complete_out_of_order() {
    let mut sim = Sim::stub(ServerConfig::default().workers(3));
    sim.hold_jobs = true;
    let p = sim.client();
    sim.events(p);
    sim.mount(p);
    let a = sim.client_core(p).infer(&[10], 1).unwrap();
    let b = sim.client_core(p).infer(&[20], 2).unwrap();
    let c = sim.client_core(p).infer(&[30], 3).unwrap();
    sim.run();
    assert_eq!(sim.held_jobs.len(), 3);
    assert_eq!(sim.client_core(p).outstanding(), 3);
    let wakes = sim.wakes.len();
    assert!(sim.finish(2));
    // A delivered result wakes the connection's writer.
    assert_eq!(sim.wakes[wakes..], [sim.conn(p)]);
    assert!(sim.finish(0));
    assert!(sim.finish(0));
    let events = sim.events(p);
    assert_eq!(
        events,
        [
            ClientEvent::Answer {
                request: c,
                answer: infer_ok("j4", vec![30, 1, 2, 3], 0)
            },
            ClientEvent::Answer {
                request: a,
                answer: infer_ok("j2", vec![10, 1], 2)
            },
            ClientEvent::Answer {
                request: b,
                answer: infer_ok("j3", vec![20, 1, 2], 1)
            },
        ]
    );
    assert!(sim.client_error(p).is_none());
}

#[test]
fn job_errors_carry_job_id_and_code() {
    let mut sim = Sim::stub(ServerConfig::default());
    sim.hold_jobs = true;
    let p = sim.client();
    sim.events(p);
    // A refusal with two requests outstanding lands on the right one.
    sim.mount(p);
    let first = sim.client_core(p).infer(&[1], 1).unwrap();
    sim.run();
    let job = sim.held_jobs.pop().unwrap();
    // An executor error goes into the result with its code.
    assert!(sim.finish_with(job, Err(JobError::new("bad_input", "ids out of range"))));
    assert_eq!(
        sim.answer(p, first),
        Answer::Infer(InferResult {
            job_id: "j2".into(),
            ok: false,
            output_ids: vec![],
            error: "ids out of range".into(),
            code: "bad_input".into(),
            queue_depth: 0,
        })
    );
    // The wrong kind of output is a job error too.
    let second = sim.client_core(p).infer(&[1], 1).unwrap();
    sim.run();
    let job = sim.held_jobs.pop().unwrap();
    assert!(sim.finish_with(job, Ok(JobOutput::Prompt("text".into()))));
    match sim.answer(p, second) {
        Answer::Infer(r) => assert_eq!(
            (r.ok, r.code.as_str(), r.job_id.as_str()),
            (false, "bad_output", "j3")
        ),
        other => panic!("{other:?}"),
    }
    // A panicking executor.
    struct Panics;
    impl Executor for Panics {
        type Model = ();
        type Spool = NoSpool;
        fn mount(&self, _: String, _: Weights<NoSpool>) -> Result<(), String> {
            Ok(())
        }
        fn infer(
            &self,
            _: &(),
            _: &[i32],
            _: i64,
            _: &JobContext<'_>,
        ) -> Result<Vec<i32>, JobError> {
            panic!("executor bug (expected by this test)")
        }
        fn prompt(&self, _: &str, _: i64, _: &JobContext<'_>) -> Result<String, JobError> {
            unreachable!()
        }
    }
    let third = sim.client_core(p).infer(&[1], 1).unwrap();
    sim.run();
    let job = sim.held_jobs.pop().unwrap();
    let outcome = run_job(&Panics, &job);
    assert!(sim.finish_with(job, outcome));
    assert_eq!(
        sim.answer(p, third),
        Answer::Infer(InferResult {
            job_id: "j4".into(),
            ok: false,
            output_ids: vec![],
            error: "executor panicked".into(),
            code: "executor_panicked".into(),
            queue_depth: 0,
        })
    );
}

#[test]
fn refusals_are_matched_by_job_id_among_pipelined_jobs() {
    let mut sim = Sim::stub(ServerConfig::default().queue_capacity(1));
    sim.hold_jobs = true;
    let p = sim.client();
    sim.events(p);
    sim.mount(p);
    let a = sim.client_core(p).infer(&[1], 1).unwrap(); // running
    sim.run();
    let b = sim.client_core(p).infer(&[2], 1).unwrap(); // queued
    let c = sim.client_core(p).infer(&[3], 1).unwrap(); // refused
    sim.run();
    assert_eq!(
        sim.events(p),
        [ClientEvent::Answer {
            request: c,
            answer: error_answer("queue_full", "queue full", "j4")
        }]
    );
    sim.finish(0);
    sim.finish(0);
    assert_eq!(sim.answer(p, a), infer_ok("j2", vec![1, 1], 0));
    assert_eq!(sim.answer(p, b), infer_ok("j3", vec![2, 1], 0));
}

// ---------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------

#[test]
fn bad_bodies_are_answered_and_the_connection_keeps_working() {
    let mut sim = Sim::stub(ServerConfig::default());
    let p = sim.raw_connected();
    let cases: [(&[u8], &str, &str); 9] = [
        (b"{", "bad_json", ""),
        (b"not json at all", "bad_json", ""),
        (b"{\"type\":\"infer\",\"job_id\":\"j\xff\"}", "bad_json", ""),
        (b"[1,2,3]", "not_object", ""),
        (b"\"infer\"", "not_object", ""),
        (b"null", "not_object", ""),
        (br#"{"v":1,"type":"infer","job_id":7}"#, "bad_field", ""),
        // The job_id is kept when only another field is bad.
        (
            br#"{"v":1,"type":"infer","job_id":"j9","input_ids":"x"}"#,
            "bad_field",
            "j9",
        ),
        (
            br#"{"v":2,"type":"infer","job_id":"j8"}"#,
            "bad_version",
            "j8",
        ),
    ];
    for (body, code, job_id) in cases {
        let mut bytes = header(body.len() as u32).to_vec();
        bytes.extend_from_slice(body);
        sim.send(p, &bytes);
        let e = sim.one_error(p);
        assert_eq!(
            e.code,
            code,
            "{}: {}",
            String::from_utf8_lossy(body),
            e.error
        );
        assert_eq!(e.job_id, job_id);
        assert!(!e.error.is_empty());
        assert!(!sim.is_closed(p));
        assert!(sim.node.wants_read(sim.conn(p)));
    }
    assert_eq!(
        sim.node
            .connection(sim.conn(p))
            .unwrap()
            .closing()
            .map(|e| e.code()),
        None
    );
    sim.assert_in_step(p);
    // Still a working connection: a model goes up and a job runs.
    sim.send_json(p, &begin("{}", 1));
    sim.send_json(p, &chunk(0, true, &[1]));
    sim.send_json(p, COMMIT);
    assert!(sim.one_frame(p).contains(r#""ok":true"#));
    sim.send_json(
        p,
        r#"{"v":1,"type":"infer","job_id":"z","input_ids":[3],"max_tokens":1}"#,
    );
    assert_eq!(
        sim.one_frame(p),
        r#"{"v":1,"type":"infer_result","job_id":"z","ok":true,"output_ids":[3,1],"queue_depth":0}"#
    );
}

#[test]
fn framing_errors_close_the_connection_after_an_error_frame() {
    for (bad, len) in [(0u32, 0usize), (1025, 1025), (u32::MAX, u32::MAX as usize)] {
        let mut sim = Sim::stub(ServerConfig::default().max_frame_len(1024));
        let p = sim.raw_connected();
        // A good frame, then the bad header, in one write: the first is answered.
        let mut bytes = frame(r#"{"v":1,"type":"queue_status"}"#);
        bytes.extend_from_slice(&header(bad));
        bytes.extend_from_slice(b"{\"v\":1}");
        sim.send(p, &bytes);
        let frames = sim.frames(p);
        assert_eq!(frames.len(), 2, "{frames:?}");
        assert!(frames[0].contains("queue_status"));
        let e = match parse(&frames[1]) {
            Message::Error(e) => e,
            other => panic!("{other:?}"),
        };
        assert_eq!(e.code, "bad_frame");
        assert_eq!(
            e.error,
            format!("bad frame length {len} (must be 1..=1024)")
        );
        assert!(sim.is_closed(p));
        assert!(sim.node.connection(sim.conn(p)).is_none());
    }
    // Exactly max_frame_len is fine.
    let mut sim = Sim::stub(ServerConfig::default().max_frame_len(64));
    let p = sim.raw_connected();
    let pad = 64 - r#"{"v":1,"type":"queue_status","pad":""}"#.len();
    let body = format!(
        r#"{{"v":1,"type":"queue_status","pad":"{}"}}"#,
        "x".repeat(pad)
    );
    assert_eq!(body.len(), 64);
    sim.send_json(p, &body);
    assert!(sim.one_frame(p).contains("queue_status"));
    assert!(!sim.is_closed(p));
}

#[test]
fn input_after_a_framing_error_is_ignored() {
    let mut sim = Sim::stub(ServerConfig::default());
    sim.hold_jobs = true;
    let p = sim.raw_connected();
    let conn = sim.conn(p);
    // Keep the connection from being removed: stop reading so the harness leaves it.
    sim.set_reading(p, false);
    sim.node.handle_input(conn, &header(0), sim.now());
    assert!(sim.node.is_closing(conn));
    assert!(!sim.node.wants_read(conn));
    assert_eq!(
        sim.node.connection(conn).unwrap().closing().unwrap().code(),
        "bad_frame"
    );
    let pending = sim.node.connection(conn).unwrap().pending_transmit();
    sim.node
        .handle_input(conn, &frame(r#"{"v":1,"type":"queue_status"}"#), sim.now());
    assert_eq!(
        sim.node.connection(conn).unwrap().pending_transmit(),
        pending
    );
    // A closing connection has no timers.
    assert_eq!(sim.node.connection_timeout(conn), None);
}

// ---------------------------------------------------------------------------
// Timeouts, driven by the fake clock
// ---------------------------------------------------------------------------

fn timeouts() -> ServerConfig {
    ServerConfig::default()
        .handshake_timeout(10 * SECOND)
        .stall_timeout(5 * SECOND)
        .idle_timeout(Some(60 * SECOND))
        .backpressure_timeout(30 * SECOND)
}

#[test]
fn handshake_timeout() {
    let mut sim = Sim::stub(timeouts());
    let p = sim.raw_connected();
    assert_eq!(sim.node.poll_timeout(), Some(sim.at(10 * SECOND)));
    sim.advance(3 * SECOND);
    let q = sim.raw_connected();
    // The node's timeout is the earliest of its connections'.
    assert_eq!(
        sim.node.connection_timeout(sim.conn(q)),
        Some(sim.at(13 * SECOND))
    );
    assert_eq!(sim.node.poll_timeout(), Some(sim.at(10 * SECOND)));
    sim.advance(7 * SECOND - MS);
    assert_eq!(sim.frames(p), Vec::<String>::new());
    assert!(!sim.is_closed(p));
    let wakes = sim.wakes.len();
    sim.advance(MS);
    let e = sim.one_error(p);
    assert_eq!(
        (e.code.as_str(), e.error.as_str()),
        ("handshake_timeout", "handshake timeout")
    );
    assert!(sim.wakes[wakes..].contains(&sim.conn(p)));
    assert!(sim.is_closed(p));
    assert!(!sim.is_closed(q));
    assert_eq!(sim.node.poll_timeout(), Some(sim.at(13 * SECOND)));
    // Late: a timer that passed long ago fires on the next handle_timeout.
    sim.advance(100 * SECOND);
    assert_eq!(sim.one_error(q).code, "handshake_timeout");
    assert_eq!(sim.node.poll_timeout(), None);
}

#[test]
fn a_first_frame_ends_the_handshake_timer() {
    let mut sim = Sim::stub(timeouts().idle_timeout(None));
    let p = sim.raw_connected();
    sim.advance(9 * SECOND);
    sim.send_json(
        p,
        r#"{"v":1,"type":"hello","mode":"model_push","role":"client"}"#,
    );
    assert_eq!(sim.node.poll_timeout(), None);
    sim.advance(3600 * SECOND);
    assert!(!sim.is_closed(p));
    // Bytes that are not yet a frame do not count as a first frame.
    let q = sim.raw_connected();
    let deadline = sim.now() + 10 * SECOND;
    sim.send(q, &header(10));
    assert_eq!(sim.node.poll_timeout(), Some(sim.now() + 5 * SECOND));
    sim.advance(4 * SECOND);
    sim.send(q, b"{}");
    sim.advance(4 * SECOND);
    sim.send(q, b"{}");
    assert_eq!(sim.node.connection_timeout(sim.conn(q)), Some(deadline));
    sim.advance_to(deadline);
    assert_eq!(sim.one_error(q).code, "handshake_timeout");
}

#[test]
fn stall_timeout() {
    let mut sim = Sim::stub(timeouts());
    let p = sim.raw_connected();
    sim.send_json(p, r#"{"v":1,"type":"hello"}"#);
    // Half a frame, then a trickle that keeps it alive.
    let whole = frame(r#"{"v":1,"type":"queue_status"}"#);
    sim.advance(SECOND);
    sim.send(p, &whole[..3]);
    assert_eq!(sim.node.poll_timeout(), Some(sim.now() + 5 * SECOND));
    sim.advance(4 * SECOND);
    sim.send(p, &whole[3..10]);
    assert_eq!(sim.node.poll_timeout(), Some(sim.now() + 5 * SECOND));
    sim.advance(5 * SECOND - MS);
    assert!(!sim.is_closed(p));
    sim.advance(MS);
    let e = sim.one_error(p);
    assert_eq!(
        (e.code.as_str(), e.error.as_str()),
        ("stalled", "stalled in the middle of a frame")
    );
    assert!(sim.is_closed(p));
}

#[test]
fn idle_timeout() {
    let mut sim = Sim::stub(timeouts());
    sim.hold_jobs = true;
    let p = sim.client();
    sim.events(p);
    sim.mount(p);
    let conn = sim.conn(p);
    assert_eq!(
        sim.node.connection_timeout(conn),
        Some(sim.now() + 60 * SECOND)
    );
    sim.advance(50 * SECOND);
    // A job in flight: no idle timer, however long it runs.
    let job = sim.client_core(p).infer(&[1], 1).unwrap();
    sim.run();
    assert_eq!(sim.node.connection_timeout(conn), None);
    sim.advance(600 * SECOND);
    assert!(!sim.is_closed(p));
    sim.finish(0);
    assert!(matches!(sim.answer(p, job), Answer::Infer(r) if r.ok));
    // The idle timer counts from the last input again.
    let last_input = sim.at(50 * SECOND);
    assert_eq!(
        sim.node.connection_timeout(conn),
        Some(last_input + 60 * SECOND)
    );
    sim.advance(MS);
    assert_eq!(
        sim.events(p),
        [ClientEvent::Closing(ErrorFrame {
            code: "idle_timeout".into(),
            error: "idle timeout".into(),
            job_id: String::new(),
        })]
    );
    assert!(sim.is_closed(p));
}

#[test]
fn no_idle_timeout_when_disabled() {
    let mut sim = Sim::stub(timeouts().idle_timeout(None));
    let p = sim.client();
    assert_eq!(sim.node.poll_timeout(), None);
    sim.advance(1_000_000 * SECOND);
    assert!(!sim.is_closed(p));
}

#[test]
fn backpressure_closes_a_peer_that_stops_reading_without_a_frame() {
    let mut sim = Sim::stub(timeouts().max_outbound(300));
    let slow = sim.client();
    let fast = sim.client();
    sim.events(slow);
    sim.events(fast);
    sim.mount(slow);
    sim.mount(fast);
    let slow_conn = sim.conn(slow);
    sim.set_reading(slow, false);
    // Results pile up for the slow peer until its input is paused.
    let mut sent = 0;
    while sim.node.wants_read(slow_conn) {
        sim.client_core(slow).infer(&[1; 8], 8).unwrap();
        sent += 1;
        sim.run();
        // Meanwhile the other connection is served as usual.
        let job = sim.client_core(fast).infer(&[2], 1).unwrap();
        sim.run();
        assert!(matches!(sim.answer(fast, job), Answer::Infer(r) if r.ok));
        assert!(sent < 100);
    }
    let pending = sim.node.connection(slow_conn).unwrap().pending_transmit();
    assert!(pending >= 300, "{pending}");
    // Requests sent now wait (the adapter does not read them).
    sim.client_core(slow).infer(&[1], 1).unwrap();
    sim.run();
    assert!(sim.unread(slow) > 0);
    assert_eq!(
        sim.node.connection(slow_conn).unwrap().pending_transmit(),
        pending
    );
    let since = sim.now();
    assert_eq!(
        sim.node.connection_timeout(slow_conn),
        Some(since + 30 * SECOND)
    );
    sim.advance(30 * SECOND - MS);
    assert!(!sim.is_closed(slow));
    let job = sim.client_core(fast).infer(&[3], 1).unwrap();
    sim.run();
    assert!(matches!(sim.answer(fast, job), Answer::Infer(r) if r.ok));
    sim.advance(MS);
    // Closed, with nothing left to send: no error frame for a peer that is not reading.
    assert!(sim.is_closed(slow));
    assert!(sim.node.connection(slow_conn).is_none());
    assert_eq!(sim.events(slow), []);
    assert!(!sim.is_closed(fast));
}

#[test]
fn reading_again_in_time_clears_backpressure() {
    let mut sim = Sim::stub(timeouts().max_outbound(200));
    let p = sim.client();
    sim.events(p);
    sim.mount(p);
    let conn = sim.conn(p);
    sim.set_reading(p, false);
    let mut jobs = Vec::new();
    while sim.node.wants_read(conn) {
        jobs.push(sim.client_core(p).infer(&[1; 8], 8).unwrap());
        sim.run();
    }
    assert_eq!(
        sim.node.connection_timeout(conn),
        Some(sim.now() + 30 * SECOND)
    );
    sim.advance(29 * SECOND);
    sim.set_reading(p, true);
    sim.run();
    assert!(sim.node.wants_read(conn));
    assert_eq!(sim.node.connection_timeout(conn), Some(sim.at(60 * SECOND)));
    sim.advance(2 * SECOND);
    assert!(!sim.is_closed(p));
    for job in jobs {
        assert!(matches!(sim.answer(p, job), Answer::Infer(r) if r.ok));
    }
}

// ---------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------

#[test]
fn max_connections() {
    let mut sim = Sim::stub(ServerConfig::default().max_connections(2));
    let a = sim.raw_connected();
    let _b = sim.raw_connected();
    let c = sim.raw();
    let c_conn = sim.conn(c);
    assert!(sim.node.is_closing(c_conn));
    assert!(!sim.node.wants_read(c_conn));
    assert_eq!(sim.node.connection_timeout(c_conn), None);
    sim.run();
    // No hello: only the error frame, then the connection is closed.
    assert_eq!(
        sim.frames(c),
        [r#"{"code":"too_many_connections","error":"too many connections","type":"error","v":1}"#]
    );
    assert!(sim.is_closed(c));
    // The client core reports the refusal with the server's reason.
    let d = sim.client();
    assert!(
        matches!(sim.client_error(d), Some(ClientError::Refused(why)) if why == "too many connections")
    );
    assert!(sim.is_closed(d));
    // A slot frees up when a connection goes.
    sim.vanish(a);
    let e = sim.client();
    assert!(matches!(&sim.events(e)[..], [ClientEvent::Connected(_)]));
    assert_eq!(sim.node.connections().count(), 2);
}

#[test]
fn a_removed_connection_leaves_nothing_behind() {
    let mut sim = Sim::stub(ServerConfig::default());
    sim.hold_jobs = true;
    let gone = sim.client();
    let stays = sim.client();
    sim.events(gone);
    sim.events(stays);
    sim.mount(gone);
    sim.mount(stays);
    sim.client_core(gone).infer(&[1], 1).unwrap(); // running
    sim.client_core(gone).infer(&[2], 1).unwrap(); // queued
    sim.client_core(gone).infer(&[3], 1).unwrap(); // queued
    let kept = sim.client_core(stays).infer(&[4], 1).unwrap(); // queued
    sim.run();
    assert_eq!(sim.node.queue_status().depth, 3);
    let gone_conn = sim.conn(gone);
    sim.vanish(gone);
    assert!(sim.node.connection(gone_conn).is_none());
    assert!(sim.node.is_closing(gone_conn));
    assert!(!sim.node.wants_read(gone_conn));
    // Its queued jobs are dropped; the other connection's job stays.
    assert_eq!(sim.node.queue_status().depth, 1);
    assert!(sim.node.queue_status().in_progress);
    // Its running job's result is discarded.
    assert!(!sim.finish(0));
    // The other connection's job runs next.
    assert_eq!(sim.held_jobs.len(), 1);
    assert!(sim.finish(0));
    assert_eq!(sim.answer(stays, kept), infer_ok("j2", vec![4, 1], 0));
    assert!(!sim.node.has_job());
    // Input and removal for an unknown id are ignored.
    sim.node.handle_input(gone_conn, b"junk", sim.now());
    sim.node.remove(gone_conn);
    let mut out = Vec::new();
    sim.node.poll_transmit(gone_conn, &mut out);
    assert!(out.is_empty());
}

#[test]
fn a_mount_for_a_removed_connection_is_dropped() {
    let mut sim = Sim::stub(ServerConfig::default());
    sim.hold_mounts = true;
    let p = sim.client();
    sim.events(p);
    sim.send_upload(p, "{}", &[1], None);
    let mount = sim.held_mounts.pop().unwrap();
    sim.vanish(p);
    let outcome = run_mount(&sim.executor, mount);
    sim.node.mount_done(outcome, sim.now());
    sim.run();
    assert_eq!(sim.node.connections().count(), 0);
}

#[test]
fn streams_split_into_small_reads_give_the_same_session() {
    let mut sim = Sim::stub(ServerConfig::default());
    let raw = sim.raw();
    sim.split(raw, 1, 1);
    sim.run();
    assert!(sim.one_frame(raw).starts_with(r#"{"v":1,"type":"hello","#));
    sim.assert_in_step(raw);
    let p = sim.client();
    sim.events(p);
    sim.split(p, 3, 2);
    sim.mount(p);
    let job = sim.client_core(p).infer(&[9, 9], 3).unwrap();
    sim.run();
    assert_eq!(sim.answer(p, job), infer_ok("j2", vec![9, 9, 1, 2, 3], 0));
    assert!(sim.client_error(p).is_none());
}

#[test]
fn a_peer_that_vanishes_mid_upload_leaves_nothing_behind() {
    let mut sim = Sim::stub(ServerConfig::default());
    let gone = sim.client();
    let stays = sim.client();
    sim.events(gone);
    sim.events(stays);
    sim.split(gone, 100, usize::MAX);
    sim.upload(gone, "{}", &[7; 10_000], None).unwrap();
    for _ in 0..20 {
        sim.step();
    }
    let conn = sim.conn(gone);
    assert!(sim.unread(gone) > 0, "the upload is still under way");
    sim.vanish(gone);
    assert!(sim.is_closed(gone));
    assert!(sim.node.connection(conn).is_none());
    sim.run();
    sim.mount(stays);
    assert_eq!(sim.node.connections().count(), 1);
}

#[test]
fn peer_closed_flushes_what_is_queued_and_drops_later_results() {
    let mut sim = Sim::stub(ServerConfig::default());
    sim.hold_jobs = true;
    let p = sim.raw_connected();
    let conn = sim.conn(p);
    sim.send_json(p, &begin("{}", 1));
    sim.send_json(p, &chunk(0, true, &[1]));
    sim.send_json(p, COMMIT);
    sim.frames(p);
    sim.set_reading(p, false);
    sim.send_json(p, r#"{"v":1,"type":"queue_status"}"#);
    sim.send_json(p, r#"{"v":1,"type":"infer","job_id":"a","input_ids":[1]}"#);
    sim.node.peer_closed(conn);
    assert!(sim.node.is_closing(conn));
    // No error frame: the queue_status answer is all there is to flush.
    let pending = sim.node.connection(conn).unwrap().pending_transmit();
    sim.set_reading(p, true);
    sim.run();
    assert_eq!(!sim.received(p).is_empty(), pending > 0);
    let frames = sim.frames(p);
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert!(frames[0].starts_with(r#"{"v":1,"type":"queue_status""#));
    assert!(sim.is_closed(p));
    assert!(!sim.finish(0));
}

// ---------------------------------------------------------------------------
// Graceful shutdown
// ---------------------------------------------------------------------------

#[test]
fn graceful_shutdown() {
    let mut sim = Sim::stub(ServerConfig::default());
    sim.hold_jobs = true;
    let busy = sim.client();
    let idle = sim.client();
    let raw = sim.raw_connected();
    sim.events(busy);
    sim.events(idle);
    sim.mount(busy);
    sim.mount(idle);
    let running = sim.client_core(busy).infer(&[1], 1).unwrap();
    let queued = sim.client_core(busy).infer(&[2], 2).unwrap();
    sim.run();
    sim.node.begin_shutdown();
    sim.run();
    assert!(!sim.node.is_drained());
    assert!(!sim.is_closed(idle));
    // New jobs are refused, by job_id.
    let late = sim.client_core(idle).infer(&[3], 1).unwrap();
    sim.run();
    assert_eq!(
        sim.answer(idle, late),
        error_answer("shutting_down", "node shutting down", "j2")
    );
    // Other requests are still answered.
    sim.assert_in_step(raw);
    // New connections are refused.
    let newcomer = sim.raw();
    sim.run();
    let e = sim.one_error(newcomer);
    assert_eq!(
        (e.code.as_str(), e.error.as_str()),
        ("shutting_down", "node shutting down")
    );
    assert!(sim.is_closed(newcomer));
    // Running and queued jobs are delivered.
    assert!(sim.finish(0));
    assert_eq!(sim.answer(busy, running), infer_ok("j2", vec![1, 1], 1));
    assert!(!sim.is_closed(busy));
    assert_eq!(sim.held_jobs.len(), 1);
    assert!(sim.finish(0));
    assert_eq!(sim.answer(busy, queued), infer_ok("j3", vec![2, 1, 2], 0));
    // Then every connection closes, each told why.
    assert!(sim.node.is_drained());
    let closing = ClientEvent::Closing(ErrorFrame {
        code: "shutting_down".into(),
        error: "node shutting down".into(),
        job_id: String::new(),
    });
    assert_eq!(sim.events(busy), std::slice::from_ref(&closing));
    assert_eq!(sim.events(idle), [closing]);
    assert_eq!(sim.one_error(raw).code, "shutting_down");
    assert!(sim.is_closed(busy) && sim.is_closed(idle) && sim.is_closed(raw));
    assert_eq!(sim.node.connections().count(), 0);
}

#[test]
fn shutdown_with_nothing_running_closes_at_once() {
    let mut sim = Sim::stub(ServerConfig::default());
    let p = sim.client();
    sim.events(p);
    sim.node.begin_shutdown();
    assert!(sim.node.is_drained());
    sim.run();
    assert!(sim.is_closed(p));
    assert!(matches!(&sim.events(p)[..], [ClientEvent::Closing(e)] if e.code == "shutting_down"));
}

#[test]
fn shutdown_waits_for_a_mount() {
    let mut sim = Sim::stub(ServerConfig::default());
    sim.hold_mounts = true;
    let p = sim.client();
    sim.events(p);
    let request = sim.send_upload(p, "{}", &[1], None);
    sim.node.begin_shutdown();
    sim.run();
    assert!(!sim.node.is_drained());
    assert!(!sim.is_closed(p));
    let mount = sim.held_mounts.pop().unwrap();
    let outcome = run_mount(&sim.executor, mount);
    sim.node.mount_done(outcome, sim.now());
    sim.run();
    assert_eq!(sim.answer(p, request), status(true, "mounted"));
    assert!(matches!(&sim.events(p)[..], [ClientEvent::Closing(_)]));
    assert!(sim.is_closed(p));
}

// ---------------------------------------------------------------------------
// The client side, against hand-made server frames
// ---------------------------------------------------------------------------

const SERVER_HELLO: &str =
    r#"{"v":1,"type":"hello","mode":"model_push","role":"server","queue_capacity":64}"#;

fn connected_client(config: ClientConfig) -> ClientConnection {
    let mut client = ClientConnection::new(config);
    client.handle_input(&frame(SERVER_HELLO)).unwrap();
    assert!(matches!(
        client.poll_event(),
        Some(ClientEvent::Connected(_))
    ));
    let mut out = Vec::new();
    client.poll_transmit(&mut out);
    client
}

#[test]
fn client_matches_errors_without_job_id_to_the_oldest_request() {
    let mut client = connected_client(ClientConfig::default());
    let a = client.infer(&[1], 1).unwrap();
    let b = client.infer(&[2], 1).unwrap();
    // A Go node's error frame has no job_id.
    client
        .handle_input(&frame(r#"{"error":"queue full","type":"error","v":1}"#))
        .unwrap();
    assert_eq!(
        client.poll_event(),
        Some(ClientEvent::Answer {
            request: a,
            answer: error_answer("", "queue full", ""),
        })
    );
    client
        .handle_input(&frame(
            r#"{"v":1,"type":"infer_result","job_id":"j2","ok":true,"output_ids":[2,1],"queue_depth":0}"#,
        ))
        .unwrap();
    assert_eq!(
        client.poll_event(),
        Some(ClientEvent::Answer {
            request: b,
            answer: infer_ok("j2", vec![2, 1], 0),
        })
    );
    assert_eq!(client.outstanding(), 0);
    // A Go node does not know queue_status and refuses it at once, while a job
    // runs: the refusal (no job_id) answers the request that has no job_id.
    let job = client.infer(&[3], 1).unwrap();
    let ask = client.queue_status().unwrap();
    client
        .handle_input(&frame(
            r#"{"error":"unknown type: queue_status","type":"error","v":1}"#,
        ))
        .unwrap();
    assert_eq!(
        client.poll_event(),
        Some(ClientEvent::Answer {
            request: ask,
            answer: error_answer("", "unknown type: queue_status", ""),
        })
    );
    client
        .handle_input(&frame(
            r#"{"v":1,"type":"infer_result","job_id":"j3","ok":true,"output_ids":[3,1],"queue_depth":0}"#,
        ))
        .unwrap();
    assert!(
        matches!(client.poll_event(), Some(ClientEvent::Answer { request, .. }) if request == job)
    );
    // With nothing outstanding, an error frame announces the close.
    client
        .handle_input(&frame(
            r#"{"code":"idle_timeout","error":"idle timeout","type":"error","v":1}"#,
        ))
        .unwrap();
    assert_eq!(
        client.poll_event(),
        Some(ClientEvent::Closing(ErrorFrame {
            code: "idle_timeout".into(),
            error: "idle timeout".into(),
            job_id: String::new(),
        }))
    );
    assert_eq!(client.poll_event(), None);
}

#[test]
fn client_matches_an_upload_refusal_past_pipelined_jobs() {
    // A job is in flight when the next upload is refused: the error (which has no
    // job_id) answers the upload, and the job's result still finds its job.
    let mut sim = Sim::stub(ServerConfig::default().max_model_len(8));
    sim.hold_jobs = true;
    let p = sim.client();
    sim.events(p);
    sim.mount(p);
    let job = sim.client_core(p).infer(&[1], 1).unwrap();
    sim.run();
    let upload = sim.send_upload(p, "{}", &[0; 20], None);
    assert_eq!(
        sim.events(p),
        [ClientEvent::Answer {
            request: upload,
            answer: error_answer("bad_weights_len", "bad weights_len", ""),
        }]
    );
    assert!(!sim.client_core(p).is_uploading());
    assert!(sim.finish(0));
    assert_eq!(sim.answer(p, job), infer_ok("j2", vec![1, 1], 0));
    assert!(sim.client_error(p).is_none());
    assert_eq!(sim.client_core(p).outstanding(), 0);
}

#[test]
fn client_requires_hello_first() {
    let mut client = ClientConnection::default();
    assert_eq!(
        client.infer(&[1], 1),
        Err(ClientError::Misuse(ApiMisuse::NotConnected))
    );
    assert_eq!(
        client.queue_status(),
        Err(ClientError::Misuse(ApiMisuse::NotConnected))
    );
    assert_eq!(
        client.begin_upload("{}", 1, None),
        Err(ClientError::Misuse(ApiMisuse::NotConnected))
    );
    let err = client
        .handle_input(&frame(
            r#"{"v":1,"type":"infer_result","job_id":"j1","ok":true,"queue_depth":0}"#,
        ))
        .unwrap_err();
    assert_eq!(err, ClientError::NoHello("infer_result".into()));
    // Fatal: later input gets the same error, even a hello.
    assert_eq!(client.handle_input(&frame(SERVER_HELLO)), Err(err));
    assert_eq!(client.poll_event(), None);
    assert!(client.server_hello().is_none());
    let mut out = Vec::new();
    client.poll_transmit(&mut out);
    assert!(out.is_empty(), "no hello is sent back");
}

#[test]
fn client_rejects_frames_that_answer_nothing() {
    for body in [
        r#"{"v":1,"type":"model_status","ok":true,"message":"mounted"}"#,
        r#"{"v":1,"type":"infer_result","job_id":"j9","ok":true,"queue_depth":0}"#,
        r#"{"v":1,"type":"prompt_result","job_id":"p1","ok":true,"queue_depth":0}"#,
        r#"{"v":1,"type":"queue_status","depth":0,"capacity":1,"in_progress":false}"#,
        r#"{"v":1,"type":"infer","job_id":"j1"}"#,
        r#"{"v":1,"type":"hello","mode":"model_push","role":"server"}"#,
    ] {
        let mut client = connected_client(ClientConfig::default());
        client.infer(&[1], 1).unwrap();
        let err = client.handle_input(&frame(body)).unwrap_err();
        assert!(matches!(err, ClientError::Unexpected(_)), "{body}: {err:?}");
    }
    let mut client = connected_client(ClientConfig::default());
    let err = client.handle_input(&frame("[]")).unwrap_err();
    assert!(matches!(err, ClientError::BadMessage(_)), "{err:?}");
    let mut client = connected_client(ClientConfig::default());
    let err = client.handle_input(&header(0)).unwrap_err();
    assert!(matches!(
        err,
        ClientError::Frame(FrameError::BadLength { len: 0, .. })
    ));
    assert_eq!(
        client.handle_input(&frame(SERVER_HELLO)),
        Err(ClientError::Frame(FrameError::Failed))
    );
}

#[test]
fn client_upload_is_lazy_and_stops_when_refused() {
    let mut client = connected_client(ClientConfig::default().chunk_size(10).upload_window(30));
    assert_eq!(client.upload_wants(), 0);
    let request = client.begin_upload("{}", 100, None).unwrap();
    assert_eq!(
        client.begin_upload("{}", 1, None),
        Err(ClientError::Misuse(ApiMisuse::UploadInProgress))
    );
    assert!(client.is_uploading());
    // The begin frame alone is over the window: no chunk until it drains.
    assert!(client.pending_transmit() >= 30);
    assert_eq!(client.upload_wants(), 0);
    let mut out = Vec::new();
    client.poll_transmit(&mut out);
    assert_eq!(split_frames(&out), [begin("{}", 100)]);
    assert_eq!(client.upload_wants(), 10);
    client.upload_chunk(&[0; 10]).unwrap();
    assert_eq!(client.upload_wants(), 0);
    assert_eq!(
        client.upload_chunk(&[0; 91]),
        Err(ClientError::Misuse(ApiMisuse::UploadOverflow {
            len: 91,
            remaining: 90
        }))
    );
    assert!(matches!(
        client.upload_chunk(&[]),
        Err(ClientError::Misuse(ApiMisuse::UploadOverflow {
            len: 0,
            ..
        }))
    ));
    // The server refuses the upload mid-stream: the client stops sending it.
    client
        .handle_input(&frame(
            r#"{"code":"weights_overflow","error":"weights overflow","type":"error","v":1}"#,
        ))
        .unwrap();
    assert_eq!(
        client.poll_event(),
        Some(ClientEvent::Answer {
            request,
            answer: error_answer("weights_overflow", "weights overflow", ""),
        })
    );
    assert!(!client.is_uploading());
    assert_eq!(client.upload_wants(), 0);
    assert!(matches!(
        client.upload_chunk(&[1]),
        Err(ClientError::Misuse(ApiMisuse::UploadOverflow {
            remaining: 0,
            ..
        }))
    ));
    // No commit went out for it.
    let mut out = Vec::new();
    client.poll_transmit(&mut out);
    assert_eq!(split_frames(&out), [chunk(0, false, &[0; 10])]);
    // A new upload may start.
    client.begin_upload("{}", 1, None).unwrap();
}
