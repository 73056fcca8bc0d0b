//! A real DICOMDIR (pydicom's test media tree) walks to exactly the files it references, as
//! pydicom itself reads them.

use std::path::PathBuf;
use std::process::Command;

use fracture_ingest::walk::{walk, Input};

fn peer_python() -> PathBuf {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/deid-peers.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .expect("run scripts/deid-peers.sh");
    assert!(
        out.status.success(),
        "deid-peers.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("python path")
            .trim(),
    )
}

#[test]
fn a_dicomdir_walks_to_the_files_it_references() {
    let py = peer_python();
    let oracle = Command::new(&py)
        .arg("-c")
        .arg(
            "import os, pydicom\n\
             d = os.path.join(os.path.dirname(pydicom.__file__), 'data/test_files/dicomdirtests')\n\
             ds = pydicom.dcmread(os.path.join(d, 'DICOMDIR'))\n\
             print(d)\n\
             for r in ds.DirectoryRecordSequence:\n\
             \x20   if 'ReferencedFileID' in r:\n\
             \x20       v = r.ReferencedFileID\n\
             \x20       print(os.path.join(d, *(v if isinstance(v, pydicom.multival.MultiValue) else [v])))\n",
        )
        .output()
        .unwrap();
    assert!(
        oracle.status.success(),
        "{}",
        String::from_utf8_lossy(&oracle.stderr)
    );
    let text = String::from_utf8_lossy(&oracle.stdout).into_owned();
    let mut lines = text.lines();
    let dir = PathBuf::from(lines.next().unwrap());
    let expected: Vec<PathBuf> = lines.map(PathBuf::from).collect();
    assert!(expected.len() > 10, "the test media references its images");

    let got: Vec<Input> = walk(&[dir.join("DICOMDIR")]).collect();
    let files: Vec<PathBuf> = got
        .iter()
        .map(|i| match i {
            Input::File(p) => p.clone(),
            other => panic!("every referenced file exists: {other:?}"),
        })
        .collect();
    assert_eq!(files, expected);

    // A DICOMDIR that is not one is one unreadable input, with a reason.
    let bad = tempfile::tempdir().unwrap();
    std::fs::write(bad.path().join("DICOMDIR"), b"not a directory").unwrap();
    let got: Vec<Input> = walk(&[bad.path().join("DICOMDIR")]).collect();
    assert!(
        matches!(&got[..], [Input::Unreadable(_, why)] if why.contains("DICOMDIR cannot be read")),
        "{got:?}"
    );
}

/// A DICOMDIR whose records point out of its media folder (`..`, an absolute path, a link that
/// leads out) gets those records refused, each an unreadable input; the file inside is read.
#[test]
fn references_outside_the_media_folder_are_refused() {
    use dicom_core::value::DataSetSequence;
    use dicom_core::{dicom_value, DataElement, VR};
    use dicom_dictionary_std::tags;
    use dicom_object::{FileMetaTableBuilder, InMemDicomObject};

    let root = tempfile::tempdir().unwrap();
    let media = root.path().join("media");
    let elsewhere = root.path().join("elsewhere");
    std::fs::create_dir_all(&media).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::write(elsewhere.join("X.dcm"), b"someone else's file").unwrap();
    std::fs::write(media.join("INSIDE.dcm"), b"on the media").unwrap();
    std::os::unix::fs::symlink(elsewhere.join("X.dcm"), media.join("LINK.dcm")).unwrap();
    let record = |id: DataElement<InMemDicomObject>| InMemDicomObject::from_element_iter([id]);
    let id = |parts: dicom_core::PrimitiveValue| {
        DataElement::new(tags::REFERENCED_FILE_ID, VR::CS, parts)
    };
    let absolute = elsewhere.join("X.dcm").display().to_string();
    let records = vec![
        record(id(dicom_value!(Strs, ["..", "elsewhere", "X.dcm"]))),
        record(id(dicom_value!(Strs, [absolute.as_str()]))),
        record(id(dicom_value!(Strs, ["LINK.dcm"]))),
        record(id(dicom_value!(Strs, ["INSIDE.dcm"]))),
    ];
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

    let got: Vec<Input> = walk(&[media.join("DICOMDIR")]).collect();
    assert_eq!(got.len(), 4, "{got:?}");
    for refused in &got[..3] {
        assert!(
            matches!(refused, Input::Unreadable(_, why) if why.contains("outside its media folder")),
            "{got:?}"
        );
    }
    assert!(
        matches!(&got[3], Input::File(p) if p.ends_with("INSIDE.dcm")),
        "{got:?}"
    );
}
