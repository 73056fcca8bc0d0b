//! The planted-identifier corpus (scripts/corpus/make_corpus.py) through `deidentify`: no planted
//! string survives anywhere in the written files, patient characteristics stay, UIDs are
//! remapped consistently across files and references, and dates move by one offset per patient.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use dicom_core::{Tag, VR};
use dicom_dictionary_std::tags;

use common::*;

struct Run {
    corpus: Corpus,
    /// file name -> (input flattened, output flattened, output bytes)
    files: BTreeMap<String, (Flat, Flat, Vec<u8>)>,
}

type Flat = BTreeMap<Path_, (VR, String)>;

fn run() -> &'static Run {
    static RUN: std::sync::OnceLock<Run> = std::sync::OnceLock::new();
    RUN.get_or_init(|| {
        let corpus = corpus("deid_corpus");
        let mut files = BTreeMap::new();
        // The outputs stay next to the inputs, for dcmdump when a check fails.
        let out_dir = corpus.dir.join("out");
        std::fs::create_dir_all(&out_dir).expect("cannot create the output folder");
        for (name, _) in &corpus.files {
            let path = corpus.dir.join(name);
            let input = open(&path);
            let (output, bytes) = deidentify_file(&path);
            std::fs::write(out_dir.join(name), &bytes).expect("cannot write an output");
            files.insert(name.clone(), (flatten(&input), flatten(&output), bytes));
        }
        Run { corpus, files }
    })
}

fn top(flat: &Flat, tag: Tag) -> Option<&str> {
    flat.get(&vec![(tag, 0)]).map(|(_, v)| v.as_str())
}

#[test]
fn no_planted_identifier_survives_anywhere_in_the_written_files() {
    let run = run();
    assert!(
        run.corpus.planted.len() > 100,
        "the corpus plants too little"
    );
    let mut leaks = Vec::new();
    for (name, (_, _, bytes)) in &run.files {
        let haystack = bytes.to_ascii_lowercase();
        for planted in &run.corpus.planted {
            let needle = planted.to_ascii_lowercase().into_bytes();
            if haystack
                .windows(needle.len())
                .any(|w| w == needle.as_slice())
            {
                // The corpus is made up, but the habit is the point: no values in test output.
                leaks.push(format!("{name}: planted value {}", fingerprint(planted)));
            }
        }
        for uid in &run.corpus.uids {
            let needle = uid.as_bytes();
            if bytes.windows(needle.len()).any(|w| w == needle) {
                leaks.push(format!("{name}: original UID {}", fingerprint(uid)));
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "identifiers left in the output:\n{}",
        leaks.join("\n")
    );
}

#[test]
fn patient_characteristics_are_kept_and_flags_written() {
    for (name, (input, output, _)) in &run().files {
        for tag in [
            tags::PATIENT_AGE,
            tags::PATIENT_SEX,
            tags::PATIENT_WEIGHT,
            tags::PATIENT_SIZE,
        ] {
            assert!(
                top(input, tag).is_some(),
                "{name}: the corpus lacks {}",
                describe(tag)
            );
            assert_eq!(
                top(input, tag),
                top(output, tag),
                "{name}: {} changed",
                describe(tag)
            );
        }
        assert_eq!(
            top(output, tags::PATIENT_IDENTITY_REMOVED),
            Some("YES"),
            "{name}"
        );
        assert_eq!(
            top(output, tags::LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED),
            Some("MODIFIED"),
            "{name}"
        );
        let codes: BTreeSet<&str> = output
            .iter()
            .filter(|(p, _)| {
                p.len() == 2
                    && p[0].0 == tags::DEIDENTIFICATION_METHOD_CODE_SEQUENCE
                    && p[1].0 == tags::CODE_VALUE
            })
            .map(|(_, (_, v))| v.as_str())
            .collect();
        assert_eq!(
            codes,
            BTreeSet::from(["113100", "113107", "113108"]),
            "{name}: method codes"
        );
        // Type 2 attributes of CR/DX stay present (empty or pseudonymous), not removed.
        for tag in [
            tags::PATIENT_NAME,
            tags::PATIENT_ID,
            tags::PATIENT_BIRTH_DATE,
            tags::REFERRING_PHYSICIAN_NAME,
            tags::ACCESSION_NUMBER,
            tags::STUDY_ID,
            tags::STUDY_DATE,
            tags::STUDY_TIME,
        ] {
            assert!(
                top(output, tag).is_some(),
                "{name}: Type 2 {} was removed",
                describe(tag)
            );
        }
        assert_eq!(top(output, tags::PATIENT_BIRTH_DATE), Some(""), "{name}");
        assert_eq!(
            top(output, tags::INSTITUTION_NAME),
            Some("SITE01"),
            "{name}"
        );
        if top(input, tags::ACQUISITION_CONTEXT_SEQUENCE).is_some() {
            assert_eq!(
                top(output, tags::ACQUISITION_CONTEXT_SEQUENCE),
                Some("0 items"),
                "{name}: the Type 2 Acquisition Context Sequence must stay, empty"
            );
        }
        // No private attribute and no overlay anywhere, at any depth.
        for path in output.keys() {
            for (tag, _) in path {
                assert!(
                    tag.group() % 2 == 0,
                    "{name}: private {} left",
                    describe(*tag)
                );
                assert!(
                    tag.group() & 0xFF00 != 0x6000,
                    "{name}: overlay {} left",
                    describe(*tag)
                );
            }
        }
    }
}

#[test]
fn uids_are_remapped_consistently_across_files_and_references() {
    let run = run();
    // Every UI value at the same place in input and output: the mapping must be a function,
    // one-to-one, and must change every non-standard UID.
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    let mut reverse: BTreeMap<String, String> = BTreeMap::new();
    let mut seen_nested = 0;
    for (name, (input, output, _)) in &run.files {
        for (path, (vr, original)) in input {
            if *vr != VR::UI || original.is_empty() {
                continue;
            }
            let Some((_, new)) = output.get(path) else {
                continue;
            };
            if path.len() > 1 {
                seen_nested += 1;
            }
            if original.starts_with("1.2.840.10008.") {
                assert_eq!(
                    original,
                    new,
                    "{name}: standard UID at {} changed",
                    describe(path[path.len() - 1].0)
                );
                continue;
            }
            assert_ne!(
                original,
                new,
                "{name}: UID at {} kept",
                describe(path[path.len() - 1].0)
            );
            if let Some(prev) = map.insert(original.clone(), new.clone()) {
                assert_eq!(&prev, new, "{name}: one UID mapped two ways");
            }
            if let Some(prev) = reverse.insert(new.clone(), original.clone()) {
                assert_eq!(&prev, original, "{name}: two UIDs mapped to one");
            }
        }
    }
    assert!(
        seen_nested >= 2,
        "no nested UID reference was kept to check"
    );
    // Each reference follows its target's new SOP Instance UID.
    for (file, sequence, target) in &run.corpus.references {
        let seq_tag = match sequence.as_str() {
            "SourceImageSequence" => tags::SOURCE_IMAGE_SEQUENCE,
            "ReferencedImageSequence" => tags::REFERENCED_IMAGE_SEQUENCE,
            other => panic!("corpus.json names an unexpected sequence {other}"),
        };
        let (_, output, _) = &run.files[file];
        let (_, target_out, _) = &run.files[target];
        let referenced = output
            .get(&vec![(seq_tag, 0), (tags::REFERENCED_SOP_INSTANCE_UID, 0)])
            .map(|(_, v)| v.as_str());
        assert!(
            referenced.is_some(),
            "{file}: the {sequence} reference was dropped"
        );
        assert_eq!(
            referenced,
            top(target_out, tags::SOP_INSTANCE_UID),
            "{file}: the {sequence} reference does not follow {target}"
        );
    }
    // The file meta follows the data set.
    for (name, (_, output, bytes)) in &run.files {
        let sop = top(output, tags::SOP_INSTANCE_UID).expect("SOP Instance UID");
        assert!(sop.starts_with("2.25."), "{name}");
        let obj = fracture_shared::pixels::read_object(bytes).expect("parses");
        assert_eq!(
            obj.meta()
                .media_storage_sop_instance_uid
                .trim_end_matches('\0'),
            sop,
            "{name}"
        );
        assert!(
            obj.meta().source_application_entity_title.is_none(),
            "{name}"
        );
    }
}

#[test]
fn dates_move_by_one_offset_per_patient() {
    let run = run();
    let mut offsets: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
    let mut checked = 0;
    for (name, patient) in &run.corpus.files {
        let (input, output, _) = &run.files[name];
        for (path, (vr, original)) in input {
            if !matches!(vr, VR::DA | VR::DT) || original.is_empty() {
                continue;
            }
            let tag = path[path.len() - 1].0;
            if tag == tags::PATIENT_BIRTH_DATE {
                continue;
            }
            match output.get(path) {
                Some((_, shifted)) => {
                    let d = days_between(original, shifted).unwrap_or_else(|| {
                        panic!("{name}: {} is not a date after shifting", describe(tag))
                    });
                    // The time part of a DT survives unchanged.
                    assert_eq!(
                        original.get(8..),
                        shifted.get(8..),
                        "{name}: {}",
                        describe(tag)
                    );
                    offsets.entry(patient.clone()).or_default().insert(d);
                    checked += 1;
                }
                None => {
                    // Only dates inside removed attributes may go; top-level dates stay.
                    assert!(
                        path.len() > 1,
                        "{name}: {} was removed, not shifted",
                        describe(tag)
                    );
                }
            }
        }
        // Times of day are kept.
        assert_eq!(
            top(input, tags::STUDY_TIME),
            top(output, tags::STUDY_TIME),
            "{name}"
        );
    }
    assert!(checked >= 30, "only {checked} dates checked");
    assert_eq!(offsets.len(), 2, "two patients expected");
    for (patient, set) in &offsets {
        assert_eq!(
            set.len(),
            1,
            "patient {patient}: dates moved by different offsets {set:?}"
        );
        let d = *set.iter().next().expect("one offset");
        assert!((-3650..=-1).contains(&d), "patient {patient}: offset {d}");
    }
    // Intervals survive: the follow-up stays 293 days after the first study.
    let study = |n: &str| {
        top(&run.files[n].1, tags::STUDY_DATE)
            .expect("StudyDate")
            .to_string()
    };
    assert_eq!(
        days_between(&study("a1_cr.dcm"), &study("a4_dx_followup.dcm")),
        Some(293)
    );
}
