//! A Q4_K matrix product for the CPU, as llama.cpp's CPU library computes
//! it: the activations quantized to Q8_K ([`ggml::quantize_row_q8_k`]) and
//! each output one Q4_K × Q8_K dot product, in one of two arithmetics:
//!
//! - a matrix of a multiple of 8 rows (every Q4_K matrix of a real model)
//!   is what llama.cpp puts in its CPU "repack" buffer on an AVX2 machine
//!   (`ggml_repack_get_optimal_repack_type`: `q4_K_8x8_q8_K`, eight rows
//!   interleaved as `block_q4_Kx8`), multiplied by `ggml_gemv_q4_K_8x8_q8_K`
//!   for one activation row and `ggml_gemm_q4_K_8x8_q8_K` (its AVX-512 code
//!   on this CPU) for four at a time. Both keep one lane per weight row and
//!   activation row, the integer sums `Σ scale · q · y` and `Σ min · bsum`
//!   exact, each fused into its own accumulator times `d_x · d_y` and
//!   `dmin_x · d_y`, the output the first accumulator minus the second; the
//!   gemv fuses once per super-block, the gemm once per pair of 32-value
//!   sub-blocks ([`repacked_scalar`]). llama.cpp runs the gemm on a
//!   prompt's activation rows in fours from the first and the gemv on the
//!   last `m % 4`: exactly how [`qmatrix::matmul_by_four`] calls `dot4` and
//!   `dot`, so here `dot4` is the gemm's arithmetic and `dot` the gemv's (a
//!   row in a four does not get the bits it gets alone, as in llama.cpp).
//!   The test below checks ggml's own repacked results for one, five and
//!   eight activation rows.
//! - any other matrix stays in ggml's plain layout and runs the x86
//!   `ggml_vec_dot_q4_K_q8_K` (its AVX2 code, 8 lanes and 4 for the mins:
//!   the AVX-512 build has no other), per row and column for a prompt too
//!   (tinyBLAS takes no K-quants on x86) ([`dot_plain_scalar`]).
//!
//! Each has AVX2 code (with FMA and F16C) and a plain loop with the same
//! bits; the weights are read in ggml's plain layout either way (repacking
//! reorders bytes, not arithmetic).

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, Tensor};

use crate::ggml::{self, BlockQ8K, QK_K};
use crate::qmatrix::{self, Dot, Dot4};

/// Bytes of one Q4_K super-block (`block_q4_K`): `d` and `dmin` (f16),
/// 12 bytes of 6-bit scales and mins for its eight 32-value sub-blocks,
/// then 128 bytes of nibbles (sub-block `2j` the low nibbles of bytes
/// `32j..32j + 32`, sub-block `2j + 1` their high ones). Value =
/// `d · scale · q − dmin · min`.
const Q4_K_BYTES: usize = 144;
/// Where the nibbles start in a super-block.
const QS: usize = 16;
/// Output rows per work item of the thread pool.
const ROWS_PER_ITEM: usize = 16;

/// The f16 at `bytes[0..2]` (little-endian), as f32.
fn f16_le(bytes: &[u8]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([bytes[0], bytes[1]])).to_f32()
}

/// The eight scales and eight mins of a super-block (ggml's
/// `get_scale_min_k4`, equal to the `utmp` shuffle of its x86 code).
pub(crate) fn scales_mins(xb: &[u8]) -> ([u8; 8], [u8; 8]) {
    let q = &xb[4..16];
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..8 {
        if j < 4 {
            sc[j] = q[j] & 63;
            mn[j] = q[j + 4] & 63;
        } else {
            sc[j] = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
            mn[j] = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
        }
    }
    (sc, mn)
}

/// The 256 nibbles of a super-block in value order.
fn unpack(xb: &[u8]) -> [u8; QK_K] {
    let qs = &xb[QS..Q4_K_BYTES];
    std::array::from_fn(|v| {
        let (j, half, l) = (v / 64, (v % 64) / 32, v % 32);
        let byte = qs[32 * j + l];
        if half == 0 {
            byte & 0x0F
        } else {
            byte >> 4
        }
    })
}

/// `Σ min · (bsums of its sub-block)` over sub-blocks `subs`: what the mins
/// take off, as integers.
fn min_sum(mn: &[u8; 8], yb: &BlockQ8K, subs: std::ops::Range<usize>) -> i32 {
    subs.map(|s| {
        let bsum = i32::from(yb.bsums[2 * s]) + i32::from(yb.bsums[2 * s + 1]);
        i32::from(mn[s]) * bsum
    })
    .sum()
}

/// The repacked product without SIMD, one activation row: ggml's
/// `ggml_gemv_q4_K_8x8_q8_K` (`GEMM` false: per super-block one
/// `acc = fma(Σ scale · q · y, d_x · d_y, acc)` and one
/// `acc_min = fma(Σ min · bsum, dmin_x · d_y, acc_min)`) or one row of
/// `ggml_gemm_q4_K_8x8_q8_K` (`GEMM` true: the same per pair of 32-value
/// sub-blocks, four of each per super-block); the integers exact, each
/// product rounded; then `acc − acc_min`.
fn repacked_scalar<const GEMM: bool>(x: &[u8], y: &[BlockQ8K]) -> f32 {
    assert_eq!(x.len(), y.len() * Q4_K_BYTES, "gemv_q4_K_q8_K: lengths");
    let (mut acc, mut acc_min) = (0f32, 0f32);
    for (xb, yb) in x.chunks_exact(Q4_K_BYTES).zip(y) {
        let (sc, mn) = scales_mins(xb);
        let q = unpack(xb);
        let (d, dmin) = (f16_le(xb) * yb.d, f16_le(&xb[2..]) * yb.d);
        let (mut isum, mut imin) = (0i32, 0i32);
        for pair in 0..4 {
            for s in [2 * pair, 2 * pair + 1] {
                let sub: i32 = (32 * s..32 * s + 32)
                    .map(|v| i32::from(q[v]) * i32::from(yb.qs[v]))
                    .sum();
                isum += i32::from(sc[s]) * sub;
                let bsum = i32::from(yb.bsums[2 * s]) + i32::from(yb.bsums[2 * s + 1]);
                imin += i32::from(mn[s]) * bsum;
            }
            if GEMM {
                acc = (isum as f32).mul_add(d, acc);
                acc_min = (imin as f32).mul_add(dmin, acc_min);
                (isum, imin) = (0, 0);
            }
        }
        if !GEMM {
            acc = (isum as f32).mul_add(d, acc);
            acc_min = (imin as f32).mul_add(dmin, acc_min);
        }
    }
    acc - acc_min
}

/// [`Dot`] without SIMD for a repacked matrix: the gemv's arithmetic.
fn dot_repacked_scalar(x: &[u8], y: &[BlockQ8K]) -> f32 {
    repacked_scalar::<false>(x, y)
}

/// ggml's x86 `ggml_vec_dot_q4_K_q8_K` (AVX2 path) without SIMD: 8 lanes,
/// lane `l` of super-block `i` the sum over its sub-blocks of scale ×
/// products `4l..4l + 4`, fused into lane `l` times `d = d_y · d_x`; 4 lanes
/// for the mins, lane `u` `min[2u] · bsum[2u] + min[2u + 1] · bsum[2u + 1]`
/// (bsum of a 32-value sub-block) fused times `dmin = −d_y · dmin_x`; then
/// [`ggml::hsum8`] plus `(m0 + m2) + (m1 + m3)`.
fn dot_plain_scalar(x: &[u8], y: &[BlockQ8K]) -> f32 {
    assert_eq!(x.len(), y.len() * Q4_K_BYTES, "dot_q4_K_q8_K: lengths");
    let mut acc = [0f32; 8];
    let mut acc_m = [0f32; 4];
    for (xb, yb) in x.chunks_exact(Q4_K_BYTES).zip(y) {
        let d = yb.d * f16_le(xb);
        let dmin = -yb.d * f16_le(&xb[2..]);
        let (sc, mn) = scales_mins(xb);
        let q = unpack(xb);
        for (u, acc_m) in acc_m.iter_mut().enumerate() {
            let bsum = |s: usize| i32::from(yb.bsums[2 * s]) + i32::from(yb.bsums[2 * s + 1]);
            let prod =
                i32::from(mn[2 * u]) * bsum(2 * u) + i32::from(mn[2 * u + 1]) * bsum(2 * u + 1);
            *acc_m = dmin.mul_add(prod as f32, *acc_m);
        }
        for (l, acc) in acc.iter_mut().enumerate() {
            let mut sum = 0i32;
            for (s, &scale) in sc.iter().enumerate() {
                let part: i32 = (32 * s + 4 * l..32 * s + 4 * l + 4)
                    .map(|v| i32::from(q[v]) * i32::from(yb.qs[v]))
                    .sum();
                sum += i32::from(scale) * part;
            }
            *acc = d.mul_add(sum as f32, *acc);
        }
    }
    let m = (acc_m[0] + acc_m[2]) + (acc_m[1] + acc_m[3]);
    ggml::hsum8(&acc) + m
}

/// [`Dot4`] without SIMD for a repacked matrix: four rows of the gemm
/// (llama.cpp runs its gemm on the activation rows in fours, from the
/// first, and its gemv on the last `m % 4`, as [`qmatrix::matmul_by_four`]
/// runs `dot4` and `dot`).
fn dot4_repacked_scalar(x: &[u8], ys: [&[BlockQ8K]; 4]) -> [f32; 4] {
    ys.map(|y| repacked_scalar::<true>(x, y))
}

/// [`Dot4`] without SIMD: four [`dot_plain_scalar`]s.
fn dot4_plain_scalar(x: &[u8], ys: [&[BlockQ8K]; 4]) -> [f32; 4] {
    ys.map(|y| dot_plain_scalar(x, y))
}

/// The fastest dot products this CPU runs for a matrix of `n` rows: the
/// repacked arithmetic when llama.cpp would repack it (`n % 8 == 0`), the
/// plain one otherwise (the same bits as the scalar code either way).
fn best_dot(n: usize) -> (Dot<BlockQ8K>, Dot4<BlockQ8K>) {
    let repacked = n % 8 == 0;
    #[cfg(target_arch = "x86_64")]
    {
        if let Some((repack, plain)) = avx2::kernels() {
            return if repacked { repack } else { plain };
        }
    }
    if repacked {
        (dot_repacked_scalar, dot4_repacked_scalar)
    } else {
        (dot_plain_scalar, dot4_plain_scalar)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{scales_mins, BlockQ8K, Dot, Dot4, Q4_K_BYTES, QS};
    use std::arch::x86_64::*;

    type Kernels = (Dot<BlockQ8K>, Dot4<BlockQ8K>);

    /// The repacked and the plain kernels with AVX2, if this CPU has AVX2,
    /// FMA and F16C. The CPU is checked here, once per matrix, not per
    /// call: the safe functions below can be reached only through what
    /// this returns.
    pub(super) fn kernels() -> Option<(Kernels, Kernels)> {
        fn check(x: &[u8], y: &[BlockQ8K]) {
            // The kernels read exactly y.len() super-blocks of both.
            assert_eq!(x.len(), y.len() * Q4_K_BYTES, "dot_q4_K_q8_K: lengths");
        }
        fn dot_repacked(x: &[u8], y: &[BlockQ8K]) -> f32 {
            check(x, y);
            // SAFETY: named only in `kernels`, which returns it only once
            // the CPU has shown AVX2, FMA and F16C; lengths checked above.
            unsafe { repacked_avx2::<1, false>(x, [y])[0] }
        }
        fn dot4_repacked(x: &[u8], ys: [&[BlockQ8K]; 4]) -> [f32; 4] {
            for y in ys {
                check(x, y);
            }
            // SAFETY: as in `dot_repacked`.
            unsafe { repacked_avx2::<4, true>(x, ys) }
        }
        fn dot_plain(x: &[u8], y: &[BlockQ8K]) -> f32 {
            check(x, y);
            // SAFETY: as in `dot_repacked`.
            unsafe { dot_plain_avx2(x, y) }
        }
        fn dot4_plain(x: &[u8], ys: [&[BlockQ8K]; 4]) -> [f32; 4] {
            for y in ys {
                check(x, y);
            }
            // SAFETY: as in `dot_repacked`.
            ys.map(|y| unsafe { dot_plain_avx2(x, y) })
        }

        if !(std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c"))
        {
            return None;
        }
        let repacked: Kernels = (dot_repacked, dot4_repacked);
        let plain: Kernels = (dot_plain, dot4_plain);
        Some((repacked, plain))
    }

    /// The f16 at `p` as f32.
    ///
    /// # Safety
    /// The CPU must have F16C; `p` points at 2 readable bytes.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn f16_at(p: *const u8) -> f32 {
        // SAFETY: two bytes at p (unaligned read).
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
            std::ptr::read_unaligned(p as *const u16),
        ))))
    }

    /// The nibbles of sub-blocks `2j` (low) and `2j + 1` (high).
    ///
    /// # Safety
    /// The CPU must have AVX2; `xb` points at 144 readable bytes; `j < 4`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn nibbles(xb: *const u8, j: usize) -> (__m256i, __m256i) {
        let m4 = _mm256_set1_epi8(0x0F);
        // SAFETY: qs[32j .. 32j + 32] inside the super-block.
        let bits = _mm256_loadu_si256(xb.add(QS + 32 * j) as *const __m256i);
        (
            _mm256_and_si256(bits, m4),
            _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4),
        )
    }

    /// The sum of the 8 `i32` lanes (exact: wrapping adds of integers that
    /// fit).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn hsum_i32(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        _mm_cvtsi128_si32(s)
    }

    /// [`super::repacked_scalar`] for `R` activation rows at once, the
    /// weight row unpacked once: the same integers (exact in any order) and
    /// the same fused sums per row.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C, and `x.len()` must be
    /// `y.len() * 144` for every row `y` of `ys`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn repacked_avx2<const R: usize, const GEMM: bool>(
        x: &[u8],
        ys: [&[BlockQ8K]; R],
    ) -> [f32; R] {
        let mut acc = [0f32; R];
        let mut acc_min = [0f32; R];
        for (i, block) in x.chunks_exact(Q4_K_BYTES).enumerate() {
            let xb = block.as_ptr();
            // SAFETY: bytes 0..2 and 2..4 of the super-block.
            let (dx, dminx) = (f16_at(xb), f16_at(xb.add(2)));
            let (sc, mn) = scales_mins(block);
            let mut sums = [_mm256_setzero_si256(); R];
            let d: [f32; R] = std::array::from_fn(|r| dx * ys[r][i].d);
            let dmin: [f32; R] = std::array::from_fn(|r| dminx * ys[r][i].d);
            for j in 0..4 {
                // SAFETY: j < 4, inside the super-block.
                let (lo, hi) = nibbles(xb, j);
                let s_lo = _mm256_set1_epi16(i16::from(sc[2 * j]));
                let s_hi = _mm256_set1_epi16(i16::from(sc[2 * j + 1]));
                for (y, sum) in ys.iter().zip(sums.iter_mut()) {
                    // Bounds-checked: every row has as many blocks (checked by the caller).
                    let q8 = y[i].qs.as_ptr();
                    // SAFETY: qs[64j .. 64j + 64] of its 256.
                    let y_lo = _mm256_loadu_si256(q8.add(64 * j) as *const __m256i);
                    let y_hi = _mm256_loadu_si256(q8.add(64 * j + 32) as *const __m256i);
                    // Nibble times byte in pairs: at most 2 · 15 · 127, no saturation.
                    let p_lo = _mm256_madd_epi16(s_lo, _mm256_maddubs_epi16(lo, y_lo));
                    let p_hi = _mm256_madd_epi16(s_hi, _mm256_maddubs_epi16(hi, y_hi));
                    *sum = _mm256_add_epi32(*sum, _mm256_add_epi32(p_lo, p_hi));
                }
                if GEMM {
                    for r in 0..R {
                        let isum = hsum_i32(sums[r]);
                        acc[r] = (isum as f32).mul_add(d[r], acc[r]);
                        let imin = super::min_sum(&mn, &ys[r][i], 2 * j..2 * j + 2);
                        acc_min[r] = (imin as f32).mul_add(dmin[r], acc_min[r]);
                        sums[r] = _mm256_setzero_si256();
                    }
                }
            }
            if !GEMM {
                for r in 0..R {
                    let isum = hsum_i32(sums[r]);
                    acc[r] = (isum as f32).mul_add(d[r], acc[r]);
                    let imin = super::min_sum(&mn, &ys[r][i], 0..8);
                    acc_min[r] = (imin as f32).mul_add(dmin[r], acc_min[r]);
                }
            }
        }
        std::array::from_fn(|r| acc[r] - acc_min[r])
    }

    /// ggml's `get_scale_shuffle_k4(i)`: the 16-bit scale `i` in every lane.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn scale_k4(scales: __m256i, i: usize) -> __m256i {
        let (a, b) = ((2 * i) as u8, (2 * i + 1) as u8);
        let pair = i64::from_ne_bytes([a, b, a, b, a, b, a, b]);
        _mm256_shuffle_epi8(scales, _mm256_set1_epi64x(pair))
    }

    /// ggml's AVX2 `ggml_vec_dot_q4_K_q8_K`.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C, and `x.len()` must be
    /// `y.len() * 144`: super-block `i` reads `x[144 i .. 144 i + 144]` and
    /// `y[i]` only.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_plain_avx2(x: &[u8], y: &[BlockQ8K]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut acc_m = _mm_setzero_ps();
        for (i, yb) in y.iter().enumerate() {
            // SAFETY: i < y.len(), so the super-block is inside x (checked by the caller).
            let block = std::slice::from_raw_parts(x.as_ptr().add(i * Q4_K_BYTES), Q4_K_BYTES);
            let xb = block.as_ptr();
            let d = yb.d * f16_at(xb);
            let dmin = -yb.d * f16_at(xb.add(2));
            let (sc, mn) = scales_mins(block);
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(&sc);
            bytes[8..].copy_from_slice(&mn);
            // SAFETY: 16 bytes; bsums is 16 i16 = 32 bytes.
            let mins_and_scales =
                _mm256_cvtepu8_epi16(_mm_loadu_si128(bytes.as_ptr() as *const __m128i));
            let q8sums = _mm256_loadu_si256(yb.bsums.as_ptr() as *const __m256i);
            let q8s = _mm_hadd_epi16(
                _mm256_castsi256_si128(q8sums),
                _mm256_extracti128_si256(q8sums, 1),
            );
            let prod = _mm_madd_epi16(_mm256_extracti128_si256(mins_and_scales, 1), q8s);
            acc_m = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m);
            let sc128 = _mm256_castsi256_si128(mins_and_scales);
            let scales = _mm256_set_m128i(sc128, sc128);
            let mut sumi = _mm256_setzero_si256();
            for j in 0..4 {
                let scale_l = scale_k4(scales, 2 * j);
                let scale_h = scale_k4(scales, 2 * j + 1);
                // SAFETY: j < 4, inside the super-block.
                let (lo, hi) = nibbles(xb, j);
                // SAFETY: qs[64j .. 64j + 64] of its 256.
                let q8l = _mm256_loadu_si256(yb.qs.as_ptr().add(64 * j) as *const __m256i);
                let q8h = _mm256_loadu_si256(yb.qs.as_ptr().add(64 * j + 32) as *const __m256i);
                let p16l = _mm256_madd_epi16(scale_l, _mm256_maddubs_epi16(lo, q8l));
                let p16h = _mm256_madd_epi16(scale_h, _mm256_maddubs_epi16(hi, q8h));
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p16l, p16h));
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        }
        acc_m = _mm_add_ps(acc_m, _mm_movehl_ps(acc_m, acc_m));
        acc_m = _mm_add_ss(acc_m, _mm_movehdup_ps(acc_m));
        let mut r = _mm_add_ps(_mm256_extractf128_ps(acc, 1), _mm256_castps256_ps128(acc));
        r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r) + _mm_cvtss_f32(acc_m)
    }
}

/// A Q4_K weight matrix `[n, k]` (n outputs of k inputs), multiplied by
/// activations with [`Q4KMatrix::forward`].
#[derive(Debug, Clone)]
pub(crate) struct Q4KMatrix {
    weights: Arc<QTensor>,
    n: usize,
    k: usize,
    dot: (Dot<BlockQ8K>, Dot4<BlockQ8K>),
}

impl Q4KMatrix {
    /// Wraps a Q4_K tensor of shape `[n, k]` held in CPU memory.
    pub(crate) fn new(weights: Arc<QTensor>) -> Result<Self> {
        let (n, k) =
            qmatrix::check_weights("Q4KMatrix", &weights, GgmlDType::Q4K, QK_K, Q4_K_BYTES)?;
        Ok(Q4KMatrix {
            weights,
            n,
            k,
            dot: best_dot(n),
        })
    }

    /// `x · Wᵀ` for `x` of shape `[…, k]`: shape `[…, n]`, F32. The rows of
    /// one sequence (`[…, s, k]`, a prompt) in fours as llama.cpp's gemm and
    /// the rest as its gemv (see the module); one row each of several
    /// sequences (`[b, 1, k]`: the stacked next tokens of several jobs) each
    /// as the gemv, so that every job gets the bits it gets alone.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (xs, dims) = qmatrix::activations("Q4KMatrix", x, self.n, self.k)?;
        let m = xs.len() / self.k;
        let kb = self.k / QK_K;
        let mut xq = vec![BlockQ8K::ZERO; m * kb];
        ggml::quantize_row_q8_k(&xs, &mut xq);
        let data = self.weights.data()?;
        let stacked = dims.len() >= 3 && dims[dims.len() - 2] == 1;
        let out = if stacked && m > 1 {
            let dot = self.dot.0;
            let row_bytes = kb * Q4_K_BYTES;
            qmatrix::by_weight_rows(self.n, m, ROWS_PER_ITEM, |c, col| {
                let wrow = &data[c * row_bytes..(c + 1) * row_bytes];
                for (r, out) in col.iter_mut().enumerate() {
                    *out = dot(wrow, &xq[r * kb..(r + 1) * kb]);
                }
            })
        } else {
            qmatrix::matmul_by_four(&data, self.n, &xq, m, ROWS_PER_ITEM, self.dot)
        };
        Tensor::from_vec(out, dims, x.device())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::q6_k::tests::{activations, qtensor, recorded_weights};
    use crate::qmatrix::test_data::{bits, fnv, series, Rng};
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module};

    /// `nb` random Q4_K super-blocks (`d`, `dmin` from `scale`, random bits).
    fn blocks(rng: &mut Rng, nb: usize, scale: fn(&mut Rng) -> f32) -> Vec<u8> {
        let mut x = Vec::with_capacity(nb * Q4_K_BYTES);
        for _ in 0..nb {
            x.extend(half::f16::from_f32(scale(rng)).to_le_bytes());
            x.extend(half::f16::from_f32(scale(rng)).to_le_bytes());
            x.extend((4..Q4_K_BYTES).map(|_| rng.next() as u8));
        }
        x
    }

    #[test]
    fn unpacking_follows_ggmls_layout() {
        let mut xb = vec![0u8; Q4_K_BYTES];
        // Scale 1 = 5, min 1 = 7 (low 6 bits of bytes 5 and 9); scale 6 from
        // byte 14's low nibble (3) and byte 6's top bits (2); min 6 from byte
        // 14's high nibble (1) and byte 10's top bits (1).
        xb[5] = 5;
        xb[9] = 7;
        xb[14] = 0x13;
        xb[4 + 2] = 0b10 << 6;
        xb[4 + 6] = 0b01 << 6;
        let (sc, mn) = scales_mins(&xb);
        assert_eq!((sc[1], mn[1]), (5, 7));
        assert_eq!((sc[6], mn[6]), (3 | 2 << 4, 1 | 1 << 4));
        assert_eq!(sc[2], 0);
        // Value 64 + 33: the high nibble of qs[32 + 1].
        xb[QS + 33] = 0xA0;
        assert_eq!(unpack(&xb)[97], 0x0A);
        assert_eq!(unpack(&xb)[65], 0);
    }

    #[test]
    fn the_avx2_dots_equal_the_scalar_ones() {
        #[cfg(target_arch = "x86_64")]
        if avx2::kernels().is_none() {
            eprintln!("note: no AVX2/FMA/F16C here; the scalar dots alone are tested");
        }
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        type Case = (&'static str, fn(&mut Rng) -> f32, f32);
        let cases: [Case; 4] = [
            ("ordinary", |r| r.unit() * 0.05, 4.0),
            ("tiny scales", |r| r.unit() * 1e-7, 4.0),
            ("f16's largest scales", |r| r.unit() * 6.5e4, 1e-3),
            ("tiny activations", |r| r.unit() * 0.05, 1e-30),
        ];
        let kinds: [(usize, Dot<BlockQ8K>, Dot4<BlockQ8K>); 2] = [
            (8, dot_repacked_scalar, dot4_repacked_scalar),
            (7, dot_plain_scalar, dot4_plain_scalar),
        ];
        for (n, scalar, scalar4) in kinds {
            let (dot, dot4) = best_dot(n);
            for (name, scale, act) in cases {
                for nb in [1, 2, 3, 6] {
                    let x = blocks(&mut rng, nb, scale);
                    let y = activations(&mut rng, nb, act);
                    let (a, b) = (dot(&x, &y), scalar(&x, &y));
                    assert!(a.is_finite() && b.is_finite(), "{name}, {nb}: {a} vs {b}");
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "{n} rows, {name}, {nb}: {a} vs {b}"
                    );
                    let others: Vec<_> = (0..3).map(|_| activations(&mut rng, nb, act)).collect();
                    let ys = [&y[..], &others[0], &others[1], &others[2]];
                    let four = dot4(&x, ys);
                    assert_eq!(bits(&four), bits(&scalar4(&x, ys)), "{n}, {name}, {nb}");
                    if n % 8 != 0 {
                        assert_eq!(four[0].to_bits(), a.to_bits(), "{name}, {nb} blocks");
                    }
                    // Each of the four is that row's own: the others do not matter.
                    let again = dot4(&x, [&others[0], &y, &others[2], &others[1]]);
                    assert_eq!(again[1].to_bits(), four[0].to_bits(), "{n}, {name}, {nb}");
                }
            }
        }
    }

    // What ggml computed on the same inputs (tests/data/ggml_ops.py, the
    // AVX-512 build of node-llama-cpp 3.22.1, libggml-cpu-zen4.so, 2 threads),
    // the script's recorded bytes as weights, series 19 (then 20 or 21) as
    // activations: 12 rows of 512 in plain memory (ggml_vec_dot_q4_K_q8_K,
    // also per row for five columns), and 16 rows of 512 in the CPU repack
    // buffer (q4_K_8x8: gemv for one column, gemm for five and eight).

    #[test]
    fn plain_products_are_ggmls() {
        let dev = Device::Cpu;
        let (n, k) = (12, 512);
        let raw = recorded_weights(24, Q4_K_BYTES, 0, true);
        let matrix = Q4KMatrix::new(qtensor(&raw, GgmlDType::Q4K, n, k)).unwrap();
        let one = Tensor::from_vec(series(k, 19, 1.0), (1, k), &dev).unwrap();
        let out = matrix.forward(&one).unwrap().flatten_all().unwrap();
        let out = out.to_vec1::<f32>().unwrap();
        #[rustfmt::skip]
        let ggml = [
            0x3f8489e1, 0xbe9903e0, 0x40322f3c, 0x40617bda, 0xbfc67a6a, 0x4054c1a6,
            0x40c5bf3e, 0x3f9bc0a2, 0x40590192, 0x3f97ae68, 0x40f7fd07, 0x4124cc24,
        ];
        assert_eq!(bits(&out), ggml);
        let mut x = series(k, 19, 1.0);
        x.extend(series(4 * k, 20, 1.0));
        let five = Tensor::from_vec(x, (5, k), &dev).unwrap();
        let out5 = matrix.forward(&five).unwrap().flatten_all().unwrap();
        let out5 = out5.to_vec1::<f32>().unwrap();
        assert_eq!(fnv(&out5), 0x982c_d4c1_d981_447d);
        let scalar = Q4KMatrix {
            dot: (dot_plain_scalar, dot4_plain_scalar),
            ..matrix.clone()
        };
        let s5 = scalar.forward(&five).unwrap().flatten_all().unwrap();
        assert_eq!(bits(&s5.to_vec1::<f32>().unwrap()), bits(&out5));
    }

    #[test]
    fn repacked_products_are_ggmls() {
        let dev = Device::Cpu;
        let (n, k) = (16, 512);
        let raw = recorded_weights(32, Q4_K_BYTES, 0, true);
        let matrix = Q4KMatrix::new(qtensor(&raw, GgmlDType::Q4K, n, k)).unwrap();
        let one = Tensor::from_vec(series(k, 19, 1.0), (1, k), &dev).unwrap();
        let out = matrix.forward(&one).unwrap().flatten_all().unwrap();
        let out = out.to_vec1::<f32>().unwrap();
        #[rustfmt::skip]
        let ggml = [
            0x3f8489e1, 0xbe9903e0, 0x40322f3d, 0x40617bdc, 0xbfc67a6c, 0x4054c1a8,
            0x40c5bf3d, 0x3f9bc09e, 0x40590192, 0x3f97ae6e, 0x40f7fd05, 0x4124cc26,
            0xc0b23615, 0x4146d4f4, 0x4191acfc, 0x4077aa02,
        ];
        assert_eq!(bits(&out), ggml);
        let scalar = Q4KMatrix {
            dot: (dot_repacked_scalar, dot4_repacked_scalar),
            ..matrix.clone()
        };
        for (m, series_k, hash) in [
            (5, 20, 0x0f74_7a87_e5ef_6074),
            (8, 21, 0xc062_9a72_9943_9acd),
        ] {
            let mut x = series(k, 19, 1.0);
            x.extend(series((m - 1) * k, series_k, 1.0));
            let xt = Tensor::from_vec(x, (m, k), &dev).unwrap();
            let outm = matrix.forward(&xt).unwrap().flatten_all().unwrap();
            let outm = outm.to_vec1::<f32>().unwrap();
            assert_eq!(fnv(&outm), hash, "{m} rows");
            let s = scalar.forward(&xt).unwrap().flatten_all().unwrap();
            assert_eq!(bits(&s.to_vec1::<f32>().unwrap()), bits(&outm));
        }
    }

    /// A repacked matrix's prompt rows in whole fours go through the gemm
    /// (the bits of the same four rows alone), the rest through the gemv
    /// (the bits of the row alone); a plain matrix's are each as alone.
    #[test]
    fn prompt_rows_equal_single_rows_and_candles_product() {
        let mut rng = Rng(7);
        let dev = Device::Cpu;
        // 40 and 37 outputs (repacked and plain), 1536 inputs (SmolLM2's ffn_down).
        for n in [40, 37] {
            let k = 1536;
            let w: Vec<f32> = (0..n * k).map(|_| rng.unit() * 0.1).collect();
            let w = Tensor::from_vec(w, (n, k), &dev).unwrap();
            let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q4K).unwrap());
            let ours = Q4KMatrix::new(q.clone()).unwrap();
            let theirs = QMatMul::from_arc(q).unwrap();
            for m in [1, 3, 4, 7, 9] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.unit()).collect();
                let xt = Tensor::from_vec(x.clone(), (1, m, k), &dev).unwrap();
                let a = ours.forward(&xt).unwrap();
                assert_eq!(a.dims(), &[1, m, n]);
                let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for r in 0..m {
                    let (from, rows) = if n % 8 == 0 && r < m - m % 4 {
                        (r - r % 4, 4)
                    } else {
                        (r, 1)
                    };
                    let part = x[from * k..(from + rows) * k].to_vec();
                    let alone = Tensor::from_vec(part, (rows, k), &dev).unwrap();
                    let alone = ours.forward(&alone).unwrap().flatten_all().unwrap();
                    let alone = alone.to_vec1::<f32>().unwrap();
                    assert_eq!(
                        bits(&alone[(r - from) * n..(r - from + 1) * n]),
                        bits(&a[r * n..(r + 1) * n]),
                        "row {r} of {m}, {n} outputs"
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
        }
        // Stacked steps of several jobs ([b, 1, k]): each row as alone.
        let (n, k) = (16, 512);
        let w: Vec<f32> = (0..n * k).map(|_| rng.unit() * 0.1).collect();
        let w = Tensor::from_vec(w, (n, k), &dev).unwrap();
        let ours =
            Q4KMatrix::new(Arc::new(QTensor::quantize(&w, GgmlDType::Q4K).unwrap())).unwrap();
        let x: Vec<f32> = (0..5 * k).map(|_| rng.unit()).collect();
        let steps = Tensor::from_vec(x.clone(), (5, 1, k), &dev).unwrap();
        let a = ours.forward(&steps).unwrap().flatten_all().unwrap();
        let a = a.to_vec1::<f32>().unwrap();
        for (r, row) in x.chunks_exact(k).enumerate() {
            let alone = Tensor::from_vec(row.to_vec(), (1, 1, k), &dev).unwrap();
            let alone = ours.forward(&alone).unwrap().flatten_all().unwrap();
            assert_eq!(
                bits(&alone.to_vec1::<f32>().unwrap()),
                bits(&a[r * n..(r + 1) * n])
            );
        }
        let q8 = QTensor::quantize(
            &Tensor::zeros((8, 256), candle_core::DType::F32, &dev).unwrap(),
            GgmlDType::Q8_0,
        )
        .unwrap();
        assert!(Q4KMatrix::new(Arc::new(q8)).is_err());
    }

    #[test]
    fn lengths_are_checked_before_the_kernel() {
        let mut y = vec![BlockQ8K::ZERO; 2];
        y[0].d = 1.0;
        y[0].qs = [1; QK_K];
        for n in [8, 7] {
            let (dot, dot4) = best_dot(n);
            let short = vec![0u8; Q4_K_BYTES * 2 - 1];
            let caught = std::panic::catch_unwind(|| dot(&short, &y));
            assert!(caught.is_err(), "a short row must not reach the kernel");
            let full = vec![0u8; Q4_K_BYTES * 2];
            let caught = std::panic::catch_unwind(|| dot4(&full, [&y, &y, &y[..1], &y]));
            assert!(
                caught.is_err(),
                "a short activation row must not reach the kernel"
            );
        }
    }
}
