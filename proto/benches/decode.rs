//! Decoder throughput (issue 6): small frames per second and 1 MiB chunk frames
//! per second, each beside a `memcpy` of the same bytes measured in the same run.
//!
//! `cargo bench -p donate-proto --bench decode` (add `-- --quick` for a short run).
//!
//! - `small_frames/*`: 10,000 `infer` frames in one buffer, through
//!   `FrameDecoder::feed` (and `Message::parse`), as elements (frames/s) and as bytes.
//! - `chunk_frames/*`: 8 `weights_chunk` frames of 1 MiB raw each (1.33 MiB of
//!   base64 on the wire) in one buffer, through `feed`, `parse`, and
//!   `Upload::chunk` (base64 decoded into the model buffer). Throughput counts
//!   wire bytes; the payload is 3/4 of them.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use donate_proto::frame::{FrameDecoder, DEFAULT_MAX_FRAME_LEN};
use donate_proto::message::{encode_weights_chunk, Infer, ModelBegin};
use donate_proto::Message;
use donate_proto::Upload;

const SMALL_FRAMES: usize = 10_000;
const CHUNK_RAW: usize = 1024 * 1024;
const CHUNKS: usize = 8;

/// 10,000 `infer` frames as a client sends them, back to back.
fn infer_frames() -> Vec<u8> {
    let mut wire = Vec::new();
    for i in 0..SMALL_FRAMES {
        Message::Infer(Infer {
            job_id: format!("j{i}"),
            input_ids: vec![1, 2, 3, 4, 5, 6, 7, 8],
            max_tokens: 8,
            deadline_ms: 0,
            sampling: Default::default(),
        })
        .encode(&mut wire);
    }
    wire
}

/// `CHUNKS` chunk frames of 1 MiB of pseudo-random raw bytes each.
fn chunk_frames() -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let raw: Vec<u8> = (0..CHUNK_RAW)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let mut wire = Vec::new();
    for i in 0..CHUNKS {
        encode_weights_chunk(i as i64, i + 1 == CHUNKS, &raw, &mut wire);
    }
    wire
}

/// Feeds `wire` in one piece and counts the frames.
fn feed(wire: &[u8]) -> usize {
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
    let mut frames = 0;
    decoder.feed(wire, |_| frames += 1).expect("valid stream");
    frames
}

/// Feeds `wire` and parses every frame.
fn feed_parse(wire: &[u8]) -> usize {
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
    let mut frames = 0;
    decoder
        .feed(wire, |body| {
            black_box(Message::parse(body).expect("valid message"));
            frames += 1;
        })
        .expect("valid stream");
    frames
}

/// Feeds `wire`, parses every chunk, and decodes it into `upload`'s model buffer.
fn feed_parse_upload(wire: &[u8], mut upload: Upload) -> Upload {
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
    decoder
        .feed(wire, |body| match Message::parse(body).expect("valid") {
            Message::WeightsChunk(chunk) => upload.chunk(&chunk).expect("chunk fits"),
            other => panic!("unexpected {}", other.kind()),
        })
        .expect("valid stream");
    upload
}

fn new_upload() -> Upload {
    let begin = ModelBegin {
        config_json: "{}".to_owned(),
        weights_len: (CHUNKS * CHUNK_RAW) as i64,
        ..ModelBegin::default()
    };
    Upload::begin(begin, u64::MAX).expect("valid begin")
}

/// Copies `src` into `dst` (allocated and touched beforehand).
fn memcpy(src: &[u8], dst: &mut [u8]) {
    dst.copy_from_slice(black_box(src));
    black_box(dst);
}

fn small_frames(c: &mut Criterion) {
    let wire = infer_frames();
    let mut dst = vec![1u8; wire.len()];

    let mut group = c.benchmark_group("small_frames");
    group.throughput(Throughput::Elements(SMALL_FRAMES as u64));
    group.bench_function("feed+parse frames", |b| b.iter(|| feed_parse(&wire)));
    group.throughput(Throughput::Bytes(wire.len() as u64));
    group.bench_function("feed", |b| b.iter(|| feed(&wire)));
    group.bench_function("feed+parse", |b| b.iter(|| feed_parse(&wire)));
    group.bench_function("memcpy", |b| b.iter(|| memcpy(&wire, &mut dst)));
    group.finish();
}

fn chunk_frames_bench(c: &mut Criterion) {
    let wire = chunk_frames();
    let mut dst = vec![1u8; wire.len()];

    let mut group = c.benchmark_group("chunk_frames");
    group.throughput(Throughput::Bytes(wire.len() as u64));
    group.bench_function("feed", |b| b.iter(|| feed(&wire)));
    group.bench_function("feed+parse", |b| b.iter(|| feed_parse(&wire)));
    // A fresh upload each time, as on a server: the model buffer's growth and
    // first-touch page faults are part of the cost; dropping it is not timed.
    group.bench_function("feed+parse+upload", |b| {
        b.iter_batched(
            new_upload,
            |upload| feed_parse_upload(&wire, upload),
            BatchSize::PerIteration,
        )
    });
    group.bench_function("memcpy", |b| b.iter(|| memcpy(&wire, &mut dst)));
    group.finish();
}

criterion_group!(benches, small_frames, chunk_frames_bench);
criterion_main!(benches);
