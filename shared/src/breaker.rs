//! The crash-loop breaker. An input that kills a stage process (out of memory, an abort, a stack
//! overflow) is never committed, so the bus hands it to the next process (or a resumed folder
//! scan reads it again), which dies the same way, forever, and holds up everything behind it.
//! Before inputs are handled the stage writes which are in flight to a small ledger in the
//! claim-check store (one per partition, or per folder-scanning ingest instance), and clears
//! them once they are committed or given back. A process that finds inputs still marked in
//! flight knows its predecessor died holding them: each is charged one crash; a batch holding a
//! charged input is handled one record at a time, so the next crash is charged to the culprit
//! alone; an input charged `crash_limit` times is dead-lettered unopened.
//!
//! A revoked owner that is still finishing its batch when the new owner reads the ledger looks
//! like a crash, charging its inputs once; the limit leaves room for that. When the store cannot
//! be reached the stage goes on unprotected rather than stop: the store being down does not make
//! a crash more likely, and every stage that needs it retries on its own.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;

use crate::bus::Record;
use crate::error::StageError;
use crate::store::BlobStore;

/// What the breaker says about one record of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Never in flight during a crash.
    Fresh,
    /// In flight during this many crashes, under the limit: handle it alone.
    Suspect(u32),
    /// In flight during this many crashes, at the limit: dead-letter it unopened.
    Tripped(u32),
}

#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Ledger {
    in_flight: Vec<String>,
    /// Input → crashes it was in flight during; only inputs not yet committed.
    crashes: BTreeMap<String, u32>,
}

/// One input as the breaker knows it: the ledger it is kept in and its key there.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Unit {
    pub ledger: String,
    pub key: String,
}

impl Unit {
    /// A record from the bus: its partition's ledger, its offset.
    pub fn of(record: &Record) -> Self {
        Self {
            ledger: format!("{}/{}", record.topic, record.partition),
            key: record.offset.to_string(),
        }
    }
}

/// One stage's breaker over the partitions it consumes.
pub struct Breaker {
    store: BlobStore,
    stage: &'static str,
    limit: u32,
    ledgers: HashMap<String, Ledger>,
}

impl Breaker {
    pub fn new(store: BlobStore, stage: &'static str, crash_limit: u32) -> Self {
        Self {
            store,
            stage,
            limit: crash_limit.max(1),
            ledgers: HashMap::new(),
        }
    }

    fn name(&self, ledger: &str) -> String {
        format!("breaker/{}/{ledger}", self.stage)
    }

    /// Forgets the ledgers read so far, so the next [`Breaker::admit`] reads them again (other
    /// processes may have written them since).
    pub fn forget(&mut self) {
        self.ledgers.clear();
    }

    /// Reads the ledgers of `units` not read yet, charges a crash to every input a dead
    /// predecessor left in flight, and says what to do with each unit.
    pub async fn admit(&mut self, units: &[Unit]) -> Vec<Admission> {
        for unit in units {
            if self.ledgers.contains_key(&unit.ledger) {
                continue;
            }
            let mut ledger = match self.store.get_named(&self.name(&unit.ledger)).await {
                Ok(Some(bytes)) => serde_json::from_slice::<Ledger>(&bytes).unwrap_or_default(),
                Ok(None) => Ledger::default(),
                Err(e) => {
                    tracing::warn!(stage = self.stage, error = %e, "crash-loop breaker: cannot read its ledger; going on unprotected");
                    Ledger::default()
                }
            };
            for key in std::mem::take(&mut ledger.in_flight) {
                tracing::error!(stage = self.stage, ledger = %unit.ledger, input = %key, "an earlier process died with this input in flight");
                *ledger.crashes.entry(key).or_default() += 1;
            }
            self.ledgers.insert(unit.ledger.clone(), ledger);
        }
        units
            .iter()
            .map(|u| {
                let crashes = self
                    .ledgers
                    .get(&u.ledger)
                    .and_then(|l| l.crashes.get(&u.key))
                    .copied()
                    .unwrap_or(0);
                match crashes {
                    0 => Admission::Fresh,
                    n if n >= self.limit => Admission::Tripped(n),
                    n => Admission::Suspect(n),
                }
            })
            .collect()
    }

    /// Marks `units` in flight (and only them) before they are handled.
    pub async fn in_flight(&mut self, units: &[&Unit]) {
        for ledger in self.ledgers.values_mut() {
            ledger.in_flight.clear();
        }
        for u in units {
            self.ledgers
                .entry(u.ledger.clone())
                .or_default()
                .in_flight
                .push(u.key.clone());
        }
        self.write_all().await;
    }

    /// After handling `units`: committed, their crash counts go; given back, the counts stay for
    /// whoever handles them next. Nothing is left marked in flight.
    pub async fn settle(&mut self, units: &[Unit], committed: bool) {
        for ledger in self.ledgers.values_mut() {
            ledger.in_flight.clear();
        }
        if committed {
            for u in units {
                if let Some(l) = self.ledgers.get_mut(&u.ledger) {
                    l.crashes.remove(&u.key);
                }
            }
        }
        self.write_all().await;
    }

    async fn write_all(&self) {
        for (ledger_name, ledger) in &self.ledgers {
            let name = self.name(ledger_name);
            let written = if ledger == &Ledger::default() {
                self.store.delete_named(&name).await
            } else {
                let bytes = serde_json::to_vec(ledger).expect("a ledger serialises");
                self.store.put_named(&name, Bytes::from(bytes)).await
            };
            if let Err(e) = written {
                tracing::warn!(stage = self.stage, error = %e, "crash-loop breaker: cannot write its ledger; going on unprotected");
            }
        }
    }

    /// The dead letter's reason for an input that was in flight during `crashes` crashes.
    pub fn tripped(&self, crashes: u32) -> StageError {
        StageError::internal(format!(
            "the {stage} process died {crashes} times while this input was being handled (out \
             of memory, an abort or a crash, not an error it could report), so it was set aside \
             unopened and the stage went on; look at the {stage} logs and restarts (e.g. \
             OOMKilled) at the time, find the input by this letter's origin, and send it again \
             once the cause is fixed",
            stage = self.stage
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(partition: i32, offset: i64) -> Unit {
        Unit::of(&Record {
            topic: "in".into(),
            partition,
            offset,
            key: None,
            payload: vec![],
            headers: vec![],
        })
    }

    fn store(dir: &std::path::Path) -> BlobStore {
        BlobStore::open(&crate::store::StoreConfig {
            url: dir.display().to_string(),
            endpoint: String::new(),
        })
        .unwrap()
    }

    /// A process that marks a batch in flight and dies before settling it.
    async fn die_holding(dir: &std::path::Path, batch: &[Unit], limit: u32) -> Vec<Admission> {
        let mut b = Breaker::new(store(dir), "stage", limit);
        let admitted = b.admit(batch).await;
        b.in_flight(&batch.iter().collect::<Vec<_>>()).await;
        admitted
    }

    #[tokio::test]
    async fn inputs_in_flight_during_crashes_are_charged_until_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let batch = vec![record(0, 5), record(0, 6)];
        assert_eq!(
            die_holding(dir.path(), &batch, 2).await,
            vec![Admission::Fresh, Admission::Fresh]
        );
        // Both are suspects now, handled one at a time: 5 gets through, the process dies on 6.
        let mut b = Breaker::new(store(dir.path()), "stage", 2);
        assert_eq!(
            b.admit(&batch).await,
            vec![Admission::Suspect(1), Admission::Suspect(1)]
        );
        b.in_flight(&[&batch[0]]).await;
        b.in_flight(&[&batch[1]]).await;
        drop(b);
        let mut b = Breaker::new(store(dir.path()), "stage", 2);
        assert_eq!(
            b.admit(&batch).await,
            vec![Admission::Suspect(1), Admission::Tripped(2)]
        );
        b.in_flight(&[&batch[0]]).await;
        b.settle(&batch, true).await;
        let mut b = Breaker::new(store(dir.path()), "stage", 2);
        assert_eq!(
            b.admit(&[record(0, 7)]).await,
            vec![Admission::Fresh],
            "a committed batch leaves nothing behind"
        );
    }

    #[tokio::test]
    async fn a_batch_given_back_keeps_its_charges_and_clears_its_marks() {
        let dir = tempfile::tempdir().unwrap();
        let batch = vec![record(3, 10)];
        die_holding(dir.path(), &batch, 3).await;
        let mut b = Breaker::new(store(dir.path()), "stage", 3);
        assert_eq!(b.admit(&batch).await, vec![Admission::Suspect(1)]);
        b.in_flight(&[&batch[0]]).await;
        b.settle(&batch, false).await;
        let mut b = Breaker::new(store(dir.path()), "stage", 3);
        assert_eq!(
            b.admit(&batch).await,
            vec![Admission::Suspect(1)],
            "a graceful give-back is not a crash, and does not forget the earlier one"
        );
    }

    #[tokio::test]
    async fn other_partitions_and_stages_are_not_charged() {
        let dir = tempfile::tempdir().unwrap();
        die_holding(dir.path(), &[record(0, 1)], 3).await;
        let mut b = Breaker::new(store(dir.path()), "stage", 3);
        assert_eq!(b.admit(&[record(1, 1)]).await, vec![Admission::Fresh]);
        let mut other = Breaker::new(store(dir.path()), "other", 3);
        assert_eq!(other.admit(&[record(0, 1)]).await, vec![Admission::Fresh]);
    }
}
