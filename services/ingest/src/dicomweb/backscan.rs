//! The back-scan of a PACS: QIDO-RS finds the studies (by modality and study date), their series
//! and instances; WADO-RS retrieves each radiograph as stored; each is spooled, ingested and
//! published in transactions, and a resumed scan skips what an earlier run published.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use hyper::header::{CONTENT_TYPE, RETRY_AFTER, WARNING};
use serde_json::{Map, Value};

use fracture_shared::bus::{BusError, OutRecord, Producer};
use fracture_shared::retry::sleep_unless_stopped;
use fracture_shared::stage::Shutdown;
use fracture_shared::RetryPolicy;

use super::http::{auth_header, tls_connector, Client, Endpoint, HttpError, Reply};
use super::multipart::{self, MediaType};
use super::{is_uid, prepare_spool, with_preamble, DicomwebConfig, SettingError};
use crate::scp::STORAGE_CLASSES;
use crate::{Ingest, IngestReport, Input, Outcome};

/// What a back-scan found and did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ScanReport {
    /// Studies that matched the modality and date filters.
    pub studies: u64,
    /// Series of the wanted modalities in them.
    pub series: u64,
    /// Radiograph instances listed in those series (each retrieved, or resumed).
    pub instances: u64,
    /// Instances not retrieved because their SOP class is not CR or DX (or their listing was
    /// unusable).
    pub filtered: u64,
    /// What became of the instances, as for a folder.
    pub ingest: IngestReport,
    /// False when the scan stopped early (shutdown); the next run resumes it.
    pub complete: bool,
}

/// Why a back-scan stopped with nothing more it could do by itself. No message holds a URL or
/// a UID.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error(transparent)]
    Config(#[from] SettingError),
    #[error("the PACS refused the back-scan (HTTP {0}); check ingest.dicomweb.auth_header_file and the PACS's access rules")]
    Refused(u16),
    /// The TLS handshake failed for a reason waiting will not cure (e.g. an untrusted
    /// certificate); the message says what to set.
    #[error("{0}")]
    Tls(String),
    #[error("{0}")]
    Pacs(String),
    #[error("cannot use the spool folder {0}: {1}")]
    Spool(PathBuf, String),
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// How a step ended without a result.
enum Halt {
    Stop,
    Err(ScanError),
}

impl From<ScanError> for Halt {
    fn from(e: ScanError) -> Self {
        Halt::Err(e)
    }
}

/// Retrieval as stored (no transcoding: preprocess decodes every syntax we accept), and the
/// plain form for a server that refuses `transfer-syntax=*`.
const ACCEPT_AS_STORED: &str = "multipart/related; type=\"application/dicom\"; transfer-syntax=*";
const ACCEPT_DEFAULT: &str = "multipart/related; type=\"application/dicom\"";
const DICOM_JSON: &str = "application/dicom+json";
/// A QIDO-RS page larger than this is refused (lower page_size).
const MAX_QIDO_BYTES: u64 = 64 << 20;
/// Server errors (500, 502, 504) on one request before it is given up; busy answers (503, 429)
/// and unreachable servers are waited out for as long as it takes.
const SERVER_ERROR_ATTEMPTS: u32 = 5;

const STUDY_UID: &str = "0020000D";
const SERIES_UID: &str = "0020000E";
const SOP_INSTANCE_UID: &str = "00080018";
const SOP_CLASS_UID: &str = "00080016";
const MODALITY: &str = "00080060";

struct Scanner<'a> {
    cfg: &'a DicomwebConfig,
    client: Client,
    stop: Option<&'a Shutdown>,
    retry: RetryPolicy,
    as_stored: bool,
}

/// Scans the PACS at `cfg.url`: every instance of a CR or DX storage class in the series of
/// `cfg.modalities` in the studies that match `cfg.study_dates`, `batch` inputs per
/// transaction. Instances whose reference is in `done` (see [`instance_input`]) are skipped.
/// When `stop` is set it publishes what it has and returns (`complete: false`).
pub async fn back_scan(
    cfg: &DicomwebConfig,
    ingest: &Ingest,
    producer: &mut dyn Producer,
    batch: usize,
    done: &HashSet<String>,
    stop: Option<&Shutdown>,
    mut progress: impl FnMut(Outcome, u64),
) -> Result<ScanReport, ScanError> {
    cfg.validate_scan()?;
    let endpoint = Endpoint::parse(&cfg.url)?;
    let auth = if cfg.auth_header_file.trim().is_empty() {
        None
    } else {
        let text = std::fs::read_to_string(cfg.auth_header_file.trim()).map_err(|e| {
            SettingError(format!(
                "cannot read ingest.dicomweb.auth_header_file {} ({e})",
                cfg.auth_header_file
            ))
        })?;
        Some(
            auth_header(&text)
                .map_err(|e| SettingError(format!("ingest.dicomweb.auth_header_file: {e}")))?,
        )
    };
    let tls = if endpoint.https {
        Some(tls_connector(&cfg.ca_file)?)
    } else if !cfg.ca_file.trim().is_empty() {
        return Err(SettingError(
            "ingest.dicomweb.ca_file is set but ingest.dicomweb.url is http://; use the PACS's https:// URL (or leave ca_file empty)".into(),
        )
        .into());
    } else {
        None
    };
    let spool = cfg.spool_dir();
    prepare_spool(&spool, "dw-").map_err(|e| ScanError::Spool(spool.clone(), e.to_string()))?;
    tracing::info!(pacs = %endpoint.authority, modalities = ?cfg.modalities, dated = !cfg.study_dates.is_empty(), "DICOMweb back-scan starting");
    let mut scanner = Scanner {
        cfg,
        client: Client::new(endpoint, auth, cfg.timeout(), tls),
        stop,
        retry: ingest.retry,
        as_stored: true,
    };
    let mut report = ScanReport::default();
    let mut pending: Vec<OutRecord> = Vec::new();
    let result = scanner
        .run(
            ingest,
            producer,
            batch,
            done,
            &mut report,
            &mut pending,
            &mut progress,
        )
        .await;
    // What was ingested is published whatever ended the scan, so it is never fetched twice.
    if !pending.is_empty() {
        send(&ingest.retry, producer, pending).await?;
    }
    match result {
        Ok(()) => report.complete = true,
        Err(Halt::Stop) => {}
        Err(Halt::Err(e)) => return Err(e),
    }
    tracing::info!(
        studies = report.studies,
        series = report.series,
        instances = report.instances,
        filtered = report.filtered,
        produced = report.ingest.produced,
        dead_letters = report.ingest.dead_lettered,
        resumed = report.ingest.resumed,
        complete = report.complete,
        "DICOMweb back-scan finished"
    );
    Ok(report)
}

/// Where one PACS instance comes from: `dicomweb:<url>/studies/<s>/series/<r>/instances/<i>` (the
/// URL without a trailing slash). The linkage table records it as the input's source.
pub fn instance_reference(
    cfg: &DicomwebConfig,
    study: &str,
    series: &str,
    instance: &str,
) -> String {
    format!(
        "dicomweb:{}/studies/{study}/series/{series}/instances/{instance}",
        cfg.url.trim().trim_end_matches('/')
    )
}

/// The spool file and pseudonymous input reference of one PACS instance. The reference derives
/// from [`instance_reference`] only: stable for a key and a PACS URL whatever the spool folder,
/// so a resumed scan recognises what it published.
pub fn instance_input(
    ingest: &Ingest,
    cfg: &DicomwebConfig,
    study: &str,
    series: &str,
    instance: &str,
) -> (PathBuf, String) {
    let reference = instance_reference(cfg, study, series, instance);
    spool_and_input(ingest, cfg, &reference)
}

fn spool_and_input(ingest: &Ingest, cfg: &DicomwebConfig, reference: &str) -> (PathBuf, String) {
    let path = cfg.spool_dir().join(format!(
        "dw-{}.dcm",
        ingest.policy.pseudonym("dicomweb", reference)
    ));
    let input = format!("in-{}", ingest.policy.pseudonym("input", reference));
    (path, input)
}

impl Scanner<'_> {
    #[allow(clippy::too_many_arguments)]
    async fn run(
        &mut self,
        ingest: &Ingest,
        producer: &mut dyn Producer,
        batch: usize,
        done: &HashSet<String>,
        report: &mut ScanReport,
        pending: &mut Vec<OutRecord>,
        progress: &mut impl FnMut(Outcome, u64),
    ) -> Result<(), Halt> {
        let studies = self.studies().await?;
        report.studies = studies.len() as u64;
        tracing::info!(studies = studies.len(), "DICOMweb back-scan found studies");
        let mut seen: HashSet<String> = HashSet::new();
        for study in &studies {
            for series in self.series(study).await? {
                report.series += 1;
                for (instance, class) in self.instances(study, &series).await? {
                    if class
                        .as_deref()
                        .is_some_and(|c| !STORAGE_CLASSES.contains(&c))
                    {
                        report.filtered += 1;
                        continue;
                    }
                    report.instances += 1;
                    let reference = instance_reference(self.cfg, study, &series, &instance);
                    let (path, input) = spool_and_input(ingest, self.cfg, &reference);
                    if done.contains(&input) || !seen.insert(input.clone()) {
                        report.ingest.resumed += 1;
                        progress(Outcome::Resumed, 0);
                        continue;
                    }
                    let item = match self.retrieve(study, &series, &instance).await? {
                        Ok(object) => {
                            write_spool(&path, &object).await?;
                            Input::File(path.clone())
                        }
                        Err(reason) => Input::Unreadable(path.clone(), reason),
                    };
                    let got = ingest
                        .process_retrying_as(&item, &input, &reference, self.stop)
                        .await;
                    if matches!(item, Input::File(_)) {
                        if let Err(e) = tokio::fs::remove_file(&path).await {
                            // A leftover holds PHI; the next start sweeps it.
                            tracing::error!(error = %e, spool = %path.display(), "cannot remove a spool file");
                        }
                    }
                    let Some((outcome, record, bytes)) = got else {
                        return Err(Halt::Stop);
                    };
                    tracing::debug!(input = %input, outcome = ?outcome, "DICOMweb instance ingested");
                    match outcome {
                        Outcome::Produced => report.ingest.produced += 1,
                        Outcome::DeadLettered => report.ingest.dead_lettered += 1,
                        Outcome::Skipped => report.ingest.skipped += 1,
                        Outcome::Resumed => report.ingest.resumed += 1,
                    }
                    if matches!(outcome, Outcome::Produced | Outcome::DeadLettered) {
                        report.ingest.inputs += 1;
                    }
                    report.ingest.bytes += bytes;
                    pending.extend(record);
                    progress(outcome, bytes);
                    if pending.len() >= batch.max(1) {
                        send(&ingest.retry, producer, std::mem::take(pending)).await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Study UIDs matching a wanted modality and the date range.
    ///
    /// Offset paging is where servers differ most (some cap results, some ignore `offset`,
    /// Orthanc 1.10 pages filtered queries wrongly), so nothing here depends on it while it can
    /// be avoided: a query that fills a page is split by study date, a day that fills one by
    /// study time, and only a single second that still fills a page is paged with offset.
    async fn studies(&mut self) -> Result<Vec<String>, Halt> {
        let mut found = Found::default();
        // One query per modality: servers disagree on multi-valued ModalitiesInStudy.
        for modality in self.cfg.modalities.clone() {
            let configured = Some(self.cfg.study_dates.clone()).filter(|d| !d.is_empty());
            let full = self
                .study_page(&modality, configured.as_deref(), None, 0, &mut found)
                .await?;
            if !full {
                continue;
            }
            tracing::info!(
                page_size = self.cfg.page_size,
                "more studies match than one page holds; listing them by study date"
            );
            if configured.is_none() {
                tracing::warn!("studies without a StudyDate are not listed once the archive holds more than one page of them; set ingest.dicomweb.study_dates to scan in date ranges knowingly");
            }
            let (first, last) = day_bounds(&self.cfg.study_dates);
            let mut days = vec![(first, last)];
            while let Some((a, b)) = days.pop() {
                let range = date_range(a, b);
                if !self
                    .study_page(&modality, Some(&range), None, 0, &mut found)
                    .await?
                {
                    continue;
                }
                if a < b {
                    let mid = a + (b - a) / 2;
                    days.push((mid + 1, b));
                    days.push((a, mid));
                    continue;
                }
                self.studies_of_day(&modality, &range, &mut found).await?;
            }
        }
        Ok(found.uids)
    }

    /// A day that fills a page: split by StudyTime down to the second; a second that still
    /// fills a page is paged with offset (whatever the server does right, the union holds).
    async fn studies_of_day(
        &mut self,
        modality: &str,
        day: &str,
        found: &mut Found,
    ) -> Result<(), Halt> {
        let mut seconds = vec![(0u32, 86_399u32)];
        while let Some((a, b)) = seconds.pop() {
            let range = format!("{}-{}.999999", hhmmss(a), hhmmss(b));
            if !self
                .study_page(modality, Some(day), Some(&range), 0, found)
                .await?
            {
                continue;
            }
            if a < b {
                let mid = a + (b - a) / 2;
                seconds.push((mid + 1, b));
                seconds.push((a, mid));
                continue;
            }
            let mut offset = 0;
            loop {
                offset += self.cfg.page_size.max(1);
                let before = found.uids.len();
                let full = self
                    .study_page(modality, Some(day), Some(&range), offset, found)
                    .await?;
                if !full || found.uids.len() == before {
                    break;
                }
            }
        }
        // Studies of that day without a StudyTime match no time range: page the whole day too.
        let mut offset = 0;
        loop {
            let before = found.uids.len();
            let full = self
                .study_page(modality, Some(day), None, offset, found)
                .await?;
            if !full || (offset > 0 && found.uids.len() == before) {
                return Ok(());
            }
            offset += self.cfg.page_size.max(1);
        }
    }

    /// One page of studies; adds the new ones to `found` and says whether the page was full
    /// (there may be more).
    async fn study_page(
        &mut self,
        modality: &str,
        dates: Option<&str>,
        times: Option<&str>,
        offset: usize,
        found: &mut Found,
    ) -> Result<bool, Halt> {
        let mut query = vec![("ModalitiesInStudy", modality)];
        if let Some(d) = dates {
            query.push(("StudyDate", d));
        }
        if let Some(t) = times {
            query.push(("StudyTime", t));
        }
        let (page, full) = self.qido_page("/studies", &query, offset).await?;
        for study in page {
            match uid_of(&study, STUDY_UID) {
                Some(uid) => {
                    if found.seen.insert(uid.clone()) {
                        found.uids.push(uid);
                    }
                }
                None => tracing::warn!(
                    "the PACS listed a study without a usable StudyInstanceUID; skipped"
                ),
            }
        }
        Ok(full)
    }

    /// Series UIDs of a study whose Modality is wanted (a series that does not say is kept:
    /// its instances' SOP classes decide).
    async fn series(&mut self, study: &str) -> Result<Vec<String>, Halt> {
        let listed = self
            .qido(&format!("/studies/{study}/series"), &[], SERIES_UID)
            .await?;
        Ok(listed
            .iter()
            .filter(|s| first_str(s, MODALITY).is_none_or(|m| self.cfg.modalities.contains(&m)))
            .filter_map(|s| uid_of(s, SERIES_UID))
            .collect())
    }

    /// (SOP Instance UID, SOP Class UID when listed) of a series' instances.
    async fn instances(
        &mut self,
        study: &str,
        series: &str,
    ) -> Result<Vec<(String, Option<String>)>, Halt> {
        let listed = self
            .qido(
                &format!("/studies/{study}/series/{series}/instances"),
                &[],
                SOP_INSTANCE_UID,
            )
            .await?;
        Ok(listed
            .iter()
            .filter_map(|i| Some((uid_of(i, SOP_INSTANCE_UID)?, first_str(i, SOP_CLASS_UID))))
            .collect())
    }

    /// Every result of a QIDO-RS query, page by page (limit/offset). `key` dedupes results a
    /// moving offset shows twice, and stops a server that ignores offset from looping.
    async fn qido(
        &mut self,
        path: &str,
        query: &[(&str, &str)],
        key: &str,
    ) -> Result<Vec<Map<String, Value>>, Halt> {
        let mut out = Vec::new();
        let mut keys = HashSet::new();
        let mut offset = 0usize;
        loop {
            let (page, full) = self.qido_page(path, query, offset).await?;
            let n = page.len();
            let mut fresh = 0;
            for obj in page {
                if first_str(&obj, key).is_none_or(|k| keys.insert(k)) {
                    fresh += 1;
                    out.push(obj);
                }
            }
            // A page that is not full is the last; so is one with nothing new (offset ignored)
            // or one larger than asked (limit ignored: it was everything).
            if !full || fresh == 0 || n > self.cfg.page_size {
                return Ok(out);
            }
            offset += n;
        }
    }

    /// One QIDO-RS page (`limit` = page_size) and whether it is full: as many results as
    /// asked, or a server warning that there are more.
    async fn qido_page(
        &mut self,
        path: &str,
        query: &[(&str, &str)],
        offset: usize,
    ) -> Result<(Vec<Map<String, Value>>, bool), Halt> {
        let page_size = self.cfg.page_size.max(1);
        let mut q: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
        q.push(format!("limit={page_size}"));
        if offset > 0 {
            q.push(format!("offset={offset}"));
        }
        let target = format!("{path}?{}", q.join("&"));
        let reply = match self.get(&target, DICOM_JSON, MAX_QIDO_BYTES).await? {
            Ok(r) => r,
            Err(limit) => {
                return Err(ScanError::Pacs(format!(
                    "a QIDO-RS answer is larger than {limit} bytes; lower ingest.dicomweb.page_size"
                ))
                .into())
            }
        };
        let page: Vec<Value> = match reply.status.as_u16() {
            200 => serde_json::from_slice(&reply.body).map_err(|_| {
                ScanError::Pacs(
                    "the PACS answered a QIDO-RS query with something other than a DICOM JSON array".into(),
                )
            })?,
            204 => Vec::new(),
            // A study deleted since it was listed has no series to list.
            404 if path != "/studies" => Vec::new(),
            s @ (401 | 403) => return Err(ScanError::Refused(s).into()),
            s => {
                return Err(ScanError::Pacs(format!(
                    "the PACS answered a QIDO-RS query with HTTP {s}; is ingest.dicomweb.url the DICOMweb root (e.g. http://pacs:8042/dicom-web)?"
                ))
                .into())
            }
        };
        // PS3.18 8.3.4.4: a server that returns fewer than it matched says so in a Warning.
        let more = reply
            .header(WARNING)
            .is_some_and(|w| w.to_ascii_lowercase().contains("additional results"));
        let full = page.len() >= page_size || more;
        let objects = page
            .into_iter()
            .filter_map(|v| match v {
                Value::Object(o) => Some(o),
                _ => None,
            })
            .collect();
        Ok((objects, full))
    }

    /// One instance as a PS3.10 stream, or why it cannot be had (the instance's own problem:
    /// it becomes a dead letter).
    async fn retrieve(
        &mut self,
        study: &str,
        series: &str,
        instance: &str,
    ) -> Result<Result<Bytes, String>, Halt> {
        let path = format!("/studies/{study}/series/{series}/instances/{instance}");
        loop {
            let accept = if self.as_stored {
                ACCEPT_AS_STORED
            } else {
                ACCEPT_DEFAULT
            };
            let reply = match self.get(&path, accept, self.cfg.max_object_bytes).await? {
                Ok(r) => r,
                Err(limit) => {
                    return Ok(Err(format!(
                    "the instance is larger than {limit} bytes (ingest.dicomweb.max_object_bytes)"
                )))
                }
            };
            return Ok(match reply.status.as_u16() {
                200 => dicom_part(&reply),
                406 | 415 if self.as_stored => {
                    tracing::warn!("the PACS cannot send instances as stored (transfer-syntax=*); asking for its default syntax");
                    self.as_stored = false;
                    continue;
                }
                404 | 410 => Err(format!(
                    "the PACS listed this instance but answered HTTP {} when it was retrieved; it may have been deleted",
                    reply.status.as_u16()
                )),
                s @ (401 | 403) => return Err(ScanError::Refused(s).into()),
                s => Err(format!(
                    "the PACS answered HTTP {s} when this instance was retrieved (WADO-RS)"
                )),
            });
        }
    }

    /// A GET that waits out an unreachable or busy PACS (until stopped) and retries server
    /// errors a few times; the final answer is returned whatever its status. `Err(limit)` when
    /// the body was too large.
    async fn get(
        &mut self,
        target: &str,
        accept: &str,
        max: u64,
    ) -> Result<Result<Reply, u64>, Halt> {
        let mut attempt = 0;
        let mut server_errors = 0;
        loop {
            attempt += 1;
            let delay = self.retry.backoff(attempt);
            if self.stop.is_some_and(Shutdown::is_set) {
                return Err(Halt::Stop);
            }
            let wait = match self.client.get(target, accept, max).await {
                Err(HttpError::TooLarge(n)) => return Ok(Err(n)),
                Err(HttpError::Tls(m)) => return Err(ScanError::Tls(m).into()),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "PACS unavailable, retrying");
                    delay
                }
                Ok(r) if matches!(r.status.as_u16(), 429 | 503) => {
                    let asked = r
                        .header(RETRY_AFTER)
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(|s| Duration::from_secs(s.min(300)));
                    let wait = asked.unwrap_or(delay);
                    tracing::warn!(
                        status = r.status.as_u16(),
                        retry_in_ms = wait.as_millis() as u64,
                        "PACS busy, retrying"
                    );
                    wait
                }
                Ok(r) if r.status.is_server_error() => {
                    server_errors += 1;
                    if server_errors >= SERVER_ERROR_ATTEMPTS {
                        return Ok(Ok(r));
                    }
                    tracing::warn!(
                        status = r.status.as_u16(),
                        retry_in_ms = delay.as_millis() as u64,
                        "PACS server error, retrying"
                    );
                    delay
                }
                Ok(r) => return Ok(Ok(r)),
            };
            self.sleep(wait).await?;
        }
    }

    async fn sleep(&self, d: Duration) -> Result<(), Halt> {
        if sleep_unless_stopped(d, self.stop).await {
            Ok(())
        } else {
            Err(Halt::Stop)
        }
    }
}

/// The first `application/dicom` part of a WADO-RS answer (a server answering a bare
/// `application/dicom` body is taken too).
fn dicom_part(reply: &Reply) -> Result<Bytes, String> {
    let media = reply.header(CONTENT_TYPE).and_then(MediaType::parse);
    match media {
        Some(m) if m.essence == "multipart/related" => {
            let boundary = m.param("boundary").unwrap_or_default();
            let parts = multipart::parse(&reply.body, boundary)
                .map_err(|e| format!("the PACS's WADO-RS answer is unusable: {e}"))?;
            parts
                .into_iter()
                .find(|p| {
                    p.content_type()
                        .is_none_or(|t| t.essence == "application/dicom")
                })
                .map(|p| p.body)
                .ok_or_else(|| "the PACS's WADO-RS answer has no application/dicom part".into())
        }
        Some(m) if m.essence == "application/dicom" => Ok(reply.body.clone()),
        _ => Err("the PACS's WADO-RS answer is not multipart/related DICOM".into()),
    }
}

async fn write_spool(path: &Path, object: &[u8]) -> Result<(), Halt> {
    tokio::fs::write(path, with_preamble(object))
        .await
        .map_err(|e| {
            Halt::Err(ScanError::Spool(
                path.parent().unwrap_or(Path::new(".")).to_path_buf(),
                e.to_string(),
            ))
        })
}

/// `Value[0]` of an attribute in a DICOM JSON object, as text.
fn first_str(obj: &Map<String, Value>, tag: &str) -> Option<String> {
    obj.get(tag)?
        .get("Value")?
        .get(0)?
        .as_str()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// A UID attribute, only if it is a well-formed UID (it goes into a path).
fn uid_of(obj: &Map<String, Value>, tag: &str) -> Option<String> {
    first_str(obj, tag).filter(|u| is_uid(u))
}

/// A source has no offsets to rewind: an aborted transaction is simply sent again.
async fn send(
    retry: &RetryPolicy,
    producer: &mut dyn Producer,
    records: Vec<OutRecord>,
) -> Result<(), ScanError> {
    crate::send_with_retry(
        retry,
        "back-scan transaction did not land",
        producer,
        records,
    )
    .await
    .map_err(Into::into)
}

/// Studies found so far, in the order found.
#[derive(Default)]
struct Found {
    uids: Vec<String>,
    seen: HashSet<String>,
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYYMMDD` of a day number (civil_from_days).
fn yyyymmdd(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}")
}

fn day_of(yyyymmdd: &str) -> Option<i64> {
    if yyyymmdd.len() != 8 {
        return None;
    }
    let n = |r: std::ops::Range<usize>| yyyymmdd.get(r)?.parse::<i64>().ok();
    Some(days_from_civil(n(0..4)?, n(4..6)?, n(6..8)?))
}

/// The concrete first and last day of a configured range: an open start is 1900-01-01, an open
/// end a year from today (clocks of modalities are not always right).
fn day_bounds(configured: &str) -> (i64, i64) {
    let today = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| (d.as_secs() / 86_400) as i64)
        .unwrap_or(0);
    let (a, b) = match configured.split_once('-') {
        Some((a, b)) => (day_of(a), day_of(b)),
        None => (day_of(configured), day_of(configured)),
    };
    let first = a.unwrap_or_else(|| days_from_civil(1900, 1, 1));
    let last = b.unwrap_or(today + 366).max(first);
    (first, last)
}

fn date_range(a: i64, b: i64) -> String {
    if a == b {
        yyyymmdd(a)
    } else {
        format!("{}-{}", yyyymmdd(a), yyyymmdd(b))
    }
}

fn hhmmss(second: u32) -> String {
    format!(
        "{:02}{:02}{:02}",
        second / 3600,
        second / 60 % 60,
        second % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(content_type: &str, body: &'static [u8]) -> Reply {
        let mut headers = hyper::HeaderMap::new();
        headers.insert(CONTENT_TYPE, content_type.parse().expect("a header value"));
        Reply {
            status: hyper::StatusCode::OK,
            headers,
            body: Bytes::from_static(body),
        }
    }

    #[test]
    fn the_dicom_part_is_taken_from_a_wado_answer() {
        let r = reply(
            "multipart/related; type=\"application/dicom\"; boundary=XX",
            b"--XX\r\nContent-Type: application/dicom\r\nContent-Length: 4\r\n\r\nDICM\r\n--XX--\r\n",
        );
        assert_eq!(&dicom_part(&r).expect("a part")[..], b"DICM");
        let r = reply("application/dicom", b"DICM");
        assert_eq!(&dicom_part(&r).expect("a body")[..], b"DICM");
        let r = reply("application/json", b"{}");
        assert!(dicom_part(&r).is_err());
        let r = reply(
            "multipart/related; boundary=XX",
            b"--XX\r\nContent-Type: text/plain\r\n\r\nno\r\n--XX--",
        );
        assert!(dicom_part(&r).is_err());
    }

    #[test]
    fn qido_values_are_read_and_uids_checked() {
        let v: Value = serde_json::json!({
            "0020000D": {"vr": "UI", "Value": ["1.2.3"]},
            "0020000E": {"vr": "UI", "Value": ["../etc"]},
            "00080060": {"vr": "CS"}
        });
        let Value::Object(o) = v else { unreachable!() };
        assert_eq!(uid_of(&o, STUDY_UID).as_deref(), Some("1.2.3"));
        assert_eq!(uid_of(&o, SERIES_UID), None);
        assert_eq!(first_str(&o, MODALITY), None);
    }

    #[test]
    fn dates_bisect_on_whole_days() {
        for d in ["19000101", "19991231", "20000229", "20240101", "99991231"] {
            assert_eq!(yyyymmdd(day_of(d).expect("a date")), d);
        }
        assert_eq!(day_of("19700101"), Some(0));
        let (a, b) = day_bounds("20200101-20200131");
        assert_eq!(
            (b - a, date_range(a, b)),
            (30, "20200101-20200131".to_string())
        );
        let (a, b) = day_bounds("20200105");
        assert_eq!((a, date_range(a, b)), (b, "20200105".to_string()));
        let (a, b) = day_bounds("");
        assert_eq!(yyyymmdd(a), "19000101");
        assert!(b > day_of("20250101").expect("a date"));
        assert_eq!(hhmmss(86_399), "235959");
        assert_eq!(hhmmss(3_661), "010101");
    }
}
