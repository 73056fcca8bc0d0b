//! `fracture deid`: a de-identified research copy of files and folders, with the ingest profile
//! and key, and a progress line while it runs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use fracture_ingest::{read_key, research};

use crate::config::Config;

pub fn run(
    cfg: &Config,
    paths: &[PathBuf],
    out: &Path,
    key_file: &Path,
    overwrite: bool,
) -> anyhow::Result<()> {
    let mut policy = cfg.ingest.policy(read_key(key_file)?)?;
    // The copy lists its refusals in DIR/dead-letter.jsonl instead.
    policy.quarantine = None;
    let started = Instant::now();
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {elapsed_precise} {pos} files ({per_sec}) {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    let mut bytes = 0u64;
    let existing = if overwrite {
        research::Existing::Replace
    } else {
        research::Existing::Refuse
    };
    let (report, _) = research::copy_deidentified(paths, out, &policy, existing, |n| {
        bytes += n;
        bar.inc(1);
        bar.set_message(format!("{:.0} MB", bytes as f64 / 1e6));
    })?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    println!(
        "de-identified {} files ({:.1} MB/s, {:.1} files/s), refused {} (see {}; their paths \
         in {}), skipped {} not DICOM",
        report.written,
        report.bytes as f64 / 1e6 / secs,
        report.written as f64 / secs,
        report.refused,
        out.join("dead-letter.jsonl").display(),
        research::sources_file(out).display(),
        report.skipped
    );
    Ok(())
}
