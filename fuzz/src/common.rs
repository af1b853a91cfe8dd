//! Helpers shared by the harnesses.

use donate_proto::frame::encode_frame;
use donate_proto::Message;

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
