//! A real node (donate-std over loopback) running [`CandleExecutor`]: a tiny
//! random llama pushed by our client generates exactly what candle run
//! directly generates, and every kind of bad model or job is refused with a
//! clear message.

mod support;

use std::collections::HashMap;
use std::net::TcpListener;

use candle_core::{DType, Device, Tensor};
use donate_candle::{codes, CandleConfig, CandleExecutor};
use donate_proto::{Mode, ServerConfig};
use donate_std::{Client, Error, Server};
use support::{safetensors_bytes, Direct, TINY};

/// A model_push node on 127.0.0.1:0 with the candle executor.
fn node(config: CandleConfig) -> Server {
    let executor = CandleExecutor::new(config).expect("executor");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    donate_std::serve(listener, ServerConfig::default(), executor).expect("serve")
}

/// Pushes `config_json` + `weights` and returns the model_status message of a refusal.
fn refusal(config_json: &str, weights: &[u8]) -> String {
    let server = node(CandleConfig::default());
    let mut client = Client::connect(server.local_addr()).unwrap();
    let refused = match client.push_model(config_json, weights, true) {
        Err(Error::ModelRefused(message)) => message,
        other => panic!("expected model_status ok:false, got {other:?}"),
    };
    // The connection is still usable: a good model mounts after the bad one.
    let tensors = TINY.random_tensors(1);
    let status = client
        .push_model(&TINY.config_json(), &safetensors_bytes(&tensors), false)
        .expect("a good model after a refused one");
    assert_eq!(status.message, "mounted");
    drop(client);
    server.shutdown();
    refused
}

#[test]
fn infer_matches_candle_run_directly() {
    let tensors = TINY.random_tensors(7);
    let config_json = TINY.config_json();
    let direct = Direct::new(&config_json, &tensors);
    let server = node(CandleConfig {
        max_tokens_cap: 20,
        ..CandleConfig::default()
    });
    let mut client = Client::connect(server.local_addr()).unwrap();
    let status = client
        .push_model(&config_json, &safetensors_bytes(&tensors), true)
        .expect("mounted");
    assert_eq!(status.message, "mounted");

    let input = [1, 2, 3, 4, 5];
    let expected = |n: usize| -> Vec<i32> {
        let new = direct.generate(&[1, 2, 3, 4, 5], n);
        input
            .iter()
            .copied()
            .chain(new.iter().map(|&t| t as i32))
            .collect()
    };
    let twelve = expected(12);
    // Random weights still make a varied sequence (the test would be weak otherwise).
    let distinct: std::collections::BTreeSet<_> = twelve[5..].iter().collect();
    assert!(distinct.len() > 1, "degenerate generation {twelve:?}");

    assert_eq!(client.infer(&input, 12).unwrap().output_ids, twelve);
    // A second job on the same model starts from a fresh KV cache.
    assert_eq!(client.infer(&input, 12).unwrap().output_ids, twelve);
    // max_tokens 0 means 8, as the Go stub; above the cap means the cap.
    assert_eq!(client.infer(&input, 0).unwrap().output_ids, expected(8));
    assert_eq!(client.infer(&input, 1000).unwrap().output_ids, expected(20));
    // A single token prompt, at the top of the vocabulary.
    let last = client.infer(&[255], 3).unwrap().output_ids;
    let new = direct.generate(&[255], 3);
    assert_eq!(last, [255, new[0] as i32, new[1] as i32, new[2] as i32]);
    drop(client);
    server.shutdown();
}

#[test]
fn f16_weights_are_converted() {
    let tensors = TINY.random_tensors(3);
    let half: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.to_dtype(DType::F16).unwrap()))
        .collect();
    // The reference runs the same rounded weights, in F32.
    let rounded: HashMap<String, Tensor> = half
        .iter()
        .map(|(k, v)| (k.clone(), v.to_dtype(DType::F32).unwrap()))
        .collect();
    let direct = Direct::new(&TINY.config_json(), &rounded);
    let server = node(CandleConfig::default());
    let mut client = Client::connect(server.local_addr()).unwrap();
    client
        .push_model(&TINY.config_json(), &safetensors_bytes(&half), false)
        .expect("an F16 model mounts");
    let new: Vec<i32> = direct
        .generate(&[10, 20], 6)
        .into_iter()
        .map(|t| t as i32)
        .collect();
    assert_eq!(
        client.infer(&[10, 20], 6).unwrap().output_ids,
        [&[10, 20][..], &new].concat()
    );
    drop(client);
    server.shutdown();
}

#[test]
fn corrupted_safetensors_is_refused() {
    let mut bytes = safetensors_bytes(&TINY.random_tensors(1));
    // Garbage in the JSON header.
    bytes[8..24].copy_from_slice(b"not a header!!!!");
    let message = refusal(&TINY.config_json(), &bytes);
    assert!(
        message.contains("not a valid safetensors file"),
        "{message}"
    );

    // Cut short: the header promises more bytes than there are.
    let bytes = safetensors_bytes(&TINY.random_tensors(1));
    let message = refusal(&TINY.config_json(), &bytes[..bytes.len() / 2]);
    assert!(
        message.contains("not a valid safetensors file"),
        "{message}"
    );

    let message = refusal(&TINY.config_json(), &[1, 2, 3, 4]);
    assert!(
        message.contains("not a valid safetensors file"),
        "{message}"
    );
}

#[test]
fn wrong_shape_names_the_tensor() {
    let mut tensors = TINY.random_tensors(1);
    let name = "model.layers.1.mlp.up_proj.weight";
    tensors.insert(
        name.to_owned(),
        Tensor::zeros((128, 63), DType::F32, &Device::Cpu).unwrap(),
    );
    let message = refusal(&TINY.config_json(), &safetensors_bytes(&tensors));
    assert!(message.contains(name), "{message}");
    assert!(
        message.contains("[128, 63]") && message.contains("[128, 64]"),
        "{message}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let mut tensors = TINY.random_tensors(1);
    tensors.remove("model.layers.0.self_attn.k_proj.weight");
    let message = refusal(&TINY.config_json(), &safetensors_bytes(&tensors));
    assert!(
        message.contains("lack 1 tensor")
            && message.contains("model.layers.0.self_attn.k_proj.weight"),
        "{message}"
    );
    // A config with more layers than the file holds.
    let config = TINY
        .config_json()
        .replace("\"num_hidden_layers\":2", "\"num_hidden_layers\":3");
    assert!(config.contains("\"num_hidden_layers\":3"));
    let message = refusal(&config, &safetensors_bytes(&TINY.random_tensors(1)));
    assert!(message.contains("model.layers.2."), "{message}");
}

#[test]
fn integer_tensor_is_a_wrong_dtype() {
    let mut tensors = TINY.random_tensors(1);
    tensors.insert(
        "model.norm.weight".to_owned(),
        Tensor::zeros(64, DType::I64, &Device::Cpu).unwrap(),
    );
    let message = refusal(&TINY.config_json(), &safetensors_bytes(&tensors));
    assert!(
        message.contains("model.norm.weight") && message.contains("dtype I64"),
        "{message}"
    );
}

#[test]
fn bad_configs_are_refused() {
    let weights = safetensors_bytes(&TINY.random_tensors(1));
    let good: serde_json::Value = serde_json::from_str(&TINY.config_json()).unwrap();
    let with = |key: &str, value: serde_json::Value| {
        let mut config = good.clone();
        config[key] = value;
        config.to_string()
    };
    let cases = [
        (
            with("model_type", "mistral".into()),
            "unsupported model_type \"mistral\"",
        ),
        ("{\"hidden_size\": 64}".to_owned(), "no model_type"),
        ("not json".to_owned(), "not JSON"),
        (
            with("num_attention_heads", 0.into()),
            "num_attention_heads is 0",
        ),
        (with("num_attention_heads", 3.into()), "hidden_size 64"),
        (with("num_key_value_heads", 3.into()), "not a multiple"),
        (with("vocab_size", "many".into()), "bad llama config"),
        (with("rms_norm_eps", (-1.0).into()), "rms_norm_eps"),
        (
            with("num_hidden_layers", 1_000_000_000.into()),
            "more than 4096",
        ),
        (with("hidden_size", (-64).into()), "bad llama config"),
    ];
    for (config, wanted) in cases {
        let message = refusal(&config, &weights);
        assert!(message.contains(wanted), "{config}: {message}");
    }
}

#[test]
fn bad_jobs_are_job_errors() {
    let server = node(CandleConfig::default());
    let mut client = Client::connect(server.local_addr()).unwrap();
    let tensors = TINY.random_tensors(1);
    client
        .push_model(&TINY.config_json(), &safetensors_bytes(&tensors), false)
        .unwrap();
    let failed = |result| match result {
        Err(Error::InferFailed(r)) => (r.code, r.error),
        other => panic!("expected a failed job, got {other:?}"),
    };
    let (code, error) = failed(client.infer(&[1, 999, 2], 4));
    assert_eq!(code, codes::BAD_INPUT);
    assert!(
        error.contains("input_ids[1] = 999") && error.contains("0..256"),
        "{error}"
    );
    let (code, _) = failed(client.infer(&[-1], 4));
    assert_eq!(code, codes::BAD_INPUT);
    let (code, error) = failed(client.infer(&[], 4));
    assert_eq!(code, codes::BAD_INPUT);
    assert!(error.contains("empty"), "{error}");
    // 510 + 8 > 512 positions.
    let (code, error) = failed(client.infer(&vec![7; 510], 0));
    assert_eq!(code, codes::BAD_INPUT);
    assert!(error.contains("context of 512"), "{error}");
    // The node is fine afterwards.
    assert_eq!(client.infer(&[1, 2], 2).unwrap().output_ids.len(), 4);
    // A prompt on a model_push node is refused (by the core, before the executor).
    assert!(client.prompt("hello", 4).is_err());
    drop(client);
    server.shutdown();
}

/// GPT-2's byte-to-character map: the alphabet of a byte-level BPE.
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut extra = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    let mut by_byte = vec!['\0'; 256];
    for (b, c) in printable.into_iter().zip(chars) {
        by_byte[b as usize] = char::from_u32(c).unwrap();
    }
    by_byte
}

/// A byte-level tokenizer.json: token id = byte value, 256 tokens, no merges.
fn byte_tokenizer_json() -> String {
    let vocab: serde_json::Map<String, serde_json::Value> = byte_chars()
        .into_iter()
        .enumerate()
        .map(|(b, c)| (c.to_string(), b.into()))
        .collect();
    let byte_level = serde_json::json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false
    });
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": []
        }
    })
    .to_string()
}

#[test]
fn local_lm_answers_prompts_with_the_directory_model() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = TINY.random_tensors(11);
    TINY.write(dir.path(), &tensors);
    std::fs::write(dir.path().join("tokenizer.json"), byte_tokenizer_json()).unwrap();

    // What candle and the tokenizer give directly.
    let tokenizer = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
    let prompt = "hello, world";
    let ids = tokenizer.encode(prompt, true).unwrap().get_ids().to_vec();
    assert_eq!(ids, prompt.bytes().map(u32::from).collect::<Vec<_>>());
    let direct = Direct::new(&TINY.config_json(), &tensors);
    let expected = tokenizer.decode(&direct.generate(&ids, 10), true).unwrap();
    assert!(!expected.is_empty());

    let executor = CandleExecutor::new(CandleConfig {
        local_lm: Some(dir.path().to_owned()),
        ..CandleConfig::default()
    })
    .expect("the directory loads");
    let config = ServerConfig::default()
        .mode(Mode::LocalLm)
        .local_lm_path(dir.path().display().to_string());
    let server =
        donate_std::serve(TcpListener::bind("127.0.0.1:0").unwrap(), config, executor).unwrap();
    let mut client = Client::connect(server.local_addr()).unwrap();
    assert_eq!(client.hello().mode, "local_lm");
    assert_eq!(client.prompt(prompt, 10).unwrap().text, expected);
    // max_out 0 means the default (64 tokens), and the cap bounds any request.
    let default = tokenizer.decode(&direct.generate(&ids, 64), true).unwrap();
    assert_eq!(client.prompt(prompt, 0).unwrap().text, default);
    // An empty prompt has no tokens with this tokenizer.
    match client.prompt("", 4) {
        Err(Error::PromptFailed(r)) => assert_eq!(r.code, codes::BAD_INPUT),
        other => panic!("expected bad_input, got {other:?}"),
    }
    drop(client);
    server.shutdown();
}

#[test]
fn local_lm_directory_must_be_complete() {
    let dir = tempfile::tempdir().unwrap();
    let config = |dir: &std::path::Path| CandleConfig {
        local_lm: Some(dir.to_owned()),
        ..CandleConfig::default()
    };
    let err = CandleExecutor::new(config(dir.path())).unwrap_err();
    assert!(err.contains("tokenizer.json is missing"), "{err}");
    std::fs::write(dir.path().join("tokenizer.json"), byte_tokenizer_json()).unwrap();
    let err = CandleExecutor::new(config(dir.path())).unwrap_err();
    assert!(err.contains("config.json"), "{err}");
    TINY.write(dir.path(), &TINY.random_tensors(1));
    std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
    let err = CandleExecutor::new(config(dir.path())).unwrap_err();
    assert!(err.contains("cannot load"), "{err}");
    std::fs::write(dir.path().join("tokenizer.json"), byte_tokenizer_json()).unwrap();
    let executor = CandleExecutor::new(config(dir.path())).expect("complete now");
    assert_eq!(executor.local_model().unwrap().vocab_size(), 256);

    // Each mode refuses the other's jobs.
    let plain = CandleExecutor::new(CandleConfig::default()).unwrap();
    assert_eq!(
        plain.complete("hi", 4).unwrap_err().code,
        codes::UNSUPPORTED
    );
    let weights = safetensors_bytes(&TINY.random_tensors(1));
    let model = plain.load(&TINY.config_json(), &weights).unwrap();
    assert_eq!(
        executor.generate(&model, &[1], 1).unwrap_err().code,
        codes::UNSUPPORTED
    );
    assert!(executor.load(&TINY.config_json(), &weights).is_err());
}

/// What a directory holds (a spooled upload's private directory, say).
fn entries(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}

#[test]
fn spooled_and_in_memory_uploads_give_the_same_model_and_leave_no_file() {
    let tensors = TINY.random_tensors(11);
    let (config_json, bytes) = (TINY.config_json(), safetensors_bytes(&tensors));
    let root = tempfile::tempdir().unwrap();
    let mut outputs = Vec::new();
    for spool_uploads in [true, false] {
        let server = node(CandleConfig {
            spool_uploads,
            temp_root: Some(root.path().to_owned()),
            ..CandleConfig::default()
        });
        let mut client = Client::connect(server.local_addr()).unwrap();
        client.push_model(&config_json, &bytes, true).unwrap();
        // The model was built from the file, which went at once.
        assert_eq!(entries(root.path()), Vec::<std::path::PathBuf>::new());
        outputs.push(client.infer(&[3, 1, 4], 6).unwrap().output_ids);
        // A refused upload leaves nothing either.
        assert!(client
            .push_model(&config_json, &bytes[..100], false)
            .is_err());
        assert_eq!(entries(root.path()), Vec::<std::path::PathBuf>::new());
        drop(client);
        server.shutdown();
    }
    let direct = Direct::new(&config_json, &tensors);
    let new = direct.generate(&[3, 1, 4], 6);
    let expected: Vec<i32> = [3, 1, 4]
        .into_iter()
        .chain(new.iter().map(|&t| t as i32))
        .collect();
    assert_eq!(outputs, [expected.clone(), expected]);
}

#[test]
fn a_job_past_its_timeout_stops_with_model_timeout() {
    let server = node(CandleConfig {
        job_timeout: Some(std::time::Duration::ZERO),
        ..CandleConfig::default()
    });
    let mut client = Client::connect(server.local_addr()).unwrap();
    let tensors = TINY.random_tensors(1);
    client
        .push_model(&TINY.config_json(), &safetensors_bytes(&tensors), false)
        .unwrap();
    match client.infer(&[1, 2], 4) {
        Err(Error::InferFailed(r)) => {
            assert_eq!(r.code, codes::MODEL_TIMEOUT);
            assert!(
                r.error.contains("stopped after 0 of 4 tokens"),
                "{}",
                r.error
            );
        }
        other => panic!("expected a timed-out job, got {other:?}"),
    }
    drop(client);
    server.shutdown();
}

/// The `sampling` extension over the wire: a seed gives the same tokens on
/// any connection, another seed others, no fields the greedy output; and
/// with `stream`, each token arrives as a partial before the result.
#[test]
fn sampling_by_seed_is_reproducible_over_the_wire_and_tokens_stream() {
    let tensors = TINY.random_tensors(5);
    let config_json = TINY.config_json();
    let direct = Direct::new(&config_json, &tensors);
    let server = node(CandleConfig::default());
    let connect = || {
        let mut client = Client::connect(server.local_addr()).unwrap();
        client
            .push_model(&config_json, &safetensors_bytes(&tensors), false)
            .expect("mounted");
        client
    };
    let seeded = |seed| donate_proto::SamplingParams {
        temperature: Some(2.0),
        top_k: Some(200),
        seed: Some(seed),
        ..Default::default()
    };
    let input = [3, 1, 4, 1, 5];
    let mut first = connect();
    let mut streamed = Vec::new();
    let request = first.send_infer_with(&input, 12, &seeded(7)).unwrap();
    let answer = first
        .wait_streaming(request, |p| match p {
            donate_proto::PartialOutput::Tokens(ids) => streamed.extend(ids),
            other => panic!("{other:?}"),
        })
        .unwrap();
    let a = donate_std::answers::infer(answer).unwrap().output_ids;
    assert_eq!(a[5..], streamed[..], "the partials are the generated ids");
    let b = connect()
        .infer_with(&input, 12, &seeded(7))
        .unwrap()
        .output_ids;
    assert_eq!(a, b, "same seed, same tokens, on another connection");
    let c = first.infer_with(&input, 12, &seeded(8)).unwrap().output_ids;
    assert_ne!(a, c, "another seed");
    let greedy: Vec<i32> = input
        .iter()
        .copied()
        .chain(
            direct
                .generate(&[3, 1, 4, 1, 5], 12)
                .iter()
                .map(|&t| t as i32),
        )
        .collect();
    assert_ne!(a, greedy, "sampled, not argmax");
    assert_eq!(first.infer(&input, 12).unwrap().output_ids, greedy);
    let bad = donate_proto::SamplingParams {
        top_p: Some(1.5),
        ..Default::default()
    };
    match first.infer_with(&input, 2, &bad) {
        Err(Error::InferFailed(r)) => {
            assert_eq!(r.code, codes::BAD_INPUT);
            assert!(r.error.contains("top_p"), "{}", r.error);
        }
        other => panic!("expected bad_input, got {other:?}"),
    }
    drop(first);
    server.shutdown();
}

/// A prompt's partial text, joined, is exactly its reply: with a byte-level
/// tokenizer and random weights the reply has split UTF-8 sequences, and a
/// stop string cuts it.
#[test]
fn streamed_prompt_text_joins_to_the_reply() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = TINY.random_tensors(11);
    TINY.write(dir.path(), &tensors);
    std::fs::write(dir.path().join("tokenizer.json"), byte_tokenizer_json()).unwrap();
    let executor = CandleExecutor::new(CandleConfig {
        local_lm: Some(dir.path().to_owned()),
        ..CandleConfig::default()
    })
    .expect("the directory loads");
    let config = ServerConfig::default().mode(Mode::LocalLm);
    let server =
        donate_std::serve(TcpListener::bind("127.0.0.1:0").unwrap(), config, executor).unwrap();
    let mut client = Client::connect(server.local_addr()).unwrap();
    let mut run = |sampling: &donate_proto::SamplingParams| {
        let request = client.send_prompt_with("hello", 40, sampling).unwrap();
        let mut parts = Vec::new();
        let answer = client
            .wait_streaming(request, |p| match p {
                donate_proto::PartialOutput::Text(t) => parts.push(t),
                other => panic!("{other:?}"),
            })
            .unwrap();
        (donate_std::answers::prompt(answer).unwrap().text, parts)
    };
    let (full, parts) = run(&Default::default());
    assert!(parts.len() > 1, "{parts:?}");
    assert_eq!(parts.concat(), full);
    // Cut at a stop string taken from the middle of the reply.
    let chars: Vec<char> = full.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let (cut, parts) = run(&donate_proto::SamplingParams {
        stop: vec![stop.clone()],
        ..Default::default()
    });
    assert_eq!(cut, full[..full.find(&stop).unwrap()]);
    assert_eq!(parts.concat(), cut);
    drop(client);
    server.shutdown();
}
