//! The per-job overhead of the worker-process executor against `Stub`,
//! measured in the same run. Prints figures; asserts nothing about time.
//!
//! ```sh
//! cargo test --release -p donate-exec -- --ignored --nocapture
//! ```
//!
//! (Without `--test`, so that cargo builds the `ngram_worker` example too.)

mod common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::{python_worker, rust_worker, table};
use donate_exec::{WorkerConfig, WorkerProcess};
use donate_proto::{Executor, JobContext, ServerConfig, Stub, Weights};

const INPUT: [i32; 3] = [104, 105, 33];
const MAX_TOKENS: i64 = 8;

/// Best of 3 rounds of `jobs` calls, per job.
fn per_job(jobs: u32, mut run: impl FnMut()) -> Duration {
    for _ in 0..jobs / 10 {
        run(); // warm up
    }
    (0..3)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..jobs {
                run();
            }
            started.elapsed() / jobs
        })
        .min()
        .expect("three rounds")
}

fn direct<E: Executor>(executor: &E, jobs: u32) -> Duration {
    let model = executor
        .mount("{}".into(), Weights::Memory(table(1)))
        .expect("mount");
    per_job(jobs, || {
        let out = executor
            .infer(&model, &INPUT, MAX_TOKENS, &JobContext::new("j1"))
            .expect("infer");
        assert_eq!(out.len(), INPUT.len() + MAX_TOKENS as usize);
    })
}

/// A node on loopback running `executor`, and a client connected to it.
fn node_and_client<E: Executor>(executor: E) -> (donate_std::Server, donate_std::Client) {
    let server = donate_std::serve(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        ServerConfig::default(),
        executor,
    )
    .unwrap();
    let client = donate_std::Client::connect(server.local_addr()).unwrap();
    (server, client)
}

fn over_loopback<E: Executor>(executor: E, jobs: u32) -> Duration {
    let (server, mut client) = node_and_client(executor);
    client.push_model("{}", &table(1), false).unwrap();
    let took = per_job(jobs, || {
        let out = client.infer(&INPUT, MAX_TOKENS).expect("infer").output_ids;
        assert_eq!(out.len(), INPUT.len() + MAX_TOKENS as usize);
    });
    drop(client);
    server.shutdown();
    took
}

fn workers(argv: Vec<String>) -> WorkerProcess {
    WorkerProcess::new(argv, WorkerConfig::default()).expect("start worker")
}

fn row(what: &str, stub: Duration, worker: Duration) {
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{what:<34} stub {:>8.2} µs/job   worker {:>8.2} µs/job   overhead {:>8.2} µs/job   ratio {:>7.1}x",
        us(stub),
        us(worker),
        us(worker) - us(stub),
        us(worker) / us(stub)
    );
}

#[test]
#[ignore = "a measurement: run with --release -- --ignored --nocapture"]
fn worker_overhead_against_stub() {
    let stub_direct = direct(&Stub::default(), 200_000);
    let rust_direct = direct(&workers(rust_worker()), 5_000);
    let python_direct = direct(&workers(python_worker()), 5_000);
    let stub_wire = over_loopback(Stub::default(), 5_000);
    let rust_wire = over_loopback(workers(rust_worker()), 5_000);
    let python_wire = over_loopback(workers(python_worker()), 5_000);
    println!("infer {INPUT:?}, max_tokens {MAX_TOKENS}, one worker, best of 3 rounds");
    row("Executor::infer, Rust worker", stub_direct, rust_direct);
    row("Executor::infer, Python worker", stub_direct, python_direct);
    row("loopback round trip, Rust worker", stub_wire, rust_wire);
    row("loopback round trip, Python worker", stub_wire, python_wire);
}

/// Best of 3 pushes of `weights` to a node running `executor`, in MB/s.
fn upload_rate<E: Executor>(executor: E, weights: &[u8]) -> f64 {
    let (server, mut client) = node_and_client(executor);
    let best = (0..3)
        .map(|_| {
            let started = Instant::now();
            let status = client.push_model("{}", weights, false).expect("push");
            assert!(status.ok, "{}", status.message);
            started.elapsed()
        })
        .min()
        .expect("three rounds");
    drop(client);
    server.shutdown();
    weights.len() as f64 / best.as_secs_f64() / 1e6
}

#[test]
#[ignore = "a measurement: run with --release -- --ignored --nocapture"]
fn upload_into_the_worker_file_against_stub() {
    // A worker that accepts every request without reading the file, so the
    // figure is the node's: chunks decoded, then written to the file as they arrive.
    let accept_all = [
        "python3",
        "-c",
        "import sys\nfor line in sys.stdin: print('{\"ok\": true}', flush=True)",
    ]
    .map(String::from)
    .to_vec();
    let weights = vec![0x5a; 256 * 1024 * 1024];
    let stub = upload_rate(Stub::default(), &weights);
    let spooled = upload_rate(workers(accept_all), &weights);
    println!(
        "push 256 MiB: stub (in memory) {stub:.0} MB/s, cmd: worker (spooled to its file) {spooled:.0} MB/s, ratio {:.2}",
        spooled / stub
    );
}
