//! Properties of [`PoolCore`] under any order of donor events: no job is ever
//! delivered twice, a job is only sent to a donor that is up and has room,
//! and once some donor stays up every job is delivered.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use donate_proto::{PoolAction, PoolConfig, PoolCore};
use quickcheck::{quickcheck, Arbitrary, Gen};

const DONORS: usize = 3;
const JOBS: usize = 12;

#[derive(Debug, Clone)]
enum Op {
    Up {
        donor: u8,
        window: u8,
    },
    Down {
        donor: u8,
    },
    /// Answers the `n`-th job in flight on `donor`.
    Answer {
        donor: u8,
        n: u8,
    },
    /// Answers a job the donor had before it went down (a late duplicate).
    Late {
        donor: u8,
        job: u8,
    },
    Refuse {
        donor: u8,
        n: u8,
    },
    Tick {
        ms: u16,
    },
}

impl Arbitrary for Op {
    fn arbitrary(g: &mut Gen) -> Op {
        let donor = u8::arbitrary(g) % DONORS as u8;
        match u8::arbitrary(g) % 6 {
            0 => Op::Up {
                donor,
                window: u8::arbitrary(g) % 4 + 1,
            },
            1 => Op::Down { donor },
            2 | 3 => Op::Answer {
                donor,
                n: u8::arbitrary(g),
            },
            4 => Op::Late {
                donor,
                job: u8::arbitrary(g) % JOBS as u8,
            },
            _ if bool::arbitrary(g) => Op::Refuse {
                donor,
                n: u8::arbitrary(g),
            },
            _ => Op::Tick {
                ms: u16::arbitrary(g) % 3000,
            },
        }
    }
}

/// The driver's view: what each donor has been sent and not answered.
struct World {
    core: PoolCore,
    now: Instant,
    up: [bool; DONORS],
    windows: [usize; DONORS],
    in_flight: [Vec<String>; DONORS],
    delivered: HashMap<String, usize>,
}

impl World {
    fn pump(&mut self) -> bool {
        while let Some(action) = self.core.poll_action(self.now) {
            match action {
                PoolAction::Send { donor, job_id } => {
                    if !self.up[donor] {
                        eprintln!("sent {job_id} to donor {donor}, which is not up");
                        return false;
                    }
                    self.in_flight[donor].push(job_id);
                    if self.in_flight[donor].len() > self.windows[donor] {
                        eprintln!("donor {donor} over its window");
                        return false;
                    }
                }
                PoolAction::Connect(_) => {}
                PoolAction::Disconnect(donor) => {
                    self.up[donor] = false;
                    self.in_flight[donor].clear();
                }
                PoolAction::Deliver { job_id, .. } => {
                    *self.delivered.entry(job_id).or_default() += 1;
                }
            }
        }
        true
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Up { donor, window } => {
                let d = donor as usize;
                self.up[d] = true;
                self.windows[d] = usize::from(window).min(8);
                self.core.donor_up(d, usize::from(window));
            }
            Op::Down { donor } => {
                let d = donor as usize;
                self.up[d] = false;
                self.in_flight[d].clear();
                self.core.donor_down(d, "closed", self.now);
            }
            Op::Answer { donor, n } | Op::Refuse { donor, n } => {
                let d = donor as usize;
                if self.in_flight[d].is_empty() {
                    return;
                }
                let i = usize::from(n) % self.in_flight[d].len();
                let job = self.in_flight[d].remove(i);
                if matches!(op, Op::Answer { .. }) {
                    self.core.answer(d, &job, 0, self.now);
                } else {
                    self.core.refused(d, &job, "queue full");
                }
            }
            Op::Late { donor, job } => {
                // Only a job this donor does not hold now: an answer from before it went down.
                let job = format!("j{job}");
                if !self.in_flight[donor as usize].contains(&job) {
                    self.core.answer(donor as usize, &job, 0, self.now);
                }
            }
            Op::Tick { ms } => {
                self.now += Duration::from_millis(u64::from(ms));
                self.core.handle_timeout(self.now);
            }
        }
    }
}

fn prop(ops: Vec<Op>) -> bool {
    #[allow(clippy::disallowed_methods)] // the virtual clock starts at one real instant
    let start = Instant::now();
    let config = PoolConfig::default()
        .job_deadline(Duration::from_secs(2))
        .max_attempts(1000);
    let mut w = World {
        core: PoolCore::new(DONORS, config, 42),
        now: start,
        up: [false; DONORS],
        windows: [0; DONORS],
        in_flight: Default::default(),
        delivered: HashMap::new(),
    };
    for j in 0..JOBS {
        w.core.submit(&format!("j{j}")).unwrap();
    }
    for op in &ops {
        w.apply(op);
        if !w.pump() {
            return false;
        }
        if w.delivered.values().any(|n| *n > 1) {
            eprintln!("delivered twice: {:?}", w.delivered);
            return false;
        }
    }
    // Then donor 0 stays up and answers everything: every job gets delivered.
    for _ in 0..10_000 {
        if w.core.pending() == 0 {
            break;
        }
        w.now += Duration::from_secs(60);
        w.core.handle_timeout(w.now);
        if !w.up[0] {
            w.apply(&Op::Up {
                donor: 0,
                window: 4,
            });
        }
        if !w.pump() {
            return false;
        }
        while let Some(job) = w.in_flight[0].pop() {
            w.core.answer(0, &job, 0, w.now);
        }
        if !w.pump() {
            return false;
        }
    }
    let all: HashSet<_> = (0..JOBS).map(|j| format!("j{j}")).collect();
    let got: HashSet<_> = w.delivered.keys().cloned().collect();
    w.core.pending() == 0 && got == all && w.delivered.values().all(|n| *n == 1)
}

#[test]
fn each_job_is_delivered_exactly_once_whatever_the_donors_do() {
    quickcheck(prop as fn(Vec<Op>) -> bool);
}
