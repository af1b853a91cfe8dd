//! `donate batch`: a file of jobs over many donors, through [`donate_std::Pool`].
//!
//! Every input line is answered by exactly one output line (the result frame
//! as a donor sent it, or an `error` object saying why the job failed), in
//! input order: a result that finishes early waits for those before it, so
//! the file is the same whichever donor ran what. Progress goes to stderr (a bar on a terminal, a line
//! every few seconds otherwise), then a summary per donor. The exit status is
//! 0 only if every job succeeded.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::time::{Duration, Instant};

use donate_proto::message::ErrorFrame;
use donate_proto::{Answer, Message, NodeTrust, PoolConfig, SecureClientConfig};
use donate_std::{Pool, PoolJob, PoolModel, PoolResult, Work};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Deserialize;

use crate::{BatchArgs, CliResult, Failure};

/// One input line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    job_id: String,
    input_ids: Option<Vec<i32>>,
    #[serde(default)]
    max_tokens: i64,
    prompt: Option<String>,
    #[serde(default)]
    max_out: i64,
}

/// Reads the jobs; a bad line or a repeated `job_id` fails before anything is sent.
fn read_jobs(args: &BatchArgs) -> Result<Vec<PoolJob>, Failure> {
    let file = std::fs::File::open(&args.input)
        .map_err(|e| format!("cannot read {}: {e}", args.input.display()))?;
    let mut jobs = Vec::new();
    let mut seen = HashSet::new();
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let at = || format!("{} line {}", args.input.display(), n + 1);
        let line = line.map_err(|e| format!("{}: {e}", at()))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: Line = serde_json::from_str(&line).map_err(|e| format!("{}: {e}", at()))?;
        let work = match (parsed.input_ids, parsed.prompt) {
            (Some(input_ids), None) => Work::Infer {
                input_ids,
                max_tokens: parsed.max_tokens,
            },
            (None, Some(prompt)) => Work::Prompt {
                prompt,
                max_out: parsed.max_out,
            },
            _ => return Err(format!("{}: give either input_ids or prompt", at()).into()),
        };
        if parsed.job_id.is_empty() || !seen.insert(parsed.job_id.clone()) {
            return Err(format!(
                "{}: job_id {:?} is empty or used twice; nothing was sent",
                at(),
                parsed.job_id
            )
            .into());
        }
        jobs.push(PoolJob {
            job_id: parsed.job_id,
            work,
        });
    }
    Ok(jobs)
}

/// The model every donor mounts, hashed once (cached by path, size and time).
fn model(args: &BatchArgs) -> Result<Option<PoolModel>, Failure> {
    let Some((config, weights)) = args.model_files() else {
        return Ok(None);
    };
    let config_json = config.read(&weights)?;
    let len = std::fs::metadata(&weights)
        .map_err(|e| format!("cannot read weights {}: {e}", weights.display()))?
        .len();
    let sha256 = match crate::hash_cache::lookup(&weights) {
        Some(hash) => hash,
        None => {
            let file = std::fs::File::open(&weights)
                .map_err(|e| format!("cannot read weights {}: {e}", weights.display()))?;
            let hash = donate_std::sha256_of_reader(file)
                .map_err(|e| format!("cannot hash {}: {e}", weights.display()))?;
            crate::hash_cache::store(&weights, &hash);
            hash
        }
    };
    Ok(Some(PoolModel {
        config_json,
        weights,
        len,
        sha256,
    }))
}

/// A pool whose every donor is secure: the key of each checked against known_nodes.
fn secure_pool(
    args: &BatchArgs,
    key: &std::path::Path,
    config: PoolConfig,
) -> Result<Pool, Failure> {
    let keypair = crate::secure::load_keypair(key)?;
    let known = crate::secure::known_nodes_path();
    let mut pool = Pool::new(Vec::new(), config);
    let pinned = &args.connect.node_key;
    for addr in &args.nodes {
        let recorded = match (&pinned, &known) {
            (Some(_), _) | (None, None) => None,
            (None, Some(file)) => crate::secure::known_node(file, &addr.to_string())?,
        };
        let trust = match (&pinned, recorded) {
            (Some(trust), _) => trust.clone(),
            (None, Some(key)) => NodeTrust::Pinned(key.fingerprint()),
            (None, None) if args.connect.trust_on_first_use => NodeTrust::AnyKey,
            (None, None) => {
                return Err(Failure::with_code(
                    format!("the key of the node at {addr} is not known: add it to known_nodes (donate status --addr {addr} --key … --trust-on-first-use), or pass --node-key or --trust-on-first-use"),
                    crate::exit::UNKNOWN_NODE,
                ))
            }
        };
        let secure = SecureClientConfig {
            keypair: keypair.clone(),
            trust,
        };
        pool = pool.secure_donor(addr.clone(), secure);
    }
    Ok(pool)
}

/// `donate batch`.
pub fn run(args: BatchArgs) -> CliResult {
    let jobs = read_jobs(&args)?;
    let total = jobs.len() as u64;
    let model = model(&args)?;
    if model.is_none() {
        if let Some(job) = jobs.iter().find(|j| matches!(j.work, Work::Infer { .. })) {
            return Err(format!(
                "job {:?} is an infer job: infer jobs run on a pushed model, give it with --model (or --config and --weights); nothing was sent",
                job.job_id
            )
            .into());
        }
    }
    let mut out: Box<dyn Write> = match &args.output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    let config = PoolConfig::default()
        .job_deadline(Duration::from_secs_f64(args.job_deadline))
        .max_attempts(args.max_attempts);
    let mut pool = match &args.connect.key {
        None => Pool::new(args.nodes.clone(), config),
        Some(key) => secure_pool(&args, key, config)?,
    };
    // 0 = never: a year stands for it (an Instant cannot hold Duration::MAX).
    pool = pool.connect_timeout(match args.connect.timeout {
        0.0 => Duration::from_secs(365 * 24 * 3600),
        secs => Duration::from_secs_f64(secs),
    });
    if let Some(model) = model {
        pool = pool.model(model);
    }
    pool = pool.sampling(args.sampling.params());
    let progress = Progress::new(total);
    let (mut done, mut failed) = (0u64, 0u64);
    let mut write_error = None;
    let position: HashMap<String, usize> = jobs
        .iter()
        .enumerate()
        .map(|(i, job)| (job.job_id.clone(), i))
        .collect();
    let mut in_order = InOrder::new(jobs.len());
    let summary = pool.run(
        jobs,
        |result| {
            done += 1;
            if !result.ok() {
                failed += 1;
            }
            let at = position[&result.job_id];
            for line in in_order.put(at, result_line(result)) {
                if write_error.is_none() {
                    write_error = out
                        .write_all(&line)
                        .and_then(|()| out.write_all(b"\n"))
                        .err();
                }
            }
        },
        |core| progress.update(core.delivered() as u64, core.live_donors(), core.retries()),
    )?;
    out.flush()
        .map_err(|e| format!("cannot write the results: {e}"))?;
    if let Some(e) = write_error {
        return Err(format!("cannot write the results: {e}").into());
    }
    progress.finish();
    eprintln!(
        "{done} jobs, {failed} failed, {} re-sent after donor failures, {} late duplicates dropped, {} weight bytes sent",
        summary.retries, summary.duplicates, summary.weights_sent
    );
    eprintln!(
        "{:<28} {:>8} {:>14} {:>9}  last error",
        "donor", "jobs", "mean latency", "failures"
    );
    for (addr, stats) in args.nodes.iter().zip(&summary.donors) {
        let mean = if stats.jobs > 0 {
            format!(
                "{:.1} ms",
                stats.busy.as_secs_f64() * 1e3 / stats.jobs as f64
            )
        } else {
            "-".to_owned()
        };
        eprintln!(
            "{:<28} {:>8} {:>14} {:>9}  {}",
            addr.to_string(),
            stats.jobs,
            mean,
            stats.failures,
            stats.last_error.as_deref().unwrap_or("")
        );
    }
    if failed > 0 {
        return Err(format!("{failed} of {done} jobs failed").into());
    }
    Ok(())
}

/// Lines that arrive in any order, let out in input order.
struct InOrder {
    lines: Vec<Option<Vec<u8>>>,
    next: usize,
}

impl InOrder {
    fn new(n: usize) -> InOrder {
        InOrder {
            lines: vec![None; n],
            next: 0,
        }
    }

    /// Holds line `at`; returns every line now ready, in order.
    fn put(&mut self, at: usize, line: Vec<u8>) -> Vec<Vec<u8>> {
        self.lines[at] = Some(line);
        let mut ready = Vec::new();
        while let Some(line) = self.lines.get_mut(self.next).and_then(Option::take) {
            ready.push(line);
            self.next += 1;
        }
        ready
    }
}

/// The output line of one job: the result frame as received, or an `error`
/// object naming the job.
fn result_line(result: PoolResult) -> Vec<u8> {
    let job_id = result.job_id;
    let message = match result.outcome {
        Ok(Answer::Infer(r)) => Message::InferResult(r),
        Ok(Answer::Prompt(r)) => Message::PromptResult(r),
        Ok(Answer::Error(mut e)) => {
            e.job_id = job_id;
            Message::Error(e)
        }
        Ok(other) => Message::Error(ErrorFrame {
            code: "unexpected_answer".to_owned(),
            error: format!("unexpected answer {other:?}"),
            job_id,
        }),
        Err(reason) => Message::Error(ErrorFrame {
            code: "pool_failed".to_owned(),
            error: reason.to_string(),
            job_id,
        }),
    };
    message.to_json()
}

/// Progress on stderr: a bar on a terminal, else a line every 5 s.
struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    start: Instant,
    last_line: std::cell::Cell<Instant>,
}

impl Progress {
    fn new(total: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("[{bar:30}] {pos}/{len} jobs {per_sec} {msg}")
                    .expect("a valid template")
                    .progress_chars("=> "),
            );
            bar
        });
        Progress {
            bar,
            total,
            start: Instant::now(),
            last_line: std::cell::Cell::new(Instant::now()),
        }
    }

    fn update(&self, done: u64, live: usize, retries: u64) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(done);
                bar.set_message(format!("{live} donors live, {retries} retries"));
            }
            None if self.last_line.get().elapsed() >= Duration::from_secs(5) => {
                self.last_line.set(Instant::now());
                let rate = done as f64 / self.start.elapsed().as_secs_f64().max(1e-9);
                eprintln!(
                    "{done}/{} jobs, {rate:.1}/s, {live} donors live, {retries} retries",
                    self.total
                );
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::InOrder;

    #[test]
    fn lines_finishing_out_of_order_are_let_out_in_input_order() {
        let mut order = InOrder::new(4);
        assert!(order.put(2, b"c".to_vec()).is_empty());
        assert!(order.put(1, b"b".to_vec()).is_empty());
        assert_eq!(order.put(0, b"a".to_vec()), [b"a", b"b", b"c"]);
        assert_eq!(order.put(3, b"d".to_vec()), [b"d"]);
    }
}
