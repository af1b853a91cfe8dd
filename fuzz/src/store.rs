//! `store`: a node offering the `store` extension, driven by a client that
//! opted in and then sends arbitrary bytes (split at chosen points); the test
//! plays the host, answering every `model_query` with an inventory and every
//! `model_use` with a mount or a refusal, as the input decides.
//!
//! Input layout: one byte `n` (taken mod 16), `n` split offsets as `u16` LE,
//! then the stream after the client's hello.
//!
//! Asserted: no panic; each query the node hands its host is answered by
//! exactly one `model_inventory` frame; each use by exactly one `model_status`
//! (with commits' statuses counted too, never fewer than uses); the
//! connection's memory stays within a bound set by the frame limit.

use std::sync::Arc;

use donate_proto::frame::FrameDecoder;
use donate_proto::message::{ModelInventory, StoredModel};
use donate_proto::sim::Sim;
use donate_proto::{
    hex, Capabilities, Capability, MountOutcome, Node, ServerConfig, Stub, UploadHandling,
};

/// Frames at most this long: small, so the fuzzer reaches the limit.
const MAX_FRAME: usize = 64 * 1024;

pub fn run(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 16).min(rest.len() / 2);
    let (splits, stream) = rest.split_at(n * 2);
    let mut points: Vec<usize> = splits
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]) as usize % (stream.len() + 1))
        .collect();
    points.sort_unstable();
    points.push(stream.len());

    let config = ServerConfig::default()
        .max_frame_len(MAX_FRAME)
        .upload_stretch(4096);
    let mut sim = Sim::with_uploads(
        Stub::default(),
        config.clone(),
        UploadHandling::HashAsItArrives,
    );
    sim.node = Node::with_uploads(config, UploadHandling::HashAsItArrives)
        .offer(Capabilities::NONE.with(Capability::Store));
    let p = sim.raw();
    sim.run();
    let mut hello = Vec::new();
    donate_proto::frame::encode_frame(
        br#"{"v":1,"type":"hello","role":"client","capabilities":["store"]}"#,
        &mut hello,
    );
    sim.write(p, &hello);
    let (mut queries, mut uses, mut answered) = (0usize, 0usize, 0usize);
    let mut start = 0;
    for point in points {
        sim.write(p, &stream[start..point]);
        start = point;
        sim.run();
        // The host's part: answer what the node asked, as the bytes decide.
        while !sim.queries.is_empty() || !sim.held_uses.is_empty() {
            let now = sim.now();
            for (conn, hashes) in std::mem::take(&mut sim.queries) {
                queries += 1;
                let models = hashes
                    .iter()
                    .map(|h| StoredModel {
                        sha256: hex(h),
                        stored: h[0] % 2 == 0,
                        size: i64::from(h[1]),
                        partial: i64::from(h[2] % 4),
                        ..StoredModel::default()
                    })
                    .collect();
                let inventory = ModelInventory {
                    models,
                    store_free: 1 << 20,
                };
                sim.node.inventory_done(conn, inventory, now);
            }
            for stored in std::mem::take(&mut sim.held_uses) {
                uses += 1;
                let result = if stored.sha256[0] % 2 == 0 {
                    Ok(Arc::new(()))
                } else {
                    Err("this node does not hold it; upload it".to_owned())
                };
                sim.node.mount_done(
                    MountOutcome {
                        token: stored.token,
                        result,
                    },
                    now,
                );
            }
            sim.run();
        }
    }
    // Count what the client read.
    let mut decoder = FrameDecoder::new(usize::MAX >> 1);
    let (mut inventories, mut statuses) = (0usize, 0usize);
    decoder
        .feed(sim.received(p), |body| {
            if body.starts_with(br#"{"v":1,"type":"model_inventory""#) {
                inventories += 1;
            } else if body.starts_with(br#"{"v":1,"type":"model_status""#) {
                statuses += 1;
            }
            answered += 1;
        })
        .expect("the node's own frames decode");
    let closing = sim.node.is_closing(sim.conn(p));
    if !closing {
        assert_eq!(inventories, queries, "one inventory per query");
        assert!(statuses >= uses, "a status per use ({statuses} < {uses})");
    }
    assert!(
        sim.peak_allocated(p) <= 8 * MAX_FRAME + (1 << 20),
        "the connection held {} bytes",
        sim.peak_allocated(p)
    );
    let _ = answered;
}
