//! The async client, generic over any `futures-io` byte stream: donate-smol
//! runs it on async-io's sockets, donate-tokio on tokio's through
//! `tokio-util`'s compat layer. One implementation, so both answer alike.

use std::io;

use futures_lite::future::poll_once;
use futures_lite::{AsyncRead, AsyncReadExt, AsyncSeek, AsyncSeekExt, AsyncWrite, AsyncWriteExt};
use sha2::Digest as _;

use donate_proto::message::{
    Hello, InferResult, ModelInventory, ModelStatus, PromptResult, QueueStatus,
};
use donate_proto::{
    Answer, Capabilities, Capability, ClientConfig, ClientConnection, ClientEvent, ErrorCode,
    PartialOutput, PromptRequest, PublicKey, RequestId, SamplingParams, SecureClientConfig,
    UploadRequest,
};

use crate::error::{answers, feed_read, Error, Result};
use crate::READ_BUFFER;

/// How a model came to be mounted by a store-aware push (`push_stored`):
/// what the node already held, and the weight bytes this client sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// The node's answer (`ok` is true).
    pub status: ModelStatus,
    /// Weight bytes sent (0 when the node held the model).
    pub sent: u64,
    /// The node held the whole model: it was mounted from its store.
    pub reused: bool,
    /// The upload resumed a broken one at this byte (0: it started at the beginning).
    pub resumed_from: u64,
}

impl Pushed {
    /// Mounted from the node's store: nothing sent.
    pub fn reused(status: ModelStatus) -> Self {
        Pushed {
            status,
            sent: 0,
            reused: true,
            resumed_from: 0,
        }
    }

    /// Uploaded from `resumed_from` to `len`.
    pub fn sent(status: ModelStatus, len: u64, resumed_from: u64) -> Self {
        Pushed {
            status,
            sent: len - resumed_from,
            reused: false,
            resumed_from,
        }
    }
}

/// The weights a store-aware push mounts: their SHA-256, and the name the
/// node's store keeps with them (the file name pushed; empty for none).
/// `[u8; 32]` converts into one without a name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WeightsRef {
    /// The SHA-256 of the weights.
    pub sha256: [u8; 32],
    /// Extension `store`: what the node's store calls the model.
    pub name: String,
}

impl From<[u8; 32]> for WeightsRef {
    fn from(sha256: [u8; 32]) -> Self {
        WeightsRef {
            sha256,
            name: String::new(),
        }
    }
}

impl WeightsRef {
    /// The upload of these weights (`len` bytes with `config_json`) from
    /// byte `from`: a resume of a broken upload when not 0.
    pub fn upload(&self, config_json: &str, len: u64, from: u64) -> UploadRequest {
        UploadRequest {
            config_json: config_json.to_owned(),
            weights_len: len,
            sha256: Some(self.sha256),
            offset: from,
            name: self.name.clone(),
        }
    }
}

/// What a store-aware push does next, from [`StoredPush`].
#[derive(Debug)]
pub enum PushStep {
    /// Ask the node which of the model's bytes it holds (`model_query`), and
    /// hand the inventory to [`StoredPush::inventory`].
    Query,
    /// Mount the stored copy (`model_use`) and hand the answer to [`StoredPush::used`].
    Use,
    /// Upload from byte `from` (a resume when not 0) and hand the answer to
    /// [`StoredPush::uploaded`].
    Upload {
        /// Where the weights are read from.
        from: u64,
    },
    /// Mounted.
    Done(Pushed),
}

/// The decisions of a store-aware push, written once for the blocking and
/// the async client: mount a stored copy with no weights sent, else resume a
/// broken upload where it stopped, else upload everything; on a node without
/// a store, upload everything. The client performs each [`PushStep`].
#[derive(Debug)]
pub struct StoredPush {
    len: u64,
    /// The inventory's answer, once asked.
    held: Option<donate_proto::message::StoredModel>,
    inventory: Option<ModelInventory>,
}

impl StoredPush {
    /// A push of `len` bytes; `store` is whether the node offers the store.
    pub fn start(len: u64, store: bool) -> (StoredPush, PushStep) {
        let plan = StoredPush {
            len,
            held: None,
            inventory: None,
        };
        let step = if store {
            PushStep::Query
        } else {
            PushStep::Upload { from: 0 }
        };
        (plan, step)
    }

    /// After [`PushStep::Query`].
    pub fn inventory(&mut self, inventory: ModelInventory) -> Result<PushStep> {
        let held = inventory.models.first().cloned().unwrap_or_default();
        let stored = held.stored;
        self.held = Some(held);
        self.inventory = Some(inventory);
        if stored {
            Ok(PushStep::Use)
        } else {
            self.upload()
        }
    }

    /// After [`PushStep::Use`]: its `model_status`.
    pub fn used(&mut self, answer: Result<ModelStatus>) -> Result<PushStep> {
        match answer {
            Ok(status) => Ok(PushStep::Done(Pushed::reused(status))),
            // Gone since (evicted, or dropped as corrupt): upload it.
            Err(Error::ModelRefused(_)) => self.upload(),
            Err(e) => Err(e),
        }
    }

    /// Where the upload starts, refused before a byte is sent when the store lacks room.
    fn upload(&mut self) -> Result<PushStep> {
        let from = self.held.as_ref().map_or(0, |h| h.resume_point(self.len));
        if let Some(inventory) = &self.inventory {
            inventory
                .check_room(self.len - from)
                .map_err(Error::ModelRefused)?;
        }
        Ok(PushStep::Upload { from })
    }

    /// After [`PushStep::Upload`] from `from`: its `model_status`.
    pub fn uploaded(&mut self, from: u64, answer: Result<ModelStatus>) -> Result<PushStep> {
        match answer {
            Ok(status) => Ok(PushStep::Done(Pushed::sent(status, self.len, from))),
            // The partial bytes expired meanwhile, say: start over once.
            Err(Error::ModelRefused(_)) if from > 0 => Ok(PushStep::Upload { from: 0 }),
            Err(Error::Refused(e))
                if from > 0 && e.error_code() == Some(ErrorCode::UploadRefused) =>
            {
                Ok(PushStep::Upload { from: 0 })
            }
            Err(e) => Err(e),
        }
    }
}

/// A connection to a donor node (ours or the Go one) over any async byte stream.
///
/// Get one with [`handshake`](Client::handshake) over a stream you connected,
/// or with a runtime adapter's `Client::connect` (donate-smol, donate-tokio).
///
/// For many jobs in flight, use [`send_infer`](Client::send_infer) /
/// [`send_prompt`](Client::send_prompt) and then [`wait`](Client::wait) for each.
pub struct Client<S> {
    stream: S,
    core: ClientConnection,
    read_buf: Vec<u8>,
    out: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// Reads the server's `hello` from a connected stream: a TCP or Unix
    /// socket, a TLS stream, a pipe pair, anything that moves bytes.
    pub async fn handshake(stream: S, config: ClientConfig) -> Result<Client<S>> {
        Client::start(stream, ClientConnection::new(config), false).await
    }

    /// Completes a secure handshake over a connected stream: the node must
    /// offer secure mode ([`ClientError::PlaintextNode`](donate_proto::ClientError::PlaintextNode)
    /// otherwise, with nothing sent) and present a key `secure` trusts. It has
    /// no timeout of its own: wrap it in your runtime's.
    pub async fn handshake_secure(
        stream: S,
        config: ClientConfig,
        secure: SecureClientConfig,
    ) -> Result<Client<S>> {
        Client::start(stream, ClientConnection::secure(config, secure), true).await
    }

    async fn start(stream: S, core: ClientConnection, secure: bool) -> Result<Client<S>> {
        let mut client = Client {
            stream,
            core,
            read_buf: vec![0; READ_BUFFER],
            out: Vec::new(),
        };
        while client.core.server_hello().is_none() {
            if secure {
                client.flush().await?;
            }
            client.read_some().await?;
        }
        if secure {
            // The handshake's last message: the node judges our key now.
            client.flush().await?;
        }
        Ok(client)
    }

    /// In secure mode, the node's authenticated key (to record it, for trust on first use).
    pub fn node_key(&self) -> Option<&PublicKey> {
        self.core.node_key()
    }

    /// The server's `hello`.
    pub fn hello(&self) -> &Hello {
        self.core.server_hello().expect("handshake waits for hello")
    }

    /// The stream the client talks over.
    pub fn get_ref(&self) -> &S {
        &self.stream
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
        reader: impl AsyncRead + Unpin,
        len: u64,
        sha256: Option<[u8; 32]>,
        progress: impl FnMut(u64),
    ) -> Result<ModelStatus> {
        let request = self.core.begin_upload(config_json, len, sha256)?;
        self.send_upload(request, reader, progress).await
    }

    /// The extensions in use on this connection (none with a v1 node).
    pub fn capabilities(&self) -> Capabilities {
        self.core.capabilities()
    }

    /// Mounts the model whose weights `reader` holds (`len` bytes hashing to
    /// `weights.sha256`), sending only what the node lacks: on a node with a
    /// model store it mounts a stored copy with no weights sent, or resumes a
    /// broken upload where it stopped (an upload gives the store
    /// `weights.name`); elsewhere it uploads everything.
    pub async fn push_stored(
        &mut self,
        config_json: &str,
        mut reader: impl AsyncRead + AsyncSeek + Unpin,
        len: u64,
        weights: impl Into<WeightsRef>,
        mut progress: impl FnMut(u64),
    ) -> Result<Pushed> {
        let weights = weights.into();
        let store = self.core.capabilities().contains(Capability::Store);
        let (mut plan, mut step) = StoredPush::start(len, store);
        loop {
            step = match step {
                PushStep::Query => plan.inventory(self.query_models(&[weights.sha256]).await?)?,
                PushStep::Use => {
                    let request = self.core.use_model(config_json, weights.sha256)?;
                    plan.used(answers::model_status(self.wait(request).await?))?
                }
                PushStep::Upload { from } => {
                    reader.seek(io::SeekFrom::Start(from)).await?;
                    let request =
                        self.core
                            .submit_upload(&weights.upload(config_json, len, from))?;
                    let answer = self.send_upload(request, &mut reader, &mut progress).await;
                    plan.uploaded(from, answer)?
                }
                PushStep::Done(pushed) => return Ok(pushed),
            };
        }
    }

    /// Extension `store`: which of these models (by weights SHA-256; none:
    /// every one) the node holds, and its store's free space.
    pub async fn query_models(&mut self, hashes: &[[u8; 32]]) -> Result<ModelInventory> {
        let request = self.core.query_models(hashes)?;
        answers::inventory(self.wait(request).await?)
    }

    /// Sends an upload's bytes from `reader` as the core asks for them and waits for its answer.
    async fn send_upload(
        &mut self,
        request: RequestId,
        mut reader: impl AsyncRead + Unpin,
        mut progress: impl FnMut(u64),
    ) -> Result<ModelStatus> {
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
        let request = self.send_infer(input_ids, max_tokens).await?;
        self.wait_infer(request).await
    }

    /// Runs a `prompt` job and waits for its result.
    pub async fn prompt(&mut self, prompt: &str, max_out: i64) -> Result<PromptResult> {
        let request = self.send_prompt(prompt, max_out).await?;
        self.wait_prompt(request).await
    }

    /// [`infer`](Client::infer) with sampling fields (extension `sampling`;
    /// refused with [`ApiMisuse::NotOffered`](donate_proto::ApiMisuse::NotOffered)
    /// by a node that does not offer it, nothing sent).
    pub async fn infer_with(
        &mut self,
        input_ids: &[i32],
        max_tokens: i64,
        sampling: &SamplingParams,
    ) -> Result<InferResult> {
        let request = self
            .send_infer_with(input_ids, max_tokens, sampling)
            .await?;
        self.wait_infer(request).await
    }

    /// [`prompt`](Client::prompt) with sampling fields, as [`infer_with`](Client::infer_with).
    pub async fn prompt_with(
        &mut self,
        prompt: &str,
        max_out: i64,
        sampling: &SamplingParams,
    ) -> Result<PromptResult> {
        let request = self.send_prompt_with(prompt, max_out, sampling).await?;
        self.wait_prompt(request).await
    }

    /// [`send_infer`](Client::send_infer) with sampling fields.
    pub async fn send_infer_with(
        &mut self,
        input_ids: &[i32],
        max_tokens: i64,
        sampling: &SamplingParams,
    ) -> Result<RequestId> {
        self.make_room().await?;
        Ok(self.core.infer_with(input_ids, max_tokens, sampling)?)
    }

    /// [`send_prompt`](Client::send_prompt) with sampling fields.
    pub async fn send_prompt_with(
        &mut self,
        prompt: &str,
        max_out: i64,
        sampling: &SamplingParams,
    ) -> Result<RequestId> {
        self.make_room().await?;
        Ok(self.core.prompt_with(prompt, max_out, sampling)?)
    }

    /// Queues a `prompt` job as `request` describes it (text or, extension
    /// `chat`, a conversation or raw text; sampling; its own `job_id`),
    /// keeping within the node's queue capacity. Its answer's `usage` comes
    /// from a node that agreed `chat`.
    pub async fn submit_prompt(&mut self, request: &PromptRequest) -> Result<RequestId> {
        self.make_room().await?;
        Ok(self.core.submit_prompt(request)?)
    }

    /// [`wait`](Client::wait), handing `request`'s partial output to
    /// `on_partial` as it arrives (extension `stream`: from a node that
    /// offers it; any other sends only the answer).
    pub async fn wait_streaming(
        &mut self,
        request: RequestId,
        mut on_partial: impl FnMut(PartialOutput),
    ) -> Result<Answer> {
        if !self.core.is_pending(request) {
            return Err(Error::NotPending(request));
        }
        self.flush().await?;
        loop {
            while let Some(partial) = self.core.take_partial(request) {
                on_partial(partial);
            }
            if let Some(answer) = self.core.take_answer(request) {
                return Ok(answer);
            }
            self.read_some().await?;
        }
    }

    /// Extension `cancel` (docs/PROTOCOL.md §10.2): asks the node to stop job
    /// `request` and sends it at once; its answer (`cancelled`, or its result
    /// if it finished first) still comes, to [`wait`](Client::wait) for or
    /// not. False when the job is not outstanding; [`Error::Misuse`] with
    /// `NotOffered` from a node that did not agree to `cancel`.
    pub async fn cancel(&mut self, request: RequestId) -> Result<bool> {
        let sent = self.core.cancel(request)?;
        self.flush().await?;
        Ok(sent)
    }

    /// Extension `stats` (docs/PROTOCOL.md §10.5): the node's counters;
    /// `None` from a node that did not agree to `stats`.
    pub async fn stats(&mut self) -> Result<Option<donate_proto::message::Stats>> {
        if !self
            .capabilities()
            .contains(donate_proto::Capability::Stats)
        {
            return Ok(None);
        }
        let request = self.core.stats()?;
        answers::stats(self.wait(request).await?).map(Some)
    }

    /// Asks for the queue's state; `None` from a node that does not answer it (the Go node).
    pub async fn queue_status(&mut self) -> Result<Option<QueueStatus>> {
        let request = self.core.queue_status()?;
        answers::queue_status(self.wait(request).await?)
    }

    /// Queues an `infer` job without waiting for its answer; see [`wait`](Client::wait).
    ///
    /// At most the node's `queue_capacity` (from its `hello`) requests are in
    /// flight: when that many are unanswered, this first sends what is queued
    /// and reads answers until one arrives, so pipelining any number of jobs
    /// never meets `queue_full` from this client alone (other clients share the
    /// node's queue). Answers read meanwhile wait for their own [`wait`](Client::wait).
    pub async fn send_infer(&mut self, input_ids: &[i32], max_tokens: i64) -> Result<RequestId> {
        self.make_room().await?;
        Ok(self.core.infer(input_ids, max_tokens)?)
    }

    /// Queues a `prompt` job without waiting for its answer, keeping within the
    /// node's queue capacity as [`send_infer`](Client::send_infer) does.
    pub async fn send_prompt(&mut self, prompt: &str, max_out: i64) -> Result<RequestId> {
        self.make_room().await?;
        Ok(self.core.prompt(prompt, max_out)?)
    }

    /// Queues an `infer` job under a `job_id` of the caller's choosing (unique
    /// among its requests in flight), within the node's queue capacity as
    /// [`send_infer`](Client::send_infer) does. Sent by the next
    /// [`flush`](Client::flush) or wait.
    pub async fn send_infer_as(
        &mut self,
        job_id: &str,
        input_ids: &[i32],
        max_tokens: i64,
    ) -> Result<RequestId> {
        self.make_room().await?;
        Ok(self.core.infer_as(job_id, input_ids, max_tokens)?)
    }

    /// Queues a `prompt` job under a `job_id` of the caller's choosing.
    pub async fn send_prompt_as(
        &mut self,
        job_id: &str,
        prompt: &str,
        max_out: i64,
    ) -> Result<RequestId> {
        self.make_room().await?;
        Ok(self.core.prompt_as(job_id, prompt, max_out)?)
    }

    /// [`send_infer_as`](Client::send_infer_as) with sampling fields (refused,
    /// nothing sent, by a node that did not offer `sampling`).
    pub async fn send_infer_as_with(
        &mut self,
        job_id: &str,
        input_ids: &[i32],
        max_tokens: i64,
        sampling: &SamplingParams,
    ) -> Result<RequestId> {
        self.make_room().await?;
        Ok(self
            .core
            .infer_as_with(job_id, input_ids, max_tokens, sampling)?)
    }

    /// [`send_prompt_as`](Client::send_prompt_as) with sampling fields.
    pub async fn send_prompt_as_with(
        &mut self,
        job_id: &str,
        prompt: &str,
        max_out: i64,
        sampling: &SamplingParams,
    ) -> Result<RequestId> {
        self.make_room().await?;
        Ok(self
            .core
            .prompt_as_with(job_id, prompt, max_out, sampling)?)
    }

    /// The next answer to any request, in the order they arrive (for a caller
    /// with many requests in flight). It only reads, so it is cancel-safe:
    /// [`flush`](Client::flush) what was queued first. Partial output is skipped.
    pub async fn next_answer(&mut self) -> Result<(RequestId, Answer)> {
        loop {
            while let Some(event) = self.core.poll_event() {
                match event {
                    ClientEvent::Answer { request, answer } => return Ok((request, answer)),
                    ClientEvent::Closing(frame) => return Err(Error::Refused(frame)),
                    ClientEvent::Connected(_) | ClientEvent::Partial { .. } => {}
                }
            }
            self.read_some().await?;
        }
    }

    /// [`wait`](Client::wait) for an `infer` job's result: a job that ran and
    /// failed is [`Error::InferFailed`], as [`infer`](Client::infer) gives it.
    pub async fn wait_infer(&mut self, request: RequestId) -> Result<InferResult> {
        answers::infer(self.wait(request).await?)
    }

    /// [`wait`](Client::wait) for a `prompt` job's result: a job that ran and
    /// failed is [`Error::PromptFailed`].
    pub async fn wait_prompt(&mut self, request: RequestId) -> Result<PromptResult> {
        answers::prompt(self.wait(request).await?)
    }

    /// Sends what is queued and waits for the answer to `request`.
    ///
    /// Fails at once with [`Error::NotPending`] when `request`'s answer was
    /// already taken or the request was never made on this connection.
    pub async fn wait(&mut self, request: RequestId) -> Result<Answer> {
        if !self.core.is_pending(request) {
            return Err(Error::NotPending(request));
        }
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

    /// Reads answers until fewer requests than the node's queue capacity are in flight.
    async fn make_room(&mut self) -> Result<()> {
        let window = window(self.hello());
        if self.core.outstanding() >= window {
            self.flush().await?;
            while self.core.outstanding() >= window {
                self.read_some().await?;
            }
        }
        Ok(())
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

/// How many requests a client keeps in flight on a node that said `hello`:
/// its queue capacity, or no limit from a node that announces none.
pub fn window(hello: &Hello) -> usize {
    usize::try_from(hello.queue_capacity)
        .ok()
        .filter(|&n| n > 0)
        .unwrap_or(usize::MAX)
}

/// A byte stream a runtime's client can hold whatever its transport (TCP,
/// Unix, yours): what `donate_smol::Client` and `donate_tokio::Client` talk over.
pub trait AsyncStream: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> AsyncStream for T {}

/// A boxed [`AsyncStream`].
pub type BoxStream = Box<dyn AsyncStream>;

/// Defines a runtime adapter's `Client`: the shared [`Client`] over a
/// [`BoxStream`], with `connect` / `connect_with` by address through `$dial`
/// (`async fn(&NodeAddr) -> io::Result<BoxStream>`). Its methods show in the
/// adapter's docs through `Deref`.
#[doc(hidden)]
#[macro_export]
macro_rules! runtime_client {
    ($(#[$meta:meta])* $dial:path) => {
        $(#[$meta])*
        pub struct Client($crate::Client<$crate::BoxStream>);

        impl Client {
            /// Connects to `addr` (`host:port`, `ip:port`, `unix:/path`, a
            /// `SocketAddr` or a [`NodeAddr`]($crate::NodeAddr)) and reads the node's `hello`.
            pub async fn connect(addr: impl $crate::ToNodeAddr) -> $crate::Result<Client> {
                Client::connect_with(addr, ::std::default::Default::default()).await
            }

            /// Connects with explicit client settings. A failed connection's
            /// error names the address ([`Error::Connect`]($crate::Error::Connect)).
            pub async fn connect_with(
                addr: impl $crate::ToNodeAddr,
                config: $crate::ClientConfig,
            ) -> $crate::Result<Client> {
                let stream = $crate::dial_named(addr, |a| async move { $dial(&a).await }).await?;
                Ok(Client($crate::Client::handshake(stream, config).await?))
            }

            /// Connects in secure mode: a Noise handshake with a node whose key
            /// `secure` trusts, or an error (a plain-text node is refused, nothing
            /// is sent to it). No timeout of its own: wrap it in your runtime's.
            pub async fn connect_secure(
                addr: impl $crate::ToNodeAddr,
                config: $crate::ClientConfig,
                secure: $crate::SecureClientConfig,
            ) -> $crate::Result<Client> {
                let stream = $crate::dial_named(addr, |a| async move { $dial(&a).await }).await?;
                Ok(Client(
                    $crate::Client::handshake_secure(stream, config, secure).await?,
                ))
            }
        }

        impl ::std::ops::Deref for Client {
            type Target = $crate::Client<$crate::BoxStream>;
            fn deref(&self) -> &Self::Target {
                &self.0
            }
        }

        impl ::std::ops::DerefMut for Client {
            fn deref_mut(&mut self) -> &mut Self::Target {
                &mut self.0
            }
        }
    };
}

/// Resolves `addr` and opens a stream with `dial`, naming the address in any error.
#[doc(hidden)]
pub async fn dial_named<F, Fut>(addr: impl crate::ToNodeAddr, dial: F) -> Result<BoxStream>
where
    F: FnOnce(crate::NodeAddr) -> Fut,
    Fut: std::future::Future<Output = io::Result<BoxStream>>,
{
    let node = addr.to_node_addr().map_err(|e| Error::Connect {
        addr: String::from("(unparsed address)"),
        source: e,
    })?;
    let name = node.to_string();
    dial(node)
        .await
        .map_err(|source| Error::Connect { addr: name, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use donate_proto::message::ErrorFrame;
    use donate_proto::ProtocolError;

    #[test]
    fn a_resume_the_store_refuses_starts_over_once() {
        let (mut plan, _) = StoredPush::start(100, true);
        let refused = |why: &str| {
            Err(Error::Refused(ErrorFrame::new(
                &ProtocolError::UploadRefused(why.to_owned()),
                None,
            )))
        };
        let gone = refused("cannot resume at byte 60: this node holds 0 bytes of the model");
        assert!(matches!(
            plan.uploaded(60, gone),
            Ok(PushStep::Upload { from: 0 })
        ));
        // From the start, a refusal is the answer.
        assert!(plan
            .uploaded(0, refused("the model store is full"))
            .is_err());
    }
}
