//! The differentiable CPU convolution used while training: patch extraction (im2col) as an op of
//! its own whose backward is its exact adjoint (col2im), followed by one matrix product.
//! The bias rides in that product as one more weight column against a column of ones, so its
//! gradient comes out of the weight gradient's product rather than from a separate sum over
//! batch and pixels, which candle computes on one thread.
//!
//! candle differentiates its CPU `conv2d` through `conv_transpose2d`, which runs about 9× the
//! forward's time here; written as patches × weights, every gradient is a matrix product
//! (candle's fast gemm) plus one cheap scatter, which makes training on a small CPU practical.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use candle_nn::Conv2dConfig;
use rayon::prelude::*;

/// Whether [`conv2d`] computes this convolution: f32 on the CPU, one group, no dilation.
pub fn supports(x: &Tensor, weight: &Tensor, cfg: &Conv2dConfig) -> bool {
    x.device().is_cpu()
        && x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && cfg.groups == 1
        && cfg.dilation == 1
}

/// `conv2d(x, weight) + bias` with gradients for all three, `x` [B, C, H, W], `weight`
/// [O, C, kh, kw], `bias` \[O]; same result as candle's `conv2d` (see [`supports`]).
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    cfg: &Conv2dConfig,
) -> Result<Tensor> {
    let (batch, channels, in_h, in_w) = x.dims4()?;
    let (out_c, weight_c, kh, kw) = weight.dims4()?;
    if weight_c != channels {
        candle_core::bail!("conv2d: input has {channels} channels, weight expects {weight_c}")
    }
    if in_h + 2 * cfg.padding < kh || in_w + 2 * cfg.padding < kw {
        candle_core::bail!("conv2d: input {in_h}×{in_w} is smaller than the {kh}×{kw} kernel")
    }
    let grid =
        Patches::new((channels, in_h, in_w), (kh, kw), cfg.stride, cfg.padding, bias.is_some());
    let cols = x.contiguous()?.apply_op1(Im2col(grid))?; // [B·OH·OW, C·kh·kw (+ 1)]
    let weight = weight.reshape((out_c, grid.depth()))?;
    let weight = match bias {
        Some(bias) => Tensor::cat(&[&weight, &bias.reshape((out_c, 1))?], 1)?,
        None => weight,
    };
    let y = cols.matmul(&weight.t()?)?; // [B·OH·OW, O]
    y.reshape((batch, grid.out_h, grid.out_w, out_c))?.permute((0, 3, 1, 2))?.contiguous()
}

/// The patch geometry of one convolution's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Patches {
    channels: usize,
    in_h: usize,
    in_w: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
    out_h: usize,
    out_w: usize,
    /// Whether each patch row ends with a 1, the input of the bias column.
    ones_column: bool,
}

impl Patches {
    fn new(
        input: (usize, usize, usize),
        kernel: (usize, usize),
        stride: usize,
        padding: usize,
        ones_column: bool,
    ) -> Self {
        let (channels, in_h, in_w) = input;
        let (kh, kw) = kernel;
        let out = |n: usize, k: usize| (n + 2 * padding - k) / stride + 1;
        Self {
            channels,
            in_h,
            in_w,
            kh,
            kw,
            stride,
            padding,
            out_h: out(in_h, kh),
            out_w: out(in_w, kw),
            ones_column,
        }
    }

    /// Values in one patch.
    fn depth(&self) -> usize {
        self.channels * self.kh * self.kw
    }

    /// Length of a row of the patch matrix: the patch, then the 1 of the bias column if any.
    fn row_len(&self) -> usize {
        self.depth() + usize::from(self.ones_column)
    }

    fn image_len(&self) -> usize {
        self.channels * self.in_h * self.in_w
    }

    fn rows_per_image(&self) -> usize {
        self.out_h * self.out_w
    }

    /// Calls `visit(patch_index, image_index)` for every element of every patch of one image
    /// that falls inside the image (padding elements and the ones column are skipped), in
    /// patch-matrix order.
    fn for_each(&self, mut visit: impl FnMut(usize, usize)) {
        let inside = |pos: usize, k: usize, n: usize| {
            (pos * self.stride + k).checked_sub(self.padding).filter(|&i| i < n)
        };
        for oy in 0..self.out_h {
            for ox in 0..self.out_w {
                let row = (oy * self.out_w + ox) * self.row_len();
                for c in 0..self.channels {
                    for ky in 0..self.kh {
                        let Some(iy) = inside(oy, ky, self.in_h) else { continue };
                        for kx in 0..self.kw {
                            let Some(ix) = inside(ox, kx, self.in_w) else { continue };
                            let col = (c * self.kh + ky) * self.kw + kx;
                            visit(row + col, (c * self.in_h + iy) * self.in_w + ix);
                        }
                    }
                }
            }
        }
    }
}

/// Patch extraction: [B, C, H, W] → [B·OH·OW, C·kh·kw (+ 1)], zeros where a patch overlaps the
/// padding, each row followed by a 1 when the geometry has a ones column.
struct Im2col(Patches);

impl CustomOp1 for Im2col {
    fn name(&self) -> &'static str {
        "slotserve-im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = &self.0;
        let x = super::contiguous_f32(storage, layout)?;
        let batch = layout.shape().dims()[0];
        let per_image = p.rows_per_image() * p.row_len();
        let mut cols = vec![0f32; batch * per_image];
        cols.par_chunks_mut(per_image).zip(x.par_chunks(p.image_len())).for_each(|(out, image)| {
            if p.ones_column {
                out.chunks_exact_mut(p.row_len()).for_each(|row| row[p.depth()] = 1.0);
            }
            p.for_each(|dst, src| out[dst] = image[src]);
        });
        Ok((CpuStorage::F32(cols), Shape::from((batch * p.rows_per_image(), p.row_len()))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Col2im(self.0))?))
    }
}

/// The adjoint of [`Im2col`]: sums each patch element back onto the pixel it was read from.
struct Col2im(Patches);

impl CustomOp1 for Col2im {
    fn name(&self) -> &'static str {
        "slotserve-col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = &self.0;
        let cols = super::contiguous_f32(storage, layout)?;
        let batch = layout.shape().dims()[0] / p.rows_per_image();
        let mut x = vec![0f32; batch * p.image_len()];
        let per_image = p.rows_per_image() * p.row_len();
        x.par_chunks_mut(p.image_len()).zip(cols.par_chunks(per_image)).for_each(|(image, col)| {
            p.for_each(|src, dst| image[dst] += col[src]);
        });
        Ok((CpuStorage::F32(x), Shape::from((batch, p.channels, p.in_h, p.in_w))))
    }
}
