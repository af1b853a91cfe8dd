//! Partial results at the core (docs/PROTOCOL.md §10.8): only to a
//! connection that agreed `stream`, only while its job runs, and bounded by
//! the connection's `max_outbound` like results.

use std::time::{Duration, Instant};

use donate_proto::{
    Capabilities, Capability, ConnectionId, Event, Mode, Node, Partial, ServerConfig,
};

/// The one base instant; the core is handed time, never reads the clock.
#[allow(clippy::disallowed_methods)]
fn start() -> Instant {
    Instant::now()
}

fn frame(json: &str) -> Vec<u8> {
    let mut out = Vec::new();
    donate_proto::frame::encode_frame(json.as_bytes(), &mut out);
    out
}

fn node(config: ServerConfig) -> Node<()> {
    Node::new(config.mode(Mode::LocalLm)).offer(
        Capabilities::NONE
            .with(Capability::Stream)
            .with(Capability::Sampling),
    )
}

/// A connection whose client hello names `caps`, with a prompt job running.
fn running(node: &mut Node<()>, caps: &str, now: Instant) -> (ConnectionId, donate_proto::JobId) {
    let conn = node.accept(now);
    let mut hello = Vec::new();
    node.poll_transmit(conn, &mut hello);
    let input = [
        frame(&format!(
            r#"{{"v":1,"type":"hello","mode":"local_lm","role":"client"{caps}}}"#
        )),
        frame(r#"{"v":1,"type":"prompt","job_id":"p1","prompt":"hi"}"#),
    ]
    .concat();
    node.handle_input(conn, &input, now);
    while node.poll_event().is_some() {}
    let job = node.next_job().expect("queued");
    (conn, job.id)
}

fn sent(node: &mut Node<()>, conn: ConnectionId) -> String {
    let mut out = Vec::new();
    node.poll_transmit(conn, &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn partials_go_only_to_a_connection_that_agreed_stream() {
    let now = start();
    let mut node = node(ServerConfig::default());
    let (v1, v1_job) = running(&mut node, "", now);
    let (streaming, job) = running(&mut node, r#","capabilities":["stream"]"#, now);
    assert!(!node.wants_partials(v1_job));
    assert!(node.wants_partials(job));
    assert!(!node.partial(v1_job, Partial::Text("x"), now));
    assert!(sent(&mut node, v1).is_empty());
    assert!(node.partial(job, Partial::Text("Hé"), now));
    assert!(matches!(node.poll_event(), Some(Event::Wake(c)) if c == streaming));
    assert!(
        !node.partial(job, Partial::Tokens(&[1]), now),
        "the wrong kind for a prompt"
    );
    assert!(!node.partial(job, Partial::Text(""), now), "nothing new");
    assert!(sent(&mut node, streaming)
        .ends_with(r#"{"v":1,"type":"prompt_partial","job_id":"p1","text":"Hé"}"#));
    node.complete(job, Ok(donate_proto::JobOutput::Prompt("Hé".into())), now);
    assert!(!node.wants_partials(job), "finished");
    assert!(!node.partial(job, Partial::Text("late"), now));
}

#[test]
fn partials_count_against_max_outbound() {
    let now = start();
    let config = ServerConfig::default()
        .max_outbound(4096)
        .backpressure_timeout(Duration::from_secs(5));
    let mut node = node(config);
    let (conn, job) = running(&mut node, r#","capabilities":["stream"]"#, now);
    sent(&mut node, conn);
    let piece = "x".repeat(1000);
    for _ in 0..5 {
        node.partial(job, Partial::Text(&piece), now);
    }
    assert!(
        !node.wants_read(conn),
        "over the limit: the node stops reading"
    );
    // A client that never reads is closed by the backpressure timer, and then
    // nothing more is queued for it.
    node.handle_timeout(now + Duration::from_secs(6));
    assert!(node.is_closing(conn));
    assert!(!node.wants_partials(job));
    assert!(!node.partial(job, Partial::Text(&piece), now));
    let pending = node.connection(conn).unwrap().pending_transmit();
    assert!(
        pending < 4096,
        "{pending} bytes kept for a peer that is not reading"
    );
}
