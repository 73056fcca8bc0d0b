//! Tracing as operators run it, against a real collector: `scripts/jaeger.sh` builds the pinned
//! Jaeger (v2, on the OpenTelemetry Collector) from the Go module proxy. The five `fracture serve`
//! processes of a run export their spans over OTLP/HTTP to it, some through the config file's
//! `otlp_endpoint` in cleartext, the others through the standard `OTEL_EXPORTER_OTLP_*`
//! variables over TLS with a throwaway CA and a client certificate (winning over an endpoint the
//! config sets that nothing listens on). Read back from Jaeger's query API: one trace per
//! radiograph, five spans in a chain ingest → preprocess → ensemble → postprocess → audit whose
//! ids are the ones the `traceparent` headers carried, each from `fracture-<stage>` with the
//! `OTEL_RESOURCE_ATTRIBUTES`, and no identifier of the inputs anywhere in the traces.

mod common;

#[path = "../services/ingest/tests/common/pki.rs"]
mod pki;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::pipeline::{self, Pipeline};
use fracture_shared::bus::{KafkaBus, KafkaConfig, Topics};
use fracture_shared::messages::Finding;
use fracture_shared::testkit;

/// The `jaeger` binary: `FRACTURE_JAEGER`, else `scripts/jaeger.sh` (which builds it once).
fn jaeger_bin() -> PathBuf {
    common::built_peer("FRACTURE_JAEGER", "jaeger.sh", &[])
}

/// A Jaeger of its own (in-memory storage), everything on loopback, killed when dropped.
struct Jaeger {
    child: Child,
    log: PathBuf,
    /// OTLP/HTTP in cleartext.
    otlp: String,
    /// OTLP/HTTP over TLS, asking for a client certificate.
    otlp_tls: String,
    query: String,
}

impl Drop for Jaeger {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Jaeger {
    fn start(dir: &Path, pki: &pki::TestPki) -> Self {
        let (otlp, otlp_tls, query, query_grpc) = (
            pipeline::free_port(),
            pipeline::free_port(),
            pipeline::free_port(),
            pipeline::free_port(),
        );
        // All-in-one as Jaeger's own internal/all-in-one.yaml has it, less what would listen on
        // fixed ports (sampling, health, expvar, zpages, its own metrics) and with a second
        // OTLP receiver that speaks TLS only.
        let config = dir.join("jaeger.yaml");
        std::fs::write(
            &config,
            format!(
                r#"service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp, otlp/tls]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: info
extensions:
  jaeger_query:
    storage:
      traces: memstore
    enable_tracing: false
    http:
      endpoint: 127.0.0.1:{query}
    grpc:
      endpoint: 127.0.0.1:{query_grpc}
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 10000
receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:{otlp}
  otlp/tls:
    protocols:
      http:
        endpoint: 127.0.0.1:{otlp_tls}
        tls:
          cert_file: {cert}
          key_file: {key}
          client_ca_file: {ca}
processors:
  batch:
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"#,
                cert = pki.server_cert.display(),
                key = pki.server_key.display(),
                ca = pki.ca.display(),
            ),
        )
        .unwrap();
        let log = dir.join("jaeger.log");
        let child = Command::new(jaeger_bin())
            .arg(format!("--config={}", config.display()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start jaeger");
        let j = Self {
            child,
            log,
            otlp: format!("http://127.0.0.1:{otlp}"),
            otlp_tls: format!("https://127.0.0.1:{otlp_tls}"),
            query: format!("http://127.0.0.1:{query}"),
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while get(&format!("{}/api/services", j.query)).is_none() {
            assert!(Instant::now() < deadline, "Jaeger not ready:\n{}", j.logs());
            std::thread::sleep(Duration::from_millis(300));
        }
        j
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The `data` of a query API answer.
    fn api(&self, path: &str) -> serde_json::Value {
        let body = get(&format!("{}{path}", self.query))
            .unwrap_or_else(|| panic!("GET {path}\n{}", self.logs()));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["data"].clone()
    }

    /// The traces holding a span of `service`, by trace id.
    fn traces_of(&self, service: &str) -> BTreeMap<String, serde_json::Value> {
        self.api(&format!("/api/traces?service={service}&limit=1000"))
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|t| (t["traceID"].as_str().unwrap_or_default().to_string(), t))
            .collect()
    }
}

fn get(url: &str) -> Option<String> {
    let out = Command::new("curl")
        .args(["-sS", "-f", "--max-time", "10", url])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A W3C trace id as Jaeger writes it: 32 hex digits, or 16 when the high half is zero.
fn jaeger_id(hex: &str) -> String {
    hex.strip_prefix("0000000000000000")
        .unwrap_or(hex)
        .to_string()
}

/// One span of a Jaeger trace: (operation, span id, parent span id, service, process tags).
struct SpanView {
    id: String,
    parent: Option<String>,
    service: String,
    process_tags: BTreeMap<String, String>,
}

fn spans_of(trace: &serde_json::Value) -> BTreeMap<String, Vec<SpanView>> {
    let mut by_op: BTreeMap<String, Vec<SpanView>> = BTreeMap::new();
    for s in trace["spans"].as_array().unwrap() {
        let process = &trace["processes"][s["processID"].as_str().unwrap()];
        let parent = s["references"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["refType"] == "CHILD_OF")
            .map(|r| r["spanID"].as_str().unwrap().to_string());
        let process_tags = process["tags"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                (
                    t["key"].as_str().unwrap_or_default().to_string(),
                    t["value"]
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| t["value"].to_string()),
                )
            })
            .collect();
        by_op
            .entry(s["operationName"].as_str().unwrap().to_string())
            .or_default()
            .push(SpanView {
                id: s["spanID"].as_str().unwrap().to_string(),
                parent,
                service: process["serviceName"].as_str().unwrap().to_string(),
                process_tags,
            });
    }
    by_op
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jaeger_shows_one_trace_per_radiograph_with_the_five_stage_spans_in_a_chain() {
    let keep = tempfile::tempdir().unwrap();
    let work = keep.path();
    let n = 4;
    let inputs = work.join("inputs");
    let files = pipeline::phantoms(&inputs, n, 18);
    let pki_dir = work.join("pki");
    std::fs::create_dir_all(&pki_dir).unwrap();
    let pki = pki::test_pki(&pki_dir, "IP:127.0.0.1");
    let jaeger_dir = work.join("jaeger");
    std::fs::create_dir_all(&jaeger_dir).unwrap();
    let jaeger = Jaeger::start(&jaeger_dir, &pki);

    let key = work.join("deid.key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    let brokers = testkit::kafka_brokers();
    let prefix = testkit::unique_prefix("otlp");
    let run = work.join("run");
    let manifest = pipeline::repo().join("models/null/ensemble.toml");
    let cfg = pipeline::write_config(
        &run,
        &pipeline::RunConfig {
            brokers: &brokers,
            prefix: &prefix,
            key: &key,
            otlp: &jaeger.otlp,
            manifest: &manifest,
            extra: "",
        },
    );
    let mut p = Pipeline::new(&run, &cfg, std::slice::from_ref(&inputs));
    for stage in pipeline::STAGES {
        p.set_env(
            stage,
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment=test",
        );
        // Batches every 200 ms rather than 5 s: the test reads sooner, nothing else changes.
        p.set_env(stage, "OTEL_BSP_SCHEDULE_DELAY", "200");
    }
    // The middle stages as a platform would configure them: the standard variables, over TLS
    // with a private CA and a client certificate; the endpoint the config gives them (nothing
    // listens there) loses to the variables.
    let dead = format!("http://127.0.0.1:{}", pipeline::free_port());
    for stage in ["preprocess", "ensemble", "postprocess"] {
        p.setting(stage, "telemetry.otlp_endpoint", &dead);
        if stage == "postprocess" {
            let traces = format!("{}/v1/traces", jaeger.otlp_tls);
            p.set_env(stage, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &traces);
        } else {
            p.set_env(stage, "OTEL_EXPORTER_OTLP_ENDPOINT", &jaeger.otlp_tls);
        }
        p.set_env(
            stage,
            "OTEL_EXPORTER_OTLP_CERTIFICATE",
            pki.ca.to_str().unwrap(),
        );
        let cert = pki.client_cert.to_str().unwrap();
        let client_key = pki.client_key.to_str().unwrap();
        p.set_env(stage, "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", cert);
        p.set_env(stage, "OTEL_EXPORTER_OTLP_CLIENT_KEY", client_key);
    }
    p.start_all();

    let bus = KafkaBus::new(KafkaConfig {
        brokers: brokers.clone(),
        ..Default::default()
    });
    let topics = Topics::new(&prefix);
    let out = pipeline::committed_outputs(&bus, &topics, n, Duration::from_secs(300)).await;
    let findings: Vec<_> = out
        .iter()
        .filter(|r| topics.lanes_of::<Finding>().contains(&r.topic))
        .collect();
    assert_eq!(findings.len(), n, "{}", p.logs());
    // The trace and the postprocess span each finding's traceparent names.
    let headers: BTreeMap<String, String> = findings
        .iter()
        .map(|r| {
            let tp = r
                .header("traceparent")
                .expect("findings carry trace context");
            let parts: Vec<&str> = tp.split('-').collect();
            (jaeger_id(parts[1]), parts[2].to_string())
        })
        .collect();
    assert_eq!(headers.len(), n, "one trace per radiograph: {headers:?}");
    // Graceful stops flush what each stage still holds.
    let failures = p.stop();
    assert!(failures.is_empty(), "{failures:?}\n{}", p.logs());

    // Jaeger stores asynchronously: wait until every trace has its five spans.
    let deadline = Instant::now() + Duration::from_secs(120);
    let traces = loop {
        let traces = jaeger.traces_of("fracture-ingest");
        let complete = traces.len() >= n
            && traces
                .values()
                .all(|t| t["spans"].as_array().is_some_and(|s| s.len() >= 5));
        if complete {
            break traces;
        }
        assert!(
            Instant::now() < deadline,
            "traces in Jaeger: {}\nJaeger:\n{}\nstages:\n{}",
            serde_json::to_string_pretty(&traces).unwrap(),
            jaeger.logs(),
            p.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    assert_eq!(
        traces.keys().cloned().collect::<BTreeSet<_>>(),
        headers.keys().cloned().collect::<BTreeSet<_>>(),
        "exactly the radiographs' traces"
    );
    let stages = pipeline::STAGES;
    for (trace_id, trace) in &traces {
        let spans = spans_of(trace);
        assert_eq!(
            spans.keys().map(String::as_str).collect::<BTreeSet<_>>(),
            stages.into_iter().collect::<BTreeSet<_>>(),
            "trace {trace_id}"
        );
        let mut parent: Option<String> = None;
        for stage in stages {
            let [span] = spans[stage].as_slice() else {
                panic!("trace {trace_id}: {} {stage} spans", spans[stage].len());
            };
            assert_eq!(
                span.parent, parent,
                "trace {trace_id}: the parent of {stage}"
            );
            assert_eq!(span.service, format!("fracture-{stage}"));
            assert_eq!(
                span.process_tags
                    .get("deployment.environment")
                    .map(String::as_str),
                Some("test"),
                "trace {trace_id}, {stage}: {:?}",
                span.process_tags
            );
            parent = Some(span.id.clone());
        }
        // The header that left postprocess named its span: the audit span's parent.
        assert_eq!(
            headers[trace_id], spans["postprocess"][0].id,
            "trace {trace_id}"
        );
    }
    // Every service's traces are the radiographs' traces, nothing else.
    for stage in stages {
        let seen: BTreeSet<String> = jaeger
            .traces_of(&format!("fracture-{stage}"))
            .into_keys()
            .collect();
        assert_eq!(
            seen,
            headers.keys().cloned().collect::<BTreeSet<_>>(),
            "{stage}"
        );
    }

    // No identifier of the inputs in any span, tag or process.
    let text = serde_json::to_string(&traces).unwrap().to_lowercase();
    let mut identifiers = Vec::new();
    for f in &files {
        let obj = dicom_object::open_file(f).unwrap();
        let tags = [
            dicom_dictionary_std::tags::PATIENT_NAME,
            dicom_dictionary_std::tags::PATIENT_ID,
            dicom_dictionary_std::tags::INSTITUTION_NAME,
            dicom_dictionary_std::tags::SOP_INSTANCE_UID,
            dicom_dictionary_std::tags::STUDY_INSTANCE_UID,
            dicom_dictionary_std::tags::ACCESSION_NUMBER,
        ];
        for (tag, part) in common::identifier_parts(&obj, &tags) {
            identifiers.push((tag, part.to_lowercase()));
        }
    }
    assert!(identifiers.len() >= 3 * n, "{identifiers:?}");
    for (tag, v) in &identifiers {
        assert!(
            !text.contains(v.as_str()),
            "{tag} of an input in the traces"
        );
    }
}

/// A collector that accepts connections and never answers: every export waits out the
/// exporter's timeout.
fn black_hole() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().flatten() {
            held.push(conn);
        }
    });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_collector_that_never_answers_does_not_hold_the_pipeline_back() {
    let keep = tempfile::tempdir().unwrap();
    let work = keep.path();
    let n = 8;
    let inputs = work.join("inputs");
    pipeline::phantoms(&inputs, n, 19);
    let key = work.join("deid.key");
    std::fs::write(&key, [8u8; 32]).unwrap();
    let brokers = testkit::kafka_brokers();
    let prefix = testkit::unique_prefix("otlp-stuck");
    let run = work.join("run");
    let cfg = pipeline::write_null_config(&run, &brokers, &prefix, &key, "");
    let collector = black_hole();
    let mut p = Pipeline::new(&run, &cfg, std::slice::from_ref(&inputs));
    for stage in pipeline::STAGES {
        p.set_env(stage, "OTEL_EXPORTER_OTLP_ENDPOINT", &collector);
        // A queue of two spans, one a request: the first export hangs, the queue fills, and
        // later spans must be dropped rather than wait.
        p.set_env(stage, "OTEL_BSP_MAX_QUEUE_SIZE", "2");
        p.set_env(stage, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "1");
        p.set_env(stage, "OTEL_BSP_SCHEDULE_DELAY", "100");
    }
    p.start_all();

    let bus = KafkaBus::new(KafkaConfig {
        brokers: brokers.clone(),
        ..Default::default()
    });
    let topics = Topics::new(&prefix);
    let out = pipeline::committed_outputs(&bus, &topics, n, Duration::from_secs(300)).await;
    let findings = out
        .iter()
        .filter(|r| topics.lanes_of::<Finding>().contains(&r.topic))
        .count();
    assert_eq!(findings, n, "{}", p.logs());
    // Each stage exits cleanly within the helper's 30 s of SIGTERM, its export still hanging.
    let failures = p.stop();
    assert!(failures.is_empty(), "{failures:?}\n{}", p.logs());
    let ingest = std::fs::read_to_string(run.join("ingest.log")).unwrap();
    assert!(
        ingest.contains("BatchSpanProcessor.SpanDroppingStarted"),
        "the dropped spans are logged:\n{ingest}"
    );
}
