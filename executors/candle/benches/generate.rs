//! Tokens per second of greedy generation, through a real node over loopback
//! (donate-std `serve` + `Client`, one job at a time) against candle run
//! directly in the same process on the same weights: the protocol's cost as a
//! ratio.
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
    let quick = std::env::args().any(|a| a == "--quick");
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
