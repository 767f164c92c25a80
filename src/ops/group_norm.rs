//! [`GroupNorm`]: `candle_nn::GroupNorm`'s weights, with SiLU and a per-channel shift fused in.

use candle_core::{CpuStorage, CustomOp1, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;

/// Group normalisation over `[batch, channels, ...]`, loaded like [`candle_nn::group_norm`].
///
/// Besides the plain [`Module::forward`], it offers the UNet's and VQ-VAE's fused
/// pre-activations: [`GroupNorm::forward_silu`] (`silu(norm(x))`) and
/// [`GroupNorm::forward_add_silu`] (`silu(norm(x + shift))` with a per-sample, per-channel
/// shift such as a ResBlock's timestep embedding). f32 CPU inputs run one pass per group in
/// cache; inputs or weights that need gradients run [`super::norm_grad::group_norm`];
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

/// A GroupNorm of `num_channels` in `num_groups`, read from `vb` as [`candle_nn::group_norm`]
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
        match self.kernel(x, true, None)? {
            Some(y) => Ok(y),
            None => self.forward_unfused(x)?.silu(),
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
        if let Some(y) = self.kernel(x, true, Some(shift))? {
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
    fn kernel(&self, x: &Tensor, silu: bool, shift: Option<&Tensor>) -> Result<Option<Tensor>> {
        let Some((gamma, beta)) = &self.affine else { return Ok(None) };
        let shape_ok = x.rank() >= 3 && x.dim(1)? == gamma.len();
        let fast = |t: &Tensor| super::fast_path(t) && !t.track_op();
        if !shape_ok || !fast(x) || !shift.is_none_or(fast) {
            return Ok(None);
        }
        let shift = shift.map(|s| s.flatten_all()?.to_vec1::<f32>()).transpose()?;
        let op = NormOp { gamma, beta, groups: self.groups, eps: self.eps, silu, shift };
        x.contiguous()?.apply_op1_no_bwd(&op).map(Some)
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.kernel(x, false, None)? {
            Some(y) => Ok(y),
            None => self.forward_unfused(x),
        }
    }
}

/// One call of the fused kernel.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // read by the x86 kernels only
struct NormOp<'a> {
    gamma: &'a [f32],
    beta: &'a [f32],
    groups: usize,
    eps: f64,
    silu: bool,
    /// `[batch, channels]` values added before normalising.
    shift: Option<Vec<f32>>,
}

impl CustomOp1 for NormOp<'_> {
    fn name(&self) -> &'static str {
        "slotserve-group-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::contiguous_f32(storage, layout)?;
        let spatial: usize = layout.dims()[2..].iter().product();
        #[cfg(target_arch = "x86_64")]
        {
            let norm = super::x86::norm::Norm {
                groups: self.groups,
                eps: self.eps,
                gamma: self.gamma,
                beta: self.beta,
                silu: self.silu,
            };
            let y = super::x86::norm::group_norm(x, spatial, self.shift.as_deref(), &norm);
            Ok((CpuStorage::F32(y), layout.shape().clone()))
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (x, spatial);
            Err(super::no_kernels())
        }
    }
}
