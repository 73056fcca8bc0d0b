//! Our Basic Profile against real peers, on the planted corpus and on the real fixtures
//! (cat.dcm with its realistic header, RG3_UNCR.dcm):
//! - gdcmanon (GDCM's PS3.15 E.1 de-identifier, `-e` with a throwaway certificate): whatever it
//!   removes, empties or replaces, we remove, empty or replace too, except the documented
//!   differences below;
//! - dciodvfy: our output has no error the input did not already have.
//!
//! Values are never printed: failures name attributes by tag and keyword only.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use dicom_core::{Tag, VR};
use dicom_dictionary_std::tags;

use common::*;

/// A fresh folder per test (the tests of this binary run in parallel).
fn work_dir(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("deid_peers")
        .join(test);
    let _ = std::fs::remove_dir_all(&dir);
    for sub in ["gdcm", "ours"] {
        std::fs::create_dir_all(dir.join(sub)).expect("cannot create the work folder");
    }
    dir
}

/// The corpus files and the real fixtures, by a short name.
fn inputs(test: &str) -> Vec<(String, PathBuf)> {
    let corpus = corpus(&format!("deid_peers_corpus_{test}"));
    let mut v: Vec<(String, PathBuf)> = corpus
        .files
        .iter()
        .map(|(name, _)| (name.clone(), corpus.dir.join(name)))
        .collect();
    for name in ["cat.dcm", "RG3_UNCR.dcm"] {
        let path = fixtures().join(name);
        assert!(path.exists(), "scripts/fixtures.sh did not provide {name}");
        v.push((format!("fixture-{name}"), path));
    }
    v
}

fn write_ours(input: &Path, out: &Path) {
    let (_, bytes) = deidentify_file(input);
    std::fs::write(out, bytes).expect("cannot write our output");
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, PartialOrd, Ord)]
enum State {
    Same,
    Changed,
    Emptied,
    Removed,
}

fn state(input: &(VR, String), output: Option<&(VR, String)>) -> State {
    match output {
        None => State::Removed,
        Some((_, v)) if *v == input.1 => State::Same,
        Some((_, v)) if v.is_empty() || v == "0 items" => State::Emptied,
        Some(_) => State::Changed,
    }
}

/// Where we deliberately do less than gdcmanon: the state we must show instead, and why.
fn intended(path: &Path_, vr: VR) -> Option<(&'static [State], &'static str)> {
    let tag = path[path.len() - 1].0;
    let inside = |t: Tag| path.len() > 1 && path[0].0 == t;
    #[allow(deprecated)]
    let retained = [
        tags::PATIENT_AGE,
        tags::PATIENT_SEX,
        tags::PATIENT_SIZE,
        tags::PATIENT_WEIGHT,
        tags::PATIENT_SEX_NEUTERED,
        tags::SMOKING_STATUS,
        tags::PREGNANCY_STATUS,
    ];
    if retained.contains(&tag) {
        return Some((
            &[State::Same],
            "Retain Patient Characteristics Option (113108): age, sex, size, weight ... kept",
        ));
    }
    if tag == tags::PATIENT_BIRTH_DATE {
        return None;
    }
    match vr {
        VR::DA | VR::DT => {
            return Some((
                &[State::Changed, State::Removed],
                "Retain Longitudinal Temporal Information Modified Dates (113107): shifted, not emptied",
            ))
        }
        VR::TM if tag != tags::PATIENT_BIRTH_TIME => {
            return Some((
                &[State::Same, State::Removed],
                "Modified Dates option: times of day kept once the dates have moved",
            ))
        }
        _ => {}
    }
    if path.len() == 1 && (tag == tags::PATIENT_NAME || tag == tags::PATIENT_ID) {
        return Some((
            &[State::Changed],
            "Z (Type 2) filled with the keyed patient pseudonym, so one patient's images stay together",
        ));
    }
    if vr == VR::UI {
        return Some((
            &[State::Changed, State::Removed, State::Emptied],
            "U: a UID gdcmanon empties is replaced by its keyed hash, which identifies no one",
        ));
    }
    if tag == tags::INSTITUTION_NAME {
        return Some((
            &[State::Changed],
            "X/Z/D resolved to D: the pseudonymous site code",
        ));
    }
    if inside(tags::SOURCE_IMAGE_SEQUENCE) || inside(tags::REFERENCED_IMAGE_SEQUENCE) {
        return Some((
            &[State::Same, State::Changed],
            "X/Z/U*: the reference kept with its instance UIDs replaced (class UIDs identify no one)",
        ));
    }
    if tag == tags::SOURCE_IMAGE_SEQUENCE || tag == tags::REFERENCED_IMAGE_SEQUENCE {
        return Some((
            &[State::Same],
            "X/Z/U*: the sequence kept, its UIDs replaced",
        ));
    }
    None
}

#[test]
fn whatever_gdcmanon_de_identifies_we_de_identify_too() {
    peers_python();
    let dir = work_dir("gdcmanon");
    // gdcmanon -e wraps the originals in an Encrypted Attributes Sequence for a certificate:
    // a throwaway one made here.
    let key = dir.join("key.pem");
    let cert = dir.join("cert.pem");
    let status = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=fracture-deid-test", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("cannot run openssl");
    assert!(
        status.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );

    let mut failures = Vec::new();
    let mut differences: BTreeMap<&'static str, BTreeSet<String>> = BTreeMap::new();
    let mut stricter: BTreeSet<String> = BTreeSet::new();
    let mut compared = 0;
    for (name, input) in inputs("gdcmanon") {
        let gd_path = dir.join("gdcm").join(&name);
        let out = Command::new("gdcmanon")
            .arg("-e")
            .arg("-c")
            .arg(&cert)
            .arg("-i")
            .arg(&input)
            .arg("-o")
            .arg(&gd_path)
            .output()
            .expect("cannot run gdcmanon");
        assert!(
            out.status.success() && gd_path.exists(),
            "gdcmanon failed on {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ours_path = dir.join("ours").join(&name);
        write_ours(&input, &ours_path);

        let original = flatten(&open(&input));
        let gd = flatten(&open(&gd_path));
        let ours = flatten(&open(&ours_path));
        for (path, value) in &original {
            // gdcmanon's own additions (Encrypted Attributes Sequence) are not in the input.
            let g = state(value, gd.get(path));
            let o = state(value, ours.get(path));
            compared += 1;
            if g == State::Same {
                if o != State::Same {
                    stricter.insert(describe(path[0].0));
                }
                continue;
            }
            let tag = path[path.len() - 1].0;
            let label = path
                .iter()
                .map(|(t, _)| describe(*t))
                .collect::<Vec<_>>()
                .join(" > ");
            let as_much = match g {
                State::Removed | State::Emptied => matches!(o, State::Removed | State::Emptied),
                State::Changed => o != State::Same,
                State::Same => true,
            };
            if as_much {
                continue;
            }
            if let Some((allowed, why)) = intended(path, value.0) {
                if allowed.contains(&o) {
                    differences.entry(why).or_default().insert(describe(tag));
                } else {
                    failures.push(format!(
                        "{name}: {label}: gdcmanon {g:?}, ours {o:?}, expected {allowed:?} ({why})"
                    ));
                }
                continue;
            }
            if !as_much {
                failures.push(format!("{name}: {label}: gdcmanon {g:?}, ours {o:?}"));
            }
        }
    }
    // The differences, listed for the reviewer (attribute names only).
    for (why, attrs) in &differences {
        eprintln!(
            "intended difference: {why}:\n    {}",
            attrs.iter().cloned().collect::<Vec<_>>().join("\n    ")
        );
    }
    eprintln!(
        "where gdcmanon keeps a value and we do not (top-level attribute):\n    {}",
        stricter.iter().cloned().collect::<Vec<_>>().join("\n    ")
    );
    assert!(compared > 500, "only {compared} attributes compared");
    assert!(
        failures.is_empty(),
        "gdcmanon de-identifies what we leave:\n{}",
        failures.join("\n")
    );
}

/// dciodvfy's `Error -` lines with every value cut out: `<...>` after `Element=`, `Module=` or
/// `attribute ` names an attribute and stays; any other `<...>` may hold a value and is redacted.
fn dciodvfy_errors(path: &Path) -> BTreeSet<String> {
    let out = Command::new("dciodvfy")
        .arg(path)
        .output()
        .expect("cannot run dciodvfy");
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter(|l| l.starts_with("Error - "))
        .map(redact)
        .collect()
}

fn redact(line: &str) -> String {
    let mut s = String::new();
    let mut rest = line;
    while let Some(i) = rest.find('<') {
        let before = &rest[..i];
        let Some(j) = rest[i..].find('>') else { break };
        let inner = &rest[i..i + j + 1];
        s.push_str(before);
        let names_an_attribute = ["Element=", "Module=", "attribute "]
            .iter()
            .any(|k| before.ends_with(k));
        s.push_str(if names_an_attribute { inner } else { "<…>" });
        rest = &rest[i + j + 1..];
    }
    s.push_str(rest);
    s.trim().to_string()
}

#[test]
fn dciodvfy_messages_are_redacted() {
    assert_eq!(
        redact("Error - Missing attribute Type 2 Required Element=<PatientName> Module=<Patient>"),
        "Error - Missing attribute Type 2 Required Element=<PatientName> Module=<Patient>"
    );
    assert_eq!(
        redact("Error - Value invalid - (0x0010,0x0010) PN Patient's Name PN [1] = <Doe^Jane> - x"),
        "Error - Value invalid - (0x0010,0x0010) PN Patient's Name PN [1] = <…> - x"
    );
    assert_eq!(
        redact(
            "Error - Unrecognized enumerated value <PVAL> for value 1 of attribute <Rescale Type>"
        ),
        "Error - Unrecognized enumerated value <…> for value 1 of attribute <Rescale Type>"
    );
}

#[test]
fn dciodvfy_finds_no_new_error_in_our_output() {
    peers_python();
    let dir = work_dir("dciodvfy");
    let mut failures = Vec::new();
    for (name, input) in inputs("dciodvfy") {
        let ours = dir.join(&name);
        write_ours(&input, &ours);
        let before = dciodvfy_errors(&input);
        let after = dciodvfy_errors(&ours);
        let new: Vec<&String> = after.difference(&before).collect();
        eprintln!(
            "dciodvfy {name}: {} errors in the input, {} in our output, {} new",
            before.len(),
            after.len(),
            new.len()
        );
        for e in new {
            failures.push(format!("{name}: {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "new dciodvfy errors:\n{}",
        failures.join("\n")
    );
}

/// Table E.1-1 as dicom-anonymizer 2.1.0 generated it from the 2026c edition of PS3.15 (read as
/// data, by scripts/deid-peers.sh's venv): tag -> Basic Profile action in the standard's notation.
fn anonymizers_table() -> BTreeMap<Tag, String> {
    let script = r#"
import json, runpy
from importlib.metadata import files
path = next(f for f in files("dicom-anonymizer") if f.name == "dicomfields_2026c.py")
ns = runpy.run_path(str(path.locate()))
codes = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D",
         "X_Z_TAGS": "X/Z", "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D", "X_Z_U_STAR_TAGS": "X/Z/U*"}
rows = {}
for name, code in codes.items():
    for t in ns[name]:
        if len(t) == 2:  # (group, element); 4-tuples are the group masks (curves, overlays)
            rows["%04X%04X" % t] = code
print(json.dumps(rows))
"#;
    let out = Command::new(peers_python())
        .arg("-c")
        .arg(script)
        .output()
        .expect("cannot run the venv python");
    assert!(
        out.status.success(),
        "reading dicom-anonymizer's table failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: BTreeMap<String, String> =
        serde_json::from_slice(&out.stdout).expect("the script prints a JSON object");
    rows.into_iter()
        .map(|(k, v)| {
            let g = u16::from_str_radix(&k[..4], 16).unwrap();
            let e = u16::from_str_radix(&k[4..], 16).unwrap();
            (Tag(g, e), v)
        })
        .collect()
}

/// Our transcription of Table E.1-1 against an independent one generated from the standard's
/// own document: the same rows, each with the same Basic Profile action.
#[test]
fn our_table_e1_1_matches_dicom_anonymizers_row_by_row() {
    let theirs = anonymizers_table();
    assert!(theirs.len() > 600, "only {} rows read", theirs.len());
    let ours: BTreeMap<Tag, &str> = fracture_ingest::deid::TABLE
        .iter()
        .map(|r| (r.tag, r.basic.code()))
        .collect();
    let missing: Vec<_> = theirs.keys().filter(|t| !ours.contains_key(t)).collect();
    let extra: Vec<_> = ours.keys().filter(|t| !theirs.contains_key(t)).collect();
    let differ: Vec<_> = ours
        .iter()
        .filter_map(|(t, a)| {
            theirs
                .get(t)
                .filter(|b| b.as_str() != *a)
                .map(|b| format!("{t}: ours {a}, theirs {b}"))
        })
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && differ.is_empty(),
        "rows only in dicom-anonymizer's table: {missing:?}\nrows only in ours: {extra:?}\nactions that differ: {differ:?}"
    );
}
