//! Reproducible random initial weights for an ensemble member, written as safetensors.
//!
//! The values come from our own seeded generator using only IEEE-exact arithmetic (no `ln`,
//! `cos` or device RNG, whose last bits differ between platforms and libraries), so a seed gives
//! the same file, byte for byte, everywhere; `models/untrained/` relies on that.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::drn::parameter_specs;
use crate::ensemble::sha256_hex;
use crate::manifest::MemberSpec;
use crate::ModelError;

/// splitmix64 (Steele, Lea and Flood 2014): tiny, fast, and statistically good enough for weights.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), exact: 53 random bits scaled by a power of two.
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal, approximately: the sum of 12 uniforms minus 6 has mean 0 and variance 1
    /// exactly and is normal to within the needs of an initialisation (tails cut at 6 sigma);
    /// unlike Box-Muller it needs no transcendental function, so it is bit-reproducible.
    fn normal(&mut self) -> f64 {
        (0..12).map(|_| self.uniform()).sum::<f64>() - 6.0
    }
}

/// FNV-1a, to give every tensor its own stream: adding a head leaves the other tensors unchanged.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// Heads (classifier, map, attention) are 1x1 convolutions with a bias and one output channel.
fn is_head(name: &str) -> bool {
    ["fc.", "map_head.", "attention."]
        .iter()
        .any(|p| name.starts_with(p))
}

/// How [`init_member_weights_with`] sets the BatchNorm tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BatchNormInit {
    /// Weight 1, bias 0, running mean 0, running variance 1: a freshly made PyTorch BatchNorm.
    #[default]
    Identity,
    /// Weight in [0.5, 1.5), bias and running mean in [-0.25, 0.25), running variance in
    /// [0.5, 2): the statistics of a trained network are never the identity, and BatchNorm
    /// folding and exports must be tested on ones that are not.
    Random,
}

/// Writes randomly initialised weights for `spec` to `path` and returns the file's sha256 (hex).
///
/// Convolutions: `drn.py`'s He initialisation, normal with std sqrt(2 / (k * k * out_channels)).
/// Heads (`fc`, `map_head`, `attention`): std sqrt(1 / in_channels) with zero bias, so an
/// untrained member's logits are of order one and its probabilities spread over (0, 1) instead of
/// saturating at 0 or 1 as He's fan-out rule (std sqrt(2) for one output) would make them.
/// BatchNorm: weight 1, bias 0, running mean 0, running variance 1.
pub fn init_member_weights(
    spec: &MemberSpec,
    seed: u64,
    path: &Path,
) -> Result<String, ModelError> {
    init_member_weights_with(spec, seed, BatchNormInit::Identity, path)
}

/// [`init_member_weights`] with a choice of BatchNorm statistics; the other tensors are the same.
pub fn init_member_weights_with(
    spec: &MemberSpec,
    seed: u64,
    batchnorm: BatchNormInit,
    path: &Path,
) -> Result<String, ModelError> {
    let mut tensors = HashMap::new();
    for p in parameter_specs(&spec.drn_config())? {
        let numel: usize = p.shape.iter().product();
        let mut rng = SplitMix64(seed ^ fnv1a(&p.name));
        let uniform = |rng: &mut SplitMix64, lo: f64, hi: f64| -> Vec<f32> {
            (0..numel)
                .map(|_| (lo + (hi - lo) * rng.uniform()) as f32)
                .collect()
        };
        let data: Vec<f32> = match (p.init, p.shape.as_slice()) {
            // BatchNorm tensors are the one-dimensional ones outside the heads.
            (_, [_]) if batchnorm == BatchNormInit::Random && !is_head(&p.name) => {
                match p.name.rsplit('.').next() {
                    Some("weight") => uniform(&mut rng, 0.5, 1.5),
                    Some("running_var") => uniform(&mut rng, 0.5, 2.0),
                    _ => uniform(&mut rng, -0.25, 0.25),
                }
            }
            (candle_nn::Init::Const(v), _) => vec![v as f32; numel],
            (_, [out, inp, kh, kw]) if !p.name.ends_with(".bias") => {
                let std = if is_head(&p.name) {
                    (1.0 / (inp * kh * kw) as f64).sqrt()
                } else {
                    (2.0 / (kh * kw * out) as f64).sqrt()
                };
                (0..numel).map(|_| (rng.normal() * std) as f32).collect()
            }
            _ => vec![0.0; numel],
        };
        tensors.insert(p.name, Tensor::from_vec(data, p.shape, &Device::Cpu)?);
    }
    let io_error = |source: std::io::Error| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    candle_core::safetensors::save(&tensors, path)
        .map_err(|e| io_error(std::io::Error::other(e.to_string())))?;
    let bytes = std::fs::read(path).map_err(io_error)?;
    Ok(sha256_hex(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest;

    #[test]
    fn the_normal_has_unit_variance() {
        let mut rng = SplitMix64(7);
        let xs: Vec<f64> = (0..100_000).map(|_| rng.normal()).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(
            mean.abs() < 0.02 && (var - 1.0).abs() < 0.02,
            "{mean} {var}"
        );
    }

    /// The shipped untrained ensemble is exactly what this code generates: member i (0-based)
    /// gets seed i + 1. After changing the architecture or the initialisation, regenerate it with
    /// `FRACTURE_BLESS_UNTRAINED=1 cargo test -p fracture-models shipped_untrained` and copy the
    /// printed sha256 values into models/untrained/ensemble.toml.
    #[test]
    fn shipped_untrained_weights_are_reproducible() -> Result<(), ModelError> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("untrained");
        let m = manifest::load(&dir.join("ensemble.toml"))?;
        let bless = std::env::var_os("FRACTURE_BLESS_UNTRAINED").is_some();
        let tmp = tempfile::tempdir().map_err(|source| ModelError::Io {
            path: std::env::temp_dir(),
            source,
        })?;
        for (i, spec) in m.members.iter().enumerate() {
            let target = if bless {
                m.weights_path(spec)
            } else {
                tmp.path().join(&spec.weights)
            };
            let sha = init_member_weights(spec, i as u64 + 1, &target)?;
            if bless {
                println!("{}: sha256 = \"{sha}\"", spec.name);
                continue;
            }
            assert_eq!(
                sha, spec.sha256,
                "member {} regenerates differently",
                spec.name
            );
            let shipped = std::fs::read(m.weights_path(spec)).map_err(|source| ModelError::Io {
                path: m.weights_path(spec),
                source,
            })?;
            assert_eq!(
                sha256_hex(&shipped),
                spec.sha256,
                "shipped {} differs",
                spec.name
            );
        }
        Ok(())
    }
}
