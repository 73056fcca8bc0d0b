//! `fracture evaluate`: the paper's evaluation of a scan's findings against reference reads.

use std::path::Path;

use clap::ValueEnum;
use fracture_audit::evaluate::{self, EvalOptions};

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum Format {
    Json,
    Markdown,
    Html,
}

pub fn run(
    predictions: &Path,
    labels: &Path,
    options: &EvalOptions,
    format: Format,
) -> anyhow::Result<()> {
    let e = evaluate::evaluate(predictions, labels, options)?;
    let text = match format {
        Format::Json => serde_json::to_string_pretty(&e)?,
        Format::Markdown => evaluate::to_markdown(&e),
        Format::Html => evaluate::to_html(&e),
    };
    println!("{text}");
    Ok(())
}
