//! Training-time augmentation (the paper's rotation, flips, gamma, contrast, translation and
//! zoom), applied to the image and its box mask together so the map target moves with the image.

use fracture_models::manifest::Input;
use serde::{Deserialize, Serialize};

use crate::rng::Rng;

/// How strongly to augment; every draw is uniform in its range. `Augment::none()` turns it off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Augment {
    /// Largest rotation either way, in degrees.
    pub rotation_deg: f64,
    /// Flip left-right with probability 1/2.
    pub flip_horizontal: bool,
    /// Flip top-bottom with probability 1/2.
    pub flip_vertical: bool,
    /// Gamma of the raw channel drawn log-uniformly from [1/gamma, gamma] (1: none).
    pub gamma: f64,
    /// Contrast factor drawn from [1 - contrast, 1 + contrast], both channels.
    pub contrast: f64,
    /// Largest shift either way, as a share of the side.
    pub translation: f64,
    /// Zoom factor drawn from [1 - zoom, 1 + zoom].
    pub zoom: f64,
}

impl Default for Augment {
    fn default() -> Self {
        Self {
            rotation_deg: 10.0,
            flip_horizontal: true,
            flip_vertical: true,
            gamma: 1.25,
            contrast: 0.15,
            translation: 0.05,
            zoom: 0.1,
        }
    }
}

impl Augment {
    /// The identity: images and masks pass through unchanged.
    pub fn none() -> Self {
        Self {
            rotation_deg: 0.0,
            flip_horizontal: false,
            flip_vertical: false,
            gamma: 1.0,
            contrast: 0.0,
            translation: 0.0,
            zoom: 0.0,
        }
    }

    /// Draws one augmentation for a `size x size` canvas.
    pub fn draw(&self, size: usize, rng: &mut Rng) -> Draw {
        let angle = rng
            .range(-self.rotation_deg, self.rotation_deg)
            .to_radians();
        let zoom = rng.range(1.0 - self.zoom, 1.0 + self.zoom);
        let fx = if self.flip_horizontal && rng.chance(0.5) {
            -1.0
        } else {
            1.0
        };
        let fy = if self.flip_vertical && rng.chance(0.5) {
            -1.0
        } else {
            1.0
        };
        let shift = self.translation * size as f64;
        let (tx, ty) = (rng.range(-shift, shift), rng.range(-shift, shift));
        let g = self.gamma.max(1.0).ln();
        let gamma = rng.range(-g, g).exp();
        let contrast = rng.range(1.0 - self.contrast, 1.0 + self.contrast);
        // Forward: q = c + t + R(angle) * zoom * F * (p - c); stored as its inverse, which is
        // what resampling needs: p = c + F * R(-angle) / zoom * (q - c - t).
        let (s, c) = angle.sin_cos();
        let inv = [
            [fx * c / zoom, fx * s / zoom],
            [-fy * s / zoom, fy * c / zoom],
        ];
        let centre = size as f64 / 2.0;
        Draw {
            inverse: inv,
            centre,
            shift: (tx, ty),
            forward: [
                [c * zoom * fx, -s * zoom * fy],
                [s * zoom * fx, c * zoom * fy],
            ],
            gamma,
            contrast,
        }
    }
}

/// One drawn augmentation.
#[derive(Debug, Clone, PartialEq)]
pub struct Draw {
    inverse: [[f64; 2]; 2],
    forward: [[f64; 2]; 2],
    centre: f64,
    shift: (f64, f64),
    gamma: f64,
    contrast: f64,
}

impl Draw {
    /// Where the output point `(x, y)` comes from in the input (continuous pixel coordinates).
    fn source(&self, x: f64, y: f64) -> (f64, f64) {
        let (dx, dy) = (
            x - self.centre - self.shift.0,
            y - self.centre - self.shift.1,
        );
        let m = &self.inverse;
        (
            self.centre + m[0][0] * dx + m[0][1] * dy,
            self.centre + m[1][0] * dx + m[1][1] * dy,
        )
    }

    /// Where the input point `(x, y)` lands.
    fn target(&self, x: f64, y: f64) -> (f64, f64) {
        let (dx, dy) = (x - self.centre, y - self.centre);
        let m = &self.forward;
        (
            self.centre + self.shift.0 + m[0][0] * dx + m[0][1] * dy,
            self.centre + self.shift.1 + m[1][0] * dx + m[1][1] * dy,
        )
    }

    fn is_identity(&self) -> bool {
        self.inverse == [[1.0, 0.0], [0.0, 1.0]] && self.shift == (0.0, 0.0)
    }

    /// Augments `[channels, size, size]` pixels of the given input kind: the same warp on every
    /// channel (bilinear, zero outside the canvas, as the transform pads), then gamma on raw and
    /// contrast about the channel's mean (raw clamped to [0, 1], LCN to [-1, 1]).
    pub fn apply(&self, pixels: &[f32], input: Input, size: usize) -> Vec<f32> {
        let plane = size * size;
        let kinds: &[bool] = match input {
            Input::Raw => &[true],
            Input::Lcn => &[false],
            Input::Both => &[true, false],
        };
        let mut out = Vec::with_capacity(pixels.len());
        for (ch, &raw) in kinds.iter().enumerate() {
            let src = &pixels[ch * plane..(ch + 1) * plane];
            let start = out.len();
            if self.is_identity() {
                out.extend_from_slice(src);
            } else {
                for y in 0..size {
                    for x in 0..size {
                        let (sx, sy) = self.source(x as f64 + 0.5, y as f64 + 0.5);
                        out.push(bilinear(src, size, sx - 0.5, sy - 0.5));
                    }
                }
            }
            let warped = &mut out[start..];
            let (lo, hi) = if raw { (0.0, 1.0) } else { (-1.0, 1.0) };
            if raw && self.gamma != 1.0 {
                let g = self.gamma as f32;
                warped.iter_mut().for_each(|v| *v = v.max(0.0).powf(g));
            }
            if self.contrast != 1.0 {
                let mean = warped.iter().map(|&v| f64::from(v)).sum::<f64>() / plane as f64;
                let (m, c) = (mean as f32, self.contrast as f32);
                warped
                    .iter_mut()
                    .for_each(|v| *v = ((*v - m) * c + m).clamp(lo, hi));
            }
        }
        out
    }

    /// The fracture mask on the stride-8 map grid (`map_size x map_size`, row-major): a cell is
    /// 1 when any of its model pixels, pulled back through the warp, lies in a box, or when a
    /// box's centre lands in it (so a box thinner than a pixel still marks its cell); else 0.
    pub fn mask(&self, boxes: &[[f64; 4]], size: usize) -> Vec<f32> {
        let map_size = size.div_ceil(8);
        let mut mask = vec![0f32; map_size * map_size];
        if boxes.is_empty() {
            return mask;
        }
        let inside = |x: f64, y: f64| {
            boxes
                .iter()
                .any(|b| x >= b[0] && x < b[2] && y >= b[1] && y < b[3])
        };
        for (i, row) in mask.chunks_mut(map_size).enumerate() {
            for (j, cell) in row.iter_mut().enumerate() {
                'cell: for dy in 0..8 {
                    for dx in 0..8 {
                        let (x, y) = ((8 * j + dx) as f64 + 0.5, (8 * i + dy) as f64 + 0.5);
                        let (sx, sy) = self.source(x, y);
                        if inside(sx, sy) {
                            *cell = 1.0;
                            break 'cell;
                        }
                    }
                }
            }
        }
        for b in boxes {
            let (x, y) = self.target((b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0);
            if x >= 0.0 && y >= 0.0 && x < size as f64 && y < size as f64 {
                let (j, i) = ((x / 8.0) as usize, (y / 8.0) as usize);
                if i < map_size && j < map_size {
                    mask[i * map_size + j] = 1.0;
                }
            }
        }
        mask
    }
}

/// Bilinear sample at continuous pixel-centre coordinates; zero outside.
fn bilinear(img: &[f32], size: usize, x: f64, y: f64) -> f32 {
    let (x0, y0) = (x.floor(), y.floor());
    let (fx, fy) = ((x - x0) as f32, (y - y0) as f32);
    let at = |xi: f64, yi: f64| -> f32 {
        if xi < 0.0 || yi < 0.0 || xi >= size as f64 || yi >= size as f64 {
            0.0
        } else {
            img[yi as usize * size + xi as usize]
        }
    };
    let top = at(x0, y0) * (1.0 - fx) + at(x0 + 1.0, y0) * fx;
    let bottom = at(x0, y0 + 1.0) * (1.0 - fx) + at(x0 + 1.0, y0 + 1.0) * fx;
    top * (1.0 - fy) + bottom * fy
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_augmentation_is_the_identity() {
        let size = 16;
        let px: Vec<f32> = (0..size * size).map(|i| (i % 7) as f32 / 7.0).collect();
        let d = Augment::none().draw(size, &mut Rng::new(3));
        assert_eq!(d.apply(&px, Input::Raw, size), px);
        // A box over model pixels [8, 16) x [0, 3) marks map cell (row 0, column 1) only.
        let m = d.mask(&[[8.0, 0.0, 16.0, 3.0]], size);
        assert_eq!(m, vec![0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn a_horizontal_flip_moves_image_and_mask_together() {
        let size = 16;
        let mut px = vec![0f32; size * size];
        // A bright block in the top-left cell, and a box around it.
        for y in 0..8 {
            for x in 0..8 {
                px[y * size + x] = 1.0;
            }
        }
        let aug = Augment {
            flip_horizontal: true,
            ..Augment::none()
        };
        // Find a draw that flips.
        let mut rng = Rng::new(1);
        let d = loop {
            let d = aug.draw(size, &mut rng);
            if d.inverse[0][0] < 0.0 {
                break d;
            }
        };
        let out = d.apply(&px, Input::Raw, size);
        assert_eq!(out[size - 1], 1.0);
        assert_eq!(out[0], 0.0);
        let m = d.mask(&[[0.0, 0.0, 8.0, 8.0]], size);
        assert_eq!(m, vec![0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn a_thin_box_keeps_its_cell_under_any_warp() {
        let size = 64;
        let mut rng = Rng::new(9);
        for _ in 0..50 {
            let d = Augment::default().draw(size, &mut rng);
            let m = d.mask(&[[30.0, 30.0, 30.2, 34.0]], size);
            assert!(m.iter().sum::<f32>() >= 1.0);
        }
    }
}
