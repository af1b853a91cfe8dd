//! A Q6_K matrix product for the CPU, as ggml computes it: the activations
//! quantized to Q8_K ([`ggml::quantize_row_q8_k`]) and each output one
//! Q6_K × Q8_K dot product, ggml's x86 `ggml_vec_dot_q6_K_q8_K`, with
//! AVX2, FMA and F16C when the CPU has them and a plain loop with the same
//! roundings otherwise. llama.cpp's Q4_K_M recipe writes Q6_K for some of a
//! model's `ffn_down` and `attn_v` matrices (those whose rows are whole
//! 256-value super-blocks; SmolLM2's `ffn_down`, 1536 wide), and its Q6_K
//! recipe for all of them.
//!
//! The library's AVX2 loop takes the −32 of every value from the Q8_K block
//! sums (`q8sclsub`, one subtraction per super-block) rather than from each
//! product, as older ggml did: the same integers, but in other lanes, so
//! other float sums; this follows the library (read from its disassembly:
//! `vpslld 5`, `vpsubd` before the one `vfmadd231ps`).
//!
//! ggml has no AVX-512 version of this dot product: its AVX-512 build
//! (`libggml-cpu-zen4.so`) runs the AVX2 code, 8 lanes, so that is what this
//! follows. llama.cpp's CPU "repack" buffer has no x86 layout for Q6_K (its
//! `ggml_repack_get_optimal_repack_type` offers `q6_K_8x8`/`8x4` on ARM
//! only), and llamafile's tinyBLAS takes no K-quants on x86, so for two or
//! more activation rows (a prompt) llama.cpp runs this same dot product per
//! row and column: the same bits as one row alone (the test below checks
//! ggml's own results for one row and for five).

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, Tensor};

use crate::ggml::{self, BlockQ8K, QK_K};
use crate::qmatrix::{self, Dot, Dot4};

/// Bytes of one Q6_K super-block (`block_q6_K`): `ql` (128 bytes: low
/// nibbles), `qh` (64 bytes: the two high bits), `scales` (16 `i8`, one per
/// 16 values), then `d` (f16). Value = 6 bits − 32, times `d · scale`.
const Q6_K_BYTES: usize = 210;
/// Where `qh`, `scales` and `d` start in a super-block.
const QH: usize = 128;
const SCALES: usize = 192;
const D: usize = 208;
/// Output rows per work item of the thread pool.
const ROWS_PER_ITEM: usize = 16;

/// The f16 at `bytes[0..2]` (little-endian), as f32.
fn f16_le(bytes: &[u8]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([bytes[0], bytes[1]])).to_f32()
}

/// The 256 values of a Q6_K super-block, in −32..=31, as ggml's
/// `dequantize_row_q6_K` orders them: in each half `h` of 128 values, value
/// `128h + 32k + l` (`l < 32`) has the low nibble (`k` 0, 1) or high nibble
/// (`k` 2, 3) of `ql[64h + l + 32 (k % 2)]` and bits `2k, 2k + 1` of
/// `qh[32h + l]`.
fn unpack(xb: &[u8]) -> [i8; QK_K] {
    let (ql, qh) = (&xb[..QH], &xb[QH..SCALES]);
    std::array::from_fn(|v| {
        let (h, k, l) = (v / 128, (v % 128) / 32, v % 32);
        let byte = ql[64 * h + l + 32 * (k % 2)];
        let low = if k < 2 { byte & 0x0F } else { byte >> 4 };
        let high = (qh[32 * h + l] >> (2 * k)) & 3;
        ((low | (high << 4)) as i8) - 32
    })
}

/// Σ over the super-blocks of (Q6_K row `x`, as bytes) · (Q8_K row `y`)
/// without SIMD, as ggml's AVX2 loop: 8 lanes, lane `l` of super-block `i`
/// the integer sum over its eight 32-value groups of the unsigned 6-bit
/// values `4l..4l + 4` times the activations and their 16-value scale,
/// minus `32 · (bsums[2l] · scale[2l] + bsums[2l + 1] · scale[2l + 1])` (the
/// −32 offset, taken from the Q8_K sums), fused into lane `l` times
/// `d_y · d_x` (rounded first); then [`ggml::hsum8`].
fn dot_scalar(x: &[u8], y: &[BlockQ8K]) -> f32 {
    assert_eq!(x.len(), y.len() * Q6_K_BYTES, "dot_q6_K_q8_K: lengths");
    let mut acc = [0f32; 8];
    for (xb, yb) in x.chunks_exact(Q6_K_BYTES).zip(y) {
        let d = yb.d * f16_le(&xb[D..]);
        let q = unpack(xb);
        let scales = &xb[SCALES..D];
        #[allow(clippy::needless_range_loop)] // v indexes three arrays
        for (l, acc) in acc.iter_mut().enumerate() {
            let scale = |t: usize| i32::from(scales[t] as i8);
            let mut sum = 0i32;
            for g in 0..8 {
                for v in 32 * g + 4 * l..32 * g + 4 * l + 4 {
                    sum += scale(v / 16) * (i32::from(q[v]) + 32) * i32::from(yb.qs[v]);
                }
            }
            let offset = i32::from(yb.bsums[2 * l]) * scale(2 * l)
                + i32::from(yb.bsums[2 * l + 1]) * scale(2 * l + 1);
            sum -= 32 * offset;
            *acc = d.mul_add(sum as f32, *acc);
        }
    }
    ggml::hsum8(&acc)
}

/// [`Dot4`] without SIMD: four [`dot_scalar`]s.
fn dot4_scalar(x: &[u8], ys: [&[BlockQ8K]; 4]) -> [f32; 4] {
    ys.map(|y| dot_scalar(x, y))
}

/// The fastest dot products this CPU runs (the same bits either way).
fn best_dot() -> (Dot<BlockQ8K>, Dot4<BlockQ8K>) {
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(kernels) = avx2::kernels() {
            return kernels;
        }
    }
    (dot_scalar, dot4_scalar)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BlockQ8K, Dot, Dot4, D, Q6_K_BYTES, QH, SCALES};
    use std::arch::x86_64::*;

    /// [`super::dot_scalar`] and [`super::dot4_scalar`] with AVX2, if this
    /// CPU has AVX2, FMA and F16C. The CPU is checked here, once per matrix,
    /// not per call: the two safe functions below can be reached only
    /// through what this returns.
    pub(super) fn kernels() -> Option<(Dot<BlockQ8K>, Dot4<BlockQ8K>)> {
        fn dot(x: &[u8], y: &[BlockQ8K]) -> f32 {
            // The kernel reads exactly y.len() super-blocks of both.
            assert_eq!(x.len(), y.len() * Q6_K_BYTES, "dot_q6_K_q8_K: lengths");
            // SAFETY: `dot` is named only in `kernels`, which returns it only
            // once the CPU has shown AVX2, FMA and F16C; lengths checked above.
            unsafe { dot_avx2(x, y) }
        }

        fn dot4(x: &[u8], ys: [&[BlockQ8K]; 4]) -> [f32; 4] {
            // The kernel reads exactly x.len() / 210 super-blocks of each.
            for y in ys {
                assert_eq!(x.len(), y.len() * Q6_K_BYTES, "dot_q6_K_q8_K: lengths");
            }
            // SAFETY: as in `dot`: returned only past the CPU check, lengths checked above.
            unsafe { dot4_avx2(x, ys) }
        }

        if !(std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c"))
        {
            return None;
        }
        let kernels: (Dot<BlockQ8K>, Dot4<BlockQ8K>) = (dot, dot4);
        Some(kernels)
    }

    /// The super-block's f16 `d` as f32.
    ///
    /// # Safety
    /// The CPU must have F16C; `xb` points at 210 readable bytes.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn d(xb: *const u8) -> f32 {
        // SAFETY: bytes 208..210 of the super-block (unaligned read).
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
            std::ptr::read_unaligned(xb.add(D) as *const u16),
        ))))
    }

    /// Half `j` (128 values) of the super-block at `xb`: its four groups of
    /// 32 values as unsigned 6-bit bytes (ggml's `q4_0..q4_3`), and their
    /// scales widened to 16 bits, each byte pair of a group's products
    /// (`get_scale_shuffle(4j + k)`, `_mm256_cvtepi8_epi16`).
    ///
    /// # Safety
    /// The CPU must have AVX2; `xb` points at 210 readable bytes; `j < 2`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn half(xb: *const u8, j: usize) -> ([__m256i; 4], [__m256i; 4]) {
        let m4 = _mm256_set1_epi8(0x0F);
        let m2 = _mm256_set1_epi8(3);
        // SAFETY: ql[64j .. 64j + 64], qh[32j .. 32j + 32] and the 16 scales,
        // all inside the super-block (j < 2), read unaligned.
        let bits1 = _mm256_loadu_si256(xb.add(64 * j) as *const __m256i);
        let bits2 = _mm256_loadu_si256(xb.add(64 * j + 32) as *const __m256i);
        let bits_h = _mm256_loadu_si256(xb.add(QH + 32 * j) as *const __m256i);
        let scales = _mm_loadu_si128(xb.add(SCALES) as *const __m128i);
        let h0 = _mm256_slli_epi16(_mm256_and_si256(bits_h, m2), 4);
        let h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bits_h, 2), m2), 4);
        let h2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bits_h, 4), m2), 4);
        let h3 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bits_h, 6), m2), 4);
        let q = [
            _mm256_or_si256(_mm256_and_si256(bits1, m4), h0),
            _mm256_or_si256(_mm256_and_si256(bits2, m4), h1),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits1, 4), m4), h2),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits2, 4), m4), h3),
        ];
        let i = 4 * j;
        (
            q,
            [
                scale(scales, i),
                scale(scales, i + 1),
                scale(scales, i + 2),
                scale(scales, i + 3),
            ],
        )
    }

    /// Scales `2i` (8 times) and `2i + 1` (8 times) of the 16, widened to
    /// 16 bits (ggml's `get_scale_shuffle(i)`, then `_mm256_cvtepi8_epi16`).
    ///
    /// # Safety
    /// The CPU must have AVX2; `i < 8`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn scale(scales: __m128i, i: usize) -> __m256i {
        let shuffle = _mm_set_epi64x(
            i64::from_ne_bytes([(2 * i + 1) as u8; 8]),
            i64::from_ne_bytes([(2 * i) as u8; 8]),
        );
        _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, shuffle))
    }

    /// One half's contribution to ggml's `sumi`: `q · y` in pairs (`q`
    /// unsigned, at most 2 · 63 · 127: no saturation), times the scales, in
    /// fours.
    ///
    /// # Safety
    /// The CPU must have AVX2; `y` points at 128 readable bytes.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn half_sum(q: &[__m256i; 4], scales: &[__m256i; 4], y: *const i8) -> __m256i {
        let mut p = [_mm256_setzero_si256(); 4];
        for k in 0..4 {
            // SAFETY: y[32k .. 32k + 32], inside the 128 bytes.
            let q8 = _mm256_loadu_si256(y.add(32 * k) as *const __m256i);
            p[k] = _mm256_madd_epi16(scales[k], _mm256_maddubs_epi16(q[k], q8));
        }
        _mm256_add_epi32(_mm256_add_epi32(p[0], p[1]), _mm256_add_epi32(p[2], p[3]))
    }

    /// ggml's `q8sclsub`: `32 · Σ bsums · scales` in pairs (lane `l`: sums
    /// `2l` and `2l + 1`), what the unsigned values add over `q − 32`.
    ///
    /// # Safety
    /// The CPU must have AVX2; `xb` points at 210 readable bytes.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn offset(xb: *const u8, yb: &BlockQ8K) -> __m256i {
        // SAFETY: the 16 scales inside the super-block; bsums is 16 i16 = 32 bytes.
        let scales = _mm_loadu_si128(xb.add(SCALES) as *const __m128i);
        let sums = _mm256_loadu_si256(yb.bsums.as_ptr() as *const __m256i);
        _mm256_slli_epi32(_mm256_madd_epi16(sums, _mm256_cvtepi8_epi16(scales)), 5)
    }

    /// ggml's `hsum_float_8`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn hsum(acc: __m256) -> f32 {
        let mut r = _mm_add_ps(_mm256_extractf128_ps(acc, 1), _mm256_castps256_ps128(acc));
        r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
    }

    /// ggml's AVX2 `ggml_vec_dot_q6_K_q8_K`.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C, and `x.len()` must be
    /// `y.len() * 210`: super-block `i` reads `x[210 i .. 210 i + 210]` and
    /// `y[i]` only.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_avx2(x: &[u8], y: &[BlockQ8K]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (i, yb) in y.iter().enumerate() {
            // SAFETY: i < y.len(), so the super-block is inside x (checked by the caller).
            let xb = x.as_ptr().add(i * Q6_K_BYTES);
            let d = yb.d * d(xb);
            let mut sumi = _mm256_setzero_si256();
            for j in 0..2 {
                let (q, scales) = half(xb, j);
                // SAFETY: yb.qs[128j .. 128j + 128] of its 256.
                let s = half_sum(&q, &scales, yb.qs.as_ptr().add(128 * j));
                sumi = _mm256_add_epi32(sumi, s);
            }
            sumi = _mm256_sub_epi32(sumi, offset(xb, yb));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        }
        hsum(acc)
    }

    /// [`dot_avx2`] for four Q8_K rows: the same operations in the same
    /// order for each row (integer sums, exact in any order), the Q6_K
    /// super-block unpacked once.
    ///
    /// # Safety
    /// As [`dot_avx2`], for every row of `ys` (all of `x.len() / 210` blocks).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot4_avx2(x: &[u8], ys: [&[BlockQ8K]; 4]) -> [f32; 4] {
        let mut acc = [_mm256_setzero_ps(); 4];
        for (i, block) in x.chunks_exact(Q6_K_BYTES).enumerate() {
            let xb = block.as_ptr();
            // SAFETY: the 210-byte super-block itself.
            let dx = d(xb);
            let mut sumi = [_mm256_setzero_si256(); 4];
            for j in 0..2 {
                // SAFETY: as above, j < 2.
                let (q, scales) = half(xb, j);
                for (y, sumi) in ys.iter().zip(sumi.iter_mut()) {
                    // Bounds-checked: every row has as many blocks (checked by the caller).
                    let yb = &y[i];
                    // SAFETY: yb.qs[128j .. 128j + 128] of its 256.
                    let s = half_sum(&q, &scales, yb.qs.as_ptr().add(128 * j));
                    *sumi = _mm256_add_epi32(*sumi, s);
                }
            }
            for ((y, acc), sumi) in ys.iter().zip(acc.iter_mut()).zip(sumi) {
                let sumi = _mm256_sub_epi32(sumi, offset(xb, &y[i]));
                let d = _mm256_set1_ps(y[i].d * dx);
                *acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), *acc);
            }
        }
        let mut out = [0f32; 4];
        for (out, acc) in out.iter_mut().zip(acc) {
            *out = hsum(acc);
        }
        out
    }
}

/// A Q6_K weight matrix `[n, k]` (n outputs of k inputs), multiplied by
/// activations with [`Q6KMatrix::forward`].
#[derive(Debug, Clone)]
pub(crate) struct Q6KMatrix {
    weights: Arc<QTensor>,
    n: usize,
    k: usize,
    dot: (Dot<BlockQ8K>, Dot4<BlockQ8K>),
}

impl Q6KMatrix {
    /// Wraps a Q6_K tensor of shape `[n, k]` held in CPU memory.
    pub(crate) fn new(weights: Arc<QTensor>) -> Result<Self> {
        let (n, k) =
            qmatrix::check_weights("Q6KMatrix", &weights, GgmlDType::Q6K, QK_K, Q6_K_BYTES)?;
        Ok(Q6KMatrix {
            weights,
            n,
            k,
            dot: best_dot(),
        })
    }

    /// `x · Wᵀ` for `x` of shape `[…, k]`: shape `[…, n]`, F32.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (xs, dims) = qmatrix::activations("Q6KMatrix", x, self.n, self.k)?;
        let m = xs.len() / self.k;
        let mut xq = vec![BlockQ8K::ZERO; m * (self.k / QK_K)];
        ggml::quantize_row_q8_k(&xs, &mut xq);
        let data = self.weights.data()?;
        let out = qmatrix::matmul_by_four(&data, self.n, &xq, m, ROWS_PER_ITEM, self.dot);
        Tensor::from_vec(out, dims, x.device())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::qmatrix::test_data::{bits, fnv, series, Rng};
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module};

    /// tests/data/ggml_ops.py's K-quant weights: `blocks` super-blocks of
    /// `block_bytes`, byte `i` `(i · 37 + 11) % 256`, then block `b`'s `d`
    /// (f16 at `d_at`) `0x1000 + 97 b` and, with `dmin`, its `dmin` (f16 at
    /// bytes 2..4) `0x1800 + 53 b`.
    pub(crate) fn recorded_weights(
        blocks: usize,
        block_bytes: usize,
        d_at: usize,
        dmin: bool,
    ) -> Vec<u8> {
        let mut raw: Vec<u8> = (0..blocks * block_bytes)
            .map(|i| ((i * 37 + 11) % 256) as u8)
            .collect();
        for (b, block) in raw.chunks_exact_mut(block_bytes).enumerate() {
            block[d_at..d_at + 2].copy_from_slice(&(0x1000 + 97 * b as u16).to_le_bytes());
            if dmin {
                block[2..4].copy_from_slice(&(0x1800 + 53 * b as u16).to_le_bytes());
            }
        }
        raw
    }

    /// A `[n, k]` tensor of `dtype` holding `raw` as its blocks.
    pub(crate) fn qtensor(raw: &[u8], dtype: GgmlDType, n: usize, k: usize) -> Arc<QTensor> {
        let storage = candle_core::quantized::QStorage::from_data(
            std::borrow::Cow::Borrowed(raw),
            &Device::Cpu,
            dtype,
        )
        .unwrap();
        Arc::new(QTensor::new(storage, (n, k)).unwrap())
    }

    /// `nb` super-blocks of random Q8_K activations in ±`act`.
    pub(crate) fn activations(rng: &mut Rng, nb: usize, act: f32) -> Vec<BlockQ8K> {
        let vals: Vec<f32> = (0..nb * QK_K).map(|_| rng.unit() * act).collect();
        let mut y = vec![BlockQ8K::ZERO; nb];
        ggml::quantize_row_q8_k(&vals, &mut y);
        y
    }

    /// `nb` random Q6_K super-blocks (`d` from `scale`, random bits).
    fn blocks(rng: &mut Rng, nb: usize, scale: fn(&mut Rng) -> f32) -> Vec<u8> {
        let mut x = Vec::with_capacity(nb * Q6_K_BYTES);
        for _ in 0..nb {
            x.extend((0..D).map(|_| rng.next() as u8));
            x.extend(half::f16::from_f32(scale(rng)).to_le_bytes());
        }
        x
    }

    #[test]
    fn unpacking_follows_ggmls_layout() {
        let mut xb = vec![0u8; Q6_K_BYTES];
        // Value 0: low nibble 5 of ql[0], high bits 2 (qh[0] bits 0-1): 37 - 32.
        // Value 64 + 1: high nibble of ql[1] (9), bits 4-5 of qh[1] (3): 57 - 32.
        // Value 128 + 32 + 3: low nibble of ql[64 + 32 + 3] (15), qh[32 + 3] bits 2-3 (1).
        xb[0] = 0x05;
        xb[QH] = 0b10;
        xb[1] = 0x90;
        xb[QH + 1] = 0b11_0000;
        xb[99] = 0x0F;
        xb[QH + 35] = 0b0100;
        let v = unpack(&xb);
        assert_eq!(v[0], 5);
        assert_eq!(v[65], 57 - 32);
        assert_eq!(v[163], 31 - 32);
        assert_eq!(v[1], -32);
        assert_eq!(v[255], -32);
    }

    #[test]
    fn the_avx2_dot_equals_the_scalar_one() {
        let (dot, dot4) = best_dot();
        #[cfg(target_arch = "x86_64")]
        if avx2::kernels().is_none() {
            eprintln!("note: no AVX2/FMA/F16C here; the scalar dot alone is tested");
        }
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        type Case = (&'static str, fn(&mut Rng) -> f32, f32);
        let cases: [Case; 4] = [
            ("ordinary", |r| r.unit() * 0.05, 4.0),
            ("tiny scales", |r| r.unit() * 1e-7, 4.0),
            ("f16's largest scales", |r| r.unit() * 6.5e4, 1e-3),
            ("tiny activations", |r| r.unit() * 0.05, 1e-30),
        ];
        for (name, scale, act) in cases {
            for nb in [1, 2, 3, 6] {
                let x = blocks(&mut rng, nb, scale);
                let y = activations(&mut rng, nb, act);
                let (a, b) = (dot(&x, &y), dot_scalar(&x, &y));
                assert!(
                    a.is_finite() && b.is_finite(),
                    "{name}, {nb} blocks: {a} vs {b}"
                );
                assert_eq!(a.to_bits(), b.to_bits(), "{name}, {nb} blocks: {a} vs {b}");
                let others: Vec<_> = (0..3).map(|_| activations(&mut rng, nb, act)).collect();
                let four = dot4(&x, [&y, &others[0], &others[1], &others[2]]);
                assert_eq!(four[0].to_bits(), a.to_bits(), "{name}, {nb} blocks");
                for (k, other) in others.iter().enumerate() {
                    assert_eq!(four[k + 1].to_bits(), dot(&x, other).to_bits());
                    assert_eq!(four[k + 1].to_bits(), dot_scalar(&x, other).to_bits());
                }
                assert_eq!(
                    bits(&dot4_scalar(&x, [&y, &others[0], &others[1], &others[2]])),
                    bits(&four)
                );
            }
        }
    }

    // What ggml computed on the same inputs (tests/data/ggml_ops.py, the
    // AVX-512 build of node-llama-cpp 3.22.1, libggml-cpu-zen4.so, 2 threads):
    // 12 rows of 512 (the script's recorded bytes), times one F32 column
    // (series 19; ggml_vec_dot_q6_K_q8_K) and times five (series 20, its
    // first column series 19's: the same dot product per row).

    #[test]
    fn products_are_ggmls() {
        let dev = Device::Cpu;
        let (n, k) = (12, 512);
        let raw = recorded_weights(24, Q6_K_BYTES, D, false);
        let matrix = Q6KMatrix::new(qtensor(&raw, GgmlDType::Q6K, n, k)).unwrap();
        let one = Tensor::from_vec(series(k, 19, 1.0), (1, k), &dev).unwrap();
        let out = matrix.forward(&one).unwrap().flatten_all().unwrap();
        let out = out.to_vec1::<f32>().unwrap();
        #[rustfmt::skip]
        let ggml = [
            0x4098b59c, 0x4172ec16, 0xc0a75ef0, 0xc107c13e, 0x4103272c, 0xc101d9ac,
            0xc03668c0, 0x4272366c, 0xc13bf008, 0xc28a5b8f, 0x42c2e2ae, 0x41feef62,
        ];
        assert_eq!(bits(&out), ggml);
        let mut x = series(k, 19, 1.0);
        x.extend(series(4 * k, 20, 1.0));
        let five = Tensor::from_vec(x, (5, k), &dev).unwrap();
        let out5 = matrix.forward(&five).unwrap().flatten_all().unwrap();
        let out5 = out5.to_vec1::<f32>().unwrap();
        assert_eq!(fnv(&out5), 0x614d_d9b1_6b4e_dd45);
        assert_eq!(bits(&out5[..n]), ggml);
        // The scalar kernels give the same bits.
        let scalar = Q6KMatrix {
            dot: (dot_scalar, dot4_scalar),
            ..matrix.clone()
        };
        let s5 = scalar.forward(&five).unwrap().flatten_all().unwrap();
        assert_eq!(bits(&s5.to_vec1::<f32>().unwrap()), bits(&out5));
    }

    #[test]
    fn prompt_rows_equal_single_rows_and_candles_product() {
        let mut rng = Rng(7);
        let dev = Device::Cpu;
        // 37 outputs (not a multiple of the items), 1536 inputs (SmolLM2's ffn_down).
        let (n, k) = (37, 1536);
        let w: Vec<f32> = (0..n * k).map(|_| rng.unit() * 0.1).collect();
        let w = Tensor::from_vec(w, (n, k), &dev).unwrap();
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q6K).unwrap());
        let ours = Q6KMatrix::new(q.clone()).unwrap();
        let theirs = QMatMul::from_arc(q).unwrap();
        for m in [1, 3, 4, 7, 9] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.unit()).collect();
            let xt = Tensor::from_vec(x.clone(), (1, m, k), &dev).unwrap();
            let a = ours.forward(&xt).unwrap();
            assert_eq!(a.dims(), &[1, m, n]);
            let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (r, row) in x.chunks_exact(k).enumerate() {
                let alone = Tensor::from_vec(row.to_vec(), (1, k), &dev).unwrap();
                let alone = ours.forward(&alone).unwrap().flatten_all().unwrap();
                assert_eq!(
                    bits(&alone.to_vec1::<f32>().unwrap()),
                    bits(&a[r * n..(r + 1) * n]),
                    "row {r} of {m}"
                );
            }
            let b = theirs.forward(&xt).unwrap();
            let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (i, (a, b)) in a.iter().zip(&b).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-3 + 1e-3 * b.abs(),
                    "output {i} of m={m}: {a} vs {b}"
                );
            }
        }
        // The wrong shape or type is refused.
        assert!(ours
            .forward(&Tensor::zeros((1, 64), candle_core::DType::F32, &dev).unwrap())
            .is_err());
        let q8 = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        assert!(Q6KMatrix::new(Arc::new(q8)).is_err());
    }

    #[test]
    fn lengths_are_checked_before_the_kernel() {
        let mut y = vec![BlockQ8K::ZERO; 2];
        y[0].d = 1.0;
        y[0].qs = [1; QK_K];
        let (dot, dot4) = best_dot();
        let short = vec![0u8; Q6_K_BYTES * 2 - 1];
        let caught = std::panic::catch_unwind(|| dot(&short, &y));
        assert!(caught.is_err(), "a short row must not reach the kernel");
        let full = vec![0u8; Q6_K_BYTES * 2];
        let caught = std::panic::catch_unwind(|| dot4(&full, [&y, &y, &y[..1], &y]));
        assert!(
            caught.is_err(),
            "a short activation row must not reach the kernel"
        );
    }
}
