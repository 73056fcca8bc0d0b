//! A member as a trainable network: its variables in a `VarMap` under PyTorch's tensor names, the
//! paper's random initialisation, and the folded copy the tuning set is scored with.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use fracture_models::drn::{Drn, DrnConfig};
use fracture_models::ensemble::sha256_hex;
use fracture_models::MemberSpec;

use crate::TrainError;

pub struct Trainable {
    varmap: VarMap,
    net: Drn,
    cfg: DrnConfig,
}

impl Trainable {
    /// The network of `spec` with `fracture_models::init`'s weights for `seed` (He-normal
    /// convolutions, BatchNorm at identity), written to `init_path` on the way.
    pub fn init(spec: &MemberSpec, seed: u64, init_path: &Path) -> Result<Self, TrainError> {
        fracture_models::init::init_member_weights(spec, seed, init_path)?;
        let mut t = Self::build(spec)?;
        t.load(init_path)?;
        Ok(t)
    }

    fn build(spec: &MemberSpec) -> Result<Self, TrainError> {
        let cfg = spec.drn_config();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let net = Drn::new(&cfg, vb)?;
        Ok(Self { varmap, net, cfg })
    }

    /// Sets every variable (running statistics included) from a weights file.
    pub fn load(&mut self, path: &Path) -> Result<(), TrainError> {
        self.varmap.load(path).map_err(|e| TrainError::Checkpoint {
            dir: path.to_path_buf(),
            message: format!("cannot load the weights: {e}"),
        })
    }

    /// Writes every variable under its PyTorch name (models/README.md), running statistics
    /// included, and each BatchNorm's `num_batches_tracked` (int64, the updates so far, as
    /// PyTorch's `state_dict` has it), to `path` through a temporary file; returns the file's
    /// sha256.
    pub fn save(&self, path: &Path, batches: u64) -> Result<String, TrainError> {
        let mut tensors: HashMap<String, Tensor> = {
            let data = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
            data.iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
                .collect()
        };
        let tracked = Tensor::new(batches as i64, &Device::Cpu)?;
        let bns: Vec<String> = tensors
            .keys()
            .filter_map(|k| k.strip_suffix(".running_mean"))
            .map(|prefix| format!("{prefix}.num_batches_tracked"))
            .collect();
        for name in bns {
            tensors.insert(name, tracked.clone());
        }
        let part = path.with_extension("part");
        candle_core::safetensors::save(&tensors, &part)
            .map_err(|e| TrainError::io(&part)(std::io::Error::other(e.to_string())))?;
        std::fs::rename(&part, path).map_err(TrainError::io(path))?;
        let bytes = std::fs::read(path).map_err(TrainError::io(path))?;
        Ok(sha256_hex(&bytes))
    }

    /// Sets every element of the one-dimensional variable `name` (a head's bias) to `value`;
    /// a network without it is left alone.
    pub fn set_bias(&self, name: &str, value: f64) -> Result<(), TrainError> {
        let data = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = data.get(name) {
            v.set(&(v.as_tensor().ones_like()? * value)?)?;
        }
        Ok(())
    }

    pub fn net(&self) -> &Drn {
        &self.net
    }

    pub fn config(&self) -> &DrnConfig {
        &self.cfg
    }

    /// The learned parameters (not the BatchNorm running statistics, which the training forward
    /// pass updates itself), by name.
    pub fn parameters(&self) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(String, Var)> = data
            .iter()
            .filter(|(k, _)| !k.ends_with(".running_mean") && !k.ends_with(".running_var"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// A copy of the current weights, BatchNorm folded and on the CPU fast path: exactly what
    /// `Ensemble::load` would make of the saved file.
    pub fn inference(&self) -> Result<Drn, TrainError> {
        let tensors: HashMap<String, Tensor> = {
            let data = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
            data.iter()
                .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
                .collect::<candle_core::Result<_>>()?
        };
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        Ok(Drn::new(&self.cfg, vb)?.prepare_for_inference(&Device::Cpu)?)
    }
}
