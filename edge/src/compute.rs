//! Where training runs: CUDA when libtorch sees a GPU (Jetson, workstation), CPU otherwise.

use tch::{Device, Kind};

/// The device and numeric precision chosen for training on this box.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ComputeTarget {
    /// Where tensors live.
    pub device: Device,
    /// Precision of the matmuls ([`crate::llama::Llama::compute_kind`]): bf16 on CUDA, f32
    /// on the CPU (where bf16 matmuls are slower than f32 without AMX/AVX-512 BF16).
    pub compute_kind: Kind,
}

impl ComputeTarget {
    /// CUDA device 0 with bf16 matmuls if a GPU is visible, else the CPU in f32.
    /// `FEDSHIELD_DEVICE=cpu` forces the CPU.
    pub fn detect() -> Self {
        let forced_cpu = std::env::var("FEDSHIELD_DEVICE").is_ok_and(|v| v == "cpu");
        if !forced_cpu && tch::Cuda::is_available() {
            Self {
                device: Device::Cuda(0),
                compute_kind: Kind::BFloat16,
            }
        } else {
            Self::cpu()
        }
    }

    /// The CPU in f32.
    pub fn cpu() -> Self {
        Self {
            device: Device::Cpu,
            compute_kind: Kind::Float,
        }
    }

    /// A one-line description for logs.
    pub fn describe(&self) -> String {
        match self.device {
            Device::Cuda(i) => format!(
                "CUDA device {i} ({} GPUs), bf16 matmuls (f32 residual stream and parameters)",
                tch::Cuda::device_count()
            ),
            _ => format!("CPU, f32, {} threads", tch::get_num_threads()),
        }
    }
}
