//! Speed of the `slotserve::ops` kernels against the plain candle ops, on the shapes of the
//! DESIGN.md section 4 table, with PyTorch's figures from that table alongside.
//!
//! `cargo bench --bench ops` (optionally `-- RUNS`, default 15). Each figure is the median
//! wall time of RUNS calls after two warm-up calls, on rayon's global pool. Measure on an
//! otherwise idle machine: the load average is printed first. `benches/ops_reference.py` times
//! PyTorch on the same shapes for a side-by-side run.

use std::time::Instant;

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::Conv2dConfig;
use slotserve::ops;

/// Median wall time of `runs` calls of `f` (seconds), after two warm-up calls.
fn median_time(runs: usize, mut f: impl FnMut() -> Result<Tensor>) -> Result<f64> {
    for _ in 0..2 {
        f()?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[runs / 2])
}

/// One table row: the op, candle's time, ours, and PyTorch's figure from DESIGN.md.
struct Row {
    op: String,
    flop: Option<f64>,
    candle: f64,
    ours: f64,
    pytorch: &'static str,
}

impl Row {
    fn print(&self) {
        let rate = |t: f64| match self.flop {
            Some(flop) => format!("{:.1} GFLOP/s ({:.2} ms)", flop / t / 1e9, t * 1e3),
            None => format!("{:.3} ms", t * 1e3),
        };
        println!(
            "| {} | {} | {} | {:.2}× | {} |",
            self.op,
            rate(self.candle),
            rate(self.ours),
            self.candle / self.ours,
            self.pytorch
        );
    }
}

fn conv_row(
    channels: usize,
    size: usize,
    batch: usize,
    runs: usize,
    pytorch: &'static str,
) -> Result<Row> {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (batch, channels, size, size), &dev)?;
    let weight = Tensor::randn(0f32, 0.02, (channels, channels, 3, 3), &dev)?;
    let bias = Tensor::randn(0f32, 1.0, channels, &dev)?;
    let cfg = Conv2dConfig { padding: 1, ..Default::default() };
    let plain = candle_nn::Conv2d::new(weight.clone(), Some(bias.clone()), cfg);
    let fast = ops::Conv2d::new(weight, Some(bias), cfg)?;
    Ok(Row {
        op: format!("conv 3×3, {channels} ch, {size}², batch {batch}"),
        flop: Some(2.0 * (batch * channels * channels * 9 * size * size) as f64),
        candle: median_time(runs, || plain.forward(&x))?,
        ours: median_time(runs, || fast.forward(&x))?,
        pytorch,
    })
}

fn linear_row(runs: usize) -> Result<Row> {
    let (tokens, in_features, out_features) = (3136, 128, 1024);
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (1, tokens, in_features), &dev)?;
    let weight = Tensor::randn(0f32, 0.05, (out_features, in_features), &dev)?;
    let bias = Tensor::randn(0f32, 1.0, out_features, &dev)?;
    let plain = candle_nn::Linear::new(weight.clone(), Some(bias.clone()));
    let fast = ops::Linear::new(weight, Some(bias))?;
    Ok(Row {
        op: format!(
            "linear {in_features}→{out_features} over {tokens} tokens (matmul 3136×128×1024)"
        ),
        flop: Some(2.0 * (tokens * in_features * out_features) as f64),
        candle: median_time(runs, || plain.forward(&x))?,
        ours: median_time(runs, || fast.forward(&x))?,
        pytorch: "130 GFLOP/s",
    })
}

fn attention_row(runs: usize) -> Result<Row> {
    let (heads, tokens, width) = (4, 784, 32);
    let dev = Device::Cpu;
    let qkv: Vec<Tensor> = (0..3)
        .map(|_| Tensor::randn(0f32, 1.0, (1, heads, tokens, width), &dev))
        .collect::<Result<_>>()?;
    let (q, k, v) = (&qkv[0], &qkv[1], &qkv[2]);
    let scale = (width as f64).powf(-0.5);
    Ok(Row {
        op: "attention q·kᵀ, softmax, ·v: 4×784², head dim 32 (4·N²·d FLOP)".into(),
        flop: Some(4.0 * (heads * tokens * tokens * width) as f64),
        candle: median_time(runs, || ops::attention_reference(q, k, v, scale, None))?,
        ours: median_time(runs, || ops::attention(q, k, v, scale, None))?,
        pytorch: "scores + softmax alone: 44 GFLOP/s (3.58 ms)",
    })
}

fn group_norm_rows(runs: usize) -> Result<Vec<Row>> {
    let (batch, channels, size) = (4, 256, 32);
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (batch, channels, size, size), &dev)?;
    let weight = Tensor::randn(1f32, 0.1, channels, &dev)?;
    let bias = Tensor::randn(0f32, 0.1, channels, &dev)?;
    let plain = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, 32, 1e-5)?;
    let fast = ops::GroupNorm::new(weight, bias, channels, 32, 1e-5)?;
    Ok(vec![
        Row {
            op: "GroupNorm(32) on 4×256×32²".into(),
            flop: None,
            candle: median_time(runs, || plain.forward(&x))?,
            ours: median_time(runs, || fast.forward(&x))?,
            pytorch: "0.34 ms",
        },
        Row {
            op: "GroupNorm(32) + SiLU on 4×256×32²".into(),
            flop: None,
            candle: median_time(runs, || plain.forward(&x)?.silu())?,
            ours: median_time(runs, || fast.forward_silu(&x))?,
            pytorch: "(not in DESIGN.md)",
        },
    ])
}

fn main() -> Result<()> {
    let runs = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(15);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average: {}", load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
    println!(
        "threads: {}, fast kernels: {}, median of {runs} runs\n",
        rayon::current_num_threads(),
        ops::kernels_enabled()
    );
    println!("| op | candle | ours | speed-up | PyTorch (DESIGN.md) |");
    println!("|---|---|---|---|---|");
    for row in [
        conv_row(256, 16, 1, runs, "110 GFLOP/s")?,
        conv_row(256, 16, 4, runs, "123 GFLOP/s")?,
        conv_row(128, 56, 1, runs, "156 GFLOP/s")?,
        conv_row(128, 56, 4, runs, "110 GFLOP/s")?,
    ] {
        row.print();
    }
    linear_row(runs)?.print();
    attention_row(runs)?.print();
    for row in group_norm_rows(runs)? {
        row.print();
    }
    Ok(())
}
