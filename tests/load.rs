//! Load and timers on every adapter, over real loopback sockets:
//!
//! - 64 clients × 200 jobs at a queue of 64 with 2 workers: every job is answered
//!   exactly once, matched by `job_id`, with no corrupted frame; `queue full`
//!   answers are clean, counted, and retried until every job has its result;
//! - a client that pipelines jobs and never reads: other clients keep their
//!   latency, and the stalled connection is closed after the backpressure timeout;
//! - a half-sent frame is closed after the stall timeout (and the other timers);
//! - 1,000 connections at once.
//!
//! The tests of this file run one at a time: they measure latency and time.

mod common;

use std::collections::BTreeSet;
use std::io::{ErrorKind, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use donate_proto::ServerConfig;
use serde_json::json;

use common::*;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------
// 64 clients × 200 jobs

const CLIENTS: usize = 64;
const JOBS: usize = 200;
/// Jobs a client writes before reading their answers: 64 × 25 far exceeds the queue.
const BATCH: usize = 25;

#[derive(Default, Debug)]
struct Tally {
    ok: usize,
    full: usize,
}

/// One client: pushes a model, then sends its 200 jobs in pipelined batches,
/// reading one answer per job and resending those refused with `queue full`.
fn load_client(addr: SocketAddr, c: usize) -> Tally {
    let mut raw = Raw::session(addr);
    raw.mount();
    let mut tally = Tally::default();
    let mut pending: Vec<usize> = (0..JOBS).collect();
    let mut done = [false; JOBS];
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut attempt = 0;
    while !pending.is_empty() {
        assert!(
            Instant::now() < deadline,
            "client {c}: jobs left {pending:?}"
        );
        attempt += 1;
        let batch: Vec<usize> = pending.drain(..BATCH.min(pending.len())).collect();
        let bytes: Vec<u8> = batch
            .iter()
            .flat_map(|&j| infer(&format!("c{c}-j{j}-a{attempt}"), &[c as i32, j as i32], 2))
            .collect();
        raw.send(&bytes);
        let mut answered = BTreeSet::new();
        for _ in 0..batch.len() {
            let v = raw.frame();
            let id = v["job_id"]
                .as_str()
                .unwrap_or_else(|| panic!("no job_id: {v}"));
            let parts: Vec<&str> = id.split('-').collect();
            assert_eq!(parts.len(), 3, "job_id {id}");
            assert_eq!(parts[0], format!("c{c}"), "another client's answer: {v}");
            assert_eq!(
                parts[2],
                format!("a{attempt}"),
                "an answer from another batch: {v}"
            );
            let j: usize = parts[1][1..].parse().expect("job number");
            assert!(batch.contains(&j), "not asked in this batch: {v}");
            assert!(answered.insert(j), "answered twice: {v}");
            match v["type"].as_str() {
                Some("infer_result") => {
                    assert_eq!(v["ok"], true, "{v}");
                    assert_eq!(v["output_ids"], json!([c, j, 1, 2]), "{v}");
                    let depth = v["queue_depth"].as_i64().expect("queue_depth");
                    assert!((0..64).contains(&depth), "{v}");
                    assert!(!done[j], "job {j} ran twice");
                    done[j] = true;
                    tally.ok += 1;
                }
                Some("error") => {
                    assert_eq!(
                        v,
                        json!({"v": 1, "type": "error", "error": "queue full", "code": "queue_full", "job_id": id})
                    );
                    pending.push(j);
                    tally.full += 1;
                }
                _ => panic!("unexpected frame {v}"),
            }
        }
        if !pending.is_empty() {
            // Back off a little, as a real client would, rather than spin on a full queue.
            thread::sleep(Duration::from_millis(20));
        }
    }
    assert!(done.iter().all(|d| *d));
    raw.expect_silence(Duration::from_millis(20));
    tally
}

fn load(kind: ServerKind) {
    let _serial = serial();
    let config = ServerConfig::default().queue_capacity(64).workers(2);
    let exec = TestExec::slow(Duration::from_micros(20));
    let node = start(kind, config, exec.clone());
    let addr = node.addr();
    let started = Instant::now();
    let tally = bounded("64 clients", Duration::from_secs(90), move || {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|c| thread::spawn(move || load_client(addr, c)))
            .collect();
        let mut total = Tally::default();
        for client in clients {
            let t = client.join().expect("client thread");
            total.ok += t.ok;
            total.full += t.full;
        }
        total
    });
    eprintln!(
        "{kind:?}: {} results, {} queue full, in {:?}",
        tally.ok,
        tally.full,
        started.elapsed()
    );
    assert_eq!(tally.ok, CLIENTS * JOBS);
    assert!(tally.full > 0, "the queue never filled");
    // Every job the executor ran was delivered, and none ran twice.
    assert_eq!(exec.finished.load(Ordering::SeqCst), CLIENTS * JOBS);
    assert_serves(addr);
    node.shutdown();
}

#[test]
fn load_std() {
    load(ServerKind::Std);
}

#[test]
fn load_smol() {
    load(ServerKind::Smol);
}

#[test]
fn load_tokio() {
    load(ServerKind::Tokio);
}

// ---------------------------------------------------------------------------
// A client that never reads

/// Total time of `n` sequential infer round trips.
fn round_trips(raw: &mut Raw, n: usize) -> Duration {
    let started = Instant::now();
    for i in 0..n {
        raw.expect_infer(&format!("rt{i}"));
    }
    started.elapsed()
}

fn never_reading_client(kind: ServerKind) {
    let _serial = serial();
    let backpressure = Duration::from_millis(600);
    let config = ServerConfig::default()
        .max_outbound(64 * 1024)
        .backpressure_timeout(backpressure);
    // Its jobs are tiny, their results ~400 KB: the kernel's buffers fill at once.
    let exec = TestExec {
        flood: Some(200_000),
        ..TestExec::default()
    };
    let node = start(kind, config, exec);
    let addr = node.addr();
    bounded("never-reading client", Duration::from_secs(30), move || {
        let mut probe = Raw::session(addr);
        probe.mount();
        round_trips(&mut probe, 10); // warm up
        let unloaded = round_trips(&mut probe, 50);

        // Pipelines small jobs with big answers and never reads.
        let mut stalled = Raw::session(addr);
        stalled.mount();
        let job = infer("big", &[-1], 0);
        let mut writer = stalled.stream.try_clone().expect("clone");
        writer
            .set_write_timeout(Some(Duration::from_millis(200)))
            .expect("write timeout");
        let written = Arc::new(AtomicUsize::new(0));
        let progress = Arc::clone(&written);
        let write_started = Instant::now();
        let writing = thread::spawn(move || {
            // Write until the node closes the connection (or give up).
            let give_up = Instant::now() + Duration::from_secs(15);
            let mut sent = 0;
            while Instant::now() < give_up {
                match writer.write(&job[sent..]) {
                    Ok(n) => {
                        sent = (sent + n) % job.len();
                        progress.fetch_add(n, Ordering::SeqCst);
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Some((Instant::now(), e)),
                }
            }
            None
        });

        // Wait until the node stops taking its input (no progress for 200 ms).
        let mut last = (0, Instant::now());
        loop {
            thread::sleep(Duration::from_millis(20));
            let now = written.load(Ordering::SeqCst);
            if now != last.0 {
                last = (now, Instant::now());
            } else if last.1.elapsed() > Duration::from_millis(200) {
                break;
            }
            assert!(
                write_started.elapsed() < Duration::from_secs(10),
                "never stalled"
            );
        }
        let stalled_at = last.1;
        // Jobs it queued before the node stopped reading it still run (one FIFO
        // queue); once they are done, nothing of it delays anyone.
        let drained_by = Instant::now() + LIMIT;
        loop {
            probe.send(&queue_status());
            let status = probe.frame();
            if status["depth"] == 0 && status["in_progress"] == false {
                break;
            }
            assert!(Instant::now() < drained_by, "queue never drained: {status}");
            thread::sleep(Duration::from_millis(5));
        }

        // Meanwhile the others are served as fast as before.
        let loaded = round_trips(&mut probe, 50);
        assert_serves(addr);
        eprintln!(
            "{kind:?}: {} KiB written before the stall; 50 round trips {unloaded:?} unloaded, {loaded:?} during the stall",
            written.load(Ordering::SeqCst) / 1024
        );
        assert!(
            loaded <= unloaded * 5 + Duration::from_millis(50),
            "latency {loaded:?} during the stall, {unloaded:?} without"
        );

        // The stalled connection is closed after the backpressure timeout: its
        // writes start failing (reset), and what it can still read ends.
        let (closed_at, error) = writing
            .join()
            .expect("writer")
            .expect("the node never closed the stalled connection");
        assert!(
            matches!(
                error.kind(),
                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted
            ),
            "{error}"
        );
        // The node went over its limit after the writing began, and closes a
        // backpressure timeout after that.
        assert!(
            closed_at - write_started >= backpressure,
            "closed {:?} after the writing began, before the timeout",
            closed_at - write_started
        );
        let after = closed_at.saturating_duration_since(stalled_at);
        eprintln!(
            "{kind:?}: closed {after:?} after the stall, {:?} after writing began",
            closed_at - write_started
        );
        assert!(
            after < backpressure * 2 + Duration::from_secs(2),
            "closed only {after:?} after the stall"
        );
        stalled.set_read_timeout(Duration::from_secs(2));
        let drain_until = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(
                Instant::now() < drain_until,
                "stalled connection not closed"
            );
            match stalled.read_frame() {
                Ok(_) => {}
                Err(Ended::Closed) | Err(Ended::Garbage(_)) => break,
                Err(Ended::Timeout) => panic!("stalled connection still open"),
            }
        }
        // And the node still serves everyone else.
        probe.expect_infer("after");
        assert_serves(addr);
    });
    node.shutdown();
}

#[test]
fn never_reading_client_std() {
    never_reading_client(ServerKind::Std);
}

#[test]
fn never_reading_client_smol() {
    never_reading_client(ServerKind::Smol);
}

#[test]
fn never_reading_client_tokio() {
    never_reading_client(ServerKind::Tokio);
}

// ---------------------------------------------------------------------------
// Timers

fn timers(kind: ServerKind) {
    let _serial = serial();
    let stall = Duration::from_millis(300);
    let config = ServerConfig::default()
        .stall_timeout(stall)
        .handshake_timeout(Duration::from_millis(400))
        .idle_timeout(Some(Duration::from_millis(700)));
    let node = start(kind, config, TestExec::default());
    let addr = node.addr();
    bounded("timers", Duration::from_secs(20), move || {
        // A half-sent frame is closed after the stall timeout, with an error frame.
        let mut raw = Raw::session(addr);
        let job = infer("j1", &[9, 9], 3);
        raw.send(&job[..job.len() / 2]);
        let started = Instant::now();
        let e = raw.expect_error("stalled in the middle of a frame");
        assert_eq!(e["code"], "stalled");
        raw.expect_closed();
        let after = started.elapsed();
        assert!(
            after >= stall - Duration::from_millis(20),
            "closed after {after:?}"
        );
        assert!(
            after < stall + Duration::from_secs(1),
            "closed after {after:?}"
        );

        // Each new byte restarts the stall timer: a frame trickled in slower
        // than the timeout overall, but never pausing that long, is served.
        let mut raw = Raw::session(addr);
        let request = queue_status();
        for byte in &request {
            raw.send(std::slice::from_ref(byte));
            thread::sleep(stall / 8);
        }
        assert!(stall / 8 * request.len() as u32 > stall);
        assert_eq!(raw.frame()["type"], "queue_status");

        // Between frames the stall timer does not run (the idle timer does).
        let mut raw = Raw::session(addr);
        raw.expect_in_step();
        raw.expect_silence(Duration::from_millis(500));
        raw.expect_in_step();

        // Nothing at all after connecting: the handshake timeout.
        let (mut raw, _) = Raw::hello(addr);
        let started = Instant::now();
        raw.expect_error("handshake timeout");
        raw.expect_closed();
        assert!(started.elapsed() < Duration::from_secs(2));

        // Silence with nothing in flight: the idle timeout.
        let mut raw = Raw::session(addr);
        raw.expect_in_step();
        let started = Instant::now();
        raw.expect_error("idle timeout");
        raw.expect_closed();
        let after = started.elapsed();
        assert!(after >= Duration::from_millis(650), "idle after {after:?}");
        assert!(after < Duration::from_secs(2), "idle after {after:?}");
        assert_serves(addr);
    });
    node.shutdown();
}

#[test]
fn timers_std() {
    timers(ServerKind::Std);
}

#[test]
fn timers_smol() {
    timers(ServerKind::Smol);
}

#[test]
fn timers_tokio() {
    timers(ServerKind::Tokio);
}

// ---------------------------------------------------------------------------
// 1,000 connections at once

fn thousand_connections(kind: ServerKind) {
    let _serial = serial();
    // Each connection costs two descriptors here (client and server side).
    let fd_limit = raise_fd_limit();
    let n = if fd_limit >= 2_200 {
        1_000
    } else {
        // Not enough descriptors even at the hard limit: as many as fit.
        eprintln!("open-file limit {fd_limit}: testing fewer than 1,000 connections");
        (fd_limit as usize - 200) / 2
    };
    let config = ServerConfig::default()
        .max_connections(n)
        .queue_capacity(1024);
    let node = start(kind, config, TestExec::default());
    let addr = node.addr();
    bounded("1,000 connections", Duration::from_secs(60), move || {
        let started = Instant::now();
        let mut conns: Vec<Raw> = (0..n).map(|_| Raw::session(addr)).collect();
        let connected = started.elapsed();

        // One more is told why and closed at once.
        let mut extra = Raw::connect(addr);
        let e = extra.expect_error("too many connections");
        assert_eq!(e["code"], "too_many_connections");
        extra.expect_closed();

        // All of them are live at once: each pushes a model and runs a job.
        for raw in &mut conns {
            raw.send(&small_upload());
        }
        for raw in &mut conns {
            assert_eq!(raw.expect_status(), (true, "mounted".to_owned()));
        }
        for (i, raw) in conns.iter_mut().enumerate() {
            raw.send(&infer(&format!("j{i}"), &[i as i32], 1));
        }
        for (i, raw) in conns.iter_mut().enumerate() {
            let v = raw.frame();
            assert_eq!(v["job_id"], format!("j{i}"), "{v}");
            assert_eq!(v["output_ids"], json!([i, 1]), "{v}");
        }
        for raw in &mut conns {
            raw.expect_in_step();
        }
        eprintln!(
            "{kind:?}: {n} connections in {connected:?}, all served in {:?}",
            started.elapsed()
        );
        drop(conns);

        // Closed connections are forgotten: soon a new client is accepted again.
        let deadline = Instant::now() + LIMIT;
        loop {
            let mut raw = Raw::connect(addr);
            let first = raw.frame();
            if first["type"] == "hello" {
                break;
            }
            assert_eq!(first["error"], "too many connections");
            assert!(Instant::now() < deadline, "connections never freed");
            thread::sleep(Duration::from_millis(20));
        }
        assert_serves(addr);
    });
    node.shutdown();
}

#[test]
fn thousand_connections_std() {
    thousand_connections(ServerKind::Std);
}

#[test]
fn thousand_connections_smol() {
    thousand_connections(ServerKind::Smol);
}

#[test]
fn thousand_connections_tokio() {
    thousand_connections(ServerKind::Tokio);
}
