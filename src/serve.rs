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

/// How long a stopping stage waits for its last spans to be exported.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
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
    let exporting = match crate::otel::plan(
        &tcfg.otlp_endpoint,
        stage.name(),
        crate::otel::env_var,
    )? {
        None => None,
        Some(plan) => {
            let provider = {
                let plan = plan.clone();
                tokio::task::spawn_blocking(move || crate::otel::provider(&plan)).await??
            };
            telemetry::install_tracer_provider(&provider);
            tracing::info!(endpoint = %plan.endpoint, service = plan.service_name.as_deref().unwrap_or("(from OTEL_*)"), "exporting spans over OTLP/HTTP");
            Some(provider)
        }
    };
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
    if let Some(provider) = exporting {
        // The spans still queued get one bounded try: a collector that is down must not hold a
        // stopping stage past its grace period.
        let flushed =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(FLUSH_TIMEOUT))
                .await;
        if let Ok(Err(e)) = flushed {
            tracing::warn!(error = %e, "spans still queued at shutdown may be lost");
        }
    }
    result
}
