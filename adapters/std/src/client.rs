//! A blocking client over `std::net`.

use std::io::{self, ErrorKind, Read, Seek, SeekFrom, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use donate_host::{Error, NodeAddr, PushStep, Pushed, StoredPush, ToNodeAddr, WeightsRef};

use sha2::{Digest, Sha256};

use donate_proto::message::ModelInventory;
use donate_proto::message::{Hello, InferResult, ModelStatus, PromptResult, QueueStatus};
use donate_proto::{
    Answer, Capability, ClientConfig, ClientConnection, ClientEvent, PartialOutput, PromptRequest,
    PublicKey, RequestId, SamplingParams, SecureClientConfig,
};

use donate_host::{answers, feed_read, Result, READ_BUFFER};

/// How long [`Client::connect_secure`] waits for the handshake without a timeout of the caller's.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to a donor node (ours or the Go one).
///
/// Calls block until answered. For many jobs in flight, use
/// [`send_infer`](Client::send_infer) / [`send_prompt`](Client::send_prompt) and
/// then [`wait`](Client::wait) for each request.
pub struct Client {
    stream: Socket,
    core: ClientConnection,
    /// The read timeout the caller asked for, restored after a [`Client::next_answer`].
    io_timeout: Option<Duration>,
    read_buf: Vec<u8>,
    out: Vec<u8>,
}

impl Client {
    /// Connects to `addr` (`host:port`, `ip:port`, `unix:/path`, a
    /// `SocketAddr` or a [`NodeAddr`]) and reads the server's `hello`.
    pub fn connect(addr: impl ToNodeAddr) -> Result<Client> {
        Client::connect_with(addr, ClientConfig::default())
    }

    /// Connects with explicit client settings. A failed connection's error
    /// names the address ([`Error::Connect`]).
    pub fn connect_with(addr: impl ToNodeAddr, config: ClientConfig) -> Result<Client> {
        Client::handshake(Socket::connect(addr, None)?, config, None)
    }

    /// Connects, giving up on any connect, read or write that takes longer than
    /// `timeout` (an [`Error::Io`] of kind `WouldBlock` or `TimedOut`).
    pub fn connect_timeout(addr: impl ToNodeAddr, timeout: Duration) -> Result<Client> {
        let stream = Socket::connect(addr, Some(timeout))?;
        Client::handshake(stream, ClientConfig::default(), Some(timeout))
    }

    /// Connects in secure mode: a Noise handshake with a node whose key
    /// `secure` trusts (docs/PROTOCOL.md, `secure`). A node that does not
    /// offer secure mode is refused with nothing sent to it. `timeout` bounds
    /// the connect and every later read or write as in
    /// [`connect_timeout`](Client::connect_timeout); the handshake must end
    /// within it, or within [`HANDSHAKE_TIMEOUT`] without one
    /// ([`Error::HandshakeTimeout`]).
    pub fn connect_secure(
        addr: impl ToNodeAddr,
        config: ClientConfig,
        secure: SecureClientConfig,
        timeout: Option<Duration>,
    ) -> Result<Client> {
        let stream = Socket::connect(addr, timeout)?;
        let limit = timeout.unwrap_or(HANDSHAKE_TIMEOUT);
        stream.set_read_timeout(Some(limit))?;
        stream.set_write_timeout(Some(limit))?;
        let mut client = Client::new(stream, ClientConnection::secure(config, secure));
        let deadline = std::time::Instant::now() + limit;
        let timed_out = |e: &Error| matches!(e, Error::Io(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut));
        while client.core.server_hello().is_none() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(Error::HandshakeTimeout(limit));
            }
            client.stream.set_read_timeout(Some(left))?;
            match client.flush().and_then(|()| client.read_some()) {
                Err(e) if timed_out(&e) => return Err(Error::HandshakeTimeout(limit)),
                other => other?,
            }
        }
        // The handshake's last message: the node judges our key now.
        client.flush()?;
        client.stream.set_read_timeout(timeout)?;
        client.stream.set_write_timeout(timeout)?;
        client.io_timeout = timeout;
        Ok(client)
    }

    /// In secure mode, the node's authenticated key (to record it, for trust on first use).
    pub fn node_key(&self) -> Option<&PublicKey> {
        self.core.node_key()
    }

    /// Talks to a node over a byte stream of the caller's (a pipe to a child
    /// process, a TLS stream, a socket pair): `core` is a plain
    /// [`ClientConnection::new`] or a secure [`ClientConnection::secure`] one.
    /// Reads until the node's hello (and, in secure mode, the handshake) is done.
    pub fn over(
        stream: impl Read + Write + Send + 'static,
        core: ClientConnection,
    ) -> Result<Client> {
        let mut client = Client::new(Socket::Other(Box::new(stream)), core);
        while client.core.server_hello().is_none() {
            client.flush()?;
            client.read_some()?;
        }
        client.flush()?;
        Ok(client)
    }

    fn new(stream: Socket, core: ClientConnection) -> Client {
        Client {
            stream,
            core,
            io_timeout: None,
            read_buf: vec![0; READ_BUFFER],
            out: Vec::new(),
        }
    }

    fn handshake(
        stream: Socket,
        config: ClientConfig,
        timeout: Option<Duration>,
    ) -> Result<Client> {
        stream.set_read_timeout(timeout)?;
        stream.set_write_timeout(timeout)?;
        let mut client = Client::new(stream, ClientConnection::new(config));
        client.io_timeout = timeout;
        while client.core.server_hello().is_none() {
            client.read_some()?;
        }
        Ok(client)
    }

    /// The extensions in use on this connection (those the node offered
    /// that this client wants; none with a v1 node).
    pub fn capabilities(&self) -> donate_proto::Capabilities {
        self.core.capabilities()
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
        reader: impl Read,
        len: u64,
        sha256: Option<[u8; 32]>,
        progress: impl FnMut(u64),
    ) -> Result<ModelStatus> {
        let request = self.core.begin_upload(config_json, len, sha256)?;
        self.send_upload(request, reader, progress)
    }

    /// Mounts the model whose weights `reader` holds (`len` bytes hashing to
    /// `weights.sha256`), sending only what the node lacks: on a node with a
    /// model store (extension `store`) it mounts a stored copy with no
    /// weights sent, or resumes a broken upload where it stopped (an upload
    /// gives the store `weights.name`); elsewhere (a v1 node) it uploads
    /// everything. `progress` gets the bytes sent so far.
    pub fn push_stored(
        &mut self,
        config_json: &str,
        mut reader: impl Read + Seek,
        len: u64,
        weights: impl Into<WeightsRef>,
        mut progress: impl FnMut(u64),
    ) -> Result<Pushed> {
        let weights = weights.into();
        let store = self.core.capabilities().contains(Capability::Store);
        let (mut plan, mut step) = StoredPush::start(len, store);
        loop {
            step = match step {
                PushStep::Query => plan.inventory(self.query_models(&[weights.sha256])?)?,
                PushStep::Use => {
                    let request = self.core.use_model(config_json, weights.sha256)?;
                    plan.used(answers::model_status(self.wait(request)?))?
                }
                PushStep::Upload { from } => {
                    reader.seek(SeekFrom::Start(from))?;
                    let request =
                        self.core
                            .submit_upload(&weights.upload(config_json, len, from))?;
                    let answer = self.send_upload(request, &mut reader, &mut progress);
                    plan.uploaded(from, answer)?
                }
                PushStep::Done(pushed) => return Ok(pushed),
            };
        }
    }

    /// Extension `store`: which of these models (by weights SHA-256; none:
    /// every one) the node holds, and its store's free space.
    pub fn query_models(&mut self, hashes: &[[u8; 32]]) -> Result<ModelInventory> {
        let request = self.core.query_models(hashes)?;
        answers::inventory(self.wait(request)?)
    }

    /// Sends an upload's bytes from `reader` as the core asks for them and waits for its answer.
    fn send_upload(
        &mut self,
        request: RequestId,
        mut reader: impl Read,
        mut progress: impl FnMut(u64),
    ) -> Result<ModelStatus> {
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
        self.wait_infer(request)
    }

    /// Runs a `prompt` job and waits for its result.
    pub fn prompt(&mut self, prompt: &str, max_out: i64) -> Result<PromptResult> {
        let request = self.send_prompt(prompt, max_out)?;
        self.wait_prompt(request)
    }

    /// Extension `cancel` (docs/PROTOCOL.md §10.2): asks the node to stop job
    /// `request` and sends it at once; its answer (`cancelled`, or its result
    /// if it finished first) still comes, to [`wait`](Client::wait) for or
    /// not. False when the job is not outstanding; [`Error::Misuse`] with
    /// `NotOffered` from a node that did not agree to `cancel`.
    pub fn cancel(&mut self, request: RequestId) -> Result<bool> {
        let sent = self.core.cancel(request)?;
        self.flush()?;
        Ok(sent)
    }

    /// Extension `stats` (docs/PROTOCOL.md §10.5): the node's counters;
    /// `None` from a node that did not agree to `stats`.
    pub fn stats(&mut self) -> Result<Option<donate_proto::message::Stats>> {
        if !self
            .core
            .capabilities()
            .contains(donate_proto::Capability::Stats)
        {
            return Ok(None);
        }
        let request = self.core.stats()?;
        answers::stats(self.wait(request)?).map(Some)
    }

    /// [`infer`](Client::infer) with sampling fields (extension `sampling`;
    /// refused with [`ApiMisuse::NotOffered`](donate_proto::ApiMisuse::NotOffered)
    /// by a node that does not offer it, nothing sent).
    pub fn infer_with(
        &mut self,
        input_ids: &[i32],
        max_tokens: i64,
        sampling: &SamplingParams,
    ) -> Result<InferResult> {
        let request = self.send_infer_with(input_ids, max_tokens, sampling)?;
        self.wait_infer(request)
    }

    /// [`prompt`](Client::prompt) with sampling fields, as [`infer_with`](Client::infer_with).
    pub fn prompt_with(
        &mut self,
        prompt: &str,
        max_out: i64,
        sampling: &SamplingParams,
    ) -> Result<PromptResult> {
        let request = self.send_prompt_with(prompt, max_out, sampling)?;
        self.wait_prompt(request)
    }

    /// [`send_infer`](Client::send_infer) with sampling fields.
    pub fn send_infer_with(
        &mut self,
        input_ids: &[i32],
        max_tokens: i64,
        sampling: &SamplingParams,
    ) -> Result<RequestId> {
        self.make_room()?;
        Ok(self.core.infer_with(input_ids, max_tokens, sampling)?)
    }

    /// [`send_prompt`](Client::send_prompt) with sampling fields.
    pub fn send_prompt_with(
        &mut self,
        prompt: &str,
        max_out: i64,
        sampling: &SamplingParams,
    ) -> Result<RequestId> {
        self.make_room()?;
        Ok(self.core.prompt_with(prompt, max_out, sampling)?)
    }

    /// Queues a `prompt` job as `request` describes it (text or, extension
    /// `chat`, a conversation or raw text; sampling; its own `job_id`),
    /// keeping within the node's queue capacity. Its answer's `usage` comes
    /// from a node that agreed `chat`.
    pub fn submit_prompt(&mut self, request: &PromptRequest) -> Result<RequestId> {
        self.make_room()?;
        Ok(self.core.submit_prompt(request)?)
    }

    /// [`wait`](Client::wait), handing `request`'s partial output to
    /// `on_partial` as it arrives (extension `stream`: from a node that
    /// offers it; any other sends only the answer).
    pub fn wait_streaming(
        &mut self,
        request: RequestId,
        mut on_partial: impl FnMut(PartialOutput),
    ) -> Result<Answer> {
        if !self.core.is_pending(request) {
            return Err(Error::NotPending(request));
        }
        self.flush()?;
        loop {
            while let Some(partial) = self.core.take_partial(request) {
                on_partial(partial);
            }
            if let Some(answer) = self.core.take_answer(request) {
                return Ok(answer);
            }
            self.read_some()?;
        }
    }

    /// Asks for the queue's state; `None` from a node that does not answer it (the Go node).
    pub fn queue_status(&mut self) -> Result<Option<QueueStatus>> {
        let request = self.core.queue_status()?;
        answers::queue_status(self.wait(request)?)
    }

    /// Queues an `infer` job without waiting for its answer; see [`wait`](Client::wait).
    ///
    /// At most the node's `queue_capacity` (from its `hello`) requests are in
    /// flight: when that many are unanswered, this first sends what is queued
    /// and reads answers until one arrives, so pipelining any number of jobs
    /// never meets `queue_full` from this client alone (other clients share the
    /// node's queue). Answers read meanwhile wait for their own [`wait`](Client::wait).
    pub fn send_infer(&mut self, input_ids: &[i32], max_tokens: i64) -> Result<RequestId> {
        self.make_room()?;
        Ok(self.core.infer(input_ids, max_tokens)?)
    }

    /// Queues a `prompt` job without waiting for its answer, keeping within the
    /// node's queue capacity as [`send_infer`](Client::send_infer) does.
    pub fn send_prompt(&mut self, prompt: &str, max_out: i64) -> Result<RequestId> {
        self.make_room()?;
        Ok(self.core.prompt(prompt, max_out)?)
    }

    /// Queues an `infer` job under a `job_id` of the caller's choosing (one not
    /// in flight on this connection), keeping within the node's queue capacity.
    pub fn send_infer_as(
        &mut self,
        job_id: &str,
        input_ids: &[i32],
        max_tokens: i64,
    ) -> Result<RequestId> {
        self.make_room()?;
        Ok(self.core.infer_as(job_id, input_ids, max_tokens)?)
    }

    /// Queues a `prompt` job under a `job_id` of the caller's choosing.
    pub fn send_prompt_as(
        &mut self,
        job_id: &str,
        prompt: &str,
        max_out: i64,
    ) -> Result<RequestId> {
        self.make_room()?;
        Ok(self.core.prompt_as(job_id, prompt, max_out)?)
    }

    /// [`send_infer_as`](Client::send_infer_as) with sampling fields (refused,
    /// nothing sent, by a node that did not offer `sampling`).
    pub fn send_infer_as_with(
        &mut self,
        job_id: &str,
        input_ids: &[i32],
        max_tokens: i64,
        sampling: &SamplingParams,
    ) -> Result<RequestId> {
        self.make_room()?;
        Ok(self
            .core
            .infer_as_with(job_id, input_ids, max_tokens, sampling)?)
    }

    /// [`send_prompt_as`](Client::send_prompt_as) with sampling fields.
    pub fn send_prompt_as_with(
        &mut self,
        job_id: &str,
        prompt: &str,
        max_out: i64,
        sampling: &SamplingParams,
    ) -> Result<RequestId> {
        self.make_room()?;
        Ok(self
            .core
            .prompt_as_with(job_id, prompt, max_out, sampling)?)
    }

    /// Sends what is queued and waits up to `wait` for the next answer to any
    /// request (for a caller with many requests in flight, in any order).
    /// `None` when none came in time.
    pub fn next_answer(&mut self, wait: Duration) -> Result<Option<(RequestId, Answer)>> {
        self.flush()?;
        loop {
            while let Some(event) = self.core.poll_event() {
                match event {
                    ClientEvent::Answer { request, answer } => return Ok(Some((request, answer))),
                    ClientEvent::Closing(frame) => return Err(Error::Refused(frame)),
                    // Partial output (extension `stream`) is not an answer.
                    ClientEvent::Connected(_) | ClientEvent::Partial { .. } => {}
                }
            }
            if matches!(self.stream, Socket::Other(_)) {
                self.read_some()?;
                continue;
            }
            self.stream
                .set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
            let read = self.stream.read(&mut self.read_buf);
            self.stream.set_read_timeout(self.io_timeout)?;
            match read {
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Ok(None)
                }
                read => feed_read(&mut self.core, read, &self.read_buf)?,
            }
        }
    }

    /// [`wait`](Client::wait) for an `infer` job's result: a job that ran and
    /// failed is [`Error::InferFailed`], as [`infer`](Client::infer) gives it.
    pub fn wait_infer(&mut self, request: RequestId) -> Result<InferResult> {
        answers::infer(self.wait(request)?)
    }

    /// [`wait`](Client::wait) for a `prompt` job's result: a job that ran and
    /// failed is [`Error::PromptFailed`].
    pub fn wait_prompt(&mut self, request: RequestId) -> Result<PromptResult> {
        answers::prompt(self.wait(request)?)
    }

    /// Sends what is queued and waits for the answer to `request`.
    ///
    /// Fails at once with [`Error::NotPending`] when `request`'s answer was
    /// already taken or the request was never made on this connection.
    pub fn wait(&mut self, request: RequestId) -> Result<Answer> {
        if !self.core.is_pending(request) {
            return Err(Error::NotPending(request));
        }
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

    /// Reads answers until fewer requests than the node's queue capacity are in flight.
    fn make_room(&mut self) -> Result<()> {
        let window = donate_host::window(self.hello());
        if self.core.outstanding() >= window {
            self.flush()?;
        }
        while self.core.outstanding() >= window {
            self.read_some()?;
        }
        Ok(())
    }

    /// Blocks for input and feeds it to the core.
    fn read_some(&mut self) -> Result<()> {
        let read = self.stream.read(&mut self.read_buf);
        feed_read(&mut self.core, read, &self.read_buf)
    }

    /// Feeds whatever input has already arrived, without blocking (a
    /// caller's stream cannot say: nothing is read then).
    fn read_ready(&mut self) -> Result<()> {
        if matches!(self.stream, Socket::Other(_)) {
            return Ok(());
        }
        self.stream.set_nonblocking(true)?;
        let read = self.stream.read(&mut self.read_buf);
        self.stream.set_nonblocking(false)?;
        match read {
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(()),
            read => feed_read(&mut self.core, read, &self.read_buf),
        }
    }
}

/// A byte stream of the caller's, behind [`Client::over`].
trait ByteStream: Read + Write + Send {}
impl<T: Read + Write + Send> ByteStream for T {}

/// The client's socket: TCP or, on Unix, a Unix domain socket, or any stream
/// the caller brings (timeouts and readiness are then the stream's own affair).
enum Socket {
    Tcp(TcpStream),
    #[cfg(unix)]
    Unix(std::os::unix::net::UnixStream),
    Other(Box<dyn ByteStream>),
}

impl Socket {
    /// Connects to `addr`, within `timeout` if given; the error names the address.
    fn connect(addr: impl ToNodeAddr, timeout: Option<Duration>) -> Result<Socket> {
        let addr = addr.to_node_addr().map_err(|source| Error::Connect {
            addr: "(unparsed address)".into(),
            source,
        })?;
        Socket::open(&addr, timeout).map_err(|source| Error::Connect {
            addr: addr.to_string(),
            source,
        })
    }

    fn open(addr: &NodeAddr, timeout: Option<Duration>) -> io::Result<Socket> {
        let name = match addr {
            NodeAddr::Tcp(name) => name,
            #[cfg(unix)]
            NodeAddr::Unix(path) => {
                return Ok(Socket::Unix(std::os::unix::net::UnixStream::connect(path)?))
            }
            #[cfg(not(unix))]
            NodeAddr::Unix(_) => return Err(ErrorKind::Unsupported.into()),
        };
        let mut last = io::Error::new(ErrorKind::InvalidInput, "resolved to nothing");
        for addr in name.to_socket_addrs()? {
            let stream = match timeout {
                Some(timeout) => TcpStream::connect_timeout(&addr, timeout),
                None => TcpStream::connect(addr),
            };
            match stream {
                Ok(stream) => {
                    stream.set_nodelay(true)?;
                    return Ok(Socket::Tcp(stream));
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

/// Calls the same method on either kind of socket; `$other` for a caller's stream.
macro_rules! either {
    ($socket:expr, $s:ident => $e:expr, $other:expr) => {
        match $socket {
            Socket::Tcp($s) => $e,
            #[cfg(unix)]
            Socket::Unix($s) => $e,
            #[allow(unused_variables)]
            Socket::Other($s) => $other,
        }
    };
    ($socket:expr, $s:ident => $e:expr) => {
        either!($socket, $s => $e, $e)
    };
}

impl Socket {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        either!(self, s => s.set_read_timeout(timeout), Ok(()))
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        either!(self, s => s.set_write_timeout(timeout), Ok(()))
    }

    fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        either!(self, s => s.set_nonblocking(nonblocking), Err(ErrorKind::Unsupported.into()))
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        either!(self, s => s.read(buf))
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        either!(self, s => s.write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        either!(self, s => s.flush())
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
