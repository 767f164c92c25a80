//! The diffusion noise schedule: the discrete DDPM tables (`ddpm.py::register_schedule`) and
//! DPM-Solver's continuous-time view of them (`dpm_solver.py::NoiseScheduleVP`, discrete).
//!
//! Every table is computed the way the official code computes it, so that the numbers agree to
//! f32 precision: the DDPM tables in f64 then rounded to f32 (numpy, then `torch.tensor(...,
//! float32)`), DPM-Solver's `log(alpha_t)` from the f32 betas in f32 with an f64 running sum
//! (PyTorch's CPU `cumsum` accumulates floats in double), and every continuous-time function
//! in f32.

use candle_core::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::checkpoint::ShapeMap;

/// The diffusion hyper-parameters of the official `diffusion_dict` (every released SlotDiffusion
/// config uses the linear schedule with these values; only T can be read from a checkpoint).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScheduleConfig {
    /// Number of training diffusion steps T (`timesteps`, 1000).
    pub timesteps: usize,
    /// First beta: betas = linspace(√linear_start, √linear_end, T)² (`linear_start`, 0.0015).
    pub linear_start: f64,
    /// Last beta of the same linear-in-√β schedule (`linear_end`, 0.0195).
    pub linear_end: f64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self { timesteps: 1000, linear_start: 0.0015, linear_end: 0.0195 }
    }
}

impl ScheduleConfig {
    /// The official values, with T read from the length of the checkpoint's `{prefix}.betas`
    /// buffer where there is one (`prefix` is e.g. `dm_decoder`). The beta range cannot be read
    /// from shapes; it is the documented default.
    pub fn infer(shapes: &ShapeMap, prefix: &str) -> Result<Self> {
        let key = format!("{prefix}.betas");
        let mut cfg = Self::default();
        if shapes.contains(&key) {
            cfg.timesteps = shapes.dim(&key, 0)?;
        }
        Ok(cfg)
    }
}

/// The noise schedule tables every sampler reads, indexed by the discrete timestep
/// n = 0..T-1 (f32, as the official buffers), plus the knots of DPM-Solver's piecewise-linear
/// `log(alpha_t)` over continuous time t = (n+1)/T.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    /// β_n (`betas` buffer).
    pub betas: Vec<f32>,
    /// ᾱ_n = Π_{i≤n} (1 − β_i) (`alphas_bar`).
    pub alphas_bar: Vec<f32>,
    /// ᾱ_{n−1}, with 1 before the first step (`alphas_bar_prev`).
    pub alphas_bar_prev: Vec<f32>,
    /// √(1/ᾱ_n), to predict x0 from x_n and ε (`sqrt_recip_alphas_bar`).
    pub sqrt_recip_alphas_bar: Vec<f32>,
    /// √(1/ᾱ_n − 1), likewise (`sqrt_recipm1_alphas_bar`).
    pub sqrt_recipm1_alphas_bar: Vec<f32>,
    /// Weight of x0 in the mean of q(x_{n−1} | x_n, x0) (`posterior_mean_coef1`).
    pub posterior_mean_coef1: Vec<f32>,
    /// Weight of x_n in that mean (`posterior_mean_coef2`).
    pub posterior_mean_coef2: Vec<f32>,
    /// log of that posterior's variance, floored at 1e-20 (`posterior_log_variance_clipped`).
    pub posterior_log_variance_clipped: Vec<f32>,
    /// DPM-Solver's continuous times of the knots, `linspace(0, 1, T+1)[1:]` in f32.
    pub t_knots: Vec<f32>,
    /// DPM-Solver's log α_t at those knots: 0.5 · cumsum(log(1 − β)).
    pub log_alpha_knots: Vec<f32>,
}

impl NoiseSchedule {
    /// Builds every table from the config, exactly as the official code does.
    pub fn new(cfg: &ScheduleConfig) -> Result<Self> {
        let n = cfg.timesteps;
        if n < 2 || !(cfg.linear_start > 0.0 && cfg.linear_end > 0.0) {
            bail!("invalid diffusion schedule {cfg:?}: need T >= 2 and positive betas");
        }
        let betas = linspace_f64(cfg.linear_start.sqrt(), cfg.linear_end.sqrt(), n)
            .into_iter()
            .map(|b| b * b)
            .collect::<Vec<f64>>();
        let alphas: Vec<f64> = betas.iter().map(|b| 1.0 - b).collect();
        let alphas_bar: Vec<f64> = alphas
            .iter()
            .scan(1.0, |acc, a| {
                *acc *= a;
                Some(*acc)
            })
            .collect();
        let alphas_bar_prev: Vec<f64> =
            std::iter::once(1.0).chain(alphas_bar[..n - 1].iter().copied()).collect();
        let (b, a, ab, abp) = (&betas, &alphas, &alphas_bar, &alphas_bar_prev);
        let betas_f32 = table(n, |i| b[i]);
        let (t_knots, log_alpha_knots) = continuous_knots(&betas_f32);
        Ok(Self {
            alphas_bar: table(n, |i| ab[i]),
            alphas_bar_prev: table(n, |i| abp[i]),
            sqrt_recip_alphas_bar: table(n, |i| (1.0 / ab[i]).sqrt()),
            sqrt_recipm1_alphas_bar: table(n, |i| (1.0 / ab[i] - 1.0).sqrt()),
            posterior_mean_coef1: table(n, |i| b[i] * abp[i].sqrt() / (1.0 - ab[i])),
            posterior_mean_coef2: table(n, |i| (1.0 - abp[i]) * a[i].sqrt() / (1.0 - ab[i])),
            posterior_log_variance_clipped: table(n, |i| {
                (b[i] * (1.0 - abp[i]) / (1.0 - ab[i])).max(1e-20).ln()
            }),
            betas: betas_f32,
            t_knots,
            log_alpha_knots,
        })
    }

    /// Number of discrete timesteps T.
    pub fn timesteps(&self) -> usize {
        self.betas.len()
    }

    /// log α_t at continuous time t (`marginal_log_mean_coeff`): piecewise linear through the
    /// knots, extended linearly beyond them.
    pub fn log_alpha(&self, t: f32) -> f32 {
        interpolate(t, &self.t_knots, &self.log_alpha_knots)
    }

    /// α_t = exp(log α_t) (`marginal_alpha`).
    pub fn alpha(&self, t: f32) -> f32 {
        self.log_alpha(t).exp()
    }

    /// σ_t = √(1 − α_t²) (`marginal_std`).
    pub fn sigma(&self, t: f32) -> f32 {
        (1.0 - (2.0 * self.log_alpha(t)).exp()).sqrt()
    }

    /// λ_t = log α_t − log σ_t, the half log-SNR (`marginal_lambda`).
    pub fn lambda(&self, t: f32) -> f32 {
        let log_alpha = self.log_alpha(t);
        log_alpha - 0.5 * (1.0 - (2.0 * log_alpha).exp()).ln()
    }

    /// The continuous time whose half log-SNR is `lambda` (`inverse_lambda`, discrete).
    pub fn inverse_lambda(&self, lambda: f32) -> f32 {
        let log_alpha = -0.5 * logaddexp(0.0, -2.0 * lambda);
        let xs: Vec<f32> = self.log_alpha_knots.iter().rev().copied().collect();
        let ys: Vec<f32> = self.t_knots.iter().rev().copied().collect();
        interpolate(log_alpha, &xs, &ys)
    }

    /// The UNet's timestep input for continuous time t: (t − 1/T) · 1000, fractional
    /// (`model_wrapper.get_model_input_time`).
    pub fn model_time(&self, t: f32) -> f32 {
        (t - (1.0 / self.timesteps() as f64) as f32) * 1000.0
    }
}

/// An f32 table of `n` values computed in f64 (numpy's arithmetic, then the buffers' dtype).
fn table(n: usize, f: impl Fn(usize) -> f64) -> Vec<f32> {
    (0..n).map(|i| f(i) as f32).collect()
}

/// DPM-Solver's knots from the f32 betas: t = linspace(0, 1, T+1)[1:] and
/// log α = 0.5 · cumsum(log(1 − β)), the log in f32 and the running sum in f64.
fn continuous_knots(betas: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let t = linspace_f32(0.0, 1.0, betas.len() + 1)[1..].to_vec();
    let log_alpha = betas
        .iter()
        .scan(0.0f64, |acc, b| {
            *acc += f64::from((1.0 - b).ln());
            Some(0.5 * *acc as f32)
        })
        .collect();
    (t, log_alpha)
}

/// `torch.linspace` in f32: `start + step·i` for the first half, `end − step·(n−1−i)` for the
/// second, with step = (end − start)/(n − 1) (PyTorch's scalar CPU kernel).
pub(crate) fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    let step = (end - start) / (n.saturating_sub(1).max(1)) as f32;
    (0..n)
        .map(|i| if i < n / 2 { start + step * i as f32 } else { end - step * (n - 1 - i) as f32 })
        .collect()
}

/// `torch.linspace` in f64, same formula.
fn linspace_f64(start: f64, end: f64, n: usize) -> Vec<f64> {
    let step = (end - start) / (n.saturating_sub(1).max(1)) as f64;
    (0..n)
        .map(|i| if i < n / 2 { start + step * i as f64 } else { end - step * (n - 1 - i) as f64 })
        .collect()
}

/// PyTorch's `logaddexp` for finite inputs: max + log1p(exp(−|a − b|)).
fn logaddexp(a: f32, b: f32) -> f32 {
    a.max(b) + (-(a - b).abs()).exp().ln_1p()
}

/// The official `interpolate_fn`: the line through the two knots around x (the first or last
/// two outside the range), `y0 + (x − x0)·(y1 − y0)/(x1 − x0)` in that order of operations.
/// `xs` must be ascending with at least two knots.
fn interpolate(x: f32, xs: &[f32], ys: &[f32]) -> f32 {
    let below = xs.partition_point(|&k| k < x);
    let k = below.saturating_sub(1).min(xs.len() - 2);
    ys[k] + (x - xs[k]) * (ys[k + 1] - ys[k]) / (xs[k + 1] - xs[k])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_endpoints_and_halves() {
        let v = linspace_f32(1.0, 0.001, 21);
        assert_eq!(v[0], 1.0);
        assert_eq!(v[20], 0.001);
        assert!((v[10] - 0.5005).abs() < 1e-6);
    }

    #[test]
    fn interpolation_is_exact_at_knots_and_linear_outside() {
        let xs = [0.0, 1.0, 3.0];
        let ys = [0.0, 2.0, 4.0];
        assert_eq!(interpolate(1.0, &xs, &ys), 2.0);
        assert_eq!(interpolate(2.0, &xs, &ys), 3.0);
        assert_eq!(interpolate(-1.0, &xs, &ys), -2.0);
        assert_eq!(interpolate(5.0, &xs, &ys), 6.0);
    }

    #[test]
    fn inverse_lambda_inverts_lambda() {
        let s = NoiseSchedule::new(&ScheduleConfig::default()).unwrap();
        for t in [0.001f32, 0.02, 0.3, 0.5, 0.77, 1.0] {
            let back = s.inverse_lambda(s.lambda(t));
            assert!((back - t).abs() < 1e-4 * t.max(0.01), "t {t} -> {back}");
        }
    }
}
