//! [`CandleModel`]: a Hugging Face llama loaded from a config and safetensors
//! bytes, checked against each other first, or a quantized GGUF model; and
//! generation on it (greedy unless a [`Sampling`] says otherwise).

use std::collections::HashMap;
use std::io::{Read, Seek};
use std::path::Path;
use std::time::Instant;

use candle_core::safetensors::Load as _;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama::{Cache, Llama, LlamaConfig, LlamaEosToks};
use candle_transformers::models::quantized_llama;
use safetensors::{Dtype, SafeTensors};

use crate::chat::GgufTokenizer;
use crate::combine::{all_failed, Combiner};
use crate::gguf::{self, ModelLimits, QModel};
use crate::guard::guarded;
use crate::sampling::{Sampler, Sampling};

/// A model ready to generate, shared by every job of the connection that pushed it.
///
/// Either a Hugging Face llama (`model_type: "llama"` config with the fields
/// [`LlamaConfig`] reads, weights kept in `F32` whatever float dtype the file
/// holds), or a GGUF file's quantized llama, qwen2 or qwen3 (weights kept in
/// their quantized types). See docs/CANDLE.md.
pub struct CandleModel {
    weights: ModelWeights,
    device: Device,
    vocab_size: usize,
    context: usize,
    params: usize,
    eos: Vec<u32>,
    weight_bytes: u64,
    /// A GGUF file's tokenizer, when it was asked for (local_lm).
    tokenizer: Option<GgufTokenizer>,
    /// Runs the forward passes of every job on this model, one at a time,
    /// stacking concurrent jobs' next tokens where the network allows.
    passes: Combiner<Step, (Job, Tensor)>,
    /// Most prompt tokens one forward pass takes.
    prompt_chunk: usize,
}

/// Most jobs' next tokens one forward pass carries, unless the executor
/// says otherwise ([`crate::CandleConfig::max_batch`]).
pub(crate) const DEFAULT_MAX_BATCH: usize = 16;

/// Most prompt tokens one forward pass takes, unless the executor says
/// otherwise ([`crate::CandleConfig::prompt_chunk`]): llama.cpp's default
/// micro-batch, so that a prompt is split where llama.cpp splits it.
pub(crate) const DEFAULT_PROMPT_CHUNK: usize = 512;

/// A job's next forward pass: its state, the tokens it feeds (the prompt,
/// then one generated token at a time) and the position of the first.
struct Step {
    job: Job,
    tokens: Vec<u32>,
    pos: usize,
}

impl Step {
    /// One token on our GGUF llama/qwen2/qwen3: several such steps share a pass.
    fn stackable(&self) -> bool {
        self.tokens.len() == 1 && matches!(self.job, Job::QLlama(_))
    }
}

/// The network itself.
enum ModelWeights {
    Llama {
        llama: Llama,
        /// A KV cache that has seen nothing, with the rotary tables computed once:
        /// each job clones it (the tables are shared, the keys and values are not).
        fresh_cache: Cache,
    },
    Gguf(QModel),
}

/// One job's view of the model: its own KV cache.
enum Job {
    Llama(Cache),
    QLlama(crate::qllama::Cache),
    QLlamaMoe(Box<quantized_llama::ModelWeights>),
}

impl std::fmt::Debug for CandleModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CandleModel")
            .field("format", &self.format())
            .field("vocab_size", &self.vocab_size)
            .field("context", &self.context)
            .field("params", &self.params)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

/// Most layers a config may ask for (real llamas have at most a few hundred).
const MAX_LAYERS: usize = 4096;

/// Float dtypes a weights file may hold; each is converted to `F32`.
const FLOAT_DTYPES: [Dtype; 4] = [Dtype::F32, Dtype::F16, Dtype::BF16, Dtype::F64];

impl CandleModel {
    /// Loads a llama from `config_json` (a Hugging Face `config.json`) and the
    /// bytes of a safetensors file, on `device`, with at most `max_context`
    /// positions (the smaller of this and `max_position_embeddings`).
    ///
    /// Each tensor is copied out of `weights` exactly once, straight into its
    /// `F32` storage (bytes cannot become tensor storage in place: they are
    /// not aligned for `f32`, and a file's bytes are not the model's dtype).
    /// The caller may drop or unmap `weights` as soon as this returns.
    pub fn load(
        config_json: &str,
        weights: &[u8],
        device: &Device,
        max_context: usize,
    ) -> Result<CandleModel, String> {
        let llama_config = parse_config(config_json)?;
        let expected = expected_tensors(&llama_config)?;
        let tensors = load_tensors(weights, &expected, device)?;
        let eos = match &llama_config.eos_token_id {
            None => Vec::new(),
            Some(LlamaEosToks::Single(id)) => vec![*id],
            Some(LlamaEosToks::Multiple(ids)) => ids.clone(),
        };
        let mut config = llama_config.into_config(false);
        // The rotary tables cover every position: bound them (a config may say 128k).
        config.max_position_embeddings = config.max_position_embeddings.min(max_context.max(1));
        let params = expected.iter().map(|t| t.elems).sum();
        // Every tensor was checked above, so this should not fail; candle's
        // llama unwraps inside `load`, hence the guard all the same.
        let built = guarded("building the model", || {
            let fresh_cache = Cache::new(true, DType::F32, &config, device)?;
            let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
            Ok((Llama::load(vb, &config)?, fresh_cache))
        })?;
        let (llama, fresh_cache) = built;
        Ok(CandleModel {
            weights: ModelWeights::Llama { llama, fresh_cache },
            device: device.clone(),
            vocab_size: config.vocab_size,
            context: config.max_position_embeddings,
            params,
            eos,
            weight_bytes: params as u64 * 4,
            tokenizer: None,
            passes: Combiner::new(DEFAULT_MAX_BATCH),
            prompt_chunk: DEFAULT_PROMPT_CHUNK,
        })
    }

    /// Loads a quantized GGUF model (llama, qwen2 or qwen3) from `reader`, a
    /// file of `len` bytes: the header is read and every tensor checked
    /// against the file first (see [`gguf`](crate::gguf)), then the tensors
    /// are read once each, straight into their quantized storage. With
    /// `tokenizer`, the file must also carry a tokenizer this node can build
    /// (needed for prompts, not for `infer`).
    pub fn load_gguf<R: Read + Seek>(
        reader: &mut R,
        len: u64,
        device: &Device,
        limits: ModelLimits,
        tokenizer: bool,
    ) -> Result<CandleModel, String> {
        let (content, checked) = gguf::read_header(reader, len, limits)?;
        let tokenizer = match tokenizer {
            true => Some(GgufTokenizer::from_metadata(
                &content.metadata,
                checked.vocab_size,
            )?),
            false => None,
        };
        let mut eos: Vec<u32> = match &tokenizer {
            Some(t) => t.eog.clone(),
            None => gguf::md_u32(&content.metadata, "tokenizer.ggml.eos_token_id")
                .into_iter()
                .collect(),
        };
        eos.retain(|&id| (id as usize) < checked.vocab_size);
        let weights = gguf::load(content, &checked, reader, device)?;
        Ok(CandleModel {
            weights: ModelWeights::Gguf(weights),
            device: device.clone(),
            vocab_size: checked.vocab_size,
            context: checked.context,
            params: checked.params,
            eos,
            weight_bytes: checked.tensor_bytes,
            tokenizer,
            passes: Combiner::new(DEFAULT_MAX_BATCH),
            prompt_chunk: DEFAULT_PROMPT_CHUNK,
        })
    }

    /// [`load_gguf`](CandleModel::load_gguf) from a file.
    pub fn load_gguf_file(
        path: &Path,
        device: &Device,
        limits: ModelLimits,
        tokenizer: bool,
    ) -> Result<CandleModel, String> {
        let file = std::fs::File::open(path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let len = file
            .metadata()
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?
            .len();
        // Buffered: the header is tens of thousands of small reads (one per
        // vocabulary string); each tensor is then one large read.
        let mut reader = std::io::BufReader::with_capacity(1 << 16, file);
        CandleModel::load_gguf(&mut reader, len, device, limits, tokenizer)
    }

    /// `"gguf"` or `"safetensors"`: what the model was loaded from.
    pub fn format(&self) -> &'static str {
        match self.weights {
            ModelWeights::Llama { .. } => "safetensors",
            ModelWeights::Gguf(_) => "gguf",
        }
    }

    /// Whether the model carries a chat template (a GGUF file's
    /// `tokenizer.chat_template`, when it was loaded with its tokenizer).
    pub fn has_chat_template(&self) -> bool {
        self.tokenizer.as_ref().is_some_and(|t| t.has_template())
    }

    /// Bytes of weights held in memory: a GGUF file's tensor data as stored
    /// (quantized), or 4 per parameter for a safetensors model (`F32`).
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// The GGUF file's tokenizer, when it was loaded with one.
    pub(crate) fn gguf_tokenizer(&self) -> Option<&GgufTokenizer> {
        self.tokenizer.as_ref()
    }

    /// Loads `DIR/config.json` and `DIR/model.safetensors`.
    pub fn load_dir(
        dir: &Path,
        device: &Device,
        max_context: usize,
    ) -> Result<CandleModel, String> {
        let config_path = dir.join("config.json");
        let config = std::fs::read_to_string(&config_path)
            .map_err(|e| format!("cannot read {}: {e}", config_path.display()))?;
        CandleModel::load_file(&config, &dir.join("model.safetensors"), device, max_context)
            .map_err(|e| format!("{}: {e}", dir.display()))
    }

    /// [`load`](CandleModel::load) from a safetensors file, memory-mapped
    /// rather than read: its pages are the page cache's, not the node's heap,
    /// and are released as soon as the tensors are built.
    pub fn load_file(
        config_json: &str,
        path: &Path,
        device: &Device,
        max_context: usize,
    ) -> Result<CandleModel, String> {
        let file = std::fs::File::open(path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        // SAFETY: the mapping is only read, and only while this call runs.
        // The files mapped are a spooled upload's (a private 0600 file in a
        // 0700 directory that nothing writes once its upload is committed)
        // or the operator's local_lm model; a file truncated underneath would
        // fault, as with any mmap, but no Rust reference outlives the call.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| format!("cannot map {}: {e}", path.display()))?;
        CandleModel::load(config_json, &map, device, max_context)
    }

    /// `(forward passes run, job steps they carried)` since the model was
    /// loaded. A step is one job's prompt or next token; with concurrent jobs
    /// on a GGUF llama, qwen2 or qwen3, one pass carries several jobs' next tokens.
    pub fn forward_passes(&self) -> (u64, u64) {
        self.passes.counts()
    }

    /// This model with at most `max_batch` jobs' next tokens in one forward
    /// pass (1: each job's pass runs alone), and at most `prompt_chunk`
    /// prompt tokens (at least 1).
    pub(crate) fn with_passes(mut self, max_batch: usize, prompt_chunk: usize) -> CandleModel {
        self.passes = Combiner::new(max_batch);
        self.prompt_chunk = prompt_chunk.max(1);
        self
    }

    /// Tokens the model knows: valid ids are `0..vocab_size`.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Positions a job may use (input plus generated tokens).
    pub fn context(&self) -> usize {
        self.context
    }

    /// Parameters (elements of every weight tensor; a tied `lm_head` counts once).
    pub fn param_count(&self) -> usize {
        self.params
    }

    /// The config's `eos_token_id`s.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// Greedy generation of `n` tokens after `input` (the generated ones only),
    /// stopping early after any of `stop`, and with [`GenerateError::Timeout`]
    /// if `deadline` passes before the next token. The caller checks the ids
    /// and the context. The prompt runs in one forward pass (or one per 512
    /// tokens), then one token at a time through a KV cache of this call's own.
    pub fn generate(
        &self,
        input: &[u32],
        n: usize,
        stop: &[u32],
        deadline: Option<Instant>,
    ) -> Result<Vec<u32>, GenerateError> {
        self.generate_with(input, n, stop, deadline, &Sampling::default(), |_| false)
    }

    /// [`generate`](CandleModel::generate) with each token picked as
    /// `sampling` says (its `stop` strings are the caller's: `halt` is asked
    /// after each token, with the tokens so far, whether to stop there, and
    /// between the passes of a long prompt, with none).
    pub fn generate_with(
        &self,
        input: &[u32],
        n: usize,
        stop: &[u32],
        deadline: Option<Instant>,
        sampling: &Sampling,
        mut halt: impl FnMut(&[u32]) -> bool,
    ) -> Result<Vec<u32>, GenerateError> {
        let (out, finished) = guarded("generating", || {
            let mut job = Some(self.start_job());
            let mut passes = self.passes.join();
            let mut sampler = Sampler::new(sampling);
            let mut seen: Vec<u32> = Vec::with_capacity(input.len() + n);
            seen.extend_from_slice(input);
            let mut pos = 0;
            while seen.len() - input.len() < n {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok((seen.split_off(input.len()), false));
                }
                // A long prompt goes in chunks: other jobs' tokens run
                // between them, and the deadline and `halt` are asked.
                let end = seen.len().min(pos + self.prompt_chunk);
                let step = Step {
                    job: job.take().expect("a job's state comes back with each pass"),
                    tokens: seen[pos..end].to_vec(),
                    pos,
                };
                let (state, logits) = passes
                    .run(step, Step::stackable, |steps| self.run_passes(steps))
                    .map_err(candle_core::Error::Msg)?;
                job = Some(state);
                pos = end;
                if pos < seen.len() {
                    if halt(&[]) {
                        break;
                    }
                    continue;
                }
                let next = sampler.next(&logits, &seen)?;
                seen.push(next);
                if stop.contains(&next) || halt(&seen[input.len()..]) {
                    break;
                }
            }
            Ok((seen.split_off(input.len()), true))
        })
        .map_err(GenerateError::Candle)?;
        match finished {
            true => Ok(out),
            false => Err(GenerateError::Timeout {
                generated: out.len(),
            }),
        }
    }

    /// A job's own state: a fresh KV cache (quantized models: a clone of the
    /// weights' handles, which share the tensors).
    fn start_job(&self) -> Job {
        match &self.weights {
            ModelWeights::Llama { fresh_cache, .. } => Job::Llama(fresh_cache.clone()),
            ModelWeights::Gguf(QModel::Llama(m)) => Job::QLlama(m.new_cache()),
            ModelWeights::Gguf(QModel::LlamaMoe(m)) => Job::QLlamaMoe(Box::new(m.clone())),
        }
    }

    /// Runs a group of steps from [`Combiner::run`]: one pass for several
    /// stacked steps, else each step's own pass. Each result is the step's
    /// state and its logits, `[1, vocab]`.
    fn run_passes(&self, steps: Vec<Step>) -> Vec<Result<(Job, Tensor), String>> {
        let n = steps.len();
        let failed = |e: candle_core::Error| all_failed(n, &e.to_string());
        if n > 1 {
            let (ModelWeights::Gguf(QModel::Llama(model)), true) =
                (&self.weights, steps.iter().all(Step::stackable))
            else {
                return all_failed(n, "steps stacked that cannot share a pass");
            };
            let mut rows: Vec<(crate::qllama::Cache, u32, usize)> = steps
                .into_iter()
                .filter_map(|s| match s.job {
                    Job::QLlama(cache) => Some((cache, s.tokens[0], s.pos)),
                    _ => None,
                })
                .collect();
            let mut refs: Vec<_> = rows
                .iter_mut()
                .map(|(cache, token, pos)| (cache, *token, *pos))
                .collect();
            let logits = match model.forward_steps(&mut refs) {
                Ok(logits) => logits,
                Err(e) => return failed(e),
            };
            return rows
                .into_iter()
                .enumerate()
                .map(|(i, (cache, _, _))| {
                    let row = logits.narrow(0, i, 1).map_err(|e| e.to_string())?;
                    Ok((Job::QLlama(cache), row))
                })
                .collect();
        }
        steps
            .into_iter()
            .map(|mut step| {
                let x = Tensor::new(step.tokens.as_slice(), &self.device)
                    .and_then(|x| x.unsqueeze(0))
                    .and_then(|x| self.forward(&mut step.job, &x, step.pos))
                    .map_err(|e| e.to_string())?;
                Ok((step.job, x))
            })
            .collect()
    }

    /// The logits after the tokens `x` (shape `[1, len]`) at position `pos`.
    fn forward(&self, job: &mut Job, x: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        match (job, &self.weights) {
            (Job::Llama(cache), ModelWeights::Llama { llama, .. }) => llama.forward(x, pos, cache),
            (Job::QLlama(cache), ModelWeights::Gguf(QModel::Llama(m))) => m.forward(cache, x, pos),
            (Job::QLlamaMoe(m), _) => m.forward(x, pos),
            (Job::Llama(_), ModelWeights::Gguf(_)) | (Job::QLlama(_), _) => {
                candle_core::bail!("a job on another model's weights")
            }
        }
    }
}

/// Why [`CandleModel::generate`] gave no output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GenerateError {
    /// The deadline passed after `generated` tokens.
    Timeout {
        /// Tokens generated before it.
        generated: usize,
    },
    /// candle failed (or panicked); the message says where.
    Candle(String),
}

/// Parses a Hugging Face config, insisting on `model_type: "llama"`, and
/// checks the sizes candle divides by or allocates from.
pub(crate) fn parse_config(config_json: &str) -> Result<LlamaConfig, String> {
    let value: serde_json::Value =
        serde_json::from_str(config_json).map_err(|e| format!("config_json is not JSON: {e}"))?;
    match value.get("model_type").and_then(|t| t.as_str()) {
        Some("llama") => {}
        Some(other) => {
            return Err(format!(
                "unsupported model_type {other:?}: this node runs \"llama\" models only"
            ))
        }
        None => {
            return Err(
                "config_json has no model_type string: expected a Hugging Face llama config.json (\"model_type\": \"llama\")"
                    .to_owned(),
            )
        }
    }
    let config: LlamaConfig =
        serde_json::from_value(value).map_err(|e| format!("bad llama config: {e}"))?;
    let positive = [
        ("hidden_size", config.hidden_size),
        ("intermediate_size", config.intermediate_size),
        ("vocab_size", config.vocab_size),
        ("num_hidden_layers", config.num_hidden_layers),
        ("num_attention_heads", config.num_attention_heads),
        ("num_key_value_heads", config.num_key_value_heads()),
        ("max_position_embeddings", config.max_position_embeddings),
    ];
    for (name, value) in positive {
        if value == 0 {
            return Err(format!("bad llama config: {name} is 0"));
        }
    }
    // The tensor list is built from this before the file is consulted.
    if config.num_hidden_layers > MAX_LAYERS {
        return Err(format!(
            "bad llama config: num_hidden_layers {} is more than {MAX_LAYERS}",
            config.num_hidden_layers
        ));
    }
    let (hidden, heads, kv_heads) = (
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads(),
    );
    if hidden % heads != 0 || (hidden / heads) % 2 != 0 {
        return Err(format!(
            "bad llama config: hidden_size {hidden} must be num_attention_heads {heads} times an even head size"
        ));
    }
    if heads % kv_heads != 0 {
        return Err(format!(
            "bad llama config: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        ));
    }
    if config.vocab_size > i32::MAX as usize {
        return Err(format!(
            "bad llama config: vocab_size {} does not fit token ids (i32)",
            config.vocab_size
        ));
    }
    if !(config.rms_norm_eps.is_finite() && config.rms_norm_eps > 0.0) {
        return Err("bad llama config: rms_norm_eps must be a positive number".to_owned());
    }
    if !(config.rope_theta.is_finite() && config.rope_theta > 0.0) {
        return Err("bad llama config: rope_theta must be a positive number".to_owned());
    }
    Ok(config)
}

/// A tensor the config calls for.
pub(crate) struct Expected {
    pub(crate) name: String,
    pub(crate) shape: Vec<usize>,
    pub(crate) elems: usize,
}

/// The tensors (name and shape) candle's llama reads for `config`.
pub(crate) fn expected_tensors(config: &LlamaConfig) -> Result<Vec<Expected>, String> {
    let hidden = config.hidden_size;
    let head_dim = hidden / config.num_attention_heads;
    let q = head_dim * config.num_attention_heads;
    let kv = head_dim * config.num_key_value_heads();
    let inter = config.intermediate_size;
    let vocab = config.vocab_size;
    let mut list = vec![
        ("model.embed_tokens.weight".to_owned(), vec![vocab, hidden]),
        ("model.norm.weight".to_owned(), vec![hidden]),
    ];
    if !config.tie_word_embeddings.unwrap_or(false) {
        list.push(("lm_head.weight".to_owned(), vec![vocab, hidden]));
    }
    for i in 0..config.num_hidden_layers {
        let p = format!("model.layers.{i}");
        list.extend([
            (format!("{p}.self_attn.q_proj.weight"), vec![q, hidden]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kv, hidden]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kv, hidden]),
            (format!("{p}.self_attn.o_proj.weight"), vec![hidden, q]),
            (format!("{p}.mlp.gate_proj.weight"), vec![inter, hidden]),
            (format!("{p}.mlp.up_proj.weight"), vec![inter, hidden]),
            (format!("{p}.mlp.down_proj.weight"), vec![hidden, inter]),
            (format!("{p}.input_layernorm.weight"), vec![hidden]),
            (format!("{p}.post_attention_layernorm.weight"), vec![hidden]),
        ]);
    }
    list.into_iter()
        .map(|(name, shape)| {
            let elems = shape
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| format!("bad llama config: {name} would have {shape:?} elements"))?;
            Ok(Expected { name, shape, elems })
        })
        .collect()
}

/// Checks every expected tensor's presence, dtype and shape in the file, then
/// copies each one out as `F32` (extra tensors, such as `rotary_emb.inv_freq`,
/// are ignored). Nothing is loaded until everything has been checked.
fn load_tensors(
    bytes: &[u8],
    expected: &[Expected],
    device: &Device,
) -> Result<HashMap<String, Tensor>, String> {
    let file = SafeTensors::deserialize(bytes)
        .map_err(|e| format!("the weights are not a valid safetensors file: {e}"))?;
    let mut views = Vec::with_capacity(expected.len());
    let mut missing = Vec::new();
    for want in expected {
        match file.tensor(&want.name) {
            Ok(view) => {
                if !FLOAT_DTYPES.contains(&view.dtype()) {
                    return Err(format!(
                        "tensor {} has dtype {:?}; expected a float dtype (F32, F16, BF16 or F64)",
                        want.name,
                        view.dtype()
                    ));
                }
                if view.shape() != want.shape.as_slice() {
                    return Err(format!(
                        "tensor {} has shape {:?}; the config needs {:?}",
                        want.name,
                        view.shape(),
                        want.shape
                    ));
                }
                views.push((want.name.clone(), view));
            }
            Err(_) => missing.push(want.name.as_str()),
        }
    }
    if !missing.is_empty() {
        let shown = missing.len().min(3);
        return Err(format!(
            "the weights lack {} tensor(s) the config needs: {}{}",
            missing.len(),
            missing[..shown].join(", "),
            if missing.len() > shown { ", …" } else { "" }
        ));
    }
    let mut tensors = HashMap::with_capacity(views.len());
    for (name, view) in views {
        let tensor = guarded("loading a tensor", || {
            view.load(device)?.to_dtype(DType::F32)
        })
        .map_err(|e| format!("{name}: {e}"))?;
        tensors.insert(name, tensor);
    }
    Ok(tensors)
}
