//! What the one async driver needs from a runtime: spawn a task, set a timer,
//! accept streams, and read and write a stream without blocking.
//!
//! The shape follows quinn's `Runtime` trait: the driver ([`serve`](crate::serve))
//! is written once against these traits, and each runtime adapter (donate-smol,
//! donate-tokio) only implements them for its own types.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

/// A task for a runtime to run in the background.
pub type Task = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Spawns tasks and makes timers.
pub trait Runtime: Send + Sync + 'static {
    /// The runtime's re-armable timer.
    type Timer: Timer;

    /// Runs `task` in the background until it ends.
    fn spawn(&self, task: Task);

    /// A timer that does not fire until it is [set](Timer::set). Called from
    /// the runtime's own tasks.
    fn timer(&self) -> Self::Timer;
}

/// A timer that can be set again, so a connection keeps one for its life
/// instead of registering a new one with the reactor at every step.
pub trait Timer: Send + Unpin + 'static {
    /// Fires at `at` (and not at any earlier time it was set to).
    fn set(&mut self, at: Instant);

    /// Ready once the time it was last set to has passed.
    fn poll_fired(&mut self, cx: &mut Context<'_>) -> Poll<()>;
}

/// Accepts connections: a TCP or Unix listener, or any transport of yours.
pub trait Listener: Send + Sync + 'static {
    /// An accepted connection.
    type Stream: Stream;
    /// The listener's address and its peers'; the node's
    /// [`Server::local_addr`](crate::Server::local_addr) has this type.
    type Addr: Clone + fmt::Display + Send + Sync + 'static;

    /// The address the listener is bound to.
    fn local_addr(&self) -> io::Result<Self::Addr>;

    /// The next connection and its peer's address. Dropping the future must not
    /// lose a connection (both tokio's and async-io's `accept` are cancel-safe).
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, Self::Addr)>> + Send;
}

/// A connected byte stream that any thread may read or write without blocking.
///
/// Worker threads write answers straight into the socket with
/// [`try_write`](Stream::try_write) as soon as a job is done: that no answer
/// waits for a task to be scheduled is what keeps round trips short. Only when
/// the socket is full does the connection's writer task wait for
/// [`writable`](Stream::writable).
pub trait Stream: Send + Sync + 'static {
    /// Reads what has arrived; `WouldBlock` when nothing has, `Ok(0)` at the end.
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;

    /// Writes what fits now; `WouldBlock` when nothing does.
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;

    /// Ready when a read may find bytes (or the end, or an error).
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;

    /// Ready when a write may find room.
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send;

    /// Shuts both directions down, so the peer sees the end even while another
    /// thread still holds the stream.
    fn shutdown(&self) {}
}
