//! Logging and trace context: one radiograph is one trace across every stage and process.
//!
//! The W3C `traceparent` travels in message headers (Kafka headers, or the in-process bus's);
//! each stage continues the trace with a new span id and records the trace id on its log lines.
//! Log fields never carry PHI: only pseudonyms, stage names, counts and reasons.

use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
use rand::RngCore;

pub const TRACEPARENT: &str = "traceparent";

/// `[telemetry]`
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Log filter in `RUST_LOG` syntax; `RUST_LOG` wins when set.
    pub log: String,
    /// One JSON object per log line (for log shippers) instead of text.
    pub json: bool,
    /// Address of the `/metrics`, `/healthz` and `/readyz` endpoint of a serving stage;
    /// empty disables it.
    pub metrics_addr: String,
    /// OTLP/HTTP collector (e.g. `http://127.0.0.1:4318`); empty: no span export.
    pub otlp_endpoint: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log: "info".into(),
            json: false,
            metrics_addr: "127.0.0.1:9100".into(),
            otlp_endpoint: String::new(),
        }
    }
}

/// Installs the global subscriber (logs on stderr, so stdout stays for results).
pub fn init(cfg: &TelemetryConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.log))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless: keep the first subscriber.
    let _ = if cfg.json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// A new trace for a radiograph entering the system.
pub fn new_trace() -> SpanContext {
    let mut rng = rand::rng();
    let mut t = [0u8; 16];
    let mut s = [0u8; 8];
    rng.fill_bytes(&mut t);
    rng.fill_bytes(&mut s);
    SpanContext::new(
        TraceId::from_bytes(t),
        SpanId::from_bytes(s),
        TraceFlags::SAMPLED,
        false,
        TraceState::default(),
    )
}

/// The next span of the same trace (a stage continuing the radiograph's trace).
pub fn child_of(parent: &SpanContext) -> SpanContext {
    let mut s = [0u8; 8];
    rand::rng().fill_bytes(&mut s);
    SpanContext::new(
        parent.trace_id(),
        SpanId::from_bytes(s),
        parent.trace_flags(),
        false,
        TraceState::default(),
    )
}

pub fn to_traceparent(c: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        c.trace_id(),
        c.span_id(),
        c.trace_flags().to_u8()
    )
}

/// Parses `00-<32 hex>-<16 hex>-<2 hex>`; anything else starts a new trace upstream.
pub fn from_traceparent(v: &str) -> Option<SpanContext> {
    let parts: Vec<&str> = v.trim().split('-').collect();
    if parts.len() != 4 || parts[0] != "00" || parts[1].len() != 32 || parts[2].len() != 16 {
        return None;
    }
    let trace = TraceId::from_hex(parts[1]).ok()?;
    let span = SpanId::from_hex(parts[2]).ok()?;
    let flags = u8::from_str_radix(parts[3], 16).ok()?;
    if trace == TraceId::INVALID || span == SpanId::INVALID {
        return None;
    }
    Some(SpanContext::new(
        trace,
        span,
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_children_share_the_trace() {
        let t = new_trace();
        let p = from_traceparent(&to_traceparent(&t)).unwrap();
        assert_eq!(p.trace_id(), t.trace_id());
        assert_eq!(p.span_id(), t.span_id());
        let c = child_of(&p);
        assert_eq!(c.trace_id(), t.trace_id());
        assert_ne!(c.span_id(), t.span_id());
        assert!(from_traceparent("00-zz-11-01").is_none());
        assert!(
            from_traceparent(&format!("00-{}-{}-01", "0".repeat(32), "1".repeat(16))).is_none()
        );
    }
}
