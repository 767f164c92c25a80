//! Training and evaluation of the default model on tiny configurations (2 CPU cores: seconds).

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use slotserve::config::ModelConfig;
use slotserve::data::{Scene, SceneConfig};
use slotserve::eval::Report;
use slotserve::model::encoder::{BackboneConfig, EncoderConfig};
use slotserve::model::pipeline::SlotDiffusion;
use slotserve::model::resnet::ResNetConfig;
use slotserve::train::losses::scene_batch;
use slotserve::train::{
    default_config, evaluate::evaluate_scenes, EncoderKind, LrSchedule, TrainOptions, Trainer,
};

/// The default model shrunk for tests: 32² scenes, 8² grid, 4 slots, UNet width 32, a
/// two-level VQ-VAE with 64 codes.
fn tiny_config() -> ModelConfig {
    let mut cfg = default_config(EncoderKind::Resnet, 16, None, 32, 32).unwrap();
    cfg.encoder = EncoderConfig {
        backbone: BackboneConfig::Resnet(ResNetConfig { stem_channels: 32, blocks: vec![1, 1, 1] }),
        grid_size: 8,
        out_channels: 32,
    };
    cfg.resolution = 32;
    cfg.slot_attention.num_slots = 4;
    cfg.slot_attention.slot_size = 32;
    cfg.slot_attention.in_features = 32;
    cfg.slot_attention.mlp_hidden_size = 64;
    cfg.unet.context_dim = 32;
    cfg.vqvae.ch_mult = vec![1, 2];
    cfg.vqvae.n_embed = 64;
    cfg.sampler.steps = 3;
    cfg
}

fn tiny_scenes() -> SceneConfig {
    SceneConfig { width: 32, height: 32, ..SceneConfig::default() }
}

fn options(slot_steps: u64, vqvae_steps: u64, steps: u64) -> TrainOptions {
    TrainOptions {
        seed: 3,
        batch: 2,
        slot_steps,
        slot_batch: 3,
        vqvae_steps,
        steps,
        vqvae_lr: 3e-3,
        lr: 1e-3,
        warmup: 0,
        clip: 1.0,
        aux_weight: 1.0,
        mask_weight: 0.0,
        mask_foreground_weight: 1.0,
        init_from: None,
        vqvae_from: None,
        unet_from: None,
        freeze_grouping: false,
        min_snr_gamma: 0.0,
        ema_decay: 0.0,
        lr_schedule: LrSchedule::Constant,
    }
}

fn trainer(slot_steps: u64, vqvae_steps: u64, steps: u64) -> Trainer {
    let options = options(slot_steps, vqvae_steps, steps);
    Trainer::new(tiny_config(), options, tiny_scenes(), &Device::Cpu).unwrap()
}

#[test]
fn training_steps_reduce_the_loss_on_a_fixed_batch() {
    let images = scene_batch(&tiny_scenes(), 0, 2, &Device::Cpu).unwrap();
    let mut t = trainer(0, 8, 0);
    let losses: Vec<f64> = (0..8).map(|_| t.step_on(&images).unwrap().loss).collect();
    println!("VQ-VAE losses: {losses:?}");
    assert!(losses[7] < 0.7 * losses[0], "VQ-VAE loss did not fall: {losses:?}");

    // stage 2 (the same noise every step would be a fixed batch too; here the aux loss,
    // which has no noise, must fall)
    let mut t = trainer(0, 0, 10);
    let aux: Vec<f64> = (0..10).map(|_| t.step_on(&images).unwrap().extra).collect();
    println!("auxiliary losses: {aux:?}");
    assert!(aux[9] < 0.8 * aux[0], "auxiliary loss did not fall: {aux:?}");

    // the curriculum stage optimises the auxiliary loss alone
    let mut t = trainer(10, 0, 0);
    let slots: Vec<f64> = (0..10).map(|_| t.step_on(&images).unwrap().main).collect();
    println!("curriculum losses: {slots:?}");
    assert!(slots[9] < 0.8 * slots[0], "curriculum loss did not fall: {slots:?}");

    // with mask supervision the curriculum also learns the generator's objects
    let supervised = TrainOptions { mask_weight: 1.0, ..options(10, 0, 0) };
    let mut t = Trainer::new(tiny_config(), supervised, tiny_scenes(), &Device::Cpu).unwrap();
    let masks: Vec<f64> = (0..10).map(|_| t.step_on(&images).unwrap().masks).collect();
    println!("mask supervision losses: {masks:?}");
    assert!(masks[9] < 0.8 * masks[0], "mask loss did not fall: {masks:?}");
}

#[test]
fn resume_continues_bit_for_bit() {
    let dir = scratch_dir("resume");
    // 1 curriculum step, 2 VQ-VAE steps, then diffusion: the interruption at 4 falls
    // inside stage 2, after every stage has run; the weight average and the place on the
    // cosine learning-rate schedule are saved and restored too
    let averaged = || {
        let options =
            TrainOptions { ema_decay: 0.9, lr_schedule: LrSchedule::Cosine, ..options(1, 2, 4) };
        Trainer::new(tiny_config(), options, tiny_scenes(), &Device::Cpu).unwrap()
    };
    let mut straight = averaged();
    let want: Vec<f64> = (0..7).map(|_| straight.step().unwrap().loss).collect();

    let mut first = averaged();
    for _ in 0..4 {
        first.step().unwrap();
    }
    first.save(&dir).unwrap();
    drop(first);
    let mut resumed = Trainer::resume(&dir, &Device::Cpu).unwrap();
    assert_eq!(resumed.step_count(), 4);
    let got: Vec<f64> = (4..7).map(|_| resumed.step().unwrap().loss).collect();
    assert_eq!(got, want[4..], "losses after resuming differ");
    let want_weights = exported(&straight, &dir, "straight");
    for (name, got) in exported(&resumed, &dir, "resumed") {
        assert!(same(&got, &want_weights[&name]), "exported {name} differs after resuming");
    }
    // the exported model loads strictly as a model directory
    let model = slotserve::model::pipeline::SlotDiffusion::load(
        &dir.join(slotserve::train::MODEL_DIR),
        None,
        &Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    assert_eq!(model.config(), &tiny_config());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn eval_runs_end_to_end_on_a_tiny_random_model() {
    let t = trainer(0, 0, 0);
    let scenes: Vec<Scene> = slotserve::eval::held_out_scenes(&tiny_scenes(), 3);
    let reports = evaluate_scenes(t.model(), &scenes, 2, Some(0)).unwrap();
    println!("{}", slotserve::eval::format_table(&reports));
    assert_eq!(reports.len(), 7);
    let model = &reports[0];
    assert_eq!(model.scenes, 3);
    assert_eq!(model.psnr.count(), 3);
    assert!(model.removal_inside.count() >= 1);
    assert!(model.fg_ari.value().is_some() && model.mbo.value().is_some());
    // the next two rows split the same scenes by whether two objects share a colour
    let shared = scenes.iter().filter(|s| s.shares_a_colour()).count();
    let (distinct_row, shared_row) = (&reports[1], &reports[2]);
    assert!(distinct_row.name.ends_with("colours distinct"), "{}", distinct_row.name);
    assert_eq!((distinct_row.scenes, shared_row.scenes), (3 - shared, shared));
    assert_eq!(distinct_row.psnr.count() + shared_row.psnr.count(), 3);
    let mut rejoined = Report::new(&model.name);
    rejoined.absorb(distinct_row);
    rejoined.absorb(shared_row);
    assert_eq!(rejoined.fg_ari.count(), model.fg_ari.count());
    let (whole, parts) = (model.psnr.value().unwrap(), rejoined.psnr.value().unwrap());
    assert!((whole - parts).abs() < 1e-9, "{whole} against {parts}");
    // the last row is the VQ-VAE's own reconstruction: a PSNR per scene, nothing segmented
    let autoencoder = reports.last().unwrap();
    assert!(autoencoder.name.starts_with("VQ-VAE"), "{}", autoencoder.name);
    assert_eq!((autoencoder.scenes, autoencoder.psnr.count()), (3, 3));
    assert!(autoencoder.fg_ari.value().is_none() && autoencoder.removal_inside.value().is_none());
    // segmentation only: no renders, so no ceiling for them either
    let segmentation = evaluate_scenes(t.model(), &scenes, 2, None).unwrap();
    assert_eq!(segmentation.len(), 6);
    assert_eq!(segmentation[0].psnr.count(), 0);
}

#[test]
fn codebook_restarts_move_unused_codes_onto_latents() {
    use slotserve::train::losses::{restarted_codebook, step_rng, vqvae_losses};
    let t = trainer(0, 1, 0);
    let images = scene_batch(&tiny_scenes(), 0, 2, &Device::Cpu).unwrap();
    let codebook = Tensor::randn(0f32, 1.0, (64, 3), &Device::Cpu).unwrap();
    let losses = vqvae_losses(t.model(), &codebook, &images.images).unwrap();
    let restarted = restarted_codebook(&codebook, &losses, &mut step_rng(0, 0)).unwrap();
    let (old, new) = (codebook.to_vec2::<f32>().unwrap(), restarted.to_vec2::<f32>().unwrap());
    let latents = losses.latents.to_vec2::<f32>().unwrap();
    for (code, (before, after)) in old.iter().zip(&new).enumerate() {
        if losses.used.contains(&(code as u32)) {
            assert_eq!(before, after, "used code {code} moved");
        } else {
            assert!(latents.contains(after), "unused code {code} is not a latent vector");
        }
    }
    assert!(losses.used.len() < old.len(), "the test needs unused codes");
}

/// The servable weights `t` exports, written under `dir/name` and read back.
fn exported(t: &Trainer, dir: &std::path::Path, name: &str) -> HashMap<String, Tensor> {
    t.export(&dir.join(name)).unwrap();
    candle_core::safetensors::load(dir.join(name).join("model.safetensors"), &Device::Cpu).unwrap()
}

/// An empty folder under the system's temporary one, unique to this test process and `name`.
fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("slotserve-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Whether two tensors hold the same values, bit for bit.
fn same(a: &Tensor, b: &Tensor) -> bool {
    a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// A run two steps in (one curriculum, one VQ-VAE step): the source another run starts from.
fn two_steps_in() -> Trainer {
    let mut source = trainer(1, 1, 0);
    source.step().unwrap();
    source.step().unwrap();
    source
}

/// [`two_steps_in`], its checkpoint saved in `dir`.
fn saved_two_steps_in(dir: &std::path::Path) -> Trainer {
    let source = two_steps_in();
    source.save(dir).unwrap();
    source
}

/// A fresh run of the same configuration with another seed, so that every variable differs.
fn fresh_run() -> Trainer {
    let options = TrainOptions { seed: 11, ..options(0, 0, 1) };
    Trainer::new(tiny_config(), options, tiny_scenes(), &Device::Cpu).unwrap()
}

#[test]
fn a_run_starts_from_another_runs_variables_all_or_the_vqvae_or_the_unet_only() {
    let dir = scratch_dir("init");
    let source = saved_two_steps_in(&dir);
    let export = |t: &Trainer, name: &str| exported(t, &dir, name);
    let want = export(&source, "source");

    let mut all = fresh_run();
    all.initialise_from(&dir, "").unwrap();
    for (name, got) in export(&all, "all") {
        assert!(same(&got, &want[&name]), "{name} not taken from the source run");
    }
    for prefix in [slotserve::config::VQVAE_PREFIX, slotserve::config::UNET_PREFIX] {
        let mut part_only = fresh_run();
        let before = export(&part_only, "before");
        part_only.initialise_from(&dir, prefix).unwrap();
        let mut moved = 0;
        for (name, got) in export(&part_only, prefix) {
            if name.starts_with(prefix) {
                assert!(same(&got, &want[&name]), "{name} not taken from the source run");
                moved += usize::from(!same(&got, &before[&name]));
            } else {
                assert!(same(&got, &before[&name]), "{name} changed");
            }
        }
        assert!(moved > 0, "the source's {prefix} equals a fresh one");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_run_starts_from_a_served_model_folder() {
    let dir = scratch_dir("model");
    let want = exported(&two_steps_in(), &dir, "model");
    let mut fresh = fresh_run();
    fresh.initialise_from(&dir.join("model"), "").unwrap();
    for (name, got) in exported(&fresh, &dir, "started") {
        assert!(same(&got, &want[&name]), "{name} not taken from the model folder");
    }
    fresh.step().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_deeper_resnet_grows_from_a_shallower_run_with_identity_blocks() {
    let dir = scratch_dir("grow");
    let source = saved_two_steps_in(&dir);
    let mut deeper_config = tiny_config();
    deeper_config.encoder.backbone =
        BackboneConfig::Resnet(ResNetConfig { stem_channels: 32, blocks: vec![1, 1, 3] });
    let seeded = || TrainOptions { seed: 11, ..options(1, 0, 0) };
    let mut deeper = Trainer::new(deeper_config, seeded(), tiny_scenes(), &Device::Cpu).unwrap();

    let grown = deeper.initialise_from(&dir, "").unwrap();
    assert_eq!(grown, ["encoder.layer3.1", "encoder.layer3.2"]);
    let images = scene_batch(&tiny_scenes(), 0, 2, &Device::Cpu).unwrap().images;
    let features = |t: &Trainer| t.model().encoder().forward(&images).unwrap();
    let gap = (features(&deeper) - features(&source)).unwrap().abs().unwrap();
    let gap = gap.max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(gap < 1e-6, "the grown encoder's features differ from the source's by {gap}");
    deeper.step().unwrap();
    assert!(!same(&features(&deeper), &features(&source)), "the grown encoder did not train");

    let mut shallower = Trainer::new(tiny_config(), seeded(), tiny_scenes(), &Device::Cpu).unwrap();
    deeper.save(&dir.join("deeper")).unwrap();
    let error = shallower.initialise_from(&dir.join("deeper"), "").unwrap_err();
    let error = format!("{error:#}");
    assert!(error.contains("encoder.layer3.") && error.contains("lacks"), "{error}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_frozen_grouping_trains_the_unet_alone() {
    let dir = scratch_dir("freeze");
    let frozen = TrainOptions { freeze_grouping: true, mask_weight: 1.0, ..options(0, 0, 2) };
    let mut t = Trainer::new(tiny_config(), frozen, tiny_scenes(), &Device::Cpu).unwrap();
    let before = exported(&t, &dir, "before");
    let stats: Vec<_> = (0..2).map(|_| t.step().unwrap()).collect();
    assert!(stats.iter().all(|s| s.extra == 0.0 && s.masks == 0.0), "auxiliaries ran: {stats:?}");
    let mut unet_moved = 0;
    for (name, got) in exported(&t, &dir, "after") {
        let moved = !same(&got, &before[&name]);
        if name.starts_with(slotserve::config::UNET_PREFIX) {
            unet_moved += usize::from(moved);
        } else {
            assert!(!moved, "{name} changed with the grouping frozen");
        }
    }
    assert!(unet_moved > 0, "the UNet did not train");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn min_snr_weighting_scales_a_samples_error_by_its_weight() {
    use rand::RngExt;
    use slotserve::train::losses::{diffusion_losses, step_rng, Auxiliaries, DenoiseRecipe};
    let t = trainer(0, 0, 1);
    let batch = scene_batch(&tiny_scenes(), 0, 1, &Device::Cpu).unwrap();
    // the sample's timestep is the first number its step's generator draws: take a stream
    // whose timestep is nearly noise-free (SNR > 5), where every γ below changes the weight
    let schedule = t.model().schedule();
    let snr = |stream: u64| {
        let a = schedule.alphas_bar[step_rng(9, stream).random_range(0..schedule.timesteps())];
        f64::from(a / (1.0 - a))
    };
    let stream = (0..).find(|&s| snr(s) > 5.0).unwrap();
    let loss = |gamma: f64| {
        let aux = Auxiliaries { colour: None, masks: None };
        let recipe = DenoiseRecipe { min_snr_gamma: gamma, ..DenoiseRecipe::default() };
        let rng = &mut step_rng(9, stream);
        let l = diffusion_losses(t.model(), &batch, aux, recipe, rng).unwrap();
        f64::from(l.denoise.to_scalar::<f32>().unwrap())
    };
    let official = loss(0.0);
    for gamma in [0.05, 1.0, 5.0, 1e9] {
        let want = official * snr(stream).min(gamma) / snr(stream);
        let got = loss(gamma);
        println!("SNR {:.3} γ {gamma}: {got} (want {want})", snr(stream));
        assert!((got - want).abs() <= 1e-5 * want, "γ {gamma}: {got} vs {want}");
    }
}

#[test]
fn the_exported_model_holds_the_moving_average_of_the_trained_weights() {
    let dir = scratch_dir("ema");
    // the UNet alone trains; the same run without an average gives the live weights
    let run = |ema_decay: f64| {
        let options = TrainOptions { ema_decay, freeze_grouping: true, ..options(0, 0, 2) };
        Trainer::new(tiny_config(), options, tiny_scenes(), &Device::Cpu).unwrap()
    };
    let (mut live, mut averaged) = (run(0.0), run(0.5));
    let mut weights = vec![exported(&live, &dir, "w0")];
    for step in 1..=2 {
        live.step().unwrap();
        averaged.step().unwrap();
        weights.push(exported(&live, &dir, &format!("w{step}")));
    }
    let mut differs = 0;
    for (name, got) in exported(&averaged, &dir, "average") {
        let value = |w: &HashMap<String, Tensor>| w[&name].flatten_all().unwrap();
        if !name.starts_with(slotserve::config::UNET_PREFIX) {
            assert!(same(&got, &weights[2][&name]), "{name} is not the live weight");
            continue;
        }
        // decay 0.5 over two steps: ¼ w0 + ¼ w1 + ½ w2
        let want = ((value(&weights[0]) * 0.25).unwrap() + (value(&weights[1]) * 0.25).unwrap())
            .unwrap()
            .add(&(value(&weights[2]) * 0.5).unwrap())
            .unwrap();
        let error = (got.flatten_all().unwrap() - &want).unwrap().abs().unwrap();
        let error = error.max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(error <= 1e-6, "{name}: average off by {error}");
        differs += usize::from(!same(&got, &weights[2][&name]));
    }
    assert!(differs > 0, "the average equals the live weights");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_grid_size_sets_the_encoders_stride_and_so_the_resolution_of_the_masks() {
    for (encoder, grid) in
        [(EncoderKind::Vit, 16), (EncoderKind::Vit, 32), (EncoderKind::Resnet, 32)]
    {
        let config = default_config(encoder, grid, None, 32, 32).unwrap();
        assert_eq!(config.resolution, 64, "{encoder:?} grid {grid}");
        let vars = candle_nn::VarMap::new();
        let model = SlotDiffusion::random(&config, 1, &vars, &Device::Cpu).unwrap();
        assert_eq!(model.encoder().grid(64, 64), (grid, grid));
        let images = Tensor::zeros((1, 3, 64, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
        let features = model.encoder().forward(&images).unwrap();
        assert_eq!(features.dims()[..2], [1, grid * grid], "{encoder:?} grid {grid}");
    }
    // the grid must tile the scene, whichever the encoder
    assert!(default_config(EncoderKind::Vit, 24, None, 32, 32).is_err());
    assert!(default_config(EncoderKind::Resnet, 24, None, 32, 32).is_err());
}

#[test]
fn the_encoder_depth_sets_the_resnets_last_stage_or_the_vits_layers() {
    let backbone = |encoder, depth| default_config(encoder, 32, depth, 32, 32).unwrap().encoder;
    let resnet =
        |blocks: Vec<usize>| BackboneConfig::Resnet(ResNetConfig { stem_channels: 32, blocks });
    assert_eq!(backbone(EncoderKind::Resnet, None).backbone, resnet(vec![1, 1]));
    assert_eq!(backbone(EncoderKind::Resnet, Some(3)).backbone, resnet(vec![1, 3]));
    let layers = |depth| match backbone(EncoderKind::Vit, depth).backbone {
        BackboneConfig::Vit(vit) => vit.num_layers,
        other => panic!("not a ViT: {other:?}"),
    };
    assert_eq!((layers(None), layers(Some(5))), (3, 5));
    assert!(default_config(EncoderKind::Resnet, 32, Some(0), 32, 32).is_err());
}

/// `slotserve train` told to stop (SIGTERM, as `docker stop` does) saves its checkpoint after
/// the step it is on, so a resumed run loses nothing.
#[cfg(unix)]
#[test]
fn a_terminated_training_run_saves_its_checkpoint_before_it_exits() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let dir = scratch_dir("stop");
    let mut child = Command::new(env!("CARGO_BIN_EXE_slotserve"))
        .args(["train", "--slot-steps", "100000", "--vqvae-steps", "0", "--steps", "0"])
        .args(["--slot-batch", "1", "--log-every", "1", "--checkpoint-secs", "100000"])
        .args(["--max-steps", "1000"]) // a bound, should the signal go unheard
        .arg("--out")
        .arg(&dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines().map(Result::unwrap);
    // a few steps in, with no checkpoint written yet
    assert!(lines.by_ref().filter(|l| l.starts_with("step ")).nth(2).is_some());
    assert!(!dir.join("state.json").exists());
    let term = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(term.success());
    let last = lines.last().unwrap();
    assert!(child.wait().unwrap().success(), "after {last}");
    let step: u64 = last
        .strip_prefix("checkpoint at step ")
        .and_then(|rest| rest.strip_suffix(" (stopped)"))
        .unwrap_or_else(|| panic!("last line: {last}"))
        .parse()
        .unwrap();
    assert!((3..1000).contains(&step), "{last}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["step"], step);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_slot_iterations_flag_sets_the_trained_models_iterations() {
    use std::process::Command;

    let train = |dir: &std::path::Path, iterations: &str| {
        Command::new(env!("CARGO_BIN_EXE_slotserve"))
            .args(["train", "--slot-steps", "1", "--vqvae-steps", "0", "--steps", "0"])
            .args(["--slot-batch", "1", "--slot-iterations", iterations])
            .arg("--out")
            .arg(dir)
            .output()
            .unwrap()
    };
    let dir = scratch_dir("iterations");
    let run = train(&dir, "5");
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let exported = ModelConfig::load(&dir.join("model").join("config.json")).unwrap();
    assert_eq!(exported.slot_attention.num_iterations, 5);
    std::fs::remove_dir_all(&dir).unwrap();

    let refused = train(&scratch_dir("no-iterations"), "0");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("at least one iteration"));
}

#[test]
fn a_non_positive_mask_foreground_weight_is_refused() {
    let dir = scratch_dir("foreground-weight");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_slotserve"))
        .args(["train", "--slot-steps", "1", "--vqvae-steps", "0", "--steps", "0"])
        .args(["--mask-weight", "1", "--mask-foreground-weight", "0"])
        .arg("--out")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("must be a positive number"));
    assert!(!dir.join("state.json").exists());
}

#[test]
fn a_run_checkpointed_before_the_foreground_weight_resumes_with_every_cell_the_same() {
    let mut saved = serde_json::to_value(options(1, 0, 0)).unwrap();
    saved.as_object_mut().unwrap().remove("mask_foreground_weight").unwrap();
    let resumed: TrainOptions = serde_json::from_value(saved).unwrap();
    assert_eq!(resumed.mask_foreground_weight, 1.0);
}
