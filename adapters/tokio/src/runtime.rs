//! donate-host's runtime traits over tokio: its spawner, timer, listeners and sockets.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use std::future::Future;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::time::Sleep;
use tokio_util::compat::TokioAsyncReadCompatExt;

use donate_host::pool::Connect;
use donate_host::runtime::{Listener, Runtime, Stream, Task, Timer};

/// A tokio runtime, by its handle.
pub(crate) struct Tokio(pub(crate) Handle);

impl Runtime for Tokio {
    type Timer = TokioTimer;

    fn spawn(&self, task: Task) {
        self.0.spawn(task);
    }

    fn timer(&self) -> TokioTimer {
        // Unset: far away, and the driver does not poll it until it sets it.
        let far = tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600);
        TokioTimer(Box::pin(tokio::time::sleep_until(far)))
    }
}

impl Connect for Tokio {
    async fn connect(&self, addr: &donate_host::NodeAddr) -> io::Result<donate_host::BoxStream> {
        dial(addr).await
    }
}

/// tokio's `Sleep`, pinned once for the connection's life.
pub struct TokioTimer(Pin<Box<Sleep>>);

impl Timer for TokioTimer {
    fn set(&mut self, at: Instant) {
        self.0.as_mut().reset(tokio::time::Instant::from_std(at));
    }

    fn poll_fired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.0.as_mut().poll(cx)
    }
}

/// A tokio listener as the driver sees it.
pub struct Acceptor<T>(pub(crate) T);

/// A tokio socket as the driver sees it.
pub struct Conn<T>(T);

impl Listener for Acceptor<TcpListener> {
    type Stream = Conn<TcpStream>;
    type Addr = SocketAddr;

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }

    async fn accept(&self) -> io::Result<(Conn<TcpStream>, SocketAddr)> {
        let (stream, peer) = self.0.accept().await?;
        stream.set_nodelay(true)?;
        Ok((Conn(stream), peer))
    }
}

#[cfg(unix)]
impl Listener for Acceptor<tokio::net::UnixListener> {
    type Stream = Conn<tokio::net::UnixStream>;
    type Addr = donate_host::NodeAddr;

    fn local_addr(&self) -> io::Result<Self::Addr> {
        let addr = self.0.local_addr()?;
        Ok(donate_host::NodeAddr::Unix(
            addr.as_pathname().map(Into::into).unwrap_or_default(),
        ))
    }

    async fn accept(&self) -> io::Result<(Self::Stream, Self::Addr)> {
        let (stream, peer) = self.0.accept().await?;
        let path = peer.as_pathname().map(Into::into).unwrap_or_default();
        Ok((Conn(stream), donate_host::NodeAddr::Unix(path)))
    }
}

/// The same [`Stream`] for TCP and Unix sockets: tokio gives both the same methods.
macro_rules! stream {
    ($t:ty) => {
        impl Stream for Conn<$t> {
            fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
                self.0.try_read(buf)
            }

            fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
                self.0.try_write(buf)
            }

            async fn readable(&self) -> io::Result<()> {
                self.0.readable().await
            }

            async fn writable(&self) -> io::Result<()> {
                self.0.writable().await
            }
        }
    };
}

stream!(TcpStream);
#[cfg(unix)]
stream!(tokio::net::UnixStream);

/// Opens a client's stream to `addr`, seen through `futures-io` by tokio-util's compat layer.
pub(crate) async fn dial(addr: &donate_host::NodeAddr) -> io::Result<donate_host::BoxStream> {
    match addr {
        donate_host::NodeAddr::Tcp(name) => {
            let stream = TcpStream::connect(name.as_str()).await?;
            stream.set_nodelay(true)?;
            Ok(Box::new(stream.compat()))
        }
        #[cfg(unix)]
        donate_host::NodeAddr::Unix(path) => Ok(Box::new(
            tokio::net::UnixStream::connect(path).await?.compat(),
        )),
        #[cfg(not(unix))]
        donate_host::NodeAddr::Unix(_) => Err(io::ErrorKind::Unsupported.into()),
    }
}
