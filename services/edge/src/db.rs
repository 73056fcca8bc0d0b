//! The edge's private SQLite databases (the linkage table, the export ledger): created with mode
//! 0600, write-ahead log, every commit on disk before it returns.

use std::path::Path;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

/// An edge database (the linkage table, the exporter's ledger) that cannot be opened, read or
/// written. The message names the file and the problem, never a row's values.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {message}")]
pub struct EdgeDbError {
    /// What the file is, e.g. "linkage table".
    pub what: &'static str,
    pub path: String,
    pub message: String,
}

/// Creates `path` (and its folder) with mode 0600 if missing, and makes an existing one 0600.
/// SQLite gives its `-wal` and `-shm` files the mode of the database file.
pub fn create_private(path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    drop(opts.open(path)?);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Opens (creating, mode 0600) a SQLite database for data that stays at the edge: write-ahead
/// log, every commit on disk before it returns, one connection (writes are serialised here
/// instead of contending for SQLite's lock).
pub async fn edge_database(path: &Path, what: &'static str) -> Result<SqlitePool, EdgeDbError> {
    let fail = |message: String| EdgeDbError {
        what,
        path: path.display().to_string(),
        message,
    };
    create_private(path).map_err(|e| fail(format!("cannot create it with mode 0600: {e}")))?;
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(10));
    SqlitePoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options)
        .await
        .map_err(|e| fail(format!("cannot open: {e}")))
}
