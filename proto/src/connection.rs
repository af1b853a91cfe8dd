//! [`Connection`]: the server side of one byte stream.
//!
//! A connection turns the bytes a client sends into answers and requests:
//! framing, parsing, the mode rules, upload assembly and its timers live
//! here. It owns only its own state. What the node must act on (a job to
//! queue, a model to mount, upload work, a reader to resume) it hands over as
//! [`ToNode`] values; what the node decides (a result, a mount's outcome,
//! returned upload work) comes back as values through its `pub(crate)`
//! methods. The node never edits a connection's fields, and a connection never
//! holds a reference into the node.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::capability::{Capabilities, Capability};
use crate::config::Settings;
use crate::error::{MountError, ProtocolError};
use crate::frame::FrameDecoder;
use crate::id::ConnectionId;
use crate::job::{result_frame, ChatJob, JobInput, JobKind, JobOutcome};
use crate::message::{
    canonical_chunk, check_job_id, salvage_job_id, ChatMessage, ErrorFrame, Hello, Infer, Message,
    Mode, ModelInventory, ModelQuery, ModelStatus, ModelUse, Prompt, QueuePosition,
};
use crate::phase::Phase;
use crate::queue::QueueRoom;
use crate::sampling::SamplingParams;
use crate::secure::{PublicKey, ServerSecure};
use crate::upload::{parse_store_hash, CommittedModel, Upload, UploadWork};

/// What a connection hands its node.
#[derive(Debug)]
pub(crate) enum ToNode<M> {
    /// A job admitted against the [`QueueRoom`] the node handed in: queue it.
    Job {
        job_id: String,
        kind: JobKind,
        input: JobInput<M>,
        /// When it must be answered (`deadline_ms`, `max_job_time`).
        deadline: Option<Instant>,
        sampling: SamplingParams,
    },
    /// Extension `cancel`: stop this connection's job with this `job_id`.
    Cancel(String),
    /// Extension `queue_position`: answer where this job is.
    QueuePosition(String),
    /// Extension `stats`: answer with the node's counters.
    Stats,
    /// A committed upload to verify and load.
    Mount(CommittedModel),
    /// A stretch of an upload to hash or spool.
    Upload(UploadWork),
    /// A closing connection's spooling upload whose spool is away with a
    /// stretch: the node spools its buffered tail when that stretch returns.
    Tail(Box<Upload>),
    /// Input was refused while a spool was behind; it is wanted again.
    Resume,
    /// Extension `store`: which of these models the store holds.
    Query(Vec<[u8; 32]>),
    /// Extension `store`: mount a stored model.
    Use {
        sha256: [u8; 32],
        config_json: String,
    },
}

/// What [`Connection::partial`] did with a partial frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PartialFate {
    /// Queued to send.
    Queued,
    /// Not for this connection: it did not agree `stream`, or is closing.
    Unwanted,
    /// Dropped: the peer is `max_outbound` behind.
    Behind,
}

/// Hashes one `model_query` may ask about.
pub(crate) const MAX_QUERY: usize = 1024;

/// What the node's mode says of a frame: decided here and nowhere else.
enum ModeRule {
    Serve,
    Ignore,
    Refuse(ProtocolError),
}

fn mode_rule(mode: Mode, msg: &Message<'_>) -> ModeRule {
    match (mode, msg) {
        (Mode::LocalLm, Message::ModelBegin(_)) => {
            ModeRule::Refuse(ProtocolError::ModelPushDisabled)
        }
        // The Go node ignores the rest of a refused upload silently.
        (Mode::LocalLm, Message::WeightsChunk(_) | Message::ModelCommit) => ModeRule::Ignore,
        (Mode::LocalLm, Message::Infer(_)) => ModeRule::Refuse(ProtocolError::InferOnLocalLm),
        (Mode::ModelPush, Message::Prompt(_)) => ModeRule::Refuse(ProtocolError::PromptOnModelPush),
        (Mode::LocalLm, Message::ModelQuery(_) | Message::ModelUse(_)) => {
            ModeRule::Refuse(ProtocolError::ModelPushDisabled)
        }
        _ => ModeRule::Serve,
    }
}

/// Commits being mounted, and what waits for them.
#[derive(Debug, Default)]
struct Mounting {
    /// Commits of this connection not answered yet.
    in_flight: usize,
    /// Committed uploads waiting for their upload work to come back.
    waiting: VecDeque<Upload>,
    /// `infer` jobs that arrived while a commit was being mounted.
    parked: VecDeque<Infer>,
}

/// The server side of one connection. Owned by a [`Node`](crate::Node);
/// read it with [`Node::connection`](crate::Node::connection).
#[derive(Debug)]
pub struct Connection<M> {
    id: ConnectionId,
    settings: Arc<Settings>,
    phase: Phase,
    decoder: FrameDecoder,
    outbound: Vec<u8>,
    model: Option<Arc<M>>,
    /// Jobs of this connection queued or running.
    jobs_in_flight: usize,
    mounting: Mounting,
    accepted_at: Instant,
    last_input: Instant,
    over_limit_since: Option<Instant>,
    /// Uploads begun, to number them.
    uploads_begun: u64,
    to_node: VecDeque<ToNode<M>>,
    /// Secure mode's layer under the framing (boxed: most connections are plain).
    secure: Option<Box<ServerSecure>>,
    /// Decrypted input, reused between reads.
    plain: Vec<u8>,
    /// Extensions both sides named in their `hello`s (none for a v1 client).
    agreed: Capabilities,
}

impl<M> Connection<M> {
    /// A new connection with the server `hello` queued; when `refused` (over the
    /// connection limit, or shutting down) it is created closing, with only an
    /// error frame queued.
    pub(crate) fn accept(
        id: ConnectionId,
        settings: Arc<Settings>,
        now: Instant,
        refused: Option<ProtocolError>,
    ) -> Self {
        let mut conn = Connection {
            id,
            decoder: FrameDecoder::new(settings.config.max_frame_len),
            settings,
            phase: Phase::AwaitingHello,
            outbound: Vec::new(),
            model: None,
            jobs_in_flight: 0,
            mounting: Mounting::default(),
            accepted_at: now,
            last_input: now,
            over_limit_since: None,
            uploads_begun: 0,
            to_node: VecDeque::new(),
            secure: None,
            plain: Vec::new(),
            agreed: Capabilities::NONE,
        };
        if let Some(reason) = refused {
            conn.close(reason);
            return conn;
        }
        let (config, secure) = (&conn.settings.config, &conn.settings.secure);
        let hello = Message::Hello(Hello {
            mode: config.mode.as_str().to_owned(),
            role: "server".to_owned(),
            local_lm_path: config.local_lm_path.clone(),
            queue_capacity: config.queue_capacity as i64,
            capabilities: conn.settings.advertised().names(),
        });
        match secure {
            // The hello goes out in plain text, ahead of the handshake it is bound into.
            Some(secure) => conn.secure = Some(Box::new(ServerSecure::new(secure.clone(), &hello))),
            None => conn.send(&hello),
        }
        conn
    }

    /// Whether the node wants more input from this peer: false while it is
    /// closing, while its unsent answers are over `max_outbound`, or while its
    /// spooled upload has gathered two stretches that a worker has not taken yet.
    pub fn wants_read(&self) -> bool {
        self.phase.closing().is_none()
            && self.outbound.len() < self.settings.config.max_outbound
            && !self.spool_backlogged()
    }

    /// Whether the upload's spool is behind: the node waits for it, not the peer.
    fn spool_backlogged(&self) -> bool {
        self.phase
            .upload()
            .is_some_and(|u| u.backlogged(2 * self.settings.config.upload_stretch))
    }

    /// Why the connection is closing, once it is: flush its transmit bytes, then close.
    pub fn closing(&self) -> Option<&ProtocolError> {
        self.phase.closing()
    }

    /// Bytes waiting to be written to the peer.
    pub fn pending_transmit(&self) -> usize {
        self.outbound.len() + self.secure.as_ref().map_or(0, |s| s.pending())
    }

    /// Secure mode: the handshake is not done, or the key not let in yet.
    pub(crate) fn in_handshake(&self) -> bool {
        self.secure.as_ref().is_some_and(|s| !s.authorized())
    }

    /// In secure mode, the client's key once its handshake is done.
    pub fn peer_key(&self) -> Option<&PublicKey> {
        self.secure.as_ref()?.peer()
    }

    /// The extensions this connection's client opted into: those the node
    /// offered that its `hello` named. Empty for a v1 client.
    pub fn capabilities(&self) -> Capabilities {
        self.agreed
    }

    /// Jobs of this connection queued or running (answers still to come).
    pub fn jobs_in_flight(&self) -> usize {
        self.jobs_in_flight
    }

    /// Commits of this connection being mounted.
    pub(crate) fn mounts_in_flight(&self) -> usize {
        self.mounting.in_flight
    }

    /// Whether a model is mounted on this connection.
    pub fn has_model(&self) -> bool {
        self.model.is_some()
    }

    /// Heap bytes held for this connection: input buffer, output buffer and uploads.
    pub fn allocated(&self) -> usize {
        let upload = self.phase.upload().map_or(0, Upload::allocated);
        let waiting: usize = self.mounting.waiting.iter().map(Upload::allocated).sum();
        let secure = self.secure.as_ref().map_or(0, |s| s.allocated());
        self.decoder.allocated() + self.outbound.capacity() + upload + waiting + secure
    }

    /// The earliest time at which [`Node::handle_timeout`](crate::Node::handle_timeout) has work here.
    pub fn deadline(&self) -> Option<Instant> {
        self.expiry().map(|(at, _)| at)
    }

    /// The earliest timer and what it closes with.
    fn expiry(&self) -> Option<(Instant, ProtocolError)> {
        let config = &self.settings.config;
        if self.phase.closing().is_some() {
            return None;
        }
        let partial =
            self.decoder.has_partial() || self.secure.as_ref().is_some_and(|s| s.has_partial());
        let idle = self.jobs_in_flight == 0 && self.mounting.in_flight == 0 && !partial;
        [
            self.over_limit_since
                .map(|t| (t + config.backpressure_timeout, ProtocolError::Backpressure)),
            // Not while the node itself holds the peer back.
            (partial && !self.spool_backlogged()).then(|| {
                (
                    self.last_input + config.stall_timeout,
                    ProtocolError::Stalled,
                )
            }),
            matches!(self.phase, Phase::AwaitingHello).then(|| {
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
    pub(crate) fn handle_timeout(&mut self, now: Instant) -> bool {
        match self.expiry() {
            Some((at, reason)) if at <= now => {
                self.close(reason);
                true
            }
            _ => false,
        }
    }

    /// Starts closing. A peer that is not reading or has closed gets no last
    /// frame; any other gets an error frame saying why.
    pub(crate) fn close(&mut self, reason: ProtocolError) {
        match reason {
            _ if self.phase.closing().is_some() => return,
            ProtocolError::Backpressure => self.outbound = Vec::new(),
            ProtocolError::PeerClosed => {}
            _ => self.send(&Message::Error(ErrorFrame::new(&reason, None))),
        }
        self.over_limit_since = None;
        // A spooling upload's buffered tail goes to its spool before the upload
        // is dropped: a model store keeps it with the partial upload, to resume from.
        let id = self.id;
        if let Some(upload) = self.phase.upload_mut().filter(|u| u.is_spooling()) {
            if let Some(work) = upload.upload_work(id, 1) {
                self.to_node.push_back(ToNode::Upload(work));
            } else if upload.work_away() && upload.buffered() > 0 {
                // The spool is with the upload thread: the node keeps the
                // upload until it is back, then spools the tail.
                if let Phase::Uploading(upload) = std::mem::replace(&mut self.phase, Phase::Ready) {
                    self.to_node.push_back(ToNode::Tail(upload));
                }
            }
        }
        self.phase.close(reason);
    }

    /// The next value for the node.
    pub(crate) fn poll_to_node(&mut self) -> Option<ToNode<M>> {
        self.to_node.pop_front()
    }

    fn send(&mut self, msg: &Message<'_>) {
        msg.encode(&mut self.outbound);
    }

    /// Starts the backpressure timer when the transmit buffer crosses the limit.
    fn note_output(&mut self, now: Instant) {
        if self.over_limit_since.is_none()
            && self.outbound.len() >= self.settings.config.max_outbound
        {
            self.over_limit_since = Some(now);
        }
    }

    /// Moves the transmit bytes into `out` (swapping buffers when `out` is empty).
    pub(crate) fn poll_transmit(&mut self, out: &mut Vec<u8>) {
        if let Some(secure) = &mut self.secure {
            secure.transmit(&mut self.outbound, out);
        } else if out.is_empty() {
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

    // ---- values from the node ----

    /// A job of this connection ended; its result is sent unless the connection is closing.
    /// Returns whether it was.
    pub(crate) fn job_done(
        &mut self,
        kind: JobKind,
        job_id: String,
        queue_depth: usize,
        outcome: JobOutcome,
        now: Instant,
    ) -> bool {
        self.jobs_in_flight -= 1;
        if self.phase.closing().is_some() {
            return false;
        }
        self.send(&result_frame(kind, job_id, queue_depth, outcome));
        self.note_output(now);
        true
    }

    /// A commit was mounted (or refused): install the model and answer, unless closing.
    pub(crate) fn mount_done(
        &mut self,
        result: Result<Arc<M>, String>,
        room: &mut QueueRoom,
        now: Instant,
    ) {
        self.mounting.in_flight -= 1;
        if self.phase.closing().is_some() {
            // Nothing follows the closing error (or a peer's close): the model
            // and its answer are dropped, as a closing connection's job results are.
            self.mounting.parked.clear();
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
        self.release_parked(room);
        self.note_output(now);
    }

    /// Upload work came back: a waiting commit proceeds, or receiving goes on.
    pub(crate) fn upload_work_done(
        &mut self,
        work: UploadWork,
        room: &mut QueueRoom,
        now: Instant,
    ) {
        let waiting = self
            .mounting
            .waiting
            .iter()
            .position(|u| u.id == work.upload);
        if let Some(i) = waiting {
            let mut upload = self
                .mounting
                .waiting
                .remove(i)
                .expect("position is in range");
            self.mounting.in_flight -= 1;
            if self.phase.closing().is_some() {
                return;
            }
            upload.work_returned(work);
            self.commit(upload);
            // A commit refused at once (no config, bytes missing) frees the parked jobs.
            self.release_parked(room);
        } else if self.phase.upload().is_some_and(|u| u.id == work.upload) {
            // (A closing connection has no upload: its work is dropped here.)
            let was_backlogged = self.spool_backlogged();
            if let Some(upload) = self.phase.upload_mut() {
                upload.work_returned(work);
            }
            if let Some(why) = self.phase.upload().and_then(Upload::refused) {
                // Refused before its bytes are stored: said now, as a refused
                // `model_begin` is, not after the client sent them all.
                let e = ProtocolError::UploadRefused(why.to_owned());
                self.upload_failed(&e);
            } else {
                self.send_upload_work();
            }
            if was_backlogged && self.wants_read() {
                // The stall timer starts again from here.
                self.last_input = now;
                self.to_node.push_back(ToNode::Resume);
            }
        }
        self.note_output(now);
    }

    // ---- input ----

    /// Feeds input bytes; frames are answered here or handed to the node.
    /// Jobs are admitted against `room`, which the node reads back.
    pub(crate) fn handle_input(&mut self, data: &[u8], now: Instant, room: &mut QueueRoom) {
        if self.phase.closing().is_some() || data.is_empty() {
            return;
        }
        self.last_input = now;
        match &mut self.secure {
            None => self.feed_frames(data, room),
            Some(secure) => {
                let mut plain = std::mem::take(&mut self.plain);
                match secure.read(data, &mut plain) {
                    Ok(()) => self.feed_frames(&plain, room),
                    Err(e) => self.close(e),
                }
                plain.clear();
                // An upload keeps its buffer (a fresh one per read is a fresh
                // mapping to fault in); an idle connection keeps no large one.
                if plain.capacity() <= 16 * 1024 || self.phase.upload().is_some() {
                    self.plain = plain;
                }
            }
        }
        self.note_output(now);
    }

    /// Feeds the v1 byte stream to the frame decoder.
    fn feed_frames(&mut self, data: &[u8], room: &mut QueueRoom) {
        if data.is_empty() {
            return;
        }
        let mut decoder = std::mem::replace(&mut self.decoder, FrameDecoder::new(0));
        let fed = decoder.feed(data, |body| self.handle_frame(body, room));
        self.decoder = decoder;
        if let Err(e) = fed {
            self.close(e.into());
        }
    }

    fn handle_frame(&mut self, body: &[u8], room: &mut QueueRoom) {
        if self.phase.closing().is_some() {
            return;
        }
        let first = self.phase.frame_received();
        if self.fast_chunk(body) {
            return;
        }
        let max_id = self.settings.config.max_job_id_len;
        let msg = match Message::parse(body) {
            Ok(msg) => msg,
            Err(e) => return self.refuse(&e, salvage_job_id(body, max_id).as_deref()),
        };
        // A bad `job_id` runs nothing; its refusal names it only if it is not too long.
        if let Some(Err(e)) = msg.named_job_id().map(|id| check_job_id(id, max_id)) {
            let echo = msg.named_job_id().filter(|id| id.len() <= max_id);
            return self.refuse(&e, echo);
        }
        match mode_rule(self.settings.config.mode, &msg) {
            ModeRule::Serve => {}
            ModeRule::Ignore => return,
            ModeRule::Refuse(e) => return self.refuse(&e, msg.job_id()),
        }
        match msg {
            // Only a first-frame hello opts in: what a connection agreed never changes.
            Message::Hello(hello) if first => {
                self.agreed = Capabilities::from_names(&hello.capabilities)
                    .intersect(self.settings.offered)
                    .without(Capability::Secure);
            }
            Message::Hello(_) => {}
            Message::ModelBegin(_) | Message::WeightsChunk(_) | Message::ModelCommit => {
                self.on_upload_frame(msg)
            }
            Message::Infer(job) => self.on_infer(job, room),
            Message::Prompt(job) => self.on_prompt(job, room),
            Message::QueueStatusRequest | Message::QueueStatus(_) => {
                self.send(&Message::QueueStatus(room.status()));
            }
            Message::ModelQuery(_) | Message::ModelUse(_)
                if !self.agreed.contains(Capability::Store) =>
            {
                // What a v1 node answers: the client did not opt in.
                self.refuse(&ProtocolError::UnknownType(msg.kind().to_owned()), None);
            }
            Message::ModelQuery(query) => self.on_query(query),
            Message::ModelUse(model) => self.on_use(model),
            Message::ModelStatus(_)
            | Message::InferResult(_)
            | Message::PromptResult(_)
            | Message::ModelInventory(_)
            | Message::InferPartial(_)
            | Message::PromptPartial(_)
            | Message::Error(_) => {
                self.refuse(&ProtocolError::UnknownType(msg.kind().to_owned()), None);
            }
            Message::Cancel(job) if self.agreed.contains(Capability::Cancel) => {
                self.to_node.push_back(ToNode::Cancel(job.job_id));
            }
            Message::QueuePositionRequest(job)
                if self.agreed.contains(Capability::QueuePosition) =>
            {
                self.to_node.push_back(ToNode::QueuePosition(job.job_id));
            }
            Message::StatsRequest if self.agreed.contains(Capability::Stats) => {
                self.to_node.push_back(ToNode::Stats);
            }
            Message::Cancel(_)
            | Message::QueuePositionRequest(_)
            | Message::Queued(_)
            | Message::QueuePosition(_)
            | Message::StatsRequest
            | Message::Stats(_) => self.unknown_extension(&msg),
        }
    }

    /// An extension message from a client that did not opt into it (or one
    /// only a node sends): answered exactly as v1 answers a type it does not
    /// know, so a v1 peer sees v1 bytes.
    fn unknown_extension(&mut self, msg: &Message<'_>) {
        let job_id = match msg {
            Message::Cancel(j) | Message::QueuePositionRequest(j) => &j.job_id,
            Message::Queued(p) | Message::QueuePosition(p) => &p.job_id,
            _ => "",
        };
        let e = ProtocolError::UnknownType(msg.kind().to_owned());
        let job_id = (!job_id.is_empty()).then(|| job_id.to_owned());
        self.refuse(&e, job_id.as_deref());
    }

    fn refuse(&mut self, e: &ProtocolError, job_id: Option<&str>) {
        self.send(&Message::Error(ErrorFrame::new(e, job_id)));
    }

    // ---- uploads ----

    /// The hot path of an upload: a chunk in the canonical layout, decoded
    /// without a JSON parse. Anything unusual (including any error) returns
    /// false and takes the general path, which gives the precise answer.
    fn fast_chunk(&mut self, body: &[u8]) -> bool {
        let Some(upload) = self.phase.upload_mut() else {
            return false;
        };
        let appended = canonical_chunk(body)
            .is_some_and(|c| upload.append(c.index, c.last, c.data_b64).is_ok());
        if appended {
            self.send_upload_work();
        }
        appended
    }

    fn on_upload_frame(&mut self, msg: Message<'_>) {
        match msg {
            Message::ModelBegin(begin) => {
                let config = &self.settings.config;
                let resumable = self.agreed.contains(Capability::Store);
                match Upload::begin_with(
                    begin,
                    config.max_model_len,
                    self.settings.uploads,
                    resumable,
                ) {
                    Ok(mut upload) => {
                        self.uploads_begun += 1;
                        upload.id = self.uploads_begun;
                        if let Some(work) = upload.open_work(self.id) {
                            self.to_node.push_back(ToNode::Upload(work));
                        }
                        self.phase = Phase::Uploading(Box::new(upload));
                    }
                    Err(e) => self.upload_failed(&e),
                }
            }
            Message::WeightsChunk(chunk) => {
                let failure = match &mut self.phase {
                    Phase::Uploading(upload) => upload.chunk(&chunk).err(),
                    Phase::UploadFailed => None,
                    _ => Some(ProtocolError::ChunkWithoutBegin),
                };
                match failure {
                    Some(e) => self.upload_failed(&e),
                    None => self.send_upload_work(),
                }
            }
            Message::ModelCommit => match self.phase.end_upload(false) {
                Phase::Uploading(upload) => self.commit(*upload),
                Phase::UploadFailed => {}
                _ => self.mount_failed(&MountError::CommitWithoutBegin),
            },
            _ => unreachable!("only upload frames come here"),
        }
    }

    fn upload_failed(&mut self, e: &ProtocolError) {
        self.phase.end_upload(true);
        self.refuse(e, None);
    }

    /// Hands the upload's new bytes over (to hash or spool) whenever its
    /// carried state is home and enough have arrived.
    fn send_upload_work(&mut self) {
        let (id, stretch) = (self.id, self.settings.config.upload_stretch);
        if let Some(work) = self
            .phase
            .upload_mut()
            .and_then(|u| u.upload_work(id, stretch))
        {
            self.to_node.push_back(ToNode::Upload(work));
        }
    }

    /// Answers a commit, or starts its mount; waits first if its upload work is away.
    fn commit(&mut self, upload: Upload) {
        if upload.work_away() {
            self.mounting.in_flight += 1;
            self.mounting.waiting.push_back(upload);
            return;
        }
        match upload.commit() {
            Ok(model) => {
                self.mounting.in_flight += 1;
                self.to_node.push_back(ToNode::Mount(model));
            }
            Err(e) => self.mount_failed(&e),
        }
    }

    fn mount_failed(&mut self, e: &MountError) {
        self.send(&Message::ModelStatus(ModelStatus {
            ok: false,
            message: e.to_string(),
        }));
    }

    // ---- the store (extension `store`) ----

    fn on_query(&mut self, query: ModelQuery) {
        if query.hashes.len() > MAX_QUERY {
            return self.refuse(&ProtocolError::QueryTooLarge(MAX_QUERY), None);
        }
        let hashes: Option<Vec<_>> = query.hashes.iter().map(|h| parse_store_hash(h)).collect();
        match hashes {
            Some(hashes) => self.to_node.push_back(ToNode::Query(hashes)),
            None => self.refuse(&ProtocolError::BadWeightsSha256, None),
        }
    }

    fn on_use(&mut self, model: ModelUse) {
        let Some(sha256) = parse_store_hash(&model.weights_sha256) else {
            return self.refuse(&ProtocolError::BadWeightsSha256, None);
        };
        if model.config_json.is_empty() {
            return self.mount_failed(&MountError::NoConfig);
        }
        // Mounted like a commit: jobs sent after it wait for it.
        self.mounting.in_flight += 1;
        self.to_node.push_back(ToNode::Use {
            sha256,
            config_json: model.config_json,
        });
    }

    /// The store's answer to a `model_query`.
    pub(crate) fn inventory(&mut self, inventory: ModelInventory, now: Instant) {
        if self.phase.closing().is_none() {
            self.send(&Message::ModelInventory(inventory));
            self.note_output(now);
        }
    }

    // ---- jobs ----

    fn on_infer(&mut self, job: Infer, room: &mut QueueRoom) {
        if self.mounting.in_flight > 0 {
            // A pipelining client may send jobs right after its commit: they
            // wait for the mount and run on the model it produces.
            if self.mounting.parked.len() < self.settings.config.queue_capacity {
                self.mounting.parked.push_back(job);
            } else {
                self.refuse(&ProtocolError::QueueFull, Some(&job.job_id));
            }
            return;
        }
        let Some(model) = &self.model else {
            return self.refuse(&ProtocolError::ModelNotMounted, Some(&job.job_id));
        };
        let input = JobInput::Infer {
            model: Arc::clone(model),
            input_ids: job.input_ids,
            max_tokens: job.max_tokens,
        };
        let sampling = self.sampling_of(job.sampling);
        self.queue_job(
            job.job_id,
            JobKind::Infer,
            input,
            job.deadline_ms,
            sampling,
            room,
        );
    }

    fn on_prompt(&mut self, mut job: Prompt, room: &mut QueueRoom) {
        let chat = match self.chat_of(&mut job) {
            Ok(chat) => chat,
            Err(e) => return self.refuse(&e, Some(&job.job_id)),
        };
        let input = JobInput::Prompt {
            prompt: job.prompt,
            max_out: job.max_out,
            chat,
        };
        let sampling = self.sampling_of(job.sampling);
        self.queue_job(
            job.job_id,
            JobKind::Prompt,
            input,
            job.deadline_ms,
            sampling,
            room,
        );
    }

    /// Extension `chat`: a prompt's conversation or `raw` flag, read only
    /// from a client that agreed `chat` (a v1 client's stray fields mean
    /// nothing). A conversation replaces the text, so both at once, or a
    /// turn of an unknown role, is a bad field.
    fn chat_of(&self, job: &mut Prompt) -> Result<Option<ChatJob>, ProtocolError> {
        if !self.agreed.contains(Capability::Chat) {
            return Ok(None);
        }
        if !job.messages.is_empty() && (!job.prompt.is_empty() || job.raw) {
            return Err(ProtocolError::BadField(
                "a prompt carries either messages or prompt text, not both".to_owned(),
            ));
        }
        if let Some(turn) = job
            .messages
            .iter()
            .find(|m| !ChatMessage::ROLES.contains(&m.role.as_str()))
        {
            return Err(ProtocolError::BadField(format!(
                "messages: role {:?} is not one of system, user, assistant",
                turn.role.chars().take(32).collect::<String>()
            )));
        }
        Ok(Some(ChatJob {
            messages: std::mem::take(&mut job.messages),
            raw: job.raw,
        }))
    }

    /// A job's sampling fields, read only from a client that agreed `sampling`
    /// (a v1 client's stray fields of the same names mean nothing).
    fn sampling_of(&self, sent: SamplingParams) -> SamplingParams {
        if self.agreed.contains(Capability::Sampling) {
            sent
        } else {
            SamplingParams::default()
        }
    }

    /// A running job's partial output (extension `stream`): queued when this
    /// connection agreed `stream`, is not closing, and holds less than
    /// `max_outbound` unsent bytes. It counts against that limit as results do.
    pub(crate) fn partial(&mut self, msg: &Message<'_>, now: Instant) -> PartialFate {
        if !self.agreed.contains(Capability::Stream) || self.phase.closing().is_some() {
            return PartialFate::Unwanted;
        }
        if self.outbound.len() >= self.settings.config.max_outbound {
            return PartialFate::Behind;
        }
        self.send(msg);
        self.note_output(now);
        PartialFate::Queued
    }

    fn queue_job(
        &mut self,
        job_id: String,
        kind: JobKind,
        input: JobInput<M>,
        deadline_ms: i64,
        sampling: SamplingParams,
        room: &mut QueueRoom,
    ) {
        let deadline = match self.job_deadline(deadline_ms) {
            Ok(deadline) => deadline,
            Err(e) => return self.refuse(&e, Some(&job_id)),
        };
        match room.admit() {
            Ok(()) => {
                self.jobs_in_flight += 1;
                self.to_node.push_back(ToNode::Job {
                    job_id,
                    kind,
                    input,
                    deadline,
                    sampling,
                });
            }
            Err(e) => self.refuse(&e, Some(&job_id)),
        }
    }

    /// When a job received now must be answered: its `deadline_ms` (read
    /// only from a client that opted into `deadline`) or the node's
    /// `max_job_time`, whichever comes first.
    fn job_deadline(&self, deadline_ms: i64) -> Result<Option<Instant>, ProtocolError> {
        let received = self.last_input;
        let asked = match deadline_ms {
            _ if !self.agreed.contains(Capability::Deadline) => None,
            0 => None,
            ms if ms < 0 => {
                return Err(ProtocolError::BadField(format!(
                    "deadline_ms must be positive, got {ms}"
                )))
            }
            // A deadline past what the clock can hold is no deadline.
            ms => received.checked_add(Duration::from_millis(ms as u64)),
        };
        let bound = self
            .settings
            .config
            .max_job_time
            .and_then(|t| received.checked_add(t));
        Ok(asked.into_iter().chain(bound).min())
    }

    // ---- extension answers from the node ----

    /// Extension `queue_position`: a job was queued at `position`.
    pub(crate) fn job_queued(&mut self, job_id: &str, position: usize) {
        if self.agreed.contains(Capability::QueuePosition) {
            self.send(&Message::Queued(QueuePosition {
                job_id: job_id.to_owned(),
                position: position as i64,
            }));
        }
    }

    /// Extension `queue_position`: the answer to a request.
    pub(crate) fn send_position(&mut self, job_id: String, position: i64, now: Instant) {
        self.send(&Message::QueuePosition(QueuePosition { job_id, position }));
        self.note_output(now);
    }

    /// Extension `stats`: the answer to a request.
    pub(crate) fn send_stats(&mut self, stats: crate::message::Stats, now: Instant) {
        self.send(&Message::Stats(stats));
        self.note_output(now);
    }

    /// `n` queued jobs of this closing connection were dropped unanswered.
    pub(crate) fn jobs_dropped(&mut self, n: usize) {
        self.jobs_in_flight -= n;
    }

    /// Once no commit is being mounted, the `infer`s that waited for one run
    /// (on whatever model is mounted now) or are refused.
    fn release_parked(&mut self, room: &mut QueueRoom) {
        if self.mounting.in_flight == 0 {
            for job in std::mem::take(&mut self.mounting.parked) {
                self.on_infer(job, room);
            }
        }
    }
}
