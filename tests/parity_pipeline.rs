//! The whole model loaded from an official `.pth` (strictly: every tensor used) against the
//! official code end to end: decompose, and the official 20-evaluation DPM-Solver++ render
//! from the recorded noise, including a render without a slot and one with swapped slots.
//! Renders within 1e-3 absolute (20 chained evaluations with codebook snapping: the fixture
//! README's figure), and the converted safetensors model gives identical outputs.

mod common;

use candle_core::{DType, Tensor};
use slotserve::config::Preset;
use slotserve::model::pipeline::SlotDiffusion;
use slotserve::model::sampler::SamplerKind;

const FIXTURES: [(&str, Preset); 2] =
    [("clevrtex-small", Preset::Clevrtex), ("voc-small", Preset::Voc)];

fn load(fx: &common::Fixture, preset: Preset) -> SlotDiffusion {
    SlotDiffusion::load(&fx.checkpoint(), Some(preset), &fx.device, DType::F32).unwrap()
}

/// Renders each slot set from the matching row of `noise` with the official sampler.
fn render(model: &SlotDiffusion, slots: &Tensor, noise: &Tensor) -> Tensor {
    let mut jobs: Vec<_> = (0..noise.dim(0).unwrap())
        .map(|i| {
            let (s, n) = (slots.get(i).unwrap(), noise.get(i).unwrap());
            model.start_render_from(&s, &n, 0, SamplerKind::DpmSolverPP, 20).unwrap()
        })
        .collect();
    model.run_to_end(&mut jobs).unwrap()
}

#[test]
fn official_checkpoints_decompose_and_render_like_the_official_code() {
    for (name, preset) in FIXTURES {
        let Some(fx) = common::Fixture::load("official_checkpoints_end_to_end", name) else {
            continue;
        };
        let model = load(&fx, preset);
        let d = model.decompose(&fx.tensor("image")).unwrap();
        common::assert_close(&format!("{name} slots"), &d.slots, &fx.tensor("slots"), 1e-4);
        common::assert_close(&format!("{name} masks"), &d.masks, &fx.tensor("masks"), 1e-4);

        let image = render(&model, &fx.tensor("slots"), &fx.tensor("sample_noise"));
        common::assert_close(
            &format!("{name} sample_image"),
            &image,
            &fx.tensor("sample_image"),
            1e-3,
        );

        let kept = fx.tensor("slots").narrow(0, 0, 1).unwrap();
        let kept = kept.narrow(1, 1, kept.dim(1).unwrap() - 1).unwrap();
        let dropped = render(&model, &kept, &fx.tensor("drop0_noise"));
        common::assert_close(
            &format!("{name} drop0_image"),
            &dropped,
            &fx.tensor("drop0_image"),
            1e-3,
        );

        let swapped = render(&model, &fx.tensor("swap_slots"), &fx.tensor("swap_noise"));
        common::assert_close(
            &format!("{name} swap_image"),
            &swapped,
            &fx.tensor("swap_image"),
            1e-3,
        );
    }
}

#[test]
fn renders_batched_at_different_progress_equal_renders_alone() {
    let Some(fx) = common::Fixture::load("batched_at_different_progress", "clevrtex-small") else {
        return;
    };
    let model = load(&fx, Preset::Clevrtex);
    let slots = fx.tensor("slots");
    let short = slots.get(1).unwrap().narrow(0, 0, 3).unwrap();
    let start =
        |s: &Tensor, seed| model.start_render(s, seed, SamplerKind::DpmSolverPP, 20).unwrap();
    let alone_a = model.run_to_end(&mut [start(&slots.get(0).unwrap(), 1)]).unwrap();
    let alone_b = model.run_to_end(&mut [start(&short, 2)]).unwrap();
    let mut first = start(&slots.get(0).unwrap(), 1);
    for _ in 0..3 {
        model.denoise_step(&mut [&mut first]).unwrap();
    }
    let mut jobs = [first, start(&short, 2)];
    let both = model.run_to_end(&mut jobs).unwrap();
    common::assert_close(
        "job A (3 steps ahead, 5 slots)",
        &both.narrow(0, 0, 1).unwrap(),
        &alone_a,
        1e-5,
    );
    common::assert_close("job B (3 slots)", &both.narrow(0, 1, 1).unwrap(), &alone_b, 1e-5);
}
