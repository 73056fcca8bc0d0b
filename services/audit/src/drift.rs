//! Post-deployment drift detection: rolling per-key performance, a CUSUM on missed fractures, score PSI and label delay, one alert per episode.
//
// Pure: no I/O and no clock of its own. The sink feeds it findings (and, later, the same findings
// with their labels) in time order; the stream's own timestamps are the clock.
//
// Keys: every case counts for its region, its (region, site) and its (region, model version).
//
// Episodes: the rules fall into three families, one open alert per (key, family) at most.
// - Performance: the sensitivity-floor rule and the missed-fracture CUSUM watch the same thing (are
//   fractures being missed?), so they share one episode per key. The first rule to fire is emitted;
//   the other one crossing later is folded into the open alert's message, not emitted, because a
//   quality team wants one page per problem, not one per statistic. The episode closes only when
//   both rules have cleared.
// - ScoreShift (PSI) and LabelDelay are different problems (the input changed; the labels stopped
//   coming) with their own episodes.
// A site or model-version key that crosses while its region already has an open alert of the same
// family is folded into the region's alert (it is the same problem seen in part). If the region's
// alert clears while the sub-key's has not, the sub-key's alert is emitted then, so nothing
// outstanding goes unreported.

use std::collections::{BTreeMap, HashMap, VecDeque};

use fracture_shared::stats::{auc, wilson};
use serde::{Deserialize, Serialize};

use crate::evaluate::Metric;

const DAY_MS: i64 = 86_400_000;

/// Proportions below this count as this in the PSI, so an empty bin gives a large but finite term.
const PSI_EPSILON: f64 = 1e-4;

/// One finding as the sink knows it: labelled when `label` is `Some`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Case {
    pub sop_instance_uid: String,
    pub site: String,
    pub region: String,
    pub model_version: String,
    pub score: f64,
    pub called_positive: bool,
    /// The reference standard: `Some(true)` for a fracture.
    pub label: Option<bool>,
    /// When the finding was recorded (ms since the Unix epoch).
    pub recorded_ms: i64,
    /// When the label was recorded; `None` with a label means "as of this case".
    pub labelled_ms: Option<i64>,
}

/// `[audit.drift]`: when drift is worth telling a quality team about.
///
/// The defaults were worked out for a region that reads ~60 labelled radiographs a day at a
/// fracture prevalence near 30% with a model calibrated to 92.5% sensitivity; see each field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DriftConfig {
    /// Rolling window: the last this many labelled cases per key (and no older than
    /// `window_days`). 2000 rather than a few hundred because the floor rule needs
    /// `min_positives` positives inside it (≈600 at 30% prevalence). Also caps the window the
    /// snapshot's sensitivity, specificity and PPV are computed over.
    pub window_cases: usize,
    /// Rolling window in days, by the time findings were recorded: old cases leave it even when
    /// few new ones come.
    pub window_days: u32,
    /// The sensitivity the decision threshold was calibrated to. The CUSUM's in-control miss
    /// rate is `1 - target_sensitivity`.
    pub target_sensitivity: f64,
    /// The floor is `target_sensitivity - floor_margin` (0.875 by default).
    pub floor_margin: f64,
    /// The floor rule re-arms once the Wilson lower bound is back above `floor + floor_hysteresis`,
    /// so a bound that wobbles around the floor is one episode, not many.
    pub floor_hysteresis: f64,
    /// The floor rule (Wilson lower bound of sensitivity below the floor) may fire only with at
    /// least this many labelled positives in the window. Below ~500 the bound is too wide to
    /// clear the floor even when all is well: at a true sensitivity of 95% the bound falls
    /// below 0.875 with probability 0.58 at 60 positives, 0.044 at 200, 1.4e-4 at 400 and 7.7e-6
    /// at 500 (exact binomial). At a true sensitivity equal to the target (92.5%) it is still
    /// 0.035 at 500: a key that runs exactly at target needs more positives (≈800 for 0.003)
    /// before this rule is quiet, and the CUSUM is the faster detector anyway.
    pub min_positives: u64,
    /// The CUSUM's out-of-control miss rate is `cusum_miss_ratio × (1 - target_sensitivity)`:
    /// 2 means "twice as many missed fractures as calibrated" (sensitivity 85% from 92.5%).
    pub cusum_miss_ratio: f64,
    /// Decision limit h of the Bernoulli CUSUM (log-likelihood ratio, one step per labelled
    /// positive: +ln 2 for a miss, -0.0846 for a hit with the defaults). With h = 6 the average
    /// run length (Markov chain, in labelled positives) is ≈20,000 at the calibrated 92.5%
    /// sensitivity (a false alarm within 750 positives, a busy region's month, with probability
    /// 0.03), ≈2.6 million at 95%, ≈165 at 85% and ≈82 at 80% (99.9% of runs within 266).
    /// h = 5 would detect ~15% sooner but triple the false alarms at the calibrated rate. After
    /// firing it restarts only once the mirror-image CUSUM (evidence for the calibrated miss
    /// rate) has reached h too.
    pub cusum_h: f64,
    /// Population stability index of the score distribution versus the region's reference
    /// above which a shift is reported (0.2 is the conventional "significant shift").
    pub psi_limit: f64,
    /// The PSI rule re-arms below this (0.1, the conventional "no shift").
    pub psi_rearm: f64,
    /// PSI bins, cut at the reference's quantiles.
    pub psi_bins: usize,
    /// The PSI compares the last this many findings per key (labelled or not, within
    /// `window_days`) with the reference: smaller reacts faster, larger is steadier.
    pub psi_window: usize,
    /// No PSI below this many findings: with 10 bins the PSI of n draws from the reference
    /// itself is ≈ χ²₉/n, so at 200 it exceeds 0.2 with probability ≈1e-5.
    pub psi_min_scores: usize,
    /// A finding is overdue for a label this many days after it was recorded.
    pub label_delay_days: u32,
    /// Fraction of overdue findings (recorded more than `label_delay_days` ago, within
    /// `window_days`) still without a label above which a label delay is reported: the other
    /// rules are blind to those cases.
    pub label_delay_limit: f64,
    /// The label-delay rule re-arms once the fraction is at or below this.
    pub label_delay_rearm: f64,
    /// The label-delay rule needs at least this many overdue findings, so that 1 of 2 is not 50%.
    pub label_delay_min_due: u64,
}

impl Default for DriftConfig {
    fn default() -> Self {
        Self {
            window_cases: 2000,
            window_days: 30,
            target_sensitivity: 0.925,
            floor_margin: 0.05,
            floor_hysteresis: 0.01,
            min_positives: 500,
            cusum_miss_ratio: 2.0,
            cusum_h: 6.0,
            psi_limit: 0.2,
            psi_rearm: 0.1,
            psi_bins: 10,
            psi_window: 500,
            psi_min_scores: 200,
            label_delay_days: 14,
            label_delay_limit: 0.2,
            label_delay_rearm: 0.1,
            label_delay_min_due: 20,
        }
    }
}

/// What is wrong with a [`DriftConfig`], every problem at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("drift configuration: {0}")]
pub struct DriftConfigError(pub String);

impl DriftConfig {
    /// Checks the values; [`DriftMonitor::new`] does not, so call this where the configuration is
    /// loaded. Nonsense values make a rule inert rather than panic.
    pub fn validate(&self) -> Result<(), DriftConfigError> {
        let mut problems = Vec::new();
        let t = self.target_sensitivity;
        if !(t > 0.0 && t < 1.0) {
            problems.push(format!("target_sensitivity = {t} must be in (0, 1)"));
        }
        if !(self.floor_margin >= 0.0 && self.floor_margin < t) {
            problems.push(format!(
                "floor_margin = {} must be in [0, target_sensitivity)",
                self.floor_margin
            ));
        }
        if self.floor_hysteresis.is_nan() || self.floor_hysteresis < 0.0 {
            problems.push(format!(
                "floor_hysteresis = {} must be >= 0",
                self.floor_hysteresis
            ));
        }
        if self.window_cases == 0 || self.window_days == 0 {
            problems.push("window_cases and window_days must be > 0".into());
        }
        let p1 = self.cusum_miss_ratio * (1.0 - t);
        if !(self.cusum_miss_ratio > 1.0 && p1 < 1.0) {
            problems.push(format!(
                "cusum_miss_ratio = {} must be > 1 with cusum_miss_ratio × (1 - target_sensitivity) < 1",
                self.cusum_miss_ratio
            ));
        }
        if self.cusum_h.is_nan() || self.cusum_h <= 0.0 {
            problems.push(format!("cusum_h = {} must be > 0", self.cusum_h));
        }
        if self.psi_bins < 2 {
            problems.push(format!("psi_bins = {} must be >= 2", self.psi_bins));
        }
        if !(self.psi_limit > 0.0 && self.psi_rearm >= 0.0 && self.psi_rearm <= self.psi_limit) {
            problems.push(format!(
                "need 0 <= psi_rearm ({}) <= psi_limit ({}), psi_limit > 0",
                self.psi_rearm, self.psi_limit
            ));
        }
        if self.psi_window == 0 || self.psi_min_scores > self.psi_window {
            problems.push(format!(
                "psi_min_scores ({}) must be <= psi_window ({}), psi_window > 0",
                self.psi_min_scores, self.psi_window
            ));
        }
        if self.label_delay_days >= self.window_days {
            problems.push(format!(
                "label_delay_days ({}) must be < window_days ({}): only findings inside the window are followed",
                self.label_delay_days, self.window_days
            ));
        }
        let (l, r) = (self.label_delay_limit, self.label_delay_rearm);
        if !(l > 0.0 && l < 1.0 && r >= 0.0 && r <= l) {
            problems.push(format!(
                "need 0 <= label_delay_rearm ({r}) <= label_delay_limit ({l}) < 1, label_delay_limit > 0"
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(DriftConfigError(problems.join("; ")))
        }
    }

    fn floor(&self) -> f64 {
        self.target_sensitivity - self.floor_margin
    }
}

/// Which rule fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// The Wilson lower bound of the window's sensitivity fell below the floor.
    SensitivityFloor,
    /// The CUSUM on missed fractures crossed its decision limit.
    Cusum,
    /// The score distribution moved away from the reference (PSI).
    ScoreShift,
    /// Too many findings are overdue for a label.
    LabelDelay,
}

impl AlertKind {
    /// The serialised name: `sensitivity_floor`, `cusum`, `score_shift`, `label_delay`.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::SensitivityFloor => "sensitivity_floor",
            AlertKind::Cusum => "cusum",
            AlertKind::ScoreShift => "score_shift",
            AlertKind::LabelDelay => "label_delay",
        }
    }
}

impl std::fmt::Display for AlertKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One alert: emitted once when its episode opens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftAlert {
    pub kind: AlertKind,
    pub region: String,
    /// Set for a (region, site) key.
    pub site: Option<String>,
    /// Set for a (region, model version) key.
    pub model_version: Option<String>,
    /// What was seen and why it matters, for a quality team.
    pub message: String,
    /// 0-based index of the `observe` call that triggered it; for a label-delay check, of the
    /// last case observed before it.
    pub at_case: u64,
}

/// Per-key statistics over the rolling window, for dashboards and gauges.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyStats {
    pub region: String,
    pub site: Option<String>,
    pub model_version: Option<String>,
    /// Findings (labelled or not) in the score window.
    pub findings: u64,
    /// Labelled cases in the window.
    pub labelled: u64,
    pub positives: u64,
    /// With its 95% Wilson interval.
    pub sensitivity: Metric,
    /// With its 95% Wilson interval.
    pub specificity: Metric,
    /// With its 95% Wilson interval (over the window's positive calls).
    pub ppv: Metric,
    /// Over the window's labelled cases; `None` without both classes.
    pub auc: Option<f64>,
    /// `target_sensitivity - floor_margin`.
    pub floor: f64,
    /// Mean score over the score window.
    pub score_mean: Option<f64>,
    /// Versus the region's reference, once the score window holds `psi_min_scores`.
    pub psi: Option<f64>,
    /// The missed-fracture CUSUM now (0 while it is recovering after an alert).
    pub cusum: f64,
    pub cusum_h: f64,
    /// Overdue findings without a label, as of the last `check_label_delay`.
    pub label_delay: Option<f64>,
    pub alert_open: bool,
    /// The kinds of this key's open alerts (including those folded into its region's).
    pub open_kinds: Vec<AlertKind>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    region: String,
    site: Option<String>,
    model_version: Option<String>,
}

impl Key {
    fn region(region: &str) -> Self {
        Self {
            region: region.to_owned(),
            site: None,
            model_version: None,
        }
    }

    fn is_region(&self) -> bool {
        self.site.is_none() && self.model_version.is_none()
    }

    fn describe(&self) -> String {
        match (&self.site, &self.model_version) {
            (Some(s), _) => format!("{} at site {s}", self.region),
            (None, Some(v)) => format!("{} on model {v}", self.region),
            (None, None) => format!("{} (all sites, all model versions)", self.region),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Performance = 0,
    ScoreShift = 1,
    LabelDelay = 2,
}

#[derive(Debug, Clone)]
struct Open {
    alert: DriftAlert,
    /// Reported inside the region's alert rather than on its own.
    folded: bool,
    /// Kinds of rule that have fired in this episode, for `open_kinds`.
    kinds: Vec<AlertKind>,
}

#[derive(Debug, Clone)]
enum Event {
    Open(Key, Family, DriftAlert),
    Also(Key, Family, AlertKind, String),
    Close(Key, Family),
}

#[derive(Debug, Clone, Copy)]
struct Labelled {
    recorded_ms: i64,
    score: f64,
    called: bool,
    label: bool,
}

#[derive(Debug, Clone)]
struct Reference {
    /// Strictly increasing inner cut points: bin = number of edges below the score, so bins are
    /// (-inf, e1], (e1, e2], ... and a score tied with a cut point joins the bin below it.
    edges: Vec<f64>,
    /// Share of the reference in each bin.
    expected: Vec<f64>,
    mean: f64,
    n: usize,
}

impl Reference {
    fn new(scores: &[f64], bins: usize) -> Option<Self> {
        let mut s: Vec<f64> = scores.iter().copied().filter(|x| x.is_finite()).collect();
        if s.is_empty() {
            return None;
        }
        s.sort_unstable_by(f64::total_cmp);
        let n = s.len();
        let mut edges: Vec<f64> = Vec::with_capacity(bins.saturating_sub(1));
        for i in 1..bins.max(1) {
            // The cut closes the lower bin, so it is the last of the lower i/bins of the scores.
            let q = s[(i * n / bins).saturating_sub(1).min(n - 1)];
            // Ties in the reference give equal quantiles; a repeated cut would be an empty bin.
            if edges.last().is_none_or(|&e| q > e) {
                edges.push(q);
            }
        }
        let mut counts = vec![0u64; edges.len() + 1];
        for &x in &s {
            counts[bin_of(&edges, x)] += 1;
        }
        let expected = counts.iter().map(|&c| c as f64 / n as f64).collect();
        Some(Self {
            edges,
            expected,
            mean: s.iter().sum::<f64>() / n as f64,
            n,
        })
    }
}

fn bin_of(edges: &[f64], x: f64) -> usize {
    edges.partition_point(|&e| e < x)
}

fn psi(counts: &[u64], expected: &[f64]) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 || counts.len() != expected.len() {
        return None;
    }
    Some(
        counts
            .iter()
            .zip(expected)
            .map(|(&c, &e)| {
                let a = (c as f64 / total as f64).max(PSI_EPSILON);
                let e = e.max(PSI_EPSILON);
                (a - e) * (a / e).ln()
            })
            .sum(),
    )
}

/// The rule parameters derived once from the configuration.
#[derive(Debug, Clone, Copy)]
struct Derived {
    floor: f64,
    p0: f64,
    p1: f64,
    /// CUSUM step for a miss: ln(p1 / p0).
    up: f64,
    /// CUSUM step for a hit, as a positive number: -ln((1 - p1) / (1 - p0)).
    down: f64,
    window_ms: i64,
}

impl Derived {
    fn new(cfg: &DriftConfig) -> Self {
        let p0 = 1.0 - cfg.target_sensitivity;
        let p1 = cfg.cusum_miss_ratio * p0;
        Self {
            floor: cfg.floor(),
            p0,
            p1,
            up: (p1 / p0).ln(),
            down: -((1.0 - p1) / (1.0 - p0)).ln(),
            window_ms: i64::from(cfg.window_days).saturating_mul(DAY_MS),
        }
    }
}

#[derive(Debug, Clone, Default)]
struct KeyState {
    labelled: VecDeque<Labelled>,
    tp: u64,
    fn_: u64,
    tn: u64,
    fp: u64,
    scores: VecDeque<(i64, f64)>,
    score_sum: f64,
    /// Counts of `scores` per reference bin; empty while the region has no reference.
    bins: Vec<u64>,
    cusum: f64,
    /// Labelled positives and misses since the CUSUM was last at zero, for the message.
    run_positives: u64,
    run_misses: u64,
    /// `Some(evidence for the calibrated miss rate)` after the CUSUM fired, until it reaches h.
    recovery: Option<f64>,
    floor_alarmed: bool,
    psi: Option<f64>,
    psi_alarmed: bool,
    label_delay: Option<f64>,
    delay_alarmed: bool,
    open: [Option<Open>; 3],
}

impl KeyState {
    fn positives(&self) -> u64 {
        self.tp + self.fn_
    }

    fn performance_alarmed(&self) -> bool {
        self.floor_alarmed || self.recovery.is_some()
    }

    fn count(&mut self, c: &Labelled, add: bool) {
        let slot = match (c.label, c.called) {
            (true, true) => &mut self.tp,
            (true, false) => &mut self.fn_,
            (false, false) => &mut self.tn,
            (false, true) => &mut self.fp,
        };
        *slot = if add {
            *slot + 1
        } else {
            slot.saturating_sub(1)
        };
    }

    /// Drops what has left the windows: too many, or recorded before `clock - window_days`.
    fn evict(&mut self, clock: i64, cfg: &DriftConfig, d: &Derived, refs: Option<&Reference>) {
        let oldest = clock.saturating_sub(d.window_ms);
        while let Some(front) = self.labelled.front().copied() {
            if self.labelled.len() <= cfg.window_cases && front.recorded_ms >= oldest {
                break;
            }
            self.labelled.pop_front();
            self.count(&front, false);
        }
        while let Some(&(t, s)) = self.scores.front() {
            if self.scores.len() <= cfg.psi_window && t >= oldest {
                break;
            }
            self.scores.pop_front();
            self.score_sum -= s;
            if let Some(r) = refs {
                if let Some(b) = self.bins.get_mut(bin_of(&r.edges, s)) {
                    *b = b.saturating_sub(1);
                }
            }
        }
    }

    fn rebin(&mut self, refs: Option<&Reference>) {
        self.bins = match refs {
            Some(r) => {
                let mut b = vec![0; r.expected.len()];
                for &(_, s) in &self.scores {
                    b[bin_of(&r.edges, s)] += 1;
                }
                b
            }
            None => Vec::new(),
        };
        self.psi = None;
    }

    fn sensitivity(&self) -> (Option<f64>, Option<(f64, f64)>) {
        let n = self.positives();
        let v = (n > 0).then(|| self.tp as f64 / n as f64);
        (v, wilson(self.tp, n))
    }

    /// The window's numbers, for messages.
    fn summary(&self, cfg: &DriftConfig, d: &Derived) -> String {
        let pos = self.positives();
        let neg = self.tn + self.fp;
        let sens = match self.sensitivity() {
            (Some(v), Some((lo, hi))) => format!(
                "sensitivity {:.1}% (95% CI {:.1}–{:.1}%, {}/{} fractures called)",
                100.0 * v,
                100.0 * lo,
                100.0 * hi,
                self.tp,
                pos
            ),
            _ => "no labelled fractures".into(),
        };
        let spec = match wilson(self.tn, neg) {
            Some((lo, hi)) => format!(
                "specificity {:.1}% ({:.1}–{:.1}%)",
                100.0 * self.tn as f64 / neg as f64,
                100.0 * lo,
                100.0 * hi
            ),
            None => "no labelled negatives".into(),
        };
        format!(
            "over the last {} labelled cases (window: {} cases, {} days) {sens}, {spec}; floor {:.1}% (target {:.1}% − margin {:.1} points)",
            self.labelled.len(),
            cfg.window_cases,
            cfg.window_days,
            100.0 * d.floor,
            100.0 * cfg.target_sensitivity,
            100.0 * cfg.floor_margin
        )
    }

    fn push_score(
        &mut self,
        key: &Key,
        (recorded_ms, score): (i64, f64),
        at: u64,
        cfg: &DriftConfig,
        refs: Option<&Reference>,
        events: &mut Vec<Event>,
    ) {
        self.scores.push_back((recorded_ms, score));
        self.score_sum += score;
        let Some(r) = refs else {
            return;
        };
        if let Some(b) = self.bins.get_mut(bin_of(&r.edges, score)) {
            *b += 1;
        }
        if self.scores.len() < cfg.psi_min_scores.max(1) {
            self.psi = None;
            return;
        }
        let Some(p) = psi(&self.bins, &r.expected) else {
            return;
        };
        self.psi = Some(p);
        if !self.psi_alarmed && p > cfg.psi_limit {
            self.psi_alarmed = true;
            let mean = self.score_sum / self.scores.len() as f64;
            let message = format!(
                "{}: score distribution shifted, PSI {p:.3} over the last {} findings versus the {}-score reference (limit {}; {} bins at the reference's quantiles); mean score {mean:.3} versus {:.3}. The threshold was calibrated on the reference, so sensitivity and specificity may no longer be what was validated: check for a new scanner, protocol, population or model before trusting the calls.",
                key.describe(),
                self.scores.len(),
                r.n,
                cfg.psi_limit,
                r.expected.len(),
                r.mean
            );
            events.push(Event::Open(
                key.clone(),
                Family::ScoreShift,
                alert(key, AlertKind::ScoreShift, message, at),
            ));
        } else if self.psi_alarmed && p < cfg.psi_rearm {
            self.psi_alarmed = false;
            events.push(Event::Close(key.clone(), Family::ScoreShift));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn push_labelled(
        &mut self,
        key: &Key,
        c: Labelled,
        in_window: bool,
        at: u64,
        cfg: &DriftConfig,
        d: &Derived,
        events: &mut Vec<Event>,
    ) {
        let before = self.performance_alarmed();
        let mut fired: Vec<(AlertKind, String)> = Vec::new();
        if in_window {
            self.labelled.push_back(c);
            self.count(&c, true);
            while self.labelled.len() > cfg.window_cases {
                if let Some(old) = self.labelled.pop_front() {
                    self.count(&old, false);
                }
            }
        }
        // The CUSUM sees every labelled positive, in label order, window or not: a late-labelled
        // miss is still a miss.
        if c.label {
            let miss = !c.called;
            match self.recovery {
                None => {
                    self.cusum = (self.cusum + if miss { d.up } else { -d.down }).max(0.0);
                    if self.cusum > 0.0 {
                        self.run_positives += 1;
                        self.run_misses += u64::from(miss);
                    } else {
                        self.run_positives = 0;
                        self.run_misses = 0;
                    }
                    if self.cusum >= cfg.cusum_h {
                        let expected = self.run_positives as f64 * d.p0;
                        fired.push((
                            AlertKind::Cusum,
                            format!(
                                "missed-fracture CUSUM crossed h = {} at case {at}: {} missed of the last {} labelled fractures (≈{expected:.1} expected at the calibrated {:.1}% sensitivity; the CUSUM tests a miss rate of {:.1}% against {:.1}%); {}",
                                cfg.cusum_h,
                                self.run_misses,
                                self.run_positives,
                                100.0 * cfg.target_sensitivity,
                                100.0 * d.p1,
                                100.0 * d.p0,
                                self.summary(cfg, d)
                            ),
                        ));
                        self.cusum = 0.0;
                        self.run_positives = 0;
                        self.run_misses = 0;
                        self.recovery = Some(0.0);
                    }
                }
                Some(r) => {
                    // The mirror CUSUM: the alarm clears on as much evidence for the calibrated
                    // miss rate as it took to raise it, so a persisting drop stays one episode.
                    let r = (r + if miss { -d.up } else { d.down }).max(0.0);
                    self.recovery = (r < cfg.cusum_h).then_some(r);
                }
            }
        }
        if self.positives() >= cfg.min_positives {
            if let Some((lo, _)) = wilson(self.tp, self.positives()) {
                if !self.floor_alarmed && lo < d.floor {
                    self.floor_alarmed = true;
                    fired.push((
                        AlertKind::SensitivityFloor,
                        format!(
                            "sensitivity floor: the 95% lower bound {:.1}% is below the floor {:.1}% with {} labelled fractures in the window, so the deployed model can no longer be shown to meet it; {}",
                            100.0 * lo,
                            100.0 * d.floor,
                            self.positives(),
                            self.summary(cfg, d)
                        ),
                    ));
                } else if self.floor_alarmed && lo >= d.floor + cfg.floor_hysteresis {
                    self.floor_alarmed = false;
                }
            }
        }
        let after = self.performance_alarmed();
        let mut fired = fired.into_iter();
        if !before {
            if let Some((kind, what)) = fired.next() {
                let message = format!(
                    "{}: {what}. Fractures may be going unreported: review recent missed cases and the threshold.",
                    key.describe()
                );
                events.push(Event::Open(
                    key.clone(),
                    Family::Performance,
                    alert(key, kind, message, at),
                ));
            }
        }
        for (kind, what) in fired {
            events.push(Event::Also(key.clone(), Family::Performance, kind, what));
        }
        if before && !after {
            events.push(Event::Close(key.clone(), Family::Performance));
        }
    }
}

fn alert(key: &Key, kind: AlertKind, message: String, at: u64) -> DriftAlert {
    DriftAlert {
        kind,
        region: key.region.clone(),
        site: key.site.clone(),
        model_version: key.model_version.clone(),
        message,
        at_case: at,
    }
}

/// A finding the monitor is following: for label delay, and so that a replay or the later
/// labelled copy of a finding does not count its score twice.
#[derive(Debug, Clone)]
struct Tracked {
    recorded_ms: i64,
    /// `Some(when)` once labelled.
    labelled_ms: Option<i64>,
    keys: [Key; 3],
}

/// The drift engine: feed it cases, read alerts and statistics.
#[derive(Debug, Clone)]
pub struct DriftMonitor {
    cfg: DriftConfig,
    derived: Derived,
    keys: BTreeMap<Key, KeyState>,
    references: HashMap<String, Reference>,
    /// By (SOP Instance UID, model version), the audit database's key.
    tracked: HashMap<(String, String), Tracked>,
    /// `tracked`'s keys in arrival order, to evict the old ones without a scan.
    arrivals: VecDeque<(i64, (String, String))>,
    /// The latest time seen: a recording, a label, or a label-delay check.
    clock: i64,
    cases: u64,
}

impl DriftMonitor {
    pub fn new(cfg: DriftConfig) -> Self {
        Self {
            derived: Derived::new(&cfg),
            cfg,
            keys: BTreeMap::new(),
            references: HashMap::new(),
            tracked: HashMap::new(),
            arrivals: VecDeque::new(),
            clock: i64::MIN,
            cases: 0,
        }
    }

    pub fn config(&self) -> &DriftConfig {
        &self.cfg
    }

    /// Sets the region's reference score distribution (its calibration scores); PSI bins are cut
    /// at its quantiles. A new reference is a new baseline: open score-shift alerts of the region
    /// close without a message. Non-finite scores are ignored; none left removes the reference.
    pub fn set_reference(&mut self, region: &str, scores: &[f64]) {
        match Reference::new(scores, self.cfg.psi_bins) {
            Some(r) => {
                self.references.insert(region.to_owned(), r);
            }
            None => {
                self.references.remove(region);
            }
        }
        let r = self.references.get(region);
        for (key, state) in self.keys.iter_mut() {
            if key.region == region {
                state.rebin(r);
                state.psi_alarmed = false;
                state.open[Family::ScoreShift as usize] = None;
            }
        }
    }

    /// Takes one finding, labelled or not, and returns the alerts it opened. The same finding
    /// again (a replay) changes nothing; its labelled copy adds the label. The first label wins.
    pub fn observe(&mut self, case: &Case) -> Vec<DriftAlert> {
        let at = self.cases;
        self.cases += 1;
        let label_ms = case
            .label
            .map(|_| case.labelled_ms.unwrap_or(case.recorded_ms));
        self.clock = self
            .clock
            .max(case.recorded_ms)
            .max(label_ms.unwrap_or(i64::MIN));
        self.evict_tracked();

        let id = (case.sop_instance_uid.clone(), case.model_version.clone());
        let (new_finding, new_label) = match self.tracked.get_mut(&id) {
            Some(t) if t.labelled_ms.is_none() && label_ms.is_some() => {
                t.labelled_ms = label_ms;
                (false, true)
            }
            Some(_) => return Vec::new(),
            None => {
                let keys = [
                    Key::region(&case.region),
                    Key {
                        region: case.region.clone(),
                        site: Some(case.site.clone()),
                        model_version: None,
                    },
                    Key {
                        region: case.region.clone(),
                        site: None,
                        model_version: Some(case.model_version.clone()),
                    },
                ];
                self.tracked.insert(
                    id.clone(),
                    Tracked {
                        recorded_ms: case.recorded_ms,
                        labelled_ms: label_ms,
                        keys,
                    },
                );
                self.arrivals.push_back((case.recorded_ms, id.clone()));
                (true, label_ms.is_some())
            }
        };
        let Some(keys) = self.tracked.get(&id).map(|t| t.keys.clone()) else {
            return Vec::new();
        };

        let in_window = case.recorded_ms >= self.clock.saturating_sub(self.derived.window_ms);
        let mut events = Vec::new();
        let Self {
            cfg,
            derived,
            keys: states,
            references,
            clock,
            ..
        } = self;
        let refs = references.get(&case.region);
        for key in &keys {
            let state = states.entry(key.clone()).or_insert_with(|| {
                let mut s = KeyState::default();
                s.rebin(refs);
                s
            });
            state.evict(*clock, cfg, derived, refs);
            // A non-finite score has no bin and no mean; the call and the label still count.
            if new_finding && in_window && case.score.is_finite() {
                state.push_score(
                    key,
                    (case.recorded_ms, case.score),
                    at,
                    cfg,
                    refs,
                    &mut events,
                );
            }
            if let (true, Some(label)) = (new_label, case.label) {
                let c = Labelled {
                    recorded_ms: case.recorded_ms,
                    score: case.score,
                    called: case.called_positive,
                    label,
                };
                state.push_labelled(key, c, in_window, at, cfg, derived, &mut events);
            }
        }
        self.apply(events, at)
    }

    /// Recomputes every key's label-delay fraction as of `now_ms` (also advancing the clock and
    /// the windows) and returns the alerts that opened.
    pub fn check_label_delay(&mut self, now_ms: i64) -> Vec<DriftAlert> {
        self.clock = self.clock.max(now_ms);
        self.evict_tracked();
        let due_before = now_ms.saturating_sub(i64::from(self.cfg.label_delay_days) * DAY_MS);
        let mut counts: HashMap<&Key, (u64, u64)> = HashMap::new();
        for t in self.tracked.values() {
            if t.recorded_ms > due_before {
                continue;
            }
            let late = t.labelled_ms.is_none_or(|l| l > now_ms);
            for k in &t.keys {
                let e = counts.entry(k).or_default();
                e.0 += 1;
                e.1 += u64::from(late);
            }
        }
        let counts: HashMap<Key, (u64, u64)> =
            counts.into_iter().map(|(k, v)| (k.clone(), v)).collect();
        let at = self.cases.saturating_sub(1);
        let mut events = Vec::new();
        let Self {
            cfg,
            derived,
            keys,
            references,
            clock,
            ..
        } = self;
        for (key, state) in keys.iter_mut() {
            state.evict(*clock, cfg, derived, references.get(&key.region));
            let (due, late) = counts.get(key).copied().unwrap_or((0, 0));
            let fraction = (due > 0).then(|| late as f64 / due as f64);
            state.label_delay = fraction;
            let f = fraction.unwrap_or(0.0);
            if !state.delay_alarmed && due >= cfg.label_delay_min_due && f > cfg.label_delay_limit {
                state.delay_alarmed = true;
                let message = format!(
                    "{}: {late} of {due} findings ({:.1}%) recorded more than {} days ago (within the {}-day window) still have no label (limit {:.0}%). The performance rules cannot see those cases, so a drop in sensitivity would surface late: chase the reference-standard reads.",
                    key.describe(),
                    100.0 * f,
                    cfg.label_delay_days,
                    cfg.window_days,
                    100.0 * cfg.label_delay_limit
                );
                events.push(Event::Open(
                    key.clone(),
                    Family::LabelDelay,
                    alert(key, AlertKind::LabelDelay, message, at),
                ));
            } else if state.delay_alarmed && f <= cfg.label_delay_rearm {
                state.delay_alarmed = false;
                events.push(Event::Close(key.clone(), Family::LabelDelay));
            }
        }
        self.apply(events, at)
    }

    /// Every key's statistics, ordered by region, then model version, then site.
    pub fn snapshot(&self) -> Vec<KeyStats> {
        self.keys
            .iter()
            .map(|(key, s)| {
                let pos = s.positives();
                let neg = s.tn + s.fp;
                let calls = s.tp + s.fp;
                let sensitivity = metric(s.tp, pos, "no labelled fractures in the window");
                let specificity = metric(s.tn, neg, "no labelled negatives in the window");
                let ppv = metric(s.tp, calls, "no labelled positive calls in the window");
                let (scores, labels): (Vec<f64>, Vec<bool>) =
                    s.labelled.iter().map(|c| (c.score, c.label)).unzip();
                let open_kinds: Vec<AlertKind> = s
                    .open
                    .iter()
                    .flatten()
                    .flat_map(|o| o.kinds.iter().copied())
                    .collect();
                KeyStats {
                    region: key.region.clone(),
                    site: key.site.clone(),
                    model_version: key.model_version.clone(),
                    findings: s.scores.len() as u64,
                    labelled: s.labelled.len() as u64,
                    positives: pos,
                    sensitivity,
                    specificity,
                    ppv,
                    auc: auc(&scores, &labels),
                    floor: self.derived.floor,
                    score_mean: (!s.scores.is_empty()).then(|| s.score_sum / s.scores.len() as f64),
                    psi: s.psi,
                    cusum: s.cusum,
                    cusum_h: self.cfg.cusum_h,
                    label_delay: s.label_delay,
                    alert_open: !open_kinds.is_empty(),
                    open_kinds,
                }
            })
            .collect()
    }

    /// The alerts whose episodes are open, as emitted plus what was folded into them since.
    pub fn open_alerts(&self) -> Vec<DriftAlert> {
        self.keys
            .values()
            .flat_map(|s| s.open.iter().flatten())
            .filter(|o| !o.folded)
            .map(|o| o.alert.clone())
            .collect()
    }

    fn evict_tracked(&mut self) {
        let oldest = self.clock.saturating_sub(self.derived.window_ms);
        while let Some((t, _)) = self.arrivals.front() {
            if *t >= oldest {
                break;
            }
            if let Some((_, id)) = self.arrivals.pop_front() {
                self.tracked.remove(&id);
            }
        }
    }

    /// Turns rule transitions into emitted alerts: regions open first, so that a sub-key crossing
    /// on the same case folds into its region; regions close last, so that a sub-key that closes
    /// on the same case is not promoted.
    fn apply(&mut self, events: Vec<Event>, at: u64) -> Vec<DriftAlert> {
        let mut out = Vec::new();
        let (region, sub): (Vec<Event>, Vec<Event>) = events.into_iter().partition(|e| match e {
            Event::Open(k, ..) | Event::Also(k, ..) | Event::Close(k, _) => k.is_region(),
        });
        let (closes, region): (Vec<Event>, Vec<Event>) = region
            .into_iter()
            .partition(|e| matches!(e, Event::Close(..)));
        for e in region.into_iter().chain(sub).chain(closes) {
            match e {
                Event::Open(key, f, a) => {
                    let parent = Key::region(&key.region);
                    let folded = !key.is_region()
                        && match self.open_mut(&parent, f) {
                            Some(p) => {
                                p.alert.message.push_str(&format!(
                                    " Also crossed ({:?}) for {} at case {}.",
                                    a.kind,
                                    key.describe(),
                                    a.at_case
                                ));
                                true
                            }
                            None => false,
                        };
                    if !folded {
                        out.push(a.clone());
                    }
                    if let Some(s) = self.keys.get_mut(&key) {
                        s.open[f as usize] = Some(Open {
                            kinds: vec![a.kind],
                            alert: a,
                            folded,
                        });
                    }
                }
                Event::Also(key, f, kind, what) => {
                    if let Some(o) = self.open_mut(&key, f) {
                        o.alert.message.push_str(&format!(" Also: {what}."));
                        if !o.kinds.contains(&kind) {
                            o.kinds.push(kind);
                        }
                    }
                }
                Event::Close(key, f) => {
                    if let Some(s) = self.keys.get_mut(&key) {
                        s.open[f as usize] = None;
                    }
                    if key.is_region() {
                        // Sub-keys that were folded into this alert and are still open get their
                        // own alert now: the region recovered, they have not.
                        for (k, s) in self.keys.iter_mut() {
                            if k.region != key.region || k.is_region() {
                                continue;
                            }
                            if let Some(o) = s.open[f as usize].as_mut().filter(|o| o.folded) {
                                o.folded = false;
                                o.alert.at_case = at;
                                o.alert.message.push_str(&format!(
                                    " (Folded into the {} alert until case {at}, when the region cleared and this did not.)",
                                    k.region
                                ));
                                out.push(o.alert.clone());
                            }
                        }
                    }
                }
            }
        }
        out
    }

    fn open_mut(&mut self, key: &Key, f: Family) -> Option<&mut Open> {
        self.keys
            .get_mut(key)
            .and_then(|s| s.open[f as usize].as_mut())
    }
}

fn metric(k: u64, n: u64, undefined: &str) -> Metric {
    match wilson(k, n) {
        Some((lo, hi)) => Metric {
            value: Some(k as f64 / n as f64),
            ci: Some([lo, hi]),
            reason: None,
        },
        None => Metric {
            value: None,
            ci: None,
            reason: Some(undefined.into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        assert_eq!(DriftConfig::default().validate(), Ok(()));
        let bad = DriftConfig {
            target_sensitivity: 1.2,
            psi_bins: 1,
            label_delay_days: 40,
            ..DriftConfig::default()
        };
        let e = bad.validate().unwrap_err().0;
        assert!(
            e.contains("target_sensitivity")
                && e.contains("psi_bins")
                && e.contains("label_delay_days")
        );
    }

    #[test]
    fn alert_kind_displays_as_it_serialises() {
        for k in [
            AlertKind::SensitivityFloor,
            AlertKind::Cusum,
            AlertKind::ScoreShift,
            AlertKind::LabelDelay,
        ] {
            assert_eq!(serde_json::to_value(k).unwrap(), k.to_string());
        }
    }

    #[test]
    fn cusum_steps_match_the_documented_ones() {
        let d = Derived::new(&DriftConfig::default());
        assert!((d.p0 - 0.075).abs() < 1e-12 && (d.p1 - 0.15).abs() < 1e-12);
        assert!((d.up - std::f64::consts::LN_2).abs() < 1e-12);
        assert!((d.down - 0.0846).abs() < 1e-4);
    }

    #[test]
    fn reference_bins_are_quantiles_and_psi_of_itself_is_zero() {
        let scores: Vec<f64> = (0..1000).map(|i| i as f64 / 1000.0).collect();
        let r = Reference::new(&scores, 10).unwrap();
        assert_eq!(r.edges.len(), 9);
        assert!(r.expected.iter().all(|&e| (e - 0.1).abs() < 1e-12));
        let mut counts = vec![0u64; 10];
        for &s in &scores {
            counts[bin_of(&r.edges, s)] += 1;
        }
        assert!(psi(&counts, &r.expected).unwrap().abs() < 1e-12);
        // Ties collapse cut points instead of leaving empty bins; NaN is ignored.
        let tied = Reference::new(&[0.0, 0.0, 0.0, 0.0, 1.0, f64::NAN], 4).unwrap();
        assert_eq!(tied.edges, vec![0.0]);
        assert_eq!(tied.expected, vec![0.8, 0.2]);
        assert!(Reference::new(&[f64::NAN], 10).is_none());
    }

    #[test]
    fn config_rejects_unknown_fields() {
        let e = serde_json::from_str::<DriftConfig>(r#"{"window_cases": 10, "nope": 1}"#);
        assert!(e.is_err());
        let c: DriftConfig = serde_json::from_str(r#"{"cusum_h": 4.5}"#).unwrap();
        assert_eq!(c.cusum_h, 4.5);
        assert_eq!(c.window_cases, DriftConfig::default().window_cases);
    }

    #[test]
    fn replay_and_labelled_copy_count_once() {
        let mut m = DriftMonitor::new(DriftConfig::default());
        let mut c = Case {
            sop_instance_uid: "2.25.1".into(),
            site: "A".into(),
            region: "wrist".into(),
            model_version: "v1".into(),
            score: 0.9,
            called_positive: true,
            label: None,
            recorded_ms: 0,
            labelled_ms: None,
        };
        m.observe(&c);
        m.observe(&c);
        c.label = Some(true);
        c.labelled_ms = Some(1000);
        m.observe(&c);
        m.observe(&c);
        let s = &m.snapshot()[0];
        assert_eq!((s.findings, s.labelled, s.positives), (1, 1, 1));
        assert!(s.site.is_none() && s.model_version.is_none());
    }
}
