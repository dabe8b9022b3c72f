//! The retention sweep (`[retention]`): dead letters older than `dead_letters_days` are
//! purged from every queue that keeps them, and each module deletes its own records older
//! than their age ([`RetentionSweep`]): outcomes, performed effects and, only when the
//! operator sets `orders_days`, the orders themselves.
//!
//! Like the reconciliation sweep, it runs when a schedule source publishes a task of its
//! kind (`plba.retention`); the runtime registers it as that kind's handler on every pool.
//! Each sweep logs what it removed and counts it in `plba_retention_removed_total{what}`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use runtime_contracts::{
    BoxFuture, ConfigProblem, HandlerContext, HandlerError, Outcome, RetentionPolicy,
    RetentionSweep, Task, TaskHandler, TaskQueue,
};
use serde::{Deserialize, Serialize};

use crate::metrics::Metrics;

/// The task kind of the sweep.
pub const RETENTION_KIND: &str = "plba.retention";

const DAY: u64 = 24 * 60 * 60;

/// `[retention]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RetentionConfig {
    /// The task kind the sweep handles (what the schedule source publishes).
    pub kind: String,
    /// Days recorded outcomes are kept (outcomes of orders that are kept stay too: they
    /// are what recognises a resent order).
    pub outcomes_days: u64,
    /// Days delivered effects (outbox rows) are kept; pending ones always stay.
    pub outbox_days: u64,
    /// Days dead letters are kept, in every queue.
    pub dead_letters_days: u64,
    /// Days orders are kept; unset keeps them for good.
    pub orders_days: Option<u64>,
    /// When the sweep runs if no source of the configuration publishes `kind`: a cron
    /// expression with seconds, in UTC (by default `0 30 3 * * *`, 03:30 every day), for
    /// the schedule source the application adds; `off` runs no sweep of its own.
    pub schedule: String,
}

/// The default [`RetentionConfig::schedule`]: 03:30 UTC every day.
pub const DEFAULT_RETENTION_SCHEDULE: &str = "0 30 3 * * *";

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            kind: RETENTION_KIND.into(),
            outcomes_days: 90,
            outbox_days: 90,
            dead_letters_days: 90,
            orders_days: None,
            schedule: DEFAULT_RETENTION_SCHEDULE.into(),
        }
    }
}

impl RetentionConfig {
    /// Problems with these values.
    pub fn problems(&self) -> Vec<ConfigProblem> {
        let mut problems = runtime_contracts::config::require_positive(
            "retention",
            &[
                ("outcomes_days", self.outcomes_days),
                ("outbox_days", self.outbox_days),
                ("dead_letters_days", self.dead_letters_days),
                ("orders_days", self.orders_days.unwrap_or(1)),
            ],
        );
        if let Some(orders) = self.orders_days {
            if orders < self.outcomes_days {
                problems.push(ConfigProblem::new(
                    "retention.orders_days",
                    "must be at least outcomes_days: an order outlives the record of its mail",
                ));
            }
        }
        if self.kind.trim().is_empty() {
            problems.push(ConfigProblem::new("retention.kind", "must not be empty"));
        }
        if self.schedule.trim().is_empty() {
            problems.push(ConfigProblem::new(
                "retention.schedule",
                "must be a cron expression or \"off\"",
            ));
        }
        problems
    }

    /// The cron expression of the sweep's own schedule, unless it is `off`.
    pub fn own_schedule(&self) -> Option<&str> {
        Some(self.schedule.trim()).filter(|s| !s.eq_ignore_ascii_case("off"))
    }

    /// The ages, as modules read them.
    pub fn policy(&self) -> RetentionPolicy {
        let days = |d: u64| Some(Duration::from_secs(d.saturating_mul(DAY)));
        RetentionPolicy {
            outcomes: days(self.outcomes_days),
            effects: days(self.outbox_days),
            records: self.orders_days.and_then(days),
            dead_letters: days(self.dead_letters_days),
        }
    }
}

/// What one sweep removed, by what; or why a part failed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RetentionReport {
    /// Rows or entries removed, by what (`dead_letters:QUEUE`, `outcomes`, ...).
    pub removed: Vec<(String, u64)>,
    /// What could not be swept.
    pub errors: Vec<String>,
}

/// The sweep.
pub struct Retention {
    config: RetentionConfig,
    queues: Vec<(String, Arc<dyn TaskQueue>)>,
    sweeps: Vec<Arc<dyn RetentionSweep>>,
    metrics: Arc<Metrics>,
    last: Mutex<Option<RetentionReport>>,
}

impl std::fmt::Debug for Retention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retention")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Retention {
    /// A sweep of `queues`' dead letters and of the modules' `sweeps`.
    pub fn new(
        config: RetentionConfig,
        queues: Vec<(String, Arc<dyn TaskQueue>)>,
        sweeps: Vec<Arc<dyn RetentionSweep>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            config,
            queues,
            sweeps,
            metrics,
            last: Mutex::new(None),
        }
    }

    /// The last sweep's report.
    pub fn last(&self) -> Option<RetentionReport> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Purges the dead letters of `queue` older than `age`.
    async fn purge_dead(queue: &dyn TaskQueue, age: Duration) -> Result<u64, String> {
        let Some(dead) = queue.dead_letters() else {
            return Ok(0);
        };
        let cutoff =
            crate::now_unix_ms().saturating_sub(u64::try_from(age.as_millis()).unwrap_or(0));
        let mut old = Vec::new();
        let mut cursor = None;
        loop {
            let page = dead.list(cursor, 256).await.map_err(|e| e.to_string())?;
            old.extend(
                page.items
                    .iter()
                    .filter(|d| d.dead_at_unix_ms < cutoff)
                    .map(|d| d.id.clone()),
            );
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        let mut removed = 0;
        for id in old {
            match dead.purge(&id).await {
                Ok(()) => removed += 1,
                // Replayed or purged meanwhile.
                Err(runtime_contracts::QueueError::DeadLetterNotFound(_)) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(removed)
    }

    /// One sweep.
    pub async fn sweep(&self) -> RetentionReport {
        let policy = self.config.policy();
        let mut report = RetentionReport::default();
        if let Some(age) = policy.dead_letters {
            for (name, queue) in &self.queues {
                match Self::purge_dead(&**queue, age).await {
                    Ok(n) => report.removed.push((format!("dead_letters:{name}"), n)),
                    Err(e) => report.errors.push(format!("dead letters of {name}: {e}")),
                }
            }
        }
        for sweep in &self.sweeps {
            match sweep.sweep(&policy).await {
                Ok(removed) => report.removed.extend(removed),
                Err(e) => report.errors.push(e),
            }
        }
        for (what, n) in &report.removed {
            self.metrics.retention_removed(what, *n);
        }
        if report.errors.is_empty() {
            tracing::info!(removed = ?report.removed, "retention sweep");
        } else {
            tracing::warn!(removed = ?report.removed, errors = ?report.errors, "retention sweep failed in part");
        }
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(report.clone());
        report
    }
}

impl TaskHandler for Retention {
    fn handle<'a>(
        &'a self,
        _task: &'a Task,
        _ctx: &'a HandlerContext,
    ) -> BoxFuture<'a, Result<Outcome, HandlerError>> {
        Box::pin(async move {
            let report = self.sweep().await;
            let detail = report
                .removed
                .iter()
                .map(|(what, n)| format!("{what}: {n}"))
                .chain(report.errors.iter().map(|e| format!("failed: {e}")))
                .collect::<Vec<_>>()
                .join("; ");
            // Not retried: the next slot sweeps again.
            let kind = if report.errors.is_empty() {
                "swept"
            } else {
                "sweep_failed"
            };
            Ok(Outcome::new(kind).with_detail(detail))
        })
    }
}
