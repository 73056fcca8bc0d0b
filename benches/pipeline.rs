//! The pipeline's own ceiling: the five `fracture serve` processes on a real broker with the null
//! model (no network in the way), fed a back-scan of small phantoms. Reports radiographs/s end
//! to end and per stage, and each stage's added latency (p50/p99), from the spans the stages
//! export over OTLP. A measurement, not a test: `scripts/load.sh` runs it.
//!
//! Also each stage's cost per radiograph, the inputs of the capacity plan (docs/capacity.md):
//! CPU seconds (from /proc), claim-check bytes written and read (`fracture_store_bytes_total`)
//! and the bytes it publishes to the bus (its committed records, key, headers and payload).
//!
//! Settings (environment): FRACTURE_LOAD_INPUTS (default 500), FRACTURE_LOAD_SIDES (phantom
//! sides in pixels, default 256-320), FRACTURE_LOAD_MODEL (`null`, default, or `demo`),
//! FRACTURE_LOAD_INPUT_SIZE (the null model's network input side, default 1024 as the paper's),
//! FRACTURE_TEST_KAFKA (a broker; otherwise one is started as the tests do).

#[path = "../tests/common/pipeline.rs"]
#[allow(dead_code)]
mod pipeline;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use fracture_shared::bus::{Bus, KafkaBus, KafkaConfig, Topics};
use fracture_shared::messages::{Deidentified, Finding, Preprocessed, Scored};
use fracture_shared::testkit;
use pipeline::{Pipeline, RunConfig, Span};

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

/// Total time covered by a set of intervals (a stage's batches overlap when it has replicas or
/// spans of one batch share an interval).
fn busy_ns(mut iv: Vec<(u64, u64)>) -> u64 {
    iv.sort();
    let (mut total, mut cur) = (0u64, None::<(u64, u64)>);
    for (s, e) in iv {
        cur = match cur {
            Some((cs, ce)) if s <= ce => Some((cs, ce.max(e))),
            Some((cs, ce)) => {
                total += ce - cs;
                Some((s, e))
            }
            None => Some((s, e)),
        };
    }
    total + cur.map_or(0, |(s, e)| e - s)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let n: usize = std::env::var("FRACTURE_LOAD_INPUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let sides = std::env::var("FRACTURE_LOAD_SIDES").unwrap_or_else(|_| "256-320".into());
    let sides: (u32, u32) = sides
        .split_once('-')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        .expect("FRACTURE_LOAD_SIDES is MIN-MAX, e.g. 256-320");
    let model = std::env::var("FRACTURE_LOAD_MODEL").unwrap_or_else(|_| "null".into());
    let keep = tempfile::tempdir().unwrap();
    let work = keep.path();
    let inputs = work.join("inputs");
    let t = Instant::now();
    let files = pipeline::phantoms_sized(&inputs, n, 5, sides);
    let bytes: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    eprintln!(
        "{n} phantoms ({:.1} MB) made in {:.1} s",
        bytes as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    let key = work.join("deid.key");
    std::fs::write(&key, [3u8; 32]).unwrap();
    let brokers = testkit::kafka_brokers();
    let prefix = testkit::unique_prefix("load");
    let (otlp, spans) = pipeline::otlp_receiver().await;
    let manifest = match model.as_str() {
        // The null model at the paper's input size unless told otherwise: its cost is the
        // pipeline's own, at the tensor sizes a real ensemble gets.
        "null" => {
            let side = std::env::var("FRACTURE_LOAD_INPUT_SIZE").unwrap_or_else(|_| "1024".into());
            let text = std::fs::read_to_string(pipeline::repo().join("models/null/ensemble.toml"))
                .unwrap();
            let path = work.join("null-ensemble.toml");
            std::fs::write(
                &path,
                text.replace("input_size = 256", &format!("input_size = {side}")),
            )
            .unwrap();
            path
        }
        other => pipeline::repo().join(format!("models/{other}/ensemble.toml")),
    };
    let input_size = std::fs::read_to_string(&manifest)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("input_size = ").map(str::to_string))
        .unwrap_or_default();
    let dir = work.join("run");
    // FRACTURE_LOAD_DICOM_OUTPUTS=0: no SR and Secondary Capture per radiograph, the bare
    // metadata and claim-check traffic.
    let dicom_outputs = std::env::var("FRACTURE_LOAD_DICOM_OUTPUTS").map_or(true, |v| v != "0");
    let extra = format!(
        "[preprocess.batch]\nmax = 32\n[ensemble.batch]\nmax = 32\n[postprocess]\n\
         dicom_outputs = {dicom_outputs}\n[postprocess.batch]\nmax = 64\n"
    );
    eprintln!("SR and SC outputs: {dicom_outputs}");
    let cfg = pipeline::write_config(
        &dir,
        &RunConfig {
            brokers: &brokers,
            prefix: &prefix,
            key: &key,
            otlp: &otlp,
            manifest: &manifest,
            extra: &extra,
        },
    );
    let mut p = Pipeline::new(&dir, &cfg, std::slice::from_ref(&inputs));
    // Consumers first, and joined, so the measurement is the flow and not the group joins.
    for s in ["audit", "postprocess", "ensemble", "preprocess"] {
        p.start(s);
    }
    tokio::time::sleep(Duration::from_secs(8)).await;
    let cpu_before: BTreeMap<&str, f64> = ["audit", "postprocess", "ensemble", "preprocess"]
        .into_iter()
        .map(|s| (s, p.cpu_seconds(s)))
        .collect();
    p.start("ingest");
    let bus = KafkaBus::new(KafkaConfig {
        brokers: brokers.clone(),
        ..Default::default()
    });
    let out =
        pipeline::committed_outputs(&bus, &Topics::new(&prefix), n, Duration::from_secs(900)).await;
    assert_eq!(out.len(), n, "every phantom gave one output\n{}", p.logs());
    // Costs before the stop: CPU since the consumers joined (ingest's whole life), the store's
    // counters, and what each stage published.
    let topics = Topics::new(&prefix);
    let published = [
        topics.of::<Deidentified>(),
        topics.of::<Preprocessed>(),
        topics.of::<Scored>(),
        topics.of::<Finding>(),
    ];
    let mut costs = Vec::new();
    for (i, stage) in pipeline::STAGES.iter().enumerate() {
        let cpu = p.cpu_seconds(stage) - cpu_before.get(stage).copied().unwrap_or(0.0);
        let m = p.metrics(stage);
        let put = pipeline::sample(&m, "fracture_store_bytes_total", "op=\"put\"");
        let get = pipeline::sample(&m, "fracture_store_bytes_total", "op=\"get\"");
        let bus_bytes: usize = match published.get(i) {
            Some(t) => bus
                .read_committed(std::slice::from_ref(t))
                .await
                .expect("read what the stage published")
                .iter()
                .map(|r| {
                    r.payload.len()
                        + r.key.as_ref().map_or(0, String::len)
                        + r.headers
                            .iter()
                            .map(|(k, v)| k.len() + v.len())
                            .sum::<usize>()
                })
                .sum(),
            None => 0,
        };
        costs.push((*stage, cpu, put, get, bus_bytes));
    }
    let failures = p.stop();
    assert!(failures.is_empty(), "{failures:?}\n{}", p.logs());
    // The stages export on exit; give the receiver a moment.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spans: Vec<Span> = spans.lock().unwrap().clone();

    let mut by_stage: BTreeMap<String, Vec<&Span>> = BTreeMap::new();
    let mut by_trace: HashMap<&str, HashMap<&str, &Span>> = HashMap::new();
    for s in &spans {
        by_stage.entry(s.name.clone()).or_default().push(s);
        by_trace
            .entry(s.trace_id.as_str())
            .or_default()
            .insert(s.name.as_str(), s);
    }
    let first = spans.iter().map(|s| s.start_ns).min().unwrap_or(0);
    let last = spans.iter().map(|s| s.end_ns).max().unwrap_or(0);
    let wall = (last - first) as f64 / 1e9;
    println!("\nPipeline ceiling, {model} model at {input_size} px, {n} phantoms {}-{} px ({:.1} MB), 2 cores, one process per stage, 3 partitions, SR+SC outputs {dicom_outputs}", sides.0, sides.1, bytes as f64 / 1e6);
    println!(
        "end to end: {:.1} radiographs/s ({n} in {wall:.2} s, first ingest span to last audit span)",
        n as f64 / wall
    );
    println!(
        "\n| stage | spans | busy s | radiographs/s while busy | batch time p50 ms | p99 ms | wait before it p50 ms | p99 ms |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let order = pipeline::STAGES;
    for (i, stage) in order.iter().enumerate() {
        let Some(ss) = by_stage.get(*stage) else {
            println!("| {stage} | 0 | | | | | | |");
            continue;
        };
        let busy = busy_ns(ss.iter().map(|s| (s.start_ns, s.end_ns)).collect()) as f64 / 1e9;
        let mut durs: Vec<f64> = ss
            .iter()
            .map(|s| (s.end_ns - s.start_ns) as f64 / 1e6)
            .collect();
        durs.sort_by(f64::total_cmp);
        // The hop: from the previous stage's commit (its span end) to this stage's start.
        let mut waits: Vec<f64> = Vec::new();
        if i > 0 {
            for t in by_trace.values() {
                if let (Some(prev), Some(this)) = (t.get(order[i - 1]), t.get(stage)) {
                    waits.push(this.start_ns.saturating_sub(prev.end_ns) as f64 / 1e6);
                }
            }
        }
        waits.sort_by(f64::total_cmp);
        println!(
            "| {stage} | {} | {busy:.2} | {:.0} | {:.1} | {:.1} | {} | {} |",
            ss.len(),
            ss.len() as f64 / busy.max(1e-9),
            percentile(&durs, 0.5),
            percentile(&durs, 0.99),
            if waits.is_empty() {
                "-".into()
            } else {
                format!("{:.1}", percentile(&waits, 0.5))
            },
            if waits.is_empty() {
                "-".into()
            } else {
                format!("{:.1}", percentile(&waits, 0.99))
            },
        );
    }
    let mut e2e: Vec<f64> = by_trace
        .values()
        .filter_map(|t| Some((t.get("audit")?.end_ns - t.get("ingest")?.start_ns) as f64 / 1e6))
        .collect();
    e2e.sort_by(f64::total_cmp);
    println!(
        "\nper radiograph, ingest start to audit commit (a back-scan: all queued at once): p50 {:.0} ms, p99 {:.0} ms over {} traces",
        percentile(&e2e, 0.5),
        percentile(&e2e, 0.99),
        e2e.len()
    );
    println!(
        "\nCost per radiograph ({} build): CPU seconds, claim-check KB written and read, KB published to the bus",
        if cfg!(debug_assertions) { "dev" } else { "release" }
    );
    println!("\n| stage | CPU ms | store written KB | store read KB | bus KB published |");
    println!("|---|---|---|---|---|");
    let per = |v: f64| v / n as f64;
    for (stage, cpu, put, get, bus_bytes) in &costs {
        println!(
            "| {stage} | {:.1} | {:.1} | {:.1} | {:.2} |",
            per(*cpu) * 1e3,
            per(*put) / 1e3,
            per(*get) / 1e3,
            per(*bus_bytes as f64) / 1e3
        );
    }
    let total_cpu: f64 = costs.iter().map(|c| c.1).sum();
    println!(
        "| all | {:.1} | {:.1} | {:.1} | {:.2} |",
        per(total_cpu) * 1e3,
        per(costs.iter().map(|c| c.2).sum()) / 1e3,
        per(costs.iter().map(|c| c.3).sum()) / 1e3,
        per(costs.iter().map(|c| c.4 as f64).sum()) / 1e3
    );
}
