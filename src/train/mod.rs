//! `slotserve train` and `slotserve eval`: the embedded default model, trained in candle on
//! procedural scenes with the same modules that serve it, and scored with the paper's metrics.
//!
//! Training runs three stages over one step counter: a curriculum stage of `slot_steps`
//! trains encoder and Slot Attention alone through the auxiliary reconstruction of
//! [`losses::AuxDecoder`] (objects separate in a fraction of the full step's time); then, as
//! in the paper, `vqvae_steps` train the VQ-VAE alone (reconstruction MSE + quantization
//! loss, unused codes restarted), and the final `steps` train encoder, Slot Attention and
//! UNet with the latent denoising loss on the frozen VQ-VAE (plus the auxiliary loss).
//! With `mask_weight > 0` the curriculum and stage 2 also supervise Slot Attention's masks
//! with the generator's instance masks ([`supervision`]; `mask_foreground_weight` weighs the
//! cells objects cover above the background's); a run can start from another
//! run's variables (`init_from`) and take another's trained VQ-VAE (`vqvae_from`) or UNet
//! (`unet_from`, e.g. a warm start on a new grouping); stage 2
//! can train the UNet alone on a trained grouping (`freeze_grouping`) and weight its loss
//! by Min-SNR (`min_snr_gamma`), and the exported model can hold an exponential moving
//! average of the weights a stage trains (`ema_decay`).
//!
//! Every random number of step `s` comes from a ChaCha8 stream derived from (seed, s), and
//! the scenes of step `s` are the training scenes from `s·max(B, B_slots)` on, so a
//! checkpoint (variables, Adam moments, step) resumes exactly.

pub mod ema;
pub mod evaluate;
pub mod losses;
pub mod optim;
pub mod supervision;

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use signal_hook::consts::{SIGINT, SIGTERM};

use crate::config::{
    ModelConfig, Preset, SamplerDefaults, CONFIG_FILE, UNET_PREFIX, VQVAE_PREFIX, WEIGHTS_FILE,
};
use crate::data::SceneConfig;
use crate::imageio::Preprocess;
use crate::model::encoder::{BackboneConfig, EncoderConfig};
use crate::model::init::seeded_var_builder;
use crate::model::pipeline::SlotDiffusion;
use crate::model::resnet::ResNetConfig;
use crate::model::sampler::ScheduleConfig;
use crate::model::slot_attention::SlotAttentionConfig;
use crate::model::unet::UNetConfig;
use crate::model::vit::ViTConfig;
use crate::model::vqvae::VqVaeConfig;
use ema::Ema;
pub use evaluate::{eval, EvalArgs};
use losses::{
    diffusion_losses, restarted_codebook, scene_batch, slot_losses, step_rng, vqvae_losses,
    AuxDecoder, Auxiliaries, DenoiseRecipe, GroupingLosses, SceneBatch, AUX_PREFIX, RESTART_EVERY,
};
use optim::{Adam, AdamConfig};

/// Checkpoint files inside the training folder.
const STATE_FILE: &str = "state.json";
const VARS_FILE: &str = "vars.safetensors";
const OPTIM_FILE: &str = "optim.safetensors";
const EMA_FILE: &str = "ema.safetensors";
/// Sub-folder of the training folder holding the servable model (config + weights).
pub const MODEL_DIR: &str = "model";

/// Which encoder the default model uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EncoderKind {
    /// ResNet (stem 32, one block per stage, as many stages as the grid needs: three for
    /// 16×16): the preset's encoder family.
    Resnet,
    /// A 3-layer ViT of width 64 with square patches, as many as the feature grid has cells:
    /// cheaper at 64².
    Vit,
}

/// The side of the default model's scenes and images.
const SCENE_SIZE: usize = 64;

/// The small SlotDiffusion of the embedded default model, for 64² scenes: a `grid_size`²
/// feature grid (the masks' resolution: 16 by default, 32 for finer masks),
/// 7 slots of width 64, a 2-level UNet of width `unet_channels` on the 16² × 3 latent of a
/// VQ-VAE of base width `vqvae_channels` (×4 downsampling, 1024 codes). `encoder_depth` is
/// the ResNet's blocks in its last stage (1 by default) or the ViT's layers (3 by default).
pub fn default_config(
    encoder: EncoderKind,
    grid_size: usize,
    encoder_depth: Option<usize>,
    unet_channels: usize,
    vqvae_channels: usize,
) -> anyhow::Result<ModelConfig> {
    let slot_size = 64;
    ensure!(
        grid_size > 0 && SCENE_SIZE.is_multiple_of(grid_size),
        "a grid of {grid_size} does not tile {SCENE_SIZE}² scenes"
    );
    let stride = SCENE_SIZE / grid_size;
    let backbone = match encoder {
        EncoderKind::Resnet => {
            // one block per stage but the last, each stage after the first halving the grid
            // (the stride divides 64, so it is a power of two)
            let stages = stride.trailing_zeros() as usize + 1;
            let mut blocks = vec![1; stages];
            blocks[stages - 1] = encoder_depth.unwrap_or(1);
            BackboneConfig::Resnet(ResNetConfig { stem_channels: 32, blocks })
        }
        EncoderKind::Vit => BackboneConfig::Vit(ViTConfig {
            hidden_size: 64,
            num_layers: encoder_depth.unwrap_or(3),
            num_heads: 2,
            intermediate_size: 128,
            patch_size: stride,
            grid_size,
        }),
    };
    ensure!(encoder_depth != Some(0), "an encoder needs at least one block or layer");
    let encoder = EncoderConfig { backbone, grid_size, out_channels: slot_size };
    Ok(ModelConfig {
        name: "shapes".into(),
        preset: Preset::Shapes,
        resolution: encoder.input_resolution(),
        preprocess: Preprocess::Resize,
        encoder,
        slot_attention: SlotAttentionConfig {
            num_slots: 7,
            slot_size,
            in_features: slot_size,
            mlp_hidden_size: 2 * slot_size,
            num_iterations: 3,
        },
        unet: UNetConfig {
            in_channels: 3,
            out_channels: 3,
            model_channels: unet_channels,
            channel_mult: vec![1, 2],
            num_res_blocks: 1,
            attention_levels: vec![false, true],
            num_head_channels: 32,
            transformer_depth: 1,
            context_dim: slot_size,
        },
        vqvae: VqVaeConfig {
            in_channels: 3,
            ch: vqvae_channels,
            ch_mult: vec![1, 2, 4],
            num_res_blocks: 1,
            z_channels: 3,
            n_embed: 1024,
            embed_dim: 3,
        },
        schedule: ScheduleConfig::default(),
        sampler: SamplerDefaults::default(),
    })
}

/// The recipe: everything that decides the numbers a run computes (stored beside the
/// checkpoint, so `--resume` continues the same run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    /// Seeds the initial weights and every step's random numbers.
    pub seed: u64,
    /// Scenes per step of stages 1 and 2.
    pub batch: usize,
    /// Steps of the curriculum stage (encoder and Slot Attention, auxiliary loss only).
    #[serde(default)]
    pub slot_steps: u64,
    /// Scenes per step of the curriculum stage (its steps are cheap; bigger batches help).
    #[serde(default)]
    pub slot_batch: usize,
    /// Steps of stage 1 (VQ-VAE).
    pub vqvae_steps: u64,
    /// Steps of stage 2 (encoder, Slot Attention, UNet).
    pub steps: u64,
    /// Peak learning rate of stage 1.
    pub vqvae_lr: f64,
    /// Peak learning rate of stage 2.
    pub lr: f64,
    /// Linear warmup steps at the start of each stage.
    pub warmup: u64,
    /// Global gradient-norm clipping (0: none).
    pub clip: f64,
    /// Weight of the auxiliary colour-field reconstruction in stage 2 (0: denoising only).
    pub aux_weight: f64,
    /// Weight of the instance-mask supervision in the curriculum and stage 2 (0: none, the
    /// paper's unsupervised grouping).
    #[serde(default)]
    pub mask_weight: f64,
    /// How much more a feature cell covered by objects weighs in the mask supervision than
    /// one of background (1: every cell the same); FG-ARI scores the objects' cells only.
    #[serde(default = "one")]
    pub mask_foreground_weight: f64,
    /// The checkpoint folder of another run (or a served model folder) whose variables this
    /// run starts from (same model configuration), instead of seeded random ones.
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    /// The checkpoint folder of a run whose VQ-VAE this run takes (after `init_from`): the
    /// paper trains the VQ-VAE once and reuses it.
    #[serde(default)]
    pub vqvae_from: Option<PathBuf>,
    /// The checkpoint folder of a run whose UNet this run takes (after `init_from`): a warm
    /// start for a UNet on a new grouping or VQ-VAE, whose other parts may be configured
    /// differently.
    #[serde(default)]
    pub unet_from: Option<PathBuf>,
    /// Stage 2 trains the UNet alone, on the slots of the encoder and Slot Attention as they
    /// start (no auxiliary losses): for a run whose grouping was trained already, with no
    /// backward pass through the encoder (1.2–1.3× the steps per second of the default model).
    #[serde(default)]
    pub freeze_grouping: bool,
    /// Min-SNR weighting of stage 2's denoising loss with this γ (0: the official
    /// unweighted loss); see [`losses::DenoiseRecipe`].
    #[serde(default)]
    pub min_snr_gamma: f64,
    /// Decay of the moving average of the weights each stage trains, which the exported
    /// model holds instead of the live weights (0: no average, the live weights).
    #[serde(default)]
    pub ema_decay: f64,
    /// How each stage's learning rate moves after its warmup.
    #[serde(default)]
    pub lr_schedule: LrSchedule,
}

/// The serde default of a weight that was added after runs were checkpointed without it.
fn one() -> f64 {
    1.0
}

/// How a stage's learning rate moves after its warmup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// It stays at the peak (the official recipe).
    #[default]
    Constant,
    /// It falls along a half cosine to zero at the stage's last step.
    Cosine,
}

impl TrainOptions {
    /// Total steps of all stages.
    pub fn total_steps(&self) -> u64 {
        self.slot_steps + self.vqvae_steps + self.steps
    }

    /// Steps of `stage`.
    fn steps_of(&self, stage: Stage) -> u64 {
        match stage {
            Stage::Slots => self.slot_steps,
            Stage::VqVae => self.vqvae_steps,
            Stage::Diffusion => self.steps,
        }
    }

    /// Scenes per step in `stage`.
    pub fn batch_at(&self, stage: Stage) -> usize {
        match stage {
            Stage::Slots => self.slot_batch,
            Stage::VqVae | Stage::Diffusion => self.batch,
        }
    }

    /// The stage step `step` (0-based) belongs to.
    pub fn stage_at(&self, step: u64) -> Stage {
        if step < self.slot_steps {
            Stage::Slots
        } else if step < self.slot_steps + self.vqvae_steps {
            Stage::VqVae
        } else {
            Stage::Diffusion
        }
    }

    /// Weight of the colour-field reconstruction in `stage`: 1 in the curriculum, where it is
    /// the main loss, `aux_weight` beside the denoising loss.
    fn colour_weight(&self, stage: Stage) -> f64 {
        match stage {
            Stage::Slots => 1.0,
            Stage::VqVae | Stage::Diffusion => self.aux_weight,
        }
    }

    /// Whether stage `stage` keeps the encoder and Slot Attention as they are.
    fn grouping_frozen(&self, stage: Stage) -> bool {
        stage == Stage::Diffusion && self.freeze_grouping
    }

    /// Stage 2's departures from the official denoising loss.
    fn denoise(&self) -> DenoiseRecipe {
        DenoiseRecipe { frozen_grouping: self.freeze_grouping, min_snr_gamma: self.min_snr_gamma }
    }

    /// Whether variable `name` is trained in `stage`.
    fn trains(&self, stage: Stage, name: &str) -> bool {
        stage.trains(name) && (!self.grouping_frozen(stage) || name.starts_with(UNET_PREFIX))
    }

    /// The auxiliaries stage `stage` computes (none on a frozen grouping: nothing they
    /// would train).
    fn auxiliaries<'a>(&self, stage: Stage, colour: &'a AuxDecoder) -> Auxiliaries<'a> {
        if self.grouping_frozen(stage) {
            return Auxiliaries { colour: None, masks: None };
        }
        let colour = (self.colour_weight(stage) > 0.0).then_some(colour);
        let masks = (self.mask_weight > 0.0).then_some(self.mask_foreground_weight);
        Auxiliaries { colour, masks }
    }

    /// `base` (stage 2's denoising loss) plus the weighted auxiliary losses of `stage`.
    fn total_loss(
        &self,
        stage: Stage,
        base: Option<Tensor>,
        aux: &GroupingLosses,
    ) -> anyhow::Result<Tensor> {
        let terms = [
            base,
            aux.colour.as_ref().map(|c| c * self.colour_weight(stage)).transpose()?,
            aux.masks.as_ref().map(|m| m * self.mask_weight).transpose()?,
        ];
        let mut terms = terms.into_iter().flatten();
        let first = terms.next().context("a step with no loss")?;
        Ok(terms.try_fold(first, |sum, t| sum + t)?)
    }

    fn adam(&self, stage: Stage) -> AdamConfig {
        let lr = match stage {
            Stage::VqVae => self.vqvae_lr,
            Stage::Slots | Stage::Diffusion => self.lr,
        };
        let cfg = AdamConfig::new(lr, self.warmup, (self.clip > 0.0).then_some(self.clip));
        match self.lr_schedule {
            LrSchedule::Constant => cfg,
            LrSchedule::Cosine => cfg.with_cosine_decay(self.steps_of(stage)),
        }
    }
}

/// The training stages, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    /// Curriculum: encoder and Slot Attention through the auxiliary reconstruction alone.
    Slots,
    /// VQ-VAE alone.
    VqVae,
    /// Encoder, Slot Attention and UNet on the frozen VQ-VAE.
    Diffusion,
}

impl Stage {
    /// Whether variable `name` is trained in this stage.
    fn trains(self, name: &str) -> bool {
        let vq = name.starts_with(VQVAE_PREFIX);
        match self {
            Self::Slots => !vq && !name.starts_with(UNET_PREFIX),
            Self::VqVae => vq,
            Self::Diffusion => !vq,
        }
    }
}

/// The losses and speed of one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// The step just taken (0-based).
    pub step: u64,
    /// Its stage.
    pub stage: Stage,
    /// The optimised loss.
    pub loss: f64,
    /// Curriculum: colour-field loss; stage 1: reconstruction MSE; stage 2: the denoising loss.
    pub main: f64,
    /// Curriculum: 0; stage 1: quantization loss; stage 2: colour-field loss.
    pub extra: f64,
    /// The mask supervision loss (unweighted; 0 when off or in stage 1).
    pub masks: f64,
    /// Stage 1: codebook entries used by the batch; stage 2: 0.
    pub codes: usize,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
}

/// What [`Trainer::save`] writes beside the tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedState {
    /// Steps taken.
    step: u64,
    /// The stage the optimizer moments belong to.
    stage: Stage,
    options: TrainOptions,
    config: ModelConfig,
    scenes: SceneConfig,
}

/// A training run in memory: model, variables, optimizer, weight average and step counter.
pub struct Trainer {
    model: SlotDiffusion,
    vars: VarMap,
    aux: AuxDecoder,
    optim: Adam,
    /// The average of the current stage's variables, from its first step taken (with
    /// `ema_decay > 0`).
    ema: Option<Ema>,
    stage: Stage,
    step: u64,
    options: TrainOptions,
    scenes: SceneConfig,
}

impl Trainer {
    /// A fresh run: seeded random weights for `config`, step 0.
    pub fn new(
        config: ModelConfig,
        options: TrainOptions,
        scenes: SceneConfig,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let vars = VarMap::new();
        let model = SlotDiffusion::trainable(&config, options.seed, &vars, device)?;
        let vb = seeded_var_builder(&vars, options.seed, DType::F32, device);
        let aux = AuxDecoder::new(vb.pp(AUX_PREFIX), config.slot_size())?;
        let stage = options.stage_at(0);
        let optim = Adam::new(trained_vars(&vars, &options, stage), options.adam(stage))?;
        Ok(Self { model, vars, aux, optim, ema: None, stage, step: 0, options, scenes })
    }

    /// Replaces the variables whose names start with `prefix` (`""`: all of them) with their
    /// values in `dir`, the checkpoint folder of another run of the same configuration or a
    /// served model folder such as `weights/` (the step counter and optimizer stay fresh). A
    /// model folder holds no training-only head, so those keep their seeded values: the
    /// committed model is the one starting point that outlives a machine's `out/`.
    ///
    /// A deeper ResNet than the source's grows: the blocks appended to a stage start as
    /// identities (their last norm's scale zero), so the run starts from the source's function.
    /// Returns the grown blocks' names. Any other variable missing on either side is an error.
    pub fn initialise_from(&mut self, dir: &Path, prefix: &str) -> anyhow::Result<Vec<String>> {
        let from_model = !dir.join(VARS_FILE).exists() && dir.join(WEIGHTS_FILE).exists();
        let path = dir.join(if from_model { WEIGHTS_FILE } else { VARS_FILE });
        let saved = candle_core::safetensors::load(&path, self.model.device())
            .with_context(|| format!("cannot start from {}", path.display()))?;
        let data = self.vars.data().lock().map_err(|_| anyhow::anyhow!("var map poisoned"))?;
        let wanted =
            |name: &str| name.starts_with(prefix) && !(from_model && name.starts_with(AUX_PREFIX));
        let mut grown = BTreeSet::new();
        for (name, var) in data.iter().filter(|(name, _)| wanted(name)) {
            if let Some(value) = saved.get(name) {
                var.set(value).with_context(|| format!("variable {name} of {}", path.display()))?;
                continue;
            }
            let block = appended_block(name, &saved)
                .with_context(|| format!("{} has no variable {name}", path.display()))?;
            if name.ends_with(".bn2.weight") {
                var.set(&var.zeros_like()?)?;
            }
            grown.insert(block);
        }
        if let Some(extra) = saved.keys().find(|name| wanted(name) && !data.contains_key(*name)) {
            bail!("{} holds {extra}, which this run's configuration lacks", path.display());
        }
        Ok(grown.into_iter().collect())
    }

    /// Continues the run saved in `dir` exactly where it stopped.
    pub fn resume(dir: &Path, device: &Device) -> anyhow::Result<Self> {
        let path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let saved: SavedState = serde_json::from_str(&text)?;
        let mut trainer = Self::new(saved.config, saved.options, saved.scenes, device)?;
        trainer.vars.load(dir.join(VARS_FILE))?;
        trainer.step = saved.step;
        trainer.stage = saved.stage;
        trainer.optim = Adam::new(
            trained_vars(&trainer.vars, &trainer.options, saved.stage),
            trainer.options.adam(saved.stage),
        )?;
        trainer.optim.load(&dir.join(OPTIM_FILE))?;
        if dir.join(EMA_FILE).exists() {
            let mut ema = trainer.new_ema(saved.stage)?;
            ema.load(&dir.join(EMA_FILE))?;
            trainer.ema = Some(ema);
        }
        Ok(trainer)
    }

    /// Writes the checkpoint (variables, optimizer, step, recipe) and the servable model
    /// (`dir/model/config.json` + `model.safetensors`); each file is written to a temporary
    /// name first, so an interrupted save leaves the previous checkpoint intact.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir.join(MODEL_DIR))?;
        let state = SavedState {
            step: self.step,
            stage: self.stage,
            options: self.options.clone(),
            config: self.model.config().clone(),
            scenes: self.scenes.clone(),
        };
        atomic_write(&dir.join(VARS_FILE), |p| Ok(self.vars.save(p)?))?;
        atomic_write(&dir.join(OPTIM_FILE), |p| Ok(self.optim.save(p)?))?;
        if let Some(ema) = &self.ema {
            atomic_write(&dir.join(EMA_FILE), |p| Ok(ema.save(p)?))?;
        }
        self.export(&dir.join(MODEL_DIR))?;
        atomic_write(&dir.join(STATE_FILE), |p| {
            Ok(std::fs::write(p, serde_json::to_string_pretty(&state)? + "\n")?)
        })
    }

    /// Writes the servable model to `dir`: `config.json` and `model.safetensors` with the
    /// model's tensors only (official names; the auxiliary decoder is left out), the averaged
    /// ones where the run keeps an average.
    pub fn export(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        let data = self.vars.data().lock().map_err(|_| anyhow::anyhow!("var map poisoned"))?;
        let mut tensors: HashMap<String, Tensor> = data
            .iter()
            .filter(|(name, _)| !name.starts_with(AUX_PREFIX))
            .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
            .collect();
        drop(data);
        let averages = self.ema.iter().flat_map(Ema::averages);
        for (name, average) in averages.filter(|(name, _)| !name.starts_with(AUX_PREFIX)) {
            tensors.insert(name.to_string(), average.clone());
        }
        atomic_write(&dir.join(WEIGHTS_FILE), |p| {
            Ok(candle_core::safetensors::save(&tensors, p)?)
        })?;
        self.model.config().save(&dir.join(CONFIG_FILE))
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Whether every step of the recipe is done.
    pub fn is_done(&self) -> bool {
        self.step >= self.options.total_steps()
    }

    /// The recipe.
    pub fn options(&self) -> &TrainOptions {
        &self.options
    }

    /// The model being trained (its weights are the live variables).
    pub fn model(&self) -> &SlotDiffusion {
        &self.model
    }

    /// Takes the next step on its own batch of training scenes.
    pub fn step(&mut self) -> anyhow::Result<StepStats> {
        let batch = self.options.batch_at(self.options.stage_at(self.step));
        let stride = self.options.batch.max(self.options.slot_batch) as u64;
        let scenes = scene_batch(&self.scenes, self.step * stride, batch, self.model.device())?;
        self.step_on(&scenes)
    }

    /// Takes the next step on the given scenes (tests use a fixed batch); the step's random
    /// numbers still come from (seed, step).
    pub fn step_on(&mut self, scenes: &SceneBatch) -> anyhow::Result<StepStats> {
        crate::cpu_runtime::on_compute_pool(|| self.step_here(scenes))
    }

    /// [`step_on`](Self::step_on) on the calling thread.
    fn step_here(&mut self, scenes: &SceneBatch) -> anyhow::Result<StepStats> {
        let stage = self.options.stage_at(self.step);
        if stage != self.stage {
            self.stage = stage;
            let vars = trained_vars(&self.vars, &self.options, stage);
            self.optim = Adam::new(vars, self.options.adam(stage))?;
            self.ema = None;
        }
        if self.ema.is_none() && self.options.ema_decay > 0.0 {
            self.ema = Some(self.new_ema(stage)?);
        }
        let mut rng = step_rng(self.options.seed, self.step);
        let mut restart = None;
        let aux = self.options.auxiliaries(stage, &self.aux);
        let value = |t: &Option<Tensor>| t.as_ref().map_or(Ok(0.0), scalar);
        let (loss, main, extra, masks, codes) = match stage {
            Stage::Slots => {
                let l = slot_losses(&self.model, scenes, aux)?;
                let loss = self.options.total_loss(stage, None, &l)?;
                (loss, value(&l.colour)?, 0.0, value(&l.masks)?, 0)
            }
            Stage::VqVae => {
                let codebook = self.codebook()?;
                let l = vqvae_losses(&self.model, &codebook, &scenes.images)?;
                let (r, q) = (scalar(&l.recon)?, scalar(&l.quant)?);
                let codes = l.used.len();
                if (self.step + 1).is_multiple_of(RESTART_EVERY) {
                    restart = Some(restarted_codebook(&codebook, &l, &mut rng)?);
                }
                ((l.recon + l.quant)?, r, q, 0.0, codes)
            }
            Stage::Diffusion => {
                let l =
                    diffusion_losses(&self.model, scenes, aux, self.options.denoise(), &mut rng)?;
                let d = scalar(&l.denoise)?;
                let (c, m) = (value(&l.grouping.colour)?, value(&l.grouping.masks)?);
                (self.options.total_loss(stage, Some(l.denoise), &l.grouping)?, d, c, m, 0)
            }
        };
        let grads = loss.backward()?;
        let grad_norm = self.optim.step(&grads)?;
        if let Some(ema) = &mut self.ema {
            ema.update()?;
        }
        if let Some(codebook) = restart {
            self.codebook_var()?.set(&codebook)?;
        }
        let stats = StepStats {
            step: self.step,
            stage,
            loss: scalar(&loss)?,
            main,
            extra,
            masks,
            codes,
            grad_norm,
        };
        self.step += 1;
        Ok(stats)
    }

    /// An average of the variables `stage` trains, starting at their current values.
    fn new_ema(&self, stage: Stage) -> candle_core::Result<Ema> {
        Ema::new(trained_vars(&self.vars, &self.options, stage), self.options.ema_decay)
    }

    /// The live codebook [n_embed, embed_dim].
    fn codebook(&self) -> anyhow::Result<Tensor> {
        Ok(self.codebook_var()?.as_tensor().clone())
    }

    /// The codebook variable.
    fn codebook_var(&self) -> anyhow::Result<Var> {
        let name = format!("{VQVAE_PREFIX}.quantize.embedding.weight");
        let data = self.vars.data().lock().map_err(|_| anyhow::anyhow!("var map poisoned"))?;
        Ok(data.get(&name).with_context(|| format!("no variable {name}"))?.clone())
    }
}

/// The variables stage `stage` of the recipe `options` trains, with their names.
fn trained_vars(vars: &VarMap, options: &TrainOptions, stage: Stage) -> Vec<(String, Var)> {
    let data = vars.data().lock().expect("var map lock");
    let trained = data.iter().filter(|(n, _)| options.trains(stage, n));
    trained.map(|(n, v)| (n.clone(), v.clone())).collect()
}

fn scalar(t: &Tensor) -> candle_core::Result<f64> {
    Ok(t.to_scalar::<f32>()? as f64)
}

/// Writes `path` through `write` on `path.tmp`, then renames it into place.
fn atomic_write(
    path: &Path,
    write: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    write(&tmp)?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// `slotserve train`: trains the default model on procedural scenes, checkpointing to
/// `--out` (resume with `--resume`).
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// Checkpoint folder: vars, optimizer, state, the servable model in `model/`, `train.log`.
    #[arg(long, default_value = "out/train")]
    pub out: PathBuf,
    /// Continue the run saved in `--out` (its recipe; the recipe flags below are ignored).
    #[arg(long)]
    pub resume: bool,
    /// Seed of the initial weights and of every step's noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Scenes per step of stages 1 and 2.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Steps of the curriculum stage (encoder and Slot Attention, auxiliary loss only).
    #[arg(long, default_value_t = 0)]
    pub slot_steps: u64,
    /// Scenes per step of the curriculum stage.
    #[arg(long, default_value_t = 32)]
    pub slot_batch: usize,
    /// Steps of stage 1 (VQ-VAE).
    #[arg(long, default_value_t = 800)]
    pub vqvae_steps: u64,
    /// Steps of stage 2 (encoder, Slot Attention, UNet).
    #[arg(long, default_value_t = 20000)]
    pub steps: u64,
    /// Peak learning rate of stage 1.
    #[arg(long, default_value_t = 1e-3)]
    pub vqvae_lr: f64,
    /// Peak learning rate of stage 2.
    #[arg(long, default_value_t = 4e-4)]
    pub lr: f64,
    /// Linear warmup steps of each stage.
    #[arg(long, default_value_t = 200)]
    pub warmup: u64,
    /// Global gradient-norm clipping (0: none).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// Weight of the auxiliary colour-field reconstruction in stage 2 (0: denoising only).
    #[arg(long, default_value_t = 1.0)]
    pub aux_weight: f64,
    /// Weight of the instance-mask supervision of Slot Attention (0: unsupervised grouping).
    #[arg(long, default_value_t = 0.0)]
    pub mask_weight: f64,
    /// How much more the cells that objects cover weigh in the mask supervision than the
    /// background's (1: all the same).
    #[arg(long, default_value_t = 1.0)]
    pub mask_foreground_weight: f64,
    /// Start from the variables of the run checkpointed in this folder, or of a served model
    /// folder such as `weights/` (same model configuration), instead of random ones.
    #[arg(long)]
    pub init_from: Option<PathBuf>,
    /// Then take the VQ-VAE of the run checkpointed (or the model served) from this folder
    /// (e.g. to train stage 2 on a VQ-VAE trained once, as the paper does).
    #[arg(long)]
    pub vqvae_from: Option<PathBuf>,
    /// Then take the UNet of the run checkpointed (or the model served) from this folder (a
    /// warm start, e.g. for a UNet on a new grouping; only the UNets' sizes must agree).
    #[arg(long)]
    pub unet_from: Option<PathBuf>,
    /// Stage 2 trains the UNet alone on the slots of the grouping it starts from (with
    /// `--init-from` a run whose encoder and Slot Attention are trained).
    #[arg(long)]
    pub freeze_grouping: bool,
    /// Min-SNR-γ weighting of the denoising loss (e.g. 5; 0: the official unweighted loss).
    #[arg(long, default_value_t = 0.0)]
    pub min_snr_gamma: f64,
    /// Export the moving average of the weights each stage trains with this decay (e.g.
    /// 0.999: about the last thousand steps), instead of the live weights (0).
    #[arg(long, default_value_t = 0.0)]
    pub ema_decay: f64,
    /// How each stage's learning rate moves after its warmup: `constant` at the peak, or
    /// `cosine` down to zero at the stage's last step.
    #[arg(long, value_enum, default_value_t)]
    pub lr_schedule: LrSchedule,
    /// The encoder of the default model.
    #[arg(long, value_enum, default_value_t = EncoderKind::Vit)]
    pub encoder: EncoderKind,
    /// Side of the encoder's feature grid, the resolution of the slot masks (the ViT's
    /// patches are 64 / this: 16 gives 4×4 patches, 32 gives 2×2; the ResNet has one
    /// stage fewer at 32).
    #[arg(long, default_value_t = 16)]
    pub grid_size: usize,
    /// Depth of the encoder: the ResNet's blocks in its last stage (default 1; each more
    /// widens what a feature sees, by 8 pixels on a 32×32 grid) or the ViT's layers (default
    /// 3). With `--init-from` a shallower ResNet, the blocks it lacks start as identities.
    #[arg(long)]
    pub encoder_depth: Option<usize>,
    /// Slot Attention's iterations (3, the paper's, by default). A grouping trained with 3 can
    /// go on training with more: the weights are shared across iterations.
    #[arg(long, default_value_t = 3)]
    pub slot_iterations: usize,
    /// UNet base width.
    #[arg(long, default_value_t = 64)]
    pub unet_channels: usize,
    /// VQ-VAE base width.
    #[arg(long, default_value_t = 32)]
    pub vqvae_channels: usize,
    /// Seconds between checkpoints.
    #[arg(long, default_value_t = 300)]
    pub checkpoint_secs: u64,
    /// Stop after this many steps in this invocation (0: run to the end), for timing.
    #[arg(long, default_value_t = 0)]
    pub max_steps: u64,
    /// Steps between progress lines.
    #[arg(long, default_value_t = 10)]
    pub log_every: u64,
}

impl TrainArgs {
    fn options(&self) -> TrainOptions {
        TrainOptions {
            seed: self.seed,
            batch: self.batch,
            slot_steps: self.slot_steps,
            slot_batch: self.slot_batch,
            vqvae_steps: self.vqvae_steps,
            steps: self.steps,
            vqvae_lr: self.vqvae_lr,
            lr: self.lr,
            warmup: self.warmup,
            clip: self.clip,
            aux_weight: self.aux_weight,
            mask_weight: self.mask_weight,
            mask_foreground_weight: self.mask_foreground_weight,
            init_from: self.init_from.clone(),
            vqvae_from: self.vqvae_from.clone(),
            unet_from: self.unet_from.clone(),
            freeze_grouping: self.freeze_grouping,
            min_snr_gamma: self.min_snr_gamma,
            ema_decay: self.ema_decay,
            lr_schedule: self.lr_schedule,
        }
    }
}

/// `slotserve train`: runs (or resumes) training, printing and logging progress lines and
/// checkpointing every `--checkpoint-secs` and at the end.
pub fn train(args: &TrainArgs) -> anyhow::Result<()> {
    let device = Device::Cpu;
    let (mut trainer, grown) = if args.resume {
        (Trainer::resume(&args.out, &device)?, Vec::new())
    } else {
        if args.out.join(STATE_FILE).exists() {
            bail!(
                "{} holds a run already: pass --resume, or choose another --out",
                args.out.display()
            );
        }
        ensure!(args.slot_iterations > 0, "Slot Attention needs at least one iteration");
        ensure!(
            args.mask_foreground_weight.is_finite() && args.mask_foreground_weight > 0.0,
            "--mask-foreground-weight must be a positive number, not {}",
            args.mask_foreground_weight
        );
        let mut config = default_config(
            args.encoder,
            args.grid_size,
            args.encoder_depth,
            args.unet_channels,
            args.vqvae_channels,
        )?;
        config.slot_attention.num_iterations = args.slot_iterations;
        let mut trainer = Trainer::new(config, args.options(), SceneConfig::default(), &device)?;
        let mut grown = Vec::new();
        if let Some(dir) = &args.init_from {
            grown = trainer.initialise_from(dir, "")?;
        }
        for (dir, prefix) in [(&args.vqvae_from, VQVAE_PREFIX), (&args.unet_from, UNET_PREFIX)] {
            if let Some(dir) = dir {
                trainer.initialise_from(dir, prefix)?;
            }
        }
        (trainer, grown)
    };
    std::fs::create_dir_all(&args.out)?;
    let mut log =
        std::fs::OpenOptions::new().create(true).append(true).open(args.out.join("train.log"))?;
    let mut say = |line: String| -> anyhow::Result<()> {
        println!("{line}");
        writeln!(log, "{line}")?;
        Ok(())
    };
    say(format!(
        "start at step {} of {} ({:?})",
        trainer.step_count(),
        trainer.options().total_steps(),
        trainer.options()
    ))?;
    if !grown.is_empty() {
        say(format!("grown from --init-from as identities: {}", grown.join(", ")))?;
    }
    let (start, start_step) = (Instant::now(), trainer.step_count());
    let mut last_save = Instant::now();
    let mut taken = 0;
    let stop = stop_on_signal()?;
    while !trainer.is_done()
        && (args.max_steps == 0 || taken < args.max_steps)
        && !stop.load(Ordering::SeqCst)
    {
        let stats = trainer.step()?;
        taken += 1;
        if taken % args.log_every.max(1) == 0 {
            say(progress_line(&stats, &trainer, start.elapsed().as_secs_f64(), start_step))?;
        }
        if last_save.elapsed().as_secs() >= args.checkpoint_secs {
            trainer.save(&args.out)?;
            last_save = Instant::now();
            say(format!("checkpoint at step {}", trainer.step_count()))?;
        }
    }
    trainer.save(&args.out)?;
    say(format!("checkpoint at step {} (stopped)", trainer.step_count()))
}

/// The block `encoder.layerS.J` (J ≥ 1) that `name` belongs to, when `saved` holds that ResNet
/// stage's first block and nothing of block `J`: a block appended to a trained stage.
fn appended_block(name: &str, saved: &HashMap<String, Tensor>) -> Option<String> {
    let rest = name.strip_prefix("encoder.layer")?;
    let mut parts = rest.splitn(3, '.');
    let (stage, index) = (parts.next()?, parts.next()?.parse::<usize>().ok()?);
    parts.next()?;
    let block = format!("encoder.layer{stage}.{index}");
    let has = |p: &str| saved.keys().any(|k| k.starts_with(p));
    (index > 0 && has(&format!("encoder.layer{stage}.0.")) && !has(&format!("{block}.")))
        .then_some(block)
}

/// A flag raised by the first SIGINT or SIGTERM, on which training saves its checkpoint after
/// the current step and ends (nothing since the last checkpoint is lost); a second signal ends
/// the process at once.
fn stop_on_signal() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        // registered first, so that it sees the flag the first signal raised only on the second
        signal_hook::flag::register_conditional_shutdown(signal, 128 + signal, Arc::clone(&stop))?;
        signal_hook::flag::register(signal, Arc::clone(&stop))?;
    }
    Ok(stop)
}

/// `step 1200/21500 [diffusion] loss 0.1234 (0.1000 + 0.0234) |g| 0.8 · 0.95 steps/s · ETA 5h 57m`
fn progress_line(stats: &StepStats, trainer: &Trainer, elapsed: f64, start_step: u64) -> String {
    let done = trainer.step_count();
    let total = trainer.options().total_steps();
    let rate = (done - start_step) as f64 / elapsed.max(1e-9);
    let eta = (total.saturating_sub(done) as f64 / rate.max(1e-9)) as u64;
    let codes = match stats.stage {
        Stage::VqVae => format!(" codes {}", stats.codes),
        Stage::Slots | Stage::Diffusion if trainer.options().mask_weight > 0.0 => {
            format!(" masks {:.4}", stats.masks)
        }
        Stage::Slots | Stage::Diffusion => String::new(),
    };
    format!(
        "step {done}/{total} [{:?}] loss {:.5} ({:.5} + {:.5}){codes} |g| {:.3} · {rate:.3} steps/s · ETA {}h {:02}m",
        stats.stage,
        stats.loss,
        stats.main,
        stats.extra,
        stats.grad_norm,
        eta / 3600,
        eta % 3600 / 60
    )
}
