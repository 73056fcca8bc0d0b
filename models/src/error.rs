//! The one error type of this crate, worded for the person who has to fix the cause.

use std::path::PathBuf;

/// Everything that can go wrong while transforming an image, reading a manifest, loading weights
/// or running the ensemble.
///
/// `InvalidImage`, `InvalidInput` and the manifest/weights variants are caused by data or
/// configuration and will fail again if retried; `Tensor` and `Io` on a readable file are not.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The pixels handed to [`crate::transform()`] do not describe an image.
    #[error("invalid image: {0}")]
    InvalidImage(String),

    /// A [`crate::TransformConfig`] or [`crate::drn::DrnConfig`] that cannot work.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// The manifest could not be parsed or validated.
    #[error("model manifest {path}: {reason}")]
    Manifest {
        path: PathBuf,
        reason: crate::manifest::ManifestError,
    },

    /// A file the ensemble needs could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The weights file is not the one the manifest was written for.
    #[error(
        "member {member}: weights file {path} has sha256 {actual}, but the manifest expects \
         {expected}; the file is corrupt, was replaced or belongs to another model version: \
         restore the file that came with the manifest, or, if the new weights are intended, \
         put its sha256 in the manifest and change model_version"
    )]
    ChecksumMismatch {
        member: String,
        path: PathBuf,
        expected: String,
        actual: String,
    },

    /// The weights file has the right checksum but does not fit the member's architecture.
    #[error(
        "member {member}: weights file {path} does not fit the member's architecture: {reason}"
    )]
    Weights {
        member: String,
        path: PathBuf,
        reason: String,
    },

    /// The tensors given to [`crate::Ensemble::predict`] have the wrong size.
    #[error("invalid model input: {0}")]
    InvalidInput(String),

    /// A tensor operation failed (out of memory, device error): not caused by the input.
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),
}
