//! What only the hospital's edge may touch, below ingest and the export to the PACS: the linkage
//! table (pseudonym -> original), re-identification of results, the TLS trust both doors use and
//! the private SQLite databases the edge keeps. No stage imports another; both meet here.

pub mod db;
pub mod linkage;
pub mod originals;
pub mod reid;
pub mod tls;

pub use db::{edge_database, EdgeDbError};
pub use linkage::{Link, Linkage, LinkageReader, LinkageRow};
pub use originals::Originals;
