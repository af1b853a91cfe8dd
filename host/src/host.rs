//! [`Host`]: a [`Node`] behind a lock, with worker threads and per-connection links.
//!
//! Every adapter drives its sockets its own way (threads, smol tasks, tokio
//! tasks) but hosts the node the same way, so this part is shared: the clock,
//! the lock, worker threads that run jobs and mounts off the I/O path, and the
//! delivery of answers.
//!
//! Answers are written by whoever produced them (the reader after its input, a
//! worker after a job) with a non-blocking write, so a round trip needs no
//! extra thread hop. Only when a socket is full does the connection's own
//! writer take over and wait for it; a worker never waits on a socket.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::metrics::{self, Metrics};
use donate_proto::{
    run_job_in, run_mount, run_upload, Capabilities, Capability, ConnectionId, Event, Executor,
    Job, JobContext, JobOutcome, Mount, MountOutcome, Node, Partial, PublicKey, SecureServerConfig,
    ServerConfig, StoredMount, UploadHandling, UploadWork,
};

use crate::store::ModelStore;
use crate::stored::Stored;

/// What a node starts with: its protocol settings and, optionally, secure
/// mode (docs/PROTOCOL.md, `secure`). Every adapter's `serve` takes one; a
/// plain [`ServerConfig`] converts into a node without secure mode.
#[derive(Debug, Clone, Default)]
pub struct NodeConfig {
    server: ServerConfig,
    secure: Option<SecureServerConfig>,
    store: Option<ModelStore>,
    /// Extensions offered to clients (docs/PROTOCOL.md §10); none by default,
    /// so the node's hello stays byte for byte v1. (`store` is offered with a store.)
    offered: Capabilities,
    /// Where the host counts what it does; none: nothing is counted.
    metrics: Option<Arc<Metrics>>,
}

impl NodeConfig {
    /// A node in secure mode: every connection must complete a Noise
    /// handshake with a client key `secure` authorizes.
    pub fn secure(server: ServerConfig, secure: SecureServerConfig) -> Self {
        NodeConfig {
            server,
            secure: Some(secure),
            store: None,
            offered: Capabilities::NONE,
            metrics: None,
        }
    }

    /// Counts connections, jobs, uploads and mounts into `metrics` (for
    /// `/metrics` and `/healthz`). Without it the host counts nothing.
    #[must_use]
    pub fn metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Offers `extensions` to clients (see [`Node::offer`]). The host honours
    /// `cancel`, `deadline` and `queue_position` ([`HONOURED`]) with any
    /// executor; a cancelled job stops early only if its executor looks at
    /// its cancel flag.
    #[must_use]
    pub fn offer(mut self, extensions: Capabilities) -> Self {
        self.offered = extensions;
        self
    }

    /// Keeps pushed models in `store` (and offers the `store` extension,
    /// docs/PROTOCOL.md): across connections and restarts, shared between
    /// connections, resumable.
    pub fn with_store(mut self, store: ModelStore) -> Self {
        self.store = Some(store);
        self
    }

    /// The protocol settings.
    pub fn server(&self) -> &ServerConfig {
        &self.server
    }

    /// Whether connections must be secure.
    pub fn is_secure(&self) -> bool {
        self.secure.is_some()
    }
}

impl From<ServerConfig> for NodeConfig {
    fn from(server: ServerConfig) -> Self {
        NodeConfig {
            server,
            secure: None,
            store: None,
            offered: Capabilities::NONE,
            metrics: None,
        }
    }
}

/// The extensions a host carries out whatever its executor, for
/// [`NodeConfig::offer`]: `cancel`, `deadline`, `queue_position` (all decided
/// in the core; a cancelled job stops early if its executor looks at its flag).
pub const HONOURED: Capabilities = Capabilities::NONE
    .with(Capability::Cancel)
    .with(Capability::Deadline)
    .with(Capability::QueuePosition);

/// Called when a connection's writer must act: bytes it must wait to write, or a close.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// Writes to a connection's socket without ever blocking.
pub trait TryWrite: Send + Sync {
    /// Writes what fits now; `Ok(0)` or `WouldBlock` when nothing does.
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;
}

/// How the host reaches one connection's socket and writer.
pub struct Link {
    /// Wakes the connection's reader and writer.
    pub waker: Waker,
    /// Non-blocking writes from any thread.
    pub direct: Arc<dyn TryWrite>,
}

/// What a connection's writer does next, from [`Host::next_write`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteStep {
    /// Write the bytes handed out, then [`Host::release_write`].
    Write,
    /// Nothing to write now: sleep until the connection's waker is called.
    Wait,
    /// The connection is closing and everything is written: close the socket.
    Done,
}

/// What a connection's driver needs to know after moving bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnState {
    /// Read more input from the peer.
    pub wants_read: bool,
    /// Close the socket once the taken bytes are written.
    pub closing: bool,
    /// Call [`Host::handle_timeout`] at this time if nothing happens before.
    pub deadline: Option<Instant>,
}

/// One connection's write side: who is writing, and what they could not write yet.
struct Slot {
    link: Link,
    /// Held by the one thread writing this connection's bytes.
    writing: AtomicBool,
    /// Bytes taken from the node and not yet written (only touched while `writing`).
    leftover: Mutex<Vec<u8>>,
    /// In secure mode, the client's key once its handshake is done.
    peer_key: std::sync::OnceLock<PublicKey>,
}

struct State<M> {
    node: Node<M>,
    slots: HashMap<ConnectionId, Arc<Slot>>,
    mounts: VecDeque<Mount>,
    /// Stored models to mount (extension `store`).
    uses: VecDeque<StoredMount>,
    uploads: VecDeque<UploadWork>,
    stop_workers: bool,
}

/// A node shared by connection drivers and worker threads.
pub struct Host<E: Executor> {
    state: Mutex<State<Model<E>>>,
    /// Mounts or jobs for the workers.
    work: Condvar,
    /// Upload work for the upload thread.
    upload_work: Condvar,
    idle: Condvar,
    executor: Stored<E>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    metrics: Option<Arc<Metrics>>,
}

/// What the node holds per connection: the executor's model, maybe shared and from the store.
type Model<E> = <Stored<E> as Executor>::Model;

impl<E: Executor> Host<E> {
    /// A host for a new node, with `config.workers` worker threads started for
    /// jobs and mounts, and one upload thread: uploads' `weights_sha256` is
    /// hashed there as the bytes arrive, and uploads are spooled there when the
    /// executor [spools](Executor::spools_uploads), so a long job never holds
    /// an upload up.
    ///
    /// `config` is a [`ServerConfig`] or, for secure mode, a [`NodeConfig`].
    pub fn start(config: impl Into<NodeConfig>, executor: E) -> Arc<Self> {
        let NodeConfig {
            server,
            secure,
            store,
            offered,
            metrics,
        } = config.into();
        let offered = match store {
            Some(_) => offered.with(Capability::Store),
            None => offered,
        };
        let executor = Stored::new(executor, store);
        // And what the executor honours (sampling, stream): the workers below
        // pass a job's sampling and deliver its partials.
        let offered = offered.union(executor.extensions());
        let uploads = UploadHandling::for_executor(&executor);
        let workers = server.workers.max(1);
        let mut node = Node::with_uploads(server, uploads).offer(offered);
        if let Some(secure) = secure {
            node = node.with_secure(secure);
        }
        let host = Arc::new(Host {
            state: Mutex::new(State {
                node,
                slots: HashMap::new(),
                mounts: VecDeque::new(),
                uses: VecDeque::new(),
                uploads: VecDeque::new(),
                stop_workers: false,
            }),
            work: Condvar::new(),
            upload_work: Condvar::new(),
            idle: Condvar::new(),
            executor,
            workers: Mutex::new(Vec::new()),
            metrics,
        });
        let mut handles: Vec<_> = (0..workers)
            .map(|i| {
                let host = Arc::clone(&host);
                std::thread::Builder::new()
                    .name(format!("donate-worker-{i}"))
                    .spawn(move || host.work_loop())
                    .expect("spawn worker thread")
            })
            .collect();
        let uploads = Arc::clone(&host);
        handles.push(
            std::thread::Builder::new()
                .name("donate-uploads".into())
                .spawn(move || uploads.upload_loop())
                .expect("spawn upload thread"),
        );
        *host.workers.lock().expect("workers lock") = handles;
        host.note_store();
        host
    }

    /// The node's configuration.
    pub fn config(&self) -> ServerConfig {
        self.lock().node.config().clone()
    }

    /// Registers a connection reached through `link`; its `hello` is written at once.
    /// In secure mode, prefer [`accept_from`](Host::accept_from).
    pub fn accept(&self, link: Link) -> ConnectionId {
        self.accept_from(link, None)
    }

    /// [`accept`](Host::accept) a connection from `source`, its peer's IP
    /// address: in secure mode its handshake counts against that source's
    /// limit ([`Node::accept_from`](donate_proto::Node::accept_from)).
    pub fn accept_from(&self, link: Link, source: Option<IpAddr>) -> ConnectionId {
        let mut state = self.lock();
        let conn = state.node.accept_from(source, Instant::now());
        if let Some(m) = &self.metrics {
            m.connections_total.inc();
            m.connections_open.inc();
            if state.node.is_closing(conn) {
                m.connections_refused.inc();
            }
        }
        state.slots.insert(
            conn,
            Arc::new(Slot {
                link,
                writing: AtomicBool::new(false),
                leftover: Mutex::new(Vec::new()),
                peer_key: std::sync::OnceLock::new(),
            }),
        );
        // A handshake closed to make room for this one is woken.
        drop(self.dispatch_events(state));
        self.transmit(conn);
        conn
    }

    /// In secure mode, the key `conn`'s client authenticated with (whether
    /// or not the node let it in): for logs and per-key decisions.
    pub fn peer_key(&self, conn: ConnectionId) -> Option<PublicKey> {
        self.slot(conn)?.peer_key.get().copied()
    }

    /// `conn`'s state as it stands.
    pub fn state(&self, conn: ConnectionId) -> ConnState {
        let state = self.lock();
        self.dispatch(state, conn)
    }

    /// Feeds bytes read from `conn`; its answers are written before this returns
    /// (or left to its writer if the socket is full).
    pub fn handle_input(&self, conn: ConnectionId, data: &[u8]) -> ConnState {
        let mut state = self.lock();
        state.node.handle_input(conn, data, Instant::now());
        note_peer_key(&state, conn);
        let has_transmit = has_transmit(&state.node, conn);
        let conn_state = self.dispatch(state, conn);
        if has_transmit {
            self.transmit(conn);
        }
        conn_state
    }

    /// For `conn`'s writer: what to do next. On [`WriteStep::Write`] the
    /// bytes are in `out` (which must be empty) and the write side is claimed:
    /// write them all (blocking or awaiting is fine here), clear `out`, then
    /// call [`release_write`](Host::release_write).
    pub fn next_write(&self, conn: ConnectionId, out: &mut Vec<u8>) -> WriteStep {
        loop {
            let Some(slot) = self.slot(conn) else {
                return WriteStep::Done;
            };
            if slot.writing.swap(true, Ordering::AcqRel) {
                // Another thread is writing; it wakes the writer if it cannot finish.
                return WriteStep::Wait;
            }
            std::mem::swap(out, &mut *lock(&slot.leftover));
            let mut state = self.lock();
            if out.is_empty() {
                state.node.poll_transmit(conn, out);
            }
            let closing = state.node.is_closing(conn);
            drop(state);
            if !out.is_empty() {
                return WriteStep::Write;
            }
            let again = self.release_write(conn);
            if closing {
                return WriteStep::Done;
            }
            if !again {
                return WriteStep::Wait;
            }
        }
    }

    /// Releases the write side after a [`WriteStep::Write`]; true if the
    /// writer has more to do (bytes arrived or the connection started closing).
    pub fn release_write(&self, conn: ConnectionId) -> bool {
        let Some(slot) = self.slot(conn) else {
            return false;
        };
        slot.writing.store(false, Ordering::Release);
        self.writer_needed(conn)
    }

    /// Whether `conn`'s writer has something to do: bytes to send or a close.
    fn writer_needed(&self, conn: ConnectionId) -> bool {
        let state = self.lock();
        has_transmit(&state.node, conn) || state.node.is_closing(conn)
    }

    /// Closes whatever connection timed out by now.
    pub fn handle_timeout(&self, conn: ConnectionId) -> ConnState {
        let mut state = self.lock();
        state.node.handle_timeout(Instant::now());
        self.dispatch(state, conn)
    }

    /// The peer closed its side: flush what is queued, then close.
    pub fn peer_closed(&self, conn: ConnectionId) -> ConnState {
        let mut state = self.lock();
        state.node.peer_closed(conn);
        self.dispatch(state, conn)
    }

    /// Forgets a connection whose socket is closed.
    pub fn remove(&self, conn: ConnectionId) {
        let mut state = self.lock();
        if let (Some(m), Some(c)) = (&self.metrics, state.node.connection(conn)) {
            let reason = c.closing().map_or("open", |e| e.code());
            m.connections_closed
                .get_or_create(&metrics::Reason { reason })
                .inc();
            m.connections_open.dec();
        }
        state.node.remove(conn);
        state.slots.remove(&conn);
        let state = self.dispatch_events(state);
        if state.slots.is_empty() {
            self.idle.notify_all();
        }
    }

    /// Graceful shutdown: no new jobs; jobs finish and are delivered; every
    /// connection closes. Returns once every connection is removed and the
    /// workers have stopped.
    pub fn shutdown(&self) {
        if let Some(m) = &self.metrics {
            m.draining.store(true, Ordering::Relaxed);
        }
        let mut state = self.lock();
        state.node.begin_shutdown();
        state = self.dispatch_events(state);
        while !state.slots.is_empty() {
            state = self.idle.wait(state).expect("host lock");
        }
        state.stop_workers = true;
        drop(state);
        self.work.notify_all();
        self.upload_work.notify_all();
        let handles = std::mem::take(&mut *self.workers.lock().expect("workers lock"));
        for handle in handles {
            let _ = handle.join();
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<Model<E>>> {
        lock(&self.state)
    }

    fn slot(&self, conn: ConnectionId) -> Option<Arc<Slot>> {
        self.lock().slots.get(&conn).cloned()
    }

    /// Writes `conn`'s pending bytes from this thread without blocking. If
    /// another thread is writing, it picks them up; if the socket is full or
    /// the connection is closing, the writer is woken to finish.
    fn transmit(&self, conn: ConnectionId) {
        let Some(slot) = self.slot(conn) else { return };
        if slot.writing.swap(true, Ordering::AcqRel) {
            return;
        }
        // Wake the writer to finish what does not fit, to close, or so the
        // reader resumes once a backpressured connection has room again.
        let mut need_writer = false;
        {
            let mut buf = lock(&slot.leftover);
            loop {
                if buf.is_empty() {
                    let mut state = self.lock();
                    need_writer |= !state.node.wants_read(conn);
                    state.node.poll_transmit(conn, &mut buf);
                }
                if buf.is_empty() {
                    break;
                }
                match slot.link.direct.try_write(&buf) {
                    Ok(n) if n == buf.len() => buf.clear(),
                    Ok(n) => {
                        buf.drain(..n);
                        need_writer = true;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        // Full (or broken): the writer waits for room or sees the error.
                        need_writer = true;
                        break;
                    }
                }
            }
        }
        slot.writing.store(false, Ordering::Release);
        // While this thread held the write side, the writer may have found it
        // taken and gone back to sleep: wake it for anything it must act on.
        if need_writer || self.writer_needed(conn) {
            (slot.link.waker)();
        }
    }

    /// Acts on the node's events, then reports `conn`'s state.
    fn dispatch(
        &self,
        mut state: MutexGuard<'_, State<Model<E>>>,
        conn: ConnectionId,
    ) -> ConnState {
        let followup = take_events(&mut state, self.metrics.as_deref());
        let conn_state = ConnState {
            wants_read: state.node.wants_read(conn),
            closing: state.node.is_closing(conn),
            deadline: state.node.connection_timeout(conn),
        };
        drop(state);
        self.follow_up(followup);
        conn_state
    }

    /// Acts on the node's events, releasing the lock while it does.
    fn dispatch_events<'a>(
        &'a self,
        mut state: MutexGuard<'a, State<Model<E>>>,
    ) -> MutexGuard<'a, State<Model<E>>> {
        let followup = take_events(&mut state, self.metrics.as_deref());
        if followup.is_empty() {
            return state;
        }
        drop(state);
        self.follow_up(followup);
        self.lock()
    }

    /// Wakes workers and writes new output, with the lock released: a woken
    /// worker must not find the lock still held by its waker.
    fn follow_up(&self, followup: Followup) {
        for _ in 0..followup.work {
            self.work.notify_one();
        }
        if followup.uploads > 0 {
            self.upload_work.notify_one();
        }
        if !followup.queries.is_empty() {
            self.answer_queries(followup.queries);
        }
        for conn in followup.transmit {
            self.transmit(conn);
        }
        for conn in followup.wake_writer {
            if let Some(slot) = self.slot(conn) {
                (slot.link.waker)();
            }
        }
    }

    /// Answers `model_query`s from the store (a quick look at its index, off the lock).
    fn answer_queries(&self, queries: Vec<(ConnectionId, Vec<[u8; 32]>)>) {
        let Some(store) = self.executor.store() else {
            return;
        };
        let answers: Vec<_> = queries
            .into_iter()
            .map(|(conn, hashes)| (conn, store.inventory(&hashes)))
            .collect();
        let mut state = self.lock();
        for (conn, inventory) in answers {
            state.node.inventory_done(conn, inventory, Instant::now());
        }
        drop(self.dispatch_events(state));
    }

    /// The upload thread: runs upload work (hashing, spooling) unlocked.
    fn upload_loop(&self) {
        let mut state = self.lock();
        loop {
            if let Some(mut work) = state.uploads.pop_front() {
                drop(state);
                run_upload(&self.executor, &mut work);
                state = self.lock();
                state.node.upload_work_done(work, Instant::now());
            } else if state.stop_workers {
                return;
            } else {
                state = self.upload_work.wait(state).expect("host lock");
                continue;
            }
            state = self.dispatch_events(state);
        }
    }

    /// A worker: takes mounts, then jobs, and runs them unlocked.
    fn work_loop(&self) {
        let mut state = self.lock();
        loop {
            if let Some(mount) = state.mounts.pop_front() {
                drop(state);
                if let Some(m) = &self.metrics {
                    m.upload_bytes.inc_by(mount.model.weights_len());
                }
                let outcome = run_mount(&self.executor, mount);
                if let Some(m) = &self.metrics {
                    match outcome.result {
                        Ok(_) => m.models_mounted.inc(),
                        Err(_) => m.mounts_failed.inc(),
                    };
                }
                self.note_store();
                state = self.lock();
                state.node.mount_done(outcome, Instant::now());
            } else if let Some(stored) = state.uses.pop_front() {
                drop(state);
                let outcome = self.use_stored(stored);
                if let Some(m) = &self.metrics {
                    match outcome.result {
                        Ok(_) => m.store_hits.inc(),
                        Err(_) => m.store_misses.inc(),
                    };
                }
                self.note_store();
                state = self.lock();
                state.node.mount_done(outcome, Instant::now());
            } else if let Some(job) = state.node.next_job() {
                let streams = state.node.wants_partials(job.id);
                drop(state);
                // Every line about this job (the executor's too) carries
                // the node's job number, the client's job_id and the connection.
                let span = tracing::info_span!(
                    "job",
                    job = job.id.as_u64(),
                    job_id = %job.job_id,
                    conn = %job.conn
                );
                let started = Instant::now();
                let outcome = span.in_scope(|| {
                    let outcome = match &self.metrics {
                        None => self.run_job(&job, streams),
                        Some(m) => counted_job(&job, m, started, || self.run_job(&job, streams)),
                    };
                    match &outcome {
                        Ok(_) => tracing::debug!("job done"),
                        Err(e) => tracing::debug!(code = %e.code, "job failed: {e}"),
                    }
                    outcome
                });
                state = self.lock();
                if let Some(m) = &self.metrics {
                    // Counted as answered: a job the node stopped by its code.
                    let code = state
                        .node
                        .stop_code(job.id)
                        .or_else(|| outcome.as_ref().err().map(|e| e.code.as_str()));
                    let kind = match job.input {
                        donate_proto::JobInput::Infer { .. } => 0,
                        donate_proto::JobInput::Prompt { .. } => 1,
                    };
                    m.job_ended(kind, code, started.elapsed());
                }
                state.node.complete(job.id, outcome, Instant::now());
            } else if state.stop_workers {
                return;
            } else {
                state = self.work.wait(state).expect("host lock");
                continue;
            }
            state = self.dispatch_events(state);
        }
    }
}

impl<E: Executor> Host<E> {
    /// Updates the store's size in the metrics (after anything that may change it).
    fn note_store(&self) {
        if let (Some(m), Some(store)) = (&self.metrics, self.executor.store()) {
            m.store_bytes.set(store.used_bytes() as i64);
            m.store_models.set(store.len() as i64);
        }
    }

    /// Mounts a stored model for a `model_use` (verifying it first if need be).
    fn use_stored(&self, stored: StoredMount) -> MountOutcome<Model<E>> {
        let StoredMount {
            token,
            sha256,
            config_json,
        } = stored;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.executor.use_stored(sha256, config_json)
        }))
        .unwrap_or_else(|_| Err("executor panicked while mounting".to_owned()))
        .map(Arc::new);
        MountOutcome { token, result }
    }

    /// Runs a job with its sampling and, when its client agreed `stream`, a
    /// sink that hands each partial output to the node and writes it.
    fn run_job(&self, job: &Job<Model<E>>, streams: bool) -> JobOutcome {
        let sink = |output: Partial<'_>| self.deliver_partial(job, output);
        let mut context = JobContext::new(&job.job_id)
            .with_cancel(&job.cancel)
            .with_sampling(&job.sampling);
        if streams {
            context = context.with_partial(&sink);
        }
        run_job_in(&self.executor, job, &context)
    }

    /// A partial output frame for `job`'s connection (if still wanted), sent
    /// by its writer so the worker goes straight back to the job.
    fn deliver_partial(&self, job: &Job<Model<E>>, output: Partial<'_>) {
        let mut state = self.lock();
        if state.node.partial(job.id, output, Instant::now()) {
            drop(self.dispatch_events(state));
        }
    }
}

/// What the node's events ask for once the lock is released.
#[derive(Default)]
struct Followup {
    /// Pieces of work queued for the workers.
    work: usize,
    /// Upload work queued for the upload thread.
    uploads: usize,
    /// Connections with new output, to write from this thread.
    transmit: Vec<ConnectionId>,
    /// Connections with new output and more results coming: their writers
    /// send them, batched, while the workers go on (pipelining clients).
    wake_writer: Vec<ConnectionId>,
    /// `model_query`s to answer from the store.
    queries: Vec<(ConnectionId, Vec<[u8; 32]>)>,
}

impl Followup {
    fn is_empty(&self) -> bool {
        self.work == 0
            && self.uploads == 0
            && self.transmit.is_empty()
            && self.wake_writer.is_empty()
            && self.queries.is_empty()
    }
}

/// Runs `job`, counting its queue wait and keeping the running gauge; its
/// end is counted once the node says how it is answered.
fn counted_job<M>(
    job: &Job<M>,
    m: &Metrics,
    started: Instant,
    run: impl FnOnce() -> JobOutcome,
) -> JobOutcome {
    m.queue_wait_seconds
        .observe(started.saturating_duration_since(job.queued_at));
    m.jobs_running.inc();
    let outcome = run();
    m.jobs_running.dec();
    outcome
}

/// Takes the node's events: work goes to the workers' queues, output is noted.
fn take_events<M>(state: &mut State<M>, metrics: Option<&Metrics>) -> Followup {
    if let Some(m) = metrics {
        m.note_node(&state.node);
    }
    let mut followup = Followup::default();
    while let Some(event) = state.node.poll_event() {
        match event {
            Event::Wake(conn) => {
                let more_coming = state
                    .node
                    .connection(conn)
                    .is_some_and(|c| c.jobs_in_flight() > 0);
                if more_coming {
                    followup.wake_writer.push(conn);
                } else {
                    followup.transmit.push(conn);
                }
            }
            // The waker wakes the reader too.
            Event::Resume(conn) => followup.wake_writer.push(conn),
            Event::JobQueued => followup.work += 1,
            Event::Mount(mount) => {
                state.mounts.push_back(mount);
                followup.work += 1;
            }
            Event::Upload(work) => {
                state.uploads.push_back(work);
                followup.uploads += 1;
            }
            Event::Query { conn, hashes } => followup.queries.push((conn, hashes)),
            Event::UseStored(stored) => {
                state.uses.push_back(stored);
                followup.work += 1;
            }
        }
    }
    followup
}

/// Records and logs `conn`'s client key the first time the node knows it.
fn note_peer_key<M>(state: &State<M>, conn: ConnectionId) {
    let (Some(slot), Some(c)) = (state.slots.get(&conn), state.node.connection(conn)) else {
        return;
    };
    let Some(key) = c.peer_key() else { return };
    if slot.peer_key.set(*key).is_ok() {
        let peer_key = key.fingerprint();
        // Called from the connection's reader, inside its span.
        tracing::Span::current().record("peer_key", peer_key.as_str());
        if state.node.is_closing(conn) {
            tracing::warn!(%conn, %peer_key, "secure handshake done; key not authorized, refused");
        } else {
            tracing::info!(%conn, %peer_key, "secure handshake done; client authenticated");
        }
    }
}

fn has_transmit<M>(node: &Node<M>, conn: ConnectionId) -> bool {
    node.connection(conn)
        .is_some_and(|c| c.pending_transmit() > 0)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
