//! The async driver: one task per connection (a reader and a writer joined),
//! written once for every runtime that implements [`Runtime`].

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::future;
use tracing::Instrument;

use donate_proto::{ConnectionId, Executor};

use crate::host::{Host, Link, NodeConfig, TryWrite, WriteStep};
use crate::runtime::{Listener, Runtime, Stream, Timer};
use crate::signal::Signal;
use crate::READ_BUFFER;

thread_local! {
    /// One read buffer per runtime thread: an idle connection holds none.
    static READ_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; READ_BUFFER]);
}

/// A running node on an async runtime. Dropping it does not stop it; call
/// [`shutdown`](Server::shutdown).
///
/// `A` is the listener's address type: [`SocketAddr`] for TCP,
/// [`NodeAddr`](crate::NodeAddr) for a Unix socket.
pub struct Server<A = SocketAddr> {
    local_addr: A,
    stop: Arc<Signal>,
    accepting_done: Arc<Signal>,
    tasks: Arc<TaskCount>,
    shutdown_host: Box<dyn FnOnce() + Send>,
}

/// Starts a node on `listener` with `executor`; its tasks run on `runtime`.
/// `config` is a [`ServerConfig`](donate_proto::ServerConfig) or, for
/// secure mode, a [`NodeConfig`].
///
/// This is what each runtime adapter's `serve` calls; use it directly to serve
/// a listener of your own.
pub fn serve<R: Runtime, L: Listener, E: Executor>(
    runtime: R,
    listener: L,
    config: impl Into<NodeConfig>,
    executor: E,
) -> io::Result<Server<L::Addr>> {
    let local_addr = listener.local_addr()?;
    let config = config.into();
    crate::warn_if_exposed(&local_addr, &config);
    let host = Host::start(config, executor);
    let runtime = Arc::new(runtime);
    let (stop, accepting_done) = (Arc::new(Signal::default()), Arc::new(Signal::default()));
    let tasks = Arc::new(TaskCount::default());
    let accept = accept_loop(
        Arc::clone(&runtime),
        listener,
        Arc::clone(&host),
        Arc::clone(&stop),
        Arc::clone(&tasks),
    );
    let done = Arc::clone(&accepting_done);
    runtime.spawn(Box::pin(async move {
        accept.await;
        done.notify();
    }));
    Ok(Server {
        local_addr,
        stop,
        accepting_done,
        tasks,
        shutdown_host: Box::new(move || host.shutdown()),
    })
}

impl<A: Clone> Server<A> {
    /// The address the node listens on.
    pub fn local_addr(&self) -> A {
        self.local_addr.clone()
    }

    /// Graceful shutdown: stops accepting, lets queued and running jobs finish
    /// and delivers their results, closes every connection, then returns with
    /// every task finished.
    pub async fn shutdown(self) {
        self.stop.notify();
        self.accepting_done.wait().await;
        // The host's shutdown blocks until every connection is gone: it runs
        // on a thread of its own, never on the runtime's.
        let host_done = Arc::new(Signal::default());
        let finished = Arc::clone(&host_done);
        let shutdown_host = self.shutdown_host;
        std::thread::spawn(move || {
            shutdown_host();
            finished.notify();
        });
        host_done.wait().await;
        self.tasks.wait_none().await;
    }
}

/// Live connection tasks, and a signal when the last one ends.
#[derive(Default)]
struct TaskCount {
    live: AtomicUsize,
    none_left: Signal,
}

impl TaskCount {
    fn start(&self) {
        self.live.fetch_add(1, Ordering::SeqCst);
    }

    fn end(&self) {
        if self.live.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.none_left.notify();
        }
    }

    async fn wait_none(&self) {
        while self.live.load(Ordering::SeqCst) > 0 {
            self.none_left.wait().await;
        }
    }
}

async fn accept_loop<R: Runtime, L: Listener, E: Executor>(
    runtime: Arc<R>,
    listener: L,
    host: Arc<Host<E>>,
    stop: Arc<Signal>,
    tasks: Arc<TaskCount>,
) {
    loop {
        let stopped = async {
            stop.wait().await;
            None
        };
        let accepted = async { Some(listener.accept().await) };
        match future::or(stopped, accepted).await {
            None => return,
            Some(Ok((stream, peer))) => {
                let (host, tasks_for_conn, rt) =
                    (Arc::clone(&host), Arc::clone(&tasks), Arc::clone(&runtime));
                tasks.start();
                // Every line about this connection carries its peer, its
                // id and (secure mode) the client's key once known.
                let span = tracing::info_span!(
                    "conn",
                    %peer,
                    conn = tracing::field::Empty,
                    peer_key = tracing::field::Empty
                );
                runtime.spawn(Box::pin(
                    async move {
                        let source = crate::addr::peer_ip(&peer);
                        connection(&*rt, stream, peer, source, host).await;
                        tasks_for_conn.end();
                    }
                    .instrument(span),
                ));
            }
            Some(Err(e)) => tracing::debug!("accept failed: {e}"),
        }
    }
}

async fn connection<R: Runtime, S: Stream, E: Executor>(
    runtime: &R,
    stream: S,
    peer: impl std::fmt::Display,
    source: Option<std::net::IpAddr>,
    host: Arc<Host<E>>,
) {
    let stream = Arc::new(stream);
    let (read_wake, write_wake) = (Arc::new(Signal::default()), Arc::new(Signal::default()));
    let conn = host.accept_from(
        Link {
            waker: {
                let (r, w) = (Arc::clone(&read_wake), Arc::clone(&write_wake));
                Arc::new(move || {
                    r.notify();
                    w.notify();
                })
            },
            direct: Arc::new(Direct(Arc::clone(&stream))),
        },
        source,
    );
    tracing::Span::current().record("conn", tracing::field::display(conn));
    tracing::info!(%conn, %peer, "connection accepted");
    let write_timeout = host.config().backpressure_timeout;
    let writing = write_loop(
        runtime,
        &*stream,
        &host,
        conn,
        &write_wake,
        &read_wake,
        write_timeout,
    );
    futures_lite::pin!(writing);
    let reader_ended = future::or(
        async {
            read_loop(runtime, &*stream, &host, conn, &read_wake).await;
            true
        },
        async {
            (&mut writing).await;
            false
        },
    )
    .await;
    if reader_ended {
        // Whatever stopped the reader, the connection is over once flushed.
        host.peer_closed(conn);
        write_wake.notify();
        writing.await;
    }
    stream.shutdown();
    let peer_key = host.peer_key(conn).map(|k| k.fingerprint());
    host.remove(conn);
    tracing::info!(%conn, %peer, peer_key, "connection closed");
}

/// Why the reader woke up.
enum Wake {
    Readable,
    Woken,
    Timeout,
    Failed,
}

/// Reads into the node while it wants input; waits for a wake or the deadline otherwise.
async fn read_loop<R: Runtime, S: Stream, E: Executor>(
    runtime: &R,
    stream: &S,
    host: &Host<E>,
    conn: ConnectionId,
    wake: &Signal,
) {
    let mut state = host.state(conn);
    // One timer, set again only when the deadline moves earlier: firing early
    // is harmless (the node closes nothing before its time), setting it on
    // every input would cost a trip through the reactor.
    let mut timer = runtime.timer();
    let mut armed: Option<Instant> = None;
    while !state.closing {
        if let Some(d) = state.deadline.filter(|d| armed.is_none_or(|a| *d < a)) {
            timer.set(d);
            armed = Some(d);
        }
        let woken = async {
            wake.wait().await;
            Wake::Woken
        };
        let timed_out = async {
            if armed.is_none() {
                future::pending::<()>().await;
            }
            poll_fn(|cx| timer.poll_fired(cx)).await;
            Wake::Timeout
        };
        let readable = async {
            if !state.wants_read {
                return future::pending().await;
            }
            match stream.readable().await {
                Ok(()) => Wake::Readable,
                Err(_) => Wake::Failed,
            }
        };
        state = match future::or(readable, future::or(woken, timed_out)).await {
            Wake::Failed => return,
            Wake::Timeout => {
                armed = None;
                host.handle_timeout(conn)
            }
            Wake::Woken => host.state(conn),
            Wake::Readable => {
                let read = READ_BUF.with_borrow_mut(|buf| match stream.try_read(buf) {
                    Ok(0) => Err(()),
                    Ok(n) => Ok(Some(host.handle_input(conn, &buf[..n]))),
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                        ) =>
                    {
                        Ok(None)
                    }
                    Err(_) => Err(()),
                });
                match read {
                    Ok(Some(new_state)) => new_state,
                    Ok(None) => host.state(conn),
                    Err(()) => return,
                }
            }
        };
    }
}

/// Writes what the node has for `conn` when a non-blocking write could not
/// (the socket was full), until the connection closes.
async fn write_loop<R: Runtime, S: Stream, E: Executor>(
    runtime: &R,
    stream: &S,
    host: &Host<E>,
    conn: ConnectionId,
    wake: &Signal,
    wake_reader: &Signal,
    write_timeout: Duration,
) {
    let mut out = Vec::new();
    loop {
        match host.next_write(conn, &mut out) {
            WriteStep::Done => return,
            WriteStep::Wait => wake.wait().await,
            WriteStep::Write => {
                let mut timer = runtime.timer();
                timer.set(Instant::now() + write_timeout);
                let written = future::or(async { write_all(stream, &out).await.is_ok() }, async {
                    poll_fn(|cx| timer.poll_fired(cx)).await;
                    false
                })
                .await;
                out.clear();
                host.release_write(conn);
                if !written {
                    return;
                }
                wake_reader.notify(); // it may be waiting for room
            }
        }
    }
}

/// Writes all of `buf`, waiting for room whenever the socket is full.
async fn write_all<S: Stream>(stream: &S, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match stream.try_write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => stream.writable().await?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Non-blocking writes from any thread: how workers deliver answers.
struct Direct<S>(Arc<S>);

impl<S: Stream> TryWrite for Direct<S> {
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }
}
