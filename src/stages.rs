//! The stages as the binary starts them: what each is built from, and one way to run one
//! (`fracture serve <stage>`) or spawn several beside each other (`fracture scan`).

use std::path::PathBuf;
use std::sync::Arc;

use clap::ValueEnum;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use fracture_models::transform::TransformConfig;
use fracture_models::{Ensemble, Manifest};
use fracture_shared::stage::StageEnv;

use crate::config::Config;
use crate::wiring;

/// A stage of the pipeline, as `fracture serve` names it.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum Stage {
    Ingest,
    Preprocess,
    Ensemble,
    Postprocess,
    Audit,
    /// The export to the hospital's PACS: re-identified SR and SC at the edge.
    Export,
}

impl Stage {
    /// The name in the service name and the logs.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Ingest => fracture_ingest::STAGE,
            Stage::Preprocess => fracture_preprocess::STAGE,
            Stage::Ensemble => fracture_ensemble::STAGE,
            Stage::Postprocess => fracture_postprocess::STAGE,
            Stage::Audit => fracture_audit::STAGE,
            Stage::Export => fracture_export::STAGE,
        }
    }
}

/// One stage with everything it runs on besides its [`StageEnv`].
pub enum StageSpec {
    Ingest {
        cfg: Box<fracture_ingest::IngestConfig>,
        paths: Vec<PathBuf>,
    },
    Preprocess {
        cfg: fracture_preprocess::PreprocessConfig,
        transform: TransformConfig,
    },
    Ensemble {
        cfg: fracture_ensemble::EnsembleConfig,
        ensemble: Arc<Ensemble>,
    },
    Postprocess {
        cfg: fracture_postprocess::PostprocessConfig,
        manifest: Arc<Manifest>,
    },
    Audit {
        cfg: fracture_audit::AuditConfig,
        db: fracture_audit::AuditDb,
        /// The sink is its own process (`fracture serve audit`): it serves the dashboard on
        /// `cfg.dashboard_addr` and closes the database when it stops. In a scan the report
        /// reads the database after the stages stop.
        own_process: bool,
    },
    Export {
        cfg: fracture_export::ExportConfig,
    },
}

impl StageSpec {
    /// The stage as the configuration describes it, for `fracture serve`; `paths` are ingest's
    /// inputs.
    pub async fn from_config(stage: Stage, c: &Config, paths: &[PathBuf]) -> anyhow::Result<Self> {
        Ok(match stage {
            Stage::Ingest => StageSpec::Ingest {
                cfg: Box::new(c.ingest.clone()),
                paths: paths.to_vec(),
            },
            Stage::Preprocess => StageSpec::Preprocess {
                cfg: c.preprocess,
                transform: wiring::manifest(&c.model, None)?.transform,
            },
            Stage::Ensemble => StageSpec::Ensemble {
                cfg: c.ensemble,
                ensemble: wiring::ensemble(&c.model, None)?,
            },
            Stage::Postprocess => StageSpec::Postprocess {
                cfg: c.postprocess.clone(),
                manifest: Arc::new(wiring::manifest(&c.model, None)?),
            },
            Stage::Audit => {
                let cfg = c.audit.clone();
                let db = fracture_audit::AuditDb::open(&cfg.database).await?;
                StageSpec::Audit {
                    cfg,
                    db,
                    own_process: true,
                }
            }
            Stage::Export => {
                let cfg = c.export.clone();
                // A wrong PACS address or AE title is said at start, not at the first finding.
                cfg.validate()?;
                StageSpec::Export { cfg }
            }
        })
    }

    /// Runs the stage until `env.shutdown` is set or it fails.
    pub async fn run(self, env: &StageEnv) -> anyhow::Result<()> {
        match self {
            StageSpec::Ingest { cfg, paths } => fracture_ingest::run(env, &cfg, &paths).await?,
            StageSpec::Preprocess { cfg, transform } => {
                fracture_preprocess::run(env, &cfg, transform).await?
            }
            StageSpec::Ensemble { cfg, ensemble } => {
                fracture_ensemble::run(env, &cfg, ensemble).await?
            }
            StageSpec::Postprocess { cfg, manifest } => {
                fracture_postprocess::run(env, &cfg, manifest).await?
            }
            StageSpec::Audit {
                cfg,
                db,
                own_process,
            } => {
                if own_process && !cfg.dashboard_addr.is_empty() {
                    let addr = fracture_audit::serve_dashboard(&cfg, db.clone()).await?;
                    tracing::info!(%addr, token = !cfg.dashboard_token.is_empty(), "audit dashboard");
                }
                let result = fracture_audit::run(env, &cfg, db.clone()).await;
                if own_process {
                    db.close().await;
                }
                result?
            }
            StageSpec::Export { cfg } => fracture_export::run(env, &cfg).await?,
        }
        Ok(())
    }
}

/// Spawns `spec` on `env`; if it fails, its error (the whole chain) is sent on `failed`.
pub fn spawn_stage(
    spec: StageSpec,
    env: StageEnv,
    failed: watch::Sender<Option<String>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = spec.run(&env).await {
            let _ = failed.send(Some(format!("{e:#}")));
        }
    })
}
