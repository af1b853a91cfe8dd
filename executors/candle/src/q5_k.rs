//! A Q5_K matrix product for the CPU, as llama.cpp's CPU library computes
//! it: the activations quantized to Q8_K ([`ggml::quantize_row_q8_k`]) and
//! each output one Q5_K × Q8_K dot product, ggml's x86
//! `ggml_vec_dot_q5_K_q8_K`, with AVX2, FMA and F16C when the CPU has them
//! and a plain loop with the same roundings otherwise. llama.cpp's Q5_K_M
//! recipe (ftype 17) writes Q5_K for most of a model's matrices whose rows
//! are whole 256-value super-blocks.
//!
//! The arithmetic, read from the library's disassembly
//! (`libggml-cpu-zen4.so` of node-llama-cpp 3.22.1): per super-block, 8
//! `i32` lanes of `Σ scale · q · y` (lane `l` the values `4l..4l + 4` of
//! each 32-value sub-block), converted and fused into 8 float lanes times
//! `d = d_y · d_x` (`vfmadd231ps`); the mins as one exact integer
//! `Σ min · bsum`, converted and fused into one scalar
//! `summs = fma(Σ, dmin, summs)` with `dmin = −d_y · dmin_x`
//! (`vcvtsi2ss`, `vfmadd231ss`: the compiler contracted
//! `summs += dmin * …`); the output `hsum_float_8(acc) + summs`.
//!
//! ggml has no AVX-512 version of this dot product: the AVX-512 build runs
//! its AVX2 code (256-bit registers, 8 lanes). llama.cpp's CPU "repack"
//! buffer has Q5_K layouts (`q5_K_8x8`, `q5_K_8x4`) for ARM only
//! (`ggml_repack_get_optimal_repack_type` offers them under NEON), and
//! llamafile's tinyBLAS takes no K-quants on x86, so for a prompt llama.cpp
//! runs this same dot product per row and column: the same bits as one row
//! alone (the test below checks ggml's own results for one row and five).

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, Tensor};

use crate::ggml::{self, BlockQ8K, QK_K};
use crate::q4_k::scales_mins;
use crate::qmatrix::{self, Dot, Dot4};

/// Bytes of one Q5_K super-block (`block_q5_K`): `d` and `dmin` (f16), 12
/// bytes of 6-bit scales and mins for its eight 32-value sub-blocks (as
/// Q4_K's), `qh` (32 bytes: the fifth bits), then `qs` (128 bytes of
/// nibbles). Value = `d · scale · q − dmin · min`, `q` in 0..32.
const Q5_K_BYTES: usize = 176;
/// Where `qh` and `qs` start in a super-block.
const QH: usize = 16;
const QS: usize = 48;
/// Output rows per work item of the thread pool.
const ROWS_PER_ITEM: usize = 16;

/// The f16 at `bytes[0..2]` (little-endian), as f32.
fn f16_le(bytes: &[u8]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([bytes[0], bytes[1]])).to_f32()
}

/// The 256 values of a Q5_K super-block, in 0..32, as ggml's
/// `dequantize_row_q5_K` orders them: value `64j + 32h + l` (`l < 32`) has
/// the low (`h` 0) or high (`h` 1) nibble of `qs[32j + l]` and, as its
/// fifth bit, bit `2j + h` of `qh[l]`.
fn unpack(xb: &[u8]) -> [u8; QK_K] {
    let (qh, qs) = (&xb[QH..QS], &xb[QS..Q5_K_BYTES]);
    std::array::from_fn(|v| {
        let (j, h, l) = (v / 64, (v % 64) / 32, v % 32);
        let byte = qs[32 * j + l];
        let low = if h == 0 { byte & 0x0F } else { byte >> 4 };
        let high = (qh[l] >> (2 * j + h)) & 1;
        low | (high << 4)
    })
}

/// Σ over the super-blocks of (Q5_K row `x`, as bytes) · (Q8_K row `y`)
/// without SIMD, as ggml's AVX2 loop: 8 lanes, lane `l` of super-block `i`
/// the integer sum over its sub-blocks of scale × products `4l..4l + 4`,
/// fused into lane `l` times `d = d_y · d_x`; the mins
/// `Σ min[s] · (bsums[2s] + bsums[2s + 1])` (exact) fused into one sum times
/// `dmin = −d_y · dmin_x`; then [`ggml::hsum8`] plus that sum.
fn dot_scalar(x: &[u8], y: &[BlockQ8K]) -> f32 {
    assert_eq!(x.len(), y.len() * Q5_K_BYTES, "dot_q5_K_q8_K: lengths");
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    for (xb, yb) in x.chunks_exact(Q5_K_BYTES).zip(y) {
        let d = yb.d * f16_le(xb);
        let dmin = -yb.d * f16_le(&xb[2..]);
        let (sc, mn) = scales_mins(xb);
        let q = unpack(xb);
        let imin: i32 = (0..8)
            .map(|s| {
                let bsum = i32::from(yb.bsums[2 * s]) + i32::from(yb.bsums[2 * s + 1]);
                i32::from(mn[s]) * bsum
            })
            .sum();
        summs = (imin as f32).mul_add(dmin, summs);
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
    ggml::hsum8(&acc) + summs
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
    use super::{scales_mins, BlockQ8K, Dot, Dot4, Q5_K_BYTES, QH, QS};
    use std::arch::x86_64::*;

    /// [`super::dot_scalar`] and [`super::dot4_scalar`] with AVX2, if this
    /// CPU has AVX2, FMA and F16C. The CPU is checked here, once per matrix,
    /// not per call: the two safe functions below can be reached only
    /// through what this returns.
    pub(super) fn kernels() -> Option<(Dot<BlockQ8K>, Dot4<BlockQ8K>)> {
        fn dot(x: &[u8], y: &[BlockQ8K]) -> f32 {
            // The kernel reads exactly y.len() super-blocks of both.
            assert_eq!(x.len(), y.len() * Q5_K_BYTES, "dot_q5_K_q8_K: lengths");
            // SAFETY: `dot` is named only in `kernels`, which returns it only
            // once the CPU has shown AVX2, FMA and F16C; lengths checked above.
            unsafe { dot_avx2::<1>(x, [y])[0] }
        }

        fn dot4(x: &[u8], ys: [&[BlockQ8K]; 4]) -> [f32; 4] {
            // The kernel reads exactly x.len() / 176 super-blocks of each.
            for y in ys {
                assert_eq!(x.len(), y.len() * Q5_K_BYTES, "dot_q5_K_q8_K: lengths");
            }
            // SAFETY: as in `dot`: returned only past the CPU check, lengths checked above.
            unsafe { dot_avx2::<4>(x, ys) }
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

    /// Sub-blocks `2j` and `2j + 1` as 5-bit bytes (ggml's `q5_0`, `q5_1`):
    /// the low and high nibbles of `qs[32j .. 32j + 32]` plus 16 times bits
    /// `2j` and `2j + 1` of `qh`.
    ///
    /// # Safety
    /// The CPU must have AVX2; `xb` points at 176 readable bytes; `j < 4`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn values(xb: *const u8, hbits: __m256i, j: usize) -> (__m256i, __m256i) {
        let m4 = _mm256_set1_epi8(0x0F);
        // SAFETY: qs[32j .. 32j + 32] inside the super-block (j < 4), unaligned.
        let bits = _mm256_loadu_si256(xb.add(QS + 32 * j) as *const __m256i);
        (
            _mm256_or_si256(_mm256_and_si256(bits, m4), fifth(hbits, 2 * j)),
            _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4),
                fifth(hbits, 2 * j + 1),
            ),
        )
    }

    /// Bit `b` of every byte of `hbits`, as 16 (bit 4): shifting the 16-bit
    /// lanes right by `b` brings a high byte's bit `b` to bit 8, its own
    /// bit 0, masked per byte.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn fifth(hbits: __m256i, b: usize) -> __m256i {
        let shifted = _mm256_srl_epi16(hbits, _mm_cvtsi32_si128(b as i32));
        _mm256_slli_epi16(_mm256_and_si256(shifted, _mm256_set1_epi8(1)), 4)
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

    /// ggml's AVX2 `ggml_vec_dot_q5_K_q8_K` for `R` activation rows, the
    /// Q5_K super-block unpacked once: for each row the same integers
    /// (exact in any order) and the same fused sums in the same order as
    /// that function alone.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C, and `x.len()` must be
    /// `y.len() * 176` for every row `y` of `ys`: super-block `i` reads
    /// `x[176 i .. 176 i + 176]` and `y[i]` only.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_avx2<const R: usize>(x: &[u8], ys: [&[BlockQ8K]; R]) -> [f32; R] {
        let mut acc = [_mm256_setzero_ps(); R];
        let mut summs = [0f32; R];
        for (i, block) in x.chunks_exact(Q5_K_BYTES).enumerate() {
            let xb = block.as_ptr();
            // SAFETY: bytes 0..2 and 2..4 of the super-block.
            let (dx, dminx) = (f16_at(xb), f16_at(xb.add(2)));
            let (sc, mn) = scales_mins(block);
            // SAFETY: qh, 32 bytes inside the super-block, unaligned.
            let hbits = _mm256_loadu_si256(xb.add(QH) as *const __m256i);
            // SAFETY: the 8 bytes of `mn`, read unaligned.
            let mins = _mm_cvtepu8_epi16(_mm_loadl_epi64(mn.as_ptr() as *const __m128i));
            let mut sumi = [_mm256_setzero_si256(); R];
            for j in 0..4 {
                // SAFETY: j < 4.
                let (q0, q1) = values(xb, hbits, j);
                let s0 = _mm256_set1_epi16(i16::from(sc[2 * j]));
                let s1 = _mm256_set1_epi16(i16::from(sc[2 * j + 1]));
                for (y, sumi) in ys.iter().zip(sumi.iter_mut()) {
                    // Bounds-checked: every row has as many blocks (checked by the caller).
                    let q8 = y[i].qs.as_ptr();
                    // SAFETY: qs[64j .. 64j + 64] of its 256, unaligned.
                    let y0 = _mm256_loadu_si256(q8.add(64 * j) as *const __m256i);
                    let y1 = _mm256_loadu_si256(q8.add(64 * j + 32) as *const __m256i);
                    // 5 bits times a byte in pairs: at most 2 · 31 · 128, no saturation.
                    let p0 = _mm256_madd_epi16(s0, _mm256_maddubs_epi16(q0, y0));
                    let p1 = _mm256_madd_epi16(s1, _mm256_maddubs_epi16(q1, y1));
                    *sumi = _mm256_add_epi32(*sumi, _mm256_add_epi32(p0, p1));
                }
            }
            for r in 0..R {
                let yb = &ys[r][i];
                let d = yb.d * dx;
                let dmin = -yb.d * dminx;
                // ggml's q8s and prod: the 32-value sums of the Q8_K block
                // (pairs of its 16-value bsums) times the mins, one integer.
                // SAFETY: bsums is 16 i16 = 32 bytes, read unaligned.
                let q8sums = _mm256_loadu_si256(yb.bsums.as_ptr() as *const __m256i);
                let q8s = _mm_hadd_epi16(
                    _mm256_castsi256_si128(q8sums),
                    _mm256_extracti128_si256(q8sums, 1),
                );
                let prod = _mm_madd_epi16(mins, q8s);
                let zero = _mm_setzero_si128();
                let imin = _mm_cvtsi128_si32(_mm_hadd_epi32(_mm_hadd_epi32(prod, zero), zero));
                summs[r] = (imin as f32).mul_add(dmin, summs[r]);
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
            }
        }
        std::array::from_fn(|r| hsum(acc[r]) + summs[r])
    }
}

/// A Q5_K weight matrix `[n, k]` (n outputs of k inputs), multiplied by
/// activations with [`Q5KMatrix::forward`].
#[derive(Debug, Clone)]
pub(crate) struct Q5KMatrix {
    weights: Arc<QTensor>,
    n: usize,
    k: usize,
    dot: (Dot<BlockQ8K>, Dot4<BlockQ8K>),
}

impl Q5KMatrix {
    /// Wraps a Q5_K tensor of shape `[n, k]` held in CPU memory.
    pub(crate) fn new(weights: Arc<QTensor>) -> Result<Self> {
        let (n, k) =
            qmatrix::check_weights("Q5KMatrix", &weights, GgmlDType::Q5K, QK_K, Q5_K_BYTES)?;
        Ok(Q5KMatrix {
            weights,
            n,
            k,
            dot: best_dot(),
        })
    }

    /// `x · Wᵀ` for `x` of shape `[…, k]`: shape `[…, n]`, F32.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (xs, dims) = qmatrix::activations("Q5KMatrix", x, self.n, self.k)?;
        let m = xs.len() / self.k;
        let mut xq = vec![BlockQ8K::ZERO; m * (self.k / QK_K)];
        ggml::quantize_row_q8_k(&xs, &mut xq);
        let data = self.weights.data()?;
        let out = qmatrix::matmul_by_four(&data, self.n, &xq, m, ROWS_PER_ITEM, self.dot);
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

    /// `nb` random Q5_K super-blocks (`d`, `dmin` from `scale`, random bits).
    fn blocks(rng: &mut Rng, nb: usize, scale: fn(&mut Rng) -> f32) -> Vec<u8> {
        let mut x = Vec::with_capacity(nb * Q5_K_BYTES);
        for _ in 0..nb {
            x.extend(half::f16::from_f32(scale(rng)).to_le_bytes());
            x.extend(half::f16::from_f32(scale(rng)).to_le_bytes());
            x.extend((4..Q5_K_BYTES).map(|_| rng.next() as u8));
        }
        x
    }

    #[test]
    fn unpacking_follows_ggmls_layout() {
        let mut xb = vec![0u8; Q5_K_BYTES];
        // Value 0: low nibble 5 of qs[0], fifth bit from qh[0] bit 0: 21.
        // Value 64 + 32 + 3: high nibble of qs[32 + 3] (9), qh[3] bit 3: 25.
        // Value 192 + 31: low nibble of qs[96 + 31] (15), qh[31] bit 6 unset: 15.
        xb[QS] = 0x05;
        xb[QH] = 0b1;
        xb[QS + 35] = 0x90;
        xb[QH + 3] = 0b1000;
        xb[QS + 127] = 0x0F;
        xb[QH + 31] = 0b1000_0000; // bit 7: value 192 + 32 + 31's
        let v = unpack(&xb);
        assert_eq!(v[0], 21);
        assert_eq!(v[99], 25);
        assert_eq!(v[223], 15);
        assert_eq!(v[255], 16);
        assert_eq!(v[1], 0);
        assert_eq!(v[32], 0, "qh[0] bit 0 is value 0's alone");
        xb[QH] = 0b10;
        assert_eq!(unpack(&xb)[32], 16);
        assert_eq!(unpack(&xb)[0], 5);
        // The scales and mins are Q4_K's (bytes 4..16).
        xb[5] = 5;
        xb[9] = 7;
        assert_eq!((scales_mins(&xb).0[1], scales_mins(&xb).1[1]), (5, 7));
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
    // (series 19; ggml_vec_dot_q5_K_q8_K) and times five (series 20, its
    // first column series 19's: the same dot product per row).

    #[test]
    fn products_are_ggmls() {
        let dev = Device::Cpu;
        let (n, k) = (12, 512);
        let raw = recorded_weights(24, Q5_K_BYTES, 0, true);
        let matrix = Q5KMatrix::new(qtensor(&raw, GgmlDType::Q5K, n, k)).unwrap();
        let one = Tensor::from_vec(series(k, 19, 1.0), (1, k), &dev).unwrap();
        let out = matrix.forward(&one).unwrap().flatten_all().unwrap();
        let out = out.to_vec1::<f32>().unwrap();
        #[rustfmt::skip]
        let ggml = [
            0xc0805334, 0x407561f9, 0xc00b455d, 0x417be603, 0x40b45b61, 0x4179211b,
            0xbf214144, 0x4180c8c6, 0xc12c68d0, 0x412f13e5, 0xc08d6496, 0x4233bdba,
        ];
        assert_eq!(bits(&out), ggml);
        let mut x = series(k, 19, 1.0);
        x.extend(series(4 * k, 20, 1.0));
        let five = Tensor::from_vec(x, (5, k), &dev).unwrap();
        let out5 = matrix.forward(&five).unwrap().flatten_all().unwrap();
        let out5 = out5.to_vec1::<f32>().unwrap();
        assert_eq!(fnv(&out5), 0xd1e0_d599_2695_d71f);
        assert_eq!(bits(&out5[..n]), ggml);
        // The scalar kernels give the same bits.
        let scalar = Q5KMatrix {
            dot: (dot_scalar, dot4_scalar),
            ..matrix.clone()
        };
        let s5 = scalar.forward(&five).unwrap().flatten_all().unwrap();
        assert_eq!(bits(&s5.to_vec1::<f32>().unwrap()), bits(&out5));
    }

    #[test]
    fn prompt_rows_equal_single_rows_and_candles_product() {
        let mut rng = Rng(11);
        let dev = Device::Cpu;
        // 37 outputs (not a multiple of the items), 1536 inputs (SmolLM2's ffn_down).
        let (n, k) = (37, 1536);
        let w: Vec<f32> = (0..n * k).map(|_| rng.unit() * 0.1).collect();
        let w = Tensor::from_vec(w, (n, k), &dev).unwrap();
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q5K).unwrap());
        let ours = Q5KMatrix::new(q.clone()).unwrap();
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
        assert!(Q5KMatrix::new(Arc::new(q8)).is_err());
    }

    #[test]
    fn lengths_are_checked_before_the_kernel() {
        let mut y = vec![BlockQ8K::ZERO; 2];
        y[0].d = 1.0;
        y[0].qs = [1; QK_K];
        let (dot, dot4) = best_dot();
        let short = vec![0u8; Q5_K_BYTES * 2 - 1];
        let caught = std::panic::catch_unwind(|| dot(&short, &y));
        assert!(caught.is_err(), "a short row must not reach the kernel");
        let full = vec![0u8; Q5_K_BYTES * 2];
        let caught = std::panic::catch_unwind(|| dot4(&full, [&y, &y, &y[..1], &y]));
        assert!(
            caught.is_err(),
            "a short activation row must not reach the kernel"
        );
    }
}
