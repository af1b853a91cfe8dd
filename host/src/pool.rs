//! Donor pools: one client spreading jobs over many donors.
//!
//! The decisions are [`PoolCore`]'s (placement, failures, retries,
//! exactly-once delivery). [`Dispatch`] wraps it with what a driver holds
//! around it, the job bodies and the answers until they are delivered, and
//! reads answers the same way for every driver: the blocking pool of
//! donate-std (a thread per donor) and the async [`Pool`] here (a task per
//! donor on any runtime that implements [`Connect`]).

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_channel::{Receiver, Sender};
use futures_lite::future::{or, poll_fn};
use futures_lite::io::AssertAsync;

use donate_proto::{
    Answer, Capability, ClientConfig, DonorId, DonorStats, ErrorCode, PoolAction, PoolConfig,
    PoolCore, PoolError, RequestId, SamplingParams, SecureClientConfig,
};

use crate::runtime::{Runtime, Timer};
use crate::{BoxStream, Client, NodeAddr};

/// One job for a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolJob {
    /// The caller's id, unique among the pool's jobs not yet answered; results carry it.
    pub job_id: String,
    /// What to run.
    pub work: Work,
}

/// What a [`PoolJob`] asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// An `infer` job on the pool's model.
    Infer {
        /// Input token ids.
        input_ids: Vec<i32>,
        /// Tokens to generate (0: the node's default).
        max_tokens: i64,
    },
    /// A `prompt` job on `local_lm` donors.
    Prompt {
        /// The prompt.
        prompt: String,
        /// Output limit (0: the node's default).
        max_out: i64,
    },
}

/// The model every donor mounts before it takes jobs: pushed where it is
/// missing, used from the donor's store where it is held.
#[derive(Debug, Clone)]
pub struct PoolModel {
    /// The model's config.
    pub config_json: String,
    /// The weights file.
    pub weights: PathBuf,
    /// Its length in bytes.
    pub len: u64,
    /// The SHA-256 of the weights.
    pub sha256: [u8; 32],
}

/// One job's final result, delivered once.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolResult {
    /// The job's id.
    pub job_id: String,
    /// The donor that answered (its index in the address list), if one did.
    pub donor: Option<DonorId>,
    /// The node's answer (a result, or an error frame refusing the job), or
    /// why the pool gave up on the job.
    pub outcome: Result<Answer, PoolError>,
}

impl PoolResult {
    /// Whether the job succeeded.
    pub fn ok(&self) -> bool {
        matches!(&self.outcome, Ok(Answer::Infer(r)) if r.ok)
            || matches!(&self.outcome, Ok(Answer::Prompt(r)) if r.ok)
    }

    fn failed(job_id: String, reason: PoolError) -> PoolResult {
        PoolResult {
            job_id,
            donor: None,
            outcome: Err(reason),
        }
    }
}

/// How a pool's jobs went, per donor.
#[derive(Debug, Clone, Default)]
pub struct PoolSummary {
    /// Per donor, in address order.
    pub donors: Vec<DonorStats>,
    /// Jobs sent again to another donor after a failure.
    pub retries: u64,
    /// Late answers dropped (a donor that came back after its jobs went elsewhere).
    pub duplicates: u64,
    /// Weight bytes sent to mount the model, over all donors and reconnects
    /// (0 when every donor's store held it).
    pub weights_sent: u64,
}

/// What a donor's link (thread or task) tells the [`Dispatch`].
#[derive(Debug)]
pub enum LinkReport {
    /// Connected, the model mounted; it may take `window` jobs at once.
    Up {
        /// Jobs it may have in flight.
        window: usize,
        /// Weight bytes sent to mount the model (0 when its store held it).
        weights_sent: u64,
    },
    /// Lost, refused or never reached.
    Down {
        /// Why, for the caller.
        reason: String,
    },
    /// The node answered a job.
    Answer {
        /// Which job.
        job_id: String,
        /// What it said.
        answer: Answer,
    },
}

/// What the [`Dispatch`] tells a donor's link.
#[derive(Debug)]
pub enum LinkCommand {
    /// Connect (again), mount the model, report [`LinkReport::Up`] or `Down`.
    Connect,
    /// Send this job.
    Send(PoolJob),
    /// Drop the connection (the donor stalled).
    Disconnect,
}

/// What a driver does next, from [`Dispatch::poll`].
#[derive(Debug)]
pub enum Step {
    /// Hand `command` to donor `.0`'s link.
    Link(DonorId, LinkCommand),
    /// Hand the result to the caller.
    Deliver(PoolResult),
}

/// The [`PoolCore`] with the job bodies and the answers held until delivery:
/// the one coordinator every pool driver runs.
#[derive(Debug)]
pub struct Dispatch {
    core: PoolCore,
    jobs: HashMap<String, PoolJob>,
    answers: HashMap<String, (DonorId, Answer)>,
    donors: usize,
    weights_sent: u64,
}

impl Dispatch {
    /// A coordinator for `donors` donors (each will be told to connect).
    pub fn new(donors: usize, config: PoolConfig) -> Dispatch {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id());
        Dispatch {
            core: PoolCore::new(donors, config, seed | 1),
            jobs: HashMap::new(),
            answers: HashMap::new(),
            donors,
            weights_sent: 0,
        }
    }

    /// Adds a job; refused while a job with its `job_id` is not answered yet.
    pub fn submit(&mut self, job: PoolJob) -> Result<(), PoolError> {
        if self.donors == 0 {
            return Err(PoolError::NoDonors);
        }
        self.core.submit(&job.job_id)?;
        self.jobs.insert(job.job_id.clone(), job);
        Ok(())
    }

    /// What donor `donor`'s link reported.
    pub fn report(&mut self, donor: DonorId, report: LinkReport, now: Instant) {
        match report {
            LinkReport::Up {
                window,
                weights_sent,
            } => {
                self.weights_sent += weights_sent;
                self.core.donor_up(donor, window);
            }
            LinkReport::Down { reason } => self.core.donor_down(donor, &reason, now),
            LinkReport::Answer { job_id, answer } => match refusal(&answer) {
                Some(reason) => self.core.refused(donor, &job_id, &reason),
                None => {
                    // Kept only if it is the answer delivered, not a late duplicate.
                    if self.core.answer(donor, &job_id, queue_depth(&answer), now) {
                        self.answers.insert(job_id, (donor, answer));
                    }
                }
            },
        }
    }

    /// Acts on time: stalled donors, and down donors due for another try.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.core.handle_timeout(now);
    }

    /// When [`handle_timeout`](Self::handle_timeout) has work next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.core.poll_timeout()
    }

    /// The next thing to do. When every donor failed too often to place
    /// anything, each job left fails with a clear reason.
    pub fn poll(&mut self, now: Instant) -> Option<Step> {
        let action = match self.core.poll_action(now) {
            Some(action) => action,
            None if self.core.pending() > 0 && self.core.is_hopeless() => {
                self.core.fail_all(PoolError::AllDonorsDown);
                self.core.poll_action(now)?
            }
            None => return None,
        };
        Some(match action {
            PoolAction::Connect(donor) => Step::Link(donor, LinkCommand::Connect),
            PoolAction::Disconnect(donor) => Step::Link(donor, LinkCommand::Disconnect),
            PoolAction::Send { donor, job_id } => {
                Step::Link(donor, LinkCommand::Send(self.jobs[&job_id].clone()))
            }
            PoolAction::Deliver { job_id, outcome } => {
                self.jobs.remove(&job_id);
                // Its id may be used again: late answers are caught by the
                // core's in-flight bookkeeping, not by remembering every id.
                self.core.forget(&job_id);
                Step::Deliver(match outcome {
                    Ok(donor) => PoolResult {
                        outcome: self
                            .answers
                            .remove(&job_id)
                            .map(|(_, answer)| answer)
                            .ok_or(PoolError::AnswerLost),
                        job_id,
                        donor: Some(donor),
                    },
                    Err(reason) => PoolResult::failed(job_id, reason),
                })
            }
        })
    }

    /// Jobs not answered yet.
    pub fn pending(&self) -> usize {
        self.core.pending()
    }

    /// The decisions' state (live donors, retries…), for progress reports.
    pub fn core(&self) -> &PoolCore {
        &self.core
    }

    /// Per-donor figures so far.
    pub fn summary(&self) -> PoolSummary {
        PoolSummary {
            donors: (0..self.donors)
                .map(|d| self.core.stats(d).clone())
                .collect(),
            retries: self.core.retries(),
            duplicates: self.core.duplicates(),
            weights_sent: self.weights_sent,
        }
    }
}

/// The queue depth an answer reports.
fn queue_depth(answer: &Answer) -> usize {
    match answer {
        Answer::Infer(r) => r.queue_depth.max(0) as usize,
        Answer::Prompt(r) => r.queue_depth.max(0) as usize,
        _ => 0,
    }
}

/// Why a donor could not take the job now (so another should), if that is
/// what the answer says, rather than that the job itself is bad. A refusal
/// that no retry can change (`model_not_mounted`: the pool has no model;
/// `wrong_mode`) is the job's answer, delivered at once.
fn refusal(answer: &Answer) -> Option<String> {
    let Answer::Error(e) = answer else {
        return None;
    };
    let now = matches!(
        e.error_code(),
        Some(ErrorCode::QueueFull | ErrorCode::ShuttingDown)
    );
    now.then(|| format!("refused: {}", e.error))
}

/// How many jobs a donor may have in flight, from whether it answered
/// `queue_status`: its queue capacity for ours, one for a v1 (Go) node,
/// which does not.
pub fn link_window(answers_queue_status: bool, queue_capacity: i64) -> usize {
    if answers_queue_status {
        queue_capacity.clamp(1, 64) as usize
    } else {
        1
    }
}

/// Opens client streams: what a runtime lends the async [`Pool`] besides
/// spawning tasks and timers. donate-smol and donate-tokio implement it.
pub trait Connect: Runtime {
    /// A connected stream to `addr` (TCP or a Unix socket).
    fn connect(&self, addr: &NodeAddr) -> impl Future<Output = std::io::Result<BoxStream>> + Send;
}

/// A donor: where it is, and the trust for a secure one.
pub type Donor = (NodeAddr, Option<SecureClientConfig>);

/// A client of many donors (see the module docs): built from their
/// addresses, an optional model and limits, then [started](Pool::start) on a
/// runtime, or run blocking by donate-std.
#[derive(Debug, Clone)]
pub struct Pool {
    donors: Vec<Donor>,
    model: Option<PoolModel>,
    config: PoolConfig,
    connect_timeout: Duration,
    sampling: SamplingParams,
}

impl Pool {
    /// A pool over `donors` (`host:port`, `unix:/path`), in plain text.
    pub fn new(donors: Vec<NodeAddr>, config: PoolConfig) -> Pool {
        Pool {
            donors: donors.into_iter().map(|addr| (addr, None)).collect(),
            model: None,
            config,
            connect_timeout: Duration::from_secs(10),
            sampling: SamplingParams::default(),
        }
    }

    /// Adds a donor in secure mode: its connection completes a Noise handshake
    /// with `secure` (the client key, and the trust in that donor's key) and
    /// never falls back to plain text.
    pub fn secure_donor(mut self, addr: NodeAddr, secure: SecureClientConfig) -> Pool {
        self.donors.push((addr, Some(secure)));
        self
    }

    /// Every donor mounts `model` before it takes jobs.
    pub fn model(mut self, model: PoolModel) -> Pool {
        self.model = Some(model);
        self
    }

    /// How long connecting and the handshake may take (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Pool {
        self.connect_timeout = timeout;
        self
    }

    /// Every job carries these sampling fields (extension `sampling`); a
    /// donor that does not offer `sampling` is marked down, no job sent to it.
    pub fn sampling(mut self, sampling: SamplingParams) -> Pool {
        self.sampling = sampling;
        self
    }

    /// The sampling fields every job carries.
    #[doc(hidden)]
    pub fn sampling_params(&self) -> &SamplingParams {
        &self.sampling
    }

    /// What a pool driver needs: the donors in order (their [`DonorId`]s are
    /// indexes here), the model, the limits and the connect timeout.
    #[doc(hidden)]
    pub fn parts(&self) -> (&[Donor], Option<&PoolModel>, &PoolConfig, Duration) {
        (
            &self.donors,
            self.model.as_ref(),
            &self.config,
            self.connect_timeout,
        )
    }

    /// Starts the pool on `runtime`: a task per donor and one coordinating
    /// them. Jobs go in through the handle; the tasks end once every handle
    /// is dropped (or [closed](PoolHandle::close)) and the jobs left are answered.
    pub fn start<R: Connect>(self, runtime: R) -> PoolHandle {
        let runtime = Arc::new(runtime);
        let (reports_tx, reports) = async_channel::unbounded();
        let mut links = Vec::with_capacity(self.donors.len());
        for (donor, (addr, secure)) in self.donors.iter().enumerate() {
            let (tx, commands) = async_channel::unbounded();
            let link = Link {
                donor,
                addr: addr.clone(),
                secure: secure.clone(),
                model: self.model.clone(),
                timeout: self.connect_timeout,
                sampling: self.sampling.clone(),
                commands,
                reports: reports_tx.clone(),
            };
            runtime.spawn(Box::pin(link.run(runtime.clone())));
            links.push(tx);
        }
        drop(reports_tx);
        let (submit, requests) = async_channel::unbounded();
        let coordinator = Coordinator {
            dispatch: Dispatch::new(self.donors.len(), self.config),
            links,
            reports,
            requests,
            waiting: HashMap::new(),
        };
        runtime.spawn(Box::pin(coordinator.run(runtime.timer())));
        PoolHandle { submit }
    }
}

/// Where a job's result goes: the submitter's channel (one job, or a batch's stream).
type Reply = Sender<PoolResult>;

/// What a [`PoolHandle`] asks the coordinator.
enum Request {
    Jobs(Vec<PoolJob>, Reply),
    Close(Sender<PoolSummary>),
}

/// A started [`Pool`]: submit jobs to it from any task. Cloning it is cheap.
#[derive(Clone, Debug)]
pub struct PoolHandle {
    submit: Sender<Request>,
}

impl PoolHandle {
    /// Runs one job and waits for its result (a job whose `job_id` is
    /// already in flight fails at once).
    pub async fn submit(&self, job: PoolJob) -> PoolResult {
        let job_id = job.job_id.clone();
        let (tx, rx) = async_channel::bounded(1);
        if self
            .submit
            .send(Request::Jobs(vec![job], tx))
            .await
            .is_err()
        {
            return PoolResult::failed(job_id, PoolError::Stopped);
        }
        rx.recv()
            .await
            .unwrap_or_else(|_| PoolResult::failed(job_id, PoolError::Stopped))
    }

    /// Runs `jobs` (their `job_id`s unique: a repeat is refused before
    /// anything is sent) and yields each result once, in the order they
    /// finish: the receiver is a `futures` `Stream`, and ends after the last.
    pub async fn run(&self, jobs: Vec<PoolJob>) -> Result<Receiver<PoolResult>, PoolError> {
        let mut seen = std::collections::HashSet::new();
        if let Some(job) = jobs.iter().find(|j| !seen.insert(j.job_id.as_str())) {
            return Err(PoolError::DuplicateJobId(job.job_id.clone()));
        }
        let (tx, rx) = async_channel::unbounded();
        self.submit
            .send(Request::Jobs(jobs, tx))
            .await
            .map_err(|_| PoolError::Stopped)?;
        Ok(rx)
    }

    /// Waits for every job submitted so far, stops the pool's tasks and
    /// says how it went.
    pub async fn close(self) -> PoolSummary {
        let (tx, rx) = async_channel::bounded(1);
        if self.submit.send(Request::Close(tx)).await.is_err() {
            return PoolSummary::default();
        }
        rx.recv().await.unwrap_or_default()
    }
}

/// The task that runs the [`Dispatch`].
struct Coordinator {
    dispatch: Dispatch,
    links: Vec<Sender<LinkCommand>>,
    reports: Receiver<(DonorId, LinkReport)>,
    requests: Receiver<Request>,
    waiting: HashMap<String, Reply>,
}

/// What woke the coordinator.
enum Wake {
    Report(Option<(DonorId, LinkReport)>),
    Request(Option<Request>),
    Timer,
}

impl Coordinator {
    async fn run(mut self, mut timer: impl Timer) {
        let mut closing: Option<Sender<PoolSummary>> = None;
        let mut accepting = true;
        loop {
            let now = Instant::now();
            self.dispatch.handle_timeout(now);
            while let Some(step) = self.dispatch.poll(now) {
                match step {
                    Step::Link(donor, command) => {
                        let _ = self.links[donor].try_send(command);
                    }
                    Step::Deliver(result) => {
                        if let Some(reply) = self.waiting.remove(&result.job_id) {
                            // A caller that stopped listening loses only its own results.
                            let _ = reply.try_send(result);
                        }
                    }
                }
            }
            if self.dispatch.pending() == 0 && (!accepting || closing.is_some()) {
                break;
            }
            let at = self
                .dispatch
                .poll_timeout()
                .unwrap_or(now + Duration::from_secs(3600));
            timer.set(at);
            let requests = async {
                if accepting && closing.is_none() {
                    Wake::Request(self.requests.recv().await.ok())
                } else {
                    std::future::pending::<Wake>().await
                }
            };
            let wake = or(
                or(
                    async { Wake::Report(self.reports.recv().await.ok()) },
                    requests,
                ),
                async {
                    poll_fn(|cx| timer.poll_fired(cx)).await;
                    Wake::Timer
                },
            )
            .await;
            match wake {
                Wake::Report(Some((donor, report))) => {
                    self.dispatch.report(donor, report, Instant::now())
                }
                // Every link ended: nothing can be answered any more.
                Wake::Report(None) => break,
                Wake::Request(Some(Request::Jobs(jobs, reply))) => self.accept(jobs, reply),
                Wake::Request(Some(Request::Close(tx))) => closing = Some(tx),
                Wake::Request(None) => accepting = false,
                Wake::Timer => {}
            }
        }
        // Jobs still waiting (every link gone) see their reply dropped: "stopped".
        if let Some(tx) = closing {
            let _ = tx.try_send(self.dispatch.summary());
        }
        // Dropping the links' senders ends their tasks.
    }

    fn accept(&mut self, jobs: Vec<PoolJob>, reply: Reply) {
        for job in jobs {
            let job_id = job.job_id.clone();
            match self.dispatch.submit(job) {
                Ok(()) => {
                    self.waiting.insert(job_id, reply.clone());
                }
                Err(reason) => {
                    let _ = reply.try_send(PoolResult::failed(job_id, reason));
                }
            }
        }
    }
}

/// One donor's task: connects when told, sends jobs, reports answers.
struct Link {
    donor: DonorId,
    addr: NodeAddr,
    secure: Option<SecureClientConfig>,
    model: Option<PoolModel>,
    timeout: Duration,
    sampling: SamplingParams,
    commands: Receiver<LinkCommand>,
    reports: Sender<(DonorId, LinkReport)>,
}

/// What woke a link.
enum LinkWake {
    Command(Option<LinkCommand>),
    Answer(crate::Result<(RequestId, Answer)>),
}

impl Link {
    async fn run<R: Connect>(self, runtime: Arc<R>) {
        let mut client: Option<Client<BoxStream>> = None;
        let mut in_flight: HashMap<RequestId, String> = HashMap::new();
        // A command taken while draining sends, handled next round.
        let mut next: Option<LinkCommand> = None;
        loop {
            let wake = match client.as_mut() {
                _ if next.is_some() => LinkWake::Command(next.take()),
                // Answers are read only while jobs are out; reading is cancel-safe.
                Some(c) if !in_flight.is_empty() => {
                    or(
                        async { LinkWake::Command(self.commands.recv().await.ok()) },
                        async { LinkWake::Answer(c.next_answer().await) },
                    )
                    .await
                }
                _ => LinkWake::Command(self.commands.recv().await.ok()),
            };
            match wake {
                LinkWake::Command(None) => return,
                LinkWake::Command(Some(LinkCommand::Connect)) => {
                    in_flight.clear();
                    client = None;
                    match self.connect(&*runtime).await {
                        Ok((c, window, weights_sent)) => {
                            client = Some(c);
                            self.report(LinkReport::Up {
                                window,
                                weights_sent,
                            });
                        }
                        Err(reason) => self.report(LinkReport::Down { reason }),
                    }
                }
                LinkWake::Command(Some(LinkCommand::Disconnect)) => {
                    client = None;
                    in_flight.clear();
                }
                LinkWake::Command(Some(LinkCommand::Send(job))) => {
                    let Some(c) = client.as_mut() else {
                        self.report(LinkReport::Down {
                            reason: "not connected".to_owned(),
                        });
                        continue;
                    };
                    let mut sent = send(c, &job, &self.sampling)
                        .await
                        .map(|r| in_flight.insert(r, job.job_id));
                    // Send every job already waiting, then flush them at once.
                    while sent.is_ok() {
                        match self.commands.try_recv() {
                            Ok(LinkCommand::Send(job)) => {
                                sent = send(c, &job, &self.sampling)
                                    .await
                                    .map(|r| in_flight.insert(r, job.job_id))
                            }
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    // Flushed whole here, never raced: a write cut short would corrupt the stream.
                    if let Err(e) = sent.map(|_| ()).and(c.flush().await) {
                        client = None;
                        in_flight.clear();
                        self.report(LinkReport::Down {
                            reason: e.to_string(),
                        });
                    }
                }
                LinkWake::Answer(Ok((request, answer))) => {
                    if let Some(job_id) = in_flight.remove(&request) {
                        self.report(LinkReport::Answer { job_id, answer });
                    }
                }
                LinkWake::Answer(Err(e)) => {
                    client = None;
                    in_flight.clear();
                    self.report(LinkReport::Down {
                        reason: e.to_string(),
                    });
                }
            }
        }
    }

    fn report(&self, report: LinkReport) {
        let _ = self.reports.try_send((self.donor, report));
    }

    /// Connects, mounts the model (from the donor's store when it holds it),
    /// and says how many jobs the donor may have in flight.
    async fn connect<R: Connect>(
        &self,
        runtime: &R,
    ) -> Result<(Client<BoxStream>, usize, u64), String> {
        let addr = &self.addr;
        let named = |e: crate::Error| format!("{addr}: {e}");
        let handshake = async {
            let stream = runtime
                .connect(addr)
                .await
                .map_err(|e| format!("{addr}: {e}"))?;
            match &self.secure {
                None => Client::handshake(stream, ClientConfig::default()).await,
                Some(secure) => {
                    Client::handshake_secure(stream, ClientConfig::default(), secure.clone()).await
                }
            }
            .map_err(named)
        };
        let mut timer = runtime.timer();
        timer.set(Instant::now() + self.timeout);
        let timeout = async {
            poll_fn(|cx| timer.poll_fired(cx)).await;
            Err(format!("{addr}: no answer within {:?}", self.timeout))
        };
        let mut client = or(handshake, timeout).await?;
        check_sampling(addr, client.capabilities(), &self.sampling)?;
        let mut weights_sent = 0;
        if let Some(model) = &self.model {
            // Blocking reads of a local file: short, and only at a (re)connect.
            let file = std::fs::File::open(&model.weights)
                .map_err(|e| format!("cannot read {}: {e}", model.weights.display()))?;
            weights_sent = client
                .push_stored(
                    &model.config_json,
                    AssertAsync::new(file),
                    model.len,
                    model.sha256,
                    |_| {},
                )
                .await
                .map_err(|e| format!("{addr}: the model did not mount: {e}"))?
                .sent;
        }
        let status = client.queue_status().await.map_err(named)?;
        let window = link_window(status.is_some(), client.hello().queue_capacity);
        Ok((client, window, weights_sent))
    }
}

/// Queues `job` on the connection, with the pool's sampling fields.
async fn send(
    client: &mut Client<BoxStream>,
    job: &PoolJob,
    sampling: &SamplingParams,
) -> crate::Result<RequestId> {
    match &job.work {
        Work::Infer {
            input_ids,
            max_tokens,
        } => {
            client
                .send_infer_as_with(&job.job_id, input_ids, *max_tokens, sampling)
                .await
        }
        Work::Prompt { prompt, max_out } => {
            client
                .send_prompt_as_with(&job.job_id, prompt, *max_out, sampling)
                .await
        }
    }
}

/// A donor that cannot take the pool's sampling fields is refused at
/// connect, before any job goes to it.
pub fn check_sampling(
    addr: &NodeAddr,
    offered: donate_proto::Capabilities,
    sampling: &SamplingParams,
) -> Result<(), String> {
    if sampling.is_empty() || offered.contains(Capability::Sampling) {
        return Ok(());
    }
    Err(format!(
        "{addr}: the node does not offer the sampling extension (--temperature, --top-p, …)"
    ))
}

#[cfg(test)]
mod tests {
    use super::refusal;
    use donate_proto::message::ErrorFrame;
    use donate_proto::Answer;

    fn frame(code: &str, error: &str) -> Answer {
        Answer::Error(ErrorFrame {
            code: code.to_owned(),
            error: error.to_owned(),
            job_id: "j".to_owned(),
        })
    }

    #[test]
    fn a_busy_donor_is_told_from_a_bad_job_by_code_or_by_the_go_nodes_words() {
        // The Go node's refusal carries no code: its words say it is busy.
        assert!(refusal(&frame("", "queue full")).is_some());
        assert!(refusal(&frame("queue_full", "queue full")).is_some());
        assert!(refusal(&frame("shutting_down", "node shutting down")).is_some());
        // What no other donor would answer differently is the job's answer.
        assert!(refusal(&frame("model_not_mounted", "model not mounted")).is_none());
        assert!(refusal(&frame("", "model not mounted")).is_none());
        assert!(refusal(&frame("wrong_mode", "queue full")).is_none());
    }
}
