//! `fracture scan`: all five stages in one process on the in-process bus, with a local
//! claim-check folder and an embedded database, writing the results into one folder.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio::sync::watch;

use fracture_audit::{AuditConfig, AuditDb};
use fracture_ensemble::EnsembleConfig;
use fracture_ingest::{Ingest, IngestConfig, Linkage, Outcome};
use fracture_postprocess::PostprocessConfig;
use fracture_preprocess::PreprocessConfig;
use fracture_shared::bus::{Bus, InProcBus, Topics};
use fracture_shared::config::Settings;
use fracture_shared::messages::{decode, BoundingBox, DeadLetter, ErrorKind, Finding};
use fracture_shared::metrics::{Health, StageMetrics};
use fracture_shared::stage::{Shutdown, StageEnv};
use fracture_shared::store::{BlobStore, StoreConfig};
use fracture_shared::RetryPolicy;

use crate::{report, wiring};

/// One line of `findings.jsonl`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct FindingLine {
    pub input: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub sop_instance_uid: String,
    pub site: String,
    pub region: String,
    pub score: f32,
    pub threshold: f32,
    pub fracture: bool,
    pub boxes: Vec<BoundingBox>,
    pub model_version: String,
    pub model_trained: bool,
    /// The DICOM SR and Secondary Capture of this result, relative to the output folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sc: Option<String>,
}

impl From<Finding> for FindingLine {
    fn from(f: Finding) -> Self {
        Self {
            input: f.id.input,
            study_instance_uid: f.id.study_instance_uid,
            series_instance_uid: f.id.series_instance_uid,
            sop_instance_uid: f.id.sop_instance_uid,
            site: f.site,
            region: f.region,
            score: f.score,
            threshold: f.threshold,
            fracture: f.fracture,
            boxes: f.boxes,
            model_version: f.model_version,
            model_trained: f.model_trained,
            sr: None,
            sc: None,
        }
    }
}

/// One line of `dead-letter.jsonl`: the source path is resolved here, at the edge, from the
/// linkage table; it never rode the bus.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct DeadLetterLine {
    pub source: String,
    pub input: Option<String>,
    pub stage: String,
    pub kind: ErrorKind,
    pub reason: String,
}

/// Reads the key file, or creates `DIR/deid.key` (32 random bytes, mode 0600) on first use so a
/// re-run of the same scan maps UIDs the same way.
fn key(out: &Path, given: Option<&Path>, configured: &str) -> anyhow::Result<Vec<u8>> {
    let path = match (given, configured.is_empty()) {
        (Some(p), _) => p.to_path_buf(),
        (None, false) => PathBuf::from(configured),
        (None, true) => {
            let p = out.join("deid.key");
            if !p.exists() {
                use rand::RngCore;
                let mut k = [0u8; 32];
                rand::rng().fill_bytes(&mut k);
                let mut f = std::fs::OpenOptions::new();
                f.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut f, 0o600);
                f.open(&p)?.write_all(&k)?;
            }
            p
        }
    };
    fracture_ingest::read_key(&path).map_err(anyhow::Error::msg)
}

pub struct ScanSummary {
    pub inputs: u64,
    pub findings: usize,
    pub dead_letters: usize,
    pub skipped: u64,
    pub seconds: f64,
}

pub async fn run(
    settings: &Settings,
    paths: &[PathBuf],
    out: &Path,
    key_file: Option<&Path>,
    model: Option<&Path>,
    labels: Option<&Path>,
    keep_store: bool,
) -> anyhow::Result<()> {
    let mut tcfg: fracture_shared::telemetry::TelemetryConfig = settings.section("telemetry")?;
    if tcfg.log == fracture_shared::telemetry::TelemetryConfig::default().log {
        // The progress bar is the scan's voice; only warnings and errors interrupt it.
        tcfg.log = "warn".into();
    }
    fracture_shared::telemetry::init(&tcfg);
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create the output folder {}", out.display()))?;
    let started = Instant::now();
    let ingest_cfg: IngestConfig = settings.section("ingest")?;
    let mut policy = ingest_cfg.policy(key(out, key_file, &ingest_cfg.key_file)?)?;
    // A scan keeps what ingest refused beside its results, at the edge.
    policy.quarantine = Some(out.join("quarantine"));
    let store = BlobStore::open(&StoreConfig {
        url: out.join("store").display().to_string(),
        ..Default::default()
    })?;
    let linkage = Linkage::open(&out.join("linkage.db")).await?;
    let ensemble = wiring::ensemble(settings, model)?;
    let manifest = Arc::new(ensemble.manifest().clone());
    let db_url = format!("sqlite://{}", out.join("audit.db").display());
    let db = AuditDb::open(&db_url).await?;

    let bus = InProcBus::new();
    let topics = Topics::default();
    bus.create_topics(&topics.all(), 1).await?;
    let (findings_t, dead_t) = (topics.name("findings"), topics.name("dead-letter"));
    for (stage, topic) in [
        ("preprocess", topics.name("deidentified")),
        ("ensemble", topics.name("preprocessed")),
        ("postprocess", topics.name("scored")),
        ("audit", findings_t.clone()),
        ("audit", topics.name("labels")),
    ] {
        bus.register_group(&format!("{}.{stage}", topics.prefix), &topic)?;
    }
    let collector_group = "scan-collector";
    let mut collector = bus
        .consumer(
            collector_group,
            &[findings_t.clone(), dead_t.clone()],
            "scan",
        )
        .await?;

    let (stop, shutdown) = Shutdown::new();
    let env = StageEnv {
        bus: Arc::new(bus.clone()),
        store: store.clone(),
        topics: topics.clone(),
        metrics: StageMetrics::new(),
        health: Health::default(),
        shutdown,
        instance: "scan".into(),
        retry: settings.section::<RetryPolicy>("retry")?,
    };
    let (failed_tx, mut failed_rx) = watch::channel::<Option<String>>(None);
    let mut tasks = Vec::new();
    {
        let (e, c, t) = (
            env.clone(),
            settings.section::<PreprocessConfig>("preprocess")?,
            manifest.transform.clone(),
        );
        let f = failed_tx.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(err) = fracture_preprocess::run(&e, &c, t).await {
                let _ = f.send(Some(err.to_string()));
            }
        }));
        let (e, c, m) = (
            env.clone(),
            settings.section::<EnsembleConfig>("ensemble")?,
            ensemble.clone(),
        );
        let f = failed_tx.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(err) = fracture_ensemble::run(&e, &c, m).await {
                let _ = f.send(Some(err.to_string()));
            }
        }));
        // A scan summarises its studies at its end (below), not on a quiet-period timer.
        let mut c = settings.section::<PostprocessConfig>("postprocess")?;
        c.studies.enabled = false;
        // Nor does it export: its results stay in its folder (`fracture serve postprocess`
        // exports).
        if c.export.take().is_some() {
            eprintln!("note: [postprocess.export] is for `fracture serve postprocess`; this scan sends nothing to a PACS");
        }
        let (e, c, m) = (env.clone(), c, manifest.clone());
        let f = failed_tx.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(err) = fracture_postprocess::run(&e, &c, m).await {
                let _ = f.send(Some(err.to_string()));
            }
        }));
        let (e, c, d) = (
            env.clone(),
            settings.section::<AuditConfig>("audit")?,
            db.clone(),
        );
        let f = failed_tx.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(err) = fracture_audit::run(&e, &c, d).await {
                let _ = f.send(Some(err.to_string()));
            }
        }));
    }

    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {elapsed_precise} {pos} radiographs done ({per_sec}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));

    // Ingest runs beside the collector, so results stream out while files are still being read.
    let ingest = Ingest {
        policy,
        store: store.clone(),
        topics: topics.clone(),
        linkage,
    };
    let mut producer = bus.producer("scan-ingest").await?;
    // Reference reads, keyed by original UIDs, become labels keyed like the findings.
    if let Some(file) = labels {
        let reads =
            fracture_audit::evaluate::pseudonymise_labels(file, &out.join("labels.csv"), |uid| {
                ingest.policy.pseudonymise_uid(uid)
            })?;
        let records: Vec<_> = reads.iter().map(|r| label_record(&topics, r)).collect();
        producer.send(records).await?;
    }
    // A re-run into the same folder resumes: inputs already in the results are not sent again.
    let findings_path = out.join("findings.jsonl");
    let dead_path = out.join("dead-letter.jsonl");
    let mut findings: Vec<FindingLine> = read_lines(&findings_path);
    let mut dead: Vec<DeadLetterLine> = read_lines(&dead_path);
    let done: std::collections::HashSet<String> = findings
        .iter()
        .map(|f| f.input.clone())
        .chain(dead.iter().filter_map(|d| d.input.clone()))
        .collect();
    let previous = (findings.len() + dead.len()) as u64;
    // Rewritten whole, so a line cut short by an interrupted run is dropped (and redone).
    let mut findings_file = std::io::BufWriter::new(std::fs::File::create(&findings_path)?);
    for f in &findings {
        serde_json::to_writer(&mut findings_file, f)?;
        findings_file.write_all(b"\n")?;
    }
    let mut dead_file = std::io::BufWriter::new(std::fs::File::create(&dead_path)?);
    for d in &dead {
        serde_json::to_writer(&mut dead_file, d)?;
        dead_file.write_all(b"\n")?;
    }
    let mut sources: HashMap<String, String> = HashMap::new();

    let ingest_bar = bar.clone();
    let (mut ingested, mut ingested_bytes) = (0u64, 0u64);
    let ingest_started = Instant::now();
    let ingest_task = async {
        let r = ingest
            .run_paths_resuming(
                paths,
                producer.as_mut(),
                ingest_cfg.batch,
                &done,
                None,
                |outcome, bytes| {
                    if matches!(outcome, Outcome::Produced | Outcome::DeadLettered) {
                        ingested += 1;
                        ingested_bytes += bytes;
                        let secs = ingest_started.elapsed().as_secs_f64().max(1e-3);
                        ingest_bar.set_message(format!(
                            "{ingested} ingested, {:.1} files/s, {:.1} MB/s read",
                            ingested as f64 / secs,
                            ingested_bytes as f64 / 1e6 / secs
                        ));
                    }
                },
            )
            .await;
        (r, ingest_bar)
    };

    let mut total: Option<u64> = None;
    tokio::pin!(ingest_task);
    let mut ingest_done = false;
    let mut skipped = 0u64;
    let mut resumed = 0u64;
    loop {
        if let Some(t) = total {
            if (findings.len() + dead.len()) as u64 >= t + previous {
                break;
            }
        }
        tokio::select! {
            (r, _) = &mut ingest_task, if !ingest_done => {
                ingest_done = true;
                let report = r.context("ingest could not publish to the in-process bus")?;
                total = Some(report.inputs);
                skipped = report.skipped;
                resumed = report.resumed;
                bar.set_message(format!("{} ingested, {} not DICOM skipped", report.inputs, report.skipped));
            }
            batch = collector.poll_batch(256, Duration::from_millis(5), Duration::from_millis(200)) => {
                let batch = batch?;
                if batch.is_empty() {
                    continue;
                }
                for r in &batch {
                    if r.topic == findings_t {
                        let f: Finding = decode(&r.payload).map_err(anyhow::Error::msg)?;
                        // --- DICOM outputs (SR, Secondary Capture) into DIR/dicom/ ---
                        let (sr, sc) = (f.sr.clone(), f.sc.clone());
                        let mut line = FindingLine::from(f);
                        for (blob, kind) in [(sr, "sr"), (sc, "sc")] {
                            let Some(blob) = blob else { continue };
                            let name = format!("dicom/{}.{kind}.dcm", line.sop_instance_uid);
                            std::fs::create_dir_all(out.join("dicom"))?;
                            std::fs::write(out.join(&name), store.get(&blob).await?)
                                .with_context(|| format!("writing {name}"))?;
                            if kind == "sr" { line.sr = Some(name) } else { line.sc = Some(name) }
                        }
                        // --- end DICOM outputs ---
                        serde_json::to_writer(&mut findings_file, &line)?;
                        findings_file.write_all(b"\n")?;
                        findings.push(line);
                    } else {
                        let d: DeadLetter = decode(&r.payload).map_err(anyhow::Error::msg)?;
                        if sources.is_empty() || d.input.as_ref().is_some_and(|i| !sources.contains_key(i)) {
                            sources = ingest.linkage.sources().await.unwrap_or_default();
                        }
                        let source = d.input.as_ref().and_then(|i| sources.get(i).cloned()).unwrap_or_else(|| "(unknown)".into());
                        let line = DeadLetterLine { source, input: d.input, stage: d.stage, kind: d.kind, reason: d.reason };
                        serde_json::to_writer(&mut dead_file, &line)?;
                        dead_file.write_all(b"\n")?;
                        dead.push(line);
                    }
                }
                collector.commit(vec![]).await?;
                bar.set_position((findings.len() + dead.len()) as u64);
            }
            _ = failed_rx.changed() => {
                let why = failed_rx.borrow().clone().unwrap_or_default();
                bail!("a stage stopped: {why}");
            }
        }
    }
    findings_file.flush()?;
    dead_file.flush()?;
    // The audit sink must hold every finding before the report reads it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let audit_group = format!("{}.audit", topics.prefix);
    while bus.lag(&audit_group, &findings_t) > 0
        || bus.lag(&audit_group, &topics.name("labels")) > 0
    {
        if Instant::now() > deadline {
            bail!("the audit sink did not catch up within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send(true).ok();
    for t in tasks {
        t.await.ok();
    }
    bar.finish_and_clear();
    let summary = ScanSummary {
        inputs: total.unwrap_or(0) + previous,
        findings: findings.len(),
        dead_letters: dead.len(),
        skipped,
        seconds: started.elapsed().as_secs_f64(),
    };
    let regions = db.by_region().await?;
    db.close().await;
    // --- study summaries and overlay thumbnails for the report ---
    let studies = report::study_summaries(&findings);
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(out.join("studies.jsonl"))?);
        for s in &studies {
            serde_json::to_writer(&mut f, s)?;
            f.write_all(b"\n")?;
        }
        f.flush()?;
    }
    let views = report::Views {
        thumbnails: report::thumbnails(out, &findings),
        studies,
    };
    // --- end study summaries ---
    let evaluation = match labels {
        Some(_) => {
            let e = fracture_audit::evaluate::evaluate(
                &out.join("findings.jsonl"),
                &out.join("labels.csv"),
                &fracture_audit::evaluate::EvalOptions::default(),
            )?;
            std::fs::write(out.join("metrics.json"), serde_json::to_vec_pretty(&e)?)?;
            std::fs::write(
                out.join("evaluation.html"),
                fracture_audit::evaluate::to_html(&e),
            )?;
            Some(e)
        }
        None => None,
    };
    std::fs::write(
        out.join("report.html"),
        report::html(
            &manifest,
            &findings,
            &dead,
            &regions,
            &summary,
            evaluation.as_ref(),
            &views,
        ),
    )?;
    let rate = total.unwrap_or(0) as f64 / summary.seconds.max(1e-9);
    println!(
        "scanned {} inputs in {:.1} s ({rate:.2} inputs/s): {} findings ({} fracture), {} dead letters, {} files skipped as not DICOM",
        total.unwrap_or(0),
        summary.seconds,
        summary.findings,
        findings.iter().filter(|f| f.fracture).count(),
        summary.dead_letters,
        summary.skipped
    );
    if resumed > 0 {
        println!(
            "resumed: {resumed} inputs were already done in {} and were not scanned again",
            out.display()
        );
    }
    if !manifest.trained {
        println!(
            "WARNING: model {} was never trained on a real radiograph; its scores say nothing about a \
             patient. Not for clinical use.",
            manifest.model_version
        );
    }
    // The claim-check store was the pipeline's scratch space: every input is now accounted for
    // in findings.jsonl or dead-letter.jsonl, and the SR and SC copies are in dicom/. For an
    // archive back-scan it would otherwise hold about twice the archive's size.
    if !keep_store {
        let store_dir = out.join("store");
        drop(store);
        match std::fs::remove_dir_all(&store_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!(
                "could not remove {} ({e}); it holds only intermediate objects and may be deleted",
                store_dir.display()
            ),
        }
    }
    println!("results in {}", out.display());
    Ok(())
}

/// A reference read as a message on `fracture.labels`.
pub fn label_record(
    topics: &Topics,
    r: &fracture_audit::evaluate::ReferenceRead,
) -> fracture_shared::bus::OutRecord {
    let label = fracture_shared::messages::Label {
        schema: fracture_shared::messages::schema::LABEL.into(),
        sop_instance_uid: r.sop_instance_uid.clone(),
        fracture: r.fracture,
        region: r.region.clone(),
        boxes: vec![],
    };
    fracture_shared::bus::OutRecord {
        topic: topics.name("labels"),
        key: r.sop_instance_uid.clone(),
        payload: fracture_shared::messages::encode(&label),
        headers: vec![],
    }
}

/// The results an earlier run left (unparseable lines, from an interrupted write, are dropped).
fn read_lines<T: serde::de::DeserializeOwned>(path: &Path) -> Vec<T> {
    std::fs::read_to_string(path)
        .map(|text| {
            text.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        })
        .unwrap_or_default()
}
