//! LayerNorm over the last dimension: a task normalises a block of rows, each row with a mean
//! pass, a variance pass around that mean, and one scale-and-offset pass.

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::norm::sum_shifted_pow;

/// Values per parallel task (whole rows).
const BLOCK: usize = 1 << 14;

/// `(x − mean)/√(var + eps)·gamma + beta` for every row of `x` (rows of `gamma.len()`).
pub fn layer_norm(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32) -> Vec<f32> {
    let width = gamma.len();
    let rows_per_task = (BLOCK / width).max(1);
    // SAFETY: the tasks tile the output by whole rows and write them whole; the layer checked
    // AVX2/FMA.
    unsafe {
        super::filled(x.len(), |dst| {
            x.par_chunks(width * rows_per_task).enumerate().for_each(|(i, x)| {
                for (r, row) in x.chunks_exact(width).enumerate() {
                    let y = dst.get().add((i * rows_per_task + r) * width);
                    norm_row(row, std::slice::from_raw_parts_mut(y, width), gamma, beta, eps);
                }
            })
        })
    }
}

/// Normalises one row.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn norm_row(x: &[f32], y: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let n = x.len() as f64;
    let mean = (sum_shifted_pow(x, 0.0, 1) / n) as f32;
    let var = sum_shifted_pow(x, -mean, 2) / n;
    let inv_std = (1.0 / (var + eps as f64).sqrt()) as f32;
    let (m, s) = (_mm256_set1_ps(mean), _mm256_set1_ps(inv_std));
    let whole = x.len() / 8 * 8;
    for i in (0..whole).step_by(8) {
        let v = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x[i..].as_ptr()), m), s);
        let g = _mm256_loadu_ps(gamma[i..].as_ptr());
        let out = _mm256_fmadd_ps(v, g, _mm256_loadu_ps(beta[i..].as_ptr()));
        _mm256_storeu_ps(y[i..].as_mut_ptr(), out);
    }
    for i in whole..x.len() {
        y[i] = ((x[i] - mean) * inv_std).mul_add(gamma[i], beta[i]);
    }
}
