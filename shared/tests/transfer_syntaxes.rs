//! Every transfer syntax on one real radiograph (FIXTURES.md): RG3_UNCR.dcm (CR, MONOCHROME1,
//! 10 bits stored, 1760x1760) written by dcmtk and gdcm in each syntax, by
//! `scripts/transfer-syntaxes.sh`, must decode through `pixels::decode_values` to UNCR's values:
//! exactly where the syntax is lossless, within a stated bound where it is lossy. A MONOCHROME2
//! twin and a signed, rescaled variant are built here with dicom-object.
//!
//! The variants are written once to `$FRACTURE_CACHE/transfer-syntaxes` (default
//! `~/.cache/fracture`); the script installs dcmtk and libgdcm-tools when they are missing.

use std::path::PathBuf;
use std::sync::OnceLock;

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::DefaultDicomObject;
use fracture_shared::pixels::{self, RawValues, JPEG_EXTENDED};

fn variants_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let cache = std::env::var_os("FRACTURE_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/fracture")
            });
        let out = cache.join("transfer-syntaxes");
        let run = std::process::Command::new("bash")
            .arg(root.join("scripts/transfer-syntaxes.sh"))
            .arg(&out)
            .current_dir(&root)
            .output()
            .expect("run scripts/transfer-syntaxes.sh");
        assert!(
            run.status.success(),
            "scripts/transfer-syntaxes.sh failed: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let last = String::from_utf8_lossy(&run.stdout)
            .lines()
            .last()
            .expect("the script prints OUTDIR last")
            .to_string();
        PathBuf::from(last)
    })
}

fn open(name: &str) -> DefaultDicomObject {
    let path = variants_dir().join(format!("{name}.dcm"));
    let bytes = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (see scripts/transfer-syntaxes.sh)", path.display()));
    pixels::read_object(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn values(obj: &DefaultDicomObject, name: &str) -> RawValues {
    pixels::decode_values(obj).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn uncr() -> &'static RawValues {
    static UNCR: OnceLock<RawValues> = OnceLock::new();
    UNCR.get_or_init(|| {
        let v = values(&open("uncr"), "uncr");
        assert_eq!((v.width, v.height), (1760, 1760));
        assert!(v.monochrome1);
        assert!(v.values.iter().all(|&x| (0.0..=1023.0).contains(&x)));
        v
    })
}

fn transfer_syntax(obj: &DefaultDicomObject) -> String {
    obj.meta()
        .transfer_syntax()
        .trim_end_matches('\0')
        .to_string()
}

fn assert_exact(name: &str, ts: &str) {
    let obj = open(name);
    assert_eq!(transfer_syntax(&obj), ts, "{name}");
    let got = values(&obj, name);
    let want = uncr();
    assert_eq!((got.width, got.height, got.monochrome1), (1760, 1760, true));
    let diff = got
        .values
        .iter()
        .zip(&want.values)
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(diff, 0, "{name} ({ts}): {diff} pixels differ from UNCR");
    eprintln!("{name} ({ts}): exact");
}

/// (max |error|, RMS error) against UNCR, after scaling the decoded values by `scale`.
fn errors(got: &RawValues, scale: f32) -> (f32, f32) {
    let want = uncr();
    assert_eq!((got.width, got.height), (want.width, want.height));
    assert_eq!(got.monochrome1, want.monochrome1);
    let (mut max, mut sq) = (0f32, 0f64);
    for (a, b) in got.values.iter().zip(&want.values) {
        let e = (a * scale - b).abs();
        max = max.max(e);
        sq += f64::from(e) * f64::from(e);
    }
    (max, (sq / want.values.len() as f64).sqrt() as f32)
}

#[test]
fn uncompressed_variants_are_exact() {
    assert_exact("uncr", "1.2.840.10008.1.2.1");
    assert_exact("implicit", "1.2.840.10008.1.2");
    assert_exact("explicit-big-endian", "1.2.840.10008.1.2.2");
    assert_exact("deflated", "1.2.840.10008.1.2.1.99");
}

#[test]
fn lossless_compressed_variants_are_exact() {
    assert_exact("rle", "1.2.840.10008.1.2.5");
    assert_exact("jpeg-lossless-p14", "1.2.840.10008.1.2.4.57");
    assert_exact("jpeg-lossless-sv1", "1.2.840.10008.1.2.4.70");
    assert_exact("jpegls-lossless", "1.2.840.10008.1.2.4.80");
    assert_exact("j2k-lossless", "1.2.840.10008.1.2.4.90");
}

/// JPEG-LS near-lossless guarantees |error| <= NEAR per sample; dcmcjpls +en uses NEAR = 2.
#[test]
fn jpegls_near_lossless_is_within_near() {
    let obj = open("jpegls-near");
    assert_eq!(transfer_syntax(&obj), "1.2.840.10008.1.2.4.81");
    let (max, rms) = errors(&values(&obj, "jpegls-near"), 1.0);
    eprintln!("jpegls-near (.4.81): max error {max}, rms {rms}");
    assert!(max <= 2.0, "max error {max} > NEAR (2)");
    assert!(max > 0.0, "near-lossless should not be exact here");
}

/// dcmcjpeg +eb writes 8-bit samples: it maps 0..1023 linearly onto 0..255 (the window
/// 550/1024 becomes 137.0968/255.249, i.e. v * 255/1023), then DCT-codes them at IJG quality 90.
/// Scaling back by 1023/255 leaves a quantisation error of at most ~2 (half a 4.01-wide step)
/// plus the DCT error: we bound the RMS error by 4 (0.4% of the 10-bit range) and the worst
/// pixel by 64 (6%, at sharp edges of burned-in text). A decoder that got the bit depth, the
/// byte order or the photometric wrong is off by hundreds.
#[test]
fn jpeg_baseline_is_close() {
    let obj = open("jpeg-baseline");
    assert_eq!(transfer_syntax(&obj), "1.2.840.10008.1.2.4.50");
    let got = values(&obj, "jpeg-baseline");
    assert!(got.values.iter().all(|&x| (0.0..=255.0).contains(&x)));
    let (max, rms) = errors(&got, 1023.0 / 255.0);
    eprintln!("jpeg-baseline (.4.50): max error {max}, rms {rms} (10-bit units)");
    assert!(rms <= 4.0, "rms {rms}");
    assert!(max <= 64.0, "max {max}");
}

/// gdcmconv --j2k --lossy -r 10: irreversible 9/7 wavelet at 10:1. JPEG 2000 bounds no single
/// pixel; gdcm's own decoder (`gdcmconv --raw`) gives RMS 0.69 and max 4 here, so we bound the
/// RMS by 2 (0.2% of the 10-bit range) and the worst pixel by 32. The stream is coded at 16-bit
/// precision and overshoots to 1024/1025 at the white end: masking to Bits Stored (what
/// dicom-pixeldata's LUT does) made those pixels 0/1, a max error of 1023; they must clamp.
#[test]
fn jpeg2000_lossy_is_close() {
    let obj = open("j2k-lossy");
    assert_eq!(transfer_syntax(&obj), "1.2.840.10008.1.2.4.91");
    let (max, rms) = errors(&values(&obj, "j2k-lossy"), 1.0);
    eprintln!("j2k-lossy (.4.91): max error {max}, rms {rms}");
    assert!(rms <= 2.0, "rms {rms}");
    assert!(max <= 32.0, "max {max}");
}

/// JPEG Extended with 12-bit samples: the pure-Rust JPEG decoder reads 8-bit DCT only, so the
/// file is refused with a reason that names the syntax and says how to transcode it.
#[test]
fn jpeg_extended_12_bit_is_refused_with_how_to_transcode() {
    let obj = open("jpeg-extended");
    assert_eq!(transfer_syntax(&obj), JPEG_EXTENDED);
    let e = pixels::decode_values(&obj).unwrap_err();
    assert!(
        e.message.starts_with(
            "transfer syntax 1.2.840.10008.1.2.4.51 (JPEG Extended (Process 2 & 4)) is not \
             supported: its 12-bit samples"
        ),
        "{e}"
    );
    assert!(
        e.message
            .contains("transcode it with `gdcmconv --raw in.dcm out.dcm`"),
        "{e}"
    );
    assert_eq!(pixels::decode(&obj).unwrap_err().message, e.message);
    eprintln!("jpeg-extended (.4.51): refused: {e}");
}

/// RG3 with its pixels replaced: `f(v)` per value as 16-bit words, then `edit` on the header;
/// written to Part 10 bytes and read back, as a peer would send it.
fn rewrite(
    f: impl Fn(f32) -> u16,
    edit: impl FnOnce(&mut DefaultDicomObject),
) -> DefaultDicomObject {
    let mut obj = open("uncr");
    let words: Vec<u16> = uncr().values.iter().map(|&v| f(v)).collect();
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OW,
        PrimitiveValue::U16(words.into()),
    ));
    edit(&mut obj);
    let bytes = pixels::write_object(&obj).expect("write");
    pixels::read_object(&bytes).expect("read back")
}

#[test]
fn monochrome2_twin_decodes_like_monochrome1_original() {
    let twin = rewrite(
        |v| 1023 - v as u16,
        |o| {
            o.put(DataElement::new(
                tags::PHOTOMETRIC_INTERPRETATION,
                VR::CS,
                PrimitiveValue::from("MONOCHROME2"),
            ));
        },
    );
    let raw = values(&twin, "monochrome2 twin");
    assert!(!raw.monochrome1);
    let a = pixels::decode(&open("uncr")).expect("uncr");
    let b = pixels::decode(&twin).expect("twin");
    assert_eq!((a.width, a.height), (b.width, b.height));
    let max = a
        .pixels
        .iter()
        .zip(&b.pixels)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    eprintln!("monochrome2 twin: max |decode difference| {max}");
    assert!(max <= 1e-6, "max difference {max}");
}

#[test]
fn signed_rescaled_pixels_decode_as_f32() {
    // v - 512 as i16 (two's complement words), PixelRepresentation 1, then slope 0.5 and
    // intercept 10: the value after the modality LUT is (v - 512) * 0.5 + 10, negative for half
    // the range and fractional for odd v.
    let signed = rewrite(
        |v| (v as i16 - 512) as u16,
        |o| {
            o.put(DataElement::new(
                tags::PIXEL_REPRESENTATION,
                VR::US,
                PrimitiveValue::from(1u16),
            ));
            o.put(DataElement::new(
                tags::RESCALE_SLOPE,
                VR::DS,
                PrimitiveValue::from("0.5"),
            ));
            o.put(DataElement::new(
                tags::RESCALE_INTERCEPT,
                VR::DS,
                PrimitiveValue::from("10"),
            ));
        },
    );
    let got = values(&signed, "signed");
    let want: Vec<f32> = uncr()
        .values
        .iter()
        .map(|&v| (v - 512.0) * 0.5 + 10.0)
        .collect();
    assert!(got.values.iter().any(|&v| v < 0.0));
    let diff = got.values.iter().zip(&want).filter(|(a, b)| a != b).count();
    assert_eq!(diff, 0, "{diff} signed pixels differ");
    // Normalised, the signed variant is the same picture as the original.
    let a = pixels::decode(&open("uncr")).expect("uncr");
    let b = pixels::decode(&signed).expect("signed");
    let max = a
        .pixels
        .iter()
        .zip(&b.pixels)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(max <= 1e-5, "max difference {max}");
    eprintln!("signed + rescale: exact");
}
