//! Export back to the hospital: each finding's DICOM SR and Secondary Capture, re-identified at
//! the edge with ingest's linkage table, sent by C-STORE to the PACS of `[export]`.
//!
//! **Where it runs.** `fracture serve export`, its own stage at the hospital's edge (where the
//! linkage table is), consuming `fracture.findings` (consumer group `<prefix>.export`,
//! transactional id `<prefix>.export.<instance>`) beside post-processing, never inside it. Inside
//! post-processing's handler, a PACS that is down would hold back every finding (and so the
//! clinician's answer, the audit and the study summaries) behind the export, which DESIGN.md
//! rules out: a result is never held back for its DICOM rendering, nor for its delivery to a PACS.
//! As a separate consumer, the export is only as late as the PACS makes it, and the same delivery
//! guarantee holds for it: its offset is committed only after a batch's exports have finished, so
//! a PACS outage, a crash or a restart loses no finding (it comes again from the committed offset).
//!
//! **Idempotent by SOP Instance UID.** The SR's and SC's SOP Instance UIDs are derived from the
//! finding's pseudonymous study and SOP Instance UIDs and the model version
//! ([`OutputUids`], the derivation post-processing writes them with), so a re-run of the pipeline
//! or a finding delivered twice names the same objects. The [`ledger::Ledger`] (SQLite at the
//! edge) records each object before it is sent and the PACS's status once it answers; an object
//! the ledger has finished is not sent again, only counted as a redelivery. The one window left (a
//! crash after the PACS stored an object and before its status was recorded) sends it again under
//! the same SOP Instance UID, which a PACS keeps once, and the ledger counts the second send.
//!
//! **When the PACS is down** (no connection, association rejected or aborted, a timeout, or an
//! out-of-resources status), the finding fails as an external error: the stage runner retries it
//! with the `[retry]` policy's capped exponential backoff (`base_ms` doubling up to `cap_ms`), as
//! long as it takes, without committing. A PACS that refuses an object for good (any other failure
//! status) gets it recorded as refused in the ledger and counted; it is not retried.
//!
//! **What is not exported**, with a warning and `fracture_export_skipped_total{reason}`: a finding
//! whose radiograph has no linkage row (`no_linkage`: ingested by another edge, or the linkage
//! table configured here is not ingest's), and one without an SR and SC (`no_dicom`:
//! `postprocess.dicom_outputs` off, or its source could not be rendered).
//!
//! **PHI** exists only in memory here, between the linkage table and the PACS: logs, metrics and
//! errors name pseudonymous UIDs, the PACS's address and status codes, never an original value.

pub mod config;
pub mod ledger;
pub mod scu;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use prometheus::{IntCounterVec, Opts};

use fracture_edge::linkage::LinkageReader;
use fracture_edge::reid;
use fracture_shared::bus::{BusError, Record};
use fracture_shared::dicom_outputs::OutputUids;
use fracture_shared::error::StageError;
use fracture_shared::messages::{decode, BlobRef, Finding};
use fracture_shared::stage::{Output, RecordHandler, StageEnv, StageFailed};
use fracture_shared::store::BlobStore;

pub use config::ExportConfig;
use ledger::{Ledger, State};
use scu::{Pacs, Status};

/// The stage's name: `fracture serve export`, its consumer group, transactional id and metrics
/// label.
pub const STAGE: &str = "export";

/// The export's counters, on the stage's registry.
#[derive(Clone)]
pub struct ExportMetrics {
    /// `fracture_exported_objects_total{kind,outcome}`: SR/SC objects by outcome: `stored`
    /// (the PACS holds it), `refused` (for good), `already_sent` (a redelivery: the ledger had
    /// finished it, nothing was sent).
    pub objects: IntCounterVec,
    /// `fracture_export_skipped_total{reason}`: findings not exported (`no_linkage`, `no_dicom`,
    /// `other_site`).
    pub skipped: IntCounterVec,
}

impl ExportMetrics {
    pub fn new(registry: &prometheus::Registry) -> Self {
        let objects = IntCounterVec::new(
            Opts::new(
                "fracture_exported_objects_total",
                "DICOM results sent to the PACS, by kind and outcome",
            ),
            &["kind", "outcome"],
        )
        .expect("valid metric");
        let skipped = IntCounterVec::new(
            Opts::new(
                "fracture_export_skipped_total",
                "Findings not exported to the PACS, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        for c in [&objects, &skipped] {
            // Registered once per process; a second exporter in it shares the first's.
            let _ = registry.register(Box::new(c.clone()));
        }
        Self { objects, skipped }
    }
}

/// What became of one finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exported {
    /// Its SR and SC are in the PACS (`sent` of them by this call).
    Done { sent: usize },
    /// No linkage row: not exported.
    NoLinkage,
    /// No SR or SC to export.
    NoDicom,
    /// Another site's: not this edge's to send.
    OtherSite,
}

/// One DICOM result of a finding.
struct Object {
    kind: &'static str,
    blob: BlobRef,
    sop_instance_uid: String,
}

/// The export consumer's handler.
pub struct Exporter {
    pub pacs: Pacs,
    /// DICOM TLS to the PACS, when configured.
    pub tls: Option<scu::Tls>,
    pub cfg: ExportConfig,
    pub store: BlobStore,
    pub linkage: LinkageReader,
    pub ledger: Ledger,
    pub metrics: ExportMetrics,
}

fn external(e: impl std::fmt::Display) -> StageError {
    StageError::external(e.to_string())
}

/// Why the export could not start: a setting, or its ledger.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Setting(#[from] fracture_shared::config::SettingError),
    #[error(transparent)]
    Ledger(#[from] fracture_edge::db::EdgeDbError),
}

impl Exporter {
    /// Opens the ledger; the linkage table is opened at the first lookup.
    pub async fn open(
        cfg: &ExportConfig,
        store: BlobStore,
        registry: &prometheus::Registry,
    ) -> Result<Self, OpenError> {
        let pacs = cfg.validate()?;
        let tls = cfg.tls_setup(&pacs)?;
        let ledger = Ledger::open(&PathBuf::from(&cfg.ledger)).await?;
        Ok(Self {
            pacs,
            tls,
            cfg: cfg.clone(),
            store,
            linkage: LinkageReader::new(&PathBuf::from(&cfg.linkage)),
            ledger,
            metrics: ExportMetrics::new(registry),
        })
    }

    /// Exports one finding's SR and SC (what the ledger has not finished).
    pub async fn export(&self, finding: &Finding) -> Result<Exported, StageError> {
        if !self.cfg.site_code.is_empty() && finding.site != self.cfg.site_code {
            // Before anything of it is read or logged: another site's pseudonyms stay out of
            // this edge's linkage lookups, ledger and logs.
            self.metrics
                .skipped
                .with_label_values(&["other_site"])
                .inc();
            return Ok(Exported::OtherSite);
        }
        let id = &finding.id;
        let uids = OutputUids::new(
            &id.study_instance_uid,
            &id.sop_instance_uid,
            &finding.model_version,
        );
        let objects: Vec<Object> = [
            ("sr", &finding.sr, uids.sr_instance),
            ("sc", &finding.sc, uids.sc_instance),
        ]
        .into_iter()
        .filter_map(|(kind, blob, sop_instance_uid)| {
            blob.as_deref().map(|b| Object {
                kind,
                blob: b.clone(),
                sop_instance_uid,
            })
        })
        .collect();
        if objects.is_empty() {
            tracing::warn!(sop_instance_uid = %id.sop_instance_uid, "finding has no DICOM SR or SC to export (postprocess.dicom_outputs is off, or its radiograph could not be rendered)");
            self.metrics.skipped.with_label_values(&["no_dicom"]).inc();
            return Ok(Exported::NoDicom);
        }
        let mut todo = Vec::new();
        for o in objects {
            match self
                .ledger
                .state(&o.sop_instance_uid)
                .await
                .map_err(external)?
            {
                Some(State::Stored | State::Refused) => {
                    self.ledger
                        .redelivered(&o.sop_instance_uid)
                        .await
                        .map_err(external)?;
                    self.metrics
                        .objects
                        .with_label_values(&[o.kind, "already_sent"])
                        .inc();
                    tracing::debug!(sop_instance_uid = %id.sop_instance_uid, kind = o.kind, object = %o.sop_instance_uid, "already exported, not sent again");
                }
                Some(State::Pending) | None => todo.push(o),
            }
        }
        if todo.is_empty() {
            return Ok(Exported::Done { sent: 0 });
        }
        let Some(link) = self
            .linkage
            .lookup(&id.sop_instance_uid)
            .await
            .map_err(external)?
        else {
            tracing::warn!(
                sop_instance_uid = %id.sop_instance_uid,
                linkage = %self.linkage.path().display(),
                "not exported: this radiograph has no row in the linkage table (ingested by another edge, or export.linkage is not the table ingest writes)"
            );
            self.metrics
                .skipped
                .with_label_values(&["no_linkage"])
                .inc();
            return Ok(Exported::NoLinkage);
        };
        // Re-identified in memory, on the blocking pool (a Secondary Capture is megabytes).
        let link = Arc::new(link);
        let mut ready = Vec::with_capacity(todo.len());
        for o in todo {
            let bytes = self.store.get(&o.blob).await?;
            let l = link.clone();
            let obj = tokio::task::spawn_blocking(move || reid::reidentify(&bytes, &l))
                .await
                .map_err(|e| StageError::internal(format!("re-identification panicked: {e}")))??;
            let actual = obj
                .meta()
                .media_storage_sop_instance_uid()
                .trim_end_matches('\0');
            if actual != o.sop_instance_uid {
                return Err(StageError::data(format!(
                    "the {} of this finding has SOP Instance UID {actual}, not the {} derived from the finding; it was not written by this release's post-processing",
                    o.kind, o.sop_instance_uid
                )));
            }
            ready.push((o, obj));
        }
        let pacs = self.pacs.to_string();
        let mut assoc = scu::connect(
            &self.pacs,
            &self.cfg.calling_ae_title,
            self.tls.as_ref(),
            Duration::from_millis(self.cfg.connect_timeout_ms),
            Duration::from_millis(self.cfg.timeout_ms),
        )
        .await
        .map_err(|e| StageError::external(format!("cannot export to the PACS: {e}")))?;
        let mut sent = 0;
        let mut result = Ok(());
        for (o, obj) in &ready {
            self.ledger
                .sending(&o.sop_instance_uid, o.kind, &id.sop_instance_uid, &pacs)
                .await
                .map_err(external)?;
            let code = match assoc.store(obj).await {
                Ok(code) => code,
                Err(e) => {
                    result = Err(StageError::external(format!(
                        "cannot export to the PACS: {e}"
                    )));
                    break;
                }
            };
            let (state, outcome) = match Status::of(code) {
                Status::Stored(_) => (State::Stored, "stored"),
                Status::Refused(_) => (State::Refused, "refused"),
                Status::Busy(_) => {
                    result = Err(StageError::external(format!(
                        "the PACS {pacs} cannot take objects now (status {code:#06x}); retrying"
                    )));
                    break;
                }
            };
            self.ledger
                .finished(&o.sop_instance_uid, state, code)
                .await
                .map_err(external)?;
            self.metrics
                .objects
                .with_label_values(&[o.kind, outcome])
                .inc();
            if state == State::Refused {
                tracing::warn!(sop_instance_uid = %id.sop_instance_uid, kind = o.kind, object = %o.sop_instance_uid, status = format_args!("{code:#06x}"), %pacs, "the PACS refused an exported object; it is recorded in the ledger and not sent again");
            } else {
                sent += 1;
                tracing::info!(sop_instance_uid = %id.sop_instance_uid, kind = o.kind, object = %o.sop_instance_uid, status = format_args!("{code:#06x}"), %pacs, "exported");
            }
        }
        assoc.release().await;
        result.map(|()| Exported::Done { sent })
    }
}

#[async_trait]
impl RecordHandler for Exporter {
    async fn one(&self, record: &Record) -> Result<Vec<Output>, StageError> {
        let finding: Finding = decode(&record.payload).map_err(StageError::data)?;
        self.export(&finding).await?;
        // Nothing to publish: the consumer only commits its offset once this has succeeded.
        Ok(Vec::new())
    }
}

/// Runs the export consumer until shutdown. The ledger is waited for (with the `[retry]`
/// backoff) if it cannot be opened at start, so an edge volume that mounts late loses nothing.
pub async fn run(env: &StageEnv, cfg: &ExportConfig) -> Result<(), StageFailed> {
    let fatal = |m: String| StageFailed {
        stage: STAGE,
        source: BusError::Fatal(m),
    };
    let pacs = cfg.validate().map_err(|e| fatal(e.0))?;
    // A TLS setting that cannot work stops the stage at once, not at the first finding.
    cfg.tls_setup(&pacs).map_err(|e| fatal(e.0))?;
    let opened = env
        .retry
        .retry("the export cannot open its ledger")
        .until(&env.shutdown)
        .run(
            || Exporter::open(cfg, env.store.clone(), &env.metrics.registry),
            |e| matches!(e, OpenError::Ledger(_)),
        )
        .await;
    let exporter = match opened {
        Ok(e) => e,
        Err(_) if env.shutdown.is_set() => return Ok(()),
        Err(e) => return Err(fatal(e.to_string())),
    };
    tracing::info!(%pacs, calling_ae = %cfg.calling_ae_title, linkage = %cfg.linkage, ledger = %cfg.ledger, "exporting findings to the PACS");
    if cfg.site_code.is_empty() {
        env.consume(STAGE, env.topics.of::<Finding>(), cfg.batch, &exporter)
            .await
    } else {
        // Every site's export sees every finding: a group shared between sites would hand each
        // only some partitions, and the other sites' results on them would never go home.
        let group = format!("{STAGE}.{}", cfg.site_code);
        env.consume_in(
            STAGE,
            &group,
            vec![env.topics.of::<Finding>()],
            cfg.batch,
            &exporter,
        )
        .await
    }
}
