//! The async client, generic over any `futures-io` stream: donate-smol runs it
//! on `async_io::Async<TcpStream>`, donate-tokio on tokio's `TcpStream` through
//! `tokio-util`'s compat layer. One implementation, so both answer alike.

use std::future::Future;
use std::io::{self, ErrorKind};
use std::net::{SocketAddr, ToSocketAddrs};

use futures_lite::future::poll_once;
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use sha2::Digest as _;

use donate_proto::message::{Hello, InferResult, ModelStatus, PromptResult, QueueStatus};
use donate_proto::{Answer, ClientConfig, ClientConnection, RequestId};

use crate::error::{answers, feed_read, Result};
use crate::READ_BUFFER;

/// How a runtime opens a stream to a node: each async adapter names its own
/// (donate-smol's `Smol`, donate-tokio's `Tokio`); implement it for your own transport.
pub trait Dial {
    /// The byte stream.
    type Stream: AsyncRead + AsyncWrite + Unpin;
    /// Connects to `addr` (with `TCP_NODELAY`).
    fn dial(addr: SocketAddr) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

/// A connection to a donor node over any async byte stream.
///
/// For many jobs in flight, use [`send_infer`](Client::send_infer) /
/// [`send_prompt`](Client::send_prompt) and then [`wait`](Client::wait) for each.
pub struct Client<D: Dial> {
    stream: D::Stream,
    core: ClientConnection,
    read_buf: Vec<u8>,
    out: Vec<u8>,
}

impl<D: Dial> Client<D> {
    /// Connects and reads the server's `hello`.
    pub async fn connect(addr: impl ToSocketAddrs) -> Result<Client<D>> {
        Client::connect_with(addr, ClientConfig::default()).await
    }

    /// Connects with explicit client settings, trying each address `addr` resolves to.
    pub async fn connect_with(addr: impl ToSocketAddrs, config: ClientConfig) -> Result<Client<D>> {
        let mut last = io::Error::new(ErrorKind::InvalidInput, "address resolved to nothing");
        for addr in addr.to_socket_addrs()? {
            match D::dial(addr).await {
                Ok(stream) => return Client::handshake(stream, config).await,
                Err(e) => last = e,
            }
        }
        Err(last.into())
    }

    /// Reads the server's `hello` from a connected stream.
    pub async fn handshake(stream: D::Stream, config: ClientConfig) -> Result<Client<D>> {
        let mut client = Client {
            stream,
            core: ClientConnection::new(config),
            read_buf: vec![0; READ_BUFFER],
            out: Vec::new(),
        };
        while client.core.server_hello().is_none() {
            client.read_some().await?;
        }
        Ok(client)
    }

    /// The server's `hello`.
    pub fn hello(&self) -> &Hello {
        self.core.server_hello().expect("handshake waits for hello")
    }

    /// Uploads a model from memory and waits until it is mounted.
    pub async fn push_model(
        &mut self,
        config_json: &str,
        weights: &[u8],
        with_sha256: bool,
    ) -> Result<ModelStatus> {
        let sha256 = with_sha256.then(|| sha2::Sha256::digest(weights).into());
        self.push_model_from(config_json, weights, weights.len() as u64, sha256, |_| {})
            .await
    }

    /// Uploads `len` bytes from `reader` without holding them all, calling
    /// `progress` with the bytes sent so far, and waits until the model is mounted.
    pub async fn push_model_from(
        &mut self,
        config_json: &str,
        mut reader: impl AsyncRead + Unpin,
        len: u64,
        sha256: Option<[u8; 32]>,
        mut progress: impl FnMut(u64),
    ) -> Result<ModelStatus> {
        let request = self.core.begin_upload(config_json, len, sha256)?;
        let mut chunk = Vec::new();
        let mut sent = 0;
        while self.core.is_uploading() {
            let wanted = self.core.upload_wants();
            if wanted == 0 {
                self.flush().await?;
                self.read_ready().await?; // notice a refusal without waiting for the end
                continue;
            }
            chunk.resize(wanted, 0);
            reader.read_exact(&mut chunk).await?;
            self.core.upload_chunk(&chunk)?;
            sent += wanted as u64;
            progress(sent);
        }
        answers::model_status(self.wait(request).await?)
    }

    /// Runs an `infer` job and waits for its result.
    pub async fn infer(&mut self, input_ids: &[i32], max_tokens: i64) -> Result<InferResult> {
        let request = self.send_infer(input_ids, max_tokens)?;
        answers::infer(self.wait(request).await?)
    }

    /// Runs a `prompt` job and waits for its result.
    pub async fn prompt(&mut self, prompt: &str, max_out: i64) -> Result<PromptResult> {
        let request = self.send_prompt(prompt, max_out)?;
        answers::prompt(self.wait(request).await?)
    }

    /// Asks for the queue's state; `None` from a node that does not answer it (the Go node).
    pub async fn queue_status(&mut self) -> Result<Option<QueueStatus>> {
        let request = self.core.queue_status()?;
        answers::queue_status(self.wait(request).await?)
    }

    /// Queues an `infer` job without waiting; see [`wait`](Client::wait).
    pub fn send_infer(&mut self, input_ids: &[i32], max_tokens: i64) -> Result<RequestId> {
        Ok(self.core.infer(input_ids, max_tokens)?)
    }

    /// Queues a `prompt` job without waiting; see [`wait`](Client::wait).
    pub fn send_prompt(&mut self, prompt: &str, max_out: i64) -> Result<RequestId> {
        Ok(self.core.prompt(prompt, max_out)?)
    }

    /// Sends what is queued and waits for the answer to `request`.
    pub async fn wait(&mut self, request: RequestId) -> Result<Answer> {
        self.flush().await?;
        loop {
            if let Some(answer) = self.core.take_answer(request) {
                return Ok(answer);
            }
            self.read_some().await?;
        }
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> Result<()> {
        loop {
            self.core.poll_transmit(&mut self.out);
            if self.out.is_empty() {
                return Ok(());
            }
            self.stream.write_all(&self.out).await?;
            self.out.clear();
        }
    }

    async fn read_some(&mut self) -> Result<()> {
        let read = self.stream.read(&mut self.read_buf).await;
        feed_read(&mut self.core, read, &self.read_buf)
    }

    /// Feeds whatever input has already arrived, without waiting.
    async fn read_ready(&mut self) -> Result<()> {
        match poll_once(self.stream.read(&mut self.read_buf)).await {
            Some(read) => feed_read(&mut self.core, read, &self.read_buf),
            None => Ok(()),
        }
    }
}
