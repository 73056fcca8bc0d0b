//! The DICOMweb doors: a resumable QIDO-RS + WADO-RS back-scan of a PACS, and a STOW-RS endpoint
//! that PACS and modalities push to. Both spool, ingest and publish like the C-STORE door.
//!
//! PHI: study, series and instance UIDs and the URLs that hold them are identifiers. They are
//! never logged; logs carry counts and pseudonymous input references only.

pub mod backscan;
pub mod http;
pub mod multipart;
pub mod stow;

use std::path::{Path, PathBuf};

pub use backscan::{back_scan, ScanError, ScanReport};
pub use stow::{serve_stow, serve_stow_on};

/// `[ingest.dicomweb]`
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DicomwebConfig {
    /// Base URL of a PACS's DICOMweb service to back-scan, e.g. `https://pacs/dicom-web` or
    /// `http://pacs:8042/dicom-web` (`fracture serve ingest` scans it once at start, resuming
    /// where an earlier run stopped). Empty: no back-scan. With `https://` the PACS's certificate
    /// is verified for the URL's host against the system's root certificates and `ca_file`.
    pub url: String,
    /// A PEM file of CA certificates trusted, besides the system's, for an `https://` url: the
    /// CA that issued the PACS's certificate (e.g. the hospital's internal CA). Empty: the
    /// system's only. Verification cannot be turned off.
    pub ca_file: String,
    /// A file holding one header sent with every request to the PACS: `Name: value` (e.g.
    /// `Authorization: Bearer ...`), or a bare value sent as `Authorization`. Empty: none.
    pub auth_header_file: String,
    /// Modalities to scan: studies are found by ModalitiesInStudy, then only series of these
    /// modalities and instances of CR/DX storage classes are retrieved.
    pub modalities: Vec<String>,
    /// Study dates to scan, `YYYYMMDD-YYYYMMDD`; either end may be left open (`20200101-`), or
    /// one date. Empty: every date.
    pub study_dates: String,
    /// Results per QIDO-RS request (limit/offset paging).
    pub page_size: usize,
    /// Seconds one request to the PACS may take, the retrieved object included.
    pub timeout_s: u64,
    /// The largest object retrieved or accepted, in bytes (radiographs are 5-50 MB).
    pub max_object_bytes: u64,
    /// Folder for objects while they are ingested (mode 0700: it holds PHI for the seconds an
    /// object takes; each file is removed once handled). The references of back-scanned
    /// instances derive from `url` (and the key), not from this folder: it may move between the
    /// runs of one back-scan, but a changed `url` starts it over.
    pub spool: String,
    /// Address for the STOW-RS endpoint (`POST /studies`, `POST /studies/{study}`), e.g.
    /// `0.0.0.0:8043`. Empty: closed. Plain HTTP: put a TLS terminator in front of it on any
    /// network that is not trusted.
    pub stow_listen: String,
    /// A file holding the bearer token STOW-RS clients must send (`Authorization: Bearer ...`).
    /// Empty: no authentication (keep the endpoint on a trusted network).
    pub stow_token_file: String,
    /// The largest STOW-RS request body, in bytes; larger requests are answered 413.
    pub stow_max_bytes: u64,
    /// STOW-RS requests handled at once; more are answered 503 with Retry-After.
    pub stow_max_requests: usize,
    /// Seconds a STOW-RS body may stall before the request is answered 408 (a stalled sender
    /// would hold a request slot for good).
    pub stow_idle_timeout_s: u64,
}

impl Default for DicomwebConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            ca_file: String::new(),
            auth_header_file: String::new(),
            modalities: vec!["CR".into(), "DX".into()],
            study_dates: String::new(),
            page_size: 100,
            timeout_s: 120,
            max_object_bytes: 1 << 30,
            spool: "fracture-dicomweb-spool".into(),
            stow_listen: String::new(),
            stow_token_file: String::new(),
            stow_max_bytes: 1 << 30,
            stow_max_requests: 4,
            stow_idle_timeout_s: 30,
        }
    }
}

pub use fracture_shared::config::SettingError;

impl DicomwebConfig {
    /// Checks the back-scan filters; the message names the key.
    pub fn validate_scan(&self) -> Result<(), SettingError> {
        if self.modalities.is_empty() {
            return Err(SettingError(
                "ingest.dicomweb.modalities is empty; list the modalities to scan, e.g. [\"CR\", \"DX\"]".into(),
            ));
        }
        for m in &self.modalities {
            if m.is_empty()
                || m.len() > 16
                || !m
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            {
                return Err(SettingError(format!(
                    "ingest.dicomweb.modalities: {m:?} is not a DICOM modality code (upper case, e.g. CR, DX)"
                )));
            }
        }
        if !valid_date_range(&self.study_dates) {
            return Err(SettingError(format!(
                "ingest.dicomweb.study_dates {:?} is not YYYYMMDD-YYYYMMDD (either end may be empty) or one YYYYMMDD",
                self.study_dates
            )));
        }
        if self.page_size == 0 {
            return Err(SettingError(
                "ingest.dicomweb.page_size must be at least 1".into(),
            ));
        }
        Ok(())
    }

    pub(crate) fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.timeout_s.max(1))
    }

    pub(crate) fn spool_dir(&self) -> PathBuf {
        PathBuf::from(&self.spool)
    }
}

fn valid_date_range(s: &str) -> bool {
    let date = |d: &str| {
        d.len() == 8
            && d.bytes().all(|b| b.is_ascii_digit())
            && matches!(d[4..6].parse::<u32>(), Ok(1..=12))
            && matches!(d[6..8].parse::<u32>(), Ok(1..=31))
    };
    match s.split_once('-') {
        None => s.is_empty() || date(s),
        Some((a, b)) => (a.is_empty() || date(a)) && (b.is_empty() || date(b)) && s != "-",
    }
}

/// A UID as DICOM defines it (digits and dots, at most 64 characters). Values from a PACS or a
/// client are checked before they go into a path or a response.
pub(crate) fn is_uid(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && !s.starts_with('.')
        && !s.ends_with('.')
}

/// Creates a spool folder with mode 0700 and removes the files of ours (`prefix*`) a previous
/// run left: they were never acknowledged or published, and the next fetch or send brings them
/// again.
pub(crate) fn prepare_spool(dir: &Path, prefix: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let mut swept = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        let ours = name.starts_with(prefix) || name.starts_with(&format!(".{prefix}"));
        if ours && std::fs::remove_file(entry.path()).is_ok() {
            swept += 1;
        }
    }
    if swept > 0 {
        tracing::warn!(files = swept, spool = %dir.display(), "removed spool files left by an earlier run");
    }
    Ok(())
}

/// Puts the 128-byte preamble in front of a PS3.10 stream that lacks it (some servers send
/// `DICM` first); anything else is left for ingest to judge.
pub(crate) fn with_preamble(bytes: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if bytes.starts_with(b"DICM") {
        let mut v = vec![0u8; 128];
        v.extend_from_slice(bytes);
        std::borrow::Cow::Owned(v)
    } else {
        std::borrow::Cow::Borrowed(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_ranges_are_checked() {
        for ok in [
            "",
            "20200101",
            "20200101-20201231",
            "20200101-",
            "-20201231",
        ] {
            assert!(valid_date_range(ok), "{ok}");
        }
        for bad in [
            "-",
            "2020",
            "20201301-",
            "2020-01-01",
            "20200101-2020123x",
            "x",
        ] {
            assert!(!valid_date_range(bad), "{bad}");
        }
    }

    #[test]
    fn the_default_scans_radiographs_and_validates() {
        let c = DicomwebConfig::default();
        assert_eq!(c.modalities, ["CR", "DX"]);
        c.validate_scan().expect("the default is valid");
        let bad = DicomwebConfig {
            modalities: vec!["cr".into()],
            ..Default::default()
        };
        assert!(bad.validate_scan().is_err());
    }

    #[test]
    fn uids_are_digits_and_dots() {
        assert!(is_uid("1.2.840.10008.5.1.4.1.1.1"));
        assert!(!is_uid("1.2/../x"));
        assert!(!is_uid(""));
        assert!(!is_uid(&"1".repeat(65)));
    }
}
