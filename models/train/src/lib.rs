//! Training and calibration of the ensemble's members (Jones et al. 2020, "Training" and
//! "Post-processing"): labelled DICOM data sets split by patient, augmentation, the joint
//! localisation and classification loss, Adam, resumable checkpoints, and region thresholds.

pub mod adam;
pub mod augment;
pub mod calibrate;
pub mod data;
pub mod kernels;
pub mod loss;
pub mod network;
pub mod rng;
pub mod trainer;

mod error;

pub use calibrate::{calibrate, CalibrateOptions, Calibration, ScoredRadiograph};
pub use data::{Dataset, Label, Split};
pub use error::TrainError;
pub use trainer::{train, Outcome, Recipe, RunControl, State, TrainOptions};
