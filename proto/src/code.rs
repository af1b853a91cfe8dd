//! The machine-readable error codes, with their wire strings in one place.

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $name:ident = $wire:literal, )*) => {
        /// A machine-readable error code: the `code` of an `error` frame or of
        /// a failed result (docs/PROTOCOL.md §6, §10). The codes this
        /// workspace gives; another implementation's code has none
        /// ([`from_wire`](ErrorCode::from_wire) is `None`) and stays a string.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $( $(#[$doc])* $name, )*
        }

        impl ErrorCode {
            /// The code as it goes on the wire.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( ErrorCode::$name => $wire, )*
                }
            }

            /// The code named by `code`, if it is one of ours.
            pub fn from_wire(code: &str) -> Option<ErrorCode> {
                match code {
                    $( $wire => Some(ErrorCode::$name), )*
                    _ => None,
                }
            }
        }
    };
}

error_codes! {
    /// A frame header out of bounds.
    BadFrame = "bad_frame",
    /// A body that is not JSON.
    BadJson = "bad_json",
    /// A body that is not a JSON object.
    NotObject = "not_object",
    /// A field of the wrong type or out of range.
    BadField = "bad_field",
    /// A `v` other than 1.
    BadVersion = "bad_version",
    /// A `type` the node does not know (the Go node says so without a code).
    UnknownType = "unknown_type",
    /// An upload to a node that takes none.
    ModelPushDisabled = "model_push_disabled",
    /// A `weights_len` out of bounds.
    BadWeightsLen = "bad_weights_len",
    /// Weights whose SHA-256 is not the announced one.
    BadWeightsSha256 = "bad_weights_sha256",
    /// A resume offset the node cannot resume from.
    BadOffset = "bad_offset",
    /// A `model_query` naming too many models.
    QueryTooLarge = "query_too_large",
    /// An upload the store cannot take.
    UploadRefused = "upload_refused",
    /// A chunk whose base64 does not decode.
    WeightsBase64 = "weights_b64",
    /// More weight bytes than announced.
    WeightsOverflow = "weights_overflow",
    /// A chunk out of order.
    ChunkOutOfOrder = "chunk_out_of_order",
    /// A chunk after the last one.
    ChunkAfterLast = "chunk_after_last",
    /// A chunk without `model_begin`.
    ChunkWithoutBegin = "chunk_without_begin",
    /// A request of the other mode (`infer` on `local_lm`, `prompt` on `model_push`).
    WrongMode = "wrong_mode",
    /// `infer` before a model is mounted.
    ModelNotMounted = "model_not_mounted",
    /// The job queue is at capacity: another node, or later, may take the job.
    QueueFull = "queue_full",
    /// The node is shutting down.
    ShuttingDown = "shutting_down",
    /// Over the node's connection or handshake limits.
    TooManyConnections = "too_many_connections",
    /// No first frame (or no finished handshake) in time.
    HandshakeTimeout = "handshake_timeout",
    /// A partial frame made no progress in time.
    Stalled = "stalled",
    /// A silent connection with nothing in flight.
    IdleTimeout = "idle_timeout",
    /// A peer that does not read its answers.
    Backpressure = "backpressure",
    /// The peer closed its side.
    PeerClosed = "peer_closed",
    /// A plain-text peer on a secure node.
    SecureRequired = "secure_required",
    /// A client key the node does not authorize.
    UnknownKey = "unknown_key",
    /// A record that does not decrypt.
    DecryptFailed = "decrypt_failed",
    /// A broken handshake message.
    HandshakeFailed = "handshake_failed",
    /// The job was cancelled (`cancel`) or dropped with its connection.
    Cancelled = "cancelled",
    /// The job's deadline or the node's `max_job_time` passed first.
    DeadlineExceeded = "deadline_exceeded",
    /// The executor answered with the wrong kind of output.
    BadOutput = "bad_output",
    /// A job the executor cannot run.
    Unsupported = "unsupported",
}

/// The code of an error from its frame's `code`, or, from a node that sends
/// none (the Go node), from its words where they name one.
pub(crate) fn code_or_go_words(code: &str, error: &str) -> Option<ErrorCode> {
    if !code.is_empty() {
        return ErrorCode::from_wire(code);
    }
    if error == "queue full" {
        Some(ErrorCode::QueueFull)
    } else if error.starts_with("unknown type") {
        Some(ErrorCode::UnknownType)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_reads_back_from_its_wire_string() {
        for code in [
            ErrorCode::BadFrame,
            ErrorCode::QueueFull,
            ErrorCode::Unsupported,
        ] {
            assert_eq!(ErrorCode::from_wire(code.as_str()), Some(code));
        }
        assert_eq!(ErrorCode::from_wire("someone_elses"), None);
        assert_eq!(
            code_or_go_words("", "queue full"),
            Some(ErrorCode::QueueFull)
        );
        assert_eq!(
            code_or_go_words("", "unknown type: queue_status"),
            Some(ErrorCode::UnknownType)
        );
        assert_eq!(code_or_go_words("", "model not mounted"), None);
    }
}
