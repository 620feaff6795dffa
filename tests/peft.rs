//! PEFT methods: only target parameters train, zero-init leaves the model unchanged, save/load round
//! trips, HF PEFT adapters load, and merging is exact.
mod common;

use common::{fixture, rel_err, tmp_dir};
use serde_json::json;
use tch::{Device, Kind, Tensor};
use tpp::backbone::{Backbone, LoadOptions, Pool, VitConfig};
use tpp::peft::{self, Method, Options, PeftSpec, Targets};
use tpp::train::optim::{AdamW, AdamWConfig};

fn small_cfg() -> VitConfig {
    VitConfig {
        img_size: 16,
        patch_size: 4,
        in_chans: 3,
        embed_dim: 32,
        depth: 2,
        num_heads: 2,
        mlp_hidden: 64,
        qkv_bias: true,
        layer_scale: Some(0.5),
        class_token: true,
        reg_tokens: 1,
        pos_prefix: 1,
        pool: Pool::Cls,
        final_norm: true,
        fc_norm: false,
        norm_eps: 1e-6,
        num_classes: 0,
    }
}

/// `methods` with some options set (options of other methods are ignored).
fn spec_with(methods: &[Method], options: &[(&str, serde_json::Value)]) -> PeftSpec {
    PeftSpec::new(methods.to_vec(), &Options::from_pairs(options.iter().cloned())).unwrap()
}

fn setup(methods: &[Method], seed: i64) -> (Backbone, Targets) {
    tch::manual_seed(seed);
    let mut bb = Backbone::fresh(&small_cfg(), Device::Cpu).unwrap();
    let spec = spec_with(
        methods,
        &[("lora_targets", json!(["qkv", "fc2"])), ("adapter_dim", json!(8)), ("prompt_len", json!(3))],
    );
    let t = Targets::attach(&mut bb.vit, &spec, Device::Cpu).unwrap();
    t.add_head(&mut bb.vit, 3);
    if !methods.contains(&Method::FULL) {
        bb.freeze();
    }
    (bb, t)
}

/// A fresh backbone holding `src`'s weights. (Tests run in parallel threads sharing libtorch's global
/// generator, so two fresh models are not reliably equal even after the same manual_seed.)
fn same_weights(src: &Backbone) -> Backbone {
    let mut bb = Backbone::fresh(src.vit.config(), Device::Cpu).unwrap();
    bb.vs.copy(&src.vs).unwrap();
    bb
}

fn batch() -> (Tensor, Tensor) {
    tch::manual_seed(99);
    (Tensor::randn([4, 3, 16, 16], (Kind::Float, Device::Cpu)), Tensor::from_slice(&[0i64, 1, 2, 1]))
}

fn snapshot(bb: &Backbone) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = bb.vs.variables().into_iter().map(|(k, t)| (k, t.detach().copy())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn named_targets(bb: &Backbone, t: &Targets, full: bool) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = t.store().variables().into_iter().collect();
    if full {
        v.extend(bb.vs.variables());
    }
    v
}

/// Runs `n` AdamW steps of cross-entropy on the fixed batch.
fn train(bb: &Backbone, t: &Targets, full: bool, n: usize) {
    let (x, y) = batch();
    let mut opt = AdamW::new(named_targets(bb, t, full), AdamWConfig::default());
    for _ in 0..n {
        opt.zero_grad();
        let loss = bb.vit.forward_t(&x, true).cross_entropy_for_logits(&y);
        loss.backward();
        opt.step(1e-2);
    }
}

const PEFT_METHODS: &[&[Method]] = &[
    &[Method::LORA],
    &[Method::DORA],
    &[Method::ADAPTFORMER],
    &[Method::HOULSBY],
    &[Method::VPT_SHALLOW],
    &[Method::VPT_DEEP],
    &[Method::BITFIT],
    &[Method::SSF],
    &[Method::IA3],
    &[Method::LINEAR],
    &[Method::LORA, Method::VPT_DEEP],
    &[Method::DORA, Method::SSF, Method::IA3],
];

#[test]
fn one_step_changes_only_target_parameters() {
    for methods in PEFT_METHODS {
        let (bb, t) = setup(methods, 1);
        let before_bb = snapshot(&bb);
        let before_t: Vec<(String, Tensor)> =
            t.store().variables().into_iter().map(|(k, v)| (k, v.detach().copy())).collect();
        train(&bb, &t, false, 1);
        for (k, v) in &before_bb {
            let now = &bb.vs.variables()[k];
            assert!(now.equal(v), "{methods:?}: backbone tensor {k} changed");
            assert!(!now.grad().defined(), "{methods:?}: frozen {k} has a gradient");
        }
        let vars = t.store().variables();
        let changed: Vec<&String> = before_t.iter().filter(|(k, v)| !vars[k].equal(v)).map(|(k, _)| k).collect();
        assert!(changed.iter().any(|k| k.starts_with("head.")), "{methods:?}: head did not change");
        if methods != &[Method::LINEAR] {
            assert!(changed.iter().any(|k| !k.starts_with("head.")), "{methods:?}: no PEFT parameter changed");
        }
    }
    // Full fine-tuning: backbone weights change too.
    let (bb, t) = setup(&[Method::FULL], 1);
    let before = snapshot(&bb);
    train(&bb, &t, true, 1);
    assert!(before.iter().any(|(k, v)| !bb.vs.variables()[k].equal(v)));
}

#[test]
fn zero_init_leaves_output_unchanged_vpt_does_not() {
    let _g = tch::no_grad_guard();
    let (x, _) = batch();
    let plain = Backbone::fresh(&small_cfg(), Device::Cpu).unwrap();
    let reference = plain.vit.embed(&x);
    for methods in PEFT_METHODS.iter().chain([&[Method::FULL][..]].iter()) {
        let mut bb = same_weights(&plain);
        let spec = spec_with(methods, &[("lora_targets", json!(["qkv", "proj", "fc1", "fc2"]))]);
        let _t = Targets::attach(&mut bb.vit, &spec, Device::Cpu).unwrap();
        let out = bb.vit.embed(&x);
        let vpt = methods.iter().any(|m| [Method::VPT_SHALLOW, Method::VPT_DEEP].contains(m));
        if vpt {
            assert!(rel_err(&out, &reference) > 1e-3, "{methods:?}: prompts should change the output");
        } else {
            assert!(
                rel_err(&out, &reference) < 1e-6,
                "{methods:?}: changed the output at init: {}",
                rel_err(&out, &reference)
            );
        }
    }
}

#[test]
fn save_load_round_trip_is_exact() {
    let dir = tmp_dir("peft-roundtrip");
    let (x, _) = batch();
    for (i, methods) in PEFT_METHODS.iter().enumerate() {
        let (bb, t) = setup(methods, 5);
        train(&bb, &t, false, 2);
        let d = dir.join(format!("m{i}"));
        peft::io::save(&t, &d).unwrap();
        let spec = peft::io::read_spec(&d).unwrap();
        assert_eq!(&spec, t.spec());
        // A second model with other random targets (same backbone weights) gets the saved values.
        let mut bb2 = same_weights(&bb);
        let t2 = Targets::attach(&mut bb2.vit, &spec, Device::Cpu).unwrap();
        t2.add_head(&mut bb2.vit, 3);
        peft::io::load_values(&t2, &d, true).unwrap();
        let _g = tch::no_grad_guard();
        let (a, b) = (bb.vit.forward(&x), bb2.vit.forward(&x));
        assert!(a.equal(&b), "{methods:?}: outputs differ after reload: {}", rel_err(&a, &b));
    }
}

#[test]
fn loading_checks_names_and_shapes() {
    let dir = tmp_dir("peft-mismatch");
    let (_, t) = setup(&[Method::LORA], 1);
    peft::io::save(&t, &dir).unwrap();
    // Another rank: shapes differ.
    let mut bb = Backbone::fresh(&small_cfg(), Device::Cpu).unwrap();
    let spec = spec_with(&[Method::LORA], &[("lora_rank", json!(4)), ("lora_targets", json!(["qkv", "fc2"]))]);
    let t2 = Targets::attach(&mut bb.vit, &spec, Device::Cpu).unwrap();
    let e = format!("{:#}", peft::io::load_values(&t2, &dir, false).unwrap_err());
    assert!(
        e.contains("adapter_model.safetensors")
            && e.contains("lora_A.weight")
            && e.contains("[8, 32]")
            && e.contains("[4, 32]"),
        "{e}"
    );
    // Other targets: a parameter missing.
    let mut bb = Backbone::fresh(&small_cfg(), Device::Cpu).unwrap();
    let spec = spec_with(&[Method::LORA], &[("lora_targets", json!(["qkv", "proj", "fc2"]))]);
    let t3 = Targets::attach(&mut bb.vit, &spec, Device::Cpu).unwrap();
    let e = format!("{:#}", peft::io::load_values(&t3, &dir, false).unwrap_err());
    assert!(e.contains("missing target parameter 'blocks.0.attn.proj.lora_A.weight'"), "{e}");
    // Fewer targets: the file has parameters the model lacks.
    let mut bb = Backbone::fresh(&small_cfg(), Device::Cpu).unwrap();
    let spec = spec_with(&[Method::LORA], &[("lora_targets", json!(["qkv"]))]);
    let t4 = Targets::attach(&mut bb.vit, &spec, Device::Cpu).unwrap();
    let e = format!("{:#}", peft::io::load_values(&t4, &dir, false).unwrap_err());
    assert!(e.contains("does not have") && e.contains("mlp.fc2.lora_A.weight"), "{e}");
}

/// The spec of an HF PEFT adapter fixture (`name/`), and the relative error of the timm fixture model
/// with it loaded against the logits PEFT gave (`name_io.safetensors`).
fn peft_fixture(name: &str) -> (PeftSpec, f64) {
    let opts = LoadOptions { num_heads: Some(4), ..Default::default() };
    let (mut bb, _) = Backbone::load(&fixture("timm_vit_p16.safetensors"), &opts, Device::Cpu).unwrap();
    let dir = fixture(name);
    let spec = peft::io::read_spec(&dir).unwrap();
    // The checkpoint's own head is replaced by the adapter's trained head (modules_to_save).
    bb.vit.set_head(None);
    let t = Targets::attach(&mut bb.vit, &spec, Device::Cpu).unwrap();
    t.add_head(&mut bb.vit, 5);
    peft::io::load_values(&t, &dir, true).unwrap();
    let io = tpp::backbone::checkpoint::read_safetensors(&fixture(&format!("{name}_io.safetensors"))).unwrap();
    let _g = tch::no_grad_guard();
    (spec, rel_err(&bb.vit.forward(&io["input"]), &io["logits"]))
}

#[test]
fn hf_peft_lora_adapter_loads_and_matches_peft() {
    let (spec, e) = peft_fixture("peft_lora");
    let lora: tpp::peft::lora::LoraConfig = spec.options().parse().unwrap();
    assert_eq!((lora.lora_rank, lora.lora_alpha), (4, 8.0));
    assert_eq!(lora.lora_targets, vec!["qkv".to_string(), "fc1".to_string()]);
    assert!(e < 1e-4, "{e}");
}

#[test]
fn hf_peft_ia3_adapter_loads_and_matches_peft() {
    let (spec, e) = peft_fixture("peft_ia3");
    assert_eq!(spec.methods, [Method::IA3]);
    assert!(e < 1e-4, "{e}");
}

#[test]
fn ia3_trains_keys_values_and_mlp_activations_in_hf_peft_layout() {
    let (bb, t) = setup(&[Method::IA3], 3);
    train(&bb, &t, false, 2);
    let vars = t.store().variables();
    // One vector per block on qkv's output ([3D, 1]) and on fc2's input ([1, H]), as HF PEFT stores IA³.
    assert_eq!(vars["blocks.0.attn.qkv.ia3_l"].size(), [96, 1]);
    assert_eq!(vars["blocks.1.mlp.fc2.ia3_l"].size(), [1, 64]);
    let qkv = &vars["blocks.0.attn.qkv.ia3_l"];
    // The query third keeps its initial 1 exactly; keys and values trained.
    assert!(qkv.narrow(0, 0, 32).eq(1.0).all().int64_value(&[]) == 1);
    assert!((qkv.narrow(0, 32, 64) - 1.0).abs().sum(Kind::Float).double_value(&[]) > 0.0);
    assert!((&vars["blocks.0.mlp.fc2.ia3_l"] - 1.0).abs().sum(Kind::Float).double_value(&[]) > 0.0);
    let dir = tmp_dir("ia3-layout");
    peft::io::save(&t, &dir).unwrap();
    let saved = tpp::backbone::checkpoint::read_safetensors(&dir.join("adapter_model.safetensors")).unwrap();
    let mut keys: Vec<&str> = saved.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "base_model.model.blocks.0.attn.qkv.ia3_l",
            "base_model.model.blocks.0.mlp.fc2.ia3_l",
            "base_model.model.blocks.1.attn.qkv.ia3_l",
            "base_model.model.blocks.1.mlp.fc2.ia3_l",
            "base_model.model.head.bias",
            "base_model.model.head.weight",
        ]
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(
        (&cfg["peft_type"], &cfg["target_modules"], &cfg["feedforward_modules"]),
        (&json!("IA3"), &json!(["fc2", "qkv"]), &json!(["fc2"]))
    );
    // The query thirds never train, and are not counted as trainable: 2 blocks x (2 x 32 + 64), + head.
    assert_eq!(t.numel(), 2 * (2 * 32 + 64) + 32 * 3 + 3);
    // IA³ vectors get no weight decay (they scale around 1).
    assert!(!tpp::train::optim::decays("blocks.0.attn.qkv.ia3_l", qkv));
}

#[test]
fn merge_is_exact_and_exports_a_plain_timm_checkpoint() {
    let (x, _) = batch();
    let dir = tmp_dir("peft-merge");
    for methods in [
        &[Method::LORA][..],
        &[Method::DORA],
        &[Method::SSF],
        &[Method::BITFIT],
        &[Method::LORA, Method::SSF, Method::BITFIT],
        &[Method::IA3],
        &[Method::DORA, Method::SSF, Method::IA3, Method::BITFIT],
        &[Method::IA3, Method::BITFIT, Method::SSF, Method::DORA],
    ] {
        let (mut bb, t) = setup(methods, 11);
        train(&bb, &t, false, 3);
        let _g = tch::no_grad_guard();
        let before = bb.vit.forward(&x);
        assert!(bb.vit.state_dict().is_err() || methods == [Method::BITFIT], "{methods:?}: unmerged export must fail");
        peft::merge(&mut bb.vit, t.spec()).unwrap();
        let after = bb.vit.forward(&x);
        assert!(rel_err(&after, &before) < 1e-5, "{methods:?}: {}", rel_err(&after, &before));
        // The exported state dict loads as a plain timm checkpoint and gives the same outputs.
        let sd = bb.vit.state_dict().unwrap();
        let p = dir.join("merged.safetensors");
        let pairs: Vec<(&str, &Tensor)> = sd.iter().map(|(k, v)| (k.as_str(), v)).collect();
        Tensor::write_safetensors(&pairs, &p).unwrap();
        let (plain, ck) =
            Backbone::load(&p, &LoadOptions { num_heads: Some(2), ..Default::default() }, Device::Cpu).unwrap();
        assert_eq!(ck.format, tpp::backbone::Format::Timm);
        assert!(rel_err(&plain.vit.forward(&x), &before) < 1e-5, "{methods:?}");
    }
    // Methods that add modules cannot be merged.
    let (mut bb, t) = setup(&[Method::ADAPTFORMER], 1);
    let e = peft::merge(&mut bb.vit, t.spec()).unwrap_err().to_string();
    assert!(e.contains("adaptformer") && e.contains("cannot be merged"), "{e}");
}

#[test]
fn modules_nest_the_same_whatever_order_the_methods_are_named_in() {
    let (x, _) = batch();
    let (bb, t) = setup(&[Method::LORA, Method::SSF, Method::IA3], 2);
    train(&bb, &t, false, 2);
    let mut other = same_weights(&bb);
    let spec = PeftSpec::new(vec![Method::IA3, Method::SSF, Method::LORA], t.spec().options()).unwrap();
    let t2 = Targets::attach(&mut other.vit, &spec, Device::Cpu).unwrap();
    t2.add_head(&mut other.vit, 3);
    let _g = tch::no_grad_guard();
    for (k, v) in t.store().variables() {
        t2.store().variables()[&k].shallow_clone().copy_(&v);
    }
    let (a, b) = (bb.vit.forward(&x), other.vit.forward(&x));
    assert!(a.equal(&b), "{}", rel_err(&a, &b));
}

#[test]
fn nonsense_combinations_are_rejected() {
    for (methods, needle) in [
        (&[Method::LORA, Method::DORA][..], "DoRA is a LoRA variant"),
        (&[Method::LINEAR, Method::LORA], "cannot be combined"),
        (&[Method::FULL, Method::BITFIT], "cannot be combined"),
        (&[Method::VPT_SHALLOW, Method::VPT_DEEP], "pick one"),
    ] {
        let err = PeftSpec::with_methods(methods).validate().unwrap_err();
        assert!(matches!(tpp::Error::kind_of(&err), Some(tpp::Error::InvalidSpec(_))), "{methods:?}: {err:?}");
        let e = err.to_string();
        assert!(e.contains(needle), "{methods:?}: {e}");
    }
    assert!("lora2".parse::<Method>().unwrap_err().contains("expected one of"));
}

#[test]
fn trainable_counts() {
    let (bb, t) = setup(&[Method::LORA], 1);
    // LoRA r=8 on qkv (32 -> 96) and fc2 (64 -> 32) in 2 blocks, plus a 3-class head.
    let lora = 2 * (8 * 32 + 96 * 8 + 8 * 64 + 32 * 8);
    assert_eq!(t.numel(), lora + 32 * 3 + 3);
    assert!(bb.vs.variables().values().all(|v| !v.requires_grad()));
    let line = peft::count_line(t.numel(), t.numel() + small_cfg().param_count());
    assert!(line.starts_with(&format!("trainable {} / total", t.numel())), "{line}");
}

#[test]
fn lora_on_q_and_v_inside_fused_qkv() {
    let (x, y) = batch();
    let mut bb = Backbone::fresh(&small_cfg(), Device::Cpu).unwrap();
    let spec = spec_with(&[Method::LORA], &[("lora_targets", json!(["q", "v"]))]);
    let t = Targets::attach(&mut bb.vit, &spec, Device::Cpu).unwrap();
    t.add_head(&mut bb.vit, 3);
    bb.freeze();
    let mut opt = AdamW::new(t.store().variables().into_iter().collect(), AdamWConfig::default());
    for _ in 0..2 {
        opt.zero_grad();
        bb.vit.forward_t(&x, true).cross_entropy_for_logits(&y).backward();
        opt.step(1e-2);
    }
    // Rows of B for k (the middle third) stay exactly zero; q and v rows trained.
    let b = &t.store().variables()["blocks.0.attn.qkv.lora_B.weight"];
    let d = 32;
    assert_eq!(b.narrow(0, d, d).abs().sum(Kind::Float).double_value(&[]), 0.0);
    assert!(b.narrow(0, 0, d).abs().sum(Kind::Float).double_value(&[]) > 0.0);
    assert!(b.narrow(0, 2 * d, d).abs().sum(Kind::Float).double_value(&[]) > 0.0);
    // Saved as a PEFT `qkv` adapter.
    let dir = tmp_dir("qv");
    peft::io::save(&t, &dir).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["target_modules"], serde_json::json!(["qkv"]));
    let bad = Options::from_pairs([("lora_targets", json!(["qkv", "q"]))]);
    let e = PeftSpec::new(vec![Method::LORA], &bad).unwrap_err().to_string();
    assert!(e.contains("already covers"), "{e}");
}
