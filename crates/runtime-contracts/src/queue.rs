//! Task queues: where published tasks wait for a worker.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::task::{AttemptFailure, Task};
use crate::BoxFuture;

/// Errors a queue reports.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    /// The queue is at capacity; the publisher should leave its work where it is and try later.
    #[error("queue {queue} is full ({capacity} tasks)")]
    Full {
        /// Queue name.
        queue: String,
        /// Its capacity.
        capacity: usize,
    },
    /// The lease is unknown: it expired and was handed to another consumer, or was settled.
    #[error("lease {0} is unknown or expired")]
    UnknownLease(u64),
    /// The queue's backend is unavailable.
    #[error("queue backend unavailable: {0}")]
    Unavailable(String),
    /// A dead letter with this id does not exist.
    #[error("dead letter {0} not found")]
    DeadLetterNotFound(String),
    /// The task was published under a lease that is no longer the current one
    /// ([`Task::fenced`]): nothing was added, and the publisher must step down.
    #[error("publish refused: fencing token {token} of {resource} is older than {current}")]
    Fenced {
        /// The leased resource.
        resource: String,
        /// The task's token.
        token: u64,
        /// The resource's current token.
        current: u64,
    },
}

/// Who holds a lease ([`Leases::holder`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseHolder {
    /// The holder's name (host and process).
    pub owner: String,
    /// Its fencing token.
    pub token: u64,
    /// Time left before the lease expires unless renewed.
    pub expires_in: Duration,
}

/// Leases on named resources across processes, for work that only one replica may do at a
/// time (watching a mailbox), with fencing tokens: every new lease on a resource gets a
/// larger token than any before it, and the queue that hands out the leases refuses a
/// task published under an older one ([`Task::fenced`], [`QueueError::Fenced`]).
///
/// A lease expires after its time to live unless renewed; its holder renews it well
/// before, and stops the leased work when a renewal fails or a publish is fenced.
pub trait Leases: Send + Sync {
    /// Takes the lease on `resource` for `owner` if nobody holds it: its new token, or
    /// `None` when another holder has it.
    fn acquire<'a>(
        &'a self,
        resource: &'a str,
        owner: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<u64>, QueueError>>;

    /// Extends the lease while `owner` still holds it with `token`: `false` when it was
    /// lost (expired, taken by another).
    fn renew<'a>(
        &'a self,
        resource: &'a str,
        owner: &'a str,
        token: u64,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, QueueError>>;

    /// Gives the lease up if `owner` still holds it with `token`.
    fn release<'a>(
        &'a self,
        resource: &'a str,
        owner: &'a str,
        token: u64,
    ) -> BoxFuture<'a, Result<(), QueueError>>;

    /// Who holds the lease now, if anyone.
    fn holder<'a>(
        &'a self,
        resource: &'a str,
    ) -> BoxFuture<'a, Result<Option<LeaseHolder>, QueueError>>;
}

/// What `publish` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublishResult {
    /// The task was enqueued.
    Enqueued,
    /// A task with the same id is already pending, in flight, scheduled or dead: nothing was added.
    AlreadyKnown,
}

/// A consumed task, held exclusively by one consumer until it is settled with `ack`, `nack`
/// or `dead_letter`, or until the lease expires and the task becomes visible again.
#[derive(Clone, Debug)]
pub struct Lease {
    /// The task, with `attempt` and `history` as of this delivery; shared with the queue's
    /// in-flight record rather than copied.
    pub task: Arc<Task>,
    /// Opaque number that identifies this delivery to the queue that issued it (a queue
    /// keeps whatever else it needs, such as a stream entry id, under this number).
    pub receipt: u64,
}

/// Counters and gauges of one queue.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStats {
    /// Tasks ready to be consumed.
    pub depth: u64,
    /// Tasks waiting for their retry delay.
    pub scheduled: u64,
    /// Tasks leased and not yet settled.
    pub in_flight: u64,
    /// Tasks accepted by `publish` since start.
    pub published: u64,
    /// Tasks acknowledged since start.
    pub processed: u64,
    /// Failed attempts (nacks with a failure) since start.
    pub failed: u64,
    /// Tasks in the dead-letter store now.
    pub dead: u64,
    /// Entries not yet delivered to the consumer group, for queues that know it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<u64>,
    /// Age of the oldest task leased and not settled, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_pending_age_ms: Option<u64>,
}

/// A queue of tasks with lease semantics.
///
/// Rules:
/// - Sources call `publish`; workers call `consume` and then exactly one of `ack`, `nack` or
///   `dead_letter` for each lease. The runtime's retry policy decides between them; the
///   queue never decides to retry on its own, except that an expired lease makes its task
///   visible again (a worker died without settling).
/// - `publish` is idempotent by task id: a task whose id is pending, in flight, scheduled or
///   dead is not added twice ([`PublishResult::AlreadyKnown`]). A task marked with
///   [`Task::keep_id_after_ack`] is also refused after its ack, for the queue's dedupe window.
/// - `consume` is cancel safe: if its future is dropped, no task is leased.
/// - `nack(lease, delay, Some(failure))` counts a failed attempt; `nack(lease, delay, None)`
///   returns the task untouched (shutdown), without counting an attempt.
///
/// ```
/// # use std::time::Duration;
/// use std::sync::Arc;
/// use runtime_contracts::{Lease, QueueError, Task, TaskQueue};
/// async fn drain_one(queue: &dyn TaskQueue) -> Result<Option<Arc<Task>>, QueueError> {
///     let Some(lease) = queue.consume(Duration::from_millis(10)).await? else { return Ok(None) };
///     queue.ack(&lease).await?;
///     Ok(Some(lease.task))
/// }
/// ```
pub trait TaskQueue: Send + Sync {
    /// The queue's name.
    fn name(&self) -> &str;

    /// The messaging system behind it, as OpenTelemetry's `messaging.system` names it
    /// (`redis`, `rabbitmq`; `plba` for an in-process queue).
    fn system(&self) -> &'static str {
        "plba"
    }

    /// Adds a task. Errors leave nothing half-published; the source keeps its work unread.
    fn publish(&self, task: Task) -> BoxFuture<'_, Result<PublishResult, QueueError>>;

    /// Adds several tasks, each as `publish` would, with one round trip where the queue
    /// can; returns one result per task, in order. An error means none or only some were
    /// added: publishing is idempotent, so the caller simply publishes them all again later.
    fn publish_batch(
        &self,
        tasks: Vec<Task>,
    ) -> BoxFuture<'_, Result<Vec<PublishResult>, QueueError>> {
        Box::pin(async move {
            let mut results = Vec::with_capacity(tasks.len());
            for task in tasks {
                results.push(self.publish(task).await?);
            }
            Ok(results)
        })
    }

    /// Leases the next visible task, waiting up to `wait` for one. Cancel safe.
    fn consume(&self, wait: Duration) -> BoxFuture<'_, Result<Option<Lease>, QueueError>>;

    /// Leases up to `max` visible tasks at once, waiting up to `wait` for the first one;
    /// an empty vector when none came. Cancel safe. Queues that can hand out several
    /// tasks for the price of one round trip (one lock, one `XREADGROUP`) override it; the
    /// default takes one.
    fn consume_batch(
        &self,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<Lease>, QueueError>> {
        let _ = max;
        Box::pin(async move { Ok(self.consume(wait).await?.into_iter().collect()) })
    }

    /// Settles a lease as done: the task is removed.
    fn ack<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<(), QueueError>>;

    /// Settles several leases as done. Queues with a round trip per command override it to
    /// send them together; the default acknowledges one after another.
    fn ack_batch<'a>(&'a self, leases: &'a [Lease]) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            for lease in leases {
                self.ack(lease).await?;
            }
            Ok(())
        })
    }

    /// Settles a lease as not done: the task becomes visible again after `retry_delay`.
    /// With a failure, the attempt is counted and appended to the task's history.
    fn nack<'a>(
        &'a self,
        lease: &'a Lease,
        retry_delay: Duration,
        failure: Option<AttemptFailure>,
    ) -> BoxFuture<'a, Result<(), QueueError>>;

    /// Settles a lease as given up: the task, with `failure` appended to its history, moves
    /// to the dead letters, where it stays until replayed or purged.
    fn dead_letter<'a>(
        &'a self,
        lease: &'a Lease,
        failure: AttemptFailure,
    ) -> BoxFuture<'a, Result<(), QueueError>>;

    /// Current counters.
    fn stats(&self) -> BoxFuture<'_, Result<QueueStats, QueueError>>;

    /// The dead-letter capability, for queues that offer listing, replay and purge.
    fn dead_letters(&self) -> Option<&dyn DeadLetterStore> {
        None
    }

    /// Leases with fencing tokens, for queues shared by several processes (Redis); `None`
    /// for a queue that one process owns, where there is nobody to share work with.
    fn leases(&self) -> Option<&dyn Leases> {
        None
    }

    /// What the queue holds right now, for diagnostics: its oldest leases, the tasks
    /// waiting for a retry, and its consumers, at most `max` of each. `None` when the
    /// queue cannot show them (the default).
    fn inspect(&self, max: usize) -> BoxFuture<'_, Result<Option<Inspection>, QueueError>> {
        let _ = max;
        Box::pin(std::future::ready(Ok(None)))
    }

    /// Whether the queue holds a task with this id (ready, in flight, scheduled or dead),
    /// or still remembers it ([`Task::keep_id_after_ack`]); `None` when it cannot tell
    /// (the default), and then a reconciliation sweep leaves the id alone.
    fn holds<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<bool>, QueueError>> {
        let _ = id;
        Box::pin(std::future::ready(Ok(None)))
    }
}

/// A snapshot of a queue's leases, retries and consumers ([`TaskQueue::inspect`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inspection {
    /// Leased tasks not yet settled, longest held first.
    pub leases: Vec<LeaseInfo>,
    /// Tasks waiting for their retry delay, with their failures so far.
    pub retrying: Vec<RetryInfo>,
    /// Consumers of the queue (a Redis group's members); empty when it has no such notion.
    pub consumers: Vec<ConsumerInfo>,
}

/// One lease of an [`Inspection`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    /// The task.
    pub task: String,
    /// Its kind, when the queue could read it.
    pub kind: Option<String>,
    /// The consumer holding it, when known.
    pub consumer: Option<String>,
    /// How long it has been held, in milliseconds.
    pub held_ms: u64,
    /// Times it has been delivered, this delivery included.
    pub deliveries: u32,
}

/// One task of an [`Inspection`] waiting for its retry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryInfo {
    /// The task.
    pub task: String,
    /// Its kind.
    pub kind: String,
    /// Its failed attempts, oldest first.
    pub history: Vec<crate::task::AttemptFailure>,
}

/// One consumer of an [`Inspection`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerInfo {
    /// Its name.
    pub name: String,
    /// Entries it holds.
    pub pending: u64,
    /// Time since it last read or acknowledged, in milliseconds.
    pub idle_ms: u64,
}

/// A dead-lettered task and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Id of the dead letter (the task id).
    pub id: String,
    /// The task, with its full attempt history.
    pub task: Task,
    /// The reason it was given up (the last failure).
    pub reason: String,
    /// When, milliseconds since the Unix epoch.
    pub dead_at_unix_ms: u64,
}

/// One page of dead letters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetterPage {
    /// The dead letters of this page, oldest first.
    pub items: Vec<DeadLetter>,
    /// Cursor of the next page, if there is one.
    pub next_cursor: Option<String>,
}

/// Operator access to a queue's dead letters: list, replay, purge.
///
/// Replay puts a task back on the queue with its attempt counter reset (its history is
/// kept), so a fixed fault gets a full set of attempts. Called by operators through the
/// control plane or CLI, never by workers.
///
/// ```
/// use runtime_contracts::{DeadLetterStore, QueueError};
/// async fn replay_everything(store: &dyn DeadLetterStore) -> Result<usize, QueueError> {
///     store.replay_all().await
/// }
/// ```
pub trait DeadLetterStore: Send + Sync {
    /// Lists up to `limit` dead letters after `cursor`.
    fn list(
        &self,
        cursor: Option<String>,
        limit: usize,
    ) -> BoxFuture<'_, Result<DeadLetterPage, QueueError>>;
    /// One dead letter with its full attempt history. The default walks the list.
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<DeadLetter>, QueueError>> {
        Box::pin(async move {
            let mut cursor = None;
            loop {
                let page = self.list(cursor, 256).await?;
                if let Some(found) = page.items.into_iter().find(|d| d.id == id) {
                    return Ok(Some(found));
                }
                match page.next_cursor {
                    Some(next) => cursor = Some(next),
                    None => return Ok(None),
                }
            }
        })
    }
    /// Puts one dead letter back on the queue.
    fn replay<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), QueueError>>;
    /// Puts every dead letter back on the queue; returns how many.
    fn replay_all(&self) -> BoxFuture<'_, Result<usize, QueueError>>;
    /// Deletes one dead letter for good.
    fn purge<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), QueueError>>;
}
