//! Hostile DICOM files, built by hand: what a careless or hostile sender can make.

use std::path::Path;

pub const CR: &str = "1.2.840.10008.5.1.4.1.1.1";

/// An explicit VR little endian element with a 2-byte length.
pub fn short(tag: (u16, u16), vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
    let mut v = value.to_vec();
    if v.len() % 2 == 1 {
        v.push(0);
    }
    let mut e = Vec::new();
    e.extend_from_slice(&tag.0.to_le_bytes());
    e.extend_from_slice(&tag.1.to_le_bytes());
    e.extend_from_slice(vr);
    e.extend_from_slice(&(v.len() as u16).to_le_bytes());
    e.extend_from_slice(&v);
    e
}

/// An implicit VR little endian element.
pub fn implicit(tag: (u16, u16), value: &[u8]) -> Vec<u8> {
    let mut v = value.to_vec();
    if v.len() % 2 == 1 {
        v.push(0);
    }
    let mut e = Vec::new();
    e.extend_from_slice(&tag.0.to_le_bytes());
    e.extend_from_slice(&tag.1.to_le_bytes());
    e.extend_from_slice(&(v.len() as u32).to_le_bytes());
    e.extend_from_slice(&v);
    e
}

/// Preamble, `DICM`, a meta group naming implicit VR little endian, and the start of a CR data
/// set; the caller appends the rest.
pub fn part10_head(instance: &str) -> Vec<u8> {
    let mut meta = Vec::new();
    meta.extend_from_slice(&[0x02, 0x00, 0x01, 0x00, b'O', b'B', 0, 0, 2, 0, 0, 0, 0, 1]);
    meta.extend(short((0x0002, 0x0002), b"UI", CR.as_bytes()));
    meta.extend(short((0x0002, 0x0003), b"UI", instance.as_bytes()));
    meta.extend(short((0x0002, 0x0010), b"UI", b"1.2.840.10008.1.2"));
    meta.extend(short(
        (0x0002, 0x0012),
        b"UI",
        b"1.2.826.0.1.3680043.10.543",
    ));
    let mut f = vec![0u8; 128];
    f.extend_from_slice(b"DICM");
    f.extend(short(
        (0x0002, 0x0000),
        b"UL",
        &(meta.len() as u32).to_le_bytes(),
    ));
    f.extend(meta);
    f.extend(implicit((0x0008, 0x0016), CR.as_bytes()));
    f.extend(implicit((0x0008, 0x0018), instance.as_bytes()));
    f.extend(implicit((0x0008, 0x0060), b"CR"));
    f.extend(implicit((0x0020, 0x000D), b"2.25.4242"));
    f
}

/// About 100,000 levels of undefined-length sequences: 1.6 MB that overflowed any stack.
pub fn deeply_nested() -> Vec<u8> {
    let mut f = part10_head("2.25.1001");
    let levels = 100_000;
    for _ in 0..levels {
        f.extend_from_slice(&[0x08, 0x00, 0x40, 0x11, 0xFF, 0xFF, 0xFF, 0xFF]);
        f.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
    }
    for _ in 0..levels {
        f.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        f.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
    }
    f
}

/// A few hundred bytes whose PatientName declares 0xFFFFFFF0 bytes.
pub fn length_bomb() -> Vec<u8> {
    let mut f = part10_head("2.25.1002");
    f.extend_from_slice(&[0x10, 0x00, 0x10, 0x00, 0xF0, 0xFF, 0xFF, 0xFF]);
    f.extend_from_slice(b"Doe^Jane");
    f
}

/// A few MB whose deflated data set inflates past 1 GiB (zeros), in a file whose meta group
/// names Deflated Explicit VR Little Endian.
pub fn deflate_bomb() -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..1025 {
        enc.write_all(&zeros).unwrap();
    }
    let data = enc.finish().unwrap();
    let mut meta = Vec::new();
    meta.extend_from_slice(&[0x02, 0x00, 0x01, 0x00, b'O', b'B', 0, 0, 2, 0, 0, 0, 0, 1]);
    meta.extend(short((0x0002, 0x0002), b"UI", CR.as_bytes()));
    meta.extend(short((0x0002, 0x0003), b"UI", b"2.25.1004"));
    meta.extend(short((0x0002, 0x0010), b"UI", b"1.2.840.10008.1.2.1.99"));
    let mut f = vec![0u8; 128];
    f.extend_from_slice(b"DICM");
    f.extend(short(
        (0x0002, 0x0000),
        b"UL",
        &(meta.len() as u32).to_le_bytes(),
    ));
    f.extend(meta);
    f.extend(data);
    f
}

/// The data set of a Part 10 file made by this module (after the meta group).
pub fn data_set(part10: &[u8]) -> &[u8] {
    let meta_len = u32::from_le_bytes(part10[140..144].try_into().unwrap()) as usize;
    &part10[144 + meta_len..]
}

/// A real radiograph whose header claims 60,000 x 60,000 pixels over its own small pixel data,
/// with SOP Instance UID `instance`.
pub fn giant_header(dst: &Path, instance: &str) {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    crate::common::edit(
        &crate::common::fixtures().join("RG3_UNCR.dcm"),
        dst,
        |obj| {
            for tag in [tags::ROWS, tags::COLUMNS] {
                obj.put(DataElement::new(
                    tag,
                    VR::US,
                    PrimitiveValue::from(60000_u16),
                ));
            }
            obj.put(DataElement::new(
                tags::SOP_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from(instance),
            ));
            obj.update_meta(|m| m.media_storage_sop_instance_uid = instance.to_string());
        },
    );
}

/// A real radiograph with its own SOP Instance UID (a distinct input for each door).
pub fn radiograph(dst: &Path, instance: &str) {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    crate::common::edit(
        &crate::common::fixtures().join("RG3_UNCR.dcm"),
        dst,
        |obj| {
            obj.put(DataElement::new(
                tags::SOP_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from(instance),
            ));
            obj.update_meta(|m| m.media_storage_sop_instance_uid = instance.to_string());
        },
    );
}
