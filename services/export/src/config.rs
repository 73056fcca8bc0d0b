//! `[export]`: the PACS, the edge files and the limits of `fracture serve export`.

use fracture_shared::config::SettingError;
use fracture_shared::stage::BatchConfig;

use crate::scu::{Pacs, Tls};

/// `[export]`: where `fracture serve export` sends the results, and what it reads and keeps.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// The PACS: `AE_TITLE@host:port`, e.g. `ORTHANC@127.0.0.1:4242`.
    pub pacs: String,
    /// The site whose results this edge sends back (its ingest's `site_code`), where several
    /// hospitals share one cluster: the export then reads every finding in a consumer group of
    /// its own (`<prefix>.export.<site_code>`), and one of another site is passed over unopened
    /// (not looked up, not logged). Empty: every finding this edge's linkage table knows.
    pub site_code: String,
    /// Our AE title, as the PACS knows us.
    pub calling_ae_title: String,
    /// Ingest's linkage table (`ingest.linkage`), or a folder of them (`*.db`, one per ingest
    /// replica). Read only.
    pub linkage: String,
    /// The export ledger (SQLite, created with mode 0600): what was sent and what the PACS said.
    pub ledger: String,
    /// Limit on connecting and negotiating an association, in milliseconds.
    pub connect_timeout_ms: u64,
    /// Limit on each send to and answer from the PACS, in milliseconds.
    pub timeout_ms: u64,
    /// Findings per batch (one transaction) of the export consumer.
    pub batch: BatchConfig,
    /// DICOM TLS to the PACS (PS3.15 B.1): its certificate is verified against the system's
    /// roots and `tls_ca_file`, for the host of `pacs`.
    pub tls: bool,
    /// A PEM bundle of CAs trusted besides the system's (e.g. the hospital's internal CA).
    pub tls_ca_file: String,
    /// Our certificate chain and key (PEM), for a PACS that requires client certificates.
    pub tls_cert_file: String,
    pub tls_key_file: String,
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            pacs: String::new(),
            site_code: String::new(),
            calling_ae_title: "FRACTURE".into(),
            linkage: "fracture-linkage.db".into(),
            ledger: "fracture-export-ledger.db".into(),
            connect_timeout_ms: 10_000,
            timeout_ms: 60_000,
            batch: BatchConfig::default(),
            tls: false,
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
        }
    }
}

impl ExportConfig {
    /// Checks what can be checked before the first finding, saying what to fix.
    pub fn validate(&self) -> Result<Pacs, SettingError> {
        let pacs = Pacs::parse(&self.pacs).map_err(|e| format!("export.pacs: {e}"))?;
        let calling = &self.calling_ae_title;
        if calling.is_empty() || calling.len() > 16 || calling.contains('\\') {
            return Err(SettingError(format!(
                "export.calling_ae_title {calling:?}: an AE title has 1 to 16 characters, no backslash"
            )));
        }
        let site = &self.site_code;
        if !site
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
            || site.len() > 64
        {
            return Err(SettingError(format!(
                "export.site_code {site:?}: up to 64 letters, digits, '-' or '_' (it names the \
                 export's consumer group), the site_code of this edge's ingest"
            )));
        }
        for (key, v) in [("linkage", &self.linkage), ("ledger", &self.ledger)] {
            if v.trim().is_empty() {
                return Err(SettingError(format!(
                    "export.{key} is empty: give a file path"
                )));
            }
        }
        if self.connect_timeout_ms == 0 || self.timeout_ms == 0 {
            return Err("export timeouts must be above 0 ms".into());
        }
        let tls_files = [&self.tls_ca_file, &self.tls_cert_file, &self.tls_key_file];
        if !self.tls && tls_files.iter().any(|f| !f.trim().is_empty()) {
            return Err(
                "export.tls_* files are set but tls is false: set tls = true for DICOM TLS to the PACS, or remove them".into(),
            );
        }
        Ok(pacs)
    }

    /// The TLS setup for the PACS, when `tls` is on.
    pub fn tls_setup(&self, pacs: &Pacs) -> Result<Option<Tls>, SettingError> {
        if !self.tls {
            return Ok(None);
        }
        Tls::new(
            pacs,
            &self.tls_ca_file,
            &self.tls_cert_file,
            &self.tls_key_file,
        )
        .map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_that_cannot_work_are_refused_naming_the_key() {
        let e = ExportConfig::default().validate().unwrap_err();
        assert!(e.0.starts_with("export.pacs: "), "{e}");
        let good = ExportConfig {
            pacs: "ORTHANC@127.0.0.1:4242".into(),
            ..Default::default()
        };
        assert_eq!(
            good.validate().unwrap().to_string(),
            "ORTHANC@127.0.0.1:4242"
        );
        assert!(good.tls_setup(&good.validate().unwrap()).unwrap().is_none());
        for (bad, says) in [
            (
                ExportConfig {
                    calling_ae_title: "A_TITLE_LONGER_THAN_16".into(),
                    ..good.clone()
                },
                "export.calling_ae_title",
            ),
            (
                ExportConfig {
                    ledger: " ".into(),
                    ..good.clone()
                },
                "export.ledger",
            ),
            (
                ExportConfig {
                    site_code: "north side".into(),
                    ..good.clone()
                },
                "export.site_code",
            ),
            (
                ExportConfig {
                    timeout_ms: 0,
                    ..good.clone()
                },
                "export timeouts",
            ),
            (
                ExportConfig {
                    tls_ca_file: "/ca.pem".into(),
                    ..good.clone()
                },
                "export.tls_* files",
            ),
        ] {
            let e = bad.validate().unwrap_err();
            assert!(e.0.contains(says), "{says}: {e}");
        }
    }
}
