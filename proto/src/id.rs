//! The ids a node hands out: for connections and for the jobs workers take.

use std::fmt;

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

/// Identifies a job taken by a worker, for [`Node::complete`](crate::Node::complete).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub(crate) u64);

impl JobId {
    /// The raw number, unique for the node's lifetime.
    pub fn as_u64(self) -> u64 {
        self.0
    }
}
