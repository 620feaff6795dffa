//! Backbone correctness: numerical parity with timm and Hugging Face on committed fixtures
//! (scripts/make_fixtures.py), the real DINOv2 checkpoint from ../shared, and clear errors on bad files.
mod common;

use common::{fixture, rel_err, shared, tmp_dir};
use std::collections::BTreeMap;
use tch::{Device, Tensor};
use tpp::backbone::checkpoint::read_safetensors;
use tpp::backbone::{Backbone, Format, LoadOptions, Pool};

const TOL: f64 = 1e-4;

fn io(name: &str) -> BTreeMap<String, Tensor> {
    read_safetensors(&fixture(name)).unwrap()
}

/// Loads a fixture. The timm fixtures use head dim 16, which shapes cannot reveal (the default guess is
/// timm's 64), so their head count is given as a user would with `--heads`; HF fixtures carry config.json.
fn load_with_heads(name: &str, heads: Option<i64>) -> (Backbone, tpp::backbone::Checkpoint) {
    let opts = LoadOptions { num_heads: heads, ..Default::default() };
    Backbone::load(&fixture(name), &opts, Device::Cpu).unwrap()
}

fn load(name: &str) -> (Backbone, tpp::backbone::Checkpoint) {
    let heads = if name.starts_with("timm_vit_avg") { 3 } else { 4 };
    load_with_heads(name, (!name.starts_with("hf_")).then_some(heads))
}

#[test]
fn timm_vit_patch16_cls_matches_timm() {
    let (bb, ck) = load("timm_vit_p16.safetensors");
    assert_eq!(ck.format, Format::Timm);
    assert!(ck.unused.is_empty(), "{:?}", ck.unused);
    let c = bb.vit.config();
    assert_eq!((c.embed_dim, c.depth, c.num_heads, c.patch_size, c.img_size), (64, 2, 4, 16, 48));
    assert_eq!((c.pool, c.num_classes), (Pool::Cls, 5));
    let r = io("timm_vit_p16_io.safetensors");
    let _g = tch::no_grad_guard();
    let feats = bb.vit.forward_features(&r["input"]);
    assert!(rel_err(&feats, &r["features"]) < TOL, "features {}", rel_err(&feats, &r["features"]));
    assert!(rel_err(&bb.vit.pool(&feats), &r["pooled"]) < TOL);
    assert!(rel_err(&bb.vit.forward(&r["input"]), &r["logits"]) < TOL);
    // Other input sizes: bicubic resampling of the position grid, up (64) and down (32, anti-aliased).
    for s in [64, 32] {
        let e = rel_err(&bb.vit.embed(&r[&format!("input_{s}")]), &r[&format!("pooled_{s}")]);
        assert!(e < TOL, "size {s}: rel err {e}");
    }
}

#[test]
fn timm_dinov2_style_with_registers_matches_timm() {
    let (bb, ck) = load("timm_dinov2_p14_reg.safetensors");
    assert_eq!(ck.format, Format::Timm);
    let c = bb.vit.config();
    assert_eq!((c.patch_size, c.reg_tokens, c.pos_prefix), (14, 2, 0));
    assert!(c.layer_scale.is_some());
    let r = io("timm_dinov2_p14_reg_io.safetensors");
    let _g = tch::no_grad_guard();
    let feats = bb.vit.forward_features(&r["input"]);
    assert!(rel_err(&feats, &r["features"]) < TOL, "{}", rel_err(&feats, &r["features"]));
    assert!(rel_err(&bb.vit.pool(&feats), &r["pooled"]) < TOL);
    assert!(rel_err(&bb.vit.embed(&r["input_42"]), &r["pooled_42"]) < TOL);
}

#[test]
fn timm_mean_pool_fc_norm_one_channel_matches_timm() {
    let (bb, _) = load("timm_vit_avg_fcnorm.safetensors");
    let c = bb.vit.config();
    assert_eq!((c.pool, c.fc_norm, c.final_norm, c.qkv_bias, c.in_chans), (Pool::Mean, true, false, false, 1));
    assert_eq!(c.mlp_hidden, 96);
    let r = io("timm_vit_avg_fcnorm_io.safetensors");
    let _g = tch::no_grad_guard();
    assert!(rel_err(&bb.vit.forward_features(&r["input"]), &r["features"]) < TOL);
    assert!(rel_err(&bb.vit.forward(&r["input"]), &r["logits"]) < TOL);
}

#[test]
fn grey_input_equals_repeated_channels() {
    let (bb, _) = load("timm_vit_p16.safetensors");
    let _g = tch::no_grad_guard();
    let x = Tensor::randn([2, 1, 48, 48], (tch::Kind::Float, Device::Cpu));
    let a = bb.vit.embed(&x);
    let b = bb.vit.embed(&x.repeat([1, 3, 1, 1]));
    assert!(rel_err(&a, &b) < 1e-5);
}

#[test]
fn hf_vitmae_matches_transformers() {
    let (bb, ck) = load("hf_vitmae/model.safetensors");
    assert_eq!(ck.format, Format::HfVitMae);
    assert!(ck.unused.is_empty(), "{:?}", ck.unused);
    let d = ck.decoder.as_ref().expect("decoder kept for the MAE pretext");
    assert_eq!((d.embed_dim, d.depth, d.num_heads, d.pred_dim), (32, 1, 4, 8 * 8 * 3));
    for k in [
        "decoder_embed.weight",
        "mask_token",
        "decoder_pos_embed",
        "decoder_blocks.0.attn.qkv.weight",
        "decoder_norm.weight",
        "decoder_pred.weight",
    ] {
        assert!(ck.tensors.contains_key(k), "missing {k}");
    }
    let r = io("hf_vitmae_io.safetensors");
    let _g = tch::no_grad_guard();
    let e = rel_err(&bb.vit.forward_features(&r["input"]), &r["features"]);
    assert!(e < TOL, "{e}");
}

#[test]
fn hf_dinov2_matches_transformers() {
    let (bb, ck) = load("hf_dinov2/model.safetensors");
    assert_eq!(ck.format, Format::HfDinov2);
    // The mask token is Dinov2's pre-training token: reported, not used.
    assert_eq!(ck.unused, vec!["embeddings.mask_token".to_string()]);
    let r = io("hf_dinov2_io.safetensors");
    let _g = tch::no_grad_guard();
    let feats = bb.vit.forward_features(&r["input"]);
    assert!(rel_err(&feats, &r["features"]) < TOL, "{}", rel_err(&feats, &r["features"]));
    assert!(rel_err(&bb.vit.pool(&feats), &r["pooled"]) < TOL);
}

#[test]
fn hf_transformers5_module_names_load_too() {
    // transformers 5 names modules q_proj/k_proj/v_proj/o_proj (and `layers.N` for ViTMAE); a raw
    // state_dict saved from it uses those names. Rename the hub-layout fixtures and expect the same outputs.
    let dir = tmp_dir("hf5");
    for (name, io_name) in [("hf_dinov2", "hf_dinov2_io.safetensors"), ("hf_vitmae", "hf_vitmae_io.safetensors")] {
        let src = read_safetensors(&fixture(&format!("{name}/model.safetensors"))).unwrap();
        let renamed: BTreeMap<String, Tensor> = src
            .iter()
            .map(|(k, v)| {
                let k = k
                    .replace("vit.encoder.layer.", "vit.layers.")
                    .replace("attention.attention.query", "attention.q_proj")
                    .replace("attention.attention.key", "attention.k_proj")
                    .replace("attention.attention.value", "attention.v_proj")
                    .replace("attention.output.dense", "attention.o_proj")
                    .replace("intermediate.dense", "mlp.fc1")
                    .replace(".output.dense", ".mlp.fc2");
                (k, v.shallow_clone())
            })
            .collect();
        assert_ne!(renamed.keys().collect::<Vec<_>>(), src.keys().collect::<Vec<_>>());
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(fixture(&format!("{name}/config.json")), d.join("config.json")).unwrap();
        let pairs: Vec<(&str, &Tensor)> = renamed.iter().map(|(k, v)| (k.as_str(), v)).collect();
        Tensor::write_safetensors(&pairs, d.join("model.safetensors")).unwrap();
        let (bb, _) = Backbone::load(&d.join("model.safetensors"), &LoadOptions::default(), Device::Cpu).unwrap();
        let r = io(io_name);
        let _g = tch::no_grad_guard();
        let e = rel_err(&bb.vit.forward_features(&r["input"]), &r["features"]);
        assert!(e < TOL, "{name}: {e}");
    }
}

#[test]
fn real_dinov2_vits14_loads_with_no_missing_keys() {
    let Some(path) = shared("weights/dinov2-vits14-imgfocus/model.safetensors") else { return };
    // At its own resolution (518 px) it holds the 22,056,192 parameters PyTorch counts.
    let native = tpp::backbone::Checkpoint::open(&path, &LoadOptions::default()).unwrap();
    assert_eq!(native.encoder_param_count(), 22_056_192);
    assert_eq!(native.config.img_size, 518);
    let opts = LoadOptions { img_size: Some(224), ..Default::default() };
    let (bb, ck) = Backbone::load(&path, &opts, Device::Cpu).unwrap();
    assert_eq!(ck.format, Format::HfDinov2);
    assert_eq!(bb.vit.pos_embed().size(), vec![1, 1 + 16 * 16, 384]);
    let c = bb.vit.config();
    assert_eq!((c.embed_dim, c.depth, c.num_heads, c.patch_size, c.img_size), (384, 12, 6, 14, 224));
    // Only the unrelated saliency decoder is unused.
    assert!(ck.unused.iter().all(|k| k.starts_with("decoder.")), "{:?}", ck.unused);
    let _g = tch::no_grad_guard();
    let f = bb.vit.embed(&Tensor::randn([1, 3, 224, 224], (tch::Kind::Float, Device::Cpu)));
    assert_eq!(f.size(), vec![1, 384]);
    assert!(f.isfinite().all().int64_value(&[]) == 1);
}

#[test]
fn bad_files_give_one_line_errors() {
    let dir = tmp_dir("badfiles");
    let good = std::fs::read(fixture("timm_vit_p16.safetensors")).unwrap();
    let check = |name: &str, bytes: &[u8], expect: &str| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        let e = format!("{:#}", Backbone::load(&p, &LoadOptions::default(), Device::Cpu).err().expect("must fail"));
        assert!(e.contains(name), "error does not name the file: {e}");
        assert!(e.contains(expect), "expected '{expect}' in: {e}");
        assert!(!e.contains('\n'), "multi-line error: {e}");
    };
    check("truncated.safetensors", &good[..good.len() / 2], "not a valid safetensors file");
    check("text.safetensors", b"this is not a checkpoint", "not a valid safetensors file");
    // A safetensors file of another architecture (a small CNN).
    let conv = Tensor::zeros([8, 3, 3, 3], (tch::Kind::Float, Device::Cpu));
    let p = dir.join("cnn.safetensors");
    Tensor::write_safetensors(&[("conv1.weight", &conv), ("fc.weight", &conv)], &p).unwrap();
    let e = format!("{:#}", Backbone::load(&p, &LoadOptions::default(), Device::Cpu).err().unwrap());
    assert!(e.contains("cnn.safetensors") && e.contains("not a ViT checkpoint"), "{e}");
    assert!(std::fs::metadata(dir.join("missing.safetensors")).is_err());
    let e = format!(
        "{:#}",
        Backbone::load(&dir.join("missing.safetensors"), &LoadOptions::default(), Device::Cpu).err().unwrap()
    );
    assert!(e.contains("missing.safetensors") && e.contains("cannot read"), "{e}");
}

#[test]
fn missing_and_misshaped_keys_are_named() {
    let mut t = read_safetensors(&fixture("timm_vit_p16.safetensors")).unwrap();
    let dir = tmp_dir("keys");
    t.remove("blocks.1.mlp.fc2.bias");
    let p = dir.join("missing_key.safetensors");
    let pairs: Vec<(&str, &Tensor)> = t.iter().map(|(k, v)| (k.as_str(), v)).collect();
    Tensor::write_safetensors(&pairs, &p).unwrap();
    let e = format!("{:#}", Backbone::load(&p, &LoadOptions::default(), Device::Cpu).err().unwrap());
    assert!(e.contains("missing key 'blocks.1.mlp.fc2.bias'") && e.contains("[64]"), "{e}");

    let mut t = read_safetensors(&fixture("timm_vit_p16.safetensors")).unwrap();
    t.insert("blocks.0.attn.proj.weight".into(), Tensor::zeros([64, 32], (tch::Kind::Float, Device::Cpu)));
    let p = dir.join("bad_shape.safetensors");
    let pairs: Vec<(&str, &Tensor)> = t.iter().map(|(k, v)| (k.as_str(), v)).collect();
    Tensor::write_safetensors(&pairs, &p).unwrap();
    let e = format!("{:#}", Backbone::load(&p, &LoadOptions::default(), Device::Cpu).err().unwrap());
    assert!(e.contains("'blocks.0.attn.proj.weight'") && e.contains("[64, 32]") && e.contains("[64, 64]"), "{e}");
}

#[test]
fn failure_kinds_are_typed() {
    let dir = tmp_dir("kinds");
    let load = |p: &std::path::Path| Backbone::load(p, &LoadOptions::default(), Device::Cpu).err().unwrap();
    let conv = Tensor::zeros([8, 3, 3, 3], (tch::Kind::Float, Device::Cpu));
    let cnn = dir.join("cnn.safetensors");
    Tensor::write_safetensors(&[("conv1.weight", &conv)], &cnn).unwrap();
    assert!(matches!(tpp::Error::kind_of(&load(&cnn)), Some(tpp::Error::UnknownFormat { .. })));
    let mut t = read_safetensors(&fixture("timm_vit_p16.safetensors")).unwrap();
    t.remove("blocks.1.mlp.fc2.bias");
    let p = dir.join("missing_key.safetensors");
    let pairs: Vec<(&str, &Tensor)> = t.iter().map(|(k, v)| (k.as_str(), v)).collect();
    Tensor::write_safetensors(&pairs, &p).unwrap();
    match tpp::Error::kind_of(&load(&p)) {
        Some(tpp::Error::MissingKey { key, expected, .. }) => {
            assert_eq!((key.as_str(), expected.as_slice()), ("blocks.1.mlp.fc2.bias", [64].as_slice()))
        }
        other => panic!("expected MissingKey, got {other:?}"),
    }
    let mut t = read_safetensors(&fixture("timm_vit_p16.safetensors")).unwrap();
    t.insert("blocks.0.attn.proj.weight".into(), Tensor::zeros([64, 32], (tch::Kind::Float, Device::Cpu)));
    let p = dir.join("bad_shape.safetensors");
    let pairs: Vec<(&str, &Tensor)> = t.iter().map(|(k, v)| (k.as_str(), v)).collect();
    Tensor::write_safetensors(&pairs, &p).unwrap();
    match tpp::Error::kind_of(&load(&p)) {
        Some(tpp::Error::ShapeMismatch { found, expected, .. }) => {
            assert_eq!((found, expected), (&vec![64, 32], &vec![64, 64]))
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
}
