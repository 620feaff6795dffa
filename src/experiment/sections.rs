//! The `[tpp]` and `[finetune]` sections of a `compare` config: the typed stage configs
//! ([`PretrainConfig`], [`FinetuneConfig`]) read directly from the section, each key laid over the
//! config's defaults, plus the few settings only a comparison has. Short keys of nested fields stay
//! accepted (`pad_crop` for `augment.pad_crop`, `decoder_dim` for `mae.decoder_dim`), and the written
//! `compare.toml` uses them, so earlier configs keep working.
use crate::pretext::mae::DecoderSource;
use crate::train::finetune::FinetuneConfig;
use crate::train::pretrain::PretrainConfig;
use anyhow::{Result, anyhow, bail};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use toml::{Table, Value};

/// Short keys of nested fields: the augmentation's in both sections, the MAE pretext's in `[tpp]`.
const AUGMENT_KEYS: &[(&str, &str)] = &[
    ("crop_min_area", "augment"),
    ("crop_max_area", "augment"),
    ("pad_crop", "augment"),
    ("hflip", "augment"),
    ("vflip", "augment"),
    ("rotate_deg", "augment"),
    ("jitter", "augment"),
];
const MAE_KEYS: &[(&str, &str)] = &[
    ("mask_ratio", "mae"),
    ("decoder_dim", "mae"),
    ("decoder_depth", "mae"),
    ("decoder_heads", "mae"),
    ("decoder_mlp_ratio", "mae"),
    ("norm_pix", "mae"),
];
/// Fields `compare` sets per run, with where the config says them instead.
const SET_PER_RUN: &[(&str, &str)] = &[
    ("seed", "the top-level `seeds`"),
    ("image_size", "the top-level `img_size`"),
    ("norm", "the top-level `norm`"),
    ("select", "the top-level `select`"),
];

/// Lays `over` onto `base`: sub-tables merge key by key, other values replace.
fn merge(base: &mut Table, over: Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(Value::Table(b)), Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Moves short keys into their sub-tables (`pad_crop = 2` -> `augment.pad_crop = 2`).
fn nest(section: &mut Table, short: &[(&str, &str)]) {
    for (key, parent) in short {
        if let Some(v) = section.remove(*key) {
            let sub = section.entry(parent.to_string()).or_insert_with(|| Value::Table(Table::new()));
            if let Value::Table(t) = sub {
                t.insert(key.to_string(), v);
            }
        }
    }
}

/// The reverse of [`nest`], for writing a section back.
fn flatten(section: &mut Table, short: &[(&str, &str)]) {
    for (key, parent) in short {
        let v = section.get_mut(*parent).and_then(|t| t.as_table_mut()).and_then(|t| t.remove(*key));
        if let Some(v) = v {
            section.insert(key.to_string(), v);
        }
    }
    for (_, parent) in short {
        if section.get(*parent).and_then(Value::as_table).is_some_and(Table::is_empty) {
            section.remove(*parent);
        }
    }
}

/// `T` from a section: its defaults overlaid with the section's keys (unknown keys are errors).
fn overlay<T: Serialize + DeserializeOwned + Default>(
    name: &str,
    mut section: Table,
    short: &[(&str, &str)],
) -> Result<T> {
    for (key, instead) in SET_PER_RUN {
        if section.contains_key(*key) {
            bail!("[{name}] {key}: set per run by compare; use {instead}");
        }
    }
    nest(&mut section, short);
    // The crop defaults to none with a pad-crop (as the training flags do), so the two are not stacked.
    if let Some(Value::Table(aug)) = section.get_mut("augment")
        && aug.get("pad_crop").and_then(Value::as_integer).is_some_and(|p| p > 0)
        && !aug.contains_key("crop_min_area")
    {
        aug.insert("crop_min_area".into(), Value::Float(1.0));
    }
    let mut base = Table::try_from(T::default()).map_err(|e| anyhow!("[{name}]: {e}"))?;
    merge(&mut base, section);
    T::deserialize(Value::Table(base)).map_err(|e| anyhow!("[{name}]: {}", e.to_string().trim()))
}

/// A section written back: `T` with the per-run fields left out and short keys used.
fn written<T: Serialize>(config: &T, short: &[(&str, &str)]) -> Result<Table, String> {
    let mut t = Table::try_from(config).map_err(|e| e.to_string())?;
    for (key, _) in SET_PER_RUN {
        t.remove(*key);
    }
    flatten(&mut t, short);
    Ok(t)
}

/// Takes an extra (comparison-only) key out of a section.
fn extra<T: DeserializeOwned>(name: &str, section: &mut Table, key: &str, default: T) -> Result<T> {
    match section.remove(key) {
        None => Ok(default),
        Some(v) => T::deserialize(v).map_err(|e| anyhow!("[{name}] {key}: {}", e.to_string().trim())),
    }
}

/// `[finetune]`: the fine-tuning hyperparameters of every run of the grid.
#[derive(Debug, Clone, PartialEq)]
pub struct FinetuneSection {
    /// Hyperparameters (seed, size, normalisation and selection metric are set per run).
    pub config: FinetuneConfig,
    /// Learning rate of the full fine-tuning reference.
    pub full_lr: f64,
    /// Fraction of the training labels fine-tuning uses (the TPP stage sees every training image).
    pub train_fraction: f64,
}

impl Default for FinetuneSection {
    fn default() -> Self {
        FinetuneSection { config: FinetuneConfig::default(), full_lr: 1e-4, train_fraction: 1.0 }
    }
}

impl FinetuneSection {
    fn read(mut t: Table) -> Result<Self> {
        let full_lr = extra("finetune", &mut t, "full_lr", 1e-4)?;
        let train_fraction = extra("finetune", &mut t, "train_fraction", 1.0)?;
        let config: FinetuneConfig = overlay("finetune", t, AUGMENT_KEYS)?;
        config.augment.validate().map_err(|e| anyhow!("[finetune]: {e}"))?;
        Ok(FinetuneSection { config, full_lr, train_fraction })
    }
}

impl<'de> Deserialize<'de> for FinetuneSection {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        FinetuneSection::read(Table::deserialize(d)?).map_err(|e| serde::de::Error::custom(format!("{e:#}")))
    }
}

impl Serialize for FinetuneSection {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut t = written(&self.config, AUGMENT_KEYS).map_err(serde::ser::Error::custom)?;
        t.insert("full_lr".into(), Value::Float(self.full_lr));
        t.insert("train_fraction".into(), Value::Float(self.train_fraction));
        t.serialize(s)
    }
}

/// `[tpp]`: the TPP stage of every method and seed.
#[derive(Debug, Clone, PartialEq)]
pub struct TppSection {
    /// Hyperparameters (seed, size and normalisation are set per run); with a sweep, its first setting.
    pub config: PretrainConfig,
    /// Where the MAE decoder comes from.
    pub decoder: DecoderSource,
    /// Keys given as lists (`epochs = [40, 120]`): every combination is a TPP setting of its own, and
    /// `compare` picks one per seed on validation. Empty: one setting, `config`.
    pub sweep: Vec<SweepAxis>,
}

/// A `[tpp]` key given as a list of values to try.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepAxis {
    /// The key as the section names it (`epochs`, `lr`, `mask_ratio`, ...).
    pub key: String,
    /// Its values, in the order given (the first wins a tie on validation).
    pub values: Vec<Value>,
}

impl SweepAxis {
    /// The values as written, `[40, 120]`.
    pub fn list(&self) -> String {
        format!("[{}]", self.values.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))
    }
}

/// One TPP setting of a sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct TppCandidate {
    /// Its folder name, `epochs-40_lr-0.001` (empty without a sweep).
    pub label: String,
    /// Its stage config.
    pub config: PretrainConfig,
}

/// Keys that cannot be swept: a pad-crop changes the crop's default, which a list would hide.
const NOT_SWEPT: &[&str] = &["pad_crop"];

/// The most settings one sweep may expand to (each is a TPP stage and a fine-tuning run per seed).
pub const MAX_SWEEP: usize = 64;

impl Default for TppSection {
    fn default() -> Self {
        TppSection { config: PretrainConfig::default(), decoder: DecoderSource::Auto, sweep: Vec::new() }
    }
}

fn tpp_short_keys() -> Vec<(&'static str, &'static str)> {
    AUGMENT_KEYS.iter().chain(MAE_KEYS).copied().collect()
}

/// A swept value as it appears in a folder name.
fn label_value(key: &str, v: &Value) -> Result<String> {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Integer(_) | Value::Float(_) | Value::Boolean(_) => v.to_string(),
        _ => bail!("[tpp] {key}: a list of values to try holds numbers, strings or booleans, not {}", v.type_str()),
    };
    if s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric() || "._-+".contains(c)) {
        bail!("[tpp] {key}: '{s}' cannot name a folder (letters, digits, '.', '_', '-', '+')");
    }
    Ok(s)
}

impl TppSection {
    fn read(mut t: Table) -> Result<Self> {
        let decoder = extra("tpp", &mut t, "decoder", DecoderSource::Auto)?;
        // Lists are sweeps: the section is read with each list's first value, then every combination.
        let mut sweep = Vec::new();
        let lists: Vec<String> = t.iter().filter(|(_, v)| v.is_array()).map(|(k, _)| k.clone()).collect();
        for key in lists {
            let Some(Value::Array(values)) = t.remove(&key) else { continue };
            if NOT_SWEPT.contains(&key.as_str()) {
                bail!("[tpp] {key}: cannot be a list (it changes the crop's default); run one comparison per value");
            }
            let first = values.first().cloned().ok_or_else(|| anyhow!("[tpp] {key}: an empty list"))?;
            let labels = values.iter().map(|v| label_value(&key, v)).collect::<Result<Vec<_>>>()?;
            if let Some((i, l)) = labels.iter().enumerate().find(|(i, l)| labels[..*i].contains(l)) {
                bail!("[tpp] {key}: '{l}' is given twice (entry {})", i + 1);
            }
            t.insert(key.clone(), first);
            if values.len() > 1 {
                sweep.push(SweepAxis { key, values });
            }
        }
        let config: PretrainConfig = overlay("tpp", t, &tpp_short_keys())?;
        config.augment.validate().map_err(|e| anyhow!("[tpp]: {e}"))?;
        let s = TppSection { config, decoder, sweep };
        // Every setting of the sweep must be one a stage can run.
        for c in s.candidates()? {
            c.config.validate().map_err(|e| e.context(format!("[tpp] ({})", c.label)))?;
        }
        Ok(s)
    }

    /// Every TPP setting: `config` alone without a sweep, else each combination of the listed values
    /// (the first key varying slowest), named by its values.
    pub fn candidates(&self) -> Result<Vec<TppCandidate>> {
        if self.sweep.is_empty() {
            return Ok(vec![TppCandidate { label: String::new(), config: self.config.clone() }]);
        }
        let n: usize = self.sweep.iter().map(|a| a.values.len()).product();
        if n > MAX_SWEEP {
            bail!("[tpp]: the lists make {n} settings; at most {MAX_SWEEP}");
        }
        let short = tpp_short_keys();
        let base = written(&self.config, &short).map_err(|e| anyhow!("[tpp]: {e}"))?;
        let mut out = Vec::with_capacity(n);
        for k in 0..n {
            let (mut t, mut labels, mut rest) = (base.clone(), Vec::new(), k);
            // Mixed radix, the last axis fastest.
            let mut picks = vec![0; self.sweep.len()];
            for (i, a) in self.sweep.iter().enumerate().rev() {
                picks[i] = rest % a.values.len();
                rest /= a.values.len();
            }
            for (a, &j) in self.sweep.iter().zip(&picks) {
                t.insert(a.key.clone(), a.values[j].clone());
                labels.push(format!("{}-{}", a.key, label_value(&a.key, &a.values[j])?));
            }
            let config: PretrainConfig = overlay("tpp", t, &short)?;
            out.push(TppCandidate { label: labels.join("_"), config });
        }
        Ok(out)
    }

    /// Sets `key` to one value, or to a list of values to try (replacing what the section said).
    pub fn set(&mut self, key: &str, values: Vec<Value>) -> Result<()> {
        let short = tpp_short_keys();
        let mut t = written(&self.config, &short).map_err(|e| anyhow!("[tpp]: {e}"))?;
        for a in &self.sweep {
            if a.key != key {
                t.insert(a.key.clone(), Value::Array(a.values.clone()));
            }
        }
        t.insert(key.to_string(), Value::Array(values));
        t.insert("decoder".into(), Value::String(self.decoder.to_string()));
        *self = TppSection::read(t)?;
        Ok(())
    }

    /// The swept keys and values, `epochs ∈ [40, 120]` (empty without a sweep).
    pub fn sweep_line(&self) -> String {
        self.sweep.iter().map(|a| format!("{} ∈ {}", a.key, a.list())).collect::<Vec<_>>().join(", ")
    }

    /// `key`'s value for a report: `one` (the setting's value), or the list where it is swept.
    pub fn shown(&self, key: &str, one: impl ToString) -> String {
        self.sweep.iter().find(|a| a.key == key).map_or_else(|| one.to_string(), SweepAxis::list)
    }
}

impl<'de> Deserialize<'de> for TppSection {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        TppSection::read(Table::deserialize(d)?).map_err(|e| serde::de::Error::custom(format!("{e:#}")))
    }
}

impl Serialize for TppSection {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut t = written(&self.config, &tpp_short_keys()).map_err(serde::ser::Error::custom)?;
        t.insert("decoder".into(), Value::String(self.decoder.to_string()));
        for a in &self.sweep {
            t.insert(a.key.clone(), Value::Array(a.values.clone()));
        }
        t.serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> Table {
        text.parse().unwrap()
    }

    #[test]
    fn a_section_sets_only_what_it_names_and_round_trips() {
        let s = TppSection::read(table("epochs = 7\ndecoder_dim = 256\npad_crop = 2\ndecoder = \"fresh\"")).unwrap();
        let d = PretrainConfig::default();
        assert_eq!((s.config.epochs, s.config.mae.decoder_dim, s.decoder), (7, 256, DecoderSource::Fresh));
        // Nested defaults are the stage's (a 2 x 128 decoder's depth and heads), not the nested type's.
        assert_eq!(
            (s.config.mae.decoder_depth, s.config.mae.decoder_heads),
            (d.mae.decoder_depth, d.mae.decoder_heads)
        );
        assert_eq!((s.config.augment.pad_crop, s.config.augment.crop_min_area), (2, 1.0));
        let text = toml::to_string(&s).unwrap();
        assert!(text.contains("decoder_dim = 256") && !text.contains("[mae]") && !text.contains("seed"), "{text}");
        assert_eq!(TppSection::read(table(&text)).unwrap(), s);
        let f = FinetuneSection::read(table("lr = 0.01\nfull_lr = 0.001\nmixup = 0.2")).unwrap();
        assert_eq!((f.config.lr, f.full_lr, f.config.mixup, f.config.epochs), (0.01, 0.001, 0.2, 50));
        assert_eq!(FinetuneSection::read(table(&toml::to_string(&f).unwrap())).unwrap(), f);
    }

    #[test]
    fn lists_are_sweeps_of_every_combination_named_by_their_values() {
        let s = TppSection::read(table("epochs = [40, 120]\nlr = [1e-3, 3e-3]\nmask_ratio = [0.5]\nbatch_size = 32"))
            .unwrap();
        // A one-value list is that value; the others expand, the first key slowest.
        assert_eq!(s.sweep.iter().map(|a| a.key.as_str()).collect::<Vec<_>>(), ["epochs", "lr"]);
        assert_eq!((s.config.epochs, s.config.lr, s.config.mae.mask_ratio), (40, 1e-3, 0.5));
        let c = s.candidates().unwrap();
        let labels: Vec<&str> = c.iter().map(|c| c.label.as_str()).collect();
        assert_eq!(labels, ["epochs-40_lr-0.001", "epochs-40_lr-0.003", "epochs-120_lr-0.001", "epochs-120_lr-0.003"]);
        assert_eq!((c[2].config.epochs, c[2].config.lr), (120, 1e-3));
        assert!(c.iter().all(|c| c.config.batch_size == 32 && c.config.mae.mask_ratio == 0.5));
        // Written back with its lists, and read back the same.
        let text = toml::to_string(&s).unwrap();
        assert!(text.contains("epochs = [40, 120]"), "{text}");
        assert_eq!(TppSection::read(table(&text)).unwrap(), s);
        assert_eq!(s.sweep_line(), "epochs ∈ [40, 120], lr ∈ [0.001, 0.003]");
        // Without lists: one candidate, the config itself, no label.
        let one = TppSection::read(table("epochs = 7")).unwrap().candidates().unwrap();
        assert_eq!((one.len(), one[0].label.as_str(), one[0].config.epochs), (1, "", 7));
        // Setting a key replaces its list (or makes one), keeping the others.
        let mut s2 = s.clone();
        s2.set("epochs", vec![Value::Integer(5)]).unwrap();
        assert_eq!((s2.config.epochs, s2.sweep.len(), s2.sweep[0].key.as_str()), (5, 1, "lr"));
        s2.set("epochs", vec![Value::Integer(5), Value::Integer(9)]).unwrap();
        assert_eq!(s2.candidates().unwrap().len(), 4);
    }

    #[test]
    fn bad_lists_are_errors_naming_the_key() {
        for (text, needle) in [
            ("epochs = []", "[tpp] epochs: an empty list"),
            ("epochs = [40, 40]", "[tpp] epochs: '40' is given twice"),
            ("pad_crop = [0, 4]", "[tpp] pad_crop: cannot be a list"),
            ("epochs = [0, 4]", "epochs"),
            ("epoch = [1, 2]", "epoch"),
            ("lr = [[1.0], [2.0]]", "[tpp] lr: a list of values to try holds numbers"),
        ] {
            let e = format!("{:#}", TppSection::read(table(text)).unwrap_err());
            assert!(e.contains(needle), "{text}: {e}");
        }
        let many: Vec<String> = (1..=9).map(|i| i.to_string()).collect();
        let text =
            format!("epochs = [{0}]\nwarmup = [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08]", many.join(", "));
        let e = format!("{:#}", TppSection::read(table(&text)).unwrap_err());
        assert!(e.contains("72 settings") && e.contains("at most 64"), "{e}");
    }

    #[test]
    fn unknown_and_per_run_keys_are_errors_naming_the_key() {
        let e = FinetuneSection::read(table("epoch = 3")).unwrap_err().to_string();
        assert!(e.contains("[finetune]") && e.contains("epoch"), "{e}");
        let e = TppSection::read(table("seed = 3")).unwrap_err().to_string();
        assert!(e.contains("[tpp] seed") && e.contains("seeds"), "{e}");
        let e = FinetuneSection::read(table("crop_min_area = 1.5")).unwrap_err().to_string();
        assert!(e.contains("[finetune]") && e.contains("crop_min_area"), "{e}");
    }
}
