//! [`Sampling`]: how the next token is picked from the logits.

use candle_core::{DType, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling as CandleSampling};

/// Most stop strings a job may name (each is searched for after every token).
pub const MAX_STOPS: usize = 16;
/// Longest stop string, in bytes.
pub const MAX_STOP_LEN: usize = 256;

/// How a job picks each next token. [`Sampling::default`] is greedy (argmax,
/// no penalty): the executor's output before sampling existed, token for token.
///
/// A node sets one for all its jobs (`donate serve --temperature … --seed …`);
/// a job's own fields (extension `sampling`, docs/PROTOCOL.md §10.7) override
/// it field by field ([`CandleExecutor::job_sampling`](crate::CandleExecutor::job_sampling)), and
/// [`CandleExecutor::generate_with`](crate::CandleExecutor::generate_with) /
/// [`complete_with`](crate::CandleExecutor::complete_with) take one per call.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Sampling {
    /// Softmax temperature; 0 or less (the default) is greedy argmax, and then
    /// `top_k`, `top_p` and `seed` are unused.
    pub temperature: f64,
    /// Keep only the smallest set of tokens whose probabilities reach `p` (0 < p < 1).
    pub top_p: Option<f64>,
    /// Keep only the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Repetition penalty (llama.cpp's and candle's: a seen token's positive
    /// logit is divided by it, a negative one multiplied); `None` or 1: none.
    pub repeat_penalty: Option<f32>,
    /// Tokens (input and generated) the penalty looks back over; `None`: 64, as llama.cpp.
    pub repeat_last_n: Option<usize>,
    /// Seed of the sampler's random numbers: the same seed, model, input and
    /// settings give the same tokens. `None`: a fresh seed per job.
    pub seed: Option<u64>,
    /// Prompt jobs stop as soon as the reply contains one of these strings,
    /// and the reply ends before it (unused by `infer`, whose output is ids).
    pub stop: Vec<String>,
}

impl Sampling {
    /// Whether tokens are picked by argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature.is_nan() || self.temperature <= 0.0
    }

    /// Checks the numbers are in range; the message names the bad one.
    pub fn validate(&self) -> Result<(), String> {
        if self.temperature.is_nan() || self.temperature.is_infinite() {
            return Err(format!("temperature {} is not a number", self.temperature));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(format!("top_p {p} is outside (0, 1]"));
            }
        }
        if self.top_k == Some(0) {
            return Err("top_k is 0: at least one token must be kept".to_owned());
        }
        if self.stop.len() > MAX_STOPS {
            return Err(format!(
                "{} stop strings: at most {MAX_STOPS}",
                self.stop.len()
            ));
        }
        if let Some(bad) = self
            .stop
            .iter()
            .find(|s| s.is_empty() || s.len() > MAX_STOP_LEN)
        {
            return Err(format!(
                "stop string of {} bytes: each must have 1 to {MAX_STOP_LEN}",
                bad.len()
            ));
        }
        if let Some(r) = self.repeat_penalty {
            if !(r.is_finite() && r > 0.0) {
                return Err(format!("repeat_penalty {r} must be a positive number"));
            }
        }
        Ok(())
    }
}

/// One job's token picker.
pub(crate) struct Sampler {
    processor: Option<LogitsProcessor>,
    penalty: Option<(f32, usize)>,
}

impl Sampler {
    pub(crate) fn new(sampling: &Sampling) -> Sampler {
        let processor = (!sampling.is_greedy()).then(|| {
            let temperature = sampling.temperature;
            let how = match (sampling.top_k, sampling.top_p.filter(|&p| p < 1.0)) {
                (None, None) => CandleSampling::All { temperature },
                (Some(k), None) => CandleSampling::TopK { k, temperature },
                (None, Some(p)) => CandleSampling::TopP { p, temperature },
                (Some(k), Some(p)) => CandleSampling::TopKThenTopP { k, p, temperature },
            };
            let seed = sampling.seed.unwrap_or_else(fresh_seed);
            LogitsProcessor::from_sampling(seed, how)
        });
        let penalty = sampling
            .repeat_penalty
            .filter(|&r| r != 1.0)
            .map(|r| (r, sampling.repeat_last_n.unwrap_or(64)));
        Sampler { processor, penalty }
    }

    /// The next token from the logits (any shape holding one row of the
    /// vocabulary), given every token so far (input then generated).
    pub(crate) fn next(&mut self, logits: &Tensor, seen: &[u32]) -> candle_core::Result<u32> {
        let mut logits = logits.flatten_all()?.to_dtype(DType::F32)?;
        if let Some((penalty, last_n)) = self.penalty {
            let start = seen.len().saturating_sub(last_n);
            logits =
                candle_transformers::utils::apply_repeat_penalty(&logits, penalty, &seen[start..])?;
        }
        match &mut self.processor {
            // Tensor argmax, as before sampling existed (the first of equal maxima).
            None => logits.argmax(0)?.to_scalar::<u32>(),
            Some(processor) => processor.sample(&logits),
        }
    }
}

/// A seed for a job that names none.
fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn logits() -> Tensor {
        Tensor::new(&[0.1f32, 2.0, 1.9, -1.0, 0.5, 1.95], &Device::Cpu).unwrap()
    }

    #[test]
    fn default_is_greedy_argmax() {
        assert!(Sampling::default().is_greedy());
        let mut s = Sampler::new(&Sampling::default());
        assert_eq!(s.next(&logits(), &[]).unwrap(), 1);
    }

    #[test]
    fn repeat_penalty_moves_away_from_seen_tokens() {
        let mut s = Sampler::new(&Sampling {
            repeat_penalty: Some(2.0),
            ..Sampling::default()
        });
        assert_eq!(s.next(&logits(), &[1]).unwrap(), 5);
        assert_eq!(s.next(&logits(), &[1, 5]).unwrap(), 2);
    }

    #[test]
    fn same_seed_same_choices() {
        let sampling = Sampling {
            temperature: 1.5,
            top_k: Some(4),
            top_p: Some(0.95),
            seed: Some(7),
            ..Sampling::default()
        };
        let run = || {
            let mut s = Sampler::new(&sampling);
            (0..64)
                .map(|_| s.next(&logits(), &[]).unwrap())
                .collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        // Sampling, not argmax: more than one token comes up.
        assert!(a.iter().any(|&t| t != a[0]), "{a:?}");
    }

    #[test]
    fn out_of_range_settings_are_named() {
        let bad = |s: Sampling| s.validate().unwrap_err();
        assert!(bad(Sampling {
            top_p: Some(1.5),
            ..Sampling::default()
        })
        .contains("top_p"));
        assert!(bad(Sampling {
            top_k: Some(0),
            ..Sampling::default()
        })
        .contains("top_k"));
        assert!(bad(Sampling {
            repeat_penalty: Some(-1.0),
            ..Sampling::default()
        })
        .contains("repeat_penalty"));
        assert!(Sampling::default().validate().is_ok());
    }
}
