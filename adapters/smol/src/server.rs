//! A donor node over async-io: one task per connection, spawned on the caller's executor.

use std::cell::RefCell;
use std::future::Future;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_io::{Async, Timer};
use futures_lite::{future, AsyncWriteExt};

use donate_host::host::{Host, Link, TryWrite, WriteStep};
use donate_host::READ_BUFFER;
use donate_proto::{ConnectionId, Executor, ServerConfig};

use crate::signal::Signal;

thread_local! {
    /// One read buffer per executor thread: an idle connection holds none.
    static READ_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; READ_BUFFER]);
}

/// A task for the caller's executor.
pub type Task = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Runs tasks on an executor: `|task| { smol::spawn(task).detach(); }`,
/// `|task| { async_std::task::spawn(task); }`, `|task| { tokio::spawn(task); }`.
pub trait Spawn: Send + Sync + 'static {
    /// Starts `task` in the background.
    fn spawn(&self, task: Task);
}

impl<F: Fn(Task) + Send + Sync + 'static> Spawn for F {
    fn spawn(&self, task: Task) {
        self(task)
    }
}

/// A running node. Dropping it does not stop it; call [`shutdown`](Server::shutdown).
pub struct Server {
    local_addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    tasks: Arc<TaskCount>,
    shutdown_host: Box<dyn FnOnce() + Send>,
}

/// Live tasks, and a signal when the last one ends.
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

/// Starts a node on `listener` with `executor`; its tasks run on `spawner`.
pub fn serve<E: Executor>(
    listener: Async<TcpListener>,
    config: ServerConfig,
    executor: E,
    spawner: impl Spawn,
) -> io::Result<Server> {
    let local_addr = listener.get_ref().local_addr()?;
    donate_host::warn_if_exposed(local_addr);
    let host = Host::start(config, executor);
    let stopping = Arc::new(AtomicBool::new(false));
    let tasks = Arc::new(TaskCount::default());
    let spawner = Arc::new(spawner);
    tasks.start();
    spawner.spawn(Box::pin(accept_loop(
        listener,
        Arc::clone(&host),
        Arc::clone(&stopping),
        Arc::clone(&tasks),
        Arc::clone(&spawner),
    )));
    Ok(Server {
        local_addr,
        stopping,
        tasks,
        shutdown_host: Box::new(move || host.shutdown()),
    })
}

impl Server {
    /// The address the node listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Graceful shutdown: stops accepting, lets queued and running jobs finish
    /// and delivers their results, closes every connection, then returns with
    /// every task finished.
    pub async fn shutdown(self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wake the accept loop with a connection of our own.
        let _ = Async::<TcpStream>::connect(loopback_of(self.local_addr)).await;
        // The host's shutdown blocks until every connection is gone: run it off the executor.
        let done = Arc::new(Signal::default());
        let finished = Arc::clone(&done);
        let shutdown_host = self.shutdown_host;
        std::thread::spawn(move || {
            shutdown_host();
            finished.notify();
        });
        done.wait().await;
        self.tasks.wait_none().await;
    }
}

async fn accept_loop<E: Executor, S: Spawn>(
    listener: Async<TcpListener>,
    host: Arc<Host<E>>,
    stopping: Arc<AtomicBool>,
    tasks: Arc<TaskCount>,
    spawner: Arc<S>,
) {
    while !stopping.load(Ordering::SeqCst) {
        match listener.accept().await {
            Ok(_) if stopping.load(Ordering::SeqCst) => break,
            Ok((stream, peer)) => {
                let (host, tasks_for_conn) = (Arc::clone(&host), Arc::clone(&tasks));
                tasks.start();
                spawner.spawn(Box::pin(async move {
                    connection(stream, peer, host).await;
                    tasks_for_conn.end();
                }));
            }
            Err(e) => tracing::debug!("accept failed: {e}"),
        }
    }
    tasks.end();
}

async fn connection<E: Executor>(stream: Async<TcpStream>, peer: SocketAddr, host: Arc<Host<E>>) {
    let _ = stream.get_ref().set_nodelay(true);
    let stream = Arc::new(stream);
    let (read_wake, write_wake) = (Arc::new(Signal::default()), Arc::new(Signal::default()));
    let conn = host.accept(Link {
        waker: {
            let (r, w) = (Arc::clone(&read_wake), Arc::clone(&write_wake));
            Arc::new(move || {
                r.notify();
                w.notify();
            })
        },
        direct: Arc::new(Direct(Arc::clone(&stream))),
    });
    tracing::info!(%conn, %peer, "connection accepted");
    let write_timeout = host.config().backpressure_timeout;
    let writing = write_loop(&stream, &host, conn, &write_wake, &read_wake, write_timeout);
    futures_lite::pin!(writing);
    let reader_ended = future::or(
        async {
            read_loop(&stream, &host, conn, &read_wake).await;
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
    let _ = stream.get_ref().shutdown(std::net::Shutdown::Both);
    host.remove(conn);
    tracing::info!(%conn, %peer, "connection closed");
}

/// Reads into the node while it wants input; waits for a wake or the deadline otherwise.
async fn read_loop<E: Executor>(
    stream: &Async<TcpStream>,
    host: &Host<E>,
    conn: ConnectionId,
    wake: &Signal,
) {
    let mut state = host.state(conn);
    // One timer, re-armed only when the deadline moves earlier: firing early is
    // harmless (the node closes nothing before its time), re-arming on every
    // input would cost a trip through the reactor.
    let mut timer = Timer::never();
    let mut armed: Option<Instant> = None;
    while !state.closing {
        if let Some(d) = state.deadline.filter(|d| armed.is_none_or(|a| *d < a)) {
            timer.set_at(d);
            armed = Some(d);
        }
        let woken = async {
            wake.wait().await;
            Wake::Woken
        };
        let timed_out = async {
            (&mut timer).await;
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
                let read = READ_BUF.with_borrow_mut(|buf| match stream.get_ref().read(buf) {
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

/// Why the reader woke up.
enum Wake {
    Readable,
    Woken,
    Timeout,
    Failed,
}

/// Writes what the node has for `conn` when a non-blocking write could not
/// (the socket was full), until the connection closes.
async fn write_loop<E: Executor>(
    stream: &Async<TcpStream>,
    host: &Host<E>,
    conn: ConnectionId,
    wake: &Signal,
    wake_reader: &Signal,
    write_timeout: Duration,
) {
    let mut out = Vec::new();
    let mut writer = stream;
    loop {
        match host.next_write(conn, &mut out) {
            WriteStep::Done => return,
            WriteStep::Wait => wake.wait().await,
            WriteStep::Write => {
                let written = future::or(async { writer.write_all(&out).await.is_ok() }, async {
                    Timer::after(write_timeout).await;
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

/// Non-blocking writes from any thread (async-io keeps the socket non-blocking).
struct Direct(Arc<Async<TcpStream>>);

impl TryWrite for Direct {
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        self.0.get_ref().write(buf)
    }
}

fn loopback_of(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    }
}
