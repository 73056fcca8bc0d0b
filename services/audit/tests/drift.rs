//! The drift engine on seeded synthetic streams: one alert for one drop, no false alarms, PSI, label delay, site and model keys.

use fracture_audit::drift::{AlertKind, Case, DriftAlert, DriftConfig, DriftMonitor};

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;
const T0: i64 = 1_700_000_000_000;
const REGIONS: [&str; 4] = ["wrist", "ankle", "knee", "hip"];
const PREVALENCE: f64 = 0.3;
const SENSITIVITY: f64 = 0.95;
const SPECIFICITY: f64 = 0.85;

/// SplitMix64, so the streams are the same on every machine and every run.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        (self.f64() * n as f64) as usize % n
    }
}

/// A score consistent with the call at threshold 0.5: confident calls far from it, misses and
/// false positives near it.
fn score(rng: &mut Rng, fracture: bool, called: bool) -> f64 {
    let u = rng.f64();
    match (fracture, called) {
        (true, true) => 0.5 + 0.5 * u.sqrt(),
        (true, false) => 0.5 * u.sqrt(),
        (false, true) => 0.5 + 0.5 * u * u,
        (false, false) => 0.5 * u * u,
    }
}

/// (fracture, called, score) from a model with this sensitivity and the usual specificity.
fn draw(rng: &mut Rng, sensitivity: f64) -> (bool, bool, f64) {
    let fracture = rng.f64() < PREVALENCE;
    let called = if fracture {
        rng.f64() < sensitivity
    } else {
        rng.f64() >= SPECIFICITY
    };
    (fracture, called, score(rng, fracture, called))
}

fn calibration_scores(rng: &mut Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| draw(rng, SENSITIVITY).2).collect()
}

#[allow(clippy::too_many_arguments)]
fn case(
    i: usize,
    region: &str,
    site: &str,
    model_version: &str,
    (fracture, called, score): (bool, bool, f64),
    recorded_ms: i64,
    labelled: bool,
) -> Case {
    Case {
        sop_instance_uid: format!("2.25.{i}"),
        site: site.into(),
        region: region.into(),
        model_version: model_version.into(),
        score,
        called_positive: called,
        label: labelled.then_some(fracture),
        recorded_ms,
        labelled_ms: labelled.then_some(recorded_ms),
    }
}

fn is_region_key(a: &DriftAlert) -> bool {
    a.site.is_none() && a.model_version.is_none()
}

fn show(alerts: &[DriftAlert]) {
    for a in alerts {
        println!(
            "  case {} {:?} {} site={:?} model={:?}: {}",
            a.at_case, a.kind, a.region, a.site, a.model_version, a.message
        );
    }
}

/// What the acceptance stream produced.
struct Acceptance {
    monitor: DriftMonitor,
    alerts: Vec<DriftAlert>,
    /// Per case index: (wrist cases, wrist labelled fractures) since the drop, from it on.
    since_drop: Vec<Option<(u64, u64)>>,
    /// Index of the first case after the drop.
    drop_case: u64,
}

/// Four regions, 2,000 labelled cases each (one every 4 minutes: ~90 per region a day),
/// sensitivity 95% and specificity 85% at 30% prevalence, three sites; halfway through, wrist's
/// sensitivity drops to 80%. A label-delay check once a simulated day.
fn acceptance_stream(seed: u64) -> Acceptance {
    let mut rng = Rng(seed);
    let mut monitor = DriftMonitor::new(DriftConfig::default());
    for r in REGIONS {
        monitor.set_reference(r, &calibration_scores(&mut rng, 3000));
    }
    let per_region = 2000;
    let drop_at = per_region / 2;
    let mut alerts = Vec::new();
    let mut since_drop = Vec::new();
    let (mut wrist_cases, mut wrist_positives) = (0u64, 0u64);
    let mut i = 0;
    for j in 0..per_region {
        for (r, region) in REGIONS.iter().enumerate() {
            let dropped = r == 0 && j >= drop_at;
            let d = draw(&mut rng, if dropped { 0.80 } else { SENSITIVITY });
            if dropped {
                wrist_cases += 1;
                wrist_positives += u64::from(d.0);
            }
            let site = ["A", "B", "C"][rng.below(3)];
            let c = case(
                i,
                region,
                site,
                "v1",
                d,
                T0 + i as i64 * 4 * MINUTE_MS,
                true,
            );
            since_drop.push(dropped.then_some((wrist_cases, wrist_positives)));
            alerts.extend(monitor.observe(&c));
            i += 1;
        }
        if j % 90 == 0 {
            alerts.extend(monitor.check_label_delay(T0 + i as i64 * 4 * MINUTE_MS));
        }
    }
    Acceptance {
        monitor,
        alerts,
        since_drop,
        drop_case: (drop_at * REGIONS.len()) as u64,
    }
}

/// The acceptance test. Exactly one alert for the wrist region key (the floor rule, when it
/// crosses too, is folded into the CUSUM's alert, and so are wrist's site and model keys), none
/// for any other region. The bound: at 80% sensitivity the CUSUM (h = 6) needs 82 labelled
/// fractures on average and 266 in 99.9% of runs (Markov chain); 266 fractures are ≈890 wrist
/// cases at 30% prevalence, so the alert must come within 266 fractures and 950 wrist cases of
/// the drop.
#[test]
fn one_drop_gives_one_alert_for_its_region_and_none_for_the_others() {
    let Acceptance {
        monitor: m,
        alerts,
        since_drop,
        drop_case,
    } = acceptance_stream(20200101);
    println!("all alerts:");
    show(&alerts);
    let others: Vec<&DriftAlert> = alerts.iter().filter(|a| a.region != "wrist").collect();
    assert!(
        others.is_empty(),
        "alerts for undrifted regions: {others:?}"
    );
    let wrist: Vec<&DriftAlert> = alerts
        .iter()
        .filter(|a| a.region == "wrist" && is_region_key(a))
        .collect();
    assert_eq!(wrist.len(), 1, "wrist region alerts: {wrist:?}");
    let a = wrist[0];
    assert!(matches!(
        a.kind,
        AlertKind::Cusum | AlertKind::SensitivityFloor
    ));
    let Some((cases_after, positives_after)) = since_drop[a.at_case as usize] else {
        panic!("the wrist alert came before the drop: {a:?}");
    };
    println!(
        "wrist alert ({:?}) {cases_after} wrist cases / {positives_after} labelled wrist fractures / {} stream cases after the drop",
        a.kind,
        a.at_case - drop_case
    );
    assert!(
        positives_after <= 266 && cases_after <= 950,
        "too late: {cases_after} cases, {positives_after} positives"
    );

    // Sub-keys of wrist crossing meanwhile are folded into the region's alert, not paged.
    let sub = alerts.iter().filter(|a| !is_region_key(a)).count();
    println!("wrist sub-key alerts emitted: {sub}");
    assert_eq!(sub, 0);
    let open = m.open_alerts();
    println!("open alerts at the end:");
    show(&open);
    assert_eq!(open.len(), 1);
    assert!(open[0].message.starts_with(&a.message));

    let snap = m.snapshot();
    let w = snap
        .iter()
        .find(|s| s.region == "wrist" && s.site.is_none() && s.model_version.is_none())
        .unwrap();
    println!(
        "wrist at the end: sensitivity {:?} CI {:?}, {} positives of {} labelled, open {:?}",
        w.sensitivity.value, w.sensitivity.ci, w.positives, w.labelled, w.open_kinds
    );
    assert!(w.alert_open);
    let json = serde_json::to_value(w).unwrap();
    assert!(json["sensitivity"]["ci"].is_array());
    let json = serde_json::to_value(a).unwrap();
    assert!(json["kind"] == "cusum" || json["kind"] == "sensitivity_floor");
    for s in snap.iter().filter(|s| s.region != "wrist") {
        assert!(!s.alert_open, "{s:?}");
    }
}

/// What the no-drift stream produced: alerts, monitor, and the closest the rules came.
struct NoDrift {
    monitor: DriftMonitor,
    alerts: Vec<DriftAlert>,
    max_cusum: f64,
    max_psi: f64,
    min_lower: f64,
}

/// 10,000 cases over four regions, three sites and two model versions, no drift; each label
/// arrives three days after its finding as a separate message; a label-delay check each day.
fn no_drift_stream(seed: u64) -> NoDrift {
    let mut rng = Rng(seed);
    let mut m = DriftMonitor::new(DriftConfig::default());
    for r in REGIONS {
        m.set_reference(r, &calibration_scores(&mut rng, 3000));
    }
    let mut alerts = Vec::new();
    let mut pending: std::collections::VecDeque<Case> = Default::default();
    let (mut max_cusum, mut max_psi, mut min_lower) = (0.0f64, 0.0f64, 1.0f64);
    let mut next_check = T0 + DAY_MS;
    for i in 0..10_000usize {
        let now = T0 + i as i64 * 4 * MINUTE_MS;
        while pending
            .front()
            .is_some_and(|c| c.labelled_ms.is_some_and(|l| l <= now))
        {
            if let Some(c) = pending.pop_front() {
                alerts.extend(m.observe(&c));
            }
        }
        if now >= next_check {
            alerts.extend(m.check_label_delay(now));
            next_check += DAY_MS;
        }
        let region = REGIONS[rng.below(4)];
        let site = ["A", "B", "C"][rng.below(3)];
        let model = ["v1", "v2"][rng.below(2)];
        let mut c = case(
            i,
            region,
            site,
            model,
            draw(&mut rng, SENSITIVITY),
            now,
            true,
        );
        let fracture = c.label;
        c.label = None;
        c.labelled_ms = None;
        alerts.extend(m.observe(&c));
        c.label = fracture;
        c.labelled_ms = Some(now + 3 * DAY_MS);
        pending.push_back(c);
        if i % 100 == 99 {
            for s in m.snapshot() {
                max_cusum = max_cusum.max(s.cusum);
                max_psi = max_psi.max(s.psi.unwrap_or(0.0));
                if s.positives >= m.config().min_positives {
                    if let Some([lo, _]) = s.sensitivity.ci {
                        min_lower = min_lower.min(lo);
                    }
                }
            }
        }
    }
    NoDrift {
        monitor: m,
        alerts,
        max_cusum,
        max_psi,
        min_lower,
    }
}

/// No drift: not one alert, from any rule, for any of the 24 keys.
#[test]
fn no_drift_no_alert() {
    let r = no_drift_stream(7);
    let m = &r.monitor;
    let keys = m.snapshot().len();
    println!(
        "no drift: {keys} keys, max CUSUM {:.2} (h {}), max PSI {:.3} (limit {}), lowest armed Wilson lower bound {:.3} (floor {})",
        r.max_cusum,
        m.config().cusum_h,
        r.max_psi,
        m.config().psi_limit,
        r.min_lower,
        m.config().target_sensitivity - m.config().floor_margin
    );
    show(&r.alerts);
    assert!(r.alerts.is_empty());
    assert!(m.open_alerts().is_empty());
    assert_eq!(keys, 4 * (1 + 3 + 2));
}

/// The two streams above over 200 seeds, so the fixed seeds are not luck: the acceptance
/// criteria must hold for at least 97% of drops, and at most 3% of drift-free streams (24 keys,
/// 10,000 cases each) may raise any alert. Measured: 199/200 and 2/200.
#[test]
fn seed_sweep() {
    let seeds = 0..200u64;
    let (mut ok, mut delays, mut false_alarm_runs) = (0, Vec::new(), 0);
    for seed in seeds.clone() {
        let a = acceptance_stream(seed);
        let wrist: Vec<&DriftAlert> = a
            .alerts
            .iter()
            .filter(|x| x.region == "wrist" && is_region_key(x))
            .collect();
        let others = a.alerts.iter().filter(|x| x.region != "wrist").count();
        let after = wrist.first().and_then(|x| a.since_drop[x.at_case as usize]);
        if let (1, 0, Some((c, p))) = (wrist.len(), others, after) {
            if p <= 266 && c <= 950 {
                ok += 1;
            }
            delays.push((c, p));
        } else {
            println!("seed {seed}: wrist {wrist:?}, others {others}");
        }
        let quiet = no_drift_stream(seed);
        if !quiet.alerts.is_empty() {
            false_alarm_runs += 1;
            for x in &quiet.alerts {
                println!(
                    "seed {seed}: false alarm {:?} {} {:?} {:?} at case {}",
                    x.kind, x.region, x.site, x.model_version, x.at_case
                );
            }
        }
    }
    delays.sort_by_key(|d| d.1);
    let n = seeds.end as usize;
    let pct = |q: f64| delays[((delays.len() - 1) as f64 * q) as usize];
    println!(
        "acceptance held for {ok}/{n} seeds; (wrist cases, fractures) after the drop: median {:?}, 90th {:?}, max {:?}; no-drift streams with any alert: {false_alarm_runs}/{n}",
        pct(0.5),
        pct(0.9),
        pct(1.0)
    );
    assert!(ok >= 194, "acceptance held for only {ok}/{n} seeds");
    assert!(
        false_alarm_runs <= 6,
        "{false_alarm_runs}/{n} drift-free streams raised an alert"
    );
}

fn psi_stream(shift: f64, seed: u64) -> (DriftMonitor, Vec<DriftAlert>) {
    let mut rng = Rng(seed);
    let mut m = DriftMonitor::new(DriftConfig::default());
    m.set_reference("wrist", &calibration_scores(&mut rng, 3000));
    let mut alerts = Vec::new();
    for i in 0..1500usize {
        let (f, _, s) = draw(&mut rng, SENSITIVITY);
        let s = (s + shift).min(1.0);
        let d = (f, s >= 0.5, s);
        // Unlabelled findings: the PSI needs no labels.
        let c = case(
            i,
            "wrist",
            "A",
            "v1",
            d,
            T0 + i as i64 * 10 * MINUTE_MS,
            false,
        );
        alerts.extend(m.observe(&c));
    }
    (m, alerts)
}

#[test]
fn psi_alerts_on_a_score_shift_and_not_without_one() {
    let (m, alerts) = psi_stream(0.0, 11);
    let psi = m.snapshot()[0].psi.unwrap();
    println!("no shift: PSI {psi:.3}");
    assert!(alerts.is_empty(), "{alerts:?}");

    let (m, alerts) = psi_stream(0.2, 11);
    show(&alerts);
    let snap = m.snapshot();
    println!("shift +0.2: PSI {:.3}", snap[0].psi.unwrap());
    assert_eq!(alerts.len(), 1);
    let a = &alerts[0];
    assert_eq!(a.kind, AlertKind::ScoreShift);
    assert!(is_region_key(a));
    // The first PSI is computed at psi_min_scores findings; a shift this large is over the
    // limit at once.
    assert_eq!(a.at_case as usize, m.config().psi_min_scores - 1);
    assert!(snap[0].open_kinds.contains(&AlertKind::ScoreShift));
}

#[test]
fn psi_re_arms_after_the_shift_clears() {
    let mut rng = Rng(5);
    let cfg = DriftConfig::default();
    let window = cfg.psi_window;
    let mut m = DriftMonitor::new(cfg);
    m.set_reference("ankle", &calibration_scores(&mut rng, 3000));
    let mut alerts = Vec::new();
    // Shifted, back to normal for two windows, shifted again: two episodes.
    let phases = [(0.2, window), (0.0, 2 * window), (0.2, window)];
    let mut i = 0usize;
    for (shift, n) in phases {
        for _ in 0..n {
            let (f, _, s) = draw(&mut rng, SENSITIVITY);
            let s = (s + shift).min(1.0);
            let c = case(
                i,
                "ankle",
                "A",
                "v1",
                (f, s >= 0.5, s),
                T0 + i as i64 * MINUTE_MS,
                false,
            );
            alerts.extend(m.observe(&c));
            i += 1;
        }
    }
    show(&alerts);
    assert_eq!(alerts.len(), 2);
    assert!(alerts.iter().all(|a| a.kind == AlertKind::ScoreShift));
    assert!(alerts[1].at_case as usize >= 3 * window);
}

/// Ten findings a day at one wrist site; labels for days 0-4 come three days late, then stop.
#[test]
fn label_delay_fires_once_and_re_arms_after_labels_arrive() {
    let mut m = DriftMonitor::new(DriftConfig::default());
    let mut rng = Rng(3);
    let mut findings = Vec::new();
    let mut alerts = Vec::new();
    for day in 0..21i64 {
        for k in 0..10i64 {
            let i = findings.len();
            let c = case(
                i,
                "wrist",
                "A",
                "v1",
                draw(&mut rng, SENSITIVITY),
                T0 + day * DAY_MS + k * MINUTE_MS,
                false,
            );
            alerts.extend(m.observe(&c));
            findings.push((day, c));
        }
    }
    let label = |m: &mut DriftMonitor, days: std::ops::Range<i64>, at: i64| {
        let mut out = Vec::new();
        for (_, c) in findings.iter().filter(|(d, _)| days.contains(d)) {
            let mut c = c.clone();
            c.label = Some(rng_label(&c));
            c.labelled_ms = Some(T0 + at * DAY_MS);
            out.extend(m.observe(&c));
        }
        out
    };
    alerts.extend(label(&mut m, 0..5, 8));
    assert!(alerts.is_empty(), "observe does not judge label delay");

    // Day 20: findings up to day 6 are overdue; days 5 and 6 (20 of 70) have no label: 28.6%.
    let first = m.check_label_delay(T0 + 20 * DAY_MS + HOUR_MS);
    show(&first);
    assert_eq!(
        first.len(),
        1,
        "one alert: site and model keys fold into the region's"
    );
    assert_eq!(first[0].kind, AlertKind::LabelDelay);
    assert!(is_region_key(&first[0]));
    assert!(first[0].message.contains("20 of 70"));
    // Still late the next day: the same episode, no second message.
    assert!(m.check_label_delay(T0 + 21 * DAY_MS + HOUR_MS).is_empty());
    assert_eq!(m.open_alerts().len(), 1);

    // The labels come in: the episode clears.
    assert!(label(&mut m, 5..8, 21).is_empty());
    assert!(m
        .check_label_delay(T0 + 21 * DAY_MS + 2 * HOUR_MS)
        .is_empty());
    assert!(m.open_alerts().is_empty());
    let s = &m.snapshot()[0];
    assert_eq!(s.label_delay, Some(0.0));
    assert!(!s.alert_open);

    // Re-armed: a new backlog (days 8-11 by day 25: 40 of 120) is a new episode.
    let second = m.check_label_delay(T0 + 25 * DAY_MS + HOUR_MS);
    show(&second);
    assert_eq!(second.len(), 1);
    assert!(second[0].message.contains("40 of 120"));
}

fn rng_label(c: &Case) -> bool {
    // The label as the generator drew it is not kept on unlabelled findings; any fixed truth
    // will do for label delay.
    c.called_positive
}

/// Four wrist sites; halfway through, site B's sensitivity drops to 80%. Site B alerts, the
/// other sites do not.
#[test]
fn a_drifting_site_alerts_at_site_level() {
    let mut rng = Rng(99);
    let mut m = DriftMonitor::new(DriftConfig::default());
    m.set_reference("wrist", &calibration_scores(&mut rng, 3000));
    let mut alerts = Vec::new();
    let n = 4000usize;
    for i in 0..n {
        let site = ["A", "B", "C", "D"][rng.below(4)];
        let sens = if site == "B" && i >= n / 2 {
            0.80
        } else {
            SENSITIVITY
        };
        let c = case(
            i,
            "wrist",
            site,
            "v1",
            draw(&mut rng, sens),
            T0 + i as i64 * 4 * MINUTE_MS,
            true,
        );
        alerts.extend(m.observe(&c));
    }
    show(&alerts);
    let at_site = |s: &str| {
        alerts
            .iter()
            .filter(|a| a.site.as_deref() == Some(s))
            .count()
    };
    assert_eq!(at_site("B"), 1);
    assert_eq!(at_site("A") + at_site("C") + at_site("D"), 0);
    let b = alerts
        .iter()
        .find(|a| a.site.as_deref() == Some("B"))
        .unwrap();
    assert!(b.at_case as usize >= n / 2);
    assert!(matches!(
        b.kind,
        AlertKind::Cusum | AlertKind::SensitivityFloor
    ));
    assert!(b.message.contains("wrist at site B"));
    println!(
        "site B alerted {} cases after its drop",
        b.at_case as usize - n / 2
    );
}

/// A new model version on half the wrist traffic with sensitivity 80%: its key alerts, the old
/// version's does not.
#[test]
fn a_bad_model_version_alerts_at_model_level() {
    let mut rng = Rng(2024);
    let mut m = DriftMonitor::new(DriftConfig::default());
    let mut alerts = Vec::new();
    for i in 0..3000usize {
        let v2 = i >= 1000 && rng.f64() < 0.5;
        let sens = if v2 { 0.80 } else { SENSITIVITY };
        let c = case(
            i,
            "wrist",
            "A",
            if v2 { "v2" } else { "v1" },
            draw(&mut rng, sens),
            T0 + i as i64 * 4 * MINUTE_MS,
            true,
        );
        alerts.extend(m.observe(&c));
    }
    show(&alerts);
    let of = |v: &str| {
        alerts
            .iter()
            .filter(|a| a.model_version.as_deref() == Some(v))
            .count()
    };
    assert_eq!(of("v2"), 1);
    assert_eq!(of("v1"), 0);
}

#[test]
fn hostile_input_does_not_panic() {
    let mut m = DriftMonitor::new(DriftConfig {
        window_cases: 0,
        psi_bins: 0,
        cusum_miss_ratio: f64::NAN,
        ..DriftConfig::default()
    });
    m.set_reference("wrist", &[f64::NAN, f64::INFINITY]);
    m.set_reference("wrist", &[0.1, 0.2]);
    for (i, s) in [f64::NAN, f64::INFINITY, -1.0, 2.0, 0.5]
        .into_iter()
        .enumerate()
    {
        let mut c = case(
            i,
            "wrist",
            "",
            "",
            (true, false, s),
            i64::MIN + i as i64,
            true,
        );
        c.labelled_ms = Some(i64::MAX);
        m.observe(&c);
    }
    m.check_label_delay(i64::MIN);
    m.check_label_delay(i64::MAX);
    assert!(!m.snapshot().is_empty());
    serde_json::to_string(&m.snapshot()).unwrap();
}
