//! Our own quantized llama for GGUF files (`general.architecture = llama`:
//! Llama, SmolLM, Mistral, TinyLlama; `qwen2`, which is llama with q/k/v
//! biases and NEOX rotary pairs; and `qwen3`, which is llama with NEOX pairs,
//! an RMS norm of each head's query and key, and its own head size), in place
//! of candle-transformers' `quantized_llama`, `quantized_qwen2` and
//! `quantized_qwen3`, whose structure it follows (candle
//! is MIT/Apache-2.0): the same tensors and operations in the same order, but
//! each computed as llama.cpp's ggml CPU backend computes it, to the bit
//! ([`crate::ggml`]: RMS norm, rope, attention, softmax, SwiGLU), so that
//! greedy output equals llama.cpp's token for token (docs/CANDLE.md). Also:
//!
//! - the token embedding table stays quantized: only the rows looked up are
//!   dequantized (candle's `QTensor::embedding`, one row per token), where
//!   candle widens the whole table to F32 at load (113 MB for SmolLM2-135M);
//!   the tied output projection multiplies by the same quantized tensor;
//! - Q4_1 weights are multiplied with [`Q4_1Matrix`], Q5_0 weights with
//!   [`Q5_0Matrix`], Q8_0 weights with [`ggml::Q8_0Matrix`], Q4_K weights
//!   with [`Q4KMatrix`] (as llama.cpp's repacked layout computes them),
//!   Q5_K weights with [`Q5KMatrix`] and Q6_K weights with [`Q6KMatrix`]
//!   (ggml's kernels), the other types with
//!   candle's `QMatMul` as before.
//!
//! The weights ([`QLlama`]) are shared by every job; each job has its own
//! [`Cache`] (keys and values per layer).

use std::io::{Read, Seek};
use std::sync::Arc;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};

use crate::ggml;
use crate::q4_1::Q4_1Matrix;
use crate::q4_k::Q4KMatrix;
use crate::q5_0::Q5_0Matrix;
use crate::q5_k::Q5KMatrix;
use crate::q6_k::Q6KMatrix;

/// The architectures [`QLlama`] runs (`general.architecture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arch {
    Llama,
    Qwen2,
    Qwen3,
}

impl Arch {
    /// The architecture whose `general.architecture` is `key`, if it is one of these.
    pub(crate) fn from_key(key: &str) -> Option<Arch> {
        [Arch::Llama, Arch::Qwen2, Arch::Qwen3]
            .into_iter()
            .find(|a| a.key() == key)
    }

    /// The architecture's name, and its metadata prefix (`llama.block_count`…).
    pub(crate) fn key(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        }
    }
}

/// A weight matrix, multiplied as its type is fastest.
#[derive(Debug)]
enum Linear {
    Q4_1(Q4_1Matrix),
    Q5_0(Q5_0Matrix),
    Q8_0(ggml::Q8_0Matrix),
    Q4K(Q4KMatrix),
    Q5K(Q5KMatrix),
    Q6K(Q6KMatrix),
    Candle(QMatMul),
}

impl Linear {
    fn new(t: Arc<QTensor>) -> Result<Linear> {
        Ok(match t.dtype() {
            GgmlDType::Q4_1 if t.device().is_cpu() => Linear::Q4_1(Q4_1Matrix::new(t)?),
            GgmlDType::Q5_0 if t.device().is_cpu() => Linear::Q5_0(Q5_0Matrix::new(t)?),
            GgmlDType::Q8_0 if t.device().is_cpu() => Linear::Q8_0(ggml::Q8_0Matrix::new(t)?),
            GgmlDType::Q4K if t.device().is_cpu() => Linear::Q4K(Q4KMatrix::new(t)?),
            GgmlDType::Q5K if t.device().is_cpu() => Linear::Q5K(Q5KMatrix::new(t)?),
            GgmlDType::Q6K if t.device().is_cpu() => Linear::Q6K(Q6KMatrix::new(t)?),
            _ => Linear::Candle(QMatMul::from_arc(t)?),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Q4_1(m) => m.forward(x),
            Linear::Q5_0(m) => m.forward(x),
            Linear::Q8_0(m) => m.forward(x),
            Linear::Q4K(m) => m.forward(x),
            Linear::Q5K(m) => m.forward(x),
            Linear::Q6K(m) => m.forward(x),
            Linear::Candle(m) => m.forward(x),
        }
    }
}

/// RMS normalisation with an F32 weight, as ggml computes it ([`ggml::rms_norm_row`]).
#[derive(Debug)]
struct RmsNorm {
    weight: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    fn new(t: QTensor, eps: f32, device: &Device) -> Result<RmsNorm> {
        Ok(RmsNorm {
            weight: t.dequantize(device)?.flatten_all()?.to_vec1::<f32>()?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = &self.weight;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; xs.len()];
        for (x, y) in xs.chunks_exact(w.len()).zip(out.chunks_exact_mut(w.len())) {
            ggml::rms_norm_row(x, w, self.eps, y);
        }
        Tensor::from_vec(out, x.shape(), x.device())
    }
}

#[derive(Debug)]
struct Layer {
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    /// ffn_gate, ffn_down, ffn_up.
    w1: Linear,
    w2: Linear,
    w3: Linear,
    attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    /// q, k and v biases (qwen2), F32.
    biases: Option<[Tensor; 3]>,
    /// RMS norms of each head's query and key, before the rotation (qwen3).
    qk_norms: Option<[RmsNorm; 2]>,
}

impl Layer {
    /// The feed-forward block after the attention, without its residual:
    /// `w2(silu(w1(norm(x))) * w3(norm(x)))`, the SwiGLU as ggml's
    /// ([`ggml::swiglu`], row by row).
    fn ffn(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.ffn_norm.forward(x)?;
        let gate = self.w1.forward(&y)?;
        let up = self.w3.forward(&y)?;
        let shape = gate.shape().clone();
        let (gate, up) = (
            gate.flatten_all()?.to_vec1::<f32>()?,
            up.flatten_all()?.to_vec1::<f32>()?,
        );
        let mut act = vec![0f32; gate.len()];
        let n = *shape.dims().last().unwrap_or(&1);
        for ((g, u), a) in gate
            .chunks_exact(n)
            .zip(up.chunks_exact(n))
            .zip(act.chunks_exact_mut(n))
        {
            ggml::swiglu(g, u, a);
        }
        self.w2.forward(&Tensor::from_vec(act, shape, x.device())?)
    }
}

/// The weights of a GGUF llama, shared by all jobs.
#[derive(Debug)]
pub(crate) struct QLlama {
    /// `token_embd.weight`, quantized; rows are dequantized as looked up.
    embedding: Arc<QTensor>,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: Linear,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    /// Width of the attention's output, `n_head · head_dim`: the embedding
    /// width, except for a qwen3 whose `key_length` says otherwise.
    hidden: usize,
    /// Rotary pairs `(i, i + d/2)` (NEOX: qwen2, qwen3) rather than `(2i, 2i + 1)` (llama).
    neox: bool,
    /// ggml's rope caches ([`ggml::rope_cache`]), `[positions, rope_dim]`:
    /// `cos, sin` per pair.
    rope: Vec<f32>,
    /// The rotated dimensions of each head (the first `rope_dim`).
    rope_dim: usize,
}

/// One job's keys and values, per layer.
#[derive(Debug)]
pub(crate) struct Cache {
    kv: Vec<KvRows>,
}

/// One layer's keys and values (after the rotation), position by position:
/// `[positions, b, n_kv_head, head_dim]` each, appended to in place.
#[derive(Debug, Default)]
struct KvRows {
    keys: Vec<f32>,
    values: Vec<f32>,
}

impl QLlama {
    /// Reads the weights of a checked header's llama, qwen2 or qwen3 (`arch`) from
    /// `reader`, with rotary tables for `positions` positions.
    pub(crate) fn from_gguf<R: Read + Seek>(
        content: &Content,
        reader: &mut R,
        device: &Device,
        positions: usize,
        arch: Arch,
    ) -> Result<QLlama> {
        let p = arch.key();
        let neox = arch != Arch::Llama;
        let md = |key: &str| match content.metadata.get(&format!("{p}.{key}")) {
            Some(v) => Ok(v),
            None => candle_core::bail!("cannot find {p}.{key} in metadata"),
        };
        let n_head = md("attention.head_count")?.to_u32()? as usize;
        let n_kv_head = md("attention.head_count_kv")?.to_u32()? as usize;
        let block_count = md("block_count")?.to_u32()? as usize;
        let hidden = md("embedding_length")?.to_u32()? as usize;
        let head_dim = match md("attention.key_length") {
            Ok(v) if arch == Arch::Qwen3 => v.to_u32()? as usize,
            _ => hidden / n_head,
        };
        // qwen2 and qwen3 rotate the whole head; llama files say how much.
        let rope_dim = match md("rope.dimension_count") {
            Ok(v) if !neox => v.to_u32()? as usize,
            _ => head_dim,
        };
        let eps = md("attention.layer_norm_rms_epsilon")?.to_f32()?;
        let freq_base = md("rope.freq_base")
            .and_then(|v| v.to_f32())
            .unwrap_or(10000.0);
        let rope = rotary_tables(rope_dim, freq_base, positions);

        let mut tensor = |name: &str| content.tensor(reader, name, device);
        let embedding = Arc::new(tensor("token_embd.weight")?);
        let norm = RmsNorm::new(tensor("output_norm.weight")?, eps, device)?;
        // Tied when the file has no output.weight (SmolLM2): the same quantized tensor.
        let output = match tensor("output.weight") {
            Ok(t) => Arc::new(t),
            Err(_) => embedding.clone(),
        };
        let output = Linear::new(output)?;
        let mut layers = Vec::with_capacity(block_count);
        for i in 0..block_count {
            let mut linear = |what: &str| -> Result<Linear> {
                Linear::new(Arc::new(tensor(&format!("blk.{i}.{what}.weight"))?))
            };
            let (wq, wk, wv, wo) = (
                linear("attn_q")?,
                linear("attn_k")?,
                linear("attn_v")?,
                linear("attn_output")?,
            );
            let (w1, w2, w3) = (linear("ffn_gate")?, linear("ffn_down")?, linear("ffn_up")?);
            let attn_norm =
                RmsNorm::new(tensor(&format!("blk.{i}.attn_norm.weight"))?, eps, device)?;
            let ffn_norm = RmsNorm::new(tensor(&format!("blk.{i}.ffn_norm.weight"))?, eps, device)?;
            let qk_norms = match arch {
                Arch::Qwen3 => {
                    let mut norm = |what: &str| {
                        RmsNorm::new(tensor(&format!("blk.{i}.{what}.weight"))?, eps, device)
                    };
                    Some([norm("attn_q_norm")?, norm("attn_k_norm")?])
                }
                _ => None,
            };
            let biases = match arch == Arch::Qwen2 {
                true => {
                    let mut bias =
                        |what: &str| tensor(&format!("blk.{i}.{what}.bias"))?.dequantize(device);
                    Some([bias("attn_q")?, bias("attn_k")?, bias("attn_v")?])
                }
                false => None,
            };
            layers.push(Layer {
                wq,
                wk,
                wv,
                wo,
                w1,
                w2,
                w3,
                attn_norm,
                ffn_norm,
                biases,
                qk_norms,
            });
        }
        Ok(QLlama {
            embedding,
            layers,
            norm,
            output,
            n_head,
            n_kv_head,
            head_dim,
            hidden: n_head * head_dim,
            neox,
            rope,
            rope_dim,
        })
    }

    /// An empty KV cache for one job.
    pub(crate) fn new_cache(&self) -> Cache {
        Cache {
            kv: (0..self.layers.len()).map(|_| KvRows::default()).collect(),
        }
    }

    /// The embedding rows of the ids `x` (`[b, seq]`): `[b, seq, hidden]`, F32.
    pub(crate) fn embed(&self, x: &Tensor) -> Result<Tensor> {
        self.embedding.embedding(x)
    }

    /// The logits after the tokens `x` (`[b, seq]` ids) at position `pos`,
    /// for the last position only: `[b, vocab]`.
    pub(crate) fn forward(&self, cache: &mut Cache, x: &Tensor, pos: usize) -> Result<Tensor> {
        let (_b, seq_len) = x.dims2()?;
        let mask = match seq_len {
            1 => None,
            _ => Some(causal_mask(seq_len, pos, x.device())?),
        };
        let mut h = self.embed(x)?;
        let last = self.layers.len().saturating_sub(1);
        for (l, (layer, kv)) in self.layers.iter().zip(cache.kv.iter_mut()).enumerate() {
            let residual = &h;
            let x = layer.attn_norm.forward(&h)?;
            let attn = self.attention(layer, kv, &x, mask.as_ref(), pos)?;
            let mut x = (attn + residual)?;
            if l == last && seq_len > 1 {
                // As llama.cpp (`inp_out_ids`): the last layer's feed-forward
                // runs on the last position only, a single row. The same
                // values for every kernel whose prompt rows are their single
                // rows; Q4_K's are not (its gemm), and this is what it runs.
                // Contiguous: with several sequences the last positions are strided.
                x = x.i((.., seq_len - 1..seq_len, ..))?.contiguous()?;
            }
            h = (layer.ffn(&x)? + &x)?;
        }
        let x = self.norm.forward(&h)?;
        let x = x.i((.., h.dim(1)? - 1, ..))?.contiguous()?;
        self.output.forward(&x)
    }

    /// The logits after one more token for each of several jobs, `[b, vocab]`:
    /// `steps` are each job's cache, its token and that token's position.
    /// The jobs' rows go through every weight matrix together (each weight
    /// row read once for all of them); attention runs per job, on its own
    /// cache. Each row's logits are exactly [`forward`](QLlama::forward)'s
    /// for that job alone: every operation treats rows independently.
    pub(crate) fn forward_steps(&self, steps: &mut [(&mut Cache, u32, usize)]) -> Result<Tensor> {
        let b = steps.len();
        let tokens: Vec<u32> = steps.iter().map(|s| s.1).collect();
        let x = Tensor::from_vec(tokens, (b, 1), &self.embedding.device())?;
        let mut h = self.embed(&x)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let x = layer.attn_norm.forward(&h)?;
            let (q, k, v) = self.qkv(layer, &x)?;
            let ys = steps
                .iter_mut()
                .enumerate()
                .map(|(i, (cache, _, pos))| {
                    let row = |t: &Tensor| t.narrow(0, i, 1);
                    self.attend(&mut cache.kv[l], row(&q)?, row(&k)?, row(&v)?, None, *pos)
                })
                .collect::<Result<Vec<_>>>()?;
            let attn = layer.wo.forward(&Tensor::cat(&ys, 0)?)?;
            let x = (attn + &h)?;
            h = (layer.ffn(&x)? + &x)?;
        }
        let x = self.norm.forward(&h)?.squeeze(1)?;
        self.output.forward(&x)
    }

    fn attention(
        &self,
        layer: &Layer,
        kv: &mut KvRows,
        x: &Tensor,
        mask: Option<&Tensor>,
        pos: usize,
    ) -> Result<Tensor> {
        let (q, k, v) = self.qkv(layer, x)?;
        layer.wo.forward(&self.attend(kv, q, k, v, mask, pos)?)
    }

    /// The queries, keys and values of `x` (`[b, seq, hidden]`), biases
    /// added (qwen2), each head's query and key normalised (qwen3).
    fn qkv(&self, layer: &Layer, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (mut q, mut k, mut v) = (
            layer.wq.forward(x)?,
            layer.wk.forward(x)?,
            layer.wv.forward(x)?,
        );
        if let Some([bq, bk, bv]) = &layer.biases {
            q = q.broadcast_add(bq)?;
            k = k.broadcast_add(bk)?;
            v = v.broadcast_add(bv)?;
        }
        if let Some([q_norm, k_norm]) = &layer.qk_norms {
            let (b, seq_len, _) = q.dims3()?;
            let per_head = |t: Tensor, norm: &RmsNorm, heads: usize| {
                let t = t.reshape((b, seq_len, heads, self.head_dim))?;
                norm.forward(&t)?
                    .reshape((b, seq_len, heads * self.head_dim))
            };
            q = per_head(q, q_norm, self.n_head)?;
            k = per_head(k, k_norm, self.n_kv_head)?;
        }
        Ok((q, k, v))
    }

    /// Attention of `q`, `k`, `v` (`[b, seq, heads · head_dim]`, after the
    /// projections) at `pos`, over the cache `kv`, which takes the new keys
    /// and values: `[b, seq, hidden]`, before the output projection.
    fn attend(
        &self,
        kv: &mut KvRows,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Option<&Tensor>,
        pos: usize,
    ) -> Result<Tensor> {
        let (b, seq_len, _) = q.dims3()?;
        let device = q.device().clone();
        let (hd, n_head, n_kv_head) = (self.head_dim, self.n_head, self.n_kv_head);
        let mut qs = q.flatten_all()?.to_vec1::<f32>()?;
        let mut ks = k.flatten_all()?.to_vec1::<f32>()?;
        for i in 0..b * seq_len {
            let p = pos + i % seq_len;
            self.rope(&mut qs[i * n_head * hd..(i + 1) * n_head * hd], p)?;
            self.rope(&mut ks[i * n_kv_head * hd..(i + 1) * n_kv_head * hd], p)?;
        }
        // The cache takes the new rows in place: `[positions, b, n_kv_head, hd]`.
        let row = n_kv_head * hd;
        if pos == 0 {
            kv.keys.clear();
            kv.values.clear();
        }
        if kv.keys.len() != pos * b * row {
            candle_core::bail!(
                "a KV cache of {} positions for a step at position {pos}",
                kv.keys.len() / (b * row)
            )
        }
        let vs = v.flatten_all()?.to_vec1::<f32>()?;
        for i in 0..seq_len {
            for bi in 0..b {
                let at = (bi * seq_len + i) * row;
                kv.keys.extend_from_slice(&ks[at..at + row]);
                kv.values.extend_from_slice(&vs[at..at + row]);
            }
        }

        // ggml's attention without flash attention, head by head: scores
        // K·Q ([`ggml::vec_dot_f32`]), softmax with the scale and the mask
        // ([`ggml::soft_max_row`]), then V·softmax: one dot product per
        // output value, tinyBLAS's for a prompt and ggml_vec_dot_f32's for
        // one token, as llama.cpp's mul_mat picks them.
        let total = pos + seq_len;
        let groups = b * n_kv_head;
        // Key `j` of group `g` (`bi · n_kv_head + kv head`).
        let key = |j: usize, g: usize| &kv.keys[(j * groups + g) * hd..][..hd];
        // V transposed per group: [b, n_kv_head, hd, total].
        let mut vt = vec![0f32; groups * hd * total];
        for (j, rows) in kv.values.chunks_exact(groups * hd).enumerate() {
            for (g, row) in rows.chunks_exact(hd).enumerate() {
                for (d, &val) in row.iter().enumerate() {
                    vt[(g * hd + d) * total + j] = val;
                }
            }
        }
        let hidden: Option<Vec<Vec<u8>>> = match mask {
            Some(m) => Some(m.to_dtype(DType::U8)?.to_vec2::<u8>()?),
            None => None,
        };
        let scale = 1.0 / (hd as f32).sqrt();
        let n_rep = n_head / n_kv_head;
        let mut out = vec![0f32; b * seq_len * n_head * hd];
        let mut probs = vec![0f32; total];
        for bi in 0..b {
            for h in 0..n_head {
                let g = bi * n_kv_head + h / n_rep;
                let vals = &vt[g * total * hd..(g + 1) * total * hd];
                for i in 0..seq_len {
                    let t = bi * seq_len + i;
                    let q = &qs[(t * n_head + h) * hd..(t * n_head + h + 1) * hd];
                    for (j, p) in probs.iter_mut().enumerate() {
                        let masked = hidden.as_ref().is_some_and(|m| m[i][j] != 0);
                        *p = if masked {
                            f32::NEG_INFINITY
                        } else {
                            ggml::vec_dot_f32(key(j, g), q)
                        };
                    }
                    ggml::soft_max_row(&mut probs, scale);
                    let o = &mut out[(t * n_head + h) * hd..(t * n_head + h + 1) * hd];
                    for (o, vrow) in o.iter_mut().zip(vals.chunks_exact(total)) {
                        *o = match seq_len {
                            1 => ggml::vec_dot_f32(vrow, &probs),
                            _ => ggml::sgemm_dot_f32(vrow, &probs),
                        };
                    }
                }
            }
        }
        Tensor::from_vec(out, (b, seq_len, self.hidden), &device)
    }

    /// Rotary embedding of one token's heads (`x`: whole heads) at
    /// position `pos`, in place: llama's interleaved pairs (llama.cpp's
    /// NORM, [`ggml::rope_norm`]) or qwen2's and qwen3's halves (NEOX,
    /// [`ggml::rope_neox`]).
    fn rope(&self, x: &mut [f32], pos: usize) -> Result<()> {
        let d = self.rope_dim;
        let Some(cache) = self.rope.get(pos * d..(pos + 1) * d) else {
            candle_core::bail!("position {pos} is past the rotary tables")
        };
        for head in x.chunks_exact_mut(self.head_dim) {
            match self.neox {
                true => ggml::rope_neox(head, cache),
                false => ggml::rope_norm(head, cache),
            }
        }
        Ok(())
    }
}

/// ggml's rope caches for `positions` positions ([`ggml::rope_cache`]):
/// `[positions, dim]`, `cos, sin` per pair.
fn rotary_tables(dim: usize, freq_base: f32, positions: usize) -> Vec<f32> {
    let mut out = vec![0f32; positions * dim];
    for (p, row) in out.chunks_exact_mut(dim).enumerate() {
        ggml::rope_cache(p, dim, freq_base, row);
    }
    out
}

/// `[seq_len, pos + seq_len]`, 1 where query `i` (at `pos + i`) must not see key `j`.
fn causal_mask(seq_len: usize, pos: usize, device: &Device) -> Result<Tensor> {
    let kv_len = pos + seq_len;
    let mask: Vec<u8> = (0..seq_len)
        .flat_map(|i| (0..kv_len).map(move |j| u8::from(j > pos + i)))
        .collect();
    Tensor::from_slice(&mask, (seq_len, kv_len), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedding_rows_equal_candles_dequantized_rows() {
        let dev = Device::Cpu;
        let (vocab, hidden) = (50, 64);
        let w: Vec<f32> = (0..vocab * hidden)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let w = Tensor::from_vec(w, (vocab, hidden), &dev).unwrap();
        for dtype in [
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q6K,
            GgmlDType::F16,
        ] {
            let hidden = if dtype == GgmlDType::Q6K { 256 } else { hidden };
            let w = if dtype == GgmlDType::Q6K {
                Tensor::cat(&[&w, &w, &w, &w], 1).unwrap()
            } else {
                w.clone()
            };
            let q = QTensor::quantize(&w, dtype).unwrap();
            let full = q.dequantize(&dev).unwrap();
            let ids = Tensor::new(&[[3u32, 0, 49, 3]], &dev).unwrap();
            let rows = q.embedding(&ids).unwrap();
            assert_eq!(rows.dims(), &[1, 4, hidden]);
            for (k, &id) in [3usize, 0, 49, 3].iter().enumerate() {
                let got = rows.i((0, k)).unwrap().to_vec1::<f32>().unwrap();
                let want = full.i(id).unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(got, want, "{dtype:?} row {id}");
            }
            // An id past the table is an error, not a read past it.
            assert!(q
                .embedding(&Tensor::new(&[[50u32]], &dev).unwrap())
                .is_err());
        }
    }

    #[test]
    fn the_causal_mask_hides_later_keys() {
        let m = causal_mask(3, 2, &Device::Cpu).unwrap();
        let m: Vec<u8> = m.flatten_all().unwrap().to_vec1().unwrap();
        #[rustfmt::skip]
        assert_eq!(m, [
            0, 0, 0, 1, 1,
            0, 0, 0, 0, 1,
            0, 0, 0, 0, 0,
        ]);
    }
}
