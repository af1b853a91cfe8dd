//! How the shared async client reaches a node over async-io.

use std::io;
use std::net::{SocketAddr, TcpStream};

use async_io::Async;

use donate_host::Dial;

/// Dials with async-io's `Async<TcpStream>`.
#[derive(Debug, Clone, Copy)]
pub struct Smol;

impl Dial for Smol {
    type Stream = Async<TcpStream>;

    async fn dial(addr: SocketAddr) -> io::Result<Self::Stream> {
        let stream = Async::<TcpStream>::connect(addr).await?;
        stream.get_ref().set_nodelay(true)?;
        Ok(stream)
    }
}
