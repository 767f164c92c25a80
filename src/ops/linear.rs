//! [`Linear`]: `candle_nn::Linear`'s weights, computed by the packed matrix-multiply kernel.

use std::sync::Arc;

use candle_core::{CpuStorage, Layout, Module, Result, Shape, Tensor, D};
use candle_nn::VarBuilder;

/// A fully connected layer over the last dimension, loaded like [`candle_nn::linear()`] (same
/// `weight`/`bias` keys and shapes).
///
/// At construction constant f32 CPU weights are packed once (transposed, in the micro-kernel's
/// panel layout); `forward` then runs f32 CPU inputs of any rank as one matrix product over all
/// leading dimensions. Trained weights (candle `Var`s), inputs that carry gradients, other
/// devices and dtypes are left to candle.
#[derive(Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
    kernel: Option<Arc<LinearKernel>>,
}

impl std::fmt::Debug for Linear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Linear")
            .field("inner", &self.inner)
            .field("packed", &self.kernel.is_some())
            .finish()
    }
}

/// A layer with bias, read from `vb` as [`candle_nn::linear()`] reads it.
pub fn linear(in_features: usize, out_features: usize, vb: VarBuilder) -> Result<Linear> {
    Linear::from_candle(candle_nn::linear(in_features, out_features, vb)?)
}

/// A layer without bias, read from `vb` as [`candle_nn::linear_no_bias`] reads it.
pub fn linear_no_bias(in_features: usize, out_features: usize, vb: VarBuilder) -> Result<Linear> {
    Linear::from_candle(candle_nn::linear_no_bias(in_features, out_features, vb)?)
}

impl Linear {
    /// A layer with `weight` `[out, in]` and optional `bias` `[out]`, as
    /// [`candle_nn::Linear::new`].
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Self::from_candle(candle_nn::Linear::new(weight, bias))
    }

    /// Wraps a candle layer, packing its weights when the fast kernel can run them.
    pub fn from_candle(inner: candle_nn::Linear) -> Result<Self> {
        let constant = |t: &Tensor| !t.is_variable() && super::fast_path(t);
        let supported = constant(inner.weight()) && inner.bias().is_none_or(constant);
        let kernel = if supported { Some(Arc::new(LinearKernel::pack(&inner)?)) } else { None };
        Ok(Self { inner, kernel })
    }

    /// The weight `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    /// The bias `[out]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }
}

impl Linear {
    /// `linear(x) + residual` (`residual` of the output's shape) with the sum written as the
    /// product leaves the kernel, saving a pass over the output (a transformer block's skip
    /// connection). Off the kernel it is computed in that operand order.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        match &self.kernel {
            Some(kernel) if self.fast(x)? && super::fast_path(residual) && !residual.track_op() => {
                let mut dims = x.dims().to_vec();
                *dims.last_mut().expect("rank ≥ 1") = kernel.out_features;
                if residual.dims() != dims {
                    candle_core::bail!(
                        "linear residual {:?} does not match the output {dims:?}",
                        residual.dims()
                    )
                }
                x.contiguous()?.apply_op2_no_bwd(&residual.contiguous()?, kernel.as_ref())
            }
            _ => self.forward(x)? + residual,
        }
    }

    /// Whether `forward` would run the packed kernel on `x`.
    fn fast(&self, x: &Tensor) -> Result<bool> {
        Ok(match &self.kernel {
            Some(kernel) => {
                super::fast_path(x) && !x.track_op() && x.dim(D::Minus1)? == kernel.in_features
            }
            None => false,
        })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.kernel {
            Some(kernel) if self.fast(x)? => x.contiguous()?.apply_op1_no_bwd(kernel.as_ref()),
            _ => self.inner.forward(x),
        }
    }
}

/// The packed weights of one layer: `Wᵀ` as `[out / 16][in][16]` panels (zero columns past
/// `out`), bias padded to a whole panel.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // some fields: x86 kernels only
struct LinearKernel {
    weights: Vec<f32>,
    bias: Vec<f32>,
    in_features: usize,
    out_features: usize,
}

/// Columns per weight panel: the micro-kernel's `NR`.
const PANEL: usize = 16;

impl LinearKernel {
    /// Packs `layer`'s weights (f32, CPU).
    fn pack(layer: &candle_nn::Linear) -> Result<Self> {
        let (out_features, in_features) = layer.weight().dims2()?;
        let flat = layer.weight().flatten_all()?.to_vec1::<f32>()?;
        let mut weights = vec![0f32; out_features.next_multiple_of(PANEL) * in_features];
        for (o, row) in flat.chunks_exact(in_features).enumerate() {
            let panel = &mut weights[o / PANEL * PANEL * in_features..][..PANEL * in_features];
            for (c, &w) in row.iter().enumerate() {
                panel[c * PANEL + o % PANEL] = w;
            }
        }
        let mut bias = vec![0f32; out_features.next_multiple_of(PANEL)];
        if let Some(b) = layer.bias() {
            bias[..out_features].copy_from_slice(&b.to_vec1::<f32>()?);
        }
        Ok(Self { weights, bias, in_features, out_features })
    }
}

impl LinearKernel {
    /// The layer applied to the CPU input `x`, plus `residual` when given.
    fn run(
        &self,
        x: (&CpuStorage, &Layout),
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let input = super::contiguous_f32(x.0, x.1)?;
        let residual = residual.map(|(s, l)| super::contiguous_f32(s, l)).transpose()?;
        let mut dims = x.1.dims().to_vec();
        *dims.last_mut().expect("rank ≥ 1") = self.out_features;
        #[cfg(target_arch = "x86_64")]
        {
            const _: () = assert!(PANEL == super::x86::NR);
            let weights = super::x86::linear::Weights {
                packed: &self.weights,
                bias: &self.bias,
                features: (self.in_features, self.out_features),
            };
            let y = super::x86::linear::linear(input, weights, residual);
            Ok((CpuStorage::F32(y), Shape::from(dims)))
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (input, residual, dims);
            Err(super::no_kernels())
        }
    }
}

plain_and_residual_ops!(LinearKernel, "slotserve-linear");
