//! `fracture deid`: the ingest de-identification as a standalone export for research, folder to
//! folder, keeping each file's path relative to the folder it was found under.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::deid::{deidentify, DeidPolicy};
use crate::walk::{walk, Input};
use fracture_shared::pixels;

/// What an export did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ExportReport {
    pub written: u64,
    pub refused: u64,
    pub skipped: u64,
    pub bytes: u64,
}

/// One refused input, for `DIR/dead-letter.jsonl` (it stays with the export, at the edge).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Refused {
    pub source: String,
    pub reason: String,
}

/// Where an input's de-identified copy goes: its path relative to the root it was found under
/// (a file given directly keeps its file name).
fn destination(root: &Path, file: &Path, out: &Path) -> PathBuf {
    match file.strip_prefix(root) {
        Ok(rel) if !rel.as_os_str().is_empty() => out.join(rel),
        _ => out.join(file.file_name().unwrap_or_default()),
    }
}

fn one(file: &Path, dest: &Path, policy: &DeidPolicy) -> Result<u64, String> {
    let bytes = std::fs::read(file).map_err(|e| format!("cannot read the file: {}", e.kind()))?;
    if bytes.is_empty() {
        return Err("empty file (0 bytes)".into());
    }
    let obj = pixels::read_object(&bytes).map_err(|e| e.message)?;
    let (clean, _) = deidentify(obj, policy).map_err(|e| e.message)?;
    let encoded = pixels::write_object(&clean).map_err(|e| e.message)?;
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create the output folder: {}", e.kind()))?;
    }
    // Written aside and renamed, so an interrupted export never leaves half a file.
    let tmp = dest.with_extension("partial");
    std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&encoded).and_then(|()| f.sync_data()))
        .and_then(|()| std::fs::rename(&tmp, dest))
        .map_err(|e| format!("cannot write the de-identified copy: {}", e.kind()))?;
    Ok(bytes.len() as u64)
}

/// De-identifies every DICOM file under `roots` into `out`; `progress` is called per input.
pub fn export(
    roots: &[PathBuf],
    out: &Path,
    policy: &DeidPolicy,
    mut progress: impl FnMut(u64),
) -> std::io::Result<(ExportReport, Vec<Refused>)> {
    std::fs::create_dir_all(out)?;
    let mut report = ExportReport::default();
    let mut refused = Vec::new();
    for root in roots {
        for item in walk(std::slice::from_ref(root)) {
            match item {
                Input::Skipped(_) => report.skipped += 1,
                Input::Unreadable(p, why) => {
                    report.refused += 1;
                    refused.push(Refused {
                        source: p.display().to_string(),
                        reason: why,
                    });
                }
                Input::File(p) => match one(&p, &destination(root, &p, out), policy) {
                    Ok(n) => {
                        report.written += 1;
                        report.bytes += n;
                        progress(n);
                    }
                    Err(reason) => {
                        report.refused += 1;
                        refused.push(Refused {
                            source: p.display().to_string(),
                            reason,
                        });
                    }
                },
            }
        }
    }
    let mut f = std::fs::File::create(out.join("dead-letter.jsonl"))?;
    for r in &refused {
        serde_json::to_writer(&mut f, r)?;
        f.write_all(b"\n")?;
    }
    Ok((report, refused))
}
