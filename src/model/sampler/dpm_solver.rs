//! DPM-Solver++ as SlotDiffusion evaluates (`cond_ddpm.py::generate_imgs(use_dpm=True)` →
//! `dpm_solver.py`): data prediction, method `singlestep`, order 3, time-uniform steps from
//! t = 1 to t = 1/T, each x0 prediction snapped (`vq_denoised`), no final denoising step; the
//! result is the latent at t = 1/T, not quantized.
//!
//! With N evaluations the solver takes ⌊N/3⌋+1 updates whose orders are 3,3,… then 2 or 1
//! (for 20: six third-order updates and one second-order update), spanning the points of
//! linspace(1, 1/T, N+1) at the cumulative sums of the orders. Inside an update from s to t the
//! intermediate times s1, s2 come from time-uniform inner points turned into log-SNR ratios
//! r1, r2 and back through `inverse_lambda`, as the official code does.

use candle_core::{bail, Result, Tensor};

use super::schedule::{linspace_f32, NoiseSchedule};
use super::{divide, scale, Solver};

/// a·x − b·m₀ (+ c·(m_k − m₀)): every intermediate input and every result of a singlestep
/// DPM-Solver++ update, where x is the update's starting latent and m its x0 predictions.
#[derive(Debug, Clone, Copy)]
struct Combination {
    a: f32,
    b: f32,
    correction: Option<(f32, usize)>,
}

impl Combination {
    /// Evaluates the combination in the official order of operations.
    fn apply(&self, x: &Tensor, preds: &[Tensor]) -> Result<Tensor> {
        let base = (scale(x, self.a)? - scale(&preds[0], self.b)?)?;
        match self.correction {
            None => Ok(base),
            Some((c, k)) => base + scale(&(&preds[k] - &preds[0])?, c)?,
        }
    }
}

/// One model evaluation: its time and the coefficients that turn ε into x0 = (x − σε)/α.
#[derive(Debug, Clone, Copy)]
struct Eval {
    model_time: f32,
    alpha: f32,
    sigma: f32,
}

impl Eval {
    fn at(schedule: &NoiseSchedule, t: f32) -> Self {
        Self {
            model_time: schedule.model_time(t),
            alpha: schedule.alpha(t),
            sigma: schedule.sigma(t),
        }
    }
}

/// One singlestep update of order `evals.len()`: the evaluations, how to form the input of
/// each evaluation after the first, and how to form the latent at the update's end.
#[derive(Debug, Clone)]
struct Update {
    evals: Vec<Eval>,
    inputs: Vec<Combination>,
    output: Combination,
}

/// The orders of the updates for `steps` evaluations
/// (`get_orders_and_timesteps_for_singlestep_solver`, order 3).
fn orders(steps: usize) -> Vec<usize> {
    let k = steps / 3 + 1;
    let (threes, tail): (usize, &[usize]) = match steps % 3 {
        0 => (k - 2, &[2, 1]),
        1 => (k - 1, &[1]),
        _ => (k - 1, &[2]),
    };
    std::iter::repeat_n(3, threes).chain(tail.iter().copied()).collect()
}

/// The update from s to t of the given order, with every coefficient computed in f32 as
/// `singlestep_dpm_solver_{first,second,third}_update` do for `dpmsolver++`.
fn update(ns: &NoiseSchedule, s: f32, t: f32, order: usize) -> Update {
    let inner: Vec<f32> = linspace_f32(s, t, order + 1).iter().map(|&u| ns.lambda(u)).collect();
    let ratio = |i: usize| (inner[i] - inner[0]) / (inner[order] - inner[0]);
    let (lambda_s, sigma_s) = (ns.lambda(s), ns.sigma(s));
    let h = ns.lambda(t) - lambda_s;
    let alpha_t = ns.alpha(t);
    let phi_1 = (-h).exp_m1();
    let first = Combination { a: ns.sigma(t) / sigma_s, b: alpha_t * phi_1, correction: None };
    let mut evals = vec![Eval::at(ns, s)];
    if order == 1 {
        return Update { evals, inputs: vec![], output: first };
    }
    let r1 = ratio(1);
    let s1 = ns.inverse_lambda(lambda_s + r1 * h);
    evals.push(Eval::at(ns, s1));
    let to_s1 = Combination {
        a: ns.sigma(s1) / sigma_s,
        b: ns.alpha(s1) * (-r1 * h).exp_m1(),
        correction: None,
    };
    if order == 2 {
        let c = -((0.5 / r1) * (alpha_t * phi_1));
        return Update {
            evals,
            inputs: vec![to_s1],
            output: Combination { correction: Some((c, 1)), ..first },
        };
    }
    let r2 = ratio(2);
    let s2 = ns.inverse_lambda(lambda_s + r2 * h);
    evals.push(Eval::at(ns, s2));
    let alpha_s2 = ns.alpha(s2);
    let phi_22 = (-r2 * h).exp_m1() / (r2 * h) + 1.0;
    let to_s2 = Combination {
        a: ns.sigma(s2) / sigma_s,
        b: alpha_s2 * (-r2 * h).exp_m1(),
        correction: Some((r2 / r1 * (alpha_s2 * phi_22), 1)),
    };
    let phi_2 = phi_1 / h + 1.0;
    let c = (1.0 / r2) * (alpha_t * phi_2);
    Update {
        evals,
        inputs: vec![to_s1, to_s2],
        output: Combination { correction: Some((c, 2)), ..first },
    }
}

/// Every update for `steps` evaluations, from t = 1 to t = 1/T.
fn plan(ns: &NoiseSchedule, steps: usize) -> Vec<Update> {
    let end = (1.0 / ns.timesteps() as f64) as f32;
    let grid = linspace_f32(1.0, end, steps + 1);
    let mut at = 0;
    orders(steps)
        .into_iter()
        .map(|order| {
            let u = update(ns, grid[at], grid[at + order], order);
            at += order;
            u
        })
        .collect()
}

/// One sample's DPM-Solver++ run: the update in progress, the latent at its start, the x0
/// predictions made so far within it and the input of the next evaluation.
pub(super) struct DpmSolver {
    updates: Vec<Update>,
    update: usize,
    x: Tensor,
    preds: Vec<Tensor>,
    input: Tensor,
    done: usize,
    total: usize,
}

impl DpmSolver {
    /// A run of `steps` evaluations from the noise `x_t` (at t = 1).
    pub(super) fn new(ns: &NoiseSchedule, steps: usize, x_t: Tensor) -> Result<Self> {
        if steps == 0 {
            bail!("DPM-Solver++ needs at least one model evaluation");
        }
        Ok(Self {
            updates: plan(ns, steps),
            update: 0,
            x: x_t.clone(),
            preds: Vec::with_capacity(3),
            input: x_t,
            done: 0,
            total: steps,
        })
    }

    fn eval(&self) -> Option<&Eval> {
        self.updates.get(self.update).map(|u| &u.evals[self.preds.len()])
    }
}

impl Solver for DpmSolver {
    fn model_time(&self) -> Option<f32> {
        self.eval().map(|e| e.model_time)
    }

    fn latent(&self) -> &Tensor {
        &self.input
    }

    fn predict_x0(&self, eps: &Tensor) -> Result<Tensor> {
        let Some(e) = self.eval() else { bail!("DPM-Solver++ run is already finished") };
        divide(&(&self.input - scale(eps, e.sigma)?)?, e.alpha)
    }

    fn accept(&mut self, _eps: &Tensor, x0: &Tensor) -> Result<()> {
        self.preds.push(x0.clone());
        self.done += 1;
        let u = &self.updates[self.update];
        if self.preds.len() < u.evals.len() {
            self.input = u.inputs[self.preds.len() - 1].apply(&self.x, &self.preds)?;
        } else {
            self.x = u.output.apply(&self.x, &self.preds)?;
            self.input = self.x.clone();
            self.preds.clear();
            self.update += 1;
        }
        Ok(())
    }

    fn progress(&self) -> (usize, usize) {
        (self.done, self.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::sampler::schedule::ScheduleConfig;

    #[test]
    fn twenty_evaluations_are_six_third_order_updates_and_one_second_order() {
        assert_eq!(orders(20), vec![3, 3, 3, 3, 3, 3, 2]);
        assert_eq!(orders(3), vec![2, 1]);
        assert_eq!(orders(1), vec![1]);
        for n in 1..60 {
            assert_eq!(orders(n).iter().sum::<usize>(), n);
        }
    }

    #[test]
    fn intermediate_times_lie_inside_each_update() {
        let ns = NoiseSchedule::new(&ScheduleConfig::default()).unwrap();
        let p = plan(&ns, 20);
        assert_eq!(p.len(), 7);
        assert_eq!(p[0].evals[0].model_time, 999.0);
        for u in &p {
            let ts: Vec<f32> = u.evals.iter().map(|e| e.model_time).collect();
            assert!(ts.windows(2).all(|w| w[0] > w[1]), "{ts:?}");
        }
        let last = &p[6].evals;
        assert!(last[1].model_time > 0.0 && last[1].model_time < 100.0);
    }
}
