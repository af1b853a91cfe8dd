//! # donate-tokio
//!
//! A donate-compute donor node and client over tokio. All protocol decisions
//! are made by [`donate_proto`]; this crate only moves bytes between tokio
//! sockets and the core (shared with the other adapters through
//! [`donate_host::host::Host`], whose worker threads run jobs off the runtime).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use donate_proto::{ServerConfig, Stub};
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
#![warn(missing_docs)]

#[cfg(feature = "codec")]
pub mod codec;
mod dial;
mod server;

pub use dial::Tokio;
pub use donate_host::{Error, Result};

/// A client over tokio: the shared async client dialing with [`Tokio`].
pub type Client = donate_host::Client<Tokio>;
pub use server::{serve, Server};
