//! Diagnostics for an operator: stuck work, poison candidates and sources without
//! progress, each with what to do about it.

use std::time::Duration;

use runtime_contracts::{Inspection, SourceState};
use serde::{Deserialize, Serialize};

use super::{RuntimeManager, SourceReport};

/// A lease or an idle consumer is stuck when held this many handler timeouts.
pub const STUCK_AFTER_TIMEOUTS: u32 = 2;
/// Most leases, retries and consumers inspected per queue.
const INSPECT_MAX: usize = 100;

/// What the runtime found, worst first within each kind.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diagnostics {
    /// Every finding; empty when nothing needs an operator.
    pub findings: Vec<Finding>,
    /// Queues that cannot show their leases (an AMQP broker does not list them).
    pub not_inspected: Vec<String>,
    /// Tasks waiting for their next attempt, soonest first (at most 100 per queue).
    #[serde(default)]
    pub retries: Vec<PendingRetry>,
}

/// A task waiting in its queue for its next attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRetry {
    /// The queue (its pool's name).
    pub queue: String,
    /// The task.
    pub task: String,
    /// Its kind.
    pub kind: String,
    /// Attempts made so far.
    pub attempts: u32,
    /// Why the last one failed.
    pub last_reason: String,
    /// When the next attempt is due, milliseconds since the Unix epoch (`None` for a
    /// retry scheduled before due times were recorded).
    pub next_attempt_at_unix_ms: Option<u64>,
}

/// One thing an operator should look at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// `stuck_lease`, `idle_consumer`, `poison_candidate`, `source_without_progress`,
    /// `source_paused`, `dead_letters`, `queue_unavailable`, `stranded_work` or
    /// `completion_lost`.
    pub kind: String,
    /// The queue or source concerned.
    pub subject: String,
    /// The task concerned, if one.
    pub task: Option<String>,
    /// What was seen.
    pub detail: String,
    /// What to do.
    pub action: String,
}

impl Finding {
    fn new(
        kind: &str,
        subject: &str,
        task: Option<String>,
        detail: String,
        action: String,
    ) -> Self {
        Self {
            kind: kind.to_owned(),
            subject: subject.to_owned(),
            task,
            detail,
            action,
        }
    }
}

fn secs(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}

impl RuntimeManager {
    /// Inspects queues and sources; see [`Diagnostics`].
    pub async fn diagnostics(&self) -> Diagnostics {
        let mut out = Diagnostics::default();
        let platform = self.config.platform();
        for (name, queue) in &self.queues {
            let pool = self.effective_pool(&platform, name).unwrap_or_default();
            let timeout = pool.handler_timeout();
            match queue.inspect(INSPECT_MAX).await {
                Ok(Some(inspection)) => {
                    out.retries
                        .extend(inspection.retrying.iter().filter_map(|r| {
                            let last = r.history.last()?;
                            Some(PendingRetry {
                                queue: name.clone(),
                                task: r.task.clone(),
                                kind: r.kind.clone(),
                                attempts: last.attempt,
                                last_reason: last.reason.clone(),
                                next_attempt_at_unix_ms: last.next_attempt_at_unix_ms,
                            })
                        }));
                    queue_findings(
                        &mut out.findings,
                        name,
                        queue.system(),
                        timeout,
                        &pool,
                        &inspection,
                    );
                }
                Ok(None) => out.not_inspected.push(name.clone()),
                Err(e) => out.findings.push(Finding::new(
                    "queue_unavailable",
                    name,
                    None,
                    format!("the queue could not be inspected: {e}"),
                    "check that its server is up and reachable (see /health/ready)".into(),
                )),
            }
            if let Ok(stats) = queue.stats().await {
                if stats.dead > 0 {
                    out.findings.push(Finding::new(
                        "dead_letters",
                        name,
                        None,
                        format!("{} tasks are in the dead letters", stats.dead),
                        format!(
                            "read why with GET /queues/{name}/dead-letters; fix the cause, then replay them (POST /queues/{name}/dead-letters/replay) or purge them"
                        ),
                    ));
                }
            }
        }
        out.retries.sort_by_key(|r| {
            (
                r.next_attempt_at_unix_ms.unwrap_or(u64::MAX),
                r.task.clone(),
            )
        });
        if let Some(sweep) = self.reconciler.as_ref().and_then(|r| r.last()) {
            for source in sweep
                .sources
                .iter()
                .filter(|s| !s.outcome_recorded.is_empty())
            {
                out.findings.push(Finding::new(
                    "completion_lost",
                    &source.source,
                    source.outcome_recorded.first().cloned(),
                    format!(
                        "the last reconciliation sweep found {} unfinished items whose outcome is recorded but whose completion was not, and published them again to be completed",
                        source.outcome_recorded.len()
                    ),
                    "a process stopped between recording outcomes and completing them (for mail: setting \\Seen); nothing to do unless it repeats".into(),
                ));
            }
            for source in sweep
                .sources
                .iter()
                .filter(|s| s.republished.len() > s.outcome_recorded.len())
            {
                out.findings.push(Finding::new(
                    "stranded_work",
                    &source.source,
                    source
                        .republished
                        .iter()
                        .find(|id| !source.outcome_recorded.contains(id))
                        .cloned(),
                    format!(
                        "the last reconciliation sweep found {} unfinished items with no task in the queue and no outcome, and published them again",
                        source.republished.len() - source.outcome_recorded.len()
                    ),
                    "work was lost between the source and the queue: check whether the queue's server lost data (a Redis without persistence restarted) or a consumer acknowledged without completing".into(),
                ));
            }
        }
        let bound = platform.runtime.source_progress_bound_ms;
        for (source, pool) in &self.sources {
            let report = self.source_report(source.as_ref(), pool);
            source_findings(&mut out.findings, source.id(), &report, bound);
        }
        out
    }
}

fn queue_findings(
    findings: &mut Vec<Finding>,
    queue: &str,
    system: &str,
    timeout: Duration,
    pool: &crate::config::PoolConfig,
    inspection: &Inspection,
) {
    let stuck_ms = u64::try_from((timeout * STUCK_AFTER_TIMEOUTS).as_millis()).unwrap_or(u64::MAX);
    let timeout_text = secs(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
    for lease in &inspection.leases {
        let holder = lease
            .consumer
            .as_deref()
            .map_or_else(String::new, |c| format!(" by consumer {c}"));
        if lease.held_ms > stuck_ms {
            let action = if system == "redis" {
                format!(
                    "if the process of {} is gone, a live consumer takes the task over after queue.claim_min_idle_ms; if it is alive, a worker of it is hung: restart that process, and read the task's logs and trace (task {})",
                    lease.consumer.as_deref().unwrap_or("its consumer"),
                    lease.task
                )
            } else {
                format!(
                    "its worker is hung or gone: the lease expires after queue.lease_timeout_ms and the task is delivered again; if this repeats, the handler hangs on this message: read the task's logs and trace (task {})",
                    lease.task
                )
            };
            findings.push(Finding::new(
                "stuck_lease",
                queue,
                Some(lease.task.clone()),
                format!(
                    "leased{holder} for {}, more than {STUCK_AFTER_TIMEOUTS} x the handler timeout ({timeout_text})",
                    secs(lease.held_ms)
                ),
                action,
            ));
        }
        if lease.deliveries > 1 {
            findings.push(Finding::new(
                "poison_candidate",
                queue,
                Some(lease.task.clone()),
                format!(
                    "delivered {} times: workers holding it died or were taken over",
                    lease.deliveries
                ),
                "a message that kills its worker is dead-lettered as worker_lost after queue.max_deliveries; read the message and the task's logs now, and fix the handler before replaying it".into(),
            ));
        }
    }
    for consumer in &inspection.consumers {
        if consumer.pending > 0 && consumer.idle_ms > stuck_ms {
            findings.push(Finding::new(
                "idle_consumer",
                queue,
                None,
                format!(
                    "consumer {} holds {} entries and has been idle for {}",
                    consumer.name,
                    consumer.pending,
                    secs(consumer.idle_ms)
                ),
                format!(
                    "its process is probably dead: live consumers take its entries over after queue.claim_min_idle_ms; once it holds none, remove it with XGROUP DELCONSUMER <prefix>:{queue}:stream plba {}",
                    consumer.name
                ),
            ));
        }
    }
    for retry in &inspection.retrying {
        let Some(last) = retry.history.last() else {
            continue;
        };
        let same = retry
            .history
            .iter()
            .rev()
            .take_while(|f| f.reason == last.reason)
            .count();
        if same >= 2 {
            findings.push(Finding::new(
                "poison_candidate",
                queue,
                Some(retry.task.clone()),
                format!(
                    "failed {same} attempts in a row with the same reason: {}",
                    last.reason
                ),
                format!(
                    "it is dead-lettered after {} attempts (pools.{queue}.max_attempts); if the cause is in the message, let it go to the dead letters; if it is downstream, fix it and the next retry succeeds",
                    pool.max_attempts
                ),
            ));
        }
    }
}

fn source_findings(findings: &mut Vec<Finding>, id: &str, report: &SourceReport, bound_ms: u64) {
    if report.paused {
        findings.push(Finding::new(
            "source_paused",
            id,
            None,
            "an operator paused it: it fetches nothing".into(),
            format!("resume it with POST /sources/{id}/resume"),
        ));
        return;
    }
    let stale = report.last_event_age_ms.is_some_and(|a| a > bound_ms);
    if report.state == SourceState::Degraded || stale {
        let age = report
            .last_event_age_ms
            .map_or_else(|| "never".to_owned(), |a| format!("{} ago", secs(a)));
        findings.push(Finding::new(
            "source_without_progress",
            id,
            None,
            format!(
                "state {:?}, last progress {age} (bound {}){}",
                report.state,
                secs(bound_ms),
                report
                    .last_error
                    .as_deref()
                    .map_or_else(String::new, |e| format!(", last error: {e}"))
            ),
            "it retries by itself with backoff; check its server's reachability and credentials, and the log lines of this source".into(),
        ));
    }
}
