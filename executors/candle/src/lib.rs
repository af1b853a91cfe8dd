//! # donate-candle
//!
//! [`CandleExecutor`] (`donate serve --executor candle`, cargo feature
//! `candle` of `donate`): a pushed model is a real llama transformer, loaded
//! with [candle](https://github.com/huggingface/candle) from a Hugging Face
//! `config.json` (`config_json`) and a safetensors file (the weights), and each
//! `infer` job runs greedy generation with a KV cache. In `local_lm` mode, a
//! model and `tokenizer.json` loaded from a directory at start answer prompts.
//!
//! Everything runs on the CPU unless [`CandleConfig::device`] says otherwise
//! (the `cuda` and `metal` features build candle's GPU backends). Nothing is
//! ever downloaded.
//!
//! ```no_run
//! use donate_candle::{CandleConfig, CandleExecutor};
//! use donate_proto::ServerConfig;
//!
//! let executor = CandleExecutor::new(CandleConfig::default())?;
//! let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
//! let server = donate_std::serve(listener, ServerConfig::default(), executor)?;
//! # server.shutdown();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

mod model;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::Device;
use donate_exec::WeightsFile;
use donate_proto::{Executor, JobError, UploadInfo, Weights};
use tokenizers::Tokenizer;

pub use model::{CandleModel, GenerateError};

/// Job error codes this executor reports (the `code` of a failed result).
pub mod codes {
    /// The job's input cannot run on the model: empty, a token id outside the
    /// vocabulary, or longer than the context.
    pub const BAD_INPUT: &str = "bad_input";
    /// candle failed while generating (or the tokenizer failed).
    pub const MODEL_ERROR: &str = "model_error";
    /// The job ran past [`CandleConfig::job_timeout`](crate::CandleConfig::job_timeout);
    /// generation stopped.
    pub const MODEL_TIMEOUT: &str = "model_timeout";
    /// A job this node does not run: a prompt on a `model_push` node, an
    /// `infer` on a `local_lm` one.
    pub const UNSUPPORTED: &str = "unsupported";
}

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The CPU (always available).
    #[default]
    Cpu,
    /// CUDA GPU number N (needs the `cuda` feature).
    Cuda(usize),
    /// Metal GPU number N (needs the `metal` feature).
    Metal(usize),
}

impl DeviceChoice {
    /// Opens the device; an error when this build lacks its backend.
    pub fn open(self) -> Result<Device, String> {
        let opened = match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda(n) => Device::new_cuda(n),
            DeviceChoice::Metal(n) => Device::new_metal(n),
        };
        opened.map_err(|e| format!("cannot open {self}: {e}"))
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Cpu => write!(f, "cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceChoice::Metal(n) => write!(f, "metal:{n}"),
        }
    }
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;

    /// `cpu`, `cuda`, `cuda:N`, `metal`, `metal:N`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, n) = match s.split_once(':') {
            Some((kind, n)) => (
                kind,
                n.parse()
                    .map_err(|_| format!("bad device number in {s:?}"))?,
            ),
            None => (s, 0),
        };
        match kind {
            "cpu" if !s.contains(':') => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(n)),
            "metal" => Ok(DeviceChoice::Metal(n)),
            _ => Err(format!(
                "unknown device {s:?} (expected cpu, cuda[:N] or metal[:N])"
            )),
        }
    }
}

/// Settings of a [`CandleExecutor`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CandleConfig {
    /// Where models run.
    pub device: DeviceChoice,
    /// Tokens an `infer` job generates when its `max_tokens` is 0 or less (8, as the Go stub).
    pub default_max_tokens: usize,
    /// Tokens a prompt generates at most when its `max_out` is 0 or less.
    pub default_max_out: usize,
    /// Most tokens any job generates, whatever it asks for.
    pub max_tokens_cap: usize,
    /// Most positions (input plus generated) a job may use, below the model's
    /// own `max_position_embeddings`: bounds the rotary tables and a job's work.
    pub max_context: usize,
    /// `local_lm` mode: the directory holding `config.json`,
    /// `model.safetensors` and `tokenizer.json`, loaded by [`CandleExecutor::new`].
    pub local_lm: Option<PathBuf>,
    /// Spool pushed weights to a private temporary file as they arrive and
    /// load the model from it memory-mapped (default true), instead of the
    /// node holding the whole upload in memory.
    pub spool_uploads: bool,
    /// Where spooled uploads go (default: the system temporary directory).
    pub temp_root: Option<PathBuf>,
    /// Longest a job may generate (default 60 s, as `--job-timeout`); checked
    /// before each token, so a job stops within one token of it. `None`: never.
    pub job_timeout: Option<Duration>,
}

impl Default for CandleConfig {
    fn default() -> Self {
        CandleConfig {
            device: DeviceChoice::Cpu,
            default_max_tokens: 8,
            default_max_out: 64,
            max_tokens_cap: 256,
            max_context: 4096,
            local_lm: None,
            spool_uploads: true,
            temp_root: None,
            job_timeout: Some(Duration::from_secs(60)),
        }
    }
}

/// A model and its tokenizer, for prompts.
struct LocalLm {
    model: CandleModel,
    tokenizer: Tokenizer,
}

/// Runs pushed llama models with candle (`model_push`), or answers prompts
/// with a llama loaded at start (`local_lm`).
///
/// `infer` always generates exactly n tokens, n = `default_max_tokens` when
/// `max_tokens` <= 0, else min(`max_tokens`, `max_tokens_cap`): greedy
/// (argmax) and deterministic, with no stop at an end-of-sequence token, so
/// the output is `input_ids` followed by n ids, the stub's shape. A prompt
/// stops early at the config's `eos_token_id`, since its output is text.
pub struct CandleExecutor {
    config: CandleConfig,
    device: Device,
    local: Option<LocalLm>,
}

impl std::fmt::Debug for CandleExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CandleExecutor")
            .field("config", &self.config)
            .field("local_lm", &self.local.as_ref().map(|l| &l.model))
            .finish()
    }
}

impl CandleExecutor {
    /// Opens the device and, with [`CandleConfig::local_lm`], loads that model
    /// and tokenizer.
    pub fn new(config: CandleConfig) -> Result<CandleExecutor, String> {
        let device = config.device.open()?;
        let local = match &config.local_lm {
            Some(dir) => Some(load_local(dir, &device, config.max_context)?),
            None => None,
        };
        Ok(CandleExecutor {
            config,
            device,
            local,
        })
    }

    /// The settings.
    pub fn config(&self) -> &CandleConfig {
        &self.config
    }

    /// The `local_lm` model, when there is one.
    pub fn local_model(&self) -> Option<&CandleModel> {
        self.local.as_ref().map(|l| &l.model)
    }

    /// Loads a pushed model from its bytes (what `mount` does with an upload held in memory).
    pub fn load(&self, config_json: &str, weights: &[u8]) -> Result<CandleModel, String> {
        self.refuse_on_local_lm()?;
        CandleModel::load(config_json, weights, &self.device, self.config.max_context)
    }

    /// Loads a pushed model from a safetensors file (what `mount` does with a spooled upload).
    pub fn load_file(&self, config_json: &str, path: &Path) -> Result<CandleModel, String> {
        self.refuse_on_local_lm()?;
        CandleModel::load_file(config_json, path, &self.device, self.config.max_context)
    }

    fn refuse_on_local_lm(&self) -> Result<(), String> {
        match self.local {
            Some(_) => {
                Err("this node is local_lm: it answers prompts with its own model".to_owned())
            }
            None => Ok(()),
        }
    }

    /// When a job starting now must stop.
    fn deadline(&self) -> Option<Instant> {
        self.config.job_timeout.map(|t| Instant::now() + t)
    }

    /// The job error for a generation that failed while making `n` tokens.
    fn job_error(&self, e: GenerateError, n: usize) -> JobError {
        match e {
            GenerateError::Timeout { generated } => JobError::new(
                codes::MODEL_TIMEOUT,
                format!(
                    "stopped after {generated} of {n} tokens: the job ran past its timeout of {:?}",
                    self.config.job_timeout.unwrap_or_default()
                ),
            ),
            GenerateError::Candle(message) => JobError::new(codes::MODEL_ERROR, message),
        }
    }

    /// Tokens a job generates when it asks for `requested` (0 or less: `default`).
    fn tokens_for(&self, requested: i64, default: usize) -> usize {
        let cap = self.config.max_tokens_cap;
        if requested <= 0 {
            default.min(cap)
        } else {
            usize::try_from(requested).unwrap_or(usize::MAX).min(cap)
        }
    }

    /// Runs an `infer` job: `input_ids` followed by the generated ids.
    pub fn generate(
        &self,
        model: &CandleModel,
        input_ids: &[i32],
        max_tokens: i64,
    ) -> Result<Vec<i32>, JobError> {
        if self.local.is_some() {
            return Err(JobError::new(
                codes::UNSUPPORTED,
                "this candle node is local_lm: it answers prompts only",
            ));
        }
        let n = self.tokens_for(max_tokens, self.config.default_max_tokens);
        let vocab = model.vocab_size();
        let input = input_ids
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                u32::try_from(id)
                    .ok()
                    .filter(|&id| (id as usize) < vocab)
                    .ok_or_else(|| {
                        JobError::new(
                            codes::BAD_INPUT,
                            format!("input_ids[{i}] = {id} is outside the vocabulary (0..{vocab})"),
                        )
                    })
            })
            .collect::<Result<Vec<u32>, JobError>>()?;
        check_fits(model, input.len(), n)?;
        let generated = model
            .generate(&input, n, &[], self.deadline())
            .map_err(|e| self.job_error(e, n))?;
        let mut out = Vec::with_capacity(input_ids.len() + generated.len());
        out.extend_from_slice(input_ids);
        // Every id is below vocab_size, which fits an i32 (checked at load).
        out.extend(generated.into_iter().map(|id| id as i32));
        Ok(out)
    }

    /// Runs a `prompt` job on the `local_lm` model: the generated text only.
    pub fn complete(&self, prompt: &str, max_out: i64) -> Result<String, JobError> {
        let Some(local) = &self.local else {
            return Err(JobError::new(
                codes::UNSUPPORTED,
                "this candle node runs pushed models (model_push); prompts need --mode local_lm --local-lm-path DIR",
            ));
        };
        let n = self.tokens_for(max_out, self.config.default_max_out);
        let model = &local.model;
        let encoding = local.tokenizer.encode(prompt, true).map_err(|e| {
            JobError::new(
                codes::MODEL_ERROR,
                format!("cannot tokenize the prompt: {e}"),
            )
        })?;
        let ids = encoding.get_ids();
        if ids.is_empty() {
            return Err(JobError::new(codes::BAD_INPUT, "the prompt has no tokens"));
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= model.vocab_size()) {
            return Err(JobError::new(
                codes::MODEL_ERROR,
                format!(
                    "the tokenizer made token {bad}, outside the model's vocabulary (0..{})",
                    model.vocab_size()
                ),
            ));
        }
        check_fits(model, ids.len(), n)?;
        let generated = model
            .generate(ids, n, model.eos_ids(), self.deadline())
            .map_err(|e| self.job_error(e, n))?;
        local
            .tokenizer
            .decode(&generated, true)
            .map_err(|e| JobError::new(codes::MODEL_ERROR, format!("cannot decode: {e}")))
    }
}

/// A job of `input` tokens generating `n` must fit the model's context.
fn check_fits(model: &CandleModel, input: usize, n: usize) -> Result<(), JobError> {
    if input == 0 {
        return Err(JobError::new(
            codes::BAD_INPUT,
            "input_ids is empty: generation needs at least one token",
        ));
    }
    if input.saturating_add(n) > model.context() {
        return Err(JobError::new(
            codes::BAD_INPUT,
            format!(
                "{input} input tokens + {n} to generate exceed the context of {} positions",
                model.context()
            ),
        ));
    }
    Ok(())
}

/// Loads `DIR/config.json`, `DIR/model.safetensors` and `DIR/tokenizer.json`.
fn load_local(dir: &Path, device: &Device, max_context: usize) -> Result<LocalLm, String> {
    let tokenizer_path = dir.join("tokenizer.json");
    if !tokenizer_path.is_file() {
        return Err(format!(
            "{} is missing: a local_lm directory needs config.json, model.safetensors and tokenizer.json",
            tokenizer_path.display()
        ));
    }
    let model = CandleModel::load_dir(dir, device, max_context)?;
    let tokenizer = Tokenizer::from_file(&tokenizer_path)
        .map_err(|e| format!("cannot load {}: {e}", tokenizer_path.display()))?;
    Ok(LocalLm { model, tokenizer })
}

// The trait impl only delegates, so that it follows the trait's changes easily.
impl Executor for CandleExecutor {
    type Model = CandleModel;
    type Spool = WeightsFile;

    fn spools_uploads(&self) -> bool {
        self.config.spool_uploads
    }

    fn open_spool(&self, upload: &UploadInfo) -> Result<WeightsFile, String> {
        WeightsFile::create(self.config.temp_root.as_deref(), upload.weights_len, false)
    }

    /// The spooled file is removed once the model is built from it.
    fn mount(
        &self,
        config_json: String,
        weights: Weights<WeightsFile>,
    ) -> Result<CandleModel, String> {
        match weights {
            Weights::Memory(bytes) => self.load(&config_json, &bytes),
            Weights::Spooled(file) => self.load_file(&config_json, file.path()),
        }
    }

    fn infer(
        &self,
        model: &CandleModel,
        _job_id: &str,
        input_ids: &[i32],
        max_tokens: i64,
    ) -> Result<Vec<i32>, JobError> {
        self.generate(model, input_ids, max_tokens)
    }

    fn prompt(&self, _job_id: &str, prompt: &str, max_out: i64) -> Result<String, JobError> {
        self.complete(prompt, max_out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse() {
        assert_eq!("cpu".parse(), Ok(DeviceChoice::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:1".parse(), Ok(DeviceChoice::Cuda(1)));
        assert_eq!("metal:0".parse(), Ok(DeviceChoice::Metal(0)));
        for bad in ["", "gpu", "cpu:1", "cuda:", "cuda:x", "CUDA"] {
            assert!(bad.parse::<DeviceChoice>().is_err(), "{bad:?} parsed");
        }
        assert_eq!(DeviceChoice::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn gpus_need_their_feature() {
        #[cfg(not(feature = "cuda"))]
        assert!(DeviceChoice::Cuda(0).open().unwrap_err().contains("cuda:0"));
        #[cfg(not(feature = "metal"))]
        assert!(DeviceChoice::Metal(0).open().is_err());
    }

    #[test]
    fn token_counts_follow_the_defaults_and_the_cap() {
        let executor = CandleExecutor::new(CandleConfig {
            max_tokens_cap: 100,
            ..CandleConfig::default()
        })
        .unwrap();
        assert_eq!(executor.tokens_for(0, 8), 8);
        assert_eq!(executor.tokens_for(-5, 8), 8);
        assert_eq!(executor.tokens_for(3, 8), 3);
        assert_eq!(executor.tokens_for(i64::MAX, 8), 100);
        assert_eq!(executor.tokens_for(0, 500), 100);
    }
}
