//! The seed corpora in `fuzz/corpus/<target>/`: valid sessions from docs/PROTOCOL.md's
//! examples and sessions recorded from a [`ClientConnection`](donate_proto::ClientConnection)
//! talking to a [`Node`](donate_proto::Node) in a [`Sim`], plus a few that reach the limits.
//!
//! `tests/corpus.rs` checks that the committed files match, and rewrites them
//! when `DONATE_FUZZ_WRITE_SEEDS=1`.

use donate_proto::frame::encode_frame;
use donate_proto::message::{
    ErrorFrame, Hello, InferResult, ModelStatus, PromptResult, QueueStatus,
};
use donate_proto::sim::Sim;
use donate_proto::{ApiMisuse, ClientConfig, ClientError, Message, Stub};

use crate::client::{ClientCfg, ClientOp, ClientScript};
use crate::common::variant_tag;
use crate::common::{frames, GO_CLIENT_EXAMPLES, GO_NODE_EXAMPLES};
use crate::decode;
use crate::roundtrip;
use crate::server::{Cfg, Op, Script, LM_PATH};

/// A request a recorded session makes, in the client target's terms.
#[derive(Debug, Clone, Copy)]
pub enum Action {
    /// Upload `len` bytes of 0xab.
    Upload(u8),
    /// Infer on ids `0..n` with `max_tokens`.
    Infer(u8, i8),
    /// Prompt of `n` times "word ".
    Prompt(u8),
    /// Ask for the queue's state.
    Queue,
}

impl Action {
    fn client_ops(self) -> Vec<ClientOp> {
        match self {
            Action::Upload(len) => vec![
                ClientOp::BeginUpload {
                    len: len.into(),
                    sha: false,
                },
                ClientOp::UploadChunk { len: 0 },
            ],
            Action::Infer(ids, max_tokens) => vec![ClientOp::Infer { ids, max_tokens }],
            Action::Prompt(len) => vec![ClientOp::Prompt { len }],
            Action::Queue => vec![ClientOp::QueueStatus],
        }
    }
}

/// A session between a client and a node, as bytes each way.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Everything the client sent.
    pub to_server: Vec<u8>,
    /// Everything the node sent.
    pub to_client: Vec<u8>,
    /// Length of the node's first frame (its `hello`).
    pub hello_len: usize,
}

/// Runs `actions` from a [`ClientConnection`] against a node with the [`Stub`]
/// in a [`Sim`], recording both streams.
pub fn record(cfg: &Cfg, actions: &[Action]) -> Recorded {
    let config = cfg.server_config();
    let stub = Stub::new(config.local_lm_path.clone());
    let mut sim = Sim::with_uploads(stub, config, cfg.uploads().handling());
    let p = sim.client_with(ClientConfig::default().chunk_size(256));
    for action in actions {
        let client = sim.client_core(p);
        match *action {
            Action::Upload(len) => {
                if client.begin_upload(r#"{"ok":true}"#, len.into(), None)
                    == Err(ClientError::Misuse(ApiMisuse::UploadInProgress))
                {
                    // One upload at a time: let the node answer the last one first.
                    sim.run();
                    sim.client_core(p)
                        .begin_upload(r#"{"ok":true}"#, len.into(), None)
                        .expect("connected");
                }
                // Every chunk now, ahead of the requests that follow.
                let client = sim.client_core(p);
                while client.upload_wants() > 0 {
                    let n = client.upload_wants();
                    client.upload_chunk(&vec![0xab; n]).expect("upload chunk");
                }
            }
            Action::Infer(ids, max_tokens) => {
                let ids: Vec<i32> = (0..(ids % 8) as i32).collect();
                client.infer(&ids, max_tokens.into()).expect("connected");
            }
            Action::Prompt(n) => {
                client
                    .prompt(&"word ".repeat(n as usize), 0)
                    .expect("connected");
            }
            Action::Queue => {
                client.queue_status().expect("connected");
            }
        }
    }
    sim.run();
    assert_eq!(sim.client_error(p), None, "the node's bytes are valid");
    let to_client = sim.received(p).to_vec();
    let hello_len = 4 + u32::from_le_bytes(to_client[..4].try_into().expect("a hello")) as usize;
    Recorded {
        to_server: sim.sent(p).to_vec(),
        to_client,
        hello_len,
    }
}

/// The model_push session the recorded seeds use.
pub const MODEL_PUSH_SESSION: [Action; 6] = [
    Action::Upload(4),
    Action::Infer(2, 3),
    Action::Queue,
    Action::Prompt(2),
    Action::Infer(0, 0),
    Action::Upload(0),
];

/// The local_lm session the recorded seeds use.
pub const LOCAL_LM_SESSION: [Action; 5] = [
    Action::Prompt(2),
    Action::Prompt(12),
    Action::Infer(1, 1),
    Action::Queue,
    Action::Upload(3),
];

fn one_of_each() -> Vec<u8> {
    let msgs = [
        Message::Hello(Hello {
            mode: "local_lm".into(),
            role: "server".into(),
            local_lm_path: LM_PATH.into(),
            queue_capacity: 2,
            capabilities: Vec::new(),
        }),
        Message::ModelStatus(ModelStatus {
            ok: false,
            message: "no config".into(),
        }),
        Message::InferResult(InferResult {
            job_id: "j2".into(),
            ok: false,
            error: "queue full".into(),
            code: "queue_full".into(),
            ..InferResult::default()
        }),
        Message::PromptResult(PromptResult {
            job_id: "p3".into(),
            ok: true,
            text: "[prompt stub] stub says: maybe".into(),
            queue_depth: 1,
            ..PromptResult::default()
        }),
        Message::QueueStatus(QueueStatus {
            depth: 1,
            capacity: 64,
            in_progress: true,
        }),
        Message::QueueStatusRequest,
        Message::ModelCommit,
        Message::Error(ErrorFrame {
            code: "wrong_mode".into(),
            error: "this node is local_lm; send prompt, not infer".into(),
            job_id: "j4".into(),
        }),
    ];
    crate::common::encode_all(&msgs)
}

/// Seeds of the `decode` target.
pub fn decode() -> Vec<(String, Vec<u8>)> {
    let mut seeds = vec![
        (
            "go-node-examples".to_owned(),
            decode::input(0, &[], &frames(GO_NODE_EXAMPLES)),
        ),
        (
            "go-client-examples".to_owned(),
            decode::input(0, &[], &frames(GO_CLIENT_EXAMPLES)),
        ),
        (
            "go-client-examples-split".to_owned(),
            decode::input(0, &[1, 3, 4, 60, 61, 200, 201], &frames(GO_CLIENT_EXAMPLES)),
        ),
        (
            "go-client-examples-max-100".to_owned(),
            decode::input(100, &[2, 90], &frames(GO_CLIENT_EXAMPLES)),
        ),
        (
            "one-of-each".to_owned(),
            decode::input(0, &[], &one_of_each()),
        ),
        (
            "zero-length".to_owned(),
            decode::input(0, &[], &[0, 0, 0, 0, b'{', b'}']),
        ),
        ("over-max".to_owned(), {
            let mut stream = Vec::new();
            encode_frame(br#"{"v":1,"type":"model_commit"}"#, &mut stream);
            stream.extend_from_slice(&65u32.to_le_bytes());
            stream.extend_from_slice(b"{\"v\":1");
            decode::input(64, &[5, 40], &stream)
        }),
        ("announces-64mib".to_owned(), {
            let mut stream = (64u32 << 20).to_le_bytes().to_vec();
            stream.extend_from_slice(br#"{"v":1,"type":"weights_chunk","index":0,"data_b64":""#);
            decode::input(0, &[2, 30], &stream)
        }),
        (
            "not-json".to_owned(),
            decode::input(
                0,
                &[],
                &frames(["[1,2]", "nul", "\"s\"", "{\"v\":2}", "{\"type\":7}"]),
            ),
        ),
    ];
    for (i, body) in GO_NODE_EXAMPLES
        .iter()
        .chain(&GO_CLIENT_EXAMPLES)
        .enumerate()
    {
        seeds.push((
            format!("example-{i}"),
            decode::input(0, &[], &frames([*body])),
        ));
    }
    for (name, cfg, actions) in recorded_sessions() {
        let rec = record(&cfg, &actions);
        seeds.push((
            format!("{name}-to-server"),
            decode::input(0, &[], &rec.to_server),
        ));
        seeds.push((
            format!("{name}-to-client"),
            decode::input(0, &[], &rec.to_client),
        ));
    }
    seeds
}

fn recorded_sessions() -> Vec<(&'static str, Cfg, Vec<Action>)> {
    vec![
        (
            "recorded-model-push",
            Cfg::roomy(false),
            MODEL_PUSH_SESSION.to_vec(),
        ),
        (
            "recorded-local-lm",
            Cfg::roomy(true),
            LOCAL_LM_SESSION.to_vec(),
        ),
    ]
}

/// Seeds of the `server` target (as builders, so tests can check how they read back).
pub fn server_scripts() -> Vec<(String, Script)> {
    let push = Cfg::roomy(false);
    let lm = Cfg::roomy(true);
    let go_client = frames(GO_CLIENT_EXAMPLES);
    let mut seeds = vec![
        (
            "go-client-session".to_owned(),
            Script::new(push.to_bytes())
                .op(Op::Accept)
                .input(0, &go_client)
                .op(Op::Pump),
        ),
        ("go-client-stepwise".to_owned(), {
            let mut s = Script::new(push.to_bytes())
                .op(Op::Accept)
                .op(Op::Transmit { conn: 0 })
                .input(0, &go_client);
            for _ in 0..12 {
                s = s
                    .op(Op::Feed { conn: 0, max: 37 })
                    .op(Op::PollEvents)
                    .op(Op::Mount { pick: 0, ok: true });
                s = s
                    .op(Op::NextJob)
                    .op(Op::Complete {
                        pick: 0,
                        outcome: 0,
                    })
                    .op(Op::Transmit { conn: 0 });
            }
            s
        }),
        (
            "go-client-local-lm".to_owned(),
            Script::new(lm.to_bytes())
                .op(Op::Accept)
                .input(0, &go_client)
                .op(Op::Pump),
        ),
        ("uploads-with-flaws".to_owned(), {
            let mut s = Script::new(push.to_bytes())
                .op(Op::Accept)
                .op(Op::SendHello { conn: 0 });
            for flaw in 0..10 {
                s = s.op(Op::SendUpload {
                    conn: 0,
                    len: 20 + flaw,
                    chunk: 6,
                    flaw,
                });
                s = s.op(Op::SendInfer {
                    conn: 0,
                    ids: flaw,
                    max_tokens: flaw as i8 - 2,
                });
                s = s.op(Op::Pump);
            }
            s
        }),
        ("two-clients-queue-full".to_owned(), {
            let mut cfg = push.clone();
            cfg.queue_capacity = 1;
            let mut s = Script::new(cfg.to_bytes()).op(Op::Accept).op(Op::Accept);
            for conn in 0..2 {
                s = s.op(Op::SendUpload {
                    conn,
                    len: 8,
                    chunk: 3,
                    flaw: 1,
                });
            }
            s = s.op(Op::Pump);
            for i in 0..6 {
                s = s.op(Op::SendInfer {
                    conn: i % 2,
                    ids: i,
                    max_tokens: 3,
                });
                s = s.op(Op::Feed {
                    conn: i % 2,
                    max: 0,
                });
            }
            s.op(Op::SendQueueStatus { conn: 0 })
                .op(Op::PollEvents)
                .op(Op::NextJob)
                .op(Op::Feed { conn: 0, max: 0 })
                .op(Op::Complete {
                    pick: 0,
                    outcome: 2,
                })
                .op(Op::Pump)
        }),
        ("local-lm-prompts".to_owned(), {
            let mut s = Script::new(lm.to_bytes())
                .op(Op::Accept)
                .op(Op::SendHello { conn: 0 });
            for which in 0..6 {
                s = s.op(Op::SendPrompt { conn: 0, which });
            }
            s.op(Op::SendInfer {
                conn: 0,
                ids: 2,
                max_tokens: 3,
            })
            .op(Op::SendUpload {
                conn: 0,
                len: 4,
                chunk: 1,
                flaw: 0,
            })
            .op(Op::SendQueueStatus { conn: 0 })
            .op(Op::Pump)
        }),
        ("timeouts".to_owned(), {
            let mut cfg = push.clone();
            cfg.handshake_ms = 100;
            cfg.stall_ms = 50;
            cfg.idle_ms = 300;
            let partial = &go_client[..10];
            Script::new(cfg.to_bytes())
                .op(Op::Accept)
                .op(Op::Accept)
                .op(Op::Accept)
                .input(0, partial)
                .op(Op::Feed { conn: 0, max: 0 })
                .input(1, &go_client[..go_client.len() / 2])
                .op(Op::Feed { conn: 1, max: 0 })
                .op(Op::Advance { ms: 60 })
                .op(Op::HandleTimeout)
                .op(Op::Advance { ms: 60 })
                .op(Op::HandleTimeout)
                .op(Op::Transmit { conn: 0 })
                .op(Op::Pump)
                .op(Op::Advance { ms: 400 })
                .op(Op::HandleTimeout)
                .op(Op::Pump)
        }),
        ("backpressure".to_owned(), {
            let mut cfg = push.clone();
            cfg.max_outbound = 300;
            cfg.backpressure_ms = 1000;
            let mut s = Script::new(cfg.to_bytes())
                .op(Op::Accept)
                .op(Op::Pause { conn: 0 });
            for _ in 0..8 {
                s = s
                    .op(Op::SendQueueStatus { conn: 0 })
                    .op(Op::Feed { conn: 0, max: 0 });
            }
            s.op(Op::Advance { ms: 999 })
                .op(Op::HandleTimeout)
                .op(Op::Advance { ms: 1 })
                .op(Op::HandleTimeout)
                .op(Op::Pump)
        }),
        ("shutdown-mid-job".to_owned(), {
            Script::new(push.to_bytes())
                .op(Op::Accept)
                .op(Op::SendUpload {
                    conn: 0,
                    len: 4,
                    chunk: 4,
                    flaw: 0,
                })
                .op(Op::Pump)
                .op(Op::SendInfer {
                    conn: 0,
                    ids: 2,
                    max_tokens: 3,
                })
                .op(Op::Feed { conn: 0, max: 0 })
                .op(Op::PollEvents)
                .op(Op::NextJob)
                .op(Op::Shutdown)
                .op(Op::SendInfer {
                    conn: 0,
                    ids: 1,
                    max_tokens: 1,
                })
                .op(Op::Feed { conn: 0, max: 0 })
                .op(Op::Accept)
                .op(Op::Complete {
                    pick: 0,
                    outcome: 0,
                })
                .op(Op::Transmit { conn: 0 })
                .op(Op::Transmit { conn: 1 })
        }),
        ("connection-limit".to_owned(), {
            let mut cfg = push.clone();
            cfg.max_connections = 0;
            Script::new(cfg.to_bytes())
                .op(Op::Accept)
                .op(Op::Accept)
                .op(Op::Transmit { conn: 1 })
                .op(Op::Remove { conn: 0 })
                .op(Op::Accept)
                .input(2, &go_client)
                .op(Op::Pump)
        }),
        ("mount-after-stall".to_owned(), {
            let mut cfg = push.clone();
            cfg.stall_ms = 10;
            Script::new(cfg.to_bytes())
                .op(Op::Accept)
                .op(Op::SendUpload {
                    conn: 0,
                    len: 4,
                    chunk: 4,
                    flaw: 0,
                })
                .input(0, &[9, 0])
                .op(Op::Feed { conn: 0, max: 0 })
                .op(Op::PollEvents)
                .op(Op::Advance { ms: 20 })
                .op(Op::HandleTimeout)
                .op(Op::Mount { pick: 0, ok: false })
                .op(Op::Pump)
        }),
        ("mount-after-peer-closed".to_owned(), {
            Script::new(push.to_bytes())
                .op(Op::Accept)
                .op(Op::SendUpload {
                    conn: 0,
                    len: 4,
                    chunk: 4,
                    flaw: 0,
                })
                .op(Op::SendInfer {
                    conn: 0,
                    ids: 1,
                    max_tokens: 1,
                })
                .op(Op::Feed { conn: 0, max: 0 })
                .op(Op::PollEvents)
                .op(Op::PeerClosed { conn: 0 })
                .op(Op::Mount { pick: 0, ok: true })
                .op(Op::Pump)
        }),
        ("stream-not-reading".to_owned(), {
            // Offers `stream`; four connections; little room to send.
            let mut cfg = lm.clone();
            cfg.max_connections = 7;
            cfg.max_outbound = 600;
            let bad_ids: Vec<u8> = ["x".repeat(300), "p\u{1}".to_owned()]
                .into_iter()
                .flat_map(|job_id| {
                    let mut out = Vec::new();
                    Message::Prompt(donate_proto::message::Prompt {
                        job_id,
                        prompt: "hi".to_owned(),
                        ..Default::default()
                    })
                    .encode(&mut out);
                    out
                })
                .collect();
            let mut s = Script::new(cfg.to_bytes())
                .op(Op::Accept)
                .op(Op::Accept)
                .op(Op::SendHello { conn: 0 })
                .op(Op::SendHello { conn: 0x81 })
                .op(Op::Pause { conn: 0 })
                .input(0, &bad_ids);
            for conn in [0, 0, 1] {
                s = s.op(Op::SendPrompt { conn, which: 0 });
            }
            s = s
                .op(Op::Feed { conn: 0, max: 0 })
                .op(Op::Feed { conn: 1, max: 0 })
                .op(Op::PollEvents);
            for outcome in [4 * 60, 4 * 60 + 3, 4 * 60 + 1] {
                s = s.op(Op::NextJob).op(Op::Complete { pick: 0, outcome });
            }
            s.op(Op::Pause { conn: 0 }).op(Op::Pump)
        }),
    ];
    for (name, cfg, actions) in recorded_sessions() {
        let rec = record(&cfg, &actions);
        seeds.push((
            name.to_owned(),
            Script::new(cfg.to_bytes())
                .op(Op::Accept)
                .input(0, &rec.to_server)
                .op(Op::Pump),
        ));
    }
    seeds
}

/// Seeds of the `server` target.
pub fn server() -> Vec<(String, Vec<u8>)> {
    server_scripts()
        .into_iter()
        .map(|(n, s)| (n, s.bytes()))
        .collect()
}

/// Seeds of the `client` target (as builders).
pub fn client_scripts() -> Vec<(String, ClientScript)> {
    let cfg = ClientCfg {
        max_frame_len: 0,
        chunk_size: 255,
        upload_window: u16::MAX,
    };
    let node = frames(GO_NODE_EXAMPLES);
    let hello_len = 4 + GO_NODE_EXAMPLES[0].len();
    let mut seeds = vec![
        (
            "go-node-examples".to_owned(),
            ClientScript::new(cfg.to_bytes())
                .input(0, &node[..hello_len])
                .op(ClientOp::Infer {
                    ids: 2,
                    max_tokens: 3,
                })
                .op(ClientOp::Transmit)
                .input(0, &node[hello_len..])
                .op(ClientOp::Events),
        ),
        ("answers".to_owned(), {
            let mut s = ClientScript::new(cfg.to_bytes())
                .op(ClientOp::ServerHello { local_lm: false })
                .op(ClientOp::BeginUpload {
                    len: 600,
                    sha: true,
                });
            for _ in 0..3 {
                s = s
                    .op(ClientOp::UploadChunk { len: 0 })
                    .op(ClientOp::Transmit);
            }
            s = s
                .op(ClientOp::Infer {
                    ids: 1,
                    max_tokens: 0,
                })
                .op(ClientOp::Prompt { len: 3 })
                .op(ClientOp::QueueStatus);
            for kind in 0..7 {
                s = s.op(ClientOp::Answer {
                    kind,
                    pick: kind,
                    ok: kind % 2 == 0,
                });
            }
            s.op(ClientOp::Transmit).op(ClientOp::Events)
        }),
        (
            "huge-upload".to_owned(),
            ClientScript::new(cfg.to_bytes())
                .input(0, &node[..hello_len])
                .op(ClientOp::BeginHugeUpload { below_max: 0 })
                .op(ClientOp::UploadChunk { len: 100 })
                .op(ClientOp::Transmit),
        ),
        (
            "no-hello".to_owned(),
            ClientScript::new(cfg.to_bytes())
                .op(ClientOp::Infer {
                    ids: 1,
                    max_tokens: 1,
                })
                .input(0, &node[hello_len..])
                .input(0, &node[..hello_len]),
        ),
    ];
    for (name, server_cfg, actions) in recorded_sessions() {
        let rec = record(&server_cfg, &actions);
        let mut s = ClientScript::new(cfg.to_bytes()).input(0, &rec.to_client[..rec.hello_len]);
        for action in &actions {
            for op in action.client_ops() {
                s = s.op(op);
            }
        }
        s = s
            .op(ClientOp::Transmit)
            .input(0, &rec.to_client[rec.hello_len..])
            .op(ClientOp::Events);
        seeds.push((name.to_owned(), s));
    }
    seeds
}

/// Seeds of the `client` target.
pub fn client() -> Vec<(String, Vec<u8>)> {
    client_scripts()
        .into_iter()
        .map(|(n, s)| (n, s.bytes()))
        .collect()
}

/// Seeds of the `roundtrip` target: each message type, then all of them.
pub fn roundtrip() -> Vec<(String, Vec<u8>)> {
    let mut all = Vec::new();
    let mut seeds = Vec::new();
    for i in 0..roundtrip::VARIANTS {
        let mut one = variant_tag(i, roundtrip::VARIANTS).to_vec();
        one.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 1, 2]);
        all.extend_from_slice(&one);
        seeds.push((format!("variant-{i}"), one));
    }
    seeds.push(("all-variants".to_owned(), all));
    seeds
}

/// Store sessions after the opted-in hello: queries, uses, a resumed upload,
/// and jobs behind a use (no split points).
pub fn store() -> Vec<(String, Vec<u8>)> {
    let frames = |bodies: &[String]| {
        let mut out = vec![0u8];
        for body in bodies {
            donate_proto::frame::encode_frame(body.as_bytes(), &mut out);
        }
        out
    };
    let (even, odd) = ("00".repeat(32), "01".repeat(32));
    vec![
        (
            "query-and-use".to_owned(),
            frames(&[
                format!(r#"{{"v":1,"type":"model_query","hashes":["{even}","{odd}"]}}"#),
                format!(
                    r#"{{"v":1,"type":"model_use","config_json":"{{}}","weights_sha256":"{even}"}}"#
                ),
                r#"{"v":1,"type":"infer","job_id":"a","input_ids":[1],"max_tokens":2}"#.to_owned(),
                format!(
                    r#"{{"v":1,"type":"model_use","config_json":"{{}}","weights_sha256":"{odd}"}}"#
                ),
                r#"{"v":1,"type":"model_query","hashes":[]}"#.to_owned(),
            ]),
        ),
        (
            "resume".to_owned(),
            frames(&[
                format!(
                    r#"{{"v":1,"type":"model_begin","config_json":"{{}}","weights_len":8,"weights_sha256":"{even}","offset":4}}"#
                ),
                r#"{"v":1,"type":"weights_chunk","index":0,"last":true,"data_b64":"AQIDBA=="}"#
                    .to_owned(),
                r#"{"v":1,"type":"model_commit"}"#.to_owned(),
            ]),
        ),
    ]
}

/// Seeds of the `gguf` target: each base model as a raw file and as the
/// structured mode's base, loaded from memory and from a file (and, with a
/// tokenizer, as a `local_lm` model); then a few edits of them.
pub fn gguf() -> Vec<(String, Vec<u8>)> {
    use crate::gguf::{Body, Edit, Input, Val, BASES, BY_MAGIC, FROM_FILE, LOCAL_LM, STRUCTURED};
    // max_context 64.
    let ctx = 2;
    let mut seeds = Vec::new();
    for (i, name) in BASES.iter().enumerate() {
        let file = crate::gguf::base(i as u8).bytes();
        let raw = Input {
            mode: FROM_FILE | LOCAL_LM,
            ctx,
            body: Body::Raw(file),
        };
        seeds.push((format!("raw-{name}"), raw.to_bytes()));
        let structured = Input {
            mode: STRUCTURED | FROM_FILE | LOCAL_LM,
            ctx,
            body: Body::Structured {
                base: i as u8,
                edits: Vec::new(),
            },
        };
        seeds.push((format!("structured-{name}"), structured.to_bytes()));
    }
    let edited = |mode: u8, base: u8, edits: Vec<Edit>| {
        Input {
            mode: STRUCTURED | mode,
            ctx,
            body: Body::Structured { base, edits },
        }
        .to_bytes()
    };
    // Keys by their index in gguf::KEYS.
    let (rope_dim, context, alignment, experts) = (9, 12, 1, 13);
    seeds.extend([
        (
            "version-1".to_owned(),
            edited(LOCAL_LM, 0, vec![Edit::Version { version: 1 }]),
        ),
        ("by-magic".to_owned(), edited(BY_MAGIC, 4, Vec::new())),
        (
            "partial-rope".to_owned(),
            edited(
                0,
                0,
                vec![Edit::Set {
                    key: rope_dim,
                    value: Val::U32(2),
                }],
            ),
        ),
        (
            "long-context".to_owned(),
            edited(
                0,
                5,
                vec![Edit::Set {
                    key: context,
                    value: Val::U32(1 << 18),
                }],
            ),
        ),
        (
            "moe-experts-huge".to_owned(),
            edited(
                0,
                3,
                vec![Edit::Set {
                    key: experts,
                    value: Val::U32(u32::MAX),
                }],
            ),
        ),
        (
            // blk.0.attn_k.weight of 2 rows, not 4 (one KV head of 4).
            "short-keys".to_owned(),
            edited(
                0,
                0,
                vec![
                    Edit::Dims {
                        tensor: 3,
                        dims: vec![2, 8],
                    },
                    Edit::Fit { tensor: 3, fill: 1 },
                ],
            ),
        ),
        (
            "alignment-zero".to_owned(),
            edited(
                FROM_FILE,
                0,
                vec![Edit::Set {
                    key: alignment,
                    value: Val::U32(0),
                }],
            ),
        ),
    ]);
    seeds
}

/// Every target's seeds: (target, name, bytes).
pub fn all() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    for (target, seeds) in [
        ("decode", decode()),
        ("server", server()),
        ("client", client()),
        ("roundtrip", roundtrip()),
        ("store", store()),
        ("gguf", gguf()),
    ] {
        out.extend(seeds.into_iter().map(|(n, b)| (target, n, b)));
    }
    out
}

/// Runs the harness of `target` on `data`.
pub fn run(target: &str, data: &[u8]) {
    match target {
        "decode" => crate::decode::run(data),
        "server" => crate::server::run(data),
        "client" => crate::client::run(data),
        "roundtrip" => crate::roundtrip::run(data),
        "secure" => crate::secure::run(data),
        "store" => crate::store::run(data),
        "gguf" => crate::gguf::run(data),
        other => panic!("no target {other}"),
    }
}
