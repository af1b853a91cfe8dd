//! [`WorkerProcess`]: a pool of long-lived worker processes speaking JSON lines.
//!
//! The pool has one slot per worker thread. A job takes a free slot (one that
//! already has the job's model mounted when there is one), replays the mount
//! there if that process has not seen the model yet, sends one request line and
//! waits for one reply line, bounded by a timeout. A process that fails a job
//! (exit, timeout, or output that is not the protocol) is killed and restarted
//! at once; only that job fails. A dropped model's temporary directory is
//! removed at once, and its `unmount` is sent by a janitor thread to every idle
//! process that has it (and by the next job to a busy one), so dropping a model
//! never blocks.

use std::collections::HashSet;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tempfile::TempDir;

use donate_proto::{Executor, JobContext, JobError, Spool, UploadInfo, Weights};

use crate::codes;
use crate::process::{self, Line};
use crate::weights_file::WeightsFile;

/// Settings of a [`WorkerProcess`] pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerConfig {
    /// Worker processes (one per worker thread of the node).
    pub workers: usize,
    /// Longest an `infer` or `prompt` request may wait for its reply.
    pub job_timeout: Duration,
    /// Longest a `mount` (first or replayed) may wait for its reply.
    pub mount_timeout: Duration,
    /// Longest an `unmount` may wait for its reply.
    pub unmount_timeout: Duration,
    /// Longest reply line accepted, in bytes; a longer one is a protocol error.
    pub max_line: usize,
    /// Where the private per-model directories are made (default: the system
    /// temporary directory).
    pub temp_root: Option<PathBuf>,
    /// Longest a worker may take to exit once its stdin is closed, when the
    /// executor is dropped, before it is killed.
    pub exit_grace: Duration,
    /// Longest a worker may take to answer once it was sent a `cancel` line
    /// for the job it runs, before it is killed and restarted (default 2 s).
    pub cancel_grace: Duration,
    /// How long new workers are watched before [`WorkerProcess::new`]
    /// returns: one that exits meanwhile (a script that is not there, a
    /// missing module) fails the start with its exit status and last stderr
    /// line, rather than the first push (default 250 ms; zero: not watched).
    pub start_check: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            workers: 1,
            job_timeout: Duration::from_secs(60),
            mount_timeout: Duration::from_secs(300),
            unmount_timeout: Duration::from_secs(10),
            max_line: 64 * 1024 * 1024,
            temp_root: None,
            exit_grace: Duration::from_secs(2),
            cancel_grace: Duration::from_secs(2),
            start_check: Duration::from_millis(250),
        }
    }
}

/// Runs mounts and jobs on a pool of worker processes (`--executor 'cmd:…'`).
/// The protocol is `docs/WORKER-PROTOCOL.md`.
pub struct WorkerProcess {
    pool: Arc<Pool>,
    janitor: Option<JoinHandle<()>>,
}

/// A model mounted through a [`WorkerProcess`]. It owns the private temporary
/// directory holding the weights file; dropping it removes the directory and
/// unmounts the model from every worker that has it.
pub struct WorkerModel {
    id: u64,
    config_json: String,
    weights_path: PathBuf,
    /// `weights_path` as the UTF-8 string the protocol carries.
    weights_path_str: String,
    weights_len: u64,
    sha256: String,
    dir: Option<TempDir>,
    pool: Weak<Pool>,
}

impl WorkerModel {
    /// The model's id in the worker protocol.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The weights file the workers read.
    pub fn weights_path(&self) -> &Path {
        &self.weights_path
    }
}

impl std::fmt::Debug for WorkerModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerModel")
            .field("id", &self.id)
            .field("weights_path", &self.weights_path)
            .field("weights_len", &self.weights_len)
            .finish_non_exhaustive()
    }
}

impl Drop for WorkerModel {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade() {
            pool.forget(self.id);
        }
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_owned();
            if let Err(e) = dir.close() {
                tracing::warn!(path = %path.display(), "cannot remove a model's temporary directory: {e}");
            }
        }
    }
}

impl WorkerProcess {
    /// Starts `config.workers` processes running `argv` (see
    /// [`split_command`](crate::split_command)). Fails if the program cannot be
    /// started.
    pub fn new(argv: Vec<String>, config: WorkerConfig) -> io::Result<WorkerProcess> {
        if argv.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty argv"));
        }
        let workers = config.workers.max(1);
        let pool = Arc::new(Pool {
            argv,
            config,
            state: Mutex::new(PoolState {
                idle: Vec::with_capacity(workers),
                unmounts: vec![Vec::new(); workers],
                shutdown: false,
            }),
            freed: Condvar::new(),
            janitor_work: Condvar::new(),
            next_model: AtomicU64::new(1),
        });
        let mut slots = Vec::with_capacity(workers);
        for index in 0..workers {
            let proc = Proc::spawn(&pool.argv, index, 0, pool.config.max_line)?;
            slots.push(Slot {
                index,
                restarts: 0,
                proc: Some(proc),
                mounted: HashSet::new(),
            });
        }
        watch_start(&mut slots, pool.config.start_check)?;
        slots.reverse(); // slot 0 is taken first
        pool.lock().idle = slots;
        let janitor = {
            let pool = Arc::clone(&pool);
            thread::Builder::new()
                .name("donate-exec-janitor".into())
                .spawn(move || pool.janitor())?
        };
        Ok(WorkerProcess {
            pool,
            janitor: Some(janitor),
        })
    }

    /// The pool's settings.
    pub fn config(&self) -> &WorkerConfig {
        &self.pool.config
    }

    /// The pids of the worker processes now running (idle ones only: a busy
    /// worker is not listed). For tests and diagnostics.
    pub fn idle_pids(&self) -> Vec<u32> {
        let state = self.pool.lock();
        state
            .idle
            .iter()
            .filter_map(|slot| slot.proc.as_ref().map(|p| p.pid))
            .collect()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let slots = {
            let mut state = self.pool.lock();
            state.shutdown = true;
            std::mem::take(&mut state.idle)
        };
        self.pool.janitor_work.notify_all();
        if let Some(janitor) = self.janitor.take() {
            let _ = janitor.join();
        }
        // The janitor may have held a slot; it is back in `idle` now.
        let mut slots = slots;
        slots.append(&mut self.pool.lock().idle);
        let mut procs: Vec<Proc> = slots.into_iter().filter_map(|s| s.proc).collect();
        for proc in &mut procs {
            proc.close_stdin();
        }
        let deadline = process::deadline(self.pool.config.exit_grace);
        for mut proc in procs {
            let left = deadline.saturating_duration_since(Instant::now());
            if process::wait_for(&mut proc.child, left).is_none() {
                tracing::warn!(
                    "{}: still running {:?} after its stdin closed; killed",
                    proc.name,
                    self.pool.config.exit_grace
                );
            }
            // Dropping kills and reaps whatever is left.
        }
    }
}

impl WorkerProcess {
    /// Mounts the weights at `weights_path` on a worker.
    fn mount_path(
        &self,
        config_json: String,
        weights_path: PathBuf,
        weights_len: u64,
        sha256: String,
        dir: Option<TempDir>,
    ) -> Result<WorkerModel, String> {
        let pool = &self.pool;
        let weights_path_str = weights_path
            .to_str()
            .ok_or("the weights file's path is not UTF-8")?
            .to_owned();
        let model = WorkerModel {
            id: pool.next_model.fetch_add(1, Ordering::Relaxed),
            config_json,
            weights_path,
            weights_path_str,
            weights_len,
            sha256,
            dir,
            pool: Arc::downgrade(pool),
        };
        let mut slot = pool.checkout(None);
        match slot.call(&Request::mount(&model), pool.config.mount_timeout) {
            Ok(reply) if reply.ok => {
                slot.mounted.insert(model.id);
                Ok(model)
            }
            Ok(reply) => Err(reply.error_text("the worker refused the model")),
            Err(failure) => Err(slot.fail(pool, failure, "mount").message),
        }
    }
}

impl Executor for WorkerProcess {
    type Model = WorkerModel;
    type Spool = WeightsFile;

    /// Pushed weights are written to their file as the chunks arrive.
    fn spools_uploads(&self) -> bool {
        true
    }

    fn open_spool(&self, upload: &UploadInfo) -> Result<WeightsFile, String> {
        WeightsFile::create(
            self.pool.config.temp_root.as_deref(),
            upload.weights_len,
            true,
        )
    }

    fn mount(
        &self,
        config_json: String,
        weights: Weights<WeightsFile>,
    ) -> Result<WorkerModel, String> {
        let pool = &self.pool;
        let file = match weights {
            Weights::Spooled(file) => file,
            Weights::Memory(bytes) => {
                let mut file = WeightsFile::create(
                    pool.config.temp_root.as_deref(),
                    bytes.len() as u64,
                    true,
                )?;
                file.write(&bytes)?;
                file
            }
        };
        if !file.is_complete() {
            return Err(format!(
                "the weights file holds {} bytes, fewer than announced",
                file.written()
            ));
        }
        let (dir, weights_path, weights_len, sha256) = file.close();
        self.mount_path(
            config_json,
            weights_path,
            weights_len,
            sha256.unwrap_or_default(),
            Some(dir),
        )
    }

    /// A stored file stays where the store keeps it (and pinned while mounted).
    fn mount_file(&self, config_json: String, path: &Path) -> Result<WorkerModel, String> {
        let len = std::fs::metadata(path)
            .map_err(|e| format!("cannot read the stored model: {e}"))?
            .len();
        self.mount_path(config_json, path.to_owned(), len, String::new(), None)
    }

    /// Each worker mounts a model once and keeps it: any connection may use it.
    fn shares_models(&self) -> bool {
        true
    }

    fn infer(
        &self,
        model: &WorkerModel,
        input_ids: &[i32],
        max_tokens: i64,
        job: &JobContext<'_>,
    ) -> Result<Vec<i32>, JobError> {
        let pool = &self.pool;
        let mut slot = pool.checkout(Some(model.id));
        if !slot.mounted.contains(&model.id) {
            match slot.call(&Request::mount(model), pool.config.mount_timeout) {
                Ok(reply) if reply.ok => {
                    slot.mounted.insert(model.id);
                }
                Ok(reply) => {
                    return Err(JobError::new(
                        codes::WORKER_MOUNT_REFUSED,
                        reply.error_text("the worker refused the model"),
                    ))
                }
                Err(failure) => return Err(slot.fail(pool, failure, "mount")),
            }
        }
        let request = Request::Infer {
            model: model.id,
            job_id: job.job_id(),
            input_ids,
            max_tokens,
        };
        let reply = slot.job(pool, &request, "infer", job)?;
        reply.output_ids.ok_or_else(|| {
            slot.fail(
                pool,
                Failure::Protocol("ok reply without output_ids".into()),
                "infer",
            )
        })
    }

    fn prompt(&self, prompt: &str, max_out: i64, job: &JobContext<'_>) -> Result<String, JobError> {
        let pool = &self.pool;
        let mut slot = pool.checkout(None);
        let request = Request::Prompt {
            job_id: job.job_id(),
            prompt,
            max_out,
        };
        let reply = slot.job(pool, &request, "prompt", job)?;
        reply.text.ok_or_else(|| {
            slot.fail(
                pool,
                Failure::Protocol("ok reply without text".into()),
                "prompt",
            )
        })
    }
}

/// One request line.
#[derive(Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Request<'a> {
    Mount {
        model: u64,
        config_json: &'a str,
        weights_path: &'a str,
        weights_len: u64,
        sha256: &'a str,
    },
    Infer {
        model: u64,
        job_id: &'a str,
        input_ids: &'a [i32],
        max_tokens: i64,
    },
    Prompt {
        job_id: &'a str,
        prompt: &'a str,
        max_out: i64,
    },
    Unmount {
        model: u64,
    },
    /// Sent while a job runs, when it is cancelled; answered by the job's reply.
    Cancel {
        job_id: &'a str,
    },
}

impl<'a> Request<'a> {
    fn mount(model: &'a WorkerModel) -> Request<'a> {
        Request::Mount {
            model: model.id,
            config_json: &model.config_json,
            weights_path: &model.weights_path_str,
            weights_len: model.weights_len,
            sha256: &model.sha256,
        }
    }
}

/// One reply line. Unknown fields are ignored.
#[derive(Debug, Deserialize)]
struct Reply {
    ok: bool,
    #[serde(default)]
    output_ids: Option<Vec<i32>>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    code: Option<String>,
}

impl Reply {
    fn error_text(&self, default: &str) -> String {
        match self.error.as_deref() {
            Some(e) if !e.is_empty() => e.to_owned(),
            _ => default.to_owned(),
        }
    }
}

/// Why a request got no valid reply.
#[derive(Debug)]
enum Failure {
    Crashed(String),
    Timeout(Duration),
    Protocol(String),
    Unavailable(String),
    /// The job was cancelled and the worker answered within the grace period.
    Cancelled,
    /// The job was cancelled and the worker did not answer within the grace period.
    CancelIgnored(Duration),
}

/// How often a running job's cancel flag is looked at while its reply is awaited.
const CANCEL_POLL: Duration = Duration::from_millis(5);

struct Pool {
    argv: Vec<String>,
    config: WorkerConfig,
    state: Mutex<PoolState>,
    /// A slot came back.
    freed: Condvar,
    /// An idle slot may have an unmount to send, or the pool is shutting down.
    janitor_work: Condvar,
    next_model: AtomicU64,
}

struct PoolState {
    idle: Vec<Slot>,
    /// Per slot index: dropped models that slot may still have mounted.
    unmounts: Vec<Vec<u64>>,
    shutdown: bool,
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a free slot, preferring one that has `model` mounted, and readies it.
    fn checkout(&self, model: Option<u64>) -> Checkout<'_> {
        let mut state = self.lock();
        loop {
            if !state.idle.is_empty() {
                let at = model
                    .and_then(|m| state.idle.iter().rposition(|s| s.mounted.contains(&m)))
                    .unwrap_or(state.idle.len() - 1);
                let slot = state.idle.remove(at);
                let unmounts = std::mem::take(&mut state.unmounts[slot.index]);
                drop(state);
                let mut checkout = Checkout {
                    pool: self,
                    slot: Some(slot),
                };
                checkout.ready(self, unmounts);
                return checkout;
            }
            state = self.freed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn checkin(&self, slot: Slot) {
        let mut state = self.lock();
        let unmounts = !state.unmounts[slot.index].is_empty();
        state.idle.push(slot);
        drop(state);
        self.freed.notify_one();
        if unmounts {
            self.janitor_work.notify_one();
        }
    }

    /// A model was dropped: every slot unmounts it before its next use.
    fn forget(&self, model: u64) {
        let mut state = self.lock();
        if state.shutdown {
            return;
        }
        for list in &mut state.unmounts {
            list.push(model);
        }
        drop(state);
        self.janitor_work.notify_one();
    }

    /// Sends pending unmounts to idle slots that have those models mounted.
    fn janitor(&self) {
        let mut state = self.lock();
        loop {
            if state.shutdown {
                return;
            }
            let mut found = None;
            let PoolState { idle, unmounts, .. } = &mut *state;
            for (at, slot) in idle.iter().enumerate() {
                let list = &mut unmounts[slot.index];
                if list.iter().any(|m| slot.mounted.contains(m)) {
                    found = Some((at, std::mem::take(list)));
                    break;
                }
                list.clear();
            }
            match found {
                Some((at, list)) => {
                    let slot = state.idle.remove(at);
                    drop(state);
                    let mut checkout = Checkout {
                        pool: self,
                        slot: Some(slot),
                    };
                    checkout.ready(self, list);
                    drop(checkout);
                    state = self.lock();
                }
                None => {
                    state = self
                        .janitor_work
                        .wait(state)
                        .unwrap_or_else(|p| p.into_inner())
                }
            }
        }
    }
}

/// A slot taken from the pool; it goes back when dropped.
struct Checkout<'a> {
    pool: &'a Pool,
    slot: Option<Slot>,
}

impl std::ops::Deref for Checkout<'_> {
    type Target = Slot;
    fn deref(&self) -> &Slot {
        self.slot.as_ref().expect("slot present until drop")
    }
}

impl std::ops::DerefMut for Checkout<'_> {
    fn deref_mut(&mut self) -> &mut Slot {
        self.slot.as_mut().expect("slot present until drop")
    }
}

impl Drop for Checkout<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.pool.checkin(slot);
        }
    }
}

/// One place in the pool: a worker process (absent when it could not be
/// started) and the models it has mounted.
struct Slot {
    index: usize,
    restarts: u32,
    proc: Option<Proc>,
    mounted: HashSet<u64>,
}

impl Slot {
    fn name(&self) -> String {
        match &self.proc {
            Some(proc) => proc.name.clone(),
            None => format!("w{}", self.index),
        }
    }

    /// Before a use: starts the process if it is missing or died while idle,
    /// or if it printed something unasked; then sends pending unmounts.
    fn ready(&mut self, pool: &Pool, unmounts: Vec<u64>) {
        let problem = match &mut self.proc {
            None => Some("not running".to_owned()),
            Some(proc) => proc.idle_problem(),
        };
        if let Some(problem) = problem {
            if self.proc.is_some() {
                tracing::warn!("{}: {problem}; restarting it", self.name());
            }
            self.restart(pool);
        }
        for model in unmounts {
            if self.mounted.remove(&model) {
                if let Err(failure) =
                    self.call(&Request::Unmount { model }, pool.config.unmount_timeout)
                {
                    self.fail(pool, failure, "unmount");
                }
            }
        }
    }

    /// Sends a job request; an `ok:false` reply is the job's error. A
    /// cancelled job is sent a `cancel` line; a worker that does not answer
    /// within the grace period is killed and restarted.
    fn job(
        &mut self,
        pool: &Pool,
        request: &Request<'_>,
        what: &str,
        job: &JobContext<'_>,
    ) -> Result<Reply, JobError> {
        let cancel = Some((job, pool.config.cancel_grace));
        match self.call_cancellable(request, pool.config.job_timeout, cancel) {
            Err(Failure::Cancelled) => Err(JobError::new(
                donate_proto::codes::CANCELLED,
                format!("{what} cancelled; worker {} stopped it", self.name()),
            )),
            Ok(reply) if reply.ok => Ok(reply),
            Ok(reply) => Err(JobError::new(
                reply
                    .code
                    .clone()
                    .filter(|c| !c.is_empty())
                    .unwrap_or_else(|| codes::WORKER_ERROR.to_owned()),
                reply.error_text("the worker failed the job"),
            )),
            Err(failure) => Err(self.fail(pool, failure, what)),
        }
    }

    /// Sends one request and waits up to `timeout` for its reply line.
    fn call(&mut self, request: &Request<'_>, timeout: Duration) -> Result<Reply, Failure> {
        self.call_cancellable(request, timeout, None)
    }

    /// [`call`](Slot::call), watching `cancel`'s job: once it is cancelled the
    /// worker is sent a `cancel` line and given the grace period to answer.
    fn call_cancellable(
        &mut self,
        request: &Request<'_>,
        timeout: Duration,
        cancel: Option<(&JobContext<'_>, Duration)>,
    ) -> Result<Reply, Failure> {
        let name = self.name();
        let Some(proc) = self.proc.as_mut() else {
            return Err(Failure::Unavailable(format!("{name} is not running")));
        };
        let mut line = serde_json::to_vec(request).expect("requests serialize");
        line.push(b'\n');
        if proc.send(line).is_err() {
            return Err(Failure::Crashed(proc.exit_report()));
        }
        let deadline = process::deadline(timeout);
        // Once the cancel line is sent: until when the worker may answer it.
        let mut grace_until: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let left = deadline.saturating_duration_since(now);
            let wait = match (cancel, grace_until) {
                (_, Some(until)) => until.saturating_duration_since(now),
                (Some((job, grace)), None) if job.is_cancelled() => {
                    let mut line = serde_json::to_vec(&Request::Cancel {
                        job_id: job.job_id(),
                    })
                    .expect("requests serialize");
                    line.push(b'\n');
                    if proc.send(line).is_err() {
                        return Err(Failure::Crashed(proc.exit_report()));
                    }
                    grace_until = Some(now + grace);
                    continue;
                }
                (Some(_), None) => left.min(CANCEL_POLL),
                (None, None) => left,
            };
            let line = match proc.replies.recv_timeout(wait) {
                Ok(Line::Text(line)) => line,
                Ok(Line::TooLong) => {
                    return Err(Failure::Protocol(format!(
                        "a reply line longer than {} bytes",
                        proc.max_line
                    )))
                }
                Ok(Line::Eof) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(Failure::Crashed(proc.exit_report()))
                }
                Ok(Line::Failed(e)) => {
                    return Err(Failure::Crashed(format!("reading its stdout failed: {e}")))
                }
                Err(mpsc::RecvTimeoutError::Timeout) => match grace_until {
                    Some(until) if Instant::now() >= until => {
                        let grace = cancel.map(|(_, g)| g).unwrap_or_default();
                        return Err(Failure::CancelIgnored(grace));
                    }
                    _ if Instant::now() >= deadline => return Err(Failure::Timeout(timeout)),
                    _ => continue,
                },
            };
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            if grace_until.is_some() {
                // Whatever it says, the worker stopped and is in step again.
                return Err(Failure::Cancelled);
            }
            return serde_json::from_slice::<Reply>(&line)
                .map_err(|e| Failure::Protocol(format!("{e} in reply line {}", preview(&line))));
        }
    }

    /// Kills and restarts the process after `failure`; the job's error.
    fn fail(&mut self, pool: &Pool, failure: Failure, what: &str) -> JobError {
        let name = self.name();
        let (code, message) = match failure {
            Failure::Crashed(how) => (
                codes::WORKER_CRASHED,
                format!("worker {name} crashed during {what}: {how}"),
            ),
            Failure::Timeout(limit) => (
                codes::WORKER_TIMEOUT,
                format!("worker {name} did not answer {what} within {limit:?}"),
            ),
            Failure::Protocol(what_broke) => (
                codes::WORKER_PROTOCOL,
                format!("worker {name} broke the protocol during {what}: {what_broke}"),
            ),
            Failure::Unavailable(why) => (codes::WORKER_UNAVAILABLE, why),
            Failure::CancelIgnored(grace) => (
                donate_proto::codes::CANCELLED,
                format!("{what} cancelled; worker {name} did not stop within {grace:?}"),
            ),
            Failure::Cancelled => (donate_proto::codes::CANCELLED, format!("{what} cancelled")),
        };
        tracing::warn!(code, "{message}; restarting it");
        self.restart(pool);
        JobError::new(code, message)
    }

    /// Kills the process (if any) and starts a fresh one, which has nothing mounted.
    fn restart(&mut self, pool: &Pool) {
        self.proc = None; // dropping kills and reaps
        self.mounted.clear();
        self.restarts += 1;
        match Proc::spawn(&pool.argv, self.index, self.restarts, pool.config.max_line) {
            Ok(proc) => self.proc = Some(proc),
            Err(e) => tracing::error!("cannot start worker w{}: {e}", self.index),
        }
    }
}

/// Up to 200 characters of a line, for error messages.
fn preview(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(&line[..line.len().min(200)]);
    if line.len() > 200 {
        format!("{text:?}…")
    } else {
        format!("{text:?}")
    }
}

/// Fails when a worker of `slots` exits within `window` of its start.
fn watch_start(slots: &mut [Slot], window: Duration) -> io::Result<()> {
    let until = Instant::now() + window;
    loop {
        for proc in slots.iter_mut().filter_map(|slot| slot.proc.as_mut()) {
            if let Some(why) = proc.exited_at_start() {
                return Err(io::Error::other(why));
            }
        }
        if Instant::now() >= until {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// A running worker process: a writer thread feeds its stdin, a reader thread
/// splits its stdout into lines, another logs its stderr.
struct Proc {
    child: Child,
    pid: u32,
    /// `w<slot>.<restarts>[pid]`, the prefix of its log lines.
    name: String,
    requests: Option<mpsc::Sender<Vec<u8>>>,
    replies: mpsc::Receiver<Line>,
    max_line: usize,
    /// Its last stderr line.
    last_stderr: Arc<Mutex<String>>,
}

impl Proc {
    fn spawn(argv: &[String], index: usize, restarts: u32, max_line: usize) -> io::Result<Proc> {
        let mut child = process::command(argv).spawn().map_err(|e| {
            io::Error::new(e.kind(), format!("cannot start worker {:?}: {e}", argv[0]))
        })?;
        let pid = child.id();
        let id = if restarts == 0 {
            format!("w{index}")
        } else {
            format!("w{index}.{restarts}")
        };
        let name = format!("{id}[{pid}]");
        let started = (|| {
            let stdin = child.stdin.take().expect("piped stdin");
            let stdout = child.stdout.take().expect("piped stdout");
            let stderr = child.stderr.take().expect("piped stderr");
            let last_stderr =
                process::log_stderr(format!("donate-{id}-stderr"), name.clone(), stderr)?;
            let replies = process::line_reader(format!("donate-{id}-stdout"), stdout, max_line)?;
            let requests = writer(format!("donate-{id}-stdin"), stdin)?;
            Ok((requests, replies, last_stderr))
        })();
        match started {
            Ok((requests, replies, last_stderr)) => {
                tracing::debug!("{name}: worker started");
                Ok(Proc {
                    child,
                    pid,
                    name,
                    requests: Some(requests),
                    replies,
                    max_line,
                    last_stderr,
                })
            }
            Err(e) => {
                process::kill(&mut child);
                Err(e)
            }
        }
    }

    fn send(&self, line: Vec<u8>) -> Result<(), ()> {
        match &self.requests {
            Some(requests) => requests.send(line).map_err(drop),
            None => Err(()),
        }
    }

    /// Why this idle process cannot take a request: it exited, or it printed
    /// something nobody asked for.
    fn idle_problem(&mut self) -> Option<String> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(format!("exited while idle ({status})"));
        }
        match self.replies.try_recv() {
            Err(mpsc::TryRecvError::Empty) => None,
            Ok(Line::Text(line)) => Some(format!("printed {} unasked", preview(&line))),
            Ok(other) => Some(format!("stdout while idle: {other:?}")),
            Err(mpsc::TryRecvError::Disconnected) => Some("stdout closed".to_owned()),
        }
    }

    /// Why a process that just started is gone, if it is: its status and
    /// its last stderr line (given a moment to arrive).
    fn exited_at_start(&mut self) -> Option<String> {
        let status = self.child.try_wait().ok()??;
        let until = Instant::now() + Duration::from_millis(200);
        let last = loop {
            let last = self
                .last_stderr
                .lock()
                .map(|l| l.clone())
                .unwrap_or_default();
            if !last.is_empty() || Instant::now() >= until {
                break last;
            }
            thread::sleep(Duration::from_millis(5));
        };
        let said = match last.is_empty() {
            true => " and printed nothing on stderr".to_owned(),
            false => format!("; its last stderr line: {last}"),
        };
        Some(format!(
            "worker {} exited at start ({status}){said}",
            self.name
        ))
    }

    /// How the process ended, once its stdout has closed.
    fn exit_report(&mut self) -> String {
        match process::wait_for(&mut self.child, Duration::from_millis(500)) {
            Some(status) => format!("exited ({status})"),
            None => "closed its stdout".to_owned(),
        }
    }

    /// Closes stdin (the writer thread ends): a well-behaved worker exits.
    fn close_stdin(&mut self) {
        self.requests = None;
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.requests = None;
        process::kill(&mut self.child);
        tracing::debug!("{}: worker stopped", self.name);
    }
}

/// A thread that writes each line it is sent to `stdin`, and closes it when
/// the sender is dropped or a write fails (the process is gone).
fn writer(name: String, mut stdin: ChildStdin) -> io::Result<mpsc::Sender<Vec<u8>>> {
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    thread::Builder::new().name(name).spawn(move || {
        for line in rx {
            if stdin.write_all(&line).and_then(|()| stdin.flush()).is_err() {
                return;
            }
        }
    })?;
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_the_documented_lines() {
        let line = |r: &Request<'_>| serde_json::to_string(r).unwrap();
        assert_eq!(
            line(&Request::Mount {
                model: 1,
                config_json: r#"{"ok":true}"#,
                weights_path: "/tmp/d/weights.bin",
                weights_len: 4,
                sha256: "ab",
            }),
            r#"{"op":"mount","model":1,"config_json":"{\"ok\":true}","weights_path":"/tmp/d/weights.bin","weights_len":4,"sha256":"ab"}"#
        );
        assert_eq!(
            line(&Request::Infer {
                model: 1,
                job_id: "j7",
                input_ids: &[9, 9],
                max_tokens: 3
            }),
            r#"{"op":"infer","model":1,"job_id":"j7","input_ids":[9,9],"max_tokens":3}"#
        );
        assert_eq!(
            line(&Request::Prompt {
                job_id: "j8",
                prompt: "hi",
                max_out: 0
            }),
            r#"{"op":"prompt","job_id":"j8","prompt":"hi","max_out":0}"#
        );
        assert_eq!(
            line(&Request::Unmount { model: 1 }),
            r#"{"op":"unmount","model":1}"#
        );
        assert_eq!(
            line(&Request::Cancel { job_id: "j7" }),
            r#"{"op":"cancel","job_id":"j7"}"#
        );
    }
}
