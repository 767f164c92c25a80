//! The VQ-VAE against the official code's outputs (f32, 1e-4 absolute: a few dozen
//! convolutions deep, f32 rounding stays below 1e-5; 1e-4 leaves room for summation order).

mod common;

use std::sync::Arc;

use candle_core::{DType, Device};
use slotserve::checkpoint::Checkpoint;
const VQVAE_PREFIX: &str = "dm_decoder.vae.vqvae";
use slotserve::model::vqvae::{VqVae, VqVaeConfig};

fn load(fx: &common::Fixture) -> VqVae {
    load_as(fx, DType::F32)
}

fn load_as(fx: &common::Fixture, dtype: DType) -> VqVae {
    let ckpt = Arc::new(Checkpoint::from_pth(&fx.checkpoint()).unwrap());
    let cfg = VqVaeConfig::infer(&ckpt.shapes(), VQVAE_PREFIX).unwrap();
    assert_eq!((cfg.ch, cfg.ch_mult.clone(), cfg.num_res_blocks), (32, vec![1, 2, 4], 2));
    assert_eq!((cfg.n_embed, cfg.embed_dim, cfg.z_channels), (4096, 3, 3));
    VqVae::new(ckpt.var_builder(dtype, &Device::Cpu).pp(VQVAE_PREFIX), &cfg).unwrap()
}

#[test]
fn vqvae_matches_official_encode_and_decode() {
    for name in ["clevrtex-small", "voc-small"] {
        let Some(fx) = common::Fixture::load("vqvae_matches_official", name) else { return };
        let vq = load(&fx);
        let decoded = vq.decode(&fx.tensor("vq_latent")).unwrap();
        common::assert_close(&format!("{name} vq_decoded"), &decoded, &fx.tensor("vq_decoded"), 1e-4);
        let encoded = vq.encode(&fx.tensor("image")).unwrap();
        // 2e-4: evaluated in f64, this encoder also lands 1.01e-4 from the official f32
        // output (clevrtex-small), while our f32 and f64 agree to ~1e-6: the gap is the
        // reference's own f32 rounding through the 64² stages, not a difference in the network.
        common::assert_close(&format!("{name} vq_encoded"), &encoded, &fx.tensor("vq_encoded"), 2e-4);
        let f64_vq = load_as(&fx, DType::F64);
        let exact = f64_vq.encode(&fx.tensor("image").to_dtype(DType::F64).unwrap()).unwrap();
        common::assert_close(&format!("{name} vq_encoded f32 vs f64"), &encoded, &exact, 1e-5);
    }
}

#[test]
fn quantize_snaps_to_codebook_entries_idempotently() {
    let Some(fx) = common::Fixture::load("quantize_snaps", "clevrtex-small") else { return };
    let vq = load(&fx);
    let q = vq.quantize(&fx.tensor("vq_latent")).unwrap();
    let again = vq.quantize(&q).unwrap();
    assert_eq!(common::max_abs_diff(&q, &again), 0.0);
}

#[test]
fn tmp_probe_voc() {
    let Some(fx) = common::Fixture::load("probe", "voc-small") else { return };
    let vq = load_as(&fx, DType::F64);
    let exact = vq.encode(&fx.tensor("image").to_dtype(DType::F64).unwrap()).unwrap();
    common::assert_close("voc f64 vs official", &exact, &fx.tensor("vq_encoded"), 1.0);
    let vq32 = load(&fx);
    let e32 = vq32.encode(&fx.tensor("image")).unwrap();
    common::assert_close("voc f32 vs f64", &e32, &exact, 1.0);
}
