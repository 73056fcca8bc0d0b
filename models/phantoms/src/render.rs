//! Drawing one phantom as 12-bit pixels: soft tissue, bones, fractures, exposure, noise, padding
//! and a positional marker, with each fracture's box measured from the pixels it darkens.
//!
//! Only `+ - * /` and `sqrt` (all IEEE-exact) touch the pixels, and the noise is a hash of the
//! pixel index, so a scene gives the same pixels on every platform, and the same scene drawn with
//! and without its fractures differs only where the fractures are.

use std::ops::{Add, Mul, Sub};

/// The largest value 12 bits hold (Bits Stored 12).
pub const MAX_VALUE: u16 = 4095;
/// A lead marker stops almost every photon: near white, with no noise.
const MARKER_VALUE: u16 = 4000;
/// A pixel belongs to a fracture's box when the fracture line takes at least this much density
/// from it (in units where a shaft's cortex is about 0.7).
const BOX_THRESHOLD: f64 = 0.01;
/// Density of the medullary canal relative to cortex, on the shaft and at a bone end
/// (cancellous bone is denser than marrow).
const MEDULLA: f64 = 0.35;
const CANCELLOUS: f64 = 0.25;
/// How far from a flared end the flare reaches, and how far the rounded tip reaches beyond the
/// end, in shaft radii.
const FLARE_ZONE: f64 = 3.0;
pub(crate) const CAP: f64 = 0.6;

/// A point or a direction in pixel coordinates: x to the right, y down, origin at the top-left
/// corner of the top-left pixel (so pixel (i, j) has its centre at (i + 0.5, j + 0.5)).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub x: f64,
    pub y: f64,
}

impl Point {
    pub const fn new(x: f64, y: f64) -> Self {
        Self { x, y }
    }

    pub fn dot(self, o: Point) -> f64 {
        self.x * o.x + self.y * o.y
    }

    pub fn length(self) -> f64 {
        self.dot(self).sqrt()
    }

    /// The same direction with length 1 (a zero vector stays zero).
    pub fn unit(self) -> Point {
        let l = self.length();
        if l > 0.0 {
            self * (1.0 / l)
        } else {
            self
        }
    }

    /// Turned a quarter turn (counter-clockwise on screen).
    pub fn perp(self) -> Point {
        Point::new(self.y, -self.x)
    }

    /// Turned by the angle whose cosine and sine are `rot.x` and `rot.y` (`rot` a unit vector).
    pub fn rotate(self, rot: Point) -> Point {
        Point::new(
            self.x * rot.x - self.y * rot.y,
            self.x * rot.y + self.y * rot.x,
        )
    }
}

impl Add for Point {
    type Output = Point;
    fn add(self, o: Point) -> Point {
        Point::new(self.x + o.x, self.y + o.y)
    }
}

impl Sub for Point {
    type Output = Point;
    fn sub(self, o: Point) -> Point {
        Point::new(self.x - o.x, self.y - o.y)
    }
}

impl Mul<f64> for Point {
    type Output = Point;
    fn mul(self, k: f64) -> Point {
        Point::new(self.x * k, self.y * k)
    }
}

/// Everything that decides a phantom's pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    pub width: usize,
    pub height: usize,
    /// Soft tissue around the bones: their projected thicknesses do not add (the larger wins).
    pub limbs: Vec<Limb>,
    pub bones: Vec<Bone>,
    /// Low-frequency variation of the soft tissue's density.
    pub tissue: TissueField,
    pub exposure: Exposure,
    pub padding: Padding,
    pub marker: Option<Marker>,
    /// Seeds the per-pixel noise.
    pub noise_seed: u64,
}

/// A limb's soft tissue: a cylinder of `radius` around the segment `a`-`b`, rounded at the ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limb {
    pub a: Point,
    pub b: Point,
    pub radius: f64,
}

/// A long bone: a hollow cylinder (cortex around a medullary canal) along `a`-`b`, rounded at the
/// ends; an end inside the image is usually flared (epiphysis) with thinner cortex.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bone {
    pub a: Point,
    pub b: Point,
    /// Outer radius of the shaft, in pixels.
    pub radius: f64,
    /// Cortical thickness of the shaft, in pixels.
    pub cortex: f64,
    /// How much wider the end at `a` (and at `b`) is than the shaft, as a share of the radius.
    pub flare_a: f64,
    pub flare_b: f64,
    pub fracture: Option<Fracture>,
}

/// A fracture across a bone: a thin lucent line, the fragment beyond it (towards `b`) possibly
/// shifted sideways (a cortical step, or a displaced fracture).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fracture {
    /// Where the line crosses the bone's axis: distance from `a` along it, in pixels.
    pub at: f64,
    /// Tangent of the angle between the line and the bone's cross-section (0: transverse).
    pub obliquity: f64,
    /// Half the width of the lucent line, in pixels.
    pub half_width: f64,
    /// Share of the bone's density missing at the middle of the line (0..1; low is subtle).
    pub contrast: f64,
    /// Sideways shift of the fragment beyond the line, in pixels (0: undisplaced).
    pub displacement: f64,
    /// Share of the bone's width the line crosses (1: complete; less: it starts at one cortex).
    pub extent: f64,
    /// An incomplete line starts at the cortex on the `+perp` side (else the `-perp` side).
    pub from_positive_side: bool,
}

/// A coarse grid of multipliers, smoothly interpolated over the whole image.
#[derive(Debug, Clone, PartialEq)]
pub struct TissueField {
    pub cols: usize,
    pub rows: usize,
    /// Row-major, `cols * rows` values.
    pub values: Vec<f64>,
}

/// How densities become detector values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Exposure {
    /// Detector values per unit of transmitted signal, as a share of the 12-bit range.
    pub gain: f64,
    /// Detector value of nothing at all.
    pub offset: f64,
    /// Signal of air (no tissue), soft tissue and bone per unit of projected thickness.
    pub air: f64,
    pub soft: f64,
    pub bone: f64,
    /// Relative strength of the anode heel effect across the image, and its direction (unit).
    pub heel: f64,
    pub heel_direction: Point,
    /// Noise: a constant electronic part and a quantum part growing with the square root of the
    /// signal, in detector values.
    pub electronic: f64,
    pub quantum: f64,
}

/// Black margins (a collimated or re-padded image), in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Padding {
    pub left: usize,
    pub top: usize,
    pub right: usize,
    pub bottom: usize,
}

impl Padding {
    fn contains(&self, x: usize, y: usize, width: usize, height: usize) -> bool {
        x < self.left || y < self.top || x + self.right >= width || y + self.bottom >= height
    }
}

/// A positional (laterality) marker burned into a corner: the letter `L` or `R` as a block glyph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marker {
    pub letter: char,
    /// Top-left corner of the glyph, in pixels.
    pub x: usize,
    pub y: usize,
    /// Side of one glyph cell, in pixels.
    pub cell: usize,
}

/// Glyphs are 5 cells wide and 7 tall.
pub const GLYPH_COLS: usize = 5;
pub const GLYPH_ROWS: usize = 7;

fn glyph(letter: char) -> [u8; GLYPH_ROWS] {
    match letter {
        'L' => [
            0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b11111,
        ],
        'R' => [
            0b11110, 0b10001, 0b10001, 0b11110, 0b10100, 0b10010, 0b10001,
        ],
        _ => [0b11111; GLYPH_ROWS],
    }
}

impl Marker {
    /// The glyph's bounding rectangle `(x0, y0, x1, y1)`, x1 and y1 exclusive.
    pub fn rect(&self) -> (usize, usize, usize, usize) {
        (
            self.x,
            self.y,
            self.x + GLYPH_COLS * self.cell,
            self.y + GLYPH_ROWS * self.cell,
        )
    }

    fn lit(&self, bits: &[u8; GLYPH_ROWS], x: usize, y: usize) -> bool {
        let (x0, y0, x1, y1) = self.rect();
        if x < x0 || x >= x1 || y < y0 || y >= y1 {
            return false;
        }
        let (c, r) = ((x - x0) / self.cell, (y - y0) / self.cell);
        bits[r] >> (GLYPH_COLS - 1 - c) & 1 == 1
    }
}

/// A fracture's box in pixel coordinates: columns `x0..x1`, rows `y0..y1` (x0, y0 inclusive;
/// x1, y1 exclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FractureBox {
    pub x0: u32,
    pub y0: u32,
    pub x1: u32,
    pub y1: u32,
}

/// A drawn phantom.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    /// Row-major, `width * height` values in `0..=MAX_VALUE`.
    pub pixels: Vec<u16>,
    /// One box per fracture drawn, in the order of the bones.
    pub boxes: Vec<FractureBox>,
}

/// splitmix64's finaliser: a well-mixed 64-bit hash of a 64-bit value.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// An approximately standard normal value for pixel `index`: the sum of four 16-bit uniforms
/// (Irwin-Hall), centred and scaled to variance 1. Exact arithmetic, bounded at ±3.5 sigma.
fn gauss(seed: u64, index: u64) -> f64 {
    let h = mix64(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let lanes = (h & 0xFFFF) + (h >> 16 & 0xFFFF) + (h >> 32 & 0xFFFF) + (h >> 48);
    // Four uniforms on [0, 1) sum to mean 2 and variance 1/3.
    (lanes as f64 / 65536.0 - 2.0) * 3f64.sqrt()
}

/// A bone with its directions worked out once.
struct Prepared {
    a: Point,
    dir: Point,
    perp: Point,
    len: f64,
    radius: f64,
    cortex: f64,
    flare_a: f64,
    flare_b: f64,
    /// No part of the bone is farther than this from its axis segment.
    reach: f64,
    fracture: Option<PreparedFracture>,
}

struct PreparedFracture {
    /// Where the line crosses the axis.
    centre: Point,
    /// Unit normal of the line, pointing towards `b`.
    normal: Point,
    /// Unit direction of the line.
    along: Point,
    half_width: f64,
    contrast: f64,
    displacement: f64,
    /// The stretch of the line that is drawn, as positions along it from `centre`.
    from: f64,
    to: f64,
}

/// A smooth bump: 1 at 0, falling to 0 at 1 with zero slope at both ends.
fn end_weight(x: f64) -> f64 {
    if x >= 1.0 {
        0.0
    } else {
        let t = 1.0 - x * x;
        t * t
    }
}

impl Prepared {
    fn new(bone: &Bone, with_fracture: bool) -> Self {
        let axis = bone.b - bone.a;
        let len = axis.length();
        let dir = axis.unit();
        let perp = dir.perp();
        let radius = bone.radius.max(0.5);
        let mut p = Prepared {
            a: bone.a,
            dir,
            perp,
            len,
            radius,
            cortex: bone.cortex.clamp(0.0, radius),
            flare_a: bone.flare_a.max(0.0),
            flare_b: bone.flare_b.max(0.0),
            reach: 0.0,
            fracture: None,
        };
        let displacement = bone.fracture.map_or(0.0, |f| f.displacement.abs());
        p.reach = radius * (1.0 + p.flare_a.max(p.flare_b)) + displacement + 1.0;
        if let Some(f) = bone.fracture.filter(|_| with_fracture) {
            let along = (perp + dir * f.obliquity).unit();
            // The normal of the line, turned to point along the bone towards `b`.
            let mut normal = along.perp();
            if normal.dot(dir) < 0.0 {
                normal = normal * -1.0;
            }
            // Half the line's length across the bone, where it meets the outer surface.
            let outer = p.outer_radius(f.at.clamp(0.0, len));
            let half = outer * (1.0 + f.obliquity * f.obliquity).sqrt();
            let extent = f.extent.clamp(0.0, 1.0);
            let (from, to) = if extent >= 1.0 {
                (f64::NEG_INFINITY, f64::INFINITY)
            } else if f.from_positive_side {
                // `along` has a positive component along `perp`: +perp is at the line's end.
                (half - 2.0 * half * extent, f64::INFINITY)
            } else {
                (f64::NEG_INFINITY, -half + 2.0 * half * extent)
            };
            p.fracture = Some(PreparedFracture {
                centre: bone.a + dir * f.at,
                normal,
                along,
                half_width: f.half_width.max(0.5),
                contrast: f.contrast.clamp(0.0, 1.0),
                displacement: f.displacement,
                from,
                to,
            });
        }
        p
    }

    /// Flare weights of the two ends at a position along the axis.
    fn ends(&self, s: f64) -> (f64, f64) {
        let zone = self.radius * FLARE_ZONE;
        (
            if self.flare_a > 0.0 {
                end_weight(s / zone)
            } else {
                0.0
            },
            if self.flare_b > 0.0 {
                end_weight((self.len - s) / zone)
            } else {
                0.0
            },
        )
    }

    fn outer_radius(&self, s: f64) -> f64 {
        let (wa, wb) = self.ends(s);
        self.radius * (1.0 + self.flare_a * wa + self.flare_b * wb)
    }

    /// Projected density at axial position `s` and signed distance `d` from the axis: the chord
    /// through the cortex plus the (lighter) chord through the canal, over the bone's diameter.
    fn profile(&self, s: f64, d: f64) -> f64 {
        if d.abs() >= self.reach || s <= -self.reach || s >= self.len + self.reach {
            return 0.0;
        }
        // Beyond an end the bone is rounded: the distance to the end counts like `d`.
        let (sc, beyond) = if s < 0.0 {
            (0.0, -s)
        } else if s > self.len {
            (self.len, s - self.len)
        } else {
            (s, 0.0)
        };
        let (wa, wb) = self.ends(sc);
        let end = wa.max(wb);
        let outer = self.radius * (1.0 + self.flare_a * wa + self.flare_b * wb);
        // The articular surface is a flattened dome, not a ball.
        let beyond = beyond * outer / (CAP * self.radius);
        let r2 = d * d + beyond * beyond;
        if r2 >= outer * outer {
            return 0.0;
        }
        let inner = (outer - self.cortex * (1.0 - 0.6 * end)).max(0.0);
        let outer_chord = 2.0 * (outer * outer - r2).sqrt();
        let inner_chord = if r2 < inner * inner {
            2.0 * (inner * inner - r2).sqrt()
        } else {
            0.0
        };
        let canal = MEDULLA + CANCELLOUS * end;
        // Over the local diameter: a wide end is mostly light cancellous bone, not a bright ball.
        (outer_chord - inner_chord + canal * inner_chord) / (2.0 * outer)
    }

    /// Density at `p`, and how much of it the fracture line took away.
    fn density(&self, p: Point) -> (f64, f64) {
        let v = p - self.a;
        let (s, d) = (v.dot(self.dir), v.dot(self.perp));
        let Some(f) = &self.fracture else {
            return (self.profile(s, d), 0.0);
        };
        let q = p - f.centre;
        let e = q.dot(f.normal);
        let density = if e > 0.0 {
            self.profile(s, d - f.displacement)
        } else {
            self.profile(s, d)
        };
        if density <= 0.0 || e.abs() >= f.half_width {
            return (density, 0.0);
        }
        let u = q.dot(f.along);
        let outside = (f.from - u).max(u - f.to).max(0.0);
        let taper = (1.0 - outside / f.half_width).max(0.0);
        let r = e / f.half_width;
        let dark = density * f.contrast * (1.0 - r * r) * taper;
        (density - dark, dark)
    }
}

/// Soft-tissue thickness at `p` through one limb, as a share of its diameter.
fn limb_thickness(limb: &Limb, p: Point) -> f64 {
    let ab = limb.b - limb.a;
    let l2 = ab.dot(ab);
    let t = if l2 > 0.0 {
        ((p - limb.a).dot(ab) / l2).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let r = p - (limb.a + ab * t);
    let x = r.dot(r) / (limb.radius * limb.radius);
    if x >= 1.0 {
        0.0
    } else {
        (1.0 - x).sqrt()
    }
}

/// Smoothstep interpolation between grid values `a` and `b`.
fn blend(a: f64, b: f64, t: f64) -> f64 {
    a + (b - a) * (t * t * (3.0 - 2.0 * t))
}

impl TissueField {
    /// The field along the row at relative height `v` (0..1), one value per grid column.
    fn row(&self, v: f64, out: &mut Vec<f64>) {
        out.clear();
        if self.cols == 0 || self.rows == 0 || self.values.len() != self.cols * self.rows {
            return;
        }
        let fy = (v * (self.rows - 1) as f64).clamp(0.0, (self.rows - 1) as f64);
        let j = (fy as usize).min(self.rows.saturating_sub(2));
        let j1 = (j + 1).min(self.rows - 1);
        let t = fy - j as f64;
        for c in 0..self.cols {
            out.push(blend(
                self.values[j * self.cols + c],
                self.values[j1 * self.cols + c],
                t,
            ));
        }
    }
}

/// The value of a row of the field at relative position `u` (0..1); 1 when the field is empty.
fn along_row(row: &[f64], u: f64) -> f64 {
    match row.len() {
        0 => 1.0,
        1 => row[0],
        n => {
            let fx = (u * (n - 1) as f64).clamp(0.0, (n - 1) as f64);
            let i = (fx as usize).min(n - 2);
            blend(row[i], row[i + 1], fx - i as f64)
        }
    }
}

/// Pixels a fracture darkened, as a running bounding box.
#[derive(Clone, Copy)]
struct Bounds {
    x0: usize,
    y0: usize,
    x1: usize,
    y1: usize,
}

impl Bounds {
    const EMPTY: Bounds = Bounds {
        x0: usize::MAX,
        y0: usize::MAX,
        x1: 0,
        y1: 0,
    };

    fn add(&mut self, x: usize, y: usize) {
        self.x0 = self.x0.min(x);
        self.y0 = self.y0.min(y);
        self.x1 = self.x1.max(x + 1);
        self.y1 = self.y1.max(y + 1);
    }

    fn to_box(self) -> Option<FractureBox> {
        (self.x1 > self.x0 && self.y1 > self.y0).then_some(FractureBox {
            x0: self.x0 as u32,
            y0: self.y0 as u32,
            x1: self.x1 as u32,
            y1: self.y1 as u32,
        })
    }
}

/// Draws the scene; `with_fractures: false` draws the same radiograph (same noise, same
/// everything) with its bones intact, and then no boxes.
pub fn render(scene: &Scene, with_fractures: bool) -> Image {
    let (width, height) = (scene.width, scene.height);
    let bones: Vec<Prepared> = scene
        .bones
        .iter()
        .map(|b| Prepared::new(b, with_fractures))
        .collect();
    let e = &scene.exposure;
    let glyph = scene.marker.map(|m| (m, glyph(m.letter)));
    let mut bounds = vec![Bounds::EMPTY; bones.len()];
    let mut pixels = vec![0u16; width * height];
    let mut tissue_row = Vec::with_capacity(scene.tissue.cols);
    let (w, h) = (width.max(1) as f64, height.max(1) as f64);
    let full_scale = f64::from(MAX_VALUE);
    for (y, row) in pixels.chunks_mut(width.max(1)).enumerate() {
        let py = y as f64 + 0.5;
        scene.tissue.row(py / h, &mut tissue_row);
        for (x, out) in row.iter_mut().enumerate() {
            if scene.padding.contains(x, y, width, height) {
                *out = 0;
                continue;
            }
            let in_marker = match &glyph {
                Some((m, bits)) => {
                    if m.lit(bits, x, y) {
                        *out = MARKER_VALUE;
                        continue;
                    }
                    let (x0, y0, x1, y1) = m.rect();
                    (x0..x1).contains(&x) && (y0..y1).contains(&y)
                }
                None => false,
            };
            let p = Point::new(x as f64 + 0.5, py);
            let soft = scene
                .limbs
                .iter()
                .map(|l| limb_thickness(l, p))
                .fold(0.0, f64::max);
            let mut bone = 0.0;
            for (k, b) in bones.iter().enumerate() {
                let (density, dark) = b.density(p);
                bone += density;
                if dark > BOX_THRESHOLD && !in_marker {
                    bounds[k].add(x, y);
                }
            }
            let u = p.x / w;
            let tissue = along_row(&tissue_row, u);
            let heel = 1.0
                + e.heel * ((u - 0.5) * e.heel_direction.x + (py / h - 0.5) * e.heel_direction.y);
            let signal = heel * (e.air + e.soft * soft * tissue + e.bone * bone);
            let value = e.offset + e.gain * signal * full_scale;
            let sigma = e.electronic + e.quantum * value.max(0.0).sqrt();
            let index = (y * width + x) as u64;
            let noisy = value + sigma * gauss(scene.noise_seed, index);
            *out = noisy.round().clamp(0.0, full_scale) as u16;
        }
    }
    let boxes = bones
        .iter()
        .zip(&bounds)
        .filter(|(b, _)| b.fracture.is_some())
        .filter_map(|(_, bd)| bd.to_box())
        .collect();
    Image {
        width,
        height,
        pixels,
        boxes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bone() -> Bone {
        Bone {
            a: Point::new(-500.0, 50.0),
            b: Point::new(600.0, 50.0),
            radius: 20.0,
            cortex: 6.0,
            flare_a: 0.0,
            flare_b: 0.0,
            fracture: None,
        }
    }

    #[test]
    fn noise_is_standard_and_reproducible() {
        let n = 200_000u64;
        let xs: Vec<f64> = (0..n).map(|i| gauss(7, i)).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "{mean}");
        assert!((var - 1.0).abs() < 0.02, "{var}");
        assert_eq!(gauss(7, 12345), gauss(7, 12345));
        assert_ne!(gauss(7, 12345), gauss(8, 12345));
    }

    #[test]
    fn cortex_is_brighter_than_canal_and_nothing_outside() {
        let b = Prepared::new(&bone(), true);
        let wall = b.density(Point::new(100.0, 50.0 + 15.0)).0;
        let canal = b.density(Point::new(100.0, 50.0)).0;
        let outside = b.density(Point::new(100.0, 50.0 + 21.0)).0;
        assert!(wall > canal * 1.15, "wall {wall} canal {canal}");
        assert!(canal > 0.3, "{canal}");
        assert_eq!(outside, 0.0);
    }

    #[test]
    fn a_flared_end_is_wider_and_rounded() {
        let mut joint = bone();
        joint.b = Point::new(100.0, 50.0);
        joint.flare_b = 0.8;
        let b = Prepared::new(&joint, true);
        assert!(b.density(Point::new(95.0, 50.0 + 30.0)).0 > 0.0);
        assert_eq!(b.density(Point::new(20.0, 50.0 + 30.0)).0, 0.0);
        assert!(b.density(Point::new(110.0, 50.0)).0 > 0.0);
        assert_eq!(b.density(Point::new(140.0, 50.0)).0, 0.0);
    }

    #[test]
    fn the_line_darkens_only_inside_the_bone_and_incomplete_lines_stop() {
        let mut f = bone();
        f.fracture = Some(Fracture {
            at: 600.0,
            obliquity: 0.0,
            half_width: 2.0,
            contrast: 0.8,
            displacement: 0.0,
            extent: 0.5,
            from_positive_side: false,
        });
        let b = Prepared::new(&f, true);
        let (_, dark_near) = b.density(Point::new(100.0, 50.0 + 15.0));
        let (_, dark_far) = b.density(Point::new(100.0, 50.0 - 15.0));
        let (_, dark_off) = b.density(Point::new(110.0, 50.0 + 15.0));
        // `perp` of +x is -y on screen: the -perp side is +y.
        assert!(dark_near > 0.3, "{dark_near}");
        assert_eq!(dark_far, 0.0);
        assert_eq!(dark_off, 0.0);
        let intact = Prepared::new(&f, false);
        assert_eq!(intact.density(Point::new(100.0, 65.0)).1, 0.0);
    }
}
