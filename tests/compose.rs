//! The compose stack as a platform team first meets it: `docker-compose.yml` as written, started
//! by podman-compose on podman (the engine that installs here; `scripts/compose.sh install`
//! sets it up and builds the base images), with the image made from the Dockerfile's own runtime
//! stage around this test's `fracture` binary. Radiographs reach it through both doors a site
//! uses (a folder read at start, and a modality's C-STORE from dcmtk's `storescu`); findings are
//! read from the broker's host port, reference reads are imported as a quality team does, and the
//! audit dashboard shows them; `down -v` leaves nothing behind.
//!
//! Skips, saying why, where containers cannot run (`FRACTURE_COMPOSE` empty or unset, or the
//! reason `scripts/compose.sh install` recorded).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::pipeline::{self, BIN};
use fracture_shared::bus::{KafkaBus, KafkaConfig, Topics};
use fracture_shared::messages::Finding;

const PROJECT: &str = "fracture-compose-test";
const TOKEN: &str = "compose-test-token";
/// The host ports docker-compose.yml publishes: the five stages' /metrics (two ensembles).
const STAGE_PORTS: [(&str, u16); 6] = [
    ("ingest", 9101),
    ("preprocess", 9102),
    ("ensemble", 9106),
    ("ensemble-2", 9107),
    ("postprocess", 9104),
    ("audit", 9105),
];

/// The folder of containers.conf and bin/podman-compose, or why the test cannot run here.
fn tools() -> Result<PathBuf, String> {
    let dir = std::env::var("FRACTURE_COMPOSE").unwrap_or_default();
    if dir.trim().is_empty() {
        let cache = std::env::var("FRACTURE_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/fracture")
            });
        return Err(match std::fs::read_to_string(cache.join("compose/unavailable")) {
            Ok(why) => format!("containers cannot run here: {}", why.trim()),
            Err(_) => "FRACTURE_COMPOSE is not set (scripts/test.sh sets it from `scripts/compose.sh install`)".into(),
        });
    }
    Ok(PathBuf::from(dir))
}

struct Stack {
    tools: PathBuf,
    dir: PathBuf,
}

impl Stack {
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        let path = format!(
            "{}:{}",
            self.tools.join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        c.current_dir(&self.dir)
            .env("PATH", path)
            .env("CONTAINERS_CONF", self.tools.join("containers.conf"))
            .env("FRACTURE_DASHBOARD_TOKEN", TOKEN);
        c
    }

    fn compose(&self, args: &[&str]) -> Output {
        let out = self
            .command("podman-compose")
            .args(["-p", PROJECT])
            .args(args)
            .output()
            .expect("run podman-compose");
        assert!(
            out.status.success(),
            "podman-compose {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Names of this project's containers, running or not.
    fn containers(&self) -> Vec<String> {
        let out = self
            .command("podman")
            .args(["ps", "-a", "--format", "{{.Names}}"])
            .args([
                "--filter",
                &format!("label=io.podman.compose.project={PROJECT}"),
            ])
            .output()
            .expect("run podman ps");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        for name in self.containers() {
            let out = self
                .command("podman")
                .args(["logs", "--tail", "30", &name])
                .output();
            if let Ok(out) = out {
                all.push_str(&format!(
                    "--- {name}\n{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        all
    }

    fn down(&self) {
        let _ = self
            .command("podman-compose")
            .args(["-p", PROJECT, "down", "-v", "-t", "15"])
            .output();
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        self.down();
    }
}

/// A plain HTTP/1.1 GET on loopback: (status, body).
fn get(port: u16, path: &str, token: Option<&str>) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    Some((status, body.to_string()))
}

fn sum_metric(port: u16, name: &str, stage: &str) -> f64 {
    let Some((200, body)) = get(port, "/metrics", None) else {
        return 0.0;
    };
    body.lines()
        .filter(|l| l.starts_with(name) && l.contains(&format!("stage=\"{stage}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// (SOP Instance UID, region) of each phantom, from its labels.csv.
fn labelled(dir: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(dir.join("labels.csv")).unwrap();
    let mut seen = BTreeSet::new();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split(',');
            Some((f.next()?.to_string(), f.next()?.to_string()))
        })
        .filter(|(uid, _)| seen.insert(uid.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_compose_stack_starts_scores_radiographs_and_shows_the_audit() {
    let tools = match tools() {
        Ok(t) => t,
        Err(why) => {
            eprintln!("SKIPPED: the compose test did not run: {why}");
            return;
        }
    };
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();

    // The image docker-compose.yml names, from the Dockerfile's runtime stage and this binary.
    let out = Command::new("bash")
        .arg(pipeline::repo().join("scripts/compose.sh"))
        .args(["image", BIN])
        .output()
        .expect("run scripts/compose.sh image");
    assert!(
        out.status.success(),
        "scripts/compose.sh image: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image_built = started.elapsed();

    // The compose file as shipped, next to what its header asks a user to make.
    std::fs::copy(
        pipeline::repo().join("docker-compose.yml"),
        dir.join("docker-compose.yml"),
    )
    .unwrap();
    let key = dir.join("deid.key");
    std::fs::write(&key, [11u8; 32]).unwrap();
    let folder = dir.join("input");
    let folder_phantoms = pipeline::phantoms_sized(&folder, 3, 5101, (480, 640));
    let sent = dir.join("sent");
    let sent_phantoms = pipeline::phantoms_sized(&sent, 2, 5102, (480, 640));
    // The container runs as uid 10001: the bind-mounted folder must be readable to it.
    for f in std::iter::once(folder.clone()).chain(folder_phantoms.iter().cloned()) {
        use std::os::unix::fs::PermissionsExt;
        let mode = if f.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let stack = Stack {
        tools,
        dir: dir.clone(),
    };
    stack.down(); // a stack an earlier, killed run left behind
    stack.compose(&["up", "-d"]);
    let deadline = Instant::now() + Duration::from_secs(240);
    for (stage, port) in STAGE_PORTS {
        while !matches!(get(port, "/readyz", None), Some((200, _))) {
            assert!(
                Instant::now() < deadline,
                "{stage} (host port {port}) never became ready"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    let ready = started.elapsed();

    // A modality sends two more through the DICOM door while the stack runs.
    let out = Command::new("storescu")
        .args(["-aet", "MODALITY", "-aec", "FRACTURE", "127.0.0.1", "11112"])
        .args(&sent_phantoms)
        .output()
        .expect("run dcmtk's storescu (apt-get install dcmtk)");
    assert!(
        out.status.success(),
        "storescu: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Every radiograph's finding, read from the broker's host port, exactly once.
    let mut phantoms = labelled(&folder);
    phantoms.extend(labelled(&sent));
    let topics = Topics::new("fracture");
    let bus = KafkaBus::new(KafkaConfig {
        brokers: "127.0.0.1:29092".into(),
        ..Default::default()
    });
    let records =
        pipeline::committed_outputs(&bus, &topics, phantoms.len(), Duration::from_secs(300)).await;
    let findings: Vec<Finding> = records
        .iter()
        .filter(|r| topics.lanes_of::<Finding>().contains(&r.topic))
        .map(|r| serde_json::from_slice(&r.payload).expect("a finding"))
        .collect();
    let dead = records.len() - findings.len();
    assert_eq!(dead, 0, "dead letters: {:?}", &records);
    assert_eq!(findings.len(), phantoms.len(), "{findings:?}");
    let uids: BTreeSet<&str> = findings
        .iter()
        .map(|f| f.id.sop_instance_uid.as_str())
        .collect();
    assert_eq!(uids.len(), phantoms.len(), "one finding per radiograph");
    for r in &records {
        let text = String::from_utf8_lossy(&r.payload);
        for (uid, _) in &phantoms {
            assert!(
                !text.contains(uid.as_str()),
                "an original UID on the bus: {text}"
            );
        }
    }
    let regions: BTreeSet<&str> = phantoms.iter().map(|(_, r)| r.as_str()).collect();
    for f in &findings {
        assert!(f.model_version.starts_with("demo-"), "{f:?}");
        assert!(regions.contains(f.region.as_str()), "{f:?}");
        assert!((0.0..=1.0).contains(&f.score), "{f:?}");
    }
    // The two ensemble replicas share the work without doing any of it twice.
    let scored = sum_metric(9106, "fracture_radiographs_processed_total", "ensemble")
        + sum_metric(9107, "fracture_radiographs_processed_total", "ensemble");
    assert_eq!(
        scored as usize,
        phantoms.len(),
        "radiographs the two ensembles scored"
    );

    // A quality team imports the reference reads; the dashboard then shows each region's
    // performance. Without the token it shows nothing.
    let mut csv = std::fs::read_to_string(folder.join("labels.csv")).unwrap();
    csv.extend(
        std::fs::read_to_string(sent.join("labels.csv"))
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| format!("{l}\n")),
    );
    let reads = dir.join("reads.csv");
    std::fs::write(&reads, csv).unwrap();
    let out = Command::new(BIN)
        .args(["labels", "import"])
        .arg(&reads)
        .env("FRACTURE__KAFKA__BROKERS", "127.0.0.1:29092")
        .env("FRACTURE__INGEST__KEY_FILE", &key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fracture labels import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let dashboard: serde_json::Value = loop {
        if let Some((200, body)) = get(9180, "/api/dashboard.json", Some(TOKEN)) {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let shown: BTreeSet<&str> = v["regions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["region"].as_str())
                .collect();
            if shown == regions {
                break v;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the dashboard never showed the regions {regions:?}: {:?}",
            get(9180, "/api/dashboard.json", Some(TOKEN))
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert!(
        dashboard["model_versions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v.as_str().unwrap().starts_with("demo-")),
        "{dashboard}"
    );
    let (status, _) = get(9180, "/api/dashboard.json", None).expect("the dashboard answers");
    assert_eq!(status, 401, "the dashboard without its token");
    let (status, page) = get(9180, "/", Some(TOKEN)).expect("the dashboard page");
    assert_eq!(status, 200);
    for region in &regions {
        assert!(page.contains(region), "the page does not show {region}");
    }
    let scored_at = started.elapsed();

    stack.down();
    let left = stack.containers();
    assert!(left.is_empty(), "containers left after down: {left:?}");
    eprintln!(
        "compose test: image {:.0} s, stack ready {:.0} s, {} findings and the dashboard at {:.0} s, down at {:.0} s",
        image_built.as_secs_f64(),
        ready.as_secs_f64(),
        findings.len(),
        scored_at.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

/// docker-compose.yml as Docker Compose reads it: compose-go, Docker Compose's own loader (schema,
/// merge keys, interpolation, normalisation), in `container-check` (`scripts/compose.sh checker`). The rules
/// that make the file start under podman-compose too must hold in Docker's reading of it.
#[test]
fn docker_compose_reads_the_file_as_podman_compose_runs_it() {
    let loader = common::container_check();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        pipeline::repo().join("docker-compose.yml"),
        tmp.path().join("docker-compose.yml"),
    )
    .unwrap();
    let load = |token: Option<&str>, profiles: &[&str]| {
        let mut c = Command::new(&loader);
        c.current_dir(tmp.path())
            .args(["compose", "docker-compose.yml"])
            .args(profiles)
            .env_remove("FRACTURE_DASHBOARD_TOKEN");
        if let Some(t) = token {
            c.env("FRACTURE_DASHBOARD_TOKEN", t);
        }
        c.output().expect("run container-check compose")
    };

    // Without the dashboard token Docker Compose refuses the file, and says which variable.
    let refused = load(None, &[]);
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("FRACTURE_DASHBOARD_TOKEN"), "{said}");

    for profiles in [&[][..], &["export"][..]] {
        let out = load(Some(TOKEN), profiles);
        assert!(
            out.status.success(),
            "compose-go refuses docker-compose.yml (profiles {profiles:?}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let project: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let services = project["services"].as_object().unwrap();
        let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
        let mut want: BTreeSet<&str> = [
            "kafka",
            "ingest",
            "preprocess",
            "ensemble",
            "ensemble-2",
            "postprocess",
            "audit",
        ]
        .into();
        if profiles.contains(&"export") {
            want.insert("export");
        }
        assert_eq!(names, want, "services (profiles {profiles:?})");
        // One host port per container port, none shared (a range onto one port is what
        // podman-compose refuses).
        let mut published = BTreeSet::new();
        for (name, s) in services {
            for p in s["ports"].as_array().into_iter().flatten() {
                let host = p["published"].as_str().unwrap_or_default();
                assert!(
                    host.parse::<u16>().is_ok(),
                    "{name} publishes {host:?}, not one port"
                );
                assert!(published.insert(host.to_string()), "host port {host} twice");
            }
            // Nothing waits on a healthcheck or a one-off job, and no dependency has one of its
            // own (podman without systemd runs no healthchecks; podman before 5.6 cannot start
            // a chain).
            for (dep, how) in s["depends_on"].as_object().into_iter().flatten() {
                assert_eq!(how["condition"], "service_started", "{name} -> {dep}");
                assert!(
                    services[dep]["depends_on"]
                        .as_object()
                        .is_none_or(|d| d.is_empty()),
                    "{name} depends on {dep}, which depends on more"
                );
            }
        }
        for stage in ["ingest", "preprocess", "ensemble", "postprocess", "audit"] {
            let s = &services[stage];
            assert_eq!(s["image"], "fracture:local", "{stage}");
            assert_eq!(s["command"][1], stage, "{stage}");
            assert_eq!(s["restart"], "unless-stopped", "{stage}");
            assert_eq!(
                s["environment"]["FRACTURE__KAFKA__BROKERS"], "kafka:9092",
                "{stage}"
            );
        }
        // The second replica is the first's twin but for its host port.
        let (a, b) = (&services["ensemble"], &services["ensemble-2"]);
        for key in ["image", "command", "environment", "volumes", "restart"] {
            assert_eq!(a[key], b[key], "ensemble and ensemble-2 differ in {key}");
        }
        assert_eq!(
            services["audit"]["environment"]["FRACTURE__AUDIT__DASHBOARD_TOKEN"],
            TOKEN
        );
    }
}
