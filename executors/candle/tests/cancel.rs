//! A cancelled generation stops between tokens and frees its worker thread
//! within 50 ms, measured on a random llama large enough
//! that the job would otherwise run for seconds.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use donate_candle::{CandleConfig, CandleExecutor};
use donate_proto::{Executor, JobContext, Weights};
use support::{safetensors_bytes, Dims};

/// 4 layers, hidden 256: a few ms per token on a CPU, so 4000 tokens take seconds.
const MEDIUM: Dims = Dims {
    hidden: 256,
    intermediate: 512,
    layers: 4,
    heads: 4,
    kv_heads: 2,
    vocab: 256,
    max_pos: 4096,
};

#[test]
fn a_cancelled_generation_frees_its_worker_within_50_ms() {
    let executor = Arc::new(
        CandleExecutor::new(CandleConfig {
            max_tokens_cap: 4000,
            spool_uploads: false,
            ..CandleConfig::default()
        })
        .expect("executor"),
    );
    let weights = safetensors_bytes(&MEDIUM.random_tensors(3));
    let model = Arc::new(
        executor
            .mount(MEDIUM.config_json(), Weights::Memory(weights))
            .expect("mount"),
    );
    let flag = Arc::new(AtomicBool::new(false));
    let job = {
        let (executor, model, flag) = (executor.clone(), model.clone(), flag.clone());
        thread::spawn(move || {
            let context = JobContext::new("long").with_cancel(&flag);
            let started = Instant::now();
            let result = executor.infer(&model, &[1, 2, 3], 4000, &context);
            (result, started, Instant::now())
        })
    };
    thread::sleep(Duration::from_millis(300));
    let cancelled_at = Instant::now();
    flag.store(true, Ordering::Relaxed);
    let (result, started, done_at) = job.join().expect("the job thread");
    let freed_in = done_at.saturating_duration_since(cancelled_at);
    eprintln!(
        "generation ran {:?}, freed {freed_in:?} after the cancel",
        cancelled_at - started
    );
    let error = result.expect_err("cut short by the cancel, not finished");
    assert_eq!(error.code, "cancelled", "{error:?}");
    assert!(freed_in <= Duration::from_millis(50), "{freed_in:?}");
    // The same executor and model still serve the next job.
    let out = executor
        .infer(&model, &[1, 2, 3], 2, &JobContext::new("next"))
        .expect("a job after a cancelled one");
    assert_eq!(out.len(), 5);
}
