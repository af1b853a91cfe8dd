//! Exact ports of the ggml CPU operations llama.cpp runs for a llama (the
//! prebuilt `libggml-cpu-zen4.so` of node-llama-cpp 3.22.1, llama.cpp
//! tagged v0.5.0 there, on an AVX-512 CPU): the same arithmetic in the same
//! order with the same roundings, so the same bits. What each one follows is
//! said on it; where the C source leaves a choice to the compiler (GCC 11
//! contracts `a * b + c` into a fused multiply-add with `-ffp-contract=fast`)
//! the choice was read from that library's disassembly.
//!
//! The lanes of ggml's AVX-512 code are written out as arrays of 16 (or 8)
//! values, each fused multiply-add as `mul_add` (one rounding, as
//! `_mm512_fmadd_ps`), and `_mm512_reduce_add_ps` as GCC 11 expands it
//! ([`reduce16`]). Rust never reassociates floating point, so these compute
//! exactly what the intrinsics compute, on any CPU; where the CPU has AVX2 and
//! FMA they are compiled for them (chosen at run time), elsewhere `mul_add` is
//! the C library's `fmaf`: exact, only slower.
//!
//! Two ops depend on llama.cpp's padding of the KV cache (`n_kv`, a multiple
//! of 256 positions, the unused ones masked to probability 0): the softmax
//! sums its exponentials 16 at a time, and the products with the values run
//! over whole vectors. [`soft_max_row`], [`vec_dot_f32`] and [`sgemm_dot_f32`]
//! therefore treat their inputs as padded with zeros (masked scores) to whole
//! vectors, which is what ggml computes on the padded cache.

/// Whether the CPU has AVX2 and FMA: then the kernels below are compiled for
/// them (the results are the same bits either way).
#[cfg(target_arch = "x86_64")]
fn fast() -> bool {
    use std::sync::OnceLock;
    static FAST: OnceLock<bool> = OnceLock::new();
    *FAST.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    })
}

/// Defines `fn $name` running `$body` compiled for AVX2 + FMA when the CPU
/// has them, as plain code otherwise (the same results: see the module).
macro_rules! fma_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) $(-> $r)? {
            #[inline(always)]
            fn body($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            {
                /// # Safety
                /// The CPU must have AVX2 and FMA.
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fma_body($($a: $t),*) $(-> $r)? {
                    body($($a),*)
                }
                if fast() {
                    // SAFETY: the CPU has AVX2 and FMA (detected at run time
                    // by `fast`), all that `fma_body` is compiled for.
                    return unsafe { fma_body($($a),*) };
                }
            }
            body($($a),*)
        }
    };
}

/// `f32::from_bits`, for ggml's hexadecimal float constants.
const fn f(bits: u32) -> f32 {
    f32::from_bits(bits)
}

/// One lane of ggml's AVX-512 `ggml_v_expf` (vec.h, "adapted from arm
/// limited optimized routine"): `e^x` within 1.5 ulp, 0 below about -104,
/// infinity above about 88.4. `_mm512_scalef_ps(j, n)` is `j · 2ⁿ` rounded
/// once: computed in f64 (exact there) and rounded to f32.
#[inline(always)]
pub(crate) fn v_expf(x: f32) -> f32 {
    let r = f(0x4b40_0000); // 0x1.8p23
    let z = x.mul_add(f(0x3fb8_aa3b), r); // 0x1.715476p+0
    let n = z - r;
    // _mm512_fnmadd_ps(a, b, c) = -(a·b) + c, one rounding.
    let b = (-n).mul_add(f(0x35bf_be8e), (-n).mul_add(f(0x3f31_7200), x));
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    let u = b * b;
    let j = f(0x3c07_2010)
        .mul_add(b, f(0x3d2b_9f17))
        .mul_add(u, f(0x3e2a_af33).mul_add(b, f(0x3eff_fedb)));
    let j = j.mul_add(u, f(0x3f7f_fff6).mul_add(b, 1.0));
    if n.is_nan() {
        return j;
    }
    // |n| <= 192, integral: 2ⁿ is exact in f64, and so is j · 2ⁿ.
    let scale = f64::from_bits(((n as i64 + 1023) as u64) << 52);
    (f64::from(j) * scale) as f32
}

/// `_mm512_reduce_add_ps` as GCC 11 expands it (`__MM512_REDUCE_OP`, seen
/// in the library: vextractf64x4, vextractf128, vpermilps 0x4e, vshufps):
/// high 8 + low 8, high 4 + low 4, lanes (0 + 2, 1 + 3), then their sum.
#[inline(always)]
pub(crate) fn reduce16(a: &[f32; 16]) -> f32 {
    let t: [f32; 8] = std::array::from_fn(|i| a[i + 8] + a[i]);
    let t: [f32; 4] = std::array::from_fn(|i| t[i + 4] + t[i]);
    (t[0] + t[2]) + (t[1] + t[3])
}

/// ggml's `hsum_float_8` (x86 quants.c): high 4 + low 4, then (0 + 2) + (1 + 3).
#[inline(always)]
pub(crate) fn hsum8(a: &[f32; 8]) -> f32 {
    let r: [f32; 4] = std::array::from_fn(|i| a[i + 4] + a[i]);
    (r[0] + r[2]) + (r[1] + r[3])
}

fma_dispatch! {
    /// ggml's `ggml_vec_dot_f32` with AVX-512 (GGML_F32_STEP 64, EPR 16):
    /// four accumulators of 16 lanes, element `i` fused into accumulator
    /// `(i / 16) % 4`, lane `i % 16`; then `(a0 + a2) + (a1 + a3)` lane by
    /// lane and [`reduce16`]. `x` and `y` are read as padded with zeros to a
    /// multiple of 64 (ggml itself ends a length that is not with a plain
    /// loop; llama.cpp's lengths here, 64 and the padded `n_kv`, are whole).
    /// This is llama.cpp's `K·Q` (length `head_dim`) and, for one token,
    /// its `V·softmax` (length `n_kv`).
    pub(crate) fn vec_dot_f32(x: &[f32], y: &[f32]) -> f32 {
        assert_eq!(x.len(), y.len(), "vec_dot_f32: lengths");
        let mut sum = [[0f32; 16]; 4];
        let mut xc = x.chunks_exact(64);
        let mut yc = y.chunks_exact(64);
        for (xs, ys) in (&mut xc).zip(&mut yc) {
            for (j, s) in sum.iter_mut().enumerate() {
                for (l, s) in s.iter_mut().enumerate() {
                    *s = xs[16 * j + l].mul_add(ys[16 * j + l], *s);
                }
            }
        }
        let (xr, yr) = (xc.remainder(), yc.remainder());
        if !xr.is_empty() {
            let mut xs = [0f32; 64];
            let mut ys = [0f32; 64];
            xs[..xr.len()].copy_from_slice(xr);
            ys[..yr.len()].copy_from_slice(yr);
            for (j, s) in sum.iter_mut().enumerate() {
                for (l, s) in s.iter_mut().enumerate() {
                    *s = xs[16 * j + l].mul_add(ys[16 * j + l], *s);
                }
            }
        }
        let [a0, a1, a2, a3] = sum;
        let t: [f32; 16] = std::array::from_fn(|l| (a0[l] + a2[l]) + (a1[l] + a3[l]));
        reduce16(&t)
    }
}

fma_dispatch! {
    /// One output of llamafile's tinyBLAS for F32 with AVX-512
    /// (`tinyBLAS<16, __m512, ...>::gemm_bloc`, sgemm.cpp): a single
    /// accumulator of 16 lanes, element `i` fused into lane `i % 16`, then
    /// `hsum` = [`reduce16`]. `x` and `y` are read as padded with zeros to a
    /// multiple of 16 (tinyBLAS declines other lengths). llama.cpp's
    /// `V·softmax` for two or more tokens at once (a prompt) runs here.
    pub(crate) fn sgemm_dot_f32(x: &[f32], y: &[f32]) -> f32 {
        assert_eq!(x.len(), y.len(), "sgemm_dot_f32: lengths");
        let mut acc = [0f32; 16];
        let mut xc = x.chunks_exact(16);
        let mut yc = y.chunks_exact(16);
        for (xs, ys) in (&mut xc).zip(&mut yc) {
            for (l, a) in acc.iter_mut().enumerate() {
                *a = xs[l].mul_add(ys[l], *a);
            }
        }
        for (l, (&xv, &yv)) in xc.remainder().iter().zip(yc.remainder()).enumerate() {
            acc[l] = xv.mul_add(yv, acc[l]);
        }
        reduce16(&acc)
    }
}

fma_dispatch! {
    /// ggml's `soft_max_ext` on one row, in place: `w = x · scale` (the
    /// mask is already in `x`: -∞ where masked, as ggml adds it), `max`,
    /// then `ggml_vec_soft_max_f32` with AVX-512 (exponentials [`v_expf`]
    /// of `w - max` 16 at a time, each 16 summed by [`reduce16`] into an
    /// f64), and every value times `(f32)(1 / sum)`. The row is read as
    /// padded with masked scores to a multiple of 16 (llama.cpp's `n_kv`).
    pub(crate) fn soft_max_row(x: &mut [f32], scale: f32) {
        let mut max = f32::NEG_INFINITY;
        for v in x.iter_mut() {
            *v *= scale;
            // ggml's MAX(max, v): max > v ? max : v.
            max = if max > *v { max } else { *v };
        }
        let mut sum = 0f64;
        for chunk in x.chunks_mut(16) {
            let mut val = [0f32; 16];
            for (val, v) in val.iter_mut().zip(chunk.iter_mut()) {
                *val = v_expf(*v - max);
                *v = *val;
            }
            sum += f64::from(reduce16(&val));
        }
        let inv = (1.0 / sum) as f32;
        for v in x.iter_mut() {
            *v *= inv;
        }
    }
}

/// ggml's scalar `ggml_silu_f32`: `x / (1 + expf(-x))` (the C library's expf).
fn silu_scalar(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

fma_dispatch! {
    /// ggml's `ggml_vec_swiglu_f32` with AVX-512: `silu(x) · g`, 16 at a
    /// time `x / (1 + v_expf(0 - x))` (`ggml_v_silu`); a tail shorter than 16
    /// as ggml's plain loop ([`silu_scalar`]).
    pub(crate) fn swiglu(x: &[f32], g: &[f32], out: &mut [f32]) {
        assert!(x.len() == g.len() && x.len() == out.len(), "swiglu: lengths");
        let whole = x.len() - x.len() % 16;
        for i in 0..whole {
            out[i] = x[i] / (1.0 + v_expf(0.0 - x[i])) * g[i];
        }
        for i in whole..x.len() {
            out[i] = silu_scalar(x[i]) * g[i];
        }
    }
}

/// ggml's `rms_norm` (fused with the multiplication by the weight, or not:
/// the same): squares summed in f64, `mean = (f32)(sum / n)`,
/// `scale = 1 / sqrtf(mean + eps)`, `y = x · scale · w`.
pub(crate) fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    assert!(
        x.len() == w.len() && x.len() == out.len(),
        "rms_norm: lengths"
    );
    let sum: f64 = x.iter().map(|&v| f64::from(v * v)).sum();
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for ((y, &v), &w) in out.iter_mut().zip(x).zip(w) {
        *y = v * scale * w;
    }
}

/// ggml's rope cache for one position (`ggml_rope_cache_init`, no YaRN, no
/// frequency factors): `θ = p`, then per pair `(cos θ, sin θ)` (the C
/// library's, as ggml's `sincosf`) and `θ *= theta_scale`, with
/// `theta_scale = powf(freq_base, -2 / n_dims)`. `n_dims / 2` pairs,
/// interleaved `[cos, sin, cos, sin, ...]` as ggml stores them.
pub(crate) fn rope_cache(p: usize, n_dims: usize, freq_base: f32, out: &mut [f32]) {
    assert_eq!(out.len(), n_dims, "rope_cache: length");
    let theta_scale = freq_base.powf(-2.0 / n_dims as f32);
    let mut theta = p as f32;
    for pair in out.chunks_exact_mut(2) {
        let (sin, cos) = theta.sin_cos();
        pair[0] = cos;
        pair[1] = sin;
        theta *= theta_scale;
    }
}

fma_dispatch! {
    /// ggml's rotation of adjacent pairs (`rotate_pairs`, llama's NORM mode)
    /// of `x` in place by a [`rope_cache`], with the contraction GCC made in
    /// the library: `y0 = fma(x0, cos, -(x1 · sin))`,
    /// `y1 = fma(x0, sin, x1 · cos)` (checked bit for bit against the
    /// library's `ggml_rope_ext`; `x1 · sin` and `x1 · cos` rounded).
    pub(crate) fn rope_norm(x: &mut [f32], cache: &[f32]) {
        assert!(x.len() >= cache.len(), "rope_norm: lengths");
        for (pair, cs) in x.chunks_exact_mut(2).zip(cache.chunks_exact(2)) {
            let (x0, x1) = (pair[0], pair[1]);
            let (cos, sin) = (cs[0], cs[1]);
            pair[0] = x0.mul_add(cos, -(x1 * sin));
            pair[1] = x0.mul_add(sin, x1 * cos);
        }
    }
}

fma_dispatch! {
    /// ggml's NEOX rotation (pairs `(i, i + d/2)`: qwen2), the same
    /// arithmetic as [`rope_norm`] on other pairs (`rotate_pairs` is one
    /// function for both; only NORM was compared with the library).
    pub(crate) fn rope_neox(x: &mut [f32], cache: &[f32]) {
        let half = cache.len() / 2;
        assert!(x.len() >= 2 * half, "rope_neox: lengths");
        for (i, cs) in cache.chunks_exact(2).enumerate() {
            let (x0, x1) = (x[i], x[i + half]);
            let (cos, sin) = (cs[0], cs[1]);
            x[i] = x0.mul_add(cos, -(x1 * sin));
            x[i + half] = x0.mul_add(sin, x1 * cos);
        }
    }
}

/// Values per Q8_0 block.
const QK8_0: usize = 32;
/// Bytes of one Q8_0 block: `d` (f16), then 32 signed bytes.
const Q8_0_BYTES: usize = 34;
/// Output rows per work item of the thread pool.
const ROWS_PER_ITEM: usize = 64;

/// 32 activations quantized as ggml's Q8_0, `d` widened to f32 once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct BlockQ8_0 {
    pub(crate) d: f32,
    pub(crate) qs: [i8; QK8_0],
}

/// ggml's x86 `quantize_row_q8_0` (AVX path): `d = max|x| / 127` (stored
/// as f16), `q = round_half_even(x · (127 / max|x|))`.
pub(crate) fn quantize_row_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    assert_eq!(x.len(), out.len() * QK8_0, "quantize_row_q8_0: lengths");
    for (xs, block) in x.chunks_exact(QK8_0).zip(out.iter_mut()) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        for (q, &v) in block.qs.iter_mut().zip(xs) {
            *q = (v * id).round_ties_even() as i8;
        }
        block.d = half::f16::from_f32(d).to_f32();
    }
}

/// Values per K-quant super-block (ggml's `QK_K`).
pub(crate) const QK_K: usize = 256;

/// 256 activations quantized as ggml's Q8_K (`block_q8_K`): `d` (f32),
/// the quants, and `bsums[j]` the sum of quants `16j..16j + 16`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct BlockQ8K {
    pub(crate) d: f32,
    pub(crate) qs: [i8; QK_K],
    pub(crate) bsums: [i16; QK_K / 16],
}

impl BlockQ8K {
    /// An all-zero block (what ggml writes for all-zero activations).
    pub(crate) const ZERO: BlockQ8K = BlockQ8K {
        d: 0.0,
        qs: [0; QK_K],
        bsums: [0; QK_K / 16],
    };
}

/// ggml's `nearest_int`: `fval` rounded half to even through the float
/// trick (`fval + 1.5 · 2²³`, then the low mantissa bits), for
/// `|fval| <= 4194303`.
fn nearest_int(fval: f32) -> i32 {
    let val = fval + 12_582_912.0;
    (val.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// ggml's `quantize_row_q8_K` (on x86 its reference C,
/// `quantize_row_q8_K_ref`: the AVX-512 library jumps there): `max` the
/// first value of largest magnitude, `iscale = -127 / max`, quant
/// `min(127, nearest_int(iscale · x))`, `d = 1 / iscale`; an all-zero block
/// is `d = 0` and zero quants.
pub(crate) fn quantize_row_q8_k(x: &[f32], out: &mut [BlockQ8K]) {
    assert_eq!(x.len(), out.len() * QK_K, "quantize_row_q8_K: lengths");
    for (xs, block) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let (mut max, mut amax) = (0f32, 0f32);
        for &v in xs {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            *block = BlockQ8K::ZERO;
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in block.qs.iter_mut().zip(xs) {
            *q = nearest_int(iscale * v).min(127) as i8;
        }
        for (sum, qs) in block.bsums.iter_mut().zip(block.qs.chunks_exact(16)) {
            *sum = qs.iter().map(|&q| i16::from(q)).sum();
        }
        block.d = 1.0 / iscale;
    }
}

/// The f16 at `bytes[0..2]` (little-endian), as f32.
fn f16_le(bytes: &[u8]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([bytes[0], bytes[1]])).to_f32()
}

/// A Q8_0 row (bytes) times a Q8_0 row of as many blocks.
type DotQ8_0 = fn(&[u8], &[BlockQ8_0]) -> f32;

/// ggml's x86 `ggml_vec_dot_q8_0_q8_0` (AVX2 path, as the AVX-512 build
/// runs it) without SIMD: 8 lanes, lane `l` of block `i` the integer sum of
/// products `4l..4l + 4`, fused into lane `l` times `d_x · d_y`; then
/// [`hsum8`].
fn dot_q8_0_scalar(x: &[u8], y: &[BlockQ8_0]) -> f32 {
    assert_eq!(x.len(), y.len() * Q8_0_BYTES, "dot_q8_0_q8_0: lengths");
    let mut acc = [0f32; 8];
    for (xb, yb) in x.chunks_exact(Q8_0_BYTES).zip(y) {
        let d = f16_le(xb) * yb.d;
        let qs = &xb[2..];
        for (l, acc) in acc.iter_mut().enumerate() {
            let sum: i32 = (4 * l..4 * l + 4)
                .map(|b| i32::from(qs[b] as i8) * i32::from(yb.qs[b]))
                .sum();
            *acc = d.mul_add(sum as f32, *acc);
        }
    }
    hsum8(&acc)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BlockQ8_0, DotQ8_0, Q8_0_BYTES};
    use std::arch::x86_64::*;

    /// [`super::dot_q8_0_scalar`] with AVX2, if this CPU has AVX2, FMA and
    /// F16C. The CPU is checked here, once per matrix, not per call: the safe
    /// function below can be reached only through what this returns.
    pub(super) fn kernel() -> Option<DotQ8_0> {
        fn dot(x: &[u8], y: &[BlockQ8_0]) -> f32 {
            // The kernel reads exactly y.len() blocks of both.
            assert_eq!(x.len(), y.len() * Q8_0_BYTES, "dot_q8_0_q8_0: lengths");
            // SAFETY: `dot` is named only in `kernel`, which returns it only
            // once the CPU showed AVX2, FMA and F16C; lengths checked above.
            unsafe { dot_avx2(x, y) }
        }

        if !(super::fast() && std::arch::is_x86_feature_detected!("f16c")) {
            return None;
        }
        Some(dot)
    }

    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; `x.len() == y.len() * 34`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_avx2(x: &[u8], y: &[BlockQ8_0]) -> f32 {
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        for (i, yb) in y.iter().enumerate() {
            // SAFETY: block i is x[34 i .. 34 i + 34], inside x (checked by the caller).
            let xb = x.as_ptr().add(i * Q8_0_BYTES);
            let dx = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
                std::ptr::read_unaligned(xb as *const u16),
            ))));
            let d = _mm256_set1_ps(dx * yb.d);
            // SAFETY: the block's 32 quants at bytes 2..34; yb.qs is 32 bytes.
            let qx = _mm256_loadu_si256(xb.add(2) as *const __m256i);
            let qy = _mm256_loadu_si256(yb.qs.as_ptr() as *const __m256i);
            // ggml's mul_sum_i8_pairs_float: |x| times y signed as x, in
            // pairs (at most 2 · 128 · 127: no saturation), then in fours.
            let ax = _mm256_sign_epi8(qx, qx);
            let sy = _mm256_sign_epi8(qy, qx);
            let q = _mm256_cvtepi32_ps(_mm256_madd_epi16(ones, _mm256_maddubs_epi16(ax, sy)));
            acc = _mm256_fmadd_ps(d, q, acc);
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        super::hsum8(&lanes)
    }
}

/// The fastest Q8_0 dot product this CPU runs (the same bits either way).
fn best_dot_q8_0() -> DotQ8_0 {
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(dot) = avx2::kernel() {
            return dot;
        }
    }
    dot_q8_0_scalar
}

/// A Q8_0 weight matrix `[n, k]` multiplied as ggml multiplies it: the
/// activations quantized by [`quantize_row_q8_0`], each output one
/// `ggml_vec_dot_q8_0_q8_0` (SmolLM2's tied output layer).
#[derive(Debug, Clone)]
pub(crate) struct Q8_0Matrix {
    weights: std::sync::Arc<candle_core::quantized::QTensor>,
    n: usize,
    k: usize,
    dot: DotQ8_0,
}

impl Q8_0Matrix {
    /// Wraps a Q8_0 tensor of shape `[n, k]` held in CPU memory.
    pub(crate) fn new(
        weights: std::sync::Arc<candle_core::quantized::QTensor>,
    ) -> candle_core::Result<Self> {
        let (n, k) = crate::qmatrix::check_weights(
            "Q8_0Matrix",
            &weights,
            candle_core::quantized::GgmlDType::Q8_0,
            QK8_0,
            Q8_0_BYTES,
        )?;
        Ok(Q8_0Matrix {
            weights,
            n,
            k,
            dot: best_dot_q8_0(),
        })
    }

    /// `x · Wᵀ` for `x` of shape `[…, k]`: shape `[…, n]`, F32.
    pub(crate) fn forward(
        &self,
        x: &candle_core::Tensor,
    ) -> candle_core::Result<candle_core::Tensor> {
        let (xs, dims) = crate::qmatrix::activations("Q8_0Matrix", x, self.n, self.k)?;
        let m = xs.len() / self.k;
        let kb = self.k / QK8_0;
        let zero = BlockQ8_0 {
            d: 0.0,
            qs: [0; QK8_0],
        };
        let mut xq = vec![zero; m * kb];
        quantize_row_q8_0(&xs, &mut xq);
        let w = self.weights.data()?;
        let row_bytes = kb * Q8_0_BYTES;
        let dot = self.dot;
        let out = crate::qmatrix::by_weight_rows(self.n, m, ROWS_PER_ITEM, |c, col| {
            let wrow = &w[c * row_bytes..(c + 1) * row_bytes];
            for (r, out) in col.iter_mut().enumerate() {
                *out = dot(wrow, &xq[r * kb..(r + 1) * kb]);
            }
        });
        candle_core::Tensor::from_vec(out, dims, x.device())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmatrix::test_data::{bits, fnv, series};

    // The values below are what ggml computed on the same inputs: the AVX-512
    // build of node-llama-cpp 3.22.1 (libggml-cpu-zen4.so), each op run alone
    // by executors/candle/tests/data/ggml_ops.py (2 threads). Any other
    // rounding anywhere changes them.

    #[test]
    fn q8_k_quantization_is_ggmls() {
        // Three super-blocks of series 17: as is, times -3, and all zero.
        let mut x = series(768, 17, 1.0);
        for v in &mut x[256..512] {
            *v = (f64::from(*v) * -3.0) as f32;
        }
        x[512..].fill(0.0);
        let mut y = vec![BlockQ8K::ZERO; 3];
        quantize_row_q8_k(&x, &mut y);
        let mut raw = Vec::new();
        for b in &y {
            raw.extend(b.d.to_le_bytes());
            raw.extend(b.qs.iter().map(|&q| q as u8));
            raw.extend(b.bsums.iter().flat_map(|s| s.to_le_bytes()));
        }
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for b in raw {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        assert_eq!(h, 0x6001_3559_ec25_7100);
        // nearest_int rounds halves to even, as round_ties_even.
        for v in [0.5f32, 1.5, 2.5, -0.5, -1.5, 126.5, -127.0, 3.49] {
            assert_eq!(nearest_int(v), v.round_ties_even() as i32, "{v}");
        }
    }

    #[test]
    fn rms_norm_is_ggmls() {
        let mut out = vec![0f32; 64];
        rms_norm_row(&series(64, 0, 1.0), &series(64, 1, 0.5), 1e-5, &mut out);
        assert_eq!(fnv(&out), 0x6cf9_1186_4541_66d9);
    }

    #[test]
    fn swiglu_is_ggmls() {
        let mut out = vec![0f32; 32];
        swiglu(&series(32, 2, 3.0), &series(32, 3, 1.0), &mut out);
        #[rustfmt::skip]
        let ggml = [
            0x3cf4c46f, 0x4122647a, 0x4106c399, 0x40db3311, 0x40adce10, 0x40856133, 0x404403e2, 0x4007ae7d,
            0x3fac6a94, 0x3f406563, 0x3ead00a6, 0x3dc9d5a0, 0x3bc741db, 0x3c549e4f, 0x3d847ab6, 0x3df1ce23,
            0x3e1ad995, 0x3e245315, 0x3e1b3855, 0x3e07a033, 0x3de055d9, 0x3db23374, 0x3d8949d6, 0x3d4e8a73,
            0x3d186a37, 0x4136efc5, 0x41199a23, 0x40fd780a, 0x40cca957, 0x40a0cb8a, 0x4073d5d5, 0x403043c3,
        ];
        assert_eq!(bits(&out), ggml);
        // silu through libm's expf differs somewhere: the fast path is not libm.
        let plain: Vec<f32> = series(32, 2, 3.0)
            .iter()
            .zip(series(32, 3, 1.0))
            .map(|(&x, g)| silu_scalar(x) * g)
            .collect();
        assert_ne!(bits(&plain), ggml);
    }

    #[test]
    fn soft_max_is_ggmls() {
        let mut rows = series(64, 4, 8.0);
        for (r, row) in rows.chunks_mut(32).enumerate() {
            for v in &mut row[20 + 7 * r..] {
                *v = f32::NEG_INFINITY;
            }
            soft_max_row(row, 0.125);
            assert!(row[20 + 7 * r..].iter().all(|&p| p == 0.0));
        }
        assert_eq!(fnv(&rows), 0xf598_3266_a79f_239e);
    }

    #[test]
    fn rope_is_ggmls() {
        let mut x = series(128, 5, 1.0);
        let mut cache = vec![0f32; 64];
        for (head, p) in x.chunks_mut(64).zip([1, 300]) {
            // Opaque inputs: on constants the compiler folds sin, cos and powf
            // itself (not as the C library's sinf), which a model never runs.
            let (p, base) = std::hint::black_box((p, 100000.0));
            rope_cache(p, 64, base, &mut cache);
            rope_norm(head, &cache);
        }
        assert_eq!(fnv(&x), 0x995e_1732_1908_4d84);
    }

    #[test]
    fn f32_products_are_ggmls() {
        let (a, b) = (series(256, 6, 1.0), series(64, 7, 1.0));
        let out: Vec<f32> = a.chunks(64).map(|row| vec_dot_f32(row, &b)).collect();
        assert_eq!(bits(&out), [0x42a92aa6, 0xc2214845, 0x412f5a53, 0xc0bebaf1]);
        let (a, b) = (series(1024, 8, 1.0), series(256, 9, 1.0));
        let out: Vec<f32> = a.chunks(256).map(|row| vec_dot_f32(row, &b)).collect();
        assert_eq!(bits(&out), [0x43adca90, 0xc3046852, 0xc2829646, 0x43160f7c]);
        // tinyBLAS: 16 rows by two columns, column-major.
        let (a, b) = (series(1024, 10, 1.0), series(128, 11, 1.0));
        let out: Vec<f32> = b
            .chunks(64)
            .flat_map(|col| {
                a.chunks(64)
                    .map(|row| sgemm_dot_f32(row, col))
                    .collect::<Vec<_>>()
            })
            .collect();
        #[rustfmt::skip]
        let ggml = [
            0x42a980a2, 0xc2211bb4, 0x41312168, 0xc124b2b8, 0xc1e49f94, 0x427ddcf8, 0xc2287d70, 0x41bb254e,
            0xc1a4812c, 0xc1b0b2ea, 0x42307f56, 0xc2281883, 0x42140c10, 0xc1e71bac, 0xc164d013, 0x41d5d0b6,
            0xc220fbda, 0x42bb0282, 0xc214cd10, 0x413cc707, 0xc0d4d164, 0xc20e6a33, 0x428b2c9d, 0xc221b024,
            0x41dba798, 0xc17b44e4, 0xc1e823c8, 0x423e7418, 0xc2296420, 0x42343c7e, 0xc1bbb258, 0xc1a3e5da,
        ];
        assert_eq!(bits(&out), ggml);
        // The two orders differ (the first row's dot products above).
        assert_ne!(out[0].to_bits(), 0x42a92aa6);
    }

    #[test]
    fn q8_0_products_are_ggmls() {
        // 4 rows of 2 blocks: d = f16 bits 0x2000 + 97 (4r + b), quant j of
        // the row = ((64 r + j) · 37) % 255 - 127.
        let mut w = Vec::new();
        for r in 0..4usize {
            for b in 0..2usize {
                w.extend_from_slice(&(0x2000u16 + 97 * (4 * r + b) as u16).to_le_bytes());
                w.extend(
                    (0..32).map(|j| ((((r * 64 + 32 * b + j) * 37) % 255) as i32 - 127) as u8),
                );
            }
        }
        let zero = BlockQ8_0 {
            d: 0.0,
            qs: [0; QK8_0],
        };
        let mut xq = [zero; 2];
        quantize_row_q8_0(&series(64, 12, 1.0), &mut xq);
        let want = [0x3ff8aff1, 0x40809450, 0xbe393b60, 0xc17095aa];
        for dot in [best_dot_q8_0(), dot_q8_0_scalar] {
            let out: Vec<f32> = w.chunks(2 * Q8_0_BYTES).map(|row| dot(row, &xq)).collect();
            assert_eq!(bits(&out), want);
        }
        // By two columns, series 12 then 16, ggml takes tinyBLAS, which sums
        // each output as the dot product does: the same bits.
        let mut xq2 = [zero; 2];
        quantize_row_q8_0(&series(64, 16, 1.0), &mut xq2);
        let out: Vec<f32> = w
            .chunks(2 * Q8_0_BYTES)
            .map(|row| best_dot_q8_0()(row, &xq2))
            .collect();
        assert_eq!(bits(&out), [0x3ff7c3c1, 0x40804350, 0xbe62a700, 0xc1702fe0]);
    }

    #[test]
    fn expf_is_close_to_libms_and_saturates_as_ggmls() {
        for i in -1000..1000 {
            let x = i as f32 * 0.0871;
            let (a, b) = (v_expf(x), x.exp());
            assert!((a - b).abs() <= b * 4e-7, "{x}: {a} vs {b}");
        }
        assert_eq!(v_expf(0.0), 1.0);
        assert_eq!(v_expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(v_expf(-200.0), 0.0);
        assert_eq!(v_expf(100.0), f32::INFINITY);
        // Below the normal range the result is rounded once (scalef).
        assert!(v_expf(-95.0) > 0.0 && v_expf(-95.0) < f32::MIN_POSITIVE);
    }

    #[test]
    fn the_reductions_follow_gccs_lanes() {
        // Lanes whose sum depends on the order: 1e8 cancels only in the right pairs.
        let mut a = [0f32; 16];
        a[0] = 1e8;
        a[8] = -1e8;
        a[1] = 1.0;
        assert_eq!(reduce16(&a), 1.0);
        let mut b = [0f32; 8];
        b[0] = 1e8;
        b[4] = -1e8;
        b[2] = 0.5;
        assert_eq!(hsum8(&b), 0.5);
    }
}
