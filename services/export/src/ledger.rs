//! The exporter's ledger at the edge: one row per DICOM object (SR or Secondary Capture) it sent
//! or tried to send, keyed by that object's SOP Instance UID, with what the PACS answered. It holds
//! pseudonymous UIDs and statuses only, no PHI; it is still an edge file (mode 0600).
//!
//! A row is written (`sends` counted) just before the object goes out on an open association,
//! and finished with the PACS's status once it answers, so a crash between the two shows as a
//! pending row whose object is sent again (under the same SOP Instance UID, which the PACS keeps
//! once) and counted as a second send.

use std::path::{Path, PathBuf};

use sqlx::sqlite::SqlitePool;
use sqlx::Row;

use fracture_edge::{edge_database, EdgeDbError};

const WHAT: &str = "export ledger";

/// Where one object stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Sent, no answer recorded yet (or the answer was lost): sent again.
    Pending,
    /// The PACS holds it (success or a warning status).
    Stored,
    /// The PACS refused it for good: not sent again (delete the row to retry).
    Refused,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Stored => "stored",
            State::Refused => "refused",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "stored" => State::Stored,
            "refused" => State::Refused,
            _ => State::Pending,
        }
    }
}

/// One row of the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The exported object's own SOP Instance UID.
    pub sop_instance_uid: String,
    /// `sr` or `sc`.
    pub kind: String,
    /// The pseudonymous SOP Instance UID of the radiograph it is about.
    pub source_sop_instance_uid: String,
    /// The PACS it went to (`AE@host:port`).
    pub pacs: String,
    pub state: State,
    /// The PACS's DIMSE status, once it answered.
    pub status: Option<u16>,
    /// C-STOREs made for it (1 unless an answer was lost).
    pub sends: i64,
    /// Findings for it that arrived after it was finished and sent nothing.
    pub redeliveries: i64,
}

pub struct Ledger {
    path: PathBuf,
    pool: SqlitePool,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Ledger {
    /// Opens (creating, mode 0600) the ledger at `path`.
    pub async fn open(path: &Path) -> Result<Self, EdgeDbError> {
        let pool = edge_database(path, WHAT).await?;
        let ledger = Self {
            path: path.to_path_buf(),
            pool,
        };
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS exported (
                sop_instance_uid TEXT PRIMARY KEY,
                kind TEXT NOT NULL,
                source_sop_instance_uid TEXT NOT NULL,
                pacs TEXT NOT NULL,
                state TEXT NOT NULL,
                status INTEGER,
                sends INTEGER NOT NULL,
                redeliveries INTEGER NOT NULL,
                first_sent_ms INTEGER NOT NULL,
                finished_ms INTEGER
            )",
        )
        .execute(&ledger.pool)
        .await
        .map_err(|e| ledger.error(e))?;
        Ok(ledger)
    }

    fn error(&self, e: sqlx::Error) -> EdgeDbError {
        EdgeDbError {
            what: WHAT,
            path: self.path.display().to_string(),
            message: e.to_string(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the object `sop` stands; `None` when it was never sent.
    pub async fn state(&self, sop: &str) -> Result<Option<State>, EdgeDbError> {
        let s: Option<String> =
            sqlx::query_scalar("SELECT state FROM exported WHERE sop_instance_uid = ?")
                .bind(sop)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| self.error(e))?;
        Ok(s.as_deref().map(State::parse))
    }

    /// Counts a finding that came again for an object already finished.
    pub async fn redelivered(&self, sop: &str) -> Result<(), EdgeDbError> {
        sqlx::query(
            "UPDATE exported SET redeliveries = redeliveries + 1 WHERE sop_instance_uid = ?",
        )
        .bind(sop)
        .execute(&self.pool)
        .await
        .map_err(|e| self.error(e))
        .map(drop)
    }

    /// Records that `sop` is about to be sent (durably, before it goes).
    pub async fn sending(
        &self,
        sop: &str,
        kind: &str,
        source: &str,
        pacs: &str,
    ) -> Result<(), EdgeDbError> {
        sqlx::query(
            "INSERT INTO exported (sop_instance_uid, kind, source_sop_instance_uid, pacs, state,
                 sends, redeliveries, first_sent_ms)
             VALUES (?, ?, ?, ?, 'pending', 1, 0, ?)
             ON CONFLICT (sop_instance_uid) DO UPDATE SET sends = sends + 1, pacs = excluded.pacs,
                 state = 'pending'",
        )
        .bind(sop)
        .bind(kind)
        .bind(source)
        .bind(pacs)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(|e| self.error(e))
        .map(drop)
    }

    /// Records the PACS's answer for `sop`.
    pub async fn finished(&self, sop: &str, state: State, status: u16) -> Result<(), EdgeDbError> {
        sqlx::query(
            "UPDATE exported SET state = ?, status = ?, finished_ms = ? WHERE sop_instance_uid = ?",
        )
        .bind(state.as_str())
        .bind(i64::from(status))
        .bind(now_ms())
        .bind(sop)
        .execute(&self.pool)
        .await
        .map_err(|e| self.error(e))
        .map(drop)
    }

    /// Every row, by SOP Instance UID.
    pub async fn entries(&self) -> Result<Vec<Entry>, EdgeDbError> {
        let rows = sqlx::query(
            "SELECT sop_instance_uid, kind, source_sop_instance_uid, pacs, state, status, sends,
                 redeliveries FROM exported ORDER BY sop_instance_uid",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        rows.iter()
            .map(|r| {
                Ok(Entry {
                    sop_instance_uid: r.try_get(0)?,
                    kind: r.try_get(1)?,
                    source_sop_instance_uid: r.try_get(2)?,
                    pacs: r.try_get(3)?,
                    state: State::parse(&r.try_get::<String, _>(4)?),
                    status: r
                        .try_get::<Option<i64>, _>(5)?
                        .and_then(|s| u16::try_from(s).ok()),
                    sends: r.try_get(6)?,
                    redeliveries: r.try_get(7)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(|e| self.error(e))
    }

    pub async fn close(self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_send_is_pending_until_answered_and_counted_once() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ledger.db");
        let l = Ledger::open(&p).await.unwrap();
        assert_eq!(l.state("2.25.1").await.unwrap(), None);
        l.sending("2.25.1", "sr", "2.25.9", "PACS@h:104")
            .await
            .unwrap();
        assert_eq!(l.state("2.25.1").await.unwrap(), Some(State::Pending));
        // The answer was lost (a crash): sent again, counted twice.
        l.sending("2.25.1", "sr", "2.25.9", "PACS@h:104")
            .await
            .unwrap();
        l.finished("2.25.1", State::Stored, 0).await.unwrap();
        l.redelivered("2.25.1").await.unwrap();
        l.sending("2.25.2", "sc", "2.25.9", "PACS@h:104")
            .await
            .unwrap();
        l.finished("2.25.2", State::Refused, 0xA900).await.unwrap();
        l.close().await;
        let l = Ledger::open(&p).await.unwrap();
        let e = l.entries().await.unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(
            (e[0].state, e[0].status, e[0].sends, e[0].redeliveries),
            (State::Stored, Some(0), 2, 1)
        );
        assert_eq!(
            (e[1].state, e[1].status, e[1].sends),
            (State::Refused, Some(0xA900), 1)
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
