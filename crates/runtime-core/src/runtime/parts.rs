//! The runtime's own parts around sources and pools: pause control, backpressure, publish
//! metrics, and the health checks that read them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use runtime_contracts::{
    AttemptFailure, Backpressure, BoxFuture, DeadLetterStore, HealthContributor, HealthStatus,
    Lease, Probe, PublishResult, QueueError, QueueStats, SourceState, Task, TaskQueue, TaskSource,
};
use tokio::sync::Notify;

use crate::config::{ConfigurationManager, PoolConfig};
use crate::metrics::Metrics;
use crate::supervisor::PoolCounters;

/// Whether an operator paused a source, and how its supervised runs went.
#[derive(Debug, Default)]
pub(crate) struct SourceControl {
    paused: AtomicBool,
    resumed: Notify,
    /// Times the source was started again.
    pub(crate) restarts: AtomicU64,
    /// Why the source is not running while it waits to be started again.
    pub(crate) down: Mutex<Option<String>>,
    /// The running start's stop signal, to start it again with a changed configuration.
    pub(crate) run: Mutex<Option<tokio_util::sync::CancellationToken>>,
    /// Set when the running start is stopped to be started again at once.
    pub(crate) restart_requested: AtomicBool,
    /// Wakes a supervisor waiting out a backoff when a restart is requested.
    pub(crate) restart_wake: Notify,
}

impl SourceControl {
    /// Why the source is down between two runs, if it is.
    pub(crate) fn down_reason(&self) -> Option<String> {
        self.down.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops the running start so that the supervisor starts it again at once.
    pub(crate) fn request_restart(&self) {
        self.restart_requested.store(true, Ordering::SeqCst);
        if let Some(run) = &*self.run.lock().unwrap_or_else(|e| e.into_inner()) {
            run.cancel();
        }
        self.restart_wake.notify_waiters();
    }

    pub(crate) fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    pub(crate) fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
        if !paused {
            self.resumed.notify_waiters();
        }
    }
}

/// A source may fetch more while its pool's queued plus in-flight work is below the pool's
/// high watermark, and while it is not paused.
pub(crate) struct QueueBackpressure {
    pub(crate) queue: Arc<dyn TaskQueue>,
    pub(crate) pool: Arc<RwLock<PoolConfig>>,
    pub(crate) control: Arc<SourceControl>,
}

impl Backpressure for QueueBackpressure {
    fn wait_for_capacity(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            loop {
                if self.control.is_paused() {
                    let resumed = self.control.resumed.notified();
                    if self.control.is_paused() {
                        resumed.await;
                    }
                    continue;
                }
                let watermark = self
                    .pool
                    .read()
                    .map(|c| c.high_watermark as u64)
                    .unwrap_or(u64::MAX);
                match self.queue.stats().await {
                    Ok(s) if s.depth + s.scheduled + s.in_flight < watermark => return,
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        })
    }
}

/// Notes the publish time in the task's headers, unless a source already did.
fn stamp_published_at(task: &mut Task, now: u64) {
    task.headers
        .entry(crate::metrics::PUBLISHED_AT_HEADER.to_owned())
        .or_insert_with(|| now.to_string());
}

/// The queue as a source sees it: publishing is counted by queue and kind, and each task
/// carries its publish time (for the end-to-end latency).
pub(crate) struct MeteredQueue {
    pub(crate) inner: Arc<dyn TaskQueue>,
    pub(crate) metrics: Arc<Metrics>,
}

impl TaskQueue for MeteredQueue {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn system(&self) -> &'static str {
        self.inner.system()
    }

    fn inspect(
        &self,
        max: usize,
    ) -> BoxFuture<'_, Result<Option<runtime_contracts::Inspection>, QueueError>> {
        self.inner.inspect(max)
    }

    fn publish(&self, mut task: Task) -> BoxFuture<'_, Result<PublishResult, QueueError>> {
        let labels = Metrics::labels(self.inner.name(), &task.kind);
        stamp_published_at(&mut task, crate::now_unix_ms());
        Box::pin(async move {
            let logged = tracing::enabled!(tracing::Level::DEBUG).then(|| task.clone());
            let result = self.inner.publish(task).await;
            if matches!(result, Ok(PublishResult::Enqueued)) {
                self.metrics.published.get_or_create(&labels).inc();
            }
            if let (Some(task), Ok(result)) = (logged, &result) {
                published(self.inner.name(), &task, *result);
            }
            result
        })
    }

    fn publish_batch(
        &self,
        mut tasks: Vec<Task>,
    ) -> BoxFuture<'_, Result<Vec<PublishResult>, QueueError>> {
        let now = crate::now_unix_ms();
        for task in &mut tasks {
            stamp_published_at(task, now);
        }
        let kinds: Vec<std::sync::Arc<str>> = tasks.iter().map(|t| t.kind.clone()).collect();
        let logged = tracing::enabled!(tracing::Level::DEBUG).then(|| tasks.clone());
        Box::pin(async move {
            let results = self.inner.publish_batch(tasks).await?;
            for (kind, result) in kinds.iter().zip(&results) {
                if *result == PublishResult::Enqueued {
                    let labels = Metrics::labels(self.inner.name(), kind);
                    self.metrics.published.get_or_create(&labels).inc();
                }
            }
            for (task, result) in logged.iter().flatten().zip(&results) {
                published(self.inner.name(), task, *result);
            }
            Ok(results)
        })
    }

    fn consume(&self, wait: Duration) -> BoxFuture<'_, Result<Option<Lease>, QueueError>> {
        self.inner.consume(wait)
    }

    fn consume_batch(
        &self,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<Lease>, QueueError>> {
        self.inner.consume_batch(max, wait)
    }

    fn ack<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<(), QueueError>> {
        self.inner.ack(lease)
    }

    fn nack<'a>(
        &'a self,
        lease: &'a Lease,
        retry_delay: Duration,
        failure: Option<AttemptFailure>,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        self.inner.nack(lease, retry_delay, failure)
    }

    fn dead_letter<'a>(
        &'a self,
        lease: &'a Lease,
        failure: AttemptFailure,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        self.inner.dead_letter(lease, failure)
    }

    fn stats(&self) -> BoxFuture<'_, Result<QueueStats, QueueError>> {
        self.inner.stats()
    }

    fn dead_letters(&self) -> Option<&dyn DeadLetterStore> {
        self.inner.dead_letters()
    }

    fn leases(&self) -> Option<&dyn runtime_contracts::Leases> {
        self.inner.leases()
    }
}

/// Readiness of a source: running, not paused, and making progress within the bound.
pub(crate) struct SourceHealth {
    pub(crate) source: Arc<dyn TaskSource>,
    pub(crate) control: Arc<SourceControl>,
    pub(crate) config: Arc<ConfigurationManager>,
}

impl HealthContributor for SourceHealth {
    fn name(&self) -> &str {
        self.source.id()
    }

    fn check(&self, probe: Probe) -> BoxFuture<'_, HealthStatus> {
        Box::pin(async move {
            if probe == Probe::Liveness {
                return HealthStatus::Up;
            }
            let id = self.source.id();
            if self.control.is_paused() {
                return HealthStatus::Down {
                    reason: format!("source {id} is paused"),
                };
            }
            if let Some(reason) = self.control.down_reason() {
                return HealthStatus::Down { reason };
            }
            let status = self.source.status();
            if status.state != SourceState::Running {
                return HealthStatus::Down {
                    reason: status.last_error.unwrap_or_else(|| {
                        format!(
                            "source {id} is {}",
                            format!("{:?}", status.state).to_lowercase()
                        )
                    }),
                };
            }
            let bound =
                Duration::from_millis(self.config.platform().runtime.source_progress_bound_ms);
            match status.last_event_age {
                Some(age) if age > bound => HealthStatus::Down {
                    reason: format!(
                        "source {id} made no progress for {} ms (bound {} ms)",
                        age.as_millis(),
                        bound.as_millis()
                    ),
                },
                _ => HealthStatus::Up,
            }
        })
    }
}

/// Readiness of a pool: not stuck, i.e. not holding queued work with nothing settled for
/// longer than the bound.
pub(crate) struct PoolHealth {
    pub(crate) name: String,
    pub(crate) queue: Arc<dyn TaskQueue>,
    pub(crate) counters: Arc<PoolCounters>,
    pub(crate) config: Arc<ConfigurationManager>,
}

impl HealthContributor for PoolHealth {
    fn name(&self) -> &str {
        &self.name
    }

    fn check(&self, probe: Probe) -> BoxFuture<'_, HealthStatus> {
        Box::pin(async move {
            if probe == Probe::Liveness {
                return HealthStatus::Up;
            }
            let stats = match self.queue.stats().await {
                Ok(stats) => stats,
                Err(e) => {
                    return HealthStatus::Down {
                        reason: format!("queue {} unavailable: {e}", self.name),
                    }
                }
            };
            let platform = self.config.platform();
            if platform
                .pools
                .get(&self.name)
                .is_some_and(|p| p.workers == 0)
            {
                // Other processes handle this pool's work: their progress is theirs to report.
                return HealthStatus::Up;
            }
            let bound = Duration::from_millis(platform.runtime.pool_progress_bound_ms);
            let idle_for = self.counters.since_progress();
            if stats.depth + stats.in_flight > 0 && idle_for > bound {
                return HealthStatus::Down {
                    reason: format!(
                        "pool {} has {} queued and {} in flight but settled nothing for {} ms (bound {} ms)",
                        self.name,
                        stats.depth,
                        stats.in_flight,
                        idle_for.as_millis(),
                        bound.as_millis()
                    ),
                };
            }
            HealthStatus::Up
        })
    }
}

/// The debug line of one publish: the task, its flow and what the queue answered.
fn published(queue: &str, task: &Task, result: PublishResult) {
    tracing::debug!(
        task = %task.id,
        correlation_id = %task.correlation_id,
        causation_id = task.causation_id.as_deref().unwrap_or(""),
        source = %task.source,
        kind = %task.kind,
        pointer = %task.payload,
        queue,
        result = ?result,
        "published"
    );
}
