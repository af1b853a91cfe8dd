//! The sans-IO core driven by hand, over a child process's stdin and stdout:
//! the proof that [`donate_proto::Node`] needs no socket. `cargo run --example
//! stdio_node` starts itself again with `--node` as the child, then pushes a
//! model and runs a job over the pipe pair with a hand-driven
//! [`ClientConnection`].
//!
//! The node's call order, as any driver (thread, task, pipe) uses it:
//! 1. `accept(now)` once per byte stream: its `hello` is queued at once;
//! 2. `handle_input(conn, bytes, now)` with whatever arrived;
//! 3. `poll_event()` until `None`, acting on each (`Mount`: load it and hand
//!    the outcome to `mount_done`; `Upload`: hash/spool it and hand it to
//!    `upload_work_done`; `JobQueued`: `next_job()`, run it, `complete(...)`;
//!    `Wake`/`Resume`: there is output, or input is wanted again);
//! 4. `poll_transmit(conn, &mut out)`, which *appends* to `out`: write it all;
//! 5. `poll_timeout()`: when that time comes with no input, `handle_timeout(now)`.
//!
//! A real host runs jobs on worker threads; here they run inline.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

use donate_proto::{
    run_job, run_mount, run_upload, Answer, ClientConnection, Event, Node, ServerConfig, Stub,
};

/// The child: one connection whose bytes are stdin and stdout.
fn node() {
    let executor = Stub::default();
    let mut node = Node::new(ServerConfig::default());
    let (mut stdin, mut stdout) = (std::io::stdin().lock(), std::io::stdout().lock());
    let conn = node.accept(Instant::now()); // 1.
    let (mut buf, mut out) = (vec![0; 64 * 1024], Vec::new());
    loop {
        // 3. Events first: mounts and jobs may have queued answers.
        while let Some(event) = node.poll_event() {
            match event {
                Event::Mount(mount) => node.mount_done(run_mount(&executor, mount), Instant::now()),
                Event::Upload(mut work) => {
                    run_upload(&executor, &mut work);
                    node.upload_work_done(work, Instant::now());
                }
                Event::JobQueued => {
                    while let Some(job) = node.next_job() {
                        node.complete(job.id, run_job(&executor, &job), Instant::now());
                    }
                }
                Event::Wake(_) | Event::Resume(_) => {} // output is written below
                _ => {} // extensions this node does not offer (Node::offer)
            }
        }
        node.poll_transmit(conn, &mut out); // 4.
        stdout
            .write_all(&out)
            .and_then(|()| stdout.flush())
            .unwrap();
        out.clear();
        if node.is_closing(conn) {
            return;
        }
        // 5. A blocking read cannot wait for a deadline; a real driver sleeps
        // until poll_timeout() instead. Here, only late timeouts are acted on.
        if node.poll_timeout().is_some_and(|t| t <= Instant::now()) {
            node.handle_timeout(Instant::now());
        }
        match stdin.read(&mut buf) {
            Ok(0) | Err(_) => return, // the parent is gone
            Ok(n) => node.handle_input(conn, &buf[..n], Instant::now()), // 2.
        }
    }
}

/// The parent: a client core over the child's pipes.
fn parent() {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .arg("--node")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut to_node, mut from_node) = (child.stdin.take().unwrap(), child.stdout.take().unwrap());
    let mut client = ClientConnection::default();
    let (mut buf, mut out) = (vec![0; 64 * 1024], Vec::new());
    // Reads until the client core has `want`, sending what it queued first.
    let mut exchange = |client: &mut ClientConnection,
                        want: &dyn Fn(&mut ClientConnection) -> bool| {
        while !want(client) {
            client.poll_transmit(&mut out);
            to_node.write_all(&out).unwrap();
            out.clear();
            let n = from_node.read(&mut buf).unwrap();
            assert!(n > 0, "the node closed the pipe");
            client.handle_input(&buf[..n]).unwrap();
        }
    };
    exchange(&mut client, &|c| c.server_hello().is_some());
    let upload = client.begin_upload("{}", 4, None).unwrap();
    client.upload_chunk(&[1, 2, 3, 4]).unwrap();
    exchange(&mut client, &|c| {
        !c.is_pending(upload) || c.outstanding() == 0
    });
    let job = client.infer(&[9, 9], 3).unwrap();
    exchange(&mut client, &|c| c.outstanding() == 0);
    let Some(Answer::Infer(result)) = client.take_answer(job) else {
        panic!("no infer answer");
    };
    println!("output_ids over stdin/stdout: {:?}", result.output_ids);
    assert_eq!(result.output_ids, [9, 9, 1, 2, 3]);
    drop(to_node); // end of input: the node returns
    assert!(child.wait().unwrap().success());
}

// `pub` so that tests/examples.rs can run this example as a test.
pub fn main() {
    if std::env::args().any(|arg| arg == "--node") {
        node();
    } else {
        parent();
    }
}
