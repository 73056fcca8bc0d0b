//! The linkage table: pseudonym -> original identifiers and source. The site's re-identification
//! key; it stays at the edge, readable by its owner only (mode 0600).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkageRow {
    pub input: String,
    pub source: String,
    pub study_instance_uid: String,
    pub sop_instance_uid: String,
    pub original_study_instance_uid: String,
    pub original_sop_instance_uid: String,
}

pub const HEADER: &str = "input,source,study_instance_uid,sop_instance_uid,original_study_instance_uid,original_sop_instance_uid";

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Append-only CSV, flushed and synced per row so a crash never loses a link to a published result.
pub struct Linkage {
    path: PathBuf,
    file: Mutex<File>,
}

impl Linkage {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut opts = OpenOptions::new();
        opts.create(true).append(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut file = opts.open(path)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        }
        if file.metadata()?.len() == 0 {
            writeln!(file, "{HEADER}")?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn record(&self, row: &LinkageRow) -> std::io::Result<()> {
        let line = [
            &row.input,
            &row.source,
            &row.study_instance_uid,
            &row.sop_instance_uid,
            &row.original_study_instance_uid,
            &row.original_sop_instance_uid,
        ]
        .iter()
        .map(|s| csv_field(s))
        .collect::<Vec<_>>()
        .join(",");
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        writeln!(f, "{line}")?;
        f.sync_data()
    }
}

/// Reads a linkage table back: input -> source path (for reports at the edge).
pub fn read_sources(path: &Path) -> std::io::Result<std::collections::HashMap<String, String>> {
    let text = std::fs::read_to_string(path)?;
    let mut map = std::collections::HashMap::new();
    for line in text.lines().skip(1) {
        let fields = parse_csv_line(line);
        if fields.len() >= 2 {
            map.insert(fields[0].clone(), fields[1].clone());
        }
    }
    Ok(map)
}

fn parse_csv_line(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => out.push(std::mem::take(&mut cur)),
            (c, _) => cur.push(c),
        }
    }
    out.push(cur);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_and_file_is_private() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("linkage.csv");
        let l = Linkage::open(&p).unwrap();
        l.record(&LinkageRow {
            input: "in-1".into(),
            source: "/a,b/\"c\".dcm".into(),
            ..Default::default()
        })
        .unwrap();
        drop(l);
        let l = Linkage::open(&p).unwrap();
        l.record(&LinkageRow {
            input: "in-2".into(),
            source: "/x.dcm".into(),
            ..Default::default()
        })
        .unwrap();
        let m = read_sources(&p).unwrap();
        assert_eq!(m["in-1"], "/a,b/\"c\".dcm");
        assert_eq!(m["in-2"], "/x.dcm");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
