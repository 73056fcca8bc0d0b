//! Re-identification at the edge: a de-identified SR or Secondary Capture made by this stage,
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

use fracture_ingest::linkage::{Link, Originals};
use fracture_shared::error::StageError;
use fracture_shared::pixels;

use crate::dicom::reference_date_time;

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
    use crate::dicom::{to_part10, OutputUids, Source};
    use crate::sc::{secondary_capture, Rgb};
    use crate::sr::structured_report;
    use dicom_dictionary_std::uids;
    use fracture_shared::messages::BoundingBox;

    /// A de-identified radiograph as ingest leaves it (odd-length UIDs: padded, easy to find).
    fn deidentified() -> DefaultDicomObject {
        let text = |tag, vr, v: &str| DataElement::new(tag, vr, PrimitiveValue::from(v));
        let obj = InMemDicomObject::from_element_iter([
            text(
                tags::SOP_CLASS_UID,
                VR::UI,
                uids::DIGITAL_X_RAY_IMAGE_STORAGE_FOR_PRESENTATION,
            ),
            text(tags::SOP_INSTANCE_UID, VR::UI, "2.25.9003"),
            text(tags::STUDY_INSTANCE_UID, VR::UI, "2.25.9001"),
            text(tags::SERIES_INSTANCE_UID, VR::UI, "2.25.9002"),
            text(tags::PATIENT_NAME, VR::PN, "ANON0A1B2C3D4E5F"),
            text(tags::PATIENT_ID, VR::LO, "ANON0A1B2C3D4E5F"),
            text(tags::PATIENT_SEX, VR::CS, "F"),
            text(tags::PATIENT_AGE, VR::AS, "041Y"),
            text(tags::PATIENT_IDENTITY_REMOVED, VR::CS, "YES"),
            text(
                tags::DEIDENTIFICATION_METHOD,
                VR::LO,
                "fracture PS3.15 E.1 Basic",
            ),
            text(tags::STUDY_DATE, VR::DA, "20180303"),
            text(tags::SERIES_DATE, VR::DA, "20180304"),
            text(tags::SERIES_TIME, VR::TM, "101010"),
            text(tags::ACCESSION_NUMBER, VR::SH, ""),
        ]);
        to_part10(obj).unwrap().0
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

    fn text(obj: &InMemDicomObject, tag: dicom_core::Tag) -> String {
        crate::dicom::string(obj, tag).unwrap_or_default()
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
        let finding = crate::sc::tests::finding(
            true,
            vec![BoundingBox {
                x0: 1.0,
                y0: 2.0,
                x1: 3.0,
                y1: 4.0,
                score: 0.9,
            }],
        );
        let source = Source::read(&deidentified()).unwrap();
        let ids = OutputUids::new("2.25.9001", "2.25.9003", &finding.model_version);
        let (_, sr) = to_part10(structured_report(&source, &finding, &ids)).unwrap();
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
            assert_eq!(text(&obj, tag), want, "{tag}");
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
        let finding = crate::sc::tests::finding(false, vec![]);
        let source = Source::read(&deidentified()).unwrap();
        let ids = OutputUids::new("2.25.9001", "2.25.9003", &finding.model_version);
        let rgb = Rgb {
            width: 4,
            height: 2,
            data: vec![7; 24],
        };
        let (_, sc) =
            to_part10(secondary_capture(&source, &finding, &ids, &rgb, 0).unwrap()).unwrap();
        let mut l = link();
        // An original without dates: the result keeps the content date it was made with.
        for f in ["study_date", "study_time", "series_date", "series_time"] {
            l.original.get_mut(f).unwrap().clear();
        }
        let obj = reidentify(&sc, &l).unwrap();
        assert_eq!(text(&obj, tags::PATIENT_ID), "PAT-7");
        assert_eq!(text(&obj, tags::STUDY_DATE), "");
        assert_eq!(text(&obj, tags::CONTENT_DATE), "20180304");
        let mut refs = Vec::new();
        everywhere(&obj, tags::REFERENCED_SOP_INSTANCE_UID, &mut refs);
        assert_eq!(refs, [l.original.sop_instance_uid.clone()]);
        assert_eq!(text(&obj, tags::SOP_INSTANCE_UID), ids.sc_instance);
        assert!(reidentify(b"not dicom", &l).is_err());
    }
}
