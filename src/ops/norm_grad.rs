//! The differentiable CPU GroupNorm used while training: forward and analytic backward as two
//! ops of their own.
//!
//! candle composes `candle_nn::GroupNorm` from about ten broadcasting ops, each a pass over
//! the activations with its own gradient; at 64² and batch 16 they cost more than the
//! convolutions around them. Here the forward is one pass per group and the backward one more.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Whether [`group_norm`] computes this normalisation: f32 on the CPU.
pub fn supports(x: &Tensor, weight: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F32
}

/// GroupNorm of `x` [B, C, ...] in `groups` groups with scale `weight` and offset `bias` [C],
/// with gradients for all three; same result as `candle_nn::GroupNorm`.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<Tensor> {
    let channels = x.dim(1)?;
    if channels % groups != 0 || weight.dims() != [channels] || bias.dims() != [channels] {
        candle_core::bail!(
            "group norm: {channels} channels, {groups} groups, weight {:?}",
            weight.dims()
        )
    }
    let op = NormForward(Groups { groups, eps });
    x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
}

/// Group count and epsilon.
#[derive(Debug, Clone, Copy)]
struct Groups {
    groups: usize,
    eps: f64,
}

/// One group's values with their mean and reciprocal standard deviation.
struct GroupStats {
    mean: f64,
    rstd: f64,
}

impl GroupStats {
    fn of(values: &[f32], eps: f64) -> Self {
        let n = values.len() as f64;
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        Self { mean, rstd: 1.0 / (var + eps).sqrt() }
    }

    fn normalise(&self, v: f32) -> f64 {
        (v as f64 - self.mean) * self.rstd
    }
}

/// The three f32 slices of an op's arguments, the first with its dims.
fn slices<'a>(args: [(&'a CpuStorage, &'a Layout); 3]) -> Result<(&'a [usize], [&'a [f32]; 3])> {
    let [a, b, c] = args.map(|(s, l)| super::contiguous_f32(s, l));
    Ok((args[0].1.dims(), [a?, b?, c?]))
}

/// `(group length, channels per group, spatial size)` of an input `dims` in `groups` groups.
fn group_shape(dims: &[usize], groups: usize) -> (usize, usize, usize) {
    let spatial: usize = dims[2..].iter().product();
    let per_group = dims[1] / groups;
    (per_group * spatial, per_group, spatial)
}

/// The forward pass: `(x, weight, bias)` → normalised, scaled and shifted `x`.
struct NormForward(Groups);

impl CustomOp3 for NormForward {
    fn name(&self) -> &'static str {
        "slotserve-group-norm-trainable"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (dims, [x, gamma, beta]) = slices([(x, x_layout), (w, w_layout), (b, b_layout)])?;
        let Groups { groups, eps } = self.0;
        let (len, per_group, spatial) = group_shape(dims, groups);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(len).zip(x.par_chunks(len)).enumerate().for_each(|(i, (out, xs))| {
            let stats = GroupStats::of(xs, eps);
            let first_channel = (i % groups) * per_group;
            for (j, (o, &v)) in out.iter_mut().zip(xs).enumerate() {
                let c = first_channel + j / spatial;
                *o = (stats.normalise(v) * gamma[c] as f64 + beta[c] as f64) as f32;
            }
        });
        Ok((CpuStorage::F32(y), x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let flat = x.apply_op3_no_bwd(weight, &grad.contiguous()?, &NormBackward(self.0))?;
        let (n, c) = (x.elem_count(), weight.elem_count());
        let grad_x = flat.narrow(0, 0, n)?.reshape(x.shape())?;
        let grad_weight = flat.narrow(0, n, c)?;
        let grad_bias = flat.narrow(0, n + c, c)?;
        Ok((Some(grad_x), Some(grad_weight), Some(grad_bias)))
    }
}

/// The backward pass: `(x, weight, grad_y)` → `[grad_x, grad_weight, grad_bias]` flattened
/// into one vector.
struct NormBackward(Groups);

impl CustomOp3 for NormBackward {
    fn name(&self) -> &'static str {
        "slotserve-group-norm-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
        g: &CpuStorage,
        g_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (dims, [x, gamma, dy]) = slices([(x, x_layout), (w, w_layout), (g, g_layout)])?;
        let Groups { groups, eps } = self.0;
        let (len, per_group, spatial) = group_shape(dims, groups);
        let channels = gamma.len();
        // per group: grad_x, and the group's partial sums for grad_weight and grad_bias
        let mut dx = vec![0f32; x.len()];
        let mut partials = vec![0f64; x.len() / len * per_group * 2];
        dx.par_chunks_mut(len)
            .zip(partials.par_chunks_mut(per_group * 2))
            .zip(x.par_chunks(len).zip(dy.par_chunks(len)))
            .enumerate()
            .for_each(|(i, ((dx, sums), (xs, dys)))| {
                let stats = GroupStats::of(xs, eps);
                let first_channel = (i % groups) * per_group;
                let (mut mean_dxhat, mut mean_dxhat_xhat) = (0f64, 0f64);
                for (j, (&v, &d)) in xs.iter().zip(dys).enumerate() {
                    let xhat = stats.normalise(v);
                    let dxhat = d as f64 * gamma[first_channel + j / spatial] as f64;
                    mean_dxhat += dxhat;
                    mean_dxhat_xhat += dxhat * xhat;
                    sums[2 * (j / spatial)] += d as f64 * xhat;
                    sums[2 * (j / spatial) + 1] += d as f64;
                }
                mean_dxhat /= len as f64;
                mean_dxhat_xhat /= len as f64;
                for (j, ((o, &v), &d)) in dx.iter_mut().zip(xs).zip(dys).enumerate() {
                    let xhat = stats.normalise(v);
                    let dxhat = d as f64 * gamma[first_channel + j / spatial] as f64;
                    *o = (stats.rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)) as f32;
                }
            });
        let mut out = dx;
        let (mut dgamma, mut dbeta) = (vec![0f64; channels], vec![0f64; channels]);
        for (i, sums) in partials.chunks(per_group * 2).enumerate() {
            let first_channel = (i % groups) * per_group;
            for (k, pair) in sums.chunks(2).enumerate() {
                dgamma[first_channel + k] += pair[0];
                dbeta[first_channel + k] += pair[1];
            }
        }
        out.extend(dgamma.iter().chain(&dbeta).map(|&v| v as f32));
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}
