//! Shared helpers for the parity tests against the official SlotDiffusion test vectors.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

/// The environment variable naming the folder of official test vectors.
pub const FIXTURES_ENV: &str = "SLOTSERVE_FIXTURES";
/// The environment variable naming the device the parity tests run the model on: `cpu`
/// (the default) or `cuda` (GPU 0, in a build with the `cuda` feature).
pub const DEVICE_ENV: &str = "SLOTSERVE_TEST_DEVICE";

/// The device of `$SLOTSERVE_TEST_DEVICE`; an unknown name or an unusable GPU is a failure,
/// never a silent fall-back to the CPU.
pub fn device() -> Device {
    match std::env::var(DEVICE_ENV).as_deref() {
        Err(_) | Ok("cpu") => Device::Cpu,
        Ok("cuda") => Device::new_cuda(0)
            .unwrap_or_else(|e| panic!("{DEVICE_ENV}=cuda, but no CUDA GPU is usable: {e}")),
        Ok(other) => panic!("{DEVICE_ENV}={other}: expected cpu or cuda"),
    }
}

/// The fixture folder: `$SLOTSERVE_FIXTURES`, else `../shared/fixtures/official` beside the
/// checkout. `None` (with one line saying why) when neither exists, so a fresh clone elsewhere
/// still passes the rest of the suite; a set variable naming a missing folder is a failure.
pub fn fixtures_dir(test: &str) -> Option<PathBuf> {
    if let Ok(dir) = std::env::var(FIXTURES_ENV) {
        let dir = PathBuf::from(dir);
        assert!(dir.is_dir(), "{FIXTURES_ENV}={} is not a folder", dir.display());
        return Some(dir);
    }
    let default = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/official");
    if default.is_dir() {
        return Some(default);
    }
    println!(
        "skipped {test}: {FIXTURES_ENV} is unset and ../shared/fixtures/official does not exist"
    );
    None
}

/// One fixture model (`clevrtex-small` or `voc-small`): its checkpoint and test vectors.
pub struct Fixture {
    /// Folder holding the fixture files.
    pub dir: PathBuf,
    /// Fixture name, e.g. `voc-small`.
    pub name: String,
    /// The device the test runs on ([`device`]).
    pub device: Device,
    /// Every tensor of `vectors_NAME.safetensors`, on that device.
    pub vectors: HashMap<String, Tensor>,
}

impl Fixture {
    /// Loads the vectors of fixture `name`; `None` when fixtures are unavailable (skipped).
    /// A `$SLOTSERVE_FIXTURES` folder may hold only some fixtures (trimmed to travel to a GPU
    /// machine): the others are skipped, with one line saying so.
    pub fn load(test: &str, name: &str) -> Option<Self> {
        let dir = fixtures_dir(test)?;
        let path = dir.join(format!("vectors_{name}.safetensors"));
        if !path.exists() && std::env::var_os(FIXTURES_ENV).is_some() {
            println!("skipped {test} for {name}: ${FIXTURES_ENV} holds no {}", path.display());
            return None;
        }
        let device = device();
        let vectors = candle_core::safetensors::load(&path, &device)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        Some(Self { dir, name: name.to_string(), device, vectors })
    }

    /// Path of the official `.pth` checkpoint.
    pub fn checkpoint(&self) -> PathBuf {
        self.dir.join(format!("official_{}.pth", self.name))
    }

    /// A plain (non-strict) VarBuilder over the official checkpoint, f32 on the test device.
    pub fn var_builder(&self) -> VarBuilder<'static> {
        VarBuilder::from_pth(self.checkpoint(), DType::F32, &self.device).expect("read checkpoint")
    }

    /// One test vector by name.
    pub fn tensor(&self, key: &str) -> Tensor {
        self.vectors
            .get(key)
            .unwrap_or_else(|| panic!("vector {key} missing from {}", self.name))
            .clone()
    }
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Asserts that `got` matches `want` to `tol` absolute, naming `what` and the difference.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let d = max_abs_diff(got, want);
    println!("{what}: max abs diff {d:.3e} (tolerance {tol:.0e})");
    assert!(d <= tol, "{what}: max abs diff {d} exceeds {tol}");
}

/// Like [`assert_close`] with the tolerance scaled by the reference's magnitude,
/// `tol · max(1, max |want|)`, for stages whose values run well above 1.
pub fn assert_close_scaled(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let scale =
        want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert_close(what, got, want, tol * scale.max(1.0));
}
