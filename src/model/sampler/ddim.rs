//! DDIM with η = 0 as the official `ddim.py::DDIMSampler` runs it for the latent model: the
//! "uniform" discretization `range(0, T, T / steps) + 1`, each x0 prediction snapped
//! (`vq_denoised`), and a last update towards ᾱ₀ (not 1), so the result keeps a trace of noise
//! exactly as the official sampler's does.

use candle_core::{bail, Result, Tensor};

use super::schedule::NoiseSchedule;
use super::{divide, scale, Solver};

/// One deterministic DDIM update at integer timestep n, with its coefficients in f32.
#[derive(Debug, Clone, Copy)]
struct Update {
    timestep: usize,
    sqrt_alpha: f32,
    sqrt_one_minus_alpha: f32,
    sqrt_alpha_prev: f32,
    sqrt_one_minus_alpha_prev: f32,
}

/// The official timesteps for `steps` DDIM steps (`make_ddim_timesteps`, uniform), smallest
/// first: `range(0, T, T / steps) + 1`, which has ⌈T / ⌊T/steps⌋⌉ entries. Rejects the step
/// counts whose grid reaches timestep T, which the official code indexes out of range (those
/// where ⌊T/steps⌋ divides T − 1, e.g. every count above T/2, or 300 for T = 1000).
fn timesteps(t_total: usize, steps: usize) -> Result<Vec<usize>> {
    if steps == 0 || steps > t_total {
        bail!("DDIM needs 1..={} steps, got {steps}", t_total / 2);
    }
    let ts: Vec<usize> = (0..t_total).step_by(t_total / steps).map(|n| n + 1).collect();
    if ts.last().is_some_and(|&n| n >= t_total) {
        bail!("DDIM with {steps} steps would reach timestep {t_total}, past the schedule (as in the official code); choose another step count");
    }
    Ok(ts)
}

/// One sample's DDIM run: its updates in sampling order, how many are done, the current latent
/// and the ε of the evaluation in flight.
pub(super) struct Ddim {
    updates: Vec<Update>,
    done: usize,
    x: Tensor,
}

impl Ddim {
    /// A run with the official timesteps for `steps` from the noise `x_t`.
    pub(super) fn new(ns: &NoiseSchedule, steps: usize, x_t: Tensor) -> Result<Self> {
        let ts = timesteps(ns.timesteps(), steps)?;
        let ab = &ns.alphas_bar;
        let updates = (0..ts.len())
            .rev()
            .map(|i| {
                let n = ts[i];
                let prev = if i == 0 { ab[0] } else { ab[ts[i - 1]] };
                Update {
                    timestep: n,
                    sqrt_alpha: ab[n].sqrt(),
                    sqrt_one_minus_alpha: (1.0 - ab[n]).sqrt(),
                    sqrt_alpha_prev: prev.sqrt(),
                    sqrt_one_minus_alpha_prev: (1.0 - prev).sqrt(),
                }
            })
            .collect();
        Ok(Self { updates, done: 0, x: x_t })
    }

    fn current(&self) -> Result<&Update> {
        match self.updates.get(self.done) {
            Some(u) => Ok(u),
            None => bail!("DDIM run is already finished"),
        }
    }
}

impl Solver for Ddim {
    fn model_time(&self) -> Option<f32> {
        self.updates.get(self.done).map(|u| u.timestep as f32)
    }

    fn latent(&self) -> &Tensor {
        &self.x
    }

    fn predict_x0(&self, eps: &Tensor) -> Result<Tensor> {
        let u = self.current()?;
        divide(&(&self.x - scale(eps, u.sqrt_one_minus_alpha)?)?, u.sqrt_alpha)
    }

    fn accept(&mut self, eps: &Tensor, x0: &Tensor) -> Result<()> {
        let u = *self.current()?;
        self.x = (scale(x0, u.sqrt_alpha_prev)? + scale(eps, u.sqrt_one_minus_alpha_prev)?)?;
        self.done += 1;
        Ok(())
    }

    fn progress(&self) -> (usize, usize) {
        (self.done, self.updates.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timesteps_follow_the_official_uniform_discretization() {
        let ts = timesteps(1000, 200).unwrap();
        assert_eq!(ts.len(), 200);
        assert_eq!((ts[0], ts[1], ts[199]), (1, 6, 996));
        assert_eq!(timesteps(1000, 400).unwrap().len(), 500);
        assert_eq!(timesteps(1000, 500).unwrap().last(), Some(&999));
        assert_eq!(timesteps(1000, 30).unwrap().len(), 31);
        assert!(timesteps(1000, 300).is_err());
        assert!(timesteps(1000, 501).is_err());
        assert!(timesteps(1000, 0).is_err());
    }
}
