//! Anatomical region from DICOM metadata, through a rule table, to the paper's 16 regions.
//!
//! Runs at the edge (ingest), before de-identification removes the free-text descriptions;
//! only the resulting region name travels on.

/// The default taxonomy (PAPER-NOTES.md, "Regions"); `unknown` when nothing matches.
pub const REGIONS: [&str; 16] = [
    "ankle",
    "clavicle",
    "elbow",
    "femur",
    "foot",
    "forearm",
    "hand",
    "hip",
    "humerus",
    "knee",
    "pelvis",
    "shoulder",
    "cervical_spine",
    "thoracolumbar_spine",
    "tibia_fibula",
    "wrist",
];
pub const UNKNOWN: &str = "unknown";

/// Keyword rules, most specific first: the first rule with a keyword that occurs as a word (or
/// word prefix) in any of the texts wins. Texts are upper-cased and split on non-letters.
const RULES: &[(&str, &[&str])] = &[
    (
        "cervical_spine",
        &["CSPINE", "C-SPINE", "CERVICAL", "NECK", "CSP"],
    ),
    (
        "thoracolumbar_spine",
        &[
            "TSPINE",
            "LSPINE",
            "THORACIC",
            "LUMBAR",
            "THORACOLUMBAR",
            "LSP",
            "TSP",
            "SPINE",
            "SACRUM",
            "COCCYX",
        ],
    ),
    ("clavicle", &["CLAVICLE", "CLAVICULA", "CLAV", "ACJOINT"]),
    (
        "shoulder",
        &["SHOULDER", "SCAPULA", "SHLDR", "SHOULDR", "GLENOHUMERAL"],
    ),
    ("humerus", &["HUMERUS", "HUMER", "UPPERARM", "ARM"]),
    ("elbow", &["ELBOW", "OLECRANON", "ELBW"]),
    ("wrist", &["WRIST", "SCAPHOID", "CARPAL", "CARPUS", "WRST"]),
    ("forearm", &["FOREARM", "RADIUS", "ULNA", "FORARM"]),
    (
        "hand",
        &[
            "HAND",
            "FINGER",
            "THUMB",
            "METACARPAL",
            "PHALANX",
            "PHALANGES",
        ],
    ),
    ("hip", &["HIP", "ACETABULUM", "FEMORALNECK"]),
    (
        "pelvis",
        &["PELVIS", "PELVIC", "SACROILIAC", "PUBIS", "ILIUM"],
    ),
    ("femur", &["FEMUR", "THIGH", "FEMORAL"]),
    ("knee", &["KNEE", "PATELLA", "KNE"]),
    (
        "tibia_fibula",
        &[
            "TIBIA", "FIBULA", "TIBFIB", "TIB", "FIB", "LEG", "LOWERLEG", "SHIN",
        ],
    ),
    ("ankle", &["ANKLE", "ANKL", "MALLEOLUS", "TALUS"]),
    (
        "foot",
        &["FOOT", "TOE", "CALCANEUS", "HEEL", "METATARSAL", "FEET"],
    ),
];

/// Classifies from BodyPartExamined first (a coded string), then the descriptions.
pub fn classify(texts: &[Option<&str>]) -> &'static str {
    for text in texts.iter().flatten() {
        let upper = text.to_uppercase();
        let squashed: String = upper.chars().filter(|c| c.is_ascii_alphabetic()).collect();
        let words: Vec<&str> = upper
            .split(|c: char| !c.is_ascii_alphabetic())
            .filter(|w| !w.is_empty())
            .collect();
        for (region, keys) in RULES {
            for key in *keys {
                let k: String = key.chars().filter(|c| c.is_ascii_alphabetic()).collect();
                // Short keys must match a whole word; long ones may appear inside one
                // ("LSPINE" in "L-SPINE", "TIBFIB" in "TIB/FIB").
                let hit = if k.len() <= 4 {
                    words.iter().any(|w| *w == k)
                } else {
                    words.iter().any(|w| w.starts_with(&k)) || squashed.contains(&k)
                };
                if hit {
                    return region;
                }
            }
        }
    }
    UNKNOWN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_world_strings() {
        let cases = [
            ("WRIST", "wrist"),
            ("XR WRIST 3+ VIEWS LEFT", "wrist"),
            ("Knee AP/Lat", "knee"),
            ("L-SPINE", "thoracolumbar_spine"),
            ("C SPINE", "cervical_spine"),
            ("TIB/FIB RT", "tibia_fibula"),
            ("ANKLE", "ankle"),
            ("Foot 2 views", "foot"),
            ("SHOULDER", "shoulder"),
            ("HAND PA", "hand"),
            ("CHEST", "unknown"),
            ("EXTREMITY", "unknown"),
        ];
        for (text, want) in cases {
            assert_eq!(classify(&[Some(text)]), want, "{text}");
        }
        // BodyPartExamined wins over a later description.
        assert_eq!(classify(&[Some("ELBOW"), Some("wrist series")]), "elbow");
        assert_eq!(classify(&[None, Some("XR Ankle 3V")]), "ankle");
    }
}
