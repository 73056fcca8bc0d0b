//! Burned-in text: per-device pixel rules (manufacturer + model -> rectangles to black out), and
//! quarantine for an image that declares burned-in annotation no rule covers.

use dicom_core::value::{PrimitiveValue, Value};
use dicom_core::{DataElement, Length, VR};
use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, InMemDicomObject};

use fracture_shared::error::StageError;

/// `[[ingest.burned_in]]`: where one device model burns text into its images.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PixelRule {
    /// Manufacturer (0008,0070), compared without case.
    pub manufacturer: String,
    /// ManufacturerModelName (0008,1090); empty matches every model of the manufacturer.
    #[serde(default)]
    pub model: String,
    /// Rectangles `[x0, y0, x1, y1]` in pixels (x1, y1 exclusive) to black out.
    pub rectangles: Vec<[u32; 4]>,
}

fn text(obj: &DefaultDicomObject, tag: dicom_core::Tag) -> String {
    fracture_shared::dicom::text(obj, tag).unwrap_or_default()
}

fn int(obj: &DefaultDicomObject, tag: dicom_core::Tag) -> Option<u32> {
    obj.element(tag).ok().and_then(|e| e.to_int::<u32>().ok())
}

/// The rule that covers this image's device, from its attributes alone (the pixels need not be
/// parsed to decide): `None` when no rule does, an error (the input is quarantined) when the image
/// declares burned-in annotation that no rule covers.
pub fn rule_for<'r>(
    obj: &DefaultDicomObject,
    rules: &'r [PixelRule],
) -> Result<Option<&'r PixelRule>, StageError> {
    let manufacturer = text(obj, tags::MANUFACTURER);
    let model = text(obj, tags::MANUFACTURER_MODEL_NAME);
    let rule = rules.iter().find(|r| {
        r.manufacturer.trim().eq_ignore_ascii_case(&manufacturer)
            && (r.model.trim().is_empty() || r.model.trim().eq_ignore_ascii_case(&model))
    });
    if rule.is_none() && text(obj, tags::BURNED_IN_ANNOTATION).eq_ignore_ascii_case("YES") {
        return Err(StageError::data(format!(
            "quarantined: the image declares burned-in annotation (0028,0301 = YES) and no pixel rule covers manufacturer {manufacturer:?} model {model:?}; add an [[ingest.burned_in]] rule with the rectangles this device writes text into, then send it again"
        )));
    }
    Ok(rule)
}

/// Applies the matching rule, if any. `Ok(true)` when pixels were cleaned; an error (a data
/// error: the input is quarantined) when the image declares burned-in annotation that no rule
/// covers, or a rule applies to pixels we cannot edit in place.
pub fn apply(obj: &mut DefaultDicomObject, rules: &[PixelRule]) -> Result<bool, StageError> {
    let Some(rule) = rule_for(obj, rules)? else {
        return Ok(false);
    };
    let manufacturer = text(obj, tags::MANUFACTURER);
    let model = text(obj, tags::MANUFACTURER_MODEL_NAME);
    let (rows, cols) = (
        int(obj, tags::ROWS).unwrap_or(0) as usize,
        int(obj, tags::COLUMNS).unwrap_or(0) as usize,
    );
    let bits = int(obj, tags::BITS_ALLOCATED).unwrap_or(0);
    let samples = int(obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1);
    let signed = int(obj, tags::PIXEL_REPRESENTATION).unwrap_or(0) == 1;
    let frames = int(obj, tags::NUMBER_OF_FRAMES).unwrap_or(1).max(1);
    let mono1 = text(obj, tags::PHOTOMETRIC_INTERPRETATION) == "MONOCHROME1";
    let stored = int(obj, tags::BITS_STORED).unwrap_or(bits);
    let refuse = |why: &str| {
        StageError::data(format!(
            "quarantined: burned-in text must be blacked out ({manufacturer} {model}) but {why}; transcode it to uncompressed unsigned greyscale (e.g. `gdcmconv --raw`) and send it again"
        ))
    };
    if samples != 1 || signed || frames != 1 || !(bits == 8 || bits == 16) {
        return Err(refuse("its pixel format cannot be edited in place"));
    }
    // Black as displayed: the top of the range for MONOCHROME1, zero for MONOCHROME2.
    let black: u16 = if mono1 {
        ((1u32 << stored.min(16)) - 1) as u16
    } else {
        0
    };
    let element = obj
        .element(tags::PIXEL_DATA)
        .map_err(|_| refuse("it has no pixel data"))?;
    let vr = element.vr();
    let mut value = match element.value() {
        Value::Primitive(p) => p.clone(),
        _ => return Err(refuse("its pixel data is compressed (encapsulated)")),
    };
    let paint = |set: &mut dyn FnMut(usize)| {
        for r in &rule.rectangles {
            let (x0, y0) = (r[0] as usize, r[1] as usize);
            let (x1, y1) = ((r[2] as usize).min(cols), (r[3] as usize).min(rows));
            for y in y0..y1 {
                for x in x0..x1 {
                    set(y * cols + x);
                }
            }
        }
    };
    match (&mut value, bits) {
        (PrimitiveValue::U16(v), 16) if v.len() >= rows * cols => paint(&mut |i| v[i] = black),
        (PrimitiveValue::U8(v), 16) if v.len() >= rows * cols * 2 => {
            let b = black.to_le_bytes();
            paint(&mut |i| {
                v[2 * i] = b[0];
                v[2 * i + 1] = b[1];
            })
        }
        (PrimitiveValue::U8(v), 8) if v.len() >= rows * cols => paint(&mut |i| v[i] = black as u8),
        _ => return Err(refuse("its pixel data does not match its header")),
    }
    obj.put(DataElement::new(tags::PIXEL_DATA, vr, value));
    Ok(true)
}

/// Records on a de-identified object that its pixels were cleaned (113101, Clean Pixel Data).
pub fn mark_cleaned(obj: &mut DefaultDicomObject) {
    let item = InMemDicomObject::from_element_iter([
        DataElement::new(tags::CODE_VALUE, VR::SH, PrimitiveValue::from("113101")),
        DataElement::new(
            tags::CODING_SCHEME_DESIGNATOR,
            VR::SH,
            PrimitiveValue::from("DCM"),
        ),
        DataElement::new(
            tags::CODE_MEANING,
            VR::LO,
            PrimitiveValue::from("Clean Pixel Data Option"),
        ),
    ]);
    let mut items: Vec<InMemDicomObject> = obj
        .element(tags::DEIDENTIFICATION_METHOD_CODE_SEQUENCE)
        .ok()
        .and_then(|e| e.items().map(|i| i.to_vec()))
        .unwrap_or_default();
    items.push(item);
    obj.put(DataElement::new(
        tags::DEIDENTIFICATION_METHOD_CODE_SEQUENCE,
        VR::SQ,
        dicom_core::value::DataSetSequence::new(items, Length::UNDEFINED),
    ));
    obj.put(DataElement::new(
        tags::BURNED_IN_ANNOTATION,
        VR::CS,
        PrimitiveValue::from("NO"),
    ));
}
