//! The bus conformance suite: the same tests, unchanged, on the in-process bus and on a real
//! Kafka broker. A stage may rely on exactly what these assert.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fracture_shared::bus::{
    Bus, InProcBus, KafkaBus, KafkaConfig, Lane, LaneConfig, LanedProducer, OutRecord, Producer,
    Record, StageIo, Topics,
};
use fracture_shared::error::{RetryPolicy, StageError};
use fracture_shared::messages::{decode, DeadLetter, Deidentified, ErrorKind, Preprocessed};
use fracture_shared::metrics::Health;
use fracture_shared::metrics::StageMetrics;
use fracture_shared::stage::{BatchConfig, Handler, Output, Shutdown, StageEnv, StageRunner};
use fracture_shared::store::BlobStore;
use fracture_shared::testkit;

fn out(topic: &str, key: &str, payload: &str) -> OutRecord {
    OutRecord {
        topic: topic.into(),
        key: key.into(),
        payload: payload.as_bytes().to_vec(),
        headers: vec![],
    }
}

/// Reads everything committed on `topics` until `want` records arrived or 90 s passed.
async fn drain(bus: &dyn Bus, group: &str, topics: &[String], want: usize) -> Vec<Record> {
    let mut io = bus
        .consumer(group, topics, &format!("{group}-reader"))
        .await
        .unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while got.len() < want && Instant::now() < deadline {
        let b = io
            .poll_batch(500, Duration::from_millis(20), Duration::from_millis(300))
            .await
            .unwrap();
        got.extend(b);
        io.commit(vec![]).await.unwrap();
    }
    // Anything beyond `want` is a duplicate or a stray: look a little longer for it.
    let b = io
        .poll_batch(500, Duration::from_millis(20), Duration::from_millis(1500))
        .await
        .unwrap();
    got.extend(b);
    io.commit(vec![]).await.unwrap();
    io.close().await.unwrap();
    got
}

async fn poll_until(io: &mut dyn StageIo, at_least: usize, max: usize) -> Vec<Record> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while got.len() < at_least && Instant::now() < deadline {
        let b = io
            .poll_batch(
                max - got.len(),
                Duration::from_millis(20),
                Duration::from_millis(300),
            )
            .await
            .unwrap();
        got.extend(b);
    }
    got
}

async fn order_per_key_and_nothing_lost(bus: &dyn Bus, t: &Topics) {
    let input = t.name("in");
    bus.create_topics(std::slice::from_ref(&input), 3)
        .await
        .unwrap();
    let mut p = bus.producer(&format!("{}-src", t.prefix)).await.unwrap();
    for chunk in 0..4 {
        let batch = (0..50)
            .map(|i| {
                let n = chunk * 50 + i;
                out(
                    &input,
                    &format!("study-{}", n % 7),
                    &format!("{}:{n}", n % 7),
                )
            })
            .collect();
        p.send(batch).await.unwrap();
    }
    p.close().await.unwrap();
    let got = drain(bus, "g-order", &[input], 200).await;
    assert_eq!(got.len(), 200, "every record exactly once");
    let mut per_key: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for r in &got {
        let s = String::from_utf8(r.payload.clone()).unwrap();
        let (k, n) = s.split_once(':').unwrap();
        assert_eq!(r.key.as_deref(), Some(format!("study-{k}").as_str()));
        per_key
            .entry(k.to_string())
            .or_default()
            .push(n.parse().unwrap());
    }
    for (k, ns) in per_key {
        let mut sorted = ns.clone();
        sorted.sort();
        assert_eq!(ns, sorted, "order kept for key {k}");
    }
}

async fn no_duplicates_across_a_consumer_restart(bus: &dyn Bus, t: &Topics) {
    let (input, output) = (t.name("in2"), t.name("out2"));
    bus.create_topics(&[input.clone(), output.clone()], 2)
        .await
        .unwrap();
    let mut p = bus.producer(&format!("{}-src2", t.prefix)).await.unwrap();
    p.send(
        (0..40)
            .map(|i| out(&input, &format!("k{i}"), &i.to_string()))
            .collect(),
    )
    .await
    .unwrap();
    p.close().await.unwrap();

    // First life: commit a transformed first batch, then poll more and "crash" before commit.
    let mut io = bus
        .consumer("g-restart", std::slice::from_ref(&input), "stage-0")
        .await
        .unwrap();
    let first = poll_until(io.as_mut(), 10, 10).await;
    assert_eq!(first.len(), 10);
    io.commit(
        first
            .iter()
            .map(|r| {
                out(
                    &output,
                    r.key.as_deref().unwrap(),
                    &format!("done {}", String::from_utf8_lossy(&r.payload)),
                )
            })
            .collect(),
    )
    .await
    .unwrap();
    let lost = poll_until(io.as_mut(), 5, 5).await;
    assert_eq!(lost.len(), 5);
    drop(io);

    // Second life, same replica identity: it must see the 30 uncommitted records, no others.
    let mut io = bus
        .consumer("g-restart", std::slice::from_ref(&input), "stage-0")
        .await
        .unwrap();
    let rest = poll_until(io.as_mut(), 30, 100).await;
    let rest_payloads: Vec<String> = rest
        .iter()
        .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
        .collect();
    for r in &first {
        assert!(
            !rest_payloads.contains(&String::from_utf8_lossy(&r.payload).into_owned()),
            "a committed record came again"
        );
    }
    io.commit(
        rest.iter()
            .map(|r| {
                out(
                    &output,
                    r.key.as_deref().unwrap(),
                    &format!("done {}", String::from_utf8_lossy(&r.payload)),
                )
            })
            .collect(),
    )
    .await
    .unwrap();
    io.close().await.unwrap();

    let outs = drain(bus, "g-restart-check", &[output], 40).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for r in &outs {
        *counts
            .entry(String::from_utf8_lossy(&r.payload).into_owned())
            .or_default() += 1;
    }
    assert_eq!(counts.len(), 40, "every input has its output");
    assert!(
        counts.values().all(|&c| c == 1),
        "no output twice: {counts:?}"
    );
}

async fn rewind_redelivers_uncommitted(bus: &dyn Bus, t: &Topics) {
    let input = t.name("in3");
    bus.create_topics(std::slice::from_ref(&input), 1)
        .await
        .unwrap();
    let mut p = bus.producer(&format!("{}-src3", t.prefix)).await.unwrap();
    p.send((0..5).map(|i| out(&input, "k", &i.to_string())).collect())
        .await
        .unwrap();
    p.close().await.unwrap();
    let mut io = bus
        .consumer("g-rewind", std::slice::from_ref(&input), "stage-r")
        .await
        .unwrap();
    let a = poll_until(io.as_mut(), 5, 5).await;
    io.rewind().await.unwrap();
    let b = poll_until(io.as_mut(), 5, 5).await;
    let payloads = |v: &[Record]| v.iter().map(|r| r.payload.clone()).collect::<Vec<_>>();
    assert_eq!(payloads(&a), payloads(&b));
    io.close().await.unwrap();
}

async fn a_cancelled_poll_loses_nothing(bus: &dyn Bus, t: &Topics) {
    let input = t.name("in5");
    bus.create_topics(std::slice::from_ref(&input), 1)
        .await
        .unwrap();
    let mut p = bus.producer(&format!("{}-src5", t.prefix)).await.unwrap();
    p.send(vec![out(&input, "k", "warm-up")]).await.unwrap();
    let mut io = bus
        .consumer("g-cancel", std::slice::from_ref(&input), "stage-c")
        .await
        .unwrap();
    assert_eq!(poll_until(io.as_mut(), 1, 1).await.len(), 1);
    io.commit(vec![]).await.unwrap();
    p.send((0..6).map(|i| out(&input, "k", &i.to_string())).collect())
        .await
        .unwrap();
    p.close().await.unwrap();
    // Records arrive, then the poll lingers for more and is dropped mid-way (a select! elsewhere).
    let cancelled = tokio::time::timeout(
        Duration::from_millis(1500),
        io.poll_batch(100, Duration::from_secs(5), Duration::from_secs(10)),
    )
    .await;
    assert!(
        cancelled.is_err(),
        "the poll should still be lingering when dropped"
    );
    let got = poll_until(io.as_mut(), 6, 100).await;
    let payloads: Vec<String> = got
        .iter()
        .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
        .collect();
    assert_eq!(
        payloads,
        ["0", "1", "2", "3", "4", "5"],
        "nothing lost, nothing twice"
    );
    io.close().await.unwrap();
}

/// Fails records whose payload says "bad", passes the others through.
struct Picky {
    output: String,
}

#[async_trait]
impl Handler for Picky {
    async fn handle(&self, batch: &[Record]) -> Vec<Result<Vec<Output>, StageError>> {
        batch
            .iter()
            .map(|r| {
                if r.payload.starts_with(b"bad") {
                    Err(StageError::data(format!(
                        "record is bad: {}",
                        String::from_utf8_lossy(&r.payload)
                    )))
                } else {
                    Ok(vec![Output {
                        topic: self.output.clone(),
                        key: r.key.clone().unwrap_or_default(),
                        payload: r.payload.clone(),
                    }])
                }
            })
            .collect()
    }
}

async fn dead_letters_land_with_their_reason(bus: Arc<dyn Bus>, t: &Topics) {
    let (input, output, dlq) = (t.name("in4"), t.name("out4"), t.name("dead-letter"));
    bus.create_topics(&[input.clone(), output.clone(), dlq.clone()], 2)
        .await
        .unwrap();
    let mut p = bus.producer(&format!("{}-src4", t.prefix)).await.unwrap();
    p.send(
        (0..20)
            .map(|i| {
                out(
                    &input,
                    &format!("k{i}"),
                    &format!("{}{i}", if i % 5 == 0 { "bad" } else { "good" }),
                )
            })
            .collect(),
    )
    .await
    .unwrap();
    p.close().await.unwrap();

    let (stop, shutdown) = Shutdown::new();
    let runner = StageRunner {
        stage: "picky",
        topics: t.clone(),
        metrics: StageMetrics::new(),
        retry: RetryPolicy::default(),
        batch: BatchConfig {
            max: 4,
            linger_ms: 5,
        },
        crash_ledger: None,
    };
    let b = bus.clone();
    let (inp, outp) = (input.clone(), output.clone());
    let task = tokio::spawn(async move {
        let mut io = b.consumer("g-picky", &[inp], "picky-0").await.unwrap();
        runner
            .run(io.as_mut(), &Picky { output: outp }, shutdown)
            .await
            .unwrap();
        io.close().await.unwrap();
    });
    let goods = drain(bus.as_ref(), "g-picky-out", &[output], 16).await;
    let dead = drain(bus.as_ref(), "g-picky-dlq", &[dlq], 4).await;
    stop.send(true).unwrap();
    task.await.unwrap();
    assert_eq!(goods.len(), 16);
    assert_eq!(dead.len(), 4);
    for d in dead {
        let letter: DeadLetter = decode(&d.payload).unwrap();
        assert_eq!(letter.stage, "picky");
        assert_eq!(letter.kind, ErrorKind::Data);
        assert!(
            letter.reason.starts_with("record is bad: bad"),
            "{}",
            letter.reason
        );
        let origin = letter.origin.unwrap();
        assert_eq!(origin.topic, input);
    }
}

/// What a source stage reads back after a crash: every committed record, each once, and an
/// empty topic reads as empty (not as a hang).
async fn read_committed_returns_everything_committed_once(bus: &dyn Bus, t: &Topics) {
    let (topic, empty) = (t.name("rc"), t.name("rc-empty"));
    bus.create_topics(&[topic.clone(), empty.clone()], 3)
        .await
        .unwrap();
    assert!(bus
        .read_committed(std::slice::from_ref(&empty))
        .await
        .unwrap()
        .is_empty());
    let mut p = bus.producer(&format!("{}-rc", t.prefix)).await.unwrap();
    for chunk in 0..3 {
        p.send(
            (0..20)
                .map(|i| out(&topic, &format!("k{i}"), &format!("{}", chunk * 20 + i)))
                .collect(),
        )
        .await
        .unwrap();
    }
    p.close().await.unwrap();
    let got = bus
        .read_committed(&[topic.clone(), empty.clone()])
        .await
        .unwrap();
    let mut payloads: Vec<u32> = got
        .iter()
        .map(|r| String::from_utf8_lossy(&r.payload).parse().unwrap())
        .collect();
    payloads.sort();
    assert_eq!(
        payloads,
        (0..60).collect::<Vec<u32>>(),
        "each committed record once"
    );
    assert!(got.iter().all(|r| r.topic == topic));
    // Per partition, in offset order.
    let mut last: HashMap<i32, i64> = HashMap::new();
    for r in &got {
        if let Some(prev) = last.insert(r.partition, r.offset) {
            assert!(
                r.offset > prev,
                "offset order within partition {}",
                r.partition
            );
        }
    }
}

/// A member says how far behind it is (what autoscaling follows): something between what it
/// already took and everything.
async fn lag_is_reported(bus: &dyn Bus, t: &Topics) {
    let input = t.name("lag");
    bus.create_topics(std::slice::from_ref(&input), 1)
        .await
        .unwrap();
    let mut p = bus.producer(&format!("{}-lag", t.prefix)).await.unwrap();
    p.send((0..30).map(|i| out(&input, "k", &i.to_string())).collect())
        .await
        .unwrap();
    p.close().await.unwrap();
    let mut io = bus
        .consumer("g-lag", std::slice::from_ref(&input), "lag-0")
        .await
        .unwrap();
    let took = poll_until(io.as_mut(), 10, 10).await;
    assert_eq!(took.len(), 10);
    let deadline = Instant::now() + Duration::from_secs(20);
    let lag = loop {
        if let Some(l) = io.lag() {
            break l;
        }
        assert!(Instant::now() < deadline, "no lag reported in 20 s");
        // Statistics arrive through polls; this one may deliver records, which we leave.
        io.rewind().await.unwrap();
        let _ = io
            .poll_batch(1, Duration::from_millis(10), Duration::from_millis(500))
            .await
            .unwrap();
    };
    // Kafka counts offsets, and the one transaction's commit marker takes one.
    assert!((1..=31).contains(&lag), "lag {lag}");
    io.close().await.unwrap();
}

/// Records what a stage handled, in order, as (lane, payload), taking `each` per record.
struct Recorder {
    topics: Topics,
    seen: Arc<std::sync::Mutex<Vec<(Lane, String)>>>,
    each: Duration,
}

#[async_trait]
impl Handler for Recorder {
    async fn handle(&self, batch: &[Record]) -> Vec<Result<Vec<Output>, StageError>> {
        let mut out = Vec::new();
        for r in batch {
            tokio::time::sleep(self.each).await;
            let payload = String::from_utf8_lossy(&r.payload).into_owned();
            self.seen
                .lock()
                .unwrap()
                .push((self.topics.lane_of(&r.topic), payload));
            // Handlers name the live topic; the runner keeps the output in its input's lane.
            out.push(Ok(vec![Output {
                topic: self.topics.of::<Preprocessed>(),
                key: r.key.clone().unwrap_or_default(),
                payload: r.payload.clone(),
            }]));
        }
        out
    }
}

/// A live radiograph that arrives during a back-scan is handled next, not after the back-scan's
/// queue; each lane's outputs stay in that lane.
async fn live_work_goes_ahead_of_a_backscan(bus: Arc<dyn Bus>, t: &Topics) {
    bus.create_topics(&t.all(), 3).await.unwrap();
    const BACKLOG: usize = 300;
    let input = t.of::<Deidentified>();
    let mut p = LanedProducer::new(
        bus.producer(&format!("{}-archive", t.prefix))
            .await
            .unwrap(),
        t.clone(),
        Lane::Backscan,
    );
    p.send(
        (0..BACKLOG)
            .map(|i| out(&input, &format!("a{i}"), &format!("archive-{i}")))
            .collect(),
    )
    .await
    .unwrap();
    Box::new(p).close().await.unwrap();

    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (stop, shutdown) = Shutdown::new();
    let env = StageEnv {
        bus: bus.clone(),
        store: BlobStore::from_object_store(Arc::new(object_store::memory::InMemory::new())),
        topics: t.clone(),
        metrics: StageMetrics::new(),
        health: Health::default(),
        shutdown,
        instance: "lanes-0".into(),
        retry: RetryPolicy::default(),
        lanes: LaneConfig {
            enabled: true,
            live_first: true,
        },
    };
    let recorder = Recorder {
        topics: t.clone(),
        seen: seen.clone(),
        each: Duration::from_millis(10),
    };
    let task = tokio::spawn(async move {
        let batch = BatchConfig {
            max: 8,
            linger_ms: 5,
        };
        env.consume("lanes", input, batch, &recorder).await.unwrap();
    });
    let handled = |lane: Lane| seen.lock().unwrap().iter().filter(|s| s.0 == lane).count();
    let deadline = Instant::now() + Duration::from_secs(90);
    while handled(Lane::Backscan) < 16 {
        assert!(Instant::now() < deadline, "the back-scan never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut live = bus.producer(&format!("{}-er", t.prefix)).await.unwrap();
    let sent_at = handled(Lane::Backscan);
    live.send(
        (0..5)
            .map(|i| {
                out(
                    &t.of::<Deidentified>(),
                    &format!("e{i}"),
                    &format!("er-{i}"),
                )
            })
            .collect(),
    )
    .await
    .unwrap();
    live.close().await.unwrap();
    while handled(Lane::Live) < 5 || handled(Lane::Backscan) < BACKLOG {
        assert!(
            Instant::now() < deadline,
            "not everything was handled in 90 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send(true).unwrap();
    task.await.unwrap();

    let seen = seen.lock().unwrap().clone();
    let last_live = seen.iter().rposition(|s| s.0 == Lane::Live).unwrap();
    let archive_before = seen[..last_live]
        .iter()
        .filter(|s| s.0 == Lane::Backscan)
        .count();
    eprintln!(
        "live records sent after {sent_at} back-scan records, all handled after {archive_before}"
    );
    // In a queue shared with the back-scan they would have waited for all 300; here for the
    // batches in hand when they arrived (and Kafka's delivery of them).
    assert!(
        archive_before < sent_at + 100,
        "the live records waited for {} back-scan records after {sent_at}",
        archive_before - sent_at
    );
    let outputs = bus
        .read_committed(&t.lanes_of::<Preprocessed>())
        .await
        .unwrap();
    let in_lane = |lane: Lane| -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for r in outputs.iter().filter(|r| t.lane_of(&r.topic) == lane) {
            *m.entry(String::from_utf8_lossy(&r.payload).into_owned())
                .or_default() += 1;
        }
        m
    };
    let (live_out, archive_out) = (in_lane(Lane::Live), in_lane(Lane::Backscan));
    assert_eq!(live_out.len(), 5, "{live_out:?}");
    assert!(
        live_out.keys().all(|k| k.starts_with("er-")),
        "{live_out:?}"
    );
    assert_eq!(archive_out.len(), BACKLOG);
    assert!(archive_out.keys().all(|k| k.starts_with("archive-")));
    assert!(
        live_out
            .values()
            .chain(archive_out.values())
            .all(|&n| n == 1),
        "once each"
    );
}

async fn suite(bus: Arc<dyn Bus>, name: &str) {
    let t = Topics::new(&testkit::unique_prefix(name));
    order_per_key_and_nothing_lost(bus.as_ref(), &t).await;
    no_duplicates_across_a_consumer_restart(bus.as_ref(), &t).await;
    rewind_redelivers_uncommitted(bus.as_ref(), &t).await;
    a_cancelled_poll_loses_nothing(bus.as_ref(), &t).await;
    dead_letters_land_with_their_reason(bus.clone(), &t).await;
    read_committed_returns_everything_committed_once(bus.as_ref(), &t).await;
    lag_is_reported(bus.as_ref(), &t).await;
    live_work_goes_ahead_of_a_backscan(bus.clone(), &t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_process_bus_conforms() {
    suite(Arc::new(InProcBus::new()), "inproc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_bus_conforms() {
    let cfg = KafkaConfig {
        brokers: testkit::kafka_brokers(),
        ..Default::default()
    };
    suite(Arc::new(KafkaBus::new(cfg)), "kafka").await;
}
