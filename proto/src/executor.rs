//! The trait a node's workers call, and [`Stub`], the Go node's stub executor.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;

use sha2::Digest as _;

use crate::capability::Capabilities;
use crate::config::UploadHandling;
use crate::job::{ChatJob, Job, JobContext, JobError, JobInput, JobOutcome, JobOutput, Reply};
use crate::node::{Mount, MountOutcome};
use crate::upload::{UploadInfo, UploadWork};

/// Runs mounts and jobs. Plain synchronous Rust; adapters call it on worker threads.
pub trait Executor: Send + Sync + 'static {
    /// A mounted model, shared by the jobs of the connection that pushed it.
    type Model: Send + Sync + 'static;

    /// Where an upload's bytes go as they arrive, when [`spools_uploads`](Executor::spools_uploads)
    /// says so; [`NoSpool`] for an executor that takes the weights in memory.
    type Spool: Spool;

    /// Whether uploads are spooled: handed to [`open_spool`](Executor::open_spool)'s
    /// spool stretch by stretch as they arrive, so the node never holds a whole
    /// model. Hosts pick [`UploadHandling::Spool`](crate::UploadHandling::Spool) from it.
    fn spools_uploads(&self) -> bool {
        false
    }

    /// Opens a spool for an upload (off the I/O path, when its first bytes
    /// are handed over, or at its commit if it is smaller than a stretch). `Err` fails the upload: its commit gets `model_status`
    /// ok:false with this message.
    fn open_spool(&self, upload: &UploadInfo) -> Result<Self::Spool, String> {
        let _ = upload;
        Err("this executor does not spool uploads".to_owned())
    }

    /// Loads a committed upload (hash already verified). `Err` is the `model_status` message.
    fn mount(
        &self,
        config_json: String,
        weights: Weights<Self::Spool>,
    ) -> Result<Self::Model, String>;

    /// Loads a model from a file holding exactly its weights (a node's model
    /// store keeps them so; the hash is verified). By default the file is read
    /// into memory and handed to [`mount`](Executor::mount); an executor that
    /// can map or stream a file should override it.
    fn mount_file(&self, config_json: String, path: &Path) -> Result<Self::Model, String> {
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read the stored model: {e}"))?;
        self.mount(config_json, Weights::Memory(bytes))
    }

    /// Whether one mounted model may serve several connections at once (a
    /// node's model store then mounts a model once for every connection that
    /// uses it). True only if [`infer`](Executor::infer) on one model is safe
    /// and sensible from several threads.
    fn shares_models(&self) -> bool {
        false
    }

    /// Runs an `infer` job; `job` says which (its `job_id`, cancellation,
    /// where partial output goes).
    fn infer(
        &self,
        model: &Self::Model,
        input_ids: &[i32],
        max_tokens: i64,
        job: &JobContext<'_>,
    ) -> Result<Vec<i32>, JobError>;

    /// The protocol extensions this executor honours (docs/PROTOCOL.md §10),
    /// for the node to offer: `sampling` when it reads
    /// [`JobContext::sampling`], `stream` when it reports
    /// [`JobContext::partial`] output. By default none.
    fn extensions(&self) -> Capabilities {
        Capabilities::NONE
    }

    /// Runs a `prompt` job. By default an executor has no language model: the
    /// job fails with `no_local_lm`.
    fn prompt(&self, prompt: &str, max_out: i64, job: &JobContext<'_>) -> Result<String, JobError> {
        let _ = (prompt, max_out, job);
        Err(JobError::new(
            "no_local_lm",
            "this node's executor does not answer prompts",
        ))
    }

    /// Runs a `prompt` job of a connection that agreed `chat`
    /// (docs/PROTOCOL.md §10.9): `prompt` (through the node's usual
    /// handling, or as it is when `chat.raw`) or `chat.messages` rendered
    /// with the model's chat template, answered with the tokens it read and
    /// made and why it stopped. An executor that implements it lists `chat`
    /// in [`extensions`](Executor::extensions); by default the job fails
    /// `unsupported`.
    fn chat(
        &self,
        prompt: &str,
        chat: &ChatJob,
        max_out: i64,
        job: &JobContext<'_>,
    ) -> Result<Reply, JobError> {
        let _ = (prompt, chat, max_out, job);
        Err(JobError::new(
            crate::ErrorCode::Unsupported.as_str(),
            "this node's executor does not answer chat jobs",
        ))
    }
}

impl UploadHandling {
    /// What a driver that runs upload work offers `executor`: spooling when
    /// it [spools](Executor::spools_uploads), else hashing as the bytes arrive.
    pub fn for_executor<E: Executor>(executor: &E) -> Self {
        if executor.spools_uploads() {
            UploadHandling::Spool
        } else {
            UploadHandling::HashAsItArrives
        }
    }
}

/// Receives an upload's bytes in order, on worker threads, one stretch at a time.
pub trait Spool: Send + 'static {
    /// Takes the next stretch. `Err` fails the upload with this message.
    fn write(&mut self, bytes: &[u8]) -> Result<(), String>;
}

/// The spool of an executor that does not spool: it cannot be made.
#[derive(Debug)]
pub enum NoSpool {}

impl Spool for NoSpool {
    fn write(&mut self, _bytes: &[u8]) -> Result<(), String> {
        match *self {}
    }
}

/// A committed model's weights, as [`Executor::mount`] receives them.
#[derive(Debug)]
pub enum Weights<S> {
    /// Every byte, in memory.
    Memory(Vec<u8>),
    /// Every byte was written to this spool, in order.
    Spooled(S),
}

impl Weights<NoSpool> {
    /// The bytes, for an executor that does not spool (its weights are
    /// always in memory).
    pub fn into_memory(self) -> Vec<u8> {
        match self {
            Weights::Memory(bytes) => bytes,
            Weights::Spooled(never) => match never {},
        }
    }
}

/// Runs `job` on `executor`; a panic becomes an `executor_panicked` job error.
pub fn run_job<E: Executor>(executor: &E, job: &Job<E::Model>) -> JobOutcome {
    let context = JobContext::new(&job.job_id)
        .with_cancel(&job.cancel)
        .with_sampling(&job.sampling);
    run_job_in(executor, job, &context)
}

/// [`run_job`] with a context the driver built (a partial-output sink, a
/// cancel flag); the context's sampling should be the job's own
/// ([`JobContext::with_sampling`] of [`Job::sampling`]).
pub fn run_job_in<E: Executor>(
    executor: &E,
    job: &Job<E::Model>,
    context: &JobContext<'_>,
) -> JobOutcome {
    catch_unwind(AssertUnwindSafe(|| match &job.input {
        JobInput::Infer {
            model,
            input_ids,
            max_tokens,
        } => executor
            .infer(model, input_ids, *max_tokens, context)
            .map(JobOutput::Infer),
        JobInput::Prompt {
            prompt,
            max_out,
            chat: None,
        } => executor
            .prompt(prompt, *max_out, context)
            .map(JobOutput::Prompt),
        JobInput::Prompt {
            prompt,
            max_out,
            chat: Some(chat),
        } => executor
            .chat(prompt, chat, *max_out, context)
            .map(JobOutput::Reply),
    }))
    .unwrap_or_else(|_| Err(JobError::new("executor_panicked", "executor panicked")))
}

/// Runs a stretch of an upload (from [`Event::Upload`](crate::Event::Upload)) on
/// `executor`: hashes it and, when spooling, writes it to the upload's spool
/// (opened here the first time). Hand it back with
/// [`Node::upload_work_done`](crate::Node::upload_work_done).
pub fn run_upload<E: Executor>(executor: &E, work: &mut UploadWork) {
    if let Some(hash) = &mut work.carried.hash {
        hash.update(&work.data);
    }
    if work.spooling && work.carried.spool_error.is_none() {
        let carried = &mut work.carried;
        let open_with = &mut work.open_with;
        let written = take_spool(executor, carried.spool.take(), || {
            open_with.take().unwrap_or_default()
        })
        .and_then(|mut spool| guarded_write(&mut spool, &work.data).map(|()| spool));
        match written {
            Ok(spool) => carried.spool = Some(Box::new(spool)),
            Err(e) => carried.spool_error = Some(e),
        }
    }
    work.data.clear();
}

/// Verifies and loads a committed upload on `executor`; hand the outcome to
/// [`Node::mount_done`](crate::Node::mount_done). A spooled upload's last
/// bytes are written to its spool first.
pub fn run_mount<E: Executor>(executor: &E, mount: Mount) -> MountOutcome<E::Model> {
    let Mount { token, mut model } = mount;
    if let Some(failure) = model.spool_failure() {
        let result = Err(failure.to_owned());
        return MountOutcome { token, result };
    }
    let result = model
        .verify()
        .map_err(|e| e.to_string())
        .and_then(|()| {
            if !model.is_spooled() {
                return Ok(Weights::Memory(std::mem::take(&mut model.weights)));
            }
            let info = model.info();
            let (spool, failed) = model.take_spool();
            if let Some(e) = failed {
                return Err(e);
            }
            let mut spool = take_spool(executor, spool, || info)?;
            guarded_write(&mut spool, &model.weights)?;
            Ok(Weights::Spooled(spool))
        })
        .and_then(|weights| {
            catch_unwind(AssertUnwindSafe(|| {
                executor.mount(model.config_json, weights)
            }))
            .unwrap_or_else(|_| Err("executor panicked while mounting".to_owned()))
            .map(Arc::new)
        });
    MountOutcome { token, result }
}

/// The upload's spool: the one opened before, or a new one opened with `info()`.
fn take_spool<E: Executor>(
    executor: &E,
    spool: Option<crate::upload::ErasedSpool>,
    info: impl FnOnce() -> UploadInfo,
) -> Result<E::Spool, String> {
    match spool {
        Some(spool) => spool
            .downcast::<E::Spool>()
            .map(|spool| *spool)
            .map_err(|_| "the upload was spooled by another executor".to_owned()),
        None => {
            let info = info();
            catch_unwind(AssertUnwindSafe(|| executor.open_spool(&info)))
                .unwrap_or_else(|_| Err("executor panicked while opening a spool".to_owned()))
        }
    }
}

fn guarded_write<S: Spool>(spool: &mut S, bytes: &[u8]) -> Result<(), String> {
    if bytes.is_empty() {
        return Ok(());
    }
    catch_unwind(AssertUnwindSafe(|| spool.write(bytes)))
        .unwrap_or_else(|_| Err("executor panicked while spooling".to_owned()))
}

/// Reproduces the Go node's stub outputs exactly (docs/PROTOCOL.md).
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
    type Spool = NoSpool;

    fn mount(&self, _config_json: String, _weights: Weights<NoSpool>) -> Result<(), String> {
        Ok(())
    }

    /// The stub ignores weights: a stored model is not read back.
    fn mount_file(&self, _config_json: String, _path: &Path) -> Result<(), String> {
        Ok(())
    }

    fn shares_models(&self) -> bool {
        true
    }

    fn infer(
        &self,
        _model: &(),
        input_ids: &[i32],
        max_tokens: i64,
        _job: &JobContext<'_>,
    ) -> Result<Vec<i32>, JobError> {
        Ok(Stub::infer_ids(input_ids, max_tokens))
    }

    fn prompt(
        &self,
        prompt: &str,
        _max_out: i64,
        _job: &JobContext<'_>,
    ) -> Result<String, JobError> {
        Ok(self.reply(prompt))
    }
}
