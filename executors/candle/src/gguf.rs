//! Quantized GGUF models (llama.cpp's format): the header read and checked
//! before anything is loaded, then our own quantized llama, qwen2 or qwen3
//! (`src/qllama.rs`; candle-transformers' llama for a mixture of experts)
//! built from it, with the weights left quantized.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::Device;
use candle_transformers::models::quantized_llama;

use crate::qllama::{Arch, QLlama};

/// The 4 bytes a GGUF file starts with.
pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// Architectures (`general.architecture`) this node runs.
pub const SUPPORTED_ARCHITECTURES: &str =
    "llama (Llama 1/2/3, SmolLM, Mistral, TinyLlama…), qwen2, qwen3";

/// Tensor types (ggml dtypes) candle runs on the CPU.
pub const SUPPORTED_TYPES: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K";

/// Most layers a file may declare.
const MAX_LAYERS: usize = 4096;

/// Most positions a qwen file may declare: candle computes its rotary
/// tables for all of them at load.
const MAX_DECLARED_CONTEXT: usize = 1 << 18;

/// Widest attention head a file may declare (Gemma's 256 is the widest in use).
const MAX_HEAD_DIM: usize = 1024;

/// What a GGUF file may make a node allocate beside its weights: checked
/// against the header before anything is read (`donate serve
/// --candle-context`, `--candle-runtime-memory`, `--candle-metadata-memory`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelLimits {
    /// Most positions (input plus generated) a job may use, below the model's
    /// own context length (default 4096).
    pub context: usize,
    /// Most memory a model may need beside its weights at load and per job:
    /// its rotary tables and one job's KV cache filled to `context`
    /// (default 8 GiB).
    pub runtime_bytes: u64,
    /// Most memory the header (metadata and tensor list, the vocabulary
    /// included) may take once read; the largest in use need tens of MiB
    /// (default 256 MiB).
    pub metadata_bytes: u64,
}

impl Default for ModelLimits {
    fn default() -> Self {
        ModelLimits {
            context: 4096,
            runtime_bytes: 8 << 30,
            metadata_bytes: 256 << 20,
        }
    }
}

/// The metadata key of the tensor data's alignment.
const ALIGNMENT_KEY: &str = "general.alignment";

/// Positions candle's quantized llama has rotary tables for.
const LLAMA_MAX_SEQ: usize = quantized_llama::MAX_SEQ_LEN;

/// The loaded weights of one architecture.
pub(crate) enum QModel {
    /// Our own llama, qwen2 or qwen3: shared by every job, each with its own KV cache.
    Llama(QLlama),
    /// A llama mixture of experts (Mixtral), on candle-transformers' model:
    /// cloned per job (the clone shares the quantized tensors, not the cache).
    LlamaMoe(quantized_llama::ModelWeights),
}

/// What the header says, once checked.
pub(crate) struct Checked {
    pub(crate) arch: Arch,
    pub(crate) vocab_size: usize,
    pub(crate) context: usize,
    pub(crate) params: usize,
    /// Bytes of tensor data (the quantized weights held in memory once loaded).
    pub(crate) tensor_bytes: u64,
}

/// Whether `bytes` start like a GGUF file.
pub fn is_gguf(bytes: &[u8]) -> bool {
    bytes.starts_with(GGUF_MAGIC)
}

/// Reads and checks a GGUF header from `reader` (`len` bytes in all): the
/// magic, the metadata, the architecture and its sizes, and every tensor's
/// type and extent inside the file. Nothing is loaded.
pub(crate) fn read_header<R: Read + Seek>(
    reader: &mut R,
    len: u64,
    limits: ModelLimits,
) -> Result<(Content, Checked), String> {
    let mut magic = [0u8; 4];
    reader
        .read_exact(&mut magic)
        .map_err(|_| format!("not a GGUF file: {len} bytes, shorter than its header"))?;
    if &magic != GGUF_MAGIC {
        return Err(format!(
            "not a GGUF file: it starts with {magic:02x?}, not \"GGUF\""
        ));
    }
    reader
        .seek(SeekFrom::Start(0))
        .map_err(|e| format!("cannot read the GGUF file: {e}"))?;
    prescan(&mut *reader, len, limits.metadata_bytes)?;
    reader
        .seek(SeekFrom::Start(0))
        .map_err(|e| format!("cannot read the GGUF file: {e}"))?;
    let content = crate::guard::guarded("reading the GGUF header", || Content::read(reader))
        .map_err(|e| {
            if let Some(n) = e.split("unknown dtype for tensor ").nth(1) {
                let n = n.trim();
                format!(
                    "unsupported GGUF tensor type {n} ({}): this node runs {SUPPORTED_TYPES}",
                    ggml_type_name(n.parse().unwrap_or(u32::MAX))
                )
            } else {
                format!("not a valid GGUF file: {e}")
            }
        })?;
    let checked = check(&content, len, limits)?;
    Ok((content, checked))
}

/// Walks the header's counts and lengths before candle reads it (candle
/// allocates what they say): each must fit in the bytes left in the file, a
/// tensor has at most 4 dimensions, and the metadata must fit in
/// `max_memory` bytes once read.
fn prescan<R: Read + Seek>(reader: R, len: u64, max_memory: u64) -> Result<(), String> {
    let mut scan = Prescan {
        reader: std::io::BufReader::new(reader),
        pos: 0,
        len,
        v1: false,
        memory: 0,
        max_memory,
    };
    scan.skip(4)?;
    let version = scan.u32()?;
    scan.v1 = version == 1;
    let tensors = scan.count("tensor count")?;
    let kvs = scan.count("metadata count")?;
    for _ in 0..kvs {
        let alignment = scan.key()? == ALIGNMENT_KEY.as_bytes();
        let kind = scan.u32()?;
        match (alignment, kind) {
            // The integer types candle reads it from (it divides by it).
            (true, 0..=5) => scan.alignment(kind)?,
            _ => scan.value(kind, 0)?,
        }
        scan.memory += 64;
    }
    for _ in 0..tensors {
        scan.string()?;
        let dims = scan.u32()?;
        if dims > 4 {
            return Err(format!(
                "not a valid GGUF file: a tensor with {dims} dimensions (at most 4)"
            ));
        }
        scan.skip(u64::from(dims) * if scan.v1 { 4 } else { 8 } + 4 + 8)?;
        scan.memory += 128;
    }
    if scan.memory > max_memory {
        return Err(format!(
            "the GGUF header would take {} MiB in memory once read, more than {} MiB (--candle-metadata-memory)",
            scan.memory >> 20,
            max_memory >> 20
        ));
    }
    Ok(())
}

/// [`prescan`]'s place in the file and what it has counted.
struct Prescan<R> {
    reader: std::io::BufReader<R>,
    pos: u64,
    len: u64,
    /// GGUF version 1 writes counts and lengths as u32.
    v1: bool,
    /// Memory the header will take once read, estimated.
    memory: u64,
    /// Most it may take.
    max_memory: u64,
}

impl<R: Read + Seek> Prescan<R> {
    fn short(&self) -> String {
        format!(
            "not a valid GGUF file: its header runs past the end of the {}-byte file",
            self.len
        )
    }

    fn skip(&mut self, n: u64) -> Result<(), String> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.len => {}
            _ => return Err(self.short()),
        }
        let step = i64::try_from(n).map_err(|_| self.short())?;
        self.reader.seek_relative(step).map_err(|_| self.short())?;
        self.pos += n;
        Ok(())
    }

    fn u32(&mut self) -> Result<u32, String> {
        let mut b = [0u8; 4];
        self.reader.read_exact(&mut b).map_err(|_| self.short())?;
        self.pos += 4;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let mut b = [0u8; 8];
        self.reader.read_exact(&mut b).map_err(|_| self.short())?;
        self.pos += 8;
        Ok(u64::from_le_bytes(b))
    }

    /// A count or length: no larger than the bytes left, as each item takes one at least.
    fn count(&mut self, what: &str) -> Result<u64, String> {
        let n = if self.v1 {
            u64::from(self.u32()?)
        } else {
            self.u64()?
        };
        if n > self.len - self.pos {
            return Err(format!(
                "not a valid GGUF file: a {what} of {n} is more than the {} bytes left in the file",
                self.len - self.pos
            ));
        }
        Ok(n)
    }

    /// A metadata key: its bytes when it may be one [`prescan`] reads
    /// ([`ALIGNMENT_KEY`]), else nothing (skipped).
    fn key(&mut self) -> Result<Vec<u8>, String> {
        let n = self.count("string length")?;
        self.memory += 24 + n;
        if n != ALIGNMENT_KEY.len() as u64 {
            self.skip(n)?;
            return Ok(Vec::new());
        }
        let mut key = vec![0u8; ALIGNMENT_KEY.len()];
        self.reader.read_exact(&mut key).map_err(|_| self.short())?;
        self.pos += n;
        Ok(key)
    }

    /// `general.alignment` of integer type `kind` (0..=5): a power of two,
    /// as llama.cpp requires (0 would divide by zero in candle's reader). A
    /// negative one is ignored (candle then takes the default, 32).
    fn alignment(&mut self, kind: u32) -> Result<(), String> {
        let value: i64 = match kind {
            0 => i64::from(self.bytes::<1>()?[0]),
            1 => i64::from(self.bytes::<1>()?[0] as i8),
            2 => i64::from(u16::from_le_bytes(self.bytes()?)),
            3 => i64::from(i16::from_le_bytes(self.bytes()?)),
            4 => i64::from(u32::from_le_bytes(self.bytes()?)),
            _ => i64::from(i32::from_le_bytes(self.bytes()?)),
        };
        if value >= 0 && !(value as u64).is_power_of_two() {
            return Err(format!(
                "not a valid GGUF file: {ALIGNMENT_KEY} {value} is not a power of two"
            ));
        }
        Ok(())
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut b = [0u8; N];
        self.reader.read_exact(&mut b).map_err(|_| self.short())?;
        self.pos += N as u64;
        Ok(b)
    }

    fn string(&mut self) -> Result<(), String> {
        let n = self.count("string length")?;
        self.memory += 24 + n;
        self.skip(n)
    }

    fn value(&mut self, kind: u32, depth: u32) -> Result<(), String> {
        match kind {
            0 | 1 | 7 => self.skip(1),
            2 | 3 => self.skip(2),
            4..=6 => self.skip(4),
            10..=12 => self.skip(8),
            8 => self.string(),
            9 if depth < 2 => {
                let item = self.u32()?;
                let n = self.count("metadata array length")?;
                // Each item becomes a value of 32 bytes or so.
                self.memory = self.memory.saturating_add(n.saturating_mul(32));
                if self.memory > self.max_memory {
                    return Err(format!(
                        "the GGUF metadata would take more than {} MiB in memory once read (an array of {n} values; --candle-metadata-memory)",
                        self.max_memory >> 20
                    ));
                }
                match item {
                    0..=7 | 10..=12 => {
                        let size = match item {
                            0 | 1 | 7 => 1,
                            2 | 3 => 2,
                            4..=6 => 4,
                            _ => 8,
                        };
                        let bytes = n.checked_mul(size).ok_or_else(|| self.short())?;
                        self.skip(bytes)
                    }
                    _ => (0..n).try_for_each(|_| self.value(item, depth + 1)),
                }
            }
            9 => Err("not a valid GGUF file: metadata arrays nested deeper than 2".to_owned()),
            other => Err(format!(
                "not a valid GGUF file: unknown metadata value type {other}"
            )),
        }
    }
}

/// Checks what [`read_header`] read; see there.
fn check(content: &Content, len: u64, limits: ModelLimits) -> Result<Checked, String> {
    let md = &content.metadata;
    let arch = match md.get("general.architecture") {
        Some(Value::String(a)) => Arch::from_key(a).ok_or_else(|| {
            format!(
                "unsupported GGUF architecture {}: this node runs {SUPPORTED_ARCHITECTURES}",
                brief(a)
            )
        })?,
        _ => return Err("the GGUF file has no general.architecture string".to_owned()),
    };
    let p = arch.key();
    let get = |key: &str| -> Result<usize, String> {
        let full = format!("{p}.{key}");
        match md.get(&full) {
            None => Err(format!("the GGUF file lacks {full}")),
            Some(v) => v
                .to_u64()
                .ok()
                .and_then(|v| usize::try_from(v).ok())
                .ok_or_else(|| format!("{full} is not a whole number: {}", brief(v))),
        }
    };
    let layers = get("block_count")?;
    let hidden = get("embedding_length")?;
    let heads = get("attention.head_count")?;
    let kv_heads = get("attention.head_count_kv")?;
    if layers == 0 || layers > MAX_LAYERS {
        return Err(format!(
            "{p}.block_count {layers} is outside 1..={MAX_LAYERS}"
        ));
    }
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(format!(
            "{p}.attention.head_count {heads} must be a positive multiple of head_count_kv {kv_heads}"
        ));
    }
    if hidden == 0 || hidden % heads != 0 {
        return Err(format!(
            "{p}.embedding_length {hidden} is not a positive multiple of the {heads} heads"
        ));
    }
    let head_dim = if arch == Arch::Qwen3 {
        // qwen3's own head size: rotated in pairs.
        let key_length = get("attention.key_length").unwrap_or(hidden / heads);
        if key_length == 0 || key_length % 2 != 0 || key_length > MAX_HEAD_DIM {
            return Err(format!(
                "{p}.attention.key_length {key_length} is not an even number in 2..={MAX_HEAD_DIM}"
            ));
        }
        key_length
    } else {
        hidden / heads
    };
    if head_dim > MAX_HEAD_DIM {
        return Err(format!(
            "heads of {head_dim} values ({p}.embedding_length / attention.head_count) are wider than {MAX_HEAD_DIM}"
        ));
    }
    let rope_dim = match md.get(&format!("{p}.rope.dimension_count")) {
        Some(_) if arch == Arch::Llama => get("rope.dimension_count")?,
        _ => head_dim,
    };
    if rope_dim == 0 || rope_dim % 2 != 0 || rope_dim > head_dim {
        return Err(format!(
            "{p}.rope.dimension_count {rope_dim} is not an even number in 2..={head_dim} (the head size)"
        ));
    }
    // Read as an f32 by the model (whose message would quote the value whole).
    match md.get(&format!("{p}.attention.layer_norm_rms_epsilon")) {
        Some(Value::F32(eps)) if !(eps.is_finite() && *eps > 0.0) => {
            return Err(format!(
                "{p}.attention.layer_norm_rms_epsilon {eps} is not positive"
            ));
        }
        Some(Value::F32(_)) => {}
        Some(other) => {
            return Err(format!(
                "{p}.attention.layer_norm_rms_epsilon is not an f32: {}",
                brief(other)
            ))
        }
        None => {
            return Err(format!(
                "the GGUF file lacks {p}.attention.layer_norm_rms_epsilon"
            ))
        }
    }
    let declared = match arch {
        Arch::Llama => get("context_length").unwrap_or(LLAMA_MAX_SEQ),
        Arch::Qwen2 | Arch::Qwen3 => get("context_length")?,
    };
    if declared == 0 || declared > MAX_DECLARED_CONTEXT {
        return Err(format!(
            "{p}.context_length {declared} is outside 1..={MAX_DECLARED_CONTEXT}"
        ));
    }
    let mut context = declared.min(limits.context.max(1));
    if arch == Arch::Llama {
        context = context.min(LLAMA_MAX_SEQ);
    }
    // Rotary tables, then keys and values of f32 for every layer and position.
    let product = |sizes: &[usize]| {
        sizes
            .iter()
            .try_fold(1u64, |acc, &n| acc.checked_mul(n as u64))
    };
    let runtime = product(&[context, rope_dim, 4])
        .zip(product(&[layers, context, kv_heads, head_dim, 2, 4]))
        .and_then(|(rope, kv)| rope.checked_add(kv));
    match runtime {
        Some(bytes) if bytes <= limits.runtime_bytes => {}
        _ => {
            return Err(format!(
                "at a context of {context} positions this model needs more than {} MiB for its KV cache and rotary tables: \
                 its {layers} layers × {kv_heads} KV heads × {head_dim} are too large \
                 (lower --candle-context or raise --candle-runtime-memory)",
                limits.runtime_bytes >> 20
            ))
        }
    }

    // Every tensor inside the file, of a type candle runs.
    let mut params = 0usize;
    let mut tensor_bytes = 0u64;
    // In file order, so that the message names the first bad tensor.
    let mut infos: Vec<_> = content.tensor_infos.iter().collect();
    infos.sort_by_key(|(name, info)| (info.offset, *name));
    // Where the previous tensor ends: none may share bytes with another, so
    // the tensors never hold more than the file does.
    let mut previous: Option<(&String, u64)> = None;
    for (raw_name, info) in infos {
        let name = shown(raw_name);
        let elems = info
            .shape
            .dims()
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| format!("tensor {name} has an impossible shape {:?}", info.shape))?;
        let block = info.ggml_dtype.block_size();
        if elems % block != 0 {
            return Err(format!(
                "tensor {name} has {elems} elements, not a multiple of its {:?} blocks of {block}",
                info.ggml_dtype
            ));
        }
        let bytes = ((elems / block) as u64)
            .checked_mul(info.ggml_dtype.type_size() as u64)
            .ok_or_else(|| format!("tensor {name} has an impossible shape {:?}", info.shape))?;
        if let Some((other, other_end)) = previous {
            if info.offset < other_end {
                return Err(format!(
                    "tensor {name} (at offset {}) overlaps tensor {} (ending at {other_end}): tensors may not share bytes",
                    info.offset,
                    shown(other)
                ));
            }
        }
        previous = Some((raw_name, info.offset.saturating_add(bytes)));
        let end = content
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|start| start.checked_add(bytes));
        match end {
            Some(end) if end <= len => {}
            _ => {
                return Err(format!(
                    "tensor {name} ({bytes} bytes at offset {}) lies past the end of the {len}-byte file",
                    info.offset
                ))
            }
        }
        params = params.saturating_add(elems);
        tensor_bytes = tensor_bytes.saturating_add(bytes);
    }
    let embd = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or("the GGUF file lacks tensor token_embd.weight")?;
    let vocab_size = match embd.shape.dims() {
        [vocab, h] if *h == hidden && *vocab > 0 => *vocab,
        dims => {
            return Err(format!(
                "tensor token_embd.weight has shape {dims:?}; {p}.embedding_length needs [vocab, {hidden}]"
            ))
        }
    };
    if vocab_size > i32::MAX as usize {
        return Err(format!(
            "vocabulary of {vocab_size} tokens does not fit token ids (i32)"
        ));
    }
    for info in content.tensor_infos.values() {
        if matches!(
            info.ggml_dtype,
            GgmlDType::Q8_1 // candle cannot multiply by Q8_1 (llama.cpp never stores weights in it)
        ) {
            return Err(format!(
                "unsupported GGUF tensor type Q8_1 (an activation type): this node runs {SUPPORTED_TYPES}"
            ));
        }
    }
    let experts = match is_moe(content) {
        true => {
            // candle's mixture of experts: per-expert tensors, whole heads rotated.
            let n = md_u32(md, "llama.expert_count").map_or(0, |n| n as usize);
            if n > MAX_EXPERTS {
                return Err(format!(
                    "llama.expert_count {n} is more than {MAX_EXPERTS} experts"
                ));
            }
            let used = md
                .get("llama.expert_used_count")
                .and_then(|v| v.to_u32().ok());
            if !used.is_some_and(|used| (1..=n as u32).contains(&used)) {
                return Err(format!(
                    "llama.expert_used_count {used:?} is not a number of experts in 1..={n}"
                ));
            }
            if rope_dim != head_dim {
                return Err(format!(
                    "llama.rope.dimension_count {rope_dim} must be the head size {head_dim} in a mixture of experts"
                ));
            }
            n
        }
        false => 0,
    };
    let sizes = Sizes {
        arch,
        layers,
        hidden,
        q: heads * head_dim,
        kv: kv_heads * head_dim,
        head_dim,
        vocab: vocab_size,
        experts,
    };
    let mut in_order: Vec<_> = content.tensor_infos.iter().collect();
    in_order.sort_by_key(|(name, info)| (info.offset, *name));
    for (name, info) in in_order {
        if let Some(want) = sizes.shape(name, content)? {
            if info.shape.dims() != want.as_slice() {
                return Err(format!(
                    "tensor {} has shape {:?}; the metadata ({p}.embedding_length {hidden}, \
                     {heads} heads, {kv_heads} KV heads of {head_dim}) needs {want:?}",
                    shown(name),
                    info.shape.dims()
                ));
            }
            // candle's Q4_1, Q5_0 and Q5_1 dot products assert an even
            // number of blocks per row (debug builds panic; release ones
            // compute it). Our own Q4_1 kernel runs all but a mixture of experts.
            let row = info.shape.dims().last().copied().unwrap_or(0);
            let block = info.ggml_dtype.block_size();
            let candles = match info.ggml_dtype {
                GgmlDType::Q5_0 | GgmlDType::Q5_1 => true,
                GgmlDType::Q4_1 => experts > 0,
                _ => false,
            };
            if want.len() == 2 && candles && (row / block) % 2 != 0 {
                return Err(format!(
                    "tensor {} ({:?}) has rows of {row} values, an odd number of blocks of {block}, \
                     which candle's {:?} kernel does not multiply",
                    shown(name),
                    info.ggml_dtype,
                    info.ggml_dtype
                ));
            }
        }
    }
    Ok(Checked {
        arch,
        vocab_size,
        context,
        params,
        tensor_bytes,
    })
}

/// Most characters of a value from the file a message shows.
const SHOWN_CHARS: usize = 80;

/// A name from the file, for a message: as it is, or as [`brief`] shows it
/// when it holds control characters or is long (a refusal is one short
/// line of plain text).
fn shown(name: &str) -> std::borrow::Cow<'_, str> {
    match name.len() > SHOWN_CHARS || name.chars().any(char::is_control) {
        true => brief(&name).into(),
        false => name.into(),
    }
}

/// A value from the file, for a message: its `Debug` form (strings quoted
/// and escaped), cut after [`SHOWN_CHARS`] characters, since a string or an
/// array may be as large as the file. The cut form is all that is formatted.
pub(crate) fn brief(value: &dyn std::fmt::Debug) -> String {
    struct Cut {
        text: String,
        left: usize,
    }
    impl std::fmt::Write for Cut {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            for c in s.chars() {
                if self.left == 0 {
                    self.text.push('…');
                    return Err(std::fmt::Error);
                }
                self.text.push(c);
                self.left -= 1;
            }
            Ok(())
        }
    }
    let mut cut = Cut {
        text: String::new(),
        left: SHOWN_CHARS,
    };
    // An error only says the text was cut.
    let _ = std::fmt::Write::write_fmt(&mut cut, format_args!("{value:?}"));
    cut.text
}

/// Most experts a llama mixture of experts may declare (Mixtral has 8).
const MAX_EXPERTS: usize = 256;

/// The sizes the metadata gives the tensors, once checked.
struct Sizes {
    arch: Arch,
    layers: usize,
    hidden: usize,
    /// Width of the queries (heads × head size), and of the keys and values.
    q: usize,
    kv: usize,
    head_dim: usize,
    vocab: usize,
    /// Experts of a mixture of experts; 0 for a plain feed-forward.
    experts: usize,
}

impl Sizes {
    /// The shape the model needs for tensor `name`, or `None` for a tensor
    /// it does not read. The kernels index rows and heads by the metadata's
    /// sizes, so a tensor of another shape must never reach them. A
    /// feed-forward's width is its gate's, which must be positive.
    fn shape(&self, name: &str, content: &Content) -> Result<Option<Vec<usize>>, String> {
        let (h, q, kv) = (self.hidden, self.q, self.kv);
        let whole = match name {
            "token_embd.weight" | "output.weight" => Some(vec![self.vocab, h]),
            "output_norm.weight" => Some(vec![h]),
            _ => None,
        };
        if whole.is_some() {
            return Ok(whole);
        }
        let Some((layer, what)) = name
            .strip_prefix("blk.")
            .and_then(|rest| rest.split_once('.'))
        else {
            return Ok(None);
        };
        // Only the names the loader reads: "blk.{i}." for i in 0..layers.
        match layer.parse::<usize>() {
            Ok(i) if i < self.layers && i.to_string() == layer => {}
            _ => return Ok(None),
        }
        // The gate of this feed-forward (or expert) sets its width.
        let ffn = |gate: String| -> Result<Option<usize>, String> {
            match content.tensor_infos.get(&gate).map(|t| t.shape.dims()) {
                None => Ok(None),
                Some(&[f, w]) if w == h && f > 0 => Ok(Some(f)),
                Some(dims) => Err(format!(
                    "tensor {gate} has shape {dims:?}; a feed-forward gate needs [width > 0, {h}]"
                )),
            }
        };
        let feed_forward = |part: &str, gate: String| -> Result<Option<Vec<usize>>, String> {
            Ok(ffn(gate)?.map(|f| match part {
                "ffn_down" => vec![h, f],
                _ => vec![f, h],
            }))
        };
        Ok(match what {
            "attn_q.weight" => Some(vec![q, h]),
            "attn_k.weight" | "attn_v.weight" => Some(vec![kv, h]),
            "attn_output.weight" => Some(vec![h, q]),
            "attn_norm.weight" | "ffn_norm.weight" => Some(vec![h]),
            "attn_q.bias" if self.arch == Arch::Qwen2 => Some(vec![q]),
            "attn_k.bias" | "attn_v.bias" if self.arch == Arch::Qwen2 => Some(vec![kv]),
            "attn_q_norm.weight" | "attn_k_norm.weight" if self.arch == Arch::Qwen3 => {
                Some(vec![self.head_dim])
            }
            "ffn_gate_inp.weight" if self.experts > 0 => Some(vec![self.experts, h]),
            _ => {
                let Some((part, rest)) = what.split_once('.') else {
                    return Ok(None);
                };
                if !matches!(part, "ffn_gate" | "ffn_up" | "ffn_down") {
                    return Ok(None);
                }
                let layer = &name[..name.len() - what.len()];
                match (self.experts, rest.strip_suffix(".weight")) {
                    (0, _) if rest == "weight" => {
                        feed_forward(part, format!("{layer}ffn_gate.weight"))?
                    }
                    (n, Some(index)) if n > 0 => match index.parse::<usize>() {
                        Ok(e) if e < n && e.to_string() == index => {
                            feed_forward(part, format!("{layer}ffn_gate.{e}.weight"))?
                        }
                        _ => None,
                    },
                    _ => None,
                }
            }
        })
    }
}

/// Builds the model from a checked header; `reader` is the file again.
pub(crate) fn load<R: Read + Seek>(
    content: Content,
    checked: &Checked,
    reader: &mut R,
    device: &Device,
) -> Result<QModel, String> {
    crate::guard::guarded("loading the GGUF model", || {
        Ok(match checked.arch {
            Arch::Llama if is_moe(&content) => QModel::LlamaMoe(
                quantized_llama::ModelWeights::from_gguf(content, reader, device)?,
            ),
            Arch::Llama | Arch::Qwen2 | Arch::Qwen3 => QModel::Llama(QLlama::from_gguf(
                &content,
                reader,
                device,
                checked.context,
                checked.arch,
            )?),
        })
    })
}

/// Whether a llama GGUF is a mixture of experts (`llama.expert_count` > 1:
/// Mixtral); those stay on candle-transformers' model.
fn is_moe(content: &Content) -> bool {
    content
        .metadata
        .get("llama.expert_count")
        .and_then(|v| v.to_u32().ok())
        .is_some_and(|n| n > 1)
}

/// A metadata value as a u32 token id, when it is one.
pub(crate) fn md_u32(md: &HashMap<String, Value>, key: &str) -> Option<u32> {
    md.get(key)
        .and_then(|v| v.to_u64().ok())
        .and_then(|v| u32::try_from(v).ok())
}

/// ggml's name for a tensor type number (for messages).
fn ggml_type_name(n: u32) -> &'static str {
    match n {
        4 | 5 => "Q4_2/Q4_3, removed from ggml",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "not a ggml type",
    }
}
