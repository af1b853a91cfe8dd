//! `/metrics` and `/healthz` (donate_host::MetricsServer) after a scripted
//! exchange with a real node: the text parses with a strict parser of the
//! Prometheus / OpenMetrics text format, and every counter is exact.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use common::{fj, prompt, Raw, Spinner};
use donate_host::{Metrics, MetricsServer, NodeConfig, HONOURED};
use donate_proto::{Mode, ServerConfig};

/// One GET; the status code and body.
fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

/// A strict parser of the text exposition: every line is `# HELP`, `# TYPE`,
/// `# UNIT`, a sample `name{label="value",…} number`, or the final `# EOF`.
/// Returns samples keyed `name{labels}` (labels as written).
fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut samples = BTreeMap::new();
    let mut lines = text.lines().peekable();
    let mut typed = Vec::new();
    while let Some(line) = lines.next() {
        if line == "# EOF" {
            assert!(lines.peek().is_none(), "text after # EOF");
            return samples;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name) = (parts.next().unwrap(), parts.next().expect("a name"));
            assert!(
                matches!(kind, "HELP" | "TYPE" | "UNIT"),
                "bad comment: {line}"
            );
            assert!(name.starts_with("donate_"), "unprefixed: {line}");
            if kind == "TYPE" {
                let t = parts.next().expect("a type");
                assert!(
                    matches!(t, "counter" | "gauge" | "histogram"),
                    "bad type: {line}"
                );
                typed.push(name.to_owned());
            }
            continue;
        }
        let (key, value) = line.rsplit_once(' ').expect("name and value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let name = key.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad name: {line}"
        );
        if let Some(labels) = key.strip_prefix(name) {
            if !labels.is_empty() {
                let inner = labels
                    .strip_prefix('{')
                    .and_then(|l| l.strip_suffix('}'))
                    .unwrap_or_else(|| panic!("bad labels: {line}"));
                for pair in inner.split(',') {
                    let (k, v) = pair.split_once('=').expect("label=value");
                    assert!(k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
                    assert!(
                        v.starts_with('"') && v.ends_with('"') && v.len() >= 2,
                        "{line}"
                    );
                }
            }
        }
        assert!(
            typed.iter().any(|t| name.starts_with(t.as_str())),
            "sample before its TYPE: {line}"
        );
        assert!(
            samples.insert(key.to_owned(), value).is_none(),
            "twice: {line}"
        );
    }
    panic!("no # EOF at the end");
}

fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn metrics_count_exactly_what_a_scripted_exchange_did() {
    let metrics = Arc::new(Metrics::default());
    let exec = Spinner::default();
    let config = ServerConfig::default()
        .mode(Mode::LocalLm)
        .local_lm_path("/m".into())
        .max_connections(2);
    let node = NodeConfig::from(config)
        .offer(HONOURED)
        .metrics(Arc::clone(&metrics));
    let server = donate_std::serve(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        node,
        exec.clone(),
    )
    .expect("serve");
    let http = MetricsServer::start(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        Arc::clone(&metrics),
    )
    .unwrap();
    assert_eq!(get(http.local_addr(), "/healthz"), (200, "ok\n".to_owned()));

    let (mut a, _) = Raw::hello(server.local_addr());
    a.send(&fj(
        r#"{"v":1,"type":"hello","mode":"local_lm","role":"client","capabilities":["cancel","deadline"]}"#,
    ));
    let mut b = Raw::session(server.local_addr());
    // A third connection is over max_connections: refused.
    let mut refused = Raw::connect(server.local_addr());
    assert_eq!(refused.frame()["code"], "too_many_connections");

    a.send(&prompt("1", "ok"));
    assert_eq!(a.frame()["ok"], true);
    a.send(&prompt("2", "fail"));
    assert_eq!(a.frame()["code"], "boom");
    b.send(&prompt("3", "ok"));
    assert_eq!(b.frame()["ok"], true);
    a.send(&prompt("4", "spin"));
    wait_for("the spin to start", || {
        exec.started.load(Ordering::SeqCst) == 4
    });
    a.send(&prompt("5", "never"));
    a.send(&fj(r#"{"v":1,"type":"cancel","job_id":"5"}"#));
    assert_eq!(a.frame()["code"], "cancelled");
    a.send(&fj(r#"{"v":1,"type":"cancel","job_id":"4"}"#));
    assert_eq!(a.frame()["code"], "cancelled");
    // Stopped by its deadline while running: counted under that code.
    a.send(&fj(
        r#"{"v":1,"type":"prompt","job_id":"6","prompt":"spin","deadline_ms":50}"#,
    ));
    assert_eq!(a.frame()["code"], "deadline_exceeded");
    drop((a, b, refused));

    let scrape = || parse(&get(http.local_addr(), "/metrics").1);
    wait_for("every connection to be removed", || {
        scrape()["donate_connections_open"] == 0.0
    });
    let m = scrape();
    let expect = [
        ("donate_connections_total", 3.0),
        ("donate_connections_refused_total", 1.0),
        ("donate_jobs_queued", 0.0),
        ("donate_jobs_running", 0.0),
        (r#"donate_jobs_done_total{kind="prompt"}"#, 2.0),
        (r#"donate_jobs_done_total{kind="infer"}"#, 0.0),
        (
            r#"donate_jobs_failed_total{kind="prompt",code="boom"}"#,
            1.0,
        ),
        (
            r#"donate_jobs_failed_total{kind="prompt",code="cancelled"}"#,
            1.0,
        ),
        (r#"donate_jobs_removed_queued_total{why="cancelled"}"#, 1.0),
        (
            r#"donate_jobs_removed_queued_total{why="deadline_exceeded"}"#,
            0.0,
        ),
        (
            r#"donate_jobs_removed_queued_total{why="connection_closed"}"#,
            0.0,
        ),
        (
            r#"donate_jobs_failed_total{kind="prompt",code="deadline_exceeded"}"#,
            1.0,
        ),
        ("donate_job_seconds_count", 5.0),
        ("donate_queue_wait_seconds_count", 5.0),
        (r#"donate_job_seconds_bucket{le="+Inf"}"#, 5.0),
        ("donate_upload_bytes_total", 0.0),
        ("donate_models_mounted_total", 0.0),
    ];
    for (key, value) in expect {
        assert_eq!(m.get(key), Some(&value), "{key} in {m:#?}");
    }
    let closed: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("donate_connections_closed_total"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(closed, 3.0, "{m:#?}");
    assert_eq!(
        m.get(r#"donate_connections_closed_total{reason="too_many_connections"}"#),
        Some(&1.0)
    );
    assert_eq!(get(http.local_addr(), "/nope").0, 404);

    server.shutdown();
    assert_eq!(
        get(http.local_addr(), "/healthz"),
        (503, "draining\n".to_owned())
    );
}

#[test]
fn a_store_counts_hits_misses_and_its_size() {
    let metrics = Arc::new(Metrics::default());
    let dir = tempfile::tempdir().unwrap();
    let store = donate_host::ModelStore::open(dir.path(), 1 << 30).unwrap();
    let node = NodeConfig::from(ServerConfig::default())
        .with_store(store)
        .metrics(Arc::clone(&metrics));
    let server = donate_std::serve(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        node,
        donate_proto::Stub::default(),
    )
    .expect("serve");
    let scrape = || parse(&metrics.encode());
    assert_eq!(scrape()["donate_store_models"], 0.0);
    let model = vec![3u8; 100_000];
    let hash: [u8; 32] = sha2::Digest::finalize(sha2::Digest::chain_update(
        <sha2::Sha256 as sha2::Digest>::new(),
        &model,
    ))
    .into();
    let push = || {
        let mut client = donate_std::Client::connect(server.local_addr()).unwrap();
        client
            .push_stored("{}", std::io::Cursor::new(&model), 100_000, hash, |_| {})
            .unwrap()
    };
    assert!(!push().reused);
    assert!(push().reused);
    assert!(push().reused);
    // A use of a model the store does not hold is a miss.
    let mut raw = Raw::connect(server.local_addr());
    raw.frame();
    raw.send(&fj(
        r#"{"v":1,"type":"hello","role":"client","capabilities":["store"]}"#,
    ));
    raw.send(&fj(&format!(
        r#"{{"v":1,"type":"model_use","config_json":"{{}}","weights_sha256":"{}"}}"#,
        "0".repeat(64)
    )));
    assert!(!raw.expect_status().0);
    let samples = scrape();
    assert_eq!(samples["donate_store_hits_total"], 2.0, "{samples:?}");
    assert_eq!(samples["donate_store_misses_total"], 1.0);
    assert_eq!(samples["donate_store_models"], 1.0);
    assert_eq!(samples["donate_store_bytes"], 100_000.0);
    drop(raw);
    server.shutdown();
}

/// A client that sends a request head that never ends, a byte every
/// `every`, until the server closes the connection or `give_up` passes:
/// when it was closed (from the first byte) and what the server sent.
fn trickle(
    addr: std::net::SocketAddr,
    every: Duration,
    give_up: Duration,
) -> (
    mpsc::Receiver<()>,
    thread::JoinHandle<Option<(Duration, String)>>,
) {
    let (sent, first) = mpsc::channel();
    let thread = thread::spawn(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(every)).unwrap();
        let start = Instant::now();
        let head = b"GET /healthz HTTP/1.1\r\nX-Slow: ";
        let mut got = Vec::new();
        for i in 0.. {
            let byte = head.get(i).copied().unwrap_or(b'a');
            if s.write_all(&[byte]).is_err() {
                return Some((start.elapsed(), String::from_utf8_lossy(&got).into_owned()));
            }
            if i == 0 {
                let _ = sent.send(());
            }
            let mut buf = [0u8; 1024];
            match s.read(&mut buf) {
                Ok(0) => {
                    return Some((start.elapsed(), String::from_utf8_lossy(&got).into_owned()))
                }
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => {
                    return Some((start.elapsed(), String::from_utf8_lossy(&got).into_owned()))
                }
            }
            if start.elapsed() > give_up {
                return None;
            }
        }
        unreachable!()
    });
    (first, thread)
}

#[test]
fn a_trickling_client_holds_neither_healthz_nor_shutdown() {
    let http = MetricsServer::start(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        Arc::new(Metrics::default()),
    )
    .unwrap();
    let addr = http.local_addr();
    // A byte every 300 ms: never long enough apart for a per-read timeout.
    let (first, trickler) = trickle(addr, Duration::from_millis(300), Duration::from_secs(15));
    first.recv().unwrap();
    thread::sleep(Duration::from_millis(100));
    for _ in 0..3 {
        let asked = Instant::now();
        assert_eq!(get(addr, "/healthz"), (200, "ok\n".to_owned()));
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "{:?}",
            asked.elapsed()
        );
    }
    let stopping = Instant::now();
    drop(http);
    assert!(
        stopping.elapsed() < Duration::from_secs(1),
        "shutdown waited {:?} for a slow client",
        stopping.elapsed()
    );
    // Its connection was closed by the shutdown, not left to run out.
    let (closed, _) = trickler.join().unwrap().expect("the trickler was cut off");
    assert!(closed < Duration::from_secs(4), "{closed:?}");
}

#[test]
fn a_request_head_has_five_seconds_in_all() {
    let http = MetricsServer::start(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        Arc::new(Metrics::default()),
    )
    .unwrap();
    let (_, trickler) = trickle(
        http.local_addr(),
        Duration::from_millis(500),
        Duration::from_secs(15),
    );
    let (closed, said) = trickler.join().unwrap().expect("the trickler was cut off");
    assert!(
        closed > Duration::from_secs(4) && closed < Duration::from_secs(7),
        "{closed:?}"
    );
    assert!(said.starts_with("HTTP/1.1 408 "), "{said:?}");
    // A head over the size limit is refused as soon as it is over.
    let mut s = TcpStream::connect(http.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // One byte over, all of it read before the answer (no reset).
    let mut big = b"GET /healthz HTTP/1.1\r\nX-Big: ".to_vec();
    big.resize(8 * 1024 + 1, b'a');
    s.write_all(&big).unwrap();
    let mut said = String::new();
    let _ = s.read_to_string(&mut said);
    assert!(said.starts_with("HTTP/1.1 431 "), "{said:?}");
}

#[test]
fn connections_over_the_limit_are_told_busy() {
    let http = MetricsServer::start(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        Arc::new(Metrics::default()),
    )
    .unwrap();
    let tricklers: Vec<_> = (0..8)
        .map(|_| {
            let (first, t) = trickle(
                http.local_addr(),
                Duration::from_millis(200),
                Duration::from_secs(15),
            );
            first.recv().unwrap();
            t
        })
        .collect();
    thread::sleep(Duration::from_millis(100));
    // Answered at once: a 503, unless the close resets it first.
    let asked = Instant::now();
    let mut s = TcpStream::connect(http.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(b"GET /healthz HTTP/1.1\r\n\r\n");
    let mut said = String::new();
    match s.read_to_string(&mut said) {
        Ok(_) => assert!(
            said.is_empty() || said.starts_with("HTTP/1.1 503 "),
            "{said:?}"
        ),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
    drop(http);
    for t in tricklers {
        assert!(t.join().unwrap().is_some());
    }
}
