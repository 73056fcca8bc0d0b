//! The DRN ensemble of Jones et al. (2020), its manifest, and the transform it shares with training.

pub mod drn;
pub mod ensemble;
pub mod init;
pub mod manifest;
pub mod transform;

mod error;

pub use ensemble::{Ensemble, Prediction};
pub use error::ModelError;
pub use manifest::{Manifest, MemberSpec};
pub use transform::{transform, TransformConfig, Transformed};
