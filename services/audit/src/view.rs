//! Builds what the dashboard shows from the database: per-region performance with intervals,
//! sensitivity over time against the floor, ROC curves, and the alerts.

use std::collections::BTreeMap;

use fracture_shared::stats::{auc, wilson, Z95};

use crate::dashboard::{
    AlertRow as ShownAlert, DashboardData, Estimate, RegionRow, RocCurve, SensitivitySeries, Trend,
};
use crate::db::{AuditDb, CaseRow, Column, DbError};

/// `YYYY-MM-DD` (UTC) of a Unix time in milliseconds.
pub fn date_of(ms: i64) -> String {
    // H. Hinnant's civil-from-days: no calendar crate for one conversion.
    let z = ms.div_euclid(86_400_000) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

fn estimate(successes: u64, n: u64) -> Option<Estimate> {
    let (lo, hi) = wilson(successes, n)?;
    Some(Estimate {
        value: successes as f64 / n as f64,
        lo,
        hi,
    })
}

/// AUC with the Hanley & McNeil (1982) normal interval: cheap enough to compute on every page
/// load (the bootstrap lives in `fracture evaluate`).
fn auc_estimate(scores: &[f64], labels: &[bool]) -> Option<Estimate> {
    let a = auc(scores, labels)?;
    let np = labels.iter().filter(|l| **l).count() as f64;
    let nn = labels.len() as f64 - np;
    let q1 = a / (2.0 - a);
    let q2 = 2.0 * a * a / (1.0 + a);
    let var = (a * (1.0 - a) + (np - 1.0) * (q1 - a * a) + (nn - 1.0) * (q2 - a * a)) / (np * nn);
    let se = var.max(0.0).sqrt();
    Some(Estimate {
        value: a,
        lo: (a - Z95 * se).max(0.0),
        hi: (a + Z95 * se).min(1.0),
    })
}

fn roc(scores: &[f64], labels: &[bool]) -> Vec<(f64, f64)> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let p = labels.iter().filter(|l| **l).count().max(1) as f64;
    let n = (labels.len() as f64 - labels.iter().filter(|l| **l).count() as f64).max(1.0);
    let (mut tp, mut fp) = (0.0, 0.0);
    let mut points = vec![(0.0, 0.0)];
    let mut i = 0;
    while i < idx.len() {
        // Tied scores move the curve together (a diagonal step), as the AUC counts them.
        let s = scores[idx[i]];
        while i < idx.len() && scores[idx[i]] == s {
            if labels[idx[i]] {
                tp += 1.0;
            } else {
                fp += 1.0;
            }
            i += 1;
        }
        points.push((fp / n, tp / p));
    }
    points
}

fn trend(positives: &[&CaseRow]) -> Trend {
    // Sensitivity of the newer half of labelled positives against the older half.
    if positives.len() < 20 {
        return Trend::Unknown;
    }
    let half = positives.len() / 2;
    let sens =
        |s: &[&CaseRow]| s.iter().filter(|c| c.called_positive).count() as f64 / s.len() as f64;
    let d = sens(&positives[half..]) - sens(&positives[..half]);
    if d > 0.02 {
        Trend::Up
    } else if d < -0.02 {
        Trend::Down
    } else {
        Trend::Flat
    }
}

/// Everything the page shows, for one site / model-version filter (`None`: all).
pub async fn dashboard(
    db: &AuditDb,
    site: Option<String>,
    model_version: Option<String>,
    floor: f64,
) -> Result<DashboardData, DbError> {
    let cases = db.cases(site.as_deref(), model_version.as_deref()).await?;
    let mut by_region: BTreeMap<String, Vec<&CaseRow>> = BTreeMap::new();
    for c in cases.iter().filter(|c| c.label.is_some()) {
        by_region.entry(c.region.clone()).or_default().push(c);
    }
    let mut regions = Vec::new();
    let mut series = Vec::new();
    let mut curves = Vec::new();
    for (region, rows) in &by_region {
        let positives: Vec<&CaseRow> = rows
            .iter()
            .copied()
            .filter(|c| c.label == Some(true))
            .collect();
        let negatives = rows.len() - positives.len();
        let tp = positives.iter().filter(|c| c.called_positive).count() as u64;
        let tn = rows
            .iter()
            .filter(|c| c.label == Some(false) && !c.called_positive)
            .count() as u64;
        let scores: Vec<f64> = rows.iter().map(|c| c.score).collect();
        let labels: Vec<bool> = rows.iter().map(|c| c.label == Some(true)).collect();
        let a = auc_estimate(&scores, &labels);
        regions.push(RegionRow {
            region: region.clone(),
            n: rows.len() as u64,
            positives: positives.len() as u64,
            sensitivity: estimate(tp, positives.len() as u64),
            specificity: estimate(tn, negatives as u64),
            auc: a,
            trend: trend(&positives),
        });
        let mut per_day: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for c in &positives {
            let e = per_day
                .entry(date_of(c.labelled_ms.unwrap_or(c.recorded_ms)))
                .or_default();
            e.0 += u64::from(c.called_positive);
            e.1 += 1;
        }
        let points: Vec<(String, f64, f64)> = per_day
            .into_iter()
            .filter_map(|(day, (k, n))| wilson(k, n).map(|(lo, _)| (day, k as f64 / n as f64, lo)))
            .collect();
        if !points.is_empty() {
            series.push(SensitivitySeries {
                region: region.clone(),
                points,
            });
        }
        if let Some(e) = a {
            curves.push(RocCurve {
                region: region.clone(),
                points: roc(&scores, &labels),
                auc: e.value,
            });
        }
    }
    let alerts = db
        .alerts()
        .await?
        .into_iter()
        .filter(|a| {
            site.as_ref()
                .is_none_or(|s| a.site.as_ref().is_none_or(|x| x == s))
        })
        .map(|a| ShownAlert {
            kind: a.kind,
            region: a.region,
            site: a.site,
            model_version: a.model_version,
            message: a.message,
            opened_at: date_of(a.opened_ms),
        })
        .collect();
    Ok(DashboardData {
        generated_at: date_of(crate::db::now_ms()),
        model_versions: db.distinct(Column::ModelVersion).await?,
        sites: db.distinct(Column::Site).await?,
        filter_site: site,
        filter_model_version: model_version,
        floor,
        regions,
        series,
        roc: curves,
        alerts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_curves() {
        assert_eq!(date_of(0), "1970-01-01");
        assert_eq!(date_of(951_782_400_000), "2000-02-29");
        let pts = roc(&[0.9, 0.8, 0.8, 0.1], &[true, true, false, false]);
        assert_eq!(pts, vec![(0.0, 0.0), (0.0, 0.5), (0.5, 1.0), (1.0, 1.0)]);
        let e = auc_estimate(&[0.9, 0.8, 0.7, 0.1], &[true, true, false, false]).unwrap();
        assert_eq!(e.value, 1.0);
        assert!(e.lo <= 1.0 && e.hi == 1.0);
    }
}
