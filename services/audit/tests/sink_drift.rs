//! The audit stage end to end on the in-process bus and SQLite: findings and their labels
//! stream in, one region's sensitivity drops from 95% to 80% halfway, and exactly one alert for
//! that region leaves on `fracture.alerts` (and lands in the database), none for the others.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fracture_audit::{AuditConfig, AuditDb};
use fracture_shared::bus::{Bus, InProcBus, OutRecord, Topics};
use fracture_shared::messages::{decode, encode, schema, Alert, Finding, Label, RadiographId};
use fracture_shared::metrics::{Health, StageMetrics};
use fracture_shared::stage::{Shutdown, StageEnv};
use fracture_shared::store::{BlobStore, StoreConfig};
use fracture_shared::RetryPolicy;

struct Rng(u64);
impl Rng {
    fn f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sensitivity_drop_gives_one_alert_for_its_region() {
    let dir = tempfile::tempdir().unwrap();
    let db = AuditDb::open(&format!(
        "sqlite://{}",
        dir.path().join("audit.db").display()
    ))
    .await
    .unwrap();
    let bus = InProcBus::new();
    let topics = Topics::new("t");
    bus.create_topics(&topics.all(), 1).await.unwrap();
    let mut alerts_io = bus
        .consumer("check", &[topics.of::<Alert>()], "check")
        .await
        .unwrap();
    let (stop, shutdown) = Shutdown::new();
    let env = StageEnv {
        bus: Arc::new(bus.clone()),
        store: BlobStore::open(&StoreConfig {
            url: dir.path().join("store").display().to_string(),
            ..Default::default()
        })
        .unwrap(),
        topics: topics.clone(),
        metrics: StageMetrics::new(),
        health: Health::default(),
        shutdown,
        instance: "t".into(),
        retry: RetryPolicy::default(),
        lanes: Default::default(),
    };
    let cfg = AuditConfig {
        dashboard_addr: String::new(),
        ..Default::default()
    };
    let (e, c, d) = (env.clone(), cfg.clone(), db.clone());
    let task = tokio::spawn(async move { fracture_audit::run(&e, &c, d).await.unwrap() });

    let regions = ["wrist", "ankle", "knee", "hip"];
    let (per_region, drop_at) = (1200usize, 400usize);
    let mut rng = Rng(7);
    let mut producer = bus.producer("src").await.unwrap();
    let mut batch = Vec::new();
    let mut i = 0usize;
    let mut wrist_after_drop = 0usize;
    for j in 0..per_region {
        for region in regions {
            let dropped = region == "wrist" && j >= drop_at;
            wrist_after_drop += usize::from(dropped);
            let fracture = rng.f64() < 0.3;
            let called = if fracture {
                rng.f64() < if dropped { 0.80 } else { 0.95 }
            } else {
                rng.f64() >= 0.85
            };
            let score = if called {
                0.5 + 0.5 * rng.f64()
            } else {
                0.5 * rng.f64()
            };
            let sop = format!("2.25.{i}");
            let f = Finding {
                schema: schema::FINDING.into(),
                id: RadiographId {
                    input: format!("in-{i}"),
                    study_instance_uid: sop.clone(),
                    series_instance_uid: sop.clone(),
                    sop_instance_uid: sop.clone(),
                },
                site: "S1".into(),
                region: region.into(),
                score: score as f32,
                threshold: 0.5,
                fracture: called,
                boxes: vec![],
                model_version: "v1".into(),
                model_trained: true,
                sr: None,
                sc: None,
            };
            let l = Label {
                schema: schema::LABEL.into(),
                sop_instance_uid: sop.clone(),
                fracture,
                region: None,
                boxes: vec![],
            };
            batch.push(OutRecord {
                topic: topics.of::<Finding>(),
                key: sop.clone(),
                payload: encode(&f),
                headers: vec![],
            });
            batch.push(OutRecord {
                topic: topics.of::<Label>(),
                key: sop.clone(),
                payload: encode(&l),
                headers: vec![],
            });
            i += 1;
        }
        if batch.len() >= 400 {
            producer.send(std::mem::take(&mut batch)).await.unwrap();
        }
    }
    producer.send(batch).await.unwrap();

    // Wait until the sink has taken everything.
    let deadline = Instant::now() + Duration::from_secs(300);
    while bus.lag("t.audit", &topics.of::<Finding>()) + bus.lag("t.audit", &topics.of::<Label>())
        > 0
    {
        assert!(Instant::now() < deadline, "the sink did not keep up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut alerts: Vec<Alert> = Vec::new();
    loop {
        let b = alerts_io
            .poll_batch(100, Duration::from_millis(10), Duration::from_millis(500))
            .await
            .unwrap();
        if b.is_empty() {
            break;
        }
        alerts.extend(b.iter().map(|r| decode::<Alert>(&r.payload).unwrap()));
        alerts_io.commit(vec![]).await.unwrap();
    }
    stop.send(true).unwrap();
    task.await.unwrap();

    for a in &alerts {
        println!(
            "alert {} {} site={:?} model={:?}: {}",
            a.kind, a.region, a.site, a.model_version, a.message
        );
    }
    assert!(
        alerts.iter().all(|a| a.region == "wrist"),
        "alerts only for the drifting region: {alerts:#?}"
    );
    let region_level: Vec<&Alert> = alerts
        .iter()
        .filter(|a| a.site.is_none() && a.model_version.is_none())
        .collect();
    assert_eq!(
        region_level.len(),
        1,
        "exactly one alert for the wrist region: {alerts:#?}"
    );
    assert_eq!(
        db.alerts().await.unwrap().len(),
        alerts.len(),
        "every alert is in the database"
    );
    assert_eq!(
        db.count().await.unwrap(),
        (per_region * regions.len()) as i64
    );
    println!(
        "{wrist_after_drop} wrist cases after the drop; {} alerts",
        alerts.len()
    );
}
