//! The operating extensions (docs/PROTOCOL.md §10): `cancel`, `deadline`,
//! `queue_position`, byte for byte, and what a v1 (Go) client sees of them:
//! nothing. Raw peers write hand-made frames; the node is the stub on a
//! `local_lm` node (prompts need no upload), jobs held so they can be watched.

use std::sync::atomic::Ordering;
use std::time::Duration;

use donate_proto::sim::{Peer, Sim};
use donate_proto::{
    Answer, ApiMisuse, Capabilities, Capability, ClientConfig, ClientError, ClientEvent, Mode,
    Node, ServerConfig, Stub,
};

const OPS: Capabilities = Capabilities::NONE
    .with(Capability::Cancel)
    .with(Capability::Deadline)
    .with(Capability::QueuePosition);

fn config() -> ServerConfig {
    ServerConfig::default()
        .mode(Mode::LocalLm)
        .local_lm_path("/m".into())
}

/// A node offering `caps`, whose worker holds jobs until a test finishes them.
fn node(config: ServerConfig, caps: Capabilities) -> Sim<Stub> {
    let mut sim = Sim::new(Stub::new("/m"), config.clone());
    sim.node = Node::new(config).offer(caps);
    sim.hold_jobs = true;
    sim
}

fn frame(json: &str) -> Vec<u8> {
    let mut out = Vec::new();
    donate_proto::frame::encode_frame(json.as_bytes(), &mut out);
    out
}

/// A raw peer that read the node's hello and sent its own naming `caps`.
fn raw(sim: &mut Sim<Stub>, caps: &str) -> Peer {
    let p = sim.raw();
    sim.run();
    sim.frames(p);
    let hello = match caps {
        "" => r#"{"v":1,"type":"hello","mode":"local_lm","role":"client"}"#.to_owned(),
        caps => format!(
            r#"{{"v":1,"type":"hello","mode":"local_lm","role":"client","capabilities":[{caps}]}}"#
        ),
    };
    sim.write(p, &frame(&hello));
    sim.run();
    p
}

fn send(sim: &mut Sim<Stub>, p: Peer, json: &str) {
    sim.write(p, &frame(json));
    sim.run();
}

fn prompt(job_id: &str) -> String {
    format!(r#"{{"v":1,"type":"prompt","job_id":"{job_id}","prompt":"hi"}}"#)
}

fn result(job_id: &str, code: &str, error: &str, depth: usize) -> String {
    format!(
        r#"{{"v":1,"type":"prompt_result","job_id":"{job_id}","ok":false,"error":"{error}","code":"{code}","queue_depth":{depth}}}"#
    )
}

fn ok(job_id: &str, depth: usize) -> String {
    format!(
        r#"{{"v":1,"type":"prompt_result","job_id":"{job_id}","ok":true,"text":"[local_lm stub @ /m] stub says: hi","queue_depth":{depth}}}"#
    )
}

// ---------------------------------------------------------------------------
// cancel
// ---------------------------------------------------------------------------

#[test]
fn a_cancelled_queued_job_is_answered_once_and_never_runs() {
    let mut sim = node(config(), OPS);
    let p = raw(&mut sim, r#""cancel""#);
    send(&mut sim, p, &prompt("a")); // running
    send(&mut sim, p, &prompt("b")); // queued
    send(&mut sim, p, &prompt("c")); // queued
    assert_eq!(sim.held_jobs.len(), 1);
    send(&mut sim, p, r#"{"v":1,"type":"cancel","job_id":"b"}"#);
    assert_eq!(
        sim.frames(p),
        [result("b", "cancelled", "job cancelled", 1)]
    );
    assert_eq!(sim.node.queue_status().depth, 1);
    // A second cancel of the same job, and one of a job never sent: nothing.
    send(&mut sim, p, r#"{"v":1,"type":"cancel","job_id":"b"}"#);
    send(&mut sim, p, r#"{"v":1,"type":"cancel","job_id":"zz"}"#);
    assert!(sim.frames(p).is_empty());
    // The others run in order; "b" never does.
    assert!(sim.finish_job(0));
    sim.run();
    assert_eq!(sim.held_jobs[0].job_id, "c");
    assert!(sim.finish_job(0));
    sim.run();
    assert_eq!(sim.frames(p), [ok("a", 0), ok("c", 0)]);
    assert!(!sim.node.has_job());
}

#[test]
fn a_cancelled_running_job_is_flagged_and_answered_cancelled() {
    let mut sim = node(config(), OPS);
    let p = raw(&mut sim, r#""cancel""#);
    send(&mut sim, p, &prompt("a"));
    let flag = sim.held_jobs[0].cancel.clone();
    assert!(!flag.load(Ordering::Relaxed));
    send(&mut sim, p, r#"{"v":1,"type":"cancel","job_id":"a"}"#);
    assert!(flag.load(Ordering::Relaxed), "the executor sees the cancel");
    assert!(sim.frames(p).is_empty(), "answered when the worker stops");
    // Whatever the executor returns (here: a full answer), the client hears cancelled.
    assert!(sim.finish_job(0));
    sim.run();
    assert_eq!(
        sim.frames(p),
        [result("a", "cancelled", "job cancelled", 0)]
    );
}

#[test]
fn a_disconnect_with_64_queued_jobs_leaves_none_to_run() {
    let mut sim = node(config(), OPS);
    let p = raw(&mut sim, "");
    let other = raw(&mut sim, "");
    send(&mut sim, p, &prompt("running"));
    for i in 0..64 {
        send(&mut sim, p, &prompt(&format!("q{i}")));
    }
    assert_eq!(sim.node.queue_status().depth, 64);
    let flag = sim.held_jobs[0].cancel.clone();
    sim.vanish(p);
    assert_eq!(sim.node.queue_status().depth, 0);
    assert!(!sim.node.has_job());
    assert!(flag.load(Ordering::Relaxed), "its running job is cancelled");
    assert!(!sim.finish_job(0), "and its result goes nowhere");
    // The node goes on serving others.
    send(&mut sim, other, &prompt("x"));
    assert!(sim.finish_job(0));
    sim.run();
    assert_eq!(sim.frames(other), [ok("x", 0)]);
}

#[test]
fn a_peer_that_closes_its_side_cancels_its_jobs_too() {
    let mut sim = node(config(), Capabilities::NONE);
    let p = raw(&mut sim, "");
    send(&mut sim, p, &prompt("a"));
    send(&mut sim, p, &prompt("b"));
    let flag = sim.held_jobs[0].cancel.clone();
    sim.close(p);
    assert_eq!(sim.node.queue_status().depth, 0);
    assert!(flag.load(Ordering::Relaxed));
}

#[test]
fn a_v1_client_sees_cancel_as_an_unknown_type_and_nothing_else_changes() {
    // Offered, but not named in the client's hello: v1 bytes both ways.
    let mut sim = node(config(), OPS);
    let p = raw(&mut sim, "");
    send(&mut sim, p, &prompt("a"));
    send(&mut sim, p, &prompt("b"));
    send(&mut sim, p, r#"{"v":1,"type":"cancel","job_id":"b"}"#);
    send(
        &mut sim,
        p,
        r#"{"v":1,"type":"queue_position","job_id":"b"}"#,
    );
    assert_eq!(
        sim.frames(p),
        [
            r#"{"code":"unknown_type","error":"unknown type: cancel","job_id":"b","type":"error","v":1}"#,
            r#"{"code":"unknown_type","error":"unknown type: queue_position","job_id":"b","type":"error","v":1}"#,
        ],
        "no queued acknowledgement either"
    );
    assert_eq!(sim.node.queue_status().depth, 1, "not cancelled");
}

#[test]
fn the_client_core_cancels_and_hears_cancelled() {
    let mut sim = node(config(), OPS);
    let c = sim.client();
    sim.run();
    while sim.client_core(c).poll_event().is_some() {}
    assert_eq!(sim.client_core(c).capabilities(), OPS);
    let running = sim.client_core(c).prompt("x", 0).unwrap();
    let queued = sim.client_core(c).prompt("y", 0).unwrap();
    sim.run();
    // Both were queued before a worker took the first: second in line.
    assert_eq!(sim.client_core(c).position(queued), Some(2));
    assert_eq!(sim.client_core(c).cancel(queued), Ok(true));
    sim.run();
    match sim.client_core(c).take_answer(queued) {
        Some(Answer::Prompt(r)) => assert_eq!((r.ok, r.code.as_str()), (false, "cancelled")),
        other => panic!("{other:?}"),
    }
    assert_eq!(sim.client_core(c).cancel(queued), Ok(false), "answered");
    assert!(sim.finish_job(0));
    sim.run();
    assert!(matches!(sim.client_core(c).take_answer(running), Some(Answer::Prompt(r)) if r.ok));
}

#[test]
fn a_client_facing_a_v1_node_cannot_cancel_and_sends_nothing_new() {
    let mut sim = node(config(), Capabilities::NONE);
    let c = sim.client_with(ClientConfig::default().job_deadline(Some(Duration::from_secs(1))));
    sim.run();
    assert!(matches!(
        sim.client_core(c).poll_event(),
        Some(ClientEvent::Connected(_))
    ));
    let job = sim.client_core(c).prompt("x", 0).unwrap();
    assert_eq!(
        sim.client_core(c).cancel(job),
        Err(ClientError::Misuse(ApiMisuse::NotOffered("cancel")))
    );
    assert_eq!(
        sim.client_core(c).queue_position(job),
        Err(ClientError::Misuse(ApiMisuse::NotOffered("queue_position")))
    );
    sim.run();
    let sent = String::from_utf8_lossy(sim.sent(c)).into_owned();
    assert!(
        sent.ends_with(r#"{"v":1,"type":"prompt","job_id":"p1","prompt":"x"}"#),
        "no deadline_ms to a v1 node: {sent}"
    );
}

// ---------------------------------------------------------------------------
// deadline
// ---------------------------------------------------------------------------

#[test]
fn a_queued_job_past_its_deadline_is_dropped_and_a_running_one_cancelled() {
    let mut sim = node(config(), OPS);
    let p = raw(&mut sim, r#""deadline""#);
    send(
        &mut sim,
        p,
        r#"{"v":1,"type":"prompt","job_id":"a","prompt":"hi","deadline_ms":500}"#,
    );
    send(
        &mut sim,
        p,
        r#"{"v":1,"type":"prompt","job_id":"b","prompt":"hi","deadline_ms":200}"#,
    );
    send(&mut sim, p, &prompt("c")); // no deadline
    let conn = sim.conn(p);
    assert_eq!(
        sim.node.connection_timeout(conn),
        Some(sim.at(Duration::from_millis(200)))
    );
    assert_eq!(
        sim.node.poll_timeout(),
        Some(sim.at(Duration::from_millis(200)))
    );
    sim.advance(Duration::from_millis(200));
    assert_eq!(
        sim.frames(p),
        [result("b", "deadline_exceeded", "job deadline exceeded", 1)]
    );
    let flag = sim.held_jobs[0].cancel.clone();
    sim.advance(Duration::from_millis(300));
    assert!(flag.load(Ordering::Relaxed), "the running job is stopped");
    assert!(sim.frames(p).is_empty());
    assert!(sim.finish_job(0));
    sim.run();
    assert!(sim.finish_job(0));
    sim.run();
    assert_eq!(
        sim.frames(p),
        [
            result("a", "deadline_exceeded", "job deadline exceeded", 0),
            ok("c", 0)
        ]
    );
}

#[test]
fn a_v1_clients_deadline_ms_is_ignored() {
    let mut sim = node(config(), OPS);
    let p = raw(&mut sim, "");
    send(
        &mut sim,
        p,
        r#"{"v":1,"type":"prompt","job_id":"a","prompt":"hi","deadline_ms":-5}"#,
    );
    let conn = sim.conn(p);
    assert_eq!(sim.node.connection_timeout(conn), None);
    sim.advance(Duration::from_secs(5));
    assert!(sim.finish_job(0));
    sim.run();
    assert_eq!(sim.frames(p), [ok("a", 0)]);
}

#[test]
fn a_negative_deadline_is_refused() {
    let mut sim = node(config(), OPS);
    let p = raw(&mut sim, r#""deadline""#);
    send(
        &mut sim,
        p,
        r#"{"v":1,"type":"prompt","job_id":"a","prompt":"hi","deadline_ms":-5}"#,
    );
    assert_eq!(
        sim.frames(p),
        [
            r#"{"code":"bad_field","error":"bad field: deadline_ms must be positive, got -5","job_id":"a","type":"error","v":1}"#
        ]
    );
    assert!(sim.held_jobs.is_empty());
}

#[test]
fn max_job_time_bounds_every_job_even_a_v1_clients() {
    let mut sim = node(
        config().max_job_time(Some(Duration::from_secs(2))),
        Capabilities::NONE,
    );
    let p = raw(&mut sim, "");
    send(&mut sim, p, &prompt("a")); // running
    send(&mut sim, p, &prompt("b")); // queued
    let flag = sim.held_jobs[0].cancel.clone();
    sim.advance(Duration::from_secs(2));
    assert!(flag.load(Ordering::Relaxed));
    assert_eq!(
        sim.frames(p),
        [result("b", "deadline_exceeded", "job deadline exceeded", 0)]
    );
    assert!(sim.finish_job(0));
    sim.run();
    assert_eq!(
        sim.frames(p),
        [result("a", "deadline_exceeded", "job deadline exceeded", 0)]
    );
}

#[test]
fn the_client_core_sends_deadline_ms_to_a_node_that_agreed() {
    let mut sim = node(config(), OPS);
    let c =
        sim.client_with(ClientConfig::default().job_deadline(Some(Duration::from_millis(1500))));
    sim.run();
    sim.client_core(c).prompt("x", 0).unwrap();
    sim.run();
    let sent = String::from_utf8_lossy(sim.sent(c)).into_owned();
    assert!(
        sent.ends_with(r#"{"v":1,"type":"prompt","job_id":"p1","prompt":"x","deadline_ms":1500}"#),
        "{sent}"
    );
}

// ---------------------------------------------------------------------------
// queue_position
// ---------------------------------------------------------------------------

#[test]
fn queued_jobs_are_acknowledged_with_their_place_and_can_ask_for_it() {
    let mut sim = node(config(), OPS);
    let p = raw(&mut sim, r#""queue_position""#);
    send(&mut sim, p, &prompt("a"));
    send(&mut sim, p, &prompt("b"));
    send(&mut sim, p, &prompt("c"));
    assert_eq!(
        sim.frames(p),
        [
            r#"{"v":1,"type":"queued","job_id":"a","position":1}"#,
            r#"{"v":1,"type":"queued","job_id":"b","position":1}"#,
            r#"{"v":1,"type":"queued","job_id":"c","position":2}"#,
        ]
    );
    for (job, at) in [("a", 0), ("b", 1), ("c", 2), ("nope", -1)] {
        send(
            &mut sim,
            p,
            &format!(r#"{{"v":1,"type":"queue_position","job_id":"{job}"}}"#),
        );
        assert_eq!(
            sim.frames(p),
            [format!(
                r#"{{"v":1,"type":"queue_position","job_id":"{job}","position":{at}}}"#
            )]
        );
    }
}

#[test]
fn the_client_core_asks_for_a_position() {
    let mut sim = node(config(), OPS);
    let c = sim.client();
    sim.run();
    let _running = sim.client_core(c).prompt("x", 0).unwrap();
    let queued = sim.client_core(c).prompt("y", 0).unwrap();
    sim.run();
    let asked = sim.client_core(c).queue_position(queued).unwrap().unwrap();
    sim.run();
    match sim.client_core(c).take_answer(asked) {
        Some(Answer::QueuePosition(p)) => assert_eq!((p.job_id.as_str(), p.position), ("p2", 1)),
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------
// vectors: the new messages and field, byte for byte, both ways
// ---------------------------------------------------------------------------

#[test]
fn extension_messages_encode_and_parse_exactly() {
    use donate_proto::message::{Infer, JobRef, Prompt, QueuePosition};
    use donate_proto::Message;
    let vectors = [
        (
            Message::Cancel(JobRef {
                job_id: "j7".into(),
            }),
            r#"{"v":1,"type":"cancel","job_id":"j7"}"#,
        ),
        (
            Message::Queued(QueuePosition {
                job_id: "j7".into(),
                position: 2,
            }),
            r#"{"v":1,"type":"queued","job_id":"j7","position":2}"#,
        ),
        (
            Message::QueuePositionRequest(JobRef {
                job_id: "j7".into(),
            }),
            r#"{"v":1,"type":"queue_position","job_id":"j7"}"#,
        ),
        (
            Message::QueuePosition(QueuePosition {
                job_id: "j7".into(),
                position: 0,
            }),
            r#"{"v":1,"type":"queue_position","job_id":"j7","position":0}"#,
        ),
        (
            Message::Infer(Infer {
                job_id: "j1".into(),
                input_ids: vec![9],
                max_tokens: 3,
                deadline_ms: 250,
                sampling: Default::default(),
            }),
            r#"{"v":1,"type":"infer","job_id":"j1","input_ids":[9],"max_tokens":3,"deadline_ms":250}"#,
        ),
        (
            Message::Prompt(Prompt {
                job_id: "p1".into(),
                prompt: "hi".into(),
                max_out: 0,
                deadline_ms: 1500,
                sampling: Default::default(),
                ..Default::default()
            }),
            r#"{"v":1,"type":"prompt","job_id":"p1","prompt":"hi","deadline_ms":1500}"#,
        ),
        // Without a deadline, a job is the v1 bytes.
        (
            Message::Infer(Infer {
                job_id: "j1".into(),
                input_ids: vec![9],
                max_tokens: 3,
                deadline_ms: 0,
                sampling: Default::default(),
            }),
            r#"{"v":1,"type":"infer","job_id":"j1","input_ids":[9],"max_tokens":3}"#,
        ),
    ];
    for (message, bytes) in vectors {
        assert_eq!(String::from_utf8(message.to_json()).unwrap(), bytes);
        assert_eq!(
            Message::parse(bytes.as_bytes()).unwrap(),
            message,
            "{bytes}"
        );
    }
}

// ---------------------------------------------------------------------------
// stats
// ---------------------------------------------------------------------------

#[test]
fn stats_are_answered_to_a_client_that_named_them_only() {
    let mut sim = node(config(), OPS.with(Capability::Stats));
    let v1 = raw(&mut sim, "");
    let p = raw(&mut sim, r#""stats","cancel""#);
    send(&mut sim, p, &prompt("a")); // running
    send(&mut sim, p, &prompt("b")); // queued
    send(&mut sim, p, r#"{"v":1,"type":"cancel","job_id":"b"}"#);
    sim.frames(p);
    send(&mut sim, p, r#"{"v":1,"type":"stats"}"#);
    assert_eq!(
        sim.frames(p),
        [
            r#"{"v":1,"type":"stats","connections":2,"connections_accepted":2,"depth":0,"jobs_running":1,"jobs_done":0,"jobs_failed":0,"jobs_cancelled":1,"jobs_expired":0,"jobs_dropped":0}"#
        ]
    );
    send(&mut sim, v1, r#"{"v":1,"type":"stats"}"#);
    assert_eq!(
        sim.frames(v1),
        [r#"{"code":"unknown_type","error":"unknown type: stats","type":"error","v":1}"#]
    );
    // The client core asks and reads them.
    let c = sim.client();
    sim.run();
    let asked = sim.client_core(c).stats().unwrap();
    sim.run();
    match sim.client_core(c).take_answer(asked) {
        Some(Answer::Stats(s)) => assert_eq!((s.connections, s.jobs_running), (3, 1)),
        other => panic!("{other:?}"),
    }
}
