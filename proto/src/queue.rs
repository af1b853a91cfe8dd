//! The node's one FIFO job queue, the jobs workers are running, and
//! [`QueueRoom`]: the value a connection is handed to decide admissions.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::error::ProtocolError;
use crate::id::{ConnectionId, JobId};
use crate::job::{Job, JobInput, JobKind, Stop};
use crate::message::QueueStatus;
use crate::sampling::SamplingParams;

/// Who asked for a job, under which id, for which result frame.
#[derive(Debug)]
pub(crate) struct Route {
    pub(crate) conn: ConnectionId,
    pub(crate) job_id: String,
    pub(crate) kind: JobKind,
}

#[derive(Debug)]
struct Queued<M> {
    id: JobId,
    route: Route,
    input: JobInput<M>,
    sampling: SamplingParams,
    /// When it must be answered (extension `deadline`, or `max_job_time`).
    deadline: Option<Instant>,
    /// When it was queued.
    at: Instant,
}

/// A job a worker took.
#[derive(Debug)]
struct Running {
    route: Route,
    /// The queue depth when it was taken.
    queue_depth: usize,
    /// Read by the executor through its `JobContext`.
    cancel: Arc<AtomicBool>,
    deadline: Option<Instant>,
    /// Why the node stopped it, once it did: its outcome is replaced.
    stopped: Option<Stop>,
    /// Whether its partial output is still sent (extension `stream`): not
    /// once one found its connection over `max_outbound`.
    streaming: bool,
}

/// What [`JobQueue::cancel`] found.
#[derive(Debug)]
pub(crate) enum Cancelled {
    /// A queued job, now removed: answer it.
    Queued(Route),
    /// A running job, now flagged: it is answered when its worker hands it back.
    Running,
    /// No such job (answered already, or never sent).
    None,
}

/// Queued and running jobs of every connection.
#[derive(Debug)]
pub(crate) struct JobQueue<M> {
    capacity: usize,
    queued: VecDeque<Queued<M>>,
    running: HashMap<JobId, Running>,
    next_id: u64,
    closed: bool,
    /// Whether any job queued since the queue was last empty has a deadline:
    /// until one does, looking for deadlines costs nothing.
    deadlines: bool,
}

/// The queue as one connection sees it while it handles input: how many
/// jobs it may still admit. A copy, handed in and read back by the node, so
/// a connection never holds a reference into the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueueRoom {
    depth: usize,
    capacity: usize,
    in_progress: bool,
    closed: bool,
}

impl QueueRoom {
    /// Takes one place, or says why there is none.
    pub(crate) fn admit(&mut self) -> Result<(), ProtocolError> {
        if self.closed {
            return Err(ProtocolError::ShuttingDown);
        }
        if self.depth >= self.capacity {
            return Err(ProtocolError::QueueFull);
        }
        self.depth += 1;
        Ok(())
    }

    /// What a `queue_status` frame reports now.
    pub(crate) fn status(&self) -> QueueStatus {
        QueueStatus {
            depth: self.depth as i64,
            capacity: self.capacity as i64,
            in_progress: self.in_progress,
        }
    }
}

impl Running {
    fn stop(&mut self, why: Stop) {
        self.stopped = Some(why);
        self.cancel.store(true, Ordering::Relaxed);
    }
}

impl<M> JobQueue<M> {
    pub(crate) fn new(capacity: usize) -> Self {
        JobQueue {
            capacity,
            queued: VecDeque::new(),
            running: HashMap::new(),
            next_id: 0,
            closed: false,
            deadlines: false,
        }
    }

    pub(crate) fn room(&self) -> QueueRoom {
        QueueRoom {
            depth: self.queued.len(),
            capacity: self.capacity,
            in_progress: !self.running.is_empty(),
            closed: self.closed,
        }
    }

    /// Queues a job its connection admitted against [`room`](Self::room).
    /// Returns its place: 1 for the next job a worker takes.
    pub(crate) fn push(
        &mut self,
        route: Route,
        input: JobInput<M>,
        deadline: Option<Instant>,
        now: Instant,
        sampling: SamplingParams,
    ) -> usize {
        self.next_id += 1;
        self.deadlines |= deadline.is_some();
        self.queued.push_back(Queued {
            id: JobId(self.next_id),
            route,
            input,
            deadline,
            at: now,
            sampling,
        });
        self.queued.len()
    }

    /// Takes the oldest job for a worker.
    pub(crate) fn take(&mut self) -> Option<Job<M>> {
        let queued = self.queued.pop_front()?;
        let queue_depth = self.queued.len();
        let job_id = queued.route.job_id.clone();
        let conn = queued.route.conn;
        let cancel = Arc::new(AtomicBool::new(false));
        self.running.insert(
            queued.id,
            Running {
                route: queued.route,
                queue_depth,
                cancel: Arc::clone(&cancel),
                deadline: queued.deadline,
                stopped: None,
                streaming: true,
            },
        );
        Some(Job {
            id: queued.id,
            job_id,
            input: queued.input,
            queue_depth,
            cancel,
            queued_at: queued.at,
            conn,
            sampling: queued.sampling,
        })
    }

    /// The route of a running job whose partial output is still sent.
    pub(crate) fn streaming_route(&self, job: JobId) -> Option<&Route> {
        self.running
            .get(&job)
            .filter(|r| r.streaming)
            .map(|r| &r.route)
    }

    /// A running job sends no more partial output.
    pub(crate) fn stop_streaming(&mut self, job: JobId) {
        if let Some(running) = self.running.get_mut(&job) {
            running.streaming = false;
        }
    }

    /// Ends a running job: who asked, the depth when it was taken, and why
    /// the node stopped it if it did.
    pub(crate) fn finish(&mut self, job: JobId) -> Option<(Route, usize, Option<Stop>)> {
        let running = self.running.remove(&job)?;
        self.settle();
        Some((running.route, running.queue_depth, running.stopped))
    }

    /// Stops `conn`'s oldest job named `job_id` not already stopped: a queued
    /// one is removed, a running one flagged.
    pub(crate) fn cancel(&mut self, conn: ConnectionId, job_id: &str, why: Stop) -> Cancelled {
        let running = self
            .running
            .iter_mut()
            .filter(|(_, r)| {
                r.route.conn == conn && r.route.job_id == job_id && r.stopped.is_none()
            })
            .min_by_key(|(id, _)| **id);
        if let Some((_, running)) = running {
            running.stop(why);
            return Cancelled::Running;
        }
        let at = self
            .queued
            .iter()
            .position(|q| q.route.conn == conn && q.route.job_id == job_id);
        match at.and_then(|i| self.queued.remove(i)) {
            Some(queued) => {
                self.settle();
                Cancelled::Queued(queued.route)
            }
            None => Cancelled::None,
        }
    }

    /// Drops the queued jobs of a connection that is gone or closing, and
    /// flags its running ones. Returns how many queued jobs were dropped.
    pub(crate) fn forget(&mut self, conn: ConnectionId) -> usize {
        let before = self.queued.len();
        self.queued.retain(|q| q.route.conn != conn);
        for running in self.running.values_mut() {
            if running.route.conn == conn && running.stopped.is_none() {
                running.stop(Stop::Cancelled);
            }
        }
        self.settle();
        before - self.queued.len()
    }

    /// Queued jobs whose deadline passed by `now` are removed (returned, to
    /// answer); running ones are flagged.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<Route> {
        if !self.deadlines {
            return Vec::new();
        }
        for running in self.running.values_mut() {
            if running.stopped.is_none() && running.deadline.is_some_and(|d| d <= now) {
                running.stop(Stop::DeadlineExceeded);
            }
        }
        let mut expired = Vec::new();
        let mut kept = VecDeque::with_capacity(self.queued.len());
        for queued in self.queued.drain(..) {
            if queued.deadline.is_some_and(|d| d <= now) {
                expired.push(queued.route);
            } else {
                kept.push_back(queued);
            }
        }
        self.queued = kept;
        self.settle();
        expired
    }

    /// The earliest deadline of a job not yet stopped (of `conn`'s jobs only, when given).
    pub(crate) fn next_deadline(&self, conn: Option<ConnectionId>) -> Option<Instant> {
        if !self.deadlines {
            return None;
        }
        let mine = |route: &Route| conn.is_none_or(|c| route.conn == c);
        let queued = self
            .queued
            .iter()
            .filter(|q| mine(&q.route))
            .filter_map(|q| q.deadline);
        let running = self
            .running
            .values()
            .filter(|r| r.stopped.is_none() && mine(&r.route))
            .filter_map(|r| r.deadline);
        queued.chain(running).min()
    }

    /// Where `conn`'s job `job_id` is: 0 running, n >= 1 the n-th in line, -1 neither.
    pub(crate) fn position(&self, conn: ConnectionId, job_id: &str) -> i64 {
        let is = |route: &Route| route.conn == conn && route.job_id == job_id;
        if self
            .running
            .values()
            .any(|r| is(&r.route) && r.stopped.is_none())
        {
            return 0;
        }
        self.queued
            .iter()
            .position(|q| is(&q.route))
            .map_or(-1, |i| i as i64 + 1)
    }

    /// Why the node stopped running job `job`, if it did.
    pub(crate) fn stopped(&self, job: JobId) -> Option<Stop> {
        self.running.get(&job)?.stopped
    }

    /// Jobs workers are running now.
    pub(crate) fn running(&self) -> usize {
        self.running.len()
    }

    /// Jobs waiting now.
    pub(crate) fn depth(&self) -> usize {
        self.queued.len()
    }

    /// Once nothing is queued or running, deadlines are looked for again
    /// only when a job brings one.
    fn settle(&mut self) {
        if self.is_empty() {
            self.deadlines = false;
        }
    }

    /// Admits nothing more (shutdown).
    pub(crate) fn close(&mut self) {
        self.closed = true;
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed
    }

    pub(crate) fn has_queued(&self) -> bool {
        !self.queued.is_empty()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queued.is_empty() && self.running.is_empty()
    }
}
