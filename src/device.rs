//! Device selection and the few libtorch features reached through the C++ shim (`csrc/shim.cpp`).
use anyhow::{Result, bail};
use tch::Device;

unsafe extern "C" {
    fn tpp_set_cuda_autocast_bf16(enable_bf16: i32) -> i32;
    fn tpp_cuda_peak_allocated(device: i32) -> i64;
    fn tpp_cuda_reset_peak(device: i32) -> i32;
}

/// Parses `cpu`, `cuda` or `cuda:N`; CUDA must actually be available.
pub fn parse_device(s: &str) -> Result<Device> {
    let dev = match s {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => Device::Cuda(n),
            None => bail!("unknown device '{s}' (expected cpu, cuda or cuda:N)"),
        },
    };
    if let Device::Cuda(n) = dev {
        if !tch::Cuda::is_available() {
            bail!("device '{s}' requested but CUDA is not available (no GPU, or libtorch without CUDA)");
        }
        if n >= tch::Cuda::device_count() as usize {
            bail!("device '{s}' requested but only {} CUDA device(s) exist", tch::Cuda::device_count());
        }
    }
    Ok(dev)
}

/// Makes `tch::autocast` use bf16 on CUDA (libtorch defaults to fp16). Idempotent.
pub fn use_bf16_autocast() -> Result<()> {
    // SAFETY: plain C call; the shim catches every C++ exception.
    if unsafe { tpp_set_cuda_autocast_bf16(1) } != 0 {
        bail!("could not set the CUDA autocast dtype to bf16");
    }
    Ok(())
}

/// Runs `f` under bf16 autocast on CUDA, plainly on CPU.
pub fn autocast<T>(device: Device, f: impl FnOnce() -> T) -> T {
    if device.is_cuda() && use_bf16_autocast().is_ok() { tch::autocast(true, f) } else { f() }
}

/// Peak bytes allocated on a CUDA device since the last reset; None on CPU.
pub fn peak_memory(device: Device) -> Option<u64> {
    match device {
        // SAFETY: plain C call; the shim catches every C++ exception.
        Device::Cuda(n) => u64::try_from(unsafe { tpp_cuda_peak_allocated(n as i32) }).ok(),
        _ => None,
    }
}

pub fn reset_peak_memory(device: Device) {
    if let Device::Cuda(n) = device {
        // SAFETY: as above.
        unsafe { tpp_cuda_reset_peak(n as i32) };
    }
}

/// Sets the CPU thread count (0 keeps libtorch's default: one per core).
pub fn set_threads(n: usize) {
    if n > 0 {
        tch::set_num_threads(n as i32);
    }
}
