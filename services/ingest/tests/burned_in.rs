//! Burned-in text on a real radiograph: a device rule blacks out its rectangles (and only them)
//! and records Clean Pixel Data; an image declaring burned-in text with no rule is refused.

use std::path::PathBuf;
use std::process::Command;

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use fracture_ingest::burned_in::{apply, mark_cleaned, PixelRule};

fn rg3() -> dicom_object::DefaultDicomObject {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/fixtures.sh");
    let out = Command::new("bash").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap()
            .trim(),
    );
    dicom_object::open_file(dir.join("RG3_UNCR.dcm")).unwrap()
}

fn pixels(obj: &dicom_object::DefaultDicomObject) -> Vec<u16> {
    obj.element(tags::PIXEL_DATA)
        .unwrap()
        .to_multi_int::<u16>()
        .unwrap()
}

#[test]
fn a_rule_blacks_out_its_rectangles_only() {
    let mut obj = rg3();
    let before = pixels(&obj);
    let cols = 1760usize;
    let rule = PixelRule {
        manufacturer: "fuji photo film co. ltd.".into(),
        model: "IRS".into(),
        rectangles: vec![[10, 20, 110, 70]],
    };
    assert!(apply(&mut obj, &[rule]).unwrap(), "the rule matched");
    let after = pixels(&obj);
    // RG3 is MONOCHROME1 with 10 stored bits: black is 1023.
    for y in 0..100 {
        for x in 0..200 {
            let i = y * cols + x;
            if (10..110).contains(&x) && (20..70).contains(&y) {
                assert_eq!(after[i], 1023, "({x},{y}) blacked out");
            } else {
                assert_eq!(after[i], before[i], "({x},{y}) untouched");
            }
        }
    }
    assert_eq!(&after[200 * cols..], &before[200 * cols..]);
    mark_cleaned(&mut obj);
    let codes: Vec<String> = obj
        .element(tags::DEIDENTIFICATION_METHOD_CODE_SEQUENCE)
        .unwrap()
        .items()
        .unwrap()
        .iter()
        .map(|i| {
            i.element(tags::CODE_VALUE)
                .unwrap()
                .to_str()
                .unwrap()
                .trim()
                .to_string()
        })
        .collect();
    assert!(codes.contains(&"113101".to_string()), "{codes:?}");
}

#[test]
fn declared_burned_in_text_without_a_rule_is_refused_and_other_devices_pass() {
    let mut obj = rg3();
    obj.put(DataElement::new(
        tags::BURNED_IN_ANNOTATION,
        VR::CS,
        PrimitiveValue::from("YES"),
    ));
    let other = PixelRule {
        manufacturer: "Agfa".into(),
        model: String::new(),
        rectangles: vec![[0, 0, 10, 10]],
    };
    let e = apply(&mut obj, std::slice::from_ref(&other)).unwrap_err();
    assert!(
        e.message.starts_with("quarantined:") && e.message.contains("[[ingest.burned_in]]"),
        "{e}"
    );
    // Without the declaration and without a matching rule, nothing is touched.
    let mut plain = rg3();
    let before = pixels(&plain);
    assert!(!apply(&mut plain, &[other]).unwrap());
    assert_eq!(pixels(&plain), before);
}
