//! The error every adapter's client returns.

use std::io;

use donate_proto::message::{ErrorFrame, InferResult, PromptResult};
use donate_proto::{ApiMisuse, ClientConnection, ClientError, RequestId};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Connecting to the address failed (refused, unreachable, no such socket…).
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// The address as given (`host:port` or `unix:/path`).
        addr: String,
        /// Why it failed.
        source: io::Error,
    },
    /// The socket failed after the connection was made (reset, timed out…).
    #[error("{0}")]
    Io(#[from] io::Error),
    /// [`wait`](crate::Client::wait) was asked for a request whose answer was
    /// already taken, or that this connection never made: no answer will come.
    #[error("request {} is not pending: its answer was already taken, or it was never made", .0.as_u64())]
    NotPending(RequestId),
    /// The server broke the protocol.
    #[error(transparent)]
    Protocol(ClientError),
    /// A call refused before anything was sent (the caller's mistake); the
    /// connection stays usable.
    #[error(transparent)]
    Misuse(ApiMisuse),
    /// The server answered the request with an `error` frame.
    #[error("server refused: {}", .0.error)]
    Refused(ErrorFrame),
    /// The server answered the commit with `model_status` ok:false.
    #[error("model refused: {0}")]
    ModelRefused(String),
    /// An `infer` job ran and failed (`ok:false`); the frame as received.
    #[error("infer failed: {}", .0.error)]
    InferFailed(InferResult),
    /// A `prompt` job ran and failed (`ok:false`); the frame as received
    /// (boxed: it is the largest variant).
    #[error("prompt failed: {}", .0.error)]
    PromptFailed(Box<PromptResult>),
    /// A secure handshake that did not complete in time.
    #[error("the secure handshake did not complete within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    /// A pool refused or gave up on a job.
    #[error(transparent)]
    Pool(#[from] donate_proto::PoolError),
    /// The server closed the connection before answering (with its last error frame, if any).
    #[error("connection closed by server{}", .0.as_ref().map(|e| format!(": {}", e.error)).unwrap_or_default())]
    Closed(Option<ErrorFrame>),
}

impl From<ClientError> for Error {
    fn from(e: ClientError) -> Error {
        match e {
            ClientError::Misuse(misuse) => Error::Misuse(misuse),
            other => Error::Protocol(other),
        }
    }
}

/// Shorthand for client results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Feeds the outcome of a socket read into a client core: end of stream is
/// [`Error::Closed`] with the server's last error frame. Shared by the async
/// client and donate-std's blocking one, so both read alike.
pub fn feed_read(core: &mut ClientConnection, read: io::Result<usize>, buf: &[u8]) -> Result<()> {
    match read {
        Ok(0) => Err(Error::Closed(core.closing_error().cloned())),
        Ok(n) => Ok(core.handle_input(&buf[..n])?),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Turns the answer to a request into the typed result a client call returns.
/// Shared by every adapter's client so they all answer alike.
pub mod answers {
    use donate_proto::message::{
        InferResult, ModelInventory, ModelStatus, PromptResult, QueueStatus,
    };
    use donate_proto::{Answer, ClientError};

    use super::{Error, Result};

    fn unexpected(answer: &Answer) -> Error {
        Error::Protocol(ClientError::Unexpected(format!("{answer:?}")))
    }

    /// An upload's answer: `Ok` only when the model is mounted.
    pub fn model_status(answer: Answer) -> Result<ModelStatus> {
        match answer {
            Answer::ModelStatus(s) if s.ok => Ok(s),
            Answer::ModelStatus(s) => Err(Error::ModelRefused(s.message)),
            Answer::Error(e) => Err(Error::Refused(e)),
            other => Err(unexpected(&other)),
        }
    }

    /// An `infer` answer: `Ok` only when the job succeeded.
    pub fn infer(answer: Answer) -> Result<InferResult> {
        match answer {
            Answer::Infer(r) if r.ok => Ok(r),
            Answer::Infer(r) => Err(Error::InferFailed(r)),
            Answer::Error(e) => Err(Error::Refused(e)),
            other => Err(unexpected(&other)),
        }
    }

    /// A `prompt` answer: `Ok` only when the job succeeded.
    pub fn prompt(answer: Answer) -> Result<PromptResult> {
        match answer {
            Answer::Prompt(r) if r.ok => Ok(r),
            Answer::Prompt(r) => Err(Error::PromptFailed(Box::new(r))),
            Answer::Error(e) => Err(Error::Refused(e)),
            other => Err(unexpected(&other)),
        }
    }

    /// A `model_query` answer (extension `store`).
    pub fn inventory(answer: Answer) -> Result<ModelInventory> {
        match answer {
            Answer::Inventory(i) => Ok(i),
            Answer::Error(e) => Err(Error::Refused(e)),
            other => Err(unexpected(&other)),
        }
    }

    /// A `queue_status` answer: `None` from a node that does not know the
    /// request (the Go node answers `unknown type: queue_status`).
    pub fn queue_status(answer: Answer) -> Result<Option<QueueStatus>> {
        match answer {
            Answer::QueueStatus(s) => Ok(Some(s)),
            Answer::Error(e) if e.error_code() == Some(donate_proto::ErrorCode::UnknownType) => {
                Ok(None)
            }
            Answer::Error(e) => Err(Error::Refused(e)),
            other => Err(unexpected(&other)),
        }
    }

    /// A `stats` answer (extension `stats`).
    pub fn stats(answer: Answer) -> Result<donate_proto::message::Stats> {
        match answer {
            Answer::Stats(stats) => Ok(stats),
            Answer::Error(e) => Err(Error::Refused(e)),
            other => Err(unexpected(&other)),
        }
    }
}
