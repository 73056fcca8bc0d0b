//! A small OTLP/HTTP (JSON) span exporter: one span per stage per radiograph, so a tracing
//! backend (Jaeger, Tempo, an OpenTelemetry Collector) shows each radiograph as one trace.
//!
//! Spans are queued and posted in batches by a background task; a slow or absent collector drops
//! spans (counted in a warning), it never slows the pipeline. Span attributes never hold PHI.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{SpanContext, SpanId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// One finished span.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub context: SpanContext,
    pub parent: Option<SpanId>,
    pub name: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(String, String)>,
    pub error: bool,
}

enum Msg {
    Span(Box<SpanRecord>),
    Flush(oneshot::Sender<()>),
}

struct Exporter {
    tx: mpsc::Sender<Msg>,
}

static EXPORTER: OnceLock<Exporter> = OnceLock::new();

/// Starts exporting to `endpoint` (e.g. `http://127.0.0.1:4318`) as `service`. Call once, inside
/// a tokio runtime; later calls are ignored.
pub fn install(endpoint: &str, service: &str) {
    let (tx, rx) = mpsc::channel(8192);
    if EXPORTER.set(Exporter { tx }).is_ok() {
        tokio::spawn(run(
            endpoint.trim_end_matches('/').to_string(),
            service.to_string(),
            rx,
        ));
    }
}

/// Queues a span; dropped if no exporter is installed or the queue is full.
pub fn record(span: SpanRecord) {
    if let Some(e) = EXPORTER.get() {
        let _ = e.tx.try_send(Msg::Span(Box::new(span)));
    }
}

pub fn enabled() -> bool {
    EXPORTER.get().is_some()
}

/// Posts what is queued (at shutdown); returns within `timeout`.
pub async fn flush(timeout: Duration) {
    if let Some(e) = EXPORTER.get() {
        let (tx, rx) = oneshot::channel();
        if e.tx.send(Msg::Flush(tx)).await.is_ok() {
            let _ = tokio::time::timeout(timeout, rx).await;
        }
    }
}

async fn run(endpoint: String, service: String, mut rx: mpsc::Receiver<Msg>) {
    let mut batch: Vec<SpanRecord> = Vec::new();
    let mut dropped = 0u64;
    loop {
        let msg = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await;
        let mut done: Option<oneshot::Sender<()>> = None;
        match msg {
            Ok(Some(Msg::Span(s))) => {
                batch.push(*s);
                if batch.len() < 256 {
                    continue;
                }
            }
            Ok(Some(Msg::Flush(tx))) => done = Some(tx),
            Ok(None) => return,
            Err(_) => {}
        }
        if !batch.is_empty() {
            let body = encode(&service, &batch);
            if let Err(e) = post(&endpoint, &body).await {
                dropped += batch.len() as u64;
                tracing::warn!(error = %e, dropped_total = dropped, "OTLP export failed; spans dropped");
            }
            batch.clear();
        }
        if let Some(tx) = done {
            let _ = tx.send(());
        }
    }
}

fn nanos(t: SystemTime) -> String {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
        .to_string()
}

/// OTLP/JSON: ids are hex strings, times are decimal strings of nanoseconds.
pub fn encode(service: &str, spans: &[SpanRecord]) -> Vec<u8> {
    let kv = |k: &str, v: &str| serde_json::json!({"key": k, "value": {"stringValue": v}});
    let spans: Vec<serde_json::Value> = spans
        .iter()
        .map(|s| {
            let mut v = serde_json::json!({
                "traceId": s.context.trace_id().to_string(),
                "spanId": s.context.span_id().to_string(),
                "name": s.name,
                "kind": 1,
                "startTimeUnixNano": nanos(s.start),
                "endTimeUnixNano": nanos(s.end),
                "attributes": s.attributes.iter().map(|(k, val)| kv(k, val)).collect::<Vec<_>>(),
                "status": {"code": if s.error { 2 } else { 1 }},
            });
            if let Some(p) = s.parent {
                v["parentSpanId"] = serde_json::Value::String(p.to_string());
            }
            v
        })
        .collect();
    let doc = serde_json::json!({
        "resourceSpans": [{
            "resource": {"attributes": [kv("service.name", service)]},
            "scopeSpans": [{"scope": {"name": "fracture"}, "spans": spans}]
        }]
    });
    serde_json::to_vec(&doc).unwrap_or_default()
}

/// A POST that did not succeed; the message says where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PostError {
    #[error("{0:?} must start with http://")]
    NotHttp(String),
    #[error(
        "OTLP endpoint {0:?} must start with http:// (put a collector beside the stage for TLS)"
    )]
    OtlpNotHttp(String),
    #[error("cannot reach {host}: {reason}")]
    Io { host: String, reason: String },
    #[error("{host} answered {status:?}")]
    Status { host: String, status: String },
    #[error("{0} did not answer within 5 s")]
    Timeout(String),
}

/// POSTs a JSON body to `url` (`http://host:port/path`), e.g. an alert webhook; 5 s timeout.
pub async fn post_json(url: &str, body: &[u8]) -> Result<(), PostError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| PostError::NotHttp(url.to_string()))?;
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    post_to(host, &path, body).await
}

/// A plain HTTP/1.1 POST (collectors on a cluster network or loopback speak cleartext OTLP).
async fn post(endpoint: &str, body: &[u8]) -> Result<(), PostError> {
    let rest = endpoint
        .strip_prefix("http://")
        .ok_or_else(|| PostError::OtlpNotHttp(endpoint.to_string()))?;
    let (host, base) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, String::new()));
    let path = format!("{}/v1/traces", base.trim_end_matches('/'));
    post_to(host, &path, body).await
}

async fn post_to(host: &str, path: &str, body: &[u8]) -> Result<(), PostError> {
    let io_error = |e: std::io::Error| PostError::Io {
        host: host.to_string(),
        reason: e.to_string(),
    };
    let io = async {
        let mut s = tokio::net::TcpStream::connect(host)
            .await
            .map_err(io_error)?;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.map_err(io_error)?;
        s.write_all(body).await.map_err(io_error)?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).await.map_err(io_error)?;
        let status = String::from_utf8_lossy(&resp)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        if status
            .split_whitespace()
            .nth(1)
            .is_some_and(|c| c.starts_with('2'))
        {
            Ok(())
        } else {
            Err(PostError::Status {
                host: host.to_string(),
                status,
            })
        }
    };
    tokio::time::timeout(Duration::from_secs(5), io)
        .await
        .map_err(|_| PostError::Timeout(host.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry;

    #[test]
    fn encodes_otlp_json_with_hex_ids_and_parent() {
        let root = telemetry::new_trace();
        let child = telemetry::child_of(&root);
        let t = UNIX_EPOCH + Duration::from_secs(1);
        let body = encode(
            "fracture-preprocess",
            &[SpanRecord {
                context: child.clone(),
                parent: Some(root.span_id()),
                name: "preprocess".into(),
                start: t,
                end: t,
                attributes: vec![("stage".into(), "preprocess".into())],
                error: false,
            }],
        );
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let span = &v["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(span["traceId"], root.trace_id().to_string());
        assert_eq!(span["parentSpanId"], root.span_id().to_string());
        assert_eq!(span["startTimeUnixNano"], "1000000000");
        assert_eq!(
            v["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"],
            "fracture-preprocess"
        );
    }
}
