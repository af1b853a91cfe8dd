//! # donate-exec
//!
//! Executors for a donate node that do real work, beside
//! [`donate_proto::Stub`]:
//!
//! - [`WorkerProcess`] (`donate serve --executor 'cmd:PROGRAM ARG…'`): a pool of
//!   long-lived worker processes, one per worker thread, spoken to in JSON
//!   lines over stdin/stdout (`docs/WORKER-PROTOCOL.md`). Pushed weights reach
//!   a worker as a file in a private temporary directory, removed when the
//!   model is dropped. A worker that crashes, hangs or breaks the protocol
//!   fails only the job it was running, and is restarted.
//! - [`LocalLmCommand`] (`--mode local_lm --executor 'lm:PROGRAM ARG…'`): runs a
//!   program per prompt, the prompt on stdin, the reply from stdout, with a time
//!   limit and an output limit.
//!
//! Programs are argvs split by [`split_command`] (POSIX-shell quoting, no
//! shell): `$(…)`, backticks, `;` and globs mean nothing special.
//!
//! ```no_run
//! use donate_exec::{WorkerConfig, WorkerProcess};
//! use donate_proto::ServerConfig;
//!
//! let argv = donate_exec::split_command("python3 examples/worker.py")?;
//! let executor = WorkerProcess::new(argv, WorkerConfig::default())?;
//! let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
//! let server = donate_std::serve(listener, ServerConfig::default(), executor)?;
//! # server.shutdown();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

mod lm;
mod process;
mod weights_file;
mod worker;

pub use lm::{LmConfig, LocalLmCommand};
pub use weights_file::WeightsFile;
pub use worker::{WorkerConfig, WorkerModel, WorkerProcess};

/// Job error codes these executors report (the `code` of a failed result).
pub mod codes {
    /// The worker process died (or closed its stdout) before answering.
    pub const WORKER_CRASHED: &str = "worker_crashed";
    /// The worker gave no answer within the job timeout; it was killed.
    pub const WORKER_TIMEOUT: &str = "worker_timeout";
    /// The worker printed something that is not a protocol reply (not JSON,
    /// wrong fields, or a line over the limit); it was killed.
    pub const WORKER_PROTOCOL: &str = "worker_protocol";
    /// The worker could not be started.
    pub const WORKER_UNAVAILABLE: &str = "worker_unavailable";
    /// The worker answered `ok:false` without a `code` of its own.
    pub const WORKER_ERROR: &str = "worker_error";
    /// A worker that had not seen the model yet refused it when it was replayed.
    pub const WORKER_MOUNT_REFUSED: &str = "worker_mount_refused";
    /// The lm program could not be started.
    pub const LM_SPAWN_FAILED: &str = "lm_spawn_failed";
    /// The lm program exited with a failure status (the message ends with its stderr tail).
    pub const LM_FAILED: &str = "lm_failed";
    /// The lm program ran past its time limit; it was killed.
    pub const LM_TIMEOUT: &str = "lm_timeout";
    /// The lm program printed more than the output limit; it was killed.
    pub const LM_OUTPUT_TOO_LARGE: &str = "lm_output_too_large";
    /// A job this executor cannot run (an `infer` on an lm executor).
    pub const UNSUPPORTED: &str = donate_proto::ErrorCode::Unsupported.as_str();
}

/// Splits a command line into an argv with POSIX-shell quoting rules
/// (`'…'`, `"…"`, `\`), never running a shell. An empty line is an error.
///
/// ```
/// assert_eq!(
///     donate_exec::split_command(r#"python3 -u "my worker.py" $(x)"#).unwrap(),
///     ["python3", "-u", "my worker.py", "$(x)"],
/// );
/// ```
pub fn split_command(line: &str) -> Result<Vec<String>, String> {
    let argv = shell_words::split(line).map_err(|e| format!("cannot split {line:?}: {e}"))?;
    if argv.is_empty() {
        return Err("empty command".to_owned());
    }
    Ok(argv)
}

/// What `--executor` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecutorSpec {
    /// `stub`: the Go node's stub ([`donate_proto::Stub`]).
    Stub,
    /// `cmd:PROGRAM ARG…`: a [`WorkerProcess`] pool running this argv.
    Cmd(Vec<String>),
    /// `lm:PROGRAM ARG…`: a [`LocalLmCommand`] running this argv per prompt.
    Lm(Vec<String>),
}

impl std::str::FromStr for ExecutorSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "stub" {
            Ok(ExecutorSpec::Stub)
        } else if let Some(line) = s.strip_prefix("cmd:") {
            split_command(line).map(ExecutorSpec::Cmd)
        } else if let Some(line) = s.strip_prefix("lm:") {
            split_command(line).map(ExecutorSpec::Lm)
        } else {
            Err(format!(
                "unknown executor {s:?} (expected stub, cmd:PROGRAM ARG… or lm:PROGRAM ARG…)"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!("stub".parse(), Ok(ExecutorSpec::Stub));
        assert_eq!(
            "cmd:python3 'a b.py' --x".parse(),
            Ok(ExecutorSpec::Cmd(vec![
                "python3".into(),
                "a b.py".into(),
                "--x".into()
            ]))
        );
        assert_eq!(
            "lm:llama-cli -m {path} -n {max_out}".parse(),
            Ok(ExecutorSpec::Lm(
                ["llama-cli", "-m", "{path}", "-n", "{max_out}"]
                    .map(String::from)
                    .to_vec()
            ))
        );
        for bad in ["", "gpu", "cmd:", "cmd:   ", "lm:'unclosed", "CMD:x"] {
            assert!(bad.parse::<ExecutorSpec>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn shell_syntax_is_not_interpreted() {
        assert_eq!(
            split_command("echo $(rm -rf /) `id` ; ls *").unwrap(),
            ["echo", "$(rm", "-rf", "/)", "`id`", ";", "ls", "*"]
        );
    }
}
