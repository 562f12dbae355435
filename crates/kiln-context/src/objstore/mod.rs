//! Objects in S3 (`s3://bucket/key`), Google Cloud Storage (`gs://bucket/key`) and Azure Blob
//! storage (`https://<account>.blob.core.windows.net/<container>/<blob>`), opened as byte
//! streams with credentials from the usual environment.

use std::io::Read;

/// An object in one of the supported stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectUrl {
    /// `s3://bucket/key`.
    S3 { bucket: String, key: String },
    /// `gs://bucket/key`.
    Gcs { bucket: String, key: String },
    /// `https://<account>.blob.core.windows.net/<container>/<blob>`.
    Azure { account: String, container: String, blob: String },
}

/// Why an object could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ObjectStoreError {
    /// Placeholder until the stores are implemented.
    #[error("{url}: object stores are not supported yet")]
    Unsupported { url: String },
}

impl ObjectUrl {
    /// Recognises an object-store URL; `None` for anything else.
    pub fn parse(_url: &str) -> Option<ObjectUrl> {
        None
    }
}

/// Opens the object for streaming.
pub fn open(url: &ObjectUrl) -> Result<Box<dyn Read + Send>, ObjectStoreError> {
    Err(ObjectStoreError::Unsupported { url: format!("{url:?}") })
}
