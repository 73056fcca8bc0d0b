//! The audit sink: every finding in a database, idempotent by SOP Instance UID + model version,
//! so replaying the findings topic changes nothing.

pub mod dashboard;
pub mod db;
pub mod drift;
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
    /// Alerts are also POSTed (JSON) here when set, e.g. `http://alerts.local/hook`.
    pub webhook: String,
    /// When drift is worth an alert.
    pub drift: drift::DriftConfig,
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
            webhook: String::new(),
            drift: drift::DriftConfig::default(),
        }
    }
}

/// The sink: findings and labels into the database, idempotently, and every labelled case
/// through the drift monitor, whose alerts leave on `fracture.alerts` in the same transaction.
pub struct AuditSink {
    pub db: AuditDb,
    pub drift: std::sync::Mutex<drift::DriftMonitor>,
    pub topics: fracture_shared::Topics,
    pub webhook: Option<String>,
    pub gauges: Option<Gauges>,
}

/// Prometheus gauges per region and site, refreshed after every batch.
#[derive(Clone)]
pub struct Gauges {
    sensitivity: prometheus::GaugeVec,
    lower_bound: prometheus::GaugeVec,
    labelled: prometheus::GaugeVec,
    label_delay: prometheus::GaugeVec,
    open_alerts: prometheus::GaugeVec,
}

impl Gauges {
    pub fn register(registry: &prometheus::Registry) -> Result<Self, prometheus::Error> {
        let g = |name: &str, help: &str| -> Result<prometheus::GaugeVec, prometheus::Error> {
            let v =
                prometheus::GaugeVec::new(prometheus::Opts::new(name, help), &["region", "site"])?;
            registry.register(Box::new(v.clone()))?;
            Ok(v)
        };
        Ok(Self {
            sensitivity: g(
                "fracture_audit_sensitivity",
                "Sensitivity over the rolling window",
            )?,
            lower_bound: g(
                "fracture_audit_sensitivity_lower_bound",
                "95% Wilson lower bound of the window's sensitivity",
            )?,
            labelled: g(
                "fracture_audit_labelled_cases",
                "Labelled cases in the rolling window",
            )?,
            label_delay: g(
                "fracture_audit_label_delay_ratio",
                "Share of findings overdue for a label",
            )?,
            open_alerts: g(
                "fracture_audit_open_alerts",
                "Drift alerts open for the key",
            )?,
        })
    }

    fn update(&self, stats: &[drift::KeyStats]) {
        for k in stats.iter().filter(|k| k.model_version.is_none()) {
            let labels = [k.region.as_str(), k.site.as_deref().unwrap_or("all")];
            if let Some(v) = k.sensitivity.value {
                self.sensitivity.with_label_values(&labels).set(v);
            }
            if let Some([lo, _]) = k.sensitivity.ci {
                self.lower_bound.with_label_values(&labels).set(lo);
            }
            self.labelled
                .with_label_values(&labels)
                .set(k.labelled as f64);
            if let Some(d) = k.label_delay {
                self.label_delay.with_label_values(&labels).set(d);
            }
            self.open_alerts
                .with_label_values(&labels)
                .set(k.open_kinds.len() as f64);
        }
    }
}

impl AuditSink {
    pub fn new(db: AuditDb, cfg: &AuditConfig, topics: fracture_shared::Topics) -> Self {
        Self {
            db,
            drift: std::sync::Mutex::new(drift::DriftMonitor::new(cfg.drift.clone())),
            topics,
            webhook: Some(cfg.webhook.trim().to_string()).filter(|w| !w.is_empty()),
            gauges: None,
        }
    }

    /// Replays what the database holds through the drift monitor (after a restart), without
    /// re-sending alerts that were already sent.
    pub async fn warm_up(&self) -> Result<usize, DbError> {
        let cases = self.db.cases(None, None).await?;
        let mut m = self.drift.lock().unwrap_or_else(|p| p.into_inner());
        for c in &cases {
            let _ = m.observe(c);
        }
        Ok(cases.len())
    }

    /// Runs the monitor over what this batch changed; returns the alerts it opened.
    async fn watch(
        &self,
        findings: &[Finding],
        labels: &[Label],
    ) -> Result<Vec<drift::DriftAlert>, DbError> {
        let mut touched: Vec<CaseRow> = Vec::new();
        for sop in findings
            .iter()
            .map(|f| &f.id.sop_instance_uid)
            .chain(labels.iter().map(|l| &l.sop_instance_uid))
        {
            touched.extend(self.db.cases_of(sop).await?);
        }
        let mut m = self.drift.lock().unwrap_or_else(|p| p.into_inner());
        let mut alerts = Vec::new();
        for c in &touched {
            alerts.extend(m.observe(c));
        }
        alerts.extend(m.check_label_delay(db::now_ms()));
        if let Some(g) = &self.gauges {
            g.update(&m.snapshot());
        }
        Ok(alerts)
    }
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
        let mut write: Result<(), DbError> = self.db.record(&findings).await;
        if write.is_ok() {
            write = self.db.record_labels(&labels).await;
        }
        let mut alerts = Vec::new();
        if write.is_ok() {
            match self.watch(&findings, &labels).await {
                Ok(a) => alerts = a,
                Err(e) => write = Err(e),
            }
        }
        let write = write.map_err(|e| StageError::external(e.to_string()));
        // The batch's alerts ride with its first good record, so they commit with the batch.
        let mut outputs: Vec<Output> = Vec::new();
        for a in &alerts {
            let scope = format!(
                "{}|{}|{}",
                a.region,
                a.site.as_deref().unwrap_or(""),
                a.model_version.as_deref().unwrap_or("")
            );
            let kind = serde_json::to_value(a.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            tracing::warn!(kind = %kind, region = %a.region, site = a.site.as_deref().unwrap_or(""), "drift alert: {}", a.message);
            let row = AlertRow {
                kind: kind.clone(),
                region: a.region.clone(),
                site: a.site.clone(),
                model_version: a.model_version.clone(),
                message: a.message.clone(),
                opened_ms: db::now_ms(),
            };
            if let Err(e) = self.db.record_alert(&scope, &row).await {
                tracing::error!(error = %e, "cannot store an alert");
            }
            let msg = fracture_shared::messages::Alert {
                schema: fracture_shared::messages::schema::ALERT.into(),
                kind,
                region: a.region.clone(),
                site: a.site.clone(),
                model_version: a.model_version.clone(),
                message: a.message.clone(),
            };
            if let Some(url) = &self.webhook {
                let body = serde_json::to_vec(&msg).unwrap_or_default();
                if let Err(e) = fracture_shared::http::post_json(url, &body).await {
                    tracing::warn!(error = %e, "alert webhook");
                }
            }
            outputs.push(Output::message(&self.topics, &scope, &msg));
        }
        let mut outputs = Some(outputs);
        decoded
            .into_iter()
            .map(|d| match d {
                Err(e) => Err(e),
                Ok(_) => write.clone().map(|()| outputs.take().unwrap_or_default()),
            })
            .collect()
    }
}

/// Runs the sink until shutdown: findings and labels (a late label joins its finding).
pub async fn run(env: &StageEnv, cfg: &AuditConfig, db: AuditDb) -> Result<(), StageFailed> {
    let mut sink = AuditSink::new(db, cfg, env.topics.clone());
    sink.gauges = Gauges::register(&env.metrics.registry).ok();
    match sink.warm_up().await {
        Ok(n) => tracing::info!(cases = n, "drift monitor warmed up from the database"),
        Err(e) => tracing::error!(error = %e, "drift monitor starts empty"),
    }
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
