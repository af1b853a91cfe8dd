//! `--temperature --top-p --top-k --repeat-penalty --seed --stop` of `donate
//! infer`, `donate prompt` and `donate batch` (for every job): the job's
//! sampling fields (extension `sampling`, docs/PROTOCOL.md §10.7).

use donate_proto::SamplingParams;

/// A job's sampling, each field sent only when given.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SamplingArgs {
    /// Sampling temperature (0 = greedy). Needs a node that offers `sampling`.
    #[arg(long, value_name = "T")]
    temperature: Option<f64>,
    /// Nucleus sampling: keep the likeliest tokens up to this probability (0 < P <= 1).
    #[arg(long, value_name = "P")]
    top_p: Option<f64>,
    /// Keep only the K most likely tokens.
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u32).range(1..))]
    top_k: Option<u32>,
    /// Repetition penalty (1 = none).
    #[arg(long, value_name = "R")]
    repeat_penalty: Option<f64>,
    /// Sampler seed: the same seed gives the same tokens.
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// `prompt`: the reply ends before this text (repeatable).
    #[arg(long, value_name = "TEXT")]
    stop: Vec<String>,
}

impl SamplingArgs {
    /// The wire fields.
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            repeat_penalty: self.repeat_penalty,
            seed: self.seed,
            stop: self.stop.clone(),
        }
    }
}
