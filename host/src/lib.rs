//! # donate-host
//!
//! What every donate-compute runtime shares and that is not pure protocol:
//! [`host::Host`], the [`donate_proto::Node`] behind a lock with the worker
//! threads that run jobs, mounts and uploads off the I/O path; the one async
//! connection driver ([`serve`]), written once against the small
//! [`runtime`] traits; the async [`Client`], generic over any `futures-io`
//! byte stream; the [`Error`] every client returns; and [`NodeAddr`].
//!
//! The runtime adapters only move bytes: donate-std with blocking threads,
//! donate-smol and donate-tokio by implementing [`runtime::Runtime`],
//! [`runtime::Listener`] and [`runtime::Stream`] for their own types.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod addr;
mod client;
mod error;
pub mod host;
mod metrics;
mod metrics_http;
pub mod pool;
pub mod runtime;
mod server;
mod signal;
mod store;
mod stored;

use std::net::SocketAddr;

#[cfg(unix)]
pub use addr::{bind_unix, unix_addr};
pub use addr::{peer_ip, AddrParseError, NodeAddr, ToNodeAddr};
pub use client::{
    dial_named, window, AsyncStream, BoxStream, Client, PushStep, Pushed, StoredPush, WeightsRef,
};
pub use donate_proto::{ClientConfig, SecureClientConfig};
pub use error::{answers, feed_read, Error, Result};
pub use host::{NodeConfig, HONOURED};
pub use metrics::Metrics;
pub use metrics_http::MetricsServer;
pub use pool::{Pool, PoolHandle, PoolJob, PoolModel, PoolResult, PoolSummary, Work};
pub use server::{serve, Server};
pub use store::{ModelStore, DEFAULT_UPLOAD_TIMEOUT};

/// What a program embedding an adapter needs from the core and the host, so
/// that one dependency (donate-std, donate-smol or donate-tokio, each
/// re-exporting this) is enough: node settings, executors, requests and
/// answers, and their errors.
pub mod embed {
    pub use crate::error::answers;
    pub use crate::host::HONOURED;
    pub use donate_proto::message::{ErrorFrame, Hello, InferResult, PromptResult, Stats};
    pub use donate_proto::{
        Answer, ApiMisuse, Capabilities, Capability, ClientConfig, ClientError, ErrorCode,
        Executor, JobContext, JobError, Keypair, Mode, NoSpool, NodeTrust, PoolConfig, PoolError,
        PublicKey, RequestId, SamplingParams, SecureClientConfig, SecureServerConfig, ServerConfig,
        Spool, Stub, UploadInfo, Weights,
    };
}

/// Bytes read from a socket at once.
pub const READ_BUFFER: usize = 256 * 1024;

/// Logs a warning when `addr` (a listener's address, as displayed) is an IP
/// address reachable from other machines and the node is not in secure
/// mode: v1 has no authentication.
pub fn warn_if_exposed(addr: &impl std::fmt::Display, config: &NodeConfig) {
    let Ok(addr) = addr.to_string().parse::<SocketAddr>() else {
        return; // a Unix socket, or a transport of the caller's
    };
    if !addr.ip().is_loopback() && !config.is_secure() {
        tracing::warn!(%addr, "listening on a non-loopback address: donate v1 has no authentication, anyone who can reach it can use it");
    }
}
