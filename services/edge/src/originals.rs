//! The original identifiers of a radiograph, as de-identification reads them, the linkage table
//! stores them and re-identification writes them back: one table, so the three agree.

use dicom_core::{Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

/// Declares [`Originals`] and its attribute list from one table, so the de-identification that
/// reads them, the linkage table that stores them and the exporter that writes them back agree.
macro_rules! originals {
    ($($(#[$doc:meta])* $field:ident: $tag:ident, $vr:ident;)*) => {
        /// The identifiers of the original object, for the linkage table at the edge: its UIDs,
        /// and what a PACS needs to file a result under the original patient and study. Empty
        /// strings for attributes the object did not have.
        #[derive(Debug, Clone, Default, PartialEq, Eq)]
        pub struct Originals {
            $($(#[$doc])* pub $field: String,)*
        }

        impl Originals {
            /// Every attribute: its field (and linkage column) name, tag and VR.
            pub const ATTRIBUTES: &'static [(&'static str, Tag, VR)] =
                &[$((stringify!($field), tags::$tag, VR::$vr),)*];

            /// The value of the attribute named `field` (see [`Originals::ATTRIBUTES`]).
            pub fn get(&self, field: &str) -> Option<&str> {
                match field {
                    $(stringify!($field) => Some(&self.$field),)*
                    _ => None,
                }
            }

            /// The value of the attribute named `field`, to set.
            pub fn get_mut(&mut self, field: &str) -> Option<&mut String> {
                match field {
                    $(stringify!($field) => Some(&mut self.$field),)*
                    _ => None,
                }
            }
        }
    };
}

originals! {
    study_instance_uid: STUDY_INSTANCE_UID, UI;
    series_instance_uid: SERIES_INSTANCE_UID, UI;
    sop_instance_uid: SOP_INSTANCE_UID, UI;
    sop_class_uid: SOP_CLASS_UID, UI;
    patient_id: PATIENT_ID, LO;
    issuer_of_patient_id: ISSUER_OF_PATIENT_ID, LO;
    patient_name: PATIENT_NAME, PN;
    patient_birth_date: PATIENT_BIRTH_DATE, DA;
    patient_sex: PATIENT_SEX, CS;
    accession_number: ACCESSION_NUMBER, SH;
    study_id: STUDY_ID, SH;
    study_date: STUDY_DATE, DA;
    study_time: STUDY_TIME, TM;
    study_description: STUDY_DESCRIPTION, LO;
    referring_physician_name: REFERRING_PHYSICIAN_NAME, PN;
    /// Series and content date and time: the radiograph's own date, which results about it
    /// carry as their content date.
    series_date: SERIES_DATE, DA;
    series_time: SERIES_TIME, TM;
    content_date: CONTENT_DATE, DA;
    content_time: CONTENT_TIME, TM;
}

impl Originals {
    /// Reads every attribute of [`Originals::ATTRIBUTES`] from `obj` (top level), trimmed of its
    /// padding; empty when absent.
    pub fn capture(obj: &InMemDicomObject) -> Self {
        let mut originals = Self::default();
        for &(field, tag, _) in Self::ATTRIBUTES {
            if let Some(v) = originals.get_mut(field) {
                *v = string_of(obj, tag);
            }
        }
        originals
    }
}

fn string_of(obj: &InMemDicomObject, tag: Tag) -> String {
    fracture_shared::dicom::text(obj, tag).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::{DataElement, PrimitiveValue};

    #[test]
    fn the_originals_are_read_trimmed_and_missing_ones_are_empty() {
        let obj = InMemDicomObject::from_element_iter([
            DataElement::new(
                tags::STUDY_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from("1.2.3\0"),
            ),
            DataElement::new(
                tags::PATIENT_NAME,
                VR::PN,
                PrimitiveValue::from("Doe^Jane "),
            ),
        ]);
        let o = Originals::capture(&obj);
        assert_eq!(o.study_instance_uid, "1.2.3");
        assert_eq!(o.patient_name, "Doe^Jane");
        assert_eq!(o.accession_number, "");
        assert_eq!(o.get("patient_name"), Some("Doe^Jane"));
        assert_eq!(o.get("no_such_field"), None);
        assert!(Originals::ATTRIBUTES
            .iter()
            .all(|(f, _, _)| o.get(f).is_some()));
    }
}
