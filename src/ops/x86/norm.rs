//! GroupNorm with an optional per-channel shift before, an optional residual added after and
//! an activation last, in one task per (sample, group): the group's block stays in cache for
//! the mean, variance and output passes.

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::{hsum8, silu8};
use crate::ops::group_norm::Activation;

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
    /// Applied last.
    pub activation: Activation,
}

/// GroupNorm of `x` (contiguous `[batch, channels, spatial]`), normalising `x + shift[b, c]`
/// when `shift` (`[batch, channels]`) is given and adding `residual` (`x`'s layout) to the
/// normalised values when given, before the activation.
pub fn group_norm(
    x: &[f32],
    spatial: usize,
    shift: Option<&[f32]>,
    residual: Option<&[f32]>,
    p: &Norm,
) -> Vec<f32> {
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
                let residual = residual.map(|r| &r[u * block..][..block]);
                let y = dst.get().add(u * block);
                let affine = (&p.gamma[channel.clone()], &p.beta[channel]);
                norm_group(x, y, spatial, (shift, residual), affine, p);
            })
        })
    }
}

/// Normalises one group's block `x` (`gamma.len()` channels of `spatial` values) into `y`,
/// with the group's part of the shift and of the residual.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `y` must be valid for `x.len()` values.
#[target_feature(enable = "avx2,fma")]
unsafe fn norm_group(
    x: &[f32],
    y: *mut f32,
    spatial: usize,
    (shift, residual): (Option<&[f32]>, Option<&[f32]>),
    (gamma, beta): (&[f32], &[f32]),
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
        let residual = residual.map(|r| &r[c * spatial..][..spatial]);
        let y = std::slice::from_raw_parts_mut(y.add(c * spatial), spatial);
        affine(xc, residual, y, (scale as f32, offset as f32), p.activation);
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

/// `y = activation(x·scale + offset + residual)` (the residual when given).
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn affine(
    x: &[f32],
    residual: Option<&[f32]>,
    y: &mut [f32],
    (scale, offset): (f32, f32),
    activation: Activation,
) {
    let (s, o) = (_mm256_set1_ps(scale), _mm256_set1_ps(offset));
    let whole = x.len() / 8 * 8;
    for i in (0..whole).step_by(8) {
        let mut v = _mm256_fmadd_ps(_mm256_loadu_ps(x[i..].as_ptr()), s, o);
        if let Some(r) = residual {
            v = _mm256_add_ps(v, _mm256_loadu_ps(r[i..].as_ptr()));
        }
        let v = match activation {
            Activation::Identity => v,
            Activation::Silu => silu8(v),
            Activation::Relu => _mm256_max_ps(v, _mm256_setzero_ps()),
        };
        _mm256_storeu_ps(y[i..].as_mut_ptr(), v);
    }
    for i in whole..x.len() {
        let v = x[i].mul_add(scale, offset) + residual.map_or(0.0, |r| r[i]);
        y[i] = match activation {
            Activation::Identity => v,
            Activation::Silu => v / (1.0 + (-v).exp()),
            Activation::Relu => v.max(0.0),
        };
    }
}
