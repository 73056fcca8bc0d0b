//! De-identification with the pixel data passed through as bytes (what ingest and `fracture deid`
//! do) must give exactly what parsing the whole file and writing it back gives, on every transfer
//! syntax of FIXTURES.md, the real fixtures and the planted corpus; the pixel data element must be
//! the input's, byte for byte; and what the walk cannot trust falls back to the full parser.

mod common;

use std::path::{Path, PathBuf};

use dicom_core::header::Header;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use fracture_ingest::burned_in::PixelRule;
use fracture_ingest::deid::passthrough;
use fracture_ingest::Source;

use common::*;

fn work_dir(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("passthrough")
        .join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("cannot create the work folder");
    dir
}

fn source(path: &Path) -> Source<std::fs::File> {
    Source::open(std::fs::File::open(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

type Element = dicom_object::mem::InMemElement;

/// Equal tag, VR and value, items compared the same way (dicom-core's `==` never takes two
/// undefined lengths as equal, so it cannot compare sequences as read).
fn same_element(a: &Element, b: &Element) -> bool {
    use dicom_core::value::Value;
    a.tag() == b.tag()
        && a.vr() == b.vr()
        && match (a.value(), b.value()) {
            (Value::Sequence(x), Value::Sequence(y)) => {
                x.items().len() == y.items().len()
                    && x.items()
                        .iter()
                        .zip(y.items())
                        .all(|(i, j)| same_object(i, j))
            }
            (x, y) => x == y,
        }
}

fn same_object(a: &dicom_object::InMemDicomObject, b: &dicom_object::InMemDicomObject) -> bool {
    a.iter().count() == b.iter().count() && a.iter().zip(b.iter()).all(|(x, y)| same_element(x, y))
}

/// The tags (never the values) where two objects differ, at the top level.
fn differing_tags(
    a: &dicom_object::DefaultDicomObject,
    b: &dicom_object::DefaultDicomObject,
) -> Vec<Tag> {
    let mut tags: Vec<Tag> = a.iter().chain(b.iter()).map(|e| e.tag()).collect();
    tags.sort();
    tags.dedup();
    tags.into_iter()
        .filter(|t| match (a.element(*t), b.element(*t)) {
            (Ok(x), Ok(y)) => !same_element(x, y),
            _ => true,
        })
        .collect()
}

/// Checks one input: the pass-through output equals the whole-file output, and its pixel data
/// element is the input's bytes.
fn check(name: &str, path: &Path, expect_pass_through: bool) {
    let src = source(path);
    assert_eq!(
        src.passes_through(),
        expect_pass_through,
        "{name}: pass-through expected {expect_pass_through}"
    );
    let (pass, pass_bytes) = deidentify_file(path);
    let (whole, _) = deidentify_file_whole(path);
    assert!(pass.meta() == whole.meta(), "{name}: the file meta differs");
    let differ = differing_tags(&pass, &whole);
    assert!(
        differ.is_empty(),
        "{name}: the outputs differ at {differ:?}"
    );
    if let Some(span) = src.pixel_span() {
        let input = std::fs::read(path).unwrap();
        let out_span = Source::open(std::io::Cursor::new(&pass_bytes))
            .unwrap()
            .pixel_span()
            .unwrap_or_else(|| panic!("{name}: the output's pixel data cannot be walked"));
        assert!(
            pass_bytes[out_span.start as usize..out_span.end as usize]
                == input[span.start as usize..span.end as usize],
            "{name}: the pixel data element is not the input's, byte for byte"
        );
    }
}

#[test]
fn every_transfer_syntax_passes_its_pixel_data_through_unchanged() {
    let variants = transfer_syntax_variants();
    assert!(variants.len() >= 12, "only {} variants", variants.len());
    for (name, path) in &variants {
        // A deflated data set is one compressed stream: it is parsed whole instead.
        check(name, path, name != "deflated");
    }
    for name in ["cat.dcm", "RG3_UNCR.dcm"] {
        check(name, &fixtures().join(name), true);
    }
}

#[test]
fn the_planted_corpus_gives_the_same_output_either_way() {
    let corpus = corpus("passthrough_corpus");
    for (name, _) in &corpus.files {
        let path = corpus.dir.join(name);
        let walks = source(&path).passes_through();
        check(name, &path, walks);
    }
    // Most of the corpus has pixel data and a walkable layout; if none passed through, the
    // comparison above proved nothing about the pass-through.
    let passed = corpus
        .files
        .iter()
        .filter(|(n, _)| source(&corpus.dir.join(n)).passes_through())
        .count();
    assert!(
        passed * 2 > corpus.files.len(),
        "only {passed} passed through"
    );
}

/// RG3 with what a modality may put after the pixel data: a private block holding a name, and
/// trailing padding.
fn with_trailing_elements(dir: &Path) -> PathBuf {
    let mut obj = open(&fixtures().join("RG3_UNCR.dcm"));
    obj.put(DataElement::new(
        Tag(0x7FE1, 0x0010),
        VR::LO,
        PrimitiveValue::from("ACME PRIVATE"),
    ));
    obj.put(DataElement::new(
        Tag(0x7FE1, 0x1001),
        VR::LO,
        PrimitiveValue::from("SMITHERSON^JOHNATHAN"),
    ));
    obj.put(DataElement::new(
        Tag(0xFFFC, 0xFFFC),
        VR::OB,
        PrimitiveValue::from(vec![0u8; 64]),
    ));
    let path = dir.join("trailing.dcm");
    obj.write_to_file(&path).unwrap();
    path
}

#[test]
fn elements_after_the_pixel_data_are_de_identified_too() {
    let dir = work_dir("trailing");
    let path = with_trailing_elements(&dir);
    check("trailing", &path, true);
    let (out, bytes) = deidentify_file(&path);
    assert!(
        out.element(Tag(0x7FE1, 0x1001)).is_err(),
        "private tag removed"
    );
    assert!(
        !bytes.windows(10).any(|w| w == b"SMITHERSON"),
        "the name in the private block after the pixel data is gone"
    );
}

#[test]
fn a_file_cut_short_is_refused_with_the_parsers_reason() {
    let dir = work_dir("truncated");
    let full = std::fs::read(fixtures().join("RG3_UNCR.dcm")).unwrap();
    for keep in [full.len() * 3 / 5, full.len() - 1, 200] {
        let path = dir.join(format!("cut-{keep}.dcm"));
        std::fs::write(&path, &full[..keep]).unwrap();
        let whole = fracture_shared::pixels::read_object(&full[..keep]).map(|_| ());
        let walked = Source::open(std::fs::File::open(&path).unwrap()).map(|_| ());
        match (whole, walked) {
            (Err(a), Err(b)) => assert_eq!(a.message, b.message, "cut at {keep}"),
            (Ok(()), Ok(())) => {}
            (a, b) => panic!("cut at {keep}: whole {a:?}, walked {b:?}"),
        }
    }
    let empty = dir.join("empty.dcm");
    std::fs::write(&empty, b"").unwrap();
    let e = Source::open(std::fs::File::open(&empty).unwrap())
        .err()
        .expect("an empty file is refused");
    assert!(e.message.contains("empty file"), "{}", e.message);
}

#[test]
fn a_burned_in_rule_parses_the_pixels_and_blacks_out_its_rectangle() {
    let mut policy = policy();
    policy.pixel_rules = vec![PixelRule {
        manufacturer: "fuji photo film co. ltd.".into(),
        model: "IRS".into(),
        rectangles: vec![[0, 0, 4, 4]],
    }];
    let path = fixtures().join("RG3_UNCR.dcm");
    let mut cleaned = passthrough::clean(source(&path), &policy).unwrap();
    assert!(cleaned.pixels_cleaned);
    let mut bytes = Vec::new();
    cleaned.passage.write(&cleaned.object, &mut bytes).unwrap();
    let out = fracture_shared::pixels::read_object(&bytes).unwrap();
    let px = out
        .element(tags::PIXEL_DATA)
        .unwrap()
        .to_multi_int::<u16>()
        .unwrap();
    // MONOCHROME1 with 10 stored bits: black is 1023.
    assert_eq!(&px[..4], &[1023; 4]);
    assert_eq!(px.len(), 1760 * 1760);

    // Declared burned-in text with no rule: refused before any pixel is read.
    let dir = work_dir("declared");
    let mut obj = open(&path);
    obj.put(DataElement::new(
        tags::BURNED_IN_ANNOTATION,
        VR::CS,
        PrimitiveValue::from("YES"),
    ));
    let declared = dir.join("declared.dcm");
    obj.write_to_file(&declared).unwrap();
    let e = passthrough::clean(source(&declared), &common::policy())
        .err()
        .expect("refused");
    assert!(e.message.contains("burned-in annotation"), "{}", e.message);
}

/// pydicom's own test files (from the pinned pydicom of scripts/deid-peers.sh's venv): 78 real
/// objects with the layouts that break parsers (big endian, no meta group, odd lengths, undefined
/// lengths, private and UN sequences, embedded delimiters, truncation). Whatever parsing the whole
/// file gives, the pass-through gives too: the same object, or the same refusal.
#[test]
fn pydicoms_test_files_give_the_same_outcome_either_way() {
    let out = std::process::Command::new(peers_python())
        .args([
            "-c",
            "import os, pydicom; print(os.path.join(os.path.dirname(pydicom.__file__), 'data', 'test_files'))",
        ])
        .output()
        .expect("the venv python runs");
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "dcm"))
        .collect();
    files.sort();
    assert!(files.len() >= 70, "only {} test files", files.len());
    let policy = policy();
    let (mut passed, mut same_refusal) = (0, 0);
    let mut failures = Vec::new();
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(path).unwrap();
        // Written and read back, as the pass-through's output is (a value of VR UN reads back
        // as bytes, whatever it was in memory).
        let whole = fracture_shared::pixels::read_object(&bytes)
            .and_then(|o| fracture_ingest::deidentify(o, &policy).map(|(c, _)| c))
            .and_then(|c| fracture_shared::pixels::write_object(&c))
            .and_then(|b| fracture_shared::pixels::read_object(&b));
        let walked = Source::open(std::fs::File::open(path).unwrap()).and_then(|s| {
            let through = s.passes_through();
            passthrough::clean(s, &policy).and_then(|mut c| {
                let mut out = Vec::new();
                c.passage.write(&c.object, &mut out)?;
                Ok((through, out))
            })
        });
        match (whole, walked) {
            (Ok(w), Ok((through, out))) => {
                let reread = match fracture_shared::pixels::read_object(&out) {
                    Ok(o) => o,
                    Err(e) => {
                        failures.push(format!("{name}: our output does not parse: {e}"));
                        continue;
                    }
                };
                let differ = differing_tags(&reread, &w);
                if !differ.is_empty() {
                    failures.push(format!("{name}: differs at {differ:?}"));
                }
                passed += usize::from(through);
            }
            (Err(a), Err(b)) if a.message == b.message => same_refusal += 1,
            (a, b) => failures.push(format!(
                "{name}: whole {:?}, walked {:?}",
                a.map(|_| ()),
                b.map(|_| ())
            )),
        }
    }
    eprintln!(
        "{} files: {passed} passed their pixel data through, {same_refusal} refused either way",
        files.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(passed * 2 > files.len(), "only {passed} passed through");
}
