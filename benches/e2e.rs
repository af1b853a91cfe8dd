//! Loopback benchmark of issue 6: every scenario against each adapter's node
//! (`donate serve --runtime std|smol|tokio`, a separate process) and against a
//! raw-TCP baseline measured in the same run, printed as one Markdown table.
//!
//! ```text
//! cargo bench --bench e2e                          # full run (a few minutes)
//! cargo bench --bench e2e -- --quick               # seconds-long smoke (CI)
//! cargo bench --bench e2e -- --scenario upload     # one scenario (repeatable)
//! cargo bench --bench e2e -- --runtime tokio       # one adapter (repeatable)
//! ```
//!
//! Scenarios: `upload`, `memory`, `round-trips`, `many-clients`, `pipelining`,
//! `idle`, `secure`, `store`, `store-memory` (needs `--features candle`), `metrics`. Linux only (RSS comes from `/proc/<pid>/status`). Every wait is
//! bounded; a scenario that fails or times out is reported as a row and makes
//! the run exit non-zero. Missing a goal does not: goals are what the table
//! reports on.

use std::error::Error;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use donate_proto::message::{encode_weights_chunk, Hello, Infer, InferResult, ModelBegin};
use donate_proto::{ClientConfig, Keypair, Message, NodeTrust, SecureClientConfig};
use donate_std::Client;
use sha2::{Digest, Sha256};

type Result<T, E = Box<dyn Error + Send + Sync>> = std::result::Result<T, E>;

const BIN: &str = env!("CARGO_BIN_EXE_donate");

/// The `donate` binary whose node is measured: this build's, or another
/// build's (`DONATE_E2E_SERVE=PATH`), to compare two versions in one run.
fn serve_bin() -> String {
    std::env::var("DONATE_E2E_SERVE").unwrap_or_else(|_| BIN.to_owned())
}
const RUNTIMES: [&str; 3] = ["std", "smol", "tokio"];
const MIB: u64 = 1024 * 1024;
/// Read/write timeout of every raw socket.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Time for the node to take in what was sent before its RSS is read.
const SETTLE: Duration = Duration::from_secs(1);

/// A small infer job, and the stub's answer to it (8 inputs + 8 generated tokens).
const INPUT_IDS: [i32; 8] = [1, 2, 3, 4, 5, 6, 7, 8];
const MAX_TOKENS: i64 = 8;

/// How big each scenario runs: the full run or `--quick`.
struct Sizes {
    upload_len: u64,
    upload_reps: usize,
    round_trips: usize,
    warm_up: usize,
    /// Blocks the round-trip scenarios alternate raw and node measurements in.
    blocks: usize,
    clients: usize,
    jobs_per_client: usize,
    pipeline_sequential: usize,
    pipeline_rounds: usize,
    idle_async: usize,
    idle_std: usize,
    silent: usize,
}

const FULL: Sizes = Sizes {
    upload_len: 1024 * MIB,
    upload_reps: 3,
    round_trips: 20_000,
    warm_up: 500,
    blocks: 4,
    clients: 64,
    jobs_per_client: 1_000,
    pipeline_sequential: 5_000,
    pipeline_rounds: 5,
    idle_async: 10_000,
    idle_std: 2_000,
    silent: 1_000,
};

const QUICK: Sizes = Sizes {
    upload_len: 64 * MIB,
    upload_reps: 1,
    round_trips: 2_000,
    warm_up: 100,
    blocks: 1,
    clients: 64,
    jobs_per_client: 50,
    pipeline_sequential: 1_000,
    pipeline_rounds: 1,
    idle_async: 1_000,
    idle_std: 500,
    silent: 100,
};

/// Jobs in flight on one connection in the pipelining scenario.
const PIPELINE_DEPTH: usize = 10_000;

/// A scenario: its name on the command line and the function that runs it.
type Scenario = (&'static str, fn(&Bench, &mut Table) -> Result<()>);

const SCENARIOS: [Scenario; 10] = [
    ("upload", upload),
    ("memory", memory),
    ("round-trips", round_trips),
    ("many-clients", many_clients),
    ("pipelining", pipelining),
    ("idle", idle_connections),
    ("secure", secure),
    ("store", store),
    ("metrics", metrics),
    ("store-memory", store_memory),
];

/// What this run does.
struct Bench {
    size: &'static Sizes,
    quick: bool,
    scenarios: Vec<String>,
    runtimes: Vec<&'static str>,
    /// Open files allowed to this process and to the nodes it starts.
    nofile: u64,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--child-push") => return child_push(&args[1..]),
        Some("--child-jobs") => return child_jobs(&args[1..]),
        _ => {}
    }
    let bench = match Bench::from_args(&args) {
        Ok(bench) => bench,
        Err(e) => {
            eprintln!("e2e: {e}\nusage: cargo bench --bench e2e -- [--quick] [--scenario NAME]... [--runtime std|smol|tokio]...\nscenarios: {}",
                SCENARIOS.map(|(name, _)| name).join(", "));
            return ExitCode::FAILURE;
        }
    };
    let mut table = Table::default();
    table.note(format!(
        "{} run; RLIMIT_NOFILE {}; every ratio compares figures measured in this run",
        if bench.quick { "--quick" } else { "full" },
        bench.nofile
    ));
    table.note(format!("load average at start: {}", load_average()));
    let started = Instant::now();
    for (name, run) in SCENARIOS {
        if !bench.scenarios.is_empty() && !bench.scenarios.iter().any(|s| s == name) {
            continue;
        }
        eprintln!("e2e: {name}…");
        let scenario_start = Instant::now();
        if let Err(e) = run(&bench, &mut table) {
            table.failed(name, &e.to_string());
        }
        eprintln!(
            "e2e: {name} done in {:.1} s",
            scenario_start.elapsed().as_secs_f64()
        );
    }
    table.note(format!(
        "total time {:.1} s; load average at end: {} (the machine is shared: compare ratios, not absolute figures)",
        started.elapsed().as_secs_f64(),
        load_average()
    ));
    table.print();
    if table.failures > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

impl Bench {
    fn from_args(args: &[String]) -> Result<Bench> {
        let mut bench = Bench {
            size: &FULL,
            quick: false,
            scenarios: Vec::new(),
            runtimes: Vec::new(),
            nofile: raise_nofile_limit()?,
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--bench" => {} // passed by `cargo bench`
                "--quick" => {
                    bench.quick = true;
                    bench.size = &QUICK;
                }
                "--scenario" => {
                    let name = args.next().ok_or("--scenario needs a name")?;
                    if !SCENARIOS.iter().any(|(s, _)| s == name) {
                        return Err(format!("unknown scenario {name:?}").into());
                    }
                    bench.scenarios.push(name.clone());
                }
                "--runtime" => {
                    let name = args.next().ok_or("--runtime needs a name")?;
                    let runtime = RUNTIMES
                        .into_iter()
                        .find(|r| r == name)
                        .ok_or_else(|| format!("unknown runtime {name:?}"))?;
                    bench.runtimes.push(runtime);
                }
                other => return Err(format!("unknown argument {other:?}").into()),
            }
        }
        if bench.runtimes.is_empty() {
            bench.runtimes = RUNTIMES.to_vec();
        }
        Ok(bench)
    }
}

// ---------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------

/// Upload throughput, with and without `weights_sha256`, beside the raw-TCP copy
/// of the same wire bytes and single-core SHA-256, each measured right before
/// the upload it is compared with (the machine is shared; load drifts).
fn upload(bench: &Bench, table: &mut Table) -> Result<()> {
    let size = bench.size;
    let len = size.upload_len;
    let sha = donate_std::sha256_of_reader(io::repeat(7).take(len))?;
    for &runtime in &bench.runtimes {
        let node = Node::start(runtime, &[])?;
        let (mut sha_rates, mut raw, mut plain, mut hashed) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..size.upload_reps {
            sha_rates.push(sha256_rate()?);
            raw.push(raw_upload(len)?);
            plain.push(node.push(len, None)?);
            hashed.push(node.push(len, Some(sha))?);
        }
        node.stop()?;
        let sha_rate = median(sha_rates);
        let [raw, plain, hashed] = [raw, plain, hashed].map(Transfer::median);
        table
            .row(
                "upload",
                format!("{runtime}: {} in 1 MiB chunks", bytes(len)),
            )
            .figure(plain.summary())
            .reference(format!("raw TCP {}", raw.summary()), plain.rate / raw.rate)
            .goal(">= 1000 MB/s", plain.rate >= 1e9);
        table
            .row("upload", format!("{runtime}: same, with weights_sha256"))
            .figure(hashed.summary())
            .reference(
                format!("SHA-256 {}", mb_s(sha_rate)),
                hashed.rate / sha_rate,
            )
            .goal(">= 0.75 x SHA-256", hashed.rate >= 0.75 * sha_rate);
    }
    table.note(format!("upload: payload MB/s (10^6 bytes/s) from connect to model_status, median of {} runs; the client reads from io::repeat; the hash for weights_sha256 is computed before timing. Raw TCP: a client writes the same number of encoded 1 MiB chunk frames to a server that reads and discards them, counted as payload. SHA-256: sha2 over a 64 MiB buffer on one core. Both are measured before each upload. CPU s/GiB: CPU time (user + system) the server process and the client thread used per GiB of payload, which the machine's load does not inflate", size.upload_reps));
    Ok(())
}

/// Server and client peak RSS during an upload, and what a silent 64 MiB frame
/// header or a 6 GB `model_begin` costs the server per connection.
fn memory(bench: &Bench, table: &mut Table) -> Result<()> {
    let len = bench.size.upload_len;
    let n = bench.size.silent;
    let max_conns = (n + 100).to_string();
    let patient = [
        "--max-connections",
        &max_conns,
        "--handshake-timeout",
        "600",
        "--stall-timeout",
        "600",
    ];
    for &runtime in &bench.runtimes {
        let node = Node::start(runtime, &[])?;
        let client_hwm = child_push_run(node.addr, len)?;
        let server_hwm = node.status_bytes("VmHWM")?;
        node.stop()?;
        let limit = 1.1 * len as f64 + (64 * MIB) as f64;
        table
            .row(
                "memory",
                format!("{runtime}: server peak RSS, {} upload", bytes(len)),
            )
            .figure(bytes(server_hwm))
            .reference(
                format!("model {}", bytes(len)),
                server_hwm as f64 / len as f64,
            )
            .goal("<= 1.1 x model + 64 MiB", (server_hwm as f64) <= limit);
        table
            .row(
                "memory",
                format!("{runtime}: client peak RSS (std client, subprocess)"),
            )
            .figure(bytes(client_hwm))
            .reference(
                format!("model {}", bytes(len)),
                client_hwm as f64 / len as f64,
            )
            .goal("<= 64 MiB", client_hwm <= 64 * MIB);

        let header = (64 * MIB as u32).to_le_bytes().to_vec();
        let begin = frame(&Message::ModelBegin(ModelBegin {
            config_json: "{}".to_owned(),
            weights_len: 6_000_000_000,
            ..ModelBegin::default()
        }));
        for (what, bytes_sent) in [("64 MiB frame header", header), ("6 GB model_begin", begin)] {
            let node = Node::start(runtime, &patient)?;
            let before = node.status_bytes("VmRSS")?;
            let conns = open_connections(node.addr, n, &bytes_sent)?;
            thread::sleep(SETTLE);
            let after = node.status_bytes("VmRSS")?;
            drop(conns);
            node.stop()?;
            let per = after.saturating_sub(before) as f64 / n as f64;
            table
                .row("memory", format!("{runtime}: {what} then silence, x{n}"))
                .figure(format!("{} per connection", kib(per)))
                .goal("<= 1 MiB", per <= MIB as f64);
        }
    }
    table.note("memory: peak RSS is VmHWM of the process; per-connection cost is the server's VmRSS delta from before the connections to 1 s after the last one, divided (connections send the client hello, then the bytes named, then nothing; the timeouts are raised so none is closed)");
    Ok(())
}

/// One client, sequential small jobs, beside a raw-TCP ping-pong of frames of the same sizes.
fn round_trips(bench: &Bench, table: &mut Table) -> Result<()> {
    let size = bench.size;
    for &runtime in &bench.runtimes {
        let node = Node::start(runtime, &[])?;
        let (raw, stats) = paired(size.blocks, 1, size.round_trips, size.warm_up, &node)?;
        node.stop()?;
        let rate = stats.rate() / raw.rate();
        let p99 = stats.p(0.99).as_secs_f64() / raw.p(0.99).as_secs_f64();
        table
            .row(
                "round trips",
                format!("{runtime}: 1 client, sequential infer"),
            )
            .figure(stats.summary())
            .reference(raw.reference(), rate)
            .goal(
                format!(">= 0.85 x raw; p99 <= 1.5 x raw (is {p99:.2} x)"),
                rate >= 0.85 && p99 <= 1.5,
            );
    }
    let (request, answer) = job_frame_sizes();
    table.note(format!("round trips: {} timed jobs after {} warm-up, in {} blocks alternating with the raw ping-pong; frames of {request} B (infer) and {answer} B (infer_result) both ways, raw included. CPU µs/job: CPU time of the server process (raw: the echo threads) and of the client threads per job, which the machine's load does not inflate", size.round_trips, size.warm_up, size.blocks));
    Ok(())
}

/// Many clients with sequential jobs on a node with two workers, beside a raw echo.
fn many_clients(bench: &Bench, table: &mut Table) -> Result<()> {
    let size = bench.size;
    let (clients, jobs) = (size.clients, size.jobs_per_client);
    let warm_up = size.warm_up / 10;
    for &runtime in &bench.runtimes {
        let node = Node::start(runtime, &["--workers", "2"])?;
        let (raw, stats) = paired(size.blocks, clients, jobs, warm_up, &node)?;
        node.stop()?;
        let ratio = stats.rate() / raw.rate();
        table
            .row(
                "many clients",
                format!("{runtime}: {clients} clients, --workers 2"),
            )
            .figure(stats.summary())
            .reference(raw.reference(), ratio)
            .goal(">= 0.70 x raw", ratio >= 0.70);
    }
    table.note(format!("many clients: one thread per client, {jobs} timed jobs each after {warm_up} warm-up, all started together, in {} blocks alternating with a raw ping-pong over as many connections; jobs/s counts every client's jobs over the wall time", size.blocks));
    Ok(())
}

/// `blocks` alternating runs of the raw ping-pong and of the node, `jobs` per
/// client in all; returns (raw, node).
fn paired(
    blocks: usize,
    clients: usize,
    jobs: usize,
    warm_up: usize,
    node: &Node,
) -> Result<(Stats, Stats)> {
    let per_block = jobs.div_ceil(blocks);
    let (mut raw, mut ours) = (Vec::new(), Vec::new());
    for _ in 0..blocks {
        raw.push(raw_ping_pong(clients, per_block, warm_up)?);
        ours.push(node_jobs(
            node.addr,
            Some(node.child.id()),
            clients,
            per_block,
            warm_up,
        )?);
    }
    Ok((Stats::combine(raw), Stats::combine(ours)))
}

/// One connection with 10,000 jobs in flight, against the sequential rate on the same node.
fn pipelining(bench: &Bench, table: &mut Table) -> Result<()> {
    let size = bench.size;
    let queue = PIPELINE_DEPTH.to_string();
    for &runtime in &bench.runtimes {
        let node = Node::start(runtime, &["--queue", &queue])?;
        let sequential = node_jobs(
            node.addr,
            Some(node.child.id()),
            1,
            size.pipeline_sequential,
            size.warm_up,
        )?;
        let pipelined = node_pipelined(node.addr, size.pipeline_rounds)?;
        node.stop()?;
        let ratio = pipelined / sequential.rate();
        table
            .row(
                "pipelining",
                format!("{runtime}: {PIPELINE_DEPTH} jobs in flight"),
            )
            .figure(format!("{pipelined:.0} jobs/s"))
            .reference(format!("sequential {:.0} jobs/s", sequential.rate()), ratio)
            .goal(">= 10 x sequential", ratio >= 10.0);
    }
    table.note(format!("pipelining: --queue {PIPELINE_DEPTH}; {} round(s) of {PIPELINE_DEPTH} jobs sent at once, then every answer awaited; the sequential rate is measured on the same node just before", size.pipeline_rounds));
    Ok(())
}

/// Server RSS per open idle connection (hello exchanged, then nothing).
fn idle_connections(bench: &Bench, table: &mut Table) -> Result<()> {
    // This process holds one descriptor per connection, the node one more; keep some spare.
    let budget = (bench.nofile as usize).saturating_sub(200);
    for &runtime in &bench.runtimes {
        let wanted = if runtime == "std" {
            bench.size.idle_std
        } else {
            bench.size.idle_async
        };
        let n = wanted.min(budget);
        if n < wanted {
            table.note(format!(
                "idle: {runtime} measured with {n} connections, not {wanted}: RLIMIT_NOFILE hard limit is {}",
                bench.nofile
            ));
        }
        let max_conns = (n + 100).to_string();
        let node = Node::start(runtime, &["--max-connections", &max_conns])?;
        // Let the runtime start its threads and allocator arenas before the baseline.
        drop(open_connections(node.addr, 10, &[])?);
        thread::sleep(Duration::from_millis(200));
        let before = node.status_bytes("VmRSS")?;
        let conns = open_connections(node.addr, n, &[])?;
        thread::sleep(SETTLE);
        let after = node.status_bytes("VmRSS")?;
        drop(conns);
        node.stop()?;
        let per = after.saturating_sub(before) as f64 / n as f64;
        let goal = if runtime == "std" {
            table
                .row(
                    "idle",
                    format!("{runtime}: {n} idle connections (reference)"),
                )
                .figure(format!("{} per connection", kib(per)));
            continue;
        } else {
            per <= 4096.0
        };
        table
            .row("idle", format!("{runtime}: {n} idle connections"))
            .figure(format!("{} per connection", kib(per)))
            .reference("Go node ~5.9 KiB", per / (5.9 * 1024.0))
            .goal("<= 4 KiB", goal);
    }
    table.note("idle: server VmRSS delta over the connections, divided; std runs a reader and a writer thread per connection, so it is measured with fewer, for reference");
    Ok(())
}

/// Secure mode's cost, each figure beside the plain one in the same run: upload
/// MiB/s, 1-client round trips, and handshakes per second.
fn secure(bench: &Bench, table: &mut Table) -> Result<()> {
    let size = bench.size;
    let len = size.upload_len.min(256 * MIB);
    let trips = size.round_trips / 2;
    let handshakes = if bench.quick { 50 } else { 300 };
    for &runtime in &bench.runtimes {
        let plain = Node::start(runtime, &[])?;
        let secure = Node::start_secure(runtime)?;
        let (mut up_plain, mut up_secure) = (Vec::new(), Vec::new());
        let (mut rt_plain, mut rt_secure) = (Vec::new(), Vec::new());
        let (mut hs_plain, mut hs_secure) = (Vec::new(), Vec::new());
        // Alternated, so that drifting load falls on both alike.
        for _ in 0..size.upload_reps.max(2) {
            up_plain.push(plain.push(len, None)?);
            up_secure.push(secure.push(len, None)?);
            rt_plain.push(sequential_rate(&plain, trips, size.warm_up)?);
            rt_secure.push(sequential_rate(&secure, trips, size.warm_up)?);
            hs_plain.push(connect_rate(&plain, handshakes)?);
            hs_secure.push(connect_rate(&secure, handshakes)?);
        }
        plain.stop()?;
        secure.stop()?;
        let [up_plain, up_secure] = [up_plain, up_secure].map(Transfer::median);
        let [rt_plain, rt_secure, hs_plain, hs_secure] =
            [rt_plain, rt_secure, hs_plain, hs_secure].map(median);
        let mib_s = |rate: f64| format!("{:.0} MiB/s", rate / MIB as f64);
        table
            .row(
                "secure",
                format!("{runtime}: encrypted upload, {}", bytes(len)),
            )
            .figure(format!(
                "{}; {}",
                mib_s(up_secure.rate),
                up_secure.summary()
            ))
            .reference(
                format!("plaintext {}", mib_s(up_plain.rate)),
                up_secure.rate / up_plain.rate,
            )
            .goal(">= 0.5 x plaintext", up_secure.rate >= 0.5 * up_plain.rate);
        table
            .row(
                "secure",
                format!("{runtime}: encrypted 1-client round trips"),
            )
            .figure(format!("{rt_secure:.0} jobs/s"))
            .reference(
                format!("plaintext {rt_plain:.0} jobs/s"),
                rt_secure / rt_plain,
            )
            .goal(">= 0.8 x plaintext", rt_secure >= 0.8 * rt_plain);
        table
            .row(
                "secure",
                format!("{runtime}: handshakes (connect + Noise XX + hello)"),
            )
            .figure(format!("{hs_secure:.0} connections/s"))
            .reference(
                format!("plaintext connect + hello {hs_plain:.0}/s"),
                hs_secure / hs_plain,
            )
            .goal("reported", true);
    }
    table.note(format!("secure: a plain and a secure node of the same runtime, measured alternately ({} rounds, medians). Upload: {} from io::repeat with the std client, connect to model_status. Round trips: one std client, {trips} sequential infer jobs after {} warm-up. Handshakes: sequential connects by the std client until the node's hello is read (secure: the whole Noise XX handshake with a pinned key, the last message flushed), {handshakes} per round", size.upload_reps.max(2), bytes(len), size.warm_up));
    Ok(())
}

/// The model store (`donate serve --store`): upload into it beside raw TCP
/// and a node without a store, what a second push sends (also after a
/// restart), the first answer on a model another connection has mounted, and
/// a broken upload resumed.
fn store(bench: &Bench, table: &mut Table) -> Result<()> {
    let size = bench.size;
    let len = size.upload_len;
    for &runtime in &bench.runtimes {
        let dir =
            std::env::temp_dir().join(format!("donate-e2e-store-{}-{runtime}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store_args = [
            "--store",
            dir.to_str().ok_or("temp path")?,
            "--store-max",
            "1TiB",
        ];
        let node = Node::start(runtime, &store_args)?;
        let plain = Node::start(runtime, &[])?;
        let (mut raw, mut without, mut into_store) = (Vec::new(), Vec::new(), Vec::new());
        for rep in 0..size.upload_reps.max(2) {
            // A new model each time, so each one is written to the store.
            let fill = rep as u8 + 1;
            let sha = donate_std::sha256_of_reader(io::repeat(fill).take(len))?;
            raw.push(raw_upload(len)?);
            without.push(plain.push_filled(len, fill, Some(sha))?);
            into_store.push(node.push_filled(len, fill, Some(sha))?);
        }
        plain.stop()?;
        let [raw, without, into_store] = [raw, without, into_store].map(Transfer::median);
        table
            .row(
                "store",
                format!("{runtime}: upload into the store, {}", bytes(len)),
            )
            .figure(into_store.summary())
            .reference(
                format!(
                    "raw TCP {}; no store {}",
                    mb_s(raw.rate),
                    mb_s(without.rate)
                ),
                into_store.rate / raw.rate,
            )
            .goal(">= 1000 MB/s", into_store.rate >= 1e9);

        // The last model again: nothing but the query and the use.
        let fill = size.upload_reps.max(2) as u8;
        let sha = donate_std::sha256_of_reader(io::repeat(fill).take(len))?;
        let again = node.push_stored_counted(len, fill, sha)?;
        node.stop()?;
        let node = Node::start(runtime, &store_args)?;
        let restarted = node.push_stored_counted(len, fill, sha)?;
        table
            .row("store", format!("{runtime}: the same model pushed again"))
            .figure(format!(
                "weights sent {} (wire {}); after a restart {} (wire {})",
                bytes(again.weights),
                bytes(again.wire),
                bytes(restarted.weights),
                bytes(restarted.wire)
            ))
            .reference(
                format!("model {}", bytes(len)),
                again.wire as f64 / len as f64,
            )
            .goal(
                "<= 64 KiB, also after a restart",
                again.wire.max(restarted.wire) <= 64 * 1024,
            );

        // A model held mounted by one connection; the first answer on another.
        let mut holder = node.client()?;
        holder.push_stored("{}", Filled::new(fill, len), len, sha, |_| {})?;
        let mut latencies = Vec::new();
        for _ in 0..20 {
            let start = Instant::now();
            let mut client = node.client()?;
            client.push_stored("{}", Filled::new(fill, len), len, sha, |_| {})?;
            client.infer(&INPUT_IDS, MAX_TOKENS)?;
            latencies.push(start.elapsed());
        }
        drop(holder);
        latencies.sort();
        let first = latencies[latencies.len() / 2];
        table
            .row(
                "store",
                format!("{runtime}: first answer on a model another connection mounted"),
            )
            .figure(format!(
                "median {:.1} ms (connect, query, use, infer)",
                first.as_secs_f64() * 1e3
            ))
            .reference("20 connections", 1.0)
            .goal("<= 50 ms", first <= Duration::from_millis(50));

        // A broken upload: half sent, the connection dropped, then resumed.
        let fill = 250;
        let sha = donate_std::sha256_of_reader(io::repeat(fill).take(len))?;
        let broken = node.break_upload(len, fill, sha)?;
        let resumed = node.push_stored_counted(len, fill, sha)?;
        let total = broken + resumed.wire;
        let limit = len * 4 / 3 + 2 * MIB;
        table
            .row(
                "store",
                format!("{runtime}: a broken upload resumed, {}", bytes(len)),
            )
            .figure(format!(
                "wire {} + {} = {} (resumed at byte {})",
                bytes(broken),
                bytes(resumed.wire),
                bytes(total),
                resumed.resumed_from
            ))
            .reference(
                format!("model x 4/3 {}", bytes(len * 4 / 3)),
                total as f64 / (len * 4 / 3) as f64,
            )
            .goal(
                "<= model x 4/3 + one chunk",
                total <= limit && resumed.resumed_from > 0,
            );
        node.stop()?;
        let _ = std::fs::remove_dir_all(&dir);
    }
    table.note(format!("store: `donate serve --store DIR`. Upload: a new {} model per run (so each one is written to the store), payload MB/s from connect to model_status with weights_sha256, median of {} runs, beside raw TCP and a node without a store measured in the same rounds. Pushed again: bytes the client wrote on the socket (query, use) for a model the node holds, before and after a restart of the node on the same store. First answer: a fresh connection's connect, model_query, model_use and one infer while another connection holds the model mounted, median of 20. Resume: half the model sent and the connection closed, then push_stored; all bytes both clients wrote", bytes(len), size.upload_reps.max(2)));
    Ok(())
}

/// Two connections on one ~240 MiB F32 llama with the candle executor and a
/// store: the node's RSS, against the model's size. Needs a `donate` built
/// with the `candle` feature (`cargo bench --bench e2e --features candle`);
/// without it the row says so.
fn store_memory(bench: &Bench, table: &mut Table) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("donate-e2e-store-memory-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (config_json, weights) = write_llama(&dir.join("model.safetensors"))?;
    let len = std::fs::metadata(&weights)?.len();
    let sha = donate_std::sha256_of_reader(std::fs::File::open(&weights)?)?;
    let store = dir.join("store");
    for &runtime in &bench.runtimes {
        let args = [
            "--executor",
            "candle",
            "--store",
            store.to_str().ok_or("temp path")?,
        ];
        let node = match Node::start(runtime, &args) {
            Ok(node) => node,
            Err(e) => {
                table
                    .row(
                        "store-memory",
                        format!("{runtime}: two connections on one model"),
                    )
                    .figure(format!("not measured: {e}"))
                    .goal("needs --features candle", true);
                continue;
            }
        };
        let push = |client: &mut Client| -> Result<donate_host::Pushed> {
            let file = std::fs::File::open(&weights)?;
            Ok(client.push_stored(&config_json, file, len, sha, |_| {})?)
        };
        let mut first = node.client()?;
        push(&mut first)?;
        thread::sleep(SETTLE);
        let one = node.status_bytes("VmRSS")?;
        let mut second = node.client()?;
        let pushed = push(&mut second)?;
        second.infer(&[1, 2, 3], 2)?;
        first.infer(&[1, 2, 3], 2)?;
        thread::sleep(SETTLE);
        let two = node.status_bytes("VmRSS")?;
        drop((first, second));
        node.stop()?;
        let limit = 1.2 * len as f64 + (64 * MIB) as f64;
        table
            .row(
                "store-memory",
                format!(
                    "{runtime}: candle node RSS, two connections on one {} model",
                    bytes(len)
                ),
            )
            .figure(format!(
                "{} ({} with one connection; the second mounted from the store, reused: {})",
                bytes(two),
                bytes(one),
                pushed.reused
            ))
            .reference(format!("model {}", bytes(len)), two as f64 / len as f64)
            .goal("<= 1.2 x model + 64 MiB", (two as f64) <= limit);
    }
    let _ = std::fs::remove_dir_all(&dir);
    table.note("store-memory: a random F32 llama (hidden 1024, 3 layers, vocab 12000) written as safetensors, pushed by one connection into `donate serve --executor candle --store DIR`, then used by a second; VmRSS of the node with both holding it mounted and each having run a job");
    Ok(())
}

/// Writes a random-ish F32 llama as safetensors; returns its config and path.
fn write_llama(path: &std::path::Path) -> Result<(String, std::path::PathBuf)> {
    let (h, i, v, layers, heads) = (1024usize, 2816usize, 12_000usize, 3usize, 16usize);
    let config = format!(
        r#"{{"architectures":["LlamaForCausalLM"],"model_type":"llama","hidden_size":{h},"intermediate_size":{i},"num_hidden_layers":{layers},"num_attention_heads":{heads},"num_key_value_heads":{heads},"vocab_size":{v},"max_position_embeddings":256,"rms_norm_eps":1e-5,"rope_theta":10000.0,"tie_word_embeddings":false,"torch_dtype":"float32"}}"#
    );
    let mut tensors: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![v, h]),
        ("model.norm.weight".into(), vec![h]),
        ("lm_head.weight".into(), vec![v, h]),
    ];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (name, shape) in [
            ("self_attn.q_proj.weight", vec![h, h]),
            ("self_attn.k_proj.weight", vec![h, h]),
            ("self_attn.v_proj.weight", vec![h, h]),
            ("self_attn.o_proj.weight", vec![h, h]),
            ("mlp.gate_proj.weight", vec![i, h]),
            ("mlp.up_proj.weight", vec![i, h]),
            ("mlp.down_proj.weight", vec![h, i]),
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
        ] {
            tensors.push((format!("{p}.{name}"), shape));
        }
    }
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in &tensors {
        let bytes = shape.iter().product::<usize>() * 4;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut header = serde_json::to_vec(&header)?;
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let mut file = io::BufWriter::new(std::fs::File::create(path)?);
    file.write_all(&(header.len() as u64).to_le_bytes())?;
    file.write_all(&header)?;
    // Small values that vary, so no page is all zeros.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut block = vec![0u8; 1 << 20];
    let mut left = offset;
    while left > 0 {
        for word in block.chunks_exact_mut(4) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let x = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02;
            word.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(block.len());
        file.write_all(&block[..n])?;
        left -= n;
    }
    file.flush()?;
    Ok((config, path.to_owned()))
}

/// What a store-aware push wrote on the socket.
struct Counted {
    /// Weight bytes (raw).
    weights: u64,
    /// Every byte written, frames and base64 included.
    wire: u64,
    resumed_from: u64,
}

/// A stream that counts the bytes written to it.
struct CountingStream {
    inner: TcpStream,
    written: Arc<std::sync::atomic::AtomicU64>,
}

impl Read for CountingStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl Write for CountingStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// `len` bytes of `fill`, seekable (the bytes of `io::repeat(fill).take(len)`).
struct Filled {
    fill: u8,
    len: u64,
    pos: u64,
}

impl Filled {
    fn new(fill: u8, len: u64) -> Filled {
        Filled { fill, len, pos: 0 }
    }
}

impl Read for Filled {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (self.len - self.pos).min(buf.len() as u64) as usize;
        buf[..n].fill(self.fill);
        self.pos += n as u64;
        Ok(n)
    }
}

impl io::Seek for Filled {
    fn seek(&mut self, to: io::SeekFrom) -> io::Result<u64> {
        self.pos = match to {
            io::SeekFrom::Start(n) => n.min(self.len),
            _ => return Err(io::Error::other("only SeekFrom::Start")),
        };
        Ok(self.pos)
    }
}

/// Reads one frame's body.
fn read_frame(conn: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut header = [0; 4];
    conn.read_exact(&mut header)?;
    let mut body = vec![0; u32::from_le_bytes(header) as usize];
    conn.read_exact(&mut body)?;
    Ok(body)
}

/// One-client round trips on a node counting into `--metrics` beside the
/// same node without: what counting costs on the hot path.
fn metrics(bench: &Bench, table: &mut Table) -> Result<()> {
    let size = bench.size;
    let trips = size.round_trips / 2;
    let rounds = if bench.quick { 3 } else { 7 };
    for &runtime in &bench.runtimes {
        let off = Node::start(runtime, &[])?;
        let on = Node::start(runtime, &["--metrics", "127.0.0.1:0"])?;
        let (mut rt_off, mut rt_on) = (Vec::new(), Vec::new());
        // Alternated, so that drifting load falls on both alike.
        for _ in 0..rounds {
            rt_off.push(sequential_rate(&off, trips, size.warm_up)?);
            rt_on.push(sequential_rate(&on, trips, size.warm_up)?);
        }
        off.stop()?;
        on.stop()?;
        let [rt_off, rt_on] = [rt_off, rt_on].map(median);
        table
            .row(
                "metrics",
                format!("{runtime}: 1-client round trips, --metrics on"),
            )
            .figure(format!("{rt_on:.0} jobs/s"))
            .reference(format!("metrics off {rt_off:.0} jobs/s"), rt_on / rt_off)
            .goal(">= 0.97 x metrics off", rt_on >= 0.97 * rt_off);
    }
    table.note(format!("metrics: a node with --metrics 127.0.0.1:0 (every job, connection and mount counted; nothing scrapes) and one without, measured alternately ({rounds} rounds, medians of one std client's {trips} sequential infer jobs after {} warm-up)", size.warm_up));
    Ok(())
}

/// Sequential infer jobs per second on one client of `node`.
fn sequential_rate(node: &Node, jobs: usize, warm_up: usize) -> Result<f64> {
    let mut client = node.client()?;
    client.push_model("{}", &[1, 2, 3, 4, 5, 6, 7, 8], false)?;
    within(job_limit(jobs + warm_up), "round trips", move || {
        for _ in 0..warm_up {
            client.infer(&INPUT_IDS, MAX_TOKENS)?;
        }
        let start = Instant::now();
        for _ in 0..jobs {
            client.infer(&INPUT_IDS, MAX_TOKENS)?;
        }
        Ok(jobs as f64 / start.elapsed().as_secs_f64())
    })
}

/// Sequential connections (hello read, handshake done) per second to `node`.
fn connect_rate(node: &Node, n: usize) -> Result<f64> {
    let start = Instant::now();
    for _ in 0..n {
        drop(node.client()?);
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------------------
// Node side: the `donate serve` process and clients of it
// ---------------------------------------------------------------------------

/// A `donate serve` process and the address it printed.
struct Node {
    child: Child,
    addr: SocketAddr,
    runtime: String,
    /// A secure node's client settings (`Node::start_secure`).
    secure: Option<SecureClientConfig>,
}

impl Node {
    /// Starts `donate serve --addr 127.0.0.1:0 --runtime RUNTIME ARGS` and reads its address.
    fn start(runtime: &str, args: &[&str]) -> Result<Node> {
        let mut child = Command::new(serve_bin())
            .args(["serve", "--addr", "127.0.0.1:0", "--runtime", runtime])
            .args(args)
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut node = Node {
            child,
            addr: ([127, 0, 0, 1], 0).into(),
            runtime: runtime.to_owned(),
            secure: None,
        };
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| format!("donate serve --runtime {runtime} printed no address"))?;
        node.addr = line
            .trim_end()
            .strip_prefix("listening on ")
            .ok_or_else(|| format!("unexpected first line {line:?}"))?
            .parse()?;
        Ok(node)
    }

    /// A node in secure mode (`--key`, `--authorized-keys`) with fresh keys
    /// in a temporary directory; its clients connect with [`Node::client`].
    fn start_secure(runtime: &str) -> Result<Node> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let dir = std::env::temp_dir().join(format!("donate-e2e-{}-{runtime}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let (node_key, client_key) = (Keypair::generate(), Keypair::generate());
        let key_path = dir.join("node.key");
        let _ = std::fs::remove_file(&key_path);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path)?
            .write_all(node_key.secret_text().as_bytes())?;
        let authorized = dir.join("authorized");
        std::fs::write(&authorized, format!("{}\n", client_key.public()))?;
        let mut node = Node::start(
            runtime,
            &[
                "--key",
                key_path.to_str().ok_or("temp path")?,
                "--authorized-keys",
                authorized.to_str().ok_or("temp path")?,
            ],
        )?;
        node.secure = Some(SecureClientConfig {
            keypair: client_key,
            trust: NodeTrust::pin(&node_key.public().fingerprint())?,
        });
        Ok(node)
    }

    /// A std client of this node, secure if the node is.
    fn client(&self) -> Result<Client> {
        Ok(match &self.secure {
            None => Client::connect(self.addr)?,
            Some(secure) => {
                Client::connect_secure(self.addr, ClientConfig::default(), secure.clone(), None)?
            }
        })
    }

    /// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in bytes.
    fn status_bytes(&self, field: &str) -> Result<u64> {
        proc_status_bytes(&format!("/proc/{}/status", self.child.id()), field)
    }

    /// Pushes `len` bytes from `io::repeat` with the std client.
    fn push(&self, len: u64, sha256: Option<[u8; 32]>) -> Result<Transfer> {
        let server_before = process_cpu(self.child.id())?;
        let mut client = self.client()?;
        let (elapsed, client_cpu) = within(upload_limit(len), "upload", move || {
            let (start, cpu) = (Instant::now(), thread_cpu());
            let status =
                client.push_model_from("{}", io::repeat(7).take(len), len, sha256, |_| {})?;
            let (elapsed, cpu) = (start.elapsed(), thread_cpu() - cpu);
            if !status.ok {
                return Err(format!("model refused: {}", status.message).into());
            }
            Ok((elapsed, cpu))
        })?;
        let server_cpu = process_cpu(self.child.id())? - server_before;
        Ok(Transfer::new(len, elapsed, server_cpu, client_cpu))
    }

    /// Pushes `len` bytes of `fill` (with `sha256`) with the std client.
    fn push_filled(&self, len: u64, fill: u8, sha256: Option<[u8; 32]>) -> Result<Transfer> {
        let server_before = process_cpu(self.child.id())?;
        let mut client = self.client()?;
        let (elapsed, client_cpu) = within(upload_limit(len), "upload", move || {
            let (start, cpu) = (Instant::now(), thread_cpu());
            let status =
                client.push_model_from("{}", io::repeat(fill).take(len), len, sha256, |_| {})?;
            let (elapsed, cpu) = (start.elapsed(), thread_cpu() - cpu);
            if !status.ok {
                return Err(format!("model refused: {}", status.message).into());
            }
            Ok((elapsed, cpu))
        })?;
        let server_cpu = process_cpu(self.child.id())? - server_before;
        Ok(Transfer::new(len, elapsed, server_cpu, client_cpu))
    }

    /// A store-aware push of `len` bytes of `fill`, counting what went on the wire.
    fn push_stored_counted(&self, len: u64, fill: u8, sha256: [u8; 32]) -> Result<Counted> {
        let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let inner = TcpStream::connect(self.addr)?;
        set_timeouts(&inner)?;
        let stream = CountingStream {
            inner,
            written: Arc::clone(&written),
        };
        let mut client = Client::over(stream, donate_proto::ClientConnection::default())?;
        let pushed = within(upload_limit(len), "store push", move || {
            Ok(client.push_stored("{}", Filled::new(fill, len), len, sha256, |_| {})?)
        })?;
        Ok(Counted {
            weights: pushed.sent,
            wire: written.load(std::sync::atomic::Ordering::Relaxed),
            resumed_from: pushed.resumed_from,
        })
    }

    /// Sends half of a `len`-byte model of `fill` as a store client, closes the
    /// connection, and waits until the node holds what arrived. Returns the bytes written.
    fn break_upload(&self, len: u64, fill: u8, sha256: [u8; 32]) -> Result<u64> {
        let mut conn = TcpStream::connect(self.addr)?;
        set_timeouts(&conn)?;
        read_frame(&mut conn)?;
        let mut out = Vec::new();
        let hello = r#"{"v":1,"type":"hello","role":"client","capabilities":["store"]}"#;
        donate_proto::frame::encode_frame(hello.as_bytes(), &mut out);
        Message::ModelBegin(ModelBegin {
            config_json: "{}".to_owned(),
            weights_len: len as i64,
            weights_sha256: donate_proto::hex(&sha256),
            offset: 0,
            name: String::new(),
        })
        .encode(&mut out);
        let piece = vec![fill; MIB as usize];
        for index in 0..len / MIB / 2 {
            encode_weights_chunk(index as i64, false, &piece, &mut out);
        }
        conn.write_all(&out)?;
        // Let the node take it in, then break the connection.
        thread::sleep(SETTLE);
        drop(conn);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut client = self.client()?;
            let held = client.query_models(&[sha256])?.models[0].partial;
            if held > 0 {
                return Ok(out.len() as u64);
            }
            if Instant::now() > deadline {
                return Err("the node kept nothing of the broken upload".into());
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then waits (bounded) for a clean exit.
    fn stop(mut self) -> Result<()> {
        // SAFETY: kill(2) on our own child's pid.
        if unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) } != 0 {
            return Err(io::Error::last_os_error().into());
        }
        let runtime = &self.runtime;
        let status = wait_bounded(&mut self.child, Duration::from_secs(30))
            .map_err(|e| format!("donate serve --runtime {runtime}, after SIGTERM: {e}"))?;
        if !status.success() {
            return Err(format!("donate serve --runtime {runtime} exited with {status}").into());
        }
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Reached with the process running only when a scenario failed.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs this bench binary as `--child-push ADDR LEN` and returns the child's peak RSS.
fn child_push_run(addr: SocketAddr, len: u64) -> Result<u64> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--child-push", &addr.to_string(), &len.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let status = match wait_bounded(&mut child, upload_limit(len)) {
        Ok(status) => status,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    let mut out = String::new();
    child
        .stdout
        .take()
        .ok_or("no stdout")?
        .read_to_string(&mut out)?;
    if !status.success() {
        return Err(format!("client subprocess exited with {status}").into());
    }
    let hwm = out
        .trim()
        .strip_prefix("VmHWM ")
        .ok_or_else(|| format!("client subprocess printed {out:?}"))?;
    Ok(hwm.parse()?)
}

/// The client subprocess: pushes `LEN` bytes to `ADDR` (with `weights_sha256`
/// when `--sha256` follows), then prints `VmHWM <bytes>`. Also handy to profile
/// a node's upload path on its own: `e2e --child-push 127.0.0.1:PORT 1073741824`.
fn child_push(args: &[String]) -> ExitCode {
    let run = || -> Result<u64> {
        let (addr, len, with_sha) = match args {
            [addr, len] => (addr, len, false),
            [addr, len, flag] if flag == "--sha256" => (addr, len, true),
            _ => return Err("usage: --child-push ADDR LEN [--sha256]".into()),
        };
        let len: u64 = len.parse()?;
        let sha256 = if with_sha {
            Some(donate_std::sha256_of_reader(io::repeat(7).take(len))?)
        } else {
            None
        };
        let mut client = Client::connect(addr.as_str())?;
        let status = client.push_model_from("{}", io::repeat(7).take(len), len, sha256, |_| {})?;
        if !status.ok {
            return Err(format!("model refused: {}", status.message).into());
        }
        proc_status_bytes("/proc/self/status", "VmHWM")
    };
    match run() {
        Ok(hwm) => {
            println!("VmHWM {hwm}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("e2e --child-push: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A client on its own, to profile a node's job path without the benchmark's
/// other threads: `e2e --child-jobs 127.0.0.1:PORT N` runs N sequential infer
/// jobs (after a tiny upload) and prints jobs/s and p50/p99.
fn child_jobs(args: &[String]) -> ExitCode {
    let run = || -> Result<Stats> {
        let [addr, jobs] = args else {
            return Err("usage: --child-jobs ADDR N".into());
        };
        node_jobs(addr.parse()?, None, 1, jobs.parse()?, 500)
    };
    match run() {
        Ok(stats) => {
            println!("{}", stats.summary());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("e2e --child-jobs: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `clients` std clients, each with a tiny model mounted, run `jobs` sequential infer
/// jobs each after `warm_up` untimed ones; all start together.
fn node_jobs(
    addr: SocketAddr,
    server: Option<u32>,
    clients: usize,
    jobs: usize,
    warm_up: usize,
) -> Result<Stats> {
    let start = Arc::new(Barrier::new(clients + 1));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let start = Arc::clone(&start);
            thread::spawn(move || -> Result<(Vec<Duration>, Duration)> {
                let ready = (|| -> Result<Client> {
                    let mut client = Client::connect(addr)?;
                    client.push_model("{}", &[1, 2, 3, 4], false)?;
                    for _ in 0..warm_up {
                        client.infer(&INPUT_IDS, MAX_TOKENS)?;
                    }
                    Ok(client)
                })();
                start.wait(); // reached on failure too, so no one waits forever
                let mut client = ready?;
                let mut latencies = Vec::with_capacity(jobs);
                let cpu = thread_cpu();
                for _ in 0..jobs {
                    let t = Instant::now();
                    let result = client.infer(&INPUT_IDS, MAX_TOKENS)?;
                    latencies.push(t.elapsed());
                    if result.output_ids.len() != INPUT_IDS.len() + MAX_TOKENS as usize {
                        return Err("wrong answer".into());
                    }
                }
                Ok((latencies, thread_cpu() - cpu))
            })
        })
        .collect();
    let limit = job_limit(clients * (jobs + warm_up));
    let server_cpu = move || server.map_or(Ok(Duration::ZERO), process_cpu);
    within(limit, "jobs", move || {
        start.wait();
        let (began, server_before) = (Instant::now(), server_cpu()?);
        let mut latencies = Vec::with_capacity(clients * jobs);
        let mut client_cpu = Duration::ZERO;
        for t in threads {
            let (l, cpu) = t.join().map_err(|_| "client thread panicked")??;
            latencies.extend(l);
            client_cpu += cpu;
        }
        let elapsed = began.elapsed();
        let server_cpu = server_cpu()? - server_before;
        Ok(Stats::new(elapsed, latencies).with_cpu(server_cpu, client_cpu))
    })
}

/// Jobs/s with `PIPELINE_DEPTH` jobs sent at once on one connection, `rounds` times.
fn node_pipelined(addr: SocketAddr, rounds: usize) -> Result<f64> {
    within(
        job_limit(rounds * PIPELINE_DEPTH),
        "pipelined jobs",
        move || {
            let mut client = Client::connect(addr)?;
            client.push_model("{}", &[1, 2, 3, 4], false)?;
            let start = Instant::now();
            for _ in 0..rounds {
                let requests = (0..PIPELINE_DEPTH)
                    .map(|_| client.send_infer(&INPUT_IDS, MAX_TOKENS))
                    .collect::<Result<Vec<_>, _>>()?;
                for request in requests {
                    donate_std::answers::infer(client.wait(request)?)?;
                }
            }
            Ok((rounds * PIPELINE_DEPTH) as f64 / start.elapsed().as_secs_f64())
        },
    )
}

/// Opens `n` connections that read the server hello, send the client hello and
/// then `extra`, and stay open (nothing more is sent) until dropped.
fn open_connections(addr: SocketAddr, n: usize, extra: &[u8]) -> Result<Vec<TcpStream>> {
    let hello = frame(&Message::Hello(Hello {
        mode: "model_push".to_owned(),
        role: "client".to_owned(),
        ..Hello::default()
    }));
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let open = || -> io::Result<TcpStream> {
            let mut conn = TcpStream::connect(addr)?;
            set_timeouts(&conn)?;
            let mut header = [0; 4];
            conn.read_exact(&mut header)?;
            let mut body = vec![0; u32::from_le_bytes(header) as usize];
            conn.read_exact(&mut body)?;
            conn.write_all(&hello)?;
            conn.write_all(extra)?;
            Ok(conn)
        };
        conns.push(open().map_err(|e| format!("connection {i} of {n}: {e}"))?);
    }
    Ok(conns)
}

// ---------------------------------------------------------------------------
// Baselines: raw TCP, SHA-256
// ---------------------------------------------------------------------------

/// Writes the bytes of `len / 1 MiB` encoded 1 MiB chunk frames to a server that
/// reads and discards them; payload-equivalent bytes/s.
fn raw_upload(len: u64) -> Result<Transfer> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let sink = thread::spawn(move || -> io::Result<(u64, Duration)> {
        let mut conn = accept_within(&listener)?;
        let cpu = thread_cpu();
        let mut buf = vec![0; 256 * 1024];
        let mut total = 0;
        loop {
            match conn.read(&mut buf)? {
                0 => break,
                n => total += n as u64,
            }
        }
        conn.write_all(&[1])?;
        Ok((total, thread_cpu() - cpu))
    });
    let mut chunk = Vec::new();
    encode_weights_chunk(0, false, &vec![7; MIB as usize], &mut chunk);
    let mut conn = TcpStream::connect(addr)?;
    set_timeouts(&conn)?;
    let (start, cpu) = (Instant::now(), thread_cpu());
    for _ in 0..len / MIB {
        conn.write_all(&chunk)?;
    }
    conn.shutdown(Shutdown::Write)?;
    conn.read_exact(&mut [0])?;
    let (elapsed, client_cpu) = (start.elapsed(), thread_cpu() - cpu);
    let (received, server_cpu) = sink.join().map_err(|_| "sink panicked")??;
    if received != chunk.len() as u64 * (len / MIB) {
        return Err("raw sink lost bytes".into());
    }
    Ok(Transfer::new(len, elapsed, server_cpu, client_cpu))
}

/// `clients` connections each ping-pong frames of an infer's size against a
/// raw echo server answering frames of an infer_result's size.
fn raw_ping_pong(clients: usize, jobs: usize, warm_up: usize) -> Result<Stats> {
    let (request_len, answer_len) = job_frame_sizes();
    let request = raw_frame(request_len);
    let answer = raw_frame(answer_len);
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let echo = thread::spawn(move || -> io::Result<Duration> {
        let servers: Vec<_> = (0..clients)
            .map(|_| {
                let mut conn = accept_within(&listener)?;
                let answer = answer.clone();
                Ok(thread::spawn(move || -> io::Result<Duration> {
                    let mut buf = vec![0; request_len];
                    loop {
                        match conn.read_exact(&mut buf) {
                            Ok(()) => conn.write_all(&answer)?,
                            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                                return Ok(thread_cpu())
                            }
                            Err(e) => return Err(e),
                        }
                    }
                }))
            })
            .collect::<io::Result<_>>()?;
        let mut cpu = Duration::ZERO;
        for server in servers {
            cpu += server
                .join()
                .map_err(|_| io::Error::other("echo panicked"))??;
        }
        Ok(cpu)
    });
    let start = Arc::new(Barrier::new(clients + 1));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (start, request) = (Arc::clone(&start), request.clone());
            thread::spawn(move || -> Result<(Vec<Duration>, Duration)> {
                let ready = (|| -> io::Result<TcpStream> {
                    let mut conn = TcpStream::connect(addr)?;
                    set_timeouts(&conn)?;
                    let mut buf = vec![0; answer_len];
                    for _ in 0..warm_up {
                        conn.write_all(&request)?;
                        conn.read_exact(&mut buf)?;
                    }
                    Ok(conn)
                })();
                start.wait();
                let mut conn = ready?;
                let mut buf = vec![0; answer_len];
                let mut latencies = Vec::with_capacity(jobs);
                let cpu = thread_cpu();
                for _ in 0..jobs {
                    let t = Instant::now();
                    conn.write_all(&request)?;
                    conn.read_exact(&mut buf)?;
                    latencies.push(t.elapsed());
                }
                Ok((latencies, thread_cpu() - cpu))
            })
        })
        .collect();
    start.wait();
    let began = Instant::now();
    let mut latencies = Vec::with_capacity(clients * jobs);
    let mut client_cpu = Duration::ZERO;
    for t in threads {
        let (l, cpu) = t.join().map_err(|_| "raw client panicked")??;
        latencies.extend(l);
        client_cpu += cpu;
    }
    let elapsed = began.elapsed();
    // The echo threads' CPU covers the warm-up too: count the timed jobs' share.
    let echo_cpu = echo.join().map_err(|_| "echo panicked")??;
    let server_cpu = echo_cpu.mul_f64(jobs as f64 / (jobs + warm_up) as f64);
    Ok(Stats::new(elapsed, latencies).with_cpu(server_cpu, client_cpu))
}

/// Single-core SHA-256 over a 64 MiB buffer, in bytes/s.
fn sha256_rate() -> Result<f64> {
    let buf = vec![7u8; 64 * MIB as usize];
    let start = Instant::now();
    std::hint::black_box(Sha256::digest(std::hint::black_box(&buf)));
    Ok(buf.len() as f64 / start.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------------------
// Frames and sizes
// ---------------------------------------------------------------------------

fn frame(msg: &Message<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    msg.encode(&mut out);
    out
}

/// Frame sizes (header included) of the benchmark's infer job and the stub's answer,
/// with a job id as long as the longest the benchmark uses.
fn job_frame_sizes() -> (usize, usize) {
    let job_id = "j100000".to_owned();
    let infer = frame(&Message::Infer(Infer {
        job_id: job_id.clone(),
        input_ids: INPUT_IDS.to_vec(),
        max_tokens: MAX_TOKENS,
        deadline_ms: 0,
        sampling: Default::default(),
    }));
    let output_ids = INPUT_IDS
        .iter()
        .copied()
        .chain((0..8).map(|i| 1 + i % 7))
        .collect();
    let result = frame(&Message::InferResult(InferResult {
        job_id,
        ok: true,
        output_ids,
        queue_depth: 0,
        ..InferResult::default()
    }));
    (infer.len(), result.len())
}

/// A frame of `len` bytes in all: a header, then filler.
fn raw_frame(len: usize) -> Vec<u8> {
    let mut out = ((len - 4) as u32).to_le_bytes().to_vec();
    out.resize(len, b'x');
    out
}

// ---------------------------------------------------------------------------
// Measurements
// ---------------------------------------------------------------------------

/// One upload (or its raw copy): payload bytes/s, and CPU seconds per GiB on each side.
#[derive(Clone, Copy)]
struct Transfer {
    rate: f64,
    server_cpu_per_gib: f64,
    client_cpu_per_gib: f64,
}

impl Transfer {
    fn new(len: u64, elapsed: Duration, server_cpu: Duration, client_cpu: Duration) -> Transfer {
        let gib = len as f64 / (1024 * MIB) as f64;
        Transfer {
            rate: len as f64 / elapsed.as_secs_f64(),
            server_cpu_per_gib: server_cpu.as_secs_f64() / gib,
            client_cpu_per_gib: client_cpu.as_secs_f64() / gib,
        }
    }

    /// The run with the median rate.
    fn median(mut runs: Vec<Transfer>) -> Transfer {
        runs.sort_by(|a, b| a.rate.total_cmp(&b.rate));
        runs[runs.len() / 2]
    }

    fn summary(&self) -> String {
        format!(
            "{}; CPU s/GiB: server {:.2}, client {:.2}",
            mb_s(self.rate),
            self.server_cpu_per_gib,
            self.client_cpu_per_gib
        )
    }
}

/// Jobs done in some wall time, with each job's latency.
struct Stats {
    elapsed: Duration,
    latencies: Vec<Duration>,
    /// CPU time of the server process (or raw echo threads) and of the client threads.
    server_cpu: Duration,
    client_cpu: Duration,
}

impl Stats {
    fn new(elapsed: Duration, mut latencies: Vec<Duration>) -> Stats {
        latencies.sort_unstable();
        Stats {
            elapsed,
            latencies,
            server_cpu: Duration::ZERO,
            client_cpu: Duration::ZERO,
        }
    }

    fn with_cpu(mut self, server: Duration, client: Duration) -> Stats {
        self.server_cpu = server;
        self.client_cpu = client;
        self
    }

    /// Several measurements as one: their jobs over the sum of their wall times.
    fn combine(parts: Vec<Stats>) -> Stats {
        let elapsed = parts.iter().map(|p| p.elapsed).sum();
        let server = parts.iter().map(|p| p.server_cpu).sum();
        let client = parts.iter().map(|p| p.client_cpu).sum();
        let latencies = parts.into_iter().flat_map(|p| p.latencies).collect();
        Stats::new(elapsed, latencies).with_cpu(server, client)
    }

    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    fn p(&self, q: f64) -> Duration {
        let i = ((self.latencies.len() as f64 * q) as usize).min(self.latencies.len() - 1);
        self.latencies[i]
    }

    /// CPU µs per job: server, client.
    fn cpu_per_job(&self) -> (f64, f64) {
        let jobs = self.latencies.len() as f64;
        (
            micros(self.server_cpu) / jobs,
            micros(self.client_cpu) / jobs,
        )
    }

    /// The figures a node is compared with.
    fn reference(&self) -> String {
        let (server, client) = self.cpu_per_job();
        format!(
            "raw {:.0} jobs/s, p99 {:.0} µs; CPU µs/job {server:.1} / {client:.1}",
            self.rate(),
            micros(self.p(0.99))
        )
    }

    fn summary(&self) -> String {
        let (server, client) = self.cpu_per_job();
        format!(
            "{:.0} jobs/s, p50 {:.0} µs, p99 {:.0} µs; CPU µs/job: server {server:.1}, client {client:.1}",
            self.rate(),
            micros(self.p(0.5)),
            micros(self.p(0.99))
        )
    }
}

/// The median of some measurements.
fn median(mut runs: Vec<f64>) -> f64 {
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

/// A `kB` field of a `/proc/.../status` file, in bytes.
fn proc_status_bytes(path: &str, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(path)?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .ok_or_else(|| format!("{field} not in {path}"))?;
    let kb: u64 = line.trim().trim_end_matches("kB").trim().parse()?;
    Ok(kb * 1024)
}

/// CPU time (user + system) process `pid` has used, all its threads included
/// (clock ticks, usually 10 ms).
fn process_cpu(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name, which is in parentheses and may hold spaces;
    // utime and stime are fields 14 and 15 of the line.
    let (_, rest) = stat.rsplit_once(')').ok_or("unexpected /proc/pid/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok(Duration::from_secs_f64(ticks as f64 / per_second as f64))
}

/// CPU time the calling thread has used.
fn thread_cpu() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime with a valid pointer to a local.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// The first three fields of `/proc/loadavg`.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Raises RLIMIT_NOFILE to its hard limit; returns the limit now in force.
fn raise_nofile_limit() -> Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(io::Error::last_os_error().into());
        }
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            return Err(io::Error::last_os_error().into());
        }
    }
    Ok(limit.rlim_cur)
}

// ---------------------------------------------------------------------------
// Bounded waits
// ---------------------------------------------------------------------------

/// Runs `f` on its own thread and waits at most `limit` for it. On timeout the
/// thread is left behind; dropping the node it talks to (which kills it) frees it.
fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(result) => result,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            Err(format!("{what}: not done within {} s", limit.as_secs()).into())
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(format!("{what}: panicked").into()),
    }
}

/// Time allowed for an upload of `len` bytes: generous, at 20 MB/s plus 30 s.
fn upload_limit(len: u64) -> Duration {
    Duration::from_secs(30 + len / 20_000_000)
}

/// Time allowed for `jobs` jobs: generous, at 1,000 jobs/s plus 30 s.
fn job_limit(jobs: usize) -> Duration {
    Duration::from_secs(30 + jobs as u64 / 1_000)
}

fn wait_bounded(child: &mut Child, limit: Duration) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "process {} did not exit within {} s",
                child.id(),
                limit.as_secs()
            )
            .into());
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Accepts one connection within `IO_TIMEOUT`.
fn accept_within(listener: &TcpListener) -> io::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                conn.set_nonblocking(false)?;
                set_timeouts(&conn)?;
                return Ok(conn);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
    }
}

fn set_timeouts(conn: &TcpStream) -> io::Result<()> {
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))
}

// ---------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------

/// Rows of results, printed as one Markdown table with notes below.
#[derive(Default)]
struct Table {
    rows: Vec<Row>,
    notes: Vec<String>,
    failures: usize,
}

#[derive(Default)]
struct Row {
    scenario: String,
    subject: String,
    figure: String,
    reference: String,
    ratio: String,
    goal: String,
    verdict: String,
}

impl Table {
    fn row(&mut self, scenario: &str, subject: impl Into<String>) -> &mut Row {
        self.rows.push(Row {
            scenario: scenario.to_owned(),
            subject: subject.into(),
            ..Row::default()
        });
        self.rows.last_mut().expect("just pushed")
    }

    fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    fn failed(&mut self, scenario: &str, error: &str) {
        self.failures += 1;
        self.row(scenario, "FAILED").figure(error.replace('|', "/"));
    }

    fn print(&self) {
        let header = Row {
            scenario: "scenario".into(),
            subject: "what".into(),
            figure: "result".into(),
            reference: "reference (same run)".into(),
            ratio: "ratio".into(),
            goal: "goal".into(),
            verdict: "met".into(),
        };
        let cells = |r: &Row| {
            [
                r.scenario.clone(),
                r.subject.clone(),
                r.figure.clone(),
                r.reference.clone(),
                r.ratio.clone(),
                r.goal.clone(),
                r.verdict.clone(),
            ]
        };
        let all: Vec<[String; 7]> = std::iter::once(&header)
            .chain(&self.rows)
            .map(cells)
            .collect();
        let widths: Vec<usize> = (0..7)
            .map(|c| all.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        let line = |r: &[String; 7]| {
            let cells: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            format!("| {} |", cells.join(" | "))
        };
        let mut out = io::stdout().lock();
        let _ = writeln!(out);
        let _ = writeln!(out, "{}", line(&all[0]));
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        let _ = writeln!(out, "|-{}-|", rule.join("-|-"));
        for r in &all[1..] {
            let _ = writeln!(out, "{}", line(r));
        }
        let _ = writeln!(out);
        for note in &self.notes {
            let _ = writeln!(out, "- {note}");
        }
    }
}

impl Row {
    fn figure(&mut self, figure: impl Into<String>) -> &mut Row {
        self.figure = figure.into();
        self
    }

    /// What the figure is compared with, and figure / reference.
    fn reference(&mut self, reference: impl Into<String>, ratio: f64) -> &mut Row {
        self.reference = reference.into();
        self.ratio = format!("{ratio:.2} x");
        self
    }

    fn goal(&mut self, goal: impl Into<String>, met: bool) -> &mut Row {
        self.goal = goal.into();
        self.verdict = if met { "yes" } else { "NO" }.into();
        self
    }
}

// ---------------------------------------------------------------------------
// Units
// ---------------------------------------------------------------------------

fn mb_s(bytes_per_s: f64) -> String {
    format!("{:.0} MB/s", bytes_per_s / 1e6)
}

fn bytes(n: u64) -> String {
    if n >= 1024 * MIB && n % (1024 * MIB) == 0 {
        format!("{} GiB", n / (1024 * MIB))
    } else if n < MIB / 10 {
        format!("{n} B")
    } else {
        format!("{:.1} MiB", n as f64 / MIB as f64)
    }
}

fn kib(n: f64) -> String {
    format!("{:.1} KiB", n / 1024.0)
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
