//! The Secondary Capture a clinician sees in any PACS viewer: the radiograph, display-ready in
//! 8 bits, with the boxes drawn on it and the result written in a banner above it.

use dicom_core::value::PrimitiveValue;
use dicom_core::{dicom_value, DataElement, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::InMemDicomObject;

use fracture_shared::error::StageError;
use fracture_shared::messages::{BoundingBox, Finding};
use fracture_shared::pixels::Radiograph;

use crate::dicom::{equipment, model_name, sequence, series_description, text, OutputUids, Source};
use crate::font;

/// Series Number of the Secondary Capture series (the SR series is 9901).
pub const SERIES_NUMBER: &str = "9902";
/// A side longer than this is reduced by a whole factor first: a PACS thumbnail does not need
/// 8192 px, and an RGB image that size would be 200 MB.
pub const MAX_SIDE: usize = 4096;

const BOX_COLOUR: [u8; 3] = [255, 40, 40];
const POSITIVE_TEXT: [u8; 3] = [255, 90, 70];
const NEGATIVE_TEXT: [u8; 3] = [255, 255, 255];
const WARNING_TEXT: [u8; 3] = [255, 210, 0];
const BANNER: [u8; 3] = [0, 0, 0];

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rgb {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl Rgb {
    fn filled(width: usize, height: usize, colour: [u8; 3]) -> Self {
        Self {
            width,
            height,
            data: colour.repeat(width * height),
        }
    }

    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.width + x) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }

    fn set(&mut self, x: usize, y: usize, colour: [u8; 3]) {
        if x < self.width && y < self.height {
            let i = (y * self.width + x) * 3;
            self.data[i..i + 3].copy_from_slice(&colour);
        }
    }

    /// Fills the rectangle `x0..x1`, `y0..y1` (clipped to the image).
    #[cfg(test)]
    fn fill(&mut self, x0: usize, y0: usize, x1: usize, y1: usize, colour: [u8; 3]) {
        for y in y0..y1.min(self.height) {
            for x in x0..x1.min(self.width) {
                self.set(x, y, colour);
            }
        }
    }

    /// Reduced by area averaging so that neither side exceeds `max_side` (never enlarged).
    pub fn thumbnail(&self, max_side: usize) -> Rgb {
        let longest = self.width.max(self.height);
        if longest <= max_side || max_side == 0 {
            return self.clone();
        }
        let (w, h) = (
            (self.width * max_side).div_ceil(longest).max(1),
            (self.height * max_side).div_ceil(longest).max(1),
        );
        let mut out = Rgb::filled(w, h, [0; 3]);
        for ty in 0..h {
            let (sy0, sy1) = (
                ty * self.height / h,
                ((ty + 1) * self.height / h).max(ty * self.height / h + 1),
            );
            for tx in 0..w {
                let (sx0, sx1) = (
                    tx * self.width / w,
                    ((tx + 1) * self.width / w).max(tx * self.width / w + 1),
                );
                let mut sum = [0u64; 3];
                for sy in sy0..sy1 {
                    for sx in sx0..sx1 {
                        let p = self.pixel(sx, sy);
                        for c in 0..3 {
                            sum[c] += u64::from(p[c]);
                        }
                    }
                }
                let n = ((sy1 - sy0) * (sx1 - sx0)) as u64;
                out.set(tx, ty, sum.map(|s| ((s + n / 2) / n) as u8));
            }
        }
        out
    }

    /// PNG bytes (for the HTML report).
    pub fn to_png(&self) -> Result<Vec<u8>, StageError> {
        use image::ImageEncoder;
        let mut out = Vec::new();
        image::codecs::png::PngEncoder::new(&mut out)
            .write_image(
                &self.data,
                self.width as u32,
                self.height as u32,
                image::ExtendedColorType::Rgb8,
            )
            .map_err(|e| StageError::internal(format!("cannot encode the overlay as PNG: {e}")))?;
        Ok(out)
    }
}

/// The banner's lines: the result, the numbers behind it, and the model's state.
pub fn banner_lines(finding: &Finding) -> Vec<(String, [u8; 3])> {
    let mut lines = vec![if finding.fracture {
        (
            "AI RESULT - FRACTURE SUSPECTED - NOT A DIAGNOSIS".to_string(),
            POSITIVE_TEXT,
        )
    } else {
        (
            "AI RESULT - NO FRACTURE DETECTED - NOT A DIAGNOSIS".to_string(),
            NEGATIVE_TEXT,
        )
    }];
    lines.push((
        format!(
            "SCORE {:.4} {} THRESHOLD {:.4} - REGION {} - {} BOX{} - MODEL {}",
            finding.score,
            if finding.fracture { ">=" } else { "<" },
            finding.threshold,
            finding.region.replace('_', " "),
            finding.boxes.len(),
            if finding.boxes.len() == 1 { "" } else { "ES" },
            model_name(finding)
        )
        .to_uppercase(),
        NEGATIVE_TEXT,
    ));
    if !finding.model_trained {
        lines.push((
            "UNTRAINED MODEL - NOT FOR CLINICAL USE".to_string(),
            WARNING_TEXT,
        ));
    }
    lines
}

/// The overlay: `image` in 8 bits below a banner with the result, the boxes (original pixel
/// coordinates) drawn in red and numbered as in the SR. Returns the image and the banner's
/// height (the radiograph starts on that row).
pub fn overlay(image: &Radiograph, finding: &Finding) -> (Rgb, usize) {
    let factor = image.width.max(image.height).div_ceil(MAX_SIDE).max(1);
    let (w, h) = (
        image.width.div_ceil(factor).max(1),
        image.height.div_ceil(factor).max(1),
    );
    // Text scale: about 320 characters' cells across the image, at least one pixel per cell.
    let scale = (w / 320).clamp(1, 8);
    let margin = 2 * scale;
    let per_line = (w.saturating_sub(2 * margin) / (font::ADVANCE * scale)).max(1);
    let mut lines = Vec::new();
    for (line, colour) in banner_lines(finding) {
        for part in font::wrap(&line, per_line) {
            lines.push((part, colour));
        }
    }
    let line_height = (font::ROWS + 3) * scale;
    let banner = 2 * margin + lines.len() * line_height;
    let mut out = Rgb::filled(w, banner + h, BANNER);
    for (i, (line, colour)) in lines.iter().enumerate() {
        font::draw(
            line,
            margin,
            margin + i * line_height + scale,
            scale,
            |x, y| out.set(x, y, *colour),
        );
    }
    // The radiograph, area-averaged by `factor`.
    for y in 0..h {
        for x in 0..w {
            let (mut sum, mut n) = (0f32, 0f32);
            for sy in y * factor..((y + 1) * factor).min(image.height) {
                for sx in x * factor..((x + 1) * factor).min(image.width) {
                    sum += image.pixels[sy * image.width + sx];
                    n += 1.0;
                }
            }
            let v = if n > 0.0 { sum / n } else { 0.0 };
            let g = (v.clamp(0.0, 1.0) * 255.0).round() as u8;
            out.set(x, banner + y, [g, g, g]);
        }
    }
    let thickness = (w.min(h) / 250).clamp(2, 12);
    for (i, b) in finding.boxes.iter().enumerate() {
        draw_box(&mut out, banner, w, h, factor, b, thickness);
        label_box(&mut out, banner, w, h, factor, b, thickness, scale, i + 1);
    }
    (out, banner)
}

/// Pixel rectangle (x0, y0, x1, y1), exclusive ends, of a box in the reduced image.
fn pixel_rect(b: &BoundingBox, factor: usize, w: usize, h: usize) -> (usize, usize, usize, usize) {
    let f = factor as f64;
    let clamp = |v: f64, max: usize| (v.max(0.0) as usize).min(max);
    (
        clamp((b.x0 / f).floor(), w),
        clamp((b.y0 / f).floor(), h),
        clamp((b.x1 / f).ceil(), w),
        clamp((b.y1 / f).ceil(), h),
    )
}

fn draw_box(
    out: &mut Rgb,
    top: usize,
    w: usize,
    h: usize,
    factor: usize,
    b: &BoundingBox,
    t: usize,
) {
    let (x0, y0, x1, y1) = pixel_rect(b, factor, w, h);
    // The line is centred on the box edge, clipped to the radiograph (never over the banner).
    let half = t / 2;
    let (ox0, oy0) = (x0.saturating_sub(half), y0.saturating_sub(half));
    let (ox1, oy1) = ((x1 + half).min(w), (y1 + half).min(h));
    let (ix0, iy0) = (x0 + (t - half), y0 + (t - half));
    let (ix1, iy1) = (x1.saturating_sub(t - half), y1.saturating_sub(t - half));
    for y in oy0..oy1 {
        for x in ox0..ox1 {
            let inside = x >= ix0 && x < ix1 && y >= iy0 && y < iy1;
            if !inside {
                out.set(x, top + y, BOX_COLOUR);
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn label_box(
    out: &mut Rgb,
    top: usize,
    w: usize,
    h: usize,
    factor: usize,
    b: &BoundingBox,
    t: usize,
    scale: usize,
    n: usize,
) {
    let (x0, y0, _, _) = pixel_rect(b, factor, w, h);
    let label = n.to_string();
    let text_h = font::ROWS * scale;
    let text_w = font::width(&label) * scale;
    // Above the box's top-left corner, or inside it when there is no room above.
    let y = if y0 >= text_h + t + scale {
        y0 - text_h - t
    } else {
        y0 + t + scale
    };
    let x = x0.min(w.saturating_sub(text_w));
    let mut cells = Vec::new();
    font::draw(&label, x, y, scale, |px, py| cells.push((px, py)));
    for (px, py) in cells {
        if px < w && py < h {
            out.set(px, top + py, BOX_COLOUR);
        }
    }
}

/// The Secondary Capture Image (PS3.3 A.8.1) of `image`: same patient and study as the source,
/// the study's AI result series, a UID derived from the source and the model version.
pub fn secondary_capture(
    source: &Source,
    finding: &Finding,
    uids: &OutputUids,
    image: &Rgb,
    banner: usize,
) -> Result<InMemDicomObject, StageError> {
    let rows = u16::try_from(image.height).map_err(|_| {
        StageError::data(format!(
            "the overlay would be {} rows high, more than DICOM's 65535",
            image.height
        ))
    })?;
    let columns = u16::try_from(image.width).map_err(|_| {
        StageError::data(format!(
            "the overlay would be {} columns wide, more than DICOM's 65535",
            image.width
        ))
    })?;
    let (date, time) = source.content_date_time();
    let mut obj = InMemDicomObject::new_empty();
    obj.put(text(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192"));
    obj.put(DataElement::new(
        tags::IMAGE_TYPE,
        VR::CS,
        dicom_value!(Strs, ["DERIVED", "SECONDARY"]),
    ));
    obj.put(text(
        tags::SOP_CLASS_UID,
        VR::UI,
        uids::SECONDARY_CAPTURE_IMAGE_STORAGE,
    ));
    obj.put(text(tags::SOP_INSTANCE_UID, VR::UI, &uids.sc_instance));
    obj.put(text(tags::CONTENT_DATE, VR::DA, &date));
    obj.put(text(tags::CONTENT_TIME, VR::TM, &time));
    source.inherit_into(&mut obj);
    obj.put(text(tags::MODALITY, VR::CS, "OT"));
    obj.put(text(tags::CONVERSION_TYPE, VR::CS, "WSD"));
    equipment(&mut obj, finding);
    obj.put(text(
        tags::SECONDARY_CAPTURE_DEVICE_MANUFACTURER,
        VR::LO,
        crate::dicom::MANUFACTURER,
    ));
    obj.put(text(
        tags::SECONDARY_CAPTURE_DEVICE_MANUFACTURER_MODEL_NAME,
        VR::LO,
        &model_name(finding),
    ));
    obj.put(text(
        tags::SECONDARY_CAPTURE_DEVICE_SOFTWARE_VERSIONS,
        VR::LO,
        concat!("fracture ", env!("CARGO_PKG_VERSION")),
    ));
    obj.put(text(tags::SERIES_INSTANCE_UID, VR::UI, &uids.sc_series));
    obj.put(text(tags::SERIES_NUMBER, VR::IS, SERIES_NUMBER));
    // Type 2C (paired body parts): known or empty, as a Secondary Capture has no Image Laterality.
    obj.put(text(
        tags::LATERALITY,
        VR::CS,
        source.laterality.as_deref().unwrap_or(""),
    ));
    obj.put(text(
        tags::SERIES_DESCRIPTION,
        VR::LO,
        series_description(finding.model_trained),
    ));
    obj.put(text(tags::INSTANCE_NUMBER, VR::IS, &source.instance_number));
    obj.put(source.patient_orientation.clone().unwrap_or_else(|| {
        DataElement::new(tags::PATIENT_ORIENTATION, VR::CS, PrimitiveValue::Empty)
    }));
    obj.put(text(
        tags::DERIVATION_DESCRIPTION,
        VR::ST,
        &format!(
            "Radiograph scaled to 8 bits for display, with the AI result of model {} burned in: \
             {} box(es) around suspected fractures and a {banner}-row banner above the image. \
             Not a diagnosis.",
            model_name(finding),
            finding.boxes.len()
        ),
    ));
    obj.put(sequence(
        tags::SOURCE_IMAGE_SEQUENCE,
        vec![source.referenced_sop()],
    ));
    obj.put(text(tags::BURNED_IN_ANNOTATION, VR::CS, "YES"));
    obj.put(text(tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "00"));
    let us = |tag, v: u16| DataElement::new(tag, VR::US, PrimitiveValue::from(v));
    obj.put(us(tags::SAMPLES_PER_PIXEL, 3));
    obj.put(text(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "RGB"));
    obj.put(us(tags::PLANAR_CONFIGURATION, 0));
    obj.put(us(tags::ROWS, rows));
    obj.put(us(tags::COLUMNS, columns));
    obj.put(us(tags::BITS_ALLOCATED, 8));
    obj.put(us(tags::BITS_STORED, 8));
    obj.put(us(tags::HIGH_BIT, 7));
    obj.put(us(tags::PIXEL_REPRESENTATION, 0));
    let mut pixels = image.data.clone();
    if pixels.len() % 2 == 1 {
        pixels.push(0); // OB values have even length
    }
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PrimitiveValue::U8(pixels.into()),
    ));
    Ok(obj)
}

/// The RGB image of a Secondary Capture we wrote (uncompressed RGB, 8 bits).
pub fn read_rgb(sc: &[u8]) -> Result<Rgb, StageError> {
    let obj = fracture_shared::pixels::read_object(sc)?;
    let int = |tag| {
        obj.get(tag)
            .and_then(|e| e.to_int::<u32>().ok())
            .map(|v| v as usize)
    };
    let (Some(width), Some(height), Some(3), Some(8)) = (
        int(tags::COLUMNS),
        int(tags::ROWS),
        int(tags::SAMPLES_PER_PIXEL),
        int(tags::BITS_ALLOCATED),
    ) else {
        return Err(StageError::data(
            "not a Secondary Capture written by fracture (8-bit RGB expected)",
        ));
    };
    let data = obj
        .get(tags::PIXEL_DATA)
        .and_then(|e| e.to_bytes().ok())
        .ok_or_else(|| StageError::data("the Secondary Capture has no pixel data"))?;
    if data.len() < width * height * 3 {
        return Err(StageError::data(
            "the Secondary Capture's pixel data is truncated",
        ));
    }
    Ok(Rgb {
        width,
        height,
        data: data[..width * height * 3].to_vec(),
    })
}

/// A PNG thumbnail (longest side at most `max_side`) of a Secondary Capture we wrote.
pub fn thumbnail_png(sc: &[u8], max_side: usize) -> Result<Vec<u8>, StageError> {
    read_rgb(sc)?.thumbnail(max_side).to_png()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fracture_shared::messages::{schema, RadiographId};

    fn finding(fracture: bool, boxes: Vec<BoundingBox>) -> Finding {
        Finding {
            schema: schema::FINDING.into(),
            id: RadiographId {
                input: "in-1".into(),
                study_instance_uid: "2.25.1".into(),
                series_instance_uid: "2.25.2".into(),
                sop_instance_uid: "2.25.3".into(),
            },
            site: "S1".into(),
            region: "tibia_fibula".into(),
            score: if fracture { 0.8 } else { 0.2 },
            threshold: 0.5,
            fracture,
            boxes,
            model_version: "demo-v1".into(),
            model_trained: false,
            sr: None,
            sc: None,
        }
    }

    fn grey(width: usize, height: usize, v: f32) -> Radiograph {
        Radiograph {
            width,
            height,
            pixels: vec![v; width * height],
        }
    }

    #[test]
    fn boxes_are_drawn_where_they_are_and_nowhere_else() {
        let b = BoundingBox {
            x0: 100.0,
            y0: 150.0,
            x1: 300.0,
            y1: 260.0,
            score: 0.9,
        };
        let (img, top) = overlay(&grey(640, 480, 0.5), &finding(true, vec![b]));
        assert_eq!((img.width, img.height - top), (640, 480));
        let t = 2; // 480 / 250 clamps to 2: one pixel each side of the edge
                   // Edges in red, the inside and the outside grey.
        assert_eq!(img.pixel(200, top + 150), BOX_COLOUR);
        assert_eq!(img.pixel(200, top + 149), BOX_COLOUR);
        assert_eq!(img.pixel(100, top + 200), BOX_COLOUR);
        assert_eq!(img.pixel(299, top + 200), BOX_COLOUR);
        assert_eq!(img.pixel(200, top + 151 + t), [128; 3]);
        assert_eq!(img.pixel(200, top + 200), [128; 3]);
        assert_eq!(img.pixel(50, top + 200), [128; 3]);
        assert_eq!(img.pixel(350, top + 200), [128; 3]);
        // The banner is above the radiograph and carries lit text of the positive colour.
        let banner: Vec<[u8; 3]> = (0..top)
            .flat_map(|y| (0..img.width).map(move |x| (x, y)))
            .map(|(x, y)| img.pixel(x, y))
            .collect();
        assert!(banner.contains(&POSITIVE_TEXT));
        assert!(banner.contains(&WARNING_TEXT), "untrained model line");
        let (neg, _) = overlay(&grey(640, 480, 0.5), &finding(false, vec![]));
        assert!((0..neg.height)
            .flat_map(|y| (0..neg.width).map(move |x| (x, y)))
            .all(|(x, y)| neg.pixel(x, y) != BOX_COLOUR && neg.pixel(x, y) != POSITIVE_TEXT));
    }

    #[test]
    fn large_radiographs_are_reduced_and_boxes_follow() {
        let b = BoundingBox {
            x0: 4000.0,
            y0: 1000.0,
            x1: 5000.0,
            y1: 2000.0,
            score: 0.9,
        };
        let (img, top) = overlay(&grey(8200, 3000, 0.0), &finding(true, vec![b]));
        // Factor 3: 8200 / 3 rounds up to 2734.
        assert_eq!((img.width, img.height - top), (2734, 1000));
        assert_eq!(img.pixel(1400, top + 333), BOX_COLOUR);
        assert_eq!(img.pixel(1400, top + 500), [0; 3]);
    }

    #[test]
    fn thumbnails_average_and_keep_the_aspect() {
        let mut img = Rgb::filled(100, 50, [0, 0, 0]);
        img.fill(0, 0, 50, 50, [200, 100, 0]);
        let t = img.thumbnail(10);
        assert_eq!((t.width, t.height), (10, 5));
        assert_eq!(t.pixel(0, 0), [200, 100, 0]);
        assert_eq!(t.pixel(9, 4), [0, 0, 0]);
        let png = t.to_png().unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    }
}
