//! `fracture deid`: the ingest de-identification as a standalone research copy, folder to
//! folder, keeping each file's path relative to the folder it was found under.

use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::deid::passthrough::{self, Cleaned, Source};
use crate::deid::DeidPolicy;
use crate::walk::{walk, Input};

/// What a research copy did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyReport {
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

/// De-identifies one file into `dest` (written aside, renamed when complete); its size.
fn one(input: &Path, dest: &Path, policy: &DeidPolicy) -> Result<u64, String> {
    let file =
        std::fs::File::open(input).map_err(|e| format!("cannot read the file: {}", e.kind()))?;
    let size = file
        .metadata()
        .map_err(|e| format!("cannot read the file: {}", e.kind()))?
        .len();
    // The attributes are parsed and cleaned; the pixel data is copied as bytes, file to file.
    let Cleaned {
        object,
        mut passage,
        ..
    } = passthrough::clean(Source::open(file).map_err(|e| e.message)?, policy)
        .map_err(|e| e.message)?;
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create the output folder: {}", e.kind()))?;
    }
    // Written aside and renamed once complete.
    let tmp = dest.with_extension("partial");
    let f = std::fs::File::create(&tmp)
        .map_err(|e| format!("cannot write the de-identified copy: {}", e.kind()))?;
    let mut w = std::io::BufWriter::with_capacity(64 * 1024, f);
    let written = passage.write(&object, &mut w).map_err(|e| e.message);
    let done = written
        .and_then(|()| {
            w.into_inner()
                .map(drop)
                .map_err(|e| format!("cannot write the de-identified copy: {}", e.error().kind()))
        })
        .and_then(|()| {
            std::fs::rename(&tmp, dest)
                .map_err(|e| format!("cannot write the de-identified copy: {}", e.kind()))
        });
    if let Err(e) = done {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(size)
}

/// What became of one walked input.
enum Done {
    Skipped,
    Refused(PathBuf, String),
    Written(u64),
}

/// De-identifies every DICOM file under `roots` into `out`; `progress` is called per input.
pub fn copy_deidentified(
    roots: &[PathBuf],
    out: &Path,
    policy: &DeidPolicy,
    mut progress: impl FnMut(u64),
) -> std::io::Result<(CopyReport, Vec<Refused>)> {
    refuse_overlap(roots, out)?;
    std::fs::create_dir_all(out)?;
    let mut report = CopyReport::default();
    let mut refused = Vec::new();
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
                        Ok(n) => Done::Written(n),
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
                    Done::Written(n) => {
                        report.written += 1;
                        report.bytes += n;
                        progress(n);
                    }
                }
            }
        }
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(out.join("dead-letter.jsonl"))?);
    for r in &refused {
        serde_json::to_writer(&mut f, r)?;
        f.write_all(b"\n")?;
    }
    f.into_inner().map_err(|e| e.into_error())?;
    // One sync of the output's file system when everything is written, instead of one per file:
    // the export reports success only once every copy is on disk.
    sync_file_system(out)?;
    Ok((report, refused))
}

/// Refuses an output folder that is an input folder, or inside one, or holds one, or the folder
/// of an input file: the copies would replace the originals, or be read back as inputs. A
/// command never destroys its own source.
fn refuse_overlap(roots: &[PathBuf], out: &Path) -> std::io::Result<()> {
    // The output may not exist yet: resolve the nearest folder that does, then add the rest.
    let resolve = |p: &Path| -> std::io::Result<PathBuf> {
        let mut existing = p.to_path_buf();
        let mut rest = Vec::new();
        while !existing.exists() {
            match (existing.parent(), existing.file_name()) {
                (Some(parent), Some(name)) => {
                    rest.push(name.to_os_string());
                    existing = if parent.as_os_str().is_empty() {
                        PathBuf::from(".")
                    } else {
                        parent.to_path_buf()
                    };
                }
                _ => break,
            }
        }
        let mut full = existing.canonicalize()?;
        full.extend(rest.iter().rev());
        Ok(full)
    };
    let out_full = resolve(out)?;
    for root in roots {
        let root_full = resolve(root)?;
        let overlaps = if root_full.is_dir() {
            out_full.starts_with(&root_full) || root_full.starts_with(&out_full)
        } else {
            // A file given directly is copied under its own name into `out`.
            root_full.parent() == Some(out_full.as_path())
        };
        if overlaps {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "the output folder {} overlaps the input {}: the de-identified copies would                      replace the originals or be read back as inputs; choose an output folder                      outside the inputs",
                    out.display(),
                    root.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Flushes everything written to the file system that holds `dir` (syncfs(2)).
fn sync_file_system(dir: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let d = std::fs::File::open(dir)?;
    // SAFETY: syncfs only reads the descriptor, which `d` keeps open for the call.
    if unsafe { libc::syncfs(d.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
