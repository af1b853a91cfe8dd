//! How the shared async client reaches a node over tokio.

use std::io;
use std::net::SocketAddr;

use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

use donate_host::Dial;

/// Dials with tokio's `TcpStream`, seen through `futures-io` by tokio-util's compat layer.
#[derive(Debug, Clone, Copy)]
pub struct Tokio;

impl Dial for Tokio {
    type Stream = Compat<tokio::net::TcpStream>;

    async fn dial(addr: SocketAddr) -> io::Result<Self::Stream> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream.compat())
    }
}
