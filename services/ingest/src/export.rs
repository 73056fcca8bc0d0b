//! `fracture deid`: the ingest de-identification as a standalone export for research, folder to
//! folder, keeping each file's path relative to the folder it was found under.

use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

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

/// A written copy waiting for its sync and rename.
struct Written {
    file: std::fs::File,
    tmp: PathBuf,
    dest: PathBuf,
    source: PathBuf,
}

fn one(input: &Path, dest: &Path, policy: &DeidPolicy) -> Result<(u64, Written), String> {
    let bytes = std::fs::read(input).map_err(|e| format!("cannot read the file: {}", e.kind()))?;
    if bytes.is_empty() {
        return Err("empty file (0 bytes)".into());
    }
    let size = bytes.len() as u64;
    let obj = pixels::read_object(&bytes).map_err(|e| e.message)?;
    // The parsed object holds everything: free the input before the output is encoded.
    drop(bytes);
    let (clean, _) = deidentify(obj, policy).map_err(|e| e.message)?;
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create the output folder: {}", e.kind()))?;
    }
    // Encoded straight into the file (no second in-memory copy), aside, renamed once synced.
    let tmp = dest.with_extension("partial");
    let f = std::fs::File::create(&tmp)
        .map_err(|e| format!("cannot write the de-identified copy: {}", e.kind()))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    clean
        .write_all(&mut w)
        .map_err(|e| format!("cannot write the de-identified copy: {e}"))?;
    let file = w
        .into_inner()
        .map_err(|e| format!("cannot write the de-identified copy: {}", e.error().kind()))?;
    Ok((
        size,
        Written {
            file,
            tmp,
            dest: dest.to_path_buf(),
            source: input.to_path_buf(),
        },
    ))
}

/// What became of one walked input.
enum Done {
    Skipped,
    Refused(PathBuf, String),
    Written(u64, Written),
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
    // Syncing each copy to disk waits on the device: a second thread does it (and the rename
    // that publishes the copy), so the disk wait overlaps the next file's work.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Written>(4);
    let syncer = std::thread::spawn(move || {
        let mut failed = Vec::new();
        for w in rx {
            if let Err(e) = w
                .file
                .sync_data()
                .and_then(|()| std::fs::rename(&w.tmp, &w.dest))
            {
                let _ = std::fs::remove_file(&w.tmp);
                failed.push(Refused {
                    source: w.source.display().to_string(),
                    reason: format!("cannot write the de-identified copy: {}", e.kind()),
                });
            }
        }
        failed
    });
    // Files are parsed, de-identified and encoded on every core, a chunk at a time so memory
    // stays bounded (at most one file per core in flight) and results are handled in walk order.
    let chunk = 8 * rayon::current_num_threads().max(1);
    for root in roots {
        let mut items = walk(std::slice::from_ref(root)).peekable();
        while items.peek().is_some() {
            let batch: Vec<Input> = items.by_ref().take(chunk).collect();
            let done: Vec<Done> = batch
                .into_par_iter()
                .map(|item| match item {
                    Input::Skipped(_) => Done::Skipped,
                    Input::Unreadable(p, reason) => Done::Refused(p, reason),
                    Input::File(p) => match one(&p, &destination(root, &p, out), policy) {
                        Ok((n, written)) => Done::Written(n, written),
                        Err(reason) => Done::Refused(p, reason),
                    },
                })
                .collect();
            for d in done {
                match d {
                    Done::Skipped => report.skipped += 1,
                    Done::Refused(p, reason) => {
                        report.refused += 1;
                        refused.push(Refused {
                            source: p.display().to_string(),
                            reason,
                        });
                    }
                    Done::Written(n, written) => {
                        report.written += 1;
                        report.bytes += n;
                        progress(n);
                        if tx.send(written).is_err() {
                            return Err(std::io::Error::other("the writer thread stopped"));
                        }
                    }
                }
            }
        }
    }
    drop(tx);
    let failed = syncer
        .join()
        .map_err(|_| std::io::Error::other("the writer thread panicked"))?;
    report.written -= failed.len() as u64;
    report.refused += failed.len() as u64;
    refused.extend(failed);
    let mut f = std::fs::File::create(out.join("dead-letter.jsonl"))?;
    for r in &refused {
        serde_json::to_writer(&mut f, r)?;
        f.write_all(b"\n")?;
    }
    Ok((report, refused))
}
