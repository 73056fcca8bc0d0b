//! The `Bus`: how stages consume, produce and commit, on Kafka or in one process.
//!
//! Stage code sees only [`Bus`] and [`StageIo`]. A stage polls a batch, works, then calls
//! [`StageIo::commit`] with its outputs: the outputs become visible and the batch counts as
//! consumed atomically (one Kafka transaction with the offsets in it), so a crash between the two
//! re-delivers the batch and never publishes half of it.

use std::time::Duration;

use async_trait::async_trait;

pub mod inproc;
pub mod kafka;
pub mod lanes;

pub use inproc::InProcBus;
pub use kafka::{KafkaBus, KafkaConfig};
pub use lanes::{Lane, LaneConfig, LanedIo, LanedProducer};

/// A consumed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A message to produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutRecord {
    pub topic: String,
    pub key: String,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The transaction was aborted (or the group rebalanced) and the consumer rewound to the last
    /// commit: the caller polls again and will see the same records; nothing was published.
    #[error("transaction aborted, batch will be re-delivered: {0}")]
    Aborted(String),
    /// Another instance with the same transactional id took over, or the client hit a fatal
    /// error: this instance must stop and let its supervisor restart it.
    #[error("fatal bus error, the stage must restart: {0}")]
    Fatal(String),
    /// The broker could not be reached in time; retry.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    #[error("topic {0} does not exist; create the topics first (`fracture topics create`)")]
    UnknownTopic(String),
}

/// Topic names with the configured prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    pub prefix: String,
}

impl Default for Topics {
    fn default() -> Self {
        Self {
            prefix: "fracture".into(),
        }
    }
}

impl Topics {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
        }
    }
    /// `name` is a message's topic suffix, e.g. `deidentified` (see `Message::TOPIC`).
    pub fn name(&self, name: &str) -> String {
        format!("{}.{}", self.prefix, name)
    }
    pub fn of<M: crate::messages::Message>(&self) -> String {
        self.name(M::TOPIC)
    }
    /// Every topic the pipeline uses, both lanes of the laned ones.
    pub fn all(&self) -> Vec<String> {
        use crate::messages::*;
        let mut all: Vec<String> = [
            Deidentified::TOPIC,
            Preprocessed::TOPIC,
            Scored::TOPIC,
            Finding::TOPIC,
            StudySummary::TOPIC,
            Label::TOPIC,
            Alert::TOPIC,
            DeadLetter::TOPIC,
        ]
        .iter()
        .map(|t| self.name(t))
        .collect();
        all.extend(self.laned().iter().map(|t| self.in_lane(t, Lane::Backscan)));
        all
    }
}

/// A transport.
#[async_trait]
pub trait Bus: Send + Sync {
    /// Joins consumer group `group` on `topics`. `instance` names this replica (stable across
    /// its restarts: it becomes the transactional id, so a restarted replica fences its zombie).
    async fn consumer(
        &self,
        group: &str,
        topics: &[String],
        instance: &str,
    ) -> Result<Box<dyn StageIo>, BusError>;

    /// A transactional producer for a source stage (one with no input topic).
    async fn producer(&self, instance: &str) -> Result<Box<dyn Producer>, BusError>;

    /// Creates topics that do not exist yet; existing ones are left as they are.
    async fn create_topics(&self, topics: &[String], partitions: i32) -> Result<(), BusError>;

    /// Every committed record on `topics` from the start up to their ends as of the call, in
    /// offset order per partition; no consumer group, nothing committed. How a source stage
    /// learns, after a crash, what its committed transactions already published.
    async fn read_committed(&self, topics: &[String]) -> Result<Vec<Record>, BusError>;
}

/// One consumer-group member with its transactional producer.
#[async_trait]
pub trait StageIo: Send {
    /// Records on this member's partitions not yet consumed, when the transport knows.
    fn lag(&self) -> Option<i64> {
        None
    }

    /// Waits up to about `idle` for a first record, then gathers up to `max` records for at most
    /// `linger` more. An empty batch means nothing arrived. Cancel-safe: a poll dropped half-way
    /// loses nothing (its records come again).
    async fn poll_batch(
        &mut self,
        max: usize,
        linger: Duration,
        idle: Duration,
    ) -> Result<Vec<Record>, BusError>;

    /// Atomically publishes `outputs` and marks every record polled since the last commit as
    /// consumed.
    async fn commit(&mut self, outputs: Vec<OutRecord>) -> Result<(), BusError>;

    /// Forgets what was polled since the last commit: the next poll starts there again.
    async fn rewind(&mut self) -> Result<(), BusError>;

    /// Leaves the group cleanly (uncommitted records go to another member or the next start).
    async fn close(self: Box<Self>) -> Result<(), BusError>;
}

/// A transactional producer with no input.
#[async_trait]
pub trait Producer: Send {
    /// Publishes all of `outputs` or none of them.
    async fn send(&mut self, outputs: Vec<OutRecord>) -> Result<(), BusError>;
    async fn close(self: Box<Self>) -> Result<(), BusError>;
}
