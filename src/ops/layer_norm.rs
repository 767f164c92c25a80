//! [`LayerNorm`]: `candle_nn::LayerNorm`'s weights, computed by a vectorised row kernel.

use candle_core::{CpuStorage, CustomOp1, Layout, Module, Result, Shape, Tensor, D};
use candle_nn::VarBuilder;

/// Layer normalisation over the last dimension with scale and offset, loaded like
/// [`candle_nn::layer_norm()`] (`weight`, `bias`).
///
/// f32 CPU inputs that need no gradients run one vectorised task per block of rows (candle's
/// own kernel runs one thread with scalar loops). Training (an input or a scale that tracks
/// gradients) runs differentiable tensor ops: candle's fused layer-norm op has no backward, so
/// through it gradients would silently stop at every LayerNorm. Everything else runs
/// `candle_nn::LayerNorm` unchanged.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    inner: candle_nn::LayerNorm,
    /// Scale and offset as f32 vectors, when the fast kernel can use them.
    affine: Option<(Vec<f32>, Vec<f32>)>,
}

/// A LayerNorm over `size` features, read from `vb` as [`candle_nn::layer_norm()`] reads it.
pub fn layer_norm(size: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    LayerNorm::from_candle(candle_nn::layer_norm(size, eps, vb)?)
}

impl LayerNorm {
    /// A LayerNorm with scale `weight` and offset `bias` (`[size]` each), as
    /// [`candle_nn::LayerNorm::new`].
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Result<Self> {
        Self::from_candle(candle_nn::LayerNorm::new(weight, bias, eps))
    }

    /// Wraps a candle LayerNorm, keeping its constant f32 scale and offset for the kernel.
    fn from_candle(inner: candle_nn::LayerNorm) -> Result<Self> {
        let constant = |t: &Tensor| !t.is_variable() && super::fast_path(t);
        let affine = match inner.bias() {
            Some(bias) if inner.remove_mean() && constant(inner.weight()) && constant(bias) => {
                Some((inner.weight().to_vec1::<f32>()?, bias.to_vec1::<f32>()?))
            }
            _ => None,
        };
        Ok(Self { inner, affine })
    }

    /// The normalisation from differentiable tensor ops: gradients reach the input, the scale
    /// and the offset.
    fn differentiable(&self, x: &Tensor) -> Result<Tensor> {
        let n = x.dim(D::Minus1)? as f64;
        let x = if self.inner.remove_mean() {
            x.broadcast_sub(&(x.sum_keepdim(D::Minus1)? / n)?)?
        } else {
            x.clone()
        };
        let var = (x.sqr()?.sum_keepdim(D::Minus1)? / n)?;
        let y = x.broadcast_div(&(var + self.inner.eps())?.sqrt()?)?;
        let y = y.broadcast_mul(self.inner.weight())?;
        match self.inner.bias() {
            Some(bias) => y.broadcast_add(bias),
            None => Ok(y),
        }
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let trained =
            self.inner.weight().track_op() || self.inner.bias().is_some_and(Tensor::track_op);
        if x.track_op() || trained {
            return self.differentiable(x);
        }
        match &self.affine {
            Some((gamma, beta)) if super::fast_path(x) && x.dim(D::Minus1)? == gamma.len() => {
                let op = RowNorm { gamma, beta, eps: self.inner.eps() as f32 };
                x.contiguous()?.apply_op1_no_bwd(&op)
            }
            _ => self.inner.forward(x),
        }
    }
}

/// One call of the row kernel.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // read by the x86 kernels only
struct RowNorm<'a> {
    gamma: &'a [f32],
    beta: &'a [f32],
    eps: f32,
}

impl CustomOp1 for RowNorm<'_> {
    fn name(&self) -> &'static str {
        "slotserve-layer-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::contiguous_f32(storage, layout)?;
        #[cfg(target_arch = "x86_64")]
        {
            let y = super::x86::layer_norm::layer_norm(x, self.gamma, self.beta, self.eps);
            Ok((CpuStorage::F32(y), layout.shape().clone()))
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = x;
            Err(super::no_kernels())
        }
    }
}
