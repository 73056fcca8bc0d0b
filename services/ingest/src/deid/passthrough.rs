//! De-identification that never decodes the pixel data.
//!
//! A radiograph is a few kilobytes of attributes and megabytes of pixels, and the Basic Profile
//! changes only the attributes. [`Source::open`] walks the file's element headers to find the
//! top-level Pixel Data element, parses everything around it, and leaves the pixel data in the
//! file; [`Passage::write`] writes the de-identified attributes around the original pixel bytes.
//! When both ends are files the kernel copies those bytes (`copy_file_range`), so memory is the
//! attributes plus nothing that grows with the image, and a 50 MB radiograph costs what a 5 MB
//! one does.
//!
//! The whole file is parsed instead (the pixel data in memory) when the layout cannot be walked:
//! a deflated transfer syntax, a header the walker does not understand (the full parser's error
//! is then the one reported), no pixel data; and when the pixels must change (a burned-in text
//! rule applies).

use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};

use dicom_core::header::Header;
use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_encoding::{Codec, TransferSyntaxIndex};
use dicom_object::{DefaultDicomObject, InMemDicomObject};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use fracture_shared::error::StageError;
use fracture_shared::pixels;

use super::{deidentify, DeidPolicy, Originals};
use crate::burned_in;

/// Where the top-level Pixel Data element lies in the file: its header and value, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: u64,
    pub end: u64,
}

/// A DICOM file read for de-identification: its attributes parsed, its pixel data (when
/// [`Source::passes_through`]) still in the file.
pub struct Source<R> {
    src: R,
    obj: DefaultDicomObject,
    pixels: Option<Span>,
}

fn unreadable(e: io::Error) -> StageError {
    StageError::data(format!("cannot read the file: {}", e.kind()))
}

impl<R: Read + Seek> Source<R> {
    /// Reads the attributes of the DICOM file in `src`. Errors are the ones a person can act on:
    /// an empty file, not DICOM, a file the parser cannot read (with the parser's reason).
    pub fn open(mut src: R) -> Result<Self, StageError> {
        let len = src.seek(SeekFrom::End(0)).map_err(unreadable)?;
        if len == 0 {
            return Err(StageError::data("empty file (0 bytes)"));
        }
        if let Some(layout) = locate(&mut src, len) {
            if let Some(obj) = parse_around(&mut src, &layout, len) {
                return Ok(Self {
                    src,
                    obj,
                    pixels: Some(layout.pixels),
                });
            }
        }
        let obj = read_whole(&mut src)?;
        Ok(Self {
            src,
            obj,
            pixels: None,
        })
    }

    /// The attributes (without the pixel data when it passes through).
    pub fn object(&self) -> &DefaultDicomObject {
        &self.obj
    }

    /// Whether the pixel data stays in the file and is copied as bytes.
    pub fn passes_through(&self) -> bool {
        self.pixels.is_some()
    }

    /// Where the pixel data element lies in the file, when it passes through.
    pub fn pixel_span(&self) -> Option<Span> {
        self.pixels
    }

    /// Parses the pixel data too, for a step that changes pixels.
    pub fn load_pixels(&mut self) -> Result<(), StageError> {
        if self.pixels.take().is_some() {
            self.obj = read_whole(&mut self.src)?;
        }
        Ok(())
    }

    /// The attributes, and what writes the pixel data back out.
    pub fn into_parts(self) -> (DefaultDicomObject, Passage<R>) {
        (
            self.obj,
            Passage {
                src: self.src,
                pixels: self.pixels,
            },
        )
    }
}

/// The pixel data of a [`Source`], to be written after the de-identified attributes.
pub struct Passage<R> {
    src: R,
    pixels: Option<Span>,
}

fn write_failed(e: impl std::fmt::Display) -> StageError {
    StageError::internal(format!("cannot write the de-identified copy: {e}"))
}

impl<R: Read + Seek> Passage<R> {
    /// Writes `clean` (the de-identified attributes of this source) as a Part 10 file: a zero
    /// preamble, the file meta group, the data set in the source's transfer syntax, and the
    /// original pixel data element byte for byte where it belongs in tag order.
    pub fn write<W: Write>(
        &mut self,
        clean: &DefaultDicomObject,
        out: &mut W,
    ) -> Result<(), StageError> {
        let uid = clean.meta().transfer_syntax();
        let ts = TransferSyntaxRegistry
            .get(uid)
            .ok_or_else(|| write_failed(format!("unknown transfer syntax {uid}")))?;
        out.write_all(&[0u8; 128]).map_err(write_failed)?;
        out.write_all(b"DICM").map_err(write_failed)?;
        clean.meta().write(&mut *out).map_err(write_failed)?;
        let Some(span) = self.pixels else {
            return clean
                .write_dataset_with_ts(&mut *out, ts)
                .map_err(write_failed);
        };
        if clean.element(tags::PIXEL_DATA).is_ok() {
            return Err(write_failed(
                "the pixel data was both parsed and passed through",
            ));
        }
        let (low, high): (Vec<_>, Vec<_>) = clean
            .iter()
            .cloned()
            .partition(|e| e.tag() < tags::PIXEL_DATA);
        InMemDicomObject::from_element_iter(low)
            .write_dataset_with_ts(&mut *out, ts)
            .map_err(write_failed)?;
        self.src
            .seek(SeekFrom::Start(span.start))
            .map_err(unreadable)?;
        let want = span.end - span.start;
        let copied = io::copy(&mut (&mut self.src).take(want), out)
            .map_err(|e| StageError::data(format!("cannot copy the pixel data: {}", e.kind())))?;
        if copied != want {
            return Err(StageError::data(
                "the file became shorter while it was read; send it again once it is complete",
            ));
        }
        if !high.is_empty() {
            InMemDicomObject::from_element_iter(high)
                .write_dataset_with_ts(&mut *out, ts)
                .map_err(write_failed)?;
        }
        Ok(())
    }
}

/// A file de-identified at the edge: the clean attributes, the original identifiers (for the
/// linkage table), whether pixels were cleaned, and the pixel data still to write.
pub struct Cleaned<R> {
    pub object: DefaultDicomObject,
    pub originals: Originals,
    pub pixels_cleaned: bool,
    pub passage: Passage<R>,
}

/// The edge's whole de-identification of one file: burned-in text rules (the pixels are parsed
/// only when a rule blacks some out, and an image that declares burned-in text no rule covers
/// is refused), then the Basic Profile.
pub fn clean<R: Read + Seek>(
    mut src: Source<R>,
    policy: &DeidPolicy,
) -> Result<Cleaned<R>, StageError> {
    // Before any rule loads or decodes the pixels the header describes.
    fracture_shared::pixels::check_size(src.object(), policy.max_pixels)?;
    if burned_in::rule_for(src.object(), &policy.pixel_rules)?.is_some() {
        src.load_pixels()?;
    }
    let (mut obj, passage) = src.into_parts();
    let pixels_cleaned = burned_in::apply(&mut obj, &policy.pixel_rules)?;
    let (mut object, originals) = deidentify(obj, policy)?;
    if pixels_cleaned {
        burned_in::mark_cleaned(&mut object);
    }
    Ok(Cleaned {
        object,
        originals,
        pixels_cleaned,
        passage,
    })
}

fn read_whole<R: Read + Seek>(src: &mut R) -> Result<DefaultDicomObject, StageError> {
    src.seek(SeekFrom::Start(0)).map_err(unreadable)?;
    let mut bytes = Vec::new();
    src.read_to_end(&mut bytes).map_err(unreadable)?;
    pixels::read_object(&bytes)
}

/// What the walk found.
struct Layout {
    transfer_syntax: String,
    pixels: Span,
}

/// Parses the attributes before and after the pixel data; `None` when they do not parse on their
/// own (the caller parses the whole file and reports its error).
fn parse_around<R: Read + Seek>(
    src: &mut R,
    layout: &Layout,
    len: u64,
) -> Option<DefaultDicomObject> {
    let read = |src: &mut R, from: u64, to: u64| -> Option<Vec<u8>> {
        src.seek(SeekFrom::Start(from)).ok()?;
        let mut v = vec![0u8; usize::try_from(to - from).ok()?];
        src.read_exact(&mut v).ok()?;
        Some(v)
    };
    let head = read(src, 0, layout.pixels.start)?;
    let mut obj = pixels::read_object(&head).ok()?;
    if obj.meta().transfer_syntax().trim_end_matches(['\0', ' ']) != layout.transfer_syntax
        || obj.element(tags::PIXEL_DATA).is_ok()
    {
        return None;
    }
    if layout.pixels.end < len {
        let tail = read(src, layout.pixels.end, len)?;
        fracture_shared::gate::check_dataset(&tail, &layout.transfer_syntax).ok()?;
        let ts = TransferSyntaxRegistry.get(&layout.transfer_syntax)?;
        let rest = InMemDicomObject::read_dataset_with_ts(io::Cursor::new(tail), ts).ok()?;
        for e in rest {
            if e.tag() <= tags::PIXEL_DATA {
                return None;
            }
            obj.put(e);
        }
    }
    Some(obj)
}

/// Value representations whose explicit-VR header has a 4-byte length (PS3.5 7.1.2).
const LONG_VRS: &[&[u8; 2]] = &[
    b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV",
];
const SHORT_VRS: &[&[u8; 2]] = &[
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN",
    b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
];
const UNDEFINED: u32 = u32::MAX;
const ITEM: Tag = Tag(0xFFFE, 0xE000);
const ITEM_END: Tag = Tag(0xFFFE, 0xE00D);
const SEQUENCE_END: Tag = Tag(0xFFFE, 0xE0DD);
/// Deeper nesting than any real object has: the walk gives up (the full parser decides).
const MAX_DEPTH: usize = 32;

/// How the elements at one level are encoded.
#[derive(Clone, Copy)]
struct Syntax {
    explicit: bool,
    big_endian: bool,
}

/// Reads element headers and skips values, keeping the position.
struct Walker<'a, R: Read + Seek> {
    r: BufReader<&'a mut R>,
    pos: u64,
    len: u64,
}

/// Why the walk stopped short: the caller parses the whole file.
struct Lost;

impl<R: Read + Seek> Walker<'_, R> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], Lost> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).map_err(|_| Lost)?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u16(&mut self, s: Syntax) -> Result<u16, Lost> {
        let b = self.bytes::<2>()?;
        Ok(if s.big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        })
    }

    fn u32(&mut self, s: Syntax) -> Result<u32, Lost> {
        let b = self.bytes::<4>()?;
        Ok(if s.big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    }

    fn tag(&mut self, s: Syntax) -> Result<Tag, Lost> {
        Ok(Tag(self.u16(s)?, self.u16(s)?))
    }

    fn skip(&mut self, n: u64) -> Result<(), Lost> {
        if self.pos + n > self.len {
            return Err(Lost);
        }
        self.r
            .seek_relative(i64::try_from(n).map_err(|_| Lost)?)
            .map_err(|_| Lost)?;
        self.pos += n;
        Ok(())
    }

    /// The rest of an element header after its tag: the VR (explicit syntaxes) and the length.
    fn vr_and_length(&mut self, s: Syntax) -> Result<(Option<[u8; 2]>, u32), Lost> {
        if !s.explicit {
            return Ok((None, self.u32(s)?));
        }
        let vr = self.bytes::<2>()?;
        if LONG_VRS.contains(&&vr) {
            self.bytes::<2>()?;
            Ok((Some(vr), self.u32(s)?))
        } else if SHORT_VRS.contains(&&vr) {
            Ok((Some(vr), u32::from(self.u16(s)?)))
        } else {
            Err(Lost)
        }
    }

    /// Skips an element's value after its header.
    fn skip_value(
        &mut self,
        s: Syntax,
        vr: Option<[u8; 2]>,
        length: u32,
        depth: usize,
    ) -> Result<(), Lost> {
        if length != UNDEFINED {
            return self.skip(u64::from(length));
        }
        // Undefined length: a sequence (or, explicit, SQ or UN; UN holds implicit little endian).
        let inner = match vr {
            None => s,
            Some(v) if &v == b"SQ" => s,
            Some(v) if &v == b"UN" => Syntax {
                explicit: false,
                big_endian: false,
            },
            Some(_) => return Err(Lost),
        };
        self.skip_items(inner, depth + 1)
    }

    /// Skips the items of an undefined-length sequence, through its delimiter.
    fn skip_items(&mut self, s: Syntax, depth: usize) -> Result<(), Lost> {
        if depth > MAX_DEPTH {
            return Err(Lost);
        }
        loop {
            let tag = self.tag(s)?;
            let length = self.u32(s)?;
            match tag {
                SEQUENCE_END => return Ok(()),
                ITEM if length == UNDEFINED => self.skip_item_elements(s, depth)?,
                ITEM => self.skip(u64::from(length))?,
                _ => return Err(Lost),
            }
        }
    }

    /// Skips the elements of an undefined-length item, through its delimiter.
    fn skip_item_elements(&mut self, s: Syntax, depth: usize) -> Result<(), Lost> {
        loop {
            let tag = self.tag(s)?;
            if tag == ITEM_END {
                self.u32(s)?;
                return Ok(());
            }
            if tag.group() == 0xFFFE {
                return Err(Lost);
            }
            let (vr, length) = self.vr_and_length(s)?;
            self.skip_value(s, vr, length, depth)?;
        }
    }

    /// Skips encapsulated pixel data (fragments as items) through its delimiter.
    fn skip_fragments(&mut self, s: Syntax) -> Result<(), Lost> {
        loop {
            let tag = self.tag(s)?;
            let length = self.u32(s)?;
            match tag {
                SEQUENCE_END => return Ok(()),
                ITEM if length != UNDEFINED => self.skip(u64::from(length))?,
                _ => return Err(Lost),
            }
        }
    }
}

/// Walks the element headers of the file to the top-level Pixel Data. `None` when there is
/// none, or the walk cannot be trusted (the caller then parses the whole file).
fn locate<R: Read + Seek>(src: &mut R, len: u64) -> Option<Layout> {
    src.seek(SeekFrom::Start(0)).ok()?;
    let mut w = Walker {
        r: BufReader::with_capacity(16 * 1024, src),
        pos: 0,
        len,
    };
    walk(&mut w).ok().flatten()
}

fn walk<R: Read + Seek>(w: &mut Walker<'_, R>) -> Result<Option<Layout>, Lost> {
    let le = Syntax {
        explicit: true,
        big_endian: false,
    };
    // The magic code after a 128-byte preamble, or (as `pixels::read_object` accepts) first.
    let head = w.r.fill_buf().map_err(|_| Lost)?;
    let meta_start = if head.len() >= 132 && &head[128..132] == b"DICM" {
        132
    } else if head.len() >= 4 && &head[..4] == b"DICM" {
        4
    } else {
        return Err(Lost);
    };
    w.skip(meta_start)?;
    // The file meta group: explicit VR little endian, led by its group length.
    if w.tag(le)? != Tag(0x0002, 0x0000) || w.vr_and_length(le)? != (Some(*b"UL"), 4) {
        return Err(Lost);
    }
    let group_length = w.u32(le)?;
    let data_start = w.pos + u64::from(group_length);
    let mut transfer_syntax = None;
    while w.pos < data_start {
        let tag = w.tag(le)?;
        if tag.group() != 0x0002 {
            return Err(Lost);
        }
        let (vr, length) = w.vr_and_length(le)?;
        if tag == tags::TRANSFER_SYNTAX_UID && length < 256 {
            let mut v = vec![0u8; length as usize];
            w.r.read_exact(&mut v).map_err(|_| Lost)?;
            w.pos += u64::from(length);
            let uid = String::from_utf8(v).map_err(|_| Lost)?;
            transfer_syntax = Some(uid.trim_end_matches(['\0', ' ']).to_string());
        } else {
            w.skip_value(le, vr, length, 0)?;
        }
    }
    if w.pos != data_start {
        return Err(Lost);
    }
    let transfer_syntax = transfer_syntax.ok_or(Lost)?;
    let ts = TransferSyntaxRegistry.get(&transfer_syntax).ok_or(Lost)?;
    // A deflated data set is one compressed stream: nothing to pass through.
    if matches!(ts.codec(), Codec::Dataset(_)) {
        return Err(Lost);
    }
    let s = match transfer_syntax.as_str() {
        "1.2.840.10008.1.2" => Syntax {
            explicit: false,
            big_endian: false,
        },
        "1.2.840.10008.1.2.2" => Syntax {
            explicit: true,
            big_endian: true,
        },
        _ => le,
    };
    // The data set, element by element, to the pixel data.
    let mut last = Tag(0, 0);
    while w.pos < w.len {
        let start = w.pos;
        let tag = w.tag(s)?;
        // Out of order or a delimiter at the top level: not something to pass through.
        if tag < last || tag.group() == 0xFFFE || tag.group() == 0x0002 {
            return Err(Lost);
        }
        last = tag;
        if tag > tags::PIXEL_DATA {
            return Ok(None);
        }
        let (vr, length) = w.vr_and_length(s)?;
        if tag == tags::PIXEL_DATA {
            if length == UNDEFINED {
                w.skip_fragments(s)?;
            } else {
                w.skip(u64::from(length))?;
            }
            return Ok(Some(Layout {
                transfer_syntax,
                pixels: Span { start, end: w.pos },
            }));
        }
        w.skip_value(s, vr, length, 0)?;
    }
    Ok(None)
}
