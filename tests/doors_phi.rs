//! PHI stops at the edge, whichever door a radiograph comes through: `fracture serve ingest` with
//! debug logging takes cat.dcm (a realistic name, ID, institution, physician, accession number and
//! UIDs) from a folder, from dcmsend over DICOM C-STORE, and from a STOW-RS POST; then everything
//! it wrote outside the edge (its log, every record on the bus, every object in the claim-check
//! store) is searched for the identifiers. Failures name the tag, never the value.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::pipeline;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use fracture_shared::bus::{Bus, KafkaBus, KafkaConfig, Topics};
use fracture_shared::messages::{decode, Deidentified};
use fracture_shared::testkit;

/// cat.dcm under a new SOP Instance UID (the rest, identifiers included, unchanged).
fn copy_of_cat(dst: &Path, sop: &str) {
    let mut o = dicom_object::open_file(common::fixtures().join("cat.dcm")).unwrap();
    o.put(DataElement::new(
        tags::SOP_INSTANCE_UID,
        VR::UI,
        PrimitiveValue::from(sop),
    ));
    o.meta_mut().media_storage_sop_instance_uid = sop.to_string();
    o.write_to_file(dst).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_identifier_leaves_the_edge_through_any_door() {
    let keep = tempfile::tempdir().unwrap();
    let work = keep.path();
    let folder = work.join("folder");
    std::fs::create_dir_all(&folder).unwrap();
    copy_of_cat(&folder.join("cat.dcm"), "1.2.826.0.1.3680043.10.543.901");
    copy_of_cat(&work.join("scp.dcm"), "1.2.826.0.1.3680043.10.543.902");
    copy_of_cat(&work.join("stow.dcm"), "1.2.826.0.1.3680043.10.543.903");

    let key = work.join("deid.key");
    std::fs::write(&key, [5u8; 32]).unwrap();
    let (scp_port, stow_port) = (pipeline::free_port(), pipeline::free_port());
    let brokers = testkit::kafka_brokers();
    let prefix = testkit::unique_prefix("doors");
    let dir = work.join("edge");
    let extra = format!(
        "[ingest.scp]\nlisten = \"127.0.0.1:{scp_port}\"\nspool = \"{}\"\n\
         [ingest.dicomweb]\nstow_listen = \"127.0.0.1:{stow_port}\"\nspool = \"{}\"\n",
        work.join("scp-spool").display(),
        work.join("stow-spool").display()
    );
    let cfg = pipeline::write_null_config(&dir, &brokers, &prefix, &key, &extra);
    let log_path = dir.join("ingest.log");
    let mut ingest = Command::new(pipeline::BIN)
        .arg("--config")
        .arg(&cfg)
        .args(["--set", "telemetry.log=debug"])
        .args(["serve", "ingest", "--instance", "doors-0"])
        .arg(&folder)
        .env("RUST_LOG", "debug")
        .stdout(std::fs::File::create(dir.join("ingest.stdout")).unwrap())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();

    // Door 2: C-STORE, with dcmsend retrying until the SCP listens.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = Command::new("dcmsend")
            .args(["127.0.0.1", &scp_port.to_string(), "-aec", "FRACTURE"])
            .arg(work.join("scp.dcm"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("dcmsend (dcmtk, installed by scripts/deid-peers.sh)");
        if st.success() {
            break;
        }
        assert!(Instant::now() < deadline, "the C-STORE door never opened");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Door 3: STOW-RS, a multipart/related POST.
    let boundary = "doors-phi-boundary-31";
    let mut body = format!("--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").into_bytes();
    body.extend(std::fs::read(work.join("stow.dcm")).unwrap());
    body.extend(format!("\r\n--{boundary}--\r\n").into_bytes());
    std::fs::write(work.join("stow.body"), &body).unwrap();
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
        .arg("-H")
        .arg(format!(
            "Content-Type: multipart/related; type=\"application/dicom\"; boundary={boundary}"
        ))
        .arg("--data-binary")
        .arg(format!("@{}", work.join("stow.body").display()))
        .arg(format!("http://127.0.0.1:{stow_port}/studies"))
        .output()
        .expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "STOW-RS answer"
    );

    // All three arrive de-identified on the bus.
    let bus = KafkaBus::new(KafkaConfig {
        brokers: brokers.clone(),
        ..Default::default()
    });
    let topics = Topics::new(&prefix);
    let deadline = Instant::now() + Duration::from_secs(60);
    let records = loop {
        let r = bus.read_committed(&topics.all()).await.unwrap_or_default();
        if r.iter()
            .filter(|r| topics.lanes_of::<Deidentified>().contains(&r.topic))
            .count()
            >= 3
        {
            break r;
        }
        assert!(Instant::now() < deadline, "three radiographs never arrived");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(ingest.id().to_string())
        .status();
    assert!(ingest.wait().unwrap().success(), "clean stop on SIGTERM");

    let mut places: Vec<(String, Vec<u8>)> = vec![
        ("the ingest log".into(), std::fs::read(&log_path).unwrap()),
        (
            "ingest's stdout".into(),
            std::fs::read(dir.join("ingest.stdout")).unwrap(),
        ),
    ];
    for r in &records {
        let mut bytes = r.payload.clone();
        bytes.extend(r.key.clone().unwrap_or_default().into_bytes());
        for (k, v) in &r.headers {
            bytes.extend(k.as_bytes());
            bytes.extend(v.as_bytes());
        }
        places.push((format!("a record on {}", r.topic), bytes));
        if topics.lanes_of::<Deidentified>().contains(&r.topic) {
            decode::<Deidentified>(&r.payload).expect("a radiograph message");
        }
    }
    for e in walkdir(&dir.join("store")) {
        places.push((
            "an object in the claim-check store".into(),
            std::fs::read(&e).unwrap(),
        ));
    }
    assert!(
        places.len() >= 3 + 3 + 2,
        "searched {} places",
        places.len()
    );

    let cat = dicom_object::open_file(common::fixtures().join("cat.dcm")).unwrap();
    let mut identifiers = Vec::new();
    for tag in [
        tags::PATIENT_NAME,
        tags::PATIENT_ID,
        tags::INSTITUTION_NAME,
        tags::REFERRING_PHYSICIAN_NAME,
        tags::ACCESSION_NUMBER,
        tags::STUDY_INSTANCE_UID,
        tags::SERIES_INSTANCE_UID,
    ] {
        if let Ok(e) = cat.element(tag) {
            let v = e
                .to_str()
                .unwrap()
                .trim_end_matches('\0')
                .trim()
                .to_string();
            for part in v.split('^').filter(|p| p.len() >= 4) {
                identifiers.push((tag, part.to_lowercase()));
            }
        }
    }
    // The search works: every identifier is there to find in what was sent.
    let sent =
        String::from_utf8_lossy(&std::fs::read(work.join("scp.dcm")).unwrap()).to_lowercase();
    for (tag, v) in &identifiers {
        assert!(
            sent.contains(v.as_str()),
            "{tag}: the search would not find it"
        );
    }
    identifiers.extend(
        [
            "1.2.826.0.1.3680043.10.543.901",
            "1.2.826.0.1.3680043.10.543.902",
            "1.2.826.0.1.3680043.10.543.903",
        ]
        .map(|u| (tags::SOP_INSTANCE_UID, u.to_string())),
    );
    assert!(identifiers.len() >= 7, "cat.dcm has its identifiers");
    for (place, bytes) in &places {
        let text = String::from_utf8_lossy(bytes).to_lowercase();
        for (tag, v) in &identifiers {
            assert!(
                !text.contains(v.as_str()),
                "{tag} of an input found in {place}"
            );
        }
    }
}

fn walkdir(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walkdir(&p));
        } else {
            out.push(p);
        }
    }
    out
}
