//! The post-processing stage: the region's threshold decides, the probability map gives boxes,
//! and the result goes out as a finding, a DICOM SR and a DICOM Secondary Capture.

pub mod dicom;
pub mod font;
pub mod sc;
pub mod sr;
pub mod study;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use fracture_models::Manifest;
use fracture_shared::bus::Record;
use fracture_shared::error::{ErrorKind, StageError};
use fracture_shared::messages::{decode, schema, BlobRef, Finding, Scored};
use fracture_shared::pixels;
use fracture_shared::stage::{
    bytes_to_f32, BatchConfig, Output, RecordHandler, StageEnv, StageFailed,
};
use fracture_shared::store::BlobStore;
use fracture_shared::Topics;

pub use fracture_models::boxes::BoxConfig;
pub use study::StudyConfig;

pub const STAGE: &str = "postprocess";

/// `[postprocess]`
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostprocessConfig {
    pub batch: BatchConfig,
    pub boxes: BoxConfig,
    /// Write a DICOM Comprehensive SR (TID 1500) and a Secondary Capture with the boxes drawn for
    /// every radiograph, to the claim-check store, referenced from the finding.
    pub dicom_outputs: bool,
    pub studies: StudyConfig,
}

impl Default for PostprocessConfig {
    fn default() -> Self {
        Self {
            batch: BatchConfig::default(),
            boxes: BoxConfig::default(),
            dicom_outputs: true,
            studies: StudyConfig::default(),
        }
    }
}

/// The DICOM outputs of one result, as Part 10 files.
#[derive(Debug, Clone)]
pub struct DicomOutputs {
    pub uids: dicom::OutputUids,
    pub sr: Vec<u8>,
    pub sc: Vec<u8>,
}

/// Builds the SR and the Secondary Capture of `finding` from the de-identified source object.
/// CPU-bound (pixel decoding and drawing): call it on the blocking pool.
pub fn dicom_outputs(source: &[u8], finding: &Finding) -> Result<DicomOutputs, StageError> {
    let obj = pixels::read_object(source)?;
    let src = dicom::Source::read(&obj)?;
    let uids = dicom::OutputUids::new(
        &src.study_instance_uid,
        &src.sop_instance_uid,
        &finding.model_version,
    );
    let (_, sr) = dicom::to_part10(sr::structured_report(&src, finding, &uids))?;
    let image = pixels::decode(&obj)?;
    let (rgb, banner) = sc::overlay(&image, finding);
    let (_, sc) = dicom::to_part10(sc::secondary_capture(&src, finding, &uids, &rgb, banner)?)?;
    Ok(DicomOutputs { uids, sr, sc })
}

pub struct Postprocess {
    pub store: BlobStore,
    pub topics: Topics,
    pub manifest: Arc<Manifest>,
    pub cfg: PostprocessConfig,
}

impl Postprocess {
    /// Writes the SR and the Secondary Capture to the store. An outage is returned (the record is
    /// retried); anything else is logged and the finding goes out without them: a result a
    /// clinician needs is never held back for its DICOM rendering.
    async fn write_dicom(
        &self,
        finding: &Finding,
        source: &BlobRef,
    ) -> Result<Option<(BlobRef, BlobRef)>, StageError> {
        let f = finding.clone();
        let made = match self.store.get(source).await {
            Ok(bytes) => tokio::task::spawn_blocking(move || dicom_outputs(&bytes, &f))
                .await
                .map_err(|e| StageError::internal(format!("DICOM output task panicked: {e}")))
                .and_then(|r| r),
            Err(e) => Err(StageError::from(e)),
        };
        let out = match made {
            Ok(out) => out,
            Err(e) if e.kind == ErrorKind::External => return Err(e),
            Err(e) => {
                tracing::warn!(kind = ?e.kind, reason = %e.message, "no DICOM SR/SC for this radiograph");
                return Ok(None);
            }
        };
        let sr = self
            .store
            .put(Bytes::from(out.sr), "application/dicom")
            .await?;
        let sc = self
            .store
            .put(Bytes::from(out.sc), "application/dicom")
            .await?;
        Ok(Some((sr, sc)))
    }
}

#[async_trait]
impl RecordHandler for Postprocess {
    async fn one(&self, record: &Record) -> Result<Vec<Output>, StageError> {
        let msg: Scored = decode(&record.payload).map_err(StageError::data)?;
        if msg.model_version != self.manifest.model_version {
            return Err(StageError::data(format!(
                "scored by model {} but this post-processor holds the thresholds of {}; deploy the same manifest to both stages",
                msg.model_version, self.manifest.model_version
            )));
        }
        if !msg.score.is_finite() {
            return Err(StageError::data(format!(
                "score {} is not a number",
                msg.score
            )));
        }
        let threshold = self.manifest.score_threshold(&msg.region);
        // On or above the threshold counts as positive, as in the paper.
        let fracture = msg.score >= threshold;
        let boxes = match (&msg.map, fracture) {
            (Some(map), true) => {
                let map = bytes_to_f32(&self.store.get(map).await?)?;
                let side = msg.map_size as usize;
                if map.len() != side * side {
                    return Err(StageError::data(format!(
                        "the probability map holds {} values but map_size says {side}x{side}: \
                         the ensemble stage wrote a wrong map or size",
                        map.len()
                    )));
                }
                let g = &msg.geometry;
                let placement = fracture_models::Placement {
                    crop: g.crop,
                    scale: g.scale,
                    size: g.size as usize,
                };
                fracture_models::boxes::boxes(
                    &map,
                    msg.map_size as usize,
                    self.manifest.map_threshold(&msg.region),
                    true,
                    &placement,
                    &self.cfg.boxes,
                )
                .into_iter()
                .map(|b| fracture_shared::messages::BoundingBox {
                    x0: b.x0,
                    y0: b.y0,
                    x1: b.x1,
                    y1: b.y1,
                    score: b.score,
                })
                .collect()
            }
            _ => Vec::new(),
        };
        let mut finding = Finding {
            schema: schema::FINDING.into(),
            id: msg.id,
            site: msg.site,
            region: msg.region,
            score: msg.score,
            threshold,
            fracture,
            boxes,
            model_version: msg.model_version,
            model_trained: msg.model_trained,
            sr: None,
            sc: None,
        };
        if let (true, Some(source)) = (self.cfg.dicom_outputs, &msg.dicom) {
            if let Some((sr, sc)) = self.write_dicom(&finding, source).await? {
                finding.sr = Some(Box::new(sr));
                finding.sc = Some(Box::new(sc));
            }
        }
        Ok(vec![Output::message(
            &self.topics,
            &finding.id.study_instance_uid.clone(),
            &finding,
        )])
    }
}

/// Runs the stage until shutdown: the findings, and (when enabled) the study summaries beside
/// them. (The export to a PACS is its own stage: `fracture serve export`.)
pub async fn run(
    env: &StageEnv,
    cfg: &PostprocessConfig,
    manifest: Arc<Manifest>,
) -> Result<(), StageFailed> {
    let handler = Postprocess {
        store: env.store.clone(),
        topics: env.topics.clone(),
        manifest,
        cfg: cfg.clone(),
    };
    let findings = env.consume(STAGE, env.topics.of::<Scored>(), cfg.batch, &handler);
    // Like the findings consumer, a summariser whose clients died starts over with new ones.
    let studies = async {
        if !cfg.studies.enabled {
            return Ok(());
        }
        env.retry
            .retry("study summaries: the bus failed; starting over")
            .until(&env.shutdown)
            .run(|| study::run(env, &cfg.studies), |_| true)
            .await
    };
    // Any one failing stops the stage (its supervisor restarts it); a clean stop waits for all.
    tokio::try_join!(findings, studies).map(drop)
}
