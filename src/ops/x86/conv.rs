//! Convolution as matrix products `out[o, column] = W[o, k] · col[k, column]` with
//! `k = (in channel, kernel row, kernel column)`, on weights packed once into `MR`-row panels.
//!
//! The input is first copied into zero-padded images. For stride 1 the im2col matrix is then
//! read in place: row `k` of it is the padded image shifted by a fixed offset, so a panel of
//! `NR` consecutive columns is `NR` consecutive values of a padded row. When output rows are a
//! whole number of panels wide the columns are simply the output pixels; on other wide images
//! they are the positions of the padded image, the `kw − 1` past each output row computed and
//! dropped. Other convolutions (stride 2, small images) gather the matrix once into `NR`-column
//! panels, all images side by side so that small images still fill the panels.
//!
//! Work is split into tasks of at most `NC_MAX` columns and, when that leaves too few tasks,
//! ranges of output channels; each task multiplies into its own scratch tile block and then
//! copies the valid columns into the NCHW output.

use std::borrow::Cow;
use std::cell::RefCell;
use std::ops::Range;

use rayon::prelude::*;

use super::{tile, Gathered, Rows, SharedMut, Start, Strided, Tile, MR, NR};

/// Rows of `k` per slab: one `NR`-column panel of a slab (16 KiB) stays in L1.
const KC_MAX: usize = 256;
/// Columns per task at most: a task's share of a slab (256 KiB) stays in L2.
const NC_MAX: usize = 256;

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

    /// Width and height of the zero-padded input.
    fn padded(&self) -> (usize, usize) {
        (self.in_w + 2 * self.padding, self.in_h + 2 * self.padding)
    }
}

/// The zero-padded input `[batch][in_c][padded h][padded w]` (the input itself when there is
/// no padding and nothing reads past its end) and, for each row `k = (c, i, j)` of the im2col
/// matrix, its offset from a pixel's top-left tap.
struct Padded<'a> {
    images: Cow<'a, [f32]>,
    offsets: Vec<usize>,
}

impl<'a> Padded<'a> {
    /// `slack`: whether readers may run up to `wp + NR` values past the last image.
    fn new(x: &'a [f32], g: &Geometry, slack: bool) -> Self {
        let (wp, hp) = g.padded();
        let offsets = (0..g.in_c)
            .flat_map(|c| {
                (0..g.kh).flat_map(move |i| (0..g.kw).map(move |j| (c * hp + i) * wp + j))
            })
            .collect();
        if g.padding == 0 && !slack {
            return Self { images: Cow::Borrowed(x), offsets };
        }
        let planes = g.batch * g.in_c;
        let slack = if slack { wp + NR } else { 0 };
        // SAFETY: every plane is written whole (padding, then rows), and the slack is zeroed.
        let images = unsafe {
            super::filled(planes * hp * wp + slack, |dst| {
                (0..planes).into_par_iter().for_each(|p| {
                    let src = &x[p * g.in_h * g.in_w..][..g.in_h * g.in_w];
                    pad_plane(src, dst.get().add(p * hp * wp), g);
                });
                std::ptr::write_bytes(dst.get().add(planes * hp * wp), 0, slack);
            })
        };
        Self { images: Cow::Owned(images), offsets }
    }
}

/// Writes the `padded h × padded w` plane at `dst`: `src` (`in_h × in_w`) framed by zeros.
///
/// # Safety
/// `dst` must be valid for the whole padded plane.
unsafe fn pad_plane(src: &[f32], dst: *mut f32, g: &Geometry) {
    let (wp, p) = (g.padded().0, g.padding);
    std::ptr::write_bytes(dst, 0, p * wp + p);
    for (r, row) in src.chunks_exact(g.in_w).enumerate() {
        let at = dst.add((p + r) * wp + p);
        std::ptr::copy_nonoverlapping(row.as_ptr(), at, g.in_w);
        // The right padding of this row, and the left padding of the next one.
        std::ptr::write_bytes(at.add(g.in_w), 0, 2 * p);
    }
    std::ptr::write_bytes(dst.add((p + g.in_h) * wp + p), 0, p * wp - p);
}

/// Where the columns of the im2col matrix come from.
enum Columns<'a> {
    /// Stride 1, and each panel of output pixels contiguous in the padded image (output rows a
    /// whole number of panels wide, or a 1×1 unpadded convolution on a whole number of panels):
    /// columns are the output pixels of all images in a row, read in place.
    Rows(Padded<'a>),
    /// Stride 1, other rows at least 8 columns per extra kernel column wide: columns are the
    /// positions of each padded image, read in place; the `kw − 1` past each output row are
    /// computed and dropped (≤ 1/8 extra work, less than packing costs on such images).
    Positions(Padded<'a>),
    /// Otherwise: output pixels of all images in a row, gathered once from the padded images
    /// into `[column panel][depth][NR]`.
    Packed(Vec<f32>),
}

impl<'a> Columns<'a> {
    fn new(x: &'a [f32], g: &Geometry) -> Self {
        let contiguous = g.kw == 1 && g.padding == 0 && g.pixels().is_multiple_of(NR);
        if g.stride == 1 && (g.out_w.is_multiple_of(NR) || contiguous) {
            return Columns::Rows(Padded::new(x, g, false));
        }
        let positions = g.stride == 1 && 8 * (g.kw - 1) <= g.out_w;
        let padded = Padded::new(x, g, positions);
        if positions {
            return Columns::Positions(padded);
        }
        let (depth, cols) = (g.depth(), g.batch * g.pixels());
        let count = cols.div_ceil(NR);
        // SAFETY: each panel is written whole by one job.
        let panels = unsafe {
            super::filled(depth * count * NR, |dst| {
                (0..count).into_par_iter().for_each(|p| {
                    let cols = p * NR..cols.min(p * NR + NR);
                    gather_panel(&padded, g, cols, dst.get().add(p * depth * NR))
                })
            })
        };
        Columns::Packed(panels)
    }

    /// Columns per output row: the padded width for positions, else the output width.
    fn pitch(&self, g: &Geometry) -> usize {
        match self {
            Columns::Positions(_) => g.padded().0,
            Columns::Rows(_) | Columns::Packed(_) => g.out_w,
        }
    }

    /// The independent column ranges `(first image, columns)`: one per image for positions,
    /// else all images in one.
    fn spaces(&self, g: &Geometry) -> Vec<(usize, usize)> {
        let per_image = g.out_h * self.pitch(g);
        match self {
            Columns::Positions(_) => (0..g.batch).map(|b| (b, per_image)).collect(),
            Columns::Rows(_) | Columns::Packed(_) => vec![(0, g.batch * per_image)],
        }
    }

    /// For in-place columns: the offset in the padded images of column `col` of the space
    /// starting at image `image`.
    fn position(&self, g: &Geometry, image: usize, col: usize) -> usize {
        let (wp, hp) = g.padded();
        let image_len = g.in_c * hp * wp;
        match self {
            Columns::Rows(_) => {
                let (image, pixel) = (col / g.pixels(), col % g.pixels());
                image * image_len + pixel / g.out_w * wp + pixel % g.out_w
            }
            Columns::Positions(_) | Columns::Packed(_) => image * image_len + col,
        }
    }
}

/// One task: columns `cols` of the space starting at image `image`, output panels `outs`.
struct Task {
    image: usize,
    cols: Range<usize>,
    outs: Range<usize>,
}

thread_local! {
    /// Per-thread scratch: a task's output block.
    static BLOCK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The convolution of `x` (contiguous NCHW) with `weights` packed as `[out_c / MR][depth][MR]`
/// (zero rows past `out_c`) and `bias` padded to whole panels, plus `residual` (contiguous,
/// the output's shape) when given. Returns contiguous NCHW.
pub fn conv2d(
    x: &[f32],
    weights: &[f32],
    bias: &[f32],
    g: &Geometry,
    residual: Option<&[f32]>,
) -> Vec<f32> {
    let columns = Columns::new(x, g);
    let tasks = split(&columns.spaces(g), g.out_c.div_ceil(MR), rayon::current_num_threads());
    // SAFETY: the tasks cover every (image, channel, pixel) of the output, each exactly once.
    unsafe {
        super::filled(g.batch * g.out_c * g.pixels(), |dst| {
            tasks.par_iter().for_each(|task| {
                BLOCK.with(|block| {
                    let block = &mut *block.borrow_mut();
                    multiply(task, &columns, weights, bias, g, block);
                    scatter(task, block, columns.pitch(g), g, residual, dst);
                })
            })
        })
    }
}

/// Splits every column space into blocks of at most `NC_MAX` columns (a multiple of `threads`
/// of them, so that threads end together), then output panels too while there are fewer than
/// four tasks per thread.
fn split(spaces: &[(usize, usize)], out_panels: usize, threads: usize) -> Vec<Task> {
    let mut blocks = Vec::new();
    for &(image, cols) in spaces {
        let panels = cols.div_ceil(NR);
        let count = panels.div_ceil(NC_MAX / NR).next_multiple_of(threads).min(panels);
        let edge = |b: usize| (b * panels / count * NR).min(cols);
        blocks.extend((0..count).map(|b| (image, edge(b)..edge(b + 1))));
    }
    let parts = (4 * threads).div_ceil(blocks.len().max(1)).min(out_panels);
    let outs = |p: usize| p * out_panels / parts..(p + 1) * out_panels / parts;
    blocks
        .into_iter()
        .flat_map(|(image, cols)| {
            (0..parts).map(move |p| Task { image, cols: cols.clone(), outs: outs(p) })
        })
        .collect()
}

/// Computes the task's output block `[outs·MR][cols rounded up to NR]` into `block`, slab by
/// slab along `k` (bias first, then accumulating).
fn multiply(
    task: &Task,
    columns: &Columns,
    weights: &[f32],
    bias: &[f32],
    g: &Geometry,
    block: &mut Vec<f32>,
) {
    let depth = g.depth();
    let ldc = task.cols.len().next_multiple_of(NR);
    block.resize(task.outs.len() * MR * ldc, 0.0);
    let slabs = depth.div_ceil(KC_MAX);
    for slab in 0..slabs {
        let ks = slab * depth / slabs..(slab + 1) * depth / slabs;
        match columns {
            Columns::Packed(panels) => {
                let first = task.cols.start / NR;
                let b = |p: usize| Strided {
                    ptr: panels[((first + p) * depth + ks.start) * NR..].as_ptr(),
                    ld: NR,
                };
                slab_product(task, weights, bias, depth, ks.clone(), ldc, block, b);
            }
            Columns::Rows(Padded { images, offsets })
            | Columns::Positions(Padded { images, offsets }) => {
                let b = |p: usize| Gathered {
                    base: images[columns.position(g, task.image, task.cols.start + p * NR)..]
                        .as_ptr(),
                    offsets: offsets[ks.start..].as_ptr(),
                };
                slab_product(task, weights, bias, depth, ks.clone(), ldc, block, b);
            }
        }
    }
}

/// One slab's contribution to the task's output block: for each column panel `p` (right
/// operand `b(p)`), every output panel of the task.
#[allow(clippy::too_many_arguments)]
fn slab_product<B: Rows>(
    task: &Task,
    weights: &[f32],
    bias: &[f32],
    depth: usize,
    ks: Range<usize>,
    ldc: usize,
    block: &mut [f32],
    b: impl Fn(usize) -> B,
) {
    for p in 0..ldc / NR {
        let b = b(p);
        for (i, o) in task.outs.clone().enumerate() {
            let start = if ks.start == 0 {
                Start::RowBias(bias[o * MR..][..MR].try_into().expect("MR values"))
            } else {
                Start::Load
            };
            let t = Tile {
                k: ks.len(),
                a: weights[(o * depth + ks.start) * MR..].as_ptr(),
                lda: MR,
                b,
                c: block[i * MR * ldc + p * NR..].as_mut_ptr(),
                ldc,
            };
            // SAFETY: AVX2/FMA were checked by the layer; weights are whole zero-padded panels,
            // `b` covers `ks` for NR columns (packed panels, or padded images with slack), and
            // the block holds the full tile.
            unsafe { tile(t, start) };
        }
    }
}

/// A run of columns holding consecutive output pixels of one output row.
struct Run {
    col: usize,
    len: usize,
    image: usize,
    oh: usize,
    ow: usize,
}

/// The runs of columns `cols` (laid out as images × output rows × `pitch` columns, of which
/// the first `out_w` are pixels), images counted from `image`.
fn runs(
    cols: Range<usize>,
    pitch: usize,
    image: usize,
    g: &Geometry,
) -> impl Iterator<Item = Run> + '_ {
    let per_image = g.out_h * pitch;
    let mut col = cols.start;
    std::iter::from_fn(move || loop {
        if col >= cols.end {
            return None;
        }
        let (oh, ow) = (col % per_image / pitch, col % pitch);
        let len = (pitch - ow).min(cols.end - col);
        let run = Run {
            col,
            len: len.min(g.out_w.saturating_sub(ow)),
            image: image + col / per_image,
            oh,
            ow,
        };
        col += len;
        if run.len > 0 {
            return Some(run);
        }
    })
}

/// Gathers columns `cols` (at most `NR`; output pixels of all images in a row) of the im2col
/// matrix into the panel `[depth][NR]` at `panel`; missing columns read the first image's
/// corner.
///
/// # Safety
/// `panel` must be valid for `depth × NR` values.
unsafe fn gather_panel(padded: &Padded, g: &Geometry, cols: Range<usize>, panel: *mut f32) {
    let (wp, hp) = g.padded();
    let mut base = [0usize; NR];
    for (b, n) in base.iter_mut().zip(cols) {
        let (image, pixel) = (n / g.pixels(), n % g.pixels());
        let (oh, ow) = (pixel / g.out_w, pixel % g.out_w);
        *b = (image * g.in_c * hp + oh * g.stride) * wp + ow * g.stride;
    }
    for (k, &offset) in padded.offsets.iter().enumerate() {
        let src = &padded.images[offset..];
        for (j, &b) in base.iter().enumerate() {
            panel.add(k * NR + j).write(src[b]);
        }
    }
}

/// Copies the valid columns of a task's output block into the NCHW output, adding the
/// matching values of `residual` (same shape as the output) when given.
///
/// # Safety
/// `out` must hold the whole output, and no other task may write this task's part.
unsafe fn scatter(
    task: &Task,
    block: &[f32],
    pitch: usize,
    g: &Geometry,
    residual: Option<&[f32]>,
    out: SharedMut,
) {
    let ldc = task.cols.len().next_multiple_of(NR);
    let first = task.outs.start * MR;
    let channels = first..(task.outs.end * MR).min(g.out_c);
    for run in runs(task.cols.clone(), pitch, task.image, g) {
        let pixel = run.image * g.out_c * g.pixels() + run.oh * g.out_w + run.ow;
        for o in channels.clone() {
            let src = &block[(o - first) * ldc + run.col - task.cols.start..][..run.len];
            let at = pixel + o * g.pixels();
            let dst = out.get().add(at);
            match residual {
                None => std::ptr::copy_nonoverlapping(src.as_ptr(), dst, run.len),
                Some(r) => {
                    for (i, (s, r)) in src.iter().zip(&r[at..at + run.len]).enumerate() {
                        dst.add(i).write(s + r);
                    }
                }
            }
        }
    }
}
