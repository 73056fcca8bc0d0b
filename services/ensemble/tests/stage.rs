//! The ensemble stage with the ten-member untrained ensemble, on both transports: one Scored per
//! input with every member's score, their mean and the map of the members with map heads; two
//! replicas on Kafka share the partitions and score every input exactly once; batches gather up
//! to `batch.max` records within `batch.linger_ms`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fracture_ensemble::{run, EnsembleConfig};
use fracture_models::{manifest, transform, Ensemble, Manifest};
use fracture_shared::bus::{Bus, InProcBus, KafkaBus, KafkaConfig, OutRecord, Topics};
use fracture_shared::messages::{
    decode, encode, schema, DeadLetter, Geometry, Preprocessed, RadiographId, Scored,
};
use fracture_shared::metrics::{Health, StageMetrics};
use fracture_shared::stage::{bytes_to_f32, f32_to_bytes, BatchConfig, Shutdown, StageEnv};
use fracture_shared::store::{BlobStore, StoreConfig};
use fracture_shared::{pixels, testkit, RetryPolicy};
use tokio::sync::watch;

fn untrained10() -> Manifest {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/untrained10/ensemble.toml");
    manifest::load(&path).expect("the ten-member untrained manifest loads")
}

/// Loaded once per test binary and shared, as the replicas of one process share it.
fn ensemble() -> Arc<Ensemble> {
    static ENSEMBLE: OnceLock<Arc<Ensemble>> = OnceLock::new();
    ENSEMBLE
        .get_or_init(|| {
            let device = fracture_models::ensemble::inference_device().expect("device");
            Arc::new(Ensemble::load(untrained10(), &device).expect("load untrained10"))
        })
        .clone()
}

/// A pre-processed phantom radiograph: the model input as the preprocess stage makes it (DICOM
/// written and read back, pixels decoded, the manifest's transform).
#[derive(Clone)]
struct Input {
    id: RadiographId,
    region: String,
    tensor: Vec<f32>,
    geometry: Geometry,
}

fn phantom_inputs(count: usize) -> Vec<Input> {
    // Planned and drawn in memory: nothing is written to `out`.
    let cfg = fracture_phantoms::PhantomConfig {
        count,
        seed: 42,
        min_side: 300,
        max_side: 420,
        fracture_rate: 0.5,
        ..Default::default()
    };
    let tcfg = untrained10().transform;
    fracture_phantoms::plan(&cfg)
        .expect("plan phantoms")
        .iter()
        .map(|p| {
            let image = fracture_phantoms::render::render(&p.scene, true);
            let obj = fracture_phantoms::to_dicom(p, &image, cfg.seed).expect("phantom DICOM");
            let bytes = pixels::write_object(&obj).expect("write");
            let r = pixels::decode(&pixels::read_object(&bytes).expect("read")).expect("decode");
            let t = transform(&r.pixels, r.width, r.height, &tcfg).expect("transform");
            Input {
                id: RadiographId {
                    input: p.file_name.clone(),
                    study_instance_uid: p.study_instance_uid.clone(),
                    series_instance_uid: p.series_instance_uid.clone(),
                    sop_instance_uid: p.sop_instance_uid.clone(),
                },
                region: p.region.to_string(),
                tensor: t.to_tensor_data(),
                geometry: Geometry {
                    original_width: t.original_width,
                    original_height: t.original_height,
                    crop: t.crop,
                    scale: t.scale,
                    size: t.size as u32,
                },
            }
        })
        .collect()
}

/// Stores each tensor and returns the `preprocessed` records, keyed by study as preprocess does.
async fn preprocessed(store: &BlobStore, topics: &Topics, inputs: &[Input]) -> Vec<OutRecord> {
    let mut out = Vec::new();
    for x in inputs {
        let tensor = store
            .put(
                Bytes::from(f32_to_bytes(&x.tensor)),
                "application/x-fracture-f32",
            )
            .await
            .expect("store tensor");
        let msg = Preprocessed {
            schema: schema::PREPROCESSED.into(),
            id: x.id.clone(),
            site: "TEST".into(),
            region: x.region.clone(),
            tensor,
            geometry: x.geometry,
            dicom: None,
        };
        out.push(OutRecord {
            topic: topics.of::<Preprocessed>(),
            key: x.id.study_instance_uid.clone(),
            payload: encode(&msg),
            headers: vec![],
        });
    }
    out
}

struct Replica {
    env: StageEnv,
    stop: watch::Sender<bool>,
}

fn replica(bus: Arc<dyn Bus>, store: &BlobStore, topics: &Topics, instance: &str) -> Replica {
    let (stop, shutdown) = Shutdown::new();
    Replica {
        env: StageEnv {
            bus,
            store: store.clone(),
            topics: topics.clone(),
            metrics: StageMetrics::new(),
            health: Health::default(),
            shutdown,
            instance: instance.into(),
            retry: RetryPolicy::default(),
            lanes: Default::default(),
        },
        stop,
    }
}

fn start(r: &Replica, cfg: EnsembleConfig) -> tokio::task::JoinHandle<()> {
    let env = r.env.clone();
    tokio::spawn(async move {
        run(&env, &cfg, ensemble()).await.expect("the stage runs");
    })
}

/// A counter or histogram series of one replica, summed over its labels, from `/metrics` text.
fn metric(m: &StageMetrics, series: &str) -> f64 {
    m.render()
        .lines()
        .filter(|l| {
            l.strip_prefix(series)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Every committed Scored (as sop uid -> messages) once `want` have arrived, or after `limit`.
async fn scored(
    bus: &dyn Bus,
    topics: &Topics,
    want: usize,
    limit: Duration,
) -> BTreeMap<String, Vec<Scored>> {
    let deadline = Instant::now() + limit;
    loop {
        let records = bus
            .read_committed(&[topics.of::<Scored>()])
            .await
            .expect("read scored");
        if records.len() >= want || Instant::now() > deadline {
            let mut by_input: BTreeMap<String, Vec<Scored>> = BTreeMap::new();
            for r in records {
                let s: Scored = decode(&r.payload).expect("a Scored message");
                by_input
                    .entry(s.id.sop_instance_uid.clone())
                    .or_default()
                    .push(s);
            }
            return by_input;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn dead_letters(bus: &dyn Bus, topics: &Topics) -> Vec<String> {
    bus.read_committed(&[topics.of::<DeadLetter>()])
        .await
        .expect("read dead letters")
        .iter()
        .map(|r| {
            decode::<DeadLetter>(&r.payload)
                .map(|d| d.reason)
                .unwrap_or_else(|e| e.0)
        })
        .collect()
}

/// The ensemble of only the members with a map head: its map is what the stage's map must be.
fn map_members_only() -> Ensemble {
    let mut m = untrained10();
    m.members.retain(|s| s.map_head);
    let device = fracture_models::ensemble::inference_device().expect("device");
    Ensemble::load(m, &device).expect("load the map-head members")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_members_score_every_input_on_the_in_process_bus() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = BlobStore::open(&StoreConfig {
        url: tmp.path().display().to_string(),
        ..Default::default()
    })
    .expect("store");
    let bus = InProcBus::new();
    let topics = Topics::new("inproc10");
    bus.create_topics(&topics.all(), 1).await.expect("topics");
    let inputs = phantom_inputs(3);
    let mut producer = bus.producer("test").await.expect("producer");
    producer
        .send(preprocessed(&store, &topics, &inputs).await)
        .await
        .expect("send inputs");

    let r = replica(Arc::new(bus.clone()), &store, &topics, "ensemble-0");
    let task = start(&r, EnsembleConfig::default());
    let got = scored(&bus, &topics, inputs.len(), Duration::from_secs(120)).await;
    r.stop.send(true).expect("stop");
    task.await.expect("the stage stops cleanly");

    assert!(dead_letters(&bus, &topics).await.is_empty());
    assert_eq!(got.len(), inputs.len(), "one Scored per input");
    let ensemble = ensemble();
    let maps = map_members_only();
    let expected: Vec<&[f32]> = inputs.iter().map(|x| x.tensor.as_slice()).collect();
    let direct = ensemble.predict(&expected).expect("predict");
    let direct_maps = maps.predict(&expected).expect("predict maps");
    for ((x, want), want_map) in inputs.iter().zip(&direct).zip(&direct_maps) {
        let s = &got[&x.id.sop_instance_uid];
        assert_eq!(s.len(), 1, "{} scored {} times", x.id.input, s.len());
        let s = &s[0];
        assert_eq!(s.id, x.id);
        assert_eq!(s.region, x.region);
        assert_eq!(s.geometry, x.geometry);
        assert_eq!(s.model_version, "untrained10-0.1.0");
        assert!(!s.model_trained);
        assert_eq!(s.member_scores.len(), 10);
        assert!(s.member_scores.iter().all(|p| *p > 0.0 && *p < 1.0));
        let mean = s.member_scores.iter().sum::<f32>() / 10.0;
        assert!((s.score - mean).abs() < 1e-6, "{} vs mean {mean}", s.score);
        for (a, b) in s.member_scores.iter().zip(&want.member_scores) {
            assert!((a - b).abs() < 1e-5, "stage {a}, direct {b}");
        }
        assert_eq!(s.map_size, 32);
        let blob = s.map.as_ref().expect("six members have a map head");
        let map = bytes_to_f32(&store.get(blob).await.expect("map blob")).expect("f32 map");
        let want_map = want_map.map.as_ref().expect("map");
        assert_eq!(map.len(), 32 * 32);
        let worst = map
            .iter()
            .zip(want_map)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < 1e-5,
            "the map is not the mean of the map-head members' maps (off by {worst})"
        );
    }
}

/// `batch.max` caps a batch and records arriving within `batch.linger_ms` of the first join it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_gather_up_to_batch_size_within_max_wait() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = BlobStore::open(&StoreConfig {
        url: tmp.path().display().to_string(),
        ..Default::default()
    })
    .expect("store");
    let bus = InProcBus::new();
    let topics = Topics::new("batch10");
    bus.create_topics(&topics.all(), 1).await.expect("topics");
    let inputs = phantom_inputs(6);
    let records = preprocessed(&store, &topics, &inputs).await;

    let r = replica(Arc::new(bus.clone()), &store, &topics, "ensemble-0");
    let task = start(
        &r,
        EnsembleConfig {
            batch: BatchConfig {
                max: 4,
                linger_ms: 1000,
            },
        },
    );
    // One at a time, well within linger_ms of each other.
    let mut producer = bus.producer("test").await.expect("producer");
    for rec in records {
        producer.send(vec![rec]).await.expect("send");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = scored(&bus, &topics, inputs.len(), Duration::from_secs(120)).await;
    r.stop.send(true).expect("stop");
    task.await.expect("the stage stops cleanly");

    assert_eq!(got.len(), inputs.len());
    assert!(got.values().all(|s| s.len() == 1));
    let m = &r.env.metrics;
    let batches = metric(m, "fracture_batch_size_count");
    let records = metric(m, "fracture_batch_size_sum");
    assert_eq!(records, inputs.len() as f64);
    assert!(
        batches < records,
        "{batches} batches for {records} records: nothing was batched"
    );
    // The bucket le="4" holds every batch: none was larger than batch.max.
    let text = m.render();
    let le4 = text
        .lines()
        .find(|l| l.starts_with("fracture_batch_size_bucket") && l.contains("le=\"4\""))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .expect("the le=4 bucket");
    assert_eq!(le4, batches, "a batch was larger than batch.max 4");
}

/// Two replicas in one consumer group on a real broker, 3 partitions: both take part, and every
/// input is scored exactly once (read back with a read-committed consumer).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_share_the_partitions_on_kafka_and_score_each_input_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = BlobStore::open(&StoreConfig {
        url: tmp.path().display().to_string(),
        ..Default::default()
    })
    .expect("store");
    let prefix = testkit::unique_prefix("ensemble10");
    let bus = KafkaBus::new(KafkaConfig {
        brokers: testkit::kafka_brokers(),
        topic_prefix: prefix.clone(),
        partitions: 3,
        ..Default::default()
    });
    let topics = Topics::new(&prefix);
    bus.create_topics(&topics.all(), 3).await.expect("topics");
    let shared: Arc<dyn Bus> = Arc::new(bus.clone());
    let replicas = [
        replica(shared.clone(), &store, &topics, "ensemble-0"),
        replica(shared.clone(), &store, &topics, "ensemble-1"),
    ];
    let tasks: Vec<_> = replicas
        .iter()
        .map(|r| {
            start(
                r,
                EnsembleConfig {
                    batch: BatchConfig {
                        max: 4,
                        linger_ms: 50,
                    },
                },
            )
        })
        .collect();

    // Rounds of inputs with distinct keys until both replicas have scored some: the group
    // settles (a replica joining later takes partitions from the first) while rounds arrive,
    // and a round that spans the partitions then reaches both.
    let base = phantom_inputs(4);
    let mut producer = bus
        .producer(&format!("{prefix}.test"))
        .await
        .expect("producer");
    let mut sent: Vec<Input> = Vec::new();
    let processed = |r: &Replica| metric(&r.env.metrics, "fracture_radiographs_processed_total");
    for round in 0..8 {
        let batch: Vec<Input> = (0..6)
            .map(|i| {
                let mut x = base[i % base.len()].clone();
                for uid in [&mut x.id.study_instance_uid, &mut x.id.sop_instance_uid] {
                    uid.push_str(&format!(".{round}.{i}"));
                }
                x.id.input = format!("round-{round}-{i}");
                x
            })
            .collect();
        producer
            .send(preprocessed(&store, &topics, &batch).await)
            .await
            .expect("send a round");
        sent.extend(batch);
        let got = scored(
            shared.as_ref(),
            &topics,
            sent.len(),
            Duration::from_secs(180),
        )
        .await;
        assert_eq!(
            got.len(),
            sent.len(),
            "round {round}: not every input scored"
        );
        if replicas.iter().all(|r| processed(r) > 0.0) {
            break;
        }
    }
    producer.close().await.expect("close producer");
    // Anything late or duplicated would show up now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for r in &replicas {
        r.stop.send(true).expect("stop");
    }
    for t in tasks {
        t.await.expect("a replica stops cleanly");
    }

    let counts: Vec<f64> = replicas.iter().map(processed).collect();
    eprintln!("processed per replica: {counts:?}, {} inputs", sent.len());
    assert!(
        counts.iter().all(|&c| c > 0.0),
        "both replicas must take part: processed {counts:?}"
    );
    // A batch whose transaction was aborted by a rebalance is processed again, so at least.
    assert!(
        counts.iter().sum::<f64>() >= sent.len() as f64,
        "{counts:?}"
    );
    let got = scored(shared.as_ref(), &topics, sent.len(), Duration::ZERO).await;
    assert!(dead_letters(shared.as_ref(), &topics).await.is_empty());
    assert_eq!(got.len(), sent.len());
    for x in &sent {
        let s = got
            .get(&x.id.sop_instance_uid)
            .unwrap_or_else(|| panic!("{} was never scored", x.id.input));
        assert_eq!(s.len(), 1, "{} scored {} times", x.id.input, s.len());
        assert_eq!(s[0].member_scores.len(), 10);
        let mean = s[0].member_scores.iter().sum::<f32>() / 10.0;
        assert!((s[0].score - mean).abs() < 1e-6);
        assert!(s[0].map.is_some());
    }
}
