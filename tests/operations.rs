//! Cancel through a real node (donate-std over loopback, the shared host):
//! the running job's executor sees the flag, a client that vanishes leaves
//! none of its queued jobs to run (docs/PROTOCOL.md §10.2).

mod common;

use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use common::{fj, prompt, Raw, Spinner};
use donate_host::{NodeConfig, HONOURED};
use donate_proto::{Mode, ServerConfig};

fn node(exec: Spinner) -> donate_std::Server {
    let config = ServerConfig::default()
        .mode(Mode::LocalLm)
        .local_lm_path("/m".into());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    donate_std::serve(listener, NodeConfig::from(config).offer(HONOURED), exec).expect("serve")
}

fn wait_for(what: &str, limit: Duration, cond: impl Fn() -> bool) {
    let until = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_cancelled_running_job_stops_its_executor_and_is_answered_cancelled() {
    let exec = Spinner::default();
    let server = node(exec.clone());
    let (mut raw, hello) = Raw::hello(server.local_addr());
    assert_eq!(
        hello["capabilities"],
        serde_json::json!(["cancel", "deadline", "queue_position"])
    );
    raw.send(&fj(
        r#"{"v":1,"type":"hello","mode":"local_lm","role":"client","capabilities":["cancel"]}"#,
    ));
    raw.send(&prompt("a", "spin"));
    wait_for("the job to start", Duration::from_secs(10), || {
        exec.started.load(Ordering::SeqCst) == 1
    });
    let sent = Instant::now();
    raw.send(&fj(r#"{"v":1,"type":"cancel","job_id":"a"}"#));
    assert_eq!(
        raw.text(),
        r#"{"v":1,"type":"prompt_result","job_id":"a","ok":false,"error":"job cancelled","code":"cancelled","queue_depth":0}"#
    );
    let answered_in = sent.elapsed();
    eprintln!("cancel answered in {answered_in:?}");
    assert!(answered_in < Duration::from_secs(2), "{answered_in:?}");
    assert_eq!(exec.stopped.load(Ordering::SeqCst), 1);
    drop(raw);
    server.shutdown();
}

#[test]
fn a_client_that_vanishes_with_64_queued_jobs_leaves_none_to_run() {
    let exec = Spinner::default();
    let server = node(exec.clone());
    let mut raw = Raw::session(server.local_addr()); // a v1 client
    raw.send(&prompt("r", "spin"));
    wait_for("the job to start", Duration::from_secs(10), || {
        exec.started.load(Ordering::SeqCst) == 1
    });
    let mut queued = Vec::new();
    for i in 0..64 {
        queued.extend(prompt(&format!("q{i}"), "quick"));
    }
    raw.send(&queued);
    raw.send(&fj(r#"{"v":1,"type":"queue_status"}"#));
    let status = raw.frame();
    assert_eq!(status["depth"], 64, "{status}");
    drop(raw);
    wait_for("the running job to stop", Duration::from_secs(10), || {
        exec.stopped.load(Ordering::SeqCst) == 1
    });
    // The node is free at once, and none of the 64 ran.
    let mut other = Raw::session(server.local_addr());
    other.send(&prompt("x", "quick"));
    let answer = other.frame();
    assert_eq!(answer["text"], "done quick", "{answer}");
    assert_eq!(answer["queue_depth"], 0, "{answer}");
    assert_eq!(
        exec.started.load(Ordering::SeqCst),
        2,
        "only the spin and x ran"
    );
    drop(other);
    server.shutdown();
}
