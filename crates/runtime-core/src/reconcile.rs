//! The reconciliation sweep (`[reconcile]`): work a source still holds unfinished (unread
//! mail) for longer than a bound, whose task no queue holds, was lost between the source
//! and the queue (a queue that lost its data, a task acknowledged without its completion).
//! The sweep reports it (log, `plba_reconcile_republished_total`, a `stranded_work`
//! diagnostic) and publishes it again.
//!
//! A schedule source publishes tasks of kind `plba.reconcile` (the `kind` here) into a
//! pool; the runtime registers the sweep as their handler on every pool. A queue that
//! cannot tell whether it holds an id (`holds` answers `None`) is left alone. A message
//! with a recorded outcome but no `\Seen` (a crash between the two) is published again too:
//! its handler finds the outcome and only completes it; the module's [`OutcomeLookup`]
//! tells the two apart in the report.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use runtime_contracts::{
    BoxFuture, ConfigProblem, HandlerContext, HandlerError, HealthContributor, HealthStatus,
    Outcome, OutcomeLookup, Probe, PublishResult, Task, TaskHandler, TaskQueue, TaskSource,
};
use serde::{Deserialize, Serialize};

use crate::metrics::{Metrics, NameLabel};

/// `[reconcile]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReconcileConfig {
    /// The task kind the sweep handles (what the schedule source publishes).
    pub kind: String,
    /// Work younger than this (s) is left to its source: it may simply not be published yet.
    pub older_than_secs: u64,
    /// Most unfinished items looked at per source and sweep.
    pub max_per_source: usize,
    /// The sources swept; every source when empty.
    pub sources: Vec<String>,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self {
            kind: RECONCILE_KIND.into(),
            older_than_secs: 900,
            max_per_source: 1000,
            sources: Vec::new(),
        }
    }
}

/// The default kind of sweep tasks.
pub const RECONCILE_KIND: &str = "plba.reconcile";

impl ReconcileConfig {
    /// Problems with these values; `sources` must name configured sources.
    pub fn problems(&self, root: &serde_json::Value) -> Vec<ConfigProblem> {
        let mut problems = runtime_contracts::config::require_positive(
            "reconcile",
            &[
                ("older_than_secs", self.older_than_secs),
                ("max_per_source", self.max_per_source as u64),
            ],
        );
        if self.kind.is_empty() {
            problems.push(ConfigProblem::new("reconcile.kind", "must not be empty"));
        }
        let configured = root.get("sources").and_then(serde_json::Value::as_object);
        for id in &self.sources {
            if !configured.is_some_and(|s| s.contains_key(id)) {
                problems.push(ConfigProblem::new(
                    "reconcile.sources",
                    format!("{id:?} is not a configured source"),
                ));
            }
        }
        problems
    }
}

/// What one sweep found for one source.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceSweep {
    /// The source.
    pub source: String,
    /// Unfinished items older than the bound.
    pub unsettled: usize,
    /// Of those, held by the queue (pending, running, waiting for a retry or dead).
    pub held: usize,
    /// Of those, whose queue could not tell.
    pub unknown: usize,
    /// Task ids with no task in the queue, published again.
    pub republished: Vec<String>,
    /// Of those, the ids whose outcome is recorded: only their completion (for mail:
    /// `\Seen`) was lost, and their handler completes them without doing the work again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outcome_recorded: Vec<String>,
    /// Why the source could not be swept, if it could not.
    pub error: Option<String>,
}

/// The last sweep.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepReport {
    /// When it ran, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// Per source.
    pub sources: Vec<SourceSweep>,
}

impl SweepReport {
    /// Ids published again, over all sources.
    pub fn republished(&self) -> usize {
        self.sources.iter().map(|s| s.republished.len()).sum()
    }

    /// The sources that could not be swept, with why.
    pub fn failures(&self) -> Vec<String> {
        self.sources
            .iter()
            .filter_map(|s| s.error.as_ref().map(|e| format!("{}: {e}", s.source)))
            .collect()
    }
}

/// One swept source: the source and the queue of its pool.
pub(crate) struct Target {
    pub(crate) source: Arc<dyn TaskSource>,
    pub(crate) queue: Arc<dyn TaskQueue>,
}

/// The sweep; handler of the sweep tasks and health contributor. See the module docs.
pub struct Reconciler {
    config: ReconcileConfig,
    targets: Vec<Target>,
    outcomes: Option<Arc<dyn OutcomeLookup>>,
    metrics: Arc<Metrics>,
    last: Mutex<Option<SweepReport>>,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler")
            .field("config", &self.config)
            .field(
                "targets",
                &self
                    .targets
                    .iter()
                    .map(|t| t.source.id())
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// Ids named in a log line at most.
const LOGGED_IDS: usize = 5;

impl Reconciler {
    pub(crate) fn new(
        config: ReconcileConfig,
        targets: Vec<Target>,
        outcomes: Option<Arc<dyn OutcomeLookup>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            config,
            targets,
            outcomes,
            metrics,
            last: Mutex::default(),
        }
    }

    /// The last sweep, if one ran.
    pub fn last(&self) -> Option<SweepReport> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sweeps every target once.
    pub async fn sweep(&self) -> SweepReport {
        self.sweep_for(None).await
    }

    /// [`Reconciler::sweep`] run by the sweep task `cause`: what it publishes again names
    /// that task as its `causation_id`.
    pub async fn sweep_for(&self, cause: Option<&Task>) -> SweepReport {
        let older_than = Duration::from_secs(self.config.older_than_secs);
        let mut report = SweepReport {
            at_unix_ms: crate::now_unix_ms(),
            sources: Vec::new(),
        };
        for target in &self.targets {
            let id = target.source.id().to_owned();
            let swept = self.sweep_one(target, older_than, cause).await;
            let swept = swept.unwrap_or_else(|error| SourceSweep {
                source: id.clone(),
                error: Some(error),
                ..SourceSweep::default()
            });
            if let Some(error) = &swept.error {
                tracing::warn!(source = %id, %error, "reconciliation sweep failed");
            } else if !swept.republished.is_empty() {
                self.metrics
                    .reconcile_republished
                    .get_or_create(&NameLabel { name: id.clone() })
                    .inc_by(swept.republished.len() as u64);
                tracing::warn!(
                    source = %id,
                    republished = swept.republished.len(),
                    of_which_outcome_recorded = swept.outcome_recorded.len(),
                    older_than_secs = self.config.older_than_secs,
                    first = ?&swept.republished[..swept.republished.len().min(LOGGED_IDS)],
                    "unfinished work without a task in the queue: published again"
                );
            } else {
                tracing::debug!(source = %id, unsettled = swept.unsettled, "reconciliation sweep found nothing lost");
            }
            report.sources.push(swept);
        }
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(report.clone());
        report
    }

    async fn sweep_one(
        &self,
        target: &Target,
        older_than: Duration,
        cause: Option<&Task>,
    ) -> Result<SourceSweep, String> {
        let unsettled = target
            .source
            .unsettled(older_than, self.config.max_per_source)
            .await
            .map_err(|e| e.to_string())?;
        let mut swept = SourceSweep {
            source: target.source.id().to_owned(),
            unsettled: unsettled.len(),
            ..SourceSweep::default()
        };
        let mut lost: Vec<Task> = Vec::new();
        for task in unsettled {
            match target.queue.holds(task.id.as_str()).await {
                Ok(Some(true)) => swept.held += 1,
                Ok(Some(false)) => {
                    let mut task = task;
                    task.causation_id = cause.map(|c| c.id.to_string());
                    lost.push(task);
                }
                Ok(None) => swept.unknown += 1,
                Err(e) => return Err(format!("asking the queue: {e}")),
            }
        }
        if lost.is_empty() {
            return Ok(swept);
        }
        let ids: Vec<String> = lost.iter().map(|t| t.id.to_string()).collect();
        // Whether each was lost before its handler ran or after its outcome was recorded.
        let recorded = match &self.outcomes {
            Some(lookup) => lookup
                .recorded(&ids)
                .await
                .map_err(|e| format!("asking for outcomes: {e}"))?,
            None => vec![false; ids.len()],
        };
        let results = target
            .queue
            .publish_batch(lost)
            .await
            .map_err(|e| format!("publishing again: {e}"))?;
        // An id the source or another replica published since the check is not counted.
        for ((id, result), recorded) in ids.into_iter().zip(results).zip(recorded) {
            if result == PublishResult::Enqueued {
                if recorded {
                    swept.outcome_recorded.push(id.clone());
                }
                swept.republished.push(id);
            }
        }
        Ok(swept)
    }
}

impl TaskHandler for Reconciler {
    fn handle<'a>(
        &'a self,
        task: &'a Task,
        _ctx: &'a HandlerContext,
    ) -> BoxFuture<'a, Result<Outcome, HandlerError>> {
        Box::pin(async move {
            let report = self.sweep_for(Some(task)).await;
            let detail = report
                .sources
                .iter()
                .map(|s| match &s.error {
                    Some(e) => format!("{}: failed: {e}", s.source),
                    None => format!(
                        "{}: {} unfinished, {} published again",
                        s.source,
                        s.unsettled,
                        s.republished.len()
                    ),
                })
                .collect::<Vec<_>>()
                .join("; ");
            // A failed sweep is not retried: the next slot sweeps again, and readiness
            // says why this one failed.
            let kind = if report.failures().is_empty() {
                "reconciled"
            } else {
                "reconcile_failed"
            };
            Ok(Outcome::new(kind).with_detail(detail))
        })
    }
}

/// Readiness: down while the last sweep could not look at a source.
pub(crate) struct ReconcileHealth(pub(crate) Arc<Reconciler>);

impl HealthContributor for ReconcileHealth {
    fn name(&self) -> &str {
        "reconcile"
    }

    fn check(&self, probe: Probe) -> BoxFuture<'_, HealthStatus> {
        let failures = self.0.last().map(|r| r.failures()).unwrap_or_default();
        Box::pin(std::future::ready(match probe {
            Probe::Readiness if !failures.is_empty() => HealthStatus::Down {
                reason: format!(
                    "the last reconciliation sweep failed: {}",
                    failures.join("; ")
                ),
            },
            _ => HealthStatus::Up,
        }))
    }
}

/// The first pause before the dead letters are read again after a failure, and the longest.
const HAND_BACK_RETRY_FIRST: Duration = Duration::from_millis(500);
const HAND_BACK_RETRY_MAX: Duration = Duration::from_secs(30);
/// Dead letters read per page.
const HAND_BACK_PAGE: usize = 256;

/// Hands every dead letter of `queue` whose source is one of `sources` back to it as
/// [`Disposition::DeadLettered`](runtime_contracts::Disposition), once, at start.
///
/// A worker tells the source right after dead-lettering; a process that dies between the
/// two, or a source that could not act on it (its server was down), would leave the item
/// looking like new work at the source (for mail: unread, without the failure keyword).
/// Telling the source again at every start makes that notice at least once; sources treat
/// it as idempotent. A queue whose dead letters cannot be read (its server is down) is read
/// again with a growing pause until it answers or `stop` is cancelled. Returns how many
/// were handed back.
pub(crate) async fn hand_back_dead_letters(
    queue: Arc<dyn TaskQueue>,
    sources: Vec<Arc<dyn TaskSource>>,
    stop: tokio_util::sync::CancellationToken,
) -> usize {
    let Some(store) = queue.dead_letters() else {
        return 0;
    };
    let (mut cursor, mut handed, mut pause) = (None, 0, HAND_BACK_RETRY_FIRST);
    loop {
        let page = tokio::select! {
            _ = stop.cancelled() => return handed,
            page = store.list(cursor.clone(), HAND_BACK_PAGE) => page,
        };
        match page {
            Ok(page) => {
                pause = HAND_BACK_RETRY_FIRST;
                for dead in &page.items {
                    if let Some(source) = sources.iter().find(|s| s.id() == &*dead.task.source) {
                        source.release(&dead.task, runtime_contracts::Disposition::DeadLettered);
                        handed += 1;
                    }
                }
                match page.next_cursor {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
            Err(e) => {
                tracing::warn!(queue = queue.name(), error = %e, retry_in_ms = pause.as_millis() as u64,
                    "could not read the dead letters to hand them back to their sources");
                tokio::select! {
                    _ = stop.cancelled() => return handed,
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(HAND_BACK_RETRY_MAX);
            }
        }
    }
    if handed > 0 {
        tracing::info!(
            queue = queue.name(),
            dead_letters = handed,
            "dead letters handed back to their sources"
        );
    }
    handed
}
