//! The postprocess stage.
