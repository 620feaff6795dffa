//! Device selection and the few libtorch features reached through the C++ shim (`csrc/shim.cpp`).
use anyhow::Result;
use tch::Device;

unsafe extern "C" {
    fn tpp_autocast_enter(device_type: i32, enabled: i32) -> i32;
    fn tpp_autocast_exit(device_type: i32, prev: i32) -> i32;
    fn tpp_cuda_peak_allocated(device: i32) -> i64;
    fn tpp_cuda_reset_peak(device: i32) -> i32;
}

/// Parses `auto`, `cpu`, `cuda` or `cuda:N`; CUDA must actually be available. `auto` is CUDA when a
/// device is present (the process's LOCAL_RANK under torchrun), else the CPU.
pub fn parse_device(s: &str) -> Result<Device> {
    let dev = match s {
        "auto" if tch::Cuda::is_available() => Device::Cuda(crate::dist::local_cuda_index()),
        "auto" | "cpu" => Device::Cpu,
        // Under torchrun each process takes the GPU of its LOCAL_RANK.
        "cuda" => Device::Cuda(crate::dist::local_cuda_index()),
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => Device::Cuda(n),
            None => {
                return Err(crate::error::bad_input!("--device '{s}': unknown (expected auto, cpu, cuda or cuda:N)"));
            }
        },
    };
    if let Device::Cuda(n) = dev {
        if !tch::Cuda::is_available() {
            let e = "CUDA is not available (no GPU, or libtorch without CUDA)";
            return Err(crate::error::bad_input!("--device '{s}': {e}"));
        }
        if n >= tch::Cuda::device_count() as usize {
            let n = tch::Cuda::device_count();
            return Err(crate::error::bad_input!("--device '{s}': only {n} CUDA device(s) exist"));
        }
    }
    Ok(dev)
}

/// One line for the log: the device a command runs on and, for `auto`, why.
pub fn describe(asked: &str, dev: Device) -> String {
    let what = match dev {
        Device::Cuda(n) => format!("cuda:{n} ({} CUDA device(s) present)", tch::Cuda::device_count()),
        _ => format!("cpu, {} threads", tch::get_num_threads()),
    };
    match (asked, dev) {
        ("auto", Device::Cpu) => format!("device: {what} (--device auto: no CUDA device found)"),
        ("auto", _) => format!("device: {what} (--device auto)"),
        _ => format!("device: {what}"),
    }
}

/// Runs `f` under bf16 autocast on CUDA, plainly on CPU (CPU bf16 matmuls are slower than f32 ones).
pub fn autocast<T>(device: Device, f: impl FnOnce() -> T) -> T {
    if device.is_cuda() { autocast_region(DEVICE_TYPE_CUDA, true, f) } else { f() }
}

/// Runs `f` in fp32 inside an autocast region (precision-critical steps such as DINO's cosine logits,
/// whose bf16 rounding would be amplified by the 0.04 teacher temperature).
pub fn without_autocast<T>(device: Device, f: impl FnOnce() -> T) -> T {
    if device.is_cuda() { autocast_region(DEVICE_TYPE_CUDA, false, f) } else { f() }
}

const DEVICE_TYPE_CUDA: i32 = 1;

/// Autocast on or off for one libtorch device type around `f`, left again even if `f` unwinds.
fn autocast_region<T>(device_type: i32, enabled: bool, f: impl FnOnce() -> T) -> T {
    struct Exit(i32, i32);
    impl Drop for Exit {
        fn drop(&mut self) {
            // SAFETY: plain C call; the shim catches every C++ exception.
            unsafe { tpp_autocast_exit(self.0, self.1) };
        }
    }
    // SAFETY: as above.
    let prev = unsafe { tpp_autocast_enter(device_type, enabled as i32) };
    // Unreachable in practice (the calls only set flags); without autocast the bf16 weights would fail
    // later with a dtype error that hides this cause.
    assert!(prev >= 0, "libtorch could not enable autocast for device type {device_type}");
    let _exit = Exit(device_type, prev);
    f()
}

/// Peak bytes allocated on a CUDA device since the last reset; None on CPU.
pub fn peak_memory(device: Device) -> Option<u64> {
    match device {
        // SAFETY: plain C call; the shim catches every C++ exception.
        Device::Cuda(n) => u64::try_from(unsafe { tpp_cuda_peak_allocated(n as i32) }).ok(),
        _ => None,
    }
}

/// Starts a new peak-memory measurement (CUDA; nothing on CPU).
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    const DEVICE_TYPE_CPU: i32 = 0;

    unsafe extern "C" {
        fn tpp_autocast_enabled(device_type: i32) -> i32;
    }

    /// The shim's autocast (CUDA's path, exercised here on the CPU device type) casts matmuls to bf16
    /// inside, nests, switches off in an fp32 region, and restores the previous state after.
    #[test]
    fn autocast_region_casts_nests_and_restores() {
        let a = Tensor::ones([4, 4], (Kind::Float, Device::Cpu));
        let enabled = || unsafe { tpp_autocast_enabled(DEVICE_TYPE_CPU) };
        assert_eq!(enabled(), 0);
        let (outer, inner, off) = autocast_region(DEVICE_TYPE_CPU, true, || {
            let inner = autocast_region(DEVICE_TYPE_CPU, true, || a.matmul(&a).kind());
            assert_eq!(enabled(), 1, "inner exit must restore the outer region's state");
            let off = autocast_region(DEVICE_TYPE_CPU, false, || a.matmul(&a).kind());
            assert_eq!(enabled(), 1);
            (a.matmul(&a).kind(), inner, off)
        });
        assert_eq!((outer, inner, off), (Kind::BFloat16, Kind::BFloat16, Kind::Float));
        assert_eq!(enabled(), 0);
        assert_eq!(a.matmul(&a).kind(), Kind::Float);
    }
}
