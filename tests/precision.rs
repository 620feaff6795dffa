//! CPU bf16 autocast (`--cpu-bf16`): matrix products in bf16, attention in fp32, the same model within bf16
//! rounding, and the setting recorded with the stage.
mod common;

use common::{rel_err, tmp_dir, tpp_bin};
use tch::{Device, Kind, Tensor};
use tpp::backbone::{Backbone, VitConfig};

fn tiny() -> VitConfig {
    VitConfig {
        img_size: 32,
        patch_size: 4,
        embed_dim: 64,
        depth: 2,
        num_heads: 2,
        mlp_hidden: 128,
        ..VitConfig::preset("vit_tiny_patch16_224").unwrap()
    }
}

/// Under `set_cpu_bf16(true)` the linears run in bf16 and the attention in fp32 (libtorch's trace names
/// each operator's input types); outputs and gradients stay within bf16 rounding of fp32; the setting is
/// per thread.
#[test]
fn cpu_bf16_runs_linears_in_bf16_and_attention_in_fp32() {
    tch::manual_seed(0);
    let bb = Backbone::fresh(&tiny(), Device::Cpu).unwrap();
    let x = Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu));
    let run = |bf16: bool| {
        tpp::device::set_cpu_bf16(bf16);
        for (_, mut t) in bb.vs.variables() {
            t.zero_grad();
        }
        let y = tpp::device::autocast(Device::Cpu, || bb.vit.forward_features_t(&x, true)).to_kind(Kind::Float);
        y.square().mean(Kind::Float).backward();
        let g = bb.vs.variables()["blocks.0.attn.qkv.weight"].grad().copy();
        (y.detach(), g)
    };
    let (y32, g32) = run(false);
    let dir = tmp_dir("precision");
    let trace = dir.join("trace.json");
    tpp::profile::start_trace(Device::Cpu).unwrap();
    let (y16, g16) = run(true);
    tpp::profile::stop_trace(&trace).unwrap();
    assert!(!std::thread::spawn(tpp::device::cpu_bf16).join().unwrap(), "the setting is per thread");
    tpp::device::set_cpu_bf16(false);
    assert!(rel_err(&y16, &y32) < 3e-2, "features: {}", rel_err(&y16, &y32));
    assert!(rel_err(&g16, &g32) < 5e-2, "gradients: {}", rel_err(&g16, &g32));
    assert!(rel_err(&y16, &y32) > 0.0, "bf16 rounding must show");

    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let types = |prefix: &str| -> Vec<String> {
        v["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["name"].as_str().is_some_and(|n| n.starts_with(prefix)))
            .map(|e| e["args"]["Input type"].to_string())
            .collect()
    };
    let addmm = types("aten::addmm");
    assert!(!addmm.is_empty() && addmm.iter().all(|t| t.contains("c10::BFloat16")), "{addmm:?}");
    let attn = types("aten::_scaled_dot_product_flash_attention");
    assert!(!attn.is_empty() && attn.iter().all(|t| t.contains("float") && !t.contains("BFloat16")), "{attn:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--cpu-bf16` trains a backbone and is recorded in the stage's config; without it the record says fp32.
#[test]
fn cpu_bf16_flag_is_recorded() {
    let dir = tmp_dir("precision-cli");
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/breastmnist.npz");
    for (flag, want) in [(Some("--cpu-bf16"), true), (None, false)] {
        let out = dir.join(format!("bb-{want}"));
        let mut args = vec![
            "-q",
            "pretrain-backbone",
            "--patch-size",
            "4",
            "--embed-dim",
            "32",
            "--depth",
            "1",
            "--heads",
            "2",
            "--data",
            data.to_str().unwrap(),
            "--epochs",
            "1",
            "--batch-size",
            "128",
            "--decoder-dim",
            "16",
            "--decoder-depth",
            "1",
            "--decoder-heads",
            "2",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(flag);
        let o = tpp_bin(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["config"]["cpu_bf16"], serde_json::json!(want), "{cfg}");
        let loss = std::fs::read_to_string(out.join("loss.csv")).unwrap();
        let last: f64 = loss.lines().last().unwrap().split(',').nth(2).unwrap().parse().unwrap();
        assert!(last.is_finite(), "{loss}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
