//! The `store` extension in the core (docs/PROTOCOL.md §10.6), on the
//! simulated network: what a store client may ask, what the node hands its
//! host, and that a v1 client on the same node sees exactly v1.

// An executor must be Sync: the spooler shares what it saw behind a Mutex.
#![allow(clippy::disallowed_types)]

use std::sync::{Arc, Mutex};

use donate_proto::message::{ModelInventory, StoredModel};
use donate_proto::sim::{Peer, Sim};
use donate_proto::{
    hex, Answer, ApiMisuse, Capabilities, Capability, ClientConfig, ClientError, Executor,
    JobContext, JobError, MountOutcome, Node, ServerConfig, Spool, UploadHandling, UploadInfo,
    Weights,
};
use sha2::{Digest, Sha256};

/// Spools uploads in memory and records what each spool was opened with.
#[derive(Default)]
struct Spooler {
    opened: Arc<Mutex<Vec<UploadInfo>>>,
    /// Refuse every spool with this reason (a full store).
    refuse: Option<String>,
}

struct Bytes(Vec<u8>);

impl Spool for Bytes {
    fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

impl Executor for Spooler {
    type Model = Vec<u8>;
    type Spool = Bytes;

    fn spools_uploads(&self) -> bool {
        true
    }

    fn open_spool(&self, upload: &UploadInfo) -> Result<Bytes, String> {
        self.opened.lock().unwrap().push(upload.clone());
        match &self.refuse {
            Some(why) => Err(why.clone()),
            None => Ok(Bytes(Vec::new())),
        }
    }

    fn mount(&self, _: String, weights: Weights<Bytes>) -> Result<Vec<u8>, String> {
        Ok(match weights {
            Weights::Memory(bytes) => bytes,
            Weights::Spooled(spool) => spool.0,
        })
    }

    fn infer(
        &self,
        model: &Vec<u8>,
        ids: &[i32],
        _: i64,
        _: &JobContext<'_>,
    ) -> Result<Vec<i32>, JobError> {
        Ok([ids, &[model.len() as i32]].concat())
    }
}

fn store_node() -> Sim<Spooler> {
    let mut sim = Sim::with_uploads(
        Spooler::default(),
        ServerConfig::default(),
        UploadHandling::Spool,
    );
    sim.node = Node::with_uploads(ServerConfig::default(), UploadHandling::Spool)
        .offer(Capabilities::NONE.with(Capability::Store));
    sim
}

fn frame(body: &str) -> Vec<u8> {
    let mut out = Vec::new();
    donate_proto::frame::encode_frame(body.as_bytes(), &mut out);
    out
}

fn sha(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn answer(sim: &mut Sim<Spooler>, p: Peer, request: donate_proto::RequestId) -> Answer {
    sim.run();
    sim.client_core(p)
        .take_answer(request)
        .unwrap_or_else(|| panic!("no answer to {request:?}"))
}

#[test]
fn a_go_client_on_a_store_node_reads_v1_and_is_refused_store_requests_as_v1_would_be() {
    let mut sim = store_node();
    let raw = sim.raw();
    sim.run();
    assert_eq!(
        sim.frames(raw),
        [
            r#"{"v":1,"type":"hello","mode":"model_push","role":"server","queue_capacity":64,"capabilities":["store"]}"#
        ]
    );
    // The Go client's hello names nothing; a store request is then an unknown type.
    sim.write(
        raw,
        &frame(r#"{"v":1,"type":"hello","mode":"model_push","role":"client"}"#),
    );
    sim.write(
        raw,
        &frame(&format!(
            r#"{{"v":1,"type":"model_query","hashes":["{}"]}}"#,
            "ab".repeat(32)
        )),
    );
    sim.write(
        raw,
        &frame(&format!(
            r#"{{"v":1,"type":"model_use","config_json":"{{}}","weights_sha256":"{}"}}"#,
            "ab".repeat(32)
        )),
    );
    sim.run();
    assert_eq!(
        sim.frames(raw),
        [
            r#"{"code":"unknown_type","error":"unknown type: model_query","type":"error","v":1}"#,
            r#"{"code":"unknown_type","error":"unknown type: model_use","type":"error","v":1}"#,
        ]
    );
    assert!(sim.queries.is_empty() && sim.held_uses.is_empty());
}

#[test]
fn a_v1_client_offset_is_ignored_and_its_upload_is_whole() {
    let mut sim = store_node();
    let raw = sim.raw();
    sim.run();
    sim.frames(raw);
    let weights = [7u8; 10];
    sim.write(raw, &frame(r#"{"v":1,"type":"hello","role":"client"}"#));
    sim.write(
        raw,
        &frame(&format!(
            r#"{{"v":1,"type":"model_begin","config_json":"{{}}","weights_len":10,"weights_sha256":"{}","offset":4}}"#,
            hex(&sha(&weights))
        )),
    );
    let mut chunk = Vec::new();
    donate_proto::message::encode_weights_chunk(0, true, &weights, &mut chunk);
    sim.write(raw, &chunk);
    sim.write(raw, &frame(r#"{"v":1,"type":"model_commit"}"#));
    sim.run();
    assert_eq!(
        sim.frames(raw),
        [r#"{"v":1,"type":"model_status","ok":true,"message":"mounted"}"#]
    );
    assert_eq!(sim.executor.opened.lock().unwrap()[0].offset, 0);
}

#[test]
fn a_query_goes_to_the_host_and_its_answer_to_the_client() {
    let mut sim = store_node();
    let p = sim.client();
    assert_eq!(
        sim.client_core(p).capabilities(),
        Capabilities::NONE.with(Capability::Store)
    );
    let (a, b) = (sha(b"a"), sha(b"b"));
    let request = sim.client_core(p).query_models(&[a, b]).unwrap();
    sim.run();
    let (conn, hashes) = sim.queries.pop().expect("the host is asked");
    assert_eq!(hashes, [a, b]);
    let inventory = ModelInventory {
        models: vec![
            StoredModel {
                sha256: hex(&a),
                stored: true,
                size: 1,
                ..StoredModel::default()
            },
            StoredModel {
                sha256: hex(&b),
                partial: 5,
                ..StoredModel::default()
            },
        ],
        store_free: 1000,
    };
    let now = sim.now();
    sim.node.inventory_done(conn, inventory.clone(), now);
    assert_eq!(answer(&mut sim, p, request), Answer::Inventory(inventory));
    let sent = String::from_utf8_lossy(sim.received(p)).into_owned();
    assert!(
        sent.ends_with(&format!(
            r#"{{"v":1,"type":"model_inventory","models":[{{"sha256":"{}","stored":true,"size":1}},{{"sha256":"{}","stored":false,"partial":5}}],"store_free":1000}}"#,
            hex(&a),
            hex(&b)
        )),
        "{sent}"
    );
}

#[test]
fn bad_queries_are_refused_before_the_host_sees_them() {
    let mut sim = store_node();
    let raw = sim.raw();
    sim.run();
    sim.frames(raw);
    sim.write(
        raw,
        &frame(r#"{"v":1,"type":"hello","role":"client","capabilities":["store"]}"#),
    );
    // Upper case, short, and a path: a store names files by hashes, so one spelling only.
    for hash in [
        "AB".repeat(32),
        "ab".repeat(31),
        format!("../../{}", "a".repeat(58)),
    ] {
        sim.write(
            raw,
            &frame(&format!(
                r#"{{"v":1,"type":"model_query","hashes":["{hash}"]}}"#
            )),
        );
        sim.write(
            raw,
            &frame(&format!(
                r#"{{"v":1,"type":"model_use","config_json":"{{}}","weights_sha256":"{hash}"}}"#
            )),
        );
    }
    let many: Vec<String> = (0..1025)
        .map(|_| format!("\"{}\"", "ab".repeat(32)))
        .collect();
    sim.write(
        raw,
        &frame(&format!(
            r#"{{"v":1,"type":"model_query","hashes":[{}]}}"#,
            many.join(",")
        )),
    );
    sim.run();
    let frames = sim.frames(raw);
    assert_eq!(frames.len(), 7, "{frames:?}");
    for f in &frames[..6] {
        assert!(f.contains(r#""code":"bad_weights_sha256""#), "{f}");
    }
    assert!(
        frames[6].contains(r#""code":"query_too_large""#),
        "{}",
        frames[6]
    );
    assert!(sim.queries.is_empty() && sim.held_uses.is_empty());
}

#[test]
fn use_mounts_through_the_host_and_jobs_sent_behind_it_wait_for_it() {
    let mut sim = store_node();
    let p = sim.client();
    let hash = sha(b"weights");
    let used = sim.client_core(p).use_model(r#"{"m":1}"#, hash).unwrap();
    let job = sim.client_core(p).infer(&[1], 1).unwrap();
    sim.run();
    let stored = sim.held_uses.pop().expect("the host mounts it");
    assert_eq!(stored.sha256, hash);
    assert_eq!(stored.config_json, r#"{"m":1}"#);
    let now = sim.now();
    sim.node.mount_done(
        MountOutcome {
            token: stored.token,
            result: Ok(Arc::new(b"weights".to_vec())),
        },
        now,
    );
    match answer(&mut sim, p, used) {
        Answer::ModelStatus(s) => assert!(s.ok && s.message == "mounted"),
        other => panic!("{other:?}"),
    }
    match answer(&mut sim, p, job) {
        Answer::Infer(r) => assert_eq!(r.output_ids, [1, 7], "ran on the stored model"),
        other => panic!("{other:?}"),
    }

    // Not stored: the host says why, the client uploads instead.
    let used = sim.client_core(p).use_model("{}", sha(b"other")).unwrap();
    sim.run();
    let stored = sim.held_uses.pop().unwrap();
    let now = sim.now();
    sim.node.mount_done(
        MountOutcome {
            token: stored.token,
            result: Err("this node does not hold model …; upload it".to_owned()),
        },
        now,
    );
    match answer(&mut sim, p, used) {
        Answer::ModelStatus(s) => assert!(!s.ok && s.message.ends_with("upload it")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_resumed_upload_sends_only_the_rest_and_its_spool_learns_where_it_starts() {
    let mut sim = store_node();
    let p = sim.client();
    let weights: Vec<u8> = (0..100u8).collect();
    let hash = sha(&weights);
    let request = sim
        .client_core(p)
        .resume_upload("{}", 100, hash, 60)
        .unwrap();
    sim.push_weights(p, &weights[60..]);
    match answer(&mut sim, p, request) {
        Answer::ModelStatus(s) => assert!(s.ok, "{s:?}"),
        other => panic!("{other:?}"),
    }
    let opened = sim.executor.opened.lock().unwrap().clone();
    assert_eq!(opened.len(), 1);
    assert_eq!((opened[0].offset, opened[0].weights_len), (60, 100));
    assert_eq!(opened[0].sha256, Some(hash));
    let sent = String::from_utf8_lossy(sim.sent(p)).into_owned();
    assert!(
        sent.contains(r#""weights_len":100,"weights_sha256":""#),
        "{sent}"
    );
    assert!(sent.contains(r#","offset":60}"#), "{sent}");
}

#[test]
fn a_name_reaches_the_spool_of_a_store_client_only_and_a_bad_one_is_refused() {
    let named = |store: bool, name: &str| {
        let mut sim = store_node();
        let raw = sim.raw();
        sim.run();
        sim.frames(raw);
        let hello = match store {
            true => r#"{"v":1,"type":"hello","role":"client","capabilities":["store"]}"#,
            false => r#"{"v":1,"type":"hello","role":"client"}"#,
        };
        sim.write(raw, &frame(hello));
        sim.write(
            raw,
            &frame(&format!(
                r#"{{"v":1,"type":"model_begin","config_json":"{{}}","weights_len":10,"weights_sha256":"{}","name":{}}}"#,
                hex(&sha(&[7u8; 10])),
                serde_json::to_string(name).unwrap()
            )),
        );
        sim.run();
        let opened = sim.executor.opened.lock().unwrap().clone();
        (opened.first().map(|o| o.name.clone()), sim.frames(raw))
    };
    assert_eq!(named(true, "m.gguf"), (Some("m.gguf".to_owned()), vec![]));
    // A v1 peer's stray field is never read, whatever it holds.
    assert_eq!(named(false, "m.gguf").0.as_deref(), Some(""));
    assert_eq!(named(false, "\u{1b}[2J").0.as_deref(), Some(""));
    for bad in ["\u{1b}[2J".to_owned(), "x".repeat(256)] {
        let (opened, frames) = named(true, &bad);
        assert_eq!(opened, None, "{bad:?}");
        assert!(
            frames[0].contains(r#""code":"bad_field""#) && frames[0].contains("name"),
            "{frames:?}"
        );
    }
}

#[test]
fn a_client_names_its_upload_only_to_a_store_node() {
    let upload = donate_proto::UploadRequest {
        config_json: "{}".to_owned(),
        weights_len: 10,
        sha256: Some([1; 32]),
        name: "m.gguf".to_owned(),
        ..Default::default()
    };
    let mut sim = store_node();
    let p = sim.client();
    sim.client_core(p).submit_upload(&upload).unwrap();
    sim.run();
    let sent = String::from_utf8_lossy(sim.sent(p)).into_owned();
    assert!(sent.contains(r#","name":"m.gguf"}"#), "{sent}");
    // The same request to a node that did not agree `store`: v1 bytes.
    let mut sim = Sim::with_uploads(
        Spooler::default(),
        ServerConfig::default(),
        UploadHandling::Spool,
    );
    let p = sim.client_with(ClientConfig::default());
    sim.client_core(p).submit_upload(&upload).unwrap();
    sim.run();
    let sent = String::from_utf8_lossy(sim.sent(p)).into_owned();
    assert!(
        sent.ends_with(&format!(
            r#"{{"v":1,"type":"model_begin","config_json":"{{}}","weights_len":10,"weights_sha256":"{}"}}"#,
            hex(&[1; 32])
        )),
        "{sent}"
    );
    let bad = donate_proto::UploadRequest {
        name: "a\nb".to_owned(),
        ..upload
    };
    assert_eq!(
        sim.client_core(p).submit_upload(&bad),
        Err(ClientError::Misuse(ApiMisuse::BadModelName))
    );
}

#[test]
fn a_resume_without_a_hash_is_refused() {
    let mut sim = store_node();
    let raw = sim.raw();
    sim.run();
    sim.frames(raw);
    sim.write(
        raw,
        &frame(r#"{"v":1,"type":"hello","role":"client","capabilities":["store"]}"#),
    );
    sim.write(
        raw,
        &frame(r#"{"v":1,"type":"model_begin","config_json":"{}","weights_len":10,"offset":4}"#),
    );
    sim.run();
    let frames = sim.frames(raw);
    assert!(frames[0].contains(r#""code":"bad_offset""#), "{frames:?}");
}

#[test]
fn a_client_asks_nothing_of_a_node_without_a_store() {
    let mut sim = Sim::with_uploads(
        Spooler::default(),
        ServerConfig::default(),
        UploadHandling::Spool,
    );
    let p = sim.client_with(ClientConfig::default());
    let core = sim.client_core(p);
    assert!(core.capabilities().is_empty());
    let before = core.pending_transmit();
    assert_eq!(
        core.query_models(&[[0; 32]]),
        Err(ClientError::Misuse(ApiMisuse::NotOffered("store")))
    );
    assert_eq!(
        core.use_model("{}", [0; 32]),
        Err(ClientError::Misuse(ApiMisuse::NotOffered("store")))
    );
    assert_eq!(
        core.resume_upload("{}", 10, [0; 32], 5),
        Err(ClientError::Misuse(ApiMisuse::NotOffered("store")))
    );
    assert_eq!(core.pending_transmit(), before, "nothing was sent");
}

#[test]
fn an_upload_the_store_cannot_take_is_refused_at_its_begin_not_its_commit() {
    let mut sim = store_node();
    sim.executor.refuse = Some("the model store is full".to_owned());
    let raw = sim.raw();
    sim.run();
    sim.frames(raw);
    // A v1 client, as the Go client: its upload names its hash.
    let weights = [7u8; 10];
    sim.write(raw, &frame(r#"{"v":1,"type":"hello","role":"client"}"#));
    sim.write(
        raw,
        &frame(&format!(
            r#"{{"v":1,"type":"model_begin","config_json":"{{}}","weights_len":10,"weights_sha256":"{}"}}"#,
            hex(&sha(&weights))
        )),
    );
    sim.run();
    // The spool was opened before any byte came, and its refusal is the answer.
    assert_eq!(sim.executor.opened.lock().unwrap().len(), 1);
    assert_eq!(
        sim.frames(raw),
        [r#"{"code":"upload_refused","error":"the model store is full","type":"error","v":1}"#]
    );
    // Its chunks and its commit get no answer; the connection stays in step.
    let mut chunk = Vec::new();
    donate_proto::message::encode_weights_chunk(0, true, &weights, &mut chunk);
    sim.write(raw, &chunk);
    sim.write(raw, &frame(r#"{"v":1,"type":"model_commit"}"#));
    sim.write(raw, &frame(r#"{"v":1,"type":"queue_status"}"#));
    sim.run();
    let frames = sim.frames(raw);
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert!(frames[0].contains(r#""type":"queue_status""#), "{frames:?}");
    assert_eq!(sim.executor.opened.lock().unwrap().len(), 1);
}
