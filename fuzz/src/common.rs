//! Helpers shared by the harnesses.

use arbitrary::{Arbitrary, Unstructured};
use donate_proto::frame::encode_frame;
use donate_proto::Message;

/// One step of a script (a target's `Op`): read by derived `Arbitrary`,
/// written back by [`to_bytes`](Step::to_bytes) for seeds.
pub trait Step: for<'a> Arbitrary<'a> {
    /// The bytes `Arbitrary` reads back as `self` (without an input's payload).
    fn to_bytes(&self) -> Vec<u8>;
    /// How many raw bytes follow this step in the input, if it is an input step.
    fn payload_len(&self) -> Option<usize>;
    /// The input step carrying `len` bytes to `to` (a connection, where a target has several).
    fn input(to: u8, len: u16) -> Self;
}

/// Builds a target's input (for seeds): its config's bytes, then steps.
#[derive(Debug, Clone)]
pub struct Script<O> {
    bytes: Vec<u8>,
    ops: Vec<(O, Vec<u8>)>,
}

impl<O: Step> Script<O> {
    /// A script starting with the config's bytes.
    pub fn new(cfg: Vec<u8>) -> Self {
        Script {
            bytes: cfg,
            ops: Vec::new(),
        }
    }

    /// Appends a step.
    pub fn op(mut self, op: O) -> Self {
        assert!(op.payload_len().is_none(), "use input()");
        self.bytes.extend(op.to_bytes());
        self.ops.push((op, Vec::new()));
        self
    }

    /// Appends raw bytes for `to`, in input steps of at most 64 KiB.
    pub fn input(mut self, to: u8, data: &[u8]) -> Self {
        for piece in data.chunks(u16::MAX as usize) {
            let op = O::input(to, piece.len() as u16);
            self.bytes.extend(op.to_bytes());
            self.bytes.extend_from_slice(piece);
            self.ops.push((op, piece.to_vec()));
        }
        self
    }

    /// The steps so far, with their payloads.
    pub fn ops(&self) -> &[(O, Vec<u8>)] {
        &self.ops
    }

    /// The fuzz input.
    pub fn bytes(&self) -> Vec<u8> {
        self.bytes.clone()
    }
}

/// A script's steps, each with the bytes that follow it.
pub type Steps<'a, O> = Vec<(O, &'a [u8])>;

/// Most steps a script runs.
pub const MAX_OPS: usize = 2000;

/// Reads a script: the config, then steps with their payloads.
pub fn parse<'a, C: Arbitrary<'a>, O: Step>(data: &'a [u8]) -> Option<(C, Steps<'a, O>)> {
    let mut u = Unstructured::new(data);
    let cfg = C::arbitrary(&mut u).ok()?;
    let mut ops = Vec::new();
    while !u.is_empty() && ops.len() < MAX_OPS {
        let Ok(op) = O::arbitrary(&mut u) else { break };
        let payload = match op.payload_len() {
            Some(len) => u.bytes(len.min(u.len())).ok()?,
            None => &[][..],
        };
        ops.push((op, payload));
    }
    Some((cfg, ops))
}

/// The `u32` that derived `Arbitrary` reads as variant `index` of `count`.
pub fn variant_tag(index: u64, count: u64) -> [u8; 4] {
    let tag = (index << 32).div_ceil(count);
    (tag as u32).to_le_bytes()
}

/// The frames docs/PROTOCOL.md shows the Go node writing, in session order.
pub const GO_NODE_EXAMPLES: [&str; 4] = [
    r#"{"v":1,"type":"hello","mode":"model_push","role":"server","queue_capacity":64}"#,
    r#"{"v":1,"type":"model_status","ok":true,"message":"mounted"}"#,
    r#"{"v":1,"type":"infer_result","job_id":"j1","ok":true,"output_ids":[9,9,1,2,3],"queue_depth":0}"#,
    r#"{"error":"model not mounted","type":"error","v":1}"#,
];

/// The frames docs/PROTOCOL.md shows the Go client writing, in session order.
pub const GO_CLIENT_EXAMPLES: [&str; 6] = [
    r#"{"v":1,"type":"hello","mode":"model_push","role":"client"}"#,
    r#"{"v":1,"type":"model_begin","config_json":"{\"ok\":true}","weights_len":4}"#,
    r#"{"v":1,"type":"weights_chunk","index":0,"last":true,"data_b64":"AQIDBA=="}"#,
    r#"{"v":1,"type":"model_commit"}"#,
    r#"{"v":1,"type":"infer","job_id":"j1","input_ids":[9,9],"max_tokens":3}"#,
    r#"{"v":1,"type":"prompt","job_id":"p1","prompt":"hello world"}"#,
];

/// The `type`s a server may send.
pub const SERVER_TYPES: [&str; 6] = [
    "hello",
    "model_status",
    "infer_result",
    "prompt_result",
    "queue_status",
    "error",
];

/// Frames `bodies` one after the other.
pub fn frames<'a>(bodies: impl IntoIterator<Item = &'a str>) -> Vec<u8> {
    let mut out = Vec::new();
    for body in bodies {
        encode_frame(body.as_bytes(), &mut out);
    }
    out
}

/// Encodes `msgs` as frames.
pub fn encode_all(msgs: &[Message<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        m.encode(&mut out);
    }
    out
}

/// Whether a message is one a server sends (a `queue_status` must carry its fields).
pub fn is_server_message(m: &Message<'_>) -> bool {
    matches!(
        m,
        Message::Hello(_)
            | Message::ModelStatus(_)
            | Message::InferResult(_)
            | Message::PromptResult(_)
            | Message::QueueStatus(_)
            | Message::Error(_)
            | Message::InferPartial(_)
            | Message::PromptPartial(_)
    )
}

/// Whether a message is one a client sends.
pub fn is_client_message(m: &Message<'_>) -> bool {
    matches!(
        m,
        Message::Hello(_)
            | Message::ModelBegin(_)
            | Message::WeightsChunk(_)
            | Message::ModelCommit
            | Message::Infer(_)
            | Message::Prompt(_)
            | Message::QueueStatusRequest
    )
}

/// Parses `body`, re-encodes it, and checks that the encoding parses back equal
/// and is stable (a second encoding gives the same bytes). Returns the message.
pub fn check_roundtrip(body: &[u8]) -> Option<Message<'_>> {
    let msg = Message::parse(body).ok()?;
    let json = msg.to_json();
    let again = Message::parse(&json).unwrap_or_else(|e| {
        panic!(
            "re-encoded {:?} does not parse: {e}\nfrom {:?}",
            String::from_utf8_lossy(&json),
            String::from_utf8_lossy(body)
        )
    });
    assert_eq!(again, msg, "re-encoding changed the message");
    assert_eq!(again.to_json(), json, "encoding is not stable");
    let mut framed = Vec::new();
    msg.encode(&mut framed);
    let mut expected = Vec::new();
    encode_frame(&json, &mut expected);
    assert_eq!(framed, expected, "encode() differs from framing to_json()");
    assert_eq!(msg.clone().into_owned(), msg);
    Some(msg)
}
