//! The `sampling` and `stream` extensions end to end (docs/PROTOCOL.md §10.7,
//! §10.8), on a real node over loopback with a scripted executor that
//! reports partial output and reads a job's sampling: what a streaming client,
//! a plain one and a Go client each read, byte for byte where it matters.

mod common;

use std::time::Duration;

use common::{fj, start, Raw, ServerKind};
use donate_proto::{
    ApiMisuse, Capabilities, Capability, ClientConfig, Executor, JobContext, JobError, Mode,
    NoSpool, Partial, PartialOutput, SamplingParams, ServerConfig, Weights,
};
use donate_std::{Client, Error};

/// Streams its output piece by piece; picks tokens from the job's seed when
/// it asks for a temperature, else counts 1, 2, 3… (its "greedy" output).
struct Scripted;

const REPLY: [&str; 3] = ["Hello", ", ", "wörld"];

impl Executor for Scripted {
    type Model = ();
    type Spool = NoSpool;

    fn extensions(&self) -> Capabilities {
        Capabilities::NONE
            .with(Capability::Sampling)
            .with(Capability::Stream)
    }

    fn mount(&self, _config: String, _weights: Weights<NoSpool>) -> Result<(), String> {
        Ok(())
    }

    fn infer(
        &self,
        _model: &(),
        input_ids: &[i32],
        max_tokens: i64,
        job: &JobContext<'_>,
    ) -> Result<Vec<i32>, JobError> {
        let n = max_tokens.clamp(1, 16) as u64;
        let sampling = job.sampling();
        let mut out = input_ids.to_vec();
        for i in 0..n {
            let token = match (sampling.temperature, sampling.seed) {
                (Some(t), Some(seed)) if t > 0.0 => {
                    (seed.wrapping_mul(31).wrapping_add(i) % 1000) as i32
                }
                _ => i as i32 + 1,
            };
            job.partial(Partial::Tokens(&[token]));
            out.push(token);
        }
        Ok(out)
    }

    fn prompt(
        &self,
        _prompt: &str,
        _max_out: i64,
        job: &JobContext<'_>,
    ) -> Result<String, JobError> {
        if let Some(t) = job.sampling().temperature {
            return Ok(format!("sampled at {t}"));
        }
        for piece in REPLY {
            job.partial(Partial::Text(piece));
        }
        Ok(REPLY.concat())
    }
}

fn node(mode: Mode) -> common::TestServer {
    node_on(ServerKind::Std, mode)
}

fn node_on(kind: ServerKind, mode: Mode) -> common::TestServer {
    start(kind, ServerConfig::default().mode(mode), Scripted)
}

fn plain_config() -> ClientConfig {
    ClientConfig::default().capabilities(Capabilities::NONE.with(Capability::Sampling))
}

fn sampled(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: Some(0.8),
        seed: Some(seed),
        ..SamplingParams::default()
    }
}

#[test]
fn streaming_and_plain_clients_side_by_side() {
    let server = node(Mode::LocalLm);
    let mut streaming = Client::connect(server.addr()).unwrap();
    let mut plain = Client::connect_with(server.addr(), plain_config()).unwrap();
    let a = streaming.send_prompt("hi", 0).unwrap();
    let b = plain.send_prompt("hi", 0).unwrap();
    let mut a_parts = Vec::new();
    let a_answer = streaming.wait_streaming(a, |p| a_parts.push(p)).unwrap();
    let mut b_parts = Vec::new();
    let b_answer = plain.wait_streaming(b, |p| b_parts.push(p)).unwrap();
    let expected: Vec<_> = REPLY
        .iter()
        .map(|s| PartialOutput::Text((*s).to_owned()))
        .collect();
    assert_eq!(a_parts, expected);
    assert!(b_parts.is_empty(), "{b_parts:?}");
    for answer in [a_answer, b_answer] {
        let result = donate_std::answers::prompt(answer).unwrap();
        assert_eq!(result.text, REPLY.concat());
    }
    // A plain wait on a streaming connection drops the partials with the answer.
    assert_eq!(streaming.prompt("again", 0).unwrap().text, REPLY.concat());
    drop((streaming, plain));
    server.shutdown();
}

/// Every runtime's node streams, and the async client (smol's and tokio's)
/// hands the partials over as the blocking one does.
#[test]
fn every_runtime_streams_to_the_async_client() {
    let expected: Vec<_> = REPLY
        .iter()
        .map(|s| PartialOutput::Text((*s).to_owned()))
        .collect();
    for kind in common::ADAPTERS {
        let server = node_on(kind, Mode::LocalLm);
        let addr = server.addr();
        let (parts, text) = smol::block_on(async {
            let mut client = donate_smol::Client::connect(addr).await.unwrap();
            let request = client.send_prompt("hi", 0).await.unwrap();
            let mut parts = Vec::new();
            let answer = client
                .wait_streaming(request, |p| parts.push(p))
                .await
                .unwrap();
            (parts, donate_std::answers::prompt(answer).unwrap().text)
        });
        assert_eq!(parts, expected, "{kind:?}");
        assert_eq!(text, REPLY.concat());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let parts = rt.block_on(async {
            let mut client = donate_tokio::Client::connect(addr).await.unwrap();
            let request = client.send_prompt("hi", 0).await.unwrap();
            let mut parts = Vec::new();
            client
                .wait_streaming(request, |p| parts.push(p))
                .await
                .unwrap();
            parts
        });
        assert_eq!(parts, expected, "{kind:?}");
        server.shutdown();
    }
}

#[test]
fn infer_partials_are_the_tail_of_the_result() {
    let server = node(Mode::ModelPush);
    let mut client = Client::connect(server.addr()).unwrap();
    client.push_model("{}", b"w", false).unwrap();
    let request = client.send_infer_with(&[7, 8], 5, &sampled(3)).unwrap();
    let mut ids = Vec::new();
    let answer = client
        .wait_streaming(request, |p| match p {
            PartialOutput::Tokens(t) => ids.extend(t),
            other => panic!("{other:?}"),
        })
        .unwrap();
    let result = donate_std::answers::infer(answer).unwrap();
    assert_eq!(result.output_ids[..2], [7, 8]);
    assert_eq!(result.output_ids[2..], ids[..]);
    assert_eq!(ids.len(), 5);
    drop(client);
    server.shutdown();
}

#[test]
fn sampling_fields_reach_the_executor_only_from_a_client_that_agreed() {
    let server = node(Mode::ModelPush);
    let mut client = Client::connect(server.addr()).unwrap();
    client.push_model("{}", b"w", false).unwrap();
    let first = client.infer_with(&[1], 4, &sampled(42)).unwrap();
    let again = client.infer_with(&[1], 4, &sampled(42)).unwrap();
    let other = client.infer_with(&[1], 4, &sampled(43)).unwrap();
    let greedy = client.infer(&[1], 4).unwrap();
    assert_eq!(first.output_ids, again.output_ids, "same seed, same tokens");
    assert_ne!(first.output_ids, other.output_ids);
    assert_eq!(greedy.output_ids, [1, 1, 2, 3, 4], "no fields: the default");
    drop(client);

    // A client that did not name `sampling` may not send the fields.
    let mut v1 = Client::connect_with(
        server.addr(),
        ClientConfig::default().capabilities(Capabilities::NONE),
    )
    .unwrap();
    v1.push_model("{}", b"w", false).unwrap();
    match v1.infer_with(&[1], 4, &sampled(42)) {
        Err(Error::Misuse(ApiMisuse::NotOffered("sampling"))) => {}
        other => panic!("expected NotOffered, got {other:?}"),
    }
    assert_eq!(v1.infer(&[1], 2).unwrap().output_ids, [1, 1, 2]);
    drop(v1);
    server.shutdown();
}

#[test]
fn a_client_refuses_sampling_for_a_node_that_does_not_offer_it() {
    let server = common::start_default(ServerKind::Std);
    let mut client = Client::connect(server.addr()).unwrap();
    assert!(client.hello().capabilities.is_empty());
    let sampling = SamplingParams {
        stop: vec!["\n".into()],
        ..SamplingParams::default()
    };
    match client.prompt_with("hi", 0, &sampling) {
        Err(Error::Misuse(ApiMisuse::NotOffered("sampling"))) => {}
        other => panic!("expected NotOffered, got {other:?}"),
    }
    // Nothing was sent: the connection still answers in order.
    client.push_model("{}", b"w", false).unwrap();
    assert_eq!(client.infer(&[5], 1).unwrap().output_ids, [5, 1]);
    drop(client);
    server.shutdown();
}

/// A Go client (its hello names no capability) reads exactly v1 from a node
/// that offers both extensions: no partial frame, and sampling fields it
/// happens to send are not read.
#[test]
fn a_go_client_gets_no_partials_and_its_sampling_fields_are_not_read() {
    let server = node(Mode::LocalLm);
    let mut raw = Raw::connect(server.addr());
    assert_eq!(
        raw.text(),
        r#"{"v":1,"type":"hello","mode":"local_lm","role":"server","queue_capacity":64,"capabilities":["stream","sampling"]}"#
    );
    raw.send(&fj(
        r#"{"v":1,"type":"hello","mode":"local_lm","role":"client"}"#,
    ));
    raw.send(&fj(
        r#"{"v":1,"type":"prompt","job_id":"p1","prompt":"hi","temperature":1.5,"seed":9}"#,
    ));
    assert_eq!(
        raw.text(),
        r#"{"v":1,"type":"prompt_result","job_id":"p1","ok":true,"text":"Hello, wörld","queue_depth":0}"#
    );
    raw.expect_silence(Duration::from_millis(200));
    drop(raw);

    let server_push = node(Mode::ModelPush);
    let mut raw = Raw::session(server_push.addr());
    raw.mount();
    raw.send(&fj(
        r#"{"v":1,"type":"infer","job_id":"j1","input_ids":[4],"max_tokens":2,"temperature":1.0,"seed":1}"#,
    ));
    assert_eq!(
        raw.text(),
        r#"{"v":1,"type":"infer_result","job_id":"j1","ok":true,"output_ids":[4,1,2],"queue_depth":0}"#
    );
    raw.expect_silence(Duration::from_millis(200));
    drop(raw);
    server.shutdown();
    server_push.shutdown();
}

/// The exact frames a client that named `stream` reads.
#[test]
fn partial_frames_byte_for_byte() {
    let server = node(Mode::LocalLm);
    let mut raw = Raw::connect(server.addr());
    raw.text();
    raw.send(&fj(
        r#"{"v":1,"type":"hello","mode":"local_lm","role":"client","capabilities":["stream","sampling"]}"#,
    ));
    raw.send(&fj(
        r#"{"v":1,"type":"prompt","job_id":"p1","prompt":"hi"}"#,
    ));
    for piece in [r#""Hello""#, r#"", ""#, r#""wörld""#] {
        assert_eq!(
            raw.text(),
            format!(r#"{{"v":1,"type":"prompt_partial","job_id":"p1","text":{piece}}}"#)
        );
    }
    assert_eq!(
        raw.text(),
        r#"{"v":1,"type":"prompt_result","job_id":"p1","ok":true,"text":"Hello, wörld","queue_depth":0}"#
    );
    // Agreed `sampling`: the fields are read.
    raw.send(&fj(
        r#"{"v":1,"type":"prompt","job_id":"p2","prompt":"hi","temperature":0.5}"#,
    ));
    assert_eq!(
        raw.text(),
        r#"{"v":1,"type":"prompt_result","job_id":"p2","ok":true,"text":"sampled at 0.5","queue_depth":0}"#
    );
    // A sampling field of the wrong type is a bad body naming the job.
    raw.send(&fj(
        r#"{"v":1,"type":"prompt","job_id":"p3","prompt":"hi","top_k":"ten"}"#,
    ));
    let error = raw.frame();
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["job_id"], "p3", "{error}");
    assert!(error["error"].as_str().unwrap().contains("u32"), "{error}");
    drop(raw);
    server.shutdown();
}
