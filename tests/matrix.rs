//! Every adapter's client against every adapter's server over real loopback
//! sockets: hello, push with and without sha256, infer, prompt on a local_lm
//! node, queue_status, and the errors of the "What we answer and why" table of docs/PROTOCOL.md,
//! word for word. The smol server runs on two executors (smol's and tokio's).
//!
//! Errors a well-behaved client cannot provoke (negative `weights_len`, bad
//! base64, overflow, missing bytes, unknown types) are sent over a raw socket
//! to every server, with the exact bytes the Go client writes.

mod common;

use std::time::Duration;

use donate_proto::message::{Hello, ModelStatus, QueueStatus};
use donate_proto::{Answer, Mode, ServerConfig};
use serde_json::json;
use sha2::Digest as _;

use common::*;

const MIB: usize = 1024 * 1024;
const LM_PATH: &str = "/models/tiny.gguf";
const CONFIG: &str = r#"{"ok":true}"#;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The whole session flow for one client adapter against one server adapter.
fn scenario(client: ClientKind, server: ServerKind) {
    bounded(
        &format!("{client:?} client against {server:?} server"),
        Duration::from_secs(60),
        move || {
            model_push_flows(client, server);
            pipelining_flow(client, server);
            local_lm_flows(client, server);
        },
    );
}

fn model_push_flows(client: ClientKind, server: ServerKind) {
    let config = ServerConfig::default().max_model_len(2 * MIB as u64);
    let node = start(server, config, TestExec::default());
    let mut c = AnyClient::connect(client, node.addr()).expect("connect");

    // hello
    assert_eq!(
        c.hello(),
        &Hello {
            mode: "model_push".into(),
            role: "server".into(),
            local_lm_path: String::new(),
            queue_capacity: 64,
            capabilities: Vec::new(),
        }
    );
    // queue_status
    assert_eq!(
        c.queue_status().expect("queue_status"),
        Some(QueueStatus {
            depth: 0,
            capacity: 64,
            in_progress: false
        })
    );

    // Jobs before any model is mounted.
    let e = refused(c.infer(&[9, 9], 3));
    assert_eq!(e.error, "model not mounted");
    assert_eq!(e.code, "model_not_mounted");
    assert!(!e.job_id.is_empty(), "job errors name their job");
    let e = refused(c.prompt("hello world", 0));
    assert_eq!(
        e.error,
        "this node is model_push; mount model and send infer"
    );

    // Push without sha256, then infer.
    let mounted = ModelStatus {
        ok: true,
        message: "mounted".into(),
    };
    assert_eq!(c.push_model(CONFIG, &[1, 2, 3, 4], false).unwrap(), mounted);
    let r = c.infer(&[9, 9], 3).expect("infer");
    assert!(r.ok && r.error.is_empty() && r.job_id.starts_with('j'));
    assert_eq!(r.output_ids, [9, 9, 1, 2, 3]);
    assert_eq!(r.queue_depth, 0);
    let r = c.infer(&[1], 0).expect("infer");
    assert_eq!(r.output_ids, [1, 1, 2, 3, 4, 5, 6, 7, 1]);

    // Push with sha256, in several 1 MiB chunks, with progress.
    let weights: Vec<u8> = (0..3 * MIB / 2).map(|i| (i * 7 % 251) as u8).collect();
    let sha: [u8; 32] = sha2::Sha256::digest(&weights).into();
    let mut progress = Vec::new();
    assert_eq!(
        c.push_model_from(CONFIG, &weights, Some(sha), &mut progress)
            .unwrap(),
        mounted
    );
    assert_eq!(progress, [MIB as u64, weights.len() as u64]);
    assert_eq!(
        c.push_model(CONFIG, &weights[..1000], true).unwrap(),
        mounted
    );
    assert_eq!(c.infer(&[4], 2).unwrap().output_ids, [4, 1, 2]);

    // A wrong sha256: model_status ok:false naming both hashes.
    let mut wrong: [u8; 32] = sha2::Sha256::digest([1, 2, 3, 4]).into();
    let right = hex(&wrong);
    wrong[0] ^= 0xff;
    let message =
        model_refused(c.push_model_from(CONFIG, &[1, 2, 3, 4], Some(wrong), &mut Vec::new()));
    assert_eq!(
        message,
        format!(
            "weights_sha256 mismatch: got {right} expect {}",
            hex(&wrong)
        )
    );

    // An empty config_json.
    assert_eq!(
        model_refused(c.push_model("", &[1, 2, 3, 4], false)),
        "no config"
    );

    // weights_len over the node's limit: refused at model_begin.
    let e = refused(c.push_model(CONFIG, &vec![0; 2 * MIB + 1], false));
    assert_eq!(e.error, "bad weights_len");
    assert_eq!(e.code, "bad_weights_len");

    // Still in step after every refusal: a new upload and job work.
    assert!(c.queue_status().unwrap().is_some());
    assert_eq!(c.push_model(CONFIG, &[5; 10], true).unwrap(), mounted);
    assert_eq!(c.infer(&[9, 9], 3).unwrap().output_ids, [9, 9, 1, 2, 3]);
    drop(c);
    node.shutdown();
}

/// A hundred jobs pipelined at a node whose queue holds eight: the client
/// keeps at most eight in flight (the capacity its `hello` announced), so every
/// job runs and none meets `queue full` (the node's refusal itself is tested
/// with raw frames in bad_input.rs and load.rs).
fn pipelining_flow(client: ClientKind, server: ServerKind) {
    let config = ServerConfig::default().queue_capacity(8);
    let node = start(server, config, TestExec::slow(Duration::from_millis(1)));
    let mut c = AnyClient::connect(client, node.addr()).expect("connect");
    assert_eq!(c.hello().queue_capacity, 8);
    c.push_model(CONFIG, &[1, 2, 3, 4], false).unwrap();
    let requests: Vec<_> = (0..100).map(|i| c.send_infer(&[i], 1).unwrap()).collect();
    for (i, request) in requests.into_iter().enumerate() {
        match c.wait(request).expect("an answer") {
            Answer::Infer(r) => {
                assert!(r.ok);
                assert_eq!(r.output_ids, [i as i32, 1]);
            }
            other => panic!("job {i}: unexpected answer {other:?}"),
        }
        // Its answer is taken: waiting again fails at once instead of hanging.
        assert!(matches!(
            c.wait(request),
            Err(donate_std::Error::NotPending(r)) if r == request
        ));
    }
    assert_eq!(c.queue_status().unwrap().map(|s| s.capacity), Some(8));
    drop(c);
    node.shutdown();
}

fn local_lm_flows(client: ClientKind, server: ServerKind) {
    let config = ServerConfig::default()
        .mode(Mode::LocalLm)
        .local_lm_path(LM_PATH.into());
    let node = start(server, config, TestExec::local_lm(LM_PATH));
    let mut c = AnyClient::connect(client, node.addr()).expect("connect");
    assert_eq!(
        c.hello(),
        &Hello {
            mode: "local_lm".into(),
            role: "server".into(),
            local_lm_path: LM_PATH.into(),
            queue_capacity: 64,
            capabilities: Vec::new(),
        }
    );
    let r = c.prompt("hello world", 0).expect("prompt");
    assert!(r.ok && r.job_id.starts_with('p'));
    assert_eq!(
        r.text,
        format!("[local_lm stub @ {LM_PATH}] stub says: hello world")
    );
    assert_eq!(r.queue_depth, 0);
    let r = c
        .prompt("Context: a node.\nUser question:  is the node up?  ", 0)
        .unwrap();
    assert_eq!(
        r.text,
        format!("[local_lm stub @ {LM_PATH}] stub says: maybe")
    );
    let r = c
        .prompt("Reply with one word only: yes, no, or maybe. Is it?", 5)
        .unwrap();
    assert_eq!(r.text, "maybe");

    let e = refused(c.infer(&[9, 9], 3));
    assert_eq!(e.error, "this node is local_lm; send prompt, not infer");
    assert_eq!(e.code, "wrong_mode");
    let e = refused(c.push_model(CONFIG, &[1, 2, 3, 4], true));
    assert_eq!(e.error, "model_push not enabled on this node");
    assert_eq!(e.code, "model_push_disabled");

    // In step after the refused upload (its chunk and commit got no answer).
    assert_eq!(
        c.queue_status().unwrap(),
        Some(QueueStatus {
            depth: 0,
            capacity: 64,
            in_progress: false
        })
    );
    let r = c.prompt("still here", 0).unwrap();
    assert_eq!(
        r.text,
        format!("[local_lm stub @ {LM_PATH}] stub says: still here")
    );
    drop(c);
    node.shutdown();
}

macro_rules! pairs {
    ($($name:ident: $client:ident x $server:ident;)*) => {
        $(
            #[test]
            fn $name() {
                scenario(ClientKind::$client, ServerKind::$server);
            }
        )*
    };
}

pairs! {
    std_client_std_server: Std x Std;
    std_client_smol_server: Std x Smol;
    std_client_smol_on_tokio_server: Std x SmolOnTokio;
    std_client_tokio_server: Std x Tokio;
    smol_client_std_server: Smol x Std;
    smol_client_smol_server: Smol x Smol;
    smol_client_smol_on_tokio_server: Smol x SmolOnTokio;
    smol_client_tokio_server: Smol x Tokio;
    tokio_client_std_server: Tokio x Std;
    tokio_client_smol_server: Tokio x Smol;
    tokio_client_smol_on_tokio_server: Tokio x SmolOnTokio;
    tokio_client_tokio_server: Tokio x Tokio;
}

const ALL_SERVERS: [ServerKind; 4] = [
    ServerKind::Std,
    ServerKind::Smol,
    ServerKind::SmolOnTokio,
    ServerKind::Tokio,
];

/// Runs `check` against a fresh node of every kind.
fn each_server(config: ServerConfig, exec: TestExec, check: fn(&TestServer)) {
    for kind in ALL_SERVERS {
        let (config, exec) = (config.clone(), exec.clone());
        bounded(
            &format!("{kind:?} server"),
            Duration::from_secs(30),
            move || {
                let node = start(kind, config, exec);
                check(&node);
                node.shutdown();
            },
        );
    }
}

/// The Go client's session, byte for byte, and the node's answers, byte for byte.
#[test]
fn go_client_session_bytes() {
    each_server(ServerConfig::default(), TestExec::default(), |node| {
        let mut raw = Raw::connect(node.addr());
        assert_eq!(
            raw.text(),
            r#"{"v":1,"type":"hello","mode":"model_push","role":"server","queue_capacity":64}"#
        );
        raw.send(&fj(
            r#"{"v":1,"type":"hello","mode":"model_push","role":"client"}"#,
        ));
        raw.send(&fj(
            r#"{"v":1,"type":"infer","job_id":"j1","input_ids":[9,9],"max_tokens":3}"#,
        ));
        assert_eq!(
            raw.text(),
            r#"{"code":"model_not_mounted","error":"model not mounted","job_id":"j1","type":"error","v":1}"#
        );
        raw.send(&fj(
            r#"{"v":1,"type":"model_begin","config_json":"{\"ok\":true}","weights_len":4}"#,
        ));
        raw.send(&fj(
            r#"{"v":1,"type":"weights_chunk","index":0,"last":true,"data_b64":"AQIDBA=="}"#,
        ));
        raw.send(&fj(r#"{"v":1,"type":"model_commit"}"#));
        assert_eq!(
            raw.text(),
            r#"{"v":1,"type":"model_status","ok":true,"message":"mounted"}"#
        );
        raw.send(&fj(
            r#"{"v":1,"type":"infer","job_id":"j1","input_ids":[9,9],"max_tokens":3}"#,
        ));
        assert_eq!(
            raw.text(),
            r#"{"v":1,"type":"infer_result","job_id":"j1","ok":true,"output_ids":[9,9,1,2,3],"queue_depth":0}"#
        );
        raw.send(&fj(
            r#"{"v":1,"type":"prompt","job_id":"p1","prompt":"hello world"}"#,
        ));
        assert_eq!(
            raw.text(),
            r#"{"code":"wrong_mode","error":"this node is model_push; mount model and send infer","job_id":"p1","type":"error","v":1}"#
        );
        raw.send(&queue_status());
        assert_eq!(
            raw.text(),
            r#"{"v":1,"type":"queue_status","depth":0,"capacity":64,"in_progress":false}"#
        );
    });
}

#[test]
fn local_lm_session_bytes() {
    let config = ServerConfig::default()
        .mode(Mode::LocalLm)
        .local_lm_path(LM_PATH.into());
    each_server(config, TestExec::local_lm(LM_PATH), |node| {
        let mut raw = Raw::connect(node.addr());
        assert_eq!(
            raw.text(),
            r#"{"v":1,"type":"hello","mode":"local_lm","role":"server","local_lm_path":"/models/tiny.gguf","queue_capacity":64}"#
        );
        raw.send(&fj(
            r#"{"v":1,"type":"hello","mode":"local_lm","role":"client"}"#,
        ));
        raw.send(&fj(
            r#"{"v":1,"type":"prompt","job_id":"p1","prompt":"hello world"}"#,
        ));
        assert_eq!(
            raw.text(),
            r#"{"v":1,"type":"prompt_result","job_id":"p1","ok":true,"text":"[local_lm stub @ /models/tiny.gguf] stub says: hello world","queue_depth":0}"#
        );
        raw.send(&fj(
            r#"{"v":1,"type":"infer","job_id":"j1","input_ids":[9,9],"max_tokens":3}"#,
        ));
        assert_eq!(
            raw.text(),
            r#"{"code":"wrong_mode","error":"this node is local_lm; send prompt, not infer","job_id":"j1","type":"error","v":1}"#
        );
        // A refused upload: one error for model_begin, nothing for its chunk and commit.
        raw.send(&small_upload());
        assert_eq!(
            raw.text(),
            r#"{"code":"model_push_disabled","error":"model_push not enabled on this node","type":"error","v":1}"#
        );
        raw.expect_in_step();
    });
}

/// Every row of the "What we answer and why" table of docs/PROTOCOL.md on a `model_push` node.
#[test]
fn server_answers_table_model_push() {
    each_server(ServerConfig::default(), TestExec::default(), |node| {
        let mut raw = Raw::session(node.addr());

        // weights_len < 0 or > 100 × 64 MiB
        for len in [-1, i64::MIN, 100 * 64 * 1024 * 1024 + 1, i64::MAX] {
            raw.send(&begin(CONFIG, len, None));
            raw.expect_error("bad weights_len");
        }
        // data_b64 not valid base64
        for bad in ["!!!!", "AQI", "AQIDBA", "AQ=DBA==", "AQIDBA==="] {
            raw.send(&begin(CONFIG, 4, None));
            raw.send(&chunk_b64(0, true, bad));
            raw.expect_error("weights b64 decode");
            raw.send(&commit()); // the failed upload's commit gets no answer
            raw.expect_in_step();
        }
        // more bytes than weights_len
        raw.send(&begin(CONFIG, 4, None));
        raw.send(&chunk(0, true, &[1, 2, 3, 4, 5]));
        raw.expect_error("weights overflow");
        raw.expect_in_step();
        // commit with bytes missing
        raw.send(&begin(CONFIG, 4, None));
        raw.send(&chunk(0, false, &[1, 2]));
        raw.send(&commit());
        assert_eq!(
            raw.expect_status(),
            (false, "weights size mismatch: got 2 expect 4".to_owned())
        );
        // commit with an empty config_json
        raw.send(&begin("", 4, None));
        raw.send(&chunk(0, true, &[1, 2, 3, 4]));
        raw.send(&commit());
        assert_eq!(raw.expect_status(), (false, "no config".to_owned()));
        // a wrong weights_sha256
        let claimed = sha256_hex(b"other");
        raw.send(&begin(CONFIG, 4, Some(&claimed)));
        raw.send(&chunk(0, true, &[1, 2, 3, 4]));
        raw.send(&commit());
        let got = sha256_hex(&[1, 2, 3, 4]);
        assert_eq!(
            raw.expect_status(),
            (
                false,
                format!("weights_sha256 mismatch: got {got} expect {claimed}")
            )
        );
        // infer before a model is mounted
        raw.send(&infer("j1", &[9, 9], 3));
        let e = raw.expect_error("model not mounted");
        assert_eq!(e["job_id"], "j1");
        // prompt on a model_push node
        raw.send(&prompt("p1", "hi"));
        raw.expect_error("this node is model_push; mount model and send infer");
        // unknown or missing type
        raw.send(&fj(r#"{"v":1,"type":"bogus"}"#));
        raw.expect_error("unknown type: bogus");
        raw.send(&fj(r#"{"v":1}"#));
        raw.expect_error("unknown type: ");
        raw.send(&fj(
            r#"{"v":1,"type":"infer_result","job_id":"x","ok":true}"#,
        ));
        raw.expect_error("unknown type: infer_result");

        // And after all that, the connection still works.
        raw.mount();
        raw.expect_infer("j2");
    });
}

/// The rows that apply to a `local_lm` node.
#[test]
fn server_answers_table_local_lm() {
    let config = ServerConfig::default()
        .mode(Mode::LocalLm)
        .local_lm_path(LM_PATH.into());
    each_server(config, TestExec::local_lm(LM_PATH), |node| {
        let mut raw = Raw::session(node.addr());
        raw.send(&begin(CONFIG, 4, None));
        raw.expect_error("model_push not enabled on this node");
        // Chunks and commits on a local_lm node get no answer.
        raw.send(&chunk(0, true, &[1, 2, 3, 4]));
        raw.send(&commit());
        raw.send(&infer("j1", &[9, 9], 3));
        let e = raw.expect_error("this node is local_lm; send prompt, not infer");
        assert_eq!(e["job_id"], "j1");
        raw.send(&fj(r#"{"v":1,"type":"nope"}"#));
        raw.expect_error("unknown type: nope");
        raw.send(&prompt("p1", "why?"));
        let v = raw.frame();
        assert_eq!(v["type"], "prompt_result");
        assert_eq!(
            v["text"],
            format!("[local_lm stub @ {LM_PATH}] stub says: maybe")
        );
    });
}

/// `queue full` over a raw socket: three jobs in one write at a queue of one.
#[test]
fn server_answers_table_queue_full() {
    let config = ServerConfig::default().queue_capacity(1);
    each_server(config, TestExec::slow(Duration::from_millis(50)), |node| {
        let mut raw = Raw::session(node.addr());
        raw.mount();
        let jobs = [
            infer("a", &[1], 1),
            infer("b", &[2], 1),
            infer("c", &[3], 1),
        ]
        .concat();
        raw.send(&jobs);
        let mut answers: Vec<_> = (0..3).map(|_| raw.frame()).collect();
        answers.sort_by_key(|v| v["job_id"].as_str().unwrap_or_default().to_owned());
        assert_eq!(
            answers[0],
            json!({"v": 1, "type": "infer_result", "job_id": "a", "ok": true, "output_ids": [1, 1], "queue_depth": 0})
        );
        for v in &answers[1..] {
            if v["type"] == "error" {
                assert_eq!(v["error"], "queue full");
                assert_eq!(v["code"], "queue_full");
            } else {
                assert_eq!(v["type"], "infer_result");
            }
        }
        assert!(
            answers.iter().any(|v| v["error"] == "queue full"),
            "{answers:?}"
        );
        raw.expect_in_step();
    });
}
