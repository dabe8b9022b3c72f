//! The transactional outbox, as the queue of the `outbox` worker pool.
//!
//! The store writes one row per effect (`erp`, later `reply`) in the transaction that
//! records the outcome (see [`OrderStore::record`]), so an effect exists exactly when its
//! outcome does. This queue hands the due rows to the runtime's workers as tasks: a claim
//! takes rows that are pending, due and not leased (on PostgreSQL with `FOR UPDATE SKIP
//! LOCKED`, so several replicas dispatch one outbox), stamps them with a claim token and a
//! lease, and the worker's ack, retry or dead letter settles the row it still holds. A
//! dispatcher killed mid-way leaves its rows leased until the lease ends; then another
//! claim takes them again (at least once: the ERP's idempotency key makes that harmless).
//!
//! Dead rows are this queue's dead letters, so operators list, replay and purge them with
//! the same routes, CLI and console as any other dead letter.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use runtime_contracts::queue::{Inspection, LeaseInfo, RetryInfo};
use runtime_contracts::{
    AttemptFailure, BoxFuture, DeadLetter, DeadLetterPage, DeadLetterStore, Lease, PublishResult,
    QueueError, QueueStats, SourceContext, SourceError, SourceState, SourceStatus, Task, TaskQueue,
    TaskSource,
};
use sqlx::Row;

use super::store::{Backend, OrderStore};

/// The worker pool that delivers orders to the ERP.
pub const POOL: &str = "outbox";
/// The source the ERP deliveries name (it publishes nothing: the rows are the queue).
pub const SOURCE: &str = "outbox";
/// The task kind of an ERP delivery.
pub const ERP_KIND: &str = "outbox.erp";
/// The worker pool that sends the replies to senders: a pool of its own, so that an SMTP
/// relay that is away holds back no ERP delivery, and the other way round.
pub const REPLY_POOL: &str = "replies";
/// The source the replies name.
pub const REPLY_SOURCE: &str = "replies";
/// The task kind of a reply.
pub const REPLY_KIND: &str = "outbox.reply";

/// Which of the outbox's effects a queue hands out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// `erp` rows: the `outbox` pool.
    Erp,
    /// `reply:<outcome>` rows: the `replies` pool.
    Replies,
}

impl Scope {
    /// The rows of this scope, as an SQL condition on `outbox`.
    fn rows(self) -> &'static str {
        match self {
            Self::Erp => "effect = 'erp'",
            Self::Replies => "effect LIKE 'reply:%'",
        }
    }

    /// The pool (and queue) of this scope.
    pub fn pool(self) -> &'static str {
        match self {
            Self::Erp => POOL,
            Self::Replies => REPLY_POOL,
        }
    }

    /// The source its tasks name.
    pub fn source(self) -> &'static str {
        match self {
            Self::Erp => SOURCE,
            Self::Replies => REPLY_SOURCE,
        }
    }
}

/// What the `outbox` pool runs with where `[pools.outbox]` says nothing: each worker claims
/// up to 16 effects at once and performs them side by side (one claim and one mark per
/// batch); a failing effect is tried 10 times over about eight minutes (1 s doubling to
/// 5 min) before it becomes a dead letter, and an ERP that is away counts no attempts.
pub fn pool_defaults() -> runtime_contracts::PoolDefaults {
    runtime_contracts::PoolDefaults {
        workers: Some(4),
        prefetch: Some(16),
        max_attempts: Some(10),
        initial_backoff_ms: Some(1_000),
        max_backoff_ms: Some(300_000),
    }
}

/// What the `replies` pool runs with where `[pools.replies]` says nothing: two workers of
/// eight replies each (a relay takes a few connections, not dozens); a reply the relay
/// defers (greylisting, a full queue) is tried 12 times over about an hour and a half
/// (5 s doubling to 15 min), and a relay that is away counts no attempts.
pub fn reply_pool_defaults() -> runtime_contracts::PoolDefaults {
    runtime_contracts::PoolDefaults {
        workers: Some(2),
        prefetch: Some(8),
        max_attempts: Some(12),
        initial_backoff_ms: Some(5_000),
        max_backoff_ms: Some(900_000),
    }
}

/// Failed attempts kept in a row's history.
const HISTORY_KEPT: usize = 20;
/// The longest a claim waits between two looks at the table when nothing wakes it.
const POLL: Duration = Duration::from_millis(250);

/// A parameter of [`OutboxQueue::settle`].
enum Arg {
    Int(i64),
    Text(String),
}

/// The outbox table as a [`TaskQueue`].
#[derive(Debug)]
pub struct OutboxQueue {
    store: OrderStore,
    lease: Duration,
    scope: Scope,
    tokens: AtomicU64,
}

fn unavailable(e: impl std::fmt::Display) -> QueueError {
    QueueError::Unavailable(format!("outbox: {e}"))
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The row a task of the outbox stands for.
pub fn row_of(task: &Task) -> Option<i64> {
    task.payload.get("row").and_then(serde_json::Value::as_i64)
}

const COLUMNS: &str =
    "id, effect, message_identity, order_id, attempt, history, last_error, claim, settled_ms";

impl OutboxQueue {
    /// The rows of `scope` in the outbox of `store`; a claimed row stays with its
    /// dispatcher for `lease`.
    pub fn new(store: OrderStore, lease: Duration, scope: Scope) -> Self {
        // Claim tokens differ between processes (the seed) and between claims (the count).
        let seed = now_unix_ms()
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(u64::from(std::process::id()) << 20);
        Self {
            store,
            lease,
            scope,
            tokens: AtomicU64::new(seed),
        }
    }

    fn backend(&self) -> Backend {
        self.store.backend()
    }

    fn token(&self) -> i64 {
        let t = self.tokens.fetch_add(1, Ordering::Relaxed) & (i64::MAX as u64);
        i64::try_from(t).unwrap_or(1).max(1)
    }

    fn task_of(&self, row: &sqlx::any::AnyRow) -> Result<Task, QueueError> {
        let id: i64 = row.try_get("id").map_err(unavailable)?;
        let effect: String = row.try_get("effect").map_err(unavailable)?;
        let identity: String = row.try_get("message_identity").map_err(unavailable)?;
        let order_id: Option<i64> = row.try_get("order_id").map_err(unavailable)?;
        let attempt: i64 = row.try_get("attempt").map_err(unavailable)?;
        let history: String = row.try_get("history").map_err(unavailable)?;
        // `reply:created`, `reply:no_lines`, … are all replies.
        let kind = effect.split(':').next().unwrap_or(&effect);
        let mut task = Task::new(
            format!("outbox:{id}"),
            format!("outbox.{kind}"),
            self.scope.source(),
            serde_json::json!({
                "row": id,
                "effect": effect,
                "message_identity": identity,
                "order_id": order_id,
            }),
        )
        .map_err(unavailable)?;
        task.attempt = u32::try_from(attempt).unwrap_or(u32::MAX);
        task.history = serde_json::from_str(&history).unwrap_or_default();
        Ok(task)
    }

    /// Claims up to `max` due rows for this dispatcher.
    async fn claim(&self, max: usize) -> Result<Vec<Lease>, QueueError> {
        let now = self.backend().now_ms();
        let token = self.token();
        let lock = match self.backend() {
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let sql = format!(
            "UPDATE outbox SET claim = $1, lease_until_ms = {now} + $2
             WHERE id IN (
                 SELECT id FROM outbox
                 WHERE state = 'pending' AND due_ms <= {now} AND {rows}
                   AND (lease_until_ms IS NULL OR lease_until_ms <= {now})
                 ORDER BY due_ms, id LIMIT $3{lock})
             RETURNING {COLUMNS}",
            rows = self.scope.rows()
        );
        let rows = sqlx::query(&sql)
            .bind(token)
            .bind(ms(self.lease))
            .bind(i64::try_from(max.max(1)).unwrap_or(1))
            .fetch_all(self.store.pool())
            .await
            .map_err(unavailable)?;
        let mut tasks = Vec::with_capacity(rows.len());
        for row in &rows {
            tasks.push(self.task_of(row)?);
        }
        let flows = self.flows(&tasks).await;
        let mut leases: Vec<Lease> = tasks
            .into_iter()
            .map(|task| {
                let identity = task.payload["message_identity"]
                    .as_str()
                    .unwrap_or_default();
                let task = match flows.get(identity) {
                    Some((cause, correlation)) => task.caused_by(cause, correlation),
                    None => task,
                };
                Lease {
                    task: Arc::new(task),
                    receipt: u64::try_from(token).unwrap_or(0),
                }
            })
            .collect();
        leases.sort_by_key(|l| row_of(&l.task));
        Ok(leases)
    }

    /// The flow each effect belongs to: the task that carried its message (the cause) and
    /// that task's correlation id, by message identity. A lookup that fails leaves the
    /// effects without (it only names their origin).
    async fn flows(&self, tasks: &[Task]) -> HashMap<String, (String, String)> {
        let identities: Vec<&str> = tasks
            .iter()
            .filter_map(|t| t.payload["message_identity"].as_str())
            .collect();
        if identities.is_empty() {
            return HashMap::new();
        }
        let list: Vec<String> = (1..=identities.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "SELECT message_identity, task FROM message_outcomes
             WHERE task IS NOT NULL AND message_identity IN ({})",
            list.join(", ")
        );
        let mut query = sqlx::query(&sql);
        for identity in &identities {
            query = query.bind(*identity);
        }
        let rows = match query.fetch_all(self.store.pool()).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::debug!(error = %e, "the effects' flows could not be read");
                return HashMap::new();
            }
        };
        rows.iter()
            .filter_map(|row| {
                let identity: String = row.try_get("message_identity").ok()?;
                let stored: serde_json::Value =
                    serde_json::from_str(&row.try_get::<String, _>("task").ok()?).ok()?;
                let id = stored.get("id")?.as_str()?.to_owned();
                let correlation = stored
                    .get("correlation_id")
                    .and_then(|c| c.as_str())
                    .unwrap_or(&id)
                    .to_owned();
                Some((identity, (id, correlation)))
            })
            .collect()
    }

    /// Settles the row `lease` holds with `set` (an `UPDATE … SET` list whose parameters
    /// start at `$3`); `UnknownLease` when the lease ended and the row went to another claim.
    async fn settle(&self, lease: &Lease, set: &str, args: Vec<Arg>) -> Result<(), QueueError> {
        let row = row_of(&lease.task).ok_or(QueueError::UnknownLease(lease.receipt))?;
        let sql = format!(
            "UPDATE outbox SET {set}, claim = NULL, lease_until_ms = NULL
             WHERE id = $1 AND claim = $2 AND state = 'pending'"
        );
        let mut query = sqlx::query(&sql)
            .bind(row)
            .bind(i64::try_from(lease.receipt).unwrap_or(-1));
        for arg in args {
            query = match arg {
                Arg::Int(n) => query.bind(n),
                Arg::Text(t) => query.bind(t),
            };
        }
        let done = query
            .execute(self.store.pool())
            .await
            .map_err(unavailable)?;
        if done.rows_affected() == 0 {
            return Err(QueueError::UnknownLease(lease.receipt));
        }
        Ok(())
    }

    fn history_with(task: &Task, failure: &AttemptFailure) -> String {
        let mut history = task.history.clone();
        history.push(failure.clone());
        let skip = history.len().saturating_sub(HISTORY_KEPT);
        serde_json::to_string(&history[skip..]).unwrap_or_else(|_| "[]".into())
    }

    fn dead_letter_of(&self, row: &sqlx::any::AnyRow) -> Result<DeadLetter, QueueError> {
        let task = self.task_of(row)?;
        let reason: Option<String> = row.try_get("last_error").map_err(unavailable)?;
        let at: Option<i64> = row.try_get("settled_ms").map_err(unavailable)?;
        Ok(DeadLetter {
            id: row_of(&task).unwrap_or_default().to_string(),
            task,
            reason: reason.unwrap_or_default(),
            dead_at_unix_ms: at.and_then(|a| u64::try_from(a).ok()).unwrap_or(0),
        })
    }
}

impl TaskQueue for OutboxQueue {
    fn name(&self) -> &str {
        self.scope.pool()
    }

    fn system(&self) -> &'static str {
        match self.backend() {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgresql",
        }
    }

    /// The rows come from the store's transactions; a task published here (an operator's
    /// replay of an outbox task, say) makes its row due again.
    fn publish(&self, task: Task) -> BoxFuture<'_, Result<PublishResult, QueueError>> {
        Box::pin(async move {
            let Some(row) = row_of(&task) else {
                return Err(QueueError::Unavailable(format!(
                    "outbox: task {} names no outbox row; effects are written with their outcome",
                    task.id
                )));
            };
            let now = self.backend().now_ms();
            let done = sqlx::query(&format!(
                "UPDATE outbox SET state = 'pending', due_ms = {now}
                 WHERE id = $1 AND state = 'dead' AND {rows}",
                rows = self.scope.rows()
            ))
            .bind(row)
            .execute(self.store.pool())
            .await
            .map_err(unavailable)?;
            Ok(if done.rows_affected() == 0 {
                PublishResult::AlreadyKnown
            } else {
                PublishResult::Enqueued
            })
        })
    }

    fn consume(&self, wait: Duration) -> BoxFuture<'_, Result<Option<Lease>, QueueError>> {
        Box::pin(async move { Ok(self.consume_batch(1, wait).await?.into_iter().next()) })
    }

    fn consume_batch(
        &self,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<Lease>, QueueError>> {
        Box::pin(async move {
            let until = tokio::time::Instant::now() + wait;
            loop {
                // Listen before looking, so that a commit between the look and the wait
                // is not missed.
                let written = self.store.outbox_written().notified();
                tokio::pin!(written);
                written.as_mut().enable();
                let leases = self.claim(max).await?;
                if !leases.is_empty() {
                    // Only `return(abort)` means anything here: killed holding the leases.
                    let _ = crate::module::fault("outbox.after_claim");
                }
                let now = tokio::time::Instant::now();
                if !leases.is_empty() || now >= until {
                    return Ok(leases);
                }
                let nap = (until - now).min(POLL);
                let _ = tokio::time::timeout(nap, written).await;
            }
        })
    }

    fn ack<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let _ = crate::module::fault("outbox.before_mark");
            let now = self.backend().now_ms();
            self.settle(
                lease,
                &format!("state = 'done', settled_ms = {now}"),
                Vec::new(),
            )
            .await
        })
    }

    fn ack_batch<'a>(&'a self, leases: &'a [Lease]) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            if leases.is_empty() {
                return Ok(());
            }
            let _ = crate::module::fault("outbox.before_mark");
            let now = self.backend().now_ms();
            let mut pairs = String::new();
            for (n, _) in leases.iter().enumerate() {
                if n > 0 {
                    pairs.push_str(" OR ");
                }
                match self.backend() {
                    Backend::Sqlite => pairs.push_str("(id = ? AND claim = ?)"),
                    Backend::Postgres => {
                        pairs.push_str(&format!(
                            "(id = ${} AND claim = ${})",
                            2 * n + 1,
                            2 * n + 2
                        ));
                    }
                }
            }
            let sql = format!(
                "UPDATE outbox SET state = 'done', settled_ms = {now}, claim = NULL, lease_until_ms = NULL
                 WHERE state = 'pending' AND ({pairs})"
            );
            let mut query = sqlx::query(&sql).persistent(false);
            for lease in leases {
                query = query
                    .bind(row_of(&lease.task).unwrap_or(-1))
                    .bind(i64::try_from(lease.receipt).unwrap_or(-1));
            }
            let done = query
                .execute(self.store.pool())
                .await
                .map_err(unavailable)?;
            if done.rows_affected() < leases.len() as u64 {
                return Err(QueueError::UnknownLease(leases[0].receipt));
            }
            Ok(())
        })
    }

    fn nack<'a>(
        &'a self,
        lease: &'a Lease,
        retry_delay: Duration,
        failure: Option<AttemptFailure>,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let now = self.backend().now_ms();
            let delay = ms(retry_delay);
            match failure {
                Some(failure) => {
                    let history = Self::history_with(&lease.task, &failure);
                    self.settle(
                        lease,
                        &format!(
                            "due_ms = {now} + $3, attempt = attempt + 1, history = $4, last_error = $5"
                        ),
                        vec![
                            Arg::Int(delay),
                            Arg::Text(history),
                            Arg::Text(failure.reason),
                        ],
                    )
                    .await
                }
                None => {
                    self.settle(
                        lease,
                        &format!("due_ms = {now} + $3"),
                        vec![Arg::Int(delay)],
                    )
                    .await
                }
            }
        })
    }

    fn dead_letter<'a>(
        &'a self,
        lease: &'a Lease,
        failure: AttemptFailure,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let now = self.backend().now_ms();
            let history = Self::history_with(&lease.task, &failure);
            self.settle(
                lease,
                &format!(
                    "state = 'dead', settled_ms = {now}, attempt = attempt + 1, history = $3, last_error = $4"
                ),
                vec![Arg::Text(history), Arg::Text(failure.reason)],
            )
            .await
        })
    }

    fn stats(&self) -> BoxFuture<'_, Result<QueueStats, QueueError>> {
        Box::pin(async move {
            let now = self.backend().now_ms();
            let leased = format!("lease_until_ms IS NOT NULL AND lease_until_ms > {now}");
            let sql = format!(
                "SELECT
                    CAST(COUNT(*) AS BIGINT) AS published,
                    CAST(COALESCE(SUM(CASE WHEN state = 'pending' AND due_ms <= {now} AND NOT ({leased}) THEN 1 ELSE 0 END), 0) AS BIGINT) AS depth,
                    CAST(COALESCE(SUM(CASE WHEN state = 'pending' AND due_ms > {now} AND NOT ({leased}) THEN 1 ELSE 0 END), 0) AS BIGINT) AS scheduled,
                    CAST(COALESCE(SUM(CASE WHEN state = 'pending' AND {leased} THEN 1 ELSE 0 END), 0) AS BIGINT) AS in_flight,
                    CAST(COALESCE(SUM(CASE WHEN state = 'done' THEN 1 ELSE 0 END), 0) AS BIGINT) AS processed,
                    CAST(COALESCE(SUM(CASE WHEN state = 'dead' THEN 1 ELSE 0 END), 0) AS BIGINT) AS dead,
                    CAST(COALESCE(SUM(attempt), 0) AS BIGINT) AS failed,
                    CAST({now} - MIN(CASE WHEN state = 'pending' THEN created_ms END) AS BIGINT) AS oldest
                 FROM outbox WHERE {rows}",
                rows = self.scope.rows()
            );
            let row = sqlx::query(&sql)
                .fetch_one(self.store.pool())
                .await
                .map_err(unavailable)?;
            let n = |name: &str| -> Result<u64, QueueError> {
                let v: i64 = row.try_get(name).map_err(unavailable)?;
                Ok(u64::try_from(v).unwrap_or(0))
            };
            let oldest: Option<i64> = row.try_get("oldest").map_err(unavailable)?;
            Ok(QueueStats {
                depth: n("depth")?,
                scheduled: n("scheduled")?,
                in_flight: n("in_flight")?,
                published: n("published")?,
                processed: n("processed")?,
                failed: n("failed")?,
                dead: n("dead")?,
                lag: None,
                oldest_pending_age_ms: oldest.map(|o| u64::try_from(o).unwrap_or(0)),
            })
        })
    }

    fn dead_letters(&self) -> Option<&dyn DeadLetterStore> {
        Some(self)
    }

    /// For `/diagnostics`: the effects claimed now (how long each has been held) and those
    /// that failed before and wait for their next attempt, with their history.
    fn inspect(&self, max: usize) -> BoxFuture<'_, Result<Option<Inspection>, QueueError>> {
        Box::pin(async move {
            let now = self.backend().now_ms();
            let limit = i64::try_from(max.clamp(1, 1000)).unwrap_or(1000);
            let leased = sqlx::query(&format!(
                "SELECT {COLUMNS}, {now} - (lease_until_ms - $1) AS held_ms FROM outbox
                 WHERE state = 'pending' AND lease_until_ms > {now} AND {rows} ORDER BY id LIMIT $2",
                rows = self.scope.rows()
            ))
            .bind(ms(self.lease))
            .bind(limit)
            .fetch_all(self.store.pool())
            .await
            .map_err(unavailable)?;
            let mut inspection = Inspection::default();
            for row in &leased {
                let task = self.task_of(row)?;
                let held: i64 = row.try_get("held_ms").map_err(unavailable)?;
                inspection.leases.push(LeaseInfo {
                    task: task.id.to_string(),
                    kind: Some(task.kind.to_string()),
                    consumer: None,
                    held_ms: u64::try_from(held).unwrap_or(0),
                    deliveries: task.attempt.saturating_add(1),
                });
            }
            let retrying = sqlx::query(&format!(
                "SELECT {COLUMNS} FROM outbox WHERE state = 'pending' AND attempt > 0 AND {rows}
                 ORDER BY attempt DESC, id LIMIT $1",
                rows = self.scope.rows()
            ))
            .bind(limit)
            .fetch_all(self.store.pool())
            .await
            .map_err(unavailable)?;
            for row in &retrying {
                let task = self.task_of(row)?;
                inspection.retrying.push(RetryInfo {
                    task: task.id.to_string(),
                    kind: task.kind.to_string(),
                    history: task.history,
                });
            }
            Ok(Some(inspection))
        })
    }
}

impl DeadLetterStore for OutboxQueue {
    fn list(
        &self,
        cursor: Option<String>,
        limit: usize,
    ) -> BoxFuture<'_, Result<DeadLetterPage, QueueError>> {
        Box::pin(async move {
            let after: i64 = cursor.as_deref().and_then(|c| c.parse().ok()).unwrap_or(0);
            let limit = limit.clamp(1, 1000);
            let rows = sqlx::query(&format!(
                "SELECT {COLUMNS} FROM outbox WHERE state = 'dead' AND id > $1 AND {rows} ORDER BY id LIMIT $2",
                rows = self.scope.rows()
            ))
            .bind(after)
            .bind(i64::try_from(limit + 1).unwrap_or(1001))
            .fetch_all(self.store.pool())
            .await
            .map_err(unavailable)?;
            let mut items = rows
                .iter()
                .map(|row| self.dead_letter_of(row))
                .collect::<Result<Vec<_>, _>>()?;
            let next_cursor = (items.len() > limit).then(|| {
                items.truncate(limit);
                items.last().map(|d| d.id.clone()).unwrap_or_default()
            });
            Ok(DeadLetterPage { items, next_cursor })
        })
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<DeadLetter>, QueueError>> {
        Box::pin(async move {
            let Ok(id) = id.parse::<i64>() else {
                return Ok(None);
            };
            let row = sqlx::query(&format!(
                "SELECT {COLUMNS} FROM outbox WHERE state = 'dead' AND id = $1 AND {rows}",
                rows = self.scope.rows()
            ))
            .bind(id)
            .fetch_optional(self.store.pool())
            .await
            .map_err(unavailable)?;
            row.as_ref().map(|row| self.dead_letter_of(row)).transpose()
        })
    }

    fn replay<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let row: i64 = id
                .parse()
                .map_err(|_| QueueError::DeadLetterNotFound(id.to_owned()))?;
            let now = self.backend().now_ms();
            let done = sqlx::query(&format!(
                "UPDATE outbox SET state = 'pending', due_ms = {now}, attempt = 0, settled_ms = NULL
                 WHERE id = $1 AND state = 'dead' AND {rows}",
                rows = self.scope.rows()
            ))
            .bind(row)
            .execute(self.store.pool())
            .await
            .map_err(unavailable)?;
            if done.rows_affected() == 0 {
                return Err(QueueError::DeadLetterNotFound(id.to_owned()));
            }
            self.store.outbox_written().notify_waiters();
            Ok(())
        })
    }

    fn replay_all(&self) -> BoxFuture<'_, Result<usize, QueueError>> {
        Box::pin(async move {
            let now = self.backend().now_ms();
            let done = sqlx::query(&format!(
                "UPDATE outbox SET state = 'pending', due_ms = {now}, attempt = 0, settled_ms = NULL
                 WHERE state = 'dead' AND {rows}",
                rows = self.scope.rows()
            ))
            .execute(self.store.pool())
            .await
            .map_err(unavailable)?;
            self.store.outbox_written().notify_waiters();
            Ok(usize::try_from(done.rows_affected()).unwrap_or(usize::MAX))
        })
    }

    fn purge<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let row: i64 = id
                .parse()
                .map_err(|_| QueueError::DeadLetterNotFound(id.to_owned()))?;
            let done = sqlx::query(&format!(
                "DELETE FROM outbox WHERE id = $1 AND state = 'dead' AND {}",
                self.scope.rows()
            ))
            .bind(row)
            .execute(self.store.pool())
            .await
            .map_err(unavailable)?;
            if done.rows_affected() == 0 {
                return Err(QueueError::DeadLetterNotFound(id.to_owned()));
            }
            Ok(())
        })
    }
}

/// The source the outbox's tasks name. It publishes nothing (the pool takes the rows from
/// [`OutboxQueue`]) and completes nothing at a source: a delivered effect is settled by
/// the queue's ack.
#[derive(Debug)]
pub struct OutboxSource {
    scope: Scope,
    running: std::sync::atomic::AtomicBool,
}

impl OutboxSource {
    /// The source of `scope`'s tasks.
    pub fn new(scope: Scope) -> Self {
        Self {
            scope,
            running: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl TaskSource for OutboxSource {
    fn id(&self) -> &str {
        self.scope.source()
    }

    fn start(&self, ctx: SourceContext) -> BoxFuture<'_, Result<(), SourceError>> {
        Box::pin(async move {
            self.running.store(true, Ordering::Relaxed);
            ctx.shutdown.cancelled().await;
            self.running.store(false, Ordering::Relaxed);
            Ok(())
        })
    }

    fn status(&self) -> SourceStatus {
        SourceStatus {
            state: if self.running.load(Ordering::Relaxed) {
                SourceState::Running
            } else {
                SourceState::Stopped
            },
            published: 0,
            completed: 0,
            pending: 0,
            // Nothing to scan: the rows come to the pool from the queue, always current.
            last_event_age: Some(Duration::ZERO),
            last_error: None,
            next_due: None,
            lease: None,
        }
    }

    fn load_content<'a>(
        &'a self,
        _task: &'a Task,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, SourceError>> {
        Box::pin(std::future::ready(Ok(None)))
    }

    fn complete<'a>(&'a self, _task: &'a Task) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(std::future::ready(Ok(())))
    }
}
