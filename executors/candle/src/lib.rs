//! # donate-candle
//!
//! [`CandleExecutor`] (`donate serve --executor candle`, cargo feature
//! `candle` of `donate`): a pushed model is a real transformer run with
//! [candle](https://github.com/huggingface/candle): a Hugging Face llama
//! (`config.json` as `config_json`, a safetensors file as the weights) or a
//! quantized GGUF file (llama, qwen2, qwen3; `config_json` `{"format":"gguf"}`,
//! or recognised by its magic bytes), and each `infer` job runs generation
//! with a KV cache, greedy unless a [`Sampling`] says otherwise. In `local_lm`
//! mode, a model loaded at start answers prompts: a GGUF file (its own
//! tokenizer and chat template, so a prompt is a chat turn) or a directory
//! with a safetensors llama and `tokenizer.json`.
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

mod chat;
mod combine;
mod ggml;
pub mod gguf;
mod guard;
mod model;
mod q4_1;
mod q4_k;
mod q5_0;
mod q5_k;
mod q6_k;
mod qllama;
mod qmatrix;
mod sampling;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::Device;
use donate_exec::WeightsFile;
use donate_proto::{
    Capabilities, Capability, ChatJob, Executor, FinishReason, JobContext, JobError, Partial,
    Reply, SamplingParams, UploadInfo, Usage, Weights,
};
use tokenizers::Tokenizer;

pub use chat::{render_chat_template, ChatMessage};
pub use gguf::ModelLimits;
pub use model::{CandleModel, GenerateError};
pub use sampling::Sampling;

/// Sets how many threads candle's CPU kernels use, for the whole process
/// (rayon's global pool, and `RAYON_NUM_THREADS`, which candle's F32 matrix
/// products read). Call it once, before any model is loaded; later calls
/// cannot resize a pool already built and do nothing.
pub fn set_threads(n: usize) {
    let n = n.max(1);
    // Read by candle's gemm calls (candle_core::utils::get_num_threads) and,
    // when first used, by candle's pool for quantized products (barrier_pool),
    // which our Q4_1 kernel runs on too.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
}

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
    pub const UNSUPPORTED: &str = donate_proto::ErrorCode::Unsupported.as_str();
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
#[derive(Debug, Clone, PartialEq)]
pub struct CandleConfig {
    /// Where models run.
    pub device: DeviceChoice,
    /// Tokens an `infer` job generates when its `max_tokens` is 0 or less (8, as the Go stub).
    pub default_max_tokens: usize,
    /// Tokens a prompt generates at most when its `max_out` is 0 or less.
    pub default_max_out: usize,
    /// Most tokens any job generates, whatever it asks for.
    pub max_tokens_cap: usize,
    /// What a model may make the node allocate: most positions a job may use
    /// (below the model's own `max_position_embeddings`; bounds the rotary
    /// tables and a job's work), and for GGUF files the memory beside the
    /// weights and of the header.
    pub limits: ModelLimits,
    /// `local_lm` mode: the model [`CandleExecutor::new`] loads, a GGUF file
    /// or a directory holding `config.json`, `model.safetensors` and
    /// `tokenizer.json`.
    pub local_lm: Option<PathBuf>,
    /// `local_lm` with a GGUF model: send a prompt's text to the model as it
    /// is, instead of as a user turn rendered with the file's chat template
    /// (default false: chat). A model without a template always gets raw text.
    pub raw_prompt: bool,
    /// How jobs pick tokens when they do not say (default: greedy).
    pub sampling: Sampling,
    /// Spool pushed weights to a private temporary file as they arrive and
    /// load the model from it memory-mapped (default true), instead of the
    /// node holding the whole upload in memory.
    pub spool_uploads: bool,
    /// Where spooled uploads go (default: the system temporary directory).
    pub temp_root: Option<PathBuf>,
    /// Longest a job may generate (default 60 s, as `--job-timeout`); checked
    /// before each token, so a job stops within one token of it. `None`: never.
    pub job_timeout: Option<Duration>,
    /// Most jobs whose next tokens one forward pass carries (default 16;
    /// 1: none stacked). A model runs one forward pass at a time; jobs
    /// generating at once on a GGUF llama, qwen2 or qwen3 model have their next
    /// tokens stacked into one pass, which reads each weight once for all.
    pub max_batch: usize,
    /// Most prompt tokens one forward pass takes (default 512, llama.cpp's
    /// micro-batch): a longer prompt runs in several passes, and other jobs'
    /// next tokens run between them.
    pub prompt_chunk: usize,
}

impl Default for CandleConfig {
    fn default() -> Self {
        CandleConfig {
            device: DeviceChoice::Cpu,
            default_max_tokens: 8,
            default_max_out: 64,
            max_tokens_cap: 256,
            limits: ModelLimits::default(),
            local_lm: None,
            raw_prompt: false,
            sampling: Sampling::default(),
            spool_uploads: true,
            temp_root: None,
            job_timeout: Some(Duration::from_secs(60)),
            max_batch: model::DEFAULT_MAX_BATCH,
            prompt_chunk: model::DEFAULT_PROMPT_CHUNK,
        }
    }
}

/// A model and its tokenizer, for prompts.
struct LocalLm {
    model: CandleModel,
    /// A safetensors directory's `tokenizer.json` (a GGUF model carries its own).
    tokenizer: Option<Tokenizer>,
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
    /// and tokenizer; a GGUF file's chat template must render a sample
    /// prompt within its bounds (unless [`CandleConfig::raw_prompt`]).
    pub fn new(config: CandleConfig) -> Result<CandleExecutor, String> {
        config
            .sampling
            .validate()
            .map_err(|e| format!("bad sampling: {e}"))?;
        let device = config.device.open()?;
        let local = match &config.local_lm {
            Some(dir) => {
                let mut local = load_local(dir, &device, config.limits)?;
                if !config.raw_prompt {
                    if let Some(tokenizer) = local.model.gguf_tokenizer() {
                        tokenizer
                            .check_template()
                            .map_err(|e| format!("{}: {e}", dir.display()))?;
                    }
                }
                local.model = local
                    .model
                    .with_passes(config.max_batch, config.prompt_chunk);
                Some(local)
            }
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

    /// Loads a pushed model from its bytes (what `mount` does with an upload
    /// held in memory): GGUF when `config_json` says `{"format":"gguf"}` or
    /// the bytes start with the GGUF magic, else a safetensors llama.
    pub fn load(&self, config_json: &str, weights: &[u8]) -> Result<CandleModel, String> {
        self.refuse_on_local_lm()?;
        let limits = self.config.limits;
        let model = if is_gguf_upload(config_json, weights)? {
            let mut reader = std::io::Cursor::new(weights);
            CandleModel::load_gguf(
                &mut reader,
                weights.len() as u64,
                &self.device,
                limits,
                false,
            )
        } else {
            CandleModel::load(config_json, weights, &self.device, limits.context)
        };
        Ok(model?.with_passes(self.config.max_batch, self.config.prompt_chunk))
    }

    /// Loads a pushed model from a file (what `mount` does with a spooled
    /// upload): GGUF or safetensors, as [`load`](CandleExecutor::load) decides.
    pub fn load_file(&self, config_json: &str, path: &Path) -> Result<CandleModel, String> {
        self.refuse_on_local_lm()?;
        let limits = self.config.limits;
        let mut head = [0u8; 4];
        let head = match std::fs::File::open(path).and_then(|mut f| {
            use std::io::Read;
            let n = f.read(&mut head)?;
            Ok(n)
        }) {
            Ok(n) => &head[..n],
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let model = if is_gguf_upload(config_json, head)? {
            CandleModel::load_gguf_file(path, &self.device, limits, false)
        } else {
            CandleModel::load_file(config_json, path, &self.device, limits.context)
        };
        Ok(model?.with_passes(self.config.max_batch, self.config.prompt_chunk))
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

    /// Runs an `infer` job with the node's [`CandleConfig::sampling`]:
    /// `input_ids` followed by the generated ids.
    pub fn generate(
        &self,
        model: &CandleModel,
        input_ids: &[i32],
        max_tokens: i64,
    ) -> Result<Vec<i32>, JobError> {
        self.generate_with(model, input_ids, max_tokens, &self.config.sampling)
    }

    /// Runs an `infer` job picking tokens as `sampling` says (its `stop`
    /// strings do not apply: the output is ids). `input_ids` are fed exactly
    /// as given: no BOS, no template.
    pub fn generate_with(
        &self,
        model: &CandleModel,
        input_ids: &[i32],
        max_tokens: i64,
        sampling: &Sampling,
    ) -> Result<Vec<i32>, JobError> {
        self.generate_job(model, input_ids, max_tokens, sampling, &JobContext::new(""))
    }

    /// The sampling of a job: its own fields (extension `sampling`) over the
    /// node's [`CandleConfig::sampling`], field by field.
    pub fn job_sampling(&self, job: &SamplingParams) -> Sampling {
        let base = &self.config.sampling;
        Sampling {
            temperature: job.temperature.unwrap_or(base.temperature),
            top_p: job.top_p.or(base.top_p),
            top_k: job
                .top_k
                .map(|k| usize::try_from(k).unwrap_or(usize::MAX))
                .or(base.top_k),
            repeat_penalty: job.repeat_penalty.map(|r| r as f32).or(base.repeat_penalty),
            repeat_last_n: base.repeat_last_n,
            seed: job.seed.or(base.seed),
            stop: if job.stop.is_empty() {
                base.stop.clone()
            } else {
                job.stop.clone()
            },
        }
    }

    /// [`generate_with`](CandleExecutor::generate_with) for a job of the node:
    /// each new token reported to `job` as it is made, when its client
    /// streams; stopped between tokens once `job` is cancelled.
    fn generate_job(
        &self,
        model: &CandleModel,
        input_ids: &[i32],
        max_tokens: i64,
        sampling: &Sampling,
        job: &JobContext<'_>,
    ) -> Result<Vec<i32>, JobError> {
        sampling
            .validate()
            .map_err(|e| JobError::new(codes::BAD_INPUT, e))?;
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
            .generate_with(&input, n, &[], self.deadline(), sampling, |so_far| {
                if let (true, Some(&last)) = (job.streams(), so_far.last()) {
                    // Below vocab_size, which fits an i32 (checked at load).
                    job.partial(Partial::Tokens(&[last as i32]));
                }
                job.is_cancelled()
            })
            .map_err(|e| self.job_error(e, n))?;
        stopped_if_cancelled(job)?;
        let mut out = Vec::with_capacity(input_ids.len() + generated.len());
        out.extend_from_slice(input_ids);
        // Every id is below vocab_size, which fits an i32 (checked at load).
        out.extend(generated.into_iter().map(|id| id as i32));
        Ok(out)
    }

    /// Runs a `prompt` job on the `local_lm` model with the node's
    /// [`CandleConfig::sampling`]: the generated text only.
    pub fn complete(&self, prompt: &str, max_out: i64) -> Result<String, JobError> {
        self.complete_with(prompt, max_out, &self.config.sampling)
    }

    /// The token ids a prompt becomes on the `local_lm` model: for a GGUF
    /// model the chat template rendered with one user turn (unless
    /// [`CandleConfig::raw_prompt`]), then its tokenizer, with the BOS the
    /// model wants, never twice; for a safetensors one, `tokenizer.json` with
    /// its own special tokens.
    pub fn prompt_ids(&self, prompt: &str) -> Result<Vec<u32>, JobError> {
        self.prompt_ids_of(PromptText::Node(prompt))
    }

    /// The token ids of a prompt in any of its forms (see [`PromptText`]).
    fn prompt_ids_of(&self, prompt: PromptText<'_>) -> Result<Vec<u32>, JobError> {
        let Some(local) = &self.local else {
            return Err(JobError::new(
                codes::UNSUPPORTED,
                "this candle node runs pushed models (model_push); prompts need --mode local_lm --model FILE.gguf (or --local-lm-path DIR)",
            ));
        };
        let model_error = |e: String| JobError::new(codes::MODEL_ERROR, e);
        match (&local.tokenizer, local.model.gguf_tokenizer(), prompt) {
            (Some(_), _, PromptText::Chat(_)) => Err(JobError::new(
                codes::UNSUPPORTED,
                "this model (a directory with tokenizer.json) has no chat template: send the text as a raw prompt",
            )),
            (Some(tokenizer), _, PromptText::Node(text) | PromptText::Raw(text)) => tokenizer
                .encode(text, true)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| model_error(format!("cannot tokenize the prompt: {e}"))),
            (None, Some(tokenizer), prompt) => {
                let text = match prompt {
                    PromptText::Node(text) => tokenizer.prompt_text(text, !self.config.raw_prompt),
                    PromptText::Raw(text) => Ok(text.to_owned()),
                    PromptText::Chat(messages) => tokenizer.chat_text(messages),
                }
                .map_err(model_error)?;
                tokenizer.encode(&text).map_err(model_error)
            }
            (None, None, _) => Err(model_error("the local model has no tokenizer".to_owned())),
        }
    }

    /// Runs a `prompt` job picking tokens as `sampling` says; the reply stops
    /// at the model's end-of-turn tokens, or before the first of
    /// `sampling.stop` it contains.
    pub fn complete_with(
        &self,
        prompt: &str,
        max_out: i64,
        sampling: &Sampling,
    ) -> Result<String, JobError> {
        self.complete_job(
            PromptText::Node(prompt),
            max_out,
            sampling,
            &JobContext::new(""),
        )
        .map(|reply| reply.text)
    }

    /// [`complete_with`](CandleExecutor::complete_with) reporting the reply's
    /// new text to `job` as it is made, when its client streams: only whole
    /// UTF-8 characters, never text a stop string may still take back, so
    /// that the partials joined are the final reply. Stopped between tokens
    /// once `job` is cancelled.
    fn complete_job(
        &self,
        prompt: PromptText<'_>,
        max_out: i64,
        sampling: &Sampling,
        job: &JobContext<'_>,
    ) -> Result<Reply, JobError> {
        sampling
            .validate()
            .map_err(|e| JobError::new(codes::BAD_INPUT, e))?;
        let ids = self.prompt_ids_of(prompt)?;
        let Some(local) = &self.local else {
            unreachable!("prompt_ids checked local_lm");
        };
        let n = self.tokens_for(max_out, self.config.default_max_out);
        let model = &local.model;
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
        let decode = |ids: &[u32]| -> Result<String, String> {
            match (&local.tokenizer, model.gguf_tokenizer()) {
                (Some(t), _) => t.decode(ids, true).map_err(|e| e.to_string()),
                (None, Some(t)) => t.tokenizer.decode(ids, true).map_err(|e| e.to_string()),
                (None, None) => Ok(String::new()),
            }
        };
        let stops = &sampling.stop;
        let streams = job.streams();
        // The reply's text handed to `job` so far.
        let mut sent = String::new();
        let halt = |so_far: &[u32]| {
            if job.is_cancelled() {
                return true;
            }
            if stops.is_empty() && !streams {
                return false;
            }
            let Ok(text) = decode(so_far) else {
                return false;
            };
            let stopped = stops.iter().any(|s| text.contains(s.as_str()));
            if streams && !stopped {
                let ready = settled(&text, stops);
                if ready.len() > sent.len() && ready.starts_with(sent.as_str()) {
                    job.partial(Partial::Text(&ready[sent.len()..]));
                    sent.replace_range(.., ready);
                }
            }
            stopped
        };
        let generated = model
            .generate_with(&ids, n, model.eos_ids(), self.deadline(), sampling, halt)
            .map_err(|e| self.job_error(e, n))?;
        stopped_if_cancelled(job)?;
        let mut text = decode(&generated)
            .map_err(|e| JobError::new(codes::MODEL_ERROR, format!("cannot decode: {e}")))?;
        let cut = stops.iter().filter_map(|s| text.find(s.as_str())).min();
        if let Some(cut) = cut {
            text.truncate(cut);
        }
        if streams && text.len() > sent.len() && text.starts_with(sent.as_str()) {
            job.partial(Partial::Text(&text[sent.len()..]));
        }
        let ended = cut.is_some()
            || generated
                .last()
                .is_some_and(|t| model.eos_ids().contains(t));
        let finish_reason = match generated.len() >= n && !ended {
            true => FinishReason::Length,
            false => FinishReason::Stop,
        };
        Ok(Reply {
            usage: Usage {
                prompt_tokens: ids.len() as i64,
                completion_tokens: generated.len() as i64,
                finish_reason,
            },
            text,
        })
    }
}

/// A prompt job's text, as the executor turns it into tokens.
#[derive(Debug, Clone, Copy)]
enum PromptText<'a> {
    /// A plain `prompt`: through the chat template unless the node serves
    /// raw prompts ([`CandleConfig::raw_prompt`]).
    Node(&'a str),
    /// A `chat` job's `raw` prompt: as it is.
    Raw(&'a str),
    /// A `chat` job's conversation, through the chat template.
    Chat(&'a [ChatMessage]),
}

/// The part of a reply decoded so far that no later token changes: without
/// a trailing replacement character (a UTF-8 sequence the next byte token
/// completes) and without a trailing start of a stop string (the reply may
/// yet end before it).
fn settled<'t>(text: &'t str, stops: &[String]) -> &'t str {
    let text = text.trim_end_matches('\u{FFFD}');
    let held = stops
        .iter()
        .filter_map(|stop| {
            (1..stop.len())
                .rev()
                .filter(|&k| stop.is_char_boundary(k))
                .find(|&k| text.ends_with(&stop[..k]))
        })
        .max()
        .unwrap_or(0);
    &text[..text.len() - held]
}

/// Whether a pushed model is GGUF: `config_json` `{"format":"gguf"}`, or
/// weights that start with the GGUF magic (then any config is accepted).
fn is_gguf_upload(config_json: &str, head: &[u8]) -> Result<bool, String> {
    let format = serde_json::from_str::<serde_json::Value>(config_json)
        .ok()
        .and_then(|v| v.get("format").and_then(|f| f.as_str()).map(str::to_owned));
    match format.as_deref() {
        Some("gguf") => Ok(true),
        Some("safetensors") | None => Ok(gguf::is_gguf(head)),
        Some(other) => Err(format!(
            "unknown model format {other:?}: this node runs \"gguf\" and \"safetensors\" (a Hugging Face llama config.json)"
        )),
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

/// Token ids as text, with a model's own tokenizer: a GGUF file's, or a
/// directory's `tokenizer.json` (`donate infer --decode`). Only the file's
/// header and metadata are read, with the checks a pushed model gets.
pub fn decode_ids(model: &Path, ids: &[u32]) -> Result<String, String> {
    let shown = model.display();
    if model.is_file() {
        let mut file =
            std::fs::File::open(model).map_err(|e| format!("cannot open {shown}: {e}"))?;
        let len = file
            .metadata()
            .map_err(|e| format!("cannot read {shown}: {e}"))?
            .len();
        let (content, checked) = gguf::read_header(&mut file, len, ModelLimits::default())
            .map_err(|e| format!("{shown}: {e}"))?;
        let tokenizer = chat::GgufTokenizer::from_metadata(&content.metadata, checked.vocab_size)
            .map_err(|e| format!("{shown}: {e}"))?;
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= checked.vocab_size) {
            return Err(format!(
                "token {bad} is outside the vocabulary of {shown} (0..{})",
                checked.vocab_size
            ));
        }
        return guard::guarded("decoding", || {
            tokenizer
                .tokenizer
                .decode(ids, true)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))
        });
    }
    let path = model.join("tokenizer.json");
    let tokenizer =
        Tokenizer::from_file(&path).map_err(|e| format!("cannot load {}: {e}", path.display()))?;
    tokenizer
        .decode(ids, true)
        .map_err(|e| format!("cannot decode with {}: {e}", path.display()))
}

/// Loads the `local_lm` model: a GGUF file (with its own tokenizer), or a
/// directory with `config.json`, `model.safetensors` and `tokenizer.json`.
fn load_local(path: &Path, device: &Device, limits: ModelLimits) -> Result<LocalLm, String> {
    if path.is_file() {
        let model = CandleModel::load_gguf_file(path, device, limits, true)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        return Ok(LocalLm {
            model,
            tokenizer: None,
        });
    }
    let tokenizer_path = path.join("tokenizer.json");
    if !tokenizer_path.is_file() {
        return Err(format!(
            "{} is missing: a local_lm model is a GGUF file, or a directory with config.json, model.safetensors and tokenizer.json",
            tokenizer_path.display()
        ));
    }
    let model = CandleModel::load_dir(path, device, limits.context)?;
    let tokenizer = Tokenizer::from_file(&tokenizer_path)
        .map_err(|e| format!("cannot load {}: {e}", tokenizer_path.display()))?;
    Ok(LocalLm {
        model,
        tokenizer: Some(tokenizer),
    })
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

    fn mount_file(&self, config_json: String, path: &Path) -> Result<CandleModel, String> {
        self.load_file(&config_json, path)
    }

    /// A mounted model's weights are read-only; each job keeps its own cache.
    fn shares_models(&self) -> bool {
        true
    }

    /// Per-job sampling fields, partial results and conversations.
    fn extensions(&self) -> Capabilities {
        Capabilities::NONE
            .with(Capability::Sampling)
            .with(Capability::Stream)
            .with(Capability::Chat)
    }

    fn infer(
        &self,
        model: &CandleModel,
        input_ids: &[i32],
        max_tokens: i64,
        job: &JobContext<'_>,
    ) -> Result<Vec<i32>, JobError> {
        let sampling = self.job_sampling(job.sampling());
        self.generate_job(model, input_ids, max_tokens, &sampling, job)
    }

    fn prompt(&self, prompt: &str, max_out: i64, job: &JobContext<'_>) -> Result<String, JobError> {
        let sampling = self.job_sampling(job.sampling());
        self.complete_job(PromptText::Node(prompt), max_out, &sampling, job)
            .map(|reply| reply.text)
    }

    fn chat(
        &self,
        prompt: &str,
        chat: &ChatJob,
        max_out: i64,
        job: &JobContext<'_>,
    ) -> Result<Reply, JobError> {
        let text = match (chat.messages.as_slice(), chat.raw) {
            ([], false) => PromptText::Node(prompt),
            ([], true) => PromptText::Raw(prompt),
            (messages, _) => PromptText::Chat(messages),
        };
        let sampling = self.job_sampling(job.sampling());
        self.complete_job(text, max_out, &sampling, job)
    }
}

/// A job stopped between tokens because it was cancelled fails `cancelled`
/// (the node answers it so anyway; this keeps a direct caller from taking a
/// cut-short output for a whole one).
fn stopped_if_cancelled(job: &JobContext<'_>) -> Result<(), JobError> {
    match job.is_cancelled() {
        true => Err(JobError::new(
            donate_proto::codes::CANCELLED,
            "job cancelled; generation stopped",
        )),
        false => Ok(()),
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
    fn streamed_text_holds_back_what_may_change() {
        let stops = ["</s>".to_owned(), "\n\nUser".to_owned()];
        assert_eq!(settled("Hello", &stops), "Hello");
        assert_eq!(settled("Hello <", &stops), "Hello ");
        assert_eq!(settled("Hello </", &stops), "Hello ");
        assert_eq!(settled("a\n\nUs", &stops), "a");
        assert_eq!(settled("caf\u{FFFD}", &[]), "caf");
        assert_eq!(settled("x<", &[]), "x<");
    }

    #[test]
    fn a_jobs_sampling_overrides_the_nodes_field_by_field() {
        let executor = CandleExecutor::new(CandleConfig {
            sampling: Sampling {
                temperature: 0.5,
                top_k: Some(10),
                stop: vec!["x".into()],
                ..Sampling::default()
            },
            ..CandleConfig::default()
        })
        .unwrap();
        let job = SamplingParams {
            seed: Some(3),
            top_k: Some(2),
            ..SamplingParams::default()
        };
        let s = executor.job_sampling(&job);
        assert_eq!((s.temperature, s.top_k, s.seed), (0.5, Some(2), Some(3)));
        assert_eq!(s.stop, ["x"]);
        assert_eq!(
            executor.job_sampling(&SamplingParams::default()),
            executor.config().sampling
        );
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
