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

#[test]
fn bare_and_wrapped_state_dicts_read_the_same() {
    let assets = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/assets");
    for file in ["tiny_bare.pth", "tiny_wrapped.pth"] {
        let ckpt = Checkpoint::from_pth(&assets.join(file)).unwrap();
        let w = ckpt.tensor("layer.weight").unwrap();
        assert_eq!(w.to_vec2::<f32>().unwrap(), vec![vec![0., 1., 2.], vec![3., 4., 5.]], "{file}");
        assert_eq!(ckpt.tensor("layer.bias").unwrap().to_vec1::<f32>().unwrap(), vec![0.5, -1.5]);
        assert_eq!(ckpt.shapes().iter().count(), 2, "{file}");
    }
}
