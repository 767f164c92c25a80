//! GroupNorm with optional per-channel shift before and SiLU after, in one task per (sample,
//! group): the group's block stays in cache for the mean, variance and output passes.

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::{hsum8, silu8};

/// The affine part and options of one GroupNorm.
pub struct Norm<'a> {
    /// Number of groups; divides the channels.
    pub groups: usize,
    /// Added to the variance.
    pub eps: f64,
    /// Per-channel scale.
    pub gamma: &'a [f32],
    /// Per-channel offset.
    pub beta: &'a [f32],
    /// Whether SiLU follows.
    pub silu: bool,
}

/// GroupNorm of `x` (contiguous `[batch, channels, spatial]`), normalising `x + shift[b, c]`
/// when `shift` (`[batch, channels]`) is given.
pub fn group_norm(x: &[f32], spatial: usize, shift: Option<&[f32]>, p: &Norm) -> Vec<f32> {
    let channels = p.gamma.len();
    let per_group = channels / p.groups;
    let block = per_group * spatial;
    // SAFETY: the groups tile the output and each writes its block whole; the layer checked
    // AVX2/FMA before calling.
    unsafe {
        super::filled(x.len(), |dst| {
            x.par_chunks(block).enumerate().for_each(|(u, x)| {
                let first = u % p.groups * per_group;
                let channel = first..first + per_group;
                let shift = shift.map(|s| &s[u / p.groups * channels..][channel.clone()]);
                let y = dst.get().add(u * block);
                norm_group(x, y, spatial, shift, &p.gamma[channel.clone()], &p.beta[channel], p);
            })
        })
    }
}

/// Normalises one group's block `x` (`gamma.len()` channels of `spatial` values) into `y`.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `y` must be valid for `x.len()` values.
#[target_feature(enable = "avx2,fma")]
unsafe fn norm_group(
    x: &[f32],
    y: *mut f32,
    spatial: usize,
    shift: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    p: &Norm,
) {
    let shift_of = |c: usize| shift.map_or(0.0, |s| s[c]);
    let n = x.len() as f64;
    let channels = || x.chunks_exact(spatial).enumerate();
    let sum: f64 = channels()
        .map(|(c, xc)| sum_shifted_pow(xc, 0.0, 1) + spatial as f64 * shift_of(c) as f64)
        .sum();
    let mean = sum / n;
    let var = channels().map(|(c, xc)| sum_shifted_pow(xc, (shift_of(c) as f64 - mean) as f32, 2));
    let inv_std = 1.0 / (var.sum::<f64>() / n + p.eps).sqrt();
    for (c, xc) in x.chunks_exact(spatial).enumerate() {
        let scale = gamma[c] as f64 * inv_std;
        let offset = beta[c] as f64 + (shift_of(c) as f64 - mean) * scale;
        affine(xc, y.add(c * spatial), scale as f32, offset as f32, p.silu);
    }
}

/// `Σ (x + d)^power` for power 1 or 2, eight lanes at a time (four accumulators).
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn sum_shifted_pow(x: &[f32], d: f32, power: u32) -> f64 {
    let dv = _mm256_set1_ps(d);
    let mut acc = [_mm256_setzero_ps(); 4];
    let chunks = x.chunks_exact(32);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (i, a) in acc.iter_mut().enumerate() {
            let v = _mm256_add_ps(_mm256_loadu_ps(chunk[8 * i..].as_ptr()), dv);
            *a = if power == 1 { _mm256_add_ps(*a, v) } else { _mm256_fmadd_ps(v, v, *a) };
        }
    }
    let total = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let tail: f32 = tail.iter().map(|&v| (v + d).powi(power as i32)).sum();
    hsum8(total) as f64 + tail as f64
}

/// `y = x·scale + offset`, then SiLU when asked.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `y` must be valid for `x.len()` values.
#[target_feature(enable = "avx2,fma")]
unsafe fn affine(x: &[f32], y: *mut f32, scale: f32, offset: f32, silu: bool) {
    let (s, o) = (_mm256_set1_ps(scale), _mm256_set1_ps(offset));
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for (i, xc) in chunks.enumerate() {
        let v = _mm256_fmadd_ps(_mm256_loadu_ps(xc.as_ptr()), s, o);
        _mm256_storeu_ps(y.add(8 * i), if silu { silu8(v) } else { v });
    }
    let y = y.add(x.len() - tail.len());
    for (i, xv) in tail.iter().enumerate() {
        let v = xv.mul_add(scale, offset);
        y.add(i).write(if silu { v / (1.0 + (-v).exp()) } else { v });
    }
}
