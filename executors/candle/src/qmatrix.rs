//! What our quantized weight matrices share (Q4_1 in `q4_1.rs`, Q8_0 in
//! `ggml.rs`): checking the tensor, reading the activations, and splitting
//! the weight rows over candle's thread pool. Each kernel only quantizes the
//! activations and dots one weight row with them.

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
