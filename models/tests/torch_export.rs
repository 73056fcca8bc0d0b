//! Weights as PyTorch exports them (drn.py's state_dict names, `num_batches_tracked` included),
//! written by scripts/bench/torch_export.py, load through the manifest and Ensemble path.
//!
//! Python: `FRACTURE_PYTHON`, else the venv of scripts/pyenv.sh
//! (`$FRACTURE_CACHE/venv/bin/python`, FRACTURE_CACHE defaulting to `$HOME/.cache/fracture`);
//! it needs numpy and safetensors. Missing, the test fails and says so: it never skips.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use fracture_models::ensemble::sha256_hex;
use fracture_models::{manifest, Ensemble, ModelError};

const CHANNELS: &str = "8,8,16,16,32,32,32,32";

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("FRACTURE_PYTHON") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("FRACTURE_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/fracture")))
        .expect("neither FRACTURE_CACHE nor HOME is set: set FRACTURE_PYTHON to a python with numpy and safetensors");
    cache.join("venv/bin/python")
}

/// Runs torch_export.py, failing with what to do when Python or its packages are missing.
fn export(args: &[&str], out: &Path) {
    let py = python();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/bench/torch_export.py");
    let probe = Command::new(&py)
        .args(["-c", "import numpy, safetensors"])
        .output();
    match probe {
        Err(e) => panic!(
            "cannot run {} ({e}): run scripts/pyenv.sh to make the venv, or set FRACTURE_PYTHON \
             to a Python with numpy and safetensors",
            py.display()
        ),
        Ok(o) if !o.status.success() => panic!(
            "{} lacks numpy or safetensors ({}): add \"safetensors==0.7.0\" to PINNED in \
             scripts/pyenv.sh and rerun it, or set FRACTURE_PYTHON to a Python that has both",
            py.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Ok(_) => {}
    }
    let status = Command::new(&py)
        .arg(&script)
        .args(args)
        .args(["--channels", CHANNELS, "--out"])
        .arg(out)
        .status()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(status.success(), "{} {args:?} failed", script.display());
}

/// A manifest of one member over `file`, with `sha` (the file's own unless given).
fn manifest_text(dir: &Path, member: &str, file: &str, sha: Option<&str>) -> String {
    let sha = sha.map_or_else(
        || sha256_hex(&std::fs::read(dir.join(file)).expect("read the export")),
        str::to_string,
    );
    format!(
        "name = \"torch-export\"\nmodel_version = \"t-1\"\ntrained = false\ninput_size = 64\n\
         model_card = \"test\"\n\n[[members]]\n{member}\nchannels = [{CHANNELS}]\n\
         weights = \"{file}\"\nsha256 = \"{sha}\"\n"
    )
}

fn load(dir: &Path, text: &str) -> Result<Ensemble, ModelError> {
    std::fs::write(dir.join("ensemble.toml"), text).expect("write the manifest");
    Ensemble::load(manifest::load(&dir.join("ensemble.toml"))?, &Device::Cpu)
}

#[test]
fn pytorch_state_dicts_load_and_predict() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            ["--arch", "drn_c_26", "--map-head"].as_slice(),
            "name = \"c\"\narch = \"drn_c_26\"\ninput = \"raw\"\nmap_head = true",
        ),
        (
            [
                "--arch",
                "drn_d_22",
                "--in-channels",
                "2",
                "--attention",
                "--pooling",
                "spp",
            ]
            .as_slice(),
            "name = \"d\"\narch = \"drn_d_22\"\ninput = \"both\"\nattention = true\npooling = \"spp\"",
        ),
    ];
    for (i, (args, member)) in cases.iter().enumerate() {
        let file = format!("w{i}.safetensors");
        export(args, &tmp.path().join(&file));
        let tensors = candle_core::safetensors::load(tmp.path().join(&file), &Device::Cpu)
            .expect("read the export");
        assert!(
            tensors.keys().any(|k| k.ends_with(".num_batches_tracked")),
            "the export should carry torch's BatchNorm counters, which the loader must ignore"
        );

        let ensemble = load(tmp.path(), &manifest_text(tmp.path(), member, &file, None))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        let x: Vec<f32> = (0..2 * 64 * 64).map(|i| (i % 97) as f32 / 97.0).collect();
        let p = ensemble.predict(&[&x, &x]).expect("predict");
        for p in &p {
            assert!(
                p.score.is_finite() && (0.0..=1.0).contains(&p.score),
                "{p:?}"
            );
            if let Some(map) = &p.map {
                assert_eq!(map.len(), 8 * 8);
                assert!(map.iter().all(|v| v.is_finite()));
            }
        }
    }
}

#[test]
fn a_wrong_checksum_or_shape_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    export(&["--arch", "drn_d_22"], &tmp.path().join("w.safetensors"));
    let member = "name = \"d\"\narch = \"drn_d_22\"\ninput = \"raw\"";

    let wrong_sha = "0".repeat(64);
    let err = load(
        tmp.path(),
        &manifest_text(tmp.path(), member, "w.safetensors", Some(&wrong_sha)),
    )
    .expect_err("a wrong sha256 must be refused");
    assert!(matches!(err, ModelError::ChecksumMismatch { .. }), "{err}");

    // The same file under a member whose last stage is wider: same names, other shapes.
    let text = manifest_text(tmp.path(), member, "w.safetensors", None)
        .replace(CHANNELS, "8,8,16,16,32,32,32,64");
    let err = load(tmp.path(), &text).expect_err("a shape mismatch must be refused");
    assert!(matches!(err, ModelError::Weights { .. }), "{err}");
    assert!(err.to_string().contains("shape"), "{err}");
}
