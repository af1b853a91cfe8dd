//! Spooled uploads over real sockets, on every adapter: an executor whose
//! spool is slower than the network holds the client back (the node stops
//! reading, then wakes its reader when the spool catches up) instead of
//! buffering the model, and every byte reaches the spool in order.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{bounded, start, AnyClient, ClientKind, ADAPTERS};
use donate_proto::{
    Executor, JobContext, JobError, ServerConfig, Spool, Stub, UploadInfo, Weights,
};
use sha2::{Digest, Sha256};

/// Spools into memory, sleeping on every stretch; mounts only if the bytes
/// hash to the `config_json` (a hex SHA-256). An `infer` of `[777]` takes
/// 3 s, setting `long_job_started`, then noting in `spooled_by_job_end` how
/// many bytes every spool had received by then.
#[derive(Default)]
struct SlowSpooler {
    long_job_started: Arc<AtomicBool>,
    spooled: Arc<AtomicUsize>,
    spooled_by_job_end: Arc<AtomicUsize>,
}

struct SlowSpool {
    spooled: Arc<AtomicUsize>,
    hash: Sha256,
    writes: usize,
    received: usize,
}

impl Spool for SlowSpool {
    fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        std::thread::sleep(Duration::from_millis(30));
        self.hash.update(bytes);
        self.writes += 1;
        self.received += bytes.len();
        self.spooled.fetch_add(bytes.len(), Ordering::SeqCst);
        Ok(())
    }
}

impl Executor for SlowSpooler {
    type Model = ();
    type Spool = SlowSpool;

    fn spools_uploads(&self) -> bool {
        true
    }

    fn open_spool(&self, _: &UploadInfo) -> Result<SlowSpool, String> {
        Ok(SlowSpool {
            spooled: Arc::clone(&self.spooled),
            hash: Sha256::new(),
            writes: 0,
            received: 0,
        })
    }

    fn mount(&self, config_json: String, weights: Weights<SlowSpool>) -> Result<(), String> {
        let Weights::Spooled(spool) = weights else {
            return Err("not spooled".to_owned());
        };
        let got: String = spool
            .hash
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if got != config_json {
            return Err(format!("spooled bytes hash to {got}"));
        }
        // A model of megabytes arrives in several stretches, not in one at commit.
        if spool.received >= 1 << 20 && spool.writes < 4 {
            return Err(format!("only {} stretches", spool.writes));
        }
        Ok(())
    }

    fn infer(
        &self,
        m: &(),
        ids: &[i32],
        max: i64,
        job: &JobContext<'_>,
    ) -> Result<Vec<i32>, JobError> {
        if ids == [777] {
            self.long_job_started.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_secs(3));
            let spooled = self.spooled.load(Ordering::SeqCst);
            self.spooled_by_job_end.store(spooled, Ordering::SeqCst);
        }
        Stub::default().infer(m, ids, max, job)
    }

    fn prompt(&self, prompt: &str, max_out: i64, job: &JobContext<'_>) -> Result<String, JobError> {
        Stub::default().prompt(prompt, max_out, job)
    }
}

#[test]
fn a_slow_spool_gets_every_byte_in_order_on_every_adapter() {
    let weights: Vec<u8> = (0..4 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let expected = common::sha256_hex(&weights);
    for kind in ADAPTERS {
        let config = ServerConfig::default().upload_stretch(64 * 1024);
        let server = start(kind, config, SlowSpooler::default());
        let addr = server.addr();
        let (weights, expected) = (weights.clone(), expected.clone());
        let status = bounded("slow spool upload", Duration::from_secs(30), move || {
            let mut client = AnyClient::connect(ClientKind::Std, addr).unwrap();
            let status = client.push_model(&expected, &weights, true).unwrap();
            // The connection goes on after the upload.
            let out = client.infer(&[5], 1).unwrap().output_ids;
            (status, out)
        });
        assert!(status.0.ok, "{kind:?}: {}", status.0.message);
        assert_eq!(status.1, [5, 1], "{kind:?}");
        server.shutdown();
    }
}

#[test]
fn an_upload_goes_on_while_the_only_worker_runs_a_long_job() {
    let executor = SlowSpooler::default();
    let started = Arc::clone(&executor.long_job_started);
    let spooled_by_job_end = Arc::clone(&executor.spooled_by_job_end);
    let config = ServerConfig::default().workers(1).upload_stretch(64 * 1024);
    let server = start(common::ServerKind::Std, config, executor);
    let addr = server.addr();
    let weights = vec![9u8; 4 * 1024 * 1024];
    let (len, expected) = (weights.len(), common::sha256_hex(&weights));
    let status = bounded(
        "upload beside a long job",
        Duration::from_secs(30),
        move || {
            let busy = std::thread::spawn(move || {
                let mut busy = AnyClient::connect(ClientKind::Std, addr).unwrap();
                busy.push_model(&common::sha256_hex(&[1]), &[1], false)
                    .unwrap();
                busy.infer(&[777], 1).unwrap()
            });
            // The only worker is running the long job.
            while !started.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            let mut uploader = AnyClient::connect(ClientKind::Std, addr).unwrap();
            // Its mount waits for the worker; its bytes do not.
            let status = uploader.push_model(&expected, &weights, true).unwrap();
            busy.join().unwrap();
            status
        },
    );
    assert!(status.ok, "{}", status.message);
    // All but the last stretches (written at mount) reached the spool while
    // the worker was busy: the upload thread spooled them.
    let spooled = spooled_by_job_end.load(Ordering::SeqCst);
    assert!(
        spooled >= len / 2,
        "only {spooled} of {len} bytes spooled while the worker ran a long job"
    );
    server.shutdown();
}
