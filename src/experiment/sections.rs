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
    /// Hyperparameters (seed, size and normalisation are set per run).
    pub config: PretrainConfig,
    /// Where the MAE decoder comes from.
    pub decoder: DecoderSource,
}

impl Default for TppSection {
    fn default() -> Self {
        TppSection { config: PretrainConfig::default(), decoder: DecoderSource::Auto }
    }
}

impl TppSection {
    fn read(mut t: Table) -> Result<Self> {
        let decoder = extra("tpp", &mut t, "decoder", DecoderSource::Auto)?;
        let short: Vec<(&str, &str)> = AUGMENT_KEYS.iter().chain(MAE_KEYS).copied().collect();
        let config: PretrainConfig = overlay("tpp", t, &short)?;
        config.augment.validate().map_err(|e| anyhow!("[tpp]: {e}"))?;
        Ok(TppSection { config, decoder })
    }
}

impl<'de> Deserialize<'de> for TppSection {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        TppSection::read(Table::deserialize(d)?).map_err(|e| serde::de::Error::custom(format!("{e:#}")))
    }
}

impl Serialize for TppSection {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let short: Vec<(&str, &str)> = AUGMENT_KEYS.iter().chain(MAE_KEYS).copied().collect();
        let mut t = written(&self.config, &short).map_err(serde::ser::Error::custom)?;
        t.insert("decoder".into(), Value::String(self.decoder.to_string()));
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
    fn unknown_and_per_run_keys_are_errors_naming_the_key() {
        let e = FinetuneSection::read(table("epoch = 3")).unwrap_err().to_string();
        assert!(e.contains("[finetune]") && e.contains("epoch"), "{e}");
        let e = TppSection::read(table("seed = 3")).unwrap_err().to_string();
        assert!(e.contains("[tpp] seed") && e.contains("seeds"), "{e}");
        let e = FinetuneSection::read(table("crop_min_area = 1.5")).unwrap_err().to_string();
        assert!(e.contains("[finetune]") && e.contains("crop_min_area"), "{e}");
    }
}
