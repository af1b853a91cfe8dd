//! A fast Q4_1 matrix product for the CPU: the activations are quantized to
//! Q8_1 (as ggml's `quantize_row_q8_1`) and each output is one Q4_1 × Q8_1
//! dot product, with AVX2 + FMA + F16C when the CPU has them (ggml's
//! `ggml_vec_dot_q4_1_q8_1` AVX2 path, the same arithmetic in the same order)
//! and a plain loop otherwise. candle 0.11's own Q4_1 dot product is the
//! scalar one (only Q4_0, Q8_0 and the K-quants have SIMD paths), which made
//! a Q4_1 model several times slower than llama.cpp on the same file.
//!
//! The weights stay candle's [`QTensor`] (its bytes are read in place); the
//! output rows are split over candle's CPU thread pool, the threads candle's
//! own quantized products run on, so that the two never compete for cores.
//! The AVX2 kernels are `unsafe fn`s: [`best_dot`] hands out the safe dot
//! products that call them only on a CPU that has the features, and those
//! check the lengths that the kernels read without bounds checks.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, Tensor};
use half::f16;

use crate::qmatrix;

/// Values per block (Q4_1 and Q8_1 alike).
pub(crate) const QK: usize = 32;
/// Bytes of one Q4_1 block: `d` and `m` (f16), then 16 bytes of nibbles
/// (value `j` in the low nibble of byte `j`, value `j + 16` in its high one).
pub(crate) const Q4_1_BYTES: usize = 20;
/// Output rows per work item of the thread pool.
const ROWS_PER_ITEM: usize = 16;

/// 32 activations quantized as ggml's Q8_1: `qs[j] * d` ≈ the value, and
/// `s = d * Σ qs`. `d` and `s` are the f16 values ggml stores, widened to
/// f32 once here rather than in every dot product.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub(crate) struct BlockQ8_1 {
    pub(crate) d: f32,
    pub(crate) s: f32,
    pub(crate) qs: [i8; QK],
}

/// Quantizes `x` (a multiple of 32 values) to Q8_1 blocks, with the
/// arithmetic of ggml's AVX2 `quantize_row_q8_1`: `id = 127 / max|x|`,
/// rounding half to even, and `s` from the unrounded `d`.
pub(crate) fn quantize_row_q8_1(x: &[f32], out: &mut [BlockQ8_1]) {
    assert_eq!(x.len(), out.len() * QK, "quantize_row_q8_1: lengths");
    for (xs, block) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in block.qs.iter_mut().zip(xs) {
            let r = (v * id).round_ties_even() as i32;
            sum += r;
            *q = r as i8;
        }
        block.d = f16::from_f32(d).to_f32();
        block.s = f16::from_f32(d * sum as f32).to_f32();
    }
}

/// The f16 at `bytes[at..at + 2]` (little-endian), as f32.
fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

/// Σ over the blocks of (Q4_1 row `x`, as bytes) · (Q8_1 row `y`), without
/// SIMD: the same lanes, order and roundings as the AVX2 version (8 partial
/// sums, each of 4 products; fused multiply-adds as `mul_add`), so the same bits.
pub(crate) fn dot_scalar(x: &[u8], y: &[BlockQ8_1]) -> f32 {
    assert_eq!(x.len(), y.len() * Q4_1_BYTES, "dot_q4_1_q8_1: lengths");
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    for (xb, yb) in x.chunks_exact(Q4_1_BYTES).zip(y) {
        let (d, m) = (f16_at(xb, 0), f16_at(xb, 2));
        // ggml's `summs += m * s` is fused by the compiler (vfmadd231ss in
        // libggml-cpu-zen4.so / -haswell.so): one rounding, as mul_add.
        summs = m.mul_add(yb.s, summs);
        let d = d * yb.d;
        let qs = &xb[4..];
        for (lane, acc) in acc.iter_mut().enumerate() {
            let mut sum = 0i32;
            for b in lane * 4..lane * 4 + 4 {
                let q = if b < 16 {
                    qs[b] & 0x0F
                } else {
                    qs[b - 16] >> 4
                };
                sum += i32::from(q) * i32::from(yb.qs[b]);
            }
            *acc = d.mul_add(sum as f32, *acc);
        }
    }
    hsum8(acc) + summs
}

/// ggml's `hsum_float_8`: high half plus low half, then pairs.
fn hsum8(a: [f32; 8]) -> f32 {
    let r = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (r[0] + r[2]) + (r[1] + r[3])
}

/// A dot product of a Q4_1 row (bytes) with a Q8_1 row of as many blocks.
type DotFn = qmatrix::Dot<BlockQ8_1>;
/// Four of them, of one Q4_1 row with four Q8_1 rows (the row's nibbles
/// unpacked once for all four); each result as [`DotFn`]'s.
type Dot4Fn = qmatrix::Dot4<BlockQ8_1>;

/// [`Dot4Fn`] without SIMD: four [`dot_scalar`]s.
fn dot4_scalar(x: &[u8], ys: [&[BlockQ8_1]; 4]) -> [f32; 4] {
    ys.map(|y| dot_scalar(x, y))
}

/// The fastest dot products this CPU runs.
pub(crate) fn best_dot() -> (DotFn, Dot4Fn) {
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
    use super::{BlockQ8_1, Dot4Fn, DotFn, Q4_1_BYTES};
    use std::arch::x86_64::*;

    /// [`super::dot_scalar`] and [`super::dot4_scalar`] with AVX2, if this
    /// CPU has AVX2, FMA and F16C. The CPU is checked here, once per matrix,
    /// not per call: the two safe functions below can be reached only
    /// through what this returns.
    pub(super) fn kernels() -> Option<(DotFn, Dot4Fn)> {
        fn dot(x: &[u8], y: &[BlockQ8_1]) -> f32 {
            // The kernel reads exactly y.len() blocks of both.
            assert_eq!(x.len(), y.len() * Q4_1_BYTES, "dot_q4_1_q8_1: lengths");
            // SAFETY: `dot` is named only in `kernels`, which returns it only
            // once the CPU has shown AVX2, FMA and F16C; lengths checked above.
            unsafe { dot_avx2(x, y) }
        }

        fn dot4(x: &[u8], ys: [&[BlockQ8_1]; 4]) -> [f32; 4] {
            // The kernel reads exactly ys[0].len() blocks of each.
            for y in ys {
                assert_eq!(x.len(), y.len() * Q4_1_BYTES, "dot_q4_1_q8_1: lengths");
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
        let kernels: (DotFn, Dot4Fn) = (dot, dot4);
        Some(kernels)
    }

    /// [`dot_avx2`] for four Q8_1 rows: the same operations in the same
    /// order for each row, the Q4_1 block unpacked once.
    ///
    /// # Safety
    /// As [`dot_avx2`], for every row of `ys` (all of `x.len() / 20` blocks).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot4_avx2(x: &[u8], ys: [&[BlockQ8_1]; 4]) -> [f32; 4] {
        let low = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut summs = [0f32; 4];
        for (i, block) in x.chunks_exact(Q4_1_BYTES).enumerate() {
            let xb = block.as_ptr();
            // SAFETY: 4 bytes at the start of the 20-byte block.
            let dm_bits = std::ptr::read_unaligned(xb as *const i32);
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(dm_bits));
            let d = _mm_cvtss_f32(dm);
            let m = _mm_cvtss_f32(_mm_movehdup_ps(dm));
            // SAFETY: bytes 4..20 of the 20-byte block.
            let packed = _mm_loadu_si128(xb.add(4) as *const __m128i);
            let qx = _mm256_and_si256(low, _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed));
            for ((y, acc), summs) in ys.iter().zip(acc.iter_mut()).zip(summs.iter_mut()) {
                // Bounds-checked: every row has as many blocks (checked by the caller).
                let yb = &y[i];
                *summs = m.mul_add(yb.s, *summs);
                let dd = _mm256_set1_ps(d * yb.d);
                // SAFETY: yb.qs is 32 i8 = 32 bytes, read unaligned.
                let qy = _mm256_loadu_si256(yb.qs.as_ptr() as *const __m256i);
                let xy = _mm256_cvtepi32_ps(_mm256_madd_epi16(ones, _mm256_maddubs_epi16(qx, qy)));
                *acc = _mm256_fmadd_ps(dd, xy, *acc);
            }
        }
        let mut out = [0f32; 4];
        for ((out, acc), summs) in out.iter_mut().zip(acc).zip(summs) {
            *out = hsum(acc) + summs;
        }
        out
    }

    /// ggml's `hsum_float_8`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(acc: __m256) -> f32 {
        let mut r = _mm_add_ps(_mm256_extractf128_ps(acc, 1), _mm256_castps256_ps128(acc));
        r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
    }

    /// ggml's AVX2 `ggml_vec_dot_q4_1_q8_1`.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C, and `x.len()` must be
    /// `y.len() * 20`: block `i` reads `x[20 i .. 20 i + 20]` and `y[i]` only.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_avx2(x: &[u8], y: &[BlockQ8_1]) -> f32 {
        let low = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        let mut summs = 0f32;
        for (i, yb) in y.iter().enumerate() {
            // SAFETY: i < y.len(), so x[20 i .. 20 i + 20] is inside x (checked by the caller).
            let xb = x.as_ptr().add(i * Q4_1_BYTES);
            // d and m: two f16 in the block's first 4 bytes (unaligned read).
            // SAFETY: 4 bytes at the block's start, inside it.
            let dm_bits = std::ptr::read_unaligned(xb as *const i32);
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(dm_bits));
            let d = _mm_cvtss_f32(dm);
            let m = _mm_cvtss_f32(_mm_movehdup_ps(dm));
            summs = m.mul_add(yb.s, summs);
            let dd = _mm256_set1_ps(d * yb.d);
            // The 16 bytes of nibbles: low nibbles then high ones, as 32 bytes.
            // SAFETY: bytes 4..20 of the block, inside it.
            let packed = _mm_loadu_si128(xb.add(4) as *const __m128i);
            let qx = _mm256_and_si256(low, _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed));
            // SAFETY: yb.qs is 32 i8 = 32 bytes, read unaligned.
            let qy = _mm256_loadu_si256(yb.qs.as_ptr() as *const __m256i);
            // u8 × i8 pairs to i16 (at most 2 · 15 · 127: no saturation), then to i32 lanes.
            let xy = _mm256_cvtepi32_ps(_mm256_madd_epi16(ones, _mm256_maddubs_epi16(qx, qy)));
            acc = _mm256_fmadd_ps(dd, xy, acc);
        }
        hsum(acc) + summs
    }
}

/// A Q4_1 weight matrix `[n, k]` (n outputs of k inputs), multiplied by
/// activations with [`Q4_1Matrix::forward`].
#[derive(Debug, Clone)]
pub(crate) struct Q4_1Matrix {
    weights: Arc<QTensor>,
    n: usize,
    k: usize,
    dot: (DotFn, Dot4Fn),
}

impl Q4_1Matrix {
    /// Wraps a Q4_1 tensor of shape `[n, k]` held in CPU memory.
    pub(crate) fn new(weights: Arc<QTensor>) -> Result<Self> {
        let (n, k) =
            qmatrix::check_weights("Q4_1Matrix", &weights, GgmlDType::Q4_1, QK, Q4_1_BYTES)?;
        Ok(Q4_1Matrix {
            weights,
            n,
            k,
            dot: best_dot(),
        })
    }

    /// `x · Wᵀ` for `x` of shape `[…, k]`: shape `[…, n]`, F32.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (xs, dims) = qmatrix::activations("Q4_1Matrix", x, self.n, self.k)?;
        let m = xs.len() / self.k;
        let kb = self.k / QK;
        let zero = BlockQ8_1 {
            d: 0.0,
            s: 0.0,
            qs: [0; QK],
        };
        let mut xq = vec![zero; m * kb];
        quantize_row_q8_1(&xs, &mut xq);
        let data = self.weights.data()?;
        let out = qmatrix::matmul_by_four(&data, self.n, &xq, m, ROWS_PER_ITEM, self.dot);
        Tensor::from_vec(out, dims, x.device())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmatrix::test_data::Rng;
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module};

    /// `nb` random Q4_1 blocks (`d` and `m` from `scale`) and `nb` Q8_1
    /// blocks of random activations in ±`act`.
    fn blocks(
        rng: &mut Rng,
        nb: usize,
        scale: fn(&mut Rng) -> f32,
        act: f32,
    ) -> (Vec<u8>, Vec<BlockQ8_1>) {
        let mut x = Vec::with_capacity(nb * Q4_1_BYTES);
        for _ in 0..nb {
            x.extend(f16::from_f32(scale(rng)).to_le_bytes());
            x.extend(f16::from_f32(scale(rng)).to_le_bytes());
            x.extend((0..16).map(|_| rng.next() as u8));
        }
        let vals: Vec<f32> = (0..nb * QK).map(|_| rng.unit() * act).collect();
        let mut y = vec![
            BlockQ8_1 {
                d: 0.0,
                s: 0.0,
                qs: [0; QK]
            };
            nb
        ];
        quantize_row_q8_1(&vals, &mut y);
        (x, y)
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
        let cases: [Case; 5] = [
            ("ordinary", |r| r.unit() * 0.05, 4.0),
            ("tiny scales", |r| r.unit() * 1e-7, 4.0),
            ("f16's largest scales", |r| r.unit() * 6.5e4, 1e-3),
            ("tiny activations", |r| r.unit() * 0.05, 1e-30),
            (
                "mixed",
                |r| {
                    if r.next() % 2 == 0 {
                        r.unit() * 6.0e4
                    } else {
                        r.unit() * 1e-6
                    }
                },
                1e-2,
            ),
        ];
        for (name, scale, act) in cases {
            for nb in [1, 2, 3, 7, 18, 48] {
                let (x, y) = blocks(&mut rng, nb, scale, act);
                let (a, b) = (dot(&x, &y), dot_scalar(&x, &y));
                assert!(
                    a.is_finite() && b.is_finite(),
                    "{name}, {nb} blocks: {a} vs {b}"
                );
                // The same roundings (mul_add where ggml's compiler fuses): equal bits.
                assert_eq!(a.to_bits(), b.to_bits(), "{name}, {nb} blocks: {a} vs {b}");
                // Four rows at once: each exactly as one row alone.
                let others: Vec<_> = (0..3).map(|_| blocks(&mut rng, nb, scale, act).1).collect();
                let four = dot4(&x, [&y, &others[0], &others[1], &others[2]]);
                assert_eq!(four[0].to_bits(), a.to_bits(), "{name}, {nb} blocks");
                for (k, other) in others.iter().enumerate() {
                    assert_eq!(four[k + 1].to_bits(), dot(&x, other).to_bits());
                }
            }
        }
    }

    #[test]
    fn q8_1_quantization_is_ggmls() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 20.5) * 0.25).collect();
        let mut y = vec![
            BlockQ8_1 {
                d: 0.0,
                s: 0.0,
                qs: [0; QK]
            };
            2
        ];
        quantize_row_q8_1(&x, &mut y);
        // Block 0: max |x| = 5.125 (x[0]); x[0] * 127 / 5.125 = -127.
        assert_eq!(y[0].qs[0], -127);
        assert_eq!(y[0].d, f16::from_f32(5.125 / 127.0).to_f32());
        let sum: i32 = y[0].qs.iter().map(|&q| i32::from(q)).sum();
        assert_eq!(y[0].s, f16::from_f32(5.125 / 127.0 * sum as f32).to_f32());
        // Half-way cases round to even, as _mm256_round_ps does.
        let mut z = [0f32; 32];
        z[0] = 127.0;
        z[1] = 2.5;
        z[2] = -3.5;
        quantize_row_q8_1(&z, &mut y[..1]);
        assert_eq!(&y[0].qs[..3], &[127, 2, -4]);
        // All zeros: d = 0, all quants 0.
        quantize_row_q8_1(&[0.0; 32], &mut y[..1]);
        assert_eq!((y[0].d, y[0].s, y[0].qs), (0.0, 0.0, [0; QK]));
    }

    #[test]
    fn the_matmul_equals_candles_qmatmul() {
        let mut rng = Rng(42);
        let dev = Device::Cpu;
        // 37 outputs (not a multiple of the items); 4 blocks of inputs
        // (candle's Q4_1 dot product wants an even number).
        let (n, k) = (37, 128);
        let w: Vec<f32> = (0..n * k).map(|_| rng.unit() * 0.1).collect();
        let w = Tensor::from_vec(w, (n, k), &dev).unwrap();
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q4_1).unwrap());
        let ours = Q4_1Matrix::new(q.clone()).unwrap();
        let theirs = QMatMul::from_arc(q).unwrap();
        for m in [1, 5, 8] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.unit()).collect();
            let x = Tensor::from_vec(x, (1, m, k), &dev).unwrap();
            let a = ours.forward(&x).unwrap();
            let b = theirs.forward(&x).unwrap();
            assert_eq!(a.dims(), &[1, m, n]);
            assert_eq!(b.dims(), &[1, m, n]);
            let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (i, (a, b)) in a.iter().zip(&b).enumerate() {
                // candle's Q8_1 rounds halves away from zero and scales by
                // 1 / d: an activation quant may differ by one step.
                assert!(
                    (a - b).abs() <= 2e-2 + 2e-2 * b.abs(),
                    "output {i} of m={m}: {a} vs {b}"
                );
            }
        }
        // The wrong shape or type is refused.
        assert!(ours
            .forward(&Tensor::zeros((1, 64), candle_core::DType::F32, &dev).unwrap())
            .is_err());
        let q8 = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        assert!(Q4_1Matrix::new(Arc::new(q8)).is_err());
    }

    #[test]
    fn lengths_are_checked_before_the_kernel() {
        let y = [BlockQ8_1 {
            d: 1.0,
            s: 0.0,
            qs: [1; QK],
        }; 2];
        let x = vec![0u8; Q4_1_BYTES * 2 - 1];
        let (dot, dot4) = best_dot();
        let caught = std::panic::catch_unwind(|| dot(&x, &y));
        assert!(caught.is_err(), "a short row must not reach the kernel");
        let full = vec![0u8; Q4_1_BYTES * 2];
        let caught = std::panic::catch_unwind(|| dot4(&full, [&y, &y, &y[..1], &y]));
        assert!(
            caught.is_err(),
            "a short activation row must not reach the kernel"
        );
    }
}
