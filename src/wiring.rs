//! Building the pieces every command needs from configuration.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use fracture_models::{Ensemble, Manifest};
use fracture_shared::config::ModelConfig;

/// The device `[model] device` names: `cpu`; `cuda` (the first GPU) or `cuda:N`, which must be
/// there, since a deployment that asked for a GPU would rather fail than crawl on the CPU; or
/// `auto` (or empty): the first CUDA GPU in a build with the `cuda` feature that finds one, else
/// the CPU.
pub fn device(name: &str) -> anyhow::Result<candle_core::Device> {
    let name = name.trim();
    let cuda = |ordinal: usize| {
        candle_core::Device::new_cuda(ordinal).with_context(|| {
            format!(
                "model.device = {name:?}: no CUDA GPU {ordinal} for the ensemble; this needs a \
                 build with the cuda feature (cargo build --features fracture-models/cuda) on a \
                 machine with that GPU, or set model.device = \"cpu\" (or \"auto\")"
            )
        })
    };
    match name.to_ascii_lowercase().as_str() {
        "cpu" => Ok(candle_core::Device::Cpu),
        "" | "auto" => Ok(fracture_models::ensemble::inference_device()?),
        "cuda" => cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => cuda(ordinal),
            _ => bail!(
                "model.device = {name:?} is not a device; use \"cpu\", \"cuda\", \"cuda:N\" \
                 (N a GPU index) or \"auto\""
            ),
        },
    }
}

/// The manifest `over` names, else the configured one.
pub fn manifest(cfg: &ModelConfig, over: Option<&Path>) -> anyhow::Result<Manifest> {
    let path = over
        .map(Path::to_path_buf)
        .unwrap_or_else(|| default_manifest(&cfg.manifest));
    let m = fracture_models::manifest::load(&path)
        .with_context(|| format!("loading the ensemble manifest {}", path.display()))?;
    Ok(m)
}

/// The configured manifest; the built-in default (a relative path) is also looked for beside
/// the sources this binary was built from and where packages install it, so `fracture scan`
/// works from any folder.
fn default_manifest(configured: &str) -> std::path::PathBuf {
    let p = std::path::PathBuf::from(configured);
    if p.exists() || configured != ModelConfig::default().manifest {
        return p;
    }
    [
        Path::new(env!("CARGO_MANIFEST_DIR")).join(configured),
        Path::new("/usr/share/fracture").join(configured),
    ]
    .into_iter()
    .find(|c| c.exists())
    .unwrap_or(p)
}

pub fn ensemble(cfg: &ModelConfig, over: Option<&Path>) -> anyhow::Result<Arc<Ensemble>> {
    let m = manifest(cfg, over)?;
    let device = device(&cfg.device)?;
    tracing::info!(device = ?device, "ensemble device");
    let e = Ensemble::load(m, &device)?;
    if !e.manifest().trained {
        tracing::warn!(model_version = %e.manifest().model_version, "this ensemble was never trained on a real radiograph: its scores say nothing about a patient");
    }
    Ok(Arc::new(e))
}

/// An architecture by its manifest name (`drn_c_26`) or as the paper spells it (`DRN-C-26`).
fn arch(name: &str) -> anyhow::Result<fracture_models::drn::Arch> {
    let canonical = name.trim().to_ascii_lowercase().replace('-', "_");
    serde_json::from_value(serde_json::Value::String(canonical)).map_err(|_| {
        anyhow::anyhow!(
            "unknown architecture {name:?}; choose drn_c_26, drn_c_42, drn_d_22 or drn_d_38 \
             (DRN-C-26 and the like work too)"
        )
    })
}

pub fn model_summary(arch_name: &str, input: usize, channels: usize) -> anyhow::Result<()> {
    use fracture_models::drn::{count_parameters, multiply_adds, DrnConfig};
    let a = arch(arch_name)?;
    let arch = arch_name;
    let cfg = DrnConfig::new(a, channels);
    cfg.validate()?;
    let params = count_parameters(&cfg);
    let madds = multiply_adds(&cfg, input);
    println!("{arch}: {:.2}M parameters, {:.1} G multiply-adds at {input}x{input} with {channels} input channel(s)", params as f64 / 1e6, madds as f64 / 1e9);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::device;

    #[test]
    fn device_names_pick_the_cpu_auto_or_refuse() {
        assert!(device("cpu").unwrap().is_cpu());
        assert!(device(" CPU ").unwrap().is_cpu());
        let picked = fracture_models::ensemble::inference_device().unwrap();
        assert!(device("auto").unwrap().same_device(&picked));
        assert!(device("").unwrap().same_device(&picked));
        for bad in ["gpu", "cuda:x", "cuda:-1", "metal"] {
            let e = device(bad).unwrap_err().to_string();
            assert!(
                e.contains("is not a device") && e.contains("cpu"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn architectures_answer_to_the_papers_spelling_too() {
        for (name, same) in [
            ("DRN-C-26", "drn_c_26"),
            ("drn-d-22", "drn_d_22"),
            (" DRN_D_38", "drn_d_38"),
        ] {
            assert_eq!(
                super::arch(name).unwrap(),
                super::arch(same).unwrap(),
                "{name}"
            );
        }
        assert_ne!(
            super::arch("DRN-C-26").unwrap(),
            super::arch("DRN-C-42").unwrap()
        );
        let e = super::arch("resnet50").unwrap_err().to_string();
        assert!(e.contains("drn_c_26") && e.contains("resnet50"), "{e}");
    }

    /// Without the cuda feature, or without that GPU, asking for one fails and says what to do.
    #[test]
    fn a_gpu_that_is_not_there_is_refused_with_what_to_do() {
        for name in ["cuda", "cuda:1"] {
            match device(name) {
                Ok(d) => assert!(d.is_cuda(), "{name} gave {d:?}"),
                Err(e) => {
                    let e = format!("{e:#}");
                    assert!(e.contains("cuda feature") && e.contains("cpu"), "{e}");
                }
            }
        }
    }
}
