//! Jobs: what the node's FIFO queue holds and what a worker hands back.

use std::sync::Arc;

use crate::id::JobId;
use crate::message::{InferResult, Message, PromptResult};

/// A job for a worker, taken from the node with [`Node::next_job`](crate::Node::next_job).
#[derive(Debug)]
pub struct Job<M> {
    /// Hand this back with the outcome.
    pub id: JobId,
    /// The client's `job_id`, as sent (it may be empty or repeated).
    pub job_id: String,
    /// What to run.
    pub input: JobInput<M>,
    /// Jobs still waiting in the queue when this one was taken.
    pub queue_depth: usize,
}

/// What a job asks for.
#[derive(Debug)]
pub enum JobInput<M> {
    /// Run the connection's mounted model.
    Infer {
        /// The model mounted on the asking connection when the job was queued.
        model: Arc<M>,
        /// Input token ids.
        input_ids: Vec<i32>,
        /// Tokens to generate; 0 or less means the executor's default.
        max_tokens: i64,
    },
    /// Ask the node's local language model.
    Prompt {
        /// The prompt text.
        prompt: String,
        /// Output limit; 0 or less means the executor's default.
        max_out: i64,
    },
}

/// A successful job's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutput {
    /// `output_ids` of an `infer_result`.
    Infer(Vec<i32>),
    /// `text` of a `prompt_result`.
    Prompt(String),
}

/// A failed job: goes into the result frame as `error` and `code`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct JobError {
    /// Machine-readable, e.g. `executor_panicked`, `bad_input`.
    pub code: String,
    /// Human-readable.
    pub message: String,
}

impl JobError {
    /// A job error with `code` and `message`.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        JobError {
            code: code.into(),
            message: message.into(),
        }
    }
}

/// What a worker reports for a job.
pub type JobOutcome = Result<JobOutput, JobError>;

/// Which result frame a job gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JobKind {
    Infer,
    Prompt,
}

/// The result frame answering a job.
pub(crate) fn result_frame(
    kind: JobKind,
    job_id: String,
    queue_depth: usize,
    outcome: JobOutcome,
) -> Message<'static> {
    let outcome = match (kind, outcome) {
        (JobKind::Infer, Ok(JobOutput::Prompt(_))) | (JobKind::Prompt, Ok(JobOutput::Infer(_))) => {
            Err(JobError::new(
                "bad_output",
                "executor returned the wrong kind of output",
            ))
        }
        (_, outcome) => outcome,
    };
    let (ok, error, code) = match &outcome {
        Ok(_) => (true, String::new(), String::new()),
        Err(e) => (false, e.message.clone(), e.code.clone()),
    };
    let queue_depth = queue_depth as i64;
    match kind {
        JobKind::Infer => Message::InferResult(InferResult {
            job_id,
            ok,
            output_ids: match outcome {
                Ok(JobOutput::Infer(ids)) => ids,
                _ => Vec::new(),
            },
            error,
            code,
            queue_depth,
        }),
        JobKind::Prompt => Message::PromptResult(PromptResult {
            job_id,
            ok,
            text: match outcome {
                Ok(JobOutput::Prompt(text)) => text,
                _ => String::new(),
            },
            error,
            code,
            queue_depth,
        }),
    }
}
