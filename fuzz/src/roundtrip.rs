//! `roundtrip`: structured messages, made by derived `Arbitrary`, encode and
//! decode back equal.
//!
//! Each message is encoded with `Message::encode`, the whole stream is decoded
//! with a [`FrameDecoder`] and every frame parsed: the messages must come back
//! equal, in order. A `weights_chunk` built by `encode_weights_chunk` must be
//! byte for byte the frame of the same `WeightsChunk` message, and its data
//! must decode back to the raw bytes.

use std::borrow::Cow;

use arbitrary::{Arbitrary, Unstructured};
use base64::Engine as _;
use donate_proto::frame::{FrameDecoder, DEFAULT_MAX_FRAME_LEN};
use donate_proto::message::{
    encode_weights_chunk, ErrorFrame, Hello, Infer, InferResult, ModelBegin, ModelStatus, Prompt,
    PromptResult, QueueStatus, WeightsChunk,
};
use donate_proto::Message;

use crate::common::check_roundtrip;

/// A mirror of [`Message`] that derives `Arbitrary`.
#[derive(Arbitrary, Debug, Clone)]
#[allow(missing_docs)]
pub enum AnyMessage {
    Hello {
        mode: String,
        role: String,
        local_lm_path: String,
        queue_capacity: i64,
    },
    ModelBegin {
        config_json: String,
        weights_len: i64,
        weights_sha256: String,
        offset: i64,
        name: String,
    },
    WeightsChunk {
        index: i64,
        last: bool,
        data_b64: String,
    },
    /// A chunk of raw bytes, encoded by `encode_weights_chunk`.
    WeightsChunkRaw {
        index: i64,
        last: bool,
        raw: Vec<u8>,
    },
    ModelCommit,
    ModelStatus {
        ok: bool,
        message: String,
    },
    Infer {
        job_id: String,
        input_ids: Vec<i32>,
        max_tokens: i64,
    },
    InferResult {
        job_id: String,
        ok: bool,
        output_ids: Vec<i32>,
        error: String,
        code: String,
        queue_depth: i64,
    },
    Prompt {
        job_id: String,
        prompt: String,
        max_out: i64,
    },
    PromptResult {
        job_id: String,
        ok: bool,
        text: String,
        error: String,
        code: String,
        queue_depth: i64,
    },
    QueueStatusRequest,
    QueueStatus {
        depth: i64,
        capacity: i64,
        in_progress: bool,
    },
    Error {
        code: String,
        error: String,
        job_id: String,
    },
}

/// Number of [`AnyMessage`] variants (for seeds).
pub const VARIANTS: u64 = 13;

impl AnyMessage {
    /// The message this stands for.
    pub fn to_message(&self) -> Message<'static> {
        let s = |s: &String| s.clone();
        match self {
            AnyMessage::Hello {
                mode,
                role,
                local_lm_path,
                queue_capacity,
            } => Message::Hello(Hello {
                mode: s(mode),
                role: s(role),
                local_lm_path: s(local_lm_path),
                queue_capacity: *queue_capacity,
                capabilities: Vec::new(),
            }),
            AnyMessage::ModelBegin {
                config_json,
                weights_len,
                weights_sha256,
                offset,
                name,
            } => Message::ModelBegin(ModelBegin {
                config_json: s(config_json),
                weights_len: *weights_len,
                weights_sha256: s(weights_sha256),
                offset: *offset,
                name: s(name),
            }),
            AnyMessage::WeightsChunk {
                index,
                last,
                data_b64,
            } => Message::WeightsChunk(WeightsChunk {
                index: *index,
                last: *last,
                data_b64: Cow::Owned(s(data_b64)),
            }),
            AnyMessage::WeightsChunkRaw { index, last, raw } => {
                Message::WeightsChunk(WeightsChunk {
                    index: *index,
                    last: *last,
                    data_b64: Cow::Owned(base64::engine::general_purpose::STANDARD.encode(raw)),
                })
            }
            AnyMessage::ModelCommit => Message::ModelCommit,
            AnyMessage::ModelStatus { ok, message } => Message::ModelStatus(ModelStatus {
                ok: *ok,
                message: s(message),
            }),
            AnyMessage::Infer {
                job_id,
                input_ids,
                max_tokens,
            } => Message::Infer(Infer {
                job_id: s(job_id),
                input_ids: input_ids.clone(),
                max_tokens: *max_tokens,
                deadline_ms: 0,
                sampling: Default::default(),
            }),
            AnyMessage::InferResult {
                job_id,
                ok,
                output_ids,
                error,
                code,
                queue_depth,
            } => Message::InferResult(InferResult {
                job_id: s(job_id),
                ok: *ok,
                output_ids: output_ids.clone(),
                error: s(error),
                code: s(code),
                queue_depth: *queue_depth,
            }),
            AnyMessage::Prompt {
                job_id,
                prompt,
                max_out,
            } => Message::Prompt(Prompt {
                job_id: s(job_id),
                prompt: s(prompt),
                max_out: *max_out,
                deadline_ms: 0,
                sampling: Default::default(),
                ..Prompt::default()
            }),
            AnyMessage::PromptResult {
                job_id,
                ok,
                text,
                error,
                code,
                queue_depth,
            } => Message::PromptResult(PromptResult {
                job_id: s(job_id),
                ok: *ok,
                text: s(text),
                error: s(error),
                code: s(code),
                queue_depth: *queue_depth,
                usage: None,
            }),
            AnyMessage::QueueStatusRequest => Message::QueueStatusRequest,
            AnyMessage::QueueStatus {
                depth,
                capacity,
                in_progress,
            } => Message::QueueStatus(QueueStatus {
                depth: *depth,
                capacity: *capacity,
                in_progress: *in_progress,
            }),
            AnyMessage::Error {
                code,
                error,
                job_id,
            } => Message::Error(ErrorFrame {
                code: s(code),
                error: s(error),
                job_id: s(job_id),
            }),
        }
    }
}

/// The `roundtrip` target.
pub fn run(data: &[u8]) {
    let u = Unstructured::new(data);
    let Ok(msgs) = Vec::<AnyMessage>::arbitrary_take_rest(u) else {
        return;
    };
    let mut stream = Vec::new();
    let mut expected = Vec::new();
    for any in &msgs {
        let msg = any.to_message();
        let start = stream.len();
        msg.encode(&mut stream);
        if let AnyMessage::WeightsChunkRaw { index, last, raw } = any {
            let mut direct = Vec::new();
            encode_weights_chunk(*index, *last, raw, &mut direct);
            assert_eq!(
                String::from_utf8_lossy(&direct),
                String::from_utf8_lossy(&stream[start..]),
                "encode_weights_chunk differs from encoding the message"
            );
        }
        let back = check_roundtrip(&stream[start + 4..]).expect("an encoded message parses");
        assert_eq!(back, msg, "message changed on the way");
        expected.push(msg);
    }
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
    let mut got = Vec::new();
    decoder
        .feed(&stream, |body| {
            got.push(Message::parse(body).expect("parses").into_owned())
        })
        .expect("a stream of encoded messages decodes");
    assert!(!decoder.has_partial());
    assert_eq!(got, expected);
    for (any, msg) in msgs.iter().zip(&got) {
        if let (AnyMessage::WeightsChunkRaw { raw, .. }, Message::WeightsChunk(c)) = (any, msg) {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(c.data_b64.as_bytes())
                .expect("valid base64");
            assert_eq!(&decoded, raw);
        }
    }
}
