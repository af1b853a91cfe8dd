//! One forward pass at a time per model, with concurrent jobs' next tokens
//! stacked into one pass ("flat combining").
//!
//! Each job joins the model's [`Combiner`] as a [`Member`] and hands it each
//! step (its cache, its tokens, its position). Whichever waiting thread finds
//! the model idle runs the oldest step, together with every other waiting
//! step that can share a pass with it (one-token decode steps, up to
//! `max_group`), and hands each job its own result. No thread is added: a
//! lone job runs its own steps. Steps are taken oldest first, and a step
//! that cannot be stacked (a prompt) runs alone when it is the oldest, so no
//! job waits behind more than one pass per earlier step.
//!
//! Jobs stepping together fall out of step without help: the thread that
//! ran a pass is back with its next step before the others have woken, and
//! would run it alone. So before a stackable pass, the thread running it
//! waits for the members that are between two steps (sampling the token
//! just made), at most an eighth of the last pass's time.

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::guard::panic_message;

/// Runs the steps handed to it by many threads, a group at a time.
pub(crate) struct Combiner<T, R> {
    state: Mutex<State<T, R>>,
    /// Signalled when a group's results are in and the model is idle again.
    wake: Condvar,
    /// Signalled when a step arrives or a member leaves (for a gathering pass).
    arrived: Condvar,
    /// Most steps in one group (1: every step runs alone).
    max_group: usize,
}

struct State<T, R> {
    /// A thread is running (or gathering) a group.
    busy: bool,
    /// Steps not yet taken, oldest first, with their tickets.
    waiting: VecDeque<(u64, T)>,
    /// Results not yet picked up by their threads.
    done: HashMap<u64, Result<R, String>>,
    next_ticket: u64,
    /// Members between two steps: neither waiting nor running one.
    between: usize,
    /// How long the last group took to run.
    last_pass: Duration,
    /// Groups run and steps run, for [`Combiner::counts`].
    groups: u64,
    steps: u64,
}

/// A job's place in a [`Combiner`], from its first step to its last.
pub(crate) struct Member<'c, T, R> {
    combiner: &'c Combiner<T, R>,
}

impl<T, R> Drop for Member<'_, T, R> {
    fn drop(&mut self) {
        let mut state = self.combiner.lock();
        state.between -= 1;
        self.combiner.arrived.notify_all();
    }
}

impl<T, R> Member<'_, T, R> {
    /// Runs `step` and returns its result, perhaps computed by another
    /// thread together with other members' steps. `stackable` says which
    /// steps may share a group; `run` computes a group's results, one per
    /// step in order. Every member of one combiner must pass the same two
    /// functions: any member may run any other member's steps. A panic in
    /// `run` fails every step of its group with a message, and the combiner
    /// goes on.
    pub(crate) fn run(
        &mut self,
        step: T,
        stackable: impl Fn(&T) -> bool,
        run: impl Fn(Vec<T>) -> Vec<Result<R, String>>,
    ) -> Result<R, String> {
        let combiner = self.combiner;
        let mut state = combiner.lock();
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        state.waiting.push_back((ticket, step));
        state.between -= 1;
        combiner.arrived.notify_all();
        loop {
            if let Some(result) = state.done.remove(&ticket) {
                state.between += 1;
                return result;
            }
            if state.busy {
                state = combiner
                    .wake
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            // Idle and our step not done: it is still waiting, so the group
            // below is not empty.
            state.busy = true;
            state = combiner.gather(state, &stackable);
            let group = combiner.take_group(&mut state, &stackable);
            drop(state);
            let tickets: Vec<u64> = group.iter().map(|(t, _)| *t).collect();
            let steps = group.into_iter().map(|(_, s)| s).collect();
            let started = Instant::now();
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
                Err(panic) => all_failed(
                    tickets.len(),
                    &format!("panicked in a forward pass: {}", panic_message(&*panic)),
                ),
            };
            state = combiner.lock();
            state.last_pass = started.elapsed();
            state.groups += 1;
            state.steps += tickets.len() as u64;
            state.done.extend(tickets.into_iter().zip(results));
            state.busy = false;
            combiner.wake.notify_all();
        }
    }
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
                between: 0,
                last_pass: Duration::ZERO,
                groups: 0,
                steps: 0,
            }),
            wake: Condvar::new(),
            arrived: Condvar::new(),
            max_group: max_group.max(1),
        }
    }

    /// A job joins: its steps go through [`Member::run`] until it is dropped.
    pub(crate) fn join(&self) -> Member<'_, T, R> {
        self.lock().between += 1;
        Member { combiner: self }
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

    /// Before a stackable group: waits for the members between two steps
    /// (or yet to pick up their result) to hand in their next one, at most
    /// an eighth of the last pass's time.
    fn gather<'s>(
        &'s self,
        mut state: MutexGuard<'s, State<T, R>>,
        stackable: &impl Fn(&T) -> bool,
    ) -> MutexGuard<'s, State<T, R>> {
        let front_stacks = state.waiting.front().is_some_and(|(_, s)| stackable(s));
        if self.max_group == 1 || !front_stacks {
            return state;
        }
        let deadline = Instant::now() + state.last_pass / 8;
        // Members whose results are in but not yet picked up come back too.
        while (state.between > 0 || !state.done.is_empty()) && state.waiting.len() < self.max_group
        {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            state = self
                .arrived
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        state
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
        let mut member = combiner.join();
        for token in 0..5 {
            let got = member.run((1, token), |s| s.1 % 2 == 0, sleepy_run(&groups));
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
                    let mut member = combiner.join();
                    start.wait();
                    for step in 0..20u32 {
                        // Odd tokens (every fourth step) may not be stacked.
                        let token = if step % 4 == 3 {
                            2 * step + 1
                        } else {
                            2 * step
                        };
                        let got = member.run((job, token), |s| s.1 % 2 == 0, sleepy_run(&groups));
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

    /// Members stepping in lock step (each `pass` long): (groups, steps).
    fn lock_step(members: usize, steps: u32, pass: Duration) -> (u64, u64) {
        let combiner = Arc::new(Combiner::<Step, u32>::new(16));
        let run = move |steps: Vec<Step>| -> Vec<Result<u32, String>> {
            std::thread::sleep(pass);
            steps.iter().map(|s| Ok(s.1)).collect()
        };
        let threads: Vec<_> = (0..members)
            .map(|job| {
                let combiner = combiner.clone();
                std::thread::spawn(move || {
                    let mut member = combiner.join();
                    for token in 0..steps {
                        assert_eq!(member.run((job, token), |_| true, run), Ok(token));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        combiner.counts()
    }

    #[test]
    fn jobs_stepping_together_stay_together() {
        // Without the wait for members between two steps, the thread that
        // ran a pass runs its next step alone: groups of 1 and 3 in turn.
        let (groups, steps) = lock_step(4, 30, Duration::from_millis(20));
        assert_eq!(steps, 120);
        assert!(groups <= 45, "{groups} groups for {steps} steps");
    }

    #[test]
    fn an_idle_member_delays_a_pass_by_at_most_an_eighth() {
        let combiner = Combiner::<Step, u32>::new(16);
        // Joined but never stepping (a job sampling slowly, say).
        let _idle = combiner.join();
        let mut member = combiner.join();
        let pass = Duration::from_millis(20);
        let run = |steps: Vec<Step>| -> Vec<Result<u32, String>> {
            std::thread::sleep(pass);
            steps.iter().map(|s| Ok(s.1)).collect()
        };
        let start = Instant::now();
        for token in 0..10 {
            assert_eq!(member.run((0, token), |_| true, run), Ok(token));
        }
        // 10 passes and 9 waits of an eighth: 222 ms; twice that with a busy machine.
        assert!(start.elapsed() < pass * 10 * 2, "{:?}", start.elapsed());
    }

    #[test]
    fn max_group_one_runs_every_step_alone() {
        let combiner = Arc::new(Combiner::<Step, u32>::new(1));
        let groups = Arc::new(Mutex::new(Vec::new()));
        let threads: Vec<_> = (0..3)
            .map(|job| {
                let (combiner, groups) = (combiner.clone(), groups.clone());
                std::thread::spawn(move || {
                    let mut member = combiner.join();
                    for token in 0..10 {
                        member
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
        let mut member = combiner.join();
        let err = member.run((0, 13), |_| true, run).unwrap_err();
        assert!(err.contains("bad token"), "{err}");
        assert_eq!(member.run((0, 2), |_| true, run), Ok(2));
        // A run that loses a result fails its group rather than a caller hanging.
        let short = member.run((0, 4), |_| true, |_: Vec<Step>| Vec::new());
        assert!(short.unwrap_err().contains("0 results"));
    }
}
