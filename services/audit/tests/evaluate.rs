//! Known-answer tests of the evaluation: primitives, file parsing, undefined metrics, JSON shape.

use std::path::{Path, PathBuf};

use fracture_audit::evaluate::{
    auc, evaluate, to_html, to_markdown, wilson, EvalError, EvalOptions, Evaluation,
};

const HEADER: &str = "sop_instance_uid,region,fracture,x0,y0,x1,y1";

fn finding(uid: &str, region: &str, score: f64, fracture: bool) -> String {
    format!(
        r#"{{"input":"in","study_instance_uid":"2.25.1","sop_instance_uid":"{uid}","region":"{region}","score":{score},"threshold":0.5,"fracture":{fracture},"boxes":[{{"x0":1,"y0":2,"x1":3,"y1":4}}],"model_version":"v1"}}"#
    )
}

struct Files {
    _dir: tempfile::TempDir,
    preds: PathBuf,
    labels: PathBuf,
}

fn files(preds: &[String], labels: &str) -> Files {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("findings.jsonl");
    let l = dir.path().join("labels.csv");
    std::fs::write(&p, preds.join("\n") + "\n").unwrap();
    std::fs::write(&l, labels).unwrap();
    Files {
        _dir: dir,
        preds: p,
        labels: l,
    }
}

fn run(f: &Files, bootstrap: usize) -> Result<Evaluation, EvalError> {
    evaluate(
        &f.preds,
        &f.labels,
        &EvalOptions {
            bootstrap,
            seed: 11,
        },
    )
}

#[test]
fn auc_known_answers() {
    // Perfect separation.
    assert_eq!(
        auc(&[0.1, 0.2, 0.8, 0.9], &[false, false, true, true]),
        Some(1.0)
    );
    // Perfectly wrong.
    assert_eq!(
        auc(&[0.9, 0.8, 0.2, 0.1], &[false, false, true, true]),
        Some(0.0)
    );
    // All tied: every pair counts 1/2.
    assert_eq!(
        auc(&[0.5; 6], &[true, false, true, false, false, true]),
        Some(0.5)
    );
    // By hand: positives {0.4, 0.6, 0.6}, negatives {0.2, 0.4, 0.6, 0.7}.
    // 0.4 beats 0.2, ties 0.4: 1.5; each 0.6 beats 0.2, 0.4, ties 0.6: 2.5 each. U = 6.5 of 12.
    let s = [0.4, 0.6, 0.6, 0.2, 0.4, 0.6, 0.7];
    let l = [true, true, true, false, false, false, false];
    assert_eq!(auc(&s, &l), Some(6.5 / 12.0));
    // Undefined.
    assert_eq!(auc(&[0.1, 0.2], &[true, true]), None);
    assert_eq!(auc(&[0.1, 0.2], &[false, false]), None);
    assert_eq!(auc(&[], &[]), None);
    assert_eq!(auc(&[0.1, f64::NAN], &[true, false]), None);
    assert_eq!(auc(&[0.1], &[true, false]), None);
}

#[test]
fn wilson_known_answers() {
    // statsmodels proportion_confint(0, 10, method="wilson") = (0.0, 0.27753279986288926).
    let (lo, hi) = wilson(0, 10).unwrap();
    assert_eq!(lo, 0.0);
    assert!((hi - 0.277_532_799_862_889_26).abs() < 1e-12, "{hi}");
    let (lo, hi) = wilson(10, 10).unwrap();
    assert!((lo - 0.722_467_200_137_110_6).abs() < 1e-12, "{lo}");
    assert_eq!(hi, 1.0);
    assert_eq!(wilson(0, 0), None);
    assert_eq!(wilson(3, 2), None);
}

/// Three positives (one with two boxes), three negatives; regions wrist and knee.
fn small_case() -> Files {
    let preds = vec![
        finding("1.1", "wrist", 0.9, true),
        finding("1.2", "wrist", 0.7, true),
        finding("1.3", "knee", 0.4, false),
        finding("1.4", "wrist", 0.6, true),
        finding("1.5", "knee", 0.2, false),
        finding("1.6", "knee", 0.1, false),
        finding("9.9", "knee", 0.5, true), // no label
    ];
    let labels = format!(
        "{HEADER}\n\
         1.1,wrist,1,10,10,20,20\n\
         1.1,wrist,1,30,30,40,40\n\
         1.2,wrist,true,1,1,5,5\n\
         1.3,knee,1,1,1,2,2\n\
         1.4,wrist,0,,,,\n\
         1.5,knee,false,,,,\n\
         1.6,knee,0,,,,\n\
         8.8,knee,0,,,,\n"
    );
    files(&preds, &labels)
}

#[test]
fn multiple_box_rows_count_once_and_exclusions_are_counted() {
    let f = small_case();
    let e = run(&f, 200).unwrap();
    assert_eq!(e.overall.n, 6);
    assert_eq!(e.overall.positives, 3);
    assert_eq!(e.excluded.predictions_without_label, 1);
    assert_eq!(e.excluded.labels_without_prediction, 1);
    // Positives 0.9, 0.7, 0.4; negatives 0.6, 0.2, 0.1: U = 3 + 3 + 2 = 8 of 9.
    assert_eq!(e.overall.auc.value, Some(8.0 / 9.0));
    // Calls: TP 2 (1.1, 1.2), FN 1 (1.3), FP 1 (1.4), TN 2.
    assert_eq!(e.overall.sensitivity.value, Some(2.0 / 3.0));
    assert_eq!(e.overall.sensitivity.ci, wilson(2, 3).map(|(a, b)| [a, b]));
    assert_eq!(e.overall.specificity.value, Some(2.0 / 3.0));
    assert_eq!(e.overall.ppv.value, Some(2.0 / 3.0));
    assert_eq!(e.overall.npv.value, Some(2.0 / 3.0));
    let [lo, hi] = e.overall.auc.ci.unwrap();
    assert!(lo <= 8.0 / 9.0 && 8.0 / 9.0 <= hi && 0.0 <= lo && hi <= 1.0);
    assert_eq!(e.regions.len(), 2);
    assert_eq!(e.regions["wrist"].n, 3);
    assert_eq!(e.regions["wrist"].positives, 2);
    // No subgroup columns, no subgroups.
    assert!(e.subgroups.no_disagreement.is_none());
    assert!(e.subgroups.without.is_empty());
}

#[test]
fn undefined_metrics_are_null_with_a_reason() {
    let f = small_case();
    let e = run(&f, 100).unwrap();
    // knee: one positive called negative, two negatives called negative: no predicted positive.
    let knee = &e.regions["knee"];
    assert_eq!(knee.ppv.value, None);
    assert!(knee
        .ppv
        .reason
        .as_deref()
        .unwrap()
        .contains("called positive"));
    let json = serde_json::to_value(&e).unwrap();
    assert_eq!(
        json["regions"]["knee"]["ppv"]["value"],
        serde_json::Value::Null
    );
    assert_eq!(
        json["regions"]["knee"]["ppv"]["ci"],
        serde_json::Value::Null
    );
    assert!(json["regions"]["knee"]["ppv"]["reason"].is_string());

    // All negatives: AUC and sensitivity undefined.
    let g = files(
        &[
            finding("2.1", "hip", 0.3, false),
            finding("2.2", "hip", 0.8, true),
        ],
        &format!("{HEADER}\n2.1,hip,0,,,,\n2.2,hip,0,,,,\n"),
    );
    let e = run(&g, 100).unwrap();
    assert_eq!(e.overall.auc.value, None);
    assert!(e
        .overall
        .auc
        .reason
        .as_deref()
        .unwrap()
        .contains("no positive"));
    assert_eq!(e.overall.sensitivity.value, None);
    assert_eq!(e.overall.specificity.value, Some(0.5));
    assert_eq!(e.overall.ppv.value, Some(0.0));
    let text = serde_json::to_string(&e).unwrap();
    assert!(!text.contains("NaN") && !text.contains("null,\"ci\":["));
}

#[test]
fn json_shape() {
    let preds: Vec<String> = (0..40)
        .map(|i| {
            finding(
                &format!("3.{i}"),
                if i % 2 == 0 { "hand" } else { "foot" },
                (i % 10) as f64 / 10.0,
                i % 10 >= 5,
            )
        })
        .collect();
    let mut labels = format!("{HEADER},disagreement,callus,lucent_line\n");
    for i in 0..40 {
        let region = if i % 2 == 0 { "hand" } else { "foot" };
        if i % 3 == 0 || i % 10 >= 7 {
            labels.push_str(&format!(
                "3.{i},{region},1,0,0,1,1,{},{},{}\n",
                u8::from(i % 7 == 0),
                i % 2,
                u8::from(i % 4 == 0)
            ));
        } else {
            labels.push_str(&format!(
                "3.{i},{region},0,,,,,{},,\n",
                u8::from(i % 11 == 0)
            ));
        }
    }
    let f = files(&preds, &labels);
    let e = run(&f, 50).unwrap();
    let v = serde_json::to_value(&e).unwrap();
    let keys = |v: &serde_json::Value| -> Vec<String> {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(
        keys(&v),
        ["bootstrap", "excluded", "overall", "regions", "subgroups"]
    );
    assert_eq!(
        keys(&v["overall"]),
        [
            "auc",
            "n",
            "npv",
            "positives",
            "ppv",
            "sensitivity",
            "specificity"
        ]
    );
    assert_eq!(keys(&v["overall"]["auc"]), ["ci", "value"]);
    assert_eq!(v["overall"]["auc"]["ci"].as_array().unwrap().len(), 2);
    assert_eq!(keys(&v["regions"]), ["foot", "hand"]);
    assert_eq!(
        keys(&v["subgroups"]),
        ["no_disagreement", "without_callus", "without_lucent_line"]
    );
    assert_eq!(
        keys(&v["subgroups"]["no_disagreement"]),
        [
            "auc",
            "n",
            "npv",
            "positives",
            "ppv",
            "regions",
            "sensitivity",
            "specificity"
        ]
    );
    assert_eq!(
        keys(&v["subgroups"]["without_callus"]),
        ["auc", "n", "positives", "sensitivity"]
    );
    assert_eq!(
        keys(&v["excluded"]),
        ["labels_without_prediction", "predictions_without_label"]
    );
    assert_eq!(
        v["bootstrap"],
        serde_json::json!({"resamples": 50, "seed": 11})
    );
    // Subgroup populations: negatives all kept, positives with the indicator dropped.
    let negatives = e.overall.n - e.overall.positives;
    let callus = &e.subgroups.without["without_callus"];
    assert_eq!(callus.n - callus.positives, negatives);
    assert!(callus.positives < e.overall.positives);
    let nd = e.subgroups.no_disagreement.as_ref().unwrap();
    assert!(nd.metrics.n < e.overall.n);
    // Round trip.
    let back: Evaluation = serde_json::from_value(v).unwrap();
    assert_eq!(back, e);
    // Reports.
    let md = to_markdown(&e);
    assert!(md.contains("## All radiographs") && md.contains("| foot |"));
    assert!(md.contains("## No reader disagreement"));
    assert!(md.contains("positives without lucent line"));
    let html = to_html(&e);
    assert!(html.starts_with("<!DOCTYPE html>") && html.contains("</html>"));
    assert!(!html.contains("http://") && !html.contains("https://") && !html.contains("<script"));
}

#[test]
fn bootstrap_is_deterministic_for_a_seed() {
    let preds: Vec<String> = (0..300)
        .map(|i| {
            finding(
                &format!("4.{i}"),
                "elbow",
                ((i * 7919) % 100) as f64 / 100.0,
                (i * 7919) % 100 >= 50,
            )
        })
        .collect();
    let mut labels = format!("{HEADER}\n");
    for i in 0..300 {
        let pos = (i * 7919) % 100 >= 70 || i % 9 == 0;
        labels.push_str(&if pos {
            format!("4.{i},elbow,1,,,,\n")
        } else {
            format!("4.{i},elbow,0,,,,\n")
        });
    }
    let f = files(&preds, &labels);
    let a = run(&f, 300).unwrap();
    let b = run(&f, 300).unwrap();
    assert_eq!(a, b);
    let c = evaluate(
        &f.preds,
        &f.labels,
        &EvalOptions {
            bootstrap: 300,
            seed: 12,
        },
    )
    .unwrap();
    assert_ne!(a.overall.auc.ci, c.overall.auc.ci);
    // The same radiographs in another order give the same intervals.
    let mut reversed = preds.clone();
    reversed.reverse();
    let g = files(&reversed, &labels);
    assert_eq!(run(&g, 300).unwrap(), a);
}

#[test]
fn bootstrap_zero_gives_values_without_intervals() {
    let f = small_case();
    let e = run(&f, 0).unwrap();
    assert_eq!(e.overall.auc.value, Some(8.0 / 9.0));
    assert_eq!(e.overall.auc.ci, None);
    assert!(e.overall.auc.reason.is_some());
    assert!(e.overall.sensitivity.ci.is_some());
}

fn error_text(preds: &[String], labels: &str) -> String {
    let f = files(preds, labels);
    run(&f, 10).unwrap_err().to_string()
}

fn assert_names(err: &str, file: &str, line: usize, what: &str) {
    assert!(
        err.contains(file) && err.contains(&format!("line {line}:")) && err.contains(what),
        "{err}"
    );
}

#[test]
fn bad_rows_name_file_line_and_problem() {
    let ok = vec![finding("5.1", "hip", 0.3, false)];
    assert_names(
        &error_text(
            &ok,
            &format!("{HEADER}\n5.1,hip,0,,,,\n5.2,hip,maybe,,,,\n"),
        ),
        "labels.csv",
        3,
        "fracture is \"maybe\"",
    );
    assert_names(
        &error_text(&ok, &format!("{HEADER}\n5.1,hip,0,,,\n")),
        "labels.csv",
        2,
        "has 6 fields but the header has 7",
    );
    assert_names(
        &error_text(&ok, &format!("{HEADER}\n5.1,hip,1,a,1,2,3\n")),
        "labels.csv",
        2,
        "x0",
    );
    assert_names(
        &error_text(
            &ok,
            &format!("{HEADER}\n5.1,hip,1,1,1,2,2\n5.1,hip,0,,,,\n"),
        ),
        "labels.csv",
        3,
        "differs from line 2",
    );
    assert_names(
        &error_text(&ok, &format!("{HEADER}\n5.1,hip,0,1,1,2,2\n")),
        "labels.csv",
        2,
        "negatives have empty box fields",
    );
    assert_names(
        &error_text(&ok, "sop_instance_uid,fracture\n5.1,0\n"),
        "labels.csv",
        1,
        "no \"region\" column",
    );
    assert_names(
        &error_text(&ok, &format!("{HEADER}\n\"5.1,hip,0,,,,\n")),
        "labels.csv",
        2,
        "never closed",
    );
    let bad_json = vec![
        ok[0].clone(),
        r#"{"sop_instance_uid":"5.2","region":"hip","fracture":true}"#.to_string(),
    ];
    assert_names(
        &error_text(&bad_json, &format!("{HEADER}\n5.1,hip,0,,,,\n")),
        "findings.jsonl",
        2,
        "missing field `score`",
    );
    let not_json = vec![ok[0].clone(), "not json".to_string()];
    assert_names(
        &error_text(&not_json, &format!("{HEADER}\n5.1,hip,0,,,,\n")),
        "findings.jsonl",
        2,
        "not a finding object",
    );
    let dup = vec![ok[0].clone(), ok[0].clone()];
    assert_names(
        &error_text(&dup, &format!("{HEADER}\n5.1,hip,0,,,,\n")),
        "findings.jsonl",
        2,
        "already scored on line 1",
    );
    // Nothing in common.
    let err = error_text(&ok, &format!("{HEADER}\n6.1,hip,0,,,,\n"));
    assert!(err.contains("none of the 1 predictions"), "{err}");
    // A missing file.
    let e = evaluate(
        Path::new("/nonexistent/findings.jsonl"),
        Path::new("/nonexistent/labels.csv"),
        &EvalOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(e, EvalError::Io { .. }) && e.to_string().contains("/nonexistent/findings.jsonl")
    );
}

#[test]
fn region_falls_back_to_the_label() {
    let preds = vec![
        r#"{"sop_instance_uid":"7.1","score":0.9,"fracture":true}"#.to_string(),
        r#"{"sop_instance_uid":"7.2","region":"","score":0.1,"fracture":false}"#.to_string(),
        r#"{"sop_instance_uid":"7.3","region":"knee","score":0.2,"fracture":false}"#.to_string(),
    ];
    let f = files(
        &preds,
        &format!("{HEADER}\n7.1,ankle,1,,,,\n7.2,ankle,0,,,,\n7.3,,0,,,,\n"),
    );
    let e = run(&f, 10).unwrap();
    assert_eq!(e.regions.keys().collect::<Vec<_>>(), ["ankle", "knee"]);
    assert_eq!(e.regions["ankle"].n, 2);
}
