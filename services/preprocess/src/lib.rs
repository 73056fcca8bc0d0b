//! The preprocess stage.
