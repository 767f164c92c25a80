//! Model configuration: `config.json` beside the weights, the presets of the official models,
//! and reading a model's sizes from its checkpoint.
//!
//! Widths, layer counts and grid sizes always come from the checkpoint's shapes (official
//! checkpoints come in other sizes than the papers', and users fine-tune); a [`Preset`]
//! supplies only what shapes cannot tell: attention heads, slot-attention iterations,
//! preprocessing and the default sampler.

use std::path::Path;

use anyhow::Context;
use candle_core::Result;
use serde::{Deserialize, Serialize};

use crate::checkpoint::ShapeMap;
use crate::imageio::Preprocess;
use crate::model::encoder::{BackboneConfig, EncoderConfig};
use crate::model::resnet::ResNetConfig;
use crate::model::sampler::{SamplerKind, ScheduleConfig};
use crate::model::slot_attention::SlotAttentionConfig;
use crate::model::unet::UNetConfig;
use crate::model::vit::ViTConfig;
use crate::model::vqvae::VqVaeConfig;

/// The file name of a model's configuration, beside `model.safetensors`.
pub const CONFIG_FILE: &str = "config.json";
/// The file name of a model's weights in our format.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// The official SlotDiffusion image models (and our embedded default), each with the
/// settings that a checkpoint's shapes cannot tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// CLEVRTex, 128²: ResNet-18 encoder, 11 slots.
    Clevrtex,
    /// CelebA, 128²: ResNet-18 encoder, 4 slots.
    Celeba,
    /// PASCAL VOC, 224²: DINO ViT-S/8 encoder, 6 slots.
    Voc,
    /// COCO, 224²: DINO ViT-S/8 encoder, 7 slots.
    Coco,
    /// slotserve's embedded default model, trained on procedural scenes (`weights/`).
    Shapes,
}

impl Preset {
    /// How input images are brought to the model's square resolution, as in the official
    /// data pipelines.
    pub fn preprocess(self) -> Preprocess {
        match self {
            Self::Clevrtex => Preprocess::CenterCropResize { crop: 192 },
            Self::Celeba | Self::Shapes => Preprocess::Resize,
            Self::Voc | Self::Coco => Preprocess::ShortSideCenterCrop,
        }
    }

    /// Whether the preset's encoder is a DINO ViT (else a ResNet).
    pub fn uses_vit(self) -> bool {
        matches!(self, Self::Voc | Self::Coco)
    }

    /// Slot-attention iterations (3 in every released config).
    pub fn slot_iters(self) -> usize {
        3
    }

    /// Channels per attention head in the UNet (`num_head_channels`, 32 in every config).
    pub fn unet_head_channels(self) -> usize {
        32
    }

    /// Attention heads of a DINO ViT with `hidden` channels: 64 channels a head, as in ViT-S
    /// (384, 6 heads) and ViT-B (768, 12 heads).
    pub fn vit_heads(self, hidden: usize) -> usize {
        (hidden / 64).max(1)
    }
}

/// The sampler a model renders with when a request names none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerDefaults {
    /// Which sampler.
    pub kind: SamplerKind,
    /// Model evaluations per render.
    pub steps: usize,
}

impl Default for SamplerDefaults {
    fn default() -> Self {
        Self { kind: SamplerKind::DpmSolverPP, steps: 20 }
    }
}

/// Everything needed to build a SlotDiffusion model; stored as `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// A human-readable name, shown by `/info`.
    pub name: String,
    /// The preset the model follows.
    pub preset: Preset,
    /// Side of the square input image, in pixels.
    pub resolution: usize,
    /// How arbitrary images are brought to `resolution`.
    pub preprocess: Preprocess,
    /// Image → feature map → per-position features for slot attention.
    pub encoder: EncoderConfig,
    /// Slots from features.
    pub slot_attention: SlotAttentionConfig,
    /// The denoising network, conditioned on slots.
    pub unet: UNetConfig,
    /// The latent autoencoder and its codebook.
    pub vqvae: VqVaeConfig,
    /// The diffusion noise schedule.
    pub schedule: ScheduleConfig,
    /// The sampler used when a request names none.
    pub sampler: SamplerDefaults,
}

impl ModelConfig {
    /// The full-size configuration of `preset`: the official one, or for `Shapes` the embedded
    /// default model's (for random weights: benchmarks and tests run the real network sizes
    /// without a checkpoint).
    pub fn preset(preset: Preset) -> Self {
        let (num_slots, slot_size) = match preset {
            Preset::Clevrtex => (11, 192),
            Preset::Celeba => (4, 192),
            Preset::Voc => (6, 192),
            Preset::Coco => (7, 256),
            Preset::Shapes => return Self::embedded_default(),
        };
        let backbone = match preset.uses_vit() {
            true => BackboneConfig::Vit(ViTConfig {
                hidden_size: 384,
                num_layers: 12,
                num_heads: preset.vit_heads(384),
                intermediate_size: 1536,
                patch_size: 8,
                grid_size: 28,
            }),
            false => {
                BackboneConfig::Resnet(ResNetConfig { stem_channels: 64, blocks: vec![2, 2, 2] })
            }
        };
        let grid_size = match &backbone {
            BackboneConfig::Vit(v) => v.grid_size,
            BackboneConfig::Resnet(_) => 32,
        };
        let encoder = EncoderConfig { backbone, grid_size, out_channels: slot_size };
        Self {
            name: format!("{preset:?}").to_lowercase(),
            preset,
            resolution: encoder.input_resolution(),
            preprocess: preset.preprocess(),
            encoder,
            slot_attention: SlotAttentionConfig {
                num_slots,
                slot_size,
                in_features: slot_size,
                mlp_hidden_size: 2 * slot_size,
                num_iterations: preset.slot_iters(),
            },
            unet: UNetConfig {
                in_channels: 3,
                out_channels: 3,
                model_channels: 128,
                channel_mult: vec![1, 2, 3, 4],
                num_res_blocks: 2,
                attention_levels: vec![false, true, true, true],
                num_head_channels: preset.unet_head_channels(),
                transformer_depth: 1,
                context_dim: slot_size,
            },
            vqvae: VqVaeConfig {
                in_channels: 3,
                ch: 64,
                ch_mult: vec![1, 2, 4],
                num_res_blocks: 2,
                z_channels: 3,
                n_embed: 4096,
                embed_dim: 3,
            },
            schedule: ScheduleConfig::default(),
            sampler: SamplerDefaults::default(),
        }
    }

    /// Reads every size from an official-layout checkpoint's shapes, the rest from `preset`.
    pub fn infer(name: &str, preset: Preset, shapes: &ShapeMap) -> Result<Self> {
        let encoder = EncoderConfig::infer(shapes, preset)?;
        let is_vit = matches!(encoder.backbone, BackboneConfig::Vit(_));
        if is_vit != preset.uses_vit() {
            let (has, wants) = if is_vit { ("DINO ViT", "ResNet") } else { ("ResNet", "DINO ViT") };
            candle_core::bail!(
                "the checkpoint has a {has} encoder, the `{preset:?}` preset a {wants}"
            );
        }
        let slot_attention = SlotAttentionConfig::infer(shapes, preset.slot_iters())?;
        let unet = UNetConfig::infer(shapes, UNET_PREFIX, preset.unet_head_channels())?;
        let vqvae = VqVaeConfig::infer(shapes, VQVAE_PREFIX)?;
        Ok(Self {
            name: name.to_string(),
            preset,
            resolution: encoder.input_resolution(),
            preprocess: preset.preprocess(),
            encoder,
            slot_attention,
            unet,
            vqvae,
            schedule: ScheduleConfig::infer(shapes, DECODER_PREFIX)?,
            sampler: SamplerDefaults::default(),
        })
    }

    /// The configuration of the model committed in `weights/`, compiled in so that `bench` and
    /// `init` size `--preset shapes` as the model `serve` runs by default.
    pub fn embedded_default() -> Self {
        serde_json::from_str(EMBEDDED_DEFAULT_CONFIG)
            .expect("weights/config.json is a valid model configuration (checked by a unit test)")
    }

    /// Reads `config.json`.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("invalid {}", path.display()))
    }

    /// Writes `config.json`.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// Slots per image (K).
    pub fn num_slots(&self) -> usize {
        self.slot_attention.num_slots
    }

    /// Width of a slot vector (D).
    pub fn slot_size(&self) -> usize {
        self.slot_attention.slot_size
    }
}

/// `weights/config.json`, the embedded default model's configuration.
const EMBEDDED_DEFAULT_CONFIG: &str = include_str!("../weights/config.json");

/// Where the official checkpoints keep the diffusion decoder (schedule buffers).
pub const DECODER_PREFIX: &str = "dm_decoder";
/// Where the official checkpoints keep the UNet.
pub const UNET_PREFIX: &str = "dm_decoder.model.diffusion_model";
/// Where the official checkpoints keep the VQ-VAE.
pub const VQVAE_PREFIX: &str = "dm_decoder.vae.vqvae";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shapes_preset_is_the_configuration_of_the_committed_default_model() {
        let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("weights").join(CONFIG_FILE);
        let preset = ModelConfig::preset(Preset::Shapes);
        assert_eq!(preset, ModelConfig::load(&committed).unwrap());
        assert_eq!((preset.preset, preset.resolution), (Preset::Shapes, 64));
    }
}
