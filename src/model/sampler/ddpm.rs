//! Ancestral DDPM sampling as the official `cond_ddpm.py::_sample_x0_from_noise` runs it for the
//! latent model: all T steps from n = T−1 down to 0, x0 = √(1/ᾱ)·x − √(1/ᾱ−1)·ε snapped
//! (`vq_denoised`, no clipping), x ← posterior mean + σ·z with fresh Gaussian z except at n = 0.
//! z comes from the sample's own seeded generator, so a sample's result does not depend on
//! which other samples shared its batches.

use candle_core::{bail, Result, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::schedule::NoiseSchedule;
use super::{gaussian, scale, Solver};

/// The ChaCha stream that DDPM's per-step noise is drawn from; stream 0 is left to the
/// starting noise ([`super::gaussian_noise`]), so the two never repeat each other.
const STEP_NOISE_STREAM: u64 = 1;

/// The coefficients of one DDPM step at timestep n, from the schedule's f32 tables.
#[derive(Debug, Clone, Copy)]
struct Step {
    recip: f32,
    recipm1: f32,
    coef_x0: f32,
    coef_xt: f32,
    noise_std: f32,
}

/// One sample's DDPM run: the next timestep, the current latent, its noise generator and the
/// tables it reads.
pub(super) struct Ddpm {
    steps: Vec<Step>,
    next: usize,
    x: Tensor,
    rng: ChaCha8Rng,
}

impl Ddpm {
    /// A run over all T steps from the noise `x_t`, drawing step noise from `seed`.
    pub(super) fn new(ns: &NoiseSchedule, x_t: Tensor, seed: u64) -> Self {
        let steps = (0..ns.timesteps())
            .map(|n| Step {
                recip: ns.sqrt_recip_alphas_bar[n],
                recipm1: ns.sqrt_recipm1_alphas_bar[n],
                coef_x0: ns.posterior_mean_coef1[n],
                coef_xt: ns.posterior_mean_coef2[n],
                noise_std: (0.5 * ns.posterior_log_variance_clipped[n]).exp(),
            })
            .collect::<Vec<_>>();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(STEP_NOISE_STREAM);
        Self { next: steps.len(), steps, x: x_t, rng }
    }

    fn current(&self) -> Result<(usize, Step)> {
        match self.next.checked_sub(1) {
            Some(n) => Ok((n, self.steps[n])),
            None => bail!("DDPM run is already finished"),
        }
    }
}

impl Solver for Ddpm {
    fn model_time(&self) -> Option<f32> {
        self.next.checked_sub(1).map(|n| n as f32)
    }

    fn latent(&self) -> &Tensor {
        &self.x
    }

    fn predict_x0(&self, eps: &Tensor) -> Result<Tensor> {
        let (_, s) = self.current()?;
        scale(&self.x, s.recip)? - scale(eps, s.recipm1)?
    }

    fn accept(&mut self, _eps: &Tensor, x0: &Tensor) -> Result<()> {
        let (n, s) = self.current()?;
        let mean = (scale(x0, s.coef_x0)? + scale(&self.x, s.coef_xt)?)?;
        self.x = if n == 0 {
            mean
        } else {
            let z = gaussian(&mut self.rng, self.x.dims(), self.x.device())?;
            (mean + scale(&z, s.noise_std)?)?
        };
        self.next = n;
        Ok(())
    }

    fn progress(&self) -> (usize, usize) {
        (self.steps.len() - self.next, self.steps.len())
    }
}
