//! [`Node`]: a donor node's whole protocol state, with no I/O.
//!
//! The node owns every [`Connection`] and the one FIFO job queue. The caller
//! (an adapter) moves bytes and time in and out:
//!
//! - [`accept`](Node::accept) a connection; its `hello` is queued at once;
//! - [`handle_input`](Node::handle_input) with the bytes it read and `now`;
//! - [`poll_transmit`](Node::poll_transmit) for the bytes to write;
//! - [`poll_event`](Node::poll_event) for work: wake a connection, run a job, mount a model;
//! - [`next_job`](Node::next_job) on a worker, then [`complete`](Node::complete);
//! - [`poll_timeout`](Node::poll_timeout) / [`handle_timeout`](Node::handle_timeout);
//! - [`remove`](Node::remove) once the socket is gone.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::connection::{Connection, ConnectionId};
use crate::error::ProtocolError;
use crate::frame::DEFAULT_MAX_FRAME_LEN;
use crate::job::{Job, JobError, JobId, JobInput, JobOutcome, JobOutput};
use crate::message::{InferResult, Message, Mode, PromptResult, QueueStatus};
use crate::upload::{CommittedModel, UploadWork};

/// Everything a node's protocol behaviour depends on. Every limit has a default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// `model_push` (default) or `local_lm`.
    pub mode: Mode,
    /// Informational path sent in `hello` on `local_lm` nodes.
    pub local_lm_path: String,
    /// Jobs that may wait in the queue (default 64).
    pub queue_capacity: usize,
    /// Largest frame body accepted (default 64 MiB).
    pub max_frame_len: usize,
    /// Largest `weights_len` accepted (default 6,710,886,400 as in Go).
    pub max_model_len: u64,
    /// Connections at once; more are sent an error and closed (default 1024).
    pub max_connections: usize,
    /// Unsent bytes per connection above which its input is paused (default 8 MiB).
    pub max_outbound: usize,
    /// Time allowed from accept to the first complete frame (default 10 s).
    pub handshake_timeout: Duration,
    /// Time a partial frame may go without new bytes (default 10 s).
    pub stall_timeout: Duration,
    /// Time a connection with nothing in flight may stay silent (default 300 s; `None` = never).
    pub idle_timeout: Option<Duration>,
    /// Time a connection may stay over `max_outbound` (default 30 s).
    pub backpressure_timeout: Duration,
    /// Emit [`Event::Upload`] so workers hash an upload's `weights_sha256` while it
    /// arrives (default false: the hash is computed by [`run_mount`](crate::run_mount)
    /// at commit). Turn it on only if you run every `Upload` event and hand it back.
    pub digest_on_workers: bool,
    /// Move each upload's bytes, as they arrive, to the executor's spool through
    /// [`Event::Upload`] work, instead of holding the whole model (default false;
    /// set it from [`Executor::spools_uploads`](crate::Executor::spools_uploads),
    /// as the adapters do). The same duty to run every `Upload` event applies.
    pub spool_uploads: bool,
    /// Bytes an upload gathers before they go to a worker as [`Event::Upload`]
    /// work (default 4 MiB): larger stretches mean fewer hand-offs, smaller ones
    /// less memory held per upload while spooling.
    pub upload_stretch: usize,
    /// Worker threads an adapter runs for jobs and mounts (default 1, as in Go).
    /// The node itself runs nothing; `in_progress` counts what workers took.
    pub workers: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            mode: Mode::ModelPush,
            local_lm_path: String::new(),
            queue_capacity: 64,
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            max_model_len: 100 * DEFAULT_MAX_FRAME_LEN as u64,
            max_connections: 1024,
            max_outbound: 8 * 1024 * 1024,
            handshake_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(10),
            idle_timeout: Some(Duration::from_secs(300)),
            backpressure_timeout: Duration::from_secs(30),
            workers: 1,
            digest_on_workers: false,
            spool_uploads: false,
            upload_stretch: 4 * 1024 * 1024,
        }
    }
}

/// Something the caller must act on, from [`Node::poll_event`].
#[derive(Debug)]
pub enum Event {
    /// A connection got bytes to transmit or started closing from outside its
    /// own input (a result, a mount, a timeout, shutdown): wake its writer.
    Wake(ConnectionId),
    /// A connection that [`Node::wants_read`] refused (its spooled upload was
    /// behind) wants input again: wake its reader.
    Resume(ConnectionId),
    /// A job was queued: a worker should call [`Node::next_job`].
    JobQueued,
    /// With [`ServerConfig::digest_on_workers`] or [`ServerConfig::spool_uploads`]:
    /// part of an upload to hash or spool on a worker with
    /// [`run_upload`](crate::run_upload), then hand back with [`Node::upload_work_done`].
    Upload(UploadWork),
    /// A committed model to load: run it on a worker with
    /// [`run_mount`](crate::run_mount) and hand the outcome to [`Node::mount_done`].
    Mount(Mount),
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

/// Which result frame a job gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JobKind {
    Infer,
    Prompt,
}

/// A job's routing: who asked, under which id, for what.
#[derive(Debug)]
struct Route {
    conn: ConnectionId,
    job_id: String,
    kind: JobKind,
}

#[derive(Debug)]
struct Queued<M> {
    id: JobId,
    route: Route,
    input: JobInput<M>,
}

/// The state every connection shares: the queue, running jobs, events.
#[derive(Debug)]
pub(crate) struct Shared<M> {
    pub(crate) config: ServerConfig,
    queue: VecDeque<Queued<M>>,
    running: HashMap<JobId, (Route, usize)>,
    pub(crate) events: VecDeque<Event>,
    next_job: u64,
    shutting_down: bool,
}

impl<M> Shared<M> {
    /// Queues a job, or says why not.
    pub(crate) fn admit(
        &mut self,
        conn: ConnectionId,
        job_id: String,
        kind: JobKind,
        input: JobInput<M>,
    ) -> Result<(), ProtocolError> {
        if self.shutting_down {
            return Err(ProtocolError::ShuttingDown);
        }
        if self.queue.len() >= self.config.queue_capacity {
            return Err(ProtocolError::QueueFull);
        }
        self.next_job += 1;
        self.queue.push_back(Queued {
            id: JobId(self.next_job),
            route: Route { conn, job_id, kind },
            input,
        });
        self.events.push_back(Event::JobQueued);
        Ok(())
    }

    pub(crate) fn mount(&mut self, conn: ConnectionId, model: CommittedModel) {
        self.events.push_back(Event::Mount(Mount {
            token: MountToken { conn },
            model,
        }));
    }

    pub(crate) fn queue_status(&self) -> QueueStatus {
        QueueStatus {
            depth: self.queue.len() as i64,
            capacity: self.config.queue_capacity as i64,
            in_progress: !self.running.is_empty(),
        }
    }
}

/// A donor node: every connection's state and the one FIFO job queue.
///
/// `M` is the executor's model type ([`Executor::Model`](crate::Executor::Model)).
#[derive(Debug)]
pub struct Node<M> {
    conns: HashMap<ConnectionId, Connection<M>>,
    shared: Shared<M>,
    next_conn: u64,
}

impl<M> Node<M> {
    /// A node with no connections.
    pub fn new(config: ServerConfig) -> Self {
        Node {
            conns: HashMap::new(),
            shared: Shared {
                config,
                queue: VecDeque::new(),
                running: HashMap::new(),
                events: VecDeque::new(),
                next_job: 0,
                shutting_down: false,
            },
            next_conn: 0,
        }
    }

    /// The node's configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.shared.config
    }

    /// Registers a new connection and queues its `hello`. Over `max_connections`
    /// or during shutdown the connection is created closing, with only an error
    /// frame to send.
    pub fn accept(&mut self, now: Instant) -> ConnectionId {
        self.next_conn += 1;
        let id = ConnectionId(self.next_conn);
        let refused = if self.shared.shutting_down {
            Some(ProtocolError::ShuttingDown)
        } else if self.conns.len() >= self.shared.config.max_connections {
            Some(ProtocolError::TooManyConnections)
        } else {
            None
        };
        self.conns
            .insert(id, Connection::accept(&self.shared.config, now, refused));
        id
    }

    /// Feeds bytes read from `conn`. Answers land in its transmit buffer; jobs
    /// and mounts become events. Unknown ids are ignored.
    pub fn handle_input(&mut self, conn: ConnectionId, data: &[u8], now: Instant) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.handle_input(conn, data, now, &mut self.shared);
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
        self.conns
            .get(&conn)
            .is_some_and(|c| c.wants_read(&self.shared.config))
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
        }
    }

    /// Forgets a connection whose socket is closed: its queued jobs are dropped,
    /// results of its running jobs and mounts will be discarded.
    pub fn remove(&mut self, conn: ConnectionId) {
        if self.conns.remove(&conn).is_some() {
            self.shared.queue.retain(|q| q.route.conn != conn);
            self.check_drained();
        }
    }

    /// The next thing the caller must act on.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.shared.events.pop_front()
    }

    /// Takes the oldest queued job for a worker.
    pub fn next_job(&mut self) -> Option<Job<M>> {
        let queued = self.shared.queue.pop_front()?;
        let queue_depth = self.shared.queue.len();
        let job_id = queued.route.job_id.clone();
        self.shared
            .running
            .insert(queued.id, (queued.route, queue_depth));
        Some(Job {
            id: queued.id,
            job_id,
            input: queued.input,
            queue_depth,
        })
    }

    /// Whether a job is waiting in the queue.
    pub fn has_job(&self) -> bool {
        !self.shared.queue.is_empty()
    }

    /// Hands back a job's outcome; its result frame is routed to the connection
    /// that asked, or dropped if that connection is gone. Returns whether it was delivered.
    pub fn complete(&mut self, job: JobId, outcome: JobOutcome, now: Instant) -> bool {
        let Some((route, queue_depth)) = self.shared.running.remove(&job) else {
            return false;
        };
        let delivered = match self.conns.get_mut(&route.conn) {
            Some(conn) => {
                conn.jobs_in_flight -= 1;
                if conn.closing().is_none() {
                    conn.send(&result_message(
                        route.kind,
                        route.job_id,
                        queue_depth as i64,
                        outcome,
                    ));
                    conn.note_output(&self.shared.config, now);
                    self.shared.events.push_back(Event::Wake(route.conn));
                    true
                } else {
                    false
                }
            }
            None => false,
        };
        self.check_drained();
        delivered
    }

    /// Hands back [`UploadWork`] that was run; dropped (with its spool) if its upload is gone.
    pub fn upload_work_done(&mut self, work: UploadWork, now: Instant) {
        let conn_id = work.conn;
        if let Some(conn) = self.conns.get_mut(&conn_id) {
            let before = conn.pending_transmit();
            conn.work_returned(conn_id, work, now, &mut self.shared);
            if conn.pending_transmit() != before {
                conn.note_output(&self.shared.config, now);
                self.shared.events.push_back(Event::Wake(conn_id));
            }
        }
        self.check_drained();
    }

    /// Hands back a mount's outcome; `model_status` goes to the connection that committed.
    pub fn mount_done(&mut self, outcome: MountOutcome<M>, now: Instant) {
        let conn_id = outcome.token.conn;
        if let Some(conn) = self.conns.get_mut(&conn_id) {
            conn.mounted(conn_id, outcome.result, &mut self.shared);
            conn.note_output(&self.shared.config, now);
            self.shared.events.push_back(Event::Wake(conn_id));
        }
        self.check_drained();
    }

    /// The queue as a `queue_status` frame reports it.
    pub fn queue_status(&self) -> QueueStatus {
        self.shared.queue_status()
    }

    /// The earliest deadline of any connection (a scan over all of them).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.conns
            .values()
            .filter_map(|c| c.deadline(&self.shared.config))
            .min()
    }

    /// The earliest deadline of one connection, for adapters with a task per connection.
    pub fn connection_timeout(&self, conn: ConnectionId) -> Option<Instant> {
        self.conns.get(&conn)?.deadline(&self.shared.config)
    }

    /// Closes every connection whose timer expired by `now`, each with an error frame saying why.
    pub fn handle_timeout(&mut self, now: Instant) {
        for (id, conn) in &mut self.conns {
            if conn.handle_timeout(&self.shared.config, now) {
                self.shared.events.push_back(Event::Wake(*id));
            }
        }
    }

    /// Starts a graceful shutdown: no new jobs or connections; queued and
    /// running jobs finish and are delivered; then every connection closes.
    pub fn begin_shutdown(&mut self) {
        self.shared.shutting_down = true;
        self.check_drained();
    }

    /// Whether shutdown has begun and every job and mount is done.
    pub fn is_drained(&self) -> bool {
        self.shared.shutting_down && self.is_idle()
    }

    fn is_idle(&self) -> bool {
        self.shared.queue.is_empty()
            && self.shared.running.is_empty()
            && self.conns.values().all(|c| c.mounts_in_flight == 0)
    }

    /// During shutdown, closes every connection once nothing is left to deliver.
    fn check_drained(&mut self) {
        if !self.is_drained() {
            return;
        }
        for (id, conn) in &mut self.conns {
            if conn.closing().is_none() {
                conn.close(ProtocolError::ShuttingDown);
                self.shared.events.push_back(Event::Wake(*id));
            }
        }
    }
}

fn result_message(
    kind: JobKind,
    job_id: String,
    queue_depth: i64,
    outcome: JobOutcome,
) -> Message<'static> {
    let outcome = match (kind, outcome) {
        (JobKind::Infer, Ok(JobOutput::Prompt(_))) | (JobKind::Prompt, Ok(JobOutput::Infer(_))) => {
            Err(JobError::new(
                "bad_output",
                "executor returned the wrong kind of output",
            ))
        }
        (_, outcome) => outcome,
    };
    let (ok, error, code) = match &outcome {
        Ok(_) => (true, String::new(), String::new()),
        Err(e) => (false, e.message.clone(), e.code.clone()),
    };
    match kind {
        JobKind::Infer => Message::InferResult(InferResult {
            job_id,
            ok,
            output_ids: match outcome {
                Ok(JobOutput::Infer(ids)) => ids,
                _ => Vec::new(),
            },
            error,
            code,
            queue_depth,
        }),
        JobKind::Prompt => Message::PromptResult(PromptResult {
            job_id,
            ok,
            text: match outcome {
                Ok(JobOutput::Prompt(text)) => text,
                _ => String::new(),
            },
            error,
            code,
            queue_depth,
        }),
    }
}
