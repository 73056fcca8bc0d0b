//! The quality team's dashboard: one self-contained HTML page (inline CSS and SVG) and its JSON.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Query, Request, State};
use axum::http::header::{self, HeaderValue};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

/// Everything the page shows; the caller fills it (from the audit database) for one filter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DashboardData {
    pub generated_at: String,
    /// The choices of the model-version filter.
    pub model_versions: Vec<String>,
    /// The choices of the site filter.
    pub sites: Vec<String>,
    pub filter_site: Option<String>,
    pub filter_model_version: Option<String>,
    /// The sensitivity floor, a fraction (0.9 is 90%).
    pub floor: f64,
    pub regions: Vec<RegionRow>,
    pub series: Vec<SensitivitySeries>,
    pub roc: Vec<RocCurve>,
    pub alerts: Vec<AlertRow>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegionRow {
    pub region: String,
    pub n: u64,
    pub positives: u64,
    pub sensitivity: Option<Estimate>,
    pub specificity: Option<Estimate>,
    pub auc: Option<Estimate>,
    pub trend: Trend,
}

/// A point estimate with its confidence interval, all fractions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub value: f64,
    pub lo: f64,
    pub hi: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trend {
    Up,
    Down,
    Flat,
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SensitivitySeries {
    pub region: String,
    /// (period label, sensitivity, its lower bound), oldest first.
    pub points: Vec<(String, f64, f64)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RocCurve {
    pub region: String,
    /// (false-positive rate, true-positive rate).
    pub points: Vec<(f64, f64)>,
    pub auc: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertRow {
    pub kind: String,
    pub region: String,
    pub site: Option<String>,
    pub model_version: Option<String>,
    pub message: String,
    pub opened_at: String,
}

/// Fills the dashboard for a site and model-version filter (`None`: all).
pub type Source = Arc<dyn Fn(Option<String>, Option<String>) -> DashboardData + Send + Sync>;

/// Sent with the page and with every answer: nothing may load from anywhere, so a page that
/// tried to reach the network would break visibly instead of leaking.
pub const CONTENT_SECURITY_POLICY: &str =
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

// `write!` into a String cannot fail.
macro_rules! w {
    ($out:expr, $($arg:tt)*) => {{
        let _ = write!($out, $($arg)*);
    }};
}

pub use fracture_shared::html::escape;

/// A fraction as a percentage with one decimal; a missing or broken number as a dash.
pub fn pct(x: f64) -> String {
    if x.is_finite() {
        format!("{:.1}%", x * 100.0)
    } else {
        "—".into()
    }
}

fn auc_text(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        "—".into()
    }
}

fn trend_arrow(t: Trend) -> (&'static str, &'static str) {
    match t {
        Trend::Up => ("↑", "up"),
        Trend::Down => ("↓", "down"),
        Trend::Flat => ("→", "flat"),
        Trend::Unknown => ("·", "unknown"),
    }
}

const STYLE: &str = r#"
:root { --ink: #1d2430; --muted: #5b6473; --line: #d8dde5; --blue: #1f5fbf; --red: #c62828; --band: #eef3fb; }
* { box-sizing: border-box; }
body { margin: 0; padding: 20px 28px; font: 14px/1.4 system-ui, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif; color: var(--ink); background: #f6f7f9; }
header { display: flex; flex-wrap: wrap; align-items: baseline; gap: 8px 24px; margin-bottom: 12px; }
h1 { font-size: 20px; margin: 0; }
h2 { font-size: 16px; margin: 0 0 8px; }
.meta { color: var(--muted); margin: 0; }
section { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 12px 16px; margin-bottom: 14px; }
form.filters { display: flex; flex-wrap: wrap; gap: 8px 18px; align-items: center; }
form.filters label { color: var(--muted); }
form.filters select { margin-left: 6px; font: inherit; padding: 2px 4px; }
form.filters button { font: inherit; padding: 3px 14px; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 5px 10px; border-bottom: 1px solid var(--line); }
th { color: var(--muted); font-weight: 600; font-size: 12px; text-transform: uppercase; letter-spacing: .03em; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td .ci { color: var(--muted); font-size: 12px; }
td.below, td.below .ci { color: var(--red); font-weight: 600; }
td.na { color: var(--muted); }
td.trend { text-align: center; font-size: 16px; }
td.trend.down { color: var(--red); }
td.trend.up { color: #2e7d32; }
tr.alert td { background: #fff5f5; }
.none { color: var(--muted); margin: 0; }
.charts { display: flex; flex-wrap: wrap; gap: 12px 20px; }
figure { margin: 0; }
figcaption { font-weight: 600; margin-bottom: 2px; }
figcaption .auc { font-weight: 400; color: var(--muted); margin-left: 6px; }
svg text { font-size: 10px; fill: var(--muted); }
svg .grid { stroke: var(--line); stroke-width: 1; }
svg .axis { stroke: #9aa3b1; stroke-width: 1; }
svg .floor { stroke: var(--red); stroke-width: 1.5; stroke-dasharray: 6 4; }
svg text.floor-label { fill: var(--red); paint-order: stroke; stroke: #fff; stroke-width: 3px; }
svg .sens { fill: none; stroke: var(--blue); stroke-width: 2; }
svg .lower { fill: none; stroke: var(--blue); stroke-width: 1; stroke-dasharray: 3 3; opacity: .7; }
svg circle { fill: var(--blue); }
svg circle.below { fill: var(--red); }
svg .chance { stroke: #9aa3b1; stroke-dasharray: 4 4; }
svg .roc { fill: none; stroke: var(--blue); stroke-width: 2; }
svg .roc-area { fill: var(--band); stroke: none; }
.legend { color: var(--muted); font-size: 12px; margin: 0 0 8px; }
"#;

/// The whole page: self-contained, so it also works saved to a file or mailed.
pub fn render(data: &DashboardData) -> String {
    let mut out = String::with_capacity(16 * 1024);
    w!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
    );
    w!(
        out,
        "<meta http-equiv=\"Content-Security-Policy\" content=\"{}\">\n",
        escape(CONTENT_SECURITY_POLICY)
    );
    w!(
        out,
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
    );
    w!(out, "<title>Fracture audit — per-region performance</title>\n<style>{STYLE}</style>\n</head>\n<body>\n");

    let scope =
        |f: &Option<String>, all: &str| f.as_deref().map(escape).unwrap_or_else(|| all.into());
    w!(
        out,
        "<header><h1>Fracture detection — per-region performance</h1>"
    );
    w!(
        out,
        "<p class=\"meta\">Generated <span id=\"generated-at\">{}</span> · site <span id=\"scope-site\">{}</span> · model <span id=\"scope-model\">{}</span> · sensitivity floor <span id=\"floor\">{}</span></p></header>\n",
        escape(&data.generated_at),
        scope(&data.filter_site, "all sites"),
        scope(&data.filter_model_version, "all versions"),
        pct(data.floor),
    );

    render_filters(&mut out, data);
    render_table(&mut out, data);
    render_alerts(&mut out, data);

    w!(
        out,
        "<section id=\"sensitivity\"><h2>Sensitivity over time</h2>"
    );
    w!(
        out,
        "<p class=\"legend\">Solid: sensitivity; dotted: its lower bound; dashed red: the floor ({}).</p>",
        pct(data.floor)
    );
    if data.series.is_empty() {
        w!(out, "<p class=\"none\">No periods yet.</p>");
    } else {
        w!(out, "<div class=\"charts\">");
        for s in &data.series {
            render_series(&mut out, s, data.floor);
        }
        w!(out, "</div>");
    }
    w!(out, "</section>\n");

    w!(out, "<section id=\"roc\"><h2>ROC curves</h2>");
    if data.roc.is_empty() {
        w!(out, "<p class=\"none\">No labelled cases yet.</p>");
    } else {
        w!(out, "<div class=\"charts\">");
        for c in &data.roc {
            render_roc(&mut out, c);
        }
        w!(out, "</div>");
    }
    w!(out, "</section>\n</body>\n</html>\n");
    out
}

fn render_filters(out: &mut String, data: &DashboardData) {
    // A plain GET form: the filters live in the URL, so a filtered view can be bookmarked.
    w!(
        out,
        "<section id=\"filters\"><form class=\"filters\" method=\"get\">"
    );
    let select = |out: &mut String,
                  name: &str,
                  label: &str,
                  all: &str,
                  choices: &[String],
                  chosen: &Option<String>| {
        w!(
            out,
            "<label>{label}<select name=\"{name}\" id=\"filter-{name}\">"
        );
        let none = if chosen.is_none() { " selected" } else { "" };
        w!(out, "<option value=\"\"{none}>{all}</option>");
        for c in choices {
            let sel = if chosen.as_deref() == Some(c.as_str()) {
                " selected"
            } else {
                ""
            };
            w!(out, "<option value=\"{0}\"{sel}>{0}</option>", escape(c));
        }
        // A filter from the URL that is not among the choices still shows as chosen.
        if let Some(c) = chosen
            .as_deref()
            .filter(|c| !choices.iter().any(|x| x == c))
        {
            w!(
                out,
                "<option value=\"{0}\" selected>{0}</option>",
                escape(c)
            );
        }
        w!(out, "</select></label>");
    };
    select(
        out,
        "site",
        "Site",
        "All sites",
        &data.sites,
        &data.filter_site,
    );
    select(
        out,
        "model_version",
        "Model version",
        "All versions",
        &data.model_versions,
        &data.filter_model_version,
    );
    w!(
        out,
        "<button type=\"submit\">Apply</button></form></section>\n"
    );
}

fn estimate_cell(
    out: &mut String,
    region: &str,
    metric: &str,
    e: Option<Estimate>,
    floor: Option<f64>,
    fmt: fn(f64) -> String,
) {
    let region = escape(region);
    match e {
        None => w!(
            out,
            "<td data-region=\"{region}\" data-metric=\"{metric}\" class=\"num na\">—</td>"
        ),
        Some(e) => {
            let below = floor.is_some_and(|f| e.value < f);
            let class = if below { "num below" } else { "num" };
            w!(
                out,
                "<td data-region=\"{region}\" data-metric=\"{metric}\" class=\"{class}\"><span class=\"v\">{}</span> <span class=\"ci\">[{}, {}]</span></td>",
                fmt(e.value),
                fmt(e.lo),
                fmt(e.hi),
            );
        }
    }
}

fn render_table(out: &mut String, data: &DashboardData) {
    w!(out, "<section id=\"regions\"><h2>Regions</h2>");
    if data.regions.is_empty() {
        w!(
            out,
            "<p class=\"none\">No findings for this filter.</p></section>\n"
        );
        return;
    }
    w!(
        out,
        "<table><thead><tr><th>Region</th><th class=\"num\">n</th><th class=\"num\">Positives</th><th class=\"num\">Sensitivity [CI]</th><th class=\"num\">Specificity [CI]</th><th class=\"num\">AUC [CI]</th><th>Trend</th></tr></thead><tbody>"
    );
    for r in &data.regions {
        let region = escape(&r.region);
        w!(out, "<tr data-region=\"{region}\"><td data-region=\"{region}\" data-metric=\"region\">{region}</td>");
        w!(
            out,
            "<td data-region=\"{region}\" data-metric=\"n\" class=\"num\">{}</td>",
            r.n
        );
        w!(
            out,
            "<td data-region=\"{region}\" data-metric=\"positives\" class=\"num\">{}</td>",
            r.positives
        );
        estimate_cell(
            out,
            &r.region,
            "sensitivity",
            r.sensitivity,
            Some(data.floor),
            pct,
        );
        estimate_cell(out, &r.region, "specificity", r.specificity, None, pct);
        estimate_cell(out, &r.region, "auc", r.auc, None, auc_text);
        let (arrow, word) = trend_arrow(r.trend);
        w!(
            out,
            "<td data-region=\"{region}\" data-metric=\"trend\" data-trend=\"{word}\" class=\"trend {word}\" title=\"trend: {word}\">{arrow}</td></tr>"
        );
    }
    w!(out, "</tbody></table></section>\n");
}

fn render_alerts(out: &mut String, data: &DashboardData) {
    w!(
        out,
        "<section id=\"alerts\"><h2>Open alerts ({})</h2>",
        data.alerts.len()
    );
    if data.alerts.is_empty() {
        w!(out, "<p class=\"none\">No open alerts.</p></section>\n");
        return;
    }
    w!(
        out,
        "<table><thead><tr><th>Opened</th><th>Kind</th><th>Region</th><th>Site</th><th>Model</th><th>Message</th></tr></thead><tbody>"
    );
    let opt = |o: &Option<String>| o.as_deref().map(escape).unwrap_or_else(|| "all".into());
    for (i, a) in data.alerts.iter().enumerate() {
        w!(
            out,
            "<tr class=\"alert\" data-alert=\"{i}\"><td data-field=\"opened_at\">{}</td><td data-field=\"kind\">{}</td><td data-field=\"region\">{}</td><td data-field=\"site\">{}</td><td data-field=\"model_version\">{}</td><td data-field=\"message\">{}</td></tr>",
            escape(&a.opened_at),
            escape(&a.kind),
            escape(&a.region),
            opt(&a.site),
            opt(&a.model_version),
            escape(&a.message),
        );
    }
    w!(out, "</tbody></table></section>\n");
}

/// Drawing area of a chart, in SVG user units.
struct Frame {
    left: f64,
    top: f64,
    width: f64,
    height: f64,
}

impl Frame {
    fn x(&self, f: f64) -> f64 {
        self.left + f.clamp(0.0, 1.0) * self.width
    }
    fn y(&self, f: f64) -> f64 {
        self.top + (1.0 - f.clamp(0.0, 1.0)) * self.height
    }
}

fn render_series(out: &mut String, s: &SensitivitySeries, floor: f64) {
    let (w, h) = (460.0, 200.0);
    // Room on the right for half of a date-long period label centred under the last point.
    let fr = Frame {
        left: 48.0,
        top: 12.0,
        width: w - 48.0 - 34.0,
        height: h - 12.0 - 34.0,
    };
    // Sensitivities sit near the top: a 0-100% axis would flatten every change that matters, so
    // the axis starts a little under the lowest of the points, their bounds and the floor.
    let lowest = s
        .points
        .iter()
        .flat_map(|p| [p.1, p.2])
        .chain([floor])
        .filter(|v| v.is_finite())
        .fold(1.0_f64, f64::min);
    let ymin = (((lowest - 0.02) * 10.0).floor() / 10.0).clamp(0.0, 0.9);
    let span = 1.0 - ymin;
    let to_unit = |v: f64| (v - ymin) / span;
    let step = if span > 0.5 { 0.2 } else { 0.1 };

    let region = escape(&s.region);
    w!(
        out,
        "<figure data-chart=\"sensitivity\" data-region=\"{region}\" data-points=\"{}\"><figcaption>{region}</figcaption>",
        s.points.len()
    );
    w!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"sensitivity over time, {region}\">"
    );
    let mut t = 1.0;
    while t >= ymin - 1e-9 {
        let y = fr.y(to_unit(t));
        w!(
            out,
            "<line class=\"grid\" x1=\"{:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\"/>",
            fr.left,
            fr.left + fr.width
        );
        w!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            fr.left - 6.0,
            y + 3.5,
            pct(t)
        );
        t -= step;
    }
    w!(
        out,
        "<line class=\"axis\" x1=\"{0:.1}\" y1=\"{1:.1}\" x2=\"{2:.1}\" y2=\"{1:.1}\"/>",
        fr.left,
        fr.top + fr.height,
        fr.left + fr.width
    );
    if s.points.is_empty() {
        w!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">no periods yet</text>",
            fr.left + fr.width / 2.0,
            fr.top + fr.height / 2.0
        );
    }
    let n = s.points.len();
    let xat = |i: usize| {
        if n <= 1 {
            fr.x(0.5)
        } else {
            fr.x(i as f64 / (n - 1) as f64)
        }
    };
    // Period labels: at most six, always the first and the last, so long labels never overlap.
    let every = n.div_ceil(6).max(1);
    for i in 0..n {
        if i % every == 0 || i + 1 == n {
            w!(
                out,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                xat(i),
                fr.top + fr.height + 16.0,
                escape(&s.points[i].0)
            );
        }
    }
    // Broken numbers (NaN from an empty period) are left out rather than drawn at an edge.
    let line = |sel: fn(&(String, f64, f64)) -> f64| {
        s.points
            .iter()
            .enumerate()
            .filter(|(_, p)| sel(p).is_finite())
            .map(|(i, p)| format!("{:.1},{:.1}", xat(i), fr.y(to_unit(sel(p)))))
            .collect::<Vec<_>>()
            .join(" ")
    };
    w!(
        out,
        "<polyline class=\"lower\" points=\"{}\"/>",
        line(|p| p.2)
    );
    w!(
        out,
        "<polyline class=\"sens\" points=\"{}\"/>",
        line(|p| p.1)
    );
    if floor.is_finite() {
        let y = fr.y(to_unit(floor));
        w!(
            out,
            "<line class=\"floor\" data-floor=\"{floor}\" x1=\"{:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\"/>",
            fr.left,
            fr.left + fr.width
        );
        w!(
            out,
            "<text class=\"floor-label\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">floor {}</text>",
            fr.left + fr.width - 2.0,
            y - 4.0,
            pct(floor)
        );
    }
    for (i, (label, v, lo)) in s.points.iter().enumerate() {
        if !v.is_finite() {
            continue;
        }
        let class = if *v < floor { " class=\"below\"" } else { "" };
        w!(
            out,
            "<circle{class} cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\"><title>{}: {} (lower bound {})</title></circle>",
            xat(i),
            fr.y(to_unit(*v)),
            escape(label),
            pct(*v),
            pct(*lo)
        );
    }
    w!(out, "</svg></figure>");
}

fn render_roc(out: &mut String, c: &RocCurve) {
    let (w, h) = (250.0, 250.0);
    let fr = Frame {
        left: 40.0,
        top: 10.0,
        width: 200.0,
        height: 200.0,
    };
    let region = escape(&c.region);
    w!(
        out,
        "<figure data-chart=\"roc\" data-region=\"{region}\"><figcaption>{region}<span class=\"auc\" data-region=\"{region}\" data-metric=\"roc-auc\">AUC {}</span></figcaption>",
        auc_text(c.auc)
    );
    w!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"ROC curve, {region}\">"
    );
    // Every ROC curve runs from (0,0) to (1,1); drawing the ends too keeps a curve given only its
    // interior thresholds from floating, and sorting by FPR draws it left to right.
    let mut pts: Vec<(f64, f64)> = c
        .points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    if pts.first() != Some(&(0.0, 0.0)) {
        pts.insert(0, (0.0, 0.0));
    }
    if pts.last() != Some(&(1.0, 1.0)) {
        pts.push((1.0, 1.0));
    }
    for t in [0.0, 0.5, 1.0] {
        let (x, y) = (fr.x(t), fr.y(t));
        w!(
            out,
            "<line class=\"grid\" x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\"/>",
            fr.top,
            fr.top + fr.height
        );
        w!(
            out,
            "<line class=\"grid\" x1=\"{:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\"/>",
            fr.left,
            fr.left + fr.width
        );
        w!(
            out,
            "<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{t:.1}</text>",
            fr.top + fr.height + 13.0
        );
        w!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{t:.1}</text>",
            fr.left - 5.0,
            y + 3.5
        );
    }
    let coords = |p: &[(f64, f64)]| {
        p.iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", fr.x(x), fr.y(y)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let area = format!("{} {:.1},{:.1}", coords(&pts), fr.x(1.0), fr.y(0.0));
    w!(out, "<polygon class=\"roc-area\" points=\"{area}\"/>");
    w!(
        out,
        "<line class=\"chance\" x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\"/>",
        fr.x(0.0),
        fr.y(0.0),
        fr.x(1.0),
        fr.y(1.0)
    );
    w!(out, "<polyline class=\"roc\" points=\"{}\"/>", coords(&pts));
    w!(
        out,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">false-positive rate</text>",
        fr.left + fr.width / 2.0,
        fr.top + fr.height + 30.0
    );
    w!(
        out,
        "<text x=\"12\" y=\"{0:.1}\" text-anchor=\"middle\" transform=\"rotate(-90 12 {0:.1})\">true-positive rate</text>",
        fr.top + fr.height / 2.0
    );
    w!(out, "</svg></figure>");
}

#[derive(Debug, Default, Deserialize)]
struct Filters {
    site: Option<String>,
    model_version: Option<String>,
}

#[derive(Clone)]
struct AppState {
    source: Source,
}

async fn load(state: &AppState, q: Filters) -> Result<DashboardData, Response> {
    // The form sends `site=` for "all".
    let site = q.site.filter(|s| !s.is_empty());
    let version = q.model_version.filter(|s| !s.is_empty());
    let source = state.source.clone();
    // The source is synchronous and may block on the database: keep it off the async workers.
    tokio::task::spawn_blocking(move || source(site, version))
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "audit dashboard: the data source failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the dashboard data could not be loaded\n",
            )
                .into_response()
        })
}

async fn page(State(state): State<AppState>, Query(q): Query<Filters>) -> Response {
    match load(&state, q).await {
        Ok(d) => Html(render(&d)).into_response(),
        Err(r) => r,
    }
}

async fn json(State(state): State<AppState>, Query(q): Query<Filters>) -> Response {
    match load(&state, q).await {
        Ok(d) => Json(d).into_response(),
        Err(r) => r,
    }
}

/// Compares in time that depends only on the expected token's length, not on where a guess
/// first differs.
fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = u8::from(given.len() != expected.len());
    for (i, e) in expected.iter().enumerate() {
        diff |= given.get(i).copied().unwrap_or(0) ^ e;
    }
    // An empty token would let `Authorization: Bearer ` in: it denies everyone instead.
    std::hint::black_box(diff) == 0 && !expected.is_empty()
}

fn bearer(value: &HeaderValue) -> Option<&str> {
    let (scheme, rest) = value.to_str().ok()?.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim_start_matches(' '))
}

async fn guard(State(token): State<Option<Arc<str>>>, req: Request, next: Next) -> Response {
    let mut res = match &token {
        Some(t)
            if !req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(bearer)
                .is_some_and(|g| token_matches(g.as_bytes(), t.as_bytes())) =>
        {
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "a bearer token is required\n",
            )
                .into_response()
        }
        _ => next.run(req).await,
    };
    // Patient-derived numbers: never cached, never sniffed, never framed, nothing loaded.
    let h = res.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    res
}

/// `GET /` (the page) and `GET /api/dashboard.json`, both filtered by the `site` and
/// `model_version` query parameters. With a token every request needs
/// `Authorization: Bearer <token>`; without one, serve it on loopback only (see [`serve`]).
pub fn router(source: Source, token: Option<String>) -> Router {
    let token: Option<Arc<str>> = token.map(Into::into);
    Router::new()
        .route("/", get(page))
        .route("/api/dashboard.json", get(json))
        .with_state(AppState { source })
        .layer(middleware::from_fn_with_state(token, guard))
}

/// Binds `addr` and serves `router` on a background task; returns the bound address. Without a
/// token only loopback addresses are allowed: anyone who can reach the port could read the data.
pub async fn serve(
    addr: &str,
    router: Router,
    token_configured: bool,
) -> std::io::Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(addr).await?.collect();
    if addrs.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{addr} resolves to no address"),
        ));
    }
    for a in &addrs {
        fracture_shared::http::loopback_unless_guarded(
            *a,
            token_configured,
            "the audit dashboard",
            "set a dashboard token to serve it beyond this machine",
        )?;
    }
    let listener = tokio::net::TcpListener::bind(&addrs[..]).await?;
    let local = listener.local_addr()?;
    if token_configured {
        tracing::info!(addr = %local, "audit dashboard listening; a bearer token is required");
    } else {
        tracing::info!(addr = %local, "audit dashboard listening on loopback only (no token configured)");
    }
    tokio::spawn(async move {
        if let Err(e) = fracture_shared::http::serve(listener, router, std::future::pending()).await
        {
            tracing::error!(error = %e, "audit dashboard stopped");
        }
    });
    Ok(local)
}
