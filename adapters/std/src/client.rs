//! A blocking client over `std::net`.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use sha2::{Digest, Sha256};

use donate_proto::message::{Hello, InferResult, ModelStatus, PromptResult, QueueStatus};
use donate_proto::{Answer, ClientConfig, ClientConnection, RequestId};

use donate_host::{answers, feed_read, Result, READ_BUFFER};

/// A connection to a donor node (ours or the Go one).
///
/// Calls block until answered. For many jobs in flight, use
/// [`send_infer`](Client::send_infer) / [`send_prompt`](Client::send_prompt) and
/// then [`wait`](Client::wait) for each request.
pub struct Client {
    stream: TcpStream,
    core: ClientConnection,
    read_buf: Vec<u8>,
    out: Vec<u8>,
}

impl Client {
    /// Connects and reads the server's `hello`.
    pub fn connect(addr: impl ToSocketAddrs) -> Result<Client> {
        Client::connect_with(addr, ClientConfig::default())
    }

    /// Connects with explicit client settings.
    pub fn connect_with(addr: impl ToSocketAddrs, config: ClientConfig) -> Result<Client> {
        Client::handshake(TcpStream::connect(addr)?, config, None)
    }

    /// Connects, giving up on any connect, read or write that takes longer than
    /// `timeout` (an [`Error::Io`](crate::Error::Io) of kind `WouldBlock` or `TimedOut`).
    pub fn connect_timeout(addr: impl ToSocketAddrs, timeout: Duration) -> Result<Client> {
        let mut last = io::Error::new(ErrorKind::InvalidInput, "address resolved to nothing");
        for addr in addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, timeout) {
                Ok(stream) => {
                    return Client::handshake(stream, ClientConfig::default(), Some(timeout))
                }
                Err(e) => last = e,
            }
        }
        Err(last.into())
    }

    fn handshake(
        stream: TcpStream,
        config: ClientConfig,
        timeout: Option<Duration>,
    ) -> Result<Client> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(timeout)?;
        stream.set_write_timeout(timeout)?;
        let mut client = Client {
            stream,
            core: ClientConnection::new(config),
            read_buf: vec![0; READ_BUFFER],
            out: Vec::new(),
        };
        while client.core.server_hello().is_none() {
            client.read_some()?;
        }
        Ok(client)
    }

    /// The server's `hello`.
    pub fn hello(&self) -> &Hello {
        self.core.server_hello().expect("connect waits for hello")
    }

    /// Uploads a model from memory and waits until it is mounted.
    pub fn push_model(
        &mut self,
        config_json: &str,
        weights: &[u8],
        with_sha256: bool,
    ) -> Result<ModelStatus> {
        let sha256 = with_sha256.then(|| Sha256::digest(weights).into());
        self.push_model_from(config_json, weights, weights.len() as u64, sha256, |_| {})
    }

    /// Uploads `len` bytes from `reader` without holding them all, calling
    /// `progress` with the bytes sent so far, and waits until the model is mounted.
    pub fn push_model_from(
        &mut self,
        config_json: &str,
        mut reader: impl Read,
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
                self.flush()?;
                self.read_ready()?; // notice a refusal without waiting for the end
                continue;
            }
            chunk.resize(wanted, 0);
            reader.read_exact(&mut chunk)?;
            self.core.upload_chunk(&chunk)?;
            sent += wanted as u64;
            progress(sent);
        }
        answers::model_status(self.wait(request)?)
    }

    /// Runs an `infer` job and waits for its result.
    pub fn infer(&mut self, input_ids: &[i32], max_tokens: i64) -> Result<InferResult> {
        let request = self.send_infer(input_ids, max_tokens)?;
        answers::infer(self.wait(request)?)
    }

    /// Runs a `prompt` job and waits for its result.
    pub fn prompt(&mut self, prompt: &str, max_out: i64) -> Result<PromptResult> {
        let request = self.send_prompt(prompt, max_out)?;
        answers::prompt(self.wait(request)?)
    }

    /// Asks for the queue's state; `None` from a node that does not answer it (the Go node).
    pub fn queue_status(&mut self) -> Result<Option<QueueStatus>> {
        let request = self.core.queue_status()?;
        answers::queue_status(self.wait(request)?)
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
    pub fn wait(&mut self, request: RequestId) -> Result<Answer> {
        self.flush()?;
        loop {
            if let Some(answer) = self.core.take_answer(request) {
                return Ok(answer);
            }
            self.read_some()?;
        }
    }

    /// Writes everything queued.
    pub fn flush(&mut self) -> Result<()> {
        loop {
            self.core.poll_transmit(&mut self.out);
            if self.out.is_empty() {
                return Ok(());
            }
            self.stream.write_all(&self.out)?;
            self.out.clear();
        }
    }

    /// Blocks for input and feeds it to the core.
    fn read_some(&mut self) -> Result<()> {
        let read = self.stream.read(&mut self.read_buf);
        feed_read(&mut self.core, read, &self.read_buf)
    }

    /// Feeds whatever input has already arrived, without blocking.
    fn read_ready(&mut self) -> Result<()> {
        self.stream.set_nonblocking(true)?;
        let read = self.stream.read(&mut self.read_buf);
        self.stream.set_nonblocking(false)?;
        match read {
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(()),
            read => feed_read(&mut self.core, read, &self.read_buf),
        }
    }
}

/// SHA-256 of everything `reader` yields, read in 1 MiB pieces (for `weights_sha256`).
pub fn sha256_of_reader(mut reader: impl Read) -> io::Result<[u8; 32]> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 1024 * 1024];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return Ok(hasher.finalize().into()),
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}
