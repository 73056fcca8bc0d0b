//! `report.html`: one self-contained page (no external assets, opens offline) summarising a scan.

use std::collections::HashMap;
use std::path::Path;

use fracture_audit::RegionCount;
use fracture_models::Manifest;
use fracture_shared::messages::{schema, Finding, RadiographId, StudySummary};

use crate::results::{DeadLetterLine, FindingLine, ScanSummary};

/// Longest side of an overlay thumbnail, in pixels.
pub const THUMBNAIL_SIDE: usize = 320;
/// Most thumbnails in one report (positives first), so a back-scan's report stays openable.
pub const MAX_THUMBNAILS: usize = 500;

/// What the report shows beside the findings: overlay thumbnails and study summaries.
#[derive(Debug, Default)]
pub struct Views {
    /// PNG bytes by (pseudonymised) SOP Instance UID.
    pub thumbnails: HashMap<String, Vec<u8>>,
    pub studies: Vec<StudySummary>,
}

/// A study is positive when any of its radiographs is (the findings of a whole scan, at once).
pub fn study_summaries(findings: &[FindingLine]) -> Vec<StudySummary> {
    let as_findings: Vec<Finding> = findings
        .iter()
        .map(|f| Finding {
            schema: schema::FINDING.into(),
            id: RadiographId {
                input: f.input.clone(),
                study_instance_uid: f.study_instance_uid.clone(),
                series_instance_uid: f.series_instance_uid.clone(),
                sop_instance_uid: f.sop_instance_uid.clone(),
            },
            site: f.site.clone(),
            region: f.region.clone(),
            score: f.score,
            threshold: f.threshold,
            fracture: f.fracture,
            boxes: vec![],
            model_version: f.model_version.clone(),
            model_trained: f.model_trained,
            sr: None,
            sc: None,
        })
        .collect();
    fracture_postprocess::study::summarise(&as_findings)
}

/// Thumbnails of the Secondary Captures the scan wrote under `out`, positives first, at most
/// [`MAX_THUMBNAILS`]. A file that cannot be read is left out (the table still lists it).
pub fn thumbnails(out: &Path, findings: &[FindingLine]) -> HashMap<String, Vec<u8>> {
    let mut with_sc: Vec<&FindingLine> = findings.iter().filter(|f| f.sc.is_some()).collect();
    with_sc.sort_by_key(|f| !f.fracture);
    with_sc
        .into_iter()
        .take(MAX_THUMBNAILS)
        .filter_map(|f| {
            let bytes = std::fs::read(out.join(f.sc.as_deref()?)).ok()?;
            let png = fracture_postprocess::sc::thumbnail_png(&bytes, THUMBNAIL_SIDE).ok()?;
            Some((f.sop_instance_uid.clone(), png))
        })
        .collect()
}

/// Standard base64 (RFC 4648, with padding), for data URIs.
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

use fracture_shared::html::escape as esc;

pub fn html(
    m: &Manifest,
    findings: &[FindingLine],
    dead: &[DeadLetterLine],
    regions: &[RegionCount],
    s: &ScanSummary,
    evaluation: Option<&fracture_audit::evaluate::Evaluation>,
    views: &Views,
) -> String {
    let mut h = String::new();
    h.push_str("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>fracture scan report</title><style>");
    h.push_str("body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}th{background:#f3f3f3}.warn{background:#fff3cd;border:2px solid #e0a800;padding:1em;font-weight:bold}.pos{color:#b00;font-weight:bold}.num{text-align:right;font-variant-numeric:tabular-nums}img.overlay{max-width:320px;max-height:320px;display:block}");
    h.push_str("</style></head><body>");
    h.push_str("<h1>Fracture detection: scan report</h1>");
    h.push_str("<p class=\"warn\">AI result, not a diagnosis.");
    if !m.trained {
        h.push_str(&format!(" The model <code>{}</code> was <u>never trained</u> on a real radiograph (random weights, or synthetic phantoms only): its scores say nothing about a patient, and this report only shows what the pipeline does.", esc(&m.model_version)));
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
    h.push_str("<h2>By region</h2><p>Each region is called at its own thresholds where the model has them (calibrated for 92.5% sensitivity on that region), else at the global ones.</p><table><tr><th>region</th><th>radiographs</th><th>called fracture</th><th>score threshold</th><th>map threshold</th></tr>");
    let threshold = |own: Option<&f32>, global: f32| match own {
        Some(t) => format!("{t:.4} (own)"),
        None => format!("{global:.4} (global)"),
    };
    for r in regions {
        h.push_str(&format!(
            "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            esc(&r.region),
            r.radiographs,
            r.positive,
            threshold(m.thresholds.score.get(&r.region), m.thresholds.default_score),
            threshold(m.thresholds.map.get(&r.region), m.thresholds.default_map),
        ));
    }
    h.push_str("</table>");
    if !views.studies.is_empty() {
        h.push_str(&format!(
            "<h2>Studies</h2><p>A study is called positive when any of its radiographs is. {} studies, {} called fracture.</p><table><tr><th>Study Instance UID (pseudonym)</th><th>radiographs</th><th>called fracture</th><th>highest score</th><th>call</th></tr>",
            views.studies.len(),
            views.studies.iter().filter(|s| s.fracture).count()
        ));
        for st in &views.studies {
            h.push_str(&format!(
                "<tr><td><code>{}</code></td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{:.4}</td><td{}>{}</td></tr>",
                esc(&st.study_instance_uid),
                st.radiographs,
                st.positives,
                st.max_score,
                if st.fracture { " class=\"pos\"" } else { "" },
                if st.fracture { "fracture suspected" } else { "not detected" },
            ));
        }
        h.push_str("</table>");
    }
    h.push_str("<h2>Radiographs</h2>");
    if findings.iter().any(|f| f.sc.is_some()) {
        h.push_str(&format!(
            "<p>Overlays: the radiograph with the suspected fractures boxed in red, numbered as in the DICOM SR; the banner above it repeats the result. The DICOM Structured Reports (TID 1500) and Secondary Captures are in <code>dicom/</code>. Thumbnails are shown for at most {MAX_THUMBNAILS} radiographs, positives first.</p>"
        ));
    }
    h.push_str("<table><tr><th>overlay</th><th>SOP Instance UID (pseudonym)</th><th>region</th><th>score</th><th>threshold</th><th>call</th><th>boxes (original pixels)</th></tr>");
    for f in findings {
        let boxes: Vec<String> = f
            .boxes
            .iter()
            .enumerate()
            .map(|(i, b)| {
                // Numbered as on the overlay and in the SR ("fracture box N").
                format!(
                    "{}: ({:.0},{:.0})-({:.0},{:.0}) {:.2}",
                    i + 1,
                    b.x0,
                    b.y0,
                    b.x1,
                    b.y1,
                    b.score
                )
            })
            .collect();
        let overlay = match views.thumbnails.get(&f.sop_instance_uid) {
            Some(png) => format!(
                "<img class=\"overlay\" alt=\"overlay of {}\" src=\"data:image/png;base64,{}\">",
                esc(&f.sop_instance_uid),
                base64(png)
            ),
            None => String::new(),
        };
        let dicom: Vec<String> = [("SR", &f.sr), ("SC", &f.sc)]
            .iter()
            .filter_map(|(k, p)| {
                p.as_ref()
                    .map(|p| format!("<a href=\"{}\">{k}</a>", esc(p)))
            })
            .collect();
        h.push_str(&format!(
            "<tr><td>{overlay}</td><td><code>{}</code>{}</td><td>{}</td><td class=\"num\">{:.4}</td><td class=\"num\">{:.4}</td><td{}>{}</td><td>{}</td></tr>",
            esc(&f.sop_instance_uid),
            if dicom.is_empty() { String::new() } else { format!("<br>DICOM: {}", dicom.join(" ")) },
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
        h.push_str("</table><p>Source paths of these inputs are in <code>dead-letter.jsonl</code> and <code>linkage.db</code>, which stay on this machine.</p>");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648() {
        for (raw, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(raw.as_bytes()), enc);
        }
        assert_eq!(base64(&[0xfb, 0xff]), "+/8=");
    }

    #[test]
    fn overlays_and_studies_are_shown_offline() {
        let m = Manifest::from_toml(
            "name = \"n\"\nmodel_version = \"n-1\"\ntrained = false\nnull_model = true\n\
             input_size = 64\nmodel_card = \"card\"\n[thresholds]\ndefault_score = 0.5\n\
             default_map = 0.5\n",
            std::path::PathBuf::new(),
        )
        .unwrap();
        let line = FindingLine {
            input: "in-1".into(),
            study_instance_uid: "2.25.1".into(),
            series_instance_uid: "2.25.2".into(),
            sop_instance_uid: "2.25.3".into(),
            site: "S".into(),
            region: "wrist".into(),
            score: 0.75,
            threshold: 0.5,
            fracture: true,
            boxes: vec![fracture_shared::messages::BoundingBox {
                x0: 10.0,
                y0: 20.0,
                x1: 30.0,
                y1: 40.0,
                score: 0.9,
            }],
            model_version: "n-1".into(),
            model_trained: false,
            sr: Some("dicom/2.25.3.sr.dcm".into()),
            sc: Some("dicom/2.25.3.sc.dcm".into()),
        };
        let findings = vec![line];
        let views = Views {
            thumbnails: [("2.25.3".to_string(), b"\x89PNG".to_vec())].into(),
            studies: study_summaries(&findings),
        };
        let summary = ScanSummary {
            inputs: 1,
            findings: 1,
            dead_letters: 0,
            skipped: 0,
            seconds: 1.0,
        };
        let h = html(&m, &findings, &[], &[], &summary, None, &views);
        assert!(h.contains("src=\"data:image/png;base64,iVBORw==\""), "{h}");
        assert!(h.contains("1: (10,20)-(30,40) 0.90"));
        assert!(h.contains("<h2>Studies</h2>") && h.contains("1 studies, 1 called fracture"));
        assert!(h.contains("href=\"dicom/2.25.3.sr.dcm\""));
        assert!(
            !h.contains("http:") && !h.contains("https:") && !h.contains("//"),
            "no network"
        );
    }

    #[test]
    fn each_region_shows_the_thresholds_it_is_called_at() {
        let m = Manifest::from_toml(
            "name = \"n\"\nmodel_version = \"n-1\"\ntrained = false\nnull_model = true\n\
             input_size = 64\nmodel_card = \"card\"\n[thresholds]\ndefault_score = 0.5\n\
             default_map = 0.25\n[thresholds.score]\nwrist = 0.125\n[thresholds.map]\nwrist = 0.75\n",
            std::path::PathBuf::new(),
        )
        .unwrap();
        let regions = [
            RegionCount {
                region: "wrist".into(),
                radiographs: 3,
                positive: 1,
            },
            RegionCount {
                region: "hip".into(),
                radiographs: 2,
                positive: 0,
            },
        ];
        let summary = ScanSummary {
            inputs: 5,
            findings: 5,
            dead_letters: 0,
            skipped: 0,
            seconds: 1.0,
        };
        let views = Views {
            thumbnails: HashMap::new(),
            studies: Vec::new(),
        };
        let h = html(&m, &[], &[], &regions, &summary, None, &views);
        assert!(
            h.contains("<td>wrist</td><td class=\"num\">3</td><td class=\"num\">1</td><td class=\"num\">0.1250 (own)</td><td class=\"num\">0.7500 (own)</td>"),
            "{h}"
        );
        assert!(
            h.contains("<td>hip</td><td class=\"num\">2</td><td class=\"num\">0</td><td class=\"num\">0.5000 (global)</td><td class=\"num\">0.2500 (global)</td>"),
            "{h}"
        );
    }
}
