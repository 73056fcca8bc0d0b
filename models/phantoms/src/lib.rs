//! Synthetic radiograph phantoms (long bones and joints, about a third fractured) written as DICOM
//! DX files with a box-labels CSV, deterministic for a seed: for training, calibration and tests.
//!
//! [`plan`] decides every phantom (patient, study, region, geometry, fractures) from the seed
//! alone; [`render::render`] draws one; [`generate`] draws them all and writes
//! `DIR/phantom-NNNNN.dcm` and `DIR/labels.csv`. Nothing here is a patient, and every file says
//! so (SeriesDescription, ImageComments, PatientName `PHANTOM^NNNN`).

pub mod render;

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use dicom_core::value::{DataSetSequence, PrimitiveValue, C};
use dicom_core::{dicom_value, DataElement, Length, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};

use render::{
    Bone, Exposure, Fracture, Image, Limb, Marker, Padding, Point, Scene, TissueField, GLYPH_COLS,
    GLYPH_ROWS, MAX_VALUE,
};

/// Digital X-Ray Image Storage - For Presentation.
pub const SOP_CLASS_UID: &str = uids::DIGITAL_X_RAY_IMAGE_STORAGE_FOR_PRESENTATION;
/// What every phantom's SeriesDescription says.
pub const SERIES_DESCRIPTION: &str = "SYNTHETIC PHANTOM - NOT A PATIENT";
/// The header of `labels.csv`, as `fracture evaluate` and `fracture scan --labels` read it.
pub const LABELS_HEADER: &str = "sop_instance_uid,region,fracture,x0,y0,x1,y1";

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct PhantomConfig {
    /// How many radiographs to write.
    pub count: usize,
    /// The same seed (and settings) gives byte-identical files.
    pub seed: u64,
    /// Output folder, created if missing; files of an earlier run with the same names are replaced.
    pub out: PathBuf,
    /// Each side (width and height, independently) is drawn from `min_side..=max_side` pixels.
    pub min_side: u32,
    pub max_side: u32,
    /// Share of radiographs with a fracture.
    pub fracture_rate: f64,
}

impl Default for PhantomConfig {
    fn default() -> Self {
        Self {
            count: 100,
            seed: 2020,
            out: PathBuf::from("phantoms"),
            min_side: 1500,
            max_side: 3000,
            fracture_rate: 1.0 / 3.0,
        }
    }
}

/// Smallest side that still holds a bone, a marker and a fracture line.
pub const MIN_SIDE: u32 = 64;
/// Largest side: 8192² pixels are 128 MiB as 16-bit, plenty for any detector.
pub const MAX_SIDE: u32 = 8192;

/// Why phantoms could not be generated; each message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum PhantomError {
    #[error("invalid phantom settings: {0}")]
    Config(String),
    #[error(
        "cannot write {path}: {source}; check that the folder is writable and the disk has space"
    )]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build the DICOM file {path}: {message} (a bug in fracture-phantoms; please report it)")]
    Dicom { path: PathBuf, message: String },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> PhantomError + '_ {
    move |source| PhantomError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub files: usize,
    /// Radiographs with at least one fracture (one labels row per box).
    pub fractured: usize,
    pub boxes: usize,
    pub patients: usize,
    /// Radiographs per region (the taxonomy's names, as in `labels.csv`).
    pub regions: BTreeMap<&'static str, usize>,
    pub out: PathBuf,
    pub labels: PathBuf,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let regions: Vec<String> = self
            .regions
            .iter()
            .map(|(r, n)| format!("{r} {n}"))
            .collect();
        write!(
            f,
            "wrote {} phantoms ({} fractured, {} boxes, {} patients) to {}; regions: {}; labels: {}",
            self.files,
            self.fractured,
            self.boxes,
            self.patients,
            self.out.display(),
            if regions.is_empty() {
                "none".to_string()
            } else {
                regions.join(", ")
            },
            self.labels.display()
        )
    }
}

/// splitmix64: a seeded stream of well-mixed 64-bit values, with the few draws planning needs.
/// Only exact arithmetic and `sqrt`, so a seed plans the same phantoms on every platform.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        render::mix64(self.0)
    }

    /// Uniform on [0, 1), exact: 53 random bits scaled by a power of two.
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform on `0..n` (`n > 0`), without modulo bias worth mentioning.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    fn chance(&mut self, p: f64) -> bool {
        self.uniform() < p
    }

    fn sign(&mut self) -> f64 {
        if self.chance(0.5) {
            1.0
        } else {
            -1.0
        }
    }

    /// A direction uniform on the circle, by rejection from the square (no trigonometry).
    fn direction(&mut self) -> Point {
        loop {
            let p = Point::new(self.range(-1.0, 1.0), self.range(-1.0, 1.0));
            let l2 = p.dot(p);
            if l2 > 1e-4 && l2 <= 1.0 {
                return p.unit();
            }
        }
    }

    /// A rotation by an angle whose tangent is uniform on `-max..max`, as (cos, sin).
    fn turn(&mut self, max_tangent: f64) -> Point {
        Point::new(1.0, self.range(-max_tangent, max_tangent)).unit()
    }
}

/// A seed for stream `k` of `seed`: streams never overlap in practice.
fn stream(seed: u64, k: u64) -> u64 {
    render::mix64(seed ^ render::mix64(k.wrapping_add(0xD1B5_4A32_D192_ED03)))
}

/// One kind of radiograph the generator draws.
#[derive(Debug, Clone, Copy)]
struct Anatomy {
    /// BodyPartExamined (DICOM PS3.16 Annex L defined terms).
    body_part: &'static str,
    /// The region `fracture_shared::region::classify` gives it.
    region: &'static str,
    /// Anatomic Region Sequence: SNOMED CT code value and meaning.
    code: (&'static str, &'static str),
    /// Outer radius of the main bone's shaft, as a share of the image's shorter side.
    radius: f64,
    /// Two bones side by side (radius and ulna, tibia and fibula, metacarpals) before the joint,
    /// or along the whole image when it shows no joint; and beyond the joint.
    pair_before: bool,
    pair_after: bool,
    /// Chance that the image shows a joint: two bone ends facing each other across a gap.
    joint: f64,
    /// Radius of the bone beyond the joint, as a share of the main bone's.
    after_radius: f64,
    /// How much wider the bone ends at the joint are than the shaft (range, as a share).
    flare: (f64, f64),
    /// Largest slope of the axis from horizontal (the clavicle lies nearly level); `None`: any.
    slope: Option<f64>,
}

/// One anatomy per region our rule table knows, except the spine and pelvis (not long bones).
/// Columns: BodyPartExamined, region, SNOMED CT code (CID 4031), radius, pairs (before, after
/// the joint), joint chance, radius after the joint, flare range, slope.
#[rustfmt::skip]
const ANATOMIES: [Anatomy; 13] = [
    anatomy("HAND",     "hand",         ("85562004", "Hand"),        0.020, (true, true),   0.6,  0.8, (0.3, 0.6), None),
    anatomy("WRIST",    "wrist",        ("74670003", "Wrist joint"), 0.032, (true, true),   0.9,  0.6, (0.4, 0.8), None),
    anatomy("FOREARM",  "forearm",      ("14975008", "Forearm"),     0.030, (true, false),  0.25, 1.4, (0.4, 0.7), None),
    anatomy("ELBOW",    "elbow",        ("16953009", "Elbow joint"), 0.040, (false, true),  1.0,  0.7, (0.5, 0.9), None),
    anatomy("HUMERUS",  "humerus",      ("85050009", "Humerus"),     0.050, (false, false), 0.25, 0.7, (0.5, 0.9), None),
    anatomy("SHOULDER", "shoulder",     ("16982005", "Shoulder"),    0.055, (false, false), 1.0,  0.8, (0.8, 1.2), None),
    anatomy("CLAVICLE", "clavicle",     ("51299004", "Clavicle"),    0.028, (false, false), 0.15, 0.9, (0.3, 0.5), Some(0.35)),
    anatomy("HIP",      "hip",          ("24136001", "Hip joint"),   0.060, (false, false), 1.0,  1.0, (0.9, 1.3), None),
    anatomy("FEMUR",    "femur",        ("71341001", "Femur"),       0.060, (false, false), 0.25, 0.9, (0.5, 0.9), None),
    anatomy("KNEE",     "knee",         ("72696002", "Knee"),        0.060, (false, true),  1.0,  0.9, (0.5, 0.9), None),
    anatomy("LEG",      "tibia_fibula", ("30021000", "Lower leg"),   0.045, (true, false),  0.2,  1.2, (0.4, 0.8), None),
    anatomy("ANKLE",    "ankle",        ("70258002", "Ankle joint"), 0.045, (true, false),  1.0,  0.8, (0.4, 0.8), None),
    anatomy("FOOT",     "foot",         ("56459004", "Foot"),        0.018, (true, true),   0.5,  0.8, (0.3, 0.6), None),
];

#[allow(clippy::too_many_arguments)]
const fn anatomy(
    body_part: &'static str,
    region: &'static str,
    code: (&'static str, &'static str),
    radius: f64,
    (pair_before, pair_after): (bool, bool),
    joint: f64,
    after_radius: f64,
    flare: (f64, f64),
    slope: Option<f64>,
) -> Anatomy {
    Anatomy {
        body_part,
        region,
        code,
        radius,
        pair_before,
        pair_after,
        joint,
        after_radius,
        flare,
        slope,
    }
}

/// The `(BodyPartExamined, region)` pairs phantoms are drawn from.
pub fn body_parts() -> impl Iterator<Item = (&'static str, &'static str)> {
    ANATOMIES.iter().map(|a| (a.body_part, a.region))
}

/// The synthetic person a phantom belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patient {
    /// 1-based within the run.
    pub number: usize,
    /// `PHANTOM^0042`.
    pub name: String,
    /// `PH-<seed>-<number>`.
    pub id: String,
    /// `M` or `F`.
    pub sex: &'static str,
    /// In years.
    pub age: u32,
}

/// One planned radiograph: who, what, where, and the scene to draw.
#[derive(Debug, Clone, PartialEq)]
pub struct Phantom {
    /// 0-based within the run.
    pub index: usize,
    /// `phantom-00001.dcm`...
    pub file_name: String,
    pub patient: Patient,
    pub body_part: &'static str,
    pub region: &'static str,
    /// Anatomic Region Sequence: SNOMED CT code value and meaning.
    pub anatomic_region: (&'static str, &'static str),
    /// ViewPosition: `AP`, `PA`, `LL` or `RL`.
    pub view: &'static str,
    /// `L` or `R`: ImageLaterality and the burned-in marker.
    pub laterality: char,
    /// One study per patient; one series per radiograph.
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub sop_instance_uid: String,
    /// 1-based position in the study (SeriesNumber).
    pub series_number: usize,
    /// `YYYYMMDD` and `HHMMSS`.
    pub study_date: String,
    pub study_time: String,
    pub scene: Scene,
}

impl Phantom {
    /// Whether the scene holds a fracture (the drawn image then has at least one box).
    pub fn fractured(&self) -> bool {
        self.scene.bones.iter().any(|b| b.fracture.is_some())
    }
}

fn validate(cfg: &PhantomConfig) -> Result<(), PhantomError> {
    let bad = |m: String| Err(PhantomError::Config(m));
    if cfg.min_side < MIN_SIDE {
        return bad(format!(
            "min_side is {}: a phantom needs at least {MIN_SIDE} pixels per side to hold a bone and its marker; use --min-side {MIN_SIDE} or more",
            cfg.min_side
        ));
    }
    if cfg.max_side > MAX_SIDE {
        return bad(format!(
            "max_side is {}: detectors are at most a few thousand pixels across and the generator stops at {MAX_SIDE}; use --max-side {MAX_SIDE} or less",
            cfg.max_side
        ));
    }
    if cfg.min_side > cfg.max_side {
        return bad(format!(
            "min_side {} is larger than max_side {}; give a --min-side no larger than --max-side",
            cfg.min_side, cfg.max_side
        ));
    }
    if !(0.0..=1.0).contains(&cfg.fracture_rate) {
        return bad(format!(
            "fracture_rate is {}; give a share between 0 and 1",
            cfg.fracture_rate
        ));
    }
    Ok(())
}

/// The UID root of a seed: `2.25.` and a 96-bit hash of it in decimal (at most 34 characters,
/// so the study, series and instance UIDs under it stay well inside 64).
pub fn uid_root(seed: u64) -> String {
    let hi = u128::from(stream(seed, 1) >> 32);
    let lo = u128::from(stream(seed, 2));
    format!("2.25.{}", (hi << 64 | lo).max(1))
}

/// `days` after 2015-01-01 as `YYYYMMDD` (the proleptic Gregorian calendar).
fn date_after_2015(days: u64) -> String {
    let (mut year, mut left) = (2015u64, days);
    loop {
        let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
        let len = if leap { 366 } else { 365 };
        if left < len {
            let months = [
                31,
                if leap { 29 } else { 28 },
                31,
                30,
                31,
                30,
                31,
                31,
                30,
                31,
                30,
                31,
            ];
            let mut month = 0;
            while left >= months[month] {
                left -= months[month];
                month += 1;
            }
            return format!("{year:04}{:02}{:02}", month + 1, left + 1);
        }
        left -= len;
        year += 1;
    }
}

/// ViewPosition and its View Code Sequence entry (SNOMED CT, CID 4010).
const VIEWS: [(&str, &str, &str); 4] = [
    ("AP", "399348003", "antero-posterior"),
    ("PA", "272479007", "postero-anterior"),
    ("LL", "399173006", "left lateral"),
    ("RL", "399198007", "right lateral"),
];

/// Decides every phantom of a run (cheap: no pixels). Phantom `i` depends only on the seed, the
/// sides and the rate, not on `count` (except that the last patient may lose later views, and
/// file names widen past 99999 files).
pub fn plan(cfg: &PhantomConfig) -> Result<Vec<Phantom>, PhantomError> {
    validate(cfg)?;
    let root = uid_root(cfg.seed);
    let digits = cfg.count.to_string().len().max(5);
    let mut people = Rng::new(stream(cfg.seed, 3));
    let mut out = Vec::with_capacity(cfg.count);
    let mut number = 0usize;
    while out.len() < cfg.count {
        number += 1;
        // One to three radiographs per patient (two on average, so about count/2 patients):
        // a study of one region, one view per radiograph.
        let views = 1 + people.below(3) as usize;
        let anatomy = ANATOMIES[people.below(ANATOMIES.len() as u64) as usize];
        let patient = Patient {
            number,
            name: format!("PHANTOM^{number:04}"),
            id: format!("PH-{}-{number}", cfg.seed),
            sex: if people.chance(0.5) { "F" } else { "M" },
            age: 5 + people.below(86) as u32,
        };
        let laterality = if people.chance(0.5) { 'L' } else { 'R' };
        let study_date = date_after_2015(people.below(6 * 365));
        let seconds = 7 * 3600 + people.below(15 * 3600);
        let first_view = people.below(VIEWS.len() as u64) as usize;
        for v in 0..views {
            if out.len() == cfg.count {
                break;
            }
            let index = out.len();
            let mut rng = Rng::new(stream(cfg.seed, 1000 + index as u64));
            let scene = plan_scene(&mut rng, cfg, &anatomy, laterality);
            let t = seconds + 40 * v as u64;
            out.push(Phantom {
                index,
                file_name: format!("phantom-{:0digits$}.dcm", index + 1),
                patient: patient.clone(),
                body_part: anatomy.body_part,
                region: anatomy.region,
                anatomic_region: anatomy.code,
                view: VIEWS[(first_view + v) % VIEWS.len()].0,
                laterality,
                study_instance_uid: format!("{root}.1.{number}"),
                series_instance_uid: format!("{root}.2.{}", index + 1),
                sop_instance_uid: format!("{root}.3.{}", index + 1),
                series_number: v + 1,
                study_date: study_date.clone(),
                study_time: format!("{:02}{:02}{:02}", t / 3600, t / 60 % 60, t % 60),
                scene,
            });
        }
    }
    Ok(out)
}

/// The stretch `[t0, t1]` of the segment `a + dir * t` (t in `0..=len`) inside the rectangle.
fn clip(a: Point, dir: Point, len: f64, lo: Point, hi: Point) -> Option<(f64, f64)> {
    let (mut t0, mut t1) = (0.0f64, len);
    for (p, d, l, h) in [(a.x, dir.x, lo.x, hi.x), (a.y, dir.y, lo.y, hi.y)] {
        if d.abs() < 1e-12 {
            if p < l || p > h {
                return None;
            }
        } else {
            let (u, v) = ((l - p) / d, (h - p) / d);
            t0 = t0.max(u.min(v));
            t1 = t1.min(u.max(v));
        }
    }
    (t0 <= t1).then_some((t0, t1))
}

/// A group of one or two parallel bones along `a`-`b` with the main bone's radius.
struct Group {
    bones: Vec<Bone>,
    limb: Limb,
}

#[allow(clippy::too_many_arguments)]
fn group(
    rng: &mut Rng,
    a: Point,
    b: Point,
    radius: f64,
    pair: bool,
    flare_a: f64,
    flare_b: f64,
) -> Group {
    let dir = (b - a).unit();
    let perp = dir.perp();
    let cortex = |rng: &mut Rng, r: f64| r * rng.range(0.2, 0.32);
    let mut bones = vec![Bone {
        a,
        b,
        radius,
        cortex: cortex(rng, radius),
        flare_a,
        flare_b,
        fracture: None,
    }];
    let mut centre_shift = 0.0;
    let mut half_span = radius;
    if pair {
        let r2 = radius * rng.range(0.55, 0.8);
        let offset = (radius + r2 + radius * rng.range(0.3, 0.8)) * rng.sign();
        // The companion ends a little short of (or past) the main bone at a joint.
        let stagger = |rng: &mut Rng, f: f64| {
            if f > 0.0 {
                dir * (radius * rng.range(-0.4, 0.2))
            } else {
                Point::new(0.0, 0.0)
            }
        };
        let sa = stagger(rng, flare_a);
        let sb = stagger(rng, flare_b);
        bones.push(Bone {
            a: a + perp * offset - sa,
            b: b + perp * offset + sb,
            radius: r2,
            cortex: cortex(rng, r2),
            flare_a: flare_a * 0.8,
            flare_b: flare_b * 0.8,
            fracture: None,
        });
        centre_shift = offset / 2.0;
        half_span = (offset.abs() + radius + r2) / 2.0;
    }
    let limb = Limb {
        a: a + perp * centre_shift,
        b: b + perp * centre_shift,
        radius: half_span * rng.range(2.2, 3.2),
    };
    Group { bones, limb }
}

/// Draws one scene's geometry, exposure and artefacts.
fn plan_scene(rng: &mut Rng, cfg: &PhantomConfig, anatomy: &Anatomy, laterality: char) -> Scene {
    let side = |rng: &mut Rng| {
        cfg.min_side as usize + rng.below(u64::from(cfg.max_side - cfg.min_side) + 1) as usize
    };
    let (width, height) = (side(rng), side(rng));
    let (w, h) = (width as f64, height as f64);
    let short = w.min(h);
    let fractured = rng.chance(cfg.fracture_rate);
    let radius = anatomy.radius * short * rng.range(0.85, 1.15);
    let dir = match anatomy.slope {
        Some(s) => Point::new(rng.sign(), rng.range(-s, s)).unit(),
        None => rng.direction(),
    };
    let centre = Point::new(w * rng.range(0.38, 0.62), h * rng.range(0.38, 0.62));
    // Far enough that a bone leaving the image never shows its end.
    let far = 1.5 * (w * w + h * h).sqrt();
    let mut groups = Vec::new();
    if rng.chance(anatomy.joint) {
        // The joint space between the two rounded tips.
        let gap = radius * rng.range(0.15, 0.4);
        let dir2 = dir.rotate(rng.turn(0.5));
        let (f_lo, f_hi) = anatomy.flare;
        let flare_before = rng.range(f_lo, f_hi);
        let flare_after = rng.range(f_lo, f_hi) * 0.8;
        groups.push(group(
            rng,
            centre - dir * far,
            centre - dir * (gap / 2.0 + render::CAP * radius),
            radius,
            anatomy.pair_before,
            0.0,
            flare_before,
        ));
        let radius_after = radius * anatomy.after_radius * rng.range(0.9, 1.1);
        groups.push(group(
            rng,
            centre + dir2 * (gap / 2.0 + render::CAP * radius_after),
            centre + dir2 * far,
            radius_after,
            anatomy.pair_after,
            flare_after,
            0.0,
        ));
    } else {
        groups.push(group(
            rng,
            centre - dir * far,
            centre + dir * far,
            radius,
            anatomy.pair_before,
            0.0,
            0.0,
        ));
    }
    let limbs: Vec<Limb> = groups.iter().map(|g| g.limb).collect();
    if fractured {
        // One bone; in a pair, sometimes both (a both-bone forearm or leg fracture).
        let g = rng.below(groups.len() as u64) as usize;
        let n = groups[g].bones.len();
        let first = rng.below(n as u64) as usize;
        let both = n == 2 && rng.chance(0.35);
        for k in 0..n {
            if k == first || both {
                let bone = &mut groups[g].bones[k];
                bone.fracture = Some(plan_fracture(rng, bone, w, h, short));
            }
        }
    }
    let bones = groups.into_iter().flat_map(|g| g.bones).collect();
    let exposure = Exposure {
        gain: rng.range(0.55, 0.95),
        offset: rng.range(40.0, 300.0),
        air: rng.range(0.01, 0.05),
        soft: rng.range(0.18, 0.3),
        bone: rng.range(0.55, 0.8),
        heel: rng.range(0.0, 0.12),
        heel_direction: rng.direction(),
        electronic: rng.range(3.0, 10.0),
        quantum: rng.range(0.4, 1.4),
    };
    let (cols, rows) = (6, 6);
    let tissue = TissueField {
        cols,
        rows,
        values: (0..cols * rows).map(|_| rng.range(0.8, 1.2)).collect(),
    };
    let mut padding = Padding::default();
    if rng.chance(0.25) {
        let margin = |rng: &mut Rng, len: usize| {
            if rng.chance(0.5) {
                1 + (len as f64 * rng.range(0.02, 0.07)) as usize
            } else {
                0
            }
        };
        padding = Padding {
            left: margin(rng, width),
            top: margin(rng, height),
            right: margin(rng, width),
            bottom: margin(rng, height),
        };
        if padding == Padding::default() {
            padding.top = 1 + (height as f64 * 0.04) as usize;
        }
    }
    let cell = (short as usize / 180).max(2);
    let corner = rng.below(4);
    let inset_x = (width / 50).max(2);
    let inset_y = (height / 50).max(2);
    let (gw, gh) = (GLYPH_COLS * cell, GLYPH_ROWS * cell);
    let x = if corner.is_multiple_of(2) {
        padding.left + inset_x
    } else {
        width.saturating_sub(padding.right + inset_x + gw)
    };
    let y = if corner < 2 {
        padding.top + inset_y
    } else {
        height.saturating_sub(padding.bottom + inset_y + gh)
    };
    Scene {
        width,
        height,
        limbs,
        bones,
        tissue,
        exposure,
        padding,
        marker: Some(Marker {
            letter: laterality,
            x,
            y,
            cell,
        }),
        noise_seed: rng.next_u64(),
    }
}

/// A fracture on `bone` where it crosses the middle of the image (away from padding and marker).
fn plan_fracture(rng: &mut Rng, bone: &Bone, w: f64, h: f64, short: f64) -> Fracture {
    let axis = bone.b - bone.a;
    let (len, dir) = (axis.length(), axis.unit());
    let lo = Point::new(0.25 * w, 0.25 * h);
    let hi = Point::new(0.75 * w, 0.75 * h);
    // Keep off the rounded tips of bone ends.
    let margin = |f: f64| if f > 0.0 { bone.radius } else { 0.0 };
    let (m0, m1) = (margin(bone.flare_a), len - margin(bone.flare_b));
    let at = match clip(bone.a, dir, len, lo, hi) {
        Some((t0, t1)) if t0.max(m0) < t1.min(m1) => rng.range(t0.max(m0), t1.min(m1)),
        _ => {
            let centre = Point::new(w / 2.0, h / 2.0);
            (centre - bone.a).dot(dir).clamp(m0, m1.max(m0))
        }
    };
    // An incomplete fracture (one cortex) cannot shift sideways.
    let complete = rng.chance(0.7);
    let kind = rng.uniform();
    let displacement = if kind < 0.45 || !complete {
        0.0
    } else if kind < 0.75 {
        bone.radius * rng.range(0.12, 0.3) * rng.sign()
    } else {
        bone.radius * rng.range(0.4, 1.0) * rng.sign()
    };
    let subtle = rng.chance(0.3);
    Fracture {
        at,
        obliquity: rng.range(-0.7, 0.7),
        half_width: (short / 1000.0 * rng.range(1.0, 3.0)).max(1.0),
        contrast: if subtle {
            rng.range(0.2, 0.35)
        } else {
            rng.range(0.45, 0.9)
        },
        displacement,
        extent: if complete { 1.0 } else { rng.range(0.35, 0.75) },
        from_positive_side: rng.chance(0.5),
    }
}

/// Window centre and width from the 0.5th to the 99.5th percentile of the non-black pixels.
fn window(image: &Image) -> (u32, u32) {
    let mut histogram = vec![0u64; usize::from(MAX_VALUE) + 1];
    for &v in &image.pixels {
        if v > 0 {
            histogram[usize::from(v.min(MAX_VALUE))] += 1;
        }
    }
    let total: u64 = histogram.iter().sum();
    if total == 0 {
        return (2048, 4096);
    }
    let quantile = |q: f64| {
        let target = (total as f64 * q) as u64;
        let mut seen = 0;
        for (v, &n) in histogram.iter().enumerate() {
            seen += n;
            if seen > target {
                return v as u32;
            }
        }
        u32::from(MAX_VALUE)
    };
    let (lo, hi) = (quantile(0.005), quantile(0.995));
    ((lo + hi) / 2, (hi - lo).max(1) + 1)
}

fn text(tag: dicom_core::Tag, vr: VR, value: &str) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, PrimitiveValue::from(value))
}

fn unsigned(tag: dicom_core::Tag, value: u16) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::US, PrimitiveValue::from(value))
}

/// The DICOM object of a drawn phantom (DX For Presentation, 12 bits in 16, MONOCHROME2).
pub fn to_dicom(
    phantom: &Phantom,
    image: &Image,
    seed: u64,
) -> Result<dicom_object::DefaultDicomObject, PhantomError> {
    let dicom_error = |message: String| PhantomError::Dicom {
        path: PathBuf::from(&phantom.file_name),
        message,
    };
    let (rows, columns) = (
        u16::try_from(image.height).map_err(|_| dicom_error("too many rows".into()))?,
        u16::try_from(image.width).map_err(|_| dicom_error("too many columns".into()))?,
    );
    let (centre, width) = window(image);
    let corner = match phantom.scene.marker {
        Some(m) => {
            let right = m.x > image.width / 2;
            let bottom = m.y > image.height / 2;
            format!(
                "{}-{}",
                if bottom { "bottom" } else { "top" },
                if right { "right" } else { "left" }
            )
        }
        None => "no".into(),
    };
    let comments = format!(
        "Synthetic phantom made by fracture-phantoms {} (seed {}, image {}); not a patient. \
         The {} corner holds a burned-in positional marker '{}', not patient text.",
        env!("CARGO_PKG_VERSION"),
        seed,
        phantom.index + 1,
        corner,
        phantom.laterality
    );
    // Rows then columns, as the viewer faces the image (lateral views: posterior/anterior).
    let orientation = match phantom.view {
        "AP" => ["L", "F"],
        "PA" => ["R", "F"],
        "LL" => ["P", "F"],
        _ => ["A", "F"],
    };
    let p = &phantom.patient;
    let mut obj = InMemDicomObject::from_element_iter([
        DataElement::new(
            tags::IMAGE_TYPE,
            VR::CS,
            dicom_value!(Strs, ["DERIVED", "PRIMARY"]),
        ),
        text(tags::SOP_CLASS_UID, VR::UI, SOP_CLASS_UID),
        text(tags::SOP_INSTANCE_UID, VR::UI, &phantom.sop_instance_uid),
        text(tags::STUDY_DATE, VR::DA, &phantom.study_date),
        text(tags::CONTENT_DATE, VR::DA, &phantom.study_date),
        text(tags::STUDY_TIME, VR::TM, &phantom.study_time),
        text(tags::CONTENT_TIME, VR::TM, &phantom.study_time),
        text(tags::ACCESSION_NUMBER, VR::SH, ""),
        text(tags::MODALITY, VR::CS, "DX"),
        text(tags::PRESENTATION_INTENT_TYPE, VR::CS, "FOR PRESENTATION"),
        text(tags::MANUFACTURER, VR::LO, "fracture-phantoms"),
        text(tags::INSTITUTION_NAME, VR::LO, "SYNTHETIC PHANTOM SITE"),
        text(tags::REFERRING_PHYSICIAN_NAME, VR::PN, ""),
        text(
            tags::STUDY_DESCRIPTION,
            VR::LO,
            &format!("XR {} (SYNTHETIC PHANTOM)", phantom.body_part),
        ),
        text(tags::SERIES_DESCRIPTION, VR::LO, SERIES_DESCRIPTION),
        text(tags::MANUFACTURER_MODEL_NAME, VR::LO, "SYNTHETIC"),
        text(tags::PATIENT_NAME, VR::PN, &p.name),
        text(tags::PATIENT_ID, VR::LO, &p.id),
        text(tags::PATIENT_BIRTH_DATE, VR::DA, ""),
        text(tags::PATIENT_SEX, VR::CS, p.sex),
        text(tags::PATIENT_AGE, VR::AS, &format!("{:03}Y", p.age)),
        text(tags::BODY_PART_EXAMINED, VR::CS, phantom.body_part),
        text(tags::SOFTWARE_VERSIONS, VR::LO, env!("CARGO_PKG_VERSION")),
        DataElement::new(
            tags::IMAGER_PIXEL_SPACING,
            VR::DS,
            dicom_value!(Strs, ["0.15", "0.15"]),
        ),
        text(tags::VIEW_POSITION, VR::CS, phantom.view),
        text(tags::DETECTOR_TYPE, VR::CS, "SCINTILLATOR"),
        text(tags::POSITIONER_TYPE, VR::CS, ""),
        DataElement::new(
            tags::PATIENT_ORIENTATION,
            VR::CS,
            dicom_value!(Strs, [orientation[0], orientation[1]]),
        ),
        text(
            tags::STUDY_INSTANCE_UID,
            VR::UI,
            &phantom.study_instance_uid,
        ),
        text(
            tags::SERIES_INSTANCE_UID,
            VR::UI,
            &phantom.series_instance_uid,
        ),
        text(tags::STUDY_ID, VR::SH, "1"),
        text(
            tags::SERIES_NUMBER,
            VR::IS,
            &phantom.series_number.to_string(),
        ),
        text(tags::INSTANCE_NUMBER, VR::IS, "1"),
        text(
            tags::IMAGE_LATERALITY,
            VR::CS,
            &phantom.laterality.to_string(),
        ),
        text(tags::IMAGE_COMMENTS, VR::LT, &comments),
        unsigned(tags::SAMPLES_PER_PIXEL, 1),
        text(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"),
        unsigned(tags::ROWS, rows),
        unsigned(tags::COLUMNS, columns),
        unsigned(tags::BITS_ALLOCATED, 16),
        unsigned(tags::BITS_STORED, 12),
        unsigned(tags::HIGH_BIT, 11),
        unsigned(tags::PIXEL_REPRESENTATION, 0),
        text(tags::BURNED_IN_ANNOTATION, VR::CS, "NO"),
        text(tags::PIXEL_INTENSITY_RELATIONSHIP, VR::CS, "LOG"),
        DataElement::new(
            tags::PIXEL_INTENSITY_RELATIONSHIP_SIGN,
            VR::SS,
            PrimitiveValue::from(1i16),
        ),
        text(tags::WINDOW_CENTER, VR::DS, &centre.to_string()),
        text(tags::WINDOW_WIDTH, VR::DS, &width.to_string()),
        text(tags::RESCALE_INTERCEPT, VR::DS, "0"),
        text(tags::RESCALE_SLOPE, VR::DS, "1"),
        text(tags::RESCALE_TYPE, VR::LO, "US"),
        text(tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "00"),
        text(tags::PRESENTATION_LUT_SHAPE, VR::CS, "IDENTITY"),
    ]);
    let (code, meaning) = phantom.anatomic_region;
    let region = InMemDicomObject::from_element_iter([
        text(tags::CODE_VALUE, VR::SH, code),
        text(tags::CODING_SCHEME_DESIGNATOR, VR::SH, "SCT"),
        text(tags::CODE_MEANING, VR::LO, meaning),
    ]);
    obj.put(DataElement::new(
        tags::ANATOMIC_REGION_SEQUENCE,
        VR::SQ,
        DataSetSequence::new(vec![region], Length::UNDEFINED),
    ));
    if let Some((_, code, meaning)) = VIEWS.iter().find(|v| v.0 == phantom.view) {
        let view = InMemDicomObject::from_element_iter([
            text(tags::CODE_VALUE, VR::SH, code),
            text(tags::CODING_SCHEME_DESIGNATOR, VR::SH, "SCT"),
            text(tags::CODE_MEANING, VR::LO, meaning),
            DataElement::new(
                tags::VIEW_MODIFIER_CODE_SEQUENCE,
                VR::SQ,
                DataSetSequence::<InMemDicomObject>::empty(),
            ),
        ]);
        obj.put(DataElement::new(
            tags::VIEW_CODE_SEQUENCE,
            VR::SQ,
            DataSetSequence::new(vec![view], Length::UNDEFINED),
        ));
    }
    // Type 2: present, and empty (a phantom has no acquisition context to report).
    obj.put(DataElement::new(
        tags::ACQUISITION_CONTEXT_SEQUENCE,
        VR::SQ,
        DataSetSequence::<InMemDicomObject>::empty(),
    ));
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OW,
        PrimitiveValue::U16(C::from_slice(&image.pixels)),
    ));
    obj.with_meta(FileMetaTableBuilder::new().transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN))
        .map_err(|e| dicom_error(e.to_string()))
}

/// Writes through a temporary name and renames, so a crash never leaves a half-written file
/// under the final name.
fn write_atomically(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), PhantomError>,
) -> Result<(), PhantomError> {
    let mut part = path.as_os_str().to_owned();
    part.push(".part");
    let part = PathBuf::from(part);
    let result = write(&part).and_then(|()| std::fs::rename(&part, path).map_err(io_error(path)));
    if result.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    result
}

/// Draws and writes every phantom of `cfg` to `cfg.out`, with `labels.csv` (one row per box,
/// one row with empty box fields per negative). Same config, same bytes.
pub fn generate(cfg: &PhantomConfig) -> Result<Summary, PhantomError> {
    let phantoms = plan(cfg)?;
    std::fs::create_dir_all(&cfg.out).map_err(io_error(&cfg.out))?;
    let mut labels = String::from(LABELS_HEADER);
    labels.push('\n');
    let mut summary = Summary {
        files: 0,
        fractured: 0,
        boxes: 0,
        patients: phantoms.last().map_or(0, |p| p.patient.number),
        regions: BTreeMap::new(),
        out: cfg.out.clone(),
        labels: cfg.out.join("labels.csv"),
    };
    for phantom in &phantoms {
        let image = render::render(&phantom.scene, true);
        let path = cfg.out.join(&phantom.file_name);
        let obj = to_dicom(phantom, &image, cfg.seed)?;
        // Serialised in memory first: a failure there is ours, one writing the file is the disk's.
        let mut bytes = Vec::new();
        obj.write_all(&mut bytes).map_err(|e| PhantomError::Dicom {
            path: path.clone(),
            message: e.to_string(),
        })?;
        write_atomically(&path, |part| {
            std::fs::write(part, &bytes).map_err(io_error(part))
        })?;
        let uid = &phantom.sop_instance_uid;
        if image.boxes.is_empty() {
            labels.push_str(&format!("{uid},{},0,,,,\n", phantom.region));
        } else {
            summary.fractured += 1;
            for b in &image.boxes {
                labels.push_str(&format!(
                    "{uid},{},1,{},{},{},{}\n",
                    phantom.region, b.x0, b.y0, b.x1, b.y1
                ));
            }
        }
        summary.boxes += image.boxes.len();
        summary.files += 1;
        *summary.regions.entry(phantom.region).or_default() += 1;
    }
    write_atomically(&summary.labels, |part| {
        let mut f = std::fs::File::create(part).map_err(io_error(part))?;
        f.write_all(labels.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(io_error(part))
    })?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_body_part_classifies_to_its_own_known_region() {
        let mut seen = std::collections::HashSet::new();
        for (body_part, region) in body_parts() {
            let got = fracture_shared::region::classify(&[Some(body_part)]);
            assert_eq!(got, region, "{body_part}");
            assert!(
                fracture_shared::region::REGIONS.contains(&region),
                "{region}"
            );
            assert!(seen.insert(region), "{region} twice");
        }
    }

    #[test]
    fn uids_are_valid_and_short() {
        for seed in [0, 1, 42, u64::MAX] {
            let root = uid_root(seed);
            let longest = format!("{root}.3.{}", u32::MAX);
            assert!(longest.len() <= 64, "{longest}");
            for arc in longest.split('.') {
                assert!(!arc.is_empty() && arc.bytes().all(|b| b.is_ascii_digit()));
                assert!(arc == "0" || !arc.starts_with('0'), "{longest}");
            }
        }
        assert_ne!(uid_root(1), uid_root(2));
    }

    #[test]
    fn dates() {
        assert_eq!(date_after_2015(0), "20150101");
        assert_eq!(date_after_2015(31 + 28), "20150301");
        assert_eq!(date_after_2015(365 + 31 + 28), "20160229");
        assert_eq!(date_after_2015(365 + 366), "20170101");
    }

    #[test]
    fn settings_a_person_can_fix() {
        let cfg = |min_side, max_side, fracture_rate| PhantomConfig {
            min_side,
            max_side,
            fracture_rate,
            ..PhantomConfig::default()
        };
        for (c, needle) in [
            (cfg(10, 300, 0.3), "--min-side 64"),
            (cfg(300, 20_000, 0.3), "--max-side 8192"),
            (cfg(400, 300, 0.3), "larger than max_side"),
            (cfg(300, 400, 1.5), "between 0 and 1"),
        ] {
            let e = plan(&c).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn clip_finds_the_stretch_inside() {
        let (t0, t1) = clip(
            Point::new(-10.0, 5.0),
            Point::new(1.0, 0.0),
            100.0,
            Point::new(0.0, 0.0),
            Point::new(10.0, 10.0),
        )
        .unwrap();
        assert_eq!((t0, t1), (10.0, 20.0));
        assert!(clip(
            Point::new(-10.0, 50.0),
            Point::new(1.0, 0.0),
            100.0,
            Point::new(0.0, 0.0),
            Point::new(10.0, 10.0)
        )
        .is_none());
    }
}
