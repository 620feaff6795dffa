//! Links the libtorch found by torch-sys, keeps `torch_cuda` linked (see below), sets an rpath so the
//! binary runs without LD_LIBRARY_PATH, and compiles the small C++ shim in `csrc/`.
use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/shim.cpp");
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

    cc::Build::new()
        .cpp(true)
        .file("csrc/shim.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        .compile("tppshim");
}
