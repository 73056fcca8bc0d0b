//! The five `fracture serve` processes on a broker, as the end-to-end, chaos and load runs start,
//! kill, restart and stop them; with an in-process OTLP receiver and a reader of the outputs.

use fracture_shared::messages::{DeadLetter, Finding};
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fracture_shared::bus::{Bus, KafkaBus, Record, Topics};

pub const BIN: &str = env!("CARGO_BIN_EXE_fracture");
pub const STAGES: [&str; 5] = ["ingest", "preprocess", "ensemble", "postprocess", "audit"];

/// What goes into the `fracture.toml` of a run.
pub struct RunConfig<'a> {
    pub brokers: &'a str,
    pub prefix: &'a str,
    pub key: &'a Path,
    /// OTLP/HTTP endpoint, or empty.
    pub otlp: &'a str,
    /// `models/<name>/ensemble.toml`.
    pub manifest: &'a Path,
    /// More TOML, appended as it is (sections not written above).
    pub extra: &'a str,
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Writes `dir/fracture.toml` (store, linkage, quarantine and audit database inside `dir`).
pub fn write_config(dir: &Path, c: &RunConfig<'_>) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = dir.join("fracture.toml");
    let text = format!(
        r#"[kafka]
brokers = "{brokers}"
topic_prefix = "{prefix}"
partitions = 3
[store]
url = "{store}"
[ingest]
key_file = "{key}"
linkage = "{linkage}"
site_code = "E2E"
quarantine = "{quarantine}"
[audit]
database = "sqlite://{db}"
dashboard_addr = "127.0.0.1:0"
[telemetry]
metrics_addr = "127.0.0.1:0"
log = "info"
otlp_endpoint = "{otlp}"
[model]
manifest = "{manifest}"
{extra}
"#,
        brokers = c.brokers,
        prefix = c.prefix,
        store = dir.join("store").display(),
        key = c.key.display(),
        linkage = dir.join("linkage.db").display(),
        quarantine = dir.join("quarantine").display(),
        db = dir.join("audit.db").display(),
        otlp = c.otlp,
        manifest = c.manifest.display(),
        extra = c.extra,
    );
    std::fs::write(&cfg, text).unwrap();
    cfg
}

/// [`write_config`] for a run of the null model (`models/null`, the pipeline's own ceiling)
/// without tracing, with `extra` TOML.
pub fn write_null_config(
    dir: &Path,
    brokers: &str,
    prefix: &str,
    key: &Path,
    extra: &str,
) -> PathBuf {
    let manifest = repo().join("models/null/ensemble.toml");
    write_config(
        dir,
        &RunConfig {
            brokers,
            prefix,
            key,
            otlp: "",
            manifest: &manifest,
            extra,
        },
    )
}

/// The stage processes of one run; every one is SIGKILLed when this is dropped, even if the test
/// panics. Each stage logs to `dir/<stage>.log`, appended across restarts.
pub struct Pipeline {
    pub dir: PathBuf,
    pub cfg: PathBuf,
    /// What `serve ingest` back-scans.
    pub inputs: Vec<PathBuf>,
    procs: BTreeMap<String, Child>,
    /// Address-space limits (KiB) per stage, see [`Pipeline::limit_memory`].
    limits: BTreeMap<String, u64>,
    /// Settings per stage as `FRACTURE__SECTION__KEY` variables, see [`Pipeline::setting`].
    env: BTreeMap<String, Vec<(String, String)>>,
    /// Every stage's `--instance` (its transactional id suffix).
    pub instance: String,
}

impl Pipeline {
    pub fn new(dir: &Path, cfg: &Path, inputs: &[PathBuf]) -> Self {
        Self {
            dir: dir.to_path_buf(),
            cfg: cfg.to_path_buf(),
            inputs: inputs.to_vec(),
            procs: BTreeMap::new(),
            limits: BTreeMap::new(),
            env: BTreeMap::new(),
            instance: "run-0".into(),
        }
    }

    /// Starts `stage` from now on with `key` (e.g. `ingest.lane`) set to `value`, over the
    /// configuration file, as a deployment's environment would.
    pub fn setting(&mut self, stage: &str, key: &str, value: &str) {
        let var = format!("FRACTURE__{}", key.to_uppercase().replace('.', "__"));
        self.env
            .entry(stage.to_string())
            .or_default()
            .push((var, value.to_string()));
    }

    /// Starts `stage` from now on with the environment variable `var` set to `value` (e.g. the
    /// `OTEL_*` a platform injects).
    pub fn set_env(&mut self, stage: &str, var: &str, value: &str) {
        self.env
            .entry(stage.to_string())
            .or_default()
            .push((var.to_string(), value.to_string()));
    }

    /// Starts `stage` from now on under an address-space limit of `kib` KiB, as a container's
    /// memory limit would: an input that needs more kills it (an allocation fails and it aborts).
    pub fn limit_memory(&mut self, stage: &str, kib: u64) {
        self.limits.insert(stage.to_string(), kib);
    }

    pub fn start_all(&mut self) {
        // Downstream first, so the first radiographs find their consumers joined.
        for s in STAGES.iter().rev() {
            self.start(s);
        }
    }

    /// Starts `stage` under its stable instance name (its transactional id and static group
    /// member id), as a restarted pod would.
    pub fn start(&mut self, stage: &str) {
        let instance = self.instance.clone();
        self.start_as(stage, stage, &instance);
    }

    /// Starts another replica of `stage`, known here (and by its log, `<name>.log`) as `name`,
    /// with its own `instance`.
    pub fn start_as(&mut self, name: &str, stage: &str, instance: &str) {
        assert!(!self.procs.contains_key(name), "{name} is already running");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))
            .unwrap();
        let mut cmd = match self.limits.get(stage) {
            Some(kib) => {
                let mut c = Command::new("bash");
                c.args(["-c", r#"ulimit -v "$0" && exec "$@""#])
                    .arg(kib.to_string())
                    .arg(BIN)
                    // glibc reserves 64 MiB of address space per thread arena otherwise.
                    .env("MALLOC_ARENA_MAX", "2");
                c
            }
            None => Command::new(BIN),
        };
        cmd.arg("--config")
            .arg(&self.cfg)
            .arg("serve")
            .arg(stage)
            .arg("--instance")
            .arg(instance)
            .stdout(Stdio::null())
            .stderr(log);
        if stage == "ingest" {
            cmd.args(&self.inputs);
        }
        cmd.envs(self.env.get(stage).into_iter().flatten().cloned());
        let child = cmd.spawn().expect("start fracture serve");
        self.procs.insert(name.to_string(), child);
    }

    /// SIGTERM to `name` alone, as a scale-down would send; panics unless it exits cleanly
    /// within 30 s.
    pub fn terminate(&mut self, name: &str) {
        let mut c = self.procs.remove(name).expect("running");
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match c.try_wait() {
                Ok(Some(s)) => {
                    assert!(s.success(), "{name} exited with {s}\n{}", self.log(name));
                    return;
                }
                _ if Instant::now() > deadline => {
                    let _ = c.kill();
                    panic!(
                        "{name} did not stop within 30 s of SIGTERM\n{}",
                        self.log(name)
                    );
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// SIGKILL: no chance to abort the open transaction, flush or leave the group.
    pub fn kill(&mut self, stage: &str) {
        if let Some(mut c) = self.procs.remove(stage) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `signal` (`STOP`, `CONT`, ...) to `stage`'s process.
    pub fn signal(&self, stage: &str, signal: &str) {
        let c = &self.procs[stage];
        let st = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(c.id().to_string())
            .status()
            .expect("kill runs");
        assert!(st.success(), "kill -{signal} {stage}");
    }

    /// The highest resident memory `stage`'s process has had (VmHWM), in KiB.
    pub fn peak_rss_kib(&self, stage: &str) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.procs[stage].id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmHWM in /proc/PID/status")
    }

    /// CPU time (user + system) `stage`'s process has used so far, in seconds.
    pub fn cpu_seconds(&self, stage: &str) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.procs[stage].id())).unwrap();
        // Fields after the command name, which is in parentheses and may hold spaces: utime
        // and stime are the 12th and 13th (proc(5) numbers them 14 and 15).
        let rest = &stat[stat.rfind(')').expect("comm in /proc/PID/stat") + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        ticks as f64 / clock_ticks_per_second()
    }

    pub fn is_running(&mut self, stage: &str) -> bool {
        self.procs
            .get_mut(stage)
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGTERM every stage and wait for clean exits; returns the stages that did not manage.
    pub fn stop(&mut self) -> Vec<String> {
        let mut bad = Vec::new();
        for c in self.procs.values() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
        }
        for (name, c) in &mut self.procs {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match c.try_wait() {
                    Ok(Some(s)) if s.success() => break,
                    Ok(Some(s)) => {
                        bad.push(format!("{name} exited with {s}"));
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(100))
                    }
                    _ => {
                        let _ = c.kill();
                        bad.push(format!("{name} did not stop within 30 s of SIGTERM"));
                        break;
                    }
                }
            }
        }
        self.procs.clear();
        bad
    }

    /// One stage's whole log, across its restarts.
    pub fn log(&self, stage: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{stage}.log"))).unwrap_or_default()
    }

    /// The `host:port` of `stage`'s `/metrics` (in its log: the latest start's), once it has
    /// logged it.
    pub fn metrics_addr(&self, stage: &str) -> Option<String> {
        let log = plain(&self.log(stage));
        log.lines()
            .rev()
            .find(|l| l.contains("metrics and health endpoint"))
            .and_then(|l| l.split("addr=").nth(1))
            .and_then(|a| a.split_whitespace().next())
            .map(str::to_string)
    }

    /// What `stage`'s `/metrics` answers now.
    pub fn metrics(&self, stage: &str) -> String {
        let addr = self
            .metrics_addr(stage)
            .unwrap_or_else(|| panic!("{stage} logged no metrics address"));
        let out = Command::new("curl")
            .args(["-sS", "-f", "--max-time", "10"])
            .arg(format!("http://{addr}/metrics"))
            .output()
            .expect("curl");
        assert!(out.status.success(), "{stage} /metrics: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The end of every stage's log, for a failure message.
    pub fn logs(&self) -> String {
        STAGES
            .iter()
            .map(|s| {
                let text =
                    std::fs::read_to_string(self.dir.join(format!("{s}.log"))).unwrap_or_default();
                // The tail is what explains a failure; whole logs of a long run drown it.
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- {s} (last 40 lines)\n{}", tail.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A log without its terminal colours.
pub fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, then a final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The value of the Prometheus sample `name{labels}` in `metrics` (0 when absent). `labels` as
/// written, e.g. `kind="sr",outcome="stored"` (Prometheus sorts them by name).
pub fn sample(metrics: &str, name: &str, labels: &str) -> f64 {
    let key = format!("{name}{{{labels}}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&key))
        .map(|v| v.trim().parse().expect("a number"))
        .unwrap_or(0.0)
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        for c in self.procs.values_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One span as an OTLP/HTTP exporter posted it.
#[derive(Debug, Clone)]
pub struct Span {
    pub trace_id: String,
    pub name: String,
    pub start_ns: u64,
    pub end_ns: u64,
    /// The attributes, scalar values written out as text.
    pub attributes: Vec<(String, String)>,
}

/// An in-process OTLP/HTTP (protobuf) receiver: keeps every span posted to `/v1/traces`.
pub async fn otlp_receiver() -> (String, Arc<Mutex<Vec<Span>>>) {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use prost::Message;

    let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
    let keep = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let keep = keep.clone();
            async move {
                let request = ExportTraceServiceRequest::decode(body).unwrap_or_default();
                let text = |v: Option<Value>| match v? {
                    Value::StringValue(s) => Some(s),
                    Value::IntValue(i) => Some(i.to_string()),
                    Value::BoolValue(b) => Some(b.to_string()),
                    Value::DoubleValue(d) => Some(d.to_string()),
                    _ => None,
                };
                let mut keep = keep.lock().unwrap();
                for rs in request.resource_spans {
                    for ss in rs.scope_spans {
                        for sp in ss.spans {
                            keep.push(Span {
                                trace_id: hex(&sp.trace_id),
                                name: sp.name,
                                start_ns: sp.start_time_unix_nano,
                                end_ns: sp.end_time_unix_nano,
                                attributes: sp
                                    .attributes
                                    .into_iter()
                                    .filter_map(|a| {
                                        Some((a.key, text(a.value.and_then(|v| v.value))?))
                                    })
                                    .collect(),
                            });
                        }
                    }
                }
                (
                    [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), spans)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads the committed records of `fracture.findings` (both lanes) and `fracture.dead-letter`
/// until at least
/// `want` are there (or `patience` passed), then once more after a pause to catch extras.
pub async fn committed_outputs(
    bus: &KafkaBus,
    topics: &Topics,
    want: usize,
    patience: Duration,
) -> Vec<Record> {
    let mut names = topics.lanes_of::<Finding>();
    names.push(topics.of::<DeadLetter>());
    let deadline = Instant::now() + patience;
    loop {
        match bus.read_committed(&names).await {
            Ok(got) if got.len() >= want || Instant::now() > deadline => break,
            Ok(_) => {}
            Err(e) if Instant::now() > deadline => panic!("cannot read the outputs: {e}"),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    bus.read_committed(&names)
        .await
        .expect("read the outputs once more")
}

/// `getconf CLK_TCK`: the unit of /proc's CPU times (100 on every Linux this runs on).
fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

/// `n` small synthetic phantoms (256 to 320 pixels a side) in `dir`, by the real
/// `fracture phantoms`.
pub fn phantoms(dir: &Path, n: usize, seed: u64) -> Vec<PathBuf> {
    phantoms_sized(dir, n, seed, (256, 320))
}

/// [`phantoms`] with `sides.0` to `sides.1` pixels a side.
pub fn phantoms_sized(dir: &Path, n: usize, seed: u64, sides: (u32, u32)) -> Vec<PathBuf> {
    let out = Command::new(BIN)
        .args([
            "phantoms",
            "--count",
            &n.to_string(),
            "--seed",
            &seed.to_string(),
        ])
        .args(["--min-side", &sides.0.to_string()])
        .args(["--max-side", &sides.1.to_string(), "--out"])
        .arg(dir)
        .output()
        .expect("run fracture phantoms");
    assert!(
        out.status.success(),
        "fracture phantoms failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect();
    files.sort();
    assert_eq!(files.len(), n, "phantoms written");
    files
}

/// The input reference -> source path map the edge's linkage table keeps.
pub async fn linkage(dir: &Path) -> std::collections::HashMap<String, PathBuf> {
    fracture_edge::linkage::read_sources(&dir.join("linkage.db"))
        .await
        .expect("read the linkage table")
        .into_iter()
        .map(|(input, source)| (input, PathBuf::from(source)))
        .collect()
}

/// A loopback port free now (for a door or a peer to listen on).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// POSTs `files` as one STOW-RS request (bearer `token`) to the door on `port` with curl, the
/// body written to `scratch` first; the HTTP status (0 if curl got none).
pub fn stow(port: u16, token: &str, files: &[&Path], scratch: &Path) -> u16 {
    const BOUNDARY: &str = "fracture-test-boundary";
    let mut body = Vec::new();
    for f in files {
        body.extend_from_slice(
            format!("--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(&std::fs::read(f).unwrap());
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    std::fs::write(scratch, body).unwrap();
    let out = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
        .arg("--data-binary")
        .arg(format!("@{}", scratch.display()))
        .arg("-H")
        .arg(format!(
            "Content-Type: multipart/related; type=\"application/dicom\"; boundary={BOUNDARY}"
        ))
        .arg("-H")
        .arg(format!("Authorization: Bearer {token}"))
        .arg(format!("http://127.0.0.1:{port}/studies"))
        .output()
        .expect("curl runs");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}
