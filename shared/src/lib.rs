//! What the fracture stages share: messages, the Bus, the claim-check store, configuration,
//! telemetry, the error taxonomy and the one retry policy, DICOM pixel decoding, the region
//! rules, and the pure statistics both the audit sink and training need.

pub mod breaker;
pub mod bus;
pub mod config;
pub mod dicom;
pub mod dicom_outputs;
pub mod error;
pub mod gate;
pub mod html;
pub mod http;
pub mod messages;
pub mod metrics;
pub mod pixels;
pub mod region;
pub mod retry;
pub mod stage;
pub mod stats;
pub mod store;
pub mod telemetry;
pub mod testkit;

pub use bus::{Bus, InProcBus, KafkaBus, KafkaConfig, Record, Topics};
pub use error::{ErrorKind, RetryPolicy, StageError};
pub use store::{BlobStore, StoreConfig};
