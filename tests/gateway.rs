//! `donate gateway` driven by the real `openai` Python package and by curl,
//! in front of a real donor (`donate serve --model` on the SmolLM2 GGUF):
//! greedy chat answers equal the donor's own for the same conversation,
//! streaming gives the same text piece by piece, and the package's own error
//! classes come back for a wrong key, an unknown model and `n=2`.
//!
//! Needs `DONATE_TEST_GGUF` and `DONATE_TEST_PYTHON` (a Python with `openai`;
//! `.ci/run` makes one); without them the test fails under CI and is skipped
//! otherwise.
#![cfg(feature = "candle")]

mod common;

use std::io::Write;
use std::process::Command;

use common::spawn_donate as spawn;

use donate_proto::{ChatMessage, PromptRequest, SamplingParams};

const BIN: &str = env!("CARGO_BIN_EXE_donate");

/// A variable the test needs; `None` (skipped) outside CI.
fn needed(name: &str) -> Option<String> {
    match std::env::var(name) {
        Ok(value) => Some(value),
        Err(_) if std::env::var_os("CI").is_some() => {
            panic!("CI is set but {name} is not: .ci/run sets it")
        }
        Err(_) => {
            eprintln!("note: skipped, {name} is unset");
            None
        }
    }
}

/// What the Python side does with the `openai` package; prints one JSON
/// object with what it saw.
const SCRIPT: &str = r#"
import json, sys, openai
base, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base, api_key=key, max_retries=0)
messages = [{"role": "system", "content": "You are brief."},
            {"role": "user", "content": [{"type": "text", "text": "Name a color."}]}]
out = {}
r = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
out["text"] = r.choices[0].message.content
out["finish"] = r.choices[0].finish_reason
out["usage"] = [r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens]
pieces = []
usage = None
for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=12,
        temperature=0, stream=True, stream_options={"include_usage": True}):
    if chunk.usage is not None:
        usage = [chunk.usage.prompt_tokens, chunk.usage.completion_tokens]
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
        if c.finish_reason:
            out["stream_finish"] = c.finish_reason
out["pieces"] = pieces
out["stream_usage"] = usage
out["models"] = [m.id for m in client.models.list()]
for name, call in [
    ("bad_key", lambda: openai.OpenAI(base_url=base, api_key="wrong", max_retries=0)
        .chat.completions.create(model=model, messages=messages)),
    ("unknown_model", lambda: client.chat.completions.create(model="no-such-model", messages=messages)),
    ("n2", lambda: client.chat.completions.create(model=model, messages=messages, n=2)),
]:
    try:
        call()
        out[name] = "no error"
    except openai.APIStatusError as e:
        out[name] = type(e).__name__
c = client.completions.create(model=model, prompt="The sky is", max_tokens=5, temperature=0)
out["completion"] = c.choices[0].text
print(json.dumps(out))
"#;

#[test]
fn the_openai_package_talks_to_donors_through_the_gateway() {
    let (Some(gguf), Some(python)) = (needed("DONATE_TEST_GGUF"), needed("DONATE_TEST_PYTHON"))
    else {
        return;
    };
    let (mut node, first) = spawn(&[
        "serve",
        "--addr",
        "127.0.0.1:0",
        "--mode",
        "local_lm",
        "--model",
        &gguf,
    ]);
    let addr = first.strip_prefix("listening on ").unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("api-keys");
    let mut file = std::fs::File::create(&keys).unwrap();
    writeln!(file, "# the test's key\nalice sk-test-alice").unwrap();
    drop(file);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let (mut gateway, first) = spawn(&[
        "gateway",
        "--listen",
        "127.0.0.1:0",
        "--node",
        &addr,
        "--api-keys",
        keys.to_str().unwrap(),
    ]);
    let base = first
        .strip_prefix("gateway listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
        .to_owned();
    let model = std::path::Path::new(&gguf)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let out = Command::new(&python)
        .args(["-c", SCRIPT, &format!("{base}/v1"), "sk-test-alice", &model])
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    // The donor's own answer to the same conversation, greedy.
    let mut donor = donate_std::Client::connect(addr.as_str()).unwrap();
    let mut request = PromptRequest::chat(
        vec![
            ChatMessage::new("system", "You are brief."),
            ChatMessage::new("user", "Name a color."),
        ],
        12,
    );
    request.sampling = SamplingParams {
        temperature: Some(0.0),
        ..SamplingParams::default()
    };
    let id = donor.submit_prompt(&request).unwrap();
    let direct = donor.wait_prompt(id).unwrap();
    let usage = direct.usage.unwrap();
    assert_eq!(seen["text"], direct.text.as_str(), "{seen}");
    assert!(!direct.text.is_empty());
    assert_eq!(
        seen["usage"],
        serde_json::json!([
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.prompt_tokens + usage.completion_tokens
        ])
    );
    assert_eq!(seen["finish"], usage.finish_reason.as_str());
    let pieces: Vec<&str> = seen["pieces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(pieces.len() > 1, "the answer came in one piece: {seen}");
    assert_eq!(pieces.concat(), direct.text);
    assert_eq!(seen["stream_finish"], usage.finish_reason.as_str());
    assert_eq!(
        seen["stream_usage"],
        serde_json::json!([usage.prompt_tokens, usage.completion_tokens])
    );
    assert_eq!(seen["models"], serde_json::json!([model]));
    assert_eq!(seen["bad_key"], "AuthenticationError");
    assert_eq!(seen["unknown_model"], "NotFoundError");
    assert_eq!(seen["n2"], "BadRequestError");
    // /v1/completions sends the prompt raw: the donor's raw answer.
    let raw = PromptRequest {
        raw: true,
        sampling: SamplingParams {
            temperature: Some(0.0),
            ..SamplingParams::default()
        },
        ..PromptRequest::text("The sky is", 5)
    };
    let id = donor.submit_prompt(&raw).unwrap();
    assert_eq!(
        seen["completion"],
        donor.wait_prompt(id).unwrap().text.as_str()
    );

    // curl: no key is a 401 in OpenAI's error shape; /health answers.
    let curl = |args: &[&str]| {
        let out = Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}"])
            .args(args)
            .output()
            .expect("curl");
        String::from_utf8(out.stdout).unwrap()
    };
    let no_key = curl(&[
        &format!("{base}/v1/chat/completions"),
        "-H",
        "content-type: application/json",
        "-d",
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
    ]);
    assert!(
        no_key.ends_with("\n401") && no_key.contains(r#""code":"invalid_api_key""#),
        "{no_key}"
    );
    let health = curl(&[&format!("{base}/health")]);
    assert!(
        health.ends_with("\n200") && health.contains(r#""donors_up":1"#),
        "{health}"
    );

    // A donor that is gone: 503, not a hang.
    let _ = node.kill();
    let _ = node.wait();
    let gone = curl(&[
        &format!("{base}/v1/chat/completions"),
        "-H",
        "authorization: Bearer sk-test-alice",
        "-H",
        "content-type: application/json",
        "-d",
        &format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#),
    ]);
    assert!(gone.ends_with("\n503"), "{gone}");

    // /metrics (with the key): requests by route and status, one streamed
    // request's time to first token, tokens/s of every finished one, and
    // the donor lost at the end.
    let metrics = curl(&[
        &format!("{base}/metrics"),
        "-H",
        "authorization: Bearer sk-test-alice",
    ]);
    assert!(metrics.ends_with("\n200"), "{metrics}");
    let value = |name: &str| -> f64 {
        let line = metrics
            .lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .unwrap_or_else(|| panic!("no {name} in {metrics}"));
        line[name.len()..].trim().parse().unwrap()
    };
    assert_eq!(
        value(r#"donate_gateway_requests_total{route="/v1/chat/completions",status="200"}"#),
        2.0
    );
    assert_eq!(
        value("donate_gateway_time_to_first_token_seconds_count"),
        1.0
    );
    assert!(value("donate_gateway_time_to_first_token_seconds_sum") > 0.0);
    assert_eq!(value("donate_gateway_tokens_per_second_count"), 3.0);
    assert!(
        value(&format!(
            r#"donate_gateway_donor_failures_total{{donor="{addr}"}}"#
        )) >= 1.0
    );
    assert_eq!(
        value(&format!(
            r#"donate_gateway_donor_in_flight{{donor="{addr}"}}"#
        )),
        0.0
    );
    let _ = gateway.kill();
    let _ = gateway.wait();
}

#[test]
fn the_gateway_refuses_to_listen_beyond_loopback_without_keys() {
    let out = Command::new(BIN)
        .args(["gateway", "--listen", "0.0.0.0:0", "--node", "127.0.0.1:1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("without --api-keys") && stderr.contains("--insecure"),
        "{stderr}"
    );
}

/// Two donors: 16 streams at once all complete with the greedy answer, and
/// each conversation's second turn goes to the donor of its first.
#[test]
fn streams_spread_over_two_donors_and_conversations_stay_on_theirs() {
    let (Some(gguf), Some(python)) = (needed("DONATE_TEST_GGUF"), needed("DONATE_TEST_PYTHON"))
    else {
        return;
    };
    let serve = || {
        let (child, first) = spawn(&[
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--mode",
            "local_lm",
            "--model",
            &gguf,
        ]);
        (
            child,
            first.strip_prefix("listening on ").unwrap().to_owned(),
        )
    };
    let (mut a, addr_a) = serve();
    let (mut b, addr_b) = serve();
    let (mut gateway, first) = spawn(&[
        "gateway",
        "--listen",
        "127.0.0.1:0",
        "--node",
        &addr_a,
        "--node",
        &addr_b,
    ]);
    let base = first
        .strip_prefix("gateway listening on ")
        .unwrap()
        .to_owned();
    let model = std::path::Path::new(&gguf)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let script = r#"
import json, sys, threading, openai
base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key="none", max_retries=0)
def ask(messages):
    r = client.chat.completions.with_raw_response.create(model=model, messages=messages,
        max_tokens=8, temperature=0)
    return r.headers["x-donate-donor"], r.parse().choices[0].message.content
texts = [None] * 16
def stream(i):
    parts = []
    for chunk in client.chat.completions.create(model=model, max_tokens=8, temperature=0,
            messages=[{"role": "user", "content": "Count to three."}], stream=True):
        for c in chunk.choices:
            parts.append(c.delta.content or "")
    texts[i] = "".join(parts)
threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
for t in threads: t.start()
for t in threads: t.join()
turns = []
for topic in ["cats", "the sea", "bread", "rain", "music", "trees"]:
    first = [{"role": "user", "content": "Tell me about " + topic + "."}]
    donor1, reply = ask(first)
    donor2, _ = ask(first + [{"role": "assistant", "content": reply},
                             {"role": "user", "content": "More."}])
    turns.append([donor1, donor2])
_, alone = ask([{"role": "user", "content": "Count to three."}])
print(json.dumps({"streams": texts, "alone": alone, "turns": turns}))
"#;
    let out = Command::new(&python)
        .args(["-c", script, &format!("{base}/v1"), &model])
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let alone = seen["alone"].as_str().unwrap();
    assert!(!alone.is_empty());
    for text in seen["streams"].as_array().unwrap() {
        assert_eq!(text, alone, "{seen}");
    }
    for turn in seen["turns"].as_array().unwrap() {
        assert_eq!(turn[0], turn[1], "a second turn changed donor: {seen}");
    }
    for child in [&mut a, &mut b, &mut gateway] {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Reads an HTTP answer's status line and headers (up to the blank line).
fn read_head(stream: &mut std::net::TcpStream) -> String {
    use std::io::Read as _;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A chat request on a new connection, the answer's head read.
fn ask_raw(
    base: &str,
    key: &str,
    model: &str,
    stream: bool,
    max_tokens: u32,
) -> (std::net::TcpStream, String) {
    let body = serde_json::json!({
        "model": model, "stream": stream, "max_tokens": max_tokens, "temperature": 0,
        "messages": [{"role": "user", "content": "Write a long story about the sea."}],
    })
    .to_string();
    let mut conn = std::net::TcpStream::connect(base.strip_prefix("http://").unwrap()).unwrap();
    conn.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    write!(
        conn,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let head = read_head(&mut conn);
    (conn, head)
}

/// One key's flood is refused past its concurrency (429 with Retry-After)
/// while another key's request is answered; streams whose clients leave are
/// cancelled on the donor.
#[test]
fn a_keys_flood_is_refused_past_its_limit_and_a_client_that_leaves_frees_its_donor() {
    use std::io::Read as _;
    let Some(gguf) = needed("DONATE_TEST_GGUF") else {
        return;
    };
    let (mut node, first) = spawn(&[
        "serve",
        "--addr",
        "127.0.0.1:0",
        "--mode",
        "local_lm",
        "--model",
        &gguf,
        "--stats",
    ]);
    let addr = first.strip_prefix("listening on ").unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("api-keys");
    std::fs::write(&keys, "flood sk-flood concurrency=2\ncalm sk-calm\n").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let (mut gateway, first) = spawn(&[
        "gateway",
        "--listen",
        "127.0.0.1:0",
        "--node",
        &addr,
        "--api-keys",
        keys.to_str().unwrap(),
    ]);
    let base = first
        .strip_prefix("gateway listening on ")
        .unwrap()
        .to_owned();
    let model = std::path::Path::new(&gguf)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();

    // Two long streams of the flooding key run; its third request is refused.
    let streams: Vec<_> = (0..2)
        .map(|_| {
            let (conn, head) = ask_raw(&base, "sk-flood", &model, true, 250);
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            conn
        })
        .collect();
    let (mut third, head) = ask_raw(&base, "sk-flood", &model, true, 250);
    assert!(head.starts_with("HTTP/1.1 429"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
    let mut body = String::new();
    third.read_to_string(&mut body).unwrap();
    assert!(body.contains("concurrency_limit"), "{body}");
    // The other key is answered meanwhile.
    let (mut calm, head) = ask_raw(&base, "sk-calm", &model, false, 4);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut body = String::new();
    calm.read_to_string(&mut body).unwrap();
    assert!(body.contains("\"chat.completion\""), "{body}");

    // The two streaming clients leave: their jobs stop on the donor.
    let mut donor = donate_std::Client::connect(addr.as_str()).unwrap();
    let running = |donor: &mut donate_std::Client| donor.stats().unwrap().unwrap().jobs_running;
    assert_eq!(running(&mut donor), 2, "both streams run on the donor");
    let left = std::time::Instant::now();
    drop(streams);
    let mut freed = None;
    for _ in 0..200 {
        if running(&mut donor) == 0 {
            freed = Some(left.elapsed());
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let freed = freed.expect("the jobs of clients that left still run after 2 s");
    eprintln!("donor freed {freed:?} after the clients left");
    let stats = donor.stats().unwrap().unwrap();
    // Only the other key's job ran to its end; the two were cut short (a
    // job whose connection closes counts as failed).
    assert_eq!(stats.jobs_done, 1, "{stats:?}");
    assert_eq!(
        stats.jobs_failed + stats.jobs_cancelled + stats.jobs_dropped,
        2,
        "{stats:?}"
    );
    // Their key's slots are free again.
    let (mut conn, head) = ask_raw(&base, "sk-flood", &model, false, 2);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let _ = conn.read_to_end(&mut Vec::new());
    // The next request reuses the donor connection that answered: no new one.
    let accepted = donor.stats().unwrap().unwrap().connections_accepted;
    let (mut conn, head) = ask_raw(&base, "sk-calm", &model, false, 2);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let _ = conn.read_to_end(&mut Vec::new());
    assert_eq!(
        donor.stats().unwrap().unwrap().connections_accepted,
        accepted,
        "the gateway opened a new donor connection"
    );

    // The keys file is read again when it changes: a new key works, a removed one not.
    std::fs::write(
        &keys,
        "calm sk-calm
late sk-late
",
    )
    .unwrap();
    let status = |key: &str| {
        let (_, head) = ask_raw(&base, key, &model, false, 1);
        head.split(' ').nth(1).unwrap_or_default().to_owned()
    };
    let mut seen = String::new();
    for _ in 0..50 {
        seen = status("sk-late");
        if seen == "200" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(seen, "200", "the new key was not taken within 5 s");
    assert_eq!(status("sk-flood"), "401");
    let _ = gateway.kill();
    let _ = gateway.wait();
    let _ = node.kill();
    let _ = node.wait();
}

/// `--tls-cert` and `--tls-key`: the `openai` package reaches the gateway
/// over HTTPS, trusting the gateway's self-signed certificate; plain HTTP
/// on the same port gets no answer.
#[test]
fn the_gateway_serves_https_with_its_certificate() {
    let (Some(gguf), Some(python)) = (needed("DONATE_TEST_GGUF"), needed("DONATE_TEST_PYTHON"))
    else {
        return;
    };
    let (mut node, first) = spawn(&[
        "serve",
        "--addr",
        "127.0.0.1:0",
        "--mode",
        "local_lm",
        "--model",
        &gguf,
    ]);
    let addr = first.strip_prefix("listening on ").unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        // A key others may read is refused, as a private key is.
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let out = Command::new(BIN)
            .args(["gateway", "--listen", "127.0.0.1:0", "--node", &addr])
            .args(["--tls-cert", cert_path.to_str().unwrap()])
            .args(["--tls-key", key_path.to_str().unwrap()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("chmod 600"),
            "{stderr}"
        );
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let (mut gateway, first) = spawn(&[
        "gateway",
        "--listen",
        "127.0.0.1:0",
        "--node",
        &addr,
        "--tls-cert",
        cert_path.to_str().unwrap(),
        "--tls-key",
        key_path.to_str().unwrap(),
    ]);
    let port = first
        .strip_prefix("gateway listening on https://127.0.0.1:")
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
        .to_owned();
    let model = std::path::Path::new(&gguf)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let script = r#"
import sys, openai
base, cert, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base, api_key="none", max_retries=0,
                       http_client=openai.DefaultHttpxClient(verify=cert))
r = client.chat.completions.create(model=model, max_tokens=4, temperature=0,
        messages=[{"role": "user", "content": "Say hi."}])
print(r.choices[0].message.content)
"#;
    let out = Command::new(&python)
        .args([
            "-c",
            script,
            &format!("https://localhost:{port}/v1"),
            cert_path.to_str().unwrap(),
            &model,
        ])
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
    // Plain HTTP to the TLS port: no HTTP answer.
    let mut plain = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
    plain
        .set_read_timeout(Some(std::time::Duration::from_secs(15)))
        .unwrap();
    let _ = plain.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    let mut answer = Vec::new();
    let _ = std::io::Read::read_to_end(&mut plain, &mut answer);
    assert!(!answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    let _ = gateway.kill();
    let _ = gateway.wait();
    let _ = node.kill();
    let _ = node.wait();
}
