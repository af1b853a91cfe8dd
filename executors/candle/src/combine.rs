//! One forward pass at a time per model, with concurrent jobs' next tokens
//! stacked into one pass ("flat combining").
//!
//! Each job's thread hands its step (its cache, its tokens, its position) to
//! the model's [`Combiner`]. Whichever waiting thread finds the model idle
//! runs the oldest step, together with every other waiting step that can
//! share a pass with it (one-token decode steps, up to `max_group`), and
//! hands each job its own result. No thread or timer is added and nothing
//! waits to fill a batch: a lone job runs its own steps, and steps stack only
//! when jobs arrive while a pass is running. Steps are taken oldest first,
//! and a step that cannot be stacked (a prompt) runs alone when it is the
//! oldest, so no job waits behind more than one pass per earlier step.

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// Runs the steps handed to it by many threads, a group at a time.
pub(crate) struct Combiner<T, R> {
    state: Mutex<State<T, R>>,
    /// Signalled when a group's results are in and the model is idle again.
    wake: Condvar,
    /// Most steps in one group (1: every step runs alone).
    max_group: usize,
}

struct State<T, R> {
    /// A thread is running a group.
    busy: bool,
    /// Steps not yet taken, oldest first, with their tickets.
    waiting: VecDeque<(u64, T)>,
    /// Results not yet picked up by their threads.
    done: HashMap<u64, Result<R, String>>,
    next_ticket: u64,
    /// Groups run and steps run, for [`Combiner::counts`].
    groups: u64,
    steps: u64,
}

impl<T, R> Combiner<T, R> {
    /// A combiner that stacks at most `max_group` steps (at least 1).
    pub(crate) fn new(max_group: usize) -> Combiner<T, R> {
        Combiner {
            state: Mutex::new(State {
                busy: false,
                waiting: VecDeque::new(),
                done: HashMap::new(),
                next_ticket: 0,
                groups: 0,
                steps: 0,
            }),
            wake: Condvar::new(),
            max_group: max_group.max(1),
        }
    }

    /// `(groups, steps)` run so far: steps / groups is the mean group size.
    pub(crate) fn counts(&self) -> (u64, u64) {
        let state = self.lock();
        (state.groups, state.steps)
    }

    fn lock(&self) -> MutexGuard<'_, State<T, R>> {
        // Nothing panics while holding the lock (groups run outside it).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `step` and returns its result, perhaps computed by another
    /// thread together with other steps. `stackable` says which steps may
    /// share a group; `run` computes a group's results, one per step in
    /// order. Every caller of one combiner must pass the same two functions:
    /// any caller may run any other caller's steps. A panic in `run` fails
    /// every step of its group with a message, and the combiner goes on.
    pub(crate) fn run(
        &self,
        step: T,
        stackable: impl Fn(&T) -> bool,
        run: impl Fn(Vec<T>) -> Vec<Result<R, String>>,
    ) -> Result<R, String> {
        let mut state = self.lock();
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        state.waiting.push_back((ticket, step));
        loop {
            if let Some(result) = state.done.remove(&ticket) {
                return result;
            }
            if state.busy {
                state = self
                    .wake
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            // Idle and our step not done: it is still waiting, so the group
            // below is not empty.
            let group = self.take_group(&mut state, &stackable);
            state.busy = true;
            drop(state);
            let tickets: Vec<u64> = group.iter().map(|(t, _)| *t).collect();
            let steps = group.into_iter().map(|(_, s)| s).collect();
            let results = match catch_unwind(AssertUnwindSafe(|| run(steps))) {
                Ok(results) if results.len() == tickets.len() => results,
                Ok(results) => {
                    let message = format!(
                        "a group of {} steps gave {} results",
                        tickets.len(),
                        results.len()
                    );
                    all_failed(tickets.len(), &message)
                }
                Err(panic) => {
                    let message = panic
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| panic.downcast_ref::<&str>().copied())
                        .unwrap_or("(no message)");
                    all_failed(
                        tickets.len(),
                        &format!("panicked in a forward pass: {message}"),
                    )
                }
            };
            state = self.lock();
            state.groups += 1;
            state.steps += tickets.len() as u64;
            state.done.extend(tickets.into_iter().zip(results));
            state.busy = false;
            self.wake.notify_all();
        }
    }

    /// The oldest step and, if it is stackable, every other stackable
    /// waiting step, oldest first, up to `max_group`.
    fn take_group(
        &self,
        state: &mut State<T, R>,
        stackable: &impl Fn(&T) -> bool,
    ) -> Vec<(u64, T)> {
        let Some(first) = state.waiting.pop_front() else {
            return Vec::new();
        };
        if self.max_group == 1 || !stackable(&first.1) {
            return vec![first];
        }
        let mut group = vec![first];
        let mut rest = VecDeque::with_capacity(state.waiting.len());
        for (ticket, step) in state.waiting.drain(..) {
            if group.len() < self.max_group && stackable(&step) {
                group.push((ticket, step));
            } else {
                rest.push_back((ticket, step));
            }
        }
        state.waiting = rest;
        group
    }
}

/// `n` results failed with `message`, for a group that failed as a whole.
pub(crate) fn all_failed<R>(n: usize, message: &str) -> Vec<Result<R, String>> {
    (0..n).map(|_| Err(message.to_owned())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};
    use std::time::Duration;

    /// A step: (job, token); stackable when the token is even.
    type Step = (usize, u32);

    fn sleepy_run(
        groups: &Mutex<Vec<Vec<Step>>>,
    ) -> impl Fn(Vec<Step>) -> Vec<Result<u32, String>> + '_ {
        move |steps: Vec<Step>| {
            std::thread::sleep(Duration::from_millis(5));
            groups.lock().unwrap().push(steps.clone());
            steps
                .iter()
                .map(|&(job, token)| Ok(token * 10 + job as u32))
                .collect()
        }
    }

    #[test]
    fn a_lone_caller_runs_its_own_steps_one_by_one() {
        let combiner = Combiner::<Step, u32>::new(8);
        let groups = Mutex::new(Vec::new());
        for token in 0..5 {
            let got = combiner.run((1, token), |s| s.1 % 2 == 0, sleepy_run(&groups));
            assert_eq!(got, Ok(token * 10 + 1));
        }
        assert_eq!(combiner.counts(), (5, 5));
        assert!(groups.lock().unwrap().iter().all(|g| g.len() == 1));
    }

    #[test]
    fn concurrent_steps_stack_and_each_gets_its_own_result() {
        let jobs = 6;
        let combiner = Arc::new(Combiner::<Step, u32>::new(4));
        let groups = Arc::new(Mutex::new(Vec::new()));
        let start = Arc::new(Barrier::new(jobs));
        let threads: Vec<_> = (0..jobs)
            .map(|job| {
                let (combiner, groups, start) = (combiner.clone(), groups.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    for step in 0..20u32 {
                        // Odd tokens (every fourth step) may not be stacked.
                        let token = if step % 4 == 3 {
                            2 * step + 1
                        } else {
                            2 * step
                        };
                        let got = combiner.run((job, token), |s| s.1 % 2 == 0, sleepy_run(&groups));
                        assert_eq!(got, Ok(token * 10 + job as u32), "job {job} step {step}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let groups = groups.lock().unwrap();
        let (n_groups, n_steps) = combiner.counts();
        assert_eq!(n_steps, (jobs * 20) as u64);
        assert_eq!(n_groups as usize, groups.len());
        assert!(
            groups.iter().all(|g| g.len() <= 4),
            "a group above max_group"
        );
        assert!(
            groups
                .iter()
                .all(|g| g.len() == 1 || g.iter().all(|s| s.1 % 2 == 0)),
            "an unstackable step was stacked"
        );
        // Six jobs stepping together: the stackable steps (90) go in groups
        // of several (the others, 30, alone).
        let stacked: Vec<usize> = groups
            .iter()
            .filter(|g| g[0].1 % 2 == 0)
            .map(Vec::len)
            .collect();
        let stacked_steps: usize = stacked.iter().sum();
        assert_eq!(stacked_steps, jobs * 15);
        assert!(
            stacked.len() * 2 < stacked_steps,
            "{} groups for {stacked_steps} stackable steps",
            stacked.len()
        );
    }

    #[test]
    fn max_group_one_runs_every_step_alone() {
        let combiner = Arc::new(Combiner::<Step, u32>::new(1));
        let groups = Arc::new(Mutex::new(Vec::new()));
        let threads: Vec<_> = (0..3)
            .map(|job| {
                let (combiner, groups) = (combiner.clone(), groups.clone());
                std::thread::spawn(move || {
                    for token in 0..10 {
                        combiner
                            .run((job, 2 * token), |_| true, sleepy_run(&groups))
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(combiner.counts(), (30, 30));
    }

    #[test]
    fn a_panicking_group_fails_its_steps_and_the_next_runs() {
        let combiner = Combiner::<Step, u32>::new(4);
        let run = |steps: Vec<Step>| -> Vec<Result<u32, String>> {
            if steps.iter().any(|s| s.1 == 13) {
                panic!("bad token");
            }
            steps.iter().map(|s| Ok(s.1)).collect()
        };
        let err = combiner.run((0, 13), |_| true, run).unwrap_err();
        assert!(err.contains("bad token"), "{err}");
        assert_eq!(combiner.run((0, 2), |_| true, run), Ok(2));
        // A run that loses a result fails its group rather than a caller hanging.
        let short = combiner.run((0, 4), |_| true, |_: Vec<Step>| Vec::new());
        assert!(short.unwrap_err().contains("0 results"));
    }
}
