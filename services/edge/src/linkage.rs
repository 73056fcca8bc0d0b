//! The linkage table: pseudonym -> original identifiers and source. The site's re-identification
//! key: it stays at the edge, in its own SQLite database readable by its owner only (mode 0600),
//! so that results can go back to the right patient (`fracture serve export` reads it with
//! [`LinkageReader`]) and refused inputs can be traced to their files.
//!
//! Two tables:
//! - `inputs`: every input ingest published something for (a radiograph or a dead letter): its
//!   pseudonymous reference, its source (a path or a door; paths can hold names, so this stays
//!   here too) and the pseudonymous SOP Instance UID of the radiograph it became, if any;
//! - `instances`, keyed by the pseudonymous SOP Instance UID: the pseudonymous study and series
//!   UIDs and the original identifiers of [`Originals::ATTRIBUTES`] (UIDs, patient, study).
//!
//! Writes are durable before [`Linkage::record`] returns (WAL, `synchronous=FULL`): ingest records
//! the link before it publishes, so every published result can be traced back. Rows are upserts,
//! so a retried or resumed ingest writes the same row again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
// Dynamic SQL here is built from compile-time names only (the columns of
// `Originals::ATTRIBUTES`); every value is a bound parameter.
use sqlx::{AssertSqlSafe, Row};

use crate::db::{edge_database, EdgeDbError};
pub use crate::originals::Originals;

/// One input as ingest recorded it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkageRow {
    /// The pseudonymous input reference (`RadiographId::input`).
    pub input: String,
    /// Where it came from (a path, or a door); stays at the edge.
    pub source: String,
    /// The pseudonymous UIDs of the radiograph it became; empty for a refused input.
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub sop_instance_uid: String,
    /// The original identifiers; `None` for an input refused before they could be read.
    pub original: Option<Originals>,
}

/// What the exporter needs to re-identify a result about one radiograph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// The pseudonymous UIDs the result carries.
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub sop_instance_uid: String,
    /// The originals they stand for.
    pub original: Originals,
}

pub type LinkageError = EdgeDbError;

const LINKAGE: &str = "linkage table";

fn error(path: &Path, message: impl std::fmt::Display) -> LinkageError {
    EdgeDbError {
        what: LINKAGE,
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

const SCHEMA_VERSION: i64 = 1;

fn original_column(field: &str) -> String {
    format!("original_{field}")
}

fn schema() -> Vec<String> {
    let originals: String = Originals::ATTRIBUTES
        .iter()
        .map(|(f, _, _)| format!(",\n        {} TEXT NOT NULL", original_column(f)))
        .collect();
    vec![
        "CREATE TABLE IF NOT EXISTS inputs (
        input TEXT PRIMARY KEY,
        source TEXT NOT NULL,
        sop_instance_uid TEXT,
        recorded_ms INTEGER NOT NULL
    )"
        .to_string(),
        format!(
            "CREATE TABLE IF NOT EXISTS instances (
        sop_instance_uid TEXT PRIMARY KEY,
        study_instance_uid TEXT NOT NULL,
        series_instance_uid TEXT NOT NULL{originals},
        recorded_ms INTEGER NOT NULL
    )"
        ),
    ]
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The writer: ingest's handle on its linkage table.
pub struct Linkage {
    path: PathBuf,
    pool: SqlitePool,
}

impl Linkage {
    /// Opens (creating, mode 0600) the linkage database at `path`.
    pub async fn open(path: &Path) -> Result<Self, LinkageError> {
        let pool = edge_database(path, LINKAGE).await?;
        let version: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&pool)
            .await
            .map_err(|e| error(path, e))?;
        if version > SCHEMA_VERSION {
            return Err(error(
                path,
                format!("made by a newer release (schema {version}, this one knows {SCHEMA_VERSION}); upgrade this ingest"),
            ));
        }
        for stmt in schema() {
            sqlx::query(AssertSqlSafe(stmt))
                .execute(&pool)
                .await
                .map_err(|e| error(path, e))?;
        }
        sqlx::query(AssertSqlSafe(format!(
            "PRAGMA user_version = {SCHEMA_VERSION}"
        )))
        .execute(&pool)
        .await
        .map_err(|e| error(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            pool,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records one input (and the radiograph it became), durably, in one transaction.
    pub async fn record(&self, row: &LinkageRow) -> Result<(), LinkageError> {
        let path = &self.path;
        let now = now_ms();
        let mut tx = self.pool.begin().await.map_err(|e| error(path, e))?;
        let sop = Some(row.sop_instance_uid.as_str()).filter(|s| !s.is_empty());
        sqlx::query(
            "INSERT INTO inputs (input, source, sop_instance_uid, recorded_ms) VALUES (?, ?, ?, ?)
             ON CONFLICT (input) DO UPDATE SET source = excluded.source,
                 sop_instance_uid = excluded.sop_instance_uid, recorded_ms = excluded.recorded_ms",
        )
        .bind(&row.input)
        .bind(&row.source)
        .bind(sop)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| error(path, e))?;
        if let (Some(sop), Some(original)) = (sop, &row.original) {
            let columns: Vec<String> = Originals::ATTRIBUTES
                .iter()
                .map(|(f, _, _)| original_column(f))
                .collect();
            let updates: Vec<String> = columns
                .iter()
                .map(|c| format!("{c} = excluded.{c}"))
                .collect();
            let sql = format!(
                "INSERT INTO instances (sop_instance_uid, study_instance_uid, series_instance_uid, {}, recorded_ms)
                 VALUES (?, ?, ?, {}, ?)
                 ON CONFLICT (sop_instance_uid) DO UPDATE SET study_instance_uid = excluded.study_instance_uid,
                     series_instance_uid = excluded.series_instance_uid, {}, recorded_ms = excluded.recorded_ms",
                columns.join(", "),
                vec!["?"; columns.len()].join(", "),
                updates.join(", ")
            );
            let mut q = sqlx::query(AssertSqlSafe(sql))
                .bind(sop)
                .bind(&row.study_instance_uid)
                .bind(&row.series_instance_uid);
            for (field, _, _) in Originals::ATTRIBUTES {
                q = q.bind(original.get(field).unwrap_or_default());
            }
            q.bind(now)
                .execute(&mut *tx)
                .await
                .map_err(|e| error(path, e))?;
        }
        tx.commit().await.map_err(|e| error(path, e))
    }

    /// Input reference -> source, for every input recorded.
    pub async fn sources(&self) -> Result<HashMap<String, String>, LinkageError> {
        sources(&self.pool, &self.path).await
    }

    /// Closes the database (checkpointing its write-ahead log).
    pub async fn close(self) {
        self.pool.close().await;
    }
}

async fn sources(pool: &SqlitePool, path: &Path) -> Result<HashMap<String, String>, LinkageError> {
    let rows = sqlx::query("SELECT input, source FROM inputs")
        .fetch_all(pool)
        .await
        .map_err(|e| error(path, e))?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<_, sqlx::Error>>()
        .map_err(|e| error(path, e))
}

/// A read-only view of one or more linkage tables: a database file, or a folder whose `*.db`
/// files are the tables of several ingest replicas (one file per replica; their union is the
/// table). A folder is looked at again when a UID is not found, so a new replica's file is
/// picked up.
pub struct LinkageReader {
    path: PathBuf,
    tables: tokio::sync::Mutex<Vec<(PathBuf, SqlitePool)>>,
}

impl LinkageReader {
    /// Nothing is opened until the first lookup: ingest may create the table after this starts.
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            tables: tokio::sync::Mutex::new(Vec::new()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The database files the configured path names now.
    fn files(&self) -> Result<Vec<PathBuf>, LinkageError> {
        let meta = std::fs::metadata(&self.path).map_err(|e| {
            error(
                &self.path,
                format!(
                    "cannot read it ({e}); it is written by `fracture serve ingest` \
                     (ingest.linkage) and must be on a volume this process can read"
                ),
            )
        })?;
        if !meta.is_dir() {
            return Ok(vec![self.path.clone()]);
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.path)
            .map_err(|e| error(&self.path, format!("cannot list the folder: {e}")))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "db") && p.is_file())
            .collect();
        files.sort();
        Ok(files)
    }

    /// Opens the files not opened yet; true when there was a new one.
    async fn refresh(&self, tables: &mut Vec<(PathBuf, SqlitePool)>) -> Result<bool, LinkageError> {
        let mut added = false;
        for file in self.files()? {
            if tables.iter().any(|(p, _)| *p == file) {
                continue;
            }
            let options = SqliteConnectOptions::new()
                .filename(&file)
                .read_only(true)
                .busy_timeout(Duration::from_secs(10));
            let pool = SqlitePoolOptions::new()
                .max_connections(2)
                .acquire_timeout(Duration::from_secs(30))
                .connect_with(options)
                .await
                .map_err(|e| error(&file, format!("cannot open it read-only: {e}")))?;
            tables.push((file, pool));
            added = true;
        }
        Ok(added)
    }

    /// The originals behind the pseudonymous SOP Instance UID `sop`, or `None` when no table
    /// holds it (a result about a radiograph another edge ingested, or from before the table).
    pub async fn lookup(&self, sop: &str) -> Result<Option<Link>, LinkageError> {
        let mut tables = self.tables.lock().await;
        if tables.is_empty() {
            self.refresh(&mut tables).await?;
        }
        loop {
            for (file, pool) in tables.iter() {
                if let Some(link) = lookup_in(pool, file, sop).await? {
                    return Ok(Some(link));
                }
            }
            if !self.refresh(&mut tables).await? {
                return Ok(None);
            }
        }
    }

    /// Input reference -> source, over every table.
    pub async fn sources(&self) -> Result<HashMap<String, String>, LinkageError> {
        let mut tables = self.tables.lock().await;
        self.refresh(&mut tables).await?;
        let mut all = HashMap::new();
        for (file, pool) in tables.iter() {
            all.extend(sources(pool, file).await?);
        }
        Ok(all)
    }
}

async fn lookup_in(
    pool: &SqlitePool,
    file: &Path,
    sop: &str,
) -> Result<Option<Link>, LinkageError> {
    let columns: Vec<String> = Originals::ATTRIBUTES
        .iter()
        .map(|(f, _, _)| original_column(f))
        .collect();
    let sql = format!(
        "SELECT study_instance_uid, series_instance_uid, {} FROM instances WHERE sop_instance_uid = ?",
        columns.join(", ")
    );
    let Some(row) = sqlx::query(AssertSqlSafe(sql))
        .bind(sop)
        .fetch_optional(pool)
        .await
        .map_err(|e| error(file, e))?
    else {
        return Ok(None);
    };
    let read = || -> Result<Link, sqlx::Error> {
        let mut original = Originals::default();
        for (i, (field, _, _)) in Originals::ATTRIBUTES.iter().enumerate() {
            if let Some(v) = original.get_mut(field) {
                *v = row.try_get(i + 2)?;
            }
        }
        Ok(Link {
            study_instance_uid: row.try_get(0)?,
            series_instance_uid: row.try_get(1)?,
            sop_instance_uid: sop.to_string(),
            original,
        })
    };
    read().map(Some).map_err(|e| error(file, e))
}

/// Input reference -> source of the linkage table(s) at `path` (a file or a folder of them), for
/// reports at the edge.
pub async fn read_sources(path: &Path) -> Result<HashMap<String, String>, LinkageError> {
    LinkageReader::new(path).sources().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    fn radiograph(n: u32) -> LinkageRow {
        let original = Originals {
            study_instance_uid: format!("1.2.3.{n}"),
            series_instance_uid: format!("1.2.3.{n}.1"),
            sop_instance_uid: format!("1.2.3.{n}.1.1"),
            patient_id: format!("PAT-{n}"),
            patient_name: "Doe^Jane, \"JJ\"".into(),
            accession_number: format!("ACC{n}"),
            ..Default::default()
        };
        LinkageRow {
            input: format!("in-{n}"),
            source: format!("/a,b/\"c\"-{n}.dcm"),
            study_instance_uid: format!("2.25.{n}"),
            series_instance_uid: format!("2.25.{n}1"),
            sop_instance_uid: format!("2.25.{n}11"),
            original: Some(original),
        }
    }

    #[tokio::test]
    async fn rows_round_trip_upsert_and_the_files_are_private() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("edge/linkage.db");
        let l = Linkage::open(&p).await.unwrap();
        l.record(&radiograph(1)).await.unwrap();
        l.record(&LinkageRow {
            input: "in-bad".into(),
            source: "/x.dcm".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        // A reader sees the committed rows while the writer holds the table open.
        let r = LinkageReader::new(&p);
        let link = r.lookup("2.25.111").await.unwrap().expect("linked");
        assert_eq!(link.original, radiograph(1).original.unwrap());
        assert_eq!(link.study_instance_uid, "2.25.1");
        assert_eq!(r.lookup("2.25.999").await.unwrap(), None);
        // The write-ahead log and its index hold rows too: as private as the table.
        for f in ["linkage.db", "linkage.db-wal", "linkage.db-shm"] {
            assert_eq!(mode(&d.path().join("edge").join(f)), 0o600, "{f}");
        }
        l.close().await;

        // Reopened: the same input again is an update, not a second row.
        let l = Linkage::open(&p).await.unwrap();
        let mut again = radiograph(1);
        again.source = "/moved.dcm".into();
        l.record(&again).await.unwrap();
        l.record(&radiograph(2)).await.unwrap();
        let m = l.sources().await.unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m["in-1"], "/moved.dcm");
        assert_eq!(m["in-bad"], "/x.dcm");
        l.close().await;
        // A reader opened after the writer closed (no -wal or -shm left) still reads.
        let r = LinkageReader::new(&p);
        assert_eq!(
            r.lookup("2.25.211")
                .await
                .unwrap()
                .unwrap()
                .original
                .patient_id,
            "PAT-2"
        );
        assert_eq!(read_sources(&p).await.unwrap().len(), 3);
        assert_eq!(mode(&p), 0o600);
    }

    #[tokio::test]
    async fn a_folder_of_replica_tables_is_one_table() {
        let d = tempfile::tempdir().unwrap();
        let a = Linkage::open(&d.path().join("ingest-0.db")).await.unwrap();
        a.record(&radiograph(1)).await.unwrap();
        let r = LinkageReader::new(d.path());
        assert!(r.lookup("2.25.111").await.unwrap().is_some());
        assert!(r.lookup("2.25.211").await.unwrap().is_none());
        // A replica that starts later is found on the next miss.
        let b = Linkage::open(&d.path().join("ingest-1.db")).await.unwrap();
        b.record(&radiograph(2)).await.unwrap();
        assert!(r.lookup("2.25.211").await.unwrap().is_some());
        assert_eq!(r.sources().await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_missing_table_or_a_file_that_is_not_one_is_refused_and_kept() {
        let d = tempfile::tempdir().unwrap();
        let e = LinkageReader::new(&d.path().join("nope.db"))
            .lookup("2.25.1")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("fracture serve ingest"), "{e}");
        let text = d.path().join("linkage.csv");
        std::fs::write(&text, "input,source,study_instance_uid\nin-1,/a.dcm,1.2\n").unwrap();
        let e = Linkage::open(&text).await.err().expect("refused");
        assert!(e.to_string().contains("linkage.csv"), "{e}");
        assert!(
            std::fs::read_to_string(&text).unwrap().contains("in-1"),
            "the file is kept"
        );
    }
}
