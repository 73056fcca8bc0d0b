//! The fuzz driver: what one hostile input goes through. It is shared as source by the fuzz
//! targets (fuzz_targets/, through src/lib.rs) and by services/ingest/tests/fuzz_regressions.rs
//! (a `#[path]` module), so CI replays every kept input through exactly the code the fuzzer ran.
//!
//! A crash is a panic, an abort, a stack overflow, or running out of memory or time; an `Err` is
//! the expected answer to a bad input. Wrong answers that are not crashes come back as findings:
//! a de-identified copy that the project's own reader refuses, or a bad input blamed on a bug in
//! the program (an error of another kind than `Data`).

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use fracture_ingest::deid::{deidentify, passthrough, DeidPolicy};
use fracture_ingest::walk::Input;
use fracture_shared::error::{ErrorKind, StageError};
use fracture_shared::pixels;

/// The stack of a tokio worker thread, where ingest de-identifies: recursion that fits the
/// fuzzer's 8 MiB main thread but not this is a crash in production.
pub const WORKER_STACK: usize = 2 << 20;

pub const SITE: &str = "FUZZ";
pub const UID_ROOT: &str = "1.2.826.0.1.3680043.10.543";

/// A fixed policy (a made-up 32-byte key), built once.
pub fn policy() -> &'static DeidPolicy {
    static POLICY: OnceLock<DeidPolicy> = OnceLock::new();
    POLICY.get_or_init(|| DeidPolicy::new(vec![0x5A; 32], SITE, UID_ROOT).expect("a valid policy"))
}

/// Runs `f` on a thread with [`WORKER_STACK`] bytes of stack; `Err` holds its panic.
pub fn on_worker_stack<T: Send>(f: impl FnOnce() -> T + Send) -> std::thread::Result<T> {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("fuzz-worker".into())
            .stack_size(WORKER_STACK)
            .spawn_scoped(s, f)
            .expect("cannot start a worker thread")
            .join()
    })
}

/// The value of a step, or `None` on its error; an error that blames the program rather than
/// the input becomes a finding.
fn step<T>(findings: &mut Vec<String>, name: &str, r: Result<T, StageError>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            if e.kind != ErrorKind::Data {
                findings.push(format!(
                    "{name}: a {:?} error for an input: {}",
                    e.kind, e.message
                ));
            }
            None
        }
    }
}

/// The pixel cap under which the fuzzer decodes (16 million values, e.g. 4096 x 4096).
const FUZZ_MAX_PIXELS: u64 = 1 << 24;

/// One input, as a DICOM file, through both ways the project de-identifies it, each copy read
/// back. Returns the findings (empty when every step either worked or refused the input).
pub fn deid(data: &[u8]) -> Vec<String> {
    let mut findings = Vec::new();
    let policy = policy();

    // The edge's door (ingest, `fracture deid`): the attributes are parsed around the pixel
    // data, which passes through as bytes; the gate and the parser run on each part.
    let opened = passthrough::Source::open(Cursor::new(data));
    if let Some(src) = step(&mut findings, "passthrough::Source::open", opened) {
        let _ = fracture_ingest::check_radiograph(src.object());
        let cleaned = passthrough::clean(src, policy);
        if let Some(passthrough::Cleaned {
            object,
            mut passage,
            ..
        }) = step(&mut findings, "passthrough::clean", cleaned)
        {
            let mut out = Vec::new();
            let written = passage.write(&object, &mut out);
            if step(&mut findings, "Passage::write", written).is_some() {
                if let Err(e) = pixels::read_object(&out) {
                    findings.push(format!(
                        "the pass-through de-identified copy does not read back: {}",
                        e.message
                    ));
                }
            }
        }
    }

    // The whole file parsed (gate, then dicom-object), its pixels decoded as preprocess does,
    // de-identified, written and read back.
    if let Some(obj) = step(
        &mut findings,
        "pixels::read_object",
        pixels::read_object(data),
    ) {
        // Decoded within a lower pixel cap than production's: a decoded image is meant to take
        // up to a few bytes per pixel of what the cap allows, and at production's 100 million
        // the fuzzer's 256 MB allocation limit could not tell such an image from a bomb. The cap
        // itself is tested on its own (tests/hostile.rs).
        if pixels::check_size(&obj, FUZZ_MAX_PIXELS).is_ok() {
            let _ = step(&mut findings, "pixels::decode", pixels::decode(&obj));
        }
        if let Some((clean, _)) = step(&mut findings, "deidentify", deidentify(obj, policy)) {
            let written = pixels::write_object(&clean);
            if let Some(bytes) = step(&mut findings, "pixels::write_object", written) {
                if let Err(e) = pixels::read_object(&bytes) {
                    findings.push(format!(
                        "the de-identified copy does not read back: {}",
                        e.message
                    ));
                }
            }
        }
    }
    findings
}

/// Files in a media folder for [`dicomdir`]: some of the paths pydicom's test DICOMDIR
/// references, so its records resolve.
const MEDIA_FILES: &[&str] = &[
    "77654033/CR1/6154",
    "98892003/MR700/4558",
    "IMAGES/IM0001",
    "IM0002",
];

/// Makes a media folder under `root` (`root/media`, returned) with [`MEDIA_FILES`], a file
/// beside it (`root/outside`) and a link in it that leads out to that file (`LINK`).
pub fn make_media(root: &Path) -> PathBuf {
    let media = root.join("media");
    for rel in MEDIA_FILES {
        let f = media.join(rel);
        std::fs::create_dir_all(f.parent().expect("a parent")).expect("cannot make the media");
        std::fs::write(&f, b"").expect("cannot make the media");
    }
    let outside = root.join("outside");
    std::fs::write(&outside, b"").expect("cannot make the media");
    #[cfg(unix)]
    {
        let link = media.join("LINK");
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(&outside, &link).expect("cannot make the media");
        }
    }
    media
}

/// One input as the DICOMDIR of the media folder `media` (from [`make_media`]), walked to the
/// files it references. Panics when the walk hands out a file outside the media folder: that
/// would let a DICOMDIR make ingest read any file, so it counts as a crash.
pub fn dicomdir(media: &Path, data: &[u8]) {
    let path = media.join("DICOMDIR");
    std::fs::write(&path, data).expect("cannot write the DICOMDIR");
    let base = media.canonicalize().expect("the media folder exists");
    for input in fracture_ingest::walk::dicomdir(&path) {
        if let Input::File(f) = input {
            let real = f.canonicalize().expect("a file the walk hands out exists");
            assert!(
                real.starts_with(&base),
                "a DICOMDIR record led out of its media folder to {}",
                real.display()
            );
        }
    }
}
