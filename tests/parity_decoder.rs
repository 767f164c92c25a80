//! The latent-diffusion decoder (UNet and VQ-VAE) against the official code's outputs, for
//! both fixture models. f32 on the test device (`SLOTSERVE_TEST_DEVICE`, the CPU by default);
//! tolerance 1e-4 absolute per stage, except where a test says why not.

mod common;

use std::sync::Arc;

use candle_core::{DType, Tensor};
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
    assert_eq!(
        (cfg.in_channels, cfg.ch, cfg.ch_mult.clone(), cfg.num_res_blocks),
        (3, 32, vec![1, 2, 4], 2)
    );
    assert_eq!((cfg.n_embed, cfg.embed_dim, cfg.z_channels), (4096, 3, 3));
    VqVae::new(ckpt.var_builder(dtype, &fx.device).pp(VQVAE_PREFIX), &cfg).unwrap()
}

fn load_unet(fx: &common::Fixture) -> UNetModel {
    let ckpt = checkpoint(fx);
    let cfg = UNetConfig::infer(&ckpt.shapes(), UNET_PREFIX, HEAD_CHANNELS).unwrap();
    assert_eq!((cfg.in_channels, cfg.out_channels, cfg.model_channels), (3, 3, 32));
    assert_eq!((cfg.channel_mult.clone(), cfg.num_res_blocks), (vec![1, 2, 3, 4], 2));
    assert_eq!(cfg.attention_levels, vec![false, true, true, true]);
    assert_eq!((cfg.transformer_depth, cfg.context_dim), (1, 64));
    let unet =
        UNetModel::new(ckpt.var_builder(DType::F32, &fx.device).pp(UNET_PREFIX), &cfg).unwrap();
    // Strict: the UNet reads every tensor under its prefix.
    let unused: Vec<_> =
        ckpt.unused(&[]).into_iter().filter(|k| k.starts_with(UNET_PREFIX)).collect();
    assert!(unused.is_empty(), "unused UNet tensors: {unused:?}");
    unet
}

#[test]
fn vqvae_decode_matches_official() {
    for name in FIXTURES {
        let Some(fx) = common::Fixture::load("vqvae_decode_matches_official", name) else {
            continue;
        };
        let vq = load_vqvae(&fx, DType::F32);
        let decoded = vq.decode(&fx.tensor("vq_latent")).unwrap();
        common::assert_close(
            &format!("{name} vq_decoded"),
            &decoded,
            &fx.tensor("vq_decoded"),
            STAGE_TOL,
        );
    }
}

#[test]
fn vqvae_encode_matches_official() {
    for name in FIXTURES {
        let Some(fx) = common::Fixture::load("vqvae_encode_matches_official", name) else {
            continue;
        };
        let image = fx.tensor("image");
        let encoded = load_vqvae(&fx, DType::F32).encode(&image).unwrap();
        // Our own f32 rounding: f32 against the same network run in f64.
        let exact =
            load_vqvae(&fx, DType::F64).encode(&image.to_dtype(DType::F64).unwrap()).unwrap();
        common::assert_close(&format!("{name} vq_encoded f32 vs f64"), &encoded, &exact, STAGE_TOL);
        // 2e-3, not 1e-4: the stored `vq_encoded` is itself 1.0e-4 (clevrtex-small) and
        // 1.43e-3 (voc-small) away from what the official code computes when re-run on this
        // CPU, in f32 or in f64 (torch 2.15, same checkpoint and input; its f32 and f64 runs
        // agree to 7e-6). Every other stored stage re-runs to within 4e-5.
        common::assert_close(
            &format!("{name} vq_encoded"),
            &encoded,
            &fx.tensor("vq_encoded"),
            2e-3,
        );
    }
}

/// Squared L2 distance from every latent position [B, C, h, w] to every codebook entry,
/// computed directly as Σ (z − e)² in f64: [B·h·w, n_embed].
fn distances(z: &Tensor, codebook: &Tensor) -> Tensor {
    let (b, c, h, w) = z.dims4().unwrap();
    let flat = z.permute((0, 2, 3, 1)).unwrap().reshape((b * h * w, 1, c)).unwrap();
    let flat = flat.to_dtype(DType::F64).unwrap();
    let codebook = codebook.to_dtype(DType::F64).unwrap().unsqueeze(0).unwrap();
    flat.broadcast_sub(&codebook).unwrap().sqr().unwrap().sum(2).unwrap()
}

#[test]
fn quantize_picks_nearest_codes_idempotently() {
    let Some(fx) = common::Fixture::load("quantize_picks_nearest_codes", "clevrtex-small") else {
        return;
    };
    let vq = load_vqvae(&fx, DType::F32);
    let codebook =
        checkpoint(&fx).tensor(&format!("{VQVAE_PREFIX}.quantize.embedding.weight")).unwrap();
    let z = fx.tensor("vq_latent");
    let codes = vq.code_indices(&z).unwrap();
    // Each chosen entry is the nearest one (up to f32 rounding of near-ties).
    let d = distances(&z, &codebook);
    let chosen = d
        .gather(&codes.flatten_all().unwrap().unsqueeze(1).unwrap(), 1)
        .unwrap()
        .squeeze(1)
        .unwrap();
    let best = d.min(1).unwrap();
    let gap = common::max_abs_diff(
        &chosen.to_dtype(DType::F32).unwrap(),
        &best.to_dtype(DType::F32).unwrap(),
    );
    println!("chosen vs nearest code distance: max gap {gap:.3e}");
    assert!(gap <= 1e-5, "a position was not snapped to its nearest code (gap {gap})");
    // The values are exactly the entries.
    let q = vq.quantize(&z).unwrap();
    let (b, c, h, w) = z.dims4().unwrap();
    let entries = codebook.index_select(&codes.flatten_all().unwrap(), 0).unwrap();
    let entries = entries.reshape((b, h, w, c)).unwrap().permute((0, 3, 1, 2)).unwrap();
    common::assert_close("quantize vs codebook entries", &q, &entries, 0.0);
    // Idempotent: the same codes and values again.
    let codes_again = vq.code_indices(&q).unwrap();
    let same = codes.eq(&codes_again).unwrap().to_dtype(DType::F32).unwrap().min_all().unwrap();
    assert_eq!(same.to_scalar::<f32>().unwrap(), 1.0, "re-quantizing changed a code");
    common::assert_close("quantize twice vs once", &vq.quantize(&q).unwrap(), &q, 0.0);
    // `decode` is quantize, then the decoder.
    let decoded = vq.decode(&z).unwrap();
    assert_eq!(common::max_abs_diff(&decoded, &vq.decode_quantized(&q).unwrap()), 0.0);
}

#[test]
fn unet_matches_official_with_per_sample_timesteps() {
    for name in FIXTURES {
        let Some(fx) = common::Fixture::load("unet_matches_official", name) else { continue };
        let unet = load_unet(&fx);
        let (zt, t, slots) = (fx.tensor("unet_zt"), fx.tensor("unet_t"), fx.tensor("slots"));
        let eps = unet.forward(&zt, &t, &slots).unwrap();
        common::assert_close(&format!("{name} unet_eps"), &eps, &fx.tensor("unet_eps"), STAGE_TOL);
        // Precomputed slot keys and values give the very same result.
        let kv = unet.context_kv(&slots, None).unwrap();
        assert_eq!(common::max_abs_diff(&unet.forward_kv(&zt, &t, &kv).unwrap(), &eps), 0.0);
    }
}

#[test]
fn padded_slot_sets_equal_separate_calls() {
    for name in FIXTURES {
        let Some(fx) = common::Fixture::load("padded_slot_sets", name) else { continue };
        let unet = load_unet(&fx);
        let (zt, t, slots) = (fx.tensor("unet_zt"), fx.tensor("unet_t"), fx.tensor("slots"));
        let k = slots.dim(1).unwrap();
        // Sample 0 keeps its first 3 slots, sample 1 all K. The padding is filled with real
        // slots of sample 1, not zeros, so that only the mask can hide it.
        let short = slots.get(0).unwrap().narrow(0, 0, 3).unwrap();
        let filler = slots.get(1).unwrap().narrow(0, 0, k - 3).unwrap();
        let padded =
            Tensor::stack(&[Tensor::cat(&[&short, &filler], 0).unwrap(), slots.get(1).unwrap()], 0)
                .unwrap();
        let mask: Vec<f32> = (0..2 * k).map(|i| if i < 3 || i >= k { 1.0 } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, (2, k), &fx.device).unwrap();
        let masked = unet.forward_masked(&zt, &t, &padded, Some(&mask)).unwrap();
        // The same batch from per-request keys and values, stacked with padding.
        let sets = [short.unsqueeze(0).unwrap(), slots.narrow(0, 1, 1).unwrap()];
        let kvs: Vec<ContextKv> = sets.iter().map(|s| unet.context_kv(s, None).unwrap()).collect();
        let stacked = ContextKv::cat(&[&kvs[0], &kvs[1]]).unwrap();
        assert_eq!((stacked.batch_size(), stacked.num_slots()), (2, k));
        let from_kv = unet.forward_kv(&zt, &t, &stacked).unwrap();
        for (i, set) in sets.iter().enumerate() {
            let alone = unet
                .forward(&zt.narrow(0, i, 1).unwrap(), &t.narrow(0, i, 1).unwrap(), set)
                .unwrap();
            let what = format!(
                "{name} sample {i} (t = {:.1}, {} slots)",
                t.get(i).unwrap().to_scalar::<f32>().unwrap(),
                set.dim(1).unwrap()
            );
            common::assert_close(
                &format!("{what}: masked batch vs alone"),
                &masked.narrow(0, i, 1).unwrap(),
                &alone,
                1e-5,
            );
            common::assert_close(
                &format!("{what}: stacked kv vs alone"),
                &from_kv.narrow(0, i, 1).unwrap(),
                &alone,
                1e-5,
            );
        }
    }
}

/// Half-precision dtypes with their tolerances for the UNet's ε and the VQ-VAE decode.
/// f16 keeps 11 bits through ~60 layers: 1.7e-3 (UNet) and 6.9e-2 (decode) on voc-small. The
/// codebook search and the softmax over thousands of positions stay in f32 (in f16 they cost
/// up to 1.0 on voc-small); a near-tie code may still flip. bf16 keeps 8 bits: the official
/// code run in bf16 lands 9-11 times further from its f32 outputs than in f16 (UNet 1.2e-2,
/// decode 0.25 on voc-small); the bf16 tolerances are our f16 figures scaled by that, with
/// half again as margin.
const HALF_PRECISION: [(DType, f32, f32); 2] = [(DType::F16, 1e-2, 0.1), (DType::BF16, 3e-2, 1.0)];

#[test]
fn half_precision_decoder_stays_close() {
    for name in FIXTURES {
        let Some(fx) = common::Fixture::load("half_precision_decoder", name) else { continue };
        let ckpt = checkpoint(&fx);
        let cfg = UNetConfig::infer(&ckpt.shapes(), UNET_PREFIX, HEAD_CHANNELS).unwrap();
        let (zt, t, slots) = (fx.tensor("unet_zt"), fx.tensor("unet_t"), fx.tensor("slots"));
        for (dtype, unet_tol, vq_tol) in HALF_PRECISION {
            if dtype == DType::BF16 && fx.device.is_cpu() {
                println!("{name}: bf16 skipped on the CPU (candle has no bf16 matmul there)");
                continue;
            }
            let vb = ckpt.var_builder(dtype, &fx.device);
            let unet = UNetModel::new(vb.pp(UNET_PREFIX), &cfg).unwrap();
            let eps = unet.forward(&zt, &t, &slots).unwrap();
            assert_eq!(eps.dtype(), dtype);
            let eps = eps.to_dtype(DType::F32).unwrap();
            let want = fx.tensor("unet_eps");
            common::assert_close(&format!("{name} {dtype:?} unet_eps"), &eps, &want, unet_tol);
            let vq = load_vqvae(&fx, dtype);
            let decoded = vq.decode(&fx.tensor("vq_latent").to_dtype(dtype).unwrap()).unwrap();
            let decoded = decoded.to_dtype(DType::F32).unwrap();
            let want = fx.tensor("vq_decoded");
            common::assert_close(&format!("{name} {dtype:?} vq_decoded"), &decoded, &want, vq_tol);
        }
    }
}
