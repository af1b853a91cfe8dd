//! A worker's stderr reaches the node's log, each line prefixed with the
//! worker's id; a dropped model is unmounted from the worker. One test: it
//! installs the process-wide subscriber.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{eventually, test_worker};
use donate_exec::{WorkerConfig, WorkerProcess};
use donate_proto::{Executor, JobContext, Weights};

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl Log {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn worker_stderr_is_logged_with_its_id() {
    let log = Log::default();
    let writer = log.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let executor = WorkerProcess::new(
        test_worker("flaky.py"),
        WorkerConfig {
            workers: 2,
            ..WorkerConfig::default()
        },
    )
    .unwrap();
    let pids = executor.idle_pids();
    let model = executor
        .mount("{}".into(), Weights::Memory(vec![1; 8]))
        .unwrap();
    let out = executor
        .infer(&model, &[444], 0, &JobContext::new("j1"))
        .unwrap();
    let pid = out[1];
    assert!(pids.contains(&(pid as u32)));
    let slot = if pid as u32 == pids[pids.len() - 1] {
        0
    } else {
        1
    };
    let prefix = format!("w{slot}[{pid}]: ");
    let line = format!("{prefix}hello from the worker");
    assert!(
        eventually(Duration::from_secs(5), || log.text().contains(&line)),
        "no {line:?} in:\n{}",
        log.text()
    );

    // Dropping the model sends unmount to the worker that has it.
    let id = model.id();
    drop(model);
    let line = format!("{prefix}unmounted {id}");
    assert!(
        eventually(Duration::from_secs(5), || log.text().contains(&line)),
        "no {line:?} in:\n{}",
        log.text()
    );

    // A crash is logged as a warning with the code, and the restart is named.
    let model = executor
        .mount("{}".into(), Weights::Memory(vec![1; 8]))
        .unwrap();
    let _ = executor.infer(&model, &[666], 0, &JobContext::new("j1"));
    assert!(log.text().contains("worker_crashed"), "{}", log.text());
    let out = executor
        .infer(&model, &[444], 0, &JobContext::new("j1"))
        .unwrap();
    let restarted = format!("[{}]: hello from the worker", out[1]);
    assert!(
        eventually(Duration::from_secs(5), || log.text().contains(&restarted)),
        "{}",
        log.text()
    );
    assert!(
        log.text().contains(".1["),
        "a restarted worker is w<slot>.1: {}",
        log.text()
    );
}
