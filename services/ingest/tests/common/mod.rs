//! Shared helpers for the de-identification tests: the project's scripts (fixtures, peers,
//! corpus), a fixed policy, and walks over DICOM data sets that never print values.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use dicom_core::header::Header;
use dicom_core::value::Value;
use dicom_core::{Tag, VR};
use dicom_object::{DefaultDicomObject, InMemDicomObject};
use fracture_ingest::deid::passthrough;
use fracture_ingest::deid::{deidentify, DeidPolicy};
use fracture_ingest::Source;

mod pki;
#[allow(unused_imports)] // each test binary uses a different part of this module
pub use pki::{test_pki, TestPki};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs one of the project's scripts and returns the last line of its stdout. A script that
/// fails fails the test: these checks must not be skipped quietly.
pub fn run_script(script: &Path, args: &[&str]) -> String {
    let out = Command::new("bash")
        .arg(script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed ({}); its stderr:\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string())
        .unwrap_or_else(|| panic!("{} printed nothing on stdout", script.display()))
}

/// The venv python with pydicom, after `scripts/deid-peers.sh` made sure gdcmanon, dciodvfy
/// and dcmdump are installed.
pub fn peers_python() -> &'static Path {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let py = PathBuf::from(run_script(&repo_root().join("scripts/deid-peers.sh"), &[]));
        assert!(
            py.exists(),
            "deid-peers.sh printed {py:?}, which does not exist"
        );
        py
    })
}

/// The real radiographs of `scripts/fixtures.sh`.
pub fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| PathBuf::from(run_script(&repo_root().join("scripts/fixtures.sh"), &[])))
}

/// The planted-identifier corpus, generated afresh by `scripts/corpus/make_corpus.py`.
pub struct Corpus {
    pub dir: PathBuf,
    pub planted: Vec<String>,
    /// (file name, patient key)
    pub files: Vec<(String, String)>,
    /// (file, sequence keyword, target file)
    pub references: Vec<(String, String, String)>,
    pub uids: Vec<String>,
}

pub fn corpus(name: &str) -> Corpus {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("cannot create the corpus folder");
    let script = repo_root().join("scripts/corpus/make_corpus.py");
    let out = Command::new(peers_python())
        .arg(&script)
        .arg(&dir)
        .output()
        .expect("cannot run make_corpus.py");
    assert!(
        out.status.success(),
        "make_corpus.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(dir.join("corpus.json")).expect("corpus.json missing");
    let v: serde_json::Value = serde_json::from_str(&text).expect("corpus.json is not JSON");
    let strings = |key: &str| -> Vec<String> {
        v[key]
            .as_array()
            .unwrap_or_else(|| panic!("corpus.json has no {key} list"))
            .iter()
            .map(|s| s.as_str().expect("a string").to_string())
            .collect()
    };
    let files = v["files"]
        .as_array()
        .expect("files")
        .iter()
        .map(|f| {
            (
                f["name"].as_str().expect("name").to_string(),
                f["patient"].as_str().expect("patient").to_string(),
            )
        })
        .collect();
    let references = v["references"]
        .as_array()
        .expect("references")
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().expect("reference field").to_string();
            (s("file"), s("sequence"), s("target"))
        })
        .collect();
    Corpus {
        planted: strings("planted"),
        uids: strings("uids"),
        files,
        references,
        dir,
    }
}

pub fn policy() -> DeidPolicy {
    DeidPolicy::new(vec![0x5a; 32], "SITE01", "2.25").expect("a valid test policy")
}

pub fn open(path: &Path) -> DefaultDicomObject {
    let bytes =
        std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    fracture_shared::pixels::read_object(&bytes)
        .unwrap_or_else(|e| panic!("cannot parse {}: {e}", path.display()))
}

/// De-identifies a file the way ingest does (the pixel data passed through as bytes) and returns
/// the object and the written bytes.
pub fn deidentify_file(path: &Path) -> (DefaultDicomObject, Vec<u8>) {
    let file =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let source =
        Source::open(file).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut cleaned = passthrough::clean(source, &policy())
        .unwrap_or_else(|e| panic!("de-identifying {} failed: {e}", path.display()));
    let mut bytes = Vec::new();
    cleaned
        .passage
        .write(&cleaned.object, &mut bytes)
        .expect("the output serialises");
    // Read back what was written, so the checks see the file, not the in-memory object.
    let reread = fracture_shared::pixels::read_object(&bytes).expect("the output parses");
    (reread, bytes)
}

/// The same, parsing the whole file (pixel data included) and writing the object back, as
/// ingest did before the pixel data passed through: the reference the pass-through must equal.
pub fn deidentify_file_whole(path: &Path) -> (DefaultDicomObject, Vec<u8>) {
    let (clean, _) = deidentify(open(path), &policy())
        .unwrap_or_else(|e| panic!("de-identifying {} failed: {e}", path.display()));
    let bytes = fracture_shared::pixels::write_object(&clean).expect("the output serialises");
    let reread = fracture_shared::pixels::read_object(&bytes).expect("the output parses");
    (reread, bytes)
}

/// RG3_UNCR.dcm written in every transfer syntax of FIXTURES.md by
/// `scripts/transfer-syntaxes.sh` (which installs dcmtk and gdcm when missing): (name, path).
pub fn transfer_syntax_variants() -> Vec<(String, PathBuf)> {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let cache = std::env::var_os("FRACTURE_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/fracture")
            });
        let out = cache.join("transfer-syntaxes");
        PathBuf::from(run_script(
            &repo_root().join("scripts/transfer-syntaxes.sh"),
            &[out.to_str().expect("a UTF-8 cache path")],
        ))
    });
    let mut v: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "dcm"))
        .map(|p| (p.file_stem().unwrap().to_string_lossy().into_owned(), p))
        .collect();
    v.sort();
    v
}

/// A place in a data set: the tags and item indices leading to an element.
pub type Path_ = Vec<(Tag, usize)>;

/// Every primitive element of a data set, at any depth, as text (for comparisons only: callers
/// never print these values).
pub fn flatten(obj: &InMemDicomObject) -> BTreeMap<Path_, (VR, String)> {
    fn walk(obj: &InMemDicomObject, prefix: &Path_, out: &mut BTreeMap<Path_, (VR, String)>) {
        for e in obj {
            let mut path = prefix.clone();
            path.push((e.tag(), 0));
            match e.value() {
                Value::Sequence(seq) => {
                    out.insert(
                        path.clone(),
                        (VR::SQ, format!("{} items", seq.items().len())),
                    );
                    for (i, item) in seq.items().iter().enumerate() {
                        let mut p = prefix.clone();
                        p.push((e.tag(), i));
                        walk(item, &p, out);
                    }
                }
                Value::Primitive(p) => {
                    let text = if matches!(e.vr(), VR::OB | VR::OW | VR::OF | VR::UN) {
                        format!("{} bytes", p.calculate_byte_len())
                    } else {
                        p.to_str().trim_end_matches(['\0', ' ']).to_string()
                    };
                    out.insert(path, (e.vr(), text));
                }
                Value::PixelSequence(_) => {
                    out.insert(path, (e.vr(), "encapsulated".into()));
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(obj, &Vec::new(), &mut out);
    out
}

/// A tag as `(gggg,eeee) Name`, the way failures name attributes (never with their values).
pub fn describe(tag: Tag) -> String {
    use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
    let name = dicom_dictionary_std::StandardDataDictionary
        .by_tag(tag)
        .map(|e| e.alias().to_string())
        .unwrap_or_else(|| {
            if tag.group() % 2 == 1 {
                "private".to_string()
            } else {
                "unknown".to_string()
            }
        });
    format!("({:04X},{:04X}) {name}", tag.group(), tag.element())
}

/// Days between two DA values (or the date parts of DT values), `None` when unreadable.
pub fn days_between(from: &str, to: &str) -> Option<i64> {
    fn days(v: &str) -> Option<i64> {
        let v = v.trim();
        if v.len() < 8 {
            return None;
        }
        let (y, m, d): (i64, i64, i64) = (
            v[..4].parse().ok()?,
            v[4..6].parse().ok()?,
            v[6..8].parse().ok()?,
        );
        // Days from civil (H. Hinnant), enough for differences.
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
        Some(era * 146097 + yoe * 365 + yoe / 4 - yoe / 100 + doy)
    }
    Some(days(to)? - days(from)?)
}

/// A short, non-reversible label for a value, for failure messages about identifiers.
pub fn fingerprint(value: &str) -> String {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(value.as_bytes());
    format!("sha256:{}", hex::encode(&h[..6]))
}
