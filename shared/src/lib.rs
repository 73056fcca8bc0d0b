//! What the fracture stages share: messages, the Bus, the claim-check store, configuration,
//! telemetry, the error taxonomy, DICOM pixel decoding and the region rules.

pub mod bus;
pub mod config;
pub mod error;
pub mod messages;
pub mod metrics;
pub mod otlp;
pub mod pixels;
pub mod region;
pub mod stage;
pub mod store;
pub mod telemetry;
pub mod testkit;

pub use bus::{Bus, InProcBus, KafkaBus, KafkaConfig, Record, Topics};
pub use error::{ErrorKind, RetryPolicy, StageError};
pub use store::{BlobStore, StoreConfig};
