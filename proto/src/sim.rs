//! [`Sim`]: a simulated network for tests and fuzzing (cargo feature `sim`).
//!
//! One [`Node`] and any number of peers wired in memory, with a virtual clock,
//! in the spirit of quinn-proto's test `Pair`. A peer is either a
//! [`ClientConnection`] or a raw byte pipe: a Go client, a hostile one, a
//! fuzzer. The executor runs on simulated workers, and each kind of work (jobs,
//! mounts, upload work) can be held back so a test returns it late, out of
//! order, or with an outcome of its own.
//!
//! It is also the reference for driving the core by hand: [`Sim::step`] is one
//! round of what any driver does, in this order:
//!
//! 1. for each connection, write out what the node has for it
//!    ([`Node::poll_transmit`], again only once those bytes are delivered);
//!    close a connection that [is closing](Node::is_closing) once nothing is left to write;
//! 2. read what the peer wrote, but only while [`Node::wants_read`];
//! 3. act on every [`Node::poll_event`]: run mounts and upload work on a
//!    worker and hand them back; wake writers;
//! 4. free workers take jobs ([`Node::next_job`]) and hand back outcomes ([`Node::complete`]);
//! 5. when the clock reaches [`Node::poll_timeout`], call [`Node::handle_timeout`].
//!
//! Nothing runs by itself: the methods that make a peer do something
//! ([`write`](Sim::write), [`upload`](Sim::upload), the client core's own
//! requests) only queue it; [`run`](Sim::run) moves everything until nothing
//! moves, and the single steps ([`feed`](Sim::feed), [`transmit`](Sim::transmit),
//! [`poll_events`](Sim::poll_events), [`take_job`](Sim::take_job), …) let a
//! test or a fuzzer choose the interleaving itself.
//!
//! ```
//! use donate_proto::sim::Sim;
//! use donate_proto::{Answer, ServerConfig};
//!
//! let mut sim = Sim::stub(ServerConfig::default());
//! let p = sim.client();
//! let upload = sim.upload(p, "{}", &[1, 2, 3, 4], None).unwrap();
//! sim.run();
//! assert!(matches!(sim.client_core(p).take_answer(upload), Some(Answer::ModelStatus(s)) if s.ok));
//! let job = sim.client_core(p).infer(&[9, 9], 3).unwrap();
//! sim.run();
//! assert!(matches!(sim.client_core(p).take_answer(job), Some(Answer::Infer(r)) if r.output_ids == [9, 9, 1, 2, 3]));
//!
//! // A raw peer: bytes in, frames out.
//! let raw = sim.raw();
//! sim.run();
//! assert!(sim.frames(raw)[0].starts_with(r#"{"v":1,"type":"hello""#));
//! ```

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::error::ClientError;
use crate::executor::{run_job, run_mount, run_upload, Executor, Stub};
use crate::frame::FrameDecoder;
use crate::{
    ClientConfig, ClientConnection, ConnectionId, Event, Job, JobOutcome, Mount, Node, RequestId,
    SecureServerConfig, ServerConfig, UploadHandling, UploadWork,
};

/// Names a peer of a [`Sim`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Peer(usize);

#[derive(Debug)]
enum Side {
    Client {
        core: Box<ClientConnection>,
        /// The first error `handle_input` returned; no more bytes are fed after it.
        error: Option<ClientError>,
        /// Weights still to hand to `upload_chunk` as the core asks for them.
        weights: VecDeque<u8>,
    },
    Raw {
        /// Bytes of `received` already taken.
        taken: usize,
        decoder: FrameDecoder,
    },
}

#[derive(Debug)]
struct PeerState {
    conn: ConnectionId,
    side: Side,
    reading: bool,
    /// Written by the peer, not yet read by the node.
    to_node: Vec<u8>,
    /// Taken from the node, not yet delivered to the peer.
    to_peer: Vec<u8>,
    /// Most bytes per read, each way.
    split_to_node: usize,
    split_to_peer: usize,
    sent: Vec<u8>,
    received: Vec<u8>,
    closed: bool,
    peak_allocated: usize,
}

/// A node, its peers, its workers and a virtual clock, all in memory. See the
/// [module docs](self).
///
/// The node and the executor are public: a test may call the core directly
/// (say [`Node::mount_done`] with an outcome of its own) and then [`run`](Sim::run).
pub struct Sim<E: Executor> {
    /// The node under test.
    pub node: Node<E::Model>,
    /// What the workers run.
    pub executor: E,
    /// Jobs held at once when `hold_jobs` (default: the config's `workers`, at least 1).
    pub workers: usize,
    /// Workers take jobs (up to `workers`) into `held_jobs` instead of running them.
    pub hold_jobs: bool,
    /// Mounts wait in `held_mounts` instead of running.
    pub hold_mounts: bool,
    /// Upload work waits in `held_uploads` instead of running.
    pub hold_uploads: bool,
    /// Jobs taken by workers and not finished, oldest first.
    pub held_jobs: Vec<Job<E::Model>>,
    /// Mounts not run yet, oldest first.
    pub held_mounts: Vec<Mount>,
    /// Upload work not run yet, oldest first.
    pub held_uploads: Vec<UploadWork>,
    /// Extension `store`: `model_query`s, for the test to answer with
    /// [`Node::inventory_done`] (the simulation has no store).
    pub queries: Vec<(ConnectionId, Vec<[u8; 32]>)>,
    /// Extension `store`: `model_use` mounts, for the test to answer with [`Node::mount_done`].
    pub held_uses: Vec<crate::StoredMount>,
    /// Every [`Event::Wake`], in order.
    pub wakes: Vec<ConnectionId>,
    /// Every [`Event::Resume`], in order.
    pub resumes: Vec<ConnectionId>,
    start: Instant,
    now: Instant,
    peers: Vec<PeerState>,
}

impl Sim<Stub> {
    /// A node with the [`Stub`] executor (naming the config's `local_lm_path`),
    /// holding uploads in memory.
    pub fn stub(config: ServerConfig) -> Self {
        let stub = Stub::new(config.local_lm_path.clone());
        Sim::new(stub, config)
    }
}

impl<E: Executor> Sim<E> {
    /// A node that holds uploads in memory ([`UploadHandling::InMemory`]).
    pub fn new(executor: E, config: ServerConfig) -> Self {
        Sim::with_uploads(executor, config, UploadHandling::InMemory)
    }

    /// A node whose upload work the simulated workers run, as `uploads` says.
    pub fn with_uploads(executor: E, config: ServerConfig, uploads: UploadHandling) -> Self {
        // The clock starts at a real instant, read once; from here it moves only when told.
        #[allow(clippy::disallowed_methods)]
        let start = Instant::now();
        Sim {
            workers: config.workers.max(1),
            node: Node::with_uploads(config, uploads),
            executor,
            hold_jobs: false,
            hold_mounts: false,
            hold_uploads: false,
            held_jobs: Vec::new(),
            held_mounts: Vec::new(),
            queries: Vec::new(),
            held_uses: Vec::new(),
            held_uploads: Vec::new(),
            wakes: Vec::new(),
            resumes: Vec::new(),
            start,
            now: start,
            peers: Vec::new(),
        }
    }

    /// The node in secure mode ([`Node::with_secure`]), before any peer connects.
    pub fn secure(mut self, secure: SecureServerConfig) -> Self {
        let node = std::mem::replace(&mut self.node, Node::new(ServerConfig::default()));
        self.node = node.with_secure(secure);
        self
    }

    // --- the clock -------------------------------------------------------

    /// The simulated time.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// The instant `since_start` after the simulation began.
    pub fn at(&self, since_start: Duration) -> Instant {
        self.start + since_start
    }

    /// Lets `d` pass as a driver would: every timer fires when the clock
    /// reaches it (or at once if it is already due), with [`run`](Sim::run)
    /// after each; the clock ends `d` later, and runs once more.
    pub fn advance(&mut self, d: Duration) {
        let target = self.now + d;
        for _ in 0..100_000 {
            match self.node.poll_timeout() {
                Some(at) if at <= target => {
                    self.now = self.now.max(at);
                    self.node.handle_timeout(self.now);
                    self.run();
                }
                _ => {
                    self.now = target;
                    self.run();
                    return;
                }
            }
        }
        panic!("a timer keeps firing");
    }

    /// Moves the clock by `d` and nothing else: no timer fires until
    /// [`handle_timeout`](Sim::handle_timeout) or [`advance`](Sim::advance).
    pub fn advance_clock(&mut self, d: Duration) {
        self.now += d;
    }

    /// [`Node::handle_timeout`] at the current time.
    pub fn handle_timeout(&mut self) {
        self.node.handle_timeout(self.now);
    }

    // --- peers -----------------------------------------------------------

    /// A [`ClientConnection`] peer with the default config, run until its
    /// handshake is done (or refused: see [`client_error`](Sim::client_error)).
    pub fn client(&mut self) -> Peer {
        self.client_with(ClientConfig::default())
    }

    /// [`client`](Sim::client) with `config`.
    pub fn client_with(&mut self, config: ClientConfig) -> Peer {
        self.connect(ClientConnection::new(config), None)
    }

    /// A peer driven by `core` (a secure one, say), accepted from `source`
    /// ([`Node::accept_from`]), run until its handshake is done or refused.
    pub fn connect(&mut self, core: ClientConnection, source: Option<IpAddr>) -> Peer {
        let p = self.add(
            Side::Client {
                core: Box::new(core),
                error: None,
                weights: VecDeque::new(),
            },
            source,
        );
        self.run();
        p
    }

    /// A raw peer: [`write`](Sim::write) bytes from it, [`take_received`](Sim::take_received)
    /// or [`frames`](Sim::frames) what the node sent it. Accepted, nothing run.
    pub fn raw(&mut self) -> Peer {
        self.raw_from(None)
    }

    /// A [`raw`](Sim::raw) peer accepted from `source` ([`Node::accept_from`]).
    pub fn raw_from(&mut self, source: Option<IpAddr>) -> Peer {
        self.add(
            Side::Raw {
                taken: 0,
                decoder: FrameDecoder::new(usize::MAX >> 1),
            },
            source,
        )
    }

    fn add(&mut self, side: Side, source: Option<IpAddr>) -> Peer {
        let conn = self.node.accept_from(source, self.now);
        self.peers.push(PeerState {
            conn,
            side,
            reading: true,
            to_node: Vec::new(),
            to_peer: Vec::new(),
            split_to_node: usize::MAX,
            split_to_peer: usize::MAX,
            sent: Vec::new(),
            received: Vec::new(),
            closed: false,
            peak_allocated: 0,
        });
        Peer(self.peers.len() - 1)
    }

    /// The node's id for `p`'s connection.
    pub fn conn(&self, p: Peer) -> ConnectionId {
        self.peers[p.0].conn
    }

    /// A client peer's core, to make requests or read events.
    ///
    /// # Panics
    /// If `p` is raw.
    pub fn client_core(&mut self, p: Peer) -> &mut ClientConnection {
        match &mut self.peers[p.0].side {
            Side::Client { core, .. } => core,
            Side::Raw { .. } => panic!("{p:?} is raw"),
        }
    }

    /// The fatal error a client peer's core returned from `handle_input`, if any.
    ///
    /// # Panics
    /// If `p` is raw.
    pub fn client_error(&self, p: Peer) -> Option<&ClientError> {
        match &self.peers[p.0].side {
            Side::Client { error, .. } => error.as_ref(),
            Side::Raw { .. } => panic!("{p:?} is raw"),
        }
    }

    /// Begins an upload on a client peer's core; [`run`](Sim::run) hands it
    /// `weights` chunk by chunk as it asks. The chunks are made lazily, so a
    /// request made before that run goes out ahead of them, mid-upload.
    pub fn upload(
        &mut self,
        p: Peer,
        config_json: &str,
        weights: &[u8],
        sha256: Option<[u8; 32]>,
    ) -> Result<RequestId, ClientError> {
        let request =
            self.client_core(p)
                .begin_upload(config_json, weights.len() as u64, sha256)?;
        self.push_weights(p, weights);
        Ok(request)
    }

    /// More weights for the upload a client peer's core is sending (one begun
    /// on [`client_core`](Sim::client_core) directly, say with a `weights_len` of its own).
    pub fn push_weights(&mut self, p: Peer, bytes: &[u8]) {
        if let Side::Client { weights, .. } = &mut self.peers[p.0].side {
            weights.extend(bytes);
        }
    }

    /// Bytes from `p` to the node, as if written to its socket: read by the
    /// node on a later [`feed`](Sim::feed) or [`run`](Sim::run).
    pub fn write(&mut self, p: Peer, bytes: &[u8]) {
        let peer = &mut self.peers[p.0];
        peer.to_node.extend_from_slice(bytes);
        peer.sent.extend_from_slice(bytes);
    }

    /// What the node delivered to a raw peer since the last call.
    pub fn take_received(&mut self, p: Peer) -> Vec<u8> {
        let peer = &mut self.peers[p.0];
        match &mut peer.side {
            Side::Raw { taken, .. } => {
                let new = peer.received[*taken..].to_vec();
                *taken = peer.received.len();
                new
            }
            Side::Client { .. } => panic!("{p:?} is a client"),
        }
    }

    /// The whole frames a raw peer received since the last call, as text.
    ///
    /// # Panics
    /// If `p` is a client, or the node sent a bad frame header or a body that is not UTF-8.
    pub fn frames(&mut self, p: Peer) -> Vec<String> {
        let bytes = self.take_received(p);
        let Side::Raw { decoder, .. } = &mut self.peers[p.0].side else {
            unreachable!("take_received checked")
        };
        let mut frames = Vec::new();
        decoder
            .feed(&bytes, |body| {
                frames.push(String::from_utf8(body.to_vec()).expect("a UTF-8 frame"))
            })
            .expect("the node's frame headers are valid");
        frames
    }

    /// Everything `p` ever wrote.
    pub fn sent(&self, p: Peer) -> &[u8] {
        &self.peers[p.0].sent
    }

    /// Bytes `p` wrote that the node has not read.
    pub fn unread(&self, p: Peer) -> usize {
        self.peers[p.0].to_node.len()
    }

    /// Everything delivered to `p`.
    pub fn received(&self, p: Peer) -> &[u8] {
        &self.peers[p.0].received
    }

    /// The most heap bytes `p`'s connection held after any read
    /// ([`Connection::allocated`](crate::Connection::allocated)).
    pub fn peak_allocated(&self, p: Peer) -> usize {
        self.peers[p.0].peak_allocated
    }

    /// A peer that stops reading takes nothing the node transmits (it waits in the node).
    pub fn set_reading(&mut self, p: Peer, reading: bool) {
        self.peers[p.0].reading = reading;
    }

    /// Whether `p` reads what the node transmits.
    pub fn is_reading(&self, p: Peer) -> bool {
        self.peers[p.0].reading
    }

    /// Splits the streams: the node reads at most `to_node` bytes of `p`'s at
    /// a time, and `p` receives at most `to_peer` bytes per step (`usize::MAX`: whole).
    pub fn split(&mut self, p: Peer, to_node: usize, to_peer: usize) {
        let peer = &mut self.peers[p.0];
        peer.split_to_node = to_node.max(1);
        peer.split_to_peer = to_peer.max(1);
    }

    /// The peer shut its side (end of stream): [`Node::peer_closed`]. What the
    /// node had queued is still delivered; [`run`](Sim::run) then closes it.
    pub fn close(&mut self, p: Peer) {
        self.node.peer_closed(self.peers[p.0].conn);
    }

    /// The peer vanished (its socket is gone, mid-stream or not):
    /// [`Node::peer_closed`] and [`Node::remove`]; nothing more moves either way.
    pub fn vanish(&mut self, p: Peer) {
        let peer = &mut self.peers[p.0];
        self.node.peer_closed(peer.conn);
        self.node.remove(peer.conn);
        peer.closed = true;
    }

    /// Whether `p`'s connection is gone: closed by the node and flushed, or vanished.
    pub fn is_closed(&self, p: Peer) -> bool {
        self.peers[p.0].closed
    }

    // --- driving ---------------------------------------------------------

    /// Steps until nothing moves.
    ///
    /// # Panics
    /// If it never goes quiet.
    pub fn run(&mut self) {
        for _ in 0..100_000 {
            if !self.step() {
                return;
            }
        }
        panic!("the simulation never went quiet");
    }

    /// One round of a driver (see the [module docs](self)); returns whether anything moved.
    pub fn step(&mut self) -> bool {
        let mut progress = false;
        for i in 0..self.peers.len() {
            let p = Peer(i);
            if self.peers[i].closed {
                continue;
            }
            progress |= self.transmit(p) > 0;
            if self.close_if_flushed(p) {
                progress = true;
                continue;
            }
            self.client_writes(p);
            progress |= !self.feed(p, usize::MAX).is_empty();
        }
        progress |= self.poll_events() > 0;
        progress | self.run_workers()
    }

    /// A closing connection is closed once its bytes are out (a peer that does
    /// not read never takes them: it is closed only with nothing left to send).
    fn close_if_flushed(&mut self, p: Peer) -> bool {
        let peer = &mut self.peers[p.0];
        let pending = self
            .node
            .connection(peer.conn)
            .map_or(0, |c| c.pending_transmit());
        if self.node.is_closing(peer.conn) && pending == 0 && peer.to_peer.is_empty() {
            peer.closed = true;
            self.node.remove(peer.conn);
            return true;
        }
        false
    }

    /// A client peer's core makes the upload chunks it wants and writes its bytes.
    fn client_writes(&mut self, p: Peer) {
        let peer = &mut self.peers[p.0];
        let Side::Client { core, weights, .. } = &mut peer.side else {
            return;
        };
        loop {
            let want = core.upload_wants().min(weights.len());
            if want == 0 {
                break;
            }
            let chunk: Vec<u8> = weights.drain(..want).collect();
            core.upload_chunk(&chunk).expect("the core asked for it");
        }
        if !core.is_uploading() {
            weights.clear();
        }
        let mut out = Vec::new();
        core.poll_transmit(&mut out);
        peer.sent.extend_from_slice(&out);
        peer.to_node.extend_from_slice(&out);
    }

    /// One read by the node: up to `max` of the bytes `p` wrote (and its
    /// split), if the node [wants to read](Node::wants_read). Returns what it read.
    pub fn feed(&mut self, p: Peer, max: usize) -> Vec<u8> {
        let peer = &mut self.peers[p.0];
        if peer.closed || peer.to_node.is_empty() || !self.node.wants_read(peer.conn) {
            return Vec::new();
        }
        let n = max.min(peer.split_to_node).min(peer.to_node.len());
        let data: Vec<u8> = peer.to_node.drain(..n).collect();
        self.node.handle_input(peer.conn, &data, self.now);
        if let Some(c) = self.node.connection(peer.conn) {
            peer.peak_allocated = peer.peak_allocated.max(c.allocated());
        }
        data
    }

    /// One write to `p`, if it reads: takes the node's pending bytes (only once
    /// the last ones are delivered) and delivers up to its split. Returns the
    /// bytes delivered.
    pub fn transmit(&mut self, p: Peer) -> usize {
        let peer = &mut self.peers[p.0];
        if peer.closed || !peer.reading {
            return 0;
        }
        if peer.to_peer.is_empty() {
            // A fresh buffer each time: `poll_transmit` swaps, and a recycled
            // one's capacity would count in the connection's `allocated()`.
            peer.to_peer = Vec::new();
            self.node.poll_transmit(peer.conn, &mut peer.to_peer);
        }
        let n = peer.split_to_peer.min(peer.to_peer.len());
        if n == 0 {
            return 0;
        }
        let data: Vec<u8> = peer.to_peer.drain(..n).collect();
        if let Side::Client { core, error, .. } = &mut peer.side {
            if error.is_none() {
                *error = core.handle_input(&data).err();
            }
        }
        peer.received.extend_from_slice(&data);
        n
    }

    /// Acts on every event: mounts and upload work run (or are held), wakes
    /// are recorded. Returns how many there were.
    pub fn poll_events(&mut self) -> usize {
        let mut count = 0;
        while let Some(event) = self.node.poll_event() {
            count += 1;
            match event {
                Event::Mount(mount) if self.hold_mounts => self.held_mounts.push(mount),
                Event::Mount(mount) => {
                    let outcome = run_mount(&self.executor, mount);
                    self.node.mount_done(outcome, self.now);
                }
                Event::Upload(work) if self.hold_uploads => self.held_uploads.push(work),
                Event::Upload(work) => self.upload_work_done(work),
                Event::Wake(conn) => self.wakes.push(conn),
                Event::Resume(conn) => self.resumes.push(conn),
                Event::JobQueued => {}
                Event::Query { conn, hashes } => self.queries.push((conn, hashes)),
                Event::UseStored(stored) => self.held_uses.push(stored),
            }
        }
        count
    }

    /// Workers run every queued job, or with `hold_jobs` take them while one is free.
    fn run_workers(&mut self) -> bool {
        let mut progress = false;
        if self.hold_jobs {
            while self.take_job() {
                progress = true;
            }
        } else {
            while let Some(job) = self.node.next_job() {
                let outcome = run_job(&self.executor, &job);
                self.node.complete(job.id, outcome, self.now);
                progress = true;
            }
        }
        progress
    }

    /// A free worker (fewer than `workers` held) takes the next job into
    /// `held_jobs`. Returns whether one did.
    pub fn take_job(&mut self) -> bool {
        if self.held_jobs.len() >= self.workers {
            return false;
        }
        match self.node.next_job() {
            Some(job) => {
                self.held_jobs.push(job);
                true
            }
            None => false,
        }
    }

    /// Runs the `i`-th held job on the executor and hands back its outcome;
    /// returns whether the result was delivered ([`Node::complete`]).
    pub fn finish_job(&mut self, i: usize) -> bool {
        let job = self.held_jobs.remove(i);
        let outcome = run_job(&self.executor, &job);
        self.complete(job, outcome)
    }

    /// Hands back `outcome` for `job` (taken from `held_jobs`); returns whether it was delivered.
    pub fn complete(&mut self, job: Job<E::Model>, outcome: JobOutcome) -> bool {
        self.node.complete(job.id, outcome, self.now)
    }

    /// Runs the `i`-th held mount on the executor and hands back its outcome.
    pub fn finish_mount(&mut self, i: usize) {
        let outcome = run_mount(&self.executor, self.held_mounts.remove(i));
        self.node.mount_done(outcome, self.now);
    }

    /// Runs the `i`-th held upload work on the executor and hands it back.
    pub fn finish_upload(&mut self, i: usize) {
        let work = self.held_uploads.remove(i);
        self.upload_work_done(work);
    }

    fn upload_work_done(&mut self, mut work: UploadWork) {
        run_upload(&self.executor, &mut work);
        assert!(work.is_empty(), "run_upload kept the stretch's bytes");
        self.node.upload_work_done(work, self.now);
    }
}
