#!/usr/bin/env python3
"""Writes the hand-made hostile DICOM files kept under fuzz/regressions/deid/ (the shapes of
tests/hostile.rs and shared/src/gate.rs, small): nesting past the gate's depth cap in every
encoding the gate walks, and declared lengths far past the end of the input.

Also two DICOMDIRs for fuzz/regressions/dicomdir/: records that lead out of the media folder,
and a nested one.

Usage: fuzz/make_hostile.py [OUTDIR]   (default: fuzz/regressions next to this script; the
       files go to OUTDIR/deid and OUTDIR/dicomdir)

Standard library only; the output is deterministic, so re-running it changes nothing.
"""
import os
import struct
import sys
import zlib

CR = b"1.2.840.10008.5.1.4.1.1.1"
IMPLICIT = b"1.2.840.10008.1.2"
EXPLICIT = b"1.2.840.10008.1.2.1"
BIG = b"1.2.840.10008.1.2.2"
DEFLATED = b"1.2.840.10008.1.2.1.99"
JPEG_BASELINE = b"1.2.840.10008.1.2.4.50"
UNDEFINED = 0xFFFFFFFF


def pad(v):
    return v + b"\0" if len(v) % 2 else v


def short(tag, vr, value, big=False):
    """An explicit VR element with a 2-byte length."""
    e = ">" if big else "<"
    value = pad(value)
    return struct.pack(e + "HH", *tag) + vr + struct.pack(e + "H", len(value)) + value


def long(tag, vr, value, length=None, big=False):
    """An explicit VR element with a 4-byte length (OB, SQ, UN, ...)."""
    e = ">" if big else "<"
    n = len(value) if length is None else length
    return struct.pack(e + "HH", *tag) + vr + b"\0\0" + struct.pack(e + "I", n) + value


def implicit(tag, value, length=None):
    value = pad(value)
    n = len(value) if length is None else length
    return struct.pack("<HHI", *tag, n) + value


def part10(ts, instance, meta_extra=b""):
    """Preamble, DICM and a file meta group naming `ts`."""
    meta = long((0x0002, 0x0001), b"OB", b"\0\1")
    meta += short((0x0002, 0x0002), b"UI", CR)
    meta += short((0x0002, 0x0003), b"UI", instance)
    meta += short((0x0002, 0x0010), b"UI", ts)
    meta += short((0x0002, 0x0012), b"UI", b"1.2.826.0.1.3680043.10.543")
    meta += meta_extra
    return (
        b"\0" * 128
        + b"DICM"
        + short((0x0002, 0x0000), b"UL", struct.pack("<I", len(meta)))
        + meta
    )


def cr_head_implicit(instance):
    return (
        implicit((0x0008, 0x0016), CR)
        + implicit((0x0008, 0x0018), instance)
        + implicit((0x0008, 0x0060), b"CR")
        + implicit((0x0020, 0x000D), b"2.25.4242")
    )


def cr_head_explicit(instance, big=False):
    return (
        short((0x0008, 0x0016), b"UI", CR, big)
        + short((0x0008, 0x0018), b"UI", instance, big)
        + short((0x0008, 0x0060), b"CS", b"CR", big)
        + short((0x0020, 0x000D), b"UI", b"2.25.4242", big)
    )


def nested_undefined(levels, big=False, sq_header=None, inner_header=None):
    """`levels` undefined-length sequences (Content Sequence, 0040,A730) of undefined-length
    items; `inner_header` for the levels below the first (default: `sq_header`)."""
    e = ">" if big else "<"
    sq = sq_header or struct.pack("<HHI", 0x0040, 0xA730, UNDEFINED)
    inner = inner_header or sq
    item = struct.pack(e + "HHI", 0xFFFE, 0xE000, UNDEFINED)
    item_end = struct.pack(e + "HHI", 0xFFFE, 0xE00D, 0)
    seq_end = struct.pack(e + "HHI", 0xFFFE, 0xE0DD, 0)
    return sq + item + (inner + item) * (levels - 1) + (item_end + seq_end) * levels


def nested_defined(levels):
    """Explicit VR LE: defined-length SQ holding one defined-length item, `levels` deep."""
    d = b""
    for _ in range(levels):
        item = struct.pack("<HHI", 0xFFFE, 0xE000, len(d)) + d
        d = long((0x0040, 0xA730), b"SQ", item)
    return d


def files():
    f = {}
    # About 2,000 levels: what overflowed a 2 MiB worker stack before the gate.
    f["hostile-nested-implicit-2000.dcm"] = part10(IMPLICIT, b"2.25.1001") + cr_head_implicit(
        b"2.25.1001"
    ) + nested_undefined(2000)
    # Explicit VR: SQ of undefined length.
    sq = struct.pack("<HH", 0x0040, 0xA730) + b"SQ\0\0" + struct.pack("<I", UNDEFINED)
    f["hostile-nested-explicit-100.dcm"] = part10(EXPLICIT, b"2.25.1003") + cr_head_explicit(
        b"2.25.1003"
    ) + nested_undefined(100, sq_header=sq)
    # Explicit VR big endian.
    sq_be = struct.pack(">HH", 0x0040, 0xA730) + b"SQ\0\0" + struct.pack(">I", UNDEFINED)
    f["hostile-nested-big-endian-100.dcm"] = part10(BIG, b"2.25.1004") + cr_head_explicit(
        b"2.25.1004", big=True
    ) + nested_undefined(100, big=True, sq_header=sq_be)
    # UN of undefined length: implicit VR inside (PS3.5 6.2.2), where the private element
    # nests again with an undefined length.
    un = struct.pack("<HH", 0x0041, 0x1010) + b"UN\0\0" + struct.pack("<I", UNDEFINED)
    un_inner = struct.pack("<HHI", 0x0041, 0x1010, UNDEFINED)
    f["hostile-nested-un-100.dcm"] = part10(EXPLICIT, b"2.25.1005") + cr_head_explicit(
        b"2.25.1005"
    ) + short((0x0041, 0x0010), b"LO", b"FUZZ") + nested_undefined(
        100, sq_header=un, inner_header=un_inner
    )
    # Defined lengths all the way down, 40 deep (past the cap of 32).
    f["hostile-nested-defined-40.dcm"] = part10(EXPLICIT, b"2.25.1006") + cr_head_explicit(
        b"2.25.1006"
    ) + nested_defined(40)
    # Nesting hidden in a deflated data set (the gate inflates, then walks).
    body = cr_head_explicit(b"2.25.1007") + nested_undefined(1000, sq_header=sq)
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    f["hostile-nested-deflated-1000.dcm"] = part10(DEFLATED, b"2.25.1007") + z.compress(
        body
    ) + z.flush()
    # Person Name (0040,A123) declares 0xFFFFFFF0 bytes (as PatientName in tests/hostile.rs).
    f["hostile-length-bomb.dcm"] = part10(IMPLICIT, b"2.25.1002") + cr_head_implicit(
        b"2.25.1002"
    ) + struct.pack("<HHI", 0x0040, 0xA123, 0xFFFFFFF0) + b"Doe^Jane"
    # The same inside a defined-length item of a defined-length sequence that fits.
    inner = struct.pack("<HHI", 0x0010, 0x0010, 0xFFFFFFF0) + b"Doe^Jane"
    item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
    f["hostile-length-bomb-in-item.dcm"] = part10(IMPLICIT, b"2.25.1008") + cr_head_implicit(
        b"2.25.1008"
    ) + struct.pack("<HHI", 0x0040, 0xA730, len(item)) + item
    # An OB element declaring 0xFFFFFFF0 bytes in the file meta group.
    f["hostile-length-bomb-meta.dcm"] = part10(
        EXPLICIT, b"2.25.1009", long((0x0002, 0x0102), b"OB", b"\0\0", length=0xFFFFFFF0)
    )
    # Encapsulated pixel data whose first fragment declares 0xFFFFFFF0 bytes.
    pixel = (
        struct.pack("<HH", 0x7FE0, 0x0010) + b"OB\0\0" + struct.pack("<I", UNDEFINED)
        + struct.pack("<HHI", 0xFFFE, 0xE000, 0)
        + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFF0) + b"\xff\xd8\xff\xdb"
    )
    f["hostile-length-bomb-fragment.dcm"] = part10(JPEG_BASELINE, b"2.25.1010") + cr_head_explicit(
        b"2.25.1010"
    ) + pixel
    return f


MEDIA_DIRECTORY = b"1.2.840.10008.1.3.10"


def dicomdir(file_ids, extra=b""):
    """A DICOMDIR (explicit VR LE) whose Directory Record Sequence holds one IMAGE record per
    Referenced File ID (components joined by a backslash), then `extra` data elements."""
    meta = long((0x0002, 0x0001), b"OB", b"\0\1")
    meta += short((0x0002, 0x0002), b"UI", MEDIA_DIRECTORY)
    meta += short((0x0002, 0x0003), b"UI", b"2.25.2001")
    meta += short((0x0002, 0x0010), b"UI", EXPLICIT)
    meta += short((0x0002, 0x0012), b"UI", b"1.2.826.0.1.3680043.10.543")
    head = (
        b"\0" * 128
        + b"DICM"
        + short((0x0002, 0x0000), b"UL", struct.pack("<I", len(meta)))
        + meta
    )
    items = b""
    for fid in file_ids:
        body = short((0x0004, 0x1430), b"CS", b"IMAGE") + short((0x0004, 0x1500), b"CS", fid)
        items += struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body
    data = short((0x0004, 0x1130), b"CS", b"FUZZ")
    data += long((0x0004, 0x1220), b"SQ", items)
    return head + data + extra


def dicomdirs():
    """For the media folder of fuzz/src/driver.rs (make_media): IMAGES/IM0001 and IM0002 inside,
    ../outside beside it, LINK a link to that."""
    f = {}
    # Every way out of the media folder next to the files inside; only the inside ones may be
    # handed out.
    f["hostile-escapes-DICOMDIR"] = dicomdir(
        [b"IMAGES\\IM0001", b"..\\outside", b"LINK", b"/etc/passwd", b"IMAGES\\..\\..\\outside",
         b"IM0002", b"MISSING"]
    )
    sq = struct.pack("<HH", 0x0040, 0xA730) + b"SQ\0\0" + struct.pack("<I", UNDEFINED)
    f["hostile-nested-DICOMDIR"] = dicomdir([b"IM0002"], nested_undefined(100, sq_header=sq))
    return f


def write(out, named):
    os.makedirs(out, exist_ok=True)
    for name, data in sorted(named.items()):
        with open(os.path.join(out, name), "wb") as fh:
            fh.write(data)
        print(f"{len(data):8d}  {os.path.join(out, name)}")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "regressions")
    write(os.path.join(out, "deid"), files())
    write(os.path.join(out, "dicomdir"), dicomdirs())


if __name__ == "__main__":
    main()
