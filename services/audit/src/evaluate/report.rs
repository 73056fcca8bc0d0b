//! Renders an [`Evaluation`] for people: Markdown tables and a self-contained HTML page.

use super::{Evaluation, Metric, Metrics, INDICATORS};

/// One table, rendered alike in Markdown and HTML.
struct Table {
    title: String,
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

const METRIC_HEADER: [&str; 8] = [
    "region",
    "n",
    "positives",
    "AUC (95% CI)",
    "sensitivity (95% CI)",
    "specificity (95% CI)",
    "PPV (95% CI)",
    "NPV (95% CI)",
];

fn undefined(m: &Metric) -> String {
    format!("n/a ({})", m.reason.as_deref().unwrap_or("undefined"))
}

/// AUC as the paper writes it: 0.974 (0.971-0.977).
fn fmt_auc(m: &Metric) -> String {
    match (m.value, m.ci) {
        (None, _) => undefined(m),
        (Some(v), Some([lo, hi])) => format!("{v:.3} ({lo:.3}-{hi:.3})"),
        (Some(v), None) => format!("{v:.3} (no CI)"),
    }
}

/// Proportions as percentages with one decimal: 95.2% (94.2-96.0).
fn fmt_pct(m: &Metric) -> String {
    match (m.value, m.ci) {
        (None, _) => undefined(m),
        (Some(v), Some([lo, hi])) => {
            format!("{:.1}% ({:.1}-{:.1})", v * 100.0, lo * 100.0, hi * 100.0)
        }
        (Some(v), None) => format!("{:.1}% (no CI)", v * 100.0),
    }
}

fn metric_row(label: &str, m: &Metrics) -> Vec<String> {
    vec![
        label.to_string(),
        m.n.to_string(),
        m.positives.to_string(),
        fmt_auc(&m.auc),
        fmt_pct(&m.sensitivity),
        fmt_pct(&m.specificity),
        fmt_pct(&m.ppv),
        fmt_pct(&m.npv),
    ]
}

fn population_table<'a>(
    title: &str,
    all: &Metrics,
    regions: impl IntoIterator<Item = (&'a String, &'a Metrics)>,
) -> Table {
    let mut rows = vec![metric_row("all regions", all)];
    rows.extend(regions.into_iter().map(|(r, m)| metric_row(r, m)));
    Table {
        title: title.to_string(),
        header: METRIC_HEADER.to_vec(),
        rows,
    }
}

fn tables(e: &Evaluation) -> Vec<Table> {
    let mut out = vec![population_table("All radiographs", &e.overall, &e.regions)];
    if let Some(nd) = &e.subgroups.no_disagreement {
        out.push(population_table(
            "No reader disagreement",
            &nd.metrics,
            &nd.regions,
        ));
    }
    if !e.subgroups.without.is_empty() {
        // The paper's order (callus, displacement, ...), then any other keys.
        let rank = |key: &str| {
            INDICATORS
                .iter()
                .position(|i| key.strip_prefix("without_") == Some(*i))
                .unwrap_or(INDICATORS.len())
        };
        let mut ordered: Vec<_> = e.subgroups.without.iter().collect();
        ordered.sort_by_key(|(key, _)| rank(key));
        let rows = ordered
            .into_iter()
            .map(|(key, m)| {
                let what = key
                    .strip_prefix("without_")
                    .unwrap_or(key)
                    .replace('_', " ");
                vec![
                    format!("positives without {what}"),
                    m.n.to_string(),
                    m.positives.to_string(),
                    fmt_auc(&m.auc),
                    fmt_pct(&m.sensitivity),
                ]
            })
            .collect();
        out.push(Table {
            title: "Fracture types (all negatives, positives without the indicator)".into(),
            header: vec![
                "subgroup",
                "n",
                "positives",
                "AUC (95% CI)",
                "sensitivity (95% CI)",
            ],
            rows,
        });
    }
    out
}

fn notes(e: &Evaluation) -> Vec<String> {
    vec![
        format!(
            "Sensitivity and specificity: 95% Wilson intervals. AUC, PPV and NPV: 95% percentile bootstrap, {} resamples stratified by label, seed {}.",
            e.bootstrap.resamples, e.bootstrap.seed
        ),
        format!(
            "Excluded: {} predictions without a label, {} labels without a prediction.",
            e.excluded.predictions_without_label, e.excluded.labels_without_prediction
        ),
    ]
}

fn md_cell(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('|', "\\|")
        .replace(['\n', '\r'], " ")
}

/// Markdown: one table per population, then how the intervals were made and what was excluded.
pub fn to_markdown(e: &Evaluation) -> String {
    let mut s = String::from("# Fracture detection: evaluation\n");
    for t in tables(e) {
        s.push_str(&format!("\n## {}\n\n", t.title));
        s.push_str(&format!("| {} |\n", t.header.join(" | ")));
        s.push_str(&format!(
            "|{}\n",
            t.header
                .iter()
                .enumerate()
                .map(|(i, _)| if i == 0 { "---|" } else { "---:|" })
                .collect::<String>()
        ));
        for row in &t.rows {
            let cells: Vec<String> = row.iter().map(|c| md_cell(c)).collect();
            s.push_str(&format!("| {} |\n", cells.join(" | ")));
        }
    }
    s.push('\n');
    for n in notes(e) {
        s.push_str(&n);
        s.push('\n');
    }
    s
}

use fracture_shared::html::escape as html_escape;

/// A self-contained HTML page (inline style, no scripts or external assets).
pub fn to_html(e: &Evaluation) -> String {
    let mut s = String::from(concat!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        "<title>Fracture detection: evaluation</title>\n<style>\n",
        "body{font-family:system-ui,sans-serif;margin:2em;color:#222}\n",
        "table{border-collapse:collapse;margin-bottom:2em}\n",
        "th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right;white-space:nowrap}\n",
        "th:first-child,td:first-child{text-align:left}\n",
        "th{background:#f0f0f0}\ntr.all td{font-weight:bold}\n",
        "p.note{color:#555}\n</style>\n</head>\n<body>\n",
        "<h1>Fracture detection: evaluation</h1>\n"
    ));
    for t in tables(e) {
        s.push_str(&format!(
            "<h2>{}</h2>\n<table>\n<thead><tr>",
            html_escape(&t.title)
        ));
        for h in &t.header {
            s.push_str(&format!("<th>{}</th>", html_escape(h)));
        }
        s.push_str("</tr></thead>\n<tbody>\n");
        for (i, row) in t.rows.iter().enumerate() {
            // The first row of a population table is the whole population.
            let class = if i == 0 && t.header[0] == "region" {
                " class=\"all\""
            } else {
                ""
            };
            s.push_str(&format!("<tr{class}>"));
            for c in row {
                s.push_str(&format!("<td>{}</td>", html_escape(c)));
            }
            s.push_str("</tr>\n");
        }
        s.push_str("</tbody>\n</table>\n");
    }
    for n in notes(e) {
        s.push_str(&format!("<p class=\"note\">{}</p>\n", html_escape(&n)));
    }
    s.push_str("</body>\n</html>\n");
    s
}
