//! An exponential moving average of the trained variables (Polyak averaging), the weights
//! diffusion models are usually served with: the live weights keep moving with each batch's
//! noise, their average sits nearer the optimum. Saved and restored with the checkpoint, so a
//! resumed run averages exactly as an uninterrupted one.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Result, Tensor, Var};

/// The running average of a named set of variables.
#[derive(Debug)]
pub struct Ema {
    decay: f64,
    vars: Vec<(String, Var)>,
    average: Vec<Tensor>,
}

impl Ema {
    /// An average of `vars` that starts at their current values.
    pub fn new(vars: Vec<(String, Var)>, decay: f64) -> Result<Self> {
        let average =
            vars.iter().map(|(_, v)| v.as_tensor().detach().copy()).collect::<Result<_>>()?;
        Ok(Self { decay, vars, average })
    }

    /// Moves the average towards the variables' current values:
    /// `average ← decay · average + (1 − decay) · value`.
    pub fn update(&mut self) -> Result<()> {
        for ((_, var), average) in self.vars.iter().zip(&mut self.average) {
            let value = var.as_tensor().detach();
            *average = ((&*average * self.decay)? + (value * (1.0 - self.decay))?)?;
        }
        Ok(())
    }

    /// The averaged value of each variable, by name.
    pub fn averages(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.vars.iter().map(|(name, _)| name.as_str()).zip(&self.average)
    }

    /// Writes the averages, by variable name, to `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tensors: HashMap<String, Tensor> =
            self.averages().map(|(name, t)| (name.to_string(), t.clone())).collect();
        candle_core::safetensors::save(&tensors, path)
    }

    /// Restores what [`Ema::save`] wrote; every variable must have its average.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let device = self.vars.first().map(|(_, v)| v.device().clone());
        let mut saved =
            candle_core::safetensors::load(path, &device.unwrap_or(candle_core::Device::Cpu))?;
        for ((name, _), average) in self.vars.iter().zip(&mut self.average) {
            *average = saved.remove(name).ok_or_else(|| {
                candle_core::Error::Msg(format!("{} lacks the average of {name}", path.display()))
            })?;
        }
        Ok(())
    }
}
