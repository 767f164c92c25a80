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

/// `x·Wᵀ + bias` for `x` (`[tokens][in]`, row-major), with `Wᵀ` packed as `[out / NR][in][NR]`
/// (zero columns past `out`) and `bias` padded to whole panels. Returns `[tokens][out]`,
/// row-major.
pub fn linear(x: &[f32], weights: &[f32], bias: &[f32], features: (usize, usize)) -> Vec<f32> {
    let (in_features, out_features) = features;
    let tokens = x.len() / in_features;
    let tasks = split(tokens, bias.len() / NR, rayon::current_num_threads());
    // SAFETY: the tasks cover every (token, feature) of the output, each exactly once, and the
    // layer checked AVX2/FMA.
    unsafe {
        super::filled(tokens * out_features, |dst| {
            tasks.par_iter().for_each(|task| {
                SLAB.with(|slab| {
                    let slab = &mut *slab.borrow_mut();
                    run(task, x, weights, bias, features, slab, dst);
                })
            })
        })
    }
}

/// Splits the tokens into blocks of at most `TOKENS_MAX` (a multiple of `threads` of them),
/// then the output panels too while there are fewer than four tasks per thread.
fn split(tokens: usize, panels: usize, threads: usize) -> Vec<Task> {
    let token_panels = tokens.div_ceil(MR);
    let count = token_panels.div_ceil(TOKENS_MAX / MR).next_multiple_of(threads).min(token_panels);
    let parts = (4 * threads).div_ceil(count.max(1)).min(panels);
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

/// One task, slab by slab along the reduction: pack the task's tokens, then every tile.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `out` must hold `[tokens][out features]`, of which no
/// other task writes this task's part.
unsafe fn run(
    task: &Task,
    x: &[f32],
    weights: &[f32],
    bias: &[f32],
    (depth, width): (usize, usize),
    slab: &mut Vec<f32>,
    out: SharedMut,
) {
    let slabs = depth.div_ceil(KC_MAX);
    let token_panels = task.tokens.len().div_ceil(MR);
    for s in 0..slabs {
        let ks = s * depth / slabs..(s + 1) * depth / slabs;
        pack_tokens(x, depth, task.tokens.clone(), ks.clone(), slab);
        for f in task.panels.clone() {
            let b = Strided { ptr: weights[(f * depth + ks.start) * NR..].as_ptr(), ld: NR };
            let start = if s == 0 {
                Start::ColumnBias(bias[f * NR..][..NR].try_into().expect("NR values"))
            } else {
                Start::Load
            };
            let cols = NR.min(width - f * NR);
            for t in 0..token_panels {
                let first = task.tokens.start + t * MR;
                let tile_args = Tile {
                    k: ks.len(),
                    a: slab[t * ks.len() * MR..].as_ptr(),
                    lda: MR,
                    b,
                    c: out.get().add(first * width + f * NR),
                    ldc: width,
                };
                tile_part(tile_args, MR.min(task.tokens.end - first), cols, start);
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
