//! # donate-smol
//!
//! A donate-compute donor node and client over async-io and futures-lite, so
//! they run under smol, async-std, tokio or any executor: the node spawns its
//! tasks through a [`Spawn`] you give it. All protocol decisions are made by
//! [`donate_proto`]; the connection loop is donate-host's, written once for
//! every runtime: this crate only lends it async-io's timer and sockets.
//!
//! Nodes listen on TCP (`Async<TcpListener>`) or a Unix socket
//! (`Async<UnixListener>`, see [`donate_host::bind_unix`]); clients connect
//! to `host:port` or `unix:/path`.
//!
//! ```
//! use std::net::TcpListener;
//! use async_io::Async;
//! use donate_smol::{ServerConfig, Stub};
//!
//! smol::block_on(async {
//!     let listener = Async::<TcpListener>::bind(([127, 0, 0, 1], 0))?;
//!     let spawn = |task| smol::spawn(task).detach();
//!     let server = donate_smol::serve(listener, ServerConfig::default(), Stub::default(), spawn)?;
//!     let mut client = donate_smol::Client::connect(server.local_addr()).await?;
//!     client.push_model(r#"{"ok":true}"#, &[1, 2, 3, 4], true).await?;
//!     assert_eq!(client.infer(&[9, 9], 3).await?.output_ids, [9, 9, 1, 2, 3]);
//!     drop(client);
//!     server.shutdown().await;
//!     Ok::<(), Box<dyn std::error::Error>>(())
//! })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod runtime;

use std::io;

use async_io::Async;
use donate_host::runtime::Listener;

pub use donate_host::embed::*;
pub use donate_host::pool::{PoolJob, PoolModel, PoolResult, PoolSummary, Work};
pub use donate_host::runtime::Task;
pub use donate_host::{Error, NodeAddr, NodeConfig, Pool, PoolHandle, Result, Server};
pub use runtime::Spawn;

/// Starts a node on `listener` (an `Async<TcpListener>` or, on Unix, an
/// `Async<UnixListener>`) with `executor`; its tasks run on `spawner`. Jobs
/// run on the node's own worker threads, never on the executor. `config` is
/// a [`ServerConfig`] or, for secure mode, a [`NodeConfig`].
pub fn serve<T, E: Executor>(
    listener: Async<T>,
    config: impl Into<NodeConfig>,
    executor: E,
    spawner: impl Spawn,
) -> io::Result<Server<<runtime::Acceptor<T> as Listener>::Addr>>
where
    runtime::Acceptor<T>: Listener,
{
    donate_host::serve(
        runtime::Smol(spawner),
        runtime::Acceptor(listener),
        config,
        executor,
    )
}

/// Starts a donor [`Pool`] whose tasks run on `spawner` (a task per donor and
/// one coordinating them), over async-io's sockets and timers. Submit jobs
/// through the handle from any task.
pub fn start_pool(pool: Pool, spawner: impl Spawn) -> PoolHandle {
    pool.start(runtime::Smol(spawner))
}

donate_host::runtime_client!(
    /// A connection to a donor node over async-io, under any executor (even a
    /// bare `block_on`): donate-host's [`Client`](donate_host::Client), whose
    /// methods (`infer`, `push_model`, `send_infer`, `wait`…) it derefs to.
    runtime::dial
);

impl Client {
    /// Reads the node's `hello` over a stream you connected yourself (any
    /// `futures-io` `AsyncRead + AsyncWrite`: a TLS stream, a pipe pair…).
    pub async fn handshake(
        stream: impl donate_host::AsyncStream + 'static,
        config: ClientConfig,
    ) -> Result<Client> {
        Ok(Client(
            donate_host::Client::handshake(Box::new(stream) as donate_host::BoxStream, config)
                .await?,
        ))
    }
}
