//! The shipped untrained ensemble, end to end: transform, load, predict, refuse tampered weights.

use std::path::{Path, PathBuf};

use candle_core::Device;
use fracture_models::{manifest, transform, Ensemble, Manifest, ModelError, Prediction};

fn untrained_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("untrained")
}

fn untrained() -> Manifest {
    manifest::load(&untrained_dir().join("ensemble.toml")).expect("the shipped manifest loads")
}

/// A 600 x 450 "radiograph": black padding, a soft-tissue rectangle, a bright bone with a dark
/// crack, and a marker letter in the border.
fn phantom(crack: bool) -> (Vec<f32>, usize, usize) {
    let (w, h) = (600, 450);
    let mut img = vec![0f32; w * h];
    for y in 60..420 {
        for x in 80..560 {
            let bone =
                ((x as f32 - 320.0) / 60.0).powi(2) + ((y as f32 - 240.0) / 170.0).powi(2) < 1.0;
            img[y * w + x] = if bone { 0.85 } else { 0.3 };
            if crack && bone && (y as i32 - 240).abs() < 2 {
                img[y * w + x] = 0.4;
            }
        }
    }
    for y in 10..30 {
        img[y * w + 10..y * w + 22].fill(1.0);
    }
    (img, w, h)
}

fn predict_phantoms(ensemble: &Ensemble) -> Vec<Prediction> {
    let cfg = &ensemble.manifest().transform;
    let inputs: Vec<Vec<f32>> = [false, true]
        .iter()
        .map(|&crack| {
            let (img, w, h) = phantom(crack);
            let t = transform(&img, w, h, cfg).expect("transform");
            assert_eq!(t.crop, [80, 60, 560, 420]);
            t.to_tensor_data()
        })
        .collect();
    let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
    ensemble.predict(&refs).expect("predict")
}

#[test]
fn the_untrained_ensemble_scores_and_maps() {
    let m = untrained();
    assert!(!m.trained);
    assert!(m.model_card.contains("RANDOM WEIGHTS"));
    let ensemble = Ensemble::load(m, &Device::Cpu).expect("load");
    let preds = predict_phantoms(&ensemble);
    assert_eq!(preds.len(), 2);
    for p in &preds {
        assert_eq!(p.member_scores.len(), 3);
        assert!(
            p.member_scores.iter().all(|s| *s > 0.0 && *s < 1.0),
            "{:?}",
            p.member_scores
        );
        let mean = p.member_scores.iter().sum::<f32>() / 3.0;
        assert!((p.score - mean).abs() < 1e-6);
        assert_eq!(p.map_size, 32);
        let map = p.map.as_ref().expect("two members have a map head");
        assert_eq!(map.len(), 32 * 32);
        assert!(map.iter().all(|v| *v > 0.0 && *v < 1.0));
    }
    assert_ne!(preds[0], preds[1], "different images, identical outputs");
}

#[test]
fn predictions_are_deterministic_and_independent_of_the_batch() {
    let a = predict_phantoms(&Ensemble::load(untrained(), &Device::Cpu).expect("load"));
    let b = predict_phantoms(&Ensemble::load(untrained(), &Device::Cpu).expect("load"));
    assert_eq!(a, b);

    let ensemble = Ensemble::load(untrained(), &Device::Cpu).expect("load");
    let (img, w, h) = phantom(true);
    let t = transform(&img, w, h, &ensemble.manifest().transform).expect("transform");
    let alone = ensemble.predict(&[&t.to_tensor_data()]).expect("predict");
    assert!((alone[0].score - a[1].score).abs() < 1e-5);
}

#[test]
fn the_ensemble_can_be_shared_between_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<Ensemble>();
}

#[test]
fn wrong_input_sizes_are_refused() {
    let ensemble = Ensemble::load(untrained(), &Device::Cpu).expect("load");
    let err = ensemble.predict(&[&[0.0; 100]]).expect_err("refused");
    assert!(matches!(err, ModelError::InvalidInput(_)));
    assert!(err.to_string().contains("[2, 256, 256]"), "{err}");
    assert!(ensemble.predict(&[]).expect("empty batch").is_empty());
}

#[test]
fn tampered_weights_are_refused_with_a_clear_message() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(untrained_dir()).expect("read untrained/") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).expect("copy");
    }
    let victim = tmp.path().join("m2-lcn-spp.safetensors");
    let mut bytes = std::fs::read(&victim).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&victim, bytes).expect("write");

    let m = manifest::load(&tmp.path().join("ensemble.toml")).expect("manifest");
    let expected = m.members[1].sha256.clone();
    let err = Ensemble::load(m, &Device::Cpu).expect_err("tampered weights must be refused");
    let msg = err.to_string();
    assert!(matches!(err, ModelError::ChecksumMismatch { .. }), "{msg}");
    assert!(msg.contains("m2-lcn-spp"), "{msg}");
    assert!(msg.contains(&expected), "{msg}");
    assert!(msg.contains("restore"), "{msg}");
}

#[test]
fn weights_for_another_architecture_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut m = untrained();
    // m2 is a DRN-C-26; give m1 (a DRN-D-22) its file and checksum.
    std::fs::copy(
        m.weights_path(&m.members[1]),
        tmp.path().join("m2.safetensors"),
    )
    .expect("copy");
    m.members[0].weights = PathBuf::from("m2.safetensors");
    m.members[0].sha256 = m.members[1].sha256.clone();
    m.members.truncate(1);
    m.dir = tmp.path().to_path_buf();
    let err = Ensemble::load(m, &Device::Cpu).expect_err("mismatched architecture");
    assert!(matches!(err, ModelError::Weights { .. }), "{err}");
    assert!(err.to_string().contains("m1-raw-map"), "{err}");
}

/// The benchmark-only null model: no networks, a score that follows the image, no map; and a
/// manifest that mixes it with members (or claims to be trained) is refused.
#[test]
fn null_model_scores_without_networks_and_is_never_trained() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("null");
    let m = manifest::load(&dir.join("ensemble.toml")).expect("the null manifest loads");
    assert!(m.null_model && !m.trained && m.members.is_empty());
    let e = Ensemble::load(m, &Device::Cpu).unwrap();
    let size = e.manifest().input_size;
    let dark = vec![0.1f32; 2 * size * size];
    let bright = vec![0.9f32; 2 * size * size];
    let p = e.predict(&[&dark, &bright]).unwrap();
    assert!((p[0].score - 0.1).abs() < 1e-4 && (p[1].score - 0.9).abs() < 1e-4);
    assert!(p
        .iter()
        .all(|p| p.map.is_none() && p.member_scores.is_empty()));

    let text = std::fs::read_to_string(dir.join("ensemble.toml")).unwrap();
    let trained = text.replace("trained = false", "trained = true");
    let err = Manifest::from_toml(&trained, dir.clone()).unwrap_err();
    assert!(err.to_string().contains("benchmarks only"), "{err}");
    let member = std::fs::read_to_string(untrained_dir().join("ensemble.toml")).unwrap();
    let members = &member[member.find("[[members]]").unwrap()..];
    let err = Manifest::from_toml(&format!("{text}\n{members}"), dir).unwrap_err();
    assert!(err.to_string().contains("no [[members]]"), "{err}");
}

fn untrained10_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("untrained10")
}

/// The ten-member untrained ensemble is exactly what `init` generates, as the three-member one
/// is (member i, 0-based, gets seed i + 1). After changing the architecture or the
/// initialisation, regenerate both with
/// `FRACTURE_BLESS_UNTRAINED=1 cargo test -p fracture-models shipped_untrained` and copy the
/// printed sha256 values into models/untrained10/ensemble.toml.
#[test]
fn shipped_untrained10_weights_are_reproducible() {
    use fracture_models::ensemble::sha256_hex;
    use fracture_models::init::init_member_weights;

    let m = manifest::load(&untrained10_dir().join("ensemble.toml")).expect("manifest loads");
    let bless = std::env::var_os("FRACTURE_BLESS_UNTRAINED").is_some();
    let tmp = tempfile::tempdir().expect("tempdir");
    for (i, spec) in m.members.iter().enumerate() {
        let target = if bless {
            m.weights_path(spec)
        } else {
            tmp.path().join(&spec.weights)
        };
        let sha = init_member_weights(spec, i as u64 + 1, &target).expect("weights written");
        if bless {
            println!("{}: sha256 = \"{sha}\"", spec.name);
            continue;
        }
        assert_eq!(
            sha, spec.sha256,
            "member {} regenerates differently",
            spec.name
        );
        let shipped = std::fs::read(m.weights_path(spec)).expect("shipped weights");
        assert_eq!(
            sha256_hex(&shipped),
            spec.sha256,
            "shipped {} differs",
            spec.name
        );
    }
}

/// Ten members covering what varies between the paper's: every architecture, every input,
/// map heads and attention on some, both poolings; never mistaken for a trained model.
#[test]
fn the_ten_member_untrained_ensemble_varies_as_the_papers_does() {
    use fracture_models::drn::{Arch, Pooling};
    use fracture_models::manifest::Input;
    use fracture_models::MemberSpec;

    let m = manifest::load(&untrained10_dir().join("ensemble.toml")).expect("manifest loads");
    assert!(!m.trained && !m.null_model);
    assert!(m.model_card.contains("UNTRAINED") && m.model_card.contains("RANDOM WEIGHTS"));
    assert_eq!(m.members.len(), 10);
    assert_eq!(m.input_size, 256);
    let has = |f: &dyn Fn(&MemberSpec) -> bool| m.members.iter().any(f);
    for arch in [Arch::DrnC26, Arch::DrnC42, Arch::DrnD22, Arch::DrnD38] {
        assert!(has(&|s| s.arch == arch), "no {arch:?} member");
    }
    for input in [Input::Raw, Input::Lcn, Input::Both] {
        assert!(has(&|s| s.input == input), "no {input:?} member");
    }
    for pooling in [Pooling::Avg, Pooling::Spp] {
        assert!(has(&|s| s.pooling == pooling), "no {pooling:?} member");
    }
    let maps = m.members.iter().filter(|s| s.map_head).count();
    let attention = m.members.iter().filter(|s| s.attention).count();
    assert!(
        (1..10).contains(&maps),
        "{maps} map heads: some members, not all"
    );
    assert!(
        (1..10).contains(&attention),
        "{attention} attention: some, not all"
    );
    let bytes: u64 = std::fs::read_dir(untrained10_dir())
        .expect("read untrained10/")
        .map(|e| e.expect("entry").metadata().expect("metadata").len())
        .sum();
    assert!(
        bytes < 6 << 20,
        "untrained10/ is {bytes} bytes; keep it under 6 MiB"
    );
}
