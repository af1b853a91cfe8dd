//! [`MetricsServer`]: `GET /metrics` and `GET /healthz` over plain HTTP/1.x.
//!
//! Hand-rolled rather than an HTTP crate: it answers exactly two paths to a
//! scraper on loopback, one request per connection, so the whole server is a
//! bounded read of one request head, a status line and a body. A server crate
//! (hyper, tiny_http) would bring a runtime or a thread pool and a parser
//! surface for features nobody here uses.
//!
//! One thread accepts; each connection is answered on a thread of its own,
//! at most `MAX_CONNECTIONS` at once (one more is told 503 and closed at
//! once), so a slow peer never holds `/healthz` from another. A connection
//! has `HEAD_DEADLINE` in all to send a request head of at most `MAX_HEAD`
//! bytes, however it spaces its bytes, and `IO_TIMEOUT` to take the answer.
//! Stopping the server shuts every open connection's socket, which wakes
//! its thread, and joins only the accepting thread: no client delays it.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::Metrics;

/// Longest request head accepted.
const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its whole request head.
const HEAD_DEADLINE: Duration = Duration::from_secs(5);
/// Time a client has to take the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections answered at once.
const MAX_CONNECTIONS: usize = 8;

/// The open connections, by number, and whether the server is stopping.
#[derive(Debug, Default)]
struct Open {
    stopping: bool,
    next: u64,
    streams: HashMap<u64, TcpStream>,
}

type Shared = Arc<Mutex<Open>>;

fn lock(open: &Shared) -> std::sync::MutexGuard<'_, Open> {
    open.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running `/metrics` + `/healthz` responder; stops when dropped.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    open: Shared,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Serves `metrics` on `listener` from threads of its own.
    pub fn start(listener: TcpListener, metrics: Arc<Metrics>) -> io::Result<MetricsServer> {
        let addr = listener.local_addr()?;
        let open = Shared::default();
        let thread = {
            let open = Arc::clone(&open);
            std::thread::Builder::new()
                .name("donate-metrics".into())
                .spawn(move || accept(listener, &open, &metrics))?
        };
        Ok(MetricsServer {
            addr,
            open,
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        {
            let mut open = lock(&self.open);
            open.stopping = true;
            // Wakes every connection's thread, blocked reading or writing.
            for stream in open.streams.values() {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, IO_TIMEOUT);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Accepts connections until the server stops, each answered on a thread.
fn accept(listener: TcpListener, open: &Shared, metrics: &Arc<Metrics>) {
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!("metrics accept: {e}");
                // Out of descriptors, say: do not spin.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let id = {
            let mut open = lock(open);
            if open.stopping {
                return;
            }
            if open.streams.len() >= MAX_CONNECTIONS {
                drop(open);
                busy(stream);
                continue;
            }
            let Ok(clone) = stream.try_clone() else {
                continue;
            };
            let id = open.next;
            open.next += 1;
            open.streams.insert(id, clone);
            id
        };
        let (open_, metrics) = (Arc::clone(open), Arc::clone(metrics));
        let spawned = std::thread::Builder::new()
            .name("donate-metrics-conn".into())
            .spawn(move || {
                if let Err(e) = answer(stream, &metrics) {
                    tracing::debug!("metrics request: {e}");
                }
                lock(&open_).streams.remove(&id);
            });
        if let Err(e) = spawned {
            tracing::debug!("metrics connection thread: {e}");
            lock(open).streams.remove(&id);
        }
    }
}

/// Tells a connection over `MAX_CONNECTIONS` to come back later, without
/// waiting on it (best effort: closed with its request unread, it may be
/// reset before the client reads the answer).
fn busy(stream: TcpStream) {
    let _ = stream.set_nonblocking(true);
    let body = "too many metrics connections\n";
    let _ = (&stream).write_all(
        format!(
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: {TEXT}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
}

/// What reading a request head came to.
enum Head {
    Complete(Vec<u8>),
    TooLarge,
    TooSlow,
    Gone,
}

/// Reads one request head, `HEAD_DEADLINE` for all of it.
fn read_head(stream: &mut TcpStream) -> io::Result<Head> {
    let deadline = Instant::now() + HEAD_DEADLINE;
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(Head::Complete(head));
        }
        if head.len() > MAX_HEAD {
            return Ok(Head::TooLarge);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Head::TooSlow);
        }
        stream.set_read_timeout(Some(left))?;
        let n = match stream.read(&mut buf) {
            Ok(0) => return Ok(Head::Gone),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(Head::TooSlow)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        head.extend_from_slice(&buf[..n]);
    }
}

/// Reads one request head and answers it.
fn answer(mut stream: TcpStream, metrics: &Metrics) -> io::Result<()> {
    let (status, content_type, body) = match read_head(&mut stream)? {
        Head::Complete(head) => route(&head, metrics),
        Head::TooLarge => (431, TEXT, "request head too large\n".to_owned()),
        Head::TooSlow => (408, TEXT, "request head too slow\n".to_owned()),
        Head::Gone => return Ok(()),
    };
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Bad Request",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    // `IO_TIMEOUT` for the whole answer, however slowly it is taken.
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut rest = response.as_bytes();
    while !rest.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        stream.set_write_timeout(Some(left))?;
        match stream.write(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

const TEXT: &str = "text/plain; charset=utf-8";
/// What prometheus-client writes: OpenMetrics 1.0 text (Prometheus reads it).
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The status, content type and body for a request head.
fn route(head: &[u8], metrics: &Metrics) -> (u16, &'static str, String) {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_ascii_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return (400, TEXT, "bad request line\n".to_owned());
    };
    if !version.starts_with("HTTP/1.") {
        return (400, TEXT, "HTTP/1.x only\n".to_owned());
    }
    let path = target.split('?').next().unwrap_or_default();
    match (method, path) {
        ("GET", "/metrics") => (200, OPENMETRICS, metrics.encode()),
        ("GET", "/healthz") => match metrics.healthy() {
            Ok(()) => (200, TEXT, "ok\n".to_owned()),
            Err(why) => (503, TEXT, format!("{why}\n")),
        },
        (_, "/metrics" | "/healthz") => (405, TEXT, "GET only\n".to_owned()),
        _ => (404, TEXT, "/metrics and /healthz only\n".to_owned()),
    }
}
