//! The loaded ensemble: checksummed weights, one batch per member, scores and maps averaged.

use std::collections::{HashMap, HashSet};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sha2::{Digest, Sha256};

use crate::drn::{parameter_specs, Drn};
use crate::manifest::{Input, Manifest};
use crate::ModelError;

/// What the ensemble says about one radiograph.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// Unweighted mean of the members' probabilities, as in the paper.
    pub score: f32,
    /// Each member's probability, in manifest order.
    pub member_scores: Vec<f32>,
    /// Unweighted mean of the probability maps of the members that have a map head,
    /// `map_size * map_size`, row-major; map row i, column j covers model rows [8i, 8i + 8) and
    /// columns [8j, 8j + 8), so in the original x = `crop[0]` + 8 j / scale (y likewise).
    /// `None` if no member has a map head.
    pub map: Option<Vec<f32>>,
    pub map_size: usize,
}

struct Member {
    input: Input,
    net: Drn,
}

/// The networks of a [`Manifest`], ready to predict.
pub struct Ensemble {
    manifest: Manifest,
    members: Vec<Member>,
    device: Device,
}

impl std::fmt::Debug for Ensemble {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ensemble")
            .field("name", &self.manifest.name)
            .field("model_version", &self.manifest.model_version)
            .field("members", &self.members.len())
            .field("device", &self.device)
            .finish()
    }
}

/// Where the ensemble runs: the first CUDA GPU in a build with the `cuda` feature that finds
/// one, else the CPU.
pub fn inference_device() -> Result<Device, ModelError> {
    Ok(Device::cuda_if_available(0)?)
}

/// Lowercase hex sha256 of a byte string.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Ensemble {
    /// Loads every member's weights after checking them against the manifest's sha256.
    pub fn load(manifest: Manifest, device: &Device) -> Result<Ensemble, ModelError> {
        let mut members = Vec::with_capacity(manifest.members.len());
        for spec in &manifest.members {
            let path = manifest.weights_path(spec);
            let bytes = std::fs::read(&path).map_err(|source| ModelError::Io {
                path: path.clone(),
                source,
            })?;
            let actual = sha256_hex(&bytes);
            if !actual.eq_ignore_ascii_case(&spec.sha256) {
                return Err(ModelError::ChecksumMismatch {
                    member: spec.name.clone(),
                    path,
                    expected: spec.sha256.to_ascii_lowercase(),
                    actual,
                });
            }
            let weights_error = |reason: String| ModelError::Weights {
                member: spec.name.clone(),
                path: path.clone(),
                reason,
            };
            let tensors = candle_core::safetensors::load_buffer(&bytes, device)
                .map_err(|e| weights_error(format!("not a readable safetensors file: {e}")))?;
            drop(bytes);

            let cfg = spec.drn_config();
            // A file with tensors the architecture does not read was made for another one
            // (e.g. drn_c_42 weights under a drn_c_26 member): refuse it rather than run with
            // half of it. PyTorch's BatchNorm step counters carry no weights and are skipped.
            let expected: HashSet<String> =
                parameter_specs(&cfg)?.into_iter().map(|p| p.name).collect();
            let mut unexpected: Vec<&String> = tensors
                .keys()
                .filter(|k| !expected.contains(*k) && !k.ends_with(".num_batches_tracked"))
                .collect();
            if !unexpected.is_empty() {
                unexpected.sort();
                let shown: Vec<&str> = unexpected.iter().take(5).map(|s| s.as_str()).collect();
                return Err(weights_error(format!(
                    "{} tensor(s) the member's arch/channels/heads do not use, e.g. {}; check \
                     arch, input, channels, pooling, map_head and attention in the manifest",
                    unexpected.len(),
                    shown.join(", ")
                )));
            }
            let tensors: HashMap<String, Tensor> = tensors
                .into_iter()
                .filter(|(k, _)| expected.contains(k))
                .collect();
            let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
            let net = Drn::new(&cfg, vb)
                .and_then(|net| Ok(net.prepare_for_inference(device)?))
                .map_err(|e| match e {
                    ModelError::Tensor(e) => weights_error(format!(
                        "{e}; check arch, input, channels, pooling, map_head and attention in the \
                     manifest"
                    )),
                    other => other,
                })?;
            members.push(Member {
                input: spec.input,
                net,
            });
        }
        Ok(Ensemble {
            manifest,
            members,
            device: device.clone(),
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Scores a batch of radiographs, each the `[2, size, size]` output of
    /// [`crate::Transformed::to_tensor_data`]; one forward pass per member for the whole batch.
    pub fn predict(&self, inputs: &[&[f32]]) -> Result<Vec<Prediction>, ModelError> {
        let n = inputs.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let size = self.manifest.input_size;
        let plane = size * size;
        for (i, x) in inputs.iter().enumerate() {
            if x.len() != 2 * plane {
                return Err(ModelError::InvalidInput(format!(
                    "input {i} has {} values, but this ensemble takes [2, {size}, {size}] = {} \
                     (raw then LCN, from Transformed::to_tensor_data with [transform] size \
                     {size})",
                    x.len(),
                    2 * plane
                )));
            }
        }

        let map_size = self.manifest.map_size();
        if self.manifest.null_model {
            return Ok(inputs
                .iter()
                .map(|x| null_prediction(x, map_size))
                .collect());
        }
        let mut scores = vec![Vec::with_capacity(self.members.len()); n];
        let mut map_sum: Option<Vec<f32>> = None;
        let mut map_members = 0usize;
        for member in &self.members {
            let (channels, data) = match member.input {
                Input::Raw => (1, gather(inputs, 0..plane)),
                Input::Lcn => (1, gather(inputs, plane..2 * plane)),
                Input::Both => (2, gather(inputs, 0..2 * plane)),
            };
            let x = Tensor::from_vec(data, (n, channels, size, size), &self.device)?;
            let (logits, map) = member.net.forward(&x)?;
            let probs = candle_nn::ops::sigmoid(&logits)?.to_vec1::<f32>()?;
            for (s, p) in scores.iter_mut().zip(probs) {
                s.push(p);
            }
            if let Some(map) = map {
                let (_, h, w) = map.dims3()?;
                if (h, w) != (map_size, map_size) {
                    return Err(ModelError::InvalidInput(format!(
                        "a map of {h} x {w} came out where {map_size} x {map_size} was expected"
                    )));
                }
                let probs = candle_nn::ops::sigmoid(&map)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                match &mut map_sum {
                    Some(sum) => sum.iter_mut().zip(&probs).for_each(|(s, p)| *s += p),
                    None => map_sum = Some(probs),
                }
                map_members += 1;
            }
        }

        let per_image = map_size * map_size;
        Ok(scores
            .into_iter()
            .enumerate()
            .map(|(i, member_scores)| {
                let score = member_scores.iter().sum::<f32>() / member_scores.len() as f32;
                let map = map_sum.as_ref().map(|sum| {
                    sum[i * per_image..(i + 1) * per_image]
                        .iter()
                        .map(|s| s / map_members as f32)
                        .collect()
                });
                Prediction {
                    score,
                    member_scores,
                    map,
                    map_size,
                }
            })
            .collect())
    }
}

/// A benchmark's stand-in for the networks: the mean of the raw channel (in [0, 1]), so scores
/// still vary with the image and both calls occur, at no cost worth measuring.
fn null_prediction(x: &[f32], map_size: usize) -> Prediction {
    let raw = &x[..x.len() / 2];
    let score = (raw.iter().map(|&v| f64::from(v)).sum::<f64>() / raw.len().max(1) as f64)
        .clamp(0.0, 1.0) as f32;
    Prediction {
        score,
        member_scores: Vec::new(),
        map: None,
        map_size,
    }
}

/// The same channel range of every input, concatenated into one batch.
fn gather(inputs: &[&[f32]], range: std::ops::Range<usize>) -> Vec<f32> {
    let mut data = Vec::with_capacity(inputs.len() * range.len());
    for x in inputs {
        data.extend_from_slice(&x[range.clone()]);
    }
    data
}
