//! `fracture train` and `fracture calibrate`: argument handling and progress output around
//! `fracture-train`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use fracture_models::drn::{Arch, Pooling};
use fracture_models::manifest::Input;
use fracture_train::calibrate::{self, CalibrateOptions};
use fracture_train::data::{self, Split};
use fracture_train::trainer::{self, Recipe, RecipeFlags, RunControl, TrainOptions};

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum ArchArg {
    #[value(name = "drn_c_26")]
    DrnC26,
    #[value(name = "drn_c_42")]
    DrnC42,
    #[value(name = "drn_d_22")]
    DrnD22,
    #[value(name = "drn_d_38")]
    DrnD38,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum InputArg {
    Raw,
    Lcn,
    Both,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum PoolingArg {
    Avg,
    Spp,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Reference reads keyed by SOP Instance UID: sop_instance_uid,region,fracture,x0,y0,x1,y1
    /// (one row per box; a negative's box columns empty).
    #[arg(long, value_name = "FILE")]
    labels: PathBuf,
    /// Folder holding the labelled DICOM files (searched recursively, matched by SOP Instance UID).
    #[arg(long, value_name = "DIR")]
    images: PathBuf,
    /// Checkpoint folder: state.json, epoch and best weights; at the end <name>.safetensors and
    /// member.toml (the manifest entry with its sha256).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Member recipe (TOML: name, arch, input, map_head, attention, pooling, channels,
    /// input_size); the flags below override its fields.
    #[arg(long, value_name = "FILE")]
    member: Option<PathBuf>,
    /// Member name (names the weights file).
    #[arg(long)]
    name: Option<String>,
    #[arg(long, value_enum)]
    arch: Option<ArchArg>,
    #[arg(long, value_enum)]
    input: Option<InputArg>,
    /// Give the member a probability-map head.
    #[arg(long)]
    map_head: bool,
    /// Give the member spatial attention.
    #[arg(long)]
    attention: bool,
    #[arg(long, value_enum)]
    pooling: Option<PoolingArg>,
    /// Eight stage widths, e.g. 8,8,16,16,32,32,32,32 (default: the reference's).
    #[arg(long, value_delimiter = ',')]
    channels: Option<Vec<usize>>,
    /// Side of the model input in pixels (a multiple of 8).
    #[arg(long)]
    input_size: Option<usize>,
    /// At most this many epochs.
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    /// Stop after this many epochs without a better tuning AUC.
    #[arg(long, default_value_t = 10)]
    patience: usize,
    /// Radiographs per batch (default: 48, or 32 with attention).
    #[arg(long)]
    batch: Option<usize>,
    /// Adam's learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Seeds the initial weights, the sampling order and the augmentation.
    #[arg(long, default_value_t = 2020)]
    seed: u64,
    /// Seeds the 80/10/10 split by patient; keep it the same for every member of an ensemble
    /// so no member trains on another's tuning or validation patients.
    #[arg(long, default_value_t = 2020)]
    split_seed: u64,
    /// Epochs of balanced (region, fracture) sampling at the start.
    #[arg(long, default_value_t = 10)]
    balanced_epochs: usize,
    /// Weight of the localisation (map) loss (default: 3, or 10 with attention).
    #[arg(long)]
    loc_weight: Option<f64>,
    /// Train without augmentation.
    #[arg(long)]
    no_augment: bool,
    /// Start the map head's bias at the logit of this fracture-cell prior (e.g. 0.01) instead
    /// of 0 (RetinaNet's prior initialisation; off by default, as in the paper).
    #[arg(long, value_name = "P")]
    map_prior: Option<f64>,
    /// Continue the run in --out from its last checkpoint (with its recipe and options); start
    /// one if there is none.
    #[arg(long)]
    resume: bool,
    /// Stop (resumably) after the first epoch that ends past this many minutes.
    #[arg(long, value_name = "MINUTES")]
    time_limit: Option<f64>,
}

fn recipe_from(args: &TrainArgs) -> anyhow::Result<Recipe> {
    let text = match &args.member {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the member recipe {}", path.display()))?,
        ),
        None => None,
    };
    let channels = match &args.channels {
        Some(c) => Some(
            <[usize; 8]>::try_from(c.as_slice())
                .map_err(|_| anyhow::anyhow!("--channels takes eight widths, got {}", c.len()))?,
        ),
        None => None,
    };
    let flags = RecipeFlags {
        name: args.name.clone(),
        arch: args.arch.map(|a| match a {
            ArchArg::DrnC26 => Arch::DrnC26,
            ArchArg::DrnC42 => Arch::DrnC42,
            ArchArg::DrnD22 => Arch::DrnD22,
            ArchArg::DrnD38 => Arch::DrnD38,
        }),
        input: args.input.map(|i| match i {
            InputArg::Raw => Input::Raw,
            InputArg::Lcn => Input::Lcn,
            InputArg::Both => Input::Both,
        }),
        map_head: args.map_head,
        attention: args.attention,
        pooling: args.pooling.map(|p| match p {
            PoolingArg::Avg => Pooling::Avg,
            PoolingArg::Spp => Pooling::Spp,
        }),
        channels,
        input_size: args.input_size,
    };
    Ok(Recipe::with_flags(text.as_deref(), &flags)?)
}

fn options_from(args: &TrainArgs, recipe: &Recipe) -> TrainOptions {
    let mut o = TrainOptions::paper(recipe, args.seed);
    o.epochs = args.epochs;
    o.patience = args.patience;
    if let Some(b) = args.batch {
        o.batch = b;
    }
    o.adam.lr = args.lr;
    o.balanced_epochs = args.balanced_epochs;
    if let Some(w) = args.loc_weight {
        o.loss.localisation = w;
    }
    if args.map_prior.is_some() {
        o.map_prior = args.map_prior;
    }
    if args.no_augment {
        o.augment = fracture_train::augment::Augment::none();
    }
    o
}

fn describe(name: &str, d: &data::Dataset) -> String {
    let patients: std::collections::HashSet<&str> =
        d.samples.iter().map(|s| s.patient_id.as_str()).collect();
    format!(
        "{name} {} ({} fractured, {} patients)",
        d.samples.len(),
        d.positives(),
        patients.len()
    )
}

/// Loads the labelled radiographs and splits them by patient.
fn load_split(
    labels: &Path,
    images: &Path,
    recipe: &Recipe,
    split_seed: u64,
) -> anyhow::Result<Split> {
    let labels = data::read_labels(labels)?;
    println!(
        "loading {} labelled radiographs from {} at {} px ({:?} input)...",
        labels.len(),
        images.display(),
        recipe.input_size,
        recipe.input
    );
    let (all, report) = data::load(&labels, images, &recipe.transform(), recipe.input)?;
    println!("{report}");
    let split = Split::new(&all, split_seed);
    println!(
        "split by patient (seed {split_seed}): {}; {}; {}",
        describe("train", &split.train),
        describe("tuning", &split.tuning),
        describe("validation", &split.validation)
    );
    Ok(split)
}

pub fn train(args: TrainArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let existing = if args.resume {
        trainer::read_state(&args.out)?
    } else {
        None
    };
    let (recipe, options) = match existing {
        Some(state) => {
            println!(
                "resuming {} after epoch {} from {} (its recipe and options apply)",
                state.recipe.name,
                state.epoch,
                args.out.display()
            );
            (state.recipe, state.options)
        }
        None => {
            let recipe = recipe_from(&args)?;
            let options = options_from(&args, &recipe);
            (recipe, options)
        }
    };
    let split = load_split(&args.labels, &args.images, &recipe, args.split_seed)?;
    let control = RunControl {
        progress: true,
        time_limit: args
            .time_limit
            .map(|m| Duration::from_secs_f64((m * 60.0).max(0.0))),
        stop_after_epochs: None,
    };
    let outcome = trainer::train(&recipe, &options, &split, &args.out, args.resume, &control)?;
    let s = &outcome.state;
    let rate = {
        let (img, secs) = s.history.iter().fold((0.0, 0.0), |(i, t), r| {
            (
                i + r.images as f64,
                t + r.images as f64 / r.images_per_second.max(1e-9),
            )
        });
        img / f64::max(secs, 1e-9)
    };
    let auc = |v: Option<f64>| v.map_or("undefined".to_string(), |a| format!("{a:.4}"));
    println!(
        "{} epochs done, {rate:.1} training images/s; best tuning AUC {} at epoch {}",
        s.epoch,
        auc(s.best_auc),
        s.best_epoch.unwrap_or(0)
    );
    match (&outcome.member, &outcome.paused) {
        (Some((path, spec)), _) => {
            println!(
                "finished ({}): weights {} (sha256 {}), manifest entry {}; validation AUC {}",
                s.finished.as_deref().unwrap_or(""),
                path.display(),
                spec.sha256,
                args.out.join(trainer::MEMBER_FILE).display(),
                auc(outcome.validation_auc)
            );
        }
        (None, Some(why)) => println!("paused: {why}"),
        (None, None) => {}
    }
    println!("took {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

#[derive(Args, Debug)]
pub struct CalibrateArgs {
    /// Reference reads (sop_instance_uid,region,fracture,x0,y0,x1,y1), keyed like the
    /// predictions: original UIDs with --model, or scan's pseudonymised DIR/labels.csv with
    /// scan's findings.jsonl.
    #[arg(long, value_name = "FILE")]
    labels: PathBuf,
    /// Scored radiographs as JSONL: scan's findings.jsonl (scores only; map thresholds are then
    /// left at the default), or what --write-predictions wrote (scores and maps).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["model", "images"])]
    predictions: Option<PathBuf>,
    /// Score the labelled radiographs with this ensemble manifest (scores and maps).
    #[arg(long, value_name = "FILE", requires = "images")]
    model: Option<PathBuf>,
    /// Folder of the labelled DICOM files (with --model).
    #[arg(long, value_name = "DIR", requires = "model")]
    images: Option<PathBuf>,
    /// With --model: also write the scores and maps as JSONL, for re-calibrating without
    /// re-scoring (--predictions).
    #[arg(long, value_name = "FILE", requires = "model")]
    write_predictions: Option<PathBuf>,
    /// Each region's threshold reaches this sensitivity on these radiographs.
    #[arg(long, default_value_t = 0.925)]
    target_sensitivity: f64,
    /// Regions with fewer fracture-positive radiographs use the global thresholds.
    #[arg(long, default_value_t = 10)]
    min_positives: usize,
    /// The map threshold finds the most labelled boxes with at most this many false boxes per
    /// radiograph.
    #[arg(long, default_value_t = 0.5)]
    max_false_boxes: f64,
    /// Where to write the [thresholds] table (TOML, the manifest's format).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

pub fn calibrate(args: CalibrateArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let labels = data::read_labels(&args.labels)?;
    let predictions = match (&args.predictions, &args.model, &args.images) {
        (Some(p), _, _) => calibrate::read_predictions(p)?,
        (None, Some(model), Some(images)) => {
            let manifest = fracture_models::manifest::load(model)?;
            let ensemble = fracture_models::Ensemble::load(manifest, &candle_core::Device::Cpu)?;
            let m = ensemble.manifest();
            println!(
                "scoring {} labelled radiographs from {} with {} ({} px)...",
                labels.len(),
                images.display(),
                m.model_version,
                m.input_size
            );
            let (data, report) = data::load(&labels, images, &m.transform, Input::Both)?;
            println!("{report}");
            let bar = indicatif::ProgressBar::new(data.samples.len() as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "[{bar:30}] {pos}/{len} {per_sec} {elapsed_precise}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            let preds = calibrate::predict(&ensemble, &data, 8, |n| bar.inc(n as u64))?;
            bar.finish_and_clear();
            if let Some(path) = &args.write_predictions {
                calibrate::write_predictions(path, &preds)?;
                println!("wrote the scores and maps to {}", path.display());
            }
            preds
        }
        _ => bail!("give --predictions FILE, or --model MANIFEST with --images DIR"),
    };
    let opts = CalibrateOptions {
        target_sensitivity: args.target_sensitivity,
        min_positives: args.min_positives,
        max_false_boxes_per_image: args.max_false_boxes,
        ..Default::default()
    };
    let c = calibrate::calibrate(&predictions, &labels, &opts)?;
    let text = calibrate::to_toml(&c);
    std::fs::write(&args.out, &text)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    for line in text.lines().take_while(|l| l.starts_with('#')) {
        println!("{}", line.trim_start_matches("# ").trim_start_matches('#'));
    }
    if c.unlabelled > 0 || c.unscored > 0 {
        println!(
            "left out: {} predictions without a label, {} labels without a prediction",
            c.unlabelled, c.unscored
        );
    }
    println!(
        "wrote {} in {:.1} s",
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
