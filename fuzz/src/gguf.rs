//! `gguf`: a GGUF file a client pushes (or an operator's `local_lm` model),
//! through the candle executor's loader: `CandleExecutor::load` (an upload held
//! in memory), `CandleExecutor::load_file` (a spooled one) and
//! `CandleExecutor::new` with `local_lm` (the loader with the file's tokenizer
//! and chat template), then a short generation on whatever loads.
//!
//! Input layout: a mode byte, a context byte (`max_context = 16 << (ctx % 9)`,
//! 16 to 4096), then
//!
//! - raw (`mode & 1 == 0`): the rest is the file, as it is;
//! - structured (`mode & 1 == 1`): a byte picks one of the [`BASES`], tiny
//!   valid models built here (llama, qwen2, qwen3, a llama mixture of experts,
//!   quantized weights; with or without a tokenizer), and the rest is a list
//!   of [`Edit`]s applied to it: metadata set (any key the loader reads, any
//!   value type, arrays whose length lies) or removed, tensors' dimensions,
//!   types, offsets, data, names changed, tensors dropped or duplicated, the
//!   version and the counts changed; then bytes flipped or the file cut.
//!
//! The other mode bits: `mode & 2`, also load it from a file (a spooled
//! upload) and get the same outcome; `mode & 4`, also start a `local_lm`
//! executor on it and send a prompt; `mode & 8`, push it with the config
//! `{}` (GGUF recognised by its magic) instead of `{"format":"gguf"}`.
//!
//! Asserted: no panic, and no error saying candle panicked (the loader turns
//! panics inside candle into errors: here each one is a bug); refusals are one
//! line; a model that mounts has a context within `max_context`, weights no
//! larger than the file, end-of-sequence ids inside its vocabulary, and runs:
//! two tokens after two ids are generated, inside the vocabulary; loading from
//! memory and from a file agree; a file refused for `infer` is refused for
//! `local_lm` too. Memory and time are bounded by libFuzzer
//! (`-rss_limit_mb=2048 -malloc_limit_mb=1024 -timeout=10`, fuzz/run-ci.sh).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

use donate_candle::{CandleConfig, CandleExecutor, CandleModel};

/// `general.alignment` when the file does not say.
const ALIGN: u64 = 32;

/// Most bytes an edit may give one tensor's data.
const MAX_DATA: u64 = 1 << 16;

/// Most items an edit writes into one array.
const MAX_ITEMS: u64 = 512;

// ---------------------------------------------------------------------------
// The file, as built and edited.

/// A metadata value as written.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    /// Any byte: only 0 and 1 are valid.
    Bool(u8),
    /// Bytes, not necessarily UTF-8.
    Str(Vec<u8>),
    /// Items of type number `item` (written without their own type), and
    /// the length written, when it is not `items.len()`.
    Array {
        item: u32,
        items: Vec<Val>,
        claimed: Option<u64>,
    },
    U64(u64),
    I64(i64),
    F64(f64),
    /// Type number `ty`, which no reader knows, then nothing.
    Unknown(u32),
}

impl Val {
    fn type_number(&self) -> u32 {
        match self {
            Val::U8(_) => 0,
            Val::I8(_) => 1,
            Val::U16(_) => 2,
            Val::I16(_) => 3,
            Val::U32(_) => 4,
            Val::I32(_) => 5,
            Val::F32(_) => 6,
            Val::Bool(_) => 7,
            Val::Str(_) => 8,
            Val::Array { .. } => 9,
            Val::U64(_) => 10,
            Val::I64(_) => 11,
            Val::F64(_) => 12,
            Val::Unknown(ty) => *ty,
        }
    }

    fn str(s: &str) -> Val {
        Val::Str(s.as_bytes().to_vec())
    }

    fn strs(items: &[&str]) -> Val {
        Val::Array {
            item: 8,
            items: items.iter().map(|s| Val::str(s)).collect(),
            claimed: None,
        }
    }
}

/// A tensor as written: dimensions outermost first (candle's order; the file
/// holds them innermost first), ggml type number, data.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: Vec<u8>,
    pub dims: Vec<u64>,
    pub ty: u32,
    /// Written as the offset instead of the one the layout gives.
    pub offset: Option<u64>,
    pub data: Vec<u8>,
}

/// A GGUF file: version, metadata and tensors, laid out as the spec says
/// (alignment 32) unless an edit says otherwise.
#[derive(Debug, Clone, PartialEq)]
pub struct Gguf {
    pub version: u32,
    /// Counts written instead of the real ones.
    pub tensor_count: Option<u64>,
    pub kv_count: Option<u64>,
    pub metadata: Vec<(Vec<u8>, Val)>,
    pub tensors: Vec<Tensor>,
}

impl Gguf {
    /// Sets `key` (the first one of that name), or adds it at the end.
    pub fn set(&mut self, key: &str, value: Val) {
        match self.metadata.iter_mut().find(|(k, _)| k == key.as_bytes()) {
            Some((_, v)) => *v = value,
            None => self.metadata.push((key.as_bytes().to_vec(), value)),
        }
    }

    /// The file's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        let v1 = self.version == 1;
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        let count = |out: &mut Vec<u8>, n: u64| match v1 {
            true => out.extend((n as u32).to_le_bytes()),
            false => out.extend(n.to_le_bytes()),
        };
        count(
            &mut out,
            self.tensor_count.unwrap_or(self.tensors.len() as u64),
        );
        count(
            &mut out,
            self.kv_count.unwrap_or(self.metadata.len() as u64),
        );
        for (key, value) in &self.metadata {
            count(&mut out, key.len() as u64);
            out.extend(key);
            out.extend(value.type_number().to_le_bytes());
            write_value(&mut out, value, v1);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            count(&mut out, t.name.len() as u64);
            out.extend(&t.name);
            out.extend((t.dims.len() as u32).to_le_bytes());
            for &d in t.dims.iter().rev() {
                count(&mut out, d);
            }
            out.extend(t.ty.to_le_bytes());
            out.extend(t.offset.unwrap_or(offset).to_le_bytes());
            offset += (t.data.len() as u64).div_ceil(ALIGN) * ALIGN;
        }
        pad(&mut out);
        for t in &self.tensors {
            out.extend(&t.data);
            pad(&mut out);
        }
        out
    }
}

fn pad(out: &mut Vec<u8>) {
    out.resize(
        (out.len() as u64).div_ceil(ALIGN) as usize * ALIGN as usize,
        0,
    );
}

fn write_value(out: &mut Vec<u8>, value: &Val, v1: bool) {
    let len = |out: &mut Vec<u8>, n: u64| match v1 {
        true => out.extend((n as u32).to_le_bytes()),
        false => out.extend(n.to_le_bytes()),
    };
    match value {
        Val::U8(v) => out.push(*v),
        Val::I8(v) => out.extend(v.to_le_bytes()),
        Val::U16(v) => out.extend(v.to_le_bytes()),
        Val::I16(v) => out.extend(v.to_le_bytes()),
        Val::U32(v) => out.extend(v.to_le_bytes()),
        Val::I32(v) => out.extend(v.to_le_bytes()),
        Val::F32(v) => out.extend(v.to_le_bytes()),
        Val::Bool(v) => out.push(*v),
        Val::Str(s) => {
            len(out, s.len() as u64);
            out.extend(s);
        }
        Val::Array {
            item,
            items,
            claimed,
        } => {
            out.extend(item.to_le_bytes());
            len(out, claimed.unwrap_or(items.len() as u64));
            for v in items {
                write_value(out, v, v1);
            }
        }
        Val::U64(v) => out.extend(v.to_le_bytes()),
        Val::I64(v) => out.extend(v.to_le_bytes()),
        Val::F64(v) => out.extend(v.to_le_bytes()),
        Val::Unknown(_) => {}
    }
}

// ---------------------------------------------------------------------------
// The tiny models the structured mode starts from.

/// ggml type numbers.
const F32: u32 = 0;
const Q4_1: u32 = 3;
const Q8_0: u32 = 8;

/// Deterministic bytes of a tensor of `dims` in type `ty` (F32, Q8_0 or
/// Q4_1): small weights, norms near 1.
fn tensor(name: &str, dims: &[u64], ty: u32, seed: u64) -> Tensor {
    let n: u64 = dims.iter().product();
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let norm = dims.len() == 1;
    let mut data = Vec::new();
    match ty {
        F32 => {
            for _ in 0..n {
                let unit = (next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
                let v = if norm { 1.0 + 0.1 * unit } else { 0.3 * unit };
                data.extend(v.to_le_bytes());
            }
        }
        Q8_0 => {
            // Blocks of 32: an f16 scale (2^-7), 32 i8.
            for _ in 0..n / 32 {
                data.extend(0x2000u16.to_le_bytes());
                data.extend((0..32).map(|_| ((next() % 77) as i8 - 38) as u8));
            }
        }
        Q4_1 => {
            // Blocks of 32: f16 d (2^-5) and m (-0.25), 16 bytes of nibbles.
            for _ in 0..n / 32 {
                data.extend(0x2800u16.to_le_bytes());
                data.extend(0xB400u16.to_le_bytes());
                data.extend((0..16).map(|_| next() as u8));
            }
        }
        other => unreachable!("type {other}"),
    }
    Tensor {
        name: name.as_bytes().to_vec(),
        dims: dims.to_vec(),
        ty,
        offset: None,
        data,
    }
}

/// The sizes of a base model.
struct Dims {
    arch: &'static str,
    hidden: u64,
    heads: u64,
    kv_heads: u64,
    /// Each head's width (qwen3's `key_length`; else hidden / heads).
    head: u64,
    ffn: u64,
    vocab: u64,
    layers: u64,
    /// Experts (a llama mixture of experts) when more than 1.
    experts: u64,
    /// Type of the attention matrices, and of the feed-forward ones.
    attn_ty: u32,
    ffn_ty: u32,
    /// Whether the file has its own output.weight (else tied to the embedding).
    output: bool,
}

impl Dims {
    fn build(&self) -> Gguf {
        let p = self.arch;
        let mut g = Gguf {
            version: 3,
            tensor_count: None,
            kv_count: None,
            metadata: Vec::new(),
            tensors: Vec::new(),
        };
        g.set("general.architecture", Val::str(p));
        g.set(&format!("{p}.block_count"), Val::U32(self.layers as u32));
        g.set(
            &format!("{p}.embedding_length"),
            Val::U32(self.hidden as u32),
        );
        g.set(
            &format!("{p}.feed_forward_length"),
            Val::U32(self.ffn as u32),
        );
        g.set(
            &format!("{p}.attention.head_count"),
            Val::U32(self.heads as u32),
        );
        g.set(
            &format!("{p}.attention.head_count_kv"),
            Val::U32(self.kv_heads as u32),
        );
        if p == "qwen3" {
            g.set(
                &format!("{p}.attention.key_length"),
                Val::U32(self.head as u32),
            );
        }
        g.set(
            &format!("{p}.rope.dimension_count"),
            Val::U32(self.head as u32),
        );
        g.set(&format!("{p}.rope.freq_base"), Val::F32(10000.0));
        g.set(
            &format!("{p}.attention.layer_norm_rms_epsilon"),
            Val::F32(1e-5),
        );
        g.set(&format!("{p}.context_length"), Val::U32(64));
        if self.experts > 1 {
            g.set(&format!("{p}.expert_count"), Val::U32(self.experts as u32));
            g.set(&format!("{p}.expert_used_count"), Val::U32(1));
        }
        let (h, v, f) = (self.hidden, self.vocab, self.ffn);
        let (q, kv) = (self.heads * self.head, self.kv_heads * self.head);
        let mut seed = 0;
        let mut t = |name: &str, dims: &[u64], ty: u32| {
            seed += 1;
            g.tensors.push(tensor(name, dims, ty, seed));
        };
        t("token_embd.weight", &[v, h], self.attn_ty);
        t("output_norm.weight", &[h], F32);
        if self.output {
            t("output.weight", &[v, h], self.attn_ty);
        }
        for l in 0..self.layers {
            let b = format!("blk.{l}");
            t(&format!("{b}.attn_q.weight"), &[q, h], self.attn_ty);
            t(&format!("{b}.attn_k.weight"), &[kv, h], self.attn_ty);
            t(&format!("{b}.attn_v.weight"), &[kv, h], self.attn_ty);
            t(&format!("{b}.attn_output.weight"), &[h, q], self.attn_ty);
            if self.experts > 1 {
                t(&format!("{b}.ffn_gate_inp.weight"), &[self.experts, h], F32);
                for e in 0..self.experts {
                    t(&format!("{b}.ffn_gate.{e}.weight"), &[f, h], self.ffn_ty);
                    t(&format!("{b}.ffn_down.{e}.weight"), &[h, f], self.ffn_ty);
                    t(&format!("{b}.ffn_up.{e}.weight"), &[f, h], self.ffn_ty);
                }
            } else {
                t(&format!("{b}.ffn_gate.weight"), &[f, h], self.ffn_ty);
                t(&format!("{b}.ffn_down.weight"), &[h, f], self.ffn_ty);
                t(&format!("{b}.ffn_up.weight"), &[f, h], self.ffn_ty);
            }
            t(&format!("{b}.attn_norm.weight"), &[h], F32);
            t(&format!("{b}.ffn_norm.weight"), &[h], F32);
            if p == "qwen2" {
                t(&format!("{b}.attn_q.bias"), &[q], F32);
                t(&format!("{b}.attn_k.bias"), &[kv], F32);
                t(&format!("{b}.attn_v.bias"), &[kv], F32);
            }
            if p == "qwen3" {
                t(&format!("{b}.attn_q_norm.weight"), &[self.head], F32);
                t(&format!("{b}.attn_k_norm.weight"), &[self.head], F32);
            }
        }
        g
    }
}

/// A ChatML template, as SmolLM2 and Qwen write them.
const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// A byte-level BPE tokenizer of 8 tokens (gpt2: `Ġ` a space, `Ċ` a newline),
/// with ChatML's special tokens and template, and `pre` as its pre-tokenizer.
fn gpt2_tokenizer(g: &mut Gguf, pre: &str) {
    g.set("tokenizer.ggml.model", Val::str("gpt2"));
    g.set("tokenizer.ggml.pre", Val::str(pre));
    g.set(
        "tokenizer.ggml.tokens",
        Val::strs(&[
            "a",
            "b",
            "ab",
            "\u{120}",
            "\u{10a}",
            "<|im_start|>",
            "<|im_end|>",
            "<|endoftext|>",
        ]),
    );
    g.set(
        "tokenizer.ggml.token_type",
        Val::Array {
            item: 5,
            items: [1, 1, 1, 1, 1, 3, 3, 3].map(Val::I32).to_vec(),
            claimed: None,
        },
    );
    g.set("tokenizer.ggml.merges", Val::strs(&["a b"]));
    g.set("tokenizer.ggml.bos_token_id", Val::U32(7));
    g.set("tokenizer.ggml.eos_token_id", Val::U32(6));
    g.set("tokenizer.chat_template", Val::str(CHATML));
}

/// A SentencePiece tokenizer (llama) of 8 tokens, its scores and types.
fn spm_tokenizer(g: &mut Gguf) {
    g.set("tokenizer.ggml.model", Val::str("llama"));
    g.set(
        "tokenizer.ggml.tokens",
        Val::strs(&[
            "<unk>",
            "<s>",
            "</s>",
            "\u{2581}",
            "a",
            "b",
            "\u{2581}a",
            "ab",
        ]),
    );
    g.set(
        "tokenizer.ggml.scores",
        Val::Array {
            item: 6,
            items: [0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -0.5, -1.0]
                .map(Val::F32)
                .to_vec(),
            claimed: None,
        },
    );
    g.set(
        "tokenizer.ggml.token_type",
        Val::Array {
            item: 5,
            items: [2, 3, 3, 1, 1, 1, 1, 1].map(Val::I32).to_vec(),
            claimed: None,
        },
    );
    g.set("tokenizer.ggml.unknown_token_id", Val::U32(0));
    g.set("tokenizer.ggml.bos_token_id", Val::U32(1));
    g.set("tokenizer.ggml.eos_token_id", Val::U32(2));
    g.set("tokenizer.ggml.add_bos_token", Val::Bool(1));
    g.set(
        "tokenizer.chat_template",
        Val::str(
            "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}",
        ),
    );
}

/// The base models of the structured mode, by name: each loads, and starts
/// a `local_lm` node when it has a tokenizer.
pub const BASES: [&str; 6] = [
    "llama-gpt2",
    "qwen2-spm",
    "qwen3-gpt2",
    "llama-moe",
    "llama-q8-q4",
    "llama-v2-bare",
];

/// The base model `n % BASES.len()`.
pub fn base(n: u8) -> Gguf {
    let small = Dims {
        arch: "llama",
        hidden: 8,
        heads: 2,
        kv_heads: 1,
        head: 4,
        ffn: 16,
        vocab: 8,
        layers: 2,
        experts: 1,
        attn_ty: F32,
        ffn_ty: F32,
        output: false,
    };
    match n as usize % BASES.len() {
        0 => {
            let mut g = small.build();
            gpt2_tokenizer(&mut g, "default");
            g
        }
        1 => {
            let mut g = Dims {
                arch: "qwen2",
                layers: 1,
                ..small
            }
            .build();
            spm_tokenizer(&mut g);
            g
        }
        2 => {
            // qwen3's own head size: 8, over an embedding of 8 / 2 heads.
            let mut g = Dims {
                arch: "qwen3",
                head: 8,
                layers: 1,
                ..small
            }
            .build();
            gpt2_tokenizer(&mut g, "qwen2");
            g
        }
        3 => Dims {
            experts: 2,
            layers: 1,
            output: true,
            ..small
        }
        .build(),
        4 => Dims {
            hidden: 32,
            heads: 4,
            kv_heads: 2,
            head: 8,
            ffn: 32,
            layers: 1,
            attn_ty: Q8_0,
            ffn_ty: Q4_1,
            output: true,
            ..small
        }
        .build(),
        _ => {
            // Version 2 (v1 only differs in the width of counts), no
            // tokenizer, no rope.dimension_count nor context_length (both
            // optional for llama).
            let mut g = small.build();
            g.version = 2;
            g.metadata.retain(|(k, _)| {
                k != b"llama.rope.dimension_count" && k != b"llama.context_length"
            });
            g
        }
    }
}

// ---------------------------------------------------------------------------
// Edits: what the structured mode's bytes say.

/// Metadata keys an edit names (`{p}`: an architecture's prefix).
const KEYS: [&str; 32] = [
    "general.architecture",
    "general.alignment",
    "{p}.block_count",
    "{p}.embedding_length",
    "{p}.feed_forward_length",
    "{p}.attention.head_count",
    "{p}.attention.head_count_kv",
    "{p}.attention.key_length",
    "{p}.attention.value_length",
    "{p}.rope.dimension_count",
    "{p}.rope.freq_base",
    "{p}.attention.layer_norm_rms_epsilon",
    "{p}.context_length",
    "{p}.expert_count",
    "{p}.expert_used_count",
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.eom_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_space_prefix",
    "tokenizer.chat_template",
    "general.name",
    "",
    "junk",
];

/// The key `k` names in a file of architecture `arch`: `k % 32` in [`KEYS`],
/// with `{p}` the file's own architecture for `k < 128`, else another's.
pub fn key(k: u8, arch: &str) -> String {
    let p = match k >> 5 {
        0..=3 => arch,
        4 => "llama",
        5 => "qwen2",
        6 => "qwen3",
        _ => "gemma",
    };
    KEYS[k as usize % KEYS.len()].replace("{p}", p)
}

/// Strings an edit writes.
const STRINGS: [&[u8]; 24] = [
    b"llama",
    b"qwen2",
    b"qwen3",
    b"gpt2",
    b"phi2",
    b"",
    b"default",
    b"llama3",
    b"qwen2\0",
    b"smollm",
    b"a b",
    b"ab",
    b"<|im_end|>",
    b"\xe2\x96\x81a",
    b"<0x41>",
    b"\xff\xfe",
    b"tensor\nwith a newline",
    b"{{ raise_exception('no') }}",
    b"{% for %}",
    b"{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    b"{{ messages[0].content * 1000 }}",
    b"{{ bos_token }}{{ messages[0].content }}{{ eos_token }}",
    b"a",
    b" ",
];

/// Floats an edit writes (`0xff`: the next 4 bytes).
const FLOATS: [f32; 16] = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    1e-5,
    1e-6,
    1e6,
    10000.0,
    f32::NAN,
    f32::INFINITY,
    f32::NEG_INFINITY,
    f32::MIN_POSITIVE,
    f32::MAX,
    0.5,
    1e-45,
    -1e30,
];

/// Numbers an edit writes for a byte `0xc0..0xff` (`0xff`: the next 8 bytes).
const NUMBERS: [u64; 63] = [
    256,
    512,
    1024,
    4095,
    4096,
    4097,
    8192,
    65535,
    65536,
    1 << 17,
    1 << 18,
    (1 << 18) + 1,
    1 << 20,
    1 << 24,
    1 << 28,
    (1 << 30) - 1,
    1 << 30,
    (1 << 31) - 1,
    1 << 31,
    (1 << 31) + 1,
    (1 << 32) - 1,
    1 << 32,
    (1 << 32) + 1,
    (1 << 32) + 2,
    1 << 33,
    1 << 36,
    1 << 40,
    1 << 44,
    1 << 48,
    1 << 52,
    1 << 56,
    1 << 60,
    (1 << 62) - 1,
    1 << 62,
    (1 << 63) - 1,
    1 << 63,
    u64::MAX - 31,
    u64::MAX - 1,
    u64::MAX,
    96,
    100,
    127,
    128,
    129,
    192,
    200,
    255,
    257,
    384,
    768,
    1000,
    2048,
    3072,
    4608,
    16384,
    32000,
    32768,
    100_000,
    151_936,
    262_144,
    1_000_000,
    10_000_000,
    0x8000_0000_0000_0001,
];

/// One change to the base model, or to its bytes.
#[derive(Debug, Clone, PartialEq)]
pub enum Edit {
    /// Metadata key `key` (see [`key`]) set to `value`, or added.
    Set { key: u8, value: Val },
    /// Metadata key `key` removed.
    Remove { key: u8 },
    /// Tensor `tensor` (index modulo the count) gets these dimensions
    /// (outermost first; more than 4 is invalid).
    Dims { tensor: u8, dims: Vec<u64> },
    /// Tensor `tensor` gets ggml type `ty`.
    Type { tensor: u8, ty: u32 },
    /// Tensor `tensor` is written at `offset` instead.
    Offset { tensor: u8, offset: u64 },
    /// Tensor `tensor`'s data is resized to what its dimensions and type
    /// take (at most 64 KiB), the new bytes from `fill`.
    Fit { tensor: u8, fill: u8 },
    /// Tensor `tensor`'s data is resized to `len` bytes (at most 64 KiB).
    Resize { tensor: u8, len: u64 },
    /// Tensor `tensor` renamed to name `name` (see [`tensor_name`]).
    Rename { tensor: u8, name: u8 },
    /// Tensor `tensor` removed.
    Drop { tensor: u8 },
    /// Tensor `tensor` copied under name `name` (at the end).
    Copy { tensor: u8, name: u8 },
    /// The version written.
    Version { version: u32 },
    /// The tensor count (`which` even) or metadata count written.
    Count { which: u8, count: u64 },
    /// The byte at `at` (modulo the length) of the file xored with `xor`.
    Flip { at: u16, xor: u8 },
    /// The file cut to `at` bytes (modulo the length + 1).
    Cut { at: u16 },
}

/// Edits an input holds (more are ignored).
const MAX_EDITS: usize = 64;

/// The tensor names an edit renames to or copies as.
pub fn tensor_name(n: u8) -> Vec<u8> {
    const NAMES: [&str; 16] = [
        "token_embd.weight",
        "output_norm.weight",
        "output.weight",
        "attn_q.weight",
        "attn_k.weight",
        "attn_v.weight",
        "attn_output.weight",
        "ffn_gate.weight",
        "ffn_up.weight",
        "ffn_down.weight",
        "attn_norm.weight",
        "ffn_norm.weight",
        "attn_q.bias",
        "attn_q_norm.weight",
        "ffn_gate_inp.weight",
        "ffn_gate.1.weight",
    ];
    let name = NAMES[n as usize % 16];
    let layer = n / 16;
    match (name, layer) {
        (_, 15) => b"x\n\x00\xff".to_vec(),
        ("token_embd.weight" | "output_norm.weight" | "output.weight", _) => name.into(),
        (_, l) => format!("blk.{}.{name}", l % 4).into_bytes(),
    }
}

/// Reads what an input's bytes say, one field at a time; past the end, zeros.
struct Reader<'a> {
    data: &'a [u8],
}

impl Reader<'_> {
    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        for x in &mut b {
            *x = self.u8();
        }
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }

    /// A byte below 0xc0 is itself, one above is one of [`NUMBERS`], 0xff
    /// is followed by the number.
    fn number(&mut self) -> u64 {
        match self.u8() {
            b @ 0..=0xbf => u64::from(b),
            0xff => u64::from_le_bytes(self.bytes()),
            b => NUMBERS[usize::from(b - 0xc0)],
        }
    }

    fn float(&mut self) -> f32 {
        match self.u8() {
            0xff => f32::from_le_bytes(self.bytes()),
            b => FLOATS[usize::from(b) % FLOATS.len()],
        }
    }

    fn value(&mut self, depth: u32) -> Val {
        let ty = self.u8();
        self.value_of(ty, depth)
    }

    /// A value of type `ty % 14` (13: an unknown type number).
    fn value_of(&mut self, ty: u8, depth: u32) -> Val {
        match ty % 14 {
            0 => Val::U8(self.number() as u8),
            1 => Val::I8(self.number() as i8),
            2 => Val::U16(self.number() as u16),
            3 => Val::I16(self.number() as i16),
            4 => Val::U32(self.number() as u32),
            5 => Val::I32(self.number() as i32),
            6 => Val::F32(self.float()),
            7 => Val::Bool(self.u8()),
            8 => Val::Str(STRINGS[usize::from(self.u8()) % STRINGS.len()].to_vec()),
            9 => {
                let item = self.u8();
                let n = self.number().min(MAX_ITEMS);
                let claimed = match self.u8() {
                    0 => None,
                    _ => Some(self.number()),
                };
                // Items made from their index, so that one byte says them all.
                let items = (0..n)
                    .map(|i| match item % 14 {
                        8 => Val::Str(STRINGS[i as usize % STRINGS.len()].to_vec()),
                        9 if depth < 3 => Val::Array {
                            item: 4,
                            items: vec![Val::U32(i as u32)],
                            claimed: None,
                        },
                        9 => Val::Array {
                            item: 4,
                            items: Vec::new(),
                            claimed: None,
                        },
                        6 => Val::F32(-(i as f32)),
                        13 => Val::Unknown(0),
                        t => number_val(t, i),
                    })
                    .collect();
                let item = match item % 14 {
                    13 => 13 + u32::from(item),
                    t => u32::from(t),
                };
                Val::Array {
                    item,
                    items,
                    claimed,
                }
            }
            10 => Val::U64(self.number()),
            11 => Val::I64(self.number() as i64),
            12 => Val::F64(f64::from(self.float())),
            _ => Val::Unknown(13 + self.u8() as u32),
        }
    }

    fn edit(&mut self) -> Edit {
        let op = self.u8();
        match op % 14 {
            0 => Edit::Set {
                key: self.u8(),
                value: self.value(0),
            },
            1 => Edit::Remove { key: self.u8() },
            2 => {
                let tensor = self.u8();
                let n = self.u8() % 6;
                let dims = (0..n).map(|_| self.number()).collect();
                Edit::Dims { tensor, dims }
            }
            3 => Edit::Type {
                tensor: self.u8(),
                ty: match self.u8() {
                    b @ 0..=0xbf => u32::from(b % 42),
                    _ => self.number() as u32,
                },
            },
            4 => Edit::Offset {
                tensor: self.u8(),
                offset: self.number(),
            },
            5 => Edit::Fit {
                tensor: self.u8(),
                fill: self.u8(),
            },
            6 => Edit::Resize {
                tensor: self.u8(),
                len: self.number(),
            },
            7 => Edit::Rename {
                tensor: self.u8(),
                name: self.u8(),
            },
            8 => Edit::Drop { tensor: self.u8() },
            9 => Edit::Copy {
                tensor: self.u8(),
                name: self.u8(),
            },
            10 => Edit::Version {
                version: self.number() as u32,
            },
            11 => Edit::Count {
                which: self.u8(),
                count: self.number(),
            },
            12 => Edit::Flip {
                at: self.u16(),
                xor: self.u8(),
            },
            _ => Edit::Cut { at: self.u16() },
        }
    }
}

fn number_val(t: u8, i: u64) -> Val {
    match t {
        0 => Val::U8(i as u8),
        1 => Val::I8(i as i8),
        2 => Val::U16(i as u16),
        3 => Val::I16(i as i16),
        4 => Val::U32(i as u32),
        5 => Val::I32(i as i32),
        7 => Val::Bool((i % 2) as u8),
        10 => Val::U64(i),
        11 => Val::I64(i as i64),
        _ => Val::F64(i as f64),
    }
}

/// Bytes a tensor of `dims` in ggml type `ty` takes, when the type is known.
fn data_len(dims: &[u64], ty: u32) -> Option<u64> {
    // (block size, bytes per block) of ggml's types.
    let (block, bytes) = match ty {
        0 => (1, 4),
        1 => (1, 2),
        2 => (32, 18),
        3 => (32, 20),
        6 => (32, 22),
        7 => (32, 24),
        8 => (32, 34),
        9 => (32, 36),
        10 => (256, 84),
        11 => (256, 110),
        12 => (256, 144),
        13 => (256, 176),
        14 => (256, 210),
        15 => (256, 292),
        30 => (1, 2),
        _ => return None,
    };
    let n = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d))?;
    (n / block).checked_mul(bytes)
}

/// Applies the structural edits to `g`, then the byte edits to its bytes.
pub fn apply(mut g: Gguf, edits: &[Edit]) -> Vec<u8> {
    let arch = match g
        .metadata
        .iter()
        .find(|(k, _)| k == b"general.architecture")
    {
        Some((_, Val::Str(a))) => String::from_utf8_lossy(a).into_owned(),
        _ => "llama".to_owned(),
    };
    let mut flips = Vec::new();
    for edit in edits {
        let n = g.tensors.len();
        let pick = |t: u8| match n {
            0 => None,
            n => Some(usize::from(t) % n),
        };
        match edit {
            Edit::Set { key: k, value } => g.set(&key(*k, &arch), value.clone()),
            Edit::Remove { key: k } => {
                let k = key(*k, &arch);
                g.metadata.retain(|(name, _)| name != k.as_bytes());
            }
            Edit::Dims { tensor, dims } => {
                if let Some(t) = pick(*tensor) {
                    g.tensors[t].dims = dims.clone();
                }
            }
            Edit::Type { tensor, ty } => {
                if let Some(t) = pick(*tensor) {
                    g.tensors[t].ty = *ty;
                }
            }
            Edit::Offset { tensor, offset } => {
                if let Some(t) = pick(*tensor) {
                    g.tensors[t].offset = Some(*offset);
                }
            }
            Edit::Fit { tensor, fill } => {
                if let Some(t) = pick(*tensor) {
                    let t = &mut g.tensors[t];
                    if let Some(len) = data_len(&t.dims, t.ty).filter(|&l| l <= MAX_DATA) {
                        let mut x = u32::from(*fill);
                        t.data.resize_with(len as usize, || {
                            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                            (x >> 16) as u8
                        });
                    }
                }
            }
            Edit::Resize { tensor, len } => {
                if let Some(t) = pick(*tensor) {
                    g.tensors[t]
                        .data
                        .resize((*len).min(MAX_DATA) as usize, 0x3c);
                }
            }
            Edit::Rename { tensor, name } => {
                if let Some(t) = pick(*tensor) {
                    g.tensors[t].name = tensor_name(*name);
                }
            }
            Edit::Drop { tensor } => {
                if let Some(t) = pick(*tensor) {
                    g.tensors.remove(t);
                }
            }
            Edit::Copy { tensor, name } => {
                if let Some(t) = pick(*tensor) {
                    let mut copy = g.tensors[t].clone();
                    copy.name = tensor_name(*name);
                    g.tensors.push(copy);
                }
            }
            Edit::Version { version } => g.version = *version,
            Edit::Count { which, count } => match which % 2 {
                0 => g.tensor_count = Some(*count),
                _ => g.kv_count = Some(*count),
            },
            Edit::Flip { .. } | Edit::Cut { .. } => flips.push(edit),
        }
    }
    let mut bytes = g.bytes();
    for edit in flips {
        match *edit {
            Edit::Flip { at, xor } if !bytes.is_empty() => {
                let at = usize::from(at) % bytes.len();
                bytes[at] ^= xor;
            }
            Edit::Cut { at } => bytes.truncate(usize::from(at) % (bytes.len() + 1)),
            _ => {}
        }
    }
    bytes
}

// ---------------------------------------------------------------------------
// The input, and writing it (for seeds).

/// Mode bits.
pub const STRUCTURED: u8 = 1;
pub const FROM_FILE: u8 = 2;
pub const LOCAL_LM: u8 = 4;
pub const BY_MAGIC: u8 = 8;

/// What an input says.
#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    pub mode: u8,
    /// `max_context = 16 << (ctx % 9)`.
    pub ctx: u8,
    /// The file (raw mode), or the base and the edits (structured).
    pub body: Body,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    Raw(Vec<u8>),
    Structured { base: u8, edits: Vec<Edit> },
}

impl Input {
    /// Reads an input.
    pub fn parse(data: &[u8]) -> Input {
        let mut r = Reader { data };
        let (mode, ctx) = (r.u8(), r.u8());
        let body = match mode & STRUCTURED {
            0 => Body::Raw(r.data.to_vec()),
            _ => {
                let base = r.u8();
                let mut edits = Vec::new();
                while !r.is_empty() && edits.len() < MAX_EDITS {
                    edits.push(r.edit());
                }
                Body::Structured { base, edits }
            }
        };
        Input { mode, ctx, body }
    }

    /// Most positions a job may use on the node.
    pub fn max_context(&self) -> usize {
        16 << (self.ctx % 9)
    }

    /// The GGUF file.
    pub fn file(&self) -> Vec<u8> {
        match &self.body {
            Body::Raw(bytes) => bytes.clone(),
            Body::Structured { base: b, edits } => apply(base(*b), edits),
        }
    }

    /// The bytes [`parse`](Input::parse) reads back as `self` (for seeds;
    /// numbers are written in full, 0xff and 8 bytes, unless below 0xc0).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![self.mode, self.ctx];
        match &self.body {
            Body::Raw(bytes) => {
                assert_eq!(self.mode & STRUCTURED, 0);
                out.extend(bytes);
            }
            Body::Structured { base, edits } => {
                assert_eq!(self.mode & STRUCTURED, STRUCTURED);
                out.push(*base);
                for e in edits {
                    write_edit(&mut out, e);
                }
            }
        }
        out
    }
}

fn write_number(out: &mut Vec<u8>, n: u64) {
    match n {
        0..=0xbf => out.push(n as u8),
        _ => {
            out.push(0xff);
            out.extend(n.to_le_bytes());
        }
    }
}

/// Writes the values the seeds use (scalars and strings of [`STRINGS`]).
fn write_val(out: &mut Vec<u8>, v: &Val) {
    out.push(v.type_number() as u8);
    match v {
        Val::U8(x) => write_number(out, u64::from(*x)),
        Val::U16(x) => write_number(out, u64::from(*x)),
        Val::U32(x) => write_number(out, u64::from(*x)),
        Val::U64(x) => write_number(out, *x),
        Val::F32(x) => {
            out.push(0xff);
            out.extend(x.to_le_bytes());
        }
        Val::Bool(b) => out.push(*b),
        Val::Str(s) => {
            let i = STRINGS
                .iter()
                .position(|t| t == s)
                .expect("a seed's string is one of STRINGS");
            out.push(i as u8);
        }
        other => panic!("seeds do not write {other:?}"),
    }
}

fn write_edit(out: &mut Vec<u8>, e: &Edit) {
    match e {
        Edit::Set { key, value } => {
            out.extend([0, *key]);
            write_val(out, value);
        }
        Edit::Remove { key } => out.extend([1, *key]),
        Edit::Dims { tensor, dims } => {
            out.extend([2, *tensor, dims.len() as u8]);
            for &d in dims {
                write_number(out, d);
            }
        }
        Edit::Type { tensor, ty } => {
            out.extend([3, *tensor]);
            match *ty {
                0..=41 => out.push(*ty as u8),
                _ => {
                    out.push(0xc0);
                    write_number(out, u64::from(*ty));
                }
            }
        }
        Edit::Offset { tensor, offset } => {
            out.extend([4, *tensor]);
            write_number(out, *offset);
        }
        Edit::Fit { tensor, fill } => out.extend([5, *tensor, *fill]),
        Edit::Resize { tensor, len } => {
            out.extend([6, *tensor]);
            write_number(out, *len);
        }
        Edit::Rename { tensor, name } => out.extend([7, *tensor, *name]),
        Edit::Drop { tensor } => out.extend([8, *tensor]),
        Edit::Copy { tensor, name } => out.extend([9, *tensor, *name]),
        Edit::Version { version } => {
            out.push(10);
            write_number(out, u64::from(*version));
        }
        Edit::Count { which, count } => {
            out.extend([11, *which]);
            write_number(out, *count);
        }
        Edit::Flip { at, xor } => {
            out.push(12);
            out.extend(at.to_le_bytes());
            out.push(*xor);
        }
        Edit::Cut { at } => {
            out.push(13);
            out.extend(at.to_le_bytes());
        }
    }
}

// ---------------------------------------------------------------------------
// Running it.

/// What became of an input (for the seeds' tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The pushed model's refusal, or None when it mounted (and ran).
    pub push: Option<String>,
    /// With [`LOCAL_LM`]: the local_lm node's refusal, or None when it
    /// started (and answered a prompt or refused it as a job).
    pub local_lm: Option<Option<String>>,
}

/// A fresh path for a temporary model file.
fn temp_path() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("donate-fuzz-gguf-{}-{n}.gguf", std::process::id()))
}

/// A temporary file holding `bytes`, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(bytes: &[u8]) -> TempFile {
        let path = temp_path();
        std::fs::write(&path, bytes).expect("the temporary directory is writable");
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A loader's error: one line, never a panic caught inside candle.
fn refused(what: &str, e: &str) {
    assert!(
        !e.contains("panicked"),
        "{what}: candle panicked on this file (a bug: check it before loading): {e}"
    );
    assert!(
        !e.contains('\n'),
        "{what}: a refusal of several lines: {e:?}"
    );
}

/// A model that mounted: within its bounds, and it runs.
fn mounted(
    executor: Option<&CandleExecutor>,
    model: &CandleModel,
    file_len: usize,
    max_context: usize,
) {
    assert_eq!(model.format(), "gguf");
    let (vocab, context) = (model.vocab_size(), model.context());
    assert!(vocab >= 1 && vocab <= i32::MAX as usize, "vocab {vocab}");
    assert!(
        (1..=max_context).contains(&context),
        "context {context}, max {max_context}"
    );
    assert!(
        model.weight_bytes() <= file_len as u64,
        "{} bytes of weights from a file of {file_len}",
        model.weight_bytes()
    );
    assert!(model.eos_ids().iter().all(|&id| (id as usize) < vocab));
    if context < 4 {
        return;
    }
    let input = [0, (vocab - 1) as i32];
    // An `infer` job on a pushed model; on a local_lm one (which takes
    // prompts only), the same generation on the model itself.
    let generated = match executor {
        Some(executor) => executor.generate(model, &input, 2),
        None => model
            .generate(&[0, vocab as u32 - 1], 2, &[], None)
            .map(|ids| {
                input
                    .iter()
                    .copied()
                    .chain(ids.iter().map(|&id| id as i32))
                    .collect()
            })
            .map_err(|e| donate_proto::JobError::new("model_error", format!("{e:?}"))),
    };
    match generated {
        Ok(out) => {
            assert_eq!(out.len(), 4, "{out:?}");
            assert_eq!(out[..2], input);
            assert!(out[2..].iter().all(|&id| id >= 0 && (id as usize) < vocab));
        }
        Err(e) => panic!("a model that mounted fails to run: {e:?}"),
    }
}

/// Runs the `gguf` target on `data`.
pub fn run(data: &[u8]) {
    outcome(data);
}

/// Runs the `gguf` target on `data`, and says what became of it.
pub fn outcome(data: &[u8]) -> Outcome {
    static THREADS: Once = Once::new();
    // One thread for candle's kernels: the fuzzer runs one input at a time.
    THREADS.call_once(|| donate_candle::set_threads(1));
    let trace = std::env::var_os("DONATE_FUZZ_TRACE").is_some();
    let input = Input::parse(data);
    let file = input.file();
    let max_context = input.max_context();
    if trace {
        match &input.body {
            Body::Raw(_) => eprintln!("raw, mode {:#x}, max_context {max_context}", input.mode),
            Body::Structured { base, edits } => {
                eprintln!(
                    "base {}, mode {:#x}, max_context {max_context}",
                    BASES[*base as usize % BASES.len()],
                    input.mode
                );
                for e in edits {
                    eprintln!("  {e:?}");
                }
            }
        }
        eprintln!("{} bytes", file.len());
    }
    let config = CandleConfig {
        limits: donate_candle::ModelLimits {
            context: max_context,
            ..Default::default()
        },
        max_tokens_cap: 8,
        ..CandleConfig::default()
    };
    let executor = CandleExecutor::new(config.clone()).expect("a CPU executor");
    let config_json = match input.mode & BY_MAGIC {
        0 => r#"{"format":"gguf"}"#,
        _ => "{}",
    };
    let push = executor.load(config_json, &file);
    if trace {
        eprintln!(
            "push: {:?}",
            push.as_ref().map(|_| ()).map_err(|e| e.as_str())
        );
    }
    match &push {
        Ok(model) => mounted(Some(&executor), model, file.len(), max_context),
        Err(e) => refused("push", e),
    }
    if input.mode & FROM_FILE != 0 {
        let spooled = TempFile::new(&file);
        let from_file = executor.load_file(config_json, &spooled.0);
        match (&push, &from_file) {
            (Ok(_), Ok(_)) => {}
            (Err(a), Err(b)) => assert_eq!(a, b, "memory and file refuse differently"),
            _ => panic!(
                "memory and file disagree: {:?} / {:?}",
                push.as_ref().map(|_| ()),
                from_file.as_ref().map(|_| ())
            ),
        }
    }
    let local_lm = (input.mode & LOCAL_LM != 0).then(|| {
        let local = TempFile::new(&file);
        let started = CandleExecutor::new(CandleConfig {
            local_lm: Some(local.0.clone()),
            ..config
        });
        if trace {
            eprintln!(
                "local_lm: {:?}",
                started.as_ref().map(|_| ()).map_err(|e| e.as_str())
            );
        }
        match started {
            Ok(node) => {
                assert!(
                    push.is_ok(),
                    "local_lm starts on a file refused for infer: {:?}",
                    push.as_ref().err()
                );
                let model = node.local_model().expect("a local model");
                mounted(None, model, file.len(), max_context);
                match node.complete("ab ab", 2) {
                    Ok(text) => {
                        if trace {
                            eprintln!("prompt: {text:?}");
                        }
                    }
                    Err(e) => {
                        assert!(!e.message.contains("panicked"), "prompt: {e:?}");
                        assert!(
                            matches!(e.code.as_str(), "bad_input" | "model_error"),
                            "prompt: {e:?}"
                        );
                    }
                }
                None
            }
            Err(e) => {
                refused("local_lm", &e);
                Some(e)
            }
        }
    });
    Outcome {
        push: push.err(),
        local_lm,
    }
}
