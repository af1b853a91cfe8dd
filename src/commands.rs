//! The client subcommands: `push`, `infer`, `prompt`, `chat`, `status`, `models`.
//!
//! Output is human-readable by default. With `--json`, stdout gets exactly one
//! JSON object whenever the node answered: the result frame as received for
//! `infer` and `prompt` (the `error` frame when the job was refused), the push
//! report for `push`, `{"hello", "queue_status"}` for `status`. Every failure
//! is one line on stderr and a non-zero exit.

use std::fs::File;
use std::io::{IsTerminal, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use donate_host::NodeAddr;
use donate_proto::message::{ModelStatus, PromptResult, QueueStatus, MAX_MODEL_NAME};
use donate_proto::{Answer, ApiMisuse, ChatMessage, Message, PromptRequest, RequestId};
use donate_std::{Client, Error};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use donate_proto::{Capability, ClientConfig, NodeTrust, PartialOutput, SecureClientConfig};

use crate::secure::{self, Trust};
use crate::{
    exit, ChatArgs, CliResult, ClientArgs, Failure, InferArgs, ModelsArgs, PromptArgs, PushArgs,
    StatusArgs,
};

/// `donate push`: upload a model and report whether it mounted.
pub fn push(args: PushArgs) -> CliResult {
    let (config, weights) = args.model_files();
    let mut model = Model::open(config.read(&weights)?, &weights)?;
    let mut client = connect(&args.client)?;
    let pushed = upload(&mut client, &mut model, args.sha256, true)?;
    let report = PushReport::new(&pushed);
    if args.client.json {
        if let Some(report) = &report {
            print_json(&serde_json::to_vec(report).expect("a push report serializes"))?;
        }
    } else if let Some(report) = report.as_ref().filter(|r| r.ok) {
        let how = if report.reused {
            " (the node held it: no weights sent)".to_owned()
        } else if report.resumed_from > 0 {
            format!(" (resumed at byte {})", report.resumed_from)
        } else {
            String::new()
        };
        println!(
            "{}: {} bytes in {:.2} s ({:.1} MiB/s){how}",
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
    if args.decode && cfg!(not(feature = "candle")) {
        return Err(
            "--decode needs donate built with --features candle (it reads the model's tokenizer)"
                .into(),
        );
    }
    let (config, weights) = args.model_files();
    let mut model = Model::open(config.read(&weights)?, &weights)?;
    let mut client = connect(&args.client)?;
    upload(&mut client, &mut model, args.sha256, true)?
        .result
        .map_err(|e| push_failure(&args.client, &client, e))?;
    let result = client
        .send_infer_with(&args.ids, args.max_tokens, &args.sampling.params())
        .and_then(|request| given_up(&mut client, request))
        .and_then(donate_host::answers::infer);
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
    if args.client.json {
        return Ok(());
    }
    match (args.decode, &args.model) {
        (true, Some(model)) => {
            // The output is the input ids followed by the generated ones.
            let generated = result.output_ids.get(args.ids.len()..).unwrap_or_default();
            println!("{}", decode(model, generated)?);
        }
        _ => {
            let ids: Vec<String> = result.output_ids.iter().map(i32::to_string).collect();
            println!("{}", ids.join(","));
        }
    }
    Ok(())
}

#[cfg(feature = "candle")]
fn decode(model: &Path, ids: &[i32]) -> Result<String, Failure> {
    let ids = ids
        .iter()
        .map(|&id| u32::try_from(id).map_err(|_| format!("cannot decode token id {id}")))
        .collect::<Result<Vec<u32>, String>>()?;
    donate_candle::decode_ids(model, &ids).map_err(|e| format!("cannot decode: {e}").into())
}

#[cfg(not(feature = "candle"))]
fn decode(_: &Path, _: &[i32]) -> Result<String, Failure> {
    unreachable!("infer refused --decode without the candle feature")
}

/// `donate prompt`: send a prompt to a local_lm node and print the reply.
pub fn prompt(args: PromptArgs) -> CliResult {
    let text = match args.text.as_str() {
        "-" => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .map_err(|e| format!("cannot read the prompt from stdin: {e}"))?;
            // `echo … |` ends the text with a line break that is not the prompt's.
            let end = text.strip_suffix('\n').unwrap_or(&text);
            end.strip_suffix('\r').unwrap_or(end).to_owned()
        }
        _ => args.text.clone(),
    };
    let mut client = connect_for_prompts(&args.client)?;
    let mut request = match &args.system {
        Some(system) => PromptRequest::chat(
            vec![
                ChatMessage::new("system", system),
                ChatMessage::new("user", &text),
            ],
            args.max_out,
        ),
        None => PromptRequest::text(&text, args.max_out),
    };
    request.sampling = args.sampling.params();
    ask(&mut client, &args.client, &request).map(|_| ())
}

/// `donate chat`: a conversation, a line per turn, each answer streamed;
/// the whole conversation goes to the node each turn (extension `chat`).
pub fn chat(args: ChatArgs) -> CliResult {
    let mut client = connect_for_prompts(&args.client)?;
    if !client.capabilities().contains(Capability::Chat) {
        return Err(needs_chat(&args.client.addr));
    }
    let mut history: Vec<ChatMessage> = args
        .system
        .iter()
        .map(|s| ChatMessage::new("system", s))
        .collect();
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    if interactive {
        eprintln!(
            "chatting with {} (an empty line or Ctrl-D ends; /reset forgets)",
            args.client.addr
        );
    }
    loop {
        if interactive {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        let mut line = String::new();
        let read = std::io::BufRead::read_line(&mut stdin.lock(), &mut line)
            .map_err(|e| format!("cannot read stdin: {e}"))?;
        let line = line.trim_end_matches(['\n', '\r']);
        if read == 0 || line.is_empty() {
            return Ok(());
        }
        if line == "/reset" {
            history.retain(|m| m.role == "system");
            continue;
        }
        history.push(ChatMessage::new("user", line));
        let mut request = PromptRequest::chat(history.clone(), args.max_out);
        request.sampling = args.sampling.params();
        let reply = ask(&mut client, &args.client, &request)?;
        history.push(ChatMessage::new("assistant", &reply.text));
    }
}

fn needs_chat(addr: &NodeAddr) -> Failure {
    Failure::from(format!(
        "the node at {addr} does not offer the chat extension: --system and `donate chat` need a node serving a GGUF model with a chat template (donate serve --mode local_lm --model FILE.gguf)"
    ))
}

/// Connects to a node that answers prompts (a `model_push` node is told
/// what to use instead).
fn connect_for_prompts(args: &ClientArgs) -> Result<Client, Failure> {
    let client = connect(args)?;
    if client.hello().mode == "model_push" {
        return Err(format!(
            "the node at {} runs pushed models (model_push), it does not answer prompts: \
             use `donate infer --model …` (or `donate push`), or a node started with --mode local_lm",
            args.addr
        )
        .into());
    }
    Ok(client)
}

/// Sends `request` and prints the reply as it is generated (or, with
/// `--json`, the result frame); the result.
fn ask(
    client: &mut Client,
    args: &ClientArgs,
    request: &PromptRequest,
) -> Result<PromptResult, Failure> {
    let mut streamed = String::new();
    let result = client.submit_prompt(request).and_then(|request| {
        // Partial text (extension `stream`) is printed as it arrives,
        // unless stdout must hold exactly one JSON object.
        let answer = given_up_streaming(client, request, |partial| {
            if let (false, PartialOutput::Text(text)) = (args.json, partial) {
                print!("{text}");
                let _ = std::io::stdout().flush();
                streamed.push_str(&text);
            }
        })?;
        donate_std::answers::prompt(answer)
    });
    let answer = match &result {
        Ok(r) => Some(Message::PromptResult(r.clone())),
        Err(Error::PromptFailed(r)) => Some(Message::PromptResult((**r).clone())),
        Err(Error::Refused(e)) => Some(Message::Error(e.clone())),
        Err(_) => None,
    };
    if args.json {
        if let Some(answer) = answer {
            print_json(&answer.to_json())?;
        }
    }
    if result.is_err() && !streamed.is_empty() {
        println!();
    }
    let result = result.map_err(|e| match e {
        Error::Misuse(ApiMisuse::NotOffered("chat")) => needs_chat(&args.addr),
        e => failed(args, "", &e),
    })?;
    if !args.json {
        // The final text is the authority: whatever the partials left out.
        match result.text.strip_prefix(streamed.as_str()) {
            Some(rest) => println!("{rest}"),
            None => println!("\n{}", result.text),
        }
    }
    Ok(result)
}

/// `donate models`: what a node's model store holds.
pub fn models(args: ModelsArgs) -> CliResult {
    let mut client = connect(&args.client)?;
    if !client.capabilities().contains(Capability::Store) {
        return Err(format!(
            "the node at {} has no model store (start it with `donate serve --store DIR`)",
            args.client.addr
        )
        .into());
    }
    let inventory = client
        .query_models(&[])
        .map_err(|e| failed(&args.client, "model_query failed", &e))?;
    if args.client.json {
        return print_json(&Message::ModelInventory(inventory).to_json());
    }
    // The name column as wide as the longest name (a name may be 255 bytes).
    let width = inventory
        .models
        .iter()
        .map(|m| m.name.chars().count())
        .max()
        .unwrap_or(0)
        .clamp(4, 48);
    println!(
        "{:<width$}  {:>10}  {:>6}  {:<20}  sha256",
        "name", "size", "in use", "last used"
    );
    for model in &inventory.models {
        let name = match model.name.as_str() {
            "" => "-".to_owned(),
            name if name.chars().count() > width => {
                let cut: String = name.chars().take(width - 1).collect();
                format!("{cut}…")
            }
            name => name.to_owned(),
        };
        println!(
            "{name:<width$}  {:>10}  {:>6}  {:<20}  {}",
            human_size(model.size),
            if model.in_use { "yes" } else { "no" },
            utc(model.last_used),
            model.sha256,
        );
    }
    // `store_free` is the cap less the models in use and the uploads under
    // way: what an upload may take once unused models are evicted. Less the
    // unused models listed, it is what is free without evicting any.
    let unused: i64 = inventory
        .models
        .iter()
        .filter(|m| !m.in_use)
        .map(|m| m.size)
        .sum();
    let free = inventory.store_free.saturating_sub(unused).max(0);
    println!(
        "{} model{}; {} free under the store's cap ({} for an upload once models not in use are evicted)",
        inventory.models.len(),
        if inventory.models.len() == 1 { "" } else { "s" },
        human_size(free),
        human_size(inventory.store_free)
    );
    Ok(())
}

/// Bytes in binary units: `512 B`, `9.0 MiB`, `20.0 GiB`.
fn human_size(bytes: i64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Seconds since the epoch as an RFC 3339 UTC time (`-` for never).
fn utc(secs: i64) -> String {
    match u64::try_from(secs) {
        Ok(secs) if secs > 0 => humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs),
        )
        .to_string(),
        _ => "-".to_owned(),
    }
}

/// `donate status --node A --node B…`: every donor's mode, queue and
/// reachability in one table (`--json`: one object with a `nodes` array).
fn status_of_many(args: &StatusArgs) -> CliResult {
    #[derive(Serialize)]
    struct Row {
        node: String,
        reachable: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        mode: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        capabilities: Option<Vec<String>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        queue_status: Option<QueueStatus>,
    }
    let timeout = (args.client.timeout > 0.0).then(|| Duration::from_secs_f64(args.client.timeout));
    let rows: Vec<Row> = std::thread::scope(|scope| {
        let probes: Vec<_> = args
            .nodes
            .iter()
            .map(|addr| {
                scope.spawn(move || {
                    let probe =
                        Client::connect_timeout(addr, timeout.unwrap_or(Duration::from_secs(10)))
                            .and_then(|mut c| Ok((c.hello().clone(), c.queue_status()?)));
                    match probe {
                        Ok((hello, queue)) => Row {
                            node: addr.to_string(),
                            reachable: true,
                            error: None,
                            mode: Some(hello.mode),
                            capabilities: Some(hello.capabilities),
                            queue_status: queue,
                        },
                        Err(e) => Row {
                            node: addr.to_string(),
                            reachable: false,
                            error: Some(e.to_string()),
                            mode: None,
                            capabilities: None,
                            queue_status: None,
                        },
                    }
                })
            })
            .collect();
        probes
            .into_iter()
            .map(|p| p.join().expect("a probe thread"))
            .collect()
    });
    let all_up = rows.iter().all(|r| r.reachable);
    if args.client.json {
        print_json(
            &serde_json::to_vec(&serde_json::json!({ "nodes": rows })).expect("rows serialize"),
        )?;
    } else {
        println!(
            "{:<28} {:<11} {:<10} {:>13}  extensions",
            "node", "reachable", "mode", "queue"
        );
        for r in &rows {
            let queue = match &r.queue_status {
                Some(q) => format!(
                    "{}/{}{}",
                    q.depth,
                    q.capacity,
                    if q.in_progress { " busy" } else { "" }
                ),
                None => "-".to_owned(),
            };
            println!(
                "{:<28} {:<11} {:<10} {:>13}  {}",
                r.node,
                if r.reachable { "yes" } else { "NO" },
                r.mode.as_deref().unwrap_or("-"),
                queue,
                r.capabilities
                    .as_ref()
                    .map_or_else(|| r.error.clone().unwrap_or_default(), |c| c.join(","))
            );
        }
    }
    if all_up {
        Ok(())
    } else {
        Err("some donors are unreachable".into())
    }
}

/// [`given_up`] for a job whose partial output (extension `stream`) goes to `on_partial`.
fn given_up_streaming(
    client: &mut Client,
    request: RequestId,
    on_partial: impl FnMut(PartialOutput),
) -> Result<Answer, Error> {
    client.wait_streaming(request, on_partial).inspect_err(|_| {
        if let Ok(true) = client.cancel(request) {
            tracing::info!("gave up waiting: the job was cancelled on the node");
        }
    })
}

/// Waits for a job's answer; if waiting fails (`--timeout` passed), cancels
/// the job on the node before giving up, so it does not keep computing for
/// nobody (closing the connection would too, once the node notices).
fn given_up(client: &mut Client, request: RequestId) -> Result<Answer, Error> {
    client.wait(request).inspect_err(|_| {
        if let Ok(true) = client.cancel(request) {
            tracing::info!("gave up waiting: the job was cancelled on the node");
        }
    })
}

/// `donate status`: the node's hello and, when it answers one, its queue status.
pub fn status(args: StatusArgs) -> CliResult {
    if !args.nodes.is_empty() {
        return status_of_many(&args);
    }
    let mut client = connect(&args.client)?;
    let hello = client.hello().clone();
    let queue = client
        .queue_status()
        .map_err(|e| failed(&args.client, "queue_status failed", &e))?;
    let stats = client
        .stats()
        .map_err(|e| failed(&args.client, "stats failed", &e))?;
    if args.client.json {
        let queue_json =
            queue.map_or_else(|| b"null".to_vec(), |q| Message::QueueStatus(q).to_json());
        let mut out = b"{\"hello\":".to_vec();
        out.extend(Message::Hello(hello).to_json());
        out.extend(b",\"queue_status\":");
        out.extend(queue_json);
        if let Some(stats) = stats {
            // Only from a node that offers `stats`: the v1 output is unchanged.
            out.extend(b",\"stats\":");
            out.extend(Message::Stats(stats).to_json());
        }
        out.push(b'}');
        return print_json(&out);
    }
    println!("node:    {}", args.client.addr);
    println!("mode:    {}", hello.mode);
    if !hello.local_lm_path.is_empty() {
        println!("model:   {}", hello.local_lm_path);
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
    if let Some(s) = stats {
        println!(
            "connections: {} open, {} accepted",
            s.connections, s.connections_accepted
        );
        println!(
            "jobs:    {} running, {} done, {} failed; removed from the queue: {} cancelled, {} past their deadline, {} with their connection",
            s.jobs_running, s.jobs_done, s.jobs_failed, s.jobs_cancelled, s.jobs_expired, s.jobs_dropped
        );
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
        Some(trust) => Trust::Given(trust.clone()),
        None => {
            let file = secure::known_nodes_path().ok_or(
                "cannot find your config directory for known_nodes: set HOME or XDG_CONFIG_HOME, or pass --node-key",
            )?;
            match secure::known_node(&file, &addr)? {
                Some(key) => Trust::Known {
                    trust: NodeTrust::Pinned(key.fingerprint()),
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
    /// What the node's store calls it: the weights' file name, its control
    /// characters dropped, cut to the longest name a store keeps.
    fn name(&self) -> String {
        let file = self.weights_path.file_name().unwrap_or_default();
        let mut name: String = file
            .to_string_lossy()
            .chars()
            .filter(|c| !c.is_control())
            .collect();
        while name.len() > MAX_MODEL_NAME {
            name.pop();
        }
        name
    }

    fn open(config_json: String, weights: &Path) -> Result<Model, Failure> {
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

    /// SHA-256 of the weights file, read in pieces, with a bar on a terminal
    /// (or from the hash cache, when the file has not changed since).
    fn sha256(&mut self) -> Result<[u8; 32], Failure> {
        if let Some(hash) = crate::hash_cache::lookup(&self.weights_path) {
            return Ok(hash);
        }
        let bar = progress_bar(self.len, "hashing");
        let hash = donate_std::sha256_of_reader(bar.wrap_read(&self.weights))
            .and_then(|hash| self.weights.rewind().map(|()| hash))
            .map_err(|e| format!("cannot hash {}: {e}", self.weights_path.display()))?;
        bar.finish_and_clear();
        crate::hash_cache::store(&self.weights_path, &hash);
        Ok(hash)
    }
}

/// An upload's outcome and how long it took.
struct Pushed {
    result: Result<ModelStatus, Error>,
    /// Weight bytes sent.
    bytes: u64,
    seconds: f64,
    /// The node held the model: nothing was sent.
    reused: bool,
    /// The upload resumed a broken one at this byte.
    resumed_from: u64,
}

/// Makes `model` mounted on the node: on a node with a model store, hashes
/// it (once per file version) and sends only what the node lacks; elsewhere
/// streams it, hashed first when `sha256` asks.
fn upload(
    client: &mut Client,
    model: &mut Model,
    sha256: bool,
    bar: bool,
) -> Result<Pushed, Failure> {
    let stored = client.capabilities().contains(Capability::Store);
    let hash = (stored || sha256).then(|| model.sha256()).transpose()?;
    let bar = if bar {
        progress_bar(model.len, "pushing")
    } else {
        ProgressBar::hidden()
    };
    let start = Instant::now();
    let mut bytes = 0;
    let progress = |sent| {
        bytes = sent;
        bar.set_position(sent);
    };
    let (result, reused, resumed_from) = match hash {
        Some(hash) if stored => {
            let weights = donate_std::WeightsRef {
                sha256: hash,
                name: model.name(),
            };
            match client.push_stored(
                &model.config_json,
                &model.weights,
                model.len,
                weights,
                progress,
            ) {
                Ok(pushed) => {
                    bytes = pushed.sent;
                    (Ok(pushed.status), pushed.reused, pushed.resumed_from)
                }
                Err(e) => (Err(e), false, 0),
            }
        }
        _ => {
            let result = client.push_model_from(
                &model.config_json,
                &model.weights,
                model.len,
                hash,
                progress,
            );
            (result, false, 0)
        }
    };
    bar.finish_and_clear();
    Ok(Pushed {
        result,
        bytes,
        seconds: start.elapsed().as_secs_f64(),
        reused,
        resumed_from,
    })
}

/// `push --json`: `{"ok", "message", "bytes", "seconds", "mib_s", "reused", "resumed_from"}`;
/// `bytes` counts the weight bytes sent.
#[derive(Debug, Serialize)]
struct PushReport {
    ok: bool,
    message: String,
    bytes: u64,
    seconds: f64,
    mib_s: f64,
    reused: bool,
    resumed_from: u64,
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
            reused: pushed.reused,
            resumed_from: pushed.resumed_from,
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
