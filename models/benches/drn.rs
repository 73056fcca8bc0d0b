//! Forward-pass speed of one full-width DRN on the CPU, for scripts/bench/drn-bench.sh.
//!
//! `drn --serve` answers one command per stdin line, so that scripts/bench/drn_torch.py can
//! interleave our runs with PyTorch's and ONNX Runtime's in one process tree:
//! - `macs ARCH SIZE` -> `ok MULTIPLY_ADDS` (one image, `drn::multiply_adds`)
//! - `init ARCH IN_CHANNELS MAP_HEAD(0|1) PATH SEED` -> `ok SHA256`: He-normal weights with random
//!   BatchNorm statistics (`init::BatchNormInit::Random`), written as safetensors with PyTorch's
//!   state_dict names
//! - `load ARCH IN_CHANNELS MAP_HEAD PATH MODE` -> `ok`; MODE is `stock` (candle's conv2d and
//!   BatchNorm, as loaded), `folded` (BatchNorm folded, candle's conv2d), `im2col` (folded, CPU
//!   fast path without Winograd) or `fast` (what `Ensemble::load` runs: folded, CPU fast path
//!   with Winograd)
//! - `run BATCH SIZE INPUT EMIT(0|1)` -> `ok SECONDS [LOGITS... | MAP...]`: one forward pass on
//!   `[BATCH, IN_CHANNELS, SIZE, SIZE]` read as raw little-endian f32 from INPUT (or zeros if INPUT
//!   is `-`); with EMIT 1 the logits, a `|`, and the map logits (if any) follow
//!
//! `drn --steps [ARCH] [SIZE] [BATCH] [REPS]` times the three modes on one network and prints the
//! medians: what BatchNorm folding and the fast path each buy.

use std::io::{BufRead, Write};
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use fracture_models::drn::{multiply_adds, Arch, Conv3x3, Drn, DrnConfig, Pooling};
use fracture_models::init::{init_member_weights_with, BatchNormInit};
use fracture_models::manifest::{Input, MemberSpec};

type Error = Box<dyn std::error::Error>;

fn arch(name: &str) -> Result<Arch, Error> {
    Ok(toml::Value::String(name.to_string()).try_into()?)
}

fn member(arch: Arch, in_channels: usize, map_head: bool) -> Result<MemberSpec, Error> {
    Ok(MemberSpec {
        name: "bench".into(),
        arch,
        input: match in_channels {
            1 => Input::Raw,
            2 => Input::Both,
            n => return Err(format!("{n} input channels; a member has 1 or 2").into()),
        },
        map_head,
        attention: false,
        pooling: Pooling::Avg,
        channels: fracture_models::drn::REFERENCE_CHANNELS,
        weights: "bench.safetensors".into(),
        sha256: String::new(),
    })
}

fn load(cfg: &DrnConfig, path: &Path, mode: &str) -> Result<Drn, Error> {
    let dev = Device::Cpu;
    let tensors = candle_core::safetensors::load(path, &dev)?;
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
    let net = Drn::new(cfg, vb)?;
    Ok(match mode {
        "stock" => net,
        "folded" => net.fold_batchnorm()?,
        "im2col" => net.prepare_for_inference_with(&dev, Conv3x3::Im2col)?,
        "fast" => net.prepare_for_inference(&dev)?,
        other => return Err(format!("mode {other:?}: stock, folded, im2col or fast").into()),
    })
}

fn input(cfg: &DrnConfig, batch: usize, size: usize, path: &str) -> Result<Tensor, Error> {
    let shape = (batch, cfg.in_channels, size, size);
    if path == "-" {
        return Ok(Tensor::zeros(shape, DType::F32, &Device::Cpu)?);
    }
    let bytes = std::fs::read(path)?;
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
}

/// Seconds for one forward pass, and its outputs.
fn run(net: &Drn, x: &Tensor) -> Result<(f64, Vec<f32>, Vec<f32>), Error> {
    let start = Instant::now();
    let (logits, map) = net.forward(x)?;
    let logits = logits.to_vec1::<f32>()?;
    let seconds = start.elapsed().as_secs_f64();
    let map = match map {
        Some(m) => m.flatten_all()?.to_vec1::<f32>()?,
        None => Vec::new(),
    };
    Ok((seconds, logits, map))
}

fn serve() -> Result<(), Error> {
    let mut net: Option<(DrnConfig, Drn)> = None;
    let stdout = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let reply = match words.as_slice() {
            ["macs", a, size] => Ok(format!(
                "ok {}",
                multiply_adds(&DrnConfig::new(arch(a)?, 1), size.parse()?)
            )),
            ["init", a, ch, map, path, seed] => {
                let spec = member(arch(a)?, ch.parse()?, *map == "1")?;
                init_member_weights_with(
                    &spec,
                    seed.parse()?,
                    BatchNormInit::Random,
                    Path::new(path),
                )
                .map(|sha| format!("ok {sha}"))
                .map_err(Error::from)
            }
            ["load", a, ch, map, path, mode] => {
                net = None;
                let cfg = member(arch(a)?, ch.parse()?, *map == "1")?.drn_config();
                load(&cfg, Path::new(path), mode).map(|n| {
                    net = Some((cfg, n));
                    "ok".to_string()
                })
            }
            ["run", batch, size, path, emit] => match &net {
                None => Err("run before load".into()),
                Some((cfg, n)) => {
                    let x = input(cfg, batch.parse()?, size.parse()?, path)?;
                    run(n, &x).map(|(s, logits, map)| {
                        let mut out = format!("ok {s}");
                        if *emit == "1" {
                            let join =
                                |v: &[f32]| v.iter().map(|f| format!(" {f:e}")).collect::<String>();
                            out += &join(&logits);
                            out += " |";
                            out += &join(&map);
                        }
                        out
                    })
                }
            },
            _ => Err(format!("unknown command {line:?}").into()),
        };
        let mut out = stdout.lock();
        match reply {
            Ok(r) => writeln!(out, "{r}")?,
            Err(e) => writeln!(out, "error {}", e.to_string().replace('\n', " "))?,
        }
        out.flush()?;
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn steps(args: &[String]) -> Result<(), Error> {
    let a = arch(args.first().map(String::as_str).unwrap_or("drn_c_26"))?;
    let size: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(1024);
    let batch: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let reps: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let spec = member(a, 1, false)?;
    let cfg = spec.drn_config();
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("w.safetensors");
    init_member_weights_with(&spec, 1, BatchNormInit::Random, &path)?;
    let x = Tensor::randn(0f32, 1.0, (batch, 1, size, size), &Device::Cpu)?;
    let gflop = 2.0 * multiply_adds(&cfg, size) as f64 * batch as f64 / 1e9;
    println!("| step | {a:?} @{size} batch {batch}: ms/image (median of {reps}) | GFLOP/s |");
    println!("|---|---|---|");
    for mode in ["stock", "folded", "im2col", "fast"] {
        let net = load(&cfg, &path, mode)?;
        run(&net, &x)?; // warm-up: page faults, rayon pool
        let times: Vec<f64> = (0..reps)
            .map(|_| run(&net, &x).map(|r| r.0))
            .collect::<Result<_, _>>()?;
        let t = median(times);
        println!(
            "| {mode} | {:.0} | {:.0} |",
            1e3 * t / batch as f64,
            gflop / t
        );
    }
    Ok(())
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    match args.first().map(String::as_str) {
        Some("--serve") => serve(),
        Some("--steps") => steps(&args[1..]),
        _ => {
            eprintln!("usage: drn --serve | drn --steps [ARCH] [SIZE] [BATCH] [REPS]");
            steps(&[])
        }
    }
}
