//! `fracture scan`: all five stages in one process on the in-process bus, with a local
//! claim-check folder and an embedded database, writing the results into one folder. In three
//! steps: [`start`] the pipeline, [`collect`] its results while ingest reads the inputs, then
//! [`report`] them.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use fracture_audit::AuditDb;
use fracture_edge::linkage::Linkage;
use fracture_ingest::{Ingest, Outcome};
use fracture_models::Manifest;
use fracture_shared::bus::{Bus, InProcBus, Producer, StageIo, Topics};
use fracture_shared::messages::{
    decode, DeadLetter, Deidentified, Finding, Label, Message, Preprocessed, Scored,
};
use fracture_shared::metrics::{Health, StageMetrics};
use fracture_shared::stage::{Shutdown, StageEnv};
use fracture_shared::store::{BlobStore, StoreConfig};

use crate::config::Config;
use crate::results::{read_lines, DeadLetterLine, FindingLine, ScanSummary};
use crate::stages::{spawn_stage, StageSpec};
use crate::{labels, report, wiring};

/// What `fracture scan` was asked to do.
#[derive(clap::Args)]
pub struct ScanArgs {
    /// DICOM files or folders to scan (recursively).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Output folder: findings.jsonl, dead-letter.jsonl, linkage.db, report.html.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// De-identification key file (at least 32 bytes); default: DIR/deid.key, created if missing.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// Ensemble manifest (overrides model.manifest).
    #[arg(long, value_name = "FILE")]
    pub model: Option<PathBuf>,
    /// Reference reads keyed by original SOP Instance UID (sop_instance_uid,region,fracture,x0,y0,x1,y1):
    /// pseudonymised into DIR/labels.csv, stored by the audit sink, and evaluated into DIR/metrics.json.
    #[arg(long, value_name = "FILE")]
    pub labels: Option<PathBuf>,
    /// Keep DIR/store, the pipeline's claim-check store (de-identified copies, pre-processed
    /// tensors, SR and SC objects). By default it is removed when the scan has finished,
    /// since the results are in findings.jsonl, dicom/ and report.html; an interrupted scan
    /// keeps it until the resumed one finishes.
    #[arg(long)]
    pub keep_store: bool,
}

pub async fn run(cfg: &Config, args: &ScanArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut pipeline = start(cfg, args).await?;
    let collected = collect(&mut pipeline, args).await?;
    let pipeline = pipeline.stop().await?;
    report(pipeline, collected, args, started).await
}

/// The running pipeline: the stages behind the in-process bus, and the scan's own ends of it.
struct Pipeline {
    bus: InProcBus,
    topics: Topics,
    store: BlobStore,
    manifest: Arc<Manifest>,
    db: AuditDb,
    ingest: Ingest,
    ingest_batch: usize,
    producer: Box<dyn Producer>,
    collector: Box<dyn StageIo>,
    stop: watch::Sender<bool>,
    failed: watch::Receiver<Option<String>>,
    tasks: Vec<JoinHandle<()>>,
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
    Ok(fracture_ingest::read_key(&path)?)
}

/// Opens the folder, the store, the linkage table, the model and the audit database, and starts
/// preprocess, ensemble, postprocess and audit on the in-process bus; ingest is driven by
/// [`collect`], and reference reads (`--labels`) are published before any finding.
async fn start(cfg: &Config, args: &ScanArgs) -> anyhow::Result<Pipeline> {
    let out = args.out.as_path();
    let mut tcfg = cfg.telemetry.clone();
    if tcfg.log == fracture_shared::telemetry::TelemetryConfig::default().log {
        // The progress bar is the scan's voice; only warnings and errors interrupt it.
        tcfg.log = "warn".into();
    }
    fracture_shared::telemetry::init(&tcfg);
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create the output folder {}", out.display()))?;
    let ingest_cfg = &cfg.ingest;
    let mut policy =
        ingest_cfg.policy(key(out, args.key_file.as_deref(), &ingest_cfg.key_file)?)?;
    // A scan keeps what ingest refused beside its results, at the edge.
    policy.quarantine = Some(out.join("quarantine"));
    let store = BlobStore::open(&StoreConfig {
        url: out.join("store").display().to_string(),
        ..Default::default()
    })?;
    let linkage = Linkage::open(&out.join("linkage.db")).await?;
    let ensemble = wiring::ensemble(&cfg.model, args.model.as_deref())?;
    let manifest = Arc::new(ensemble.manifest().clone());
    let db = AuditDb::open(&format!("sqlite://{}", out.join("audit.db").display())).await?;

    let bus = InProcBus::new();
    let topics = Topics::default();
    bus.create_topics(&topics.all(), 1).await?;
    for (stage, topic) in [
        (fracture_preprocess::STAGE, Deidentified::TOPIC),
        (fracture_ensemble::STAGE, Preprocessed::TOPIC),
        (fracture_postprocess::STAGE, Scored::TOPIC),
        (fracture_audit::STAGE, Finding::TOPIC),
        (fracture_audit::STAGE, Label::TOPIC),
    ] {
        bus.register_group(&format!("{}.{stage}", topics.prefix), &topics.name(topic))?;
    }
    let collector = bus
        .consumer(
            "scan-collector",
            &[topics.of::<Finding>(), topics.of::<DeadLetter>()],
            "scan",
        )
        .await?;

    let retry = cfg.retry;
    let (stop, shutdown) = Shutdown::new();
    let env = StageEnv {
        bus: Arc::new(bus.clone()),
        store: store.clone(),
        topics: topics.clone(),
        metrics: StageMetrics::new(),
        health: Health::default(),
        shutdown,
        instance: "scan".into(),
        retry,
        // One process, one producer: everything travels in the live lane, so the stages need
        // not watch a second one.
        lanes: fracture_shared::bus::LaneConfig {
            enabled: false,
            ..cfg.lanes
        },
    };
    if !cfg.export.pacs.is_empty() {
        eprintln!(
            "note: [export] is for `fracture serve export`; this scan sends nothing to a PACS"
        );
    }
    // A scan summarises its studies at its end (in the report), not on a quiet-period timer.
    let mut postprocess = cfg.postprocess.clone();
    postprocess.studies.enabled = false;
    let specs = [
        StageSpec::Preprocess {
            cfg: cfg.preprocess,
            transform: manifest.transform.clone(),
        },
        StageSpec::Ensemble {
            cfg: cfg.ensemble,
            ensemble,
        },
        StageSpec::Postprocess {
            cfg: postprocess,
            manifest: manifest.clone(),
        },
        StageSpec::Audit {
            cfg: cfg.audit.clone(),
            db: db.clone(),
            own_process: false,
        },
    ];
    let (failed_tx, failed) = watch::channel::<Option<String>>(None);
    let tasks = specs
        .into_iter()
        .map(|spec| spawn_stage(spec, env.clone(), failed_tx.clone()))
        .collect();

    let ingest = Ingest {
        policy,
        store: store.clone(),
        topics: topics.clone(),
        linkage,
        retry,
    };
    let mut producer = bus.producer("scan-ingest").await?;
    // Reference reads, keyed by original UIDs, become labels keyed like the findings.
    if let Some(file) = &args.labels {
        let reads =
            fracture_audit::evaluate::pseudonymise_labels(file, &out.join("labels.csv"), |uid| {
                ingest.policy.pseudonymise_uid(uid)
            })?;
        let records: Vec<_> = reads
            .iter()
            .map(|r| labels::label_record(&topics, r))
            .collect();
        producer.send(records).await?;
    }
    Ok(Pipeline {
        bus,
        topics,
        store,
        manifest,
        db,
        ingest,
        ingest_batch: ingest_cfg.batch,
        producer,
        collector,
        stop,
        failed,
        tasks,
    })
}

/// The scan's results: this run's and an earlier, interrupted run's in the same folder.
struct Collected {
    findings: Vec<FindingLine>,
    dead: Vec<DeadLetterLine>,
    /// Inputs this run sent into the pipeline.
    inputs: u64,
    /// Results an earlier run left in the folder.
    previous: u64,
    skipped: u64,
    resumed: u64,
}

/// Appends each line to `file` as JSON.
fn write_line<T: serde::Serialize>(file: &mut impl Write, line: &T) -> anyhow::Result<()> {
    serde_json::to_writer(&mut *file, line)?;
    file.write_all(b"\n")?;
    Ok(())
}

/// Runs ingest over the inputs and, beside it, writes every finding (with its SR and SC) and
/// every dead letter into the folder as it arrives, until each input is accounted for.
async fn collect(p: &mut Pipeline, args: &ScanArgs) -> anyhow::Result<Collected> {
    let out = args.out.as_path();
    // A re-run into the same folder resumes: inputs already in the results are not sent again.
    let findings_path = out.join("findings.jsonl");
    let dead_path = out.join("dead-letter.jsonl");
    let mut findings: Vec<FindingLine> = read_lines(&findings_path);
    let mut dead: Vec<DeadLetterLine> = read_lines(&dead_path);
    let done: HashSet<String> = findings
        .iter()
        .map(|f| f.input.clone())
        .chain(dead.iter().filter_map(|d| d.input.clone()))
        .collect();
    let previous = (findings.len() + dead.len()) as u64;
    // Rewritten whole, so a line cut short by an interrupted run is dropped (and redone).
    let mut findings_file = std::io::BufWriter::new(std::fs::File::create(&findings_path)?);
    for f in &findings {
        write_line(&mut findings_file, f)?;
    }
    let mut dead_file = std::io::BufWriter::new(std::fs::File::create(&dead_path)?);
    for d in &dead {
        write_line(&mut dead_file, d)?;
    }
    let mut sources: HashMap<String, String> = HashMap::new();

    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {elapsed_precise} {pos} radiographs done ({per_sec}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));

    // Ingest runs beside the collector, so results stream out while files are still being read.
    let (findings_t, ingest, collector) = (p.topics.of::<Finding>(), &p.ingest, &mut p.collector);
    let ingest_bar = bar.clone();
    let (mut ingested, mut ingested_bytes) = (0u64, 0u64);
    let ingest_started = Instant::now();
    let ingest_task = ingest.run_paths_resuming(
        &args.paths,
        p.producer.as_mut(),
        p.ingest_batch,
        fracture_ingest::Resume::skipping(&done),
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
    );
    tokio::pin!(ingest_task);
    let mut total: Option<u64> = None;
    let (mut skipped, mut resumed) = (0, 0);
    loop {
        if total.is_some_and(|t| (findings.len() + dead.len()) as u64 >= t + previous) {
            break;
        }
        tokio::select! {
            r = &mut ingest_task, if total.is_none() => {
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
                        let line = with_dicom_outputs(&p.store, out, decode(&r.payload)?).await?;
                        write_line(&mut findings_file, &line)?;
                        findings.push(line);
                    } else {
                        let d: DeadLetter = decode(&r.payload)?;
                        if sources.is_empty() || d.input.as_ref().is_some_and(|i| !sources.contains_key(i)) {
                            sources = ingest.linkage.sources().await.unwrap_or_default();
                        }
                        let source = d.input.as_ref().and_then(|i| sources.get(i).cloned()).unwrap_or_else(|| "(unknown)".into());
                        let line = DeadLetterLine { source, input: d.input, stage: d.stage, kind: d.kind, reason: d.reason };
                        write_line(&mut dead_file, &line)?;
                        dead.push(line);
                    }
                }
                collector.commit(vec![]).await?;
                bar.set_position((findings.len() + dead.len()) as u64);
            }
            _ = p.failed.changed() => {
                let why = p.failed.borrow().clone().unwrap_or_default();
                bail!("a stage stopped: {why}");
            }
        }
    }
    findings_file.flush()?;
    dead_file.flush()?;
    bar.finish_and_clear();
    Ok(Collected {
        findings,
        dead,
        inputs: total.unwrap_or(0),
        previous,
        skipped,
        resumed,
    })
}

/// A finding as a line of `findings.jsonl`, its SR and Secondary Capture copied from the store
/// into `DIR/dicom/`.
async fn with_dicom_outputs(
    store: &BlobStore,
    out: &Path,
    f: Finding,
) -> anyhow::Result<FindingLine> {
    let (sr, sc) = (f.sr.clone(), f.sc.clone());
    let mut line = FindingLine::from(f);
    for (blob, kind) in [(sr, "sr"), (sc, "sc")] {
        let Some(blob) = blob else { continue };
        let name = format!("dicom/{}.{kind}.dcm", line.sop_instance_uid);
        std::fs::create_dir_all(out.join("dicom"))?;
        std::fs::write(out.join(&name), store.get(&blob).await?)
            .with_context(|| format!("writing {name}"))?;
        if kind == "sr" {
            line.sr = Some(name)
        } else {
            line.sc = Some(name)
        }
    }
    Ok(line)
}

impl Pipeline {
    /// Waits for the audit sink to hold every finding and label (the report reads it), then
    /// stops the stages.
    async fn stop(mut self) -> anyhow::Result<Self> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let audit_group = format!("{}.{}", self.topics.prefix, fracture_audit::STAGE);
        while self.bus.lag(&audit_group, &self.topics.of::<Finding>()) > 0
            || self.bus.lag(&audit_group, &self.topics.of::<Label>()) > 0
        {
            if Instant::now() > deadline {
                bail!("the audit sink did not catch up within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.stop.send(true).ok();
        for t in std::mem::take(&mut self.tasks) {
            t.await.ok();
        }
        Ok(self)
    }
}

/// Writes `studies.jsonl`, `metrics.json` and `evaluation.html` (with `--labels`) and
/// `report.html`, says what was done, and removes the claim-check store.
async fn report(
    p: Pipeline,
    c: Collected,
    args: &ScanArgs,
    started: Instant,
) -> anyhow::Result<()> {
    let out = args.out.as_path();
    let summary = ScanSummary {
        inputs: c.inputs + c.previous,
        findings: c.findings.len(),
        dead_letters: c.dead.len(),
        skipped: c.skipped,
        seconds: started.elapsed().as_secs_f64(),
    };
    let regions = p.db.by_region().await?;
    p.db.close().await;
    let studies = report::study_summaries(&c.findings);
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(out.join("studies.jsonl"))?);
        for s in &studies {
            write_line(&mut f, s)?;
        }
        f.flush()?;
    }
    let views = report::Views {
        thumbnails: report::thumbnails(out, &c.findings),
        studies,
    };
    let evaluation = match args.labels {
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
            &p.manifest,
            &c.findings,
            &c.dead,
            &regions,
            &summary,
            evaluation.as_ref(),
            &views,
        ),
    )?;
    let rate = c.inputs as f64 / summary.seconds.max(1e-9);
    println!(
        "scanned {} inputs in {:.1} s ({rate:.2} inputs/s): {} findings ({} fracture), {} dead letters, {} files skipped as not DICOM",
        c.inputs,
        summary.seconds,
        summary.findings,
        c.findings.iter().filter(|f| f.fracture).count(),
        summary.dead_letters,
        summary.skipped
    );
    if c.resumed > 0 {
        println!(
            "resumed: {} inputs were already done in {} and were not scanned again",
            c.resumed,
            out.display()
        );
    }
    if !p.manifest.trained {
        println!(
            "WARNING: model {} was never trained on a real radiograph; its scores say nothing about a \
             patient. Not for clinical use.",
            p.manifest.model_version
        );
    }
    // The claim-check store was the pipeline's scratch space: every input is now accounted for
    // in findings.jsonl or dead-letter.jsonl, and the SR and SC copies are in dicom/. For an
    // archive back-scan it would otherwise hold about twice the archive's size.
    if !args.keep_store {
        let store_dir = out.join("store");
        drop(p);
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
