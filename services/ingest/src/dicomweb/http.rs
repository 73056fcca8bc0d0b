//! A small HTTP/1.1 client for QIDO-RS and WADO-RS: one kept-alive connection to one PACS,
//! every request bounded in time and size, over TLS (rustls) for an `https://` URL. Errors never
//! carry the URL's path (it holds study UIDs); they may name the host.

use super::SettingError;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::client::conn::http1;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, ACCEPT, CONTENT_LENGTH, HOST, USER_AGENT};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::TlsConnector;

/// Where the PACS's DICOMweb service lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `https://`: the connection is TLS, the server's certificate verified for `host`.
    pub https: bool,
    pub host: String,
    pub port: u16,
    /// `host:port` as the Host header wants it.
    pub authority: String,
    /// The base path without a trailing slash (`/dicom-web`, or empty).
    pub base_path: String,
}

impl Endpoint {
    /// Parses `http[s]://host[:port][/path]` (ports 80 and 443 by default).
    pub fn parse(url: &str) -> Result<Self, SettingError> {
        let uri: Uri = url
            .trim()
            .parse()
            .map_err(|e| SettingError(format!("ingest.dicomweb.url is not a URL ({e})")))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                return Err(SettingError(
                    "ingest.dicomweb.url must start with https:// or http://".into(),
                ))
            }
        };
        if uri.query().is_some() {
            return Err(SettingError(
                "ingest.dicomweb.url must not have a query (?...)".into(),
            ));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| SettingError("ingest.dicomweb.url has no host".into()))?;
        if authority.as_str().contains('@') {
            return Err(SettingError("ingest.dicomweb.url must not hold credentials; put them in ingest.dicomweb.auth_header_file".into()));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        Ok(Self {
            https,
            authority: authority.as_str().to_string(),
            host,
            port,
            base_path: uri.path().trim_end_matches('/').to_string(),
        })
    }
}

/// A response read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: HeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Transport failures: the PACS may come back, so callers retry them.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HttpError {
    #[error("cannot connect to the PACS at {0}: {1}")]
    Connect(String, String),
    /// Not transient: the TLS handshake failed (an untrusted or wrong certificate, no common
    /// protocol); the message says what to change.
    #[error("{0}")]
    Tls(String),
    #[error("the PACS did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the connection to the PACS failed: {0}")]
    Io(String),
    /// Not transient: the object is larger than allowed.
    #[error("the PACS sent a body larger than {0} bytes (ingest.dicomweb.max_object_bytes)")]
    TooLarge(u64),
}

/// One PACS, one connection at a time (kept alive between requests).
pub struct Client {
    endpoint: Endpoint,
    auth: Option<(HeaderName, HeaderValue)>,
    timeout: Duration,
    /// Set for an `https://` endpoint.
    tls: Option<TlsConnector>,
    sender: Option<http1::SendRequest<Empty<Bytes>>>,
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Client {
    /// A client for `endpoint`; an `https://` one needs `tls` (see [`tls_connector`]).
    pub fn new(
        endpoint: Endpoint,
        auth: Option<(HeaderName, HeaderValue)>,
        timeout: Duration,
        tls: Option<TlsConnector>,
    ) -> Self {
        Self {
            endpoint,
            auth,
            timeout,
            tls,
            sender: None,
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// GETs `base_path + path_and_query` and reads the whole body (at most `max_body` bytes),
    /// all within the client's timeout.
    pub async fn get(
        &mut self,
        path_and_query: &str,
        accept: &str,
        max_body: u64,
    ) -> Result<Reply, HttpError> {
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.get_inner(path_and_query, accept, max_body)).await
        {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                self.sender = None;
                Err(e)
            }
            Err(_) => {
                // The connection is in an unknown state: never reuse it.
                self.sender = None;
                Err(HttpError::Timeout(timeout))
            }
        }
    }

    async fn get_inner(
        &mut self,
        path_and_query: &str,
        accept: &str,
        max_body: u64,
    ) -> Result<Reply, HttpError> {
        let target = format!("{}{}", self.endpoint.base_path, path_and_query);
        let mut request = Request::builder()
            .method(Method::GET)
            .uri(target)
            .header(HOST, self.endpoint.authority.as_str())
            .header(ACCEPT, accept)
            .header(USER_AGENT, concat!("fracture/", env!("CARGO_PKG_VERSION")));
        if let Some((name, value)) = &self.auth {
            request = request.header(name, value);
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .map_err(|e| HttpError::Io(format!("cannot build the request: {e}")))?;
        let sender = self.ready_sender().await?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| HttpError::Io(e.to_string()))?;
        let (parts, body) = response.into_parts();
        let declared = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max_body) {
            return Err(HttpError::TooLarge(max_body));
        }
        let limit = usize::try_from(max_body).unwrap_or(usize::MAX);
        let body = Limited::new(body, limit).collect().await.map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                HttpError::TooLarge(max_body)
            } else {
                HttpError::Io(e.to_string())
            }
        })?;
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body: body.to_bytes(),
        })
    }

    /// The kept-alive connection when it can take a request, else a new one.
    async fn ready_sender(&mut self) -> Result<&mut http1::SendRequest<Empty<Bytes>>, HttpError> {
        let reusable = match self.sender.as_mut() {
            Some(s) => s.ready().await.is_ok(),
            None => false,
        };
        if !reusable {
            self.sender = Some(self.connect().await?);
        }
        Ok(self.sender.as_mut().expect("set above"))
    }

    async fn connect(&self) -> Result<http1::SendRequest<Empty<Bytes>>, HttpError> {
        let where_ = self.endpoint.authority.clone();
        let connected = async {
            let stream = TcpStream::connect((self.endpoint.host.as_str(), self.endpoint.port))
                .await
                .map_err(|e| HttpError::Connect(where_.clone(), e.to_string()))?;
            let _ = stream.set_nodelay(true);
            if !self.endpoint.https {
                return handshake(TokioIo::new(stream), &where_).await;
            }
            let Some(tls) = &self.tls else {
                return Err(HttpError::Tls(
                    "an https:// PACS needs a TLS configuration (a bug: none was given)".into(),
                ));
            };
            let name = rustls::pki_types::ServerName::try_from(self.endpoint.host.clone())
                .map_err(|_| {
                    HttpError::Tls(format!(
                        "ingest.dicomweb.url: {:?} is neither a DNS name nor an IP address a TLS certificate can name",
                        self.endpoint.host
                    ))
                })?;
            let stream = tls
                .connect(name, stream)
                .await
                .map_err(|e| tls_error(&self.endpoint, e))?;
            handshake(TokioIo::new(stream), &where_).await
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connected)
            .await
            .map_err(|_| HttpError::Connect(where_.clone(), "timed out".into()))?
    }
}

/// The HTTP/1.1 handshake on a connected stream; the connection is driven by a task of its own.
async fn handshake<T>(io: T, where_: &str) -> Result<http1::SendRequest<Empty<Bytes>>, HttpError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = http1::handshake(io)
        .await
        .map_err(|e| HttpError::Connect(where_.to_string(), e.to_string()))?;
    tokio::spawn(async move {
        // Ends when the sender is dropped or the peer closes; errors surface on the sender.
        let _ = connection.await;
    });
    Ok(sender)
}

/// The TLS setup for an `https://` PACS: rustls (ring), trusting the system's root
/// certificates and those of `ca_file` (a PEM bundle, e.g. the hospital's internal CA; empty:
/// none). The server's certificate is always verified, for the URL's host.
pub fn tls_connector(ca_file: &str) -> Result<TlsConnector, SettingError> {
    let roots = fracture_edge::tls::ca_roots(ca_file, "ingest.dicomweb.ca_file", true)
        .map_err(|e| SettingError(e.to_string()))?;
    let mut config = rustls::ClientConfig::builder_with_provider(fracture_edge::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| SettingError(format!("cannot set up TLS ({e})")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// A failed TLS handshake: a rustls verdict (the certificate, the protocol) will not change by
/// waiting, so it stops the scan with what to do; a broken connection is retried.
fn tls_error(endpoint: &Endpoint, e: std::io::Error) -> HttpError {
    use rustls::{CertificateError as C, Error as R};
    let Some(verdict) = e.get_ref().and_then(|i| i.downcast_ref::<R>()) else {
        return HttpError::Connect(endpoint.authority.clone(), format!("TLS handshake: {e}"));
    };
    let host = &endpoint.host;
    HttpError::Tls(match verdict {
        R::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => format!(
            "the TLS certificate of the PACS at {host} is not trusted (its issuer is not a known CA); set ingest.dicomweb.ca_file to a PEM file holding the PACS's CA certificate (e.g. the hospital's internal CA)"
        ),
        R::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => format!(
            "the TLS certificate of the PACS is not valid for the host {host:?}; put a host name the certificate names in ingest.dicomweb.url"
        ),
        R::InvalidCertificate(
            C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. },
        ) => format!(
            "the TLS certificate of the PACS at {host} has expired or is not valid yet; have the PACS's certificate renewed (or check this machine's clock)"
        ),
        R::InvalidCertificate(other) => format!(
            "the TLS certificate of the PACS at {host} was refused ({other:?}); have it replaced, or set ingest.dicomweb.ca_file to the CA that issued it"
        ),
        other => format!(
            "the TLS handshake with the PACS at {host} failed ({other}); check that ingest.dicomweb.url names the PACS's HTTPS port"
        ),
    })
}

/// Reads an auth header file: `Name: value` sends that header; a bare value is sent as
/// `Authorization`. The value is never logged.
pub fn auth_header(text: &str) -> Result<(HeaderName, HeaderValue), SettingError> {
    let line = text.trim();
    if line.is_empty() {
        return Err(SettingError("the auth header file is empty".into()));
    }
    if line.contains('\n') {
        return Err(SettingError(
            "the auth header file must hold one line".into(),
        ));
    }
    let (name, value) = match line.split_once(':') {
        Some((n, v))
            if !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') =>
        {
            (n.trim(), v.trim())
        }
        _ => ("Authorization", line),
    };
    let name = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| SettingError("the auth header file names an invalid header".into()))?;
    let mut value = HeaderValue::from_str(value).map_err(|_| {
        SettingError("the auth header file holds characters a header cannot carry".into())
    })?;
    value.set_sensitive(true);
    Ok((name, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_refuse_what_we_cannot_use() {
        let e = Endpoint::parse("http://127.0.0.1:8042/dicom-web/").expect("parses");
        assert_eq!((e.host.as_str(), e.port), ("127.0.0.1", 8042));
        assert_eq!(e.base_path, "/dicom-web");
        assert_eq!(e.authority, "127.0.0.1:8042");
        assert!(!e.https);
        let e = Endpoint::parse("http://[::1]/").expect("parses");
        assert_eq!(
            (e.host.as_str(), e.port, e.base_path.as_str()),
            ("::1", 80, "")
        );
        let e = Endpoint::parse("https://pacs.example.org/dicom-web").expect("parses");
        assert!(e.https);
        assert_eq!(
            (e.host.as_str(), e.port, e.authority.as_str()),
            ("pacs.example.org", 443, "pacs.example.org")
        );
        let e = Endpoint::parse("https://10.0.0.7:8443/").expect("parses");
        assert_eq!((e.port, e.base_path.as_str()), (8443, ""));
        for bad in [
            "ftp://pacs",
            "http://user:pw@pacs/",
            "http://pacs/?x=1",
            "pacs",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn auth_files_give_a_sensitive_header() {
        let (n, v) = auth_header("Authorization: Bearer abc.def\n").expect("a header");
        assert_eq!(n, "authorization");
        assert_eq!(v, "Bearer abc.def");
        assert!(v.is_sensitive());
        let (n, v) = auth_header("Basic Zm9vOmJhcg==").expect("a bare value");
        assert_eq!(n, "authorization");
        assert_eq!(v, "Basic Zm9vOmJhcg==");
        let (n, _) = auth_header("X-Api-Key: k").expect("another header");
        assert_eq!(n, "x-api-key");
        assert!(auth_header("").is_err());
        assert!(auth_header("a\nb").is_err());
    }

    #[test]
    fn a_ca_file_must_hold_certificates() {
        tls_connector("").expect("the system roots alone");
        let dir = tempfile::tempdir().expect("a temp folder");
        let missing = dir.path().join("missing.pem");
        let e = tls_connector(&missing.display().to_string())
            .err()
            .expect("refused");
        assert!(e.0.contains("cannot read ingest.dicomweb.ca_file"), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let e = tls_connector(&empty.display().to_string())
            .err()
            .expect("refused");
        assert!(e.0.contains("holds no certificate"), "{e}");
    }
}
