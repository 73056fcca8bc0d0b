//! The audit sink's database suite, run unchanged on SQLite (embedded) and on a real PostgreSQL
//! server started on loopback by the project's script.

use fracture_audit::db::{AlertRow, Column};
use fracture_audit::{AuditDb, RegionCount};
use fracture_shared::messages::{schema, BoundingBox, Finding, Label, RadiographId};
use fracture_shared::testkit;

fn finding(sop: &str, site: &str, region: &str, score: f32, version: &str) -> Finding {
    Finding {
        schema: schema::FINDING.into(),
        id: RadiographId {
            input: format!("in-{sop}"),
            study_instance_uid: "2.25.1".into(),
            series_instance_uid: "2.25.2".into(),
            sop_instance_uid: sop.into(),
        },
        site: site.into(),
        region: region.into(),
        score,
        threshold: 0.5,
        fracture: score >= 0.5,
        boxes: vec![BoundingBox {
            x0: 1.0,
            y0: 2.0,
            x1: 3.0,
            y1: 4.0,
            score,
        }],
        model_version: version.into(),
        model_trained: false,
        sr: None,
        sc: None,
    }
}

fn label(sop: &str, fracture: bool) -> Label {
    Label {
        schema: schema::LABEL.into(),
        sop_instance_uid: sop.into(),
        fracture,
        region: None,
        boxes: vec![],
    }
}

async fn suite(url: &str) {
    let db = AuditDb::open(url).await.unwrap();
    let batch = [
        finding("2.25.10", "A", "wrist", 0.7, "v1"),
        finding("2.25.11", "A", "wrist", 0.2, "v1"),
        finding("2.25.12", "B", "ankle", 0.9, "v1"),
        finding("2.25.12", "B", "ankle", 0.4, "v2"),
    ];
    // Replaying the findings topic changes nothing.
    db.record(&batch).await.unwrap();
    db.record(&batch).await.unwrap();
    assert_eq!(db.count().await.unwrap(), 4);
    assert_eq!(
        db.by_region().await.unwrap(),
        vec![
            RegionCount {
                region: "ankle".into(),
                radiographs: 2,
                positive: 1
            },
            RegionCount {
                region: "wrist".into(),
                radiographs: 2,
                positive: 1
            },
        ]
    );

    // A late label joins its finding; a replayed label changes nothing; a corrected one replaces.
    db.record_labels(&[label("2.25.10", true), label("2.25.12", false)])
        .await
        .unwrap();
    db.record_labels(&[label("2.25.10", true)]).await.unwrap();
    assert_eq!(db.count_labels().await.unwrap(), 2);
    let cases = db.cases(None, None).await.unwrap();
    assert_eq!(cases.len(), 4);
    let c10 = cases
        .iter()
        .find(|c| c.sop_instance_uid == "2.25.10")
        .unwrap();
    assert_eq!(
        (c10.label, c10.called_positive, c10.site.as_str()),
        (Some(true), true, "A")
    );
    assert!((c10.score - 0.7).abs() < 1e-6);
    assert!(c10.labelled_ms.is_some());
    assert_eq!(
        cases
            .iter()
            .find(|c| c.sop_instance_uid == "2.25.11")
            .unwrap()
            .label,
        None
    );
    db.record_labels(&[label("2.25.11", true)]).await.unwrap();
    let c11 = db
        .cases(None, None)
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.sop_instance_uid == "2.25.11")
        .unwrap();
    assert_eq!(c11.label, Some(true));

    // Filters by site and model version.
    assert_eq!(db.cases(Some("B"), None).await.unwrap().len(), 2);
    assert_eq!(db.cases(Some("B"), Some("v2")).await.unwrap().len(), 1);
    assert_eq!(db.cases(None, Some("v1")).await.unwrap().len(), 3);
    assert_eq!(db.distinct(Column::Site).await.unwrap(), vec!["A", "B"]);
    assert_eq!(
        db.distinct(Column::ModelVersion).await.unwrap(),
        vec!["v1", "v2"]
    );

    // Alerts are recorded once.
    let a = AlertRow {
        kind: "sensitivity_floor".into(),
        region: "wrist".into(),
        site: None,
        model_version: None,
        message: "sensitivity lower bound 81.0% < floor 87.5%".into(),
        opened_ms: 1000,
    };
    db.record_alert("region=wrist", &a).await.unwrap();
    db.record_alert("region=wrist", &a).await.unwrap();
    assert_eq!(db.alerts().await.unwrap(), vec![a]);
    db.close().await;

    // Reopening finds everything (the schema step is idempotent).
    let db = AuditDb::open(url).await.unwrap();
    assert_eq!(db.count().await.unwrap(), 4);
    db.close().await;
}

#[tokio::test]
async fn sqlite_sink_suite() {
    let d = tempfile::tempdir().unwrap();
    suite(&format!("sqlite://{}", d.path().join("audit.db").display())).await;
}

#[tokio::test]
async fn postgres_sink_suite() {
    let base = testkit::postgres_url();
    // A database of its own, so runs never see each other's rows.
    let name = format!(
        "audit_{}",
        testkit::unique_prefix("pg").replace(['-', '.'], "_")
    );
    sqlx::any::install_default_drivers();
    let admin = sqlx::AnyPool::connect(&base).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await
        .unwrap();
    let url = format!("{}/{name}", base.rsplit_once('/').unwrap().0);
    suite(&url).await;
    admin.close().await;
}

#[tokio::test]
async fn bad_urls_say_what_to_use() {
    let e = AuditDb::open("mysql://x").await.err().unwrap().to_string();
    assert!(e.contains("sqlite://PATH or postgres://"), "{e}");
}
