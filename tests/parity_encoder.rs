//! Image → slots against the official code: backbone features, encoder output, slots and
//! masks within 1e-4 absolute (f32); the segmentation equal except on near-tie pixels, where
//! the two largest masks differ by less than 1e-3 (the fixture README: 0.1 % of voc-small and
//! 1.6 % of clevrtex-small pixels).

mod common;

use std::sync::Arc;

use candle_core::{DType, Tensor};
use slotserve::checkpoint::Checkpoint;
use slotserve::config::{ModelConfig, Preset};
use slotserve::model::encoder::{position_grid, Encoder};
use slotserve::model::slot_attention::{segmentation, upsample_masks, SlotAttention};

const FIXTURES: [(&str, Preset); 2] =
    [("clevrtex-small", Preset::Clevrtex), ("voc-small", Preset::Voc)];

fn build(fx: &common::Fixture, preset: Preset) -> (Encoder, SlotAttention, ModelConfig) {
    let ckpt = Arc::new(Checkpoint::from_pth(&fx.checkpoint()).unwrap());
    let cfg = ModelConfig::infer(&fx.name, preset, &ckpt.shapes()).unwrap();
    let vb = ckpt.var_builder(DType::F32, &fx.device);
    let encoder = Encoder::new(vb.clone(), &cfg.encoder).unwrap();
    let sa = SlotAttention::new(vb, &cfg.slot_attention).unwrap();
    (encoder, sa, cfg)
}

#[test]
fn encoder_and_slot_attention_match_official() {
    for (name, preset) in FIXTURES {
        let Some(fx) = common::Fixture::load("encoder_and_slot_attention", name) else { continue };
        let (encoder, sa, cfg) = build(&fx, preset);
        let image = fx.tensor("image");
        let (_, _, h, w) = image.dims4().unwrap();
        assert_eq!(cfg.resolution, h, "{name}: resolution read from the shapes");
        let features = encoder.features(&image).unwrap();
        // Scaled: ResNet features reach 12.5, and the stored clevrtex-small features carry f32
        // rounding of that size themselves: this encoder run in f64 is 9.8e-5 away from them
        // (the official code re-run here likewise), while our f32 run is 1.4e-5 from our f64.
        let want = fx.tensor("encoder_features");
        common::assert_close_scaled(&format!("{name} encoder_features"), &features, &want, 1e-4);
        let out = encoder.forward(&image).unwrap();
        common::assert_close(&format!("{name} encoder_out"), &out, &fx.tensor("encoder_out"), 1e-4);
        let (slots, attn) = sa.forward(&out, None).unwrap();
        common::assert_close(&format!("{name} slots"), &slots, &fx.tensor("slots"), 1e-4);
        let masks = upsample_masks(&attn, encoder.grid(h, w), (h, w)).unwrap();
        common::assert_close(&format!("{name} masks"), &masks, &fx.tensor("masks"), 1e-4);
        assert_segmentation_matches(name, &masks, &fx.tensor("segmentation"));
    }
}

/// Our argmax equals the official one wherever the top two masks are at least 1e-3 apart.
fn assert_segmentation_matches(name: &str, masks: &Tensor, want: &Tensor) {
    let got: Vec<u32> = segmentation(masks).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let want: Vec<i64> =
        want.to_dtype(DType::I64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let (b, k, h, w) = masks.dims4().unwrap();
    let m: Vec<f32> =
        masks.permute((0, 2, 3, 1)).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let mut ties = 0;
    for p in 0..b * h * w {
        let mut v = m[p * k..(p + 1) * k].to_vec();
        v.sort_by(|a, b| b.total_cmp(a));
        if v[0] - v[1] < 1e-3 {
            ties += 1;
        } else {
            assert_eq!(got[p] as i64, want[p], "{name}: pixel {p} differs and is not a near-tie");
        }
    }
    println!(
        "{name}: segmentation equal on all {} pixels outside {ties} near-ties",
        b * h * w - ties
    );
}

#[test]
fn recomputed_position_grid_equals_the_stored_buffer() {
    for (name, _) in FIXTURES {
        let Some(fx) = common::Fixture::load("position_grid", name) else { continue };
        let ckpt = Checkpoint::from_pth(&fx.checkpoint()).unwrap();
        let stored = ckpt.tensor("encoder_pos_embedding.grid").unwrap();
        let (_, h, w, _) = stored.dims4().unwrap();
        let ours = position_grid(h, w, &fx.device).unwrap().reshape((1, h, w, 4)).unwrap();
        assert_eq!(common::max_abs_diff(&ours, &stored), 0.0, "{name}");
    }
}

#[test]
fn vit_runs_at_other_input_sizes() {
    let Some(fx) = common::Fixture::load("vit_other_sizes", "voc-small") else { return };
    let (encoder, sa, _) = build(&fx, Preset::Voc);
    let image = fx.tensor("image").narrow(0, 0, 1).unwrap();
    let other = image.upsample_nearest2d(256, 200).unwrap();
    assert_eq!(encoder.grid(256, 200), (32, 25));
    let out = encoder.forward(&other).unwrap();
    assert_eq!(out.dims(), &[1, 32 * 25, 64]);
    let (slots, masks) = sa.forward(&out, None).unwrap();
    assert_eq!((slots.dims(), masks.dims()), (&[1, 6, 64][..], &[1, 6, 32 * 25][..]));
    let masks = upsample_masks(&masks, (32, 25), (256, 200)).unwrap();
    assert_eq!(segmentation(&masks).unwrap().dims(), &[1, 256, 200]);
}
