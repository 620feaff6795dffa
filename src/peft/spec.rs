//! What defines a model's target parameters: the methods ([`Method`]) and their options ([`Options`]),
//! together a [`PeftSpec`], saved beside the parameters as `tpp_peft.json`.
use super::{PeftMethod, REGISTRY};
use anyhow::{Result, anyhow, bail};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;

/// A PEFT method by name, one of [`REGISTRY`]'s (parsed from `--peft`, configs and saved specs).
/// Each method's file defines its constant (`Method::LORA`, ...).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Method(pub(crate) &'static str);

impl Method {
    /// The method's name.
    pub fn name(self) -> &'static str {
        self.0
    }

    /// The method's implementation.
    pub fn get(self) -> &'static dyn PeftMethod {
        REGISTRY.iter().copied().find(|m| m.name() == self.0).expect("every Method comes from the registry")
    }

    /// Every method, in registry order.
    pub fn all() -> impl Iterator<Item = Method> {
        REGISTRY.iter().map(|m| Method(m.name()))
    }

    /// Position in the registry: the order methods' modules nest in and merge in.
    pub(crate) fn rank(self) -> usize {
        REGISTRY.iter().position(|m| m.name() == self.0).unwrap_or(usize::MAX)
    }
}

impl fmt::Debug for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        REGISTRY.iter().find(|m| m.name() == s).map(|m| Method(m.name())).ok_or_else(|| {
            let names: Vec<&str> = REGISTRY.iter().map(|m| m.name()).collect();
            format!("unknown PEFT method '{s}' (expected one of: {})", names.join(", "))
        })
    }
}

impl Serialize for Method {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0)
    }
}

impl<'de> Deserialize<'de> for Method {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Options of PEFT methods by their flat names (`lora_rank`, `adapter_dim`, ...), as JSON values. Each
/// method reads its own into its typed config ([`Options::parse`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Options(BTreeMap<String, Value>);

impl Options {
    /// Options from (name, value) pairs.
    pub fn from_pairs<K: Into<String>>(pairs: impl IntoIterator<Item = (K, Value)>) -> Self {
        Options(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    /// The typed config `C` read from these options (its serde defaults fill the rest; other methods'
    /// options are ignored).
    pub fn parse<C: DeserializeOwned>(&self) -> Result<C> {
        let obj: serde_json::Map<String, Value> = self.0.clone().into_iter().collect();
        serde_json::from_value(Value::Object(obj)).map_err(|e| {
            // serde names the problem, not the option: find the option that fails alone.
            let culprit = self.0.iter().find(|(k, v)| {
                let one: serde_json::Map<String, Value> = [((*k).clone(), (*v).clone())].into_iter().collect();
                serde_json::from_value::<C>(Value::Object(one)).is_err()
            });
            match culprit {
                Some((k, v)) => anyhow!("PEFT option '{k}' = {v}: {e}"),
                None => anyhow!("PEFT options: {e}"),
            }
        })
    }

    /// The options `C` reads, with defaults filled in: a method's normalised options.
    pub fn normalised<C: DeserializeOwned + Serialize>(&self) -> Result<Options> {
        let c: C = self.parse()?;
        Ok(serde_json::from_value(serde_json::to_value(c)?)?)
    }

    /// Sets one option.
    pub fn set(&mut self, name: &str, value: Value) {
        self.0.insert(name.to_string(), value);
    }

    /// One option's value.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name)
    }

    /// The options, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.0.iter()
    }

    /// Adds `other`'s options (they win on a clash).
    fn extend(&mut self, other: Options) {
        self.0.extend(other.0);
    }
}

/// Everything that defines the target parameters: methods and their options. Saved with them; the
/// options held are exactly those of the methods, defaults filled in, so two specs that build the same
/// parameters compare equal.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftSpec {
    /// The methods, in the order given.
    pub methods: Vec<Method>,
    /// The methods' options (normalised: theirs only, with defaults).
    pub(crate) options: Options,
}

impl Default for PeftSpec {
    fn default() -> Self {
        PeftSpec::with_methods(&[Method::LORA])
    }
}

/// Every option name some method knows.
fn known_options() -> Vec<String> {
    let mut v: Vec<String> = REGISTRY
        .iter()
        .flat_map(|m| m.options(&Options::default()).map(|o| o.0.into_keys().collect::<Vec<_>>()).unwrap_or_default())
        .collect();
    v.sort();
    v.dedup();
    v
}

impl PeftSpec {
    /// A spec of `methods` with `options` (names any method knows, with values it accepts; those of other
    /// methods are then dropped).
    pub fn new(methods: Vec<Method>, options: &Options) -> Result<Self> {
        let known = known_options();
        if let Some(k) = options.0.keys().find(|k| !known.contains(k)) {
            let e = format!("unknown PEFT option '{k}' (known: {})", known.join(", "));
            return Err(crate::Error::InvalidSpec(e).into());
        }
        // Every option given is checked, even for a method not in use: a bad value is never dropped unseen.
        for m in REGISTRY {
            let own = m.options(&Options::default()).unwrap_or_default();
            if options.0.keys().any(|k| own.0.contains_key(k)) {
                let opts = m.options(options).map_err(|e| crate::Error::InvalidSpec(format!("{e:#}")))?;
                m.validate(&opts).map_err(|e| crate::Error::InvalidSpec(format!("{e:#}")))?;
            }
        }
        let mut own = Options::default();
        for m in &methods {
            let opts =
                m.get().options(options).map_err(|e| crate::Error::InvalidSpec(format!("PEFT method {m}: {e:#}")))?;
            own.extend(opts);
        }
        Ok(PeftSpec { methods, options: own })
    }

    /// A spec of `methods` with default options.
    pub fn with_methods(methods: &[Method]) -> Self {
        PeftSpec::new(methods.to_vec(), &Options::default()).expect("default options are valid")
    }

    /// The methods' options.
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// Whether `m` is one of the methods.
    pub fn has(&self, m: Method) -> bool {
        self.methods.contains(&m)
    }

    /// Whether a method trains the backbone's own weights (full fine-tuning).
    pub fn trains_backbone(&self) -> bool {
        self.methods.iter().any(|m| m.get().trains_backbone())
    }

    /// Whether any method adds target parameters besides a task head.
    pub fn adds_parameters(&self) -> bool {
        self.methods.iter().any(|m| m.get().adds_parameters())
    }

    /// The options that differ from `other`'s, as `name: mine -> theirs` (both specs hold exactly their
    /// methods' options, defaults filled in).
    pub fn option_differences(&self, other: &PeftSpec) -> Vec<String> {
        let (a, b) = (&self.options.0, &other.options.0);
        let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
        keys.sort();
        keys.dedup();
        let show = |v: Option<&Value>| v.map_or_else(|| "unset".to_string(), Value::to_string);
        keys.into_iter()
            .filter(|k| a.get(*k) != b.get(*k))
            .map(|k| format!("{k} = {} (now {})", show(a.get(k)), show(b.get(k))))
            .collect()
    }

    /// Short label for reports, e.g. `lora+vpt-deep`.
    pub fn label(&self) -> String {
        self.methods.iter().map(|m| m.name()).collect::<Vec<_>>().join("+")
    }

    /// The methods in registry order (merge order).
    pub(crate) fn in_registry_order(&self) -> Vec<Method> {
        let mut v = self.methods.clone();
        v.sort_by_key(|m| m.rank());
        v
    }

    /// Rejects combinations and options that make no sense, with the reason ([`crate::Error::InvalidSpec`]).
    pub fn validate(&self) -> Result<()> {
        self.check().map_err(|e| crate::Error::InvalidSpec(format!("{e:#}")).into())
    }

    fn check(&self) -> Result<()> {
        if self.methods.is_empty() {
            bail!("no PEFT method given");
        }
        let mut seen = std::collections::BTreeSet::new();
        for m in &self.methods {
            if !seen.insert(*m) {
                bail!("PEFT method '{m}' given twice");
            }
        }
        for m in &self.methods {
            let imp = m.get();
            if let Some(why) = imp.alone()
                && self.methods.len() > 1
            {
                bail!("PEFT method '{m}' cannot be combined with other methods ({why})");
            }
            for (other, why) in imp.incompatible() {
                if self.methods.iter().any(|o| o.name() == *other) {
                    bail!("PEFT methods '{m}' and '{other}' {why}");
                }
            }
            imp.validate(&self.options)?;
        }
        Ok(())
    }
}

impl Serialize for PeftSpec {
    /// The methods and every method's options (the methods' own values, defaults for the others), so that
    /// files keep the flat layout with every key that earlier versions read.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut all = Options::default();
        for m in REGISTRY {
            all.extend(m.options(&self.options).map_err(serde::ser::Error::custom)?);
        }
        all.extend(self.options.clone());
        let mut map = s.serialize_map(Some(1 + all.0.len()))?;
        map.serialize_entry("methods", &self.methods)?;
        for (k, v) in &all.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for PeftSpec {
    /// The flat layout `{"methods": [...], "lora_rank": 8, ...}`; files written before options were
    /// per method hold every method's options, and those of other methods are dropped.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            methods: Vec<Method>,
            #[serde(flatten)]
            options: BTreeMap<String, Value>,
        }
        let raw = Raw::deserialize(d)?;
        PeftSpec::new(raw.methods, &Options(raw.options)).map_err(|e| serde::de::Error::custom(format!("{e:#}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_spec_saved_with_every_option_loads_with_its_own() {
        // The layout every earlier tpp_peft.json has: all options of all methods.
        let old = json!({"methods": ["lora"], "lora_rank": 4, "lora_alpha": 8.0, "lora_dropout": 0.0,
            "lora_targets": ["qkv"], "adapter_dim": 64, "adapter_scale": 0.1, "prompt_len": 10, "prompt_dropout": 0.0});
        let spec: PeftSpec = serde_json::from_value(old.clone()).unwrap();
        assert_eq!(spec.options().get("lora_rank"), Some(&json!(4)));
        assert_eq!(spec.options().get("adapter_dim"), None);
        // Written back in the same layout, every key present (earlier versions read them all).
        assert_eq!(serde_json::to_value(&spec).unwrap(), old);
        let again: PeftSpec = serde_json::from_value(serde_json::to_value(&spec).unwrap()).unwrap();
        assert_eq!(again, spec);
        let e = serde_json::from_value::<PeftSpec>(json!({"methods": ["lora"], "lora_rnk": 4})).unwrap_err();
        assert!(e.to_string().contains("unknown PEFT option 'lora_rnk'"), "{e}");
        let e = serde_json::from_value::<PeftSpec>(json!({"methods": ["lora"], "lora_rank": "x"})).unwrap_err();
        assert!(e.to_string().contains("lora_rank") || e.to_string().contains("invalid type"), "{e}");
        // A bad value of a method not in use is still an error.
        let e = serde_json::from_value::<PeftSpec>(json!({"methods": ["lora"], "prompt_dropout": 2.0})).unwrap_err();
        assert!(e.to_string().contains("prompt_dropout"), "{e}");
    }
}
