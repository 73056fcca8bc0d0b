//! `fracture scan --labels`: reference reads keyed by original UIDs meet the pseudonymised
//! findings, are stored by the audit sink, and are evaluated into metrics.json.

mod common;

use std::process::Command;

use dicom_dictionary_std::tags;

const BIN: &str = env!("CARGO_BIN_EXE_fracture");

fn sop_uid(path: &std::path::Path) -> String {
    let obj = dicom_object::open_file(path).unwrap();
    obj.element(tags::SOP_INSTANCE_UID)
        .unwrap()
        .to_str()
        .unwrap()
        .trim_end_matches('\0')
        .to_string()
}

#[tokio::test]
async fn labels_are_pseudonymised_stored_and_evaluated() {
    let work = tempfile::tempdir().unwrap();
    let fx = common::fixtures();
    let inputs = work.path().join("in");
    std::fs::create_dir_all(&inputs).unwrap();
    std::fs::copy(fx.join("RG3_UNCR.dcm"), inputs.join("rg3.dcm")).unwrap();
    std::fs::copy(fx.join("cat.dcm"), inputs.join("cat.dcm")).unwrap();
    let (rg3, cat) = (
        sop_uid(&inputs.join("rg3.dcm")),
        sop_uid(&inputs.join("cat.dcm")),
    );
    let labels = work.path().join("reads.csv");
    std::fs::write(
        &labels,
        format!("sop_instance_uid,region,fracture,x0,y0,x1,y1\n{rg3},tibia_fibula,1,10,10,50,50\n{rg3},tibia_fibula,1,60,60,90,90\n{cat},,0,,,,\n"),
    )
    .unwrap();
    let out = work.path().join("out");
    let st = Command::new(BIN)
        .arg("scan")
        .arg(&inputs)
        .arg("--out")
        .arg(&out)
        .arg("--labels")
        .arg(&labels)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );

    let written = std::fs::read_to_string(out.join("labels.csv")).unwrap();
    assert!(
        !written.contains(&rg3) && !written.contains(&cat),
        "original UIDs never leave the edge in labels.csv"
    );
    let findings: Vec<serde_json::Value> = std::fs::read_to_string(out.join("findings.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for f in &findings {
        assert!(
            written.contains(f["sop_instance_uid"].as_str().unwrap()),
            "labels keyed like findings"
        );
    }
    let metrics: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["overall"]["n"], 2);
    assert_eq!(metrics["overall"]["positives"], 1);
    assert_eq!(metrics["excluded"]["labels_without_prediction"], 0);
    let db = fracture_audit::AuditDb::open(&format!("sqlite://{}", out.join("audit.db").display()))
        .await
        .unwrap();
    assert_eq!(db.count_labels().await.unwrap(), 2);
    let cases = db.cases(None, None).await.unwrap();
    assert!(
        cases.iter().all(|c| c.label.is_some()),
        "every finding met its label"
    );
    db.close().await;
    assert!(std::fs::read_to_string(out.join("report.html"))
        .unwrap()
        .contains("Against the reference reads"));
}
