//! The DICOM Comprehensive SR of one result, as a TID 1500 Measurement Report: the finding
//! (fracture present or absent, score and threshold) and each box as an image region, in the
//! source radiograph's pixel coordinates.
//!
//! Content tree (codes in parentheses):
//! ```text
//! CONTAINER Imaging Measurement Report (126000, DCM), TID 1500
//!   HAS CONCEPT MOD  Language of Content Item and Descendants = en-US
//!   HAS OBS CONTEXT  Observer Type = Device, Device Observer UID / Name / Manufacturer / Model
//!   HAS CONCEPT MOD  Procedure reported = Plain radiography (168537006, SCT)
//!   CONTAINS CONTAINER Imaging Measurements (126010, DCM)
//!     CONTAINS CONTAINER Measurement Group, TID 1501: the whole radiograph
//!       Tracking Identifier and UID, Finding = Fracture (72704001, SCT), Finding Site,
//!       Algorithm Name / Version / Parameters, NUM Probability (122157, DCM) = score,
//!       NUM Threshold Value (122411, DCM) = region threshold, CODE Fracture = Present / Absent,
//!       IMAGE Source of Measurement
//!     CONTAINS CONTAINER Measurement Group, TID 1410: one per box
//!       Tracking Identifier and UID, Finding = Fracture, Finding Site,
//!       SCOORD Image Region = closed POLYLINE (5 points), SELECTED FROM the source image,
//!       NUM Probability = the box's map maximum
//!   CONTAINS CONTAINER Qualitative Evaluations (C0034375, UMLS)
//!     CONTAINS TEXT Comment (121106, DCM) = "AI result, not a diagnosis" (+ untrained warning)
//! ```

use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::InMemDicomObject;

use fracture_shared::messages::{BoundingBox, Finding};

use crate::dicom::{
    derived_uid, equipment, model_name, region_code, sequence, series_description, text, Code,
    OutputUids, Source, MANUFACTURER,
};

/// Series Number of the SR series (the Secondary Capture series is 9902).
pub const SERIES_NUMBER: &str = "9901";

pub const IMAGING_MEASUREMENT_REPORT: Code = Code("126000", "DCM", "Imaging Measurement Report");
pub const LANGUAGE: Code = Code("121049", "DCM", "Language of Content Item and Descendants");
pub const ENGLISH_US: Code = Code("en-US", "RFC5646", "English (United States)");
pub const OBSERVER_TYPE: Code = Code("121005", "DCM", "Observer Type");
pub const DEVICE: Code = Code("121007", "DCM", "Device");
pub const DEVICE_OBSERVER_UID: Code = Code("121012", "DCM", "Device Observer UID");
pub const DEVICE_OBSERVER_NAME: Code = Code("121013", "DCM", "Device Observer Name");
pub const DEVICE_OBSERVER_MANUFACTURER: Code =
    Code("121014", "DCM", "Device Observer Manufacturer");
pub const DEVICE_OBSERVER_MODEL_NAME: Code = Code("121015", "DCM", "Device Observer Model Name");
pub const PROCEDURE_REPORTED: Code = Code("121058", "DCM", "Procedure reported");
pub const PLAIN_RADIOGRAPHY: Code = Code("168537006", "SCT", "Plain radiography");
pub const IMAGING_MEASUREMENTS: Code = Code("126010", "DCM", "Imaging Measurements");
pub const MEASUREMENT_GROUP: Code = Code("125007", "DCM", "Measurement Group");
pub const TRACKING_IDENTIFIER: Code = Code("112039", "DCM", "Tracking Identifier");
pub const TRACKING_UID: Code = Code("112040", "DCM", "Tracking Unique Identifier");
pub const FINDING: Code = Code("121071", "DCM", "Finding");
pub const FRACTURE: Code = Code("72704001", "SCT", "Fracture");
pub const FINDING_SITE: Code = Code("363698007", "SCT", "Finding Site");
pub const ALGORITHM_NAME: Code = Code("111001", "DCM", "Algorithm Name");
pub const ALGORITHM_VERSION: Code = Code("111003", "DCM", "Algorithm Version");
pub const ALGORITHM_PARAMETERS: Code = Code("111002", "DCM", "Algorithm Parameters");
pub const PROBABILITY: Code = Code("122157", "DCM", "Probability");
pub const THRESHOLD_VALUE: Code = Code("122411", "DCM", "Threshold Value");
pub const PROBABILITY_UNIT: Code = Code("{probability}", "UCUM", "probability");
pub const PRESENT: Code = Code("52101004", "SCT", "Present");
pub const ABSENT: Code = Code("272519000", "SCT", "Absent");
pub const SOURCE_OF_MEASUREMENT: Code = Code("121112", "DCM", "Source of Measurement");
pub const IMAGE_REGION: Code = Code("111030", "DCM", "Image Region");
pub const SOURCE: Code = Code("260753009", "SCT", "Source");
pub const QUALITATIVE_EVALUATIONS: Code = Code("C0034375", "UMLS", "Qualitative Evaluations");
pub const COMMENT: Code = Code("121106", "DCM", "Comment");

/// What the SR says in words about the result and the model, for a person reading it.
pub fn comment(finding: &Finding) -> String {
    let mut s = format!(
        "AI result, not a diagnosis: {} (score {:.4}, {} the {} threshold {:.4}; model {}).",
        if finding.fracture {
            "fracture suspected"
        } else {
            "no fracture detected"
        },
        finding.score,
        if finding.fracture {
            "at or above"
        } else {
            "below"
        },
        finding.region,
        finding.threshold,
        finding.model_version
    );
    if !finding.model_trained {
        s.push_str(" UNTRAINED MODEL - NOT FOR CLINICAL USE: this model was never trained and its scores mean nothing.");
    }
    s
}

#[derive(Clone, Copy)]
enum Rel {
    Contains,
    HasObsContext,
    HasConceptMod,
    SelectedFrom,
}

impl Rel {
    fn as_str(self) -> &'static str {
        match self {
            Rel::Contains => "CONTAINS",
            Rel::HasObsContext => "HAS OBS CONTEXT",
            Rel::HasConceptMod => "HAS CONCEPT MOD",
            Rel::SelectedFrom => "SELECTED FROM",
        }
    }
}

fn item(rel: Rel, value_type: &str, name: &Code) -> InMemDicomObject {
    InMemDicomObject::from_element_iter([
        text(tags::RELATIONSHIP_TYPE, VR::CS, rel.as_str()),
        text(tags::VALUE_TYPE, VR::CS, value_type),
        sequence(tags::CONCEPT_NAME_CODE_SEQUENCE, vec![name.item()]),
    ])
}

fn container(
    rel: Rel,
    name: &Code,
    template: Option<&str>,
    children: Vec<InMemDicomObject>,
) -> InMemDicomObject {
    let mut o = item(rel, "CONTAINER", name);
    o.put(text(tags::CONTINUITY_OF_CONTENT, VR::CS, "SEPARATE"));
    if let Some(t) = template {
        o.put(template_sequence(t));
    }
    o.put(sequence(tags::CONTENT_SEQUENCE, children));
    o
}

fn template_sequence(id: &str) -> dicom_object::mem::InMemElement {
    sequence(
        tags::CONTENT_TEMPLATE_SEQUENCE,
        vec![InMemDicomObject::from_element_iter([
            text(tags::MAPPING_RESOURCE, VR::CS, "DCMR"),
            text(tags::TEMPLATE_IDENTIFIER, VR::CS, id),
        ])],
    )
}

fn text_item(rel: Rel, name: &Code, value: &str) -> InMemDicomObject {
    let mut o = item(rel, "TEXT", name);
    o.put(text(tags::TEXT_VALUE, VR::UT, value));
    o
}

fn code_item(rel: Rel, name: &Code, value: &Code) -> InMemDicomObject {
    let mut o = item(rel, "CODE", name);
    o.put(sequence(tags::CONCEPT_CODE_SEQUENCE, vec![value.item()]));
    o
}

fn uid_item(rel: Rel, name: &Code, uid: &str) -> InMemDicomObject {
    let mut o = item(rel, "UIDREF", name);
    o.put(text(tags::UID, VR::UI, uid));
    o
}

/// A decimal string (DS, at most 16 characters) for a probability: the shortest decimal that
/// reads back as the same f32, so 0.93 is written "0.93", not "0.9300000072".
fn ds(v: f32) -> String {
    format!("{v}").chars().take(16).collect()
}

fn num_item(rel: Rel, name: &Code, value: f32, unit: &Code) -> InMemDicomObject {
    let mut o = item(rel, "NUM", name);
    let measured = InMemDicomObject::from_element_iter([
        text(tags::NUMERIC_VALUE, VR::DS, &ds(value)),
        // The exact value too, as DS holds 16 characters only.
        DataElement::new(
            tags::FLOATING_POINT_VALUE,
            VR::FD,
            PrimitiveValue::from(f64::from(value)),
        ),
        sequence(tags::MEASUREMENT_UNITS_CODE_SEQUENCE, vec![unit.item()]),
    ]);
    o.put(sequence(tags::MEASURED_VALUE_SEQUENCE, vec![measured]));
    o
}

fn image_item(rel: Rel, name: &Code, source: &Source) -> InMemDicomObject {
    let mut o = item(rel, "IMAGE", name);
    o.put(sequence(
        tags::REFERENCED_SOP_SEQUENCE,
        vec![source.referenced_sop()],
    ));
    o
}

/// The box as a closed polyline (5 points, first = last), clockwise from the top-left, in the
/// source's image coordinates: (0, 0) is the top-left corner of the top-left pixel, so a box
/// over pixel columns x0..x1 (exclusive) spans x0 to x1.
pub fn polyline(b: &BoundingBox) -> [f32; 10] {
    let (x0, y0, x1, y1) = (b.x0 as f32, b.y0 as f32, b.x1 as f32, b.y1 as f32);
    [x0, y0, x1, y0, x1, y1, x0, y1, x0, y0]
}

fn scoord_item(rel: Rel, name: &Code, points: &[f32], source: &Source) -> InMemDicomObject {
    let mut o = item(rel, "SCOORD", name);
    o.put(DataElement::new(
        tags::GRAPHIC_DATA,
        VR::FL,
        PrimitiveValue::F32(points.iter().copied().collect()),
    ));
    o.put(text(tags::GRAPHIC_TYPE, VR::CS, "POLYLINE"));
    o.put(sequence(
        tags::CONTENT_SEQUENCE,
        vec![image_item(Rel::SelectedFrom, &SOURCE, source)],
    ));
    o
}

fn tracking(finding: &Finding, what: &str) -> [InMemDicomObject; 2] {
    [
        text_item(Rel::HasObsContext, &TRACKING_IDENTIFIER, what),
        uid_item(
            Rel::HasObsContext,
            &TRACKING_UID,
            &derived_uid(&[
                "fracture-tracking",
                &finding.id.sop_instance_uid,
                &finding.model_version,
                what,
            ]),
        ),
    ]
}

/// The TID 1501 group for the whole radiograph.
fn image_group(finding: &Finding, source: &Source) -> InMemDicomObject {
    let mut c: Vec<InMemDicomObject> = tracking(finding, "fracture finding").into();
    c.push(code_item(Rel::Contains, &FINDING, &FRACTURE));
    if let Some(site) = region_code(&finding.region) {
        c.push(code_item(Rel::HasConceptMod, &FINDING_SITE, &site));
    }
    c.push(text_item(Rel::HasConceptMod, &ALGORITHM_NAME, MANUFACTURER));
    c.push(text_item(
        Rel::HasConceptMod,
        &ALGORITHM_VERSION,
        &finding.model_version,
    ));
    c.push(text_item(
        Rel::HasConceptMod,
        &ALGORITHM_PARAMETERS,
        &format!(
            "trained={}; region={}; decision: score >= threshold",
            finding.model_trained, finding.region
        ),
    ));
    c.push(num_item(
        Rel::Contains,
        &PROBABILITY,
        finding.score,
        &PROBABILITY_UNIT,
    ));
    c.push(num_item(
        Rel::Contains,
        &THRESHOLD_VALUE,
        finding.threshold,
        &PROBABILITY_UNIT,
    ));
    c.push(code_item(
        Rel::Contains,
        &FRACTURE,
        if finding.fracture { &PRESENT } else { &ABSENT },
    ));
    c.push(image_item(Rel::Contains, &SOURCE_OF_MEASUREMENT, source));
    container(Rel::Contains, &MEASUREMENT_GROUP, Some("1501"), c)
}

/// The TID 1410 group of box `n` (1-based, as numbered on the Secondary Capture).
fn box_group(finding: &Finding, source: &Source, n: usize, b: &BoundingBox) -> InMemDicomObject {
    let mut c: Vec<InMemDicomObject> = tracking(finding, &format!("fracture box {n}")).into();
    c.push(code_item(Rel::Contains, &FINDING, &FRACTURE));
    if let Some(site) = region_code(&finding.region) {
        c.push(code_item(Rel::HasConceptMod, &FINDING_SITE, &site));
    }
    c.push(scoord_item(
        Rel::Contains,
        &IMAGE_REGION,
        &polyline(b),
        source,
    ));
    c.push(num_item(
        Rel::Contains,
        &PROBABILITY,
        b.score,
        &PROBABILITY_UNIT,
    ));
    container(Rel::Contains, &MEASUREMENT_GROUP, Some("1410"), c)
}

/// The Comprehensive SR (PS3.3 A.35.3) of `finding` about `source`: same patient and study, the
/// study's AI result series, a UID derived from the source and the model version.
pub fn structured_report(
    source: &Source,
    finding: &Finding,
    uids: &OutputUids,
) -> InMemDicomObject {
    let (date, time) = source.content_date_time();
    let mut obj = InMemDicomObject::new_empty();
    obj.put(text(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192"));
    obj.put(text(
        tags::SOP_CLASS_UID,
        VR::UI,
        uids::COMPREHENSIVE_SR_STORAGE,
    ));
    obj.put(text(tags::SOP_INSTANCE_UID, VR::UI, &uids.sr_instance));
    obj.put(text(tags::CONTENT_DATE, VR::DA, &date));
    obj.put(text(tags::CONTENT_TIME, VR::TM, &time));
    source.inherit_into(&mut obj);
    // SR Document Series.
    obj.put(text(tags::MODALITY, VR::CS, "SR"));
    obj.put(text(tags::SERIES_INSTANCE_UID, VR::UI, &uids.sr_series));
    obj.put(text(tags::SERIES_NUMBER, VR::IS, SERIES_NUMBER));
    obj.put(text(
        tags::SERIES_DESCRIPTION,
        VR::LO,
        series_description(finding.model_trained),
    ));
    obj.put(sequence(
        tags::REFERENCED_PERFORMED_PROCEDURE_STEP_SEQUENCE,
        vec![],
    ));
    equipment(&mut obj, finding);
    // SR Document General.
    obj.put(text(tags::INSTANCE_NUMBER, VR::IS, &source.instance_number));
    obj.put(text(tags::COMPLETION_FLAG, VR::CS, "COMPLETE"));
    obj.put(text(tags::VERIFICATION_FLAG, VR::CS, "UNVERIFIED"));
    obj.put(text(tags::PRELIMINARY_FLAG, VR::CS, "PRELIMINARY"));
    obj.put(sequence(tags::PERFORMED_PROCEDURE_CODE_SEQUENCE, vec![]));
    obj.put(sequence(
        tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE,
        vec![source.hierarchical_reference()],
    ));
    // SR Document Content: the root container.
    let mut groups = vec![image_group(finding, source)];
    for (i, b) in finding.boxes.iter().enumerate() {
        groups.push(box_group(finding, source, i + 1, b));
    }
    let children = vec![
        code_item(Rel::HasConceptMod, &LANGUAGE, &ENGLISH_US),
        code_item(Rel::HasObsContext, &OBSERVER_TYPE, &DEVICE),
        uid_item(
            Rel::HasObsContext,
            &DEVICE_OBSERVER_UID,
            &derived_uid(&["fracture-device", &finding.model_version]),
        ),
        text_item(Rel::HasObsContext, &DEVICE_OBSERVER_NAME, MANUFACTURER),
        text_item(
            Rel::HasObsContext,
            &DEVICE_OBSERVER_MANUFACTURER,
            MANUFACTURER,
        ),
        text_item(
            Rel::HasObsContext,
            &DEVICE_OBSERVER_MODEL_NAME,
            &model_name(finding),
        ),
        code_item(Rel::HasConceptMod, &PROCEDURE_REPORTED, &PLAIN_RADIOGRAPHY),
        container(Rel::Contains, &IMAGING_MEASUREMENTS, None, groups),
        container(
            Rel::Contains,
            &QUALITATIVE_EVALUATIONS,
            None,
            vec![text_item(Rel::Contains, &COMMENT, &comment(finding))],
        ),
    ];
    obj.put(text(tags::VALUE_TYPE, VR::CS, "CONTAINER"));
    obj.put(sequence(
        tags::CONCEPT_NAME_CODE_SEQUENCE,
        vec![IMAGING_MEASUREMENT_REPORT.item()],
    ));
    obj.put(text(tags::CONTINUITY_OF_CONTENT, VR::CS, "SEPARATE"));
    obj.put(template_sequence("1500"));
    obj.put(sequence(tags::CONTENT_SEQUENCE, children));
    obj
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_strings_fit_ds() {
        assert_eq!(ds(0.5), "0.5");
        assert_eq!(ds(0.93), "0.93");
        assert_eq!(ds(0.123_456_79), "0.12345679");
        assert_eq!(ds(1.0), "1");
        assert_eq!(ds(0.0), "0");
        assert!(ds(1.234_567_9e-10).len() <= 16);
    }

    #[test]
    fn polylines_are_closed_rectangles() {
        let p = polyline(&BoundingBox {
            x0: 1.0,
            y0: 2.0,
            x1: 3.5,
            y1: 4.0,
            score: 0.5,
        });
        assert_eq!(p, [1.0, 2.0, 3.5, 2.0, 3.5, 4.0, 1.0, 4.0, 1.0, 2.0]);
    }
}
