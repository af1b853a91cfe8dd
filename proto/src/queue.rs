//! The node's one FIFO job queue, the jobs workers are running, and
//! [`QueueRoom`]: the value a connection is handed to decide admissions.

use std::collections::{HashMap, VecDeque};

use crate::error::ProtocolError;
use crate::id::{ConnectionId, JobId};
use crate::job::{Job, JobInput, JobKind};
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
}

/// Queued and running jobs of every connection.
#[derive(Debug)]
pub(crate) struct JobQueue<M> {
    capacity: usize,
    queued: VecDeque<Queued<M>>,
    /// Each running job's route and the queue depth when it was taken.
    running: HashMap<JobId, (Route, usize)>,
    next_id: u64,
    closed: bool,
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

impl<M> JobQueue<M> {
    pub(crate) fn new(capacity: usize) -> Self {
        JobQueue {
            capacity,
            queued: VecDeque::new(),
            running: HashMap::new(),
            next_id: 0,
            closed: false,
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
    pub(crate) fn push(&mut self, route: Route, input: JobInput<M>, sampling: SamplingParams) {
        self.next_id += 1;
        self.queued.push_back(Queued {
            id: JobId(self.next_id),
            route,
            input,
            sampling,
        });
    }

    /// Takes the oldest job for a worker.
    pub(crate) fn take(&mut self) -> Option<Job<M>> {
        let queued = self.queued.pop_front()?;
        let queue_depth = self.queued.len();
        let job_id = queued.route.job_id.clone();
        self.running.insert(queued.id, (queued.route, queue_depth));
        Some(Job {
            id: queued.id,
            job_id,
            input: queued.input,
            queue_depth,
            sampling: queued.sampling,
        })
    }

    /// The route of a running job.
    pub(crate) fn running_route(&self, job: JobId) -> Option<&Route> {
        self.running.get(&job).map(|(route, _)| route)
    }

    /// Ends a running job: who asked, and the depth when it was taken.
    pub(crate) fn finish(&mut self, job: JobId) -> Option<(Route, usize)> {
        self.running.remove(&job)
    }

    /// Drops the queued jobs of a connection that is gone.
    pub(crate) fn forget(&mut self, conn: ConnectionId) {
        self.queued.retain(|q| q.route.conn != conn);
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
