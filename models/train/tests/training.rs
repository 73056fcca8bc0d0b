//! A tiny member trained on a handful of small phantoms: the loss falls, and a run killed after
//! a checkpoint resumes where it stopped and ends exactly where an uninterrupted run ends.

use std::path::Path;

use candle_core::Device;
use fracture_models::drn::{Arch, Pooling};
use fracture_models::manifest::Input;
use fracture_phantoms::PhantomConfig;
use fracture_train::augment::Augment;
use fracture_train::data::{self, Split};
use fracture_train::trainer::{self, read_state};
use fracture_train::{Recipe, RunControl, TrainOptions};

fn phantoms(dir: &Path, count: usize) -> Vec<data::Label> {
    fracture_phantoms::generate(&PhantomConfig {
        count,
        seed: 11,
        out: dir.to_path_buf(),
        min_side: 128,
        max_side: 160,
        fracture_rate: 0.5,
    })
    .expect("phantoms");
    data::read_labels(&dir.join("labels.csv")).expect("labels")
}

fn recipe(input: Input) -> Recipe {
    Recipe {
        name: "tiny".into(),
        arch: Arch::DrnD22,
        input,
        map_head: true,
        attention: false,
        pooling: Pooling::Avg,
        channels: [4, 4, 8, 8, 8, 8, 8, 8],
        input_size: 64,
    }
}

fn quiet() -> RunControl {
    RunControl::default()
}

fn weights(path: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).expect("weights")
}

#[test]
fn the_loss_falls_on_a_few_phantoms() -> Result<(), Box<dyn std::error::Error>> {
    let tmp = tempfile::tempdir()?;
    let labels = phantoms(&tmp.path().join("img"), 12);
    let r = recipe(Input::Both);
    let (all, report) = data::load(&labels, &tmp.path().join("img"), &r.transform(), r.input)?;
    assert_eq!(report.loaded, 12, "{report}");
    // Train on everything (the split is tested on its own): memorising a dozen images must
    // drive the loss down.
    let split = Split {
        train: all.clone(),
        tuning: all.clone(),
        validation: all.subset(&[]),
    };
    let mut options = TrainOptions::paper(&r, 5);
    options.epochs = 12;
    options.patience = 12;
    options.batch = 6;
    options.balanced_epochs = 0;
    options.augment = Augment::none();
    options.adam.lr = 3e-3;
    let out = tmp.path().join("run");
    let outcome = trainer::train(&r, &options, &split, &out, false, &quiet())?;
    let losses: Vec<f64> = outcome.state.history.iter().map(|e| e.loss).collect();
    assert_eq!(losses.len(), 12);
    let first = losses[..2].iter().sum::<f64>() / 2.0;
    let last = losses[losses.len() - 2..].iter().sum::<f64>() / 2.0;
    assert!(last < 0.7 * first, "the loss did not fall: {losses:?}");
    assert!(outcome
        .state
        .history
        .iter()
        .all(|e| e.localisation.is_some()));
    // The finished run exports a manifest entry whose sha256 is the file's, and the ensemble
    // loader accepts the weights.
    let (path, spec) = outcome.member.expect("finished");
    assert_eq!(
        spec.sha256,
        fracture_models::ensemble::sha256_hex(&std::fs::read(&path)?)
    );
    let member = std::fs::read_to_string(out.join(trainer::MEMBER_FILE))?;
    assert!(member.contains(&spec.sha256) && member.contains("[[members]]"));
    let manifest = fracture_models::Manifest::from_toml(
        &format!(
            "name = \"t\"\nmodel_version = \"t\"\ntrained = false\ninput_size = 64\n\
             model_card = \"test\"\n{member}"
        ),
        out.clone(),
    )?;
    let ensemble = fracture_models::Ensemble::load(manifest, &Device::Cpu)?;
    let both = data::load(
        &labels[..2],
        &tmp.path().join("img"),
        &r.transform(),
        Input::Both,
    )?
    .0;
    let inputs: Vec<&[f32]> = both.samples.iter().map(|s| s.pixels.as_slice()).collect();
    let preds = ensemble.predict(&inputs)?;
    assert!(preds.iter().all(|p| p.score.is_finite() && p.map.is_some()));
    Ok(())
}

#[test]
fn a_killed_run_resumes_from_its_checkpoint() -> Result<(), Box<dyn std::error::Error>> {
    let tmp = tempfile::tempdir()?;
    let img = tmp.path().join("img");
    let labels = phantoms(&img, 16);
    let r = recipe(Input::Raw);
    let (all, _) = data::load(&labels, &img, &r.transform(), r.input)?;
    let split = Split::new(&all, 3);
    let mut options = TrainOptions::paper(&r, 9);
    options.epochs = 4;
    options.batch = 4;
    options.balanced_epochs = 2;

    let straight = tmp.path().join("straight");
    let a = trainer::train(&r, &options, &split, &straight, false, &quiet())?;
    assert_eq!(a.state.epoch, 4);
    assert!(a.state.finished.is_some() && a.paused.is_none());

    // Killed right after epoch 2's checkpoint.
    let killed = tmp.path().join("killed");
    let stop = RunControl {
        stop_after_epochs: Some(2),
        ..quiet()
    };
    let b = trainer::train(&r, &options, &split, &killed, false, &stop)?;
    assert!(b.paused.is_some() && b.member.is_none());
    let saved = read_state(&killed)?.expect("a checkpoint");
    assert_eq!(saved.epoch, 2);
    // Batches of 4, a last one of a single radiograph skipped (BatchNorm needs two).
    let n = split.train.samples.len();
    let per_epoch = (n.div_ceil(4) - usize::from(n % 4 == 1)) as u64;
    assert_eq!(saved.steps, 2 * per_epoch);
    assert!(killed.join(&saved.weights).exists() && killed.join(&saved.optimiser).exists());

    // Without --resume the folder is refused; with other options it is refused too.
    let again = trainer::train(&r, &options, &split, &killed, false, &quiet());
    assert!(again.expect_err("refused").to_string().contains("--resume"));
    let mut other = options.clone();
    other.adam.lr = 0.5;
    assert!(trainer::train(&r, &other, &split, &killed, true, &quiet()).is_err());

    let c = trainer::train(&r, &options, &split, &killed, true, &quiet())?;
    assert_eq!(c.state.epoch, 4);
    assert_eq!(c.state.steps, a.state.steps);
    assert!(c.state.finished.is_some());
    // The same epochs, losses and weights as the run that was never interrupted: the weights,
    // optimiser moments, BatchNorm statistics and generator state all came back.
    for (x, y) in a.state.history.iter().zip(&c.state.history) {
        assert_eq!(x.epoch, y.epoch);
        assert!(
            (x.loss - y.loss).abs() <= 1e-5 * x.loss.abs().max(1.0),
            "{x:?} {y:?}"
        );
    }
    let (wa, wc) = (
        weights(&straight.join(&a.state.weights)),
        weights(&killed.join(&c.state.weights)),
    );
    assert_eq!(wa.len(), wc.len());
    for (name, t) in &wa {
        if name.ends_with(".num_batches_tracked") {
            assert_eq!(t.to_scalar::<i64>()?, wc[name].to_scalar::<i64>()?);
            assert_eq!(t.to_scalar::<i64>()? as u64, a.state.steps);
            continue;
        }
        let d = (t - &wc[name])?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d <= 1e-5, "{name} differs by {d}");
    }
    Ok(())
}

#[test]
fn the_split_keeps_each_patient_in_one_set() -> Result<(), Box<dyn std::error::Error>> {
    let tmp = tempfile::tempdir()?;
    let img = tmp.path().join("img");
    let labels = phantoms(&img, 40);
    let (all, _) = data::load(&labels, &img, &recipe(Input::Raw).transform(), Input::Raw)?;
    let split = Split::new(&all, 7);
    let ids = |d: &data::Dataset| -> std::collections::HashSet<String> {
        d.samples.iter().map(|s| s.patient_id.clone()).collect()
    };
    let (t, u, v) = (
        ids(&split.train),
        ids(&split.tuning),
        ids(&split.validation),
    );
    assert!(!u.is_empty() && !v.is_empty());
    assert!(t.is_disjoint(&u) && t.is_disjoint(&v) && u.is_disjoint(&v));
    assert_eq!(
        split.train.samples.len() + split.tuning.samples.len() + split.validation.samples.len(),
        40
    );
    // Phantom patients have several radiographs each, so grouping matters here.
    assert!(all.samples.len() > ids(&all).len());
    Ok(())
}
