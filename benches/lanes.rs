//! The emergency room under a back-scan: live radiographs at a steady trickle through the STOW-RS
//! door while a folder back-scan floods the five `fracture serve` processes (null model, real
//! broker). For each arrangement, in one run: the live radiographs' latency from the start of
//! their ingest to the commit of their finding (p50/p99/max, from the stages' OTLP spans), and
//! the back-scan's throughput. A measurement, not a test: `scripts/bench/lanes.sh` runs it.
//!
//! Arrangements: `idle` (the trickle alone), `one queue` (the back-scan in the live lane, as
//! before there were lanes), `lanes, alternating` and `lanes, live first` (the default).
//!
//! Settings (environment): FRACTURE_LANES_BACKSCAN (default 1500 phantoms),
//! FRACTURE_LANES_LIVE (default 40), FRACTURE_LANES_EVERY_MS (default 400), FRACTURE_LANES_ARMS
//! (comma-separated subset of idle,queue,alternate,priority), FRACTURE_TEST_KAFKA (a broker;
//! otherwise one is started as the tests do).

#[path = "../tests/common/pipeline.rs"]
#[allow(dead_code)]
mod pipeline;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fracture_shared::bus::{KafkaBus, KafkaConfig, Topics};
use fracture_shared::messages::{decode, Finding};
use fracture_shared::testkit;
use pipeline::{Pipeline, RunConfig, Span};

const TOKEN: &str = "lanes-bench-token-0123456789";

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

struct Arm {
    name: &'static str,
    /// The folder back-scan runs beside the trickle.
    backscan: bool,
    /// `ingest.lane` of the folder back-scan.
    lane: &'static str,
    live_first: bool,
}

/// The stages a live radiograph passes before its finding is committed.
const PATH: [&str; 4] = ["ingest", "preprocess", "ensemble", "postprocess"];

struct Outcome {
    live_ms: Vec<f64>,
    /// Per live radiograph: each stage's span and the wait before it (from the previous span's
    /// end), in PATH order: ingest, wait, preprocess, wait, ...
    live_steps: Vec<Vec<f64>>,
    backscan: usize,
    backscan_seconds: f64,
}

struct Setup {
    brokers: String,
    key: PathBuf,
    token: PathBuf,
    archive: PathBuf,
    /// Radiographs in `archive` (it also holds the phantoms' labels.csv).
    archive_n: usize,
    live: Vec<PathBuf>,
    every: Duration,
}

async fn run_arm(arm: &Arm, s: &Setup, work: &Path) -> Outcome {
    let prefix = testkit::unique_prefix("lanes");
    let (otlp, spans) = pipeline::otlp_receiver().await;
    let manifest = pipeline::repo().join("models/null/ensemble.toml");
    let port = pipeline::free_port();
    let extra = format!(
        "[ingest.dicomweb]\nstow_listen = \"127.0.0.1:{port}\"\nstow_token_file = \"{}\"\n\
         [lanes]\nenabled = {}\nlive_first = {}\n",
        s.token.display(),
        arm.lane == "backscan",
        arm.live_first
    );
    let dir = work.join(arm.name.replace([' ', ','], "-"));
    let cfg = pipeline::write_config(
        &dir,
        &RunConfig {
            brokers: &s.brokers,
            prefix: &prefix,
            key: &s.key,
            otlp: &otlp,
            manifest: &manifest,
            extra: &extra,
        },
    );
    let inputs: Vec<PathBuf> = if arm.backscan {
        vec![s.archive.clone()]
    } else {
        vec![]
    };
    let backscan_n = if arm.backscan { s.archive_n } else { 0 };
    let mut p = Pipeline::new(&dir, &cfg, &inputs);
    p.setting("ingest", "ingest.lane", arm.lane);
    for stage in ["audit", "postprocess", "ensemble", "preprocess"] {
        p.start(stage);
    }
    // Consumers joined (two groups per stage), so the measurement is the flow.
    tokio::time::sleep(Duration::from_secs(10)).await;
    p.start("ingest");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "no STOW-RS door\n{}", p.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if arm.backscan {
        // The back-scan's queue builds up before the first live radiograph comes.
        tokio::time::sleep(Duration::from_secs(4)).await;
    }
    let scratch = dir.join("stow-body.bin");
    for f in &s.live {
        let next = Instant::now() + s.every;
        let status = pipeline::stow(port, TOKEN, &[f.as_path()], &scratch);
        assert_eq!(status, 200, "STOW-RS of {}\n{}", f.display(), p.logs());
        tokio::time::sleep_until(next.into()).await;
    }
    let bus = KafkaBus::new(KafkaConfig {
        brokers: s.brokers.clone(),
        ..Default::default()
    });
    let topics = Topics::new(&prefix);
    let want = backscan_n + s.live.len();
    let out = pipeline::committed_outputs(&bus, &topics, want, Duration::from_secs(1200)).await;
    let failures = p.stop();
    assert!(failures.is_empty(), "{failures:?}\n{}", p.logs());
    assert_eq!(out.len(), want, "one output per radiograph\n{}", p.logs());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spans: Vec<Span> = spans.lock().unwrap().clone();
    let mut by_trace: HashMap<&str, HashMap<&str, &Span>> = HashMap::new();
    for sp in &spans {
        by_trace
            .entry(sp.trace_id.as_str())
            .or_default()
            .insert(sp.name.as_str(), sp);
    }
    // Live or back-scan by where the radiograph came from (the linkage table's source).
    let sources = pipeline::linkage(&dir).await;
    let (mut live_ms, mut first, mut last) = (Vec::new(), u64::MAX, 0u64);
    let mut live_steps: Vec<Vec<f64>> = vec![Vec::new(); 2 * PATH.len() - 1];
    for r in out
        .iter()
        .filter(|r| topics.lanes_of::<Finding>().contains(&r.topic))
    {
        let finding: Finding = decode(&r.payload).unwrap();
        let trace = r
            .header("traceparent")
            .and_then(|t| t.split('-').nth(1))
            .expect("findings carry their trace");
        let Some((ingest, post)) = by_trace
            .get(trace)
            .and_then(|t| Some((t.get("ingest")?, t.get("postprocess")?)))
        else {
            panic!("trace {trace} lacks its ingest or postprocess span");
        };
        let from_archive = sources
            .get(&finding.id.input)
            .is_some_and(|src| src.starts_with(&s.archive));
        if from_archive {
            first = first.min(ingest.start_ns);
            last = last.max(post.end_ns);
        } else {
            live_ms.push(post.end_ns.saturating_sub(ingest.start_ns) as f64 / 1e6);
            let t = &by_trace[trace];
            let ms = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1e6;
            for (i, stage) in PATH.iter().enumerate() {
                let Some(sp) = t.get(stage) else { continue };
                live_steps[2 * i].push(ms(sp.start_ns, sp.end_ns));
                if let Some(prev) = i.checked_sub(1).and_then(|j| t.get(PATH[j])) {
                    live_steps[2 * i - 1].push(ms(prev.end_ns, sp.start_ns));
                }
            }
        }
    }
    live_ms.sort_by(f64::total_cmp);
    assert_eq!(live_ms.len(), s.live.len(), "every live radiograph found");
    for v in &mut live_steps {
        v.sort_by(f64::total_cmp);
    }
    Outcome {
        live_ms,
        live_steps,
        backscan: backscan_n,
        backscan_seconds: if last > first {
            (last - first) as f64 / 1e9
        } else {
            0.0
        },
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let backscan = env_or("FRACTURE_LANES_BACKSCAN", 1500);
    let live_n = env_or("FRACTURE_LANES_LIVE", 40);
    let every = Duration::from_millis(env_or("FRACTURE_LANES_EVERY_MS", 400) as u64);
    let chosen = std::env::var("FRACTURE_LANES_ARMS")
        .unwrap_or_else(|_| "idle,queue,alternate,priority".into());
    let keep = tempfile::tempdir().unwrap();
    let work = keep.path();
    let t = Instant::now();
    let archive = work.join("archive");
    let archive_n = pipeline::phantoms(&archive, backscan, 7).len();
    let live = pipeline::phantoms(&work.join("live"), live_n, 8);
    eprintln!(
        "{backscan} + {live_n} phantoms made in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let key = work.join("deid.key");
    std::fs::write(&key, [5u8; 32]).unwrap();
    let token = work.join("stow.token");
    std::fs::write(&token, TOKEN).unwrap();
    let setup = Setup {
        brokers: testkit::kafka_brokers(),
        key,
        token,
        archive,
        archive_n,
        live,
        every,
    };
    let arms = [
        Arm {
            name: "idle",
            backscan: false,
            lane: "backscan",
            live_first: true,
        },
        Arm {
            name: "queue",
            backscan: true,
            lane: "live",
            live_first: true,
        },
        Arm {
            name: "alternate",
            backscan: true,
            lane: "backscan",
            live_first: false,
        },
        Arm {
            name: "priority",
            backscan: true,
            lane: "backscan",
            live_first: true,
        },
    ];
    let mut rows = Vec::new();
    let mut steps = Vec::new();
    for arm in arms
        .iter()
        .filter(|a| chosen.split(',').any(|c| c == a.name))
    {
        eprintln!("arm {} ...", arm.name);
        let o = run_arm(arm, &setup, work).await;
        let row = format!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {} |",
            match arm.name {
                "idle" => "idle pipeline (no back-scan)",
                "queue" => "one queue (back-scan in the live lane)",
                "alternate" => "two lanes, alternating batches",
                _ => "two lanes, live first",
            },
            o.live_ms.len(),
            percentile(&o.live_ms, 0.5),
            percentile(&o.live_ms, 0.99),
            o.live_ms.last().copied().unwrap_or(f64::NAN),
            if o.backscan > 0 {
                format!(
                    "{} in {:.1} s ({:.1}/s)",
                    o.backscan,
                    o.backscan_seconds,
                    o.backscan as f64 / o.backscan_seconds.max(1e-9)
                )
            } else {
                "-".into()
            },
        );
        eprintln!("{row}");
        rows.push(row);
        steps.push(format!(
            "| {} | {} |",
            arm.name,
            o.live_steps
                .iter()
                .map(|v| format!("{:.0}", percentile(v, 0.5)))
                .collect::<Vec<_>>()
                .join(" | ")
        ));
    }
    println!(
        "\nLive radiographs (STOW-RS, one every {} ms) under a folder back-scan of {backscan} \
         phantoms 256-320 px; null model, five `fracture serve` processes, 3 partitions, one \
         broker, 2 cores. Latency: ingest span start to postprocess commit.\n",
        every.as_millis()
    );
    println!("| arrangement | live radiographs | p50 ms | p99 ms | max ms | back-scan |");
    println!("|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    println!("\nWhere a live radiograph's time goes, p50 ms: each stage's span, and the wait from the previous stage's commit to its start (the bus hop and the queue).\n");
    println!("| arrangement | ingest | wait | preprocess | wait | ensemble | wait | postprocess |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in steps {
        println!("{r}");
    }
}
