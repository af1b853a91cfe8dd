//! A donor node over `std::net` (or Unix sockets): one reader and one writer
//! thread per connection.

use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use donate_proto::{ConnectionId, Executor};

use donate_host::host::{Host, Link, TryWrite, WriteStep};
use donate_host::NodeConfig;
use donate_host::READ_BUFFER;

/// A blocking listener a node can serve: [`TcpListener`] or, on Unix,
/// [`UnixListener`](std::os::unix::net::UnixListener).
pub trait Listen: Send + 'static {
    /// The accepted connections.
    #[doc(hidden)]
    type Socket: Socket;
    /// The listener's address: [`SocketAddr`] or a `unix:` [`NodeAddr`](donate_host::NodeAddr).
    type Addr: Clone + fmt::Display + Send + Sync + 'static;
    /// The address it is bound to.
    fn local_addr(&self) -> io::Result<Self::Addr>;
    #[doc(hidden)]
    fn accept(&self) -> io::Result<(Self::Socket, Self::Addr)>;
    /// Unblocks a thread blocked in `accept` on `addr` (by connecting to it).
    #[doc(hidden)]
    fn wake(addr: &Self::Addr);
}

/// What the connection threads need of a socket.
#[doc(hidden)]
pub trait Socket: Read + Write + Send + Sync + Sized + 'static {
    fn try_clone(&self) -> io::Result<Self>;
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    fn shutdown(&self, how: Shutdown) -> io::Result<()>;
    /// Writes what fits now, without blocking, from any thread.
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;
}

impl Listen for TcpListener {
    type Socket = TcpStream;
    type Addr = SocketAddr;

    fn local_addr(&self) -> io::Result<SocketAddr> {
        TcpListener::local_addr(self)
    }

    fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let (stream, peer) = TcpListener::accept(self)?;
        stream.set_nodelay(true)?;
        Ok((stream, peer))
    }

    fn wake(addr: &SocketAddr) {
        let _ = TcpStream::connect_timeout(&crate::loopback_of(*addr), Duration::from_secs(1));
    }
}

#[cfg(unix)]
impl Listen for std::os::unix::net::UnixListener {
    type Socket = std::os::unix::net::UnixStream;
    type Addr = donate_host::NodeAddr;

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(donate_host::unix_addr(
            &std::os::unix::net::UnixListener::local_addr(self)?,
        ))
    }

    fn accept(&self) -> io::Result<(Self::Socket, Self::Addr)> {
        let (stream, peer) = std::os::unix::net::UnixListener::accept(self)?;
        Ok((stream, donate_host::unix_addr(&peer)))
    }

    fn wake(addr: &Self::Addr) {
        if let donate_host::NodeAddr::Unix(path) = addr {
            let _ = std::os::unix::net::UnixStream::connect(path);
        }
    }
}

/// The same [`Socket`] for TCP and Unix streams: std gives both the same methods.
macro_rules! socket {
    ($t:ty) => {
        impl Socket for $t {
            fn try_clone(&self) -> io::Result<Self> {
                <$t>::try_clone(self)
            }

            fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
                <$t>::set_read_timeout(self, timeout)
            }

            fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
                <$t>::set_write_timeout(self, timeout)
            }

            fn shutdown(&self, how: Shutdown) -> io::Result<()> {
                <$t>::shutdown(self, how)
            }

            #[cfg(unix)]
            fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
                socket2::SockRef::from(self)
                    .send_with_flags(buf, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
            }

            #[cfg(not(unix))]
            fn try_write(&self, _buf: &[u8]) -> io::Result<usize> {
                // No per-call non-blocking send here: the writer thread writes everything.
                Err(io::ErrorKind::WouldBlock.into())
            }
        }
    };
}

socket!(TcpStream);
#[cfg(unix)]
socket!(std::os::unix::net::UnixStream);

/// A running node. Dropping it does not stop it; call [`shutdown`](Server::shutdown).
///
/// `A` is the listener's address type: [`SocketAddr`] for TCP, a `unix:`
/// [`NodeAddr`](donate_host::NodeAddr) for a Unix socket.
pub struct Server<A = SocketAddr> {
    local_addr: A,
    stopping: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    wake: fn(&A),
    stop: Box<dyn FnOnce() + Send>,
}

/// Starts a node on `listener` (a [`TcpListener`] or a Unix listener) with
/// `executor`, and returns at once. `config` is a
/// [`ServerConfig`](crate::ServerConfig) or, for secure mode, a [`NodeConfig`].
pub fn serve<L: Listen, E: Executor>(
    listener: L,
    config: impl Into<NodeConfig>,
    executor: E,
) -> io::Result<Server<L::Addr>> {
    let local_addr = listener.local_addr()?;
    let config = config.into();
    donate_host::warn_if_exposed(&local_addr, &config);
    let host = Host::start(config, executor);
    let stopping = Arc::new(AtomicBool::new(false));
    let threads: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
    let acceptor = {
        let (host, stopping, threads) = (
            Arc::clone(&host),
            Arc::clone(&stopping),
            Arc::clone(&threads),
        );
        std::thread::Builder::new()
            .name("donate-accept".into())
            .spawn(move || accept_loop(listener, host, stopping, threads))?
    };
    let stop = Box::new(move || {
        host.shutdown();
        for handle in std::mem::take(&mut *threads.lock().expect("threads lock")) {
            let _ = handle.join();
        }
    });
    Ok(Server {
        local_addr,
        stopping,
        acceptor: Some(acceptor),
        wake: L::wake,
        stop,
    })
}

impl<A: Clone> Server<A> {
    /// The address the node listens on.
    pub fn local_addr(&self) -> A {
        self.local_addr.clone()
    }

    /// Graceful shutdown: stops accepting, lets queued and running jobs finish
    /// and delivers their results, closes every connection, then returns with
    /// every thread joined.
    pub fn shutdown(mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wake the blocking accept with a connection of our own.
        (self.wake)(&self.local_addr);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        (self.stop)();
    }
}

fn accept_loop<L: Listen, E: Executor>(
    listener: L,
    host: Arc<Host<E>>,
    stopping: Arc<AtomicBool>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    loop {
        let accepted = listener.accept();
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok((stream, peer)) = accepted else {
            continue;
        };
        let mut threads = threads.lock().expect("threads lock");
        threads.retain(|t| !t.is_finished());
        let source = donate_host::peer_ip(&peer);
        match spawn_connection(stream, peer, source, Arc::clone(&host)) {
            Ok(pair) => threads.extend(pair),
            Err(e) => tracing::warn!("cannot start connection threads: {e}"),
        }
    }
}

/// Wakes a connection's threads: a counter bumped under a lock, with a condvar.
#[derive(Default)]
struct Signal {
    generation: Mutex<u64>,
    changed: Condvar,
}

impl Signal {
    fn notify(&self) {
        *self.generation.lock().expect("signal lock") += 1;
        self.changed.notify_all();
    }

    fn generation(&self) -> u64 {
        *self.generation.lock().expect("signal lock")
    }

    /// Waits for a notification after `seen`, at most until `deadline`.
    fn wait(&self, seen: u64, deadline: Option<Instant>) {
        let mut generation = self.generation.lock().expect("signal lock");
        while *generation == seen {
            let now = Instant::now();
            generation = match deadline {
                Some(d) if d <= now => return,
                Some(d) => {
                    self.changed
                        .wait_timeout(generation, d - now)
                        .expect("signal lock")
                        .0
                }
                None => self.changed.wait(generation).expect("signal lock"),
            };
        }
    }
}

fn spawn_connection<S: Socket, E: Executor>(
    stream: S,
    peer: impl fmt::Display + Send + 'static,
    source: Option<std::net::IpAddr>,
    host: Arc<Host<E>>,
) -> io::Result<[JoinHandle<()>; 2]> {
    // A peer that stops reading is closed by the node's backpressure timeout; a
    // write blocked that long gives up too.
    stream.set_write_timeout(Some(
        host.config()
            .backpressure_timeout
            .max(Duration::from_millis(1)),
    ))?;
    let signal = Arc::new(Signal::default());
    let link = Link {
        waker: {
            let signal = Arc::clone(&signal);
            Arc::new(move || signal.notify())
        },
        direct: Arc::new(Direct(stream.try_clone()?)),
    };
    let conn = host.accept_from(link, source);
    tracing::info!(%conn, %peer, "connection accepted");
    // Every line about this connection carries its id, its peer and (secure
    // mode) the client's key once known, on both of its threads.
    let span = tracing::info_span!("conn", %conn, %peer, peer_key = tracing::field::Empty);
    let reader = {
        let (host, signal, stream) = (Arc::clone(&host), Arc::clone(&signal), stream.try_clone()?);
        let span = span.clone();
        std::thread::Builder::new()
            .name(format!("donate-read-{}", conn.as_u64()))
            .spawn(move || {
                let _in_span = span.enter();
                read_loop(stream, &host, conn, &signal);
                // Whatever stopped the reader, the connection is over once flushed.
                host.peer_closed(conn);
                signal.notify();
            })?
    };
    let writer = std::thread::Builder::new()
        .name(format!("donate-write-{}", conn.as_u64()))
        .spawn(move || {
            let _in_span = span.enter();
            let mut stream = stream;
            write_loop(&mut stream, &host, conn, &signal);
            let _ = stream.shutdown(Shutdown::Both);
            let peer_key = host.peer_key(conn).map(|k| k.fingerprint());
            host.remove(conn);
            tracing::info!(%conn, %peer, peer_key, "connection closed");
        })?;
    Ok([reader, writer])
}

/// Reads into the node while it wants input; sleeps on the signal while it does not.
fn read_loop<S: Socket, E: Executor>(
    mut stream: S,
    host: &Host<E>,
    conn: ConnectionId,
    signal: &Signal,
) {
    let mut buf = vec![0; READ_BUFFER];
    let mut state = host.state(conn);
    loop {
        if state.closing {
            return;
        }
        if !state.wants_read {
            let seen = signal.generation();
            state = host.state(conn);
            if !state.wants_read && !state.closing {
                signal.wait(seen, state.deadline);
                state = host.handle_timeout(conn);
            }
            continue;
        }
        let timeout = state.deadline.map(|d| {
            d.saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        });
        if stream.set_read_timeout(timeout).is_err() {
            return;
        }
        state = match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => host.handle_input(conn, &buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                host.handle_timeout(conn)
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
    }
}

/// Writes what the node has for `conn` when a non-blocking write could not
/// (the socket was full), until the connection closes.
fn write_loop<S: Socket, E: Executor>(
    stream: &mut S,
    host: &Host<E>,
    conn: ConnectionId,
    signal: &Signal,
) {
    let mut out = Vec::new();
    loop {
        let seen = signal.generation();
        match host.next_write(conn, &mut out) {
            WriteStep::Done => return,
            WriteStep::Wait => signal.wait(seen, None),
            WriteStep::Write => {
                let written = stream.write_all(&out).is_ok();
                out.clear();
                host.release_write(conn);
                if !written {
                    return;
                }
                signal.notify(); // the reader may be waiting for room
            }
        }
    }
}

/// Non-blocking writes on the blocking socket the threads share.
struct Direct<S>(S);

impl<S: Socket> TryWrite for Direct<S> {
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }
}
