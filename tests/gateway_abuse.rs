//! `donate gateway` against the abuse a serious HTTP server meets, over raw
//! TCP (no donor needed: the routes used answer without one): headers and
//! bodies trickled a byte at a time, a thousand idle keep-alive connections,
//! more connections than `--max-connections`, oversized and malformed JSON.
//! Each is cut off within its timeout while requests keep being served, and
//! the gateway's descriptors go back to where they were.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::spawn_donate as spawn;

/// A gateway with `args`, and its `host:port`.
fn gateway(args: &[&str]) -> (common::Spawned, String) {
    let (child, first) = spawn(
        &[
            &[
                "gateway",
                "--listen",
                "127.0.0.1:0",
                "--node",
                "127.0.0.1:1",
            ][..],
            args,
        ]
        .concat(),
    );
    let addr = first
        .strip_prefix("gateway listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
        .to_owned();
    (child, addr)
}

/// Sends `request` on a new connection and reads the whole answer (the
/// request says `Connection: close`).
fn exchange(addr: &str, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// A request the gateway answers without a donor: an unknown route, 404.
const PROBE: &str = "GET /nope HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";

/// Whether the server closed `stream` (EOF or reset) within `limit`.
fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut byte = [0u8; 512];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// Open descriptors of process `pid`.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[test]
fn slow_idle_and_excess_connections_are_cut_off_while_requests_are_served() {
    let (mut child, addr) = gateway(&["--header-timeout", "1", "--body-timeout", "1"]);
    assert!(exchange(&addr, PROBE).starts_with("HTTP/1.1 404"));
    let baseline = fds(child.id());

    // A thousand idle keep-alive connections: requests still get through.
    let mut idle: Vec<TcpStream> = (0..1000)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    let started = Instant::now();
    let answer = exchange(&addr, PROBE);
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert!(answer.contains("unknown_url"), "{answer}");

    // Headers trickled a byte every 200 ms: closed after the header timeout,
    // not held open by the trickle.
    let mut slow = TcpStream::connect(&addr).unwrap();
    slow.write_all(b"GET /nope HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        .unwrap();
    let trickle = Instant::now();
    let mut cut = false;
    for _ in 0..25 {
        if slow.write_all(b"a").is_err() || closed_within(&mut slow, Duration::from_millis(200)) {
            cut = true;
            break;
        }
    }
    assert!(cut, "a trickled header held its connection for 5 s");
    assert!(trickle.elapsed() < Duration::from_secs(4));

    // A body that stops coming: 408 after the body timeout.
    let answer = exchange(
        &addr,
        "POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{\"model\"",
    );
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("--body-timeout"), "{answer}");

    // Oversized and malformed JSON: 413 and 400 in OpenAI's error shape.
    let big = "x".repeat(2 << 20);
    let answer = exchange(
        &addr,
        &format!("POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{big}", big.len()),
    );
    assert!(
        answer.starts_with("HTTP/1.1 413"),
        "{}",
        &answer[..200.min(answer.len())]
    );
    let answer = exchange(
        &addr,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 9\r\nConnection: close\r\n\r\n{\"model\":",
    );
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("\"error\""), "{answer}");

    // The idle ones were closed by the gateway once their header timeout ran out.
    let left = started.elapsed();
    let wait = Duration::from_secs(3).saturating_sub(left);
    std::thread::sleep(wait);
    let mut open = 0;
    for stream in &mut idle {
        if !closed_within(stream, Duration::from_millis(1)) {
            open += 1;
        }
    }
    assert_eq!(
        open, 0,
        "idle connections still open after the header timeout"
    );
    drop(idle);
    // Its descriptors are back where they were.
    let deadline = Instant::now() + Duration::from_secs(5);
    while fds(child.id()) > baseline + 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        fds(child.id()) <= baseline + 4,
        "{} descriptors, {baseline} before",
        fds(child.id())
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn connections_beyond_the_cap_are_closed_and_served_again_once_one_ends() {
    let (mut child, addr) = gateway(&["--max-connections", "4", "--header-timeout", "30"]);
    let mut held: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    // Give the gateway time to take all four.
    std::thread::sleep(Duration::from_millis(300));
    let mut extra = TcpStream::connect(&addr).unwrap();
    let _ = extra.write_all(PROBE.as_bytes());
    assert!(
        closed_within(&mut extra, Duration::from_secs(5)),
        "a fifth connection was kept"
    );
    // One of the four sends its request and is answered; once it is closed,
    // a new connection is served.
    held[0].write_all(PROBE.as_bytes()).unwrap();
    let mut answer = String::new();
    held[0].read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    held.remove(0);
    std::thread::sleep(Duration::from_millis(200));
    assert!(exchange(&addr, PROBE).starts_with("HTTP/1.1 404"));
    let _ = child.kill();
    let _ = child.wait();
}
