//! The UNet against the official code's output for one call with per-sample fractional
//! timesteps (999.0 and 431.7), context = the fixture's slots. f32, 1e-4 absolute.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use slotserve::checkpoint::Checkpoint;
use slotserve::model::unet::{UNetConfig, UNetModel};

const UNET_PREFIX: &str = "dm_decoder.model.diffusion_model";

fn load(fx: &common::Fixture) -> (UNetModel, UNetConfig) {
    let ckpt = Arc::new(Checkpoint::from_pth(&fx.checkpoint()).unwrap());
    let cfg = UNetConfig::infer(&ckpt.shapes(), UNET_PREFIX, 32).unwrap();
    let unet =
        UNetModel::new(ckpt.var_builder(DType::F32, &Device::Cpu).pp(UNET_PREFIX), &cfg).unwrap();
    (unet, cfg)
}

#[test]
fn unet_matches_official_with_per_sample_timesteps() {
    for name in ["clevrtex-small", "voc-small"] {
        let Some(fx) = common::Fixture::load("unet_matches_official", name) else { return };
        let (unet, cfg) = load(&fx);
        assert_eq!(cfg.channel_mult, vec![1, 2, 3, 4], "{name}");
        assert_eq!(cfg.attention_levels, vec![false, true, true, true], "{name}");
        assert_eq!((cfg.model_channels, cfg.num_res_blocks, cfg.context_dim), (32, 2, 64));
        let eps =
            unet.forward(&fx.tensor("unet_zt"), &fx.tensor("unet_t"), &fx.tensor("slots")).unwrap();
        common::assert_close(&format!("{name} unet_eps"), &eps, &fx.tensor("unet_eps"), 1e-4);
    }
}

#[test]
fn padded_slot_sets_equal_separate_calls() {
    let Some(fx) = common::Fixture::load("padded_slot_sets", "clevrtex-small") else { return };
    let (unet, _) = load(&fx);
    let zt = fx.tensor("unet_zt");
    let t = fx.tensor("unet_t");
    let slots = fx.tensor("slots");
    // Sample 0 keeps its first 3 slots, sample 1 all 5: padded to 5 with zeros, masked.
    let short = slots.get(0).unwrap().narrow(0, 0, 3).unwrap();
    let padded =
        Tensor::stack(&[short.pad_with_zeros(0, 0, 2).unwrap(), slots.get(1).unwrap()], 0).unwrap();
    let mask = Tensor::new(&[[1f32, 1., 1., 0., 0.], [1., 1., 1., 1., 1.]], &Device::Cpu).unwrap();
    let batched = unet.forward_masked(&zt, &t, &padded, Some(&mask)).unwrap();
    for (i, ctx) in [short.unsqueeze(0).unwrap(), slots.narrow(0, 1, 1).unwrap()].iter().enumerate()
    {
        let alone =
            unet.forward(&zt.narrow(0, i, 1).unwrap(), &t.narrow(0, i, 1).unwrap(), ctx).unwrap();
        common::assert_close(
            &format!("sample {i} padded vs alone"),
            &batched.narrow(0, i, 1).unwrap(),
            &alone,
            1e-5,
        );
    }
}
