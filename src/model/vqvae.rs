//! The taming-transformers VQ-VAE that gives SlotDiffusion its latent space: an encoder to a
//! small latent map, a codebook that snaps latents to the nearest entry, and a decoder back
//! to pixels (official `vqvae/modules.py`, `VQVAE.py`, `quantize.py`).
//!
//! Latent diffusion runs on the *unquantized* encoder output ([`VqVae::encode`]); the sampler
//! snaps its predictions to the codebook ([`VqVae::quantize`]) and the final latent is decoded
//! with [`VqVae::decode`], which quantizes first. No latent scale factor applies (the official
//! `VQVAEWrapper` is built with `scale_factor = 1`).

use candle_core::{bail, DType, Module, Result, Tensor, D};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::ops::{attention, conv2d, group_norm, upsample_nearest2x, Conv2d, GroupNorm};
use serde::{Deserialize, Serialize};

use crate::checkpoint::ShapeMap;

/// GroupNorm epsilon of every VQ-VAE normalisation (`Normalize` in `modules.py`).
const NORM_EPS: f64 = 1e-6;
/// Groups of every VQ-VAE GroupNorm.
const NORM_GROUPS: usize = 32;

/// Sizes of the VQ-VAE; all readable from a checkpoint's shapes ([`VqVaeConfig::infer`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VqVaeConfig {
    /// Image channels, in and out (3; the official `in_channels` and `out_ch` are equal).
    pub in_channels: usize,
    /// Base width (`ch`); level i has `ch * ch_mult[i]` channels.
    pub ch: usize,
    /// Width multipliers per resolution level; `len − 1` downsamplings by 2.
    pub ch_mult: Vec<usize>,
    /// Residual blocks per encoder level (each decoder level has one more).
    pub num_res_blocks: usize,
    /// Channels of the encoder output and the decoder input (`z_channels`).
    pub z_channels: usize,
    /// Codebook entries (`n_embed`).
    pub n_embed: usize,
    /// Width of a codebook entry: the latent channels the diffusion model sees (`embed_dim`).
    pub embed_dim: usize,
}

impl VqVaeConfig {
    /// Reads every size from the tensors under `prefix` (e.g. `dm_decoder.vae.vqvae`).
    /// Fails on layouts the official image configs never use (attention inside the levels,
    /// i.e. a non-empty `attn_resolutions`; different input and output channels).
    pub fn infer(shapes: &ShapeMap, prefix: &str) -> Result<Self> {
        let key = |k: &str| format!("{prefix}.{k}");
        let ch = shapes.dim(&key("encoder.conv_in.weight"), 0)?;
        let levels = shapes.count_indexed(&key("encoder.down"));
        let ch_mult = (0..levels)
            .map(|i| {
                Ok(shapes.dim(&key(&format!("encoder.down.{i}.block.0.conv1.weight")), 0)? / ch)
            })
            .collect::<Result<Vec<_>>>()?;
        if (0..levels).any(|i| shapes.count_indexed(&key(&format!("encoder.down.{i}.attn"))) > 0) {
            bail!(
                "{prefix}: attention inside the VQ-VAE levels (attn_resolutions) is not supported"
            );
        }
        let in_channels = shapes.dim(&key("encoder.conv_in.weight"), 1)?;
        let out_channels = shapes.dim(&key("decoder.conv_out.weight"), 0)?;
        if in_channels != out_channels {
            bail!("{prefix}: {in_channels} input but {out_channels} output channels");
        }
        let [n_embed, embed_dim] = shapes.dims(&key("quantize.embedding.weight"))? else {
            bail!("{prefix}.quantize.embedding.weight must be 2-d");
        };
        Ok(Self {
            in_channels,
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

/// A `k`×`k` convolution; 3×3 ones keep the size (padding 1) unless strided, where the
/// official code pads by hand (see [`Resample::Down`]).
fn conv(in_c: usize, out_c: usize, k: usize, stride: usize, vb: VarBuilder) -> Result<Conv2d> {
    let padding = if k == 3 && stride == 1 { 1 } else { 0 };
    conv2d(in_c, out_c, k, Conv2dConfig { padding, stride, ..Default::default() }, vb)
}

fn norm(c: usize, vb: VarBuilder) -> Result<GroupNorm> {
    group_norm(NORM_GROUPS, c, NORM_EPS, vb)
}

/// Pre-activation residual block with a 1×1 shortcut (`nin_shortcut`) when widths differ.
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
        let nin_shortcut =
            (in_c != out_c).then(|| conv(in_c, out_c, 1, 1, vb.pp("nin_shortcut"))).transpose()?;
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
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let h = self.norm2.forward_silu(&h)?;
        match &self.nin_shortcut {
            Some(s) => self.conv2.forward_residual(&h, &s.forward(x)?),
            None => self.conv2.forward_residual(&h, x),
        }
    }
}

/// Single-head spatial self-attention of the middle blocks (1×1 convolutions for q, k, v
/// and the output projection; logits scaled by `c^-1/2`).
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
        // [b, 1 head, hw, c] views of the channels-first projections.
        let tokens = |conv: &Conv2d| conv.forward(&hn)?.reshape((b, 1, c, h * w))?.transpose(2, 3);
        let (q, k, v) = (tokens(&self.q)?, tokens(&self.k)?, tokens(&self.v)?);
        let out = attention(&q, &k, &v, (c as f64).powf(-0.5), None)?;
        let out = out.squeeze(1)?.transpose(1, 2)?.reshape((b, c, h, w))?;
        self.proj_out.forward_residual(&out, x)
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

/// How a level changes the resolution after its residual blocks.
#[derive(Debug, Clone)]
enum Resample {
    /// Last level of the encoder or the decoder.
    Keep,
    /// Pad (0, 1, 0, 1), then a 3×3 stride-2 convolution (`downsample.conv`).
    Down(Conv2d),
    /// Nearest ×2, then a 3×3 convolution (`upsample.conv`).
    Up(Conv2d),
}

impl Module for Resample {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Keep => Ok(x.clone()),
            Self::Down(conv) => {
                conv.forward(&x.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(D::Minus2, 0, 1)?)
            }
            Self::Up(conv) => conv.forward(&upsample_nearest2x(x)?),
        }
    }
}

/// One resolution level: residual blocks (`block.N`), then the resampling.
#[derive(Debug, Clone)]
struct Level {
    blocks: Vec<ResnetBlock>,
    resample: Resample,
}

impl Level {
    /// `blocks` residual blocks from `in_c` to `out_c` channels (the first one changes width).
    fn new(
        in_c: usize,
        out_c: usize,
        blocks: usize,
        resample: Resample,
        vb: VarBuilder,
    ) -> Result<Self> {
        let blocks = (0..blocks)
            .map(|i| {
                ResnetBlock::new(if i == 0 { in_c } else { out_c }, out_c, vb.pp("block").pp(i))
            })
            .collect::<Result<_>>()?;
        Ok(Self { blocks, resample })
    }
}

impl Module for Level {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.blocks.iter().try_fold(x.clone(), |h, b| b.forward(&h))?;
        self.resample.forward(&h)
    }
}

/// Image → pre-quantization latent (`z_channels` wide).
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
            let vb = vb.pp("down").pp(i);
            let resample = if i + 1 < levels {
                Resample::Down(conv(c_out, c_out, 3, 2, vb.pp("downsample.conv"))?)
            } else {
                Resample::Keep
            };
            down.push(Level::new(c_in, c_out, cfg.num_res_blocks, resample, vb)?);
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
        let h = self.down.iter().try_fold(h, |h, l| l.forward(&h))?;
        let h = self.mid.forward(&h)?;
        self.conv_out.forward(&self.norm_out.forward_silu(&h)?)
    }
}

/// Post-quantization latent → image.
#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    /// Levels in the order they run, coarsest first (checkpoint index `up.{levels-1}` first).
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
            let vb = vb.pp("up").pp(i);
            let resample = if i > 0 {
                Resample::Up(conv(c_out, c_out, 3, 1, vb.pp("upsample.conv"))?)
            } else {
                Resample::Keep
            };
            up.push(Level::new(c_in, c_out, cfg.num_res_blocks + 1, resample, vb)?);
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
        let h = self.up.iter().try_fold(h, |h, l| l.forward(&h))?;
        self.conv_out.forward(&self.norm_out.forward_silu(&h)?)
    }
}

/// The VQ-VAE: encode, snap to the codebook, decode. Weights under the official names
/// (`encoder.*`, `decoder.*`, `quantize.embedding.weight`, `quant_conv`, `post_quant_conv`).
#[derive(Debug, Clone)]
pub struct VqVae {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Conv2d,
    post_quant_conv: Conv2d,
    /// Codebook [n_embed, embed_dim], in f32 (f64 for an f64 model) whatever the model's
    /// dtype: in f16 the distances of nearby entries would round together.
    codebook: Tensor,
    /// Squared norm of each codebook entry [1, n_embed], for the nearest-entry search.
    codebook_sq: Tensor,
    cfg: VqVaeConfig,
}

impl VqVae {
    /// Builds the VQ-VAE from tensors named as in the official checkpoints (`vb` at the
    /// VQ-VAE's prefix, e.g. `dm_decoder.vae.vqvae`).
    pub fn new(vb: VarBuilder, cfg: &VqVaeConfig) -> Result<Self> {
        let search_dtype = if vb.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
        let codebook = vb.to_dtype(search_dtype).get_with_hints(
            (cfg.n_embed, cfg.embed_dim),
            "quantize.embedding.weight",
            {
                // The official random codebook: uniform in ±1/n_embed.
                let bound = 1.0 / cfg.n_embed as f64;
                candle_nn::Init::Uniform { lo: -bound, up: bound }
            },
        )?;
        let codebook_sq = codebook.sqr()?.sum_keepdim(1)?.t()?;
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

    /// The sizes this VQ-VAE was built with.
    pub fn config(&self) -> &VqVaeConfig {
        &self.cfg
    }

    /// How much smaller the latent map is than the image, per side.
    pub fn downsample_factor(&self) -> usize {
        self.cfg.downsample_factor()
    }

    /// Image [B, C, H, W] in [-1, 1] → latent [B, embed_dim, H/f, W/f]: encoder, then
    /// `quant_conv`, *not* quantized (the x0 that the latent diffusion model is trained on).
    pub fn encode(&self, img: &Tensor) -> Result<Tensor> {
        self.quant_conv.forward(&self.encoder.forward(img)?)
    }

    /// Codebook index [B, h, w] (u32) of each latent position: the nearest entry by squared
    /// L2 distance, computed as `‖z‖² + ‖e‖² − 2 z·e` like the official quantizer (in f32 at
    /// least, whatever the model's dtype); ties go to the lowest index, as `torch.argmin`.
    pub fn code_indices(&self, z: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = z.dims4()?;
        let flat =
            z.permute((0, 2, 3, 1))?.reshape((b * h * w, c))?.to_dtype(self.codebook.dtype())?;
        crate::ops::nearest_code(&flat, &self.codebook, &self.codebook_sq)?.reshape((b, h, w))
    }

    /// Latent [B, embed_dim, h, w] with every position replaced by its nearest codebook
    /// entry (so `quantize` is idempotent). The official forward pass computes the same
    /// entry as `z + (e − z)` (its straight-through estimator), which can differ from `e`
    /// in the last bit: at most 1.2e-7 on the fixtures.
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

    /// Latent → image [B, C, H, W]: quantize, `post_quant_conv`, decoder (the official
    /// `VQVAEWrapper.decode`, used on the sampler's final latent).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.decode_quantized(&self.quantize(z)?)
    }

    /// Already-quantized latent → image (the official `VQVAE.decode`, no snapping).
    pub fn decode_quantized(&self, z: &Tensor) -> Result<Tensor> {
        self.decoder.forward(&self.post_quant_conv.forward(z)?)
    }
}
