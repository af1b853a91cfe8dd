//! # donate-host
//!
//! What every donate-compute runtime shares and that is not pure protocol:
//! [`host::Host`], the [`donate_proto::Node`] behind a lock with the worker
//! threads that run jobs, mounts and uploads off the I/O path; the [`Error`]
//! every client returns; and the async [`Client`], generic over any
//! `futures-io` byte stream.
//!
//! The runtime adapters (donate-std, donate-smol, donate-tokio) only move bytes
//! between their sockets and this crate.
#![warn(missing_docs)]

mod client;
mod error;
pub mod host;

use std::net::SocketAddr;

pub use client::{Client, Dial};
pub use error::{answers, feed_read, Error, Result};

/// Bytes read from a socket at once.
pub const READ_BUFFER: usize = 256 * 1024;

/// Logs a warning when `addr` is reachable from other machines: v1 has no authentication.
pub fn warn_if_exposed(addr: SocketAddr) {
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "listening on a non-loopback address: donate v1 has no authentication, anyone who can reach it can use it");
    }
}
