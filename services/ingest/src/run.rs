//! `fracture serve ingest`: the push doors (C-STORE, STOW-RS) on their own producers, then the
//! folders and the DICOMweb back-scan, each resumed from what is already committed on the bus.

use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fracture_shared::bus::{BusError, Lane, LanedProducer, Producer};
use fracture_shared::messages::{decode, DeadLetter, Deidentified};
use fracture_shared::metrics::StageMetrics;
use fracture_shared::stage::{Shutdown, StageEnv};

use crate::dicomweb::ScanError;
use crate::{read_key, Ingest, IngestConfig, KeyError, Linkage, Outcome, Resume, STAGE};
use fracture_shared::breaker::Breaker;

/// Why the ingest stage could not start or stopped; each says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("ingest.key_file is not set: every ingest replica needs the deployment's de-identification key (at least 32 bytes; `head -c 32 /dev/urandom > key`)")]
    NoKey,
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Policy(#[from] crate::deid::PolicyError),
    #[error(transparent)]
    Linkage(#[from] fracture_edge::linkage::LinkageError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    BackScan(#[from] ScanError),
}

/// Runs the ingest stage until shutdown: the doors `cfg` opens, then `paths` (or
/// `cfg.input_dir`) and the DICOMweb back-scan, then it stays up for the doors.
pub async fn run(env: &StageEnv, cfg: &IngestConfig, paths: &[PathBuf]) -> Result<(), RunError> {
    if cfg.key_file.is_empty() {
        return Err(RunError::NoKey);
    }
    let policy = cfg.policy(read_key(Path::new(&cfg.key_file))?)?;
    let linkage = Linkage::open(Path::new(&cfg.linkage)).await?;
    let ingest = Arc::new(Ingest {
        policy,
        store: env.store.clone(),
        topics: env.topics.clone(),
        linkage,
        retry: env.retry,
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
                crate::scp::serve(&scp, ingest, producer, stop).await
            },
        )
        .await?;
    }
    if !cfg.dicomweb.stow_listen.is_empty() {
        let dw = cfg.dicomweb.clone();
        open_door(
            env,
            &ingest,
            "ingest-stow",
            "the STOW-RS endpoint",
            move |ingest, producer, stop| async move {
                crate::dicomweb::serve_stow(&dw, ingest, producer, stop).await
            },
        )
        .await?;
    }
    let mut inputs: Vec<PathBuf> = paths.to_vec();
    if inputs.is_empty() && !cfg.input_dir.is_empty() {
        inputs.push(PathBuf::from(&cfg.input_dir));
    }
    let instance = format!("{}.{STAGE}.{}", env.topics.prefix, env.instance);
    let producer = env
        .retry
        .retry("the broker is not reachable yet")
        .until(&env.shutdown)
        .run(|| env.bus.producer(&instance), |_| true)
        .await?;
    // Without two lanes everything travels in the live one.
    let lane = if env.lanes.enabled {
        cfg.lane
    } else {
        Lane::Live
    };
    let mut producer: Box<dyn Producer> =
        Box::new(LanedProducer::new(producer, env.topics.clone(), lane));
    env.health.set_ready(true);
    env.metrics.ready_gauge.with_label_values(&[STAGE]).set(1);
    if !inputs.is_empty() {
        // Exactly once across crashes: our producer's start fenced any earlier incarnation and
        // aborted its open transaction, so what is committed on our output topics now is
        // exactly what was ingested before; skip those inputs.
        let done = ingested_before_retrying(env).await?;
        // A file that killed earlier processes while being read is set aside, not read forever.
        let mut breaker = Breaker::new(env.store.clone(), STAGE, env.retry.crash_limit);
        let resume = Resume {
            done: &done,
            stop: Some(&env.shutdown),
            breaker: Some((&mut breaker, env.instance.clone())),
        };
        let report = ingest
            .run_paths_resuming(
                &inputs,
                producer.as_mut(),
                cfg.batch,
                resume,
                |outcome, _| count(&env.metrics, outcome),
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
        crate::dicomweb::back_scan(
            &cfg.dicomweb,
            &ingest,
            producer.as_mut(),
            cfg.batch,
            &done,
            Some(&env.shutdown),
            |outcome, _| count(&env.metrics, outcome),
        )
        .await?;
    }
    // The doors stay open, and the health endpoint up, until the stage is told to stop.
    let mut shutdown: Shutdown = env.shutdown.clone();
    shutdown.wait().await;
    producer.close().await?;
    Ok(())
}

/// [`ingested_before`], waiting for the broker as long as the stage is not told to stop.
async fn ingested_before_retrying(env: &StageEnv) -> Result<HashSet<String>, BusError> {
    env.retry
        .retry("cannot read what was ingested before")
        .until(&env.shutdown)
        .run(|| ingested_before(env), |_| true)
        .await
}

/// Ingest's counters (it has no StageRunner to keep them).
fn count(metrics: &StageMetrics, outcome: Outcome) {
    match outcome {
        Outcome::Produced => metrics.processed.with_label_values(&[STAGE, "all"]).inc(),
        Outcome::DeadLettered => metrics
            .dead_lettered
            .with_label_values(&[STAGE, "data"])
            .inc(),
        Outcome::Skipped | Outcome::Resumed => {}
    }
}

/// The pseudonymous references of every input ingest has already published (a radiograph or a
/// dead letter), from the committed records of its output topics.
async fn ingested_before(env: &StageEnv) -> Result<HashSet<String>, BusError> {
    // Both lanes: the lane may have been changed since.
    let mut topics = env.topics.lanes_of::<Deidentified>();
    let dead = env.topics.of::<DeadLetter>();
    topics.push(dead.clone());
    let records = env.bus.read_committed(&topics).await?;
    let mut done = HashSet::new();
    for r in &records {
        if r.topic != dead {
            if let Ok(m) = decode::<Deidentified>(&r.payload) {
                done.insert(m.id.input);
            }
        } else if let Ok(d) = decode::<DeadLetter>(&r.payload) {
            if d.stage == STAGE {
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

/// Starts a push door on its own transactional producer (`<prefix>.<name>.<instance>`); `what`
/// names it in the log if it stops.
async fn open_door<F, Fut>(
    env: &StageEnv,
    ingest: &Arc<Ingest>,
    name: &str,
    what: &'static str,
    serve: F,
) -> Result<(), BusError>
where
    F: FnOnce(Arc<Ingest>, Arc<tokio::sync::Mutex<Box<dyn Producer>>>, Shutdown) -> Fut
        + Send
        + 'static,
    Fut: Future<Output = std::io::Result<()>> + Send + 'static,
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
