//! What a scan writes into its folder, one line per radiograph: the types of `findings.jsonl`
//! and `dead-letter.jsonl`, read back by a resumed scan and by the report.

use std::path::Path;

use serde::{Deserialize, Serialize};

use fracture_shared::messages::{BoundingBox, ErrorKind, Finding};

/// One line of `findings.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FindingLine {
    pub input: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub sop_instance_uid: String,
    pub site: String,
    pub region: String,
    pub score: f32,
    pub threshold: f32,
    pub fracture: bool,
    pub boxes: Vec<BoundingBox>,
    pub model_version: String,
    pub model_trained: bool,
    /// The DICOM SR and Secondary Capture of this result, relative to the output folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sc: Option<String>,
}

impl From<Finding> for FindingLine {
    fn from(f: Finding) -> Self {
        Self {
            input: f.id.input,
            study_instance_uid: f.id.study_instance_uid,
            series_instance_uid: f.id.series_instance_uid,
            sop_instance_uid: f.id.sop_instance_uid,
            site: f.site,
            region: f.region,
            score: f.score,
            threshold: f.threshold,
            fracture: f.fracture,
            boxes: f.boxes,
            model_version: f.model_version,
            model_trained: f.model_trained,
            sr: None,
            sc: None,
        }
    }
}

/// One line of `dead-letter.jsonl`: the source path is resolved here, at the edge, from the
/// linkage table; it never rode the bus.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeadLetterLine {
    pub source: String,
    pub input: Option<String>,
    pub stage: String,
    pub kind: ErrorKind,
    pub reason: String,
}

/// The counts of one scan, for its report.
pub struct ScanSummary {
    pub inputs: u64,
    pub findings: usize,
    pub dead_letters: usize,
    pub skipped: u64,
    pub seconds: f64,
}

/// The results an earlier run left (unparseable lines, from an interrupted write, are dropped).
pub fn read_lines<T: serde::de::DeserializeOwned>(path: &Path) -> Vec<T> {
    std::fs::read_to_string(path)
        .map(|text| {
            text.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        })
        .unwrap_or_default()
}
