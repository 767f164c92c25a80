//! Elementwise activations: the exact GELU, alone or gating a value (GEGLU), eight lanes at a
//! time through [`super::gelu8`], in parallel over blocks of the tensor.

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::gelu8;

/// Values per parallel task: large enough to amortise a task, small enough to split a layer's
/// activations over the threads.
const BLOCK: usize = 1 << 14;

/// `gelu(x)` elementwise.
pub fn gelu(x: &[f32]) -> Vec<f32> {
    // SAFETY: the blocks tile the output and each is written whole; the layer checked AVX2/FMA.
    unsafe {
        super::filled(x.len(), |dst| {
            x.par_chunks(BLOCK).enumerate().for_each(|(i, x)| {
                let y = std::slice::from_raw_parts_mut(dst.get().add(i * BLOCK), x.len());
                gated(x, None, y);
            })
        })
    }
}

/// `value · gelu(gate)` for rows `[value (inner) | gate (inner)]` of `x`, giving rows of `inner`.
pub fn geglu(x: &[f32], inner: usize) -> Vec<f32> {
    let rows = x.len() / (2 * inner);
    let rows_per_task = (BLOCK / inner).max(1);
    // SAFETY: as in `gelu`, each task writes its rows whole.
    unsafe {
        super::filled(rows * inner, |dst| {
            x.par_chunks(2 * inner * rows_per_task).enumerate().for_each(|(i, x)| {
                for (r, row) in x.chunks_exact(2 * inner).enumerate() {
                    let at = (i * rows_per_task + r) * inner;
                    let y = std::slice::from_raw_parts_mut(dst.get().add(at), inner);
                    gated(&row[inner..], Some(&row[..inner]), y);
                }
            })
        })
    }
}

/// `y = gelu(gate)`, times `value` when given (all of one length).
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn gated(gate: &[f32], value: Option<&[f32]>, y: &mut [f32]) {
    let one = _mm256_set1_ps(1.0);
    let at = |s: Option<&[f32]>, i: usize| s.map_or(one, |s| _mm256_loadu_ps(s[i..].as_ptr()));
    let whole = gate.len() / 8 * 8;
    for i in (0..whole).step_by(8) {
        let g = gelu8(_mm256_loadu_ps(gate[i..].as_ptr()));
        _mm256_storeu_ps(y[i..].as_mut_ptr(), _mm256_mul_ps(g, at(value, i)));
    }
    // The tail through one padded vector, so that every element gets the same arithmetic.
    let tail = gate.len() - whole;
    if tail > 0 {
        let (mut g, mut v, mut out) = ([0f32; 8], [1f32; 8], [0f32; 8]);
        g[..tail].copy_from_slice(&gate[whole..]);
        if let Some(value) = value {
            v[..tail].copy_from_slice(&value[whole..]);
        }
        let r = _mm256_mul_ps(gelu8(_mm256_loadu_ps(g.as_ptr())), _mm256_loadu_ps(v.as_ptr()));
        _mm256_storeu_ps(out.as_mut_ptr(), r);
        y[whole..].copy_from_slice(&out[..tail]);
    }
}
