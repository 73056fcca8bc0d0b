//! The pre-processing transform's speed, for `scripts/bench/preprocess-bench.sh`, which runs it
//! interleaved with the OpenCV + numpy peer (`scripts/bench/preprocess_cv.py`) on the same images.
//!
//! A plain binary (no criterion): the script needs one number per invocation, in the same form as
//! the Python side prints, so the two can be run alternately and their medians compared.
//!
//! ```text
//! transform npy  IN.dcm OUT.npy         decode with fracture_shared::pixels, write the [0, 1] f32
//!                                       image the transform reads (the peer's decode-excluded input)
//! transform time IN.npy|IN.dcm ITERS    ms per image: .npy = transform only (decode excluded),
//!                                       .dcm = read + decode + transform (decode included)
//! transform lcn  IN.npy RAW.npy LCN.npy  write the raw and LCN canvases for the agreement check
//! transform decode IN.dcm ITERS          ms of each decode step: read, parse, pixels, normalise
//! ```
//!
//! Every command prints one JSON line on stdout. Threads: rayon's global pool, so
//! RAYON_NUM_THREADS sets them.

use std::error::Error;
use std::hint::black_box;
use std::path::Path;
use std::time::Instant;

use fracture_models::{transform, TransformConfig, Transformed};
use fracture_shared::pixels;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// Iterations run and thrown away before timing: page faults, rayon's pool start, caches.
const WARMUP: usize = 2;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let outcome = match args.as_slice() {
        ["npy", dcm, out] => write_npy_from_dicom(Path::new(dcm), Path::new(out)),
        ["time", input, iters] => iters
            .parse()
            .map_err(|e| format!("ITERS {iters:?}: {e}").into())
            .and_then(|n| time(Path::new(input), n)),
        ["decode", input, iters] => iters
            .parse()
            .map_err(|e| format!("ITERS {iters:?}: {e}").into())
            .and_then(|n| time_decode(Path::new(input), n)),
        ["lcn", input, raw, lcn] => write_outputs(Path::new(input), Path::new(raw), Path::new(lcn)),
        [] => {
            // `cargo bench` with no arguments: nothing to measure without the fixtures.
            eprintln!("usage: see the top of models/benches/transform.rs");
            Ok(())
        }
        _ => Err("usage: see the top of models/benches/transform.rs".into()),
    };
    if let Err(e) = outcome {
        eprintln!("transform bench: {e}");
        std::process::exit(1);
    }
}

fn decode(path: &Path) -> Result<pixels::Radiograph> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let obj = pixels::read_object(&bytes)?;
    Ok(pixels::decode(&obj)?)
}

fn write_npy_from_dicom(dcm: &Path, out: &Path) -> Result<()> {
    let r = decode(dcm)?;
    npy::write(out, &r.pixels, r.height, r.width)?;
    println!(
        "{{\"width\": {}, \"height\": {}, \"path\": {:?}}}",
        r.width,
        r.height,
        out.display().to_string()
    );
    Ok(())
}

fn geometry_json(t: &Transformed) -> String {
    format!(
        "\"crop\": [{}, {}, {}, {}], \"scale\": {:.9}, \"size\": {}",
        t.crop[0], t.crop[1], t.crop[2], t.crop[3], t.scale, t.size
    )
}

fn time(input: &Path, iters: usize) -> Result<()> {
    let cfg = TransformConfig::default();
    let decode_included = input.extension().is_some_and(|e| e == "dcm");
    let preloaded = if decode_included {
        None
    } else {
        Some(npy::read(input)?)
    };
    let run = || -> Result<Transformed> {
        match &preloaded {
            Some((pixels, h, w)) => Ok(transform(pixels, *w, *h, &cfg)?),
            None => {
                let r = decode(input)?;
                Ok(transform(&r.pixels, r.width, r.height, &cfg)?)
            }
        }
    };
    let mut last = None;
    for _ in 0..WARMUP {
        last = Some(black_box(run()?));
    }
    let mut ms = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let start = Instant::now();
        let t = black_box(run()?);
        ms.push(start.elapsed().as_secs_f64() * 1e3);
        last = Some(t);
    }
    ms.sort_by(f64::total_cmp);
    let t = last.ok_or("no iteration ran")?;
    println!(
        "{{\"impl\": \"fracture\", \"decode\": {decode_included}, \"median_ms\": {:.3}, \
         \"min_ms\": {:.3}, \"iters\": {}, \"threads\": {}, {}}}",
        ms[ms.len() / 2],
        ms[0],
        ms.len(),
        rayon::current_num_threads(),
        geometry_json(&t)
    );
    Ok(())
}

/// Where decode-included time goes: the steps of `pixels::decode`, each timed on its own.
fn time_decode(input: &Path, iters: usize) -> Result<()> {
    let mut steps: [Vec<f64>; 4] = Default::default();
    for i in 0..WARMUP + iters.max(1) {
        let t0 = Instant::now();
        let bytes = black_box(std::fs::read(input)?);
        let t1 = Instant::now();
        let obj = black_box(pixels::read_object(&bytes)?);
        let t2 = Instant::now();
        let values = black_box(pixels::decode_values(&obj)?);
        let t3 = Instant::now();
        black_box(pixels::normalise(&values.values, values.monochrome1));
        let t4 = Instant::now();
        if i >= WARMUP {
            for (s, (a, b)) in steps
                .iter_mut()
                .zip([(t0, t1), (t1, t2), (t2, t3), (t3, t4)])
            {
                s.push((b - a).as_secs_f64() * 1e3);
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let [read, parse, decode, normalise] = &mut steps;
    println!(
        "{{\"read_ms\": {:.3}, \"parse_ms\": {:.3}, \"decode_values_ms\": {:.3}, \"normalise_ms\": {:.3}}}",
        median(read),
        median(parse),
        median(decode),
        median(normalise)
    );
    Ok(())
}

fn write_outputs(input: &Path, raw: &Path, lcn: &Path) -> Result<()> {
    let (pixels, h, w) = npy::read(input)?;
    let t = transform(&pixels, w, h, &TransformConfig::default())?;
    npy::write(raw, &t.raw, t.size, t.size)?;
    npy::write(lcn, &t.lcn, t.size, t.size)?;
    println!("{{{}}}", geometry_json(&t));
    Ok(())
}

/// Just enough of NumPy's .npy format (version 1.0, little-endian f32, C order, 2-D) to hand
/// images to and from the Python peer.
mod npy {
    use super::Result;
    use std::path::Path;

    const MAGIC: &[u8] = b"\x93NUMPY\x01\x00";

    pub fn write(path: &Path, data: &[f32], rows: usize, cols: usize) -> Result<()> {
        let mut header =
            format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
        // Magic, 2-byte length, header and newline together a multiple of 64 bytes.
        let unpadded = MAGIC.len() + 2 + header.len() + 1;
        header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
        header.push('\n');
        let mut out = Vec::with_capacity(MAGIC.len() + 2 + header.len() + data.len() * 4);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&u16::try_from(header.len())?.to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        for v in data {
            out.extend_from_slice(&v.to_le_bytes());
        }
        std::fs::write(path, out).map_err(|e| format!("{}: {e}", path.display()).into())
    }

    /// The pixels, rows and columns of a 2-D little-endian f32 array.
    pub fn read(path: &Path) -> Result<(Vec<f32>, usize, usize)> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let bad = |why: &str| format!("{}: {why}", path.display());
        if bytes.len() < 10 || &bytes[..8] != MAGIC {
            return Err(bad("not a version 1.0 .npy file").into());
        }
        let len = usize::from(u16::from_le_bytes([bytes[8], bytes[9]]));
        let header = std::str::from_utf8(bytes.get(10..10 + len).ok_or_else(|| bad("short"))?)?;
        if !header.contains("'descr': '<f4'") || header.contains("'fortran_order': True") {
            return Err(bad("only little-endian float32 in C order is read").into());
        }
        let shape = header
            .split("'shape': (")
            .nth(1)
            .and_then(|s| s.split(')').next())
            .ok_or_else(|| bad("no shape"))?;
        let dims: Vec<usize> = shape
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::parse)
            .collect::<std::result::Result<_, _>>()?;
        let [rows, cols] = dims[..] else {
            return Err(bad("not a 2-D array").into());
        };
        let body = &bytes[10 + len..];
        if body.len() != rows * cols * 4 {
            return Err(bad("data length does not match the shape").into());
        }
        let data = body
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok((data, rows, cols))
    }
}
