//! Choosing the compute device and dtype from the command line or environment.

use anyhow::bail;
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

/// Which device to run on; `auto` picks CUDA, then Metal, then the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// The best device this build and machine have.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// The first CUDA GPU (needs the `cuda` feature).
    Cuda,
    /// The first Metal GPU (needs the `metal` feature).
    Metal,
}

impl DeviceChoice {
    /// Opens the chosen device; asking for one this build lacks is an error that says which
    /// cargo feature to build with, never a panic.
    pub fn open(self) -> anyhow::Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda => {
                if !cfg!(feature = "cuda") {
                    bail!("this slotserve was built without CUDA: rebuild with `--features cuda`");
                }
                Ok(Device::new_cuda(0)?)
            }
            Self::Metal => {
                if !cfg!(feature = "metal") {
                    bail!(
                        "this slotserve was built without Metal: rebuild with `--features metal`"
                    );
                }
                Ok(Device::new_metal(0)?)
            }
            Self::Auto => {
                if cfg!(feature = "cuda") && candle_core::utils::cuda_is_available() {
                    return Self::Cuda.open();
                }
                if cfg!(feature = "metal") && candle_core::utils::metal_is_available() {
                    return Self::Metal.open();
                }
                Ok(Device::Cpu)
            }
        }
    }
}

/// A short name of a device for logs and `/info`.
pub fn device_name(device: &Device) -> &'static str {
    match device {
        Device::Cpu => "cpu",
        Device::Cuda(_) => "cuda",
        Device::Metal(_) => "metal",
    }
}

/// The floating-point type weights and activations use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DTypeChoice {
    /// 32-bit floats (exact with the official code).
    #[default]
    F32,
    /// 16-bit IEEE floats.
    F16,
    /// bfloat16.
    Bf16,
}

impl DTypeChoice {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_backends_are_clear_errors() {
        if !cfg!(feature = "cuda") {
            let err = DeviceChoice::Cuda.open().unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
        }
        if !cfg!(feature = "metal") {
            let err = DeviceChoice::Metal.open().unwrap_err().to_string();
            assert!(err.contains("--features metal"), "{err}");
        }
        assert!(DeviceChoice::Cpu.open().unwrap().is_cpu());
    }
}
