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

/// One refused input. `DIR/dead-letter.jsonl` travels with the copy, so it names the input by its
/// pseudonymous reference only (paths hold patient names); [`sources_file`] maps the references
/// back to paths and stays beside the copy, outside it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Refused {
    pub input: String,
    pub reason: String,
    #[serde(skip)]
    pub source: PathBuf,
}

/// Whether a copy may replace a file already in the output folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    Refuse,
    Replace,
}

/// The reference → path list of a copy's refusals: `DIR.refused-sources.jsonl`, beside the
/// output folder, so handing over the folder does not hand over the paths.
pub fn sources_file(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".refused-sources.jsonl");
    out.with_file_name(name)
}

/// Where an input's de-identified copy goes: its path relative to the folder it was found under
/// (a DICOMDIR's media folder for its files; a file given directly keeps its file name).
fn destination(root: &Path, file: &Path, out: &Path) -> PathBuf {
    let base = if root.is_dir() {
        root
    } else {
        root.parent().unwrap_or(Path::new(""))
    };
    match file.strip_prefix(base) {
        Ok(rel) if !rel.as_os_str().is_empty() => out.join(rel),
        _ => out.join(file.file_name().unwrap_or_default()),
    }
}

/// De-identifies one file into `dest` (written aside, renamed when complete); its size. An
/// existing `dest` is replaced only when asked: it may be another input's copy of the same name.
fn one(input: &Path, dest: &Path, policy: &DeidPolicy, existing: Existing) -> Result<u64, String> {
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
    // The name is claimed first (O_EXCL, on every file system), so two inputs of one name, or
    // an earlier run's file, are never replaced unasked.
    if existing == Existing::Refuse {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dest)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => "the output folder already holds a file of \
                    this name (from an earlier run, or another input with the same relative \
                    path); it was not replaced: choose an empty output folder, or pass \
                    --overwrite to replace files"
                    .to_string(),
                kind => format!("cannot write the de-identified copy: {kind}"),
            })?;
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
        if existing == Existing::Refuse {
            let _ = std::fs::remove_file(dest);
        }
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
    existing: Existing,
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
                    Input::File(p) => {
                        match one(&p, &destination(root, &p, out), policy, existing) {
                            Ok(n) => Done::Written(n),
                            Err(reason) => Done::Refused(p, reason),
                        }
                    }
                })
                .collect();
            for d in done {
                match d {
                    Done::Skipped => report.skipped += 1,
                    Done::Refused(p, reason) => {
                        report.refused += 1;
                        refused.push(Refused {
                            input: policy.input_ref(&p),
                            reason,
                            source: p,
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
    write_refusals(out, &refused)?;
    // One sync of the output's file system when everything is written, instead of one per file:
    // the export reports success only once every copy is on disk.
    sync_file_system(out)?;
    Ok((report, refused))
}

/// `out/dead-letter.jsonl` (references and reasons) and, when anything was refused, the
/// reference → path list beside `out` (mode 0600).
fn write_refusals(out: &Path, refused: &[Refused]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::io::BufWriter::new(std::fs::File::create(out.join("dead-letter.jsonl"))?);
    for r in refused {
        serde_json::to_writer(&mut f, r)?;
        f.write_all(b"\n")?;
    }
    f.into_inner().map_err(|e| e.into_error())?;
    let sources = sources_file(out);
    if refused.is_empty() {
        return match std::fs::remove_file(&sources) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&sources)?;
    let mut f = std::io::BufWriter::new(file);
    for r in refused {
        serde_json::to_writer(
            &mut f,
            &serde_json::json!({"input": r.input, "source": r.source.display().to_string()}),
        )?;
        f.write_all(b"\n")?;
    }
    f.into_inner().map_err(|e| e.into_error())?;
    Ok(())
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
                    "the output folder {} overlaps the input {}: the de-identified copies would \
                     replace the originals or be read back as inputs; choose an output folder \
                     outside the inputs",
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
