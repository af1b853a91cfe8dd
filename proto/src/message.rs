//! The eleven message types of docs/PROTOCOL.md as typed values.
//!
//! Encoding writes `v` and `type` first, then the fields in the order the Go
//! implementation writes them, with its omitempty rules; the `error` frame comes
//! out with sorted keys, as Go writes it from a map. Decoding ignores unknown
//! fields and reads missing (or `null`) fields as zero values.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::sync::LazyLock;

use base64::engine::general_purpose::GeneralPurposeConfig;
use base64::engine::simd::Simd;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::code::ErrorCode;
use crate::error::ProtocolError;
use crate::frame::encode_frame_with;
use crate::sampling::SamplingParams;

/// The protocol version this crate speaks.
pub const VERSION: i64 = 1;

/// The base64 engine for `data_b64`: standard alphabet, canonical padding, SIMD where available.
pub(crate) static BASE64: LazyLock<Simd> =
    LazyLock::new(|| Simd::standard(GeneralPurposeConfig::new()));

/// What a node offers: model upload and inference, or prompts to a local language model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Mode {
    /// Clients push a model and send `infer` jobs.
    #[default]
    ModelPush,
    /// Clients send `prompt` jobs to the node's local language model.
    LocalLm,
}

impl Mode {
    /// The wire spelling: `model_push` or `local_lm`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::ModelPush => "model_push",
            Mode::LocalLm => "local_lm",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "model_push" => Ok(Mode::ModelPush),
            "local_lm" => Ok(Mode::LocalLm),
            other => Err(format!(
                "unknown mode {other:?} (want model_push or local_lm)"
            )),
        }
    }
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `hello`: the server's greeting, then the client's.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Hello {
    /// `model_push` or `local_lm` (see [`Mode`]); kept as a string to carry what a peer sent.
    pub mode: String,
    /// `server` or `client`.
    pub role: String,
    /// Informational path of a `local_lm` node's model.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub local_lm_path: String,
    /// The server's job queue capacity.
    #[serde(skip_serializing_if = "is_zero")]
    pub queue_capacity: i64,
    /// Extensions the sender understands (docs/PROTOCOL.md, Extensions);
    /// left out when empty, so a v1 hello stays byte for byte v1.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
}

/// `model_begin`: starts a model upload.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct ModelBegin {
    /// A JSON document carried as a string.
    pub config_json: String,
    /// Total raw bytes of weights to follow.
    pub weights_len: i64,
    /// Lowercase hex SHA-256 of the weights, or empty.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub weights_sha256: String,
    /// Extension `store`: the upload resumes a broken one, whose first
    /// `offset` bytes the node holds; chunks carry the rest. Left out when 0.
    #[serde(skip_serializing_if = "is_zero")]
    pub offset: i64,
    /// Extension `store`: what the model is called (the file name the client
    /// pushed), kept beside it and listed by `model_inventory`; at most
    /// [`MAX_MODEL_NAME`] bytes of printable text. Left out when empty.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
}

/// Longest model name (`model_begin`'s `name`, extension `store`), in bytes.
pub const MAX_MODEL_NAME: usize = 255;

/// Whether `name` may be a model's name: at most [`MAX_MODEL_NAME`] bytes, no
/// control characters (it is shown on terminals).
pub fn valid_model_name(name: &str) -> bool {
    name.len() <= MAX_MODEL_NAME && !name.chars().any(char::is_control)
}

/// `model_query` (extension `store`): which of these models the node holds.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct ModelQuery {
    /// Lowercase hex SHA-256s of model weights; empty asks for every model held.
    pub hashes: Vec<String>,
}

/// `model_inventory` (extension `store`): the answer to `model_query`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct ModelInventory {
    /// One entry per hash asked for, in order (or every model held).
    pub models: Vec<StoredModel>,
    /// Bytes a new upload may take in the store (the cap less what is pinned).
    pub store_free: i64,
}

/// One model in a `model_inventory`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct StoredModel {
    /// Lowercase hex SHA-256 of the weights.
    pub sha256: String,
    /// Whether the node holds every byte: `model_use` mounts it.
    pub stored: bool,
    /// Size of the weights in bytes (0 when not held at all).
    #[serde(skip_serializing_if = "is_zero")]
    pub size: i64,
    /// Bytes held from a broken upload: `model_begin` with this `offset` resumes it.
    #[serde(skip_serializing_if = "is_zero")]
    pub partial: i64,
    /// Whether a connection has it mounted now.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub in_use: bool,
    /// When it was last mounted, in seconds since the Unix epoch.
    #[serde(skip_serializing_if = "is_zero")]
    pub last_used: i64,
    /// The name its upload gave it (`model_begin`'s `name`), or empty.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
}

impl ModelInventory {
    /// Whether a new upload of `len` bytes fits in the node's store: a client
    /// checks before it sends anything. `Err` says why not.
    pub fn check_room(&self, len: u64) -> Result<(), String> {
        let free = u64::try_from(self.store_free).unwrap_or(0);
        if len <= free {
            Ok(())
        } else {
            Err(format!(
                "the node's model store has room for {free} bytes (its cap less the models in use); this model is {len} bytes"
            ))
        }
    }
}

impl StoredModel {
    /// Where an upload of this model (`len` bytes) resumes: the bytes the node
    /// holds from a broken upload, or 0 to start over.
    pub fn resume_point(&self, len: u64) -> u64 {
        u64::try_from(self.partial).map_or(0, |held| held.min(len))
    }
}

/// `model_use` (extension `store`): mount a model the node holds, by hash,
/// with no weights sent. Answered with `model_status`, like a commit.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct ModelUse {
    /// The model's config, as a commit's `model_begin` carries it.
    pub config_json: String,
    /// Lowercase hex SHA-256 of the weights.
    pub weights_sha256: String,
}

/// `weights_chunk`: one slice of the weights, base64 text borrowed from the frame when possible.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct WeightsChunk<'a> {
    /// 0, 1, 2…
    pub index: i64,
    /// Set on the final chunk.
    pub last: bool,
    /// Standard base64 with padding.
    pub data_b64: Cow<'a, str>,
}

/// `model_status`: the answer to `model_commit`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct ModelStatus {
    /// Whether the model is mounted.
    pub ok: bool,
    /// `mounted`, or why not.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// `infer`: an inference job.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Infer {
    /// Chosen by the client; echoed in the answer.
    pub job_id: String,
    /// Input token ids.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub input_ids: Vec<i32>,
    /// Tokens to generate; 0 or less means the executor's default.
    #[serde(skip_serializing_if = "is_zero")]
    pub max_tokens: i64,
    /// Extension `deadline` (docs/PROTOCOL.md §10): milliseconds from the
    /// node's receipt of the job by which it must be answered; 0 = none.
    /// Left out when 0, so a v1 job stays byte for byte v1.
    #[serde(skip_serializing_if = "is_zero")]
    pub deadline_ms: i64,
    /// The `sampling` extension's fields (docs/PROTOCOL.md §10.7); absent when empty.
    #[serde(flatten)]
    pub sampling: SamplingParams,
}

/// `infer_result`: the answer to `infer`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct InferResult {
    /// The job's id.
    pub job_id: String,
    /// Whether the job succeeded.
    pub ok: bool,
    /// Generated ids (input followed by new tokens for the stub).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub output_ids: Vec<i32>,
    /// Why the job failed.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// Machine-readable failure code (ours; Go clients ignore it).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub code: String,
    /// Jobs still waiting when this one was taken.
    pub queue_depth: i64,
}

impl InferResult {
    /// A failed job's [`code`](InferResult::code) as the enum, if it is one of ours.
    pub fn error_code(&self) -> Option<ErrorCode> {
        ErrorCode::from_wire(&self.code)
    }
}

/// `prompt`: a text job for a `local_lm` node.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Prompt {
    /// Chosen by the client; echoed in the answer.
    pub job_id: String,
    /// The full prompt text.
    pub prompt: String,
    /// Output limit; 0 means the executor's default.
    #[serde(skip_serializing_if = "is_zero")]
    pub max_out: i64,
    /// Extension `deadline`: as [`Infer::deadline_ms`].
    #[serde(skip_serializing_if = "is_zero")]
    pub deadline_ms: i64,
    /// The `sampling` extension's fields (docs/PROTOCOL.md §10.7); absent when empty.
    #[serde(flatten)]
    pub sampling: SamplingParams,
    /// Extension `chat` (§10.9): a conversation the node renders with its
    /// model's chat template, instead of `prompt`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<ChatMessage>,
    /// Extension `chat`: `prompt` goes to the model as it is, never through
    /// a chat template.
    #[serde(skip_serializing_if = "is_false")]
    pub raw: bool,
}

/// One turn of a `chat` conversation.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The turn's text.
    pub content: String,
}

impl ChatMessage {
    /// The roles a node accepts.
    pub const ROLES: [&'static str; 3] = ["system", "user", "assistant"];

    /// A turn of `role`.
    pub fn new(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.to_owned(),
            content: content.to_owned(),
        }
    }
}

/// Extension `chat`: what a `prompt` job used and why it ended, on its
/// `prompt_result` to a connection that agreed `chat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Usage {
    /// Tokens the model read (the rendered template included).
    pub prompt_tokens: i64,
    /// Tokens it generated.
    pub completion_tokens: i64,
    /// Why generation ended.
    pub finish_reason: FinishReason,
}

/// Why a reply ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// The model ended it, or a `stop` string did.
    #[default]
    Stop,
    /// It reached the job's output limit (or the model's context).
    Length,
}

impl FinishReason {
    /// The wire (and OpenAI) name.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// `prompt_result`: the answer to `prompt`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct PromptResult {
    /// The job's id.
    pub job_id: String,
    /// Whether the job succeeded.
    pub ok: bool,
    /// The reply.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub text: String,
    /// Why the job failed.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// Machine-readable failure code (ours; Go clients ignore it).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub code: String,
    /// Jobs still waiting when this one was taken.
    pub queue_depth: i64,
    /// Extension `chat`: on a successful job of a connection that agreed it.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

impl PromptResult {
    /// A failed job's [`code`](PromptResult::code) as the enum, if it is one of ours.
    pub fn error_code(&self) -> Option<ErrorCode> {
        ErrorCode::from_wire(&self.code)
    }
}

/// `infer_partial` (extension `stream`, docs/PROTOCOL.md §10.8): token ids
/// an `infer` job generated since its last partial, before its `infer_result`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct InferPartial {
    /// The job's id.
    pub job_id: String,
    /// The new ids (the result's `output_ids` end with every partial's, in order).
    pub output_ids: Vec<i32>,
}

/// `prompt_partial` (extension `stream`, docs/PROTOCOL.md §10.8): text a
/// `prompt` job produced since its last partial, before its `prompt_result`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct PromptPartial {
    /// The job's id.
    pub job_id: String,
    /// The new text (the partials, joined in order, are the result's `text`).
    pub text: String,
}

/// `queue_status`: the node's queue as the server reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct QueueStatus {
    /// Jobs waiting (not running).
    pub depth: i64,
    /// Queue capacity.
    pub capacity: i64,
    /// Whether a worker is running a job.
    pub in_progress: bool,
}

/// A job named by its `job_id`: the body of `cancel` (extension `cancel`,
/// docs/PROTOCOL.md §10) and of a client's `queue_position` request.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct JobRef {
    /// The job's `job_id`, as sent with it.
    pub job_id: String,
}

/// A job's place in the queue (extension `queue_position`): sent as `queued`
/// when a job is queued, and as `queue_position` to answer a request.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct QueuePosition {
    /// The job's `job_id`.
    pub job_id: String,
    /// 1 = the next job a worker takes, 2 = the one after…; 0 = running;
    /// -1 = not queued or running on this connection (answered, or never sent).
    pub position: i64,
}

/// `stats` sent by a node (extension `stats`, docs/PROTOCOL.md §10.5): its counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Stats {
    /// Connections open now.
    pub connections: i64,
    /// Connections accepted since the node started (refused ones included).
    pub connections_accepted: i64,
    /// Jobs waiting in the queue.
    pub depth: i64,
    /// Jobs workers are running.
    pub jobs_running: i64,
    /// Jobs answered `ok:true`.
    pub jobs_done: i64,
    /// Jobs run and answered `ok:false` (stopped ones included).
    pub jobs_failed: i64,
    /// Queued jobs removed by `cancel`.
    pub jobs_cancelled: i64,
    /// Queued jobs removed at their deadline.
    pub jobs_expired: i64,
    /// Queued jobs dropped with their connection.
    pub jobs_dropped: i64,
}

/// `error`: a refused request, or the reason a connection is about to close.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct ErrorFrame {
    /// Machine-readable code (ours; Go clients ignore it).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub code: String,
    /// The message; Go's words where Go has them.
    pub error: String,
    /// The job this error answers, when it answers a job (ours).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub job_id: String,
}

impl ErrorFrame {
    /// The [`code`](ErrorFrame::code) as the enum; from a node that sends
    /// none (the Go node), read from its words where they name one
    /// (`queue full`, `unknown type: …`). `None` for another implementation's code.
    pub fn error_code(&self) -> Option<ErrorCode> {
        crate::code::code_or_go_words(&self.code, &self.error)
    }

    /// The error frame for `err`, naming `job_id` when it answers a job.
    pub fn new(err: &ProtocolError, job_id: Option<&str>) -> Self {
        ErrorFrame {
            code: err.code().to_owned(),
            error: err.to_string(),
            job_id: job_id.unwrap_or_default().to_owned(),
        }
    }
}

/// One frame's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    /// `hello`
    Hello(Hello),
    /// `model_begin`
    ModelBegin(ModelBegin),
    /// `weights_chunk`
    WeightsChunk(WeightsChunk<'a>),
    /// `model_commit`
    ModelCommit,
    /// `model_status`
    ModelStatus(ModelStatus),
    /// `infer`
    Infer(Infer),
    /// `infer_result`
    InferResult(InferResult),
    /// `prompt`
    Prompt(Prompt),
    /// `prompt_result`
    PromptResult(PromptResult),
    /// `queue_status` sent by a client: a request, with no fields.
    QueueStatusRequest,
    /// `queue_status` sent by a server, with its fields.
    QueueStatus(QueueStatus),
    /// `error`
    Error(ErrorFrame),
    /// `model_query` (extension `store`)
    ModelQuery(ModelQuery),
    /// `model_inventory` (extension `store`)
    ModelInventory(ModelInventory),
    /// `model_use` (extension `store`)
    ModelUse(ModelUse),
    /// `cancel` (extension `cancel`)
    Cancel(JobRef),
    /// `queued` (extension `queue_position`): a job was queued, at this place.
    Queued(QueuePosition),
    /// `queue_position` sent by a client: where is this job?
    QueuePositionRequest(JobRef),
    /// `queue_position` sent by a node: the answer.
    QueuePosition(QueuePosition),
    /// `stats` sent by a client (extension `stats`): a request, with no fields.
    StatsRequest,
    /// `stats` sent by a node: its counters.
    Stats(Stats),
    /// `infer_partial` (extension `stream`)
    InferPartial(InferPartial),
    /// `prompt_partial` (extension `stream`)
    PromptPartial(PromptPartial),
}

/// Every field of every message, as read off the wire in one pass.
#[derive(Deserialize)]
struct Wire<'a> {
    v: Option<i64>,
    #[serde(rename = "type", borrow, default, deserialize_with = "borrowed_str")]
    kind: Option<Cow<'a, str>>,
    mode: Option<String>,
    role: Option<String>,
    local_lm_path: Option<String>,
    queue_capacity: Option<i64>,
    capabilities: Option<Vec<String>>,
    config_json: Option<String>,
    weights_len: Option<i64>,
    weights_sha256: Option<String>,
    index: Option<i64>,
    last: Option<bool>,
    #[serde(borrow, default, deserialize_with = "borrowed_str")]
    data_b64: Option<Cow<'a, str>>,
    ok: Option<bool>,
    message: Option<String>,
    job_id: Option<String>,
    input_ids: Option<Vec<i32>>,
    max_tokens: Option<i64>,
    output_ids: Option<Vec<i32>>,
    error: Option<String>,
    code: Option<String>,
    queue_depth: Option<i64>,
    prompt: Option<String>,
    max_out: Option<i64>,
    text: Option<String>,
    depth: Option<i64>,
    capacity: Option<i64>,
    in_progress: Option<bool>,
    offset: Option<i64>,
    name: Option<String>,
    hashes: Option<Vec<String>>,
    models: Option<Vec<StoredModel>>,
    store_free: Option<i64>,
    deadline_ms: Option<i64>,
    position: Option<i64>,
    connections: Option<i64>,
    connections_accepted: Option<i64>,
    jobs_running: Option<i64>,
    jobs_done: Option<i64>,
    jobs_failed: Option<i64>,
    jobs_cancelled: Option<i64>,
    jobs_expired: Option<i64>,
    jobs_dropped: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<u32>,
    repeat_penalty: Option<f64>,
    seed: Option<u64>,
    stop: Option<Vec<String>>,
    messages: Option<Vec<ChatMessage>>,
    raw: Option<bool>,
    prompt_tokens: Option<i64>,
    completion_tokens: Option<i64>,
    finish_reason: Option<FinishReason>,
}

impl Wire<'_> {
    /// The `sampling` extension's fields, taken out of the one pass.
    fn sampling(&mut self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature.take(),
            top_p: self.top_p.take(),
            top_k: self.top_k.take(),
            repeat_penalty: self.repeat_penalty.take(),
            seed: self.seed.take(),
            stop: self.stop.take().unwrap_or_default(),
        }
    }
}

/// An optional string borrowed from the input when it has no escapes. (serde's own
/// `Option<Cow<str>>` always copies; only a bare `Cow` field with `borrow` borrows.)
fn borrowed_str<'de, D>(d: D) -> Result<Option<Cow<'de, str>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    struct Borrowed<'a>(#[serde(borrow)] Cow<'a, str>);
    Ok(Option::<Borrowed<'de>>::deserialize(d)?.map(|b| b.0))
}

/// Just the `job_id` of a body whose other fields are bad, to address the error.
#[derive(Deserialize)]
struct JobIdOnly {
    job_id: Option<serde_json::Value>,
}

impl<'a> Message<'a> {
    /// Parses one frame body.
    pub fn parse(body: &'a [u8]) -> Result<Message<'a>, ProtocolError> {
        let mut wire: Wire<'a> = serde_json::from_slice(body).map_err(|e| classify(body, e))?;
        let sampling = wire.sampling();
        if let Some(v) = wire.v.filter(|v| *v != VERSION) {
            return Err(ProtocolError::BadVersion(v));
        }
        let kind = wire.kind.unwrap_or_default();
        Ok(match &*kind {
            "hello" => Message::Hello(Hello {
                mode: wire.mode.unwrap_or_default(),
                role: wire.role.unwrap_or_default(),
                local_lm_path: wire.local_lm_path.unwrap_or_default(),
                queue_capacity: wire.queue_capacity.unwrap_or_default(),
                capabilities: wire.capabilities.unwrap_or_default(),
            }),
            "model_begin" => Message::ModelBegin(ModelBegin {
                config_json: wire.config_json.unwrap_or_default(),
                weights_len: wire.weights_len.unwrap_or_default(),
                weights_sha256: wire.weights_sha256.unwrap_or_default(),
                offset: wire.offset.unwrap_or_default(),
                name: wire.name.unwrap_or_default(),
            }),
            "weights_chunk" => Message::WeightsChunk(WeightsChunk {
                index: wire.index.unwrap_or_default(),
                last: wire.last.unwrap_or_default(),
                data_b64: wire.data_b64.unwrap_or_default(),
            }),
            "model_commit" => Message::ModelCommit,
            "model_status" => Message::ModelStatus(ModelStatus {
                ok: wire.ok.unwrap_or_default(),
                message: wire.message.unwrap_or_default(),
            }),
            "infer" => Message::Infer(Infer {
                sampling,
                job_id: wire.job_id.unwrap_or_default(),
                input_ids: wire.input_ids.unwrap_or_default(),
                max_tokens: wire.max_tokens.unwrap_or_default(),
                deadline_ms: wire.deadline_ms.unwrap_or_default(),
            }),
            "infer_result" => Message::InferResult(InferResult {
                job_id: wire.job_id.unwrap_or_default(),
                ok: wire.ok.unwrap_or_default(),
                output_ids: wire.output_ids.unwrap_or_default(),
                error: wire.error.unwrap_or_default(),
                code: wire.code.unwrap_or_default(),
                queue_depth: wire.queue_depth.unwrap_or_default(),
            }),
            "prompt" => Message::Prompt(Prompt {
                sampling,
                job_id: wire.job_id.unwrap_or_default(),
                prompt: wire.prompt.unwrap_or_default(),
                max_out: wire.max_out.unwrap_or_default(),
                deadline_ms: wire.deadline_ms.unwrap_or_default(),
                messages: wire.messages.unwrap_or_default(),
                raw: wire.raw.unwrap_or_default(),
            }),
            "infer_partial" => Message::InferPartial(InferPartial {
                job_id: wire.job_id.unwrap_or_default(),
                output_ids: wire.output_ids.unwrap_or_default(),
            }),
            "prompt_partial" => Message::PromptPartial(PromptPartial {
                job_id: wire.job_id.unwrap_or_default(),
                text: wire.text.unwrap_or_default(),
            }),
            "prompt_result" => Message::PromptResult(PromptResult {
                job_id: wire.job_id.unwrap_or_default(),
                ok: wire.ok.unwrap_or_default(),
                text: wire.text.unwrap_or_default(),
                error: wire.error.unwrap_or_default(),
                code: wire.code.unwrap_or_default(),
                queue_depth: wire.queue_depth.unwrap_or_default(),
                usage: wire.finish_reason.map(|finish_reason| Usage {
                    prompt_tokens: wire.prompt_tokens.unwrap_or_default(),
                    completion_tokens: wire.completion_tokens.unwrap_or_default(),
                    finish_reason,
                }),
            }),
            "queue_status"
                if wire.depth.is_none()
                    && wire.capacity.is_none()
                    && wire.in_progress.is_none() =>
            {
                Message::QueueStatusRequest
            }
            "queue_status" => Message::QueueStatus(QueueStatus {
                depth: wire.depth.unwrap_or_default(),
                capacity: wire.capacity.unwrap_or_default(),
                in_progress: wire.in_progress.unwrap_or_default(),
            }),
            "error" => Message::Error(ErrorFrame {
                code: wire.code.unwrap_or_default(),
                error: wire.error.unwrap_or_default(),
                job_id: wire.job_id.unwrap_or_default(),
            }),
            "model_query" => Message::ModelQuery(ModelQuery {
                hashes: wire.hashes.unwrap_or_default(),
            }),
            "model_inventory" => Message::ModelInventory(ModelInventory {
                models: wire.models.unwrap_or_default(),
                store_free: wire.store_free.unwrap_or_default(),
            }),
            "model_use" => Message::ModelUse(ModelUse {
                config_json: wire.config_json.unwrap_or_default(),
                weights_sha256: wire.weights_sha256.unwrap_or_default(),
            }),
            "cancel" => Message::Cancel(JobRef {
                job_id: wire.job_id.unwrap_or_default(),
            }),
            "queued" => Message::Queued(QueuePosition {
                job_id: wire.job_id.unwrap_or_default(),
                position: wire.position.unwrap_or_default(),
            }),
            "queue_position" if wire.position.is_none() => Message::QueuePositionRequest(JobRef {
                job_id: wire.job_id.unwrap_or_default(),
            }),
            "queue_position" => Message::QueuePosition(QueuePosition {
                job_id: wire.job_id.unwrap_or_default(),
                position: wire.position.unwrap_or_default(),
            }),
            "stats" if wire.jobs_done.is_none() && wire.connections.is_none() => {
                Message::StatsRequest
            }
            "stats" => Message::Stats(Stats {
                connections: wire.connections.unwrap_or_default(),
                connections_accepted: wire.connections_accepted.unwrap_or_default(),
                depth: wire.depth.unwrap_or_default(),
                jobs_running: wire.jobs_running.unwrap_or_default(),
                jobs_done: wire.jobs_done.unwrap_or_default(),
                jobs_failed: wire.jobs_failed.unwrap_or_default(),
                jobs_cancelled: wire.jobs_cancelled.unwrap_or_default(),
                jobs_expired: wire.jobs_expired.unwrap_or_default(),
                jobs_dropped: wire.jobs_dropped.unwrap_or_default(),
            }),
            other => return Err(ProtocolError::UnknownType(other.to_owned())),
        })
    }

    /// The wire `type` string.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::ModelBegin(_) => "model_begin",
            Message::WeightsChunk(_) => "weights_chunk",
            Message::ModelCommit => "model_commit",
            Message::ModelStatus(_) => "model_status",
            Message::Infer(_) => "infer",
            Message::InferResult(_) => "infer_result",
            Message::Prompt(_) => "prompt",
            Message::PromptResult(_) => "prompt_result",
            Message::QueueStatusRequest | Message::QueueStatus(_) => "queue_status",
            Message::Error(_) => "error",
            Message::ModelQuery(_) => "model_query",
            Message::ModelInventory(_) => "model_inventory",
            Message::ModelUse(_) => "model_use",
            Message::Cancel(_) => "cancel",
            Message::Queued(_) => "queued",
            Message::QueuePositionRequest(_) | Message::QueuePosition(_) => "queue_position",
            Message::StatsRequest | Message::Stats(_) => "stats",
            Message::InferPartial(_) => "infer_partial",
            Message::PromptPartial(_) => "prompt_partial",
        }
    }

    /// The client's `job_id` of a job request (`infer`, `prompt`).
    pub(crate) fn job_id(&self) -> Option<&str> {
        match self {
            Message::Infer(job) => Some(&job.job_id),
            Message::Prompt(job) => Some(&job.job_id),
            _ => None,
        }
    }

    /// The `job_id` a client's frame names and the node may echo: of a job,
    /// of one it asks about (`cancel`, `queue_position`), or of a `queued`.
    pub(crate) fn named_job_id(&self) -> Option<&str> {
        match self {
            Message::Cancel(j) | Message::QueuePositionRequest(j) => Some(&j.job_id),
            Message::Queued(p) | Message::QueuePosition(p) => Some(&p.job_id),
            _ => self.job_id(),
        }
    }

    /// Appends this message's JSON body (no frame header) to `out`.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let kind = self.kind();
        match self {
            Message::Error(e) => write_sorted_error(e, out),
            Message::Hello(m) => write_tagged(kind, m, out),
            Message::ModelBegin(m) => write_tagged(kind, m, out),
            Message::WeightsChunk(m) => write_tagged(kind, m, out),
            Message::ModelStatus(m) => write_tagged(kind, m, out),
            Message::Infer(m) => write_tagged(kind, m, out),
            Message::InferResult(m) => write_tagged(kind, m, out),
            Message::Prompt(m) => write_tagged(kind, m, out),
            Message::PromptResult(m) => write_tagged(kind, m, out),
            Message::QueueStatus(m) => write_tagged(kind, m, out),
            Message::ModelQuery(m) => write_tagged(kind, m, out),
            Message::ModelInventory(m) => write_tagged(kind, m, out),
            Message::ModelUse(m) => write_tagged(kind, m, out),
            Message::InferPartial(m) => write_tagged(kind, m, out),
            Message::PromptPartial(m) => write_tagged(kind, m, out),
            Message::ModelCommit | Message::QueueStatusRequest => {
                write_tagged(kind, &Empty {}, out)
            }
            Message::Cancel(m) | Message::QueuePositionRequest(m) => write_tagged(kind, m, out),
            Message::Queued(m) | Message::QueuePosition(m) => write_tagged(kind, m, out),
            Message::StatsRequest => write_tagged(kind, &Empty {}, out),
            Message::Stats(m) => write_tagged(kind, m, out),
        }
    }

    /// This message's JSON body as bytes.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_json(&mut out);
        out
    }

    /// Appends this message as a complete frame (header and body) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        encode_frame_with(out, |body| self.write_json(body));
    }

    /// Detaches the message from the frame it was parsed from.
    pub fn into_owned(self) -> Message<'static> {
        match self {
            Message::WeightsChunk(c) => Message::WeightsChunk(WeightsChunk {
                index: c.index,
                last: c.last,
                data_b64: Cow::Owned(c.data_b64.into_owned()),
            }),
            Message::Hello(m) => Message::Hello(m),
            Message::ModelBegin(m) => Message::ModelBegin(m),
            Message::ModelCommit => Message::ModelCommit,
            Message::ModelStatus(m) => Message::ModelStatus(m),
            Message::Infer(m) => Message::Infer(m),
            Message::InferResult(m) => Message::InferResult(m),
            Message::Prompt(m) => Message::Prompt(m),
            Message::PromptResult(m) => Message::PromptResult(m),
            Message::QueueStatusRequest => Message::QueueStatusRequest,
            Message::QueueStatus(m) => Message::QueueStatus(m),
            Message::Error(m) => Message::Error(m),
            Message::ModelQuery(m) => Message::ModelQuery(m),
            Message::ModelInventory(m) => Message::ModelInventory(m),
            Message::ModelUse(m) => Message::ModelUse(m),
            Message::Cancel(m) => Message::Cancel(m),
            Message::Queued(m) => Message::Queued(m),
            Message::QueuePositionRequest(m) => Message::QueuePositionRequest(m),
            Message::QueuePosition(m) => Message::QueuePosition(m),
            Message::StatsRequest => Message::StatsRequest,
            Message::Stats(m) => Message::Stats(m),
            Message::InferPartial(m) => Message::InferPartial(m),
            Message::PromptPartial(m) => Message::PromptPartial(m),
        }
    }
}

/// The `job_id` of a body that failed to parse, if it has a non-empty
/// string one of at most `max_len` bytes (a longer one is not echoed).
pub(crate) fn salvage_job_id(body: &[u8], max_len: usize) -> Option<String> {
    let only: JobIdOnly = serde_json::from_slice(body).ok()?;
    match only.job_id? {
        serde_json::Value::String(s) if !s.is_empty() && s.len() <= max_len => Some(s),
        _ => None,
    }
}

/// Whether a node takes `job_id`: at most `max_len` bytes of text without
/// control or bidirectional-format characters (so that an id never rewrites a
/// log line or a terminal); empty is allowed, as in v1.
pub(crate) fn check_job_id(job_id: &str, max_len: usize) -> Result<(), ProtocolError> {
    if job_id.len() > max_len {
        return Err(ProtocolError::BadField(format!(
            "job_id is {} bytes, at most {max_len}",
            job_id.len()
        )));
    }
    let bidi = |c: char| matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if job_id.chars().any(|c| c.is_control() || bidi(c)) {
        return Err(ProtocolError::BadField(
            "job_id must not contain control characters".to_owned(),
        ));
    }
    Ok(())
}

fn classify(body: &[u8], e: serde_json::Error) -> ProtocolError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Data => match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
            Ok(_) if body.trim_ascii_start().first() != Some(&b'{') => ProtocolError::NotObject,
            _ => ProtocolError::BadField(e.to_string()),
        },
        _ => ProtocolError::BadJson(e.to_string()),
    }
}

#[derive(Serialize)]
struct Empty {}

/// Writes `{"v":1,"type":KIND` followed by the fields of `body`.
fn write_tagged<T: Serialize>(kind: &str, body: &T, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"v\":1,\"type\":\"");
    out.extend_from_slice(kind.as_bytes());
    out.push(b'"');
    let start = out.len();
    serde_json::to_writer(&mut *out, body).expect("message bodies always serialize");
    if out.len() - start == 2 {
        // `{}`: no fields.
        out.truncate(start);
        out.push(b'}');
    } else {
        out[start] = b',';
    }
}

/// Writes an error frame with sorted keys, as Go writes it from a map.
fn write_sorted_error(e: &ErrorFrame, out: &mut Vec<u8>) {
    serde_json::to_writer(&mut *out, e).expect("error frames always serialize");
    out.pop(); // the closing brace
    out.extend_from_slice(b",\"type\":\"error\",\"v\":1}");
}

/// Appends a complete `weights_chunk` frame, base64-encoding `raw` straight into `out`.
///
/// Produces the same bytes as encoding a [`WeightsChunk`] holding the base64 of `raw`,
/// without building that string.
pub fn encode_weights_chunk(index: i64, last: bool, raw: &[u8], out: &mut Vec<u8>) {
    encode_frame_with(out, |body| {
        body.extend_from_slice(b"{\"v\":1,\"type\":\"weights_chunk\",\"index\":");
        body.extend_from_slice(index.to_string().as_bytes());
        body.extend_from_slice(if last {
            b",\"last\":true"
        } else {
            b",\"last\":false"
        });
        body.extend_from_slice(b",\"data_b64\":\"");
        let start = body.len();
        let encoded = base64::encoded_len(raw.len(), true).expect("chunk length fits in usize");
        body.resize(start + encoded, 0);
        let written = BASE64
            .encode_slice(raw, &mut body[start..])
            .expect("buffer sized by encoded_len");
        debug_assert_eq!(written, encoded);
        body.extend_from_slice(b"\"}");
    });
}

/// The raw length of canonical padded base64 text, or `None` if its length is impossible.
pub(crate) fn decoded_len(bytes: &[u8]) -> Option<usize> {
    if bytes.len() % 4 != 0 {
        return None;
    }
    let pad = bytes
        .iter()
        .rev()
        .take(2)
        .take_while(|b| **b == b'=')
        .count();
    Some(bytes.len() / 4 * 3 - pad)
}

/// A `weights_chunk` body split into its parts without a JSON parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkParts<'a> {
    pub(crate) index: i64,
    pub(crate) last: bool,
    pub(crate) data_b64: &'a [u8],
}

/// Recognises a `weights_chunk` body in the exact layout the Go client and
/// [`encode_weights_chunk`] write, so the hot path skips the JSON scan of the
/// base64 text. The caller must fall back to [`Message::parse`] unless the
/// text then decodes as base64: only then is it free of quotes and escapes, and
/// so the same message the JSON parser would have seen.
pub(crate) fn canonical_chunk(body: &[u8]) -> Option<ChunkParts<'_>> {
    let rest = body.strip_prefix(br#"{"v":1,"type":"weights_chunk","index":"#)?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 18 || (digits > 1 && rest[0] == b'0') {
        return None;
    }
    let index = rest[..digits]
        .iter()
        .fold(0i64, |n, d| n * 10 + i64::from(d - b'0'));
    let rest = &rest[digits..];
    let (last, rest) = match rest.strip_prefix(br#","last":true,"data_b64":""#) {
        Some(rest) => (true, rest),
        None => (false, rest.strip_prefix(br#","last":false,"data_b64":""#)?),
    };
    let data_b64 = rest.strip_suffix(br#""}"#)?;
    Some(ChunkParts {
        index,
        last,
        data_b64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(index: i64, last: bool, raw: &[u8]) -> Vec<u8> {
        let mut frame = Vec::new();
        encode_weights_chunk(index, last, raw, &mut frame);
        frame.split_off(crate::frame::HEADER_LEN)
    }

    #[test]
    fn canonical_chunks_split_like_the_json_parser() {
        for (index, last, raw) in [
            (0, false, &b""[..]),
            (7, true, b"\x00\xff"),
            (123456789, false, b"abcdef"),
        ] {
            let body = body_of(index, last, raw);
            let parts = canonical_chunk(&body).expect("our own layout is canonical");
            let Ok(Message::WeightsChunk(parsed)) = Message::parse(&body) else {
                panic!("parses as a chunk")
            };
            assert_eq!((parts.index, parts.last), (parsed.index, parsed.last));
            assert_eq!(parts.data_b64, parsed.data_b64.as_bytes());
        }
    }

    #[test]
    fn other_layouts_are_left_to_the_json_parser() {
        for body in [
            &br#"{"v":1,"type":"weights_chunk","index":01,"last":false,"data_b64":"AQ=="}"#[..],
            br#"{"v":1,"type":"weights_chunk","index":-1,"last":false,"data_b64":"AQ=="}"#,
            br#"{"type":"weights_chunk","v":1,"index":0,"last":false,"data_b64":"AQ=="}"#,
            br#"{"v":1,"type":"weights_chunk","index":0,"last":false,"data_b64":"AQ==" }"#,
            br#"{"v":1,"type":"weights_chunk","index":0,"data_b64":"AQ==","last":false}"#,
        ] {
            assert_eq!(
                canonical_chunk(body),
                None,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        // Recognised, but its "text" is not base64: the connection falls back to
        // the parser, which sees an extra field.
        let tricky =
            br#"{"v":1,"type":"weights_chunk","index":0,"last":false,"data_b64":"AQ==","x":"y"}"#;
        let parts = canonical_chunk(tricky).expect("prefix and suffix match");
        assert!(BASE64.decode(parts.data_b64).is_err());
    }
}
