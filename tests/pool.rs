//! Donor pools over real sockets (`donate_std::Pool`, `donate batch`): jobs
//! spread over donors and answered exactly once, while donors vanish, stall,
//! refuse the model or are all down. A proxy in front of each in-process node
//! plays the failures: it can cut every connection at once (a killed process)
//! or stop forwarding (a stopped one).

mod common;

use common::proxy::Proxy;

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::TestExec;
use donate_proto::{Answer, Mode, PoolConfig, PoolError, ServerConfig};
use donate_std::{NodeAddr, Pool, PoolJob, PoolModel, PoolResult, Work};
use sha2::{Digest, Sha256};

fn node(executor: TestExec) -> (donate_std::Server, Proxy) {
    node_with(ServerConfig::default(), executor)
}

/// `n` in-process donors whose jobs take `ms` each, behind proxies.
fn slow_nodes(n: usize, ms: u64) -> Vec<(donate_std::Server, Proxy)> {
    (0..n)
        .map(|_| node(TestExec::slow(Duration::from_millis(ms))))
        .collect()
}

/// The same pool as [`pool`], for the async drivers.
fn async_pool(proxies: &[&Proxy], config: PoolConfig) -> (tempfile::TempDir, donate_host::Pool) {
    let (dir, model) = model();
    (
        dir,
        donate_host::Pool::new(addrs(proxies), config).model(model),
    )
}

fn node_with(config: ServerConfig, executor: TestExec) -> (donate_std::Server, Proxy) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = donate_std::serve(listener, config, executor).unwrap();
    let proxy = Proxy::new(server.local_addr());
    (server, proxy)
}

fn jobs(n: usize) -> Vec<PoolJob> {
    (0..n)
        .map(|i| PoolJob {
            job_id: format!("job-{i}"),
            work: Work::Infer {
                input_ids: vec![i as i32],
                max_tokens: 1,
            },
        })
        .collect()
}

/// A 4-byte model every donor mounts (the stub ignores it), in its own directory.
fn model() -> (tempfile::TempDir, PoolModel) {
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("w.bin");
    std::fs::write(&weights, [1u8, 2, 3, 4]).unwrap();
    let model = PoolModel {
        config_json: "{}".to_owned(),
        weights,
        len: 4,
        sha256: Sha256::digest([1u8, 2, 3, 4]).into(),
    };
    (dir, model)
}

/// A pool over `proxies` with the test model.
fn pool(proxies: &[&Proxy], config: PoolConfig) -> (tempfile::TempDir, Pool) {
    let (dir, model) = model();
    (dir, Pool::new(addrs(proxies), config).model(model))
}

fn addrs(proxies: &[&Proxy]) -> Vec<NodeAddr> {
    proxies
        .iter()
        .map(|p| NodeAddr::Tcp(p.addr.to_string()))
        .collect()
}

/// Every job answered exactly once, successfully, with its own output.
fn check_once(results: &[PoolResult], n: usize) -> HashMap<usize, usize> {
    let mut seen = HashMap::new();
    let mut per_donor = HashMap::new();
    for r in results {
        assert!(
            seen.insert(r.job_id.clone(), ()).is_none(),
            "{} twice",
            r.job_id
        );
        let i: i32 = r.job_id["job-".len()..].parse().unwrap();
        match &r.outcome {
            Ok(Answer::Infer(out)) => assert_eq!(out.output_ids, [i, 1], "{r:?}"),
            other => panic!("{}: {other:?}", r.job_id),
        }
        *per_donor.entry(r.donor.unwrap()).or_default() += 1;
    }
    assert_eq!(seen.len(), n);
    per_donor
}

/// Donor 0 killed after 90 of 300 results: every job answered once, donor 0
/// marked down, and next to nothing answered by it after that.
fn check_lost_donor(results: &[PoolResult], summary: &donate_host::PoolSummary) {
    check_once(results, 300);
    assert!(summary.donors[0].failures >= 1, "{summary:?}");
    let late = results[100..].iter().filter(|r| r.donor == Some(0)).count();
    assert!(
        late <= 10,
        "the lost donor answered {late} jobs after it died"
    );
}

#[test]
fn jobs_spread_over_donors_and_each_is_answered_once() {
    let nodes = slow_nodes(3, 2);
    let proxies: Vec<&Proxy> = nodes.iter().map(|(_, p)| p).collect();
    let mut results = Vec::new();
    let (_dir, pool) = pool(&proxies, PoolConfig::default());
    let summary = pool.run(jobs(300), |r| results.push(r), |_| {}).unwrap();
    let per_donor = check_once(&results, 300);
    assert_eq!(per_donor.len(), 3, "every donor worked: {per_donor:?}");
    assert_eq!(summary.retries, 0);
    assert!(summary.donors.iter().all(|d| d.up && d.failures == 0));
}

#[test]
fn a_donor_lost_mid_batch_gives_its_jobs_to_the_others() {
    let nodes = slow_nodes(3, 3);
    let proxies: Vec<&Proxy> = nodes.iter().map(|(_, p)| p).collect();
    let mut results = Vec::new();
    let (_dir, pool) = pool(&proxies, PoolConfig::default());
    let summary = pool
        .run(
            jobs(300),
            |r| {
                results.push(r);
                if results.len() == 90 {
                    proxies[0].kill();
                }
            },
            |_| {},
        )
        .unwrap();
    check_lost_donor(&results, &summary);
}

#[test]
fn a_stalled_donor_s_jobs_are_reissued_and_its_late_answers_dropped() {
    let nodes = slow_nodes(2, 2);
    let proxies: Vec<&Proxy> = nodes.iter().map(|(_, p)| p).collect();
    let config = PoolConfig::default()
        .job_deadline(Duration::from_millis(300))
        .backoff_base(Duration::from_secs(5));
    let mut results = Vec::new();
    let stalled_once = std::cell::Cell::new(false);
    let (_dir, pool) = pool(&proxies, config);
    let summary = pool
        .run(
            jobs(200),
            |r| {
                results.push(r);
                if results.len() == 50 && !stalled_once.get() {
                    stalled_once.set(true);
                    proxies[0].stall(true);
                    // It wakes up after its jobs went elsewhere: its answers come late.
                    let p = proxies[0].stalled.clone();
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_millis(800));
                        p.store(false, Ordering::SeqCst);
                    });
                }
            },
            |_| {},
        )
        .unwrap();
    check_once(&results, 200);
    assert!(summary.donors[0].failures >= 1);
    assert!(summary.donors[0]
        .last_error
        .as_deref()
        .is_some_and(|e| e.contains("stalled")));
    assert!(summary.retries >= 1);
}

#[test]
fn a_donor_that_refuses_the_model_is_marked_down_with_why() {
    let good = node(TestExec::default());
    let refusing = node_with(
        ServerConfig::default().mode(Mode::LocalLm),
        TestExec::local_lm("/m"),
    );
    let mut results = Vec::new();
    let (_dir, pool) = pool(&[&good.1, &refusing.1], PoolConfig::default());
    let summary = pool.run(jobs(20), |r| results.push(r), |_| {}).unwrap();
    let per_donor = check_once(&results, 20);
    assert_eq!(per_donor.get(&0), Some(&20));
    let why = summary.donors[1].last_error.clone().unwrap_or_default();
    assert!(why.contains("did not mount"), "{why}");
}

#[test]
fn with_every_donor_down_each_job_fails_once_with_a_clear_error() {
    // Nothing listens on these: bound, then closed.
    let dead: Vec<NodeAddr> = (0..2)
        .map(|_| {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            NodeAddr::Tcp(l.local_addr().unwrap().to_string())
        })
        .collect();
    let config = PoolConfig::default()
        .backoff_base(Duration::from_millis(5))
        .backoff_max(Duration::from_millis(20))
        .max_attempts(2);
    let mut results = Vec::new();
    Pool::new(dead, config)
        .run(jobs(5), |r| results.push(r), |_| {})
        .unwrap();
    assert_eq!(results.len(), 5);
    for r in &results {
        assert_eq!(r.outcome, Err(PoolError::AllDonorsDown), "{r:?}");
    }
}

#[test]
fn a_refusal_no_retry_can_change_fails_the_job_at_once() {
    let a = node(TestExec::default());
    let b = node(TestExec::default());
    // No model: each donor answers every infer job `model_not_mounted`.
    let pool = Pool::new(addrs(&[&a.1, &b.1]), PoolConfig::default());
    let mut results = Vec::new();
    let summary = pool.run(jobs(4), |r| results.push(r), |_| {}).unwrap();
    assert_eq!(results.len(), 4);
    for r in &results {
        match &r.outcome {
            Ok(Answer::Error(e)) => assert_eq!(e.code, "model_not_mounted", "{r:?}"),
            other => panic!("{}: {other:?}", r.job_id),
        }
    }
    assert_eq!(summary.retries, 0, "{summary:?}");
}

#[test]
fn donate_batch_writes_one_line_per_job_and_refuses_duplicates_up_front() {
    let a = node(TestExec::default());
    let b = node(TestExec::default());
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("jobs.jsonl");
    let mut lines: Vec<String> = (0..1000)
        .map(|i| format!(r#"{{"job_id":"j{i}","input_ids":[{i}],"max_tokens":2}}"#))
        .collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let output = dir.path().join("out.jsonl");
    let (config, weights) = (dir.path().join("c.json"), dir.path().join("w.bin"));
    std::fs::write(&config, "{}").unwrap();
    std::fs::write(&weights, [1u8, 2, 3, 4]).unwrap();
    let bin = env!("CARGO_BIN_EXE_donate");
    let run = |input: &std::path::Path| {
        std::process::Command::new(bin)
            .args([
                "batch",
                "--node",
                &a.1.addr.to_string(),
                "--node",
                &b.1.addr.to_string(),
            ])
            .arg("--config")
            .arg(&config)
            .arg("--weights")
            .arg(&weights)
            .env("DONATE_CACHE_DIR", dir.path().join("cache"))
            .arg("--input")
            .arg(input)
            .arg("--output")
            .arg(&output)
            .output()
            .unwrap()
    };
    let done = run(&input);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let out = std::fs::read_to_string(&output).unwrap();
    let ids: Vec<String> = out
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["type"], "infer_result", "{l}");
            assert_eq!(v["ok"], true);
            v["job_id"].as_str().unwrap().to_owned()
        })
        .collect();
    // In input order, whichever donor finished what first.
    let want: Vec<String> = (0..1000).map(|i| format!("j{i}")).collect();
    assert_eq!(ids, want);
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert!(stderr.contains("1000 jobs, 0 failed"), "{stderr}");

    lines.push(lines[3].clone());
    let dup = dir.path().join("dup.jsonl");
    std::fs::write(&dup, lines.join("\n")).unwrap();
    let refused = run(&dup);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("used twice; nothing was sent"), "{stderr}");

    // Every donor down: each job gets an error line, and the exit status says so.
    let dead_addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    std::fs::write(&input, lines[..3].join("\n")).unwrap();
    let down = std::process::Command::new(bin)
        .args([
            "batch",
            "--node",
            &dead_addr,
            "--max-attempts",
            "1",
            "--input",
        ])
        .arg(&input)
        .arg("--config")
        .arg(&config)
        .arg("--weights")
        .arg(&weights)
        .env("DONATE_CACHE_DIR", dir.path().join("cache"))
        .arg("--output")
        .arg(&output)
        .output()
        .unwrap();
    assert!(!down.status.success());
    let stderr = String::from_utf8_lossy(&down.stderr);
    assert!(stderr.contains("3 of 3 jobs failed"), "{stderr}");
    let out = std::fs::read_to_string(&output).unwrap();
    let codes: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .collect();
    assert_eq!(codes.len(), 3, "{out}");
    for (i, v) in codes.iter().enumerate() {
        assert_eq!(v["job_id"], format!("j{i}"));
        assert_eq!(v["code"], "pool_failed", "{v}");
        assert_eq!(v["error"], "every donor is down", "{v}");
    }

    // donate status over both donors and a dead one.
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let status = std::process::Command::new(bin)
        .args([
            "status",
            "--json",
            "--node",
            &a.1.addr.to_string(),
            "--node",
            &dead.to_string(),
        ])
        .output()
        .unwrap();
    assert!(!status.status.success(), "a donor is unreachable");
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["nodes"][0]["reachable"], true);
    assert_eq!(v["nodes"][0]["mode"], "model_push");
    assert_eq!(v["nodes"][1]["reachable"], false);
}

/// A secure node, and the trust of a client it authorizes pinned to `key`.
struct SecureNode {
    server: donate_std::Server,
    addr: NodeAddr,
    node_key: donate_proto::Keypair,
    client_key: donate_proto::Keypair,
}

impl SecureNode {
    fn start() -> SecureNode {
        use donate_proto::{Keypair, SecureServerConfig};
        let (node_key, client_key) = (Keypair::generate(), Keypair::generate());
        let config = donate_std::NodeConfig::secure(
            ServerConfig::default(),
            SecureServerConfig::with_keys(node_key.clone(), vec![*client_key.public()]),
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        // Slow enough that a batch outlasts a wrong key's handshake.
        let executor = TestExec::slow(Duration::from_millis(3));
        let server = donate_std::serve(listener, config, executor).unwrap();
        let addr = NodeAddr::Tcp(server.local_addr().to_string());
        SecureNode {
            server,
            addr,
            node_key,
            client_key,
        }
    }

    /// Our client key, trusting only a node whose key is `key`.
    fn trust(&self, key: &donate_proto::Keypair) -> donate_proto::SecureClientConfig {
        donate_proto::SecureClientConfig {
            keypair: self.client_key.clone(),
            trust: donate_proto::NodeTrust::pin(&key.public().fingerprint()).unwrap(),
        }
    }
}

#[test]
fn secure_donors_are_reached_over_noise_and_a_wrong_key_is_marked_down() {
    let node = SecureNode::start();
    let (_dir, model) = model();
    let mut results = Vec::new();
    // The same node twice: once pinned right, once pinned to another key.
    let summary = Pool::new(Vec::new(), PoolConfig::default())
        .secure_donor(node.addr.clone(), node.trust(&node.node_key))
        .secure_donor(
            node.addr.clone(),
            node.trust(&donate_proto::Keypair::generate()),
        )
        .model(model)
        .run(jobs(30), |r| results.push(r), |_| {})
        .unwrap();
    let per_donor = check_once(&results, 30);
    assert_eq!(per_donor.get(&0), Some(&30));
    let why = summary.donors[1].last_error.clone().unwrap_or_default();
    assert!(why.contains("presented key"), "{why}");
    node.server.shutdown();
}

#[test]
fn the_async_pool_reaches_secure_donors_and_marks_a_wrong_key_down() {
    let node = SecureNode::start();
    let (_dir, model) = model();
    let pool = donate_host::Pool::new(Vec::new(), PoolConfig::default())
        .secure_donor(node.addr.clone(), node.trust(&node.node_key))
        .secure_donor(
            node.addr.clone(),
            node.trust(&donate_proto::Keypair::generate()),
        )
        .model(model);
    smol::block_on(async {
        let handle = donate_smol::start_pool(pool, |task| smol::spawn(task).detach());
        let results = handle.run(jobs(30)).await.unwrap();
        let mut got = Vec::new();
        while let Ok(result) = results.recv().await {
            got.push(result);
        }
        let per_donor = check_once(&got, 30);
        assert_eq!(per_donor.get(&0), Some(&30));
        let summary = handle.close().await;
        let why = summary.donors[1].last_error.clone().unwrap_or_default();
        assert!(why.contains("presented key"), "{why}");
    });
    node.server.shutdown();
}

/// The async pool's batch: results as they finish; the first donor killed
/// after `kill_at` of them.
async fn async_batch(
    handle: donate_host::PoolHandle,
    n: usize,
    kill_at: usize,
    victim: &Proxy,
) -> (Vec<PoolResult>, donate_host::PoolSummary) {
    let results = handle.run(jobs(n)).await.unwrap();
    let mut got = Vec::new();
    while let Ok(result) = results.recv().await {
        got.push(result);
        if got.len() == kill_at {
            victim.kill();
        }
    }
    (got, handle.close().await)
}

type Submit = std::pin::Pin<Box<dyn std::future::Future<Output = PoolResult> + Send>>;

/// Single jobs from many tasks at once through `submit`; an id may be used
/// again once its job is answered.
async fn async_submits<T>(handle: &donate_host::PoolHandle, spawn: impl Fn(Submit) -> T)
where
    T: std::future::Future<Output = PoolResult>,
{
    let tasks: Vec<T> = jobs(40)
        .into_iter()
        .map(|job| {
            let handle = handle.clone();
            spawn(Box::pin(async move { handle.submit(job).await }))
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await);
    }
    check_once(&results, 40);
    let again = handle.submit(jobs(1).remove(0)).await;
    assert!(again.ok(), "{again:?}");
}

#[test]
fn the_async_pool_on_smol_survives_a_lost_donor_and_answers_each_job_once() {
    let nodes = slow_nodes(3, 2);
    let proxies: Vec<&Proxy> = nodes.iter().map(|(_, p)| p).collect();
    let (_dir, pool) = async_pool(&proxies, PoolConfig::default());
    smol::block_on(async {
        let handle = donate_smol::start_pool(pool, |task| smol::spawn(task).detach());
        async_submits(&handle, smol::spawn).await;
        let (results, summary) = async_batch(handle, 300, 90, proxies[0]).await;
        check_lost_donor(&results, &summary);
    });
}

#[test]
fn the_async_pool_on_tokio_survives_a_lost_donor_and_answers_each_job_once() {
    let nodes = slow_nodes(3, 2);
    let proxies: Vec<&Proxy> = nodes.iter().map(|(_, p)| p).collect();
    let (_dir, pool) = async_pool(&proxies, PoolConfig::default());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let handle = donate_tokio::start_pool(pool).unwrap();
        async_submits(&handle, |f| {
            let task = tokio::spawn(f);
            async move { task.await.unwrap() }
        })
        .await;
        let (results, summary) = async_batch(handle, 300, 90, proxies[0]).await;
        check_lost_donor(&results, &summary);
    });
}

#[test]
fn the_async_pool_reissues_a_stalled_donor_s_jobs_on_tokio() {
    let nodes = slow_nodes(2, 2);
    let proxies: Vec<&Proxy> = nodes.iter().map(|(_, p)| p).collect();
    let config = PoolConfig::default()
        .job_deadline(Duration::from_millis(300))
        .backoff_base(Duration::from_secs(5));
    let (_dir, pool) = async_pool(&proxies, config);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let handle = donate_tokio::start_pool(pool).unwrap();
        let results = handle.run(jobs(200)).await.unwrap();
        let mut got = Vec::new();
        while let Ok(result) = results.recv().await {
            got.push(result);
            if got.len() == 50 {
                proxies[0].stall(true);
            }
        }
        proxies[0].stall(false);
        check_once(&got, 200);
        let summary = handle.close().await;
        let why = summary.donors[0].last_error.clone().unwrap_or_default();
        assert!(why.contains("stalled"), "{summary:?}");
    });
}

/// A Go node as bytes on the wire: a v1 `hello`, an `unknown type` error for
/// `queue_status`, a reader and one worker answering jobs in order (the Go
/// stub's output). Records the most jobs it ever had in flight.
struct GoDonor {
    addr: std::net::SocketAddr,
    most_in_flight: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    answered: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl GoDonor {
    fn start() -> GoDonor {
        use std::io::{Read, Write};
        use std::sync::atomic::AtomicUsize;
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let most_in_flight = Arc::new(AtomicUsize::new(0));
        let answered = Arc::new(AtomicUsize::new(0));
        let (most, done) = (most_in_flight.clone(), answered.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut reader) = conn else { return };
                let writer = std::sync::Mutex::new(reader.try_clone().unwrap());
                let write = move |body: &str| {
                    let mut w = writer.lock().unwrap();
                    let _ = w.write_all(&(body.len() as u32).to_le_bytes());
                    let _ = w.write_all(body.as_bytes());
                };
                write(
                    r#"{"v":1,"type":"hello","mode":"model_push","role":"server","queue_capacity":64}"#,
                );
                let write = Arc::new(write);
                let in_flight = Arc::new(AtomicUsize::new(0));
                let (jobs, queue) = std::sync::mpsc::channel::<serde_json::Value>();
                let (w, inf, done) = (write.clone(), in_flight.clone(), done.clone());
                std::thread::spawn(move || {
                    for job in queue {
                        std::thread::sleep(Duration::from_millis(1));
                        let mut ids: Vec<i64> = job["input_ids"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|v| v.as_i64().unwrap())
                            .collect();
                        ids.extend(1..=job["max_tokens"].as_i64().unwrap());
                        let body = serde_json::json!({"v":1,"type":"infer_result","job_id":job["job_id"],"ok":true,"output_ids":ids,"queue_depth":0});
                        inf.fetch_sub(1, Ordering::SeqCst);
                        done.fetch_add(1, Ordering::SeqCst);
                        w(&body.to_string());
                    }
                });
                let most = most.clone();
                std::thread::spawn(move || loop {
                    let mut len = [0u8; 4];
                    if reader.read_exact(&mut len).is_err() {
                        return;
                    }
                    let mut body = vec![0; u32::from_le_bytes(len) as usize];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    let frame: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    match frame["type"].as_str().unwrap_or("") {
                        "infer" => {
                            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            let _ = jobs.send(frame);
                        }
                        "model_commit" => {
                            write(r#"{"v":1,"type":"model_status","ok":true,"message":"mounted"}"#)
                        }
                        "hello" | "model_begin" | "weights_chunk" => {}
                        other => write(&format!(
                            r#"{{"error":"unknown type: {other}","type":"error","v":1}}"#
                        )),
                    }
                });
            }
        });
        GoDonor {
            addr,
            most_in_flight,
            answered,
        }
    }
}

#[test]
fn a_go_v1_donor_in_the_pool_gets_one_job_at_a_time() {
    let ours = node(TestExec::slow(Duration::from_millis(2)));
    let go = GoDonor::start();
    let (_dir, model) = model();
    let donors = vec![
        NodeAddr::Tcp(ours.1.addr.to_string()),
        NodeAddr::Tcp(go.addr.to_string()),
    ];
    let mut results = Vec::new();
    let summary = Pool::new(donors, PoolConfig::default())
        .model(model)
        .run(jobs(200), |r| results.push(r), |_| {})
        .unwrap();
    let per_donor = check_once(&results, 200);
    assert!(per_donor.get(&1).is_some_and(|&n| n > 0), "{per_donor:?}");
    assert_eq!(go.most_in_flight.load(Ordering::SeqCst), 1);
    assert_eq!(
        go.answered.load(Ordering::SeqCst) as u64,
        summary.donors[1].jobs
    );
    assert_eq!(summary.retries, 0, "{summary:?}");
}

/// A real `donate serve` process stopped with SIGSTOP mid-batch: its jobs are
/// re-issued after the job deadline, and when it resumes nothing reaches the
/// caller twice.
#[cfg(unix)]
#[test]
fn a_sigstopped_donor_process_has_its_jobs_reissued_and_no_duplicate_delivered() {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_donate"))
        .args(["serve", "--addr", "127.0.0.1:0", "--executor", "stub"])
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let stopped_addr = line
        .trim_end()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    let pid = child.id() as i32;
    let other = node(TestExec::slow(Duration::from_millis(2)));
    let config = PoolConfig::default()
        .job_deadline(Duration::from_millis(300))
        .backoff_base(Duration::from_millis(100));
    let (_dir, model) = model();
    let mut results = Vec::new();
    let mut stopped_at = None;
    let summary = Pool::new(
        vec![
            NodeAddr::Tcp(stopped_addr),
            NodeAddr::Tcp(other.1.addr.to_string()),
        ],
        config,
    )
    .model(model)
    .run(
        jobs(600),
        |r| {
            results.push(r);
            if results.len() == 100 {
                // SAFETY: signalling our own child.
                assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
                stopped_at = Some(std::time::Instant::now());
            }
            if stopped_at.is_some_and(|at| at.elapsed() > Duration::from_millis(700)) {
                stopped_at = None;
                assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
            }
        },
        |_| {},
    )
    .unwrap();
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let _ = child.kill();
    let _ = child.wait();
    check_once(&results, 600);
    let why = summary.donors[0].last_error.clone().unwrap_or_default();
    assert!(why.contains("stalled"), "{summary:?}");
    assert!(summary.retries >= 1, "{summary:?}");
}
