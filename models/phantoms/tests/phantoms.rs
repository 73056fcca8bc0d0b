//! What users of the phantoms rely on: same seed, same bytes; files the pipeline reads; labels
//! that match the files and boxes around pixels a fracture actually darkened.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use dicom_dictionary_std::tags;
use fracture_phantoms::render::render;
use fracture_phantoms::{generate, plan, PhantomConfig, LABELS_HEADER, SERIES_DESCRIPTION};

fn small(count: usize, seed: u64, out: &Path) -> PhantomConfig {
    PhantomConfig {
        count,
        seed,
        out: out.to_path_buf(),
        min_side: 256,
        max_side: 384,
        ..PhantomConfig::default()
    }
}

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    generate(&small(6, 7, a.path())).unwrap();
    generate(&small(6, 7, b.path())).unwrap();
    generate(&small(6, 8, c.path())).unwrap();
    let (fa, fb, fc) = (files(a.path()), files(b.path()), files(c.path()));
    assert_eq!(fa.len(), 7, "6 files and labels.csv: {:?}", fa.keys());
    assert_eq!(fa, fb);
    for (name, bytes) in &fa {
        assert_ne!(
            Some(bytes),
            fc.get(name),
            "{name} is the same for seeds 7 and 8"
        );
    }
}

struct Row {
    region: String,
    fracture: bool,
    bbox: Option<[u32; 4]>,
}

fn read_labels(path: &Path) -> Vec<(String, Row)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(LABELS_HEADER));
    lines
        .map(|line| {
            let f: Vec<&str> = line.split(',').collect();
            assert_eq!(f.len(), 7, "{line}");
            let bbox = if f[3].is_empty() {
                assert!(f[4..].iter().all(|v| v.is_empty()), "{line}");
                None
            } else {
                Some([0, 1, 2, 3].map(|i| f[3 + i].parse::<u32>().unwrap()))
            };
            let fracture = match f[2] {
                "1" => true,
                "0" => false,
                other => panic!("fracture is {other:?} in {line}"),
            };
            assert_eq!(fracture, bbox.is_some(), "{line}");
            (
                f[0].to_string(),
                Row {
                    region: f[1].to_string(),
                    fracture,
                    bbox,
                },
            )
        })
        .collect()
}

fn text(obj: &dicom_object::DefaultDicomObject, tag: dicom_core::Tag) -> String {
    obj.element(tag)
        .unwrap_or_else(|_| panic!("no {tag}"))
        .to_str()
        .unwrap()
        .trim_end_matches(['\0', ' '])
        .to_string()
}

fn int(obj: &dicom_object::DefaultDicomObject, tag: dicom_core::Tag) -> u32 {
    obj.element(tag).unwrap().to_int::<u32>().unwrap()
}

#[test]
fn files_are_dx_radiographs_the_pipeline_reads_and_labels_match_them() {
    let dir = tempfile::tempdir().unwrap();
    let count = 60;
    let summary = generate(&small(count, 2020, dir.path())).unwrap();
    assert_eq!(summary.files, count);
    let share = summary.fractured as f64 / count as f64;
    assert!((0.2..=0.47).contains(&share), "{summary}");
    assert!(summary.regions.len() >= 8, "{summary}");
    assert!(
        (count / 3..=2 * count / 3).contains(&summary.patients),
        "{summary}"
    );

    let rows = read_labels(&summary.labels);
    assert_eq!(rows.len(), count - summary.fractured + summary.boxes);
    let mut by_uid: HashMap<&str, Vec<&Row>> = HashMap::new();
    for (uid, row) in &rows {
        by_uid.entry(uid.as_str()).or_default().push(row);
    }
    assert_eq!(by_uid.len(), count);

    let mut images_per_patient: HashMap<String, usize> = HashMap::new();
    let mut seen_uids = HashSet::new();
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect();
    names.sort();
    assert_eq!(names.len(), count);
    for path in &names {
        let obj = dicom_object::open_file(path).unwrap();
        assert_eq!(
            obj.meta()
                .media_storage_sop_class_uid()
                .trim_end_matches('\0'),
            "1.2.840.10008.5.1.4.1.1.1.1"
        );
        assert_eq!(
            obj.meta().transfer_syntax().trim_end_matches('\0'),
            "1.2.840.10008.1.2.1"
        );
        let uid = text(&obj, tags::SOP_INSTANCE_UID);
        assert_eq!(
            obj.meta()
                .media_storage_sop_instance_uid()
                .trim_end_matches('\0'),
            uid
        );
        for t in [
            tags::SOP_INSTANCE_UID,
            tags::STUDY_INSTANCE_UID,
            tags::SERIES_INSTANCE_UID,
        ] {
            let u = text(&obj, t);
            assert!(u.len() <= 64 && u.starts_with("2.25."), "{u}");
            if t != tags::STUDY_INSTANCE_UID {
                assert!(seen_uids.insert(u.clone()), "{u} repeats");
            }
        }
        assert_eq!(
            text(&obj, tags::SOP_CLASS_UID),
            "1.2.840.10008.5.1.4.1.1.1.1"
        );
        assert_eq!(text(&obj, tags::MODALITY), "DX");
        assert_eq!(text(&obj, tags::PHOTOMETRIC_INTERPRETATION), "MONOCHROME2");
        assert_eq!(text(&obj, tags::BURNED_IN_ANNOTATION), "NO");
        assert_eq!(text(&obj, tags::SERIES_DESCRIPTION), SERIES_DESCRIPTION);
        assert!(text(&obj, tags::IMAGE_COMMENTS).contains("not a patient"));
        assert!(text(&obj, tags::PATIENT_NAME).starts_with("PHANTOM^"));
        let patient = text(&obj, tags::PATIENT_ID);
        assert!(patient.starts_with("PH-2020-"), "{patient}");
        *images_per_patient.entry(patient).or_default() += 1;
        for (t, want) in [
            (tags::BITS_ALLOCATED, 16),
            (tags::BITS_STORED, 12),
            (tags::HIGH_BIT, 11),
            (tags::PIXEL_REPRESENTATION, 0),
            (tags::SAMPLES_PER_PIXEL, 1),
        ] {
            assert_eq!(int(&obj, t), want, "{t}");
        }

        let labels = by_uid
            .get(uid.as_str())
            .expect("every file has a labels row");
        let region =
            fracture_shared::region::classify(&[Some(&text(&obj, tags::BODY_PART_EXAMINED))]);
        assert_ne!(region, fracture_shared::region::UNKNOWN);
        assert!(labels.iter().all(|r| r.region == region));
        assert!(labels.iter().all(|r| r.fracture == labels[0].fracture));

        let raw = fracture_shared::pixels::decode_values(&obj).unwrap();
        assert_eq!(raw.width as u32, int(&obj, tags::COLUMNS));
        assert_eq!(raw.height as u32, int(&obj, tags::ROWS));
        assert!((256..=384).contains(&raw.width) && (256..=384).contains(&raw.height));
        assert!(!raw.monochrome1);
        assert!(raw.values.iter().all(|&v| (0.0..=4095.0).contains(&v)));
        // Not flat: air, soft tissue and bone all show.
        let (lo, hi) = raw
            .values
            .iter()
            .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        assert!(hi - lo > 1000.0, "{lo}..{hi}");
        for r in labels {
            if let Some([x0, y0, x1, y1]) = r.bbox {
                assert!(x0 < x1 && y0 < y1, "{x0},{y0},{x1},{y1}");
                assert!(x1 as usize <= raw.width && y1 as usize <= raw.height);
            }
        }
        fracture_shared::pixels::decode(&obj).unwrap();
    }
    assert_eq!(images_per_patient.len(), summary.patients);
    assert!(images_per_patient.values().any(|&n| n >= 2));
    assert!(images_per_patient.values().any(|&n| n == 1));
}

#[test]
fn a_fracture_darkens_its_box() {
    let dir = tempfile::tempdir().unwrap();
    let phantoms = plan(&small(120, 99, dir.path())).unwrap();
    let fractured: Vec<_> = phantoms.iter().filter(|p| p.fractured()).collect();
    assert!(fractured.len() >= 25, "{}", fractured.len());
    for p in fractured {
        let broken = render(&p.scene, true);
        let intact = render(&p.scene, false);
        assert!(intact.boxes.is_empty());
        let fractures: Vec<_> = p.scene.bones.iter().filter_map(|b| b.fracture).collect();
        assert_eq!(broken.boxes.len(), fractures.len(), "{}", p.file_name);
        for (b, f) in broken.boxes.iter().zip(&fractures) {
            let (mut darker, mut pixels, mut clearly) = (0i64, 0usize, 0usize);
            for y in b.y0 as usize..b.y1 as usize {
                for x in b.x0 as usize..b.x1 as usize {
                    let i = y * broken.width + x;
                    let d = i64::from(intact.pixels[i]) - i64::from(broken.pixels[i]);
                    darker += d;
                    pixels += 1;
                    clearly += usize::from(d >= 20);
                }
            }
            // The lucent line crosses the whole box: a good share of it is clearly darker.
            assert!(
                clearly * 20 >= pixels,
                "{}: only {clearly} of the {pixels} pixels of box {b:?} are clearly darker",
                p.file_name
            );
            // A displaced fragment may brighten part of the box; an undisplaced fracture only darkens.
            if f.displacement == 0.0 {
                assert!(
                    darker > 0,
                    "{}: box {b:?} darkened by {darker} in all",
                    p.file_name
                );
            }
        }
    }
}

#[test]
fn a_folder_that_cannot_be_made_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-folder");
    std::fs::write(&file, "x").unwrap();
    let e = generate(&small(1, 1, &file.join("sub")))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot write") && e.contains("not-a-folder"),
        "{e}"
    );
}

/// dicom3tools' validator (as the ingest peers test uses) finds nothing to say about a phantom.
#[test]
fn files_pass_dciodvfy_without_errors_or_warnings() {
    let dir = tempfile::tempdir().unwrap();
    generate(&small(26, 11, dir.path())).unwrap();
    let mut complaints = Vec::new();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "dcm") {
            continue;
        }
        let out = std::process::Command::new("dciodvfy")
            .arg(&path)
            .output()
            .expect("cannot run dciodvfy: install dicom3tools (apt-get install dicom3tools)");
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        complaints.extend(
            text.lines()
                .filter(|l| l.starts_with("Error") || l.starts_with("Warning"))
                // A defined term (PS3.16 Annex L) newer than dicom3tools 2022's tables.
                .filter(|l| !l.contains("Unrecognized defined term <FOREARM>"))
                .map(|l| format!("{}: {l}", path.display())),
        );
    }
    assert!(complaints.is_empty(), "{}", complaints.join("\n"));
}
