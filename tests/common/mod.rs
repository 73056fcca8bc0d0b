//! Test inputs built from real radiographs: the fixtures the project's script fetches (pinned
//! sha256), plus broken and non-radiograph files made from them.

#![allow(dead_code)]

pub mod hostile;
pub mod orthanc;
pub mod pipeline;

use std::path::{Path, PathBuf};
use std::process::Command;

use dicom_core::value::PixelFragmentSequence;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::{tags, uids};

/// The fixtures folder (RG3_UNCR.dcm, cat.dcm), fetched by scripts/fixtures.sh.
pub fn fixtures() -> PathBuf {
    if let Ok(d) = std::env::var("FRACTURE_FIXTURES") {
        return PathBuf::from(d);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(root.join("scripts/fixtures.sh"))
        .output()
        .expect("run scripts/fixtures.sh");
    assert!(
        out.status.success(),
        "scripts/fixtures.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(
        stdout
            .lines()
            .last()
            .expect("fixtures.sh prints its folder")
            .trim(),
    )
}

/// What the inputs folder holds and how each must end.
pub struct Inputs {
    pub dir: PathBuf,
    /// Files that must each give one finding.
    pub good: Vec<String>,
    /// Files that must each give one dead letter, with a word the reason must contain.
    pub bad: Vec<(&'static str, &'static str)>,
    /// Files that are plainly not DICOM: skipped, counted, never a message.
    pub skipped: Vec<&'static str>,
}

pub fn edit(src: &Path, dst: &Path, f: impl FnOnce(&mut dicom_object::DefaultDicomObject)) {
    let mut obj = dicom_object::open_file(src).expect("fixture parses");
    f(&mut obj);
    obj.write_to_file(dst).expect("write test file");
}

/// Builds the standard mixed input folder in `dir`.
pub fn build_inputs(dir: &Path) -> Inputs {
    let fx = fixtures();
    let rg3 = fx.join("RG3_UNCR.dcm");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::copy(&rg3, dir.join("rg3.dcm")).unwrap();
    std::fs::copy(fx.join("cat.dcm"), dir.join("sub/cat.dcm")).unwrap();
    std::fs::write(dir.join("empty.dcm"), b"").unwrap();
    std::fs::write(
        dir.join("fake.dcm"),
        b"this is a note saved with a .dcm name\n",
    )
    .unwrap();
    let bytes = std::fs::read(&rg3).unwrap();
    std::fs::write(dir.join("truncated.dcm"), &bytes[..100_000]).unwrap();
    std::fs::write(dir.join("notes.txt"), b"reading list\n").unwrap();
    edit(&rg3, &dir.join("no-pixels.dcm"), |o| {
        o.remove_element(tags::PIXEL_DATA);
        o.put(DataElement::new(
            tags::SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from("1.2.826.0.1.3680043.10.543.1"),
        ));
    });
    edit(&rg3, &dir.join("ct.dcm"), |o| {
        o.put(DataElement::new(
            tags::SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(uids::CT_IMAGE_STORAGE),
        ));
        o.put(DataElement::new(
            tags::MODALITY,
            VR::CS,
            PrimitiveValue::from("CT"),
        ));
        o.put(DataElement::new(
            tags::SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from("1.2.826.0.1.3680043.10.543.2"),
        ));
    });
    edit(&rg3, &dir.join("sr.dcm"), |o| {
        o.remove_element(tags::PIXEL_DATA);
        o.put(DataElement::new(
            tags::SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(uids::BASIC_TEXT_SR_STORAGE),
        ));
        o.put(DataElement::new(
            tags::MODALITY,
            VR::CS,
            PrimitiveValue::from("SR"),
        ));
        o.put(DataElement::new(
            tags::SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from("1.2.826.0.1.3680043.10.543.3"),
        ));
    });
    edit(&rg3, &dir.join("jpeg2000.dcm"), |o| {
        // JPEG 2000 is not in this build's decoders: a real-world syntax we must refuse clearly.
        o.update_meta(|m| m.transfer_syntax = uids::JPEG2000_LOSSLESS.to_string());
        o.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OB,
            PixelFragmentSequence::new(vec![0u32], vec![vec![0xFFu8; 64]]),
        ));
        o.put(DataElement::new(
            tags::SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from("1.2.826.0.1.3680043.10.543.4"),
        ));
    });
    Inputs {
        dir: dir.to_path_buf(),
        good: {
            let mut good = vec!["rg3.dcm".to_string(), "sub/cat.dcm".to_string()];
            // FRACTURE_E2E_COPIES=N adds N more copies of each radiograph, for throughput figures.
            let copies: usize = std::env::var("FRACTURE_E2E_COPIES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if copies > 0 {
                std::fs::create_dir_all(dir.join("bulk")).unwrap();
            }
            for i in 0..copies {
                for (src, name) in [(rg3.clone(), "rg3"), (fx.join("cat.dcm"), "cat")] {
                    let rel = format!("bulk/{name}-{i}.dcm");
                    std::fs::copy(&src, dir.join(&rel)).unwrap();
                    good.push(rel);
                }
            }
            good
        },
        bad: vec![
            ("empty.dcm", "empty file"),
            ("fake.dcm", "not a DICOM file"),
            ("truncated.dcm", "cannot be parsed"),
            ("no-pixels.dcm", "no Pixel Data"),
            ("ct.dcm", "not a radiograph"),
            ("sr.dcm", "not a radiograph"),
            ("jpeg2000.dcm", "transfer syntax"),
        ],
        skipped: vec!["notes.txt"],
    }
}

/// What `fracture deid --out OUT` refused, as (source path, reason): `OUT/dead-letter.jsonl`
/// names inputs by reference only (checked here: no line holds a refused file's name), and
/// `OUT.refused-sources.jsonl` beside it maps the references back to paths.
pub fn deid_refusals(out: &Path) -> Vec<(String, String)> {
    let lines = |p: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let letters = std::fs::read_to_string(out.join("dead-letter.jsonl")).unwrap();
    let mut name = out.file_name().unwrap().to_os_string();
    name.push(".refused-sources.jsonl");
    let sources: std::collections::HashMap<String, String> = lines(&out.with_file_name(name))
        .into_iter()
        .map(|v| {
            (
                v["input"].as_str().unwrap().into(),
                v["source"].as_str().unwrap().into(),
            )
        })
        .collect();
    letters
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let input = v["input"].as_str().unwrap();
            let source = sources
                .get(input)
                .unwrap_or_else(|| panic!("{input} has no source beside the export"))
                .clone();
            let file = Path::new(&source).file_name().unwrap().to_string_lossy();
            assert!(!l.contains(&*file), "a path in the export's refusals: {l}");
            (source, v["reason"].as_str().unwrap().to_string())
        })
        .collect()
}

/// A peer a script builds once and names on its last stdout line: `$var` when set, else
/// `bash scripts/SCRIPT ARGS...` (Prometheus, Jaeger, container-check).
pub fn built_peer(var: &str, script: &str, args: &[&str]) -> PathBuf {
    if let Ok(path) = std::env::var(var) {
        if !path.trim().is_empty() {
            return PathBuf::from(path.trim());
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(root.join("scripts").join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run scripts/{script}: {e}"));
    assert!(
        out.status.success(),
        "scripts/{script} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_else(|| panic!("scripts/{script} printed no path"))
            .trim(),
    )
}

/// `container-check` (scripts/compose/config): docker-compose.yml through compose-go and the
/// Dockerfile through BuildKit's checks, as Docker reads them.
pub fn container_check() -> PathBuf {
    built_peer("FRACTURE_CONTAINER_CHECK", "compose.sh", &["checker"])
}

/// The values of `tags` in `obj`, split into name components of 4 or more characters ("Doe^John"
/// may be written as "Doe" alone), for asserting that none of them leaks anywhere.
pub fn identifier_parts(
    obj: &dicom_object::DefaultDicomObject,
    tags: &[dicom_core::Tag],
) -> Vec<(dicom_core::Tag, String)> {
    let mut parts = Vec::new();
    for &tag in tags {
        if let Ok(e) = obj.element(tag) {
            let v = e.to_str().unwrap();
            let v = v.trim_end_matches('\0').trim();
            for part in v.split('^').filter(|p| p.len() >= 4) {
                parts.push((tag, part.to_string()));
            }
        }
    }
    parts
}
