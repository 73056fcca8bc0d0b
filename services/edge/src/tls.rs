//! TLS setup shared by every door and link that speaks it (DICOMweb's HTTPS client, the DICOM
//! TLS C-STORE door, the export to the PACS): rustls on ring, and trust roots read from PEM
//! with errors that name the setting to fix.

use std::sync::Arc;

use fracture_shared::config::SettingError;
use tokio_rustls::rustls::{self, pki_types::pem::PemObject, pki_types::CertificateDer};

/// The crypto provider every TLS configuration here uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Trust roots: the system's when `system`, plus every certificate of the PEM bundle `ca_file`
/// (none when empty). `setting` names the configuration key in errors.
pub fn ca_roots(
    ca_file: &str,
    setting: &str,
    system: bool,
) -> Result<rustls::RootCertStore, SettingError> {
    let mut roots = rustls::RootCertStore::empty();
    if system {
        let native = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(native.certs);
        if !native.errors.is_empty() {
            // Only a problem if the peer's certificate chains to a root that could not be read.
            tracing::debug!(
                errors = native.errors.len(),
                "some system root certificates could not be read"
            );
        }
        tracing::debug!(system = added, "TLS system trust anchors loaded");
    }
    let ca_file = ca_file.trim();
    if ca_file.is_empty() {
        return Ok(roots);
    }
    let certs = CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| format!("cannot read {setting} {ca_file} ({e})"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{setting} {ca_file} is not a PEM bundle ({e})"))?;
    if certs.is_empty() {
        return Err(SettingError(format!(
            "{setting} {ca_file} holds no certificate (-----BEGIN CERTIFICATE-----); give the PEM file of the CA that issued the peer's certificate"
        )));
    }
    for cert in certs {
        roots.add(cert).map_err(|e| {
            format!("{setting} {ca_file} holds a certificate that cannot be trusted as a CA ({e})")
        })?;
    }
    Ok(roots)
}
