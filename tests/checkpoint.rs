//! Reading official `.pth` checkpoints: every tensor, with the names and shapes the official
//! code saved, and strict accounting of what a model leaves unread.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device};
use slotserve::checkpoint::Checkpoint;

fn expected_keys(fx: &common::Fixture) -> Vec<(String, Vec<usize>)> {
    let text = std::fs::read_to_string(fx.dir.join(format!("keys_{}.txt", fx.name))).unwrap();
    text.lines()
        .map(|line| {
            let (name, shape) = line.split_once(' ').unwrap();
            let dims = shape
                .trim_matches(|c| c == '(' || c == ')')
                .split(',')
                .filter_map(|d| d.trim().parse().ok())
                .collect();
            (name.to_string(), dims)
        })
        .collect()
}

#[test]
fn official_pth_files_load_with_every_key_and_shape() {
    for name in ["clevrtex-small", "voc-small"] {
        let Some(fx) = common::Fixture::load("official_pth_files_load", name) else { return };
        let ckpt = Checkpoint::from_pth(&fx.checkpoint()).unwrap();
        let shapes = ckpt.shapes();
        let want = expected_keys(&fx);
        assert_eq!(shapes.iter().count(), want.len(), "{name}: tensor count");
        for (key, dims) in want {
            assert_eq!(shapes.dims(&key).unwrap(), &dims[..], "{name}: {key}");
        }
    }
}

#[test]
fn strict_loading_names_missing_misshaped_and_unused_tensors() {
    let Some(fx) = common::Fixture::load("strict_loading", "clevrtex-small") else { return };
    let ckpt = Arc::new(Checkpoint::from_pth(&fx.checkpoint()).unwrap());
    let vb = ckpt.var_builder(DType::F32, &Device::Cpu);
    let err = vb.get((1, 5, 64), "no_such_tensor").unwrap_err().to_string();
    assert!(err.contains("no_such_tensor"), "{err}");
    let err = vb.get((1, 5, 65), "init_latents").unwrap_err().to_string();
    assert!(err.contains("init_latents") && err.contains("[1, 5, 64]"), "{err}");
    vb.get((1, 5, 64), "init_latents").unwrap();
    let unused = ckpt.unused(&["dm_decoder.", "encoder"]);
    assert!(unused.iter().all(|k| k.starts_with("slot_attention.")), "{unused:?}");
    let err = ckpt.ensure_all_used(&["dm_decoder.", "encoder"]).unwrap_err().to_string();
    assert!(err.contains("slot_attention.gru.weight_ih"), "{err}");
}
