//! A Q5_0 matrix product for the CPU, as ggml computes it: the activations
//! quantized to Q8_0 (ggml's `quantize_row_q8_0`, [`ggml::quantize_row_q8_0`])
//! and each output one Q5_0 × Q8_0 dot product, ggml's x86
//! `ggml_vec_dot_q5_0_q8_0`, with AVX2 + FMA + F16C when the CPU has them and a
//! plain loop with the same roundings otherwise. candle 0.11's own Q5_0 dot
//! product is its scalar one, and llama.cpp's Q4_K_M recipe writes Q5_0 for
//! every matrix whose rows are not whole 256-value super-blocks (most of
//! SmolLM2's, 576 wide), so a Q4_K_M file of a small model ran mostly there.
//!
//! ggml has no AVX-512 version of this dot product: its AVX-512 build
//! (`libggml-cpu-zen4.so`) runs the AVX2 code, 8 lanes, so that is what this
//! follows (its VNNI `dpbusd` gives the same exact integer lanes). For two or
//! more activation rows (a prompt) llama.cpp takes llamafile's tinyBLAS
//! (`tinyBLAS_Q0_AVX`), which sums each output in the same order with the
//! same roundings: the same bits as the one-row dot product (the test below
//! checks ggml's own results for one row and for five).

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, Tensor};

use crate::ggml::{self, BlockQ8_0};
use crate::qmatrix::{self, Dot, Dot4};

/// Values per block.
const QK: usize = 32;
/// Bytes of one Q5_0 block: `d` (f16), `qh` (4 bytes: bit `j` is the fifth
/// bit of value `j`), then 16 bytes of nibbles (value `j` in the low nibble
/// of byte `j`, value `j + 16` in its high one). Value = 5 bits − 16.
const Q5_0_BYTES: usize = 22;
/// Output rows per work item of the thread pool.
const ROWS_PER_ITEM: usize = 16;

/// The f16 at `bytes[0..2]` (little-endian), as f32.
fn f16_le(bytes: &[u8]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([bytes[0], bytes[1]])).to_f32()
}

/// The 32 values of a Q5_0 block, in −16..=15.
fn unpack(xb: &[u8]) -> [i8; QK] {
    let qh = u32::from_le_bytes([xb[2], xb[3], xb[4], xb[5]]);
    let qs = &xb[6..Q5_0_BYTES];
    std::array::from_fn(|j| {
        let nibble = if j < 16 {
            qs[j] & 0x0F
        } else {
            qs[j - 16] >> 4
        };
        let high = ((qh >> j) & 1) as u8;
        ((nibble | (high << 4)) as i8) - 16
    })
}

/// Σ over the blocks of (Q5_0 row `x`, as bytes) · (Q8_0 row `y`) without
/// SIMD, as ggml's AVX2 loop: 8 lanes, lane `l` of block `i` the integer sum
/// of products `4l..4l + 4`, fused into lane `l` times `d_x · d_y` (rounded
/// first); then [`ggml::hsum8`].
fn dot_scalar(x: &[u8], y: &[BlockQ8_0]) -> f32 {
    assert_eq!(x.len(), y.len() * Q5_0_BYTES, "dot_q5_0_q8_0: lengths");
    let mut acc = [0f32; 8];
    for (xb, yb) in x.chunks_exact(Q5_0_BYTES).zip(y) {
        let d = f16_le(xb) * yb.d;
        let qx = unpack(xb);
        for (l, acc) in acc.iter_mut().enumerate() {
            let sum: i32 = (4 * l..4 * l + 4)
                .map(|b| i32::from(qx[b]) * i32::from(yb.qs[b]))
                .sum();
            *acc = d.mul_add(sum as f32, *acc);
        }
    }
    ggml::hsum8(&acc)
}

/// [`Dot4`] without SIMD: four [`dot_scalar`]s.
fn dot4_scalar(x: &[u8], ys: [&[BlockQ8_0]; 4]) -> [f32; 4] {
    ys.map(|y| dot_scalar(x, y))
}

/// The fastest dot products this CPU runs (the same bits either way).
fn best_dot() -> (Dot<BlockQ8_0>, Dot4<BlockQ8_0>) {
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
    use super::{BlockQ8_0, Dot, Dot4, Q5_0_BYTES};
    use std::arch::x86_64::*;

    /// [`super::dot_scalar`] and [`super::dot4_scalar`] with AVX2, if this
    /// CPU has AVX2, FMA and F16C. The CPU is checked here, once per matrix,
    /// not per call: the two safe functions below can be reached only
    /// through what this returns.
    pub(super) fn kernels() -> Option<(Dot<BlockQ8_0>, Dot4<BlockQ8_0>)> {
        fn dot(x: &[u8], y: &[BlockQ8_0]) -> f32 {
            // The kernel reads exactly y.len() blocks of both.
            assert_eq!(x.len(), y.len() * Q5_0_BYTES, "dot_q5_0_q8_0: lengths");
            // SAFETY: `dot` is named only in `kernels`, which returns it only
            // once the CPU has shown AVX2, FMA and F16C; lengths checked above.
            unsafe { dot_avx2(x, y) }
        }

        fn dot4(x: &[u8], ys: [&[BlockQ8_0]; 4]) -> [f32; 4] {
            // The kernel reads exactly x.len() / 22 blocks of each.
            for y in ys {
                assert_eq!(x.len(), y.len() * Q5_0_BYTES, "dot_q5_0_q8_0: lengths");
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
        let kernels: (Dot<BlockQ8_0>, Dot4<BlockQ8_0>) = (dot, dot4);
        Some(kernels)
    }

    /// The block's f16 `d` as f32, and its 32 values as signed bytes
    /// (ggml's `bytes_from_nibbles_32`, then `bytes_from_bits_32` of `qh`:
    /// `0xF0` ORed into each value whose fifth bit is clear, i.e. − 16).
    ///
    /// # Safety
    /// The CPU must have AVX2 and F16C; `xb` points at 22 readable bytes.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load(xb: *const u8) -> (f32, __m256i) {
        // SAFETY: bytes 0..2, 2..6 and 6..22 of the block (unaligned reads).
        let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
            std::ptr::read_unaligned(xb as *const u16),
        ))));
        let qh = std::ptr::read_unaligned(xb.add(2) as *const i32);
        let packed = _mm_loadu_si128(xb.add(6) as *const __m128i);
        let nibbles = _mm256_and_si256(
            _mm256_set1_epi8(0x0F),
            _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed),
        );
        // Byte j of the broadcast qh holds bit j: its byte, then every other
        // bit set, so it is all ones exactly when bit j is.
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(qh),
            _mm256_set_epi64x(
                0x0303_0303_0303_0303,
                0x0202_0202_0202_0202,
                0x0101_0101_0101_0101,
                0,
            ),
        );
        let set = _mm256_cmpeq_epi8(
            _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe)),
            _mm256_set1_epi64x(-1),
        );
        let high = _mm256_andnot_si256(set, _mm256_set1_epi8(0xF0u8 as i8));
        (d, _mm256_or_si256(nibbles, high))
    }

    /// ggml's `mul_sum_i8_pairs_float` with `|x|` already taken: `|x|` times
    /// `y` signed as `x`, in pairs (at most 2 · 16 · 127: no saturation),
    /// then in fours, as f32 lanes.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn products(ax: __m256i, qx: __m256i, qy: __m256i) -> __m256 {
        let sy = _mm256_sign_epi8(qy, qx);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(
            _mm256_set1_epi16(1),
            _mm256_maddubs_epi16(ax, sy),
        ))
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

    /// ggml's AVX2 `ggml_vec_dot_q5_0_q8_0`.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C, and `x.len()` must be
    /// `y.len() * 22`: block `i` reads `x[22 i .. 22 i + 22]` and `y[i]` only.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_avx2(x: &[u8], y: &[BlockQ8_0]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (i, yb) in y.iter().enumerate() {
            // SAFETY: i < y.len(), so the block is inside x (checked by the caller).
            let (dx, qx) = load(x.as_ptr().add(i * Q5_0_BYTES));
            let d = _mm256_set1_ps(dx * yb.d);
            // SAFETY: yb.qs is 32 i8 = 32 bytes, read unaligned.
            let qy = _mm256_loadu_si256(yb.qs.as_ptr() as *const __m256i);
            let q = products(_mm256_sign_epi8(qx, qx), qx, qy);
            acc = _mm256_fmadd_ps(d, q, acc);
        }
        hsum(acc)
    }

    /// [`dot_avx2`] for four Q8_0 rows: the same operations in the same
    /// order for each row, the Q5_0 block unpacked once.
    ///
    /// # Safety
    /// As [`dot_avx2`], for every row of `ys` (all of `x.len() / 22` blocks).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot4_avx2(x: &[u8], ys: [&[BlockQ8_0]; 4]) -> [f32; 4] {
        let mut acc = [_mm256_setzero_ps(); 4];
        for (i, block) in x.chunks_exact(Q5_0_BYTES).enumerate() {
            // SAFETY: the 22-byte block itself.
            let (dx, qx) = load(block.as_ptr());
            let ax = _mm256_sign_epi8(qx, qx);
            for (y, acc) in ys.iter().zip(acc.iter_mut()) {
                // Bounds-checked: every row has as many blocks (checked by the caller).
                let yb = &y[i];
                let d = _mm256_set1_ps(dx * yb.d);
                // SAFETY: yb.qs is 32 i8 = 32 bytes, read unaligned.
                let qy = _mm256_loadu_si256(yb.qs.as_ptr() as *const __m256i);
                *acc = _mm256_fmadd_ps(d, products(ax, qx, qy), *acc);
            }
        }
        let mut out = [0f32; 4];
        for (out, acc) in out.iter_mut().zip(acc) {
            *out = hsum(acc);
        }
        out
    }
}

/// A Q5_0 weight matrix `[n, k]` (n outputs of k inputs), multiplied by
/// activations with [`Q5_0Matrix::forward`].
#[derive(Debug, Clone)]
pub(crate) struct Q5_0Matrix {
    weights: Arc<QTensor>,
    n: usize,
    k: usize,
    dot: (Dot<BlockQ8_0>, Dot4<BlockQ8_0>),
}

impl Q5_0Matrix {
    /// Wraps a Q5_0 tensor of shape `[n, k]` held in CPU memory.
    pub(crate) fn new(weights: Arc<QTensor>) -> Result<Self> {
        let (n, k) =
            qmatrix::check_weights("Q5_0Matrix", &weights, GgmlDType::Q5_0, QK, Q5_0_BYTES)?;
        Ok(Q5_0Matrix {
            weights,
            n,
            k,
            dot: best_dot(),
        })
    }

    /// `x · Wᵀ` for `x` of shape `[…, k]`: shape `[…, n]`, F32.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (xs, dims) = qmatrix::activations("Q5_0Matrix", x, self.n, self.k)?;
        let m = xs.len() / self.k;
        let zero = BlockQ8_0 {
            d: 0.0,
            qs: [0; QK],
        };
        let mut xq = vec![zero; m * (self.k / QK)];
        ggml::quantize_row_q8_0(&xs, &mut xq);
        let data = self.weights.data()?;
        let out = qmatrix::matmul_by_four(&data, self.n, &xq, m, ROWS_PER_ITEM, self.dot);
        Tensor::from_vec(out, dims, x.device())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmatrix::test_data::{bits, fnv, fnv_bytes, series, Rng};
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module};

    /// `nb` random Q5_0 blocks (`d` from `scale`, random bits) and `nb` Q8_0
    /// blocks of random activations in ±`act`.
    fn blocks(
        rng: &mut Rng,
        nb: usize,
        scale: fn(&mut Rng) -> f32,
        act: f32,
    ) -> (Vec<u8>, Vec<BlockQ8_0>) {
        let mut x = Vec::with_capacity(nb * Q5_0_BYTES);
        for _ in 0..nb {
            x.extend(half::f16::from_f32(scale(rng)).to_le_bytes());
            x.extend((0..20).map(|_| rng.next() as u8));
        }
        let vals: Vec<f32> = (0..nb * QK).map(|_| rng.unit() * act).collect();
        let mut y = vec![
            BlockQ8_0 {
                d: 0.0,
                qs: [0; QK]
            };
            nb
        ];
        ggml::quantize_row_q8_0(&vals, &mut y);
        (x, y)
    }

    #[test]
    fn unpacking_follows_ggmls_layout() {
        // d = 1; fifth bits set for values 0 and 17; nibbles j (low) and 15 - j (high).
        let mut xb = vec![0x00, 0x3c];
        xb.extend((1u32 | 1 << 17).to_le_bytes());
        xb.extend((0..16u8).map(|j| j | (15 - j) << 4));
        let v = unpack(&xb);
        assert_eq!(v[0], 0);
        assert_eq!(v[1], 1 - 16);
        assert_eq!(v[15], 15 - 16);
        assert_eq!(v[16], 15 - 16);
        assert_eq!(v[17], 14);
        assert_eq!(v[31], -16);
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
                assert_eq!(a.to_bits(), b.to_bits(), "{name}, {nb} blocks: {a} vs {b}");
                // Four rows at once: each exactly as one row alone.
                let others: Vec<_> = (0..3).map(|_| blocks(&mut rng, nb, scale, act).1).collect();
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
    // 12 rows of 192 (series 13 · 0.1) quantized by ggml_quantize_chunk, times
    // one F32 column (series 14; ggml_vec_dot_q5_0_q8_0) and times five
    // (series 15, its first column series 14's: tinyBLAS).

    #[test]
    fn products_are_ggmls() {
        let dev = Device::Cpu;
        let (n, k) = (12, 192);
        let w = Tensor::from_vec(series(n * k, 13, 0.1), (n, k), &dev).unwrap();
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q5_0).unwrap());
        // candle's quantizer writes ggml's bytes (quantize_row_q5_0_ref).
        assert_eq!(
            fnv_bytes(q.data().unwrap().iter().copied()),
            0xe2a1_fcc7_e7f4_1786
        );
        let matrix = Q5_0Matrix::new(q).unwrap();
        let one = Tensor::from_vec(series(k, 14, 1.0), (1, k), &dev).unwrap();
        let out = matrix.forward(&one).unwrap().flatten_all().unwrap();
        let out = out.to_vec1::<f32>().unwrap();
        #[rustfmt::skip]
        let ggml = [
            0x41c91ba5, 0xbfbe3038, 0xc147c76e, 0xc0f75b08, 0x4133a0cc, 0x4114e4aa,
            0xc117ab81, 0xc13d2166, 0x3f8080b0, 0x41b5f362, 0xc0327828, 0xc14a61bc,
        ];
        assert_eq!(bits(&out), ggml);
        let mut x = series(k, 14, 1.0);
        x.extend(series(4 * k, 15, 1.0));
        let five = Tensor::from_vec(x, (5, k), &dev).unwrap();
        let out5 = matrix.forward(&five).unwrap().flatten_all().unwrap();
        let out5 = out5.to_vec1::<f32>().unwrap();
        assert_eq!(fnv(&out5), 0x2df3_149c_5ea4_0566);
        // A prompt's first row: the bits of the same row alone.
        assert_eq!(bits(&out5[..n]), ggml);
        // The scalar kernels give the same bits.
        let scalar = Q5_0Matrix {
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
        // 37 outputs (not a multiple of the items), 576 inputs (SmolLM2's width).
        let (n, k) = (37, 576);
        let w: Vec<f32> = (0..n * k).map(|_| rng.unit() * 0.1).collect();
        let w = Tensor::from_vec(w, (n, k), &dev).unwrap();
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q5_0).unwrap());
        let ours = Q5_0Matrix::new(q.clone()).unwrap();
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
                // candle's Q8_0 rounds halves away from zero: an activation
                // quant may differ by one step.
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
        assert!(Q5_0Matrix::new(Arc::new(q8)).is_err());
    }

    #[test]
    fn lengths_are_checked_before_the_kernel() {
        let y = [BlockQ8_0 {
            d: 1.0,
            qs: [1; QK],
        }; 2];
        let (dot, dot4) = best_dot();
        let short = vec![0u8; Q5_0_BYTES * 2 - 1];
        let caught = std::panic::catch_unwind(|| dot(&short, &y));
        assert!(caught.is_err(), "a short row must not reach the kernel");
        let full = vec![0u8; Q5_0_BYTES * 2];
        let caught = std::panic::catch_unwind(|| dot4(&full, [&y, &y, &y[..1], &y]));
        assert!(
            caught.is_err(),
            "a short activation row must not reach the kernel"
        );
    }
}
