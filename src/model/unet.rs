//! The latent-diffusion UNet of SlotDiffusion (LDM `openaimodel` layout: `input_blocks`,
//! `middle_block`, `output_blocks`; official `video_based/models/unet/`), predicting the noise
//! in a latent from its timestep while cross-attending to the slots.
//!
//! Unlike the usual implementations it takes one (possibly fractional) timestep per sample
//! and a mask over slots, so that requests at different denoising steps and with different
//! slot counts share one forward pass. The slots' cross-attention keys and values do not
//! change between denoising steps: [`UNetModel::context_kv`] computes them once per slot set
//! and [`UNetModel::forward_kv`] reuses them; [`ContextKv::cat`] batches the sets of several
//! requests, padding and masking the shorter ones.

use candle_core::{bail, DType, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::ops::{attention, conv2d, geglu, group_norm, layer_norm, linear, linear_no_bias};
use crate::ops::{merge_heads, split_heads};
use crate::ops::{upsample_nearest2x, Conv2d, GroupNorm, LayerNorm, Linear};
use serde::{Deserialize, Serialize};

use crate::checkpoint::ShapeMap;

/// GroupNorm epsilon of the residual blocks and the output head (`normalization()` in
/// `utils.py` is `GroupNorm32(32, c)`, PyTorch's default eps).
const RES_NORM_EPS: f64 = 1e-5;
/// GroupNorm epsilon in front of each spatial transformer (`attention.py::Normalize`).
const ATTN_NORM_EPS: f64 = 1e-6;
/// LayerNorm epsilon inside the transformer blocks (PyTorch's default).
const LAYER_NORM_EPS: f64 = 1e-5;
/// Groups of every GroupNorm.
const NORM_GROUPS: usize = 32;
/// Longest period of the sinusoidal timestep embedding.
const MAX_PERIOD: f64 = 10000.0;
/// Hidden width of the GEGLU feed-forward, as a multiple of the transformer width.
const FF_MULT: usize = 4;
/// Width of the timestep embedding, as a multiple of `model_channels`.
const TIME_EMBED_MULT: usize = 4;

/// Sizes of the UNet; all but the head width are readable from a checkpoint's shapes
/// ([`UNetConfig::infer`]).
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
    /// Whether each level has a spatial transformer after each residual block. The official
    /// `attention_resolutions` are downsampling factors: (8, 4, 2) with 4 levels (factors
    /// 1, 2, 4, 8) is [false, true, true, true]. The middle block always has one.
    pub attention_levels: Vec<bool>,
    /// Channels per attention head (`num_head_channels`); heads = channels / this.
    pub num_head_channels: usize,
    /// Transformer blocks per spatial transformer.
    pub transformer_depth: usize,
    /// Width of the conditioning vectors (the slot size D).
    pub context_dim: usize,
}

impl UNetConfig {
    /// Reads the sizes from the tensors under `prefix` (e.g.
    /// `dm_decoder.model.diffusion_model`); `num_head_channels` cannot be read from shapes
    /// and is given (32 in every official config).
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
        TIME_EMBED_MULT * self.model_channels
    }
}

fn conv3(in_c: usize, out_c: usize, stride: usize, vb: VarBuilder) -> Result<Conv2d> {
    conv2d(in_c, out_c, 3, Conv2dConfig { padding: 1, stride, ..Default::default() }, vb)
}

fn conv1(in_c: usize, out_c: usize, vb: VarBuilder) -> Result<Conv2d> {
    conv2d(in_c, out_c, 1, Conv2dConfig::default(), vb)
}

/// Sinusoidal embedding [B, dim] (f32) of per-sample, possibly fractional, timesteps \[B]:
/// `cat(cos(t·f), sin(t·f))` with `f_i = exp(−ln(10⁴)·i/half)`, in the official f32
/// arithmetic order (odd `dim` gets a zero column).
pub fn timestep_embedding(t: &Tensor, dim: usize) -> Result<Tensor> {
    let half = dim / 2;
    let log_period = -(MAX_PERIOD.ln() as f32);
    let freqs: Vec<f32> = (0..half).map(|i| (log_period * i as f32 / half as f32).exp()).collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t.to_dtype(DType::F32)?.unsqueeze(1)?.broadcast_mul(&freqs)?;
    let emb = Tensor::cat(&[args.cos()?, args.sin()?], 1)?;
    if dim % 2 == 1 {
        emb.pad_with_zeros(1, 0, 1)
    } else {
        Ok(emb)
    }
}

/// Residual block conditioned on the timestep embedding (added after the first conv).
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
            (in_c != out_c).then(|| conv1(in_c, out_c, vb.pp("skip_connection"))).transpose()?;
        Ok(Self {
            in_norm: group_norm(NORM_GROUPS, in_c, RES_NORM_EPS, vb.pp("in_layers.0"))?,
            in_conv: conv3(in_c, out_c, 1, vb.pp("in_layers.2"))?,
            emb: linear(emb_dim, out_c, vb.pp("emb_layers.1"))?,
            out_norm: group_norm(NORM_GROUPS, out_c, RES_NORM_EPS, vb.pp("out_layers.0"))?,
            out_conv: conv3(out_c, out_c, 1, vb.pp("out_layers.3"))?,
            skip,
        })
    }

    /// `emb_silu`: the timestep embedding [B, E] after its SiLU (shared by every block).
    /// The official order: `in_layers` (GroupNorm, SiLU, conv), plus the embedding's
    /// projection, then `out_layers` (GroupNorm, SiLU, dropout, conv), plus the skip.
    fn forward(&self, x: &Tensor, emb_silu: &Tensor) -> Result<Tensor> {
        let h = self.in_conv.forward(&self.in_norm.forward_silu(x)?)?;
        let h = self.out_norm.forward_add_silu(&h, &self.emb.forward(emb_silu)?)?;
        match &self.skip {
            Some(skip) => self.out_conv.forward_residual(&h, &skip.forward(x)?),
            None => self.out_conv.forward_residual(&h, x),
        }
    }
}

/// Multi-head attention (`CrossAttention`): q from `x`, k/v from a context (`x` itself for
/// self-attention), no q/k/v bias, logits scaled by `head_dim^-1/2` after the product.
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

    /// Keys and values [B, heads, N, head_dim] of `context` [B, N, context_dim], contiguous
    /// (to be kept and batched: [`ContextKv`]).
    fn key_value(&self, context: &Tensor) -> Result<(Tensor, Tensor)> {
        let k = split_heads(&self.to_k.forward(context)?, self.heads)?.contiguous()?;
        let v = split_heads(&self.to_v.forward(context)?, self.heads)?.contiguous()?;
        Ok((k, v))
    }

    /// Attention of `x` [B, N, dim] to keys and values [B, heads, Nk, head_dim], plus
    /// `residual` [B, N, dim]; `bias` [B, 1, 1, Nk] is added to the logits (−∞ hides a key).
    fn attend(
        &self,
        x: &Tensor,
        (k, v): (&Tensor, &Tensor),
        bias: Option<&Tensor>,
        residual: &Tensor,
    ) -> Result<Tensor> {
        let q = split_heads(&self.to_q.forward(x)?, self.heads)?;
        let scale = ((x.dim(2)? / self.heads) as f64).powf(-0.5);
        let out = merge_heads(&attention(&q, k, v, scale, bias)?)?;
        self.to_out.forward_residual(&out, residual)
    }

    /// Self-attention of `x` [B, N, dim], plus `residual`.
    fn self_attend(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let k = split_heads(&self.to_k.forward(x)?, self.heads)?;
        let v = split_heads(&self.to_v.forward(x)?, self.heads)?;
        self.attend(x, (&k, &v), None, residual)
    }
}

/// GEGLU feed-forward: Linear → (value · GELU(gate)) → Linear, with exact (erf) GELU.
#[derive(Debug, Clone)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let inner = FF_MULT * dim;
        Ok(Self {
            proj: linear(dim, 2 * inner, vb.pp("net.0.proj"))?,
            out: linear(inner, dim, vb.pp("net.2"))?,
        })
    }

    /// The feed-forward of `x`, plus `residual`.
    fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.out.forward_residual(&geglu(&self.proj.forward(x)?)?, residual)
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
    /// Which entry of a [`ContextKv`] holds this block's slot keys and values.
    kv_index: usize,
}

impl TransformerBlock {
    fn new(
        dim: usize,
        cfg: &UNetConfig,
        heads: usize,
        kv_index: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            norm1: layer_norm(dim, LAYER_NORM_EPS, vb.pp("norm1"))?,
            attn1: Attention::new(dim, dim, heads, vb.pp("attn1"))?,
            norm2: layer_norm(dim, LAYER_NORM_EPS, vb.pp("norm2"))?,
            attn2: Attention::new(dim, cfg.context_dim, heads, vb.pp("attn2"))?,
            norm3: layer_norm(dim, LAYER_NORM_EPS, vb.pp("norm3"))?,
            ff: FeedForward::new(dim, vb.pp("ff"))?,
            kv_index,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &ContextKv) -> Result<Tensor> {
        let (k, v) = &ctx.kv[self.kv_index];
        let x = self.attn1.self_attend(&self.norm1.forward(x)?, x)?;
        let x = self.attn2.attend(&self.norm2.forward(&x)?, (k, v), ctx.bias.as_ref(), &x)?;
        self.ff.forward_residual(&self.norm3.forward(&x)?, &x)
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
    /// `next_kv`: the [`ContextKv`] index of the first block, advanced past the last.
    fn new(c: usize, cfg: &UNetConfig, next_kv: &mut usize, vb: VarBuilder) -> Result<Self> {
        let heads = c / cfg.num_head_channels;
        if heads == 0 {
            bail!("{c} channels are fewer than one head of {}", cfg.num_head_channels);
        }
        let inner = heads * cfg.num_head_channels;
        let blocks = (0..cfg.transformer_depth)
            .map(|i| {
                *next_kv += 1;
                TransformerBlock::new(
                    inner,
                    cfg,
                    heads,
                    *next_kv - 1,
                    vb.pp("transformer_blocks").pp(i),
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            norm: group_norm(NORM_GROUPS, c, ATTN_NORM_EPS, vb.pp("norm"))?,
            proj_in: conv1(c, inner, vb.pp("proj_in"))?,
            blocks,
            proj_out: conv1(inner, c, vb.pp("proj_out"))?,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &ContextKv) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let t = self.proj_in.forward(&self.norm.forward(x)?)?;
        let inner = t.dim(1)?;
        let mut t = t.flatten_from(2)?.transpose(1, 2)?.contiguous()?;
        for block in &self.blocks {
            t = block.forward(&t, ctx)?;
        }
        let t = t.transpose(1, 2)?.reshape((b, inner, h, w))?;
        self.proj_out.forward(&t)? + x
    }
}

/// One element of a `TimestepEmbedSequential`.
#[derive(Debug, Clone)]
enum Layer {
    /// The input convolution, or a downsampling one (3×3, stride 2, `op`).
    Conv(Conv2d),
    Res(ResBlock),
    Attn(SpatialTransformer),
    /// Nearest ×2, then a 3×3 convolution (`conv`).
    Upsample(Conv2d),
}

impl Layer {
    fn forward(&self, x: &Tensor, emb_silu: &Tensor, ctx: &ContextKv) -> Result<Tensor> {
        match self {
            Self::Conv(c) => c.forward(x),
            Self::Res(r) => r.forward(x, emb_silu),
            Self::Attn(a) => a.forward(x, ctx),
            Self::Upsample(c) => c.forward(&upsample_nearest2x(x)?),
        }
    }
}

/// A sequence of layers sharing the timestep embedding and the slots.
#[derive(Debug, Clone)]
struct Block(Vec<Layer>);

impl Block {
    fn forward(&self, x: &Tensor, emb_silu: &Tensor, ctx: &ContextKv) -> Result<Tensor> {
        self.0.iter().try_fold(x.clone(), |h, l| l.forward(&h, emb_silu, ctx))
    }

    fn transformer_blocks(&self) -> impl Iterator<Item = &TransformerBlock> {
        self.0.iter().flat_map(|l| match l {
            Layer::Attn(a) => a.blocks.as_slice(),
            _ => &[][..],
        })
    }
}

/// The slots' cross-attention keys and values for every transformer block of one UNet, for
/// a batch of slot sets: computed once per set ([`UNetModel::context_kv`]) and reused at
/// every denoising step ([`UNetModel::forward_kv`]).
#[derive(Debug, Clone)]
pub struct ContextKv {
    /// (keys, values) [B, heads, K, head_dim] per transformer block, in `kv_index` order.
    kv: Vec<(Tensor, Tensor)>,
    /// Added to the cross-attention logits [B, 1, 1, K]: 0 for a real slot, −∞ for padding;
    /// `None` when every slot is real.
    bias: Option<Tensor>,
}

impl ContextKv {
    /// Slot sets in the batch.
    pub fn batch_size(&self) -> usize {
        self.kv.first().map_or(0, |(k, _)| k.dims()[0])
    }

    /// Slots per set, padding included.
    pub fn num_slots(&self) -> usize {
        self.kv.first().map_or(0, |(k, _)| k.dims()[2])
    }

    /// Stacks the slot sets of several batches (e.g. one per request) into one batch,
    /// zero-padding the keys and values of shorter sets to the longest and masking the
    /// padding out, so that each sample attends to its own slots only.
    pub fn cat(parts: &[&ContextKv]) -> Result<Self> {
        let Some(first) = parts.first() else { bail!("no slot sets to concatenate") };
        if parts.iter().any(|p| p.kv.len() != first.kv.len()) {
            bail!("slot keys and values come from different UNets");
        }
        let k_max = parts.iter().map(|p| p.num_slots()).max().unwrap_or(0);
        let kv = (0..first.kv.len())
            .map(|i| {
                let stack = |pick: fn(&(Tensor, Tensor)) -> &Tensor| {
                    let padded = parts
                        .iter()
                        .map(|p| pick(&p.kv[i]).pad_with_zeros(2, 0, k_max - p.num_slots()))
                        .collect::<Result<Vec<_>>>()?;
                    Tensor::cat(&padded, 0)
                };
                Ok((stack(|kv| &kv.0)?, stack(|kv| &kv.1)?))
            })
            .collect::<Result<_>>()?;
        let masked = parts.iter().any(|p| p.bias.is_some() || p.num_slots() < k_max);
        let bias = if masked {
            let biases = parts.iter().map(|p| p.padded_bias(k_max)).collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&biases, 0)?)
        } else {
            None
        };
        Ok(Self { kv, bias })
    }

    /// This batch's logit bias [B, 1, 1, k_max], the slots past its own count hidden.
    fn padded_bias(&self, k_max: usize) -> Result<Tensor> {
        let (k, _) = &self.kv[0];
        let (b, k_own) = (self.batch_size(), self.num_slots());
        let own = match &self.bias {
            Some(bias) => bias.clone(),
            None => Tensor::zeros((b, 1, 1, k_own), k.dtype(), k.device())?,
        };
        let hidden = Tensor::full(f32::NEG_INFINITY, (b, 1, 1, k_max - k_own), k.device())?;
        Tensor::cat(&[own, hidden.to_dtype(k.dtype())?], 3)
    }
}

/// Additive logit bias [B, 1, 1, K] from a slot mask [B, K]: 0 where ≥ 0.5, −∞ elsewhere.
fn slot_bias(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, k) = mask.dims2()?;
    let keep = mask.to_dtype(DType::F32)?.ge(0.5)?;
    let zeros = Tensor::zeros((b, k), DType::F32, mask.device())?;
    let hidden = Tensor::full(f32::NEG_INFINITY, (b, k), mask.device())?;
    keep.where_cond(&zeros, &hidden)?.reshape((b, 1, 1, k))?.to_dtype(dtype)
}

/// The noise-predicting UNet, with weights under the official names (`time_embed`,
/// `input_blocks`, `middle_block`, `output_blocks`, `out`).
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
    dtype: DType,
}

impl UNetModel {
    /// Builds the UNet from tensors named as in the official checkpoints (`vb` at the UNet's
    /// prefix, e.g. `dm_decoder.model.diffusion_model`).
    pub fn new(vb: VarBuilder, cfg: &UNetConfig) -> Result<Self> {
        let mc = cfg.model_channels;
        let emb_dim = cfg.time_embed_dim();
        let mut next_kv = 0;
        let res = |i: usize, o: usize, vb: VarBuilder| -> Result<Layer> {
            Ok(Layer::Res(ResBlock::new(i, o, emb_dim, vb)?))
        };
        let mut attn = |c: usize, vb: VarBuilder| -> Result<Layer> {
            Ok(Layer::Attn(SpatialTransformer::new(c, cfg, &mut next_kv, vb)?))
        };
        let levels = cfg.channel_mult.len();
        if cfg.attention_levels.len() != levels {
            bail!("{} attention flags for {levels} levels", cfg.attention_levels.len());
        }

        let vb_in = vb.pp("input_blocks");
        let mut input_blocks =
            vec![Block(vec![Layer::Conv(conv3(cfg.in_channels, mc, 1, vb_in.pp("0.0"))?)])];
        let mut skip_channels = vec![mc];
        let mut ch = mc;
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
                let Some(skip) = skip_channels.pop() else {
                    bail!("more output than input blocks")
                };
                let mut layers = vec![res(ch + skip, mult * mc, vb_b.pp(0))?];
                ch = mult * mc;
                if cfg.attention_levels[level] {
                    layers.push(attn(ch, vb_b.pp(1))?);
                }
                if level > 0 && i == cfg.num_res_blocks {
                    let conv = conv3(ch, ch, 1, vb_b.pp(layers.len()).pp("conv"))?;
                    layers.push(Layer::Upsample(conv));
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
            dtype: vb.dtype(),
        })
    }

    /// Every transformer block in `kv_index` order (the order they were built and run in).
    fn transformer_blocks(&self) -> impl Iterator<Item = &TransformerBlock> {
        self.input_blocks
            .iter()
            .chain(std::iter::once(&self.middle_block))
            .chain(&self.output_blocks)
            .flat_map(Block::transformer_blocks)
    }

    /// Cross-attention keys and values of slot sets `context` [B, K, D] for every
    /// transformer block, to reuse across denoising steps. `context_mask` [B, K]: 1 for a
    /// real slot, 0 for padding (every set needs at least one real slot).
    pub fn context_kv(&self, context: &Tensor, context_mask: Option<&Tensor>) -> Result<ContextKv> {
        let context = context.to_dtype(self.dtype)?;
        let kv = self
            .transformer_blocks()
            .map(|b| b.attn2.key_value(&context))
            .collect::<Result<_>>()?;
        let bias = context_mask.map(|m| slot_bias(m, self.dtype)).transpose()?;
        Ok(ContextKv { kv, bias })
    }

    /// Predicted noise [B, C, h, w], in the model's dtype, for latents `x` [B, C, h, w] at
    /// per-sample timesteps `t` \[B] (fractional allowed), conditioned on `context` [B, K, D].
    pub fn forward(&self, x: &Tensor, t: &Tensor, context: &Tensor) -> Result<Tensor> {
        self.forward_masked(x, t, context, None)
    }

    /// As [`forward`](Self::forward), where `context` [B, K, D] is a padded batch of slot
    /// sets and `context_mask` [B, K] says which slots are real (1) or padding (0): padded
    /// slots get −∞ logits, so each sample's output equals that of its unpadded set alone.
    pub fn forward_masked(
        &self,
        x: &Tensor,
        t: &Tensor,
        context: &Tensor,
        context_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_kv(x, t, &self.context_kv(context, context_mask)?)
    }

    /// As [`forward`](Self::forward), with the slots' keys and values computed beforehand
    /// ([`context_kv`](Self::context_kv), possibly batched with [`ContextKv::cat`]).
    pub fn forward_kv(&self, x: &Tensor, t: &Tensor, ctx: &ContextKv) -> Result<Tensor> {
        let b = x.dim(0)?;
        if t.dims() != [b] || ctx.batch_size() != b {
            bail!(
                "UNet batch: {b} latents, timesteps {:?}, {} slot sets",
                t.dims(),
                ctx.batch_size()
            );
        }
        if ctx.kv.len() != self.transformer_blocks().count() {
            bail!("slot keys and values come from a different UNet");
        }
        let emb = timestep_embedding(t, self.model_channels)?.to_dtype(self.dtype)?;
        let emb_silu = self.time_out.forward(&self.time_in.forward(&emb)?.silu()?)?.silu()?;
        let x = x.to_dtype(self.dtype)?;
        let mut skips = Vec::with_capacity(self.input_blocks.len());
        let mut h = x;
        for block in &self.input_blocks {
            h = block.forward(&h, &emb_silu, ctx)?;
            skips.push(h.clone());
        }
        h = self.middle_block.forward(&h, &emb_silu, ctx)?;
        for block in &self.output_blocks {
            let Some(skip) = skips.pop() else { bail!("more output than input blocks") };
            h = block.forward(&Tensor::cat(&[&h, &skip], 1)?, &emb_silu, ctx)?;
        }
        self.out_conv.forward(&self.out_norm.forward_silu(&h)?)
    }
}
