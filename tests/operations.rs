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
    node_offering(exec, HONOURED)
}

fn node_offering(exec: Spinner, offered: donate_proto::Capabilities) -> donate_std::Server {
    let config = ServerConfig::default()
        .mode(Mode::LocalLm)
        .local_lm_path("/m".into());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    donate_std::serve(listener, NodeConfig::from(config).offer(offered), exec).expect("serve")
}

/// What a client saw: `cancel`'s answer, the cancelled job's code, a failed
/// job's code from `wait_prompt`, the node's count of failed jobs.
type Seen = (bool, String, String, i64);

fn failed(result: donate_std::Result<donate_proto::message::PromptResult>) -> String {
    match result {
        Err(donate_std::Error::PromptFailed(r)) => r.code,
        other => panic!("{other:?}"),
    }
}

fn cancelled(answer: donate_proto::Answer) -> String {
    match answer {
        donate_proto::Answer::Prompt(r) => r.code,
        other => panic!("{other:?}"),
    }
}

/// The std client's steps on an async client (smol's and tokio's are both
/// donate-host's); `started` ends once the spinning job runs.
async fn async_seen(
    c: &mut donate_host::Client<donate_host::BoxStream>,
    started: impl std::future::Future<Output = ()>,
) -> Seen {
    let job = c.send_prompt("spin", 8).await.unwrap();
    c.flush().await.unwrap();
    started.await;
    let sent = c.cancel(job).await.unwrap();
    let code = cancelled(c.wait(job).await.unwrap());
    let job = c.send_prompt("fail", 8).await.unwrap();
    let failed = failed(c.wait_prompt(job).await);
    let jobs_failed = c.stats().await.unwrap().unwrap().jobs_failed;
    (sent, code, failed, jobs_failed)
}

#[test]
fn the_blocking_and_async_clients_cancel_wait_for_a_failed_job_and_read_stats_alike() {
    let exec = Spinner::default();
    let offered = HONOURED.with(donate_proto::Capability::Stats);
    let server = node_offering(exec.clone(), offered);
    let addr = server.local_addr();
    let started = |n| {
        let exec = exec.clone();
        move || {
            wait_for("the job to start", Duration::from_secs(10), || {
                exec.started.load(Ordering::SeqCst) == n
            })
        }
    };
    let std_seen: Seen = {
        let mut c = donate_std::Client::connect(addr).unwrap();
        let job = c.send_prompt("spin", 8).unwrap();
        c.flush().unwrap();
        started(1)();
        let sent = c.cancel(job).unwrap();
        let code = cancelled(c.wait(job).unwrap());
        let job = c.send_prompt("fail", 8).unwrap();
        let failed = failed(c.wait_prompt(job));
        (sent, code, failed, c.stats().unwrap().unwrap().jobs_failed)
    };
    let smol_seen: Seen = smol::block_on(async {
        let mut c = donate_smol::Client::connect(addr).await.unwrap();
        async_seen(&mut c, smol::unblock(started(3))).await
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tokio_seen: Seen = rt.block_on(async {
        let mut c = donate_tokio::Client::connect(addr).await.unwrap();
        let started = tokio::task::spawn_blocking(started(5));
        async_seen(&mut c, async { started.await.unwrap() }).await
    });
    let seen = |n| (true, "cancelled".to_owned(), "boom".to_owned(), n);
    assert_eq!(std_seen, seen(2));
    assert_eq!(smol_seen, seen(4));
    assert_eq!(tokio_seen, seen(6));
    assert_eq!(exec.stopped.load(Ordering::SeqCst), 3);
    // From a node that does not offer `stats`, every client says so alike.
    let plain = node(Spinner::default());
    let mut c = donate_std::Client::connect(plain.local_addr()).unwrap();
    assert_eq!(c.stats().unwrap(), None);
    let none = rt.block_on(async {
        let mut c = donate_tokio::Client::connect(plain.local_addr())
            .await
            .unwrap();
        c.stats().await.unwrap()
    });
    assert_eq!(none, None);
    drop(c);
    plain.shutdown();
    server.shutdown();
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
