//! The client subcommands: `push`, `infer`, `prompt`, `status`.
//!
//! Output is human-readable by default. With `--json`, stdout gets exactly one
//! JSON object whenever the node answered: the result frame as received for
//! `infer` and `prompt` (the `error` frame when the job was refused), the push
//! report for `push`, `{"hello", "queue_status"}` for `status`. Every failure
//! is one line on stderr and a non-zero exit.

use std::fs::File;
use std::io::{IsTerminal, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use donate_proto::message::{ModelStatus, QueueStatus};
use donate_proto::Message;
use donate_std::{Client, Error};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use donate_proto::{ClientConfig, NodeTrust, PartialOutput, SecureClientConfig};

use crate::secure::{self, Trust};
use crate::{exit, CliResult, ClientArgs, Failure, InferArgs, PromptArgs, PushArgs, StatusArgs};

/// `donate push`: upload a model and report whether it mounted.
pub fn push(args: PushArgs) -> CliResult {
    let (config, weights) = args.model_files();
    let mut model = Model::open(&config, &weights)?;
    let sha256 = args.sha256.then(|| model.sha256()).transpose()?;
    let mut client = connect(&args.client)?;
    let pushed = upload(&mut client, &mut model, sha256, true);
    let report = PushReport::new(&pushed);
    if args.client.json {
        if let Some(report) = &report {
            print_json(&serde_json::to_vec(report).expect("a push report serializes"))?;
        }
    } else if let Some(report) = report.as_ref().filter(|r| r.ok) {
        println!(
            "{}: {} bytes in {:.2} s ({:.1} MiB/s)",
            report.message, report.bytes, report.seconds, report.mib_s
        );
    }
    pushed
        .result
        .map_err(|e| push_failure(&args.client, &client, e))?;
    Ok(())
}

/// `donate infer`: push the model, then run one job on it over the same connection.
pub fn infer(args: InferArgs) -> CliResult {
    let (config, weights) = args.model_files();
    let mut model = Model::open(&config, &weights)?;
    let sha256 = args.sha256.then(|| model.sha256()).transpose()?;
    let mut client = connect(&args.client)?;
    upload(&mut client, &mut model, sha256, true)
        .result
        .map_err(|e| push_failure(&args.client, &client, e))?;
    let result = client.infer_with(&args.ids, args.max_tokens, &args.sampling.params());
    let answer = match &result {
        Ok(r) | Err(Error::InferFailed(r)) => Some(Message::InferResult(r.clone())),
        Err(Error::Refused(e)) => Some(Message::Error(e.clone())),
        Err(_) => None,
    };
    if args.client.json {
        if let Some(answer) = answer {
            print_json(&answer.to_json())?;
        }
    }
    let result = result.map_err(|e| failed(&args.client, "", &e))?;
    if !args.client.json {
        let ids: Vec<String> = result.output_ids.iter().map(i32::to_string).collect();
        println!("{}", ids.join(","));
    }
    Ok(())
}

/// `donate prompt`: send a prompt to a local_lm node and print the reply.
pub fn prompt(args: PromptArgs) -> CliResult {
    let mut client = connect(&args.client)?;
    let mut streamed = String::new();
    let result = client
        .send_prompt_with(&args.text, args.max_out, &args.sampling.params())
        .and_then(|request| {
            // Partial text (extension `stream`) is printed as it arrives,
            // unless stdout must hold exactly one JSON object.
            let answer = client.wait_streaming(request, |partial| {
                if let (false, PartialOutput::Text(text)) = (args.client.json, partial) {
                    print!("{text}");
                    let _ = std::io::stdout().flush();
                    streamed.push_str(&text);
                }
            })?;
            donate_std::answers::prompt(answer)
        });
    let answer = match &result {
        Ok(r) | Err(Error::PromptFailed(r)) => Some(Message::PromptResult(r.clone())),
        Err(Error::Refused(e)) => Some(Message::Error(e.clone())),
        Err(_) => None,
    };
    if args.client.json {
        if let Some(answer) = answer {
            print_json(&answer.to_json())?;
        }
    }
    if result.is_err() && !streamed.is_empty() {
        println!();
    }
    let result = result.map_err(|e| failed(&args.client, "", &e))?;
    if !args.client.json {
        // The final text is the authority: whatever the partials left out.
        match result.text.strip_prefix(streamed.as_str()) {
            Some(rest) => println!("{rest}"),
            None => println!("\n{}", result.text),
        }
    }
    Ok(())
}

/// `donate status`: the node's hello and, when it answers one, its queue status.
pub fn status(args: StatusArgs) -> CliResult {
    let mut client = connect(&args.client)?;
    let hello = client.hello().clone();
    let queue = client
        .queue_status()
        .map_err(|e| failed(&args.client, "queue_status failed", &e))?;
    if args.client.json {
        let queue_json =
            queue.map_or_else(|| b"null".to_vec(), |q| Message::QueueStatus(q).to_json());
        let mut out = b"{\"hello\":".to_vec();
        out.extend(Message::Hello(hello).to_json());
        out.extend(b",\"queue_status\":");
        out.extend(queue_json);
        out.push(b'}');
        return print_json(&out);
    }
    println!("node:    {}", args.client.addr);
    println!("mode:    {}", hello.mode);
    if !hello.local_lm_path.is_empty() {
        println!("local_lm_path: {}", hello.local_lm_path);
    }
    match queue {
        Some(QueueStatus {
            depth,
            capacity,
            in_progress,
        }) => println!(
            "queue:   {depth} waiting of {capacity}, {}",
            if in_progress { "a job running" } else { "idle" }
        ),
        None if hello.queue_capacity > 0 => println!(
            "queue:   capacity {} (the node does not report its depth)",
            hello.queue_capacity
        ),
        None => println!("queue:   not reported by the node"),
    }
    Ok(())
}

/// Connects as the flags say: in plain text, or with `--key` in secure mode,
/// trusting the node's key from `--node-key`, `known_nodes` or (recording it)
/// `--trust-on-first-use`.
fn connect(args: &ClientArgs) -> Result<Client, Failure> {
    let timeout = (args.timeout > 0.0).then(|| std::time::Duration::from_secs_f64(args.timeout));
    let cannot_connect = |e: Error, trust: Option<&Trust>| {
        if let Some((message, code)) = secure::classify(&e, &args.addr, trust) {
            return Failure::with_code(message, code);
        }
        match e {
            // The error names the address already.
            Error::Connect { .. } => Failure::from(format!("cannot connect: {e}")),
            e => Failure::from(format!("cannot connect to {}: {e}", args.addr)),
        }
    };
    let Some(key_path) = &args.key else {
        let client = match timeout {
            Some(timeout) => Client::connect_timeout(&args.addr, timeout),
            None => Client::connect(&args.addr),
        }
        .map_err(|e| cannot_connect(e, None))?;
        if client.hello().capabilities.iter().any(|c| c == "secure") {
            return Err(Failure::with_code(
                format!(
                    "the node at {} requires an encrypted connection (donate secure mode): use --key PATH (and --node-key KEY)",
                    args.addr
                ),
                exit::SECURE_REQUIRED,
            ));
        }
        return Ok(client);
    };
    let keypair = secure::load_keypair(key_path)?;
    let addr = args.addr.to_string();
    let trust = match &args.node_key {
        Some(key) => Trust::Given(NodeTrust::pin(key).map_err(|e| format!("--node-key: {e}"))?),
        None => {
            let file = secure::known_nodes_path().ok_or(
                "cannot find your config directory for known_nodes: set HOME or XDG_CONFIG_HOME, or pass --node-key",
            )?;
            match secure::known_node(&file, &addr)? {
                Some(key) => Trust::Known {
                    trust: NodeTrust::pin(&key.fingerprint()).map_err(|e| e.to_string())?,
                    file,
                },
                None if args.trust_on_first_use => Trust::FirstUse(file),
                None => Trust::Unknown,
            }
        }
    };
    let secure_config = SecureClientConfig {
        keypair,
        trust: trust.node_trust(),
    };
    let client =
        Client::connect_secure(&args.addr, ClientConfig::default(), secure_config, timeout)
            .map_err(|e| cannot_connect(e, Some(&trust)))?;
    if let (Trust::FirstUse(file), Some(key)) = (&trust, client.node_key()) {
        secure::record_node(file, &addr, key)?;
    }
    Ok(client)
}

/// A failed call after connecting: `what` and the error, with the exit
/// status of a secure-mode failure when it is one.
fn failed(args: &ClientArgs, what: &str, e: &Error) -> Failure {
    match secure::classify(e, &args.addr, None) {
        Some((message, code)) => Failure::with_code(message, code),
        None if what.is_empty() => Failure::from(e),
        None => Failure::from(format!("{what}: {e}")),
    }
}

/// A model's config and an open weights file, streamed on upload.
struct Model {
    config_json: String,
    weights_path: PathBuf,
    weights: File,
    len: u64,
}

impl Model {
    fn open(config: &Path, weights: &Path) -> Result<Model, Failure> {
        let config_json = std::fs::read_to_string(config)
            .map_err(|e| format!("cannot read config {}: {e}", config.display()))?;
        let cannot = |e: std::io::Error| format!("cannot read weights {}: {e}", weights.display());
        let file = File::open(weights).map_err(cannot)?;
        let meta = file.metadata().map_err(cannot)?;
        if !meta.is_file() {
            return Err(format!("weights {} is not a file", weights.display()).into());
        }
        Ok(Model {
            config_json,
            weights_path: weights.to_owned(),
            weights: file,
            len: meta.len(),
        })
    }

    /// SHA-256 of the weights file, read in pieces, with a bar on a terminal.
    fn sha256(&mut self) -> Result<[u8; 32], Failure> {
        let bar = progress_bar(self.len, "hashing");
        let hash = donate_std::sha256_of_reader(bar.wrap_read(&self.weights))
            .and_then(|hash| self.weights.rewind().map(|()| hash))
            .map_err(|e| format!("cannot hash {}: {e}", self.weights_path.display()))?;
        bar.finish_and_clear();
        Ok(hash)
    }
}

/// An upload's outcome and how long it took.
struct Pushed {
    result: Result<ModelStatus, Error>,
    bytes: u64,
    seconds: f64,
}

/// Streams `model` to the node and waits for it to be mounted.
fn upload(client: &mut Client, model: &mut Model, sha256: Option<[u8; 32]>, bar: bool) -> Pushed {
    let bar = if bar {
        progress_bar(model.len, "pushing")
    } else {
        ProgressBar::hidden()
    };
    let start = Instant::now();
    let mut bytes = 0;
    let result = client.push_model_from(
        &model.config_json,
        &model.weights,
        model.len,
        sha256,
        |sent| {
            bytes = sent;
            bar.set_position(sent);
        },
    );
    bar.finish_and_clear();
    Pushed {
        result,
        bytes,
        seconds: start.elapsed().as_secs_f64(),
    }
}

/// `push --json`: `{"ok", "message", "bytes", "seconds", "mib_s"}`.
#[derive(Debug, Serialize)]
struct PushReport {
    ok: bool,
    message: String,
    bytes: u64,
    seconds: f64,
    mib_s: f64,
}

impl PushReport {
    /// The report of an upload the node answered; `None` when it did not answer.
    fn new(pushed: &Pushed) -> Option<PushReport> {
        let (ok, message) = match &pushed.result {
            Ok(status) => (true, status.message.clone()),
            Err(Error::ModelRefused(message)) => (false, message.clone()),
            Err(Error::Refused(frame)) => (false, frame.error.clone()),
            Err(_) => return None,
        };
        let mib = pushed.bytes as f64 / (1024.0 * 1024.0);
        Some(PushReport {
            ok,
            message,
            bytes: pushed.bytes,
            seconds: pushed.seconds,
            mib_s: if pushed.seconds > 0.0 {
                mib / pushed.seconds
            } else {
                0.0
            },
        })
    }
}

/// A failed upload, with a hint when the node refused it for its mode.
fn push_failure(args: &ClientArgs, client: &Client, e: Error) -> Failure {
    if let Some((message, code)) = secure::classify(&e, &args.addr, None) {
        return Failure::with_code(message, code);
    }
    let hint = match (&e, client.hello().mode.as_str()) {
        (Error::Refused(_), "local_lm") => {
            " (this node is local_lm: send prompts with `donate prompt`)"
        }
        _ => "",
    };
    format!("push failed: {e}{hint}").into()
}

/// A bytes / MB/s / ETA bar on stderr when stderr is a terminal, else hidden.
fn progress_bar(len: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:8} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

/// Writes one JSON object and a newline to stdout.
fn print_json(json: &[u8]) -> CliResult {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(json)
        .and_then(|()| stdout.write_all(b"\n"))
        .and_then(|()| stdout.flush())
        .map_err(|e| format!("cannot write to stdout: {e}"))?;
    Ok(())
}
