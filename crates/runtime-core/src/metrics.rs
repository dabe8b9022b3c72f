//! Prometheus metrics of the runtime: counters recorded as tasks move, gauges read at
//! scrape time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use crate::telemetry::SpanCounters;

/// Labels of per-task metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    /// The queue (and pool).
    pub queue: String,
    /// The task kind.
    pub kind: String,
}

/// Labels of outcome counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// The queue (and pool).
    pub queue: String,
    /// The outcome the handler recorded.
    pub outcome: String,
}

/// Labels of failures counted by class.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    /// The queue (and pool).
    pub queue: String,
    /// The task kind.
    pub kind: String,
    /// What failed: `error` (the handler said so), `timeout`, `panic`, `completion` (the
    /// source could not complete a recorded outcome), `permanent` (the handler gave up at
    /// once) or `unroutable` (no source or handler for the task).
    pub class: String,
}

/// A label set of one name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NameLabel {
    /// The queue or source.
    pub name: String,
}

const DURATION_BOUNDS: [f64; 13] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A histogram of atomic counters: recording takes no lock, so workers of a busy pool do
/// not queue behind one another to record a duration.
#[derive(Clone, Debug)]
pub struct Histogram {
    inner: Arc<HistogramInner>,
}

#[derive(Debug)]
struct HistogramInner {
    bounds: &'static [f64],
    /// One counter per bound, then one for +Inf.
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            inner: Arc::new(HistogramInner {
                bounds,
                buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
                count: AtomicU64::new(0),
                sum_nanos: AtomicU64::new(0),
            }),
        }
    }

    /// Records one duration.
    pub fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        let i = self.inner.bounds.partition_point(|b| *b < secs);
        self.inner.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.inner.count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.inner.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// How many durations were recorded, and their sum in nanoseconds.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.inner.count.load(Ordering::Relaxed),
            self.inner.sum_nanos.load(Ordering::Relaxed),
        )
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let inner = &self.inner;
        let buckets: Vec<(f64, u64)> = inner
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(inner.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        let sum = inner.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let count = inner.count.load(Ordering::Relaxed);
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

fn duration_histogram() -> Histogram {
    Histogram::new(&DURATION_BOUNDS)
}

/// From a second's fraction to an hour: a backlog drains for minutes, a retry waits longer.
const LATENCY_BOUNDS: [f64; 15] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(&LATENCY_BOUNDS)
}

/// The header in which the runtime notes when a source published a task (Unix ms); it
/// travels with the task across retries and processes, so the latency counts them all.
pub const PUBLISHED_AT_HEADER: &str = "plba-published-at-ms";

/// The per-task metrics of one (queue, kind); clones share the underlying values.
#[derive(Clone, Debug)]
pub(crate) struct KindMetrics {
    pub(crate) processed: Counter,
    pub(crate) failed: Counter,
    pub(crate) retried: Counter,
    pub(crate) dead_lettered: Counter,
    pub(crate) duration: Histogram,
    pub(crate) latency: Histogram,
    /// The latency of every (queue, kind) together (not exported; the console charts it).
    pub(crate) latency_all: Histogram,
}

/// Every metric of the runtime.
pub struct Metrics {
    registry: Mutex<Registry>,
    pub(crate) published: Family<TaskLabels, Counter>,
    pub(crate) processed: Family<TaskLabels, Counter>,
    pub(crate) failed: Family<TaskLabels, Counter>,
    pub(crate) retried: Family<TaskLabels, Counter>,
    pub(crate) dead_lettered: Family<TaskLabels, Counter>,
    pub(crate) duration: Family<TaskLabels, Histogram, fn() -> Histogram>,
    pub(crate) latency: Family<TaskLabels, Histogram, fn() -> Histogram>,
    pub(crate) outcomes: Family<OutcomeLabels, Counter>,
    pub(crate) retries_by_class: Family<ClassLabels, Counter>,
    pub(crate) dead_letters_by_class: Family<ClassLabels, Counter>,
    pub(crate) queue_depth: Family<NameLabel, Gauge>,
    pub(crate) queue_in_flight: Family<NameLabel, Gauge>,
    pub(crate) queue_scheduled: Family<NameLabel, Gauge>,
    pub(crate) queue_dead: Family<NameLabel, Gauge>,
    pub(crate) source_age: Family<NameLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub(crate) queue_oldest_pending_age:
        Family<NameLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub(crate) queue_lag: Family<NameLabel, Gauge>,
    pub(crate) ready: Gauge,
    pub(crate) readiness_checks: Family<NameLabel, Gauge>,
    pub(crate) reconcile_republished: Family<NameLabel, Counter>,
    pub(crate) source_restarts: Family<NameLabel, Counter>,
    pub(crate) retention_removed: Family<WhatLabel, Counter>,
    pub(crate) config_rejected: Counter,
    pub(crate) latency_all: Histogram,
}

/// The `what` label of the retention counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WhatLabel {
    /// What was removed.
    pub what: String,
}

impl Metrics {
    /// Counts what a retention sweep removed.
    pub(crate) fn retention_removed(&self, what: &str, n: u64) {
        self.retention_removed
            .get_or_create(&WhatLabel {
                what: what.to_owned(),
            })
            .inc_by(n);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::with_span_counters(&SpanCounters::default())
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// The metrics, with the trace export's span counters among them.
    pub fn with_span_counters(spans: &SpanCounters) -> Self {
        let m = Self {
            registry: Mutex::new(Registry::with_prefix("plba")),
            published: Family::default(),
            processed: Family::default(),
            failed: Family::default(),
            retried: Family::default(),
            dead_lettered: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            latency: Family::new_with_constructor(latency_histogram),
            outcomes: Family::default(),
            retries_by_class: Family::default(),
            dead_letters_by_class: Family::default(),
            queue_depth: Family::default(),
            queue_in_flight: Family::default(),
            queue_scheduled: Family::default(),
            queue_dead: Family::default(),
            source_age: Family::default(),
            queue_oldest_pending_age: Family::default(),
            queue_lag: Family::default(),
            ready: Gauge::default(),
            readiness_checks: Family::default(),
            reconcile_republished: Family::default(),
            source_restarts: Family::default(),
            retention_removed: Family::default(),
            config_rejected: Counter::default(),
            latency_all: latency_histogram(),
        };
        {
            let mut r = m.registry.lock().unwrap_or_else(|e| e.into_inner());
            r.register(
                "tasks_published",
                "Tasks published to a queue",
                m.published.clone(),
            );
            r.register(
                "tasks_processed",
                "Tasks that ended with an outcome",
                m.processed.clone(),
            );
            r.register(
                "tasks_failed",
                "Failed attempts (errors, timeouts, panics)",
                m.failed.clone(),
            );
            r.register(
                "tasks_retried",
                "Failed attempts scheduled again",
                m.retried.clone(),
            );
            r.register(
                "tasks_dead_lettered",
                "Tasks given up",
                m.dead_lettered.clone(),
            );
            r.register(
                "handler_duration_seconds",
                "Time a handler took for one attempt",
                m.duration.clone(),
            );
            r.register(
                "task_latency_seconds",
                "Time from a source's publish to the task's outcome, retries included",
                m.latency.clone(),
            );
            r.register(
                "retries_by_class",
                "Failed attempts scheduled again, by what failed",
                m.retries_by_class.clone(),
            );
            r.register(
                "dead_letters_by_class",
                "Tasks given up, by what failed last",
                m.dead_letters_by_class.clone(),
            );
            r.register(
                "outcomes",
                "Outcomes recorded by handlers, by kind",
                m.outcomes.clone(),
            );
            r.register(
                "queue_depth",
                "Tasks ready in a queue",
                m.queue_depth.clone(),
            );
            r.register(
                "queue_in_flight",
                "Tasks leased and not settled",
                m.queue_in_flight.clone(),
            );
            r.register(
                "queue_scheduled",
                "Tasks waiting for their retry delay",
                m.queue_scheduled.clone(),
            );
            r.register(
                "queue_dead",
                "Tasks in a queue's dead letters",
                m.queue_dead.clone(),
            );
            r.register(
                "source_last_event_age_seconds",
                "Time since a source's last successful scan, poll or event",
                m.source_age.clone(),
            );
            r.register(
                "queue_oldest_pending_age_seconds",
                "Age of the oldest task leased and not settled (0 when none)",
                m.queue_oldest_pending_age.clone(),
            );
            r.register(
                "queue_lag",
                "Tasks no consumer has been given yet (a Redis group's lag, else the ready depth)",
                m.queue_lag.clone(),
            );
            r.register(
                "ready",
                "1 when every readiness check is up, else 0",
                m.ready.clone(),
            );
            r.register(
                "readiness_check",
                "1 when this readiness contributor is up, else 0",
                m.readiness_checks.clone(),
            );
            r.register(
                "config_rejected",
                "Configuration changes refused as invalid (the configuration before stays)",
                m.config_rejected.clone(),
            );
            r.register(
                "reconcile_republished",
                "Unfinished work found with no task in its queue and published again, by source",
                m.reconcile_republished.clone(),
            );
            r.register(
                "retention_removed",
                "Records removed by the retention sweep, by what (dead_letters:QUEUE, outcomes, outbox, orders)",
                m.retention_removed.clone(),
            );
            r.register(
                "source_restarts",
                "Times a source was started again: after its start failed or it panicked, or to apply a changed configuration",
                m.source_restarts.clone(),
            );
            r.register(
                "spans_exported",
                "Trace spans the OTLP collector accepted",
                spans.exported.clone(),
            );
            r.register(
                "spans_dropped",
                "Trace spans lost: the export buffer was full or the collector failed",
                spans.dropped.clone(),
            );
        }
        m
    }
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }

    /// The metric handles of one (queue, kind), to keep and use without a lookup per task.
    pub(crate) fn for_kind(&self, queue: &str, kind: &str) -> KindMetrics {
        let labels = Self::labels(queue, kind);
        KindMetrics {
            processed: self.processed.get_or_create(&labels).clone(),
            failed: self.failed.get_or_create(&labels).clone(),
            retried: self.retried.get_or_create(&labels).clone(),
            dead_lettered: self.dead_lettered.get_or_create(&labels).clone(),
            duration: self.duration.get_or_create(&labels).clone(),
            latency: self.latency.get_or_create(&labels).clone(),
            latency_all: self.latency_all.clone(),
        }
    }

    /// The retry and dead-letter counters of one (queue, kind, class of failure).
    pub(crate) fn for_class(&self, queue: &str, kind: &str, class: &str) -> (Counter, Counter) {
        let labels = ClassLabels {
            queue: queue.to_owned(),
            kind: kind.to_owned(),
            class: class.to_owned(),
        };
        (
            self.retries_by_class.get_or_create(&labels).clone(),
            self.dead_letters_by_class.get_or_create(&labels).clone(),
        )
    }

    /// The outcome counter of one (queue, outcome).
    pub(crate) fn for_outcome(&self, queue: &str, outcome: &str) -> Counter {
        self.outcomes
            .get_or_create(&OutcomeLabels {
                queue: queue.to_owned(),
                outcome: outcome.to_owned(),
            })
            .clone()
    }

    pub(crate) fn labels(queue: &str, kind: &str) -> TaskLabels {
        TaskLabels {
            queue: queue.to_owned(),
            kind: kind.to_owned(),
        }
    }
}
