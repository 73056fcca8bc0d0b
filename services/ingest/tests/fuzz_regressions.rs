//! Every input the fuzzer kept (fuzz/regressions/: the crashes it found, and the hand-made
//! hostile files of fuzz/make_hostile.py) and its seed corpus (fuzz/seeds/) go through the fuzz
//! targets' own driver (fuzz/src/driver.rs, included below) on a worker-sized stack, each in a
//! process of its own (this test binary again), so an abort or a stack overflow is reported
//! with its input instead of taking the run down. Each input must come back, refused or not,
//! without a panic, an abort, an allocation over 256 MiB or more than 2 GiB live at once (the
//! fuzzer's -malloc_limit_mb and -rss_limit_mb), a free of a null pointer, within 60 seconds.
//!
//! The fuzzing itself is scripts/fuzz.sh (nightly, not in CI); it copies what crashes into
//! fuzz/regressions/<target>/, and this test fails until the crash is fixed.

#[path = "../../../fuzz/src/driver.rs"]
mod driver;

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// What scripts/fuzz.sh calls out of memory: one allocation over this (-malloc_limit_mb=256:
/// inputs are at most 64 KiB, so a 4096-fold amplification), or all live at once over
/// [`LIVE_LIMIT`] (-rss_limit_mb=2048).
const ALLOCATION_LIMIT: usize = 256 << 20;
const LIVE_LIMIT: usize = 2 << 30;
const TIME_LIMIT: Duration = Duration::from_secs(60);
/// Set in a child process: `TARGET:PATH`, the one input it replays.
const CHILD: &str = "FRACTURE_FUZZ_REPLAY";

/// Counts live bytes and their peak, refuses (null, recorded) any one allocation over
/// [`ALLOCATION_LIMIT`], so a memory bomb is a failure here instead of a machine that swaps, and
/// counts frees of a null pointer (undefined behaviour that the fuzzer's nightly build aborts
/// on, and the system allocator lets pass).
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static REFUSED: AtomicUsize = AtomicUsize::new(0);
static NULL_FREES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed on to the system allocator unchanged, or answered with null
// (allowed: an allocation may fail).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOCATION_LIMIT {
            REFUSED.fetch_max(layout.size(), Relaxed);
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Relaxed) + layout.size();
            PEAK.fetch_max(live, Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOCATION_LIMIT {
            REFUSED.fetch_max(layout.size(), Relaxed);
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Relaxed) + layout.size();
            PEAK.fetch_max(live, Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if ptr.is_null() {
            // Undefined behaviour (no allocation is at null); nightly's UB checks abort on it.
            NULL_FREES.fetch_add(1, Relaxed);
            return;
        }
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > ALLOCATION_LIMIT {
            REFUSED.fetch_max(new_size, Relaxed);
            return std::ptr::null_mut();
        }
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Relaxed);
            let live = LIVE.fetch_add(new_size, Relaxed) + new_size;
            PEAK.fetch_max(live, Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// The inputs in `fuzz/<kind>/<target>/`, sorted. The folder must be there: a missing one (a
/// renamed target, a moved folder) would otherwise make this test pass on nothing.
fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = fuzz_dir().join(kind).join(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "{} cannot be read ({e}): the fuzz inputs must be there",
            dir.display()
        )
    });
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a readable folder entry").path())
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            p.is_file() && !name.starts_with('.') && !name.ends_with(".md")
        })
        .collect();
    files.sort();
    files
}

/// The child's side: replays the input named by [`CHILD`] and fails on what the fuzzer calls
/// a crash. A test of its own so the parent can run just it; without [`CHILD`] it does nothing.
/// Inputs whose frees at a null pointer come from a dependency with no fixed release, and why
/// the binary survives them. Anything else that frees at null fails.
const UPSTREAM_NULL_FREES: &[(&str, &str)] = &[(
    "crash-seed-corpus-a1-cr-j2k.dcm",
    "openjp2 0.6.1 (the newest) deallocates an unallocated code block buffer when its decoder \
     is dropped (tcd.rs:2510, opj_tcd_code_block_dec_deallocate); the system allocator the \
     binary uses passes it to free(NULL), a no-op, so decoding goes on and the image is read",
)];

#[test]
fn replay_one_input() {
    let Ok(spec) = std::env::var(CHILD) else {
        return;
    };
    let (target, path) = spec.split_once(':').expect("TARGET:PATH");
    let bytes = std::fs::read(path).unwrap();
    let base = LIVE.load(Relaxed);
    PEAK.store(base, Relaxed);
    let findings = match target {
        "deid" => driver::on_worker_stack(|| driver::deid(&bytes)),
        "dicomdir" => {
            let root = tempfile::tempdir().unwrap();
            let media = driver::make_media(root.path());
            driver::on_worker_stack(|| {
                driver::dicomdir(&media, &bytes);
                Vec::new()
            })
        }
        other => panic!("no fuzz target {other}"),
    }
    .unwrap_or_else(|p| std::panic::resume_unwind(p));
    for f in findings {
        eprintln!("finding (not a crash): {f}");
    }
    let refused = REFUSED.load(Relaxed);
    assert!(
        refused == 0,
        "out of memory: one allocation of {refused} bytes was asked for (limit {ALLOCATION_LIMIT})"
    );
    let null_frees = NULL_FREES.load(Relaxed);
    let name = Path::new(path)
        .file_name()
        .unwrap_or_default()
        .to_string_lossy();
    if let Some((_, why)) = UPSTREAM_NULL_FREES.iter().find(|(f, _)| *f == name) {
        eprintln!("{name}: {null_frees} free(s) at a null pointer, known upstream: {why}");
        return;
    }
    assert!(
        null_frees == 0,
        "undefined behaviour: memory was freed at a null pointer {null_frees} time(s) \
         (nightly's UB checks abort on it: \"unsafe precondition(s) violated\")"
    );
    let peak = PEAK.load(Relaxed).saturating_sub(base);
    assert!(
        peak <= LIVE_LIMIT,
        "out of memory: {peak} bytes were live at once (limit {LIVE_LIMIT})"
    );
}

/// How one input's child process ended: `None` when it passed, else why not and the start of
/// its output (message and backtrace); and the findings it printed.
fn replay_in_child(target: &str, path: &Path) -> (Option<String>, Vec<String>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "replay_one_input",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, format!("{target}:{}", path.display()))
        .env("RUST_BACKTRACE", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start the test binary again");
    // The pipe is drained on a thread of its own, so a child that writes much cannot block.
    let mut pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut pipe, &mut s);
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > TIME_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = reader.join().unwrap();
    let findings = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("finding (not a crash): "))
        .map(str::to_string)
        .collect();
    let failure = match status {
        Some(s) if s.success() => None,
        Some(s) => Some(format!("{s}")),
        None => Some(format!("timeout: still running after {TIME_LIMIT:?}")),
    };
    let failure = failure.map(|why| {
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|l| {
                !l.trim().is_empty()
                    && !l.starts_with("running ")
                    && !l.starts_with("test ")
                    && !l.starts_with("finding (not a crash)")
            })
            .collect();
        // The message comes first, then the backtrace down to the driver.
        let head = lines[..lines.len().min(40)].join("\n    ");
        format!("{why}\n    {head}")
    });
    (failure, findings)
}

/// Replays every input of `target` (its regressions, then its seeds), each in a child process;
/// fails listing every input that crashed. Returns how many inputs ran.
fn replay(target: &str) -> usize {
    let regressions = inputs("regressions", target);
    assert!(
        !regressions.is_empty(),
        "fuzz/regressions/{target}/ is empty: it holds at least the hand-made hostile inputs"
    );
    let seeds = inputs("seeds", target);
    assert!(!seeds.is_empty(), "fuzz/seeds/{target}/ is empty");
    let mut crashed = Vec::new();
    let mut findings = Vec::new();
    for path in regressions.iter().chain(&seeds) {
        let name = path.strip_prefix(fuzz_dir()).unwrap_or(path).display();
        let (failure, found) = replay_in_child(target, path);
        findings.extend(found.into_iter().map(|f| format!("fuzz/{name}: {f}")));
        if let Some(why) = failure {
            crashed.push(format!("fuzz/{name}: {why}"));
        }
    }
    let ran = regressions.len() + seeds.len();
    eprintln!(
        "fuzz_regressions: {target}: {} regressions and {} seeds replayed, {} crashed, {} \
         findings that are not crashes",
        regressions.len(),
        seeds.len(),
        crashed.len(),
        findings.len()
    );
    for f in &findings {
        eprintln!("  {f}");
    }
    assert!(
        crashed.is_empty(),
        "{} of {ran} kept fuzz inputs crash the {target} fuzz driver (fuzz/src/driver.rs):\n{}",
        crashed.len(),
        crashed.join("\n")
    );
    ran
}

#[test]
fn kept_fuzz_inputs_are_refused_or_deidentified_without_a_crash() {
    if std::env::var_os(CHILD).is_some() {
        return;
    }
    let ran = replay("deid");
    assert!(ran >= 20, "only {ran} inputs");
}

#[test]
fn kept_dicomdir_fuzz_inputs_walk_without_a_crash() {
    if std::env::var_os(CHILD).is_some() {
        return;
    }
    let ran = replay("dicomdir");
    assert!(ran >= 5, "only {ran} inputs");
}

/// The hand-made hostile inputs are refused by the gate, with its reasons, on both of the
/// driver's paths (the replay alone would pass if they were accepted).
#[test]
fn hand_made_hostile_inputs_are_refused_by_the_gate() {
    if std::env::var_os(CHILD).is_some() {
        return;
    }
    let mut checked = 0;
    for path in inputs("regressions", "deid") {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let Some(kind) = name.strip_prefix("hostile-") else {
            continue;
        };
        let bytes = std::fs::read(&path).unwrap();
        let want = if kind.starts_with("nested-un") {
            // dicom-rs reads an undefined-length UN in the syntax around it, not as implicit VR
            // (the standard's reading), so the implicit items inside read as a length bomb.
            "bytes but only"
        } else if kind.starts_with("nested") {
            "nested more than 32 deep"
        } else {
            "bytes but only"
        };
        let whole = driver::on_worker_stack(|| fracture_shared::pixels::read_object(&bytes))
            .expect("no panic");
        let e = whole.expect_err(&name);
        assert!(e.message.contains(want), "{name}: {}", e.message);
        let edge = driver::on_worker_stack(|| {
            fracture_ingest::Source::open(std::io::Cursor::new(&bytes[..])).map(|_| ())
        })
        .expect("no panic");
        let e = edge.expect_err(&name);
        assert!(e.message.contains(want), "{name}: {}", e.message);
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} hand-made hostile inputs");
}
