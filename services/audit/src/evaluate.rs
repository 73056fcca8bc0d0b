//! The paper's evaluation (Jones et al. 2020): AUC, sensitivity, specificity, PPV and NPV with 95% CIs, overall, per region and per subgroup.
//!
//! Predictions are `fracture scan`'s `findings.jsonl`; labels a CSV with one row per box
//! (`sop_instance_uid,region,fracture,x0,y0,x1,y1`, optionally `disagreement` and the fracture-type
//! indicators `callus,displacement,angulation,comminution,lucent_line`). Sensitivity and specificity
//! get Wilson intervals; AUC, PPV and NPV a stratified percentile bootstrap.

mod input;
mod report;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use input::{pseudonymise_labels, ReferenceRead};
pub use report::{to_html, to_markdown};
// Part of the evaluation's API (its tests call them here); the one implementation is shared.
pub use fracture_shared::stats::{auc, wilson, Z95};

use fracture_shared::stats::{self, fnv1a, mix64, percentile_ci, Item, Prepared};
use input::{Label, Prediction, INDICATORS};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}, line {line}: {message}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{} {message}", path.display())]
    File { path: PathBuf, message: String },
    #[error(
        "none of the {predictions} predictions in {} has a label in {} (joined by sop_instance_uid, {labels} labelled radiographs); check that the two files describe the same radiographs",
        predictions_path.display(),
        labels_path.display()
    )]
    NoOverlap {
        predictions_path: PathBuf,
        labels_path: PathBuf,
        predictions: usize,
        labels: usize,
    },
}

/// How to evaluate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalOptions {
    /// Bootstrap resamples for the AUC, PPV and NPV intervals (the paper's m = 1000); 0 skips them.
    pub bootstrap: usize,
    /// Seeds the bootstrap: the same seed and inputs give the same intervals.
    pub seed: u64,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            bootstrap: 1000,
            seed: 2020,
        }
    }
}

/// A proportion or AUC with its 95% interval. Undefined metrics have `value: null` and a `reason`;
/// a defined value whose interval could not be had has `ci: null` and a `reason` for that.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    pub value: Option<f64>,
    pub ci: Option<[f64; 2]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Metric {
    fn undefined(reason: impl Into<String>) -> Self {
        Self {
            value: None,
            ci: None,
            reason: Some(reason.into()),
        }
    }

    fn defined(value: f64, ci: Result<(f64, f64), String>) -> Self {
        match ci {
            Ok((lo, hi)) => Self {
                value: Some(value),
                ci: Some([lo, hi]),
                reason: None,
            },
            Err(reason) => Self {
                value: Some(value),
                ci: None,
                reason: Some(reason),
            },
        }
    }
}

/// All metrics of one population of radiographs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub n: u64,
    pub positives: u64,
    pub auc: Metric,
    pub sensitivity: Metric,
    pub specificity: Metric,
    pub ppv: Metric,
    pub npv: Metric,
}

/// The no-disagreement population: its metrics and its regions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Population {
    #[serde(flatten)]
    pub metrics: Metrics,
    pub regions: BTreeMap<String, Metrics>,
}

/// A fracture-type subgroup: all negatives and the positives without one indicator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TypeMetrics {
    pub n: u64,
    pub positives: u64,
    pub auc: Metric,
    pub sensitivity: Metric,
}

/// Subgroups the labels allow: `no_disagreement` and `without_<indicator>` keys.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Subgroups {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_disagreement: Option<Population>,
    /// Keyed `without_callus`, `without_lucent_line`...
    #[serde(flatten)]
    pub without: BTreeMap<String, TypeMetrics>,
}

/// Radiographs left out of every metric because the two files do not both have them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Excluded {
    pub predictions_without_label: u64,
    pub labels_without_prediction: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapInfo {
    pub resamples: usize,
    pub seed: u64,
}

/// The whole evaluation; serialises to the report's JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub overall: Metrics,
    pub regions: BTreeMap<String, Metrics>,
    pub subgroups: Subgroups,
    pub excluded: Excluded,
    pub bootstrap: BootstrapInfo,
}

/// A prediction joined with its label.
struct Joined {
    uid: String,
    region: String,
    item: Item,
    disagreement: Option<bool>,
    indicators: [bool; 5],
}

/// Evaluates `predictions` (findings JSONL) against `labels` (CSV), joined by SOP Instance UID.
pub fn evaluate(
    predictions: &Path,
    labels: &Path,
    opts: &EvalOptions,
) -> Result<Evaluation, EvalError> {
    let preds = input::read_predictions(predictions)?;
    let labs = input::read_labels(labels)?;
    let (joined, excluded) = join(preds, &labs);
    if joined.is_empty() {
        return Err(EvalError::NoOverlap {
            predictions_path: predictions.to_path_buf(),
            labels_path: labels.to_path_buf(),
            predictions: excluded.predictions_without_label as usize,
            labels: labs.by_uid.len(),
        });
    }
    // The bootstrap packs a tie-group index into 31 bits.
    if joined.len() >= 1 << 31 {
        return Err(EvalError::File {
            path: predictions.to_path_buf(),
            message: format!(
                "joins {} radiographs, more than the 2^31 one evaluation handles; evaluate it in parts",
                joined.len()
            ),
        });
    }
    if excluded.predictions_without_label > 0 || excluded.labels_without_prediction > 0 {
        tracing::warn!(
            predictions_without_label = excluded.predictions_without_label,
            labels_without_prediction = excluded.labels_without_prediction,
            "radiographs in only one of the two files are excluded from the evaluation"
        );
    }

    let all: Vec<&Joined> = joined.iter().collect();
    let overall = metrics(&all, "overall", opts);
    let regions = by_region(&all, "region", opts);

    let mut subgroups = Subgroups::default();
    if labs.has_disagreement {
        let agreed: Vec<&Joined> = joined
            .iter()
            .filter(|j| j.disagreement == Some(false))
            .collect();
        subgroups.no_disagreement = Some(Population {
            metrics: metrics(&agreed, "no_disagreement", opts),
            regions: by_region(&agreed, "no_disagreement/region", opts),
        });
    }
    for (k, name) in INDICATORS.iter().enumerate() {
        if !labs.has_indicator[k] {
            continue;
        }
        let key = format!("without_{name}");
        let rows: Vec<&Joined> = joined
            .iter()
            .filter(|j| !j.item.truth || !j.indicators[k])
            .collect();
        let m = metrics(&rows, &key, opts);
        subgroups.without.insert(
            key,
            TypeMetrics {
                n: m.n,
                positives: m.positives,
                auc: m.auc,
                sensitivity: m.sensitivity,
            },
        );
    }

    Ok(Evaluation {
        overall,
        regions,
        subgroups,
        excluded,
        bootstrap: BootstrapInfo {
            resamples: opts.bootstrap,
            seed: opts.seed,
        },
    })
}

fn join(preds: Vec<Prediction>, labels: &input::Labels) -> (Vec<Joined>, Excluded) {
    let mut joined = Vec::with_capacity(preds.len());
    let mut matched: HashSet<&str> = HashSet::new();
    let mut without_label = 0u64;
    for p in preds {
        let Some((uid, label)) = labels.by_uid.get_key_value(&p.uid) else {
            without_label += 1;
            continue;
        };
        matched.insert(uid.as_str());
        let Label {
            region,
            fracture,
            disagreement,
            indicators,
        } = label;
        let region = p
            .region
            .or_else(|| (!region.is_empty()).then(|| region.clone()))
            .unwrap_or_else(|| "unknown".to_string());
        joined.push(Joined {
            uid: p.uid,
            region,
            item: Item {
                score: p.score,
                truth: *fracture,
                call: p.call,
            },
            disagreement: *disagreement,
            indicators: *indicators,
        });
    }
    let excluded = Excluded {
        predictions_without_label: without_label,
        labels_without_prediction: (labels.by_uid.len() - matched.len()) as u64,
    };
    (joined, excluded)
}

fn by_region(rows: &[&Joined], prefix: &str, opts: &EvalOptions) -> BTreeMap<String, Metrics> {
    let mut groups: BTreeMap<&str, Vec<&Joined>> = BTreeMap::new();
    for j in rows {
        groups.entry(j.region.as_str()).or_default().push(j);
    }
    groups
        .into_iter()
        .map(|(region, rows)| {
            let m = metrics(&rows, &format!("{prefix}/{region}"), opts);
            (region.to_string(), m)
        })
        .collect()
}

/// The metrics of one population. `key` names the population so that each draws its own
/// bootstrap stream from the seed, independent of which other populations exist.
fn metrics(rows: &[&Joined], key: &str, opts: &EvalOptions) -> Metrics {
    // Score order, ties by UID: the resamples then do not depend on the order of the input files.
    let mut sorted = rows.to_vec();
    sorted.sort_by(|a, b| {
        a.item
            .score
            .total_cmp(&b.item.score)
            .then_with(|| a.uid.cmp(&b.uid))
    });
    let items: Vec<Item> = sorted.iter().map(|j| j.item).collect();
    let n = items.len() as u64;
    let count = |f: fn(&Item) -> bool| items.iter().filter(|i| f(i)).count() as u64;
    let positives = count(|i| i.truth);
    let negatives = n - positives;
    let tp = count(|i| i.truth && i.call);
    let fp = count(|i| !i.truth && i.call);
    let (fn_, tn) = (positives - tp, negatives - fp);

    let samples = if n > 0 && opts.bootstrap > 0 {
        Prepared::new(&items).bootstrap(opts.bootstrap, mix64(opts.seed ^ fnv1a(key)))
    } else {
        Vec::new()
    };
    let boot_ci = |pick: fn(&stats::Sample) -> Option<f64>| -> Result<(f64, f64), String> {
        if opts.bootstrap == 0 {
            return Err("no interval: bootstrap resamples set to 0".into());
        }
        percentile_ci(samples.iter().filter_map(pick).collect())
            .ok_or_else(|| "no interval: undefined in every bootstrap resample".into())
    };
    let wilson_ci = |k: u64, total: u64| {
        wilson(k, total).ok_or_else(|| "no interval: empty denominator".to_string())
    };

    let auc_metric = if n == 0 {
        Metric::undefined("no radiographs in this population")
    } else if positives == 0 {
        Metric::undefined(format!("no positive radiographs among the {n}"))
    } else if negatives == 0 {
        Metric::undefined(format!("no negative radiographs among the {n}"))
    } else {
        let scores: Vec<f64> = items.iter().map(|i| i.score).collect();
        let truth: Vec<bool> = items.iter().map(|i| i.truth).collect();
        match auc(&scores, &truth) {
            Some(v) => Metric::defined(v, boot_ci(|s| s.auc)),
            None => Metric::undefined("scores cannot be ranked"),
        }
    };
    let sensitivity = if positives == 0 {
        Metric::undefined("no positive radiographs: sensitivity needs at least one")
    } else {
        Metric::defined(tp as f64 / positives as f64, wilson_ci(tp, positives))
    };
    let specificity = if negatives == 0 {
        Metric::undefined("no negative radiographs: specificity needs at least one")
    } else {
        Metric::defined(tn as f64 / negatives as f64, wilson_ci(tn, negatives))
    };
    let ppv = if tp + fp == 0 {
        Metric::undefined("no radiograph called positive: PPV needs at least one")
    } else {
        Metric::defined(tp as f64 / (tp + fp) as f64, boot_ci(|s| s.ppv))
    };
    let npv = if tn + fn_ == 0 {
        Metric::undefined("no radiograph called negative: NPV needs at least one")
    } else {
        Metric::defined(tn as f64 / (tn + fn_) as f64, boot_ci(|s| s.npv))
    };
    Metrics {
        n,
        positives,
        auc: auc_metric,
        sensitivity,
        specificity,
        ppv,
        npv,
    }
}
