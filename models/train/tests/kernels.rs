//! The training kernels compute what candle's own ops compute: outputs, every gradient, and the
//! BatchNorm running statistics, on a small DRN of each architecture.

use candle_core::{Device, Tensor};
use fracture_models::drn::{Arch, CandleTraining, Pooling};
use fracture_models::manifest::Input;
use fracture_train::kernels::{conv2d, FastTraining};
use fracture_train::network::Trainable;
use fracture_train::Recipe;

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let scale = b
        .abs()
        .and_then(|t| t.max_all())
        .and_then(|t| t.to_scalar::<f32>())
        .expect("scale")
        .max(1e-6);
    let d = (a - b)
        .and_then(|t| t.abs())
        .and_then(|t| t.max_all())
        .and_then(|t| t.to_scalar::<f32>())
        .expect("diff");
    d / scale
}

#[test]
fn convolutions_match_candle_for_every_shape_the_drn_uses() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for (cin, cout, k, stride, pad, dil, side) in [
        (1, 4, 7, 1, 3, 1, 19),
        (3, 5, 3, 2, 1, 1, 17),
        (4, 4, 3, 1, 2, 2, 12),
        (4, 6, 3, 1, 4, 4, 9),
        (4, 6, 1, 2, 0, 1, 11),
    ] {
        let x =
            candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, cin, side, side), &dev)?)?;
        let w = candle_core::Var::from_tensor(&Tensor::randn(0f32, 0.3, (cout, cin, k, k), &dev)?)?;
        let want = x.as_tensor().conv2d(w.as_tensor(), pad, stride, dil, 1)?;
        let got = conv2d(x.as_tensor(), w.as_tensor(), stride, pad, dil)?;
        assert_eq!(got.dims(), want.dims());
        assert!(
            max_rel(&got, &want) < 1e-5,
            "forward {cin} {cout} {k} {stride} {pad} {dil}"
        );
        // A loss that weighs every output differently.
        let r = Tensor::randn(0f32, 1.0, want.dims(), &dev)?;
        let gw = (want * &r)?.sum_all()?.backward()?;
        let gg = (got * &r)?.sum_all()?.backward()?;
        for v in [&x, &w] {
            let (a, b) = (gg.get(v).expect("grad"), gw.get(v).expect("grad"));
            assert!(
                max_rel(a, b) < 1e-4,
                "backward {cin} {cout} {k} {stride} {pad} {dil}: {}",
                max_rel(a, b)
            );
        }
    }
    Ok(())
}

#[test]
fn a_training_pass_matches_candle_ops() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    for (arch, pooling, attention, input) in [
        (Arch::DrnD22, Pooling::Avg, false, Input::Raw),
        (Arch::DrnC26, Pooling::Spp, true, Input::Both),
    ] {
        let recipe = Recipe {
            name: "k".into(),
            arch,
            input,
            map_head: true,
            attention,
            pooling,
            channels: [4, 4, 6, 6, 8, 8, 8, 8],
            input_size: 32,
        };
        let spec = recipe.member_spec(String::new());
        let init = dir.path().join("init.safetensors");
        let fast = Trainable::init(&spec, 3, &init)?;
        let slow = Trainable::init(&spec, 3, &init)?;
        let x = Tensor::randn(0.5f32, 0.3, (3, input.channels(), 32, 32), &Device::Cpu)?;
        let (lf, mf) = fast.net().forward_train(&x, &FastTraining)?;
        let (ls, ms) = slow.net().forward_train(&x, &CandleTraining)?;
        let (mf, ms) = (mf.expect("map"), ms.expect("map"));
        assert!(max_rel(&lf, &ls) < 1e-4, "{arch:?} logits");
        assert!(max_rel(&mf, &ms) < 1e-4, "{arch:?} map");
        let gf = (lf.sum_all()? + mf.sqr()?.mean_all()?)?.backward()?;
        let gs = (ls.sum_all()? + ms.sqr()?.mean_all()?)?.backward()?;
        let (pf, ps) = (fast.parameters(), slow.parameters());
        assert_eq!(pf.len(), ps.len());
        for ((name, vf), (_, vs)) in pf.iter().zip(&ps) {
            let (a, b) = (gf.get(vf.as_tensor()), gs.get(vs.as_tensor()));
            let (a, b) = (a.expect(name), b.expect(name));
            assert!(max_rel(a, b) < 2e-3, "{arch:?} {name}: {}", max_rel(a, b));
        }
        // Running statistics moved the same way.
        let (sf, ss) = (
            dir.path().join("f.safetensors"),
            dir.path().join("s.safetensors"),
        );
        fast.save(&sf, 1)?;
        slow.save(&ss, 1)?;
        let (tf, ts) = (
            candle_core::safetensors::load(&sf, &Device::Cpu)?,
            candle_core::safetensors::load(&ss, &Device::Cpu)?,
        );
        // PyTorch's state_dict names: every BatchNorm has an int64 step counter too.
        let counters = tf
            .keys()
            .filter(|n| n.ends_with(".num_batches_tracked"))
            .count();
        let bns = tf.keys().filter(|n| n.ends_with(".running_mean")).count();
        assert!(bns > 0 && counters == bns);
        assert!(tf
            .iter()
            .filter(|(n, _)| n.ends_with(".num_batches_tracked"))
            .all(|(_, t)| t.dtype() == candle_core::DType::I64 && t.dims().is_empty()));
        for (name, t) in &tf {
            if name.ends_with("running_mean") || name.ends_with("running_var") {
                assert!(max_rel(t, &ts[name]) < 1e-4, "{arch:?} {name}");
            }
        }
        let moved = tf
            .iter()
            .filter(|(n, _)| n.ends_with("running_var"))
            .any(|(_, t)| {
                t.to_vec1::<f32>()
                    .map(|v| v.iter().any(|&x| x != 1.0))
                    .unwrap_or(false)
            });
        assert!(moved, "the running variances were never updated");
    }
    Ok(())
}
