//! The dashboard in a real browser (Debian's Chromium, headless), its token and its bind rules.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fracture_audit::dashboard::{
    self, AlertRow, DashboardData, Estimate, RegionRow, RocCurve, SensitivitySeries, Source, Trend,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn est(value: f64, lo: f64, hi: f64) -> Option<Estimate> {
    Some(Estimate { value, lo, hi })
}

fn region(name: &str, n: u64, positives: u64, sens: Option<Estimate>, trend: Trend) -> RegionRow {
    RegionRow {
        region: name.into(),
        n,
        positives,
        sensitivity: sens,
        specificity: est(0.88, 0.85, 0.905),
        auc: est(0.931, 0.91, 0.95),
        trend,
    }
}

const HOSTILE: &str = "<script>document.title='pwned'</script> & \"quoted\"";

fn data() -> DashboardData {
    let weeks = |vals: &[(f64, f64)]| {
        vals.iter()
            .enumerate()
            .map(|(i, &(v, lo))| {
                (
                    format!("2025-{:02}-{:02}", 9 + i / 4, 1 + 7 * (i % 4)),
                    v,
                    lo,
                )
            })
            .collect()
    };
    DashboardData {
        generated_at: "2025-11-27T06:00:00Z".into(),
        model_versions: vec!["v1".into(), "v2".into()],
        sites: vec!["North".into(), "St. Mary's <South>".into()],
        filter_site: None,
        filter_model_version: None,
        floor: 0.9,
        regions: vec![
            region("wrist", 1240, 310, est(0.95, 0.901, 0.978), Trend::Up),
            RegionRow {
                specificity: est(0.912, 0.884, 0.934),
                auc: est(0.874, 0.842, 0.903),
                ..region("ankle", 860, 142, est(0.872, 0.81, 0.917), Trend::Down)
            },
            region("elbow", 402, 61, est(0.934, 0.841, 0.974), Trend::Flat),
            RegionRow {
                specificity: None,
                auc: None,
                ..region("hand", 12, 0, None, Trend::Unknown)
            },
        ],
        series: vec![
            SensitivitySeries {
                region: "wrist".into(),
                points: weeks(&[
                    (0.94, 0.9),
                    (0.952, 0.91),
                    (0.948, 0.905),
                    (0.961, 0.92),
                    (0.955, 0.915),
                    (0.95, 0.901),
                ]),
            },
            SensitivitySeries {
                region: "ankle".into(),
                points: weeks(&[
                    (0.931, 0.88),
                    (0.924, 0.87),
                    (0.91, 0.852),
                    (0.893, 0.83),
                    (0.881, 0.82),
                    (0.872, 0.81),
                ]),
            },
        ],
        roc: vec![
            RocCurve {
                region: "wrist".into(),
                points: vec![
                    (0.0, 0.0),
                    (0.02, 0.61),
                    (0.06, 0.82),
                    (0.12, 0.95),
                    (0.3, 0.98),
                    (1.0, 1.0),
                ],
                auc: 0.931,
            },
            RocCurve {
                region: "ankle".into(),
                points: vec![(0.04, 0.52), (0.09, 0.78), (0.2, 0.872), (0.45, 0.95)],
                auc: 0.874,
            },
        ],
        alerts: vec![
            AlertRow {
                kind: "sensitivity_floor".into(),
                region: "ankle".into(),
                site: Some("North".into()),
                model_version: Some("v2".into()),
                message: "ankle sensitivity 87.2% is under the floor 90.0%".into(),
                opened_at: "2025-11-26T21:14:00Z".into(),
            },
            AlertRow {
                kind: "drift".into(),
                region: "wrist".into(),
                site: None,
                model_version: None,
                message: HOSTILE.into(),
                opened_at: "2025-11-25T08:00:00Z".into(),
            },
        ],
    }
}

type Calls = Arc<Mutex<Vec<(Option<String>, Option<String>)>>>;

/// A source that answers `data()` with the filters applied and remembers what it was asked.
fn source(calls: Calls) -> Source {
    Arc::new(move |site, version| {
        calls.lock().unwrap().push((site.clone(), version.clone()));
        DashboardData {
            filter_site: site,
            filter_model_version: version,
            ..data()
        }
    })
}

// The test's own formatting, written out independently of the renderer's.
fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn expected_cell(metric: &str, e: Option<Estimate>) -> String {
    let f = |x: f64| {
        if metric == "auc" {
            format!("{x:.3}")
        } else {
            pct(x)
        }
    };
    match e {
        None => "—".into(),
        Some(e) => format!("{} [{}, {}]", f(e.value), f(e.lo), f(e.hi)),
    }
}

fn decode(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&")
}

fn strip_tags(s: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in s.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    decode(&out)
}

/// The start tag and text of every element whose start tag carries `attrs` (in that order).
fn elements<'a>(dom: &'a str, attrs: &str) -> Vec<(&'a str, String)> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(i) = dom[from..].find(attrs).map(|i| i + from) {
        let open = if attrs.starts_with('<') {
            i
        } else {
            dom[..i].rfind('<').expect("attribute inside a tag")
        };
        let close = i + dom[i..].find('>').expect("end of start tag");
        let name: String = dom[open + 1..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        let end = close + dom[close..].find(&format!("</{name}>")).expect("end tag");
        found.push((&dom[open..=close], strip_tags(&dom[close + 1..end])));
        from = close;
    }
    found
}

fn one<'a>(dom: &'a str, attrs: &str) -> (&'a str, String) {
    let mut all = elements(dom, attrs);
    assert_eq!(all.len(), 1, "exactly one element with {attrs}");
    all.remove(0)
}

fn cell(dom: &str, region: &str, metric: &str) -> String {
    one(
        dom,
        &format!("data-region=\"{region}\" data-metric=\"{metric}\""),
    )
    .1
}

/// Every src/href/action value and CSS url(): none may point anywhere but `origin`.
fn external_refs(dom: &str, origin: &str) -> Vec<String> {
    let mut refs = Vec::new();
    for key in [
        " src=",
        " href=",
        " xlink:href=",
        " action=",
        " srcset=",
        " poster=",
        "url(",
    ] {
        let mut rest = dom;
        while let Some(i) = rest.find(key) {
            rest = &rest[i + key.len()..];
            let v = rest.trim_start_matches(['"', '\'', ' ']);
            let v: String = v
                .chars()
                .take_while(|c| !matches!(c, '"' | '\'' | ')' | ' ' | '>'))
                .collect();
            let lower = v.to_ascii_lowercase();
            let absolute = lower.starts_with("http:")
                || lower.starts_with("https:")
                || lower.starts_with("//");
            if absolute && !lower.starts_with(origin) {
                refs.push(v);
            }
        }
    }
    refs
}

fn check_self_contained(html: &str, origin: &str) {
    assert_eq!(
        external_refs(html, origin),
        Vec::<String>::new(),
        "external references"
    );
    for tag in [
        "<script",
        "<link",
        "<iframe",
        "<img",
        "<object",
        "<embed",
        "@import",
        "@font-face",
    ] {
        assert!(
            !html.to_ascii_lowercase().contains(tag),
            "the page has {tag}"
        );
    }
}

async fn chromium_bin() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/chromium.sh");
    let out = tokio::process::Command::new("bash")
        .arg(&script)
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "scripts/chromium.sh could not install Chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let bin = PathBuf::from(stdout.lines().last().expect("chromium path").trim());
    assert!(bin.exists(), "{} does not exist", bin.display());
    bin
}

/// Headless Chromium as root, with no profile and no way to reach anything but loopback.
async fn chromium(bin: &Path, args: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        // Any name the page might try to resolve fails: only the served loopback origin works.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(args)
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("chromium took over 120 s")
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "chromium failed ({}): {stderr}",
        out.status
    );
    String::from_utf8(out.stdout).expect("utf-8 DOM")
}

struct Answer {
    status: u16,
    head: String,
    body: String,
}

/// A bare HTTP/1.1 GET over a TcpStream, so headers are exactly what the test says.
async fn get(addr: SocketAddr, path: &str, authorization: Option<&str>) -> Answer {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(a) = authorization {
        req.push_str(&format!("Authorization: {a}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut raw))
        .await
        .expect("answer in time")
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a head and a body");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    Answer {
        status,
        head: head.to_ascii_lowercase(),
        body: body.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_shows_the_data() {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let addr = dashboard::serve(
        "127.0.0.1:0",
        dashboard::router(source(calls.clone()), None),
        false,
    )
    .await
    .unwrap();
    let origin = format!("http://{addr}");
    let bin = chromium_bin().await;

    let dom = chromium(&bin, &["--dump-dom", &format!("{origin}/")]).await;
    assert!(
        dom.contains("per-region performance"),
        "the page did not load: {dom}"
    );
    assert_eq!(calls.lock().unwrap().last().unwrap(), &(None, None));

    let d = data();
    // Every numeric cell, against the data.
    for r in &d.regions {
        assert_eq!(cell(&dom, &r.region, "region"), r.region);
        assert_eq!(cell(&dom, &r.region, "n"), r.n.to_string());
        assert_eq!(cell(&dom, &r.region, "positives"), r.positives.to_string());
        assert_eq!(
            cell(&dom, &r.region, "sensitivity"),
            expected_cell("sensitivity", r.sensitivity)
        );
        assert_eq!(
            cell(&dom, &r.region, "specificity"),
            expected_cell("specificity", r.specificity)
        );
        assert_eq!(cell(&dom, &r.region, "auc"), expected_cell("auc", r.auc));
        let arrow = match r.trend {
            Trend::Up => "↑",
            Trend::Down => "↓",
            Trend::Flat => "→",
            Trend::Unknown => "·",
        };
        assert_eq!(cell(&dom, &r.region, "trend"), arrow);
    }
    // The format itself, spelled out.
    assert_eq!(cell(&dom, "wrist", "sensitivity"), "95.0% [90.1%, 97.8%]");
    assert_eq!(cell(&dom, "wrist", "specificity"), "88.0% [85.0%, 90.5%]");
    assert_eq!(cell(&dom, "wrist", "auc"), "0.931 [0.910, 0.950]");
    assert_eq!(cell(&dom, "ankle", "sensitivity"), "87.2% [81.0%, 91.7%]");
    assert_eq!(cell(&dom, "hand", "sensitivity"), "—");
    assert_eq!(cell(&dom, "wrist", "n"), "1240");
    // Under the floor is marked; over it is not.
    let (ankle, _) = one(&dom, "data-region=\"ankle\" data-metric=\"sensitivity\"");
    assert!(ankle.contains("below"), "{ankle}");
    let (wrist, _) = one(&dom, "data-region=\"wrist\" data-metric=\"sensitivity\"");
    assert!(!wrist.contains("below"), "{wrist}");
    assert_eq!(one(&dom, "id=\"floor\"").1, "90.0%");
    assert_eq!(one(&dom, "id=\"generated-at\"").1, d.generated_at);

    // The open alerts, the hostile one shown as text and never run.
    assert!(dom.contains("<h2>Open alerts (2)</h2>"));
    for (i, a) in d.alerts.iter().enumerate() {
        let row = one(&dom, &format!("data-alert=\"{i}\"")).0;
        assert!(row.starts_with("<tr"), "{row}");
        let field = |f: &str| {
            let cells = elements(&dom, &format!("data-field=\"{f}\""));
            cells[i].1.clone()
        };
        assert_eq!(field("kind"), a.kind);
        assert_eq!(field("region"), a.region);
        assert_eq!(
            field("site"),
            a.site.clone().unwrap_or_else(|| "all".into())
        );
        assert_eq!(
            field("model_version"),
            a.model_version.clone().unwrap_or_else(|| "all".into())
        );
        assert_eq!(field("message"), a.message);
        assert_eq!(field("opened_at"), a.opened_at);
    }
    assert!(!dom.contains("pwned</title>"), "the alert's script ran");

    // One sensitivity chart per series with its floor and a point per period; one ROC per curve.
    let charts = elements(&dom, "data-chart=\"sensitivity\"");
    assert_eq!(charts.len(), d.series.len());
    for s in &d.series {
        let (fig, _) = one(
            &dom,
            &format!("data-chart=\"sensitivity\" data-region=\"{}\"", s.region),
        );
        assert!(
            fig.contains(&format!("data-points=\"{}\"", s.points.len())),
            "{fig}"
        );
    }
    assert_eq!(
        dom.matches("class=\"floor\" data-floor=\"0.9\"").count(),
        d.series.len()
    );
    assert_eq!(
        dom.matches("<circle").count(),
        d.series.iter().map(|s| s.points.len()).sum::<usize>()
    );
    assert_eq!(elements(&dom, "data-chart=\"roc\"").len(), d.roc.len());
    assert_eq!(cell(&dom, "wrist", "roc-auc"), "AUC 0.931");
    assert_eq!(cell(&dom, "ankle", "roc-auc"), "AUC 0.874");
    assert_eq!(dom.matches("class=\"roc\" points=").count(), d.roc.len());

    // The filter form: both selects, all choices, and nothing loaded from elsewhere.
    assert!(dom.contains("<select name=\"site\""));
    assert!(dom.contains("<select name=\"model_version\""));
    assert_eq!(elements(&dom, "<option value=\"").len(), 1 + 2 + 1 + 2);
    check_self_contained(&dom, &origin);

    // A filtered view: the source is asked for it and the form shows it.
    let dom = chromium(
        &bin,
        &[
            "--dump-dom",
            &format!("{origin}/?site=North&model_version=v2"),
        ],
    )
    .await;
    assert_eq!(
        calls.lock().unwrap().last().unwrap(),
        &(Some("North".into()), Some("v2".into()))
    );
    assert!(one(&dom, "<option value=\"North\"").0.contains("selected"));
    assert!(one(&dom, "<option value=\"v2\"").0.contains("selected"));
    assert!(!one(&dom, "<option value=\"v1\"").0.contains("selected"));
    assert_eq!(one(&dom, "id=\"scope-site\"").1, "North");
    check_self_contained(&dom, &origin);

    // What a person sees.
    let png = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&png);
    chromium(
        &bin,
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1400,1000",
            &format!("{origin}/"),
        ],
    )
    .await;
    let bytes =
        std::fs::read(&png).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", png.display()));
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000,
        "not a screenshot"
    );
    println!("dashboard screenshot: {}", png.display());
}

#[tokio::test]
async fn the_served_page_is_self_contained_and_locked_down() {
    let addr = dashboard::serve(
        "127.0.0.1:0",
        dashboard::router(source(Default::default()), None),
        false,
    )
    .await
    .unwrap();
    let a = get(addr, "/", None).await;
    assert_eq!(a.status, 200);
    assert!(a.head.contains("content-type: text/html"), "{}", a.head);
    assert!(
        a.head
            .contains("content-security-policy: default-src 'none'"),
        "{}",
        a.head
    );
    assert!(a.head.contains("cache-control: no-store"), "{}", a.head);
    check_self_contained(&a.body, &format!("http://{addr}"));
    assert_eq!(a.body, dashboard::render(&data()));
    // Kept for a look at the whole page, which the screenshot's window cuts off.
    let saved = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.html");
    std::fs::write(&saved, &a.body).unwrap();
    println!("dashboard page: {}", saved.display());
}

#[tokio::test]
async fn a_token_guards_every_request() {
    let router = dashboard::router(source(Default::default()), Some("s3cret-token".into()));
    let addr = dashboard::serve("127.0.0.1:0", router, true).await.unwrap();
    for path in ["/", "/api/dashboard.json", "/nowhere"] {
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("Bearer s3cret-toke"),
            Some("Bearer s3cret-token2"),
            Some("Basic s3cret-token"),
            Some("s3cret-token"),
            Some("Bearer "),
        ] {
            let a = get(addr, path, auth).await;
            assert_eq!(a.status, 401, "{path} with {auth:?}");
            assert!(a.head.contains("www-authenticate: bearer"), "{}", a.head);
            assert!(
                !a.body.contains("wrist"),
                "{path} with {auth:?} leaked data"
            );
        }
    }
    let a = get(addr, "/", Some("Bearer s3cret-token")).await;
    assert_eq!(a.status, 200);
    assert!(a.body.contains("data-metric=\"sensitivity\""));
    let a = get(addr, "/?site=North", Some("bearer s3cret-token")).await;
    assert_eq!(a.status, 200, "the scheme is case-insensitive");

    // The JSON is the same data, with the filters applied (an empty one means all).
    let a = get(
        addr,
        "/api/dashboard.json?site=North&model_version=",
        Some("Bearer s3cret-token"),
    )
    .await;
    assert_eq!(a.status, 200);
    assert!(
        a.head.contains("content-type: application/json"),
        "{}",
        a.head
    );
    let got: DashboardData = serde_json::from_str(&a.body).unwrap();
    assert_eq!(
        got,
        DashboardData {
            filter_site: Some("North".into()),
            ..data()
        }
    );
}

#[tokio::test]
async fn without_a_token_only_loopback() {
    let router = || dashboard::router(source(Default::default()), None);
    for addr in ["0.0.0.0:0", "[::]:0", "192.0.2.1:8080"] {
        let e = dashboard::serve(addr, router(), false).await.unwrap_err();
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::PermissionDenied,
            "{addr}: {e}"
        );
        assert!(e.to_string().contains("set a dashboard token"), "{e}");
    }
    let addr = dashboard::serve("localhost:0", router(), false)
        .await
        .unwrap();
    assert!(addr.ip().is_loopback());
    assert_eq!(get(addr, "/", None).await.status, 200);
}

#[test]
fn render_escapes_every_string() {
    let mut d = data();
    d.regions[0].region = "<b>wrist</b>".into();
    d.series[0].region = "\"><svg onload=x>".into();
    d.roc[0].region = "'&".into();
    d.generated_at = "<i>now</i>".into();
    d.filter_site = Some("<x>".into());
    let html = dashboard::render(&d);
    for raw in [
        "<b>",
        "<svg onload",
        "<i>",
        "<x>",
        "<script>",
        "'&",
        "St. Mary's",
    ] {
        assert!(!html.contains(raw), "unescaped {raw}");
    }
    assert!(html.contains("&lt;b&gt;wrist&lt;/b&gt;"));
    assert!(html.contains("St. Mary&#39;s &lt;South&gt;"));
}

#[test]
fn render_without_data_still_renders() {
    let d = DashboardData {
        regions: vec![],
        series: vec![SensitivitySeries {
            region: "wrist".into(),
            points: vec![("w1".into(), f64::NAN, f64::NAN)],
        }],
        roc: vec![],
        alerts: vec![],
        ..data()
    };
    let html = dashboard::render(&d);
    assert!(html.contains("No findings for this filter."));
    assert!(html.contains("No open alerts."));
    assert!(html.contains("No labelled cases yet."));
    assert!(!html.contains("NaN"));
}

/// The page `fracture serve audit` serves, in Chromium, against what the database holds:
/// findings and labels recorded through the sink's own API, numbers computed here by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_shows_what_the_database_holds() {
    use fracture_shared::messages::{schema, Finding, Label, RadiographId};
    let d = tempfile::tempdir().unwrap();
    let db =
        fracture_audit::AuditDb::open(&format!("sqlite://{}", d.path().join("a.db").display()))
            .await
            .unwrap();
    // wrist: 10 fractures, 9 called; 10 normals, 8 cleared. ankle: 4 fractures, all called; 6 normals, 6 cleared.
    let mut findings = Vec::new();
    let mut labels = Vec::new();
    let mut add = |i: usize, region: &str, fracture: bool, called: bool| {
        let sop = format!("2.25.{i}");
        findings.push(Finding {
            schema: schema::FINDING.into(),
            id: RadiographId {
                input: format!("in-{i}"),
                study_instance_uid: "2.25.1".into(),
                series_instance_uid: "2.25.2".into(),
                sop_instance_uid: sop.clone(),
            },
            site: "S1".into(),
            region: region.into(),
            score: if called {
                0.6 + i as f32 * 0.001
            } else {
                0.3 + i as f32 * 0.001
            },
            threshold: 0.5,
            fracture: called,
            boxes: vec![],
            model_version: "v1".into(),
            model_trained: false,
            sr: None,
            sc: None,
        });
        labels.push(Label {
            schema: schema::LABEL.into(),
            sop_instance_uid: sop,
            fracture,
            region: None,
            boxes: vec![],
        });
    };
    let mut i = 0;
    for (region, fractures, called, normals, cleared) in
        [("wrist", 10, 9, 10, 8), ("ankle", 4, 4, 6, 6)]
    {
        for k in 0..fractures {
            add(i, region, true, k < called);
            i += 1;
        }
        for k in 0..normals {
            add(i, region, false, k >= cleared);
            i += 1;
        }
    }
    db.record(&findings).await.unwrap();
    db.record_labels(&labels).await.unwrap();

    let cfg = fracture_audit::AuditConfig {
        dashboard_addr: "127.0.0.1:0".into(),
        ..Default::default()
    };
    let addr = fracture_audit::serve_dashboard(&cfg, db.clone())
        .await
        .unwrap();
    let bin = chromium_bin().await;
    let dom = chromium(&bin, &["--dump-dom", &format!("http://{addr}/")]).await;
    let wilson = |k: u64, n: u64| {
        let (lo, hi) = fracture_audit::evaluate::wilson(k, n).unwrap();
        Some(Estimate {
            value: k as f64 / n as f64,
            lo,
            hi,
        })
    };
    assert_eq!(cell(&dom, "wrist", "n"), "20");
    assert_eq!(
        cell(&dom, "wrist", "sensitivity"),
        expected_cell("sensitivity", wilson(9, 10))
    );
    assert_eq!(
        cell(&dom, "wrist", "specificity"),
        expected_cell("specificity", wilson(8, 10))
    );
    assert_eq!(
        cell(&dom, "ankle", "sensitivity"),
        expected_cell("sensitivity", wilson(4, 4))
    );
    assert!(
        cell(&dom, "ankle", "auc").starts_with("1.000"),
        "{}",
        cell(&dom, "ankle", "auc")
    );
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-db.png");
    chromium(
        &bin,
        &[
            "--screenshot=".to_string() + &shot.display().to_string(),
            "--window-size=1400,1000".into(),
            format!("http://{addr}/"),
        ]
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
    )
    .await;
    println!("screenshot: {}", shot.display());
}
