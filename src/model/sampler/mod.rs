//! The diffusion samplers of SlotDiffusion's latent decoder, as per-sample state machines.
//!
//! A server batches requests that are each at their own point of their own schedule, so a
//! sampler never calls the model itself: a [`SamplerState`] says what latent and UNet timestep
//! its next evaluation needs ([`SamplerState::next_input`]), and is then handed the model's ε
//! for that input. One UNet forward can serve the stacked inputs of any set of states;
//! [`step_batch`] and [`sample`] do exactly that. Every x0 prediction goes through a `snap`
//! function, the official `vq_denoised` step (nearest VQ codebook entry), which is also batched.
//!
//! Samplers ([`SamplerKind`]): DPM-Solver++ (the official evaluation sampler, 20 evaluations),
//! DDIM (η = 0) and ancestral DDPM (all T steps, seeded per sample). Every state computes in
//! f32 whatever the dtype of its inputs; its result ([`SamplerState::final_latent`]) is the final
//! latent before quantization, as the official `generate_imgs` returns it (the VQ-VAE decode
//! quantizes first).

mod ddim;
mod ddpm;
mod dpm_solver;
pub mod schedule;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::{bail, DType, Device, Result, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

pub use schedule::{NoiseSchedule, ScheduleConfig};

/// Which sampler turns noise into a latent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SamplerKind {
    /// Singlestep DPM-Solver++ of order 3, time-uniform (the official evaluation sampler).
    #[serde(rename = "dpm-solver++")]
    DpmSolverPP,
    /// Deterministic DDIM (η = 0) on the official uniform timestep grid.
    #[serde(rename = "ddim")]
    Ddim,
    /// Ancestral DDPM over all T steps.
    #[serde(rename = "ddpm")]
    Ddpm,
}

impl SamplerKind {
    /// Every kind, for listings and help texts.
    pub const ALL: [SamplerKind; 3] = [Self::DpmSolverPP, Self::Ddim, Self::Ddpm];

    /// The name used in configs, requests and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::DpmSolverPP => "dpm-solver++",
            Self::Ddim => "ddim",
            Self::Ddpm => "ddpm",
        }
    }

    /// The official number of model evaluations for T training steps: DPM-Solver++
    /// max(20, T/50), DDIM max(200, T/5), DDPM T (`cond_ddpm.py::generate_imgs`).
    pub fn default_steps(self, timesteps: usize) -> usize {
        match self {
            Self::DpmSolverPP => (timesteps / 50).max(20),
            Self::Ddim => (timesteps / 5).max(200),
            Self::Ddpm => timesteps,
        }
    }
}

impl fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SamplerKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
            format!("unknown sampler `{s}` (expected one of {})", names.join(", "))
        })
    }
}

/// What every sampler's per-sample state machine does; [`SamplerState`] wraps one.
trait Solver: Send {
    /// The UNet timestep input of the next evaluation, `None` once finished.
    fn model_time(&self) -> Option<f32>;
    /// The latent the next evaluation takes, or the final latent once finished.
    fn latent(&self) -> &Tensor;
    /// x0 predicted from ε for the current input (before snapping).
    fn predict_x0(&self, eps: &Tensor) -> Result<Tensor>;
    /// Moves on with ε and the snapped x0 of the current evaluation.
    fn accept(&mut self, eps: &Tensor, x0: &Tensor) -> Result<()>;
    /// (evaluations done, evaluations in all).
    fn progress(&self) -> (usize, usize);
}

/// x · c (a scalar coefficient), in the latent's dtype.
fn scale(x: &Tensor, c: f32) -> Result<Tensor> {
    x.affine(f64::from(c), 0.0)
}

/// x / c, a true division (not a multiplication by 1/c) as the official code does.
fn divide(x: &Tensor, c: f32) -> Result<Tensor> {
    x.broadcast_div(&Tensor::new(c, x.device())?)
}

/// Standard normal f32 noise of shape `dims` drawn from `rng` in row-major order.
fn gaussian(rng: &mut ChaCha8Rng, dims: &[usize], device: &Device) -> Result<Tensor> {
    let n = dims.iter().product();
    let values: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Tensor::from_vec(values, dims, device)
}

/// Reproducible starting noise x_T for one sample: standard normal f32 values of shape `dims`
/// from ChaCha8 seeded with `seed` (stream 0; DDPM's step noise uses another stream).
pub fn gaussian_noise(dims: &[usize], seed: u64, device: &Device) -> Result<Tensor> {
    gaussian(&mut ChaCha8Rng::seed_from_u64(seed), dims, device)
}

/// Starts per-sample sampler runs over one noise schedule (shared, read-only).
#[derive(Debug, Clone)]
pub struct Sampler {
    schedule: Arc<NoiseSchedule>,
}

impl Sampler {
    /// A sampler over the schedule described by `cfg`.
    pub fn new(cfg: &ScheduleConfig) -> Result<Self> {
        Ok(Self { schedule: Arc::new(NoiseSchedule::new(cfg)?) })
    }

    /// The noise schedule.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// Starts one sample from the noise `x_t` ([C, h, w] or [1, C, h, w]) with `steps` model
    /// evaluations (`None`: the official count, [`SamplerKind::default_steps`]). `seed` feeds
    /// DDPM's per-step noise and is ignored by the deterministic samplers. DDPM always runs
    /// all T steps; DDIM may run a few more than asked, as the official `range(0, T, T / steps)`
    /// grid does, and refuses the counts whose grid would run past the schedule.
    pub fn start(
        &self,
        kind: SamplerKind,
        steps: Option<usize>,
        x_t: &Tensor,
        seed: u64,
    ) -> Result<SamplerState> {
        let x = match x_t.rank() {
            3 => x_t.unsqueeze(0)?,
            4 if x_t.dim(0)? == 1 => x_t.clone(),
            _ => bail!(
                "sampler start: expected x_T of shape [C, h, w] or [1, C, h, w], got {:?}",
                x_t.dims()
            ),
        }
        .to_dtype(DType::F32)?;
        let ns = &self.schedule;
        let steps = steps.unwrap_or_else(|| kind.default_steps(ns.timesteps()));
        let solver: Box<dyn Solver> = match kind {
            SamplerKind::DpmSolverPP => Box::new(dpm_solver::DpmSolver::new(ns, steps, x)?),
            SamplerKind::Ddim => Box::new(ddim::Ddim::new(ns, steps, x)?),
            SamplerKind::Ddpm if steps == ns.timesteps() => Box::new(ddpm::Ddpm::new(ns, x, seed)),
            SamplerKind::Ddpm => {
                bail!("DDPM runs all {} steps, got steps = {steps}", ns.timesteps())
            }
        };
        Ok(SamplerState { kind, solver, eps: None })
    }
}

/// One sample's sampler run: where it is in its schedule and what its next model evaluation
/// needs. Drive it with [`next_input`](Self::next_input) and then either
/// [`advance`](Self::advance), or [`predict_x0`](Self::predict_x0) followed by
/// [`accept_x0`](Self::accept_x0) when the snapping is batched across samples.
pub struct SamplerState {
    kind: SamplerKind,
    solver: Box<dyn Solver>,
    eps: Option<Tensor>,
}

impl fmt::Debug for SamplerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SamplerState")
            .field("kind", &self.kind)
            .field("step", &self.step())
            .field("total_evals", &self.total_evals())
            .finish()
    }
}

impl SamplerState {
    /// Which sampler this run uses.
    pub fn kind(&self) -> SamplerKind {
        self.kind
    }

    /// Model evaluations completed so far (for progress reports).
    pub fn step(&self) -> usize {
        self.solver.progress().0
    }

    /// Model evaluations this run takes in all.
    pub fn total_evals(&self) -> usize {
        self.solver.progress().1
    }

    /// Whether every evaluation is done ([`final_latent`](Self::final_latent) may be called).
    pub fn is_done(&self) -> bool {
        self.solver.model_time().is_none()
    }

    /// The latent [1, C, h, w] (f32) and UNet timestep input of the next model evaluation, or
    /// `None` when the run is finished.
    pub fn next_input(&self) -> Option<(Tensor, f32)> {
        self.solver.model_time().map(|t| (self.solver.latent().clone(), t))
    }

    /// First half of a step: x0 predicted from the model's ε for [`next_input`](Self::next_input),
    /// not yet snapped. Remembers ε for [`accept_x0`](Self::accept_x0).
    pub fn predict_x0(&mut self, eps: &Tensor) -> Result<Tensor> {
        let latent = self.solver.latent();
        let eps = eps.to_dtype(DType::F32)?.reshape(latent.shape())?;
        let x0 = self.solver.predict_x0(&eps)?;
        self.eps = Some(eps);
        Ok(x0)
    }

    /// Second half of a step: moves on with the snapped x0 ([1, C, h, w] or [C, h, w]).
    pub fn accept_x0(&mut self, x0: &Tensor) -> Result<()> {
        let Some(eps) = self.eps.take() else {
            bail!("accept_x0 called without predict_x0 for this evaluation");
        };
        let x0 = x0.to_dtype(DType::F32)?.reshape(eps.shape())?;
        self.solver.accept(&eps, &x0)
    }

    /// A whole step: consumes the model's ε for [`next_input`](Self::next_input), snapping the
    /// x0 prediction with `snap` (the VQ codebook quantizer; identity to skip it).
    pub fn advance(
        &mut self,
        eps: &Tensor,
        snap: &dyn Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<()> {
        let x0 = self.predict_x0(eps)?;
        self.accept_x0(&snap(&x0)?)
    }

    /// The final latent [1, C, h, w] (f32, before quantization), once the run is done.
    pub fn final_latent(&self) -> Result<Tensor> {
        if !self.is_done() {
            bail!(
                "sampler run finished after {} of {} evaluations",
                self.step(),
                self.total_evals()
            );
        }
        Ok(self.solver.latent().clone())
    }
}

/// One batched model evaluation for every unfinished state: stacks their inputs into
/// x [B, C, h, w] and t \[B] (f32), calls `model(x, t, indices)` (indices: which states of `states`
/// form the batch, in order, so the caller can stack their conditioning), snaps the B x0
/// predictions in one `snap` call and advances each state. Returns B (0 when all are done).
pub fn step_batch<M>(
    states: &mut [&mut SamplerState],
    model: &mut M,
    snap: &dyn Fn(&Tensor) -> Result<Tensor>,
) -> Result<usize>
where
    M: FnMut(&Tensor, &Tensor, &[usize]) -> Result<Tensor>,
{
    let (active, inputs): (Vec<usize>, Vec<(Tensor, f32)>) =
        states.iter().enumerate().filter_map(|(i, s)| s.next_input().map(|inp| (i, inp))).unzip();
    let Some(device) = inputs.first().map(|(x, _)| x.device().clone()) else {
        return Ok(0);
    };
    let (xs, ts): (Vec<Tensor>, Vec<f32>) = inputs.into_iter().unzip();
    let x = Tensor::cat(&xs, 0)?;
    let t = Tensor::from_vec(ts, active.len(), &device)?;
    let eps = model(&x, &t, &active)?;
    if eps.dims() != x.dims() {
        bail!("model returned ε of shape {:?} for inputs of shape {:?}", eps.dims(), x.dims());
    }
    let x0: Vec<Tensor> = active
        .iter()
        .enumerate()
        .map(|(j, &i)| states[i].predict_x0(&eps.narrow(0, j, 1)?))
        .collect::<Result<_>>()?;
    let snapped = snap(&Tensor::cat(&x0, 0)?)?;
    for (j, &i) in active.iter().enumerate() {
        states[i].accept_x0(&snapped.narrow(0, j, 1)?)?;
    }
    Ok(active.len())
}

/// Drives every state to the end with [`step_batch`], the unfinished ones together.
pub fn sample<M>(
    states: &mut [SamplerState],
    mut model: M,
    snap: &dyn Fn(&Tensor) -> Result<Tensor>,
) -> Result<()>
where
    M: FnMut(&Tensor, &Tensor, &[usize]) -> Result<Tensor>,
{
    let mut refs: Vec<&mut SamplerState> = states.iter_mut().collect();
    while step_batch(&mut refs, &mut model, snap)? > 0 {}
    Ok(())
}
