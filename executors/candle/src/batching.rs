//! A measurement, not a feature: what decoding several jobs' next tokens in
//! one forward pass would gain on the CPU (issue 17 asks to measure batching
//! across connections before keeping it). `benches/generate.rs` prints it.

use std::time::Instant;

use candle_core::{Device, Tensor, D};

use crate::CandleModel;

/// Aggregate greedy decode rate, tokens per second, of `batch` sequences
/// stepped together: after one shared `prompt`, `steps` forward passes of
/// shape `[batch, 1]`, each sequence taking its own argmax. `batch` 1 is one
/// job as the node runs it. `None` for a model that is not our GGUF llama/qwen2.
#[doc(hidden)]
pub fn batched_decode_rate(
    model: &CandleModel,
    prompt: &[u32],
    batch: usize,
    steps: usize,
) -> Option<Result<f64, String>> {
    let q = model.qllama()?;
    let run = || -> candle_core::Result<f64> {
        let mut cache = q.new_cache();
        let x = Tensor::new(prompt, &Device::Cpu)?
            .unsqueeze(0)?
            .repeat((batch, 1))?;
        let mut next = q.forward(&mut cache, &x, 0)?.argmax(D::Minus1)?;
        let start = Instant::now();
        for step in 0..steps {
            let x = next.unsqueeze(1)?;
            next = q
                .forward(&mut cache, &x, prompt.len() + step)?
                .argmax(D::Minus1)?;
        }
        Ok((batch * steps) as f64 / start.elapsed().as_secs_f64())
    };
    Some(run().map_err(|e| e.to_string()))
}
