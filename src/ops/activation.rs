//! The exact (erf) GELU, alone ([`gelu_erf`]) and as the gate of a GEGLU ([`geglu`]).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};

/// `x·(1 + erf(x/√2))/2` elementwise, as [`Tensor::gelu_erf`].
///
/// f32 CPU tensors that need no gradients run a vectorised kernel (candle evaluates `erf` one
/// scalar at a time) whose `erf` is PyTorch's own approximation (absolute error < 1.5e-7);
/// everything else runs candle's op.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !fast(x) {
        return x.gelu_erf();
    }
    x.contiguous()?.apply_op1_no_bwd(&Gelu { inner: None })
}

/// `value · gelu_erf(gate)` where `value` and `gate` are the first and second halves of `x`'s
/// last dimension (the GEGLU feed-forward of the UNet's transformer blocks), in one pass.
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    let width = x.dim(D::Minus1)?;
    if width % 2 != 0 {
        candle_core::bail!("geglu: odd last dimension {width}")
    }
    let inner = width / 2;
    if !fast(x) {
        return x.narrow(D::Minus1, 0, inner)? * x.narrow(D::Minus1, inner, inner)?.gelu_erf()?;
    }
    x.contiguous()?.apply_op1_no_bwd(&Gelu { inner: Some(inner) })
}

/// Whether `x` can take the kernel.
fn fast(x: &Tensor) -> bool {
    super::fast_path(x) && !x.track_op()
}

/// One call of the kernel: plain GELU, or GEGLU with `inner` features per half.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // read by the x86 kernels only
struct Gelu {
    inner: Option<usize>,
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "slotserve-gelu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::contiguous_f32(storage, layout)?;
        let mut dims = layout.dims().to_vec();
        #[cfg(target_arch = "x86_64")]
        {
            use super::x86::activation;
            let y = match self.inner {
                None => activation::gelu(x),
                Some(inner) => {
                    *dims.last_mut().expect("rank ≥ 1") = inner;
                    activation::geglu(x, inner)
                }
            };
            Ok((CpuStorage::F32(y), Shape::from(dims)))
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (x, &mut dims);
            Err(super::no_kernels())
        }
    }
}
