//! The loop every consuming stage runs: poll a batch, handle it, retry or dead-letter what
//! failed, and commit outputs and offsets together.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use opentelemetry::trace::{Span as _, Status};
use opentelemetry::KeyValue;
use tokio::sync::watch;

use crate::breaker::{Admission, Breaker, Unit};
use crate::bus::{BusError, Lane, LaneConfig, LanedIo, OutRecord, Record, StageIo, Topics};
use crate::error::{Decision, RetryPolicy, StageError};
use crate::messages::{encode, schema, DeadLetter, Message, Origin};
use crate::metrics::StageMetrics;
use crate::telemetry;

/// What a handler wants published for one input record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub topic: String,
    pub key: String,
    pub payload: Vec<u8>,
}

impl Output {
    pub fn message<M: Message>(topics: &Topics, key: &str, m: &M) -> Self {
        Self {
            topic: topics.of::<M>(),
            key: key.to_string(),
            payload: encode(m),
        }
    }
}

/// A stage's work on a batch: one result per input record, in the same order.
#[async_trait]
pub trait Handler: Send + Sync {
    async fn handle(&self, batch: &[Record]) -> Vec<Result<Vec<Output>, StageError>>;
}

/// A stage that handles records one at a time (each gets its own result).
#[async_trait]
pub trait RecordHandler: Send + Sync {
    async fn one(&self, record: &Record) -> Result<Vec<Output>, StageError>;
}

#[async_trait]
impl<T: RecordHandler> Handler for T {
    async fn handle(&self, batch: &[Record]) -> Vec<Result<Vec<Output>, StageError>> {
        let mut out = Vec::with_capacity(batch.len());
        for r in batch {
            out.push(self.one(r).await);
        }
        out
    }
}

/// The largest message a stage accepts. Messages carry metadata (pixels, tensors and maps travel
/// through the claim-check store), so anything bigger is a producer's bug or an attack, and it is
/// dead-lettered before any handler parses it.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// Batching of a stage's consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Most records handled as one batch (one transaction).
    pub max: usize,
    /// After the first record arrives, how long to wait for more (ms).
    pub linger_ms: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max: 16,
            linger_ms: 5,
        }
    }
}

/// A stop signal shared by every task of a process (SIGTERM, or the end of a scan).
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    pub fn new() -> (watch::Sender<bool>, Self) {
        let (tx, rx) = watch::channel(false);
        (tx, Self(rx))
    }
    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|v| *v).await;
    }
}

/// How long closing the bus clients (leaving the group, flushing) may take.
const CLOSE_LIMIT: Duration = Duration::from_secs(10);

/// How long a commit in flight may still take once the process is told to stop.
const COMMIT_GRACE: Duration = Duration::from_secs(5);

/// Resolves `grace` after `shutdown` is set.
async fn stopped_then(shutdown: &Shutdown, grace: Duration) {
    let mut s = shutdown.clone();
    s.wait().await;
    tokio::time::sleep(grace).await;
}

pub struct StageRunner {
    pub stage: &'static str,
    pub topics: Topics,
    pub metrics: StageMetrics,
    pub retry: RetryPolicy,
    pub batch: BatchConfig,
    /// Where the crash-loop breaker keeps its ledgers (`breaker`); `None` runs the loop without
    /// one, for tests of the loop itself.
    pub crash_ledger: Option<crate::store::BlobStore>,
}

#[derive(Debug, thiserror::Error)]
#[error("{stage}: {source}")]
pub struct StageFailed {
    pub stage: &'static str,
    #[source]
    pub source: BusError,
}

/// Pulls `/id/input` and `/region` out of a JSON payload, for dead letters and metrics.
fn peek(payload: &[u8]) -> (Option<String>, Option<String>) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return (None, None);
    };
    let s = |p: &str| v.pointer(p).and_then(|x| x.as_str()).map(str::to_string);
    (s("/id/input").or_else(|| s("/input")), s("/region"))
}

impl StageRunner {
    /// Runs until `shutdown` is set (finishing or abandoning the open batch uncommitted) or the
    /// bus fails fatally.
    pub async fn run(
        &self,
        io: &mut dyn StageIo,
        handler: &dyn Handler,
        mut shutdown: Shutdown,
    ) -> Result<(), StageFailed> {
        let fail = |source| StageFailed {
            stage: self.stage,
            source,
        };
        let linger = Duration::from_millis(self.batch.linger_ms);
        let idle = Duration::from_millis(200);
        let mut breaker = self
            .crash_ledger
            .clone()
            .map(|store| Breaker::new(store, self.stage, self.retry.crash_limit));
        while !shutdown.is_set() {
            let batch = match io.poll_batch(self.batch.max.max(1), linger, idle).await {
                Ok(b) => b,
                Err(BusError::Fatal(m)) => return Err(fail(BusError::Fatal(m))),
                Err(e) => {
                    tracing::warn!(stage = self.stage, error = %e, "poll");
                    continue;
                }
            };
            if let Some(lag) = io.lag() {
                self.metrics
                    .consumer_lag
                    .with_label_values(&[self.stage])
                    .set(lag);
            }
            if batch.is_empty() {
                continue;
            }
            let started = Instant::now();
            let started_wall = std::time::SystemTime::now();
            // The batch as the crash-loop breaker keys it, once for admission and settling.
            let units: Vec<Unit> = batch.iter().map(Unit::of).collect();
            let Some(results) = self
                .handle_guarded(&batch, &units, handler, &mut shutdown, breaker.as_mut())
                .await
            else {
                // Shutting down mid-retry: leave the batch uncommitted for the next owner.
                settle(&mut breaker, &units, false).await;
                let _ = io.rewind().await;
                break;
            };
            let mut outputs = Vec::new();
            let mut dead = 0usize;
            let mut spans = Vec::with_capacity(batch.len());
            for (record, result) in batch.iter().zip(results) {
                let upstream = record
                    .header(telemetry::TRACEPARENT)
                    .and_then(telemetry::from_traceparent);
                let lane = self.topics.lane_of(&record.topic);
                let span = telemetry::start_span(
                    self.stage,
                    upstream,
                    started_wall,
                    vec![
                        KeyValue::new("fracture.stage", self.stage),
                        KeyValue::new("fracture.batch_size", batch.len() as i64),
                        KeyValue::new("fracture.lane", lane.as_str()),
                    ],
                );
                let trace_id = span.span_context().trace_id();
                let headers = vec![(
                    telemetry::TRACEPARENT.to_string(),
                    telemetry::to_traceparent(span.span_context()),
                )];
                let dead_letter = result.as_ref().err().map(|e| e.kind);
                spans.push((span, dead_letter));
                let (input, region) = peek(&record.payload);
                match result {
                    Ok(outs) => {
                        tracing::debug!(stage = self.stage, trace_id = %trace_id, outputs = outs.len(), "processed");
                        self.metrics
                            .processed
                            .with_label_values(&[
                                self.stage,
                                region.as_deref().unwrap_or("unknown"),
                            ])
                            .inc();
                        outputs.extend(outs.into_iter().map(|o| OutRecord {
                            topic: self.topics.in_lane(&o.topic, lane),
                            key: o.key,
                            payload: o.payload,
                            headers: headers.clone(),
                        }));
                    }
                    Err(e) => {
                        dead += 1;
                        tracing::warn!(stage = self.stage, trace_id = %trace_id, kind = ?e.kind, reason = %e.message, "dead letter");
                        self.metrics
                            .dead_lettered
                            .with_label_values(&[
                                self.stage,
                                &format!("{:?}", e.kind).to_lowercase(),
                            ])
                            .inc();
                        let letter = DeadLetter {
                            schema: schema::DEAD_LETTER.into(),
                            stage: self.stage.into(),
                            kind: e.kind,
                            reason: e.message,
                            input,
                            origin: Some(Origin {
                                topic: record.topic.clone(),
                                partition: record.partition,
                                offset: record.offset,
                            }),
                        };
                        outputs.push(OutRecord {
                            topic: self.topics.of::<DeadLetter>(),
                            key: record.key.clone().unwrap_or_default(),
                            payload: encode(&letter),
                            headers: headers.clone(),
                        });
                    }
                }
            }
            // A commit the broker does not answer must not hold a stopping process past its
            // grace period: once told to stop, it gets a few seconds, then is left in flight
            // (the broker aborts the transaction; the batch comes again from the committed
            // offsets to whoever owns the partitions next).
            let committed = tokio::select! {
                r = io.commit(outputs) => r,
                _ = stopped_then(&shutdown, COMMIT_GRACE) => {
                    tracing::warn!(stage = self.stage, grace_ms = COMMIT_GRACE.as_millis() as u64, "stopping with a commit the broker has not answered; the batch will be processed again");
                    settle(&mut breaker, &units, false).await;
                    break;
                }
            };
            settle(&mut breaker, &units, committed.is_ok()).await;
            match committed {
                Ok(()) => {
                    let end = std::time::SystemTime::now();
                    for (mut span, dead_letter) in spans {
                        if let Some(kind) = dead_letter {
                            span.set_status(Status::error(format!(
                                "dead-lettered ({})",
                                format!("{kind:?}").to_lowercase()
                            )));
                        }
                        span.end_with_timestamp(end);
                    }
                    self.metrics
                        .batch_seconds
                        .with_label_values(&[self.stage])
                        .observe(started.elapsed().as_secs_f64());
                    self.metrics
                        .batch_size
                        .with_label_values(&[self.stage])
                        .observe(batch.len() as f64);
                    tracing::debug!(
                        stage = self.stage,
                        records = batch.len(),
                        dead_letters = dead,
                        "committed"
                    );
                }
                Err(BusError::Fatal(m)) => return Err(fail(BusError::Fatal(m))),
                Err(e) => {
                    // Nothing was published; the batch comes again from the committed offsets
                    // (under new spans: these end as errors, their headers never left).
                    for mut span in spans.into_iter().map(|(span, _)| span) {
                        span.set_status(Status::error("commit did not land"));
                        span.end();
                    }
                    tracing::warn!(stage = self.stage, error = %e, "commit did not land, re-processing");
                    if let Err(BusError::Fatal(m)) = io.rewind().await {
                        return Err(fail(BusError::Fatal(m)));
                    }
                }
            }
        }
        Ok(())
    }

    /// Handles the batch under the crash-loop breaker: records in flight during too many crashes
    /// are dead-lettered unopened, and a batch holding one that was in flight during any is
    /// handled one record at a time, so a crash is charged to the culprit alone.
    async fn handle_guarded(
        &self,
        batch: &[Record],
        units: &[Unit],
        handler: &dyn Handler,
        shutdown: &mut Shutdown,
        breaker: Option<&mut Breaker>,
    ) -> Option<Vec<Result<Vec<Output>, StageError>>> {
        let Some(breaker) = breaker else {
            return self.handle_with_retries(batch, handler, shutdown).await;
        };
        breaker.forget();
        let admitted = breaker.admit(units).await;
        let mut results: Vec<Option<Result<Vec<Output>, StageError>>> = admitted
            .iter()
            .map(|a| match *a {
                Admission::Tripped(crashes) => Some(Err(breaker.tripped(crashes))),
                _ => None,
            })
            .collect();
        let open: Vec<usize> = (0..batch.len()).filter(|&i| results[i].is_none()).collect();
        let groups = if admitted.iter().any(|a| matches!(a, Admission::Suspect(_))) {
            open.into_iter().map(|i| vec![i]).collect()
        } else {
            vec![open]
        };
        for group in groups.into_iter().filter(|g| !g.is_empty()) {
            let records: Vec<Record> = group.iter().map(|&i| batch[i].clone()).collect();
            breaker
                .in_flight(&group.iter().map(|&i| &units[i]).collect::<Vec<_>>())
                .await;
            let got = self
                .handle_with_retries(&records, handler, shutdown)
                .await?;
            for (i, r) in group.into_iter().zip(got) {
                results[i] = Some(r);
            }
        }
        Some(
            results
                .into_iter()
                .map(|r| r.expect("every record has a result"))
                .collect(),
        )
    }

    /// Handles the batch, retrying the records whose errors call for it. `None` when shutdown
    /// came while waiting to retry.
    async fn handle_with_retries(
        &self,
        batch: &[Record],
        handler: &dyn Handler,
        shutdown: &mut Shutdown,
    ) -> Option<Vec<Result<Vec<Output>, StageError>>> {
        let mut results: Vec<Option<Result<Vec<Output>, StageError>>> = vec![None; batch.len()];
        let mut attempts = vec![0u32; batch.len()];
        let mut todo: Vec<usize> = Vec::with_capacity(batch.len());
        for (i, r) in batch.iter().enumerate() {
            if r.payload.len() > MAX_MESSAGE_BYTES {
                results[i] = Some(Err(StageError::data(format!(
                    "message of {} bytes on {} is over the {} byte limit: messages carry \
                     metadata only, pixels, tensors and maps go through the claim-check store; \
                     fix the producer",
                    r.payload.len(),
                    r.topic,
                    MAX_MESSAGE_BYTES
                ))));
            } else {
                todo.push(i);
            }
        }
        if todo.is_empty() {
            return Some(results.into_iter().map(|r| r.expect("set above")).collect());
        }
        loop {
            let sub: Vec<Record> = todo.iter().map(|&i| batch[i].clone()).collect();
            let mut got = handler.handle(&sub).await;
            if got.len() != sub.len() {
                // A handler bug; never lose records over it.
                got = sub
                    .iter()
                    .map(|_| {
                        Err(StageError::internal(format!(
                            "{} returned a wrong number of results",
                            self.stage
                        )))
                    })
                    .collect();
            }
            let mut again = Vec::new();
            let mut wait = Duration::ZERO;
            for (&i, r) in todo.iter().zip(got) {
                match r {
                    Ok(o) => results[i] = Some(Ok(o)),
                    Err(e) => {
                        attempts[i] += 1;
                        match self.retry.decide(e.kind, attempts[i]) {
                            Decision::DeadLetter => results[i] = Some(Err(e)),
                            Decision::Retry(d) => {
                                tracing::warn!(stage = self.stage, attempt = attempts[i], kind = ?e.kind, error = %e.message, "retrying");
                                self.metrics
                                    .retries
                                    .with_label_values(&[
                                        self.stage,
                                        &format!("{:?}", e.kind).to_lowercase(),
                                    ])
                                    .inc();
                                wait = wait.max(d);
                                again.push(i);
                            }
                        }
                    }
                }
            }
            if again.is_empty() {
                return Some(
                    results
                        .into_iter()
                        .map(|r| r.expect("every record has a result"))
                        .collect(),
                );
            }
            todo = again;
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait() => return None,
            }
        }
    }
}

async fn settle(breaker: &mut Option<Breaker>, units: &[Unit], committed: bool) {
    if let Some(b) = breaker {
        b.settle(units, committed).await;
    }
}

/// What a stage process gets from its host (`fracture serve <stage>` or `fracture scan`).
#[derive(Clone)]
pub struct StageEnv {
    pub bus: std::sync::Arc<dyn crate::bus::Bus>,
    pub store: crate::store::BlobStore,
    pub topics: Topics,
    pub metrics: StageMetrics,
    pub health: crate::metrics::Health,
    pub shutdown: Shutdown,
    /// This replica's stable name (its transactional id suffix), e.g. the pod name.
    pub instance: String,
    pub retry: RetryPolicy,
    /// How a consuming stage shares itself between live work and back-scans.
    pub lanes: LaneConfig,
}

impl StageEnv {
    /// Joins the stage's consumer group on `input` and runs `handler` until shutdown.
    pub async fn consume(
        &self,
        stage: &'static str,
        input: String,
        batch: BatchConfig,
        handler: &dyn Handler,
    ) -> Result<(), StageFailed> {
        self.consume_many(stage, vec![input], batch, handler).await
    }

    /// The stage's consumer on `inputs`: on both lanes of the laned ones (each lane its own
    /// group, `<group>` and `<group>.backscan`), preferring live work as `lanes` says.
    async fn open(
        &self,
        group: &str,
        inputs: &[String],
        instance: &str,
    ) -> Result<Box<dyn StageIo>, BusError> {
        let backscan: Vec<String> = inputs
            .iter()
            .filter(|t| self.topics.lane_of(t) == Lane::Live)
            .map(|t| self.topics.in_lane(t, Lane::Backscan))
            .filter(|t| !inputs.contains(t))
            .collect();
        let live = self.bus.consumer(group, inputs, instance).await?;
        if backscan.is_empty() || !self.lanes.enabled {
            return Ok(live);
        }
        let lane = Lane::Backscan.as_str();
        let other = self
            .bus
            .consumer(
                &format!("{group}.{lane}"),
                &backscan,
                &format!("{instance}.{lane}"),
            )
            .await?;
        Ok(Box::new(LanedIo::new(live, other, self.lanes)))
    }

    /// Like [`StageEnv::consume`], on several input topics at once (one group, one transaction).
    pub async fn consume_many(
        &self,
        stage: &'static str,
        inputs: Vec<String>,
        batch: BatchConfig,
        handler: &dyn Handler,
    ) -> Result<(), StageFailed> {
        self.consume_in(stage, stage, inputs, batch, handler).await
    }

    /// Like [`StageEnv::consume_many`], in consumer group `<prefix>.<group>` (and transactional
    /// ids under it) instead of the stage's own: for a stage several parties each run whole,
    /// such as one export per site.
    pub async fn consume_in(
        &self,
        stage: &'static str,
        group: &str,
        inputs: Vec<String>,
        batch: BatchConfig,
        handler: &dyn Handler,
    ) -> Result<(), StageFailed> {
        let group = format!("{}.{}", self.topics.prefix, group);
        let instance = format!("{group}.{}", self.instance);
        let input = inputs.join(",");
        let runner = StageRunner {
            stage,
            topics: self.topics.clone(),
            metrics: self.metrics.clone(),
            retry: self.retry,
            batch,
            crash_ledger: Some(self.store.clone()),
        };
        let mut restarts = 0;
        loop {
            let mut io = self
                .retry
                .retry("the bus is not reachable yet")
                .until(&self.shutdown)
                .run(
                    || self.open(&group, &inputs, &instance),
                    |e| matches!(e, BusError::Unavailable(_)),
                )
                .await
                .map_err(|e| StageFailed { stage, source: e })?;
            self.health.set_ready(true);
            self.metrics.ready_gauge.with_label_values(&[stage]).set(1);
            tracing::info!(stage, topic = %input, "consuming");
            let started = Instant::now();
            let result = runner
                .run(io.as_mut(), handler, self.shutdown.clone())
                .await;
            self.health.set_ready(false);
            self.metrics.ready_gauge.with_label_values(&[stage]).set(0);
            // Bounded: a client stuck on a broker that went away must not keep the process
            // from exiting (the group notices the member gone after its session timeout).
            match tokio::time::timeout(CLOSE_LIMIT, io.close()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(stage, error = %e, "leaving the group"),
                Err(_) => tracing::warn!(
                    stage,
                    limit_ms = CLOSE_LIMIT.as_millis() as u64,
                    "leaving the group did not finish in time; going on without"
                ),
            }
            match result {
                // A dead consumer or producer (fenced, or broken by a broker restart): its
                // uncommitted batch comes again from the committed offsets, so the stage starts
                // over with new clients instead of leaving the pod running and idle.
                Err(e) if !self.shutdown.is_set() => {
                    // A stage that ran a while before failing starts its backoff afresh.
                    restarts = if started.elapsed() > Duration::from_secs(60) {
                        1
                    } else {
                        restarts + 1
                    };
                    let wait = self.retry.backoff(restarts);
                    tracing::error!(stage, error = %e, retry_in_ms = wait.as_millis() as u64, "the bus failed; starting over with new clients");
                    if !crate::retry::sleep_unless_stopped(wait, Some(&self.shutdown)).await {
                        tracing::info!(stage, "stopped");
                        return Ok(());
                    }
                }
                result => {
                    tracing::info!(stage, "stopped");
                    return result;
                }
            }
        }
    }
}

/// Little-endian f32 bytes, the claim-check format of tensors and maps.
pub fn f32_to_bytes(v: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

pub fn bytes_to_f32(b: &[u8]) -> Result<Vec<f32>, StageError> {
    if !b.len().is_multiple_of(4) {
        return Err(StageError::data(format!(
            "tensor blob of {} bytes is not a whole number of f32 values",
            b.len()
        )));
    }
    Ok(b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One record to hand out, then nothing; a commit the broker never answers.
    struct Unanswered {
        record: Option<Record>,
        committing: Option<tokio::sync::oneshot::Sender<()>>,
    }

    #[async_trait]
    impl StageIo for Unanswered {
        async fn poll_batch(
            &mut self,
            _max: usize,
            _linger: Duration,
            idle: Duration,
        ) -> Result<Vec<Record>, BusError> {
            match self.record.take() {
                Some(r) => Ok(vec![r]),
                None => {
                    tokio::time::sleep(idle).await;
                    Ok(Vec::new())
                }
            }
        }
        async fn commit(&mut self, _outputs: Vec<OutRecord>) -> Result<(), BusError> {
            if let Some(tx) = self.committing.take() {
                let _ = tx.send(());
            }
            std::future::pending().await
        }
        async fn rewind(&mut self) -> Result<(), BusError> {
            Ok(())
        }
        async fn close(self: Box<Self>) -> Result<(), BusError> {
            Ok(())
        }
    }

    struct Echo;

    #[async_trait]
    impl Handler for Echo {
        async fn handle(&self, batch: &[Record]) -> Vec<Result<Vec<Output>, StageError>> {
            batch.iter().map(|_| Ok(Vec::new())).collect()
        }
    }

    /// A stop during a commit librdkafka never returns from (it happens after a broker dies)
    /// ends the stage after the grace period instead of holding the process.
    #[tokio::test]
    async fn a_stop_does_not_wait_forever_for_an_unanswered_commit() {
        let (tx, committing) = tokio::sync::oneshot::channel();
        let mut io = Unanswered {
            record: Some(Record {
                topic: "t.in".into(),
                partition: 0,
                offset: 0,
                key: Some("k".into()),
                payload: b"{}".to_vec(),
                headers: Vec::new(),
            }),
            committing: Some(tx),
        };
        let runner = StageRunner {
            stage: "stuck",
            topics: Topics::new("t"),
            metrics: StageMetrics::new(),
            retry: RetryPolicy::default(),
            batch: BatchConfig {
                max: 1,
                linger_ms: 1,
            },
            crash_ledger: None,
        };
        let (stop, shutdown) = Shutdown::new();
        let run = runner.run(&mut io, &Echo, shutdown);
        let stopper = async {
            committing.await.unwrap();
            stop.send(true).unwrap();
            tokio::time::Instant::now()
        };
        // Without the grace period this never ends; the bound only catches that.
        let (result, stopped_at) = tokio::time::timeout(Duration::from_secs(60), async {
            tokio::join!(run, stopper)
        })
        .await
        .expect("the stage ended after the stop");
        assert!(result.is_ok());
        assert!(
            stopped_at.elapsed() >= COMMIT_GRACE,
            "the commit got its grace"
        );
    }
}
