//! Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` endpoint of a serving stage.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The metrics every stage reports, labelled by stage.
#[derive(Clone)]
pub struct StageMetrics {
    pub registry: Registry,
    /// `fracture_radiographs_processed_total{stage,region}`
    pub processed: IntCounterVec,
    /// `fracture_dead_letters_total{stage,kind}`
    pub dead_lettered: IntCounterVec,
    /// `fracture_stage_seconds{stage}`: wall time per batch.
    pub batch_seconds: HistogramVec,
    /// `fracture_batch_size{stage}`
    pub batch_size: HistogramVec,
    /// `fracture_retries_total{stage,kind}`
    pub retries: IntCounterVec,
    /// `fracture_ready{stage}`: 1 when connected to the bus and the store.
    pub ready_gauge: IntGaugeVec,
    /// `fracture_consumer_lag{stage}`: records on this replica's assigned partitions not yet
    /// consumed (librdkafka's statistics, every few seconds); what autoscaling should follow.
    pub consumer_lag: IntGaugeVec,
    /// `fracture_store_bytes_total{op}`: claim-check bytes this process wrote (`put`; a put of
    /// content already there writes nothing) and read (`get`): the store's share of a capacity
    /// plan.
    pub store_bytes: IntCounterVec,
}

impl Default for StageMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl StageMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let processed = IntCounterVec::new(
            Opts::new(
                "fracture_radiographs_processed_total",
                "Radiographs a stage finished",
            ),
            &["stage", "region"],
        )
        .expect("valid metric");
        let dead_lettered = IntCounterVec::new(
            Opts::new(
                "fracture_dead_letters_total",
                "Inputs sent to the dead-letter topic",
            ),
            &["stage", "kind"],
        )
        .expect("valid metric");
        let batch_seconds = HistogramVec::new(
            HistogramOpts::new("fracture_stage_seconds", "Wall time per batch").buckets(vec![
                0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["stage"],
        )
        .expect("valid metric");
        let batch_size = HistogramVec::new(
            HistogramOpts::new("fracture_batch_size", "Records per batch")
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]),
            &["stage"],
        )
        .expect("valid metric");
        let retries = IntCounterVec::new(
            Opts::new("fracture_retries_total", "Attempts retried after an error"),
            &["stage", "kind"],
        )
        .expect("valid metric");
        let ready_gauge = IntGaugeVec::new(
            Opts::new(
                "fracture_ready",
                "1 when the stage is connected to its bus and store",
            ),
            &["stage"],
        )
        .expect("valid metric");
        let consumer_lag = IntGaugeVec::new(
            Opts::new(
                "fracture_consumer_lag",
                "Records on this replica's partitions not yet consumed",
            ),
            &["stage"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(consumer_lag.clone()))
            .expect("unique metric");
        let store_bytes = IntCounterVec::new(
            Opts::new(
                "fracture_store_bytes_total",
                "Bytes written to (put) and read from (get) the claim-check store",
            ),
            &["op"],
        )
        .expect("valid metric");
        for c in [&processed, &dead_lettered, &retries, &store_bytes] {
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
        }
        registry
            .register(Box::new(batch_seconds.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(batch_size.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(ready_gauge.clone()))
            .expect("unique metric");
        Self {
            registry,
            processed,
            dead_lettered,
            batch_seconds,
            batch_size,
            retries,
            ready_gauge,
            consumer_lag,
            store_bytes,
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding gathered families into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Liveness and readiness, shared between the stage and its HTTP endpoint.
#[derive(Clone, Default)]
pub struct Health {
    ready: Arc<AtomicBool>,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

/// Serves the endpoint until the process ends; returns the bound address (port 0 picks one).
pub async fn serve(
    addr: &str,
    metrics: StageMetrics,
    health: Health,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(move || async move { metrics.render() }))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || async move {
                if health.is_ready() {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                }
            }),
        );
    tokio::spawn(async move {
        if let Err(e) = crate::http::serve(listener, app, std::future::pending()).await {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let m = StageMetrics::new();
        m.processed
            .with_label_values(&["preprocess", "wrist"])
            .inc();
        let health = Health::default();
        let addr = serve("127.0.0.1:0", m, health.clone()).await.unwrap();
        let metrics = get(addr, "/metrics").await;
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        assert!(
            metrics.contains(
                "fracture_radiographs_processed_total{region=\"wrist\",stage=\"preprocess\"} 1"
            ),
            "{metrics}"
        );
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        health.set_ready(true);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
    }
}
