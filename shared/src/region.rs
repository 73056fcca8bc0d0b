//! Anatomical region from DICOM metadata, through a rule table, to the paper's 16 regions.
//!
//! Runs at the edge (ingest), before de-identification removes the free-text descriptions;
//! only the resulting region name travels on.
//!
//! The texts are tried in order (BodyPartExamined, a coded string, first; then StudyDescription,
//! SeriesDescription, ProtocolName); the first text in which any rule matches decides, and within
//! a text the first matching rule (site rules before the built-in table, the built-in table most
//! specific first). Matching is case-insensitive on words split at anything but letters:
//! - a keyword of up to 4 letters must be a whole word, or that word plus a plural `S`
//!   (`HIP`, `HIPS`; never `ARM` inside `FOREARM`);
//! - a longer one may start a word (`FINGERS`), or span words from a word's start (`L-SPINE`,
//!   `TIB/FIB`, `AC JOINT`), or
//!   be misspelt by one letter: one transposition from 5 letters (`ANKEL`, `WRSIT`), one
//!   letter added, dropped or changed from 6 (`SHOLDER`, `SHOULDAR`, `HUMERIS`).
//!
//! Unmatched is `unknown`: post-processing gives it the global threshold, and the stages count it
//! under `region="unknown"` in their metrics.

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

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

/// The built-in rules, most specific first. English terms, DICOM's BodyPartExamined defined
/// terms (PS3.16 Annex L), the usual RIS abbreviations, and the commonest German, French and
/// Spanish names.
const BUILTIN: &[(&str, &[&str])] = &[
    // Before cervical_spine's NECK.
    ("hip", &["FEMORALNECK", "NECKOFFEMUR"]),
    (
        "cervical_spine",
        &[
            "CSPINE",
            "CERVICAL",
            "NECK",
            "CSP",
            "ODONTOID",
            "DENS",
            "HWS",
            "CERVICALE",
        ],
    ),
    (
        "thoracolumbar_spine",
        &[
            "TSPINE",
            "LSPINE",
            "SSPINE",
            "THORACIC",
            "LUMBAR",
            "LUMBOSACRAL",
            "THORACOLUMBAR",
            "LSP",
            "TSP",
            "BWS",
            "LWS",
            "SPINE",
            "SACRUM",
            "COCCYX",
            "LOMBAIRE",
        ],
    ),
    (
        "clavicle",
        &[
            "CLAVICLE",
            "CLAVICULA",
            "CLAVICAL",
            "CLAV",
            "ACJOINT",
            "SCJOINT",
            "CLAVICULE",
        ],
    ),
    (
        "shoulder",
        &[
            "SHOULDER",
            "SCAPULA",
            "SHLDR",
            "SHLD",
            "SHOULDR",
            "GLENOHUMERAL",
            "GLENOID",
            "SCHULTER",
            "EPAULE",
            "HOMBRO",
        ],
    ),
    (
        "humerus",
        &[
            "HUMERUS", "HUMERAL", "HUMER", "HUM", "UPPERARM", "ARM", "OBERARM",
        ],
    ),
    (
        "elbow",
        &[
            "ELBOW",
            "OLECRANON",
            "ELBW",
            "ELB",
            "ELLENBOGEN",
            "COUDE",
            "CODO",
            "SUPRACONDYLAR",
        ],
    ),
    (
        "wrist",
        &[
            "WRIST",
            "SCAPHOID",
            "NAVICULARHAND",
            "CARPAL",
            "CARPUS",
            "WRST",
            "HANDGELENK",
            "POIGNET",
            "MUNECA",
        ],
    ),
    (
        "forearm",
        &[
            "FOREARM",
            "RADIUS",
            "ULNA",
            "FORARM",
            "UNTERARM",
            "AVANTBRAS",
            "ANTEBRAZO",
        ],
    ),
    (
        "hand",
        &[
            "HAND",
            "FINGER",
            "THUMB",
            "METACARPAL",
            "PHALANX",
            "PHALANGES",
            "DIGIT",
            "MANO",
            "DAUMEN",
        ],
    ),
    (
        "hip",
        &[
            "HIP",
            "ACETABULUM",
            "ACETABULAR",
            "FEMORALNECK",
            "NECKOFFEMUR",
            "NOF",
            "HUEFTE",
            "HUFTE",
            "HANCHE",
            "CADERA",
        ],
    ),
    (
        "pelvis",
        &[
            "PELVIS",
            "PELVIC",
            "SACROILIAC",
            "PUBIS",
            "PUBIC",
            "ILIUM",
            "ISCHIUM",
            "BECKEN",
            "BASSIN",
        ],
    ),
    (
        "femur",
        &["FEMUR", "THIGH", "FEMORAL", "FEM", "OBERSCHENKEL"],
    ),
    (
        "knee",
        &[
            "KNEE", "PATELLA", "KNE", "KNIE", "GENOU", "RODILLA", "PATELLAR",
        ],
    ),
    (
        "tibia_fibula",
        &[
            "TIBIA",
            "FIBULA",
            "TIBFIB",
            "TIB",
            "FIB",
            "LEG",
            "LOWERLEG",
            "SHIN",
            "UNTERSCHENKEL",
        ],
    ),
    (
        "ankle",
        &[
            "ANKLE",
            "ANKL",
            "ANK",
            "MALLEOLUS",
            "MALLEOLAR",
            "TALUS",
            "SPRUNGGELENK",
            "CHEVILLE",
            "TOBILLO",
        ],
    ),
    (
        "foot",
        &[
            "FOOT",
            "TOE",
            "CALCANEUS",
            "CALCANEUM",
            "CALCIS",
            "HEEL",
            "METATARSAL",
            "FEET",
            "FOREFOOT",
            "MIDFOOT",
            "HINDFOOT",
            "HALLUX",
            "FUSS",
            "PIED",
            "ZEHE",
        ],
    ),
];

/// One site rule: any of `keywords` (matched as above) means `region`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionRule {
    pub region: String,
    pub keywords: Vec<String>,
}

/// `[ingest.regions]`: a site's own rules (its protocol names, its language), tried before the
/// built-in table, which `builtin = false` turns off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegionConfig {
    pub rules: Vec<RegionRule>,
    pub builtin: bool,
    /// Accept one-letter misspellings of keywords of 5 letters or more.
    pub misspellings: bool,
}

impl Default for RegionConfig {
    fn default() -> Self {
        Self {
            rules: Vec::new(),
            builtin: true,
            misspellings: true,
        }
    }
}

/// A keyword, upper-cased and reduced to its letters.
#[derive(Debug, Clone)]
struct Key(String);

/// A compiled rule table.
#[derive(Debug, Clone)]
pub struct Regions {
    rules: Vec<(&'static str, Vec<Key>)>,
    misspellings: bool,
}

fn letters(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphabetic())
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

/// Folds the accented letters that occur in region names (MUÑECA, HÜFTE, ÉPAULE) to ASCII,
/// upper-cased; anything else non-ASCII becomes a separator.
fn fold(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            'ä' | 'Ä' | 'à' | 'À' | 'á' | 'Á' | 'â' | 'Â' => 'A',
            'é' | 'É' | 'è' | 'È' | 'ê' | 'Ê' | 'ë' | 'Ë' => 'E',
            'í' | 'Í' | 'î' | 'Î' | 'ï' | 'Ï' => 'I',
            'ö' | 'Ö' | 'ó' | 'Ó' | 'ô' | 'Ô' => 'O',
            'ü' | 'Ü' | 'ú' | 'Ú' | 'û' | 'Û' => 'U',
            'ñ' | 'Ñ' => 'N',
            'ç' | 'Ç' => 'C',
            'ß' => 'S',
            c if c.is_ascii() => c.to_ascii_uppercase(),
            _ => ' ',
        })
        .collect()
}

/// At most one edit between `word` and `key` (optimal string alignment): a transposition of
/// neighbours for keys of 5 letters or more, any single insertion, deletion or substitution for
/// keys of 6 or more.
fn one_typo(word: &str, key: &str) -> bool {
    let (w, k) = (word.as_bytes(), key.as_bytes());
    if k.len() < 5 || w == k {
        return false;
    }
    let first = w.iter().zip(k).take_while(|(a, b)| a == b).count();
    if w.len() == k.len() {
        let rest = first + 2;
        let transposed = rest <= w.len()
            && w[first] == k[first + 1]
            && w[first + 1] == k[first]
            && w[rest..] == k[rest..];
        let changed = k.len() >= 6 && w[first + 1..] == k[first + 1..];
        return transposed || changed;
    }
    if k.len() < 6 {
        return false;
    }
    if w.len() + 1 == k.len() {
        w[first..] == k[first + 1..]
    } else if w.len() == k.len() + 1 {
        w[first + 1..] == k[first..]
    } else {
        false
    }
}

impl Regions {
    /// The built-in table, misspellings accepted.
    pub fn builtin() -> Self {
        Self::new(&RegionConfig::default()).expect("the built-in rules are valid")
    }

    /// Compiles a configuration; refuses regions outside [`REGIONS`] and empty keywords.
    pub fn new(config: &RegionConfig) -> Result<Self, ConfigError> {
        let mut rules = Vec::new();
        for (i, rule) in config.rules.iter().enumerate() {
            let region = REGIONS
                .iter()
                .copied()
                .find(|r| *r == rule.region.trim().to_ascii_lowercase())
                .ok_or_else(|| {
                    ConfigError(format!(
                        "ingest.regions.rules[{i}]: region {:?} is not one of {}",
                        rule.region,
                        REGIONS.join(", ")
                    ))
                })?;
            let mut keys = Vec::new();
            for k in &rule.keywords {
                let key = letters(&fold(k));
                if key.is_empty() {
                    return Err(ConfigError(format!(
                        "ingest.regions.rules[{i}] ({region}): keyword {k:?} has no letters"
                    )));
                }
                keys.push(Key(key));
            }
            if keys.is_empty() {
                return Err(ConfigError(format!(
                    "ingest.regions.rules[{i}] ({region}) has no keywords"
                )));
            }
            rules.push((region, keys));
        }
        if config.builtin {
            for (region, keys) in BUILTIN {
                rules.push((*region, keys.iter().map(|k| Key(letters(k))).collect()));
            }
        }
        Ok(Self {
            rules,
            misspellings: config.misspellings,
        })
    }

    /// The region of the first text that any rule matches, or `unknown`.
    pub fn classify(&self, texts: &[Option<&str>]) -> &'static str {
        for text in texts.iter().flatten() {
            if let Some(region) = self.classify_one(text) {
                return region;
            }
        }
        UNKNOWN
    }

    fn classify_one(&self, text: &str) -> Option<&'static str> {
        let folded = fold(text);
        let words: Vec<&str> = folded
            .split(|c: char| !c.is_ascii_alphabetic())
            .filter(|w| !w.is_empty())
            .collect();
        if words.is_empty() {
            return None;
        }
        // Exact matches anywhere in the table beat a misspelling of an earlier rule's keyword.
        for fuzzy in [false, true] {
            if fuzzy && !self.misspellings {
                break;
            }
            for (region, keys) in &self.rules {
                if keys.iter().any(|k| matches(&k.0, &words, fuzzy)) {
                    return Some(region);
                }
            }
        }
        None
    }
}

fn matches(key: &str, words: &[&str], fuzzy: bool) -> bool {
    if fuzzy {
        return words.iter().any(|w| one_typo(w, key));
    }
    if key.len() <= 4 {
        words.iter().any(|w| {
            *w == key || (w.len() == key.len() + 1 && w.starts_with(key) && w.ends_with('S'))
        })
    } else {
        // From the start of a word, possibly across the following ones: L-SPINE, TIB/FIB, AC JOINT
        // (but not the ACJOINT inside SACROILIAC JOINTS).
        (0..words.len()).any(|i| {
            let mut joined = String::new();
            for w in &words[i..] {
                joined.push_str(w);
                if joined.len() >= key.len() {
                    break;
                }
            }
            joined.starts_with(key)
        })
    }
}

/// [`Regions::builtin`]'s classification.
pub fn classify(texts: &[Option<&str>]) -> &'static str {
    static BUILTIN_RULES: std::sync::OnceLock<Regions> = std::sync::OnceLock::new();
    BUILTIN_RULES.get_or_init(Regions::builtin).classify(texts)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Descriptions as RIS and modalities write them: order codes, laterality, view counts,
    /// abbreviations, misspellings, other languages, DICOM defined terms.
    const REAL_WORLD: &[(&str, &str)] = &[
        ("WRIST", "wrist"),
        ("XR WRIST 3+ VIEWS LEFT", "wrist"),
        ("XR WRIST MIN 3V RT", "wrist"),
        ("Scaphoid series", "wrist"),
        ("DX HANDGELENK LINKS", "wrist"),
        ("Muñeca AP y lateral", "wrist"),
        ("Poignet face profil", "wrist"),
        ("R WRST 2V", "wrist"),
        ("WRSIT", "wrist"),
        ("Knee AP/Lat", "knee"),
        ("KNEE 4+ VIEWS BILAT", "knee"),
        ("XR KNEES STANDING", "knee"),
        ("Patella skyline", "knee"),
        ("Knie ap + seitlich", "knee"),
        ("L-SPINE", "thoracolumbar_spine"),
        ("LUMBOSACRAL SPINE 2-3V", "thoracolumbar_spine"),
        ("T SPINE AP LAT", "thoracolumbar_spine"),
        ("LWS 2 Ebenen", "thoracolumbar_spine"),
        ("Sacrum/coccyx", "thoracolumbar_spine"),
        ("C SPINE", "cervical_spine"),
        ("CSPINE", "cervical_spine"),
        ("XR CERVICAL SPINE 2 OR 3 VIEWS", "cervical_spine"),
        ("Odontoid peg view", "cervical_spine"),
        ("TIB/FIB RT", "tibia_fibula"),
        ("TIB-FIB LT", "tibia_fibula"),
        ("Lower Leg 2V", "tibia_fibula"),
        ("LEG", "tibia_fibula"),
        ("Unterschenkel", "tibia_fibula"),
        ("ANKLE", "ankle"),
        ("XR ANKLE 3+ VIEWS", "ankle"),
        ("Ankel left", "ankle"),
        ("Sprunggelenk re", "ankle"),
        ("Foot 2 views", "foot"),
        ("FEET WEIGHT BEARING", "foot"),
        ("Calcaneus axial", "foot"),
        ("Os calcis", "foot"),
        ("Toes 2nd-5th", "foot"),
        ("MIDFOOT", "foot"),
        ("Great toe / hallux", "foot"),
        ("SHOULDER", "shoulder"),
        ("XR SHOULDER 2+ VIEWS", "shoulder"),
        ("Sholder trauma series", "shoulder"),
        ("L SHLDR", "shoulder"),
        ("Scapula Y view", "shoulder"),
        ("Schulter", "shoulder"),
        ("HAND PA", "hand"),
        ("XR HAND 3+ VIEWS", "hand"),
        ("Finger lat", "hand"),
        ("FINGERS 3-4", "hand"),
        ("Thumb 2v", "hand"),
        ("Mano izquierda", "hand"),
        ("ELBOW", "elbow"),
        ("XR ELBOW 3+ VIEWS", "elbow"),
        ("Rt elb 2v", "elbow"),
        ("Ellenbogen", "elbow"),
        ("FOREARM", "forearm"),
        ("Radius/ulna", "forearm"),
        ("Forearm AP LAT", "forearm"),
        ("HUMERUS", "humerus"),
        ("Humeris 2v", "humerus"),
        ("Upper arm", "humerus"),
        ("ARM", "humerus"),
        ("CLAVICLE", "clavicle"),
        ("Clavical", "clavicle"),
        ("AC joint", "clavicle"),
        ("HIP", "hip"),
        ("XR HIP 2-3 VIEWS W PELVIS", "hip"),
        ("Hips", "hip"),
        ("NOF", "hip"),
        ("Femoral neck", "hip"),
        ("Hüfte", "hip"),
        ("PELVIS", "pelvis"),
        ("Pelvis AP", "pelvis"),
        ("Sacroiliac joints", "pelvis"),
        ("Becken", "pelvis"),
        ("FEMUR", "femur"),
        ("XR FEMUR 2 VIEWS", "femur"),
        ("Thigh", "femur"),
        ("CHEST", "unknown"),
        ("CHEST PA LAT", "unknown"),
        ("EXTREMITY", "unknown"),
        ("SKELETAL SURVEY", "unknown"),
        ("ABDOMEN", "unknown"),
        ("SKULL", "unknown"),
        ("", "unknown"),
        ("---", "unknown"),
    ];

    #[test]
    fn real_world_strings() {
        let mut wrong = Vec::new();
        for (text, want) in REAL_WORLD {
            let got = classify(&[Some(text)]);
            if got != *want {
                wrong.push(format!("{text:?}: {got}, want {want}"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
        // BodyPartExamined wins over a later description.
        assert_eq!(classify(&[Some("ELBOW"), Some("wrist series")]), "elbow");
        assert_eq!(classify(&[None, Some("XR Ankle 3V")]), "ankle");
        // A text that matches nothing passes to the next one.
        assert_eq!(classify(&[Some("XR"), Some("Foot")]), "foot");
    }

    #[test]
    fn short_keywords_are_whole_words() {
        // ARM in FOREARM and HAND in HANDLE are not matches; HIP in SHIP is not either.
        assert_eq!(classify(&[Some("FOREARM")]), "forearm");
        assert_eq!(classify(&[Some("SHIPMENT")]), "unknown");
        assert_eq!(classify(&[Some("HANDLE")]), "unknown");
    }

    #[test]
    fn typos_are_bounded() {
        assert!(one_typo("ANKEL", "ANKLE"));
        assert!(
            !one_typo("ANGLE", "ANKLE"),
            "a substitution in a 5-letter key"
        );
        assert!(one_typo("SHOLDER", "SHOULDER"));
        assert!(one_typo("SHOUULDER", "SHOULDER"));
        assert!(one_typo("SHOULDAR", "SHOULDER"));
        assert!(!one_typo("SHLDER", "SHOULDER"), "two edits");
        assert!(!one_typo("FEMUR", "FEMUR"));
        let strict = Regions::new(&RegionConfig {
            misspellings: false,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(strict.classify(&[Some("Sholder")]), "unknown");
    }

    #[test]
    fn site_rules_come_first_and_are_validated() {
        let site = Regions::new(&RegionConfig {
            rules: vec![RegionRule {
                region: "Wrist".into(),
                keywords: vec!["DRF".into(), "Distal radius".into()],
            }],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(site.classify(&[Some("DRF post reduction")]), "wrist");
        // The built-in table would say forearm.
        assert_eq!(classify(&[Some("Distal radius")]), "forearm");
        assert_eq!(site.classify(&[Some("Distal radius")]), "wrist");
        assert_eq!(site.classify(&[Some("Knee")]), "knee");

        let only = Regions::new(&RegionConfig {
            rules: vec![RegionRule {
                region: "knee".into(),
                keywords: vec!["KNEE".into()],
            }],
            builtin: false,
            misspellings: true,
        })
        .unwrap();
        assert_eq!(only.classify(&[Some("Ankle")]), "unknown");

        let bad = |region: &str, keywords: &[&str]| {
            Regions::new(&RegionConfig {
                rules: vec![RegionRule {
                    region: region.into(),
                    keywords: keywords.iter().map(|k| k.to_string()).collect(),
                }],
                ..Default::default()
            })
            .unwrap_err()
            .to_string()
        };
        assert!(bad("ribs", &["RIB"]).contains("not one of"));
        assert!(bad("hand", &["123"]).contains("no letters"));
        assert!(bad("hand", &[]).contains("no keywords"));
    }

    #[test]
    fn the_config_reads_from_toml() {
        let c: RegionConfig =
            toml::from_str("builtin = true\n[[rules]]\nregion = \"ankle\"\nkeywords = [\"OSG\"]\n")
                .unwrap();
        assert_eq!(c.rules[0].keywords, ["OSG"]);
        assert!(c.misspellings);
        assert_eq!(
            Regions::new(&c).unwrap().classify(&[Some("OSG re")]),
            "ankle"
        );
    }
}
