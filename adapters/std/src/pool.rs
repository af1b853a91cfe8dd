//! [`Pool`]: one client spreading jobs over many donors, with a thread per
//! donor and the decisions in [`PoolCore`] (placement, failures, retries,
//! exactly-once delivery).

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use donate_host::{Error, NodeAddr};
use donate_proto::{
    Answer, ClientConfig, DonorId, DonorStats, PoolAction, PoolConfig, PoolCore, RequestId,
    SecureClientConfig,
};

use crate::Client;

/// One job for a [`Pool`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolJob {
    /// The caller's id, unique within the batch; results carry it.
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
    /// Its length and SHA-256.
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
    pub outcome: Result<Answer, String>,
}

impl PoolResult {
    /// Whether the job succeeded.
    pub fn ok(&self) -> bool {
        matches!(&self.outcome, Ok(Answer::Infer(r)) if r.ok)
            || matches!(&self.outcome, Ok(Answer::Prompt(r)) if r.ok)
    }
}

/// How a batch went, per donor.
#[derive(Debug, Clone, Default)]
pub struct PoolSummary {
    /// Per donor, in address order.
    pub donors: Vec<DonorStats>,
    /// Jobs sent again to another donor after a failure.
    pub retries: u64,
    /// Late answers dropped (a donor that came back after its jobs went elsewhere).
    pub duplicates: u64,
}

/// A client of many donors.
#[derive(Debug, Clone)]
pub struct Pool {
    donors: Vec<(NodeAddr, Option<SecureClientConfig>)>,
    model: Option<PoolModel>,
    config: PoolConfig,
    connect_timeout: Duration,
}

/// What a donor's thread tells the pool.
enum Report {
    Up {
        donor: DonorId,
        window: usize,
    },
    Down {
        donor: DonorId,
        reason: String,
    },
    Answer {
        donor: DonorId,
        job_id: String,
        answer: Answer,
    },
}

/// What the pool tells a donor's thread.
enum Command {
    Connect,
    Send(PoolJob),
    Disconnect,
}

impl Pool {
    /// A pool over `donors` (`host:port`, `unix:/path`), in plain text.
    pub fn new(donors: Vec<NodeAddr>, config: PoolConfig) -> Pool {
        Pool {
            donors: donors.into_iter().map(|addr| (addr, None)).collect(),
            model: None,
            config,
            connect_timeout: Duration::from_secs(10),
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

    /// Runs `jobs` (their `job_id`s must be unique: a duplicate is refused
    /// before anything is sent) and calls `on_result` once per job, in the
    /// order they finish, on this thread. `on_progress` is called after each
    /// result with the core (live donors, retries…).
    pub fn run(
        &self,
        jobs: Vec<PoolJob>,
        mut on_result: impl FnMut(PoolResult),
        mut on_progress: impl FnMut(&PoolCore),
    ) -> Result<PoolSummary, String> {
        let seed = Instant::now().elapsed().as_nanos() as u64 ^ std::process::id() as u64;
        let mut core = PoolCore::new(self.donors.len(), self.config.clone(), seed | 1);
        let mut by_id = HashMap::new();
        for job in jobs {
            core.submit(&job.job_id)?;
            by_id.insert(job.job_id.clone(), job);
        }
        if self.donors.is_empty() {
            return Err("no donors given".to_owned());
        }
        let (reports, inbox) = mpsc::channel();
        let mut links: Vec<(Sender<Command>, JoinHandle<()>)> = Vec::new();
        for (donor, (addr, secure)) in self.donors.iter().enumerate() {
            let (tx, rx) = mpsc::channel();
            let reports = reports.clone();
            let link = Link {
                addr: addr.clone(),
                secure: secure.clone(),
                model: self.model.clone(),
                timeout: self.connect_timeout,
            };
            let handle = std::thread::Builder::new()
                .name(format!("donate-pool-{donor}"))
                .spawn(move || donor_thread(donor, link, rx, reports))
                .map_err(|e| format!("cannot start a pool thread: {e}"))?;
            links.push((tx, handle));
        }
        drop(reports);
        let mut answers: HashMap<String, (DonorId, Answer)> = HashMap::new();
        loop {
            let now = Instant::now();
            while let Some(action) = core.poll_action(now) {
                match action {
                    PoolAction::Connect(donor) => {
                        let _ = links[donor].0.send(Command::Connect);
                    }
                    PoolAction::Disconnect(donor) => {
                        let _ = links[donor].0.send(Command::Disconnect);
                    }
                    PoolAction::Send { donor, job_id } => {
                        let job = by_id[&job_id].clone();
                        let _ = links[donor].0.send(Command::Send(job));
                    }
                    PoolAction::Deliver { job_id, outcome } => {
                        let (donor, outcome) = match outcome {
                            Ok(donor) => match answers.remove(&job_id) {
                                Some((_, answer)) => (Some(donor), Ok(answer)),
                                None => (Some(donor), Err("no answer recorded".to_owned())),
                            },
                            Err(reason) => (None, Err(reason)),
                        };
                        on_result(PoolResult {
                            job_id,
                            donor,
                            outcome,
                        });
                        on_progress(&core);
                    }
                }
            }
            if core.pending() == 0 {
                break;
            }
            if core.is_hopeless() {
                core.fail_all("every donor is down");
                continue;
            }
            let wait = core
                .poll_timeout()
                .map_or(Duration::from_millis(100), |at| {
                    at.saturating_duration_since(now)
                })
                .min(Duration::from_millis(100));
            match inbox.recv_timeout(wait) {
                Ok(report) => {
                    let now = Instant::now();
                    match report {
                        Report::Up { donor, window } => core.donor_up(donor, window),
                        Report::Down { donor, reason } => core.donor_down(donor, &reason, now),
                        Report::Answer {
                            donor,
                            job_id,
                            answer,
                        } => {
                            match refusal(&answer) {
                                Some(reason) => core.refused(donor, &job_id, &reason),
                                None => {
                                    let depth = queue_depth(&answer);
                                    // Kept only if it is the answer delivered (not a late duplicate).
                                    if core.answer(donor, &job_id, depth, now) {
                                        answers.insert(job_id, (donor, answer));
                                    }
                                }
                            }
                        }
                    }
                    on_progress(&core);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    core.fail_all("every donor thread stopped");
                }
            }
            core.handle_timeout(Instant::now());
        }
        let summary = PoolSummary {
            donors: (0..self.donors.len())
                .map(|d| core.stats(d).clone())
                .collect(),
            retries: core.retries(),
            duplicates: core.duplicates(),
        };
        for (tx, handle) in links {
            drop(tx);
            // A donor thread blocked on a stalled node notices within its read wait.
            let _ = handle.join();
        }
        Ok(summary)
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
/// what the answer says, rather than that the job itself is bad.
fn refusal(answer: &Answer) -> Option<String> {
    let Answer::Error(e) = answer else {
        return None;
    };
    let now = matches!(
        e.code.as_str(),
        "queue_full" | "shutting_down" | "model_not_mounted"
    ) || matches!(e.error.as_str(), "queue full" | "model not mounted");
    now.then(|| format!("refused: {}", e.error))
}

/// How a donor's thread reaches its donor.
struct Link {
    addr: NodeAddr,
    secure: Option<SecureClientConfig>,
    model: Option<PoolModel>,
    timeout: Duration,
}

/// One donor's connection: connects when told, sends jobs, reports answers.
fn donor_thread(donor: DonorId, link: Link, commands: Receiver<Command>, reports: Sender<Report>) {
    let down = |reason: String| {
        let _ = reports.send(Report::Down { donor, reason });
    };
    let mut client: Option<Client> = None;
    let mut in_flight: HashMap<RequestId, String> = HashMap::new();
    loop {
        // Idle: block for the next command. Busy: poll for answers too.
        let command = if client.is_some() && !in_flight.is_empty() {
            match commands.try_recv() {
                Ok(command) => Some(command),
                Err(mpsc::TryRecvError::Empty) => None,
                Err(mpsc::TryRecvError::Disconnected) => return,
            }
        } else {
            match commands.recv() {
                Ok(command) => Some(command),
                Err(_) => return,
            }
        };
        match command {
            Some(Command::Connect) => {
                in_flight.clear();
                client = None;
                match connect(&link) {
                    Ok((c, window)) => {
                        client = Some(c);
                        let _ = reports.send(Report::Up { donor, window });
                    }
                    Err(reason) => down(reason),
                }
                continue;
            }
            Some(Command::Disconnect) => {
                client = None;
                in_flight.clear();
                continue;
            }
            Some(Command::Send(job)) => {
                let Some(c) = client.as_mut() else {
                    down("not connected".to_owned());
                    continue;
                };
                let sent = match &job.work {
                    Work::Infer {
                        input_ids,
                        max_tokens,
                    } => c.send_infer_as(&job.job_id, input_ids, *max_tokens),
                    Work::Prompt { prompt, max_out } => {
                        c.send_prompt_as(&job.job_id, prompt, *max_out)
                    }
                };
                match sent {
                    Ok(request) => {
                        in_flight.insert(request, job.job_id);
                    }
                    Err(e) => {
                        client = None;
                        in_flight.clear();
                        down(e.to_string());
                    }
                }
                continue;
            }
            None => {}
        }
        let Some(c) = client.as_mut() else { continue };
        match c.next_answer(Duration::from_millis(1)) {
            Ok(Some((request, answer))) => {
                if let Some(job_id) = in_flight.remove(&request) {
                    let _ = reports.send(Report::Answer {
                        donor,
                        job_id,
                        answer,
                    });
                }
            }
            Ok(None) => {}
            Err(e) => {
                client = None;
                in_flight.clear();
                down(e.to_string());
            }
        }
    }
}

/// Connects, mounts the model (from the donor's store when it holds it), and
/// says how many jobs the donor may have in flight: its queue capacity for
/// our nodes, one for a v1 node (it does not answer `queue_status`).
fn connect(link: &Link) -> Result<(Client, usize), String> {
    let addr = &link.addr;
    let named = |e: Error| format!("{addr}: {e}");
    let mut client = match &link.secure {
        None => Client::connect_timeout(addr, link.timeout),
        Some(secure) => Client::connect_secure(
            addr,
            ClientConfig::default(),
            secure.clone(),
            Some(link.timeout),
        ),
    }
    .map_err(named)?;
    if let Some(model) = &link.model {
        let file = File::open(&model.weights)
            .map_err(|e| format!("cannot read {}: {e}", model.weights.display()))?;
        client
            .push_stored(&model.config_json, file, model.len, model.sha256, |_| {})
            .map_err(|e| format!("{addr}: the model did not mount: {e}"))?;
    }
    let window = match client.queue_status().map_err(named)? {
        Some(_) => client.hello().queue_capacity.clamp(1, 64) as usize,
        None => 1,
    };
    Ok((client, window))
}
