//! Typed errors. Every error a peer can cause has a variant, a clear message
//! (for the `error` field of an error frame) and a machine-readable [`code`](ProtocolError::code).

use thiserror::Error;

use crate::code::ErrorCode;

/// A framing error: the byte stream is out of sync and the connection must close.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum FrameError {
    /// A header announced a body of 0 bytes or more than the limit.
    #[error("bad frame length {len} (must be 1..={max})")]
    BadLength {
        /// The announced body length.
        len: usize,
        /// The configured `max_frame_len`.
        max: usize,
    },
    /// Input after an earlier framing error.
    #[error("stream is out of sync after a framing error")]
    Failed,
}

/// An error a peer caused, as it goes into an `error` frame.
///
/// The `Display` text of the variants in the "What we answer and why" table of docs/PROTOCOL.md is
/// the Go node's text, word for word, because Go clients compare it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// See [`FrameError`].
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The body is not valid JSON (or not UTF-8).
    #[error("bad json: {0}")]
    BadJson(String),
    /// The body is JSON but not an object.
    #[error("bad message: not a JSON object")]
    NotObject,
    /// A known field holds a value of the wrong type.
    #[error("bad field: {0}")]
    BadField(String),
    /// `v` is present and is not 1.
    #[error("unsupported protocol version {0}")]
    BadVersion(i64),
    /// Unknown or missing `type`.
    #[error("unknown type: {0}")]
    UnknownType(String),
    /// `model_begin` on a `local_lm` node.
    #[error("model_push not enabled on this node")]
    ModelPushDisabled,
    /// `weights_len` negative or over `max_model_len`.
    #[error("bad weights_len")]
    BadWeightsLen,
    /// `weights_sha256` is not 64 hex digits.
    #[error("bad weights_sha256: want 64 hex digits")]
    BadWeightsSha256,
    /// A `model_begin` `offset` the upload cannot resume from (extension `store`).
    #[error("bad offset {0}: a resumed upload needs weights_sha256, a store, and 0 <= offset <= weights_len")]
    BadOffset(i64),
    /// The spool of an upload that names its hash could not be opened at its
    /// `model_begin` (a model store that is full, or writing that model now).
    #[error("{0}")]
    UploadRefused(String),
    /// A `model_query` asking for too many models at once (extension `store`).
    #[error("model_query: at most {0} hashes per query")]
    QueryTooLarge(usize),
    /// `data_b64` is not valid standard base64.
    #[error("weights b64 decode")]
    WeightsBase64,
    /// More bytes than `weights_len`.
    #[error("weights overflow")]
    WeightsOverflow,
    /// A chunk `index` out of the sequence 0, 1, 2…
    #[error("weights chunk out of order: got index {got}, expected {expected}")]
    ChunkOutOfOrder {
        /// The index received.
        got: i64,
        /// The index expected.
        expected: u64,
    },
    /// A `weights_chunk` after the chunk marked `last`.
    #[error("weights_chunk after the chunk marked last")]
    ChunkAfterLast,
    /// `weights_chunk` with no `model_begin` before it.
    #[error("weights_chunk without model_begin")]
    ChunkWithoutBegin,
    /// `infer` on a `local_lm` node.
    #[error("this node is local_lm; send prompt, not infer")]
    InferOnLocalLm,
    /// `infer` before a model is mounted on this connection.
    #[error("model not mounted")]
    ModelNotMounted,
    /// `prompt` on a `model_push` node.
    #[error("this node is model_push; mount model and send infer")]
    PromptOnModelPush,
    /// The job queue is at capacity.
    #[error("queue full")]
    QueueFull,
    /// The node is shutting down and takes no new jobs.
    #[error("node shutting down")]
    ShuttingDown,
    /// Over `max_connections`.
    #[error("too many connections")]
    TooManyConnections,
    /// Secure mode: over `max_handshakes` (the oldest handshake makes room)
    /// or over `max_handshakes_per_source` (the new connection is refused).
    #[error("too many connections in their secure handshake")]
    TooManyHandshakes,
    /// No first frame within the handshake timeout.
    #[error("handshake timeout")]
    HandshakeTimeout,
    /// A partial frame made no progress within the stall timeout.
    #[error("stalled in the middle of a frame")]
    Stalled,
    /// Nothing received and nothing in flight within the idle timeout.
    #[error("idle timeout")]
    IdleTimeout,
    /// The peer did not read its answers within the backpressure timeout.
    #[error("peer is not reading its answers")]
    Backpressure,
    /// The peer closed its side; nothing is sent, pending answers are flushed.
    #[error("peer closed the connection")]
    PeerClosed,
    /// A plain-text peer on a secure node.
    #[error("this node requires an encrypted connection (donate secure mode)")]
    SecureRequired,
    /// A secure client whose key the node does not authorize.
    #[error(
        "this node does not know your key {0}; ask its owner to add it to its authorized keys"
    )]
    UnknownKey(String),
    /// A record that does not decrypt: altered, replayed, reordered or truncated.
    #[error("decryption failed: the connection was altered in transit")]
    Decrypt,
    /// The Noise handshake failed.
    #[error("secure handshake failed: {0}")]
    Handshake(String),
}

impl ProtocolError {
    /// The machine-readable code sent beside the message in `error` frames.
    pub fn code(&self) -> &'static str {
        self.error_code().as_str()
    }

    /// [`code`](ProtocolError::code) as the enum.
    pub fn error_code(&self) -> ErrorCode {
        use ProtocolError::*;
        match self {
            Frame(_) => ErrorCode::BadFrame,
            BadJson(_) => ErrorCode::BadJson,
            NotObject => ErrorCode::NotObject,
            BadField(_) => ErrorCode::BadField,
            BadVersion(_) => ErrorCode::BadVersion,
            UnknownType(_) => ErrorCode::UnknownType,
            ModelPushDisabled => ErrorCode::ModelPushDisabled,
            BadWeightsLen => ErrorCode::BadWeightsLen,
            BadWeightsSha256 => ErrorCode::BadWeightsSha256,
            BadOffset(_) => ErrorCode::BadOffset,
            QueryTooLarge(_) => ErrorCode::QueryTooLarge,
            UploadRefused(_) => ErrorCode::UploadRefused,
            WeightsBase64 => ErrorCode::WeightsBase64,
            WeightsOverflow => ErrorCode::WeightsOverflow,
            ChunkOutOfOrder { .. } => ErrorCode::ChunkOutOfOrder,
            ChunkAfterLast => ErrorCode::ChunkAfterLast,
            ChunkWithoutBegin => ErrorCode::ChunkWithoutBegin,
            InferOnLocalLm => ErrorCode::WrongMode,
            ModelNotMounted => ErrorCode::ModelNotMounted,
            PromptOnModelPush => ErrorCode::WrongMode,
            QueueFull => ErrorCode::QueueFull,
            ShuttingDown => ErrorCode::ShuttingDown,
            TooManyConnections | TooManyHandshakes => ErrorCode::TooManyConnections,
            HandshakeTimeout => ErrorCode::HandshakeTimeout,
            Stalled => ErrorCode::Stalled,
            IdleTimeout => ErrorCode::IdleTimeout,
            Backpressure => ErrorCode::Backpressure,
            PeerClosed => ErrorCode::PeerClosed,
            SecureRequired => ErrorCode::SecureRequired,
            UnknownKey(_) => ErrorCode::UnknownKey,
            Decrypt => ErrorCode::DecryptFailed,
            Handshake(_) => ErrorCode::HandshakeFailed,
        }
    }
}

/// Why a commit did not mount: the `message` of a `model_status` with `ok:false`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum MountError {
    /// Bytes missing at commit (Go's text).
    #[error("weights size mismatch: got {got} expect {expected}")]
    SizeMismatch {
        /// Bytes received.
        got: u64,
        /// `weights_len`.
        expected: u64,
    },
    /// Empty `config_json` (Go's text).
    #[error("no config")]
    NoConfig,
    /// `model_commit` with no `model_begin` before it.
    #[error("model_commit without model_begin")]
    CommitWithoutBegin,
    /// The weights do not hash to `weights_sha256`.
    #[error("weights_sha256 mismatch: got {got} expect {expected}")]
    Sha256Mismatch {
        /// Hash of the bytes received.
        got: String,
        /// `weights_sha256` from `model_begin`.
        expected: String,
    },
    /// The executor refused the model.
    #[error("{0}")]
    Executor(String),
}

/// Why the client core failed: a misbehaving server, or (as
/// [`ClientError::Misuse`]) a call it refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ClientError {
    /// See [`FrameError`].
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A frame the client cannot parse.
    #[error("bad frame from server: {0}")]
    BadMessage(String),
    /// The first frame was not a server `hello`.
    #[error("expected hello from server, got {0}")]
    NoHello(String),
    /// The server sent an error frame instead of its hello (over its connection
    /// limit, or shutting down) and closes.
    #[error("server refused the connection: {0}")]
    Refused(String),
    /// A frame that answers nothing the client asked.
    #[error("unexpected {0} frame from server")]
    Unexpected(String),
    /// A secure client met a node that does not offer secure mode; it never
    /// falls back to plain text.
    #[error("the node does not offer an encrypted connection (donate secure mode); refusing to talk in plain text")]
    PlaintextNode,
    /// The node's key is not the pinned one.
    #[error("the node presented key {got}, expected {expected}")]
    NodeKeyMismatch {
        /// The fingerprint of the key the node presented.
        got: String,
        /// The pinned fingerprint.
        expected: String,
    },
    /// A record from the node that does not decrypt.
    #[error("decryption failed: the connection was altered in transit")]
    Decrypt,
    /// The Noise handshake failed.
    #[error("secure handshake failed: {0}")]
    Handshake(String),
    /// A call the client made that the core refused, nothing sent: not the server's fault.
    #[error(transparent)]
    Misuse(#[from] ApiMisuse),
}

/// A client call the core refuses before sending anything (the caller's
/// mistake, not the server's); the connection stays usable.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ApiMisuse {
    /// A request made before the server's hello arrived.
    #[error("not connected: the server hello has not arrived")]
    NotConnected,
    /// A new upload while one is still sending or not yet answered.
    #[error("an upload is already in progress")]
    UploadInProgress,
    /// More upload bytes than announced, or none wanted.
    #[error("upload chunk of {len} bytes does not fit: {remaining} bytes remaining")]
    UploadOverflow {
        /// Bytes offered.
        len: usize,
        /// Bytes still expected.
        remaining: u64,
    },
    /// An upload longer than `weights_len` (a signed 64-bit JSON int) can announce.
    #[error("an upload of {0} bytes is too large to announce")]
    UploadTooLarge(u64),
    /// A client-chosen `job_id` that is empty or already outstanding.
    #[error("job_id {0:?} is empty or already in flight on this connection")]
    JobIdInUse(String),
    /// A request of an extension the node did not offer (or this client did not want).
    #[error("the node does not offer the {0} extension")]
    NotOffered(&'static str),
    /// A resumed upload (an `offset`) without the weights' SHA-256.
    #[error("a resumed upload needs the weights' sha256")]
    ResumeWithoutSha256,
    /// A model name longer than `MAX_MODEL_NAME` bytes or with control characters.
    #[error("a model name is at most 255 bytes of printable text")]
    BadModelName,
}
