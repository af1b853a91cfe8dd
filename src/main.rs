//! `donate`: run a donor node, or talk to any node (ours or the Go one).

mod batch;
mod commands;
mod gateway;
mod hash_cache;
mod sampling;
mod secure;
mod serve;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::builder::TypedValueParser as _;
use clap::{ArgGroup, Parser, Subcommand, ValueEnum};
use donate_exec::{ExecutorSpec, LmConfig, WorkerConfig};
use donate_host::NodeAddr;
use donate_proto::{Mode, ServerConfig};

/// The address a node listens on and a client dials by default.
const DEFAULT_ADDR: &str = "127.0.0.1:17001";

/// `--workers` of a candle node: jobs generating at once, their next tokens
/// stacked into one forward pass (docs/CANDLE.md, Threads and batching).
const CANDLE_WORKERS: usize = 4;

/// Exit statuses: one per failure a script may want to tell apart.
const EXIT_CODES: &str = "\
Exit status:
  0   success
  1   any other failure (cannot connect, refused request, bad file...)
  2   usage error
  10  the node does not know your key (ask its owner to add your .pub line)
  11  the node's key is not the one pinned (--node-key or known_nodes)
  12  the node is plain text; a secure client never falls back to it
  13  the secure handshake timed out
  14  a record or handshake message was altered in transit
  15  the node requires secure mode and no --key was given
  16  the node's key is not known: pass --node-key or --trust-on-first-use
  17  the private key file cannot be used (unreadable, bad, or readable by others)
  18  serve: a non-loopback address without --key (or --insecure)";

/// The exit statuses in [`EXIT_CODES`].
mod exit {
    pub const FAILURE: u8 = 1;
    pub const UNKNOWN_KEY: u8 = 10;
    pub const NODE_KEY_MISMATCH: u8 = 11;
    pub const PLAINTEXT_NODE: u8 = 12;
    pub const HANDSHAKE_TIMEOUT: u8 = 13;
    pub const TAMPERED: u8 = 14;
    pub const SECURE_REQUIRED: u8 = 15;
    pub const UNKNOWN_NODE: u8 = 16;
    pub const KEY_FILE: u8 = 17;
    pub const EXPOSED: u8 = 18;
}

/// Donate compute: run a donor node, or push models and jobs to one.
#[derive(Debug, Parser)]
#[command(name = "donate", version, about, propagate_version = true, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
// Parsed once per process: the size of the serve flags does not matter.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Run a donor node until SIGINT/SIGTERM, then shut down gracefully.
    Serve(Box<ServeArgs>),
    /// Upload a model to a node and report whether it mounted.
    Push(PushArgs),
    /// Upload a model, then run one infer job on it over the same connection.
    Infer(InferArgs),
    /// Send a prompt to a local_lm node.
    Prompt(PromptArgs),
    /// Talk with a local_lm node's model: a line per turn, the conversation
    /// kept (an empty line or end of input stops).
    Chat(ChatArgs),
    /// Show a node's hello and queue status.
    Status(StatusArgs),
    /// List the models a node's store holds (nodes run with --store).
    Models(ModelsArgs),
    /// Run a file of jobs on many donors: each job answered once, donors that
    /// fail or stall replaced by the others.
    Batch(BatchArgs),
    /// Write a new key pair for secure mode: the private key to PATH (mode
    /// 0600), the public key to PATH.pub; print its fingerprint.
    Keygen(KeygenArgs),
    /// Serve an OpenAI-compatible HTTP API (/v1/chat/completions,
    /// /v1/completions, /v1/models) in front of local_lm donors.
    Gateway(GatewayArgs),
}

#[derive(Debug, clap::Args)]
struct GatewayArgs {
    /// Where the HTTP API listens. Anything but loopback needs --api-keys
    /// (or --insecure).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
    /// A donor (repeatable): host:port or unix:/path/node.sock of a
    /// `donate serve --mode local_lm --model FILE.gguf` node.
    #[arg(long = "node", value_name = "ADDR", required = true)]
    nodes: Vec<NodeAddr>,
    /// Bearer keys HTTP clients must present, one per line (`NAME KEY`);
    /// the file must not be readable by others.
    #[arg(long, value_name = "FILE")]
    api_keys: Option<PathBuf>,
    /// Listen beyond loopback without --api-keys: anyone who reaches the
    /// port uses your donors.
    #[arg(long)]
    insecure: bool,
    /// Secure mode to the donors: the gateway's private key (its .pub line
    /// in each donor's authorized keys); each donor's key is pinned from
    /// known_nodes.
    #[arg(long, value_name = "PATH")]
    key: Option<PathBuf>,
    /// With --key: pin donors not yet in known_nodes on first contact.
    #[arg(long, requires = "key")]
    trust_on_first_use: bool,
    /// Largest request body accepted (bytes, or 1MiB, ...).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "1MiB")]
    max_body: u64,
    /// Seconds a connection may take to send a request's headers, counted
    /// from when the gateway starts waiting for them: an idle keep-alive
    /// connection is closed after it too.
    #[arg(long, value_name = "SECS", value_parser = parse_positive_secs, default_value_t = 10.0)]
    header_timeout: f64,
    /// Seconds a request may take to send its body once its headers are in
    /// (408 past it).
    #[arg(long, value_name = "SECS", value_parser = parse_positive_secs, default_value_t = 30.0)]
    body_timeout: f64,
    /// Most HTTP connections open at once; more are closed as they arrive.
    #[arg(long, value_name = "N", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..).map(|n| n as usize))]
    max_connections: usize,
    /// Most requests of one --api-keys key running at once (429 past it); a
    /// line of the file may set its own with `concurrency=N` after the key.
    #[arg(long, value_name = "N", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..).map(|n| n as usize))]
    key_concurrency: usize,
    /// Serve HTTPS: the certificate chain (PEM), with --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM; not readable by others).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct KeygenArgs {
    /// Where the private key goes (refused if it or PATH.pub exists; missing
    /// folders are created, mode 0700).
    #[arg(value_name = "PATH")]
    path: PathBuf,
    /// The comment after the key in PATH.pub (default: user@host).
    #[arg(long, value_name = "TEXT")]
    comment: Option<String>,
    /// Taken as by every other command, so that scripts may pass it to all;
    /// keygen does not connect, so it waits for nothing.
    #[arg(long, value_name = "SECS", default_value_t = 60.0, value_parser = parse_secs)]
    timeout: f64,
}

/// Which adapter runs the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Runtime {
    /// Blocking threads over std::net (donate-std).
    Std,
    /// async-io / futures-lite (donate-smol).
    Smol,
    /// tokio (donate-tokio).
    Tokio,
}

impl Runtime {
    fn name(self) -> &'static str {
        match self {
            Runtime::Std => "std",
            Runtime::Smol => "smol",
            Runtime::Tokio => "tokio",
        }
    }
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Address to listen on: host:port (port 0 picks a free port; the chosen
    /// address is printed) or unix:/path/node.sock (a stale socket file nothing
    /// listens on is replaced; a live node's is refused).
    #[arg(long, default_value = DEFAULT_ADDR)]
    addr: NodeAddr,
    /// Secure mode: the node's private key (from `donate keygen`). Every
    /// connection must then complete an encrypted, mutually authenticated
    /// handshake with a key listed in --authorized-keys.
    #[arg(long, value_name = "PATH", requires = "authorized_keys")]
    key: Option<PathBuf>,
    /// Secure mode: the client keys let in, one public key per line (`#`
    /// comments and blank lines allowed), re-read for each new connection.
    #[arg(long, value_name = "FILE", requires = "key")]
    authorized_keys: Option<PathBuf>,
    /// Listen on an address other machines can reach without --key: anyone
    /// who reaches it can use the node and read its traffic.
    #[arg(long, conflicts_with = "key")]
    insecure: bool,
    /// What the node offers.
    #[arg(long, default_value = "model_push", value_parser = parse_mode)]
    mode: Mode,
    /// Path announced in hello and named in prompt replies (local_lm nodes).
    #[arg(long, value_name = "P", default_value = "")]
    local_lm_path: String,
    /// Jobs that may wait in the queue.
    #[arg(long, value_name = "N", default_value_t = ServerConfig::default().queue_capacity)]
    queue: usize,
    /// Jobs running at once (default 1, as the Go node; 4 with `--executor
    /// candle`, whose jobs on one model share its forward passes).
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..).map(usize::from))]
    workers: Option<usize>,
    /// Adapter running the node.
    #[arg(long, value_enum, default_value_t = Runtime::Std)]
    runtime: Runtime,
    /// Executor running mounts and jobs: `stub` (the Go node's stub),
    /// `cmd:PROGRAM ARG…` (a pool of worker processes, docs/WORKER-PROTOCOL.md)
    /// or `lm:PROGRAM ARG…` (run per prompt, prompt on stdin; `{path}` and
    /// `{max_out}` are filled in; needs --mode local_lm). Split like a shell
    /// command line, never run through a shell. `candle` (built with
    /// `--features candle`) runs pushed llama models, or with --mode local_lm
    /// the one in --local-lm-path DIR (docs/CANDLE.md). Default: `stub`, or
    /// `candle` with --model.
    #[arg(long, value_name = "EXECUTOR")]
    executor: Option<String>,
    /// Where `--executor candle` runs models: cpu, cuda[:N] or metal[:N]
    /// (the GPUs need the candle-cuda or candle-metal feature).
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    candle_device: String,
    /// `--mode local_lm`: the model answering prompts, run by the candle
    /// executor (which --model implies), a GGUF file (its own tokenizer and
    /// chat template) or a safetensors directory (as --local-lm-path DIR).
    /// Its file name is announced in hello unless --local-lm-path is given.
    /// docs/CANDLE.md.
    #[arg(long, value_name = "FILE|DIR")]
    model: Option<PathBuf>,
    /// `--executor candle`: send prompts to the model as raw text instead of
    /// a user turn rendered with the GGUF file's chat template.
    #[arg(long)]
    raw_prompt: bool,
    /// `--executor candle` sampling for every job: temperature (0 = greedy, the default).
    #[arg(long, value_name = "T", default_value_t = 0.0)]
    temperature: f64,
    /// `--executor candle` sampling: nucleus probability (0 < P <= 1).
    #[arg(long, value_name = "P")]
    top_p: Option<f64>,
    /// `--executor candle` sampling: keep the K most likely tokens.
    #[arg(long, value_name = "K")]
    top_k: Option<usize>,
    /// `--executor candle` sampling: repetition penalty over the last 64 tokens (1 = none).
    #[arg(long, value_name = "R")]
    repeat_penalty: Option<f32>,
    /// `--executor candle` sampling: seed (the same seed gives the same tokens).
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// `--executor candle`: a prompt's reply ends before this text (repeatable).
    #[arg(long, value_name = "TEXT")]
    stop: Vec<String>,
    /// `--executor candle`: threads a model's matrix products use (default:
    /// the cores; a model runs one forward pass at a time, whatever --workers).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..).map(usize::from))]
    candle_threads: Option<usize>,
    /// `--executor candle`: most jobs whose next tokens one forward pass
    /// carries (1: none stacked; a GGUF llama or qwen2 model stacks them).
    #[arg(long, value_name = "N", default_value_t = 16,
          value_parser = clap::value_parser!(u16).range(1..).map(usize::from))]
    candle_batch: usize,
    /// Most tokens one `--executor candle` job generates, whatever it asks for.
    #[arg(long, value_name = "N", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..).map(|n| n as usize))]
    candle_max_tokens: usize,
    /// Most positions (prompt plus reply) an `--executor candle` job may
    /// use, below the model's own context length: bounds each job's KV cache.
    #[arg(long, value_name = "N", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..).map(|n| n as usize))]
    candle_context: usize,
    /// Most memory an `--executor candle` model may need beside its weights
    /// (rotary tables and one job's KV cache at --candle-context); a GGUF
    /// file that needs more is refused before anything is allocated.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "8GiB")]
    candle_runtime_memory: u64,
    /// Most memory a GGUF file's header (metadata, vocabulary, tensor list)
    /// may take once read; a file that needs more is refused before it is read.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "256MiB")]
    candle_metadata_memory: u64,
    /// Seconds a job may run in a cmd: worker or an lm: program before it is
    /// killed, or generate with candle before it is stopped.
    #[arg(long, value_name = "SECS", value_parser = parse_positive_secs, default_value_t = 60.0)]
    job_timeout: f64,
    /// Answer `stats` requests (extension `stats`): any client that can use
    /// the node may then read its counters (`donate status` shows them).
    #[arg(long)]
    stats: bool,
    /// Log lines as `text` (for people) or `json` (one object per line, for
    /// log shippers; span fields such as conn, peer, job and job_id included).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Serve Prometheus metrics (`GET /metrics`) and a health check
    /// (`GET /healthz`: 200, or 503 when draining or the executor failed) on
    /// this host:port, over plain HTTP. A non-loopback address follows the
    /// node's own rule: it needs --key or --insecure.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Seconds any job may take from its receipt to its answer, queue wait
    /// included; a job past it is dropped or cancelled and answered
    /// `deadline_exceeded` (default: no bound).
    #[arg(long, value_name = "SECS", value_parser = parse_positive_secs)]
    max_job_time: Option<f64>,
    /// Seconds a cmd: worker may take to answer once its running job is
    /// cancelled, before it is killed and restarted.
    #[arg(long, value_name = "SECS", value_parser = parse_positive_secs, default_value_t = 2.0)]
    cancel_grace: f64,
    /// Largest job output accepted: a cmd: worker's reply line (default 64 MiB)
    /// or an lm: program's stdout (default 1 MiB).
    #[arg(long, value_name = "BYTES",
          value_parser = clap::value_parser!(u64).range(1..).map(|n| n as usize))]
    max_output: Option<usize>,
    /// Largest frame body accepted, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = ServerConfig::default().max_frame_len,
          value_parser = clap::value_parser!(u32).range(1..).map(|n| n as usize))]
    max_frame: usize,
    /// Largest model (weights_len) accepted, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = ServerConfig::default().max_model_len)]
    max_model: u64,
    /// Connections at once; more are sent an error and closed.
    #[arg(long, value_name = "N", default_value_t = ServerConfig::default().max_connections,
          value_parser = clap::value_parser!(u32).range(1..).map(|n| n as usize))]
    max_connections: usize,
    /// Secure mode: connections still in their handshake at once, apart from
    /// --max-connections; when full, the oldest handshake is closed.
    #[arg(long, value_name = "N", default_value_t = ServerConfig::default().max_handshakes,
          value_parser = clap::value_parser!(u32).range(1..).map(|n| n as usize))]
    max_handshakes: usize,
    /// Secure mode: handshakes at once from one IP address (IPv6: one /64);
    /// more are refused.
    #[arg(long, value_name = "N", default_value_t = ServerConfig::default().max_handshakes_per_source,
          value_parser = clap::value_parser!(u32).range(1..).map(|n| n as usize))]
    max_handshakes_per_source: usize,
    /// Unsent bytes per connection above which its input is paused.
    #[arg(long, value_name = "BYTES", default_value_t = ServerConfig::default().max_outbound)]
    max_outbound: usize,
    /// Seconds allowed from accept to the first complete frame.
    #[arg(long, value_name = "SECS", value_parser = parse_secs,
          default_value_t = ServerConfig::default().handshake_timeout.as_secs_f64())]
    handshake_timeout: f64,
    /// Seconds a partial frame may go without new bytes.
    #[arg(long, value_name = "SECS", value_parser = parse_secs,
          default_value_t = ServerConfig::default().stall_timeout.as_secs_f64())]
    stall_timeout: f64,
    /// Seconds a connection with nothing in flight may stay silent (0 = never).
    #[arg(long, value_name = "SECS", value_parser = parse_secs,
          default_value_t = ServerConfig::default().idle_timeout.map_or(0.0, |d| d.as_secs_f64()))]
    idle_timeout: f64,
    /// Seconds a connection may stay over --max-outbound before it is closed.
    #[arg(long, value_name = "SECS", value_parser = parse_secs,
          default_value_t = ServerConfig::default().backpressure_timeout.as_secs_f64())]
    backpressure_timeout: f64,
    /// Bytes of an upload gathered before a worker takes them (to hash, or to
    /// write to a cmd:/candle executor's file as they arrive).
    #[arg(long, value_name = "BYTES", default_value_t = ServerConfig::default().upload_stretch,
          value_parser = clap::value_parser!(u32).range(1..).map(|n| n as usize))]
    upload_stretch: usize,
    /// Keep pushed models in DIR, named by the SHA-256 of their weights: a
    /// client that pushes the same model again (or after a restart) sends
    /// nothing, a broken upload resumes, and connections share one mounted model.
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
    /// Most bytes the store keeps (models and broken uploads); the least
    /// recently used models not in use are removed to stay under it.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "20GiB", requires = "store")]
    store_max: u64,
    /// Seconds a broken upload's bytes are kept for the client to resume.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value_t = 3600.0, requires = "store")]
    store_partial_ttl: f64,
    /// Seconds an upload may write nothing to the store and keep its hold on
    /// its model and its room: after that, another upload of the same model
    /// takes its place, and uploads that need room may drop it.
    #[arg(long, value_name = "SECS", value_parser = parse_secs,
          default_value_t = donate_host::DEFAULT_UPLOAD_TIMEOUT.as_secs_f64(), requires = "store")]
    store_upload_timeout: f64,
}

impl ServeArgs {
    /// The node's settings from the flags.
    fn config(&self) -> ServerConfig {
        ServerConfig::default()
            .mode(self.mode)
            .local_lm_path(self.announced_path())
            .queue_capacity(self.queue)
            .max_frame_len(self.max_frame)
            .max_model_len(self.max_model)
            .max_connections(self.max_connections)
            .max_handshakes(self.max_handshakes)
            .max_handshakes_per_source(self.max_handshakes_per_source)
            .max_outbound(self.max_outbound)
            .handshake_timeout(Duration::from_secs_f64(self.handshake_timeout))
            .stall_timeout(Duration::from_secs_f64(self.stall_timeout))
            .idle_timeout(
                (self.idle_timeout > 0.0).then(|| Duration::from_secs_f64(self.idle_timeout)),
            )
            .backpressure_timeout(Duration::from_secs_f64(self.backpressure_timeout))
            .upload_stretch(self.upload_stretch)
            .workers(self.workers())
            .max_job_time(self.max_job_time.map(Duration::from_secs_f64))
    }
}

impl ServeArgs {
    /// `--workers`, or its default for the executor.
    fn workers(&self) -> usize {
        match self.workers {
            Some(n) => n,
            None if self.executor() == "candle" => CANDLE_WORKERS,
            None => ServerConfig::default().workers,
        }
    }

    /// `--executor`, or what runs without it: candle for a `--model`, else the stub.
    fn executor(&self) -> &str {
        match (&self.executor, &self.model) {
            (Some(executor), _) => executor,
            (None, Some(_)) => "candle",
            (None, None) => "stub",
        }
    }

    /// What `--executor` names.
    fn executor_spec(&self) -> Result<ExecutorSpec, String> {
        self.executor().parse()
    }

    /// The path hello announces: `--local-lm-path`, else the file name of
    /// `--model` (never the directories above it).
    fn announced_path(&self) -> String {
        match (&self.model, self.local_lm_path.is_empty()) {
            (Some(model), true) => model
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default(),
            _ => self.local_lm_path.clone(),
        }
    }

    /// The `cmd:` worker pool's settings from the flags.
    fn worker_config(&self) -> WorkerConfig {
        let default = WorkerConfig::default();
        WorkerConfig {
            workers: self.workers(),
            job_timeout: Duration::from_secs_f64(self.job_timeout),
            max_line: self.max_output.unwrap_or(default.max_line),
            cancel_grace: Duration::from_secs_f64(self.cancel_grace),
            ..default
        }
    }

    /// The `lm:` executor's settings from the flags.
    fn lm_config(&self) -> LmConfig {
        let default = LmConfig::default();
        LmConfig {
            local_lm_path: self.local_lm_path.clone(),
            timeout: Duration::from_secs_f64(self.job_timeout),
            max_output: self.max_output.unwrap_or(default.max_output),
            ..default
        }
    }
}

/// The node a client command talks to, and how.
#[derive(Debug, clap::Args)]
struct ClientArgs {
    /// Node to talk to: host:port or unix:/path/node.sock.
    #[arg(long, default_value = DEFAULT_ADDR)]
    addr: NodeAddr,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    connect: ConnectArgs,
}

impl std::ops::Deref for ClientArgs {
    type Target = ConnectArgs;

    fn deref(&self) -> &ConnectArgs {
        &self.connect
    }
}

/// How every command that connects does so (one node or a batch's donors):
/// `--timeout` and the secure-mode flags.
#[derive(Debug, clap::Args)]
struct ConnectArgs {
    /// Give up when connecting, or any single read or write, takes longer (seconds; 0 = never).
    #[arg(long, value_name = "SECS", default_value_t = 60.0, value_parser = parse_secs)]
    timeout: f64,
    /// Secure mode: your private key (from `donate keygen`); the node must
    /// list your public key in its authorized keys.
    #[arg(long, value_name = "PATH")]
    key: Option<PathBuf>,
    /// Secure mode: the node's public key or its `SHA256:` fingerprint, pinned.
    #[arg(long, value_name = "KEY", requires = "key", value_parser = parse_node_key)]
    node_key: Option<donate_proto::NodeTrust>,
    /// Secure mode without --node-key: accept the key of a node not yet in
    /// known_nodes and record it there; later connections pin it.
    #[arg(long, requires = "key", conflicts_with = "node_key")]
    trust_on_first_use: bool,
}

#[derive(Debug, clap::Args)]
#[command(group(ArgGroup::new("model_source").required(true).args(["config", "model"])))]
#[command(group(ArgGroup::new("weights_file").args(["weights", "weights_arg"])))]
struct PushArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The model's config (a JSON document, sent as config_json; with --weights).
    #[arg(long, value_name = "FILE", requires = "weights_file")]
    config: Option<PathBuf>,
    /// The weights file, streamed in chunks (with --config).
    #[arg(long, value_name = "FILE", requires = "config")]
    weights: Option<PathBuf>,
    /// The weights file as a bare argument: the older spelling of --weights.
    #[arg(value_name = "WEIGHTS", requires = "config", hide = true)]
    weights_arg: Option<PathBuf>,
    /// A GGUF file (sent with config {"format":"gguf"}), or a directory
    /// holding config.json and model.safetensors.
    #[arg(long, value_name = "FILE|DIR", conflicts_with_all = ["config", "weights_file"])]
    model: Option<PathBuf>,
    /// Hash the weights first and send weights_sha256, so the node verifies
    /// them (always done for a node with a model store).
    #[arg(long)]
    sha256: bool,
}

#[derive(Debug, clap::Args)]
#[command(mut_arg("node_key", |a| a.help(
    "Secure mode: the key every donor must present (its public key or SHA256: fingerprint), \
     instead of each donor's in known_nodes")))]
#[command(mut_arg("trust_on_first_use", |a| a.help(
    "Secure mode: accept donors whose keys are not in known_nodes (not recorded: \
     `donate status --trust-on-first-use` records one)")))]
struct BatchArgs {
    /// A donor (repeatable): host:port or unix:/path/node.sock.
    #[arg(long = "node", value_name = "ADDR", required = true)]
    nodes: Vec<NodeAddr>,
    #[command(flatten)]
    connect: ConnectArgs,
    #[command(flatten)]
    sampling: sampling::SamplingArgs,
    /// The model's config, for infer jobs (with --weights).
    #[arg(long, value_name = "FILE", requires = "weights")]
    config: Option<PathBuf>,
    /// The weights file (with --config): each donor mounts it, pushed only where it is missing.
    #[arg(long, value_name = "FILE", requires = "config")]
    weights: Option<PathBuf>,
    /// A GGUF file (sent with config {"format":"gguf"}), or a directory
    /// holding config.json and model.safetensors.
    #[arg(long, value_name = "FILE|DIR", conflicts_with_all = ["config", "weights"])]
    model: Option<PathBuf>,
    /// Jobs, one JSON object per line: {"job_id":…, "input_ids":[…], "max_tokens":n}
    /// or {"job_id":…, "prompt":"…", "max_out":n}.
    #[arg(long, value_name = "FILE")]
    input: PathBuf,
    /// Where results go, one JSON object per job (default: stdout).
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Seconds a job may be in flight on one donor before that donor counts
    /// as stalled and its jobs go to others.
    #[arg(long, value_name = "SECS", value_parser = parse_positive_secs, default_value_t = 60.0)]
    job_deadline: f64,
    /// Times a job is sent again after donor failures before it fails.
    #[arg(long, value_name = "N", default_value_t = 5)]
    max_attempts: u32,
}

impl BatchArgs {
    /// The model files, when the batch has a model.
    fn model_files(&self) -> Option<(ModelConfig, PathBuf)> {
        (self.model.is_some() || self.config.is_some())
            .then(|| model_files(&self.model, &self.config, &self.weights))
    }
}

#[derive(Debug, clap::Args)]
struct ModelsArgs {
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, clap::Args)]
#[command(group(ArgGroup::new("model_source").required(true).args(["config", "model"])))]
struct InferArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The model's config (with --weights).
    #[arg(long, value_name = "FILE", requires = "weights")]
    config: Option<PathBuf>,
    /// The weights file (with --config).
    #[arg(long, value_name = "FILE", requires = "config")]
    weights: Option<PathBuf>,
    /// A GGUF file (sent with config {"format":"gguf"}), or a directory
    /// holding config.json and model.safetensors.
    #[arg(long, value_name = "FILE|DIR", conflicts_with_all = ["config", "weights"])]
    model: Option<PathBuf>,
    /// Input token ids, comma separated.
    #[arg(
        long,
        value_name = "1,2,3",
        value_delimiter = ',',
        required = true,
        allow_negative_numbers = true
    )]
    ids: Vec<i32>,
    /// Tokens to generate (0 = the node's default).
    #[arg(long, value_name = "N", default_value_t = 0)]
    max_tokens: i64,
    /// Send weights_sha256 with the upload (always done for a node with a model store).
    #[arg(long)]
    sha256: bool,
    /// Print the generated tokens as text, decoded with the --model's own
    /// tokenizer (a build with --features candle).
    #[arg(long, requires = "model")]
    decode: bool,
    #[command(flatten)]
    sampling: sampling::SamplingArgs,
}

impl InferArgs {
    /// The config and weights files to push.
    fn model_files(&self) -> (ModelConfig, PathBuf) {
        model_files(&self.model, &self.config, &self.weights)
    }
}

impl PushArgs {
    /// The config and weights files to push.
    fn model_files(&self) -> (ModelConfig, PathBuf) {
        let weights = self.weights.clone().or_else(|| self.weights_arg.clone());
        model_files(&self.model, &self.config, &weights)
    }
}

/// Where a pushed model's `config_json` comes from.
#[derive(Debug, PartialEq, Eq)]
enum ModelConfig {
    /// A JSON file (`--config`, or config.json in a `--model` directory).
    File(PathBuf),
    /// `--model FILE.gguf`: `{"format":"gguf"}`.
    Gguf,
}

impl ModelConfig {
    /// The `config_json` to send with `weights`; a `--model` file that is not
    /// GGUF is refused here, before anything is sent.
    fn read(&self, weights: &Path) -> Result<String, String> {
        match self {
            ModelConfig::File(path) => std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read config {}: {e}", path.display())),
            ModelConfig::Gguf => {
                let mut magic = [0u8; 4];
                std::fs::File::open(weights)
                    .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
                    .map_err(|e| format!("cannot read {}: {e}", weights.display()))?;
                if &magic != b"GGUF" {
                    return Err(format!(
                        "{} is neither a GGUF file nor a directory holding config.json and model.safetensors",
                        weights.display()
                    ));
                }
                Ok(r#"{"format":"gguf"}"#.to_owned())
            }
        }
    }
}

/// `--model FILE.gguf`, `--model DIR` (DIR/config.json, DIR/model.safetensors)
/// or `--config` with the weights.
fn model_files(
    model: &Option<PathBuf>,
    config: &Option<PathBuf>,
    weights: &Option<PathBuf>,
) -> (ModelConfig, PathBuf) {
    match (model, config, weights) {
        (Some(dir), _, _) if dir.is_dir() => (
            ModelConfig::File(dir.join("config.json")),
            dir.join("model.safetensors"),
        ),
        (Some(file), _, _) => (ModelConfig::Gguf, file.clone()),
        (None, Some(config), Some(weights)) => (ModelConfig::File(config.clone()), weights.clone()),
        _ => unreachable!("clap requires --model or --config with the weights"),
    }
}

#[derive(Debug, clap::Args)]
struct PromptArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Output limit (0 = the node's default).
    #[arg(long, value_name = "N", default_value_t = 0)]
    max_out: i64,
    /// The prompt text (`-`: read it from stdin).
    #[arg(value_name = "TEXT")]
    text: String,
    /// A system message before the prompt, through the model's chat
    /// template (needs a node offering the `chat` extension).
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
    #[command(flatten)]
    sampling: sampling::SamplingArgs,
}

#[derive(Debug, clap::Args)]
struct ChatArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Output limit per answer (0 = the node's default).
    #[arg(long, value_name = "N", default_value_t = 0)]
    max_out: i64,
    /// A system message opening the conversation.
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
    #[command(flatten)]
    sampling: sampling::SamplingArgs,
}

#[derive(Debug, clap::Args)]
struct StatusArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Several donors (repeatable, instead of --addr): one table row each,
    /// unreachable ones included.
    #[arg(long = "node", value_name = "ADDR")]
    nodes: Vec<NodeAddr>,
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    s.parse()
}

/// A size like `20GiB`, `512MiB`, `1.5GB` or `1000000` (bytes).
fn parse_size(s: &str) -> Result<u64, String> {
    let text = s.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a size (like 20GiB, 512MiB or 1000000)"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown size unit {other:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB)"
            ))
        }
    };
    let bytes = number * scale;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("{s:?} is not a size of at least one byte"));
    }
    Ok(bytes as u64)
}

fn parse_positive_secs(s: &str) -> Result<f64, String> {
    let secs = parse_secs(s)?;
    if secs > 0.0 {
        Ok(secs)
    } else {
        Err("must be more than 0 seconds".to_owned())
    }
}

/// `--node-key`: a malformed key is a usage error, caught before connecting.
fn parse_node_key(text: &str) -> Result<donate_proto::NodeTrust, String> {
    donate_proto::NodeTrust::pin(text).map_err(|e| e.to_string())
}

fn parse_secs(s: &str) -> Result<f64, String> {
    let secs: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if !secs.is_finite() || secs < 0.0 || Duration::try_from_secs_f64(secs).is_err() {
        return Err(format!("{s} is not a number of seconds"));
    }
    Ok(secs)
}

/// A failure to report as `donate: <message>` with a non-zero exit status.
#[derive(Debug)]
struct Failure {
    message: String,
    code: u8,
}

impl Failure {
    fn with_code(message: impl Into<String>, code: u8) -> Self {
        Failure {
            message: message.into(),
            code,
        }
    }
}

impl<T: std::fmt::Display> From<T> for Failure {
    fn from(message: T) -> Self {
        Failure::with_code(message.to_string(), exit::FAILURE)
    }
}

type CliResult = Result<(), Failure>;

/// How `donate serve` writes its log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

fn init_logging(default: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Serve(args) => init_logging("info", args.log_format),
        Command::Gateway(_) => init_logging("info", LogFormat::Text),
        _ => init_logging("warn", LogFormat::Text),
    }
    let result = match cli.command {
        Command::Serve(args) => serve::run(*args),
        Command::Push(args) => commands::push(args),
        Command::Infer(args) => commands::infer(args),
        Command::Prompt(args) => commands::prompt(args),
        Command::Chat(args) => commands::chat(args),
        Command::Status(args) => commands::status(args),
        Command::Models(args) => commands::models(args),
        Command::Batch(args) => batch::run(args),
        Command::Keygen(args) => secure::keygen(args),
        Command::Gateway(args) => gateway::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { message, code }) => {
            eprintln!("donate: {message}");
            ExitCode::from(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_defaults_are_the_core_defaults() {
        let Cli {
            command: Command::Serve(args),
        } = Cli::parse_from(["donate", "serve"])
        else {
            panic!("not serve");
        };
        assert_eq!(args.addr.to_string(), DEFAULT_ADDR);
        assert_eq!(args.runtime, Runtime::Std);
        assert_eq!(args.config(), ServerConfig::default());
    }

    #[test]
    fn workers_default_to_one_and_to_four_on_candle() {
        let workers = |argv: &[&str]| {
            let Cli {
                command: Command::Serve(args),
            } = Cli::parse_from(argv)
            else {
                panic!("not serve");
            };
            args.config().workers
        };
        assert_eq!(workers(&["donate", "serve"]), 1);
        assert_eq!(workers(&["donate", "serve", "--executor", "candle"]), 4);
        let two = ["donate", "serve", "--executor", "candle", "--workers", "2"];
        assert_eq!(workers(&two), 2);
    }

    #[test]
    fn serve_limits_map_onto_the_config() {
        let Cli {
            command: Command::Serve(args),
        } = Cli::parse_from([
            "donate",
            "serve",
            "--mode",
            "local_lm",
            "--local-lm-path",
            "/m",
            "--queue",
            "3",
            "--workers",
            "2",
            "--max-frame",
            "1000",
            "--max-model",
            "2000",
            "--max-connections",
            "5",
            "--max-handshakes",
            "7",
            "--max-handshakes-per-source",
            "2",
            "--max-outbound",
            "4096",
            "--handshake-timeout",
            "1.5",
            "--stall-timeout",
            "2",
            "--idle-timeout",
            "0",
            "--backpressure-timeout",
            "3",
            "--upload-stretch",
            "65536",
        ])
        else {
            panic!("not serve");
        };
        let config = args.config();
        assert_eq!(config.mode, Mode::LocalLm);
        assert_eq!(config.local_lm_path, "/m");
        assert_eq!((config.queue_capacity, config.workers), (3, 2));
        assert_eq!((config.max_frame_len, config.max_model_len), (1000, 2000));
        assert_eq!((config.max_connections, config.max_outbound), (5, 4096));
        assert_eq!(
            (config.max_handshakes, config.max_handshakes_per_source),
            (7, 2)
        );
        assert_eq!(config.handshake_timeout, Duration::from_millis(1500));
        assert_eq!(config.stall_timeout, Duration::from_secs(2));
        assert_eq!(config.idle_timeout, None);
        assert_eq!(config.backpressure_timeout, Duration::from_secs(3));
        assert_eq!(config.upload_stretch, 65536);
    }

    #[test]
    fn executor_flags_map_onto_the_executor_configs() {
        let serve = |extra: &[&str]| {
            let Cli {
                command: Command::Serve(args),
            } = Cli::parse_from(["donate", "serve"].iter().chain(extra))
            else {
                panic!("not serve");
            };
            args
        };
        let args = serve(&[]);
        assert_eq!(args.executor_spec(), Ok(ExecutorSpec::Stub));
        assert_eq!(args.worker_config(), WorkerConfig::default());
        assert_eq!(args.lm_config(), LmConfig::default());

        let args = serve(&[
            "--executor",
            "cmd:python3 'my worker.py' $(x)",
            "--workers",
            "3",
            "--job-timeout",
            "2.5",
            "--max-output",
            "1000",
        ]);
        assert_eq!(
            args.executor_spec(),
            Ok(ExecutorSpec::Cmd(vec![
                "python3".into(),
                "my worker.py".into(),
                "$(x)".into()
            ]))
        );
        for bad in ["gpu", "cmd:", "lm:'unclosed"] {
            assert!(
                serve(&["--executor", bad]).executor_spec().is_err(),
                "{bad}"
            );
        }
        let workers = args.worker_config();
        assert_eq!(workers.workers, 3);
        assert_eq!(workers.job_timeout, Duration::from_millis(2500));
        assert_eq!(workers.max_line, 1000);

        let args = serve(&[
            "--mode",
            "local_lm",
            "--local-lm-path",
            "/m",
            "--executor",
            "lm:llama-cli -m {path} -n {max_out}",
            "--max-output",
            "77",
        ]);
        assert!(matches!(args.executor_spec(), Ok(ExecutorSpec::Lm(argv)) if argv[2] == "{path}"));
        let lm = args.lm_config();
        assert_eq!((lm.local_lm_path.as_str(), lm.max_output), ("/m", 77));
        assert_eq!(lm.timeout, Duration::from_secs(60));
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for args in [
            &["donate", "serve", "--mode", "gpu"][..],
            &["donate", "serve", "--workers", "0"],
            &["donate", "serve", "--runtime", "async-std"],
            &["donate", "serve", "--stall-timeout", "-1"],
            &["donate", "serve", "--job-timeout", "0"],
            &["donate", "serve", "--max-output", "0"],
            &["donate", "infer", "--ids", "1,x", "--model", "m"],
            &["donate", "infer", "--ids", "1"],
            &["donate", "infer", "--ids", "1", "--config", "c"],
            &[
                "donate",
                "infer",
                "--ids",
                "1",
                "--model",
                "m",
                "--weights",
                "w",
            ],
            &["donate", "push", "w"],
            &["donate", "push", "--config", "c"],
            &["donate", "push", "--model", "m", "w"],
            &["donate", "push", "--model", "m", "--config", "c", "w"],
            &["donate", "push", "--model", "m", "--weights", "w"],
            &["donate", "push", "--config", "c", "--weights", "w", "w2"],
            &[
                "donate",
                "batch",
                "--node",
                "a:1",
                "--input",
                "i",
                "--node-key",
                "SHA256:x",
            ],
            &["donate", "serve", "--candle-max-tokens", "0"],
            &["donate", "serve", "--key", "k"],
            &[
                "donate",
                "serve",
                "--key",
                "k",
                "--authorized-keys",
                "a",
                "--insecure",
            ],
            &["donate", "status", "--node-key", "SHA256:x"],
            &["donate", "status", "--trust-on-first-use"],
            &["donate", "keygen"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?} parsed");
        }
    }

    #[test]
    fn push_takes_a_model_dir_or_config_and_weights() {
        let push = |args: &[&str]| {
            let Cli {
                command: Command::Push(args),
            } = Cli::parse_from(["donate", "push"].iter().chain(args))
            else {
                panic!("not push");
            };
            args.model_files()
        };
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().to_str().unwrap();
        assert_eq!(
            push(&["--model", m]),
            (
                ModelConfig::File(dir.path().join("config.json")),
                dir.path().join("model.safetensors")
            )
        );
        assert_eq!(
            push(&["--model", "m.gguf"]),
            (ModelConfig::Gguf, PathBuf::from("m.gguf"))
        );
        for args in [
            &["--config", "c.json", "w.bin"][..],
            &["--config", "c.json", "--weights", "w.bin"],
        ] {
            assert_eq!(
                push(args),
                (
                    ModelConfig::File(PathBuf::from("c.json")),
                    PathBuf::from("w.bin")
                )
            );
        }
        // A file that is not GGUF is refused before anything is sent.
        let not_gguf = dir.path().join("w.safetensors");
        std::fs::write(&not_gguf, b"{}  ").unwrap();
        let why = ModelConfig::Gguf.read(&not_gguf).unwrap_err();
        assert!(why.contains("neither a GGUF file"), "{why}");
        let gguf = dir.path().join("m.gguf");
        std::fs::write(&gguf, b"GGUF\x03\0\0\0").unwrap();
        assert_eq!(
            ModelConfig::Gguf.read(&gguf).unwrap(),
            r#"{"format":"gguf"}"#
        );
    }

    #[test]
    fn a_model_means_candle_and_is_announced_by_its_file_name() {
        let serve = |extra: &[&str]| {
            let Cli {
                command: Command::Serve(args),
            } = Cli::parse_from(
                ["donate", "serve", "--mode", "local_lm"]
                    .iter()
                    .chain(extra),
            )
            else {
                panic!("not serve");
            };
            args
        };
        let args = serve(&["--model", "/srv/models/m.gguf"]);
        assert_eq!(args.executor(), "candle");
        assert_eq!(args.config().local_lm_path, "m.gguf");
        assert_eq!(args.config().workers, CANDLE_WORKERS);
        let args = serve(&["--model", "/srv/m.gguf", "--local-lm-path", "/m"]);
        assert_eq!(args.config().local_lm_path, "/m");
        assert_eq!(serve(&[]).executor(), "stub");
    }

    #[test]
    fn candle_flags_have_defaults() {
        let Cli {
            command: Command::Serve(args),
        } = Cli::parse_from(["donate", "serve", "--executor", "candle"])
        else {
            panic!("not serve");
        };
        assert_eq!(args.executor(), "candle");
        assert_eq!(
            (args.candle_device.as_str(), args.candle_max_tokens),
            ("cpu", 256)
        );
        #[cfg(feature = "candle")]
        {
            let defaults = donate_candle::ModelLimits::default();
            assert_eq!(
                (
                    args.candle_context,
                    args.candle_runtime_memory,
                    args.candle_metadata_memory
                ),
                (
                    defaults.context,
                    defaults.runtime_bytes,
                    defaults.metadata_bytes
                )
            );
        }
    }

    #[test]
    fn infer_model_dir_names_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().to_str().unwrap();
        let Cli {
            command: Command::Infer(args),
        } = Cli::parse_from(["donate", "infer", "--model", m, "--ids", "1,-2,3"])
        else {
            panic!("not infer");
        };
        assert_eq!(args.ids, [1, -2, 3]);
        assert_eq!(
            args.model_files(),
            (
                ModelConfig::File(dir.path().join("config.json")),
                dir.path().join("model.safetensors")
            )
        );
    }
}
