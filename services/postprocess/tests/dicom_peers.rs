//! The DICOM outputs against real peers, on a real radiograph (RG3, `scripts/fixtures.sh`) and on
//! a phantom (`fracture-phantoms`):
//! - dciodvfy (dicom3tools, installed by `scripts/deid-peers.sh`) finds no error in the SR or
//!   the Secondary Capture (its warnings are printed, run with `--nocapture` to read them);
//! - highdicom (`scripts/pyenv.sh`) reads the SR as a TID 1500 Measurement Report, and finds our
//!   boxes as image regions, the finding, the score and the threshold.
//!
//! A missing tool fails the test with the script that installs it: these checks never skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use dicom_dictionary_std::{tags, uids};
use fracture_postprocess::{dicom_outputs, sr};
use fracture_shared::messages::{schema, BoundingBox, Finding, RadiographId};
use fracture_shared::pixels;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs one of the project's scripts and returns the last line of its stdout; a failing script
/// fails the test with its stderr.
fn run_script(name: &str) -> String {
    let script = repo_root().join("scripts").join(name);
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "scripts/{name} failed ({}); it installs what this test needs. Its stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string())
        .unwrap_or_else(|| panic!("scripts/{name} printed nothing on stdout"))
}

fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| match std::env::var_os("FRACTURE_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(run_script("fixtures.sh")),
    })
}

/// dciodvfy on PATH, after `scripts/deid-peers.sh` made sure dicom3tools is installed.
fn dciodvfy() -> &'static str {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        run_script("deid-peers.sh");
    });
    "dciodvfy"
}

/// The venv python with highdicom, from `scripts/pyenv.sh`.
fn oracle_python() -> &'static Path {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let py = PathBuf::from(run_script("pyenv.sh"));
        assert!(py.exists(), "pyenv.sh printed {py:?}, which does not exist");
        py
    })
}

fn work_dir(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("postprocess_dicom_peers")
        .join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("cannot create the work folder");
    dir
}

/// dciodvfy's errors and warnings for a file.
fn validate(path: &Path) -> (Vec<String>, Vec<String>) {
    let out = Command::new(dciodvfy())
        .arg(path)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run dciodvfy ({e}); scripts/deid-peers.sh installs it (dicom3tools)")
        });
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let pick = |p: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with(p))
            .map(str::to_string)
            .collect()
    };
    (pick("Error"), pick("Warning"))
}

fn finding(sop: &str, study: &str, region: &str, boxes: Vec<BoundingBox>) -> Finding {
    let fracture = !boxes.is_empty();
    Finding {
        schema: schema::FINDING.into(),
        id: RadiographId {
            input: "in-1".into(),
            study_instance_uid: study.into(),
            series_instance_uid: "2.25.2".into(),
            sop_instance_uid: sop.into(),
        },
        site: "S1".into(),
        region: region.into(),
        score: if fracture { 0.8125 } else { 0.125 },
        threshold: 0.5,
        fracture,
        boxes,
        model_version: "test-model-1".into(),
        model_trained: false,
        sr: None,
        sc: None,
    }
}

/// Writes the outputs of `f` about `source`, validates them with dciodvfy and reads the SR
/// with highdicom; returns highdicom's view.
fn check(test: &str, source: &[u8], f: &Finding) -> serde_json::Value {
    let dir = work_dir(test);
    let out = dicom_outputs(source, f).expect("DICOM outputs");
    let (sr_path, sc_path) = (dir.join("sr.dcm"), dir.join("sc.dcm"));
    std::fs::write(&sr_path, &out.sr).unwrap();
    std::fs::write(&sc_path, &out.sc).unwrap();
    for (what, path) in [("SR", &sr_path), ("Secondary Capture", &sc_path)] {
        let (errors, warnings) = validate(path);
        for w in &warnings {
            println!("{test} {what}: dciodvfy {w}");
        }
        assert!(
            errors.is_empty(),
            "{test}: dciodvfy finds errors in our {what} ({}):\n{}",
            path.display(),
            errors.join("\n")
        );
    }

    let o = Command::new(oracle_python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sr_oracle.py"))
        .arg(&sr_path)
        .output()
        .expect("cannot run the highdicom oracle");
    assert!(
        o.status.success(),
        "{test}: highdicom cannot read our SR as a TID 1500 report:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("oracle JSON");

    // What highdicom found is what we meant.
    let src = pixels::read_object(source).unwrap();
    let src_sop = src
        .element(tags::SOP_INSTANCE_UID)
        .unwrap()
        .to_str()
        .unwrap()
        .trim_end_matches('\0')
        .to_string();
    assert_eq!(v["sop_class_uid"], uids::COMPREHENSIVE_SR_STORAGE);
    assert_eq!(v["template"], "1500");
    assert!(v["observer_types"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t == "Device"));
    assert_eq!(v["device_model"], "test-model-1 (untrained)");
    let images = v["images"].as_array().unwrap();
    assert_eq!(images.len(), 1, "{v}");
    let g = &images[0];
    assert_eq!(g["finding_type"], serde_json::json!(["72704001", "SCT"]));
    assert_eq!(g["source_images"], serde_json::json!([src_sop]));
    let prob = g["measurements"]["Probability"][0].as_f64().unwrap();
    assert!((prob - f64::from(f.score)).abs() < 1e-6, "{v}");
    assert_eq!(g["measurements"]["Probability"][1], "{probability}");
    let thr = g["measurements"]["Threshold Value"][0].as_f64().unwrap();
    assert!((thr - f64::from(f.threshold)).abs() < 1e-6, "{v}");
    let present = if f.fracture { "52101004" } else { "272519000" };
    assert_eq!(g["evaluations"]["Fracture"][0], present, "{v}");

    let regions = v["regions"].as_array().unwrap();
    assert_eq!(regions.len(), f.boxes.len(), "{v}");
    assert_eq!(v["fracture_regions"], f.boxes.len());
    for (r, b) in regions.iter().zip(&f.boxes) {
        assert_eq!(r["graphic_type"], "POLYLINE");
        assert_eq!(r["referenced_sop_instance_uid"], src_sop.as_str());
        let got: Vec<f32> = r["graphic_data"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|p| p.as_array().unwrap().iter())
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(got, sr::polyline(b).to_vec(), "box {b:?}");
        let box_prob = r["measurements"]["Probability"][0].as_f64().unwrap();
        assert!((box_prob - f64::from(b.score)).abs() < 1e-6);
    }
    v
}

fn rg3() -> Vec<u8> {
    let path = fixtures().join("RG3_UNCR.dcm");
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{} ({e}): scripts/fixtures.sh provides it", path.display()))
}

fn uid_of(bytes: &[u8], tag: dicom_core::Tag) -> String {
    pixels::read_object(bytes)
        .unwrap()
        .element(tag)
        .unwrap()
        .to_str()
        .unwrap()
        .trim_end_matches('\0')
        .to_string()
}

#[test]
fn rg3_positive_with_boxes_passes_dciodvfy_and_highdicom() {
    let source = rg3();
    let sop = uid_of(&source, tags::SOP_INSTANCE_UID);
    let study = uid_of(&source, tags::STUDY_INSTANCE_UID);
    let boxes = vec![
        BoundingBox {
            x0: 612.5,
            y0: 980.0,
            x1: 840.0,
            y1: 1210.25,
            score: 0.93,
        },
        BoundingBox {
            x0: 100.0,
            y0: 120.0,
            x1: 260.0,
            y1: 300.0,
            score: 0.61,
        },
    ];
    check(
        "rg3_positive",
        &source,
        &finding(&sop, &study, "tibia_fibula", boxes),
    );
}

#[test]
fn rg3_negative_passes_dciodvfy_and_highdicom() {
    let source = rg3();
    let sop = uid_of(&source, tags::SOP_INSTANCE_UID);
    let study = uid_of(&source, tags::STUDY_INSTANCE_UID);
    check(
        "rg3_negative",
        &source,
        &finding(&sop, &study, "unknown", vec![]),
    );
}

#[test]
fn phantom_with_its_labelled_boxes_passes_dciodvfy_and_highdicom() {
    let dir = work_dir("phantom_source");
    let cfg = fracture_phantoms::PhantomConfig {
        count: 1,
        seed: 11,
        out: dir.clone(),
        min_side: 320,
        max_side: 480,
        fracture_rate: 1.0,
    };
    fracture_phantoms::generate(&cfg).expect("phantom");
    let labels = std::fs::read_to_string(dir.join("labels.csv")).unwrap();
    let mut boxes = Vec::new();
    let mut region = String::new();
    for row in labels.lines().skip(1) {
        let c: Vec<&str> = row.split(',').collect();
        region = c[1].to_string();
        let n = |i: usize| c[i].parse::<f64>().unwrap();
        boxes.push(BoundingBox {
            x0: n(3),
            y0: n(4),
            x1: n(5),
            y1: n(6),
            score: 0.75,
        });
    }
    assert!(!boxes.is_empty(), "a fractured phantom has boxes");
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "dcm"))
        .expect("the phantom file");
    let source = std::fs::read(file).unwrap();
    let sop = uid_of(&source, tags::SOP_INSTANCE_UID);
    let study = uid_of(&source, tags::STUDY_INSTANCE_UID);
    let v = check("phantom", &source, &finding(&sop, &study, &region, boxes));
    let site = v["images"][0]["finding_sites"].clone();
    assert_eq!(
        site.as_array().map(Vec::len),
        Some(1),
        "the phantom's region {region} is coded as a finding site: {v}"
    );
}
