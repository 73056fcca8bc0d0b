//! The crop, resize and Local Contrast Normalisation that training and serving both apply.
//!
//! Jones et al. crop the black padding around a radiograph, resize it (aspect preserved) to fit
//! 1024 x 1024, pad the rest, and give some ensemble members a Local Contrast Normalised copy
//! rescaled to [-1, 1]. Training and serving must apply exactly this function, so it lives here
//! and nowhere else.

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
}

/// A content run shorter than this fraction of the image side is not anatomy (a burned-in
/// marker letter, a ruler tick, a label) and does not hold the crop open.
const MIN_CONTENT_RUN_FRACTION: f64 = 0.05;
/// ... and never shorter than this many pixels, for small images.
const MIN_CONTENT_RUN_PX: usize = 4;
/// Below this mean local standard deviation the canvas is flat: 1e-6 is far under one grey level
/// of a 16-bit image (1.5e-5), so only rounding noise would be left to amplify.
const FLAT_STD: f64 = 1e-6;

/// Crops the black padding, resizes to fit `cfg.size` (aspect preserved, top-left, zero padded)
/// and computes the LCN copy.
///
/// `img` is a MONOCHROME2 image (bright = bone), row-major, normalised to [0, 1] by the caller.
///
/// The crop keeps the rows (and, separately, the columns) from the first to the last *run* of
/// content lines that is at least 5% of the image side long, a line being content when more than
/// max(2, 0.5% of its length) pixels exceed `crop_threshold`. Short runs are burned-in markers or
/// labels in the padding and are ignored; the gap between two long runs (two views on one film)
/// is kept, which taking only the largest run would not. With no long run the longest short run
/// is kept, and an image with no content at all keeps its full extent.
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

/// Per row and per column, how many pixels exceed `threshold`; refuses non-finite pixels.
fn content_counts(
    img: &[f32],
    width: usize,
    threshold: f32,
) -> Result<(Vec<u32>, Vec<u32>), ModelError> {
    let height = img.len() / width;
    let mut rows = vec![0u32; height];
    let mut cols = vec![0u32; width];
    for (y, row) in img.chunks_exact(width).enumerate() {
        let mut n = 0u32;
        let mut sum = 0f32;
        for (c, &v) in cols.iter_mut().zip(row) {
            let bright = u32::from(v > threshold);
            *c += bright;
            n += bright;
            sum += v;
        }
        // A NaN or infinity anywhere in the row makes its sum non-finite: one check per row.
        if !sum.is_finite() {
            return Err(ModelError::InvalidImage(format!(
                "row {y} holds a NaN or infinite pixel value; pixels must be normalised to \
                 [0, 1] before the transform"
            )));
        }
        rows[y] = n;
    }
    Ok((rows, cols))
}

/// The kept span `[start, end)` along one axis; see [`transform`] for the rule.
fn content_span(counts: &[u32], line_len: usize) -> (usize, usize) {
    let min_count = (0.005 * line_len as f64).max(2.0);
    let is_content = |c: u32| f64::from(c) > min_count;
    let min_run =
        MIN_CONTENT_RUN_PX.max((MIN_CONTENT_RUN_FRACTION * counts.len() as f64).ceil() as usize);

    let mut runs = Vec::new();
    let mut start = None;
    for (i, &c) in counts.iter().enumerate() {
        match (is_content(c), start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                runs.push((s, i));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        runs.push((s, counts.len()));
    }

    let long: Vec<_> = runs.iter().filter(|(s, e)| e - s >= min_run).collect();
    match (long.first(), long.last()) {
        (Some(first), Some(last)) => (first.0, last.1),
        _ => runs
            .iter()
            .max_by_key(|(s, e)| e - s)
            .copied()
            .unwrap_or((0, counts.len())),
    }
}

/// Sparse 1-D resampling weights: output `i` reads `weights[taps[i].0..taps[i].1]` applied to
/// source pixels starting at `first[i]`.
struct AxisWeights {
    first: Vec<usize>,
    taps: Vec<(usize, usize)>,
    weights: Vec<f32>,
}

impl AxisWeights {
    /// Area averaging when shrinking (every source pixel counts, no aliasing), bilinear when
    /// enlarging. Output pixel `i` covers source `[i / scale, (i + 1) / scale)`, so the mapping
    /// back to the original is exactly `x / scale` on both axes.
    fn new(src_len: usize, dst_len: usize, scale: f64) -> Self {
        let mut first = Vec::with_capacity(dst_len);
        let mut taps = Vec::with_capacity(dst_len);
        let mut weights = Vec::with_capacity(dst_len * 4);
        for i in 0..dst_len {
            let begin = weights.len();
            if scale < 1.0 {
                let a = i as f64 / scale;
                let b = ((i + 1) as f64 / scale).min(src_len as f64);
                let j0 = (a.floor() as usize).min(src_len - 1);
                let j1 = (b.ceil() as usize).clamp(j0 + 1, src_len);
                let width = (b - a).max(f64::MIN_POSITIVE);
                first.push(j0);
                for j in j0..j1 {
                    let overlap = (b.min((j + 1) as f64) - a.max(j as f64)).max(0.0);
                    weights.push((overlap / width) as f32);
                }
            } else {
                let s = ((i as f64 + 0.5) / scale - 0.5).clamp(0.0, (src_len - 1) as f64);
                let j0 = s.floor() as usize;
                let f = s - j0 as f64;
                first.push(j0);
                weights.push((1.0 - f) as f32);
                if j0 + 1 < src_len {
                    weights.push(f as f32);
                }
            }
            taps.push((begin, weights.len()));
        }
        Self {
            first,
            taps,
            weights,
        }
    }

    fn of(&self, i: usize) -> (usize, &[f32]) {
        let (a, b) = self.taps[i];
        (self.first[i], &self.weights[a..b])
    }
}

/// Resamples the crop to `out_w x out_h` and places it top-left on a zeroed `size x size` canvas.
fn resize_into_canvas(
    img: &[f32],
    width: usize,
    [x0, y0, x1, y1]: [usize; 4],
    out_w: usize,
    out_h: usize,
    scale: f64,
    size: usize,
) -> Vec<f32> {
    let horizontal = AxisWeights::new(x1 - x0, out_w, scale);
    let vertical = AxisWeights::new(y1 - y0, out_h, scale);

    // Horizontal pass first: it shrinks each long source row to out_w before the rows are mixed.
    let mut rows = vec![0f32; (y1 - y0) * out_w];
    for (y, out_row) in rows.chunks_exact_mut(out_w).enumerate() {
        let src = &img[(y0 + y) * width + x0..(y0 + y) * width + x1];
        for (i, out) in out_row.iter_mut().enumerate() {
            let (j, w) = horizontal.of(i);
            *out = w.iter().zip(&src[j..]).map(|(w, v)| w * v).sum();
        }
    }

    // Vertical pass as whole-row multiply-adds, which the compiler vectorises.
    let mut canvas = vec![0f32; size * size];
    for y in 0..out_h {
        let (j, w) = vertical.of(y);
        let out_row = &mut canvas[y * size..y * size + out_w];
        for (k, &wk) in w.iter().enumerate() {
            let src = &rows[(j + k) * out_w..(j + k + 1) * out_w];
            for (o, v) in out_row.iter_mut().zip(src) {
                *o += wk * v;
            }
        }
    }
    canvas
}

/// A normalised 1-D Gaussian and, per position, the inverse of the sum of the taps that fall
/// inside the image, so a window truncated at an edge is renormalised rather than reading zeros.
struct Gaussian {
    taps: Vec<f32>,
    inv_norm: Vec<f32>,
}

impl Gaussian {
    fn new(window: usize, sigma: f32, n: usize) -> Self {
        let r = (window / 2) as isize;
        let two_s2 = 2.0 * f64::from(sigma) * f64::from(sigma);
        let raw: Vec<f64> = (-r..=r)
            .map(|k| (-((k * k) as f64) / two_s2).exp())
            .collect();
        let total: f64 = raw.iter().sum();
        let taps: Vec<f32> = raw.iter().map(|w| (w / total) as f32).collect();
        let inv_norm = (0..n as isize)
            .map(|p| {
                let inside: f32 = (-r..=r)
                    .filter(|k| (0..n as isize).contains(&(p + k)))
                    .map(|k| taps[(k + r) as usize])
                    .sum();
                1.0 / inside
            })
            .collect();
        Self { taps, inv_norm }
    }

    fn radius(&self) -> isize {
        (self.taps.len() / 2) as isize
    }

    /// Separable blur of the `n x n` image `src` into `dst`, using `tmp` for the row pass.
    fn blur(&self, src: &[f32], n: usize, tmp: &mut [f32], dst: &mut [f32]) {
        let r = self.radius();
        let ni = n as isize;
        for (src_row, tmp_row) in src.chunks_exact(n).zip(tmp.chunks_exact_mut(n)) {
            tmp_row.fill(0.0);
            for (k, &g) in self.taps.iter().enumerate() {
                let d = k as isize - r;
                let lo = (-d).max(0) as usize;
                let hi = (ni - d).min(ni).max(0) as usize;
                if lo >= hi {
                    continue;
                }
                let shifted = &src_row[(lo as isize + d) as usize..(hi as isize + d) as usize];
                for (t, v) in tmp_row[lo..hi].iter_mut().zip(shifted) {
                    *t += g * v;
                }
            }
            for (t, s) in tmp_row.iter_mut().zip(&self.inv_norm) {
                *t *= s;
            }
        }
        for (y, dst_row) in dst.chunks_exact_mut(n).enumerate() {
            dst_row.fill(0.0);
            for (k, &g) in self.taps.iter().enumerate() {
                let yy = y as isize + k as isize - r;
                if !(0..ni).contains(&yy) {
                    continue;
                }
                let src_row = &tmp[yy as usize * n..(yy as usize + 1) * n];
                for (o, v) in dst_row.iter_mut().zip(src_row) {
                    *o += g * v;
                }
            }
            let s = self.inv_norm[y];
            for o in dst_row.iter_mut() {
                *o *= s;
            }
        }
    }
}

/// LCN of the `n x n` canvas: `(x - mean) / max(c, std)` with Gaussian local mean and standard
/// deviation and `c` the mean local standard deviation, then scaled by its largest magnitude.
fn local_contrast_normalise(canvas: &[f32], n: usize, window: usize, sigma: f32) -> Vec<f32> {
    // LCN ignores a constant offset, so subtracting the global mean first changes nothing but
    // the rounding: E[x^2] - E[x]^2 no longer cancels two large numbers, and a constant image
    // becomes exactly zero instead of rounding noise that the final rescale would blow up.
    let global_mean =
        (canvas.iter().map(|&v| f64::from(v)).sum::<f64>() / canvas.len() as f64) as f32;
    let centred: Vec<f32> = canvas.iter().map(|v| v - global_mean).collect();
    let squared: Vec<f32> = centred.iter().map(|v| v * v).collect();

    let gauss = Gaussian::new(window, sigma, n);
    let mut tmp = vec![0f32; n * n];
    let mut mean = vec![0f32; n * n];
    let mut mean_sq = vec![0f32; n * n];
    gauss.blur(&centred, n, &mut tmp, &mut mean);
    gauss.blur(&squared, n, &mut tmp, &mut mean_sq);
    drop(squared);

    // Reuse `tmp` for the local standard deviation.
    let std = &mut tmp;
    for ((s, m), m2) in std.iter_mut().zip(&mean).zip(&mean_sq) {
        *s = (m2 - m * m).max(0.0).sqrt();
    }
    let c = std.iter().map(|&s| f64::from(s)).sum::<f64>() / std.len() as f64;
    if c <= FLAT_STD {
        return vec![0.0; n * n];
    }
    let c = c as f32;

    let mut out = centred;
    let mut max_abs = 0f32;
    for ((o, m), s) in out.iter_mut().zip(&mean).zip(std.iter()) {
        *o = (*o - m) / s.max(c);
        max_abs = max_abs.max(o.abs());
    }
    if max_abs > 0.0 {
        let inv = 1.0 / max_abs;
        for o in out.iter_mut() {
            *o = (*o * inv).clamp(-1.0, 1.0);
        }
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
