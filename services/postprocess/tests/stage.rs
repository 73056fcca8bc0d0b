//! The post-processing stage on the in-process bus, with a claim-check folder: scored phantoms
//! in, findings with their DICOM SR and Secondary Capture out, and one summary per study once
//! the study has been quiet.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dicom_core::header::Header;
use dicom_core::value::Value;
use dicom_dictionary_std::{tags, uids};
use dicom_object::InMemDicomObject;

use fracture_models::Manifest;
use fracture_postprocess::{sr, Postprocess, PostprocessConfig, StudyConfig};
use fracture_shared::bus::{Bus, InProcBus, OutRecord, Record, Topics};
use fracture_shared::messages::{
    decode, encode, schema, BlobRef, BoundingBox, Finding, Geometry, RadiographId, Scored,
    StudySummary,
};
use fracture_shared::metrics::{Health, StageMetrics};
use fracture_shared::pixels;
use fracture_shared::stage::{f32_to_bytes, RecordHandler, Shutdown, StageEnv};
use fracture_shared::store::{BlobStore, StoreConfig};
use fracture_shared::RetryPolicy;

const MANIFEST: &str = r#"
name = "stage-test"
model_version = "stage-test-1"
trained = false
null_model = true
input_size = 64
model_card = "a null model for the post-processing tests"
[thresholds]
default_score = 0.5
default_map = 0.5
"#;

const MAP: usize = 8;

struct Radiograph {
    dicom: BlobRef,
    id: RadiographId,
    geometry: Geometry,
}

struct World {
    _dir: tempfile::TempDir,
    store: BlobStore,
    manifest: Arc<Manifest>,
    radiographs: Vec<Radiograph>,
    /// A map with one known component (cells 2..4 x 3..5).
    map: BlobRef,
}

fn text(obj: &InMemDicomObject, tag: dicom_core::Tag) -> String {
    obj.element(tag)
        .unwrap()
        .to_str()
        .unwrap()
        .trim_end_matches('\0')
        .to_string()
}

async fn world(count: usize) -> World {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(&StoreConfig {
        url: dir.path().join("store").display().to_string(),
        ..Default::default()
    })
    .unwrap();
    let phantoms = dir.path().join("phantoms");
    fracture_phantoms::generate(&fracture_phantoms::PhantomConfig {
        count,
        seed: 5,
        out: phantoms.clone(),
        min_side: 200,
        max_side: 300,
        fracture_rate: 0.5,
    })
    .unwrap();
    let mut files: Vec<_> = std::fs::read_dir(&phantoms)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect();
    files.sort();
    let mut radiographs = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let bytes = std::fs::read(f).unwrap();
        let obj = pixels::read_object(&bytes).unwrap();
        let (w, h) = (
            obj.element(tags::COLUMNS).unwrap().to_int::<u32>().unwrap(),
            obj.element(tags::ROWS).unwrap().to_int::<u32>().unwrap(),
        );
        let id = RadiographId {
            input: format!("in-{i}"),
            study_instance_uid: text(&obj, tags::STUDY_INSTANCE_UID),
            series_instance_uid: text(&obj, tags::SERIES_INSTANCE_UID),
            sop_instance_uid: text(&obj, tags::SOP_INSTANCE_UID),
        };
        let dicom = store
            .put(Bytes::from(bytes), "application/dicom")
            .await
            .unwrap();
        radiographs.push(Radiograph {
            dicom,
            id,
            geometry: Geometry {
                original_width: w,
                original_height: h,
                crop: [0, 0, w, h],
                scale: 64.0 / f64::from(w.max(h)),
                size: 64,
            },
        });
    }
    let mut map = vec![0.05f32; MAP * MAP];
    for y in 3..5 {
        for x in 2..4 {
            map[y * MAP + x] = 0.8;
        }
    }
    let map = store
        .put(
            Bytes::from(f32_to_bytes(&map)),
            "application/x-fracture-f32",
        )
        .await
        .unwrap();
    World {
        _dir: dir,
        store,
        manifest: Arc::new(Manifest::from_toml(MANIFEST, std::path::PathBuf::new()).unwrap()),
        radiographs,
        map,
    }
}

fn scored(w: &World, r: &Radiograph, score: f32, with_dicom: bool) -> Scored {
    Scored {
        schema: schema::SCORED.into(),
        id: r.id.clone(),
        site: "S1".into(),
        region: "wrist".into(),
        geometry: r.geometry,
        score,
        member_scores: vec![],
        map: Some(w.map.clone()),
        map_size: MAP as u32,
        model_version: w.manifest.model_version.clone(),
        model_trained: false,
        dicom: with_dicom.then(|| r.dicom.clone()),
    }
}

fn record(s: &Scored) -> Record {
    Record {
        topic: "fracture.scored".into(),
        partition: 0,
        offset: 0,
        key: Some(s.id.study_instance_uid.clone()),
        payload: encode(s),
        headers: vec![],
    }
}

/// Every SCOORD's Graphic Data in an SR content tree.
fn graphic_data(obj: &InMemDicomObject, out: &mut Vec<Vec<f32>>) {
    for e in obj.iter() {
        if e.tag() == tags::GRAPHIC_DATA {
            out.push(e.to_multi_float32().unwrap());
        }
        if let Value::Sequence(s) = e.value() {
            for item in s.items() {
                graphic_data(item, out);
            }
        }
    }
}

#[tokio::test]
async fn findings_carry_an_sr_and_a_secondary_capture_that_reference_the_source() {
    let w = world(1).await;
    let r = &w.radiographs[0];
    let stage = Postprocess {
        store: w.store.clone(),
        topics: Topics::default(),
        manifest: w.manifest.clone(),
        cfg: PostprocessConfig::default(),
    };
    let out = stage.one(&record(&scored(&w, r, 0.9, true))).await.unwrap();
    let f: Finding = decode(&out[0].payload).unwrap();
    assert!(f.fracture);
    // The decision's boxes: the map's one component, cells 2..4 x 3..5 of 8 over the 64-pixel
    // input (model pixels 16..32 x 24..40), mapped back to original pixels (crop at the origin).
    let s = r.geometry.scale;
    let expected = BoundingBox {
        x0: 16.0 / s,
        y0: 24.0 / s,
        x1: 32.0 / s,
        y1: 40.0 / s,
        score: 0.8,
    };
    assert_eq!(f.boxes, vec![expected]);

    let sr_bytes = w.store.get(f.sr.as_ref().expect("an SR")).await.unwrap();
    let sc_bytes = w.store.get(f.sc.as_ref().expect("an SC")).await.unwrap();
    let src = pixels::read_object(&w.store.get(&r.dicom).await.unwrap()).unwrap();
    for (bytes, class, modality) in [
        (&sr_bytes, uids::COMPREHENSIVE_SR_STORAGE, "SR"),
        (&sc_bytes, uids::SECONDARY_CAPTURE_IMAGE_STORAGE, "OT"),
    ] {
        let o = pixels::read_object(bytes).unwrap();
        assert_eq!(text(&o, tags::SOP_CLASS_UID), class);
        assert_eq!(text(&o, tags::MODALITY), modality);
        assert_eq!(o.meta().transfer_syntax(), uids::EXPLICIT_VR_LITTLE_ENDIAN);
        // Same patient and study, a new series and instance.
        for t in [
            tags::PATIENT_ID,
            tags::PATIENT_NAME,
            tags::STUDY_INSTANCE_UID,
        ] {
            assert_eq!(text(&o, t), text(&src, t), "{t}");
        }
        assert_ne!(
            text(&o, tags::SERIES_INSTANCE_UID),
            text(&src, tags::SERIES_INSTANCE_UID)
        );
        assert!(text(&o, tags::SOP_INSTANCE_UID).starts_with("2.25."));
        assert_eq!(
            text(&o, tags::SERIES_DESCRIPTION),
            "AI RESULT - UNTRAINED MODEL - NOT FOR CLINICAL USE"
        );
    }
    let sr_obj = pixels::read_object(&sr_bytes).unwrap();
    let mut polylines = Vec::new();
    graphic_data(&sr_obj, &mut polylines);
    assert_eq!(polylines, vec![sr::polyline(&f.boxes[0]).to_vec()]);
    let evidence = sr_obj
        .element(tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE)
        .unwrap()
        .items()
        .unwrap()[0]
        .clone();
    let series = &evidence
        .element(tags::REFERENCED_SERIES_SEQUENCE)
        .unwrap()
        .items()
        .unwrap()[0];
    let sop = &series
        .element(tags::REFERENCED_SOP_SEQUENCE)
        .unwrap()
        .items()
        .unwrap()[0];
    assert_eq!(
        text(sop, tags::REFERENCED_SOP_INSTANCE_UID),
        text(&src, tags::SOP_INSTANCE_UID)
    );
    assert_eq!(
        text(sop, tags::REFERENCED_SOP_CLASS_UID),
        text(&src, tags::SOP_CLASS_UID)
    );
    // The Secondary Capture: the radiograph below the banner, 8-bit RGB, burned-in text declared.
    let sc_obj = pixels::read_object(&sc_bytes).unwrap();
    assert_eq!(text(&sc_obj, tags::BURNED_IN_ANNOTATION), "YES");
    assert_eq!(text(&sc_obj, tags::PHOTOMETRIC_INTERPRETATION), "RGB");
    let rows = sc_obj.element(tags::ROWS).unwrap().to_int::<u32>().unwrap();
    assert!(rows > r.geometry.original_height);

    // A retry writes the same objects (content-addressed, deterministic UIDs and bytes).
    let again = stage.one(&record(&scored(&w, r, 0.9, true))).await.unwrap();
    let g: Finding = decode(&again[0].payload).unwrap();
    assert_eq!((g.sr, g.sc), (f.sr.clone(), f.sc.clone()));
}

#[tokio::test]
async fn outputs_off_or_no_source_still_give_a_finding() {
    let w = world(1).await;
    let r = &w.radiographs[0];
    let mut cfg = PostprocessConfig::default();
    let stage = |cfg: PostprocessConfig| Postprocess {
        store: w.store.clone(),
        topics: Topics::default(),
        manifest: w.manifest.clone(),
        cfg,
    };
    // A message from before `dicom` was added decodes, and gets a finding without outputs.
    let mut old: serde_json::Value = serde_json::to_value(scored(&w, r, 0.2, true)).unwrap();
    old.as_object_mut().unwrap().remove("dicom");
    let rec = Record {
        payload: serde_json::to_vec(&old).unwrap(),
        ..record(&scored(&w, r, 0.2, true))
    };
    let out = stage(cfg.clone()).one(&rec).await.unwrap();
    let f: Finding = decode(&out[0].payload).unwrap();
    assert!(!f.fracture && f.boxes.is_empty());
    assert_eq!((f.sr, f.sc), (None, None));
    // And a finding without `sr`/`sc` serialises exactly as before they existed.
    let json: serde_json::Value = serde_json::from_slice(&out[0].payload).unwrap();
    assert!(json.get("sr").is_none() && json.get("sc").is_none());

    cfg.dicom_outputs = false;
    let out = stage(cfg)
        .one(&record(&scored(&w, r, 0.9, true)))
        .await
        .unwrap();
    let f: Finding = decode(&out[0].payload).unwrap();
    assert!(f.fracture);
    assert_eq!((f.sr, f.sc), (None, None));

    // A source that is not DICOM: the finding still goes out, without outputs.
    let junk = w
        .store
        .put(Bytes::from_static(b"not dicom"), "application/dicom")
        .await
        .unwrap();
    let mut s = scored(&w, r, 0.9, true);
    s.dicom = Some(junk);
    let out = stage(PostprocessConfig::default())
        .one(&record(&s))
        .await
        .unwrap();
    let f: Finding = decode(&out[0].payload).unwrap();
    assert!(f.fracture && f.sr.is_none());
    // Nor does a source missing from the store hold the finding back.
    s.dicom = Some(BlobRef {
        sha256: "0".repeat(64),
        size: 1,
        media_type: "application/dicom".into(),
    });
    let out = stage(PostprocessConfig::default())
        .one(&record(&s))
        .await
        .unwrap();
    let f: Finding = decode(&out[0].payload).unwrap();
    assert!(f.fracture && f.sr.is_none());
    // A map that does not match its size is the ensemble's bug: dead-lettered as data.
    let mut bad = scored(&w, r, 0.9, false);
    bad.map_size = 7;
    let e = stage(PostprocessConfig::default())
        .one(&record(&bad))
        .await
        .unwrap_err();
    assert!(e.message.contains("map_size says 7x7"), "{e}");
}

#[tokio::test]
async fn the_stage_summarises_each_study_once_it_is_quiet() {
    let w = world(6).await;
    let mut by_study: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, r) in w.radiographs.iter().enumerate() {
        by_study
            .entry(r.id.study_instance_uid.clone())
            .or_default()
            .push(i);
    }
    assert!(
        by_study.values().any(|v| v.len() >= 2),
        "the phantoms include a study of several radiographs"
    );
    // In each study only the last radiograph is positive; one study has none.
    let negative_study = by_study.keys().next().unwrap().clone();
    let mut expect: HashMap<String, (u32, bool)> = HashMap::new();
    let mut msgs = Vec::new();
    for (study, idx) in &by_study {
        let positive = study != &negative_study;
        for (k, &i) in idx.iter().enumerate() {
            let p = positive && k == idx.len() - 1;
            msgs.push(scored(
                &w,
                &w.radiographs[i],
                if p { 0.9 } else { 0.1 },
                true,
            ));
        }
        expect.insert(study.clone(), (idx.len() as u32, positive));
    }

    let bus = InProcBus::new();
    let topics = Topics::default();
    bus.create_topics(&topics.all(), 1).await.unwrap();
    bus.register_group("fracture.postprocess", &topics.of::<Scored>())
        .unwrap();
    bus.register_group("fracture.postprocess-studies", &topics.of::<Finding>())
        .unwrap();
    let mut watcher = bus
        .consumer(
            "watcher",
            &[topics.of::<Finding>(), topics.of::<StudySummary>()],
            "w",
        )
        .await
        .unwrap();
    let (stop, shutdown) = Shutdown::new();
    let env = StageEnv {
        bus: Arc::new(bus.clone()),
        store: w.store.clone(),
        topics: topics.clone(),
        metrics: StageMetrics::new(),
        health: Health::default(),
        shutdown,
        instance: "test".into(),
        retry: RetryPolicy::default(),
        lanes: Default::default(),
    };
    let cfg = PostprocessConfig {
        studies: StudyConfig {
            enabled: true,
            quiet_ms: 300,
            retain_s: 60,
        },
        ..Default::default()
    };
    let manifest = w.manifest.clone();
    let task = tokio::spawn(async move { fracture_postprocess::run(&env, &cfg, manifest).await });

    let mut producer = bus.producer("test").await.unwrap();
    let sent = Instant::now();
    producer
        .send(
            msgs.iter()
                .map(|s| OutRecord {
                    topic: topics.of::<Scored>(),
                    key: s.id.study_instance_uid.clone(),
                    payload: encode(s),
                    headers: vec![],
                })
                .collect(),
        )
        .await
        .unwrap();

    let mut findings = Vec::new();
    let mut summaries: Vec<(StudySummary, Duration)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while summaries.len() < expect.len() && Instant::now() < deadline {
        let batch = watcher
            .poll_batch(64, Duration::from_millis(5), Duration::from_millis(100))
            .await
            .unwrap();
        for r in batch {
            if r.topic == topics.of::<Finding>() {
                findings.push(decode::<Finding>(&r.payload).unwrap());
            } else {
                summaries.push((decode(&r.payload).unwrap(), sent.elapsed()));
            }
        }
        watcher.commit(vec![]).await.unwrap();
    }
    // A little longer: nothing more may come (one summary per study).
    let extra = watcher
        .poll_batch(64, Duration::from_millis(5), Duration::from_millis(800))
        .await
        .unwrap();
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();

    assert_eq!(findings.len(), msgs.len());
    assert!(findings.iter().all(|f| f.sr.is_some() && f.sc.is_some()));
    assert!(
        extra.iter().all(|r| r.topic == topics.of::<Finding>()),
        "a study was summarised twice"
    );
    assert_eq!(summaries.len(), expect.len(), "{summaries:?}");
    for (s, after) in &summaries {
        let (n, positive) = expect[&s.study_instance_uid];
        assert_eq!(s.radiographs, n, "{s:?}");
        assert_eq!(s.fracture, positive, "{s:?}");
        assert_eq!(s.positives, u32::from(positive));
        assert_eq!(s.revision, 1);
        assert_eq!(s.model_version, "stage-test-1");
        assert!(!s.model_trained);
        assert!(
            *after >= Duration::from_millis(300),
            "summarised before the quiet period: {after:?}"
        );
    }
}
