//! Hostile files at the folder door: a data set nested deeper than any parser's stack allows,
//! one whose declared length asks for gigabytes, and a deflated one that inflates past 1 GiB. `fracture deid` and `fracture scan` refuse
//! each as a dead letter with its reason, go on with the good file beside it, and exit 0.

mod common;

use std::path::Path;
use std::process::Command;

use common::hostile::{deeply_nested, deflate_bomb, length_bomb};

const BIN: &str = env!("CARGO_BIN_EXE_fracture");

fn inputs(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(
        common::fixtures().join("RG3_UNCR.dcm"),
        dir.join("good.dcm"),
    )
    .unwrap();
    std::fs::write(dir.join("nested.dcm"), deeply_nested()).unwrap();
    std::fs::write(dir.join("bomb.dcm"), length_bomb()).unwrap();
    std::fs::write(dir.join("deflate.dcm"), deflate_bomb()).unwrap();
}

/// Runs `fracture ARGS...`.
fn fracture(args: &[&Path]) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    for a in args {
        cmd.arg(a);
    }
    cmd.output().unwrap()
}

fn assert_refused(dead_letters: &str, file: &str, reason: &str) {
    let line = dead_letters
        .lines()
        .find(|l| l.contains(file))
        .unwrap_or_else(|| panic!("{file} is not a dead letter:\n{dead_letters}"));
    assert!(line.contains(reason), "{file}: {line}");
}

#[test]
fn deid_refuses_nesting_and_length_bombs_and_exports_the_rest() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("in");
    inputs(&dir);
    let key = work.path().join("key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    let out = work.path().join("out");
    let run = fracture(&[
        Path::new("deid"),
        &dir,
        Path::new("--out"),
        &out,
        Path::new("--key-file"),
        &key,
    ]);
    assert!(
        run.status.success(),
        "fracture deid died: {:?}\n{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(out.join("good.dcm").exists(), "the good file is exported");
    let refused = common::deid_refusals(&out);
    let dead: String = refused.iter().map(|(s, r)| format!("{s}: {r}\n")).collect();
    assert_refused(&dead, "nested.dcm", "nested more than 32 deep");
    assert_refused(&dead, "bomb.dcm", "declares 4294967280 bytes");
    assert_refused(&dead, "deflate.dcm", "inflates to more than");
    assert!(!out.join("nested.dcm").exists() && !out.join("bomb.dcm").exists());
}

#[test]
fn scan_refuses_nesting_and_length_bombs_and_scans_the_rest() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("in");
    inputs(&dir);
    let out = work.path().join("out");
    let run = fracture(&[Path::new("scan"), &dir, Path::new("--out"), &out]);
    assert!(
        run.status.success(),
        "fracture scan died: {:?}\n{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    let findings = std::fs::read_to_string(out.join("findings.jsonl")).unwrap();
    assert_eq!(findings.lines().count(), 1, "the good file:\n{findings}");
    let dead = std::fs::read_to_string(out.join("dead-letter.jsonl")).unwrap();
    assert_eq!(dead.lines().count(), 3, "{dead}");
    assert_refused(&dead, "nested.dcm", "nested more than 32 deep");
    assert_refused(&dead, "bomb.dcm", "declares 4294967280 bytes");
    assert_refused(&dead, "deflate.dcm", "inflates to more than");
}

#[test]
fn deid_onto_its_own_input_is_refused_and_the_originals_stay() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("in");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::copy(
        common::fixtures().join("RG3_UNCR.dcm"),
        dir.join("sub/rg3.dcm"),
    )
    .unwrap();
    let before = std::fs::read(dir.join("sub/rg3.dcm")).unwrap();
    let key = work.path().join("key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    for (input, out) in [
        (dir.clone(), dir.clone()),
        (dir.clone(), dir.join("sub")),
        (dir.join("sub"), dir.clone()),
        (dir.join("sub/rg3.dcm"), dir.join("sub")),
    ] {
        let run = fracture(&[
            Path::new("deid"),
            &input,
            Path::new("--out"),
            &out,
            Path::new("--key-file"),
            &key,
        ]);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(
            !run.status.success() && stderr.contains("overlaps the input"),
            "{} -> {}: {:?} {stderr}",
            input.display(),
            out.display(),
            run.status
        );
        assert_eq!(
            std::fs::read(dir.join("sub/rg3.dcm")).unwrap(),
            before,
            "the original is untouched"
        );
    }
}

/// A header that claims 60,000 x 60,000 pixels over the pixel data of a small radiograph: scan
/// and deid refuse it from the header, before anything is stored or decoded.
#[test]
fn a_giant_image_header_is_refused_from_the_header() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("in");
    std::fs::create_dir_all(&dir).unwrap();
    common::edit(
        &common::fixtures().join("RG3_UNCR.dcm"),
        &dir.join("giant.dcm"),
        |obj| {
            use dicom_core::{DataElement, PrimitiveValue, VR};
            use dicom_dictionary_std::tags;
            for tag in [tags::ROWS, tags::COLUMNS] {
                obj.put(DataElement::new(
                    tag,
                    VR::US,
                    PrimitiveValue::from(60000_u16),
                ));
            }
        },
    );
    std::fs::copy(
        common::fixtures().join("RG3_UNCR.dcm"),
        dir.join("good.dcm"),
    )
    .unwrap();
    let out = work.path().join("out");
    let run = fracture(&[Path::new("scan"), &dir, Path::new("--out"), &out]);
    assert!(run.status.success(), "{run:?}");
    let dead = std::fs::read_to_string(out.join("dead-letter.jsonl")).unwrap();
    assert_eq!(dead.lines().count(), 1, "{dead}");
    assert_refused(
        &dead,
        "giant.dcm",
        "60000 x 60000 = 3600000000 pixel values",
    );
    let findings = std::fs::read_to_string(out.join("findings.jsonl")).unwrap();
    assert_eq!(findings.lines().count(), 1, "the good file:\n{findings}");
    // The research copy refuses it too, before a burned-in rule could decode what it claims.
    let key = work.path().join("key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    let copy = work.path().join("copy");
    let run = fracture(&[
        Path::new("deid"),
        &dir,
        Path::new("--out"),
        &copy,
        Path::new("--key-file"),
        &key,
    ]);
    assert!(run.status.success(), "{run:?}");
    let refused = common::deid_refusals(&copy);
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(refused[0].0.ends_with("giant.dcm") && refused[0].1.contains("over the limit"));
    assert!(copy.join("good.dcm").exists());
}

/// `fracture deid` never replaces a file unasked: two DICOMDIR folders' same-named files land
/// apart, a second run into the same folder refuses instead of replacing (and `--overwrite`
/// replaces); a link inside a scanned folder and a FIFO are listed as refused, not followed,
/// read or skipped without a word.
#[test]
fn deid_never_replaces_a_file_and_lists_what_it_does_not_follow() {
    use dicom_core::value::DataSetSequence;
    use dicom_core::{dicom_value, DataElement, VR};
    use dicom_dictionary_std::tags;
    use dicom_object::{FileMetaTableBuilder, InMemDicomObject};

    let work = tempfile::tempdir().unwrap();
    let media = work.path().join("cd");
    for (folder, uid) in [("A", "2.25.501"), ("B", "2.25.502")] {
        std::fs::create_dir_all(media.join(folder)).unwrap();
        common::edit(
            &common::fixtures().join("RG3_UNCR.dcm"),
            &media.join(folder).join("IMG1"),
            |obj| {
                obj.put(DataElement::new(
                    tags::SOP_INSTANCE_UID,
                    VR::UI,
                    dicom_core::PrimitiveValue::from(uid),
                ));
            },
        );
    }
    let records = ["A", "B"]
        .map(|f| {
            InMemDicomObject::from_element_iter([DataElement::new(
                tags::REFERENCED_FILE_ID,
                VR::CS,
                dicom_value!(Strs, [f, "IMG1"]),
            )])
        })
        .to_vec();
    InMemDicomObject::from_element_iter([DataElement::new(
        tags::DIRECTORY_RECORD_SEQUENCE,
        VR::SQ,
        DataSetSequence::from(records),
    )])
    .with_meta(
        FileMetaTableBuilder::new()
            .media_storage_sop_class_uid("1.2.840.10008.1.3.10")
            .media_storage_sop_instance_uid("2.25.77")
            .transfer_syntax("1.2.840.10008.1.2.1"),
    )
    .unwrap()
    .write_to_file(media.join("DICOMDIR"))
    .unwrap();
    let folder = work.path().join("folder");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::copy(
        common::fixtures().join("RG3_UNCR.dcm"),
        folder.join("rg3.dcm"),
    )
    .unwrap();
    std::os::unix::fs::symlink(media.join("A/IMG1"), folder.join("link.dcm")).unwrap();
    let fifo = folder.join("pipe.dcm");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let key = work.path().join("key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    let out = work.path().join("out");
    let deid = |extra: &[&str]| {
        let mut cmd = Command::new(BIN);
        cmd.arg("deid")
            .arg(media.join("DICOMDIR"))
            .arg(&folder)
            .arg("--out")
            .arg(&out)
            .arg("--key-file")
            .arg(&key)
            .args(extra);
        let run = cmd.output().unwrap();
        assert!(run.status.success(), "{run:?}");
        String::from_utf8_lossy(&run.stdout).into_owned()
    };

    let first = deid(&[]);
    assert!(first.contains("de-identified 3 files"), "{first}");
    let (a, b) = (out.join("A/IMG1"), out.join("B/IMG1"));
    assert!(a.exists() && b.exists() && out.join("rg3.dcm").exists());
    assert_ne!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let refused = common::deid_refusals(&out);
    let reason = |file: &str| {
        refused
            .iter()
            .find(|(s, _)| s.ends_with(file))
            .map(|(_, r)| r.clone())
            .unwrap_or_else(|| panic!("{file} is not listed: {refused:?}"))
    };
    assert!(reason("link.dcm").contains("symbolic link"), "{refused:?}");
    assert!(
        reason("pipe.dcm").contains("not a regular file"),
        "{refused:?}"
    );
    assert_eq!(refused.len(), 2, "{refused:?}");

    // A second run into the same folder replaces nothing.
    std::fs::write(&a, b"a file the second run must not replace").unwrap();
    let second = deid(&[]);
    assert!(second.contains("de-identified 0 files"), "{second}");
    assert_eq!(
        std::fs::read(&a).unwrap(),
        b"a file the second run must not replace"
    );
    let refused = common::deid_refusals(&out);
    assert_eq!(
        refused
            .iter()
            .filter(|(_, r)| r.contains("already holds a file of this name"))
            .count(),
        3,
        "{refused:?}"
    );
    let third = deid(&["--overwrite"]);
    assert!(third.contains("de-identified 3 files"), "{third}");
    assert_ne!(
        std::fs::read(&a).unwrap(),
        b"a file the second run must not replace"
    );
}
