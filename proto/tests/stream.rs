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

/// A streaming client that never reads, in the simulated network: however
/// many partials its job makes, the node holds at most `max_outbound` plus
/// one partial frame for it. Its job then streams no more, and once the
/// client reads it gets a prefix of the output and the whole result.
#[test]
fn a_client_that_does_not_read_holds_at_most_max_outbound_of_partials() {
    use donate_proto::sim::Sim;
    let config = ServerConfig::default()
        .mode(Mode::LocalLm)
        .max_outbound(4096);
    let mut sim = Sim::stub(config.clone());
    sim.node = node(config);
    sim.hold_jobs = true;
    let raw = sim.raw();
    let job_id = "j".repeat(256);
    sim.write(
        raw,
        &[
            frame(r#"{"v":1,"type":"hello","mode":"local_lm","role":"client","capabilities":["stream"]}"#),
            frame(&format!(
                r#"{{"v":1,"type":"prompt","job_id":"{job_id}","prompt":"hi"}}"#
            )),
        ]
        .concat(),
    );
    sim.set_reading(raw, false);
    sim.run();
    let job = sim.held_jobs.remove(0);
    let conn = sim.conn(raw);
    let one = donate_proto::Message::PromptPartial(donate_proto::message::PromptPartial {
        job_id: job_id.clone(),
        text: "tok ".into(),
    })
    .to_json()
    .len()
        + donate_proto::frame::HEADER_LEN;
    let (mut sent, mut peak) = (0, 0);
    for _ in 0..10_000 {
        sent += usize::from(sim.node.partial(job.id, Partial::Text("tok "), sim.now()));
        sim.run();
        peak = peak.max(sim.node.connection(conn).unwrap().pending_transmit());
    }
    assert!(
        peak <= 4096 + one,
        "{peak} bytes held for a client that does not read ({sent} partials queued)"
    );
    assert!(sent > 0 && sent < 100, "{sent} partials queued");
    assert!(!sim.node.wants_partials(job.id), "streaming stopped");
    assert!(
        !sim.node.is_closing(conn),
        "closed only by the backpressure timer"
    );

    // The client reads again: later partials stay dropped (no gap), the
    // result comes with the whole output.
    sim.set_reading(raw, true);
    sim.run();
    assert!(!sim.node.partial(job.id, Partial::Text("tok "), sim.now()));
    let text = "tok ".repeat(10_000);
    sim.complete(job, Ok(donate_proto::JobOutput::Prompt(text.clone())));
    sim.run();
    let frames = sim.frames(raw);
    let partials: Vec<_> = frames
        .iter()
        .filter(|f| f.contains(r#""type":"prompt_partial""#))
        .collect();
    assert_eq!(partials.len(), sent);
    let last = frames.last().unwrap();
    assert!(
        last.starts_with(r#"{"v":1,"type":"prompt_result""#) && last.contains(&text),
        "{last:.200}"
    );
}

/// The limit is on the connection, not the job: a second job of a client
/// that caught up streams again.
#[test]
fn a_stopped_stream_does_not_stop_the_next_job() {
    let now = start();
    let mut node = node(ServerConfig::default().max_outbound(1000));
    let (conn, job) = running(&mut node, r#","capabilities":["stream"]"#, now);
    sent(&mut node, conn);
    let piece = "x".repeat(600);
    assert!(node.partial(job, Partial::Text(&piece), now));
    assert!(
        node.partial(job, Partial::Text(&piece), now),
        "under the limit when queued"
    );
    assert!(!node.partial(job, Partial::Text("y"), now), "over it");
    sent(&mut node, conn);
    assert!(
        !node.partial(job, Partial::Text("y"), now),
        "stopped for good"
    );
    node.complete(job, Ok(donate_proto::JobOutput::Prompt("z".into())), now);
    sent(&mut node, conn);
    let input = frame(r#"{"v":1,"type":"prompt","job_id":"p2","prompt":"hi"}"#);
    node.handle_input(conn, &input, now);
    while node.poll_event().is_some() {}
    let next = node.next_job().expect("queued");
    assert!(node.wants_partials(next.id));
    assert!(node.partial(next.id, Partial::Text("y"), now));
}
