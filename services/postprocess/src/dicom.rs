//! What the DICOM outputs (SR and Secondary Capture) share: deterministic UIDs, the source
//! radiograph's identity, the patient and study attributes they inherit, and element builders.

use dicom_core::value::{DataSetSequence, PrimitiveValue};
use dicom_core::{DataElement, Length, Tag, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::mem::InMemElement;
use dicom_object::{DefaultDicomObject, FileMetaTableBuilder, InMemDicomObject};

// One derivation for the stage that writes the results and the export that predicts their UIDs.
pub use fracture_shared::dicom_outputs::{derived_uid, reference_date_time, OutputUids};
use fracture_shared::error::StageError;
use fracture_shared::messages::Finding;

/// Manufacturer of everything the pipeline writes (equipment and device observer).
pub const MANUFACTURER: &str = "fracture";

/// What the result series say, so nobody mistakes them for a radiologist's read.
pub fn series_description(trained: bool) -> &'static str {
    if trained {
        "AI RESULT - FRACTURE DETECTION - NOT A DIAGNOSIS"
    } else {
        "AI RESULT - UNTRAINED MODEL - NOT FOR CLINICAL USE"
    }
}

/// Patient module, Patient Study module and General Study module attributes the outputs copy
/// from the (de-identified) source, so a PACS files them under the same patient and study.
/// Type 2 attributes missing from the source are written empty.
const INHERITED: &[(Tag, VR, bool)] = &[
    (tags::PATIENT_NAME, VR::PN, true),
    (tags::PATIENT_ID, VR::LO, true),
    (tags::ISSUER_OF_PATIENT_ID, VR::LO, false),
    (tags::PATIENT_BIRTH_DATE, VR::DA, true),
    (tags::PATIENT_SEX, VR::CS, true),
    (tags::PATIENT_IDENTITY_REMOVED, VR::CS, false),
    (tags::DEIDENTIFICATION_METHOD, VR::LO, false),
    (tags::DEIDENTIFICATION_METHOD_CODE_SEQUENCE, VR::SQ, false),
    (tags::PATIENT_AGE, VR::AS, false),
    (tags::PATIENT_SIZE, VR::DS, false),
    (tags::PATIENT_WEIGHT, VR::DS, false),
    (tags::STUDY_INSTANCE_UID, VR::UI, true),
    (tags::STUDY_DATE, VR::DA, true),
    (tags::STUDY_TIME, VR::TM, true),
    (tags::REFERRING_PHYSICIAN_NAME, VR::PN, true),
    (tags::STUDY_ID, VR::SH, true),
    (tags::ACCESSION_NUMBER, VR::SH, true),
    (tags::STUDY_DESCRIPTION, VR::LO, false),
];

/// The source radiograph as the outputs need it.
#[derive(Debug, Clone)]
pub struct Source {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub rows: u32,
    pub columns: u32,
    /// Content Date and Time of the outputs: the source's (already shifted by
    /// de-identification), so a re-run writes byte-identical files.
    pub date: String,
    pub time: String,
    pub instance_number: String,
    pub patient_orientation: Option<InMemElement>,
    /// R or L: the source's Laterality, or its Image Laterality when that is R or L.
    pub laterality: Option<String>,
    inherited: Vec<InMemElement>,
}

pub(crate) use fracture_shared::dicom::text as string;

impl Source {
    /// Reads the identity of a parsed source object. A source without SOP Class, SOP Instance,
    /// Study or Series Instance UID cannot be referenced: that is a data error.
    pub fn read(obj: &DefaultDicomObject) -> Result<Self, StageError> {
        let required = |tag: Tag, name: &str| {
            string(obj, tag).ok_or_else(|| {
                StageError::data(format!(
                    "the de-identified radiograph has no {name}: the DICOM results could not reference it"
                ))
            })
        };
        let rows = obj
            .get(tags::ROWS)
            .and_then(|e| e.to_int::<u32>().ok())
            .unwrap_or(0);
        let columns = obj
            .get(tags::COLUMNS)
            .and_then(|e| e.to_int::<u32>().ok())
            .unwrap_or(0);
        let (date, time) = reference_date_time(|tag| string(obj, tag)).unwrap_or_default();
        let mut inherited = Vec::new();
        for &(tag, vr, type2) in INHERITED {
            match obj.get(tag) {
                Some(e) => inherited.push(e.clone()),
                None if type2 => inherited.push(DataElement::new(tag, vr, PrimitiveValue::Empty)),
                None => {}
            }
        }
        Ok(Self {
            sop_class_uid: required(tags::SOP_CLASS_UID, "SOP Class UID")?,
            sop_instance_uid: required(tags::SOP_INSTANCE_UID, "SOP Instance UID")?,
            study_instance_uid: required(tags::STUDY_INSTANCE_UID, "Study Instance UID")?,
            series_instance_uid: required(tags::SERIES_INSTANCE_UID, "Series Instance UID")?,
            rows,
            columns,
            date,
            time,
            instance_number: string(obj, tags::INSTANCE_NUMBER).unwrap_or_else(|| "1".into()),
            patient_orientation: obj.get(tags::PATIENT_ORIENTATION).cloned(),
            laterality: [tags::LATERALITY, tags::IMAGE_LATERALITY]
                .iter()
                .filter_map(|&t| string(obj, t))
                .find(|l| l == "R" || l == "L"),
            inherited,
        })
    }

    /// Puts the patient and study attributes on an output.
    pub fn inherit_into(&self, obj: &mut InMemDicomObject) {
        for e in &self.inherited {
            obj.put(e.clone());
        }
    }

    /// A Referenced SOP item (SOP Class and Instance) for the source.
    pub fn referenced_sop(&self) -> InMemDicomObject {
        InMemDicomObject::from_element_iter([
            text(tags::REFERENCED_SOP_CLASS_UID, VR::UI, &self.sop_class_uid),
            text(
                tags::REFERENCED_SOP_INSTANCE_UID,
                VR::UI,
                &self.sop_instance_uid,
            ),
        ])
    }

    /// A Hierarchical SOP Instance Reference item (study, series, instance) for the source.
    pub fn hierarchical_reference(&self) -> InMemDicomObject {
        let series = InMemDicomObject::from_element_iter([
            text(tags::SERIES_INSTANCE_UID, VR::UI, &self.series_instance_uid),
            sequence(tags::REFERENCED_SOP_SEQUENCE, vec![self.referenced_sop()]),
        ]);
        InMemDicomObject::from_element_iter([
            text(tags::STUDY_INSTANCE_UID, VR::UI, &self.study_instance_uid),
            sequence(tags::REFERENCED_SERIES_SEQUENCE, vec![series]),
        ])
    }

    /// Content Date and Time: the source's, or the current UTC time when it has none.
    pub fn content_date_time(&self) -> (String, String) {
        if !self.date.is_empty() {
            return (self.date.clone(), self.time.clone());
        }
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let (days, rest) = (secs / 86_400, secs % 86_400);
        let (y, m, d) = civil_from_days(days as i64);
        (
            format!("{y:04}{m:02}{d:02}"),
            format!("{:02}{:02}{:02}", rest / 3600, rest / 60 % 60, rest % 60),
        )
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Equipment attributes every output carries (General Equipment module).
pub fn equipment(obj: &mut InMemDicomObject, finding: &Finding) {
    obj.put(text(tags::MANUFACTURER, VR::LO, MANUFACTURER));
    obj.put(text(
        tags::MANUFACTURER_MODEL_NAME,
        VR::LO,
        &model_name(finding),
    ));
    obj.put(text(
        tags::SOFTWARE_VERSIONS,
        VR::LO,
        concat!("fracture ", env!("CARGO_PKG_VERSION")),
    ));
}

/// The model as it is named in the outputs: its version, and whether it was ever trained.
pub fn model_name(finding: &Finding) -> String {
    if finding.model_trained {
        finding.model_version.clone()
    } else {
        format!("{} (untrained)", finding.model_version)
    }
}

pub fn text(tag: Tag, vr: VR, value: &str) -> InMemElement {
    DataElement::new(tag, vr, PrimitiveValue::from(value))
}

pub fn sequence(tag: Tag, items: Vec<InMemDicomObject>) -> InMemElement {
    DataElement::new(tag, VR::SQ, DataSetSequence::new(items, Length::UNDEFINED))
}

/// A coded concept: (code value, coding scheme designator, code meaning).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Code(pub &'static str, pub &'static str, pub &'static str);

impl Code {
    pub fn item(&self) -> InMemDicomObject {
        InMemDicomObject::from_element_iter([
            text(tags::CODE_VALUE, VR::SH, self.0),
            text(tags::CODING_SCHEME_DESIGNATOR, VR::SH, self.1),
            text(tags::CODE_MEANING, VR::LO, self.2),
        ])
    }
}

/// SNOMED CT codes of the default regions (all from CID 4031 "Common Anatomic Regions", except
/// `tibia_fibula`, which is CID 4031's "Lower leg"); `None` for `unknown` and custom regions.
pub fn region_code(region: &str) -> Option<Code> {
    Some(match region {
        "ankle" => Code("70258002", "SCT", "Ankle joint"),
        "clavicle" => Code("51299004", "SCT", "Clavicle"),
        "elbow" => Code("16953009", "SCT", "Elbow joint"),
        "femur" => Code("71341001", "SCT", "Femur"),
        "foot" => Code("56459004", "SCT", "Foot"),
        "forearm" => Code("14975008", "SCT", "Forearm"),
        "hand" => Code("85562004", "SCT", "Hand"),
        "hip" => Code("29836001", "SCT", "Hip"),
        "humerus" => Code("85050009", "SCT", "Humerus"),
        "knee" => Code("72696002", "SCT", "Knee"),
        "pelvis" => Code("816092008", "SCT", "Pelvis"),
        "shoulder" => Code("16982005", "SCT", "Shoulder"),
        "cervical_spine" => Code("122494005", "SCT", "Cervical spine"),
        "thoracolumbar_spine" => Code("1217256009", "SCT", "Thoraco-lumbar spine"),
        "tibia_fibula" => Code("30021000", "SCT", "Lower leg"),
        "wrist" => Code("74670003", "SCT", "Wrist joint"),
        _ => return None,
    })
}

/// Wraps a data set in a Part 10 file (explicit VR little endian) and serialises it.
pub fn to_part10(obj: InMemDicomObject) -> Result<(DefaultDicomObject, Vec<u8>), StageError> {
    let file = obj
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN)
                .implementation_version_name(concat!("FRACTURE_", env!("CARGO_PKG_VERSION"))),
        )
        .map_err(|e| StageError::internal(format!("cannot build the DICOM file meta: {e}")))?;
    let bytes = fracture_shared::pixels::write_object(&file)?;
    Ok((file, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_to_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn every_default_region_has_a_code() {
        for r in fracture_shared::region::REGIONS {
            assert!(region_code(r).is_some(), "{r}");
        }
        assert!(region_code("unknown").is_none());
    }
}
