//! A request's sampling options (`seed`, `sampler`, `steps`), checked and completed with
//! the model's defaults before any work is queued.

use crate::engine::{ModelInfo, RenderSpec};
use crate::model::sampler::SamplerKind;
use crate::slots::SlotSet;

use super::error::ApiError;

/// A request's sampling options as sent, before checking.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SamplingOptions<'a> {
    /// Seed of the first image; random when absent.
    pub seed: Option<u64>,
    /// Sampler name; the model's default when absent.
    pub sampler: Option<&'a str>,
    /// Model evaluations per image; the model's default when absent.
    pub steps: Option<usize>,
}

/// Checked sampling options of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sampling {
    /// Seed of the request's first image; image i uses `seed + i`.
    pub seed: u64,
    /// The sampler.
    pub sampler: SamplerKind,
    /// Model evaluations per image.
    pub steps: usize,
}

impl Sampling {
    /// Checks the requested options and fills in the defaults: the model's sampler and step
    /// count, a random seed. DDPM always runs all T steps.
    pub fn resolve(
        options: SamplingOptions<'_>,
        info: &ModelInfo,
        max_steps: usize,
    ) -> Result<Self, ApiError> {
        let SamplingOptions { seed, sampler, steps } = options;
        let sampler = match sampler {
            Some(name) => name.parse::<SamplerKind>().map_err(ApiError::invalid_parameters)?,
            None => info.default_sampler.parse::<SamplerKind>().unwrap_or(SamplerKind::DpmSolverPP),
        };
        let steps = match (sampler, steps) {
            (SamplerKind::Ddpm, Some(n)) if n != info.timesteps => {
                return Err(ApiError::invalid_parameters(format!(
                    "ddpm always runs all {} steps of the schedule; got steps = {n}",
                    info.timesteps
                )))
            }
            (SamplerKind::Ddpm, _) => info.timesteps,
            (_, Some(n)) => n,
            (_, None) => info.default_steps,
        };
        if steps == 0 || steps > max_steps {
            return Err(ApiError::invalid_parameters(format!(
                "{sampler} with {steps} steps: this server runs 1 to {max_steps} steps per image"
            )));
        }
        Ok(Self { seed: seed.unwrap_or_else(rand::random), sampler, steps })
    }

    /// Seed of the request's `i`-th image.
    pub fn seed_of(&self, i: usize) -> u64 {
        self.seed.wrapping_add(i as u64)
    }

    /// Render jobs for the given slot sets, seeded in order.
    pub fn specs(&self, sets: Vec<SlotSet>) -> Vec<RenderSpec> {
        sets.into_iter()
            .enumerate()
            .map(|(i, slots)| RenderSpec {
                slots,
                seed: self.seed_of(i),
                sampler: self.sampler,
                steps: self.steps,
            })
            .collect()
    }
}
