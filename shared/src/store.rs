//! The claim-check store: payloads too big for the bus, content-addressed by sha256.
//!
//! A retry writes the same object under the same key, so writes are idempotent. Reads verify the
//! digest, so a corrupt or truncated object is caught where it is read, not three stages later.

use std::sync::Arc;

use bytes::Bytes;
use object_store::{path::Path as ObjectPath, ObjectStore, ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};

use prometheus::IntCounterVec;

use crate::error::StageError;
use crate::messages::BlobRef;

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// A local folder (created if missing), or `s3://bucket[/prefix]` in a build with the `s3`
    /// feature (credentials and region from the usual `AWS_*` environment variables).
    pub url: String,
    /// Endpoint of an S3-compatible service (MinIO, Ceph, ...); empty for AWS itself.
    pub endpoint: String,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: "./fracture-store".into(),
            endpoint: String::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("claim-check store unavailable: {0}")]
    Unavailable(String),
    #[error(
        "object {0} is not in the claim-check store; was it written to another store, or removed?"
    )]
    NotFound(String),
    #[error("object {sha256} in the claim-check store is corrupt: its content hashes to {actual}")]
    Corrupt { sha256: String, actual: String },
    #[error("invalid store configuration: {0}")]
    Config(String),
}

impl From<StoreError> for StageError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => StageError::external(e.to_string()),
            // A missing or corrupt object will not heal by retrying this message.
            StoreError::NotFound(_) | StoreError::Corrupt { .. } => StageError::data(e.to_string()),
            StoreError::Config(_) => StageError::internal(e.to_string()),
        }
    }
}

/// Put and get by content.
#[derive(Clone)]
pub struct BlobStore {
    inner: Arc<dyn ObjectStore>,
    /// `fracture_store_bytes_total{op}` where the process reports metrics.
    bytes: Option<IntCounterVec>,
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlobStore({})", self.inner)
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn key(sha256: &str) -> ObjectPath {
    // Two-level fan-out keeps folders small on a local disk.
    ObjectPath::from(format!("sha256/{}/{}", &sha256[..2], sha256))
}

fn named(name: &str) -> ObjectPath {
    ObjectPath::from(format!("records/{name}"))
}

impl BlobStore {
    pub fn open(cfg: &StoreConfig) -> Result<Self, StoreError> {
        let url = cfg.url.trim();
        if url.starts_with("s3://") {
            return Self::open_s3(url, cfg);
        }
        if url.contains("://") && !url.starts_with("file://") {
            return Err(StoreError::Config(format!(
                "store URL {url:?}: only local folders (a path or file://) and s3:// are supported"
            )));
        }
        let dir = url.strip_prefix("file://").unwrap_or(url);
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Config(format!("cannot create the store folder {dir}: {e}"))
        })?;
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| StoreError::Config(format!("cannot open the store folder {dir}: {e}")))?;
        Ok(Self::from_object_store(Arc::new(fs)))
    }

    #[cfg(feature = "s3")]
    fn open_s3(url: &str, cfg: &StoreConfig) -> Result<Self, StoreError> {
        let rest = url.trim_start_matches("s3://");
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
        if !cfg.endpoint.is_empty() {
            b = b
                .with_endpoint(&cfg.endpoint)
                .with_allow_http(cfg.endpoint.starts_with("http://"));
        }
        let s3 = b
            .build()
            .map_err(|e| StoreError::Config(format!("S3 store {url}: {e}")))?;
        let inner: Arc<dyn ObjectStore> = if prefix.trim_matches('/').is_empty() {
            Arc::new(s3)
        } else {
            Arc::new(object_store::prefix::PrefixStore::new(
                s3,
                prefix.trim_matches('/'),
            ))
        };
        Ok(Self::from_object_store(inner))
    }

    #[cfg(not(feature = "s3"))]
    fn open_s3(url: &str, _cfg: &StoreConfig) -> Result<Self, StoreError> {
        Err(StoreError::Config(format!(
            "store URL {url:?} needs S3 support, which this build leaves out to stay lean; \
             rebuild with `cargo build --release --features s3`, or use a shared folder"
        )))
    }

    pub fn from_object_store(inner: Arc<dyn ObjectStore>) -> Self {
        Self { inner, bytes: None }
    }

    /// Counts the bytes this store writes and reads into `fracture_store_bytes_total{op}`.
    pub fn counted(mut self, bytes: IntCounterVec) -> Self {
        self.bytes = Some(bytes);
        self
    }

    fn count(&self, op: &str, n: u64) {
        if let Some(c) = &self.bytes {
            c.with_label_values(&[op]).inc_by(n);
        }
    }

    /// Stores `bytes` under their sha256; writing the same content again is a no-op.
    pub async fn put(&self, bytes: Bytes, media_type: &str) -> Result<BlobRef, StoreError> {
        let sha256 = sha256_hex(&bytes);
        let size = bytes.len() as u64;
        let path = key(&sha256);
        match self.inner.head(&path).await {
            Ok(meta) if meta.size == size => {}
            Ok(_) | Err(object_store::Error::NotFound { .. }) => {
                self.inner
                    .put(&path, PutPayload::from_bytes(bytes))
                    .await
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?;
                self.count("put", size);
            }
            Err(e) => return Err(StoreError::Unavailable(e.to_string())),
        }
        Ok(BlobRef {
            sha256,
            size,
            media_type: media_type.to_string(),
        })
    }

    pub async fn get(&self, blob: &BlobRef) -> Result<Bytes, StoreError> {
        if blob.sha256.len() != 64 || !blob.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(StoreError::NotFound(format!(
                "{:?} (not a sha256)",
                blob.sha256
            )));
        }
        let got = match self.inner.get(&key(&blob.sha256)).await {
            Ok(r) => r
                .bytes()
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(StoreError::NotFound(blob.sha256.clone()))
            }
            Err(e) => return Err(StoreError::Unavailable(e.to_string())),
        };
        self.count("get", got.len() as u64);
        let actual = sha256_hex(&got);
        if actual != blob.sha256 {
            return Err(StoreError::Corrupt {
                sha256: blob.sha256.clone(),
                actual,
            });
        }
        Ok(got)
    }

    /// Writes a small named record beside the content-addressed objects (the crash-loop
    /// breaker's ledgers), replacing any record of that name.
    pub async fn put_named(&self, name: &str, bytes: Bytes) -> Result<(), StoreError> {
        let size = bytes.len() as u64;
        self.inner
            .put(&named(name), PutPayload::from_bytes(bytes))
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        self.count("put", size);
        Ok(())
    }

    /// A named record, or `None` when there is none.
    pub async fn get_named(&self, name: &str) -> Result<Option<Bytes>, StoreError> {
        match self.inner.get(&named(name)).await {
            Ok(r) => {
                let got = r
                    .bytes()
                    .await
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?;
                self.count("get", got.len() as u64);
                Ok(Some(got))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(StoreError::Unavailable(e.to_string())),
        }
    }

    /// Removes a named record; removing one that is not there is not an error.
    pub async fn delete_named(&self, name: &str) -> Result<(), StoreError> {
        match self.inner.delete(&named(name)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(StoreError::Unavailable(e.to_string())),
        }
    }

    /// A cheap round trip that says whether the store answers (readiness).
    pub async fn check(&self) -> Result<(), StoreError> {
        match self.inner.head(&ObjectPath::from("readiness-probe")).await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(StoreError::Unavailable(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The capacity plan's store figures come from these counters: a repeated put of the same
    /// content writes nothing the second time.
    #[tokio::test]
    async fn counts_bytes_written_and_read() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = crate::metrics::StageMetrics::new();
        let store = BlobStore::open(&StoreConfig {
            url: dir.path().display().to_string(),
            ..Default::default()
        })
        .unwrap()
        .counted(metrics.store_bytes.clone());
        let blob = store
            .put(Bytes::from_static(b"0123456789"), "application/dicom")
            .await
            .unwrap();
        store
            .put(Bytes::from_static(b"0123456789"), "application/dicom")
            .await
            .unwrap();
        store.get(&blob).await.unwrap();
        store.get(&blob).await.unwrap();
        store
            .put_named("ledger", Bytes::from_static(b"abc"))
            .await
            .unwrap();
        let put = metrics.store_bytes.with_label_values(&["put"]).get();
        let get = metrics.store_bytes.with_label_values(&["get"]).get();
        assert_eq!((put, get), (13, 20));
        assert!(metrics
            .render()
            .contains("fracture_store_bytes_total{op=\"put\"} 13"));
    }

    #[tokio::test]
    async fn put_is_content_addressed_idempotent_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&StoreConfig {
            url: dir.path().display().to_string(),
            ..Default::default()
        })
        .unwrap();
        let a = store
            .put(Bytes::from_static(b"radiograph"), "application/dicom")
            .await
            .unwrap();
        let b = store
            .put(Bytes::from_static(b"radiograph"), "application/dicom")
            .await
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.sha256, sha256_hex(b"radiograph"));
        assert_eq!(&store.get(&a).await.unwrap()[..], b"radiograph");

        // Tamper with the object on disk: the read must refuse it.
        let path = dir
            .path()
            .join("sha256")
            .join(&a.sha256[..2])
            .join(&a.sha256);
        std::fs::write(&path, b"radiografh").unwrap();
        assert!(matches!(
            store.get(&a).await,
            Err(StoreError::Corrupt { .. })
        ));

        let missing = BlobRef {
            sha256: "0".repeat(64),
            size: 1,
            media_type: "x".into(),
        };
        assert!(matches!(
            store.get(&missing).await,
            Err(StoreError::NotFound(_))
        ));
    }

    /// An outage (here: the store's folder replaced by a file, which stops even root) must read
    /// as Unavailable, so stages retry and do not commit; NotFound would dead-letter the
    /// radiograph for good.
    #[tokio::test]
    async fn an_outage_is_unavailable_not_missing() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let store = BlobStore::open(&StoreConfig {
            url: root.display().to_string(),
            ..Default::default()
        })
        .unwrap();
        let kept = store
            .put(Bytes::from_static(b"before"), "application/octet-stream")
            .await
            .unwrap();
        std::fs::rename(&root, dir.path().join("away")).unwrap();
        std::fs::write(&root, b"not a folder").unwrap();
        assert!(matches!(
            store.get(&kept).await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(matches!(
            store
                .put(Bytes::from_static(b"during"), "application/octet-stream")
                .await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(store.check().await.is_err());
        std::fs::remove_file(&root).unwrap();
        std::fs::rename(dir.path().join("away"), &root).unwrap();
        assert_eq!(&store.get(&kept).await.unwrap()[..], b"before");
    }
}
