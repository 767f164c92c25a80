//! Slot Attention with learned initial slots (SlotDiffusion's `SlotAttentionWMask`): slots
//! compete for input features through a softmax over slots, and the last iteration's
//! attention is the per-slot segmentation mask.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::checkpoint::ShapeMap;
use crate::ops::{layer_norm, linear, linear_no_bias, LayerNorm, Linear};

/// Added to the attention before renormalising over inputs (`eps` of the official module).
const ATTN_EPS: f64 = 1e-6;
/// LayerNorm epsilon (PyTorch's default).
const LAYER_NORM_EPS: f64 = 1e-5;

/// Sizes of Slot Attention; all but the iteration count are readable from shapes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotAttentionConfig {
    /// Number of slots K.
    pub num_slots: usize,
    /// Width of a slot D.
    pub slot_size: usize,
    /// Width of the input features.
    pub in_features: usize,
    /// Hidden width of the slot MLP.
    pub mlp_hidden_size: usize,
    /// Attention iterations.
    pub num_iterations: usize,
}

impl SlotAttentionConfig {
    /// Reads the sizes from `init_latents` and `slot_attention.*`.
    pub fn infer(shapes: &ShapeMap, num_iterations: usize) -> Result<Self> {
        Ok(Self {
            num_slots: shapes.dim("init_latents", 1)?,
            slot_size: shapes.dim("init_latents", 2)?,
            in_features: shapes.dim("slot_attention.project_k.weight", 1)?,
            mlp_hidden_size: shapes.dim("slot_attention.mlp.1.weight", 0)?,
            num_iterations,
        })
    }
}

/// PyTorch's `GRUCell` (gates r, z, n in that order in the stacked weights).
#[derive(Debug, Clone)]
struct GruCell {
    w_ih: Linear,
    w_hh: Linear,
}

impl GruCell {
    /// Reads the cell from `vb`; a fresh model (training) draws every weight and bias from
    /// U(−1/√hidden, 1/√hidden), PyTorch's initialisation.
    fn new(input: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        let bound = (hidden as f64).powf(-0.5);
        let init = candle_nn::Init::Uniform { lo: -bound, up: bound };
        let linear = |fan_in: usize, name: &str| -> Result<Linear> {
            Linear::new(
                vb.get_with_hints((3 * hidden, fan_in), &format!("weight_{name}"), init)?,
                Some(vb.get_with_hints(3 * hidden, &format!("bias_{name}"), init)?),
            )
        };
        Ok(Self { w_ih: linear(input, "ih")?, w_hh: linear(hidden, "hh")? })
    }

    fn forward(&self, x: &Tensor, h: &Tensor) -> Result<Tensor> {
        let gi = self.w_ih.forward(x)?.chunk(3, D::Minus1)?;
        let gh = self.w_hh.forward(h)?.chunk(3, D::Minus1)?;
        let r = candle_nn::ops::sigmoid(&(&gi[0] + &gh[0])?)?;
        let z = candle_nn::ops::sigmoid(&(&gi[1] + &gh[1])?)?;
        let n = (&gi[2] + (r * &gh[2])?)?.tanh()?;
        // h' = (1 − z)·n + z·h = n + z·(h − n)
        &n + (z * (h - &n)?)?
    }
}

/// Slot Attention.
#[derive(Debug, Clone)]
pub struct SlotAttention {
    init_latents: Tensor,
    norm_inputs: LayerNorm,
    q_norm: LayerNorm,
    project_q: Linear,
    project_k: Linear,
    project_v: Linear,
    gru: GruCell,
    mlp_norm: LayerNorm,
    mlp_in: Linear,
    mlp_out: Linear,
    cfg: SlotAttentionConfig,
}

impl SlotAttention {
    /// Builds the module from `init_latents` and `slot_attention.*` under `vb`.
    pub fn new(vb: VarBuilder, cfg: &SlotAttentionConfig) -> Result<Self> {
        let (d, c) = (cfg.slot_size, cfg.in_features);
        let sa = vb.pp("slot_attention");
        Ok(Self {
            // a fresh model draws N(0, 1) initial slots, as the official code: equal
            // initial slots would stay equal, every slot attending uniformly forever
            init_latents: vb.get_with_hints(
                (1, cfg.num_slots, d),
                "init_latents",
                candle_nn::Init::Randn { mean: 0.0, stdev: 1.0 },
            )?,
            norm_inputs: layer_norm(c, LAYER_NORM_EPS, sa.pp("norm_inputs"))?,
            q_norm: layer_norm(d, LAYER_NORM_EPS, sa.pp("project_q.0"))?,
            project_q: linear_no_bias(d, d, sa.pp("project_q.1"))?,
            project_k: linear_no_bias(c, d, sa.pp("project_k"))?,
            project_v: linear_no_bias(c, d, sa.pp("project_v"))?,
            gru: GruCell::new(d, d, sa.pp("gru"))?,
            mlp_norm: layer_norm(d, LAYER_NORM_EPS, sa.pp("mlp.0"))?,
            mlp_in: linear(d, cfg.mlp_hidden_size, sa.pp("mlp.1"))?,
            mlp_out: linear(cfg.mlp_hidden_size, d, sa.pp("mlp.3"))?,
            cfg: cfg.clone(),
        })
    }

    /// The learned initial slots [1, K, D] (`init_latents`).
    pub fn init_latents(&self) -> &Tensor {
        &self.init_latents
    }

    /// Slots [B, K, D] and masks [B, K, N] from features [B, N, C]. Slots start from the
    /// learned `init_latents`, or from `init` [B, K', D] (any K') when given, as the official
    /// `encode(img, init_slots)`. Each sample is independent of the others in the batch. The
    /// masks are the last iteration's attention normalised over slots (before the `eps`).
    pub fn forward(&self, inputs: &Tensor, init: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let (b, _, _) = inputs.dims3()?;
        let mut slots = self.initial_slots(b, init)?;
        let inputs = self.norm_inputs.forward(inputs)?;
        let keys = self.project_k.forward(&inputs)?;
        let values = self.project_v.forward(&inputs)?;
        let mut attn = None;
        for _ in 0..self.cfg.num_iterations {
            let (next, a) = self.iterate(&slots, &keys, &values)?;
            slots = next;
            attn = Some(a);
        }
        match attn {
            Some(a) => Ok((slots, a.transpose(1, 2)?.contiguous()?)),
            None => candle_core::bail!("slot attention needs at least one iteration"),
        }
    }

    /// The starting slots of a batch of `b`: `init` after checking its shape, else the
    /// learned ones repeated.
    fn initial_slots(&self, b: usize, init: Option<&Tensor>) -> Result<Tensor> {
        let d = self.cfg.slot_size;
        let Some(init) = init else {
            return self.init_latents.broadcast_as((b, self.cfg.num_slots, d))?.contiguous();
        };
        let (ib, k, id) = init.dims3()?;
        if (ib, id) != (b, d) || k == 0 {
            candle_core::bail!(
                "initial slots have shape {:?}, expected [{b}, K ≥ 1, {d}]",
                init.dims()
            );
        }
        Ok(init.clone())
    }

    /// One round: slots [B, K, D] compete for the inputs' keys and values [B, N, D]; returns
    /// the updated slots and the attention [B, N, K] normalised over slots.
    fn iterate(&self, slots: &Tensor, keys: &Tensor, values: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, k, d) = slots.dims3()?;
        let q = self.project_q.forward(&self.q_norm.forward(slots)?)?;
        let logits = (keys.matmul(&q.transpose(1, 2)?)? * (d as f64).powf(-0.5))?;
        let attn = crate::ops::softmax_last_dim(&logits)?;
        let weights = (&attn + ATTN_EPS)?;
        let weights = weights.broadcast_div(&weights.sum_keepdim(1)?)?;
        let updates = weights.transpose(1, 2)?.matmul(values)?; // [B, K, D]
        let next = self.gru.forward(&updates.reshape((b * k, d))?, &slots.reshape((b * k, d))?)?;
        let next = next.reshape((b, k, d))?;
        let hidden = self.mlp_in.forward(&self.mlp_norm.forward(&next)?)?.relu()?;
        Ok(((&next + self.mlp_out.forward(&hidden)?)?, attn))
    }
}

/// Bilinear resampling weights (`align_corners = False`, as `F.interpolate`) mapping `n`
/// input positions to `m` outputs: an [m, n] matrix.
fn bilinear_matrix(n: usize, m: usize) -> Vec<f32> {
    let scale = n as f64 / m as f64;
    let mut w = vec![0f32; m * n];
    for o in 0..m {
        let src = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(n - 1);
        let i1 = (i0 + 1).min(n - 1);
        let frac = (src - i0 as f64) as f32;
        w[o * n + i0] += 1.0 - frac;
        w[o * n + i1] += frac;
    }
    w
}

/// Masks [B, K, h·w] on the feature grid → [B, K, H, W] at the image size, bilinearly.
pub fn upsample_masks(
    masks: &Tensor,
    grid: (usize, usize),
    size: (usize, usize),
) -> Result<Tensor> {
    let (b, k, _) = masks.dims3()?;
    let ((h, w), (hh, ww)) = (grid, size);
    let dev = masks.device();
    let rows = Tensor::from_vec(bilinear_matrix(h, hh), (hh, h), dev)?;
    let cols = Tensor::from_vec(bilinear_matrix(w, ww), (ww, w), dev)?;
    let m = masks.to_dtype(DType::F32)?.reshape((b * k, h, w))?;
    let out = rows.broadcast_left(b * k)?.matmul(&m)?.matmul(&cols.t()?.broadcast_left(b * k)?)?;
    out.reshape((b, k, hh, ww))
}

/// Hard segmentation [B, H, W] (u32 slot ids): the argmax of masks [B, K, H, W] over slots.
pub fn segmentation(masks: &Tensor) -> Result<Tensor> {
    masks.argmax(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    fn module() -> SlotAttention {
        let cfg = SlotAttentionConfig {
            num_slots: 4,
            slot_size: 8,
            in_features: 6,
            mlp_hidden_size: 16,
            num_iterations: 3,
        };
        let map = VarMap::new();
        SlotAttention::new(VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu), &cfg).unwrap()
    }

    #[test]
    fn bilinear_weights_are_pytorchs() {
        // F.interpolate(size=4, mode='bilinear', align_corners=False) of [a, b]:
        // [a, 0.75a + 0.25b, 0.25a + 0.75b, b] (sources clamped at the borders).
        assert_eq!(bilinear_matrix(2, 4), [1.0, 0.0, 0.75, 0.25, 0.25, 0.75, 0.0, 1.0]);
        let identity = bilinear_matrix(5, 5);
        for (i, v) in identity.iter().enumerate() {
            assert_eq!(*v, if i % 6 == 0 { 1.0 } else { 0.0 });
        }
    }

    #[test]
    fn samples_do_not_influence_each_other() {
        let sa = module();
        let inputs = Tensor::randn(0f32, 1.0, (2, 10, 6), &Device::Cpu).unwrap();
        let (slots, masks) = sa.forward(&inputs, None).unwrap();
        assert_eq!((slots.dims(), masks.dims()), (&[2, 4, 8][..], &[2, 4, 10][..]));
        for i in 0..2 {
            let (one, one_masks) = sa.forward(&inputs.narrow(0, i, 1).unwrap(), None).unwrap();
            let d = (one - slots.narrow(0, i, 1).unwrap()).unwrap().abs().unwrap();
            assert!(d.max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-6);
            let d = (one_masks - masks.narrow(0, i, 1).unwrap()).unwrap().abs().unwrap();
            assert!(d.max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-6);
        }
        let total = masks.sum(1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(total.iter().all(|t| (t - 1.0).abs() < 1e-5), "masks sum to one over slots");
    }

    #[test]
    fn custom_initial_slots_set_the_slot_count() {
        let sa = module();
        let inputs = Tensor::randn(0f32, 1.0, (2, 10, 6), &Device::Cpu).unwrap();
        let init = Tensor::randn(0f32, 1.0, (2, 3, 8), &Device::Cpu).unwrap();
        let (slots, masks) = sa.forward(&inputs, Some(&init)).unwrap();
        assert_eq!((slots.dims(), masks.dims()), (&[2, 3, 8][..], &[2, 3, 10][..]));
        let wrong = Tensor::zeros((2, 3, 7), DType::F32, &Device::Cpu).unwrap();
        assert!(sa.forward(&inputs, Some(&wrong)).is_err());
        let wrong_batch = Tensor::zeros((1, 3, 8), DType::F32, &Device::Cpu).unwrap();
        assert!(sa.forward(&inputs, Some(&wrong_batch)).is_err());
    }

    #[test]
    fn upsampled_masks_keep_their_grid_values_at_the_same_size() {
        let masks = Tensor::rand(0f32, 1.0, (1, 2, 12), &Device::Cpu).unwrap();
        let same = upsample_masks(&masks, (3, 4), (3, 4)).unwrap();
        let d = (same.flatten_from(2).unwrap() - &masks).unwrap().abs().unwrap();
        assert_eq!(d.max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        let up = upsample_masks(&masks, (3, 4), (7, 9)).unwrap();
        assert_eq!(up.dims(), &[1, 2, 7, 9]);
        assert_eq!(segmentation(&up).unwrap().dims(), &[1, 7, 9]);
    }
}
