//! Framing: a `u32` little-endian length, then that many bytes of JSON.
//!
//! [`FrameDecoder`] is incremental: any split of a byte stream yields the same
//! frames. Complete frames are handed out straight from the caller's input
//! slice; only a trailing partial frame is copied, and the copy grows with the
//! bytes that actually arrived, never with the length a header announces.

use crate::error::FrameError;

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 4;

/// Default and protocol maximum of a frame body: 64 MiB.
pub const DEFAULT_MAX_FRAME_LEN: usize = 64 * 1024 * 1024;

/// Buffer capacity kept between frames; larger buffers are released once empty.
const RETAINED_CAPACITY: usize = 64 * 1024;

/// Checks a frame header and returns the body length it announces.
pub fn parse_header(header: [u8; HEADER_LEN], max_frame_len: usize) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(header) as usize;
    if len == 0 || len > max_frame_len {
        return Err(FrameError::BadLength {
            len,
            max: max_frame_len,
        });
    }
    Ok(len)
}

/// Appends a frame holding `body` to `out`.
///
/// # Panics
/// If `body` is empty or longer than `u32::MAX`; the messages of this crate never are.
pub fn encode_frame(body: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(body.len()).expect("frame body fits in u32");
    assert!(len > 0, "frame body is never empty");
    out.reserve(HEADER_LEN + body.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(body);
}

/// Writes a frame whose body is produced by `write_body` straight into `out`,
/// then fills in the header. Returns the body length.
pub fn encode_frame_with(out: &mut Vec<u8>, write_body: impl FnOnce(&mut Vec<u8>)) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    write_body(out);
    let len = out.len() - start - HEADER_LEN;
    let len32 = u32::try_from(len).expect("frame body fits in u32");
    out[start..start + HEADER_LEN].copy_from_slice(&len32.to_le_bytes());
    len
}

/// Incremental frame decoder.
///
/// ```
/// use donate_proto::frame::{encode_frame, FrameDecoder};
/// let mut wire = Vec::new();
/// encode_frame(br#"{"v":1}"#, &mut wire);
/// let mut decoder = FrameDecoder::new(1024);
/// let mut frames = Vec::new();
/// for byte in &wire {
///     decoder.feed(std::slice::from_ref(byte), |body| frames.push(body.to_vec())).unwrap();
/// }
/// assert_eq!(frames, vec![br#"{"v":1}"#.to_vec()]);
/// ```
#[derive(Debug)]
pub struct FrameDecoder {
    /// A partial frame (header and body so far), never a complete one.
    partial: Vec<u8>,
    max_frame_len: usize,
    failed: bool,
}

impl FrameDecoder {
    /// A decoder that refuses bodies longer than `max_frame_len` bytes.
    pub fn new(max_frame_len: usize) -> Self {
        FrameDecoder {
            partial: Vec::new(),
            max_frame_len,
            failed: false,
        }
    }

    /// Feeds `data` and calls `on_frame` with each complete frame body, in order.
    ///
    /// A bad length is fatal: the stream is out of sync, the decoder drops its
    /// buffer and refuses all further input with the same error.
    pub fn feed(
        &mut self,
        mut data: &[u8],
        mut on_frame: impl FnMut(&[u8]),
    ) -> Result<(), FrameError> {
        if self.failed {
            return Err(FrameError::Failed);
        }
        if !self.partial.is_empty() {
            data = self.complete_partial(data, &mut on_frame)?;
        }
        loop {
            match self.frame_end(data) {
                Ok(Some(end)) => {
                    on_frame(&data[HEADER_LEN..end]);
                    data = &data[end..];
                }
                Ok(None) => break,
                Err(e) => return Err(self.fail(e)),
            }
        }
        if !data.is_empty() {
            self.buffer(data);
        } else if self.partial.is_empty() && self.partial.capacity() > RETAINED_CAPACITY {
            self.partial = Vec::new();
        }
        Ok(())
    }

    /// Whether a partial frame is buffered (the peer is in the middle of a frame).
    pub fn has_partial(&self) -> bool {
        !self.partial.is_empty()
    }

    /// Bytes of a partial frame currently buffered.
    pub fn buffered_len(&self) -> usize {
        self.partial.len()
    }

    /// Heap bytes this decoder holds (its buffer's capacity).
    pub fn allocated(&self) -> usize {
        self.partial.capacity()
    }

    /// The configured body limit.
    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }

    /// `Some(end)` when `data` starts with a complete frame ending at `end`.
    fn frame_end(&self, data: &[u8]) -> Result<Option<usize>, FrameError> {
        let Some(header) = data.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let len = parse_header(*header, self.max_frame_len)?;
        let end = HEADER_LEN + len;
        Ok((data.len() >= end).then_some(end))
    }

    /// Moves bytes from `data` into the partial frame; hands it out once complete.
    fn complete_partial<'d>(
        &mut self,
        mut data: &'d [u8],
        on_frame: &mut impl FnMut(&[u8]),
    ) -> Result<&'d [u8], FrameError> {
        if self.partial.len() < HEADER_LEN {
            let take = (HEADER_LEN - self.partial.len()).min(data.len());
            self.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.partial.len() < HEADER_LEN {
                return Ok(data);
            }
        }
        let header = *self
            .partial
            .first_chunk::<HEADER_LEN>()
            .expect("header buffered");
        let len = parse_header(header, self.max_frame_len).map_err(|e| self.fail(e))?;
        let end = HEADER_LEN + len;
        let take = (end - self.partial.len()).min(data.len());
        self.buffer(&data[..take]);
        data = &data[take..];
        if self.partial.len() == end {
            on_frame(&self.partial[HEADER_LEN..]);
            // Keep the capacity while frames keep spanning reads; `feed`
            // releases it once a read ends on a frame boundary.
            self.partial.clear();
        }
        Ok(data)
    }

    /// Appends to the partial frame, growing capacity at most to the frame's end
    /// and at most to twice what has arrived (so memory follows received bytes).
    fn buffer(&mut self, data: &[u8]) {
        let needed = self.partial.len() + data.len();
        if needed > self.partial.capacity() {
            let target = needed.max(self.partial.capacity() * 2).max(HEADER_LEN * 4);
            let header = if self.partial.is_empty() {
                data.first_chunk::<HEADER_LEN>()
            } else {
                self.partial.first_chunk::<HEADER_LEN>()
            };
            let target = match header {
                Some(h) => target.min(needed.max(HEADER_LEN + u32::from_le_bytes(*h) as usize)),
                None => target,
            };
            self.partial.reserve_exact(target - self.partial.len());
        }
        self.partial.extend_from_slice(data);
    }

    fn fail(&mut self, e: FrameError) -> FrameError {
        self.failed = true;
        self.partial = Vec::new();
        e
    }
}
