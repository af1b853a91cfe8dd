//! [`Phase`]: where one server connection stands. Every transition is here.

use crate::error::ProtocolError;
use crate::upload::Upload;

/// A server connection's phase. Mounts in flight are not a phase: a client
/// may commit, begin the next upload and send jobs while a mount runs.
#[derive(Debug, Default)]
pub(crate) enum Phase {
    /// Accepted, no complete frame yet: the handshake timer runs.
    #[default]
    AwaitingHello,
    /// Frames flow; no upload is open.
    Ready,
    /// Between `model_begin` and `model_commit` (boxed: idle connections stay small).
    Uploading(Box<Upload>),
    /// An upload was refused or failed: its remaining chunks and its commit get no answer.
    UploadFailed,
    /// Closing for this reason: flush what is queued, then close. Final.
    Closing(ProtocolError),
}

impl Phase {
    /// A complete frame arrived; returns whether it is the connection's first.
    pub(crate) fn frame_received(&mut self) -> bool {
        let first = matches!(self, Phase::AwaitingHello);
        if first {
            *self = Phase::Ready;
        }
        first
    }

    pub(crate) fn closing(&self) -> Option<&ProtocolError> {
        match self {
            Phase::Closing(reason) => Some(reason),
            _ => None,
        }
    }

    pub(crate) fn upload(&self) -> Option<&Upload> {
        match self {
            Phase::Uploading(upload) => Some(upload),
            _ => None,
        }
    }

    pub(crate) fn upload_mut(&mut self) -> Option<&mut Upload> {
        match self {
            Phase::Uploading(upload) => Some(upload),
            _ => None,
        }
    }

    /// Ends an upload (refused, failed, committed): the phase returns to
    /// `Ready` or `UploadFailed`, and what it was is handed back.
    pub(crate) fn end_upload(&mut self, failed: bool) -> Phase {
        if self.closing().is_some() {
            return Phase::Ready;
        }
        let next = if failed {
            Phase::UploadFailed
        } else {
            Phase::Ready
        };
        std::mem::replace(self, next)
    }

    /// Starts closing; an open upload is dropped. Returns false if already closing.
    pub(crate) fn close(&mut self, reason: ProtocolError) -> bool {
        if self.closing().is_some() {
            return false;
        }
        *self = Phase::Closing(reason);
        true
    }
}
