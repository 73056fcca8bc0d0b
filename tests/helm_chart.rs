//! The Helm chart (helm/fracture), linted and rendered by the real Helm, checked against what the
//! binary actually reads: its configuration sections, metric names, topics and consumer groups.
//!
//! Needs `FRACTURE_HELM`, the path `scripts/helm.sh` prints (scripts/test.sh sets it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use fracture_shared::config::Settings;
use serde_yaml::Value;

/// The Kubernetes version the chart is rendered and linted for (Helm 3.16's own client-go), so a
/// Helm built without the release ldflags (which assumes 1.20) gives the same answer.
const KUBE_VERSION: &str = "1.31.0";
const RELEASE: &str = "fracture";
const NAMESPACE: &str = "radiology";
/// The stages every release runs.
const STAGES: [&str; 5] = ["ingest", "preprocess", "ensemble", "postprocess", "audit"];
/// The export to the PACS: its own StatefulSet when `export.enabled`.
const EXPORT: &str = "export";
const ALL_ON: &str = "ci/all-on-values.yaml";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chart() -> PathBuf {
    repo().join("helm/fracture")
}

fn helm() -> PathBuf {
    match std::env::var_os("FRACTURE_HELM") {
        Some(p) if !p.is_empty() => {
            let p = PathBuf::from(p);
            assert!(
                p.is_file(),
                "FRACTURE_HELM={} does not exist: run `bash scripts/helm.sh` and point FRACTURE_HELM at the path it prints last",
                p.display()
            );
            p
        }
        _ => panic!(
            "FRACTURE_HELM is not set. This test runs the real Helm: run `bash scripts/helm.sh` (it builds the pinned \
             Helm once into the cache) and export FRACTURE_HELM=<the path it prints last>; scripts/test.sh does both"
        ),
    }
}

fn run_helm(args: &[&str]) -> String {
    let out = Command::new(helm())
        .args(args)
        .current_dir(chart())
        .output()
        .expect("helm runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "helm {} failed:\n{stdout}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

fn items(v: &Value) -> &[Value] {
    v.as_sequence().map(Vec::as_slice).unwrap_or(&[])
}

fn int(v: &Value) -> i64 {
    v.as_i64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| panic!("{v:?} is not an integer"))
}

/// The port of a `host:port` address from fracture.toml.
fn port_of(addr: &str) -> i64 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{addr:?} has no port"))
}

/// `helm template` output, one parsed document per manifest.
struct Rendered {
    label: String,
    docs: Vec<Value>,
}

impl Rendered {
    fn new(label: &str, extra: &[&str]) -> Self {
        let mut args = vec![
            "template",
            RELEASE,
            ".",
            "--namespace",
            NAMESPACE,
            "--kube-version",
            KUBE_VERSION,
        ];
        args.extend_from_slice(extra);
        let out = run_helm(&args);
        let docs = serde_yaml::Deserializer::from_str(&out)
            .map(|d| serde::Deserialize::deserialize(d).expect("helm template output is YAML"))
            .filter(|v: &Value| !v.is_null())
            .collect();
        Self {
            label: label.to_string(),
            docs,
        }
    }

    fn kind(&self, kind: &str) -> Vec<&Value> {
        self.docs
            .iter()
            .filter(|d| text(&d["kind"]) == kind)
            .collect()
    }

    fn get(&self, kind: &str, name: &str) -> &Value {
        self.kind(kind)
            .into_iter()
            .find(|d| text(&d["metadata"]["name"]) == name)
            .unwrap_or_else(|| panic!("{}: no {kind} {name}", self.label))
    }

    /// The stages this rendering runs: [`STAGES`], and [`EXPORT`] when its StatefulSet is there.
    fn stages(&self) -> Vec<&'static str> {
        let export = self
            .kind("StatefulSet")
            .iter()
            .any(|d| text(&d["metadata"]["name"]) == format!("{RELEASE}-{EXPORT}"));
        STAGES.into_iter().chain(export.then_some(EXPORT)).collect()
    }

    fn deployment(&self, stage: &str) -> &Value {
        self.get("StatefulSet", &format!("{RELEASE}-{stage}"))
    }

    fn pod(&self, stage: &str) -> &Value {
        &self.deployment(stage)["spec"]["template"]["spec"]
    }

    fn container(&self, stage: &str) -> &Value {
        let c = items(&self.pod(stage)["containers"]);
        assert_eq!(c.len(), 1, "{}: {stage} has one container", self.label);
        &c[0]
    }

    fn env(&self, stage: &str, name: &str) -> Option<&Value> {
        items(&self.container(stage)["env"])
            .iter()
            .find(|e| text(&e["name"]) == name)
    }

    /// (mountPath, readOnly, volume) of the stage's container.
    fn mounts(&self, stage: &str) -> Vec<(PathBuf, bool, &Value)> {
        let volumes = items(&self.pod(stage)["volumes"]);
        items(&self.container(stage)["volumeMounts"])
            .iter()
            .map(|m| {
                let volume = volumes
                    .iter()
                    .find(|v| v["name"] == m["name"])
                    .unwrap_or_else(|| {
                        panic!(
                            "{}: {stage} mounts volume {:?} that the pod does not define",
                            self.label, m["name"]
                        )
                    });
                (
                    PathBuf::from(text(&m["mountPath"])),
                    m["readOnly"].as_bool().unwrap_or(false),
                    volume,
                )
            })
            .collect()
    }

    /// The mount a path lives under (the deepest one).
    fn mount_of(&self, stage: &str, path: &str) -> Option<(PathBuf, bool, &Value)> {
        self.mounts(stage)
            .into_iter()
            .filter(|(m, _, _)| Path::new(path).starts_with(m))
            .max_by_key(|(m, _, _)| m.components().count())
    }

    fn assert_writable(&self, stage: &str, path: &str, what: &str) {
        match self.mount_of(stage, path) {
            Some((_, false, _)) => {}
            other => panic!(
                "{}: {stage} writes {what} at {path}, but the root filesystem is read-only and it is {}",
                self.label,
                match other {
                    Some((m, _, _)) => format!("under the read-only mount {}", m.display()),
                    None => "on no volume".into(),
                }
            ),
        }
    }

    fn toml(&self) -> String {
        let cm = self.get("ConfigMap", &format!("{RELEASE}-config"));
        text(&cm["data"]["fracture.toml"]).to_string()
    }

    fn settings(&self, dir: &Path, overrides: &[(String, String)]) -> Settings {
        let file = dir.join("fracture.toml");
        std::fs::write(&file, self.toml()).expect("write fracture.toml");
        Settings::load(Some(&file), overrides).unwrap_or_else(|e| {
            panic!(
                "{}: the rendered fracture.toml does not load: {e}\n{}",
                self.label,
                self.toml()
            )
        })
    }
}

fn all_on() -> Rendered {
    Rendered::new("all-on", &["-f", ALL_ON])
}

fn defaults() -> Rendered {
    Rendered::new("defaults", &[])
}

// ---------------------------------------------------------------------------------------------
// What the binary knows, read from its sources at test time.

fn source(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Sections the binary reads (`settings.section("x")`, `section::<T>("x")` in src/, and the
/// fields of the configuration root, `root! { name: Type, ... }`).
fn sections_read_by_binary() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir(repo().join("src")).expect("src/") {
        let path = entry.expect("src entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let code = std::fs::read_to_string(&path).expect("read source");
        if let Some(block) = code
            .split("\nroot! {")
            .nth(1)
            .and_then(|b| b.split("\n}").next())
        {
            for line in block.lines().map(str::trim) {
                if let Some((name, _)) = line.split_once(':').filter(|_| !line.starts_with("//")) {
                    out.insert(name.trim().to_string());
                }
            }
        }
        for (i, _) in code.match_indices(".section") {
            let rest = &code[i + ".section".len()..];
            let Some(open) = rest.find("(\"") else {
                continue;
            };
            // `.section("x")` or `.section::<Type>("x")`, nothing longer in between.
            if open > 80 || rest[..open].contains(['\n', ';']) {
                continue;
            }
            if let Some(name) = rest[open + 2..].split('"').next() {
                out.insert(name.to_string());
            }
        }
    }
    out
}

type SectionCheck = fn(&Settings) -> Result<(), String>;

fn section<T: serde::de::DeserializeOwned + Default>(
    s: &Settings,
    name: &str,
) -> Result<T, String> {
    s.section::<T>(name).map_err(|e| e.to_string())
}

/// Every section into the struct the stage reads it with (each says `deny_unknown_fields`).
fn section_checks() -> BTreeMap<&'static str, SectionCheck> {
    let mut m: BTreeMap<&'static str, SectionCheck> = BTreeMap::new();
    m.insert("kafka", |s| {
        section::<fracture_shared::KafkaConfig>(s, "kafka").map(drop)
    });
    m.insert("store", |s| {
        section::<fracture_shared::StoreConfig>(s, "store").map(drop)
    });
    m.insert("telemetry", |s| {
        section::<fracture_shared::telemetry::TelemetryConfig>(s, "telemetry").map(drop)
    });
    m.insert("retry", |s| {
        section::<fracture_shared::RetryPolicy>(s, "retry").map(drop)
    });
    m.insert("lanes", |s| {
        section::<fracture_shared::bus::LaneConfig>(s, "lanes").map(drop)
    });
    m.insert("model", |s| {
        section::<fracture_shared::config::ModelConfig>(s, "model").map(drop)
    });
    m.insert("ingest", |s| {
        section::<fracture_ingest::IngestConfig>(s, "ingest").map(drop)
    });
    m.insert("preprocess", |s| {
        section::<fracture_preprocess::PreprocessConfig>(s, "preprocess").map(drop)
    });
    m.insert("ensemble", |s| {
        section::<fracture_ensemble::EnsembleConfig>(s, "ensemble").map(drop)
    });
    m.insert("postprocess", |s| {
        section::<fracture_postprocess::PostprocessConfig>(s, "postprocess").map(drop)
    });
    m.insert("audit", |s| {
        let a = section::<fracture_audit::AuditConfig>(s, "audit")?;
        a.drift.validate().map_err(|e| e.to_string())
    });
    m.insert("export", |s| {
        section::<fracture_export::ExportConfig>(s, "export").map(drop)
    });
    m
}

/// Top-level table names of a TOML document (`[a]`, `[a.b]` -> `a`).
fn toml_sections(toml: &str) -> BTreeSet<String> {
    toml.lines()
        .map(str::trim)
        .filter(|l| l.starts_with('[') && !l.starts_with("[["))
        .map(|l| {
            l.trim_matches(['[', ']'])
                .split('.')
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .collect()
}

/// Metric names the binary registers: `(name, is_histogram)`, from string literals in the
/// registering sources (non-test code only).
fn registered_metrics() -> BTreeMap<String, bool> {
    let mut out = BTreeMap::new();
    for path in [
        "shared/src/metrics.rs",
        "services/audit/src/lib.rs",
        "services/export/src/lib.rs",
    ] {
        let code = source(path);
        let code = code.split("#[cfg(test)]").next().unwrap_or("");
        for (i, _) in code.match_indices("\"fracture_") {
            let name: String = code[i + 1..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if code[i + 1 + name.len()..].starts_with('"') {
                let before = &code[..i];
                let histogram = before
                    .rfind("Opts::new(")
                    .is_some_and(|j| before[..j].ends_with("Histogram"));
                out.insert(name, histogram);
            }
        }
    }
    assert!(
        out.len() >= 8,
        "found only {out:?} in the metric sources: has registration moved?"
    );
    out
}

/// `fracture_*` identifiers in a PromQL expression.
fn metric_names_in(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (i, _) in expr.match_indices("fracture_") {
        let boundary = expr[..i]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
        if boundary {
            names.push(
                expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect(),
            );
        }
    }
    names
}

/// The topic a stage consumes, from its `env.consume(STAGE, env.topics.of::<T>(), ...)`.
fn input_topic(stage: &str, prefix: &str) -> String {
    use fracture_shared::messages::{Deidentified, Finding, Message, Preprocessed, Scored};
    let code = source(&format!("services/{stage}/src/lib.rs"));
    let call = code
        .find("env.consume(")
        .unwrap_or_else(|| panic!("services/{stage}/src/lib.rs: no env.consume( call"));
    let rest = &code[call..];
    let ty = rest
        .find("of::<")
        .map(|i| &rest[i + 5..])
        .and_then(|r| r.split('>').next())
        .unwrap_or_else(|| panic!("services/{stage}: env.consume without topics.of::<T>()"));
    let suffix = match ty {
        "Deidentified" => Deidentified::TOPIC,
        "Preprocessed" => Preprocessed::TOPIC,
        "Scored" => Scored::TOPIC,
        "Finding" => Finding::TOPIC,
        other => panic!("services/{stage} consumes {other}: teach this test its topic"),
    };
    fracture_shared::Topics::new(prefix).name(suffix)
}

fn topic_prefix(r: &Rendered, tmp: &Path) -> String {
    r.settings(tmp, &[])
        .section::<fracture_shared::KafkaConfig>("kafka")
        .expect("kafka section")
        .topic_prefix
}

// ---------------------------------------------------------------------------------------------

#[test]
fn helm_lint_passes_with_defaults_and_with_every_option_on() {
    for extra in [&[][..], &["-f", ALL_ON][..]] {
        let mut args = vec!["lint", ".", "--strict", "--kube-version", KUBE_VERSION];
        args.extend_from_slice(extra);
        let out = run_helm(&args);
        assert!(out.contains("0 chart(s) failed"), "{out}");
    }
}

#[test]
fn manifests_use_current_api_versions_and_reference_what_exists() {
    let expected: BTreeMap<&str, &str> = [
        ("StatefulSet", "apps/v1"),
        ("Service", "v1"),
        ("ConfigMap", "v1"),
        ("Secret", "v1"),
        ("ServiceAccount", "v1"),
        ("PersistentVolumeClaim", "v1"),
        ("HorizontalPodAutoscaler", "autoscaling/v2"),
        ("PodDisruptionBudget", "policy/v1"),
        ("Ingress", "networking.k8s.io/v1"),
        ("ScaledObject", "keda.sh/v1alpha1"),
        ("ServiceMonitor", "monitoring.coreos.com/v1"),
        ("PrometheusRule", "monitoring.coreos.com/v1"),
    ]
    .into();
    let variants = [
        defaults(),
        all_on(),
        Rendered::new(
            "all-on, HPA",
            &["-f", ALL_ON, "--set", "keda.enabled=false"],
        ),
    ];
    for r in &variants {
        let l = &r.label;
        let mut seen = BTreeSet::new();
        for d in &r.docs {
            let (kind, name) = (text(&d["kind"]), text(&d["metadata"]["name"]));
            let api = expected
                .get(kind)
                .unwrap_or_else(|| panic!("{l}: unexpected kind {kind} ({name})"));
            assert_eq!(text(&d["apiVersion"]), *api, "{l}: {kind} {name}");
            assert!(seen.insert((kind, name)), "{l}: two {kind} named {name}");
            assert!(
                !name.is_empty()
                    && name.len() <= 63
                    && name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && name.starts_with(|c: char| c.is_ascii_lowercase())
                    && !name.ends_with('-'),
                "{l}: {kind} name {name:?} is not a DNS-1035 label"
            );
            for (k, v) in d["metadata"]["labels"].as_mapping().into_iter().flatten() {
                let v = v.as_str().unwrap_or_else(|| {
                    panic!("{l}: {kind} {name} label {k:?} is not a string: {v:?}")
                });
                assert!(v.len() <= 63, "{l}: {kind} {name} label {k:?}={v}");
            }
        }

        let pod_labels = |stage: &str| -> &serde_yaml::Mapping {
            r.deployment(stage)["spec"]["template"]["metadata"]["labels"]
                .as_mapping()
                .expect("pod labels")
        };
        let selects = |selector: &Value, stage: &str| -> bool {
            let labels = pod_labels(stage);
            selector
                .as_mapping()
                .is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| labels.get(k) == Some(v)))
        };
        let selected_stages = |selector: &Value| -> Vec<&str> {
            r.stages()
                .into_iter()
                .filter(|s| selects(selector, s))
                .collect()
        };

        for stage in r.stages() {
            let d = r.deployment(stage);
            assert_eq!(
                selected_stages(&d["spec"]["selector"]["matchLabels"]),
                [stage],
                "{l}: the {stage} StatefulSet selects its own pods only"
            );
            let pod = r.pod(stage);
            for v in items(&pod["volumes"]) {
                if let Some(cm) = v["configMap"]["name"].as_str() {
                    let external = cm == "hospital-ca";
                    assert!(
                        external
                            || r.kind("ConfigMap")
                                .iter()
                                .any(|c| text(&c["metadata"]["name"]) == cm),
                        "{l}: {stage} mounts ConfigMap {cm} that the chart does not render"
                    );
                }
                if let Some(claim) = v["persistentVolumeClaim"]["claimName"].as_str() {
                    let rendered = r
                        .kind("PersistentVolumeClaim")
                        .iter()
                        .any(|c| text(&c["metadata"]["name"]) == claim);
                    assert!(
                        rendered || ["pacs-archive-export", "fracture-models"].contains(&claim),
                        "{l}: {stage} mounts claim {claim} that is neither rendered nor given in the values"
                    );
                }
            }
            // Every named port a probe or Service points at exists on the container.
            let ports: BTreeMap<&str, i64> = items(&r.container(stage)["ports"])
                .iter()
                .map(|p| (text(&p["name"]), int(&p["containerPort"])))
                .collect();
            for probe in ["livenessProbe", "readinessProbe"] {
                let port = &r.container(stage)[probe]["httpGet"]["port"];
                assert!(
                    ports.contains_key(text(port)),
                    "{l}: {stage} {probe} port {port:?} is not a container port"
                );
            }
            for e in items(&r.container(stage)["env"]) {
                let name = text(&e["name"]);
                assert!(
                    !name.is_empty()
                        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                        && !name.starts_with(|c: char| c.is_ascii_digit()),
                    "{l}: {stage} env name {name:?}"
                );
            }
            let sc = &pod["securityContext"];
            assert_eq!(
                sc["runAsNonRoot"].as_bool(),
                Some(true),
                "{l}: {stage} runs as non-root"
            );
            assert!(int(&sc["runAsUser"]) > 0, "{l}: {stage} runAsUser");
            let csc = &r.container(stage)["securityContext"];
            assert_eq!(
                csc["readOnlyRootFilesystem"].as_bool(),
                Some(true),
                "{l}: {stage}"
            );
            assert_eq!(
                csc["allowPrivilegeEscalation"].as_bool(),
                Some(false),
                "{l}: {stage}"
            );
            assert!(
                int(&pod["terminationGracePeriodSeconds"]) >= 30,
                "{l}: {stage} gets time to finish or abort its Kafka transaction on SIGTERM"
            );
        }

        for svc in r.kind("Service") {
            let name = text(&svc["metadata"]["name"]);
            let stages = selected_stages(&svc["spec"]["selector"]);
            assert_eq!(
                stages.len(),
                1,
                "{l}: Service {name} selects one stage's pods"
            );
            let container = r.container(stages[0]);
            for p in items(&svc["spec"]["ports"]) {
                let target = text(&p["targetPort"]);
                assert!(
                    items(&container["ports"])
                        .iter()
                        .any(|c| text(&c["name"]) == target),
                    "{l}: Service {name} targets port {target:?}, which {} does not have",
                    stages[0]
                );
            }
        }
        for pdb in r.kind("PodDisruptionBudget") {
            let name = text(&pdb["metadata"]["name"]);
            assert_eq!(
                selected_stages(&pdb["spec"]["selector"]["matchLabels"]).len(),
                1,
                "{l}: PodDisruptionBudget {name} covers one stage"
            );
        }
        for kind in ["HorizontalPodAutoscaler", "ScaledObject"] {
            for a in r.kind(kind) {
                let target = &a["spec"]["scaleTargetRef"];
                assert_eq!(text(&target["kind"]), "StatefulSet");
                let d = r.get("StatefulSet", text(&target["name"]));
                assert!(
                    d["spec"]["replicas"].is_null(),
                    "{l}: {kind} scales {}, so the StatefulSet must not pin replicas (an upgrade would undo the scaling)",
                    text(&target["name"])
                );
            }
        }
        for ing in r.kind("Ingress") {
            for rule in items(&ing["spec"]["rules"]) {
                for p in items(&rule["http"]["paths"]) {
                    let backend = &p["backend"]["service"];
                    let svc = r.get("Service", text(&backend["name"]));
                    let port = text(&backend["port"]["name"]);
                    assert!(
                        items(&svc["spec"]["ports"])
                            .iter()
                            .any(|sp| text(&sp["name"]) == port),
                        "{l}: the Ingress points at port {port:?} of {}",
                        text(&backend["name"])
                    );
                }
            }
        }
        for sm in r.kind("ServiceMonitor") {
            let port = text(&items(&sm["spec"]["endpoints"])[0]["port"]);
            let components: Vec<&str> = sm["spec"]["selector"]["matchExpressions"][0]["values"]
                .as_sequence()
                .map(|v| v.iter().map(text).collect())
                .unwrap_or_default();
            assert_eq!(
                components,
                r.stages(),
                "{l}: the ServiceMonitor scrapes every stage"
            );
            for stage in r.stages() {
                let svc = r.get("Service", &format!("{RELEASE}-{stage}"));
                assert!(items(&svc["spec"]["ports"])
                    .iter()
                    .any(|p| text(&p["name"]) == port));
            }
        }
    }
}

#[test]
fn every_stage_is_its_own_statefulset_of_one_image_with_probes_and_a_stable_unique_instance() {
    for r in [defaults(), all_on()] {
        let l = &r.label;
        assert_eq!(
            r.kind("StatefulSet").len(),
            r.stages().len(),
            "{l}: one StatefulSet per stage"
        );
        assert_eq!(
            r.stages().contains(&EXPORT),
            l == "all-on",
            "{l}: the export StatefulSet only when export.enabled"
        );
        let tmp = tempfile::tempdir().expect("tempdir");
        let settings = r.settings(tmp.path(), &[]);
        let telemetry: fracture_shared::telemetry::TelemetryConfig =
            settings.section("telemetry").expect("telemetry");
        let metrics_port = port_of(&telemetry.metrics_addr);
        let mut images = BTreeSet::new();
        for stage in r.stages() {
            let c = r.container(stage);
            images.insert(text(&c["image"]).to_string());
            let args: Vec<&str> = items(&c["args"]).iter().map(text).collect();
            let config = args
                .windows(2)
                .find(|w| w[0] == "--config")
                .map(|w| w[1])
                .unwrap_or_else(|| panic!("{l}: {stage} has no --config: {args:?}"));
            assert!(
                args.ends_with(&["serve", stage]),
                "{l}: {stage} runs `serve {stage}`: {args:?}"
            );
            // The config file is the ConfigMap's fracture.toml.
            let (mount, _, volume) = r
                .mount_of(stage, config)
                .unwrap_or_else(|| panic!("{l}: {stage}'s {config} is on no volume"));
            assert_eq!(
                text(&volume["configMap"]["name"]),
                format!("{RELEASE}-config")
            );
            assert_eq!(
                Path::new(config).strip_prefix(&mount).ok(),
                Some(Path::new("fracture.toml"))
            );

            let instance = r
                .env(stage, "FRACTURE_INSTANCE")
                .unwrap_or_else(|| panic!("{l}: {stage} has no FRACTURE_INSTANCE"));
            assert_eq!(
                text(&instance["valueFrom"]["fieldRef"]["fieldPath"]),
                "metadata.name",
                "{l}: {stage}: transactional ids must be unique per replica, so the instance is the pod name"
            );
            // A StatefulSet's pod name is `<set>-<ordinal>` and a replacement pod keeps it, so a
            // replica's transactional ids survive its pod being replaced (zombie fencing).
            let set = r.deployment(stage);
            assert_eq!(text(&set["kind"]), "StatefulSet", "{l}: {stage}");
            assert_eq!(
                text(&set["spec"]["podManagementPolicy"]),
                "Parallel",
                "{l}: {stage}: replicas start and stop together, not one ordinal at a time"
            );
            assert_eq!(
                text(&set["spec"]["serviceName"]),
                format!("{RELEASE}-{stage}"),
                "{l}: {stage}: its governing Service is the stage's own"
            );

            let metrics = items(&c["ports"])
                .iter()
                .find(|p| text(&p["name"]) == "metrics")
                .unwrap_or_else(|| panic!("{l}: {stage} has no metrics port"));
            assert_eq!(int(&metrics["containerPort"]), metrics_port, "{l}: {stage}");
            for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
                let get = &c[probe]["httpGet"];
                assert_eq!(text(&get["path"]), path, "{l}: {stage} {probe}");
                let port = &get["port"];
                assert!(
                    text(port) == "metrics" || port.as_i64() == Some(metrics_port),
                    "{l}: {stage} {probe} on the metrics port, not {port:?}"
                );
            }
            let res = &c["resources"];
            assert!(
                !res["requests"]["cpu"].is_null() && !res["requests"]["memory"].is_null(),
                "{l}: {stage} requests CPU and memory"
            );
            assert!(
                !res["limits"]["memory"].is_null(),
                "{l}: {stage} has a memory limit"
            );
            if let Some(url) = settings
                .section::<fracture_shared::StoreConfig>("store")
                .ok()
                .map(|s| s.url)
                .filter(|u| !u.starts_with("s3://"))
            {
                r.assert_writable(
                    stage,
                    url.trim_start_matches("file://"),
                    "the claim-check store",
                );
                let (_, _, volume) = r.mount_of(stage, &url).expect("store mount");
                assert!(
                    !volume["persistentVolumeClaim"]["claimName"].is_null(),
                    "{l}: {stage}: the store is shared between stages, so it is a claim"
                );
            }
            let annotations = &r.deployment(stage)["spec"]["template"]["metadata"]["annotations"];
            let scraped = text(&annotations["prometheus.io/scrape"]) == "true";
            let monitored = !r.kind("ServiceMonitor").is_empty();
            assert!(
                scraped != monitored,
                "{l}: {stage}: scrape annotations or a ServiceMonitor"
            );
            let svc = r.get("Service", &format!("{RELEASE}-{stage}"));
            assert!(
                items(&svc["spec"]["ports"])
                    .iter()
                    .any(|p| text(&p["name"]) == "metrics"),
                "{l}: {stage}'s Service has the metrics port"
            );
        }
        assert_eq!(
            images.len(),
            1,
            "{l}: one image for every stage: {images:?}"
        );
    }
}

#[test]
fn fracture_toml_has_only_what_the_binary_knows_and_the_binary_loads_it() {
    let known = sections_read_by_binary();
    let checks = section_checks();
    let unchecked: Vec<_> = known
        .iter()
        .filter(|s| !checks.contains_key(s.as_str()))
        .collect();
    assert!(
        unchecked.is_empty(),
        "the binary reads sections {unchecked:?} that this test cannot check yet: add them to section_checks()"
    );
    for r in [defaults(), all_on()] {
        let l = &r.label;
        let toml = r.toml();
        let tmp = tempfile::tempdir().expect("tempdir");
        let settings = r.settings(tmp.path(), &[]);
        for s in toml_sections(&toml) {
            assert!(
                known.contains(&s),
                "{l}: fracture.toml has a [{s}] section, which the binary never reads (it knows {known:?})"
            );
        }
        for (name, check) in &checks {
            check(&settings).unwrap_or_else(|e| panic!("{l}: [{name}] is refused: {e}\n{toml}"));
        }
        // Every FRACTURE__SECTION__KEY the StatefulSets set names a real key.
        for stage in r.stages() {
            for e in items(&r.container(stage)["env"]) {
                let Some(var) = text(&e["name"]).strip_prefix("FRACTURE__") else {
                    continue;
                };
                let key = var
                    .split("__")
                    .map(str::to_lowercase)
                    .collect::<Vec<_>>()
                    .join(".");
                let section = key.split('.').next().unwrap_or("").to_string();
                let check = checks
                    .get(section.as_str())
                    .unwrap_or_else(|| panic!("{l}: {stage} sets {var} in no known section"));
                let s = r.settings(tmp.path(), &[(key.clone(), "x".into())]);
                check(&s)
                    .unwrap_or_else(|e| panic!("{l}: {stage}'s FRACTURE__{var} is refused: {e}"));
            }
        }

        // The real binary, through its own --config: `deid` reads [ingest] (scp, burned-in rules,
        // site code and UID root included) and needs no broker.
        let input = tmp.path().join("input");
        std::fs::create_dir_all(&input).expect("input dir");
        let key = tmp.path().join("deid.key");
        std::fs::write(&key, [7u8; 32]).expect("key");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fracture"));
        cmd.arg("--config")
            .arg(tmp.path().join("fracture.toml"))
            .arg("deid")
            .arg(&input)
            .arg("--out")
            .arg(tmp.path().join("out"))
            .arg("--key-file")
            .arg(&key);
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("FRACTURE__")) {
            cmd.env_remove(k);
        }
        let out = cmd.output().expect("run fracture");
        assert!(
            out.status.success(),
            "{l}: `fracture --config <chart's fracture.toml> deid` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn ingest_gets_the_key_file_writable_edge_folders_and_the_dicom_port() {
    for r in [defaults(), all_on()] {
        let l = &r.label;
        let tmp = tempfile::tempdir().expect("tempdir");
        let settings = r.settings(tmp.path(), &[]);
        let ingest: fracture_ingest::IngestConfig = settings.section("ingest").expect("ingest");
        let secret_name = if l == "all-on" {
            let s = r.kind("Secret");
            assert_eq!(s.len(), 1, "{l}: secrets.create renders the Secret");
            let data = &s[0]["data"];
            for k in ["deid.key", "database-url", "dashboard-token"] {
                assert!(!data[k].is_null(), "{l}: the Secret has {k}");
            }
            text(&s[0]["metadata"]["name"]).to_string()
        } else {
            assert!(
                r.kind("Secret").is_empty(),
                "{l}: an existing Secret is used by name"
            );
            "fracture-secrets".to_string()
        };

        // key_file points into the Secret's mount, at the item holding the key.
        let (mount, read_only, volume) = r
            .mount_of("ingest", &ingest.key_file)
            .unwrap_or_else(|| panic!("{l}: ingest.key_file {} is on no volume", ingest.key_file));
        assert!(read_only, "{l}: the key is mounted read-only");
        assert_eq!(text(&volume["secret"]["secretName"]), secret_name, "{l}");
        let file = Path::new(&ingest.key_file)
            .strip_prefix(&mount)
            .expect("under the mount");
        assert!(
            items(&volume["secret"]["items"])
                .iter()
                .any(|i| text(&i["key"]) == "deid.key" && Path::new(text(&i["path"])) == file),
            "{l}: the Secret's deid.key lands at {}",
            ingest.key_file
        );
        // The key is ingest's alone.
        for stage in r.stages().into_iter().filter(|s| *s != "ingest") {
            assert!(
                !items(&r.pod(stage)["volumes"])
                    .iter()
                    .any(|v| !v["secret"].is_null()
                        && text(&v["secret"]["secretName"]) == secret_name),
                "{l}: {stage} must not mount the de-identification key"
            );
        }

        r.assert_writable("ingest", &ingest.quarantine, "ingest.quarantine");
        r.assert_writable("ingest", &ingest.scp.spool, "ingest.scp.spool");
        let linkage = r
            .env("ingest", "FRACTURE__INGEST__LINKAGE")
            .map(|e| text(&e["value"]).to_string())
            .unwrap_or(ingest.linkage.clone());
        assert!(
            linkage.contains("$(FRACTURE_INSTANCE)"),
            "{l}: each ingest pod appends to its own linkage file: {linkage}"
        );
        let linkage_dir = Path::new(&linkage).parent().expect("linkage dir");
        r.assert_writable(
            "ingest",
            linkage_dir.to_str().unwrap_or(""),
            "the linkage table",
        );
        let (_, _, edge) = r.mount_of("ingest", &linkage).expect("edge mount");
        assert!(
            !edge["persistentVolumeClaim"].is_null(),
            "{l}: the linkage table outlives the pod"
        );
        if !ingest.input_dir.is_empty() {
            assert!(
                r.mount_of("ingest", &ingest.input_dir).is_some(),
                "{l}: input_dir is mounted"
            );
        }

        // The DICOM door: listen port = container port "dicom" <- the ingest Service.
        let listen = port_of(&ingest.scp.listen);
        let dicom = items(&r.container("ingest")["ports"])
            .iter()
            .find(|p| text(&p["name"]) == "dicom")
            .unwrap_or_else(|| panic!("{l}: ingest has no dicom port"));
        assert_eq!(int(&dicom["containerPort"]), listen, "{l}");
        assert!(
            listen > 1024,
            "{l}: a non-root container listens above 1024"
        );
        let svc = r.get("Service", &format!("{RELEASE}-ingest"));
        assert!(
            items(&svc["spec"]["ports"])
                .iter()
                .any(|p| text(&p["targetPort"]) == "dicom"),
            "{l}: the ingest Service exposes the DICOM port"
        );
        for s in r.kind("Service") {
            for p in items(&s["spec"]["ports"]) {
                assert!(
                    !text(&p["name"]).contains("stow"),
                    "{l}: no STOW-RS port: the endpoint does not exist"
                );
            }
        }
    }
    let closed = Rendered::new("dicom off", &["--set", "ingest.dicom.enabled=false"]);
    let tmp = tempfile::tempdir().expect("tempdir");
    let ingest: fracture_ingest::IngestConfig = closed
        .settings(tmp.path(), &[])
        .section("ingest")
        .expect("ingest");
    assert_eq!(ingest.scp.listen, "", "dicom off closes the SCP");
    assert!(!items(&closed.container("ingest")["ports"])
        .iter()
        .any(|p| text(&p["name"]) == "dicom"));
}

#[test]
fn audit_reads_the_database_url_and_dashboard_token_from_the_secret() {
    for r in [defaults(), all_on()] {
        let l = &r.label;
        let secret_name = match r.kind("Secret").first() {
            Some(s) => text(&s["metadata"]["name"]).to_string(),
            None => "fracture-secrets".to_string(),
        };
        for (var, key) in [
            ("FRACTURE__AUDIT__DATABASE", "database-url"),
            ("FRACTURE__AUDIT__DASHBOARD_TOKEN", "dashboard-token"),
        ] {
            let e = r
                .env("audit", var)
                .unwrap_or_else(|| panic!("{l}: audit has no {var}"));
            let from = &e["valueFrom"]["secretKeyRef"];
            assert_eq!(text(&from["name"]), secret_name, "{l}: {var}");
            assert_eq!(text(&from["key"]), key, "{l}: {var}");
            for stage in r.stages().into_iter().filter(|s| *s != "audit") {
                assert!(r.env(stage, var).is_none(), "{l}: {var} is audit's alone");
            }
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        let audit: fracture_audit::AuditConfig =
            r.settings(tmp.path(), &[]).section("audit").expect("audit");
        let port = port_of(&audit.dashboard_addr);
        let c = r.container("audit");
        assert!(items(&c["ports"])
            .iter()
            .any(|p| text(&p["name"]) == "dashboard" && int(&p["containerPort"]) == port));
        let svc = r.get("Service", &format!("{RELEASE}-audit-dashboard"));
        assert_eq!(
            text(&items(&svc["spec"]["ports"])[0]["targetPort"]),
            "dashboard"
        );
    }
    let d = defaults();
    assert!(d.kind("Ingress").is_empty(), "no Ingress unless asked for");
    let a = all_on();
    let ing = a.kind("Ingress");
    assert_eq!(ing.len(), 1, "all-on renders the dashboard Ingress");
    let backend = &items(&items(&ing[0]["spec"]["rules"])[0]["http"]["paths"])[0]["backend"];
    assert_eq!(
        text(&backend["service"]["name"]),
        format!("{RELEASE}-audit-dashboard")
    );
    assert!(
        !ing[0]["spec"]["tls"].is_null(),
        "TLS on the dashboard Ingress"
    );
}

#[test]
fn only_the_ensemble_asks_for_a_gpu_and_only_when_told_to() {
    let has_gpu = |r: &Rendered, stage: &str| {
        let res = &r.container(stage)["resources"];
        ["requests", "limits"].map(|k| res[k]["nvidia.com/gpu"].as_i64())
    };
    let d = defaults();
    for stage in d.stages() {
        assert_eq!(
            has_gpu(&d, stage),
            [None, None],
            "defaults: {stage} runs on CPU"
        );
    }
    let a = all_on();
    for stage in a.stages() {
        let want = if stage == "ensemble" {
            [Some(1), Some(1)]
        } else {
            [None, None]
        };
        assert_eq!(has_gpu(&a, stage), want, "all-on: {stage}");
    }
    let pod = a.pod("ensemble");
    assert!(
        !pod["nodeSelector"].is_null(),
        "all-on: ensemble nodeSelector"
    );
    assert!(
        items(&pod["tolerations"])
            .iter()
            .any(|t| text(&t["key"]) == "nvidia.com/gpu"),
        "all-on: ensemble tolerates GPU nodes"
    );
    assert!(!pod["affinity"].is_null(), "all-on: ensemble affinity");
    assert!(
        a.pod("preprocess")["tolerations"].is_null(),
        "tolerations are per stage"
    );
}

#[test]
fn preprocess_and_ensemble_scale_on_their_consumer_lag_or_cpu() {
    let a = all_on();
    let tmp = tempfile::tempdir().expect("tempdir");
    let prefix = topic_prefix(&a, tmp.path());
    let scaled = a.kind("ScaledObject");
    assert_eq!(scaled.len(), 2, "all-on: KEDA for preprocess and ensemble");
    assert!(
        a.kind("HorizontalPodAutoscaler").is_empty(),
        "KEDA owns the HPA when enabled"
    );
    for stage in ["preprocess", "ensemble"] {
        let so = a.get("ScaledObject", &format!("{RELEASE}-{stage}"));
        assert_eq!(
            text(&so["spec"]["scaleTargetRef"]["name"]),
            format!("{RELEASE}-{stage}")
        );
        let triggers = items(&so["spec"]["triggers"]);
        assert_eq!(triggers.len(), 2, "{stage}: one trigger per lane");
        let topics = fracture_shared::bus::Topics::new(&prefix);
        let live = input_topic(stage, &prefix);
        // StageEnv::consume_many joins `<prefix>.<stage>` on the live lane and
        // `<prefix>.<stage>.backscan` on the back-scan lane.
        let lanes = [
            (format!("{prefix}.{stage}"), live.clone()),
            (
                format!("{prefix}.{stage}.backscan"),
                topics.in_lane(&live, fracture_shared::bus::Lane::Backscan),
            ),
        ];
        for (t, (group, topic)) in triggers.iter().zip(lanes) {
            assert_eq!(text(&t["type"]), "kafka");
            let m = &t["metadata"];
            assert_eq!(text(&m["consumerGroup"]), group, "{stage}");
            assert_eq!(text(&m["topic"]), topic, "{stage}");
            assert!(int(&m["lagThreshold"]) > 0);
            let brokers = a
                .settings(tmp.path(), &[])
                .section::<fracture_shared::KafkaConfig>("kafka")
                .expect("kafka")
                .brokers;
            assert_eq!(text(&m["bootstrapServers"]), brokers);
        }
    }
    let h = Rendered::new(
        "all-on, HPA",
        &["-f", ALL_ON, "--set", "keda.enabled=false"],
    );
    assert!(h.kind("ScaledObject").is_empty());
    let hpas = h.kind("HorizontalPodAutoscaler");
    assert_eq!(hpas.len(), 2, "HPA for preprocess and ensemble");
    for hpa in hpas {
        let metric = &items(&hpa["spec"]["metrics"])[0];
        assert_eq!(text(&metric["resource"]["name"]), "cpu");
        assert!(int(&hpa["spec"]["maxReplicas"]) >= int(&hpa["spec"]["minReplicas"]));
    }
    let d = defaults();
    assert!(d.kind("ScaledObject").is_empty() && d.kind("HorizontalPodAutoscaler").is_empty());
    for stage in STAGES {
        assert!(
            !d.deployment(stage)["spec"]["replicas"].is_null(),
            "defaults: {stage} replicas"
        );
    }
}

#[test]
fn every_stage_has_a_disruption_budget() {
    for r in [defaults(), all_on()] {
        for stage in r.stages() {
            let pdb = r.get("PodDisruptionBudget", &format!("{RELEASE}-{stage}"));
            assert_eq!(
                text(&pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]),
                stage,
                "{}",
                r.label
            );
        }
    }
}

/// The PrometheusRule carries rules/alerts.yaml as it is, only with every option on, and its
/// expressions name only metrics the stages register (a renamed metric would silence an alert).
#[test]
fn alert_rules_ship_as_a_prometheus_rule_naming_only_real_metrics() {
    assert!(defaults().kind("PrometheusRule").is_empty());
    let a = all_on();
    let rules = a.kind("PrometheusRule");
    assert_eq!(rules.len(), 1, "one PrometheusRule with every option on");
    let rule = rules[0];
    assert_eq!(
        text(&rule["metadata"]["labels"]["release"]),
        "kube-prometheus-stack"
    );
    let file: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart().join("rules/alerts.yaml")).unwrap())
            .unwrap();
    assert_eq!(
        rule["spec"], file,
        "the PrometheusRule's spec is rules/alerts.yaml"
    );
    let known = registered_metrics();
    let mut alerts = BTreeSet::new();
    for group in items(&rule["spec"]["groups"]) {
        for r in items(&group["rules"]) {
            let expr = text(&r["expr"]);
            let names = metric_names_in(expr);
            assert!(!names.is_empty(), "{expr}");
            for name in names {
                assert!(
                    known.contains_key(&name),
                    "alert {} uses {name}, which no stage registers: {expr}",
                    text(&r["alert"])
                );
            }
            alerts.insert(text(&r["alert"]).to_string());
        }
    }
    for want in [
        "FractureSensitivityDrift",
        "FractureConsumerLagGrowing",
        "FractureDeadLetterRate",
        "FractureExportFailing",
    ] {
        assert!(alerts.contains(want), "{want} missing: {alerts:?}");
    }
}

#[test]
fn grafana_dashboard_uses_only_metrics_the_stages_export() {
    assert!(
        defaults().kind("ConfigMap").len() == 1,
        "no dashboard ConfigMap by default"
    );
    let a = all_on();
    let cm = a.get("ConfigMap", &format!("{RELEASE}-grafana-dashboard"));
    assert_eq!(text(&cm["metadata"]["labels"]["grafana_dashboard"]), "1");
    let json: serde_json::Value =
        serde_json::from_str(text(&cm["data"]["fracture.json"])).expect("the dashboard is JSON");
    let known = registered_metrics();
    let mut exprs = Vec::new();
    fn collect(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(e) = m.get("expr").and_then(|e| e.as_str()) {
                    out.push(e.to_string());
                }
                m.values().for_each(|x| collect(x, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| collect(x, out)),
            _ => {}
        }
    }
    collect(&json, &mut exprs);
    assert!(exprs.len() >= 10, "the dashboard has its panels: {exprs:?}");
    let mut used = BTreeSet::new();
    for e in &exprs {
        for name in metric_names_in(e) {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|b| known.get(*b) == Some(&true));
            let metric = base.unwrap_or(&name).to_string();
            assert!(
                known.contains_key(&metric),
                "the dashboard queries {name}, which no stage registers (known: {known:?}): {e}"
            );
            used.insert(metric);
        }
    }
    for want in [
        "fracture_radiographs_processed_total",
        "fracture_dead_letters_total",
        "fracture_stage_seconds",
        "fracture_batch_size",
        "fracture_ready",
        "fracture_audit_sensitivity",
    ] {
        assert!(used.contains(want), "the dashboard has a panel on {want}");
    }
    // The stages export no lag of their own; the lag panel reads kafka-exporter's.
    let lag_metric = known.keys().find(|k| k.contains("lag"));
    let lag = lag_metric.map_or("kafka_consumergroup_lag", String::as_str);
    assert!(
        exprs.iter().any(|e| e.contains(lag)),
        "the dashboard shows consumer lag ({lag})"
    );
    // The extractor itself: a histogram series is found under its own name.
    let sample = "histogram_quantile(0.99, sum by (le) (rate(fracture_stage_seconds_bucket[5m])))";
    assert_eq!(metric_names_in(sample), ["fracture_stage_seconds_bucket"]);
}

#[test]
fn a_typo_in_the_values_is_refused_not_ignored() {
    let out = Command::new(helm())
        .args(["template", RELEASE, ".", "--kube-version", KUBE_VERSION])
        .args(["--set", "stages.ensemble.gpus=1"])
        .current_dir(chart())
        .output()
        .expect("helm runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("gpus"),
        "values.schema.json refuses unknown keys: {stderr}"
    );
}

/// `export`: its own StatefulSet (`fracture serve export`) reads ingest's linkage tables from the
/// edge volume and keeps its ledger there, one replica replaced (not rolled) so one process holds
/// the ledger; postprocess never sees the edge, and without `export.enabled` nothing exports.
/// Settings that cannot work are refused by `helm`.
#[test]
fn the_export_runs_at_the_edge_volume_in_its_own_statefulset_when_asked() {
    const EDGE: &str = "/var/lib/fracture/edge";
    let d = defaults();
    let tmp = tempfile::tempdir().expect("tempdir");
    assert!(
        !d.toml().contains("[export]"),
        "defaults: no [export] section\n{}",
        d.toml()
    );
    assert!(
        !d.stages().contains(&EXPORT),
        "defaults: no export StatefulSet"
    );
    let export: fracture_export::ExportConfig = d
        .settings(tmp.path(), &[])
        .section("export")
        .expect("export");
    assert!(export.pacs.is_empty(), "defaults: no PACS");

    for r in [
        all_on(),
        Rendered::new(
            "export on",
            &[
                "--set",
                "export.enabled=true",
                "--set",
                "export.pacs=PACS@pacs.hospital.local:104",
            ],
        ),
    ] {
        let l = &r.label;
        let tmp = tempfile::tempdir().expect("tempdir");
        let export: fracture_export::ExportConfig = r
            .settings(tmp.path(), &[])
            .section("export")
            .expect("export");
        export
            .validate()
            .unwrap_or_else(|e| panic!("{l}: the rendered export settings are refused: {e}"));
        let args: Vec<&str> = items(&r.container(EXPORT)["args"])
            .iter()
            .map(text)
            .collect();
        assert!(
            args.ends_with(&["serve", EXPORT]),
            "{l}: the export runs `serve export`: {args:?}"
        );
        // The linkage folder is the one every ingest pod writes its own table into.
        let ingest_linkage = text(
            &r.env("ingest", "FRACTURE__INGEST__LINKAGE")
                .expect("ingest's linkage env")["value"],
        )
        .to_string();
        assert_eq!(
            Path::new(&ingest_linkage).parent(),
            Some(Path::new(&export.linkage)),
            "{l}: the export reads the folder ingest writes"
        );
        let (_, _, theirs) = r.mount_of("ingest", &ingest_linkage).expect("ingest edge");
        let (_, _, ours) = r
            .mount_of(EXPORT, &export.linkage)
            .unwrap_or_else(|| panic!("{l}: the export does not mount {}", export.linkage));
        assert_eq!(
            ours["persistentVolumeClaim"], theirs["persistentVolumeClaim"],
            "{l}: the same edge claim"
        );
        assert!(!ours["persistentVolumeClaim"].is_null(), "{l}: persistent");
        r.assert_writable(EXPORT, &export.ledger, "the export ledger");
        let deployment = r.deployment(EXPORT);
        // A StatefulSet replaces a pod by stopping it before starting the one with its name: one
        // process holds the ledger at a time (a Deployment would need Recreate for that).
        assert_eq!(text(&deployment["kind"]), "StatefulSet", "{l}");
        assert_eq!(
            text(&deployment["spec"]["updateStrategy"]["type"]),
            "RollingUpdate",
            "{l}: one process holds the ledger at a time"
        );
        assert_eq!(
            int(&deployment["spec"]["replicas"]),
            1,
            "{l}: one export replica"
        );
        // Only the edge components see the edge: postprocess is an ordinary stage again.
        for stage in ["preprocess", "ensemble", "postprocess", "audit"] {
            assert!(
                r.mount_of(stage, EDGE).is_none(),
                "{l}: {stage} does not mount the edge volume"
            );
        }
        assert!(
            !r.toml().contains("[postprocess.export]"),
            "{l}: the export's settings are [export]"
        );
    }

    for (set, says) in [
        (vec!["export.enabled=true"], "export.pacs"),
        (
            vec![
                "export.enabled=true",
                "export.pacs=P@h:104",
                "stages.export.replicas=2",
            ],
            "one export replica",
        ),
        (
            vec![
                "export.enabled=true",
                "export.pacs=P@h:104",
                "ingest.edge.persistence.accessModes={ReadWriteOnce}",
            ],
            "ReadWriteMany",
        ),
        (
            vec![
                "export.enabled=true",
                "export.pacs=P@h:104",
                "ingest.edge.persistence.enabled=false",
            ],
            "ingest.edge.persistence.enabled",
        ),
        // A key the chart does not have (the export is not under postprocess) is refused.
        (
            vec![
                "postprocess.export.enabled=true",
                "postprocess.export.pacs=P@h:104",
            ],
            "postprocess",
        ),
    ] {
        let mut cmd = Command::new(helm());
        cmd.args(["template", RELEASE, ".", "--kube-version", KUBE_VERSION]);
        for s in &set {
            cmd.args(["--set", s]);
        }
        let out = cmd.current_dir(chart()).output().expect("helm runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(says),
            "{set:?} is refused saying {says:?}: {stderr}"
        );
    }
}

/// DICOM TLS from the values: ingest's C-STORE door and the export to the PACS read their
/// certificates and keys from the named Secrets, mounted read-only in the pod that uses them
/// (and only there), at the paths fracture.toml gives.
#[test]
fn dicom_tls_certificates_come_from_their_secrets_in_the_pods_that_use_them() {
    let r = all_on();
    let tmp = tempfile::tempdir().expect("tempdir");
    let settings = r.settings(tmp.path(), &[]);
    let ingest: fracture_ingest::IngestConfig = settings.section("ingest").expect("ingest");
    let export: fracture_export::ExportConfig = settings.section("export").expect("export");
    assert!(export.tls, "all-on: TLS to the PACS");
    let files = [
        (
            "ingest",
            ingest.scp.tls_cert_file.as_str(),
            "fracture-dicom-tls",
            "tls.crt",
        ),
        (
            "ingest",
            ingest.scp.tls_key_file.as_str(),
            "fracture-dicom-tls",
            "tls.key",
        ),
        (
            "ingest",
            ingest.scp.tls_client_ca_file.as_str(),
            "fracture-dicom-tls",
            "ca.crt",
        ),
        (
            EXPORT,
            export.tls_ca_file.as_str(),
            "fracture-pacs-tls",
            "ca.crt",
        ),
        (
            EXPORT,
            export.tls_cert_file.as_str(),
            "fracture-pacs-tls",
            "tls.crt",
        ),
        (
            EXPORT,
            export.tls_key_file.as_str(),
            "fracture-pacs-tls",
            "tls.key",
        ),
    ];
    for (stage, file, secret, key) in files {
        let (mount, read_only, volume) = r
            .mount_of(stage, file)
            .unwrap_or_else(|| panic!("{stage}: {file} is on no volume"));
        assert!(read_only, "{stage}: {file} is mounted read-only");
        assert_eq!(text(&volume["secret"]["secretName"]), secret, "{file}");
        assert_eq!(
            Path::new(file)
                .strip_prefix(&mount)
                .expect("under its mount"),
            Path::new(key),
            "{stage}: {file} is the Secret's {key}"
        );
        for other in r.stages().into_iter().filter(|s| *s != stage) {
            assert!(
                !items(&r.pod(other)["volumes"])
                    .iter()
                    .any(|v| text(&v["secret"]["secretName"]) == secret),
                "{other} must not mount {secret}"
            );
        }
    }
    // Off by default: plain TCP on both links, no Secret mounted.
    let d = defaults();
    let tmp = tempfile::tempdir().expect("tempdir");
    let ingest: fracture_ingest::IngestConfig = d
        .settings(tmp.path(), &[])
        .section("ingest")
        .expect("ingest");
    assert!(ingest.scp.tls().expect("valid").is_none());
    // TLS without its Secret is refused by helm, naming the value.
    let out = Command::new(helm())
        .args(["template", RELEASE, ".", "--kube-version", KUBE_VERSION])
        .args(["--set", "ingest.dicom.tls.enabled=true"])
        .current_dir(chart())
        .output()
        .expect("helm runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("ingest.dicom.tls.existingSecret"),
        "{stderr}"
    );
}

/// The Python venv of the test peers (`scripts/pyenv.sh`, pinned, made once).
fn venv_bin(name: &str) -> PathBuf {
    let out = Command::new("bash")
        .arg(chart().join("../../scripts/pyenv.sh"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run scripts/pyenv.sh");
    assert!(
        out.status.success(),
        "scripts/pyenv.sh failed ({}); it needs Python 3.11+ with venv and PyPI access the first time",
        out.status
    );
    let python = PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("pyenv.sh prints the venv's python")
            .trim(),
    );
    python.with_file_name(name)
}

/// Every rendered manifest, with the default values and with every option on, validates strictly
/// (no unknown field, every required one) against the OpenAPI schemas of each Kubernetes version
/// the chart claims that kubernetes-validate has (1.25 to 1.34). The custom resources (KEDA's
/// ScaledObject, the Prometheus Operator's ServiceMonitor and PrometheusRule) have no schema there
/// and are the only kinds allowed to go unchecked.
#[test]
fn manifests_validate_against_the_kubernetes_openapi_schemas() {
    let validate = venv_bin("kubernetes-validate");
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut checked = 0;
    for minor in 25..=34 {
        let version = format!("1.{minor}.0");
        for (label, values) in [("defaults", None), ("all-on", Some(ALL_ON))] {
            let mut cmd = Command::new(helm());
            cmd.args(["template", RELEASE, ".", "--kube-version", &version]);
            if let Some(v) = values {
                cmd.args(["-f", v]);
            }
            let out = cmd.current_dir(chart()).output().expect("helm runs");
            assert!(
                out.status.success(),
                "{label} on {version}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let file = tmp.path().join(format!("{label}-{version}.yaml"));
            std::fs::write(&file, &out.stdout).unwrap();
            let v = Command::new(&validate)
                .args(["--strict", "--quiet", "-k", &version])
                .arg(&file)
                .output()
                .expect("kubernetes-validate runs");
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&v.stdout),
                String::from_utf8_lossy(&v.stderr)
            );
            assert!(
                v.status.success(),
                "{label} on Kubernetes {version}:\n{said}"
            );
            for line in said.lines().filter(|l| !l.trim().is_empty()) {
                assert!(
                    line.contains("Couldn't find schema for kind ScaledObject")
                        || line.contains("Couldn't find schema for kind ServiceMonitor")
                        || line.contains("Couldn't find schema for kind PrometheusRule"),
                    "{label} on Kubernetes {version}: {line}"
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 20);
}
