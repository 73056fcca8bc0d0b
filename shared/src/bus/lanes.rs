//! Live work ahead of back-scans: two lanes of the same topics, and a consumer that prefers one.
//!
//! A radiograph from a working department (the push doors: C-STORE, STOW-RS) travels in the live
//! lane, `<prefix>.<topic>`; one from a back-scan of an archive (folders, the DICOMweb back-scan)
//! in the back-scan lane, `<prefix>.<topic>.backscan`. Each stage consumes both, each lane in a
//! consumer group of its own (so the back-scan's backlog and offsets never touch the live lane's),
//! and every output stays in its input's lane. [`LanedIo`] polls the live lane first and takes a
//! back-scan batch only when no live work is waiting, so a live radiograph waits at most for the
//! back-scan batch in hand at each stage, never for the back-scan's queue.

use std::time::Duration;

use async_trait::async_trait;

use super::{BusError, OutRecord, Producer, Record, StageIo, Topics};

/// Which queue a radiograph travels in.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Lane {
    /// Clinical traffic: someone may be waiting for the answer.
    #[default]
    Live,
    /// Archive back-scans: throughput matters, latency does not.
    Backscan,
}

impl Lane {
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Live => "live",
            Lane::Backscan => "backscan",
        }
    }
}

/// `[lanes]`: whether there are two lanes, and how a consuming stage shares itself between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LaneConfig {
    /// Two lanes (the default): what ingest reads itself travels in `ingest.lane`, and every
    /// stage consumes both, each lane in a consumer group of its own. Off, every stage has one
    /// group and everything travels in the live lane: half the consumers and transactional
    /// producers, for a deployment that never back-scans.
    pub enabled: bool,
    /// Take live work whenever some is waiting, the back-scan only when none is (strict
    /// priority: a back-scan makes progress only between live radiographs). `false` alternates
    /// between the lanes batch by batch.
    pub live_first: bool,
}

impl Default for LaneConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            live_first: true,
        }
    }
}

/// The suffix of a back-scan lane's topic.
const BACKSCAN: &str = ".backscan";

/// The topic names (without prefix) that carry one radiograph from ingest to its finding, and so
/// have two lanes. Dead letters, labels, alerts and study summaries have one.
const LANED: [&str; 4] = {
    use crate::messages::*;
    [
        Deidentified::TOPIC,
        Preprocessed::TOPIC,
        Scored::TOPIC,
        Finding::TOPIC,
    ]
};

impl Topics {
    /// The live lane's names of the laned topics.
    pub fn laned(&self) -> Vec<String> {
        LANED.iter().map(|t| self.name(t)).collect()
    }

    /// Whether `live` is one of this deployment's laned topics; no allocation, since every
    /// output record of every stage asks.
    fn has_lanes(&self, live: &str) -> bool {
        live.strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some_and(|name| LANED.contains(&name))
    }

    /// `topic` in `lane`: a laned topic's name in that lane, any other topic as it is.
    pub fn in_lane(&self, topic: &str, lane: Lane) -> String {
        let live = topic.strip_suffix(BACKSCAN).unwrap_or(topic);
        if !self.has_lanes(live) {
            return topic.to_string();
        }
        match lane {
            Lane::Live => live.to_string(),
            Lane::Backscan => format!("{live}{BACKSCAN}"),
        }
    }

    /// The lane a record of `topic` travels in.
    pub fn lane_of(&self, topic: &str) -> Lane {
        match topic.strip_suffix(BACKSCAN) {
            Some(live) if self.has_lanes(live) => Lane::Backscan,
            _ => Lane::Live,
        }
    }

    /// Every topic message `M` travels on: both lanes where it has two.
    pub fn lanes_of<M: crate::messages::Message>(&self) -> Vec<String> {
        let live = self.of::<M>();
        let backscan = self.in_lane(&live, Lane::Backscan);
        if backscan == live {
            vec![live]
        } else {
            vec![live, backscan]
        }
    }
}

/// One stage member on both lanes: a consumer (and transactional producer) per lane, polled
/// live first (or alternately). A batch is always from one lane, and records polled from one lane
/// are committed before the other is polled, so each commit is one transaction of one group.
pub struct LanedIo {
    live: Box<dyn StageIo>,
    backscan: Box<dyn StageIo>,
    live_first: bool,
    /// The lane whose records were polled and not yet committed.
    pending: Option<Lane>,
    /// The last back-scan poll found work: the live lane is then only looked at, not waited on.
    backscan_busy: bool,
    /// Without priority, the lane polled first next time.
    turn: Lane,
}

/// How long a poll of a lane waits when another lane may have work meanwhile.
const GLANCE: Duration = Duration::from_millis(1);
/// The longest a poll of the back-scan lane waits while a live radiograph could be arriving.
const BACKSCAN_WAIT: Duration = Duration::from_millis(20);

impl LanedIo {
    pub fn new(live: Box<dyn StageIo>, backscan: Box<dyn StageIo>, cfg: LaneConfig) -> Self {
        Self {
            live,
            backscan,
            live_first: cfg.live_first,
            pending: None,
            backscan_busy: false,
            turn: Lane::Live,
        }
    }

    fn io(&mut self, lane: Lane) -> &mut dyn StageIo {
        match lane {
            Lane::Live => self.live.as_mut(),
            Lane::Backscan => self.backscan.as_mut(),
        }
    }

    async fn poll_lane(
        &mut self,
        lane: Lane,
        max: usize,
        linger: Duration,
        wait: Duration,
    ) -> Result<Vec<Record>, BusError> {
        let batch = self.io(lane).poll_batch(max, linger, wait).await?;
        if lane == Lane::Backscan {
            self.backscan_busy = !batch.is_empty();
        }
        if !batch.is_empty() {
            self.pending = Some(lane);
        }
        Ok(batch)
    }
}

#[async_trait]
impl StageIo for LanedIo {
    fn lag(&self) -> Option<i64> {
        match (self.live.lag(), self.backscan.lag()) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
        }
    }

    async fn poll_batch(
        &mut self,
        max: usize,
        linger: Duration,
        idle: Duration,
    ) -> Result<Vec<Record>, BusError> {
        if let Some(lane) = self.pending {
            // The caller gathers more before committing: from the same lane, one transaction.
            return self.poll_lane(lane, max, linger, idle).await;
        }
        if self.live_first {
            let wait = if self.backscan_busy { GLANCE } else { idle };
            let live = self.poll_lane(Lane::Live, max, linger, wait).await?;
            if !live.is_empty() {
                return Ok(live);
            }
            let wait = if self.backscan_busy {
                BACKSCAN_WAIT.min(idle)
            } else {
                GLANCE
            };
            return self.poll_lane(Lane::Backscan, max, linger, wait).await;
        }
        let first = self.turn;
        let second = match first {
            Lane::Live => Lane::Backscan,
            Lane::Backscan => Lane::Live,
        };
        self.turn = second;
        for lane in [first, second] {
            let got = self.poll_lane(lane, max, linger, GLANCE).await?;
            if !got.is_empty() {
                return Ok(got);
            }
        }
        // Both idle: wait where a wait matters, the live lane.
        self.poll_lane(Lane::Live, max, linger, idle).await
    }

    async fn commit(&mut self, outputs: Vec<OutRecord>) -> Result<(), BusError> {
        let lane = self.pending.take().unwrap_or(Lane::Live);
        self.io(lane).commit(outputs).await
    }

    async fn rewind(&mut self) -> Result<(), BusError> {
        self.pending = None;
        let live = self.live.rewind().await;
        let backscan = self.backscan.rewind().await;
        live.and(backscan)
    }

    async fn close(self: Box<Self>) -> Result<(), BusError> {
        let this = *self;
        let live = this.live.close().await;
        let backscan = this.backscan.close().await;
        live.and(backscan)
    }
}

/// A source's producer whose radiographs travel in `lane`: laned topics are renamed into it.
pub struct LanedProducer {
    inner: Box<dyn Producer>,
    topics: Topics,
    lane: Lane,
}

impl LanedProducer {
    pub fn new(inner: Box<dyn Producer>, topics: Topics, lane: Lane) -> Self {
        Self {
            inner,
            topics,
            lane,
        }
    }
}

#[async_trait]
impl Producer for LanedProducer {
    async fn send(&mut self, mut outputs: Vec<OutRecord>) -> Result<(), BusError> {
        for o in &mut outputs {
            o.topic = self.topics.in_lane(&o.topic, self.lane);
        }
        self.inner.send(outputs).await
    }

    async fn close(self: Box<Self>) -> Result<(), BusError> {
        self.inner.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{Bus, InProcBus};
    use crate::messages::{DeadLetter, Deidentified, Finding, Label};

    /// The lanes of the batches a [`LanedIo`] hands out, with 12 records waiting in each lane,
    /// committing each batch.
    async fn batch_lanes(cfg: LaneConfig) -> Vec<Lane> {
        let bus = InProcBus::new();
        let t = Topics::new("p");
        bus.create_topics(&t.all(), 1).await.unwrap();
        let live = t.of::<Deidentified>();
        let mut p = bus.producer("src").await.unwrap();
        let record = |topic: String, i: usize| OutRecord {
            topic,
            key: format!("k{i}"),
            payload: vec![b'x'],
            headers: vec![],
        };
        p.send(
            (0..12)
                .flat_map(|i| {
                    [
                        record(live.clone(), i),
                        record(t.in_lane(&live, Lane::Backscan), i),
                    ]
                })
                .collect(),
        )
        .await
        .unwrap();
        let backscan = t.in_lane(&live, Lane::Backscan);
        let mut io = LanedIo::new(
            bus.consumer("g", std::slice::from_ref(&live), "g-0")
                .await
                .unwrap(),
            bus.consumer("g.backscan", &[backscan], "g-0.backscan")
                .await
                .unwrap(),
            cfg,
        );
        let mut lanes = Vec::new();
        loop {
            let b = io
                .poll_batch(4, Duration::from_millis(1), Duration::from_millis(50))
                .await
                .unwrap();
            let Some(first) = b.first() else { break };
            let lane = t.lane_of(&first.topic);
            assert!(
                b.iter().all(|r| t.lane_of(&r.topic) == lane),
                "one lane a batch"
            );
            lanes.push(lane);
            io.commit(vec![]).await.unwrap();
        }
        lanes
    }

    #[tokio::test]
    async fn live_first_drains_the_live_lane_before_any_backscan_batch() {
        use Lane::*;
        let lanes = batch_lanes(LaneConfig {
            enabled: true,
            live_first: true,
        })
        .await;
        assert_eq!(lanes, [Live, Live, Live, Backscan, Backscan, Backscan]);
    }

    #[tokio::test]
    async fn without_priority_the_lanes_take_turns() {
        use Lane::*;
        let lanes = batch_lanes(LaneConfig {
            enabled: true,
            live_first: false,
        })
        .await;
        assert_eq!(lanes, [Live, Backscan, Live, Backscan, Live, Backscan]);
    }

    #[test]
    fn the_radiograph_flow_has_two_lanes_and_the_rest_one() {
        let t = Topics::new("f");
        assert_eq!(
            t.in_lane("f.deidentified", Lane::Backscan),
            "f.deidentified.backscan"
        );
        assert_eq!(
            t.in_lane("f.deidentified.backscan", Lane::Live),
            "f.deidentified"
        );
        assert_eq!(t.in_lane("f.findings", Lane::Live), "f.findings");
        assert_eq!(t.in_lane("f.dead-letter", Lane::Backscan), "f.dead-letter");
        assert_eq!(t.in_lane("f.labels", Lane::Backscan), "f.labels");
        // Another deployment's topics are not ours to rename.
        assert_eq!(t.in_lane("g.findings", Lane::Backscan), "g.findings");
        assert_eq!(t.lane_of("f.scored.backscan"), Lane::Backscan);
        assert_eq!(t.lane_of("f.scored"), Lane::Live);
        assert_eq!(t.lane_of("f.dead-letter.backscan"), Lane::Live);
        assert_eq!(
            t.lanes_of::<Finding>(),
            vec!["f.findings".to_string(), "f.findings.backscan".to_string()]
        );
        assert_eq!(t.lanes_of::<Deidentified>().len(), 2);
        assert_eq!(t.lanes_of::<Label>(), vec!["f.labels".to_string()]);
        assert_eq!(
            t.lanes_of::<DeadLetter>(),
            vec!["f.dead-letter".to_string()]
        );
        for laned in t.laned() {
            let twin = t.in_lane(&laned, Lane::Backscan);
            assert!(
                t.all().contains(&laned) && t.all().contains(&twin),
                "{twin}"
            );
        }
    }
}
