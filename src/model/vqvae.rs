//! The taming-transformers VQ-VAE that gives SlotDiffusion its latent space: an encoder to a
//! small latent map, a codebook that snaps latents to the nearest entry, and a decoder back
//! to pixels (official `vqvae/modules.py`, `VQVAE.py`, `quantize.py`).

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{conv2d, group_norm, Conv2d, Conv2dConfig, GroupNorm, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::checkpoint::ShapeMap;

/// GroupNorm epsilon of every VQ-VAE normalisation (`Normalize` in `modules.py`).
const NORM_EPS: f64 = 1e-6;
/// Groups of every VQ-VAE GroupNorm.
const NORM_GROUPS: usize = 32;

/// Sizes of the VQ-VAE; all readable from a checkpoint's shapes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VqVaeConfig {
    /// Image channels in and out (3).
    pub in_channels: usize,
    /// Base width (`ch`); level i has `ch * ch_mult[i]` channels.
    pub ch: usize,
    /// Width multipliers per resolution level; len − 1 downsamplings by 2.
    pub ch_mult: Vec<usize>,
    /// Residual blocks per encoder level (the decoder has one more).
    pub num_res_blocks: usize,
    /// Channels of the encoder output / decoder input (`z_channels`).
    pub z_channels: usize,
    /// Codebook entries (`n_embed`).
    pub n_embed: usize,
    /// Width of a codebook entry, i.e. the latent channels the diffusion model sees.
    pub embed_dim: usize,
}

impl VqVaeConfig {
    /// Reads every size from the tensors under `prefix` (e.g. `dm_decoder.vae.vqvae`).
    pub fn infer(shapes: &ShapeMap, prefix: &str) -> Result<Self> {
        let key = |k: &str| format!("{prefix}.{k}");
        let ch = shapes.dim(&key("encoder.conv_in.weight"), 0)?;
        let levels = shapes.count_indexed(&key("encoder.down"));
        let ch_mult = (0..levels)
            .map(|i| {
                Ok(shapes.dim(&key(&format!("encoder.down.{i}.block.0.conv1.weight")), 0)? / ch)
            })
            .collect::<Result<Vec<_>>>()?;
        let [n_embed, embed_dim] = shapes.dims(&key("quantize.embedding.weight"))? else {
            candle_core::bail!("{prefix}.quantize.embedding.weight must be 2-d");
        };
        Ok(Self {
            in_channels: shapes.dim(&key("encoder.conv_in.weight"), 1)?,
            ch,
            ch_mult,
            num_res_blocks: shapes.count_indexed(&key("encoder.down.0.block")),
            z_channels: shapes.dim(&key("encoder.conv_out.weight"), 0)?,
            n_embed: *n_embed,
            embed_dim: *embed_dim,
        })
    }

    /// How much smaller the latent map is than the image, per side.
    pub fn downsample_factor(&self) -> usize {
        1 << (self.ch_mult.len() - 1)
    }
}

fn conv(in_c: usize, out_c: usize, k: usize, stride: usize, vb: VarBuilder) -> Result<Conv2d> {
    let padding = if k == 3 && stride == 1 { 1 } else { 0 };
    conv2d(in_c, out_c, k, Conv2dConfig { padding, stride, ..Default::default() }, vb)
}

fn norm(c: usize, vb: VarBuilder) -> Result<GroupNorm> {
    group_norm(NORM_GROUPS, c, NORM_EPS, vb)
}

/// GroupNorm then swish, the pre-activation of every block.
fn norm_swish(norm: &GroupNorm, x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::silu(&norm.forward(x)?)
}

/// Pre-activation residual block with an optional 1×1 shortcut when widths differ.
#[derive(Debug, Clone)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    nin_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(in_c: usize, out_c: usize, vb: VarBuilder) -> Result<Self> {
        let nin_shortcut = if in_c != out_c {
            Some(conv(in_c, out_c, 1, 1, vb.pp("nin_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: norm(in_c, vb.pp("norm1"))?,
            conv1: conv(in_c, out_c, 3, 1, vb.pp("conv1"))?,
            norm2: norm(out_c, vb.pp("norm2"))?,
            conv2: conv(out_c, out_c, 3, 1, vb.pp("conv2"))?,
            nin_shortcut,
        })
    }
}

impl Module for ResnetBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&norm_swish(&self.norm1, x)?)?;
        let h = self.conv2.forward(&norm_swish(&self.norm2, &h)?)?;
        match &self.nin_shortcut {
            Some(s) => s.forward(x)? + h,
            None => x + h,
        }
    }
}

/// Single-head spatial self-attention of the middle blocks.
#[derive(Debug, Clone)]
struct AttnBlock {
    norm: GroupNorm,
    q: Conv2d,
    k: Conv2d,
    v: Conv2d,
    proj_out: Conv2d,
}

impl AttnBlock {
    fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm: norm(c, vb.pp("norm"))?,
            q: conv(c, c, 1, 1, vb.pp("q"))?,
            k: conv(c, c, 1, 1, vb.pp("k"))?,
            v: conv(c, c, 1, 1, vb.pp("v"))?,
            proj_out: conv(c, c, 1, 1, vb.pp("proj_out"))?,
        })
    }
}

impl Module for AttnBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let hn = self.norm.forward(x)?;
        let tokens = |conv: &Conv2d| conv.forward(&hn)?.reshape((b, c, h * w));
        let q = tokens(&self.q)?.transpose(1, 2)?.contiguous()?; // [b, hw, c]
        let k = tokens(&self.k)?; // [b, c, hw]
        let v = tokens(&self.v)?; // [b, c, hw]
        let weights = (q.matmul(&k)? * (c as f64).powf(-0.5))?;
        let weights = candle_nn::ops::softmax_last_dim(&weights)?; // [b, hw_q, hw_k]
        let out = v.matmul(&weights.transpose(1, 2)?.contiguous()?)?.reshape((b, c, h, w))?;
        x + self.proj_out.forward(&out)?
    }
}

/// The middle of encoder and decoder: residual block, attention, residual block.
#[derive(Debug, Clone)]
struct MidBlock {
    block_1: ResnetBlock,
    attn_1: AttnBlock,
    block_2: ResnetBlock,
}

impl MidBlock {
    fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            block_1: ResnetBlock::new(c, c, vb.pp("block_1"))?,
            attn_1: AttnBlock::new(c, vb.pp("attn_1"))?,
            block_2: ResnetBlock::new(c, c, vb.pp("block_2"))?,
        })
    }
}

impl Module for MidBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.block_2.forward(&self.attn_1.forward(&self.block_1.forward(x)?)?)
    }
}

/// One resolution level: residual blocks, then an optional resampling convolution.
#[derive(Debug, Clone)]
struct Level {
    blocks: Vec<ResnetBlock>,
    resample: Option<Conv2d>,
}

impl Level {
    fn new(
        widths: &[(usize, usize)],
        resample: Option<(usize, usize)>,
        vb: &VarBuilder,
    ) -> Result<Self> {
        let blocks = widths
            .iter()
            .enumerate()
            .map(|(i, &(i_c, o_c))| ResnetBlock::new(i_c, o_c, vb.pp("block").pp(i)))
            .collect::<Result<_>>()?;
        let resample = match resample {
            // Downsampling: pad (0, 1, 0, 1), then a 3×3 stride-2 convolution.
            Some((c, 2)) => Some(conv(c, c, 3, 2, vb.pp("downsample.conv"))?),
            // Upsampling: nearest ×2, then a 3×3 convolution.
            Some((c, _)) => Some(conv(c, c, 3, 1, vb.pp("upsample.conv"))?),
            None => None,
        };
        Ok(Self { blocks, resample })
    }

    fn forward_down(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.blocks.iter().try_fold(x.clone(), |h, b| b.forward(&h))?;
        match &self.resample {
            Some(conv) => {
                conv.forward(&h.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(D::Minus2, 0, 1)?)
            }
            None => Ok(h),
        }
    }

    fn forward_up(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.blocks.iter().try_fold(x.clone(), |h, b| b.forward(&h))?;
        match &self.resample {
            Some(conv) => {
                let (_, _, hh, ww) = h.dims4()?;
                conv.forward(&h.upsample_nearest2d(2 * hh, 2 * ww)?)
            }
            None => Ok(h),
        }
    }
}

/// Image → pre-quantization latent.
#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    down: Vec<Level>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(cfg: &VqVaeConfig, vb: VarBuilder) -> Result<Self> {
        let levels = cfg.ch_mult.len();
        let mut c_in = cfg.ch;
        let mut down = Vec::with_capacity(levels);
        for (i, m) in cfg.ch_mult.iter().enumerate() {
            let c_out = cfg.ch * m;
            let widths: Vec<_> = (0..cfg.num_res_blocks)
                .map(|j| (if j == 0 { c_in } else { c_out }, c_out))
                .collect();
            let resample = (i + 1 < levels).then_some((c_out, 2));
            down.push(Level::new(&widths, resample, &vb.pp("down").pp(i))?);
            c_in = c_out;
        }
        Ok(Self {
            conv_in: conv(cfg.in_channels, cfg.ch, 3, 1, vb.pp("conv_in"))?,
            down,
            mid: MidBlock::new(c_in, vb.pp("mid"))?,
            norm_out: norm(c_in, vb.pp("norm_out"))?,
            conv_out: conv(c_in, cfg.z_channels, 3, 1, vb.pp("conv_out"))?,
        })
    }
}

impl Module for Encoder {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv_in.forward(x)?;
        let h = self.down.iter().try_fold(h, |h, l| l.forward_down(&h))?;
        let h = self.mid.forward(&h)?;
        self.conv_out.forward(&norm_swish(&self.norm_out, &h)?)
    }
}

/// Latent → image.
#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    /// Levels from the coarsest to the finest (checkpoint index `up.{levels-1}` first).
    up: Vec<Level>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(cfg: &VqVaeConfig, vb: VarBuilder) -> Result<Self> {
        let levels = cfg.ch_mult.len();
        let mut c_in = cfg.ch * cfg.ch_mult[levels - 1];
        let conv_in = conv(cfg.z_channels, c_in, 3, 1, vb.pp("conv_in"))?;
        let mid = MidBlock::new(c_in, vb.pp("mid"))?;
        let mut up = Vec::with_capacity(levels);
        for i in (0..levels).rev() {
            let c_out = cfg.ch * cfg.ch_mult[i];
            let widths: Vec<_> = (0..=cfg.num_res_blocks)
                .map(|j| (if j == 0 { c_in } else { c_out }, c_out))
                .collect();
            let resample = (i > 0).then_some((c_out, 1));
            up.push(Level::new(&widths, resample, &vb.pp("up").pp(i))?);
            c_in = c_out;
        }
        Ok(Self {
            conv_in,
            mid,
            up,
            norm_out: norm(c_in, vb.pp("norm_out"))?,
            conv_out: conv(c_in, cfg.in_channels, 3, 1, vb.pp("conv_out"))?,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let h = self.mid.forward(&self.conv_in.forward(z)?)?;
        let h = self.up.iter().try_fold(h, |h, l| l.forward_up(&h))?;
        self.conv_out.forward(&norm_swish(&self.norm_out, &h)?)
    }
}

/// The VQ-VAE: encode, snap to the codebook, decode.
#[derive(Debug, Clone)]
pub struct VqVae {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Conv2d,
    post_quant_conv: Conv2d,
    /// Codebook [n_embed, embed_dim].
    codebook: Tensor,
    /// Squared norm of each codebook entry [n_embed], precomputed for nearest-entry search.
    codebook_sq: Tensor,
    cfg: VqVaeConfig,
}

impl VqVae {
    /// Builds the VQ-VAE from tensors named as in the official checkpoints.
    pub fn new(vb: VarBuilder, cfg: &VqVaeConfig) -> Result<Self> {
        let codebook = vb.get((cfg.n_embed, cfg.embed_dim), "quantize.embedding.weight")?;
        let codebook_sq = codebook.sqr()?.sum(1)?;
        Ok(Self {
            encoder: Encoder::new(cfg, vb.pp("encoder"))?,
            decoder: Decoder::new(cfg, vb.pp("decoder"))?,
            quant_conv: conv(cfg.z_channels, cfg.embed_dim, 1, 1, vb.pp("quant_conv"))?,
            post_quant_conv: conv(cfg.embed_dim, cfg.z_channels, 1, 1, vb.pp("post_quant_conv"))?,
            codebook,
            codebook_sq,
            cfg: cfg.clone(),
        })
    }

    /// How much smaller the latent map is than the image, per side.
    pub fn downsample_factor(&self) -> usize {
        self.cfg.downsample_factor()
    }

    /// Image [B, 3, H, W] in [-1, 1] → latent [B, embed_dim, H/f, W/f], not quantized (the
    /// x0 that latent diffusion is trained on).
    pub fn encode(&self, img: &Tensor) -> Result<Tensor> {
        self.quant_conv.forward(&self.encoder.forward(img)?)
    }

    /// Codebook index of each latent position [B, h, w]: the nearest entry by squared L2
    /// distance, computed as ‖z‖² + ‖e‖² − 2 z·e as the official quantizer does.
    pub fn code_indices(&self, z: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = z.dims4()?;
        let flat =
            z.permute((0, 2, 3, 1))?.reshape((b * h * w, c))?.to_dtype(self.codebook.dtype())?;
        let dist = flat
            .sqr()?
            .sum_keepdim(1)?
            .broadcast_add(&self.codebook_sq.unsqueeze(0)?)?
            .broadcast_sub(&(flat.matmul(&self.codebook.t()?)? * 2.0)?)?;
        dist.argmin(1)?.reshape((b, h, w))
    }

    /// Snaps every latent position to its nearest codebook entry.
    pub fn quantize(&self, z: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = z.dims4()?;
        let idx = self.code_indices(z)?.flatten_all()?;
        self.codebook
            .index_select(&idx, 0)?
            .reshape((b, h, w, c))?
            .permute((0, 3, 1, 2))?
            .contiguous()?
            .to_dtype(z.dtype())
    }

    /// Latent → image: quantize, `post_quant_conv`, decoder (the official `decode`).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.decode_quantized(&self.quantize(z)?)
    }

    /// Already-quantized latent → image.
    pub fn decode_quantized(&self, z: &Tensor) -> Result<Tensor> {
        self.decoder.forward(&self.post_quant_conv.forward(z)?)
    }
}
