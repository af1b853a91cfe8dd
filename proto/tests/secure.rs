//! Secure mode in the core: a secure client and node wired in memory, and
//! what plain-text peers (ours and the Go client's exact bytes) see.

use std::time::Instant;

use donate_proto::frame::FrameDecoder;
use donate_proto::{
    run_job, run_mount, Answer, ClientConfig, ClientConnection, ClientError, ClientEvent,
    ConnectionId, Event, Keypair, Node, NodeTrust, SecureClientConfig, SecureServerConfig,
    ServerConfig, Stub,
};

struct Pair {
    node: Node<()>,
    conn: ConnectionId,
    client: ClientConnection,
    now: Instant,
    /// Bytes per delivery (usize::MAX: all at once).
    step: usize,
}

impl Pair {
    fn new(node: Node<()>, client: ClientConnection) -> Pair {
        #[allow(clippy::disallowed_methods)] // the one base instant
        let now = Instant::now();
        let mut node = node;
        let conn = node.accept(now);
        Pair {
            node,
            conn,
            client,
            now,
            step: usize::MAX,
        }
    }

    /// Moves bytes both ways and runs the node's work until both are quiet.
    fn run(&mut self) -> Result<(), ClientError> {
        let stub = Stub::default();
        loop {
            let (mut to_client, mut to_node) = (Vec::new(), Vec::new());
            self.node.poll_transmit(self.conn, &mut to_client);
            for piece in to_client.chunks(self.step.max(1)) {
                self.client.handle_input(piece)?;
            }
            self.client.poll_transmit(&mut to_node);
            for piece in to_node.chunks(self.step.max(1)) {
                self.node.handle_input(self.conn, piece, self.now);
            }
            while let Some(event) = self.node.poll_event() {
                if let Event::Mount(mount) = event {
                    self.node.mount_done(run_mount(&stub, mount), self.now);
                }
            }
            while let Some(job) = self.node.next_job() {
                let outcome = run_job(&stub, &job);
                self.node.complete(job.id, outcome, self.now);
            }
            if to_client.is_empty() && to_node.is_empty() {
                return Ok(());
            }
        }
    }
}

fn secure_node(node_key: &Keypair, allowed: &[&Keypair]) -> Node<()> {
    let keys = allowed.iter().map(|k| *k.public()).collect();
    Node::new(ServerConfig::default())
        .with_secure(SecureServerConfig::with_keys(node_key.clone(), keys))
}

fn secure_client(own: &Keypair, trust: NodeTrust) -> ClientConnection {
    ClientConnection::secure(
        ClientConfig::default(),
        SecureClientConfig {
            keypair: own.clone(),
            trust,
        },
    )
}

fn pinned(key: &Keypair) -> NodeTrust {
    NodeTrust::pin(&key.public().to_string()).unwrap()
}

/// Push a 4-byte model and run one job; both must succeed.
fn push_and_infer(pair: &mut Pair) {
    assert!(matches!(
        pair.client.poll_event(),
        Some(ClientEvent::Connected(_))
    ));
    let upload = pair.client.begin_upload(r#"{"ok":true}"#, 4, None).unwrap();
    pair.client.upload_chunk(&[1, 2, 3, 4]).unwrap();
    let job = pair.client.infer(&[9, 9], 3).unwrap();
    pair.run().unwrap();
    assert!(matches!(pair.client.take_answer(upload), Some(Answer::ModelStatus(s)) if s.ok));
    match pair.client.take_answer(job) {
        Some(Answer::Infer(r)) => assert_eq!(r.output_ids, [9, 9, 1, 2, 3]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_secure_client_and_node_authenticate_each_other_and_work() {
    let (node_key, client_key) = (Keypair::generate(), Keypair::generate());
    let mut pair = Pair::new(
        secure_node(&node_key, &[&client_key]),
        secure_client(&client_key, pinned(&node_key)),
    );
    pair.run().unwrap();
    assert_eq!(pair.client.node_key(), Some(node_key.public()));
    let conn = pair.node.connection(pair.conn).unwrap();
    assert_eq!(conn.peer_key(), Some(client_key.public()));
    push_and_infer(&mut pair);
}

#[test]
fn the_handshake_fed_one_byte_at_a_time_completes() {
    let (node_key, client_key) = (Keypair::generate(), Keypair::generate());
    let mut pair = Pair::new(
        secure_node(&node_key, &[&client_key]),
        secure_client(
            &client_key,
            NodeTrust::pin(&node_key.public().fingerprint()).unwrap(),
        ),
    );
    pair.step = 1;
    pair.run().unwrap();
    push_and_infer(&mut pair);
}

#[test]
fn frames_larger_than_a_record_cross_as_several() {
    let (node_key, client_key) = (Keypair::generate(), Keypair::generate());
    let mut pair = Pair::new(
        secure_node(&node_key, &[&client_key]),
        secure_client(&client_key, pinned(&node_key)),
    );
    pair.run().unwrap();
    assert!(matches!(
        pair.client.poll_event(),
        Some(ClientEvent::Connected(_))
    ));
    // 300 KiB chunks: each frame spans six records.
    let weights: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
    let upload = pair
        .client
        .begin_upload(r#"{"ok":true}"#, weights.len() as u64, None)
        .unwrap();
    for piece in weights.chunks(300 * 1024) {
        pair.client.upload_chunk(piece).unwrap();
    }
    pair.run().unwrap();
    assert!(matches!(pair.client.take_answer(upload), Some(Answer::ModelStatus(s)) if s.ok));
}

#[test]
fn a_wrong_node_key_stops_the_client_before_it_sends_anything_but_the_handshake() {
    let (node_key, client_key, other) = (
        Keypair::generate(),
        Keypair::generate(),
        Keypair::generate(),
    );
    let mut pair = Pair::new(
        secure_node(&node_key, &[&client_key]),
        secure_client(&client_key, pinned(&other)),
    );
    let err = pair.run().unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "the node presented key {}, expected {}",
            node_key.public().fingerprint(),
            other.public().fingerprint()
        )
    );
    assert_eq!(pair.node.connection(pair.conn).unwrap().peer_key(), None);
}

#[test]
fn an_unknown_client_key_is_refused_with_its_fingerprint() {
    let (node_key, client_key, stranger) = (
        Keypair::generate(),
        Keypair::generate(),
        Keypair::generate(),
    );
    let mut pair = Pair::new(
        secure_node(&node_key, &[&client_key]),
        secure_client(&stranger, pinned(&node_key)),
    );
    pair.run().unwrap();
    let expected = format!(
        "this node does not know your key {}; ask its owner to add it to its authorized keys",
        stranger.public().fingerprint()
    );
    // The handshake itself completed (the node needs the client's key to
    // judge it), then the node refuses, encrypted, and closes.
    assert!(matches!(
        pair.client.poll_event(),
        Some(ClientEvent::Connected(_))
    ));
    match pair.client.poll_event() {
        Some(ClientEvent::Closing(e)) => assert_eq!(e.error, expected),
        other => panic!("{other:?}"),
    }
    assert!(pair.node.is_closing(pair.conn));
}

#[test]
fn a_secure_client_refuses_a_plaintext_node_and_sends_nothing() {
    let client_key = Keypair::generate();
    let mut pair = Pair::new(
        Node::new(ServerConfig::default()),
        secure_client(&client_key, NodeTrust::AnyKey),
    );
    let err = pair.run().unwrap_err();
    assert_eq!(err, ClientError::PlaintextNode);
    let mut sent = Vec::new();
    pair.client.poll_transmit(&mut sent);
    assert!(sent.is_empty(), "{sent:?}");
}

/// What a Go client reads from a secure node: a v1 hello (with a field it
/// ignores), then, after its own hello, one `error` frame; nothing runs.
#[test]
fn a_go_client_gets_one_readable_error_frame_from_a_secure_node() {
    let node_key = Keypair::generate();
    let mut node = secure_node(&node_key, &[]);
    #[allow(clippy::disallowed_methods)]
    let now = Instant::now();
    let conn = node.accept(now);
    let mut from_node = Vec::new();
    node.poll_transmit(conn, &mut from_node);
    let mut go_client = Vec::new();
    for body in [
        r#"{"v":1,"type":"hello","mode":"model_push","role":"client"}"#,
        r#"{"v":1,"type":"model_begin","config_json":"{\"ok\":true}","weights_len":4}"#,
    ] {
        go_client.extend((body.len() as u32).to_le_bytes());
        go_client.extend(body.as_bytes());
    }
    node.handle_input(conn, &go_client, now);
    node.poll_transmit(conn, &mut from_node);
    let mut frames = Vec::new();
    FrameDecoder::new(1 << 20)
        .feed(&from_node, |body| {
            frames.push(String::from_utf8(body.to_vec()).unwrap())
        })
        .unwrap();
    assert_eq!(
        frames,
        [
            r#"{"v":1,"type":"hello","mode":"model_push","role":"server","queue_capacity":64,"capabilities":["secure"]}"#,
            r#"{"code":"secure_required","error":"this node requires an encrypted connection (donate secure mode)","type":"error","v":1}"#,
        ]
    );
    assert!(node.is_closing(conn));
    assert!(node.poll_event().is_none(), "nothing reached the executor");
}

#[test]
fn a_hello_altered_in_transit_fails_the_handshake() {
    let (node_key, client_key) = (Keypair::generate(), Keypair::generate());
    let mut pair = Pair::new(
        secure_node(&node_key, &[&client_key]),
        secure_client(&client_key, pinned(&node_key)),
    );
    let mut hello = Vec::new();
    pair.node.poll_transmit(pair.conn, &mut hello);
    // Someone in the middle lowers the advertised queue capacity (64 -> 16).
    let text = String::from_utf8(hello[4..].to_vec()).unwrap();
    let altered = text.replace(r#""queue_capacity":64"#, r#""queue_capacity":16"#);
    let mut forged = (altered.len() as u32).to_le_bytes().to_vec();
    forged.extend(altered.as_bytes());
    pair.client.handle_input(&forged).unwrap();
    let err = pair.run().unwrap_err();
    assert!(matches!(err, ClientError::Handshake(_)), "{err:?}");
}

/// Completes a handshake and returns the pair with the client connected.
fn connected() -> Pair {
    let (node_key, client_key) = (Keypair::generate(), Keypair::generate());
    let mut pair = Pair::new(
        secure_node(&node_key, &[&client_key]),
        secure_client(&client_key, pinned(&node_key)),
    );
    pair.run().unwrap();
    assert!(matches!(
        pair.client.poll_event(),
        Some(ClientEvent::Connected(_))
    ));
    pair
}

/// The records the client sends for one `queue_status` request.
fn status_records(pair: &mut Pair) -> Vec<u8> {
    pair.client.queue_status().unwrap();
    let mut bytes = Vec::new();
    pair.client.poll_transmit(&mut bytes);
    bytes
}

fn closed_with_decrypt_error(pair: &mut Pair) {
    assert!(pair.node.is_closing(pair.conn));
    let closing = pair.node.connection(pair.conn).unwrap().closing().cloned();
    assert_eq!(
        closing.map(|e| e.to_string()).as_deref(),
        Some("decryption failed: the connection was altered in transit")
    );
}

#[test]
fn one_flipped_bit_in_a_record_closes_the_connection() {
    let mut pair = connected();
    let mut record = status_records(&mut pair);
    let last = record.len() - 1;
    record[last] ^= 1;
    pair.node.handle_input(pair.conn, &record, pair.now);
    closed_with_decrypt_error(&mut pair);
}

#[test]
fn a_replayed_record_closes_the_connection() {
    let mut pair = connected();
    let record = status_records(&mut pair);
    pair.node.handle_input(pair.conn, &record, pair.now);
    assert!(!pair.node.is_closing(pair.conn));
    pair.node.handle_input(pair.conn, &record, pair.now);
    closed_with_decrypt_error(&mut pair);
}

#[test]
fn reordered_records_close_the_connection() {
    let mut pair = connected();
    let first = status_records(&mut pair);
    let second = status_records(&mut pair);
    pair.node.handle_input(pair.conn, &second, pair.now);
    closed_with_decrypt_error(&mut pair);
    drop(first);
}

#[test]
fn a_record_over_the_limit_is_refused_before_anything_is_buffered() {
    let mut pair = connected();
    // A header announcing 65,536 bytes: one more than a Noise message can hold.
    pair.node
        .handle_input(pair.conn, &65536u32.to_le_bytes(), pair.now);
    closed_with_decrypt_error(&mut pair);
    assert!(pair.node.connection(pair.conn).unwrap().allocated() < 64 * 1024);
}

#[test]
fn key_files_round_trip_and_fingerprints_look_like_ssh() {
    let key = Keypair::generate();
    let again = Keypair::from_secret_text(&key.secret_text()).unwrap();
    assert_eq!(again.public(), key.public());
    let public = donate_proto::PublicKey::parse(&format!("{} laptop", key.public())).unwrap();
    assert_eq!(&public, key.public());
    let fingerprint = key.public().fingerprint();
    assert!(
        fingerprint.starts_with("SHA256:") && fingerprint.len() == 7 + 43,
        "{fingerprint}"
    );
    assert!(Keypair::from_secret_text("garbage").is_err());
    assert!(donate_proto::PublicKey::parse("donate-x25519 AAAA").is_err());
}

#[test]
fn a_private_key_where_a_public_one_belongs_is_named_and_never_quoted() {
    let key = Keypair::generate();
    let secret = key.secret_text();
    let b64 = secret.split_whitespace().nth(1).unwrap();
    for text in [secret.as_str(), "donate-x25519 !!!", "garbage"] {
        let err = donate_proto::PublicKey::parse(text)
            .unwrap_err()
            .to_string();
        assert!(!err.contains(b64) && !err.contains(text.trim()), "{err}");
    }
    let err = donate_proto::PublicKey::parse(&secret)
        .unwrap_err()
        .to_string();
    assert!(err.contains("looks like a private key"), "{err}");
}

#[test]
fn only_a_well_formed_fingerprint_can_be_pinned() {
    let fingerprint = Keypair::generate().public().fingerprint();
    assert!(NodeTrust::pin(&fingerprint).is_ok());
    for bad in [
        "SHA256:nonsense",
        "SHA256:",
        &fingerprint[..fingerprint.len() - 1],
    ] {
        let err = NodeTrust::pin(bad).unwrap_err().to_string();
        assert!(err.contains("not a key fingerprint"), "{bad}: {err}");
    }
}

mod handshake_budget {
    use std::net::{IpAddr, Ipv4Addr};

    use donate_proto::sim::{Peer, Sim};
    use donate_proto::{Answer, ClientEvent, Keypair, SecureServerConfig, ServerConfig};

    use super::{pinned, secure_client};

    fn source(n: u8) -> Option<IpAddr> {
        Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, n)))
    }

    /// A client with a key the node knows connects and runs a job.
    fn authorized_client_works(sim: &mut Sim<donate_proto::Stub>, node: &Keypair, key: &Keypair) {
        let p = sim.connect(secure_client(key, pinned(node)), source(200));
        assert_eq!(sim.client_error(p), None);
        let core = sim.client_core(p);
        assert!(matches!(core.poll_event(), Some(ClientEvent::Connected(_))));
        let upload = sim
            .upload(p, r#"{"ok":true}"#, &[1, 2, 3, 4], None)
            .unwrap();
        sim.run();
        let core = sim.client_core(p);
        assert!(matches!(core.take_answer(upload), Some(Answer::ModelStatus(s)) if s.ok));
        sim.close(p);
        sim.run();
    }

    fn is_refused(sim: &mut Sim<donate_proto::Stub>, p: Peer) -> bool {
        sim.frames(p)
            .iter()
            .any(|f| f.contains(r#""code":"too_many_connections""#))
    }

    #[test]
    fn keyless_handshakes_never_lock_out_an_authorized_client() {
        let (node, key) = (Keypair::generate(), Keypair::generate());
        let config = ServerConfig::default()
            .max_connections(16)
            .max_handshakes(8)
            .max_handshakes_per_source(3);
        let mut sim = Sim::stub(config).secure(SecureServerConfig::with_keys(
            node.clone(),
            vec![*key.public()],
        ));
        // Five sources open ten connections each, read the hello and stay silent.
        let mut keyless = Vec::new();
        for s in 1..=5 {
            for _ in 0..10 {
                keyless.push((s, sim.raw_from(source(s))));
            }
        }
        sim.run();
        authorized_client_works(&mut sim, &node, &key);
        // The budget was full: the client's handshake made room for itself.
        assert_eq!(sim.node.handshakes(), 7);
        // A source's fourth connection at once is refused outright.
        for &(s, p) in keyless.iter().filter(|(s, _)| *s == 1).skip(3) {
            assert!(is_refused(&mut sim, p), "source {s}: {:?}", sim.frames(p));
        }
        for round in 0..20 {
            // More keyless connections keep coming between the client's connections.
            for s in 1..=5 {
                sim.raw_from(source(s));
            }
            sim.run();
            assert!(sim.node.handshakes() <= 8, "round {round}");
            authorized_client_works(&mut sim, &node, &key);
        }
        // The oldest handshakes were closed to make room, each with an error frame.
        let (_, first) = keyless[0];
        assert!(sim.is_closed(first));
        assert!(sim
            .frames(first)
            .iter()
            .any(|f| f.contains("too many connections in their secure handshake")));
    }

    #[test]
    fn a_finished_handshake_counts_against_max_connections_not_the_handshake_budget() {
        let (node, key) = (Keypair::generate(), Keypair::generate());
        let config = ServerConfig::default().max_connections(2).max_handshakes(1);
        let mut sim = Sim::stub(config).secure(SecureServerConfig::with_keys(
            node.clone(),
            vec![*key.public()],
        ));
        let a = sim.connect(secure_client(&key, pinned(&node)), source(1));
        let b = sim.connect(secure_client(&key, pinned(&node)), source(1));
        assert_eq!((sim.client_error(a), sim.client_error(b)), (None, None));
        assert_eq!(sim.node.handshakes(), 0);
        // Both slots are held by authorized clients: a third is refused at once.
        let c = sim.raw_from(source(2));
        sim.run();
        assert!(is_refused(&mut sim, c));
        assert_eq!(sim.node.handshakes(), 0);
    }
}

/// A client's handshake against a stream of others: the node and the client
/// wired by hand, so that connections arrive between the handshake's messages.
mod handshake_in_a_flood {
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::Instant;

    use donate_proto::{
        ClientConnection, ClientError, ClientEvent, ConnectionId, Keypair, Node,
        SecureServerConfig, ServerConfig,
    };

    use super::{pinned, secure_client};

    fn source(n: u8) -> Option<IpAddr> {
        Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, n)))
    }

    /// Node to client, client to node, `rounds` times.
    fn exchange(
        node: &mut Node<()>,
        conn: ConnectionId,
        client: &mut ClientConnection,
        now: Instant,
        rounds: usize,
    ) -> Result<(), ClientError> {
        for _ in 0..rounds {
            let (mut to_client, mut to_node) = (Vec::new(), Vec::new());
            node.poll_transmit(conn, &mut to_client);
            client.handle_input(&to_client)?;
            client.poll_transmit(&mut to_node);
            node.handle_input(conn, &to_node, now);
        }
        Ok(())
    }

    /// Keyless connections from `sources`, one after another; those the node
    /// closes (but `keep`) are flushed and removed, as a driver would.
    fn flood(node: &mut Node<()>, sources: &[u8], n: usize, keep: ConnectionId, now: Instant) {
        for i in 0..n {
            node.accept_from(source(sources[i % sources.len()]), now);
            let closing: Vec<_> = node
                .connections()
                .filter(|&c| c != keep && node.is_closing(c))
                .collect();
            for c in closing {
                node.poll_transmit(c, &mut Vec::new());
                node.remove(c);
            }
        }
    }

    fn setup(max_handshakes: usize) -> (Node<()>, Keypair, Keypair, Instant) {
        let (node_key, key) = (Keypair::generate(), Keypair::generate());
        let config = ServerConfig::default()
            .max_connections(4)
            .max_handshakes(max_handshakes)
            .max_handshakes_per_source(3);
        let node = Node::new(config).with_secure(SecureServerConfig::with_keys(
            node_key.clone(),
            vec![*key.public()],
        ));
        #[allow(clippy::disallowed_methods)] // the one base instant
        let now = Instant::now();
        (node, node_key, key, now)
    }

    #[test]
    fn a_flood_from_a_few_sources_never_closes_another_sources_handshake() {
        let (mut node, node_key, key, now) = setup(8);
        let conn = node.accept_from(source(200), now);
        node.remove(conn);
        flood(&mut node, &[1, 2, 3], 8, conn, now);
        let conn = node.accept_from(source(200), now);
        let mut client = secure_client(&key, pinned(&node_key));
        // Hello out, the first handshake message in, the node's answer out:
        // the client's last message is still to come.
        exchange(&mut node, conn, &mut client, now, 1).unwrap();
        assert_eq!(node.handshakes(), 8);
        // Far more connections than the budget arrive meanwhile, and each
        // refused or closed one has left, so none holds a slot.
        flood(&mut node, &[1, 2, 3], 200, conn, now);
        assert!(!node.is_closing(conn));
        // Refused connections still flushing their error hold no slot either.
        for _ in 0..13 {
            node.accept_from(source(1), now);
        }
        let flushing = node.connections().filter(|&c| node.is_closing(c)).count();
        assert!(flushing >= 10, "{flushing}");
        exchange(&mut node, conn, &mut client, now, 3).unwrap();
        assert!(matches!(
            client.poll_event(),
            Some(ClientEvent::Connected(_))
        ));
        assert!(!node.is_closing(conn), "let in within max_connections");
    }

    #[test]
    fn a_handshake_closed_before_the_clients_last_message_reads_as_a_refusal() {
        // Every source holds one handshake: the oldest, the client's, makes room.
        let (mut node, node_key, key, now) = setup(2);
        let conn = node.accept_from(source(200), now);
        let mut client = secure_client(&key, pinned(&node_key));
        exchange(&mut node, conn, &mut client, now, 1).unwrap();
        flood(&mut node, &[1, 2], 2, conn, now);
        assert!(node.is_closing(conn));
        // The node can say so only in plain text: the client, whose side of
        // the handshake is done, names the refusal rather than a decryption failure.
        let err = exchange(&mut node, conn, &mut client, now, 1).unwrap_err();
        assert_eq!(
            err,
            ClientError::Refused("too many connections in their secure handshake".to_owned())
        );
    }
}
