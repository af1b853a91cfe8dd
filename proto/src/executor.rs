//! The trait a node's workers call, and [`Stub`], the Go node's stub executor.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use crate::job::{Job, JobError, JobInput, JobOutcome, JobOutput};
use crate::server::{Mount, MountOutcome};

/// Runs mounts and jobs. Plain synchronous Rust; adapters call it on worker threads.
pub trait Executor: Send + Sync + 'static {
    /// A mounted model, shared by the jobs of the connection that pushed it.
    type Model: Send + Sync + 'static;

    /// Loads a committed upload (hash already verified). `Err` is the `model_status` message.
    fn mount(&self, config_json: String, weights: Vec<u8>) -> Result<Self::Model, String>;

    /// Runs an `infer` job.
    fn infer(
        &self,
        model: &Self::Model,
        input_ids: &[i32],
        max_tokens: i64,
    ) -> Result<Vec<i32>, JobError>;

    /// Runs a `prompt` job.
    fn prompt(&self, prompt: &str, max_out: i64) -> Result<String, JobError>;
}

/// Runs `job` on `executor`; a panic becomes an `executor_panicked` job error.
pub fn run_job<E: Executor>(executor: &E, job: &Job<E::Model>) -> JobOutcome {
    catch_unwind(AssertUnwindSafe(|| match &job.input {
        JobInput::Infer {
            model,
            input_ids,
            max_tokens,
        } => executor
            .infer(model, input_ids, *max_tokens)
            .map(JobOutput::Infer),
        JobInput::Prompt { prompt, max_out } => {
            executor.prompt(prompt, *max_out).map(JobOutput::Prompt)
        }
    }))
    .unwrap_or_else(|_| Err(JobError::new("executor_panicked", "executor panicked")))
}

/// Verifies and loads a committed upload on `executor`; hand the outcome to
/// [`Node::mount_done`](crate::Node::mount_done).
pub fn run_mount<E: Executor>(executor: &E, mount: Mount) -> MountOutcome<E::Model> {
    let Mount { token, model } = mount;
    let result = model.verify().map_err(|e| e.to_string()).and_then(|()| {
        catch_unwind(AssertUnwindSafe(|| {
            executor.mount(model.config_json, model.weights)
        }))
        .unwrap_or_else(|_| Err("executor panicked while mounting".to_owned()))
        .map(Arc::new)
    });
    MountOutcome { token, result }
}

/// Reproduces the Go node's stub outputs exactly (PROTOCOL.md).
#[derive(Debug, Clone, Default)]
pub struct Stub {
    local_lm_path: String,
}

/// Tokens the stub appends when `max_tokens` is 0 or less, and at most.
const STUB_MAX_TOKENS: i64 = 8;

impl Stub {
    /// A stub whose prompt replies name `local_lm_path` when it is non-empty.
    pub fn new(local_lm_path: impl Into<String>) -> Self {
        Stub {
            local_lm_path: local_lm_path.into(),
        }
    }

    /// `input_ids` followed by n tokens `1 + i % 7`, n = 8 when `max_tokens` <= 0, else min(`max_tokens`, 8).
    pub fn infer_ids(input_ids: &[i32], max_tokens: i64) -> Vec<i32> {
        let n = if max_tokens <= 0 {
            STUB_MAX_TOKENS
        } else {
            max_tokens.min(STUB_MAX_TOKENS)
        };
        let mut out = Vec::with_capacity(input_ids.len() + n as usize);
        out.extend_from_slice(input_ids);
        out.extend((0..n as i32).map(|i| 1 + i % 7));
        out
    }

    /// The stub's reply to `prompt`.
    pub fn reply(&self, prompt: &str) -> String {
        const ONE_WORD: &str = "reply with one word only: yes, no, or maybe";
        const QUESTION: &str = "user question:";
        let mut p = prompt.trim();
        let lower = p.to_lowercase();
        if lower.contains(ONE_WORD) {
            return "maybe".to_owned();
        }
        if let Some(i) = lower.rfind(QUESTION) {
            let rest = p
                .get(i + QUESTION.len()..)
                .unwrap_or(&lower[i + QUESTION.len()..]);
            p = rest.trim();
        }
        let reply = if p.is_empty() {
            "donate node online".to_owned()
        } else if p.ends_with('?') {
            "stub says: maybe".to_owned()
        } else {
            let words: Vec<&str> = p.split_whitespace().take(8).collect();
            format!("stub says: {}", words.join(" "))
        };
        if self.local_lm_path.is_empty() {
            format!("[prompt stub] {reply}")
        } else {
            format!("[local_lm stub @ {}] {reply}", self.local_lm_path)
        }
    }
}

impl Executor for Stub {
    type Model = ();

    fn mount(&self, _config_json: String, _weights: Vec<u8>) -> Result<(), String> {
        Ok(())
    }

    fn infer(&self, _model: &(), input_ids: &[i32], max_tokens: i64) -> Result<Vec<i32>, JobError> {
        Ok(Stub::infer_ids(input_ids, max_tokens))
    }

    fn prompt(&self, prompt: &str, _max_out: i64) -> Result<String, JobError> {
        Ok(self.reply(prompt))
    }
}
