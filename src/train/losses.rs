//! The training losses: the VQ-VAE's (stage 1), the latent denoising loss of SlotDiffusion
//! (stage 2) and the optional auxiliaries on slots and masks: a cheap colour-field
//! reconstruction and the instance-mask supervision of [`supervision`].

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::data::{scene_seed, Scene, SceneConfig, Split};
use crate::model::encoder::position_grid;
use crate::model::pipeline::SlotDiffusion;
use crate::train::supervision;

/// Weight of the commitment term (`beta` of the official quantizer).
pub const COMMITMENT: f64 = 0.25;

/// Prefix of the auxiliary decoder's variables: trained beside the model, never served.
pub const AUX_PREFIX: &str = "aux";

/// A batch of training scenes.
#[derive(Debug, Clone)]
pub struct SceneBatch {
    /// Images [B, 3, H, W] in [-1, 1].
    pub images: Tensor,
    /// Each scene's label map [H, W] (0 = background), for mask supervision.
    pub labels: Vec<Vec<u32>>,
}

/// The training scenes `first..first + batch`.
pub fn scene_batch(
    cfg: &SceneConfig,
    first: u64,
    batch: usize,
    device: &Device,
) -> Result<SceneBatch> {
    let mut data = Vec::with_capacity(batch * 3 * cfg.width * cfg.height);
    let mut labels = Vec::with_capacity(batch);
    for i in 0..batch as u64 {
        let rendered = Scene::generate(cfg, scene_seed(Split::Train, first + i)).render();
        data.extend(rendered.image_chw().into_iter().map(|v| v * 2.0 - 1.0));
        labels.push(rendered.labels);
    }
    let images = Tensor::from_vec(data, (batch, 3, cfg.height, cfg.width), device)?;
    Ok(SceneBatch { images, labels })
}

/// The random numbers of one training step, all drawn from `rng`.
pub fn step_rng(seed: u64, step: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(step);
    rng
}

/// Steps between restarts of the codebook entries a batch leaves unused.
pub const RESTART_EVERY: u64 = 25;

/// What the VQ-VAE stage computes on a batch.
#[derive(Debug)]
pub struct VqLosses {
    /// Reconstruction MSE.
    pub recon: Tensor,
    /// Quantization loss.
    pub quant: Tensor,
    /// The codebook entries the batch used, ascending.
    pub used: Vec<u32>,
    /// The encoder's latent vectors [N, c] (no gradient), candidates for restarts.
    pub latents: Tensor,
}

/// The VQ-VAE losses of one batch. Quantization uses `codebook` [n, c] (the live variable,
/// as the model's copy of its squared norms is stale during training) with the
/// straight-through estimator; the quantization loss is `‖sg(z) − e‖² + β‖z − sg(e)‖²` as in
/// the official VQ-VAE (taming's quantizer).
pub fn vqvae_losses(model: &SlotDiffusion, codebook: &Tensor, images: &Tensor) -> Result<VqLosses> {
    let z = model.vqvae().encode(images)?;
    let (b, c, h, w) = z.dims4()?;
    let flat = z.permute((0, 2, 3, 1))?.reshape((b * h * w, c))?;
    let dist = flat
        .detach()
        .sqr()?
        .sum_keepdim(1)?
        .broadcast_add(&codebook.detach().sqr()?.sum_keepdim(1)?.t()?)?
        .broadcast_sub(&(flat.detach().matmul(&codebook.detach().t()?)? * 2.0)?)?;
    let idx = dist.argmin(1)?;
    let e = codebook.index_select(&idx, 0)?;
    let codebook_loss = (flat.detach() - &e)?.sqr()?.mean_all()?;
    let commit_loss = (&flat - e.detach())?.sqr()?.mean_all()?;
    let quant_loss = (codebook_loss + (commit_loss * COMMITMENT)?)?;
    // straight-through: the value of e, the gradient of z
    let st = (&flat + (e - &flat)?.detach())?;
    let st = st.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()?;
    let recon = model.vqvae().decode_quantized(&st)?;
    let mut used = idx.to_vec1::<u32>()?;
    used.sort_unstable();
    used.dedup();
    let recon = (recon - images)?.sqr()?.mean_all()?;
    Ok(VqLosses { recon, quant: quant_loss, used, latents: flat.detach() })
}

/// `codebook` with every entry the batch left unused moved onto one of the batch's latent
/// vectors, drawn from `rng` (dead-code restarts: without them a 1024-entry book of a small
/// VQ-VAE settles on a few dozen codes).
pub fn restarted_codebook(
    codebook: &Tensor,
    losses: &VqLosses,
    rng: &mut ChaCha8Rng,
) -> Result<Tensor> {
    let (n, c) = codebook.dims2()?;
    let latents = losses.latents.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let mut book = codebook.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut used = losses.used.iter().peekable();
    for code in 0..n as u32 {
        if used.next_if_eq(&&code).is_none() {
            let source = &latents[rng.random_range(0..latents.len())];
            book[code as usize * c..][..c].copy_from_slice(source);
        }
    }
    Tensor::from_vec(book, (n, c), codebook.device())?.to_dtype(codebook.dtype())
}

/// Which auxiliary losses of the grouping (slots and masks) a step computes.
#[derive(Debug, Clone, Copy)]
pub struct Auxiliaries<'a> {
    /// The colour-field reconstruction, through this decoder.
    pub colour: Option<&'a AuxDecoder>,
    /// The instance-mask supervision ([`supervision::mask_loss`]), with this weight on the
    /// cells objects cover.
    pub masks: Option<f64>,
}

/// The auxiliary losses of one batch's grouping; `None` where not asked for.
#[derive(Debug)]
pub struct GroupingLosses {
    /// The colour-field reconstruction MSE.
    pub colour: Option<Tensor>,
    /// The matched mask cross-entropy.
    pub masks: Option<Tensor>,
}

impl GroupingLosses {
    /// The auxiliary losses of `slots` [B, K, D] and `masks` [B, K, N] on `batch`.
    fn of(
        model: &SlotDiffusion,
        batch: &SceneBatch,
        slots: &Tensor,
        masks: &Tensor,
        aux: Auxiliaries,
    ) -> Result<Self> {
        let (_, _, h, w) = batch.images.dims4()?;
        let grid = model.encoder().grid(h, w);
        let colour = match aux.colour {
            Some(decoder) => Some(decoder.loss(slots, masks, &batch.images, grid)?),
            None => None,
        };
        let masks = match aux.masks {
            Some(foreground_weight) => {
                Some(supervision::mask_loss(masks, &batch.labels, (h, w), grid, foreground_weight)?)
            }
            None => None,
        };
        Ok(Self { colour, masks })
    }
}

/// The curriculum stage's losses: the auxiliaries on the image's own slots and masks (no
/// VQ-VAE, no UNet).
pub fn slot_losses(
    model: &SlotDiffusion,
    batch: &SceneBatch,
    aux: Auxiliaries,
) -> Result<GroupingLosses> {
    let features = model.encoder().forward(&batch.images)?;
    let (slots, masks) = model.slot_attention().forward(&features, None)?;
    GroupingLosses::of(model, batch, &slots, &masks, aux)
}

/// How stage 2's denoising loss departs from the official one, if at all
/// (`DenoiseRecipe::default()`: it does not).
#[derive(Debug, Clone, Copy, Default)]
pub struct DenoiseRecipe {
    /// The slots and masks are constants: no gradient flows back into the encoder and Slot
    /// Attention (a run that trains the UNet alone on a trained grouping).
    pub frozen_grouping: bool,
    /// Min-SNR weighting (Hang et al., 2023): each sample's squared error is weighted by
    /// `min(SNR_t, γ) / SNR_t`, which takes weight off the nearly noise-free steps and so
    /// spends the gradient on the image's layout first; 0 weighs every step alike (official).
    pub min_snr_gamma: f64,
}

/// What stage 2 computes on a batch.
#[derive(Debug)]
pub struct DiffusionLosses {
    /// The official denoising loss: MSE between the UNet's ε and the true noise.
    pub denoise: Tensor,
    /// The auxiliary losses on the same slots and masks.
    pub grouping: GroupingLosses,
}

/// `LDM.loss_function`: x0 = VQ-VAE latent (no gradient), per-sample t uniform in
/// [0, T), x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε, loss = MSE(UNet(x_t, t, slots), ε); slots from
/// the image's own encoding; also the asked-for auxiliary losses on the same slots and masks.
/// `recipe` may depart from the official loss (see [`DenoiseRecipe`]).
pub fn diffusion_losses(
    model: &SlotDiffusion,
    batch: &SceneBatch,
    aux: Auxiliaries,
    recipe: DenoiseRecipe,
    rng: &mut ChaCha8Rng,
) -> Result<DiffusionLosses> {
    let images = &batch.images;
    let device = images.device();
    let x0 = model.vqvae().encode(images)?.detach();
    let (b, c, h, w) = x0.dims4()?;
    let features = model.encoder().forward(images)?;
    let (mut slots, mut masks) = model.slot_attention().forward(&features, None)?;
    if recipe.frozen_grouping {
        (slots, masks) = (slots.detach(), masks.detach());
    }
    let schedule = model.schedule();
    let steps: Vec<usize> = (0..b).map(|_| rng.random_range(0..schedule.timesteps())).collect();
    let noise: Vec<f32> = (0..b * c * h * w).map(|_| StandardNormal.sample(rng)).collect();
    let dtype = x0.dtype();
    let noise = Tensor::from_vec(noise, (b, c, h, w), device)?.to_dtype(dtype)?;
    let coef = |f: &dyn Fn(f32) -> f32| {
        let v: Vec<f32> = steps.iter().map(|&t| f(schedule.alphas_bar[t])).collect();
        Tensor::from_vec(v, (b, 1, 1, 1), device)?.to_dtype(dtype)
    };
    let x_t = (x0.broadcast_mul(&coef(&|a| a.sqrt())?)?
        + noise.broadcast_mul(&coef(&|a| (1.0 - a).sqrt())?)?)?;
    let t = Tensor::from_vec(steps.iter().map(|&t| t as f32).collect::<Vec<_>>(), b, device)?;
    let eps = model.unet().forward(&x_t, &t, &slots)?;
    let squared = (eps - noise)?.sqr()?;
    let denoise = match recipe.min_snr_gamma {
        gamma if gamma > 0.0 => {
            let weight = coef(&|a| {
                let snr = a / (1.0 - a);
                snr.min(gamma as f32) / snr
            })?;
            squared.broadcast_mul(&weight)?.mean_all()?
        }
        _ => squared.mean_all()?,
    };
    let grouping = GroupingLosses::of(model, batch, &slots, &masks, aux)?;
    Ok(DiffusionLosses { denoise, grouping })
}

/// A cheap auxiliary decoder that helps objects separate early: each slot predicts an affine
/// colour field (3 colours × [1, x, y]) and the image at the feature-grid resolution is the
/// slot-attention-mask-weighted sum of the fields. Its gradient reaches the encoder and Slot
/// Attention only through slots and masks; it is not part of the served model.
#[derive(Debug, Clone)]
pub struct AuxDecoder {
    head: Linear,
}

impl AuxDecoder {
    /// The decoder for slots of width `slot_size`, variables under `vb` (e.g. `aux`).
    ///
    /// The head starts at zero, so the first fields are flat black: with random weights the
    /// fields of raw slots are large, and the first steps' huge loss drives the encoder's
    /// features to a constant, after which every slot attends uniformly and never recovers.
    pub fn new(vb: VarBuilder, slot_size: usize) -> Result<Self> {
        let vb = vb.pp("color");
        let weight = vb.get_with_hints((9, slot_size), "weight", candle_nn::Init::Const(0.0))?;
        let bias = vb.get_with_hints(9, "bias", candle_nn::Init::Const(0.0))?;
        Ok(Self { head: Linear::new(weight, Some(bias)) })
    }

    /// MSE between the mixture of colour fields and the images average-pooled to `grid`.
    /// `slots` [B, K, D], `masks` [B, K, N] (N = grid cells), `images` [B, 3, H, W].
    pub fn loss(
        &self,
        slots: &Tensor,
        masks: &Tensor,
        images: &Tensor,
        grid: (usize, usize),
    ) -> Result<Tensor> {
        let (b, k, _) = slots.dims3()?;
        let (_, _, h, w) = images.dims4()?;
        let target = images.avg_pool2d((h / grid.0, w / grid.1))?; // [B, 3, gh, gw]
        let target = target.flatten_from(2)?.transpose(1, 2)?; // [B, N, 3]
        let n = grid.0 * grid.1;
        // basis [N, 3]: 1, x, y with x, y in [-1, 1]
        let pos = position_grid(grid.0, grid.1, images.device())?.to_dtype(DType::F32)?;
        let yx = ((pos.narrow(1, 0, 2)? * 2.0)? - 1.0)?;
        let basis = Tensor::cat(&[Tensor::ones((n, 1), DType::F32, images.device())?, yx], 1)?;
        let params = self.head.forward(slots)?.reshape((b, k, 3, 3))?; // [B, K, basis, rgb]
        let fields = basis.broadcast_left((b, k))?.contiguous()?.matmul(&params)?; // [B, K, N, 3]
        let mixed = fields.broadcast_mul(&masks.unsqueeze(D::Minus1)?)?.sum(1)?; // [B, N, 3]
        (mixed - target)?.sqr()?.mean_all()
    }
}
