//! What happens when things break: the five `fracture serve` processes on a real broker while
//! stages are SIGKILLed at random, poison messages arrive, the broker restarts, and the
//! claim-check store goes away for a while. Afterwards a read-committed reader must find every
//! input exactly once (a finding, or a dead letter for an input that deserves one) and the audit
//! database one row per radiograph.
//!
//! Sizes are set for CI; `scripts/chaos.sh` runs the full kill run (1,000 radiographs, 20 kills)
//! through the same test with `FRACTURE_CHAOS_INPUTS` and `FRACTURE_CHAOS_KILLS`.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::pipeline::{self, Pipeline};
use fracture_shared::bus::{Bus, KafkaBus, KafkaConfig, OutRecord, Record, Topics};
use fracture_shared::messages::{decode, DeadLetter, Finding, Preprocessed};
use fracture_shared::testkit;
use rand::{Rng, SeedableRng};

/// The runs take turns: each is five processes, and two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A run's inputs: phantoms that must each give one finding, and broken files that must each
/// give one dead letter.
struct Inputs {
    dir: PathBuf,
    good: Vec<PathBuf>,
    bad: Vec<PathBuf>,
}

fn inputs(dir: &Path, n: usize, seed: u64) -> Inputs {
    let good = pipeline::phantoms(dir, n, seed);
    let bad = vec![
        dir.join("broken/empty.dcm"),
        dir.join("broken/truncated.dcm"),
    ];
    std::fs::create_dir_all(dir.join("broken")).unwrap();
    std::fs::write(&bad[0], b"").unwrap();
    let bytes = std::fs::read(&good[0]).unwrap();
    std::fs::write(&bad[1], &bytes[..bytes.len() / 3]).unwrap();
    Inputs {
        dir: dir.to_path_buf(),
        good,
        bad,
    }
}

/// A run on `brokers` with the null model (the stages' own work, no network in the way).
fn run(work: &Path, brokers: &str, prefix: &str, inputs: &Inputs) -> Pipeline {
    let key = work.join("deid.key");
    std::fs::write(&key, [9u8; 32]).unwrap();
    let dir = work.join("run");
    let cfg = pipeline::write_null_config(&dir, brokers, prefix, &key, "");
    Pipeline::new(&dir, &cfg, std::slice::from_ref(&inputs.dir))
}

/// The exactly-once check: per input, how many findings and dead letters the committed outputs
/// hold. Panics with the counts (and the logs) on any input lost or duplicated.
struct Tally {
    findings: usize,
    dead_letters: usize,
    duplicates: usize,
    lost: usize,
}

async fn tally(p: &Pipeline, inputs: &Inputs, outputs: &[Record], ignore_keys: &str) -> Tally {
    let link = pipeline::linkage(&p.dir).await;
    let mut per_source: BTreeMap<PathBuf, (usize, usize)> = BTreeMap::new();
    let (mut findings, mut dead_letters, mut stray) = (0, 0, Vec::new());
    for r in outputs {
        if r.key.as_deref().is_some_and(|k| k.starts_with(ignore_keys)) {
            continue;
        }
        let input = if !r.topic.ends_with(".dead-letter") {
            findings += 1;
            decode::<Finding>(&r.payload).unwrap().id.input
        } else {
            dead_letters += 1;
            match decode::<DeadLetter>(&r.payload).unwrap() {
                DeadLetter { input: Some(i), .. } => i,
                d => {
                    stray.push(format!("{d:?}"));
                    continue;
                }
            }
        };
        match link.get(&input) {
            Some(src) => {
                let e = per_source.entry(src.clone()).or_default();
                if !r.topic.ends_with(".dead-letter") {
                    e.0 += 1;
                } else {
                    e.1 += 1;
                }
            }
            None => stray.push(format!("output for unknown input {input}")),
        }
    }
    assert!(
        stray.is_empty(),
        "outputs that belong to no input: {stray:#?}"
    );
    let (mut duplicates, mut lost, mut wrong) = (0, 0, Vec::new());
    for (src, want_finding) in inputs
        .good
        .iter()
        .map(|g| (g, true))
        .chain(inputs.bad.iter().map(|b| (b, false)))
    {
        let (f, d) = per_source.get(src).copied().unwrap_or_default();
        let total = f + d;
        if total == 0 {
            lost += 1;
        }
        duplicates += total.saturating_sub(1);
        if total > 0 && (f > 0) != want_finding {
            wrong.push(format!(
                "{}: {f} finding(s), {d} dead letter(s)",
                src.display()
            ));
        }
    }
    let t = Tally {
        findings,
        dead_letters,
        duplicates,
        lost,
    };
    eprintln!(
        "exactly-once check: inputs {} ({} good, {} broken), findings {}, dead letters {}, \
         duplicates {}, lost {}",
        inputs.good.len() + inputs.bad.len(),
        inputs.good.len(),
        inputs.bad.len(),
        t.findings,
        t.dead_letters,
        t.duplicates,
        t.lost
    );
    assert!(
        wrong.is_empty(),
        "inputs with the wrong outcome (a good radiograph dead-lettered means one was lost to \
         the fault): {wrong:#?}\n{}",
        p.logs()
    );
    assert_eq!((t.duplicates, t.lost), (0, 0), "{}", p.logs());
    t
}

/// Waits until the audit database holds `want` findings, and checks it never holds more.
async fn audit_rows(p: &Pipeline, want: i64) -> i64 {
    audit_rows_within(p, want, Duration::from_secs(120)).await
}

async fn audit_rows_within(p: &Pipeline, want: i64, patience: Duration) -> i64 {
    let url = format!("sqlite://{}", p.dir.join("audit.db").display());
    let deadline = Instant::now() + patience;
    loop {
        if let Ok(db) = fracture_audit::AuditDb::open(&url).await {
            let n = db.count().await.unwrap_or(0);
            db.close().await;
            if n >= want || Instant::now() > deadline {
                return n;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn kafka(brokers: &str) -> KafkaBus {
    KafkaBus::new(KafkaConfig {
        brokers: brokers.to_string(),
        ..Default::default()
    })
}

/// Malformed, wrong-schema and oversized messages on every topic a stage consumes.
async fn poison(bus: &KafkaBus, topics: &Topics) -> Vec<(String, String)> {
    bus.create_topics(&topics.all(), 3).await.unwrap();
    let mut records = Vec::new();
    let mut expected = Vec::new();
    let live = [
        "deidentified",
        "preprocessed",
        "scored",
        "findings",
        "labels",
    ]
    .map(|t| topics.name(t));
    for t in &live {
        let short = t
            .strip_prefix(&format!("{}.", topics.prefix))
            .unwrap()
            .to_string();
        for (kind, payload) in [
            ("garbage", b"\x00\x01 not json at all {{{".to_vec()),
            (
                "schema",
                br#"{"schema":"fracture.somethingelse/v9","hello":1}"#.to_vec(),
            ),
            ("oversized", {
                let mut v = br#"{"schema":"x","pad":""#.to_vec();
                v.extend(std::iter::repeat_n(b'a', 300 * 1024));
                v.extend(br#""}"#);
                v
            }),
        ] {
            let key = format!("poison-{short}-{kind}");
            records.push(OutRecord {
                topic: t.clone(),
                key: key.clone(),
                payload,
                headers: vec![],
            });
            expected.push((key, t.clone()));
        }
    }
    let mut p = bus.producer("chaos-poisoner").await.unwrap();
    p.send(records).await.unwrap();
    p.close().await.unwrap();
    expected
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_sigkills_and_poison_lose_and_duplicate_nothing() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let n = env_or("FRACTURE_CHAOS_INPUTS", 60) as usize;
    let kills = env_or("FRACTURE_CHAOS_KILLS", 6);
    let seed = env_or("FRACTURE_CHAOS_SEED", rand::rng().random());
    eprintln!("chaos: {n} radiographs, {kills} kills, seed {seed} (FRACTURE_CHAOS_SEED)");
    let keep = tempfile::tempdir().unwrap();
    let work = keep.path();
    let inputs = inputs(&work.join("inputs"), n, seed % 1000);
    let brokers = testkit::kafka_brokers();
    let prefix = testkit::unique_prefix("chaos");
    let topics = Topics::new(&prefix);
    let bus = kafka(&brokers);
    let poisoned = poison(&bus, &topics).await;

    let mut p = run(work, &brokers, &prefix, &inputs);
    p.start_all();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let mut killed: BTreeMap<&str, u32> = BTreeMap::new();
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..2500))).await;
        let stage = pipeline::STAGES[rng.random_range(0..pipeline::STAGES.len())];
        p.kill(stage);
        *killed.entry(stage).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..800))).await;
        p.start(stage);
    }
    eprintln!(
        "kills done after {:.1} s: {killed:?}",
        started.elapsed().as_secs_f64()
    );

    // The poison put on the findings topics is read back with the outputs, beside the audit's
    // dead letter for it: counted once each, or the wait can end before the audit's letters.
    let poison_on_findings = poisoned
        .iter()
        .filter(|(_, t)| topics.lanes_of::<Finding>().contains(t))
        .count();
    let want = inputs.good.len() + inputs.bad.len() + poisoned.len() + poison_on_findings;
    let out = pipeline::committed_outputs(&bus, &topics, want, Duration::from_secs(600)).await;
    eprintln!(
        "outputs complete {:.1} s after the start",
        started.elapsed().as_secs_f64()
    );

    // Every poison message became exactly one dead letter naming its topic, from the stage that
    // consumes it; the stages kept going (the radiographs below all arrived).
    let mut poison_letters: HashMap<String, Vec<DeadLetter>> = HashMap::new();
    for r in out.iter().filter(|r| r.topic.ends_with(".dead-letter")) {
        if let Some(k) = r.key.as_deref().filter(|k| k.starts_with("poison-")) {
            poison_letters
                .entry(k.to_string())
                .or_default()
                .push(decode(&r.payload).unwrap());
        }
    }
    for (key, topic) in &poisoned {
        let letters = poison_letters.get(key).cloned().unwrap_or_default();
        assert_eq!(letters.len(), 1, "{key}: one dead letter\n{}", p.logs());
        let d = &letters[0];
        assert_eq!(d.origin.as_ref().map(|o| o.topic.as_str()), Some(&**topic));
        if key.ends_with("oversized") {
            assert!(d.reason.contains("over the"), "{key}: {}", d.reason);
        } else {
            assert!(!d.reason.is_empty());
        }
    }

    let t = tally(&p, &inputs, &out, "poison-").await;
    assert_eq!(t.findings, inputs.good.len());
    let rows = audit_rows(&p, inputs.good.len() as i64).await;
    assert_eq!(
        rows,
        inputs.good.len() as i64,
        "one audit row per radiograph"
    );
    let failures = p.stop();
    assert!(failures.is_empty(), "clean SIGTERM exits: {failures:?}");
    eprintln!(
        "kill run: inputs {}, findings {}, dead letters {} (+{} poison), duplicates {}, lost {}, \
         audit rows {rows}, kills {killed:?}",
        inputs.good.len() + inputs.bad.len(),
        t.findings,
        t.dead_letters,
        poisoned.len(),
        t.duplicates,
        t.lost
    );
}

/// Waits until at least `n` findings are committed, so a fault lands mid-run.
async fn until_findings(bus: &KafkaBus, topics: &Topics, n: usize, p: &Pipeline) {
    until_committed(bus, &topics.lanes_of::<Finding>(), n, p).await
}

/// Waits until `n` records are committed on `names` (both lanes of a topic, say).
async fn until_committed(bus: &KafkaBus, names: &[String], n: usize, p: &Pipeline) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let got = bus
            .read_committed(names)
            .await
            .map(|r| r.len())
            .unwrap_or(0);
        if got >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no progress before the fault\n{}",
            p.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn broker_restart(signal: &str) {
    let _turn = ONE_AT_A_TIME.lock().await;
    let keep = tempfile::tempdir().unwrap();
    let work = keep.path();
    let script = pipeline::repo().join("scripts/kafka.sh");
    let kdir = work.join("kafka");
    let start_broker = || {
        let out = Command::new("bash")
            .arg(&script)
            .arg("start")
            .arg(&kdir)
            .arg("--watch-pid")
            .arg(std::process::id().to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap()
            .trim()
            .to_string()
    };
    let brokers = start_broker();
    let inputs = inputs(&work.join("inputs"), 40, 7);
    let prefix = testkit::unique_prefix("restart");
    let topics = Topics::new(&prefix);
    let bus = kafka(&brokers);
    let mut p = run(work, &brokers, &prefix, &inputs);
    p.start_all();
    until_findings(&bus, &topics, 5, &p).await;

    let pid = std::fs::read_to_string(kdir.join("kafka.pid")).unwrap();
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.trim())
        .status()
        .unwrap();
    assert!(status.success());
    // Wait for the broker to be gone, leave it down a while, start it again on the same ports
    // and data.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Command::new("kill")
        .arg("-0")
        .arg(pid.trim())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
    {
        assert!(Instant::now() < deadline, "the broker did not stop");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let again = start_broker();
    assert_eq!(again, brokers, "the broker came back on its address");

    let want = inputs.good.len() + inputs.bad.len();
    // The librdkafka stall of `cluster_run` showed here too (24 of 42 outstanding after 300 s in
    // one CI run, before `send_offsets_bounded`); the patience is under its ten minutes.
    let out = pipeline::committed_outputs(&bus, &topics, want, Duration::from_secs(420)).await;
    for s in pipeline::STAGES {
        assert!(
            p.is_running(s),
            "{s} gave up instead of reconnecting\n{}",
            p.logs()
        );
    }
    let t = tally(&p, &inputs, &out, "\u{0}").await;
    assert_eq!(t.findings, inputs.good.len());
    let rows = audit_rows(&p, inputs.good.len() as i64).await;
    assert_eq!(
        rows,
        inputs.good.len() as i64,
        "one audit row per radiograph"
    );
    let failures = p.stop();
    assert!(failures.is_empty(), "clean SIGTERM exits: {failures:?}");
    let _ = Command::new("bash")
        .arg(&script)
        .arg("stop")
        .arg(&kdir)
        .status();
}

/// Scaling under load: the first preprocess stalls (SIGSTOP) while a back-log builds, second
/// replicas of preprocess, the ensemble and postprocess join (their groups rebalance, on both
/// lanes, and the stalled member's partitions move when its session expires), the stalled one
/// resumes and is scaled down with SIGTERM, as is the first ensemble, and the new postprocess is
/// SIGKILLed; every input ends exactly once, and the new replicas did part of the work.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_added_and_removed_mid_run_lose_and_duplicate_nothing() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let n = env_or("FRACTURE_CHAOS_INPUTS", 60) as usize * 2;
    let keep = tempfile::tempdir().unwrap();
    let work = keep.path();
    let inputs = inputs(&work.join("inputs"), n, 17);
    let brokers = testkit::kafka_brokers();
    let prefix = testkit::unique_prefix("scale");
    let topics = Topics::new(&prefix);
    let bus = kafka(&brokers);
    let mut p = run(work, &brokers, &prefix, &inputs);
    p.start_all();
    // Preprocess is the fastest stage on these small phantoms: stopped once its first batch is
    // out (not at the first findings, by when it had sometimes finished them all, in one CI
    // run), it leaves the new replica most of the work.
    until_committed(&bus, &topics.lanes_of::<Preprocessed>(), 1, &p).await;
    p.signal("preprocess", "STOP");
    for stage in ["preprocess", "ensemble", "postprocess"] {
        p.start_as(&format!("{stage}-2"), stage, "run-2");
    }
    until_findings(&bus, &topics, n / 2, &p).await;
    p.signal("preprocess", "CONT");
    p.terminate("preprocess");
    p.terminate("ensemble");
    p.kill("postprocess-2");
    let want = inputs.good.len() + inputs.bad.len();
    let out = pipeline::committed_outputs(&bus, &topics, want, Duration::from_secs(600)).await;
    let t = tally(&p, &inputs, &out, "none").await;
    assert_eq!(t.findings, inputs.good.len());
    // The second replicas did work (the groups really rebalanced onto them).
    for stage in ["preprocess-2", "ensemble-2"] {
        let processed: f64 = p
            .metrics(stage)
            .lines()
            .filter(|l| l.starts_with("fracture_radiographs_processed_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(processed > 0.0, "{stage} handled nothing\n{}", p.log(stage));
        eprintln!("{stage} handled {processed} radiographs");
    }
    let rows = audit_rows(&p, inputs.good.len() as i64).await;
    assert_eq!(
        rows,
        inputs.good.len() as i64,
        "one audit row per radiograph"
    );
    let failures = p.stop();
    assert!(failures.is_empty(), "clean SIGTERM exits: {failures:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_stopped_mid_run_is_survived() {
    broker_restart("TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_killed_mid_run_is_survived() {
    broker_restart("KILL").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_outage_delays_but_loses_nothing() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let keep = tempfile::tempdir().unwrap();
    let work = keep.path();
    let inputs = inputs(&work.join("inputs"), 40, 11);
    let brokers = testkit::kafka_brokers();
    let prefix = testkit::unique_prefix("outage");
    let topics = Topics::new(&prefix);
    let bus = kafka(&brokers);
    let mut p = run(work, &brokers, &prefix, &inputs);
    // Every stage opens the store at start; preprocess is then paused, so that every radiograph
    // ingest publishes is still ahead of it when the store goes down (a fast pipeline would
    // otherwise finish before the outage begins).
    for s in pipeline::STAGES.iter().rev().filter(|s| **s != "ingest") {
        p.start(s);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while !p.log("preprocess").contains("consuming") {
        assert!(
            Instant::now() < deadline,
            "preprocess never joined\n{}",
            p.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    p.signal("preprocess", "STOP");
    p.start("ingest");
    while !p.log("ingest").contains("ingest finished its inputs") {
        assert!(
            Instant::now() < deadline,
            "ingest never finished\n{}",
            p.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The store's folder replaced by a file: every read and write fails, even as root.
    let store = p.dir.join("store");
    let away = p.dir.join("store.away");
    std::fs::rename(&store, &away).unwrap();
    std::fs::write(&store, b"the claim-check store is down").unwrap();
    p.signal("preprocess", "CONT");
    tokio::time::sleep(Duration::from_secs(8)).await;
    let during_outage = bus
        .read_committed(&topics.lanes_of::<Finding>())
        .await
        .unwrap()
        .len();
    std::fs::remove_file(&store).unwrap();
    std::fs::rename(&away, &store).unwrap();
    eprintln!("findings after 8 s of outage: {during_outage}");
    assert_eq!(during_outage, 0, "nothing gets through without the store");

    let want = inputs.good.len() + inputs.bad.len();
    let out = pipeline::committed_outputs(&bus, &topics, want, Duration::from_secs(300)).await;
    let t = tally(&p, &inputs, &out, "\u{0}").await;
    assert_eq!(t.findings, inputs.good.len());
    assert_eq!(
        t.dead_letters,
        inputs.bad.len(),
        "the outage dead-lettered nothing"
    );
    let retried: Vec<&str> = pipeline::STAGES
        .into_iter()
        .filter(|s| p.log(s).contains("retrying"))
        .collect();
    assert!(
        !retried.is_empty(),
        "stages retried while the store was down\n{}",
        p.logs()
    );
    eprintln!("stages that waited out the outage: {retried:?}");
    let failures = p.stop();
    assert!(failures.is_empty(), "clean SIGTERM exits: {failures:?}");
}

/// An input that kills the stage that opens it: a radiograph of 8,000 x 8,000 pixels (within
/// every cap) read by a pre-process that runs under a 600 MB address-space limit, the way a pod
/// is OOM-killed. The test restarts the stage each time it dies, as Kubernetes would. The
/// crash-loop breaker charges the crashes to the input that was in flight, handles that batch one
/// record at a time, and after the third crash dead-letters the big radiograph unopened; every
/// phantom beside it arrives exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_input_that_kills_a_stage_is_set_aside_after_three_crashes() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let keep = tempfile::tempdir().unwrap();
    let work = keep.path();
    let dir = work.join("inputs");
    let good = pipeline::phantoms(&dir, 12, 41);
    let big_dir = dir.join("big");
    let out = Command::new(pipeline::BIN)
        .args(["phantoms", "--count", "1", "--seed", "42"])
        .args(["--min-side", "8000", "--max-side", "8000", "--out"])
        .arg(&big_dir)
        .output()
        .expect("run fracture phantoms");
    assert!(out.status.success(), "{out:?}");
    let inputs = Inputs {
        dir: dir.clone(),
        good,
        bad: vec![big_dir.join("phantom-00001.dcm")],
    };
    let brokers = testkit::kafka_brokers();
    let prefix = testkit::unique_prefix("crashloop");
    let topics = Topics::new(&prefix);
    let bus = kafka(&brokers);

    let mut p = run(work, &brokers, &prefix, &inputs);
    p.limit_memory("preprocess", 600 * 1024);
    p.start_all();
    let want = inputs.good.len() + inputs.bad.len();
    let mut names = topics.lanes_of::<Finding>();
    names.push(topics.of::<DeadLetter>());
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut crashes = 0;
    loop {
        if !p.is_running("preprocess") {
            crashes += 1;
            assert!(crashes <= 5, "preprocess keeps dying\n{}", p.logs());
            p.kill("preprocess");
            p.start("preprocess");
        }
        let got = bus.read_committed(&names).await.map(|r| r.len());
        if got.is_ok_and(|n| n >= want) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "outputs incomplete\n{}",
            p.logs()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let out = pipeline::committed_outputs(&bus, &topics, want, Duration::from_secs(10)).await;
    let t = tally(&p, &inputs, &out, "none").await;
    assert_eq!(t.findings, inputs.good.len());
    let letters: Vec<DeadLetter> = out
        .iter()
        .filter(|r| r.topic.ends_with(".dead-letter"))
        .map(|r| decode(&r.payload).unwrap())
        .collect();
    assert_eq!(letters.len(), 1, "{letters:#?}");
    assert_eq!(letters[0].stage, "preprocess");
    assert!(
        letters[0].reason.contains("died 3 times"),
        "{}",
        letters[0].reason
    );
    assert_eq!(
        crashes, 3,
        "the input was set aside at the limit, not before or after"
    );
    let log = pipeline::plain(&p.log("preprocess"));
    assert!(
        log.contains("memory allocation") && log.contains("an earlier process died"),
        "the crashes were out-of-memory aborts, seen by the next process\n{log}"
    );
    let failures = p.stop();
    assert!(failures.is_empty(), "clean SIGTERM exits: {failures:?}");
    eprintln!(
        "crash loop: {} phantoms found, the big radiograph dead-lettered after {crashes} \
         crashes of preprocess",
        t.findings
    );
}

/// A three-node KRaft cluster on loopback (`scripts/kafka.sh cluster-start`): replication factor
/// 3 and `min.insync.replicas` 2 for the pipeline's topics and Kafka's own. Stopped when dropped.
struct Cluster {
    dir: PathBuf,
    brokers: String,
}

impl Cluster {
    fn start(dir: &Path) -> Self {
        let mut c = Self {
            dir: dir.to_path_buf(),
            brokers: String::new(),
        };
        c.brokers = c.run(&[
            "cluster-start",
            "--watch-pid",
            &std::process::id().to_string(),
        ]);
        c
    }

    /// `scripts/kafka.sh CMD DIR ARGS...`; its last line of output.
    fn run(&self, args: &[&str]) -> String {
        self.try_run(args)
            .unwrap_or_else(|e| panic!("kafka.sh {args:?}: {e}"))
    }

    /// [`Cluster::run`], or what it said when it failed.
    fn try_run(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("bash")
            .arg(pipeline::repo().join("scripts/kafka.sh"))
            .arg(args[0])
            .arg(&self.dir)
            .args(&args[1..])
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_string())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(pipeline::repo().join("scripts/kafka.sh"))
            .arg("cluster-stop")
            .arg(&self.dir)
            .status();
    }
}

/// The five stages on the cluster with `n` phantoms; `fault` runs once a fifth of them are
/// through. Then every input must be exactly one finding or dead letter, with one audit row per
/// radiograph, and every stage still running.
async fn cluster_run(name: &str, fault: impl FnOnce(&Cluster, &Topics)) {
    let _turn = ONE_AT_A_TIME.lock().await;
    let n = env_or("FRACTURE_CLUSTER_INPUTS", 150) as usize;
    let keep = tempfile::tempdir().unwrap();
    let work = keep.path();
    let started = Instant::now();
    let cluster = Cluster::start(&work.join("kafka"));
    eprintln!(
        "{name}: cluster {} ready in {:.1} s",
        cluster.brokers,
        started.elapsed().as_secs_f64()
    );
    let inputs = inputs(&work.join("inputs"), n, 23);
    let prefix = testkit::unique_prefix(name);
    let topics = Topics::new(&prefix);
    let bus = KafkaBus::new(KafkaConfig {
        brokers: cluster.brokers.clone(),
        replication: 3,
        ..Default::default()
    });
    bus.create_topics(&topics.all(), 3).await.unwrap();
    let mut p = run(work, &cluster.brokers, &prefix, &inputs);
    let cfg = std::fs::read_to_string(&p.cfg).unwrap();
    std::fs::write(
        &p.cfg,
        cfg.replacen("partitions = 3\n", "partitions = 3\nreplication = 3\n", 1),
    )
    .unwrap();
    p.start_all();
    let run_started = Instant::now();
    until_findings(&bus, &topics, n / 5, &p).await;
    let fault_at = run_started.elapsed();
    fault(&cluster, &topics);
    let want = inputs.good.len() + inputs.bad.len();
    // After the node holding a consumer group's coordinator dies, librdkafka can block a
    // stage's send_offsets_to_transaction past its timeout (librdkafka issues 5456, 5511); the
    // stage gives the call up after 70 s and starts over with new clients (see
    // `send_offsets_bounded`). Before that, the stage sat idle for about ten minutes in one
    // run in three. The patience here is well under those ten minutes, so the old stall fails.
    let out = pipeline::committed_outputs(&bus, &topics, want, Duration::from_secs(420)).await;
    let done = run_started.elapsed();
    for s in pipeline::STAGES {
        assert!(p.is_running(s), "{s} gave up\n{}", p.logs());
    }
    let t = tally(&p, &inputs, &out, "\u{0}").await;
    assert_eq!(t.findings, inputs.good.len());
    let rows = audit_rows_within(&p, inputs.good.len() as i64, Duration::from_secs(420)).await;
    eprintln!(
        "{name}: audit rows complete {:.1} s after the start",
        run_started.elapsed().as_secs_f64()
    );
    assert_eq!(
        rows,
        inputs.good.len() as i64,
        "one audit row per radiograph"
    );
    let failures = p.stop();
    assert!(failures.is_empty(), "clean SIGTERM exits: {failures:?}");
    eprintln!(
        "{name}: {} inputs exactly once through the fault at {:.1} s, all out at {:.1} s",
        want,
        fault_at.as_secs_f64(),
        done.as_secs_f64()
    );
}

/// SIGKILL of the node leading partition 0 of the ensemble's input (a broker and a controller
/// at once) mid-run: its partitions move to the other two, transactions in flight abort and are
/// redone, and nothing is lost or duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_leader_killed_mid_run_loses_and_duplicates_nothing() {
    cluster_run("leaderkill", |cluster, topics| {
        let topic = topics.name("preprocessed");
        let leader = cluster.run(&["leader", &topic, "0"]);
        let killed = Instant::now();
        cluster.run(&["node-kill", &leader]);
        eprintln!("killed node {leader}, the leader of {topic}-0");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let now = cluster
                .try_run(&["leader", &topic, "0"])
                .unwrap_or_default();
            if !now.is_empty() && now != leader {
                eprintln!(
                    "node {now} leads {topic}-0 {:.1} s after the kill",
                    killed.elapsed().as_secs_f64()
                );
                break;
            }
            assert!(Instant::now() < deadline, "no new leader");
            std::thread::sleep(Duration::from_millis(500));
        }
    })
    .await;
}

/// A rolling restart of all three nodes mid-run (each stopped, restarted and back in sync
/// before the next), as an operator upgrading the cluster would do it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_of_the_cluster_loses_and_duplicates_nothing() {
    cluster_run("roll", |cluster, _| {
        let started = Instant::now();
        cluster.run(&["cluster-roll"]);
        eprintln!(
            "rolling restart took {:.1} s",
            started.elapsed().as_secs_f64()
        );
    })
    .await;
}

/// The disk of the node leading partition 0 of the ensemble's input stops taking writes mid-run
/// (`kafka.sh node-disk-fail`: every write that would grow a file fails, as on a full disk).
/// Kafka halts a node whose only log dir fails; its partitions move to the other two. After a
/// while the disk is back (the node restarts on the data it had, recovering whatever it was
/// writing when the disk failed) and catches up; nothing is lost or duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_whose_disk_fails_mid_run_loses_and_duplicates_nothing() {
    cluster_run("diskfail", |cluster, topics| {
        let topic = topics.name("preprocessed");
        let leader = cluster.run(&["leader", &topic, "0"]);
        let halted = cluster.run(&["node-disk-fail", &leader]);
        eprintln!("node {leader}'s disk failed; it halted within {halted} s");
        std::thread::sleep(Duration::from_secs(20));
        cluster.run(&["node-start", &leader]);
        let started = Instant::now();
        cluster.run(&["in-sync", "--timeout", "300"]);
        eprintln!(
            "node {leader} back and every partition in sync {:.1} s after its restart",
            started.elapsed().as_secs_f64()
        );
    })
    .await;
}
