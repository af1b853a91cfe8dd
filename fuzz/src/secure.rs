//! `secure`: arbitrary bytes on a secure node's byte path, before and after
//! a real handshake (docs/PROTOCOL.md, `secure`).
//!
//! Input layout: one byte picks the case and the delivery (`mode % 3`, then
//! `mode / 3` as the piece size, 0 = all at once), then the bytes:
//!
//! - 0, pre-handshake: the bytes go to a fresh secure node as the client's
//!   first words (a plain v1 peer, a broken `noise` frame, a broken message 3…);
//! - 1, post-handshake raw: a real client completes the handshake, then the
//!   bytes go to the node as records;
//! - 2, post-handshake altered: a real client sends an `infer` of the bytes,
//!   and the first two bytes pick one bit of its records to flip (0xffff: none).
//!
//! Asserted: no panic; the node's memory for the connection stays within two
//! records' worth; before the handshake the node transmits only whole plain
//! frames that parse (its `hello`, then at most one `error`, the last);
//! whatever fails closes the connection; an unaltered request is answered and
//! an altered one closes the connection with `decrypt_failed` or is answered
//! (a flip in a record header that leaves it a valid record cannot be told apart).

use std::time::Instant;

use base64::Engine as _;
use donate_proto::frame::FrameDecoder;
use donate_proto::{
    run_job, run_mount, ClientConfig, ClientConnection, ClientEvent, ConnectionId, Event, Keypair,
    Message, Node, NodeTrust, SecureClientConfig, SecureServerConfig, ServerConfig, Stub,
};

/// A fixed key pair, so that runs repeat.
fn key(byte: u8) -> Keypair {
    let text = format!(
        "donate-x25519-secret {}",
        base64::engine::general_purpose::STANDARD.encode([byte; 32])
    );
    Keypair::from_secret_text(&text).expect("a valid key")
}

/// Largest a connection's buffers may grow: two records, and slack.
const MEMORY_BOUND: usize = 2 * 65_540 + 64 * 1024;

struct Harness {
    node: Node<()>,
    conn: ConnectionId,
    now: Instant,
    /// Everything the node transmitted.
    sent: Vec<u8>,
}

impl Harness {
    fn new() -> Harness {
        let client = key(2);
        let secure = SecureServerConfig::with_keys(key(1), vec![*client.public()]);
        let mut node = Node::new(ServerConfig::default()).with_secure(secure);
        let now = Instant::now();
        let conn = node.accept(now);
        Harness {
            node,
            conn,
            now,
            sent: Vec::new(),
        }
    }

    /// Feeds `data` in pieces of `step` bytes (0: at once), running the node's work.
    fn feed(&mut self, data: &[u8], step: usize) {
        let step = if step == 0 { data.len().max(1) } else { step };
        for piece in data.chunks(step) {
            if self.node.is_closing(self.conn) {
                break;
            }
            self.node.handle_input(self.conn, piece, self.now);
            self.work();
            let allocated = self.node.connection(self.conn).map_or(0, |c| c.allocated());
            assert!(allocated <= MEMORY_BOUND, "{allocated} bytes held");
        }
        self.work();
    }

    fn work(&mut self) {
        let stub = Stub::default();
        loop {
            let mut busy = false;
            while let Some(event) = self.node.poll_event() {
                if let Event::Mount(mount) = event {
                    self.node.mount_done(run_mount(&stub, mount), self.now);
                    busy = true;
                }
            }
            while let Some(job) = self.node.next_job() {
                let outcome = run_job(&stub, &job);
                self.node.complete(job.id, outcome, self.now);
                busy = true;
            }
            if !busy {
                break;
            }
        }
        self.node.poll_transmit(self.conn, &mut self.sent);
    }

    /// A real client's handshake; returns the client, connected.
    fn handshake(&mut self) -> ClientConnection {
        let mut client = ClientConnection::secure(
            ClientConfig::default(),
            SecureClientConfig {
                keypair: key(2),
                trust: NodeTrust::pin(&key(1).public().fingerprint()).expect("a fingerprint"),
            },
        );
        for _ in 0..4 {
            self.work();
            client
                .handle_input(&std::mem::take(&mut self.sent))
                .expect("the handshake completes");
            let mut out = Vec::new();
            client.poll_transmit(&mut out);
            self.node.handle_input(self.conn, &out, self.now);
        }
        assert!(matches!(
            client.poll_event(),
            Some(ClientEvent::Connected(_))
        ));
        assert!(self
            .node
            .connection(self.conn)
            .and_then(|c| c.peer_key())
            .is_some());
        assert!(!self.node.is_closing(self.conn));
        client
    }
}

/// Runs the `secure` target on `data`.
pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(mode / 3);
    let mut h = Harness::new();
    match mode % 3 {
        0 => {
            h.feed(rest, step);
            // Before the handshake: the plain hello, at most one handshake
            // record (message 2), and at most one plain `error`, last.
            let mut frames = Vec::new();
            FrameDecoder::new(1 << 20)
                .feed(&h.sent, |body| {
                    frames.push(Message::parse(body).map(|m| m.kind().to_owned()).ok())
                })
                .expect("whole frames");
            assert_eq!(
                frames.first(),
                Some(&Some("hello".to_owned())),
                "{frames:?}"
            );
            let rest = &frames[1..];
            assert!(
                rest.iter().filter(|f| f.is_none()).count() <= 1,
                "{frames:?}"
            );
            let errors: Vec<usize> = (0..rest.len())
                .filter(|&i| rest[i].as_deref() == Some("error"))
                .collect();
            assert!(
                rest.iter()
                    .all(|f| f.as_deref().is_none_or(|k| k == "error")),
                "{frames:?}"
            );
            assert!(
                errors.len() <= 1 && errors.iter().all(|&i| i == rest.len() - 1),
                "{frames:?}"
            );
            assert_eq!(errors.len() == 1, h.node.is_closing(h.conn), "{frames:?}");
        }
        1 => {
            let _client = h.handshake();
            h.feed(rest, step);
        }
        _ => {
            let mut client = h.handshake();
            let (flip, ids) = match rest {
                [a, b, ids @ ..] => (u16::from_le_bytes([*a, *b]), ids),
                _ => (u16::MAX, rest),
            };
            let ids: Vec<i32> = ids.iter().map(|&b| i32::from(b)).collect();
            let request = client.infer(&ids, 2).expect("connected");
            let mut records = Vec::new();
            client.poll_transmit(&mut records);
            let flipped = flip != u16::MAX && usize::from(flip / 8) < records.len();
            if flipped {
                records[usize::from(flip / 8)] ^= 1 << (flip % 8);
            }
            h.feed(&records, step);
            let answered =
                client.handle_input(&h.sent).is_ok() && client.take_answer(request).is_some();
            if !flipped {
                assert!(answered, "an unaltered request is answered");
            } else if !answered {
                // Altered: the node noticed (or still waits for the rest of a record
                // whose header the flip lengthened).
                let conn = h.node.connection(h.conn).expect("not removed");
                if h.node.is_closing(h.conn) {
                    let reason = conn.closing().map(|e| e.code()).unwrap_or_default();
                    assert!(reason == "decrypt_failed", "{reason}");
                }
            }
        }
    }
}
