//! [`Connection`]: the server side of one byte stream.
//!
//! A connection turns the bytes a client sends into answers and requests:
//! framing, parsing, the handshake, model upload assembly, the mode rules and
//! its timers live here. What is shared between connections (the job queue,
//! running jobs, mounts) is the [`Node`](crate::Node)'s, which owns every
//! connection and reaches it by [`ConnectionId`].

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use crate::error::{MountError, ProtocolError};
use crate::frame::FrameDecoder;
use crate::job::JobInput;
use crate::message::{
    canonical_chunk, salvage_job_id, ErrorFrame, Hello, Infer, Message, Mode, ModelStatus,
};
use crate::server::{Event, JobKind, ServerConfig, Shared};
use crate::upload::{Upload, UploadWork};

/// Names one connection of a [`Node`](crate::Node). Never reused by a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(pub(crate) u64);

impl ConnectionId {
    /// The raw number, unique for the node's lifetime.
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conn#{}", self.0)
    }
}

/// Where a connection's model upload stands.
#[derive(Debug, Default)]
enum UploadState {
    /// No upload since the last commit (or ever).
    #[default]
    Idle,
    /// Between `model_begin` and `model_commit` (boxed: idle connections stay small).
    Receiving(Box<Upload>),
    /// Refused or failed: its remaining chunks and its commit get no answer.
    Failed,
}

/// The server side of one connection. Owned by a [`Node`](crate::Node);
/// read it with [`Node::connection`](crate::Node::connection).
#[derive(Debug)]
pub struct Connection<M> {
    decoder: FrameDecoder,
    outbound: Vec<u8>,
    upload: UploadState,
    model: Option<Arc<M>>,
    /// Jobs of this connection queued or running.
    pub(crate) jobs_in_flight: usize,
    /// Commits of this connection being mounted.
    pub(crate) mounts_in_flight: usize,
    received_frame: bool,
    accepted_at: Instant,
    last_input: Instant,
    over_limit_since: Option<Instant>,
    closing: Option<ProtocolError>,
    /// `infer` jobs that arrived while a commit was being mounted.
    parked: VecDeque<Infer>,
    /// Committed uploads waiting for a worker to return their carried state.
    committing: VecDeque<Upload>,
    /// Uploads begun, to number them.
    uploads_begun: u64,
}

impl<M> Connection<M> {
    /// A new connection with the server `hello` queued; when `refused` (over the
    /// connection limit, or shutting down) it is created closing, with only an
    /// error frame queued.
    pub(crate) fn accept(
        config: &ServerConfig,
        now: Instant,
        refused: Option<ProtocolError>,
    ) -> Self {
        let mut conn = Connection {
            decoder: FrameDecoder::new(config.max_frame_len),
            outbound: Vec::new(),
            upload: UploadState::Idle,
            model: None,
            jobs_in_flight: 0,
            mounts_in_flight: 0,
            received_frame: false,
            accepted_at: now,
            last_input: now,
            over_limit_since: None,
            closing: None,
            parked: VecDeque::new(),
            committing: VecDeque::new(),
            uploads_begun: 0,
        };
        if let Some(reason) = refused {
            conn.close(reason);
        } else {
            conn.send(&Message::Hello(Hello {
                mode: config.mode.as_str().to_owned(),
                role: "server".to_owned(),
                local_lm_path: config.local_lm_path.clone(),
                queue_capacity: config.queue_capacity as i64,
            }));
        }
        conn
    }

    /// Whether the node wants more input from this peer: false while it is
    /// closing, while its unsent answers are over `max_outbound`, or while its
    /// spooled upload has gathered two stretches that a worker has not taken yet.
    pub fn wants_read(&self, config: &ServerConfig) -> bool {
        self.closing.is_none()
            && self.outbound.len() < config.max_outbound
            && !self.spool_backlogged(config)
    }

    /// Whether the upload's spool is behind: the node waits for it, not the peer.
    fn spool_backlogged(&self, config: &ServerConfig) -> bool {
        match &self.upload {
            UploadState::Receiving(upload) => upload.backlogged(2 * config.upload_stretch),
            _ => false,
        }
    }

    /// Why the connection is closing, once it is: flush its transmit bytes, then close.
    pub fn closing(&self) -> Option<&ProtocolError> {
        self.closing.as_ref()
    }

    /// Bytes waiting to be written to the peer.
    pub fn pending_transmit(&self) -> usize {
        self.outbound.len()
    }

    /// Jobs of this connection queued or running (answers still to come).
    pub fn jobs_in_flight(&self) -> usize {
        self.jobs_in_flight
    }

    /// Whether a model is mounted on this connection.
    pub fn has_model(&self) -> bool {
        self.model.is_some()
    }

    /// Heap bytes held for this connection: input buffer, output buffer and uploads.
    pub fn allocated(&self) -> usize {
        let upload = match &self.upload {
            UploadState::Receiving(u) => u.allocated(),
            _ => 0,
        };
        let committing: usize = self.committing.iter().map(Upload::allocated).sum();
        self.decoder.allocated() + self.outbound.capacity() + upload + committing
    }

    /// The earliest time at which [`Node::handle_timeout`](crate::Node::handle_timeout) has work here.
    pub fn deadline(&self, config: &ServerConfig) -> Option<Instant> {
        self.expiry(config).map(|(at, _)| at)
    }

    /// The earliest timer and what it closes with.
    fn expiry(&self, config: &ServerConfig) -> Option<(Instant, ProtocolError)> {
        if self.closing.is_some() {
            return None;
        }
        let idle =
            self.jobs_in_flight == 0 && self.mounts_in_flight == 0 && !self.decoder.has_partial();
        [
            self.over_limit_since
                .map(|t| (t + config.backpressure_timeout, ProtocolError::Backpressure)),
            // Not while the node itself holds the peer back.
            (self.decoder.has_partial() && !self.spool_backlogged(config)).then(|| {
                (
                    self.last_input + config.stall_timeout,
                    ProtocolError::Stalled,
                )
            }),
            (!self.received_frame).then(|| {
                (
                    self.accepted_at + config.handshake_timeout,
                    ProtocolError::HandshakeTimeout,
                )
            }),
            config
                .idle_timeout
                .filter(|_| idle)
                .map(|t| (self.last_input + t, ProtocolError::IdleTimeout)),
        ]
        .into_iter()
        .flatten()
        .min_by_key(|(at, _)| *at)
    }

    /// Closes the connection if one of its timers expired by `now`.
    pub(crate) fn handle_timeout(&mut self, config: &ServerConfig, now: Instant) -> bool {
        match self.expiry(config) {
            Some((at, reason)) if at <= now => {
                self.close(reason);
                true
            }
            _ => false,
        }
    }

    /// Marks the connection closing. A peer that is not reading or has closed
    /// gets no last frame; any other gets an error frame saying why.
    pub(crate) fn close(&mut self, reason: ProtocolError) {
        if self.closing.is_some() {
            return;
        }
        match reason {
            ProtocolError::Backpressure => self.outbound = Vec::new(),
            ProtocolError::PeerClosed => {}
            _ => self.send(&Message::Error(ErrorFrame::new(&reason, None))),
        }
        self.over_limit_since = None;
        self.upload = UploadState::Idle;
        self.closing = Some(reason);
    }

    /// Appends a frame to the transmit buffer.
    pub(crate) fn send(&mut self, msg: &Message<'_>) {
        msg.encode(&mut self.outbound);
    }

    /// Starts the backpressure timer when the transmit buffer crosses the limit.
    pub(crate) fn note_output(&mut self, config: &ServerConfig, now: Instant) {
        if self.over_limit_since.is_none() && self.outbound.len() >= config.max_outbound {
            self.over_limit_since = Some(now);
        }
    }

    /// Moves the transmit bytes into `out` (swapping buffers when `out` is empty).
    pub(crate) fn poll_transmit(&mut self, out: &mut Vec<u8>) {
        if out.is_empty() {
            std::mem::swap(out, &mut self.outbound);
            // Keep a large buffer from circulating back once drained.
            if self.outbound.capacity() > 64 * 1024 {
                self.outbound = Vec::new();
            }
        } else {
            out.append(&mut self.outbound);
        }
        self.over_limit_since = None;
    }

    /// Installs a mounted model and answers the commit (unless the connection is closing).
    pub(crate) fn mounted(
        &mut self,
        id: ConnectionId,
        result: Result<Arc<M>, String>,
        shared: &mut Shared<M>,
    ) {
        self.mounts_in_flight -= 1;
        if self.closing.is_some() {
            self.parked.clear();
            // Nothing follows the closing error (or a peer's close): the model
            // and its answer are dropped, as a closing connection's job results are.
            return;
        }
        let status = match result {
            Ok(model) => {
                self.model = Some(model);
                ModelStatus {
                    ok: true,
                    message: "mounted".to_owned(),
                }
            }
            Err(message) => ModelStatus { ok: false, message },
        };
        self.send(&Message::ModelStatus(status));
        self.release_parked(id, shared);
    }

    /// Once no commit is being mounted, the `infer`s that waited for one run
    /// (on whatever model is mounted now) or are refused.
    fn release_parked(&mut self, id: ConnectionId, shared: &mut Shared<M>) {
        if self.mounts_in_flight == 0 {
            for job in std::mem::take(&mut self.parked) {
                self.infer(id, job, shared);
            }
        }
    }

    /// Feeds input bytes; frames are answered or turned into requests on `shared`.
    pub(crate) fn handle_input(
        &mut self,
        id: ConnectionId,
        data: &[u8],
        now: Instant,
        shared: &mut Shared<M>,
    ) {
        if self.closing.is_some() || data.is_empty() {
            return;
        }
        self.last_input = now;
        let mut decoder = std::mem::replace(&mut self.decoder, FrameDecoder::new(0));
        let fed = decoder.feed(data, |body| self.handle_frame(id, body, shared));
        self.decoder = decoder;
        if let Err(e) = fed {
            self.close(e.into());
        }
        self.note_output(&shared.config, now);
    }

    fn handle_frame(&mut self, id: ConnectionId, body: &[u8], shared: &mut Shared<M>) {
        if self.closing.is_some() {
            return;
        }
        self.received_frame = true;
        if self.fast_chunk(id, body, shared) {
            return;
        }
        let msg = match Message::parse(body) {
            Ok(msg) => msg,
            Err(e) => return self.refuse(&e, salvage_job_id(body).as_deref()),
        };
        let mode = shared.config.mode;
        match msg {
            Message::Hello(_) => {}
            Message::ModelBegin(_) if mode == Mode::LocalLm => {
                self.upload = UploadState::Failed;
                self.refuse(&ProtocolError::ModelPushDisabled, None);
            }
            Message::ModelBegin(begin) => match Upload::begin_with(
                begin,
                shared.config.max_model_len,
                shared.config.digest_on_workers,
                shared.config.spool_uploads,
            ) {
                Ok(mut upload) => {
                    self.uploads_begun += 1;
                    upload.id = self.uploads_begun;
                    self.upload = UploadState::Receiving(Box::new(upload));
                }
                Err(e) => {
                    self.upload = UploadState::Failed;
                    self.refuse(&e, None);
                }
            },
            Message::WeightsChunk(_) | Message::ModelCommit if mode == Mode::LocalLm => {}
            Message::WeightsChunk(chunk) => {
                let failure = match &mut self.upload {
                    UploadState::Receiving(upload) => upload.chunk(&chunk).err(),
                    UploadState::Failed => None,
                    UploadState::Idle => Some(ProtocolError::ChunkWithoutBegin),
                };
                match failure {
                    Some(e) => {
                        self.upload = UploadState::Failed;
                        self.refuse(&e, None);
                    }
                    None => self.send_upload_work(id, shared),
                }
            }
            Message::ModelCommit => match std::mem::take(&mut self.upload) {
                UploadState::Receiving(upload) => self.commit(id, *upload, shared),
                UploadState::Failed => {}
                UploadState::Idle => self.mount_failed(&MountError::CommitWithoutBegin),
            },
            Message::Infer(job) if mode == Mode::ModelPush && self.mounts_in_flight > 0 => {
                // A pipelining client may send jobs right after its commit: they
                // wait for the mount and run on the model it produces.
                if self.parked.len() < shared.config.queue_capacity {
                    self.parked.push_back(job);
                } else {
                    self.refuse(&ProtocolError::QueueFull, Some(&job.job_id));
                }
            }
            Message::Infer(job) => self.infer(id, job, shared),
            Message::Prompt(job) => {
                let refused = match mode {
                    Mode::ModelPush => Some(ProtocolError::PromptOnModelPush),
                    Mode::LocalLm => {
                        let input = JobInput::Prompt {
                            prompt: job.prompt,
                            max_out: job.max_out,
                        };
                        shared
                            .admit(id, job.job_id.clone(), JobKind::Prompt, input)
                            .err()
                    }
                };
                match refused {
                    Some(e) => self.refuse(&e, Some(&job.job_id)),
                    None => self.jobs_in_flight += 1,
                }
            }
            Message::QueueStatusRequest | Message::QueueStatus(_) => {
                self.send(&Message::QueueStatus(shared.queue_status()));
            }
            Message::ModelStatus(_)
            | Message::InferResult(_)
            | Message::PromptResult(_)
            | Message::Error(_) => {
                self.refuse(&ProtocolError::UnknownType(msg.kind().to_owned()), None);
            }
        }
    }

    /// The hot path of an upload: a chunk in the canonical layout, decoded
    /// without a JSON parse. Anything unusual (including any error) returns
    /// false and takes the general path, which gives the precise answer.
    fn fast_chunk(&mut self, id: ConnectionId, body: &[u8], shared: &mut Shared<M>) -> bool {
        let (Mode::ModelPush, UploadState::Receiving(upload)) =
            (shared.config.mode, &mut self.upload)
        else {
            return false;
        };
        let appended = canonical_chunk(body)
            .is_some_and(|c| upload.append(c.index, c.last, c.data_b64).is_ok());
        if appended {
            self.send_upload_work(id, shared);
        }
        appended
    }

    /// Hands the upload's new bytes to a worker (to hash or spool) whenever its
    /// carried state is home and enough have arrived.
    fn send_upload_work(&mut self, id: ConnectionId, shared: &mut Shared<M>) {
        if let UploadState::Receiving(upload) = &mut self.upload {
            if let Some(work) = upload.upload_work(id, shared.config.upload_stretch) {
                shared.events.push_back(Event::Upload(work));
            }
        }
    }

    /// Answers a commit, or starts its mount; waits first if a worker holds its carried state.
    fn commit(&mut self, id: ConnectionId, upload: Upload, shared: &mut Shared<M>) {
        if upload.work_away() {
            self.mounts_in_flight += 1;
            self.committing.push_back(upload);
            return;
        }
        match upload.commit() {
            Ok(model) => {
                self.mounts_in_flight += 1;
                shared.mount(id, model);
            }
            Err(e) => self.mount_failed(&e),
        }
    }

    /// A worker returns an upload's carried state: receiving goes on, or a waiting commit proceeds.
    pub(crate) fn work_returned(
        &mut self,
        id: ConnectionId,
        work: UploadWork,
        now: Instant,
        shared: &mut Shared<M>,
    ) {
        if let Some(i) = self.committing.iter().position(|u| u.id == work.upload) {
            let mut upload = self.committing.remove(i).expect("position is in range");
            self.mounts_in_flight -= 1;
            if self.closing.is_none() {
                upload.work_returned(work);
                self.commit(id, upload, shared);
                // A commit refused at once (no config, bytes missing) frees them.
                self.release_parked(id, shared);
            }
        } else if let (None, UploadState::Receiving(upload)) = (&self.closing, &mut self.upload) {
            if upload.id == work.upload {
                let was_backlogged = self.spool_backlogged(&shared.config);
                if let UploadState::Receiving(upload) = &mut self.upload {
                    upload.work_returned(work);
                }
                self.send_upload_work(id, shared);
                if was_backlogged && self.wants_read(&shared.config) {
                    // The stall timer starts again from here.
                    self.last_input = now;
                    shared.events.push_back(Event::Resume(id));
                }
            }
        }
    }

    fn infer(&mut self, id: ConnectionId, job: Infer, shared: &mut Shared<M>) {
        let refused = match (&self.model, shared.config.mode) {
            (_, Mode::LocalLm) => Some(ProtocolError::InferOnLocalLm),
            (None, _) => Some(ProtocolError::ModelNotMounted),
            (Some(model), Mode::ModelPush) => {
                let input = JobInput::Infer {
                    model: Arc::clone(model),
                    input_ids: job.input_ids,
                    max_tokens: job.max_tokens,
                };
                shared
                    .admit(id, job.job_id.clone(), JobKind::Infer, input)
                    .err()
            }
        };
        match refused {
            Some(e) => self.refuse(&e, Some(&job.job_id)),
            None => self.jobs_in_flight += 1,
        }
    }

    fn refuse(&mut self, e: &ProtocolError, job_id: Option<&str>) {
        self.send(&Message::Error(ErrorFrame::new(e, job_id)));
    }

    fn mount_failed(&mut self, e: &MountError) {
        self.send(&Message::ModelStatus(ModelStatus {
            ok: false,
            message: e.to_string(),
        }));
    }
}
