//! Peak memory of one 1024 x 1024 radiograph through a 10-member full-width ensemble on the CPU.
//!
//! Generates random weights with `init::init_member_weights` into a temporary folder, writes a
//! manifest, loads it through `manifest::load` and `Ensemble::load` (sha256 checks, BatchNorm
//! folding, the CPU fast path) and predicts one radiograph. Peak resident memory is Linux's
//! VmHWM; weight generation's own peak is cleared first (`/proc/self/clear_refs`), so the figure
//! is loading plus inference. scripts/bench/drn-bench.sh also runs this under `/usr/bin/time -v`,
//! whose "Maximum resident set size" covers the whole process.

use std::fmt::Write as _;
use std::time::Instant;

use candle_core::Device;
use fracture_models::drn::{Arch, Pooling};
use fracture_models::init::init_member_weights;
use fracture_models::manifest::{self, Input};
use fracture_models::{Ensemble, MemberSpec};

type Error = Box<dyn std::error::Error>;

/// The paper's kind of mixture: all four architectures, raw / LCN / both inputs, maps on some,
/// attention and spatial pyramid pooling on a few.
const MEMBERS: [(Arch, Input, bool, bool, Pooling); 10] = [
    (Arch::DrnC26, Input::Raw, true, false, Pooling::Avg),
    (Arch::DrnC26, Input::Lcn, false, false, Pooling::Spp),
    (Arch::DrnC42, Input::Both, true, true, Pooling::Avg),
    (Arch::DrnC42, Input::Raw, false, false, Pooling::Avg),
    (Arch::DrnD22, Input::Lcn, true, false, Pooling::Avg),
    (Arch::DrnD22, Input::Both, false, false, Pooling::Spp),
    (Arch::DrnD38, Input::Raw, true, true, Pooling::Avg),
    (Arch::DrnD38, Input::Lcn, false, false, Pooling::Avg),
    (Arch::DrnC26, Input::Both, true, false, Pooling::Avg),
    (Arch::DrnD22, Input::Raw, false, true, Pooling::Avg),
];

/// A `/proc/self/status` field in MiB.
fn status_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn main() -> Result<(), Error> {
    let size = 1024;
    let dir = tempfile::tempdir()?;
    let mut toml = format!(
        "name = \"memory-bench\"\nmodel_version = \"bench\"\ntrained = false\n\
         input_size = {size}\nmodel_card = \"random weights\"\n"
    );
    let started = Instant::now();
    for (i, &(arch, input, map_head, attention, pooling)) in MEMBERS.iter().enumerate() {
        let mut spec = MemberSpec {
            name: format!("m{:02}", i + 1),
            arch,
            input,
            map_head,
            attention,
            pooling,
            channels: fracture_models::drn::REFERENCE_CHANNELS,
            weights: format!("m{:02}.safetensors", i + 1).into(),
            sha256: String::new(),
        };
        spec.sha256 = init_member_weights(&spec, i as u64 + 1, &dir.path().join(&spec.weights))?;
        writeln!(toml, "\n[[members]]\n{}", toml::to_string(&spec)?)?;
    }
    std::fs::write(dir.path().join("ensemble.toml"), toml)?;
    let generation_peak = status_mib("VmHWM:");
    eprintln!(
        "generated 10 members in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    // Writing 5 resets the peak to the current resident size (Linux >= 4.0).
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();

    let started = Instant::now();
    let m = manifest::load(&dir.path().join("ensemble.toml"))?;
    let ensemble = Ensemble::load(m, &Device::Cpu)?;
    let loaded = status_mib("VmRSS:");
    let load_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    // [raw, LCN] as Transformed::to_tensor_data gives them.
    let x: Vec<f32> = (0..2 * size * size)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
        .collect();
    let p = ensemble.predict(&[&x])?;
    let predict_s = started.elapsed().as_secs_f64();
    let peak = status_mib("VmHWM:");

    let mib = |v: Option<f64>| v.map_or("unknown".to_string(), |v| format!("{v:.0} MiB"));
    println!(
        "10 full-width members, one {size} x {size} radiograph: score {:.4}, map {}",
        p[0].score,
        p[0].map.as_ref().map_or(0, Vec::len)
    );
    println!("load {load_s:.1} s, predict {predict_s:.1} s");
    println!("resident after load (weights): {}", mib(loaded));
    println!(
        "peak resident, load + predict{}: {}",
        if reset {
            ""
        } else {
            " (could not reset, includes generation)"
        },
        mib(peak)
    );
    println!(
        "peak resident while generating weights: {}",
        mib(generation_peak)
    );
    Ok(())
}
