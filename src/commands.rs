//! The command-line tools behind `slotserve convert`, `init`, `decompose` and `render`, as
//! library functions so they are tested like any other code.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde::Serialize;

use crate::config::{ModelConfig, Preset, CONFIG_FILE, WEIGHTS_FILE};
use crate::imageio::{self, ImageLimits};
use crate::model::pipeline::{infer_config, read_checkpoint, SlotDiffusion};
use crate::model::sampler::SamplerKind;
use crate::summary::{summarize, SlotSummary};

/// The name of the slots tensor in a slots file.
pub const SLOTS_TENSOR: &str = "slots";
/// The name of the initial-latent tensor in a noise file.
pub const NOISE_TENSOR: &str = "noise";

/// Converts an official checkpoint into `out/config.json` + `out/model.safetensors` (weights
/// in `dtype`), after checking that the model builds from it with every tensor used.
pub fn convert(
    checkpoint: &Path,
    preset: Preset,
    out: &Path,
    dtype: DType,
) -> anyhow::Result<ModelConfig> {
    let ckpt = Arc::new(read_checkpoint(checkpoint)?);
    let config = infer_config(checkpoint, preset, &ckpt)?;
    SlotDiffusion::from_checkpoint(&ckpt, config.clone(), &Device::Cpu, DType::F32)?;
    std::fs::create_dir_all(out)?;
    config.save(&out.join(CONFIG_FILE))?;
    ckpt.save_used(&out.join(WEIGHTS_FILE), dtype)?;
    Ok(config)
}

/// Writes a model with reproducible random weights (`seed`) in the configuration `config`.
pub fn init(config: &ModelConfig, seed: u64, out: &Path) -> anyhow::Result<()> {
    let vars = VarMap::new();
    SlotDiffusion::trainable(config, seed, &vars, &Device::Cpu)?;
    std::fs::create_dir_all(out)?;
    config.save(&out.join(CONFIG_FILE))?;
    vars.save(out.join(WEIGHTS_FILE))?;
    Ok(())
}

/// What `decompose` reports for one image.
#[derive(Debug, Serialize)]
pub struct ImageSummary {
    /// The input file.
    pub image: PathBuf,
    /// Per-slot area and bounding box.
    pub slots: Vec<SlotSummary>,
    /// Per-slot soft mask PNGs written.
    pub masks: Vec<PathBuf>,
    /// The segmentation palette PNG written.
    pub segmentation: PathBuf,
}

/// What `decompose` reports in `summary.json`.
#[derive(Debug, Serialize)]
pub struct DecomposeSummary {
    /// The model's fingerprint (slots carry it).
    pub model: String,
    /// The slots file written ([B, K, D] tensor `slots`).
    pub slots_file: PathBuf,
    /// One entry per image, in input order.
    pub images: Vec<ImageSummary>,
}

/// Decomposes image files into `out/`: `slots.safetensors`, per image and slot a mask PNG,
/// per image a segmentation PNG, and `summary.json`.
pub fn decompose(
    model: &SlotDiffusion,
    images: &[PathBuf],
    out: &Path,
) -> anyhow::Result<DecomposeSummary> {
    let res = model.config().resolution as u32;
    let decoded = images
        .iter()
        .map(|p| {
            let bytes = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
            let img = imageio::decode_image(&bytes, &ImageLimits::default())
                .with_context(|| format!("{} is not a usable image", p.display()))?;
            Ok(imageio::preprocess(&img, model.config().preprocess, res))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let batch = imageio::images_to_tensor(&decoded, model.device())?;
    let d = model.decompose(&batch)?;
    std::fs::create_dir_all(out)?;
    let slots_file = out.join("slots.safetensors");
    d.slots.save_safetensors(SLOTS_TENSOR, &slots_file)?;
    let (_, k, h, w) = d.masks.dims4()?;
    let mut summaries = Vec::with_capacity(images.len());
    for (i, path) in images.iter().enumerate() {
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("image");
        let labels: Vec<u32> = d.segmentation.get(i)?.flatten_all()?.to_vec1()?;
        let masks = (0..k)
            .map(|s| {
                let mask: Vec<f32> = d.masks.get(i)?.get(s)?.flatten_all()?.to_vec1()?;
                let file = out.join(format!("{stem}_mask{s}.png"));
                std::fs::write(&file, imageio::encode_mask_png(&mask, w as u32, h as u32))?;
                Ok(file)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let segmentation = out.join(format!("{stem}_segmentation.png"));
        let ids: Vec<u8> = labels.iter().map(|&l| l as u8).collect();
        std::fs::write(
            &segmentation,
            imageio::encode_segmentation_png(&ids, w as u32, h as u32, k),
        )?;
        summaries.push(ImageSummary {
            image: path.clone(),
            slots: summarize(&labels, w, k),
            masks,
            segmentation,
        });
    }
    let summary =
        DecomposeSummary { model: model.fingerprint().to_string(), slots_file, images: summaries };
    std::fs::write(out.join("summary.json"), serde_json::to_string_pretty(&summary)? + "\n")?;
    Ok(summary)
}

/// Which slots of a slot set to render.
#[derive(Debug, Clone, Default)]
pub enum SlotSelection {
    /// All of them.
    #[default]
    All,
    /// Only these indices, in this order.
    Keep(Vec<usize>),
    /// All but these indices.
    Drop(Vec<usize>),
}

impl SlotSelection {
    /// The selected rows of `slots` [K, D]; an index out of range is an error naming it.
    pub fn apply(&self, slots: &Tensor) -> anyhow::Result<Tensor> {
        let k = slots.dim(0)?;
        if let Self::Keep(ids) | Self::Drop(ids) = self {
            if let Some(bad) = ids.iter().find(|&&i| i >= k) {
                bail!("slot index {bad} is out of range: the slot set has {k} slots");
            }
        }
        let ids: Vec<u32> = match self {
            Self::All => return Ok(slots.clone()),
            Self::Keep(ids) => ids.iter().map(|&i| i as u32).collect(),
            Self::Drop(ids) => (0..k).filter(|i| !ids.contains(i)).map(|i| i as u32).collect(),
        };
        if ids.is_empty() {
            bail!("no slots left to render");
        }
        Ok(slots.index_select(&Tensor::new(ids.as_slice(), slots.device())?, 0)?)
    }
}

/// How a render starts.
#[derive(Debug, Clone)]
pub enum RenderStart {
    /// From the seeded standard-normal latent.
    Seed(u64),
    /// From a given latent: a safetensors file with a `noise` tensor [C, h, w] or [1, C, h, w].
    Noise(PathBuf),
}

/// What to render: one slot set of a slots file, a selection of its slots, the start and
/// the sampler.
#[derive(Debug, Clone)]
pub struct RenderSpec {
    /// A safetensors file with a `slots` tensor [K, D] or [B, K, D].
    pub slots_file: PathBuf,
    /// Which slot set of a [B, K, D] file.
    pub index: usize,
    /// Which of its slots.
    pub selection: SlotSelection,
    /// Seed or initial latent.
    pub start: RenderStart,
    /// The sampler.
    pub sampler: SamplerKind,
    /// Its number of model evaluations.
    pub steps: usize,
}

/// Renders `spec` to a PNG at `out`.
pub fn render(model: &SlotDiffusion, spec: &RenderSpec, out: &Path) -> anyhow::Result<()> {
    let file = &spec.slots_file;
    let slots = read_tensor(file, SLOTS_TENSOR)?.to_dtype(DType::F32)?;
    let slots = match slots.rank() {
        2 => slots,
        3 if spec.index < slots.dim(0)? => slots.get(spec.index)?,
        3 => bail!("{} holds {} slot sets, no index {}", file.display(), slots.dim(0)?, spec.index),
        _ => {
            bail!("{}: `slots` must be [K, D] or [B, K, D], got {:?}", file.display(), slots.dims())
        }
    };
    let width = model.config().slot_size();
    if slots.dim(1)? != width {
        bail!("{} has slots of width {}, the model's are {width}", file.display(), slots.dim(1)?);
    }
    let slots = spec.selection.apply(&slots)?;
    let job = match &spec.start {
        RenderStart::Seed(seed) => model.start_render(&slots, *seed, spec.sampler, spec.steps)?,
        RenderStart::Noise(noise_file) => {
            let noise = read_tensor(noise_file, NOISE_TENSOR)?.to_dtype(DType::F32)?;
            let dims = model.latent_dims();
            let noise = noise.reshape(dims.as_slice()).with_context(|| {
                format!(
                    "{}: noise {:?} does not fit the latent {dims:?}",
                    noise_file.display(),
                    noise.dims()
                )
            })?;
            model.start_render_from(&slots, &noise, 0, spec.sampler, spec.steps)?
        }
    };
    let image = model.run_to_end(&mut [job])?;
    let png = imageio::encode_png(&imageio::tensor_to_images(&image)?[0]);
    std::fs::write(out, png).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
}

fn read_tensor(file: &Path, name: &str) -> anyhow::Result<Tensor> {
    let mut tensors = candle_core::safetensors::load(file, &Device::Cpu)
        .with_context(|| format!("cannot read {}", file.display()))?;
    tensors.remove(name).with_context(|| format!("{} has no tensor `{name}`", file.display()))
}
