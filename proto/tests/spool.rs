//! Spooled uploads (`UploadHandling::Spool`): the bytes leave the node
//! stretch by stretch as they arrive, reach the executor's spool in order, and
//! the node never holds the whole model. No sockets: a node and a client core
//! wired in memory, upload work run (or held) by the test.
// An executor must be Sync: the recorder shares what it saw behind a Mutex.
#![allow(clippy::disallowed_types)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use donate_proto::{
    run_mount, run_upload, Answer, ClientConfig, ClientConnection, ClientEvent, ConnectionId,
    Event, Executor, JobError, Node, RequestId, ServerConfig, Spool, UploadHandling, UploadInfo,
    UploadWork, Weights,
};
use sha2::{Digest, Sha256};

const STRETCH: usize = 64 * 1024;

/// What the executor saw, shared with the test.
#[derive(Default)]
struct Seen {
    opened: Vec<UploadInfo>,
    /// Spools dropped (an upload abandoned, or a model mounted and dropped).
    dropped: AtomicUsize,
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
        self.seen
            .lock()
            .unwrap()
            .dropped
            .fetch_add(1, Ordering::SeqCst);
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

    fn infer(&self, _: &(), _: &str, ids: &[i32], _: i64) -> Result<Vec<i32>, JobError> {
        Ok(ids.to_vec())
    }

    fn prompt(&self, _: &str, _: &str, _: i64) -> Result<String, JobError> {
        Ok(String::new())
    }
}

struct Harness {
    node: Node<()>,
    client: ClientConnection,
    conn: ConnectionId,
    executor: Recorder,
    seen: Arc<Mutex<Seen>>,
    now: Instant,
    /// Upload work taken but not run yet (when `hold_work`).
    held: Vec<UploadWork>,
    hold_work: bool,
    /// The most bytes the connection held at once.
    peak_allocated: usize,
    /// Bytes the client sent that the node has not read (it did not want them yet).
    unread: Vec<u8>,
    resumed: usize,
}

impl Harness {
    fn new(fail_after: Option<usize>) -> Harness {
        Harness::with(fail_after, STRETCH, 16 * 1024)
    }

    fn with(fail_after: Option<usize>, stretch: usize, chunk_size: usize) -> Harness {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let executor = Recorder {
            seen: Arc::clone(&seen),
            fail_after,
        };
        #[allow(clippy::disallowed_methods)] // the one base instant; time never moves here
        let now = Instant::now();
        let config = ServerConfig {
            upload_stretch: stretch,
            ..ServerConfig::default()
        };
        let mut node = Node::with_uploads(config, UploadHandling::for_executor(&executor));
        let conn = node.accept(now);
        let mut h = Harness {
            node,
            // Small chunks, so what the node holds is the upload's doing, not a frame's.
            client: ClientConnection::new(ClientConfig {
                chunk_size,
                upload_window: 256 * 1024,
                ..ClientConfig::default()
            }),
            conn,
            executor,
            seen,
            now,
            held: Vec::new(),
            hold_work: false,
            peak_allocated: 0,
            unread: Vec::new(),
            resumed: 0,
        };
        h.pump(&mut Vec::new());
        assert!(matches!(
            h.client.poll_event(),
            Some(ClientEvent::Connected(_))
        ));
        h
    }

    /// Moves bytes both ways, feeding `weights` as the client asks, until
    /// quiet. The node reads at most 64 KiB at a time, as from a socket.
    fn pump(&mut self, weights: &mut Vec<u8>) {
        loop {
            let want = self.client.upload_wants().min(weights.len());
            if want > 0 {
                let chunk: Vec<u8> = weights.drain(..want).collect();
                self.client.upload_chunk(&chunk).unwrap();
            }
            let (mut to_client, mut to_server) = (Vec::new(), Vec::new());
            self.node.poll_transmit(self.conn, &mut to_client);
            self.client.handle_input(&to_client).unwrap();
            self.client.poll_transmit(&mut to_server);
            self.unread.extend_from_slice(&to_server);
            let mut events = 0;
            let mut fed = 0;
            while !self.unread.is_empty() && self.node.wants_read(self.conn) {
                let read: Vec<u8> = self
                    .unread
                    .drain(..self.unread.len().min(64 * 1024))
                    .collect();
                fed += read.len();
                self.node.handle_input(self.conn, &read, self.now);
                if let Some(c) = self.node.connection(self.conn) {
                    self.peak_allocated = self.peak_allocated.max(c.allocated());
                }
                events += self.run_events();
            }
            events += self.run_events();
            if to_client.is_empty() && fed == 0 && want == 0 && events == 0 {
                break;
            }
        }
    }

    /// Runs (or holds) what the node asks for; returns how many events there were.
    fn run_events(&mut self) -> usize {
        let mut count = 0;
        while let Some(event) = self.node.poll_event() {
            count += 1;
            match event {
                Event::Upload(work) if self.hold_work => self.held.push(work),
                Event::Upload(mut work) => {
                    run_upload(&self.executor, &mut work);
                    self.node.upload_work_done(work, self.now);
                }
                Event::Mount(mount) => {
                    let outcome = run_mount(&self.executor, mount);
                    self.node.mount_done(outcome, self.now);
                }
                Event::Resume(conn) => {
                    assert_eq!(conn, self.conn);
                    self.resumed += 1;
                }
                Event::Wake(_) | Event::JobQueued => {}
            }
        }
        count
    }

    fn upload(&mut self, config: &str, weights: &[u8], sha256: Option<[u8; 32]>) -> RequestId {
        let request = self
            .client
            .begin_upload(config, weights.len() as u64, sha256)
            .unwrap();
        self.pump(&mut weights.to_vec());
        request
    }

    fn status(&mut self, request: RequestId) -> (bool, String) {
        match self.client.take_answer(request) {
            Some(Answer::ModelStatus(s)) => (s.ok, s.message),
            other => panic!("expected a model_status, got {other:?}"),
        }
    }

    fn mounted(&self) -> Vec<Vec<u8>> {
        self.seen.lock().unwrap().mounted.lock().unwrap().clone()
    }

    fn dropped(&self) -> usize {
        self.seen.lock().unwrap().dropped.load(Ordering::SeqCst)
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 253) as u8).collect()
}

#[test]
fn a_spooled_upload_reaches_the_spool_in_order_and_is_never_held_whole() {
    let weights = pattern(3 * 1024 * 1024 + 123);
    let sha: [u8; 32] = Sha256::digest(&weights).into();
    let mut h = Harness::new(None);
    let request = h.upload(r#"{"m":1}"#, &weights, Some(sha));
    assert_eq!(h.status(request), (true, "mounted".to_owned()));
    assert_eq!(h.mounted(), std::slice::from_ref(&weights));
    let seen = h.seen.lock().unwrap().opened.clone();
    assert_eq!(
        seen,
        [UploadInfo {
            config_json: r#"{"m":1}"#.to_owned(),
            weights_len: weights.len() as u64
        }]
    );
    // A few stretches and one frame's buffers, not 3 MiB.
    assert!(
        h.peak_allocated < 6 * STRETCH,
        "the node held {} bytes of a {} byte upload",
        h.peak_allocated,
        weights.len()
    );
}

#[test]
fn a_spooled_upload_with_a_wrong_hash_is_refused() {
    let weights = pattern(STRETCH * 5 + 1);
    let mut sha: [u8; 32] = Sha256::digest(&weights).into();
    sha[31] ^= 1;
    let mut h = Harness::new(None);
    let request = h.upload("{}", &weights, Some(sha));
    let (ok, message) = h.status(request);
    assert!(!ok);
    assert!(message.starts_with("weights_sha256 mismatch"), "{message}");
    assert!(h.mounted().is_empty());
    // The refused upload's spool is gone.
    assert_eq!(h.dropped(), 1);
}

#[test]
fn a_small_upload_opens_its_spool_at_commit() {
    let mut h = Harness::new(None);
    let request = h.upload("{}", &[1, 2, 3], None);
    assert_eq!(h.status(request), (true, "mounted".to_owned()));
    assert_eq!(h.mounted(), [vec![1, 2, 3]]);
    let request = h.upload("{}", &[], None);
    assert_eq!(h.status(request), (true, "mounted".to_owned()));
    assert_eq!(h.mounted()[1], Vec::<u8>::new());
}

#[test]
fn a_spool_that_cannot_be_opened_fails_the_upload_with_its_reason() {
    for len in [10, STRETCH * 3] {
        let mut h = Harness::new(None);
        let request = h.upload(r#"{"refuse":true}"#, &pattern(len), None);
        assert_eq!(
            h.status(request),
            (false, "no room for this model".to_owned())
        );
        // The connection goes on: the next upload mounts.
        let request = h.upload("{}", &[9], None);
        assert_eq!(h.status(request), (true, "mounted".to_owned()));
    }
}

#[test]
fn a_spool_write_failure_fails_the_upload_and_drops_later_bytes() {
    let mut h = Harness::new(Some(2 * STRETCH));
    let request = h.upload("{}", &pattern(20 * STRETCH), None);
    assert_eq!(h.status(request), (false, "disk full".to_owned()));
    assert!(h.mounted().is_empty());
    assert!(
        h.peak_allocated < 6 * STRETCH,
        "a failed spool's bytes were kept: {}",
        h.peak_allocated
    );
}

#[test]
fn an_abandoned_upload_drops_its_spool_whether_it_is_home_or_away() {
    // Home: the connection closes mid-upload.
    let mut h = Harness::new(None);
    let weights = pattern(4 * STRETCH);
    h.client
        .begin_upload("{}", weights.len() as u64 + 1, None)
        .unwrap();
    h.pump(&mut weights.clone());
    assert_eq!(h.seen.lock().unwrap().opened.len(), 1);
    assert_eq!(h.dropped(), 0);
    h.node.peer_closed(h.conn);
    h.node.remove(h.conn);
    assert_eq!(h.dropped(), 1);

    // Away: a worker holds the spool when the connection goes.
    let mut h = Harness::new(None);
    h.hold_work = true;
    h.client
        .begin_upload("{}", 10 * weights.len() as u64, None)
        .unwrap();
    h.hold_work = false;
    h.pump(&mut weights.clone());
    h.hold_work = true;
    h.pump(&mut pattern(2 * STRETCH));
    let mut work = h.held.pop().expect("work handed out");
    run_upload(&h.executor, &mut work);
    h.node.remove(h.conn);
    assert_eq!(h.dropped(), 0, "the spool is with the work");
    h.node.upload_work_done(work, h.now);
    assert_eq!(h.dropped(), 1);
    h.node.begin_shutdown();
    assert!(h.node.is_drained());
}

#[test]
fn a_commit_waits_for_its_spool_to_come_back() {
    let weights = pattern(3 * STRETCH);
    let mut h = Harness::new(None);
    h.hold_work = true;
    let request = h.upload("{}", &weights, None);
    assert!(h.client.take_answer(request).is_none(), "answered early");
    assert_eq!(h.held.len(), 1);
    let mut work = h.held.pop().unwrap();
    assert!(work.len() >= STRETCH);
    run_upload(&h.executor, &mut work);
    h.node.upload_work_done(work, h.now);
    h.hold_work = false;
    h.pump(&mut Vec::new());
    assert_eq!(h.status(request), (true, "mounted".to_owned()));
    assert_eq!(h.mounted(), [weights]);
}

#[test]
fn a_slow_spool_holds_the_peer_back_instead_of_buffering() {
    let weights = pattern(20 * STRETCH);
    let mut h = Harness::new(None);
    h.hold_work = true;
    let request = h
        .client
        .begin_upload("{}", weights.len() as u64, None)
        .unwrap();
    h.pump(&mut weights.clone());
    // One stretch is with a worker that has not finished; two more gathered
    // and the node stopped reading, so the rest waits at the peer.
    assert_eq!(h.held.len(), 1);
    assert!(!h.node.wants_read(h.conn));
    assert!(!h.unread.is_empty());
    assert!(h.peak_allocated < 6 * STRETCH, "held {}", h.peak_allocated);
    // The node's own pause is not the peer's stall.
    let stall = ServerConfig::default().stall_timeout;
    h.node.handle_timeout(h.now + 2 * stall);
    assert!(h.node.connection(h.conn).unwrap().closing().is_none());

    let mut work = h.held.pop().unwrap();
    run_upload(&h.executor, &mut work);
    h.node.upload_work_done(work, h.now);
    h.hold_work = false;
    h.run_events();
    assert_eq!(
        h.resumed, 1,
        "the reader is woken once the spool catches up"
    );
    assert!(h.node.wants_read(h.conn));
    h.pump(&mut Vec::new());
    assert_eq!(h.status(request), (true, "mounted".to_owned()));
    assert_eq!(h.mounted(), [weights]);
    assert!(h.peak_allocated < 6 * STRETCH, "held {}", h.peak_allocated);
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
    let mut h = Harness::with(fail_after, 12, 26);
    h.hold_work = true;
    let weights = pattern(154);
    let upload = h
        .client
        .begin_upload(config, weights.len() as u64, None)
        .unwrap();
    let mut rest = weights.clone();
    while !rest.is_empty() {
        let want = h.client.upload_wants().min(rest.len());
        let chunk: Vec<u8> = rest.drain(..want).collect();
        h.client.upload_chunk(&chunk).unwrap();
    }
    let job = h.client.infer(&[1], 1).unwrap();
    h.pump(&mut Vec::new());
    // The commit waits for the stretch a worker holds.
    assert!(h.client.take_answer(upload).is_none());
    let mut work = h.held.pop().expect("a stretch was handed out");
    run_upload(&h.executor, &mut work);
    h.node.upload_work_done(work, h.now);
    h.hold_work = false;
    h.pump(&mut Vec::new());
    assert_eq!(h.status(upload), (false, reason.to_owned()));
    match h.client.take_answer(job) {
        Some(Answer::Error(e)) => assert_eq!(e.code, "model_not_mounted", "{e:?}"),
        other => panic!("the job got {other:?}"),
    }
}
