//! `job_id` bounds (docs/PROTOCOL.md §4.4): at most `max_job_id_len` bytes
//! of text without control characters. A bad one is refused with `bad_field` and runs
//! nothing; the refusal names it only when it is not too long.

use donate_proto::sim::{Peer, Sim};
use donate_proto::{Capabilities, Capability, Mode, Node, ServerConfig, Stub};
use serde_json::{json, Value};

fn config() -> ServerConfig {
    ServerConfig::default()
        .mode(Mode::LocalLm)
        .local_lm_path("/m".into())
}

/// A `local_lm` node offering `cancel` and `queue_position`, jobs held.
fn node(config: ServerConfig) -> Sim<Stub> {
    let mut sim = Sim::new(Stub::new("/m"), config.clone());
    let caps = Capabilities::NONE
        .with(Capability::Cancel)
        .with(Capability::QueuePosition);
    sim.node = Node::new(config).offer(caps);
    sim.hold_jobs = true;
    sim
}

fn frame(json: &str) -> Vec<u8> {
    let mut out = Vec::new();
    donate_proto::frame::encode_frame(json.as_bytes(), &mut out);
    out
}

/// A raw peer past the hellos; `caps` is its hello's capability list.
fn raw(sim: &mut Sim<Stub>, caps: &str) -> Peer {
    let p = sim.raw();
    sim.write(
        p,
        &frame(&format!(
            r#"{{"v":1,"type":"hello","mode":"local_lm","role":"client","capabilities":[{caps}]}}"#
        )),
    );
    sim.run();
    sim.frames(p);
    p
}

/// Sends `msg` and returns the frames answering it.
fn ask(sim: &mut Sim<Stub>, p: Peer, msg: &Value) -> Vec<String> {
    sim.write(p, &frame(&msg.to_string()));
    sim.run();
    sim.frames(p)
}

fn prompt(job_id: &str) -> Value {
    json!({"v": 1, "type": "prompt", "job_id": job_id, "prompt": "hi"})
}

fn infer(job_id: &str) -> Value {
    json!({"v": 1, "type": "infer", "job_id": job_id, "input_ids": [1], "max_tokens": 250})
}

/// The one frame of `frames`, parsed.
fn only(frames: &[String]) -> Value {
    assert_eq!(frames.len(), 1, "{frames:?}");
    serde_json::from_str(&frames[0]).unwrap()
}

#[test]
fn ids_a_v1_client_sends_are_taken() {
    let mut sim = node(config());
    let p = raw(&mut sim, "");
    let ids = [
        String::new(),
        "j1".into(),
        "p12".into(),
        "batch-7".into(),
        "3f2b9c1e-8d4a-4c6b-9f0e-2a7d5b1c8e3f".into(),
        "job 42: <x> & \"y\" \\ {z}".into(),
        "~".repeat(256),
    ];
    for id in &ids {
        assert!(ask(&mut sim, p, &prompt(id)).is_empty(), "{id:?} refused");
    }
    sim.hold_jobs = false;
    while !sim.held_jobs.is_empty() {
        sim.finish_job(0);
    }
    sim.run();
    let results: Vec<Value> = sim
        .frames(p)
        .iter()
        .map(|f| serde_json::from_str(f).unwrap())
        .collect();
    assert_eq!(results.len(), ids.len());
    for (result, id) in results.iter().zip(&ids) {
        assert_eq!(result["type"], "prompt_result");
        assert_eq!(result["ok"], true, "{result}");
        assert_eq!(result["job_id"].as_str().unwrap_or_default(), id);
    }
}

#[test]
fn a_long_id_is_refused_without_being_echoed() {
    let mut sim = node(config());
    let p = raw(&mut sim, "");
    for id in ["x".repeat(257), "j".repeat(8 << 20)] {
        let frames = ask(&mut sim, p, &prompt(&id));
        assert!(frames[0].len() < 200, "{:.300}", frames[0]);
        assert_eq!(
            only(&frames),
            json!({"v": 1, "type": "error", "code": "bad_field",
                   "error": format!("bad field: job_id is {} bytes, at most 256", id.len())})
        );
    }
    assert!(
        sim.held_jobs.is_empty() && !sim.node.has_job(),
        "nothing runs"
    );
    assert!(!sim.node.is_closing(sim.conn(p)), "the connection stays");
}

#[test]
fn an_id_with_control_characters_is_refused_and_named() {
    let mut sim = node(config());
    let p = raw(&mut sim, "");
    for id in [
        "a\nb",
        "tab\there",
        "nul\0",
        "del\u{7f}",
        "c1\u{9b}",
        "\u{202e}fdp",
        "\u{2066}isolate",
    ] {
        let frame = only(&ask(&mut sim, p, &prompt(id)));
        assert_eq!(
            frame,
            json!({"v": 1, "type": "error", "code": "bad_field", "job_id": id,
                   "error": "bad field: job_id must not contain control characters"})
        );
    }
    assert!(
        sim.held_jobs.is_empty() && !sim.node.has_job(),
        "nothing runs"
    );
}

#[test]
fn an_id_in_any_script_is_taken_as_a_v1_client_may_send_it() {
    let mut sim = node(config());
    let p = raw(&mut sim, "");
    for id in ["jöb", "作业-1", "🦀 crab"] {
        assert!(ask(&mut sim, p, &prompt(id)).is_empty(), "{id}");
    }
}

#[test]
fn the_limit_is_configurable_and_checked_before_the_mode() {
    let mut sim = node(config().max_job_id_len(4));
    let p = raw(&mut sim, "");
    assert!(ask(&mut sim, p, &prompt("abcd")).is_empty());
    let e = only(&ask(&mut sim, p, &prompt("abcde")));
    assert_eq!(e["error"], "bad field: job_id is 5 bytes, at most 4");
    assert_eq!(e.get("job_id"), None);
    // An `infer` on this `local_lm` node: the id is judged first, so a long
    // one is not echoed in the `wrong_mode` refusal either.
    let e = only(&ask(&mut sim, p, &infer("abcde")));
    assert_eq!((&e["code"], e.get("job_id")), (&json!("bad_field"), None));
    let e = only(&ask(&mut sim, p, &infer("abcd")));
    assert_eq!(
        (&e["code"], &e["job_id"]),
        (&json!("wrong_mode"), &json!("abcd"))
    );
}

#[test]
fn a_bad_body_does_not_echo_a_long_id() {
    let mut sim = node(config());
    let p = raw(&mut sim, "");
    let bad = |id: &str| json!({"v": 1, "type": "prompt", "job_id": id, "prompt": 5});
    let e = only(&ask(&mut sim, p, &bad("p1")));
    assert_eq!(
        (&e["code"], &e["job_id"]),
        (&json!("bad_field"), &json!("p1"))
    );
    let e = only(&ask(&mut sim, p, &bad(&"p".repeat(1 << 20))));
    assert_eq!((&e["code"], e.get("job_id")), (&json!("bad_field"), None));
}

#[test]
fn cancel_and_queue_position_ids_are_bounded_too() {
    let mut sim = node(config());
    let long = "c".repeat(300);
    let agreed = raw(&mut sim, r#""cancel","queue_position""#);
    let v1 = raw(&mut sim, "");
    assert_eq!(
        only(&ask(&mut sim, agreed, &prompt("p1")))["type"],
        "queued"
    );
    for p in [agreed, v1] {
        for kind in ["cancel", "queue_position", "queued"] {
            let msg = |id: &str| match kind {
                "queued" => json!({"v": 1, "type": kind, "job_id": id, "position": 1}),
                _ => json!({"v": 1, "type": kind, "job_id": id}),
            };
            let e = only(&ask(&mut sim, p, &msg(&long)));
            assert_eq!(
                (&e["code"], e.get("job_id")),
                (&json!("bad_field"), None),
                "{kind}"
            );
            let e = only(&ask(&mut sim, p, &msg("p\u{1}")));
            assert_eq!(
                (&e["code"], &e["job_id"]),
                (&json!("bad_field"), &json!("p\u{1}")),
                "{kind}"
            );
        }
    }
    // The job was not touched.
    let position = only(&ask(
        &mut sim,
        agreed,
        &json!({"v": 1, "type": "queue_position", "job_id": "p1"}),
    ));
    assert_eq!(position["position"], 0, "{position}");
}

/// The exact bytes a Go client (a hello without capabilities) reads when
/// its `job_id` is refused: one v1 `error` frame each (`code` it ignores;
/// the hello's `capabilities` too), and nothing runs.
#[test]
fn a_go_client_reads_the_refusal_as_these_bytes() {
    let mut sim = node(config());
    let p = sim.raw();
    sim.write(
        p,
        &frame(r#"{"v":1,"type":"hello","mode":"local_lm","role":"client"}"#),
    );
    let long = "x".repeat(300);
    sim.write(
        p,
        &frame(&format!(
            r#"{{"v":1,"type":"prompt","job_id":"{long}","prompt":"hi"}}"#
        )),
    );
    sim.write(
        p,
        &frame(r#"{"v":1,"type":"infer","job_id":"a\nb","input_ids":[1],"max_tokens":1}"#),
    );
    sim.run();
    let frames = sim.frames(p);
    assert_eq!(
        frames,
        [
            r#"{"v":1,"type":"hello","mode":"local_lm","role":"server","local_lm_path":"/m","queue_capacity":64,"capabilities":["cancel","queue_position"]}"#,
            // The Go node's layout of an error frame (docs/PROTOCOL.md §3.4).
            r#"{"code":"bad_field","error":"bad field: job_id is 300 bytes, at most 256","type":"error","v":1}"#,
            r#"{"code":"bad_field","error":"bad field: job_id must not contain control characters","job_id":"a\nb","type":"error","v":1}"#,
        ]
    );
    assert!(sim.held_jobs.is_empty() && !sim.node.has_job());
}
