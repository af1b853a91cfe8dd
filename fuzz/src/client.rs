//! `client`: a [`ClientConnection`] fed arbitrary server bytes, with requests
//! made through its API in between.
//!
//! Input layout: a [`ClientCfg`], then [`ClientOp`]s until the input ends; an
//! [`ClientOp::Input`] is followed by the raw server bytes it feeds.
//!
//! Asserted: no panic; once `handle_input` fails it keeps failing; every byte
//! the client transmits is a whole, canonically encoded frame of a client →
//! server type, its `hello` first; an upload's chunks are numbered 0, 1, 2…,
//! never carry more than `weights_len` bytes, `last` is set on the final one and
//! the commit follows only a complete upload; every answer names a request that
//! was made and is the only answer to it; `outstanding()` counts the rest.

use std::collections::HashSet;

use arbitrary::Arbitrary;
use base64::Engine as _;
use donate_proto::frame::{FrameDecoder, DEFAULT_MAX_FRAME_LEN};
use donate_proto::message::{
    ErrorFrame, Hello, InferResult, ModelStatus, PromptResult, QueueStatus,
};
use donate_proto::{Answer, ClientConfig, ClientConnection, ClientEvent, Message, RequestId};

use crate::common::{is_client_message, variant_tag, Step, Steps};

/// The client's configuration, as the fuzzer picks it.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct ClientCfg {
    /// Largest frame body from the server (0: the 64 MiB default).
    pub max_frame_len: u16,
    /// Raw bytes per chunk: 1 + this.
    pub chunk_size: u8,
    /// Upload window: 1 + this.
    pub upload_window: u16,
}

impl ClientCfg {
    /// The [`ClientConfig`].
    pub fn client_config(&self) -> ClientConfig {
        ClientConfig::default()
            .max_frame_len(match self.max_frame_len {
                0 => DEFAULT_MAX_FRAME_LEN,
                n => n.into(),
            })
            .chunk_size(1 + self.chunk_size as usize)
            .upload_window(1 + self.upload_window as usize)
    }

    /// The bytes `ClientCfg::arbitrary` reads back as `self`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.max_frame_len.to_le_bytes().to_vec();
        out.push(self.chunk_size);
        out.extend_from_slice(&self.upload_window.to_le_bytes());
        out
    }
}

/// One step of a client script.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum ClientOp {
    /// Feed the next `len` input bytes as server bytes.
    Input {
        /// Bytes that follow.
        len: u16,
    },
    /// Feed a server `hello`.
    ServerHello {
        /// `local_lm` instead of `model_push`.
        local_lm: bool,
    },
    /// Feed a well-formed server frame answering (or not) an outstanding request.
    Answer {
        /// Which frame type.
        kind: u8,
        /// Which outstanding request it names.
        pick: u8,
        /// Its `ok`.
        ok: bool,
    },
    /// `infer()`.
    Infer {
        /// Input ids, mod 8.
        ids: u8,
        /// `max_tokens`.
        max_tokens: i8,
    },
    /// `prompt()`.
    Prompt {
        /// Prompt length.
        len: u8,
    },
    /// `queue_status()`.
    QueueStatus,
    /// `begin_upload()`.
    BeginUpload {
        /// `weights_len`.
        len: u16,
        /// With a hash.
        sha: bool,
    },
    /// `upload_chunk()` with `len` mod 4096 bytes (0: what `upload_wants` says).
    UploadChunk {
        /// Bytes.
        len: u16,
    },
    /// `poll_transmit()`, checking what the client sends.
    Transmit,
    /// `poll_event()` until empty, checking the answers.
    Events,
    /// `begin_upload()` of `u64::MAX - below_max` bytes, more than `weights_len` can say.
    BeginHugeUpload {
        /// Distance from `u64::MAX`.
        below_max: u16,
    },
}

const CLIENT_OP_VARIANTS: u64 = 11;

impl Step for ClientOp {
    fn payload_len(&self) -> Option<usize> {
        match *self {
            ClientOp::Input { len } => Some(len.into()),
            _ => None,
        }
    }

    fn input(_: u8, len: u16) -> Self {
        ClientOp::Input { len }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let (index, fields): (u64, Vec<u8>) = match *self {
            ClientOp::Input { len } => (0, len.to_le_bytes().to_vec()),
            ClientOp::ServerHello { local_lm } => (1, vec![local_lm as u8]),
            ClientOp::Answer { kind, pick, ok } => (2, vec![kind, pick, ok as u8]),
            ClientOp::Infer { ids, max_tokens } => (3, vec![ids, max_tokens as u8]),
            ClientOp::Prompt { len } => (4, vec![len]),
            ClientOp::QueueStatus => (5, vec![]),
            ClientOp::BeginUpload { len, sha } => {
                (6, [&len.to_le_bytes()[..], &[sha as u8]].concat())
            }
            ClientOp::UploadChunk { len } => (7, len.to_le_bytes().to_vec()),
            ClientOp::Transmit => (8, vec![]),
            ClientOp::Events => (9, vec![]),
            ClientOp::BeginHugeUpload { below_max } => (10, below_max.to_le_bytes().to_vec()),
        };
        let mut out = variant_tag(index, CLIENT_OP_VARIANTS).to_vec();
        out.extend(fields);
        out
    }
}

/// Builds client-target inputs (for seeds): `ClientScript::new(cfg.to_bytes())`;
/// its inputs' `to` is ignored.
pub type ClientScript = crate::common::Script<ClientOp>;

/// Reads a client script.
pub fn parse(data: &[u8]) -> Option<(ClientCfg, Steps<'_, ClientOp>)> {
    crate::common::parse(data)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Upload,
    Infer,
    Prompt,
    Queue,
}

/// What the client is known to have asked and been answered.
struct Harness {
    client: ClientConnection,
    failed: Option<donate_proto::ClientError>,
    connected: bool,
    /// Requests made and not answered, in order: (request, kind, job_id).
    outstanding: Vec<(RequestId, Kind, String)>,
    answered: HashSet<RequestId>,
    issued: HashSet<RequestId>,
    /// Client → server stream as the server would read it.
    wire: FrameDecoder,
    sent_hello: bool,
    /// The upload the client is sending: (weights_len, bytes sent, next index).
    upload: Option<(u64, u64, i64)>,
}

/// The `client` target.
pub fn run(data: &[u8]) {
    let Some((cfg, ops)) = parse(data) else {
        return;
    };
    let mut h = Harness {
        client: ClientConnection::new(cfg.client_config()),
        failed: None,
        connected: false,
        outstanding: Vec::new(),
        answered: HashSet::new(),
        issued: HashSet::new(),
        wire: FrameDecoder::new(DEFAULT_MAX_FRAME_LEN),
        sent_hello: false,
        upload: None,
    };
    let trace = std::env::var_os("DONATE_FUZZ_TRACE").is_some();
    for (op, payload) in ops {
        if trace {
            eprintln!("{op:?} {:?}", String::from_utf8_lossy(payload));
        }
        h.step(&op, payload);
    }
    h.step(&ClientOp::Transmit, &[]);
    h.step(&ClientOp::Events, &[]);
}

impl Harness {
    fn step(&mut self, op: &ClientOp, payload: &[u8]) {
        match *op {
            ClientOp::Input { .. } => self.input(payload),
            ClientOp::ServerHello { local_lm } => {
                let mode = if local_lm { "local_lm" } else { "model_push" };
                self.server(&Message::Hello(Hello {
                    mode: mode.to_owned(),
                    role: "server".to_owned(),
                    local_lm_path: String::new(),
                    queue_capacity: 64,
                    capabilities: Vec::new(),
                }));
            }
            ClientOp::Answer { kind, pick, ok } => self.answer(kind, pick, ok),
            ClientOp::Infer { ids, max_tokens } => {
                let ids: Vec<i32> = (0..(ids % 8) as i32).collect();
                let r = self.client.infer(&ids, max_tokens.into());
                self.made(r, Kind::Infer, "j");
            }
            ClientOp::Prompt { len } => {
                let text = "word ".repeat(len as usize);
                let r = self.client.prompt(&text, 0);
                self.made(r, Kind::Prompt, "p");
            }
            ClientOp::QueueStatus => {
                let r = self.client.queue_status();
                self.made(r, Kind::Queue, "");
            }
            ClientOp::BeginUpload { len, sha } => {
                let was_uploading = self.client.is_uploading();
                let hash = sha.then_some([7u8; 32]);
                let r = self.client.begin_upload(r#"{"ok":true}"#, len.into(), hash);
                if was_uploading {
                    assert!(r.is_err(), "a second upload began while one was sending");
                }
                self.made(r, Kind::Upload, "");
            }
            ClientOp::BeginHugeUpload { below_max } => {
                let r = self
                    .client
                    .begin_upload("{}", u64::MAX - u64::from(below_max), None);
                self.made(r, Kind::Upload, "");
            }
            ClientOp::UploadChunk { len } => {
                let wants = self.client.upload_wants();
                let n = if len == 0 { wants } else { len as usize % 4096 };
                let data = vec![0xab; n];
                let uploading = self.client.is_uploading();
                let r = self.client.upload_chunk(&data);
                if !uploading || n == 0 {
                    assert!(r.is_err(), "a chunk accepted with no upload or no bytes");
                }
            }
            ClientOp::Transmit => self.transmit(),
            ClientOp::Events => self.events(),
        }
        assert_eq!(
            self.client.outstanding(),
            self.outstanding.len(),
            "outstanding() disagrees"
        );
    }

    fn made(&mut self, r: Result<RequestId, donate_proto::ClientError>, kind: Kind, prefix: &str) {
        if let Ok(request) = r {
            assert!(
                self.client.server_hello().is_some(),
                "request made before the hello"
            );
            assert!(self.issued.insert(request), "request id reused");
            let job_id = if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}{}", request.as_u64())
            };
            self.outstanding.push((request, kind, job_id));
        }
    }

    fn server(&mut self, msg: &Message<'_>) {
        let mut bytes = Vec::new();
        msg.encode(&mut bytes);
        self.input(&bytes);
    }

    fn answer(&mut self, kind: u8, pick: u8, ok: bool) {
        let (job_id, _) = match self.outstanding.len() {
            0 => ("j999".to_owned(), Kind::Infer),
            n => {
                let (_, k, id) = &self.outstanding[pick as usize % n];
                (id.clone(), *k)
            }
        };
        let error = if ok { String::new() } else { "no".to_owned() };
        let msg = match kind % 7 {
            0 => Message::ModelStatus(ModelStatus {
                ok,
                message: if ok { "mounted".to_owned() } else { error },
            }),
            1 => Message::InferResult(InferResult {
                job_id,
                ok,
                output_ids: vec![1, 2, 3],
                error,
                ..InferResult::default()
            }),
            2 => Message::PromptResult(PromptResult {
                job_id,
                ok,
                text: "stub says: hi".to_owned(),
                error,
                ..PromptResult::default()
            }),
            3 => Message::QueueStatus(QueueStatus {
                depth: 1,
                capacity: 64,
                in_progress: ok,
            }),
            4 => Message::Error(ErrorFrame {
                code: "queue_full".to_owned(),
                error: "queue full".to_owned(),
                job_id,
            }),
            5 => Message::Error(ErrorFrame {
                code: String::new(),
                error: "model not mounted".to_owned(),
                job_id: String::new(),
            }),
            _ => Message::Hello(Hello {
                mode: "model_push".to_owned(),
                role: "server".to_owned(),
                ..Hello::default()
            }),
        };
        self.server(&msg);
    }

    fn input(&mut self, data: &[u8]) {
        let r = self.client.handle_input(data);
        if let Some(e) = &self.failed {
            assert!(r.is_err(), "input accepted after the error {e}");
        }
        if let Err(e) = r {
            self.failed.get_or_insert(e);
        }
        self.events();
    }

    fn transmit(&mut self) {
        let mut out = Vec::new();
        self.client.poll_transmit(&mut out);
        assert_eq!(self.client.pending_transmit(), 0);
        let mut bodies = Vec::new();
        self.wire
            .feed(&out, |b| bodies.push(b.to_vec()))
            .expect("client sent a bad frame header");
        assert!(!self.wire.has_partial(), "client sent part of a frame");
        for body in bodies {
            self.on_sent(&body);
        }
    }

    fn on_sent(&mut self, body: &[u8]) {
        let text = String::from_utf8_lossy(body);
        let msg = Message::parse(body).unwrap_or_else(|e| panic!("client sent {text}: {e}"));
        assert!(
            is_client_message(&msg),
            "client sent a {} frame",
            msg.kind()
        );
        assert_eq!(msg.to_json(), body, "not canonically encoded: {text}");
        if !self.sent_hello {
            match &msg {
                Message::Hello(h) => {
                    assert_eq!(h.role, "client");
                    let server = self
                        .client
                        .server_hello()
                        .expect("hello sent before the server's");
                    assert_eq!(h.mode, server.mode, "client hello does not echo the mode");
                }
                other => panic!("client sent {} before its hello", other.kind()),
            }
            self.sent_hello = true;
            return;
        }
        match msg {
            Message::Hello(_) => panic!("client sent a second hello"),
            Message::ModelBegin(b) => {
                // A new upload replaces one the server refused mid-stream.
                let len = u64::try_from(b.weights_len).expect("weights_len >= 0");
                self.upload = Some((len, 0, 0));
            }
            Message::WeightsChunk(c) => {
                let (len, sent, next) = self.upload.as_mut().expect("chunk outside an upload");
                assert_eq!(c.index, *next, "chunk index out of order");
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(c.data_b64.as_bytes())
                    .expect("client chunk is valid base64");
                assert!(!raw.is_empty(), "empty chunk");
                *sent += raw.len() as u64;
                *next += 1;
                assert!(*sent <= *len, "upload sent more than weights_len");
                assert_eq!(c.last, *sent == *len, "last flag wrong");
            }
            Message::ModelCommit => {
                let (len, sent, _) = self.upload.take().expect("commit outside an upload");
                assert_eq!(sent, len, "commit before every byte was sent");
            }
            Message::Infer(_) | Message::Prompt(_) | Message::QueueStatusRequest => {}
            _ => unreachable!("checked by is_client_message"),
        }
    }

    fn events(&mut self) {
        while let Some(event) = self.client.poll_event() {
            match event {
                ClientEvent::Connected(hello) => {
                    assert!(!self.connected, "connected twice");
                    assert_eq!(Some(&hello), self.client.server_hello());
                    self.connected = true;
                }
                ClientEvent::Answer { request, answer } => {
                    assert!(
                        self.issued.contains(&request),
                        "answer to a request never made"
                    );
                    assert!(self.answered.insert(request), "request answered twice");
                    let i = self
                        .outstanding
                        .iter()
                        .position(|(r, _, _)| *r == request)
                        .expect("answered request was outstanding");
                    let (_, kind, job_id) = self.outstanding.remove(i);
                    match (&answer, kind) {
                        (Answer::ModelStatus(_), Kind::Upload)
                        | (Answer::QueueStatus(_), Kind::Queue)
                        | (Answer::Error(_), _) => {}
                        (Answer::Infer(r), Kind::Infer) => assert_eq!(r.job_id, job_id),
                        (Answer::Prompt(r), Kind::Prompt) => assert_eq!(r.job_id, job_id),
                        (a, k) => panic!("{a:?} answers a {k:?} request"),
                    }
                    if let Answer::Error(e) = &answer {
                        assert!(
                            e.job_id.is_empty()
                                || e.job_id == job_id
                                || self.outstanding.iter().all(|(_, _, id)| *id != e.job_id),
                            "error for {} routed to {job_id}",
                            e.job_id
                        );
                    }
                }
                ClientEvent::Closing(_) => {}
                ClientEvent::Partial { request, .. } => assert!(
                    self.outstanding.iter().any(|(r, _, _)| *r == request),
                    "a partial for a request not outstanding"
                ),
            }
        }
    }
}
