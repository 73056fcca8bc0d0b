//! Export back to the hospital, end to end: the five `fracture serve` stages and `fracture serve
//! export` beside them on a real Kafka broker, with `[export]` pointing at a real Orthanc, fed
//! radiographs with real identifiers (cat.dcm from the fixtures, and phantoms given their own
//! patients and accession numbers). Orthanc must end with one SR and one Secondary Capture per
//! radiograph, filed under the original patient, study and accession number and referencing the
//! original image; a restart of the export and a redelivery of every finding must send nothing
//! twice; a finding
//! from another edge is not exported but counted; a PACS that is down at first gets everything
//! once it is up, even across a restart meanwhile; and no identifier reaches a log, a metric or
//! the export ledger.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dicom_core::header::Header;
use dicom_core::value::Value;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::InMemDicomObject;

use common::orthanc::Orthanc;
use common::pipeline::{self, sample, Pipeline};
use fracture_export::ledger::{Entry, Ledger, State};
use fracture_shared::bus::{Bus, KafkaBus, KafkaConfig, OutRecord, Topics};
use fracture_shared::messages::{decode, encode, DeadLetter, Finding};
use fracture_shared::testkit;

/// One input radiograph and the identifiers it was sent with.
struct Radiograph {
    file: PathBuf,
    patient_id: String,
    patient_name: String,
    accession: String,
    study: String,
    sop: String,
}

fn text(obj: &InMemDicomObject, tag: Tag) -> String {
    obj.element(tag)
        .ok()
        .and_then(|e| {
            e.to_str()
                .ok()
                .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
        })
        .unwrap_or_default()
}

/// Every value of `tag`, at any depth of `obj`.
fn values_of(obj: &InMemDicomObject, tag: Tag) -> Vec<String> {
    let mut found = Vec::new();
    let mut todo = vec![obj];
    while let Some(o) = todo.pop() {
        for e in o {
            match e.value() {
                Value::Sequence(seq) => todo.extend(seq.items()),
                _ if e.tag() == tag => found.push(text(o, tag)),
                _ => {}
            }
        }
    }
    found
}

/// `phantoms` phantoms, each its own patient, study and accession number, and with `cat` a copy
/// of cat.dcm with its real identifiers (and an accession number, which it lacks), in `dir/in`.
fn radiographs(dir: &Path, phantoms: usize, seed: u64, cat: bool) -> Vec<Radiograph> {
    let input = dir.join("in");
    std::fs::create_dir_all(&input).unwrap();
    let mut out = Vec::new();
    let mut add = |src: &Path, name: &str, edit: &dyn Fn(&mut dicom_object::DefaultDicomObject)| {
        let file = input.join(name);
        common::edit(src, &file, edit);
        let o = dicom_object::open_file(&file).unwrap();
        out.push(Radiograph {
            file,
            patient_id: text(&o, tags::PATIENT_ID),
            patient_name: text(&o, tags::PATIENT_NAME),
            accession: text(&o, tags::ACCESSION_NUMBER),
            study: text(&o, tags::STUDY_INSTANCE_UID),
            sop: text(&o, tags::SOP_INSTANCE_UID),
        });
    };
    let uid = |i: usize, suffix: &str| format!("1.2.826.0.1.3680043.10.543.{seed}.{i}{suffix}");
    for (i, src) in pipeline::phantoms(&dir.join("generated"), phantoms, seed)
        .iter()
        .enumerate()
    {
        add(src, &format!("phantom-{i}.dcm"), &|o| {
            for (tag, vr, v) in [
                (
                    tags::PATIENT_ID,
                    VR::LO,
                    format!("EXPORT-{seed}-PATIENT-{i}"),
                ),
                (
                    tags::PATIENT_NAME,
                    VR::PN,
                    format!("Exportsdottir^Inga{seed}x{i}"),
                ),
                (
                    tags::PATIENT_BIRTH_DATE,
                    VR::DA,
                    format!("1970010{}", i + 1),
                ),
                (tags::ACCESSION_NUMBER, VR::SH, format!("XACC{seed}N{i}")),
                (tags::STUDY_INSTANCE_UID, VR::UI, uid(i, "")),
                (tags::SERIES_INSTANCE_UID, VR::UI, uid(i, ".1")),
            ] {
                o.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
            }
        });
    }
    if cat {
        add(&common::fixtures().join("cat.dcm"), "cat.dcm", &|o| {
            let accession = PrimitiveValue::from("CATACC0001");
            o.put(DataElement::new(tags::ACCESSION_NUMBER, VR::SH, accession));
        });
    }
    out
}

/// The export stage's name, as `fracture serve` and the process logs name it.
const EXPORT: &str = "export";

/// A pipeline whose export stage sends to `orthanc`, ingesting `dir/in`.
fn pipeline_exporting_to(dir: &Path, orthanc: &Orthanc, name: &str) -> (Pipeline, String, String) {
    let key = dir.join("deid.key");
    std::fs::write(&key, [3u8; 32]).unwrap();
    let brokers = testkit::kafka_brokers();
    let prefix = testkit::unique_prefix(name);
    let run = dir.join("run");
    let extra = format!(
        "[export]\npacs = \"{}\"\ncalling_ae_title = \"FRACTURE-TEST\"\nlinkage = \"{}\"\n\
         ledger = \"{}\"\nconnect_timeout_ms = 5000\ntimeout_ms = 60000\n\
         [retry]\ncap_ms = 2000\n",
        orthanc.pacs(),
        run.join("linkage.db").display(),
        run.join("export-ledger.db").display(),
    );
    let cfg = pipeline::write_null_config(&run, &brokers, &prefix, &key, &extra);
    (
        Pipeline::new(&run, &cfg, &[dir.join("in")]),
        brokers,
        prefix,
    )
}

/// Starts the five stages, then the export beside them.
fn start_all(p: &mut Pipeline) {
    p.start_all();
    p.start(EXPORT);
}

/// The end of every stage's log and of the export's, for a failure message.
fn logs(p: &Pipeline) -> String {
    let export = p.log(EXPORT);
    let tail: Vec<&str> = export.lines().rev().take(40).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    format!(
        "{}\n--- export (last 40 lines)\n{}",
        p.logs(),
        tail.join("\n")
    )
}

/// Waits (up to `patience`) until `done` holds, failing with `why` and the stage logs.
async fn wait_for(
    p: &Pipeline,
    patience: Duration,
    why: &str,
    mut done: impl AsyncFnMut() -> bool,
) {
    let deadline = Instant::now() + patience;
    while !done().await {
        assert!(Instant::now() < deadline, "{why}\n{}", logs(p));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits (up to `patience`) until the ledger says the PACS holds every result, then checks that
/// Orthanc files them right and that each was sent once.
async fn assert_exported_once(
    p: &Pipeline,
    patience: Duration,
    orthanc: &Orthanc,
    ledger: &Ledger,
    radiographs: &[Radiograph],
) {
    let stored = async || {
        let entries = ledger.entries().await.unwrap_or_default();
        entries.iter().filter(|e| e.state == State::Stored).count()
    };
    let want = 2 * radiographs.len();
    wait_for(
        p,
        patience,
        "the results never all reached the PACS",
        async || stored().await >= want,
    )
    .await;
    assert_filed(orthanc, radiographs);
    assert_sent_once(&ledger.entries().await.unwrap(), radiographs);
}

/// Orthanc holds exactly one SR and one Secondary Capture per radiograph, each filed under the
/// radiograph's original patient, study and accession number and referencing the original image.
fn assert_filed(orthanc: &Orthanc, radiographs: &[Radiograph]) {
    assert_eq!(
        orthanc.instances().len(),
        2 * radiographs.len(),
        "one SR and one SC per radiograph, nothing else"
    );
    for r in radiographs {
        let name = r.file.file_name().unwrap().to_string_lossy();
        let studies = orthanc.studies_with_uid(&r.study);
        assert_eq!(
            studies.len(),
            1,
            "{name}: its results under its original study"
        );
        let study = orthanc.get(&format!("/studies/{}", studies[0]));
        let tag = |group: &str, key: &str| study[group][key].as_str().unwrap_or("").to_string();
        assert_eq!(
            tag("MainDicomTags", "AccessionNumber"),
            r.accession,
            "{name}"
        );
        assert_eq!(
            tag("PatientMainDicomTags", "PatientID"),
            r.patient_id,
            "{name}"
        );
        assert_eq!(
            tag("PatientMainDicomTags", "PatientName"),
            r.patient_name,
            "{name}"
        );
        let instances = orthanc.get(&format!("/studies/{}/instances", studies[0]));
        let mut classes = Vec::new();
        for i in instances.as_array().expect("a list") {
            let obj = orthanc.file(i["ID"].as_str().unwrap());
            let class = text(&obj, tags::SOP_CLASS_UID);
            for (tag, want) in [
                (tags::PATIENT_ID, &r.patient_id),
                (tags::PATIENT_NAME, &r.patient_name),
                (tags::ACCESSION_NUMBER, &r.accession),
                (tags::STUDY_INSTANCE_UID, &r.study),
            ] {
                assert_eq!(&text(&obj, tag), want, "{name} {class}: {tag}");
            }
            assert!(
                obj.element(tags::PATIENT_IDENTITY_REMOVED).is_err(),
                "{name} {class}: still says the patient's identity was removed"
            );
            // Every reference to the source image (the SR's evidence, its IMAGE items and the
            // images its SCOORDs are selected from; the SC's source image) is the original.
            let refs = values_of(&obj, tags::REFERENCED_SOP_INSTANCE_UID);
            assert!(!refs.is_empty(), "{name} {class}: no image reference");
            assert!(refs.iter().all(|u| *u == r.sop), "{name} {class}: {refs:?}");
            if class == uids::COMPREHENSIVE_SR_STORAGE {
                let evidence = obj
                    .element(tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE)
                    .expect("the SR's evidence");
                let item = &evidence.items().expect("items")[0];
                assert_eq!(
                    text(item, tags::STUDY_INSTANCE_UID),
                    r.study,
                    "{name}: evidence"
                );
                let series = values_of(item, tags::SERIES_INSTANCE_UID);
                let original_series = text(
                    &dicom_object::open_file(&r.file).unwrap(),
                    tags::SERIES_INSTANCE_UID,
                );
                assert_eq!(series, [original_series], "{name}: evidence series");
            }
            classes.push(class);
        }
        classes.sort();
        assert_eq!(
            classes,
            [
                uids::SECONDARY_CAPTURE_IMAGE_STORAGE,
                uids::COMPREHENSIVE_SR_STORAGE
            ],
            "{name}: one SC and one SR"
        );
    }
}

/// The ledger holds one stored row per object, each sent once.
fn assert_sent_once(entries: &[Entry], radiographs: &[Radiograph]) {
    assert_eq!(entries.len(), 2 * radiographs.len(), "{entries:#?}");
    for e in entries {
        assert_eq!(
            (e.state, e.status, e.sends),
            (State::Stored, Some(0), 1),
            "{e:#?}"
        );
    }
}

/// No original identifier of `radiographs` is in any of `places` (searched without case); each
/// is found in its input, so the search can find them. Failures name the place, not the value.
fn assert_no_identifiers(places: &[(String, Vec<u8>)], radiographs: &[Radiograph]) {
    let mut identifiers = Vec::new();
    for r in radiographs {
        let input = String::from_utf8_lossy(&std::fs::read(&r.file).unwrap()).to_lowercase();
        let mut mine = vec![r.study.clone(), r.sop.clone(), r.accession.clone()];
        mine.extend(
            r.patient_name
                .split(['^', ','])
                .map(|p| p.trim().to_string()),
        );
        // Short numeric IDs (cat.dcm's is 5 digits) occur by chance in timestamps and ports.
        mine.push(r.patient_id.clone());
        for v in mine
            .into_iter()
            .filter(|v| v.len() >= 5 && !v.bytes().all(|b| b.is_ascii_digit()))
        {
            let v = v.to_lowercase();
            assert!(
                input.contains(&v),
                "the search would not find an identifier"
            );
            identifiers.push(v);
        }
    }
    assert!(
        identifiers.len() >= 5 * radiographs.len(),
        "{} identifiers",
        identifiers.len()
    );
    for (place, bytes) in places {
        let text = String::from_utf8_lossy(bytes).to_lowercase();
        for (i, v) in identifiers.iter().enumerate() {
            assert!(
                !text.contains(v.as_str()),
                "identifier #{i} of the inputs found in {place}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn results_go_back_to_the_original_patient_and_study_once() {
    let keep = tempfile::tempdir().unwrap();
    let work = keep.path();
    let radiographs = radiographs(work, 2, 7, true);
    let orthanc = Orthanc::new(&work.join("orthanc"));
    orthanc.start();
    let (mut p, brokers, prefix) = pipeline_exporting_to(work, &orthanc, "export");
    start_all(&mut p);
    let ledger = Ledger::open(&p.dir.join("export-ledger.db")).await.unwrap();
    assert_exported_once(
        &p,
        Duration::from_secs(300),
        &orthanc,
        &ledger,
        &radiographs,
    )
    .await;
    let metrics = p.metrics(EXPORT);
    for kind in ["sr", "sc"] {
        let stored = sample(
            &metrics,
            "fracture_exported_objects_total",
            &format!("kind=\"{kind}\",outcome=\"stored\""),
        );
        assert_eq!(
            stored as usize,
            radiographs.len(),
            "{kind} stored\n{metrics}"
        );
    }

    // A restart of the export, and every finding delivered again, with one from another edge
    // (a radiograph this edge never ingested): nothing is sent twice, the stranger not at all.
    p.kill(EXPORT);
    let bus = KafkaBus::new(KafkaConfig {
        brokers: brokers.clone(),
        ..Default::default()
    });
    let topics = Topics::new(&prefix);
    let findings = bus
        .read_committed(&topics.lanes_of::<Finding>())
        .await
        .unwrap();
    assert_eq!(
        findings.len(),
        radiographs.len(),
        "one finding per radiograph"
    );
    let mut again: Vec<OutRecord> = findings
        .iter()
        .map(|r| OutRecord {
            topic: r.topic.clone(),
            key: r.key.clone().unwrap_or_default(),
            payload: r.payload.clone(),
            headers: r.headers.clone(),
        })
        .collect();
    let mut stranger: Finding = decode(&findings[0].payload).unwrap();
    stranger.id.sop_instance_uid = "2.25.300000000000000000000000000000000001".into();
    stranger.id.input = "in-from-another-edge".into();
    again.push(OutRecord {
        payload: encode(&stranger),
        ..again[0].clone()
    });
    let mut producer = bus.producer(&format!("{prefix}.redeliver")).await.unwrap();
    producer.send(again).await.unwrap();
    producer.close().await.unwrap();
    p.start(EXPORT);
    wait_for(
        &p,
        Duration::from_secs(240),
        "the redelivered findings were never handled",
        async || {
            // Each object counted as redelivered or (a failure, asserted below) sent again.
            let entries = ledger.entries().await.unwrap_or_default();
            entries.iter().all(|e| e.redeliveries >= 1 || e.sends > 1)
                && pipeline::plain(&p.log(EXPORT)).contains("has no row in the linkage table")
        },
    )
    .await;
    assert_filed(&orthanc, &radiographs);
    let entries = ledger.entries().await.unwrap();
    assert_sent_once(&entries, &radiographs);
    let metrics = p.metrics(EXPORT);
    for kind in ["sr", "sc"] {
        let labels = |outcome: &str| format!("kind=\"{kind}\",outcome=\"{outcome}\"");
        let m = |outcome: &str| {
            sample(
                &metrics,
                "fracture_exported_objects_total",
                &labels(outcome),
            ) as usize
        };
        assert_eq!(m("already_sent"), radiographs.len(), "{kind}\n{metrics}");
        assert_eq!(m("stored"), 0, "{kind}: sent again\n{metrics}");
    }
    assert_eq!(
        sample(
            &metrics,
            "fracture_export_skipped_total",
            "reason=\"no_linkage\""
        ),
        1.0,
        "{metrics}"
    );

    // Nothing that leaves the edge's databases names a patient: the logs, the metrics, the
    // ledger.
    let mut places: Vec<(String, Vec<u8>)> = pipeline::STAGES
        .iter()
        .chain([&EXPORT])
        .map(|s| (format!("the {s} log"), p.log(s).into_bytes()))
        .collect();
    places.push(("the export's metrics".into(), metrics.into_bytes()));
    for f in ["export-ledger.db", "export-ledger.db-wal"] {
        places.push((f.into(), std::fs::read(p.dir.join(f)).unwrap_or_default()));
    }
    assert_no_identifiers(&places, &radiographs);
    let bad = p.stop();
    assert!(bad.is_empty(), "{bad:?}\n{}", logs(&p));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pacs_down_at_first_gets_every_result_once_it_is_up() {
    let keep = tempfile::tempdir().unwrap();
    let work = keep.path();
    let radiographs = radiographs(work, 2, 11, false);
    // Its ports are chosen, but it is not started yet.
    let orthanc = Orthanc::new(&work.join("orthanc"));
    let (mut p, brokers, prefix) = pipeline_exporting_to(work, &orthanc, "export-down");
    start_all(&mut p);
    let bus = KafkaBus::new(KafkaConfig {
        brokers,
        ..Default::default()
    });
    let topics = Topics::new(&prefix);
    let out =
        pipeline::committed_outputs(&bus, &topics, radiographs.len(), Duration::from_secs(300))
            .await;
    let findings = out
        .iter()
        .filter(|r| r.topic != topics.of::<DeadLetter>())
        .count();
    assert_eq!(
        findings,
        radiographs.len(),
        "the findings do not wait for the PACS\n{}",
        logs(&p)
    );
    let retries = |p: &Pipeline| {
        pipeline::plain(&p.log(EXPORT))
            .matches("cannot export to the PACS")
            .count()
    };
    wait_for(
        &p,
        Duration::from_secs(120),
        "the export never tried the PACS",
        async || retries(&p) > 0,
    )
    .await;

    // Killed while the PACS is down: the export committed nothing, so the findings come again.
    p.kill(EXPORT);
    let before = retries(&p);
    p.start(EXPORT);
    wait_for(
        &p,
        Duration::from_secs(120),
        "the restarted export did not try again",
        async || retries(&p) > before,
    )
    .await;
    assert!(!orthanc.is_up(), "Orthanc is not up yet");

    orthanc.start();
    let ledger = Ledger::open(&p.dir.join("export-ledger.db")).await.unwrap();
    assert_exported_once(
        &p,
        Duration::from_secs(240),
        &orthanc,
        &ledger,
        &radiographs,
    )
    .await;
    let bad = p.stop();
    assert!(bad.is_empty(), "{bad:?}\n{}", logs(&p));
}

/// Three hospitals on one cluster: each site's edge (its own ingest with its own site code, key
/// and linkage table, and its own export to its own PACS) feeds and reads the same preprocess,
/// ensemble, postprocess and audit. Each PACS gets exactly its own patients' results; no site's
/// pseudonyms reach another site's ledger or logs; findings and audit rows keep their site.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_sites_on_one_cluster_each_get_only_their_own_results() {
    let keep = tempfile::tempdir().unwrap();
    let work = keep.path();
    let brokers = testkit::kafka_brokers();
    let prefix = testkit::unique_prefix("sites");
    let core_dir = work.join("core");
    let core_key = work.join("core.key");
    std::fs::write(&core_key, [9u8; 32]).unwrap();
    let core_cfg = pipeline::write_null_config(&core_dir, &brokers, &prefix, &core_key, "");
    let mut core = Pipeline::new(&core_dir, &core_cfg, &[]);
    for s in ["audit", "postprocess", "ensemble", "preprocess"] {
        core.start(s);
    }
    let store = core_dir.join("store");

    struct Site {
        code: &'static str,
        radiographs: Vec<Radiograph>,
        orthanc: Orthanc,
        p: Pipeline,
    }
    let mut sites = Vec::new();
    for (i, code) in ["NORTH", "SOUTH", "EAST"].into_iter().enumerate() {
        let dir = work.join(code.to_lowercase());
        let radiographs = radiographs(&dir, 2, 20 + i as u64, false);
        let orthanc = Orthanc::new(&dir.join("orthanc"));
        orthanc.start();
        let run = dir.join("run");
        let key = dir.join("deid.key");
        std::fs::write(&key, [i as u8 + 40; 32]).unwrap();
        let extra = format!(
            "[export]\npacs = \"{}\"\nsite_code = \"{code}\"\ncalling_ae_title = \"FRACTURE-TEST\"\n\
             linkage = \"{}\"\nledger = \"{}\"\nconnect_timeout_ms = 5000\ntimeout_ms = 60000\n\
             [retry]\ncap_ms = 2000\n",
            orthanc.pacs(),
            run.join("linkage.db").display(),
            run.join("export-ledger.db").display(),
        );
        let cfg = pipeline::write_null_config(&run, &brokers, &prefix, &key, &extra);
        let mut p = Pipeline::new(&run, &cfg, &[dir.join("in")]);
        p.instance = format!("{}-0", code.to_lowercase());
        for stage in ["ingest", EXPORT] {
            // The claim-check store is the cluster's; the site code is the edge's own.
            p.setting(stage, "store.url", &store.display().to_string());
            p.setting(stage, "ingest.site_code", code);
        }
        p.start(EXPORT);
        p.start("ingest");
        sites.push(Site {
            code,
            radiographs,
            orthanc,
            p,
        });
    }

    for s in &sites {
        let ledger = Ledger::open(&s.p.dir.join("export-ledger.db"))
            .await
            .unwrap();
        assert_exported_once(
            &s.p,
            Duration::from_secs(300),
            &s.orthanc,
            &ledger,
            &s.radiographs,
        )
        .await;
    }
    // The findings on the bus, by the site they name.
    let bus = KafkaBus::new(KafkaConfig {
        brokers: brokers.clone(),
        ..Default::default()
    });
    let topics = Topics::new(&prefix);
    let out = pipeline::committed_outputs(&bus, &topics, 6, Duration::from_secs(60)).await;
    let mut by_site: BTreeMap<String, Vec<Finding>> = BTreeMap::new();
    for r in out.iter().filter(|r| r.topic != topics.of::<DeadLetter>()) {
        let f: Finding = decode(&r.payload).unwrap();
        by_site.entry(f.site.clone()).or_default().push(f);
    }
    assert_eq!(
        by_site.keys().map(String::as_str).collect::<Vec<_>>(),
        ["EAST", "NORTH", "SOUTH"]
    );
    for s in &sites {
        assert_eq!(by_site[s.code].len(), 2, "{}", s.code);
        // Its linkage table holds its own radiographs only.
        let link = pipeline::linkage(&s.p.dir).await;
        assert_eq!(link.len(), 2, "{}: {link:?}", s.code);
        let own_inputs: Vec<&String> = by_site[s.code].iter().map(|f| &f.id.input).collect();
        assert!(link.keys().all(|k| own_inputs.contains(&k)), "{}", s.code);
        // No other site's pseudonym in its ledger or its logs.
        let ledger = Ledger::open(&s.p.dir.join("export-ledger.db"))
            .await
            .unwrap();
        let entries = ledger.entries().await.unwrap();
        let logs = format!("{}{}", s.p.log("ingest"), s.p.log(EXPORT));
        for (site, findings) in by_site.iter().filter(|(c, _)| *c != s.code) {
            for f in findings {
                for uid in [
                    &f.id.sop_instance_uid,
                    &f.id.study_instance_uid,
                    &f.id.input,
                ] {
                    assert!(
                        entries.iter().all(|e| &e.source_sop_instance_uid != uid),
                        "{site}'s {uid} in {}'s ledger",
                        s.code
                    );
                    assert!(
                        !logs.contains(uid.as_str()),
                        "{site}'s {uid} in {}'s logs",
                        s.code
                    );
                }
            }
        }
        let metrics = s.p.metrics(EXPORT);
        assert_eq!(
            sample(
                &metrics,
                "fracture_export_skipped_total",
                "reason=\"other_site\""
            ),
            4.0,
            "{}: the other sites' four findings passed over\n{metrics}",
            s.code
        );
        assert_eq!(
            sample(
                &metrics,
                "fracture_export_skipped_total",
                "reason=\"no_linkage\""
            ),
            0.0,
            "{}: nothing looked up that was not its own",
            s.code
        );
    }
    // The audit keeps every finding under its site.
    let db =
        fracture_audit::AuditDb::open(&format!("sqlite://{}", core_dir.join("audit.db").display()))
            .await
            .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    for s in &sites {
        loop {
            let cases = db.cases(Some(s.code), None).await.unwrap();
            if cases.len() == 2 {
                break;
            }
            assert!(
                cases.len() < 2 && Instant::now() < deadline,
                "{}: {} audit rows\n{}",
                s.code,
                cases.len(),
                core.logs()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    db.close().await;
    for s in &mut sites {
        let failures = s.p.stop();
        assert!(failures.is_empty(), "{}: {failures:?}", s.code);
    }
    assert!(core.stop().is_empty(), "{}", core.logs());
}
