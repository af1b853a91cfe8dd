//! Extension negotiation (docs/PROTOCOL.md §10): a node lists what it offers,
//! a client opts into the subset it wants, and a v1 peer on either side sees
//! exactly v1 bytes.

use donate_proto::sim::Sim;
use donate_proto::{Capabilities, Capability, ClientConfig, ServerConfig};

fn offering(caps: Capabilities) -> Sim<donate_proto::Stub> {
    let mut sim = Sim::stub(ServerConfig::default());
    sim.node = donate_proto::Node::new(ServerConfig::default()).offer(caps);
    sim
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    donate_proto::frame::encode_frame(body, &mut out);
    out
}

fn store_and_stream() -> Capabilities {
    Capabilities::NONE
        .with(Capability::Store)
        .with(Capability::Stream)
}

#[test]
fn a_node_offering_nothing_sends_the_v1_hello() {
    let mut sim = offering(Capabilities::NONE);
    let raw = sim.raw();
    sim.run();
    assert_eq!(
        sim.frames(raw),
        [r#"{"v":1,"type":"hello","mode":"model_push","role":"server","queue_capacity":64}"#]
    );
}

#[test]
fn a_client_opts_into_what_both_name_and_the_node_records_it() {
    let mut sim = offering(store_and_stream());
    let wants = Capabilities::NONE
        .with(Capability::Stream)
        .with(Capability::Cancel);
    let client = sim.client_with(ClientConfig::default().capabilities(wants));
    sim.run();
    let agreed = Capabilities::NONE.with(Capability::Stream);
    assert_eq!(sim.client_core(client).capabilities(), agreed);
    let conn = sim.conn(client);
    assert_eq!(sim.node.connection(conn).unwrap().capabilities(), agreed);
    // What crossed the wire, byte for byte: the node's offer, the client's subset.
    let sent = String::from_utf8_lossy(sim.sent(client)).into_owned();
    assert!(
        sent.ends_with(r#"{"v":1,"type":"hello","mode":"model_push","role":"client","capabilities":["stream"]}"#),
        "{sent}"
    );
    let received = String::from_utf8_lossy(sim.received(client)).into_owned();
    assert!(
        received.contains(r#""queue_capacity":64,"capabilities":["store","stream"]}"#),
        "{received}"
    );
}

#[test]
fn a_go_client_hello_opts_into_nothing() {
    let mut sim = offering(store_and_stream());
    let raw = sim.raw();
    sim.run();
    sim.take_received(raw);
    sim.write(
        raw,
        &frame(br#"{"v":1,"type":"hello","mode":"model_push","role":"client"}"#),
    );
    sim.run();
    let conn = sim.conn(raw);
    assert!(sim.node.connection(conn).unwrap().capabilities().is_empty());
}

#[test]
fn a_client_facing_a_v1_node_writes_the_go_client_hello() {
    let mut sim = offering(Capabilities::NONE);
    let client = sim.client_with(ClientConfig::default().capabilities(store_and_stream()));
    sim.run();
    assert!(sim.client_core(client).capabilities().is_empty());
    assert_eq!(
        sim.sent(client),
        frame(br#"{"v":1,"type":"hello","mode":"model_push","role":"client"}"#)
    );
}

#[test]
fn only_the_first_frame_opts_in_and_unknown_names_are_ignored() {
    let mut sim = offering(store_and_stream());
    let raw = sim.raw();
    sim.run();
    let hello = |caps: &str| {
        frame(
            format!(r#"{{"v":1,"type":"hello","role":"client","capabilities":[{caps}]}}"#)
                .as_bytes(),
        )
    };
    sim.write(raw, &hello(r#""warp","store","cancel""#));
    sim.write(raw, &hello(r#""stream""#));
    sim.run();
    let conn = sim.conn(raw);
    assert_eq!(
        sim.node.connection(conn).unwrap().capabilities(),
        Capabilities::NONE.with(Capability::Store)
    );
}
