//! Fused attention `softmax(q·kᵀ·scale + bias)·v` with an online softmax: a task owns `QB`
//! queries of one head and walks the keys `TK` at a time, so only a `TK × QB` tile of scores
//! ever exists. Scores are kept key-major (`[key][query]`): the score tile is the micro-kernel's
//! output with keys as rows, the softmax runs down the columns with plain vector operations,
//! and the same tile is the left operand of `p·v` as it stands.

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::{exp8, tile, SharedMut, Start, Strided, Tile, MR, NR};

/// Queries per task: three `NR`-wide strips of scores, eight `MR`-row panels of output.
const QB: usize = 48;
/// Keys per score tile (a multiple of `MR`).
const TK: usize = 96;

/// A `[batch, heads, tokens, width]` tensor read in place: element `(b, h, n, i)` lies at
/// `b·strides[0] + h·strides[1] + n·strides[2] + i`.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub strides: [usize; 3],
    pub tokens: usize,
    pub width: usize,
}

impl View<'_> {
    /// The `width` values of token `n` of head `h` of sample `b`.
    fn row(&self, b: usize, h: usize, n: usize) -> &[f32] {
        let [s0, s1, s2] = self.strides;
        &self.data[b * s0 + h * s1 + n * s2..][..self.width]
    }
}

/// Sizes and scale shared by the three operands.
pub struct Problem {
    pub batch: usize,
    pub heads: usize,
    /// Multiplies `q·kᵀ` (folded into the packed queries).
    pub scale: f32,
}

/// Keys and values of one head, packed once for every query task: keys in `MR`-key panels
/// `[panel][width][MR]`, values as `[key][NR-padded width]`.
struct Packed {
    keys: Vec<f32>,
    values: Vec<f32>,
}

/// Per-task buffers: scaled queries `[width][QB]`, a score tile `[TK][QB]`, the running output
/// `[QB][padded value width]`, and the running maximum, sum and rescale factor per query.
struct Scratch {
    queries: Vec<f32>,
    scores: Vec<f32>,
    out: Vec<f32>,
    max: [f32; QB],
    sum: [f32; QB],
    rescale: [f32; QB],
}

/// `softmax(q·kᵀ·scale + key_bias[b, key])·v` for every sample and head. Returns the output
/// as contiguous `[batch, q tokens, heads, v width]`. Queries with no finite score get zeros.
pub fn attention(q: View, k: View, v: View, p: &Problem, key_bias: Option<&[f32]>) -> Vec<f32> {
    let packed = pack_heads(k, v, p);
    let blocks = q.tokens.div_ceil(QB);
    let value_width = v.width.next_multiple_of(NR);
    let run = |dst: SharedMut| {
        (0..p.batch * p.heads * blocks).into_par_iter().for_each_init(
            || Scratch {
                queries: vec![0.0; q.width * QB],
                scores: vec![0.0; TK * QB],
                out: vec![0.0; QB * value_width],
                max: [0.0; QB],
                sum: [0.0; QB],
                rescale: [0.0; QB],
            },
            |s, task| {
                let (bh, block) = (task / blocks, task % blocks);
                let (b, h) = (bh / p.heads, bh % p.heads);
                let bias = key_bias.map(|m| &m[b * k.tokens..][..k.tokens]);
                let first = block * QB;
                let count = QB.min(q.tokens - first);
                pack_queries(q, b, h, first..first + count, p.scale, &mut s.queries);
                // SAFETY: AVX2/FMA were checked by the layer.
                unsafe { attend(s, &packed[bh], k.tokens, q.width, value_width, count, bias) };
                let inv_sum = s.sum.map(|l| if l > 0.0 { 1.0 / l } else { 0.0 });
                for (i, o) in s.out.chunks_exact(value_width).take(count).enumerate() {
                    let at = ((b * q.tokens + first + i) * p.heads + h) * v.width;
                    for (j, x) in o[..v.width].iter().enumerate() {
                        // SAFETY: each (sample, query, head) row is written by exactly one task.
                        unsafe { dst.get().add(at + j).write(x * inv_sum[i]) };
                    }
                }
            },
        )
    };
    // SAFETY: the tasks write every (sample, query, head) row exactly once.
    unsafe { super::filled(p.batch * q.tokens * p.heads * v.width, run) }
}

/// Packs keys and values of every (sample, head), in parallel.
fn pack_heads(k: View, v: View, p: &Problem) -> Vec<Packed> {
    let value_width = v.width.next_multiple_of(NR);
    (0..p.batch * p.heads)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / p.heads, bh % p.heads);
            let mut keys = vec![0f32; k.tokens.next_multiple_of(MR) * k.width];
            for n in 0..k.tokens {
                let panel = &mut keys[n / MR * MR * k.width..][..MR * k.width];
                for (i, &x) in k.row(b, h, n).iter().enumerate() {
                    panel[i * MR + n % MR] = x;
                }
            }
            let mut values = vec![0f32; v.tokens * value_width];
            for (n, dst) in values.chunks_exact_mut(value_width).enumerate() {
                dst[..v.width].copy_from_slice(v.row(b, h, n));
            }
            Packed { keys, values }
        })
        .collect()
}

/// Writes the queries `tokens` of head `(b, h)`, times `scale`, as columns of `[width][QB]`
/// (zeros beyond the last query).
fn pack_queries(
    q: View,
    b: usize,
    h: usize,
    tokens: std::ops::Range<usize>,
    scale: f32,
    dst: &mut [f32],
) {
    dst.fill(0.0);
    for (j, n) in tokens.enumerate() {
        for (i, &x) in q.row(b, h, n).iter().enumerate() {
            dst[i * QB + j] = x * scale;
        }
    }
}

/// Runs the online softmax over all key tiles for the `count` packed queries in `s`, leaving
/// the unnormalised output in `s.out` and the softmax sums in `s.sum`.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn attend(
    s: &mut Scratch,
    kv: &Packed,
    keys: usize,
    width: usize,
    value_width: usize,
    count: usize,
    bias: Option<&[f32]>,
) {
    s.max.fill(f32::NEG_INFINITY);
    s.sum.fill(0.0);
    s.out.fill(0.0);
    let strips = count.div_ceil(NR);
    let panels = count.div_ceil(MR);
    for k0 in (0..keys).step_by(TK) {
        let tk = TK.min(keys - k0);
        for kp in 0..tk.div_ceil(MR) {
            for strip in 0..strips {
                let t = Tile {
                    k: width,
                    a: kv.keys[(k0 + kp * MR) * width..].as_ptr(),
                    lda: MR,
                    b: Strided { ptr: s.queries[strip * NR..].as_ptr(), ld: QB },
                    c: s.scores[kp * MR * QB + strip * NR..].as_mut_ptr(),
                    ldc: QB,
                };
                tile(t, Start::Zero);
            }
        }
        softmax_update(s, tk, strips * NR, bias.map(|b| &b[k0..k0 + tk]));
        for (row, &r) in s.out.chunks_exact_mut(value_width).zip(&s.rescale).take(panels * MR) {
            scale_row(row, r);
        }
        for panel in 0..panels {
            for col in (0..value_width).step_by(NR) {
                let t = Tile {
                    k: tk,
                    a: s.scores[panel * MR..].as_ptr(),
                    lda: QB,
                    b: Strided {
                        ptr: kv.values[k0 * value_width + col..].as_ptr(),
                        ld: value_width,
                    },
                    c: s.out[panel * MR * value_width + col..].as_mut_ptr(),
                    ldc: value_width,
                };
                tile(t, Start::Load);
            }
        }
    }
}

/// One online-softmax step down the first `cols` query columns of the `keys × QB` score tile:
/// adds the key bias, raises the running maxima, turns the scores into `exp(score − max)`,
/// and records in `s.rescale` the factor that brings earlier sums and outputs to the new maxima.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_update(s: &mut Scratch, keys: usize, cols: usize, bias: Option<&[f32]>) {
    let scores = s.scores.as_mut_ptr();
    for c in (0..cols).step_by(8) {
        let old = _mm256_loadu_ps(s.max[c..].as_ptr());
        let mut max = old;
        for r in 0..keys {
            let at = scores.add(r * QB + c);
            let mut x = _mm256_loadu_ps(at);
            if let Some(bias) = bias {
                x = _mm256_add_ps(x, _mm256_set1_ps(bias[r]));
                _mm256_storeu_ps(at, x);
            }
            max = _mm256_max_ps(max, x);
        }
        let mut sum = _mm256_setzero_ps();
        for r in 0..keys {
            let at = scores.add(r * QB + c);
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(at), max));
            _mm256_storeu_ps(at, e);
            sum = _mm256_add_ps(sum, e);
        }
        let rescale = exp8(_mm256_sub_ps(old, max));
        let total = _mm256_fmadd_ps(_mm256_loadu_ps(s.sum[c..].as_ptr()), rescale, sum);
        _mm256_storeu_ps(s.max[c..].as_mut_ptr(), max);
        _mm256_storeu_ps(s.sum[c..].as_mut_ptr(), total);
        _mm256_storeu_ps(s.rescale[c..].as_mut_ptr(), rescale);
    }
}

/// `row *= r` (a multiple of eight long).
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn scale_row(row: &mut [f32], r: f32) {
    let rv = _mm256_set1_ps(r);
    for chunk in row.chunks_exact_mut(8) {
        _mm256_storeu_ps(chunk.as_mut_ptr(), _mm256_mul_ps(_mm256_loadu_ps(chunk.as_ptr()), rv));
    }
}
