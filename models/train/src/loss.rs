//! Binary cross-entropy on logits, stable for any logit, and the paper's joint loss.

use candle_core::{Result, Tensor};

/// `max(x, 0) - x z + log(1 + exp(-|x|))` for one logit `x` and target `z` in [0, 1]: the
/// cross-entropy of `sigmoid(x)` against `z` without ever forming `exp(x)` or `log(0)`.
pub fn bce_with_logits_scalar(x: f64, z: f64) -> f64 {
    x.max(0.0) - x * z + (-x.abs()).exp().ln_1p()
}

/// The mean of [`bce_with_logits_scalar`] over all elements, differentiable. (candle-nn's own
/// `binary_cross_entropy_with_logit` takes `log(sigmoid(x))`, which is `log(0)` = -inf for a
/// logit beyond about -88 in float32, and so returns NaN or inf.)
pub fn bce_with_logits(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let targets = targets.to_dtype(logits.dtype())?;
    let per =
        ((logits.relu()? - (logits * &targets)?)? + (logits.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    per.mean_all()
}

/// The weights of the two terms (the paper: localisation 3 : classification 1, or 10 : 1 for
/// members with attention).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossWeights {
    pub localisation: f64,
    pub classification: f64,
}

impl LossWeights {
    pub fn paper(attention: bool) -> Self {
        Self {
            localisation: if attention { 10.0 } else { 3.0 },
            classification: 1.0,
        }
    }
}

/// The parts of one batch's loss.
pub struct JointLoss {
    /// What to differentiate: `w_loc * loc + w_cls * cls`.
    pub total: Tensor,
    pub classification: f32,
    /// `None` when the batch has no boxed positive or the member has no map.
    pub localisation: Option<f32>,
}

/// `w_cls * BCE(image logits, labels) + w_loc * mean per-pixel BCE(map logits, box masks)`, the
/// second over the images in `boxed` only (fracture-positive radiographs with boxes; the paper
/// computes it on fracture-positive images).
///
/// `logits`: `[N]`; `labels`: `[N]` of 0/1; `map`: `[N, M, M]` logits; `masks`: `[K, M, M]`
/// targets for the `K` images listed in `boxed` (indices into the batch).
pub fn joint_loss(
    logits: &Tensor,
    labels: &Tensor,
    map: Option<&Tensor>,
    masks: Option<&Tensor>,
    boxed: &[u32],
    weights: LossWeights,
) -> Result<JointLoss> {
    let cls = bce_with_logits(logits, labels)?;
    let classification = cls.to_scalar::<f32>()?;
    let mut total = (&cls * weights.classification)?;
    let mut localisation = None;
    if let (Some(map), Some(masks)) = (map, masks) {
        if !boxed.is_empty() {
            let idx = Tensor::new(boxed, map.device())?;
            let loc = bce_with_logits(&map.index_select(&idx, 0)?, masks)?;
            localisation = Some(loc.to_scalar::<f32>()?);
            total = (total + (loc * weights.localisation)?)?;
        }
    }
    Ok(JointLoss {
        total,
        classification,
        localisation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_the_definition_where_the_naive_form_is_safe() {
        for (x, z) in [(0.3, 1.0), (-1.2, 0.0), (2.0, 0.25), (0.0, 1.0)] {
            let p = 1.0 / (1.0 + f64::exp(-x));
            let naive = -(z * p.ln() + (1.0 - z) * (1.0 - p).ln());
            assert!(
                (bce_with_logits_scalar(x, z) - naive).abs() < 1e-12,
                "{x} {z}"
            );
        }
    }

    #[test]
    fn the_tensor_form_agrees_with_the_scalar_one() -> Result<()> {
        let xs = [-3.0f32, -0.5, 0.0, 0.7, 4.0];
        let zs = [0.0f32, 1.0, 0.5, 1.0, 0.0];
        let dev = Device::Cpu;
        let got = bce_with_logits(&Tensor::new(&xs, &dev)?, &Tensor::new(&zs, &dev)?)?
            .to_scalar::<f32>()?;
        let want = xs
            .iter()
            .zip(&zs)
            .map(|(&x, &z)| bce_with_logits_scalar(x.into(), z.into()))
            .sum::<f64>()
            / xs.len() as f64;
        assert!((f64::from(got) - want).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn gradients_are_sigmoid_minus_target() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::new(&[-2.0f32, 0.5, 3.0], &dev)?;
        let z = Tensor::new(&[0.0f32, 1.0, 1.0], &dev)?;
        let g = bce_with_logits(x.as_tensor(), &z)?.backward()?;
        let g = g.get(&x).expect("a gradient").to_vec1::<f32>()?;
        for ((gi, xi), zi) in g.iter().zip([-2.0f32, 0.5, 3.0]).zip([0.0f32, 1.0, 1.0]) {
            let want = (1.0 / (1.0 + (-xi).exp()) - zi) / 3.0;
            assert!((gi - want).abs() < 1e-6, "{gi} {want}");
        }
        Ok(())
    }
}
