//! The post-processing stage: the region's threshold decides, the probability map gives boxes.

pub mod boxes;

use std::sync::Arc;

use async_trait::async_trait;

use fracture_models::Manifest;
use fracture_shared::bus::Record;
use fracture_shared::error::StageError;
use fracture_shared::messages::{decode, schema, Finding, Scored};
use fracture_shared::stage::{
    bytes_to_f32, BatchConfig, Output, RecordHandler, StageEnv, StageFailed,
};
use fracture_shared::store::BlobStore;
use fracture_shared::Topics;

pub use boxes::BoxConfig;

pub const STAGE: &str = "postprocess";

/// `[postprocess]`
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostprocessConfig {
    pub batch: BatchConfig,
    pub boxes: BoxConfig,
}

pub struct Postprocess {
    pub store: BlobStore,
    pub topics: Topics,
    pub manifest: Arc<Manifest>,
    pub cfg: PostprocessConfig,
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
                boxes::boxes(
                    &map,
                    msg.map_size as usize,
                    self.manifest.map_threshold(&msg.region),
                    true,
                    &msg.geometry,
                    &self.cfg.boxes,
                )
            }
            _ => Vec::new(),
        };
        let finding = Finding {
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
        };
        Ok(vec![Output::message(
            &self.topics,
            &finding.id.study_instance_uid.clone(),
            &finding,
        )])
    }
}

/// Runs the stage until shutdown.
pub async fn run(
    env: &StageEnv,
    cfg: &PostprocessConfig,
    manifest: Arc<Manifest>,
) -> Result<(), StageFailed> {
    let handler = Postprocess {
        store: env.store.clone(),
        topics: env.topics.clone(),
        manifest,
        cfg: *cfg,
    };
    env.consume(STAGE, env.topics.of::<Scored>(), cfg.batch, &handler)
        .await
}
