//! The house rules, read from `cargo metadata`: stages meet only through messages, so no stage
//! crate depends on another (dev-dependencies included); the model and its training know no
//! stage; what lies below the stages (shared, edge) depends on no stage either. Only the binary
//! wires stages together.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// Each workspace package: its manifest folder relative to the workspace, and the workspace
/// packages it depends on (every kind).
fn workspace() -> Workspace {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(root)
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata is JSON");
    let packages = meta["packages"].as_array().expect("packages");
    let names: Vec<String> = packages
        .iter()
        .map(|p| p["name"].as_str().expect("name").to_string())
        .collect();
    packages
        .iter()
        .map(|p| {
            let manifest = Path::new(p["manifest_path"].as_str().expect("manifest_path"));
            let dir = manifest
                .parent()
                .expect("a folder")
                .strip_prefix(root)
                .expect("inside the workspace")
                .display()
                .to_string();
            let deps = p["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                .map(|d| d["name"].as_str().expect("name").to_string())
                .filter(|d| names.contains(d))
                .collect();
            (p["name"].as_str().expect("name").to_string(), (dir, deps))
        })
        .collect()
}

/// A stage is a crate under `services/` that runs as `fracture serve <stage>`; `services/edge` is
/// the library below the hospital-side stages.
fn is_stage(dir: &str) -> bool {
    dir.starts_with("services/") && dir != "services/edge"
}

type Workspace = BTreeMap<String, (String, Vec<String>)>;

/// The names of the stage crates.
fn stages(ws: &Workspace) -> Vec<&String> {
    ws.iter()
        .filter(|(_, (dir, _))| is_stage(dir))
        .map(|(n, _)| n)
        .collect()
}

#[test]
fn no_stage_crate_depends_on_another() {
    let ws = workspace();
    let stages = stages(&ws);
    assert!(
        stages.len() >= 6,
        "expected the six stages under services/, found {stages:?}"
    );
    let mut broken = Vec::new();
    for (name, (dir, deps)) in &ws {
        if !is_stage(dir) {
            continue;
        }
        for d in deps {
            if stages.contains(&d) {
                broken.push(format!("{name} -> {d}"));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "stage crates depend on other stage crates (they must meet only through messages in \
         fracture-shared; move what both need below them): {broken:?}"
    );
}

#[test]
fn the_model_and_what_lies_below_the_stages_know_no_stage() {
    let ws = workspace();
    let stages = stages(&ws);
    let mut broken = Vec::new();
    for (name, (dir, deps)) in &ws {
        let below = dir.starts_with("models") || dir == "shared" || dir == "services/edge";
        if !below {
            continue;
        }
        for d in deps.iter().filter(|d| stages.contains(d)) {
            broken.push(format!("{name} ({dir}) -> {d}"));
        }
    }
    assert!(
        broken.is_empty(),
        "the model, training, shared and edge crates must not depend on a stage: {broken:?}"
    );
    let (_, shared_deps) = &ws["fracture-shared"];
    assert!(
        shared_deps.is_empty(),
        "fracture-shared is the bottom of the house: {shared_deps:?}"
    );
}
