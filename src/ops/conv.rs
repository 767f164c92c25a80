//! [`Conv2d`]: `candle_nn::Conv2d`'s weights and config, computed by the packed im2col kernel.

use std::sync::Arc;

use candle_core::{CpuStorage, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

/// A 2-D convolution, loaded like [`candle_nn::conv2d`] (same `weight`/`bias` keys and shapes).
///
/// At construction constant f32 CPU weights are packed once into the micro-kernel's panel
/// layout; `forward` then runs f32 CPU inputs as one matrix product per image (1×1
/// convolutions included), any stride and symmetric padding. Trained weights (candle `Var`s)
/// and inputs that carry gradients take the differentiable [`super::patches::conv2d`];
/// everything else (other devices or dtypes, groups, dilation) is left to candle.
#[derive(Clone)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
    kernel: Option<Arc<ConvKernel>>,
}

impl std::fmt::Debug for Conv2d {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conv2d")
            .field("inner", &self.inner)
            .field("packed", &self.kernel.is_some())
            .finish()
    }
}

/// A `k×k` convolution with bias, read from `vb` as [`candle_nn::conv2d`] reads it.
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    Conv2d::from_candle(candle_nn::conv2d(in_channels, out_channels, kernel_size, cfg, vb)?)
}

/// A `k×k` convolution without bias, read from `vb` as [`candle_nn::conv2d_no_bias`] reads it.
pub fn conv2d_no_bias(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let inner = candle_nn::conv2d_no_bias(in_channels, out_channels, kernel_size, cfg, vb)?;
    Conv2d::from_candle(inner)
}

impl Conv2d {
    /// A convolution with `weight` `[out, in, kh, kw]` and optional `bias` `[out]`, as
    /// [`candle_nn::Conv2d::new`].
    pub fn new(weight: Tensor, bias: Option<Tensor>, config: Conv2dConfig) -> Result<Self> {
        Self::from_candle(candle_nn::Conv2d::new(weight, bias, config))
    }

    /// Wraps a candle convolution, packing its weights when the fast kernel can run them.
    pub fn from_candle(inner: candle_nn::Conv2d) -> Result<Self> {
        let cfg = inner.config();
        let supported = cfg.groups == 1
            && cfg.dilation == 1
            && !inner.weight().is_variable()
            && super::fast_path(inner.weight());
        let kernel = if supported { Some(Arc::new(ConvKernel::pack(&inner)?)) } else { None };
        Ok(Self { inner, kernel })
    }

    /// The weight `[out, in, kh, kw]`.
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    /// The bias `[out]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }

    /// Padding, stride, dilation and groups.
    pub fn config(&self) -> &Conv2dConfig {
        self.inner.config()
    }

    /// `residual + conv(x)` (`residual` of the output's shape) with the sum written as the
    /// product leaves the kernel, saving a pass over the output (a ResBlock's skip connection).
    /// Off the kernel it is computed in that operand order, as the residual blocks always did
    /// (the order in which candle sums gradients, and so training, depends on it).
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        match &self.kernel {
            Some(kernel) if self.fast(x) && super::fast_path(residual) && !residual.track_op() => {
                let (batch, _, h, w) = x.dims4()?;
                let (out_h, out_w) = kernel.out_size(h, w);
                if residual.dims() != [batch, kernel.out_c, out_h, out_w] {
                    candle_core::bail!(
                        "conv residual {:?} does not match the output {:?}",
                        residual.dims(),
                        [batch, kernel.out_c, out_h, out_w]
                    )
                }
                x.contiguous()?.apply_op2_no_bwd(&residual.contiguous()?, kernel.as_ref())
            }
            _ => residual + self.forward(x)?,
        }
    }

    /// Whether `forward` would run the packed kernel on `x` (which must not need gradients).
    fn fast(&self, x: &Tensor) -> bool {
        self.kernel.as_ref().is_some_and(|k| super::fast_path(x) && k.accepts(x) && !x.track_op())
    }

    /// Whether `x` or the weights need gradients that the patch-matrix product can give.
    fn trainable(&self, x: &Tensor) -> bool {
        let (weight, cfg) = (self.inner.weight(), self.inner.config());
        (x.track_op() || weight.track_op()) && super::patches::supports(x, weight, cfg)
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.kernel {
            Some(kernel) if self.fast(x) => x.contiguous()?.apply_op1_no_bwd(kernel.as_ref()),
            _ if self.trainable(x) => {
                let (weight, cfg) = (self.inner.weight(), self.inner.config());
                super::patches::conv2d(x, weight, self.inner.bias(), cfg)
            }
            _ => self.inner.forward(x),
        }
    }
}

/// The packed weights and geometry of one convolution: weights as `[out / MR][in·kh·kw][MR]`
/// panels (zero rows past `out`), bias padded to a whole panel.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // some fields: x86 kernels only
struct ConvKernel {
    weights: Vec<f32>,
    bias: Vec<f32>,
    out_c: usize,
    in_c: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
}

/// Rows per weight panel: the micro-kernel's `MR`.
const PANEL: usize = 6;

impl ConvKernel {
    /// Packs `conv`'s weights (f32, CPU).
    fn pack(conv: &candle_nn::Conv2d) -> Result<Self> {
        let (out_c, in_c, kh, kw) = conv.weight().dims4()?;
        let depth = in_c * kh * kw;
        let flat = conv.weight().flatten_all()?.to_vec1::<f32>()?;
        let panels = out_c.div_ceil(PANEL);
        let mut weights = vec![0f32; panels * depth * PANEL];
        for (o, w) in flat.chunks_exact(depth).enumerate() {
            let panel = &mut weights[o / PANEL * depth * PANEL..][..depth * PANEL];
            for (k, &v) in w.iter().enumerate() {
                panel[k * PANEL + o % PANEL] = v;
            }
        }
        let mut bias = vec![0f32; panels * PANEL];
        if let Some(b) = conv.bias() {
            bias[..out_c].copy_from_slice(&b.to_dtype(DType::F32)?.to_vec1::<f32>()?);
        }
        let cfg = conv.config();
        Ok(Self { weights, bias, out_c, in_c, kh, kw, stride: cfg.stride, padding: cfg.padding })
    }

    /// Whether `x` is an NCHW input this kernel can convolve (else candle reports the error).
    fn accepts(&self, x: &Tensor) -> bool {
        matches!(x.dims(), &[_, c, h, w]
            if c == self.in_c && h + 2 * self.padding >= self.kh && w + 2 * self.padding >= self.kw)
    }

    /// Output height and width for an `h×w` input.
    fn out_size(&self, h: usize, w: usize) -> (usize, usize) {
        let out = |n: usize, k: usize| (n + 2 * self.padding - k) / self.stride + 1;
        (out(h, self.kh), out(w, self.kw))
    }
}

impl ConvKernel {
    /// The convolution of the CPU input `x`, plus `residual` when given.
    fn run(
        &self,
        x: (&CpuStorage, &Layout),
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let input = super::contiguous_f32(x.0, x.1)?;
        let residual = residual.map(|(s, l)| super::contiguous_f32(s, l)).transpose()?;
        let (batch, _, in_h, in_w) = x.1.shape().dims4()?;
        let (out_h, out_w) = self.out_size(in_h, in_w);
        let shape = Shape::from((batch, self.out_c, out_h, out_w));
        #[cfg(target_arch = "x86_64")]
        {
            const _: () = assert!(PANEL == super::x86::MR);
            let g = super::x86::conv::Geometry {
                batch,
                in_c: self.in_c,
                in_h,
                in_w,
                out_c: self.out_c,
                out_h,
                out_w,
                kh: self.kh,
                kw: self.kw,
                stride: self.stride,
                padding: self.padding,
            };
            let out = super::x86::conv::conv2d(input, &self.weights, &self.bias, &g, residual);
            Ok((CpuStorage::F32(out), shape))
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (input, residual, shape);
            Err(super::no_kernels())
        }
    }
}

plain_and_residual_ops!(ConvKernel, "slotserve-conv2d");
