//! Ingest streams: a 50 MB radiograph never needs more than a small multiple of its size in
//! memory. The heap is measured with a counting allocator (every allocation of this test
//! binary, which runs this one test), around real work on a real file: `fracture deid`'s export
//! (file to file, the pixel data copied by the kernel), ingest's `process` (de-identified into
//! the claim-check store with a SQLite linkage table), the C-STORE door receiving it from
//! dcmtk's dcmsend (fragments spooled as they arrive, then ingested), and the STOW-RS door
//! receiving it from curl (the request body spooled as it arrives and mapped, then ingested).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use fracture_edge::linkage::Linkage;
use fracture_ingest::scp::{self, ScpConfig};
use fracture_ingest::{Ingest, Input, Outcome};
use fracture_shared::bus::{Bus, InProcBus, Topics};
use fracture_shared::stage::Shutdown;
use fracture_shared::store::{BlobStore, StoreConfig};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = CURRENT.fetch_add(by, Ordering::SeqCst) + by;
    PEAK.fetch_max(now, Ordering::SeqCst);
}

// SAFETY: every call is forwarded to the system allocator unchanged; only sizes are counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // The old and the new block may both exist while the data moves: count the new one
            // first, then give the old one back.
            grew(new_size);
            CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The most heap held at once above what was held when `f` started.
async fn peak_during<T>(f: impl std::future::Future<Output = T>) -> (T, usize) {
    let base = CURRENT.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let out = f.await;
    (out, PEAK.load(Ordering::SeqCst).saturating_sub(base))
}

/// RG3's attributes around a 5000 x 5000 16-bit image: a 50 MB radiograph.
fn write_big_radiograph(path: &Path) -> u64 {
    let mut obj = common::open(&common::fixtures().join("RG3_UNCR.dcm"));
    let (rows, cols) = (5000u16, 5000u16);
    let pixels: Vec<u16> = (0..usize::from(rows) * usize::from(cols))
        .map(|i| (i % 1024) as u16)
        .collect();
    obj.put(DataElement::new(
        tags::ROWS,
        VR::US,
        PrimitiveValue::from(rows),
    ));
    obj.put(DataElement::new(
        tags::COLUMNS,
        VR::US,
        PrimitiveValue::from(cols),
    ));
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OW,
        PrimitiveValue::U16(pixels.into()),
    ));
    obj.write_to_file(path)
        .expect("cannot write the 50 MB radiograph");
    std::fs::metadata(path).unwrap().len()
}

#[tokio::test(flavor = "current_thread")]
async fn a_50_mb_radiograph_is_de_identified_in_a_small_multiple_of_its_size() {
    let work = tempfile::tempdir().unwrap();
    let input = work.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    let path = input.join("big.dcm");
    let size = write_big_radiograph(&path) as usize;
    assert!(size > 50_000_000, "{size} bytes");

    // `fracture deid`: nothing in memory grows with the image.
    let policy = common::policy();
    let out = work.path().join("export");
    let (got, export_peak) = peak_during(async {
        fracture_ingest::research::copy_deidentified(
            std::slice::from_ref(&input),
            &out,
            &policy,
            fracture_ingest::research::Existing::Refuse,
            |_| {},
        )
    })
    .await;
    let (report, refused) = got.expect("the export runs");
    assert_eq!((report.written, refused.len()), (1, 0), "{refused:?}");
    let copy = std::fs::metadata(out.join("big.dcm")).unwrap().len() as usize;
    assert!(copy > size - 4096 && copy < size + 4096, "{copy} vs {size}");

    // Ingest: the de-identified object is built once, in memory, for the claim-check store.
    let store = BlobStore::open(&StoreConfig {
        url: work.path().join("store").display().to_string(),
        ..Default::default()
    })
    .unwrap();
    let linkage = Linkage::open(&work.path().join("linkage.db"))
        .await
        .unwrap();
    let ingest = Ingest {
        policy: common::policy(),
        store,
        topics: Topics::default(),
        linkage,
        retry: fracture_shared::RetryPolicy::default(),
    };
    let ((outcome, record, bytes), ingest_peak) =
        peak_during(ingest.process(&Input::File(path.clone()))).await;
    assert_eq!(outcome, Outcome::Produced, "{record:?}");
    assert_eq!(bytes as usize, size);

    // The C-STORE door: dcmsend (another process, its memory not counted) pushes the file.
    common::peers_python(); // installs dcmtk
    let topics = Topics::default();
    let bus = InProcBus::new();
    bus.create_topics(&topics.all(), 1).await.unwrap();
    let producer = std::sync::Arc::new(tokio::sync::Mutex::new(bus.producer("scp").await.unwrap()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let cfg = ScpConfig {
        listen: String::new(),
        ae_title: "FRACTURE".into(),
        spool: work.path().join("spool").display().to_string(),
        max_associations: 2,
        ..Default::default()
    };
    let (stop, shutdown) = Shutdown::new();
    let ingest = std::sync::Arc::new(ingest);
    let server = tokio::spawn({
        let ingest = ingest.clone();
        let producer = producer.clone();
        async move { scp::serve_on(listener, &cfg, ingest, producer, shutdown).await }
    });
    let (sent, scp_peak) = peak_during(
        tokio::process::Command::new("dcmsend")
            .args(["-aet", "TESTSCU", "-aec", "FRACTURE", "127.0.0.1"])
            .arg(port.to_string())
            .arg(&path)
            .output(),
    )
    .await;
    let sent = sent.expect("dcmsend runs");
    assert!(
        sent.status.success(),
        "dcmsend: {}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let _ = stop.send(true);
    server.await.unwrap().expect("the SCP stops cleanly");

    // The STOW-RS door: curl POSTs the file as one part of a multipart/related request.
    let request = work.path().join("stow-request.bin");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&request).unwrap());
        f.write_all(b"--BOUNDARY\r\nContent-Type: application/dicom\r\n\r\n")
            .unwrap();
        std::io::copy(&mut std::fs::File::open(&path).unwrap(), &mut f).unwrap();
        f.write_all(b"\r\n--BOUNDARY--\r\n").unwrap();
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let cfg = fracture_ingest::dicomweb::DicomwebConfig {
        spool: work.path().join("stow-spool").display().to_string(),
        ..Default::default()
    };
    let (stop, shutdown) = Shutdown::new();
    let server = tokio::spawn({
        let producer = producer.clone();
        async move {
            fracture_ingest::dicomweb::serve_stow_on(listener, &cfg, ingest, producer, shutdown)
                .await
        }
    });
    let (posted, stow_peak) = peak_during(
        tokio::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
            .args([
                "-H",
                "Content-Type: multipart/related; type=\"application/dicom\"; boundary=BOUNDARY",
            ])
            .arg("--data-binary")
            .arg(format!("@{}", request.display()))
            .arg(format!("http://127.0.0.1:{port}/studies"))
            .output(),
    )
    .await;
    let posted = posted.expect("curl runs");
    assert_eq!(
        String::from_utf8_lossy(&posted.stdout),
        "200",
        "STOW-RS answered: {}",
        String::from_utf8_lossy(&posted.stderr)
    );
    let _ = stop.send(true);
    server
        .await
        .unwrap()
        .expect("the STOW-RS server stops cleanly");

    eprintln!(
        "file {size} bytes; heap peak: export {export_peak} bytes ({:.3}x), ingest {ingest_peak} bytes ({:.2}x), C-STORE {scp_peak} bytes ({:.2}x), STOW-RS {stow_peak} bytes ({:.2}x)",
        export_peak as f64 / size as f64,
        ingest_peak as f64 / size as f64,
        scp_peak as f64 / size as f64,
        stow_peak as f64 / size as f64
    );
    // STOW-RS spools the request body as it arrives and maps it: its parts are read from the
    // page cache, not held on the heap.
    assert!(
        stow_peak < size * 3 / 2,
        "the STOW-RS door held {stow_peak} bytes for a {size}-byte file (more than 1.5x)"
    );
    assert!(
        scp_peak < size * 3 / 2,
        "the C-STORE door held {scp_peak} bytes for a {size}-byte file (more than 1.5x)"
    );
    assert!(
        export_peak < size / 16,
        "the export held {export_peak} bytes for a {size}-byte file: the pixel data should pass through"
    );
    assert!(
        ingest_peak < size * 3 / 2,
        "ingest held {ingest_peak} bytes for a {size}-byte file (more than 1.5x)"
    );
}
