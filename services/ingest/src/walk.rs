//! Walks files and folders into inputs, telling DICOM candidates from files that plainly are not.

use std::io::Read;
use std::path::{Path, PathBuf};

/// One thing found under the given paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A DICOM candidate: it has the DICM marker or is named as DICOM.
    File(PathBuf),
    /// Plainly not DICOM (no DICM marker and not named .dcm), or a DICOMDIR index.
    Skipped(PathBuf),
    /// A path that could not be read; the reason holds no path (paths can name patients).
    Unreadable(PathBuf, String),
}

fn has_dicm_marker(path: &Path) -> bool {
    let mut buf = [0u8; 132];
    match std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut buf)) {
        Ok(()) => &buf[128..132] == b"DICM",
        Err(_) => false,
    }
}

fn named_as_dicom(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("dcm") || e.eq_ignore_ascii_case("dicom"))
}

fn classify(path: PathBuf) -> Input {
    if path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.eq_ignore_ascii_case("DICOMDIR"))
    {
        return Input::Skipped(path);
    }
    if named_as_dicom(&path) || has_dicm_marker(&path) {
        Input::File(path)
    } else {
        Input::Skipped(path)
    }
}

fn is_dicomdir(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.eq_ignore_ascii_case("DICOMDIR"))
}

/// The files a DICOMDIR (PS3.10 media directory) references, in its record order. A DICOMDIR
/// that cannot be read is one unreadable input; a referenced file that is missing is one too.
pub fn dicomdir(path: &Path) -> Vec<Input> {
    use dicom_dictionary_std::tags;
    let base = path.parent().unwrap_or(Path::new("."));
    let obj = match std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|bytes| fracture_shared::pixels::read_object(&bytes).map_err(|e| e.message))
    {
        Ok(o) => o,
        Err(e) => {
            return vec![Input::Unreadable(
                path.to_path_buf(),
                format!("this DICOMDIR cannot be read: {e}"),
            )]
        }
    };
    let Some(records) = obj
        .element(tags::DIRECTORY_RECORD_SEQUENCE)
        .ok()
        .and_then(|e| e.items().map(|i| i.to_vec()))
    else {
        return vec![Input::Unreadable(
            path.to_path_buf(),
            "this DICOMDIR has no Directory Record Sequence".into(),
        )];
    };
    // Links inside the media may point anywhere: what a record names must resolve inside it.
    let media = base.canonicalize().ok();
    let mut out = Vec::new();
    for r in records {
        let Ok(id) = r.element(tags::REFERENCED_FILE_ID) else {
            continue;
        };
        let Ok(parts) = id.to_multi_str() else {
            continue;
        };
        // File IDs are up to 8 components of a relative path, in the media's own case.
        let rel: PathBuf = parts
            .iter()
            .map(|p| p.trim_end_matches('\0').trim())
            .filter(|p| !p.is_empty())
            .collect();
        if rel.as_os_str().is_empty() {
            continue;
        }
        let file = base.join(&rel);
        // A File ID is a path inside the media: `..`, a root or a link that leads out of the
        // DICOMDIR's folder would read files it has no business reading.
        let inside = rel
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
            && match (file.canonicalize(), &media) {
                (Ok(f), Some(b)) => f.starts_with(b),
                // Missing: said below.
                _ => true,
            };
        if !inside {
            out.push(Input::Unreadable(
                file,
                "this DICOMDIR references a file outside its media folder; it was not read".into(),
            ));
            continue;
        }
        out.push(if file.is_file() {
            Input::File(file)
        } else {
            Input::Unreadable(
                file,
                "a file this DICOMDIR references is missing from the media".into(),
            )
        });
    }
    out
}

/// Every input under `paths`, files in a stable (sorted) order so a re-run sees the same order.
pub fn walk(paths: &[PathBuf]) -> impl Iterator<Item = Input> + '_ {
    paths.iter().flat_map(|root| {
        let items: Box<dyn Iterator<Item = Input> + Send> = match std::fs::metadata(root) {
            Err(e) => Box::new(std::iter::once(Input::Unreadable(
                root.clone(),
                format!("cannot open the input: {}", e.kind()),
            ))),
            Ok(m) if m.is_file() && is_dicomdir(root) => Box::new(dicomdir(root).into_iter()),
            Ok(m) if m.is_file() => Box::new(std::iter::once(classify(root.clone()))),
            Ok(_) => Box::new(
                walkdir::WalkDir::new(root)
                    .sort_by_file_name()
                    .into_iter()
                    .filter_map(|entry| match entry {
                        Ok(e) if e.file_type().is_file() => Some(classify(e.into_path())),
                        Ok(e) if e.file_type().is_dir() => None,
                        // Not followed: a link may lead out of the folder, loop, or reach a
                        // file a second time. Listed, so nothing vanishes without a word.
                        Ok(e) if e.path_is_symlink() => Some(Input::Unreadable(
                            e.into_path(),
                            "a symbolic link: links inside a scanned folder are not followed \
                             (they can lead outside it or loop); give its target as an input \
                             if it should be read"
                                .into(),
                        )),
                        // Reading a FIFO or a device would block or never end.
                        Ok(e) => Some(Input::Unreadable(
                            e.into_path(),
                            "not a regular file (a FIFO, socket or device): not read".into(),
                        )),
                        Err(e) => {
                            let path = e
                                .path()
                                .map(Path::to_path_buf)
                                .unwrap_or_else(|| root.clone());
                            let kind = e
                                .io_error()
                                .map(|io| io.kind().to_string())
                                .unwrap_or_else(|| "filesystem loop".into());
                            Some(Input::Unreadable(
                                path,
                                format!("cannot read this folder: {kind}"),
                            ))
                        }
                    }),
            ),
        };
        items
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_dicom_from_plainly_not() {
        let d = tempfile::tempdir().unwrap();
        let mut dicm = vec![0u8; 128];
        dicm.extend_from_slice(b"DICMrest");
        std::fs::write(d.path().join("noext"), &dicm).unwrap();
        std::fs::write(d.path().join("notes.txt"), b"a note").unwrap();
        std::fs::write(d.path().join("broken.dcm"), b"not really").unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/DICOMDIR"), &dicm).unwrap();
        let got: Vec<Input> = walk(&[d.path().to_path_buf()]).collect();
        assert_eq!(
            got,
            vec![
                Input::File(d.path().join("broken.dcm")),
                Input::File(d.path().join("noext")),
                Input::Skipped(d.path().join("notes.txt")),
                Input::Skipped(d.path().join("sub/DICOMDIR")),
            ]
        );
        let missing: Vec<Input> = walk(&[d.path().join("nope")]).collect();
        assert!(matches!(&missing[0], Input::Unreadable(_, why) if why.contains("not found")));
    }
}
