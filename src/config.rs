//! The configuration root: every section the binary knows, read once at start. A section it does
//! not know (`[ensmble]`, `--set ensmble.batch.max=8`) is refused as loudly as an unknown key.

use fracture_shared::config::{ConfigError, Settings};

/// Declares the root once: its fields, their section names and how they are read.
macro_rules! root {
    ($($(#[$doc:meta])* $name:ident: $ty:ty,)*) => {
        /// Every section of `fracture.toml`, each with its working default.
        #[derive(Debug, Clone, Default)]
        pub struct Config {
            $($(#[$doc])* pub $name: $ty,)*
        }

        /// The section names, as written in `fracture.toml`.
        pub const SECTIONS: &[&str] = &[$(stringify!($name)),*];

        impl Config {
            /// Reads every section of `settings`, refusing an unknown section or key.
            pub fn load(settings: &Settings) -> Result<Self, ConfigError> {
                settings.refuse_unknown_sections(SECTIONS)?;
                Ok(Self {
                    $($name: settings.section(stringify!($name))?,)*
                })
            }
        }
    };
}

root! {
    /// `[kafka]`: the brokers and the topic prefix.
    kafka: fracture_shared::bus::KafkaConfig,
    /// `[store]`: the claim-check store.
    store: fracture_shared::store::StoreConfig,
    /// `[telemetry]`: logs, metrics endpoint, traces.
    telemetry: fracture_shared::telemetry::TelemetryConfig,
    /// `[retry]`: the one backoff policy of every wait.
    retry: fracture_shared::RetryPolicy,
    /// `[model]`: the ensemble manifest and the device.
    model: fracture_shared::config::ModelConfig,
    /// `[lanes]`: live work ahead of back-scans.
    lanes: fracture_shared::bus::LaneConfig,
    ingest: fracture_ingest::IngestConfig,
    preprocess: fracture_preprocess::PreprocessConfig,
    ensemble: fracture_ensemble::EnsembleConfig,
    postprocess: fracture_postprocess::PostprocessConfig,
    audit: fracture_audit::AuditConfig,
    export: fracture_export::ExportConfig,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::load(&Settings::from_overrides(pairs).unwrap())
    }

    #[test]
    fn every_section_has_a_default() {
        let c = load(&[]).unwrap();
        assert_eq!(c.ingest, fracture_ingest::IngestConfig::default());
        assert_eq!(c.kafka, fracture_shared::bus::KafkaConfig::default());
    }

    #[test]
    fn a_misspelled_section_is_refused_with_the_near_name() {
        let e = load(&[("ensmble.batch.max", "8")]).unwrap_err().to_string();
        assert!(e.contains("[ensmble]") && e.contains("[ensemble]"), "{e}");
        let e = load(&[("nonsense.x", "1")]).unwrap_err().to_string();
        assert!(e.contains("[nonsense]") && e.contains("ingest"), "{e}");
    }

    #[test]
    fn a_misspelled_key_is_still_refused() {
        let e = load(&[("ensemble.batch.mxa", "8")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("mxa"), "{e}");
        assert_eq!(
            load(&[("ensemble.batch.max", "8")])
                .unwrap()
                .ensemble
                .batch
                .max,
            8
        );
    }
}
