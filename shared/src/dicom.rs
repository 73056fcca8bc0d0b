//! Reading attributes the way every stage needs them.

use dicom_core::Tag;
use dicom_object::InMemDicomObject;

/// A text attribute, its padding (NUL and spaces) trimmed; `None` when absent, unreadable as
/// text, or empty.
pub fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    let e = obj.element(tag).ok()?;
    let s = e.to_str().ok()?;
    let s = s.trim_end_matches('\0').trim();
    (!s.is_empty()).then(|| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;

    #[test]
    fn padding_is_trimmed_and_empty_is_none() {
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
            DataElement::new(tags::ACCESSION_NUMBER, VR::SH, PrimitiveValue::from("  ")),
        ]);
        assert_eq!(
            text(&obj, tags::STUDY_INSTANCE_UID).as_deref(),
            Some("1.2.3")
        );
        assert_eq!(text(&obj, tags::PATIENT_NAME).as_deref(), Some("Doe^Jane"));
        assert_eq!(text(&obj, tags::ACCESSION_NUMBER), None);
        assert_eq!(text(&obj, tags::PATIENT_ID), None);
    }
}
