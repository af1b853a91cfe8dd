//! The frame codec as `tokio_util::codec::{Decoder, Encoder}`, for framing your own streams.

use bytes::{Buf, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use donate_proto::frame::{parse_header, DEFAULT_MAX_FRAME_LEN, HEADER_LEN};
use donate_proto::{FrameError, Message};

/// Frames of `u32` LE length + JSON body. Decodes to the body bytes (parse them
/// with [`Message::parse`]); encodes the same body bytes back into a frame
/// (`BytesMut`, so a decoded frame can be forwarded as is), or a [`Message`]. The buffer grows with the bytes
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

impl Encoder<BytesMut> for FrameCodec {
    type Error = CodecError;

    /// Frames `body`; a body of 0 bytes or over the limit is refused, as the decoder refuses it.
    fn encode(&mut self, body: BytesMut, dst: &mut BytesMut) -> Result<(), CodecError> {
        if body.is_empty() || body.len() > self.max_frame_len {
            return Err(FrameError::BadLength {
                len: body.len(),
                max: self.max_frame_len,
            }
            .into());
        }
        dst.reserve(HEADER_LEN + body.len());
        dst.extend_from_slice(&(body.len() as u32).to_le_bytes());
        dst.extend_from_slice(&body);
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decoded_frame_encodes_back_to_the_same_bytes() {
        let mut codec = FrameCodec::new(64);
        let mut wire = BytesMut::new();
        codec
            .encode(&Message::QueueStatusRequest, &mut wire)
            .unwrap();
        let original = wire.clone();
        let body = codec.decode(&mut wire).unwrap().expect("one whole frame");
        let mut again = BytesMut::new();
        codec.encode(body, &mut again).unwrap();
        assert_eq!(again, original);
        let too_long = BytesMut::from(&[b'x'; 65][..]);
        assert!(codec.encode(too_long, &mut again).is_err());
        assert!(codec.encode(BytesMut::new(), &mut again).is_err());
    }
}
