//! Logging and trace context: one radiograph is one trace across every stage and process.
//!
//! The W3C `traceparent` travels in message headers (Kafka headers, or the in-process bus's);
//! each stage starts its span (OpenTelemetry SDK) as the child of the one the header names,
//! passes its own span on in the header it writes, and records the trace id on its log lines.
//! Log fields never carry PHI: only pseudonyms, stage names, counts and reasons.

use std::sync::OnceLock;
use std::time::SystemTime;

use opentelemetry::trace::{
    SpanBuilder, SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer,
    TracerProvider,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, Span};

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
    /// OTLP/HTTP collector base URL (e.g. `http://127.0.0.1:4318`; spans go to `/v1/traces`
    /// under it); empty: no span export. `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` and
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` win over it when set (see `src/otel.rs`).
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

/// The provider every span is started from. `fracture serve` installs one that exports (see
/// [`install_tracer_provider`]); without it a provider with no processor still gives every span
/// real ids, so the trace context travels and log lines carry trace ids, and nothing leaves.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

const SCOPE: &str = "fracture";

/// Makes `provider` the one every later span comes from. Returns false (and changes nothing) when
/// a span was already started, or a provider installed, in this process.
pub fn install_tracer_provider(provider: &SdkTracerProvider) -> bool {
    TRACER.set(provider.tracer(SCOPE)).is_ok()
}

fn tracer() -> &'static SdkTracer {
    TRACER.get_or_init(|| SdkTracerProvider::builder().build().tracer(SCOPE))
}

/// Starts the span of `stage` for one radiograph, as of `start`: a child of the upstream stage's
/// span when `parent` (from its `traceparent`) is given, else the root of a new trace. Its
/// context is what the outgoing `traceparent` must carry ([`to_traceparent`]), so the next
/// stage's span is its child. Attributes never hold PHI: only stage names, counts, lanes.
pub fn start_span(
    stage: &'static str,
    parent: Option<SpanContext>,
    start: SystemTime,
    attributes: Vec<KeyValue>,
) -> Span {
    let parent = match parent {
        Some(remote) => Context::new().with_remote_span_context(remote),
        None => Context::new(),
    };
    tracer().build_with_context(
        SpanBuilder::from_name(stage)
            .with_start_time(start)
            .with_attributes(attributes),
        &parent,
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
    use opentelemetry::trace::Span as _;

    #[test]
    fn a_stage_span_is_the_child_of_the_span_its_traceparent_names() {
        let t = SystemTime::now();
        let root = start_span("ingest", None, t, vec![]);
        let header = to_traceparent(root.span_context());
        let upstream = from_traceparent(&header).unwrap();
        assert_eq!(&upstream.trace_id(), &root.span_context().trace_id());
        assert_eq!(&upstream.span_id(), &root.span_context().span_id());
        assert!(upstream.is_sampled());

        let child = start_span(
            "preprocess",
            Some(upstream),
            t,
            vec![KeyValue::new("fracture.stage", "preprocess")],
        );
        let data = child.exported_data().unwrap();
        assert_eq!(data.span_context.trace_id(), root.span_context().trace_id());
        assert_ne!(data.span_context.span_id(), root.span_context().span_id());
        assert_eq!(data.parent_span_id, root.span_context().span_id());
        assert!(data.parent_span_is_remote);
        assert_eq!(data.start_time, t);
        let next = from_traceparent(&to_traceparent(child.span_context())).unwrap();
        assert_eq!(next.span_id(), data.span_context.span_id());

        assert!(from_traceparent("00-zz-11-01").is_none());
        assert!(
            from_traceparent(&format!("00-{}-{}-01", "0".repeat(32), "1".repeat(16))).is_none()
        );
    }
}
