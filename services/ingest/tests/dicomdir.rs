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
