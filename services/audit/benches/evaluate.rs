//! Times the full evaluation of 100,000 predictions with 1000 bootstrap resamples.

use std::fmt::Write as _;
use std::time::Instant;

use fracture_audit::evaluate::{evaluate, to_html, to_markdown, EvalOptions};

const N: usize = 100_000;
/// The project's region taxonomy, so the bench exercises the names real findings carry.
use fracture_shared::region::REGIONS;

/// SplitMix64, so the data is the same on every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let (preds, labels) = (
        dir.path().join("findings.jsonl"),
        dir.path().join("labels.csv"),
    );
    let mut rng = Rng(1);
    let mut p = String::new();
    let mut l = String::from(
        "sop_instance_uid,region,fracture,x0,y0,x1,y1,disagreement,callus,displacement,angulation,comminution,lucent_line\n",
    );
    for i in 0..N {
        let region = REGIONS[i % REGIONS.len()];
        let positive = rng.unit() < 0.15;
        // Scores as the model emits them: f32, positives shifted up.
        let score = (rng.unit() * 0.7 + if positive { 0.3 } else { 0.0 }) as f32;
        let uid = format!("2.25.{i}");
        writeln!(
            p,
            r#"{{"input":"bench","study_instance_uid":"2.25.9","sop_instance_uid":"{uid}","region":"{region}","score":{score},"threshold":0.5,"fracture":{},"boxes":[],"model_version":"bench"}}"#,
            score >= 0.5
        )?;
        let dis = u8::from(rng.unit() < 0.08);
        if positive {
            let boxes = 1 + (rng.next() % 2) as usize;
            let ind: Vec<u8> = (0..5).map(|_| u8::from(rng.unit() < 0.3)).collect();
            for b in 0..boxes {
                writeln!(
                    l,
                    "{uid},{region},1,{b},{b},{},{},{dis},{},{},{},{},{}",
                    b + 10,
                    b + 10,
                    ind[0],
                    ind[1],
                    ind[2],
                    ind[3],
                    ind[4]
                )?;
            }
        } else {
            writeln!(l, "{uid},{region},0,,,,,{dis},,,,,")?;
        }
    }
    std::fs::write(&preds, p)?;
    std::fs::write(&labels, l)?;

    let opts = EvalOptions {
        bootstrap: 1000,
        seed: 7,
    };
    let t = Instant::now();
    let e = evaluate(&preds, &labels, &opts)?;
    let elapsed = t.elapsed();
    let md = to_markdown(&e);
    let html = to_html(&e);
    println!(
        "evaluate: {N} predictions, {} bootstrap resamples, {} regions, {} subgroups: {:.2} s on {} threads (AUC {:.4}; markdown {} B, html {} B)",
        opts.bootstrap,
        e.regions.len(),
        e.subgroups.without.len() + usize::from(e.subgroups.no_disagreement.is_some()),
        elapsed.as_secs_f64(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        e.overall.auc.value.unwrap_or(f64::NAN),
        md.len(),
        html.len()
    );
    // FRACTURE_BENCH_REPORT=DIR keeps the rendered reports for a look.
    if let Some(out) = std::env::var_os("FRACTURE_BENCH_REPORT") {
        let out = std::path::PathBuf::from(out);
        std::fs::write(out.join("evaluation.md"), md)?;
        std::fs::write(out.join("evaluation.html"), html)?;
        std::fs::write(
            out.join("evaluation.json"),
            serde_json::to_string_pretty(&e)?,
        )?;
    }
    Ok(())
}
