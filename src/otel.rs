//! Span export the OpenTelemetry way: the SDK's batch span processor and its OTLP/HTTP
//! (protobuf) exporter, configured by the standard `OTEL_*` environment variables, with the
//! config file's `[telemetry] otlp_endpoint` as the fallback endpoint.
//!
//! Precedence: the `OTEL_*` variables win, the config file fills in what they leave unset (an
//! empty variable counts as unset, as the OpenTelemetry specification has it). They are the
//! contract platforms inject (the OpenTelemetry Operator, a chart's env), so setting
//! `OTEL_EXPORTER_OTLP_ENDPOINT` redirects every stage without touching `fracture.toml`.
//!   endpoint  `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as is), else
//!             `OTEL_EXPORTER_OTLP_ENDPOINT` + `/v1/traces`, else `otlp_endpoint` + `/v1/traces`;
//!             none of them: no export (also with `OTEL_SDK_DISABLED=true` or
//!             `OTEL_TRACES_EXPORTER=none`)
//!   service   `OTEL_SERVICE_NAME`, else `service.name` in `OTEL_RESOURCE_ATTRIBUTES`, else
//!             `fracture-<stage>`; the other `OTEL_RESOURCE_ATTRIBUTES` join the resource
//!   headers   `OTEL_EXPORTER_OTLP_(TRACES_)HEADERS` (read by the exporter)
//!   TLS       an `https://` endpoint is verified against the system's roots plus
//!             `OTEL_EXPORTER_OTLP_(TRACES_)CERTIFICATE` (a PEM bundle); a client certificate
//!             from `OTEL_EXPORTER_OTLP_(TRACES_)CLIENT_CERTIFICATE` and `..._CLIENT_KEY`
//!   timeout   `OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT` (ms, default 10 s) per export request
//!   batching  `OTEL_BSP_*` (queue 2048 spans, every 5 s, 512 a request, by default)
//!
//! A slow or absent collector never holds the pipeline back: spans wait in the processor's
//! bounded queue and export from its own thread; when the queue is full new spans are dropped,
//! and the SDK logs the first drop and, at a shutdown that reaches its processor, the total.

use std::time::Duration;

use anyhow::Context;
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// What the exporter's own default would be; used only with an explicit `OTEL_TRACES_EXPORTER=otlp`.
const DEFAULT_ENDPOINT: &str = "http://localhost:4318";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How spans leave this process, resolved from the environment and the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Where spans are posted (the full URL, `/v1/traces` included).
    pub endpoint: String,
    /// `service.name` to set: `fracture-<stage>`, unless the environment names the service.
    pub service_name: Option<String>,
    /// PEM bundle of extra trust roots for an `https://` collector; empty: the system's only.
    pub ca_file: String,
    /// Client certificate and key (PEM) for a collector that asks for one.
    pub client_cert: Option<(String, String)>,
    pub timeout: Duration,
}

/// Resolves the [`Plan`] for `stage` from `config_endpoint` (`[telemetry] otlp_endpoint`) and
/// `env` (a variable's value, `None` when unset or empty); `None`: no span export.
pub fn plan(
    config_endpoint: &str,
    stage: &str,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<Option<Plan>> {
    let traces_or = |name: &str| {
        env(&format!("OTEL_EXPORTER_OTLP_TRACES_{name}"))
            .or_else(|| env(&format!("OTEL_EXPORTER_OTLP_{name}")))
    };
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    let exporter = env("OTEL_TRACES_EXPORTER").map(|v| v.trim().to_ascii_lowercase());
    match exporter.as_deref() {
        None | Some("otlp") => {}
        Some("none") => return Ok(None),
        Some(other) => anyhow::bail!(
            "OTEL_TRACES_EXPORTER={other} is not supported: use otlp (OTLP over HTTP/protobuf) or none"
        ),
    }
    if let Some(p) = env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .filter(|p| p.trim() != "http/protobuf")
    {
        anyhow::bail!(
            "OTLP protocol {p:?} is not supported: spans are exported as http/protobuf only \
             (put an OpenTelemetry Collector beside the stage to forward them over gRPC)"
        );
    }
    let base = |url: &str| format!("{}/v1/traces", url.trim().trim_end_matches('/'));
    let endpoint = if let Some(e) = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        e.trim().to_string()
    } else if let Some(e) = env("OTEL_EXPORTER_OTLP_ENDPOINT") {
        base(&e)
    } else if !config_endpoint.trim().is_empty() {
        base(config_endpoint)
    } else if exporter.is_some() {
        base(DEFAULT_ENDPOINT)
    } else {
        return Ok(None);
    };
    let named_in_resource = env("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|attrs| {
        attrs.split(',').any(|kv| {
            kv.split_once('=')
                .is_some_and(|(k, _)| k.trim() == "service.name")
        })
    });
    let service_name = (env("OTEL_SERVICE_NAME").is_none() && !named_in_resource)
        .then(|| format!("fracture-{stage}"));
    let client_cert = match (traces_or("CLIENT_CERTIFICATE"), traces_or("CLIENT_KEY")) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => anyhow::bail!(
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY go together: set both or neither"
        ),
    };
    let timeout = match traces_or("TIMEOUT") {
        None => DEFAULT_TIMEOUT,
        Some(ms) => Duration::from_millis(ms.trim().parse().with_context(|| {
            format!("OTEL_EXPORTER_OTLP_TIMEOUT {ms:?} is not a whole number of milliseconds")
        })?),
    };
    Ok(Some(Plan {
        endpoint,
        service_name,
        ca_file: traces_or("CERTIFICATE").unwrap_or_default(),
        client_cert,
        timeout,
    }))
}

/// The environment as [`plan`] reads it: an empty variable is an unset one.
pub fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The exporter's HTTP client: rustls on ring with the system's roots plus the plan's CA bundle
/// (and client certificate). Blocking, because the batch processor exports from its own thread.
fn http_client(plan: &Plan) -> anyhow::Result<reqwest::blocking::Client> {
    let roots = fracture_edge::tls::ca_roots(&plan.ca_file, "OTEL_EXPORTER_OTLP_CERTIFICATE", true)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let tls = rustls::ClientConfig::builder_with_provider(fracture_edge::tls::provider())
        .with_safe_default_protocol_versions()
        .context("TLS for the OTLP exporter")?
        .with_root_certificates(roots);
    let tls = match &plan.client_cert {
        None => tls.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .with_context(|| {
                    format!("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE {cert} is not a readable PEM certificate chain")
                })?;
            let key = PrivateKeyDer::from_pem_file(key).with_context(|| {
                format!("OTEL_EXPORTER_OTLP_CLIENT_KEY {key} is not a readable PEM private key")
            })?;
            tls.with_client_auth_cert(chain, key)
                .context("the OTLP client certificate does not match its key")?
        }
    };
    let timeout = plan.timeout;
    // reqwest's blocking client owns a runtime of its own, which must not be built (or dropped)
    // on a thread of ours that runs async code.
    std::thread::spawn(move || {
        reqwest::blocking::Client::builder()
            .timeout(timeout)
            .tls_backend_preconfigured(tls)
            .build()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("building the OTLP HTTP client panicked"))?
    .context("the OTLP HTTP client")
}

/// Builds the exporting tracer provider of `plan`. Call from outside an async context or via
/// `spawn_blocking` (see [`http_client`]).
pub fn provider(plan: &Plan) -> anyhow::Result<SdkTracerProvider> {
    // Resolved here rather than left to the exporter, so the config file's endpoint can fill in
    // without overriding the environment (the exporter lets code win).
    let exporter = SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(plan.endpoint.clone())
        .with_timeout(plan.timeout)
        .with_http_client(http_client(plan)?)
        .build()
        .with_context(|| format!("the OTLP exporter to {}", plan.endpoint))?;
    let mut resource = Resource::builder();
    if let Some(name) = &plan.service_name {
        resource = resource.with_service_name(name.clone());
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn plan_with(config: &str, vars: &[(&str, &str)]) -> anyhow::Result<Option<Plan>> {
        let vars: HashMap<String, String> = vars
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        plan(config, "preprocess", |k| vars.get(k).cloned())
    }

    #[test]
    fn the_otel_environment_wins_and_the_config_file_fills_in() {
        assert_eq!(plan_with("", &[]).unwrap(), None);
        let p = plan_with("http://collector:4318/", &[]).unwrap().unwrap();
        assert_eq!(p.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(p.service_name.as_deref(), Some("fracture-preprocess"));
        assert_eq!(p.timeout, Duration::from_secs(10));

        let p = plan_with(
            "http://collector:4318",
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://otel.example:4318")],
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.endpoint, "https://otel.example:4318/v1/traces");

        let p = plan_with(
            "http://collector:4318",
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://otel.example:4318"),
                (
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "https://traces.example/otlp",
                ),
                ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/etc/ca.pem"),
                ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "2500"),
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.endpoint, "https://traces.example/otlp");
        assert_eq!(p.ca_file, "/etc/ca.pem");
        assert_eq!(p.timeout, Duration::from_millis(2500));

        // An empty variable is an unset one.
        let p = plan_with("http://c:4318", &[("OTEL_EXPORTER_OTLP_ENDPOINT", "")])
            .unwrap()
            .unwrap();
        assert_eq!(p.endpoint, "http://c:4318/v1/traces");
    }

    #[test]
    fn the_service_is_named_by_the_environment_or_after_the_stage() {
        let named = |vars: &[(&str, &str)]| {
            plan_with("http://c:4318", vars)
                .unwrap()
                .unwrap()
                .service_name
        };
        assert_eq!(named(&[("OTEL_SERVICE_NAME", "radiology")]), None);
        assert_eq!(
            named(&[(
                "OTEL_RESOURCE_ATTRIBUTES",
                "team=imaging, service.name=radiology"
            )]),
            None
        );
        assert_eq!(
            named(&[("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")]).as_deref(),
            Some("fracture-preprocess")
        );
    }

    #[test]
    fn export_can_be_switched_off_and_unsupported_choices_are_refused() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        assert_eq!(
            plan_with("", &[endpoint, ("OTEL_SDK_DISABLED", "true")]).unwrap(),
            None
        );
        assert_eq!(
            plan_with("http://c:4318", &[("OTEL_TRACES_EXPORTER", "none")]).unwrap(),
            None
        );
        let p = plan_with("", &[("OTEL_TRACES_EXPORTER", "otlp")])
            .unwrap()
            .unwrap();
        assert_eq!(p.endpoint, "http://localhost:4318/v1/traces");
        for bad in [
            ("OTEL_TRACES_EXPORTER", "zipkin"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "10s"),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/etc/key.pem"),
        ] {
            assert!(plan_with("", &[endpoint, bad]).is_err(), "{bad:?}");
        }
    }
}
