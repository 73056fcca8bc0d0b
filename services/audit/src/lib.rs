//! The audit sink: every finding in a database, idempotent by SOP Instance UID + model version,
//! so replaying the findings topic changes nothing.

pub mod dashboard;
pub mod db;
pub mod evaluate;
pub mod view;

use async_trait::async_trait;

use fracture_shared::bus::Record;
use fracture_shared::error::StageError;
use fracture_shared::messages::{decode, Finding, Label};
use fracture_shared::stage::{BatchConfig, Handler, Output, StageEnv, StageFailed};

pub use db::{AlertRow, AuditDb, CaseRow, DbError, RegionCount};

pub const STAGE: &str = "audit";

/// `[audit]`
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// `sqlite://PATH` (created if missing) or `postgres://USER@HOST:PORT/DB`.
    pub database: String,
    pub batch: BatchConfig,
    /// Where `fracture serve audit` serves the dashboard; empty disables it.
    pub dashboard_addr: String,
    /// Bearer token for the dashboard. Without one it binds to loopback only.
    pub dashboard_token: String,
    /// The sensitivity floor drawn on the dashboard (the calibration target minus 5 points).
    pub sensitivity_floor: f64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            database: "sqlite://fracture-audit.db".into(),
            batch: BatchConfig {
                max: 64,
                linger_ms: 20,
            },
            dashboard_addr: "127.0.0.1:9180".into(),
            dashboard_token: String::new(),
            sensitivity_floor: 0.875,
        }
    }
}

/// The sink: findings and labels into the database, idempotently.
pub struct AuditSink {
    pub db: AuditDb,
}

enum Item {
    Finding(Finding),
    Label(Label),
}

#[async_trait]
impl Handler for AuditSink {
    async fn handle(&self, batch: &[Record]) -> Vec<Result<Vec<Output>, StageError>> {
        let decoded: Vec<Result<Item, StageError>> = batch
            .iter()
            .map(|r| {
                if r.topic.ends_with(".labels") {
                    decode::<Label>(&r.payload)
                        .map(Item::Label)
                        .map_err(StageError::data)
                } else {
                    decode::<Finding>(&r.payload)
                        .map(Item::Finding)
                        .map_err(StageError::data)
                }
            })
            .collect();
        let findings: Vec<Finding> = decoded
            .iter()
            .filter_map(|d| match d {
                Ok(Item::Finding(f)) => Some(f.clone()),
                _ => None,
            })
            .collect();
        let labels: Vec<Label> = decoded
            .iter()
            .filter_map(|d| match d {
                Ok(Item::Label(l)) => Some(l.clone()),
                _ => None,
            })
            .collect();
        let mut write = self.db.record(&findings).await;
        if write.is_ok() {
            write = self.db.record_labels(&labels).await;
        }
        let write = write.map_err(|e| StageError::external(e.to_string()));
        decoded
            .into_iter()
            .map(|d| match d {
                Err(e) => Err(e),
                Ok(_) => write.clone().map(|()| Vec::new()),
            })
            .collect()
    }
}

/// Runs the sink until shutdown: findings and labels (a late label joins its finding).
pub async fn run(env: &StageEnv, cfg: &AuditConfig, db: AuditDb) -> Result<(), StageFailed> {
    let sink = AuditSink { db };
    env.consume_many(
        STAGE,
        vec![env.topics.of::<Finding>(), env.topics.of::<Label>()],
        cfg.batch,
        &sink,
    )
    .await
}

/// Serves the dashboard from the database (see [`view::dashboard`]); returns the bound address.
pub async fn serve_dashboard(
    cfg: &AuditConfig,
    db: AuditDb,
) -> std::io::Result<std::net::SocketAddr> {
    let floor = cfg.sensitivity_floor;
    let source: dashboard::Source = std::sync::Arc::new(move |site, model_version| {
        let db = db.clone();
        // The router calls this on a blocking thread, where waiting on the queries is fine.
        {
            tokio::runtime::Handle::current().block_on(async move {
                match view::dashboard(&db, site.clone(), model_version.clone(), floor).await {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::error!(error = %e, "dashboard query");
                        dashboard::DashboardData {
                            generated_at: format!("database unavailable: {e}"),
                            model_versions: vec![],
                            sites: vec![],
                            filter_site: site,
                            filter_model_version: model_version,
                            floor,
                            regions: vec![],
                            series: vec![],
                            roc: vec![],
                            alerts: vec![],
                        }
                    }
                }
            })
        }
    });
    let token = Some(cfg.dashboard_token.trim().to_string()).filter(|t| !t.is_empty());
    let configured = token.is_some();
    dashboard::serve(
        &cfg.dashboard_addr,
        dashboard::router(source, token),
        configured,
    )
    .await
}
