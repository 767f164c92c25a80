//! Every variable the diffusion stage trains gets the gradient of its loss: autograd's
//! directional derivative matches a central finite difference, in f64, variable by variable.
//! A layer whose op has no backward pass (a fused kernel applied without one) shows up here
//! as a zero or wrong derivative, where training would only show a loss that stalls.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand_distr::{Distribution, StandardNormal};
use slotserve::config::VQVAE_PREFIX;
use slotserve::data::SceneConfig;
use slotserve::model::init::seeded_var_builder;
use slotserve::model::pipeline::SlotDiffusion;
use slotserve::train::losses::{
    diffusion_losses, scene_batch, step_rng, Auxiliaries, DenoiseRecipe, SceneBatch,
};
use slotserve::train::{default_config, EncoderKind};

/// Stage 2's denoising loss on `batch`, with the same t and noise at every call.
fn loss(model: &SlotDiffusion, batch: &SceneBatch) -> Tensor {
    let aux = Auxiliaries { colour: None, masks: None };
    diffusion_losses(model, batch, aux, DenoiseRecipe::default(), &mut step_rng(5, 0))
        .unwrap()
        .denoise
}

#[test]
fn every_diffusion_variable_gets_its_gradient() {
    let device = Device::Cpu;
    // the default model's layers at the narrowest widths GroupNorm's 32 groups allow
    let mut config = default_config(EncoderKind::Vit, 16, None, 32, 32).unwrap();
    config.unet.num_head_channels = 8;
    let vars = VarMap::new();
    let vb = seeded_var_builder(&vars, 11, DType::F64, &device);
    let model = SlotDiffusion::new(vb, config, "gradients".into()).unwrap();
    let scenes = SceneConfig::default();
    let mut batch = scene_batch(&scenes, 0, 1, &device).unwrap();
    batch.images = batch.images.to_dtype(DType::F64).unwrap();

    let grads = loss(&model, &batch).backward().unwrap();
    // the VQ-VAE is frozen in stage 2 (its latents are detached)
    let named: Vec<(String, Var)> = {
        let data = vars.data().lock().unwrap();
        let mut v: Vec<_> = data
            .iter()
            .filter(|(n, _)| !n.starts_with(VQVAE_PREFIX))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    // Slot Attention's iterations bend the loss sharply: steps of 1e-3 along a full-size
    // random direction leave ~10% truncation error there, 1e-6 agrees to ~1e-6 everywhere
    let h = 1e-6;
    let mut rng = step_rng(7, 1);
    let mut bad = Vec::new();
    for (i, (name, var)) in named.iter().enumerate() {
        let values = (0..var.elem_count()).map(|_| StandardNormal.sample(&mut rng)).collect();
        let direction = Tensor::from_vec::<_, f64>(values, var.shape(), &device).unwrap();
        let analytic = match grads.get(var.as_tensor()) {
            Some(g) => (g * &direction).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap(),
            None => f64::NAN,
        };
        let original = var.as_tensor().copy().unwrap();
        let at = |s: f64| {
            var.set(&(&original + (&direction * s).unwrap()).unwrap()).unwrap();
            loss(&model, &batch).to_scalar::<f64>().unwrap()
        };
        let numeric = (at(h) - at(-h)) / (2.0 * h);
        var.set(&original).unwrap();
        let err = (analytic - numeric).abs() / numeric.abs().max(1e-4);
        println!("{i:3} {name}: autograd {analytic:.6e} numeric {numeric:.6e} rel {err:.1e}");
        if err.is_nan() || err >= 1e-3 {
            bad.push(name.clone());
        }
    }
    assert!(bad.is_empty(), "wrong or missing gradients: {bad:?}");
}
