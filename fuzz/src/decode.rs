//! `decode`: arbitrary bytes, split at chosen points, through [`FrameDecoder`]
//! and [`Message::parse`].
//!
//! Input layout: `u16` LE max frame length (0 = the 64 MiB default), one byte
//! `n` (taken mod 32), `n` split offsets as `u16` LE, then the stream.
//!
//! Asserted: no panic; the same frames and the same error whatever the split
//! (whole, at the chosen points, one byte at a time); the decoder's buffer never
//! exceeds `max_frame_len + HEADER_LEN + SLACK`, never more than twice the bytes
//! received, grows only with the bytes of the partial frame and never past that
//! frame's end; whatever parses re-encodes and parses back equal.

use donate_proto::frame::{parse_header, FrameDecoder, DEFAULT_MAX_FRAME_LEN, HEADER_LEN};
use donate_proto::FrameError;

use crate::common::check_roundtrip;

/// Allowance on top of a frame for the decoder's buffer (its minimum allocation).
pub const SLACK: usize = 64;
/// The decoder's smallest buffer allocation.
const MIN_ALLOC: usize = 4 * HEADER_LEN;

/// Splits the fuzz input into (max_frame_len, split offsets, stream).
pub fn layout(data: &[u8]) -> (usize, Vec<usize>, &[u8]) {
    let Some((head, rest)) = data.split_first_chunk::<3>() else {
        return (DEFAULT_MAX_FRAME_LEN, Vec::new(), &[]);
    };
    let max = match u16::from_le_bytes([head[0], head[1]]) {
        0 => DEFAULT_MAX_FRAME_LEN,
        n => n as usize,
    };
    let n = (head[2] % 32) as usize;
    let n = n.min(rest.len() / 2);
    let (splits, stream) = rest.split_at(n * 2);
    let mut points: Vec<usize> = splits
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]) as usize % (stream.len() + 1))
        .collect();
    points.sort_unstable();
    (max, points, stream)
}

/// Builds a fuzz input from its parts (used by the seed generator).
pub fn input(max_frame_len: u16, splits: &[u16], stream: &[u8]) -> Vec<u8> {
    let mut out = max_frame_len.to_le_bytes().to_vec();
    out.push(splits.len() as u8);
    for s in splits {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out.extend_from_slice(stream);
    out
}

/// What a decoder made of a stream.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    frames: Vec<Vec<u8>>,
    error: Option<FrameError>,
    buffered: usize,
}

/// Feeds `stream` in the pieces `chunks` names, checking memory after every feed.
fn decode_in(
    max: usize,
    stream: &[u8],
    chunks: impl Iterator<Item = std::ops::Range<usize>>,
) -> Outcome {
    let mut decoder = FrameDecoder::new(max);
    let mut frames: Vec<Vec<u8>> = Vec::new();
    let mut error = None;
    let mut consumed = 0; // stream offset just past the last complete frame
    let mut largest_end = 0; // largest header + body whose header has arrived
    let mut seen = 0; // frames accounted for in `consumed`
    for range in chunks {
        let received = range.end;
        let chunk = &stream[range];
        let before_alloc = decoder.allocated();
        let before_buffered = decoder.buffered_len();
        let result = decoder.feed(chunk, |body| frames.push(body.to_vec()));
        if error.is_some() {
            assert_eq!(
                result,
                Err(FrameError::Failed),
                "input accepted after an error"
            );
            assert_eq!(decoder.allocated(), 0);
            continue;
        }
        if let Err(e) = result {
            assert!(matches!(e, FrameError::BadLength { .. }), "{e:?}");
            assert_eq!(decoder.allocated(), 0, "buffer kept after a framing error");
            error = Some(e);
            continue;
        }
        for f in &frames[seen..] {
            consumed += HEADER_LEN + f.len();
            largest_end = largest_end.max(HEADER_LEN + f.len());
        }
        seen = frames.len();
        let buffered = decoder.buffered_len();
        assert_eq!(consumed + buffered, received, "bytes lost or duplicated");
        assert_eq!(decoder.has_partial(), buffered > 0);
        if let Some(h) = stream[consumed..].first_chunk::<HEADER_LEN>() {
            if buffered >= HEADER_LEN {
                let len = parse_header(*h, max).expect("a buffered header is valid");
                assert!(
                    buffered < HEADER_LEN + len,
                    "a complete frame left buffered"
                );
                largest_end = largest_end.max(HEADER_LEN + len);
            }
        }
        let alloc = decoder.allocated();
        assert!(
            alloc <= max.saturating_add(HEADER_LEN + SLACK),
            "decoder holds {alloc} bytes, limit {max} + header + {SLACK}"
        );
        assert!(
            alloc <= 2 * received + MIN_ALLOC,
            "decoder holds {alloc} bytes after receiving {received}"
        );
        if alloc > before_alloc {
            let arrived = before_buffered + chunk.len();
            assert!(
                alloc <= (2 * arrived).max(MIN_ALLOC),
                "buffer grew to {alloc} with {arrived} bytes of partial frames"
            );
            assert!(
                alloc <= largest_end.max(MIN_ALLOC),
                "buffer grew to {alloc}, past the frame's end {largest_end}"
            );
        }
    }
    Outcome {
        frames,
        error,
        buffered: decoder.buffered_len(),
    }
}

/// The `decode` target.
pub fn run(data: &[u8]) {
    let (max, points, stream) = layout(data);
    if std::env::var_os("DONATE_FUZZ_TRACE").is_some() {
        eprintln!(
            "max_frame_len {max}, splits {points:?}, stream {:?}",
            String::from_utf8_lossy(stream)
        );
    }
    let whole = decode_in(max, stream, std::iter::once(0..stream.len()));
    let mut bounds = vec![0];
    bounds.extend(points.iter().copied());
    bounds.push(stream.len());
    let split = decode_in(max, stream, bounds.windows(2).map(|w| w[0]..w[1]));
    assert_eq!(split, whole, "split at {points:?} changed the frames");
    if stream.len() <= 4096 {
        let bytes = decode_in(max, stream, (0..stream.len()).map(|i| i..i + 1));
        assert_eq!(bytes, whole, "one byte at a time changed the frames");
    }
    for body in &whole.frames {
        check_roundtrip(body);
    }
}
