//! Gateway benchmark (issue 25): a real donor (`donate serve --mode local_lm
//! --model FILE.gguf`, the release binary) answered straight with the
//! protocol's client and through `donate gateway` (OpenAI streaming over
//! HTTP, Server-Sent Events), interleaved round by round in one run:
//!
//! - one streamed answer of up to 128 tokens: time to first token and
//!   tokens/s (from the first token to the last), medians;
//! - 8 streams at once on the one donor: aggregate tokens/s;
//! - the gateway's resident memory per open stream (RSS with 8 streams open
//!   less RSS idle, over 8).
//!
//! ```text
//! DONATE_TEST_GGUF=target/models/SmolLM2-135M-Instruct.Q4_1.gguf \
//!     cargo bench --features candle --bench gateway            # 7 rounds
//! ... cargo bench --features candle --bench gateway -- --quick # 2 rounds
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use donate_proto::{ChatMessage, PartialOutput, PromptRequest, SamplingParams};

const BIN: &str = env!("CARGO_BIN_EXE_donate");
const MAX_TOKENS: i64 = 128;
const CONCURRENT: usize = 8;
const QUESTION: &str = "Write a long story about a lighthouse keeper and the sea.";

/// `donate ARGS`, and the first line it printed.
fn spawn(args: &[&str]) -> (Child, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn donate");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line.trim_end().to_owned())
}

/// One streamed answer: seconds to its first token, and its tokens over the
/// seconds from the first token to the last.
#[derive(Debug, Clone, Copy)]
struct Run {
    first_token: f64,
    tokens: i64,
    streaming: f64,
    total: f64,
}

impl Run {
    fn rate(&self) -> f64 {
        (self.tokens - 1).max(1) as f64 / self.streaming.max(1e-9)
    }
}

fn greedy() -> SamplingParams {
    SamplingParams {
        temperature: Some(0.0),
        ..SamplingParams::default()
    }
}

/// Straight to the donor, streamed.
fn direct(addr: &str) -> Run {
    let start = Instant::now();
    let mut client = donate_std::Client::connect(addr).expect("connect to the donor");
    let mut request = PromptRequest::chat(vec![ChatMessage::new("user", QUESTION)], MAX_TOKENS);
    request.sampling = greedy();
    let id = client.submit_prompt(&request).unwrap();
    let mut first = None;
    let answer = client
        .wait_streaming(id, |partial| {
            if matches!(partial, PartialOutput::Text(_)) && first.is_none() {
                first = Some(Instant::now());
            }
        })
        .unwrap();
    let end = Instant::now();
    let result = donate_std::answers::prompt(answer).unwrap();
    let first = first.unwrap_or(end);
    Run {
        first_token: (first - start).as_secs_f64(),
        tokens: result.usage.map_or(0, |u| u.completion_tokens),
        streaming: (end - first).as_secs_f64(),
        total: (end - start).as_secs_f64(),
    }
}

/// Through the gateway: `POST /v1/chat/completions` with `stream: true`,
/// the SSE read line by line.
fn gateway(base: &str, model: &str) -> Run {
    let body = serde_json::json!({
        "model": model, "stream": true, "max_tokens": MAX_TOKENS, "temperature": 0,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": QUESTION}],
    })
    .to_string();
    let start = Instant::now();
    let mut conn = TcpStream::connect(base).expect("connect to the gateway");
    conn.set_nodelay(true).unwrap();
    write!(
        conn,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reader = BufReader::new(conn);
    let (mut first, mut tokens) = (None, 0);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        let Some(data) = line.trim_end().strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let event: serde_json::Value = serde_json::from_str(data).unwrap();
        let content = &event["choices"][0]["delta"]["content"];
        if content.as_str().is_some_and(|c| !c.is_empty()) && first.is_none() {
            first = Some(Instant::now());
        }
        if let Some(n) = event["usage"]["completion_tokens"].as_i64() {
            tokens = n;
        }
    }
    let end = Instant::now();
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    let first = first.unwrap_or(end);
    Run {
        first_token: (first - start).as_secs_f64(),
        tokens,
        streaming: (end - first).as_secs_f64(),
        total: (end - start).as_secs_f64(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `CONCURRENT` of `one` at once: aggregate tokens per second of wall time.
fn concurrent(one: impl Fn() -> Run + Sync) -> f64 {
    let start = Instant::now();
    let runs: Vec<Run> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CONCURRENT).map(|_| s.spawn(&one)).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let tokens: i64 = runs.iter().map(|r| r.tokens).sum();
    tokens as f64 / start.elapsed().as_secs_f64()
}

/// Resident memory of `pid`, bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let Ok(gguf) = std::env::var("DONATE_TEST_GGUF") else {
        eprintln!("gateway bench: set DONATE_TEST_GGUF to the SmolLM2 GGUF (docs/PERFORMANCE.md)");
        return;
    };
    let rounds = if quick { 2 } else { 7 };
    let model = std::path::Path::new(&gguf)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let (mut node, first) = spawn(&[
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
    let addr = first.strip_prefix("listening on ").unwrap().to_owned();
    let (mut gw, first) = spawn(&["gateway", "--listen", "127.0.0.1:0", "--node", &addr]);
    let base = first
        .strip_prefix("gateway listening on http://")
        .unwrap()
        .to_owned();
    // Warm both paths (the model's first pass, the gateway's first connection).
    direct(&addr);
    gateway(&base, &model);

    let (mut d, mut g) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        d.push(direct(&addr));
        g.push(gateway(&base, &model));
    }
    let idle_rss = rss(gw.id());
    let (mut d8, mut g8) = (Vec::new(), Vec::new());
    let mut peak_rss = idle_rss;
    for _ in 0..rounds.min(3) {
        d8.push(concurrent(|| direct(&addr)));
        let pid = gw.id();
        let sampler_stop = std::sync::atomic::AtomicBool::new(false);
        let (rate, peak) = std::thread::scope(|s| {
            let sampler = s.spawn(|| {
                let mut peak = 0;
                while !sampler_stop.load(std::sync::atomic::Ordering::Relaxed) {
                    peak = peak.max(rss(pid));
                    std::thread::sleep(Duration::from_millis(5));
                }
                peak
            });
            let rate = concurrent(|| gateway(&base, &model));
            sampler_stop.store(true, std::sync::atomic::Ordering::Relaxed);
            (rate, sampler.join().unwrap())
        });
        g8.push(rate);
        peak_rss = peak_rss.max(peak);
    }

    let tokens = g.iter().map(|r| r.tokens).max().unwrap_or(0);
    let med = |runs: &[Run], f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
    let (d_ttft, g_ttft) = (med(&d, |r| r.first_token), med(&g, |r| r.first_token));
    let (d_rate, g_rate) = (med(&d, Run::rate), med(&g, Run::rate));
    let (d_total, g_total) = (med(&d, |r| r.total), med(&g, |r| r.total));
    println!(
        "gateway bench: {rounds} interleaved rounds, {tokens} tokens per answer, model {model}"
    );
    println!("| | direct | gateway | gateway / direct |");
    println!("|---|---|---|---|");
    println!(
        "| time to first token, median | {:.2} ms | {:.2} ms | +{:.2} ms |",
        d_ttft * 1e3,
        g_ttft * 1e3,
        (g_ttft - d_ttft) * 1e3
    );
    println!(
        "| streamed tokens/s, median | {d_rate:.1} | {g_rate:.1} | {:.3} |",
        g_rate / d_rate
    );
    println!(
        "| whole answer, median | {:.1} ms | {:.1} ms | {:.3} |",
        d_total * 1e3,
        g_total * 1e3,
        g_total / d_total
    );
    let (d8m, g8m) = (median(d8), median(g8));
    println!(
        "| {CONCURRENT} streams at once, aggregate tokens/s | {d8m:.1} | {g8m:.1} | {:.3} |",
        g8m / d8m
    );
    println!(
        "gateway RSS: {:.1} MiB idle, {:.1} MiB peak with {CONCURRENT} streams: {:.1} KiB per open stream",
        idle_rss as f64 / 1048576.0,
        peak_rss as f64 / 1048576.0,
        peak_rss.saturating_sub(idle_rss) as f64 / 1024.0 / CONCURRENT as f64
    );
    let _ = gw.kill();
    let _ = gw.wait();
    let _ = node.kill();
    let _ = node.wait();
}
