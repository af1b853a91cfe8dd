//! [`Host`]: a [`Node`] behind a lock, with worker threads and per-connection wakers.
//!
//! Every adapter drives its sockets its own way (threads, smol tasks, tokio
//! tasks) but hosts the node the same way, so this part is shared: the clock,
//! the lock, worker threads that run jobs and mounts off the I/O path, and the
//! dispatch of node events to the connection that must act on them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use donate_proto::{
    run_job, run_mount, ConnectionId, DigestWork, Event, Executor, Mount, Node, ServerConfig,
};

/// Called when a connection has bytes to send or must close.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// What a connection's driver needs to know after moving bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnState {
    /// Read more input from the peer.
    pub wants_read: bool,
    /// Close the socket once the taken bytes are written.
    pub closing: bool,
    /// Bytes are waiting for [`Host::poll_transmit`]: wake the writer.
    pub has_transmit: bool,
    /// Call [`Host::handle_timeout`] at this time if nothing happens before.
    pub deadline: Option<Instant>,
}

struct State<M> {
    node: Node<M>,
    wakers: HashMap<ConnectionId, Waker>,
    mounts: VecDeque<Mount>,
    digests: VecDeque<DigestWork>,
    stop_workers: bool,
}

/// A node shared by connection drivers and worker threads.
pub struct Host<E: Executor> {
    state: Mutex<State<E::Model>>,
    work: Condvar,
    idle: Condvar,
    executor: E,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl<E: Executor> Host<E> {
    /// A host for a new node, with `config.workers` worker threads started.
    /// Uploads' `weights_sha256` is hashed by the workers as the bytes arrive.
    pub fn start(mut config: ServerConfig, executor: E) -> Arc<Self> {
        config.digest_on_workers = true;
        let workers = config.workers.max(1);
        let host = Arc::new(Host {
            state: Mutex::new(State {
                node: Node::new(config),
                wakers: HashMap::new(),
                mounts: VecDeque::new(),
                digests: VecDeque::new(),
                stop_workers: false,
            }),
            work: Condvar::new(),
            idle: Condvar::new(),
            executor,
            workers: Mutex::new(Vec::new()),
        });
        let handles = (0..workers)
            .map(|i| {
                let host = Arc::clone(&host);
                std::thread::Builder::new()
                    .name(format!("donate-worker-{i}"))
                    .spawn(move || host.work_loop())
                    .expect("spawn worker thread")
            })
            .collect();
        *host.workers.lock().expect("workers lock") = handles;
        host
    }

    /// The node's configuration.
    pub fn config(&self) -> ServerConfig {
        self.lock().node.config().clone()
    }

    /// Registers a connection; `waker` is called whenever it must act.
    pub fn accept(&self, waker: Waker) -> ConnectionId {
        let mut state = self.lock();
        let conn = state.node.accept(Instant::now());
        state.wakers.insert(conn, waker);
        conn
    }

    /// `conn`'s state as it stands.
    pub fn state(&self, conn: ConnectionId) -> ConnState {
        let state = self.lock();
        self.dispatch(state, conn)
    }

    /// Feeds bytes read from `conn`.
    pub fn handle_input(&self, conn: ConnectionId, data: &[u8]) -> ConnState {
        let mut state = self.lock();
        state.node.handle_input(conn, data, Instant::now());
        self.dispatch(state, conn)
    }

    /// Moves `conn`'s pending bytes into `out` (call only with `out` written out).
    pub fn poll_transmit(&self, conn: ConnectionId, out: &mut Vec<u8>) -> ConnState {
        let mut state = self.lock();
        state.node.poll_transmit(conn, out);
        self.dispatch(state, conn)
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
        state.node.remove(conn);
        state.wakers.remove(&conn);
        let state = self.dispatch_events(state);
        if state.wakers.is_empty() {
            self.idle.notify_all();
        }
    }

    /// Graceful shutdown: no new jobs; jobs finish and are delivered; every
    /// connection closes. Returns once every connection is removed and the
    /// workers have stopped.
    pub fn shutdown(&self) {
        let mut state = self.lock();
        state.node.begin_shutdown();
        state = self.dispatch_events(state);
        while !state.wakers.is_empty() {
            state = self.idle.wait(state).expect("host lock");
        }
        state.stop_workers = true;
        drop(state);
        self.work.notify_all();
        let handles = std::mem::take(&mut *self.workers.lock().expect("workers lock"));
        for handle in handles {
            let _ = handle.join();
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<E::Model>> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Acts on the node's events, then reports `conn`'s state.
    fn dispatch(&self, state: MutexGuard<'_, State<E::Model>>, conn: ConnectionId) -> ConnState {
        let state = self.dispatch_events(state);
        ConnState {
            wants_read: state.node.wants_read(conn),
            closing: state.node.is_closing(conn),
            has_transmit: state
                .node
                .connection(conn)
                .is_some_and(|c| c.pending_transmit() > 0),
            deadline: state.node.connection_timeout(conn),
        }
    }

    fn dispatch_events<'a>(
        &'a self,
        mut state: MutexGuard<'a, State<E::Model>>,
    ) -> MutexGuard<'a, State<E::Model>> {
        let mut wake = Vec::new();
        while let Some(event) = state.node.poll_event() {
            match event {
                Event::Wake(conn) => wake.extend(state.wakers.get(&conn).cloned()),
                Event::JobQueued => self.work.notify_one(),
                Event::Mount(mount) => {
                    state.mounts.push_back(mount);
                    self.work.notify_one();
                }
                Event::Digest(work) => {
                    state.digests.push_back(work);
                    self.work.notify_one();
                }
            }
        }
        if wake.is_empty() {
            return state;
        }
        drop(state);
        for waker in wake {
            waker();
        }
        self.lock()
    }

    /// A worker: takes mounts, then hashing, then jobs, and runs them unlocked.
    fn work_loop(&self) {
        let mut state = self.lock();
        loop {
            if let Some(mount) = state.mounts.pop_front() {
                drop(state);
                let outcome = run_mount(&self.executor, mount);
                state = self.lock();
                state.node.mount_done(outcome, Instant::now());
            } else if let Some(mut work) = state.digests.pop_front() {
                drop(state);
                work.run();
                state = self.lock();
                state.node.digest_done(work, Instant::now());
            } else if let Some(job) = state.node.next_job() {
                drop(state);
                let outcome = run_job(&self.executor, &job);
                state = self.lock();
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
