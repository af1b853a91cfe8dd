//! [`MetricsServer`]: `GET /metrics` and `GET /healthz` over plain HTTP/1.x.
//!
//! Hand-rolled rather than an HTTP crate: it answers exactly two paths to a
//! scraper on loopback, one request per connection, so the whole server is a
//! bounded read of one request head, a status line and a body. A server crate
//! (hyper, tiny_http) would bring a runtime or a thread pool and a parser
//! surface for features nobody here uses. One thread serves connections one
//! at a time; each gets `IO_TIMEOUT` to send its request and read the answer,
//! and a request head over `MAX_HEAD` bytes is refused, so a slow or hostile
//! peer costs at most one bounded wait and no memory.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::Metrics;

/// Longest request head accepted.
const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request, and to take the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// A running `/metrics` + `/healthz` responder; stops when dropped.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Serves `metrics` on `listener` from a thread of its own.
    pub fn start(listener: TcpListener, metrics: Arc<Metrics>) -> io::Result<MetricsServer> {
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("donate-metrics".into())
                .spawn(move || {
                    for stream in listener.incoming() {
                        if stop.load(Ordering::Acquire) {
                            return;
                        }
                        if let Ok(stream) = stream {
                            if let Err(e) = answer(stream, &metrics) {
                                tracing::debug!("metrics request: {e}");
                            }
                        }
                    }
                })?
        };
        Ok(MetricsServer {
            addr,
            stop,
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
        self.stop.store(true, Ordering::Release);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, IO_TIMEOUT);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads one request head and answers it.
fn answer(mut stream: TcpStream, metrics: &Metrics) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let complete = loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            break true;
        }
        if head.len() > MAX_HEAD {
            break false;
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(()); // gone before a whole head
        }
        head.extend_from_slice(&buf[..n]);
    };
    let (status, content_type, body) = if !complete {
        (431, TEXT, "request head too large\n".to_owned())
    } else {
        route(&head, metrics)
    };
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Bad Request",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())?;
    stream.flush()
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
