//! Monitoring as operators run it, against the real tools (`scripts/prometheus.sh` builds the
//! pinned Prometheus and promtool from the Go module proxy): the chart's alert rules
//! (`helm/fracture/rules/alerts.yaml`) pass `promtool check rules` and their unit tests
//! (`alerts.test.yaml`: each alert fires on the series that should raise it and not on its
//! healthy twin), and a real Prometheus scrapes the five `fracture serve` processes of a run,
//! sees every radiograph counted by every stage, and evaluates the rules on them without error.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::pipeline::{self, Pipeline};
use fracture_shared::bus::{KafkaBus, KafkaConfig, Topics};
use fracture_shared::testkit;

/// The folder holding `prometheus` and `promtool`: `FRACTURE_PROMETHEUS`, else
/// `scripts/prometheus.sh` (which builds them once).
fn tools() -> PathBuf {
    common::built_peer("FRACTURE_PROMETHEUS", "prometheus.sh", &[])
}

fn rules() -> PathBuf {
    pipeline::repo().join("helm/fracture/rules")
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new(tools().join("promtool"))
        .args(args)
        .current_dir(rules())
        .output()
        .expect("run promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{said}");
    said
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let checked = promtool(&["check", "rules", "alerts.yaml"]);
    assert!(checked.contains("SUCCESS: 6 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "alerts.test.yaml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// A Prometheus server of its own, killed when dropped.
struct Prometheus {
    child: Child,
    url: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(dir: &Path, targets: &[(&str, String)]) -> Self {
        let mut scrape = String::new();
        for (stage, addr) in targets {
            scrape.push_str(&format!(
                "  - job_name: {stage}\n    static_configs:\n      - targets: ['{addr}']\n"
            ));
        }
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
                 scrape_configs:\n{scrape}",
                rules().join("alerts.yaml").display()
            ),
        )
        .unwrap();
        let port = pipeline::free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(tools().join("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let p = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while get(&format!("{}/-/ready", p.url)).is_none() {
            assert!(
                Instant::now() < deadline,
                "Prometheus not ready: {}",
                std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        p
    }

    fn api(&self, path: &str) -> serde_json::Value {
        let body = get(&format!("{}{path}", self.url)).unwrap_or_else(|| panic!("GET {path}"));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "success", "{path}: {v}");
        v["data"].clone()
    }

    /// `query`'s instant vector as (label `by`, value) pairs.
    fn query(&self, query: &str, by: &str) -> Vec<(String, f64)> {
        let q: String = query
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let data = self.api(&format!("/api/v1/query?query={q}"));
        let mut out: Vec<(String, f64)> = data["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["metric"][by].as_str().unwrap_or_default().to_string(),
                    r["value"][1].as_str().unwrap().parse().unwrap(),
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prometheus_scrapes_the_five_stages_and_evaluates_the_alert_rules() {
    let keep = tempfile::tempdir().unwrap();
    let work = keep.path();
    let n = 8;
    let inputs = work.join("inputs");
    pipeline::phantoms(&inputs, n, 41);
    let key = work.join("deid.key");
    std::fs::write(&key, [6u8; 32]).unwrap();
    let brokers = testkit::kafka_brokers();
    let prefix = testkit::unique_prefix("prom");
    let run = work.join("run");
    let cfg = pipeline::write_null_config(&run, &brokers, &prefix, &key, "");
    let mut p = Pipeline::new(&run, &cfg, std::slice::from_ref(&inputs));
    p.start_all();
    let deadline = Instant::now() + Duration::from_secs(60);
    let targets: Vec<(&str, String)> = loop {
        let found: Vec<_> = pipeline::STAGES
            .iter()
            .filter_map(|s| Some((*s, p.metrics_addr(s)?)))
            .collect();
        if found.len() == pipeline::STAGES.len() {
            break found;
        }
        assert!(Instant::now() < deadline, "metrics addresses: {found:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let prom_dir = work.join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let prom = Prometheus::start(&prom_dir, &targets);

    let bus = KafkaBus::new(KafkaConfig {
        brokers: brokers.clone(),
        ..Default::default()
    });
    let out =
        pipeline::committed_outputs(&bus, &Topics::new(&prefix), n, Duration::from_secs(300)).await;
    assert_eq!(out.len(), n, "{}", p.logs());

    // Every stage scraped and up; every radiograph counted by each stage that handles it, as
    // Prometheus read it; the store traffic of the doors visible too.
    let deadline = Instant::now() + Duration::from_secs(60);
    let stages: Vec<String> = pipeline::STAGES.iter().map(|s| s.to_string()).collect();
    let handling = ["audit", "ensemble", "postprocess", "preprocess"];
    loop {
        let up = prom.query("up", "job");
        let counted = prom.query(
            "sum by (stage) (fracture_radiographs_processed_total)",
            "stage",
        );
        let up_ok = up.iter().map(|(j, _)| j.clone()).collect::<Vec<_>>() == {
            let mut s = stages.clone();
            s.sort();
            s
        } && up.iter().all(|(_, v)| *v == 1.0);
        let counted_ok = handling.iter().all(|s| {
            counted
                .iter()
                .any(|(stage, v)| stage == s && *v == n as f64)
        });
        if up_ok && counted_ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "up: {up:?}\nprocessed: {counted:?}\n{}",
            std::fs::read_to_string(prom_dir.join("prometheus.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let written = prom.query(
        "sum by (job) (fracture_store_bytes_total{op=\"put\"})",
        "job",
    );
    assert!(
        written.iter().any(|(j, v)| j == "ingest" && *v > 0.0),
        "{written:?}"
    );

    // The rules loaded, and each has been evaluated on the real series without error; a healthy
    // run fires none of them.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let data = prom.api("/api/v1/rules");
        let rules: Vec<serde_json::Value> = data["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .collect();
        assert_eq!(rules.len(), 6, "{data}");
        let evaluated = rules.iter().all(|r| {
            r["health"] == "ok"
                && r["lastEvaluation"]
                    .as_str()
                    .is_some_and(|t| !t.starts_with("0001"))
        });
        if evaluated {
            for r in &rules {
                assert_eq!(r["state"], "inactive", "{r}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "rules not evaluated: {data}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let failures = p.stop();
    assert!(failures.is_empty(), "{failures:?}\n{}", p.logs());
}
