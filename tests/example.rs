//! The library example (`examples/tpp_then_lora.rs`) in its quick form: TPP then LoRA fine-tuning through
//! the public API, end to end.
mod common;

#[path = "../examples/tpp_then_lora.rs"]
#[allow(dead_code)]
mod example;

#[test]
fn the_library_example_runs_tpp_then_lora() {
    let out = common::tmp_dir("example");
    let auc = example::run(&out, true).unwrap();
    assert!((0.0..=1.0).contains(&auc), "test AUC {auc}");
    // Fine-tuning started from the TPP stage's target parameters and wrote a finished run folder.
    let rec = tpp::RunRecord::read(&out.join("lora_tpp")).unwrap();
    assert_eq!(rec.init_targets.as_deref(), Some(out.join("tpp").as_path()));
    for f in ["tpp/targets/adapter_model.safetensors", "lora_tpp/metrics.json", "lora_tpp/adapter/adapter_config.json"]
    {
        assert!(out.join(f).exists(), "missing {f}");
    }
}
