//! One error taxonomy for every stage, and the one place that decides retry versus dead letter.

use std::time::Duration;

pub use crate::messages::ErrorKind;

/// An error while processing one message, classified by who must act on it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct StageError {
    pub kind: ErrorKind,
    /// For a person: what was wrong and what to do. Never holds PHI (no names, paths, original UIDs).
    pub message: String,
}

impl StageError {
    /// The input is bad; retrying cannot help.
    pub fn data(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Data,
            message: message.into(),
        }
    }
    /// A broker, store, database or peer failed; retry later.
    pub fn external(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::External,
            message: message.into(),
        }
    }
    /// A bug in this program.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Internal,
            message: message.into(),
        }
    }
}

/// What to do after an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Retry(Duration),
    DeadLetter,
}

/// The retry policy: data errors never retry; external errors retry with capped exponential
/// backoff for as long as it takes (the stage does not commit meanwhile, so nothing is lost and
/// it catches up when the dependency returns); internal errors retry a few times, then dead-letter
/// so one poison message cannot stop a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// First backoff, in milliseconds.
    pub base_ms: u64,
    /// Backoff cap, in milliseconds.
    pub cap_ms: u64,
    /// Attempts for an internal error before it is dead-lettered.
    pub internal_attempts: u32,
    /// Crashes of a stage process with an input in flight before that input is dead-lettered
    /// unopened (the crash-loop breaker, `breaker`).
    pub crash_limit: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base_ms: 100,
            cap_ms: 30_000,
            internal_attempts: 3,
            crash_limit: 3,
        }
    }
}

impl RetryPolicy {
    /// `attempt` counts from 1 (the attempt that just failed).
    pub fn decide(&self, kind: ErrorKind, attempt: u32) -> Decision {
        match kind {
            ErrorKind::Data => Decision::DeadLetter,
            ErrorKind::Internal if attempt >= self.internal_attempts => Decision::DeadLetter,
            ErrorKind::Internal | ErrorKind::External => Decision::Retry(self.backoff(attempt)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_never_retries_external_always_internal_bounded() {
        let p = RetryPolicy::default();
        assert_eq!(p.decide(ErrorKind::Data, 1), Decision::DeadLetter);
        assert_eq!(
            p.decide(ErrorKind::External, 1),
            Decision::Retry(Duration::from_millis(100))
        );
        assert_eq!(
            p.decide(ErrorKind::External, 2),
            Decision::Retry(Duration::from_millis(200))
        );
        assert_eq!(
            p.decide(ErrorKind::External, 1000),
            Decision::Retry(Duration::from_secs(30))
        );
        assert!(matches!(
            p.decide(ErrorKind::Internal, 2),
            Decision::Retry(_)
        ));
        assert_eq!(p.decide(ErrorKind::Internal, 3), Decision::DeadLetter);
    }
}
