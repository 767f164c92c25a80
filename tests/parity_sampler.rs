//! The samplers: schedule tables against the official checkpoint buffers, each sampler against
//! a plain f64 transcription of the official loop and against closed forms, per-sample states
//! batched at different progress against the same states run alone, and the official
//! DPM-Solver++ samples of the fixtures.

mod common;

use candle_core::{Device, Result, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use slotserve::model::sampler::{
    gaussian_noise, sample, step_batch, NoiseSchedule, Sampler, SamplerKind, SamplerState,
    ScheduleConfig,
};

const DIMS: [usize; 3] = [3, 4, 5];

fn sampler() -> Sampler {
    Sampler::new(&ScheduleConfig::default()).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// A smooth, nonlinear, time-dependent stand-in for the UNet: ε = tanh(x)·(0.2 + t/2000) per
/// sample.
fn toy_eps(x: f64, t: f64) -> f64 {
    x.tanh() * (0.2 + t / 2000.0)
}

/// [`toy_eps`] over a batch x [B,...] with per-sample timesteps t [B].
fn toy_model(x: &Tensor, t: &Tensor, _active: &[usize]) -> Result<Tensor> {
    let gain = ((t / 2000.0)? + 0.2)?.reshape((t.dim(0)?, 1, 1, 1))?;
    x.tanh()?.broadcast_mul(&gain)
}

/// A smooth stand-in for codebook snapping, simple enough to transcribe in f64.
fn toy_snap(x: f64) -> f64 {
    0.9 * x + 0.05
}

fn toy_snap_tensor(x: &Tensor) -> Result<Tensor> {
    x.affine(0.9, 0.05)
}

/// A discontinuous snap (a 1/4 grid) like the real codebook's, for exact batching checks.
fn grid_snap(x: &Tensor) -> Result<Tensor> {
    (x * 4.0)?.round()? / 4.0
}

/// Runs one state alone to the end with `model` and `snap`.
fn run_alone(
    mut state: SamplerState,
    snap: &dyn Fn(&Tensor) -> Result<Tensor>,
) -> Result<Vec<f32>> {
    while let Some((x, t)) = state.next_input() {
        let eps = toy_model(&x, &Tensor::new(&[t], &Device::Cpu)?, &[0])?;
        state.advance(&eps, snap)?;
    }
    Ok(values(&state.final_latent()?))
}

fn max_diff(a: &[f32], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| (f64::from(x) - y).abs()).fold(0.0, f64::max)
}

/// DPM-Solver's continuous-time schedule in f64 from the betas: the official `NoiseScheduleVP`.
struct Vp {
    t: Vec<f64>,
    log_alpha: Vec<f64>,
}

impl Vp {
    fn new(betas: &[f32]) -> Self {
        let n = betas.len();
        let mut acc = 0.0;
        let log_alpha = betas
            .iter()
            .map(|&b| {
                acc += (1.0 - f64::from(b)).ln();
                0.5 * acc
            })
            .collect();
        Self { t: (1..=n).map(|i| i as f64 / n as f64).collect(), log_alpha }
    }

    fn interp(x: f64, xs: &[f64], ys: &[f64]) -> f64 {
        let k = xs.iter().filter(|&&v| v < x).count().saturating_sub(1).min(xs.len() - 2);
        ys[k] + (x - xs[k]) * (ys[k + 1] - ys[k]) / (xs[k + 1] - xs[k])
    }

    fn la(&self, t: f64) -> f64 {
        Self::interp(t, &self.t, &self.log_alpha)
    }

    fn alpha(&self, t: f64) -> f64 {
        self.la(t).exp()
    }

    fn sigma(&self, t: f64) -> f64 {
        (1.0 - (2.0 * self.la(t)).exp()).sqrt()
    }

    fn lambda(&self, t: f64) -> f64 {
        self.la(t).ln_1p_neg_exp2()
    }

    fn inverse_lambda(&self, l: f64) -> f64 {
        let la = -0.5 * (-2.0 * l).exp().ln_1p();
        let xs: Vec<f64> = self.log_alpha.iter().rev().copied().collect();
        let ys: Vec<f64> = self.t.iter().rev().copied().collect();
        Self::interp(la, &xs, &ys)
    }
}

/// λ from log α: log α − ½·log(1 − α²).
trait HalfLogSnr {
    fn ln_1p_neg_exp2(self) -> f64;
}

impl HalfLogSnr for f64 {
    fn ln_1p_neg_exp2(self) -> f64 {
        self - 0.5 * (1.0 - (2.0 * self).exp()).ln()
    }
}

fn linspace(a: f64, b: f64, n: usize) -> Vec<f64> {
    (0..n).map(|i| a + (b - a) * i as f64 / (n - 1) as f64).collect()
}

/// The official `DPM_Solver.sample(method='singlestep', order=3, skip_type='time_uniform')`
/// with `dpmsolver++` and `vq_denoised`, transcribed loop for loop in f64.
fn reference_dpm(vp: &Vp, steps: usize, x_t: &[f64]) -> Vec<f64> {
    let model = |x: &[f64], t: f64| -> Vec<f64> {
        let (a, s, tin) = (vp.alpha(t), vp.sigma(t), (t - 1e-3) * 1000.0);
        x.iter().map(|&v| toy_snap((v - s * toy_eps(v, tin)) / a)).collect()
    };
    let k = steps / 3 + 1;
    let orders: Vec<usize> = match steps % 3 {
        0 => [vec![3; k - 2], vec![2, 1]].concat(),
        1 => [vec![3; k - 1], vec![1]].concat(),
        _ => [vec![3; k - 1], vec![2]].concat(),
    };
    let grid = linspace(1.0, 1e-3, steps + 1);
    let mut x = x_t.to_vec();
    let mut at = 0;
    for order in orders {
        let (s, t) = (grid[at], grid[at + order]);
        at += order;
        let inner: Vec<f64> = linspace(s, t, order + 1).iter().map(|&u| vp.lambda(u)).collect();
        let h = inner[order] - inner[0];
        let (ls, ss, st, at_) = (vp.lambda(s), vp.sigma(s), vp.sigma(t), vp.alpha(t));
        let phi1 = (-h).exp_m1();
        let m_s = model(&x, s);
        let base: Vec<f64> =
            x.iter().zip(&m_s).map(|(v, m)| st / ss * v - at_ * phi1 * m).collect();
        if order == 1 {
            x = base;
            continue;
        }
        let r1 = (inner[1] - inner[0]) / h;
        let s1 = vp.inverse_lambda(ls + r1 * h);
        let x_s1: Vec<f64> = x
            .iter()
            .zip(&m_s)
            .map(|(v, m)| vp.sigma(s1) / ss * v - vp.alpha(s1) * (-r1 * h).exp_m1() * m)
            .collect();
        let m_s1 = model(&x_s1, s1);
        if order == 2 {
            x = (0..x.len())
                .map(|i| base[i] - 0.5 / r1 * at_ * phi1 * (m_s1[i] - m_s[i]))
                .collect();
            continue;
        }
        let r2 = (inner[2] - inner[0]) / h;
        let s2 = vp.inverse_lambda(ls + r2 * h);
        let phi22 = (-r2 * h).exp_m1() / (r2 * h) + 1.0;
        let a2 = vp.alpha(s2);
        let x_s2: Vec<f64> = (0..x.len())
            .map(|i| {
                vp.sigma(s2) / ss * x[i] - a2 * (-r2 * h).exp_m1() * m_s[i]
                    + r2 / r1 * a2 * phi22 * (m_s1[i] - m_s[i])
            })
            .collect();
        let m_s2 = model(&x_s2, s2);
        let phi2 = phi1 / h + 1.0;
        x = (0..x.len()).map(|i| base[i] + 1.0 / r2 * at_ * phi2 * (m_s2[i] - m_s[i])).collect();
    }
    x
}

/// The official `DDIMSampler` (η = 0, uniform, `vq_denoised`) in f64 over the f32 ᾱ table.
fn reference_ddim(alphas_bar: &[f32], steps: usize, x_t: &[f64]) -> Vec<f64> {
    let ab: Vec<f64> = alphas_bar.iter().map(|&a| f64::from(a)).collect();
    let ts: Vec<usize> = (0..ab.len()).step_by(ab.len() / steps).map(|n| n + 1).collect();
    let mut x = x_t.to_vec();
    for i in (0..ts.len()).rev() {
        let (a, prev) = (ab[ts[i]], if i == 0 { ab[0] } else { ab[ts[i - 1]] });
        x = x
            .iter()
            .map(|&v| {
                let e = toy_eps(v, ts[i] as f64);
                let x0 = toy_snap((v - (1.0 - a).sqrt() * e) / a.sqrt());
                prev.sqrt() * x0 + (1.0 - prev).sqrt() * e
            })
            .collect();
    }
    x
}

/// The official ancestral loop (`_sample_x0_from_noise`, `vq_denoised`) in f64 over the f32
/// tables, with the sampler's documented noise: ChaCha8 seeded with the seed, stream 1.
fn reference_ddpm(ns: &NoiseSchedule, seed: u64, x_t: &[f64]) -> Vec<f64> {
    let f = |v: &[f32], n: usize| f64::from(v[n]);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(1);
    let mut x = x_t.to_vec();
    for n in (0..ns.timesteps()).rev() {
        let noise: Vec<f64> = (0..x.len())
            .map(|_| f64::from(Distribution::<f32>::sample(&StandardNormal, &mut rng)))
            .collect();
        x = x
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let e = toy_eps(v, n as f64);
                let x0 = toy_snap(
                    f(&ns.sqrt_recip_alphas_bar, n) * v - f(&ns.sqrt_recipm1_alphas_bar, n) * e,
                );
                let mean = f(&ns.posterior_mean_coef1, n) * x0 + f(&ns.posterior_mean_coef2, n) * v;
                let std = (0.5 * f(&ns.posterior_log_variance_clipped, n)).exp();
                if n > 0 {
                    mean + std * noise[i]
                } else {
                    mean
                }
            })
            .collect();
    }
    x
}

fn noise(seed: u64) -> (Tensor, Vec<f64>) {
    let x = gaussian_noise(&DIMS, seed, &Device::Cpu).unwrap();
    let v = values(&x).into_iter().map(f64::from).collect();
    (x, v)
}

#[test]
fn schedule_matches_the_official_buffers() {
    let Some(fx) = common::Fixture::load("schedule_matches_the_official_buffers", "voc-small")
    else {
        return;
    };
    let vb = fx.var_builder();
    let ns = sampler().schedule().clone();
    let tables: [(&str, &[f32]); 8] = [
        ("betas", &ns.betas),
        ("alphas_bar", &ns.alphas_bar),
        ("alphas_bar_prev", &ns.alphas_bar_prev),
        ("sqrt_recip_alphas_bar", &ns.sqrt_recip_alphas_bar),
        ("sqrt_recipm1_alphas_bar", &ns.sqrt_recipm1_alphas_bar),
        ("posterior_mean_coef1", &ns.posterior_mean_coef1),
        ("posterior_mean_coef2", &ns.posterior_mean_coef2),
        ("posterior_log_variance_clipped", &ns.posterior_log_variance_clipped),
    ];
    for (name, ours) in tables {
        let want = values(&vb.get(1000, &format!("dm_decoder.{name}")).unwrap());
        let rel = ours
            .iter()
            .zip(&want)
            .map(|(a, b)| ((a - b) / b.abs().max(1e-30)).abs())
            .fold(0.0f32, f32::max);
        println!("{name}: max relative difference {rel:.2e}");
        assert!(rel <= 2.5e-7, "{name}: relative difference {rel}");
    }
}

#[test]
fn schedule_config_is_inferred_from_the_checkpoint() {
    let Some(fx) = common::Fixture::load("schedule_config_is_inferred", "clevrtex-small") else {
        return;
    };
    let ckpt = slotserve::checkpoint::Checkpoint::from_pth(&fx.checkpoint()).unwrap();
    let cfg = ScheduleConfig::infer(&ckpt.shapes(), "dm_decoder").unwrap();
    assert_eq!(cfg, ScheduleConfig::default());
}

#[test]
fn continuous_schedule_matches_its_definition() {
    let s = sampler();
    let ns = s.schedule();
    let vp = Vp::new(&ns.betas);
    for t in [1e-3f32, 0.0123, 0.25, 0.5, 0.8765, 1.0] {
        let td = f64::from(t);
        assert!((f64::from(ns.lambda(t)) - vp.lambda(td)).abs() < 2e-5, "lambda({t})");
        assert!((f64::from(ns.sigma(t)) - vp.sigma(td)).abs() < 1e-6, "sigma({t})");
        assert!((f64::from(ns.alpha(t)) - vp.alpha(td)).abs() < 1e-6, "alpha({t})");
    }
    // Discrete timestep n sits at t = (n+1)/T, where α_t² is ᾱ_n.
    for n in [0usize, 10, 500, 999] {
        let t = (n + 1) as f32 / 1000.0;
        let ab = ns.alpha(t).powi(2);
        assert!((ab - ns.alphas_bar[n]).abs() < 1e-5 * ns.alphas_bar[n].max(1e-3), "n {n}");
        assert!((ns.model_time(t) - n as f32).abs() < 1e-3, "model time of n {n}");
    }
    assert_eq!(ns.model_time(1.0), 999.0);
}

#[test]
fn dpm_solver_matches_a_transcription_of_the_official_loop() {
    let s = sampler();
    let vp = Vp::new(&s.schedule().betas);
    for steps in [20, 10, 7, 3, 1] {
        let (x_t, xv) = noise(steps as u64);
        let state = s.start(SamplerKind::DpmSolverPP, Some(steps), &x_t, 0).unwrap();
        assert_eq!(state.total_evals(), steps);
        let got = run_alone(state, &toy_snap_tensor).unwrap();
        let d = max_diff(&got, &reference_dpm(&vp, steps, &xv));
        println!("dpm-solver++ {steps} evaluations: max abs diff {d:.2e} against f64");
        assert!(d < 1e-4, "{steps} steps: {d}");
    }
}

#[test]
fn ddim_matches_a_transcription_of_the_official_loop() {
    let s = sampler();
    for steps in [200, 50, 30] {
        let (x_t, xv) = noise(steps as u64);
        let state = s.start(SamplerKind::Ddim, Some(steps), &x_t, 0).unwrap();
        let got = run_alone(state, &toy_snap_tensor).unwrap();
        let d = max_diff(&got, &reference_ddim(&s.schedule().alphas_bar, steps, &xv));
        println!("ddim {steps} steps: max abs diff {d:.2e} against f64");
        assert!(d < 1e-4, "{steps} steps: {d}");
    }
}

#[test]
fn ddpm_matches_a_transcription_of_the_official_loop() {
    let s = sampler();
    let (x_t, xv) = noise(11);
    let state = s.start(SamplerKind::Ddpm, None, &x_t, 42).unwrap();
    assert_eq!(state.total_evals(), 1000);
    let got = run_alone(state, &toy_snap_tensor).unwrap();
    let d = max_diff(&got, &reference_ddpm(s.schedule(), 42, &xv));
    println!("ddpm: max abs diff {d:.2e} against f64");
    assert!(d < 1e-4, "{d}");
    let other =
        run_alone(s.start(SamplerKind::Ddpm, None, &x_t, 43).unwrap(), &toy_snap_tensor).unwrap();
    assert!(max_diff(&other, &xv) > 0.0 && got != other, "the seed must matter");
}

/// With a point-mass data distribution at D the exact ε is (x − α_t D)/σ_t, every x0
/// prediction is D, and each sampler has a closed-form result.
#[test]
fn samplers_reach_closed_forms_for_a_point_mass() {
    let s = sampler();
    let ns = s.schedule();
    let target = 0.25f64;
    let (x_t, xv) = noise(5);
    let exact_eps = |kind: SamplerKind| {
        move |x: &Tensor, t: &Tensor, _: &[usize]| -> Result<Tensor> {
            let t = t.to_vec1::<f32>()?[0];
            let (a, sd) = match kind {
                SamplerKind::DpmSolverPP => {
                    let tc = t / 1000.0 + 1e-3;
                    (ns.alpha(tc), ns.sigma(tc))
                }
                _ => {
                    let ab = ns.alphas_bar[t as usize];
                    (ab.sqrt(), (1.0 - ab).sqrt())
                }
            };
            (x - f64::from(a) * target)? / f64::from(sd)
        }
    };
    let identity = |x: &Tensor| Ok(x.clone());
    let run = |kind, steps| {
        let mut states = vec![s.start(kind, steps, &x_t, 3).unwrap()];
        sample(&mut states, exact_eps(kind), &identity).unwrap();
        values(&states.pop().unwrap().final_latent().unwrap())
    };
    // DPM-Solver++: x_0 = (σ_0/σ_1)·x_1 + α_0·(1 − e^{−(λ_0 − λ_1)})·D, exact for constant D.
    let (t0, t1) = (1e-3f32, 1.0f32);
    let h = f64::from(ns.lambda(t0) - ns.lambda(t1));
    let ratio = f64::from(ns.sigma(t0) / ns.sigma(t1));
    let want: Vec<f64> = xv
        .iter()
        .map(|v| ratio * v + f64::from(ns.alpha(t0)) * (-(-h).exp_m1()) * target)
        .collect();
    let d = max_diff(&run(SamplerKind::DpmSolverPP, None), &want);
    println!("dpm-solver++ closed form: {d:.2e}");
    assert!(d < 1e-4, "{d}");
    // DDIM keeps the noise direction: x = √ᾱ₀·D + √(1−ᾱ₀)·(x_T − √ᾱ_N·D)/√(1−ᾱ_N).
    let (a0, an) = (f64::from(ns.alphas_bar[0]), f64::from(ns.alphas_bar[996]));
    let want: Vec<f64> = xv
        .iter()
        .map(|v| {
            a0.sqrt() * target + (1.0 - a0).sqrt() * (v - an.sqrt() * target) / (1.0 - an).sqrt()
        })
        .collect();
    let d = max_diff(&run(SamplerKind::Ddim, None), &want);
    println!("ddim closed form: {d:.2e}");
    assert!(d < 1e-4, "{d}");
    // DDPM's last posterior mean is x0 itself (coefficients 1 and 0 at n = 0).
    let d = max_diff(&run(SamplerKind::Ddpm, None), &vec![target; xv.len()]);
    println!("ddpm closed form: {d:.2e}");
    assert!(d < 1e-4, "{d}");
}

/// Stacked states at different points of different schedules give what each gives alone.
#[test]
fn batched_states_at_different_progress_match_running_alone() {
    let s = sampler();
    let runs = [
        (SamplerKind::DpmSolverPP, Some(20), 1u64),
        (SamplerKind::DpmSolverPP, Some(20), 2),
        (SamplerKind::Ddim, Some(25), 3),
        (SamplerKind::Ddpm, None, 4),
        (SamplerKind::DpmSolverPP, Some(8), 5),
    ];
    let start = |(kind, steps, seed): (SamplerKind, Option<usize>, u64)| {
        s.start(kind, steps, &gaussian_noise(&DIMS, seed, &Device::Cpu).unwrap(), seed).unwrap()
    };
    let alone: Vec<Vec<f32>> =
        runs.iter().map(|&r| run_alone(start(r), &grid_snap).unwrap()).collect();

    let mut states = vec![start(runs[0])];
    let mut model = toy_model;
    for _ in 0..3 {
        let mut refs: Vec<&mut SamplerState> = states.iter_mut().collect();
        assert_eq!(step_batch(&mut refs, &mut model, &grid_snap).unwrap(), 1);
    }
    assert_eq!(states[0].step(), 3);
    states.extend(runs[1..].iter().map(|&r| start(r)));
    let mut refs: Vec<&mut SamplerState> = states.iter_mut().collect();
    assert_eq!(step_batch(&mut refs, &mut model, &grid_snap).unwrap(), 5);
    sample(&mut states, toy_model, &grid_snap).unwrap();
    for (i, (state, want)) in states.into_iter().zip(&alone).enumerate() {
        let got = values(&state.final_latent().unwrap());
        let d = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        println!("{:?} run {i}: batched vs alone {d:.2e}", runs[i].0);
        assert!(d <= 1e-5, "run {i}: {d}");
    }
}

#[test]
fn states_report_progress_and_refuse_misuse() {
    let s = sampler();
    let x_t = gaussian_noise(&DIMS, 0, &Device::Cpu).unwrap();
    let mut state = s.start(SamplerKind::DpmSolverPP, None, &x_t, 0).unwrap();
    assert_eq!((state.step(), state.total_evals()), (0, 20));
    let (x, t) = state.next_input().unwrap();
    assert_eq!((x.dims(), t), (&[1, 3, 4, 5][..], 999.0));
    assert!(state.accept_x0(&x).is_err(), "accept without predict");
    state.advance(&x.zeros_like().unwrap(), &|x| Ok(x.clone())).unwrap();
    assert_eq!(state.step(), 1);
    assert!(state.final_latent().is_err(), "finish before the end");
    assert!(s.start(SamplerKind::Ddpm, Some(20), &x_t, 0).is_err());
    assert!(s.start(SamplerKind::Ddim, Some(300), &x_t, 0).is_err());
    assert!(s.start(SamplerKind::DpmSolverPP, Some(0), &x_t, 0).is_err());
    assert_eq!("dpm-solver++".parse::<SamplerKind>().unwrap(), SamplerKind::DpmSolverPP);
    assert_eq!(serde_json::to_string(&SamplerKind::Ddim).unwrap(), "\"ddim\"");
    assert!("euler".parse::<SamplerKind>().is_err());
}
