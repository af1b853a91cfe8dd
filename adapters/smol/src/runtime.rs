//! donate-host's runtime traits over async-io: its timer, listeners and sockets.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::task::{Context, Poll};
use std::time::Instant;

use async_io::Async;
use futures_lite::FutureExt;

use donate_host::pool::Connect;
use donate_host::runtime::{Listener, Runtime, Stream, Task, Timer};

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

/// The caller's executor with async-io's reactor for timers.
pub(crate) struct Smol<S>(pub(crate) S);

impl<S: Spawn> Runtime for Smol<S> {
    type Timer = SmolTimer;

    fn spawn(&self, task: Task) {
        self.0.spawn(task);
    }

    fn timer(&self) -> SmolTimer {
        SmolTimer(async_io::Timer::never())
    }
}

impl<S: Spawn> Connect for Smol<S> {
    async fn connect(&self, addr: &donate_host::NodeAddr) -> io::Result<donate_host::BoxStream> {
        dial(addr).await
    }
}

/// async-io's timer.
pub struct SmolTimer(async_io::Timer);

impl Timer for SmolTimer {
    fn set(&mut self, at: Instant) {
        self.0.set_at(at);
    }

    fn poll_fired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.0.poll(cx).map(|_| ())
    }
}

/// An async-io listener as the driver sees it.
pub struct Acceptor<T>(pub(crate) Async<T>);

/// An async-io socket as the driver sees it.
pub struct Conn<T>(Async<T>);

impl Listener for Acceptor<TcpListener> {
    type Stream = Conn<TcpStream>;
    type Addr = SocketAddr;

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.get_ref().local_addr()
    }

    async fn accept(&self) -> io::Result<(Conn<TcpStream>, SocketAddr)> {
        let (stream, peer) = self.0.accept().await?;
        stream.get_ref().set_nodelay(true)?;
        Ok((Conn(stream), peer))
    }
}

#[cfg(unix)]
impl Listener for Acceptor<std::os::unix::net::UnixListener> {
    type Stream = Conn<std::os::unix::net::UnixStream>;
    type Addr = donate_host::NodeAddr;

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(donate_host::unix_addr(&self.0.get_ref().local_addr()?))
    }

    async fn accept(&self) -> io::Result<(Self::Stream, Self::Addr)> {
        let (stream, peer) = self.0.accept().await?;
        Ok((Conn(stream), donate_host::unix_addr(&peer)))
    }
}

/// The same [`Stream`] for TCP and Unix sockets: their std types share the methods.
macro_rules! stream {
    ($t:ty) => {
        impl Stream for Conn<$t> {
            fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
                self.0.get_ref().read(buf)
            }

            fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
                self.0.get_ref().write(buf)
            }

            async fn readable(&self) -> io::Result<()> {
                self.0.readable().await
            }

            async fn writable(&self) -> io::Result<()> {
                self.0.writable().await
            }

            fn shutdown(&self) {
                let _ = self.0.get_ref().shutdown(Shutdown::Both);
            }
        }
    };
}

stream!(TcpStream);
#[cfg(unix)]
stream!(std::os::unix::net::UnixStream);

/// Opens a client's stream to `addr` (a TCP name is resolved by the system, blocking).
pub(crate) async fn dial(addr: &donate_host::NodeAddr) -> io::Result<donate_host::BoxStream> {
    match addr {
        donate_host::NodeAddr::Tcp(name) => {
            let mut last = io::Error::new(io::ErrorKind::InvalidInput, "resolved to nothing");
            for addr in std::net::ToSocketAddrs::to_socket_addrs(name.as_str())? {
                match Async::<TcpStream>::connect(addr).await {
                    Ok(stream) => {
                        stream.get_ref().set_nodelay(true)?;
                        return Ok(Box::new(stream));
                    }
                    Err(e) => last = e,
                }
            }
            Err(last)
        }
        #[cfg(unix)]
        donate_host::NodeAddr::Unix(path) => Ok(Box::new(
            Async::<std::os::unix::net::UnixStream>::connect(path).await?,
        )),
        #[cfg(not(unix))]
        donate_host::NodeAddr::Unix(_) => Err(io::ErrorKind::Unsupported.into()),
    }
}
