//! A DICOM C-STORE SCP: modalities and PACS push radiographs here; each object is spooled, ingested like a file, published, and only then acknowledged.

use fracture_shared::config::SettingError;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dicom_core::{dicom_value, DataElement, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::{FileMetaTableBuilder, InMemDicomObject, StandardDataDictionary};
use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;
use dicom_ul::association::server::{AcceptCalledAeTitle, AccessControl, DefaultNegotiation};
use dicom_ul::association::{AsyncServerAssociation, ServerAssociationOptions};
use dicom_ul::pdu::{
    AssociationRJ, AssociationRJResult, AssociationRJServiceProviderPresentationReason,
    AssociationRJServiceUserReason, AssociationRJSource, PDataValue, PDataValueType,
    PresentationContextResultReason,
};
use dicom_ul::Pdu;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use fracture_shared::bus::{BusError, Producer};
use fracture_shared::messages::{decode, DeadLetter, ErrorKind};
use fracture_shared::stage::Shutdown;

use tokio_rustls::rustls;

use crate::{Ingest, Input, Outcome};

/// `[ingest.scp]`
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScpConfig {
    /// Address to listen on, e.g. `0.0.0.0:11112` (11112 is the registered DICOM port).
    pub listen: String,
    /// Our AE title. Associations calling another title are rejected, so a modality configured
    /// for some other node does not silently send its studies here.
    pub ae_title: String,
    /// Folder for received objects while they are ingested (created with mode 0700: it holds
    /// PHI for the seconds an object takes). Each file is removed once the sender is answered.
    pub spool: String,
    /// Associations served at once; more are rejected as transient (local limit exceeded), so
    /// the sender retries later instead of waiting on a full server.
    pub max_associations: usize,
    /// DICOM TLS (PS3.15 B.1, the BCP 195 profiles): this node's certificate chain, PEM. With
    /// `tls_key_file`, the door speaks TLS only (conventionally on port 2762); empty: plain TCP.
    pub tls_cert_file: String,
    /// The private key of `tls_cert_file`, PEM (PKCS#8, PKCS#1 or SEC1).
    pub tls_key_file: String,
    /// A PEM bundle of CAs: when set, every sender must present a certificate one of them
    /// issued (mutual TLS, as BCP 195 asks of DICOM nodes); empty: any sender may connect.
    pub tls_client_ca_file: String,
    /// Calling AE titles allowed to associate; empty: any. A guard against a misconfigured
    /// modality sending here, not a security control (any sender can claim any title): use
    /// `tls_client_ca_file` to know who sends.
    pub calling_ae_titles: Vec<String>,
    /// Seconds a peer may take to send each PDU once associated (a silent or trickling sender
    /// loses its association slot after this long; Orthanc's DicomScpTimeout is also 30).
    pub idle_timeout_s: u64,
}

impl Default for ScpConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:11112".into(),
            ae_title: "FRACTURE".into(),
            spool: "fracture-spool".into(),
            max_associations: 8,
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            tls_client_ca_file: String::new(),
            calling_ae_titles: Vec::new(),
            idle_timeout_s: 30,
        }
    }
}

impl ScpConfig {
    /// The TLS server configuration the `tls_*` settings describe; `None` for plain TCP. Errors
    /// say which setting to fix.
    pub fn tls(&self) -> Result<Option<Arc<rustls::ServerConfig>>, SettingError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let (cert, key, client_ca) = (
            self.tls_cert_file.trim(),
            self.tls_key_file.trim(),
            self.tls_client_ca_file.trim(),
        );
        if cert.is_empty() && key.is_empty() {
            if !client_ca.is_empty() {
                return Err("ingest.scp.tls_client_ca_file is set without ingest.scp.tls_cert_file and tls_key_file: client certificates need TLS".into());
            }
            return Ok(None);
        }
        if cert.is_empty() || key.is_empty() {
            return Err("ingest.scp.tls_cert_file and ingest.scp.tls_key_file go together: set both (PEM files) for DICOM TLS, or neither".into());
        }
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(|e| format!("cannot read ingest.scp.tls_cert_file {cert} ({e})"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("ingest.scp.tls_cert_file {cert} is not PEM ({e})"))?;
        if chain.is_empty() {
            return Err(SettingError(format!(
                "ingest.scp.tls_cert_file {cert} holds no certificate (-----BEGIN CERTIFICATE-----)"
            )));
        }
        let private = PrivateKeyDer::from_pem_file(key).map_err(|e| {
            format!("cannot read a private key from ingest.scp.tls_key_file {key} ({e})")
        })?;
        let provider = fracture_edge::tls::provider();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("cannot set up TLS ({e})"))?;
        let builder = if client_ca.is_empty() {
            builder.with_no_client_auth()
        } else {
            let roots =
                fracture_edge::tls::ca_roots(client_ca, "ingest.scp.tls_client_ca_file", false)?;
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| format!("ingest.scp.tls_client_ca_file {client_ca}: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        };
        let config = builder.with_single_cert(chain, private).map_err(|e| {
            format!(
                "ingest.scp.tls_cert_file and tls_key_file do not make a usable certificate ({e})"
            )
        })?;
        Ok(Some(Arc::new(config)))
    }
}

/// The storage SOP classes we accept: CR and DX only. Other classes (CT, MR, ...) have their
/// presentation context rejected at association time, which is what PACS and modalities expect
/// of a node that does not store a class: the sender reports "no presentation context" at once
/// instead of a per-image failure, and nothing for them reaches the bus. An object that claims
/// CR or DX in its context but carries something else is still refused per image (0xA900) and
/// dead-lettered.
pub const STORAGE_CLASSES: &[&str] = &[
    uids::COMPUTED_RADIOGRAPHY_IMAGE_STORAGE,
    uids::DIGITAL_X_RAY_IMAGE_STORAGE_FOR_PRESENTATION,
    uids::DIGITAL_X_RAY_IMAGE_STORAGE_FOR_PROCESSING,
];

/// Transfer syntaxes we accept. The data set is stored as received (decoding happens later, in
/// preprocess), so compressed syntaxes cost nothing here; the order does not matter, since the
/// first of the sender's proposals that is in this list wins.
pub const TRANSFER_SYNTAXES: &[&str] = &[
    uids::EXPLICIT_VR_LITTLE_ENDIAN,
    uids::IMPLICIT_VR_LITTLE_ENDIAN,
    // Explicit VR big endian: retired, but older modalities still propose it.
    "1.2.840.10008.1.2.2",
    uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    uids::JPEG_BASELINE8_BIT,
    uids::JPEG_EXTENDED12_BIT,
    uids::JPEG_LOSSLESS,
    uids::JPEG_LOSSLESS_SV1,
    uids::RLE_LOSSLESS,
    uids::JPEGLS_LOSSLESS,
    uids::JPEGLS_NEAR_LOSSLESS,
    uids::JPEG2000_LOSSLESS,
    uids::JPEG2000,
];

/// DIMSE status codes we answer with (PS3.4 Annex B.2.3, PS3.7 Annex C).
pub mod status {
    pub const SUCCESS: u16 = 0x0000;
    /// Could not store or publish now; the sender should retry.
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// Not a radiograph (the data set is not of a class we read).
    pub const DATA_SET_MISMATCH: u16 = 0xA900;
    /// Unreadable or otherwise refused.
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
}

/// The largest PDU we ask senders to use: fewer, larger reads than the 16 KiB default.
const MAX_PDU: u32 = 128 * 1024;
/// A data set larger than this aborts the association rather than exhaust memory (radiographs
/// are tens of MB).
const MAX_OBJECT_BYTES: usize = 1 << 30;
/// How long a new connection may take to ask for its association (dcmtk's ACSE timeout).
const ASSOCIATE_TIMEOUT: Duration = Duration::from_secs(30);
/// After shutdown, how long open associations may take to finish the object in hand.
const DRAIN: Duration = Duration::from_secs(30);
/// ErrorComment is LO: at most 64 characters.
const COMMENT_MAX: usize = 64;

const C_STORE_RQ: u16 = 0x0001;
const C_STORE_RSP: u16 = 0x8001;
const C_ECHO_RQ: u16 = 0x0030;
const C_ECHO_RSP: u16 = 0x8030;
const NO_DATA_SET: u16 = 0x0101;

/// How one received object was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The C-STORE-RSP status (see [`status`]).
    pub status: u16,
    /// ErrorComment for a failure: why, without PHI.
    pub comment: Option<String>,
    /// What was published for it (a radiograph or a dead letter); `None` when nothing was.
    pub outcome: Option<Outcome>,
    /// The bus failed fatally (this producer was fenced): the server must stop.
    pub fatal: bool,
}

impl Answer {
    fn retry_later(why: impl Into<String>) -> Self {
        Self {
            status: status::OUT_OF_RESOURCES,
            comment: Some(why.into()),
            outcome: None,
            fatal: false,
        }
    }
}

/// One received object, as the sender described it in its C-STORE-RQ and presentation context.
#[derive(Debug, Clone)]
pub struct Received {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    /// The transfer syntax of the presentation context the data set came in.
    pub transfer_syntax: String,
    /// The data set bytes exactly as received (no file meta).
    pub data_set: Vec<u8>,
}

/// Spools, ingests and publishes one received object, and says how to answer it. The spool
/// file is gone when this returns.
pub async fn store_object(
    ingest: &Ingest,
    producer: &Mutex<Box<dyn Producer>>,
    spool: &Path,
    object: Received,
) -> Answer {
    let written = SpoolWriter::create(
        spool,
        &object.sop_class_uid,
        &object.sop_instance_uid,
        &object.transfer_syntax,
    )
    .and_then(|mut w| w.write(&object.data_set).map(|()| w));
    drop(object);
    match written {
        Ok(w) => store_spooled(ingest, producer, w).await,
        Err(e) => {
            tracing::error!(error = %e, spool = %spool.display(), "cannot write the spool file");
            Answer::retry_later("cannot spool the object; retry later")
        }
    }
}

/// Syncs a data set written to the spool as it arrived, then ingests and publishes it.
async fn store_spooled(
    ingest: &Ingest,
    producer: &Mutex<Box<dyn Producer>>,
    writer: SpoolWriter,
) -> Answer {
    let spool = writer.spool.clone();
    let finished = tokio::task::spawn_blocking(move || writer.finish()).await;
    let (temp, final_path) = match finished {
        Ok(Ok(paths)) => paths,
        Ok(Err(e)) => {
            tracing::error!(error = %e, spool = %spool.display(), "cannot write the spool file");
            return Answer::retry_later("cannot spool the object; retry later");
        }
        Err(e) => {
            tracing::error!(error = %e, "spool writer panicked");
            return Answer::retry_later("cannot spool the object; retry later");
        }
    };
    // The same object arriving twice at once would share a spool name; the second waits, so
    // the first's removal cannot pull the file from under it.
    let _claim = crate::spool::SpoolClaim::acquire(final_path.clone()).await;
    if let Err(e) = std::fs::rename(&temp, &final_path) {
        tracing::error!(error = %e, "cannot move the spool file into place");
        let _ = std::fs::remove_file(&temp);
        return Answer::retry_later("cannot spool the object; retry later");
    }
    let answer = ingest_and_publish(ingest, producer, &final_path).await;
    if let Err(e) = std::fs::remove_file(&final_path) {
        // A leftover holds PHI; say so loudly (the next start sweeps it).
        tracing::error!(error = %e, file = %final_path.display(), "cannot remove the spool file");
    }
    answer
}

async fn ingest_and_publish(
    ingest: &Ingest,
    producer: &Mutex<Box<dyn Producer>>,
    path: &Path,
) -> Answer {
    let (outcome, record, _) = ingest.process(&Input::File(path.to_path_buf())).await;
    let Some(record) = record else {
        // Only a skipped input has no record, and a spooled file is never skipped; answered
        // all the same rather than trusted.
        return Answer {
            status: status::CANNOT_UNDERSTAND,
            comment: Some("not a DICOM object".into()),
            outcome: None,
            fatal: false,
        };
    };
    let (status, comment) = match outcome {
        Outcome::Produced => (status::SUCCESS, None),
        _ => {
            let letter = decode::<DeadLetter>(&record.payload).ok();
            let (kind, reason) = letter
                .map(|l| (l.kind, l.reason))
                .unwrap_or((ErrorKind::Data, "refused".into()));
            if kind == ErrorKind::External {
                // The store or the linkage table failed, not the object: the sender keeps it
                // and retries, rather than the object ending as a dead letter.
                tracing::warn!(reason = %reason, "cannot ingest now, asking the sender to retry");
                return Answer::retry_later(clip(&format!("temporarily unable: {reason}")));
            }
            // `check_radiograph`'s wording; the scp test pins this mapping.
            let status = if reason.starts_with("not a radiograph") {
                status::DATA_SET_MISMATCH
            } else {
                status::CANNOT_UNDERSTAND
            };
            (status, Some(clip(&reason)))
        }
    };
    let key = record.key.clone();
    let sent = crate::publish_from_door(
        &ingest.retry,
        "received object's transaction did not land",
        producer,
        vec![record],
    )
    .await;
    match sent {
        Ok(()) => {
            tracing::info!(input_key = %key, outcome = ?outcome, status = format_args!("{status:#06x}"), "received object");
            Answer {
                status,
                comment,
                outcome: Some(outcome),
                fatal: false,
            }
        }
        Err(e) => {
            let fatal = matches!(e, BusError::Fatal(_));
            tracing::error!(error = %e, input_key = %key, "cannot publish a received object; the sender will retry");
            Answer {
                fatal,
                ..Answer::retry_later("cannot publish now; retry later")
            }
        }
    }
}

fn clip(s: &str) -> String {
    s.chars().take(COMMENT_MAX).collect()
}

static SPOOL_SEQ: AtomicU64 = AtomicU64::new(0);
/// A received data set on its way to the spool: preamble and file meta first, then each
/// fragment written as it arrives and hashed as it goes, so a large object is never held in
/// memory. The temporary file is removed unless [`SpoolWriter::finish`] hands it on.
struct SpoolWriter {
    spool: PathBuf,
    temp: PathBuf,
    file: Option<std::io::BufWriter<std::fs::File>>,
    hash: Sha256,
    len: usize,
}

impl SpoolWriter {
    fn create(
        spool: &Path,
        sop_class_uid: &str,
        sop_instance_uid: &str,
        transfer_syntax: &str,
    ) -> std::io::Result<Self> {
        let trim = |s: &str| s.trim_end_matches(['\0', ' ']).to_string();
        let meta = FileMetaTableBuilder::new()
            .media_storage_sop_class_uid(trim(sop_class_uid))
            .media_storage_sop_instance_uid(trim(sop_instance_uid))
            .transfer_syntax(trim(transfer_syntax))
            .build()
            .map_err(|e| std::io::Error::other(format!("cannot build the file meta: {e}")))?;
        let mut head = vec![0u8; 128];
        head.extend_from_slice(b"DICM");
        meta.write(&mut head)
            .map_err(|e| std::io::Error::other(format!("cannot write the file meta: {e}")))?;
        let temp = spool.join(format!(
            ".recv-{}-{}.part",
            std::process::id(),
            SPOOL_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let file = std::fs::File::create(&temp)?;
        let mut w = Self {
            spool: spool.to_path_buf(),
            temp,
            file: Some(std::io::BufWriter::with_capacity(256 * 1024, file)),
            hash: Sha256::new(),
            len: 0,
        };
        w.write(&head)?;
        w.len = 0;
        Ok(w)
    }

    /// Appends a fragment of the data set.
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| std::io::Error::other("the spool file is already closed"))?;
        file.write_all(bytes)?;
        self.hash.update(bytes);
        self.len += bytes.len();
        Ok(())
    }

    /// Syncs the file; returns it and its final name `<spool>/<sha256 of the file>.dcm`.
    fn finish(mut self) -> std::io::Result<(PathBuf, PathBuf)> {
        let file = self
            .file
            .take()
            .ok_or_else(|| std::io::Error::other("the spool file is already closed"))?;
        file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        let name = format!(
            "{}.dcm",
            hex::encode(std::mem::take(&mut self.hash).finalize())
        );
        let temp = std::mem::take(&mut self.temp);
        Ok((temp, self.spool.join(name)))
    }
}

impl Drop for SpoolWriter {
    fn drop(&mut self) {
        // Not finished (a write failed, the association ended): the partial object holds PHI.
        if !self.temp.as_os_str().is_empty() {
            self.file.take();
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Creates the spool folder (mode 0700) and removes what a previous run left in it: those
/// objects were never acknowledged (the sender sends them again) or were already published.
fn prepare_spool(spool: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(spool)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(spool, std::fs::Permissions::from_mode(0o700))?;
    }
    let mut swept = 0;
    for entry in std::fs::read_dir(spool)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        let ours = (name.starts_with(".recv-") && name.ends_with(".part"))
            || (name.len() == 68
                && name.ends_with(".dcm")
                && name[..64].bytes().all(|b| b.is_ascii_hexdigit()));
        if ours && std::fs::remove_file(entry.path()).is_ok() {
            swept += 1;
        }
    }
    if swept > 0 {
        tracing::warn!(files = swept, spool = %spool.display(), "removed spool files left by an earlier run");
    }
    Ok(())
}

/// Binds `cfg.listen` and serves until `shutdown` (see [`serve_on`]).
pub async fn serve(
    cfg: &ScpConfig,
    ingest: Arc<Ingest>,
    producer: Arc<Mutex<Box<dyn Producer>>>,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(&cfg.listen).await?;
    serve_on(listener, cfg, ingest, producer, shutdown).await
}

/// Serves C-STORE and C-ECHO on `listener` (`cfg.listen` is not used) until `shutdown` is set:
/// then stops accepting, lets open associations finish the object in hand for up to 30 s, and
/// returns. Returns an error if the bus failed fatally (the producer was fenced).
pub async fn serve_on(
    listener: TcpListener,
    cfg: &ScpConfig,
    ingest: Arc<Ingest>,
    producer: Arc<Mutex<Box<dyn Producer>>>,
    mut shutdown: Shutdown,
) -> std::io::Result<()> {
    let tls = cfg.tls().map_err(std::io::Error::other)?;
    let spool = PathBuf::from(&cfg.spool);
    prepare_spool(&spool)?;
    let ctx = Arc::new(Context {
        tls,
        ae_title: cfg.ae_title.clone(),
        senders: Senders(Arc::new(
            cfg.calling_ae_titles
                .iter()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .collect(),
        )),
        idle: Duration::from_secs(cfg.idle_timeout_s.max(1)),
        spool,
        ingest,
        producer,
        shutdown: shutdown.clone(),
        fatal: AtomicBool::new(false),
        fatal_notify: Notify::new(),
    });
    let slots = Arc::new(Semaphore::new(cfg.max_associations.max(1)));
    // Turning a sender away takes a task and a socket for up to REJECT_WAIT; past this many at
    // once a connection is closed unanswered, so a flood cannot take the process's descriptors.
    let rejecting = Arc::new(Semaphore::new(4 * cfg.max_associations.max(1)));
    tracing::info!(listen = %listener.local_addr()?, ae_title = %cfg.ae_title, max_associations = cfg.max_associations, tls = ctx.tls.is_some(), "DICOM SCP listening");
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.wait() => break,
            _ = ctx.fatal_notify.notified() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((socket, peer)) => match slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        tasks.spawn(association(ctx.clone(), socket, peer, slot));
                    }
                    Err(_) => match rejecting.clone().try_acquire_owned() {
                        Ok(permit) => {
                            tracing::warn!(peer = %peer, "association limit reached, rejecting (transient)");
                            tasks.spawn(reject_busy(socket, permit));
                        }
                        Err(_) => {
                            tracing::warn!(peer = %peer, "association limit reached and too many rejections under way, closing unanswered");
                            drop(socket);
                        }
                    },
                },
                Err(e) => {
                    // Out of file descriptors and the like: keep serving the open associations.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    drop(listener);
    let drained =
        tokio::time::timeout(DRAIN, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            open = tasks.len(),
            "associations still open after the drain period, aborting them"
        );
        tasks.shutdown().await;
    }
    if ctx.fatal.load(Ordering::SeqCst) {
        return Err(std::io::Error::other(
            "the bus failed fatally (another instance took over?); restart the SCP",
        ));
    }
    tracing::info!("DICOM SCP stopped");
    Ok(())
}

struct Context {
    /// DICOM TLS: every association is a TLS connection when set.
    tls: Option<Arc<rustls::ServerConfig>>,
    ae_title: String,
    senders: Senders,
    idle: Duration,
    spool: PathBuf,
    ingest: Arc<Ingest>,
    producer: Arc<Mutex<Box<dyn Producer>>>,
    shutdown: Shutdown,
    fatal: AtomicBool,
    fatal_notify: Notify,
}

/// Who may associate: callers that name our AE title, and, when the list is not empty, only
/// from the calling AE titles on it.
#[derive(Clone)]
struct Senders(Arc<Vec<String>>);

impl AccessControl for Senders {
    fn check_access(
        &self,
        this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        user_identity: Option<&dicom_ul::pdu::UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        AcceptCalledAeTitle.check_access(
            this_ae_title,
            calling_ae_title,
            called_ae_title,
            user_identity,
        )?;
        let calling = calling_ae_title.trim();
        if self.0.is_empty() || self.0.iter().any(|t| t == calling) {
            Ok(())
        } else {
            Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized)
        }
    }
}

fn options(ctx: &Context) -> ServerAssociationOptions<'static, Senders, DefaultNegotiation> {
    let mut o = ServerAssociationOptions::new()
        .ae_access_control(ctx.senders.clone())
        .ae_title(ctx.ae_title.clone())
        .max_pdu_length(MAX_PDU)
        .read_timeout(ctx.idle)
        .write_timeout(ctx.idle)
        .with_abstract_syntax(uids::VERIFICATION);
    for class in STORAGE_CLASSES {
        o = o.with_abstract_syntax(*class);
    }
    for ts in TRANSFER_SYNTAXES {
        o = o.with_transfer_syntax(*ts);
    }
    o
}

/// How long a sender turned away has to send its association request.
const REJECT_WAIT: Duration = Duration::from_secs(10);

/// Answers an association over the limit with a transient rejection, after reading its request
/// (closing with the request unread would reset the connection before the sender reads why).
async fn reject_busy(mut socket: TcpStream, _permit: OwnedSemaphorePermit) {
    let mut buf = bytes::BytesMut::new();
    let read =
        dicom_ul::association::read_pdu_from_wire_async(&mut socket, &mut buf, MAX_PDU, false);
    if !matches!(
        tokio::time::timeout(REJECT_WAIT, read).await,
        Ok(Ok(Pdu::AssociationRQ(_)))
    ) {
        return;
    }
    let rj = Pdu::AssociationRJ(AssociationRJ {
        result: AssociationRJResult::Transient,
        source: AssociationRJSource::ServiceProviderPresentation(
            AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
        ),
    });
    let mut out = Vec::new();
    if dicom_ul::write_pdu(&mut out, &rj).is_ok() {
        let _ = socket.write_all(&out).await;
    }
    let _ = socket.shutdown().await;
}

/// What a C-STORE-RQ told us, while its data set arrives.
struct Pending {
    context_id: u8,
    message_id: u16,
    sop_class_uid: String,
    sop_instance_uid: String,
    /// The data set so far, in the spool; `None` once writing it failed (the sender is then
    /// asked to retry when its last fragment arrives).
    spool: Option<SpoolWriter>,
}

/// Why an association ends early; logged, never sent.
type Ended = String;

async fn association(
    ctx: Arc<Context>,
    socket: TcpStream,
    peer: SocketAddr,
    _slot: OwnedSemaphorePermit,
) {
    // A connection that never asks for an association must not hold its slot for the whole
    // idle timeout; and shutdown need not wait for one.
    let mut shutdown = ctx.shutdown.clone();
    let options = options(&ctx);
    match ctx.tls.clone() {
        None => {
            let established = tokio::select! {
                r = tokio::time::timeout(ASSOCIATE_TIMEOUT, options.establish_async(socket)) => r,
                _ = shutdown.wait() => return,
            };
            if let Some(assoc) = established_or_log(established, peer) {
                serve_association(&ctx, assoc, peer, shutdown).await;
            }
        }
        Some(tls) => {
            // The TLS handshake, then the association, within the same limit.
            let options = options.tls_config(tls);
            let established = tokio::select! {
                r = tokio::time::timeout(ASSOCIATE_TIMEOUT, options.establish_tls_async(socket)) => r,
                _ = shutdown.wait() => return,
            };
            if let Some(assoc) = established_or_log(established, peer) {
                serve_association(&ctx, assoc, peer, shutdown).await;
            }
        }
    }
}

/// The association, or why there is none (logged: a failed TLS handshake, a rejected
/// association, no request in time).
fn established_or_log<S>(
    established: Result<
        Result<AsyncServerAssociation<S>, dicom_ul::association::Error>,
        tokio::time::error::Elapsed,
    >,
    peer: SocketAddr,
) -> Option<AsyncServerAssociation<S>> {
    match established {
        Ok(Ok(a)) => Some(a),
        Ok(Err(e)) => {
            tracing::info!(peer = %peer, error = %e, "association not established");
            None
        }
        Err(_) => {
            tracing::info!(peer = %peer, "no association request in time, closing");
            None
        }
    }
}

/// Serves one established association (over TCP or TLS) until it is released or aborted.
async fn serve_association<S>(
    ctx: &Context,
    mut assoc: AsyncServerAssociation<S>,
    peer: SocketAddr,
    mut shutdown: Shutdown,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    let calling = dicom_ul::association::Association::peer_ae_title(&assoc).to_string();
    let accepted = assoc
        .presentation_contexts()
        .iter()
        .filter(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        .count();
    tracing::info!(peer = %peer, calling_ae = %calling, accepted_contexts = accepted, proposed_contexts = assoc.presentation_contexts().len(), "association established");
    let mut command = Vec::new();
    let mut pending: Option<Pending> = None;
    let end: Result<(), Ended> = loop {
        let pdu = tokio::select! {
            r = assoc.receive() => r,
            _ = shutdown.wait() => break Err("shutting down".into()),
        };
        match pdu {
            Ok(Pdu::PData { data }) => {
                if let Err(e) = pdata(ctx, &mut assoc, data, &mut command, &mut pending).await {
                    break Err(e);
                }
            }
            Ok(Pdu::ReleaseRQ) => {
                if let Err(e) = assoc.send(&Pdu::ReleaseRP).await {
                    tracing::info!(peer = %peer, error = %e, "cannot confirm the release");
                }
                break Ok(());
            }
            Ok(Pdu::AbortRQ { source }) => {
                tracing::info!(peer = %peer, calling_ae = %calling, source = ?source, "association aborted by the peer");
                return;
            }
            Ok(other) => break Err(format!("unexpected {}", other.short_description())),
            Err(e) => break Err(format!("receive failed: {e}")),
        }
    };
    match end {
        Ok(()) => tracing::info!(peer = %peer, calling_ae = %calling, "association released"),
        Err(why) => {
            tracing::warn!(peer = %peer, calling_ae = %calling, reason = %why, "aborting the association");
            let _ = assoc.abort().await;
        }
    }
}

/// Largest command set accepted: a command is a few hundred bytes, and fragments are gathered in
/// memory until the last one, so a sender streaming command fragments is stopped here.
const MAX_COMMAND_BYTES: usize = 64 * 1024;

/// Handles the values of one P-DATA-TF: command fragments, then data set fragments.
async fn pdata<S>(
    ctx: &Context,
    assoc: &mut AsyncServerAssociation<S>,
    values: Vec<PDataValue>,
    command: &mut Vec<u8>,
    pending: &mut Option<Pending>,
) -> Result<(), Ended>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    for value in values {
        match value.value_type {
            PDataValueType::Command => {
                if command.len() + value.data.len() > MAX_COMMAND_BYTES {
                    return Err(format!(
                        "the command set passed {MAX_COMMAND_BYTES} bytes (a C-STORE or C-ECHO \
                         request is a few hundred); the association is aborted"
                    ));
                }
                command.extend_from_slice(&value.data);
                if !value.is_last {
                    continue;
                }
                let bytes = std::mem::take(command);
                let cmd = parse_command(&bytes)?;
                let context = assoc
                    .presentation_contexts()
                    .iter()
                    .find(|pc| {
                        pc.id == value.presentation_context_id
                            && pc.reason == PresentationContextResultReason::Acceptance
                    })
                    .ok_or_else(|| {
                        format!(
                            "command on presentation context {} which was not accepted",
                            value.presentation_context_id
                        )
                    })?
                    .clone();
                match cmd.field {
                    C_ECHO_RQ => {
                        let rsp = response(C_ECHO_RSP, cmd.message_id, None, status::SUCCESS, None);
                        send_command(assoc, value.presentation_context_id, &rsp).await?;
                    }
                    C_STORE_RQ if cmd.has_data_set => {
                        let spool = SpoolWriter::create(
                            &ctx.spool,
                            &cmd.sop_class_uid,
                            &cmd.sop_instance_uid,
                            &context.transfer_syntax,
                        )
                        .map_err(|e| {
                            tracing::error!(error = %e, spool = %ctx.spool.display(), "cannot write the spool file");
                        })
                        .ok();
                        *pending = Some(Pending {
                            context_id: value.presentation_context_id,
                            message_id: cmd.message_id,
                            sop_class_uid: cmd.sop_class_uid,
                            sop_instance_uid: cmd.sop_instance_uid,
                            spool,
                        });
                    }
                    other => return Err(format!("unsupported command {other:#06x}")),
                }
            }
            PDataValueType::Data => {
                let p = pending
                    .as_mut()
                    .ok_or("data set without a C-STORE request")?;
                if p.context_id != value.presentation_context_id {
                    return Err("data set on another presentation context than its command".into());
                }
                if let Some(w) = p.spool.as_mut() {
                    if w.len + value.data.len() > MAX_OBJECT_BYTES {
                        return Err(format!("data set larger than {MAX_OBJECT_BYTES} bytes"));
                    }
                    if let Err(e) = w.write(&value.data) {
                        tracing::error!(error = %e, "cannot write the spool file");
                        p.spool = None;
                    }
                }
                if !value.is_last {
                    continue;
                }
                let Some(p) = pending.take() else { continue };
                let ids = Some((p.sop_class_uid.clone(), p.sop_instance_uid.clone()));
                let answer = match p.spool {
                    Some(w) => store_spooled(&ctx.ingest, &ctx.producer, w).await,
                    None => Answer::retry_later("cannot spool the object; retry later"),
                };
                if answer.fatal {
                    ctx.fatal.store(true, Ordering::SeqCst);
                    ctx.fatal_notify.notify_one();
                }
                let rsp = response(
                    C_STORE_RSP,
                    p.message_id,
                    ids,
                    answer.status,
                    answer.comment.as_deref(),
                );
                send_command(assoc, p.context_id, &rsp).await?;
            }
        }
    }
    Ok(())
}

struct Command {
    field: u16,
    message_id: u16,
    sop_class_uid: String,
    sop_instance_uid: String,
    has_data_set: bool,
}

/// Parses a command set (always implicit VR little endian, PS3.7 6.3.1).
fn parse_command(bytes: &[u8]) -> Result<Command, Ended> {
    fracture_shared::gate::check_dataset(bytes, IMPLICIT_VR_LITTLE_ENDIAN.uid())
        .map_err(|e| format!("unreadable command set: {e}"))?;
    let obj = InMemDicomObject::read_dataset_with_ts(bytes, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .map_err(|e| format!("unreadable command set: {e}"))?;
    let int = |tag| obj.element(tag).ok().and_then(|e| e.to_int::<u16>().ok());
    let text = |tag| {
        obj.element(tag)
            .ok()
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
            .unwrap_or_default()
    };
    Ok(Command {
        field: int(tags::COMMAND_FIELD).ok_or("command set without CommandField")?,
        message_id: int(tags::MESSAGE_ID).unwrap_or(0),
        sop_class_uid: text(tags::AFFECTED_SOP_CLASS_UID),
        sop_instance_uid: text(tags::AFFECTED_SOP_INSTANCE_UID),
        has_data_set: int(tags::COMMAND_DATA_SET_TYPE).is_some_and(|t| t != NO_DATA_SET),
    })
}

/// UI values are padded with NUL and text with a space to an even length (PS3.5 6.2).
fn even(s: &str, pad: char) -> String {
    let mut s = s.to_string();
    if s.len() % 2 == 1 {
        s.push(pad);
    }
    s
}

fn response(
    field: u16,
    message_id: u16,
    ids: Option<(String, String)>,
    status: u16,
    comment: Option<&str>,
) -> InMemDicomObject<StandardDataDictionary> {
    let mut elements = vec![
        DataElement::new(tags::COMMAND_FIELD, VR::US, dicom_value!(U16, [field])),
        DataElement::new(
            tags::MESSAGE_ID_BEING_RESPONDED_TO,
            VR::US,
            dicom_value!(U16, [message_id]),
        ),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            dicom_value!(U16, [NO_DATA_SET]),
        ),
        DataElement::new(tags::STATUS, VR::US, dicom_value!(U16, [status])),
    ];
    if let Some((class, instance)) = ids {
        elements.push(DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            dicom_value!(Str, even(&class, '\0')),
        ));
        elements.push(DataElement::new(
            tags::AFFECTED_SOP_INSTANCE_UID,
            VR::UI,
            dicom_value!(Str, even(&instance, '\0')),
        ));
    }
    if let Some(c) = comment.filter(|_| status != status::SUCCESS) {
        elements.push(DataElement::new(
            tags::ERROR_COMMENT,
            VR::LO,
            dicom_value!(Str, even(&clip(c), ' ')),
        ));
    }
    InMemDicomObject::command_from_element_iter(elements)
}

async fn send_command<S>(
    assoc: &mut AsyncServerAssociation<S>,
    context_id: u8,
    cmd: &InMemDicomObject<StandardDataDictionary>,
) -> Result<(), Ended>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    let mut data = Vec::new();
    cmd.write_dataset_with_ts(&mut data, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .map_err(|e| format!("cannot encode a response: {e}"))?;
    let pdu = Pdu::PData {
        data: vec![PDataValue {
            presentation_context_id: context_id,
            value_type: PDataValueType::Command,
            is_last: true,
            data,
        }],
    };
    assoc
        .send(&pdu)
        .await
        .map_err(|e| format!("cannot send a response: {e}"))
}
