//! The Kafka bus (rdkafka): exactly-once per stage with a read-committed consumer and a
//! transactional producer that commits the consumed offsets inside the same transaction.
//!
//! librdkafka's transaction and poll calls block, so every one runs on tokio's blocking pool.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message as _, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer as _, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use super::{Bus, BusError, OutRecord, Producer, Record, StageIo};

/// `[kafka]`: where the broker is and how the clients behave.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port]`.
    pub brokers: String,
    /// Topics are `<prefix>.deidentified`, `<prefix>.findings`, ...
    pub topic_prefix: String,
    /// Partitions for topics that `fracture topics create` makes (the ceiling on replicas per stage).
    pub partitions: i32,
    /// Replication factor for created topics (1 for a single broker).
    pub replication: i32,
    /// Timeout for every broker call (transactions, commits, metadata), in milliseconds.
    pub timeout_ms: u64,
    /// Broker-side limit on an open transaction, in milliseconds.
    pub transaction_timeout_ms: u64,
    /// How long one batch may take before the member is considered dead and its partitions move.
    pub max_poll_interval_ms: u64,
    /// Heartbeat-based failure detection, in milliseconds.
    pub session_timeout_ms: u64,
    /// Static group membership (KIP-345): a replica rejoins under its instance name, so a
    /// container restarted in the same pod gets its partitions back at once instead of after a
    /// rebalance that waits out the dead member's session. Off by default: pods replaced by a
    /// rollout have new names and gain nothing, a replica gone for good holds its partitions
    /// for `session_timeout_ms`, and after a broker restart librdkafka can find itself fenced
    /// by its own earlier membership (the stage then rebuilds its consumer).
    pub static_membership: bool,
    /// Extra librdkafka properties (security.protocol, sasl.*, ...), passed as they are.
    pub extra: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            topic_prefix: "fracture".into(),
            partitions: 6,
            replication: 1,
            timeout_ms: 30_000,
            transaction_timeout_ms: 60_000,
            max_poll_interval_ms: 600_000,
            session_timeout_ms: 10_000,
            static_membership: false,
            extra: BTreeMap::new(),
        }
    }
}

/// Counts rebalances, so a batch gathered across one is recognised and dropped (its partitions
/// restart from the committed offsets, so nothing is lost and nothing is processed twice).
#[derive(Default)]
struct GenerationContext {
    generation: AtomicU64,
    /// Sum of `consumer_lag` over the assigned partitions from the last statistics; -1 unknown.
    lag: std::sync::atomic::AtomicI64,
}

impl ClientContext for GenerationContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => tracing::error!(facility = fac, "{log_message}"),
            RDKafkaLogLevel::Warning => tracing::warn!(facility = fac, "{log_message}"),
            _ => tracing::debug!(facility = fac, "{log_message}"),
        }
    }
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, "kafka client: {reason}");
    }

    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut lag = 0i64;
        let mut known = false;
        for t in statistics.topics.values() {
            for p in t.partitions.values() {
                // -1 is librdkafka's internal partition; "none" means not assigned to us.
                if p.partition < 0 || p.fetch_state == "none" || p.ls_offset < 0 {
                    continue;
                }
                // From the next record we would hand out. librdkafka's own consumer_lag counts
                // from the committed offset, which it does not see move when offsets are
                // committed through the producer's transaction.
                let from = [p.app_offset, p.committed_offset, p.lo_offset]
                    .into_iter()
                    .find(|&o| o >= 0);
                if let Some(from) = from {
                    lag += (p.ls_offset - from).max(0);
                    known = true;
                }
            }
        }
        self.lag
            .store(if known { lag } else { -1 }, Ordering::Relaxed);
    }
}

impl ConsumerContext for GenerationContext {
    fn pre_rebalance(&self, _c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        if let Rebalance::Error(e) = rebalance {
            tracing::warn!(error = %e, "consumer group rebalance error");
        }
    }
}

#[derive(Clone)]
pub struct KafkaBus {
    cfg: KafkaConfig,
}

impl KafkaBus {
    pub fn new(cfg: KafkaConfig) -> Self {
        Self { cfg }
    }

    fn base(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.cfg.brokers);
        for (k, v) in &self.cfg.extra {
            c.set(k, v);
        }
        c
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.timeout_ms)
    }

    fn transactional_producer(
        &self,
        instance: &str,
    ) -> Result<ThreadedProducer<DefaultProducerContext>, BusError> {
        let mut c = self.base();
        c.set("transactional.id", instance)
            .set("enable.idempotence", "true")
            // Where Java clients would put a key, so mixed deployments agree on partitions.
            .set("partitioner", "murmur2_random")
            .set(
                "transaction.timeout.ms",
                self.cfg.transaction_timeout_ms.to_string(),
            )
            .set("linger.ms", "5");
        let p: ThreadedProducer<DefaultProducerContext> = c
            .create()
            .map_err(|e| BusError::Fatal(format!("cannot create producer: {e}")))?;
        Ok(p)
    }
}

fn classify(e: KafkaError) -> BusError {
    if let KafkaError::Transaction(t) = &e {
        if t.is_fatal() {
            return BusError::Fatal(e.to_string());
        }
        if t.txn_requires_abort() {
            return BusError::Aborted(e.to_string());
        }
        return BusError::Unavailable(e.to_string());
    }
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::Fenced)
        | Some(RDKafkaErrorCode::ProducerFenced)
        | Some(RDKafkaErrorCode::InvalidProducerEpoch) => BusError::Fatal(e.to_string()),
        _ => BusError::Unavailable(e.to_string()),
    }
}

fn to_out_headers(headers: &[(String, String)]) -> OwnedHeaders {
    headers.iter().fold(
        OwnedHeaders::new_with_capacity(headers.len()),
        |h, (k, v)| {
            h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            })
        },
    )
}

/// Produces inside an open transaction, waiting out a full local queue.
fn produce_all(
    producer: &ThreadedProducer<DefaultProducerContext>,
    outputs: &[OutRecord],
    deadline: Instant,
) -> Result<(), BusError> {
    for o in outputs {
        let headers = to_out_headers(&o.headers);
        let mut record = BaseRecord::to(&o.topic)
            .key(o.key.as_bytes())
            .payload(&o.payload)
            .headers(headers);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                    if Instant::now() < deadline =>
                {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(BusError::Aborted(format!("produce failed: {e}"))),
            }
        }
    }
    Ok(())
}

/// Runs one transaction: produce, optionally send offsets, commit; aborts on an abortable error.
fn transact(
    producer: &Arc<ThreadedProducer<DefaultProducerContext>>,
    outputs: &[OutRecord],
    offsets: Option<(&TopicPartitionList, &BaseConsumer<GenerationContext>)>,
    timeout: Duration,
) -> Result<(), BusError> {
    retrying("begin_transaction", None, || producer.begin_transaction())?;
    let result = (|| {
        produce_all(producer, outputs, Instant::now() + timeout)?;
        if let Some((tpl, consumer)) = offsets {
            let meta = consumer.group_metadata().ok_or_else(|| {
                BusError::Aborted("consumer has no group metadata (not in a group yet)".into())
            })?;
            // Nothing is committed until the commit below, so offsets that keep timing out are
            // given up after a few tries and the transaction aborted and redone: after a broker
            // restart librdkafka's transaction manager was seen to time out every retry of this
            // call for good (a postprocess stuck for minutes in a chaos run).
            send_offsets_bounded(producer, tpl.clone(), meta, timeout)?;
        }
        // A commit that timed out may still land (the broker may have it): it must be retried
        // until it answers, never aborted and re-sent, or the batch would be published twice.
        retrying("commit_transaction", None, || {
            producer.commit_transaction(timeout)
        })
    })();
    match result {
        Ok(()) => Ok(()),
        Err(BusError::Fatal(m)) => Err(BusError::Fatal(m)),
        Err(e) => {
            // Abortable: abort, and the caller re-delivers from the committed offsets. An abort
            // that fails for good, or keeps timing out, is fatal: the stage starts over with new
            // clients.
            retrying("abort_transaction", Some(3), || {
                producer.abort_transaction(timeout)
            })
            .map_err(|a| BusError::Fatal(format!("{e}; abort also failed: {a}")))?;
            Err(BusError::Aborted(e.to_string()))
        }
    }
}

/// `send_offsets_to_transaction` (tried twice), given up as fatal when it has not returned well
/// after its timeouts. librdkafka (up to 2.14 at least, issues 5456 and 5511) ignores this
/// call's timeout when the consumer group's coordinator is gone: it waits for a broker state
/// change that may not come for many minutes, and meanwhile the stage neither commits nor polls.
/// Seen in the cluster chaos runs (gdb: the audit's commit parked in rd_kafka_txn_op_req0 with
/// no deadline, ten minutes after the coordinator's node was killed). Fatal makes the stage start
/// over with new clients: the new producer's init_transactions fences the stuck one, the open
/// transaction is aborted, and the batch comes again from the committed offsets. The stuck call
/// keeps its thread and client until librdkafka lets go of it.
fn send_offsets_bounded(
    producer: &Arc<ThreadedProducer<DefaultProducerContext>>,
    tpl: TopicPartitionList,
    meta: rdkafka::consumer::ConsumerGroupMetadata,
    timeout: Duration,
) -> Result<(), BusError> {
    const ATTEMPTS: u32 = 2;
    let (tx, rx) = std::sync::mpsc::channel();
    let p = producer.clone();
    std::thread::Builder::new()
        .name("send-offsets".into())
        .spawn(move || {
            let r = retrying("send_offsets_to_transaction", Some(ATTEMPTS), || {
                p.send_offsets_to_transaction(&tpl, &meta, timeout)
            });
            let _ = tx.send(r);
        })
        .map_err(|e| BusError::Fatal(format!("cannot start a thread: {e}")))?;
    // Each attempt may take its timeout, plus the backoff between them, plus slack.
    let patience = timeout * ATTEMPTS + Duration::from_secs(10);
    match rx.recv_timeout(patience) {
        Ok(r) => r,
        Err(_) => Err(BusError::Fatal(format!(
            "send_offsets_to_transaction did not return in {} s (librdkafka loses its group \
             coordinator after a broker failure and ignores the timeout): starting over with \
             new clients",
            patience.as_secs()
        ))),
    }
}

/// Repeats a transactional call while librdkafka says it may be retried (the broker is away or
/// the call timed out), at most `attempts` times when given; librdkafka keeps the transaction's
/// state meanwhile, so the retry resumes it. Abortable and fatal errors come back at once.
fn retrying<T>(
    what: &str,
    attempts: Option<u32>,
    mut call: impl FnMut() -> rdkafka::error::KafkaResult<T>,
) -> Result<T, BusError> {
    let what = format!("{what} did not answer");
    let retry = crate::RetryPolicy::default().retry(&what);
    let retry = match attempts {
        Some(n) => retry.attempts(n),
        None => retry,
    };
    retry
        .run_blocking(&mut call, |e| {
            matches!(e, KafkaError::Transaction(t)
                if t.is_retriable() && !t.txn_requires_abort() && !t.is_fatal())
        })
        .map_err(classify)
}

/// An owned copy of a consumed Kafka message.
fn to_record<M: rdkafka::message::Message>(m: &M) -> Record {
    let headers = m
        .headers()
        .map(|h| {
            h.iter()
                .filter_map(|h| {
                    h.value
                        .map(|v| (h.key.to_string(), String::from_utf8_lossy(v).into_owned()))
                })
                .collect()
        })
        .unwrap_or_default();
    Record {
        topic: m.topic().to_string(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        payload: m.payload().unwrap_or_default().to_vec(),
        headers,
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BusError> + Send + 'static,
) -> Result<T, BusError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BusError::Fatal(format!("kafka worker thread panicked: {e}")))?
}

#[async_trait]
impl Bus for KafkaBus {
    async fn consumer(
        &self,
        group: &str,
        topics: &[String],
        instance: &str,
    ) -> Result<Box<dyn StageIo>, BusError> {
        let mut c = self.base();
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set(
                "max.poll.interval.ms",
                self.cfg.max_poll_interval_ms.to_string(),
            )
            .set(
                "session.timeout.ms",
                self.cfg.session_timeout_ms.to_string(),
            )
            .set(
                "heartbeat.interval.ms",
                (self.cfg.session_timeout_ms / 3).max(100).to_string(),
            )
            .set("statistics.interval.ms", "5000");
        if self.cfg.static_membership {
            c.set("group.instance.id", instance);
        }
        let consumer: BaseConsumer<GenerationContext> = c
            .create_with_context(GenerationContext {
                lag: std::sync::atomic::AtomicI64::new(-1),
                ..Default::default()
            })
            .map_err(|e| BusError::Fatal(format!("cannot create consumer: {e}")))?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&names).map_err(classify)?;
        let producer = self.transactional_producer(instance)?;
        let timeout = self.timeout();
        let producer = Arc::new(producer);
        let p = producer.clone();
        blocking(move || {
            p.init_transactions(timeout).map_err(|e| {
                BusError::Unavailable(format!("init_transactions (is the broker up?): {e}"))
            })
        })
        .await?;
        Ok(Box::new(KafkaStageIo {
            consumer: Arc::new(consumer),
            producer,
            pending: HashMap::new(),
            generation: None,
            inflight: None,
            timeout,
        }))
    }

    async fn producer(&self, instance: &str) -> Result<Box<dyn Producer>, BusError> {
        let producer = Arc::new(self.transactional_producer(instance)?);
        let timeout = self.timeout();
        let p = producer.clone();
        blocking(move || {
            p.init_transactions(timeout).map_err(|e| {
                BusError::Unavailable(format!("init_transactions (is the broker up?): {e}"))
            })
        })
        .await?;
        Ok(Box::new(KafkaProducer { producer, timeout }))
    }

    async fn create_topics(&self, topics: &[String], partitions: i32) -> Result<(), BusError> {
        let admin: AdminClient<DefaultClientContext> = self
            .base()
            .create()
            .map_err(|e| BusError::Fatal(format!("admin client: {e}")))?;
        let new: Vec<NewTopic> = topics
            .iter()
            .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(self.cfg.replication)))
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(self.timeout()));
        let results = tokio::time::timeout(self.timeout(), admin.create_topics(&new, &opts))
            .await
            .map_err(|_| BusError::Unavailable("create_topics timed out".into()))?
            .map_err(classify)?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => {
                    return Err(BusError::Unavailable(format!(
                        "cannot create topic {t}: {code}"
                    )))
                }
            }
        }
        Ok(())
    }

    async fn read_committed(&self, topics: &[String]) -> Result<Vec<Record>, BusError> {
        // No group: the partitions are assigned by hand and nothing is committed.
        let mut c = self.base();
        c.set("group.id", "fracture-read-committed")
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "false");
        let consumer: BaseConsumer = c
            .create()
            .map_err(|e| BusError::Fatal(format!("cannot create consumer: {e}")))?;
        let topics = topics.to_vec();
        let timeout = self.timeout();
        blocking(move || {
            let mut ends: HashMap<(String, i32), i64> = HashMap::new();
            let mut tpl = TopicPartitionList::new();
            for t in &topics {
                let md = consumer
                    .fetch_metadata(Some(t), timeout)
                    .map_err(classify)?;
                for mt in md.topics() {
                    if let Some(e) = mt.error() {
                        return Err(BusError::UnknownTopic(format!("{t}: {e:?}")));
                    }
                    for p in mt.partitions() {
                        let (low, high) = consumer
                            .fetch_watermarks(t, p.id(), timeout)
                            .map_err(classify)?;
                        if high > low {
                            ends.insert((t.clone(), p.id()), high);
                            tpl.add_partition_offset(t, p.id(), Offset::Offset(low))
                                .map_err(classify)?;
                        }
                    }
                }
            }
            let mut out = Vec::new();
            if ends.is_empty() {
                return Ok(out);
            }
            consumer.assign(&tpl).map_err(classify)?;
            // Read until every partition's position passes the end it had when we started. The
            // position moves over aborted records and transaction markers too, but never past an
            // open transaction: wait for it, up to a bound.
            let deadline = Instant::now() + timeout.max(Duration::from_secs(60));
            loop {
                let positions = consumer.position().map_err(classify)?;
                let pending = ends.iter().any(|((t, p), &end)| {
                    match positions.find_partition(t, *p).map(|e| e.offset()) {
                        Some(Offset::Offset(o)) => o < end,
                        _ => true,
                    }
                });
                if !pending {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(BusError::Unavailable(
                        "reading the committed records did not reach the end of the topics: \
                         an open transaction may be holding them; try again"
                            .into(),
                    ));
                }
                match consumer.poll(Duration::from_millis(200)) {
                    None => {}
                    Some(Err(e)) => tracing::warn!(error = %e, "kafka poll"),
                    Some(Ok(m))
                        if ends
                            .get(&(m.topic().to_string(), m.partition()))
                            .is_some_and(|&end| m.offset() < end) =>
                    {
                        out.push(to_record(&m));
                    }
                    Some(Ok(_)) => {}
                }
            }
            Ok(out)
        })
        .await
    }
}

/// What one blocking poll returns: the records and the rebalance generation after them.
type Polled = Result<(Vec<Record>, u64), BusError>;

struct KafkaStageIo {
    consumer: Arc<BaseConsumer<GenerationContext>>,
    producer: Arc<ThreadedProducer<DefaultProducerContext>>,
    /// (topic, partition) -> next offset, for everything polled since the last commit.
    pending: HashMap<(String, i32), i64>,
    /// The rebalance generation when the open batch started.
    generation: Option<u64>,
    /// The blocking poll under way; still here at the next poll means that one was cancelled.
    inflight: Option<tokio::task::JoinHandle<Polled>>,
    timeout: Duration,
}

fn seek_to_committed(
    consumer: &BaseConsumer<GenerationContext>,
    timeout: Duration,
) -> Result<(), BusError> {
    let committed = consumer.committed(timeout).map_err(classify)?;
    let mut tpl = TopicPartitionList::new();
    for e in committed.elements() {
        // No commit yet: start from the beginning, as auto.offset.reset=earliest would.
        let offset = match e.offset() {
            Offset::Offset(o) => Offset::Offset(o),
            _ => Offset::Beginning,
        };
        tpl.add_partition_offset(e.topic(), e.partition(), offset)
            .map_err(classify)?;
    }
    if tpl.count() > 0 {
        consumer.seek_partitions(tpl, timeout).map_err(classify)?;
    }
    Ok(())
}

#[async_trait]
impl StageIo for KafkaStageIo {
    fn lag(&self) -> Option<i64> {
        let lag = self.consumer.context().lag.load(Ordering::Relaxed);
        (lag >= 0).then_some(lag)
    }

    async fn poll_batch(
        &mut self,
        max: usize,
        linger: Duration,
        idle: Duration,
    ) -> Result<Vec<Record>, BusError> {
        if let Some(orphan) = self.inflight.take() {
            // The previous poll was cancelled while librdkafka was handing it records we never
            // returned: let it finish, then go back to the committed offsets so they come again.
            let _ = orphan.await;
            self.rewind().await?;
        }
        let consumer = self.consumer.clone();
        let start_gen = *self
            .generation
            .get_or_insert(consumer.context().generation.load(Ordering::SeqCst));
        let handle: tokio::task::JoinHandle<Polled> = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let mut generation = start_gen;
            let first_deadline = Instant::now() + idle;
            let mut deadline = first_deadline;
            while out.len() < max {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                let polled = consumer.poll(deadline - now);
                let g = consumer.context().generation.load(Ordering::SeqCst);
                if g != generation {
                    // A rebalance ran inside this poll: what we gathered before it belongs to the
                    // old assignment, whose positions went back to the committed offsets.
                    out.clear();
                    generation = g;
                }
                match polled {
                    None => {}
                    // The consumer is dead (e.g. fenced): its records must not be committed and
                    // it will deliver no more; the stage makes a new one.
                    Some(Err(e @ KafkaError::MessageConsumptionFatal(_))) => {
                        return Err(BusError::Fatal(format!("kafka consumer: {e}")));
                    }
                    Some(Err(e)) => tracing::warn!(error = %e, "kafka poll"),
                    Some(Ok(m)) => {
                        out.push(to_record(&m));
                        if deadline == first_deadline {
                            deadline = Instant::now() + linger;
                        }
                    }
                }
            }
            Ok((out, generation))
        });
        let handle = self.inflight.insert(handle);
        let polled = handle.await;
        self.inflight = None;
        let (batch, generation) =
            polled.map_err(|e| BusError::Fatal(format!("kafka worker thread panicked: {e}")))??;
        if generation != start_gen {
            if !self.pending.is_empty() {
                // The caller still holds records of the old assignment from an earlier poll:
                // they must not be committed; everything comes again from the committed offsets.
                self.pending.clear();
                self.generation = None;
                return Err(BusError::Aborted("consumer group rebalanced".into()));
            }
            self.generation = Some(generation);
        }
        for r in &batch {
            self.pending
                .insert((r.topic.clone(), r.partition), r.offset + 1);
        }
        Ok(batch)
    }

    async fn commit(&mut self, outputs: Vec<OutRecord>) -> Result<(), BusError> {
        let generation = self.consumer.context().generation.load(Ordering::SeqCst);
        if self.generation.is_some_and(|g| g != generation) {
            self.pending.clear();
            self.generation = None;
            return Err(BusError::Aborted(
                "consumer group rebalanced before commit".into(),
            ));
        }
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in &self.pending {
            tpl.add_partition_offset(t, *p, Offset::Offset(*o))
                .map_err(classify)?;
        }
        let (consumer, producer, timeout) =
            (self.consumer.clone(), self.producer.clone(), self.timeout);
        let result = blocking(move || {
            let offsets = if tpl.count() > 0 {
                Some((&tpl, &*consumer))
            } else {
                None
            };
            let r = transact(&producer, &outputs, offsets, timeout);
            if let Err(BusError::Aborted(_)) = &r {
                seek_to_committed(&consumer, timeout)?;
            }
            r
        })
        .await;
        self.pending.clear();
        self.generation = None;
        result
    }

    async fn rewind(&mut self) -> Result<(), BusError> {
        self.pending.clear();
        self.generation = None;
        let (consumer, timeout) = (self.consumer.clone(), self.timeout);
        blocking(move || seek_to_committed(&consumer, timeout)).await
    }

    async fn close(self: Box<Self>) -> Result<(), BusError> {
        let this = *self;
        blocking(move || {
            this.consumer.unsubscribe();
            this.producer.flush(this.timeout).map_err(classify)?;
            drop(this);
            Ok(())
        })
        .await
    }
}

struct KafkaProducer {
    producer: Arc<ThreadedProducer<DefaultProducerContext>>,
    timeout: Duration,
}

#[async_trait]
impl Producer for KafkaProducer {
    async fn send(&mut self, outputs: Vec<OutRecord>) -> Result<(), BusError> {
        let (producer, timeout) = (self.producer.clone(), self.timeout);
        blocking(move || transact(&producer, &outputs, None, timeout)).await
    }

    async fn close(self: Box<Self>) -> Result<(), BusError> {
        let this = *self;
        blocking(move || this.producer.flush(this.timeout).map_err(classify)).await
    }
}
