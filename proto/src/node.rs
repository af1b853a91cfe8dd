//! [`Node`]: a donor node's whole protocol state, with no I/O.
//!
//! The node owns every [`Connection`] and the one FIFO job queue. The caller
//! (a host or adapter) moves bytes and time in and out:
//!
//! - [`accept`](Node::accept) a connection; its `hello` is queued at once;
//! - [`handle_input`](Node::handle_input) with the bytes it read and `now`;
//! - [`poll_transmit`](Node::poll_transmit) for the bytes to write;
//! - [`poll_event`](Node::poll_event) for work: wake a connection, run a job, mount a model;
//! - [`next_job`](Node::next_job) on a worker, then [`complete`](Node::complete);
//! - [`poll_timeout`](Node::poll_timeout) / [`handle_timeout`](Node::handle_timeout);
//! - [`remove`](Node::remove) once the socket is gone.
//!
//! Each call on one connection hands it values (the queue's room, a job's
//! outcome, a mount's outcome) and then takes what it hands back: jobs to
//! queue, mounts, upload work. Neither holds a reference into the other.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::capability::{Capabilities, Capability};
use crate::config::{ServerConfig, Settings, UploadHandling};
use crate::connection::{Connection, PartialFate, ToNode};
use crate::error::ProtocolError;
use crate::id::{ConnectionId, JobId};
use crate::job::{Job, JobKind, JobOutcome, Partial, Stop};
use crate::message::{InferPartial, Message, ModelInventory, PromptPartial, QueueStatus};
use crate::queue::{Cancelled, JobQueue, Route};
use crate::secure::SecureServerConfig;
use crate::upload::{CommittedModel, UploadWork};

/// Something the caller must act on, from [`Node::poll_event`]. Events of
/// extensions come only from a node that [offers](Node::offer) them.
///
/// Exhaustive on purpose: a new event is a compile error in every driver
/// that does not handle it, rather than work silently dropped.
#[derive(Debug)]
pub enum Event {
    /// A connection got bytes to transmit or started closing from outside its
    /// own input (a result, a mount, a timeout, shutdown): wake its writer.
    Wake(ConnectionId),
    /// A connection that [`Node::wants_read`] refused (its spooled upload was
    /// behind) wants input again: wake its reader.
    Resume(ConnectionId),
    /// A job was queued: a worker should call [`Node::next_job`] (which
    /// finds nothing if the job was cancelled or dropped in the meantime).
    JobQueued,
    /// Only with an [`UploadHandling`] other than `InMemory`: part of an upload
    /// to hash or spool with [`run_upload`](crate::run_upload), then hand back
    /// with [`Node::upload_work_done`].
    Upload(UploadWork),
    /// A committed model to load: run it on a worker with
    /// [`run_mount`](crate::run_mount) and hand the outcome to [`Node::mount_done`].
    Mount(Mount),
    /// Extension `store`: a client asks which of these models the store
    /// holds (empty: every one); answer with [`Node::inventory_done`].
    Query {
        /// The asking connection.
        conn: ConnectionId,
        /// SHA-256s of model weights.
        hashes: Vec<[u8; 32]>,
    },
    /// Extension `store`: mount a stored model (verify it if it was not
    /// verified since the node started) and hand the outcome to [`Node::mount_done`].
    UseStored(StoredMount),
}

/// A stored model to mount, from [`Event::UseStored`].
#[derive(Debug)]
pub struct StoredMount {
    /// Hand this back in the [`MountOutcome`].
    pub token: MountToken,
    /// The SHA-256 of the weights: the store entry's name.
    pub sha256: [u8; 32],
    /// The config to mount it with.
    pub config_json: String,
}

/// Identifies one commit being mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountToken {
    conn: ConnectionId,
}

/// A committed upload waiting to be verified and loaded.
#[derive(Debug)]
pub struct Mount {
    /// Hand this back in the [`MountOutcome`].
    pub token: MountToken,
    /// The upload.
    pub model: CommittedModel,
}

/// The result of loading a [`Mount`].
#[derive(Debug)]
pub struct MountOutcome<M> {
    /// From the [`Mount`].
    pub token: MountToken,
    /// The loaded model, or the reason it was refused.
    pub result: Result<Arc<M>, String>,
}

/// What the core did that its driver cannot see, for metrics: queued jobs
/// removed before they ran. From [`Node::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct NodeStats {
    /// Removed by a client's `cancel`.
    pub cancelled_queued: u64,
    /// Removed when their deadline passed.
    pub expired_queued: u64,
    /// Dropped with their connection.
    pub dropped_queued: u64,
    /// Connections accepted (refused ones included).
    pub connections_accepted: u64,
    /// Jobs handed back ok.
    pub jobs_done: u64,
    /// Jobs handed back failed, or stopped by the node.
    pub jobs_failed: u64,
}

/// A donor node: every connection's state and the one FIFO job queue.
///
/// `M` is the executor's model type ([`Executor::Model`](crate::Executor::Model)).
#[derive(Debug)]
pub struct Node<M> {
    settings: Arc<Settings>,
    conns: HashMap<ConnectionId, Connection<M>>,
    queue: JobQueue<M>,
    events: VecDeque<Event>,
    /// Spooling uploads of closed connections whose spool was with the upload
    /// thread at the close: their buffered tail is spooled when it comes back.
    tails: HashMap<(ConnectionId, u64), Box<crate::upload::Upload>>,
    next_conn: u64,
    stats: NodeStats,
    /// Secure mode: connections in their handshake and not closing, oldest
    /// first, with their source; they do not count against `max_connections`.
    handshakes: BTreeMap<ConnectionId, Option<IpAddr>>,
    /// How many of `handshakes` each source holds.
    per_source: HashMap<IpAddr, usize>,
    /// Connections closing without ever having been let in (refused at
    /// accept, or closed in their handshake): they only flush an error frame,
    /// and do not count against `max_connections`.
    unadmitted: HashSet<ConnectionId>,
}

/// The source a handshake counts against: the address, or an IPv6 one's /64.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !(u128::MAX >> 64)).into()),
        },
    }
}

impl<M> Node<M> {
    /// A node that holds uploads in memory ([`UploadHandling::InMemory`]).
    pub fn new(config: ServerConfig) -> Self {
        Node::with_uploads(config, UploadHandling::InMemory)
    }

    /// A node whose driver takes over upload work as `uploads` says: it then
    /// runs every [`Event::Upload`] and hands it back.
    pub fn with_uploads(config: ServerConfig, uploads: UploadHandling) -> Self {
        Node {
            queue: JobQueue::new(config.queue_capacity),
            settings: Arc::new(Settings {
                config,
                uploads,
                secure: None,
                offered: Capabilities::NONE,
            }),
            conns: HashMap::new(),
            events: VecDeque::new(),
            tails: HashMap::new(),
            next_conn: 0,
            stats: NodeStats::default(),
            handshakes: BTreeMap::new(),
            per_source: HashMap::new(),
            unadmitted: HashSet::new(),
        }
    }

    /// Secure mode for connections accepted from now on: each must complete
    /// a Noise handshake with a key `secure` authorizes (docs/PROTOCOL.md, `secure`).
    pub fn with_secure(mut self, secure: SecureServerConfig) -> Self {
        let mut settings = (*self.settings).clone();
        settings.secure = Some(secure);
        self.settings = Arc::new(settings);
        self
    }

    /// Offers `extensions` (docs/PROTOCOL.md §10) to connections accepted from
    /// now on: the node's `hello` lists them, and each connection uses those its
    /// client's `hello` names. Offer only what the driver and executor honour.
    /// (`secure` is not offered here: [`with_secure`](Node::with_secure) requires it.)
    pub fn offer(mut self, extensions: Capabilities) -> Self {
        let mut settings = (*self.settings).clone();
        settings.offered = extensions.without(Capability::Secure);
        self.settings = Arc::new(settings);
        self
    }

    /// The node's configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.settings.config
    }

    /// Registers a new connection and queues its `hello`. Over `max_connections`
    /// or during shutdown the connection is created closing, with only an
    /// error frame to send. In secure mode, prefer [`accept_from`](Node::accept_from).
    pub fn accept(&mut self, now: Instant) -> ConnectionId {
        self.accept_from(None, now)
    }

    /// [`accept`](Node::accept) a connection from `source`, the peer's IP
    /// address (`None` when it has none, as on a Unix socket). In secure
    /// mode a connection in its handshake counts against `max_handshakes`
    /// and its source's `max_handshakes_per_source` rather than
    /// `max_connections`, so clients without a key cannot take the slots of
    /// those with one: over the per-source limit it is refused; over
    /// `max_handshakes` a handshake of the source holding the most is closed
    /// to make room (its oldest), so a flood from a few addresses cannot
    /// push out a client's handshake from another.
    pub fn accept_from(&mut self, source: Option<IpAddr>, now: Instant) -> ConnectionId {
        self.next_conn += 1;
        self.stats.connections_accepted += 1;
        let id = ConnectionId(self.next_conn);
        let config = &self.settings.config;
        let (max_handshakes, per_source) =
            (config.max_handshakes, config.max_handshakes_per_source);
        let source = source.map(source_key);
        let secure = self.settings.secure.is_some();
        let counted = self.admitted();
        let refused = if self.queue.is_closed() {
            Some(ProtocolError::ShuttingDown)
        } else if counted >= config.max_connections {
            Some(ProtocolError::TooManyConnections)
        } else if !secure {
            None
        } else if max_handshakes == 0
            || source.is_some_and(|ip| self.per_source.get(&ip).copied().unwrap_or(0) >= per_source)
        {
            Some(ProtocolError::TooManyHandshakes)
        } else {
            while self.handshakes.len() >= max_handshakes {
                self.evict_a_handshake();
            }
            None
        };
        let admitted = refused.is_none();
        let conn = Connection::accept(id, Arc::clone(&self.settings), now, refused);
        self.conns.insert(id, conn);
        if !admitted {
            self.unadmitted.insert(id);
        }
        if secure && admitted {
            self.handshakes.insert(id, source);
            if let Some(ip) = source {
                *self.per_source.entry(ip).or_default() += 1;
            }
        }
        id
    }

    /// Connections let in and not closing without having been let in: those
    /// `max_connections` bounds.
    fn admitted(&self) -> usize {
        (self.conns.len())
            .saturating_sub(self.handshakes.len())
            .saturating_sub(self.unadmitted.len())
    }

    /// Closes a connection in its handshake to make room for a new one: the
    /// oldest of the source holding the most handshakes.
    fn evict_a_handshake(&mut self) {
        // Linear in the handshakes (bounded by `max_handshakes`), never quadratic.
        let sourceless = self.handshakes.values().filter(|s| s.is_none()).count();
        let held = |source: &Option<IpAddr>| match source {
            Some(ip) => self.per_source.get(ip).copied().unwrap_or(0),
            None => sourceless,
        };
        let most = self.handshakes.values().map(held).max().unwrap_or(0);
        let Some(victim) = self
            .handshakes
            .iter()
            .find(|(_, s)| held(s) == most)
            .map(|(&id, _)| id)
        else {
            return;
        };
        self.release_handshake(victim);
        self.unadmitted.insert(victim);
        if let Some(c) = self.conns.get_mut(&victim) {
            c.close(ProtocolError::TooManyHandshakes);
            self.events.push_back(Event::Wake(victim));
        }
        self.abandon_if_closing(victim);
    }

    /// Takes `conn` out of the handshake budget.
    fn release_handshake(&mut self, conn: ConnectionId) {
        if let Some(Some(ip)) = self.handshakes.remove(&conn) {
            if let Some(n) = self.per_source.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    self.per_source.remove(&ip);
                }
            }
        }
    }

    /// A connection in its handshake leaves the budget once it closes or is
    /// let in; let in, it counts against `max_connections`, and over it closes.
    fn settle_handshake(&mut self, conn: ConnectionId) {
        if !self.handshakes.contains_key(&conn) {
            return;
        }
        let Some(c) = self.conns.get_mut(&conn) else {
            return self.release_handshake(conn);
        };
        if c.closing().is_some() {
            self.unadmitted.insert(conn);
            return self.release_handshake(conn);
        }
        if c.in_handshake() {
            return;
        }
        self.release_handshake(conn);
        if self.admitted() > self.settings.config.max_connections {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.close(ProtocolError::TooManyConnections);
                self.events.push_back(Event::Wake(conn));
            }
            self.unadmitted.insert(conn);
            self.abandon_if_closing(conn);
        }
    }

    /// Connections in their secure handshake, not closing (for inspection).
    pub fn handshakes(&self) -> usize {
        self.handshakes.len()
    }

    /// Feeds bytes read from `conn`. Answers land in its transmit buffer; jobs
    /// and mounts become events. Unknown ids are ignored.
    pub fn handle_input(&mut self, conn: ConnectionId, data: &[u8], now: Instant) {
        let mut room = self.queue.room();
        if let Some(c) = self.conns.get_mut(&conn) {
            c.handle_input(data, now, &mut room);
            self.take_from(conn, now);
            self.abandon_if_closing(conn);
            self.settle_handshake(conn);
        }
    }

    /// Moves `conn`'s pending bytes into `out`. Call it again only once `out`
    /// has been written: what sits in `out` is what the backpressure limit
    /// cannot see.
    pub fn poll_transmit(&mut self, conn: ConnectionId, out: &mut Vec<u8>) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.poll_transmit(out);
        }
    }

    /// Whether to read more from `conn` (false when closing, unknown, or backpressured).
    pub fn wants_read(&self, conn: ConnectionId) -> bool {
        self.conns.get(&conn).is_some_and(Connection::wants_read)
    }

    /// Whether `conn` should be closed once its pending bytes are written
    /// (true for unknown ids).
    pub fn is_closing(&self, conn: ConnectionId) -> bool {
        self.conns.get(&conn).is_none_or(|c| c.closing().is_some())
    }

    /// A connection's state, for inspection.
    pub fn connection(&self, conn: ConnectionId) -> Option<&Connection<M>> {
        self.conns.get(&conn)
    }

    /// Ids of every connection not yet removed.
    pub fn connections(&self) -> impl Iterator<Item = ConnectionId> + '_ {
        self.conns.keys().copied()
    }

    /// The peer closed its side (end of stream): `conn` starts closing with no
    /// error frame; answers already queued are still transmitted, later ones dropped.
    pub fn peer_closed(&mut self, conn: ConnectionId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.close(ProtocolError::PeerClosed);
            self.abandon_if_closing(conn);
            self.settle_handshake(conn);
        }
    }

    /// Forgets a connection whose socket is closed: its queued jobs are dropped,
    /// its running jobs cancelled (their results, and its mounts', are discarded).
    pub fn remove(&mut self, conn: ConnectionId) {
        self.release_handshake(conn);
        self.unadmitted.remove(&conn);
        if self.conns.remove(&conn).is_some() {
            self.stats.dropped_queued += self.queue.forget(conn) as u64;
            self.check_drained();
        }
    }

    /// Counts of what the core did on its own (see [`NodeStats`]).
    pub fn stats(&self) -> NodeStats {
        self.stats
    }

    /// A closing connection's answers would be dropped: its queued jobs go
    /// without running, its running ones are cancelled (docs/PROTOCOL.md §10, `cancel`).
    fn abandon_if_closing(&mut self, conn: ConnectionId) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        // What closing handed over: a spooling upload's tail, to spool.
        while let Some(value) = c.poll_to_node() {
            match value {
                ToNode::Upload(work) => self.events.push_back(Event::Upload(work)),
                ToNode::Tail(upload) => {
                    self.tails.insert((conn, upload.id), upload);
                }
                _ => {}
            }
        }
        if c.closing().is_some() && c.jobs_in_flight() > 0 {
            let dropped = self.queue.forget(conn);
            c.jobs_dropped(dropped);
            self.stats.dropped_queued += dropped as u64;
            self.check_drained();
        }
    }

    /// The next thing the caller must act on.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Takes the oldest queued job for a worker.
    pub fn next_job(&mut self) -> Option<Job<M>> {
        self.queue.take()
    }

    /// Whether a job is waiting in the queue.
    pub fn has_job(&self) -> bool {
        self.queue.has_queued()
    }

    /// The code a running job will be answered with because the node stopped
    /// it (`cancelled`, `deadline_exceeded`), whatever it returns; `None` if
    /// it was not stopped (for a driver's metrics, before [`complete`](Node::complete)).
    pub fn stop_code(&self, job: JobId) -> Option<&'static str> {
        self.queue.stopped(job).map(Stop::code)
    }

    /// Hands back a job's outcome; its result frame is routed to the connection
    /// that asked, or dropped if that connection is gone. Returns whether it was delivered.
    pub fn complete(&mut self, job: JobId, outcome: JobOutcome, now: Instant) -> bool {
        let Some((Route { conn, job_id, kind }, queue_depth, stopped)) = self.queue.finish(job)
        else {
            return false;
        };
        // A job the node stopped is answered as stopped, whatever it returned.
        let outcome = match stopped {
            Some(why) => Err(why.error()),
            None => outcome,
        };
        match outcome {
            Ok(_) => self.stats.jobs_done += 1,
            Err(_) => self.stats.jobs_failed += 1,
        }
        let delivered = self
            .conns
            .get_mut(&conn)
            .is_some_and(|c| c.job_done(kind, job_id, queue_depth, outcome, now));
        if delivered {
            self.events.push_back(Event::Wake(conn));
        }
        self.check_drained();
        delivered
    }

    /// Whether a running job's partial output is wanted: its connection is
    /// still here, not closing, and agreed `stream`, and the job's streaming
    /// was not stopped (docs/PROTOCOL.md §10.8). A driver asks once when it
    /// takes the job, to give the executor a sink only then.
    pub fn wants_partials(&self, job: JobId) -> bool {
        self.queue.streaming_route(job).is_some_and(|route| {
            self.conns.get(&route.conn).is_some_and(|c| {
                c.capabilities().contains(Capability::Stream) && c.closing().is_none()
            })
        })
    }

    /// Hands over a running job's partial output: an `infer_partial` /
    /// `prompt_partial` frame goes to its connection if that agreed `stream`
    /// (else, or once the job or connection is gone, it is dropped). One that
    /// finds the connection holding `max_outbound` unsent bytes is dropped and
    /// stops the job's streaming: its later partials are dropped too, so what
    /// the client gets is a prefix of the output, and the result carries all of it.
    /// Returns whether it was queued to send (an [`Event::Wake`] follows).
    pub fn partial(&mut self, job: JobId, output: Partial<'_>, now: Instant) -> bool {
        let Some(route) = self.queue.streaming_route(job) else {
            return false;
        };
        let Some(conn) = self.conns.get_mut(&route.conn) else {
            return false;
        };
        let msg = match (route.kind, output) {
            (JobKind::Infer, Partial::Tokens(ids)) if !ids.is_empty() => {
                Message::InferPartial(InferPartial {
                    job_id: route.job_id.clone(),
                    output_ids: ids.to_vec(),
                })
            }
            (JobKind::Prompt, Partial::Text(text)) if !text.is_empty() => {
                Message::PromptPartial(PromptPartial {
                    job_id: route.job_id.clone(),
                    text: text.to_owned(),
                })
            }
            // The wrong kind for its job, or empty: nothing to say.
            _ => return false,
        };
        match conn.partial(&msg, now) {
            PartialFate::Queued => {
                self.events.push_back(Event::Wake(route.conn));
                true
            }
            PartialFate::Unwanted => false,
            PartialFate::Behind => {
                self.queue.stop_streaming(job);
                false
            }
        }
    }

    /// Hands back [`UploadWork`] that was run; dropped (with its spool) if its upload is gone.
    pub fn upload_work_done(&mut self, work: UploadWork, now: Instant) {
        let conn = work.conn;
        if let Some(mut upload) = self.tails.remove(&(conn, work.upload)) {
            // Its connection closed meanwhile: the spool is back, so the tail
            // that was still buffered goes to it (and the spool is dropped after).
            upload.work_returned(work);
            if let Some(tail) = upload.upload_work(conn, 1) {
                self.events.push_back(Event::Upload(tail));
            }
            return;
        }
        let mut room = self.queue.room();
        if let Some(c) = self.conns.get_mut(&conn) {
            let before = c.pending_transmit();
            c.upload_work_done(work, &mut room, now);
            if c.pending_transmit() != before {
                self.events.push_back(Event::Wake(conn));
            }
            self.take_from(conn, now);
        }
        self.check_drained();
    }

    /// Hands back a mount's outcome; `model_status` goes to the connection that committed.
    pub fn mount_done(&mut self, outcome: MountOutcome<M>, now: Instant) {
        let conn = outcome.token.conn;
        let mut room = self.queue.room();
        if let Some(c) = self.conns.get_mut(&conn) {
            c.mount_done(outcome.result, &mut room, now);
            self.events.push_back(Event::Wake(conn));
            self.take_from(conn, now);
        }
        self.check_drained();
    }

    /// Extension `store`: the answer to an [`Event::Query`] from `conn`
    /// (dropped if it is gone).
    pub fn inventory_done(&mut self, conn: ConnectionId, inventory: ModelInventory, now: Instant) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.inventory(inventory, now);
            self.events.push_back(Event::Wake(conn));
        }
    }

    /// The queue as a `queue_status` frame reports it.
    pub fn queue_status(&self) -> QueueStatus {
        self.queue.room().status()
    }

    /// The earliest deadline of any connection or job (a scan over all of them).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let conns = self.conns.values().filter_map(Connection::deadline).min();
        conns
            .into_iter()
            .chain(self.queue.next_deadline(None))
            .min()
    }

    /// The earliest deadline of one connection and its jobs, for adapters with a task per connection.
    pub fn connection_timeout(&self, conn: ConnectionId) -> Option<Instant> {
        let own = self.conns.get(&conn)?.deadline();
        own.into_iter()
            .chain(self.queue.next_deadline(Some(conn)))
            .min()
    }

    /// Closes every connection whose timer expired by `now`, each with an
    /// error frame saying why; answers `deadline_exceeded` for each queued job
    /// past its deadline and cancels each running one.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut closed = Vec::new();
        for (id, conn) in &mut self.conns {
            if conn.handle_timeout(now) {
                self.events.push_back(Event::Wake(*id));
                closed.push(*id);
            }
        }
        for id in closed {
            self.abandon_if_closing(id);
            self.settle_handshake(id);
        }
        let expired = self.queue.expire(now);
        self.stats.expired_queued += expired.len() as u64;
        let depth = self.queue.depth();
        for route in expired {
            self.answer_stopped(route, depth, Stop::DeadlineExceeded, now);
        }
        self.check_drained();
    }

    /// Answers a job the node removed from the queue before it ran.
    fn answer_stopped(&mut self, route: Route, depth: usize, why: Stop, now: Instant) {
        let Route { conn, job_id, kind } = route;
        let delivered = self
            .conns
            .get_mut(&conn)
            .is_some_and(|c| c.job_done(kind, job_id, depth, Err(why.error()), now));
        if delivered {
            self.events.push_back(Event::Wake(conn));
        }
    }

    /// Starts a graceful shutdown: no new jobs or connections; queued and
    /// running jobs finish and are delivered; then every connection closes.
    pub fn begin_shutdown(&mut self) {
        self.queue.close();
        self.check_drained();
    }

    /// Whether shutdown has begun and every job and mount is done.
    pub fn is_drained(&self) -> bool {
        self.queue.is_closed()
            && self.queue.is_empty()
            && self.conns.values().all(|c| c.mounts_in_flight() == 0)
    }

    /// Takes what `conn` handed over: jobs join the queue (the connection
    /// admitted them against the room it was given), the rest become events.
    fn take_from(&mut self, id: ConnectionId, now: Instant) {
        let open_conns = self.conns.len() as u64;
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        while let Some(value) = conn.poll_to_node() {
            let event = match value {
                ToNode::Job {
                    job_id,
                    kind,
                    input,
                    deadline,
                    sampling,
                } => {
                    conn.job_queued(&job_id, self.queue.depth() + 1);
                    let route = Route {
                        conn: id,
                        job_id,
                        kind,
                    };
                    self.queue.push(route, input, deadline, now, sampling);
                    Event::JobQueued
                }
                ToNode::Cancel(job_id) => {
                    match self.queue.cancel(id, &job_id, Stop::Cancelled) {
                        Cancelled::Queued(Route { job_id, kind, .. }) => {
                            self.stats.cancelled_queued += 1;
                            let depth = self.queue.depth();
                            conn.job_done(kind, job_id, depth, Err(Stop::Cancelled.error()), now);
                        }
                        // Answered when its worker hands it back; an unknown
                        // job's answer is already on its way (or never was).
                        Cancelled::Running | Cancelled::None => {}
                    }
                    continue;
                }
                ToNode::Stats => {
                    let stats = self.stats;
                    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
                    conn.send_stats(
                        crate::message::Stats {
                            connections: n(open_conns),
                            connections_accepted: n(stats.connections_accepted),
                            depth: n(self.queue.depth() as u64),
                            jobs_running: n(self.queue.running() as u64),
                            jobs_done: n(stats.jobs_done),
                            jobs_failed: n(stats.jobs_failed),
                            jobs_cancelled: n(stats.cancelled_queued),
                            jobs_expired: n(stats.expired_queued),
                            jobs_dropped: n(stats.dropped_queued),
                        },
                        now,
                    );
                    continue;
                }
                ToNode::QueuePosition(job_id) => {
                    let position = self.queue.position(id, &job_id);
                    conn.send_position(job_id, position, now);
                    continue;
                }
                ToNode::Mount(model) => Event::Mount(Mount {
                    token: MountToken { conn: id },
                    model,
                }),
                ToNode::Upload(work) => Event::Upload(work),
                ToNode::Tail(upload) => {
                    self.tails.insert((id, upload.id), upload);
                    continue;
                }
                ToNode::Resume => Event::Resume(id),
                ToNode::Query(hashes) => Event::Query { conn: id, hashes },
                ToNode::Use {
                    sha256,
                    config_json,
                } => Event::UseStored(StoredMount {
                    token: MountToken { conn: id },
                    sha256,
                    config_json,
                }),
            };
            self.events.push_back(event);
        }
    }

    /// During shutdown, closes every connection once nothing is left to deliver.
    fn check_drained(&mut self) {
        if !self.is_drained() {
            return;
        }
        for (id, conn) in &mut self.conns {
            if conn.closing().is_none() {
                conn.close(ProtocolError::ShuttingDown);
                self.events.push_back(Event::Wake(*id));
            }
        }
        self.handshakes.clear();
        self.per_source.clear();
    }
}
