//! A bounded in-process queue with leases, delayed retries and dead letters.
//!
//! It lives and dies with the process: whatever it holds at exit is dropped, and the
//! source's own state (unread mail) is what brings that work back on the next start.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ahash::{AHashMap as HashMap, AHashSet as HashSet};
use runtime_contracts::{
    AttemptFailure, BoxFuture, DeadLetter, DeadLetterPage, DeadLetterStore, Inspection, Lease,
    LeaseInfo, PublishResult, QueueError, QueueStats, RetryInfo, Task, TaskId, TaskQueue,
};
use serde::Deserialize;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::now_unix_ms;

/// `[queue]` with `type = "memory"`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct MemoryQueueConfig {
    /// Most tasks held at once (ready, scheduled and in flight); `publish` fails beyond.
    pub capacity: usize,
    /// A lease not settled within this many milliseconds expires and its task becomes
    /// visible again (its worker died). Must exceed every pool's handler timeout.
    pub lease_timeout_ms: u64,
    /// How long the id of an acknowledged task marked with `keep_id_after_ack` is still
    /// refused (s).
    pub dedupe_ttl_secs: u64,
}

impl Default for MemoryQueueConfig {
    fn default() -> Self {
        Self {
            capacity: 10_000,
            lease_timeout_ms: 300_000,
            dedupe_ttl_secs: 7 * 24 * 3600,
        }
    }
}

impl MemoryQueueConfig {
    /// Problems with these values, keyed under `prefix`.
    pub fn problems(&self, prefix: &str) -> Vec<runtime_contracts::ConfigProblem> {
        runtime_contracts::config::require_positive(
            prefix,
            &[
                ("capacity", self.capacity as u64),
                ("lease_timeout_ms", self.lease_timeout_ms),
                ("dedupe_ttl_secs", self.dedupe_ttl_secs),
            ],
        )
    }
}

#[derive(Default)]
struct State {
    ready: VecDeque<Arc<Task>>,
    scheduled: BTreeMap<(Instant, u64), Arc<Task>>,
    in_flight: HashMap<u64, (Arc<Task>, Instant)>,
    dead: BTreeMap<u64, DeadLetter>,
    dead_index: HashMap<String, u64>,
    next_seq: u64,
    next_expiry_check: Option<Instant>,
    published: u64,
    processed: u64,
    failed: u64,
}

impl State {
    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    fn live(&self) -> usize {
        self.ready.len() + self.scheduled.len() + self.in_flight.len()
    }

    fn promote_due(&mut self, now: Instant) {
        if self.scheduled.is_empty() {
            return;
        }
        while let Some(entry) = self.scheduled.first_entry() {
            if entry.key().0 > now {
                break;
            }
            self.ready.push_back(entry.remove());
        }
    }

    fn reclaim_expired(&mut self, now: Instant, lease_timeout: Duration) {
        if self.next_expiry_check.is_some_and(|t| t > now) {
            return;
        }
        self.next_expiry_check = Some(now + lease_timeout / 4);
        let expired: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, (_, deadline))| *deadline <= now)
            .map(|(receipt, _)| *receipt)
            .collect();
        for receipt in expired {
            if let Some((task, _)) = self.in_flight.remove(&receipt) {
                tracing::warn!(task = %task.id, "lease expired; task visible again");
                self.ready.push_back(task);
            }
        }
    }

    fn take_lease(&mut self, receipt: u64) -> Result<Arc<Task>, QueueError> {
        self.in_flight
            .remove(&receipt)
            .map(|(task, _)| task)
            .ok_or(QueueError::UnknownLease(receipt))
    }
}

/// Ids of every task the queue holds (ready, scheduled, in flight or dead), for idempotent
/// publishing. Sharded and locked apart from the queue state, so that the hash work of a
/// large backlog stays out of the consumers' critical section.
struct KnownIds {
    shards: Vec<Mutex<HashSet<TaskId>>>,
    hasher: ahash::RandomState,
}

impl KnownIds {
    const SHARDS: usize = 16;

    fn new() -> Self {
        Self {
            shards: (0..Self::SHARDS).map(|_| Mutex::default()).collect(),
            hasher: ahash::RandomState::new(),
        }
    }

    fn shard(&self, id: &TaskId) -> MutexGuard<'_, HashSet<TaskId>> {
        let i = (self.hasher.hash_one(id) as usize) % Self::SHARDS;
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `id`; false when it was already there.
    fn insert(&self, id: &TaskId) -> bool {
        self.shard(id).insert(id.clone())
    }

    fn remove(&self, id: &TaskId) {
        self.shard(id).remove(id);
    }

    fn contains(&self, id: &str) -> bool {
        let id = TaskId::new(id);
        self.shard(&id).contains(&id)
    }
}

/// Ids of acknowledged tasks kept known (`keep_id_after_ack`), oldest first, with the time
/// each is forgotten.
/// `len` lets the acks of tasks that keep nothing skip the lock while nothing is kept.
#[derive(Default)]
struct KeptIds {
    ids: Mutex<VecDeque<(Instant, TaskId)>>,
    len: std::sync::atomic::AtomicUsize,
}

/// The in-memory queue. See the module docs.
pub struct MemoryQueue {
    name: String,
    config: MemoryQueueConfig,
    state: Mutex<State>,
    known: KnownIds,
    kept: KeptIds,
    available: Notify,
}

impl std::fmt::Debug for MemoryQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryQueue")
            .field("name", &self.name)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl MemoryQueue {
    /// An empty queue.
    pub fn new(name: impl Into<String>, config: MemoryQueueConfig) -> Self {
        Self {
            name: name.into(),
            config,
            state: Mutex::new(State::default()),
            known: KnownIds::new(),
            kept: KeptIds::default(),
            available: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Leases up to `max` ready tasks under one lock; also returns when the next scheduled
    /// task or lease expiry is due, for a consumer that found nothing.
    fn try_lease(&self, now: Instant, max: usize) -> (Vec<Lease>, Option<Instant>) {
        let mut state = self.lock();
        state.promote_due(now);
        state.reclaim_expired(now, self.lease_timeout());
        let take = max.max(1).min(state.ready.len());
        let mut leases = Vec::with_capacity(take);
        for _ in 0..take {
            let Some(task) = state.ready.pop_front() else {
                break;
            };
            let receipt = state.seq();
            state
                .in_flight
                .insert(receipt, (Arc::clone(&task), now + self.lease_timeout()));
            leases.push(Lease { task, receipt });
        }
        let more = !state.ready.is_empty();
        let next_expiry = state
            .next_expiry_check
            .filter(|_| !state.in_flight.is_empty());
        let next_due = state.scheduled.keys().next().map(|(t, _)| *t);
        drop(state);
        if more && !leases.is_empty() {
            // Pass the wake-up on: one publish notification may stand for many tasks.
            self.available.notify_one();
        }
        let wake = match (next_due, next_expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        (leases, wake)
    }

    async fn lease_batch(&self, max: usize, wait: Duration) -> Vec<Lease> {
        let mut now = Instant::now();
        let deadline = now + wait;
        loop {
            let notified = self.available.notified();
            let (leases, next_due) = self.try_lease(now, max);
            if !leases.is_empty() || now >= deadline {
                return leases;
            }
            let until = next_due.map_or(deadline, |due| due.min(deadline));
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(until) => {}
            }
            now = Instant::now();
        }
    }

    fn publish_now(&self, task: Task) -> Result<PublishResult, QueueError> {
        // A kept id whose window has passed is forgotten first (only when ids are kept).
        let fresh = self.known.insert(&task.id)
            || (self.kept.len.load(std::sync::atomic::Ordering::Relaxed) > 0 && {
                drop(self.forget_expired());
                self.known.insert(&task.id)
            });
        let result = if !fresh {
            Ok(PublishResult::AlreadyKnown)
        } else {
            let mut state = self.lock();
            if state.live() >= self.config.capacity {
                drop(state);
                self.known.remove(&task.id);
                Err(QueueError::Full {
                    queue: self.name.clone(),
                    capacity: self.config.capacity,
                })
            } else {
                state.ready.push_back(Arc::new(task));
                state.published += 1;
                Ok(PublishResult::Enqueued)
            }
        };
        if result.as_ref().is_ok_and(|r| *r == PublishResult::Enqueued) {
            self.available.notify_one();
        }
        result
    }

    /// Forgets an acknowledged task's id, or keeps it for the dedupe window when the task
    /// asks for that; forgets the kept ids whose window has passed.
    /// Forgets the kept ids whose window has passed; the kept ids, locked.
    fn forget_expired(&self) -> MutexGuard<'_, VecDeque<(Instant, TaskId)>> {
        let now = Instant::now();
        let mut kept = self.kept.ids.lock().unwrap_or_else(|e| e.into_inner());
        while kept.front().is_some_and(|(until, _)| *until <= now) {
            if let Some((_, id)) = kept.pop_front() {
                self.known.remove(&id);
            }
        }
        self.kept
            .len
            .store(kept.len(), std::sync::atomic::Ordering::Relaxed);
        kept
    }

    fn settled(&self, task: &Task) {
        use std::sync::atomic::Ordering::Relaxed;
        let keep = task.keeps_id_after_ack();
        if keep || self.kept.len.load(Relaxed) > 0 {
            let now = Instant::now();
            let mut kept = self.forget_expired();
            if keep {
                let window = Duration::from_secs(self.config.dedupe_ttl_secs);
                let ttl = task.kept_for().map_or(window, |t| t.min(window));
                // Kept in order of expiry: a shorter window goes before longer ones.
                let at = kept.partition_point(|(until, _)| *until <= now + ttl);
                kept.insert(at, (now + ttl, task.id.clone()));
            }
            self.kept.len.store(kept.len(), Relaxed);
        }
        if !keep {
            self.known.remove(&task.id);
        }
    }

    fn lease_timeout(&self) -> Duration {
        Duration::from_millis(self.config.lease_timeout_ms)
    }
}

impl TaskQueue for MemoryQueue {
    fn name(&self) -> &str {
        &self.name
    }

    fn publish(&self, task: Task) -> BoxFuture<'_, Result<PublishResult, QueueError>> {
        Box::pin(std::future::ready(self.publish_now(task)))
    }

    fn publish_batch(
        &self,
        tasks: Vec<Task>,
    ) -> BoxFuture<'_, Result<Vec<PublishResult>, QueueError>> {
        let mut results = Vec::with_capacity(tasks.len());
        let half = tasks.len() / 2;
        for (i, task) in tasks.into_iter().enumerate() {
            if i == half {
                if let Err(e) = super::fault("queue.publish_batch") {
                    return Box::pin(std::future::ready(Err(e)));
                }
            }
            match self.publish_now(task) {
                Ok(r) => results.push(r),
                Err(e) => return Box::pin(std::future::ready(Err(e))),
            }
        }
        Box::pin(std::future::ready(Ok(results)))
    }

    fn consume(&self, wait: Duration) -> BoxFuture<'_, Result<Option<Lease>, QueueError>> {
        Box::pin(async move { Ok(self.lease_batch(1, wait).await.pop()) })
    }

    fn consume_batch(
        &self,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<Lease>, QueueError>> {
        Box::pin(async move { Ok(self.lease_batch(max, wait).await) })
    }

    fn ack<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<(), QueueError>> {
        let result = {
            let mut state = self.lock();
            let taken = state.take_lease(lease.receipt);
            if taken.is_ok() {
                state.processed += 1;
            }
            taken
        };
        let result = result.map(|task| self.settled(&task));
        Box::pin(std::future::ready(result))
    }

    fn ack_batch<'a>(&'a self, leases: &'a [Lease]) -> BoxFuture<'a, Result<(), QueueError>> {
        let mut taken = Vec::with_capacity(leases.len());
        let mut result = Ok(());
        {
            let mut state = self.lock();
            for (i, lease) in leases.iter().enumerate() {
                if i == leases.len() / 2 {
                    if let Err(e) = super::fault("queue.ack_batch") {
                        result = Err(e);
                        break;
                    }
                }
                match state.take_lease(lease.receipt) {
                    Ok(task) => {
                        state.processed += 1;
                        taken.push(task);
                    }
                    Err(e) => result = Err(e),
                }
            }
        }
        for task in taken {
            self.settled(&task);
        }
        Box::pin(std::future::ready(result))
    }

    fn nack<'a>(
        &'a self,
        lease: &'a Lease,
        retry_delay: Duration,
        failure: Option<AttemptFailure>,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        let result = {
            let mut state = self.lock();
            state.take_lease(lease.receipt).map(|task| {
                let mut task = Arc::unwrap_or_clone(task);
                if let Some(failure) = failure {
                    task.attempt = task.attempt.saturating_add(1);
                    task.history.push(failure);
                    state.failed += 1;
                }
                let task = Arc::new(task);
                if retry_delay.is_zero() {
                    state.ready.push_back(task);
                } else {
                    let seq = state.seq();
                    state
                        .scheduled
                        .insert((Instant::now() + retry_delay, seq), task);
                }
            })
        };
        if result.is_ok() {
            // Wake a waiter: the task is ready, or its due time may be earlier than the
            // waiter's current sleep.
            self.available.notify_one();
        }
        Box::pin(std::future::ready(result))
    }

    fn dead_letter<'a>(
        &'a self,
        lease: &'a Lease,
        failure: AttemptFailure,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        let result = {
            let mut state = self.lock();
            state.take_lease(lease.receipt).map(|task| {
                let mut task = Arc::unwrap_or_clone(task);
                task.attempt = task.attempt.saturating_add(1);
                task.history.push(failure.clone());
                state.failed += 1;
                let seq = state.seq();
                let id = task.id.to_string();
                state.dead_index.insert(id.clone(), seq);
                state.dead.insert(
                    seq,
                    DeadLetter {
                        id,
                        task,
                        reason: failure.reason,
                        dead_at_unix_ms: now_unix_ms(),
                    },
                );
            })
        };
        Box::pin(std::future::ready(result))
    }

    fn stats(&self) -> BoxFuture<'_, Result<QueueStats, QueueError>> {
        let state = self.lock();
        let stats = QueueStats {
            depth: state.ready.len() as u64,
            scheduled: state.scheduled.len() as u64,
            in_flight: state.in_flight.len() as u64,
            published: state.published,
            processed: state.processed,
            failed: state.failed,
            dead: state.dead.len() as u64,
            ..QueueStats::default()
        };
        Box::pin(std::future::ready(Ok(stats)))
    }

    fn holds<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<bool>, QueueError>> {
        Box::pin(std::future::ready(Ok(Some(self.known.contains(id)))))
    }

    fn dead_letters(&self) -> Option<&dyn DeadLetterStore> {
        Some(self)
    }

    fn inspect(&self, max: usize) -> BoxFuture<'_, Result<Option<Inspection>, QueueError>> {
        let state = self.lock();
        let now = Instant::now();
        let timeout = Duration::from_millis(self.config.lease_timeout_ms);
        let mut leases: Vec<LeaseInfo> = state
            .in_flight
            .values()
            .map(|(task, deadline)| LeaseInfo {
                task: task.id.to_string(),
                kind: Some(task.kind.to_string()),
                consumer: None,
                held_ms: u64::try_from(
                    timeout
                        .saturating_sub(deadline.saturating_duration_since(now))
                        .as_millis(),
                )
                .unwrap_or(u64::MAX),
                deliveries: task.attempt.saturating_add(1),
            })
            .collect();
        leases.sort_by_key(|l| std::cmp::Reverse(l.held_ms));
        leases.truncate(max);
        let retrying = state
            .scheduled
            .values()
            .take(max)
            .map(|t| RetryInfo {
                task: t.id.to_string(),
                kind: t.kind.to_string(),
                history: t.history.clone(),
            })
            .collect();
        let inspection = Inspection {
            leases,
            retrying,
            consumers: Vec::new(),
        };
        Box::pin(std::future::ready(Ok(Some(inspection))))
    }
}

impl DeadLetterStore for MemoryQueue {
    fn list(
        &self,
        cursor: Option<String>,
        limit: usize,
    ) -> BoxFuture<'_, Result<DeadLetterPage, QueueError>> {
        let after = cursor.and_then(|c| c.parse::<u64>().ok()).unwrap_or(0);
        let state = self.lock();
        let mut items: Vec<(u64, DeadLetter)> = state
            .dead
            .range(after + 1..)
            .take(limit.saturating_add(1))
            .map(|(seq, d)| (*seq, d.clone()))
            .collect();
        let next_cursor = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|(seq, _)| seq.to_string())
        } else {
            None
        };
        let page = DeadLetterPage {
            items: items.into_iter().map(|(_, d)| d).collect(),
            next_cursor,
        };
        Box::pin(std::future::ready(Ok(page)))
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<DeadLetter>, QueueError>> {
        let state = self.lock();
        let found = state
            .dead_index
            .get(id)
            .and_then(|seq| state.dead.get(seq))
            .cloned();
        Box::pin(std::future::ready(Ok(found)))
    }

    fn replay<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), QueueError>> {
        let result = {
            let mut state = self.lock();
            match state
                .dead_index
                .remove(id)
                .and_then(|seq| state.dead.remove(&seq))
            {
                Some(mut dead) => {
                    dead.task.replayed_from_dead_letter();
                    state.ready.push_back(Arc::new(dead.task));
                    Ok(())
                }
                None => Err(QueueError::DeadLetterNotFound(id.to_owned())),
            }
        };
        if result.is_ok() {
            self.available.notify_one();
        }
        Box::pin(std::future::ready(result))
    }

    fn replay_all(&self) -> BoxFuture<'_, Result<usize, QueueError>> {
        let count = {
            let mut state = self.lock();
            let dead = std::mem::take(&mut state.dead);
            state.dead_index.clear();
            let count = dead.len();
            for (_, mut d) in dead {
                d.task.replayed_from_dead_letter();
                state.ready.push_back(Arc::new(d.task));
            }
            count
        };
        for _ in 0..count {
            self.available.notify_one();
        }
        Box::pin(std::future::ready(Ok(count)))
    }

    fn purge<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), QueueError>> {
        let result = {
            let mut state = self.lock();
            match state
                .dead_index
                .remove(id)
                .and_then(|seq| state.dead.remove(&seq))
            {
                Some(dead) => Ok(dead.task.id),
                None => Err(QueueError::DeadLetterNotFound(id.to_owned())),
            }
        };
        let result = result.map(|id| self.known.remove(&id));
        Box::pin(std::future::ready(result))
    }
}
