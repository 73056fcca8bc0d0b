//! The DRN ensemble of Jones et al. (2020), its manifest, the transform it shares with training,
//! and the boxes drawn from its probability map.

pub mod boxes;
pub mod drn;
pub mod ensemble;
pub mod init;
pub mod manifest;
pub mod matmul;
pub mod transform;

mod error;

pub use ensemble::{Ensemble, Prediction};
pub use error::ModelError;
pub use manifest::{Manifest, MemberSpec};
pub use transform::{transform, Placement, TransformConfig, Transformed};
