//! Saving and loading target parameters alone.
//!
//! A folder holds `adapter_model.safetensors` (every target tensor under `base_model.model.<timm path>`,
//! HF PEFT's layout; the task head as `base_model.model.head.*`, as PEFT writes `modules_to_save`),
//! `tpp_peft.json` (the [`PeftSpec`]) and, for LoRA/DoRA, PEFT's `adapter_config.json`, so that
//! `PeftModel.from_pretrained(timm_model, folder)` loads it.
use super::{Options, PeftSpec, REGISTRY, Targets};
use anyhow::{Context, Result, anyhow, bail};
use std::collections::BTreeMap;
use std::path::Path;
use tch::Tensor;

/// The parameters' file.
pub const WEIGHTS: &str = "adapter_model.safetensors";
/// tpp's spec file.
pub const SPEC: &str = "tpp_peft.json";
/// HF PEFT's config file.
pub const PEFT_CONFIG: &str = "adapter_config.json";
const PREFIX: &str = "base_model.model.";

/// Writes a file atomically: to a temporary name in the same folder, then renamed over the target. The
/// temporary name is this process's and this call's own, so concurrent writers (compare cells on other
/// devices or machines) never write into each other's file; the last rename wins whole.
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.{}-{seq}.tmp", std::process::id()));
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // On disk before the rename: after a power cut the file is either the old one or the whole new one.
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot move into place", path.display()))
}

/// Writes text atomically, naming the file on failure.
pub fn write_text_atomic(path: &Path, text: &str) -> Result<()> {
    write_atomic(path, |p| std::fs::write(p, text).with_context(|| format!("{}: cannot write", p.display())))
}

/// Writes named tensors (as fp32, on the CPU) to a safetensors file atomically.
pub fn write_safetensors_atomic(path: &Path, named: &[(String, Tensor)]) -> Result<()> {
    let cpu: Vec<(&str, Tensor)> = named
        .iter()
        .map(|(k, v)| (k.as_str(), v.detach().to_kind(tch::Kind::Float).to_device(tch::Device::Cpu)))
        .collect();
    write_atomic(path, |p| {
        Tensor::write_safetensors(&cpu, p).map_err(|e| anyhow!("{}: cannot write ({e})", p.display()))
    })
}

/// Writes the target parameters (and the head, when attached) to `dir`, with the spec and, for a method
/// HF PEFT has, PEFT's `adapter_config.json`.
pub fn save(t: &Targets, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create folder", dir.display()))?;
    let vars = t.vs.variables();
    let mut named: Vec<(String, Tensor)> =
        vars.iter().map(|(k, v)| (format!("{PREFIX}{k}"), v.shallow_clone())).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    write_safetensors_atomic(&dir.join(WEIGHTS), &named)?;
    let spec = serde_json::to_string_pretty(&t.spec)?;
    write_text_atomic(&dir.join(SPEC), &spec)?;
    let has_head = vars.keys().any(|k| k.starts_with("head."));
    if let [m] = t.spec.methods[..]
        && let Some(cfg) = m.get().hf_peft_config(t.spec.options(), has_head)
    {
        write_text_atomic(&dir.join(PEFT_CONFIG), &serde_json::to_string_pretty(&cfg)?)?;
    }
    Ok(())
}

/// The spec of a saved folder: `tpp_peft.json`, or else an HF PEFT `adapter_config.json` of a method
/// that reads one.
pub fn read_spec(dir: &Path) -> Result<PeftSpec> {
    // Every failure here is a problem with the input named.
    crate::error::input((|| -> Result<PeftSpec> {
        let ours = dir.join(SPEC);
        if ours.exists() {
            let text = std::fs::read_to_string(&ours).with_context(|| format!("{}: cannot read", ours.display()))?;
            return serde_json::from_str(&text)
                .map_err(|e| anyhow!("{}: not a valid tpp PEFT spec ({e})", ours.display()));
        }
        let peft = dir.join(PEFT_CONFIG);
        if !peft.exists() {
            let detail = format!("no {SPEC} or {PEFT_CONFIG} (not a target-parameter folder)");
            return Err(crate::Error::UnknownFormat { path: dir.to_path_buf(), detail }.into());
        }
        let text = std::fs::read_to_string(&peft).with_context(|| format!("{}: cannot read", peft.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| anyhow!("{}: not valid JSON ({e})", peft.display()))?;
        match REGISTRY.iter().find_map(|m| m.read_hf_peft_config(&v)) {
            Some(spec) => spec.map_err(|e| anyhow!("{}: {e:#}", peft.display())),
            None => {
                let mut known: Vec<String> = REGISTRY
                    .iter()
                    .filter_map(|m| m.hf_peft_config(&Options::default(), false))
                    .filter_map(|c| c["peft_type"].as_str().map(str::to_string))
                    .collect();
                known.dedup();
                let detail = format!("peft_type {} is not supported (only {})", v["peft_type"], known.join(", "));
                Err(crate::Error::UnknownFormat { path: peft, detail }.into())
            }
        }
    })())
}

/// Loads saved values into the target parameters. Every PEFT parameter of the model must be in the file
/// with its exact shape; the head is loaded when both have one (`head = false` skips it, for fine-tuning
/// a new task); anything else in the file is an error.
pub fn load_values(t: &Targets, dir: &Path, head: bool) -> Result<()> {
    // Every failure here is a problem with the input named.
    crate::error::input((|| -> Result<()> {
        let file = dir.join(WEIGHTS);
        let stored = crate::backbone::checkpoint::read_safetensors(&file)?;
        let mut stored: BTreeMap<String, Tensor> =
            stored.into_iter().map(|(k, v)| (k.strip_prefix(PREFIX).map(str::to_string).unwrap_or(k), v)).collect();
        // HF PEFT writes DoRA magnitudes as `lora_magnitude_vector` (older) or `.weight` (newer).
        let renames: Vec<String> =
            stored.keys().filter(|k| k.ends_with("lora_magnitude_vector.weight")).cloned().collect();
        for k in renames {
            let v = stored.remove(&k).expect("key listed above");
            stored.insert(k.trim_end_matches(".weight").to_string(), v);
        }
        let vars: BTreeMap<String, Tensor> = t.vs.variables().into_iter().collect();
        for (name, var) in &vars {
            let is_head = name.starts_with("head.");
            if is_head && !head {
                stored.remove(name);
                continue;
            }
            let Some(src) = stored.remove(name) else {
                if is_head {
                    continue;
                }
                let (key, expected) = (name.clone(), var.size());
                return Err(crate::Error::MissingKey { file, what: "target parameter", key, expected }.into());
            };
            crate::backbone::checkpoint::copy_checked(var, &src, &file, &format!("'{name}'"))?;
        }
        let extra: Vec<&String> = stored.keys().filter(|k| head || !k.starts_with("head.")).collect();
        if !extra.is_empty() {
            bail!(
                "{}: parameters the model does not have: {extra:?} (another PEFT method or options?)",
                file.display()
            );
        }
        Ok(())
    })())
}
