//! Claims on spool file names, shared by the push doors: the same object arriving twice at once
//! (two associations, two STOW-RS requests) shares a spool name, so the second waits and the
//! first's removal cannot pull the file from under it.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

static CLAIMS: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

/// A spool path held until dropped.
pub(crate) struct SpoolClaim(PathBuf);

impl SpoolClaim {
    /// Waits until no one else holds `path`, then holds it.
    pub(crate) async fn acquire(path: PathBuf) -> Self {
        loop {
            {
                let mut claims = CLAIMS.lock().unwrap_or_else(|p| p.into_inner());
                if claims.get_or_insert_with(HashSet::new).insert(path.clone()) {
                    return Self(path);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for SpoolClaim {
    fn drop(&mut self) {
        let mut claims = CLAIMS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = claims.as_mut() {
            c.remove(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_claim_waits_for_the_first() {
        let path = PathBuf::from("/spool/claim-test.dcm");
        let first = SpoolClaim::acquire(path.clone()).await;
        let second = tokio::spawn(SpoolClaim::acquire(path.clone()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!second.is_finished(), "the second claim did not wait");
        drop(first);
        tokio::time::timeout(Duration::from_secs(10), second)
            .await
            .expect("the second claim follows the first's release")
            .unwrap();
    }
}
