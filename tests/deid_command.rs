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
    let refused = common::deid_refusals(&out);
    for (file, word) in [
        ("empty.dcm", "empty file"),
        ("fake.dcm", "not a DICOM file"),
        ("truncated.dcm", "cannot be parsed"),
    ] {
        let (_, reason) = refused
            .iter()
            .find(|(source, _)| source.ends_with(file))
            .unwrap_or_else(|| panic!("{file} not refused:\n{refused:?}"));
        assert!(reason.contains(word), "{reason}");
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

/// The export applies the burned-in text rules ingest applies: an image that declares burned-in
/// text is refused until a rule for its device exists, then exported with the rule's rectangle
/// blacked out and Clean Pixel Data recorded.
#[test]
fn declared_burned_in_text_is_refused_until_a_rule_cleans_it() {
    let work = tempfile::tempdir().unwrap();
    let input = work.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    common::edit(
        &common::fixtures().join("RG3_UNCR.dcm"),
        &input.join("burned.dcm"),
        |o| {
            o.put(dicom_core::DataElement::new(
                tags::BURNED_IN_ANNOTATION,
                dicom_core::VR::CS,
                dicom_core::PrimitiveValue::from("YES"),
            ));
        },
    );
    let key = work.path().join("key");
    std::fs::write(&key, [9u8; 32]).unwrap();
    let run = |out: &str, config: Option<&std::path::Path>| {
        let mut cmd = Command::new(BIN);
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        let st = cmd
            .arg("deid")
            .arg(&input)
            .arg("--out")
            .arg(work.path().join(out))
            .arg("--key-file")
            .arg(&key)
            .current_dir(work.path())
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        work.path().join(out)
    };

    let out = run("no-rule", None);
    assert!(
        !out.join("burned.dcm").exists(),
        "not exported without a rule"
    );
    let refused = common::deid_refusals(&out);
    assert!(
        refused
            .iter()
            .any(|(s, r)| s.ends_with("burned.dcm") && r.contains("burned-in annotation")),
        "{refused:?}"
    );

    let config = work.path().join("rules.toml");
    std::fs::write(
        &config,
        "[[ingest.burned_in]]\nmanufacturer = \"FUJI PHOTO FILM Co. ltd.\"\nmodel = \"IRS\"\nrectangles = [[0, 0, 8, 2]]\n",
    )
    .unwrap();
    let out = run("with-rule", Some(&config));
    let copy = dicom_object::open_file(out.join("burned.dcm")).expect("exported with a rule");
    assert_eq!(text(&copy, tags::BURNED_IN_ANNOTATION), "NO");
    let codes: Vec<String> = copy
        .element(tags::DEIDENTIFICATION_METHOD_CODE_SEQUENCE)
        .unwrap()
        .items()
        .unwrap()
        .iter()
        .map(|i| {
            i.element(tags::CODE_VALUE)
                .unwrap()
                .to_str()
                .unwrap()
                .trim()
                .to_string()
        })
        .collect();
    assert!(codes.contains(&"113101".to_string()), "{codes:?}");
    let px = copy
        .element(tags::PIXEL_DATA)
        .unwrap()
        .to_multi_int::<u16>()
        .unwrap();
    // MONOCHROME1, 10 bits stored: black is 1023.
    assert_eq!(&px[..8], &[1023; 8]);
    assert_eq!(&px[1760..1768], &[1023; 8]);
}
