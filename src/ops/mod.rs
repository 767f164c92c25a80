//! Fast CPU kernels behind drop-in layers: convolution ([`Conv2d`]), GroupNorm with fused
//! SiLU ([`GroupNorm`]), fused attention ([`attention()`]), fully connected layers
//! ([`Linear`]), LayerNorm ([`LayerNorm`]), the exact GELU ([`gelu_erf`], [`geglu`]) and the
//! VQ codebook search ([`nearest_code`]).
//!
//! The packed kernels have no backward pass: whenever an input or weight is part of a gradient
//! graph (training) the layers take a differentiable path instead, for convolution the
//! patch-matrix product of [`patches`], which differentiates far faster than candle's own.
//!
//! candle's own convolution, normalisation and attention run 3–5× slower than PyTorch's on a
//! small AVX2 CPU, and its matrix product about 25 % slower (DESIGN.md section 4); together they
//! are nearly all of the UNet's time. These layers load
//! the same weights as their `candle_nn` counterparts and run f32 tensors on an x86-64 CPU with
//! AVX2 and FMA through kernels of their own (one register-blocked matrix-multiply micro-kernel,
//! rayon over the global pool). Any other device, dtype or CPU takes the plain candle path, as
//! does everything when `SLOTSERVE_PLAIN_OPS=1` (for A/B timing and debugging).

/// Implements candle's `CustomOp1` (the kernel alone, named `$name`) and `CustomOp2` (plus a
/// residual added to the output, named `$name-residual`) for a kernel type whose inherent
/// `run(x, residual)` does both.
macro_rules! plain_and_residual_ops {
    ($kernel:ty, $name:literal) => {
        impl candle_core::CustomOp1 for $kernel {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                storage: &candle_core::CpuStorage,
                layout: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                self.run((storage, layout), None)
            }
        }

        impl candle_core::CustomOp2 for $kernel {
            fn name(&self) -> &'static str {
                concat!($name, "-residual")
            }

            fn cpu_fwd(
                &self,
                x: &candle_core::CpuStorage,
                x_layout: &candle_core::Layout,
                residual: &candle_core::CpuStorage,
                residual_layout: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                self.run((x, x_layout), Some((residual, residual_layout)))
            }
        }
    };
}

mod activation;
mod attention;
mod conv;
mod group_norm;
mod layer_norm;
mod linear;
mod nearest;
mod norm_grad;
pub mod patches;
mod resample;
mod softmax;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use activation::{geglu, gelu_erf};
pub use attention::{attention, attention_reference, merge_heads, split_heads, split_qkv_heads};
pub use conv::{conv2d, conv2d_no_bias, Conv2d};
pub use group_norm::{group_norm, GroupNorm};
pub use layer_norm::{layer_norm, LayerNorm};
pub use linear::{linear, linear_no_bias, Linear};
pub use nearest::{nearest_code, nearest_code_reference};
pub use resample::upsample_nearest2x;
pub use softmax::softmax_last_dim;

use candle_core::{CpuStorage, DType, Layout, Result, Tensor};

/// Environment variable that, set to `1`, sends every op down the plain candle path.
pub const PLAIN_OPS_ENV: &str = "SLOTSERVE_PLAIN_OPS";

/// Whether this process runs the fast kernels at all: an x86-64 CPU with AVX2 and FMA, and
/// `SLOTSERVE_PLAIN_OPS` not set to `1` (decided once).
pub fn kernels_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| {
        let plain = std::env::var(PLAIN_OPS_ENV).is_ok_and(|v| v == "1");
        #[cfg(target_arch = "x86_64")]
        let simd = x86::available();
        #[cfg(not(target_arch = "x86_64"))]
        let simd = false;
        simd && !plain
    })
}

/// Whether `t` is an f32 tensor on the CPU of a machine running the fast kernels.
fn fast_path(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && kernels_enabled()
}

/// The f32 values of a contiguous CPU storage, from the layout's offset to its end.
fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("ops: expected a contiguous tensor")
    };
    Ok(&storage.as_slice::<f32>()?[start..end])
}

/// The error of a fast path reached on a CPU without the kernels (never, as `fast_path` guards).
#[cfg(not(target_arch = "x86_64"))]
fn no_kernels() -> candle_core::Error {
    candle_core::Error::Msg("ops: no CPU kernels for this architecture".into())
}
