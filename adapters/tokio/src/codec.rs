//! The frame codec as `tokio_util::codec::{Decoder, Encoder}`, for framing your own streams.

use bytes::{Buf, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use donate_proto::frame::{parse_header, DEFAULT_MAX_FRAME_LEN, HEADER_LEN};
use donate_proto::{FrameError, Message};

/// Frames of `u32` LE length + JSON body. Decodes to the body bytes (parse them
/// with [`Message::parse`]); encodes [`Message`]s. The buffer grows with the bytes
/// that arrive, never with the length a header announces.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_frame_len: usize,
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(DEFAULT_MAX_FRAME_LEN)
    }
}

impl FrameCodec {
    /// A codec that refuses bodies longer than `max_frame_len`.
    pub fn new(max_frame_len: usize) -> Self {
        FrameCodec { max_frame_len }
    }
}

/// Why the codec failed: a bad length, or the stream's I/O error.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// See [`FrameError`].
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The underlying stream failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, CodecError> {
        let Some(header) = src.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let len = parse_header(*header, self.max_frame_len)?;
        if src.len() < HEADER_LEN + len {
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        Ok(Some(src.split_to(len)))
    }
}

impl Encoder<&Message<'_>> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, msg: &Message<'_>, dst: &mut BytesMut) -> Result<(), CodecError> {
        let mut frame = Vec::new();
        msg.encode(&mut frame);
        dst.extend_from_slice(&frame);
        Ok(())
    }
}
