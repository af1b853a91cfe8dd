//! [`LocalLmCommand`]: runs a program per prompt, the prompt on stdin, the
//! reply from stdout.

use std::io::{ErrorKind, Read, Write};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use donate_proto::{Executor, JobContext, JobError, NoSpool, Weights};

use crate::codes;
use crate::process;

/// Settings of a [`LocalLmCommand`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LmConfig {
    /// Substituted for `{path}` in the argv (the node's `--local-lm-path`).
    pub local_lm_path: String,
    /// Substituted for `{max_out}` when a prompt's `max_out` is 0 or less.
    pub default_max_out: i64,
    /// Longest one run may take; past it the program (and its process group) is killed.
    pub timeout: Duration,
    /// Most bytes of stdout accepted; past it the program is killed and the job fails.
    pub max_output: usize,
    /// Bytes of stderr quoted in the error of a failed run (its end).
    pub stderr_tail: usize,
}

impl Default for LmConfig {
    fn default() -> Self {
        LmConfig {
            local_lm_path: String::new(),
            default_max_out: 256,
            timeout: Duration::from_secs(60),
            max_output: 1024 * 1024,
            stderr_tail: 2048,
        }
    }
}

/// Runs a program for each prompt (`--mode local_lm --executor 'lm:PROGRAM ARG…'`).
///
/// `{path}` and `{max_out}` are replaced inside each argv element (the argv is
/// never re-split and never given to a shell). The prompt is written to the
/// program's stdin, which is then closed; its stdout, decoded as UTF-8 with
/// invalid sequences replaced by U+FFFD, is the reply, unchanged (`lm:cat`
/// echoes every prompt). A run that exits non-zero, outlives the time limit or
/// prints more than the output limit fails the job. stdin, stdout and stderr
/// are each served by their own thread, so a program that writes a lot before
/// it reads cannot deadlock.
#[derive(Debug, Clone)]
pub struct LocalLmCommand {
    argv: Vec<String>,
    config: LmConfig,
}

impl LocalLmCommand {
    /// An executor running `argv` (see [`split_command`](crate::split_command)).
    pub fn new(argv: Vec<String>, config: LmConfig) -> Result<LocalLmCommand, String> {
        if argv.is_empty() {
            return Err("empty command".to_owned());
        }
        Ok(LocalLmCommand { argv, config })
    }

    /// The settings.
    pub fn config(&self) -> &LmConfig {
        &self.config
    }

    /// The argv run for a prompt with this `max_out`.
    pub fn argv_for(&self, max_out: i64) -> Vec<String> {
        let max_out = if max_out > 0 {
            max_out
        } else {
            self.config.default_max_out
        }
        .to_string();
        self.argv
            .iter()
            .map(|arg| {
                arg.replace("{path}", &self.config.local_lm_path)
                    .replace("{max_out}", &max_out)
            })
            .collect()
    }

    /// Runs the program once with `prompt` on stdin.
    pub fn run(&self, prompt: &str, max_out: i64) -> Result<String, JobError> {
        let argv = self.argv_for(max_out);
        let program = &argv[0];
        let mut child = process::command(&argv).spawn().map_err(|e| {
            JobError::new(
                codes::LM_SPAWN_FAILED,
                format!("cannot start {program:?}: {e}"),
            )
        })?;
        let deadline = process::deadline(self.config.timeout);
        let (tx, rx) = mpsc::channel();
        let started = self.start_io(&mut child, prompt, tx);
        if let Err(e) = started {
            process::kill(&mut child);
            return Err(JobError::new(
                codes::LM_SPAWN_FAILED,
                format!("cannot start threads for {program:?}: {e}"),
            ));
        }
        let (mut stdout, mut stderr) = (None, None);
        while stdout.is_none() || stderr.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Output::Stdout(Some(out))) => stdout = Some(out),
                Ok(Output::Stdout(None)) => {
                    process::kill(&mut child);
                    return Err(JobError::new(
                        codes::LM_OUTPUT_TOO_LARGE,
                        format!(
                            "{program:?} printed more than {} bytes; killed",
                            self.config.max_output
                        ),
                    ));
                }
                Ok(Output::Stderr(tail)) => stderr = Some(tail),
                Err(_) => return Err(self.timed_out(&mut child, program)),
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(status) = process::wait_for(&mut child, left) else {
            return Err(self.timed_out(&mut child, program));
        };
        let stderr = stderr.unwrap_or_default();
        if !status.success() {
            let tail = String::from_utf8_lossy(&stderr);
            let tail = tail.trim();
            let tail = if tail.is_empty() {
                "(no stderr)".to_owned()
            } else {
                tail.to_owned()
            };
            return Err(JobError::new(
                codes::LM_FAILED,
                format!("{program:?} failed ({status}): {tail}"),
            ));
        }
        if !stderr.is_empty() {
            tracing::debug!(
                target: "donate_exec::stderr",
                "{program}: {}",
                String::from_utf8_lossy(&stderr).trim_end()
            );
        }
        let stdout = stdout.unwrap_or_default();
        Ok(match String::from_utf8(stdout) {
            Ok(text) => text,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// Starts the stdin writer and the stdout and stderr readers.
    fn start_io(
        &self,
        child: &mut std::process::Child,
        prompt: &str,
        tx: mpsc::Sender<Output>,
    ) -> std::io::Result<()> {
        let mut stdin = child.stdin.take().expect("piped stdin");
        let mut stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let prompt = prompt.as_bytes().to_vec();
        thread::Builder::new()
            .name("donate-lm-stdin".into())
            .spawn(move || {
                // A program may exit without reading all of it: not an error here.
                let _ = stdin.write_all(&prompt);
            })?;
        let max = self.config.max_output;
        let out_tx = tx.clone();
        thread::Builder::new()
            .name("donate-lm-stdout".into())
            .spawn(move || {
                let _ = out_tx.send(Output::Stdout(read_at_most(&mut stdout, max)));
            })?;
        process::tail_reader(
            "donate-lm-stderr".into(),
            stderr,
            self.config.stderr_tail,
            move |tail| {
                let _ = tx.send(Output::Stderr(tail));
            },
        )
    }

    fn timed_out(&self, child: &mut std::process::Child, program: &str) -> JobError {
        process::kill(child);
        JobError::new(
            codes::LM_TIMEOUT,
            format!(
                "{program:?} did not finish within {:?}; killed",
                self.config.timeout
            ),
        )
    }
}

enum Output {
    /// All of stdout, or `None` when it went over the limit.
    Stdout(Option<Vec<u8>>),
    /// The end of stderr.
    Stderr(Vec<u8>),
}

/// Reads `input` to its end; `None` as soon as it holds more than `max` bytes.
fn read_at_most(input: &mut impl Read, max: usize) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0; 64 * 1024];
    loop {
        match input.read(&mut buf) {
            Ok(0) => return Some(out),
            Ok(n) if out.len() + n > max => return None,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Some(out),
        }
    }
}

impl Executor for LocalLmCommand {
    type Model = ();
    type Spool = NoSpool;

    fn mount(&self, _config_json: String, _weights: Weights<NoSpool>) -> Result<(), String> {
        Err("this node runs an lm: executor, which answers prompts only".to_owned())
    }

    fn infer(
        &self,
        _model: &(),
        _input_ids: &[i32],
        _max_tokens: i64,
        _job: &JobContext<'_>,
    ) -> Result<Vec<i32>, JobError> {
        Err(JobError::new(
            codes::UNSUPPORTED,
            "this node runs an lm: executor, which answers prompts only",
        ))
    }

    fn prompt(
        &self,
        prompt: &str,
        max_out: i64,
        _job: &JobContext<'_>,
    ) -> Result<String, JobError> {
        self.run(prompt, max_out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_replaced_inside_elements() {
        let lm = LocalLmCommand::new(
            [
                "run",
                "-m",
                "{path}",
                "-n{max_out}",
                "{path}/{max_out}",
                "{other}",
            ]
            .map(String::from)
            .to_vec(),
            LmConfig {
                local_lm_path: "/models/a b; $(x)".into(),
                default_max_out: 9,
                ..LmConfig::default()
            },
        )
        .unwrap();
        assert_eq!(
            lm.argv_for(0),
            [
                "run",
                "-m",
                "/models/a b; $(x)",
                "-n9",
                "/models/a b; $(x)/9",
                "{other}"
            ]
        );
        assert_eq!(lm.argv_for(3)[3], "-n3");
    }

    #[test]
    fn reading_stops_past_the_limit() {
        assert_eq!(read_at_most(&mut &b"abc"[..], 3), Some(b"abc".to_vec()));
        assert_eq!(read_at_most(&mut &b"abcd"[..], 3), None);
    }
}
