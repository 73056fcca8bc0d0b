//! Layered configuration: built-in defaults < `fracture.toml` < `FRACTURE__SECTION__KEY` < flags.
//!
//! Each stage owns the struct of its own section (`[ingest]`, `[ensemble]`, ...) and reads it with
//! [`Settings::section`]; the sections every stage needs (`kafka`, `store`, `telemetry`) live here.

use std::path::Path;

use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

/// One setting that cannot work, said so a person can fix it: the message names the key and
/// what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SettingError(pub String);

impl From<String> for SettingError {
    fn from(message: String) -> Self {
        Self(message)
    }
}

impl From<&str> for SettingError {
    fn from(message: &str) -> Self {
        Self(message.to_string())
    }
}

/// The merged configuration sources, before any section is read.
#[derive(Debug, Clone)]
pub struct Settings {
    merged: config::Config,
}

impl Settings {
    /// Loads `file` (or `./fracture.toml` when it exists and no file is given), the environment
    /// (`FRACTURE__KAFKA__BROKERS=...` sets `kafka.brokers`), then `overrides` (`key=value` pairs
    /// from the command line, e.g. `ensemble.batch.max=8`), each layer over the one before.
    pub fn load(file: Option<&Path>, overrides: &[(String, String)]) -> Result<Self, ConfigError> {
        let mut b = config::Config::builder();
        match file {
            Some(f) => {
                if !f.exists() {
                    return Err(ConfigError(format!(
                        "configuration file {} does not exist",
                        f.display()
                    )));
                }
                b = b.add_source(config::File::from(f).format(config::FileFormat::Toml));
            }
            None => {
                b = b.add_source(
                    config::File::with_name("fracture.toml")
                        .format(config::FileFormat::Toml)
                        .required(false),
                )
            }
        }
        b = b.add_source(
            config::Environment::with_prefix("FRACTURE")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        );
        for (k, v) in overrides {
            b = b
                .set_override(k.as_str(), v.as_str())
                .map_err(|e| ConfigError(format!("{k}: {e}")))?;
        }
        let merged = b.build().map_err(|e| ConfigError(e.to_string()))?;
        Ok(Self { merged })
    }

    /// Only the given key/value overrides (tests, embedded use).
    pub fn from_overrides(overrides: &[(&str, &str)]) -> Result<Self, ConfigError> {
        let mut b = config::Config::builder();
        for (k, v) in overrides {
            b = b
                .set_override(*k, *v)
                .map_err(|e| ConfigError(format!("{k}: {e}")))?;
        }
        Ok(Self {
            merged: b.build().map_err(|e| ConfigError(e.to_string()))?,
        })
    }

    /// Refuses a top-level section that is not in `known`, naming the nearest known one, so a
    /// misspelled section is not silently replaced by its defaults.
    pub fn refuse_unknown_sections(&self, known: &[&str]) -> Result<(), ConfigError> {
        let top = self
            .merged
            .clone()
            .try_deserialize::<std::collections::HashMap<String, serde::de::IgnoredAny>>()
            .map_err(|e| ConfigError(e.to_string()))?;
        let mut names: Vec<&String> = top.keys().collect();
        names.sort();
        for name in names {
            if known.contains(&name.as_str()) {
                continue;
            }
            let near = known
                .iter()
                .map(|k| (edit_distance(k, name), *k))
                .min()
                .filter(|(d, _)| *d <= 2)
                .map(|(_, k)| format!("; did you mean [{k}]?"))
                .unwrap_or_default();
            return Err(ConfigError(format!(
                "unknown section [{name}]{near} (the sections are {})",
                known.join(", ")
            )));
        }
        Ok(())
    }

    /// Reads one section into its struct; a missing section gives the struct's defaults, and an
    /// unknown key is refused (the struct says `deny_unknown_fields`), so a typo is not ignored.
    pub fn section<T: DeserializeOwned + Default>(&self, name: &str) -> Result<T, ConfigError> {
        match self.merged.get::<T>(name) {
            Ok(v) => Ok(v),
            Err(config::ConfigError::NotFound(_)) => Ok(T::default()),
            Err(e) => Err(ConfigError(format!("[{name}]: {e}"))),
        }
    }
}

/// Levenshtein distance, for "did you mean" (section names are short).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreConfig;

    #[test]
    fn layers_override_in_order_and_typos_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("fracture.toml");
        std::fs::write(&f, "[store]\nurl = \"/from/file\"\n").unwrap();
        let s = Settings::load(Some(&f), &[]).unwrap();
        assert_eq!(s.section::<StoreConfig>("store").unwrap().url, "/from/file");
        let s = Settings::load(Some(&f), &[("store.url".into(), "/from/flag".into())]).unwrap();
        assert_eq!(s.section::<StoreConfig>("store").unwrap().url, "/from/flag");
        let s = Settings::load(Some(&f), &[]).unwrap();
        assert_eq!(
            s.section::<crate::bus::KafkaConfig>("kafka").unwrap(),
            Default::default()
        );

        std::fs::write(&f, "[store]\nulr = \"/typo\"\n").unwrap();
        let e = Settings::load(Some(&f), &[])
            .unwrap()
            .section::<StoreConfig>("store")
            .unwrap_err();
        assert!(e.to_string().contains("ulr"), "{e}");
    }
}

/// `[model]`: the ensemble every model-aware stage (preprocess, ensemble, postprocess) loads.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Path of the ensemble manifest (`ensemble.toml`).
    pub manifest: String,
    /// `cpu`, or `cuda` / `cuda:N` in a build with the `cuda` feature.
    pub device: String,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            manifest: "models/demo/ensemble.toml".into(),
            device: "cpu".into(),
        }
    }
}
