//! The ensemble stage: gathers pre-processed radiographs into micro-batches and runs the DRN
//! ensemble on them. Scale it by starting more replicas: they share the partitions.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use fracture_models::Ensemble;
use fracture_shared::bus::Record;
use fracture_shared::error::StageError;
use fracture_shared::messages::{decode, schema, Preprocessed, Scored};
use fracture_shared::stage::{
    bytes_to_f32, f32_to_bytes, BatchConfig, Handler, Output, StageEnv, StageFailed,
};
use fracture_shared::store::BlobStore;
use fracture_shared::Topics;

pub const STAGE: &str = "ensemble";

/// `[ensemble]`
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnsembleConfig {
    /// `[ensemble.batch]`: `max` radiographs per forward pass (and per transaction), waiting
    /// at most `linger_ms` for a batch to fill once the first radiograph arrived.
    pub batch: BatchConfig,
}

impl Default for EnsembleConfig {
    fn default() -> Self {
        Self {
            batch: BatchConfig {
                max: 4,
                linger_ms: 20,
            },
        }
    }
}

pub struct EnsembleStage {
    pub store: BlobStore,
    pub topics: Topics,
    pub ensemble: Arc<Ensemble>,
}

impl EnsembleStage {
    async fn fetch(&self, record: &Record) -> Result<(Preprocessed, Vec<f32>), StageError> {
        let msg: Preprocessed = decode(&record.payload).map_err(StageError::data)?;
        let size = self.ensemble.manifest().input_size;
        if msg.geometry.size as usize != size {
            return Err(StageError::data(format!(
                "model input is {0}x{0} but the ensemble expects {1}x{1}: preprocess and ensemble run different manifests",
                msg.geometry.size, size
            )));
        }
        let tensor = bytes_to_f32(&self.store.get(&msg.tensor).await?)?;
        if tensor.len() != 2 * size * size {
            return Err(StageError::data(format!(
                "tensor has {} values, expected 2x{size}x{size}",
                tensor.len()
            )));
        }
        Ok((msg, tensor))
    }
}

#[async_trait]
impl Handler for EnsembleStage {
    async fn handle(&self, batch: &[Record]) -> Vec<Result<Vec<Output>, StageError>> {
        let mut results: Vec<Result<Vec<Output>, StageError>> = Vec::with_capacity(batch.len());
        let mut ready = Vec::new();
        for (i, r) in batch.iter().enumerate() {
            match self.fetch(r).await {
                Ok(x) => {
                    ready.push((i, x));
                    results.push(Ok(vec![]));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        if ready.is_empty() {
            return results;
        }
        let ensemble = self.ensemble.clone();
        let tensors: Vec<Vec<f32>> = ready.iter().map(|(_, (_, t))| t.clone()).collect();
        let predictions = tokio::task::spawn_blocking(move || {
            let inputs: Vec<&[f32]> = tensors.iter().map(Vec::as_slice).collect();
            ensemble.predict(&inputs)
        })
        .await;
        let predictions = match predictions {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                for (i, _) in &ready {
                    results[*i] = Err(StageError::internal(format!(
                        "ensemble inference failed: {e}"
                    )));
                }
                return results;
            }
            Err(e) => {
                for (i, _) in &ready {
                    results[*i] = Err(StageError::internal(format!("ensemble task panicked: {e}")));
                }
                return results;
            }
        };
        let manifest = self.ensemble.manifest();
        for ((i, (msg, _)), p) in ready.into_iter().zip(predictions) {
            let map = match &p.map {
                Some(m) => match self
                    .store
                    .put(Bytes::from(f32_to_bytes(m)), "application/x-fracture-f32")
                    .await
                {
                    Ok(b) => Some(b),
                    Err(e) => {
                        results[i] = Err(e.into());
                        continue;
                    }
                },
                None => None,
            };
            let out = Scored {
                schema: schema::SCORED.into(),
                id: msg.id,
                site: msg.site,
                region: msg.region,
                geometry: msg.geometry,
                score: p.score,
                member_scores: p.member_scores,
                map,
                map_size: p.map_size as u32,
                model_version: manifest.model_version.clone(),
                model_trained: manifest.trained,
                dicom: msg.dicom,
            };
            results[i] = Ok(vec![Output::message(
                &self.topics,
                &out.id.study_instance_uid.clone(),
                &out,
            )]);
        }
        results
    }
}

/// Runs the stage until shutdown.
pub async fn run(
    env: &StageEnv,
    cfg: &EnsembleConfig,
    ensemble: Arc<Ensemble>,
) -> Result<(), StageFailed> {
    let handler = EnsembleStage {
        store: env.store.clone(),
        topics: env.topics.clone(),
        ensemble,
    };
    env.consume(STAGE, env.topics.of::<Preprocessed>(), cfg.batch, &handler)
        .await
}
