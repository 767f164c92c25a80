//! The latent-diffusion decoder (UNet and VQ-VAE) against the official code's outputs, for
//! both fixture models. f32 on the CPU; tolerance 1e-4 absolute per stage, except where a
//! test says why not.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use slotserve::checkpoint::Checkpoint;
use slotserve::model::unet::{ContextKv, UNetConfig, UNetModel};
use slotserve::model::vqvae::{VqVae, VqVaeConfig};

const FIXTURES: [&str; 2] = ["clevrtex-small", "voc-small"];
const UNET_PREFIX: &str = "dm_decoder.model.diffusion_model";
const VQVAE_PREFIX: &str = "dm_decoder.vae.vqvae";
/// Channels per attention head of every official config (`num_head_channels`).
const HEAD_CHANNELS: usize = 32;
/// Per-stage tolerance of the fixtures (README).
const STAGE_TOL: f32 = 1e-4;

fn checkpoint(fx: &common::Fixture) -> Arc<Checkpoint> {
    Arc::new(Checkpoint::from_pth(&fx.checkpoint()).expect("read official checkpoint"))
}

fn load_vqvae(fx: &common::Fixture, dtype: DType) -> VqVae {
    let ckpt = checkpoint(fx);
    let cfg = VqVaeConfig::infer(&ckpt.shapes(), VQVAE_PREFIX).unwrap();
    assert_eq!((cfg.in_channels, cfg.ch, cfg.ch_mult.clone(), cfg.num_res_blocks), (3, 32, vec![1, 2, 4], 2));
    assert_eq!((cfg.n_embed, cfg.embed_dim, cfg.z_channels), (4096, 3, 3));
    VqVae::new(ckpt.var_builder(dtype, &Device::Cpu).pp(VQVAE_PREFIX), &cfg).unwrap()
}

fn load_unet(fx: &common::Fixture) -> UNetModel {
    let ckpt = checkpoint(fx);
    let cfg = UNetConfig::infer(&ckpt.shapes(), UNET_PREFIX, HEAD_CHANNELS).unwrap();
    assert_eq!((cfg.in_channels, cfg.out_channels, cfg.model_channels), (3, 3, 32));
    assert_eq!((cfg.channel_mult.clone(), cfg.num_res_blocks), (vec![1, 2, 3, 4], 2));
    assert_eq!(cfg.attention_levels, vec![false, true, true, true]);
    assert_eq!((cfg.transformer_depth, cfg.context_dim), (1, 64));
    let unet = UNetModel::new(ckpt.var_builder(DType::F32, &Device::Cpu).pp(UNET_PREFIX), &cfg).unwrap();
    // Strict: the UNet reads every tensor under its prefix.
    let unused: Vec<_> = ckpt.unused(&[]).into_iter().filter(|k| k.starts_with(UNET_PREFIX)).collect();
    assert!(unused.is_empty(), "unused UNet tensors: {unused:?}");
    unet
}

#[test]
fn vqvae_decode_matches_official() {
    for name in FIXTURES {
        let Some(fx) = common::Fixture::load("vqvae_decode_matches_official", name) else { return };
        let vq = load_vqvae(&fx, DType::F32);
        let decoded = vq.decode(&fx.tensor("vq_latent")).unwrap();
        common::assert_close(&format!("{name} vq_decoded"), &decoded, &fx.tensor("vq_decoded"), STAGE_TOL);
    }
}
