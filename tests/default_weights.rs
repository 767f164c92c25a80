//! The committed default model (`weights/`): small enough to commit, and its grouping of
//! held-out procedural scenes above the gate of `weights/README.md` (FG-ARI ≥ 0.85 and
//! mBO ≥ 0.70 on 64 scenes; the 500-scene figures are in that README).

use std::path::Path;

use candle_core::{DType, Device};
use slotserve::data::SceneConfig;
use slotserve::eval::{format_table, held_out_scenes};
use slotserve::model::pipeline::SlotDiffusion;
use slotserve::train::evaluate::evaluate_scenes;

const WEIGHTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/weights");
const MAX_WEIGHTS_BYTES: u64 = 50 << 20;

#[test]
fn default_weights_fit_the_repository_budget() {
    let bytes = std::fs::metadata(Path::new(WEIGHTS).join("model.safetensors")).unwrap().len();
    assert!(bytes <= MAX_WEIGHTS_BYTES, "weights/model.safetensors has {bytes} bytes");
}

#[test]
fn default_weights_group_held_out_scenes_above_the_gate() {
    let model = SlotDiffusion::load(Path::new(WEIGHTS), None, &Device::Cpu, DType::F32).unwrap();
    let scenes = held_out_scenes(&SceneConfig::default(), 64);
    let reports = evaluate_scenes(&model, &scenes, 16, None).unwrap();
    println!("{}", format_table(&reports));
    let (fg_ari, mbo) = (reports[0].fg_ari.value().unwrap(), reports[0].mbo.value().unwrap());
    assert!(fg_ari >= 0.85, "FG-ARI {fg_ari:.3} is below the gate 0.85");
    assert!(mbo >= 0.70, "mBO {mbo:.3} is below the gate 0.70");
}
