//! The C-STORE SCU the exporter sends with: one association (dicom-ul's async client, over TCP or
//! DICOM TLS) proposing Comprehensive SR and Secondary Capture storage in explicit VR little
//! endian (implicit VR little endian as the fallback every SCP must accept), and one C-STORE per
//! object.

use fracture_shared::config::SettingError;
use std::sync::Arc;
use std::time::Duration;

use dicom_core::{dicom_value, DataElement, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::{DefaultDicomObject, InMemDicomObject, StandardDataDictionary};
use dicom_transfer_syntax_registry::entries::{
    EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN,
};
use dicom_ul::association::client::AsyncTlsStream;
use dicom_ul::association::AsyncClientAssociation;
use dicom_ul::pdu::{PDataValue, PDataValueType, PresentationContextResultReason};
use dicom_ul::{ClientAssociationOptions, Pdu};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

/// The storage classes the exporter sends.
pub const CLASSES: &[&str] = &[
    uids::COMPREHENSIVE_SR_STORAGE,
    uids::SECONDARY_CAPTURE_IMAGE_STORAGE,
];

const C_STORE_RQ: u16 = 0x0001;
const C_STORE_RSP: u16 = 0x8001;
/// Command Data Set Type: a data set follows (any value but 0x0101).
const DATA_SET_PRESENT: u16 = 0x0000;

/// A PACS: its AE title and the address of its DICOM port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pacs {
    pub ae_title: String,
    pub address: String,
}

impl Pacs {
    /// Parses `AE_TITLE@host:port`.
    pub fn parse(s: &str) -> Result<Self, SettingError> {
        let bad = |why: &str| {
            format!("{s:?} is not a PACS address ({why}); write it as AE_TITLE@host:port, e.g. ORTHANC@127.0.0.1:4242")
        };
        let (ae, address) = s.trim().split_once('@').ok_or_else(|| bad("no @"))?;
        if ae.is_empty() || ae.len() > 16 || ae.contains('\\') || ae.trim() != ae {
            return Err(bad("an AE title has 1 to 16 characters, no backslash").into());
        }
        let (host, port) = address.rsplit_once(':').ok_or_else(|| bad("no :port"))?;
        if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(bad("no host, or a port that is not 1 to 65535").into());
        }
        Ok(Self {
            ae_title: ae.to_string(),
            address: address.to_string(),
        })
    }
}

impl std::fmt::Display for Pacs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.ae_title, self.address)
    }
}

/// How a C-STORE ended, by its status (PS3.4 B.2.3, PS3.7 C).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Success, or a warning (coercion, elements discarded): the PACS holds the object.
    Stored(u16),
    /// Out of resources or a processing failure: try again later.
    Busy(u16),
    /// Any other failure: the PACS will not take this object as it is.
    Refused(u16),
}

impl Status {
    pub fn of(code: u16) -> Self {
        match code {
            0x0000 | 0x0001 | 0xB000..=0xBFFF => Status::Stored(code),
            0xA700..=0xA7FF | 0x0110 => Status::Busy(code),
            _ => Status::Refused(code),
        }
    }
}

/// An association could not be made or broke: the PACS is down, unreachable, refused us, or
/// answered nonsense. Always worth another try later.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

fn slow(what: &str, limit: Duration) -> Unavailable {
    Unavailable(format!("no progress {what} for {} ms", limit.as_millis()))
}

/// DICOM TLS to the PACS (PS3.15 B.1): the client configuration and the name the PACS's
/// certificate must carry.
#[derive(Clone)]
pub struct Tls {
    config: Arc<rustls::ClientConfig>,
    server_name: String,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl Tls {
    /// TLS to `pacs`, trusting the system's roots plus the PEM CAs in `ca_file`, presenting
    /// `cert_file`/`key_file` (PEM) when given (a PACS that requires client certificates). The
    /// PACS's certificate must name the host of its address. Errors say which setting to fix.
    pub fn new(
        pacs: &Pacs,
        ca_file: &str,
        cert_file: &str,
        key_file: &str,
    ) -> Result<Self, SettingError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let roots = fracture_edge::tls::ca_roots(ca_file, "export.tls_ca_file", true)?;
        let builder = rustls::ClientConfig::builder_with_provider(fracture_edge::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("cannot set up TLS ({e})"))?
            .with_root_certificates(roots);
        let (cert_file, key_file) = (cert_file.trim(), key_file.trim());
        let config = match (cert_file.is_empty(), key_file.is_empty()) {
            (true, true) => builder.with_no_client_auth(),
            (false, false) => {
                let chain = CertificateDer::pem_file_iter(cert_file)
                    .map_err(|e| format!("cannot read export.tls_cert_file {cert_file} ({e})"))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("export.tls_cert_file {cert_file} is not PEM ({e})"))?;
                let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
                    format!("cannot read a private key from export.tls_key_file {key_file} ({e})")
                })?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    format!("export.tls_cert_file and tls_key_file do not make a usable certificate ({e})")
                })?
            }
            _ => {
                return Err(
                    "export.tls_cert_file and tls_key_file go together: set both, or neither"
                        .into(),
                )
            }
        };
        let host = pacs
            .address
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(&pacs.address)
            .trim_start_matches('[')
            .trim_end_matches(']');
        rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| {
            format!("export.pacs: {host:?} is not a host name TLS can verify ({e})")
        })?;
        Ok(Self {
            config: Arc::new(config),
            server_name: host.to_string(),
        })
    }
}

/// The association, over TCP or TLS.
enum Link {
    Tcp(Box<AsyncClientAssociation<TcpStream>>),
    Tls(Box<AsyncClientAssociation<AsyncTlsStream>>),
}

/// `$body` with `$a` bound to the association, whichever the link.
macro_rules! on_link {
    ($link:expr, $a:ident => $body:expr) => {
        match $link {
            Link::Tcp($a) => $body,
            Link::Tls($a) => $body,
        }
    };
}

/// Writes one data set as P-DATA fragments.
async fn write_pdata<S>(
    a: &mut AsyncClientAssociation<S>,
    context: u8,
    data: &[u8],
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut writer = a.send_pdata(context);
    writer.write_all(data).await?;
    writer.finish().await
}

/// An open association with the PACS.
pub struct Association {
    inner: Link,
    message_id: u16,
    io: Duration,
}

/// Requests an association with `pacs` as `calling`, over DICOM TLS when `tls` is given.
/// `connect` bounds the connection (and TLS handshake) and the association negotiation; `io`
/// bounds each later send or receive.
pub async fn connect(
    pacs: &Pacs,
    calling: &str,
    tls: Option<&Tls>,
    connect: Duration,
    io: Duration,
) -> Result<Association, Unavailable> {
    let mut options = ClientAssociationOptions::new()
        .calling_ae_title(calling.to_string())
        .called_ae_title(pacs.ae_title.clone())
        .connection_timeout(connect)
        .read_timeout(io)
        .write_timeout(io);
    for class in CLASSES {
        options = options.with_presentation_context(
            class.to_string(),
            vec![
                EXPLICIT_VR_LITTLE_ENDIAN.uid().to_string(),
                IMPLICIT_VR_LITTLE_ENDIAN.uid().to_string(),
            ],
        );
    }
    let established = match tls {
        None => tokio::time::timeout(connect, options.establish_async(pacs.address.as_str()))
            .await
            .map(|r| r.map(|a| Link::Tcp(Box::new(a)))),
        Some(tls) => {
            let options = options
                .tls_config(tls.config.clone())
                .server_name(&tls.server_name);
            tokio::time::timeout(connect, options.establish_tls_async(pacs.address.as_str()))
                .await
                .map(|r| r.map(|a| Link::Tls(Box::new(a))))
        }
    };
    let inner = match established {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            // dicom-ul's message names the step; the TLS reason is further down the chain.
            let mut why = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                why = format!("{why}: {s}");
                source = s.source();
            }
            let (tls, hint) = match tls {
                None => ("", ""),
                Some(_) if why.contains("certificate") => (
                    " over TLS",
                    "; set export.tls_ca_file to the CA that issued the PACS's certificate (or check the host in export.pacs)",
                ),
                Some(_) => (" over TLS", ""),
            };
            return Err(Unavailable(format!(
                "no association with {pacs}{tls}: {why}{hint}"
            )));
        }
        Err(_) => {
            return Err(Unavailable(format!(
                "no association with {pacs} within {} ms",
                connect.as_millis()
            )))
        }
    };
    Ok(Association {
        inner,
        message_id: 0,
        io,
    })
}

fn trim(s: &str) -> &str {
    s.trim_end_matches(['\0', ' '])
}

/// UI values are padded with NUL to an even length (PS3.5 6.2).
fn ui(s: &str) -> String {
    let mut s = trim(s).to_string();
    if s.len() % 2 == 1 {
        s.push('\0');
    }
    s
}

impl Association {
    /// C-STOREs `obj` and returns the PACS's status code. The object's SOP class must be one of
    /// [`CLASSES`]; a PACS that accepted no context for it is [`Unavailable`] (misconfigured: it
    /// must be fixed, and nothing is lost meanwhile).
    pub async fn store(&mut self, obj: &DefaultDicomObject) -> Result<u16, Unavailable> {
        let class = trim(obj.meta().media_storage_sop_class_uid()).to_string();
        let instance = trim(obj.meta().media_storage_sop_instance_uid()).to_string();
        let pc = on_link!(&self.inner, a => a.presentation_contexts())
            .iter()
            .find(|pc| {
                pc.reason == PresentationContextResultReason::Acceptance
                    && trim(&pc.abstract_syntax) == class
            })
            .cloned()
            .ok_or_else(|| {
                Unavailable(format!(
                    "the PACS accepted no presentation context for SOP class {class}; \
                     configure it to store that class"
                ))
            })?;
        let ts = if trim(&pc.transfer_syntax) == IMPLICIT_VR_LITTLE_ENDIAN.uid() {
            IMPLICIT_VR_LITTLE_ENDIAN.erased()
        } else {
            EXPLICIT_VR_LITTLE_ENDIAN.erased()
        };
        let mut data = Vec::new();
        obj.write_dataset_with_ts(&mut data, &ts)
            .map_err(|e| Unavailable(format!("cannot encode the object: {e}")))?;
        self.message_id = self.message_id.wrapping_add(1).max(1);
        let command = InMemDicomObject::<StandardDataDictionary>::command_from_element_iter([
            DataElement::new(
                tags::AFFECTED_SOP_CLASS_UID,
                VR::UI,
                dicom_value!(Str, ui(&class)),
            ),
            DataElement::new(tags::COMMAND_FIELD, VR::US, dicom_value!(U16, [C_STORE_RQ])),
            DataElement::new(
                tags::MESSAGE_ID,
                VR::US,
                dicom_value!(U16, [self.message_id]),
            ),
            DataElement::new(tags::PRIORITY, VR::US, dicom_value!(U16, [0])),
            DataElement::new(
                tags::COMMAND_DATA_SET_TYPE,
                VR::US,
                dicom_value!(U16, [DATA_SET_PRESENT]),
            ),
            DataElement::new(
                tags::AFFECTED_SOP_INSTANCE_UID,
                VR::UI,
                dicom_value!(Str, ui(&instance)),
            ),
        ]);
        let mut command_bytes = Vec::new();
        command
            .write_dataset_with_ts(&mut command_bytes, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
            .map_err(|e| Unavailable(format!("cannot encode a C-STORE request: {e}")))?;
        let broke = |what: &str, e: &dyn std::fmt::Display| {
            Unavailable(format!("the association broke while {what}: {e}"))
        };
        let io = self.io;
        let request = Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc.id,
                value_type: PDataValueType::Command,
                is_last: true,
                data: command_bytes,
            }],
        };
        match tokio::time::timeout(io, async {
            on_link!(&mut self.inner, a => a.send(&request).await)
        })
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(broke("sending the request", &e)),
            Err(_) => return Err(slow("sending the request", io)),
        }
        let sent = tokio::time::timeout(io, async {
            on_link!(&mut self.inner, a => write_pdata(a, pc.id, &data).await)
        })
        .await;
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(broke("sending the object", &e)),
            Err(_) => return Err(slow("sending the object", io)),
        }
        self.response(pc.id).await
    }

    /// Reads the C-STORE-RSP (command fragments until the last) and returns its status.
    async fn response(&mut self, context: u8) -> Result<u16, Unavailable> {
        let mut command = Vec::new();
        loop {
            let io = self.io;
            let pdu = match tokio::time::timeout(io, async {
                on_link!(&mut self.inner, a => a.receive().await)
            })
            .await
            {
                Ok(Ok(pdu)) => pdu,
                Ok(Err(e)) => {
                    return Err(Unavailable(format!(
                        "the association broke while waiting for the answer: {e}"
                    )))
                }
                Err(_) => return Err(slow("waiting for the answer to a C-STORE", io)),
            };
            let values = match pdu {
                Pdu::PData { data } => data,
                Pdu::AbortRQ { source } => {
                    return Err(Unavailable(format!(
                        "the PACS aborted the association ({source:?})"
                    )))
                }
                other => {
                    return Err(Unavailable(format!(
                        "unexpected {} instead of a C-STORE answer",
                        other.short_description()
                    )))
                }
            };
            for v in values {
                if v.value_type != PDataValueType::Command || v.presentation_context_id != context {
                    return Err(Unavailable(
                        "the PACS answered a C-STORE with data, or on another context".into(),
                    ));
                }
                command.extend_from_slice(&v.data);
                if !v.is_last {
                    continue;
                }
                let rsp = InMemDicomObject::read_dataset_with_ts(
                    command.as_slice(),
                    &IMPLICIT_VR_LITTLE_ENDIAN.erased(),
                )
                .map_err(|e| Unavailable(format!("unreadable C-STORE answer: {e}")))?;
                let int = |tag| rsp.element(tag).ok().and_then(|e| e.to_int::<u16>().ok());
                if int(tags::COMMAND_FIELD) != Some(C_STORE_RSP)
                    || int(tags::MESSAGE_ID_BEING_RESPONDED_TO) != Some(self.message_id)
                {
                    return Err(Unavailable(
                        "the PACS answered something other than our C-STORE".into(),
                    ));
                }
                return int(tags::STATUS)
                    .ok_or_else(|| Unavailable("a C-STORE answer without a status".into()));
            }
        }
    }

    /// Releases the association (an abort if the PACS does not confirm in time).
    pub async fn release(self) {
        let io = self.io;
        let released = match self.inner {
            Link::Tcp(a) => tokio::time::timeout(io, a.release()).await,
            Link::Tls(a) => tokio::time::timeout(io, a.release()).await,
        };
        if !matches!(released, Ok(Ok(()))) {
            tracing::debug!("the PACS did not confirm the association release");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacs_addresses_parse_or_say_how_to_write_them() {
        assert_eq!(
            Pacs::parse("ORTHANC@127.0.0.1:4242").unwrap(),
            Pacs {
                ae_title: "ORTHANC".into(),
                address: "127.0.0.1:4242".into()
            }
        );
        assert_eq!(
            Pacs::parse("PACS@pacs.example.org:104")
                .unwrap()
                .to_string(),
            "PACS@pacs.example.org:104"
        );
        for bad in [
            "",
            "127.0.0.1:4242",
            "@127.0.0.1:4242",
            "ORTHANC@127.0.0.1",
            "ORTHANC@:4242",
            "ORTHANC@host:0",
            "ORTHANC@host:99999",
            "A_TITLE_LONGER_THAN_16@host:104",
        ] {
            let e = Pacs::parse(bad).unwrap_err();
            assert!(e.0.contains("AE_TITLE@host:port"), "{bad}: {e}");
        }
    }

    #[test]
    fn statuses_are_stored_busy_or_refused() {
        assert_eq!(Status::of(0x0000), Status::Stored(0));
        assert_eq!(Status::of(0xB000), Status::Stored(0xB000));
        assert_eq!(Status::of(0xB007), Status::Stored(0xB007));
        assert_eq!(Status::of(0xA700), Status::Busy(0xA700));
        assert_eq!(Status::of(0x0110), Status::Busy(0x0110));
        assert_eq!(Status::of(0xA900), Status::Refused(0xA900));
        assert_eq!(Status::of(0xC000), Status::Refused(0xC000));
        assert_eq!(Status::of(0x0122), Status::Refused(0x0122));
    }
}
