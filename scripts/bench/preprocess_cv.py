#!/usr/bin/env python3
"""The pre-processing of models/src/transform.rs done with OpenCV + numpy: the benchmark's peer.

Same steps, same settings (crop threshold 0.05, 1024 x 1024, 9 x 9 Gaussian with sigma 2):
  crop     per row and column, count pixels above the threshold; a line is content when its count
           exceeds max(2, 0.5% of its length, 5% of the busiest line's); keep from the first to the
           last run of content lines that is at least 5% of the side long and holds at least 10%
           of the heaviest run's count (else the heaviest run; with no content, everything)
  resize   cv2.resize with fx = fy = min(N / w, N / h): INTER_AREA when shrinking, INTER_LINEAR
           when enlarging; top-left on a zero N x N canvas
  LCN      x - global mean (LCN ignores offsets; it keeps the variance's cancellation small),
           local mean and local mean of squares by cv2.GaussianBlur, std = sqrt(max(0, E[x^2] -
           E[x]^2)), (x - mean) / max(mean std, std), divided by its largest magnitude
  border   "reflect101": OpenCV's default (mirror without repeating the edge pixel);
           "normalised": zeros outside, divided by the blurred all-ones image, which is what the
           Rust transform does (a window cut by the edge is renormalised over what is inside)

Usage (time and synth print one JSON line, agree and report Markdown):
  preprocess_cv.py synth OUT.dcm                    the synthetic 3000 x 2500 16-bit radiograph
  preprocess_cv.py time IN.npy|IN.dcm ITERS [--threads N] [--border B]
        ms per image; .npy (the [0, 1] float32 image the Rust side decoded) = decode excluded,
        .dcm = pydicom read + pixel decode + normalise + pre-processing = decode included
  preprocess_cv.py agree IN.npy RAW.npy LCN.npy
        Markdown table of the largest differences between our canvases (RAW, LCN, from the Rust
        bench) and OpenCV's, with each border rule, and of both against a float64 reference
  preprocess_cv.py report RESULTS.jsonl             the Markdown table of preprocess-bench.sh
"""

import argparse
import json
import math
import statistics
import sys
import time

import cv2
import numpy as np

SIZE = 1024
THRESHOLD = 0.05
WINDOW = 9
SIGMA = 2.0
FLAT_STD = 1e-6
WARMUP = 2


# --- decode (decode-included timing only) ----------------------------------------------------------


def normalise(values, invert):
    """fracture_shared::pixels::normalise: 0.1st..99.9th percentile to [0, 1], MONOCHROME1 inverted."""
    flat = values.ravel()
    n = flat.size
    lo_i, hi_i = n // 1000, n - 1 - n // 1000
    part = np.partition(flat, [lo_i, hi_i])
    a, b = part[lo_i], part[hi_i]
    if not b > a:
        a, b = flat.min(), flat.max()
        if not b > a:
            return np.zeros_like(values, dtype=np.float32)
    x = np.clip((values - a) * np.float32(1.0 / (b - a)), 0.0, 1.0).astype(np.float32, copy=False)
    return 1.0 - x if invert else x


def decode(path):
    import pydicom

    ds = pydicom.dcmread(path)
    values = ds.pixel_array.astype(np.float32)
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    if slope != 1 or intercept != 0:
        values = values * np.float32(slope) + np.float32(intercept)
    return normalise(values, ds.PhotometricInterpretation == "MONOCHROME1")


# --- the transform -----------------------------------------------------------------------------------


def content_span(counts, line_len):
    """The kept [start, end) along one axis, by the rule of models/src/transform.rs."""
    peak = int(counts.max()) if counts.size else 0
    min_count = max(2.0, 0.005 * line_len, 0.05 * peak)
    content = counts > min_count
    edges = np.flatnonzero(np.diff(np.concatenate(([0], content.view(np.int8), [0]))))
    starts, ends = edges[0::2], edges[1::2]
    if starts.size == 0:
        return 0, counts.size
    csum = np.concatenate(([0], np.cumsum(counts, dtype=np.int64)))
    mass = csum[ends] - csum[starts]
    heaviest = int(np.argmax(mass))  # the first of equals, as in Rust
    min_run = max(4, math.ceil(0.05 * counts.size))
    keep = ((ends - starts) >= min_run) & (mass >= 0.10 * mass[heaviest])
    if keep.any():
        idx = np.flatnonzero(keep)
        return int(starts[idx[0]]), int(ends[idx[-1]])
    return int(starts[heaviest]), int(ends[heaviest])


_inv_norm = {}


def inv_norm(n):
    """1 / (blurred all-ones image) with zeros outside: constant for a canvas size, so cached."""
    if n not in _inv_norm:
        g = cv2.getGaussianKernel(WINDOW, SIGMA, cv2.CV_64F).ravel()
        r = WINDOW // 2
        inside = np.array([g[max(0, r - p): r + (n - p)].sum() for p in range(n)])
        one = (1.0 / inside).astype(np.float32)
        _inv_norm[n] = np.outer(one, one).astype(np.float32)
    return _inv_norm[n]


def blur(x, border):
    if border == "normalised":
        out = cv2.GaussianBlur(x, (WINDOW, WINDOW), SIGMA, borderType=cv2.BORDER_CONSTANT)
        out *= inv_norm(x.shape[0])
        return out
    return cv2.GaussianBlur(x, (WINDOW, WINDOW), SIGMA, borderType=cv2.BORDER_REFLECT_101)


def crop_resize(img):
    """(raw N x N canvas, crop [x0, y0, x1, y1], scale) of a [0, 1] float32 image."""
    h, w = img.shape
    bright = img > THRESHOLD
    y0, y1 = content_span(np.count_nonzero(bright, axis=1), w)
    x0, x1 = content_span(np.count_nonzero(bright, axis=0), h)
    cw, ch = x1 - x0, y1 - y0
    scale = min(SIZE / cw, SIZE / ch)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(img[y0:y1, x0:x1], None, fx=scale, fy=scale, interpolation=interp)
    canvas = np.zeros((SIZE, SIZE), np.float32)
    canvas[: resized.shape[0], : resized.shape[1]] = resized
    return canvas, [x0, y0, x1, y1], scale


def local_contrast_normalise(canvas, border):
    centred = canvas - np.float32(canvas.mean(dtype=np.float64))
    mean = blur(centred, border)
    mean_sq = blur(centred * centred, border)
    std = np.sqrt(np.maximum(mean_sq - mean * mean, 0.0))
    c = std.mean(dtype=np.float64)
    if c <= FLAT_STD:
        return np.zeros_like(canvas)
    lcn = (centred - mean) / np.maximum(std, np.float32(c))
    peak = np.abs(lcn).max()
    if peak > 0:
        lcn *= np.float32(1.0 / peak)
        np.clip(lcn, -1.0, 1.0, out=lcn)
    return lcn


def preprocess(img, border="reflect101"):
    """(raw canvas, LCN canvas, crop [x0, y0, x1, y1], scale) of a [0, 1] float32 image."""
    canvas, crop, scale = crop_resize(img)
    return canvas, local_contrast_normalise(canvas, border), crop, scale


def lcn_f64(canvas):
    """The LCN in float64 with the Rust border rule: the reference both float32 versions approach."""
    g = cv2.getGaussianKernel(WINDOW, SIGMA, cv2.CV_64F)
    c = canvas.astype(np.float64)
    c -= c.mean()
    ones = cv2.sepFilter2D(np.ones_like(c), cv2.CV_64F, g, g, borderType=cv2.BORDER_CONSTANT)
    blur64 = lambda x: cv2.sepFilter2D(x, cv2.CV_64F, g, g, borderType=cv2.BORDER_CONSTANT) / ones
    mean = blur64(c)
    std = np.sqrt(np.maximum(blur64(c * c) - mean * mean, 0.0))
    out = (c - mean) / np.maximum(std, std.mean())
    return out / np.abs(out).max()


# --- commands ----------------------------------------------------------------------------------------


def synth(out):
    """A 3000 x 2500 (W x H) 16-bit MONOCHROME2 "radiograph": dark noisy padding, a soft-tissue
    ellipse with two bones and texture, a burned-in marker block, a few hot pixels. Deterministic."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    w, h = 3000, 2500
    rng = np.random.default_rng(20200)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = rng.normal(900, 250, (h, w)).astype(np.float32)  # detector noise in the padding
    tissue = ((xx - 1450) / 1150) ** 2 + ((yy - 1300) / 950) ** 2 < 1
    img[tissue] += 18000 + 3000 * np.sin(xx[tissue] / 37) * np.cos(yy[tissue] / 53)
    for cx in (1150, 1750):
        bone = (np.abs(xx - cx - 0.15 * (yy - 1300)) < 110) & tissue
        img[bone] += 22000
    img += rng.normal(0, 600, (h, w)).astype(np.float32) * tissue
    img[2300:2420, 2750:2860] = 60000  # marker block in the bottom-right padding
    img[rng.integers(0, h, 30), rng.integers(0, w, 30)] = 65535  # hot pixels
    pixels = np.clip(img, 0, 65535).astype(np.uint16)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray, for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["fracture-preprocess-bench"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["fracture-preprocess-bench-study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["fracture-preprocess-bench-series"])
    ds.Modality = "DX"
    ds.BodyPartExamined = "LEG"
    ds.Rows, ds.Columns = h, w
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(out, enforce_file_format=True)
    print(json.dumps({"path": out, "width": w, "height": h, "pydicom": pydicom.__version__}))


def time_cmd(path, iters, border):
    decode_included = path.endswith(".dcm")
    pre = None if decode_included else np.load(path)

    def run():
        return preprocess(decode(path) if decode_included else pre, border)

    for _ in range(WARMUP):
        out = run()
    ms = []
    for _ in range(max(1, iters)):
        t0 = time.perf_counter()
        out = run()
        ms.append((time.perf_counter() - t0) * 1e3)
    ms.sort()
    print(json.dumps({
        "impl": "opencv", "decode": decode_included, "median_ms": round(ms[len(ms) // 2], 3),
        "min_ms": round(ms[0], 3), "iters": len(ms), "threads": cv2.getNumThreads(),
        "crop": out[2], "scale": round(out[3], 9), "size": SIZE, "border": border,
        "opencv": cv2.__version__, "numpy": np.__version__,
    }))


def agree(path, raw_path, lcn_path):
    """Markdown table: our canvases against OpenCV's, with both border rules, and both LCNs
    against the float64 reference computed from our raw canvas."""
    img = np.load(path)
    ours_raw32 = np.load(raw_path)
    ours_raw, ours_lcn = ours_raw32.astype(np.float64), np.load(lcn_path).astype(np.float64)
    reference = lcn_f64(ours_raw32)
    r = WINDOW // 2
    print("| OpenCV border | OpenCV crop | raw canvas | LCN | LCN, over 4 px from the canvas edge "
          "| LCN mean | LCN step alone | ours vs float64 | OpenCV vs float64 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for border in ("normalised", "reflect101"):
        raw, lcn, crop, _ = preprocess(img, border)
        d = np.abs(ours_lcn - lcn)
        # OpenCV's LCN of our raw canvas: the LCN step alone, the resize's differences removed.
        cv_of_ours = local_contrast_normalise(ours_raw32, border)
        print(f"| {border} | {crop} | {np.abs(ours_raw - raw).max():.1e} | {d.max():.1e} | "
              f"{d[r:-r, r:-r].max():.1e} | {d.mean():.1e} | {np.abs(ours_lcn - cv_of_ours).max():.1e} | "
              f"{np.abs(ours_lcn - reference).max():.1e} | {np.abs(cv_of_ours - reference).max():.1e} |")


def report(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    key = lambda r: (r["image"], r["decode"])
    images = list(dict.fromkeys(r["image"] for r in rows))
    print("| image | decode | ours ms/image | OpenCV + numpy ms/image | ours / OpenCV | same crop |")
    print("|---|---|---:|---:|---:|---|")
    for image in images:
        for dec in (False, True):
            ours = [r for r in rows if key(r) == (image, dec) and r["impl"] == "fracture"]
            cv = [r for r in rows if key(r) == (image, dec) and r["impl"] == "opencv"]
            if not ours or not cv:
                continue
            a = statistics.median(r["median_ms"] for r in ours)
            b = statistics.median(r["median_ms"] for r in cv)
            same = all(r["crop"] == ours[0]["crop"] for r in ours + cv)
            print(f"| {image} | {'included' if dec else 'excluded'} | {a:.1f} | {b:.1f} | "
                  f"{a / b:.2f} | {'yes ' + str(ours[0]['crop']) if same else 'NO'} |")
    o = next(r for r in rows if r["impl"] == "fracture")
    c = next(r for r in rows if r["impl"] == "opencv")
    reps = len({r["rep"] for r in rows})
    print(f"\nMedians over {reps} interleaved repetitions of {o['iters']} timed iterations each. "
          f"Threads: rayon {o['threads']}, OpenCV {c['threads']} (cv2 {c['opencv']}, numpy "
          f"{c['numpy']}, OpenCV border {c['border']}).")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth")
    s.add_argument("out")
    t = sub.add_parser("time")
    t.add_argument("input")
    t.add_argument("iters", type=int)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--border", choices=["reflect101", "normalised"], default="reflect101")
    a = sub.add_parser("agree")
    a.add_argument("input")
    a.add_argument("raw")
    a.add_argument("lcn")
    r = sub.add_parser("report")
    r.add_argument("results")
    args = p.parse_args()
    if args.cmd == "synth":
        synth(args.out)
    elif args.cmd == "time":
        cv2.setNumThreads(args.threads)
        time_cmd(args.input, args.iters, args.border)
    elif args.cmd == "agree":
        agree(args.input, args.raw, args.lcn)
    else:
        report(args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
