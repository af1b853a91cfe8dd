//! What our quantized weight matrices share (Q4_1 in `q4_1.rs`, Q5_0 in
//! `q5_0.rs`, Q8_0 in `ggml.rs`): checking the tensor, reading the
//! activations, and splitting the weight rows over candle's thread pool. Each
//! kernel only quantizes the activations and dots one weight row with them.

use std::sync::Mutex;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, Tensor};

/// `(n, k)` of a `[n, k]` weight tensor of `dtype` whose rows are whole
/// blocks of `block` values, `block_bytes` bytes each; `what` names the
/// matrix in errors.
pub(crate) fn check_weights(
    what: &str,
    weights: &QTensor,
    dtype: GgmlDType,
    block: usize,
    block_bytes: usize,
) -> Result<(usize, usize)> {
    if weights.dtype() != dtype {
        candle_core::bail!("{what}: a {:?} tensor", weights.dtype())
    }
    let (n, k) = weights.shape().dims2()?;
    if k % block != 0 {
        candle_core::bail!("{what}: rows of {k} values, not whole blocks")
    }
    let bytes = weights.data()?.len();
    if bytes != n * (k / block) * block_bytes {
        candle_core::bail!("{what}: {bytes} bytes for [{n}, {k}]")
    }
    Ok((n, k))
}

/// The activations `x` (`[…, k]`) as `m · k` F32 values, and the shape of
/// the product with `n` weight rows (`[…, n]`).
pub(crate) fn activations(
    what: &str,
    x: &Tensor,
    n: usize,
    k: usize,
) -> Result<(Vec<f32>, Vec<usize>)> {
    let mut dims = x.dims().to_vec();
    match dims.last_mut() {
        Some(last) if *last == k => *last = n,
        _ => candle_core::bail!("{what}: input {:?} for [{n}, {k}]", x.dims()),
    }
    let xs = x
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?;
    Ok((xs, dims))
}

/// `[m, n]` outputs, row `r` and column `c` the product of weight row `c`
/// with activation row `r`: `column(c, out)` fills the `m` outputs of weight
/// row `c`. Work items are runs of `rows_per_item` weight rows, each dotted
/// with every activation row while it is in cache, on candle's thread pool
/// (a second pool on the same cores, rayon's, was slower: both spin).
pub(crate) fn by_weight_rows(
    n: usize,
    m: usize,
    rows_per_item: usize,
    column: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    // Column-major while computing ([n][m]): each item owns one slice.
    let mut out_t = vec![0f32; n * m];
    if m == 0 || n == 0 {
        return out_t;
    }
    {
        let items: Vec<Mutex<&mut [f32]>> = out_t
            .chunks_mut(rows_per_item * m)
            .map(Mutex::new)
            .collect();
        candle_core::utils::barrier_pool().execute_chunked(items.len(), |range| {
            for item in range {
                // Each item is taken by one thread only: the lock never waits.
                let mut dst = items[item].lock().unwrap_or_else(|p| p.into_inner());
                for (j, col) in dst.chunks_mut(m).enumerate() {
                    column(item * rows_per_item + j, col);
                }
            }
        });
    }
    if m == 1 {
        return out_t;
    }
    let mut out = vec![0f32; n * m];
    for (c, col) in out_t.chunks_exact(m).enumerate() {
        for (r, &v) in col.iter().enumerate() {
            out[r * n + c] = v;
        }
    }
    out
}

/// A dot product of one weight row (its blocks' bytes) with a row of as many
/// quantized activation blocks `Y`.
pub(crate) type Dot<Y> = fn(&[u8], &[Y]) -> f32;
/// Four of them, of one weight row with four activation rows (prompts: the
/// weight row is unpacked once for all four); each result as [`Dot`]'s.
pub(crate) type Dot4<Y> = fn(&[u8], [&[Y]; 4]) -> [f32; 4];

/// `[m, n]` outputs: row `r`, column `c` is weight row `c` (of `w`, `n` rows
/// of `row_bytes`) dotted with activation row `r` (of `xq`, `m` rows of
/// blocks), four activation rows at a time ([`by_weight_rows`]), the rest one
/// by one. `dot4` gives what `dot` gives for every kernel but Q4_K's
/// (`q4_k.rs`), so a prompt's rows get the bits they would get alone; Q4_K's
/// `dot4` is llama.cpp's repacked gemm, which it too runs on a prompt's rows
/// in fours from the first, and its gemv (`dot`) on the rest.
pub(crate) fn matmul_by_four<Y: Sync>(
    w: &[u8],
    n: usize,
    xq: &[Y],
    m: usize,
    rows_per_item: usize,
    (dot, dot4): (Dot<Y>, Dot4<Y>),
) -> Vec<f32> {
    let kb = xq.len() / m.max(1);
    let row_bytes = w.len() / n.max(1);
    assert_eq!(w.len(), n * row_bytes, "matmul: weight bytes");
    assert_eq!(xq.len(), m * kb, "matmul: activation blocks");
    by_weight_rows(n, m, rows_per_item, |c, col| {
        let wrow = &w[c * row_bytes..(c + 1) * row_bytes];
        let xrow = |r: usize| &xq[r * kb..(r + 1) * kb];
        let mut fours = col.chunks_exact_mut(4);
        for (q, out) in (&mut fours).enumerate() {
            let r = q * 4;
            let four = dot4(wrow, [xrow(r), xrow(r + 1), xrow(r + 2), xrow(r + 3)]);
            out.copy_from_slice(&four);
        }
        let done = m - m % 4;
        for (r, out) in fours.into_remainder().iter_mut().enumerate() {
            *out = dot(wrow, xrow(done + r));
        }
    })
}

/// Inputs and hashes the kernels' tests share with `tests/data/ggml_ops.py`.
#[cfg(test)]
pub(crate) mod test_data {
    /// A small deterministic generator (xorshift), enough for test data.
    pub(crate) struct Rng(pub(crate) u64);

    impl Rng {
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        /// Uniform in [-1, 1).
        pub(crate) fn unit(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
    }

    /// Input `i` of series `k`: `((i · 7919 + k) % 2000) / 500 - 2`, in f64,
    /// times `scale`, rounded to f32 (tests/data/ggml_ops.py computes the same).
    pub(crate) fn series(n: usize, k: usize, scale: f64) -> Vec<f32> {
        (0..n)
            .map(|i| ((((i * 7919 + k) % 2000) as f64 / 500.0 - 2.0) * scale) as f32)
            .collect()
    }

    /// The 64-bit FNV-1a hash of `bytes`.
    pub(crate) fn fnv_bytes(bytes: impl IntoIterator<Item = u8>) -> u64 {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        h
    }

    /// [`fnv_bytes`] of the values' f32 bits, little-endian.
    pub(crate) fn fnv(v: &[f32]) -> u64 {
        fnv_bytes(v.iter().flat_map(|x| x.to_bits().to_le_bytes()))
    }

    /// The values' f32 bits.
    pub(crate) fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }
}
