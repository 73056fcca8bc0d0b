//! The fuzz targets' driver ([`driver`], shared with the stable regression test) and the
//! bookkeeping of findings that are not crashes.

pub mod driver;

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

/// Keeps one input per kind of finding (its message with the numbers taken out) in the folder
/// `$FRACTURE_FUZZ_FINDINGS/<target>/`, with the message beside it (`.txt`); nothing when the
/// variable is unset. Findings are not crashes: libFuzzer goes on.
pub fn keep_findings(target: &str, data: &[u8], findings: &[String]) {
    static SEEN: Mutex<Option<HashSet<u64>>> = Mutex::new(None);
    let Some(root) = std::env::var_os("FRACTURE_FUZZ_FINDINGS") else {
        return;
    };
    for f in findings {
        let kind: String = f
            .chars()
            .map(|c| if c.is_ascii_digit() { '#' } else { c })
            .collect();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        kind.hash(&mut h);
        let key = h.finish();
        let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
        if !seen.get_or_insert_with(HashSet::new).insert(key) {
            continue;
        }
        let dir = std::path::Path::new(&root).join(target);
        let file = dir.join(format!("finding-{key:016x}"));
        if file.exists() {
            continue;
        }
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(&file, data);
        let _ = std::fs::write(file.with_extension("txt"), format!("{f}\n"));
        eprintln!("fracture-fuzz: new finding ({}): {f}", file.display());
    }
}

/// libfuzzer-sys makes every panic abort, even one the code under test catches on purpose
/// (`pixels::decode_values` turns a pixel decoder's panic into a data error for that input).
/// Restoring the default hook keeps those caught: a panic that escapes the target still aborts,
/// since the targets pass it on and libfuzzer-sys aborts on any panic that reaches it.
pub fn count_only_escaping_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = std::panic::take_hook();
    });
}
