//! Regression tests for what the fuzz targets in `fuzz/` found (see `fuzz/README.md`).
//! Each test replays a minimized crash as plain calls on the core, on stable.

use std::time::{Duration, Instant};

use donate_proto::frame::FrameDecoder;
use donate_proto::message::{Infer, ModelBegin};
use donate_proto::{
    run_mount, ApiMisuse, ClientConnection, ClientError, ConnectionId, Event, Message, Mount, Node,
    ProtocolError, ServerConfig, Stub,
};

/// The one place these tests read the clock.
#[allow(clippy::disallowed_methods)]
fn base_instant() -> Instant {
    Instant::now()
}

/// Every frame the node has for `conn`, as parsed messages.
fn transmitted(node: &mut Node<()>, conn: ConnectionId) -> Vec<Message<'static>> {
    let mut out = Vec::new();
    node.poll_transmit(conn, &mut out);
    let mut decoder = FrameDecoder::new(1 << 20);
    let mut msgs = Vec::new();
    decoder
        .feed(&out, |body| {
            msgs.push(
                Message::parse(body)
                    .expect("node frames parse")
                    .into_owned(),
            )
        })
        .expect("node frames are well framed");
    assert!(!decoder.has_partial(), "node sent part of a frame");
    msgs
}

/// A 4-byte upload, committed: the node then has a mount waiting.
fn upload_bytes() -> Vec<u8> {
    let mut wire = Vec::new();
    Message::ModelBegin(ModelBegin {
        config_json: r#"{"ok":true}"#.to_owned(),
        weights_len: 4,
        ..ModelBegin::default()
    })
    .encode(&mut wire);
    donate_proto::message::encode_weights_chunk(0, true, &[1, 2, 3, 4], &mut wire);
    Message::ModelCommit.encode(&mut wire);
    wire
}

fn take_mount(node: &mut Node<()>) -> Mount {
    std::iter::from_fn(|| node.poll_event())
        .find_map(|e| match e {
            Event::Mount(m) => Some(m),
            _ => None,
        })
        .expect("the commit asks for a mount")
}

/// Fuzz target `server` (seed `mount-after-stall`): a mount that finished after its
/// connection had closed on a timer still queued `model_status` behind the closing
/// error, so the error was not the last frame and a frame went out unasked.
#[test]
fn mount_finishing_after_a_timeout_close_sends_nothing() {
    let now = base_instant();
    let config = ServerConfig::default().stall_timeout(Duration::from_millis(10));
    let mut node: Node<()> = Node::new(config);
    let conn = node.accept(now);
    let mut wire = upload_bytes();
    wire.extend_from_slice(&[9, 0]); // half a frame header: the stall timer runs
    node.handle_input(conn, &wire, now);
    let mount = take_mount(&mut node);

    node.handle_timeout(now + Duration::from_millis(20));
    assert_eq!(
        node.connection(conn).and_then(|c| c.closing()),
        Some(&ProtocolError::Stalled)
    );
    node.mount_done(run_mount(&Stub::default(), mount), now);

    let msgs = transmitted(&mut node, conn);
    assert!(matches!(msgs.first(), Some(Message::Hello(_))), "{msgs:?}");
    match msgs.last() {
        Some(Message::Error(e)) => assert_eq!(e.code, "stalled", "{msgs:?}"),
        other => panic!("last frame is not the closing error: {other:?} in {msgs:?}"),
    }
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert_eq!(node.connection(conn).map(|c| c.pending_transmit()), Some(0));
}

/// Fuzz target `server` (seed `mount-after-peer-closed`): after the peer closed its
/// side, answers already queued still go out but later ones are dropped; a mount
/// finishing later still queued its `model_status`.
#[test]
fn mount_finishing_after_the_peer_closed_sends_nothing() {
    let now = base_instant();
    let mut node: Node<()> = Node::new(ServerConfig::default());
    let conn = node.accept(now);
    let mut wire = upload_bytes();
    Message::Infer(Infer {
        job_id: "j1".to_owned(),
        input_ids: vec![1],
        max_tokens: 1,
        deadline_ms: 0,
        sampling: Default::default(),
    })
    .encode(&mut wire);
    node.handle_input(conn, &wire, now); // the infer waits for the mount
    let mount = take_mount(&mut node);

    node.peer_closed(conn);
    node.mount_done(run_mount(&Stub::default(), mount), now);

    let msgs = transmitted(&mut node, conn);
    let kinds: Vec<_> = msgs.iter().map(Message::kind).collect();
    // Neither the model_status nor the waiting job's answer follows the close.
    assert_eq!(kinds, ["hello"], "{msgs:?}");
    assert!(node.is_closing(conn));
    assert!(!node.connection(conn).is_some_and(|c| c.has_model()));
}

/// Fuzz target `client` (seed `huge-upload`): `begin_upload` cast a `weights_len`
/// above `i64::MAX` with `as`, announcing a negative length on the wire.
#[test]
fn an_upload_too_large_to_announce_is_refused_before_anything_is_sent() {
    let now = base_instant();
    let mut node: Node<()> = Node::new(ServerConfig::default());
    let conn = node.accept(now);
    let mut hello = Vec::new();
    node.poll_transmit(conn, &mut hello);
    let mut client = ClientConnection::default();
    client.handle_input(&hello).expect("the server hello");
    let mut sent = Vec::new();
    client.poll_transmit(&mut sent); // the client's own hello

    for len in [u64::MAX, i64::MAX as u64 + 1] {
        assert_eq!(
            client.begin_upload("{}", len, None),
            Err(ClientError::Misuse(ApiMisuse::UploadTooLarge(len)))
        );
    }
    assert!(!client.is_uploading());
    assert_eq!(client.outstanding(), 0);
    assert_eq!(client.pending_transmit(), 0, "nothing goes on the wire");

    // The largest length that can be announced goes out as it is.
    client
        .begin_upload("{}", i64::MAX as u64, None)
        .expect("announceable");
    let mut out = Vec::new();
    client.poll_transmit(&mut out);
    let body = &out[4..];
    match Message::parse(body) {
        Ok(Message::ModelBegin(begin)) => assert_eq!(begin.weights_len, i64::MAX),
        other => panic!("{other:?}"),
    }
}
