//! Adam with linear warmup, an optional cosine decay and global gradient-norm clipping, whose
//! moments can be saved and restored exactly (candle_nn's `AdamW` keeps them private, so an
//! interrupted run could not continue bit for bit).

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

/// Adam's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    /// Peak learning rate, reached after `warmup` steps.
    pub lr: f64,
    /// Steps of linear warmup from 0 to `lr`.
    pub warmup: u64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the root of the second moment.
    pub eps: f64,
    /// Largest global gradient L2 norm; larger gradients are scaled down (`None`: no clipping).
    pub clip: Option<f64>,
    /// The update by which the rate, after warmup, has followed a half cosine down to zero
    /// (`None`: it stays at `lr`).
    pub cosine_end: Option<u64>,
}

impl AdamConfig {
    /// `lr` with `warmup` steps, the usual betas, eps 1e-8 and clipping at `clip`.
    pub fn new(lr: f64, warmup: u64, clip: Option<f64>) -> Self {
        Self { lr, warmup, beta1: 0.9, beta2: 0.999, eps: 1e-8, clip, cosine_end: None }
    }

    /// The same, its rate decaying after warmup along a half cosine to zero at update `end`:
    /// late updates settle the weights instead of moving them about the minimum.
    pub fn with_cosine_decay(self, end: u64) -> Self {
        Self { cosine_end: Some(end), ..self }
    }

    /// The learning rate of update number `t` (1-based).
    pub fn lr_at(&self, t: u64) -> f64 {
        let warm = match self.warmup {
            0 => 1.0,
            w => (t as f64 / w as f64).min(1.0),
        };
        let decay = match self.cosine_end {
            Some(end) if end > self.warmup => {
                let progress = t.saturating_sub(self.warmup) as f64 / (end - self.warmup) as f64;
                0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
            }
            _ => 1.0,
        };
        self.lr * warm * decay
    }
}

/// Adam over a named set of variables.
#[derive(Debug)]
pub struct Adam {
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: u64,
    cfg: AdamConfig,
}

impl Adam {
    /// Zero moments for `vars` (sorted by name, so the order never depends on a hash map).
    pub fn new(mut vars: Vec<(String, Var)>, cfg: AdamConfig) -> Result<Self> {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let m = vars.iter().map(|(_, v)| zeros(v)).collect::<Result<_>>()?;
        let v = vars.iter().map(|(_, v)| zeros(v)).collect::<Result<_>>()?;
        Ok(Self { vars, m, v, t: 0, cfg })
    }

    /// Updates taken so far.
    pub fn updates(&self) -> u64 {
        self.t
    }

    /// One update from `grads`; returns the global gradient norm before clipping. Variables
    /// without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore) -> Result<f64> {
        let norm = self.grad_norm(grads)?;
        let scale = match self.cfg.clip {
            Some(c) if norm > c => c / norm,
            _ => 1.0,
        };
        self.t += 1;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let lr = self.cfg.lr_at(self.t);
        let (c1, c2) = (1.0 - b1.powi(self.t as i32), 1.0 - b2.powi(self.t as i32));
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            let g = (g * scale)?;
            self.m[i] = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            self.v[i] = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let denom = ((&self.v[i] / c2)?.sqrt()? + self.cfg.eps)?;
            let update = ((&self.m[i] / c1)? / denom)?;
            var.set(&(var.as_tensor() - (update * lr)?)?)?;
        }
        Ok(norm)
    }

    /// Global L2 norm of the gradients of this optimizer's variables.
    fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut sum = 0f64;
        for (_, var) in &self.vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                sum += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
        }
        Ok(sum.sqrt())
    }

    /// Writes the moments (`m.NAME`, `v.NAME`) and the update count (`t`) to `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            tensors.insert(format!("m.{name}"), self.m[i].clone());
            tensors.insert(format!("v.{name}"), self.v[i].clone());
        }
        let t = Tensor::new(&[self.t as u32, (self.t >> 32) as u32], &candle_core::Device::Cpu)?;
        tensors.insert("t".to_string(), t);
        candle_core::safetensors::save(&tensors, path)
    }

    /// Restores what [`Adam::save`] wrote; every variable must have its moments.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let device = self.vars.first().map(|(_, v)| v.device().clone());
        let device = device.unwrap_or(candle_core::Device::Cpu);
        let mut tensors = candle_core::safetensors::load(path, &device)?;
        for (i, (name, _)) in self.vars.iter().enumerate() {
            let mut take = |key: String| {
                tensors
                    .remove(&key)
                    .ok_or_else(|| candle_core::Error::Msg(format!("optimizer state lacks {key}")))
            };
            self.m[i] = take(format!("m.{name}"))?;
            self.v[i] = take(format!("v.{name}"))?;
        }
        let t = tensors
            .remove("t")
            .ok_or_else(|| candle_core::Error::Msg("optimizer state lacks t".into()))?
            .to_vec1::<u32>()?;
        self.t = u64::from(t[0]) | (u64::from(t[1]) << 32);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn the_rate_rises_linearly_over_the_warmup_then_stays() {
        let cfg = AdamConfig::new(1e-3, 100, None);
        assert!(close(cfg.lr_at(1), 1e-5));
        assert!(close(cfg.lr_at(50), 5e-4));
        assert!(close(cfg.lr_at(100), 1e-3));
        assert!(close(cfg.lr_at(10_000), 1e-3));
        assert!(close(AdamConfig::new(1e-3, 0, None).lr_at(1), 1e-3));
    }

    #[test]
    fn a_cosine_decay_halves_the_rate_midway_and_ends_at_zero() {
        let cfg = AdamConfig::new(1e-3, 100, None).with_cosine_decay(1100);
        assert!(close(cfg.lr_at(50), 5e-4), "the warmup is unchanged");
        assert!(close(cfg.lr_at(100), 1e-3));
        assert!(close(cfg.lr_at(600), 5e-4));
        assert!(close(cfg.lr_at(350), 1e-3 * (0.5 + 0.5 * std::f64::consts::FRAC_1_SQRT_2)));
        assert!(close(cfg.lr_at(1100), 0.0));
        assert!(close(cfg.lr_at(2000), 0.0), "past its end the rate stays at zero");
    }
}
