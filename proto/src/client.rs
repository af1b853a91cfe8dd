//! [`ClientConnection`]: the client side of one connection.
//!
//! It reads the server `hello` (anything else first is an error) and answers
//! with its own, sends requests, streams a model as chunks produced lazily
//! while the transmit buffer drains, and matches every answer to the request
//! it answers: results by `job_id`, error frames by `job_id` when present,
//! otherwise to the oldest outstanding request without a `job_id` (an upload
//! or a `queue_status`), and failing that to the oldest outstanding request
//! (as a Go node, whose errors never name a job, answers).

use std::collections::VecDeque;

use crate::capability::{Capabilities, Capability};
use crate::error::{ApiMisuse, ClientError};
use crate::frame::{FrameDecoder, DEFAULT_MAX_FRAME_LEN};
use crate::message::{
    encode_weights_chunk, valid_model_name, ChatMessage, ErrorFrame, Hello, Infer, InferResult,
    JobRef, Message, ModelBegin, ModelInventory, ModelQuery, ModelStatus, ModelUse, Prompt,
    PromptResult, QueuePosition, QueueStatus, Stats,
};
use crate::sampling::SamplingParams;
use crate::secure::{ClientSecure, PublicKey, SecureClientConfig};
use crate::upload::hex;

/// Client-side settings: start from [`Default`] and use the setters (one per
/// field, named after it).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientConfig {
    /// Largest frame body accepted from the server (default 64 MiB).
    pub max_frame_len: usize,
    /// Raw bytes per `weights_chunk` (default 1 MiB, as the Go client).
    pub chunk_size: usize,
    /// Upload chunks are produced only while fewer bytes than this wait to be sent (default 4 MiB).
    pub upload_window: usize,
    /// Extensions this client opts into when the node offers them (docs/PROTOCOL.md
    /// §10); default: those this client core implements.
    pub capabilities: Capabilities,
    /// Extension `deadline`: every job asks to be answered within this time
    /// (its `deadline_ms`) when the node agreed; default `None`.
    pub job_deadline: Option<std::time::Duration>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            chunk_size: 1024 * 1024,
            upload_window: 4 * 1024 * 1024,
            capabilities: IMPLEMENTED,
            job_deadline: None,
        }
    }
}

crate::config::setters!(ClientConfig {
    max_frame_len: usize,
    chunk_size: usize,
    upload_window: usize,
    capabilities: Capabilities,
    job_deadline: Option<std::time::Duration>,
});

/// The extensions this client core implements, opted into by default:
/// `sampling` (fields sent only when a job sets them) and `stream` (partial
/// results, [`ClientEvent::Partial`]; a caller that only waits for answers
/// never sees them, and [`ClientConnection::take_answer`] drops a job's
/// partials with its answer), and the rest only when called for.
const IMPLEMENTED: Capabilities = Capabilities::NONE
    .with(Capability::Store)
    .with(Capability::Cancel)
    .with(Capability::Deadline)
    .with(Capability::QueuePosition)
    .with(Capability::Stats)
    .with(Capability::Sampling)
    .with(Capability::Stream)
    .with(Capability::Chat);

/// A model upload to start with [`ClientConnection::submit_upload`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UploadRequest {
    /// The model's config, a JSON document.
    pub config_json: String,
    /// Bytes of weights in all.
    pub weights_len: u64,
    /// The SHA-256 of the weights, checked by the node when given.
    pub sha256: Option<[u8; 32]>,
    /// Extension `store`: resume a broken upload of which the node holds
    /// this many first bytes (its `model_inventory` said `partial`); needs
    /// `sha256`. 0 starts at the beginning.
    pub offset: u64,
    /// Extension `store`: the model's name for the node's store (the file
    /// name pushed), at most [`MAX_MODEL_NAME`](crate::message::MAX_MODEL_NAME)
    /// bytes of printable text; sent
    /// only to a node that agreed `store`.
    pub name: String,
}

/// A `prompt` job to send with [`ClientConnection::submit_prompt`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PromptRequest {
    /// The prompt text (empty when `messages` is set).
    pub prompt: String,
    /// Extension `chat`: a conversation for the node's chat template.
    pub messages: Vec<ChatMessage>,
    /// Extension `chat`: `prompt` goes to the model with no template.
    pub raw: bool,
    /// Output limit; 0 means the node's default.
    pub max_out: i64,
    /// Extension `sampling`: how tokens are picked.
    pub sampling: SamplingParams,
    /// The `job_id` to send, one not outstanding; `None` lets the client pick.
    pub job_id: Option<String>,
}

impl PromptRequest {
    /// A text prompt of up to `max_out` tokens, with the node's defaults.
    pub fn text(prompt: &str, max_out: i64) -> Self {
        PromptRequest {
            prompt: prompt.to_owned(),
            max_out,
            ..PromptRequest::default()
        }
    }

    /// A conversation for the node's chat template (extension `chat`).
    pub fn chat(messages: Vec<ChatMessage>, max_out: i64) -> Self {
        PromptRequest {
            messages,
            max_out,
            ..PromptRequest::default()
        }
    }
}

/// Names one request made on a [`ClientConnection`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(u64);

impl RequestId {
    /// The raw number: the n-th request of this connection.
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// To an upload's commit.
    ModelStatus(ModelStatus),
    /// To `infer`.
    Infer(InferResult),
    /// To `prompt`.
    Prompt(PromptResult),
    /// To a `queue_status` request.
    QueueStatus(QueueStatus),
    /// To a `model_query` (extension `store`).
    Inventory(ModelInventory),
    /// To a [`queue_position`](ClientConnection::queue_position) request
    /// (extension `queue_position`).
    QueuePosition(QueuePosition),
    /// To a [`stats`](ClientConnection::stats) request (extension `stats`).
    Stats(Stats),
    /// The request was refused.
    Error(ErrorFrame),
}

/// What the client core reports, from [`ClientConnection::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// The server's `hello` arrived; ours is queued. Requests may be made now.
    Connected(Hello),
    /// A request was answered.
    Answer {
        /// The request.
        request: RequestId,
        /// Its answer.
        answer: Answer,
    },
    /// An error frame that answers nothing: the server is about to close.
    Closing(ErrorFrame),
    /// Output of a job still running (extension `stream`), in order, before
    /// its answer: new token ids of an `infer`, new text of a `prompt`.
    Partial {
        /// The request (an `infer` or a `prompt`).
        request: RequestId,
        /// What it produced since its last partial.
        partial: PartialOutput,
    },
}

/// A running job's new output, from [`ClientEvent::Partial`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartialOutput {
    /// New token ids of an `infer` job (its result's `output_ids` end with them).
    Tokens(Vec<i32>),
    /// New text of a `prompt` job (joined in order, the result's `text`).
    Text(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Upload,
    Infer,
    Prompt,
    QueueStatus,
    Query,
    QueuePosition,
    Stats,
}

#[derive(Debug)]
struct Outstanding {
    request: RequestId,
    kind: Kind,
    job_id: String,
    /// A job's place in the queue, from the node's `queued`.
    position: Option<i64>,
}

#[derive(Debug)]
struct ClientUpload {
    request: RequestId,
    remaining: u64,
    next_index: i64,
}

/// The client side of one connection: bytes in, answers out, never any I/O.
#[derive(Debug)]
pub struct ClientConnection {
    config: ClientConfig,
    decoder: FrameDecoder,
    outbound: Vec<u8>,
    hello: Option<Hello>,
    outstanding: VecDeque<Outstanding>,
    upload: Option<ClientUpload>,
    events: VecDeque<ClientEvent>,
    next_request: u64,
    failed: Option<ClientError>,
    closing: Option<ErrorFrame>,
    /// Secure mode's layer under the framing.
    secure: Option<Box<ClientSecure>>,
    /// Extensions the node offered and this client opted into.
    agreed: Capabilities,
}

impl Default for ClientConnection {
    fn default() -> Self {
        ClientConnection::new(ClientConfig::default())
    }
}

impl ClientConnection {
    /// A client waiting for the server's `hello`.
    pub fn new(config: ClientConfig) -> Self {
        ClientConnection {
            decoder: FrameDecoder::new(config.max_frame_len),
            config,
            outbound: Vec::new(),
            hello: None,
            outstanding: VecDeque::new(),
            upload: None,
            events: VecDeque::new(),
            next_request: 0,
            failed: None,
            closing: None,
            secure: None,
            agreed: Capabilities::NONE,
        }
    }

    /// A client that speaks only secure mode: it completes a Noise handshake
    /// with a node whose key `secure` trusts before anything else, and fails
    /// with [`ClientError::PlaintextNode`] on a node that does not offer it.
    pub fn secure(config: ClientConfig, secure: SecureClientConfig) -> Self {
        let mut client = ClientConnection::new(config);
        client.secure = Some(Box::new(ClientSecure::new(secure)));
        client
    }

    /// In secure mode, the node's key once the handshake is done (to record
    /// it, for trust on first use).
    pub fn node_key(&self) -> Option<&PublicKey> {
        self.secure.as_ref()?.node()
    }

    /// The extensions in use on this connection: those the node's `hello`
    /// offered that this client wants ([`ClientConfig::capabilities`]).
    /// Empty with a v1 node, which is then sent exactly v1.
    pub fn capabilities(&self) -> Capabilities {
        self.agreed
    }

    /// The server's `hello`, once it arrived.
    pub fn server_hello(&self) -> Option<&Hello> {
        self.hello.as_ref()
    }

    /// Feeds bytes read from the server. An error is fatal: close the connection.
    pub fn handle_input(&mut self, data: &[u8]) -> Result<(), ClientError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let mut plain = Vec::new();
        let data = match &mut self.secure {
            None => data,
            Some(secure) => {
                if let Err(e) = secure.read(data, &mut plain) {
                    self.failed = Some(e.clone());
                    return Err(e);
                }
                &plain
            }
        };
        let mut decoder = std::mem::replace(&mut self.decoder, FrameDecoder::new(0));
        let mut failure = None;
        let fed = decoder.feed(data, |body| {
            if failure.is_none() {
                failure = self.handle_frame(body).err();
            }
        });
        self.decoder = decoder;
        fed?;
        if let Some(e) = failure {
            self.failed = Some(e.clone());
            return Err(e);
        }
        Ok(())
    }

    /// The error frame the server sent before closing, if it sent one.
    pub fn closing_error(&self) -> Option<&ErrorFrame> {
        self.closing.as_ref()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// Takes the answer to `request` if it has arrived, leaving other events
    /// queued (except `request`'s partials not taken yet: the answer holds
    /// their output).
    pub fn take_answer(&mut self, request: RequestId) -> Option<Answer> {
        let i = self
            .events
            .iter()
            .position(|e| matches!(e, ClientEvent::Answer { request: r, .. } if *r == request))?;
        let answer = match self.events.remove(i) {
            Some(ClientEvent::Answer { answer, .. }) => answer,
            _ => return None,
        };
        self.events
            .retain(|e| !matches!(e, ClientEvent::Partial { request: r, .. } if *r == request));
        Some(answer)
    }

    /// Takes `request`'s oldest partial output not taken yet (extension
    /// `stream`), leaving other events queued.
    pub fn take_partial(&mut self, request: RequestId) -> Option<PartialOutput> {
        let i = self
            .events
            .iter()
            .position(|e| matches!(e, ClientEvent::Partial { request: r, .. } if *r == request))?;
        match self.events.remove(i) {
            Some(ClientEvent::Partial { partial, .. }) => Some(partial),
            _ => None,
        }
    }

    /// Whether `request` is still to be answered, or answered and not yet
    /// taken: false for a request already taken (by [`take_answer`](Self::take_answer)
    /// or [`poll_event`](Self::poll_event)) or never made, so a caller can
    /// refuse to wait for an answer that will never come.
    pub fn is_pending(&self, request: RequestId) -> bool {
        self.outstanding.iter().any(|o| o.request == request)
            || self
                .events
                .iter()
                .any(|e| matches!(e, ClientEvent::Answer { request: r, .. } if *r == request))
    }

    /// Moves the bytes waiting to be sent into `out` (swapping when `out` is empty).
    pub fn poll_transmit(&mut self, out: &mut Vec<u8>) {
        if let Some(secure) = &mut self.secure {
            secure.transmit(&mut self.outbound, out);
        } else if out.is_empty() {
            std::mem::swap(out, &mut self.outbound);
        } else {
            out.append(&mut self.outbound);
        }
    }

    /// Bytes waiting to be sent.
    pub fn pending_transmit(&self) -> usize {
        self.outbound.len() + self.secure.as_ref().map_or(0, |s| s.pending())
    }

    /// Requests sent and not yet answered.
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// Sends an `infer` job under a `job_id` of the client's choosing (one
    /// not outstanding on this connection, so its answer can be told apart).
    pub fn infer_as(
        &mut self,
        job_id: &str,
        input_ids: &[i32],
        max_tokens: i64,
    ) -> Result<RequestId, ClientError> {
        self.infer_as_with(job_id, input_ids, max_tokens, &SamplingParams::default())
    }

    /// Sends a `prompt` job under a `job_id` of the client's choosing (see [`infer_as`](Self::infer_as)).
    pub fn prompt_as(
        &mut self,
        job_id: &str,
        prompt: &str,
        max_out: i64,
    ) -> Result<RequestId, ClientError> {
        self.prompt_as_with(job_id, prompt, max_out, &SamplingParams::default())
    }

    /// [`infer_as`](Self::infer_as) with sampling fields, refused as by
    /// [`infer_with`](Self::infer_with) when the node did not offer `sampling`.
    pub fn infer_as_with(
        &mut self,
        job_id: &str,
        input_ids: &[i32],
        max_tokens: i64,
        sampling: &SamplingParams,
    ) -> Result<RequestId, ClientError> {
        self.check_sampling(sampling)?;
        let request = self.request_as(Kind::Infer, job_id)?;
        self.send(&Message::Infer(Infer {
            job_id: job_id.to_owned(),
            input_ids: input_ids.to_vec(),
            max_tokens,
            deadline_ms: self.deadline_ms(),
            sampling: sampling.clone(),
        }));
        Ok(request)
    }

    /// [`prompt_as`](Self::prompt_as) with sampling fields, as [`infer_as_with`](Self::infer_as_with).
    pub fn prompt_as_with(
        &mut self,
        job_id: &str,
        prompt: &str,
        max_out: i64,
        sampling: &SamplingParams,
    ) -> Result<RequestId, ClientError> {
        self.submit_prompt(&PromptRequest {
            job_id: Some(job_id.to_owned()),
            sampling: sampling.clone(),
            ..PromptRequest::text(prompt, max_out)
        })
    }

    /// Sends a `prompt` job as `request` describes it. Sampling fields need a
    /// node that offered `sampling`, `messages` or `raw` one that offered
    /// `chat` (else [`ApiMisuse::NotOffered`], nothing sent); its answer is
    /// [`Answer::Prompt`] (with usage from a `chat` node) or [`Answer::Error`].
    pub fn submit_prompt(&mut self, request: &PromptRequest) -> Result<RequestId, ClientError> {
        self.check_sampling(&request.sampling)?;
        if (!request.messages.is_empty() || request.raw) && !self.agreed.contains(Capability::Chat)
        {
            return Err(ClientError::Misuse(ApiMisuse::NotOffered(
                Capability::Chat.as_str(),
            )));
        }
        let (id, job_id) = match &request.job_id {
            Some(job_id) => (self.request_as(Kind::Prompt, job_id)?, job_id.clone()),
            None => self.request(Kind::Prompt, "p")?,
        };
        self.send(&Message::Prompt(Prompt {
            job_id,
            prompt: request.prompt.clone(),
            max_out: request.max_out,
            deadline_ms: self.deadline_ms(),
            sampling: request.sampling.clone(),
            messages: request.messages.clone(),
            raw: request.raw,
        }));
        Ok(id)
    }

    /// Sends an `infer` job; its answer is [`Answer::Infer`] or [`Answer::Error`].
    pub fn infer(&mut self, input_ids: &[i32], max_tokens: i64) -> Result<RequestId, ClientError> {
        self.infer_with(input_ids, max_tokens, &SamplingParams::default())
    }

    /// Sends a `prompt` job; its answer is [`Answer::Prompt`] or [`Answer::Error`].
    pub fn prompt(&mut self, prompt: &str, max_out: i64) -> Result<RequestId, ClientError> {
        self.prompt_with(prompt, max_out, &SamplingParams::default())
    }

    /// [`infer`](Self::infer) with sampling fields (extension `sampling`).
    /// Fields set for a node that did not offer `sampling` (a v1 node would
    /// ignore them and answer greedily) fail with
    /// [`ApiMisuse::NotOffered`], nothing sent.
    pub fn infer_with(
        &mut self,
        input_ids: &[i32],
        max_tokens: i64,
        sampling: &SamplingParams,
    ) -> Result<RequestId, ClientError> {
        self.check_sampling(sampling)?;
        let (request, job_id) = self.request(Kind::Infer, "j")?;
        self.send(&Message::Infer(Infer {
            job_id,
            input_ids: input_ids.to_vec(),
            max_tokens,
            deadline_ms: self.deadline_ms(),
            sampling: sampling.clone(),
        }));
        Ok(request)
    }

    /// [`prompt`](Self::prompt) with sampling fields, as [`infer_with`](Self::infer_with).
    pub fn prompt_with(
        &mut self,
        prompt: &str,
        max_out: i64,
        sampling: &SamplingParams,
    ) -> Result<RequestId, ClientError> {
        self.submit_prompt(&PromptRequest {
            sampling: sampling.clone(),
            ..PromptRequest::text(prompt, max_out)
        })
    }

    /// Extension `cancel`: asks the node to stop job `request` (queued or
    /// running). Its answer still comes, as a result with code `cancelled`
    /// (or its real result, if it finished first). Returns false when the job
    /// is not outstanding (already answered, or not a job).
    pub fn cancel(&mut self, request: RequestId) -> Result<bool, ClientError> {
        if !self.agreed.contains(Capability::Cancel) {
            return Err(ClientError::Misuse(ApiMisuse::NotOffered("cancel")));
        }
        let Some(job) = self
            .outstanding
            .iter()
            .find(|o| o.request == request && matches!(o.kind, Kind::Infer | Kind::Prompt))
        else {
            return Ok(false);
        };
        let job_id = job.job_id.clone();
        self.send(&Message::Cancel(JobRef { job_id }));
        Ok(true)
    }

    /// Extension `queue_position`: asks where job `request` is in the node's
    /// queue; the answer is [`Answer::QueuePosition`]. `None` when the job is
    /// not outstanding.
    pub fn queue_position(&mut self, request: RequestId) -> Result<Option<RequestId>, ClientError> {
        if !self.agreed.contains(Capability::QueuePosition) {
            return Err(ClientError::Misuse(ApiMisuse::NotOffered("queue_position")));
        }
        let Some(job) = self
            .outstanding
            .iter()
            .find(|o| o.request == request && matches!(o.kind, Kind::Infer | Kind::Prompt))
        else {
            return Ok(None);
        };
        let job_id = job.job_id.clone();
        let (asked, _) = self.request(Kind::QueuePosition, "")?;
        if let Some(o) = self.outstanding.iter_mut().find(|o| o.request == asked) {
            o.job_id.clone_from(&job_id);
        }
        self.send(&Message::QueuePositionRequest(JobRef { job_id }));
        Ok(Some(asked))
    }

    /// Extension `queue_position`: job `request`'s place in the queue as the
    /// node last said in its `queued` (1 = next to run), while it is outstanding.
    pub fn position(&self, request: RequestId) -> Option<i64> {
        self.outstanding
            .iter()
            .find(|o| o.request == request)?
            .position
    }

    /// Extension `stats`: asks for the node's counters; the answer is
    /// [`Answer::Stats`].
    pub fn stats(&mut self) -> Result<RequestId, ClientError> {
        if !self.agreed.contains(Capability::Stats) {
            return Err(ClientError::Misuse(ApiMisuse::NotOffered("stats")));
        }
        let (request, _) = self.request(Kind::Stats, "")?;
        self.send(&Message::StatsRequest);
        Ok(request)
    }

    /// The `deadline_ms` jobs carry: only to a node that agreed `deadline`.
    fn deadline_ms(&self) -> i64 {
        match self.config.job_deadline {
            Some(d) if self.agreed.contains(Capability::Deadline) => {
                i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
            }
            _ => 0,
        }
    }

    /// Sampling fields go only to a node that agreed `sampling`.
    fn check_sampling(&self, sampling: &SamplingParams) -> Result<(), ClientError> {
        if self.hello.is_none() {
            return Err(ClientError::Misuse(ApiMisuse::NotConnected));
        }
        if !sampling.is_empty() && !self.agreed.contains(Capability::Sampling) {
            return Err(ClientError::Misuse(ApiMisuse::NotOffered(
                Capability::Sampling.as_str(),
            )));
        }
        Ok(())
    }

    /// Asks for the queue's state; the answer is [`Answer::QueueStatus`], or
    /// [`Answer::Error`] from a node that does not know the request (the Go node).
    pub fn queue_status(&mut self) -> Result<RequestId, ClientError> {
        let (request, _) = self.request(Kind::QueueStatus, "")?;
        self.send(&Message::QueueStatusRequest);
        Ok(request)
    }

    /// Starts a model upload of `weights_len` bytes. Feed the bytes with
    /// [`upload_chunk`](Self::upload_chunk) as [`upload_wants`](Self::upload_wants)
    /// asks; the commit goes out after the last byte. The answer is
    /// [`Answer::ModelStatus`], or [`Answer::Error`] if the server refused the upload.
    /// A `weights_len` above `i64::MAX` cannot be announced: [`ApiMisuse::UploadTooLarge`].
    pub fn begin_upload(
        &mut self,
        config_json: &str,
        weights_len: u64,
        sha256: Option<[u8; 32]>,
    ) -> Result<RequestId, ClientError> {
        self.submit_upload(&UploadRequest {
            config_json: config_json.to_owned(),
            weights_len,
            sha256,
            ..UploadRequest::default()
        })
    }

    /// Extension `store`: resumes a broken upload of the model whose weights
    /// hash to `sha256`, of which the node holds the first `offset` bytes (its
    /// `model_inventory` said `partial`). Feed the bytes from `offset` on, as
    /// for [`begin_upload`](Self::begin_upload). Refused with
    /// [`ApiMisuse::NotOffered`] unless the node offered `store`.
    pub fn resume_upload(
        &mut self,
        config_json: &str,
        weights_len: u64,
        sha256: [u8; 32],
        offset: u64,
    ) -> Result<RequestId, ClientError> {
        self.submit_upload(&UploadRequest {
            config_json: config_json.to_owned(),
            weights_len,
            sha256: Some(sha256),
            offset,
            ..UploadRequest::default()
        })
    }

    /// Starts the upload `upload` describes, as [`begin_upload`](Self::begin_upload)
    /// (and [`resume_upload`](Self::resume_upload) with an `offset`). Its
    /// `name` goes only to a node that agreed `store`; a name the node would
    /// refuse is [`ApiMisuse::BadModelName`].
    pub fn submit_upload(&mut self, upload: &UploadRequest) -> Result<RequestId, ClientError> {
        let UploadRequest {
            config_json,
            weights_len,
            sha256,
            offset,
            name,
        } = upload;
        let (weights_len, offset) = (*weights_len, *offset);
        if offset > 0 {
            self.require(Capability::Store)?;
            if sha256.is_none() {
                return Err(ClientError::Misuse(ApiMisuse::ResumeWithoutSha256));
            }
            if offset > weights_len {
                return Err(ClientError::Misuse(ApiMisuse::UploadOverflow {
                    len: usize::try_from(offset).unwrap_or(usize::MAX),
                    remaining: weights_len,
                }));
            }
        }
        if !valid_model_name(name) {
            return Err(ClientError::Misuse(ApiMisuse::BadModelName));
        }
        // One upload at a time, until it is answered: a refusal carries no
        // job_id, so two in flight could not be told apart.
        if self.upload.is_some() || self.outstanding.iter().any(|o| o.kind == Kind::Upload) {
            return Err(ClientError::Misuse(ApiMisuse::UploadInProgress));
        }
        let wire_len = i64::try_from(weights_len)
            .map_err(|_| ClientError::Misuse(ApiMisuse::UploadTooLarge(weights_len)))?;
        let (request, _) = self.request(Kind::Upload, "")?;
        let store = self.agreed.contains(Capability::Store);
        self.send(&Message::ModelBegin(ModelBegin {
            config_json: config_json.clone(),
            weights_len: wire_len,
            weights_sha256: sha256.map(|h| hex(&h)).unwrap_or_default(),
            offset: offset as i64,
            name: if store { name.clone() } else { String::new() },
        }));
        self.upload = Some(ClientUpload {
            request,
            remaining: weights_len - offset,
            next_index: 0,
        });
        if weights_len == offset {
            self.finish_upload();
        }
        Ok(request)
    }

    /// Extension `store`: asks which of these models (by the SHA-256 of their
    /// weights; none: every one) the node holds. The answer is
    /// [`Answer::Inventory`], one entry per hash in order.
    pub fn query_models(&mut self, hashes: &[[u8; 32]]) -> Result<RequestId, ClientError> {
        self.require(Capability::Store)?;
        let (request, _) = self.request(Kind::Query, "")?;
        self.send(&Message::ModelQuery(ModelQuery {
            hashes: hashes.iter().map(|h| hex(h)).collect(),
        }));
        Ok(request)
    }

    /// Extension `store`: mounts the stored model whose weights hash to
    /// `sha256`, with `config_json`, sending no weights. The answer is
    /// [`Answer::ModelStatus`], as for an upload; `ok: false` when the node
    /// does not hold it (upload it then).
    pub fn use_model(
        &mut self,
        config_json: &str,
        sha256: [u8; 32],
    ) -> Result<RequestId, ClientError> {
        self.require(Capability::Store)?;
        if self.upload.is_some() || self.outstanding.iter().any(|o| o.kind == Kind::Upload) {
            return Err(ClientError::Misuse(ApiMisuse::UploadInProgress));
        }
        let (request, _) = self.request(Kind::Upload, "")?;
        self.send(&Message::ModelUse(ModelUse {
            config_json: config_json.to_owned(),
            weights_sha256: hex(&sha256),
        }));
        Ok(request)
    }

    /// Fails unless this connection agreed `capability`.
    fn require(&self, capability: Capability) -> Result<(), ClientError> {
        if self.hello.is_none() {
            return Err(ClientError::Misuse(ApiMisuse::NotConnected));
        }
        if self.agreed.contains(capability) {
            Ok(())
        } else {
            Err(ClientError::Misuse(ApiMisuse::NotOffered(
                capability.as_str(),
            )))
        }
    }

    /// How many raw bytes the next [`upload_chunk`](Self::upload_chunk) should
    /// carry: 0 when no upload is sending or the transmit buffer is full enough.
    pub fn upload_wants(&self) -> usize {
        match &self.upload {
            Some(u) if self.outbound.len() < self.config.upload_window => {
                u.remaining.min(self.config.chunk_size as u64) as usize
            }
            _ => 0,
        }
    }

    /// Whether an upload is still sending chunks.
    pub fn is_uploading(&self) -> bool {
        self.upload.is_some()
    }

    /// Sends the next slice of the weights as one `weights_chunk`; after the
    /// last byte, `model_commit` follows.
    pub fn upload_chunk(&mut self, data: &[u8]) -> Result<(), ClientError> {
        let remaining = self.upload.as_ref().map_or(0, |u| u.remaining);
        if data.is_empty() || data.len() as u64 > remaining {
            return Err(ClientError::Misuse(ApiMisuse::UploadOverflow {
                len: data.len(),
                remaining,
            }));
        }
        let upload = self.upload.as_mut().expect("checked above");
        upload.remaining -= data.len() as u64;
        let last = upload.remaining == 0;
        encode_weights_chunk(upload.next_index, last, data, &mut self.outbound);
        upload.next_index += 1;
        if last {
            self.finish_upload();
        }
        Ok(())
    }

    fn finish_upload(&mut self) {
        self.upload = None;
        self.send(&Message::ModelCommit);
    }

    fn request(&mut self, kind: Kind, prefix: &str) -> Result<(RequestId, String), ClientError> {
        if self.hello.is_none() {
            return Err(ClientError::Misuse(ApiMisuse::NotConnected));
        }
        self.next_request += 1;
        let request = RequestId(self.next_request);
        let job_id = if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}{}", self.next_request)
        };
        self.outstanding.push_back(Outstanding {
            request,
            kind,
            job_id: job_id.clone(),
            position: None,
        });
        Ok((request, job_id))
    }

    fn request_as(&mut self, kind: Kind, job_id: &str) -> Result<RequestId, ClientError> {
        if job_id.is_empty() || self.outstanding.iter().any(|o| o.job_id == job_id) {
            return Err(ClientError::Misuse(ApiMisuse::JobIdInUse(
                job_id.to_owned(),
            )));
        }
        if self.hello.is_none() {
            return Err(ClientError::Misuse(ApiMisuse::NotConnected));
        }
        self.next_request += 1;
        let request = RequestId(self.next_request);
        self.outstanding.push_back(Outstanding {
            request,
            kind,
            job_id: job_id.to_owned(),
            position: None,
        });
        Ok(request)
    }

    fn send(&mut self, msg: &Message<'_>) {
        msg.encode(&mut self.outbound);
    }

    fn handle_frame(&mut self, body: &[u8]) -> Result<(), ClientError> {
        let msg = Message::parse(body).map_err(|e| ClientError::BadMessage(e.to_string()))?;
        if self.hello.is_none() {
            return match msg {
                Message::Hello(hello) => {
                    self.agreed = Capabilities::from_names(&hello.capabilities)
                        .intersect(self.config.capabilities)
                        .without(Capability::Secure);
                    self.send(&Message::Hello(Hello {
                        mode: hello.mode.clone(),
                        role: "client".to_owned(),
                        local_lm_path: String::new(),
                        queue_capacity: 0,
                        capabilities: self.agreed.names(),
                    }));
                    self.hello = Some(hello.clone());
                    self.events.push_back(ClientEvent::Connected(hello));
                    Ok(())
                }
                Message::Error(e) => Err(ClientError::Refused(e.error)),
                other => Err(ClientError::NoHello(other.kind().to_owned())),
            };
        }
        let (position, answer) = match msg {
            Message::ModelStatus(m) => (self.find(Kind::Upload, None), Answer::ModelStatus(m)),
            Message::InferResult(m) => (self.find(Kind::Infer, Some(&m.job_id)), Answer::Infer(m)),
            Message::PromptResult(m) => {
                (self.find(Kind::Prompt, Some(&m.job_id)), Answer::Prompt(m))
            }
            Message::QueueStatus(m) => (self.find(Kind::QueueStatus, None), Answer::QueueStatus(m)),
            Message::ModelInventory(m) => (self.find(Kind::Query, None), Answer::Inventory(m)),
            Message::QueuePosition(m) if self.agreed.contains(Capability::QueuePosition) => (
                self.find(Kind::QueuePosition, Some(&m.job_id)),
                Answer::QueuePosition(m),
            ),
            Message::Stats(m) if self.agreed.contains(Capability::Stats) => {
                (self.find(Kind::Stats, None), Answer::Stats(m))
            }
            Message::Queued(m) if self.agreed.contains(Capability::QueuePosition) => {
                // Not an answer: a job's place, kept with the job.
                let job = self
                    .outstanding
                    .iter_mut()
                    .find(|o| o.job_id == m.job_id && matches!(o.kind, Kind::Infer | Kind::Prompt));
                if let Some(job) = job {
                    job.position = Some(m.position);
                }
                return Ok(());
            }
            Message::InferPartial(m) => {
                return self.on_partial(
                    Kind::Infer,
                    &m.job_id,
                    PartialOutput::Tokens(m.output_ids),
                );
            }
            Message::PromptPartial(m) => {
                return self.on_partial(Kind::Prompt, &m.job_id, PartialOutput::Text(m.text));
            }
            Message::Error(e) => {
                let by_id = (!e.job_id.is_empty())
                    .then(|| {
                        self.outstanding
                            .iter()
                            .position(|o| o.job_id == e.job_id && o.kind != Kind::QueuePosition)
                    })
                    .flatten();
                // Without a job_id it answers a request that has none (an upload,
                // a queue_status): our node names the job of every job error, so a
                // pipelined job must not take an upload's refusal.
                let without_id = || self.outstanding.iter().position(|o| o.job_id.is_empty());
                let oldest = (!self.outstanding.is_empty()).then_some(0);
                match by_id.or_else(without_id).or(oldest) {
                    Some(i) => (Some(i), Answer::Error(e)),
                    None => {
                        self.closing = Some(e.clone());
                        self.events.push_back(ClientEvent::Closing(e));
                        return Ok(());
                    }
                }
            }
            other => return Err(ClientError::Unexpected(other.kind().to_owned())),
        };
        let Some(i) = position else {
            return Err(ClientError::Unexpected(kind_of(&answer).to_owned()));
        };
        let answered = self.outstanding.remove(i).expect("position is in range");
        if answered.kind == Kind::Upload
            && self
                .upload
                .as_ref()
                .is_some_and(|u| u.request == answered.request)
        {
            // Refused mid-stream: the server ignores the rest, so stop sending it.
            self.upload = None;
        }
        self.events.push_back(ClientEvent::Answer {
            request: answered.request,
            answer,
        });
        Ok(())
    }

    /// A partial result: only from a node that agreed `stream`, and only for
    /// a job still outstanding.
    fn on_partial(
        &mut self,
        kind: Kind,
        job_id: &str,
        partial: PartialOutput,
    ) -> Result<(), ClientError> {
        let kind_name = match kind {
            Kind::Infer => "infer_partial",
            _ => "prompt_partial",
        };
        if !self.agreed.contains(Capability::Stream) {
            return Err(ClientError::Unexpected(kind_name.to_owned()));
        }
        let Some(i) = self.find(kind, Some(job_id)) else {
            return Err(ClientError::Unexpected(kind_name.to_owned()));
        };
        let request = self.outstanding[i].request;
        self.events
            .push_back(ClientEvent::Partial { request, partial });
        Ok(())
    }

    fn find(&self, kind: Kind, job_id: Option<&str>) -> Option<usize> {
        self.outstanding
            .iter()
            .position(|o| o.kind == kind && job_id.is_none_or(|id| o.job_id == id))
    }
}

fn kind_of(answer: &Answer) -> &'static str {
    match answer {
        Answer::ModelStatus(_) => "model_status",
        Answer::Infer(_) => "infer_result",
        Answer::Prompt(_) => "prompt_result",
        Answer::QueueStatus(_) => "queue_status",
        Answer::Inventory(_) => "model_inventory",
        Answer::QueuePosition(_) => "queue_position",
        Answer::Stats(_) => "stats",
        Answer::Error(_) => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_pending_until_its_answer_is_taken() {
        let mut client = ClientConnection::default();
        let mut hello = Vec::new();
        Message::Hello(Hello {
            mode: "model_push".into(),
            role: "server".into(),
            ..Hello::default()
        })
        .encode(&mut hello);
        client.handle_input(&hello).unwrap();
        let request = client.infer(&[1], 1).unwrap();
        assert!(client.is_pending(request), "sent, not answered");
        let mut result = Vec::new();
        Message::InferResult(InferResult {
            job_id: format!("j{}", request.as_u64()),
            ok: true,
            ..InferResult::default()
        })
        .encode(&mut result);
        client.handle_input(&result).unwrap();
        assert!(client.is_pending(request), "answered, not taken");
        assert!(client.take_answer(request).is_some());
        assert!(!client.is_pending(request), "taken");
        assert!(!client.is_pending(RequestId(99)), "never made");
    }

    fn connected(capabilities: &[&str]) -> ClientConnection {
        let mut client = ClientConnection::default();
        let mut hello = Vec::new();
        Message::Hello(Hello {
            mode: "local_lm".into(),
            role: "server".into(),
            capabilities: capabilities.iter().map(|c| (*c).to_owned()).collect(),
            ..Hello::default()
        })
        .encode(&mut hello);
        client.handle_input(&hello).unwrap();
        client
    }

    fn partial(job_id: &str, text: &str) -> Vec<u8> {
        let mut out = Vec::new();
        Message::PromptPartial(crate::message::PromptPartial {
            job_id: job_id.into(),
            text: text.into(),
        })
        .encode(&mut out);
        out
    }

    #[test]
    fn partials_are_events_of_their_request_and_go_with_its_answer() {
        let mut client = connected(&["stream", "sampling"]);
        let a = client.prompt("a", 0).unwrap();
        let b = client.prompt("b", 0).unwrap();
        client.handle_input(&partial("p1", "x")).unwrap();
        client.handle_input(&partial("p2", "y")).unwrap();
        client.handle_input(&partial("p1", "z")).unwrap();
        assert_eq!(
            client.take_partial(a),
            Some(PartialOutput::Text("x".into()))
        );
        let mut result = Vec::new();
        Message::PromptResult(PromptResult {
            job_id: "p1".into(),
            ok: true,
            text: "xz".into(),
            ..PromptResult::default()
        })
        .encode(&mut result);
        client.handle_input(&result).unwrap();
        assert!(client.take_answer(a).is_some());
        assert_eq!(client.take_partial(a), None, "dropped with the answer");
        assert_eq!(
            client.take_partial(b),
            Some(PartialOutput::Text("y".into()))
        );
        // A partial for no outstanding job is a protocol error.
        assert!(client.handle_input(&partial("p9", "?")).is_err());
    }

    #[test]
    fn extension_frames_and_fields_need_the_nodes_offer() {
        let mut client = connected(&[]);
        assert_eq!(client.capabilities(), Capabilities::NONE);
        let sampling = SamplingParams {
            seed: Some(1),
            ..SamplingParams::default()
        };
        assert_eq!(
            client.prompt_with("a", 0, &sampling),
            Err(ClientError::Misuse(ApiMisuse::NotOffered("sampling")))
        );
        assert_eq!(client.outstanding(), 0, "nothing sent");
        client.prompt("a", 0).unwrap();
        assert!(
            client.handle_input(&partial("p1", "x")).is_err(),
            "a partial from a node that did not agree stream"
        );
    }

    #[test]
    fn a_client_chosen_job_id_is_used_once_at_a_time() {
        let mut client = ClientConnection::default();
        let mut hello = Vec::new();
        Message::Hello(Hello {
            mode: "model_push".into(),
            role: "server".into(),
            ..Hello::default()
        })
        .encode(&mut hello);
        client.handle_input(&hello).unwrap();
        let request = client.infer_as("batch-7", &[1], 1).unwrap();
        assert_eq!(
            client.prompt_as("batch-7", "hi", 1),
            Err(ClientError::Misuse(ApiMisuse::JobIdInUse("batch-7".into())))
        );
        assert!(client.infer_as("", &[1], 1).is_err());
        let mut sent = Vec::new();
        client.poll_transmit(&mut sent);
        assert!(String::from_utf8_lossy(&sent).contains(r#""job_id":"batch-7""#));
        let mut result = Vec::new();
        Message::InferResult(InferResult {
            job_id: "batch-7".into(),
            ok: true,
            ..InferResult::default()
        })
        .encode(&mut result);
        client.handle_input(&result).unwrap();
        assert!(
            matches!(client.take_answer(request), Some(Answer::Infer(r)) if r.job_id == "batch-7")
        );
        assert!(
            client.infer_as("batch-7", &[1], 1).is_ok(),
            "free again once answered"
        );
    }
}
