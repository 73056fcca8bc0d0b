//! The audit sink: every finding in a database, idempotent by SOP Instance UID + model version,
//! so replaying the findings topic changes nothing.

pub mod evaluate;

use std::str::FromStr;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::Row;

use fracture_shared::bus::Record;
use fracture_shared::error::StageError;
use fracture_shared::messages::{decode, Finding};
use fracture_shared::stage::{BatchConfig, Handler, Output, StageEnv, StageFailed};

pub const STAGE: &str = "audit";

/// `[audit]`
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// `sqlite://PATH` (created if missing).
    pub database: String,
    pub batch: BatchConfig,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            database: "sqlite://fracture-audit.db".into(),
            batch: BatchConfig {
                max: 64,
                linger_ms: 20,
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("audit database: {0}")]
pub struct DbError(String);

impl From<sqlx::Error> for DbError {
    fn from(e: sqlx::Error) -> Self {
        DbError(e.to_string())
    }
}

/// Per-region counts, for reports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RegionCount {
    pub region: String,
    pub radiographs: i64,
    pub positive: i64,
}

#[derive(Clone)]
pub struct AuditDb {
    pool: SqlitePool,
}

impl AuditDb {
    pub async fn open(url: &str) -> Result<Self, DbError> {
        let opts = SqliteConnectOptions::from_str(url)
            .map_err(|e| {
                DbError(format!(
                    "{url:?} is not a database URL like sqlite://fracture-audit.db: {e}"
                ))
            })?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS findings (
                sop_instance_uid TEXT NOT NULL,
                model_version TEXT NOT NULL,
                study_instance_uid TEXT NOT NULL,
                input TEXT NOT NULL,
                site TEXT NOT NULL,
                region TEXT NOT NULL,
                score REAL NOT NULL,
                threshold REAL NOT NULL,
                fracture INTEGER NOT NULL,
                boxes TEXT NOT NULL,
                model_trained INTEGER NOT NULL,
                recorded_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
                PRIMARY KEY (sop_instance_uid, model_version)
            )",
        )
        .execute(&pool)
        .await?;
        Ok(Self { pool })
    }

    /// Upserts findings in one transaction; a replay leaves the rows as they were.
    pub async fn record(&self, findings: &[Finding]) -> Result<(), DbError> {
        let mut tx = self.pool.begin().await?;
        for f in findings {
            sqlx::query(
                "INSERT INTO findings (sop_instance_uid, model_version, study_instance_uid, input, site, region, score, threshold, fracture, boxes, model_trained)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                 ON CONFLICT (sop_instance_uid, model_version) DO UPDATE SET
                   study_instance_uid = excluded.study_instance_uid, input = excluded.input, site = excluded.site,
                   region = excluded.region, score = excluded.score, threshold = excluded.threshold,
                   fracture = excluded.fracture, boxes = excluded.boxes, model_trained = excluded.model_trained",
            )
            .bind(&f.id.sop_instance_uid)
            .bind(&f.model_version)
            .bind(&f.id.study_instance_uid)
            .bind(&f.id.input)
            .bind(&f.site)
            .bind(&f.region)
            .bind(f.score as f64)
            .bind(f.threshold as f64)
            .bind(f.fracture)
            .bind(serde_json::to_string(&f.boxes).unwrap_or_else(|_| "[]".into()))
            .bind(f.model_trained)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn count(&self) -> Result<i64, DbError> {
        Ok(sqlx::query("SELECT COUNT(*) FROM findings")
            .fetch_one(&self.pool)
            .await?
            .get::<i64, _>(0))
    }

    pub async fn by_region(&self) -> Result<Vec<RegionCount>, DbError> {
        let rows = sqlx::query(
            "SELECT region, COUNT(*), SUM(fracture) FROM findings GROUP BY region ORDER BY region",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| RegionCount {
                region: r.get(0),
                radiographs: r.get(1),
                positive: r.get::<Option<i64>, _>(2).unwrap_or(0),
            })
            .collect())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

pub struct AuditSink {
    pub db: AuditDb,
}

#[async_trait]
impl Handler for AuditSink {
    async fn handle(&self, batch: &[Record]) -> Vec<Result<Vec<Output>, StageError>> {
        let decoded: Vec<Result<Finding, StageError>> = batch
            .iter()
            .map(|r| decode::<Finding>(&r.payload).map_err(StageError::data))
            .collect();
        let good: Vec<Finding> = decoded
            .iter()
            .filter_map(|d| d.as_ref().ok().cloned())
            .collect();
        let write = self
            .db
            .record(&good)
            .await
            .map_err(|e| StageError::external(e.to_string()));
        decoded
            .into_iter()
            .map(|d| match d {
                Err(e) => Err(e),
                Ok(_) => write.clone().map(|()| Vec::new()),
            })
            .collect()
    }
}

/// Runs the sink until shutdown.
pub async fn run(env: &StageEnv, cfg: &AuditConfig, db: AuditDb) -> Result<(), StageFailed> {
    let sink = AuditSink { db };
    env.consume(STAGE, env.topics.of::<Finding>(), cfg.batch, &sink)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use fracture_shared::messages::{schema, RadiographId};

    fn finding(sop: &str, score: f32) -> Finding {
        Finding {
            schema: schema::FINDING.into(),
            id: RadiographId {
                input: "in-1".into(),
                study_instance_uid: "2.25.1".into(),
                series_instance_uid: "2.25.2".into(),
                sop_instance_uid: sop.into(),
            },
            site: "S".into(),
            region: "wrist".into(),
            score,
            threshold: 0.5,
            fracture: score >= 0.5,
            boxes: vec![],
            model_version: "v1".into(),
            model_trained: false,
        }
    }

    #[tokio::test]
    async fn replay_changes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let db = AuditDb::open(&format!("sqlite://{}", d.path().join("a.db").display()))
            .await
            .unwrap();
        let batch = [finding("2.25.10", 0.7), finding("2.25.11", 0.2)];
        db.record(&batch).await.unwrap();
        db.record(&batch).await.unwrap();
        assert_eq!(db.count().await.unwrap(), 2);
        assert_eq!(
            db.by_region().await.unwrap(),
            vec![RegionCount {
                region: "wrist".into(),
                radiographs: 2,
                positive: 1
            }]
        );
    }
}
