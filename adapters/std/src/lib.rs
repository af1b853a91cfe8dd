//! # donate-std
//!
//! A donate-compute donor node and client over `std::net`, with blocking
//! threads and no async runtime. All protocol decisions are made by
//! [`donate_proto`]; this crate only moves bytes between sockets and the core,
//! runs jobs on worker threads, and sleeps until the core's next timeout.
//!
//! The node is hosted by [`donate_host::host::Host`] (a node behind a lock,
//! with worker threads), as on every runtime; [`Error`] is donate-host's.
//!
//! ```
//! use std::net::TcpListener;
//! use donate_std::{ServerConfig, Stub};
//!
//! let server = donate_std::serve(TcpListener::bind("127.0.0.1:0")?, ServerConfig::default(), Stub::default())?;
//! let mut client = donate_std::Client::connect(server.local_addr())?;
//! assert_eq!(client.hello().mode, "model_push");
//! client.push_model(r#"{"ok":true}"#, &[1, 2, 3, 4], true)?;
//! assert_eq!(client.infer(&[9, 9], 3)?.output_ids, [9, 9, 1, 2, 3]);
//! drop(client);
//! server.shutdown();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod client;
mod pool;
mod server;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

pub use client::{sha256_of_reader, Client, HANDSHAKE_TIMEOUT};
pub use donate_host::embed::*;
pub use donate_host::{Error, NodeAddr, NodeConfig, Result, WeightsRef};
pub use pool::{Pool, PoolJob, PoolModel, PoolResult, PoolSummary, Work};
pub use server::{serve, Listen, Server};

/// The loopback address on `addr`'s port when `addr` is a wildcard, else `addr`.
pub(crate) fn loopback_of(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        let ip = match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        };
        SocketAddr::new(ip, addr.port())
    } else {
        addr
    }
}
