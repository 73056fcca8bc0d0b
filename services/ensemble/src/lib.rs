//! The ensemble stage.
