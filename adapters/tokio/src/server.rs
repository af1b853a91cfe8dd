//! A donor node over tokio: a reader and a writer task per connection.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;

use donate_proto::{ConnectionId, Executor, ServerConfig};
use donate_std::host::{ConnState, Host};
use donate_std::READ_BUFFER;

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
    donate_std::warn_if_exposed(local_addr);
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
    let (read_wake, write_wake) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let conn = host.accept({
        let (r, w) = (Arc::clone(&read_wake), Arc::clone(&write_wake));
        Arc::new(move || {
            r.notify_one();
            w.notify_one();
        })
    });
    tracing::info!(%conn, %peer, "connection accepted");
    let write_timeout = host.config().backpressure_timeout;
    let (reader, writer) = stream.into_split();
    let reading = read_loop(reader, &host, conn, &read_wake, &write_wake);
    let writing = write_loop(writer, &host, conn, &write_wake, write_timeout);
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
    reader: OwnedReadHalf,
    host: &Host<E>,
    conn: ConnectionId,
    wake: &Notify,
    wake_writer: &Notify,
) {
    let mut state = host.state(conn);
    while !state.closing {
        let deadline = state.deadline.map(Instant::from_std);
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ready = reader.readable(), if state.wants_read => {
                if ready.is_err() {
                    return;
                }
                let read = READ_BUF.with_borrow_mut(|buf| match reader.try_read(buf) {
                    Ok(0) => Err(()),
                    Ok(n) => Ok(Some(host.handle_input(conn, &buf[..n]))),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                    Err(_) => Err(()),
                });
                match read {
                    Ok(Some(new_state)) => {
                        state = new_state;
                        if state.has_transmit || state.closing {
                            wake_writer.notify_one();
                        }
                    }
                    Ok(None) => {}
                    Err(()) => return,
                }
            }
            _ = wake.notified() => state = host.state(conn),
            _ = sleep => state = host.handle_timeout(conn),
        }
    }
}

/// Writes whatever the node has for `conn` until it closes.
async fn write_loop<E: Executor>(
    mut writer: OwnedWriteHalf,
    host: &Host<E>,
    conn: ConnectionId,
    wake: &Notify,
    write_timeout: Duration,
) {
    let mut out = Vec::new();
    loop {
        let state: ConnState = host.poll_transmit(conn, &mut out);
        if !out.is_empty() {
            match tokio::time::timeout(write_timeout, writer.write_all(&out)).await {
                Ok(Ok(())) => {}
                _ => return,
            }
            out.clear();
            if out.capacity() > READ_BUFFER {
                out = Vec::new();
            }
            continue;
        }
        if state.closing {
            let _ = writer.shutdown().await;
            return;
        }
        wake.notified().await;
    }
}
