//! The DICOM C-STORE SCP against dcmtk (echoscu, dcmsend, dcmodify, dcmcjpeg) as real peers.

// Values are never printed: checks on the stored blobs say only whether an identifier survived.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use dicom_dictionary_std::tags;
use tokio::sync::Mutex;

use fracture_edge::linkage::Linkage;
use fracture_ingest::scp::{self, status, Received, ScpConfig};
use fracture_ingest::{DeidPolicy, Ingest, Outcome};
use fracture_shared::bus::{Bus, InProcBus, Producer, Record, StageIo, Topics};
use fracture_shared::messages::{decode, DeadLetter, Deidentified};
use fracture_shared::stage::Shutdown;
use fracture_shared::store::{BlobStore, StoreConfig};

const AE: &str = "FRACTURE";

/// One SCP on 127.0.0.1:<free port> with its own bus, store, linkage and spool.
struct Harness {
    port: u16,
    dir: tempfile::TempDir,
    ingest: Arc<Ingest>,
    producer: Arc<Mutex<Box<dyn Producer>>>,
    consumer: Box<dyn StageIo>,
    topics: Topics,
    stop: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Harness {
    async fn start() -> Self {
        Self::start_with(4).await
    }

    async fn start_with(max_associations: usize) -> Self {
        Self::start_configured(|c| c.max_associations = max_associations).await
    }

    /// An SCP whose configuration `f` adjusts (TLS, limits).
    async fn start_configured(f: impl FnOnce(&mut ScpConfig)) -> Self {
        // dcmtk comes with the de-identification peers; fail loudly rather than skip.
        common::peers_python();
        for tool in ["echoscu", "dcmsend", "dcmodify", "dcmcjpeg"] {
            assert!(
                std::process::Command::new(tool)
                    .arg("--version")
                    .output()
                    .is_ok(),
                "{tool} (dcmtk) is not installed; scripts/deid-peers.sh should have installed it"
            );
        }
        let dir = tempfile::tempdir().expect("a temp folder");
        let topics = Topics::default();
        let bus = InProcBus::new();
        bus.create_topics(&topics.all(), 1)
            .await
            .expect("topics are created");
        // The group exists before anything is published, so nothing is pruned unread.
        let consumer = bus
            .consumer(
                "scp-test",
                &[topics.of::<Deidentified>(), topics.of::<DeadLetter>()],
                "t",
            )
            .await
            .expect("a consumer");
        let producer = Arc::new(Mutex::new(bus.producer("scp").await.expect("a producer")));
        let store = BlobStore::open(&StoreConfig {
            url: dir.path().join("store").display().to_string(),
            ..Default::default()
        })
        .expect("a store");
        let ingest = Arc::new(Ingest {
            policy: DeidPolicy::new(vec![7; 32], "SITE", "2.25").expect("a policy"),
            store,
            topics: topics.clone(),
            linkage: Linkage::open(&dir.path().join("linkage.db"))
                .await
                .expect("a linkage table"),
            retry: fracture_shared::RetryPolicy::default(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free port");
        let port = listener.local_addr().expect("an address").port();
        let mut cfg = ScpConfig {
            listen: String::new(),
            ae_title: AE.into(),
            spool: dir.path().join("spool").display().to_string(),
            max_associations: 4,
            ..Default::default()
        };
        f(&mut cfg);
        let (stop, shutdown) = Shutdown::new();
        let server = tokio::spawn({
            let ingest = ingest.clone();
            let producer = producer.clone();
            async move { scp::serve_on(listener, &cfg, ingest, producer, shutdown).await }
        });
        Self {
            port,
            dir,
            ingest,
            producer,
            consumer,
            topics,
            stop,
            server,
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

    async fn dcmsend(&self, files: &[&Path], extra: &[&str]) -> Output {
        let out = tokio::process::Command::new("dcmsend")
            .arg("-v")
            .args(["-aet", "TESTSCU", "-aec", AE])
            .args(extra)
            .arg("127.0.0.1")
            .arg(self.port.to_string())
            .args(files)
            .output()
            .await
            .expect("dcmsend runs");
        // For the record (dcmsend prints file names, counts and statuses, no header values).
        eprintln!(
            "dcmsend {:?} -> {}\n{}{}",
            files
                .iter()
                .map(|f| f.file_name().unwrap_or_default())
                .collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Everything published so far, split by topic.
    async fn published(&mut self) -> (Vec<Record>, Vec<Record>) {
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
        let deid = self.topics.of::<Deidentified>();
        all.into_iter().partition(|r| r.topic == deid)
    }

    async fn blob(&self, record: &Record) -> (Deidentified, Vec<u8>) {
        let m: Deidentified = decode(&record.payload).expect("a Deidentified message");
        let bytes = self.ingest.store.get(&m.dicom).await.expect("the blob");
        (m, bytes.to_vec())
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        let result = tokio::time::timeout(Duration::from_secs(10), self.server)
            .await
            .expect("the SCP stops within 10 s of shutdown")
            .expect("the SCP task does not panic");
        result.expect("the SCP stops cleanly");
    }
}

fn fixture(name: &str) -> PathBuf {
    let p = common::fixtures().join(name);
    assert!(p.exists(), "scripts/fixtures.sh did not provide {name}");
    p
}

fn text(obj: &dicom_object::DefaultDicomObject, tag: dicom_core::Tag) -> String {
    obj.element(tag)
        .ok()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
        .unwrap_or_default()
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

/// A CT: RG3 with its SOP class and modality changed by dcmodify.
fn make_ct(dir: &Path) -> PathBuf {
    let ct = dir.join("ct.dcm");
    std::fs::copy(fixture("RG3_UNCR.dcm"), &ct).expect("copy RG3");
    let out = std::process::Command::new("dcmodify")
        .args(["-nb", "-m", "(0008,0060)=CT", "-m"])
        .arg("(0008,0016)=1.2.840.10008.5.1.4.1.1.2")
        .arg(&ct)
        .output()
        .expect("dcmodify runs");
    assert!(
        out.status.success(),
        "dcmodify failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ct
}

/// The data set of a Part 10 file without preamble and meta, as a sender puts it on the wire.
fn data_set_of(file: &Path) -> (String, Vec<u8>) {
    let bytes = std::fs::read(file).expect("read");
    assert_eq!(&bytes[128..132], b"DICM");
    // (0002,0000) UL, explicit VR LE: tag 4, VR 2, length 2, value 4.
    let group = u32::from_le_bytes(bytes[140..144].try_into().expect("4 bytes")) as usize;
    let obj = common::open(file);
    let ts = obj
        .meta()
        .transfer_syntax()
        .trim_end_matches('\0')
        .to_string();
    (ts, bytes[144 + group..].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn echo_succeeds_and_a_wrong_called_ae_title_is_rejected() {
    let mut h = Harness::start().await;
    let echo = |aec: &'static str| {
        tokio::process::Command::new("echoscu")
            .args(["-aet", "TESTSCU", "-aec", aec, "127.0.0.1"])
            .arg(h.port.to_string())
            .output()
    };
    let ok = echo(AE).await.expect("echoscu runs");
    assert!(
        ok.status.success(),
        "echoscu failed: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let wrong = echo("ELSEWHERE").await.expect("echoscu runs");
    assert!(
        !wrong.status.success(),
        "an association calling another AE title must be rejected"
    );
    let (deid, dead) = h.published().await;
    assert!(
        deid.is_empty() && dead.is_empty(),
        "an echo publishes nothing"
    );
    let port = h.port;
    h.stop().await;
    let after = tokio::process::Command::new("echoscu")
        .args(["-aec", AE, "127.0.0.1"])
        .arg(port.to_string())
        .output()
        .await
        .expect("echoscu runs");
    assert!(!after.status.success(), "nothing listens after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_the_association_limit_is_rejected_as_transient() {
    let h = Harness::start_with(1).await;
    let echo = || {
        tokio::process::Command::new("echoscu")
            .args(["-v", "-aec", AE, "127.0.0.1"])
            .arg(h.port.to_string())
            .output()
    };
    // A connection that has not asked for its association yet holds the only slot.
    let hold = tokio::net::TcpStream::connect(("127.0.0.1", h.port))
        .await
        .expect("connect");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let busy = echo().await.expect("echoscu runs");
    let said =
        String::from_utf8_lossy(&busy.stderr).to_string() + &String::from_utf8_lossy(&busy.stdout);
    eprintln!("echoscu while full -> {}\n{said}", busy.status);
    assert!(!busy.status.success(), "the second association is rejected");
    assert!(
        said.contains("Transient") && said.contains("Local Limit Exceeded"),
        "rejected as transient, local limit exceeded"
    );
    drop(hold);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ok = echo().await.expect("echoscu runs");
    assert!(ok.status.success(), "the slot is free again");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn radiographs_are_deidentified_stored_published_and_unspooled() {
    let mut h = Harness::start().await;
    for name in ["RG3_UNCR.dcm", "cat.dcm"] {
        let out = h.dcmsend(&[&fixture(name)], &[]).await;
        assert!(
            out.status.success(),
            "dcmsend {name} failed: {}",
            out.status
        );
    }
    let (deid, dead) = h.published().await;
    assert_eq!(dead.len(), 0, "no dead letters for two radiographs");
    assert_eq!(
        deid.len(),
        2,
        "one fracture.deidentified message per object"
    );
    let mut modalities = Vec::new();
    for (record, name) in deid.iter().zip(["RG3_UNCR.dcm", "cat.dcm"]) {
        let (m, blob) = h.blob(record).await;
        assert_deidentified(&fixture(name), &blob);
        modalities.push(m.modality.clone());
        assert!(m.rows > 0 && m.columns > 0, "{name}: image size recorded");
    }
    assert_eq!(modalities, ["CR", "DX"]);
    assert!(
        h.spool_files().is_empty(),
        "spool files are removed after the answer: {:?}",
        h.spool_files()
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ct_is_refused_at_association_and_never_published() {
    let mut h = Harness::start().await;
    let ct = make_ct(h.dir.path());
    let out = h.dcmsend(&[&ct], &[]).await;
    // We reject the CT presentation context (see scp::STORAGE_CLASSES). dcmsend (3.6.7) still
    // exits 0 when a file found no presentation context, so the check is on what it reports.
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("No Acceptable Presentation Contexts")
            && said.contains("NOT sent to the peer   : 1")
            && !said.contains("with status SUCCESS"),
        "dcmsend must report the CT as not sent for want of a presentation context"
    );
    let (deid, dead) = h.published().await;
    assert!(
        deid.is_empty(),
        "nothing for a CT reaches fracture.deidentified"
    );
    assert!(dead.is_empty(), "a rejected context never became an object");
    assert!(h.spool_files().is_empty());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_senders_at_once_both_succeed() {
    let mut h = Harness::start().await;
    let (rg3, cat) = (fixture("RG3_UNCR.dcm"), fixture("cat.dcm"));
    let (first, second): ([&Path; 1], [&Path; 1]) = ([&rg3], [&cat]);
    let (a, b) = tokio::join!(h.dcmsend(&first, &[]), h.dcmsend(&second, &[]));
    assert!(a.status.success(), "first dcmsend failed: {}", a.status);
    assert!(b.status.success(), "second dcmsend failed: {}", b.status);
    let (deid, dead) = h.published().await;
    assert_eq!((deid.len(), dead.len()), (2, 0));
    assert!(h.spool_files().is_empty());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jpeg_lossless_is_stored_in_its_received_transfer_syntax() {
    let mut h = Harness::start().await;
    let jpeg = h.dir.path().join("rg3-jpeg.dcm");
    let out = std::process::Command::new("dcmcjpeg")
        .arg("+e1")
        .arg(fixture("RG3_UNCR.dcm"))
        .arg(&jpeg)
        .output()
        .expect("dcmcjpeg runs");
    assert!(
        out.status.success(),
        "dcmcjpeg failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // -dn: dcmsend must not fall back to decompressing; the SCP must accept JPEG as is.
    let sent = h.dcmsend(&[&jpeg], &["-dn"]).await;
    assert!(sent.status.success(), "dcmsend failed: {}", sent.status);
    let (deid, dead) = h.published().await;
    assert_eq!((deid.len(), dead.len()), (1, 0));
    let (_, blob) = h.blob(&deid[0]).await;
    let clean = fracture_shared::pixels::read_object(&blob).expect("the blob parses");
    assert_eq!(
        clean.meta().transfer_syntax().trim_end_matches('\0'),
        "1.2.840.10008.1.2.4.70",
        "JPEG lossless SV1 kept"
    );
    assert_deidentified(&jpeg, &blob);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_objects_are_dead_lettered_with_a_fitting_status() {
    let mut h = Harness::start().await;
    let spool = h.spool();
    // A CT data set sent on a CR presentation context (the context check cannot catch it).
    let (ts, data_set) = data_set_of(&make_ct(h.dir.path()));
    let ct = scp::store_object(
        &h.ingest,
        &h.producer,
        &spool,
        Received {
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.1".into(),
            sop_instance_uid: "1.2.3.4".into(),
            transfer_syntax: ts,
            data_set,
        },
    )
    .await;
    assert_eq!(ct.status, status::DATA_SET_MISMATCH, "{ct:?}");
    assert_eq!(ct.outcome, Some(Outcome::DeadLettered));
    assert!(ct
        .comment
        .as_deref()
        .is_some_and(|c| c.starts_with("not a radiograph") && c.len() <= 64));

    // Bytes that do not parse as a data set.
    let junk = scp::store_object(
        &h.ingest,
        &h.producer,
        &spool,
        Received {
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.1".into(),
            sop_instance_uid: "1.2.3.5".into(),
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
            data_set: vec![0xff; 1000],
        },
    )
    .await;
    assert_eq!(junk.status, status::CANNOT_UNDERSTAND, "{junk:?}");
    assert_eq!(junk.outcome, Some(Outcome::DeadLettered));

    let (deid, dead) = h.published().await;
    assert!(
        deid.is_empty(),
        "nothing refused reaches fracture.deidentified"
    );
    assert_eq!(dead.len(), 2, "each refused object is one dead letter");
    for r in &dead {
        let l: DeadLetter = decode(&r.payload).expect("a dead letter");
        assert_eq!(l.stage, "ingest");
    }
    assert!(h.spool_files().is_empty());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_outage_asks_the_sender_to_retry_and_publishes_nothing() {
    let mut h = Harness::start().await;
    // The claim-check folder becomes a plain file: every put fails as unavailable.
    let store = h.dir.path().join("store");
    std::fs::remove_dir_all(&store).expect("remove the store");
    std::fs::write(&store, b"not a folder").expect("a file in its place");
    let (ts, data_set) = data_set_of(&fixture("RG3_UNCR.dcm"));
    let a = scp::store_object(
        &h.ingest,
        &h.producer,
        &h.spool(),
        Received {
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.1".into(),
            sop_instance_uid: "1.2.3.6".into(),
            transfer_syntax: ts,
            data_set,
        },
    )
    .await;
    assert_eq!(a.status, status::OUT_OF_RESOURCES, "{a:?}");
    assert_eq!(a.outcome, None, "nothing published");
    let (deid, dead) = h.published().await;
    assert!(
        deid.is_empty() && dead.is_empty(),
        "an outage is the sender's to retry, not a dead letter"
    );
    assert!(h.spool_files().is_empty());
    h.stop().await;
}

/// DICOM TLS with client certificates: dcmtk's storescu and echoscu (built with OpenSSL) over a
/// real TLS handshake. A sender with a certificate our CA issued stores a radiograph; one
/// without a certificate, or speaking plain TCP, is turned away and nothing is published.
#[tokio::test]
async fn dicom_tls_with_client_certificates_stores_and_turns_away_the_rest() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = common::test_pki(pki_dir.path(), "DNS:localhost,IP:127.0.0.1");
    let (cert, key, ca) = (
        pki.server_cert.display().to_string(),
        pki.server_key.display().to_string(),
        pki.ca.display().to_string(),
    );
    let mut h = Harness::start_configured(|c| {
        c.tls_cert_file = cert;
        c.tls_key_file = key;
        c.tls_client_ca_file = ca;
    })
    .await;
    let rg3 = fixture("RG3_UNCR.dcm");
    let (client_key, client_cert, ca) = (
        pki.client_key.display().to_string(),
        pki.client_cert.display().to_string(),
        pki.ca.display().to_string(),
    );
    let dcmtk = |tool: &'static str, tls: Vec<String>, file: Option<PathBuf>| {
        let port = h.port.to_string();
        async move {
            let out = tokio::process::Command::new(tool)
                .args(&tls)
                .args(["-aet", "TESTSCU", "-aec", AE, "127.0.0.1", &port])
                .args(file.iter())
                .output()
                .await
                .expect("the dcmtk tool runs");
            eprintln!(
                "{tool} {tls:?} -> {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            out
        }
    };
    let with_cert = vec![
        "+tls".to_string(),
        client_key.clone(),
        client_cert.clone(),
        "+cf".to_string(),
        ca.clone(),
    ];
    let echo = dcmtk("echoscu", with_cert.clone(), None).await;
    assert!(
        echo.status.success(),
        "C-ECHO over TLS with a client certificate"
    );
    let stored = dcmtk("storescu", with_cert, Some(rg3.clone())).await;
    assert!(
        stored.status.success(),
        "C-STORE over TLS with a client certificate"
    );
    let anonymous = vec!["+tla".to_string(), "+cf".to_string(), ca.clone()];
    let refused = dcmtk("storescu", anonymous, Some(rg3.clone())).await;
    assert!(
        !refused.status.success(),
        "a sender without a certificate is turned away"
    );
    let plain = dcmtk("storescu", vec![], Some(rg3.clone())).await;
    assert!(!plain.status.success(), "plain TCP is turned away");

    let (deidentified, dead) = h.published().await;
    assert_eq!(
        deidentified.len(),
        1,
        "only the certified sender's radiograph"
    );
    assert!(dead.is_empty(), "nothing dead-lettered");
    assert!(h.spool_files().is_empty(), "{:?}", h.spool_files());
    h.stop().await;
}

#[test]
fn tls_settings_that_cannot_work_are_refused_with_what_to_set() {
    let half = ScpConfig {
        tls_cert_file: "/etc/fracture/tls.pem".into(),
        ..Default::default()
    };
    let e = half.tls().unwrap_err();
    assert!(e.0.contains("tls_key_file"), "{e}");
    let ca_only = ScpConfig {
        tls_client_ca_file: "/etc/fracture/ca.pem".into(),
        ..Default::default()
    };
    assert!(ca_only.tls().unwrap_err().0.contains("tls_cert_file"));
    let missing = ScpConfig {
        tls_cert_file: "/nonexistent/tls.pem".into(),
        tls_key_file: "/nonexistent/tls.key".into(),
        ..Default::default()
    };
    let e = missing.tls().unwrap_err();
    assert!(
        e.0.contains("cannot read") && e.0.contains("/nonexistent/tls.pem"),
        "{e}"
    );
    assert!(
        ScpConfig::default().tls().unwrap().is_none(),
        "plain TCP by default"
    );
}

/// How the SCP met a raw command set.
#[derive(Debug)]
enum Met {
    /// It aborted or closed the association.
    HungUp,
    /// It said nothing for 30 s.
    Silent,
    /// It answered with a PDU.
    Answered,
}

/// A raw client for what no well-behaved peer sends: after association, `command` as command
/// fragments of 16 KiB (the last one marked last when `last`), then what the SCP does.
async fn send_raw_command(port: u16, command: &[u8], last: bool) -> Met {
    use dicom_ul::pdu::{PDataValue, PDataValueType};
    use dicom_ul::{ClientAssociationOptions, Pdu};
    let mut assoc = ClientAssociationOptions::new()
        .calling_ae_title("HOSTILE")
        .called_ae_title(AE)
        .with_presentation_context(
            dicom_dictionary_std::uids::COMPUTED_RADIOGRAPHY_IMAGE_STORAGE,
            vec![dicom_dictionary_std::uids::IMPLICIT_VR_LITTLE_ENDIAN],
        )
        .establish_async(format!("127.0.0.1:{port}").as_str())
        .await
        .expect("the SCP accepts the association");
    let pc = assoc.presentation_contexts()[0].id;
    let chunks: Vec<&[u8]> = command.chunks(16 * 1024).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let pdu = Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc,
                value_type: PDataValueType::Command,
                is_last: last && i + 1 == chunks.len(),
                data: chunk.to_vec(),
            }],
        };
        if assoc.send(&pdu).await.is_err() {
            return Met::HungUp;
        }
    }
    match tokio::time::timeout(Duration::from_secs(30), assoc.receive()).await {
        Err(_) => Met::Silent,
        Ok(Err(_)) | Ok(Ok(Pdu::AbortRQ { .. })) => Met::HungUp,
        Ok(Ok(_)) => Met::Answered,
    }
}

/// A command set streamed without end (32 MiB of fragments, none last), and one nested 2,000
/// deep, each end their association; the SCP keeps serving, and a radiograph sent after them is
/// stored and published.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hostile_command_set_ends_its_association_and_the_scp_goes_on() {
    let mut h = Harness::start().await;
    let endless = vec![0u8; 32 << 20];
    let met = send_raw_command(h.port, &endless, false).await;
    assert!(
        matches!(met, Met::HungUp),
        "an endless command set: {met:?}"
    );
    // 64,000 bytes: under the size cap, over any sane depth.
    let mut nested = Vec::new();
    for _ in 0..2_000 {
        nested.extend_from_slice(&[0x08, 0x00, 0x40, 0x11, 0xFF, 0xFF, 0xFF, 0xFF]);
        nested.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
    }
    for _ in 0..2_000 {
        nested.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        nested.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
    }
    let met = send_raw_command(h.port, &nested, true).await;
    assert!(matches!(met, Met::HungUp), "a nested command set: {met:?}");
    let sent = h.dcmsend(&[&fixture("RG3_UNCR.dcm")], &[]).await;
    assert!(
        sent.status.success(),
        "the SCP still stores: {}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let (deid, dead) = h.published().await;
    assert_eq!((deid.len(), dead.len()), (1, 0));
    h.stop().await;
}

/// With an allow-list, only the calling AE titles on it may associate; the rest are rejected
/// with the reason dcmtk prints.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_listed_calling_ae_titles_may_associate() {
    let h = Harness::start_configured(|c| c.calling_ae_titles = vec!["MODALITY1".into()]).await;
    let echo = |aet: &'static str| {
        tokio::process::Command::new("echoscu")
            .args(["-v", "-aet", aet, "-aec", AE, "127.0.0.1"])
            .arg(h.port.to_string())
            .output()
    };
    let turned = echo("INTRUDER").await.expect("echoscu runs");
    let said = String::from_utf8_lossy(&turned.stderr).to_string()
        + &String::from_utf8_lossy(&turned.stdout);
    assert!(!turned.status.success(), "{said}");
    assert!(said.contains("Calling AE Title Not Recognized"), "{said}");
    let ok = echo("MODALITY1").await.expect("echoscu runs");
    assert!(ok.status.success(), "{ok:?}");
    h.stop().await;
}

/// A raw client associated with the SCP, for senders that then go quiet or trickle.
async fn associate_raw(
    port: u16,
) -> dicom_ul::association::AsyncClientAssociation<tokio::net::TcpStream> {
    dicom_ul::ClientAssociationOptions::new()
        .calling_ae_title("SLOW")
        .called_ae_title(AE)
        .with_presentation_context(
            dicom_dictionary_std::uids::COMPUTED_RADIOGRAPHY_IMAGE_STORAGE,
            vec![dicom_dictionary_std::uids::IMPLICIT_VR_LITTLE_ENDIAN],
        )
        .establish_async(format!("127.0.0.1:{port}").as_str())
        .await
        .expect("the SCP accepts the association")
}

/// Slow senders cannot hold the door: with one association slot and a 2 s idle timeout, a
/// sender that goes silent and one that trickles a PDU a byte at a time each lose the slot
/// within seconds, and 200 connections opened while the slot is taken are turned away (a few
/// with a transient rejection, the rest closed at once) without stopping the SCP, which then
/// stores a radiograph.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_senders_lose_their_slot_and_a_flood_is_turned_away() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut h = Harness::start_configured(|c| {
        c.max_associations = 1;
        c.idle_timeout_s = 2;
    })
    .await;
    let echo = || {
        tokio::process::Command::new("echoscu")
            .args(["-aec", AE, "127.0.0.1"])
            .arg(h.port.to_string())
            .output()
    };

    // Silent after associating.
    let mut silent = associate_raw(h.port).await;
    assert!(!echo().await.unwrap().status.success(), "the slot is taken");
    let started = std::time::Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), silent.receive()).await;
    assert!(
        matches!(ended, Ok(Err(_)) | Ok(Ok(dicom_ul::Pdu::AbortRQ { .. }))),
        "the silent association is ended: {ended:?}"
    );
    eprintln!("silent sender dropped after {:?}", started.elapsed());
    assert!(echo().await.unwrap().status.success(), "the slot is free");

    // Trickling: a P-DATA-TF header announcing 1,000 bytes, then a byte every 300 ms.
    let mut trickle = associate_raw(h.port).await;
    let stream = trickle.inner_stream();
    stream
        .write_all(&[0x04, 0, 0, 0, 0x03, 0xE8])
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut cut = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if stream.write_all(&[0]).await.is_err() {
            cut = true;
            break;
        }
    }
    assert!(cut, "a trickling sender keeps its slot");
    eprintln!("trickling sender cut after {:?}", started.elapsed());
    drop(trickle);

    // A flood while the slot is held.
    let hold = associate_raw(h.port).await;
    let mut flood = Vec::new();
    for _ in 0..200 {
        flood.push(
            tokio::net::TcpStream::connect(("127.0.0.1", h.port))
                .await
                .expect("connect"),
        );
    }
    let mut closed_at_once = 0;
    for s in &mut flood {
        let mut b = [0u8; 1];
        if let Ok(Ok(0)) | Ok(Err(_)) =
            tokio::time::timeout(Duration::from_millis(500), s.read(&mut b)).await
        {
            closed_at_once += 1;
        }
    }
    assert!(
        closed_at_once >= 190,
        "{closed_at_once} of 200 closed at once"
    );
    drop(flood);
    drop(hold);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rg3 = fixture("RG3_UNCR.dcm");
    let sent = h.dcmsend(&[&rg3], &[]).await;
    assert!(sent.status.success(), "the SCP serves after the flood");
    let (deid, _) = h.published().await;
    assert_eq!(deid.len(), 1);
    h.stop().await;
}
