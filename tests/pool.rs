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
use donate_proto::{Answer, Mode, PoolConfig, ServerConfig};
use donate_std::{NodeAddr, Pool, PoolJob, PoolModel, PoolResult, Work};
use sha2::{Digest, Sha256};

fn node(executor: TestExec) -> (donate_std::Server, Proxy) {
    node_with(ServerConfig::default(), executor)
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

#[test]
fn jobs_spread_over_donors_and_each_is_answered_once() {
    let nodes: Vec<_> = (0..3)
        .map(|_| node(TestExec::slow(Duration::from_millis(2))))
        .collect();
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
    let nodes: Vec<_> = (0..3)
        .map(|_| node(TestExec::slow(Duration::from_millis(3))))
        .collect();
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
    check_once(&results, 300);
    assert!(summary.donors[0].failures >= 1, "{summary:?}");
    let late = results[100..].iter().filter(|r| r.donor == Some(0)).count();
    assert!(
        late <= 10,
        "the lost donor answered {late} jobs after it died"
    );
}

#[test]
fn a_stalled_donor_s_jobs_are_reissued_and_its_late_answers_dropped() {
    let nodes: Vec<_> = (0..2)
        .map(|_| node(TestExec::slow(Duration::from_millis(2))))
        .collect();
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
        assert_eq!(r.outcome, Err("every donor is down".to_owned()), "{r:?}");
    }
}

#[test]
fn donate_batch_writes_one_line_per_job_and_refuses_duplicates_up_front() {
    let a = node(TestExec::default());
    let b = node(TestExec::default());
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("jobs.jsonl");
    let mut lines: Vec<String> = (0..20)
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
    let mut ids: Vec<String> = out
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["type"], "infer_result", "{l}");
            assert_eq!(v["ok"], true);
            v["job_id"].as_str().unwrap().to_owned()
        })
        .collect();
    ids.sort();
    let mut want: Vec<String> = (0..20).map(|i| format!("j{i}")).collect();
    want.sort();
    assert_eq!(ids, want);
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert!(stderr.contains("20 jobs, 0 failed"), "{stderr}");

    lines.push(lines[3].clone());
    let dup = dir.path().join("dup.jsonl");
    std::fs::write(&dup, lines.join("\n")).unwrap();
    let refused = run(&dup);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("used twice; nothing was sent"), "{stderr}");

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

#[test]
fn secure_donors_are_reached_over_noise_and_a_wrong_key_is_marked_down() {
    use donate_proto::{Keypair, NodeTrust, SecureClientConfig, SecureServerConfig};
    use donate_std::NodeConfig;
    let (node_key, client_key) = (Keypair::generate(), Keypair::generate());
    let config = NodeConfig::secure(
        ServerConfig::default(),
        SecureServerConfig::with_keys(node_key.clone(), vec![*client_key.public()]),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = donate_std::serve(listener, config, TestExec::default()).unwrap();
    let addr = NodeAddr::Tcp(server.local_addr().to_string());
    let trust = |key: &Keypair| SecureClientConfig {
        keypair: client_key.clone(),
        trust: NodeTrust::pin(&key.public().fingerprint()).unwrap(),
    };
    let (_dir, model) = model();
    let mut results = Vec::new();
    // The same node twice: once pinned right, once pinned to another key.
    let summary = Pool::new(Vec::new(), PoolConfig::default())
        .secure_donor(addr.clone(), trust(&node_key))
        .secure_donor(addr, trust(&Keypair::generate()))
        .model(model)
        .run(jobs(30), |r| results.push(r), |_| {})
        .unwrap();
    let per_donor = check_once(&results, 30);
    assert_eq!(per_donor.get(&0), Some(&30));
    let why = summary.donors[1].last_error.clone().unwrap_or_default();
    assert!(why.contains("presented key"), "{why}");
    server.shutdown();
}
