//! The ensemble manifest: members, weight checksums, transform settings and region thresholds.
//!
//! ```toml
//! name = "untrained"
//! model_version = "untrained-0.1.0"   # recorded with every finding
//! trained = false
//! input_size = 256
//! model_card = """..."""
//!
//! [transform]            # TransformConfig; `size` may be left out and then is input_size
//! lcn_window = 9
//!
//! [thresholds]
//! default_score = 0.5    # fracture when score >= threshold
//! default_map = 0.5      # map binarisation for boxes
//! [thresholds.score]     # per region
//! wrist = 0.5
//! [thresholds.map]
//!
//! [[members]]
//! name = "m1-raw-map"
//! arch = "drn_d_22"      # drn_c_26 | drn_c_42 | drn_d_22 | drn_d_38
//! input = "raw"          # raw | lcn | both
//! map_head = true
//! attention = false
//! pooling = "avg"        # avg | spp
//! channels = [8, 8, 16, 16, 32, 32, 32, 32]   # optional, default the reference's
//! weights = "m1.safetensors"                   # relative to the manifest's folder
//! sha256 = "..."
//! ```

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::drn::{Arch, DrnConfig, Pooling, REFERENCE_CHANNELS};
use crate::{ModelError, TransformConfig};

/// A validated ensemble manifest.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Manifest {
    pub name: String,
    /// Every finding records this, so a result can be traced to the weights that made it.
    pub model_version: String,
    /// False for random or synthetic-only weights: their scores must not reach a clinician.
    pub trained: bool,
    /// Side of the square model input; equals `transform.size`.
    pub input_size: usize,
    pub model_card: String,
    /// Benchmarks only: no networks; a radiograph's score is a fixed function of its pixels and
    /// there is no map. Measures the pipeline's own ceiling without a model in the way. Such a
    /// manifest must say `trained = false` and have no members.
    pub null_model: bool,
    pub transform: TransformConfig,
    pub thresholds: Thresholds,
    pub members: Vec<MemberSpec>,
    /// The folder the manifest was read from; weight paths are relative to it.
    #[serde(skip)]
    pub dir: PathBuf,
}

/// Decision thresholds on probabilities, per anatomical region with a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    /// A radiograph is called fractured when its score is at or above this.
    #[serde(default = "half")]
    pub default_score: f32,
    /// The averaged probability map is binarised at this to draw boxes.
    #[serde(default = "half")]
    pub default_map: f32,
    /// Region name (as the region rules produce it, e.g. `wrist`) -> score threshold.
    #[serde(default)]
    pub score: BTreeMap<String, f32>,
    /// Region name -> map threshold.
    #[serde(default)]
    pub map: BTreeMap<String, f32>,
}

fn half() -> f32 {
    0.5
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            default_score: 0.5,
            default_map: 0.5,
            score: BTreeMap::new(),
            map: BTreeMap::new(),
        }
    }
}

/// Which image channels a member reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Input {
    /// The resized image, [0, 1].
    Raw,
    /// The Local Contrast Normalised image, [-1, 1].
    Lcn,
    /// Both, as two channels (raw first).
    Both,
}

impl Input {
    pub fn channels(self) -> usize {
        match self {
            Input::Raw | Input::Lcn => 1,
            Input::Both => 2,
        }
    }
}

/// One network of the ensemble.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberSpec {
    pub name: String,
    pub arch: Arch,
    pub input: Input,
    #[serde(default)]
    pub map_head: bool,
    #[serde(default)]
    pub attention: bool,
    #[serde(default)]
    pub pooling: Pooling,
    #[serde(default = "reference_channels")]
    pub channels: [usize; 8],
    /// Safetensors file, relative to the manifest's folder.
    pub weights: PathBuf,
    /// Lowercase hex sha256 of the weights file.
    pub sha256: String,
}

fn reference_channels() -> [usize; 8] {
    REFERENCE_CHANNELS
}

impl MemberSpec {
    pub fn drn_config(&self) -> DrnConfig {
        DrnConfig {
            arch: self.arch,
            in_channels: self.input.channels(),
            channels: self.channels,
            pooling: self.pooling,
            map_head: self.map_head,
            attention: self.attention,
        }
    }
}

/// The file as written: `[transform].size` may be absent (then it is `input_size`), which a
/// plain `TransformConfig` default (1024) could not tell apart from an explicit 1024.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    name: String,
    model_version: String,
    trained: bool,
    input_size: usize,
    model_card: String,
    #[serde(default)]
    null_model: bool,
    #[serde(default)]
    transform: RawTransform,
    #[serde(default)]
    thresholds: Thresholds,
    #[serde(default)]
    members: Vec<MemberSpec>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTransform {
    size: Option<usize>,
    crop_threshold: Option<f32>,
    lcn_window: Option<usize>,
    lcn_sigma: Option<f32>,
}

/// What is wrong with a manifest's text; [`ModelError::Manifest`] adds the file.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{0}")]
    Toml(#[from] toml::de::Error),
    #[error("model_version is empty; every finding records it, so set one")]
    EmptyModelVersion,
    #[error("input_size {0} must be a positive multiple of 8 (the networks' output stride)")]
    InputSize(usize),
    #[error(
        "[transform] size {size} differs from input_size {input_size}; the transform must \
         produce the input the networks were trained on: remove size from [transform] or make \
         them equal"
    )]
    TransformSize { size: usize, input_size: usize },
    #[error("[transform]: {0}")]
    Transform(Box<ModelError>),
    /// `key` is `default_score`, `default_map`, or `score.REGION` / `map.REGION`.
    #[error("thresholds.{key} = {value} is not a probability in [0, 1]")]
    Threshold { key: String, value: f32 },
    #[error(
        "null_model = true is for benchmarks only: it must say trained = false and have no \
         [[members]]"
    )]
    NullModelWithMembers,
    #[error("no [[members]]: an ensemble needs at least one network")]
    NoMembers,
    #[error("two members are named {0:?}; names must be unique")]
    DuplicateMember(String),
    #[error(
        "member {member}: sha256 {sha256:?} is not 64 hex digits; compute it with \
         `sha256sum {}`",
        weights.display()
    )]
    Sha256 {
        member: String,
        sha256: String,
        weights: PathBuf,
    },
    #[error("member {0}: weights path is empty")]
    EmptyWeightsPath(String),
    #[error("member {member}: {error}")]
    Member {
        member: String,
        error: Box<ModelError>,
    },
}

/// Reads and validates a manifest; its folder becomes [`Manifest::dir`].
pub fn load(path: &Path) -> Result<Manifest, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    Manifest::from_toml(&text, dir).map_err(|e| match e {
        ModelError::Manifest { reason, .. } => ModelError::Manifest {
            path: path.to_path_buf(),
            reason,
        },
        other => other,
    })
}

impl Manifest {
    /// Parses and validates manifest text; weight paths resolve against `dir`.
    pub fn from_toml(text: &str, dir: PathBuf) -> Result<Manifest, ModelError> {
        let invalid = |reason: ManifestError| ModelError::Manifest {
            path: PathBuf::from("<text>"),
            reason,
        };
        let raw: RawManifest = toml::from_str(text).map_err(|e| invalid(e.into()))?;
        let defaults = TransformConfig::default();
        let transform = TransformConfig {
            size: raw.transform.size.unwrap_or(raw.input_size),
            crop_threshold: raw
                .transform
                .crop_threshold
                .unwrap_or(defaults.crop_threshold),
            lcn_window: raw.transform.lcn_window.unwrap_or(defaults.lcn_window),
            lcn_sigma: raw.transform.lcn_sigma.unwrap_or(defaults.lcn_sigma),
        };
        let manifest = Manifest {
            name: raw.name,
            model_version: raw.model_version,
            trained: raw.trained,
            input_size: raw.input_size,
            model_card: raw.model_card,
            null_model: raw.null_model,
            transform,
            thresholds: raw.thresholds,
            members: raw.members,
            dir,
        };
        manifest.validate().map_err(invalid)?;
        Ok(manifest)
    }

    fn validate(&self) -> Result<(), ManifestError> {
        if self.model_version.trim().is_empty() {
            return Err(ManifestError::EmptyModelVersion);
        }
        if self.input_size == 0 || !self.input_size.is_multiple_of(8) {
            return Err(ManifestError::InputSize(self.input_size));
        }
        if self.transform.size != self.input_size {
            return Err(ManifestError::TransformSize {
                size: self.transform.size,
                input_size: self.input_size,
            });
        }
        self.transform
            .validate()
            .map_err(|e| ManifestError::Transform(Box::new(e)))?;

        let t = &self.thresholds;
        let in_unit = |v: f32| (0.0..=1.0).contains(&v);
        let out_of_unit = |key: String, value: f32| ManifestError::Threshold { key, value };
        for (what, v) in [
            ("default_score", t.default_score),
            ("default_map", t.default_map),
        ] {
            if !in_unit(v) {
                return Err(out_of_unit(what.into(), v));
            }
        }
        for (table, map) in [("score", &t.score), ("map", &t.map)] {
            for (region, &v) in map {
                if !in_unit(v) {
                    return Err(out_of_unit(format!("{table}.{region}"), v));
                }
            }
        }

        if self.null_model {
            if self.trained || !self.members.is_empty() {
                return Err(ManifestError::NullModelWithMembers);
            }
            return Ok(());
        }
        if self.members.is_empty() {
            return Err(ManifestError::NoMembers);
        }
        let mut names = HashSet::new();
        for m in &self.members {
            if !names.insert(m.name.as_str()) {
                return Err(ManifestError::DuplicateMember(m.name.clone()));
            }
            if m.sha256.len() != 64 || !m.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(ManifestError::Sha256 {
                    member: m.name.clone(),
                    sha256: m.sha256.clone(),
                    weights: m.weights.clone(),
                });
            }
            if m.weights.as_os_str().is_empty() {
                return Err(ManifestError::EmptyWeightsPath(m.name.clone()));
            }
            m.drn_config()
                .validate()
                .map_err(|e| ManifestError::Member {
                    member: m.name.clone(),
                    error: Box::new(e),
                })?;
        }
        Ok(())
    }

    /// The score threshold of `region`, else the default.
    pub fn score_threshold(&self, region: &str) -> f32 {
        self.thresholds
            .score
            .get(region)
            .copied()
            .unwrap_or(self.thresholds.default_score)
    }

    /// The map-binarisation threshold of `region`, else the default.
    pub fn map_threshold(&self, region: &str) -> f32 {
        self.thresholds
            .map
            .get(region)
            .copied()
            .unwrap_or(self.thresholds.default_map)
    }

    /// Where the member's weights file is.
    pub fn weights_path(&self, member: &MemberSpec) -> PathBuf {
        self.dir.join(&member.weights)
    }

    /// Side of the members' probability maps: the networks' output stride is 8.
    pub fn map_size(&self) -> usize {
        self.input_size.div_ceil(8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    fn text(extra_top: &str, member_extra: &str) -> String {
        format!(
            r#"
name = "t"
model_version = "t-1"
trained = false
input_size = 256
model_card = "card"
{extra_top}
[transform]
lcn_window = 9

[thresholds]
default_score = 0.4
default_map = 0.6
[thresholds.score]
wrist = 0.3
[thresholds.map]
hip = 0.7

[[members]]
name = "m1"
arch = "drn_d_22"
input = "raw"
map_head = true
channels = [8, 8, 16, 16, 32, 32, 32, 32]
weights = "m1.safetensors"
sha256 = "{SHA}"
{member_extra}
"#
        )
    }

    #[test]
    fn parses_and_resolves() {
        let m = Manifest::from_toml(&text("", ""), PathBuf::from("/models/x")).expect("valid");
        assert_eq!(m.transform.size, 256);
        assert_eq!(m.transform.lcn_window, 9);
        assert_eq!(m.score_threshold("wrist"), 0.3);
        assert_eq!(m.score_threshold("knee"), 0.4);
        assert_eq!(m.map_threshold("hip"), 0.7);
        assert_eq!(m.map_threshold("wrist"), 0.6);
        assert_eq!(
            m.weights_path(&m.members[0]),
            PathBuf::from("/models/x/m1.safetensors")
        );
        let c = m.members[0].drn_config();
        assert_eq!(
            (c.in_channels, c.pooling, c.attention),
            (1, Pooling::Avg, false)
        );
        assert_eq!(m.map_size(), 32);
    }

    fn refused(t: &str) -> String {
        match Manifest::from_toml(t, PathBuf::new()) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("accepted:\n{t}"),
        }
    }

    #[test]
    fn refuses_unknown_fields() {
        assert!(refused(&text("colour = 1", "")).contains("colour"));
        assert!(refused(&text("", "dropout = 0.1")).contains("dropout"));
        assert!(
            refused(&text("", "").replace("lcn_window = 9", "lcn_windw = 9")).contains("lcn_windw")
        );
    }

    #[test]
    fn refuses_bad_values() {
        assert!(refused(&text("", "").replace("wrist = 0.3", "wrist = 1.3")).contains("wrist"));
        assert!(
            refused(&text("", "").replace("lcn_window = 9", "size = 512")).contains("input_size")
        );
        assert!(
            refused(&text("", "").replace("input_size = 256", "input_size = 250"))
                .contains("multiple of 8")
        );
        assert!(refused(&text("", "").replace(SHA, "abc")).contains("sha256"));
        let no_members = text("", "")
            .split("[[members]]")
            .next()
            .map(str::to_string)
            .unwrap_or_default();
        assert!(refused(&no_members).contains("at least one"));
        let twice = format!(
            "{}\n[[members]]{}",
            text("", ""),
            text("", "").split("[[members]]").nth(1).unwrap_or_default()
        );
        assert!(refused(&twice).contains("unique"));
    }

    #[test]
    fn an_explicit_matching_size_is_accepted() {
        let t = text("", "").replace("lcn_window = 9", "size = 256");
        assert!(Manifest::from_toml(&t, PathBuf::new()).is_ok());
    }
}
