//! Jobs: what the node's FIFO queue holds and what a worker hands back.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::id::JobId;
use crate::message::{ChatMessage, InferResult, Message, PromptResult, Usage};
use crate::sampling::SamplingParams;

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
    /// Set by the node when the job is cancelled or passes its deadline:
    /// [`run_job`](crate::run_job) hands it to the executor through
    /// [`JobContext::is_cancelled`]; whatever the job returns then is
    /// replaced by the node's `cancelled` / `deadline_exceeded` answer.
    pub cancel: Arc<AtomicBool>,
    /// When the node queued it (the `now` of the call that did), for queue-wait metrics.
    pub queued_at: Instant,
    /// The connection that asked (for logs).
    pub conn: crate::id::ConnectionId,
    /// How the job asks its tokens to be picked (extension `sampling`; empty
    /// for a connection that did not agree it).
    pub sampling: SamplingParams,
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
        /// Extension `chat`: set for every prompt of a connection that
        /// agreed it (the job then runs through [`Executor::chat`](crate::Executor::chat)).
        chat: Option<ChatJob>,
    },
}

/// What a `prompt` job of a connection that agreed `chat` adds to its text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChatJob {
    /// The conversation to render with the model's chat template (the
    /// job's `prompt` is then empty); empty for a text prompt.
    pub messages: Vec<ChatMessage>,
    /// The text prompt goes to the model as it is, with no template.
    pub raw: bool,
}

/// A `chat` job's answer: its text, and what it used and why it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The reply.
    pub text: String,
    /// Token counts and the finish reason.
    pub usage: Usage,
}

/// What a running job may consult and report besides its input: its id,
/// whether it should stop early, and where its partial output goes. One
/// place for what a job carries, so an extension adds a field here and not a
/// parameter to every executor.
pub struct JobContext<'a> {
    job_id: &'a str,
    cancelled: &'a AtomicBool,
    partial: &'a (dyn Fn(Partial<'_>) + Sync),
    /// Whether someone listens to `partial`.
    streams: bool,
    sampling: &'a SamplingParams,
}

/// Output a job produced so far, for [`JobContext::partial`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Partial<'a> {
    /// New token ids of an `infer` job (only those since the last call).
    Tokens(&'a [i32]),
    /// New text of a `prompt` job (only that since the last call).
    Text(&'a str),
}

static NEVER_CANCELLED: AtomicBool = AtomicBool::new(false);

static NODE_DEFAULT: SamplingParams = SamplingParams {
    temperature: None,
    top_p: None,
    top_k: None,
    repeat_penalty: None,
    seed: None,
    stop: Vec::new(),
};

impl<'a> JobContext<'a> {
    /// The context of a job named `job_id` that is never cancelled and whose
    /// partial output goes nowhere (what a direct call of an executor needs).
    pub fn new(job_id: &'a str) -> Self {
        JobContext {
            job_id,
            cancelled: &NEVER_CANCELLED,
            partial: &|_| {},
            streams: false,
            sampling: &NODE_DEFAULT,
        }
    }

    /// Cancellation read from `flag`: once it is set, the job should stop.
    #[must_use]
    pub fn with_cancel(mut self, flag: &'a AtomicBool) -> Self {
        self.cancelled = flag;
        self
    }

    /// Partial output handed to `sink` as it is produced.
    #[must_use]
    pub fn with_partial(mut self, sink: &'a (dyn Fn(Partial<'_>) + Sync)) -> Self {
        self.partial = sink;
        self.streams = true;
        self
    }

    /// The job's own sampling fields (extension `sampling`).
    #[must_use]
    pub fn with_sampling(mut self, sampling: &'a SamplingParams) -> Self {
        self.sampling = sampling;
        self
    }

    /// How the job asks its tokens to be picked; fields left out take the
    /// executor's defaults (all empty: the node's default, greedy unless its
    /// operator said otherwise).
    pub fn sampling(&self) -> &SamplingParams {
        self.sampling
    }

    /// Whether partial output is wanted (the job's client agreed `stream`): an
    /// executor may skip the work of preparing partials when it is not.
    pub fn streams(&self) -> bool {
        self.streams
    }

    /// The client's `job_id`, as sent (it may be empty or repeated).
    pub fn job_id(&self) -> &str {
        self.job_id
    }

    /// Whether the job was cancelled: an executor checks it between steps
    /// (tokens) and returns early; its result is then discarded.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// Reports output produced so far. Cheap when nobody listens; an executor
    /// that generates step by step calls it after each step.
    pub fn partial(&self, output: Partial<'_>) {
        (self.partial)(output)
    }
}

impl fmt::Debug for JobContext<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobContext")
            .field("job_id", &self.job_id)
            .field("cancelled", &self.is_cancelled())
            .field("streams", &self.streams)
            .field("sampling", &self.sampling)
            .finish_non_exhaustive()
    }
}

/// A successful job's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutput {
    /// `output_ids` of an `infer_result`.
    Infer(Vec<i32>),
    /// `text` of a `prompt_result`.
    Prompt(String),
    /// `text` and usage of a `prompt_result` of a `chat` job.
    Reply(Reply),
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

/// Why the node stopped a job before its executor finished it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// The client cancelled it, or went away.
    Cancelled,
    /// Its `deadline_ms` or the node's `max_job_time` passed.
    DeadlineExceeded,
}

impl Stop {
    /// The code of its job error.
    pub(crate) fn code(self) -> &'static str {
        match self {
            Stop::Cancelled => codes::CANCELLED,
            Stop::DeadlineExceeded => codes::DEADLINE_EXCEEDED,
        }
    }

    /// The job error its result frame carries.
    pub(crate) fn error(self) -> JobError {
        match self {
            Stop::Cancelled => JobError::new(codes::CANCELLED, "job cancelled"),
            Stop::DeadlineExceeded => {
                JobError::new(codes::DEADLINE_EXCEEDED, "job deadline exceeded")
            }
        }
    }
}

/// Codes of the job errors the node itself gives (docs/PROTOCOL.md §10), as
/// strings for [`JobError::new`]; [`ErrorCode`](crate::ErrorCode) holds them all.
pub mod codes {
    use crate::ErrorCode;

    /// The client cancelled the job (`cancel`), or it was dropped with its connection.
    pub const CANCELLED: &str = ErrorCode::Cancelled.as_str();
    /// The job's `deadline_ms`, or the node's `max_job_time`, passed first.
    pub const DEADLINE_EXCEEDED: &str = ErrorCode::DeadlineExceeded.as_str();
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
        (JobKind::Infer, Ok(JobOutput::Prompt(_) | JobOutput::Reply(_)))
        | (JobKind::Prompt, Ok(JobOutput::Infer(_))) => Err(JobError::new(
            crate::ErrorCode::BadOutput.as_str(),
            "executor returned the wrong kind of output",
        )),
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
        JobKind::Prompt => {
            let (text, usage) = match outcome {
                Ok(JobOutput::Prompt(text)) => (text, None),
                Ok(JobOutput::Reply(reply)) => (reply.text, Some(reply.usage)),
                _ => (String::new(), None),
            };
            Message::PromptResult(PromptResult {
                job_id,
                ok,
                text,
                error,
                code,
                queue_depth,
                usage,
            })
        }
    }
}
