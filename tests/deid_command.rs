//! `fracture deid`: a research export with the ingest profile: same relative paths, identifiers
//! gone, UIDs mapped as ingest maps them with the same key, refusals listed.

mod common;

use std::process::Command;

use dicom_dictionary_std::tags;

const BIN: &str = env!("CARGO_BIN_EXE_fracture");

fn text(obj: &dicom_object::DefaultDicomObject, tag: dicom_core::Tag) -> String {
    obj.element(tag)
        .map(|e| {
            e.to_str()
                .unwrap()
                .trim_end_matches('\0')
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

#[test]
fn exports_a_folder_keeping_paths_and_refusing_what_is_not_dicom() {
    let work = tempfile::tempdir().unwrap();
    let inputs = common::build_inputs(&work.path().join("in"));
    let key = work.path().join("key");
    std::fs::write(&key, [9u8; 32]).unwrap();
    let out = work.path().join("out");
    let st = Command::new(BIN)
        .arg("deid")
        .arg(&inputs.dir)
        .arg("--out")
        .arg(&out)
        .arg("--key-file")
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );

    let policy = fracture_ingest::DeidPolicy::new(vec![9u8; 32], "SITE", "2.25").unwrap();
    for rel in ["rg3.dcm", "sub/cat.dcm"] {
        let original = dicom_object::open_file(inputs.dir.join(rel)).unwrap();
        let copy = dicom_object::open_file(out.join(rel))
            .unwrap_or_else(|e| panic!("{rel} not exported: {e}"));
        assert_ne!(
            text(&copy, tags::PATIENT_NAME),
            text(&original, tags::PATIENT_NAME),
            "{rel}: PatientName replaced"
        );
        assert_eq!(text(&copy, tags::PATIENT_IDENTITY_REMOVED), "YES");
        assert_eq!(
            text(&copy, tags::SOP_INSTANCE_UID),
            policy.pseudonymise_uid(&text(&original, tags::SOP_INSTANCE_UID))
        );
        // The patient's sex survives (Retain Patient Characteristics).
        assert_eq!(
            text(&copy, tags::PATIENT_SEX),
            text(&original, tags::PATIENT_SEX)
        );
    }
    let refused = std::fs::read_to_string(out.join("dead-letter.jsonl")).unwrap();
    for (file, word) in [
        ("empty.dcm", "empty file"),
        ("fake.dcm", "not a DICOM file"),
        ("truncated.dcm", "cannot be parsed"),
    ] {
        let line = refused
            .lines()
            .find(|l| l.contains(file))
            .unwrap_or_else(|| panic!("{file} not refused:\n{refused}"));
        assert!(line.contains(word), "{line}");
    }
    assert!(
        !out.join("notes.txt").exists(),
        "files that are not DICOM are not copied"
    );
    assert!(
        String::from_utf8_lossy(&st.stdout).contains("refused 3"),
        "{}",
        String::from_utf8_lossy(&st.stdout)
    );
}
