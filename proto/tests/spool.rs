//! Spooled uploads (`UploadHandling::Spool`): the bytes leave the node
//! stretch by stretch as they arrive, reach the executor's spool in order, and
//! the node never holds the whole model. No sockets: a node and a client core
//! in `donate_proto::sim`, upload work run (or held) by the test.
// An executor must be Sync: the recorder shares what it saw behind a Mutex.
#![allow(clippy::disallowed_types)]

use donate_proto::sim::{Peer, Sim};
use donate_proto::{
    run_upload, Answer, ClientConfig, ClientEvent, Executor, JobContext, JobError, RequestId,
    ServerConfig, Spool, UploadHandling, UploadInfo, Weights,
};
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

const STRETCH: usize = 64 * 1024;

/// What the executor saw, shared with the test.
#[derive(Default)]
struct Seen {
    opened: Vec<UploadInfo>,
    /// Spools dropped (an upload abandoned, or a model mounted and dropped).
    dropped: AtomicUsize,
    /// Bytes each dropped spool held, in drop order.
    dropped_lens: Vec<usize>,
    mounted: Mutex<Vec<Vec<u8>>>,
}

/// Spools into memory; fails opening when the config says `"refuse"` and
/// writing past `fail_after` bytes.
struct Recorder {
    seen: Arc<Mutex<Seen>>,
    fail_after: Option<usize>,
}

struct MemorySpool {
    bytes: Vec<u8>,
    fail_after: Option<usize>,
    seen: Arc<Mutex<Seen>>,
}

impl Drop for MemorySpool {
    fn drop(&mut self) {
        let mut seen = self.seen.lock().unwrap();
        seen.dropped.fetch_add(1, Ordering::SeqCst);
        seen.dropped_lens.push(self.bytes.len());
    }
}

impl Spool for MemorySpool {
    fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        if self
            .fail_after
            .is_some_and(|n| self.bytes.len() + bytes.len() > n)
        {
            return Err("disk full".to_owned());
        }
        self.bytes.extend_from_slice(bytes);
        Ok(())
    }
}

impl Executor for Recorder {
    type Model = ();
    type Spool = MemorySpool;

    fn spools_uploads(&self) -> bool {
        true
    }

    fn open_spool(&self, upload: &UploadInfo) -> Result<MemorySpool, String> {
        if upload.config_json.contains("refuse") {
            return Err("no room for this model".to_owned());
        }
        self.seen.lock().unwrap().opened.push(upload.clone());
        Ok(MemorySpool {
            bytes: Vec::new(),
            fail_after: self.fail_after,
            seen: Arc::clone(&self.seen),
        })
    }

    fn mount(&self, _config: String, weights: Weights<MemorySpool>) -> Result<(), String> {
        let Weights::Spooled(spool) = weights else {
            return Err("expected a spooled upload".to_owned());
        };
        let bytes = spool.bytes.clone();
        self.seen
            .lock()
            .unwrap()
            .mounted
            .lock()
            .unwrap()
            .push(bytes);
        Ok(())
    }

    fn infer(&self, _: &(), ids: &[i32], _: i64, _: &JobContext<'_>) -> Result<Vec<i32>, JobError> {
        Ok(ids.to_vec())
    }

    fn prompt(&self, _: &str, _: i64, _: &JobContext<'_>) -> Result<String, JobError> {
        Ok(String::new())
    }
}

/// A simulation with the recorder, a node that spools in stretches of
/// `stretch` bytes, and one client peer sending chunks of `chunk_size`. The node
/// reads at most 64 KiB at a time, as from a socket.
fn with(fail_after: Option<usize>, stretch: usize, chunk_size: usize) -> (Sim<Recorder>, Peer) {
    let executor = Recorder {
        seen: Arc::new(Mutex::new(Seen::default())),
        fail_after,
    };
    let uploads = UploadHandling::for_executor(&executor);
    let config = ServerConfig::default().upload_stretch(stretch);
    let mut sim = Sim::with_uploads(executor, config, uploads);
    // Small chunks, so what the node holds is the upload's doing, not a frame's.
    let p = sim.client_with(
        ClientConfig::default()
            .chunk_size(chunk_size)
            .upload_window(256 * 1024),
    );
    sim.split(p, 64 * 1024, usize::MAX);
    assert!(matches!(
        sim.client_core(p).poll_event(),
        Some(ClientEvent::Connected(_))
    ));
    (sim, p)
}

fn harness(fail_after: Option<usize>) -> (Sim<Recorder>, Peer) {
    with(fail_after, STRETCH, 16 * 1024)
}

fn upload(sim: &mut Sim<Recorder>, p: Peer, config: &str, weights: &[u8]) -> RequestId {
    let request = sim.upload(p, config, weights, None).unwrap();
    sim.run();
    request
}

fn status(sim: &mut Sim<Recorder>, p: Peer, request: RequestId) -> (bool, String) {
    match sim.client_core(p).take_answer(request) {
        Some(Answer::ModelStatus(s)) => (s.ok, s.message),
        other => panic!("expected a model_status, got {other:?}"),
    }
}

fn mounted(sim: &Sim<Recorder>) -> Vec<Vec<u8>> {
    let seen = sim.executor.seen.lock().unwrap();
    let mounted = seen.mounted.lock().unwrap().clone();
    mounted
}

fn dropped(sim: &Sim<Recorder>) -> usize {
    sim.executor
        .seen
        .lock()
        .unwrap()
        .dropped
        .load(Ordering::SeqCst)
}

fn opened(sim: &Sim<Recorder>) -> Vec<UploadInfo> {
    sim.executor.seen.lock().unwrap().opened.clone()
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 253) as u8).collect()
}

#[test]
fn a_spooled_upload_reaches_the_spool_in_order_and_is_never_held_whole() {
    let weights = pattern(3 * 1024 * 1024 + 123);
    let sha: [u8; 32] = Sha256::digest(&weights).into();
    let (mut sim, p) = harness(None);
    let request = sim.upload(p, r#"{"m":1}"#, &weights, Some(sha)).unwrap();
    sim.run();
    assert_eq!(status(&mut sim, p, request), (true, "mounted".to_owned()));
    assert_eq!(mounted(&sim), std::slice::from_ref(&weights));
    assert_eq!(
        opened(&sim),
        [UploadInfo {
            config_json: r#"{"m":1}"#.to_owned(),
            weights_len: weights.len() as u64,
            sha256: Some(sha),
            offset: 0,
            name: String::new(),
        }]
    );
    // A few stretches and one frame's buffers, not 3 MiB.
    assert!(
        sim.peak_allocated(p) < 6 * STRETCH,
        "the node held {} bytes of a {} byte upload",
        sim.peak_allocated(p),
        weights.len()
    );
}

#[test]
fn a_spooled_upload_with_a_wrong_hash_is_refused() {
    let weights = pattern(STRETCH * 5 + 1);
    let mut sha: [u8; 32] = Sha256::digest(&weights).into();
    sha[31] ^= 1;
    let (mut sim, p) = harness(None);
    let request = sim.upload(p, "{}", &weights, Some(sha)).unwrap();
    sim.run();
    let (ok, message) = status(&mut sim, p, request);
    assert!(!ok);
    assert!(message.starts_with("weights_sha256 mismatch"), "{message}");
    assert!(mounted(&sim).is_empty());
    // The refused upload's spool is gone.
    assert_eq!(dropped(&sim), 1);
}

#[test]
fn a_small_upload_opens_its_spool_at_commit() {
    let (mut sim, p) = harness(None);
    let request = upload(&mut sim, p, "{}", &[1, 2, 3]);
    assert_eq!(status(&mut sim, p, request), (true, "mounted".to_owned()));
    assert_eq!(mounted(&sim), [vec![1, 2, 3]]);
    let request = upload(&mut sim, p, "{}", &[]);
    assert_eq!(status(&mut sim, p, request), (true, "mounted".to_owned()));
    assert_eq!(mounted(&sim)[1], Vec::<u8>::new());
}

#[test]
fn a_spool_that_cannot_be_opened_fails_the_upload_with_its_reason() {
    for len in [10, STRETCH * 3] {
        let (mut sim, p) = harness(None);
        let request = upload(&mut sim, p, r#"{"refuse":true}"#, &pattern(len));
        assert_eq!(
            status(&mut sim, p, request),
            (false, "no room for this model".to_owned())
        );
        // The connection goes on: the next upload mounts.
        let request = upload(&mut sim, p, "{}", &[9]);
        assert_eq!(status(&mut sim, p, request), (true, "mounted".to_owned()));
    }
}

#[test]
fn a_spool_write_failure_fails_the_upload_and_drops_later_bytes() {
    let (mut sim, p) = harness(Some(2 * STRETCH));
    let request = upload(&mut sim, p, "{}", &pattern(20 * STRETCH));
    assert_eq!(
        status(&mut sim, p, request),
        (false, "disk full".to_owned())
    );
    assert!(mounted(&sim).is_empty());
    assert!(
        sim.peak_allocated(p) < 6 * STRETCH,
        "a failed spool's bytes were kept: {}",
        sim.peak_allocated(p)
    );
}

#[test]
fn an_abandoned_upload_drops_its_spool_whether_it_is_home_or_away() {
    // Home: the connection closes mid-upload.
    let (mut sim, p) = harness(None);
    let weights = pattern(4 * STRETCH);
    sim.client_core(p)
        .begin_upload("{}", weights.len() as u64 + 1, None)
        .unwrap();
    sim.push_weights(p, &weights);
    sim.run();
    assert_eq!(opened(&sim).len(), 1);
    assert_eq!(dropped(&sim), 0);
    sim.vanish(p);
    assert_eq!(dropped(&sim), 1);

    // Away: a worker holds the spool when the connection goes.
    let (mut sim, p) = harness(None);
    sim.client_core(p)
        .begin_upload("{}", 10 * weights.len() as u64, None)
        .unwrap();
    sim.push_weights(p, &weights);
    sim.run();
    sim.hold_uploads = true;
    sim.push_weights(p, &pattern(2 * STRETCH));
    sim.run();
    let mut work = sim.held_uploads.pop().expect("work handed out");
    run_upload(&sim.executor, &mut work);
    // More bytes arrive while the spool is away: they wait in the node.
    sim.push_weights(p, &pattern(STRETCH / 2));
    sim.run();
    assert!(sim.held_uploads.is_empty(), "one stretch away at a time");
    sim.vanish(p);
    assert_eq!(dropped(&sim), 0, "the spool is with the work");
    sim.node.upload_work_done(work, sim.now());
    // The tail that waited goes to the spool once it is back, then the spool is dropped.
    sim.poll_events();
    assert_eq!(sim.held_uploads.len(), 1, "the tail is handed out");
    sim.finish_upload(0);
    assert_eq!(dropped(&sim), 1);
    let held = sim.executor.seen.lock().unwrap().dropped_lens.clone();
    assert_eq!(
        held,
        [weights.len() + 2 * STRETCH + STRETCH / 2],
        "every byte that arrived"
    );
    sim.node.begin_shutdown();
    assert!(sim.node.is_drained());
}

#[test]
fn a_commit_waits_for_its_spool_to_come_back() {
    let weights = pattern(3 * STRETCH);
    let (mut sim, p) = harness(None);
    sim.hold_uploads = true;
    let request = upload(&mut sim, p, "{}", &weights);
    assert!(
        sim.client_core(p).take_answer(request).is_none(),
        "answered early"
    );
    assert_eq!(sim.held_uploads.len(), 1);
    assert!(sim.held_uploads[0].len() >= STRETCH);
    sim.hold_uploads = false;
    sim.finish_upload(0);
    sim.run();
    assert_eq!(status(&mut sim, p, request), (true, "mounted".to_owned()));
    assert_eq!(mounted(&sim), [weights]);
}

#[test]
fn a_slow_spool_holds_the_peer_back_instead_of_buffering() {
    let weights = pattern(20 * STRETCH);
    let (mut sim, p) = harness(None);
    sim.hold_uploads = true;
    let request = upload(&mut sim, p, "{}", &weights);
    // One stretch is with a worker that has not finished; two more gathered
    // and the node stopped reading, so the rest waits at the peer.
    assert_eq!(sim.held_uploads.len(), 1);
    let conn = sim.conn(p);
    assert!(!sim.node.wants_read(conn));
    assert!(sim.unread(p) > 0);
    assert!(
        sim.peak_allocated(p) < 6 * STRETCH,
        "held {}",
        sim.peak_allocated(p)
    );
    // The node's own pause is not the peer's stall.
    let stall = ServerConfig::default().stall_timeout;
    sim.node.handle_timeout(sim.now() + 2 * stall);
    assert!(sim.node.connection(conn).unwrap().closing().is_none());

    sim.hold_uploads = false;
    sim.finish_upload(0);
    sim.poll_events();
    assert_eq!(
        sim.resumes,
        [conn],
        "the reader is woken once the spool catches up"
    );
    assert!(sim.node.wants_read(conn));
    sim.run();
    assert_eq!(status(&mut sim, p, request), (true, "mounted".to_owned()));
    assert_eq!(mounted(&sim), [weights]);
    assert!(
        sim.peak_allocated(p) < 6 * STRETCH,
        "held {}",
        sim.peak_allocated(p)
    );
}

/// Found by the `server` fuzz target: a commit that waited for its spool
/// and was then refused at once (no config) left a pipelined job unanswered.
#[test]
fn a_job_sent_after_a_failing_spooled_upload_is_answered() {
    for (config, fail_after, reason) in [("{}", Some(40), "disk full"), ("", None, "no config")] {
        a_job_after_a_failing_upload(config, fail_after, reason);
    }
}

fn a_job_after_a_failing_upload(config: &str, fail_after: Option<usize>, reason: &str) {
    let (mut sim, p) = with(fail_after, 12, 26);
    sim.hold_uploads = true;
    let weights = pattern(154);
    let client = sim.client_core(p);
    let upload = client
        .begin_upload(config, weights.len() as u64, None)
        .unwrap();
    let mut rest = weights.clone();
    while !rest.is_empty() {
        let want = client.upload_wants().min(rest.len());
        let chunk: Vec<u8> = rest.drain(..want).collect();
        client.upload_chunk(&chunk).unwrap();
    }
    let job = client.infer(&[1], 1).unwrap();
    sim.run();
    // The commit waits for the stretch a worker holds.
    assert!(sim.client_core(p).take_answer(upload).is_none());
    assert!(!sim.held_uploads.is_empty(), "a stretch was handed out");
    sim.hold_uploads = false;
    let last = sim.held_uploads.len() - 1;
    sim.finish_upload(last);
    sim.run();
    assert_eq!(status(&mut sim, p, upload), (false, reason.to_owned()));
    match sim.client_core(p).take_answer(job) {
        Some(Answer::Error(e)) => assert_eq!(e.code, "model_not_mounted", "{e:?}"),
        other => panic!("the job got {other:?}"),
    }
}
