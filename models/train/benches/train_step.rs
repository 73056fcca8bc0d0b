//! Training throughput (forward, backward and Adam update) of a narrow member on the CPU, in
//! images per second, at the input sizes the demo considers; a measurement, not a test.
//!
//! `cargo bench -p fracture-train --bench train_step -- [SIZE ...] [--batch N] [--steps N]
//! [--fast-only]`: our kernels (`fracture_train::kernels`) and candle's own ops, side by side.

use std::time::Instant;

use candle_core::{Device, Tensor};
use fracture_models::drn::Arch;
use fracture_models::manifest::Input;
use fracture_train::adam::{Adam, AdamConfig};
use fracture_train::kernels::FastTraining;
use fracture_train::loss::{joint_loss, LossWeights};
use fracture_train::network::Trainable;
use fracture_train::Recipe;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let mut sizes = Vec::new();
    let (mut batch, mut steps) = (16usize, 3usize);
    let mut kernels = vec![true, false];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--batch" => batch = it.next().ok_or("--batch N")?.parse()?,
            "--steps" => steps = it.next().ok_or("--steps N")?.parse()?,
            "--fast-only" => kernels = vec![true],
            s => sizes.push(s.parse::<usize>()?),
        }
    }
    if sizes.is_empty() {
        sizes = vec![128, 256];
    }
    let tmp = tempfile::tempdir()?;
    for (arch, map_head) in [(Arch::DrnD22, true), (Arch::DrnC26, false)] {
        for (&size, &fast) in sizes
            .iter()
            .flat_map(|s| kernels.iter().map(move |k| (s, k)))
        {
            let recipe = Recipe {
                name: "bench".into(),
                arch,
                input: Input::Raw,
                map_head,
                attention: false,
                pooling: Default::default(),
                channels: [8, 8, 16, 16, 32, 32, 32, 32],
                input_size: size,
            };
            let net =
                Trainable::init(&recipe.member_spec(String::new()), 1, &tmp.path().join("i"))?;
            let mut adam = Adam::new(net.parameters(), AdamConfig::default())?;
            let dev = Device::Cpu;
            let x = Tensor::randn(0.5f32, 0.2, (batch, 1, size, size), &dev)?;
            let labels = Tensor::from_vec(
                (0..batch).map(|i| (i % 2) as f32).collect::<Vec<_>>(),
                batch,
                &dev,
            )?;
            let m = size / 8;
            let masks = Tensor::zeros((batch, m, m), candle_core::DType::F32, &dev)?;
            let boxed: Vec<u32> = (0..batch as u32).collect();
            let (mut fwd, mut bwd, mut upd) = (0.0, 0.0, 0.0);
            for step in 0..=steps {
                let t0 = Instant::now();
                let (logits, map) = if fast {
                    net.net().forward_train(&x, &FastTraining)?
                } else {
                    net.net().forward_t(&x, true)?
                };
                let loss = joint_loss(
                    &logits,
                    &labels,
                    map.as_ref(),
                    Some(&masks),
                    &boxed,
                    LossWeights::paper(false),
                )?;
                let t1 = Instant::now();
                let grads = loss.total.backward()?;
                let t2 = Instant::now();
                adam.step(&grads)?;
                let t3 = Instant::now();
                // The first step warms caches and allocations.
                if step > 0 {
                    fwd += (t1 - t0).as_secs_f64();
                    bwd += (t2 - t1).as_secs_f64();
                    upd += (t3 - t2).as_secs_f64();
                }
            }
            let n = (steps * batch) as f64;
            println!(
                "{arch:?} map_head={map_head} {size}px batch {batch} {}: {:.1} img/s (forward {:.1} ms/img, backward {:.1} ms/img, update {:.1} ms/step)",
                if fast { "fracture-train kernels" } else { "candle ops" },
                n / (fwd + bwd + upd),
                1e3 * fwd / n,
                1e3 * bwd / n,
                1e3 * upd / steps as f64
            );
        }
    }
    Ok(())
}
