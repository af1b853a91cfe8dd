//! [`PoolCore`]: the decisions of a client that spreads jobs over many donors,
//! with no sockets, threads or clocks inside: which donor takes a job
//! (power of two choices on load), when a donor is down and when to try it
//! again (exponential backoff with jitter), which jobs go elsewhere (those in
//! flight on a donor that failed or stalled past the job deadline, never those
//! whose answer says the job itself failed), and that each job is answered
//! to the caller exactly once, by its `job_id`.
//!
//! A driver owns one connection per donor and feeds the core what happens:
//! [`donor_up`](PoolCore::donor_up), [`answer`](PoolCore::answer),
//! [`donor_down`](PoolCore::donor_down), time through
//! [`handle_timeout`](PoolCore::handle_timeout); it acts on
//! [`poll_action`](PoolCore::poll_action).

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// Pool limits. Start from [`Default`] and use the setters.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolConfig {
    /// A job in flight longer than this marks its donor stalled (default 60 s).
    pub job_deadline: Duration,
    /// First wait before a failed donor is tried again (default 200 ms).
    pub backoff_base: Duration,
    /// Longest wait between tries (default 30 s).
    pub backoff_max: Duration,
    /// Times a job is re-issued after donor failures before it fails (default 5).
    pub max_attempts: u32,
    /// Jobs in flight per donor at most (default 8; a v1 node takes one): enough
    /// to hide a round trip, few enough that no donor's queue holds the last
    /// jobs of a batch while faster donors idle.
    pub max_in_flight: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            job_deadline: Duration::from_secs(60),
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            max_attempts: 5,
            max_in_flight: 8,
        }
    }
}

crate::config::setters!(PoolConfig {
    job_deadline: Duration,
    backoff_base: Duration,
    backoff_max: Duration,
    max_attempts: u32,
    max_in_flight: usize,
});

/// A donor's index in the pool, in the order given.
pub type DonorId = usize;

/// Why a pool refused or gave up on a job.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// Caller misuse: a job with this `job_id` is not answered yet.
    #[error("duplicate job_id {0:?}")]
    DuplicateJobId(String),
    /// Caller misuse: a pool without donors.
    #[error("no donors given")]
    NoDonors,
    /// The job failed on donors `attempts` times (their links went down or they were busy).
    #[error("gave up after {attempts} attempts; the last: {last}")]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// Why the last one failed.
        last: String,
    },
    /// Every donor failed too often in a row to place anything.
    #[error("every donor is down")]
    AllDonorsDown,
    /// The pool was stopped before the job was answered.
    #[error("the pool has stopped")]
    Stopped,
    /// A donor's answer was delivered without being recorded (a bug in the driver).
    #[error("the donor's answer was lost")]
    AnswerLost,
}

/// What the driver must do, from [`PoolCore::poll_action`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolAction {
    /// Send the job `job_id` to `donor`.
    Send {
        /// Which donor.
        donor: DonorId,
        /// Which job.
        job_id: String,
    },
    /// Connect (again) to `donor`; report [`PoolCore::donor_up`] or [`PoolCore::donor_down`].
    Connect(DonorId),
    /// Drop `donor`'s connection: it stalled (its late answers are ignored anyway).
    Disconnect(DonorId),
    /// Deliver the job's final outcome to the caller (once per job).
    Deliver {
        /// Which job.
        job_id: String,
        /// `Ok` with the donor that answered, or why the pool gave up on it.
        outcome: Result<DonorId, PoolError>,
    },
}

#[derive(Debug)]
enum Health {
    /// Not connected yet, or a connect is under way.
    Connecting,
    Up,
    Down {
        retry_at: Instant,
    },
}

#[derive(Debug)]
struct Donor {
    health: Health,
    /// Jobs in flight here, with when each was sent.
    in_flight: HashMap<String, Instant>,
    /// At most this many in flight (1 for a v1 node, its queue capacity for ours).
    window: usize,
    /// Jobs waiting in the node's queue, as last reported (`queue_depth`).
    reported_depth: usize,
    /// Failures in a row, for the backoff.
    failures: u32,
    /// Statistics for the caller.
    stats: DonorStats,
}

/// What one donor did, for a summary.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DonorStats {
    /// Jobs it answered that were delivered.
    pub jobs: u64,
    /// Sum of those jobs' latencies (send to answer).
    pub busy: Duration,
    /// Times it was marked down (closed, refused, stalled).
    pub failures: u64,
    /// Why it was last marked down.
    pub last_error: Option<String>,
    /// Whether it is up now.
    pub up: bool,
}

#[derive(Debug)]
struct JobState {
    /// Re-issues after donor failures so far.
    attempts: u32,
    /// Where it is in flight, if it is.
    on: Option<DonorId>,
}

/// The pool's decisions; see the module docs.
#[derive(Debug)]
pub struct PoolCore {
    config: PoolConfig,
    donors: Vec<Donor>,
    jobs: HashMap<String, JobState>,
    queue: VecDeque<String>,
    delivered: HashSet<String>,
    /// Jobs delivered so far, forgotten ones included.
    delivered_total: usize,
    actions: VecDeque<PoolAction>,
    /// xorshift state for the two random choices and the jitter.
    rng: u64,
    /// Jobs re-issued to another donor, and late duplicates dropped.
    retries: u64,
    duplicates: u64,
}

impl PoolCore {
    /// A pool over `donors` donors, each to be connected first.
    pub fn new(donors: usize, config: PoolConfig, seed: u64) -> Self {
        let mut core = PoolCore {
            config,
            donors: (0..donors)
                .map(|_| Donor {
                    health: Health::Connecting,
                    in_flight: HashMap::new(),
                    window: 1,
                    reported_depth: 0,
                    failures: 0,
                    stats: DonorStats::default(),
                })
                .collect(),
            jobs: HashMap::new(),
            queue: VecDeque::new(),
            delivered: HashSet::new(),
            delivered_total: 0,
            actions: VecDeque::new(),
            rng: seed | 1,
            retries: 0,
            duplicates: 0,
        };
        core.actions.extend((0..donors).map(PoolAction::Connect));
        core
    }

    /// Adds a job. Refused if a job with this `job_id` is known already.
    pub fn submit(&mut self, job_id: &str) -> Result<(), PoolError> {
        if self.jobs.contains_key(job_id) || self.delivered.contains(job_id) {
            return Err(PoolError::DuplicateJobId(job_id.to_owned()));
        }
        self.jobs.insert(
            job_id.to_owned(),
            JobState {
                attempts: 0,
                on: None,
            },
        );
        self.queue.push_back(job_id.to_owned());
        Ok(())
    }

    /// `donor` is connected and may take `window` jobs at once.
    pub fn donor_up(&mut self, donor: DonorId, window: usize) {
        let d = &mut self.donors[donor];
        d.health = Health::Up;
        d.window = window.clamp(1, self.config.max_in_flight.max(1));
        d.failures = 0;
        d.stats.up = true;
    }

    /// `donor` failed (could not connect, closed, refused, a transport error):
    /// its jobs in flight go to other donors, and it is tried again later.
    pub fn donor_down(&mut self, donor: DonorId, reason: &str, now: Instant) {
        let d = &mut self.donors[donor];
        if matches!(d.health, Health::Down { .. }) {
            return;
        }
        d.failures += 1;
        d.stats.failures += 1;
        d.stats.last_error = Some(reason.to_owned());
        d.stats.up = false;
        let backoff = self
            .config
            .backoff_base
            .saturating_mul(1 << d.failures.min(16).saturating_sub(1))
            .min(self.config.backoff_max);
        // Full jitter's upper half: spread retries, never hammer at once.
        let jitter = backoff.mul_f64(0.5 + 0.5 * unit(&mut self.rng));
        d.health = Health::Down {
            retry_at: now + jitter,
        };
        let lost: Vec<String> = d.in_flight.drain().map(|(id, _)| id).collect();
        for job_id in lost {
            self.reissue(job_id, reason);
        }
    }

    /// `donor` answered `job_id`: the job ran, successfully or not (a job
    /// that failed on its own input is not retried elsewhere), and is
    /// delivered unless it was already. `queue_depth` is what the answer reported.
    /// Returns whether this answer is the one delivered.
    pub fn answer(
        &mut self,
        donor: DonorId,
        job_id: &str,
        queue_depth: usize,
        now: Instant,
    ) -> bool {
        let Some(sent) = self.take(donor, job_id, queue_depth) else {
            return false;
        };
        let d = &mut self.donors[donor];
        d.stats.jobs += 1;
        d.stats.busy += now.saturating_duration_since(sent);
        self.deliver(job_id.to_owned(), Ok(donor));
        true
    }

    /// `donor` could not take `job_id` now (`queue_full`, `shutting_down`):
    /// it goes to another donor; `donor` stays up.
    pub fn refused(&mut self, donor: DonorId, job_id: &str, reason: &str) {
        if self.take(donor, job_id, 0).is_some() {
            self.reissue(job_id.to_owned(), reason);
        }
    }

    /// Takes `job_id` off `donor`; `None` (counted as a duplicate) for a late
    /// answer from a donor that came back, or one it was not asked.
    fn take(&mut self, donor: DonorId, job_id: &str, queue_depth: usize) -> Option<Instant> {
        let d = &mut self.donors[donor];
        let sent = d.in_flight.remove(job_id);
        d.reported_depth = queue_depth;
        if sent.is_none() || self.delivered.contains(job_id) {
            self.duplicates += 1;
            return None;
        }
        sent
    }

    /// The job's final outcome, once.
    fn deliver(&mut self, job_id: String, outcome: Result<DonorId, PoolError>) {
        self.jobs.remove(&job_id);
        self.delivered.insert(job_id.clone());
        self.delivered_total += 1;
        self.actions
            .push_back(PoolAction::Deliver { job_id, outcome });
    }

    fn reissue(&mut self, job_id: String, reason: &str) {
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return;
        };
        job.on = None;
        job.attempts += 1;
        self.retries += 1;
        if job.attempts > self.config.max_attempts {
            let gave_up = PoolError::GaveUp {
                attempts: self.config.max_attempts + 1,
                last: reason.to_owned(),
            };
            self.deliver(job_id, Err(gave_up));
        } else {
            // Ahead of new jobs: it has waited longest.
            self.queue.push_front(job_id);
        }
    }

    /// Acts on time: stalled donors are marked down, down donors whose wait is
    /// over are connected again.
    pub fn handle_timeout(&mut self, now: Instant) {
        let deadline = self.config.job_deadline;
        for donor in 0..self.donors.len() {
            let d = &self.donors[donor];
            let stalled = d
                .in_flight
                .values()
                .any(|sent| now.saturating_duration_since(*sent) >= deadline);
            if stalled {
                self.donor_down(donor, "stalled: no answer within the job deadline", now);
                self.actions.push_back(PoolAction::Disconnect(donor));
            }
        }
        for (donor, d) in self.donors.iter_mut().enumerate() {
            if let Health::Down { retry_at } = d.health {
                if retry_at <= now {
                    d.health = Health::Connecting;
                    self.actions.push_back(PoolAction::Connect(donor));
                }
            }
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) has work next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let deadline = self.config.job_deadline;
        self.donors
            .iter()
            .flat_map(|d| {
                let stall = d.in_flight.values().map(move |sent| *sent + deadline);
                let retry = match d.health {
                    Health::Down { retry_at } => Some(retry_at),
                    _ => None,
                };
                stall.chain(retry)
            })
            .min()
    }

    /// The next thing to do: deliveries and connects first, then jobs placed
    /// on donors with room.
    pub fn poll_action(&mut self, now: Instant) -> Option<PoolAction> {
        if let Some(action) = self.actions.pop_front() {
            return Some(action);
        }
        if self.queue.is_empty() {
            return None;
        }
        if self.live_donors() == 0 && self.all_failed_long() {
            return None;
        }
        let donor = self.place()?;
        let job_id = self.queue.pop_front()?;
        if let Some(job) = self.jobs.get_mut(&job_id) {
            job.on = Some(donor);
        }
        self.donors[donor].in_flight.insert(job_id.clone(), now);
        Some(PoolAction::Send { donor, job_id })
    }

    /// Power of two choices: two random donors with room, the less loaded one.
    fn place(&mut self) -> Option<DonorId> {
        let open: Vec<DonorId> = (0..self.donors.len())
            .filter(|&i| {
                let d = &self.donors[i];
                matches!(d.health, Health::Up) && d.in_flight.len() < d.window
            })
            .collect();
        match open.len() {
            0 => None,
            1 => Some(open[0]),
            n => {
                let a = open[(next(&mut self.rng) % n as u64) as usize];
                let mut b = open[(next(&mut self.rng) % (n as u64 - 1)) as usize];
                if b == a {
                    b = open[n - 1];
                }
                Some(if self.load(a) <= self.load(b) { a } else { b })
            }
        }
    }

    /// A donor's load: its jobs in flight from us, weighted by how long its
    /// jobs take, plus what waits in its queue.
    fn load(&self, donor: DonorId) -> f64 {
        let d = &self.donors[donor];
        let mean = if d.stats.jobs == 0 {
            1.0
        } else {
            d.stats.busy.as_secs_f64() / d.stats.jobs as f64
        };
        (d.in_flight.len() + d.reported_depth) as f64 * mean.max(1e-6)
    }

    fn all_failed_long(&self) -> bool {
        self.donors
            .iter()
            .all(|d| d.failures as u64 > u64::from(self.config.max_attempts))
    }

    /// Whether every donor failed `max_attempts` times in a row: the pool cannot
    /// place jobs; the caller should fail what is left.
    pub fn is_hopeless(&self) -> bool {
        self.live_donors() == 0 && self.all_failed_long()
    }

    /// Fails every job not delivered yet with `reason` (when the pool is hopeless).
    pub fn fail_all(&mut self, reason: PoolError) {
        let mut left: Vec<String> = self.jobs.keys().cloned().collect();
        left.sort();
        for job_id in left {
            self.deliver(job_id, Err(reason.clone()));
        }
        self.queue.clear();
        for d in &mut self.donors {
            d.in_flight.clear();
        }
    }

    /// Forgets that `job_id` was delivered, so the id may be submitted again
    /// (a long-lived pool). Late answers to it are still dropped: they match
    /// no job in flight.
    pub fn forget(&mut self, job_id: &str) {
        self.delivered.remove(job_id);
    }

    /// Donors up now.
    pub fn live_donors(&self) -> usize {
        self.donors
            .iter()
            .filter(|d| matches!(d.health, Health::Up))
            .count()
    }

    /// Jobs not delivered yet.
    pub fn pending(&self) -> usize {
        self.jobs.len()
    }

    /// Jobs delivered.
    pub fn delivered(&self) -> usize {
        self.delivered_total
    }

    /// Jobs re-issued to another donor so far.
    pub fn retries(&self) -> u64 {
        self.retries
    }

    /// Late or unasked-for answers dropped so far.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// What `donor` did.
    pub fn stats(&self, donor: DonorId) -> &DonorStats {
        &self.donors[donor].stats
    }
}

fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn unit(state: &mut u64) -> f64 {
    (next(state) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
// Tests start their virtual clock from one real instant.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    fn drain(core: &mut PoolCore, now: Instant) -> Vec<PoolAction> {
        std::iter::from_fn(|| core.poll_action(now)).collect()
    }

    fn sends(actions: &[PoolAction]) -> Vec<(DonorId, String)> {
        actions
            .iter()
            .filter_map(|a| match a {
                PoolAction::Send { donor, job_id } => Some((*donor, job_id.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn jobs_spread_within_each_donors_window() {
        let now = Instant::now();
        let mut core = PoolCore::new(3, PoolConfig::default().max_in_flight(16), 7);
        assert_eq!(drain(&mut core, now).len(), 3, "three connects");
        core.donor_up(0, 4);
        core.donor_up(1, 4);
        core.donor_up(2, 1); // a v1 node: one at a time
        for i in 0..20 {
            core.submit(&format!("j{i}")).unwrap();
        }
        assert!(core.submit("j3").is_err(), "duplicate job_id");
        let placed = sends(&drain(&mut core, now));
        assert_eq!(placed.len(), 9, "4 + 4 + 1 in flight, the rest waits");
        assert_eq!(placed.iter().filter(|(d, _)| *d == 2).count(), 1);
    }

    #[test]
    fn a_lost_donor_s_jobs_go_elsewhere_and_each_job_is_delivered_once() {
        let now = Instant::now();
        let mut core = PoolCore::new(2, PoolConfig::default(), 1);
        drain(&mut core, now);
        core.donor_up(0, 2);
        core.donor_up(1, 2);
        for i in 0..4 {
            core.submit(&format!("j{i}")).unwrap();
        }
        let placed = sends(&drain(&mut core, now));
        assert_eq!(placed.len(), 4);
        let on_zero: Vec<String> = placed
            .iter()
            .filter(|(d, _)| *d == 0)
            .map(|(_, j)| j.clone())
            .collect();
        core.donor_down(0, "closed", now);
        // Donor 1 finishes its own jobs; donor 0's come to it.
        for (d, j) in placed.iter().filter(|(d, _)| *d == 1) {
            core.answer(*d, j, 0, now);
        }
        let actions = drain(&mut core, now);
        let again = sends(&actions);
        assert_eq!(again.len(), on_zero.len());
        assert!(again.iter().all(|(d, j)| *d == 1 && on_zero.contains(j)));
        for (d, j) in &again {
            core.answer(*d, j, 0, now);
        }
        // Donor 0 comes back and answers late: dropped, not delivered twice.
        core.donor_up(0, 2);
        core.answer(0, &on_zero[0], 0, now);
        let delivered: Vec<_> = drain(&mut core, now)
            .into_iter()
            .filter(|a| matches!(a, PoolAction::Deliver { .. }))
            .collect();
        assert_eq!(delivered.len(), on_zero.len(), "{delivered:?}");
        assert_eq!(core.delivered(), 4);
        assert_eq!(core.pending(), 0);
        assert_eq!(core.duplicates(), 1);
    }

    #[test]
    fn a_stalled_donor_is_dropped_and_retried_with_growing_backoff() {
        let start = Instant::now();
        let config = PoolConfig::default()
            .job_deadline(Duration::from_secs(1))
            .backoff_base(Duration::from_millis(100));
        let mut core = PoolCore::new(2, config, 3);
        drain(&mut core, start);
        core.donor_up(0, 1);
        core.submit("a").unwrap();
        assert_eq!(sends(&drain(&mut core, start)), [(0, "a".to_owned())]);
        assert_eq!(core.poll_timeout(), Some(start + Duration::from_secs(1)));
        let later = start + Duration::from_secs(1);
        core.handle_timeout(later);
        let actions = drain(&mut core, later);
        assert!(actions.contains(&PoolAction::Disconnect(0)), "{actions:?}");
        assert_eq!(core.stats(0).failures, 1);
        // Retried after 50..100 ms, then after 100..200 ms.
        let retry = core.poll_timeout().unwrap() - later;
        assert!(retry >= Duration::from_millis(50) && retry <= Duration::from_millis(100));
        core.handle_timeout(later + retry);
        assert_eq!(drain(&mut core, later + retry), [PoolAction::Connect(0)]);
        core.donor_down(0, "refused", later + retry);
        let second = core.poll_timeout().unwrap() - (later + retry);
        assert!(second >= Duration::from_millis(100) && second <= Duration::from_millis(200));
        // The job waits for a donor; donor 1 takes it.
        core.donor_up(1, 1);
        assert_eq!(sends(&drain(&mut core, later)), [(1, "a".to_owned())]);
    }

    #[test]
    fn a_failed_job_is_not_retried_but_a_refusal_is() {
        let now = Instant::now();
        let mut core = PoolCore::new(2, PoolConfig::default(), 5);
        drain(&mut core, now);
        core.donor_up(0, 1);
        core.submit("bad").unwrap();
        core.submit("full").unwrap();
        let first = sends(&drain(&mut core, now));
        core.answer(0, &first[0].1, 0, now);
        let next = sends(&drain(&mut core, now));
        core.refused(0, &next[0].1, "queue full");
        let actions = drain(&mut core, now);
        assert_eq!(sends(&actions), [(0, next[0].1.clone())], "re-issued");
        assert_eq!(core.retries(), 1);
    }

    #[test]
    fn slower_donors_get_less_work() {
        let start = Instant::now();
        let mut core = PoolCore::new(2, PoolConfig::default().max_in_flight(8), 11);
        drain(&mut core, start);
        core.donor_up(0, 8);
        core.donor_up(1, 8);
        let mut now = start;
        let mut counts = [0u32; 2];
        for i in 0..400 {
            core.submit(&format!("j{i}")).unwrap();
        }
        // Donor 0 answers in 1 ms, donor 1 in 4 ms, one step of 1 ms at a time.
        let mut in_flight: Vec<(DonorId, String, Instant)> = Vec::new();
        while core.delivered() < 400 {
            for (d, j) in sends(&drain(&mut core, now)) {
                counts[d] += 1;
                in_flight.push((d, j, now));
            }
            now += Duration::from_millis(1);
            let (done, rest): (Vec<_>, Vec<_>) = in_flight.into_iter().partition(|(d, _, t)| {
                now.duration_since(*t) >= Duration::from_millis(if *d == 0 { 1 } else { 4 })
            });
            in_flight = rest;
            for (d, j, _) in done {
                core.answer(d, &j, 0, now);
            }
        }
        assert!(counts[0] > 2 * counts[1], "{counts:?}");
        assert!(
            counts[1] > 0,
            "the slow donor still gets probes: {counts:?}"
        );
    }
}
