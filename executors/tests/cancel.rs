//! A cancelled job stops its worker (docs/WORKER-PROTOCOL.md, cancel): a
//! worker that answers the `cancel` line is kept; one that does not is killed
//! and restarted after the grace period. Times are measured here.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::test_worker;
use donate_exec::{WorkerConfig, WorkerModel, WorkerProcess};
use donate_proto::{Executor, JobContext, JobError, Weights};

fn start(worker: &str, config: WorkerConfig) -> (Arc<WorkerProcess>, Arc<WorkerModel>) {
    let executor = WorkerProcess::new(test_worker(worker), config).expect("start the worker");
    let model = executor
        .mount("{}".into(), Weights::Memory(vec![7; 100]))
        .expect("mount");
    (Arc::new(executor), Arc::new(model))
}

fn pid_of(executor: &WorkerProcess, model: &WorkerModel) -> i32 {
    let out = executor
        .infer(model, &[1], 0, &JobContext::new("pid"))
        .expect("a normal job");
    out[1]
}

/// Runs `input` on a thread, cancels it after `after`, and returns its
/// result and the time from the cancel to the worker thread being free.
fn cancel_after(
    executor: &Arc<WorkerProcess>,
    model: &Arc<WorkerModel>,
    input: i32,
    after: Duration,
) -> (Result<Vec<i32>, JobError>, Duration) {
    let flag = Arc::new(AtomicBool::new(false));
    let job = {
        let (executor, model, flag) = (executor.clone(), model.clone(), flag.clone());
        thread::spawn(move || {
            let context = JobContext::new("long").with_cancel(&flag);
            let result = executor.infer(&model, &[input], 0, &context);
            (result, Instant::now())
        })
    };
    thread::sleep(after);
    let cancelled_at = Instant::now();
    flag.store(true, Ordering::Relaxed);
    let (result, done_at) = job.join().expect("the job thread");
    (result, done_at.saturating_duration_since(cancelled_at))
}

#[test]
fn a_worker_that_answers_cancel_is_freed_at_once_and_kept() {
    let (executor, model) = start("cancellable.py", WorkerConfig::default());
    let before = pid_of(&executor, &model);
    let (result, freed_in) = cancel_after(&executor, &model, 5, Duration::from_millis(300));
    let error = result.expect_err("cancelled");
    assert_eq!(error.code, "cancelled", "{error:?}");
    eprintln!("cooperative worker freed {freed_in:?} after the cancel");
    assert!(freed_in < Duration::from_millis(500), "{freed_in:?}");
    assert_eq!(pid_of(&executor, &model), before, "kept, and in step");
}

#[test]
fn a_worker_that_ignores_cancel_is_killed_after_the_grace_period() {
    // flaky.py's input 777 sleeps for an hour and never reads stdin.
    let (executor, model) = start("flaky.py", WorkerConfig::default());
    assert_eq!(executor.config().cancel_grace, Duration::from_secs(2));
    let before = pid_of(&executor, &model);
    let (result, freed_in) = cancel_after(&executor, &model, 777, Duration::from_millis(200));
    let error = result.expect_err("cancelled");
    assert_eq!(error.code, "cancelled", "{error:?}");
    assert!(
        error.message.contains("did not stop within 2s"),
        "{}",
        error.message
    );
    eprintln!("unresponsive worker freed {freed_in:?} after the cancel (grace 2 s)");
    assert!(freed_in >= Duration::from_secs(2), "{freed_in:?}");
    assert!(freed_in <= Duration::from_millis(2300), "{freed_in:?}");
    assert_ne!(pid_of(&executor, &model), before, "restarted");
}

#[test]
fn the_grace_period_is_configurable() {
    let (executor, model) = start(
        "flaky.py",
        WorkerConfig {
            cancel_grace: Duration::from_millis(100),
            ..WorkerConfig::default()
        },
    );
    let (result, freed_in) = cancel_after(&executor, &model, 777, Duration::from_millis(100));
    assert_eq!(result.expect_err("cancelled").code, "cancelled");
    assert!(freed_in < Duration::from_secs(1), "{freed_in:?}");
}
