//! Convolution as one matrix product per image, `out[o, pixel] = W[o, k] · col[k, pixel]`,
//! with `k = (in channel, kernel row, kernel column)`: the weights arrive packed in `MR`-row
//! panels, and each task lays its own block of the im2col matrix out in `NR`-column panels,
//! one cache-sized slab of `k` at a time, right before the micro-kernel consumes it.

use std::cell::RefCell;

use rayon::prelude::*;

use super::{tile, SharedMut, Start, Tile, MR, NR};

/// Rows of `k` per packed slab: one `NR`-column panel of it (16 KiB) stays in L1.
const KC_MAX: usize = 256;
/// Pixels per task at most: the slab of a task (`KC_MAX × NC_MAX`, 512 KiB) stays in L2.
const NC_MAX: usize = 512;

/// Shapes and hyper-parameters of one convolution (NCHW input, OIHW weights).
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub batch: usize,
    pub in_c: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub out_c: usize,
    pub out_h: usize,
    pub out_w: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub padding: usize,
}

impl Geometry {
    /// Length of the reduction: input channels × kernel taps.
    fn depth(&self) -> usize {
        self.in_c * self.kh * self.kw
    }

    /// Output pixels per image.
    fn pixels(&self) -> usize {
        self.out_h * self.out_w
    }
}

thread_local! {
    /// Per-thread scratch: the packed slab and one im2col row.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// The convolution of `x` (contiguous NCHW) with `weights` packed as
/// `[out_c / MR][depth][MR]` (zero-padded rows) and `bias` padded to a multiple of `MR`.
/// Returns the contiguous NCHW output.
pub fn conv2d(x: &[f32], weights: &[f32], bias: &[f32], g: &Geometry) -> Vec<f32> {
    let npix = g.pixels();
    let panels = npix.div_ceil(NR);
    // Enough tasks per image for every thread (and some slack), each at most NC_MAX pixels.
    let threads = rayon::current_num_threads();
    let per_image =
        panels.div_ceil(NC_MAX / NR).max((2 * threads).div_ceil(g.batch)).min(panels).max(1);
    let mut out = vec![0f32; g.batch * g.out_c * npix];
    let dst = SharedMut(out.as_mut_ptr());
    let in_len = g.in_c * g.in_h * g.in_w;
    (0..g.batch * per_image).into_par_iter().for_each(|task| {
        let (image, block) = (task / per_image, task % per_image);
        let first = block * panels / per_image * NR;
        let end = ((block + 1) * panels / per_image * NR).min(npix);
        let x_image = &x[image * in_len..][..in_len];
        // SAFETY: tasks write disjoint pixel ranges of the output, which outlives them.
        let out_image = unsafe { dst.get().add(image * g.out_c * npix) };
        SCRATCH.with(|s| {
            let (slab, row) = &mut *s.borrow_mut();
            conv_block(x_image, weights, bias, g, first..end, slab, row, out_image);
        });
    });
    out
}

/// Output pixels `pixels` of one image, all output channels, slab by slab along `k`.
#[allow(clippy::too_many_arguments)]
fn conv_block(
    x: &[f32],
    weights: &[f32],
    bias: &[f32],
    g: &Geometry,
    pixels: std::ops::Range<usize>,
    slab: &mut Vec<f32>,
    row: &mut Vec<f32>,
    out: *mut f32,
) {
    let depth = g.depth();
    let width = pixels.len();
    let panels = width.div_ceil(NR);
    let slabs = depth.div_ceil(KC_MAX);
    slab.resize(KC_MAX * panels * NR, 0.0);
    row.resize(panels * NR, 0.0);
    for s in 0..slabs {
        let (k0, k1) = (s * depth / slabs, (s + 1) * depth / slabs);
        let kc = k1 - k0;
        pack_slab(x, g, k0..k1, pixels.clone(), row, slab);
        for p in 0..panels {
            let cols = NR.min(width - p * NR);
            for (o, panel_bias) in bias.chunks_exact(MR).enumerate() {
                let rows = MR.min(g.out_c - o * MR);
                let start = if s == 0 {
                    Start::RowBias(panel_bias.try_into().expect("MR values"))
                } else {
                    Start::Load
                };
                let t = Tile {
                    k: kc,
                    a: weights[(o * depth + k0) * MR..].as_ptr(),
                    lda: MR,
                    b: slab[p * kc * NR..].as_ptr(),
                    ldb: NR,
                    // SAFETY: row o·MR, column pixels.start + p·NR lies inside this image.
                    c: unsafe { out.add(o * MR * g.pixels() + pixels.start + p * NR) },
                    ldc: g.pixels(),
                };
                // SAFETY: AVX2/FMA were checked by the caller; the packed operands hold full
                // tiles (zero padding) and `rows × cols` lies inside the output.
                unsafe { tile(t, rows, cols, start) };
            }
        }
    }
}

/// Packs rows `ks` and columns `pixels` of the im2col matrix into `NR`-column panels (the last
/// one zero-padded, `row` is a whole number of panels long): panel `p` holds `[ks.len()][NR]`
/// at `p·ks.len()·NR`.
fn pack_slab(
    x: &[f32],
    g: &Geometry,
    ks: std::ops::Range<usize>,
    pixels: std::ops::Range<usize>,
    row: &mut [f32],
    slab: &mut [f32],
) {
    let kc = ks.len();
    let taps = g.kh * g.kw;
    row[pixels.len()..].fill(0.0);
    for (r, k) in ks.enumerate() {
        let (c, tap) = (k / taps, k % taps);
        let plane = &x[c * g.in_h * g.in_w..][..g.in_h * g.in_w];
        im2col_row(plane, g, tap / g.kw, tap % g.kw, pixels.start, &mut row[..pixels.len()]);
        for (p, chunk) in row.chunks_exact(NR).enumerate() {
            slab[(p * kc + r) * NR..][..NR].copy_from_slice(chunk);
        }
    }
}

/// One im2col row: input plane values under kernel tap `(i, j)` for the output pixels
/// `first..first + row.len()`, zero where the tap falls in the padding.
fn im2col_row(plane: &[f32], g: &Geometry, i: usize, j: usize, first: usize, row: &mut [f32]) {
    let (s, pad) = (g.stride as isize, g.padding as isize);
    let mut n = first;
    for seg in split_rows(row, first, g.out_w) {
        let (oh, ow0) = (n / g.out_w, n % g.out_w);
        n += seg.len();
        let ih = (oh * g.stride + i) as isize - pad;
        if ih < 0 || ih >= g.in_h as isize {
            seg.fill(0.0);
            continue;
        }
        let src = &plane[ih as usize * g.in_w..][..g.in_w];
        // Output columns whose tap lands inside the row: 0 ≤ ow·s + j − pad < in_w.
        let off = j as isize - pad;
        let lo = ((-off).max(0) as usize).div_ceil(g.stride).saturating_sub(ow0).min(seg.len());
        let hi = ((g.in_w as isize - off + s - 1).max(0) as usize / g.stride)
            .saturating_sub(ow0)
            .clamp(lo, seg.len());
        seg[..lo].fill(0.0);
        seg[hi..].fill(0.0);
        let iw0 = ((ow0 + lo) * g.stride) as isize + off;
        let dst = &mut seg[lo..hi];
        if g.stride == 1 {
            dst.copy_from_slice(&src[iw0 as usize..][..dst.len()]);
        } else {
            for (v, iw) in dst.iter_mut().zip((iw0 as usize..).step_by(g.stride)) {
                *v = src[iw];
            }
        }
    }
}

/// Splits `row` (pixels `first..` of a `width`-wide image) at the image's row boundaries.
fn split_rows(row: &mut [f32], first: usize, width: usize) -> impl Iterator<Item = &mut [f32]> {
    let mut rest = row;
    let mut n = first;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let len = (width - n % width).min(rest.len());
        let (seg, tail) = std::mem::take(&mut rest).split_at_mut(len);
        rest = tail;
        n += len;
        Some(seg)
    })
}
