//! Shared helpers for the end-to-end tests: servers on every adapter, clients of
//! every adapter behind one blocking interface, a raw frame client with read
//! timeouts, and small tools (bounded runs, RSS, thread counts).
//!
//! Every server listens on 127.0.0.1 port 0; every wait is bounded.
#![allow(dead_code)]

pub mod proxy;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine as _;
use donate_proto::message::{Hello, InferResult, ModelStatus, PromptResult, QueueStatus};
use donate_proto::{
    Answer, Executor, JobContext, JobError, NoSpool, RequestId, ServerConfig, Stub, Weights,
};
use serde_json::{json, Value};

/// The longest any single wait in these tests may take.
pub const LIMIT: Duration = Duration::from_secs(10);

/// Runs `f` on its own thread and fails the test if it takes longer than `limit`
/// (a hung socket or a lost wake-up must not hang the test run).
pub fn bounded<T: Send + 'static>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    let handle = thread::Builder::new()
        .name(format!("bounded {what}"))
        .spawn(move || {
            let _ = tx.send(f());
        })
        .expect("spawn bounded thread");
    match rx.recv_timeout(limit) {
        Ok(value) => {
            let _ = handle.join();
            value
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the thread sends before it ends"),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: still running after {limit:?}"),
    }
}

// ---------------------------------------------------------------------------
// Executors

/// The stub, optionally slowed down, counting the jobs it starts and finishes.
#[derive(Clone, Default)]
pub struct TestExec {
    pub stub: Stub,
    /// Time each job takes (a sleep).
    pub delay: Duration,
    pub started: Arc<AtomicUsize>,
    pub finished: Arc<AtomicUsize>,
    /// When set, `infer` of `[-1]` answers this many tokens (a big result from a tiny job).
    pub flood: Option<usize>,
}

impl TestExec {
    pub fn slow(delay: Duration) -> TestExec {
        TestExec {
            delay,
            ..TestExec::default()
        }
    }

    pub fn local_lm(path: &str) -> TestExec {
        TestExec {
            stub: Stub::new(path),
            ..TestExec::default()
        }
    }

    /// Waits (bounded) until `n` jobs have started.
    pub fn wait_started(&self, n: usize) {
        let deadline = Instant::now() + LIMIT;
        while self.started.load(Ordering::SeqCst) < n {
            assert!(Instant::now() < deadline, "job did not start in time");
            thread::sleep(Duration::from_millis(1));
        }
    }

    fn work(&self) {
        self.started.fetch_add(1, Ordering::SeqCst);
        if !self.delay.is_zero() {
            thread::sleep(self.delay);
        }
        self.finished.fetch_add(1, Ordering::SeqCst);
    }
}

impl Executor for TestExec {
    type Model = ();
    type Spool = NoSpool;

    fn mount(&self, config_json: String, weights: Weights<NoSpool>) -> Result<(), String> {
        self.stub.mount(config_json, weights)
    }

    fn infer(
        &self,
        model: &(),
        input_ids: &[i32],
        max_tokens: i64,
        job: &JobContext<'_>,
    ) -> Result<Vec<i32>, JobError> {
        self.work();
        match self.flood {
            Some(n) if input_ids == [-1] => Ok(vec![7; n]),
            _ => self.stub.infer(model, input_ids, max_tokens, job),
        }
    }

    fn prompt(&self, prompt: &str, max_out: i64, job: &JobContext<'_>) -> Result<String, JobError> {
        self.work();
        self.stub.prompt(prompt, max_out, job)
    }
}

/// A `local_lm` executor for cancel and metrics tests: the prompt "fail"
/// fails with code `boom`, "spin" works until cancelled (30 s at most), any
/// other answers at once with "done PROMPT". It counts what it started and
/// what it stopped on a cancel.
#[derive(Clone, Default)]
pub struct Spinner {
    pub started: Arc<AtomicUsize>,
    pub stopped: Arc<AtomicUsize>,
}

impl Executor for Spinner {
    type Model = ();
    type Spool = NoSpool;

    fn mount(&self, _: String, _: Weights<NoSpool>) -> Result<(), String> {
        Ok(())
    }

    fn infer(&self, _: &(), _: &[i32], _: i64, _: &JobContext<'_>) -> Result<Vec<i32>, JobError> {
        Err(JobError::new("unsupported", "prompts only"))
    }

    fn prompt(&self, prompt: &str, _: i64, job: &JobContext<'_>) -> Result<String, JobError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        match prompt {
            "fail" => Err(JobError::new("boom", "failed on purpose")),
            "spin" => {
                let until = Instant::now() + Duration::from_secs(30);
                while Instant::now() < until {
                    if job.is_cancelled() {
                        self.stopped.fetch_add(1, Ordering::SeqCst);
                        return Err(JobError::new("cancelled", "stopped"));
                    }
                    thread::sleep(Duration::from_millis(1));
                }
                Ok(format!("done {prompt}"))
            }
            _ => Ok(format!("done {prompt}")),
        }
    }
}

// ---------------------------------------------------------------------------
// Servers

/// Which adapter runs a node, and on which executor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerKind {
    /// donate-std: threads.
    Std,
    /// donate-smol on smol's global executor.
    Smol,
    /// donate-smol with its tasks spawned on a tokio runtime.
    SmolOnTokio,
    /// donate-tokio.
    Tokio,
}

/// One server per adapter.
pub const ADAPTERS: [ServerKind; 3] = [ServerKind::Std, ServerKind::Smol, ServerKind::Tokio];

enum Handle {
    Std(donate_std::Server),
    Smol(donate_smol::Server),
    SmolOnTokio(donate_smol::Server, tokio::runtime::Runtime),
    Tokio(donate_tokio::Server, tokio::runtime::Runtime),
}

impl Handle {
    fn shutdown(self) {
        match self {
            Handle::Std(server) => server.shutdown(),
            Handle::Smol(server) => smol::block_on(server.shutdown()),
            Handle::SmolOnTokio(server, rt) => {
                rt.block_on(server.shutdown());
                no_task_left(&rt);
            }
            Handle::Tokio(server, rt) => {
                rt.block_on(server.shutdown());
                no_task_left(&rt);
            }
        }
    }
}

/// After a shutdown, the runtime that ran the node has no task left (bounded
/// wait: a finished task is released just after its last poll).
fn no_task_left(rt: &tokio::runtime::Runtime) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let alive = rt.metrics().num_alive_tasks();
        if alive == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{alive} tasks alive after shutdown"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// A node listening on 127.0.0.1 port 0. Dropping it shuts it down (bounded).
pub struct TestServer {
    pub kind: ServerKind,
    addr: SocketAddr,
    handle: Option<Handle>,
}

fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Starts a node of `kind` with `config` and `executor`.
pub fn start<E: Executor>(kind: ServerKind, config: ServerConfig, executor: E) -> TestServer {
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let handle = match kind {
        ServerKind::Std => {
            let listener = std::net::TcpListener::bind(loopback).expect("bind");
            Handle::Std(donate_std::serve(listener, config, executor).expect("serve"))
        }
        ServerKind::Smol => {
            let listener = smol::Async::<std::net::TcpListener>::bind(loopback).expect("bind");
            let spawn = |task: donate_smol::Task| smol::spawn(task).detach();
            Handle::Smol(donate_smol::serve(listener, config, executor, spawn).expect("serve"))
        }
        ServerKind::SmolOnTokio => {
            let rt = runtime(2);
            let tokio_handle = rt.handle().clone();
            let spawn = move |task: donate_smol::Task| {
                tokio_handle.spawn(task);
            };
            let listener = smol::Async::<std::net::TcpListener>::bind(loopback).expect("bind");
            let server = donate_smol::serve(listener, config, executor, spawn).expect("serve");
            Handle::SmolOnTokio(server, rt)
        }
        ServerKind::Tokio => {
            let rt = runtime(2);
            let server = rt.block_on(async {
                let listener = tokio::net::TcpListener::bind(loopback).await.expect("bind");
                donate_tokio::serve(listener, config, executor).expect("serve")
            });
            Handle::Tokio(server, rt)
        }
    };
    let addr = match &handle {
        Handle::Std(s) => s.local_addr(),
        Handle::Smol(s) | Handle::SmolOnTokio(s, _) => s.local_addr(),
        Handle::Tokio(s, _) => s.local_addr(),
    };
    assert!(addr.ip().is_loopback() && addr.port() != 0);
    TestServer {
        kind,
        addr,
        handle: Some(handle),
    }
}

/// A node with the default config and the plain stub.
pub fn start_default(kind: ServerKind) -> TestServer {
    start(kind, ServerConfig::default(), TestExec::default())
}

impl TestServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Graceful shutdown; fails the test if it takes longer than `LIMIT`.
    pub fn shutdown(mut self) {
        self.shutdown_bounded();
    }

    fn shutdown_bounded(&mut self) {
        if let Some(handle) = self.handle.take() {
            let kind = self.kind;
            bounded(&format!("{kind:?} shutdown"), LIMIT, move || {
                handle.shutdown()
            });
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if thread::panicking() {
            // Leave it running: a failed test must report, not hang in shutdown.
            std::mem::forget(self.handle.take());
        } else {
            self.shutdown_bounded();
        }
    }
}

// ---------------------------------------------------------------------------
// Frames and JSON

/// `body` as a frame: `u32` LE length, then the bytes.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// A frame holding `json`.
pub fn fj(json: &str) -> Vec<u8> {
    frame(json.as_bytes())
}

/// A frame holding `value`.
pub fn fv(value: &Value) -> Vec<u8> {
    frame(&serde_json::to_vec(value).expect("json"))
}

/// Just a header announcing `len` bytes.
pub fn header(len: u32) -> [u8; 4] {
    len.to_le_bytes()
}

pub fn b64(raw: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(raw)
}

pub fn sha256_hex(raw: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(raw)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn client_hello(mode: &str) -> Vec<u8> {
    fv(&json!({"v": 1, "type": "hello", "mode": mode, "role": "client"}))
}

pub fn begin(config: &str, weights_len: i64, sha256: Option<&str>) -> Vec<u8> {
    let mut v =
        json!({"v": 1, "type": "model_begin", "config_json": config, "weights_len": weights_len});
    if let Some(sha) = sha256 {
        v["weights_sha256"] = json!(sha);
    }
    fv(&v)
}

pub fn chunk(index: i64, last: bool, raw: &[u8]) -> Vec<u8> {
    chunk_b64(index, last, &b64(raw))
}

pub fn chunk_b64(index: i64, last: bool, data_b64: &str) -> Vec<u8> {
    fv(
        &json!({"v": 1, "type": "weights_chunk", "index": index, "last": last, "data_b64": data_b64}),
    )
}

pub fn commit() -> Vec<u8> {
    fj(r#"{"v":1,"type":"model_commit"}"#)
}

pub fn infer(job_id: &str, input_ids: &[i32], max_tokens: i64) -> Vec<u8> {
    fv(
        &json!({"v": 1, "type": "infer", "job_id": job_id, "input_ids": input_ids, "max_tokens": max_tokens}),
    )
}

pub fn prompt(job_id: &str, text: &str) -> Vec<u8> {
    fv(&json!({"v": 1, "type": "prompt", "job_id": job_id, "prompt": text}))
}

pub fn queue_status() -> Vec<u8> {
    fj(r#"{"v":1,"type":"queue_status"}"#)
}

/// A whole 4-byte upload (begin, one chunk, commit), as the Go client writes it.
pub fn small_upload() -> Vec<u8> {
    [
        begin(r#"{"ok":true}"#, 4, None),
        chunk(0, true, &[1, 2, 3, 4]),
        commit(),
    ]
    .concat()
}

// ---------------------------------------------------------------------------
// A raw client

/// How reading a frame ended when it did not yield one.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// End of stream or reset: the server closed.
    Closed,
    /// Nothing arrived within the read timeout.
    Timeout,
    /// Bytes that are not a well-formed frame holding a JSON object.
    Garbage(String),
}

/// A raw TCP client that speaks frames, with read and write timeouts.
pub struct Raw {
    pub stream: TcpStream,
}

impl Raw {
    /// Connects (without reading anything).
    pub fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect_timeout(&addr, LIMIT).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        stream.set_read_timeout(Some(LIMIT)).expect("read timeout");
        stream
            .set_write_timeout(Some(LIMIT))
            .expect("write timeout");
        Raw { stream }
    }

    /// Connects and reads the server hello.
    pub fn hello(addr: SocketAddr) -> (Raw, Value) {
        let mut raw = Raw::connect(addr);
        let hello = raw.frame();
        assert_eq!(hello["type"], "hello", "first frame: {hello}");
        assert_eq!(hello["role"], "server");
        (raw, hello)
    }

    /// Connects, reads the hello and sends the client hello (as the Go client).
    pub fn session(addr: SocketAddr) -> Raw {
        let (mut raw, hello) = Raw::hello(addr);
        raw.send(&client_hello(hello["mode"].as_str().expect("mode")));
        raw
    }

    pub fn set_read_timeout(&self, timeout: Duration) {
        self.stream
            .set_read_timeout(Some(timeout))
            .expect("read timeout");
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to server");
    }

    /// Writes, reporting failure instead of panicking.
    pub fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads one frame's raw body.
    pub fn read_body(&mut self) -> Result<Vec<u8>, Ended> {
        let mut header = [0u8; 4];
        read_exact(&mut self.stream, &mut header)?;
        let len = u32::from_le_bytes(header) as usize;
        if len == 0 || len > 64 * 1024 * 1024 {
            return Err(Ended::Garbage(format!("bad frame length {len}")));
        }
        let mut body = vec![0; len];
        read_exact(&mut self.stream, &mut body).map_err(|e| match e {
            Ended::Closed => Ended::Garbage(format!("stream ended inside a {len}-byte frame")),
            other => other,
        })?;
        Ok(body)
    }

    /// Reads one frame holding a JSON object.
    pub fn read_frame(&mut self) -> Result<Value, Ended> {
        let body = self.read_body()?;
        match serde_json::from_slice::<Value>(&body) {
            Ok(v) if v.is_object() => Ok(v),
            _ => Err(Ended::Garbage(String::from_utf8_lossy(&body).into_owned())),
        }
    }

    /// Reads one frame; panics on anything else.
    pub fn frame(&mut self) -> Value {
        match self.read_frame() {
            Ok(v) => v,
            Err(e) => panic!("expected a frame, got {e:?}"),
        }
    }

    /// Reads one frame's exact text.
    pub fn text(&mut self) -> String {
        match self.read_body() {
            Ok(body) => String::from_utf8(body).expect("frames are UTF-8"),
            Err(e) => panic!("expected a frame, got {e:?}"),
        }
    }

    /// Reads one `error` frame with exactly this text and returns it.
    pub fn expect_error(&mut self, text: &str) -> Value {
        let v = self.frame();
        assert_eq!(v["type"], "error", "expected error {text:?}, got {v}");
        assert_eq!(v["error"], text, "{v}");
        assert_eq!(v["v"], 1);
        v
    }

    /// Reads one `error` frame whose text starts with `prefix`, with `code`.
    pub fn expect_error_code(&mut self, code: &str, prefix: &str) -> Value {
        let v = self.frame();
        assert_eq!(v["type"], "error", "expected error {code}, got {v}");
        assert_eq!(v["code"], code, "{v}");
        let text = v["error"].as_str().expect("error text");
        assert!(
            text.starts_with(prefix),
            "{text:?} should start with {prefix:?}"
        );
        v
    }

    /// Reads one `model_status` and returns (ok, message).
    pub fn expect_status(&mut self) -> (bool, String) {
        let v = self.frame();
        assert_eq!(v["type"], "model_status", "{v}");
        (
            v["ok"].as_bool().expect("ok"),
            v["message"].as_str().unwrap_or_default().to_owned(),
        )
    }

    /// Sends a `queue_status` request and checks the answer is one.
    pub fn expect_in_step(&mut self) {
        self.send(&queue_status());
        let v = self.frame();
        assert_eq!(v["type"], "queue_status", "out of step: {v}");
    }

    /// Uploads a 4-byte model and expects it mounted.
    pub fn mount(&mut self) {
        self.send(&small_upload());
        assert_eq!(self.expect_status(), (true, "mounted".to_owned()));
    }

    /// Runs `infer` and checks the stub's answer.
    pub fn expect_infer(&mut self, job_id: &str) {
        self.send(&infer(job_id, &[9, 9], 3));
        let v = self.frame();
        assert_eq!(
            v,
            json!({"v": 1, "type": "infer_result", "job_id": job_id, "ok": true, "output_ids": [9, 9, 1, 2, 3], "queue_depth": 0}),
        );
    }

    /// Expects the server to close the stream (end or reset) with no more frames.
    pub fn expect_closed(&mut self) {
        match self.read_frame() {
            Err(Ended::Closed) => {}
            other => panic!("expected the server to close, got {other:?}"),
        }
    }

    /// Expects nothing at all to arrive within `wait`.
    pub fn expect_silence(&mut self, wait: Duration) {
        self.set_read_timeout(wait);
        let mut byte = [0u8; 1];
        match self.stream.read(&mut byte) {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Ok(0) => panic!("server closed, expected silence"),
            Ok(_) => panic!("server sent {byte:?}, expected silence"),
            Err(e) => panic!("expected silence, got {e}"),
        }
        self.set_read_timeout(LIMIT);
    }

    pub fn close_write(&self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }
}

fn read_exact(stream: &mut TcpStream, buf: &mut [u8]) -> Result<(), Ended> {
    let mut filled = 0;
    while filled < buf.len() {
        match stream.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Err(Ended::Closed),
            Ok(0) => return Err(Ended::Garbage(format!("stream ended after {filled} bytes"))),
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(if filled == 0 {
                    Ended::Timeout
                } else {
                    Ended::Garbage(format!("stalled after {filled} bytes"))
                })
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset
                        | ErrorKind::ConnectionAborted
                        | ErrorKind::BrokenPipe
                ) =>
            {
                return Err(Ended::Closed)
            }
            Err(e) => return Err(Ended::Garbage(format!("read failed: {e}"))),
        }
    }
    Ok(())
}

/// A complete session on a fresh connection: hello, push, infer, queue_status.
/// Proves a node still serves new clients.
pub fn assert_serves(addr: SocketAddr) {
    let mut raw = Raw::session(addr);
    raw.mount();
    raw.expect_infer("fresh");
    raw.expect_in_step();
}

// ---------------------------------------------------------------------------
// Process facts

/// This process's resident set size in KiB (the servers run in-process).
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// Threads of this process.
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .count()
}

/// Raises the soft open-file limit to the hard limit; returns the soft limit now in force.
#[allow(clippy::unnecessary_cast)] // rlim_t is not u64 everywhere
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    lim.rlim_cur as u64
}

// ---------------------------------------------------------------------------
// Adapter clients behind one blocking interface

/// Which adapter's client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientKind {
    Std,
    Smol,
    Tokio,
}

pub const CLIENTS: [ClientKind; 3] = [ClientKind::Std, ClientKind::Smol, ClientKind::Tokio];

/// A client of any adapter; async ones are driven to completion on each call
/// (smol's with `smol::block_on`, tokio's on a runtime of its own).
pub enum AnyClient {
    Std(donate_std::Client),
    Smol(donate_smol::Client),
    Tokio(donate_tokio::Client, tokio::runtime::Runtime),
}

macro_rules! call {
    ($client:expr, $c:ident => $e:expr) => {
        match $client {
            AnyClient::Std($c) => $e,
            AnyClient::Smol($c) => smol::block_on($e),
            AnyClient::Tokio($c, rt) => rt.block_on($e),
        }
    };
}

pub type Res<T> = donate_std::Result<T>;

impl AnyClient {
    pub fn connect(kind: ClientKind, addr: SocketAddr) -> Res<AnyClient> {
        Ok(match kind {
            ClientKind::Std => AnyClient::Std(donate_std::Client::connect(addr)?),
            ClientKind::Smol => {
                AnyClient::Smol(smol::block_on(donate_smol::Client::connect(addr))?)
            }
            ClientKind::Tokio => {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                let client = rt.block_on(donate_tokio::Client::connect(addr))?;
                AnyClient::Tokio(client, rt)
            }
        })
    }

    pub fn hello(&self) -> &Hello {
        match self {
            AnyClient::Std(c) => c.hello(),
            AnyClient::Smol(c) => c.hello(),
            AnyClient::Tokio(c, _) => c.hello(),
        }
    }

    pub fn push_model(&mut self, config: &str, weights: &[u8], sha256: bool) -> Res<ModelStatus> {
        call!(self, c => c.push_model(config, weights, sha256))
    }

    /// Pushes `weights` announcing `sha256` (right or wrong), reporting progress.
    pub fn push_model_from(
        &mut self,
        config: &str,
        weights: &[u8],
        sha256: Option<[u8; 32]>,
        progress: &mut Vec<u64>,
    ) -> Res<ModelStatus> {
        let len = weights.len() as u64;
        let record = |sent| progress.push(sent);
        call!(self, c => c.push_model_from(config, weights, len, sha256, record))
    }

    pub fn infer(&mut self, input_ids: &[i32], max_tokens: i64) -> Res<InferResult> {
        call!(self, c => c.infer(input_ids, max_tokens))
    }

    pub fn prompt(&mut self, text: &str, max_out: i64) -> Res<PromptResult> {
        call!(self, c => c.prompt(text, max_out))
    }

    pub fn queue_status(&mut self) -> Res<Option<QueueStatus>> {
        call!(self, c => c.queue_status())
    }

    pub fn send_infer(&mut self, input_ids: &[i32], max_tokens: i64) -> Res<RequestId> {
        call!(self, c => c.send_infer(input_ids, max_tokens))
    }

    pub fn wait(&mut self, request: RequestId) -> Res<Answer> {
        call!(self, c => c.wait(request))
    }
}

/// The error frame a call was refused with; panics on anything else.
pub fn refused<T: std::fmt::Debug>(result: Res<T>) -> donate_proto::message::ErrorFrame {
    match result {
        Err(donate_std::Error::Refused(e)) => e,
        other => panic!("expected an error frame, got {other:?}"),
    }
}

/// The `model_status` message a push was refused with; panics on anything else.
pub fn model_refused<T: std::fmt::Debug>(result: Res<T>) -> String {
    match result {
        Err(donate_std::Error::ModelRefused(message)) => message,
        other => panic!("expected model_status ok:false, got {other:?}"),
    }
}

/// A `donate` process that is killed when dropped, so that a test that
/// fails does not leave nodes and gateways running.
pub struct Spawned(pub std::process::Child);

impl std::ops::Deref for Spawned {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Spawned {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `donate ARGS` (stderr dropped, `RUST_LOG=warn`), and the first line it
/// printed (a node's or gateway's `listening on …`).
pub fn spawn_donate(args: &[&str]) -> (Spawned, String) {
    use std::io::BufRead as _;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_donate"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn donate");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("its first line");
    (Spawned(child), line.trim_end().to_owned())
}
