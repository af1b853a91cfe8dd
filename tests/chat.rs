//! Extension `chat` (docs/PROTOCOL.md §10.9) end to end, with the real
//! SmolLM2 GGUF behind `donate serve --model`: a conversation goes through the
//! model's own template (the same tokens as the rendered text sent raw), the
//! answer carries its token counts and finish reason, and a Go client's bytes
//! still read exactly v1.
#![cfg(feature = "candle")]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use donate_proto::{ChatMessage, FinishReason, PromptRequest, SamplingParams};
use donate_std::Client;

const BIN: &str = env!("CARGO_BIN_EXE_donate");

/// SmolLM2's chat template with a system turn and one user turn, rendered
/// (the text the node must build from the same two messages).
const RENDERED: &str = "<|im_start|>system\nYou answer in French.<|im_end|>\n<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n";

/// `donate serve --model` on the real GGUF, and its address; `None` (skipped)
/// outside CI without `DONATE_TEST_GGUF`.
fn serve() -> Option<(common::Spawned, String)> {
    let gguf = match std::env::var("DONATE_TEST_GGUF") {
        Ok(path) => path,
        Err(_) if std::env::var_os("CI").is_some() => {
            panic!("CI is set but DONATE_TEST_GGUF is not: .ci/run fetches the SmolLM2 GGUF")
        }
        Err(_) => {
            eprintln!("note: skipped, DONATE_TEST_GGUF is unset (docs/CANDLE.md)");
            return None;
        }
    };
    let (child, line) = common::spawn_donate(&[
        "serve",
        "--addr",
        "127.0.0.1:0",
        "--mode",
        "local_lm",
        "--model",
        &gguf,
        "--job-timeout",
        "600",
    ]);
    let addr = line
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    Some((child, addr))
}

fn conversation() -> Vec<ChatMessage> {
    vec![
        ChatMessage::new("system", "You answer in French."),
        ChatMessage::new("user", "Say hello."),
    ]
}

#[test]
fn a_conversation_runs_through_the_models_template_with_its_usage() {
    let Some((mut node, addr)) = serve() else {
        return;
    };
    let mut client = Client::connect(addr.as_str()).unwrap();
    let chat = client
        .submit_prompt(&PromptRequest::chat(conversation(), 24))
        .unwrap();
    let chat = client.wait_prompt(chat).unwrap();
    let raw = client
        .submit_prompt(&PromptRequest {
            raw: true,
            ..PromptRequest::text(RENDERED, 24)
        })
        .unwrap();
    let raw = client.wait_prompt(raw).unwrap();
    assert!(chat.ok && raw.ok, "{chat:?} {raw:?}");
    assert!(!chat.text.is_empty());
    assert_eq!(chat.text, raw.text, "the template rendered other text");
    let (usage, raw_usage) = (chat.usage.unwrap(), raw.usage.unwrap());
    assert_eq!(usage, raw_usage);
    assert!(usage.prompt_tokens > 10, "{usage:?}");
    assert!((1..=24).contains(&usage.completion_tokens), "{usage:?}");

    // A short limit ends on length; the same text prompt without `chat`
    // (a client that did not agree it) gets the same text and no usage.
    let short = client
        .submit_prompt(&PromptRequest::text("Tell me a long story.", 3))
        .unwrap();
    let short = client.wait_prompt(short).unwrap();
    let usage = short.usage.unwrap();
    assert_eq!(usage.finish_reason, FinishReason::Length, "{short:?}");
    assert_eq!(usage.completion_tokens, 3);
    let mut v1 = Client::connect_with(
        addr.as_str(),
        donate_proto::ClientConfig::default().capabilities(donate_proto::Capabilities::NONE),
    )
    .unwrap();
    let plain = v1.prompt("Tell me a long story.", 3).unwrap();
    assert_eq!(
        (plain.text.as_str(), plain.usage),
        (short.text.as_str(), None)
    );
    // ...and cannot send a conversation to a node it did not agree `chat` with.
    let refused = v1.submit_prompt(&PromptRequest::chat(conversation(), 3));
    assert!(
        matches!(refused, Err(donate_std::Error::Misuse(_))),
        "{refused:?}"
    );

    // A model's `stop` strings end the reply with `stop`.
    let mut stop = PromptRequest::chat(conversation(), 24);
    stop.sampling = SamplingParams {
        stop: vec![chat.text.chars().take(2).collect()],
        ..SamplingParams::default()
    };
    let stopped = client.submit_prompt(&stop).unwrap();
    let stopped = client.wait_prompt(stopped).unwrap();
    assert_eq!(stopped.text, "", "{stopped:?}");
    assert_eq!(stopped.usage.unwrap().finish_reason, FinishReason::Stop);
    let _ = node.kill();
    let _ = node.wait();
}

/// The bytes a Go client reads: it names no capabilities, so a `messages`
/// field it sends is a stray field the node never reads, and its answer has
/// exactly v1's fields. A turn of an unknown role from a `chat` client is
/// refused as a bad field, naming the job.
#[test]
fn a_go_client_reads_v1_bytes_and_bad_roles_are_refused() {
    let Some((mut node, addr)) = serve() else {
        return;
    };
    let mut go = TcpStream::connect(&addr).unwrap();
    go.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    go.write_all(&common::client_hello("local_lm")).unwrap();
    go.write_all(&common::fj(
        r#"{"v":1,"type":"prompt","job_id":"g1","prompt":"Hi","max_out":2,"messages":[{"role":"user","content":"ignored"}],"raw":true}"#,
    ))
    .unwrap();
    let hello = read_frame(&mut go);
    assert!(hello.contains("\"chat\""), "the node offers chat: {hello}");
    let answer = read_frame(&mut go);
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        ["job_id", "ok", "queue_depth", "text", "type", "v"],
        "{answer}"
    );
    // The same bytes' text as a v1 prompt "Hi" from our client without chat.
    let mut v1 = Client::connect_with(
        addr.as_str(),
        donate_proto::ClientConfig::default().capabilities(donate_proto::Capabilities::NONE),
    )
    .unwrap();
    assert_eq!(v["text"], v1.prompt("Hi", 2).unwrap().text);

    let mut chat = TcpStream::connect(&addr).unwrap();
    chat.set_read_timeout(Some(Duration::from_secs(300)))
        .unwrap();
    chat.write_all(&common::fj(
        r#"{"v":1,"type":"hello","mode":"local_lm","role":"client","capabilities":["chat"]}"#,
    ))
    .unwrap();
    chat.write_all(&common::fj(
        r#"{"v":1,"type":"prompt","job_id":"c1","messages":[{"role":"tool","content":"x"}]}"#,
    ))
    .unwrap();
    let _hello = read_frame(&mut chat);
    let refusal = read_frame(&mut chat);
    assert!(
        refusal.contains(r#""code":"bad_field""#)
            && refusal.contains(r#""job_id":"c1""#)
            && refusal.contains("tool"),
        "{refusal}"
    );
    let _ = node.kill();
    let _ = node.wait();
}

fn read_frame(stream: &mut TcpStream) -> String {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    stream.read_exact(&mut body).unwrap();
    String::from_utf8(body).unwrap()
}

/// `donate prompt --system` and `donate chat`, as a user types them: the
/// answers are the node's own for the same conversation, and `chat` sends
/// the whole conversation each turn.
#[test]
fn prompt_with_system_and_a_chat_session_through_the_cli() {
    let Some((mut node, addr)) = serve() else {
        return;
    };
    let direct = |messages: Vec<ChatMessage>| {
        let mut client = Client::connect(addr.as_str()).unwrap();
        let id = client
            .submit_prompt(&PromptRequest::chat(messages, 12))
            .unwrap();
        client.wait_prompt(id).unwrap().text
    };
    let out = Command::new(BIN)
        .args(["prompt", "--addr", &addr, "--max-out", "12"])
        .args(["--system", "You answer in French.", "Say hello."])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = direct(conversation());
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{first}\n"));

    let mut chat = Command::new(BIN)
        .args(["chat", "--addr", &addr, "--max-out", "12"])
        .args(["--system", "You answer in French."])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    chat.stdin
        .take()
        .unwrap()
        .write_all(b"Say hello.\nAnd goodbye?\n")
        .unwrap();
    let out = chat.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut turns = conversation();
    turns.push(ChatMessage::new("assistant", &first));
    turns.push(ChatMessage::new("user", "And goodbye?"));
    let second = direct(turns);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{first}\n{second}\n")
    );
    let _ = node.kill();
    let _ = node.wait();
}

/// A node without `chat` (the stub): `--system` and `donate chat` say what
/// they need, and send nothing.
#[test]
fn system_and_chat_need_a_node_offering_chat() {
    let (mut node, line) =
        common::spawn_donate(&["serve", "--addr", "127.0.0.1:0", "--mode", "local_lm"]);
    let addr = line.strip_prefix("listening on ").unwrap().to_owned();
    for args in [
        vec!["prompt", "--addr", &addr, "--system", "x", "hi"],
        vec!["chat", "--addr", &addr],
    ] {
        let out = Command::new(BIN)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("does not offer the chat extension") && stderr.lines().count() == 1,
            "{args:?}: {stderr}"
        );
    }
    let _ = node.kill();
    let _ = node.wait();
}
