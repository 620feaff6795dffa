//! Links the libtorch found by torch-sys, keeps `torch_cuda` linked (see below), sets an rpath so the
//! binary runs without LD_LIBRARY_PATH, and compiles the small C++ shim in `csrc/`.
use std::env;
use std::path::PathBuf;

fn main() {
    for f in ["shim.cpp", "dist.cpp", "dist.h", "dist_nccl.cpp", "dist_nccl_none.cpp", "gloo_stub"] {
        println!("cargo:rerun-if-changed=csrc/{f}");
    }
    println!("cargo:rerun-if-changed=build.rs");
    // torch-sys exports the folder holding libtorch's shared libraries as DEP_TCH_LIBTORCH_LIB.
    let lib = PathBuf::from(env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys did not report its libtorch folder"));
    let root = lib.parent().expect("libtorch lib folder has a parent").to_path_buf();
    let include = root.join("include");

    // torch-sys asks for torch_cuda, but `--as-needed` drops it because no symbol of it is referenced,
    // and then CUDA is never registered: tch::Cuda::is_available() is false even on a GPU machine.
    // libtorch_cuda only exists in CUDA builds of libtorch; a CPU-only libtorch links without it.
    println!("cargo:rustc-link-search=native={}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-ltorch");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    // rpath: the binary finds libtorch (and, through libtorch's own rpaths, the CUDA wheels) by itself.
    // TPP_LIBTORCH_RPATH adds another folder in front (e.g. a device machine's libtorch).
    if let Ok(extra) = env::var("TPP_LIBTORCH_RPATH") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{extra}");
    }
    println!("cargo:rerun-if-env-changed=TPP_LIBTORCH_RPATH");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());

    let base = || {
        let mut b = cc::Build::new();
        b.cpp(true)
            .include(&include)
            .include(include.join("torch/csrc/api/include"))
            .include("csrc")
            .flag("-std=c++17")
            .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
            .flag_if_supported("-Wno-unused-parameter")
            .warnings(false);
        b
    };
    // c10d: gloo is compiled into libtorch_cpu, but the wheel ships no gloo headers; ProcessGroupGloo.hpp
    // needs only declarations of them (csrc/gloo_stub).
    base()
        .file("csrc/shim.cpp")
        .file("csrc/dist.cpp")
        .include("csrc/gloo_stub")
        .define("USE_C10D_GLOO", None)
        .compile("tppshim");
    nccl(&lib, &base);
}

/// NCCL process groups when libtorch has CUDA and the NCCL and CUDA headers are found: the torch wheel's
/// nvidia packages give nccl.h and the CUDA runtime headers, PyPI `cuda-toolkit[cccl,crt]` the rest
/// (TPP_CUDA_INCLUDE: extra include folders, separated by ':'). Otherwise a stand-in that reports that
/// NCCL is not built in.
fn nccl(lib: &std::path::Path, base: &dyn Fn() -> cc::Build) {
    println!("cargo:rerun-if-env-changed=TPP_CUDA_INCLUDE");
    let mut dirs: Vec<PathBuf> = env::var("TPP_CUDA_INCLUDE")
        .unwrap_or_default()
        .split(':')
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .collect();
    if let Some(nvidia) = lib.parent().and_then(|t| t.parent()).map(|s| s.join("nvidia"))
        && let Ok(entries) = std::fs::read_dir(nvidia)
    {
        let mut wheel: Vec<PathBuf> =
            entries.flatten().map(|e| e.path().join("include")).filter(|d| d.is_dir()).collect();
        wheel.sort();
        dirs.extend(wheel);
    }
    let has = |file: &str| dirs.iter().any(|d| d.join(file).exists());
    if lib.join("libtorch_cuda.so").exists() && has("nccl.h") && has("crt/host_config.h") {
        let mut b = base();
        b.cargo_warnings(false).file("csrc/dist_nccl.cpp").define("USE_C10D_NCCL", None).define("USE_CUDA", None);
        for d in &dirs {
            b.include(d);
        }
        if b.try_compile("tppnccl").is_ok() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-lc10_cuda");
            println!("cargo:rustc-link-arg=-Wl,--as-needed");
            return;
        }
        println!(
            "cargo:warning=NCCL and CUDA headers found but csrc/dist_nccl.cpp did not compile; building without NCCL"
        );
    }
    base().file("csrc/dist_nccl_none.cpp").compile("tppnccl");
}
