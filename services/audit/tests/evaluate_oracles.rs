//! Exactness against the reference implementations: scikit-learn's `roc_auc_score` and statsmodels' Wilson interval.
//!
//! The Python side comes from `scripts/pyenv.sh` (a pinned venv, made once); if it cannot be made
//! this test fails rather than skips, since then nothing checks the numbers.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use fracture_audit::evaluate::{auc, wilson};
use serde_json::{json, Value};

const TOLERANCE: f64 = 1e-9;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn venv_python() -> PathBuf {
    let root = repo_root();
    let out = Command::new("bash")
        .arg(root.join("scripts/pyenv.sh"))
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run bash scripts/pyenv.sh: {e}"));
    assert!(
        out.status.success(),
        "scripts/pyenv.sh failed ({}); it needs Python 3.11+ with venv and PyPI access the first time",
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout
        .lines()
        .last()
        .unwrap_or_else(|| panic!("scripts/pyenv.sh printed no python path"));
    PathBuf::from(last.trim())
}

fn oracle(request: &Value) -> Value {
    let python = venv_python();
    let script = repo_root().join("scripts/oracles/evaluate_oracles.py");
    let mut child = Command::new(&python)
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(request.to_string().as_bytes())
        .expect("write the request to the oracle");
    let out = child.wait_with_output().expect("oracle output");
    assert!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        out.status
    );
    serde_json::from_slice(&out.stdout).expect("the oracle prints JSON")
}

/// SplitMix64: reproducible data without a dependency.
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

#[test]
fn auc_and_wilson_match_sklearn_and_statsmodels() {
    let mut rng = Rng(20200101);
    let mut auc_cases: Vec<(Vec<f64>, Vec<bool>)> = Vec::new();
    for &n in &[2usize, 3, 4, 5, 7, 10, 25, 50, 100, 333, 1000, 5000, 20000] {
        for decimals in [1i32, 2] {
            let scale = 10f64.powi(decimals);
            let prevalence = 0.05 + 0.5 * rng.unit();
            let mut labels: Vec<bool> = (0..n).map(|_| rng.unit() < prevalence).collect();
            labels[0] = true;
            labels[1] = false;
            // Informative but overlapping scores, rounded so that ties are common.
            let scores: Vec<f64> = labels
                .iter()
                .map(|&l| {
                    let s = (0.6 * rng.unit() + if l { 0.3 } else { 0.0 }).min(1.0);
                    (s * scale).round() / scale
                })
                .collect();
            auc_cases.push((scores, labels));
        }
    }
    // All tied; one class only (both sides must refuse).
    auc_cases.push((
        vec![0.5; 8],
        vec![true, false, false, true, false, true, true, false],
    ));
    auc_cases.push((vec![0.1, 0.2, 0.3], vec![true, true, true]));
    auc_cases.push((vec![0.1, 0.2], vec![false, false]));

    let mut wilson_cases: Vec<(u64, u64)> = vec![(0, 1), (1, 1), (0, 10), (10, 10), (1, 2), (0, 0)];
    for &n in &[3u64, 7, 17, 100, 1000, 12345, 1_000_000] {
        wilson_cases.push((0, n));
        wilson_cases.push((n, n));
        wilson_cases.push((rng.next() % (n + 1), n));
        wilson_cases.push((1, n));
        wilson_cases.push((n - 1, n));
    }

    let request = json!({
        "auc": auc_cases.iter().map(|(s, l)| json!({"scores": s, "labels": l})).collect::<Vec<_>>(),
        "wilson": wilson_cases.iter().map(|&(k, n)| json!({"successes": k, "n": n})).collect::<Vec<_>>(),
    });
    let reply = oracle(&request);

    let mut max_auc = 0f64;
    for (i, ((scores, labels), want)) in auc_cases
        .iter()
        .zip(reply["auc"].as_array().expect("auc array"))
        .enumerate()
    {
        let got = auc(scores, labels);
        match (got, want.as_f64()) {
            (None, None) => {}
            (Some(g), Some(w)) => {
                let d = (g - w).abs();
                max_auc = max_auc.max(d);
                assert!(
                    d <= TOLERANCE,
                    "AUC case {i} (n = {}): ours {g}, sklearn {w}",
                    scores.len()
                );
            }
            (g, _) => panic!("AUC case {i}: ours {g:?}, sklearn {want}"),
        }
    }
    let mut max_wilson = 0f64;
    for (&(k, n), want) in wilson_cases
        .iter()
        .zip(reply["wilson"].as_array().expect("wilson array"))
    {
        match (wilson(k, n), want.as_array()) {
            (None, None) => {}
            (Some((lo, hi)), Some(w)) => {
                let (wlo, whi) = (
                    w[0].as_f64().unwrap_or(f64::NAN),
                    w[1].as_f64().unwrap_or(f64::NAN),
                );
                let d = (lo - wlo).abs().max((hi - whi).abs());
                max_wilson = max_wilson.max(d);
                assert!(
                    d <= TOLERANCE,
                    "Wilson {k}/{n}: ours ({lo}, {hi}), statsmodels ({wlo}, {whi})"
                );
            }
            (g, _) => panic!("Wilson {k}/{n}: ours {g:?}, statsmodels {want}"),
        }
    }
    println!(
        "oracles {}: {} AUC cases, max |diff| {max_auc:e}; {} Wilson cases, max |diff| {max_wilson:e}",
        reply["versions"],
        auc_cases.len(),
        wilson_cases.len()
    );
}
