//! Choosing the compute device and dtype from the command line or environment.

use std::fmt;
use std::str::FromStr;

use anyhow::bail;
use candle_core::{DType, Device, DeviceLocation};
use serde::{Deserialize, Serialize};

/// Which device to run on (`auto`, `cpu`, `cuda`, `cuda:N`, `metal`, `metal:N`); `auto`
/// picks the first CUDA GPU, then the first Metal GPU, then the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The best device this build and machine have.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// The CUDA GPU of this ordinal (needs the `cuda` feature); `cuda` alone means 0.
    Cuda(usize),
    /// The Metal GPU of this ordinal (needs the `metal` feature); `metal` alone means 0.
    Metal(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        let (kind, ordinal) = match s.split_once(':') {
            Some((kind, n)) => {
                let n = n.parse::<usize>().map_err(|_| {
                    format!("`{n}` is not a GPU number: write e.g. `{kind}:0` or `{kind}:1`")
                })?;
                (kind, Some(n))
            }
            None => (s.as_str(), None),
        };
        match (kind, ordinal) {
            ("auto", None) => Ok(Self::Auto),
            ("cpu", None) => Ok(Self::Cpu),
            ("cuda", n) => Ok(Self::Cuda(n.unwrap_or(0))),
            ("metal", n) => Ok(Self::Metal(n.unwrap_or(0))),
            ("auto" | "cpu", Some(_)) => Err(format!("`{kind}` takes no GPU number")),
            _ => Err(format!(
                "unknown device `{s}`: expected auto, cpu, cuda, cuda:N, metal or metal:N"
            )),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Metal(n) => write!(f, "metal:{n}"),
        }
    }
}

impl DeviceChoice {
    /// Opens the chosen device; asking for one this build lacks is an error that says which
    /// cargo feature to build with, never a panic.
    pub fn open(self) -> anyhow::Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    bail!("this slotserve was built without CUDA: rebuild with `--features cuda`");
                }
                Ok(Device::new_cuda(n)?)
            }
            Self::Metal(n) => {
                if !cfg!(feature = "metal") {
                    bail!(
                        "this slotserve was built without Metal: rebuild with `--features metal`"
                    );
                }
                Ok(Device::new_metal(n)?)
            }
            Self::Auto => {
                if cfg!(feature = "cuda") && candle_core::utils::cuda_is_available() {
                    return Self::Cuda(0).open();
                }
                if cfg!(feature = "metal") && candle_core::utils::metal_is_available() {
                    return Self::Metal(0).open();
                }
                Ok(Device::Cpu)
            }
        }
    }
}

/// The name of a device for logs and `/info`, as `--device` would pick it: `cpu`, `cuda:1`,
/// `metal:0`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".to_string(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
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
    fn device_names_parse_with_gpu_numbers() {
        let cases = [
            ("auto", DeviceChoice::Auto),
            ("cpu", DeviceChoice::Cpu),
            ("cuda", DeviceChoice::Cuda(0)),
            ("cuda:0", DeviceChoice::Cuda(0)),
            ("CUDA:1", DeviceChoice::Cuda(1)),
            ("metal", DeviceChoice::Metal(0)),
            ("metal:2", DeviceChoice::Metal(2)),
        ];
        for (text, choice) in cases {
            assert_eq!(text.parse::<DeviceChoice>(), Ok(choice), "{text}");
            assert_eq!(choice.to_string().parse::<DeviceChoice>(), Ok(choice), "{choice}");
        }
    }

    #[test]
    fn bad_device_names_say_what_is_expected() {
        let err = |s: &str| s.parse::<DeviceChoice>().unwrap_err();
        assert!(err("cuda:x").contains("`x` is not a GPU number"), "{}", err("cuda:x"));
        assert!(err("cuda:-1").contains("not a GPU number"), "{}", err("cuda:-1"));
        assert!(err("cpu:0").contains("takes no GPU number"), "{}", err("cpu:0"));
        for bad in ["gpu", "", "tpu:0"] {
            assert!(err(bad).contains("expected auto, cpu, cuda, cuda:N"), "{}", err(bad));
        }
    }

    #[test]
    fn missing_backends_are_clear_errors() {
        if !cfg!(feature = "cuda") {
            for gpu in [0, 1] {
                let err = DeviceChoice::Cuda(gpu).open().unwrap_err().to_string();
                assert!(err.contains("built without CUDA"), "{err}");
                assert!(err.contains("--features cuda"), "{err}");
            }
        }
        if !cfg!(feature = "metal") {
            let err = DeviceChoice::Metal(0).open().unwrap_err().to_string();
            assert!(err.contains("--features metal"), "{err}");
        }
        let cpu = DeviceChoice::Cpu.open().unwrap();
        assert_eq!(device_name(&cpu), "cpu");
    }
}
