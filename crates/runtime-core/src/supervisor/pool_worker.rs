use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ahash::AHashMap as HashMap;
use futures::FutureExt;
use runtime_contracts::{
    AttemptFailure, BoxFuture, Disposition, HandlerContext, HandlerError, Lease, Outcome, Task,
    TaskHandler, TaskQueue, TaskSource, Worker, WorkerContext, WorkerError,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{panic_message, PoolCounters, PoolSpec};
use crate::config::PoolConfig;
use crate::metrics::{KindMetrics, Metrics};
use crate::now_unix_ms;
use crate::trace::TraceService;

/// How long one `consume` call waits before the loop checks for shutdown again.
const CONSUME_WAIT: Duration = Duration::from_millis(250);

/// What a pool's workers share with the supervisor.
pub(crate) struct Shared {
    pub(crate) config: Arc<RwLock<PoolConfig>>,
    pub(crate) counters: Arc<PoolCounters>,
    pub(crate) trace: TraceService,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) desired: Arc<super::Roster>,
    pub(crate) stop_consuming: CancellationToken,
    pub(crate) abandon_in_flight: CancellationToken,
}

/// The worker loop of a pool: consume a lease, run the handler under a timeout with panics
/// caught, complete at the source after success, then settle the lease (ack, nack with
/// backoff, or dead letter).
pub struct PoolWorker {
    name: String,
    queue: Arc<dyn TaskQueue>,
    handlers: HashMap<String, Arc<dyn TaskHandler>>,
    sources: HashMap<String, Arc<dyn TaskSource>>,
    /// What the pool cannot work without.
    gate: super::gate::Gate,
    shared: Shared,
    /// Metric handles by task kind and by outcome, so that recording costs no label lookup.
    kind_metrics: RwLock<HashMap<Arc<str>, Arc<KindMetrics>>>,
    outcome_metrics: RwLock<HashMap<String, prometheus_client::metrics::counter::Counter>>,
}

impl std::fmt::Debug for PoolWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolWorker")
            .field("pool", &self.name)
            .field("kinds", &self.handlers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

enum Attempt {
    Done(Outcome),
    Failed {
        reason: String,
        after: Option<Duration>,
        /// `error` (the handler's), `timeout`, `panic` or `completion` (the source's).
        class: &'static str,
    },
    Permanent(String),
    Abandoned,
}

impl Attempt {
    fn of(result: Result<Outcome, HandlerError>) -> Self {
        match result {
            Ok(outcome) => Self::Done(outcome),
            Err(HandlerError::Permanent(reason)) => Self::Permanent(reason),
            Err(HandlerError::Retry { reason, after }) => Self::Failed {
                reason,
                after,
                class: "error",
            },
            Err(other) => Self::Failed {
                reason: other.to_string(),
                after: None,
                class: "error",
            },
        }
    }
}

/// What a `handle_batch` call gave.
enum BatchAttempt {
    /// One attempt per task.
    Done(Vec<Attempt>),
    /// The call panicked, timed out or answered the wrong number of results.
    Untrusted(String),
    /// The shutdown deadline passed.
    Abandoned,
}

impl PoolWorker {
    pub(crate) fn new(spec: PoolSpec, shared: Shared) -> Self {
        Self {
            name: spec.name,
            queue: spec.queue,
            handlers: spec.handlers.into_iter().collect(),
            sources: spec.sources.into_iter().collect(),
            gate: super::gate::Gate::new(spec.needs, Arc::clone(&shared.counters)),
            shared,
            kind_metrics: RwLock::default(),
            outcome_metrics: RwLock::default(),
        }
    }

    fn metrics_of(&self, kind: &Arc<str>) -> Arc<KindMetrics> {
        if let Some(m) = self
            .kind_metrics
            .read()
            .ok()
            .and_then(|m| m.get(kind).cloned())
        {
            return m;
        }
        let m = Arc::new(self.shared.metrics.for_kind(&self.name, kind));
        if let Ok(mut cache) = self.kind_metrics.write() {
            cache.insert(Arc::clone(kind), Arc::clone(&m));
        }
        m
    }

    fn count_outcome(&self, outcome: &str) {
        if let Some(c) = self
            .outcome_metrics
            .read()
            .ok()
            .and_then(|m| m.get(outcome).cloned())
        {
            c.inc();
            return;
        }
        let c = self.shared.metrics.for_outcome(&self.name, outcome);
        c.inc();
        if let Ok(mut cache) = self.outcome_metrics.write() {
            cache.insert(outcome.to_owned(), c);
        }
    }

    pub(crate) fn pool_name(&self) -> &str {
        &self.name
    }

    pub(crate) fn concurrency(&self) -> usize {
        self.config().workers
    }

    fn handler_timeout(&self) -> Duration {
        self.shared
            .config
            .read()
            .map(|c| c.handler_timeout())
            .unwrap_or_else(|e| e.into_inner().handler_timeout())
    }

    fn prefetch(&self) -> usize {
        self.shared
            .config
            .read()
            .map(|c| c.prefetch)
            .unwrap_or_else(|e| e.into_inner().prefetch)
    }

    async fn give_back_unstarted(&self, lease: Lease) {
        match self.sources.get(&*lease.task.source) {
            Some(source) => self.give_back(&lease, source).await,
            None => {
                if let Err(e) = self.queue.nack(&lease, Duration::ZERO, None).await {
                    tracing::warn!(task = %lease.task.id, error = %e, "could not return an unstarted task");
                }
            }
        }
    }

    fn config(&self) -> PoolConfig {
        self.shared
            .config
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    // The pool's own tokens are used rather than the context's signals: they are the same
    // tokens, without a boxed future per task on the hot path.
    async fn run_loop(&self, index: usize) -> Result<(), WorkerError> {
        let mut errors = 0u32;
        // Successes of the previous batch, acknowledged together in one round trip while the
        // next batch is read (their sources have already completed them, so a lost
        // acknowledgement only means a redelivery that finds the recorded outcome).
        let mut unacked: Vec<Lease> = Vec::new();
        loop {
            let retired = index >= self.shared.desired.desired.load(Ordering::SeqCst);
            if self.shared.stop_consuming.is_cancelled() || retired {
                self.acknowledge(&unacked).await;
                return Ok(());
            }
            // A dependency is down: no new work until it is back.
            if self.gate.is_shut() {
                self.acknowledge(&unacked).await;
                unacked.clear();
                tokio::select! {
                    _ = self.shared.stop_consuming.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(super::gate::RECHECK) => {}
                }
                self.gate.ask(None).await;
                continue;
            }
            // Not raced with the stop signal: `consume` returns within CONSUME_WAIT, and a
            // lease it took is processed like any other.
            let prefetch = self.prefetch();
            let (_, consumed) = tokio::join!(
                self.acknowledge(&unacked),
                self.queue.consume_batch(prefetch, CONSUME_WAIT)
            );
            unacked.clear();
            match consumed {
                Ok(leases) => {
                    if !leases.is_empty() {
                        errors = 0;
                    }
                    unacked = self.process_all(leases).await;
                }
                Err(e) => {
                    errors = errors.saturating_add(1);
                    let backoff = Duration::from_millis(100u64 << errors.min(6));
                    tracing::warn!(pool = %self.name, error = %e, ?backoff, "consume failed");
                    tokio::select! {
                        _ = self.shared.stop_consuming.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                }
            }
        }
    }

    /// Handles what one `consume_batch` gave; returns the successes, which await their
    /// acknowledgement. First deliveries of one kind from one source are handled as one
    /// batch (one `handle_batch`, one `complete_batch`); retries are handled alone, so a
    /// message that failed once cannot fail or delay a batch again.
    async fn process_all(&self, leases: Vec<Lease>) -> Vec<Lease> {
        let mut units: Vec<Vec<Lease>> = Vec::new();
        for lease in leases {
            let t = &lease.task;
            tracing::debug!(task = %t.id, correlation_id = %t.correlation_id, causation_id = cause(t), source = %t.source, kind = %t.kind, attempt = t.attempt + 1, pool = %self.name, "leased");
            let joins = lease.task.attempt == 0
                && self.sources.contains_key(&*lease.task.source)
                && self.handlers.contains_key(&*lease.task.kind);
            let group = units.iter_mut().find(|u| {
                joins
                    && u[0].task.attempt == 0
                    && u[0].task.source == lease.task.source
                    && u[0].task.kind == lease.task.kind
            });
            match group {
                Some(group) => group.push(lease),
                None => units.push(vec![lease]),
            }
        }
        let mut done = Vec::new();
        let mut units = units.into_iter();
        while let Some(unit) = units.next() {
            if self.shared.abandon_in_flight.is_cancelled() {
                for unstarted in std::iter::once(unit).chain(units.by_ref()).flatten() {
                    self.give_back_unstarted(unstarted).await;
                }
                break;
            }
            let n = unit.len() as u64;
            self.shared.counters.busy.fetch_add(n, Ordering::Relaxed);
            if unit.len() == 1 {
                for lease in unit {
                    let span =
                        self.shared
                            .trace
                            .task_span(&lease.task, &self.name, self.queue.system());
                    if self.settle(&lease).instrument(span).await {
                        done.push(lease);
                    }
                }
            } else {
                done.extend(self.settle_batch(unit).await);
            }
            self.shared.counters.busy.fetch_sub(n, Ordering::Relaxed);
        }
        done
    }

    /// The source and handler of a lease's task; a lease with neither is dead-lettered.
    async fn route(&self, lease: &Lease) -> Option<(Arc<dyn TaskSource>, Arc<dyn TaskHandler>)> {
        let task = &lease.task;
        let Some(source) = self.sources.get(&*task.source).cloned() else {
            let reason = format!(
                "no source {} is registered on pool {}",
                task.source, self.name
            );
            self.dead_letter(lease, None, None, reason, "unroutable")
                .await;
            return None;
        };
        let Some(handler) = self.handlers.get(&*task.kind).cloned() else {
            let reason = format!("no handler for kind {} on pool {}", task.kind, self.name);
            self.dead_letter(lease, Some(&source), None, reason, "unroutable")
                .await;
            return None;
        };
        Some((source, handler))
    }

    /// Runs the handler and settles the lease, except a success's acknowledgement; true
    /// for a success.
    async fn settle(&self, lease: &Lease) -> bool {
        let Some((source, handler)) = self.route(lease).await else {
            return false;
        };
        let task = &lease.task;
        let span = tracing::Span::current();
        let hctx = self.context(&source, [&**task], std::slice::from_ref(&span));
        let metrics = self.metrics_of(&task.kind);
        let started = std::time::Instant::now();
        let attempt = self.attempt(lease, &*handler, &hctx).await;
        metrics.duration.observe(started.elapsed());
        let attempt = match attempt {
            Attempt::Done(outcome) => {
                let completing = self.shared.trace.children([&span], "complete");
                let completed = source.complete(task).await;
                drop(completing);
                Self::completed(outcome, completed)
            }
            other => other,
        };
        self.conclude(lease, &source, &*handler, &hctx, &metrics, attempt)
            .await
    }

    /// A committed outcome whose completion at the source failed is a failed attempt: the
    /// retry finds the outcome recorded and completes it.
    fn completed(
        outcome: Outcome,
        completed: Result<(), runtime_contracts::SourceError>,
    ) -> Attempt {
        match completed {
            Ok(()) => Attempt::Done(outcome),
            Err(e) => Attempt::Failed {
                reason: format!(
                    "outcome {} recorded, but completion failed: {e}",
                    outcome.kind
                ),
                after: None,
                class: "completion",
            },
        }
    }

    /// The handler's context for tasks whose attempt spans are `spans`.
    fn context<'a>(
        &self,
        source: &Arc<dyn TaskSource>,
        tasks: impl IntoIterator<Item = &'a Task>,
        spans: &[tracing::Span],
    ) -> HandlerContext {
        let hctx = HandlerContext::new(Arc::clone(source));
        match self.shared.trace.stages(tasks, spans) {
            Some(stages) => hctx.with_stages(stages),
            None => hctx,
        }
    }

    /// Handles first deliveries of one kind from one source as one batch: one
    /// `handle_batch`, one `complete_batch` for the successes, each failure settled alone.
    /// A batch call that panics or times out is not trusted for any of its tasks: each is
    /// handled again alone. Returns the successes.
    async fn settle_batch(&self, unit: Vec<Lease>) -> Vec<Lease> {
        let first = &unit[0].task;
        let (Some(source), Some(handler)) = (
            self.sources.get(&*first.source).cloned(),
            self.handlers.get(&*first.kind).cloned(),
        ) else {
            return Vec::new(); // grouping only batches routable tasks
        };
        let metrics = self.metrics_of(&first.kind);
        let spans: Vec<tracing::Span> = unit
            .iter()
            .map(|l| {
                self.shared
                    .trace
                    .task_span(&l.task, &self.name, self.queue.system())
            })
            .collect();
        let hctx = self.context(&source, unit.iter().map(|l| &*l.task), &spans);
        let tasks: Vec<Arc<Task>> = unit.iter().map(|l| Arc::clone(&l.task)).collect();
        let batch_span = tracing::info_span!("batch", pool = %self.name, kind = %first.kind, tasks = tasks.len());
        if self.shared.trace.is_exporting() {
            // The batch's own span links to the trace of each of its tasks.
            use opentelemetry::trace::TraceContextExt as _;
            use tracing_opentelemetry::OpenTelemetrySpanExt as _;
            for span in &spans {
                batch_span.add_link(span.context().span().span_context().clone());
            }
        }
        let started = std::time::Instant::now();
        let results = self
            .attempt_batch(&tasks, &*handler, &hctx)
            .instrument(batch_span.clone())
            .await;
        let per_task = started.elapsed() / tasks.len() as u32;
        let attempts: Vec<Attempt> = match results {
            BatchAttempt::Done(results) => results,
            BatchAttempt::Abandoned => {
                for (lease, span) in unit.iter().zip(spans) {
                    self.give_back(lease, &source).instrument(span).await;
                }
                return Vec::new();
            }
            BatchAttempt::Untrusted(why) => {
                tracing::warn!(parent: &batch_span, pool = %self.name, tasks = unit.len(), %why, "batch failed as a whole; handling each task alone");
                let mut done = Vec::new();
                for (lease, span) in unit.into_iter().zip(spans) {
                    if self.settle(&lease).instrument(span).await {
                        done.push(lease);
                    }
                }
                return done;
            }
        };
        for _ in 0..tasks.len() {
            metrics.duration.observe(per_task);
        }
        // One completion for every committed outcome of the batch.
        let succeeded: Vec<Arc<Task>> = attempts
            .iter()
            .zip(&tasks)
            .filter(|(a, _)| matches!(a, Attempt::Done(_)))
            .map(|(_, t)| Arc::clone(t))
            .collect();
        let completing = self.shared.trace.children(
            attempts
                .iter()
                .zip(&spans)
                .filter(|(a, _)| matches!(a, Attempt::Done(_)))
                .map(|(_, s)| s),
            "complete",
        );
        let mut completions = if succeeded.is_empty() {
            Vec::new()
        } else {
            source
                .complete_batch(&succeeded)
                .instrument(batch_span)
                .await
        }
        .into_iter();
        drop(completing);
        let mut done = Vec::new();
        for ((lease, attempt), span) in unit.into_iter().zip(attempts).zip(spans) {
            let attempt = match attempt {
                Attempt::Done(outcome) => {
                    let completed = completions.next().unwrap_or_else(|| {
                        Err(runtime_contracts::SourceError::Io {
                            source_id: source.id().to_owned(),
                            message: "complete_batch answered fewer results than tasks".into(),
                        })
                    });
                    Self::completed(outcome, completed)
                }
                other => other,
            };
            let ok = self
                .conclude(&lease, &source, &*handler, &hctx, &metrics, attempt)
                .instrument(span)
                .await;
            if ok {
                done.push(lease);
            }
        }
        done
    }

    /// Settles a lease after its attempt (and, for a success, its completion): success,
    /// retry with backoff, or dead letter. True for a success.
    async fn conclude(
        &self,
        lease: &Lease,
        source: &Arc<dyn TaskSource>,
        handler: &dyn TaskHandler,
        hctx: &HandlerContext,
        metrics: &KindMetrics,
        attempt: Attempt,
    ) -> bool {
        let task = &lease.task;
        if !matches!(attempt, Attempt::Done(_) | Attempt::Abandoned) {
            metrics.failed.inc();
        }
        self.shared.counters.progressed();
        match &attempt {
            Attempt::Permanent(reason) => {
                TraceService::record_failure(&tracing::Span::current(), "permanent", reason);
            }
            Attempt::Failed { reason, class, .. } => {
                TraceService::record_failure(&tracing::Span::current(), class, reason);
            }
            Attempt::Done(_) | Attempt::Abandoned => {}
        }
        match attempt {
            Attempt::Done(outcome) => {
                self.succeed(lease, &outcome, metrics);
                return true;
            }
            Attempt::Abandoned => self.give_back(lease, source).await,
            Attempt::Permanent(reason) => {
                self.shared.counters.failed.fetch_add(1, Ordering::Relaxed);
                self.dead_letter(
                    lease,
                    Some(source),
                    Some((handler, hctx)),
                    reason,
                    "permanent",
                )
                .await
            }
            Attempt::Failed {
                reason,
                after,
                class,
            } => {
                self.shared.counters.failed.fetch_add(1, Ordering::Relaxed);
                if let Some(why) = self.gate.ask(Some(source)).await {
                    // The dependency failed, not the task: back to the queue, uncounted.
                    match self.queue.nack(lease, super::gate::RECHECK, None).await {
                        Ok(()) => {
                            self.shared.counters.retried.fetch_add(1, Ordering::Relaxed);
                            metrics.retried.inc();
                            tracing::warn!(task = %task.id, %reason, waiting_for = %why,
                                "attempt failed while a dependency is not ready; back in the queue, not counted");
                        }
                        Err(e) => {
                            tracing::error!(task = %task.id, error = %e, "nack failed; the lease will expire and the task reappear")
                        }
                    }
                    return false;
                }
                let config = self.config();
                let number = task.attempt.saturating_add(1);
                if number >= config.max_attempts {
                    let reason = format!("{reason} (attempt {number} of {})", config.max_attempts);
                    self.dead_letter(lease, Some(source), Some((handler, hctx)), reason, class)
                        .await;
                    return false;
                }
                let delay = after.unwrap_or_else(|| config.retry.backoff(number));
                let at = now_unix_ms();
                let next_at =
                    at.saturating_add(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
                let failure = AttemptFailure {
                    attempt: number,
                    reason: reason.clone(),
                    at_unix_ms: at,
                    next_attempt_at_unix_ms: Some(next_at),
                };
                match self.queue.nack(lease, delay, Some(failure)).await {
                    Ok(()) => {
                        self.shared.counters.retried.fetch_add(1, Ordering::Relaxed);
                        metrics.retried.inc();
                        self.shared
                            .metrics
                            .for_class(&self.name, &task.kind, class)
                            .0
                            .inc();
                        tracing::warn!(task = %task.id, correlation_id = %task.correlation_id, causation_id = cause(task), source = %task.source, attempt = number, ?delay, next_attempt_at_unix_ms = next_at, %reason, "attempt failed; retry scheduled");
                    }
                    Err(e) => {
                        tracing::error!(task = %task.id, error = %e, "nack failed; the lease will expire and the task reappear")
                    }
                }
            }
        };
        false
    }

    /// One `handle_batch` under the handler timeout, panics caught.
    async fn attempt_batch(
        &self,
        tasks: &[Arc<Task>],
        handler: &dyn TaskHandler,
        hctx: &HandlerContext,
    ) -> BatchAttempt {
        let timeout = self.handler_timeout();
        let call = std::panic::catch_unwind(AssertUnwindSafe(|| handler.handle_batch(tasks, hctx)));
        let future = match call {
            Ok(future) => future,
            Err(panic) => {
                return BatchAttempt::Untrusted(format!(
                    "handler panicked: {}",
                    panic_message(&*panic)
                ))
            }
        };
        let guarded = tokio::time::timeout(timeout, AssertUnwindSafe(future).catch_unwind());
        let result = tokio::select! {
            biased;
            r = guarded => r,
            _ = self.shared.abandon_in_flight.cancelled() => return BatchAttempt::Abandoned,
        };
        match result {
            Err(_) => BatchAttempt::Untrusted(format!(
                "batch of {} timed out after {} ms",
                tasks.len(),
                timeout.as_millis()
            )),
            Ok(Err(panic)) => {
                BatchAttempt::Untrusted(format!("handler panicked: {}", panic_message(&*panic)))
            }
            Ok(Ok(results)) if results.len() != tasks.len() => BatchAttempt::Untrusted(format!(
                "handle_batch answered {} results for {} tasks",
                results.len(),
                tasks.len()
            )),
            Ok(Ok(results)) => BatchAttempt::Done(results.into_iter().map(Attempt::of).collect()),
        }
    }

    async fn attempt(
        &self,
        lease: &Lease,
        handler: &dyn TaskHandler,
        hctx: &HandlerContext,
    ) -> Attempt {
        let timeout = self.handler_timeout();
        let call = std::panic::catch_unwind(AssertUnwindSafe(|| handler.handle(&lease.task, hctx)));
        let future = match call {
            Ok(future) => future,
            Err(panic) => {
                return Attempt::Failed {
                    reason: format!("handler panicked: {}", panic_message(&*panic)),
                    after: None,
                    class: "panic",
                }
            }
        };
        let guarded = tokio::time::timeout(timeout, AssertUnwindSafe(future).catch_unwind());
        let result = tokio::select! {
            biased;
            r = guarded => r,
            _ = self.shared.abandon_in_flight.cancelled() => return Attempt::Abandoned,
        };
        match result {
            Err(_) => Attempt::Failed {
                reason: format!("handler timed out after {} ms", timeout.as_millis()),
                after: None,
                class: "timeout",
            },
            Ok(Err(panic)) => Attempt::Failed {
                reason: format!("handler panicked: {}", panic_message(&*panic)),
                after: None,
                class: "panic",
            },
            Ok(Ok(result)) => Attempt::of(result),
        }
    }

    async fn acknowledge(&self, done: &[Lease]) {
        if done.is_empty() {
            return;
        }
        // Completed at the source (for mail: `\Seen`), not yet acknowledged.
        if let Err(e) = crate::fault("worker.after_complete") {
            tracing::warn!(tasks = done.len(), error = %e, "ack skipped; a redelivery will find the recorded outcomes");
            return;
        }
        if let Err(e) = self.queue.ack_batch(done).await {
            tracing::warn!(tasks = done.len(), error = %e, "ack failed after completion; a redelivery will find the recorded outcomes");
            return;
        }
        for lease in done {
            let t = &lease.task;
            tracing::debug!(task = %t.id, correlation_id = %t.correlation_id, causation_id = cause(t), source = %t.source, pool = %self.name, "acknowledged");
        }
    }

    fn succeed(&self, lease: &Lease, outcome: &Outcome, metrics: &KindMetrics) {
        self.shared
            .counters
            .processed
            .fetch_add(1, Ordering::Relaxed);
        metrics.processed.inc();
        if let Some(published) = lease
            .task
            .headers
            .get(crate::metrics::PUBLISHED_AT_HEADER)
            .and_then(|v| v.parse::<u64>().ok())
        {
            let waited = now_unix_ms().saturating_sub(published);
            metrics.latency.observe(Duration::from_millis(waited));
            metrics.latency_all.observe(Duration::from_millis(waited));
        }
        self.count_outcome(&outcome.kind);
        tracing::info!(
            task = %lease.task.id,
            correlation_id = %lease.task.correlation_id,
            causation_id = cause(&lease.task),
            source = %lease.task.source,
            outcome = %outcome.kind,
            detail = outcome.detail.as_deref().unwrap_or(""),
            "task completed"
        );
    }

    async fn give_back(&self, lease: &Lease, source: &Arc<dyn TaskSource>) {
        self.shared
            .counters
            .returned
            .fetch_add(1, Ordering::Relaxed);
        match self.queue.nack(lease, Duration::ZERO, None).await {
            Ok(()) => tracing::warn!(
                task = %lease.task.id,
                "shutdown deadline passed: task returned to its queue, left unread at its source"
            ),
            Err(e) => tracing::warn!(
                task = %lease.task.id, error = %e,
                "shutdown deadline passed: task abandoned, left unread at its source"
            ),
        }
        source.release(&lease.task, Disposition::Returned);
    }

    async fn dead_letter(
        &self,
        lease: &Lease,
        source: Option<&Arc<dyn TaskSource>>,
        handler: Option<(&dyn TaskHandler, &HandlerContext)>,
        reason: String,
        class: &'static str,
    ) {
        let failure = AttemptFailure {
            attempt: lease.task.attempt.saturating_add(1),
            reason: reason.clone(),
            at_unix_ms: now_unix_ms(),
            next_attempt_at_unix_ms: None,
        };
        if let Err(e) = self.queue.dead_letter(lease, failure.clone()).await {
            tracing::error!(task = %lease.task.id, error = %e, "dead-lettering failed; the lease will expire and the task reappear");
            return;
        }
        self.shared
            .counters
            .dead_lettered
            .fetch_add(1, Ordering::Relaxed);
        self.metrics_of(&lease.task.kind).dead_lettered.inc();
        self.shared
            .metrics
            .for_class(&self.name, &lease.task.kind, class)
            .1
            .inc();
        let t = &lease.task;
        tracing::error!(task = %t.id, correlation_id = %t.correlation_id, causation_id = cause(t), source = %t.source, %reason, "task dead-lettered; left unread at its source");
        if let Some((handler, hctx)) = handler {
            let notify = AssertUnwindSafe(handler.on_dead_letter(&lease.task, hctx, &failure));
            if notify.catch_unwind().await.is_err() {
                tracing::error!(task = %lease.task.id, "on_dead_letter panicked");
            }
        }
        if let Some(source) = source {
            source.release(&lease.task, Disposition::DeadLettered);
        }
    }
}

impl Worker for PoolWorker {
    fn run(&self, ctx: WorkerContext) -> BoxFuture<'_, Result<(), WorkerError>> {
        Box::pin(self.run_loop(ctx.index))
    }
}

/// The task's causation id for a log line (empty when it has none).
fn cause(task: &Task) -> &str {
    task.causation_id.as_deref().unwrap_or("")
}
