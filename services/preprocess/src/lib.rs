//! The pre-processing stage: decode the de-identified radiograph's pixels, crop, resize and
//! normalise with the transform the models were trained with, and store the model input.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use fracture_models::{transform, TransformConfig};
use fracture_shared::bus::Record;
use fracture_shared::error::StageError;
use fracture_shared::messages::{decode, schema, Deidentified, Geometry, Preprocessed};
use fracture_shared::pixels;
use fracture_shared::stage::{
    f32_to_bytes, BatchConfig, Output, RecordHandler, StageEnv, StageFailed,
};
use fracture_shared::store::BlobStore;
use fracture_shared::Topics;

pub const STAGE: &str = "preprocess";

/// `[preprocess]`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreprocessConfig {
    pub batch: BatchConfig,
}

pub struct Preprocess {
    pub store: BlobStore,
    pub topics: Topics,
    /// From the ensemble manifest, so serving applies exactly the training transform.
    pub transform: Arc<TransformConfig>,
}

/// Pixels to model input; CPU-bound, so it runs on the blocking pool.
pub fn prepare(dicom: &[u8], cfg: &TransformConfig) -> Result<(Vec<f32>, Geometry), StageError> {
    let obj = pixels::read_object(dicom)?;
    let image = pixels::decode(&obj)?;
    let t = transform(&image.pixels, image.width, image.height, cfg)
        .map_err(|e| StageError::data(format!("pre-processing failed: {e}")))?;
    let geometry = Geometry {
        original_width: t.original_width,
        original_height: t.original_height,
        crop: t.crop,
        scale: t.scale,
        size: t.size as u32,
    };
    Ok((t.to_tensor_data(), geometry))
}

#[async_trait]
impl RecordHandler for Preprocess {
    async fn one(&self, record: &Record) -> Result<Vec<Output>, StageError> {
        let msg: Deidentified = decode(&record.payload).map_err(StageError::data)?;
        let dicom = self.store.get(&msg.dicom).await?;
        let cfg = self.transform.clone();
        let (tensor, geometry) = tokio::task::spawn_blocking(move || prepare(&dicom, &cfg))
            .await
            .map_err(|e| StageError::internal(format!("pre-processing task panicked: {e}")))??;
        let tensor = self
            .store
            .put(
                Bytes::from(f32_to_bytes(&tensor)),
                "application/x-fracture-f32",
            )
            .await?;
        let out = Preprocessed {
            schema: schema::PREPROCESSED.into(),
            id: msg.id,
            site: msg.site,
            region: msg.region,
            tensor,
            geometry,
            dicom: Some(msg.dicom),
        };
        Ok(vec![Output::message(
            &self.topics,
            &out.id.study_instance_uid.clone(),
            &out,
        )])
    }
}

/// Runs the stage until shutdown.
pub async fn run(
    env: &StageEnv,
    cfg: &PreprocessConfig,
    transform: TransformConfig,
) -> Result<(), StageFailed> {
    let handler = Preprocess {
        store: env.store.clone(),
        topics: env.topics.clone(),
        transform: Arc::new(transform),
    };
    env.consume(STAGE, env.topics.of::<Deidentified>(), cfg.batch, &handler)
        .await
}
