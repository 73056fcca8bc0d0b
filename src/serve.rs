//! `fracture serve <stage>`: one stage as its own process on Kafka, with its metrics and health
//! endpoint, stopping cleanly on SIGTERM or Ctrl-C.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use fracture_shared::bus::{Bus, KafkaBus, KafkaConfig, Topics};
use fracture_shared::config::Settings;
use fracture_shared::metrics::{self, Health, StageMetrics};
use fracture_shared::stage::{Shutdown, StageEnv};
use fracture_shared::store::{BlobStore, StoreConfig};
use fracture_shared::telemetry::{self, TelemetryConfig};
use fracture_shared::RetryPolicy;

use crate::{wiring, Stage};

pub async fn create_topics(settings: &Settings) -> anyhow::Result<()> {
    let kafka: KafkaConfig = settings.section("kafka")?;
    let bus = KafkaBus::new(kafka.clone());
    let topics = Topics::new(&kafka.topic_prefix);
    bus.create_topics(&topics.all(), kafka.partitions).await?;
    for t in topics.all() {
        println!("{t}");
    }
    Ok(())
}

async fn signals(stop: tokio::sync::watch::Sender<bool>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        } else {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("shutting down");
    let _ = stop.send(true);
}

pub async fn run(
    settings: &Settings,
    stage: Stage,
    paths: &[PathBuf],
    instance: &str,
) -> anyhow::Result<()> {
    let tcfg: TelemetryConfig = settings.section("telemetry")?;
    telemetry::init(&tcfg);
    if !tcfg.otlp_endpoint.is_empty() {
        let service = format!("fracture-{}", format!("{stage:?}").to_lowercase());
        fracture_shared::otlp::install(&tcfg.otlp_endpoint, &service);
    }
    let kafka: KafkaConfig = settings.section("kafka")?;
    let topics = Topics::new(&kafka.topic_prefix);
    let bus: Arc<dyn Bus> = Arc::new(KafkaBus::new(kafka.clone()));
    let store = BlobStore::open(&settings.section::<StoreConfig>("store")?)?;
    let metrics = StageMetrics::new();
    let health = Health::default();
    if !tcfg.metrics_addr.is_empty() {
        let addr = metrics::serve(&tcfg.metrics_addr, metrics.clone(), health.clone())
            .await
            .with_context(|| format!("cannot listen on {} for /metrics", tcfg.metrics_addr))?;
        tracing::info!(%addr, "metrics and health endpoint");
    }
    let (stop, shutdown) = Shutdown::new();
    tokio::spawn(signals(stop));
    // Topics are created idempotently, so a fresh cluster works without a separate step.
    loop {
        match bus.create_topics(&topics.all(), kafka.partitions).await {
            Ok(()) => break,
            Err(e) if !shutdown.is_set() => {
                tracing::warn!(error = %e, "broker not reachable yet, retrying");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let env = StageEnv {
        bus: bus.clone(),
        store,
        topics: topics.clone(),
        metrics,
        health: health.clone(),
        shutdown: shutdown.clone(),
        instance: instance.to_string(),
        retry: settings.section::<RetryPolicy>("retry")?,
    };
    let result = run_stage(settings, stage, &env, paths).await;
    fracture_shared::otlp::flush(std::time::Duration::from_secs(5)).await;
    result
}

async fn run_stage(
    settings: &Settings,
    stage: Stage,
    env: &StageEnv,
    paths: &[PathBuf],
) -> anyhow::Result<()> {
    let env = env.clone();
    match stage {
        Stage::Ingest => serve_ingest(settings, &env, paths).await?,
        Stage::Preprocess => {
            let (_, m) = wiring::manifest(settings, None)?;
            fracture_preprocess::run(&env, &settings.section("preprocess")?, m.transform).await?
        }
        Stage::Ensemble => {
            let e = wiring::ensemble(settings, None)?;
            fracture_ensemble::run(&env, &settings.section("ensemble")?, e).await?
        }
        Stage::Postprocess => {
            let (_, m) = wiring::manifest(settings, None)?;
            let cfg: fracture_postprocess::PostprocessConfig = settings.section("postprocess")?;
            if let Some(export) = &cfg.export {
                // A wrong PACS address or AE title is said at start, not at the first finding.
                export.validate().map_err(anyhow::Error::msg)?;
            }
            fracture_postprocess::run(&env, &cfg, Arc::new(m)).await?
        }
        Stage::Audit => {
            let cfg: fracture_audit::AuditConfig = settings.section("audit")?;
            let db = fracture_audit::AuditDb::open(&cfg.database).await?;
            if !cfg.dashboard_addr.is_empty() {
                let addr = fracture_audit::serve_dashboard(&cfg, db.clone()).await?;
                tracing::info!(%addr, token = !cfg.dashboard_token.is_empty(), "audit dashboard");
            }
            fracture_audit::run(&env, &cfg, db.clone()).await?;
            db.close().await;
        }
    }
    Ok(())
}

async fn serve_ingest(
    settings: &Settings,
    env: &StageEnv,
    paths: &[PathBuf],
) -> anyhow::Result<()> {
    use fracture_ingest::{Ingest, IngestConfig, Linkage};
    let cfg: IngestConfig = settings.section("ingest")?;
    if cfg.key_file.is_empty() {
        anyhow::bail!("ingest.key_file is not set: every ingest replica needs the deployment's de-identification key (at least 32 bytes; `head -c 32 /dev/urandom > key`)");
    }
    let policy = cfg
        .policy(fracture_ingest::read_key(Path::new(&cfg.key_file)).map_err(anyhow::Error::msg)?)?;
    let linkage = Linkage::open(Path::new(&cfg.linkage)).await?;
    let ingest = std::sync::Arc::new(Ingest {
        policy,
        store: env.store.clone(),
        topics: env.topics.clone(),
        linkage,
    });
    // Each push door has its own transactional producer, so a long folder ingest never holds up
    // a modality's answer.
    if !cfg.scp.listen.is_empty() {
        tracing::info!(listen = %cfg.scp.listen, ae_title = %cfg.scp.ae_title, "DICOM C-STORE SCP");
        let scp = cfg.scp.clone();
        open_door(
            env,
            &ingest,
            "ingest-scp",
            "the C-STORE SCP",
            move |ingest, producer, stop| async move {
                fracture_ingest::scp::serve(&scp, ingest, producer, stop).await
            },
        )
        .await?;
    }
    if !cfg.dicomweb.stow_listen.is_empty() {
        // The STOW-RS door (services/ingest/src/dicomweb/stow.rs).
        let dw = cfg.dicomweb.clone();
        open_door(
            env,
            &ingest,
            "ingest-stow",
            "the STOW-RS endpoint",
            move |ingest, producer, stop| async move {
                fracture_ingest::dicomweb::serve_stow(&dw, ingest, producer, stop).await
            },
        )
        .await?;
    }
    let mut inputs: Vec<PathBuf> = paths.to_vec();
    if inputs.is_empty() && !cfg.input_dir.is_empty() {
        inputs.push(PathBuf::from(&cfg.input_dir));
    }
    let instance = format!("{}.ingest.{}", env.topics.prefix, env.instance);
    let mut producer = loop {
        match env.bus.producer(&instance).await {
            Ok(p) => break p,
            Err(e) if !env.shutdown.is_set() => {
                tracing::warn!(error = %e, "broker not reachable yet, retrying");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    env.health.set_ready(true);
    env.metrics
        .ready_gauge
        .with_label_values(&[fracture_ingest::STAGE])
        .set(1);
    if !inputs.is_empty() {
        // Exactly once across crashes: our producer's start fenced any earlier incarnation and
        // aborted its open transaction, so what is committed on our output topics now is
        // exactly what was ingested before; skip those inputs.
        let done = ingested_before_retrying(env).await?;
        let report = ingest
            .run_paths_resuming(
                &inputs,
                producer.as_mut(),
                cfg.batch,
                &done,
                Some(&env.shutdown),
                |outcome, _| count_ingested(&env.metrics, outcome),
            )
            .await?;
        tracing::info!(
            inputs = report.inputs,
            produced = report.produced,
            dead_letters = report.dead_lettered,
            skipped = report.skipped,
            resumed = report.resumed,
            "ingest finished its inputs"
        );
    }
    if !cfg.dicomweb.url.is_empty() && !env.shutdown.is_set() {
        // The QIDO-RS/WADO-RS back-scan of a PACS, resumed like the folders: what is committed
        // (read after our producer fenced its predecessor) is skipped.
        let done = ingested_before_retrying(env).await?;
        // It logs its own counts; a stop part-way is resumed by the next start.
        fracture_ingest::dicomweb::back_scan(
            &cfg.dicomweb,
            &ingest,
            producer.as_mut(),
            cfg.batch,
            &done,
            Some(&env.shutdown),
            |outcome, _| count_ingested(&env.metrics, outcome),
        )
        .await?;
    }
    // Stay up (health endpoint, and the doors of later releases) until told to stop.
    let mut shutdown: Shutdown = env.shutdown.clone();
    shutdown.wait().await;
    producer.close().await?;
    Ok(())
}

/// [`ingested_before`], waiting for the broker as long as the stage is not told to stop.
async fn ingested_before_retrying(
    env: &StageEnv,
) -> Result<std::collections::HashSet<String>, fracture_shared::bus::BusError> {
    loop {
        match ingested_before(env).await {
            Ok(done) => return Ok(done),
            Err(e) if !env.shutdown.is_set() => {
                tracing::warn!(error = %e, "cannot read what was ingested before, retrying");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Ingest's counters (it has no StageRunner to keep them).
fn count_ingested(metrics: &StageMetrics, outcome: fracture_ingest::Outcome) {
    match outcome {
        fracture_ingest::Outcome::Produced => metrics
            .processed
            .with_label_values(&[fracture_ingest::STAGE, "all"])
            .inc(),
        fracture_ingest::Outcome::DeadLettered => metrics
            .dead_lettered
            .with_label_values(&[fracture_ingest::STAGE, "data"])
            .inc(),
        _ => {}
    }
}

/// The pseudonymous references of every input ingest has already published (a radiograph or a
/// dead letter), from the committed records of its output topics.
async fn ingested_before(
    env: &StageEnv,
) -> Result<std::collections::HashSet<String>, fracture_shared::bus::BusError> {
    use fracture_shared::messages::{decode, DeadLetter, Deidentified};
    let topics = [
        env.topics.of::<Deidentified>(),
        env.topics.of::<DeadLetter>(),
    ];
    let records = env.bus.read_committed(&topics).await?;
    let mut done = std::collections::HashSet::new();
    for r in &records {
        if r.topic == topics[0] {
            if let Ok(m) = decode::<Deidentified>(&r.payload) {
                done.insert(m.id.input);
            }
        } else if let Ok(d) = decode::<DeadLetter>(&r.payload) {
            if d.stage == fracture_ingest::STAGE {
                done.extend(d.input);
            }
        }
    }
    tracing::info!(
        records = records.len(),
        inputs = done.len(),
        "read what was ingested before"
    );
    Ok(done)
}

/// `fracture labels import`: pseudonymises the reference reads with the ingest key (so they meet
/// the findings) and publishes them on `fracture.labels` in one transaction.
pub async fn import_labels(
    settings: &Settings,
    file: &Path,
    out: Option<&Path>,
) -> anyhow::Result<()> {
    use fracture_ingest::{DeidPolicy, IngestConfig};
    telemetry::init(&settings.section::<TelemetryConfig>("telemetry")?);
    let cfg: IngestConfig = settings.section("ingest")?;
    if cfg.key_file.is_empty() {
        anyhow::bail!(
            "ingest.key_file is not set: labels must be pseudonymised with the same key as ingest"
        );
    }
    let policy = DeidPolicy::new(
        fracture_ingest::read_key(Path::new(&cfg.key_file)).map_err(anyhow::Error::msg)?,
        &cfg.site_code,
        &cfg.uid_root,
    )?;
    let out = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| file.with_extension("pseudonymised.csv"));
    let reads =
        fracture_audit::evaluate::pseudonymise_labels(file, &out, |u| policy.pseudonymise_uid(u))?;
    let kafka: KafkaConfig = settings.section("kafka")?;
    let topics = Topics::new(&kafka.topic_prefix);
    let bus = KafkaBus::new(kafka);
    bus.create_topics(
        &[topics.name("labels")],
        settings.section::<KafkaConfig>("kafka")?.partitions,
    )
    .await?;
    let mut producer = bus
        .producer(&format!(
            "{}.labels-import.{}",
            topics.prefix,
            std::process::id()
        ))
        .await?;
    let records: Vec<_> = reads
        .iter()
        .map(|r| crate::scan::label_record(&topics, r))
        .collect();
    producer.send(records).await?;
    producer.close().await?;
    println!(
        "published {} reference reads on {}; pseudonymised copy: {}",
        reads.len(),
        topics.name("labels"),
        out.display()
    );
    Ok(())
}

/// Starts a push door of `serve ingest` on its own transactional producer (`<prefix>.<name>.<instance>`);
/// `what` names it in the log if it stops.
async fn open_door<F, Fut>(
    env: &StageEnv,
    ingest: &Arc<fracture_ingest::Ingest>,
    name: &str,
    what: &'static str,
    serve: F,
) -> anyhow::Result<()>
where
    F: FnOnce(
            Arc<fracture_ingest::Ingest>,
            Arc<tokio::sync::Mutex<Box<dyn fracture_shared::bus::Producer>>>,
            Shutdown,
        ) -> Fut
        + Send
        + 'static,
    Fut: std::future::Future<Output = std::io::Result<()>> + Send + 'static,
{
    let producer = env
        .bus
        .producer(&format!("{}.{name}.{}", env.topics.prefix, env.instance))
        .await?;
    let producer = Arc::new(tokio::sync::Mutex::new(producer));
    let (ingest, shutdown) = (ingest.clone(), env.shutdown.clone());
    tokio::spawn(async move {
        if let Err(e) = serve(ingest, producer, shutdown).await {
            tracing::error!(error = %e, "{} stopped", what);
        }
    });
    Ok(())
}
