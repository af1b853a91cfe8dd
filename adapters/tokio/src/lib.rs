//! # donate-tokio
//!
//! A donate-compute donor node and client over tokio. All protocol decisions
//! are made by [`donate_proto`]; the connection loop is donate-host's, written
//! once for every runtime: this crate only lends it tokio's spawner, timer and
//! sockets (jobs run on the node's worker threads, off the runtime).
//!
//! Nodes listen on a `TcpListener` or a `UnixListener`; clients connect to
//! `host:port` or `unix:/path`.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use donate_tokio::{ServerConfig, Stub};
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let server = donate_tokio::serve(listener, ServerConfig::default(), Stub::default())?;
//! let mut client = donate_tokio::Client::connect(server.local_addr()).await?;
//! client.push_model(r#"{"ok":true}"#, &[1, 2, 3, 4], true).await?;
//! assert_eq!(client.infer(&[9, 9], 3).await?.output_ids, [9, 9, 1, 2, 3]);
//! drop(client);
//! server.shutdown().await;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "codec")]
pub mod codec;
mod runtime;

use std::io;

use donate_host::runtime::Listener;
use tokio_util::compat::TokioAsyncReadCompatExt;

pub use donate_host::embed::*;
pub use donate_host::pool::{PoolJob, PoolModel, PoolResult, PoolSummary, Work};
pub use donate_host::{Error, NodeAddr, NodeConfig, Pool, PoolHandle, Result, Server};

/// Starts a donor [`Pool`] on the tokio runtime this is called from (a task
/// per donor and one coordinating them). Submit jobs through the handle.
///
/// # Errors
/// Fails when called outside a tokio runtime.
pub fn start_pool(pool: Pool) -> io::Result<PoolHandle> {
    let handle = tokio::runtime::Handle::try_current().map_err(|_| {
        io::Error::other("donate_tokio::start_pool must be called from within a tokio runtime")
    })?;
    Ok(pool.start(runtime::Tokio(handle)))
}

donate_host::runtime_client!(
    /// A connection to a donor node over tokio: donate-host's
    /// [`Client`](donate_host::Client), whose methods (`infer`, `push_model`,
    /// `send_infer`, `wait`…) it derefs to.
    runtime::dial
);

impl Client {
    /// Reads the node's `hello` over a tokio stream you connected yourself
    /// (any `tokio::io::AsyncRead + AsyncWrite`: a TLS stream, a duplex pipe…).
    pub async fn handshake(
        stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
        config: ClientConfig,
    ) -> Result<Client> {
        let stream: donate_host::BoxStream = Box::new(stream.compat());
        Ok(Client(
            donate_host::Client::handshake(stream, config).await?,
        ))
    }
}

/// Starts a node on `listener` (a `TcpListener` or, on Unix, a
/// `UnixListener`) with `executor`, its tasks spawned on the tokio runtime
/// this is called from. Jobs run on the node's own worker threads. `config`
/// is a [`ServerConfig`] or, for secure mode, a [`NodeConfig`].
///
/// # Errors
/// Fails with an `io::Error` when called outside a tokio runtime (rather
/// than panicking), or when the listener has no local address.
pub fn serve<T, E: Executor>(
    listener: T,
    config: impl Into<NodeConfig>,
    executor: E,
) -> io::Result<Server<<runtime::Acceptor<T> as Listener>::Addr>>
where
    runtime::Acceptor<T>: Listener,
{
    let handle = tokio::runtime::Handle::try_current().map_err(|_| {
        io::Error::other("donate_tokio::serve must be called from within a tokio runtime")
    })?;
    donate_host::serve(
        runtime::Tokio(handle),
        runtime::Acceptor(listener),
        config,
        executor,
    )
}
