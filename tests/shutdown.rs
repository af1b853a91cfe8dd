//! Graceful shutdown in the middle of a job, on every adapter: the running
//! job's result is delivered, the connection is then closed with a reason,
//! `shutdown` returns, the listener is gone, and no thread or task is left.
//!
//! This file holds a single test so that counting this process's threads
//! (/proc/self/task) sees no other test's threads.

mod common;

use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use donate_proto::ServerConfig;
use serde_json::json;

use common::*;

const JOB: Duration = Duration::from_millis(300);

fn shutdown_mid_job(kind: ServerKind) {
    let exec = TestExec::slow(JOB);
    let node = start(kind, ServerConfig::default(), exec.clone());
    let addr = node.addr();
    let mut raw = Raw::session(addr);
    raw.mount();
    // An idle second connection is closed too.
    let mut idle = Raw::session(addr);
    raw.send(&infer("slow", &[9, 9], 3));
    exec.wait_started(1);

    let started = Instant::now();
    let stopping = thread::spawn(move || node.shutdown());

    // The running job's result is delivered, then the node says why it closes.
    assert_eq!(
        raw.frame(),
        json!({"v": 1, "type": "infer_result", "job_id": "slow", "ok": true, "output_ids": [9, 9, 1, 2, 3], "queue_depth": 0})
    );
    raw.expect_error("node shutting down");
    raw.expect_closed();
    idle.expect_error("node shutting down");
    idle.expect_closed();

    // `shutdown` returns once the job is done (TestServer bounds it).
    stopping.join().expect("shutdown");
    let took = started.elapsed();
    assert!(
        took < JOB + Duration::from_secs(3),
        "shutdown took {took:?}"
    );
    assert_eq!(exec.finished.load(std::sync::atomic::Ordering::SeqCst), 1);

    // Nobody listens any more.
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(),
        "{kind:?}: still accepting after shutdown"
    );
}

/// Waits (bounded) for the thread count to come back to `baseline`.
fn threads_back_to(baseline: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let now = thread_count();
        if now <= baseline {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {now} threads after shutdown, {baseline} before"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn shutdown_mid_job_delivers_the_result_and_leaves_nothing_behind() {
    // smol's global executor and async-io's reactor start threads on first use
    // and keep them for the life of the process: start them before counting.
    let warm = start_default(ServerKind::Smol);
    assert_serves(warm.addr());
    warm.shutdown();

    for kind in [
        ServerKind::Std,
        ServerKind::Smol,
        ServerKind::SmolOnTokio,
        ServerKind::Tokio,
    ] {
        let baseline = thread_count();
        bounded(&format!("{kind:?} shutdown mid-job"), LIMIT, move || {
            shutdown_mid_job(kind)
        });
        // Tokio kinds also check the runtime has no task alive before dropping it.
        threads_back_to(baseline, &format!("{kind:?}"));
    }
}
