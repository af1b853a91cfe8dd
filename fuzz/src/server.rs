//! `server`: a whole [`Node<()>`] driven by a script the fuzzer chooses.
//!
//! Input layout: a [`Cfg`] (fixed size, small limits so they are reachable),
//! then [`Op`]s until the input ends; an [`Op::Input`] is followed by the raw
//! bytes it appends to a connection's send buffer. After the script, the
//! harness runs the node until it is quiet (every job and mount run, every byte
//! fed and transmitted) and checks the final accounts.
//!
//! The harness keeps, per connection, a mirror of the node's input side (the
//! same frame decoder and parser over the same bytes, plus the upload rules of
//! docs/PROTOCOL.md) to know which requests the node saw and how many answers each
//! may get, and a client-side decoder over everything the node transmits.
//!
//! Asserted after every step: no panic; every transmitted byte belongs to a
//! whole frame that parses, is a server → client type, and is canonically
//! encoded; the first frame is the server `hello` (or, over the connection
//! limit, the closing error); the closing error is the last frame and nothing
//! follows it; no request gets more answers than it asked for (job results and
//! job errors by `job_id`, upload answers one per upload, one `queue_status` per
//! request, one error per refused frame); partials (on a node that offers
//! `stream`) only to a connection that agreed it, only for a job not answered
//! yet, and never queued while `max_outbound` bytes wait; unsent bytes stay within
//! `max_outbound` plus what the last steps may add, and
//! [`Connection::allocated`](donate_proto::Connection::allocated) within the
//! decoder, upload and transmit limits; timers fire exactly when due.
//! At the end, every connection still open has had exactly one answer to each
//! request.

use std::collections::HashMap;
use std::time::Duration;

use arbitrary::Arbitrary;
use base64::Engine as _;
use donate_proto::frame::{FrameDecoder, DEFAULT_MAX_FRAME_LEN, HEADER_LEN};
use donate_proto::message::{
    encode_weights_chunk, Hello, Infer, InferPartial, JobRef, ModelBegin, Prompt, PromptPartial,
    QueuePosition, WeightsChunk,
};
use donate_proto::sim::{Peer, Sim};
use donate_proto::{
    run_job, Capabilities, Capability, ConnectionId, Executor, JobContext, JobError, JobInput,
    JobOutcome, JobOutput, Message, Mode, MountOutcome, Node, Partial, ProtocolError, ServerConfig,
    Spool, Stub, UploadHandling, UploadInfo, Weights,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::common::{is_server_message, variant_tag, Step, Steps};

/// The node's configuration, as the fuzzer picks it.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct Cfg {
    /// `local_lm` instead of `model_push`.
    pub local_lm: bool,
    /// Whether the node has a `local_lm_path`.
    pub with_path: bool,
    /// Queue capacity, mod 5.
    pub queue_capacity: u8,
    /// Largest frame body (0 counts as 1).
    pub max_frame_len: u16,
    /// Largest `weights_len`.
    pub max_model_len: u16,
    /// Connections at once: 1 + this mod 4. Also (so that older inputs keep
    /// their layout) `this / 4 % 2 == 1` has the node offer `stream`, see
    /// [`Cfg::streams`].
    pub max_connections: u8,
    /// Unsent bytes before input pauses (0 counts as 1).
    pub max_outbound: u16,
    /// Jobs running at once: 1 + this mod 3. Also (so that older inputs keep
    /// their layout) `this / 3 % 3` picks how uploads are handled, see
    /// [`Cfg::uploads`], and `1 + this / 9 % 28` is the upload stretch in bytes.
    pub workers: u8,
    /// Handshake timeout in ms.
    pub handshake_ms: u16,
    /// Stall timeout in ms.
    pub stall_ms: u16,
    /// Idle timeout in ms (0: none).
    pub idle_ms: u16,
    /// Backpressure timeout in ms.
    pub backpressure_ms: u16,
}

/// How a node handles uploads, from [`Cfg::uploads`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uploads {
    /// Held in memory, hashed at mount.
    InMemory,
    /// Held in memory, hashed by [`Event::Upload`] work as they arrive.
    HashedOnWorkers,
    /// Moved to [`FuzzExec`]'s spool by [`Event::Upload`] work as they arrive.
    Spooled,
}

impl Uploads {
    /// The node's setting for it.
    pub fn handling(self) -> UploadHandling {
        match self {
            Uploads::InMemory => UploadHandling::InMemory,
            Uploads::HashedOnWorkers => UploadHandling::HashAsItArrives,
            Uploads::Spooled => UploadHandling::Spool,
        }
    }
}

/// The stub, with a spool that checks what reaches it: never more than
/// `weights_len` bytes, and exactly that many at mount. Refuses to open a spool
/// for a `weights_len` of 3 mod 7, and fails writes past 40 bytes for one of 4 mod 5.
pub struct FuzzExec {
    stub: Stub,
}

/// [`FuzzExec`]'s spool.
pub struct FuzzSpool {
    expected: u64,
    received: u64,
}

impl Spool for FuzzSpool {
    fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.received += bytes.len() as u64;
        assert!(
            self.received <= self.expected,
            "spooled {} bytes of a {} byte upload",
            self.received,
            self.expected
        );
        if self.expected % 5 == 4 && self.received > 40 {
            return Err("spool write failed".to_owned());
        }
        Ok(())
    }
}

impl Executor for FuzzExec {
    type Model = ();
    type Spool = FuzzSpool;

    fn spools_uploads(&self) -> bool {
        true
    }

    fn open_spool(&self, upload: &UploadInfo) -> Result<FuzzSpool, String> {
        if upload.weights_len % 7 == 3 {
            return Err("spool refused".to_owned());
        }
        Ok(FuzzSpool {
            expected: upload.weights_len,
            received: 0,
        })
    }

    fn mount(&self, config_json: String, weights: Weights<FuzzSpool>) -> Result<(), String> {
        if let Weights::Spooled(spool) = &weights {
            assert_eq!(spool.received, spool.expected, "mounted a partial spool");
            return Ok(());
        }
        let Weights::Memory(bytes) = weights else {
            unreachable!()
        };
        self.stub.mount(config_json, Weights::Memory(bytes))
    }

    fn infer(
        &self,
        m: &(),
        ids: &[i32],
        max: i64,
        job: &JobContext<'_>,
    ) -> Result<Vec<i32>, JobError> {
        self.stub.infer(m, ids, max, job)
    }

    fn prompt(&self, prompt: &str, max_out: i64, job: &JobContext<'_>) -> Result<String, JobError> {
        self.stub.prompt(prompt, max_out, job)
    }
}

/// Path a `local_lm` node names when [`Cfg::with_path`] is set.
pub const LM_PATH: &str = "/models/lm.gguf";

impl Cfg {
    /// The node's [`ServerConfig`].
    #[allow(clippy::field_reassign_with_default)]
    pub fn server_config(&self) -> ServerConfig {
        let ms = |n: u16| Duration::from_millis(n.into());
        // Field by field on the defaults, so a new field keeps its default here.
        let mut c = ServerConfig::default();
        c.mode = if self.local_lm {
            Mode::LocalLm
        } else {
            Mode::ModelPush
        };
        c.local_lm_path = if self.with_path {
            LM_PATH.to_owned()
        } else {
            String::new()
        };
        c.queue_capacity = (self.queue_capacity % 5) as usize;
        c.max_frame_len = self.max_frame_len.max(1) as usize;
        c.max_model_len = self.max_model_len.into();
        c.max_connections = 1 + (self.max_connections % 4) as usize;
        c.max_outbound = self.max_outbound.max(1) as usize;
        c.handshake_timeout = ms(self.handshake_ms);
        c.stall_timeout = ms(self.stall_ms);
        c.idle_timeout = (self.idle_ms != 0).then(|| ms(self.idle_ms));
        c.backpressure_timeout = ms(self.backpressure_ms);
        c.workers = self.workers();
        c.upload_stretch = 1 + (self.workers / 9 % 28) as usize;
        c
    }

    /// How the node handles uploads.
    pub fn uploads(&self) -> Uploads {
        match self.workers / 3 % 3 {
            0 => Uploads::InMemory,
            1 => Uploads::HashedOnWorkers,
            _ => Uploads::Spooled,
        }
    }

    /// Whether the node offers `stream`: a client `hello` from
    /// [`Op::SendHello`] then names it (unless `conn`'s top bit is set), and
    /// [`Op::Complete`] hands the node partial output before the result.
    pub fn streams(&self) -> bool {
        self.max_connections / 4 % 2 == 1
    }

    /// Jobs the harness runs at once.
    pub fn workers(&self) -> usize {
        1 + (self.workers % 3) as usize
    }

    /// Roomy limits for seeds: whole sessions fit, timeouts of a minute.
    pub fn roomy(local_lm: bool) -> Cfg {
        Cfg {
            local_lm,
            with_path: local_lm,
            queue_capacity: 4,
            max_frame_len: 8192,
            max_model_len: 4096,
            max_connections: 3,
            max_outbound: 16384,
            workers: 0,
            handshake_ms: 60_000,
            stall_ms: 60_000,
            idle_ms: 60_000,
            backpressure_ms: 60_000,
        }
    }

    /// The bytes `Cfg::arbitrary` reads back as `self`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![
            self.local_lm as u8,
            self.with_path as u8,
            self.queue_capacity,
        ];
        out.extend_from_slice(&self.max_frame_len.to_le_bytes());
        out.extend_from_slice(&self.max_model_len.to_le_bytes());
        out.push(self.max_connections);
        out.extend_from_slice(&self.max_outbound.to_le_bytes());
        out.push(self.workers);
        for ms in [
            self.handshake_ms,
            self.stall_ms,
            self.idle_ms,
            self.backpressure_ms,
        ] {
            out.extend_from_slice(&ms.to_le_bytes());
        }
        out
    }
}

/// One step of a script. `conn` picks a connection accepted so far (mod their number).
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Accept a connection.
    Accept,
    /// Append the next `len` input bytes to `conn`'s send buffer.
    Input {
        /// Connection.
        conn: u8,
        /// Bytes that follow.
        len: u16,
    },
    /// Feed up to `max` bytes (0: all) of `conn`'s send buffer to the node, if it wants to read.
    Feed {
        /// Connection.
        conn: u8,
        /// Byte limit.
        max: u16,
    },
    /// Append a client `hello` (naming `stream` on a node that offers it,
    /// unless `conn`'s top bit is set).
    SendHello {
        /// Connection.
        conn: u8,
    },
    /// Append an `infer` with a fresh `job_id`.
    SendInfer {
        /// Connection.
        conn: u8,
        /// Input ids, mod 12.
        ids: u8,
        /// `max_tokens`.
        max_tokens: i8,
    },
    /// Append a `prompt` with a fresh `job_id`.
    SendPrompt {
        /// Connection.
        conn: u8,
        /// Which prompt text.
        which: u8,
    },
    /// Append a whole upload (`model_begin`, chunks, `model_commit`), maybe with a flaw.
    SendUpload {
        /// Connection.
        conn: u8,
        /// Weights length.
        len: u8,
        /// Chunk size: 1 + this mod 32.
        chunk: u8,
        /// Which flaw (mod 10; 0 to 3 are well-formed).
        flaw: u8,
    },
    /// Append a `queue_status` request.
    SendQueueStatus {
        /// Connection.
        conn: u8,
    },
    /// Let time pass.
    Advance {
        /// Milliseconds.
        ms: u16,
    },
    /// `handle_timeout(now)`.
    HandleTimeout,
    /// Take every event; mounts wait for [`Op::Mount`].
    PollEvents,
    /// A worker takes the next job (if a worker is free).
    NextJob,
    /// Complete a running job.
    Complete {
        /// Which running job.
        pick: u8,
        /// Mod 4: 0, 1: the stub's result; 2: an executor error; 3: the wrong
        /// kind of output. `outcome / 4` partial outputs are handed to the node
        /// first (of the wrong kind with 3).
        outcome: u8,
    },
    /// Finish a waiting mount.
    Mount {
        /// Which mount.
        pick: u8,
        /// The stub loads it (`run_mount`), or the executor refuses it.
        ok: bool,
    },
    /// The client reads what the node has for it (unless it stopped reading).
    Transmit {
        /// Connection.
        conn: u8,
    },
    /// The client stops (or starts again) reading.
    Pause {
        /// Connection.
        conn: u8,
    },
    /// The socket is gone.
    Remove {
        /// Connection.
        conn: u8,
    },
    /// `begin_shutdown()`.
    Shutdown,
    /// Run like an adapter until quiet: feed, mount, run jobs, transmit.
    Pump,
    /// The client closed its side (end of stream).
    PeerClosed {
        /// Connection.
        conn: u8,
    },
}

/// Number of [`Op`] variants (for encoding seeds).
const OP_VARIANTS: u64 = 20;

impl Step for Op {
    fn payload_len(&self) -> Option<usize> {
        match *self {
            Op::Input { len, .. } => Some(len.into()),
            _ => None,
        }
    }

    fn input(conn: u8, len: u16) -> Self {
        Op::Input { conn, len }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let (index, fields): (u64, Vec<u8>) = match *self {
            Op::Accept => (0, vec![]),
            Op::Input { conn, len } => (1, [&[conn][..], &len.to_le_bytes()].concat()),
            Op::Feed { conn, max } => (2, [&[conn][..], &max.to_le_bytes()].concat()),
            Op::SendHello { conn } => (3, vec![conn]),
            Op::SendInfer {
                conn,
                ids,
                max_tokens,
            } => (4, vec![conn, ids, max_tokens as u8]),
            Op::SendPrompt { conn, which } => (5, vec![conn, which]),
            Op::SendUpload {
                conn,
                len,
                chunk,
                flaw,
            } => (6, vec![conn, len, chunk, flaw]),
            Op::SendQueueStatus { conn } => (7, vec![conn]),
            Op::Advance { ms } => (8, ms.to_le_bytes().to_vec()),
            Op::HandleTimeout => (9, vec![]),
            Op::PollEvents => (10, vec![]),
            Op::NextJob => (11, vec![]),
            Op::Complete { pick, outcome } => (12, vec![pick, outcome]),
            Op::Mount { pick, ok } => (13, vec![pick, ok as u8]),
            Op::Transmit { conn } => (14, vec![conn]),
            Op::Pause { conn } => (15, vec![conn]),
            Op::Remove { conn } => (16, vec![conn]),
            Op::Shutdown => (17, vec![]),
            Op::Pump => (18, vec![]),
            Op::PeerClosed { conn } => (19, vec![conn]),
        };
        let mut out = variant_tag(index, OP_VARIANTS).to_vec();
        out.extend(fields);
        out
    }
}

/// Builds server-target inputs (for seeds): `Script::new(cfg.to_bytes())`.
pub type Script = crate::common::Script<Op>;

/// Reads a script: the config, then steps with their payloads.
pub fn parse(data: &[u8]) -> Option<(Cfg, Steps<'_, Op>)> {
    crate::common::parse(data)
}

/// The `server` target.
pub fn run(data: &[u8]) {
    let Some((cfg, ops)) = parse(data) else {
        return;
    };
    let trace = std::env::var_os("DONATE_FUZZ_TRACE").is_some();
    if trace {
        eprintln!("{cfg:?}\n{:?}", cfg.server_config());
    }
    let mut h = Harness::new(&cfg);
    for (op, payload) in ops {
        if trace {
            eprintln!("{op:?} {:?}", String::from_utf8_lossy(payload));
        }
        h.step(&op, payload);
    }
    h.settle();
    if trace {
        for c in &h.conns {
            eprintln!(
                "{}: removed {} close {:?}\n  answered {:?}\n  owed {:?} (jobs {:?})",
                c.id,
                h.sim.is_closed(c.peer),
                c.close,
                c.answers,
                (
                    c.mirror.empty_jobs,
                    c.mirror.refusals,
                    c.mirror.upload_errors,
                    c.mirror.statuses,
                    c.mirror.queue_requests
                ),
                c.mirror.jobs
            );
        }
    }
    h.final_checks();
}

/// What a `model_begin`…`model_commit` sequence looks like to the node's mirror:
/// docs/PROTOCOL.md's upload rules, written out independently of `donate_proto::upload`.
#[derive(Debug, Default)]
enum UploadMirror {
    #[default]
    Idle,
    Receiving {
        weights_len: u64,
        received: u64,
        next_index: i64,
        last_seen: bool,
    },
    Failed,
}

impl UploadMirror {
    /// The state after `model_begin`, or `Failed` if the node refuses it.
    fn begin(begin: &ModelBegin, max_model_len: u64) -> UploadMirror {
        let sha = &begin.weights_sha256;
        let sha_ok =
            sha.is_empty() || (sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()));
        match u64::try_from(begin.weights_len) {
            Ok(weights_len) if weights_len <= max_model_len && sha_ok => UploadMirror::Receiving {
                weights_len,
                received: 0,
                next_index: 0,
                last_seen: false,
            },
            _ => UploadMirror::Failed,
        }
    }

    /// Takes a chunk; returns whether the node refuses it.
    fn chunk(&mut self, chunk: &WeightsChunk<'_>) -> bool {
        let UploadMirror::Receiving {
            weights_len,
            received,
            next_index,
            last_seen,
        } = self
        else {
            return false;
        };
        let raw = base64::engine::general_purpose::STANDARD.decode(chunk.data_b64.as_bytes());
        let ok = !*last_seen
            && chunk.index == *next_index
            && raw
                .as_ref()
                .is_ok_and(|raw| *received + raw.len() as u64 <= *weights_len);
        if ok {
            *received += raw.map_or(0, |r| r.len() as u64);
            *next_index += 1;
            *last_seen = chunk.last;
        }
        !ok
    }
}

/// Just the `job_id` of a body that did not parse (as the node salvages it).
#[derive(Deserialize)]
struct JobIdOnly {
    job_id: Option<serde_json::Value>,
}

fn salvage_job_id(body: &[u8], max_len: usize) -> Option<String> {
    let only: JobIdOnly = serde_json::from_slice(body).ok()?;
    match only.job_id? {
        serde_json::Value::String(s) if !s.is_empty() && s.len() <= max_len => Some(s),
        _ => None,
    }
}

/// The `job_id` a client frame names, that the node checks (docs/PROTOCOL.md §4.4).
fn named_job_id<'m>(msg: &'m Message<'_>) -> Option<&'m str> {
    match msg {
        Message::Infer(Infer { job_id, .. })
        | Message::Prompt(Prompt { job_id, .. })
        | Message::Cancel(JobRef { job_id })
        | Message::QueuePositionRequest(JobRef { job_id })
        | Message::Queued(QueuePosition { job_id, .. })
        | Message::QueuePosition(QueuePosition { job_id, .. }) => Some(job_id),
        _ => None,
    }
}

/// Whether the node refuses a `job_id`: too long, or with a control or
/// bidirectional-format character.
fn bad_job_id(job_id: &str, max_len: usize) -> bool {
    let bidi = |c: char| matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    job_id.len() > max_len || job_id.chars().any(|c| c.is_control() || bidi(c))
}

/// Requests the node saw on one connection, and how they may be answered.
#[derive(Debug)]
struct Mirror {
    decoder: FrameDecoder,
    framing_failed: bool,
    upload: UploadMirror,
    /// Answers owed per non-empty `job_id`: jobs, and refused frames that carry one.
    jobs: HashMap<String, u32>,
    infer_ids: HashMap<String, u32>,
    prompt_ids: HashMap<String, u32>,
    /// Jobs with an empty `job_id`.
    empty_jobs: u32,
    /// Frames refused for their form (bad JSON, unknown or server-only type) without a `job_id`.
    refusals: u32,
    /// Upload errors owed (one per failed upload).
    upload_errors: u32,
    /// `model_status` frames owed (one per commit of an upload that did not fail).
    statuses: u32,
    /// `queue_status` requests.
    queue_requests: u32,
    /// Frames seen (the first one alone may opt into extensions).
    frames: usize,
    /// Whether the connection agreed `stream`.
    streams: bool,
}

/// Answers a connection has received, by the same accounts as [`Mirror`].
#[derive(Debug, Default)]
struct Answers {
    jobs: HashMap<String, u32>,
    empty_jobs: u32,
    refusals: u32,
    upload_errors: u32,
    statuses: u32,
    queue: u32,
}

const REFUSAL_CODES: [&str; 5] = [
    "bad_json",
    "not_object",
    "bad_field",
    "bad_version",
    "unknown_type",
];
const UPLOAD_CODES: [&str; 8] = [
    "model_push_disabled",
    "chunk_after_last",
    "bad_weights_len",
    "bad_weights_sha256",
    "weights_b64",
    "weights_overflow",
    "chunk_out_of_order",
    "chunk_without_begin",
];
const JOB_CODES: [&str; 4] = [
    "wrong_mode",
    "model_not_mounted",
    "queue_full",
    "shutting_down",
];

impl Mirror {
    fn new(config: &ServerConfig) -> Mirror {
        Mirror {
            decoder: FrameDecoder::new(config.max_frame_len),
            framing_failed: false,
            upload: UploadMirror::Idle,
            jobs: HashMap::new(),
            infer_ids: HashMap::new(),
            prompt_ids: HashMap::new(),
            empty_jobs: 0,
            refusals: 0,
            upload_errors: 0,
            statuses: 0,
            queue_requests: 0,
            frames: 0,
            streams: false,
        }
    }

    /// Sees the bytes the node is about to be fed; returns how many bytes of
    /// answers they may cause at most.
    fn feed(&mut self, data: &[u8], config: &ServerConfig, offers_stream: bool) -> usize {
        let mut bodies = Vec::new();
        if self
            .decoder
            .feed(data, |b| bodies.push(b.to_vec()))
            .is_err()
        {
            self.framing_failed = true;
        }
        let mut bound = 512;
        for body in &bodies {
            bound += 320 + 4 * body.len();
            self.frame(body, config, offers_stream);
        }
        bound
    }

    fn expect_job(&mut self, job_id: &str) {
        if job_id.is_empty() {
            self.empty_jobs += 1;
        } else {
            *self.jobs.entry(job_id.to_owned()).or_default() += 1;
        }
    }

    fn frame(&mut self, body: &[u8], config: &ServerConfig, offers_stream: bool) {
        let local_lm = config.mode == Mode::LocalLm;
        let max_id = config.max_job_id_len;
        self.frames += 1;
        let msg = match Message::parse(body) {
            Ok(msg) => msg,
            Err(_) => {
                match salvage_job_id(body, max_id) {
                    Some(id) => *self.jobs.entry(id).or_default() += 1,
                    None => self.refusals += 1,
                }
                return;
            }
        };
        if let Some(id) = named_job_id(&msg).filter(|id| bad_job_id(id, max_id)) {
            // Refused with `bad_field`, naming the id only when it is not too long.
            match id.len() <= max_id {
                true => *self.jobs.entry(id.to_owned()).or_default() += 1,
                false => self.refusals += 1,
            }
            return;
        }
        match msg {
            Message::Hello(hello) => {
                if self.frames == 1 && offers_stream {
                    self.streams = hello.capabilities.iter().any(|c| c == "stream");
                }
            }
            Message::ModelBegin(_) if local_lm => {
                self.upload_errors += 1;
                self.upload = UploadMirror::Failed;
            }
            Message::ModelBegin(begin) => {
                self.upload = UploadMirror::begin(&begin, config.max_model_len);
                if matches!(self.upload, UploadMirror::Failed) {
                    self.upload_errors += 1;
                }
            }
            Message::WeightsChunk(_) | Message::ModelCommit if local_lm => {}
            Message::WeightsChunk(chunk) => {
                let failed = match self.upload {
                    UploadMirror::Receiving { .. } => self.upload.chunk(&chunk),
                    UploadMirror::Failed => false,
                    UploadMirror::Idle => true,
                };
                if failed {
                    self.upload_errors += 1;
                    self.upload = UploadMirror::Failed;
                }
            }
            Message::ModelCommit => match std::mem::take(&mut self.upload) {
                UploadMirror::Receiving { .. } | UploadMirror::Idle => self.statuses += 1,
                UploadMirror::Failed => {}
            },
            Message::Infer(job) => {
                self.expect_job(&job.job_id);
                *self.infer_ids.entry(job.job_id).or_default() += 1;
            }
            Message::Prompt(job) => {
                self.expect_job(&job.job_id);
                *self.prompt_ids.entry(job.job_id).or_default() += 1;
            }
            Message::QueueStatusRequest | Message::QueueStatus(_) => self.queue_requests += 1,
            // The fuzzed node offers no extension: what a v1 node says.
            Message::ModelStatus(_)
            | Message::InferResult(_)
            | Message::PromptResult(_)
            | Message::InferPartial(_)
            | Message::PromptPartial(_)
            | Message::Error(_) => self.refusals += 1,
            // Extensions these v1 connections never opted into: refused as
            // unknown types, naming the job as a v1 node's parse error did.
            Message::Cancel(JobRef { job_id })
            | Message::QueuePositionRequest(JobRef { job_id })
            | Message::Queued(QueuePosition { job_id, .. })
            | Message::QueuePosition(QueuePosition { job_id, .. })
                if !job_id.is_empty() =>
            {
                *self.jobs.entry(job_id).or_default() += 1
            }
            Message::Cancel(_)
            | Message::QueuePositionRequest(_)
            | Message::Queued(_)
            | Message::QueuePosition(_)
            | Message::StatsRequest
            | Message::Stats(_)
            | Message::ModelQuery(_)
            | Message::ModelInventory(_)
            | Message::ModelUse(_) => self.refusals += 1,
        }
    }
}

/// When and how a connection started closing.
#[derive(Debug)]
struct Close {
    /// Transmit offset at which the closing frame ends (nothing may follow).
    end: usize,
    /// Its `code`; `None` when it closes without a frame (backpressure).
    code: Option<&'static str>,
    /// Whether the client has read the closing frame.
    seen: bool,
}

#[derive(Debug)]
struct Conn {
    peer: Peer,
    id: ConnectionId,
    created_closing: bool,
    mirror: Mirror,
    /// Client-side decoder of what the node transmits.
    out: FrameDecoder,
    out_total: usize,
    frames_out: usize,
    answers: Answers,
    close: Option<Close>,
    /// How many unsent bytes the node may hold now.
    allowance: usize,
}

/// The script's node and raw peers in a [`Sim`] that holds every job, mount
/// and upload work until an [`Op`] runs it; the accounts beside it.
struct Harness {
    cfg: Cfg,
    config: ServerConfig,
    sim: Sim<FuzzExec>,
    conns: Vec<Conn>,
    /// Mounts and upload work run so far (progress that moves no byte).
    worked: usize,
    next_job_id: u64,
    shutdown: bool,
}

/// Most connections a script accepts.
const MAX_CONNS: usize = 8;

const PROMPTS: [&str; 6] = [
    "hello world",
    "Is this a question?",
    "Please reply with one word only: yes, no, or maybe. Is it?",
    "system text\nUSER QUESTION:   what now  ",
    "",
    "  one two three four five six seven eight nine ten  ",
];

impl Harness {
    fn new(cfg: &Cfg) -> Harness {
        let config = cfg.server_config();
        let exec = FuzzExec {
            stub: Stub::new(config.local_lm_path.clone()),
        };
        let mut sim = Sim::with_uploads(exec, config.clone(), cfg.uploads().handling());
        if cfg.streams() {
            sim.node = Node::with_uploads(config.clone(), cfg.uploads().handling())
                .offer(Capabilities::NONE.with(Capability::Stream));
        }
        sim.hold_jobs = true;
        sim.hold_mounts = true;
        sim.hold_uploads = true;
        Harness {
            cfg: cfg.clone(),
            config,
            sim,
            conns: Vec::new(),
            worked: 0,
            next_job_id: 0,
            shutdown: false,
        }
    }

    fn pick(&self, conn: u8) -> Option<usize> {
        (!self.conns.is_empty()).then(|| conn as usize % self.conns.len())
    }

    /// Runs one step, then checks every invariant.
    fn step(&mut self, op: &Op, payload: &[u8]) {
        self.apply(op, payload);
        self.check();
    }

    fn apply(&mut self, op: &Op, payload: &[u8]) {
        match *op {
            Op::Accept => self.accept(),
            Op::Input { conn, .. } => self.write(conn, payload),
            Op::Feed { conn, max } => {
                if let Some(i) = self.pick(conn) {
                    self.feed(i, max);
                }
            }
            Op::SendHello { conn } => self.send(
                conn,
                &Message::Hello(Hello {
                    mode: self.config.mode.as_str().to_owned(),
                    role: "client".to_owned(),
                    capabilities: match self.cfg.streams() && conn < 0x80 {
                        true => vec!["stream".to_owned()],
                        false => Vec::new(),
                    },
                    ..Hello::default()
                }),
            ),
            Op::SendInfer {
                conn,
                ids,
                max_tokens,
            } => {
                let job_id = self.fresh_job_id();
                self.send(
                    conn,
                    &Message::Infer(Infer {
                        job_id,
                        input_ids: (0..(ids % 12) as i32).map(|i| i * 7 - 3).collect(),
                        max_tokens: max_tokens.into(),
                        deadline_ms: 0,
                        sampling: Default::default(),
                    }),
                );
            }
            Op::SendPrompt { conn, which } => {
                let job_id = self.fresh_job_id();
                self.send(
                    conn,
                    &Message::Prompt(Prompt {
                        job_id,
                        prompt: PROMPTS[which as usize % PROMPTS.len()].to_owned(),
                        max_out: which.into(),
                        deadline_ms: 0,
                        sampling: Default::default(),
                        ..Prompt::default()
                    }),
                );
            }
            Op::SendUpload {
                conn,
                len,
                chunk,
                flaw,
            } => self.write(conn, &upload_bytes(len, chunk, flaw)),
            Op::SendQueueStatus { conn } => self.send(conn, &Message::QueueStatusRequest),
            Op::Advance { ms } => self.sim.advance_clock(Duration::from_millis(ms.into())),
            Op::HandleTimeout => self.handle_timeout(),
            Op::PollEvents => self.poll_events(),
            Op::NextJob => {
                if self.sim.held_jobs.len() < self.sim.workers {
                    let had_job = self.sim.node.has_job();
                    let took = self.sim.take_job();
                    assert_eq!(took, had_job, "next_job disagrees with has_job");
                }
            }
            Op::Complete { pick, outcome } => self.complete(pick, outcome),
            Op::Mount { pick, ok } => self.mount(pick, ok),
            Op::Transmit { conn } => {
                if let Some(i) = self.pick(conn) {
                    self.transmit(i);
                }
            }
            Op::Pause { conn } => {
                if let Some(i) = self.pick(conn) {
                    let peer = self.conns[i].peer;
                    self.sim.set_reading(peer, !self.sim.is_reading(peer));
                }
            }
            Op::Remove { conn } => {
                if let Some(i) = self.pick(conn) {
                    let (peer, id) = (self.conns[i].peer, self.conns[i].id);
                    self.sim.vanish(peer);
                    let node = &self.sim.node;
                    assert!(node.connection(id).is_none());
                    assert!(node.is_closing(id) && !node.wants_read(id));
                    self.allow_all(512);
                }
            }
            Op::Shutdown => {
                self.sim.node.begin_shutdown();
                self.shutdown = true;
                self.allow_all(512);
            }
            Op::Pump => {
                self.pump(64);
            }
            Op::PeerClosed { conn } => {
                if let Some(i) = self.pick(conn) {
                    self.sim.close(self.conns[i].peer);
                    assert!(self.sim.node.is_closing(self.conns[i].id));
                }
            }
        }
    }

    fn fresh_job_id(&mut self) -> String {
        self.next_job_id += 1;
        format!("h{}", self.next_job_id)
    }

    fn write(&mut self, conn: u8, bytes: &[u8]) {
        if let Some(i) = self.pick(conn) {
            self.sim.write(self.conns[i].peer, bytes);
        }
    }

    fn send(&mut self, conn: u8, msg: &Message<'_>) {
        let mut bytes = Vec::new();
        msg.encode(&mut bytes);
        self.write(conn, &bytes);
    }

    fn allow_all(&mut self, bytes: usize) {
        for c in &mut self.conns {
            c.allowance += bytes;
        }
    }

    fn accept(&mut self) {
        if self.conns.len() >= MAX_CONNS {
            return;
        }
        // Connections refused at accept hold no slot while they flush their error.
        let refused = |id: ConnectionId| self.conns.iter().any(|c| c.id == id && c.created_closing);
        let live = self
            .sim
            .node
            .connections()
            .filter(|&id| !refused(id))
            .count();
        let over_limit = live >= self.config.max_connections || self.shutdown;
        let peer = self.sim.raw();
        let id = self.sim.conn(peer);
        assert!(
            self.conns.iter().all(|c| c.id != id),
            "connection id reused"
        );
        let created_closing = self.sim.node.is_closing(id);
        assert_eq!(created_closing, over_limit, "connection limit not applied");
        self.conns.push(Conn {
            peer,
            id,
            created_closing,
            mirror: Mirror::new(&self.config),
            out: FrameDecoder::new(DEFAULT_MAX_FRAME_LEN),
            out_total: 0,
            frames_out: 0,
            answers: Answers::default(),
            close: None,
            allowance: self.config.max_outbound + 512,
        });
    }

    /// Feeds up to `max` pending bytes (0: all) if the node wants to read them.
    fn feed(&mut self, i: usize, max: u16) {
        let c = &mut self.conns[i];
        let max = match max {
            0 => usize::MAX,
            m => m.into(),
        };
        let chunk = self.sim.feed(c.peer, max);
        if chunk.is_empty() {
            return;
        }
        c.allowance += c.mirror.feed(&chunk, &self.config, self.cfg.streams());
        let closing = self.sim.node.connection(c.id).and_then(|k| k.closing());
        if c.mirror.framing_failed {
            assert!(
                matches!(closing, Some(ProtocolError::Frame(_))),
                "framing error did not close the connection: {closing:?}"
            );
        } else {
            assert!(
                closing.is_none(),
                "input closed the connection: {closing:?}"
            );
        }
    }

    fn handle_timeout(&mut self) {
        let node = &self.sim.node;
        let deadlines: Vec<_> = self
            .conns
            .iter()
            .map(|c| (node.is_closing(c.id), node.connection_timeout(c.id)))
            .collect();
        let earliest = deadlines.iter().filter_map(|(_, d)| *d).min();
        assert_eq!(
            node.poll_timeout(),
            earliest,
            "poll_timeout is not the earliest deadline"
        );
        self.sim.handle_timeout();
        // Closing the due connections may drop the last jobs of a shutdown,
        // which then closes every connection.
        let drained = self.shutdown && self.sim.node.is_drained();
        let (now, start) = (self.sim.now(), self.sim.at(Duration::ZERO));
        for (c, (was_closing, deadline)) in self.conns.iter().zip(deadlines) {
            if self.sim.is_closed(c.peer) || was_closing {
                continue;
            }
            let due = drained || deadline.is_some_and(|d| d <= now);
            assert_eq!(
                self.sim.node.is_closing(c.id),
                due,
                "{} at {:?} with deadline {:?}",
                c.id,
                now - start,
                deadline.map(|d| d - start)
            );
        }
        self.allow_all(512);
    }

    /// Takes every event: the simulation holds mounts and upload work.
    fn poll_events(&mut self) {
        self.sim.poll_events();
        assert!(
            self.cfg.uploads() != Uploads::InMemory || self.sim.held_uploads.is_empty(),
            "upload work unasked"
        );
    }

    fn complete(&mut self, pick: u8, outcome: u8) {
        let running = &mut self.sim.held_jobs;
        if running.is_empty() {
            return;
        }
        let job = running.remove(pick as usize % running.len());
        self.partials(&job, outcome / 4, outcome % 4 == 3);
        let outcome: JobOutcome = match outcome % 4 {
            0 | 1 => run_job(&self.sim.executor, &job),
            2 => Err(JobError::new("executor_error", "the executor failed")),
            _ => match job.input {
                JobInput::Infer { .. } => Ok(JobOutput::Prompt("wrong".to_owned())),
                JobInput::Prompt { .. } => Ok(JobOutput::Infer(vec![1, 2])),
            },
        };
        let size = match &outcome {
            Ok(JobOutput::Infer(ids)) => 12 * ids.len(),
            Ok(JobOutput::Prompt(text)) => 6 * text.len(),
            Ok(JobOutput::Reply(reply)) => 6 * reply.text.len() + 96,
            Err(e) => 6 * (e.message.len() + e.code.len()),
        };
        let id = job.id;
        self.sim.complete(job, outcome);
        assert!(
            !self
                .sim
                .node
                .complete(id, Ok(JobOutput::Infer(vec![])), self.sim.now()),
            "a job completed twice"
        );
        self.allow_all(1024 + 2 * self.config.max_frame_len + size);
    }

    /// Hands the node `n` partial outputs of a running job (of the wrong
    /// kind when `wrong`): each is queued only to a connection that agreed
    /// `stream` and holds less than `max_outbound`, so at most one frame
    /// beyond it.
    fn partials(&mut self, job: &donate_proto::Job<()>, n: u8, wrong: bool) {
        let infer = matches!(job.input, JobInput::Infer { .. }) != wrong;
        let i = self.conns.iter().position(|c| c.id == job.conn);
        let mut frame = Vec::new();
        match infer {
            true => Message::InferPartial(InferPartial {
                job_id: job.job_id.clone(),
                output_ids: vec![n.into()],
            }),
            false => Message::PromptPartial(PromptPartial {
                job_id: job.job_id.clone(),
                text: "t".to_owned(),
            }),
        }
        .encode(&mut frame);
        for _ in 0..n {
            let node = &self.sim.node;
            let before = node.connection(job.conn).map(|c| c.pending_transmit());
            let token = [i32::from(n)];
            let output = match infer {
                true => Partial::Tokens(&token),
                false => Partial::Text("t"),
            };
            let sent = self.sim.node.partial(job.id, output, self.sim.now());
            if sent {
                let c = &self.conns[i.expect("a connection that is gone got a partial")];
                assert!(c.mirror.streams && !wrong, "{}: an unwanted partial", c.id);
                let before = before.expect("its connection is known");
                assert!(
                    before < self.config.max_outbound,
                    "{}: a partial queued over max_outbound ({before} bytes unsent)",
                    c.id
                );
            }
        }
        if let Some(i) = i {
            self.conns[i].allowance += frame.len();
        }
    }

    fn mount(&mut self, pick: u8, ok: bool) {
        let (mounts, uploads) = (self.sim.held_mounts.len(), self.sim.held_uploads.len());
        // Upload work first, when some waits and `pick` is even (or no mount waits).
        if uploads > 0 && (pick % 2 == 0 || mounts == 0) {
            self.worked += 1;
            self.sim.finish_upload(pick as usize / 2 % uploads);
            self.allow_all(1024 + 2 * self.config.max_frame_len);
            return;
        }
        if mounts == 0 {
            return;
        }
        let i = pick as usize % mounts;
        if ok {
            self.sim.finish_mount(i);
        } else {
            let m = self.sim.held_mounts.remove(i);
            let refused = MountOutcome {
                token: m.token,
                result: Err("the executor refused the model".to_owned()),
            };
            self.sim.node.mount_done(refused, self.sim.now());
        }
        // model_status, and the answers of `infer`s parked behind the mount.
        let parked = self.config.queue_capacity * (512 + 2 * self.config.max_frame_len);
        self.allow_all(1024 + parked);
    }

    /// The client reads everything the node has for it (unless it stopped reading).
    fn transmit(&mut self, i: usize) {
        let c = &mut self.conns[i];
        self.sim.transmit(c.peer);
        let buf = self.sim.take_received(c.peer);
        let mut bodies = Vec::new();
        c.out
            .feed(&buf, |b| bodies.push(b.to_vec()))
            .unwrap_or_else(|e| panic!("{}: node transmitted a bad frame header: {e}", c.id));
        assert!(
            !c.out.has_partial(),
            "{}: node transmitted part of a frame",
            c.id
        );
        let mut offset = c.out_total;
        c.out_total += buf.len();
        for body in bodies {
            offset += HEADER_LEN + body.len();
            self.on_frame(i, &body, offset);
        }
    }

    /// Checks one frame the node sent on connection `i`, ending at transmit offset `end`.
    fn on_frame(&mut self, i: usize, body: &[u8], end: usize) {
        let config = &self.config;
        let c = &mut self.conns[i];
        let text = String::from_utf8_lossy(body);
        let msg = Message::parse(body).unwrap_or_else(|e| {
            panic!(
                "{}: node sent a frame that does not parse ({e}): {text}",
                c.id
            )
        });
        assert!(
            is_server_message(&msg),
            "{}: node sent a {} frame",
            c.id,
            msg.kind()
        );
        assert_eq!(
            msg.to_json(),
            body,
            "{}: frame not canonically encoded: {text}",
            c.id
        );
        let first = c.frames_out == 0;
        c.frames_out += 1;
        if let Some(close) = &mut c.close {
            assert!(
                end <= close.end,
                "{}: frame after the closing error ({:?}): {text}",
                c.id,
                close.code
            );
            if end == close.end && close.code.is_some() {
                match &msg {
                    Message::Error(e)
                        if Some(e.code.as_str()) == close.code && e.job_id.is_empty() => {}
                    _ => panic!(
                        "{}: closing frame is not the closing error {:?}: {text}",
                        c.id, close.code
                    ),
                }
                assert!(
                    !first || c.created_closing,
                    "{}: closed before its hello",
                    c.id
                );
                close.seen = true;
                return;
            }
        }
        if first {
            assert!(
                !c.created_closing,
                "{}: over the limit but sent {text}",
                c.id
            );
            let expected = Message::Hello(Hello {
                mode: config.mode.as_str().to_owned(),
                role: "server".to_owned(),
                local_lm_path: config.local_lm_path.clone(),
                queue_capacity: config.queue_capacity as i64,
                capabilities: match self.cfg.streams() {
                    true => vec!["stream".to_owned()],
                    false => Vec::new(),
                },
            });
            assert_eq!(
                msg, expected,
                "{}: first frame is not the server hello",
                c.id
            );
            return;
        }
        let m = &c.mirror;
        let a = &mut c.answers;
        match msg {
            Message::Hello(_) => panic!("{}: a second hello", c.id),
            Message::ModelStatus(_) => {
                a.statuses += 1;
                assert!(
                    a.statuses <= m.statuses,
                    "{}: unasked model_status: {text}",
                    c.id
                );
            }
            Message::InferResult(r) => {
                assert!(
                    m.infer_ids.contains_key(&r.job_id),
                    "{}: infer_result for no infer: {text}",
                    c.id
                );
                answer_job(a, m, &r.job_id, &text);
            }
            Message::PromptResult(r) => {
                assert!(
                    m.prompt_ids.contains_key(&r.job_id),
                    "{}: prompt_result for no prompt: {text}",
                    c.id
                );
                answer_job(a, m, &r.job_id, &text);
            }
            Message::QueueStatus(q) => {
                a.queue += 1;
                assert!(
                    a.queue <= m.queue_requests,
                    "{}: unasked queue_status",
                    c.id
                );
                assert_eq!(q.capacity, config.queue_capacity as i64);
                assert!((0..=q.capacity).contains(&q.depth), "{text}");
            }
            Message::InferPartial(InferPartial { job_id, .. }) => {
                assert!(m.infer_ids.contains_key(&job_id), "{}: {text}", c.id);
                partial_of_open_job(a, m, &job_id, &text);
            }
            Message::PromptPartial(PromptPartial { job_id, .. }) => {
                assert!(m.prompt_ids.contains_key(&job_id), "{}: {text}", c.id);
                partial_of_open_job(a, m, &job_id, &text);
            }
            Message::Error(e) if !e.job_id.is_empty() => answer_job(a, m, &e.job_id, &text),
            Message::Error(e) => {
                let code = e.code.as_str();
                if REFUSAL_CODES.contains(&code) {
                    a.refusals += 1;
                    assert!(
                        a.refusals <= m.refusals,
                        "{}: unasked refusal: {text}",
                        c.id
                    );
                } else if UPLOAD_CODES.contains(&code) {
                    a.upload_errors += 1;
                    assert!(
                        a.upload_errors <= m.upload_errors,
                        "{}: second answer to an upload: {text}",
                        c.id
                    );
                } else if JOB_CODES.contains(&code) {
                    a.empty_jobs += 1;
                    assert!(
                        a.empty_jobs <= m.empty_jobs,
                        "{}: unasked job error: {text}",
                        c.id
                    );
                } else {
                    panic!("{}: unexpected error frame: {text}", c.id);
                }
            }
            other => panic!("{}: node sent {other:?}", c.id),
        }
    }

    /// Runs like an adapter for at most `rounds` rounds, until nothing moves.
    fn pump(&mut self, rounds: usize) {
        for _ in 0..rounds {
            let before = self.progress();
            for i in 0..self.conns.len() {
                self.feed(i, 0);
                self.check();
            }
            self.poll_events();
            while !self.sim.held_mounts.is_empty() || !self.sim.held_uploads.is_empty() {
                self.mount(0, true);
                self.check();
                self.poll_events();
            }
            while self.sim.node.has_job() || !self.sim.held_jobs.is_empty() {
                if self.sim.held_jobs.len() < self.sim.workers && self.sim.node.has_job() {
                    self.apply(&Op::NextJob, &[]);
                } else {
                    self.complete(0, 0);
                }
                self.check();
            }
            self.poll_events();
            for i in 0..self.conns.len() {
                if self.sim.is_reading(self.conns[i].peer) {
                    self.transmit(i);
                    self.check();
                }
            }
            if self.progress() == before {
                break;
            }
        }
    }

    fn progress(&self) -> (usize, usize, usize, usize) {
        (
            self.conns.iter().map(|c| self.sim.unread(c.peer)).sum(),
            self.conns.iter().map(|c| c.out_total).sum(),
            self.sim.held_mounts.len() + self.sim.held_jobs.len() + self.sim.held_uploads.len(),
            self.worked,
        )
    }

    /// After a step: closing transitions, transmit and memory bounds.
    fn check(&mut self) {
        let config = &self.config;
        for c in &mut self.conns {
            if self.sim.is_closed(c.peer) {
                continue;
            }
            let conn = self
                .sim
                .node
                .connection(c.id)
                .expect("a connection not removed is known");
            if c.close.is_none() {
                if let Some(reason) = conn.closing() {
                    let code = match reason {
                        ProtocolError::Backpressure | ProtocolError::PeerClosed => None,
                        _ => Some(reason.code()),
                    };
                    c.close = Some(Close {
                        end: c.out_total + conn.pending_transmit(),
                        code,
                        seen: false,
                    });
                    assert!(!self.sim.node.wants_read(c.id));
                }
            }
            let pending = conn.pending_transmit();
            assert!(
                pending <= c.allowance,
                "{}: {pending} unsent bytes, allowed {}",
                c.id,
                c.allowance
            );
            let decoder = config.max_frame_len + HEADER_LEN + 64;
            // Spooling may hold a spare buffer beside the one filling.
            let upload = match self.cfg.uploads() {
                Uploads::Spooled => 2 * config.max_model_len as usize,
                _ => config.max_model_len as usize,
            } + config.max_frame_len;
            let limit = decoder + upload + 2 * c.allowance + 64;
            let allocated = conn.allocated();
            assert!(
                allocated <= limit,
                "{}: holds {allocated} bytes, limit {limit}",
                c.id
            );
            if pending < config.max_outbound {
                c.allowance = config.max_outbound;
            }
        }
    }

    /// Runs everything to the end: the client reads again, every byte goes in and out.
    fn settle(&mut self) {
        for c in &self.conns {
            self.sim.set_reading(c.peer, true);
        }
        self.pump(10_000);
    }

    fn final_checks(&self) {
        if self.shutdown {
            assert!(self.sim.node.is_drained(), "shutdown did not drain");
        }
        for c in &self.conns {
            if self.sim.is_closed(c.peer) {
                continue;
            }
            assert!(
                self.sim.unread(c.peer) == 0 || self.sim.node.is_closing(c.id),
                "{}: input left unread",
                c.id
            );
            if let Some(close) = &c.close {
                assert!(
                    close.seen || close.code.is_none(),
                    "{}: closing error never sent",
                    c.id
                );
                continue;
            }
            assert!(!self.shutdown, "{}: open after shutdown drained", c.id);
            let (m, a) = (&c.mirror, &c.answers);
            for (job_id, owed) in &m.jobs {
                let got = a.jobs.get(job_id).copied().unwrap_or(0);
                assert_eq!(
                    got, *owed,
                    "{}: job {job_id:?} answered {got} times, asked {owed}",
                    c.id
                );
            }
            assert_eq!(a.empty_jobs, m.empty_jobs, "{}: jobs without job_id", c.id);
            assert_eq!(a.refusals, m.refusals, "{}: refused frames", c.id);
            assert_eq!(a.upload_errors, m.upload_errors, "{}: upload errors", c.id);
            assert_eq!(a.statuses, m.statuses, "{}: model_status answers", c.id);
            assert_eq!(a.queue, m.queue_requests, "{}: queue_status answers", c.id);
        }
    }
}

/// A partial must come from a connection that agreed `stream`, for a job
/// not answered yet.
fn partial_of_open_job(a: &Answers, m: &Mirror, job_id: &str, text: &str) {
    assert!(
        m.streams,
        "a partial to a connection that did not agree stream: {text}"
    );
    let (got, owed) = match job_id {
        "" => (a.empty_jobs, m.empty_jobs),
        id => (
            a.jobs.get(id).copied().unwrap_or(0),
            m.jobs.get(id).copied().unwrap_or(0),
        ),
    };
    assert!(got < owed, "a partial after its job's answer: {text}");
}

fn answer_job(a: &mut Answers, m: &Mirror, job_id: &str, text: &str) {
    if job_id.is_empty() {
        a.empty_jobs += 1;
        assert!(a.empty_jobs <= m.empty_jobs, "unasked answer: {text}");
        return;
    }
    let got = a.jobs.entry(job_id.to_owned()).or_default();
    *got += 1;
    let owed = m.jobs.get(job_id).copied().unwrap_or(0);
    assert!(
        *got <= owed,
        "job {job_id:?} answered {got} times, asked {owed}: {text}"
    );
}

/// A whole upload as a client writes it, with the flaw `flaw` picks.
pub fn upload_bytes(len: u8, chunk: u8, flaw: u8) -> Vec<u8> {
    let weights: Vec<u8> = (0..len).map(|i| i ^ 0x5a).collect();
    let chunk = 1 + (chunk % 32) as usize;
    let flaw = flaw % 10;
    let sha = match flaw {
        1 => donate_proto::hex(&Sha256::digest(&weights)),
        2 => "00".repeat(32),
        4 => "xyz".to_owned(),
        _ => String::new(),
    };
    let mut out = Vec::new();
    Message::ModelBegin(ModelBegin {
        config_json: if flaw == 3 {
            String::new()
        } else {
            r#"{"ok":true}"#.to_owned()
        },
        weights_len: if flaw == 5 { -1 } else { len.into() },
        weights_sha256: sha,
        offset: 0,
        name: String::new(),
    })
    .encode(&mut out);
    let pieces: Vec<&[u8]> = weights.chunks(chunk).collect();
    for (i, piece) in pieces.iter().enumerate() {
        let index = if flaw == 6 && i == 1 { 2 } else { i as i64 };
        if flaw == 7 && i == 0 {
            Message::WeightsChunk(WeightsChunk {
                index,
                last: false,
                data_b64: "!!!!".into(),
            })
            .encode(&mut out);
            continue;
        }
        encode_weights_chunk(index, i + 1 == pieces.len(), piece, &mut out);
    }
    if flaw == 8 {
        let extra = base64::engine::general_purpose::STANDARD.encode([1, 2, 3]);
        Message::WeightsChunk(WeightsChunk {
            index: pieces.len() as i64,
            last: true,
            data_b64: extra.into(),
        })
        .encode(&mut out);
    }
    if flaw != 9 {
        Message::ModelCommit.encode(&mut out);
    }
    out
}
