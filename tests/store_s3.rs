//! The claim-check store on a real S3 server (SeaweedFS's S3 gateway, started by
//! `scripts/seaweedfs.sh` on loopback), as a multi-node cluster runs it: no shared volume, every
//! stage reaching one bucket over HTTP with SigV4 credentials from the usual `AWS_*` variables.
//! The store's contract (content addressing, idempotent puts, verified reads, an outage read as
//! "unavailable" and never as "missing") holds there as on a folder, and the five `fracture serve`
//! processes run a back-scan through it with nothing written to a local store folder.
//!
//! Built with `--features s3` only (the test command builds with it).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;
use std::time::Duration;

use bytes::Bytes;
use common::pipeline::{self, sample, Pipeline};
use fracture_shared::bus::{KafkaBus, KafkaConfig, Topics};
use fracture_shared::messages::{decode, DeadLetter, Finding};
use fracture_shared::metrics::StageMetrics;
use fracture_shared::store::{sha256_hex, BlobStore, StoreConfig, StoreError};
use fracture_shared::testkit;

const BUCKET: &str = "fracture";
const ACCESS_KEY: &str = "fracture-test";
const SECRET_KEY: &str = "fracture-test-secret";

/// A SeaweedFS server of its own in `dir`, stopped when dropped.
struct S3Server {
    dir: PathBuf,
    endpoint: String,
}

impl S3Server {
    fn start(dir: &Path) -> Self {
        let endpoint = seaweedfs(&["start", &dir.display().to_string()]);
        assert!(endpoint.starts_with("http://127.0.0.1:"), "{endpoint}");
        Self {
            dir: dir.to_path_buf(),
            endpoint,
        }
    }

    fn stop(&self) {
        seaweedfs(&["stop", &self.dir.display().to_string()]);
    }

    /// The filer's HTTP API, a door beside S3 that needs no signature: it lets the test change
    /// an object behind the store's back.
    fn filer(&self) -> String {
        let ports = std::fs::read_to_string(self.dir.join("ports")).unwrap();
        let filer = ports.split_whitespace().nth(4).expect("filer port");
        format!("http://127.0.0.1:{filer}")
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn seaweedfs(args: &[&str]) -> String {
    let out = Command::new("bash")
        .arg(pipeline::repo().join("scripts/seaweedfs.sh"))
        .args(args)
        .output()
        .expect("run scripts/seaweedfs.sh");
    assert!(
        out.status.success(),
        "scripts/seaweedfs.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The store reads its credentials as an S3 client on a cluster node would: from the standard
/// variables (a Secret's, in the chart). Every test here sets the same values.
fn credentials() {
    static SET: Once = Once::new();
    SET.call_once(|| {
        std::env::set_var("AWS_ACCESS_KEY_ID", ACCESS_KEY);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
        std::env::set_var("AWS_REGION", "us-east-1");
    });
}

fn s3_store(server: &S3Server, prefix: &str) -> BlobStore {
    credentials();
    BlobStore::open(&StoreConfig {
        url: format!("s3://{BUCKET}/{prefix}"),
        endpoint: server.endpoint.clone(),
    })
    .unwrap()
}

#[tokio::test]
async fn the_store_contract_holds_on_a_real_s3_server() {
    let keep = tempfile::tempdir().unwrap();
    let server = S3Server::start(&keep.path().join("s3"));
    let metrics = StageMetrics::new();
    let store = s3_store(&server, "contract").counted(metrics.store_bytes.clone());
    store.check().await.expect("the bucket answers");

    let content = Bytes::from(vec![7u8; 300_000]);
    let a = store
        .put(content.clone(), "application/dicom")
        .await
        .unwrap();
    let b = store
        .put(content.clone(), "application/dicom")
        .await
        .unwrap();
    assert_eq!(a, b);
    assert_eq!(a.sha256, sha256_hex(&content));
    assert_eq!(store.get(&a).await.unwrap(), content);
    // The second put found the object there and sent nothing.
    let put = metrics.store_bytes.with_label_values(&["put"]).get();
    assert_eq!(put, 300_000);

    // Named records: replaced, read back, removed.
    store
        .put_named("breaker/x", Bytes::from_static(b"one"))
        .await
        .unwrap();
    store
        .put_named("breaker/x", Bytes::from_static(b"two"))
        .await
        .unwrap();
    assert_eq!(
        store.get_named("breaker/x").await.unwrap().as_deref(),
        Some(&b"two"[..])
    );
    store.delete_named("breaker/x").await.unwrap();
    store.delete_named("breaker/x").await.unwrap();
    assert_eq!(store.get_named("breaker/x").await.unwrap(), None);

    // Missing is missing (the radiograph is dead-lettered), not an outage.
    let mut missing = a.clone();
    missing.sha256 = "0".repeat(64);
    assert!(matches!(
        store.get(&missing).await,
        Err(StoreError::NotFound(_))
    ));

    // Changed behind the store's back (through the filer, without S3): the read refuses it.
    let path = format!(
        "{}/buckets/{BUCKET}/contract/sha256/{}/{}",
        server.filer(),
        &a.sha256[..2],
        a.sha256
    );
    let scratch = keep.path().join("tampered");
    std::fs::write(&scratch, vec![8u8; 300_000]).unwrap();
    let st = Command::new("curl")
        .args(["-sf", "-X", "PUT", "--data-binary"])
        .arg(format!("@{}", scratch.display()))
        .arg(&path)
        .status()
        .unwrap();
    assert!(st.success(), "curl PUT {path}");
    assert!(matches!(
        store.get(&a).await,
        Err(StoreError::Corrupt { .. })
    ));
}

#[tokio::test]
async fn an_s3_outage_is_unavailable_and_the_data_is_there_after_it() {
    let keep = tempfile::tempdir().unwrap();
    let server = S3Server::start(&keep.path().join("s3"));
    let store = s3_store(&server, "outage");
    let kept = store
        .put(Bytes::from_static(b"before the outage"), "text/plain")
        .await
        .unwrap();

    server.stop();
    // Unavailable, so a stage retries and does not commit; NotFound would dead-letter the
    // radiograph for good.
    let got = store.get(&kept).await;
    assert!(matches!(got, Err(StoreError::Unavailable(_))), "{got:?}");
    let put = store
        .put(Bytes::from_static(b"during the outage"), "text/plain")
        .await;
    assert!(matches!(put, Err(StoreError::Unavailable(_))), "{put:?}");
    assert!(store.check().await.is_err());

    let again = S3Server::start(&server.dir);
    assert_eq!(
        again.endpoint, server.endpoint,
        "same ports after a restart"
    );
    assert_eq!(
        &store.get(&kept).await.unwrap()[..],
        b"before the outage",
        "the same client reaches the restarted server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_pipeline_runs_on_an_s3_store() {
    let keep = tempfile::tempdir().unwrap();
    let work = keep.path();
    let server = S3Server::start(&work.join("s3"));
    credentials();
    let n = 12;
    let inputs = work.join("inputs");
    pipeline::phantoms(&inputs, n, 31);
    let key = work.join("deid.key");
    std::fs::write(&key, [5u8; 32]).unwrap();
    let brokers = testkit::kafka_brokers();
    let prefix = testkit::unique_prefix("s3");
    let run = work.join("run");
    let cfg = pipeline::write_null_config(&run, &brokers, &prefix, &key, "");
    let mut p = Pipeline::new(&run, &cfg, std::slice::from_ref(&inputs));
    for s in pipeline::STAGES {
        p.setting(s, "store.url", &format!("s3://{BUCKET}/{prefix}"));
        p.setting(s, "store.endpoint", &server.endpoint);
    }
    p.start_all();

    let bus = KafkaBus::new(KafkaConfig {
        brokers: brokers.clone(),
        ..Default::default()
    });
    let topics = Topics::new(&prefix);
    let out = pipeline::committed_outputs(&bus, &topics, n, Duration::from_secs(300)).await;
    let dead: Vec<String> = out
        .iter()
        .filter(|r| r.topic == topics.of::<DeadLetter>())
        .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
        .collect();
    assert!(dead.is_empty(), "dead letters: {dead:?}\n{}", p.logs());
    let findings: Vec<Finding> = out.iter().map(|r| decode(&r.payload).unwrap()).collect();
    assert_eq!(findings.len(), n, "{}", p.logs());

    // Every stage that moves pixels read or wrote them through S3, and nothing went to the
    // folder the configuration file names.
    for (stage, op) in [
        ("ingest", "put"),
        ("preprocess", "get"),
        ("preprocess", "put"),
        ("ensemble", "get"),
        ("postprocess", "get"),
    ] {
        let m = p.metrics(stage);
        let v = sample(&m, "fracture_store_bytes_total", &format!("op=\"{op}\""));
        assert!(v > 0.0, "{stage} {op} no bytes through S3");
    }
    assert!(!run.join("store").exists(), "a local store folder was made");
    // The bucket holds the objects, under the run's prefix.
    let listing = Command::new("curl")
        .args(["-sf", "-H", "Accept: application/json"])
        .arg(format!(
            "{}/buckets/{BUCKET}/{prefix}/sha256/?limit=1000",
            server.filer()
        ))
        .output()
        .unwrap();
    assert!(listing.status.success(), "filer listing");
    let listed: serde_json::Value = serde_json::from_slice(&listing.stdout).unwrap();
    let folders = listed["Entries"].as_array().map_or(0, Vec::len);
    assert!(folders > 0, "no objects under {prefix}/sha256: {listed}");
    let failures = p.stop();
    assert!(failures.is_empty(), "{failures:?}\n{}", p.logs());
}
