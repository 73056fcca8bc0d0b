//! The DICOMweb doors against real peers: a back-scan of a real Orthanc (QIDO-RS + WADO-RS), and
//! our STOW-RS endpoint fed by curl and by Orthanc's own STOW-RS client.

// Values are never printed: checks on the stored blobs say only whether an identifier survived.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dicom_dictionary_std::tags;
use tokio::sync::Mutex;

use fracture_edge::linkage::Linkage;
use fracture_ingest::dicomweb::{self, DicomwebConfig};
use fracture_ingest::{DeidPolicy, Ingest};
use fracture_shared::bus::{Bus, InProcBus, Producer, StageIo, Topics};
use fracture_shared::messages::{decode, DeadLetter, Deidentified};
use fracture_shared::stage::Shutdown;
use fracture_shared::store::{BlobStore, StoreConfig};

const CR: &str = "1.2.840.10008.5.1.4.1.1.1";
const CT: &str = "1.2.840.10008.5.1.4.1.1.2";

/// The DICOMweb base URL of an Orthanc: `FRACTURE_TEST_ORTHANC`, or one started for this test
/// process by scripts/orthanc.sh (stopped when the process ends).
fn orthanc() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(v) = std::env::var("FRACTURE_TEST_ORTHANC") {
            if !v.trim().is_empty() {
                return v.trim().trim_end_matches('/').to_string();
            }
        }
        let dir = std::env::temp_dir().join(format!("fracture-orthanc-{}", std::process::id()));
        let pid = std::process::id().to_string();
        let dir_arg = dir.display().to_string();
        let url = common::run_script(
            &common::repo_root().join("scripts/orthanc.sh"),
            &["start", &dir_arg, "--watch-pid", &pid, "--remove-on-exit"],
        );
        assert!(
            url.starts_with("http://") && url.ends_with("/dicom-web"),
            "scripts/orthanc.sh printed {url:?}, not a DICOMweb base URL"
        );
        url
    })
}

/// Orthanc's REST root (the DICOMweb root without `/dicom-web`).
fn orthanc_rest() -> String {
    orthanc().trim_end_matches("/dicom-web").to_string()
}

fn curl(args: &[&str]) -> std::process::Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "120"])
        .args(args)
        .output()
        .expect("curl runs (it comes with the Debian base image)")
}

/// Stores a file in Orthanc through its REST API.
fn upload(file: &Path) {
    let data = format!("@{}", file.display());
    let out = curl(&[
        "-f",
        "-X",
        "POST",
        "--data-binary",
        &data,
        &format!("{}/instances", orthanc_rest()),
    ]);
    assert!(
        out.status.success(),
        "Orthanc refused an upload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("Orthanc answers JSON");
    let status = v["Status"].as_str().unwrap_or_default();
    assert!(
        status == "Success" || status == "AlreadyStored",
        "Orthanc did not store an upload: {status}"
    );
}

fn fixture(name: &str) -> PathBuf {
    let p = common::fixtures().join(name);
    assert!(p.exists(), "scripts/fixtures.sh did not provide {name}");
    p
}

fn tool(name: &str) {
    // dcmtk comes with the de-identification peers; fail loudly rather than skip.
    common::peers_python();
    assert!(
        Command::new(name).arg("--version").output().is_ok(),
        "{name} (dcmtk) is not installed; scripts/deid-peers.sh should have installed it"
    );
}

/// A copy of `source` with attributes replaced by dcmodify (meta UIDs follow).
fn derived(source: &Path, out: &Path, changes: &[(&str, &str)]) -> PathBuf {
    tool("dcmodify");
    std::fs::copy(source, out).expect("copy a fixture");
    let mut cmd = Command::new("dcmodify");
    cmd.arg("-nb");
    for (tag, value) in changes {
        cmd.arg("-m").arg(format!("{tag}={value}"));
    }
    let done = cmd.arg(out).output().expect("dcmodify runs");
    assert!(
        done.status.success(),
        "dcmodify failed: {}",
        String::from_utf8_lossy(&done.stderr)
    );
    out.to_path_buf()
}

fn text(obj: &dicom_object::DefaultDicomObject, tag: dicom_core::Tag) -> String {
    obj.element(tag)
        .ok()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
        .unwrap_or_default()
}

/// (study, series, SOP instance) UIDs of a file.
fn uids(file: &Path) -> (String, String, String) {
    let obj = common::open(file);
    (
        text(&obj, tags::STUDY_INSTANCE_UID),
        text(&obj, tags::SERIES_INSTANCE_UID),
        text(&obj, tags::SOP_INSTANCE_UID),
    )
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// The stored blob is a de-identified copy: the original names, IDs and UIDs are gone.
fn assert_deidentified(original: &Path, blob: &[u8]) {
    let obj = common::open(original);
    let name = original
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    for (tag, keyword) in [
        (tags::PATIENT_NAME, "PatientName"),
        (tags::PATIENT_ID, "PatientID"),
        (tags::PATIENT_BIRTH_DATE, "PatientBirthDate"),
        (tags::SOP_INSTANCE_UID, "SOPInstanceUID"),
        (tags::STUDY_INSTANCE_UID, "StudyInstanceUID"),
    ] {
        let value = text(&obj, tag);
        if value.len() < 4 {
            continue; // too short to search for meaningfully (or absent)
        }
        assert!(
            !contains(blob, value.as_bytes()),
            "{name}: the stored blob still holds the original {keyword}"
        );
    }
    let clean = fracture_shared::pixels::read_object(blob).expect("the blob parses");
    assert_eq!(
        text(&clean, tags::PATIENT_IDENTITY_REMOVED),
        "YES",
        "{name}"
    );
}

/// An ingest stage on an in-process bus, with its own store, linkage and spool.
struct Pipe {
    dir: tempfile::TempDir,
    ingest: Arc<Ingest>,
    bus: InProcBus,
    consumer: Box<dyn StageIo>,
    topics: Topics,
}

impl Pipe {
    async fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temp folder");
        let topics = Topics::default();
        let bus = InProcBus::new();
        bus.create_topics(&topics.all(), 1)
            .await
            .expect("topics are created");
        // The group exists before anything is published, so nothing is pruned unread.
        let consumer = bus
            .consumer(
                "dicomweb-test",
                &[topics.of::<Deidentified>(), topics.of::<DeadLetter>()],
                "t",
            )
            .await
            .expect("a consumer");
        let store = BlobStore::open(&StoreConfig {
            url: dir.path().join("store").display().to_string(),
            ..Default::default()
        })
        .expect("a store");
        let ingest = Arc::new(Ingest {
            policy: DeidPolicy::new(vec![9; 32], "SITE", "2.25").expect("a policy"),
            store,
            topics: topics.clone(),
            linkage: Linkage::open(&dir.path().join("linkage.db"))
                .await
                .expect("a linkage table"),
            retry: fracture_shared::RetryPolicy::default(),
        });
        Self {
            dir,
            ingest,
            bus,
            consumer,
            topics,
        }
    }

    fn spool(&self) -> PathBuf {
        self.dir.path().join("spool")
    }

    fn spool_files(&self) -> Vec<String> {
        std::fs::read_dir(self.spool())
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn producer(&self, name: &str) -> Box<dyn Producer> {
        self.bus.producer(name).await.expect("a producer")
    }

    /// Everything published since the last call.
    async fn published(&mut self) -> (Vec<Deidentified>, Vec<DeadLetter>) {
        let mut all = Vec::new();
        loop {
            let batch = self
                .consumer
                .poll_batch(100, Duration::from_millis(10), Duration::from_millis(300))
                .await
                .expect("poll");
            if batch.is_empty() {
                break;
            }
            all.extend(batch);
        }
        self.consumer.commit(vec![]).await.expect("commit");
        let deid = self.topics.of::<Deidentified>();
        let (d, l): (Vec<_>, Vec<_>) = all.into_iter().partition(|r| r.topic == deid);
        (
            d.iter()
                .map(|r| decode(&r.payload).expect("a Deidentified message"))
                .collect(),
            l.iter()
                .map(|r| decode(&r.payload).expect("a dead letter"))
                .collect(),
        )
    }

    async fn blob(&self, m: &Deidentified) -> Vec<u8> {
        self.ingest
            .store
            .get(&m.dicom)
            .await
            .expect("the blob")
            .to_vec()
    }
}

/// The radiographs and the decoys the back-scan test puts in Orthanc. Derived objects get fixed
/// UIDs, so a shared Orthanc (which keeps the first copy of a UID) sees the same objects on
/// every run.
struct Archive {
    /// CR, 2004.
    rg3: PathBuf,
    /// RG3 as JPEG lossless in a study of 2010: retrieved as stored, not transcoded.
    rg3_jpeg: PathBuf,
    /// DX, 2020, with realistic identifiers.
    cat: PathBuf,
    /// RG3 turned CT, in a CT series of RG3's study.
    ct: PathBuf,
    /// The cat as a study of 1999.
    old_dx: PathBuf,
}

fn archive(dir: &Path) -> Archive {
    let rg3 = fixture("RG3_UNCR.dcm");
    let cat = fixture("cat.dcm");
    let ct = derived(
        &rg3,
        &dir.join("ct.dcm"),
        &[
            ("(0008,0060)", "CT"),
            ("(0008,0016)", CT),
            ("(0020,000E)", "2.25.271828182845904523536028747135266001"),
            ("(0008,0018)", "2.25.271828182845904523536028747135266002"),
        ],
    );
    let old_dx = derived(
        &cat,
        &dir.join("old-dx.dcm"),
        &[
            ("(0008,0020)", "19990101"),
            ("(0008,0021)", "19990101"),
            ("(0020,000D)", "2.25.271828182845904523536028747135266003"),
            ("(0020,000E)", "2.25.271828182845904523536028747135266004"),
            ("(0008,0018)", "2.25.271828182845904523536028747135266005"),
        ],
    );
    let plain = derived(
        &rg3,
        &dir.join("rg3-2010.dcm"),
        &[
            ("(0008,0020)", "20100615"),
            ("(0020,000D)", "2.25.271828182845904523536028747135266010"),
            ("(0020,000E)", "2.25.271828182845904523536028747135266006"),
            ("(0008,0018)", "2.25.271828182845904523536028747135266007"),
        ],
    );
    tool("dcmcjpeg");
    let rg3_jpeg = dir.join("rg3-jpeg.dcm");
    let out = Command::new("dcmcjpeg")
        .arg("+e1")
        .arg(&plain)
        .arg(&rg3_jpeg)
        .output()
        .expect("dcmcjpeg runs");
    assert!(
        out.status.success(),
        "dcmcjpeg failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [&rg3, &rg3_jpeg, &cat, &ct, &old_dx] {
        upload(f);
    }
    Archive {
        rg3,
        rg3_jpeg,
        cat,
        ct,
        old_dx,
    }
}

fn scan_config(pipe: &Pipe) -> DicomwebConfig {
    DicomwebConfig {
        url: orthanc().to_string(),
        spool: pipe.spool().display().to_string(),
        // One result per page: every listing is paged.
        page_size: 1,
        timeout_s: 60,
        ..Default::default()
    }
}

/// The input reference the back-scan gives a file's instance.
fn input_of(pipe: &Pipe, cfg: &DicomwebConfig, file: &Path) -> String {
    let (study, series, sop) = uids(file);
    dicomweb::backscan::instance_input(&pipe.ingest, cfg, &study, &series, &sop).1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_back_scan_retrieves_the_wanted_radiographs_deidentified_and_resumes() {
    let mut pipe = Pipe::new().await;
    let files = tempfile::tempdir().expect("a temp folder");
    let a = archive(files.path());
    let mut producer = pipe.producer("backscan").await;
    let mut cfg = scan_config(&pipe);
    cfg.study_dates = "20000101-20301231".into();

    // 1. CR and DX studies of this century: RG3, its 2010 twin and the cat. With one result
    //    per page, Orthanc 1.10's own offset paging loses one of the two CR studies; the
    //    listing by date ranges must not.
    let first = dicomweb::back_scan(
        &cfg,
        &pipe.ingest,
        producer.as_mut(),
        2,
        &HashSet::new(),
        None,
        |_, _| {},
    )
    .await
    .expect("the back-scan runs");
    assert!(first.complete, "{first:?}");
    let (deid, dead) = pipe.published().await;
    eprintln!(
        "first scan: {first:?}; {} radiographs, {} dead letters",
        deid.len(),
        dead.len()
    );
    let by_sop = |file: &Path| {
        let sop = pipe.ingest.policy.pseudonymise_uid(&uids(file).2);
        deid.iter().find(|m| m.id.sop_instance_uid == sop).cloned()
    };
    for (file, modality) in [(&a.rg3, "CR"), (&a.rg3_jpeg, "CR"), (&a.cat, "DX")] {
        let m = by_sop(file).unwrap_or_else(|| {
            panic!(
                "{} was not retrieved",
                file.file_name().unwrap_or_default().to_string_lossy()
            )
        });
        assert_eq!(m.modality, modality);
        assert_eq!(
            m.id.input,
            input_of(&pipe, &cfg, file),
            "a stable reference"
        );
        assert_deidentified(file, &pipe.blob(&m).await);
    }
    // Retrieved as stored (transfer-syntax=*): the JPEG lossless object was not transcoded.
    let jpeg = pipe.blob(&by_sop(&a.rg3_jpeg).expect("retrieved")).await;
    let jpeg = fracture_shared::pixels::read_object(&jpeg).expect("parses");
    assert_eq!(
        jpeg.meta().transfer_syntax().trim_end_matches('\0'),
        "1.2.840.10008.1.2.4.70"
    );
    // The CT series is not of a wanted modality and the 1999 study is out of range: neither
    // was retrieved, so neither is on the bus in any form.
    let inputs: HashSet<String> = deid
        .iter()
        .map(|m| m.id.input.clone())
        .chain(dead.iter().filter_map(|d| d.input.clone()))
        .collect();
    for decoy in [&a.ct, &a.old_dx] {
        assert!(
            !inputs.contains(&input_of(&pipe, &cfg, decoy)),
            "{} should have been filtered",
            decoy.file_name().unwrap_or_default().to_string_lossy()
        );
    }
    assert!(
        by_sop(&a.ct).is_none() && by_sop(&a.old_dx).is_none(),
        "decoys retrieved"
    );
    assert!(first.studies >= 3 && first.instances >= 3, "{first:?}");
    assert_eq!(first.ingest.produced as usize, deid.len());
    assert!(pipe.spool_files().is_empty(), "the spool is emptied");

    // The linkage table names each input by where it came from: its WADO-RS reference.
    let sources = pipe
        .ingest
        .linkage
        .sources()
        .await
        .expect("the linkage table");
    for file in [&a.rg3, &a.rg3_jpeg, &a.cat] {
        let (study, series, sop) = uids(file);
        let reference = dicomweb::backscan::instance_reference(&cfg, &study, &series, &sop);
        assert!(
            sources.get(&input_of(&pipe, &cfg, file)) == Some(&reference),
            "the linkage source of an instance is its WADO-RS reference"
        );
    }

    // 2. The same scan again, from another spool folder, knowing what was published: the
    //    references derive from the PACS URL and the instance, not the spool, so nothing is
    //    sent twice.
    let done = inputs.clone();
    let moved = DicomwebConfig {
        spool: pipe.dir.path().join("spool-moved").display().to_string(),
        ..cfg.clone()
    };
    for file in [&a.rg3, &a.rg3_jpeg, &a.cat] {
        assert_eq!(
            input_of(&pipe, &moved, file),
            input_of(&pipe, &cfg, file),
            "a reference does not depend on the spool folder"
        );
    }
    let second = dicomweb::back_scan(
        &moved,
        &pipe.ingest,
        producer.as_mut(),
        2,
        &done,
        None,
        |_, _| {},
    )
    .await
    .expect("the back-scan runs");
    let (deid2, dead2) = pipe.published().await;
    assert!(
        deid2.is_empty() && dead2.is_empty(),
        "a resumed scan publishes nothing it published before: {second:?}"
    );
    assert_eq!(second.ingest.produced, 0);
    assert_eq!(second.ingest.resumed, first.instances);
    assert!(
        second.complete && second.instances == first.instances,
        "{second:?}"
    );

    // 3. Every date, CT asked for too: the 1999 study arrives; the CT instance is listed but
    //    never retrieved (its SOP class is not a radiograph's); nothing earlier is sent again.
    cfg.study_dates.clear();
    cfg.modalities = vec!["CR".into(), "DX".into(), "CT".into()];
    cfg.page_size = 50;
    let third = dicomweb::back_scan(
        &cfg,
        &pipe.ingest,
        producer.as_mut(),
        2,
        &done,
        None,
        |_, _| {},
    )
    .await
    .expect("the back-scan runs");
    let (deid3, dead3) = pipe.published().await;
    eprintln!("third scan: {third:?}");
    let old_sop = pipe.ingest.policy.pseudonymise_uid(&uids(&a.old_dx).2);
    let old = deid3
        .iter()
        .find(|m| m.id.sop_instance_uid == old_sop)
        .expect("the 1999 study is retrieved once the date filter is gone");
    assert_deidentified(&a.old_dx, &pipe.blob(old).await);
    let ct_input = input_of(&pipe, &cfg, &a.ct);
    assert!(
        !deid3.iter().any(|m| m.id.input == ct_input)
            && !dead3.iter().any(|d| d.input.as_deref() == Some(&ct_input)),
        "the CT is never retrieved"
    );
    assert!(
        third.filtered >= 1,
        "the CT instance is filtered: {third:?}"
    );
    for m in &deid3 {
        assert!(
            !done.contains(&m.id.input),
            "an instance published before was sent again"
        );
    }
    producer.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreachable_pacs_is_waited_out_until_shutdown() {
    let mut pipe = Pipe::new().await;
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let cfg = DicomwebConfig {
        url: format!("http://127.0.0.1:{port}/dicom-web"),
        spool: pipe.spool().display().to_string(),
        ..Default::default()
    };
    let mut producer = pipe.producer("down").await;
    let (stop, shutdown) = Shutdown::new();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let _ = stop.send(true);
    });
    let report = tokio::time::timeout(
        Duration::from_secs(20),
        dicomweb::back_scan(
            &cfg,
            &pipe.ingest,
            producer.as_mut(),
            4,
            &HashSet::new(),
            Some(&shutdown),
            |_, _| {},
        ),
    )
    .await
    .expect("the scan returns soon after shutdown")
    .expect("an outage is waited out, not an error");
    assert!(!report.complete);
    let (deid, dead) = pipe.published().await;
    assert!(
        deid.is_empty() && dead.is_empty(),
        "nothing is dead-lettered for an outage"
    );
}

/// A scripted DICOMweb server: one study, one CR series, two instances (the first answers 503
/// once, the second is gone), behind an API key.
async fn fake_pacs(rg3: Vec<u8>) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::get;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let busy = Arc::new(AtomicUsize::new(0));
    let json = |v: serde_json::Value| {
        ([("content-type", "application/dicom+json")], v.to_string()).into_response()
    };
    let keyed = |h: &HeaderMap| h.get("x-api-key").is_some_and(|v| v == "k-123");
    let uid = |u: &str| serde_json::json!({"vr": "UI", "Value": [u]});
    let app = axum::Router::new()
        .route(
            "/dicom-web/studies",
            get(move |h: HeaderMap| async move {
                if !keyed(&h) {
                    return StatusCode::UNAUTHORIZED.into_response();
                }
                json(serde_json::json!([{"0020000D": uid("1.2.3")}]))
            }),
        )
        .route(
            "/dicom-web/studies/1.2.3/series",
            get(move || async move {
                json(serde_json::json!([{
                    "0020000E": uid("1.2.3.4"),
                    "00080060": {"vr": "CS", "Value": ["CR"]}
                }]))
            }),
        )
        .route(
            "/dicom-web/studies/1.2.3/series/1.2.3.4/instances",
            get(move || async move {
                json(serde_json::json!([
                    {"00080018": uid("1.2.3.4.5"), "00080016": uid(CR)},
                    {"00080018": uid("1.2.3.4.6"), "00080016": uid(CR)}
                ]))
            }),
        )
        .route(
            "/dicom-web/studies/1.2.3/series/1.2.3.4/instances/1.2.3.4.5",
            get({
                let busy = busy.clone();
                move || async move {
                    if busy.fetch_add(1, Ordering::SeqCst) == 0 {
                        return (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "0")])
                            .into_response();
                    }
                    let mut body = b"--XyZ\r\nContent-Type: application/dicom\r\n\r\n".to_vec();
                    body.extend_from_slice(&rg3);
                    body.extend_from_slice(b"\r\n--XyZ--\r\n");
                    (
                        [(
                            "content-type",
                            "multipart/related; type=\"application/dicom\"; boundary=XyZ",
                        )],
                        body,
                    )
                        .into_response()
                }
            }),
        )
        .route(
            "/dicom-web/studies/1.2.3/series/1.2.3.4/instances/1.2.3.4.6",
            get(|| async { StatusCode::NOT_FOUND }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free port");
    let port = listener.local_addr().expect("an address").port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://127.0.0.1:{port}/dicom-web"), busy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_pacs_is_waited_for_a_missing_instance_dead_lettered_and_the_key_sent() {
    let rg3 = fixture("RG3_UNCR.dcm");
    let mut pipe = Pipe::new().await;
    let (url, busy) = fake_pacs(std::fs::read(&rg3).expect("read RG3")).await;
    let key_file = pipe.dir.path().join("pacs-key");
    std::fs::write(&key_file, "X-Api-Key: wrong").expect("write the key");
    let mut cfg = DicomwebConfig {
        url,
        auth_header_file: key_file.display().to_string(),
        spool: pipe.spool().display().to_string(),
        ..Default::default()
    };
    let mut producer = pipe.producer("fake").await;
    let refused = dicomweb::back_scan(
        &cfg,
        &pipe.ingest,
        producer.as_mut(),
        4,
        &HashSet::new(),
        None,
        |_, _| {},
    )
    .await;
    assert!(
        matches!(refused, Err(dicomweb::ScanError::Refused(401))),
        "a refused key stops the scan: {refused:?}"
    );
    std::fs::write(&key_file, "X-Api-Key: k-123\n").expect("write the key");
    let report = dicomweb::back_scan(
        &cfg,
        &pipe.ingest,
        producer.as_mut(),
        4,
        &HashSet::new(),
        None,
        |_, _| {},
    )
    .await
    .expect("the scan runs");
    assert_eq!(
        (
            report.instances,
            report.ingest.produced,
            report.ingest.dead_lettered
        ),
        (2, 1, 1),
        "{report:?}"
    );
    assert!(
        busy.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "the 503 was retried"
    );
    let (deid, dead) = pipe.published().await;
    assert_eq!(deid.len(), 1);
    assert_eq!(
        deid[0].id.input,
        dicomweb::backscan::instance_input(&pipe.ingest, &cfg, "1.2.3", "1.2.3.4", "1.2.3.4.5").1
    );
    assert_deidentified(&rg3, &pipe.blob(&deid[0]).await);
    assert_eq!(dead.len(), 1);
    let gone =
        dicomweb::backscan::instance_input(&pipe.ingest, &cfg, "1.2.3", "1.2.3.4", "1.2.3.4.6").1;
    assert_eq!(dead[0].input.as_deref(), Some(gone.as_str()));
    assert!(dead[0].reason.contains("404"), "{}", dead[0].reason);
    assert!(
        !dead[0].reason.contains("1.2.3"),
        "a dead letter names no UID: {}",
        dead[0].reason
    );
    // What was published (the radiograph and the dead letter) is not fetched again.
    let published: HashSet<String> = ["1.2.3.4.5", "1.2.3.4.6"]
        .iter()
        .map(|i| dicomweb::backscan::instance_input(&pipe.ingest, &cfg, "1.2.3", "1.2.3.4", i).1)
        .collect();
    let again = dicomweb::back_scan(
        &cfg,
        &pipe.ingest,
        producer.as_mut(),
        4,
        &published,
        None,
        |_, _| {},
    )
    .await
    .expect("the scan runs");
    assert_eq!(
        (
            again.ingest.resumed,
            again.ingest.produced,
            again.ingest.dead_lettered
        ),
        (2, 0, 0),
        "{again:?}"
    );
    let (deid, dead) = pipe.published().await;
    assert!(deid.is_empty() && dead.is_empty());
    // The references survive a trailing slash on the configured URL and a moved spool.
    cfg.url = cfg.url.replace("/dicom-web", "/dicom-web/");
    cfg.spool = pipe.dir.path().join("elsewhere").display().to_string();
    assert_eq!(
        dicomweb::backscan::instance_input(&pipe.ingest, &cfg, "1.2.3", "1.2.3.4", "1.2.3.4.6").1,
        gone,
        "a trailing slash is the same PACS, another spool the same instance"
    );
    assert!(pipe.spool_files().is_empty());
}

// ---------------------------------------------------------------------------------------------
// HTTPS
//
// Debian bookworm's Orthanc 1.10.1 cannot serve HTTPS: with "SslEnabled" its civetweb
// (libcivetweb1 1.15, which dlopens an unversioned libssl.so and finds OpenSSL 3) crashes on the
// first HTTPS request (a call through a NULL pointer in a worker thread). So the back-scan
// reaches the shared Orthanc through a TLS terminator of our own: a real rustls handshake with a
// throwaway CA, each connection relayed to Orthanc's HTTP port.

/// A throwaway CA and a server certificate it issued for `localhost` (a DNS name only):
/// (CA PEM, server chain PEM, server key PEM).
fn test_certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let pki = common::test_pki(dir, "DNS:localhost");
    (pki.ca, pki.server_cert, pki.server_key)
}

/// A TLS terminator in front of the test's Orthanc.
struct TlsFront {
    _dir: tempfile::TempDir,
    /// The throwaway CA that issued the front's certificate.
    ca: PathBuf,
    port: u16,
    /// Orthanc's DICOMweb path (`/dicom-web`).
    base_path: String,
    /// TCP connections accepted (handshakes tried).
    connections: Arc<std::sync::atomic::AtomicUsize>,
}

impl TlsFront {
    async fn start() -> Self {
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let backend = dicomweb::http::Endpoint::parse(orthanc()).expect("Orthanc's URL");
        let dir = tempfile::tempdir().expect("a temp folder");
        let (ca, chain, key) = test_certificates(dir.path());
        let chain = CertificateDer::pem_file_iter(&chain)
            .expect("the server certificate")
            .collect::<Result<Vec<_>, _>>()
            .expect("PEM");
        let key = PrivateKeyDer::from_pem_file(&key).expect("the server key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("a server configuration");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free port");
        let port = listener.local_addr().expect("an address").port();
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = connections.clone();
        let (host, backend_port) = (backend.host.clone(), backend.port);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let acceptor = acceptor.clone();
                let host = host.clone();
                tokio::spawn(async move {
                    // A client that refuses our certificate ends the handshake here.
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(mut orthanc) =
                        tokio::net::TcpStream::connect((host.as_str(), backend_port)).await
                    else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut orthanc).await;
                });
            }
        });
        Self {
            _dir: dir,
            ca,
            port,
            base_path: backend.base_path,
            connections,
        }
    }

    fn url(&self, host: &str) -> String {
        format!("https://{host}:{}{}", self.port, self.base_path)
    }

    fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_back_scan_over_https_verifies_the_pacs_certificate() {
    let files = tempfile::tempdir().expect("a temp folder");
    // A study of its own, dated apart from the other tests' ranges.
    let rg3 = derived(
        &fixture("RG3_UNCR.dcm"),
        &files.path().join("rg3-https.dcm"),
        &[
            ("(0008,0020)", "19850101"),
            ("(0020,000D)", "2.25.271828182845904523536028747135266012"),
            ("(0020,000E)", "2.25.271828182845904523536028747135266013"),
            ("(0008,0018)", "2.25.271828182845904523536028747135266014"),
        ],
    );
    upload(&rg3);
    let front = TlsFront::start().await;
    let mut pipe = Pipe::new().await;
    let mut producer = pipe.producer("https").await;
    let mut cfg = DicomwebConfig {
        url: front.url("localhost"),
        spool: pipe.spool().display().to_string(),
        study_dates: "19850101".into(),
        timeout_s: 60,
        ..Default::default()
    };

    // Without ca_file the throwaway CA is not trusted: the scan stops at once (an outage would be
    // waited out; a certificate will not change by waiting) and says what to set.
    let untrusted = scan_once(&pipe, producer.as_mut(), &cfg).await;
    let Err(dicomweb::ScanError::Tls(message)) = untrusted else {
        panic!("an untrusted certificate stops the scan: {untrusted:?}");
    };
    assert!(
        message.contains("not trusted") && message.contains("ingest.dicomweb.ca_file"),
        "{message}"
    );
    assert!(
        !message.contains("/dicom-web") && !message.contains("studies"),
        "an error names no URL path: {message}"
    );
    assert_eq!(
        front.connections(),
        1,
        "a refused certificate is not retried"
    );

    // The right CA, but an address the certificate does not name.
    cfg.ca_file = front.ca.display().to_string();
    let wrong_host = DicomwebConfig {
        url: front.url("127.0.0.1"),
        ..cfg.clone()
    };
    let refused = scan_once(&pipe, producer.as_mut(), &wrong_host).await;
    let Err(dicomweb::ScanError::Tls(message)) = refused else {
        panic!("a certificate for another host stops the scan: {refused:?}");
    };
    assert!(message.contains("not valid for the host"), "{message}");

    // A CA file with a plain-HTTP URL is a configuration mistake, not a silent downgrade.
    let plain = DicomwebConfig {
        url: orthanc().to_string(),
        ..cfg.clone()
    };
    let mistaken = scan_once(&pipe, producer.as_mut(), &plain).await;
    assert!(
        matches!(mistaken, Err(dicomweb::ScanError::Config(_))),
        "{mistaken:?}"
    );

    // With the CA trusted, the radiograph comes over TLS.
    let report = scan_once(&pipe, producer.as_mut(), &cfg)
        .await
        .expect("the back-scan over HTTPS runs");
    assert!(
        report.complete && report.ingest.produced == 1 && report.ingest.dead_lettered == 0,
        "{report:?}"
    );
    let (deid, dead) = pipe.published().await;
    assert!(dead.is_empty(), "no dead letters");
    assert_eq!(deid.len(), 1, "the radiograph is on the bus");
    let (study, series, sop) = uids(&rg3);
    assert!(deid[0].id.sop_instance_uid == pipe.ingest.policy.pseudonymise_uid(&sop));
    assert!(
        deid[0].id.input
            == dicomweb::backscan::instance_input(&pipe.ingest, &cfg, &study, &series, &sop).1,
        "the reference of an https:// instance"
    );
    assert_deidentified(&rg3, &pipe.blob(&deid[0]).await);
    assert!(
        front.connections() >= 3,
        "the scan went through the TLS front"
    );
    producer.close().await.expect("close");
}

/// One back-scan that must end within a minute.
async fn scan_once(
    pipe: &Pipe,
    producer: &mut dyn Producer,
    cfg: &DicomwebConfig,
) -> Result<dicomweb::ScanReport, dicomweb::ScanError> {
    tokio::time::timeout(
        Duration::from_secs(60),
        dicomweb::back_scan(
            cfg,
            &pipe.ingest,
            producer,
            4,
            &HashSet::new(),
            None,
            |_, _| {},
        ),
    )
    .await
    .expect("the back-scan ends within a minute (a TLS refusal is not waited out)")
}

// ---------------------------------------------------------------------------------------------
// STOW-RS

const TOKEN: &str = "stow-test-token-0123456789";
const BOUNDARY: &str = "fracture-test-boundary-7f3a";

struct Stow {
    pipe: Pipe,
    port: u16,
    stop: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Stow {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// An endpoint whose configuration `f` adjusts.
    async fn start_with(f: impl FnOnce(&mut DicomwebConfig)) -> Self {
        let pipe = Pipe::new().await;
        let token_file = pipe.dir.path().join("stow-token");
        std::fs::write(&token_file, format!("{TOKEN}\n")).expect("write the token");
        let mut cfg = DicomwebConfig {
            spool: pipe.spool().display().to_string(),
            stow_token_file: token_file.display().to_string(),
            ..Default::default()
        };
        f(&mut cfg);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free port");
        let port = listener.local_addr().expect("an address").port();
        let producer = Arc::new(Mutex::new(pipe.producer("stow").await));
        let (stop, shutdown) = Shutdown::new();
        let server = tokio::spawn({
            let ingest = pipe.ingest.clone();
            async move { dicomweb::serve_stow_on(listener, &cfg, ingest, producer, shutdown).await }
        });
        Self {
            pipe,
            port,
            stop,
            server,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// POSTs a hand-made multipart body with curl and these request headers; returns (HTTP
    /// status, response headers, response body).
    async fn post(
        &self,
        path: &str,
        parts: &[(&str, Vec<u8>)],
        headers: &[&str],
    ) -> (u16, String, Vec<u8>) {
        let mut body = Vec::new();
        for (content_type, bytes) in parts {
            body.extend_from_slice(
                format!("--{BOUNDARY}\r\nContent-Type: {content_type}\r\n\r\n").as_bytes(),
            );
            body.extend_from_slice(bytes);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
        let dir = self.pipe.dir.path();
        let (req, resp, head) = (
            dir.join("request.bin"),
            dir.join("response.bin"),
            dir.join("headers.txt"),
        );
        std::fs::write(&req, &body).expect("write the request");
        let mut args: Vec<String> = vec![
            "-o".into(),
            resp.display().to_string(),
            "-D".into(),
            head.display().to_string(),
            "-w".into(),
            "%{http_code}".into(),
            "-X".into(),
            "POST".into(),
            "--data-binary".into(),
            format!("@{}", req.display()),
        ];
        for header in headers {
            args.push("-H".into());
            args.push(header.to_string());
        }
        args.push(self.url(path));
        let out = tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            curl(&refs)
        })
        .await
        .expect("curl task");
        assert!(
            out.status.success(),
            "curl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let status = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("an HTTP status");
        (
            status,
            std::fs::read_to_string(&head).unwrap_or_default(),
            std::fs::read(&resp).unwrap_or_default(),
        )
    }

    async fn stop(self) -> Pipe {
        let _ = self.stop.send(true);
        tokio::time::timeout(Duration::from_secs(10), self.server)
            .await
            .expect("STOW-RS stops within 10 s of shutdown")
            .expect("the task does not panic")
            .expect("STOW-RS stops cleanly");
        self.pipe
    }
}

const MULTIPART: &str = "Content-Type: multipart/related; type=\"application/dicom\"; boundary=fracture-test-boundary-7f3a";
const AUTH: &str = "Authorization: Bearer stow-test-token-0123456789";

/// The (class, instance, failure reason) items of a STOW-RS JSON response sequence.
fn items(v: &serde_json::Value, tag: &str) -> Vec<(String, String, Option<u64>)> {
    v[tag]["Value"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| {
                    let s = |t: &str| i[t]["Value"][0].as_str().unwrap_or_default().to_string();
                    (
                        s("00081150"),
                        s("00081155"),
                        i["00081197"]["Value"][0].as_u64(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stow_stores_radiographs_and_answers_for_each_instance() {
    let files = tempfile::tempdir().expect("a temp folder");
    let rg3 = fixture("RG3_UNCR.dcm");
    let ct = derived(
        &rg3,
        &files.path().join("ct.dcm"),
        &[("(0008,0060)", "CT"), ("(0008,0016)", CT)],
    );
    let mut stow = Stow::start().await;
    let (status, headers, body) = stow
        .post(
            "/studies",
            &[
                ("application/dicom", std::fs::read(&rg3).expect("read RG3")),
                (
                    "application/dicom",
                    b"this part is not a DICOM object".to_vec(),
                ),
                (
                    "application/dicom",
                    std::fs::read(&ct).expect("read the CT"),
                ),
            ],
            &[MULTIPART, AUTH, "Accept: application/dicom+json"],
        )
        .await;
    assert_eq!(status, 202, "some stored, some failed");
    assert!(
        headers
            .to_ascii_lowercase()
            .contains("content-type: application/dicom+json"),
        "{headers}"
    );
    let v: serde_json::Value = serde_json::from_slice(&body).expect("a DICOM JSON response");
    let (_, _, rg3_sop) = uids(&rg3);
    let (_, _, ct_sop) = uids(&ct);
    assert_eq!(
        items(&v, "00081199"),
        vec![(CR.into(), rg3_sop.clone(), None)]
    );
    let failed = items(&v, "00081198");
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert!(
        failed.contains(&(String::new(), String::new(), Some(0xC000))),
        "the broken part fails as cannot-understand: {failed:?}"
    );
    assert!(
        failed.contains(&(CT.into(), ct_sop, Some(0x0122))),
        "the CT fails as a SOP class we do not store: {failed:?}"
    );
    let (deid, dead) = stow.pipe.published().await;
    assert_eq!(deid.len(), 1, "RG3 is on the bus");
    assert_eq!(
        deid[0].id.sop_instance_uid,
        stow.pipe.ingest.policy.pseudonymise_uid(&rg3_sop)
    );
    assert_deidentified(&rg3, &stow.pipe.blob(&deid[0]).await);
    assert_eq!(
        dead.len(),
        1,
        "the broken part is dead-lettered; the CT is refused without a message"
    );
    assert!(dead[0].reason.contains("DICM"), "{}", dead[0].reason);

    // Alone, RG3 is a plain success; the XML form is served to a client that asks for it.
    let (status, headers, body) = stow
        .post(
            "/studies",
            &[("application/dicom", std::fs::read(&rg3).expect("read RG3"))],
            &[MULTIPART, AUTH, "Accept: application/dicom+xml"],
        )
        .await;
    assert_eq!(status, 200);
    assert!(headers
        .to_ascii_lowercase()
        .contains("application/dicom+xml"));
    let xml = String::from_utf8_lossy(&body);
    assert!(xml.contains("keyword=\"ReferencedSOPSequence\"") && xml.contains(&rg3_sop));
    let pipe = stow.stop().await;
    assert!(pipe.spool_files().is_empty(), "the spool is emptied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stow_refuses_bad_requests_before_anything_is_stored() {
    let rg3 = std::fs::read(fixture("RG3_UNCR.dcm")).expect("read RG3");
    let mut stow = Stow::start().await;
    let part = [("application/dicom", rg3.clone())];
    // No token, a wrong token.
    let (status, headers, _) = stow.post("/studies", &part, &[MULTIPART]).await;
    assert_eq!(status, 401);
    assert!(headers
        .to_ascii_lowercase()
        .contains("www-authenticate: bearer"));
    let (status, _, _) = stow
        .post(
            "/studies",
            &part,
            &[MULTIPART, "Authorization: Bearer wrong-token-0123456789x"],
        )
        .await;
    assert_eq!(status, 401);
    // Not multipart/related DICOM.
    let (status, _, _) = stow
        .post(
            "/studies",
            &part,
            &[AUTH, "Content-Type: application/dicom"],
        )
        .await;
    assert_eq!(status, 415);
    // A body whose boundary is not the declared one.
    let (status, _, _) = stow
        .post(
            "/studies",
            &part,
            &[
                AUTH,
                "Content-Type: multipart/related; type=\"application/dicom\"; boundary=other",
            ],
        )
        .await;
    assert_eq!(status, 400);
    // RG3 posted to another study: a conflict, nothing stored.
    let (status, _, body) = stow
        .post("/studies/1.2.3.4.5", &part, &[MULTIPART, AUTH])
        .await;
    assert_eq!(status, 409);
    let v: serde_json::Value = serde_json::from_slice(&body).expect("a DICOM JSON response");
    assert_eq!(items(&v, "00081198")[0].2, Some(0xA900));
    let (deid, dead) = stow.pipe.published().await;
    assert!(deid.is_empty() && dead.is_empty(), "nothing was published");
    stow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_outage_is_answered_503_retry_after_and_publishes_nothing() {
    let rg3 = std::fs::read(fixture("RG3_UNCR.dcm")).expect("read RG3");
    let mut stow = Stow::start().await;
    // The claim-check folder becomes a plain file: every put fails as unavailable.
    let store = stow.pipe.dir.path().join("store");
    let _ = std::fs::remove_dir_all(&store);
    std::fs::write(&store, b"not a folder").expect("a file in its place");
    let (status, headers, body) = stow
        .post(
            "/studies",
            &[
                ("application/dicom", rg3.clone()),
                ("application/dicom", rg3),
            ],
            &[MULTIPART, AUTH],
        )
        .await;
    assert_eq!(status, 503);
    assert!(
        headers.to_ascii_lowercase().contains("retry-after:"),
        "{headers}"
    );
    let v: serde_json::Value = serde_json::from_slice(&body).expect("a DICOM JSON response");
    let failed = items(&v, "00081198");
    assert_eq!(failed.len(), 2);
    assert!(failed.iter().all(|f| f.2 == Some(0xA700)), "{failed:?}");
    let (deid, dead) = stow.pipe.published().await;
    assert!(
        deid.is_empty() && dead.is_empty(),
        "an outage is the client's to retry, not a dead letter"
    );
    let pipe = stow.stop().await;
    assert!(pipe.spool_files().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn orthanc_pushes_to_our_stow_endpoint_with_its_own_client() {
    let files = tempfile::tempdir().expect("a temp folder");
    // A study of its own, dated outside the back-scan test's range, so the two tests sharing
    // this Orthanc do not see each other's objects.
    let rg3 = derived(
        &fixture("RG3_UNCR.dcm"),
        &files.path().join("rg3-pushed.dcm"),
        &[
            ("(0008,0020)", "19800101"),
            ("(0020,000D)", "2.25.271828182845904523536028747135266011"),
            ("(0020,000E)", "2.25.271828182845904523536028747135266008"),
            ("(0008,0018)", "2.25.271828182845904523536028747135266009"),
        ],
    );
    upload(&rg3);
    let mut stow = Stow::start().await;
    let rest = orthanc_rest();
    // Orthanc's own DICOMweb client: register our endpoint as a server, then ask it to push.
    let server = serde_json::json!({
        "Url": stow.url("/"),
        "HttpHeaders": {"Authorization": format!("Bearer {TOKEN}")},
    })
    .to_string();
    let name = format!("fracture{}", stow.port);
    let out = curl(&[
        "-f",
        "-X",
        "PUT",
        "--data-binary",
        &server,
        &format!("{rest}/dicom-web/servers/{name}"),
    ]);
    assert!(
        out.status.success(),
        "Orthanc did not register our STOW-RS endpoint: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, _, sop) = uids(&rg3);
    let lookup = curl(&[
        "-f",
        "-X",
        "POST",
        "--data-binary",
        &serde_json::json!({"Level": "Instance", "Query": {"SOPInstanceUID": sop}}).to_string(),
        &format!("{rest}/tools/find"),
    ]);
    let ids: Vec<String> = serde_json::from_slice(&lookup.stdout).expect("Orthanc finds");
    assert_eq!(ids.len(), 1, "Orthanc holds the instance to push");
    let push = curl(&[
        "-f",
        "-X",
        "POST",
        "--data-binary",
        &serde_json::json!({"Resources": [ids[0]], "Synchronous": true}).to_string(),
        &format!("{rest}/dicom-web/servers/{name}/stow"),
    ]);
    assert!(
        push.status.success(),
        "Orthanc's STOW-RS push failed: {}{}",
        String::from_utf8_lossy(&push.stderr),
        String::from_utf8_lossy(&push.stdout)
    );
    let (deid, dead) = stow.pipe.published().await;
    assert!(dead.is_empty(), "no dead letters");
    assert_eq!(deid.len(), 1, "the pushed radiograph is on the bus");
    assert_eq!(
        deid[0].id.sop_instance_uid,
        stow.pipe.ingest.policy.pseudonymise_uid(&sop)
    );
    assert_deidentified(&rg3, &stow.pipe.blob(&deid[0]).await);
    let _ = curl(&["-X", "DELETE", &format!("{rest}/dicom-web/servers/{name}")]);
    stow.stop().await;
}

/// Hostile STOW-RS requests are each refused with a status and a reason, and the endpoint goes
/// on: a part with 100 KB of headers, 10,001 parts, a body that stalls half way (408 after the
/// idle timeout), a request whose headers trickle in (cut off); then a radiograph is stored. An
/// endpoint without a token is refused on anything but loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stow_refuses_hostile_requests_and_goes_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rg3 = std::fs::read(fixture("RG3_UNCR.dcm")).expect("read RG3");
    let mut stow = Stow::start_with(|c| c.stow_idle_timeout_s = 2).await;

    let junk = format!("X-Junk: {}", "a".repeat(100_000));
    let (status, _, body) = stow
        .post(
            "/studies",
            &[(&format!("application/dicom\r\n{junk}"), rg3.clone())],
            &[MULTIPART, AUTH],
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        String::from_utf8_lossy(&body).contains("headers run past 16384 bytes"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    let many: Vec<(&str, Vec<u8>)> = (0..10_001).map(|_| ("application/dicom", vec![])).collect();
    let (status, _, body) = stow.post("/studies", &many, &[MULTIPART, AUTH]).await;
    assert_eq!(status, 400);
    assert!(
        String::from_utf8_lossy(&body).contains("more than 10000 parts"),
        "{}",
        String::from_utf8_lossy(&body)
    );

    // Headers and the first 100 bytes of a 100,000-byte body, then nothing.
    let mut stalled = tokio::net::TcpStream::connect(("127.0.0.1", stow.port))
        .await
        .unwrap();
    let head = format!(
        "POST /studies HTTP/1.1\r\nHost: x\r\n{AUTH}\r\n{MULTIPART}\r\nContent-Length: 100000\r\n\r\n"
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    stalled.write_all(&[b'-'; 100]).await.unwrap();
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(15), stalled.read(&mut answer))
        .await
        .expect("answered within the idle timeout")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    // Headers a line every 500 ms: cut off by the header-read timeout.
    let mut trickle = tokio::net::TcpStream::connect(("127.0.0.1", stow.port))
        .await
        .unwrap();
    trickle
        .write_all(b"POST /studies HTTP/1.1\r\n")
        .await
        .unwrap();
    let mut cut = false;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut b = [0u8; 64];
        if trickle.write_all(b"X-Slow: 1\r\n").await.is_err()
            || matches!(
                tokio::time::timeout(Duration::from_millis(1), trickle.read(&mut b)).await,
                Ok(Ok(_)) | Ok(Err(_))
            )
        {
            cut = true;
            break;
        }
    }
    assert!(cut, "a client trickling its headers keeps its connection");

    let (status, _, _) = stow
        .post(
            "/studies",
            &[("application/dicom", rg3)],
            &[MULTIPART, AUTH],
        )
        .await;
    assert_eq!(status, 200);
    let (deid, dead) = stow.pipe.published().await;
    assert_eq!((deid.len(), dead.len()), (1, 0));
    let pipe = stow.stop().await;

    // No token: loopback only.
    let open = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let (_stop, shutdown) = Shutdown::new();
    let cfg = DicomwebConfig {
        spool: pipe.spool().display().to_string(),
        ..Default::default()
    };
    let producer = Arc::new(Mutex::new(pipe.producer("stow-open").await));
    let refused = dicomweb::serve_stow_on(open, &cfg, pipe.ingest.clone(), producer, shutdown)
        .await
        .expect_err("an open endpoint without a token");
    assert!(refused.to_string().contains("without a token"), "{refused}");
}
