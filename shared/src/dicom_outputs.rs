//! The identity of the pipeline's DICOM results (the SR and the Secondary Capture), on which the
//! stage that writes them and the export that predicts and re-identifies them must agree: their
//! deterministic UIDs and the date they carry.

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use sha2::{Digest, Sha256};

/// A `2.25` UID (PS3.5 B.2) from a name-based UUID (version 8, SHA-256) of `parts`: the same
/// parts always give the same UID, so a re-run or a retry writes the same instance and an
/// exporter can be idempotent by SOP Instance UID.
pub fn derived_uid(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        // A separator that cannot occur in a UID, so ("1.2", "3") and ("1", ".23") differ.
        h.update([0u8]);
    }
    let digest = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    b[6] = (b[6] & 0x0f) | 0x80; // version 8: custom (here SHA-256 name-based)
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 9562 variant
    format!("2.25.{}", u128::from_be_bytes(b))
}

/// The outputs' UIDs for one source radiograph and model version. The series UIDs depend on the
/// study, not the radiograph, so all of a study's results of one model form one series.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputUids {
    pub sr_series: String,
    pub sr_instance: String,
    pub sc_series: String,
    pub sc_instance: String,
}

impl OutputUids {
    pub fn new(study: &str, sop_instance: &str, model_version: &str) -> Self {
        Self {
            sr_series: derived_uid(&["fracture-sr-series", study, model_version]),
            sr_instance: derived_uid(&["fracture-sr", sop_instance, model_version]),
            sc_series: derived_uid(&["fracture-sc-series", study, model_version]),
            sc_instance: derived_uid(&["fracture-sc", sop_instance, model_version]),
        }
    }
}

/// The date and time results about a radiograph carry as their content date: the radiograph's
/// content date and time, else its series', else its study's; `None` when it has none of them.
/// (`get` reads one attribute, `None` when absent or empty.)
pub fn reference_date_time(get: impl Fn(Tag) -> Option<String>) -> Option<(String, String)> {
    [
        (tags::CONTENT_DATE, tags::CONTENT_TIME),
        (tags::SERIES_DATE, tags::SERIES_TIME),
        (tags::STUDY_DATE, tags::STUDY_TIME),
    ]
    .iter()
    .find_map(|&(d, t)| get(d).map(|d| (d, get(t).unwrap_or_default())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_uids_are_stable_valid_and_distinct() {
        let a = derived_uid(&["fracture-sr", "2.25.1", "demo-1"]);
        assert_eq!(a, derived_uid(&["fracture-sr", "2.25.1", "demo-1"]));
        assert_ne!(a, derived_uid(&["fracture-sr", "2.25.1", "demo-2"]));
        assert_ne!(
            derived_uid(&["x", "1.2", "3"]),
            derived_uid(&["x", "1", ".23"])
        );
        assert!(a.starts_with("2.25.") && a.len() <= 64, "{a}");
        let n = &a[5..];
        assert!(n.bytes().all(|b| b.is_ascii_digit()) && !n.starts_with('0'));
        let u = n.parse::<u128>().unwrap();
        assert_eq!((u >> 76) & 0xf, 8, "UUID version 8");
        assert_eq!((u >> 62) & 0b11, 0b10, "RFC variant");
        let ids = OutputUids::new("2.25.9", "2.25.1", "demo-1");
        assert_eq!(
            ids.sr_series,
            OutputUids::new("2.25.9", "2.25.2", "demo-1").sr_series
        );
        assert_ne!(ids.sr_instance, ids.sc_instance);
        assert_ne!(ids.sr_series, ids.sc_series);
    }

    #[test]
    fn the_reference_date_is_the_content_then_series_then_study_date() {
        let attrs = |have: &'static [(Tag, &'static str)]| {
            move |tag: Tag| {
                have.iter()
                    .find(|(t, _)| *t == tag)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            reference_date_time(attrs(&[
                (tags::STUDY_DATE, "20200101"),
                (tags::STUDY_TIME, "0800"),
                (tags::SERIES_DATE, "20200102"),
            ])),
            Some(("20200102".into(), String::new()))
        );
        assert_eq!(
            reference_date_time(attrs(&[
                (tags::CONTENT_DATE, "20200103"),
                (tags::CONTENT_TIME, "101010"),
                (tags::STUDY_DATE, "20200101"),
            ])),
            Some(("20200103".into(), "101010".into()))
        );
        assert_eq!(reference_date_time(attrs(&[])), None);
    }
}
