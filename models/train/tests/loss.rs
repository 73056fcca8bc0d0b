//! The cross-entropy on logits stays finite and exact where candle-nn's own does not.

use candle_core::{Device, Tensor, Var};
use fracture_train::loss::{bce_with_logits, bce_with_logits_scalar};

#[test]
fn extreme_logits_give_finite_exact_losses_and_gradients() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    // Right and wrong, confidently: losses 0, 100, 100, 0.
    let x = Var::new(&[100f32, -100.0, 100.0, -100.0], &dev)?;
    let z = Tensor::new(&[1f32, 1.0, 0.0, 0.0], &dev)?;
    let loss = bce_with_logits(x.as_tensor(), &z)?;
    let v = loss.to_scalar::<f32>()?;
    assert!((v - 50.0).abs() < 1e-4, "{v}");
    let g = loss.backward()?;
    let g = g.get(&x).expect("a gradient").to_vec1::<f32>()?;
    // d/dx = (sigmoid(x) - z) / 4.
    for (got, want) in g.iter().zip([0.0f32, -0.25, 0.25, 0.0]) {
        assert!(got.is_finite() && (got - want).abs() < 1e-6, "{got} {want}");
    }
    for (x, z, want) in [(100.0, 1.0, 0.0), (-100.0, 1.0, 100.0), (1e4, 0.0, 1e4)] {
        let got = bce_with_logits_scalar(x, z);
        assert!((got - want).abs() < 1e-9, "{x} {z}: {got}");
    }
    // The naive form candle-nn uses is not finite there: the reason for ours.
    let naive = candle_nn::loss::binary_cross_entropy_with_logit(
        &Tensor::new(&[-100f32, 100.0], &dev)?,
        &Tensor::new(&[1f32, 0.0], &dev)?,
    )?
    .to_scalar::<f32>()?;
    assert!(!naive.is_finite() || (naive - 100.0).abs() > 1.0, "{naive}");
    Ok(())
}
