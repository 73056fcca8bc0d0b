//! The audit stage.
