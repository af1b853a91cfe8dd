//! Tokens per second of greedy generation, through a real node over loopback
//! (donate-std `serve` + `Client`, one job at a time) against candle run
//! directly in the same process on the same weights: the protocol's cost as a
//! ratio. With `DONATE_TEST_GGUF`, a GGUF file the same way (and llama.cpp
//! beside it with `DONATE_LLAMA_CPP_DIR`), 4 jobs at once with their tokens
//! stacked into one pass against one pass per job, and the peak RSS
//! (docs/CANDLE.md, Figures).
//!
//! ```text
//! cargo bench -p donate-candle --bench generate            # tiny + a 134M-parameter random llama
//! cargo bench -p donate-candle --bench generate -- --quick # tiny only, briefly (a smoke run)
//! ```

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use donate_candle::{CandleConfig, CandleExecutor};
use donate_proto::ServerConfig;
use donate_std::Client;
use support::{safetensors_bytes, Dims, Direct, SMALL, TINY};

/// Tokens in each job's prompt.
const PROMPT: usize = 8;
/// Tokens each job generates.
const GENERATE: usize = 32;

fn main() {
    if let Some(path) = std::env::var_os(gguf::RSS_CHILD) {
        // The child process of the peak-memory measurement (gguf::peak_rss).
        gguf::serve_one_prompt(std::path::Path::new(&path));
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    if let Some(path) = std::env::var_os("DONATE_TEST_GGUF").filter(|p| !p.is_empty()) {
        gguf::bench(std::path::Path::new(&path), if quick { 2 } else { 7 });
        gguf::peak_rss(std::path::Path::new(&path));
        if std::env::args().any(|a| a == "--gguf-only") {
            return;
        }
    }
    println!(
        "greedy generation of {GENERATE} tokens after an {PROMPT}-token prompt, F32 on the CPU, \
         {} candle threads; medians",
        candle_core::utils::get_num_threads()
    );
    println!(
        "{:<6} {:>11} {:>5} {:>9} {:>9} {:>9} {:>11} {:>12} {:>13}",
        "model",
        "params",
        "runs",
        "direct",
        "executor",
        "node",
        "node/direct",
        "node/executor",
        "node-executor"
    );
    println!(
        "{:<6} {:>11} {:>5} {:>9} {:>9} {:>9} {:>11} {:>12} {:>13}",
        "", "", "", "tok/s", "tok/s", "tok/s", "", "", "per job"
    );
    if quick {
        bench("tiny", TINY, 5);
    } else {
        bench("tiny", TINY, 50);
        bench("small", SMALL, 10);
    }
}

/// Runs `runs` jobs three ways, in turn (and in a rotating order, so that a
/// noisy machine disturbs all alike): candle's llama called directly on the
/// generated tensors (`direct`), [`CandleExecutor::generate`] in process on the
/// model loaded from the safetensors bytes (`executor`), and a job through a
/// node over loopback (`node`); prints the medians.
fn bench(name: &str, dims: Dims, runs: usize) {
    let tensors = dims.random_tensors(42);
    let config_json = dims.config_json();
    let direct = Direct::new(&config_json, &tensors);
    let prompt: Vec<u32> = (0..PROMPT as u32)
        .map(|i| (i * 37 + 5) % dims.vocab as u32)
        .collect();
    let prompt_i32: Vec<i32> = prompt.iter().map(|&t| t as i32).collect();

    let bytes = safetensors_bytes(&tensors);
    drop(tensors);
    let executor = CandleExecutor::new(CandleConfig::default()).expect("executor");
    let in_process = executor
        .load(&config_json, &bytes)
        .expect("loads in process");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let config = ServerConfig::default().max_model_len(4 << 30);
    let node_executor = CandleExecutor::new(CandleConfig::default()).expect("executor");
    let server = donate_std::serve(listener, config, node_executor).expect("serve");
    let mut client = Client::connect(server.local_addr()).expect("connect");
    let pushed = Instant::now();
    client
        .push_model(&config_json, &bytes, false)
        .expect("mounted");
    let push_time = pushed.elapsed();
    let mib = bytes.len() as f64 / (1 << 20) as f64;
    drop(bytes);

    // One warm-up each, and all three must agree.
    let reference = direct.generate(&prompt, GENERATE);
    let answer = client.infer(&prompt_i32, GENERATE as i64).expect("infer");
    let by_executor = executor
        .generate(&in_process, &prompt_i32, GENERATE as i64)
        .expect("generate");
    let as_u32 = |ids: &[i32]| ids[PROMPT..].iter().map(|&t| t as u32).collect::<Vec<_>>();
    assert_eq!(
        as_u32(&answer.output_ids),
        reference,
        "the node and candle disagree"
    );
    assert_eq!(
        as_u32(&by_executor),
        reference,
        "the executor and candle disagree"
    );

    let mut times = [Vec::new(), Vec::new(), Vec::new()];
    for run in 0..runs {
        for way in (0..3).map(|k| (k + run) % 3) {
            let start = Instant::now();
            match way {
                0 => drop(std::hint::black_box(direct.generate(&prompt, GENERATE))),
                1 => drop(std::hint::black_box(executor.generate(
                    &in_process,
                    &prompt_i32,
                    GENERATE as i64,
                ))),
                _ => drop(std::hint::black_box(
                    client.infer(&prompt_i32, GENERATE as i64).expect("infer"),
                )),
            }
            times[way].push(start.elapsed());
        }
    }
    let [d, e, n] = times.map(|mut t| median(&mut t));
    let rate = |t: Duration| GENERATE as f64 / t.as_secs_f64();
    println!(
        "{:<6} {:>11} {:>5} {:>9.1} {:>9.1} {:>9.1} {:>11.3} {:>12.3} {:>10.2} ms",
        name,
        dims.params(),
        runs,
        rate(d),
        rate(e),
        rate(n),
        rate(n) / rate(d),
        rate(n) / rate(e),
        (n.as_secs_f64() - e.as_secs_f64()) * 1e3
    );
    println!(
        "       (pushed {mib:.1} MiB over loopback and mounted in {:.2} s)",
        push_time.as_secs_f64()
    );
    drop(client);
    server.shutdown();
}

fn median(times: &mut [Duration]) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// A quantized GGUF llama (SmolLM2-135M Q4_1 in CI: `DONATE_TEST_GGUF`):
/// prompt processing and generation tokens/s through a node against the same
/// model code (our `qllama`, through [`CandleModel::generate`]) driven
/// directly, and candle-transformers' `quantized_llama` (the model we used
/// before, with candle's scalar Q4_1 dot product) beside them; in one process
/// on the same thread pools (so the same threads). Then the peak resident
/// memory of a node process serving the file.
mod gguf {
    use std::fs::File;
    use std::io::BufReader;
    use std::path::Path;
    use std::time::{Duration, Instant};

    use candle_core::quantized::gguf_file;
    use candle_core::{Device, Tensor};
    use candle_transformers::models::quantized_llama::ModelWeights;
    use donate_candle::{CandleConfig, CandleExecutor, CandleModel};
    use donate_proto::{Capabilities, Capability, ClientConfig, ServerConfig};
    use donate_std::Client;

    use super::median;

    /// Tokens in each job's prompt.
    const PROMPT: usize = 32;
    /// Tokens each long job generates.
    const GENERATE: usize = 32;

    /// Greedy generation on candle-transformers' model, the way candle's own
    /// quantized example does it: the prompt in one forward pass, then one
    /// token at a time.
    fn candle_transformers(base: &ModelWeights, prompt: &[u32], n: usize) -> Vec<u32> {
        let mut model = base.clone();
        let mut out = Vec::with_capacity(n);
        let mut pos = 0;
        let mut step = prompt.to_vec();
        while out.len() < n {
            let x = Tensor::new(step.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = model.forward(&x, pos).unwrap();
            pos += step.len();
            let next = logits
                .flatten_all()
                .unwrap()
                .argmax(0)
                .unwrap()
                .to_scalar::<u32>()
                .unwrap();
            out.push(next);
            step = vec![next];
        }
        out
    }

    pub fn bench(path: &Path, runs: usize) {
        let file_len = std::fs::metadata(path).expect("the GGUF file").len();
        let mut reader = BufReader::new(File::open(path).expect("open"));
        let content = gguf_file::Content::read(&mut reader).expect("a GGUF file");
        let base = ModelWeights::from_gguf(content, &mut reader, &Device::Cpu).expect("llama");
        drop(reader);
        let ours = CandleModel::load_gguf_file(path, &Device::Cpu, Default::default(), false)
            .expect("ours");
        let direct = |prompt: &[u32], n: usize| ours.generate(prompt, n, &[], None).expect("ours");
        let prompt: Vec<u32> = (0..PROMPT as u32).map(|i| 100 + i * 37 % 5000).collect();
        let prompt_i32: Vec<i32> = prompt.iter().map(|&t| t as i32).collect();

        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let executor = CandleExecutor::new(CandleConfig {
            max_tokens_cap: GENERATE,
            ..CandleConfig::default()
        })
        .expect("executor");
        let config = ServerConfig::default().max_model_len(4 << 30);
        let server = donate_std::serve(listener, config, executor).expect("serve");
        let connect = |caps: Capabilities| {
            let mut client = Client::connect_with(
                server.local_addr(),
                ClientConfig::default().capabilities(caps),
            )
            .expect("connect");
            let file = File::open(path).expect("open");
            client
                .push_model_from(r#"{"format":"gguf"}"#, file, file_len, None, |_| {})
                .expect("mounted");
            client
        };
        let mut plain = connect(Capabilities::NONE);
        let mut streaming = connect(Capabilities::NONE.with(Capability::Stream));

        // Warm-up, and the node must agree with the same code run directly.
        let reference = direct(&prompt, GENERATE);
        let before = candle_transformers(&base, &prompt, GENERATE);
        let node_ids = |client: &mut Client, n: usize| {
            let request = client.send_infer(&prompt_i32, n as i64).expect("infer");
            let mut partials = 0;
            let answer = client
                .wait_streaming(request, |_| partials += 1)
                .expect("answer");
            let ids = donate_std::answers::infer(answer).expect("ok").output_ids;
            (
                ids[PROMPT..].iter().map(|&t| t as u32).collect::<Vec<_>>(),
                partials,
            )
        };
        let (by_node, none) = node_ids(&mut plain, GENERATE);
        assert_eq!(by_node, reference, "the node and candle disagree");
        assert_eq!(none, 0);
        let (by_stream, partials) = node_ids(&mut streaming, GENERATE);
        assert_eq!(
            by_stream, reference,
            "the streaming node and candle disagree"
        );
        assert_eq!(partials, GENERATE, "one partial per token");

        // llama.cpp as a fifth way, its jobs interleaved with ours.
        let mut llama = std::env::var_os("DONATE_LLAMA_CPP_DIR")
            .filter(|d| !d.is_empty())
            .map(|dir| LlamaCpp::start(Path::new(&dir), path, &prompt));
        let ways = if llama.is_some() { 5 } else { 4 };

        // [way][short, long]: a 1-token job is prompt processing (and one
        // token); the long job minus it is generation.
        let mut times: [[Vec<Duration>; 2]; 5] = Default::default();
        for run in 0..runs {
            for way in (0..ways).map(|k| (k + run) % ways) {
                for (i, n) in [1, GENERATE].into_iter().enumerate() {
                    let start = Instant::now();
                    match way {
                        0 => drop(std::hint::black_box(direct(&prompt, n))),
                        1 => drop(std::hint::black_box(node_ids(&mut plain, n))),
                        2 => drop(std::hint::black_box(node_ids(&mut streaming, n))),
                        3 => drop(std::hint::black_box(candle_transformers(&base, &prompt, n))),
                        _ => {
                            // Timed inside node (the pipe is not llama.cpp's cost).
                            let took = llama.as_mut().expect("llama.cpp").job(n);
                            times[way][i].push(took);
                            continue;
                        }
                    }
                    times[way][i].push(start.elapsed());
                }
            }
        }
        let rates = times.map(|[mut short, mut long]| {
            if short.is_empty() {
                return (f64::NAN, f64::NAN);
            }
            let (s, l) = (median(&mut short), median(&mut long));
            let prompt_rate = PROMPT as f64 / s.as_secs_f64();
            let gen_rate = (GENERATE - 1) as f64 / (l.as_secs_f64() - s.as_secs_f64());
            (prompt_rate, gen_rate)
        });
        println!(
            "GGUF {} ({:.1} MiB), greedy, {PROMPT}-token prompt, {GENERATE} tokens, {} candle threads, {runs} runs, medians",
            path.file_name().unwrap_or_default().to_string_lossy(),
            file_len as f64 / (1 << 20) as f64,
            candle_core::utils::get_num_threads()
        );
        println!(
            "{:<22} {:>14} {:>14} {:>12} {:>12}",
            "way", "prompt tok/s", "gen tok/s", "prompt/direct", "gen/direct"
        );
        let (dp, dg) = rates[0];
        for (name, (p, g)) in [
            "direct (ours)",
            "node",
            "node, streaming",
            "candle-transformers",
            "llama.cpp",
        ]
        .into_iter()
        .zip(rates)
        .take(ways)
        {
            println!(
                "{name:<22} {p:>14.1} {g:>14.1} {:>12.3} {:>12.3}",
                p / dp,
                g / dg
            );
        }
        let same = before
            .iter()
            .zip(&reference)
            .take_while(|(a, b)| a == b)
            .count();
        println!(
            "greedy ids of candle-transformers' model equal to ours: first {same} of {GENERATE}"
        );
        drop((plain, streaming));
        server.shutdown();
        concurrent(path, &prompt_i32, runs);
        if let Some(llama) = llama {
            let agree = llama
                .ids
                .iter()
                .zip(&reference)
                .take_while(|(a, b)| a == b)
                .count();
            let (lp, lg) = rates[4];
            println!(
                "gen / llama.cpp gen: node {:.3}, node streaming {:.3}, direct {:.3}; \
                 prompt / llama.cpp prompt: node {:.3}",
                rates[1].1 / lg,
                rates[2].1 / lg,
                rates[0].1 / lg,
                rates[1].0 / lp
            );
            println!(
                "greedy ids equal to llama.cpp's (F32 KV cache): first {agree} of {}",
                reference.len()
            );
        }
    }

    /// Jobs generating at once through a node (`--workers 4`, one mounted
    /// model): aggregate generated tokens per second with their next tokens
    /// stacked into one forward pass, against one pass per job
    /// (`max_batch` 1) and one job alone; the three in turn, medians of `runs`.
    fn concurrent(path: &Path, prompt: &[i32], runs: usize) {
        const JOBS: usize = 4;
        let file_len = std::fs::metadata(path).expect("the GGUF file").len();
        let node = |max_batch: usize| {
            let executor = CandleExecutor::new(CandleConfig {
                max_tokens_cap: GENERATE,
                max_batch,
                ..CandleConfig::default()
            })
            .expect("executor");
            let config = ServerConfig::default().max_model_len(4 << 30).workers(JOBS);
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let server = donate_std::serve(listener, config, executor).expect("serve");
            let mut client = Client::connect(server.local_addr()).expect("connect");
            let file = File::open(path).expect("open");
            client
                .push_model_from(r#"{"format":"gguf"}"#, file, file_len, None, |_| {})
                .expect("mounted");
            (server, client)
        };
        // Each job's tokens per second, `jobs` at once on one connection.
        let rate = |client: &mut Client, jobs: usize| {
            let start = Instant::now();
            let requests: Vec<_> = (0..jobs)
                .map(|_| client.send_infer(prompt, GENERATE as i64).expect("infer"))
                .collect();
            let mut outputs = Vec::with_capacity(jobs);
            for request in requests {
                let answer = client.wait(request).expect("answer");
                outputs.push(donate_std::answers::infer(answer).expect("ok").output_ids);
            }
            assert!(outputs.windows(2).all(|w| w[0] == w[1]), "jobs disagree");
            (jobs * GENERATE) as f64 / start.elapsed().as_secs_f64()
        };
        let (stacked_node, mut stacked) = node(16);
        let (alone_node, mut one_by_one) = node(1);
        let mut rates: [Vec<f64>; 3] = Default::default();
        for run in 0..runs {
            for way in (0..3).map(|k| (k + run) % 3) {
                rates[way].push(match way {
                    0 => rate(&mut stacked, JOBS),
                    1 => rate(&mut one_by_one, JOBS),
                    _ => rate(&mut stacked, 1),
                });
            }
        }
        let [s, o, a] = rates.map(|mut r| {
            r.sort_by(f64::total_cmp);
            r[r.len() / 2]
        });
        println!(
            "{JOBS} jobs at once through a node, {PROMPT}-token prompts, {GENERATE} tokens each: \
             stacked {s:.1} tok/s, one pass per job {o:.1} tok/s: {:.2} x; one job alone {a:.1} tok/s: {:.2} x",
            s / o,
            s / a
        );
        drop((stacked, one_by_one));
        stacked_node.shutdown();
        alone_node.shutdown();
    }

    /// llama.cpp (node-llama-cpp installed in a directory) running
    /// `benches/llama_cpp.mjs` on the same file, ids and threads, timing one
    /// job per request.
    struct LlamaCpp {
        child: std::process::Child,
        input: std::process::ChildStdin,
        output: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
        /// Its greedy ids with an F32 KV cache.
        ids: Vec<u32>,
    }

    impl LlamaCpp {
        fn start(dir: &Path, model: &Path, prompt: &[u32]) -> LlamaCpp {
            use std::io::BufRead;
            let script = dir.join("donate-bench-llama-cpp.mjs");
            std::fs::write(&script, include_str!("llama_cpp.mjs")).expect("write the script");
            let ids: Vec<String> = prompt.iter().map(u32::to_string).collect();
            let mut child = std::process::Command::new("node")
                .arg(&script)
                .arg(model)
                .arg(ids.join(","))
                .arg(GENERATE.to_string())
                .arg(candle_core::utils::get_num_threads().to_string())
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("run node");
            let input = child.stdin.take().expect("stdin");
            let output = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
            let mut llama = LlamaCpp {
                child,
                input,
                output,
                ids: Vec::new(),
            };
            llama.ids = llama
                .line("ids ")
                .split(',')
                .map(|t| t.parse().expect("an id"))
                .collect();
            llama.line("ready");
            llama
        }

        /// The rest of the next line that starts with `tag` (others are skipped).
        fn line(&mut self, tag: &str) -> String {
            loop {
                let line = self
                    .output
                    .next()
                    .expect("llama.cpp ended early")
                    .expect("read llama.cpp");
                if let Some(rest) = line.strip_prefix(tag) {
                    return rest.to_owned();
                }
            }
        }

        /// One job of `n` tokens, as llama.cpp timed it.
        fn job(&mut self, n: usize) -> Duration {
            use std::io::Write;
            writeln!(self.input, "{n}").expect("write to llama.cpp");
            let line = self.line("ms ");
            let ms: f64 = line
                .parse()
                .unwrap_or_else(|_| panic!("not a time: {line}"));
            Duration::from_secs_f64(ms / 1e3)
        }
    }

    impl Drop for LlamaCpp {
        fn drop(&mut self) {
            use std::io::Write;
            let _ = writeln!(self.input, "0");
            let _ = self.child.wait();
        }
    }

    /// The environment variable that makes the bench a node process serving
    /// one prompt (its value: the GGUF file), for [`peak_rss`].
    pub const RSS_CHILD: &str = "DONATE_BENCH_RSS_CHILD";

    /// Runs this bench again as a child process that loads the GGUF file as a
    /// `local_lm` node, answers one prompt through it over loopback, and
    /// prints its peak resident memory (`VmHWM`); prints that against the
    /// goal, 1.3 × the file + 64 MiB.
    pub fn peak_rss(path: &Path) {
        let exe = std::env::current_exe().expect("this bench");
        let output = std::process::Command::new(exe)
            .env(RSS_CHILD, path)
            .output()
            .expect("run the child");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "the child failed: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let kib: u64 = stdout
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM_kB "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmHWM in {stdout}"));
        let file = std::fs::metadata(path).expect("the GGUF file").len() as f64;
        let mib = |b: f64| b / (1 << 20) as f64;
        let goal = 1.3 * file + 64.0 * (1 << 20) as f64;
        let peak = kib as f64 * 1024.0;
        println!(
            "peak RSS of a local_lm node process after one {GENERATE}-token prompt: {:.1} MiB; \
             goal 1.3 × {:.1} MiB + 64 MiB = {:.1} MiB; peak / goal {:.3}",
            mib(peak),
            mib(file),
            mib(goal),
            peak / goal
        );
    }

    /// The child of [`peak_rss`]: a local_lm node on `path`, one prompt, VmHWM.
    pub fn serve_one_prompt(path: &Path) {
        let executor = CandleExecutor::new(CandleConfig {
            local_lm: Some(path.to_owned()),
            ..CandleConfig::default()
        })
        .expect("the GGUF file loads");
        let config = ServerConfig::default()
            .mode(donate_proto::Mode::LocalLm)
            .local_lm_path(path.display().to_string());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let server = donate_std::serve(listener, config, executor).expect("serve");
        let mut client = Client::connect(server.local_addr()).expect("connect");
        let reply = client
            .prompt("What is the capital of France?", GENERATE as i64)
            .expect("prompt");
        assert!(!reply.text.is_empty());
        drop(client);
        server.shutdown();
        let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        let hwm = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .expect("VmHWM")
            .trim()
            .trim_end_matches("kB")
            .trim()
            .to_owned();
        println!("VmHWM_kB {hwm}");
    }
}
