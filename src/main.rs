//! `fracture`: fracture detection on musculoskeletal radiographs. Argument parsing only; the
//! work lives in the stage crates, wired by `scan` (one process) and `serve` (one stage).

mod config;
mod deid;
mod evaluate;
mod labels;
mod otel;
mod report;
mod results;
mod scan;
mod serve;
mod stages;
mod train;
mod wiring;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "fracture",
    version,
    about = "Fracture detection on musculoskeletal radiographs (Jones et al. 2020), streaming on Kafka"
)]
struct Cli {
    /// Configuration file (default: ./fracture.toml if present).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Override one setting, e.g. `--set ensemble.batch.max=8` (repeatable).
    #[arg(long = "set", global = true, value_name = "KEY=VALUE", value_parser = parse_kv)]
    set: Vec<(String, String)>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Scan files and folders with all five stages in one process (no broker) and write a report.
    Scan(scan::ScanArgs),
    /// Run one stage as its own process on Kafka.
    Serve {
        stage: stages::Stage,
        /// Files or folders for ingest to read (default: ingest.input_dir).
        paths: Vec<PathBuf>,
        /// This replica's stable name (transactional id suffix); default: $HOSTNAME or "0".
        #[arg(long, env = "FRACTURE_INSTANCE")]
        instance: Option<String>,
    },
    /// De-identify DICOM files into a folder (research exports), with the ingest profile and key.
    /// Files are processed on every core; only their attributes are parsed, and the pixel data is
    /// copied as bytes (parsed only where a burned-in text rule edits it). The output is synced to
    /// disk once, at the end, before the command reports success.
    Deid {
        /// DICOM files or folders (a folder's files keep their path relative to it).
        #[arg(required_unless_present = "profile")]
        paths: Vec<PathBuf>,
        /// Output folder; refused inputs are listed in DIR/dead-letter.jsonl by pseudonymous
        /// reference, and their paths in DIR.refused-sources.jsonl beside it.
        #[arg(long, value_name = "DIR", required_unless_present = "profile")]
        out: Option<PathBuf>,
        /// Replace files already in the output folder (by default such an input is refused).
        #[arg(long)]
        overwrite: bool,
        /// The de-identification key (at least 32 bytes): the same key maps UIDs the same way.
        #[arg(long, value_name = "FILE", required_unless_present = "profile")]
        key_file: Option<PathBuf>,
        /// Print the profile as applied (every PS3.15 Table E.1-1 row, its Basic Profile action
        /// and what fracture does with it) as a Markdown table, and exit.
        #[arg(long, conflicts_with_all = ["paths", "out", "key_file", "overwrite"])]
        profile: bool,
    },
    /// Create the pipeline's Kafka topics (idempotent).
    Topics,
    /// The paper's evaluation (AUC, sensitivity, specificity, PPV, NPV with 95% CIs, per region).
    Evaluate {
        /// Findings as `scan` writes them (findings.jsonl).
        #[arg(long, value_name = "FILE")]
        predictions: PathBuf,
        /// Reference reads: sop_instance_uid,region,fracture,x0,y0,x1,y1 (+ optional subgroup columns).
        #[arg(long, value_name = "FILE")]
        labels: PathBuf,
        /// Bootstrap resamples for AUC, PPV and NPV intervals.
        #[arg(long, default_value_t = 1000)]
        bootstrap: usize,
        /// Seed of the bootstrap.
        #[arg(long, default_value_t = 2020)]
        seed: u64,
        /// Output format.
        #[arg(long, value_enum, default_value_t = evaluate::Format::Json)]
        format: evaluate::Format,
    },
    /// Train one ensemble member on labelled DICOM radiographs (the paper's recipe: map and
    /// image loss, Adam, augmentation, balanced sampling, early stopping on tuning AUC); it
    /// checkpoints after every epoch, and --resume continues a killed run.
    Train(train::TrainArgs),
    /// Region score and map thresholds from held-out scored radiographs, in the manifest's
    /// [thresholds] format.
    Calibrate(train::CalibrateArgs),
    /// Inspect the DRN family.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Feed reference reads (ground truth) to the audit sink.
    #[command(subcommand)]
    Labels(LabelsCommand),
    /// Write synthetic DICOM radiographs (long bones and joints, about a third fractured) and
    /// DIR/labels.csv; the same seed gives the same bytes. Not patients: for training and tests.
    Phantoms {
        /// How many radiographs.
        #[arg(long, default_value_t = 100)]
        count: usize,
        /// Seed: the same seed and sizes give byte-identical files.
        #[arg(long, default_value_t = 2020)]
        seed: u64,
        /// Output folder (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Smallest side in pixels (width and height are drawn independently).
        #[arg(long, default_value_t = 1500)]
        min_side: u32,
        /// Largest side in pixels.
        #[arg(long, default_value_t = 3000)]
        max_side: u32,
    },
}

#[derive(Subcommand)]
enum LabelsCommand {
    /// Pseudonymise a labels CSV (keyed by original SOP Instance UIDs) with the ingest key and publish it on fracture.labels.
    Import {
        /// sop_instance_uid,region,fracture,x0,y0,x1,y1 (one row per box).
        file: PathBuf,
        /// Where to write the pseudonymised copy (default: FILE with .pseudonymised.csv).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Print parameters and multiply-adds of an architecture at an input size.
    Summary {
        /// drn_c_26, drn_c_42, drn_d_22 or drn_d_38.
        arch: String,
        /// Input side in pixels.
        #[arg(long, default_value_t = 1024)]
        input: usize,
        /// Input channels (1 = raw or LCN, 2 = both).
        #[arg(long, default_value_t = 1)]
        channels: usize,
    },
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The chain of causes, one line each; no backtrace for a person to wade through.
            let mut text = String::new();
            for cause in e.chain().map(|c| c.to_string()) {
                // Typed errors often repeat their source in their own message: say it once.
                if !text.contains(&cause) {
                    text.push_str(if text.is_empty() { "" } else { ": " });
                    text.push_str(&cause);
                }
            }
            eprintln!("error: {text}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = fracture_shared::config::Settings::load(cli.config.as_deref(), &cli.set)?;
    let config = config::Config::load(&settings)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Scan(args) => runtime.block_on(scan::run(&config, &args)),
        Command::Labels(LabelsCommand::Import { file, out }) => {
            runtime.block_on(labels::import(&config, &file, out.as_deref()))
        }
        Command::Serve {
            stage,
            paths,
            instance,
        } => {
            let instance = instance
                .or_else(|| std::env::var("HOSTNAME").ok())
                .unwrap_or_else(|| "0".into());
            let result = runtime.block_on(serve::run(&config, stage, &paths, &instance));
            // A Kafka call librdkafka never returns from (a commit abandoned at shutdown) holds
            // a blocking thread: do not wait for it forever on the way out.
            runtime.shutdown_timeout(std::time::Duration::from_secs(5));
            result
        }
        Command::Topics => runtime.block_on(serve::create_topics(&config)),
        Command::Deid { profile: true, .. } => {
            print!("{}", fracture_ingest::deid::profile_markdown());
            Ok(())
        }
        Command::Deid {
            paths,
            out: Some(out),
            key_file: Some(key_file),
            overwrite,
            ..
        } => deid::run(&config, &paths, &out, &key_file, overwrite),
        Command::Deid { .. } => {
            anyhow::bail!(
                "fracture deid needs PATH..., --out DIR and --key-file FILE (or --profile)"
            )
        }
        Command::Evaluate {
            predictions,
            labels,
            bootstrap,
            seed,
            format,
        } => evaluate::run(
            &predictions,
            &labels,
            &fracture_audit::evaluate::EvalOptions { bootstrap, seed },
            format,
        ),
        Command::Phantoms {
            count,
            seed,
            out,
            min_side,
            max_side,
        } => {
            let summary = fracture_phantoms::generate(&fracture_phantoms::PhantomConfig {
                count,
                seed,
                out,
                min_side,
                max_side,
                ..Default::default()
            })?;
            println!("{summary}");
            Ok(())
        }
        Command::Train(args) => train::train(args),
        Command::Calibrate(args) => train::calibrate(args),
        Command::Model(ModelCommand::Summary {
            arch,
            input,
            channels,
        }) => wiring::model_summary(&arch, input, channels),
    }
}
