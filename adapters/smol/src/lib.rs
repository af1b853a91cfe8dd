//! # donate-smol
//!
//! A donate-compute donor node and client over async-io and futures-lite, so
//! they run under smol, async-std, tokio or any executor: the node spawns its
//! tasks through a [`Spawn`] you give it. All protocol decisions are made by
//! [`donate_proto`]; this crate only moves bytes between sockets and the core
//! (hosted by [`donate_host::host::Host`], whose worker threads run jobs).
//!
//! ```
//! use std::net::TcpListener;
//! use async_io::Async;
//! use donate_proto::{ServerConfig, Stub};
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
#![warn(missing_docs)]

mod dial;
mod server;
mod signal;

pub use dial::Smol;
pub use donate_host::{Error, Result};
pub use server::{serve, Server, Spawn, Task};

/// A client over async-io: the shared async client dialing with [`Smol`].
pub type Client = donate_host::Client<Smol>;
