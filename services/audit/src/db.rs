//! The audit database: findings, labels and alerts, in SQLite (embedded default, one file) or
//! PostgreSQL (a health system's server), through one portable schema and one set of queries.
//!
//! Findings are upserted by (SOP Instance UID, model version) and labels by SOP Instance UID, so
//! replaying a topic changes nothing.

use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use fracture_shared::messages::{Finding, Label};

#[derive(Debug, Clone, thiserror::Error)]
#[error("audit database: {0}")]
pub struct DbError(pub String);

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

/// A finding joined with its label (if one has arrived): the drift monitor's own case type.
pub use crate::drift::Case as CaseRow;

/// Findings joined with their labels; callers add WHERE and ORDER BY.
const CASES: &str = "SELECT f.sop_instance_uid, f.site, f.region, f.model_version, f.score, f.fracture, l.fracture, f.recorded_ms, l.labelled_ms
     FROM findings f LEFT JOIN labels l ON l.sop_instance_uid = f.sop_instance_uid";

/// An alert as stored (open until closed).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AlertRow {
    pub kind: String,
    pub region: String,
    pub site: Option<String>,
    pub model_version: Option<String>,
    pub message: String,
    pub opened_ms: i64,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Clone)]
pub struct AuditDb {
    pool: AnyPool,
}

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS findings (
        sop_instance_uid TEXT NOT NULL,
        model_version TEXT NOT NULL,
        study_instance_uid TEXT NOT NULL,
        input TEXT NOT NULL,
        site TEXT NOT NULL,
        region TEXT NOT NULL,
        score DOUBLE PRECISION NOT NULL,
        threshold DOUBLE PRECISION NOT NULL,
        fracture BIGINT NOT NULL,
        boxes TEXT NOT NULL,
        model_trained BIGINT NOT NULL,
        recorded_ms BIGINT NOT NULL,
        PRIMARY KEY (sop_instance_uid, model_version)
    )",
    "CREATE TABLE IF NOT EXISTS labels (
        sop_instance_uid TEXT PRIMARY KEY,
        fracture BIGINT NOT NULL,
        region TEXT,
        boxes TEXT NOT NULL,
        labelled_ms BIGINT NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS alerts (
        kind TEXT NOT NULL,
        scope TEXT NOT NULL,
        region TEXT NOT NULL,
        site TEXT,
        model_version TEXT,
        message TEXT NOT NULL,
        opened_ms BIGINT NOT NULL,
        PRIMARY KEY (kind, scope, opened_ms)
    )",
    "CREATE INDEX IF NOT EXISTS findings_region ON findings (region, recorded_ms)",
];

impl AuditDb {
    /// `sqlite://PATH` (created if missing) or `postgres://user@host:port/db`.
    pub async fn open(url: &str) -> Result<Self, DbError> {
        sqlx::any::install_default_drivers();
        let url = url.trim();
        let url = if url.starts_with("sqlite:") && !url.contains('?') {
            format!("{url}?mode=rwc")
        } else if url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://")
        {
            url.to_string()
        } else {
            return Err(DbError(format!(
                "{url:?} is not a database URL: use sqlite://PATH or postgres://USER@HOST:PORT/DB"
            )));
        };
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(std::time::Duration::from_secs(30))
            .connect(&url)
            .await
            .map_err(|e| DbError(format!("cannot open {}: {e}", redact(&url))))?;
        if url.starts_with("sqlite:") {
            // Readers (the dashboard) must not block the sink's writes.
            sqlx::query("PRAGMA journal_mode=WAL")
                .execute(&pool)
                .await?;
            sqlx::query("PRAGMA busy_timeout=10000")
                .execute(&pool)
                .await?;
        }
        for stmt in SCHEMA {
            sqlx::query(*stmt).execute(&pool).await?;
        }
        Ok(Self { pool })
    }

    /// Upserts findings in one transaction; a replay leaves the rows as they were.
    pub async fn record(&self, findings: &[Finding]) -> Result<(), DbError> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        for f in findings {
            sqlx::query(
                "INSERT INTO findings (sop_instance_uid, model_version, study_instance_uid, input, site, region, score, threshold, fracture, boxes, model_trained, recorded_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                 ON CONFLICT (sop_instance_uid, model_version) DO UPDATE SET
                   study_instance_uid = excluded.study_instance_uid, input = excluded.input, site = excluded.site,
                   region = excluded.region, score = excluded.score, threshold = excluded.threshold,
                   fracture = excluded.fracture, boxes = excluded.boxes, model_trained = excluded.model_trained",
            )
            .bind(f.id.sop_instance_uid.clone())
            .bind(f.model_version.clone())
            .bind(f.id.study_instance_uid.clone())
            .bind(f.id.input.clone())
            .bind(f.site.clone())
            .bind(f.region.clone())
            .bind(f.score as f64)
            .bind(f.threshold as f64)
            .bind(f.fracture as i64)
            .bind(serde_json::to_string(&f.boxes).unwrap_or_else(|_| "[]".into()))
            .bind(f.model_trained as i64)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Upserts labels (a corrected read replaces the earlier one; a replay changes nothing).
    pub async fn record_labels(&self, labels: &[Label]) -> Result<(), DbError> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        for l in labels {
            sqlx::query(
                "INSERT INTO labels (sop_instance_uid, fracture, region, boxes, labelled_ms) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (sop_instance_uid) DO UPDATE SET fracture = excluded.fracture, region = excluded.region, boxes = excluded.boxes",
            )
            .bind(l.sop_instance_uid.clone())
            .bind(l.fracture as i64)
            .bind(l.region.clone())
            .bind(serde_json::to_string(&l.boxes).unwrap_or_else(|_| "[]".into()))
            .bind(now)
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
            .try_get::<i64, _>(0)?)
    }

    pub async fn count_labels(&self) -> Result<i64, DbError> {
        Ok(sqlx::query("SELECT COUNT(*) FROM labels")
            .fetch_one(&self.pool)
            .await?
            .try_get::<i64, _>(0)?)
    }

    pub async fn by_region(&self) -> Result<Vec<RegionCount>, DbError> {
        let rows = sqlx::query(
            "SELECT region, COUNT(*) AS n, CAST(COALESCE(SUM(fracture), 0) AS BIGINT) AS pos FROM findings GROUP BY region ORDER BY region",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(RegionCount {
                    region: r.try_get(0)?,
                    radiographs: r.try_get(1)?,
                    positive: r.try_get(2)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(DbError::from)
    }

    /// Findings with their labels, oldest first, optionally for one site and/or model version.
    pub async fn cases(
        &self,
        site: Option<&str>,
        model_version: Option<&str>,
    ) -> Result<Vec<CaseRow>, DbError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{CASES} WHERE ($1 = '' OR f.site = $2) AND ($3 = '' OR f.model_version = $4)
             ORDER BY f.recorded_ms, f.sop_instance_uid"
        )))
        .bind(site.unwrap_or("").to_string())
        .bind(site.unwrap_or("").to_string())
        .bind(model_version.unwrap_or("").to_string())
        .bind(model_version.unwrap_or("").to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(case_row)
            .collect::<Result<_, sqlx::Error>>()
            .map_err(DbError::from)
    }

    /// The findings (one per model version) of one radiograph, with its label.
    pub async fn cases_of(&self, sop_instance_uid: &str) -> Result<Vec<CaseRow>, DbError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{CASES} WHERE f.sop_instance_uid = $1"
        )))
        .bind(sop_instance_uid.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(case_row)
            .collect::<Result<_, sqlx::Error>>()
            .map_err(DbError::from)
    }

    pub async fn distinct(&self, column: Column) -> Result<Vec<String>, DbError> {
        let q = match column {
            Column::Site => "SELECT DISTINCT site FROM findings ORDER BY site",
            Column::ModelVersion => {
                "SELECT DISTINCT model_version FROM findings ORDER BY model_version"
            }
        };
        let rows = sqlx::query(q).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| r.try_get::<String, _>(0))
            .collect::<Result<_, _>>()
            .map_err(DbError::from)
    }

    /// Records an alert once (idempotent by kind, scope and opening time).
    pub async fn record_alert(&self, scope: &str, a: &AlertRow) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO alerts (kind, scope, region, site, model_version, message, opened_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (kind, scope, opened_ms) DO NOTHING",
        )
        .bind(a.kind.clone())
        .bind(scope.to_string())
        .bind(a.region.clone())
        .bind(a.site.clone())
        .bind(a.model_version.clone())
        .bind(a.message.clone())
        .bind(a.opened_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn alerts(&self) -> Result<Vec<AlertRow>, DbError> {
        let rows = sqlx::query("SELECT kind, region, site, model_version, message, opened_ms FROM alerts ORDER BY opened_ms DESC")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(AlertRow {
                    kind: r.try_get(0)?,
                    region: r.try_get(1)?,
                    site: r.try_get(2)?,
                    model_version: r.try_get(3)?,
                    message: r.try_get(4)?,
                    opened_ms: r.try_get(5)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(DbError::from)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Column {
    Site,
    ModelVersion,
}

fn case_row(r: &AnyRow) -> Result<CaseRow, sqlx::Error> {
    Ok(CaseRow {
        sop_instance_uid: r.try_get(0)?,
        site: r.try_get(1)?,
        region: r.try_get(2)?,
        model_version: r.try_get(3)?,
        score: r.try_get(4)?,
        called_positive: r.try_get::<i64, _>(5)? != 0,
        label: r.try_get::<Option<i64>, _>(6)?.map(|v| v != 0),
        recorded_ms: r.try_get(7)?,
        labelled_ms: r.try_get(8)?,
    })
}

/// A database URL without its password, for messages and logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}
