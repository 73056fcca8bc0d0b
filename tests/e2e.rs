//! End to end: five `fracture serve` processes on a real Kafka broker, fed real radiographs and
//! broken files, must give one finding per good file and one dead letter per bad one, nothing
//! else; and `fracture scan` on the same inputs, in one process, must give the same findings.

mod common;

use common::pipeline::{self, Pipeline, RunConfig};

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use fracture_shared::bus::{Bus, KafkaBus, KafkaConfig, Record, Topics};
use fracture_shared::messages::{decode, DeadLetter, Deidentified, Finding, Preprocessed, Scored};
use fracture_shared::testkit;

/// Reads every committed record on `topics` until `want` arrived (or 240 s), then a little longer
/// to catch anything extra.
async fn collect(
    bus: &KafkaBus,
    group: &str,
    topics: &[String],
    want: usize,
) -> Vec<fracture_shared::Record> {
    let mut io = bus.consumer(group, topics, group).await.unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    while got.len() < want && Instant::now() < deadline {
        got.extend(
            io.poll_batch(100, Duration::from_millis(20), Duration::from_millis(500))
                .await
                .unwrap(),
        );
    }
    got.extend(
        io.poll_batch(100, Duration::from_millis(20), Duration::from_secs(3))
            .await
            .unwrap(),
    );
    io.close().await.unwrap();
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_serve_processes_on_kafka_then_scan_agree() {
    let keep = tempfile::tempdir().unwrap();
    let work = keep.path().to_path_buf();
    eprintln!("e2e work folder: {}", work.display());
    let inputs = common::build_inputs(&work.join("inputs"));
    let key = work.join("deid.key");
    std::fs::write(&key, [7u8; 32]).unwrap();

    // (a) Five processes on a real broker.
    let brokers = testkit::kafka_brokers();
    let prefix = testkit::unique_prefix("e2e");
    let kdir = work.join("kafka-run");
    std::fs::create_dir_all(&kdir).unwrap();
    let (otlp, spans) = pipeline::otlp_receiver().await;
    let manifest = pipeline::repo().join("models/untrained/ensemble.toml");
    let cfg = pipeline::write_config(
        &kdir,
        &RunConfig {
            brokers: &brokers,
            prefix: &prefix,
            key: &key,
            otlp: &otlp,
            manifest: &manifest,
            extra: "",
        },
    );
    let started = Instant::now();
    let mut stages = Pipeline::new(&kdir, &cfg, std::slice::from_ref(&inputs.dir));
    stages.start_all();
    let bus = KafkaBus::new(KafkaConfig {
        brokers: brokers.clone(),
        ..Default::default()
    });
    let topics = Topics::new(&prefix);
    let want = inputs.good.len() + inputs.bad.len();
    let out = collect(
        &bus,
        "e2e-check",
        &[
            topics.lanes_of::<Finding>(),
            vec![topics.of::<DeadLetter>()],
        ]
        .concat(),
        want,
    )
    .await;
    let kafka_seconds = started.elapsed().as_secs_f64();

    let mut findings: Vec<Finding> = Vec::new();
    let mut dead: Vec<DeadLetter> = Vec::new();
    for r in &out {
        if r.topic != topics.of::<DeadLetter>() {
            findings.push(decode(&r.payload).unwrap());
        } else {
            dead.push(decode(&r.payload).unwrap());
        }
    }
    let logs = || {
        ["ingest", "preprocess", "ensemble", "postprocess", "audit"]
            .iter()
            .map(|s| {
                format!(
                    "--- {s}\n{}",
                    std::fs::read_to_string(kdir.join(format!("{s}.log"))).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        findings.len(),
        inputs.good.len(),
        "one finding per good file; dead letters: {dead:#?}\n{}",
        logs()
    );
    assert_eq!(
        dead.len(),
        inputs.bad.len(),
        "one dead letter per bad file: {dead:#?}"
    );

    // Every dead letter names its input pseudonymously and says why, specifically.
    let source_of = pipeline::linkage(&kdir).await;
    let mut reasons: BTreeMap<String, String> = BTreeMap::new();
    for d in &dead {
        let input = d
            .input
            .clone()
            .expect("dead letter carries its input reference");
        assert!(
            !d.reason.contains(&*inputs.dir.to_string_lossy()),
            "no paths on the bus: {}",
            d.reason
        );
        let src = source_of
            .get(&input)
            .unwrap_or_else(|| panic!("input {input} not in linkage"));
        let name = src.strip_prefix(&inputs.dir).unwrap().display().to_string();
        reasons.insert(name, d.reason.clone());
    }
    for (file, word) in &inputs.bad {
        let r = reasons
            .get(*file)
            .unwrap_or_else(|| panic!("no dead letter for {file}: {reasons:#?}"));
        assert!(r.contains(word), "{file}: reason {r:?} should say {word:?}");
    }

    // Nothing else on the intermediate topics: each radiograph that passed ingest appears once.
    let passed_ingest = inputs.good.len() + 2; // no-pixels and jpeg2000 fail in preprocess
    let mids = collect(
        &bus,
        "e2e-mid",
        &[
            topics.lanes_of::<Deidentified>(),
            topics.lanes_of::<Preprocessed>(),
            topics.lanes_of::<Scored>(),
        ]
        .concat(),
        passed_ingest + 2 * inputs.good.len(),
    )
    .await;
    let count = |suffix: &str| mids.iter().filter(|r| r.topic.ends_with(suffix)).count();
    // Lanes are on by default, and a folder given to `serve ingest` is a back-scan: everything
    // travels in the back-scan lane, and every stage keeps it there.
    assert_eq!(count(".deidentified.backscan"), passed_ingest);
    assert_eq!(count(".preprocessed.backscan"), inputs.good.len());
    assert_eq!(count(".scored.backscan"), inputs.good.len());
    assert_eq!(
        mids.len(),
        passed_ingest + 2 * inputs.good.len(),
        "nothing in the live lane"
    );
    for r in &mids {
        match &r.topic {
            t if t.contains(".deidentified") => drop(decode::<Deidentified>(&r.payload).unwrap()),
            t if t.contains(".preprocessed") => drop(decode::<Preprocessed>(&r.payload).unwrap()),
            _ => drop(decode::<Scored>(&r.payload).unwrap()),
        }
        assert!(
            r.header("traceparent").is_some(),
            "trace context travels in headers"
        );
    }

    // Reference reads keyed by the hospital's original UIDs, published by `fracture labels
    // import` with the ingest key, meet their findings in the audit sink.
    let original_uid = |p: &Path| {
        let o = dicom_object::open_file(p).unwrap();
        o.element(dicom_dictionary_std::tags::SOP_INSTANCE_UID)
            .unwrap()
            .to_str()
            .unwrap()
            .trim_end_matches('\0')
            .to_string()
    };
    let reads = kdir.join("reads.csv");
    std::fs::write(
        &reads,
        format!(
            "sop_instance_uid,region,fracture,x0,y0,x1,y1\n{},,1,10,10,40,40\n{},,0,,,,\n",
            original_uid(&inputs.dir.join("rg3.dcm")),
            original_uid(&inputs.dir.join("sub/cat.dcm"))
        ),
    )
    .unwrap();
    let st = Command::new(pipeline::BIN)
        .arg("--config")
        .arg(&cfg)
        .arg("labels")
        .arg("import")
        .arg(&reads)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "labels import: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    let db =
        fracture_audit::AuditDb::open(&format!("sqlite://{}", kdir.join("audit.db").display()))
            .await
            .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let cases = db.cases(None, None).await.unwrap();
        if cases.iter().filter(|c| c.label.is_some()).count() == cases.len() && !cases.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "labels never met their findings: {cases:?}\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    db.close().await;

    let failures = stages.stop();
    assert!(
        failures.is_empty(),
        "graceful shutdown: {failures:?}\n{}",
        logs()
    );

    // No identifier of the inputs in any stage's log or on any topic (reported by tag only).
    let cat = dicom_object::open_file(inputs.dir.join("sub/cat.dcm")).unwrap();
    let identifiers: Vec<_> = common::identifier_parts(
        &cat,
        &[
            dicom_dictionary_std::tags::PATIENT_NAME,
            dicom_dictionary_std::tags::PATIENT_ID,
            dicom_dictionary_std::tags::INSTITUTION_NAME,
            dicom_dictionary_std::tags::SOP_INSTANCE_UID,
            dicom_dictionary_std::tags::STUDY_INSTANCE_UID,
        ],
    )
    .into_iter()
    .map(|(tag, part)| (tag, part.to_lowercase()))
    .collect();
    assert!(identifiers.len() >= 4);
    let mut texts = vec![("logs".to_string(), logs().to_lowercase())];
    for r in out.iter().chain(mids.iter()) {
        texts.push((
            r.topic.clone(),
            String::from_utf8_lossy(&r.payload).to_lowercase(),
        ));
    }
    for (place, text) in &texts {
        for (tag, v) in &identifiers {
            assert!(
                !text.contains(v.as_str()),
                "{tag} of an input found in {place}"
            );
        }
    }

    // One radiograph is one trace: the five stages' spans share the trace id its finding carries.
    let spans = spans.lock().unwrap().clone();
    let traced: Vec<&Record> = out
        .iter()
        .filter(|r| topics.lanes_of::<Finding>().contains(&r.topic))
        .collect();
    assert_eq!(traced.len(), findings.len());
    for r in traced {
        let tp = r
            .header("traceparent")
            .expect("findings carry trace context");
        let trace_id = tp.split('-').nth(1).unwrap();
        let names: BTreeSet<&str> = spans
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(
            names,
            ["audit", "ensemble", "ingest", "postprocess", "preprocess"]
                .into_iter()
                .collect(),
            "spans of trace {trace_id}"
        );
    }
    let db =
        fracture_audit::AuditDb::open(&format!("sqlite://{}", kdir.join("audit.db").display()))
            .await
            .unwrap();
    assert_eq!(
        db.count().await.unwrap(),
        // Copies (FRACTURE_E2E_COPIES) share a SOP Instance UID: the sink is keyed by it.
        findings
            .iter()
            .map(|f| &f.id.sop_instance_uid)
            .collect::<BTreeSet<_>>()
            .len() as i64,
        "audit holds one row per radiograph"
    );
    db.close().await;

    // (b) The same inputs through `fracture scan`, one process, no broker.
    let sdir = work.join("scan-out");
    let started = Instant::now();
    let st = Command::new(pipeline::BIN)
        .arg("--set")
        .arg("ingest.site_code=E2E")
        .arg("scan")
        .arg(&inputs.dir)
        .arg("--out")
        .arg(&sdir)
        .arg("--key-file")
        .arg(&key)
        .arg("--model")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("models/untrained/ensemble.toml"))
        .output()
        .unwrap();
    let scan_seconds = started.elapsed().as_secs_f64();
    assert!(
        st.status.success(),
        "scan failed: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(sdir.join("findings.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), findings.len());
    for f in &findings {
        let s = lines
            .iter()
            .find(|l| l["sop_instance_uid"] == f.id.sop_instance_uid.as_str())
            .unwrap_or_else(|| panic!("scan has no finding for {}", f.id.sop_instance_uid));
        assert_eq!(s["study_instance_uid"], f.id.study_instance_uid.as_str());
        assert_eq!(s["region"], f.region.as_str());
        assert!(
            (s["score"].as_f64().unwrap() - f.score as f64).abs() < 1e-5,
            "scores agree: {} vs {}",
            s["score"],
            f.score
        );
        assert_eq!(s["fracture"], f.fracture);
        assert_eq!(s["boxes"].as_array().unwrap().len(), f.boxes.len());
        assert_eq!(s["model_trained"], false);
    }
    let dead_lines = std::fs::read_to_string(sdir.join("dead-letter.jsonl")).unwrap();
    assert_eq!(dead_lines.lines().count(), inputs.bad.len());
    for (file, word) in &inputs.bad {
        let line = dead_lines
            .lines()
            .find(|l| l.contains(&format!("{}\"", inputs.dir.join(file).display())))
            .unwrap_or_else(|| panic!("scan has no dead letter for {file}:\n{dead_lines}"));
        assert!(line.contains(word), "{line}");
    }
    let report = std::fs::read_to_string(sdir.join("report.html")).unwrap();
    assert!(
        report.contains("never trained"),
        "the report says the model is untrained"
    );
    for f in &findings {
        assert!(report.contains(&f.id.sop_instance_uid));
    }
    let n = inputs.good.len() as f64;
    println!(
        "e2e: {n} radiographs + {} bad files; kafka (5 processes, incl. start-up): {kafka_seconds:.1} s = {:.2} radiographs/s; scan: {scan_seconds:.1} s = {:.2} radiographs/s",
        inputs.bad.len(),
        n / kafka_seconds,
        n / scan_seconds
    );
}
