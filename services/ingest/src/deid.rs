//! De-identification: the PHI boundary. A pure function from a DICOM object and a policy to a
//! de-identified object.
//!
//! Foundation scope: the PS3.15 Annex E Basic Profile actions for the attributes CR/DX objects
//! carry in practice (the table below), applied recursively into sequences; every private tag
//! removed; every person name (PN) not listed removed; every non-standard UID replaced by a
//! keyed hash; every date shifted by one per-patient offset (Retain Longitudinal Temporal
//! Information with Modified Dates); age and sex kept (Retain Patient Characteristics);
//! institution replaced by the site code.

use dicom_core::header::Header;
use dicom_core::value::{DataSetSequence, PrimitiveValue, Value};
use dicom_core::{DataElement, Length, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::mem::InMemElement;
use dicom_object::{DefaultDicomObject, InMemDicomObject};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use fracture_shared::error::StageError;

type HmacSha256 = Hmac<Sha256>;

/// The deployment's de-identification policy.
#[derive(Clone)]
pub struct DeidPolicy {
    key: Vec<u8>,
    /// Replaces InstitutionName; a pseudonymous code, never the hospital's name.
    pub site_code: String,
    /// Root for generated UIDs; `2.25` renders the hash as a UUID-derived integer.
    pub uid_root: String,
}

impl std::fmt::Debug for DeidPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is the re-identification secret: never print it.
        f.debug_struct("DeidPolicy")
            .field("site_code", &self.site_code)
            .field("uid_root", &self.uid_root)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(String);

impl DeidPolicy {
    pub fn new(key: Vec<u8>, site_code: &str, uid_root: &str) -> Result<Self, PolicyError> {
        if key.len() < 32 {
            return Err(PolicyError(format!(
                "the de-identification key has {} bytes; it needs at least 32 (e.g. `head -c 32 /dev/urandom > key`)",
                key.len()
            )));
        }
        let root = uid_root.trim().trim_end_matches('.');
        if root.is_empty()
            || !root
                .split('.')
                .all(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(PolicyError(format!(
                "uid_root {uid_root:?} is not a UID root like 2.25 or 1.2.826.0.1.3680043.10.1234"
            )));
        }
        // At least 31 hash digits (about 100 bits) must follow the root within 64 characters.
        if root.len() > 32 {
            return Err(PolicyError(format!(
                "uid_root {uid_root:?} is too long: at most 32 characters leave room for the hash in a 64-character UID"
            )));
        }
        Ok(Self {
            key,
            site_code: site_code.to_string(),
            uid_root: root.to_string(),
        })
    }

    fn mac(&self, domain: &str, value: &str) -> [u8; 32] {
        let mut m = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        m.update(domain.as_bytes());
        m.update(&[0]);
        m.update(value.as_bytes());
        m.finalize().into_bytes().into()
    }

    /// The same input UID gives the same pseudonym on every replica; another key, another one.
    pub fn pseudonymise_uid(&self, uid: &str) -> String {
        let uid = uid.trim_end_matches('\0').trim();
        let h = self.mac("uid", uid);
        let mut b = [0u8; 16];
        b.copy_from_slice(&h[..16]);
        // A version-8 (custom) UUID, so `2.25.<n>` is a well-formed UUID-derived UID.
        b[6] = (b[6] & 0x0f) | 0x80;
        b[8] = (b[8] & 0x3f) | 0x80;
        let n = u128::from_be_bytes(b);
        let uid = format!("{}.{}", self.uid_root, n);
        if uid.len() <= 64 {
            uid
        } else {
            // Long custom roots: drop digits from the hash, keeping the root.
            uid[..64].to_string()
        }
    }

    /// A pseudonymous reference for something that is not a UID (an input file, a patient).
    pub fn pseudonym(&self, domain: &str, value: &str) -> String {
        hex::encode(&self.mac(domain, value)[..12])
    }

    /// Days to add to every date of this patient: between -3650 and -1, fixed per patient.
    pub fn date_shift_days(&self, patient_id: &str) -> i64 {
        let h = self.mac("date-shift", patient_id.trim());
        let v = u64::from_be_bytes(h[..8].try_into().expect("8 bytes"));
        -((v % 3650) as i64 + 1)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Action {
    /// X: remove.
    Remove,
    /// Z: keep the attribute, empty its value (Type 2 attributes).
    Empty,
    /// D: replace with a pseudonym derived from the original.
    Pseudonym,
    /// Replace with the site code.
    Site,
}

/// Basic Profile actions for the attributes radiographs carry (subset of Table E.1-1).
// Retired attributes are still in Table E.1-1: old modalities still write them.
#[allow(deprecated)]
const TABLE: &[(Tag, Action)] = &[
    (tags::PATIENT_NAME, Action::Pseudonym),
    (tags::PATIENT_ID, Action::Pseudonym),
    (tags::PATIENT_BIRTH_DATE, Action::Empty),
    (tags::PATIENT_BIRTH_TIME, Action::Remove),
    (tags::OTHER_PATIENT_I_DS, Action::Remove),
    (tags::OTHER_PATIENT_NAMES, Action::Remove),
    (tags::OTHER_PATIENT_I_DS_SEQUENCE, Action::Remove),
    (tags::PATIENT_BIRTH_NAME, Action::Remove),
    (tags::PATIENT_MOTHER_BIRTH_NAME, Action::Remove),
    (tags::PATIENT_ADDRESS, Action::Remove),
    (tags::PATIENT_TELEPHONE_NUMBERS, Action::Remove),
    (tags::MILITARY_RANK, Action::Remove),
    (tags::BRANCH_OF_SERVICE, Action::Remove),
    (tags::MEDICAL_RECORD_LOCATOR, Action::Remove),
    (tags::ETHNIC_GROUP, Action::Remove),
    (tags::OCCUPATION, Action::Remove),
    (tags::ADDITIONAL_PATIENT_HISTORY, Action::Remove),
    (tags::PATIENT_COMMENTS, Action::Remove),
    (tags::PATIENT_RELIGIOUS_PREFERENCE, Action::Remove),
    (tags::PATIENT_INSURANCE_PLAN_CODE_SEQUENCE, Action::Remove),
    (tags::RESPONSIBLE_PERSON, Action::Remove),
    (tags::RESPONSIBLE_ORGANIZATION, Action::Remove),
    (tags::ACCESSION_NUMBER, Action::Empty),
    (tags::STUDY_ID, Action::Empty),
    (tags::REFERRING_PHYSICIAN_NAME, Action::Empty),
    (tags::INSTITUTION_NAME, Action::Site),
    (tags::INSTITUTION_ADDRESS, Action::Remove),
    (tags::INSTITUTIONAL_DEPARTMENT_NAME, Action::Remove),
    (tags::STATION_NAME, Action::Remove),
    (tags::DEVICE_SERIAL_NUMBER, Action::Remove),
    (tags::DETECTOR_ID, Action::Remove),
    (tags::PLATE_ID, Action::Remove),
    (tags::PERFORMING_PHYSICIAN_NAME, Action::Remove),
    (tags::NAME_OF_PHYSICIANS_READING_STUDY, Action::Remove),
    (tags::OPERATORS_NAME, Action::Remove),
    (tags::PHYSICIANS_OF_RECORD, Action::Remove),
    (tags::REQUESTING_PHYSICIAN, Action::Remove),
    (tags::STUDY_DESCRIPTION, Action::Remove),
    (tags::SERIES_DESCRIPTION, Action::Remove),
    (tags::PROTOCOL_NAME, Action::Remove),
    (tags::IMAGE_COMMENTS, Action::Remove),
    (tags::ADMITTING_DIAGNOSES_DESCRIPTION, Action::Remove),
    (tags::DERIVATION_DESCRIPTION, Action::Remove),
    (tags::REQUESTED_PROCEDURE_DESCRIPTION, Action::Remove),
    (tags::REQUESTED_PROCEDURE_ID, Action::Remove),
    (tags::PERFORMED_PROCEDURE_STEP_DESCRIPTION, Action::Remove),
    (tags::PERFORMED_PROCEDURE_STEP_ID, Action::Remove),
    (tags::REQUEST_ATTRIBUTES_SEQUENCE, Action::Remove),
    (tags::REFERENCED_PATIENT_SEQUENCE, Action::Remove),
    (
        tags::ACQUISITION_DEVICE_PROCESSING_DESCRIPTION,
        Action::Remove,
    ),
    (tags::CONTENT_CREATOR_NAME, Action::Remove),
    (tags::TEXT_COMMENTS, Action::Remove),
];

/// Standard UIDs (SOP classes, transfer syntaxes, coding schemes) identify no one.
fn is_standard_uid(uid: &str) -> bool {
    uid.starts_with("1.2.840.10008.")
}

/// Days since 1970-01-01 for a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719468;
    let era = if z >= 0 { z } else { z - 146096 } / 146097;
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Shifts a DA value (or the date part of a DT); `None` when it is not a date we can read,
/// in which case the caller removes it rather than let an unshifted date through.
fn shift_date(value: &str, days: i64) -> Option<String> {
    let v = value.trim();
    if v.len() < 8 || !v.as_bytes()[..8].iter().all(u8::is_ascii_digit) {
        return None;
    }
    let (y, m, d) = (
        v[..4].parse().ok()?,
        v[4..6].parse().ok()?,
        v[6..8].parse().ok()?,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let (y, m, d) = civil_from_days(days_from_civil(y, m, d) + days);
    Some(format!("{y:04}{m:02}{d:02}{}", &v[8..]))
}

struct Ctx<'a> {
    policy: &'a DeidPolicy,
    shift: i64,
}

fn clean_object(obj: InMemDicomObject, ctx: &Ctx) -> InMemDicomObject {
    InMemDicomObject::from_element_iter(obj.into_iter().filter_map(|e| clean_element(e, ctx)))
}

fn clean_element(e: InMemElement, ctx: &Ctx) -> Option<InMemElement> {
    let tag = e.tag();
    let vr = e.vr();
    // Private attributes (odd groups) can hold anything: remove them all.
    if tag.group() % 2 == 1 {
        return None;
    }
    // Overlays (60xx) may carry burned-in text as graphics.
    if (0x6000..=0x60FF).contains(&tag.group()) {
        return None;
    }
    if let Some((_, action)) = TABLE.iter().find(|(t, _)| *t == tag) {
        return match action {
            Action::Remove => None,
            Action::Empty => Some(DataElement::empty(tag, vr)),
            Action::Site => Some(DataElement::new(
                tag,
                vr,
                PrimitiveValue::from(ctx.policy.site_code.as_str()),
            )),
            Action::Pseudonym => {
                let original = e.to_str().map(|s| s.into_owned()).unwrap_or_default();
                let p = format!(
                    "ANON{}",
                    &ctx.policy.pseudonym("patient", original.trim())[..12].to_uppercase()
                );
                Some(DataElement::new(tag, vr, PrimitiveValue::from(p.as_str())))
            }
        };
    }
    match vr {
        // A person's name anywhere else (nested physicians, verifying observers, ...).
        VR::PN => None,
        VR::SQ => {
            let items = match e.into_value() {
                Value::Sequence(seq) => seq.into_items(),
                _ => return None,
            };
            let cleaned: Vec<InMemDicomObject> =
                items.into_iter().map(|i| clean_object(i, ctx)).collect();
            Some(DataElement::new(
                tag,
                VR::SQ,
                DataSetSequence::new(cleaned, Length::UNDEFINED),
            ))
        }
        VR::UI => {
            let uids: Vec<String> = match e.value() {
                Value::Primitive(p) => p
                    .to_multi_str()
                    .iter()
                    .map(|s| s.trim_end_matches('\0').trim().to_string())
                    .collect(),
                _ => return None,
            };
            let mapped: Vec<String> = uids
                .into_iter()
                .map(|u| {
                    if u.is_empty() || is_standard_uid(&u) {
                        u
                    } else {
                        ctx.policy.pseudonymise_uid(&u)
                    }
                })
                .collect();
            Some(DataElement::new(
                tag,
                VR::UI,
                PrimitiveValue::Strs(mapped.into()),
            ))
        }
        VR::DA | VR::DT => {
            let values: Vec<String> = match e.value() {
                Value::Primitive(p) => p.to_multi_str().to_vec(),
                _ => return None,
            };
            if values.iter().all(|v| v.trim().is_empty()) {
                return Some(e);
            }
            let shifted: Option<Vec<String>> =
                values.iter().map(|v| shift_date(v, ctx.shift)).collect();
            shifted.map(|s| DataElement::new(tag, vr, PrimitiveValue::Strs(s.into())))
        }
        _ => Some(e),
    }
}

fn code_item(value: &str, meaning: &str) -> InMemDicomObject {
    InMemDicomObject::from_element_iter([
        DataElement::new(tags::CODE_VALUE, VR::SH, PrimitiveValue::from(value)),
        DataElement::new(
            tags::CODING_SCHEME_DESIGNATOR,
            VR::SH,
            PrimitiveValue::from("DCM"),
        ),
        DataElement::new(tags::CODE_MEANING, VR::LO, PrimitiveValue::from(meaning)),
    ])
}

/// The identifiers of the original object, for the linkage table at the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Originals {
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub sop_instance_uid: String,
}

fn string_of(obj: &InMemDicomObject, tag: Tag) -> String {
    obj.element(tag)
        .ok()
        .and_then(|e| {
            e.to_str()
                .ok()
                .map(|s| s.trim_end_matches('\0').trim().to_string())
        })
        .unwrap_or_default()
}

/// De-identifies `obj` under `policy`, returning the new object and the original UIDs.
pub fn deidentify(
    obj: DefaultDicomObject,
    policy: &DeidPolicy,
) -> Result<(DefaultDicomObject, Originals), StageError> {
    let originals = Originals {
        study_instance_uid: string_of(&obj, tags::STUDY_INSTANCE_UID),
        series_instance_uid: string_of(&obj, tags::SERIES_INSTANCE_UID),
        sop_instance_uid: string_of(&obj, tags::SOP_INSTANCE_UID),
    };
    for (name, v) in [
        ("StudyInstanceUID", &originals.study_instance_uid),
        ("SOPInstanceUID", &originals.sop_instance_uid),
    ] {
        if v.is_empty() {
            return Err(StageError::data(format!(
                "the object has no {name}; it cannot be tracked and is refused"
            )));
        }
    }
    let patient = string_of(&obj, tags::PATIENT_ID);
    let ctx = Ctx {
        policy,
        shift: policy.date_shift_days(&patient),
    };
    let mut meta = obj.meta().clone();
    let mut cleaned = clean_object(obj.into_inner(), &ctx);

    cleaned.put(DataElement::new(
        tags::PATIENT_IDENTITY_REMOVED,
        VR::CS,
        PrimitiveValue::from("YES"),
    ));
    cleaned.put(DataElement::new(
        tags::DEIDENTIFICATION_METHOD,
        VR::LO,
        PrimitiveValue::from("fracture: PS3.15 E Basic Profile; Retain Patient Characteristics; Retain Longitudinal Modified Dates"),
    ));
    cleaned.put(DataElement::new(
        tags::DEIDENTIFICATION_METHOD_CODE_SEQUENCE,
        VR::SQ,
        DataSetSequence::new(
            vec![
                code_item("113100", "Basic Application Confidentiality Profile"),
                code_item(
                    "113107",
                    "Retain Longitudinal Temporal Information Modified Dates Option",
                ),
                code_item("113108", "Retain Patient Characteristics Option"),
            ],
            Length::UNDEFINED,
        ),
    ));
    cleaned.put(DataElement::new(
        tags::LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED,
        VR::CS,
        PrimitiveValue::from("MODIFIED"),
    ));

    meta.media_storage_sop_instance_uid =
        policy.pseudonymise_uid(&meta.media_storage_sop_instance_uid);
    // Our own implementation identity, not the modality's: the modality's is a device fingerprint.
    meta.source_application_entity_title = None;
    meta.update_information_group_length();
    Ok((cleaned.with_exact_meta(meta), originals))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(byte: u8) -> DeidPolicy {
        DeidPolicy::new(vec![byte; 32], "SITE01", "2.25").unwrap()
    }

    #[test]
    fn uids_are_stable_keyed_and_valid() {
        let a = policy(1).pseudonymise_uid("1.2.3.4.5");
        assert_eq!(a, policy(1).pseudonymise_uid("1.2.3.4.5\0"));
        assert_ne!(a, policy(2).pseudonymise_uid("1.2.3.4.5"));
        assert_ne!(a, policy(1).pseudonymise_uid("1.2.3.4.6"));
        assert!(a.starts_with("2.25.") && a.len() <= 64, "{a}");
        assert!(
            a.split('.')
                .all(|c| !c.is_empty() && (c == "0" || !c.starts_with('0'))),
            "{a}"
        );
        let custom = DeidPolicy::new(vec![1; 32], "S", "1.2.826.0.1.3680043.10.99").unwrap();
        assert!(custom.pseudonymise_uid("1.2.3").len() <= 64);
    }

    #[test]
    fn short_keys_and_bad_roots_are_refused() {
        assert!(DeidPolicy::new(vec![0; 16], "S", "2.25")
            .unwrap_err()
            .to_string()
            .contains("at least 32"));
        assert!(DeidPolicy::new(vec![0; 32], "S", "2.x").is_err());
    }

    #[test]
    fn dates_shift_and_keep_intervals() {
        assert_eq!(shift_date("20200301", -1).as_deref(), Some("20200229"));
        assert_eq!(shift_date("20210101", -366).as_deref(), Some("20200101"));
        assert_eq!(
            shift_date("20200301120000.5", -1).as_deref(),
            Some("20200229120000.5")
        );
        assert_eq!(shift_date("garbage", -1), None);
        let p = policy(3);
        let s = p.date_shift_days("PAT-1");
        assert!((-3650..=-1).contains(&s));
        assert_eq!(s, p.date_shift_days("PAT-1"));
    }
}
