//! Child processes: spawned with piped stdio in a process group of their own,
//! killed with everything they started, and read by threads with bounded
//! buffers so that no child can block the node or exhaust its memory.

use std::io::{self, BufRead, BufReader, ErrorKind, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// A command for `argv` (never through a shell) with stdin, stdout and stderr piped.
///
/// On Unix the child leads a new process group: a Ctrl-C meant for the node
/// does not reach it (the node shuts down gracefully and stops it itself), and
/// [`kill`] can end whatever it started.
pub(crate) fn command(argv: &[String]) -> Command {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    cmd
}

/// Kills `child` and its process group, and reaps it.
pub(crate) fn kill(child: &mut Child) {
    #[cfg(unix)]
    if let Ok(pgid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) has no memory-safety preconditions. The group id is
        // the child's pid, which stays reserved while the child is unreaped.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// `after` from now; a century from now if that is too far to represent.
pub(crate) fn deadline(after: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(after)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// Waits up to `limit` for `child` to exit; `None` if it is still running.
pub(crate) fn wait_for(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = deadline(limit);
    let mut pause = Duration::from_micros(200);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => {
                thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            _ => return None,
        }
    }
}

/// What a line reader hands over.
#[derive(Debug)]
pub(crate) enum Line {
    /// One line, without its `\n`.
    Text(Vec<u8>),
    /// A line grew past the limit; nothing more is read.
    TooLong,
    /// End of stream (a partial last line is dropped).
    Eof,
    /// Reading failed; nothing more is read.
    Failed(io::Error),
}

/// Reads `input` line by line on a thread named `name`, each line at most
/// `max_line` bytes, and sends the lines to the returned channel. Stops at the
/// first line over the limit, at the end, or when the receiver is dropped.
pub(crate) fn line_reader(
    name: String,
    input: impl Read + Send + 'static,
    max_line: usize,
) -> io::Result<mpsc::Receiver<Line>> {
    let (tx, rx) = mpsc::channel();
    thread::Builder::new().name(name).spawn(move || {
        let mut reader = BufReader::with_capacity(64 * 1024, input);
        let mut line = Vec::new();
        loop {
            let buf = match reader.fill_buf() {
                Ok([]) => {
                    let _ = tx.send(Line::Eof);
                    return;
                }
                Ok(buf) => buf,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = tx.send(Line::Failed(e));
                    return;
                }
            };
            let (take, complete) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (i, true),
                None => (buf.len(), false),
            };
            if line.len() + take > max_line {
                let _ = tx.send(Line::TooLong);
                return;
            }
            line.extend_from_slice(&buf[..take]);
            reader.consume(take + usize::from(complete));
            if complete && tx.send(Line::Text(std::mem::take(&mut line))).is_err() {
                return;
            }
        }
    })?;
    Ok(rx)
}

/// Longest stderr line logged; the rest of a longer line is cut.
const MAX_LOG_LINE: usize = 4096;

/// Logs every line of a worker's stderr, prefixed with `prefix`, on a thread,
/// until the stream ends. Returns the last line logged so far (empty before
/// the first), for an error that names why a worker died.
pub(crate) fn log_stderr(
    thread_name: String,
    prefix: String,
    stderr: impl Read + Send + 'static,
) -> io::Result<Arc<Mutex<String>>> {
    let last = Arc::new(Mutex::new(String::new()));
    let keep = Arc::clone(&last);
    let log_line = move |prefix: &str, line: &[u8], cut: bool| {
        log_line(prefix, line, cut);
        if let Ok(mut last) = keep.lock() {
            *last = String::from_utf8_lossy(line).trim_end().to_owned();
        }
    };
    thread::Builder::new().name(thread_name).spawn(move || {
        let mut reader = BufReader::with_capacity(16 * 1024, stderr);
        let mut line = Vec::new();
        let mut cut = false;
        loop {
            let buf = match reader.fill_buf() {
                Ok(buf) => buf,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => &[],
            };
            if buf.is_empty() {
                if !line.is_empty() {
                    log_line(&prefix, &line, cut);
                }
                return;
            }
            let (take, complete) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (i, true),
                None => (buf.len(), false),
            };
            let room = MAX_LOG_LINE.saturating_sub(line.len());
            cut |= take > room;
            line.extend_from_slice(&buf[..take.min(room)]);
            reader.consume(take + usize::from(complete));
            if complete {
                log_line(&prefix, &line, cut);
                line.clear();
                cut = false;
            }
        }
    })?;
    Ok(last)
}

fn log_line(prefix: &str, line: &[u8], cut: bool) {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end_matches('\r');
    let more = if cut { " […]" } else { "" };
    tracing::info!(target: "donate_exec::stderr", "{prefix}: {text}{more}");
}

/// Keeps the last `keep` bytes of a stream, read to its end on a thread, and
/// sends them when the stream ends.
pub(crate) fn tail_reader(
    name: String,
    mut input: impl Read + Send + 'static,
    keep: usize,
    done: impl FnOnce(Vec<u8>) + Send + 'static,
) -> io::Result<()> {
    thread::Builder::new().name(name).spawn(move || {
        let mut tail = Vec::new();
        let mut buf = vec![0; 16 * 1024];
        loop {
            match input.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    tail.extend_from_slice(&buf[..n]);
                    if tail.len() > keep {
                        tail.drain(..tail.len() - keep);
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        done(tail);
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &'static [u8], max: usize) -> Vec<String> {
        let rx = line_reader("t".into(), input, max).unwrap();
        rx.iter()
            .map(|line| match line {
                Line::Text(l) => String::from_utf8(l).unwrap(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn lines_are_split_and_bounded() {
        assert_eq!(lines(b"a\nbc\n\nd", 10), ["a", "bc", "", "Eof"]);
        assert_eq!(lines(b"0123456789\n", 10), ["0123456789", "Eof"]);
        assert_eq!(lines(b"ok\n0123456789a\nnever\n", 10), ["ok", "TooLong"]);
        assert_eq!(lines(b"", 10), ["Eof"]);
    }

    #[test]
    fn tail_keeps_the_end() {
        let (tx, rx) = mpsc::channel();
        let input: &'static [u8] = b"0123456789";
        tail_reader("t".into(), input, 4, move |tail| tx.send(tail).unwrap()).unwrap();
        assert_eq!(rx.recv().unwrap(), b"6789");
    }
}
