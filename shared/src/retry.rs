//! The one way to try again: every "not reachable yet" and "did not land" loop goes through
//! [`RetryPolicy::retry`] (or waits [`RetryPolicy::backoff`] itself where a peer names its own
//! wait), so every wait in the pipeline follows the `[retry]` policy's capped exponential backoff
//! and ends as soon as the process is told to stop.

use std::future::Future;
use std::time::Duration;

use crate::error::RetryPolicy;
use crate::stage::Shutdown;

impl RetryPolicy {
    /// The wait after the `attempt`-th failure (counting from 1): `base_ms` doubling up to
    /// `cap_ms`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .base_ms
            .saturating_mul(1u64 << attempt.saturating_sub(1).min(20));
        Duration::from_millis(exp.min(self.cap_ms))
    }

    /// A retried call; `what` says in the log what did not work ("the broker is not reachable
    /// yet"), with the error and the wait.
    pub fn retry<'a>(&self, what: &'a str) -> Retry<'a> {
        Retry {
            policy: *self,
            what,
            stop: None,
            attempts: None,
            failures: 0,
        }
    }
}

/// How one call is retried: [`RetryPolicy::retry`], then [`Retry::until`] and
/// [`Retry::attempts`] as needed, then [`Retry::run`] with the call, or, where the call borrows
/// something mutably across attempts, a loop of the caller's own that hands each error to
/// [`Retry::failed`].
#[must_use = "a Retry does nothing until it is run"]
pub struct Retry<'a> {
    policy: RetryPolicy,
    what: &'a str,
    stop: Option<Shutdown>,
    attempts: Option<u32>,
    failures: u32,
}

impl Retry<'_> {
    /// Gives up (with the last error) once `stop` is set, waking from a wait at once.
    pub fn until(mut self, stop: &Shutdown) -> Self {
        self.stop = Some(stop.clone());
        self
    }

    /// Gives up (with the last error) after `n` failed attempts, for a caller whose own client
    /// retries better than a longer wait here would (a modality resends after 0xA700).
    pub fn attempts(mut self, n: u32) -> Self {
        self.attempts = Some(n.max(1));
        self
    }

    /// Calls `op` until it succeeds, fails with an error `retryable` refuses, runs out of
    /// attempts, or the stop is set; the error is then the last one.
    pub async fn run<T, E, Fut>(
        mut self,
        mut op: impl FnMut() -> Fut,
        retryable: impl Fn(&E) -> bool,
    ) -> Result<T, E>
    where
        Fut: Future<Output = Result<T, E>>,
        E: std::fmt::Display,
    {
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let again = retryable(&e);
                    self.failed(e, again).await?;
                }
            }
        }
    }

    /// Takes the error of a failed attempt: gives it back when it is not `retryable`, the
    /// attempts are spent or the stop is set; otherwise logs it and waits the backoff (less if
    /// the stop comes meanwhile, which then gives the error back).
    pub async fn failed<E: std::fmt::Display>(&mut self, e: E, retryable: bool) -> Result<(), E> {
        let Some(wait) = self.next_wait(&e, retryable) else {
            return Err(e);
        };
        if sleep_unless_stopped(wait, self.stop.as_ref()).await {
            Ok(())
        } else {
            Err(e)
        }
    }

    /// Counts a failure; the wait before the next attempt, or `None` to give up.
    fn next_wait<E: std::fmt::Display>(&mut self, e: &E, retryable: bool) -> Option<Duration> {
        self.failures += 1;
        if !retryable
            || self.attempts.is_some_and(|n| self.failures >= n)
            || self.stop.as_ref().is_some_and(Shutdown::is_set)
        {
            return None;
        }
        let wait = self.policy.backoff(self.failures);
        tracing::warn!(error = %e, attempt = self.failures, retry_in_ms = wait.as_millis() as u64, "{}, retrying", self.what);
        Some(wait)
    }

    /// [`Retry::run`] for a blocking call on a thread of its own (librdkafka's transactional
    /// calls); `until` is honoured between attempts.
    pub fn run_blocking<T, E: std::fmt::Display>(
        mut self,
        mut op: impl FnMut() -> Result<T, E>,
        retryable: impl Fn(&E) -> bool,
    ) -> Result<T, E> {
        loop {
            match op() {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let again = retryable(&e);
                    match self.next_wait(&e, again) {
                        Some(wait) => std::thread::sleep(wait),
                        None => return Err(e),
                    }
                }
            }
        }
    }
}

/// Sleeps for `wait`, or less when `stop` is set meanwhile; true when the whole wait passed.
pub async fn sleep_unless_stopped(wait: Duration, stop: Option<&Shutdown>) -> bool {
    match stop {
        Some(s) => {
            if s.is_set() {
                return false;
            }
            let mut s = s.clone();
            tokio::select! {
                _ = tokio::time::sleep(wait) => true,
                _ = s.wait() => false,
            }
        }
        None => {
            tokio::time::sleep(wait).await;
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn quick() -> RetryPolicy {
        RetryPolicy {
            base_ms: 1,
            cap_ms: 4,
            internal_attempts: 3,
            ..RetryPolicy::default()
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy::default();
        assert_eq!(p.backoff(1), Duration::from_millis(100));
        assert_eq!(p.backoff(2), Duration::from_millis(200));
        assert_eq!(p.backoff(9), Duration::from_millis(25_600));
        assert_eq!(p.backoff(10), Duration::from_millis(30_000));
        assert_eq!(p.backoff(u32::MAX), Duration::from_millis(30_000));
    }

    #[tokio::test]
    async fn a_call_is_retried_until_it_succeeds() {
        let calls = AtomicU32::new(0);
        let got: Result<u32, String> = quick()
            .retry("flaky")
            .run(
                || async {
                    let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                    if n < 4 {
                        Err(format!("failure {n}"))
                    } else {
                        Ok(n)
                    }
                },
                |_| true,
            )
            .await;
        assert_eq!(got, Ok(4));
    }

    #[tokio::test]
    async fn an_error_that_is_not_retryable_returns_at_once() {
        let calls = AtomicU32::new(0);
        let got: Result<(), String> = quick()
            .retry("fatal")
            .run(
                || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err("fatal".to_string())
                },
                |e| e != "fatal",
            )
            .await;
        assert_eq!(got, Err("fatal".into()));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn attempts_bound_the_tries_and_give_the_last_error() {
        let calls = AtomicU32::new(0);
        let got: Result<(), String> = quick()
            .retry("bounded")
            .attempts(3)
            .run(
                || async { Err(format!("try {}", calls.fetch_add(1, Ordering::SeqCst) + 1)) },
                |_| true,
            )
            .await;
        assert_eq!(got, Err("try 3".into()));
    }

    #[tokio::test]
    async fn a_stop_ends_the_wait_at_once() {
        let (tx, stop) = Shutdown::new();
        let slow = RetryPolicy {
            base_ms: 3_600_000,
            cap_ms: 3_600_000,
            internal_attempts: 3,
            ..RetryPolicy::default()
        };
        let waiting = tokio::spawn(async move {
            slow.retry("never")
                .until(&stop)
                .run(|| async { Err::<(), _>("down".to_string()) }, |_| true)
                .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx.send(true).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the stop did not end the hour-long wait")
            .unwrap();
        assert_eq!(got, Err("down".into()));
    }

    #[tokio::test]
    async fn a_loop_of_its_own_hands_its_errors_to_failed() {
        let mut sent = Vec::new();
        let mut retry = quick().retry("own loop").attempts(5);
        let mut n = 0;
        let got: Result<(), String> = loop {
            n += 1;
            // The call borrows `sent` mutably, which a closure could not lend to a future.
            let result = if n < 3 {
                Err(format!("try {n}"))
            } else {
                sent.push(n);
                Ok(())
            };
            match result {
                Ok(()) => break Ok(()),
                Err(e) => {
                    if let Err(e) = retry.failed(e, true).await {
                        break Err(e);
                    }
                }
            }
        };
        assert_eq!((got, sent), (Ok(()), vec![3]));
    }

    #[test]
    fn blocking_calls_are_retried_the_same_way() {
        let mut n = 0;
        let got: Result<u32, String> = quick().retry("blocking").run_blocking(
            || {
                n += 1;
                if n < 3 {
                    Err("not yet".into())
                } else {
                    Ok(n)
                }
            },
            |_| true,
        );
        assert_eq!(got, Ok(3));
    }
}
