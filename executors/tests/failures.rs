//! A misbehaving worker fails only the job it was running, with a clear code,
//! and is restarted: crash, hang, garbage, a reply over the line limit. Driven
//! through the `Executor` trait directly (no sockets).

mod common;

use std::time::{Duration, Instant};

use common::{python_worker, rust_worker, test_worker};
use donate_exec::{WorkerConfig, WorkerModel, WorkerProcess};
use donate_proto::{Executor, JobContext, JobError, Weights};

fn flaky(config: WorkerConfig) -> (WorkerProcess, WorkerModel) {
    let executor = WorkerProcess::new(test_worker("flaky.py"), config).expect("start flaky.py");
    let model = executor
        .mount("{}".into(), Weights::Memory(vec![7; 100]))
        .expect("mount");
    (executor, model)
}

fn pid_of(executor: &WorkerProcess, model: &WorkerModel) -> i32 {
    let out = executor
        .infer(model, &[1, 2], 0, &JobContext::new("j1"))
        .expect("a normal job");
    assert_eq!(out[..2], [1, 2]);
    out[2]
}

fn failed(result: Result<Vec<i32>, JobError>) -> JobError {
    result.expect_err("the job must fail")
}

#[test]
fn a_crash_mid_reply_is_worker_crashed() {
    let (executor, model) = flaky(WorkerConfig::default());
    let before = pid_of(&executor, &model);
    let error = failed(executor.infer(&model, &[666], 0, &JobContext::new("j1")));
    assert_eq!(error.code, "worker_crashed", "{error:?}");
    assert!(
        error.message.contains("exit status: 3"),
        "{}",
        error.message
    );
    assert_ne!(pid_of(&executor, &model), before, "restarted");
}

#[test]
fn a_hang_is_worker_timeout() {
    let (executor, model) = flaky(WorkerConfig {
        job_timeout: Duration::from_millis(300),
        ..WorkerConfig::default()
    });
    let before = pid_of(&executor, &model);
    let started = Instant::now();
    let error = failed(executor.infer(&model, &[777], 0, &JobContext::new("j1")));
    assert_eq!(error.code, "worker_timeout", "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    #[cfg(target_os = "linux")]
    assert!(
        common::eventually(Duration::from_secs(2), || !std::path::Path::new(&format!(
            "/proc/{before}"
        ))
        .exists()),
        "the hung worker was killed"
    );
    assert_ne!(pid_of(&executor, &model), before);
}

#[test]
fn garbage_is_worker_protocol() {
    let (executor, model) = flaky(WorkerConfig::default());
    let error = failed(executor.infer(&model, &[888], 0, &JobContext::new("j1")));
    assert_eq!(error.code, "worker_protocol", "{error:?}");
    assert!(
        error.message.contains("this is not the protocol"),
        "{}",
        error.message
    );
    pid_of(&executor, &model);
}

#[test]
fn a_reply_over_the_line_limit_is_worker_protocol() {
    let (executor, model) = flaky(WorkerConfig {
        max_line: 1024 * 1024,
        ..WorkerConfig::default()
    });
    let error = failed(executor.infer(&model, &[999], 0, &JobContext::new("j1")));
    assert_eq!(error.code, "worker_protocol", "{error:?}");
    assert!(
        error.message.contains("longer than 1048576 bytes"),
        "{}",
        error.message
    );
    pid_of(&executor, &model);

    // The same reply fits under the default limit (64 MiB).
    let (executor, model) = flaky(WorkerConfig::default());
    assert_eq!(
        executor
            .infer(&model, &[999], 0, &JobContext::new("j1"))
            .unwrap()
            .len(),
        1024 * 1024 + 1
    );
}

#[test]
fn a_refusal_keeps_the_worker() {
    let (executor, model) = flaky(WorkerConfig::default());
    let before = pid_of(&executor, &model);
    let error = failed(executor.infer(&model, &[555], 0, &JobContext::new("j1")));
    assert_eq!(
        error,
        JobError::new("bad_input", "555 is not welcome"),
        "the worker's own code and message"
    );
    assert_eq!(pid_of(&executor, &model), before, "not restarted");
}

#[test]
fn a_refused_mount_is_the_reason() {
    let executor = WorkerProcess::new(test_worker("flaky.py"), WorkerConfig::default()).unwrap();
    let reason = executor
        .mount(r#"{"please":"refuse"}"#.into(), Weights::Memory(vec![1]))
        .expect_err("refused");
    assert_eq!(reason, "refused by the test worker");
}

#[test]
fn jobs_after_a_restart_get_the_model_replayed() {
    let executor = WorkerProcess::new(
        test_worker("flaky.py"),
        WorkerConfig {
            workers: 2,
            ..WorkerConfig::default()
        },
    )
    .unwrap();
    let a = executor
        .mount("{}".into(), Weights::Memory(vec![1; 10]))
        .unwrap();
    let b = executor
        .mount("{}".into(), Weights::Memory(vec![2; 10]))
        .unwrap();
    for _ in 0..3 {
        failed(executor.infer(&a, &[666], 0, &JobContext::new("j1")));
        pid_of(&executor, &a);
        pid_of(&executor, &b);
    }
}

#[test]
fn a_missing_program_fails_at_start() {
    let error = WorkerProcess::new(vec!["/nonexistent/worker".into()], WorkerConfig::default())
        .err()
        .expect("cannot start");
    assert!(error.to_string().contains("/nonexistent/worker"), "{error}");
}

#[test]
fn a_worker_that_dies_at_once_fails_the_start_or_unwatched_the_mount() {
    let argv: Vec<String> = vec![
        "python3".into(),
        "-c".into(),
        "import sys; print('no model here', file=sys.stderr); sys.exit(5)".into(),
    ];
    let error = WorkerProcess::new(argv.clone(), WorkerConfig::default())
        .err()
        .expect("found at start");
    assert_eq!(
        error.to_string().split_once(']').map(|(_, rest)| rest),
        Some(" exited at start (exit status: 5); its last stderr line: no model here"),
        "{error}"
    );
    let unwatched = WorkerConfig {
        start_check: Duration::ZERO,
        ..WorkerConfig::default()
    };
    let executor = WorkerProcess::new(argv, unwatched).unwrap();
    let reason = executor
        .mount("{}".into(), Weights::Memory(vec![1]))
        .expect_err("no worker");
    assert!(reason.contains("crashed during mount"), "{reason}");
    assert!(reason.contains("exit status: 5"), "{reason}");
}

#[test]
fn example_workers_answer_prompts() {
    for argv in [python_worker(), rust_worker()] {
        let executor = WorkerProcess::new(argv.clone(), WorkerConfig::default()).unwrap();
        // Pairs ab, bc (twice each) and ca: from the last c the text goes on a, b, c, a, b.
        assert_eq!(
            executor
                .prompt("abcabc", 5, &JobContext::new("j1"))
                .unwrap(),
            "abcab",
            "{argv:?}"
        );
        assert_eq!(
            executor.prompt("xy", 0, &JobContext::new("j1")).unwrap(),
            "",
            "{argv:?}: y is never followed"
        );
        assert_eq!(
            executor.prompt("", 0, &JobContext::new("j1")).unwrap(),
            "",
            "{argv:?}"
        );
        assert_eq!(
            executor.prompt("ééé", 4, &JobContext::new("j1")).unwrap(),
            "éé",
            "{argv:?}"
        );
    }
}

#[test]
fn prompts_reach_the_worker_unchanged() {
    let executor = WorkerProcess::new(test_worker("flaky.py"), WorkerConfig::default()).unwrap();
    let text = "quotes ' \" $(rm -rf /) `id` \\ \n\r\t\u{1}\u{1b}[31m\u{7f} é 日本 🦀";
    assert_eq!(
        executor.prompt(text, 0, &JobContext::new("j1")).unwrap(),
        text
    );
}

#[cfg(target_os = "linux")]
#[test]
fn dropping_the_executor_stops_the_workers() {
    let executor = WorkerProcess::new(
        test_worker("flaky.py"),
        WorkerConfig {
            workers: 3,
            ..WorkerConfig::default()
        },
    )
    .unwrap();
    let pids = executor.idle_pids();
    assert_eq!(pids.len(), 3);
    let started = Instant::now();
    drop(executor);
    assert!(started.elapsed() < Duration::from_secs(3));
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "worker {pid} still running"
        );
    }
}
