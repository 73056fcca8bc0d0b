//! The crop, resize and Local Contrast Normalisation that training and serving both apply.
//!
//! Jones et al. crop the black padding around a radiograph, resize it (aspect preserved) to fit
//! 1024 x 1024, pad the rest, and give some ensemble members a Local Contrast Normalised copy
//! rescaled to [-1, 1]. Training and serving must apply exactly this function, so it lives here
//! and nowhere else.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::ModelError;

/// Settings of [`transform`]. Every field has a default, so a manifest may set only some.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransformConfig {
    /// Side of the square model input in pixels (the paper: 1024).
    pub size: usize,
    /// A pixel brighter than this (on the [0, 1] scale) is not padding.
    pub crop_threshold: f32,
    /// Width of the Gaussian window of the LCN, in pixels; odd (Jarrett et al. 2009 use 9).
    pub lcn_window: usize,
    /// Standard deviation of the LCN's Gaussian window, in pixels.
    pub lcn_sigma: f32,
}

impl Default for TransformConfig {
    fn default() -> Self {
        Self {
            size: 1024,
            crop_threshold: 0.05,
            lcn_window: 9,
            lcn_sigma: 2.0,
        }
    }
}

impl TransformConfig {
    /// Refuses settings with which [`transform`] cannot produce a meaningful image.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |what: String| Err(ModelError::InvalidConfig(what));
        if self.size == 0 {
            return bad("transform size is 0; set it to the model input size, e.g. 1024".into());
        }
        if !(0.0..1.0).contains(&self.crop_threshold) {
            return bad(format!(
                "crop_threshold {} is outside [0, 1); pixel values are normalised to [0, 1], \
                 the default is 0.05",
                self.crop_threshold
            ));
        }
        if self.lcn_window == 0 || self.lcn_window.is_multiple_of(2) {
            return bad(format!(
                "lcn_window {} must be odd and at least 1 so the window has a centre pixel, \
                 e.g. 9",
                self.lcn_window
            ));
        }
        if !(self.lcn_sigma.is_finite() && self.lcn_sigma > 0.0) {
            return bad(format!(
                "lcn_sigma {} must be a positive number of pixels, e.g. 2.0",
                self.lcn_sigma
            ));
        }
        Ok(())
    }
}

/// A radiograph ready for the ensemble, with what is needed to map model pixels back.
#[derive(Debug, Clone, PartialEq)]
pub struct Transformed {
    /// The cropped, resized and padded image, `size * size`, row-major, values in [0, 1].
    pub raw: Vec<f32>,
    /// The Local Contrast Normalised canvas, `size * size`, row-major, values in [-1, 1].
    pub lcn: Vec<f32>,
    /// Side of the square canvas.
    pub size: usize,
    /// The kept part of the original: `[x0, y0, x1, y1]`, x0/y0 inclusive, x1/y1 exclusive.
    pub crop: [u32; 4],
    /// Model pixels per original pixel: original `x = crop[0] + model_x / scale`.
    pub scale: f64,
    pub original_width: u32,
    pub original_height: u32,
}

impl Transformed {
    /// The `[2, size, size]` model input: channel 0 raw, channel 1 LCN.
    pub fn to_tensor_data(&self) -> Vec<f32> {
        let mut data = Vec::with_capacity(self.raw.len() + self.lcn.len());
        data.extend_from_slice(&self.raw);
        data.extend_from_slice(&self.lcn);
        data
    }

    /// Where the model input sits in the original: the mapping [`Placement`] computes with.
    pub fn placement(&self) -> Placement {
        Placement {
            crop: self.crop,
            scale: self.scale,
            size: self.size,
        }
    }

    /// [`Placement::to_model`]; training uses it for annotation boxes.
    pub fn to_model(&self, x: f64, y: f64) -> (f64, f64) {
        self.placement().to_model(x, y)
    }

    /// [`Placement::to_original`].
    pub fn to_original(&self, x: f64, y: f64) -> (f64, f64) {
        self.placement().to_original(x, y)
    }

    /// [`Placement::box_to_model`].
    pub fn box_to_model(&self, b: [f64; 4]) -> [f64; 4] {
        self.placement().box_to_model(b)
    }

    /// [`Placement::box_to_original`].
    pub fn box_to_original(&self, b: [f64; 4]) -> [f64; 4] {
        self.placement().box_to_original(b)
    }
}

/// Where the model input sits in the original image: the kept crop and the resize factor.
///
/// The one mapping between model-input and original pixels: training maps annotation boxes in
/// with it, and [`crate::boxes`] maps the probability map's boxes out with it. The pipeline's
/// messages carry the same numbers (`fracture_shared::messages::Geometry`).
///
/// Coordinates are continuous, pixel `i` covering `[i, i + 1)` on both sides, so a box's
/// exclusive far corner maps like any other point.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placement {
    /// The kept part of the original: `[x0, y0, x1, y1]`, x0/y0 inclusive, x1/y1 exclusive.
    pub crop: [u32; 4],
    /// Model pixels per original pixel: original `x = crop[0] + model_x / scale`.
    pub scale: f64,
    /// Side of the square model input.
    pub size: usize,
}

impl Placement {
    /// Where the original point `(x, y)` lands in the model input, clamped to the resized image.
    pub fn to_model(&self, x: f64, y: f64) -> (f64, f64) {
        let [x0, y0, x1, y1] = self.crop.map(f64::from);
        (
            (x.clamp(x0, x1) - x0) * self.scale,
            (y.clamp(y0, y1) - y0) * self.scale,
        )
    }

    /// The inverse of [`Placement::to_model`], clamped to the crop.
    pub fn to_original(&self, x: f64, y: f64) -> (f64, f64) {
        let [x0, y0, x1, y1] = self.crop.map(f64::from);
        (
            (x0 + x / self.scale).clamp(x0, x1),
            (y0 + y / self.scale).clamp(y0, y1),
        )
    }

    /// [`Placement::to_model`] for a box `[x0, y0, x1, y1]`.
    pub fn box_to_model(&self, b: [f64; 4]) -> [f64; 4] {
        let (x0, y0) = self.to_model(b[0], b[1]);
        let (x1, y1) = self.to_model(b[2], b[3]);
        [x0, y0, x1, y1]
    }

    /// [`Placement::to_original`] for a box `[x0, y0, x1, y1]`.
    pub fn box_to_original(&self, b: [f64; 4]) -> [f64; 4] {
        let (x0, y0) = self.to_original(b[0], b[1]);
        let (x1, y1) = self.to_original(b[2], b[3]);
        [x0, y0, x1, y1]
    }
}

/// A line is content only when more of its pixels than this fraction of the busiest line's
/// count are bright: a bright strip along a film edge or a marker puts a few dozen bright
/// pixels in every line that crosses it, anatomy puts hundreds.
const LINE_FRACTION_OF_PEAK: f64 = 0.05;
/// ... and more than this fraction of the line's length, for nearly empty images.
const LINE_FRACTION_OF_LENGTH: f64 = 0.005;
/// ... and never fewer than this many pixels: a few noisy pixels are not content.
const LINE_MIN_PIXELS: f64 = 2.0;
/// A run of content lines shorter than this fraction of the image side is not anatomy (a
/// burned-in marker letter, a label) and does not hold the crop open.
const MIN_CONTENT_RUN_FRACTION: f64 = 0.05;
/// ... and never shorter than this many lines, for small images.
const MIN_CONTENT_RUN_PX: usize = 4;
/// A run holding fewer bright pixels than this fraction of the heaviest run's is a marker block
/// or a label in the padding, however long; a second view on the same film holds far more.
const MIN_RUN_MASS_FRACTION: f64 = 0.10;
/// Below this mean local standard deviation the canvas is flat: 1e-6 is far under one grey level
/// of a 16-bit image (1.5e-5), so only rounding noise would be left to amplify.
const FLAT_STD: f64 = 1e-6;
/// Image rows per parallel task when counting bright pixels.
const COUNT_ROWS_PER_TASK: usize = 64;
/// Canvas rows per parallel LCN task: its horizontally blurred rows (plus the window's halo)
/// stay in the core's cache for the vertical pass.
const LCN_ROWS_PER_TASK: usize = 32;

/// Crops the black padding, resizes to fit `cfg.size` (aspect preserved, top-left, zero padded)
/// and computes the LCN copy.
///
/// `img` is a MONOCHROME2 image (bright = bone), row-major, normalised to [0, 1] by the caller.
///
/// The crop keeps the rows (and, separately, the columns) from the first to the last *run* of
/// content lines that is at least 5% of the image side long and holds at least 10% of the bright
/// pixels of the heaviest run. A line is content when more than max(2, 0.5% of its length, 5% of
/// the busiest line's count) of its pixels exceed `crop_threshold`. So a few noisy pixels, a
/// bright strip along the film edge, and burned-in markers, labels or marker blocks in the padding
/// do not hold the crop open, while the gap between two views on one film is kept (taking only
/// the heaviest run would not). With no such run the heaviest run is kept, and an image with no
/// content at all keeps its full extent.
///
/// The resize scales both axes by `scale = min(size / crop width, size / crop height)`, averaging
/// areas when shrinking (bilinear when enlarging), so original `x = crop[0] + model_x / scale`
/// exactly (see [`Transformed::to_original`]).
///
/// The LCN is `(x - m) / max(c, s)` with `m` and `s` the local mean and standard deviation under
/// the `lcn_window` x `lcn_window` Gaussian (`lcn_sigma`), `c` the mean of `s` over the canvas,
/// then divided by its largest magnitude so it spans [-1, 1] with 0 kept at 0. A window cut by
/// the canvas edge is renormalised over the pixels inside it.
pub fn transform(
    img: &[f32],
    width: usize,
    height: usize,
    cfg: &TransformConfig,
) -> Result<Transformed, ModelError> {
    cfg.validate()?;
    if width == 0 || height == 0 {
        return Err(ModelError::InvalidImage(format!(
            "the image is {width} x {height} pixels; both sides must be at least 1"
        )));
    }
    if u32::try_from(width).is_err() || u32::try_from(height).is_err() {
        return Err(ModelError::InvalidImage(format!(
            "the image is {width} x {height} pixels; sides over {} are not supported",
            u32::MAX
        )));
    }
    if width.checked_mul(height) != Some(img.len()) {
        return Err(ModelError::InvalidImage(format!(
            "{} pixel values were given for a {width} x {height} image, which needs {}",
            img.len(),
            width.saturating_mul(height)
        )));
    }

    let (row_counts, col_counts) = content_counts(img, width, cfg.crop_threshold)?;
    let (y0, y1) = content_span(&row_counts, width);
    let (x0, x1) = content_span(&col_counts, height);
    let (crop_w, crop_h) = (x1 - x0, y1 - y0);

    let size = cfg.size;
    let scale = (size as f64 / crop_w as f64).min(size as f64 / crop_h as f64);
    let out_w = ((crop_w as f64 * scale).round() as usize).clamp(1, size);
    let out_h = ((crop_h as f64 * scale).round() as usize).clamp(1, size);

    let raw = resize_into_canvas(img, width, [x0, y0, x1, y1], out_w, out_h, scale, size);
    let lcn = local_contrast_normalise(&raw, size, cfg.lcn_window, cfg.lcn_sigma);

    // Both sides were checked against u32::MAX above and crop bounds never exceed them.
    let to_u32 = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    Ok(Transformed {
        raw,
        lcn,
        size,
        crop: [to_u32(x0), to_u32(y0), to_u32(x1), to_u32(y1)],
        scale,
        original_width: to_u32(width),
        original_height: to_u32(height),
    })
}

/// Per row and per column, how many pixels exceed `threshold`, in one pass over the image;
/// refuses non-finite pixels.
fn content_counts(
    img: &[f32],
    width: usize,
    threshold: f32,
) -> Result<(Vec<u32>, Vec<u32>), ModelError> {
    let height = img.len() / width;
    let mut rows = vec![0u32; height];
    let cols = img
        .par_chunks(width * COUNT_ROWS_PER_TASK)
        .zip(rows.par_chunks_mut(COUNT_ROWS_PER_TASK))
        .enumerate()
        .try_fold(
            || vec![0u32; width],
            |mut cols, (task, (pixels, row_counts))| {
                for (i, (row, count)) in pixels.chunks_exact(width).zip(row_counts).enumerate() {
                    // Integer sums only (no float sum for a finiteness check), so the loop
                    // vectorises.
                    let (mut n, mut non_finite) = (0u32, 0u32);
                    for (c, &v) in cols.iter_mut().zip(row) {
                        let bright = u32::from(v > threshold);
                        *c += bright;
                        n += bright;
                        non_finite += u32::from(!v.is_finite());
                    }
                    if non_finite > 0 {
                        return Err(task * COUNT_ROWS_PER_TASK + i);
                    }
                    *count = n;
                }
                Ok(cols)
            },
        )
        .try_reduce(
            || vec![0u32; width],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                Ok(a)
            },
        )
        .map_err(|y| {
            ModelError::InvalidImage(format!(
                "row {y} holds a NaN or infinite pixel value; pixels must be normalised to \
                 [0, 1] before the transform"
            ))
        })?;
    Ok((rows, cols))
}

/// The kept span `[start, end)` along one axis; see [`transform`] for the rule.
fn content_span(counts: &[u32], line_len: usize) -> (usize, usize) {
    let peak = counts.iter().copied().max().unwrap_or(0);
    let min_count = LINE_MIN_PIXELS
        .max(LINE_FRACTION_OF_LENGTH * line_len as f64)
        .max(LINE_FRACTION_OF_PEAK * f64::from(peak));
    let is_content = |c: u32| f64::from(c) > min_count;
    let min_run =
        MIN_CONTENT_RUN_PX.max((MIN_CONTENT_RUN_FRACTION * counts.len() as f64).ceil() as usize);

    // (start, end, bright pixels) of each run of content lines.
    let mut runs: Vec<(usize, usize, u64)> = Vec::new();
    let mut open: Option<(usize, u64)> = None;
    for (i, &c) in counts.iter().enumerate() {
        match (is_content(c), open.as_mut()) {
            (true, None) => open = Some((i, u64::from(c))),
            (true, Some((_, mass))) => *mass += u64::from(c),
            (false, Some(&mut (s, mass))) => {
                runs.push((s, i, mass));
                open = None;
            }
            (false, None) => {}
        }
    }
    if let Some((s, mass)) = open {
        runs.push((s, counts.len(), mass));
    }

    // The first of equally heavy runs, as the Python peer's argmax picks.
    let Some(heaviest) = runs
        .iter()
        .copied()
        .reduce(|best, r| if r.2 > best.2 { r } else { best })
    else {
        return (0, counts.len());
    };
    let min_mass = MIN_RUN_MASS_FRACTION * heaviest.2 as f64;
    let mut kept = runs
        .iter()
        .filter(|&&(s, e, mass)| e - s >= min_run && mass as f64 >= min_mass);
    match (kept.next(), kept.next_back()) {
        (Some(first), Some(last)) => (first.0, last.1),
        (Some(only), None) => (only.0, only.1),
        _ => (heaviest.0, heaviest.1),
    }
}

/// 1-D resampling weights, `stride` per output pixel (zero padded): output `i` is
/// `sum_t weights[i * stride + t] * source[first[i] + t]`, of which the first `len[i]` terms
/// are real.
struct AxisWeights {
    first: Vec<usize>,
    len: Vec<usize>,
    stride: usize,
    weights: Vec<f32>,
}

impl AxisWeights {
    /// Area averaging when shrinking (every source pixel counts, no aliasing), bilinear when
    /// enlarging. Output pixel `i` covers source `[i / scale, (i + 1) / scale)`, so the mapping
    /// back to the original is exactly `x / scale` on both axes.
    fn new(src_len: usize, dst_len: usize, scale: f64) -> Self {
        let mut first = Vec::with_capacity(dst_len);
        let mut taps: Vec<Vec<f32>> = Vec::with_capacity(dst_len);
        for i in 0..dst_len {
            if scale < 1.0 {
                let a = i as f64 / scale;
                let b = ((i + 1) as f64 / scale).min(src_len as f64);
                let j0 = (a.floor() as usize).min(src_len - 1);
                let j1 = (b.ceil() as usize).clamp(j0 + 1, src_len);
                let width = (b - a).max(f64::MIN_POSITIVE);
                first.push(j0);
                taps.push(
                    (j0..j1)
                        .map(|j| {
                            let overlap = (b.min((j + 1) as f64) - a.max(j as f64)).max(0.0);
                            (overlap / width) as f32
                        })
                        .collect(),
                );
            } else {
                let s = ((i as f64 + 0.5) / scale - 0.5).clamp(0.0, (src_len - 1) as f64);
                let j0 = s.floor() as usize;
                let f = s - j0 as f64;
                first.push(j0);
                taps.push(if j0 + 1 < src_len {
                    vec![(1.0 - f) as f32, f as f32]
                } else {
                    vec![(1.0 - f) as f32]
                });
            }
        }
        let stride = taps.iter().map(Vec::len).max().unwrap_or(1);
        let mut weights = vec![0f32; dst_len * stride];
        for (w, t) in weights.chunks_exact_mut(stride).zip(&taps) {
            w[..t.len()].copy_from_slice(t);
        }
        Self {
            first,
            len: taps.iter().map(Vec::len).collect(),
            stride,
            weights,
        }
    }

    /// The first source pixel and the real weights of output `i`.
    fn of(&self, i: usize) -> (usize, &[f32]) {
        let w = &self.weights[i * self.stride..];
        (self.first[i], &w[..self.len[i]])
    }

    /// Resamples `src` (which must hold `stride` pixels past its last real one, zeros) into
    /// `out`; specialised for the usual strides so the inner product is unrolled.
    fn gather(&self, src: &[f32], out: &mut [f32]) {
        match self.stride {
            1 => self.gather_n::<1>(src, out),
            2 => self.gather_n::<2>(src, out),
            3 => self.gather_n::<3>(src, out),
            4 => self.gather_n::<4>(src, out),
            5 => self.gather_n::<5>(src, out),
            6 => self.gather_n::<6>(src, out),
            7 => self.gather_n::<7>(src, out),
            8 => self.gather_n::<8>(src, out),
            n => {
                for ((o, &j), w) in out.iter_mut().zip(&self.first).zip(self.weights.chunks(n)) {
                    *o = w.iter().zip(&src[j..j + n]).map(|(w, v)| w * v).sum();
                }
            }
        }
    }

    fn gather_n<const N: usize>(&self, src: &[f32], out: &mut [f32]) {
        for ((o, &j), w) in out
            .iter_mut()
            .zip(&self.first)
            .zip(self.weights.chunks_exact(N))
        {
            let mut acc = 0f32;
            for (w, v) in w.iter().zip(&src[j..j + N]) {
                acc += w * v;
            }
            *o = acc;
        }
    }
}

/// Resamples the crop to `out_w x out_h` and places it top-left on a zeroed `size x size` canvas.
///
/// Each output row mixes its few source rows first (whole-row multiply-adds, which vectorise, on
/// the long source rows) and then resamples that one row horizontally, so no full-size
/// intermediate image is written; rows are independent and run in parallel.
fn resize_into_canvas(
    img: &[f32],
    width: usize,
    [x0, y0, x1, y1]: [usize; 4],
    out_w: usize,
    out_h: usize,
    scale: f64,
    size: usize,
) -> Vec<f32> {
    let crop_w = x1 - x0;
    let horizontal = AxisWeights::new(crop_w, out_w, scale);
    let vertical = AxisWeights::new(y1 - y0, out_h, scale);
    let mut canvas = vec![0f32; size * size];
    canvas
        .par_chunks_mut(size)
        .take(out_h)
        .enumerate()
        .for_each_init(
            || vec![0f32; crop_w + horizontal.stride],
            |mixed, (y, out_row)| {
                let (j, w) = vertical.of(y);
                let src = |k: usize| &img[(y0 + j + k) * width + x0..][..crop_w];
                let row = &mut mixed[..crop_w];
                for (m, &v) in row.iter_mut().zip(src(0)) {
                    *m = w[0] * v;
                }
                for (k, &wk) in w.iter().enumerate().skip(1) {
                    for (m, &v) in row.iter_mut().zip(src(k)) {
                        *m += wk * v;
                    }
                }
                horizontal.gather(mixed, &mut out_row[..out_w]);
            },
        );
    canvas
}

/// Sum in f64 over independent lanes, so it vectorises and is the same on every run.
fn sum_f64(v: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let chunks = v.chunks_exact(8);
    let rest: f64 = chunks.remainder().iter().map(|&x| f64::from(x)).sum();
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += f64::from(x);
        }
    }
    lanes.iter().sum::<f64>() + rest
}

/// A normalised, symmetric 1-D Gaussian and, per position, the inverse of the sum of the taps
/// that fall inside the image, so a window truncated at an edge is renormalised rather than
/// reading zeros.
struct Gaussian {
    taps: Vec<f32>,
    radius: usize,
    inv_norm: Vec<f32>,
}

impl Gaussian {
    fn new(window: usize, sigma: f32, n: usize) -> Self {
        let r = window / 2;
        let two_s2 = 2.0 * f64::from(sigma) * f64::from(sigma);
        let raw: Vec<f64> = (0..window)
            .map(|k| {
                let d = k as f64 - r as f64;
                (-(d * d) / two_s2).exp()
            })
            .collect();
        let total: f64 = raw.iter().sum();
        let taps: Vec<f32> = raw.iter().map(|w| (w / total) as f32).collect();
        let inv_norm = (0..n)
            .map(|p| {
                // Tap k reads position p + k - r.
                let inside: f32 = taps[r.saturating_sub(p)..window.min(n + r - p)]
                    .iter()
                    .sum();
                1.0 / inside
            })
            .collect();
        Self {
            taps,
            radius: r,
            inv_norm,
        }
    }

    /// Tap `k` at distance `d` from the centre, `0 <= d <= radius`.
    fn at(&self, d: usize) -> f32 {
        self.taps[self.radius + d]
    }

    /// The renormalised horizontal blur of one row.
    fn blur_row(&self, row: &[f32], out: &mut [f32]) {
        let (n, r) = (row.len(), self.radius);
        let direct = |x: usize| -> f32 {
            let lo = x.saturating_sub(r);
            let hi = (x + r + 1).min(n);
            (lo..hi).map(|xx| self.taps[xx + r - x] * row[xx]).sum()
        };
        if n > 2 * r {
            // Away from the edges: symmetric pairs, whole-row multiply-adds that vectorise.
            let m = n - 2 * r;
            let inner = &mut out[r..r + m];
            let g0 = self.at(0);
            for (o, &v) in inner.iter_mut().zip(&row[r..r + m]) {
                *o = g0 * v;
            }
            for d in 1..=r {
                let g = self.at(d);
                let (left, right) = (&row[r - d..r - d + m], &row[r + d..r + d + m]);
                for ((o, &a), &b) in inner.iter_mut().zip(left).zip(right) {
                    *o += g * (a + b);
                }
            }
            for x in (0..r).chain(n - r..n) {
                out[x] = direct(x);
            }
        } else {
            for (x, o) in out.iter_mut().enumerate() {
                *o = direct(x);
            }
        }
        for (o, s) in out.iter_mut().zip(&self.inv_norm) {
            *o *= s;
        }
    }

    /// The renormalised vertical blur at canvas row `y` of the horizontally blurred rows, which
    /// `rows(yy)` returns for `|yy - y| <= radius` inside the canvas.
    fn blur_column<'a>(
        &self,
        y: usize,
        n: usize,
        rows: impl Fn(usize) -> &'a [f32],
        out: &mut [f32],
    ) {
        let g0 = self.at(0);
        for (o, &v) in out.iter_mut().zip(rows(y)) {
            *o = g0 * v;
        }
        for d in 1..=self.radius {
            let g = self.at(d);
            match (y.checked_sub(d), (y + d < n).then_some(y + d)) {
                (Some(up), Some(down)) => {
                    for ((o, &a), &b) in out.iter_mut().zip(rows(up)).zip(rows(down)) {
                        *o += g * (a + b);
                    }
                }
                (Some(one), None) | (None, Some(one)) => {
                    for (o, &a) in out.iter_mut().zip(rows(one)) {
                        *o += g * a;
                    }
                }
                (None, None) => {}
            }
        }
        let s = self.inv_norm[y];
        for o in out.iter_mut() {
            *o *= s;
        }
    }
}

/// LCN of the `n x n` canvas: `(x - mean) / max(c, std)` with Gaussian local mean and standard
/// deviation and `c` the mean local standard deviation, then scaled by its largest magnitude.
fn local_contrast_normalise(canvas: &[f32], n: usize, window: usize, sigma: f32) -> Vec<f32> {
    // LCN ignores a constant offset, so subtracting the global mean first changes nothing but
    // the rounding: E[x^2] - E[x]^2 no longer cancels two large numbers, and a constant image
    // becomes exactly zero instead of rounding noise that the final rescale would blow up.
    let partial: Vec<f64> = canvas
        .par_chunks(n * LCN_ROWS_PER_TASK)
        .map(sum_f64)
        .collect();
    let global_mean = (partial.iter().sum::<f64>() / canvas.len() as f64) as f32;

    let gauss = Gaussian::new(window, sigma, n);
    let r = gauss.radius;
    // `out` holds x - mean until the final division; `std` the local standard deviation.
    let mut out = vec![0f32; n * n];
    let mut std = vec![0f32; n * n];
    let band = n * LCN_ROWS_PER_TASK;
    let std_sums: Vec<f64> = out
        .par_chunks_mut(band)
        .zip(std.par_chunks_mut(band))
        .enumerate()
        .map_init(
            || {
                let rows = (LCN_ROWS_PER_TASK + 2 * r).min(n) * n;
                (vec![0f32; rows], vec![0f32; rows], vec![0f32; 2 * n])
            },
            |(h_mean, h_sq, line), (task, (out_band, std_band))| {
                let top = task * LCN_ROWS_PER_TASK;
                let bottom = top + out_band.len() / n;
                let (lo, hi) = (top.saturating_sub(r), (bottom + r).min(n));
                // Horizontal pass over the band and its halo, into the task's scratch rows.
                let (centred, squared) = line.split_at_mut(n);
                for (k, y) in (lo..hi).enumerate() {
                    for ((c, s), &v) in centred
                        .iter_mut()
                        .zip(squared.iter_mut())
                        .zip(&canvas[y * n..(y + 1) * n])
                    {
                        *c = v - global_mean;
                        *s = *c * *c;
                    }
                    gauss.blur_row(centred, &mut h_mean[k * n..(k + 1) * n]);
                    gauss.blur_row(squared, &mut h_sq[k * n..(k + 1) * n]);
                }
                // Vertical pass, then the numerator and the local standard deviation.
                let mut std_sum = 0f64;
                let (mean, mean_sq) = line.split_at_mut(n);
                // Scratch row k holds canvas row lo + k.
                let (h_mean, h_sq) = (&h_mean[..], &h_sq[..]);
                let at = |yy: usize| (yy - lo) * n..(yy - lo + 1) * n;
                for (y, (out_row, std_row)) in (top..bottom).zip(
                    out_band
                        .chunks_exact_mut(n)
                        .zip(std_band.chunks_exact_mut(n)),
                ) {
                    gauss.blur_column(y, n, |yy| &h_mean[at(yy)], mean);
                    gauss.blur_column(y, n, |yy| &h_sq[at(yy)], mean_sq);
                    let src = &canvas[y * n..(y + 1) * n];
                    for ((((o, s), &v), &m), &m2) in out_row
                        .iter_mut()
                        .zip(std_row.iter_mut())
                        .zip(src)
                        .zip(mean.iter())
                        .zip(mean_sq.iter())
                    {
                        *o = (v - global_mean) - m;
                        *s = (m2 - m * m).max(0.0).sqrt();
                    }
                    std_sum += sum_f64(std_row);
                }
                std_sum
            },
        )
        .collect();
    let c = std_sums.iter().sum::<f64>() / (n * n) as f64;
    if c <= FLAT_STD {
        return vec![0.0; n * n];
    }
    let c = c as f32;

    let max_abs = out
        .par_chunks_mut(band)
        .zip(std.par_chunks(band))
        .map(|(o, s)| {
            let mut lanes = [0f32; 8];
            for (o, s) in o.chunks_mut(8).zip(s.chunks(8)) {
                for ((o, &s), l) in o.iter_mut().zip(s).zip(lanes.iter_mut()) {
                    *o /= s.max(c);
                    *l = l.max(o.abs());
                }
            }
            lanes.into_iter().fold(0f32, f32::max)
        })
        .reduce(|| 0f32, f32::max);
    if max_abs > 0.0 {
        let inv = 1.0 / max_abs;
        out.par_chunks_mut(band).for_each(|o| {
            for v in o {
                *v = (*v * inv).clamp(-1.0, 1.0);
            }
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(size: usize) -> TransformConfig {
        TransformConfig {
            size,
            ..TransformConfig::default()
        }
    }

    /// A `w x h` black image with the rectangle `[x0, x1) x [y0, y1)` at `value`.
    fn padded_rect(w: usize, h: usize, rect: [usize; 4], value: f32) -> Vec<f32> {
        let mut img = vec![0f32; w * h];
        for y in rect[1]..rect[3] {
            img[y * w + rect[0]..y * w + rect[2]].fill(value);
        }
        img
    }

    #[test]
    fn crops_exactly_to_a_padded_rectangle() {
        let img = padded_rect(400, 300, [30, 20, 330, 250], 0.8);
        let t = transform(&img, 400, 300, &cfg(64)).expect("transform");
        assert_eq!(t.crop, [30, 20, 330, 250]);
        assert_eq!((t.original_width, t.original_height), (400, 300));
    }

    #[test]
    fn a_marker_in_the_border_and_noise_do_not_stop_the_crop() {
        let (w, h) = (1000, 800);
        let mut img = padded_rect(w, h, [100, 150, 900, 700], 0.7);
        // A burned-in "R" marker, 20 x 30 pixels, in the top-left padding.
        for y in 20..50 {
            for x in 20..40 {
                if x < 24 || y < 24 || (y < 36 && x > 36) || y == 35 || x == y - 10 {
                    img[y * w + x] = 1.0;
                }
            }
        }
        // A marker level with the anatomy, in the right-hand padding.
        for y in 300..330 {
            img[y * w + 950..y * w + 970].fill(1.0);
        }
        // Scattered noise.
        for i in 0..40 {
            img[(i * 7919) % (w * h)] = 0.5;
        }
        let t = transform(&img, w, h, &cfg(128)).expect("transform");
        assert_eq!(t.crop, [100, 150, 900, 700]);
    }

    #[test]
    fn content_too_small_for_a_long_run_keeps_the_heaviest_run() {
        // Only a 6 x 6 blob and a fainter 3 x 3 one: no run reaches 5% of the side (10 lines),
        // so the heaviest run is kept rather than the whole image.
        let mut img = padded_rect(200, 200, [50, 60, 56, 66], 0.9);
        for y in 150..153 {
            img[y * 200 + 150..y * 200 + 153].fill(0.9);
        }
        let t = transform(&img, 200, 200, &cfg(32)).expect("transform");
        assert_eq!(t.crop, [50, 60, 56, 66]);
    }

    #[test]
    fn a_second_view_is_kept_but_a_label_block_is_not() {
        // The second view holds half the first's bright pixels; the label block (40 x 25, in
        // the corner below the second view) is longer than 5% of both sides but holds under
        // 10% of the heaviest run's bright pixels along either axis.
        let (w, h) = (600, 400);
        let mut img = padded_rect(w, h, [40, 40, 240, 360], 0.6);
        for y in 120..280 {
            img[y * w + 300..y * w + 500].fill(0.6);
        }
        for y in 370..395 {
            img[y * w + 530..y * w + 570].fill(1.0);
        }
        let t = transform(&img, w, h, &cfg(64)).expect("transform");
        assert_eq!(t.crop, [40, 40, 500, 360]);
    }

    #[test]
    fn two_views_on_one_film_are_both_kept() {
        let (w, h) = (600, 400);
        let mut img = padded_rect(w, h, [50, 40, 250, 360], 0.6);
        for y in 40..360 {
            img[y * w + 350..y * w + 560].fill(0.6);
        }
        let t = transform(&img, w, h, &cfg(64)).expect("transform");
        assert_eq!(t.crop, [50, 40, 560, 360]);
    }

    #[test]
    fn an_all_black_image_keeps_its_full_extent() {
        let img = vec![0f32; 120 * 80];
        let t = transform(&img, 120, 80, &cfg(60)).expect("transform");
        assert_eq!(t.crop, [0, 0, 120, 80]);
        assert!(t.raw.iter().all(|&v| v == 0.0));
        assert!(t.lcn.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn a_constant_image_gives_an_all_zero_lcn() {
        let img = vec![0.37f32; 90 * 90];
        let t = transform(&img, 90, 90, &cfg(90)).expect("transform");
        assert!(t.raw.iter().all(|&v| (v - 0.37).abs() < 1e-6));
        assert!(t.lcn.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn aspect_ratio_is_preserved_and_the_rest_padded() {
        let (w, h) = (3000, 1500);
        let img = vec![0.5f32; w * h];
        let t = transform(&img, w, h, &cfg(1024)).expect("transform");
        assert_eq!(t.crop, [0, 0, 3000, 1500]);
        assert!((t.scale - 1024.0 / 3000.0).abs() < 1e-12);
        let n = t.size;
        let content_rows = (0..n)
            .filter(|&y| t.raw[y * n..(y + 1) * n].iter().any(|&v| v > 0.0))
            .count();
        let content_cols = (0..n)
            .filter(|&x| (0..n).any(|y| t.raw[y * n + x] > 0.0))
            .count();
        assert_eq!((content_cols, content_rows), (1024, 512));
        assert!(t.raw[..512 * n].iter().all(|&v| (v - 0.5).abs() < 1e-5));
        assert!(t.raw[512 * n..].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn a_2x_downscale_averages_2x2_blocks() {
        let (w, h) = (16, 12);
        // Values all above the crop threshold, so nothing is cropped.
        let img: Vec<f32> = (0..w * h)
            .map(|i| 0.1 + ((i * 37) % 101) as f32 / 200.0)
            .collect();
        let t = transform(&img, w, h, &cfg(8)).expect("transform");
        assert_eq!(t.crop, [0, 0, 16, 12]);
        for y in 0..8 {
            for x in 0..8 {
                let got = t.raw[y * 8 + x];
                if y >= 6 {
                    assert_eq!(got, 0.0, "padding at ({x}, {y})");
                    continue;
                }
                let block = [(0, 0), (1, 0), (0, 1), (1, 1)]
                    .iter()
                    .map(|(dx, dy)| img[(2 * y + dy) * w + 2 * x + dx])
                    .sum::<f32>()
                    / 4.0;
                assert!((got - block).abs() < 1e-6, "({x}, {y}): {got} vs {block}");
            }
        }
    }

    #[test]
    fn enlarging_keeps_the_range_and_the_corners() {
        let img = [0.2f32, 0.4, 0.6, 0.8];
        let t = transform(&img, 2, 2, &cfg(8)).expect("transform");
        assert_eq!(t.raw[0], 0.2);
        assert_eq!(t.raw[7], 0.4);
        assert!((t.raw[7 * 8 + 7] - 0.8).abs() < 1e-6);
        assert!(t.raw.iter().all(|&v| (0.2..=0.8 + 1e-6).contains(&v)));
    }

    #[test]
    fn lcn_is_in_minus_one_to_one_and_reaches_a_bound() {
        let (w, h) = (200, 160);
        let img: Vec<f32> = (0..w * h)
            .map(|i| {
                let (x, y) = ((i % w) as f32, (i / w) as f32);
                0.5 + 0.3 * (x / 7.0).sin() * (y / 11.0).cos()
            })
            .collect();
        let t = transform(&img, w, h, &cfg(128)).expect("transform");
        let max = t.lcn.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(t.lcn.iter().all(|v| (-1.0..=1.0).contains(v)));
        assert!((max - 1.0).abs() < 1e-6);
        assert_eq!(t.to_tensor_data().len(), 2 * 128 * 128);
        assert_eq!(&t.to_tensor_data()[128 * 128..], &t.lcn[..]);
    }

    #[test]
    fn lcn_of_a_step_matches_a_direct_computation() {
        // Left half 0.2, right half 0.8: check one pixel against the formula computed naively.
        let n = 32;
        let img: Vec<f32> = (0..n * n)
            .map(|i| if i % n < n / 2 { 0.2 } else { 0.8 })
            .collect();
        let t = transform(&img, n, n, &cfg(n)).expect("transform");
        let (window, sigma) = (9isize, 2.0f64);
        let r = window / 2;
        let stats = |px: isize, py: isize| {
            let (mut s, mut s2, mut wsum) = (0.0, 0.0, 0.0);
            for dy in -r..=r {
                for dx in -r..=r {
                    let (x, y) = (px + dx, py + dy);
                    if x < 0 || y < 0 || x >= n as isize || y >= n as isize {
                        continue;
                    }
                    let w = (-((dx * dx + dy * dy) as f64) / (2.0 * sigma * sigma)).exp();
                    let v = f64::from(img[y as usize * n + x as usize]);
                    s += w * v;
                    s2 += w * v * v;
                    wsum += w;
                }
            }
            let m = s / wsum;
            (m, (s2 / wsum - m * m).max(0.0).sqrt())
        };
        let mut y = vec![0f64; n * n];
        let mut stds = vec![0f64; n * n];
        for py in 0..n {
            for px in 0..n {
                let (m, s) = stats(px as isize, py as isize);
                y[py * n + px] = f64::from(img[py * n + px]) - m;
                stds[py * n + px] = s;
            }
        }
        let c = stds.iter().sum::<f64>() / stds.len() as f64;
        for (v, s) in y.iter_mut().zip(&stds) {
            *v /= s.max(c);
        }
        let max = y.iter().fold(0f64, |m, v| m.max(v.abs()));
        for (i, (want, got)) in y.iter().zip(&t.lcn).enumerate() {
            assert!(
                (want / max - f64::from(*got)).abs() < 1e-4,
                "pixel {i}: {want} vs {got}"
            );
        }
    }

    #[test]
    fn bad_inputs_are_refused() {
        assert!(matches!(
            transform(&[0.0; 10], 3, 3, &cfg(8)),
            Err(ModelError::InvalidImage(_))
        ));
        assert!(matches!(
            transform(&[], 0, 3, &cfg(8)),
            Err(ModelError::InvalidImage(_))
        ));
        assert!(matches!(
            transform(&[0.0, f32::NAN, 0.0, 0.0], 2, 2, &cfg(8)),
            Err(ModelError::InvalidImage(_))
        ));
        let even = TransformConfig {
            lcn_window: 8,
            ..cfg(8)
        };
        assert!(matches!(
            transform(&[0.0; 4], 2, 2, &even),
            Err(ModelError::InvalidConfig(_))
        ));
    }
}
