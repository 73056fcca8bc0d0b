//! Labelled radiographs for training and calibration: the labels CSV, the DICOM files it names,
//! the serving transform applied once and cached in memory, and the split by patient.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use dicom_dictionary_std::tags;
use fracture_models::manifest::Input;
use fracture_models::{transform, TransformConfig};
use fracture_shared::messages::Geometry;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::rng::Rng;
use crate::TrainError;

/// One radiograph's reference read, gathered from its rows of the labels CSV.
#[derive(Debug, Clone, PartialEq)]
pub struct Label {
    pub sop_instance_uid: String,
    pub region: String,
    pub fracture: bool,
    /// Fracture boxes `[x0, y0, x1, y1]` in original pixels (x1, y1 exclusive); empty on a
    /// negative, and possibly on a positive whose reader drew none.
    pub boxes: Vec<[f64; 4]>,
}

/// A CSV line [`csv_fields`] cannot split.
#[derive(Debug, thiserror::Error)]
#[error("a quoted field is not closed")]
struct UnclosedQuote;

/// Splits one CSV line into fields (RFC 4180 quoting, no line breaks inside fields).
fn csv_fields(line: &str) -> Result<Vec<String>, UnclosedQuote> {
    let mut out = Vec::new();
    let mut field = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    let mut was_quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') if field.trim().is_empty() && !was_quoted => {
                field.clear();
                quoted = true;
                was_quoted = true;
            }
            (false, ',') => {
                out.push(std::mem::take(&mut field));
                was_quoted = false;
            }
            (false, c) => field.push(c),
        }
    }
    if quoted {
        return Err(UnclosedQuote);
    }
    out.push(field);
    Ok(out)
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

/// Reads `sop_instance_uid,region,fracture,x0,y0,x1,y1` (one row per box, a negative's box
/// columns empty; other columns are ignored), one [`Label`] per radiograph in file order.
pub fn read_labels(path: &Path) -> Result<Vec<Label>, TrainError> {
    let text = std::fs::read_to_string(path).map_err(TrainError::io(path))?;
    parse_labels(&text, path)
}

/// [`read_labels`] on text already read; `path` names it in errors.
pub fn parse_labels(text: &str, path: &Path) -> Result<Vec<Label>, TrainError> {
    let err = |line: usize, message: String| TrainError::Parse {
        path: path.to_path_buf(),
        line,
        message,
    };
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim_end_matches('\r')))
        .filter(|(_, l)| !l.trim().is_empty());
    let Some((header_line, header)) = lines.next() else {
        return Err(err(
            1,
            "the file is empty; expected the header sop_instance_uid,region,fracture,x0,y0,x1,y1"
                .into(),
        ));
    };
    let header = csv_fields(header).map_err(|e| err(header_line, e.to_string()))?;
    let col = |name: &str| -> Result<usize, TrainError> {
        header
            .iter()
            .position(|h| h.trim().eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                err(
                    header_line,
                    format!(
                        "the header has no {name} column; expected \
                         sop_instance_uid,region,fracture,x0,y0,x1,y1"
                    ),
                )
            })
    };
    let (c_uid, c_region, c_fracture) =
        (col("sop_instance_uid")?, col("region")?, col("fracture")?);
    let c_box = [col("x0")?, col("y0")?, col("x1")?, col("y1")?];

    let mut out: Vec<Label> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for (lineno, line) in lines {
        let fields = csv_fields(line).map_err(|e| err(lineno, e.to_string()))?;
        let get = |c: usize| fields.get(c).map(|s| s.trim()).unwrap_or("");
        let uid = get(c_uid);
        if uid.is_empty() {
            return Err(err(lineno, "sop_instance_uid is empty".into()));
        }
        let region = get(c_region).to_string();
        let fracture = parse_bool(get(c_fracture)).ok_or_else(|| {
            err(
                lineno,
                format!(
                    "fracture is {:?}; write 1 or 0 (or true/false)",
                    get(c_fracture)
                ),
            )
        })?;
        let raw: Vec<&str> = c_box.iter().map(|&c| get(c)).collect();
        let bbox = if raw.iter().all(|s| s.is_empty()) {
            None
        } else {
            let mut b = [0f64; 4];
            for (v, s) in b.iter_mut().zip(&raw) {
                *v = s
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .ok_or_else(|| {
                        err(
                            lineno,
                            format!(
                                "box {raw:?} is not four numbers; give x0,y0,x1,y1 in pixels or \
                                 leave all four empty"
                            ),
                        )
                    })?;
            }
            if b[2] <= b[0] || b[3] <= b[1] {
                return Err(err(
                    lineno,
                    format!("box {b:?} is empty: x1 must exceed x0 and y1 must exceed y0"),
                ));
            }
            Some(b)
        };
        if bbox.is_some() && !fracture {
            return Err(err(
                lineno,
                "a box on a row with fracture = 0; a negative radiograph has no boxes".into(),
            ));
        }
        match index.get(uid) {
            Some(&i) => {
                let l = &mut out[i];
                if l.fracture != fracture || l.region != region {
                    return Err(err(
                        lineno,
                        format!(
                            "{uid} has rows that disagree on region or fracture; every row of a \
                             radiograph must say the same"
                        ),
                    ));
                }
                l.boxes.extend(bbox);
            }
            None => {
                index.insert(uid.to_string(), out.len());
                out.push(Label {
                    sop_instance_uid: uid.to_string(),
                    region,
                    fracture,
                    boxes: bbox.into_iter().collect(),
                });
            }
        }
    }
    Ok(out)
}

/// Where a radiograph's file is and whose it is, from its header alone.
#[derive(Debug, Clone)]
struct Indexed {
    path: PathBuf,
    patient_id: String,
}

fn text_of(obj: &dicom_object::DefaultDicomObject, tag: dicom_object::Tag) -> Option<String> {
    fracture_shared::dicom::text(obj, tag)
}

/// The DICOM files under `dir` (recursively) whose SOP Instance UID is in `wanted`, read up to
/// the pixel data only. Files that are not DICOM are skipped.
fn index_files(
    dir: &Path,
    wanted: &HashMap<&str, usize>,
) -> Result<HashMap<String, Indexed>, TrainError> {
    if !dir.is_dir() {
        return Err(TrainError::Data(format!(
            "{} is not a folder; --images must name the folder holding the labelled DICOM files",
            dir.display()
        )));
    }
    let files: Vec<PathBuf> = walkdir::WalkDir::new(dir)
        .follow_links(true)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(walkdir::DirEntry::into_path)
        .collect();
    let found: Vec<(String, Indexed)> = files
        .par_iter()
        .filter_map(|path| {
            let obj = dicom_object::OpenFileOptions::new()
                .read_until(tags::PIXEL_DATA)
                .open_file(path)
                .ok()?;
            let uid = text_of(&obj, tags::SOP_INSTANCE_UID)?;
            if !wanted.contains_key(uid.as_str()) {
                return None;
            }
            // Without a PatientID a radiograph is its own patient: it cannot be grouped.
            let patient_id = text_of(&obj, tags::PATIENT_ID).unwrap_or_else(|| uid.clone());
            Some((
                uid,
                Indexed {
                    path: path.clone(),
                    patient_id,
                },
            ))
        })
        .collect();
    let mut out = HashMap::with_capacity(found.len());
    for (uid, ix) in found {
        if let Some(other) = out.insert(uid.clone(), ix) {
            return Err(TrainError::Data(format!(
                "two files hold SOP Instance UID {uid} ({} and another); remove the duplicate",
                other.path.display()
            )));
        }
    }
    Ok(out)
}

/// A labelled radiograph after the serving transform, ready to train on or score.
#[derive(Debug, Clone)]
pub struct Sample {
    pub sop_instance_uid: String,
    pub patient_id: String,
    pub region: String,
    pub fracture: bool,
    /// As labelled, in original pixels.
    pub boxes: Vec<[f64; 4]>,
    /// The same boxes in model-input pixels (the transform's own mapping).
    pub model_boxes: Vec<[f64; 4]>,
    /// How model pixels map back to the original, as the pipeline's messages carry it.
    pub geometry: Geometry,
    /// `[channels, size, size]`, row-major: raw in [0, 1], LCN in [-1, 1], or both (raw first).
    pub pixels: Vec<f32>,
}

/// Labelled radiographs at one input size and channel choice.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub size: usize,
    pub input: Input,
    pub samples: Vec<Sample>,
}

impl Dataset {
    pub fn channels(&self) -> usize {
        self.input.channels()
    }

    /// The samples at `indices`, as a new data set.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        Dataset {
            size: self.size,
            input: self.input,
            samples: indices.iter().map(|&i| self.samples[i].clone()).collect(),
        }
    }

    pub fn positives(&self) -> usize {
        self.samples.iter().filter(|s| s.fracture).count()
    }
}

/// What loading left out.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub loaded: usize,
    /// Labelled SOP Instance UIDs with no file under the folder.
    pub missing: Vec<String>,
    /// Files that were found but could not be decoded, with why.
    pub unreadable: Vec<(PathBuf, String)>,
    pub seconds: f64,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "loaded {} labelled radiographs in {:.1} s",
            self.loaded, self.seconds
        )?;
        if !self.missing.is_empty() {
            write!(
                f,
                "; {} labelled radiographs have no file in the folder (e.g. {})",
                self.missing.len(),
                self.missing[0]
            )?;
        }
        if let Some((path, why)) = self.unreadable.first() {
            write!(
                f,
                "; {} files could not be decoded (e.g. {}: {why})",
                self.unreadable.len(),
                path.display()
            )?;
        }
        Ok(())
    }
}

/// Finds each labelled radiograph's file under `images` by SOP Instance UID, decodes it as the
/// pipeline does (`fracture_shared::pixels`), applies the serving transform and keeps the
/// `input` channels in memory. Radiographs without a file or that fail to decode are left out
/// and listed in the report; none left is an error.
pub fn load(
    labels: &[Label],
    images: &Path,
    transform_cfg: &TransformConfig,
    input: Input,
) -> Result<(Dataset, LoadReport), TrainError> {
    let started = std::time::Instant::now();
    transform_cfg.validate()?;
    let wanted: HashMap<&str, usize> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.sop_instance_uid.as_str(), i))
        .collect();
    let index = index_files(images, &wanted)?;
    let mut report = LoadReport {
        missing: labels
            .iter()
            .filter(|l| !index.contains_key(&l.sop_instance_uid))
            .map(|l| l.sop_instance_uid.clone())
            .collect(),
        ..Default::default()
    };
    let results: Vec<Result<Sample, (PathBuf, String)>> = labels
        .par_iter()
        .filter_map(|l| index.get(&l.sop_instance_uid).map(|ix| (l, ix)))
        .map(|(l, ix)| {
            load_one(l, ix, transform_cfg, input).map_err(|e| (ix.path.clone(), e.to_string()))
        })
        .collect();
    let mut samples = Vec::with_capacity(results.len());
    for r in results {
        match r {
            Ok(s) => samples.push(s),
            Err(e) => report.unreadable.push(e),
        }
    }
    report.loaded = samples.len();
    report.seconds = started.elapsed().as_secs_f64();
    if samples.is_empty() {
        return Err(TrainError::Data(format!(
            "none of the {} labelled radiographs could be loaded from {}: {report}",
            labels.len(),
            images.display()
        )));
    }
    Ok((
        Dataset {
            size: transform_cfg.size,
            input,
            samples,
        },
        report,
    ))
}

/// Why one labelled radiograph's file was left out (listed in the [`LoadReport`]).
#[derive(Debug, thiserror::Error)]
enum Unreadable {
    #[error("{0}")]
    Read(#[from] std::io::Error),
    #[error("{0}")]
    Decode(#[from] fracture_shared::StageError),
    #[error("{0}")]
    Transform(#[from] fracture_models::ModelError),
}

fn load_one(
    label: &Label,
    ix: &Indexed,
    cfg: &TransformConfig,
    input: Input,
) -> Result<Sample, Unreadable> {
    let bytes = std::fs::read(&ix.path)?;
    let obj = fracture_shared::pixels::read_object(&bytes)?;
    drop(bytes);
    let image = fracture_shared::pixels::decode(&obj)?;
    let t = transform(&image.pixels, image.width, image.height, cfg)?;
    let model_boxes = label.boxes.iter().map(|&b| t.box_to_model(b)).collect();
    let pixels = match input {
        Input::Raw => t.raw.clone(),
        Input::Lcn => t.lcn.clone(),
        Input::Both => t.to_tensor_data(),
    };
    Ok(Sample {
        sop_instance_uid: label.sop_instance_uid.clone(),
        patient_id: ix.patient_id.clone(),
        region: label.region.clone(),
        fracture: label.fracture,
        boxes: label.boxes.clone(),
        model_boxes,
        geometry: Geometry {
            original_width: t.original_width,
            original_height: t.original_height,
            crop: t.crop,
            scale: t.scale,
            size: t.size as u32,
        },
        pixels,
    })
}

/// The paper's three sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Part {
    Train,
    Tuning,
    Validation,
}

/// Assigns every radiograph to a set, 80/10/10 by *patient* (all of a patient's radiographs in
/// one set, so the tuning and validation sets never see a training patient): the distinct
/// patient IDs, sorted, are shuffled with `seed`, the first tenth (rounded, at least one when
/// there are three or more patients) goes to tuning, the next to validation, the rest to
/// training. The same IDs and seed give the same split.
pub fn split_by_patient(patient_ids: &[&str], seed: u64) -> Vec<Part> {
    let mut patients: Vec<&str> = patient_ids
        .iter()
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    Rng::new(seed).shuffle(&mut patients);
    let n = patients.len();
    let tenth = if n >= 3 {
        ((n as f64 * 0.1).round() as usize).max(1)
    } else {
        0
    };
    let part: HashMap<&str, Part> = patients
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            let part = if i < tenth {
                Part::Tuning
            } else if i < 2 * tenth {
                Part::Validation
            } else {
                Part::Train
            };
            (p, part)
        })
        .collect();
    patient_ids.iter().map(|p| part[p]).collect()
}

/// The three sets of a data set, split by patient with `seed`.
#[derive(Debug, Clone)]
pub struct Split {
    pub train: Dataset,
    pub tuning: Dataset,
    pub validation: Dataset,
}

impl Split {
    pub fn new(data: &Dataset, seed: u64) -> Split {
        let ids: Vec<&str> = data.samples.iter().map(|s| s.patient_id.as_str()).collect();
        let parts = split_by_patient(&ids, seed);
        let pick = |want: Part| -> Vec<usize> {
            parts
                .iter()
                .enumerate()
                .filter(|(_, &p)| p == want)
                .map(|(i, _)| i)
                .collect()
        };
        Split {
            train: data.subset(&pick(Part::Train)),
            tuning: data.subset(&pick(Part::Tuning)),
            validation: data.subset(&pick(Part::Validation)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_group_rows_per_radiograph() {
        let text = "sop_instance_uid,region,fracture,x0,y0,x1,y1\n\
                    1.2.3,wrist,1,10,20,30,40\n\
                    1.2.4,hip,0,,,,\n\
                    1.2.3,wrist,1,50,60,70,80\n\
                    \"1.2.5\",\"knee, left\",true,,,,\n";
        let l = parse_labels(text, Path::new("l.csv")).expect("parses");
        assert_eq!(l.len(), 3);
        assert_eq!(
            l[0].boxes,
            vec![[10.0, 20.0, 30.0, 40.0], [50.0, 60.0, 70.0, 80.0]]
        );
        assert!(!l[1].fracture && l[1].boxes.is_empty());
        assert_eq!(l[2].region, "knee, left");
        assert!(l[2].fracture && l[2].boxes.is_empty());
    }

    #[test]
    fn labels_refuse_contradictions() {
        let bad = |body: &str| {
            let text = format!("sop_instance_uid,region,fracture,x0,y0,x1,y1\n{body}");
            parse_labels(&text, Path::new("l.csv"))
                .expect_err(body)
                .to_string()
        };
        assert!(bad("1,hip,0,1,2,3,4\n").contains("negative"));
        assert!(bad("1,hip,1,1,2,3,4\n1,hip,0,,,,\n").contains("disagree"));
        assert!(bad("1,hip,1,5,2,3,4\n").contains("empty"));
        assert!(bad("1,hip,maybe,,,,\n").contains("fracture"));
        assert!(bad("1,hip,1,1,2,,4\n").contains("four numbers"));
    }
}
