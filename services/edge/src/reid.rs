//! Re-identification at the edge: a de-identified SR or Secondary Capture made by post-processing,
//! turned into one a PACS files under the original patient and study.
//!
//! What changes (everything else, the result included, stays as it was):
//! - every reference to the source radiograph, wherever it is (Current Requested Procedure
//!   Evidence, the IMAGE items of the content tree and the images the SCOORDs are selected from,
//!   the Secondary Capture's Source Image Sequence, Study Instance UID): each pseudonymous study,
//!   series and SOP Instance UID becomes its original;
//! - the Patient and General Study modules: the original patient name, ID, issuer, birth date and
//!   sex, study date and time, accession number, study ID, referring physician and study
//!   description (empty when the original had none: they are Type 2);
//! - Content Date and Time: the radiograph's own (its content, else series, else study date and
//!   time), which the de-identified result carried shifted;
//! - the de-identification flags go: the object identifies its patient again.
//!
//! The result's own UIDs (SOP Instance, series) are kept: they are derived from the finding and
//! the model version, which is what makes the export idempotent by SOP Instance UID.

use std::collections::HashMap;

use dicom_core::header::Header;
use dicom_core::value::{DataSetSequence, PrimitiveValue, Value};
use dicom_core::{DataElement, Length, VR};
use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, InMemDicomObject};

use fracture_shared::dicom_outputs::reference_date_time;
use fracture_shared::error::StageError;
use fracture_shared::pixels;

use crate::linkage::Link;
use crate::originals::Originals;

/// The Patient and General Study attributes written back from the linkage table.
pub const RESTORED: &[&str] = &[
    "patient_name",
    "patient_id",
    "issuer_of_patient_id",
    "patient_birth_date",
    "patient_sex",
    "study_date",
    "study_time",
    "accession_number",
    "study_id",
    "referring_physician_name",
    "study_description",
];

/// Type 3 attributes among [`RESTORED`]: left out rather than written empty.
const OPTIONAL: &[&str] = &["issuer_of_patient_id", "study_description"];

/// Replaces every UI value of `obj` (recursively) found in `map`.
fn map_uids(obj: InMemDicomObject, map: &HashMap<&str, &str>) -> InMemDicomObject {
    InMemDicomObject::from_element_iter(obj.into_iter().map(|e| {
        let (tag, vr) = (e.tag(), e.vr());
        match (vr, e.value()) {
            (VR::SQ, Value::Sequence(_)) => {
                let items = match e.into_value() {
                    Value::Sequence(seq) => seq.into_items(),
                    _ => unreachable!("matched a sequence"),
                };
                let items: Vec<InMemDicomObject> =
                    items.into_iter().map(|i| map_uids(i, map)).collect();
                DataElement::new(tag, VR::SQ, DataSetSequence::new(items, Length::UNDEFINED))
            }
            (VR::UI, Value::Primitive(p)) => {
                let values: Vec<String> = p
                    .to_multi_str()
                    .iter()
                    .map(|u| {
                        let u = u.trim_end_matches('\0').trim();
                        map.get(u).copied().unwrap_or(u).to_string()
                    })
                    .collect();
                DataElement::new(tag, VR::UI, PrimitiveValue::Strs(values.into()))
            }
            _ => e,
        }
    }))
}

/// Re-identifies the Part 10 file `part10` (an SR or Secondary Capture about the radiograph
/// `link` describes). A file that is not DICOM is a data error.
pub fn reidentify(part10: &[u8], link: &Link) -> Result<DefaultDicomObject, StageError> {
    let file = pixels::read_object(part10)?;
    let o = &link.original;
    let map: HashMap<&str, &str> = [
        (&link.study_instance_uid, &o.study_instance_uid),
        (&link.series_instance_uid, &o.series_instance_uid),
        (&link.sop_instance_uid, &o.sop_instance_uid),
    ]
    .into_iter()
    .filter(|(p, orig)| !p.is_empty() && !orig.is_empty())
    .map(|(p, orig)| (p.as_str(), orig.as_str()))
    .collect();
    let meta = file.meta().clone();
    let mut obj = map_uids(file.into_inner(), &map);
    for &(field, tag, vr) in Originals::ATTRIBUTES {
        if !RESTORED.contains(&field) {
            continue;
        }
        match o.get(field).unwrap_or_default() {
            "" if OPTIONAL.contains(&field) => {
                obj.remove_element(tag);
            }
            "" => {
                obj.put(DataElement::new(tag, vr, PrimitiveValue::Empty));
            }
            v => {
                obj.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
            }
        }
    }
    let original = |tag| {
        Originals::ATTRIBUTES
            .iter()
            .find(|(_, t, _)| *t == tag)
            .and_then(|(field, _, _)| o.get(field))
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };
    if let Some((date, time)) = reference_date_time(original) {
        obj.put(DataElement::new(
            tags::CONTENT_DATE,
            VR::DA,
            PrimitiveValue::from(date.as_str()),
        ));
        obj.put(DataElement::new(
            tags::CONTENT_TIME,
            VR::TM,
            PrimitiveValue::from(time.as_str()),
        ));
    }
    for tag in [
        tags::PATIENT_IDENTITY_REMOVED,
        tags::DEIDENTIFICATION_METHOD,
        tags::DEIDENTIFICATION_METHOD_CODE_SEQUENCE,
    ] {
        obj.remove_element(tag);
    }
    Ok(obj.with_exact_meta(meta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_dictionary_std::uids;
    use dicom_object::mem::InMemElement;
    use dicom_object::FileMetaTableBuilder;
    use fracture_shared::dicom_outputs::{derived_uid, OutputUids};

    const MODEL: &str = "demo-1";

    fn text(tag: dicom_core::Tag, vr: VR, v: &str) -> InMemElement {
        DataElement::new(tag, vr, PrimitiveValue::from(v))
    }

    fn sequence(tag: dicom_core::Tag, items: Vec<InMemDicomObject>) -> InMemElement {
        DataElement::new(tag, VR::SQ, DataSetSequence::new(items, Length::UNDEFINED))
    }

    /// The source radiograph as a Referenced SOP item (de-identified UIDs of odd length: padded
    /// with NUL when written, so easy to find in the bytes).
    fn referenced_source() -> InMemDicomObject {
        InMemDicomObject::from_element_iter([
            text(
                tags::REFERENCED_SOP_CLASS_UID,
                VR::UI,
                uids::DIGITAL_X_RAY_IMAGE_STORAGE_FOR_PRESENTATION,
            ),
            text(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, "2.25.9003"),
        ])
    }

    /// What post-processing writes on a result from the de-identified radiograph: its patient
    /// and study attributes (Type 2 ones it lacks written empty) and the content date it takes
    /// from the radiograph's series date.
    fn result(class: &str, instance: &str, series: &str) -> InMemDicomObject {
        InMemDicomObject::from_element_iter([
            text(tags::SOP_CLASS_UID, VR::UI, class),
            text(tags::SOP_INSTANCE_UID, VR::UI, instance),
            text(tags::CONTENT_DATE, VR::DA, "20180304"),
            text(tags::CONTENT_TIME, VR::TM, "101010"),
            text(tags::PATIENT_NAME, VR::PN, "ANON0A1B2C3D4E5F"),
            text(tags::PATIENT_ID, VR::LO, "ANON0A1B2C3D4E5F"),
            text(tags::PATIENT_BIRTH_DATE, VR::DA, ""),
            text(tags::PATIENT_SEX, VR::CS, "F"),
            text(tags::PATIENT_IDENTITY_REMOVED, VR::CS, "YES"),
            text(
                tags::DEIDENTIFICATION_METHOD,
                VR::LO,
                "fracture PS3.15 E.1 Basic",
            ),
            text(tags::PATIENT_AGE, VR::AS, "041Y"),
            text(tags::STUDY_INSTANCE_UID, VR::UI, "2.25.9001"),
            text(tags::STUDY_DATE, VR::DA, "20180303"),
            text(tags::STUDY_TIME, VR::TM, ""),
            text(tags::REFERRING_PHYSICIAN_NAME, VR::PN, ""),
            text(tags::STUDY_ID, VR::SH, ""),
            text(tags::ACCESSION_NUMBER, VR::SH, ""),
            text(tags::SERIES_INSTANCE_UID, VR::UI, series),
        ])
    }

    fn image_item(relationship: &str) -> InMemDicomObject {
        InMemDicomObject::from_element_iter([
            text(tags::RELATIONSHIP_TYPE, VR::CS, relationship),
            text(tags::VALUE_TYPE, VR::CS, "IMAGE"),
            sequence(tags::REFERENCED_SOP_SEQUENCE, vec![referenced_source()]),
        ])
    }

    /// A Comprehensive SR shaped as post-processing writes it: the source in the evidence, in an
    /// IMAGE item and as the image a box's SCOORD is selected from; a tracking UID of its own.
    fn structured_report(ids: &OutputUids) -> Vec<u8> {
        let mut obj = result(
            uids::COMPREHENSIVE_SR_STORAGE,
            &ids.sr_instance,
            &ids.sr_series,
        );
        obj.put(text(tags::MODALITY, VR::CS, "SR"));
        let series = InMemDicomObject::from_element_iter([
            text(tags::SERIES_INSTANCE_UID, VR::UI, "2.25.9002"),
            sequence(tags::REFERENCED_SOP_SEQUENCE, vec![referenced_source()]),
        ]);
        let evidence = InMemDicomObject::from_element_iter([
            text(tags::STUDY_INSTANCE_UID, VR::UI, "2.25.9001"),
            sequence(tags::REFERENCED_SERIES_SEQUENCE, vec![series]),
        ]);
        obj.put(sequence(
            tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE,
            vec![evidence],
        ));
        let tracking = InMemDicomObject::from_element_iter([
            text(tags::RELATIONSHIP_TYPE, VR::CS, "HAS OBS CONTEXT"),
            text(tags::VALUE_TYPE, VR::CS, "UIDREF"),
            text(tags::UID, VR::UI, &tracking_uid()),
        ]);
        let scoord = InMemDicomObject::from_element_iter([
            text(tags::RELATIONSHIP_TYPE, VR::CS, "CONTAINS"),
            text(tags::VALUE_TYPE, VR::CS, "SCOORD"),
            text(tags::GRAPHIC_TYPE, VR::CS, "POLYLINE"),
            DataElement::new(
                tags::GRAPHIC_DATA,
                VR::FL,
                PrimitiveValue::F32(
                    [1.0f32, 2.0, 3.0, 2.0, 3.0, 4.0, 1.0, 4.0, 1.0, 2.0]
                        .into_iter()
                        .collect(),
                ),
            ),
            sequence(tags::CONTENT_SEQUENCE, vec![image_item("SELECTED FROM")]),
        ]);
        let group = InMemDicomObject::from_element_iter([
            text(tags::RELATIONSHIP_TYPE, VR::CS, "CONTAINS"),
            text(tags::VALUE_TYPE, VR::CS, "CONTAINER"),
            sequence(
                tags::CONTENT_SEQUENCE,
                vec![tracking, image_item("CONTAINS"), scoord],
            ),
        ]);
        obj.put(text(tags::VALUE_TYPE, VR::CS, "CONTAINER"));
        obj.put(sequence(tags::CONTENT_SEQUENCE, vec![group]));
        part10(obj)
    }

    /// A Secondary Capture shaped as post-processing writes it: the source as its source image.
    fn secondary_capture(ids: &OutputUids) -> Vec<u8> {
        let mut obj = result(
            uids::SECONDARY_CAPTURE_IMAGE_STORAGE,
            &ids.sc_instance,
            &ids.sc_series,
        );
        obj.put(text(tags::MODALITY, VR::CS, "OT"));
        obj.put(sequence(
            tags::SOURCE_IMAGE_SEQUENCE,
            vec![referenced_source()],
        ));
        for (tag, v) in [
            (tags::SAMPLES_PER_PIXEL, 3u16),
            (tags::PLANAR_CONFIGURATION, 0),
            (tags::ROWS, 2),
            (tags::COLUMNS, 4),
            (tags::BITS_ALLOCATED, 8),
            (tags::BITS_STORED, 8),
            (tags::HIGH_BIT, 7),
            (tags::PIXEL_REPRESENTATION, 0),
        ] {
            obj.put(DataElement::new(tag, VR::US, PrimitiveValue::from(v)));
        }
        obj.put(text(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "RGB"));
        obj.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OB,
            PrimitiveValue::from(vec![7u8; 24]),
        ));
        part10(obj)
    }

    fn tracking_uid() -> String {
        derived_uid(&["fracture-tracking", "2.25.9003", MODEL, "fracture finding"])
    }

    fn part10(obj: InMemDicomObject) -> Vec<u8> {
        let file = obj
            .with_meta(FileMetaTableBuilder::new().transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN))
            .unwrap();
        pixels::write_object(&file).unwrap()
    }

    fn link() -> Link {
        Link {
            study_instance_uid: "2.25.9001".into(),
            series_instance_uid: "2.25.9002".into(),
            sop_instance_uid: "2.25.9003".into(),
            original: Originals {
                study_instance_uid: "1.2.826.0.1.7.1".into(),
                series_instance_uid: "1.2.826.0.1.7.1.2".into(),
                sop_instance_uid: "1.2.826.0.1.7.1.2.3".into(),
                sop_class_uid: uids::DIGITAL_X_RAY_IMAGE_STORAGE_FOR_PRESENTATION.into(),
                patient_id: "PAT-7".into(),
                patient_name: "Doe^Jane".into(),
                patient_birth_date: "19800101".into(),
                patient_sex: "F".into(),
                accession_number: "ACC-7".into(),
                study_date: "20200303".into(),
                study_time: "090000".into(),
                series_date: "20200304".into(),
                series_time: "101010".into(),
                ..Default::default()
            },
        }
    }

    fn value(obj: &InMemDicomObject, tag: dicom_core::Tag) -> String {
        obj.get(tag)
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_end_matches('\0').trim().to_string())
            .unwrap_or_default()
    }

    /// Every value of `tag` anywhere in `obj`.
    fn everywhere(obj: &InMemDicomObject, tag: dicom_core::Tag, out: &mut Vec<String>) {
        for e in obj {
            if e.tag() == tag {
                out.push(e.to_str().unwrap().trim_end_matches('\0').to_string());
            }
            if let Value::Sequence(seq) = e.value() {
                for item in seq.items() {
                    everywhere(item, tag, out);
                }
            }
        }
    }

    fn written(obj: &DefaultDicomObject) -> String {
        let mut bytes = Vec::new();
        obj.write_all(&mut bytes).unwrap();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[test]
    fn a_structured_report_goes_back_to_its_patient_study_and_image() {
        let ids = OutputUids::new("2.25.9001", "2.25.9003", MODEL);
        let sr = structured_report(&ids);
        let obj = reidentify(&sr, &link()).unwrap();
        let o = link().original;
        for (tag, want) in [
            (tags::PATIENT_ID, "PAT-7"),
            (tags::PATIENT_NAME, "Doe^Jane"),
            (tags::PATIENT_BIRTH_DATE, "19800101"),
            (tags::ACCESSION_NUMBER, "ACC-7"),
            (tags::STUDY_INSTANCE_UID, o.study_instance_uid.as_str()),
            (tags::STUDY_DATE, "20200303"),
            (tags::STUDY_TIME, "090000"),
            // The radiograph's own date (its series date: it has no content date).
            (tags::CONTENT_DATE, "20200304"),
            (tags::CONTENT_TIME, "101010"),
            (tags::PATIENT_AGE, "041Y"),
            // The result keeps its own identity: that is what makes the export idempotent.
            (tags::SOP_INSTANCE_UID, ids.sr_instance.as_str()),
            (tags::SERIES_INSTANCE_UID, ids.sr_series.as_str()),
        ] {
            assert_eq!(value(&obj, tag), want, "{tag}");
        }
        assert_eq!(
            obj.meta()
                .media_storage_sop_instance_uid()
                .trim_end_matches('\0'),
            ids.sr_instance
        );
        for tag in [
            tags::PATIENT_IDENTITY_REMOVED,
            tags::DEIDENTIFICATION_METHOD,
            tags::ISSUER_OF_PATIENT_ID,
        ] {
            assert!(obj.element(tag).is_err(), "{tag} left");
        }
        // Evidence, the IMAGE item and each SCOORD's image: all the original radiograph.
        let mut refs = Vec::new();
        everywhere(&obj, tags::REFERENCED_SOP_INSTANCE_UID, &mut refs);
        assert_eq!(refs.len(), 3, "{refs:?}");
        assert!(refs.iter().all(|r| *r == o.sop_instance_uid), "{refs:?}");
        let mut series = Vec::new();
        everywhere(&obj, tags::SERIES_INSTANCE_UID, &mut series);
        assert!(series.contains(&o.series_instance_uid), "{series:?}");
        // UIDs that are not the radiograph's stay as they were.
        let mut uid_refs = Vec::new();
        everywhere(&obj, tags::UID, &mut uid_refs);
        assert_eq!(uid_refs, [tracking_uid()]);
        let (before, after) = (String::from_utf8_lossy(&sr), written(&obj));
        for pseudonym in [
            "2.25.9001\0",
            "2.25.9002\0",
            "2.25.9003\0",
            "ANON0A1B2C3D4E5F",
        ] {
            assert!(
                before.contains(pseudonym),
                "{pseudonym:?}: the search finds it"
            );
            assert!(!after.contains(pseudonym), "{pseudonym:?} left in the SR");
        }
    }

    #[test]
    fn a_secondary_capture_goes_back_to_its_patient_and_source_image() {
        let ids = OutputUids::new("2.25.9001", "2.25.9003", MODEL);
        let sc = secondary_capture(&ids);
        let mut l = link();
        // An original without dates: the result keeps the content date it was made with.
        for f in ["study_date", "study_time", "series_date", "series_time"] {
            l.original.get_mut(f).unwrap().clear();
        }
        let obj = reidentify(&sc, &l).unwrap();
        assert_eq!(value(&obj, tags::PATIENT_ID), "PAT-7");
        assert_eq!(value(&obj, tags::STUDY_DATE), "");
        assert_eq!(value(&obj, tags::CONTENT_DATE), "20180304");
        let mut refs = Vec::new();
        everywhere(&obj, tags::REFERENCED_SOP_INSTANCE_UID, &mut refs);
        assert_eq!(refs, [l.original.sop_instance_uid.clone()]);
        assert_eq!(value(&obj, tags::SOP_INSTANCE_UID), ids.sc_instance);
        assert_eq!(
            obj.element(tags::PIXEL_DATA)
                .unwrap()
                .to_bytes()
                .unwrap()
                .as_ref(),
            &[7u8; 24][..],
            "the pixels are the result's"
        );
        assert!(reidentify(b"not dicom", &l).is_err());
    }
}
