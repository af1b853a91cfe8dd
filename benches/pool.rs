//! Donor pool benchmark (issue 16): simulated donors in this process (each a
//! node with one worker whose jobs take a fixed time), each behind a proxy that
//! can kill it, and one pool spreading jobs over them: `donate_std::Pool`
//! (blocking), and the async pool of donate-host on tokio and on smol.
//!
//! ```text
//! cargo bench --bench pool              # 10,000 jobs per scenario
//! cargo bench --bench pool -- --quick   # 2,000 (CI smoke)
//! ```
//!
//! Throughput is compared with the donors' summed capacity (1 / job time
//! each), which is what a perfect scheduler would reach.

#[path = "../tests/common/proxy.rs"]
#[allow(dead_code)] // the bench kills donors; it does not stall them
mod proxy;

use std::collections::HashSet;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use donate_host::ModelStore;
use donate_proto::{
    Executor, JobContext, JobError, NoSpool, PoolConfig, ServerConfig, Stub, Weights,
};
use donate_std::{NodeAddr, NodeConfig, Pool, PoolJob, PoolModel, Work};
use proxy::Proxy;
use sha2::{Digest, Sha256};

/// A donor whose every job takes `time`.
#[derive(Clone)]
struct Fixed {
    time: Duration,
}

impl Executor for Fixed {
    type Model = ();
    type Spool = NoSpool;

    fn mount(&self, _: String, _: Weights<NoSpool>) -> Result<(), String> {
        Ok(())
    }

    fn infer(
        &self,
        _: &(),
        ids: &[i32],
        max: i64,
        job: &JobContext<'_>,
    ) -> Result<Vec<i32>, JobError> {
        std::thread::sleep(self.time);
        Stub::default().infer(&(), ids, max, job)
    }
}

struct Donors {
    servers: Vec<donate_std::Server>,
    proxies: Vec<Proxy>,
    capacity: f64,
}

fn donors(times_ms: &[u64]) -> Donors {
    donors_with(times_ms, |_| NodeConfig::from(ServerConfig::default()))
}

/// Donors whose node configs `config` makes (by index).
fn donors_with(times_ms: &[u64], config: impl Fn(usize) -> NodeConfig) -> Donors {
    let mut servers = Vec::new();
    let mut proxies = Vec::new();
    for (i, &ms) in times_ms.iter().enumerate() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let executor = Fixed {
            time: Duration::from_millis(ms),
        };
        let server = donate_std::serve(listener, config(i), executor).unwrap();
        proxies.push(Proxy::new(server.local_addr()));
        servers.push(server);
    }
    let capacity = times_ms.iter().map(|ms| 1000.0 / *ms as f64).sum();
    Donors {
        servers,
        proxies,
        capacity,
    }
}

fn jobs(n: usize) -> Vec<PoolJob> {
    (0..n)
        .map(|i| PoolJob {
            job_id: format!("j{i}"),
            work: Work::Infer {
                input_ids: vec![i as i32],
                max_tokens: 1,
            },
        })
        .collect()
}

fn pool(donors: &Donors, model: &PoolModel) -> Pool {
    let addrs = donors
        .proxies
        .iter()
        .map(|p| NodeAddr::Tcp(p.addr.to_string()))
        .collect();
    Pool::new(addrs, config()).model(model.clone())
}

fn config() -> PoolConfig {
    PoolConfig::default().job_deadline(Duration::from_secs(2))
}

/// The same pool, for the async drivers.
fn async_pool(donors: &Donors, model: &PoolModel) -> donate_host::Pool {
    let addrs = donors
        .proxies
        .iter()
        .map(|p| NodeAddr::Tcp(p.addr.to_string()))
        .collect();
    donate_host::Pool::new(addrs, config()).model(model.clone())
}

/// Runs `n` jobs on a started async pool; jobs/s, each checked answered once.
async fn async_throughput(handle: donate_host::PoolHandle, n: usize) -> f64 {
    let start = Instant::now();
    let results = handle.run(jobs(n)).await.unwrap();
    let mut seen = HashSet::new();
    while let Ok(r) = results.recv().await {
        assert!(r.ok(), "{r:?}");
        assert!(seen.insert(r.job_id), "answered twice");
    }
    assert_eq!(seen.len(), n);
    let rate = n as f64 / start.elapsed().as_secs_f64();
    handle.close().await;
    rate
}

fn row(what: &str, figure: String, reference: String, ratio: f64, goal: &str, met: bool) {
    println!(
        "| {what} | {figure} | {reference} | {ratio:.2} x | {goal} | {} |",
        if met { "yes" } else { "NO" }
    );
}

/// Runs `n` jobs and returns jobs/s; checks each was answered once and succeeded.
fn throughput(donors: &Donors, model: &PoolModel, n: usize) -> f64 {
    let start = Instant::now();
    let mut seen = HashSet::new();
    pool(donors, model)
        .run(
            jobs(n),
            |r| {
                assert!(r.ok(), "{r:?}");
                assert!(seen.insert(r.job_id), "answered twice");
            },
            |_| {},
        )
        .unwrap();
    assert_eq!(seen.len(), n);
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n = if quick { 2_000 } else { 10_000 };
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("w.bin");
    std::fs::write(&weights, [1u8, 2, 3, 4]).unwrap();
    let model = PoolModel {
        config_json: "{}".to_owned(),
        weights,
        len: 4,
        sha256: Sha256::digest([1u8, 2, 3, 4]).into(),
    };
    println!("| scenario | result | reference (same run) | ratio | goal | met |");
    println!("|---|---|---|---|---|---|");

    let same = donors(&[5; 8]);
    let rate = throughput(&same, &model, n);
    row(
        &format!("8 donors x 5 ms jobs, {n} jobs"),
        format!("{rate:.0} jobs/s"),
        format!("capacity {:.0} jobs/s", same.capacity),
        rate / same.capacity,
        ">= 0.9 x capacity",
        rate >= 0.9 * same.capacity,
    );
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let on_tokio = tokio.block_on(async {
        async_throughput(
            donate_tokio::start_pool(async_pool(&same, &model)).unwrap(),
            n,
        )
        .await
    });
    row(
        &format!("the same on the async pool, tokio, {n} jobs"),
        format!("{on_tokio:.0} jobs/s"),
        format!("std pool {rate:.0} jobs/s"),
        on_tokio / rate,
        ">= 0.9 x capacity",
        on_tokio >= 0.9 * same.capacity,
    );
    let on_smol = smol::block_on(async_throughput(
        donate_smol::start_pool(async_pool(&same, &model), |task| smol::spawn(task).detach()),
        n,
    ));
    row(
        &format!("the same on the async pool, smol, {n} jobs"),
        format!("{on_smol:.0} jobs/s"),
        format!("std pool {rate:.0} jobs/s"),
        on_smol / rate,
        ">= 0.9 x capacity",
        on_smol >= 0.9 * same.capacity,
    );
    drop_all(same);

    // A second run against the same 8 donors, each with a store: nothing resent.
    let stores = tempfile::tempdir().unwrap();
    let stored = donors_with(&[5; 8], |i| {
        let store = ModelStore::open(stores.path().join(i.to_string()), 1 << 30).unwrap();
        NodeConfig::from(ServerConfig::default()).with_store(store)
    });
    let big = dir.path().join("big.bin");
    let weights: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&big, &weights).unwrap();
    let big = PoolModel {
        config_json: "{}".to_owned(),
        weights: big,
        len: weights.len() as u64,
        sha256: Sha256::digest(&weights).into(),
    };
    let sent = |what: &str| {
        let summary = pool(&stored, &big)
            .run(jobs(80), |r| assert!(r.ok(), "{what}: {r:?}"), |_| {})
            .unwrap();
        summary.weights_sent
    };
    let (first, second) = (sent("first run"), sent("second run"));
    row(
        "8 donors with a store, a 4 MiB model: weight bytes of a second run",
        format!("{second} bytes"),
        format!("first run {first} bytes"),
        second as f64 / first as f64,
        "<= 8 x 64 KiB",
        second <= 8 * 64 * 1024 && first >= 8 * weights.len() as u64,
    );
    drop_all(stored);

    let mixed = donors(&[20, 20, 20, 10, 10, 10, 5, 5]);
    let rate = throughput(&mixed, &model, n);
    row(
        &format!("8 donors of speed 1x, 2x, 4x (20, 10, 5 ms), {n} jobs"),
        format!("{rate:.0} jobs/s"),
        format!("capacity {:.0} jobs/s", mixed.capacity),
        rate / mixed.capacity,
        ">= 0.85 x capacity",
        rate >= 0.85 * mixed.capacity,
    );
    drop_all(mixed);

    // Two of eight killed at 30 %.
    let eight = donors(&[5; 8]);
    let live_capacity = eight.capacity * 6.0 / 8.0;
    let mut seen = HashSet::new();
    let killed_at: std::cell::Cell<Option<Instant>> = std::cell::Cell::new(None);
    let mut detected: Option<Duration> = None;
    let mut after = 0usize;
    let start = Instant::now();
    pool(&eight, &model)
        .run(
            jobs(n),
            |r| {
                assert!(r.ok(), "{r:?}");
                assert!(seen.insert(r.job_id), "answered twice");
                if killed_at.get().is_some() {
                    after += 1;
                }
                if seen.len() == n * 3 / 10 {
                    eight.proxies[0].kill();
                    eight.proxies[1].kill();
                    killed_at.set(Some(Instant::now()));
                }
            },
            |core| {
                if let (Some(at), None) = (killed_at.get(), detected) {
                    if core.live_donors() <= 6 {
                        detected = Some(at.elapsed());
                    }
                }
            },
        )
        .unwrap();
    let total = start.elapsed();
    let since_kill = killed_at.get().map_or(total, |at| at.elapsed());
    let rate_after = after as f64 / since_kill.as_secs_f64();
    let detected = detected.unwrap_or(Duration::MAX);
    row(
        &format!("kill 2 of 8 at 30 % of {n} jobs: throughput after"),
        format!(
            "{rate_after:.0} jobs/s; every job answered once ({} of {n})",
            seen.len()
        ),
        format!("live capacity {live_capacity:.0} jobs/s"),
        rate_after / live_capacity,
        ">= 0.9 x live capacity",
        rate_after >= 0.9 * live_capacity && seen.len() == n,
    );
    row(
        "kill 2 of 8: loss detected after the sockets closed",
        format!("{:.1} ms", detected.as_secs_f64() * 1e3),
        "-".to_owned(),
        1.0,
        "<= 250 ms",
        detected <= Duration::from_millis(250),
    );
    drop_all(eight);
    println!();
    println!("- simulated donors: in-process nodes (one worker, queue 64) whose jobs sleep a fixed time, each behind a TCP proxy; one pool (std unless named); capacity = sum over donors of 1 / job time");
}

fn drop_all(donors: Donors) {
    for p in &donors.proxies {
        p.kill();
    }
    for s in donors.servers {
        s.shutdown();
    }
}
