//! Fully connected layer `y[n, o] = Σ_c x[n, c]·W[o, c] + b[o]` as one matrix product: the
//! tokens `n` form the `MR`-row panels (packed slab by slab per call) and the output features
//! the `NR`-column panels of `Wᵀ`, packed once at load. Tiles land directly in the row-major
//! output.

use std::cell::RefCell;
use std::ops::Range;

use rayon::prelude::*;

use super::{tile_part, SharedMut, Start, Strided, Tile, MR, NR};

/// Rows of the reduction per slab: one packed panel of the weights (16 KiB) stays in L1.
const KC_MAX: usize = 256;
/// Tokens per task at most (a multiple of `MR`): a task's packed slab (about 256 KiB) stays
/// in L2.
const TOKENS_MAX: usize = 42 * MR;

/// One task: tokens `tokens`, output feature panels `panels`.
struct Task {
    tokens: Range<usize>,
    panels: Range<usize>,
}

thread_local! {
    /// Per-thread scratch: a task's tokens, packed slab by slab.
    static SLAB: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The packed weights of one layer: `Wᵀ` as `[out / NR][in][NR]` (zero columns past `out`),
/// `bias` padded to whole panels, and the (in, out) features.
#[derive(Clone, Copy)]
pub struct Weights<'a> {
    pub packed: &'a [f32],
    pub bias: &'a [f32],
    pub features: (usize, usize),
}

/// `x·Wᵀ + bias (+ residual)` for `x` (`[tokens][in]`, row-major) and `residual`
/// (`[tokens][out]`, when given). Returns `[tokens][out]`, row-major.
pub fn linear(x: &[f32], w: Weights, residual: Option<&[f32]>) -> Vec<f32> {
    let (in_features, out_features) = w.features;
    let tokens = x.len() / in_features;
    let tasks = split(tokens, w.bias.len() / NR, rayon::current_num_threads());
    // SAFETY: the tasks cover every (token, feature) of the output, each exactly once, and the
    // layer checked AVX2/FMA.
    unsafe {
        super::filled(tokens * out_features, |dst| {
            tasks.par_iter().for_each(|task| {
                SLAB.with(|slab| {
                    let slab = &mut *slab.borrow_mut();
                    run(task, x, w, residual, slab, dst);
                })
            })
        })
    }
}

/// Splits the tokens into blocks of at most `TOKENS_MAX` (a multiple of `threads` of them),
/// then the output panels too while there are fewer than two tasks per thread (each task packs
/// its tokens itself, so splitting the panels packs the same tokens again).
fn split(tokens: usize, panels: usize, threads: usize) -> Vec<Task> {
    let token_panels = tokens.div_ceil(MR);
    let count = token_panels.div_ceil(TOKENS_MAX / MR).next_multiple_of(threads).min(token_panels);
    let parts = (2 * threads).div_ceil(count.max(1)).min(panels);
    let edge = |b: usize| (b * token_panels / count * MR).min(tokens);
    (0..count)
        .flat_map(|b| {
            (0..parts).map(move |p| Task {
                tokens: edge(b)..edge(b + 1),
                panels: p * panels / parts..(p + 1) * panels / parts,
            })
        })
        .collect()
}

/// One task, slab by slab along the reduction: pack the task's tokens, then every tile. The
/// first slab starts each tile from the bias, or from the bias plus the residual.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `out` must hold `[tokens][out features]`, of which no
/// other task writes this task's part.
unsafe fn run(
    task: &Task,
    x: &[f32],
    w: Weights,
    residual: Option<&[f32]>,
    slab: &mut Vec<f32>,
    out: SharedMut,
) {
    let Weights { packed: weights, bias, features: (depth, width) } = w;
    let slabs = depth.div_ceil(KC_MAX);
    let token_panels = task.tokens.len().div_ceil(MR);
    for s in 0..slabs {
        let ks = s * depth / slabs..(s + 1) * depth / slabs;
        pack_tokens(x, depth, task.tokens.clone(), ks.clone(), slab);
        for f in task.panels.clone() {
            let b = Strided { ptr: weights[(f * depth + ks.start) * NR..].as_ptr(), ld: NR };
            let bias = &bias[f * NR..][..NR];
            let start = match (s, residual) {
                (0, None) => Start::ColumnBias(bias.try_into().expect("NR values")),
                _ => Start::Load,
            };
            let cols = NR.min(width - f * NR);
            for t in 0..token_panels {
                let first = task.tokens.start + t * MR;
                let rows = MR.min(task.tokens.end - first);
                let c = out.get().add(first * width + f * NR);
                if let (0, Some(residual)) = (s, residual) {
                    for r in 0..rows {
                        let at = (first + r) * width + f * NR;
                        for (j, (&v, &b)) in residual[at..at + cols].iter().zip(bias).enumerate() {
                            c.add(r * width + j).write(v + b);
                        }
                    }
                }
                let tile_args = Tile {
                    k: ks.len(),
                    a: slab[t * ks.len() * MR..].as_ptr(),
                    lda: MR,
                    b,
                    c,
                    ldc: width,
                };
                tile_part(tile_args, rows, cols, start);
            }
        }
    }
}

/// Packs columns `ks` of the rows `tokens` of `x` into `[token panel][ks.len()][MR]` (zero rows
/// past the last token).
fn pack_tokens(
    x: &[f32],
    depth: usize,
    tokens: Range<usize>,
    ks: Range<usize>,
    slab: &mut Vec<f32>,
) {
    let kc = ks.len();
    slab.clear();
    slab.resize(tokens.len().next_multiple_of(MR) * kc, 0.0);
    for (t, n) in tokens.enumerate() {
        let panel = &mut slab[t / MR * MR * kc..][..MR * kc];
        for (k, &v) in x[n * depth + ks.start..][..kc].iter().enumerate() {
            panel[k * MR + t % MR] = v;
        }
    }
}
