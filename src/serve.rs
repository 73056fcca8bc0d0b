//! `fracture serve <stage>`: one stage as its own process on Kafka, with its metrics and health
//! endpoint, stopping cleanly on SIGTERM or Ctrl-C.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use fracture_shared::bus::{Bus, BusError, KafkaBus, Topics};
use fracture_shared::metrics::{self, Health, StageMetrics};
use fracture_shared::stage::{Shutdown, StageEnv};
use fracture_shared::store::BlobStore;
use fracture_shared::telemetry;

use crate::config::Config;
use crate::stages::{Stage, StageSpec};

/// `fracture topics`: creates the pipeline's topics (idempotent) and lists them.
pub async fn create_topics(cfg: &Config) -> anyhow::Result<()> {
    let kafka = &cfg.kafka;
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
    cfg: &Config,
    stage: Stage,
    paths: &[PathBuf],
    instance: &str,
) -> anyhow::Result<()> {
    let tcfg = &cfg.telemetry;
    telemetry::init(tcfg);
    if !tcfg.otlp_endpoint.is_empty() {
        let service = format!("fracture-{}", stage.name());
        fracture_shared::otlp::install(&tcfg.otlp_endpoint, &service);
    }
    let kafka = &cfg.kafka;
    let topics = Topics::new(&kafka.topic_prefix);
    let bus: Arc<dyn Bus> = Arc::new(KafkaBus::new(kafka.clone()));
    let metrics = StageMetrics::new();
    let store = BlobStore::open(&cfg.store)?.counted(metrics.store_bytes.clone());
    let health = Health::default();
    if !tcfg.metrics_addr.is_empty() {
        let addr = metrics::serve(&tcfg.metrics_addr, metrics.clone(), health.clone())
            .await
            .with_context(|| format!("cannot listen on {} for /metrics", tcfg.metrics_addr))?;
        tracing::info!(%addr, "metrics and health endpoint");
    }
    let (stop, shutdown) = Shutdown::new();
    tokio::spawn(signals(stop));
    let retry = cfg.retry;
    // Topics are created idempotently, so a fresh cluster works without a separate step.
    let all = topics.all();
    retry
        .retry("the broker is not reachable yet")
        .until(&shutdown)
        .run(
            || bus.create_topics(&all, kafka.partitions),
            |_: &BusError| true,
        )
        .await?;
    let env = StageEnv {
        bus,
        store,
        topics,
        metrics,
        health,
        shutdown,
        instance: instance.to_string(),
        retry,
        lanes: cfg.lanes,
    };
    let result = match StageSpec::from_config(stage, cfg, paths).await {
        Ok(spec) => spec.run(&env).await,
        Err(e) => Err(e),
    };
    fracture_shared::otlp::flush(Duration::from_secs(5)).await;
    result
}
