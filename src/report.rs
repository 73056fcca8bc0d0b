//! `report.html`: one self-contained page (no external assets, opens offline) summarising a scan.

use fracture_audit::RegionCount;
use fracture_models::Manifest;

use crate::scan::{DeadLetterLine, FindingLine, ScanSummary};

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

pub fn html(
    m: &Manifest,
    findings: &[FindingLine],
    dead: &[DeadLetterLine],
    regions: &[RegionCount],
    s: &ScanSummary,
    evaluation: Option<&fracture_audit::evaluate::Evaluation>,
) -> String {
    let mut h = String::new();
    h.push_str("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>fracture scan report</title><style>");
    h.push_str("body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}th{background:#f3f3f3}.warn{background:#fff3cd;border:2px solid #e0a800;padding:1em;font-weight:bold}.pos{color:#b00;font-weight:bold}.num{text-align:right;font-variant-numeric:tabular-nums}");
    h.push_str("</style></head><body>");
    h.push_str("<h1>Fracture detection: scan report</h1>");
    h.push_str("<p class=\"warn\">AI result, not a diagnosis.");
    if !m.trained {
        h.push_str(&format!(" The model <code>{}</code> was <u>never trained</u>: its scores are meaningless and this report only shows that the pipeline ran.", esc(&m.model_version)));
    }
    h.push_str("</p>");
    h.push_str(&format!(
        "<p>Model <code>{}</code> ({} members, input {}x{}). {} inputs in {:.1} s: {} findings, {} dead letters, {} files skipped as not DICOM.</p>",
        esc(&m.model_version),
        m.members.len(),
        m.input_size,
        m.input_size,
        s.inputs,
        s.seconds,
        s.findings,
        s.dead_letters,
        s.skipped
    ));
    h.push_str("<h2>By region</h2><table><tr><th>region</th><th>radiographs</th><th>called fracture</th></tr>");
    for r in regions {
        h.push_str(&format!(
            "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            esc(&r.region),
            r.radiographs,
            r.positive
        ));
    }
    h.push_str("</table><h2>Radiographs</h2><table><tr><th>SOP Instance UID (pseudonym)</th><th>region</th><th>score</th><th>threshold</th><th>call</th><th>boxes (original pixels)</th></tr>");
    for f in findings {
        let boxes: Vec<String> = f
            .boxes
            .iter()
            .map(|b| {
                format!(
                    "({:.0},{:.0})-({:.0},{:.0}) {:.2}",
                    b.x0, b.y0, b.x1, b.y1, b.score
                )
            })
            .collect();
        h.push_str(&format!(
            "<tr><td><code>{}</code></td><td>{}</td><td class=\"num\">{:.4}</td><td class=\"num\">{:.4}</td><td{}>{}</td><td>{}</td></tr>",
            esc(&f.sop_instance_uid),
            esc(&f.region),
            f.score,
            f.threshold,
            if f.fracture { " class=\"pos\"" } else { "" },
            if f.fracture { "fracture suspected" } else { "not detected" },
            esc(&boxes.join("; "))
        ));
    }
    h.push_str("</table><h2>Not processed</h2>");
    if dead.is_empty() {
        h.push_str("<p>None.</p>");
    } else {
        h.push_str("<table><tr><th>input (pseudonym)</th><th>stage</th><th>reason</th></tr>");
        for d in dead {
            h.push_str(&format!(
                "<tr><td><code>{}</code></td><td>{}</td><td>{}</td></tr>",
                esc(d.input.as_deref().unwrap_or("")),
                esc(&d.stage),
                esc(&d.reason)
            ));
        }
        h.push_str("</table><p>Source paths of these inputs are in <code>dead-letter.jsonl</code> and <code>linkage.csv</code>, which stay on this machine.</p>");
    }
    if let Some(e) = evaluation {
        let o = &e.overall;
        let pct = |m: &fracture_audit::evaluate::Metric| match (m.value, m.ci) {
            (Some(v), Some([lo, hi])) => {
                format!("{:.1}% ({:.1}-{:.1})", v * 100.0, lo * 100.0, hi * 100.0)
            }
            (Some(v), None) => format!("{:.1}%", v * 100.0),
            _ => format!("n/a ({})", m.reason.clone().unwrap_or_default()),
        };
        h.push_str(&format!(
            "<h2>Against the reference reads</h2><p>{} radiographs, {} with a fracture. AUC {}; sensitivity {}; specificity {}; PPV {}; NPV {}. Per region and with confidence intervals: <a href=\"evaluation.html\">evaluation.html</a>, <code>metrics.json</code>.</p>",
            o.n,
            o.positives,
            o.auc.value.map(|v| format!("{v:.3}")).unwrap_or_else(|| "n/a".into()),
            esc(&pct(&o.sensitivity)),
            esc(&pct(&o.specificity)),
            esc(&pct(&o.ppv)),
            esc(&pct(&o.npv)),
        ));
    }
    h.push_str("<h2>Model card</h2><pre>");
    h.push_str(&esc(&m.model_card));
    h.push_str("</pre></body></html>\n");
    h
}
