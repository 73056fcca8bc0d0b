//! The STOW-RS endpoint (PS3.18 10.5): `POST /studies` and `POST /studies/{study}` with
//! `multipart/related; type="application/dicom"`. The request body is spooled as it arrives and
//! mapped (not held on the heap); each part is spooled, ingested and published
//! like a C-STORE; the request is answered only after its messages are committed.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::header::{
    ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use dicom_dictionary_std::tags;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, Notify, Semaphore};

use fracture_shared::bus::{BusError, OutRecord, Producer};
use fracture_shared::messages::{decode, DeadLetter, ErrorKind};
use fracture_shared::stage::Shutdown;

use super::multipart::{self, MediaType};
use super::{is_uid, prepare_spool, with_preamble, DicomwebConfig, SettingError};
use crate::scp::STORAGE_CLASSES;
use crate::{Ingest, Input, Outcome};

/// FailureReason values (PS3.4 Annex B.2.3 and GG.4, as PS3.18 10.5.3 uses them).
pub mod reason {
    /// Could not store or publish now; send it again later.
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// The object does not match its SOP class, or not the study of the request URL.
    pub const DATA_SET_MISMATCH: u16 = 0xA900;
    /// Unreadable, or not a DICOM object.
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
    /// A SOP class we do not store (we read CR and DX radiographs only).
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
}

/// Seconds a client is asked to wait after a 503.
const RETRY_AFTER_S: u64 = 30;

struct Context {
    ingest: Arc<Ingest>,
    producer: Arc<Mutex<Box<dyn Producer>>>,
    spool: PathBuf,
    token: Option<String>,
    max_bytes: u64,
    body_idle: std::time::Duration,
    slots: Arc<Semaphore>,
    fatal: AtomicBool,
    fatal_notify: Notify,
}

/// Binds `cfg.stow_listen` and serves until `shutdown` (see [`serve_stow_on`]).
pub async fn serve_stow(
    cfg: &DicomwebConfig,
    ingest: Arc<Ingest>,
    producer: Arc<Mutex<Box<dyn Producer>>>,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(&cfg.stow_listen).await?;
    serve_stow_on(listener, cfg, ingest, producer, shutdown).await
}

/// Serves STOW-RS on `listener` (`cfg.stow_listen` is not used) until `shutdown` is set, then
/// finishes the requests in hand. Returns an error if the bus failed fatally (the producer was
/// fenced), or if the token file cannot be read.
pub async fn serve_stow_on(
    listener: TcpListener,
    cfg: &DicomwebConfig,
    ingest: Arc<Ingest>,
    producer: Arc<Mutex<Box<dyn Producer>>>,
    mut shutdown: Shutdown,
) -> std::io::Result<()> {
    let token = read_token(cfg).map_err(|e| std::io::Error::other(e.0))?;
    fracture_shared::http::loopback_unless_guarded(
        listener.local_addr()?,
        token.is_some(),
        "STOW-RS",
        "set ingest.dicomweb.stow_token_file so senders must present it",
    )?;
    let spool = cfg.spool_dir();
    prepare_spool(&spool, "stow-")?;
    let ctx = Arc::new(Context {
        ingest,
        producer,
        spool,
        token,
        max_bytes: cfg.stow_max_bytes,
        body_idle: std::time::Duration::from_secs(cfg.stow_idle_timeout_s.max(1)),
        slots: Arc::new(Semaphore::new(cfg.stow_max_requests.max(1))),
        fatal: AtomicBool::new(false),
        fatal_notify: Notify::new(),
    });
    let app = Router::new()
        .route("/studies", post(store_any))
        .route("/studies/{study}", post(store_study))
        .with_state(ctx.clone());
    tracing::info!(listen = %listener.local_addr()?, authenticated = ctx.token.is_some(), max_requests = cfg.stow_max_requests, "STOW-RS listening");
    let stopping = ctx.clone();
    fracture_shared::http::serve(listener, app, async move {
        tokio::select! {
            _ = shutdown.wait() => {}
            _ = stopping.fatal_notify.notified() => {}
        }
    })
    .await?;
    if ctx.fatal.load(Ordering::SeqCst) {
        return Err(std::io::Error::other(
            "the bus failed fatally (another instance took over?); restart the STOW-RS endpoint",
        ));
    }
    tracing::info!("STOW-RS stopped");
    Ok(())
}

fn read_token(cfg: &DicomwebConfig) -> Result<Option<String>, SettingError> {
    let file = cfg.stow_token_file.trim();
    if file.is_empty() {
        return Ok(None);
    }
    let token = std::fs::read_to_string(file)
        .map_err(|e| {
            SettingError(format!(
                "cannot read ingest.dicomweb.stow_token_file {file} ({e})"
            ))
        })?
        .trim()
        .to_string();
    if token.len() < 16 {
        return Err(SettingError(format!(
            "ingest.dicomweb.stow_token_file {file} holds a token shorter than 16 characters; make one with `head -c 24 /dev/urandom | base64 > {file}`"
        )));
    }
    Ok(Some(token))
}

async fn store_any(State(ctx): State<Arc<Context>>, request: Request) -> Response {
    store(ctx, None, request).await
}

async fn store_study(
    State(ctx): State<Arc<Context>>,
    UrlPath(study): UrlPath<String>,
    request: Request,
) -> Response {
    store(ctx, Some(study), request).await
}

/// One part's fate, for the response.
#[derive(Debug, Clone)]
struct PartAnswer {
    class: Option<String>,
    instance: Option<String>,
    /// `None`: stored and published.
    failure: Option<u16>,
    /// Its message (a radiograph or a dead letter) in this request's transaction.
    record: Option<usize>,
}

async fn store(ctx: Arc<Context>, study: Option<String>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    if let Some(token) = &ctx.token {
        if !bearer_matches(&parts.headers, token) {
            return plain(StatusCode::UNAUTHORIZED, "a valid bearer token is required")
                .with_header(WWW_AUTHENTICATE, "Bearer realm=\"fracture-stow\"");
        }
    }
    if study.as_deref().is_some_and(|s| !is_uid(s)) {
        return plain(StatusCode::BAD_REQUEST, "the study in the URL is not a UID");
    }
    let media = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(MediaType::parse);
    let boundary = match &media {
        Some(m)
            if m.essence == "multipart/related"
                && m.param("type").is_none_or(|t| t.eq_ignore_ascii_case("application/dicom")) =>
        {
            match m.param("boundary") {
                Some(b) => b.to_string(),
                None => return plain(StatusCode::BAD_REQUEST, "multipart/related without a boundary parameter"),
            }
        }
        _ => {
            return plain(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "send multipart/related; type=\"application/dicom\" (PS3.10 files; metadata and bulk data requests are not supported)",
            )
        }
    };
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > ctx.max_bytes) {
        return too_large(ctx.max_bytes);
    }
    // The permit is taken before the body is read, so a full server answers at once.
    let Ok(_slot) = ctx.slots.clone().try_acquire_owned() else {
        tracing::warn!("STOW-RS request limit reached, answering 503");
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many requests in progress; retry later",
        )
        .with_header(RETRY_AFTER, &RETRY_AFTER_S.to_string());
    };
    let body = match receive_body(&ctx, body).await {
        Ok(b) => b,
        Err(BodyRefused::TooLarge) => return too_large(ctx.max_bytes),
        Err(BodyRefused::Unreadable) => {
            return plain(
                StatusCode::BAD_REQUEST,
                "the request body could not be read",
            )
        }
        Err(BodyRefused::Stalled) => {
            tracing::warn!("a STOW-RS body stalled, answering 408");
            return plain(
                StatusCode::REQUEST_TIMEOUT,
                &format!(
                    "the request body stopped arriving for {} s; send it again",
                    ctx.body_idle.as_secs()
                ),
            );
        }
        Err(BodyRefused::Spool(e)) => {
            tracing::error!(error = %e, spool = %ctx.spool.display(), "cannot spool a STOW-RS request");
            return plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot spool the request now; retry later",
            )
            .with_header(RETRY_AFTER, &RETRY_AFTER_S.to_string());
        }
    };
    let body_parts = match multipart::parse(&body, &boundary) {
        Ok(p) if !p.is_empty() => p,
        Ok(_) => return plain(StatusCode::BAD_REQUEST, "the request holds no parts"),
        Err(e) => return plain(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let xml = wants_xml(&parts.headers);
    let mut answers: Vec<PartAnswer> = Vec::with_capacity(body_parts.len());
    let mut records: Vec<OutRecord> = Vec::new();
    let mut outage = false;
    for part in &body_parts {
        if outage {
            // The store failed a moment ago: the rest would fail too, and the client resends.
            let ids = peek(&part.body);
            answers.push(PartAnswer {
                class: ids.class,
                instance: ids.instance,
                failure: Some(reason::OUT_OF_RESOURCES),
                record: None,
            });
            continue;
        }
        let answer = store_part(&ctx, study.as_deref(), part, &mut records).await;
        outage = answer.failure == Some(reason::OUT_OF_RESOURCES);
        answers.push(answer);
    }
    if !records.is_empty() {
        let sent = crate::publish_from_door(
            &ctx.ingest.retry,
            "STOW-RS transaction did not land",
            &ctx.producer,
            records,
        )
        .await;
        if let Err(e) = sent {
            if matches!(e, BusError::Fatal(_)) {
                ctx.fatal.store(true, Ordering::SeqCst);
                ctx.fatal_notify.notify_one();
            }
            tracing::error!(error = %e, "cannot publish a STOW-RS request; the client will retry");
            outage = true;
            for a in answers.iter_mut().filter(|a| a.record.is_some()) {
                a.failure = Some(reason::OUT_OF_RESOURCES);
                a.record = None;
            }
        }
    }
    let stored = answers.iter().filter(|a| a.failure.is_none()).count();
    let failed = answers.len() - stored;
    let status = match (stored, failed) {
        (_, 0) => StatusCode::OK,
        (s, _) if s > 0 => StatusCode::ACCEPTED,
        _ if outage => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::CONFLICT,
    };
    tracing::info!(
        parts = answers.len(),
        stored,
        failed,
        status = status.as_u16(),
        "STOW-RS request answered"
    );
    let (content_type, text) = if xml {
        ("application/dicom+xml", response_xml(&answers))
    } else {
        (
            "application/dicom+json",
            response_json(&answers).to_string(),
        )
    };
    let mut response = Response::builder()
        .status(status)
        .header(CONTENT_TYPE, content_type);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response = response.header(RETRY_AFTER, RETRY_AFTER_S.to_string());
    }
    response.body(Body::from(text)).unwrap_or_else(|_| {
        plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot build the response",
        )
    })
}

/// Checks, spools, ingests one part; its message (if any) joins `records`.
async fn store_part(
    ctx: &Context,
    study: Option<&str>,
    part: &multipart::Part,
    records: &mut Vec<OutRecord>,
) -> PartAnswer {
    let ids = peek(&part.body);
    let fail = |code: u16| PartAnswer {
        class: ids.class.clone(),
        instance: ids.instance.clone(),
        failure: Some(code),
        record: None,
    };
    if part
        .content_type()
        .is_some_and(|t| t.essence != "application/dicom")
    {
        return fail(reason::CANNOT_UNDERSTAND);
    }
    if let (Some(wanted), Some(got)) = (study, ids.study.as_deref()) {
        if wanted != got {
            return fail(reason::DATA_SET_MISMATCH);
        }
    }
    // A class we never read is refused before anything is kept or published, as the C-STORE
    // door refuses its presentation context.
    if ids
        .class
        .as_deref()
        .is_some_and(|c| !STORAGE_CLASSES.contains(&c))
    {
        return fail(reason::SOP_CLASS_NOT_SUPPORTED);
    }
    let path = match spool(ctx, part.body.clone()).await {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, spool = %ctx.spool.display(), "cannot write a STOW-RS spool file");
            return fail(reason::OUT_OF_RESOURCES);
        }
    };
    let claim = crate::spool::SpoolClaim::acquire(path.clone()).await;
    let (outcome, record, _) = ctx.ingest.process(&Input::File(path.clone())).await;
    if let Err(e) = std::fs::remove_file(&path) {
        // A leftover holds PHI; the next start sweeps it.
        tracing::error!(error = %e, file = %path.display(), "cannot remove a STOW-RS spool file");
    }
    drop(claim);
    let Some(record) = record else {
        return fail(reason::CANNOT_UNDERSTAND);
    };
    tracing::debug!(input = %ctx.ingest.input_id(&path), outcome = ?outcome, "STOW-RS part ingested");
    let failure = match outcome {
        Outcome::Produced => None,
        _ => {
            let letter = decode::<DeadLetter>(&record.payload).ok();
            let (kind, why) = letter
                .map(|l| (l.kind, l.reason))
                .unwrap_or((ErrorKind::Data, String::new()));
            if kind == ErrorKind::External {
                // The store or the linkage table failed, not the object: nothing is published
                // and the client sends it again.
                tracing::warn!(reason = %why, "cannot ingest now, asking the STOW-RS client to retry");
                return fail(reason::OUT_OF_RESOURCES);
            }
            Some(if why.starts_with("not a radiograph") {
                reason::DATA_SET_MISMATCH
            } else {
                reason::CANNOT_UNDERSTAND
            })
        }
    };
    records.push(record);
    PartAnswer {
        class: ids.class,
        instance: ids.instance,
        failure,
        record: Some(records.len() - 1),
    }
}

/// Why a request body was not received.
enum BodyRefused {
    TooLarge,
    Unreadable,
    Stalled,
    Spool(std::io::Error),
}

/// Receives the request body into a file in the spool as it arrives (one frame in memory at a
/// time, never more than `stow_max_bytes`), then maps the file: the parts are slices of the
/// mapping, read from the page cache, not copies on the heap. The file is unlinked as soon as
/// it is mapped (the mapping keeps it readable), so nothing stays behind.
async fn receive_body(ctx: &Context, body: Body) -> Result<Bytes, BodyRefused> {
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;
    let temp = ctx.spool.join(format!(
        ".stow-request-{}-{}.part",
        std::process::id(),
        SPOOL_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let received = async {
        // Read as well as write: the file is mapped for reading once complete.
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&temp)
            .await
            .map_err(BodyRefused::Spool)?;
        let mut w = tokio::io::BufWriter::with_capacity(256 * 1024, file);
        let mut body = body;
        let mut total: u64 = 0;
        loop {
            // A sender that stalls mid-body would hold a request slot for good.
            let frame = match tokio::time::timeout(ctx.body_idle, body.frame()).await {
                Err(_) => return Err(BodyRefused::Stalled),
                Ok(None) => break,
                Ok(Some(frame)) => frame,
            };
            let frame = frame.map_err(|_| BodyRefused::Unreadable)?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            total += data.len() as u64;
            if total > ctx.max_bytes {
                return Err(BodyRefused::TooLarge);
            }
            w.write_all(&data).await.map_err(BodyRefused::Spool)?;
        }
        w.flush().await.map_err(BodyRefused::Spool)?;
        let file = w.into_inner().into_std().await;
        if total == 0 {
            return Ok(Bytes::new());
        }
        // SAFETY: the file is this request's own, in the spool folder (mode 0700), and nothing
        // writes to it once mapped; it is unlinked below, so no other process opens it by name.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(BodyRefused::Spool)?;
        Ok(Bytes::from_owner(map))
    }
    .await;
    if let Err(e) = tokio::fs::remove_file(&temp).await {
        if e.kind() != std::io::ErrorKind::NotFound {
            // A leftover holds PHI; the next start sweeps the spool.
            tracing::error!(error = %e, "cannot remove a spooled STOW-RS request");
        }
    }
    received
}

static SPOOL_SEQ: AtomicU64 = AtomicU64::new(0);

/// Writes a part to `<spool>/stow-<sha256>.dcm` (fsynced, via a temporary name), so the same
/// object sent twice has the same input reference.
async fn spool(ctx: &Context, object: Bytes) -> std::io::Result<PathBuf> {
    let dir = ctx.spool.clone();
    tokio::task::spawn_blocking(move || {
        let bytes = with_preamble(&object);
        let name = format!("stow-{}.dcm", hex::encode(Sha256::digest(&bytes)));
        let temp = dir.join(format!(
            ".stow-{}-{}.part",
            std::process::id(),
            SPOOL_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let written = (|| {
            let mut f = std::fs::File::create(&temp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&temp, dir.join(&name))
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temp);
            return Err(e);
        }
        Ok(dir.join(name))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// What a part says it is, from its header (pixel data not read). Values are checked UIDs.
#[derive(Debug, Default, Clone)]
struct Ids {
    class: Option<String>,
    instance: Option<String>,
    study: Option<String>,
}

fn peek(bytes: &[u8]) -> Ids {
    let body = if bytes.len() >= 132 && &bytes[128..132] == b"DICM" {
        &bytes[128..]
    } else if bytes.starts_with(b"DICM") {
        bytes
    } else {
        return Ids::default();
    };
    if fracture_shared::gate::check_part10(body).is_err() {
        // Nothing is read from it here; ingest refuses it with the reason.
        return Ids::default();
    }
    let Ok(obj) = dicom_object::OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Never)
        .read_until(tags::PIXEL_DATA)
        .from_reader(std::io::Cursor::new(body))
    else {
        return Ids::default();
    };
    let text = |tag| {
        obj.element(tag)
            .ok()
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_end_matches(['\0', ' ']).trim().to_string())
            .filter(|s| is_uid(s))
    };
    let meta_uid =
        |s: &str| Some(s.trim_end_matches(['\0', ' ']).to_string()).filter(|s| is_uid(s));
    Ids {
        class: text(tags::SOP_CLASS_UID)
            .or_else(|| meta_uid(obj.meta().media_storage_sop_class_uid())),
        instance: text(tags::SOP_INSTANCE_UID)
            .or_else(|| meta_uid(obj.meta().media_storage_sop_instance_uid())),
        study: text(tags::STUDY_INSTANCE_UID),
    }
}

fn bearer_matches(headers: &HeaderMap, token: &str) -> bool {
    let Some(value) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some((scheme, given)) = value.trim().split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer")
        && constant_time_eq(given.trim().as_bytes(), token.as_bytes())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn wants_xml(headers: &HeaderMap) -> bool {
    let accept = headers
        .get(ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    accept.contains("application/dicom+xml") && !accept.contains("application/dicom+json")
}

/// The Store Instances Response Module (PS3.18 Table 10.5.3-3) in the DICOM JSON model.
fn response_json(answers: &[PartAnswer]) -> Value {
    let item = |a: &PartAnswer| {
        let mut m = Map::new();
        let uid = |v: &Option<String>| match v {
            Some(u) => json!({"vr": "UI", "Value": [u]}),
            None => json!({"vr": "UI"}),
        };
        m.insert("00081150".into(), uid(&a.class));
        m.insert("00081155".into(), uid(&a.instance));
        if let Some(r) = a.failure {
            m.insert("00081197".into(), json!({"vr": "US", "Value": [r]}));
        }
        Value::Object(m)
    };
    let mut top = Map::new();
    let failed: Vec<Value> = answers
        .iter()
        .filter(|a| a.failure.is_some())
        .map(item)
        .collect();
    let stored: Vec<Value> = answers
        .iter()
        .filter(|a| a.failure.is_none())
        .map(item)
        .collect();
    if !failed.is_empty() {
        top.insert("00081198".into(), json!({"vr": "SQ", "Value": failed}));
    }
    if !stored.is_empty() {
        top.insert("00081199".into(), json!({"vr": "SQ", "Value": stored}));
    }
    Value::Object(top)
}

/// The same in the Native DICOM Model (PS3.19), for clients that accept only XML.
fn response_xml(answers: &[PartAnswer]) -> String {
    fn attr(tag: &str, vr: &str, keyword: &str, value: Option<&str>) -> String {
        match value {
            Some(v) => format!(
                "<DicomAttribute tag=\"{tag}\" vr=\"{vr}\" keyword=\"{keyword}\"><Value number=\"1\">{v}</Value></DicomAttribute>"
            ),
            None => format!("<DicomAttribute tag=\"{tag}\" vr=\"{vr}\" keyword=\"{keyword}\"/>"),
        }
    }
    let sequence = |tag: &str, keyword: &str, items: Vec<&PartAnswer>| {
        if items.is_empty() {
            return String::new();
        }
        let mut s = format!("<DicomAttribute tag=\"{tag}\" vr=\"SQ\" keyword=\"{keyword}\">");
        for (n, a) in items.iter().enumerate() {
            // UIDs were checked to be digits and dots: nothing to escape.
            s.push_str(&format!("<Item number=\"{}\">", n + 1));
            s.push_str(&attr(
                "00081150",
                "UI",
                "ReferencedSOPClassUID",
                a.class.as_deref(),
            ));
            s.push_str(&attr(
                "00081155",
                "UI",
                "ReferencedSOPInstanceUID",
                a.instance.as_deref(),
            ));
            if let Some(r) = a.failure {
                s.push_str(&attr(
                    "00081197",
                    "US",
                    "FailureReason",
                    Some(&r.to_string()),
                ));
            }
            s.push_str("</Item>");
        }
        s.push_str("</DicomAttribute>");
        s
    };
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<NativeDicomModel xmlns=\"http://dicom.nema.org/PS3.19/models/NativeDICOM\">{}{}</NativeDicomModel>\n",
        sequence(
            "00081198",
            "FailedSOPSequence",
            answers.iter().filter(|a| a.failure.is_some()).collect()
        ),
        sequence(
            "00081199",
            "ReferencedSOPSequence",
            answers.iter().filter(|a| a.failure.is_none()).collect()
        ),
    )
}

fn plain(status: StatusCode, why: &str) -> Response {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::from(format!("{why}\n")))
        .unwrap_or_default()
}

fn too_large(max: u64) -> Response {
    plain(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("the request is larger than {max} bytes; send fewer instances per request"),
    )
}

trait WithHeader {
    fn with_header(self, name: axum::http::HeaderName, value: &str) -> Self;
}

impl WithHeader for Response {
    fn with_header(mut self, name: axum::http::HeaderName, value: &str) -> Self {
        if let Ok(v) = value.parse() {
            self.headers_mut().insert(name, v);
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answers() -> Vec<PartAnswer> {
        vec![
            PartAnswer {
                class: Some("1.2.840.10008.5.1.4.1.1.1".into()),
                instance: Some("1.2.3".into()),
                failure: None,
                record: Some(0),
            },
            PartAnswer {
                class: None,
                instance: None,
                failure: Some(reason::CANNOT_UNDERSTAND),
                record: Some(1),
            },
        ]
    }

    #[test]
    fn the_json_response_lists_stored_and_failed_instances() {
        let v = response_json(&answers());
        assert_eq!(v["00081199"]["Value"][0]["00081155"]["Value"][0], "1.2.3");
        assert_eq!(v["00081198"]["Value"][0]["00081197"]["Value"][0], 0xC000);
        assert!(v["00081198"]["Value"][0]["00081155"].get("Value").is_none());
    }

    #[test]
    fn the_xml_response_is_the_native_model() {
        let x = response_xml(&answers());
        assert!(x.contains("keyword=\"ReferencedSOPSequence\""));
        assert!(x.contains("<Value number=\"1\">49152</Value>"));
        assert!(x.starts_with("<?xml"));
    }

    #[test]
    fn bearer_tokens_compare_whole() {
        let mut h = HeaderMap::new();
        h.insert(
            AUTHORIZATION,
            "Bearer s3cret-token-0123456".parse().expect("a value"),
        );
        assert!(bearer_matches(&h, "s3cret-token-0123456"));
        assert!(!bearer_matches(&h, "s3cret-token-012345"));
        h.insert(
            AUTHORIZATION,
            "Basic s3cret-token-0123456".parse().expect("a value"),
        );
        assert!(!bearer_matches(&h, "s3cret-token-0123456"));
    }
}
