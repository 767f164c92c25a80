//! The whole SlotDiffusion model on batches: images → slots and masks ([`SlotDiffusion::decompose`])
//! and slots → images by latent diffusion ([`SlotDiffusion::render`]). Rendering is also
//! offered as resumable per-request jobs ([`RenderJob`]), so that the engine can run one UNet
//! evaluation for requests that arrived at different times and sit at different steps.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use sha2::{Digest, Sha256};

use crate::checkpoint::Checkpoint;
use crate::config::{ModelConfig, Preset, CONFIG_FILE, UNET_PREFIX, VQVAE_PREFIX, WEIGHTS_FILE};
use crate::cpu_runtime::on_compute_pool;
use crate::model::encoder::Encoder;
use crate::model::init::seeded_var_builder;
use crate::model::sampler::{
    gaussian_noise, step_batch, NoiseSchedule, Sampler, SamplerKind, SamplerState,
};
use crate::model::slot_attention::{segmentation, upsample_masks, SlotAttention};
use crate::model::unet::UNetModel;
use crate::model::vit;
use crate::model::vqvae::VqVae;

/// Checkpoint tensors the model recomputes itself (the diffusion schedule buffers) or that the
/// official model carries without using (DINO's pooler) or recomputes for any size (the
/// position grid);
/// every other tensor must be read, or loading fails.
const DERIVED: &[&str] = &[
    "dm_decoder.betas",
    "dm_decoder.alphas_bar",
    "dm_decoder.sqrt_",
    "dm_decoder.log_one_minus_alphas_bar",
    "dm_decoder.posterior_",
    "encoder.dino.pooler.",
    "encoder_pos_embedding.grid",
];

/// What decomposing a batch of images gives.
#[derive(Debug, Clone)]
pub struct Decomposition {
    /// Slot vectors [B, K, D] (f32).
    pub slots: Tensor,
    /// Soft masks [B, K, H, W] at the input resolution (f32, summing to 1 over slots).
    pub masks: Tensor,
    /// Hard segmentation [B, H, W] (u32 slot ids), the argmax of `masks` over slots.
    pub segmentation: Tensor,
}

/// One image being rendered: its slots and its sampler's progress.
#[derive(Debug)]
pub struct RenderJob {
    slots: Tensor,
    state: SamplerState,
}

impl RenderJob {
    /// Whether every denoising evaluation is done (the job is ready to decode).
    pub fn is_done(&self) -> bool {
        self.state.is_done()
    }

    /// Denoising evaluations done so far.
    pub fn step(&self) -> usize {
        self.state.step()
    }

    /// Denoising evaluations in all.
    pub fn total_steps(&self) -> usize {
        self.state.total_evals()
    }
}

/// A loaded SlotDiffusion model: encoder, slot attention, UNet, VQ-VAE and noise schedule.
#[derive(Debug)]
pub struct SlotDiffusion {
    config: ModelConfig,
    encoder: Encoder,
    slot_attention: SlotAttention,
    unet: UNetModel,
    vqvae: VqVae,
    sampler: Sampler,
    fingerprint: String,
    device: Device,
    dtype: DType,
}

impl SlotDiffusion {
    /// Builds the model from weights named as in the official checkpoints.
    pub fn new(vb: VarBuilder, config: ModelConfig, fingerprint: String) -> Result<Self> {
        if vb.device().is_cpu() && vb.dtype() == DType::BF16 {
            candle_core::bail!(
                "bf16 is not supported on the CPU (candle has no bf16 matmul there): use f16 or f32"
            );
        }
        let encoder = Encoder::new(vb.clone(), &config.encoder)?;
        let slot_attention = SlotAttention::new(vb.clone(), &config.slot_attention)?;
        let unet = UNetModel::new(vb.pp(UNET_PREFIX), &config.unet)?;
        let vqvae = VqVae::new(vb.pp(VQVAE_PREFIX), &config.vqvae)?;
        let sampler = Sampler::new(&config.schedule)?;
        Ok(Self {
            config,
            encoder,
            slot_attention,
            unet,
            vqvae,
            sampler,
            fingerprint,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// Loads a model: a directory with `config.json` + `model.safetensors`, or a checkpoint
    /// file (official `.pth` or safetensors) whose sizes are read from its shapes, with
    /// `preset` supplying the rest. Loading is strict: every tensor must be used.
    pub fn load(
        path: &Path,
        preset: Option<Preset>,
        device: &Device,
        dtype: DType,
    ) -> anyhow::Result<Self> {
        let (config, weights) = if path.is_dir() {
            (Some(ModelConfig::load(&path.join(CONFIG_FILE))?), path.join(WEIGHTS_FILE))
        } else {
            (None, path.to_path_buf())
        };
        let ckpt = read_checkpoint(&weights)?;
        let config = match (config, preset) {
            (Some(config), _) => config,
            (None, Some(preset)) => infer_config(&weights, preset, &ckpt)?,
            (None, None) => bail!(
                "{} is a bare checkpoint: name its preset (--preset clevrtex|celeba|voc|coco)",
                weights.display()
            ),
        };
        Self::from_checkpoint(&Arc::new(ckpt), config, device, dtype)
            .with_context(|| format!("cannot build the model from {}", weights.display()))
    }

    /// Builds the model from a checkpoint, strictly: a missing, mis-shaped or unused tensor
    /// is an error naming it.
    pub fn from_checkpoint(
        ckpt: &Arc<Checkpoint>,
        config: ModelConfig,
        device: &Device,
        dtype: DType,
    ) -> anyhow::Result<Self> {
        let mut model = Self::new(ckpt.var_builder(dtype, device), config, String::new())?;
        ckpt.ensure_all_used(DERIVED)?;
        model.fingerprint = fingerprint(ckpt)?;
        Ok(model)
    }

    /// A model to train (or to save, as `init` does): reproducible random weights from `seed`
    /// as variables of `vars` (values already in `vars` are kept), so that gradients reach them.
    pub fn trainable(
        config: &ModelConfig,
        seed: u64,
        vars: &VarMap,
        device: &Device,
    ) -> Result<Self> {
        let vb = seeded_var_builder(vars, seed, DType::F32, device);
        Self::new(vb, config.clone(), format!("random-{seed:016x}"))
    }

    /// A model to run (benchmarks, tests): the weights of [`Self::trainable`] as
    /// constants, as a loaded checkpoint holds them, and recorded in `vars` too. Variables
    /// would send every layer down its differentiable path: slower, and with results that
    /// depend on the batch around a sample.
    pub fn random(config: &ModelConfig, seed: u64, vars: &VarMap, device: &Device) -> Result<Self> {
        Self::random_in(config, seed, vars, device, DType::F32)
    }

    /// [`random`](Self::random) with weights and activations in `dtype` (half-precision
    /// benchmarks): the same seed gives the same weights, rounded to `dtype`.
    pub fn random_in(
        config: &ModelConfig,
        seed: u64,
        vars: &VarMap,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let fingerprint = Self::trainable(config, seed, vars, device)?.fingerprint;
        let constants: HashMap<String, Tensor> = vars
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("the variable map is poisoned".into()))?
            .iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
            .collect();
        let vb = VarBuilder::from_tensors(constants, dtype, device);
        Self::new(vb, config.clone(), fingerprint)
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// A digest of the weights: slot sets carry it, so slots from another model are refused.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of weights and activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The image encoder (training reaches the parts through these accessors).
    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    /// Slot Attention.
    pub fn slot_attention(&self) -> &SlotAttention {
        &self.slot_attention
    }

    /// The denoising UNet.
    pub fn unet(&self) -> &UNetModel {
        &self.unet
    }

    /// The latent VQ-VAE.
    pub fn vqvae(&self) -> &VqVae {
        &self.vqvae
    }

    /// The diffusion noise schedule (training draws x_t from its `alphas_bar`).
    pub fn schedule(&self) -> &NoiseSchedule {
        self.sampler.schedule()
    }

    /// The latent shape [C, h, w] the diffusion model works in.
    pub fn latent_dims(&self) -> [usize; 3] {
        let side = self.config.resolution / self.vqvae.downsample_factor();
        [self.config.vqvae.embed_dim, side, side]
    }

    /// Slots, soft masks and segmentation of a batch of images [B, 3, H, W] in [-1, 1] at
    /// the model's resolution.
    pub fn decompose(&self, images: &Tensor) -> Result<Decomposition> {
        on_compute_pool(|| {
            let (_, _, h, w) = images.dims4()?;
            let features = self.encoder.forward(&images.to_dtype(self.dtype)?)?;
            let (slots, attn) = self.slot_attention.forward(&features, None)?;
            let grid = self.encoder.grid(h, w);
            let masks = upsample_masks(&attn.to_dtype(DType::F32)?, grid, (h, w))?;
            let segmentation = segmentation(&masks)?;
            Ok(Decomposition { slots: slots.to_dtype(DType::F32)?, masks, segmentation })
        })
    }

    /// Starts rendering one image from `slots` [K, D], from the seeded standard-normal latent.
    pub fn start_render(
        &self,
        slots: &Tensor,
        seed: u64,
        sampler: SamplerKind,
        steps: usize,
    ) -> Result<RenderJob> {
        let noise = gaussian_noise(&self.latent_dims(), seed, &self.device)?;
        self.start_render_from(slots, &noise, seed, sampler, steps)
    }

    /// Starts rendering one image from `slots` [K, D] and a given initial latent [C, h, w]
    /// (to reproduce a render of another implementation exactly).
    pub fn start_render_from(
        &self,
        slots: &Tensor,
        noise: &Tensor,
        seed: u64,
        sampler: SamplerKind,
        steps: usize,
    ) -> Result<RenderJob> {
        let (_, d) = slots.dims2()?;
        if d != self.config.slot_size() {
            candle_core::bail!("slots have width {d}, the model's are {}", self.config.slot_size());
        }
        let state =
            self.sampler.start(sampler, Some(steps), &noise.to_device(&self.device)?, seed)?;
        Ok(RenderJob { slots: slots.to_device(&self.device)?.to_dtype(self.dtype)?, state })
    }

    /// One denoising evaluation for every unfinished job (each at its own timestep), advancing
    /// each: jobs with the same slot count share one batched UNet pass.
    pub fn denoise_step(&self, jobs: &mut [&mut RenderJob]) -> Result<()> {
        on_compute_pool(|| self.denoise_step_here(jobs))
    }

    /// [`denoise_step`](Self::denoise_step) on the calling thread.
    fn denoise_step_here(&self, jobs: &mut [&mut RenderJob]) -> Result<()> {
        // One UNet pass per slot count: padding shorter slot sets (with a cross-attention
        // mask) changes the summation order by ~1e-6, which codebook snapping can turn into
        // a different image, and a request must render the same alone or batched.
        let mut groups: BTreeMap<usize, Vec<&mut RenderJob>> = BTreeMap::new();
        for job in jobs.iter_mut() {
            groups.entry(job.slots.dim(0)?).or_default().push(&mut **job);
        }
        for group in groups.into_values() {
            let (slots, mut states): (Vec<&Tensor>, Vec<&mut SamplerState>) =
                group.into_iter().map(|j| (&j.slots, &mut j.state)).unzip();
            let mut unet = |x: &Tensor, t: &Tensor, active: &[usize]| -> Result<Tensor> {
                let context =
                    Tensor::stack(&active.iter().map(|&i| slots[i]).collect::<Vec<_>>(), 0)?;
                self.unet.forward(&x.to_dtype(self.dtype)?, t, &context)?.to_dtype(DType::F32)
            };
            step_batch(&mut states, &mut unet, &|x0| self.vqvae.quantize(x0))?;
        }
        Ok(())
    }

    /// Decodes finished jobs into images [B, 3, H, W] in [-1, 1] with one VQ-VAE pass.
    pub fn finish_render(&self, jobs: &[&RenderJob]) -> Result<Tensor> {
        let latents: Vec<Tensor> =
            jobs.iter().map(|j| j.state.final_latent()).collect::<Result<_>>()?;
        self.decode_latents(&Tensor::cat(&latents, 0)?)
    }

    /// VQ-VAE decode (quantize, then decoder) of latents [B, C, h, w], to f32 images.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        on_compute_pool(|| self.vqvae.decode(&latents.to_dtype(self.dtype)?)?.to_dtype(DType::F32))
    }

    /// Renders each slot set (its own K) from its seed, all jobs batched together.
    pub fn render(
        &self,
        slot_sets: &[Tensor],
        seeds: &[u64],
        sampler: SamplerKind,
        steps: usize,
    ) -> Result<Tensor> {
        let mut jobs: Vec<RenderJob> = slot_sets
            .iter()
            .zip(seeds)
            .map(|(s, &seed)| self.start_render(s, seed, sampler, steps))
            .collect::<Result<_>>()?;
        self.run_to_end(&mut jobs)
    }

    /// Drives jobs to the end together and decodes them.
    pub fn run_to_end(&self, jobs: &mut [RenderJob]) -> Result<Tensor> {
        while jobs.iter().any(|j| !j.is_done()) {
            self.denoise_step(&mut jobs.iter_mut().collect::<Vec<_>>())?;
        }
        self.finish_render(&jobs.iter().collect::<Vec<_>>())
    }
}

/// Reads a checkpoint file, with DINO tensor names in their canonical (transformers 4) form.
pub fn read_checkpoint(path: &Path) -> anyhow::Result<Checkpoint> {
    Ok(Checkpoint::from_file(path)
        .with_context(|| format!("cannot read checkpoint {}", path.display()))?
        .renamed(vit::canonical_name))
}

/// The configuration of a bare checkpoint: sizes from its shapes, the rest from `preset`.
pub fn infer_config(path: &Path, preset: Preset, ckpt: &Checkpoint) -> anyhow::Result<ModelConfig> {
    let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    ModelConfig::infer(name, preset, &ckpt.shapes())
        .with_context(|| format!("{} does not fit the `{preset:?}` preset", path.display()))
}

/// A short hex digest of the name, shape and values of every tensor the model uses
/// (independent of file format and of unused buffers, so a `.pth` and its converted
/// safetensors share it).
fn fingerprint(ckpt: &Checkpoint) -> Result<String> {
    let shapes = ckpt.shapes();
    let mut hasher = Sha256::new();
    for name in ckpt.used_names() {
        hasher.update(name.as_bytes());
        hasher.update(format!("{:?}", shapes.dims(&name)?).as_bytes());
        let values = ckpt.peek(&name)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        hasher.update(values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
    }
    let digest = hasher.finalize();
    Ok(digest.iter().take(8).map(|b| format!("{b:02x}")).collect())
}
