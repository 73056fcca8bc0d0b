//! The ingest stage: radiographs in from folders, de-identified, into the claim-check store and
//! onto `fracture.deidentified`. PHI stops here; the linkage table stays here.

pub mod burned_in;
pub mod deid;
pub mod dicomweb;
pub mod research;
mod run;
pub mod scp;
mod spool;
pub mod walk;

use std::path::{Path, PathBuf};

use bytes::Bytes;
use dicom_dictionary_std::{tags, uids};
use dicom_object::DefaultDicomObject;
use opentelemetry::trace::{Span as _, Status};
use opentelemetry::KeyValue;

use fracture_edge::linkage::{Linkage, LinkageRow};
use fracture_shared::bus::{BusError, OutRecord, Producer, Topics};
use fracture_shared::error::StageError;
use fracture_shared::messages::{
    decode, encode, schema, DeadLetter, Deidentified, ErrorKind, Message, RadiographId,
};
use fracture_shared::region;
use fracture_shared::retry::sleep_unless_stopped;
use fracture_shared::stage::Shutdown;
use fracture_shared::store::BlobStore;
use fracture_shared::telemetry;
use fracture_shared::RetryPolicy;

pub use deid::passthrough::{Cleaned, Source};
pub use deid::{deidentify, DeidPolicy};
pub use run::{run, RunError};
pub use walk::{walk, Input};

pub const STAGE: &str = "ingest";

/// `[ingest]`
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// File whose bytes are the de-identification secret (at least 32 bytes). Every replica and
    /// every re-run must use the same one, or UIDs will not match.
    pub key_file: String,
    /// Pseudonymous site code written in place of InstitutionName.
    pub site_code: String,
    /// Root of generated UIDs (`2.25` for UUID-derived UIDs).
    pub uid_root: String,
    /// The linkage table (pseudonym -> original identifiers), a SQLite database created with mode
    /// 0600. Stays at the edge; `fracture serve export` reads it.
    pub linkage: String,
    /// A folder to ingest when `fracture serve ingest` is given no paths.
    pub input_dir: String,
    /// Files per transaction.
    pub batch: usize,
    /// The lane of what ingest reads itself (the folders and the DICOMweb back-scan): `backscan`,
    /// so an archive never queues ahead of a patient, or `live` for a folder a department drops
    /// today's radiographs into. The push doors (C-STORE, STOW-RS) are always live.
    pub lane: fracture_shared::bus::Lane,
    /// The DICOM C-STORE door (`fracture serve ingest`); an empty `listen` keeps it closed.
    pub scp: scp::ScpConfig,
    /// Folder where refused inputs stay at the edge (mode 0700); empty: not kept.
    pub quarantine: String,
    /// Burned-in text rules, one `[[ingest.burned_in]]` table per device model.
    pub burned_in: Vec<burned_in::PixelRule>,
    /// The DICOMweb doors: a QIDO-RS/WADO-RS back-scan of a PACS (`url`) and a STOW-RS endpoint
    /// (`stow_listen`); both closed by default.
    pub dicomweb: dicomweb::DicomwebConfig,
    /// The region rule table (`[ingest.regions]`): a site's own `[[ingest.regions.rules]]`
    /// (`region`, `keywords`) tried before the built-in table; `builtin = false` drops it,
    /// `misspellings = false` turns off one-letter typo matching.
    pub regions: region::RegionConfig,
    /// Largest image accepted, as Rows × Columns × frames × samples per pixel, checked from the
    /// header before anything is stored; generous for stitched long-leg films (about 30 million).
    /// The decoders refuse more than `pixels::MAX_PIXELS` whatever this says.
    pub max_pixels: u64,
}

/// `[ingest] max_pixels` unless set: four times a stitched long-leg film.
pub const DEFAULT_MAX_PIXELS: u64 = 100_000_000;

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            key_file: String::new(),
            site_code: "SITE".into(),
            uid_root: "2.25".into(),
            linkage: "fracture-linkage.db".into(),
            input_dir: String::new(),
            batch: 16,
            lane: fracture_shared::bus::Lane::Backscan,
            scp: scp::ScpConfig {
                listen: String::new(),
                ..Default::default()
            },
            quarantine: "fracture-quarantine".into(),
            burned_in: Vec::new(),
            dicomweb: dicomweb::DicomwebConfig::default(),
            regions: region::RegionConfig::default(),
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }
}

/// The de-identification key file could not be read; the message says how to make one.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the de-identification key file {} ({source}); create one with `head -c 32 /dev/urandom > {}` and keep it secret", path.display(), path.display())]
pub struct KeyError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Reads the key file; the error says how to make one.
pub fn read_key(path: &Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|source| KeyError {
        path: path.to_path_buf(),
        source,
    })
}

/// Everything ingest needs to turn a file into a message.
pub struct Ingest {
    pub policy: DeidPolicy,
    pub store: BlobStore,
    pub topics: Topics,
    pub linkage: Linkage,
    /// How long to wait for the store and the bus when they are away.
    pub retry: RetryPolicy,
}

/// What happened to one input, for progress and counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Produced,
    DeadLettered,
    Skipped,
    /// Already finished by an earlier run (a resumed back-scan).
    Resumed,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IngestReport {
    /// Inputs that became a message (a radiograph or a dead letter): each will end as exactly
    /// one finding or one dead letter downstream.
    pub inputs: u64,
    pub produced: u64,
    pub dead_lettered: u64,
    /// Files that are plainly not DICOM (no DICM marker, not named .dcm), and DICOMDIR indexes.
    pub skipped: u64,
    /// Inputs an earlier run already finished, not sent again.
    pub resumed: u64,
    pub bytes: u64,
}

const RADIOGRAPH_CLASSES: &[&str] = &[
    uids::COMPUTED_RADIOGRAPHY_IMAGE_STORAGE,
    uids::DIGITAL_X_RAY_IMAGE_STORAGE_FOR_PRESENTATION,
    uids::DIGITAL_X_RAY_IMAGE_STORAGE_FOR_PROCESSING,
];

use fracture_shared::breaker::{Admission, Breaker, Unit};
use fracture_shared::dicom::text;

/// Refuses what is not a CR or DX radiograph, saying what it was.
pub fn check_radiograph(obj: &DefaultDicomObject) -> Result<(), StageError> {
    use dicom_core::dictionary::{UidDictionary, UidDictionaryEntry};
    let class = text(obj, tags::SOP_CLASS_UID).unwrap_or_else(|| {
        obj.meta()
            .media_storage_sop_class_uid()
            .trim_end_matches('\0')
            .to_string()
    });
    if RADIOGRAPH_CLASSES.contains(&class.as_str()) {
        return Ok(());
    }
    let name = dicom_dictionary_std::sop_class::StandardSopClassDictionary
        .by_uid(&class)
        .map(|e| e.name().to_string())
        .unwrap_or_else(|| "an unknown SOP class".into());
    let modality = text(obj, tags::MODALITY).unwrap_or_else(|| "no modality".into());
    Err(StageError::data(format!(
        "not a radiograph: SOP class {class} ({name}), modality {modality}; fracture detection reads CR and DX images only"
    )))
}

/// An input's text on its way to the bus: printable ASCII only, at most `max` characters (a
/// sender controls it; the bus and every dashboard downstream should not).
fn clip(text: &str, max: usize) -> String {
    text.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(max)
        .collect()
}

impl Ingest {
    /// De-identifies one DICOM file and stores the result. The pixel data is not decoded: it
    /// passes through as bytes (see [`deid::passthrough`]), so memory is one copy of the output.
    async fn radiograph(
        &self,
        input: &str,
        file: std::fs::File,
        size: u64,
        source: &str,
    ) -> Result<Deidentified, StageError> {
        let src = Source::open(file)?;
        let obj = src.object();
        check_radiograph(obj)?;
        let region = self.policy.regions.classify(&[
            text(obj, tags::BODY_PART_EXAMINED).as_deref(),
            text(obj, tags::STUDY_DESCRIPTION).as_deref(),
            text(obj, tags::SERIES_DESCRIPTION).as_deref(),
            text(obj, tags::PROTOCOL_NAME).as_deref(),
        ]);
        let modality = clip(&text(obj, tags::MODALITY).unwrap_or_default(), 16);
        let rows = obj
            .element(tags::ROWS)
            .ok()
            .and_then(|e| e.to_int::<u32>().ok())
            .unwrap_or(0);
        let columns = obj
            .element(tags::COLUMNS)
            .ok()
            .and_then(|e| e.to_int::<u32>().ok())
            .unwrap_or(0);
        let Cleaned {
            object: clean,
            originals,
            mut passage,
            ..
        } = deid::passthrough::clean(src, &self.policy)?;
        let id = RadiographId {
            input: input.to_string(),
            study_instance_uid: self.policy.pseudonymise_uid(&originals.study_instance_uid),
            series_instance_uid: self.policy.pseudonymise_uid(&originals.series_instance_uid),
            sop_instance_uid: self.policy.pseudonymise_uid(&originals.sop_instance_uid),
        };
        // The linkage row is durable before anything leaves the edge, so every result can go back.
        self.linkage
            .record(&LinkageRow {
                input: input.to_string(),
                source: source.to_string(),
                study_instance_uid: id.study_instance_uid.clone(),
                series_instance_uid: id.series_instance_uid.clone(),
                sop_instance_uid: id.sop_instance_uid.clone(),
                original: Some(originals),
            })
            .await
            .map_err(|e| StageError::external(format!("cannot write the linkage table: {e}")))?;
        // Sized once for the whole output (the attributes change by a few kilobytes), so the
        // buffer never doubles: memory is one copy of the radiograph.
        let mut encoded = Vec::with_capacity(usize::try_from(size).unwrap_or(0) + (1 << 20));
        passage.write(&clean, &mut encoded)?;
        let dicom = self
            .store
            .put(Bytes::from(encoded), "application/dicom")
            .await?;
        Ok(Deidentified {
            schema: schema::DEIDENTIFIED.into(),
            id,
            site: self.policy.site_code.clone(),
            region: region.to_string(),
            modality,
            rows,
            columns,
            dicom,
        })
    }

    fn dead_letter(&self, input: &str, e: StageError) -> OutRecord {
        let letter = DeadLetter {
            schema: schema::DEAD_LETTER.into(),
            stage: STAGE.into(),
            kind: e.kind,
            reason: e.message,
            input: Some(input.to_string()),
            origin: None,
        };
        OutRecord {
            topic: self.topics.of::<DeadLetter>(),
            key: input.to_string(),
            payload: encode(&letter),
            headers: vec![],
        }
    }

    /// Turns one walked input into its message (a radiograph or a dead letter), or nothing for
    /// a skipped file.
    pub async fn process(&self, item: &Input) -> (Outcome, Option<OutRecord>, u64) {
        let path = match item {
            Input::Skipped(_) => return (Outcome::Skipped, None, 0),
            Input::File(p) | Input::Unreadable(p, _) => p,
        };
        let input = self.input_id(path);
        let source = path.display().to_string();
        self.process_as(item, &input, &source).await
    }

    /// Like [`Ingest::process`], for an input whose reference and linkage source are not its
    /// file's path: a door that spools what it receives (DICOMweb) names the input by where it
    /// came from, so the reference survives a change of spool folder.
    pub async fn process_as(
        &self,
        item: &Input,
        input: &str,
        source: &str,
    ) -> (Outcome, Option<OutRecord>, u64) {
        let (path, problem) = match item {
            Input::Skipped(_) => return (Outcome::Skipped, None, 0),
            Input::File(p) => (p, None),
            Input::Unreadable(p, why) => (p, Some(why.clone())),
        };
        let input = input.to_string();
        // The root of the radiograph's trace; every later stage's span descends from it.
        let mut span = telemetry::start_span(
            STAGE,
            None,
            std::time::SystemTime::now(),
            vec![KeyValue::new("fracture.stage", STAGE)],
        );
        let trace_id = span.span_context().trace_id();
        let headers = vec![(
            telemetry::TRACEPARENT.to_string(),
            telemetry::to_traceparent(span.span_context()),
        )];
        let link_only = LinkageRow {
            input: input.clone(),
            source: source.to_string(),
            ..Default::default()
        };
        if let Some(why) = problem {
            if let Err(e) = self.linkage.record(&link_only).await {
                tracing::error!(error = %e, "cannot write the linkage table");
            }
            span.set_status(Status::error("dead-lettered (data)"));
            span.end();
            let mut r = self.dead_letter(&input, StageError::data(why));
            r.headers = headers;
            return (Outcome::DeadLettered, Some(r), 0);
        }
        let opened = std::fs::File::open(path).and_then(|f| Ok((f.metadata()?.len(), f)));
        let result = match opened {
            Err(e) => Err(StageError::data(format!(
                "cannot read the file: {}",
                e.kind()
            ))),
            Ok((n, file)) => self
                .radiograph(&input, file, n, source)
                .await
                .map(|m| (m, n)),
        };
        if let Err(e) = &result {
            span.set_status(Status::error(format!(
                "refused ({})",
                format!("{:?}", e.kind).to_lowercase()
            )));
        }
        span.end();
        match result {
            Ok((m, n)) => {
                let key = m.id.study_instance_uid.clone();
                (
                    Outcome::Produced,
                    Some(OutRecord {
                        topic: self.topics.of::<Deidentified>(),
                        key,
                        payload: encode(&m),
                        headers,
                    }),
                    n,
                )
            }
            Err(e) => {
                // An outage of the store or the linkage table is not the input's fault: it is
                // not quarantined, and the caller retries it (see `process_retrying`).
                if let (Some(dir), false) = (&self.policy.quarantine, e.kind == ErrorKind::External)
                {
                    if let Err(q) = quarantine(dir, &input, path) {
                        tracing::error!(input = %input, error = %q, "cannot quarantine a refused input");
                    }
                }
                tracing::info!(trace_id = %trace_id, input = %input, reason = %e.message, "input refused");
                if e.kind == ErrorKind::External {
                    // Not the input's fault; retried by the caller, linked when it lands.
                } else if let Err(le) = self.linkage.record(&link_only).await {
                    tracing::error!(error = %le, "cannot write the linkage table");
                }
                let mut r = self.dead_letter(&input, e);
                r.headers = headers;
                (Outcome::DeadLettered, Some(r), 0)
            }
        }
    }

    /// Ingests every input under `paths`, `batch` files per transaction. `progress` is called
    /// once per input with its outcome and size.
    /// The pseudonymous reference of an input path: stable for a key, so a re-run recognises it.
    pub fn input_id(&self, path: &Path) -> String {
        self.policy.input_ref(path)
    }

    pub async fn run_paths(
        &self,
        paths: &[PathBuf],
        producer: &mut dyn Producer,
        batch: usize,
        progress: impl FnMut(Outcome, u64),
    ) -> Result<IngestReport, BusError> {
        let done = std::collections::HashSet::new();
        self.run_paths_resuming(paths, producer, batch, Resume::skipping(&done), progress)
            .await
    }

    /// Like [`Ingest::process`], but an input that failed for an external reason (the store or
    /// the linkage table unavailable) is tried again with capped backoff instead of becoming a
    /// dead letter. `None` when `stop` was set while waiting.
    pub async fn process_retrying(
        &self,
        item: &Input,
        stop: Option<&Shutdown>,
    ) -> Option<(Outcome, Option<OutRecord>, u64)> {
        let path = match item {
            Input::Skipped(_) => return Some((Outcome::Skipped, None, 0)),
            Input::File(p) | Input::Unreadable(p, _) => p,
        };
        let source = path.display().to_string();
        self.process_retrying_as(item, &self.input_id(path), &source, stop)
            .await
    }

    /// [`Ingest::process_retrying`] under a given reference and source (see
    /// [`Ingest::process_as`]).
    pub async fn process_retrying_as(
        &self,
        item: &Input,
        input: &str,
        source: &str,
        stop: Option<&Shutdown>,
    ) -> Option<(Outcome, Option<OutRecord>, u64)> {
        let mut attempt = 0;
        loop {
            let got = self.process_as(item, input, source).await;
            let external = matches!(&got, (Outcome::DeadLettered, Some(r), _)
                if decode::<DeadLetter>(&r.payload).is_ok_and(|d| d.kind == ErrorKind::External));
            if !external {
                return Some(got);
            }
            attempt += 1;
            let wait = self.retry.backoff(attempt);
            tracing::warn!(
                retry_in_ms = wait.as_millis() as u64,
                "ingest cannot store an input now, retrying"
            );
            if !sleep_unless_stopped(wait, stop).await {
                return None;
            }
        }
    }

    /// Like [`Ingest::run_paths`], resuming as `resume` says: the inputs in `resume.done` are
    /// skipped (a resumed back-scan sends nothing twice); when `resume.stop` is set, it sends what
    /// it has and returns between inputs (what is left is for the next run); and with a breaker,
    /// a file that was being read when earlier processes died is set aside (see `breaker`).
    pub async fn run_paths_resuming(
        &self,
        paths: &[PathBuf],
        producer: &mut dyn Producer,
        batch: usize,
        mut resume: Resume<'_>,
        mut progress: impl FnMut(Outcome, u64),
    ) -> Result<IngestReport, BusError> {
        let (done, stop) = (resume.done, resume.stop);
        let mut report = IngestReport::default();
        let mut pending: Vec<OutRecord> = Vec::new();
        let mut pending_units: Vec<Unit> = Vec::new();
        for item in walk(paths) {
            if stop.is_some_and(Shutdown::is_set) {
                break;
            }
            let finished = match &item {
                Input::File(p) | Input::Unreadable(p, _) => done.contains(&self.input_id(p)),
                Input::Skipped(_) => false,
            };
            let (outcome, record, bytes) = if finished {
                (Outcome::Resumed, None, 0)
            } else {
                let guarded = match (&mut resume.breaker, &item) {
                    (Some((breaker, ledger)), Input::File(p)) => {
                        let unit = Unit {
                            ledger: ledger.clone(),
                            key: self.input_id(p),
                        };
                        let admitted = breaker.admit(std::slice::from_ref(&unit)).await;
                        let tripped = match admitted[0] {
                            Admission::Tripped(n) => {
                                Some(self.dead_letter(&unit.key, breaker.tripped(n)))
                            }
                            _ => {
                                breaker.in_flight(&[&unit]).await;
                                None
                            }
                        };
                        pending_units.push(unit);
                        tripped
                    }
                    _ => None,
                };
                match guarded {
                    Some(letter) => (Outcome::DeadLettered, Some(letter), 0),
                    None => match self.process_retrying(&item, stop).await {
                        Some(got) => got,
                        None => break,
                    },
                }
            };
            match outcome {
                Outcome::Resumed => report.resumed += 1,
                Outcome::Skipped => report.skipped += 1,
                Outcome::Produced => report.produced += 1,
                Outcome::DeadLettered => report.dead_lettered += 1,
            }
            if matches!(outcome, Outcome::Produced | Outcome::DeadLettered) {
                report.inputs += 1;
            }
            report.bytes += bytes;
            pending.extend(record);
            progress(outcome, bytes);
            if pending.len() >= batch.max(1) {
                send_with_retry(
                    &self.retry,
                    "ingest transaction did not land",
                    producer,
                    std::mem::take(&mut pending),
                )
                .await?;
                if let Some((breaker, _)) = &mut resume.breaker {
                    breaker
                        .settle(&std::mem::take(&mut pending_units), true)
                        .await;
                }
            }
        }
        if !pending.is_empty() {
            send_with_retry(
                &self.retry,
                "ingest transaction did not land",
                producer,
                pending,
            )
            .await?;
        }
        if let Some((breaker, _)) = &mut resume.breaker {
            breaker.settle(&pending_units, true).await;
        }
        Ok(report)
    }
}

/// How [`Ingest::run_paths_resuming`] resumes a folder scan.
pub struct Resume<'a> {
    /// Input references already committed: skipped.
    pub done: &'a std::collections::HashSet<String>,
    /// Set: stop between inputs.
    pub stop: Option<&'a Shutdown>,
    /// The crash-loop breaker and this scan's ledger in it (the ingest instance).
    pub breaker: Option<(&'a mut Breaker, String)>,
}

impl<'a> Resume<'a> {
    /// Skips `done`; no stop, no breaker.
    pub fn skipping(done: &'a std::collections::HashSet<String>) -> Self {
        Self {
            done,
            stop: None,
            breaker: None,
        }
    }
}

/// Keeps a refused input at the edge, named by its pseudonymous reference (paths can hold names).
fn quarantine(dir: &Path, input: &str, path: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    std::fs::copy(path, dir.join(format!("{input}.dcm"))).map(|_| ())
}

/// A door's transaction: a few quick tries for an aborted or unavailable one; beyond that the
/// sender's own retry (a modality after 0xA700, a STOW-RS client after 503) is the better wait,
/// since it holds no association or connection meanwhile.
pub async fn publish_from_door(
    retry: &RetryPolicy,
    what: &str,
    producer: &tokio::sync::Mutex<Box<dyn Producer>>,
    records: Vec<OutRecord>,
) -> Result<(), BusError> {
    retry
        .retry(what)
        .attempts(3)
        .run(
            || async { producer.lock().await.send(records.clone()).await },
            |e| !matches!(e, BusError::Fatal(_)),
        )
        .await
}

/// A source has no offsets to rewind: an aborted transaction is simply sent again.
pub async fn send_with_retry(
    retry: &RetryPolicy,
    what: &str,
    producer: &mut dyn Producer,
    records: Vec<OutRecord>,
) -> Result<(), BusError> {
    let mut retry = retry.retry(what);
    loop {
        match producer.send(records.clone()).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                let again = !matches!(e, BusError::Fatal(_));
                retry.failed(e, again).await?;
            }
        }
    }
}

/// The message type ingest writes, for callers that name topics.
pub fn output_topic(topics: &Topics) -> String {
    topics.name(Deidentified::TOPIC)
}

impl IngestConfig {
    /// The de-identification policy this configuration describes, with `key`.
    pub fn policy(&self, key: Vec<u8>) -> Result<DeidPolicy, deid::PolicyError> {
        let mut p = DeidPolicy::new(key, &self.site_code, &self.uid_root)?;
        p.regions =
            region::Regions::new(&self.regions).map_err(|e| deid::PolicyError::from(e.0))?;
        p.pixel_rules = self.burned_in.clone();
        p.max_pixels = self.max_pixels;
        p.quarantine = Some(self.quarantine.trim())
            .filter(|q| !q.is_empty())
            .map(PathBuf::from);
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fracture_shared::region::{RegionConfig, RegionRule};

    #[test]
    fn site_region_rules_reach_the_policy_and_bad_ones_are_refused() {
        let mut cfg = IngestConfig {
            regions: RegionConfig {
                rules: vec![RegionRule {
                    region: "ankle".into(),
                    keywords: vec!["OSG".into()],
                }],
                ..Default::default()
            },
            ..Default::default()
        };
        let policy = cfg.policy(vec![7; 32]).expect("a policy");
        assert_eq!(policy.regions.classify(&[Some("OSG links")]), "ankle");
        assert_eq!(policy.regions.classify(&[Some("Wrist")]), "wrist");
        cfg.regions.rules[0].region = "ribs".into();
        let err = cfg.policy(vec![7; 32]).unwrap_err().to_string();
        assert!(
            err.contains("ingest.regions.rules[0]") && err.contains("ribs"),
            "{err}"
        );
    }
}
