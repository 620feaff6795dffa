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

thread_local! {
    /// bf16 autocast on the CPU for this thread's stages (off: fp32).
    static CPU_BF16: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Turns bf16 autocast on the CPU on or off for what this thread runs next (a stage sets it from its
/// `cpu_bf16` setting). Worth it only on CPUs with bf16 matrix instructions (AVX512-BF16, AMX): there
/// oneDNN's bf16 GEMMs run 2-3x faster than fp32 ones; elsewhere they are slower.
pub fn set_cpu_bf16(on: bool) {
    CPU_BF16.with(|c| c.set(on));
}

/// Whether CPU work of this thread runs under bf16 autocast.
pub fn cpu_bf16() -> bool {
    CPU_BF16.with(std::cell::Cell::get)
}

/// Whether work on `device` runs under bf16 autocast: always on CUDA, on the CPU when [`set_cpu_bf16`]
/// turned it on.
pub fn autocasts(device: Device) -> bool {
    device.is_cuda() || cpu_bf16()
}

/// Runs `f` under bf16 autocast where [`autocasts`], plainly otherwise.
pub fn autocast<T>(device: Device, f: impl FnOnce() -> T) -> T {
    autocast_switch(device, true, f)
}

/// Runs `f` in fp32 inside an autocast region (precision-critical steps such as DINO's cosine logits,
/// whose bf16 rounding would be amplified by the 0.04 teacher temperature).
pub fn without_autocast<T>(device: Device, f: impl FnOnce() -> T) -> T {
    autocast_switch(device, false, f)
}

/// Autocast `enabled` or not around `f` for `device`'s libtorch device type, where it autocasts at all.
fn autocast_switch<T>(device: Device, enabled: bool, f: impl FnOnce() -> T) -> T {
    match device {
        _ if !autocasts(device) => f(),
        Device::Cuda(_) => autocast_region(DEVICE_TYPE_CUDA, enabled, f),
        _ => autocast_region(DEVICE_TYPE_CPU, enabled, f),
    }
}

const DEVICE_TYPE_CPU: i32 = 0;
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

/// Keeps freed host memory in the process for the next allocation of its size, instead of handing it back
/// to the kernel and faulting in fresh zeroed pages at the next step. libtorch's CPU tensors come from
/// glibc's malloc, which maps every block above a threshold (128 KiB at first, raised by glibc only as
/// large blocks happen to be freed) straight from the kernel; activations of a training step are such
/// blocks, so every step paid page faults and page clearing. Measured on the pilot MAE step (2 cores):
/// forward 230-280 ms without, 220-225 ms with (PyTorch's own script: 217 ms); see BENCHMARKS.md. The
/// process then keeps up to its peak heap resident, as PyTorch's caching GPU allocator keeps device
/// memory. Any `MALLOC_*_` tuning variable set by the user wins, and `TPP_MALLOC_TUNING=0` keeps glibc's
/// defaults (for comparisons): nothing is changed then. glibc only.
pub fn tune_host_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_TOP_PAD: i32 = -2;
        const M_MMAP_THRESHOLD: i32 = -3;
        unsafe extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        let user = ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_"];
        if user.iter().any(|v| std::env::var_os(v).is_some())
            || std::env::var_os("TPP_MALLOC_TUNING") == Some("0".into())
        {
            return;
        }
        // SAFETY: glibc's mallopt only sets allocator parameters; called before other threads allocate.
        unsafe {
            // glibc's largest mmap threshold (32 MiB on 64-bit); blocks below it come from the heap.
            mallopt(M_MMAP_THRESHOLD, 32 << 20);
            // Free heap memory at the top is returned only above 2 GiB, and the heap grows in 256 MiB steps.
            mallopt(M_TRIM_THRESHOLD, i32::MAX);
            mallopt(M_TOP_PAD, 256 << 20);
        }
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
