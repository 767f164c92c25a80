//! The differentiable CPU convolution used while training: patch extraction (im2col) as an op of
//! its own whose backward is its exact adjoint (col2im), followed by one matrix product.
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
/// [O, C, kh, kw], `bias` [O]; same result as candle's `conv2d` (see [`supports`]).
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
    let grid = Patches::new((channels, in_h, in_w), (kh, kw), cfg.stride, cfg.padding);
    let cols = x.contiguous()?.apply_op1(Im2col(grid))?; // [B·OH·OW, C·kh·kw]
    let y = cols.matmul(&weight.reshape((out_c, grid.depth()))?.t()?)?; // [B·OH·OW, O]
    let y = y.reshape((batch, grid.out_h, grid.out_w, out_c))?.permute((0, 3, 1, 2))?;
    match bias {
        Some(bias) => y.broadcast_add(&bias.reshape((1, out_c, 1, 1))?),
        None => y.contiguous(),
    }
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
}

impl Patches {
    fn new(
        input: (usize, usize, usize),
        kernel: (usize, usize),
        stride: usize,
        padding: usize,
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
        }
    }

    /// Values in one patch: a row of the patch matrix.
    fn depth(&self) -> usize {
        self.channels * self.kh * self.kw
    }

    fn image_len(&self) -> usize {
        self.channels * self.in_h * self.in_w
    }

    fn rows_per_image(&self) -> usize {
        self.out_h * self.out_w
    }

    /// Calls `visit(patch_index, image_index)` for every element of every patch of one image
    /// that falls inside the image (padding elements are skipped), in patch-matrix order.
    fn for_each(&self, mut visit: impl FnMut(usize, usize)) {
        let inside = |pos: usize, k: usize, n: usize| {
            (pos * self.stride + k).checked_sub(self.padding).filter(|&i| i < n)
        };
        for oy in 0..self.out_h {
            for ox in 0..self.out_w {
                let row = (oy * self.out_w + ox) * self.depth();
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

/// Patch extraction: [B, C, H, W] → [B·OH·OW, C·kh·kw], zeros where a patch overlaps the padding.
struct Im2col(Patches);

impl CustomOp1 for Im2col {
    fn name(&self) -> &'static str {
        "slotserve-im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = &self.0;
        let x = super::contiguous_f32(storage, layout)?;
        let batch = layout.shape().dims()[0];
        let per_image = p.rows_per_image() * p.depth();
        let mut cols = vec![0f32; batch * per_image];
        cols.par_chunks_mut(per_image).zip(x.par_chunks(p.image_len())).for_each(|(out, image)| {
            p.for_each(|dst, src| out[dst] = image[src]);
        });
        Ok((CpuStorage::F32(cols), Shape::from((batch * p.rows_per_image(), p.depth()))))
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
        let per_image = p.rows_per_image() * p.depth();
        x.par_chunks_mut(p.image_len()).zip(cols.par_chunks(per_image)).for_each(|(image, col)| {
            p.for_each(|src, dst| image[dst] += col[src]);
        });
        Ok((CpuStorage::F32(x), Shape::from((batch, p.channels, p.in_h, p.in_w))))
    }
}
