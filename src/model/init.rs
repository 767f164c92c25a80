//! Reproducible random initialisation: a model built from a seed gets the same weights on
//! every machine and every run, so training can start (and tests can build small models)
//! without a checkpoint, and the same seed always means the same model.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// Creates every variable a model asks for from its init hint, drawing from a random stream
/// seeded by `seed` and the variable's name, and records it in a [`VarMap`] (for training).
struct SeededInit {
    vars: VarMap,
    seed: u64,
}

impl SeededInit {
    fn rng_for(&self, name: &str) -> ChaCha8Rng {
        let mut h = DefaultHasher::new();
        name.hash(&mut h);
        ChaCha8Rng::seed_from_u64(self.seed ^ h.finish())
    }

    fn values(&self, shape: &Shape, name: &str, init: Init) -> Vec<f32> {
        let n = shape.elem_count();
        let mut rng = self.rng_for(name);
        let normal = |rng: &mut ChaCha8Rng, mean: f64, std: f64| -> f32 {
            let z: f64 = StandardNormal.sample(rng);
            (mean + std * z) as f32
        };
        match init {
            Init::Const(c) => vec![c as f32; n],
            Init::Randn { mean, stdev } => (0..n).map(|_| normal(&mut rng, mean, stdev)).collect(),
            Init::Uniform { lo, up } => (0..n).map(|_| rng.random_range(lo..up) as f32).collect(),
            Init::Kaiming { dist, fan, non_linearity } => {
                let std = non_linearity.gain() / (fan.for_shape(shape).max(1) as f64).sqrt();
                match dist {
                    NormalOrUniform::Normal => (0..n).map(|_| normal(&mut rng, 0.0, std)).collect(),
                    NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        (0..n).map(|_| rng.random_range(-bound..bound) as f32).collect()
                    }
                }
            }
        }
    }
}

impl SimpleBackend for SeededInit {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut vars = self.vars.data().lock().expect("var map lock");
        if let Some(v) = vars.get(name) {
            if v.shape() != &s {
                candle_core::bail!("variable `{name}` has shape {:?}, asked for {s:?}", v.dims());
            }
            return v.as_tensor().to_dtype(dtype);
        }
        let t = Tensor::from_vec(self.values(&s, name, h), s, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&t)?;
        vars.insert(name.to_string(), var.clone());
        Ok(var.as_tensor().clone())
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("`{name}` has no shape hint to initialise it from")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.vars.data().lock().expect("var map lock").contains_key(name)
    }
}

/// A VarBuilder that initialises every variable reproducibly from `seed` and records the
/// variables in `vars` (the trainable parameters).
pub fn seeded_var_builder(
    vars: &VarMap,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    let backend = SeededInit { vars: vars.clone(), seed };
    VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_weights_other_seed_other_weights() {
        let build = |seed| {
            let vars = VarMap::new();
            let vb = seeded_var_builder(&vars, seed, DType::F32, &Device::Cpu);
            let lin = candle_nn::linear(8, 4, vb.pp("proj")).unwrap();
            let w = lin.weight().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (w, lin.bias().unwrap().to_vec1::<f32>().unwrap())
        };
        assert_eq!(build(1), build(1));
        assert_ne!(build(1).0, build(2).0);
        let (_, bias) = build(3);
        assert!(bias.iter().all(|v| v.abs() <= 1.0 / 8f32.sqrt()), "uniform bias bound: {bias:?}");
    }

    #[test]
    fn variables_are_recorded_for_training() {
        let vars = VarMap::new();
        let vb = seeded_var_builder(&vars, 0, DType::F32, &Device::Cpu);
        candle_nn::layer_norm(6, 1e-5, vb.pp("ln")).unwrap();
        assert_eq!(vars.all_vars().len(), 2);
        let again = vb.get_with_hints(6, "ln.weight", Init::Const(5.0)).unwrap();
        assert_eq!(again.to_vec1::<f32>().unwrap(), vec![1.0; 6], "existing variable reused");
    }
}
