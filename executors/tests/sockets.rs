//! Worker-process executors behind a real node (donate-std over loopback):
//! the example workers run the pushed bigram model, a crash fails one job,
//! temporary files go with the connection, and jobs spread over two workers.

mod common;

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{bigram, entries, eventually, python_worker, rust_worker, table, test_worker};
use donate_exec::{WorkerConfig, WorkerProcess};
use donate_proto::ServerConfig;
use donate_std::{Client, Error, Server};

fn node(argv: Vec<String>, workers: usize, config: WorkerConfig) -> Server {
    let executor =
        WorkerProcess::new(argv, WorkerConfig { workers, ..config }).expect("start workers");
    let config = ServerConfig::default()
        .workers(workers)
        .queue_capacity(1024);
    donate_std::serve(TcpListener::bind("127.0.0.1:0").unwrap(), config, executor).expect("serve")
}

/// Pushes two different tables on one connection; each infer follows the
/// table pushed last, exactly as the bigram rule predicts.
fn pushed_model_drives_the_output(argv: Vec<String>) {
    let server = node(argv, 1, WorkerConfig::default());
    let mut client = Client::connect(server.local_addr()).unwrap();
    let (first, second) = (table(1), table(2));
    let input = [72, 105, 33];

    assert!(
        client
            .push_model(r#"{"kind":"bigram"}"#, &first, true)
            .unwrap()
            .ok
    );
    let out = client.infer(&input, 10).unwrap().output_ids;
    assert_eq!(out, bigram(&first, &input, 10));
    assert_eq!(
        client.infer(&[], 0).unwrap().output_ids,
        bigram(&first, &[], 0)
    );
    assert_eq!(
        client.infer(&input, 0).unwrap().output_ids.len(),
        input.len() + 16
    );

    assert!(client.push_model("{}", &second, false).unwrap().ok);
    let again = client.infer(&input, 10).unwrap().output_ids;
    assert_eq!(again, bigram(&second, &input, 10));
    assert_ne!(out, again, "the pushed model changes the output");

    match client.infer(&[300], 1) {
        Err(Error::InferFailed(r)) => {
            assert_eq!(r.code, "worker_error");
            assert!(r.error.contains("not a byte"), "{}", r.error);
        }
        other => panic!("expected a refused id, got {other:?}"),
    }
    match client.push_model("{}", &[1, 2, 3, 4], false) {
        Err(Error::ModelRefused(reason)) => assert!(reason.contains("65536"), "{reason}"),
        other => panic!("expected model_status ok:false, got {other:?}"),
    }
    drop(client);
    server.shutdown();
}

#[test]
fn python_worker_runs_the_pushed_bigram_model() {
    pushed_model_drives_the_output(python_worker());
}

#[test]
fn rust_worker_runs_the_pushed_bigram_model() {
    pushed_model_drives_the_output(rust_worker());
}

#[test]
fn a_crash_fails_one_job_and_the_next_one_runs() {
    let server = node(test_worker("flaky.py"), 1, WorkerConfig::default());
    let mut client = Client::connect(server.local_addr()).unwrap();
    assert!(client.push_model("{}", &[1, 2, 3, 4], true).unwrap().ok);
    let before = client.infer(&[1], 0).unwrap().output_ids[1];
    match client.infer(&[666], 0) {
        Err(Error::InferFailed(r)) => {
            assert_eq!(r.code, "worker_crashed");
            assert!(r.error.contains("exit status: 3"), "{}", r.error);
        }
        other => panic!("expected worker_crashed, got {other:?}"),
    }
    // The restarted worker gets the model replayed before this job.
    let out = client.infer(&[1, 2], 0).unwrap().output_ids;
    assert_eq!(out[..2], [1, 2]);
    assert_ne!(out[2], before, "a new worker process answered");
    drop(client);
    server.shutdown();
}

#[test]
fn temporary_files_go_with_the_model() {
    let root = tempfile::tempdir().unwrap();
    let config = WorkerConfig {
        temp_root: Some(root.path().to_owned()),
        ..WorkerConfig::default()
    };
    let server = node(python_worker(), 1, config);
    let mut client = Client::connect(server.local_addr()).unwrap();
    client.push_model("{}", &table(3), false).unwrap();
    let dirs = entries(root.path());
    assert_eq!(dirs.len(), 1, "one private directory per model");
    let weights = dirs[0].join("weights.bin");
    assert_eq!(std::fs::read(&weights).unwrap(), table(3));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dirs[0]), 0o700);
        assert_eq!(mode(&weights), 0o600);
    }

    // A new upload replaces the model: the old directory goes.
    client.push_model("{}", &table(4), false).unwrap();
    assert!(eventually(Duration::from_secs(5), || {
        let now = entries(root.path());
        now.len() == 1 && now[0] != dirs[0]
    }));
    client.infer(&[1], 1).unwrap();

    drop(client);
    assert!(
        eventually(Duration::from_secs(5), || entries(root.path()).is_empty()),
        "left behind: {:?}",
        entries(root.path())
    );
    server.shutdown();
}

#[test]
fn many_jobs_spread_over_two_workers() {
    let server = node(test_worker("flaky.py"), 2, WorkerConfig::default());
    let addr = server.local_addr();
    let pids = Arc::new(Mutex::new(HashSet::new()));
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let pids = Arc::clone(&pids);
            std::thread::spawn(move || {
                let mut client = Client::connect(addr).unwrap();
                client.push_model("{}", &[c as u8; 16], true).unwrap();
                // A slow first job keeps one worker busy while others run.
                let requests: Vec<_> = (0..40)
                    .map(|j| {
                        let first = if j == 0 { 333 } else { c };
                        let input = [first, j];
                        (input, client.send_infer(&input, 0).unwrap())
                    })
                    .collect();
                for (input, request) in requests {
                    let answer = client.wait(request).unwrap();
                    let out = donate_std::answers::infer(answer).unwrap().output_ids;
                    assert_eq!(out[..2], input, "job {input:?}");
                    pids.lock().unwrap().insert(out[2]);
                }
            })
        })
        .collect();
    for client in clients {
        client.join().expect("client thread");
    }
    let pids = pids.lock().unwrap();
    assert_eq!(
        pids.len(),
        2,
        "both workers ran jobs, and only they: {pids:?}"
    );
    server.shutdown();
}

#[test]
fn the_worker_sees_the_clients_job_id() {
    let server = node(test_worker("flaky.py"), 1, WorkerConfig::default());
    let mut client = Client::connect(server.local_addr()).unwrap();
    client.push_model("{}", &[1; 4], false).unwrap();
    for _ in 0..2 {
        let result = client.infer(&[321], 0).unwrap();
        assert!(!result.job_id.is_empty());
        let echoed: Vec<i32> = result.job_id.bytes().map(i32::from).collect();
        assert_eq!(result.output_ids, echoed);
    }
    drop(client);
    server.shutdown();
}

/// Speaks to `addr` with the client core over a plain socket, so a test can
/// stop an upload half way.
struct RawClient {
    stream: std::net::TcpStream,
    core: donate_proto::ClientConnection,
}

impl RawClient {
    fn connect(addr: std::net::SocketAddr) -> RawClient {
        let stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let mut raw = RawClient {
            stream,
            core: donate_proto::ClientConnection::default(),
        };
        assert!(
            eventually(Duration::from_secs(10), || {
                raw.exchange();
                raw.core.server_hello().is_some()
            }),
            "no hello"
        );
        raw
    }

    /// Writes what the core has to send and reads what arrived.
    fn exchange(&mut self) {
        use std::io::{Read, Write};
        let mut out = Vec::new();
        self.core.poll_transmit(&mut out);
        self.stream.write_all(&out).unwrap();
        let mut buf = [0u8; 4096];
        if let Ok(n) = self.stream.read(&mut buf) {
            self.core.handle_input(&buf[..n]).unwrap();
        }
    }
}

#[test]
fn weights_are_written_as_they_arrive_and_an_abandoned_upload_leaves_nothing() {
    let root = tempfile::tempdir().unwrap();
    let executor = WorkerProcess::new(
        test_worker("flaky.py"),
        WorkerConfig {
            temp_root: Some(root.path().to_owned()),
            ..WorkerConfig::default()
        },
    )
    .unwrap();
    let config = ServerConfig::default().upload_stretch(64 * 1024);
    let server =
        donate_std::serve(TcpListener::bind("127.0.0.1:0").unwrap(), config, executor).unwrap();
    let mut raw = RawClient::connect(server.local_addr());
    let weights = table(5).repeat(64); // 4 MiB
    let sent = weights.len() / 2;
    raw.core
        .begin_upload("{}", weights.len() as u64, None)
        .unwrap();
    let mut at = 0;
    while at < sent {
        let want = raw.core.upload_wants().min(sent - at);
        if want > 0 {
            raw.core.upload_chunk(&weights[at..at + want]).unwrap();
            at += want;
        }
        raw.exchange();
    }
    raw.exchange();
    // Half the model sent, no commit: its file is there already, holding
    // what arrived (all but the stretch still gathering on the node).
    let file_len = || {
        let dirs = entries(root.path());
        (dirs.len() == 1)
            .then(|| std::fs::metadata(dirs[0].join("weights.bin")).ok())
            .flatten()
            .map_or(0, |m| m.len() as usize)
    };
    assert!(
        eventually(Duration::from_secs(10), || file_len() >= sent - 64 * 1024),
        "{} of {sent} bytes on disk before the commit",
        file_len()
    );
    let dirs = entries(root.path());
    let on_disk = std::fs::read(dirs[0].join("weights.bin")).unwrap();
    assert_eq!(on_disk, weights[..on_disk.len()]);

    drop(raw);
    assert!(
        eventually(Duration::from_secs(10), || entries(root.path()).is_empty()),
        "left behind: {:?}",
        entries(root.path())
    );
    server.shutdown();
}
