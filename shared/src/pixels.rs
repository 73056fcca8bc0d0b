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
        // The sender wrote it: a UID is 64 characters at most, and a dead letter is no place
        // for more (or for what is not a UID).
        None => {
            let shown: String = uid
                .chars()
                .take(64)
                .map(|c| {
                    if c.is_ascii_digit() || c == '.' {
                        c
                    } else {
                        '?'
                    }
                })
                .collect();
            format!("{shown} (unknown to this build)")
        }
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
    let mut pixels = raw.values;
    normalise_in_place(&mut pixels, raw.monochrome1);
    Ok(Radiograph {
        width: raw.width,
        height: raw.height,
        pixels,
    })
}

/// The decoders' own ceiling on Rows × Columns × frames × samples per pixel (16,384 square): a
/// decoded image takes 6 to 10 bytes a pixel on its way to the model, so this bounds one input at
/// a few GiB whatever a header claims. The edge refuses far less by default (`[ingest]
/// max_pixels`).
pub const MAX_PIXELS: u64 = 1 << 28;

const RLE_LOSSLESS: &str = "1.2.840.10008.1.2.5";

/// Refuses RLE fragments whose 64-byte header (PS3.5 G.5) is missing or declares more than 15
/// segments: the RLE decoder allocates the declared number of offsets before it reads them, so
/// four bytes could ask it for 16 GB (an abort no code can catch).
fn check_rle_headers(obj: &DefaultDicomObject) -> Result<(), StageError> {
    let Ok(pixels) = obj.element(tags::PIXEL_DATA) else {
        return Ok(());
    };
    let Some(fragments) = pixels.value().fragments() else {
        return Ok(());
    };
    for (i, f) in fragments.iter().enumerate() {
        let segments = f
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        match segments {
            Some(n) if f.len() >= 64 && n <= 15 => {}
            _ => {
                return Err(StageError::data(format!(
                    "RLE fragment {i} is malformed: its header is missing or declares more than \
                     15 segments ({}); transcode the file with `gdcmconv --raw` and send it again",
                    segments.map_or("none".to_string(), |n| n.to_string())
                )))
            }
        }
    }
    Ok(())
}

/// Refuses, from the header alone, an image whose Rows × Columns × frames × samples per pixel
/// passes `max_pixels`, before anything is decoded or allocated for it.
pub fn check_size(obj: &DefaultDicomObject, max_pixels: u64) -> Result<(), StageError> {
    let int = |tag, default: u64| {
        obj.element(tag)
            .ok()
            .and_then(|e| e.to_int::<u64>().ok())
            .unwrap_or(default)
    };
    let (rows, columns) = (int(tags::ROWS, 0), int(tags::COLUMNS, 0));
    let frames = int(tags::NUMBER_OF_FRAMES, 1).max(1);
    let samples = int(tags::SAMPLES_PER_PIXEL, 1).max(1);
    let total = rows
        .saturating_mul(columns)
        .saturating_mul(frames)
        .saturating_mul(samples);
    if total <= max_pixels {
        return Ok(());
    }
    let shape = match (frames, samples) {
        (1, 1) => format!("{rows} x {columns}"),
        _ => format!("{rows} x {columns}, {frames} frame(s) of {samples} sample(s)"),
    };
    Err(StageError::data(format!(
        "the image is {shape} = {total} pixel values, over the limit of {max_pixels}; no \
         radiograph is that large (a stitched long-leg film is about 30 million). If this one is \
         real, raise [ingest] max_pixels (at most {MAX_PIXELS})"
    )))
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
    check_size(obj, MAX_PIXELS)?;
    if ts_uid == RLE_LOSSLESS {
        check_rle_headers(obj)?;
    }
    // The decoders index into what the stream declares; one that panics on a malformed stream
    // (the RLE decoder did, found by fuzzing) must cost the input, not the process.
    let decoded =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| obj.decode_pixel_data()))
            .map_err(|_| {
                StageError::data(format!(
            "pixel data in transfer syntax {} is malformed: its decoder gave up on it; if the \
             file opens in other viewers, transcode it with `gdcmconv --raw` and send it again",
            ts_name(&ts_uid)
        ))
            })?
            .map_err(|e| {
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
    let rescale = decoded.rescale().map_err(convert)?.first().copied();
    let (slope, intercept) = rescale.map_or((1.0, 0.0), |r| (r.slope, r.intercept));
    let layout = SampleLayout {
        allocated,
        bits,
        signed: decoded.pixel_representation() == dicom_pixeldata::PixelRepresentation::Signed,
        encapsulated,
        slope,
        intercept,
    };
    // Straight from the decoded bytes: no intermediate Vec<u16>.
    Ok(layout.values(decoded.frame_data(0).map_err(convert)?))
}

/// How the samples of a usual layout (8 or 16 bits allocated, High Bit = Bits Stored - 1)
/// become values.
#[derive(Debug, Clone, Copy, PartialEq)]
struct SampleLayout {
    allocated: u16,
    bits: u16,
    signed: bool,
    /// From a codec: clamped to the Bits Stored range rather than masked (see [`stored_values`]).
    encapsulated: bool,
    slope: f64,
    intercept: f64,
}

impl SampleLayout {
    /// Every sample of `data` (native-endian words when 16 bits are allocated) after the
    /// modality LUT. Each case is its own loop without branches, so that it vectorises.
    fn values(self, data: &[u8]) -> Vec<f32> {
        let mask = (1u32 << self.bits) - 1;
        if self.encapsulated && !self.signed {
            let full = if self.allocated == 8 { 0xff } else { 0xffff };
            self.rescaled(data, |w| i32::from(w & full).min(mask as i32))
        } else if self.signed {
            // Sign-extends from bit `bits - 1`: the stored value, less 2^bits when that is set.
            let shift = 32 - u32::from(self.bits);
            self.rescaled(data, |w| (((u32::from(w) & mask) << shift) as i32) >> shift)
        } else {
            self.rescaled(data, |w| (u32::from(w) & mask) as i32)
        }
    }

    fn rescaled(self, data: &[u8], stored: impl Fn(u16) -> i32) -> Vec<f32> {
        let (slope, intercept) = (self.slope, self.intercept);
        // Stored values are below 2^16 in magnitude, so the f32 is exactly what the f64
        // arithmetic would give with slope 1 and intercept 0.
        if slope == 1.0 && intercept == 0.0 {
            self.each(data, |w| stored(w) as f32)
        } else {
            self.each(data, |w| (f64::from(stored(w)) * slope + intercept) as f32)
        }
    }

    fn each(self, data: &[u8], f: impl Fn(u16) -> f32) -> Vec<f32> {
        if self.allocated == 16 {
            data.chunks_exact(2)
                .map(|c| f(u16::from_ne_bytes([c[0], c[1]])))
                .collect()
        } else {
            data.iter().map(|&b| f(u16::from(b))).collect()
        }
    }
}

/// Scales to [0, 1] between the 0.1st and 99.9th percentiles (robust to dead and hot pixels
/// and to burned-in white text), inverting MONOCHROME1 so bone is always bright.
pub fn normalise(values: &[f32], invert: bool) -> Vec<f32> {
    match window(values) {
        Some(w) => values.iter().map(|&v| w.unit(v, invert)).collect(),
        None => vec![0.0; values.len()],
    }
}

/// [`normalise`] over the values' own buffer, saving a full-size allocation.
pub fn normalise_in_place(values: &mut [f32], invert: bool) {
    match window(values) {
        Some(w) => values.iter_mut().for_each(|v| *v = w.unit(*v, invert)),
        None => values.fill(0.0),
    }
}

/// The value range [`normalise`] maps onto [0, 1].
#[derive(Clone, Copy)]
struct Window {
    low: f32,
    scale: f32,
}

impl Window {
    #[inline(always)]
    fn unit(self, v: f32, invert: bool) -> f32 {
        let x = if v.is_finite() {
            ((v - self.low) * self.scale).clamp(0.0, 1.0)
        } else {
            0.0
        };
        if invert {
            1.0 - x
        } else {
            x
        }
    }
}

/// The percentile window of `values`, counted when they are integers, else selected.
fn window(values: &[f32]) -> Option<Window> {
    let (a, b) = integer_range(values).unwrap_or_else(|| selection_range(values))?;
    Some(Window {
        low: a,
        scale: 1.0 / (b - a),
    })
}

/// The window [`normalise`] scales to: the 0.1st and 99.9th percentiles of the finite values
/// (order statistics `n / 1000` and `n - 1 - n / 1000`, 0-based, of the `n` finite values in
/// [`f32::total_cmp`] order), or their minimum and maximum when those two are equal; `None`
/// when every finite value is the same (or there is none), for an all-black result.
///
/// Exact order statistics by selection: a histogram of binned values would lose all resolution
/// to one hot pixel. This is the general method; [`integer_range`] is the fast one for the
/// integer values nearly every radiograph holds.
fn selection_range(values: &[f32]) -> Option<(f32, f32)> {
    let mut finite: Vec<f32> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.is_empty() {
        return None;
    }
    let n = finite.len();
    let (ilo, ihi) = (n / 1000, n - 1 - n / 1000);
    let a = *finite.select_nth_unstable_by(ilo, f32::total_cmp).1;
    let b = *finite.select_nth_unstable_by(ihi, f32::total_cmp).1;
    if b > a {
        return Some((a, b));
    }
    let lo = finite.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = finite.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    (hi.partial_cmp(&lo) == Some(std::cmp::Ordering::Greater)).then_some((lo, hi))
}

/// Most distinct integers [`integer_range`] counts: a 16-bit range with room for an intercept.
const MAX_HISTOGRAM_BINS: usize = 1 << 17;

/// [`selection_range`] by counting, for values that are all integers (stored values with an
/// integer rescale, the common case) spanning at most [`MAX_HISTOGRAM_BINS`]: one bin per
/// integer, so the order statistics are exact and the result is the same to the bit. `None`
/// when the values are not such integers (then use [`selection_range`]).
fn integer_range(values: &[f32]) -> Option<Option<(f32, f32)>> {
    // Bounds and integrality in one pass, in eight independent lanes without branches so that
    // it vectorises (a float min/max carried from value to value would not).
    // Below 2^23, adding and taking away 2^23 rounds to an integer, so only integers come back
    // unchanged; from 2^23 up every f32 is an integer. -0.0 is not taken for an integer:
    // total_cmp orders it before +0.0, counting would not.
    const ROUND: f32 = 8_388_608.0;
    const LANES: usize = 8;
    let mut lo = [f32::INFINITY; LANES];
    let mut hi = [f32::NEG_INFINITY; LANES];
    let mut n = 0usize;
    for chunk in values.chunks(4096) {
        let mut fractional = [false; LANES];
        let mut count = [0u32; LANES];
        let mut lanes = chunk.chunks_exact(LANES);
        let mut scan = |lane: usize, v: f32| {
            let finite = v.is_finite();
            let a = v.abs();
            let integer = (a >= ROUND) | ((a + ROUND) - ROUND == a);
            let negative_zero = v.to_bits() == (-0.0f32).to_bits();
            fractional[lane] |= finite & !(integer & !negative_zero);
            count[lane] += u32::from(finite);
            let (low, high) = if finite {
                (v, v)
            } else {
                (f32::INFINITY, f32::NEG_INFINITY)
            };
            lo[lane] = if low < lo[lane] { low } else { lo[lane] };
            hi[lane] = if high > hi[lane] { high } else { hi[lane] };
        };
        for eight in &mut lanes {
            for (lane, &v) in eight.iter().enumerate() {
                scan(lane, v);
            }
        }
        for &v in lanes.remainder() {
            scan(0, v);
        }
        if fractional.contains(&true) {
            return None;
        }
        n += count.iter().map(|&c| c as usize).sum::<usize>();
    }
    if n == 0 {
        return Some(None);
    }
    let lo = lo.into_iter().fold(f32::INFINITY, f32::min);
    let hi = hi.into_iter().fold(f32::NEG_INFINITY, f32::max);
    // i32 holds every integer between these bounds exactly.
    const LIMIT: f32 = 2_147_483_648.0;
    if lo < -LIMIT || hi >= LIMIT {
        return None;
    }
    let bins = (i64::from(hi as i32) - i64::from(lo as i32) + 1) as usize;
    if bins > MAX_HISTOGRAM_BINS {
        return None;
    }
    // A finite value's bin, v - lo, is an integer below 2^17, computed exactly in f32; adding
    // 2^23 puts it in the low bits of the float, which is quicker than a saturating cast.
    let bin = |v: f32| (((v - lo) + ROUND).to_bits() - ROUND.to_bits()) as usize;
    // Four interleaved counters: long runs of one value (black borders) would otherwise wait
    // on the previous increment of the same bin.
    let mut counts = vec![[0u32; 4]; bins];
    if n == values.len() {
        let mut quads = values.chunks_exact(4);
        for q in &mut quads {
            for (lane, &v) in q.iter().enumerate() {
                counts[bin(v)][lane] += 1;
            }
        }
        for &v in quads.remainder() {
            counts[bin(v)][0] += 1;
        }
    } else {
        for &v in values.iter().filter(|v| v.is_finite()) {
            counts[bin(v)][0] += 1;
        }
    }
    let (ilo, ihi) = (n / 1000, n - 1 - n / 1000);
    let (mut a, mut b) = (None, None);
    let mut seen = 0usize;
    for (k, c) in counts.iter().enumerate() {
        seen += c.iter().map(|&x| x as usize).sum::<usize>();
        if a.is_none() && seen > ilo {
            a = Some(k);
        }
        if seen > ihi {
            b = Some(k);
            break;
        }
    }
    // lo + k is an integer in [lo, hi], so exact in f32 like both of them.
    let value = |k: usize| lo + k as f32;
    let (a, b) = (value(a?), value(b?));
    Some(if b > a {
        Some((a, b))
    } else {
        (hi > lo).then_some((lo, hi))
    })
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
    crate::gate::check_part10(body)?;
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

    /// Every word of every usual layout gives the value the per-sample formula gave before the
    /// conversion was split into branch-free loops, to the bit.
    #[test]
    fn sample_layouts_convert_every_word_as_the_reference_formula() {
        fn reference(l: SampleLayout, w: u16) -> f32 {
            let mask: u32 = (1u32 << l.bits) - 1;
            let stored = if l.encapsulated && !l.signed {
                let full = if l.allocated == 8 { w & 0xff } else { w };
                i32::from(full).min(mask as i32)
            } else {
                let v = u32::from(w) & mask;
                if l.signed && v >> (l.bits - 1) & 1 == 1 {
                    v as i32 - (1i32 << l.bits)
                } else {
                    v as i32
                }
            };
            (f64::from(stored) * l.slope + l.intercept) as f32
        }
        for allocated in [8u16, 16] {
            let words: Vec<u16> = (0..=u16::MAX)
                .filter(|&w| allocated == 16 || w <= 0xff)
                .collect();
            let data: Vec<u8> = if allocated == 16 {
                words.iter().flat_map(|w| w.to_ne_bytes()).collect()
            } else {
                words.iter().map(|&w| w as u8).collect()
            };
            for bits in [1, 7, 8, 10, 12, 15, 16]
                .into_iter()
                .filter(|&b| b <= allocated)
            {
                for (signed, encapsulated) in
                    [(false, false), (false, true), (true, false), (true, true)]
                {
                    for (slope, intercept) in [
                        (1.0, 0.0),
                        (1.0, -0.0),
                        (1.0, -1024.0),
                        (0.5, 0.25),
                        (-1.0, 4095.0),
                        (2.5e-3, -7.1),
                    ] {
                        let l = SampleLayout {
                            allocated,
                            bits,
                            signed,
                            encapsulated,
                            slope,
                            intercept,
                        };
                        let got = l.values(&data);
                        assert_eq!(got.len(), words.len());
                        for (&w, v) in words.iter().zip(&got) {
                            assert_eq!(v.to_bits(), reference(l, w).to_bits(), "{l:?}, word {w}");
                        }
                    }
                }
            }
        }
    }

    /// `normalise` as it was before the histogram: selection on a full copy, for every input.
    fn normalise_by_selection(values: &[f32], invert: bool) -> Vec<f32> {
        let Some((a, b)) = selection_range(values) else {
            return vec![0.0; values.len()];
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

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Counting must give the very same result as selection: same percentiles, same bits.
    #[test]
    fn the_histogram_gives_the_same_bits_as_selection() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};

        let mut rng = StdRng::seed_from_u64(2020);
        let mut cases: Vec<(String, Vec<f32>, bool)> = Vec::new();
        // Integers over the usual stored ranges, signed and with intercepts, at sizes around
        // the 1000-value steps of the percentile index.
        for (lo, hi) in [
            (0i32, 255),
            (0, 1023),
            (0, 4095),
            (0, 65535),
            (-2048, 2047),
            (-32768, 32767),
            (-1024, 3071),
            (1000, 1003),
            (-5, -1),
        ] {
            for n in [
                1usize, 2, 999, 1000, 1001, 1999, 2000, 2001, 12_345, 200_000,
            ] {
                let v: Vec<f32> = (0..n).map(|_| rng.random_range(lo..=hi) as f32).collect();
                cases.push((format!("uniform {lo}..={hi}, n {n}"), v, true));
            }
        }
        // A radiograph's shape: mostly black border, a body, a few hot and dead pixels, text.
        let mut xray: Vec<f32> = (0..300_000)
            .map(|i| match i % 10 {
                0..=3 => 0.0,
                _ => rng.random_range(200..900) as f32,
            })
            .collect();
        for _ in 0..50 {
            let i = rng.random_range(0..xray.len());
            xray[i] = if rng.random_bool(0.5) { 4095.0 } else { 0.0 };
        }
        cases.push(("radiograph-like".into(), xray.clone(), true));
        // Non-finite values are skipped by both.
        let mut holes = xray.clone();
        for (i, v) in holes.iter_mut().enumerate().filter(|(i, _)| i % 97 == 0) {
            *v = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][i % 3];
        }
        cases.push(("radiograph with NaN and infinities".into(), holes, true));
        cases.push((
            "only non-finite".into(),
            vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY],
            true,
        ));
        cases.push(("empty".into(), vec![], true));
        cases.push(("constant".into(), vec![7.0; 5000], true));
        // Percentiles equal, so the window falls back to min and max.
        let mut spike = vec![100.0f32; 10_000];
        spike[17] = 90.0;
        spike[4242] = 130.0;
        cases.push(("two outliers in a constant".into(), spike, true));
        let mut one = vec![3.0f32; 5000];
        one[0] = 4.0;
        cases.push(("one outlier above".into(), one, true));
        // At the edge of exactly representable integers.
        cases.push((
            "near 2^24".into(),
            (0..3000).map(|i| 16_777_216.0 - (i % 7) as f32).collect(),
            true,
        ));
        cases.push((
            "beyond 2^24".into(),
            (0..3000)
                .map(|i| 33_554_432.0 - 2.0 * (i % 7) as f32)
                .collect(),
            true,
        ));
        cases.push((
            "beyond i32".into(),
            (0..3000).map(|i| 3e9 + 256.0 * (i % 7) as f32).collect(),
            false,
        ));
        cases.push((
            "negative, down to i32::MIN".into(),
            (0..3000)
                .map(|i| -2_147_483_648.0 + 256.0 * (i % 7) as f32)
                .collect(),
            true,
        ));
        // Not for the histogram: fractions, -0.0, a range over the bin limit, a hot pixel.
        cases.push((
            "rescaled by 0.5".into(),
            (0..5000)
                .map(|_| rng.random_range(0..4096) as f32 * 0.5)
                .collect(),
            false,
        ));
        let mut neg_zero: Vec<f32> = (0..5000).map(|i| (i % 3) as f32 - 1.0).collect();
        neg_zero[10] = -0.0;
        cases.push(("with -0.0".into(), neg_zero, false));
        cases.push((
            "range over the bin limit".into(),
            (0..5000)
                .map(|_| rng.random_range(0..1_000_000) as f32)
                .collect(),
            false,
        ));
        let mut hot: Vec<f32> = (0..10_000).map(|i| (i % 1000) as f32).collect();
        hot[0] = 1e9;
        cases.push(("hot pixel of 1e9".into(), hot, false));
        cases.push((
            "random floats".into(),
            (0..5000)
                .map(|_| rng.random::<f32>() * 10.0 - 5.0)
                .collect(),
            false,
        ));

        for (name, values, counted) in &cases {
            assert_eq!(
                integer_range(values).is_some(),
                *counted,
                "{name}: histogram taken or not"
            );
            for invert in [false, true] {
                assert_eq!(
                    bits(&normalise(values, invert)),
                    bits(&normalise_by_selection(values, invert)),
                    "{name}, invert {invert}"
                );
            }
            if let Some(range) = integer_range(values) {
                assert_eq!(range, selection_range(values), "{name}");
            }
        }
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
