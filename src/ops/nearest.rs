//! The VQ-VAE quantizer's search: for each latent vector, the index of the nearest codebook
//! entry. The sampler snaps every x0 prediction to the codebook, so a 20-step render of a
//! 56² latent runs this search 21 times against 4096 entries; done as tensor ops it builds
//! the `[N, K]` distance matrix (13 M values) and takes half a second of a voc render. Here
//! each vector scans the codebook once and keeps its best entry.

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

/// Vectors per parallel task.
const ROWS_PER_TASK: usize = 32;

/// For each row of `z` [N, C], the index (u32 \[N]) of the row of `codebook` [K, C] at the least
/// squared distance, computed as the official quantizer does: `‖z‖² + ‖e‖² − 2 z·e`, with
/// `codebook_sq` [1, K] or \[K] holding each `‖e‖²`; ties go to the lowest index, as
/// `torch.argmin`. Any dtype or device other than f32 on the CPU takes candle's tensor ops.
pub fn nearest_code(z: &Tensor, codebook: &Tensor, codebook_sq: &Tensor) -> Result<Tensor> {
    let fast = [z, codebook, codebook_sq].iter().all(|t| super::fast_path(t));
    if !fast {
        return nearest_code_reference(z, codebook, codebook_sq);
    }
    let (n, c) = z.dims2()?;
    let (k, width) = codebook.dims2()?;
    if width != c {
        candle_core::bail!("nearest_code: vectors of width {c}, codebook entries of {width}");
    }
    let rows = z.flatten_all()?.to_vec1::<f32>()?;
    // component-major [C][K], so that each component's products run over contiguous entries
    let columns = codebook.t()?.flatten_all()?.to_vec1::<f32>()?;
    let entries_sq = codebook_sq.flatten_all()?.to_vec1::<f32>()?;
    if entries_sq.len() != k {
        candle_core::bail!("nearest_code: {} squared norms for {k} entries", entries_sq.len());
    }
    let mut best = vec![0u32; n];
    best.par_chunks_mut(ROWS_PER_TASK).enumerate().for_each(|(task, out)| {
        let (mut dots, mut distances) = (vec![0f32; k], vec![0f32; k]);
        for (i, best) in out.iter_mut().enumerate() {
            let row = &rows[(task * ROWS_PER_TASK + i) * c..][..c];
            dots.fill(0.0);
            for (&r, column) in row.iter().zip(columns.chunks_exact(k)) {
                for (dot, &e) in dots.iter_mut().zip(column) {
                    *dot += r * e;
                }
            }
            let row_sq = row.iter().fold(0f32, |sum, v| sum + v * v);
            for ((d, &dot), &e_sq) in distances.iter_mut().zip(&dots).zip(&entries_sq) {
                *d = row_sq + e_sq - 2.0 * dot;
            }
            *best = first_least(&distances);
        }
    });
    Tensor::from_vec(best, n, z.device())
}

/// Lanes of the least-value scan (one AVX register of f32).
const LANES: usize = 8;

/// The first index of the least value (NaNs are never chosen; all NaN: 0). Each of `LANES`
/// lanes keeps its first least value, then the lanes' least value with the lowest index wins.
fn first_least(values: &[f32]) -> u32 {
    let mut least = [f32::INFINITY; LANES];
    let mut index = [0u32; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder();
    for (c, chunk) in chunks.enumerate() {
        for lane in 0..LANES {
            if chunk[lane] < least[lane] {
                least[lane] = chunk[lane];
                index[lane] = (c * LANES + lane) as u32;
            }
        }
    }
    let first_tail = (values.len() - tail.len()) as u32;
    let candidates = least.iter().zip(index).chain(tail.iter().zip(first_tail..));
    let mut best = (f32::INFINITY, 0u32);
    for (&v, i) in candidates {
        if v < best.0 || (v == best.0 && i < best.1) {
            best = (v, i);
        }
    }
    best.1
}

/// [`nearest_code`] as candle tensor ops: the whole `[N, K]` distance matrix, then `argmin`.
pub fn nearest_code_reference(
    z: &Tensor,
    codebook: &Tensor,
    codebook_sq: &Tensor,
) -> Result<Tensor> {
    let k = codebook.dim(0)?;
    let distances = z
        .sqr()?
        .sum_keepdim(1)?
        .broadcast_add(&codebook_sq.reshape((1, k))?)?
        .broadcast_sub(&(z.matmul(&codebook.t()?)? * 2.0)?)?;
    distances.argmin(1)?.to_dtype(DType::U32)
}
