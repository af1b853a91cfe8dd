//! [`Pool`]: one client spreading jobs over many donors, blocking: a thread
//! per donor, the coordination on the caller's thread. The decisions are
//! [`PoolCore`]'s (placement, failures, retries, exactly-once delivery).

use std::collections::HashMap;
use std::fs::File;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use donate_host::pool::{check_sampling, link_window, Dispatch, LinkCommand, LinkReport, Step};
use donate_host::{Error, NodeAddr};
use donate_proto::{
    ClientConfig, DonorId, PoolConfig, PoolCore, RequestId, SamplingParams, SecureClientConfig,
};

pub use donate_host::pool::{PoolJob, PoolModel, PoolResult, PoolSummary, Work};

use crate::Client;

/// A client of many donors, run blocking: a thread per donor, the
/// coordination (donate-host's [`Dispatch`]) on the caller's thread. The
/// async pool of donate-smol and donate-tokio makes the same decisions.
#[derive(Debug, Clone)]
pub struct Pool(donate_host::Pool);

impl Pool {
    /// A pool over `donors` (`host:port`, `unix:/path`), in plain text.
    pub fn new(donors: Vec<NodeAddr>, config: PoolConfig) -> Pool {
        Pool(donate_host::Pool::new(donors, config))
    }

    /// Adds a donor in secure mode: its connection completes a Noise handshake
    /// with `secure` (the client key, and the trust in that donor's key) and
    /// never falls back to plain text.
    pub fn secure_donor(self, addr: NodeAddr, secure: SecureClientConfig) -> Pool {
        Pool(self.0.secure_donor(addr, secure))
    }

    /// Every donor mounts `model` before it takes jobs.
    pub fn model(self, model: PoolModel) -> Pool {
        Pool(self.0.model(model))
    }

    /// How long connecting, the handshake, and then any one read or write
    /// of a donor's connection may take (default 10 s).
    pub fn connect_timeout(self, timeout: Duration) -> Pool {
        Pool(self.0.connect_timeout(timeout))
    }

    /// Every job carries these sampling fields (extension `sampling`); a
    /// donor that does not offer `sampling` is marked down, no job sent to it.
    pub fn sampling(self, sampling: SamplingParams) -> Pool {
        Pool(self.0.sampling(sampling))
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
    ) -> Result<PoolSummary, Error> {
        let (donors, model, config, timeout) = self.0.parts();
        let sampling = self.0.sampling_params();
        let mut dispatch = Dispatch::new(donors.len(), config.clone());
        for job in jobs {
            dispatch.submit(job)?;
        }
        let (reports, inbox) = mpsc::channel();
        let mut links: Vec<(Sender<LinkCommand>, JoinHandle<()>)> = Vec::new();
        for (donor, (addr, secure)) in donors.iter().enumerate() {
            let (tx, rx) = mpsc::channel();
            let reports = reports.clone();
            let link = Link {
                addr: addr.clone(),
                secure: secure.clone(),
                model: model.cloned(),
                timeout,
                sampling: sampling.clone(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("donate-pool-{donor}"))
                .spawn(move || donor_thread(donor, link, rx, reports))
                .map_err(|e| {
                    let why = format!("cannot start a pool thread: {e}");
                    Error::Io(std::io::Error::new(e.kind(), why))
                })?;
            links.push((tx, handle));
        }
        drop(reports);
        loop {
            let now = Instant::now();
            while let Some(step) = dispatch.poll(now) {
                match step {
                    Step::Link(donor, command) => {
                        let _ = links[donor].0.send(command);
                    }
                    Step::Deliver(result) => {
                        on_result(result);
                        on_progress(dispatch.core());
                    }
                }
            }
            if dispatch.pending() == 0 {
                break;
            }
            let wait = dispatch
                .poll_timeout()
                .map_or(Duration::from_millis(100), |at| {
                    at.saturating_duration_since(now)
                })
                .min(Duration::from_millis(100));
            match inbox.recv_timeout(wait) {
                Ok((donor, report)) => {
                    dispatch.report(donor, report, Instant::now());
                    on_progress(dispatch.core());
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(donate_proto::PoolError::Stopped.into());
                }
            }
            dispatch.handle_timeout(Instant::now());
        }
        let summary = dispatch.summary();
        for (tx, handle) in links {
            drop(tx);
            // A donor thread blocked on a stalled node notices within its read wait.
            let _ = handle.join();
        }
        Ok(summary)
    }
}

/// How a donor's thread reaches its donor.
struct Link {
    addr: NodeAddr,
    secure: Option<SecureClientConfig>,
    model: Option<PoolModel>,
    timeout: Duration,
    sampling: SamplingParams,
}

/// One donor's connection: connects when told, sends jobs, reports answers.
fn donor_thread(
    donor: DonorId,
    link: Link,
    commands: Receiver<LinkCommand>,
    reports: Sender<(DonorId, LinkReport)>,
) {
    let report = |report: LinkReport| {
        let _ = reports.send((donor, report));
    };
    let down = |reason: String| report(LinkReport::Down { reason });
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
            Some(LinkCommand::Connect) => {
                in_flight.clear();
                client = None;
                match connect(&link) {
                    Ok((c, window, weights_sent)) => {
                        client = Some(c);
                        report(LinkReport::Up {
                            window,
                            weights_sent,
                        });
                    }
                    Err(reason) => down(reason),
                }
                continue;
            }
            Some(LinkCommand::Disconnect) => {
                client = None;
                in_flight.clear();
                continue;
            }
            Some(LinkCommand::Send(job)) => {
                let Some(c) = client.as_mut() else {
                    down("not connected".to_owned());
                    continue;
                };
                let sampling = &link.sampling;
                let sent = match &job.work {
                    Work::Infer {
                        input_ids,
                        max_tokens,
                    } => c.send_infer_as_with(&job.job_id, input_ids, *max_tokens, sampling),
                    Work::Prompt { prompt, max_out } => {
                        c.send_prompt_as_with(&job.job_id, prompt, *max_out, sampling)
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
                    report(LinkReport::Answer { job_id, answer });
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
fn connect(link: &Link) -> Result<(Client, usize, u64), String> {
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
    check_sampling(addr, client.capabilities(), &link.sampling)?;
    let mut weights_sent = 0;
    if let Some(model) = &link.model {
        let file = File::open(&model.weights)
            .map_err(|e| format!("cannot read {}: {e}", model.weights.display()))?;
        weights_sent = client
            .push_stored(&model.config_json, file, model.len, model.sha256, |_| {})
            .map_err(|e| format!("{addr}: the model did not mount: {e}"))?
            .sent;
    }
    let status = client.queue_status().map_err(named)?;
    let window = link_window(status.is_some(), client.hello().queue_capacity);
    Ok((client, window, weights_sent))
}
