//! Study summaries: a study is positive when any of its radiographs is, and its summary goes out
//! once no new radiograph of it has arrived for a quiet period.
//!
//! [`StudyTracker`] is the pure core; [`run`] drives it as a consumer group of its own on the
//! findings topic. Findings are keyed by study, so each study's findings reach one replica. The
//! consumed offsets are committed only when no study is waiting for its quiet period to end, so
//! a crash replays every finding of the studies not yet summarised (and may repeat a summary:
//! at least once, never a summary missing an earlier radiograph). A radiograph arriving after a
//! study's summary, while the study is still remembered (`retain_s`), makes a new revision that
//! counts every radiograph seen.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use fracture_shared::bus::OutRecord;
use fracture_shared::messages::{decode, encode, schema, Finding, StudySummary};
use fracture_shared::stage::{Shutdown, StageEnv, StageFailed};

/// `[postprocess.studies]`
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StudyConfig {
    /// Emit study summaries on `<prefix>.studies` (`fracture scan` summarises at its end instead).
    pub enabled: bool,
    /// A study's summary goes out once none of its radiographs arrived for this long (ms).
    pub quiet_ms: u64,
    /// How long a summarised study is remembered, so a late radiograph revises its summary (s).
    pub retain_s: u64,
}

impl Default for StudyConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            quiet_ms: 5_000,
            retain_s: 3_600,
        }
    }
}

#[derive(Debug, Clone)]
struct Radiograph {
    fracture: bool,
    score: f32,
    region: String,
}

#[derive(Debug)]
struct Study {
    site: String,
    model_trained: bool,
    radiographs: BTreeMap<String, Radiograph>,
    last_seen: Instant,
    /// Summaries emitted so far; `pending` is set while a summary is owed.
    revision: u32,
    pending: bool,
}

/// Studies seen, by (pseudonymised StudyInstanceUID, model version): results of two model
/// versions are never mixed in one summary.
#[derive(Debug, Default)]
pub struct StudyTracker {
    studies: HashMap<(String, String), Study>,
}

impl StudyTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a finding seen at `now`. A repeated SOP Instance UID (a replay) replaces its
    /// earlier result and counts once.
    pub fn observe(&mut self, f: &Finding, now: Instant) {
        let key = (f.id.study_instance_uid.clone(), f.model_version.clone());
        let s = self.studies.entry(key).or_insert_with(|| Study {
            site: f.site.clone(),
            model_trained: f.model_trained,
            radiographs: BTreeMap::new(),
            last_seen: now,
            revision: 0,
            pending: true,
        });
        let r = Radiograph {
            fracture: f.fracture,
            score: f.score,
            region: f.region.clone(),
        };
        let changed = s
            .radiographs
            .insert(f.id.sop_instance_uid.clone(), r.clone())
            .is_none_or(|old| old.fracture != r.fracture || old.score != r.score);
        s.last_seen = now;
        if changed {
            s.pending = true;
        }
    }

    /// Studies owing a summary (quiet or not).
    pub fn pending(&self) -> usize {
        self.studies.values().filter(|s| s.pending).count()
    }

    /// Summaries of the studies quiet for at least `quiet` at `now`; forgets summarised studies
    /// not seen for `retain`.
    pub fn due(&mut self, now: Instant, quiet: Duration, retain: Duration) -> Vec<StudySummary> {
        let mut out = Vec::new();
        for ((uid, version), s) in &mut self.studies {
            if s.pending && now.saturating_duration_since(s.last_seen) >= quiet {
                out.push(summary(uid, version, s));
            }
        }
        self.studies
            .retain(|_, s| s.pending || now.saturating_duration_since(s.last_seen) < retain);
        out.sort_by(|a, b| a.study_instance_uid.cmp(&b.study_instance_uid));
        out
    }

    /// Summaries of every study owing one, at once (the end of a scan).
    pub fn flush(&mut self) -> Vec<StudySummary> {
        let mut out: Vec<StudySummary> = self
            .studies
            .iter_mut()
            .filter(|(_, s)| s.pending)
            .map(|((uid, version), s)| summary(uid, version, s))
            .collect();
        out.sort_by(|a, b| a.study_instance_uid.cmp(&b.study_instance_uid));
        out
    }
}

fn summary(uid: &str, version: &str, s: &mut Study) -> StudySummary {
    s.pending = false;
    s.revision += 1;
    let positives: Vec<String> = s
        .radiographs
        .iter()
        .filter(|(_, r)| r.fracture)
        .map(|(sop, _)| sop.clone())
        .collect();
    let regions: BTreeSet<&str> = s.radiographs.values().map(|r| r.region.as_str()).collect();
    StudySummary {
        schema: schema::STUDY_SUMMARY.into(),
        study_instance_uid: uid.to_string(),
        site: s.site.clone(),
        fracture: !positives.is_empty(),
        radiographs: s.radiographs.len() as u32,
        positives: positives.len() as u32,
        max_score: s
            .radiographs
            .values()
            .map(|r| r.score)
            .fold(f32::NEG_INFINITY, f32::max),
        positive_sop_instance_uids: positives,
        regions: regions.into_iter().map(str::to_string).collect(),
        model_version: version.to_string(),
        model_trained: s.model_trained,
        revision: s.revision,
    }
}

/// The summaries of a finished set of findings (all of them at once, as `fracture scan` does).
pub fn summarise<'a>(findings: impl IntoIterator<Item = &'a Finding>) -> Vec<StudySummary> {
    let mut t = StudyTracker::new();
    let now = Instant::now();
    for f in findings {
        t.observe(f, now);
    }
    t.flush()
}

pub const GROUP_SUFFIX: &str = "postprocess-studies";

/// Consumes the findings topic and emits study summaries until shutdown.
pub async fn run(env: &StageEnv, cfg: &StudyConfig) -> Result<(), StageFailed> {
    let fail = |source| StageFailed {
        stage: "postprocess-studies",
        source,
    };
    let group = format!("{}.{GROUP_SUFFIX}", env.topics.prefix);
    let instance = format!("{group}.{}", env.instance);
    // Both lanes in one group: a summary waits out a quiet period anyway.
    let findings = env.topics.lanes_of::<Finding>();
    let summaries = env.topics.of::<StudySummary>();
    let quiet = Duration::from_millis(cfg.quiet_ms);
    let retain = Duration::from_secs(cfg.retain_s);
    let tick = (quiet / 4).clamp(Duration::from_millis(20), Duration::from_millis(500));
    let mut shutdown: Shutdown = env.shutdown.clone();
    let mut io = env
        .retry
        .retry("the bus is not reachable yet")
        .until(&env.shutdown)
        .run(
            || env.bus.consumer(&group, &findings, &instance),
            |e| matches!(e, fracture_shared::bus::BusError::Unavailable(_)),
        )
        .await
        .map_err(fail)?;
    let mut producer = env
        .bus
        .producer(&format!("{instance}.summaries"))
        .await
        .map_err(fail)?;
    let mut tracker = StudyTracker::new();
    let mut polled = false;
    tracing::info!(topics = %findings.join(","), quiet_ms = cfg.quiet_ms, "summarising studies");
    while !shutdown.is_set() {
        let batch = tokio::select! {
            b = io.poll_batch(256, Duration::from_millis(5), tick) => match b {
                Ok(b) => b,
                Err(e @ fracture_shared::bus::BusError::Fatal(_)) => return Err(fail(e)),
                // A rebalance or a broker away: what was not committed comes again.
                Err(e) => {
                    tracing::warn!(error = %e, "polling findings for study summaries");
                    continue;
                }
            },
            _ = shutdown.wait() => break,
        };
        let now = Instant::now();
        for r in &batch {
            polled = true;
            match decode::<Finding>(&r.payload) {
                Ok(f) => tracker.observe(&f, now),
                // Not ours to dead-letter: the findings topic's own consumers do that.
                Err(e) => tracing::warn!(reason = %e, "skipping an unreadable finding"),
            }
        }
        let due = tracker.due(now, quiet, retain);
        if !due.is_empty() {
            let records: Vec<OutRecord> = due
                .iter()
                .map(|s| OutRecord {
                    topic: summaries.clone(),
                    key: s.study_instance_uid.clone(),
                    payload: encode(s),
                    headers: vec![],
                })
                .collect();
            // A summary that did not land is sent again (consumers keep the latest revision).
            let mut retry = env.retry.retry("study summaries did not land");
            while let Err(e) = producer.send(records.clone()).await {
                let again = !matches!(e, fracture_shared::bus::BusError::Fatal(_));
                retry.failed(e, again).await.map_err(fail)?;
            }
            tracing::debug!(studies = due.len(), "study summaries emitted");
        }
        // Only when nothing is owed: a crash must replay every finding of an unsummarised study.
        if polled && tracker.pending() == 0 {
            match io.commit(vec![]).await {
                Ok(()) => polled = false,
                Err(fracture_shared::bus::BusError::Fatal(m)) => {
                    return Err(fail(fracture_shared::bus::BusError::Fatal(m)))
                }
                Err(e) => tracing::warn!(error = %e, "committing the summarised findings"),
            }
        }
    }
    let _ = producer.close().await;
    let _ = io.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fracture_shared::messages::RadiographId;

    fn f(study: &str, sop: &str, fracture: bool, score: f32) -> Finding {
        Finding {
            schema: schema::FINDING.into(),
            id: RadiographId {
                input: format!("in-{sop}"),
                study_instance_uid: study.into(),
                series_instance_uid: "2.25.9".into(),
                sop_instance_uid: sop.into(),
            },
            site: "S1".into(),
            region: if fracture { "wrist" } else { "hand" }.into(),
            score,
            threshold: 0.5,
            fracture,
            boxes: vec![],
            model_version: "v1".into(),
            model_trained: false,
            sr: None,
            sc: None,
        }
    }

    #[test]
    fn any_positive_makes_the_study_positive_once_quiet() {
        let (q, keep) = (Duration::from_secs(5), Duration::from_secs(60));
        let t0 = Instant::now();
        let mut t = StudyTracker::new();
        t.observe(&f("A", "a1", false, 0.1), t0);
        t.observe(&f("A", "a2", true, 0.9), t0 + Duration::from_secs(2));
        t.observe(&f("B", "b1", false, 0.2), t0);
        t.observe(&f("A", "a1", false, 0.1), t0 + Duration::from_secs(3)); // a replay
        assert!(t.due(t0 + Duration::from_secs(4), q, keep).is_empty());
        let due = t.due(t0 + Duration::from_secs(5), q, keep);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].study_instance_uid, "B");
        assert!(!due[0].fracture);
        let due = t.due(t0 + Duration::from_secs(8), q, keep);
        assert_eq!(due.len(), 1);
        let a = &due[0];
        assert!(a.fracture);
        assert_eq!((a.radiographs, a.positives, a.revision), (2, 1, 1));
        assert_eq!(a.positive_sop_instance_uids, vec!["a2"]);
        assert_eq!(a.regions, vec!["hand", "wrist"]);
        assert_eq!(a.max_score, 0.9);
        assert_eq!(t.pending(), 0);
        // Nothing twice.
        assert!(t.due(t0 + Duration::from_secs(20), q, keep).is_empty());
        // A late radiograph revises the summary with everything seen.
        t.observe(&f("A", "a3", false, 0.3), t0 + Duration::from_secs(30));
        let due = t.due(t0 + Duration::from_secs(36), q, keep);
        assert_eq!((due[0].radiographs, due[0].revision), (3, 2));
        assert!(due[0].fracture);
        // Forgotten after `retain`: a later radiograph starts a new study record.
        assert!(t.due(t0 + Duration::from_secs(200), q, keep).is_empty());
        assert_eq!(t.studies.len(), 0);
    }

    #[test]
    fn summarise_flushes_everything() {
        let fs = [
            f("A", "a1", false, 0.1),
            f("B", "b1", true, 0.7),
            f("A", "a2", false, 0.2),
        ];
        let s = summarise(&fs);
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].radiographs, s[0].fracture), (2, false));
        assert_eq!((s[1].radiographs, s[1].fracture), (1, true));
    }
}
