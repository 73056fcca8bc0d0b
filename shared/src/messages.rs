//! The versioned messages that travel between stages, one type per topic.
//!
//! Every message is JSON on the wire with a `schema` field naming its type and version, so a
//! consumer can refuse (dead-letter) what it does not understand instead of misreading it.
//! Nothing here identifies a patient: UIDs are pseudonyms made by ingest, and `input` is an
//! opaque reference that only the edge (ingest's linkage table) can turn back into a file.

use serde::{Deserialize, Serialize};

/// A reference to an object in the claim-check store (content-addressed by sha256).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    /// Lower-case hex sha256 of the content; also its key in the store.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// What the bytes are, e.g. `application/dicom` or `application/x-fracture-f32`.
    pub media_type: String,
}

/// The pseudonymous identity of one radiograph, carried by every message about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RadiographId {
    /// Opaque, pseudonymous reference to the input (file, C-STORE, DICOMweb instance).
    /// Only the edge's linkage table maps it back to where it came from.
    pub input: String,
    /// Pseudonymised StudyInstanceUID (also the Kafka key: per-study ordering).
    pub study_instance_uid: String,
    /// Pseudonymised SeriesInstanceUID.
    pub series_instance_uid: String,
    /// Pseudonymised SOPInstanceUID.
    pub sop_instance_uid: String,
}

/// `fracture.deidentified`: a radiograph that passed the PHI boundary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deidentified {
    pub schema: String,
    pub id: RadiographId,
    /// Pseudonymous site code (from configuration), never the institution's name.
    pub site: String,
    /// Anatomical region from the DICOM metadata (`unknown` when no rule matched).
    pub region: String,
    /// DICOM Modality (CR, DX).
    pub modality: String,
    pub rows: u32,
    pub columns: u32,
    /// The de-identified DICOM object.
    pub dicom: BlobRef,
}

/// Where the model input came from in the original image, so boxes map back exactly.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Geometry {
    pub original_width: u32,
    pub original_height: u32,
    /// Crop box in original pixels: x0, y0 inclusive; x1, y1 exclusive.
    pub crop: [u32; 4],
    /// Model-input pixels per original pixel (the resize factor).
    pub scale: f64,
    /// Side of the square model input.
    pub size: u32,
}

/// `fracture.preprocessed`: the model input, in the claim-check store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocessed {
    pub schema: String,
    pub id: RadiographId,
    pub site: String,
    pub region: String,
    /// Little-endian f32 tensor of shape `[2, size, size]`: channel 0 raw in [0, 1],
    /// channel 1 Local Contrast Normalised in [-1, 1].
    pub tensor: BlobRef,
    pub geometry: Geometry,
    /// The de-identified DICOM object, passed on so post-processing can write DICOM results
    /// (SR, Secondary Capture) that reference it; absent in messages from before it was added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dicom: Option<BlobRef>,
}

/// `fracture.scored`: the ensemble's output for one radiograph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    pub schema: String,
    pub id: RadiographId,
    pub site: String,
    pub region: String,
    pub geometry: Geometry,
    /// Unweighted mean of the members' probabilities.
    pub score: f32,
    pub member_scores: Vec<f32>,
    /// Little-endian f32 probability map `[map_size, map_size]`, the mean of the members that
    /// have a map head; `None` when no member has one.
    pub map: Option<BlobRef>,
    pub map_size: u32,
    pub model_version: String,
    /// False for a network that was never trained: everything downstream must say so.
    pub model_trained: bool,
    /// The de-identified DICOM object (from [`Preprocessed::dicom`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dicom: Option<BlobRef>,
}

/// A box in original pixel coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BoundingBox {
    pub x0: f64,
    pub y0: f64,
    pub x1: f64,
    pub y1: f64,
    pub score: f32,
}

/// `fracture.findings`: the answer for one radiograph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub schema: String,
    pub id: RadiographId,
    pub site: String,
    pub region: String,
    pub score: f32,
    /// The region's threshold that decided `fracture` (score >= threshold).
    pub threshold: f32,
    pub fracture: bool,
    pub boxes: Vec<BoundingBox>,
    pub model_version: String,
    pub model_trained: bool,
    /// DICOM Comprehensive SR (TID 1500) of this result, referencing the de-identified source;
    /// absent when DICOM outputs are off or the source was not available. (Boxed, like `sc`, to
    /// keep the finding small where it sits beside other messages in an enum.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sr: Option<Box<BlobRef>>,
    /// DICOM Secondary Capture: the radiograph with the boxes and the result drawn in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sc: Option<Box<BlobRef>>,
}

/// `fracture.studies`: the any-fracture summary of one study, emitted once no new radiograph of
/// it has arrived for a quiet period (and again, as a new revision, if one arrives later).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudySummary {
    pub schema: String,
    /// Pseudonymised StudyInstanceUID (also the key).
    pub study_instance_uid: String,
    pub site: String,
    /// True when any radiograph of the study was called positive.
    pub fracture: bool,
    /// Radiographs seen (each SOP Instance UID once).
    pub radiographs: u32,
    /// Of which called positive.
    pub positives: u32,
    /// Highest score of the study's radiographs.
    pub max_score: f32,
    /// Pseudonymised SOPInstanceUIDs called positive, sorted.
    pub positive_sop_instance_uids: Vec<String>,
    /// Regions of the radiographs, sorted, each once.
    pub regions: Vec<String>,
    pub model_version: String,
    pub model_trained: bool,
    /// 1 for the first summary of the study; higher when late radiographs revised it (the
    /// highest revision supersedes the others).
    pub revision: u32,
}

/// `fracture.labels`: a reference read (ground truth) for one radiograph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Label {
    pub schema: String,
    /// Pseudonymised SOPInstanceUID (the same key ingest gives the finding).
    pub sop_instance_uid: String,
    pub fracture: bool,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub boxes: Vec<BoundingBox>,
}

/// `fracture.alerts`: something a quality team must look at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub schema: String,
    pub kind: String,
    pub region: String,
    pub site: Option<String>,
    pub model_version: Option<String>,
    /// What was seen and why it matters, for a person.
    pub message: String,
}

/// How an error is classified; decides retry versus dead letter (see `error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorKind {
    /// The input is bad: never retried.
    Data,
    /// Something outside the process failed: retried with capped backoff.
    External,
    /// A bug: retried a few times, then dead-lettered.
    Internal,
}

/// `fracture.dead-letter`: an input a stage could not process, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub schema: String,
    /// The stage that gave up.
    pub stage: String,
    pub kind: ErrorKind,
    /// What was wrong and what to do, for a person. Never holds PHI.
    pub reason: String,
    /// The pseudonymous input reference (see `RadiographId::input`), when known.
    pub input: Option<String>,
    /// Where the message came from: topic, partition, offset (absent for the edge's own inputs).
    pub origin: Option<Origin>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// Schema names, one per message type; bump the version on an incompatible change.
pub mod schema {
    pub const DEIDENTIFIED: &str = "fracture.deidentified/v1";
    pub const PREPROCESSED: &str = "fracture.preprocessed/v1";
    pub const SCORED: &str = "fracture.scored/v1";
    pub const FINDING: &str = "fracture.finding/v1";
    pub const STUDY_SUMMARY: &str = "fracture.study-summary/v1";
    pub const LABEL: &str = "fracture.label/v1";
    pub const ALERT: &str = "fracture.alert/v1";
    pub const DEAD_LETTER: &str = "fracture.dead-letter/v1";
}

/// A message that knows its schema and topic.
pub trait Message: Serialize + for<'de> Deserialize<'de> {
    const SCHEMA: &'static str;
    /// Topic name without the configurable prefix, e.g. `deidentified`.
    const TOPIC: &'static str;
    fn schema(&self) -> &str;
}

macro_rules! message {
    ($t:ty, $schema:expr, $topic:expr) => {
        impl Message for $t {
            const SCHEMA: &'static str = $schema;
            const TOPIC: &'static str = $topic;
            fn schema(&self) -> &str {
                &self.schema
            }
        }
    };
}
message!(Deidentified, schema::DEIDENTIFIED, "deidentified");
message!(Preprocessed, schema::PREPROCESSED, "preprocessed");
message!(Scored, schema::SCORED, "scored");
message!(Finding, schema::FINDING, "findings");
message!(StudySummary, schema::STUDY_SUMMARY, "studies");
message!(Label, schema::LABEL, "labels");
message!(Alert, schema::ALERT, "alerts");
message!(DeadLetter, schema::DEAD_LETTER, "dead-letter");

/// A record that is not the message its topic carries; the message says what arrived and what
/// was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

/// The message text, for a dead letter's reason.
impl From<DecodeError> for String {
    fn from(e: DecodeError) -> String {
        e.0
    }
}

/// Decodes a message, checking its schema; the error says what arrived and what was expected.
pub fn decode<M: Message>(payload: &[u8]) -> Result<M, DecodeError> {
    #[derive(Deserialize)]
    struct Probe {
        schema: Option<String>,
    }
    let probe: Probe = serde_json::from_slice(payload).map_err(|e| {
        DecodeError(format!(
            "not a JSON message ({e}); expected {} on this topic",
            M::SCHEMA
        ))
    })?;
    match probe.schema.as_deref() {
        Some(s) if s == M::SCHEMA => serde_json::from_slice(payload)
            .map_err(|e| DecodeError(format!("malformed {} message: {e}", M::SCHEMA))),
        Some(s) => Err(DecodeError(format!(
            "message schema {s} is not {}; is a producer of another version writing to this topic?",
            M::SCHEMA
        ))),
        None => Err(DecodeError(format!(
            "message has no schema field; expected {}",
            M::SCHEMA
        ))),
    }
}

pub fn encode<M: Message>(m: &M) -> Vec<u8> {
    // Serialising our own plain structs cannot fail (no maps with non-string keys, no I/O).
    serde_json::to_vec(m).expect("message serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_refuses_other_schema_and_garbage() {
        let l = Label {
            schema: schema::LABEL.into(),
            sop_instance_uid: "2.25.1".into(),
            fracture: true,
            region: None,
            boxes: vec![],
        };
        let bytes = encode(&l);
        assert_eq!(decode::<Label>(&bytes).unwrap(), l);
        let e = decode::<Finding>(&bytes).unwrap_err();
        assert!(e.0.contains("fracture.label/v1"), "{e}");
        assert!(decode::<Label>(b"\x00\x01")
            .unwrap_err()
            .0
            .contains("not a JSON"));
    }
}
