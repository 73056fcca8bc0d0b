//! DICOM TLS to the PACS: the exporter's C-STORE SCU against dcmtk's `storescp +tls` (OpenSSL)
//! on loopback, with a throwaway CA. A trusted PACS with our client certificate stores the
//! object; an untrusted PACS certificate, a missing client certificate and plain TCP fail with
//! a reason, and nothing is stored.

#[path = "../services/ingest/tests/common/pki.rs"]
mod pki;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use fracture_export::scu::{self, Pacs, Tls};

/// A small Secondary Capture image, as the exporter sends.
fn secondary_capture(instance: &str) -> dicom_object::DefaultDicomObject {
    let obj = InMemDicomObject::from_element_iter([
        DataElement::new(
            tags::SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(uids::SECONDARY_CAPTURE_IMAGE_STORAGE),
        ),
        DataElement::new(
            tags::SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(instance),
        ),
        DataElement::new(
            tags::STUDY_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from("2.25.1"),
        ),
        DataElement::new(
            tags::SERIES_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from("2.25.2"),
        ),
        DataElement::new(tags::PATIENT_ID, VR::LO, PrimitiveValue::from("TLS-TEST")),
        DataElement::new(tags::MODALITY, VR::CS, PrimitiveValue::from("OT")),
        DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1u16)),
        DataElement::new(
            tags::PHOTOMETRIC_INTERPRETATION,
            VR::CS,
            PrimitiveValue::from("MONOCHROME2"),
        ),
        DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(8u16)),
        DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(8u16)),
        DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(8u16)),
        DataElement::new(tags::BITS_STORED, VR::US, PrimitiveValue::from(8u16)),
        DataElement::new(tags::HIGH_BIT, VR::US, PrimitiveValue::from(7u16)),
        DataElement::new(
            tags::PIXEL_REPRESENTATION,
            VR::US,
            PrimitiveValue::from(0u16),
        ),
        DataElement::new(
            tags::PIXEL_DATA,
            VR::OB,
            PrimitiveValue::from(vec![7u8; 64]),
        ),
    ]);
    obj.with_meta(
        FileMetaTableBuilder::new()
            .media_storage_sop_class_uid(uids::SECONDARY_CAPTURE_IMAGE_STORAGE)
            .media_storage_sop_instance_uid(instance)
            .transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN),
    )
    .expect("a valid file meta")
}

/// dcmtk's storescp with TLS on a free port, storing into `out`; killed on drop.
struct TlsPacs {
    child: Child,
    port: u16,
}

impl Drop for TlsPacs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_pacs(pki: &pki::TestPki, out: &Path) -> TlsPacs {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let child = Command::new("storescp")
        .arg("+tls")
        .arg(&pki.server_key)
        .arg(&pki.server_cert)
        .arg("+cf")
        .arg(&pki.ca)
        .args(["-aet", "PACS", "-od"])
        .arg(out)
        .arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("storescp (dcmtk) runs; scripts/deid-peers.sh installs dcmtk");
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "storescp did not listen on {port} within 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    TlsPacs { child, port }
}

async fn send(pacs: &Pacs, tls: Option<&Tls>, instance: &str) -> Result<u16, String> {
    let mut assoc = scu::connect(
        pacs,
        "FRACTURE",
        tls,
        Duration::from_secs(10),
        Duration::from_secs(10),
    )
    .await
    .map_err(|e| e.0)?;
    let status = assoc
        .store(&secondary_capture(instance))
        .await
        .map_err(|e| e.0)?;
    assoc.release().await;
    Ok(status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_export_speaks_dicom_tls_to_the_pacs_and_verifies_it() {
    let work = tempfile::tempdir().unwrap();
    let pki = pki::test_pki(work.path(), "DNS:localhost,IP:127.0.0.1");
    let out = work.path().join("received");
    std::fs::create_dir_all(&out).unwrap();
    let pacs_process = start_pacs(&pki, &out);
    let pacs = Pacs::parse(&format!("PACS@127.0.0.1:{}", pacs_process.port)).unwrap();
    let path = |p: &Path| p.display().to_string();

    // Trusted, with our client certificate: stored.
    let tls = Tls::new(
        &pacs,
        &path(&pki.ca),
        &path(&pki.client_cert),
        &path(&pki.client_key),
    )
    .expect("a TLS setup");
    let status = send(&pacs, Some(&tls), "2.25.1001").await;
    assert_eq!(status, Ok(0), "stored over TLS");
    let received: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
    assert_eq!(received.len(), 1, "storescp holds one object");

    // The PACS's certificate from a CA we were not told to trust: refused, with why.
    let untrusted =
        Tls::new(&pacs, "", &path(&pki.client_cert), &path(&pki.client_key)).expect("a TLS setup");
    let e = send(&pacs, Some(&untrusted), "2.25.1002")
        .await
        .expect_err("an untrusted PACS");
    eprintln!("untrusted PACS: {e}");
    assert!(
        e.contains("UnknownIssuer") && e.contains("tls_ca_file"),
        "{e}"
    );
    // No client certificate: the PACS turns us away.
    let anonymous = Tls::new(&pacs, &path(&pki.ca), "", "").expect("a TLS setup");
    let e = send(&pacs, Some(&anonymous), "2.25.1003")
        .await
        .expect_err("no client certificate");
    eprintln!("no client certificate: {e}");
    // Plain TCP to a TLS port.
    assert!(send(&pacs, None, "2.25.1004").await.is_err());
    let received: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
    assert_eq!(received.len(), 1, "nothing else was stored");

    // Settings that cannot work are refused with what to set.
    let half = Tls::new(&pacs, &path(&pki.ca), &path(&pki.client_cert), "").unwrap_err();
    assert!(half.0.contains("tls_key_file"), "{half}");
    let missing = Tls::new(&pacs, "/nonexistent/ca.pem", "", "").unwrap_err();
    assert!(missing.0.contains("tls_ca_file"), "{missing}");
}
