//! The in-process bus: Kafka's semantics (logs, consumer groups, committed offsets, atomic
//! produce-and-commit) over tokio, for `fracture scan` and for tests.
//!
//! Each topic is one partition, so order is total (and per key). Records every known group has
//! committed are dropped, so a scan of millions of files does not keep them all in memory.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{Bus, BusError, OutRecord, Producer, Record, StageIo};

#[derive(Default)]
struct Log {
    /// Offset of `records[0]`.
    base: i64,
    records: VecDeque<Record>,
    /// Groups that consume this topic (for trimming).
    groups: HashSet<String>,
}

impl Log {
    fn end(&self) -> i64 {
        self.base + self.records.len() as i64
    }
}

#[derive(Default)]
struct State {
    topics: HashMap<String, Log>,
    /// (group, topic) -> next offset to consume.
    committed: HashMap<(String, String), i64>,
}

/// Cheap to clone; clones share the logs.
#[derive(Clone)]
pub struct InProcBus {
    state: Arc<Mutex<State>>,
    /// Bumped on every append, so waiting consumers wake up.
    version: watch::Sender<u64>,
}

impl Default for InProcBus {
    fn default() -> Self {
        Self::new()
    }
}

impl InProcBus {
    pub fn new() -> Self {
        Self {
            state: Arc::default(),
            version: watch::channel(0).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain data in a consistent state (every
        // mutation is a single push or assignment), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a group has not yet committed on `topic` (its lag).
    pub fn lag(&self, group: &str, topic: &str) -> i64 {
        let s = self.lock();
        let end = s.topics.get(topic).map(Log::end).unwrap_or(0);
        let done = s
            .committed
            .get(&(group.to_string(), topic.to_string()))
            .copied()
            .unwrap_or(0);
        end - done
    }

    /// Number of records ever appended to `topic`.
    pub fn end_offset(&self, topic: &str) -> i64 {
        self.lock().topics.get(topic).map(Log::end).unwrap_or(0)
    }

    fn append(&self, s: &mut State, outputs: Vec<OutRecord>) -> Result<(), BusError> {
        for o in &outputs {
            if !s.topics.contains_key(&o.topic) {
                return Err(BusError::UnknownTopic(o.topic.clone()));
            }
        }
        for o in outputs {
            let log = s.topics.get_mut(&o.topic).expect("checked above");
            let offset = log.end();
            log.records.push_back(Record {
                topic: o.topic,
                partition: 0,
                offset,
                key: Some(o.key),
                payload: o.payload,
                headers: o.headers,
            });
        }
        Ok(())
    }

    fn trim(s: &mut State, topic: &str) {
        let Some(log) = s.topics.get(topic) else {
            return;
        };
        let min = log
            .groups
            .iter()
            .map(|g| {
                s.committed
                    .get(&(g.clone(), topic.to_string()))
                    .copied()
                    .unwrap_or(0)
            })
            .min();
        if let (Some(min), Some(log)) = (min, s.topics.get_mut(topic)) {
            while log.base < min && !log.records.is_empty() {
                log.records.pop_front();
                log.base += 1;
            }
        }
    }
}

#[async_trait]
impl Bus for InProcBus {
    async fn consumer(
        &self,
        group: &str,
        topics: &[String],
        _instance: &str,
    ) -> Result<Box<dyn StageIo>, BusError> {
        let mut s = self.lock();
        let mut position = HashMap::new();
        for t in topics {
            let log = s
                .topics
                .get_mut(t)
                .ok_or_else(|| BusError::UnknownTopic(t.clone()))?;
            log.groups.insert(group.to_string());
            let committed = s
                .committed
                .get(&(group.to_string(), t.clone()))
                .copied()
                .unwrap_or(0);
            position.insert(t.clone(), committed);
        }
        Ok(Box::new(InProcConsumer {
            bus: self.clone(),
            group: group.to_string(),
            topics: topics.to_vec(),
            position,
            version: self.version.subscribe(),
        }))
    }

    async fn producer(&self, _instance: &str) -> Result<Box<dyn Producer>, BusError> {
        Ok(Box::new(InProcProducer { bus: self.clone() }))
    }

    async fn create_topics(&self, topics: &[String], _partitions: i32) -> Result<(), BusError> {
        let mut s = self.lock();
        for t in topics {
            s.topics.entry(t.clone()).or_default();
        }
        Ok(())
    }

    /// Records every group has committed are trimmed (see the module doc), so this returns what
    /// is still retained.
    async fn read_committed(&self, topics: &[String]) -> Result<Vec<Record>, BusError> {
        let s = self.lock();
        let mut out = Vec::new();
        for t in topics {
            let log = s
                .topics
                .get(t)
                .ok_or_else(|| BusError::UnknownTopic(t.clone()))?;
            out.extend(log.records.iter().cloned());
        }
        Ok(out)
    }
}

struct InProcConsumer {
    bus: InProcBus,
    group: String,
    topics: Vec<String>,
    /// Next offset to hand out per topic (ahead of the committed one while a batch is open).
    position: HashMap<String, i64>,
    version: watch::Receiver<u64>,
}

impl InProcConsumer {
    /// Appends records after `position` to `out`, advancing the given positions (not ours: a
    /// poll that is cancelled half-way must not lose what it had taken).
    fn take(&self, position: &mut HashMap<String, i64>, max: usize, out: &mut Vec<Record>) {
        let s = self.bus.lock();
        for t in &self.topics {
            let Some(log) = s.topics.get(t) else { continue };
            let pos = position
                .get_mut(t)
                .expect("every subscribed topic has a position");
            while out.len() < max && *pos < log.end() {
                let idx = (*pos - log.base).max(0) as usize;
                if let Some(r) = log.records.get(idx) {
                    out.push(r.clone());
                }
                *pos += 1;
            }
        }
    }
}

#[async_trait]
impl StageIo for InProcConsumer {
    fn lag(&self) -> Option<i64> {
        Some(
            self.topics
                .iter()
                .map(|t| self.bus.end_offset(t) - self.position.get(t).copied().unwrap_or(0))
                .sum(),
        )
    }

    async fn poll_batch(
        &mut self,
        max: usize,
        linger: Duration,
        idle: Duration,
    ) -> Result<Vec<Record>, BusError> {
        let mut out = Vec::new();
        let mut position = self.position.clone();
        let first_deadline = Instant::now() + idle;
        let mut deadline = first_deadline;
        loop {
            self.version.borrow_and_update();
            self.take(&mut position, max, &mut out);
            if out.len() >= max || (!out.is_empty() && Instant::now() >= deadline) {
                self.position = position;
                return Ok(out);
            }
            if !out.is_empty() && deadline == first_deadline {
                deadline = Instant::now() + linger;
            }
            if Instant::now() >= deadline {
                self.position = position;
                return Ok(out);
            }
            // Woken by an append, or by the deadline.
            let _ = tokio::time::timeout_at(deadline, self.version.changed()).await;
        }
    }

    async fn commit(&mut self, outputs: Vec<OutRecord>) -> Result<(), BusError> {
        {
            let mut s = self.bus.lock();
            self.bus.append(&mut s, outputs)?;
            for t in &self.topics {
                s.committed
                    .insert((self.group.clone(), t.clone()), self.position[t]);
                InProcBus::trim(&mut s, t);
            }
        }
        self.bus.version.send_modify(|v| *v += 1);
        Ok(())
    }

    async fn rewind(&mut self) -> Result<(), BusError> {
        let s = self.bus.lock();
        for t in &self.topics {
            let c = s
                .committed
                .get(&(self.group.clone(), t.clone()))
                .copied()
                .unwrap_or(0);
            self.position.insert(t.clone(), c);
        }
        Ok(())
    }

    async fn close(self: Box<Self>) -> Result<(), BusError> {
        Ok(())
    }
}

struct InProcProducer {
    bus: InProcBus,
}

#[async_trait]
impl Producer for InProcProducer {
    async fn send(&mut self, outputs: Vec<OutRecord>) -> Result<(), BusError> {
        {
            let mut s = self.bus.lock();
            self.bus.append(&mut s, outputs)?;
        }
        self.bus.version.send_modify(|v| *v += 1);
        Ok(())
    }

    async fn close(self: Box<Self>) -> Result<(), BusError> {
        Ok(())
    }
}

impl InProcBus {
    /// Declares that `group` will consume `topic`, before it starts: records are then kept for
    /// it even if other groups commit past them first.
    pub fn register_group(&self, group: &str, topic: &str) -> Result<(), BusError> {
        let mut s = self.lock();
        let log = s
            .topics
            .get_mut(topic)
            .ok_or_else(|| BusError::UnknownTopic(topic.to_string()))?;
        log.groups.insert(group.to_string());
        Ok(())
    }
}
