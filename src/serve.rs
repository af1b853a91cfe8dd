//! `donate serve`: a donor node until SIGINT/SIGTERM, then a graceful shutdown.

use std::io::Write;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use donate_host::{NodeAddr, NodeConfig};

use donate_exec::{ExecutorSpec, LocalLmCommand, WorkerProcess};
use donate_proto::{Executor, Mode, ServerConfig, Stub};

use crate::{CliResult, Failure, Runtime, ServeArgs};

/// Runs the node the flags describe until a signal asks it to stop.
pub fn run(args: ServeArgs) -> CliResult {
    crate::secure::check_exposure(&args.addr, args.key.is_some(), args.insecure)?;
    if let Some(addr) = &args.metrics {
        check_metrics_exposure(addr, args.key.is_some() || args.insecure)?;
    }
    if let (Some(_), Some(other)) = (&args.model, &args.executor) {
        if other != "candle" {
            return Err(format!(
                "--model needs the candle executor, not --executor {other}: leave --executor out (or say --executor candle)"
            )
            .into());
        }
    }
    keep_memory_flat();
    // `candle` is recognised here rather than by ExecutorSpec: it exists only
    // in builds with the `candle` feature.
    if args.executor() == "candle" {
        return run_candle(&args);
    }
    match &args.executor_spec()? {
        ExecutorSpec::Stub => run_with(&args, Stub::new(args.local_lm_path.clone())),
        ExecutorSpec::Cmd(argv) => {
            let workers = WorkerProcess::new(argv.clone(), args.worker_config())
                .map_err(|e| format!("cannot start the worker processes: {e}"))?;
            run_with(&args, workers)
        }
        ExecutorSpec::Lm(argv) => {
            if args.mode != Mode::LocalLm {
                return Err("an lm: executor answers prompts only: add --mode local_lm".into());
            }
            run_with(&args, LocalLmCommand::new(argv.clone(), args.lm_config())?)
        }
    }
}

/// `--executor candle`: pushed llama models, or with `--mode local_lm` the one
/// in `--local-lm-path DIR`, run with candle (docs/CANDLE.md).
#[cfg(feature = "candle")]
fn run_candle(args: &ServeArgs) -> CliResult {
    use donate_candle::{CandleConfig, CandleExecutor, DeviceChoice, Sampling};

    let local_lm = match (args.mode, &args.model) {
        (Mode::LocalLm, Some(model)) => Some(model.clone()),
        (Mode::LocalLm, None) if args.local_lm_path.is_empty() => {
            return Err(
                "--mode local_lm --executor candle needs --local-lm-path DIR \
                 (DIR/config.json, DIR/model.safetensors, DIR/tokenizer.json) or --model FILE.gguf"
                    .into(),
            )
        }
        (Mode::LocalLm, None) => Some(std::path::PathBuf::from(&args.local_lm_path)),
        (Mode::ModelPush, Some(_)) => {
            return Err("--model names the local_lm model: add --mode local_lm".into())
        }
        (Mode::ModelPush, None) => None,
    };
    if let Some(path) = &local_lm {
        check_local_model(path)?;
    }
    let device: DeviceChoice = args.candle_device.parse()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = args.candle_threads.unwrap_or(cores);
    donate_candle::set_threads(threads);
    let config = CandleConfig {
        device,
        max_tokens_cap: args.candle_max_tokens,
        job_timeout: Some(std::time::Duration::from_secs_f64(args.job_timeout)),
        max_batch: args.candle_batch,
        limits: donate_candle::ModelLimits {
            context: args.candle_context,
            runtime_bytes: args.candle_runtime_memory,
            metadata_bytes: args.candle_metadata_memory,
        },
        local_lm,
        raw_prompt: args.raw_prompt,
        sampling: Sampling {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            repeat_penalty: args.repeat_penalty,
            repeat_last_n: None,
            seed: args.seed,
            stop: args.stop.clone(),
        },
        ..CandleConfig::default()
    };
    let executor = CandleExecutor::new(config)
        .map_err(|e| format!("cannot start the candle executor: {e}"))?;
    if let Some(model) = executor.local_model() {
        tracing::info!(
            format = model.format(),
            params = model.param_count(),
            weight_bytes = model.weight_bytes(),
            chat_template = model.has_chat_template(),
            threads,
            "local_lm model loaded"
        );
    }
    run_with(args, executor)
}

/// A local_lm model path that cannot be one, said plainly before loading: a
/// path that does not exist, or a file that is not GGUF (a directory is
/// checked file by file as it loads).
#[cfg(feature = "candle")]
fn check_local_model(path: &std::path::Path) -> CliResult {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("{}: no such file", path.display()),
        _ => format!("{}: {e}", path.display()),
    })?;
    if meta.is_dir() {
        return Ok(());
    }
    let mut magic = Vec::with_capacity(4);
    std::fs::File::open(path)
        .and_then(|f| std::io::Read::read_to_end(&mut std::io::Read::take(f, 4), &mut magic))
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if magic != b"GGUF" {
        return Err(format!(
            "{}: not a GGUF file (a local_lm model is a GGUF file, or a directory with \
             config.json, model.safetensors and tokenizer.json)",
            path.display()
        )
        .into());
    }
    Ok(())
}

/// `--executor candle` (or `--model`) in a build without the feature.
#[cfg(not(feature = "candle"))]
fn run_candle(args: &ServeArgs) -> CliResult {
    match args.model {
        Some(_) => Err("--model needs the candle executor: build with --features candle".into()),
        None => Err(
            "this donate was built without the candle feature: cargo build --features candle"
                .into(),
        ),
    }
}

/// Serves a std `$listener` on `$runtime` until the signal, then shuts down
/// gracefully; `$to_tokio` makes the listener tokio's. A macro because each
/// adapter takes its own listener types.
macro_rules! serve_on {
    ($runtime:expr, $listener:expr, $to_tokio:path, $config:expr, $executor:expr, $started:expr, $stop:expr) => {
        match $runtime {
            Runtime::Std => {
                let server = donate_std::serve($listener, $config.clone(), $executor)
                    .map_err(|e| format!("cannot start the node: {e}"))?;
                $started.announce(&server.local_addr())?;
                $stop.wait();
                server.shutdown();
            }
            Runtime::Smol => {
                let listener = async_io::Async::new($listener)
                    .map_err(|e| format!("cannot register the listener: {e}"))?;
                let smol = SmolThread::start();
                let server =
                    donate_smol::serve(listener, $config.clone(), $executor, smol.spawner())
                        .map_err(|e| format!("cannot start the node: {e}"))?;
                $started.announce(&server.local_addr())?;
                $stop.wait();
                smol::block_on(server.shutdown());
                smol.stop();
            }
            Runtime::Tokio => {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("cannot start the tokio runtime: {e}"))?;
                let listener = $listener;
                let server = runtime.block_on(async {
                    listener.set_nonblocking(true)?;
                    donate_tokio::serve($to_tokio(listener)?, $config.clone(), $executor)
                });
                let server = server.map_err(|e| format!("cannot start the node: {e}"))?;
                $started.announce(&server.local_addr())?;
                $stop.wait();
                runtime.block_on(server.shutdown());
            }
        }
    };
}

/// Runs the node with `executor` on the runtime `--runtime` names, on a TCP
/// or a Unix listener as `--addr` says.
fn run_with<E: Executor>(args: &ServeArgs, executor: E) -> CliResult {
    let server_config = args.config();
    let config = match (&args.key, &args.authorized_keys) {
        (Some(key), Some(authorized)) => {
            let secure = crate::secure::server_config(key, authorized)?;
            tracing::info!(node_key = %secure.keypair.public().fingerprint(), authorized_keys = %authorized.display(), "secure mode");
            NodeConfig::secure(server_config.clone(), secure)
        }
        _ => NodeConfig::from(server_config.clone()),
    };
    let config = match &args.store {
        Some(dir) => {
            let store = donate_host::ModelStore::open(dir, args.store_max)
                .map_err(|e| format!("cannot open the model store {}: {e}", dir.display()))?
                .partial_ttl(std::time::Duration::from_secs_f64(args.store_partial_ttl))
                .upload_timeout(std::time::Duration::from_secs_f64(
                    args.store_upload_timeout,
                ));
            tracing::info!(store = %dir.display(), models = store.len(), used_bytes = store.used_bytes(), max_bytes = args.store_max, "model store");
            config.with_store(store)
        }
        None => config,
    };
    // What the core carries out for any executor (docs/PROTOCOL.md §10);
    // v1 clients name none of it and see v1.
    let offered = match args.stats {
        true => donate_host::HONOURED.with(donate_proto::Capability::Stats),
        false => donate_host::HONOURED,
    };
    let mut config = config.offer(offered);
    // Held until the node has stopped: /healthz says 503 while it drains.
    let _metrics = match &args.metrics {
        Some(addr) => {
            let metrics = Arc::new(donate_host::Metrics::default());
            config = config.metrics(Arc::clone(&metrics));
            let listener = TcpListener::bind(addr)
                .map_err(|e| format!("cannot listen on {addr} for --metrics: {e}"))?;
            let server = donate_host::MetricsServer::start(listener, metrics)
                .map_err(|e| format!("cannot serve --metrics: {e}"))?;
            tracing::info!(addr = %server.local_addr(), "metrics on http://{}/metrics", server.local_addr());
            Some(server)
        }
        None => None,
    };
    let stop = Stop::install()?;
    let started = Started {
        runtime: args.runtime,
        executor: args.executor(),
        config: &server_config,
    };
    let cannot_listen = |e| format!("cannot listen on {}: {e}", args.addr);
    match &args.addr {
        NodeAddr::Tcp(addr) => {
            let listener = TcpListener::bind(addr).map_err(cannot_listen)?;
            serve_on!(
                args.runtime,
                listener,
                tokio::net::TcpListener::from_std,
                config,
                executor,
                started,
                stop
            );
        }
        #[cfg(unix)]
        NodeAddr::Unix(path) => {
            let listener = donate_host::bind_unix(path).map_err(cannot_listen)?;
            serve_on!(
                args.runtime,
                listener,
                tokio::net::UnixListener::from_std,
                config,
                executor,
                started,
                stop
            );
            // The socket file is ours: leave no stale one behind.
            let _ = std::fs::remove_file(path);
        }
        #[cfg(not(unix))]
        NodeAddr::Unix(_) => return Err("unix: addresses need a Unix system".into()),
    }
    tracing::info!("stopped");
    Ok(())
}

/// `--metrics ADDR` is plain, unauthenticated HTTP: an address other
/// machines can reach is allowed only where the node's own could be (with
/// `--key` or `--insecure`).
fn check_metrics_exposure(addr: &str, node_may_be_exposed: bool) -> CliResult {
    let exposed = crate::secure::is_exposed(&NodeAddr::Tcp(addr.to_owned()));
    if exposed && !node_may_be_exposed {
        return Err(Failure::with_code(
            format!(
                "refusing to serve --metrics on {addr}: other machines could read the node's \
                 counters; use a loopback address (127.0.0.1:PORT), or --key / --insecure as \
                 for the node's own address"
            ),
            crate::exit::EXPOSED,
        ));
    }
    Ok(())
}

/// The smol executor a `--runtime smol` node's tasks run on.
struct SmolThread {
    ex: Arc<smol::Executor<'static>>,
    done: smol::channel::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl SmolThread {
    /// One executor thread moves every connection's bytes (jobs run on the
    /// workers): measured, a second one only adds wake-ups between the two
    /// (sequential round trips 85 -> 39 us on 2 cores).
    fn start() -> SmolThread {
        let ex = Arc::new(smol::Executor::new());
        let (done, finished) = smol::channel::bounded::<()>(1);
        let thread = {
            let ex = Arc::clone(&ex);
            std::thread::spawn(move || {
                let _ = smol::block_on(ex.run(finished.recv()));
            })
        };
        SmolThread { ex, done, thread }
    }

    fn spawner(&self) -> impl donate_smol::Spawn {
        let ex = Arc::clone(&self.ex);
        move |task| ex.spawn(task).detach()
    }

    fn stop(self) {
        drop(self.done);
        let _ = self.thread.join();
    }
}

/// What a node reports once it listens.
struct Started<'a> {
    runtime: Runtime,
    executor: &'a str,
    config: &'a ServerConfig,
}

impl Started<'_> {
    /// Logs the node's settings and prints `listening on <addr>` on stdout, so a
    /// caller that asked for port 0 learns the port.
    fn announce(&self, addr: &dyn std::fmt::Display) -> CliResult {
        let config = self.config;
        tracing::info!(
            %addr,
            mode = %config.mode,
            queue = config.queue_capacity,
            workers = config.workers,
            runtime = self.runtime.name(),
            executor = self.executor,
            "listening"
        );
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening on {addr}")
            .and_then(|()| stdout.flush())
            .map_err(|e| format!("cannot write to stdout: {e}"))?;
        Ok(())
    }
}

/// SIGINT/SIGTERM, turned into a message. A second signal exits at once.
struct Stop(mpsc::Receiver<()>);

impl Stop {
    fn install() -> Result<Stop, Failure> {
        let (tx, rx) = mpsc::sync_channel(1);
        let signalled = AtomicBool::new(false);
        ctrlc::set_handler(move || {
            if signalled.swap(true, Ordering::SeqCst) {
                eprintln!("donate: second signal, exiting without waiting for running jobs");
                std::process::exit(130);
            }
            let _ = tx.try_send(());
        })
        .map_err(|e| format!("cannot install the signal handler: {e}"))?;
        Ok(Stop(rx))
    }

    /// Blocks until the first signal.
    fn wait(&self) {
        let _ = self.0.recv();
        tracing::info!("signal received, shutting down gracefully (again to force)");
    }
}

/// A node runs for weeks with buffers of every size coming and going on many
/// threads (frames up to 64 MiB, uploads, a backpressured peer's answers).
/// glibc's defaults keep what such traffic freed: one arena per thread that
/// allocated, and a mmap threshold that rises to the largest block freed, so
/// later large buffers come from (and stay in) the arenas. Measured: RSS
/// climbing past 200 MiB under rounds of hostile traffic, flat at ~6 MiB with
/// these two settings (tests/soak.rs keeps it so). Large blocks are then
/// mapped and returned on free; two arenas bound per-thread retention.
/// Smaller blocks freed in the middle of an arena stay resident until glibc
/// is asked to give them back: a thread does so every 2 s (`malloc_trim`
/// walks the free lists, well under a millisecond for a node's heap), so a
/// burst of traffic does not leave its pages behind (soak rounds read 13 MiB
/// after most rounds and 20+ after some without it).
fn keep_memory_flat() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; called before the
        // node starts any thread.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
        let _ = std::thread::Builder::new()
            .name("donate-trim".to_owned())
            .spawn(|| loop {
                std::thread::sleep(std::time::Duration::from_secs(2));
                // SAFETY: malloc_trim only returns free pages to the OS.
                unsafe { libc::malloc_trim(0) };
            });
    }
}
