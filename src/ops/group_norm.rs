//! [`GroupNorm`]: `candle_nn::GroupNorm`'s weights, with SiLU and a per-channel shift fused in.

use candle_core::{CpuStorage, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;

/// Group normalisation over `[batch, channels, ...]`, loaded like [`candle_nn::group_norm()`].
///
/// Besides the plain [`Module::forward`], it offers the UNet's and VQ-VAE's fused
/// pre-activations: [`GroupNorm::forward_silu`] (`silu(norm(x))`) and
/// [`GroupNorm::forward_add_silu`] (`silu(norm(x + shift))` with a per-sample, per-channel
/// shift such as a ResBlock's timestep embedding), and the ResNet's post-activations
/// [`GroupNorm::forward_relu`] and [`GroupNorm::forward_residual_relu`]. f32 CPU inputs run one pass per group in
/// cache; inputs or weights that need gradients run `norm_grad::group_norm`;
/// everything else runs the same maths through candle.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
    /// Scale and offset as f32 vectors, when the fast kernel can use them.
    affine: Option<(Vec<f32>, Vec<f32>)>,
}

/// A GroupNorm of `num_channels` in `num_groups`, read from `vb` as [`candle_nn::group_norm()`]
/// reads it (`weight`, `bias`).
pub fn group_norm(
    num_groups: usize,
    num_channels: usize,
    eps: f64,
    vb: VarBuilder,
) -> Result<GroupNorm> {
    let weight = vb.get_with_hints(num_channels, "weight", candle_nn::Init::Const(1.))?;
    let bias = vb.get_with_hints(num_channels, "bias", candle_nn::Init::Const(0.))?;
    GroupNorm::new(weight, bias, num_channels, num_groups, eps)
}

impl GroupNorm {
    /// A GroupNorm with scale `weight` and offset `bias` (`[num_channels]` each), as
    /// [`candle_nn::GroupNorm::new`].
    pub fn new(
        weight: Tensor,
        bias: Tensor,
        num_channels: usize,
        num_groups: usize,
        eps: f64,
    ) -> Result<Self> {
        let constant = !weight.is_variable() && !bias.is_variable();
        let affine = if constant && super::fast_path(&weight) && super::fast_path(&bias) {
            Some((weight.to_vec1::<f32>()?, bias.to_vec1::<f32>()?))
        } else {
            None
        };
        let inner =
            candle_nn::GroupNorm::new(weight.clone(), bias.clone(), num_channels, num_groups, eps)?;
        Ok(Self { inner, weight, bias, groups: num_groups, eps, affine })
    }

    /// `silu(norm(x))` in one pass.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        match self.kernel(x, Activation::Silu, None, None)? {
            Some(y) => Ok(y),
            None => self.forward_unfused(x)?.silu(),
        }
    }

    /// `relu(norm(x))` in one pass.
    pub fn forward_relu(&self, x: &Tensor) -> Result<Tensor> {
        match self.kernel(x, Activation::Relu, None, None)? {
            Some(y) => Ok(y),
            None => self.forward_unfused(x)?.relu(),
        }
    }

    /// `relu(norm(x) + residual)` (`residual` of `x`'s shape) in one pass: the end of a
    /// ResNet basic block.
    pub fn forward_residual_relu(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        if residual.dims() != x.dims() {
            candle_core::bail!(
                "GroupNorm residual {:?} does not match input {:?}",
                residual.dims(),
                x.dims()
            )
        }
        match self.kernel(x, Activation::Relu, None, Some(residual))? {
            Some(y) => Ok(y),
            None => (self.forward_unfused(x)? + residual)?.relu(),
        }
    }

    /// `silu(norm(x + shift))` for a `[batch, channels]` `shift` broadcast over the spatial
    /// dimensions, in one pass (the sum is never stored).
    pub fn forward_add_silu(&self, x: &Tensor, shift: &Tensor) -> Result<Tensor> {
        let (batch, channels) = shift.dims2()?;
        if x.dims().get(..2) != Some(&[batch, channels][..]) {
            candle_core::bail!(
                "GroupNorm shift {:?} does not match input {:?}",
                shift.dims(),
                x.dims()
            )
        }
        if let Some(y) = self.kernel(x, Activation::Silu, Some(shift), None)? {
            return Ok(y);
        }
        let mut dims = vec![1; x.rank()];
        dims[..2].copy_from_slice(&[batch, channels]);
        self.forward_unfused(&x.broadcast_add(&shift.reshape(dims)?)?)?.silu()
    }

    /// The normalisation without the fused kernel, differentiable when gradients are needed.
    fn forward_unfused(&self, x: &Tensor) -> Result<Tensor> {
        let trains = x.track_op() || self.weight.track_op() || self.bias.track_op();
        if trains && super::norm_grad::supports(x, &self.weight) {
            super::norm_grad::group_norm(x, &self.weight, &self.bias, self.groups, self.eps)
        } else {
            self.inner.forward(x)
        }
    }

    /// The fused kernel's result, or `None` when the inputs need the candle path.
    fn kernel(
        &self,
        x: &Tensor,
        activation: Activation,
        shift: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        let Some((gamma, beta)) = &self.affine else { return Ok(None) };
        let shape_ok = x.rank() >= 3 && x.dim(1)? == gamma.len();
        let fast = |t: &Tensor| super::fast_path(t) && !t.track_op();
        if !shape_ok || !fast(x) || !shift.is_none_or(fast) || !residual.is_none_or(fast) {
            return Ok(None);
        }
        let shift = shift.map(|s| s.flatten_all()?.to_vec1::<f32>()).transpose()?;
        let op = NormOp { gamma, beta, groups: self.groups, eps: self.eps, activation, shift };
        let x = x.contiguous()?;
        match residual {
            None => x.apply_op1_no_bwd(&op).map(Some),
            Some(r) => x.apply_op2_no_bwd(&r.contiguous()?, &op).map(Some),
        }
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.kernel(x, Activation::Identity, None, None)? {
            Some(y) => Ok(y),
            None => self.forward_unfused(x),
        }
    }
}

/// What follows the normalisation in the fused kernel.
#[derive(Debug, Clone, Copy)]
pub(super) enum Activation {
    Identity,
    Silu,
    Relu,
}

/// One call of the fused kernel.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // read by the x86 kernels only
struct NormOp<'a> {
    gamma: &'a [f32],
    beta: &'a [f32],
    groups: usize,
    eps: f64,
    activation: Activation,
    /// `[batch, channels]` values added before normalising.
    shift: Option<Vec<f32>>,
}

impl NormOp<'_> {
    /// The kernel on the CPU input `x`, adding `residual` after normalising when given.
    fn run(
        &self,
        x: (&CpuStorage, &Layout),
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let (storage, layout) = x;
        let x = super::contiguous_f32(storage, layout)?;
        let residual = residual.map(|(s, l)| super::contiguous_f32(s, l)).transpose()?;
        let spatial: usize = layout.dims()[2..].iter().product();
        #[cfg(target_arch = "x86_64")]
        {
            let norm = super::x86::norm::Norm {
                groups: self.groups,
                eps: self.eps,
                gamma: self.gamma,
                beta: self.beta,
                activation: self.activation,
            };
            let shift = self.shift.as_deref();
            let y = super::x86::norm::group_norm(x, spatial, shift, residual, &norm);
            Ok((CpuStorage::F32(y), layout.shape().clone()))
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (x, residual, spatial);
            Err(super::no_kernels())
        }
    }
}

plain_and_residual_ops!(NormOp<'_>, "slotserve-group-norm");
