//! Adam (Kingma and Ba 2015) without weight decay, as the paper trains, with moments that a
//! checkpoint saves and restores.

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};

use crate::TrainError;

/// Adam's settings (PyTorch's defaults but the learning rate).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// The optimiser over named variables.
pub struct Adam {
    cfg: AdamConfig,
    /// Sorted by name, so the order (and the saved file) never depends on a hash map.
    params: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates taken so far (bias correction uses it).
    pub steps: u64,
}

impl Adam {
    pub fn new(mut params: Vec<(String, Var)>, cfg: AdamConfig) -> Result<Self, TrainError> {
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let zeros = |p: &[(String, Var)]| -> candle_core::Result<Vec<Tensor>> {
            p.iter().map(|(_, v)| v.as_tensor().zeros_like()).collect()
        };
        Ok(Self {
            cfg,
            m: zeros(&params)?,
            v: zeros(&params)?,
            params,
            steps: 0,
        })
    }

    pub fn config(&self) -> AdamConfig {
        self.cfg
    }

    /// One update of every variable that has a gradient in `grads`.
    pub fn step(&mut self, grads: &GradStore) -> Result<(), TrainError> {
        self.steps += 1;
        let AdamConfig {
            lr,
            beta1,
            beta2,
            eps,
        } = self.cfg;
        let t = self.steps as i32;
        let (c1, c2) = (1.0 - beta1.powi(t), 1.0 - beta2.powi(t));
        for (i, (_, var)) in self.params.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let m = ((&self.m[i] * beta1)? + (g * (1.0 - beta1))?)?.detach();
            let v = ((&self.v[i] * beta2)? + (g.sqr()? * (1.0 - beta2))?)?.detach();
            let update = ((&m / c1)? / ((&v / c2)?.sqrt()? + eps)?)?;
            var.set(&(var.as_tensor().detach() - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Writes the moments as safetensors (`m.<name>`, `v.<name>`); the step count lives in the
    /// checkpoint's state.
    pub fn save(&self, path: &Path) -> Result<(), TrainError> {
        let mut t = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            t.insert(format!("m.{name}"), self.m[i].clone());
            t.insert(format!("v.{name}"), self.v[i].clone());
        }
        candle_core::safetensors::save(&t, path)
            .map_err(|e| TrainError::io(path)(std::io::Error::other(e.to_string())))
    }

    /// Restores moments [`Adam::save`] wrote and the step count; every variable must have both.
    pub fn load(&mut self, path: &Path, steps: u64) -> Result<(), TrainError> {
        let t = candle_core::safetensors::load(path, &Device::Cpu)?;
        for (i, (name, var)) in self.params.iter().enumerate() {
            for (which, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{which}.{name}");
                let moment = t.get(&key).ok_or_else(|| TrainError::Checkpoint {
                    dir: path.to_path_buf(),
                    message: format!(
                        "the optimiser state has no {key}; it was saved for another network"
                    ),
                })?;
                if moment.shape() != var.shape() {
                    return Err(TrainError::Checkpoint {
                        dir: path.to_path_buf(),
                        message: format!(
                            "{key} has shape {:?} but the network's {name} has {:?}",
                            moment.dims(),
                            var.dims()
                        ),
                    });
                }
                *slot = moment.clone();
            }
        }
        self.steps = steps;
        Ok(())
    }

    /// The moments of variable `name`, for tests.
    pub fn moments(&self, name: &str) -> Option<(&Tensor, &Tensor)> {
        let i = self.params.iter().position(|(n, _)| n == name)?;
        Some((&self.m[i], &self.v[i]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One step from zero moments moves every coordinate by lr against its gradient's sign.
    #[test]
    fn the_first_step_is_lr_times_the_sign() -> Result<(), TrainError> {
        let x = Var::new(&[1.0f32, -2.0, 3.0], &Device::Cpu)?;
        let mut adam = Adam::new(
            vec![("x".into(), x.clone())],
            AdamConfig {
                lr: 0.1,
                ..Default::default()
            },
        )?;
        let loss =
            (x.as_tensor() * &Tensor::new(&[2.0f32, -1.0, 0.5], &Device::Cpu)?)?.sum_all()?;
        adam.step(&loss.backward()?)?;
        let got = x.as_tensor().to_vec1::<f32>()?;
        for (g, w) in got.iter().zip([0.9f32, -1.9, 2.9]) {
            assert!((g - w).abs() < 1e-5, "{g} {w}");
        }
        Ok(())
    }
}
