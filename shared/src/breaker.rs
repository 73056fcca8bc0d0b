//! The crash-loop breaker. An input that kills a stage process (out of memory, an abort, a stack
//! overflow) is never committed, so the bus hands it to the next process, which dies the same
//! way, forever, and holds up everything behind it on its partition. Before a batch is handled
//! the stage writes the offsets in flight to a small ledger per partition in the claim-check
//! store, and clears them once the batch is committed or given back. A process that finds offsets
//! still marked in flight knows its predecessor died holding them: each is charged one crash; a
//! batch holding a charged input is handled one record at a time, so the next crash is charged
//! to the culprit alone; an input charged `crash_limit` times is dead-lettered unopened.
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
    in_flight: Vec<i64>,
    /// Offset → crashes it was in flight during; only offsets not yet committed.
    crashes: BTreeMap<i64, u32>,
}

type Partition = (String, i32);

/// One stage's breaker over the partitions it consumes.
pub struct Breaker {
    store: BlobStore,
    stage: &'static str,
    limit: u32,
    ledgers: HashMap<Partition, Ledger>,
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

    fn name(&self, (topic, partition): &Partition) -> String {
        format!("breaker/{}/{topic}/{partition}", self.stage)
    }

    /// Reads the ledgers of the batch's partitions, charges a crash to every offset a dead
    /// predecessor left in flight, and says what to do with each record.
    pub async fn admit(&mut self, batch: &[Record]) -> Vec<Admission> {
        self.ledgers.clear();
        for record in batch {
            let p = (record.topic.clone(), record.partition);
            if self.ledgers.contains_key(&p) {
                continue;
            }
            let mut ledger = match self.store.get_named(&self.name(&p)).await {
                Ok(Some(bytes)) => serde_json::from_slice::<Ledger>(&bytes).unwrap_or_default(),
                Ok(None) => Ledger::default(),
                Err(e) => {
                    tracing::warn!(stage = self.stage, error = %e, "crash-loop breaker: cannot read its ledger; going on unprotected");
                    Ledger::default()
                }
            };
            for offset in std::mem::take(&mut ledger.in_flight) {
                *ledger.crashes.entry(offset).or_default() += 1;
                tracing::error!(stage = self.stage, topic = %p.0, partition = p.1, offset, "an earlier process died with this input in flight");
            }
            // The batch starts at the committed offset: anything before it is done with.
            let first = batch
                .iter()
                .filter(|r| r.topic == p.0 && r.partition == p.1)
                .map(|r| r.offset)
                .min()
                .unwrap_or(i64::MAX);
            ledger.crashes.retain(|&o, _| o >= first);
            self.ledgers.insert(p, ledger);
        }
        batch
            .iter()
            .map(|r| {
                let crashes = self
                    .ledgers
                    .get(&(r.topic.clone(), r.partition))
                    .and_then(|l| l.crashes.get(&r.offset))
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

    /// Marks `records` in flight (and only them, per partition) before they are handled.
    pub async fn in_flight(&mut self, records: &[&Record]) {
        for ledger in self.ledgers.values_mut() {
            ledger.in_flight.clear();
        }
        for r in records {
            self.ledgers
                .entry((r.topic.clone(), r.partition))
                .or_default()
                .in_flight
                .push(r.offset);
        }
        self.write_all().await;
    }

    /// After the batch: committed, its partitions' crash counts up to its last offset go; given
    /// back, they stay for whoever gets the batch next. Nothing is left marked in flight.
    pub async fn settle(&mut self, batch: &[Record], committed: bool) {
        for ledger in self.ledgers.values_mut() {
            ledger.in_flight.clear();
        }
        if committed {
            for r in batch {
                if let Some(l) = self.ledgers.get_mut(&(r.topic.clone(), r.partition)) {
                    l.crashes.remove(&r.offset);
                }
            }
        }
        self.write_all().await;
    }

    async fn write_all(&self) {
        for (p, ledger) in &self.ledgers {
            let name = self.name(p);
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

    fn record(partition: i32, offset: i64) -> Record {
        Record {
            topic: "in".into(),
            partition,
            offset,
            key: None,
            payload: vec![],
            headers: vec![],
        }
    }

    fn store(dir: &std::path::Path) -> BlobStore {
        BlobStore::open(&crate::store::StoreConfig {
            url: dir.display().to_string(),
            endpoint: String::new(),
        })
        .unwrap()
    }

    /// A process that marks a batch in flight and dies before settling it.
    async fn die_holding(dir: &std::path::Path, batch: &[Record], limit: u32) -> Vec<Admission> {
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
