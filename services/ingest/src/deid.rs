//! De-identification: the PHI boundary. A pure function from a DICOM object and a policy to a
//! de-identified object.
//!
//! The PS3.15 Annex E Basic Application Level Confidentiality Profile: every attribute of
//! Table E.1-1 (the data in [`table`]) gets its Basic Profile action, applied recursively into
//! sequences, with the combined actions (X/Z, X/D, X/Z/D, Z/D, X/Z/U*) resolved by the attribute's
//! Type in the CR and DX IODs. Options in effect, and written into the method code sequence:
//! Retain Longitudinal Temporal Information with Modified Dates (every date and date-time shifted
//! by one per-patient offset, times kept) and Retain Patient Characteristics (age, sex, size,
//! weight, ... kept). Beyond the table: every private tag removed, curves and overlays removed,
//! every person name (PN) the table does not mention removed, every non-standard instance UID
//! replaced by a keyed hash, the institution replaced by the site code, and the file meta
//! rewritten to name this application.

use dicom_core::header::Header;
use dicom_core::value::{DataSetSequence, PrimitiveValue, Value};
use dicom_core::{DataElement, Length, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::mem::InMemElement;
use dicom_object::{DefaultDicomObject, InMemDicomObject};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use fracture_edge::Originals;
use fracture_shared::error::StageError;

pub mod passthrough;
pub mod table;

pub use table::{Basic, Row, TABLE};

type HmacSha256 = Hmac<Sha256>;

/// The deployment's de-identification policy.
#[derive(Clone)]
pub struct DeidPolicy {
    key: Vec<u8>,
    /// Replaces InstitutionName; a pseudonymous code, never the hospital's name.
    pub site_code: String,
    /// Root for generated UIDs; `2.25` renders the hash as a UUID-derived integer.
    pub uid_root: String,
    /// Per-device burned-in text rules (see `burned_in`).
    pub pixel_rules: Vec<crate::burned_in::PixelRule>,
    /// Where refused inputs are kept at the edge, under pseudonymous names; `None`: not kept.
    pub quarantine: Option<std::path::PathBuf>,
    /// The region rules, applied here at the edge while the descriptions are still there.
    pub regions: fracture_shared::region::Regions,
    /// Largest image accepted at the door (`[ingest] max_pixels`).
    pub max_pixels: u64,
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

impl From<String> for PolicyError {
    fn from(message: String) -> Self {
        Self(message)
    }
}

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
            pixel_rules: Vec::new(),
            quarantine: None,
            regions: fracture_shared::region::Regions::builtin(),
            max_pixels: crate::DEFAULT_MAX_PIXELS,
        })
    }

    fn mac(&self, domain: &str, value: &str) -> [u8; 32] {
        let mut m = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        m.update(domain.as_bytes());
        m.update(&[0]);
        m.update(value.as_bytes());
        m.finalize().into_bytes().into()
    }

    /// An input's pseudonymous reference (`in-…`), by its path: what dead letters and the bus
    /// carry instead of the path, which may hold a patient's name.
    pub fn input_ref(&self, path: &std::path::Path) -> String {
        format!(
            "in-{}",
            self.pseudonym("input", &path.display().to_string())
        )
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

/// What happens to one attribute, after Table E.1-1, the options and the CR/DX types resolve.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash, PartialOrd, Ord)]
pub enum Action {
    /// X: removed.
    Remove,
    /// Z: kept with an empty value (an empty sequence for SQ).
    Empty,
    /// D: a dummy consistent with the VR (keyed, so the same input gives the same dummy).
    Dummy,
    /// K: kept; a sequence is kept and every item cleaned by the same rules.
    Keep,
    /// U: every UID replaced by its keyed hash.
    Uid,
    /// X/Z/U*: the sequence kept, each item cleaned, so the UIDs inside are replaced.
    CleanSequence,
    /// Retain Longitudinal Temporal Information with Modified Dates: dates and date-times
    /// shifted by the patient's offset, times of day kept.
    ShiftDate,
    /// D for Patient's Name and Patient ID: the keyed patient pseudonym.
    Pseudonym,
    /// D for Institution Name: the deployment's site code.
    Site,
}

/// Combined actions resolved for the CR and DX IODs, where the Type of the attribute decides.
/// Everything not here resolves the Type 3 way (X), because the CR/DX IODs make none of the
/// other combined-action attributes Type 1 or 2.
#[allow(deprecated)]
const CR_DX_RESOLUTION: &[(Tag, Action, &str)] = &[
    (
        tags::PATIENT_NAME,
        Action::Pseudonym,
        "Z, Type 2: a keyed pseudonym (a D) so one patient's images stay together downstream",
    ),
    (
        tags::PATIENT_ID,
        Action::Pseudonym,
        "Z/D, Type 2: the keyed pseudonym, as for the name",
    ),
    (
        tags::PATIENT_BIRTH_DATE,
        Action::Empty,
        "Z, Type 2: a birth date is not longitudinal information (age is kept instead)",
    ),
    (
        tags::PATIENT_BIRTH_TIME,
        Action::Remove,
        "X: not kept as a time of day either",
    ),
    (
        tags::INSTITUTION_NAME,
        Action::Site,
        "X/Z/D: the design keeps a pseudonymous site code (a D)",
    ),
    (
        tags::ACQUISITION_CONTEXT_SEQUENCE,
        Action::Empty,
        "X/Z: Type 2 in the DX Acquisition Context module",
    ),
    (
        tags::SOURCE_IMAGE_SEQUENCE,
        Action::CleanSequence,
        "X/Z/U*: Type 1C for derived CR/DX images; the UIDs inside are replaced",
    ),
    (
        tags::REFERENCED_IMAGE_SEQUENCE,
        Action::CleanSequence,
        "X/Z/U*: links For Processing and For Presentation images; the UIDs inside are replaced",
    ),
];

/// Attributes that are not in Table E.1-1 but identify the patient: removed anyway.
const BEYOND_TABLE: &[(Tag, &str)] = &[
    (
        Tag(0x0010, 0x0033),
        "Patient's Birth Date in Alternative Calendar",
    ),
    (
        Tag(0x0010, 0x0034),
        "Patient's Death Date in Alternative Calendar",
    ),
    (Tag(0x0010, 0x0035), "Patient's Alternative Calendar"),
    (
        Tag(0x0010, 0x0024),
        "Issuer of Patient ID Qualifiers Sequence",
    ),
    (Tag(0x0008, 0x0051), "Issuer of Accession Number Sequence"),
    (
        Tag(0x0010, 0x2294),
        "Breed Registration Sequence (an animal patient's registry ID)",
    ),
    (
        Tag(0x0032, 0x1031),
        "Requesting Physician Identification Sequence",
    ),
    (Tag(0x0032, 0x1034), "Requesting Service Code Sequence"),
    (Tag(0x0040, 0x4009), "Human Performer Code Sequence"),
    (
        Tag(0x0008, 0x103F),
        "Series Description Code Sequence (free-text code meanings)",
    ),
    // Someone else's encrypted copy of the original identifiers: PHI for whoever holds that key.
    (Tag(0x0400, 0x0500), "Encrypted Attributes Sequence"),
];

/// UI attributes whose values name a class, a transfer syntax or a coding scheme, never an
/// instance or a person: hashing them would only make the object unreadable.
#[allow(deprecated)]
const DEFINITION_UIDS: &[Tag] = &[
    tags::SOP_CLASS_UID,
    tags::REFERENCED_SOP_CLASS_UID,
    tags::REFERENCED_SOP_CLASS_UID_IN_FILE,
    tags::REFERENCED_TRANSFER_SYNTAX_UID_IN_FILE,
    tags::RELATED_GENERAL_SOP_CLASS_UID,
    tags::ORIGINAL_SPECIALIZED_SOP_CLASS_UID,
    tags::SOP_CLASSES_IN_STUDY,
    tags::CODING_SCHEME_UID,
    tags::CONTEXT_UID,
    tags::MAPPING_RESOURCE_UID,
    tags::TRANSFER_SYNTAX_UID,
];

/// The action for an attribute with this tag and VR, wherever it sits (top level or nested).
pub fn action_for(tag: Tag, vr: VR) -> Action {
    if let Some((_, a, _)) = CR_DX_RESOLUTION.iter().find(|(t, _, _)| *t == tag) {
        return *a;
    }
    if BEYOND_TABLE.iter().any(|(t, _)| *t == tag) {
        return Action::Remove;
    }
    if let Some(column) = table::patient_characteristic(tag) {
        // C asks for a clean of free text (allergies, state, ...): we have none, so X stays.
        return if column == Basic::K {
            Action::Keep
        } else {
            Action::Remove
        };
    }
    match table::lookup(tag) {
        Some(row) => {
            // The Modified Dates option has C for every date and time row: shift, keep times.
            if matches!(vr, VR::DA | VR::DT | VR::TM) {
                return Action::ShiftDate;
            }
            match row.basic {
                Basic::D => Action::Dummy,
                Basic::Z | Basic::ZD => Action::Empty,
                Basic::K => Action::Keep,
                Basic::U => Action::Uid,
                Basic::X | Basic::C | Basic::XZ | Basic::XD | Basic::XZD | Basic::XZU => {
                    Action::Remove
                }
            }
        }
        None => match vr {
            // A person's name anywhere the table does not mention (nested physicians, ...).
            VR::PN => Action::Remove,
            // A standard attribute sent as UN cannot be told apart from a name or a date.
            VR::UN => Action::Remove,
            VR::UI if DEFINITION_UIDS.contains(&tag) => Action::Keep,
            VR::UI => Action::Uid,
            VR::DA | VR::DT | VR::TM => Action::ShiftDate,
            _ => Action::Keep,
        },
    }
}

/// One line of the profile as applied: a Table E.1-1 row and what we do with it.
#[derive(Debug, Clone)]
pub struct ProfileLine {
    pub tag: Tag,
    pub name: &'static str,
    pub basic: Basic,
    pub action: Action,
}

/// Every Table E.1-1 row with the action it resolves to (the VR taken from the dictionary).
pub fn profile() -> Vec<ProfileLine> {
    use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry, VirtualVr};
    let dict = dicom_dictionary_std::StandardDataDictionary;
    TABLE
        .iter()
        .map(|row| {
            let vr = match dict.by_tag(row.tag).map(|e| e.vr()) {
                Some(VirtualVr::Exact(vr)) => vr,
                _ => VR::UN,
            };
            ProfileLine {
                tag: row.tag,
                name: row.name,
                basic: row.basic,
                action: action_for(row.tag, vr),
            }
        })
        .collect()
}

impl Action {
    /// What the action does, in a sentence fragment for the profile listing.
    pub fn describe(self) -> &'static str {
        match self {
            Action::Remove => "removed",
            Action::Empty => "kept empty",
            Action::Dummy => "replaced by a keyed dummy of the same VR",
            Action::Keep => "kept (Retain Patient Characteristics)",
            Action::Uid => "UIDs replaced by their keyed hash",
            Action::CleanSequence => "sequence kept, each item cleaned (UIDs replaced)",
            Action::ShiftDate => "dates shifted by the patient's offset (times kept)",
            Action::Pseudonym => "the keyed patient pseudonym",
            Action::Site => "the configured site code",
        }
    }
}

/// The profile as applied, as a Markdown table (`fracture deid --profile`): every Table E.1-1
/// row with its Basic Profile action and what we do, then the pattern rows and the attributes
/// removed beyond the table.
pub fn profile_markdown() -> String {
    use std::fmt::Write;
    let mut out =
        String::from("| tag | attribute | Basic Prof. | fracture |\n| --- | --- | --- | --- |\n");
    for line in profile() {
        let _ = writeln!(
            out,
            "| ({:04X},{:04X}) | {} | {} | {} |",
            line.tag.0,
            line.tag.1,
            line.name,
            line.basic.code(),
            line.action.describe()
        );
    }
    for (pattern, name, basic) in table::GROUP_ROWS {
        let _ = writeln!(out, "| {pattern} | {name} | {} | removed |", basic.code());
    }
    for (tag, name) in BEYOND_TABLE {
        let _ = writeln!(
            out,
            "| ({:04X},{:04X}) | {name} | (not in the table) | removed |",
            tag.0, tag.1
        );
    }
    out
}

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
    // What follows the date must be a DT time and offset; anything else (a range such as
    // 20200101-20200201, free text) could carry a second, unshifted date.
    if !is_time_suffix(&v[8..]) {
        return None;
    }
    let (y, m, d) = civil_from_days(days_from_civil(y, m, d) + days);
    Some(format!("{y:04}{m:02}{d:02}{}", &v[8..]))
}

/// `HHMMSS.FFFFFF&ZZXX`, each part optional from the right, as DT allows after the date.
fn is_time_suffix(rest: &str) -> bool {
    let (main, offset) = match rest.find(['+', '-']) {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let (time, fraction) = match main.split_once('.') {
        Some((t, f)) => (t, Some(f)),
        None => (main, None),
    };
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    digits(time)
        && time.len() <= 6
        && time.len() % 2 == 0
        && fraction.is_none_or(|f| time.len() == 6 && (1..=6).contains(&f.len()) && digits(f))
        && offset.is_none_or(|o| o.len() == 4 && digits(o))
}

struct Ctx<'a> {
    policy: &'a DeidPolicy,
    shift: i64,
    /// The patient is an animal (the species is given): some X rows are Type 2C then.
    animal: bool,
}

/// Type 2C in the Patient module when the patient is an animal: X there would break the IOD,
/// so they are emptied (Z) instead, which still removes the owner's identity.
#[allow(deprecated)]
const ANIMAL_TYPE_2C: &[Tag] = &[
    tags::RESPONSIBLE_PERSON,
    tags::RESPONSIBLE_ORGANIZATION,
    tags::BREED_REGISTRATION_SEQUENCE,
];

fn clean_object(obj: InMemDicomObject, ctx: &Ctx) -> InMemDicomObject {
    InMemDicomObject::from_element_iter(obj.into_iter().filter_map(|e| clean_element(e, ctx)))
}

fn clean_element(e: InMemElement, ctx: &Ctx) -> Option<InMemElement> {
    let tag = e.tag();
    let vr = e.vr();
    // Private attributes (odd groups, their creators included) can hold anything: the table's
    // (gggg,eeee) row.
    if tag.group() % 2 == 1 {
        return None;
    }
    // Group lengths would be stale after removals; writers recompute the ones still required.
    if tag.element() == 0x0000 {
        return None;
    }
    // Curve Data (50xx,xxxx) and overlays (60xx): the table's rows remove the data and the
    // comments; the rest of an overlay group describes nothing once its data is gone.
    if matches!(tag.group() & 0xFF00, 0x5000 | 0x6000) {
        return None;
    }
    let mut action = action_for(tag, vr);
    if ctx.animal && action == Action::Remove && ANIMAL_TYPE_2C.contains(&tag) {
        action = Action::Empty;
    }
    match action {
        Action::Remove => None,
        Action::Empty => Some(if vr == VR::SQ {
            DataElement::new(
                tag,
                VR::SQ,
                DataSetSequence::new(Vec::<InMemDicomObject>::new(), Length::UNDEFINED),
            )
        } else {
            DataElement::empty(tag, vr)
        }),
        Action::Keep | Action::CleanSequence if vr == VR::SQ => clean_sequence(e, ctx),
        // A U* row that is not a sequence here: nothing to keep it for.
        Action::CleanSequence => None,
        Action::Keep => Some(e),
        Action::Uid => replace_uids(&e, ctx),
        Action::ShiftDate => shift_element(e, ctx),
        Action::Dummy => dummy(&e, ctx),
        Action::Pseudonym => {
            let original = text_of(&e);
            let key = ctx.policy.pseudonym("patient", original.trim())[..12].to_uppercase();
            // A person name has components: the pseudonym is the family name "ANON" and the
            // key as the given name (`ANON^…`), the ID the same key without the separator.
            let p = if vr == VR::PN {
                format!("ANON^{key}")
            } else {
                format!("ANON{key}")
            };
            Some(DataElement::new(tag, vr, PrimitiveValue::from(p.as_str())))
        }
        Action::Site => Some(DataElement::new(
            tag,
            vr,
            PrimitiveValue::from(ctx.policy.site_code.as_str()),
        )),
    }
}

fn text_of(e: &InMemElement) -> String {
    e.to_str().map(|s| s.into_owned()).unwrap_or_default()
}

fn clean_sequence(e: InMemElement, ctx: &Ctx) -> Option<InMemElement> {
    let tag = e.tag();
    let items = match e.into_value() {
        Value::Sequence(seq) => seq.into_items(),
        _ => return None,
    };
    let cleaned: Vec<InMemDicomObject> = items.into_iter().map(|i| clean_object(i, ctx)).collect();
    Some(DataElement::new(
        tag,
        VR::SQ,
        DataSetSequence::new(cleaned, Length::UNDEFINED),
    ))
}

fn replace_uids(e: &InMemElement, ctx: &Ctx) -> Option<InMemElement> {
    if e.vr() != VR::UI {
        // A U row with a value we cannot read as UIDs: it might be one, so it goes.
        return None;
    }
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
        e.tag(),
        VR::UI,
        PrimitiveValue::Strs(mapped.into()),
    ))
}

fn shift_element(e: InMemElement, ctx: &Ctx) -> Option<InMemElement> {
    let (tag, vr) = (e.tag(), e.vr());
    match vr {
        // Times of day identify no one once the dates have moved.
        VR::TM => Some(e),
        VR::DA | VR::DT => {
            let values: Vec<String> = match e.value() {
                Value::Primitive(p) => p.to_multi_str().to_vec(),
                _ => return None,
            };
            if values.iter().all(|v| v.trim().is_empty()) {
                return Some(e);
            }
            // A date we cannot read is removed rather than let through unshifted.
            let shifted: Option<Vec<String>> =
                values.iter().map(|v| shift_date(v, ctx.shift)).collect();
            shifted.map(|s| DataElement::new(tag, vr, PrimitiveValue::Strs(s.into())))
        }
        _ => None,
    }
}

/// D: a value of the same VR that says nothing, keyed on the original so that equal inputs stay
/// equal (two images verified by one observer still agree).
fn dummy(e: &InMemElement, ctx: &Ctx) -> Option<InMemElement> {
    let (tag, vr) = (e.tag(), e.vr());
    let key = |len: usize| {
        let h = ctx
            .policy
            .pseudonym(&format!("dummy:{:04X}{:04X}", tag.0, tag.1), &text_of(e))
            .to_uppercase();
        h[..len.min(h.len())].to_string()
    };
    let value = match vr {
        VR::UI => return replace_uids(e, ctx),
        VR::DA | VR::DT | VR::TM => return shift_element(e.clone(), ctx),
        VR::PN => format!("ANON^{}", key(12)),
        VR::AE | VR::CS | VR::SH => key(16),
        VR::LO | VR::LT | VR::ST | VR::UT | VR::UC => format!("ANON{}", key(12)),
        VR::IS | VR::DS => "0".to_string(),
        VR::AS => "000D".to_string(),
        // Sequences (Content, Graphic Annotation, Verifying Observer, ...) and binary values have
        // no meaningful dummy, and none of them is Type 1 or 2 in the CR/DX IODs: removed.
        _ => return None,
    };
    Some(DataElement::new(
        tag,
        vr,
        PrimitiveValue::from(value.as_str()),
    ))
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

/// De-identification Method (0012,0063) is LO: 64 characters at most (dciodvfy checks).
const METHOD_TEXT: &str = "fracture PS3.15 E.1 Basic; Rtn Pat Chars; Rtn Long Modif Dates";
const _: () = assert!(METHOD_TEXT.len() <= 64);

fn string_of(obj: &InMemDicomObject, tag: Tag) -> String {
    fracture_shared::dicom::text(obj, tag).unwrap_or_default()
}

/// De-identifies `obj` under `policy`, returning the new object and the original identifiers (for the linkage table).
pub fn deidentify(
    obj: DefaultDicomObject,
    policy: &DeidPolicy,
) -> Result<(DefaultDicomObject, Originals), StageError> {
    let originals = Originals::capture(&obj);
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
    #[allow(deprecated)]
    let animal = [
        tags::PATIENT_SPECIES_DESCRIPTION,
        tags::PATIENT_SPECIES_CODE_SEQUENCE,
    ]
    .into_iter()
    .any(|t| obj.element(t).is_ok());
    let ctx = Ctx {
        policy,
        shift: policy.date_shift_days(&patient),
        animal,
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
        PrimitiveValue::from(METHOD_TEXT),
    ));
    // 113101 (Clean Pixel Data Option) joins these once the burned-in text rules black out
    // pixels and tell us so (a `pixels_cleaned` flag); until then it is not claimed.
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
    // E.1.1 (7): the file meta describes the de-identifying application, not the modality: the
    // modality's implementation and AE titles are a device fingerprint.
    meta.implementation_class_uid = dicom_object::IMPLEMENTATION_CLASS_UID.to_string();
    meta.implementation_version_name = Some("FRACTURE_DEID".to_string());
    meta.source_application_entity_title = None;
    meta.sending_application_entity_title = None;
    meta.receiving_application_entity_title = None;
    meta.private_information_creator_uid = None;
    meta.private_information = None;
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
    fn the_table_is_sorted_unique_and_whole() {
        for pair in TABLE.windows(2) {
            assert!(
                pair[0].tag < pair[1].tag,
                "{} / {}",
                pair[0].name,
                pair[1].name
            );
        }
        // Table E.1-1 of the 2026c edition: 652 single-tag rows plus 4 pattern rows.
        assert_eq!(TABLE.len(), 652);
        assert_eq!(table::GROUP_ROWS.len(), 4);
        assert!(TABLE.iter().all(|r| !r.name.is_empty()));
        for row in TABLE {
            assert_eq!(table::lookup(row.tag).map(|r| r.name), Some(row.name));
        }
        assert!(table::lookup(Tag(0x0008, 0x0016)).is_none());
    }

    #[test]
    fn the_patient_name_pseudonym_is_a_person_name() {
        let obj = InMemDicomObject::from_element_iter([
            DataElement::new(tags::PATIENT_NAME, VR::PN, PrimitiveValue::from("Doe^Jane")),
            DataElement::new(tags::PATIENT_ID, VR::LO, PrimitiveValue::from("MRN123")),
        ]);
        let p = policy(1);
        let ctx = Ctx {
            policy: &p,
            shift: 0,
            animal: false,
        };
        let clean = clean_object(obj, &ctx);
        let name = clean.element(tags::PATIENT_NAME).unwrap().to_str().unwrap();
        let id = clean.element(tags::PATIENT_ID).unwrap().to_str().unwrap();
        let (family, given) = name.split_once('^').expect("family^given");
        assert_eq!(family, "ANON");
        assert_eq!(given.len(), 12);
        assert!(
            id.starts_with("ANON") && !id.contains('^') && !id.contains("MRN"),
            "{id}"
        );
    }

    #[test]
    fn the_committed_profile_listing_is_current() {
        let committed = include_str!("../PROFILE.md");
        assert!(
            committed.ends_with(&profile_markdown()),
            "services/ingest/PROFILE.md is stale: regenerate its table with `fracture deid --profile`"
        );
    }

    #[test]
    fn the_profile_listing_has_every_row() {
        let md = profile_markdown();
        let rows = md
            .lines()
            .filter(|l| l.starts_with("| (") || l.starts_with("| (g"))
            .count();
        assert_eq!(
            rows,
            TABLE.len() + table::GROUP_ROWS.len() + BEYOND_TABLE.len()
        );
        assert!(md.contains("| (0010,0010) | Patient's Name | Z | the keyed patient pseudonym |"));
        assert!(
            md.contains("| (0008,0080) | Institution Name | X/Z/D | the configured site code |")
        );
    }

    #[test]
    fn every_row_resolves_to_an_action_that_honours_the_table() {
        let mut counts = std::collections::BTreeMap::new();
        for line in profile() {
            *counts.entry((line.basic.code(), line.action)).or_insert(0) += 1;
            let retained = table::patient_characteristic(line.tag) == Some(Basic::K);
            match line.action {
                // Keeping is only for the patient characteristics the option retains.
                Action::Keep => assert!(retained, "{} kept", line.name),
                // Replacing a UID needs a U (or a D of a UID) in the table.
                Action::Uid => assert!(matches!(line.basic, Basic::U), "{}", line.name),
                _ => {}
            }
        }
        // The resolution, for the record (cargo test -- --nocapture prints it).
        for ((code, action), n) in &counts {
            eprintln!("{code:>7} -> {action:?}: {n}");
        }
        assert_eq!(counts.values().sum::<usize>(), TABLE.len());
    }

    #[test]
    #[allow(deprecated)]
    fn actions_for_the_attributes_radiographs_carry() {
        use Action::*;
        for (tag, vr, want) in [
            (tags::PATIENT_NAME, VR::PN, Pseudonym),
            (tags::PATIENT_ID, VR::LO, Pseudonym),
            (tags::PATIENT_BIRTH_DATE, VR::DA, Empty),
            (tags::PATIENT_BIRTH_TIME, VR::TM, Remove),
            (tags::PATIENT_AGE, VR::AS, Keep),
            (tags::PATIENT_SEX, VR::CS, Keep),
            (tags::ALLERGIES, VR::LO, Remove),
            (tags::STUDY_DATE, VR::DA, ShiftDate),
            (tags::PERFORMED_PROCEDURE_STEP_START_DATE, VR::DA, ShiftDate),
            (tags::STUDY_TIME, VR::TM, ShiftDate),
            (tags::ACCESSION_NUMBER, VR::SH, Empty),
            (tags::REFERRING_PHYSICIAN_NAME, VR::PN, Empty),
            (tags::PERFORMING_PHYSICIAN_NAME, VR::PN, Remove),
            (tags::INSTITUTION_NAME, VR::LO, Site),
            (tags::STATION_NAME, VR::SH, Remove),
            (tags::DEVICE_SERIAL_NUMBER, VR::LO, Remove),
            (tags::ACQUISITION_CONTEXT_SEQUENCE, VR::SQ, Empty),
            (tags::REFERENCED_STUDY_SEQUENCE, VR::SQ, Remove),
            (tags::SOURCE_IMAGE_SEQUENCE, VR::SQ, CleanSequence),
            (tags::REFERENCED_IMAGE_SEQUENCE, VR::SQ, CleanSequence),
            (tags::REQUEST_ATTRIBUTES_SEQUENCE, VR::SQ, Remove),
            (tags::SOP_INSTANCE_UID, VR::UI, Uid),
            (tags::SOP_CLASS_UID, VR::UI, Keep),
            (tags::CODING_SCHEME_UID, VR::UI, Keep),
            (tags::PERSON_NAME, VR::PN, Dummy),
            (tags::CONTENT_SEQUENCE, VR::SQ, Dummy),
            (
                tags::PATIENT_BIRTH_DATE_IN_ALTERNATIVE_CALENDAR,
                VR::LO,
                Remove,
            ),
            (tags::SCHEDULED_PERFORMING_PHYSICIAN_NAME, VR::PN, Remove),
            // Not in the table: a name goes, a date moves, an unreadable UN goes.
            (tags::VERIFYING_OBSERVER_NAME, VR::PN, Dummy),
            (Tag(0x0018, 0x9004), VR::PN, Remove),
            (tags::CALIBRATION_DATE, VR::DA, ShiftDate),
            (tags::BODY_PART_EXAMINED, VR::UN, Remove),
            (tags::BODY_PART_EXAMINED, VR::CS, Keep),
        ] {
            assert_eq!(action_for(tag, vr), want, "({:04X},{:04X})", tag.0, tag.1);
        }
    }

    fn file(elements: Vec<InMemElement>) -> DefaultDicomObject {
        InMemDicomObject::from_element_iter(elements)
            .with_meta(
                dicom_object::meta::FileMetaTableBuilder::new()
                    .transfer_syntax("1.2.840.10008.1.2.1")
                    .media_storage_sop_class_uid("1.2.840.10008.5.1.4.1.1.1")
                    .media_storage_sop_instance_uid("1.2.3.4.5"),
            )
            .unwrap()
    }

    fn el(tag: Tag, vr: VR, v: &str) -> InMemElement {
        DataElement::new(tag, vr, PrimitiveValue::from(v))
    }

    fn seq(tag: Tag, items: Vec<Vec<InMemElement>>) -> InMemElement {
        DataElement::new(
            tag,
            VR::SQ,
            DataSetSequence::new(
                items
                    .into_iter()
                    .map(InMemDicomObject::from_element_iter)
                    .collect::<Vec<_>>(),
                Length::UNDEFINED,
            ),
        )
    }

    #[test]
    #[allow(deprecated)]
    fn nested_values_animals_and_unknowns() {
        let base = || {
            vec![
                el(tags::SOP_INSTANCE_UID, VR::UI, "1.2.3.4.5"),
                el(tags::STUDY_INSTANCE_UID, VR::UI, "1.2.3.4"),
                el(tags::PATIENT_ID, VR::LO, "P1"),
                el(tags::RESPONSIBLE_PERSON, VR::PN, "Owner^Olga"),
                el(Tag(0x0018, 0x0015), VR::UN, "ANKLE"),
                seq(
                    tags::ANATOMIC_REGION_SEQUENCE,
                    vec![vec![
                        el(tags::CODE_VALUE, VR::SH, "T-15750"),
                        el(tags::PERSON_NAME, VR::PN, "Nested^Nell"),
                        el(tags::OPERATORS_NAME, VR::PN, "Nested^Ned"),
                        el(Tag(0x0011, 0x1001), VR::LO, "private"),
                        el(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, "1.2.3.9"),
                    ]],
                ),
            ]
        };
        let p = policy(4);
        let (human, _) = deidentify(file(base()), &p).unwrap();
        assert!(human.element(tags::RESPONSIBLE_PERSON).is_err());
        assert!(human.element(Tag(0x0018, 0x0015)).is_err());
        let item = &human
            .element(tags::ANATOMIC_REGION_SEQUENCE)
            .unwrap()
            .items()
            .unwrap()[0];
        assert_eq!(string_of(item, tags::CODE_VALUE), "T-15750");
        let dummy = string_of(item, tags::PERSON_NAME);
        assert!(
            dummy.starts_with("ANON^") && !dummy.contains("Nell"),
            "{dummy}"
        );
        assert!(item.element(tags::OPERATORS_NAME).is_err());
        assert!(item.element(Tag(0x0011, 0x1001)).is_err());
        assert_eq!(
            string_of(item, tags::REFERENCED_SOP_INSTANCE_UID),
            p.pseudonymise_uid("1.2.3.9")
        );

        let mut animal = base();
        animal.push(el(tags::PATIENT_SPECIES_DESCRIPTION, VR::LO, "Feline"));
        let (animal, _) = deidentify(file(animal), &p).unwrap();
        // Type 2C for animals: kept, empty.
        assert_eq!(string_of(&animal, tags::RESPONSIBLE_PERSON), "");
        assert!(animal.element(tags::RESPONSIBLE_PERSON).is_ok());
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
        assert_eq!(
            shift_date("20200301120000.5+0100", -1).as_deref(),
            Some("20200229120000.5+0100")
        );
        assert_eq!(shift_date("2020030112", -1).as_deref(), Some("2020022912"));
        // A range or trailing text could hide a second date: refused, so the caller removes it.
        assert_eq!(shift_date("20200101-20200201", -1), None);
        assert_eq!(shift_date("20200101 born 19470315", -1), None);
        assert_eq!(shift_date("2020010112345", -1), None);
        let p = policy(3);
        let s = p.date_shift_days("PAT-1");
        assert!((-3650..=-1).contains(&s));
        assert_eq!(s, p.date_shift_days("PAT-1"));
    }
}
