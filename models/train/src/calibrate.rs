//! Region thresholds from held-out scores (the paper's post-processing): the score threshold
//! that reaches a target sensitivity, and the map-binarisation threshold that finds the most
//! labelled boxes at a bounded number of false boxes, per region with a global fallback.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Write};
use std::path::Path;

use fracture_models::boxes::{boxes, BoxConfig};
use fracture_models::manifest::Thresholds;
use fracture_models::{Ensemble, Placement};
use fracture_shared::messages::Geometry;
use serde::{Deserialize, Serialize};

use crate::data::{Dataset, Label};
use crate::TrainError;

/// One scored radiograph. `fracture calibrate --model` writes these as JSONL (with the map);
/// `fracture scan`'s findings.jsonl lines read as these too (score and region, no map).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoredRadiograph {
    pub sop_instance_uid: String,
    /// The region the pipeline looks thresholds up by; empty: the label's.
    #[serde(default)]
    pub region: String,
    pub score: f32,
    /// The averaged probability map, `map_size x map_size`, row-major.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map: Option<Vec<f32>>,
    #[serde(default)]
    pub map_size: usize,
    /// How map cells map back to original pixels (needed with a map).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub geometry: Option<Geometry>,
}

/// Scores every radiograph of `data` (loaded with both channels at the ensemble's input size)
/// with the ensemble, `batch` at a time.
pub fn predict(
    ensemble: &Ensemble,
    data: &Dataset,
    batch: usize,
    mut progress: impl FnMut(usize),
) -> Result<Vec<ScoredRadiograph>, TrainError> {
    let mut out = Vec::with_capacity(data.samples.len());
    for chunk in data.samples.chunks(batch.max(1)) {
        let inputs: Vec<&[f32]> = chunk.iter().map(|s| s.pixels.as_slice()).collect();
        let preds = ensemble.predict(&inputs)?;
        for (s, p) in chunk.iter().zip(preds) {
            out.push(ScoredRadiograph {
                sop_instance_uid: s.sop_instance_uid.clone(),
                region: s.region.clone(),
                score: p.score,
                map: p.map,
                map_size: p.map_size,
                geometry: Some(s.geometry),
            });
        }
        progress(chunk.len());
    }
    Ok(out)
}

/// Writes one JSON object per line.
pub fn write_predictions(path: &Path, preds: &[ScoredRadiograph]) -> Result<(), TrainError> {
    let file = std::fs::File::create(path).map_err(TrainError::io(path))?;
    let mut w = std::io::BufWriter::new(file);
    for p in preds {
        serde_json::to_writer(&mut w, p)
            .map_err(|e| TrainError::io(path)(std::io::Error::other(e)))?;
        w.write_all(b"\n").map_err(TrainError::io(path))?;
    }
    w.flush().map_err(TrainError::io(path))
}

/// Reads [`ScoredRadiograph`] lines (calibrate's own predictions, or scan's findings.jsonl).
pub fn read_predictions(path: &Path) -> Result<Vec<ScoredRadiograph>, TrainError> {
    let file = std::fs::File::open(path).map_err(TrainError::io(path))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(TrainError::io(path))?;
        if line.trim().is_empty() {
            continue;
        }
        let p: ScoredRadiograph = serde_json::from_str(&line).map_err(|e| TrainError::Parse {
            path: path.to_path_buf(),
            line: i + 1,
            message: format!(
                "{e}; expected a JSON object with sop_instance_uid, score and optionally \
                     region, map, map_size and geometry"
            ),
        })?;
        out.push(p);
    }
    Ok(out)
}

/// How to calibrate.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibrateOptions {
    /// Each region's score threshold is the largest that reaches this share of its positives.
    pub target_sensitivity: f64,
    /// Regions with fewer positives use the global thresholds.
    pub min_positives: usize,
    /// The map threshold finds the most labelled boxes with at most this many false boxes per
    /// radiograph on average.
    pub max_false_boxes_per_image: f64,
    /// A drawn box finds a labelled one when their intersection over union reaches this.
    pub min_iou: f64,
    /// Map thresholds tried.
    pub map_grid: Vec<f32>,
    /// The post-processing stage's box settings, so calibration draws the boxes it will draw.
    pub boxes: BoxConfig,
}

impl Default for CalibrateOptions {
    fn default() -> Self {
        Self {
            target_sensitivity: 0.925,
            min_positives: 10,
            max_false_boxes_per_image: 0.5,
            min_iou: 0.1,
            map_grid: (1..20).map(|i| i as f32 * 0.05).collect(),
            boxes: BoxConfig::default(),
        }
    }
}

/// The largest threshold `t` such that at least `target` of `positive_scores` are `>= t` (on
/// or above the threshold counts as positive, as in post-processing): the k-th largest score,
/// k = ceil(target * n). `None` without positives.
pub fn score_threshold(positive_scores: &[f32], target: f64) -> Option<f32> {
    let n = positive_scores.len();
    if n == 0 {
        return None;
    }
    let mut s = positive_scores.to_vec();
    s.sort_by(|a, b| b.total_cmp(a));
    // The tolerance keeps 0.925 * 40 = 37.000000000000004 from asking for 38.
    let k = ((target * n as f64) - 1e-9).ceil().clamp(1.0, n as f64) as usize;
    Some(s[k - 1])
}

/// What calibration found for one region (or for all, as "all").
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RegionCalibration {
    pub region: String,
    pub radiographs: usize,
    pub positives: usize,
    /// The threshold the region gets: its own, or the global one when it has too few positives.
    pub score_threshold: f32,
    pub own_score_threshold: bool,
    /// On these radiographs at that threshold.
    pub sensitivity: Option<f64>,
    pub specificity: Option<f64>,
    pub map_threshold: Option<f32>,
    pub own_map_threshold: bool,
    /// Share of labelled boxes found, and false boxes per radiograph, at the map threshold.
    pub box_recall: Option<f64>,
    pub false_boxes_per_image: Option<f64>,
}

/// The result: thresholds in the manifest's format, and how they were reached.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Calibration {
    pub thresholds: Thresholds,
    pub target_sensitivity: f64,
    pub min_positives: usize,
    pub overall: RegionCalibration,
    pub regions: Vec<RegionCalibration>,
    /// Regions that fell back to the global thresholds.
    pub fallback: Vec<String>,
    /// Predictions with no label, and labels with no prediction (both left out).
    pub unlabelled: usize,
    pub unscored: usize,
    /// Whether any prediction carried a map (else map thresholds were not calibrated).
    pub maps: bool,
}

/// A scored, labelled radiograph.
struct Item<'a> {
    region: &'a str,
    score: f32,
    fracture: bool,
    boxes: &'a [[f64; 4]],
    map: Option<(&'a [f32], usize, Placement)>,
}

fn iou(a: [f64; 4], b: [f64; 4]) -> f64 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let area = |r: [f64; 4]| (r[2] - r[0]) * (r[3] - r[1]);
    let union = area(a) + area(b) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// (labelled boxes found, labelled boxes, false boxes, radiographs) at map threshold `t`, each
/// radiograph called as post-processing calls it (score on or above `threshold(region)`).
fn box_counts(
    items: &[&Item],
    t: f32,
    threshold: &dyn Fn(&str) -> f32,
    opts: &CalibrateOptions,
) -> (usize, usize, usize, usize) {
    let (mut found, mut labelled, mut false_boxes, mut n) = (0, 0, 0, 0);
    for item in items {
        let Some((map, size, placement)) = item.map else {
            continue;
        };
        n += 1;
        labelled += item.boxes.len();
        let called = item.score >= threshold(item.region);
        if !called {
            continue;
        }
        let drawn: Vec<[f64; 4]> = boxes(map, size, t, true, &placement, &opts.boxes)
            .into_iter()
            .map(|b| [b.x0, b.y0, b.x1, b.y1])
            .collect();
        found += item
            .boxes
            .iter()
            .filter(|l| drawn.iter().any(|d| iou(**l, *d) >= opts.min_iou))
            .count();
        false_boxes += drawn
            .iter()
            .filter(|d| item.boxes.iter().all(|l| iou(*l, **d) < opts.min_iou))
            .count();
    }
    (found, labelled, false_boxes, n)
}

/// The map threshold with the best box recall within the false-box budget (ties: the higher
/// threshold); if none is within it, the one with the fewest false boxes. `None` without maps
/// or labelled boxes.
fn map_threshold(
    items: &[&Item],
    threshold: &dyn Fn(&str) -> f32,
    opts: &CalibrateOptions,
) -> Option<(f32, f64, f64)> {
    let mut best: Option<(bool, f64, f64, f32)> = None;
    for &t in &opts.map_grid {
        let (found, labelled, false_boxes, n) = box_counts(items, t, threshold, opts);
        if labelled == 0 || n == 0 {
            return None;
        }
        let recall = found as f64 / labelled as f64;
        let fpi = false_boxes as f64 / n as f64;
        let within = fpi <= opts.max_false_boxes_per_image;
        let better = match best {
            None => true,
            Some((bw, br, bf, _)) => {
                if within != bw {
                    within
                } else if within {
                    recall >= br
                } else {
                    fpi <= bf
                }
            }
        };
        if better {
            best = Some((within, recall, fpi, t));
        }
    }
    best.map(|(_, r, f, t)| (t, r, f))
}

fn rates(items: &[&Item], threshold: &dyn Fn(&str) -> f32) -> (Option<f64>, Option<f64>) {
    let (mut tp, mut p, mut tn, mut n) = (0usize, 0usize, 0usize, 0usize);
    for i in items {
        let called = i.score >= threshold(i.region);
        if i.fracture {
            p += 1;
            tp += usize::from(called);
        } else {
            n += 1;
            tn += usize::from(!called);
        }
    }
    (
        (p > 0).then(|| tp as f64 / p as f64),
        (n > 0).then(|| tn as f64 / n as f64),
    )
}

/// Calibrates thresholds on `predictions` joined with `labels` by SOP Instance UID (both keyed
/// the same way: original UIDs, or both pseudonymised as `fracture scan --labels` writes them).
pub fn calibrate(
    predictions: &[ScoredRadiograph],
    labels: &[Label],
    opts: &CalibrateOptions,
) -> Result<Calibration, TrainError> {
    if !(opts.target_sensitivity > 0.0 && opts.target_sensitivity <= 1.0) {
        return Err(TrainError::Config(format!(
            "target sensitivity {} must be in (0, 1], e.g. 0.925",
            opts.target_sensitivity
        )));
    }
    let by_uid: HashMap<&str, &Label> = labels
        .iter()
        .map(|l| (l.sop_instance_uid.as_str(), l))
        .collect();
    let mut seen = std::collections::HashSet::new();
    let mut items = Vec::with_capacity(predictions.len());
    let mut unlabelled = 0;
    for p in predictions {
        let Some(l) = by_uid.get(p.sop_instance_uid.as_str()) else {
            unlabelled += 1;
            continue;
        };
        if !seen.insert(p.sop_instance_uid.as_str()) {
            return Err(TrainError::Data(format!(
                "{} is scored twice in the predictions; each radiograph must be scored once",
                p.sop_instance_uid
            )));
        }
        if !p.score.is_finite() {
            return Err(TrainError::Data(format!(
                "{} has score {}; every score must be a number",
                p.sop_instance_uid, p.score
            )));
        }
        let map = match (&p.map, &p.geometry) {
            (Some(m), Some(g)) if p.map_size > 0 && m.len() == p.map_size * p.map_size => {
                let placement = Placement {
                    crop: g.crop,
                    scale: g.scale,
                    size: g.size as usize,
                };
                Some((m.as_slice(), p.map_size, placement))
            }
            _ => None,
        };
        items.push(Item {
            region: if p.region.is_empty() {
                l.region.as_str()
            } else {
                p.region.as_str()
            },
            score: p.score,
            fracture: l.fracture,
            boxes: &l.boxes,
            map,
        });
    }
    let unscored = labels.len() - seen.len();
    let all: Vec<&Item> = items.iter().collect();
    let positives: Vec<f32> = all.iter().filter(|i| i.fracture).map(|i| i.score).collect();
    let global = score_threshold(&positives, opts.target_sensitivity).ok_or_else(|| {
        TrainError::Data(format!(
            "none of the {} scored radiographs with a label is fracture-positive; calibration \
             needs positives",
            all.len()
        ))
    })?;

    let mut by_region: BTreeMap<&str, Vec<&Item>> = BTreeMap::new();
    for i in &items {
        by_region.entry(i.region).or_default().push(i);
    }
    let mut score = BTreeMap::new();
    let mut fallback = Vec::new();
    for (region, its) in &by_region {
        let pos: Vec<f32> = its.iter().filter(|i| i.fracture).map(|i| i.score).collect();
        if pos.len() >= opts.min_positives {
            if let Some(t) = score_threshold(&pos, opts.target_sensitivity) {
                score.insert(region.to_string(), t);
                continue;
            }
        }
        fallback.push(region.to_string());
    }
    let score_of = |region: &str| score.get(region).copied().unwrap_or(global);

    let maps = items.iter().any(|i| i.map.is_some());
    let global_map = map_threshold(&all, &score_of, opts);
    let mut map = BTreeMap::new();
    let mut region_map = BTreeMap::new();
    for (region, its) in &by_region {
        if !score.contains_key(*region) {
            continue;
        }
        let boxed = its
            .iter()
            .filter(|i| i.fracture && !i.boxes.is_empty() && i.map.is_some())
            .count();
        if boxed >= opts.min_positives {
            if let Some(m) = map_threshold(its, &score_of, opts) {
                map.insert(region.to_string(), m.0);
                region_map.insert(*region, m);
            }
        }
    }

    let summary =
        |name: &str, its: &[&Item], own_score: bool, m: Option<(f32, f64, f64)>, own_map| {
            let (sensitivity, specificity) = rates(its, &score_of);
            RegionCalibration {
                region: name.to_string(),
                radiographs: its.len(),
                positives: its.iter().filter(|i| i.fracture).count(),
                score_threshold: if name == "all" {
                    global
                } else {
                    score_of(name)
                },
                own_score_threshold: own_score,
                sensitivity,
                specificity,
                map_threshold: m.map(|m| m.0),
                own_map_threshold: own_map,
                box_recall: m.map(|m| m.1),
                false_boxes_per_image: m.map(|m| m.2),
            }
        };
    let regions = by_region
        .iter()
        .map(|(r, its)| {
            let own = region_map.get(r).copied();
            let m = own.or_else(|| {
                // The region's boxes at the global map threshold.
                global_map.and_then(|g| {
                    let (found, labelled, fb, n) = box_counts(its, g.0, &score_of, opts);
                    (labelled > 0 && n > 0)
                        .then(|| (g.0, found as f64 / labelled as f64, fb as f64 / n as f64))
                })
            });
            summary(r, its, score.contains_key(*r), m, own.is_some())
        })
        .collect();
    Ok(Calibration {
        thresholds: Thresholds {
            default_score: global,
            default_map: global_map.map_or(Thresholds::default().default_map, |m| m.0),
            score: score.clone(),
            map,
        },
        target_sensitivity: opts.target_sensitivity,
        min_positives: opts.min_positives,
        overall: summary("all", &all, true, global_map, global_map.is_some()),
        regions,
        fallback,
        unlabelled,
        unscored,
        maps,
    })
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{:.1}%", 100.0 * v))
}

/// The `[thresholds]` table for the manifest, with how it was reached as comments.
pub fn to_toml(c: &Calibration) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "# Calibrated by `fracture calibrate` on {} radiographs ({} fracture-positive) at target \
         sensitivity {}.\n",
        c.overall.radiographs, c.overall.positives, c.target_sensitivity
    ));
    if c.fallback.is_empty() {
        s.push_str("# Every region has its own score threshold.\n");
    } else {
        s.push_str(&format!(
            "# Regions with fewer than {} positives use the global thresholds: {}.\n",
            c.min_positives,
            c.fallback.join(", ")
        ));
    }
    if !c.maps {
        s.push_str(
            "# The predictions had no maps: map thresholds were not calibrated (default kept).\n",
        );
    }
    s.push_str("#\n# region: radiographs, positives, score threshold (own|global), sensitivity, specificity; map threshold, box recall, false boxes per radiograph\n");
    for r in std::iter::once(&c.overall).chain(&c.regions) {
        s.push_str(&format!(
            "#   {}: {}, {}, {} ({}), {}, {}; {}, {}, {}\n",
            r.region,
            r.radiographs,
            r.positives,
            r.score_threshold,
            if r.own_score_threshold {
                "own"
            } else {
                "global"
            },
            pct(r.sensitivity),
            pct(r.specificity),
            r.map_threshold.map_or("-".into(), |t| format!(
                "{t} ({})",
                if r.own_map_threshold { "own" } else { "global" }
            )),
            pct(r.box_recall),
            r.false_boxes_per_image
                .map_or("-".into(), |f| format!("{f:.2}")),
        ));
    }
    let t = &c.thresholds;
    s.push_str(&format!(
        "\n[thresholds]\ndefault_score = {}\ndefault_map = {}\n\n[thresholds.score]\n",
        t.default_score, t.default_map
    ));
    let key = |k: &str| {
        if k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            k.to_string()
        } else {
            format!("{k:?}")
        }
    };
    for (r, v) in &t.score {
        s.push_str(&format!("{} = {v}\n", key(r)));
    }
    s.push_str("\n[thresholds.map]\n");
    for (r, v) in &t.map {
        s.push_str(&format!("{} = {v}\n", key(r)));
    }
    s
}
