//! Byte-exact test vectors from docs/PROTOCOL.md, and the Stub's outputs.

use std::borrow::Cow;

use donate_proto::error::{MountError, ProtocolError};
use donate_proto::frame::encode_frame;
use donate_proto::message::{
    encode_weights_chunk, ErrorFrame, Hello, Infer, InferResult, ModelBegin, ModelStatus, Prompt,
    PromptResult, QueueStatus, WeightsChunk,
};
use donate_proto::{Message, Mode, Stub};

/// Encodes `msg`, compares it with `wire`, and parses `wire` back into `msg`.
#[track_caller]
fn vector(msg: Message<'_>, wire: &str) {
    let encoded = msg.to_json();
    assert_eq!(
        std::str::from_utf8(&encoded).unwrap(),
        wire,
        "encoding of {msg:?}"
    );
    let parsed = Message::parse(wire.as_bytes()).unwrap();
    assert_eq!(parsed, msg, "parsing of {wire}");
    // `encode` is the same body behind a little-endian length.
    let mut framed = Vec::new();
    msg.encode(&mut framed);
    let mut expected = Vec::new();
    encode_frame(wire.as_bytes(), &mut expected);
    assert_eq!(framed, expected);
    assert_eq!(&framed[..4], &(wire.len() as u32).to_le_bytes());
}

#[test]
fn go_node_examples() {
    vector(
        Message::Hello(Hello {
            mode: "model_push".into(),
            role: "server".into(),
            local_lm_path: String::new(),
            queue_capacity: 64,
            capabilities: Vec::new(),
        }),
        r#"{"v":1,"type":"hello","mode":"model_push","role":"server","queue_capacity":64}"#,
    );
    vector(
        Message::ModelStatus(ModelStatus {
            ok: true,
            message: "mounted".into(),
        }),
        r#"{"v":1,"type":"model_status","ok":true,"message":"mounted"}"#,
    );
    vector(
        Message::InferResult(InferResult {
            job_id: "j1".into(),
            ok: true,
            output_ids: vec![9, 9, 1, 2, 3],
            error: String::new(),
            code: String::new(),
            queue_depth: 0,
        }),
        r#"{"v":1,"type":"infer_result","job_id":"j1","ok":true,"output_ids":[9,9,1,2,3],"queue_depth":0}"#,
    );
    vector(
        Message::Error(ErrorFrame {
            code: String::new(),
            error: "model not mounted".into(),
            job_id: String::new(),
        }),
        r#"{"error":"model not mounted","type":"error","v":1}"#,
    );
}

#[test]
fn go_client_examples() {
    vector(
        Message::Hello(Hello {
            mode: "model_push".into(),
            role: "client".into(),
            ..Hello::default()
        }),
        r#"{"v":1,"type":"hello","mode":"model_push","role":"client"}"#,
    );
    vector(
        Message::ModelBegin(ModelBegin {
            config_json: r#"{"ok":true}"#.into(),
            weights_len: 4,
            weights_sha256: String::new(),
            offset: 0,
            name: String::new(),
        }),
        r#"{"v":1,"type":"model_begin","config_json":"{\"ok\":true}","weights_len":4}"#,
    );
    vector(
        Message::WeightsChunk(WeightsChunk {
            index: 0,
            last: true,
            data_b64: Cow::Borrowed("AQIDBA=="),
        }),
        r#"{"v":1,"type":"weights_chunk","index":0,"last":true,"data_b64":"AQIDBA=="}"#,
    );
    vector(Message::ModelCommit, r#"{"v":1,"type":"model_commit"}"#);
    vector(
        Message::Infer(Infer {
            job_id: "j1".into(),
            input_ids: vec![9, 9],
            max_tokens: 3,
            deadline_ms: 0,
            sampling: Default::default(),
        }),
        r#"{"v":1,"type":"infer","job_id":"j1","input_ids":[9,9],"max_tokens":3}"#,
    );
    vector(
        Message::Prompt(Prompt {
            job_id: "p1".into(),
            prompt: "hello world".into(),
            max_out: 0,
            deadline_ms: 0,
            sampling: Default::default(),
            ..Default::default()
        }),
        r#"{"v":1,"type":"prompt","job_id":"p1","prompt":"hello world"}"#,
    );
}

#[test]
fn the_other_messages_follow_the_field_table() {
    // hello from a local_lm node: local_lm_path after role, before queue_capacity.
    vector(
        Message::Hello(Hello {
            mode: "local_lm".into(),
            role: "server".into(),
            local_lm_path: "/m/x.gguf".into(),
            queue_capacity: 2,
            capabilities: Vec::new(),
        }),
        r#"{"v":1,"type":"hello","mode":"local_lm","role":"server","local_lm_path":"/m/x.gguf","queue_capacity":2}"#,
    );
    // Every field of model_begin, and the "always" fields when zero.
    vector(
        Message::ModelBegin(ModelBegin {
            config_json: String::new(),
            weights_len: 0,
            weights_sha256: "ab".repeat(32),
            offset: 0,
            name: String::new(),
        }),
        &format!(
            r#"{{"v":1,"type":"model_begin","config_json":"","weights_len":0,"weights_sha256":"{}"}}"#,
            "ab".repeat(32)
        ),
    );
    vector(
        Message::WeightsChunk(WeightsChunk {
            index: 7,
            last: false,
            data_b64: Cow::Borrowed(""),
        }),
        r#"{"v":1,"type":"weights_chunk","index":7,"last":false,"data_b64":""}"#,
    );
    vector(
        Message::ModelStatus(ModelStatus {
            ok: false,
            message: String::new(),
        }),
        r#"{"v":1,"type":"model_status","ok":false}"#,
    );
    vector(
        Message::Infer(Infer {
            job_id: String::new(),
            input_ids: vec![],
            max_tokens: 0,
            deadline_ms: 0,
            sampling: Default::default(),
        }),
        r#"{"v":1,"type":"infer","job_id":""}"#,
    );
    vector(
        Message::Infer(Infer {
            job_id: "j".into(),
            input_ids: vec![-1, i32::MAX, i32::MIN],
            max_tokens: -5,
            deadline_ms: 0,
            sampling: Default::default(),
        }),
        r#"{"v":1,"type":"infer","job_id":"j","input_ids":[-1,2147483647,-2147483648],"max_tokens":-5}"#,
    );
    // A failed result: no output_ids, error then our code, queue_depth always.
    vector(
        Message::InferResult(InferResult {
            job_id: "j2".into(),
            ok: false,
            output_ids: vec![],
            error: "boom".into(),
            code: "executor_panicked".into(),
            queue_depth: 3,
        }),
        r#"{"v":1,"type":"infer_result","job_id":"j2","ok":false,"error":"boom","code":"executor_panicked","queue_depth":3}"#,
    );
    vector(
        Message::Prompt(Prompt {
            job_id: "p2".into(),
            prompt: String::new(),
            max_out: 12,
            deadline_ms: 0,
            sampling: Default::default(),
            ..Default::default()
        }),
        r#"{"v":1,"type":"prompt","job_id":"p2","prompt":"","max_out":12}"#,
    );
    vector(
        Message::PromptResult(PromptResult {
            job_id: "p1".into(),
            ok: true,
            text: "[prompt stub] stub says: hello world".into(),
            error: String::new(),
            code: String::new(),
            queue_depth: 0,
            ..Default::default()
        }),
        r#"{"v":1,"type":"prompt_result","job_id":"p1","ok":true,"text":"[prompt stub] stub says: hello world","queue_depth":0}"#,
    );
    vector(
        Message::PromptResult(PromptResult {
            job_id: String::new(),
            ok: false,
            text: String::new(),
            error: String::new(),
            code: String::new(),
            queue_depth: 0,
            ..Default::default()
        }),
        r#"{"v":1,"type":"prompt_result","job_id":"","ok":false,"queue_depth":0}"#,
    );
    vector(
        Message::QueueStatus(QueueStatus {
            depth: 2,
            capacity: 64,
            in_progress: true,
        }),
        r#"{"v":1,"type":"queue_status","depth":2,"capacity":64,"in_progress":true}"#,
    );
    // A server's queue_status is a status even when every field is zero.
    vector(
        Message::QueueStatus(QueueStatus::default()),
        r#"{"v":1,"type":"queue_status","depth":0,"capacity":0,"in_progress":false}"#,
    );
}

#[test]
fn queue_status_request_has_no_fields() {
    vector(
        Message::QueueStatusRequest,
        r#"{"v":1,"type":"queue_status"}"#,
    );
    // Any one of the status fields makes it a status.
    assert_eq!(
        Message::parse(br#"{"v":1,"type":"queue_status","in_progress":true}"#).unwrap(),
        Message::QueueStatus(QueueStatus {
            in_progress: true,
            ..QueueStatus::default()
        })
    );
    // An unknown field does not.
    assert_eq!(
        Message::parse(br#"{"type":"queue_status","x":1}"#).unwrap(),
        Message::QueueStatusRequest
    );
}

#[test]
fn error_frames_have_sorted_keys() {
    let e = ErrorFrame::new(&ProtocolError::QueueFull, None);
    assert_eq!(
        Message::Error(e).to_json(),
        br#"{"code":"queue_full","error":"queue full","type":"error","v":1}"#
    );
    vector(
        Message::Error(ErrorFrame::new(&ProtocolError::QueueFull, Some("j7"))),
        r#"{"code":"queue_full","error":"queue full","job_id":"j7","type":"error","v":1}"#,
    );
    vector(
        Message::Error(ErrorFrame {
            code: String::new(),
            error: "queue full".into(),
            job_id: String::new(),
        }),
        r#"{"error":"queue full","type":"error","v":1}"#,
    );
    vector(
        Message::Error(ErrorFrame {
            code: String::new(),
            error: String::new(),
            job_id: "j".into(),
        }),
        r#"{"error":"","job_id":"j","type":"error","v":1}"#,
    );
    // The keys of every error frame come out sorted.
    let frame = Message::Error(ErrorFrame::new(
        &ProtocolError::ModelNotMounted,
        Some("x<&>\"y"),
    ))
    .to_json();
    let text = std::str::from_utf8(&frame).unwrap();
    let keys: Vec<&str> = ["\"code\"", "\"error\"", "\"job_id\"", "\"type\"", "\"v\""]
        .into_iter()
        .collect();
    let positions: Vec<usize> = keys.iter().map(|k| text.find(k).unwrap()).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{text}");
}

#[test]
fn error_texts_are_gos_words() {
    let table = [
        (
            ProtocolError::ModelPushDisabled,
            "model_push not enabled on this node",
        ),
        (ProtocolError::BadWeightsLen, "bad weights_len"),
        (ProtocolError::WeightsBase64, "weights b64 decode"),
        (ProtocolError::WeightsOverflow, "weights overflow"),
        (
            ProtocolError::InferOnLocalLm,
            "this node is local_lm; send prompt, not infer",
        ),
        (ProtocolError::ModelNotMounted, "model not mounted"),
        (
            ProtocolError::PromptOnModelPush,
            "this node is model_push; mount model and send infer",
        ),
        (ProtocolError::QueueFull, "queue full"),
        (
            ProtocolError::UnknownType("bogus".into()),
            "unknown type: bogus",
        ),
    ];
    for (err, text) in table {
        assert_eq!(err.to_string(), text);
        assert!(!err.code().is_empty());
    }
    assert_eq!(
        MountError::SizeMismatch {
            got: 3,
            expected: 4
        }
        .to_string(),
        "weights size mismatch: got 3 expect 4"
    );
    assert_eq!(MountError::NoConfig.to_string(), "no config");
}

#[test]
fn unknown_fields_are_ignored() {
    let msg = Message::parse(
        br#"{"v":1,"type":"infer","future":{"a":[1,{"b":null}]},"job_id":"j1","input_ids":[9,9],"x":"y","max_tokens":3,"z":1.5}"#,
    )
    .unwrap();
    assert_eq!(
        msg,
        Message::Infer(Infer {
            job_id: "j1".into(),
            input_ids: vec![9, 9],
            max_tokens: 3,
            deadline_ms: 0,
            sampling: Default::default(),
        })
    );
    // Fields of other message types are unknown fields here too.
    let msg = Message::parse(
        br#"{"v":1,"type":"model_commit","job_id":"j","ok":true,"index":4,"data_b64":"AAAA"}"#,
    )
    .unwrap();
    assert_eq!(msg, Message::ModelCommit);
    // Field order on input does not matter.
    let msg =
        Message::parse(br#"{"role":"client","mode":"model_push","type":"hello","v":1}"#).unwrap();
    assert_eq!(
        msg,
        Message::Hello(Hello {
            mode: "model_push".into(),
            role: "client".into(),
            ..Hello::default()
        })
    );
}

#[test]
fn missing_and_null_fields_read_as_zero_values() {
    let zero_infer = Message::Infer(Infer::default());
    assert_eq!(
        Message::parse(br#"{"v":1,"type":"infer"}"#).unwrap(),
        zero_infer
    );
    assert_eq!(
        Message::parse(
            br#"{"v":null,"type":"infer","job_id":null,"input_ids":null,"max_tokens":null}"#
        )
        .unwrap(),
        zero_infer
    );
    // `v` may be missing.
    assert_eq!(
        Message::parse(br#"{"type":"model_commit"}"#).unwrap(),
        Message::ModelCommit
    );
    assert_eq!(
        Message::parse(br#"{"type":"hello"}"#).unwrap(),
        Message::Hello(Hello::default())
    );
    assert_eq!(
        Message::parse(br#"{"type":"weights_chunk","index":null,"last":null,"data_b64":null}"#)
            .unwrap(),
        Message::WeightsChunk(WeightsChunk::default())
    );
    assert_eq!(
        Message::parse(br#"{"type":"infer_result","ok":null}"#).unwrap(),
        Message::InferResult(InferResult::default())
    );
    assert_eq!(
        Message::parse(br#"{"type":"prompt_result","queue_depth":null}"#).unwrap(),
        Message::PromptResult(PromptResult::default())
    );
    assert_eq!(
        Message::parse(br#"{"type":"model_status"}"#).unwrap(),
        Message::ModelStatus(ModelStatus::default())
    );
    assert_eq!(
        Message::parse(br#"{"type":"model_begin","config_json":null}"#).unwrap(),
        Message::ModelBegin(ModelBegin::default())
    );
    assert_eq!(
        Message::parse(br#"{"type":"prompt"}"#).unwrap(),
        Message::Prompt(Prompt::default())
    );
    assert_eq!(
        Message::parse(br#"{"type":"error"}"#).unwrap(),
        Message::Error(ErrorFrame::default())
    );
    // Missing or null `type` is an unknown type with an empty name.
    for body in [&br#"{"v":1}"#[..], br#"{"v":1,"type":null}"#, b"{}"] {
        assert_eq!(
            Message::parse(body).unwrap_err(),
            ProtocolError::UnknownType(String::new())
        );
    }
}

#[test]
fn bad_bodies_are_classified() {
    assert_eq!(
        Message::parse(br#"{"v":1,"type":"bogus"}"#).unwrap_err(),
        ProtocolError::UnknownType("bogus".into())
    );
    assert_eq!(
        Message::parse(br#"{"v":2,"type":"hello"}"#).unwrap_err(),
        ProtocolError::BadVersion(2)
    );
    for body in [&b"[1,2]"[..], b"\"hello\"", b"17", b"null", b"true"] {
        assert_eq!(
            Message::parse(body).unwrap_err(),
            ProtocolError::NotObject,
            "{}",
            String::from_utf8_lossy(body)
        );
    }
    for body in [
        &br#"{"v":1,"type":"infer","job_id":5}"#[..],
        br#"{"v":1,"type":"infer","job_id":"j","input_ids":"abc"}"#,
        br#"{"v":1,"type":"infer","job_id":"j","input_ids":[1,2147483648]}"#,
        br#"{"v":1,"type":"weights_chunk","last":"yes"}"#,
        br#"{"v":"1","type":"hello"}"#,
        br#"{"v":1,"type":7}"#,
    ] {
        let err = Message::parse(body).unwrap_err();
        assert!(
            matches!(err, ProtocolError::BadField(_)),
            "{} gave {err:?}",
            String::from_utf8_lossy(body)
        );
        assert_eq!(err.code(), "bad_field");
    }
    for body in [
        &b"{"[..],
        b"{\"v\":1,",
        b"not json",
        b"{\"type\":\"hello\"} trailing",
        b"{\"type\":\"\xff\"}",
    ] {
        let err = Message::parse(body).unwrap_err();
        assert!(
            matches!(err, ProtocolError::BadJson(_)),
            "{} gave {err:?}",
            String::from_utf8_lossy(body)
        );
        assert_eq!(err.code(), "bad_json");
    }
}

#[test]
fn go_escapes_read_the_same() {
    // Go writes <, > and & as \u003c, \u003e, \u0026.
    let go = br#"{"v":1,"type":"prompt","job_id":"p1","prompt":"a \u003cb\u003e \u0026 c"}"#;
    assert_eq!(
        Message::parse(go).unwrap(),
        Message::Prompt(Prompt {
            job_id: "p1".into(),
            prompt: "a <b> & c".into(),
            max_out: 0,
            deadline_ms: 0,
            sampling: Default::default(),
            ..Default::default()
        })
    );
    // And escaped base64 text is still read.
    let chunk = br#"{"type":"weights_chunk","index":0,"last":true,"data_b64":"AQID\u0042A=="}"#;
    match Message::parse(chunk).unwrap() {
        Message::WeightsChunk(c) => assert_eq!(c.data_b64, "AQIDBA=="),
        other => panic!("{other:?}"),
    }
}

#[test]
fn parsed_chunks_borrow_their_base64() {
    let body = br#"{"v":1,"type":"weights_chunk","index":0,"last":true,"data_b64":"AQIDBA=="}"#;
    match Message::parse(body).unwrap() {
        Message::WeightsChunk(c) => assert!(matches!(c.data_b64, Cow::Borrowed("AQIDBA=="))),
        other => panic!("{other:?}"),
    }
    let owned = Message::parse(body).unwrap().into_owned();
    assert_eq!(owned, Message::parse(body).unwrap());
}

#[test]
fn encode_weights_chunk_matches_a_typed_chunk() {
    let raws: [&[u8]; 6] = [
        &[1, 2, 3, 4],
        &[],
        &[0],
        &[0xff, 0xfe],
        &[0xfb, 0xff, 0xbf, 0x00, 0x10],
        &[7; 1000],
    ];
    for (i, raw) in raws.iter().enumerate() {
        for (index, last) in [(0, true), (i as i64, false), (123_456_789_012, true)] {
            let mut fast = Vec::new();
            encode_weights_chunk(index, last, raw, &mut fast);
            let mut typed = Vec::new();
            Message::WeightsChunk(WeightsChunk {
                index,
                last,
                data_b64: Cow::Owned(b64(raw)),
            })
            .encode(&mut typed);
            assert_eq!(
                String::from_utf8_lossy(&fast),
                String::from_utf8_lossy(&typed)
            );
        }
    }
    let mut wire = Vec::new();
    encode_weights_chunk(0, true, &[1, 2, 3, 4], &mut wire);
    assert_eq!(
        &wire[4..],
        br#"{"v":1,"type":"weights_chunk","index":0,"last":true,"data_b64":"AQIDBA=="}"#
    );
    // Appends after what is already there.
    let mut out = b"xy".to_vec();
    encode_weights_chunk(1, false, &[0xfb], &mut out);
    assert_eq!(&out[..2], b"xy");
    assert_eq!(
        &out[6..],
        br#"{"v":1,"type":"weights_chunk","index":1,"last":false,"data_b64":"+w=="}"#
    );
}

/// Standard padded base64, written out independently of the crate's engine.
fn b64(raw: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in raw.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn modes_spell_as_on_the_wire() {
    assert_eq!(Mode::ModelPush.as_str(), "model_push");
    assert_eq!(Mode::LocalLm.to_string(), "local_lm");
    assert_eq!("local_lm".parse::<Mode>(), Ok(Mode::LocalLm));
    assert_eq!("model_push".parse::<Mode>(), Ok(Mode::ModelPush));
    assert!("LOCAL_LM".parse::<Mode>().is_err());
}

#[test]
fn stub_infer_outputs() {
    assert_eq!(Stub::infer_ids(&[9, 9], 3), [9, 9, 1, 2, 3]);
    assert_eq!(Stub::infer_ids(&[1], 0), [1, 1, 2, 3, 4, 5, 6, 7, 1]);
    assert_eq!(Stub::infer_ids(&[], -4), [1, 2, 3, 4, 5, 6, 7, 1]);
    assert_eq!(Stub::infer_ids(&[5], 100), [5, 1, 2, 3, 4, 5, 6, 7, 1]);
    assert_eq!(Stub::infer_ids(&[], 8), [1, 2, 3, 4, 5, 6, 7, 1]);
    assert_eq!(Stub::infer_ids(&[], 7), [1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(Stub::infer_ids(&[4, 4], 1), [4, 4, 1]);
    assert_eq!(Stub::infer_ids(&[], i64::MIN), [1, 2, 3, 4, 5, 6, 7, 1]);
}

#[test]
fn stub_prompt_replies() {
    let stub = Stub::default();
    let cases = [
        ("hello world", "[prompt stub] stub says: hello world"),
        ("", "[prompt stub] donate node online"),
        ("  \n\t ", "[prompt stub] donate node online"),
        ("is it on?", "[prompt stub] stub says: maybe"),
        ("  is it on?  ", "[prompt stub] stub says: maybe"),
        // The first 8 white-space separated words, joined by single spaces.
        (
            " one  two\tthree\nfour five six seven eight nine ten ",
            "[prompt stub] stub says: one two three four five six seven eight",
        ),
        // One-word rule, in any case, and it wins over everything else.
        (
            "Answer this. Reply with ONE word only: yes, no, or maybe. User question: why?",
            "maybe",
        ),
        ("reply with one word only: yes, no, or maybe", "maybe"),
        // What follows the last "user question:", trimmed.
        (
            "system: be nice\nUser question: what now\n",
            "[prompt stub] stub says: what now",
        ),
        (
            "user question: a\nUSER QUESTION:   the real one  ",
            "[prompt stub] stub says: the real one",
        ),
        (
            "context. user question: is it?",
            "[prompt stub] stub says: maybe",
        ),
        (
            "context. user question:   ",
            "[prompt stub] donate node online",
        ),
        // The original case is kept.
        (
            "User Question: Hello There",
            "[prompt stub] stub says: Hello There",
        ),
        // "?" only counts at the end.
        ("what? no", "[prompt stub] stub says: what? no"),
    ];
    for (prompt, reply) in cases {
        assert_eq!(stub.reply(prompt), reply, "prompt {prompt:?}");
    }

    let lm = Stub::new("/models/tiny.gguf");
    assert_eq!(
        lm.reply("hello world"),
        "[local_lm stub @ /models/tiny.gguf] stub says: hello world"
    );
    assert_eq!(
        lm.reply(""),
        "[local_lm stub @ /models/tiny.gguf] donate node online"
    );
    assert_eq!(
        lm.reply("ok?"),
        "[local_lm stub @ /models/tiny.gguf] stub says: maybe"
    );
    // The one-word reply has no prefix at all.
    assert_eq!(
        lm.reply("Reply with one word only: yes, no, or maybe"),
        "maybe"
    );
    // An empty path is the plain stub.
    assert_eq!(Stub::new("").reply("x"), "[prompt stub] stub says: x");
}

#[test]
fn stub_prompt_survives_case_folding_that_changes_lengths() {
    // Lower-casing "İ" changes its byte length, so the index of "user question:" in the
    // lower-cased text is not an index into the original; the stub must not panic.
    let stub = Stub::default();
    let reply = stub.reply("İİİİ user question: hi there");
    assert!(reply.starts_with("[prompt stub] stub says: "), "{reply}");
    let reply = stub.reply("İ user question:x");
    assert!(reply.starts_with("[prompt stub] "), "{reply}");
}

/// Extension `chat` (docs/PROTOCOL.md §10.9): the section's exact bytes.
#[test]
fn chat_examples() {
    use donate_proto::message::{ChatMessage, FinishReason, Usage};
    vector(
        Message::Prompt(Prompt {
            job_id: "c1".into(),
            max_out: 32,
            messages: vec![
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", "Hi"),
            ],
            ..Default::default()
        }),
        r#"{"v":1,"type":"prompt","job_id":"c1","prompt":"","max_out":32,"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"}]}"#,
    );
    vector(
        Message::PromptResult(PromptResult {
            job_id: "c1".into(),
            ok: true,
            text: "Hello!".into(),
            usage: Some(Usage {
                prompt_tokens: 21,
                completion_tokens: 3,
                finish_reason: FinishReason::Stop,
            }),
            ..Default::default()
        }),
        r#"{"v":1,"type":"prompt_result","job_id":"c1","ok":true,"text":"Hello!","queue_depth":0,"prompt_tokens":21,"completion_tokens":3,"finish_reason":"stop"}"#,
    );
}
