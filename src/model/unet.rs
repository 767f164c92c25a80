//! The latent-diffusion UNet of SlotDiffusion (LDM `openaimodel` layout: `input_blocks`,
//! `middle_block`, `output_blocks`), predicting the noise in a latent from its timestep and
//! cross-attending to the slots. Unlike the usual implementations it takes one (possibly
//! fractional) timestep per sample, and a mask over slots, so that requests at different
//! denoising steps and with different slot counts share one forward pass.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{conv2d, group_norm, layer_norm, linear, linear_no_bias, Conv2d, Conv2dConfig};
use candle_nn::{GroupNorm, LayerNorm, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::checkpoint::ShapeMap;

/// GroupNorm epsilon of the residual blocks and the output head (`GroupNorm32` default).
const RES_NORM_EPS: f64 = 1e-5;
/// GroupNorm epsilon in front of each spatial transformer (`attention.py::Normalize`).
const ATTN_NORM_EPS: f64 = 1e-6;
/// LayerNorm epsilon inside the transformer blocks (PyTorch default).
const LAYER_NORM_EPS: f64 = 1e-5;
/// Groups of every GroupNorm.
const NORM_GROUPS: usize = 32;
/// Longest period of the sinusoidal timestep embedding.
const MAX_PERIOD: f64 = 10000.0;

/// Sizes of the UNet; all but the head width are readable from a checkpoint's shapes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UNetConfig {
    /// Latent channels in.
    pub in_channels: usize,
    /// Latent channels out (the predicted noise).
    pub out_channels: usize,
    /// Base width; level i has `model_channels * channel_mult[i]` channels.
    pub model_channels: usize,
    /// Width multipliers per level (one downsampling by 2 between levels).
    pub channel_mult: Vec<usize>,
    /// Residual blocks per level on the way down (one more on the way up).
    pub num_res_blocks: usize,
    /// Whether each level has a spatial transformer after its residual blocks (the official
    /// `attention_resolutions` (8, 4, 2) with 4 levels is [false, true, true, true]).
    pub attention_levels: Vec<bool>,
    /// Channels per attention head (`num_head_channels`).
    pub num_head_channels: usize,
    /// Transformer blocks per spatial transformer.
    pub transformer_depth: usize,
    /// Width of the conditioning vectors (the slot size D).
    pub context_dim: usize,
}

impl UNetConfig {
    /// Reads the sizes from the tensors under `prefix`; `num_head_channels` cannot be read
    /// from shapes and is given.
    pub fn infer(shapes: &ShapeMap, prefix: &str, num_head_channels: usize) -> Result<Self> {
        let key = |k: &str| format!("{prefix}.{k}");
        let model_channels = shapes.dim(&key("input_blocks.0.0.weight"), 0)?;
        let in_blocks = shapes.count_indexed(&key("input_blocks"));
        let levels = 1
            + (1..in_blocks)
                .filter(|i| shapes.contains(&key(&format!("input_blocks.{i}.0.op.weight"))))
                .count();
        let num_res_blocks = shapes.count_indexed(&key("output_blocks")) / levels - 1;
        let first_block = |level: usize| 1 + level * (num_res_blocks + 1);
        let channel_mult = (0..levels)
            .map(|l| {
                let k = key(&format!("input_blocks.{}.0.out_layers.3.weight", first_block(l)));
                Ok(shapes.dim(&k, 0)? / model_channels)
            })
            .collect::<Result<Vec<_>>>()?;
        let attention_levels = (0..levels)
            .map(|l| {
                shapes.contains(&key(&format!("input_blocks.{}.1.proj_in.weight", first_block(l))))
            })
            .collect();
        let mid = key("middle_block.1.transformer_blocks");
        Ok(Self {
            in_channels: shapes.dim(&key("input_blocks.0.0.weight"), 1)?,
            out_channels: shapes.dim(&key("out.2.weight"), 0)?,
            model_channels,
            channel_mult,
            num_res_blocks,
            attention_levels,
            num_head_channels,
            transformer_depth: shapes.count_indexed(&mid),
            context_dim: shapes.dim(&format!("{mid}.0.attn2.to_k.weight"), 1)?,
        })
    }

    /// Width of the timestep embedding.
    fn time_embed_dim(&self) -> usize {
        4 * self.model_channels
    }
}

fn conv3(in_c: usize, out_c: usize, stride: usize, vb: VarBuilder) -> Result<Conv2d> {
    conv2d(in_c, out_c, 3, Conv2dConfig { padding: 1, stride, ..Default::default() }, vb)
}

fn conv1(in_c: usize, out_c: usize, vb: VarBuilder) -> Result<Conv2d> {
    conv2d(in_c, out_c, 1, Conv2dConfig::default(), vb)
}

/// GroupNorm computed in f32 whatever the activations' dtype (the official `GroupNorm32`).
fn norm_f32(norm: &GroupNorm, x: &Tensor) -> Result<Tensor> {
    norm.forward(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())
}

/// Sinusoidal embedding [B, dim] of per-sample (fractional) timesteps [B]: `cat(cos, sin)`.
pub fn timestep_embedding(t: &Tensor, dim: usize) -> Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f32> =
        (0..half).map(|i| (-(MAX_PERIOD.ln()) * i as f64 / half as f64).exp() as f32).collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t.to_dtype(DType::F32)?.unsqueeze(1)?.broadcast_mul(&freqs)?;
    let emb = Tensor::cat(&[args.cos()?, args.sin()?], 1)?;
    if dim % 2 == 1 {
        emb.pad_with_zeros(1, 0, 1)
    } else {
        Ok(emb)
    }
}

/// Residual block conditioned on the timestep embedding.
#[derive(Debug, Clone)]
struct ResBlock {
    in_norm: GroupNorm,
    in_conv: Conv2d,
    emb: Linear,
    out_norm: GroupNorm,
    out_conv: Conv2d,
    skip: Option<Conv2d>,
}

impl ResBlock {
    fn new(in_c: usize, out_c: usize, emb_dim: usize, vb: VarBuilder) -> Result<Self> {
        let skip =
            if in_c != out_c { Some(conv1(in_c, out_c, vb.pp("skip_connection"))?) } else { None };
        Ok(Self {
            in_norm: group_norm(NORM_GROUPS, in_c, RES_NORM_EPS, vb.pp("in_layers.0"))?,
            in_conv: conv3(in_c, out_c, 1, vb.pp("in_layers.2"))?,
            emb: linear(emb_dim, out_c, vb.pp("emb_layers.1"))?,
            out_norm: group_norm(NORM_GROUPS, out_c, RES_NORM_EPS, vb.pp("out_layers.0"))?,
            out_conv: conv3(out_c, out_c, 1, vb.pp("out_layers.3"))?,
            skip,
        })
    }

    fn forward(&self, x: &Tensor, emb: &Tensor) -> Result<Tensor> {
        let h = self.in_conv.forward(&norm_f32(&self.in_norm, x)?.silu()?)?;
        let e = self.emb.forward(&emb.silu()?)?.to_dtype(h.dtype())?;
        let h = h.broadcast_add(&e.unsqueeze(2)?.unsqueeze(3)?)?;
        let h = self.out_conv.forward(&norm_f32(&self.out_norm, &h)?.silu()?)?;
        match &self.skip {
            Some(skip) => skip.forward(x)? + h,
            None => x + h,
        }
    }
}

/// Multi-head attention of `x` to `context` (itself for self-attention), no q/k/v bias.
#[derive(Debug, Clone)]
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl Attention {
    fn new(dim: usize, context_dim: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            to_q: linear_no_bias(dim, dim, vb.pp("to_q"))?,
            to_k: linear_no_bias(context_dim, dim, vb.pp("to_k"))?,
            to_v: linear_no_bias(context_dim, dim, vb.pp("to_v"))?,
            to_out: linear(dim, dim, vb.pp("to_out.0"))?,
            heads,
        })
    }

    /// [B, N, dim] → [B, heads, N, dim/heads].
    fn split_heads(&self, t: &Tensor) -> Result<Tensor> {
        let (b, n, c) = t.dims3()?;
        t.reshape((b, n, self.heads, c / self.heads))?.transpose(1, 2)?.contiguous()
    }

    /// `key_bias`: [B, 1, 1, Nk], 0 for keys to attend and −∞ for padding.
    fn forward(&self, x: &Tensor, context: &Tensor, key_bias: Option<&Tensor>) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let q = self.split_heads(&self.to_q.forward(x)?)?;
        let k = self.split_heads(&self.to_k.forward(context)?)?;
        let v = self.split_heads(&self.to_v.forward(context)?)?;
        let scale = ((c / self.heads) as f64).powf(-0.5);
        let mut scores = (q.matmul(&k.t()?)? * scale)?;
        if let Some(bias) = key_bias {
            scores = scores.broadcast_add(bias)?;
        }
        let attn = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?;
        self.to_out.forward(&out)
    }
}

/// GEGLU feed-forward: Linear → (x · GELU(gate)) → Linear, with exact (erf) GELU.
#[derive(Debug, Clone)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj: linear(dim, 2 * inner, vb.pp("net.0.proj"))?,
            out: linear(inner, dim, vb.pp("net.2"))?,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.proj.forward(x)?;
        let inner = h.dim(D::Minus1)? / 2;
        let value = h.narrow(D::Minus1, 0, inner)?;
        let gate = h.narrow(D::Minus1, inner, inner)?;
        self.out.forward(&(value * gate.gelu_erf()?)?)
    }
}

/// Pre-norm transformer block: self-attention, cross-attention to the slots, feed-forward.
#[derive(Debug, Clone)]
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl TransformerBlock {
    fn new(dim: usize, context_dim: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: layer_norm(dim, LAYER_NORM_EPS, vb.pp("norm1"))?,
            attn1: Attention::new(dim, dim, heads, vb.pp("attn1"))?,
            norm2: layer_norm(dim, LAYER_NORM_EPS, vb.pp("norm2"))?,
            attn2: Attention::new(dim, context_dim, heads, vb.pp("attn2"))?,
            norm3: layer_norm(dim, LAYER_NORM_EPS, vb.pp("norm3"))?,
            ff: FeedForward::new(dim, vb.pp("ff"))?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor, slot_bias: Option<&Tensor>) -> Result<Tensor> {
        let h = self.norm1.forward(x)?;
        let x = (self.attn1.forward(&h, &h, None)? + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, context, slot_bias)? + x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + x
    }
}

/// GroupNorm, 1×1 projection to tokens, transformer blocks, projection back, residual.
#[derive(Debug, Clone)]
struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Conv2d,
    blocks: Vec<TransformerBlock>,
    proj_out: Conv2d,
}

impl SpatialTransformer {
    fn new(c: usize, cfg: &UNetConfig, vb: VarBuilder) -> Result<Self> {
        let heads = (c / cfg.num_head_channels).max(1);
        let blocks = (0..cfg.transformer_depth)
            .map(|i| {
                TransformerBlock::new(c, cfg.context_dim, heads, vb.pp("transformer_blocks").pp(i))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            norm: group_norm(NORM_GROUPS, c, ATTN_NORM_EPS, vb.pp("norm"))?,
            proj_in: conv1(c, c, vb.pp("proj_in"))?,
            blocks,
            proj_out: conv1(c, c, vb.pp("proj_out"))?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor, slot_bias: Option<&Tensor>) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let t = self.proj_in.forward(&self.norm.forward(x)?)?;
        let mut t = t.flatten_from(2)?.transpose(1, 2)?.contiguous()?;
        for block in &self.blocks {
            t = block.forward(&t, context, slot_bias)?;
        }
        let t = t.transpose(1, 2)?.reshape((b, c, h, w))?;
        self.proj_out.forward(&t)? + x
    }
}

/// One element of a `TimestepEmbedSequential`.
#[derive(Debug, Clone)]
enum Layer {
    Conv(Conv2d),
    Res(ResBlock),
    Attn(SpatialTransformer),
    /// Nearest ×2, then a 3×3 convolution.
    Upsample(Conv2d),
}

impl Layer {
    fn forward(
        &self,
        x: &Tensor,
        emb: &Tensor,
        context: &Tensor,
        slot_bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        match self {
            Self::Conv(c) => c.forward(x),
            Self::Res(r) => r.forward(x, emb),
            Self::Attn(a) => a.forward(x, context, slot_bias),
            Self::Upsample(c) => {
                let (_, _, h, w) = x.dims4()?;
                c.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)
            }
        }
    }
}

/// A sequence of layers sharing the timestep embedding and the context.
#[derive(Debug, Clone)]
struct Block(Vec<Layer>);

impl Block {
    fn forward(
        &self,
        x: &Tensor,
        emb: &Tensor,
        context: &Tensor,
        slot_bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.0.iter().try_fold(x.clone(), |h, l| l.forward(&h, emb, context, slot_bias))
    }
}

/// The noise-predicting UNet.
#[derive(Debug, Clone)]
pub struct UNetModel {
    time_in: Linear,
    time_out: Linear,
    input_blocks: Vec<Block>,
    middle_block: Block,
    output_blocks: Vec<Block>,
    out_norm: GroupNorm,
    out_conv: Conv2d,
    model_channels: usize,
}

impl UNetModel {
    /// Builds the UNet from tensors named as in the official checkpoints.
    pub fn new(vb: VarBuilder, cfg: &UNetConfig) -> Result<Self> {
        let mc = cfg.model_channels;
        let emb_dim = cfg.time_embed_dim();
        let res = |i: usize, o: usize, vb: VarBuilder| -> Result<Layer> {
            Ok(Layer::Res(ResBlock::new(i, o, emb_dim, vb)?))
        };
        let attn = |c: usize, vb: VarBuilder| -> Result<Layer> {
            Ok(Layer::Attn(SpatialTransformer::new(c, cfg, vb)?))
        };

        let vb_in = vb.pp("input_blocks");
        let mut input_blocks =
            vec![Block(vec![Layer::Conv(conv3(cfg.in_channels, mc, 1, vb_in.pp("0.0"))?)])];
        let mut skip_channels = vec![mc];
        let mut ch = mc;
        let levels = cfg.channel_mult.len();
        for (level, &mult) in cfg.channel_mult.iter().enumerate() {
            for _ in 0..cfg.num_res_blocks {
                let vb_b = vb_in.pp(input_blocks.len());
                let mut layers = vec![res(ch, mult * mc, vb_b.pp(0))?];
                ch = mult * mc;
                if cfg.attention_levels[level] {
                    layers.push(attn(ch, vb_b.pp(1))?);
                }
                input_blocks.push(Block(layers));
                skip_channels.push(ch);
            }
            if level + 1 < levels {
                let down = conv3(ch, ch, 2, vb_in.pp(input_blocks.len()).pp("0.op"))?;
                input_blocks.push(Block(vec![Layer::Conv(down)]));
                skip_channels.push(ch);
            }
        }
        let vb_mid = vb.pp("middle_block");
        let middle_block = Block(vec![
            res(ch, ch, vb_mid.pp(0))?,
            attn(ch, vb_mid.pp(1))?,
            res(ch, ch, vb_mid.pp(2))?,
        ]);

        let vb_out = vb.pp("output_blocks");
        let mut output_blocks = Vec::new();
        for (level, &mult) in cfg.channel_mult.iter().enumerate().rev() {
            for i in 0..=cfg.num_res_blocks {
                let vb_b = vb_out.pp(output_blocks.len());
                let skip = skip_channels.pop().expect("one skip connection per input block");
                let mut layers = vec![res(ch + skip, mult * mc, vb_b.pp(0))?];
                ch = mult * mc;
                if cfg.attention_levels[level] {
                    layers.push(attn(ch, vb_b.pp(1))?);
                }
                if level > 0 && i == cfg.num_res_blocks {
                    layers.push(Layer::Upsample(conv3(
                        ch,
                        ch,
                        1,
                        vb_b.pp(layers.len()).pp("conv"),
                    )?));
                }
                output_blocks.push(Block(layers));
            }
        }
        Ok(Self {
            time_in: linear(mc, emb_dim, vb.pp("time_embed.0"))?,
            time_out: linear(emb_dim, emb_dim, vb.pp("time_embed.2"))?,
            input_blocks,
            middle_block,
            output_blocks,
            out_norm: group_norm(NORM_GROUPS, ch, RES_NORM_EPS, vb.pp("out.0"))?,
            out_conv: conv3(ch, cfg.out_channels, 1, vb.pp("out.2"))?,
            model_channels: mc,
        })
    }

    /// Predicted noise [B, C, h, w] for latents `x` [B, C, h, w] at per-sample timesteps
    /// `t` [B] (fractional allowed), conditioned on `context` [B, K, D].
    pub fn forward(&self, x: &Tensor, t: &Tensor, context: &Tensor) -> Result<Tensor> {
        self.forward_masked(x, t, context, None)
    }

    /// As [`forward`](Self::forward), where `context` is a padded batch of slot sets with
    /// `context_mask` [B, K] (1 for a real slot, 0 for padding): padded slots get no attention.
    pub fn forward_masked(
        &self,
        x: &Tensor,
        t: &Tensor,
        context: &Tensor,
        context_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let emb = timestep_embedding(t, self.model_channels)?.to_dtype(x.dtype())?;
        let emb = self.time_out.forward(&self.time_in.forward(&emb)?.silu()?)?;
        let context = context.to_dtype(x.dtype())?;
        let slot_bias = context_mask.map(|m| slot_bias(m, x.dtype())).transpose()?;
        let slot_bias = slot_bias.as_ref();
        let mut skips = Vec::with_capacity(self.input_blocks.len());
        let mut h = x.clone();
        for block in &self.input_blocks {
            h = block.forward(&h, &emb, &context, slot_bias)?;
            skips.push(h.clone());
        }
        h = self.middle_block.forward(&h, &emb, &context, slot_bias)?;
        for block in &self.output_blocks {
            let skip = skips.pop().expect("one skip connection per output block");
            h = block.forward(&Tensor::cat(&[&h, &skip], 1)?, &emb, &context, slot_bias)?;
        }
        self.out_conv.forward(&norm_f32(&self.out_norm, &h)?.silu()?)
    }
}

/// Additive attention bias [B, 1, 1, K] from a slot mask [B, K]: 0 where 1, −∞ where 0.
fn slot_bias(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, k) = mask.dims2()?;
    let keep = mask.to_dtype(DType::F32)?.ge(0.5)?;
    let zeros = Tensor::zeros((b, k), DType::F32, mask.device())?;
    let neg = Tensor::full(f32::NEG_INFINITY, (b, k), mask.device())?;
    keep.where_cond(&zeros, &neg)?.reshape((b, 1, 1, k))?.to_dtype(dtype)
}
