//! DICOM pixel decoding into the one form every stage uses: greyscale, MONOCHROME2, [0, 1].
//!
//! Ingest, preprocess, training and the overlay writer all read pixels through here, so a
//! MONOCHROME1 image, a rescale slope or a signed pixel representation is handled once.

use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::DefaultDicomObject;
use dicom_pixeldata::PixelDecoder;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use crate::error::StageError;

/// A decoded radiograph: row-major, bright = dense (MONOCHROME2), scaled to [0, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct Radiograph {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<f32>,
}

fn ts_name(uid: &str) -> String {
    let uid = uid.trim_end_matches('\0').trim();
    match TransferSyntaxRegistry.get(uid) {
        Some(ts) => format!("{uid} ({})", ts.name()),
        None => format!("{uid} (unknown to this build)"),
    }
}

/// Transfer syntax JPEG Extended (Process 2 & 4): 8- or 12-bit lossy DCT. The native JPEG
/// decoder reads the 8-bit form only; a 12-bit one is refused with the reason below.
pub const JPEG_EXTENDED: &str = "1.2.840.10008.1.2.4.51";

/// The stored pixel values of the first (only) frame, after the modality LUT (rescale slope and
/// intercept), as f32 so signed and rescaled values survive; not windowed, not inverted.
#[derive(Debug, Clone, PartialEq)]
pub struct RawValues {
    pub width: usize,
    pub height: usize,
    /// Row-major, `width * height` values.
    pub values: Vec<f32>,
    /// MONOCHROME1: bright = thin; [`decode`] inverts it.
    pub monochrome1: bool,
}

/// Decodes the first (only) frame into a [`Radiograph`]: [`decode_values`], then [`normalise`].
/// Errors are data errors with a reason a person can act on.
pub fn decode(obj: &DefaultDicomObject) -> Result<Radiograph, StageError> {
    let raw = decode_values(obj)?;
    Ok(Radiograph {
        width: raw.width,
        height: raw.height,
        pixels: normalise(&raw.values, raw.monochrome1),
    })
}

/// Decodes the first (only) frame into its values after the modality LUT, in any transfer
/// syntax this build decodes (uncompressed, deflated, RLE, JPEG lossless and baseline, JPEG-LS,
/// JPEG 2000). Errors are data errors with a reason a person can act on.
pub fn decode_values(obj: &DefaultDicomObject) -> Result<RawValues, StageError> {
    if obj.element(tags::PIXEL_DATA).is_err() {
        return Err(StageError::data(
            "the object has no Pixel Data (7FE0,0010): there is no image to analyse",
        ));
    }
    let ts_uid = obj
        .meta()
        .transfer_syntax()
        .trim_end_matches('\0')
        .trim()
        .to_string();
    let supported = TransferSyntaxRegistry
        .get(&ts_uid)
        .is_some_and(|ts| ts.can_decode_all());
    if !supported {
        return Err(StageError::data(format!(
            "transfer syntax {} is not supported for pixel decoding; transcode the file to an \
             uncompressed syntax (e.g. `gdcmconv --raw in.dcm out.dcm`) and send it again",
            ts_name(&ts_uid)
        )));
    }
    let decoded = obj.decode_pixel_data().map_err(|e| {
        if ts_uid == JPEG_EXTENDED {
            StageError::data(format!(
                "transfer syntax {} is not supported: its 12-bit samples cannot be read by \
                 this build's JPEG decoder (8-bit only for lossy JPEG) ({e}); transcode it \
                 with `gdcmconv --raw in.dcm out.dcm` (or `dcmdjpeg in.dcm out.dcm`) and send \
                 it again",
                ts_name(&ts_uid)
            ))
        } else {
            StageError::data(format!(
                "pixel data in transfer syntax {} could not be decoded ({e}); if the file opens \
                 in other viewers, transcode it with `gdcmconv --raw` and send it again",
                ts_name(&ts_uid)
            ))
        }
    })?;
    let (width, height) = (decoded.columns() as usize, decoded.rows() as usize);
    if decoded.samples_per_pixel() != 1 {
        return Err(StageError::data(format!(
            "colour image ({} samples per pixel): radiographs are greyscale; this is not a \
             radiograph the model can read",
            decoded.samples_per_pixel()
        )));
    }
    if decoded.number_of_frames() > 1 {
        return Err(StageError::data(format!(
            "multi-frame image ({} frames): a cine or a stack, not a single radiograph",
            decoded.number_of_frames()
        )));
    }
    if width == 0 || height == 0 {
        return Err(StageError::data("the image has zero rows or columns"));
    }
    let encapsulated = TransferSyntaxRegistry
        .get(&ts_uid)
        .is_some_and(|ts| ts.is_encapsulated_pixel_data());
    let values = stored_values(&decoded, encapsulated)?;
    if values.len() != width * height {
        return Err(StageError::data(format!(
            "pixel data holds {} values but the header says {}x{}: the file is truncated or \
             its header is wrong",
            values.len(),
            width,
            height
        )));
    }
    let photometric = decoded
        .photometric_interpretation()
        .as_str()
        .trim()
        .to_string();
    let monochrome1 = match photometric.as_str() {
        "MONOCHROME1" => true,
        "MONOCHROME2" => false,
        other => {
            return Err(StageError::data(format!(
                "photometric interpretation {other} is not greyscale: not a radiograph"
            )))
        }
    };
    Ok(RawValues {
        width,
        height,
        values,
        monochrome1,
    })
}

/// Frame 0's samples after the modality LUT (rescale slope/intercept), as f32 so signed and
/// rescaled values survive.
///
/// Uncompressed samples are masked to Bits Stored (bits above High Bit may hold anything) and
/// sign-extended when Pixel Representation is 1. Samples from a codec are clamped to the Bits
/// Stored range instead: a lossy JPEG 2000 stream written at 16-bit precision for 10-bit pixels
/// overshoots to 1024 or 1025 at the white end, and masking would turn those into black (0, 1).
fn stored_values(
    decoded: &dicom_pixeldata::DecodedPixelData<'_>,
    encapsulated: bool,
) -> Result<Vec<f32>, StageError> {
    let convert = |e: dicom_pixeldata::Error| {
        StageError::data(format!("pixel values could not be converted: {e}"))
    };
    let bits = decoded.bits_stored();
    let allocated = decoded.bits_allocated();
    let usual = (allocated == 8 || allocated == 16)
        && (1..=allocated).contains(&bits)
        && decoded.high_bit() + 1 == bits;
    if !usual {
        // Rare layouts (1 or 32 bits, High Bit not Bits Stored - 1): dicom-pixeldata's own
        // conversion, which applies the modality LUT too.
        return decoded.to_vec_frame(0).map_err(convert);
    }
    let signed = decoded.pixel_representation() == dicom_pixeldata::PixelRepresentation::Signed;
    let rescale = decoded.rescale().map_err(convert)?.first().copied();
    let (slope, intercept) = rescale.map_or((1.0, 0.0), |r| (r.slope, r.intercept));
    let samples: Vec<u16> = if allocated == 16 {
        decoded.frame_data_ow(0).map_err(convert)?
    } else {
        decoded
            .frame_data(0)
            .map_err(convert)?
            .iter()
            .map(|&b| u16::from(b))
            .collect()
    };
    let mask: u32 = (1u32 << bits) - 1;
    let stored = |w: u16| -> i32 {
        if encapsulated && !signed {
            let full = if allocated == 8 { w & 0xff } else { w };
            return i32::from(full).min(mask as i32);
        }
        let v = u32::from(w) & mask;
        if signed && v >> (bits - 1) & 1 == 1 {
            v as i32 - (1i32 << bits)
        } else {
            v as i32
        }
    };
    Ok(samples
        .into_iter()
        .map(|w| (f64::from(stored(w)) * slope + intercept) as f32)
        .collect())
}

/// Scales to [0, 1] between the 0.1st and 99.9th percentiles (robust to dead and hot pixels
/// and to burned-in white text), inverting MONOCHROME1 so bone is always bright.
pub fn normalise(values: &[f32], invert: bool) -> Vec<f32> {
    let mut finite: Vec<f32> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.is_empty() {
        return vec![0.0; values.len()];
    }
    // Exact order statistics in O(n): a histogram would lose all resolution to one hot pixel.
    let n = finite.len();
    let (ilo, ihi) = (n / 1000, n - 1 - n / 1000);
    let a = *finite.select_nth_unstable_by(ilo, f32::total_cmp).1;
    let b = *finite.select_nth_unstable_by(ihi, f32::total_cmp).1;
    let (a, b) = if b > a {
        (a, b)
    } else {
        let lo = finite.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = finite.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
            return vec![0.0; values.len()];
        }
        (lo, hi)
    };
    let scale = 1.0 / (b - a);
    values
        .iter()
        .map(|&v| {
            let x = if v.is_finite() {
                ((v - a) * scale).clamp(0.0, 1.0)
            } else {
                0.0
            };
            if invert {
                1.0 - x
            } else {
                x
            }
        })
        .collect()
}

/// Parses a DICOM file held in memory (with or without the 128-byte preamble).
pub fn read_object(bytes: &[u8]) -> Result<DefaultDicomObject, StageError> {
    let body = if bytes.len() >= 132 && &bytes[128..132] == b"DICM" {
        &bytes[128..]
    } else {
        bytes
    };
    if body.len() < 4 || &body[..4] != b"DICM" {
        return Err(StageError::data(
            "not a DICOM file: no DICM marker after the 128-byte preamble",
        ));
    }
    dicom_object::OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Never)
        .from_reader(std::io::Cursor::new(body))
        .map_err(|e| StageError::data(format!("the DICOM file cannot be parsed: {e}")))
}

/// Serialises a DICOM object as a Part 10 file (preamble, meta, data set).
pub fn write_object(obj: &DefaultDicomObject) -> Result<Vec<u8>, StageError> {
    let mut out = Vec::new();
    obj.write_all(&mut out)
        .map_err(|e| StageError::internal(format!("cannot serialise the DICOM object: {e}")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalise_is_robust_and_inverts_monochrome1() {
        let mut v: Vec<f32> = (0..10_000).map(|i| (i % 1000) as f32).collect();
        v[0] = 1e9; // a hot pixel must not squash the range
        let n = normalise(&v, false);
        assert!(n.iter().all(|x| (0.0..=1.0).contains(x)));
        assert!(n[999] > 0.95, "{}", n[999]);
        assert!(n[1] < 0.01);
        let m = normalise(&v, true);
        assert!((m[1] - (1.0 - n[1])).abs() < 1e-6);
        assert!(normalise(&[5.0; 10], false).iter().all(|&x| x == 0.0));
    }

    #[test]
    fn read_object_refuses_non_dicom() {
        let e = read_object(b"hello, this is a note").unwrap_err();
        assert!(e.message.contains("not a DICOM file"), "{e}");
        let mut trunc = vec![0u8; 128];
        trunc.extend_from_slice(b"DICM\x02\x00");
        assert!(read_object(&trunc)
            .unwrap_err()
            .message
            .contains("cannot be parsed"));
    }
}
