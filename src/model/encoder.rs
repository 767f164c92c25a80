//! The image encoder in front of Slot Attention: a backbone (ResNet or DINO ViT) to a feature
//! map, plus the soft position embedding and the per-position MLP (`_get_encoder_out`).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::checkpoint::ShapeMap;
use crate::config::Preset;
use crate::model::resnet::{ResNet, ResNetConfig};
use crate::model::vit::{ViT, ViTConfig};
use crate::ops::{layer_norm, linear, LayerNorm, Linear};

/// LayerNorm epsilon of the output MLP (PyTorch's default).
const LAYER_NORM_EPS: f64 = 1e-5;
/// Where the official checkpoints keep the DINO ViT.
const DINO_PREFIX: &str = "encoder.dino";

/// Which backbone turns images into feature maps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum BackboneConfig {
    /// ResNet trunk (CLEVRTex, CelebA), weights under `encoder.`.
    Resnet(ResNetConfig),
    /// DINO ViT (VOC, COCO), weights under `encoder.dino.`.
    Vit(ViTConfig),
}

/// Sizes of the encoder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncoderConfig {
    /// The backbone.
    pub backbone: BackboneConfig,
    /// Side of the feature grid at the model's input resolution.
    pub grid_size: usize,
    /// Width of the per-position features handed to Slot Attention (`enc_out_channels`).
    pub out_channels: usize,
}

impl EncoderConfig {
    /// Reads the backbone and sizes from the checkpoint's shapes; the ViT head count comes
    /// from `preset`.
    pub fn infer(shapes: &ShapeMap, preset: Preset) -> Result<Self> {
        let backbone = if shapes.contains(&format!("{DINO_PREFIX}.embeddings.cls_token")) {
            let hidden = shapes.dim(&format!("{DINO_PREFIX}.embeddings.cls_token"), 2)?;
            BackboneConfig::Vit(ViTConfig::infer(shapes, DINO_PREFIX, preset.vit_heads(hidden))?)
        } else {
            BackboneConfig::Resnet(ResNetConfig::infer(shapes, "encoder")?)
        };
        Ok(Self {
            backbone,
            grid_size: shapes.dim("encoder_pos_embedding.grid", 1)?,
            out_channels: shapes.dim("encoder_out_layer.3.weight", 0)?,
        })
    }

    /// Channels of the backbone's feature map.
    pub fn feature_channels(&self) -> usize {
        match &self.backbone {
            BackboneConfig::Resnet(c) => c.out_channels(),
            BackboneConfig::Vit(c) => c.hidden_size,
        }
    }

    /// How much smaller the feature map is than the image, per side.
    pub fn stride(&self) -> usize {
        match &self.backbone {
            BackboneConfig::Resnet(c) => c.stride(),
            BackboneConfig::Vit(c) => c.patch_size,
        }
    }

    /// The feature-grid size (h, w) of a `height`×`width` image.
    pub fn grid(&self, height: usize, width: usize) -> (usize, usize) {
        match &self.backbone {
            BackboneConfig::Resnet(c) => (c.grid_side(height), c.grid_side(width)),
            BackboneConfig::Vit(c) => (c.grid_side(height), c.grid_side(width)),
        }
    }

    /// The square input size the model was built for.
    pub fn input_resolution(&self) -> usize {
        self.grid_size * self.stride()
    }
}

/// The backbone network.
#[derive(Debug, Clone)]
enum Backbone {
    Resnet(ResNet),
    Vit(ViT),
}

/// `n` evenly spaced values from 0 to 1 inclusive, computed as `torch.linspace` does (from
/// the start for the first half, from the end for the second, each with one fused
/// multiply-add), so the grid is bit-identical to the official buffer.
fn linspace01(n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![0.0];
    }
    let step = 1.0 / (n - 1) as f32;
    let from_end = |k: usize| (-(k as f32)).mul_add(step, 1.0);
    (0..n).map(|i| if i < n / 2 { i as f32 * step } else { from_end(n - 1 - i) }).collect()
}

/// The position grid of an `h`×`w` map, [h·w, 4]: `[y, x, 1 − y, 1 − x]` with y, x running
/// from 0 to 1 inclusive (the official `build_grid`), row-major.
pub fn position_grid(h: usize, w: usize, device: &candle_core::Device) -> Result<Tensor> {
    let (ys, xs) = (linspace01(h), linspace01(w));
    let mut data = Vec::with_capacity(h * w * 4);
    for &gy in &ys {
        for &gx in &xs {
            data.extend([gy, gx, 1.0 - gy, 1.0 - gx]);
        }
    }
    Tensor::from_vec(data, (h * w, 4), device)
}

/// Image → per-position features for Slot Attention.
#[derive(Debug, Clone)]
pub struct Encoder {
    backbone: Backbone,
    pos_dense: Linear,
    out_norm: LayerNorm,
    out_in: Linear,
    out_out: Linear,
    cfg: EncoderConfig,
}

impl Encoder {
    /// Builds the encoder from tensors named as in the official checkpoints.
    pub fn new(vb: VarBuilder, cfg: &EncoderConfig) -> Result<Self> {
        let backbone = match &cfg.backbone {
            BackboneConfig::Resnet(c) => Backbone::Resnet(ResNet::new(vb.pp("encoder"), c)?),
            BackboneConfig::Vit(c) => Backbone::Vit(ViT::new(vb.pp(DINO_PREFIX), c)?),
        };
        let (c, e) = (cfg.feature_channels(), cfg.out_channels);
        Ok(Self {
            backbone,
            pos_dense: linear(4, c, vb.pp("encoder_pos_embedding.dense"))?,
            out_norm: layer_norm(c, LAYER_NORM_EPS, vb.pp("encoder_out_layer.0"))?,
            out_in: linear(c, e, vb.pp("encoder_out_layer.1"))?,
            out_out: linear(e, e, vb.pp("encoder_out_layer.3"))?,
            cfg: cfg.clone(),
        })
    }

    /// The feature-grid size (h, w) of a `height`×`width` image (what [`Encoder::features`]
    /// returns and the masks of Slot Attention are laid out on).
    pub fn grid(&self, height: usize, width: usize) -> (usize, usize) {
        self.cfg.grid(height, width)
    }

    /// Backbone feature map [B, C, h, w] of images [B, 3, H, W] in [-1, 1].
    pub fn features(&self, img: &Tensor) -> Result<Tensor> {
        match &self.backbone {
            Backbone::Resnet(r) => r.forward(img),
            Backbone::Vit(v) => v.forward(img),
        }
    }

    /// Per-position features [B, h·w, E] of images [B, 3, H, W] in [-1, 1].
    pub fn forward(&self, img: &Tensor) -> Result<Tensor> {
        let features = self.features(img)?;
        let (_, _, h, w) = features.dims4()?;
        let grid = position_grid(h, w, img.device())?.to_dtype(features.dtype())?;
        let tokens = features.flatten_from(2)?.transpose(1, 2)?; // [B, h·w, C]
        let tokens = tokens.broadcast_add(&self.pos_dense.forward(&grid)?)?;
        let hidden = self.out_in.forward(&self.out_norm.forward(&tokens)?)?.relu()?;
        self.out_out.forward(&hidden)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn encoder(backbone: BackboneConfig, grid_size: usize) -> Encoder {
        let cfg = EncoderConfig { backbone, grid_size, out_channels: 16 };
        Encoder::new(VarBuilder::zeros(DType::F32, &Device::Cpu), &cfg).unwrap()
    }

    /// The grid that `grid` predicts is the one the backbone produces, also for sides that
    /// are not multiples of the stride and for non-square images.
    fn assert_grid_matches(enc: &Encoder, sizes: &[(usize, usize)]) {
        for &(h, w) in sizes {
            let img = Tensor::zeros((1, 3, h, w), DType::F32, &Device::Cpu).unwrap();
            let (gh, gw) = enc.grid(h, w);
            assert_eq!(enc.features(&img).unwrap().dims()[2..], [gh, gw], "{h}×{w}");
            assert_eq!(enc.forward(&img).unwrap().dims(), &[1, gh * gw, 16], "{h}×{w}");
        }
    }

    #[test]
    fn resnet_grid_rounds_up() {
        let cfg = ResNetConfig { stem_channels: 32, blocks: vec![1, 1, 1] };
        let enc = encoder(BackboneConfig::Resnet(cfg), 8);
        assert_eq!(enc.grid(65, 63), (17, 16));
        assert_grid_matches(&enc, &[(32, 32), (65, 63), (30, 41)]);
    }

    #[test]
    fn vit_grid_drops_partial_patches() {
        let cfg = ViTConfig {
            hidden_size: 32,
            num_layers: 1,
            num_heads: 2,
            intermediate_size: 32,
            patch_size: 8,
            grid_size: 4,
        };
        let enc = encoder(BackboneConfig::Vit(cfg), 4);
        assert_eq!(enc.grid(39, 50), (4, 6));
        assert_grid_matches(&enc, &[(32, 32), (39, 50), (24, 40)]);
    }

    #[test]
    fn position_grid_runs_from_zero_to_one() {
        let g = position_grid(3, 5, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(g[0], [0.0, 0.0, 1.0, 1.0]);
        assert_eq!(g[7], [0.5, 0.5, 0.5, 0.5]);
        assert_eq!(g[14], [1.0, 1.0, 0.0, 0.0]);
    }
}
