#!/usr/bin/env python3
"""Build the de-identification benchmark corpus (used by scripts/bench-deid.sh).

Usage: make_corpus.py FIXTURES_DIR OUT_DIR [COPIES]

Writes COPIES (default 100) copies each of RG3_UNCR.dcm and cat.dcm into OUT_DIR, every copy
with new SOP / Series / Study Instance UIDs (and the matching Media Storage SOP Instance UID), so
that no two files of the corpus share an instance. The UIDs are derived from the copy number,
so the corpus is the same on every run. Prints the file count and total bytes.

Needs pydicom (pinned by the caller's venv).
"""

import os
import sys

import pydicom
from pydicom.uid import generate_uid

SOURCES = ("RG3_UNCR.dcm", "cat.dcm")


def main() -> int:
    if len(sys.argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    fixtures, out = sys.argv[1], sys.argv[2]
    copies = int(sys.argv[3]) if len(sys.argv) == 4 else 100
    os.makedirs(out, exist_ok=True)
    total = 0
    count = 0
    for name in SOURCES:
        ds = pydicom.dcmread(os.path.join(fixtures, name))
        stem = os.path.splitext(name)[0]
        for i in range(copies):
            seed = [stem, str(i)]
            study = generate_uid(entropy_srcs=seed + ["study"])
            series = generate_uid(entropy_srcs=seed + ["series"])
            sop = generate_uid(entropy_srcs=seed + ["sop"])
            ds.StudyInstanceUID = study
            ds.SeriesInstanceUID = series
            ds.SOPInstanceUID = sop
            ds.file_meta.MediaStorageSOPInstanceUID = sop
            path = os.path.join(out, f"{stem}_{i:03d}.dcm")
            ds.save_as(path, enforce_file_format=True)
            total += os.path.getsize(path)
            count += 1
    print(f"{count} files, {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
