//! Building the pieces every command needs from configuration.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use fracture_models::{Ensemble, Manifest};
use fracture_shared::config::{ModelConfig, Settings};

pub fn device(name: &str) -> anyhow::Result<candle_core::Device> {
    match name.trim() {
        "" | "cpu" => Ok(candle_core::Device::Cpu),
        other => bail!("device {other:?} is not available in this build; use \"cpu\" (GPU builds need the cuda feature)"),
    }
}

pub fn manifest(
    settings: &Settings,
    over: Option<&Path>,
) -> anyhow::Result<(ModelConfig, Manifest)> {
    let cfg: ModelConfig = settings.section("model")?;
    let path = over
        .map(Path::to_path_buf)
        .unwrap_or_else(|| default_manifest(&cfg.manifest));
    let m = fracture_models::manifest::load(&path)
        .with_context(|| format!("loading the ensemble manifest {}", path.display()))?;
    Ok((cfg, m))
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

pub fn ensemble(settings: &Settings, over: Option<&Path>) -> anyhow::Result<Arc<Ensemble>> {
    let (cfg, m) = manifest(settings, over)?;
    let e = Ensemble::load(m, &device(&cfg.device)?)?;
    if !e.manifest().trained {
        tracing::warn!(model_version = %e.manifest().model_version, "this ensemble was never trained: its scores mean nothing");
    }
    Ok(Arc::new(e))
}

pub fn model_summary(arch: &str, input: usize, channels: usize) -> anyhow::Result<()> {
    use fracture_models::drn::{count_parameters, multiply_adds, Arch, DrnConfig};
    let a: Arch =
        serde_json::from_value(serde_json::Value::String(arch.to_string())).map_err(|_| {
            anyhow::anyhow!(
                "unknown architecture {arch:?}; choose drn_c_26, drn_c_42, drn_d_22 or drn_d_38"
            )
        })?;
    let cfg = DrnConfig::new(a, channels);
    cfg.validate()?;
    let params = count_parameters(&cfg);
    let madds = multiply_adds(&cfg, input);
    println!("{arch}: {:.2}M parameters, {:.1} G multiply-adds at {input}x{input} with {channels} input channel(s)", params as f64 / 1e6, madds as f64 / 1e9);
    Ok(())
}
