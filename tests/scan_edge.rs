//! `fracture scan` at the edge: a re-run resumes without redoing or repeating anything, and no
//! identifier of the input crosses the PHI boundary (logs, results, report, claim-check store).

mod common;

use std::path::Path;
use std::process::Command;

use dicom_dictionary_std::tags;

const BIN: &str = env!("CARGO_BIN_EXE_fracture");

fn scan(inputs: &Path, out: &Path, extra: &[&str]) -> (String, String) {
    let o = Command::new(BIN)
        .env("RUST_LOG", "debug")
        .arg("scan")
        .arg(inputs)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn lines(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_rerun_resumes_and_an_interrupted_line_is_redone() {
    let work = tempfile::tempdir().unwrap();
    let inputs = common::build_inputs(&work.path().join("in"));
    let out = work.path().join("out");
    scan(&inputs.dir, &out, &[]);
    let first_findings = lines(&out.join("findings.jsonl")).len();
    let first_dead = lines(&out.join("dead-letter.jsonl")).len();
    assert_eq!(
        (first_findings, first_dead),
        (inputs.good.len(), inputs.bad.len())
    );
    // The claim-check store was scratch space: gone once the scan finished, while every
    // finding's SR and SC stay in dicom/.
    assert!(
        !out.join("store").exists(),
        "the store is removed without --keep-store"
    );
    for f in lines(&out.join("findings.jsonl")) {
        for kind in ["sr", "sc"] {
            let name = f[kind].as_str().expect("an SR and an SC per finding");
            assert!(out.join(name).is_file(), "{name} kept");
        }
    }

    // An interrupted run left the last finding half-written; a new radiograph arrived.
    let text = std::fs::read_to_string(out.join("findings.jsonl")).unwrap();
    let cut = text.trim_end().rfind('\n').map(|i| i + 1).unwrap_or(0);
    std::fs::write(out.join("findings.jsonl"), &text[..cut + 40]).unwrap();
    std::fs::copy(
        common::fixtures().join("RG1_UNCR.dcm"),
        inputs.dir.join("rg1.dcm"),
    )
    .unwrap();

    let (stdout, _) = scan(&inputs.dir, &out, &[]);
    let expected_resumed = inputs.good.len() - 1 + inputs.bad.len();
    assert!(
        stdout.contains(&format!("resumed: {expected_resumed} inputs")),
        "{stdout}"
    );
    let findings = lines(&out.join("findings.jsonl"));
    assert_eq!(
        findings.len(),
        first_findings + 1,
        "the cut finding redone, the new one added, nothing twice"
    );
    let mut inputs_seen: Vec<&str> = findings
        .iter()
        .map(|f| f["input"].as_str().unwrap())
        .collect();
    inputs_seen.sort();
    inputs_seen.dedup();
    assert_eq!(inputs_seen.len(), findings.len(), "no input appears twice");
    assert_eq!(lines(&out.join("dead-letter.jsonl")).len(), first_dead);
}

#[test]
fn no_identifier_crosses_the_phi_boundary() {
    let work = tempfile::tempdir().unwrap();
    let inputs = work.path().join("in");
    std::fs::create_dir_all(&inputs).unwrap();
    let cat = inputs.join("cat.dcm");
    std::fs::copy(common::fixtures().join("cat.dcm"), &cat).unwrap();
    let obj = dicom_object::open_file(&cat).unwrap();
    let identifiers = common::identifier_parts(
        &obj,
        &[
            tags::PATIENT_NAME,
            tags::PATIENT_ID,
            tags::INSTITUTION_NAME,
            tags::REFERRING_PHYSICIAN_NAME,
            tags::ACCESSION_NUMBER,
            tags::SOP_INSTANCE_UID,
            tags::STUDY_INSTANCE_UID,
            tags::PATIENT_BIRTH_DATE,
        ],
    );
    assert!(
        identifiers.len() >= 5,
        "the test subject carries identifiers"
    );
    let out = work.path().join("out");
    let (stdout, stderr) = scan(&inputs, &out, &["--keep-store"]);
    let mut places: Vec<(String, Vec<u8>)> = vec![
        ("stdout".into(), stdout.into_bytes()),
        ("logs".into(), stderr.into_bytes()),
    ];
    for name in ["findings.jsonl", "report.html"] {
        places.push((name.into(), std::fs::read(out.join(name)).unwrap()));
    }
    let objects = walk(&out.join("store"));
    assert!(
        objects.len() >= 4,
        "--keep-store kept the claim-check store ({} objects)",
        objects.len()
    );
    for entry in objects {
        places.push((
            format!("store {}", entry.display()),
            std::fs::read(&entry).unwrap(),
        ));
    }
    for (place, bytes) in &places {
        let text = String::from_utf8_lossy(bytes).to_lowercase();
        for (tag, value) in &identifiers {
            // Report by tag, never by value: test output is a log too.
            assert!(
                !text.contains(&value.to_lowercase()),
                "{tag} of the input found in {place}"
            );
        }
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn refused_inputs_stay_in_quarantine_at_the_edge() {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    let work = tempfile::tempdir().unwrap();
    let inputs = work.path().join("in");
    std::fs::create_dir_all(&inputs).unwrap();
    let mut obj = dicom_object::open_file(common::fixtures().join("RG3_UNCR.dcm")).unwrap();
    obj.put(DataElement::new(
        tags::BURNED_IN_ANNOTATION,
        VR::CS,
        PrimitiveValue::from("YES"),
    ));
    obj.write_to_file(inputs.join("annotated.dcm")).unwrap();
    std::fs::write(inputs.join("fake.dcm"), b"a note").unwrap();
    let out = work.path().join("out");
    scan(&inputs, &out, &[]);
    let dead = lines(&out.join("dead-letter.jsonl"));
    assert_eq!(dead.len(), 2);
    let annotated = dead
        .iter()
        .find(|d| d["source"].as_str().unwrap().ends_with("annotated.dcm"))
        .unwrap();
    assert!(
        annotated["reason"]
            .as_str()
            .unwrap()
            .starts_with("quarantined: the image declares burned-in annotation"),
        "{annotated}"
    );
    for d in &dead {
        let kept = out
            .join("quarantine")
            .join(format!("{}.dcm", d["input"].as_str().unwrap()));
        assert_eq!(
            std::fs::read(&kept).unwrap(),
            std::fs::read(d["source"].as_str().unwrap()).unwrap(),
            "the refused input is kept as it came"
        );
    }
    assert!(lines(&out.join("findings.jsonl")).is_empty());
}
