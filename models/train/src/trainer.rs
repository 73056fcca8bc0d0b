//! The training loop: balanced then shuffled epochs of augmented batches, the joint loss, Adam,
//! tuning-set AUC after every epoch, early stopping, and a checkpoint after every epoch that a
//! killed run resumes from.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use fracture_models::drn::{Arch, Drn, Pooling, REFERENCE_CHANNELS};
use fracture_models::manifest::Input;
use fracture_models::{MemberSpec, TransformConfig};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::adam::{Adam, AdamConfig};
use crate::augment::Augment;
use crate::data::{Dataset, Sample, Split};
use crate::kernels::FastTraining;
use crate::loss::{bce_with_logits_scalar, joint_loss, LossWeights};
use crate::network::Trainable;
use crate::rng::Rng;
use crate::TrainError;

/// What to train: a manifest member without its weights, plus the input size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// The member's name in the manifest; the weights file is `<name>.safetensors`.
    pub name: String,
    pub arch: Arch,
    pub input: Input,
    #[serde(default)]
    pub map_head: bool,
    #[serde(default)]
    pub attention: bool,
    #[serde(default)]
    pub pooling: Pooling,
    #[serde(default = "reference_channels")]
    pub channels: [usize; 8],
    /// Side of the model input; the manifest's `input_size` must equal it.
    pub input_size: usize,
}

fn reference_channels() -> [usize; 8] {
    REFERENCE_CHANNELS
}

impl Recipe {
    /// Reads a recipe from TOML (the fields above).
    pub fn from_toml(text: &str) -> Result<Recipe, TrainError> {
        let r: Recipe = toml::from_str(text).map_err(|e| TrainError::Config(e.to_string()))?;
        r.validate()?;
        Ok(r)
    }

    /// A recipe from an optional TOML file's text, with `flags` overriding its fields (the
    /// command line's `--member FILE --name ... --input-size ...`).
    pub fn with_flags(text: Option<&str>, flags: &RecipeFlags) -> Result<Recipe, TrainError> {
        let mut table = match text {
            Some(t) => t
                .parse::<toml::Table>()
                .map_err(|e| TrainError::Config(format!("the member recipe: {e}")))?,
            None => toml::Table::new(),
        };
        // The enums as the manifest spells them (serde's names).
        fn value<T: Serialize>(v: &T) -> Option<toml::Value> {
            toml::Value::try_from(v).ok()
        }
        let mut set = |k: &str, v: Option<toml::Value>| {
            if let Some(v) = v {
                table.insert(k.to_string(), v);
            }
        };
        set("name", flags.name.clone().map(toml::Value::String));
        set("arch", flags.arch.as_ref().and_then(value));
        set("input", flags.input.as_ref().and_then(value));
        set(
            "map_head",
            flags.map_head.then_some(toml::Value::Boolean(true)),
        );
        set(
            "attention",
            flags.attention.then_some(toml::Value::Boolean(true)),
        );
        set("pooling", flags.pooling.as_ref().and_then(value));
        set(
            "channels",
            flags.channels.map(|c| {
                toml::Value::Array(c.iter().map(|&v| toml::Value::Integer(v as i64)).collect())
            }),
        );
        set(
            "input_size",
            flags.input_size.map(|s| toml::Value::Integer(s as i64)),
        );
        let missing: Vec<&str> = ["name", "arch", "input", "input_size"]
            .into_iter()
            .filter(|k| !table.contains_key(*k))
            .collect();
        if !missing.is_empty() {
            return Err(TrainError::Config(format!(
                "the member recipe lacks {}; give --member FILE or the flags (--name, --arch, \
                 --input, --input-size)",
                missing.join(", ")
            )));
        }
        let text = toml::to_string(&table).map_err(|e| TrainError::Config(e.to_string()))?;
        Recipe::from_toml(&text)
    }

    pub fn validate(&self) -> Result<(), TrainError> {
        if self.name.trim().is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(TrainError::Config(format!(
                "member name {:?} must be non-empty letters, digits, '-', '_' or '.'; it names \
                 the weights file",
                self.name
            )));
        }
        if self.input_size == 0 || !self.input_size.is_multiple_of(8) {
            return Err(TrainError::Config(format!(
                "input_size {} must be a positive multiple of 8 (the networks' output stride)",
                self.input_size
            )));
        }
        self.member_spec(String::new()).drn_config().validate()?;
        Ok(())
    }

    /// The manifest entry for weights with this sha256 (in `<name>.safetensors`).
    pub fn member_spec(&self, sha256: String) -> MemberSpec {
        MemberSpec {
            name: self.name.clone(),
            arch: self.arch,
            input: self.input,
            map_head: self.map_head,
            attention: self.attention,
            pooling: self.pooling,
            channels: self.channels,
            weights: PathBuf::from(format!("{}.safetensors", self.name)),
            sha256,
        }
    }

    /// The serving transform at this input size (the manifest's defaults otherwise).
    pub fn transform(&self) -> TransformConfig {
        TransformConfig {
            size: self.input_size,
            ..Default::default()
        }
    }
}

/// Command-line overrides of a [`Recipe`]'s fields.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecipeFlags {
    pub name: Option<String>,
    pub arch: Option<Arch>,
    pub input: Option<Input>,
    /// `true` turns the head on; `false` leaves the file's choice.
    pub map_head: bool,
    pub attention: bool,
    pub pooling: Option<Pooling>,
    pub channels: Option<[usize; 8]>,
    pub input_size: Option<usize>,
}

/// How to train (the paper's settings by default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainOptions {
    /// At most this many epochs (the paper: 30).
    pub epochs: usize,
    /// Stop after this many epochs without a better tuning AUC (the paper: 10).
    pub patience: usize,
    /// Radiographs per batch (the paper: 48, 32 with attention).
    pub batch: usize,
    pub adam: AdamConfig,
    /// Seeds the initial weights, the sampling order and the augmentation.
    pub seed: u64,
    /// The first epochs draw every (region, fracture yes/no) pair equally often (the paper: 10).
    pub balanced_epochs: usize,
    pub loss: LossWeights,
    pub augment: Augment,
    /// Starts the map head's bias at `log(p / (1 - p))` instead of 0, so the untrained map says
    /// "fracture" with probability `p` everywhere, as fracture cells are rare, rather than 1/2:
    /// the prior initialisation of Lin et al. (2017, RetinaNet). Without it, the first updates
    /// are spent pushing the whole map down. `None` keeps `fracture_models::init`'s zero.
    #[serde(default)]
    pub map_prior: Option<f64>,
}

impl TrainOptions {
    /// The paper's settings for this member.
    pub fn paper(recipe: &Recipe, seed: u64) -> Self {
        Self {
            epochs: 30,
            patience: 10,
            batch: if recipe.attention { 32 } else { 48 },
            adam: AdamConfig::default(),
            seed,
            balanced_epochs: 10,
            loss: LossWeights::paper(recipe.attention),
            augment: Augment::default(),
            map_prior: None,
        }
    }

    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::Config(m));
        if self.epochs == 0 {
            return bad("epochs must be at least 1".into());
        }
        if self.batch < 2 {
            return bad(format!(
                "batch {} is too small: BatchNorm trains on batch statistics, so use 2 or more",
                self.batch
            ));
        }
        if self.map_prior.is_some_and(|p| !(p > 0.0 && p < 1.0)) {
            return bad(format!(
                "map_prior {:?} must be a probability strictly between 0 and 1",
                self.map_prior
            ));
        }
        if !(self.adam.lr.is_finite() && self.adam.lr > 0.0) {
            return bad(format!(
                "learning rate {} must be a positive number",
                self.adam.lr
            ));
        }
        Ok(())
    }
}

/// What a run does besides training, not part of the checkpoint.
#[derive(Debug, Clone, Default)]
pub struct RunControl {
    /// Draw a progress bar on the terminal.
    pub progress: bool,
    /// Stop (resumably) after the first epoch that ends past this much time in this process.
    pub time_limit: Option<Duration>,
    /// Stop (resumably) after this many epochs in this process: a run killed right after a
    /// checkpoint, for tests.
    pub stop_after_epochs: Option<usize>,
}

/// One epoch's numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based.
    pub epoch: usize,
    pub balanced: bool,
    /// Mean over the epoch's batches of the weighted total, and of its parts.
    pub loss: f64,
    pub classification: f64,
    pub localisation: Option<f64>,
    pub images: usize,
    /// Training (forward, backward, update) images per second.
    pub images_per_second: f64,
    /// Seconds for the whole epoch, tuning included.
    pub seconds: f64,
    pub tuning_auc: Option<f64>,
    pub tuning_loss: f64,
}

/// The checkpoint's `state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub recipe: Recipe,
    pub options: TrainOptions,
    /// sha256 over the training and tuning sets' SOP Instance UIDs: a resumed run must see the
    /// same data.
    pub data: String,
    pub train_images: usize,
    pub tuning_images: usize,
    /// Completed epochs.
    pub epoch: usize,
    /// Optimiser updates so far.
    pub steps: u64,
    /// The generator's state after the last completed epoch.
    pub rng: u64,
    pub best_auc: Option<f64>,
    pub best_epoch: Option<usize>,
    pub history: Vec<EpochRecord>,
    /// Weights and optimiser moments after the last completed epoch (file names in the folder).
    pub weights: String,
    pub optimiser: String,
    /// Set when training ended (early stopping or the epoch limit).
    pub finished: Option<String>,
}

pub const STATE_FILE: &str = "state.json";
pub const BEST_FILE: &str = "best.safetensors";
pub const MEMBER_FILE: &str = "member.toml";

/// Reads `DIR/state.json`, if there is one.
pub fn read_state(dir: &Path) -> Result<Option<State>, TrainError> {
    let path = dir.join(STATE_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| TrainError::Checkpoint {
                dir: dir.to_path_buf(),
                message: format!(
                    "{STATE_FILE} is unreadable ({e}); start a new run in another folder"
                ),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TrainError::io(&path)(e)),
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let part = path.with_extension("part");
    std::fs::write(&part, bytes).map_err(TrainError::io(&part))?;
    std::fs::rename(&part, path).map_err(TrainError::io(path))
}

/// How a call to [`train`] ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub state: State,
    /// With `state.finished`: the best epoch's weights as `<name>.safetensors`, and its manifest
    /// entry (also written to `member.toml`).
    pub member: Option<(PathBuf, MemberSpec)>,
    /// The validation set's AUC with the best weights (when finished and defined).
    pub validation_auc: Option<f64>,
    /// Why this process stopped before training finished (time limit, requested stop).
    pub paused: Option<String>,
}

fn fingerprint(split: &Split) -> String {
    let mut text = String::new();
    for (name, d) in [("train", &split.train), ("tuning", &split.tuning)] {
        let mut uids: Vec<&str> = d
            .samples
            .iter()
            .map(|s| s.sop_instance_uid.as_str())
            .collect();
        uids.sort_unstable();
        text.push_str(name);
        for u in uids {
            text.push(' ');
            text.push_str(u);
        }
        text.push('\n');
    }
    fracture_models::ensemble::sha256_hex(text.as_bytes())
}

/// The order of one epoch's training images: with `balanced`, as many draws (with replacement)
/// as there are images, each picking a (region, fracture) pair uniformly and then an image of
/// it; otherwise a shuffle.
pub fn epoch_order(train: &Dataset, balanced: bool, rng: &mut Rng) -> Vec<usize> {
    let n = train.samples.len();
    if !balanced {
        let mut order: Vec<usize> = (0..n).collect();
        rng.shuffle(&mut order);
        return order;
    }
    let mut groups: BTreeMap<(&str, bool), Vec<usize>> = BTreeMap::new();
    for (i, s) in train.samples.iter().enumerate() {
        groups
            .entry((s.region.as_str(), s.fracture))
            .or_default()
            .push(i);
    }
    let groups: Vec<Vec<usize>> = groups.into_values().collect();
    (0..n)
        .map(|_| {
            let g = &groups[rng.below(groups.len())];
            g[rng.below(g.len())]
        })
        .collect()
}

/// One batch as tensors.
struct Batch {
    x: Tensor,
    labels: Tensor,
    masks: Option<Tensor>,
    boxed: Vec<u32>,
}

fn make_batch(
    samples: &[&Sample],
    rngs: Vec<Rng>,
    data: &Dataset,
    augment: &Augment,
    with_masks: bool,
) -> Result<Batch, TrainError> {
    let size = data.size;
    let map = size.div_ceil(8);
    let parts: Vec<(Vec<f32>, Option<Vec<f32>>)> = samples
        .par_iter()
        .zip(rngs)
        .map(|(s, mut rng)| {
            let d = augment.draw(size, &mut rng);
            let px = d.apply(&s.pixels, data.input, size);
            let mask = (with_masks && s.fracture && !s.model_boxes.is_empty())
                .then(|| d.mask(&s.model_boxes, size));
            (px, mask)
        })
        .collect();
    let n = samples.len();
    let mut x = Vec::with_capacity(n * data.channels() * size * size);
    let mut masks = Vec::new();
    let mut boxed = Vec::new();
    for (i, (px, mask)) in parts.into_iter().enumerate() {
        x.extend_from_slice(&px);
        if let Some(m) = mask {
            masks.extend_from_slice(&m);
            boxed.push(i as u32);
        }
    }
    let dev = Device::Cpu;
    let labels: Vec<f32> = samples
        .iter()
        .map(|s| f32::from(u8::from(s.fracture)))
        .collect();
    Ok(Batch {
        x: Tensor::from_vec(x, (n, data.channels(), size, size), &dev)?,
        labels: Tensor::from_vec(labels, n, &dev)?,
        masks: if boxed.is_empty() {
            None
        } else {
            Some(Tensor::from_vec(masks, (boxed.len(), map, map), &dev)?)
        },
        boxed,
    })
}

/// Scores a data set with an inference network: probabilities in sample order.
pub fn score(net: &Drn, data: &Dataset, batch: usize) -> Result<Vec<f32>, TrainError> {
    let (size, c) = (data.size, data.channels());
    let mut out = Vec::with_capacity(data.samples.len());
    for chunk in data.samples.chunks(batch.max(1)) {
        let mut x = Vec::with_capacity(chunk.len() * c * size * size);
        for s in chunk {
            x.extend_from_slice(&s.pixels);
        }
        let x = Tensor::from_vec(x, (chunk.len(), c, size, size), &Device::Cpu)?;
        let (logits, _) = net.forward(&x)?;
        out.extend(candle_nn::ops::sigmoid(&logits)?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// AUC and mean cross-entropy of probabilities against the data set's labels.
fn tuning_metrics(scores: &[f32], data: &Dataset) -> (Option<f64>, f64) {
    let labels: Vec<bool> = data.samples.iter().map(|s| s.fracture).collect();
    let s64: Vec<f64> = scores.iter().map(|&s| f64::from(s)).collect();
    let auc = fracture_shared::stats::auc(&s64, &labels);
    let loss = s64
        .iter()
        .zip(&labels)
        .map(|(&p, &y)| {
            let p = p.clamp(1e-7, 1.0 - 1e-7);
            bce_with_logits_scalar((p / (1.0 - p)).ln(), f64::from(u8::from(y)))
        })
        .sum::<f64>()
        / labels.len().max(1) as f64;
    (auc, loss)
}

fn checkpoint_error(dir: &Path, message: String) -> TrainError {
    TrainError::Checkpoint {
        dir: dir.to_path_buf(),
        message,
    }
}

/// Trains `recipe` on `split.train`, choosing the epoch by `split.tuning` AUC, checkpointing to
/// `out` after every epoch.
///
/// With `resume`, a run already in `out` continues from its last checkpoint (its recipe and
/// options must equal these, and the data must be the same); without a checkpoint there it
/// starts afresh. Without `resume`, a folder that already holds a run is refused.
pub fn train(
    recipe: &Recipe,
    options: &TrainOptions,
    split: &Split,
    out: &Path,
    resume: bool,
    control: &RunControl,
) -> Result<Outcome, TrainError> {
    recipe.validate()?;
    options.validate()?;
    if split.train.input != recipe.input || split.train.size != recipe.input_size {
        return Err(TrainError::Config(format!(
            "the data were loaded as {:?} at {} px but the member reads {:?} at {} px",
            split.train.input, split.train.size, recipe.input, recipe.input_size
        )));
    }
    if split.train.samples.len() < 2 {
        return Err(TrainError::Data(format!(
            "the training set has {} radiographs; at least 2 are needed",
            split.train.samples.len()
        )));
    }
    std::fs::create_dir_all(out).map_err(TrainError::io(out))?;
    let data_id = fingerprint(split);
    let spec = recipe.member_spec(String::new());

    let existing = read_state(out)?;
    let (mut net, mut state) = match existing {
        Some(_) if !resume => {
            return Err(checkpoint_error(
                out,
                format!(
                    "already holds a training run ({STATE_FILE}); pass --resume to continue it \
                     or choose another --out"
                ),
            ))
        }
        Some(state) => {
            if &state.recipe != recipe {
                return Err(checkpoint_error(
                    out,
                    format!(
                        "was trained with another member recipe ({:?}); resume with the same \
                         one or choose another --out",
                        state.recipe
                    ),
                ));
            }
            if &state.options != options {
                return Err(checkpoint_error(
                    out,
                    "was trained with other options (epochs, patience, batch, lr, seed, loss \
                     weights or augmentation); resume with the same ones"
                        .into(),
                ));
            }
            if state.data != data_id {
                return Err(checkpoint_error(
                    out,
                    "was trained on other radiographs (the training or tuning set differs); \
                     resume with the same labels, images and seed"
                        .into(),
                ));
            }
            let mut net = Trainable::init(&spec, options.seed, &out.join("init.safetensors"))?;
            net.load(&out.join(&state.weights))?;
            (net, state)
        }
        None => {
            let net = Trainable::init(&spec, options.seed, &out.join("init.safetensors"))?;
            if let Some(p) = options.map_prior {
                net.set_bias("map_head.bias", (p / (1.0 - p)).ln())?;
            }
            let mut rng = Rng::new(options.seed);
            // The sampling stream is not the initialisation's.
            rng.next_u64();
            let state = State {
                recipe: recipe.clone(),
                options: options.clone(),
                data: data_id,
                train_images: split.train.samples.len(),
                tuning_images: split.tuning.samples.len(),
                epoch: 0,
                steps: 0,
                rng: rng.0,
                best_auc: None,
                best_epoch: None,
                history: Vec::new(),
                weights: "init.safetensors".into(),
                optimiser: String::new(),
                finished: None,
            };
            (net, state)
        }
    };
    let mut adam = Adam::new(net.parameters(), options.adam)?;
    if !state.optimiser.is_empty() {
        adam.load(&out.join(&state.optimiser), state.steps)?;
    }

    let started = Instant::now();
    let mut epochs_here = 0usize;
    let mut paused = None;
    let bar = if control.progress {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:25}] {pos}/{len} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    while state.finished.is_none() {
        if control.stop_after_epochs.is_some_and(|n| epochs_here >= n) {
            paused = Some(format!("stopped as asked after epoch {}", state.epoch));
            break;
        }
        if control.time_limit.is_some_and(|t| started.elapsed() >= t) {
            paused = Some(format!(
                "stopped at the time limit after epoch {}; run again with --resume to continue",
                state.epoch
            ));
            break;
        }
        let record = run_epoch(&mut net, &mut adam, &mut state, split, options, &bar)?;
        let improved = match (record.tuning_auc, state.best_auc) {
            (Some(a), Some(b)) => a > b,
            (Some(_), None) => true,
            (None, _) => state.best_epoch.is_none(),
        };
        let epoch = record.epoch;
        let line = format!(
            "epoch {epoch:>2}: loss {:.4} (cls {:.4}{}) {:.1} img/s, tuning AUC {}{}",
            record.loss,
            record.classification,
            record
                .localisation
                .map(|l| format!(", loc {l:.4}"))
                .unwrap_or_default(),
            record.images_per_second,
            record
                .tuning_auc
                .map_or("undefined".to_string(), |a| format!("{a:.4}")),
            if improved { " (best)" } else { "" }
        );
        // Printed above the bar, also when output is not a terminal (logs of long runs).
        if control.progress {
            bar.suspend(|| println!("{line}"));
        }
        state.history.push(record);
        state.epoch = epoch;
        state.steps = adam.steps;

        // Checkpoint: this epoch's files first, then the state that names them, then the old
        // files; a kill at any point leaves a state whose files are complete.
        let weights = format!("epoch-{epoch:03}.safetensors");
        let optimiser = format!("epoch-{epoch:03}.adam.safetensors");
        net.save(&out.join(&weights), adam.steps)?;
        adam.save(&out.join(&optimiser))?;
        if improved {
            state.best_auc = state.history.last().and_then(|r| r.tuning_auc);
            state.best_epoch = Some(epoch);
            net.save(&out.join(BEST_FILE), adam.steps)?;
        }
        if epoch >= options.epochs {
            state.finished = Some(format!("reached the epoch limit ({})", options.epochs));
        } else if state
            .best_epoch
            .is_some_and(|b| epoch - b >= options.patience)
        {
            state.finished = Some(format!(
                "early stopping: no better tuning AUC for {} epochs",
                options.patience
            ));
        }
        let old = [
            std::mem::replace(&mut state.weights, weights),
            std::mem::replace(&mut state.optimiser, optimiser),
        ];
        let json = serde_json::to_vec_pretty(&state)
            .map_err(|e| checkpoint_error(out, format!("cannot serialise the state: {e}")))?;
        write_atomically(&out.join(STATE_FILE), &json)?;
        for f in old
            .iter()
            .filter(|f| !f.is_empty() && f.as_str() != "init.safetensors")
        {
            let _ = std::fs::remove_file(out.join(f));
        }
        epochs_here += 1;
    }
    bar.finish_and_clear();

    let (member, validation_auc) = if state.finished.is_some() {
        let (path, spec, auc) = export(out, &state, &split.validation)?;
        (Some((path, spec)), auc)
    } else {
        (None, None)
    };
    Ok(Outcome {
        state,
        member,
        validation_auc,
        paused,
    })
}

fn run_epoch(
    net: &mut Trainable,
    adam: &mut Adam,
    state: &mut State,
    split: &Split,
    options: &TrainOptions,
    bar: &ProgressBar,
) -> Result<EpochRecord, TrainError> {
    let epoch = state.epoch + 1;
    let epoch_started = Instant::now();
    let mut rng = Rng(state.rng);
    let balanced = epoch <= options.balanced_epochs;
    let order = epoch_order(&split.train, balanced, &mut rng);
    let with_masks = net.config().map_head;
    bar.set_length(order.len() as u64);
    bar.set_position(0);
    bar.set_prefix(format!("epoch {epoch}/{}", options.epochs));
    let (mut total, mut cls, mut loc, mut loc_batches, mut batches) =
        (0.0, 0.0, 0.0, 0usize, 0usize);
    let mut images = 0usize;
    let mut train_seconds = 0.0;
    for chunk in order.chunks(options.batch) {
        if chunk.len() < 2 {
            // BatchNorm on one image normalises it against itself; skip the remainder.
            continue;
        }
        let t0 = Instant::now();
        let samples: Vec<&Sample> = chunk.iter().map(|&i| &split.train.samples[i]).collect();
        let rngs: Vec<Rng> = chunk.iter().map(|_| rng.fork()).collect();
        let b = make_batch(&samples, rngs, &split.train, &options.augment, with_masks)?;
        let (logits, map) = net.net().forward_train(&b.x, &FastTraining)?;
        let loss = joint_loss(
            &logits,
            &b.labels,
            map.as_ref(),
            b.masks.as_ref(),
            &b.boxed,
            options.loss,
        )?;
        let value = f64::from(loss.total.to_scalar::<f32>()?);
        if !value.is_finite() {
            return Err(TrainError::Data(format!(
                "the loss became {value} in epoch {epoch}; lower --lr"
            )));
        }
        let grads = loss.total.backward()?;
        adam.step(&grads)?;
        drop(grads);
        train_seconds += t0.elapsed().as_secs_f64();
        total += value;
        cls += f64::from(loss.classification);
        if let Some(l) = loss.localisation {
            loc += f64::from(l);
            loc_batches += 1;
        }
        batches += 1;
        images += chunk.len();
        bar.inc(chunk.len() as u64);
        let rate = images as f64 / train_seconds.max(1e-9);
        bar.set_message(format!(
            "loss {:.4} {rate:.1} img/s{}",
            total / batches as f64,
            state
                .best_auc
                .map(|a| format!(" | best tuning AUC {a:.4}"))
                .unwrap_or_default()
        ));
    }
    state.rng = rng.0;
    bar.set_message("scoring the tuning set".to_string());
    let inference = net.inference()?;
    let scores = score(&inference, &split.tuning, 16)?;
    let (tuning_auc, tuning_loss) = tuning_metrics(&scores, &split.tuning);
    let batches_f = batches.max(1) as f64;
    Ok(EpochRecord {
        epoch,
        balanced,
        loss: total / batches_f,
        classification: cls / batches_f,
        localisation: (loc_batches > 0).then(|| loc / loc_batches as f64),
        images,
        images_per_second: images as f64 / train_seconds.max(1e-9),
        seconds: epoch_started.elapsed().as_secs_f64(),
        tuning_auc,
        tuning_loss,
    })
}

/// Copies the best epoch's weights to `<name>.safetensors`, writes `member.toml` (the manifest
/// entry with its sha256) and scores the validation set with them.
fn export(
    out: &Path,
    state: &State,
    validation: &Dataset,
) -> Result<(PathBuf, MemberSpec, Option<f64>), TrainError> {
    let best = out.join(BEST_FILE);
    let target = out.join(format!("{}.safetensors", state.recipe.name));
    let bytes = std::fs::read(&best).map_err(TrainError::io(&best))?;
    write_atomically(&target, &bytes)?;
    let spec = state
        .recipe
        .member_spec(fracture_models::ensemble::sha256_hex(&bytes));

    let mut net = Trainable::init(&spec, state.options.seed, &out.join("init.safetensors"))?;
    net.load(&target)?;
    let validation_auc = if validation.samples.is_empty() {
        None
    } else {
        let scores = score(&net.inference()?, validation, 16)?;
        tuning_metrics(&scores, validation).0
    };

    #[derive(Serialize)]
    struct Members<'a> {
        members: [&'a MemberSpec; 1],
    }
    let entry = toml::to_string(&Members { members: [&spec] })
        .map_err(|e| checkpoint_error(out, format!("cannot write {MEMBER_FILE}: {e}")))?;
    let fmt = |v: Option<f64>| v.map_or("undefined".to_string(), |a| format!("{a:.4}"));
    let header = format!(
        "# Trained by `fracture train` on {} radiographs ({} tuning) at {} px: {}; best tuning \
         AUC {} at epoch {} of {}; validation AUC {}.\n",
        state.train_images,
        state.tuning_images,
        state.recipe.input_size,
        state.finished.as_deref().unwrap_or("unfinished"),
        fmt(state.best_auc),
        state.best_epoch.unwrap_or(0),
        state.epoch,
        fmt(validation_auc),
    );
    write_atomically(
        &out.join(MEMBER_FILE),
        format!("{header}{entry}").as_bytes(),
    )?;
    Ok((target, spec, validation_auc))
}
