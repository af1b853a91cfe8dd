//! A donor node over tokio: a reader and a writer task per connection.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;

use donate_host::host::{Host, Link, TryWrite, WriteStep};
use donate_host::READ_BUFFER;
use donate_proto::{ConnectionId, Executor, ServerConfig};

thread_local! {
    /// One read buffer per runtime thread: an idle connection holds none.
    static READ_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; READ_BUFFER]);
}

/// A running node. Dropping it does not stop it; call [`shutdown`](Server::shutdown).
pub struct Server {
    local_addr: SocketAddr,
    stop: Arc<Notify>,
    acceptor: tokio::task::JoinHandle<JoinSet<()>>,
    shutdown_host: Box<dyn FnOnce() + Send>,
}

/// Starts a node on `listener` with `executor`. Call from within a tokio runtime.
pub fn serve<E: Executor>(
    listener: TcpListener,
    config: ServerConfig,
    executor: E,
) -> io::Result<Server> {
    let local_addr = listener.local_addr()?;
    donate_host::warn_if_exposed(local_addr);
    let host = Host::start(config, executor);
    let stop = Arc::new(Notify::new());
    let acceptor = tokio::spawn(accept_loop(listener, Arc::clone(&host), Arc::clone(&stop)));
    Ok(Server {
        local_addr,
        stop,
        acceptor,
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
        self.stop.notify_one();
        let tasks = self.acceptor.await;
        let _ = tokio::task::spawn_blocking(self.shutdown_host).await;
        if let Ok(mut tasks) = tasks {
            while tasks.join_next().await.is_some() {}
        }
    }
}

async fn accept_loop<E: Executor>(
    listener: TcpListener,
    host: Arc<Host<E>>,
    stop: Arc<Notify>,
) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.notified() => return tasks,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tasks.spawn(connection(stream, peer, Arc::clone(&host)));
                }
                Err(e) => tracing::debug!("accept failed: {e}"),
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
}

async fn connection<E: Executor>(stream: TcpStream, peer: SocketAddr, host: Arc<Host<E>>) {
    let _ = stream.set_nodelay(true);
    let stream = Arc::new(stream);
    let (read_wake, write_wake) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let conn = host.accept(Link {
        waker: {
            let (r, w) = (Arc::clone(&read_wake), Arc::clone(&write_wake));
            Arc::new(move || {
                r.notify_one();
                w.notify_one();
            })
        },
        direct: Arc::new(Direct(Arc::clone(&stream))),
    });
    tracing::info!(%conn, %peer, "connection accepted");
    let write_timeout = host.config().backpressure_timeout;
    let reading = read_loop(&stream, &host, conn, &read_wake);
    let writing = write_loop(&stream, &host, conn, &write_wake, &read_wake, write_timeout);
    tokio::pin!(writing);
    tokio::select! {
        _ = reading => {
            // Whatever stopped the reader, the connection is over once flushed.
            host.peer_closed(conn);
            write_wake.notify_one();
            (&mut writing).await;
        }
        _ = &mut writing => {}
    }
    host.remove(conn);
    tracing::info!(%conn, %peer, "connection closed");
}

/// Reads into the node while it wants input; waits for a wake or the deadline otherwise.
async fn read_loop<E: Executor>(
    stream: &TcpStream,
    host: &Host<E>,
    conn: ConnectionId,
    wake: &Notify,
) {
    let mut state = host.state(conn);
    // One timer, re-armed only when the deadline moves earlier: firing early is
    // harmless (the node closes nothing before its time).
    let sleep = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(sleep);
    let mut armed: Option<std::time::Instant> = None;
    while !state.closing {
        if let Some(d) = state.deadline.filter(|d| armed.is_none_or(|a| *d < a)) {
            sleep.as_mut().reset(Instant::from_std(d));
            armed = Some(d);
        }
        tokio::select! {
            ready = stream.readable(), if state.wants_read => {
                if ready.is_err() {
                    return;
                }
                let read = READ_BUF.with_borrow_mut(|buf| match stream.try_read(buf) {
                    Ok(0) => Err(()),
                    Ok(n) => Ok(Some(host.handle_input(conn, &buf[..n]))),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                    Err(_) => Err(()),
                });
                match read {
                    Ok(Some(new_state)) => state = new_state,
                    Ok(None) => {}
                    Err(()) => return,
                }
            }
            _ = wake.notified() => state = host.state(conn),
            _ = &mut sleep, if armed.is_some() => {
                armed = None;
                state = host.handle_timeout(conn);
            }
        }
    }
}

/// Writes what the node has for `conn` when a non-blocking write could not
/// (the socket was full), until the connection closes.
async fn write_loop<E: Executor>(
    stream: &TcpStream,
    host: &Host<E>,
    conn: ConnectionId,
    wake: &Notify,
    wake_reader: &Notify,
    write_timeout: Duration,
) {
    let mut out = Vec::new();
    loop {
        match host.next_write(conn, &mut out) {
            WriteStep::Done => return,
            WriteStep::Wait => wake.notified().await,
            WriteStep::Write => {
                let written = tokio::time::timeout(write_timeout, write_all(stream, &out)).await;
                out.clear();
                host.release_write(conn);
                if !matches!(written, Ok(Ok(()))) {
                    return;
                }
                wake_reader.notify_one(); // it may be waiting for room
            }
        }
    }
}

async fn write_all(stream: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        stream.writable().await?;
        match stream.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Non-blocking writes from any thread.
struct Direct(Arc<TcpStream>);

impl TryWrite for Direct {
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }
}
