//! The pre-parse gate: a walk of a DICOM data set's element headers before any full parse, which
//! refuses what would make the parser recurse without bound (nesting deeper than any real object
//! has) or allocate more than the input holds (a declared length past the end, a deflated data
//! set that inflates beyond a cap). The DICOM parser recurses once per nested sequence and
//! allocates a value's declared length before reading it, so one hostile file could otherwise
//! overflow the stack (an abort no code can catch) or take gigabytes. Anything else it cannot
//! read it leaves to the parser, whose messages stay the ones a person sees.

use std::io::Read;

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry, VirtualVr};
use dicom_core::{Tag, VR};

use crate::error::StageError;

/// Deepest nesting of sequences accepted; real objects stay in single figures.
pub const MAX_DEPTH: usize = 32;
/// A deflated data set may inflate to this many bytes at most (a radiograph is under 1 GiB).
pub const MAX_INFLATED: u64 = 1 << 30;

const UNDEFINED: u32 = u32::MAX;
const ITEM: Tag = Tag(0xFFFE, 0xE000);
const ITEM_END: Tag = Tag(0xFFFE, 0xE00D);
const SEQUENCE_END: Tag = Tag(0xFFFE, 0xE0DD);
const PIXEL_DATA: Tag = Tag(0x7FE0, 0x0010);

const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
const IMPLICIT_LE: &str = "1.2.840.10008.1.2";
const EXPLICIT_BE: &str = "1.2.840.10008.1.2.2";
const DEFLATED: &str = "1.2.840.10008.1.2.1.99";

/// Why the gate refused an input: a data error, never retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GateError {
    #[error("the DICOM file cannot be parsed: sequences are nested more than {MAX_DEPTH} deep (at element {0}); no radiograph is, so it was refused unparsed")]
    TooDeep(String),
    #[error("the DICOM file cannot be parsed: element {tag} declares {declared} bytes but only {remaining} follow (truncated or malformed)")]
    LengthPastEnd {
        tag: String,
        declared: u64,
        remaining: u64,
    },
    #[error("the DICOM file cannot be parsed: its deflated data set inflates to more than {MAX_INFLATED} bytes")]
    InflatesTooFar,
    #[error("the DICOM file cannot be parsed: element {0} at byte {1} of the data set stands where a sequence item belongs (malformed)")]
    Lost(String, usize),
    #[error("the DICOM file cannot be parsed: element {tag} ({vr}) has a length of {len} bytes, not a multiple of its {unit}-byte values (malformed)")]
    Misaligned {
        tag: String,
        vr: String,
        len: u32,
        unit: u32,
    },
}

impl From<GateError> for StageError {
    fn from(e: GateError) -> Self {
        StageError::data(e.to_string())
    }
}

/// Checks a Part 10 stream (`DICM` first, the preamble already removed): the file meta group,
/// then the data set in the transfer syntax the meta group names.
pub fn check_part10(body: &[u8]) -> Result<(), GateError> {
    let Some(meta) = body.get(4..) else {
        return Ok(());
    };
    // Read as dicom-object reads it: (0002,0000) first, four bytes, then elements (of any
    // group) until that many bytes are consumed; the data set starts where they end.
    let mut c = Cursor::new(meta, Syntax::EXPLICIT_LE);
    let group_length = match c.header() {
        Some((Tag(0x0002, 0x0000), _, 4)) => match c.u32_at(c.pos) {
            Some(l) => l as usize,
            None => return Ok(()),
        },
        // The parser refuses it before reading a value.
        _ => return Ok(()),
    };
    c.pos += 4;
    let start = c.pos;
    let mut ts = None;
    while c.pos - start < group_length {
        let Some((tag, _, len)) = c.header() else {
            return Ok(());
        };
        if len == UNDEFINED {
            return Ok(());
        }
        c.fits(tag, len)?;
        let value = &meta[c.pos..c.pos + len as usize];
        if tag == Tag(0x0002, 0x0010) {
            ts = Some(
                String::from_utf8_lossy(value)
                    .trim_end_matches(['\0', ' '])
                    .to_string(),
            );
        }
        c.pos += len as usize;
    }
    let data = &meta[c.pos..];
    check_dataset(data, ts.as_deref().unwrap_or(EXPLICIT_LE))
}

/// Checks a data set (no meta group) encoded in the transfer syntax `ts`.
pub fn check_dataset(data: &[u8], ts: &str) -> Result<(), GateError> {
    match ts {
        DEFLATED => {
            let inflated = inflate(data)?;
            check_dataset(&inflated, EXPLICIT_LE)
        }
        IMPLICIT_LE => walk(&mut Cursor::new(data, Syntax::IMPLICIT_LE), None, 0),
        EXPLICIT_BE => walk(&mut Cursor::new(data, Syntax::EXPLICIT_BE), None, 0),
        // Every other syntax encodes its data set in explicit VR little endian.
        _ => walk(&mut Cursor::new(data, Syntax::EXPLICIT_LE), None, 0),
    }
}

/// Inflates a deflated data set, refusing it once it passes [`MAX_INFLATED`]. The size is
/// counted first through a small buffer, so a bomb costs no memory; only a data set within the
/// cap is inflated into memory (as the parser will hold it anyway). Of a stream that breaks part
/// way, what inflated is kept: the parser reads that much before it fails, and may allocate
/// what it declares.
fn inflate(data: &[u8]) -> Result<Vec<u8>, GateError> {
    let mut counter = flate2::read::DeflateDecoder::new(data);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut total: u64 = 0;
    loop {
        match counter.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                total += n as u64;
                if total > MAX_INFLATED {
                    return Err(GateError::InflatesTooFar);
                }
            }
        }
    }
    let mut out = Vec::with_capacity(total as usize);
    let _ = flate2::read::DeflateDecoder::new(data).read_to_end(&mut out);
    Ok(out)
}

#[derive(Clone, Copy)]
struct Syntax {
    explicit: bool,
    big_endian: bool,
}

impl Syntax {
    const EXPLICIT_LE: Self = Self {
        explicit: true,
        big_endian: false,
    };
    const IMPLICIT_LE: Self = Self {
        explicit: false,
        big_endian: false,
    };
    const EXPLICIT_BE: Self = Self {
        explicit: true,
        big_endian: true,
    };
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    s: Syntax,
}

impl<'a> Cursor<'a> {
    fn new(b: &'a [u8], s: Syntax) -> Self {
        Self { b, pos: 0, s }
    }

    fn remaining(&self) -> usize {
        self.b.len().saturating_sub(self.pos)
    }

    fn u16_at(&self, at: usize) -> Option<u16> {
        let b: [u8; 2] = self.b.get(at..at + 2)?.try_into().ok()?;
        Some(if self.s.big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        })
    }

    fn u32_at(&self, at: usize) -> Option<u32> {
        let b: [u8; 4] = self.b.get(at..at + 4)?.try_into().ok()?;
        Some(if self.s.big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    }

    fn tag(&mut self) -> Option<Tag> {
        let t = Tag(self.u16_at(self.pos)?, self.u16_at(self.pos + 2)?);
        self.pos += 4;
        Some(t)
    }

    /// An element header: tag, VR (from the stream, or the dictionary in implicit VR) and
    /// length; `None` where the stream is not readable as one (the parser then decides).
    fn header(&mut self) -> Option<(Tag, VR, u32)> {
        let tag = self.tag()?;
        if tag.group() == 0xFFFE {
            let len = self.u32_at(self.pos)?;
            self.pos += 4;
            return Some((tag, VR::UN, len));
        }
        if !self.s.explicit {
            let len = self.u32_at(self.pos)?;
            self.pos += 4;
            return Some((tag, dictionary_vr(tag), len));
        }
        let vr_bytes: [u8; 2] = self.b.get(self.pos..self.pos + 2)?.try_into().ok()?;
        // As the parser reads it: an unknown VR is UN, with a 4-byte length.
        let vr = VR::from_binary(vr_bytes).unwrap_or(VR::UN);
        self.pos += 2;
        let long = matches!(
            vr,
            VR::OB
                | VR::OD
                | VR::OF
                | VR::OL
                | VR::OV
                | VR::OW
                | VR::SQ
                | VR::SV
                | VR::UC
                | VR::UN
                | VR::UR
                | VR::UT
                | VR::UV
        );
        let len = if long {
            let l = self.u32_at(self.pos + 2)?;
            self.pos += 6;
            l
        } else {
            let l = u32::from(self.u16_at(self.pos)?);
            self.pos += 2;
            l
        };
        Some((tag, vr, len))
    }

    /// Refuses a defined length that runs past the end of the input.
    fn fits(&self, tag: Tag, len: u32) -> Result<(), GateError> {
        let remaining = self.remaining() as u64;
        if u64::from(len) > remaining {
            return Err(GateError::LengthPastEnd {
                tag: tag_text(tag),
                declared: u64::from(len),
                remaining,
            });
        }
        Ok(())
    }
}

fn dictionary_vr(tag: Tag) -> VR {
    match dicom_dictionary_std::StandardDataDictionary
        .by_tag(tag)
        .map(|e| e.vr())
    {
        Some(VirtualVr::Exact(vr)) => vr,
        _ => VR::UN,
    }
}

fn tag_text(tag: Tag) -> String {
    format!("({:04X},{:04X})", tag.group(), tag.element())
}

/// Walks the elements from the cursor to `end` (an item's end), to an item delimiter (an
/// undefined-length item), or to the end of the input (`end` None at the top). It reads the
/// stream as dicom-rs does (`dicom-parser` `dataset/read.rs`): any undefined length other than
/// encapsulated pixel data opens a sequence in the same syntax, and an item delimiter outside a
/// sequence is skipped; where it loses the stream it refuses rather than leave the parser to
/// allocate what it could not check.
fn walk(c: &mut Cursor<'_>, end: Option<usize>, depth: usize) -> Result<(), GateError> {
    loop {
        if end.is_some_and(|e| c.pos >= e) || c.remaining() == 0 {
            return Ok(());
        }
        let Some((tag, vr, len)) = c.header() else {
            // A header cut short: the parser fails reading it, before any value.
            return Ok(());
        };
        if tag == ITEM_END {
            if depth == 0 {
                continue;
            }
            return Ok(());
        }
        let undefined = len == UNDEFINED;
        if tag == PIXEL_DATA && undefined {
            // Encapsulated pixel data: fragments as items, not a sequence.
            skip_fragments(c)?;
            continue;
        }
        if vr == VR::SQ || undefined {
            if depth + 1 > MAX_DEPTH {
                return Err(GateError::TooDeep(tag_text(tag)));
            }
            let seq_end = (!undefined).then_some(c.pos.saturating_add(len as usize));
            items(c, seq_end, depth + 1, tag, len)?;
            continue;
        }
        c.fits(tag, len)?;
        let unit = value_unit(vr);
        if len % unit != 0 {
            return Err(GateError::Misaligned {
                tag: tag_text(tag),
                vr: vr.to_string().to_string(),
                len,
                unit,
            });
        }
        c.pos += len as usize;
    }
}

/// The size of one value of a binary VR. The parser reads `len / unit` values and leaves the
/// remainder unread, so a length that is not a multiple puts it out of step with the stream
/// (and it then reads lengths out of values).
fn value_unit(vr: VR) -> u32 {
    match vr {
        VR::US | VR::SS | VR::OW => 2,
        VR::AT | VR::UL | VR::SL | VR::FL | VR::OF | VR::OL => 4,
        VR::FD | VR::OD | VR::SV | VR::UV | VR::OV => 8,
        _ => 1,
    }
}

/// Walks a sequence's items; `end` is where a defined-length sequence ends.
fn items(
    c: &mut Cursor<'_>,
    end: Option<usize>,
    depth: usize,
    tag: Tag,
    len: u32,
) -> Result<(), GateError> {
    if end.is_some() {
        c.fits(tag, len)?;
    }
    loop {
        if end.is_some_and(|e| c.pos >= e) {
            return Ok(());
        }
        let at = c.pos;
        let (Some(item), Some(item_len)) = (c.tag(), c.u32_at(c.pos)) else {
            // Cut short inside a sequence: the parser fails reading the item header.
            return Ok(());
        };
        c.pos += 4;
        match item {
            SEQUENCE_END => return Ok(()),
            ITEM if item_len == UNDEFINED => walk(c, None, depth)?,
            ITEM => {
                c.fits(item, item_len)?;
                let item_end = c.pos + item_len as usize;
                walk(c, Some(item_end), depth)?;
                c.pos = item_end;
            }
            other => return Err(GateError::Lost(tag_text(other), at)),
        }
    }
}

/// Skips encapsulated pixel data fragments through their delimiter.
fn skip_fragments(c: &mut Cursor<'_>) -> Result<(), GateError> {
    loop {
        let at = c.pos;
        let (Some(tag), Some(len)) = (c.tag(), c.u32_at(c.pos)) else {
            return Ok(());
        };
        c.pos += 4;
        match tag {
            SEQUENCE_END => return Ok(()),
            ITEM if len != UNDEFINED => {
                c.fits(tag, len)?;
                c.pos += len as usize;
            }
            other => return Err(GateError::Lost(tag_text(other), at)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An implicit VR little endian data set nested `levels` deep in undefined-length
    /// sequences of items of undefined length.
    fn nested(levels: usize) -> Vec<u8> {
        let mut d = Vec::new();
        for _ in 0..levels {
            d.extend_from_slice(&[0x08, 0x00, 0x40, 0x11, 0xFF, 0xFF, 0xFF, 0xFF]);
            d.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        }
        for _ in 0..levels {
            d.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
            d.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        }
        d
    }

    #[test]
    fn nesting_is_accepted_up_to_the_limit_and_refused_past_it() {
        assert_eq!(check_dataset(&nested(MAX_DEPTH), IMPLICIT_LE), Ok(()));
        let e = check_dataset(&nested(100_000), IMPLICIT_LE).unwrap_err();
        assert!(matches!(e, GateError::TooDeep(_)), "{e}");
        assert!(e.to_string().contains("nested more than 32 deep"), "{e}");
    }

    #[test]
    fn defined_length_nesting_is_counted_too() {
        // Explicit VR LE: SQ of defined length holding one item of defined length, nested.
        fn level(inner: Vec<u8>) -> Vec<u8> {
            let mut item = vec![0xFE, 0xFF, 0x00, 0xE0];
            item.extend_from_slice(&(inner.len() as u32).to_le_bytes());
            item.extend_from_slice(&inner);
            let mut sq = vec![0x08, 0x00, 0x40, 0x11, b'S', b'Q', 0, 0];
            sq.extend_from_slice(&(item.len() as u32).to_le_bytes());
            sq.extend_from_slice(&item);
            sq
        }
        let mut d = Vec::new();
        for _ in 0..40 {
            d = level(d);
        }
        let e = check_dataset(&d, EXPLICIT_LE).unwrap_err();
        assert!(matches!(e, GateError::TooDeep(_)), "{e}");
        let mut shallow = Vec::new();
        for _ in 0..5 {
            shallow = level(shallow);
        }
        assert_eq!(check_dataset(&shallow, EXPLICIT_LE), Ok(()));
    }

    #[test]
    fn a_length_past_the_end_is_refused_before_anything_is_allocated() {
        // (0010,0010) PN, implicit: declares 0xFFFFFFF0 bytes, holds 4.
        let mut d = vec![0x10, 0x00, 0x10, 0x00, 0xF0, 0xFF, 0xFF, 0xFF];
        d.extend_from_slice(b"Doe^");
        let e = check_dataset(&d, IMPLICIT_LE).unwrap_err();
        assert_eq!(
            e,
            GateError::LengthPastEnd {
                tag: "(0010,0010)".into(),
                declared: 0xFFFF_FFF0,
                remaining: 4
            }
        );
        assert!(e.to_string().starts_with("the DICOM file cannot be parsed"));
    }

    #[test]
    fn a_binary_value_of_a_length_the_parser_would_misread_is_refused() {
        // (0018,0080) AT of 10 bytes: the parser reads two tags and is then 2 bytes out of step.
        let mut d = vec![0x18, 0x00, 0x80, 0x00, b'A', b'T', 10, 0];
        d.extend_from_slice(&[0; 10]);
        d.extend_from_slice(&[0x18, 0x00, 0x81, 0x00, b'D', b'S', 2, 0, b'1', b' ']);
        let e = check_dataset(&d, EXPLICIT_LE).unwrap_err();
        assert!(
            matches!(
                e,
                GateError::Misaligned {
                    unit: 4,
                    len: 10,
                    ..
                }
            ),
            "{e}"
        );
        d[6] = 8;
        d.drain(16..18);
        assert_eq!(check_dataset(&d, EXPLICIT_LE), Ok(()));
    }

    #[test]
    fn a_deflate_bomb_is_refused() {
        use std::io::Write;
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..(MAX_INFLATED >> 20) + 1 {
            enc.write_all(&zeros).unwrap();
        }
        let bomb = enc.finish().unwrap();
        assert!(bomb.len() < 4 << 20, "the bomb is small: {}", bomb.len());
        assert_eq!(
            check_dataset(&bomb, DEFLATED),
            Err(GateError::InflatesTooFar)
        );
    }
}
