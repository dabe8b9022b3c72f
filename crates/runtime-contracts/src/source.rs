//! Task sources: where work comes from, and where it is completed.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::queue::TaskQueue;
use crate::shutdown::Shutdown;
use crate::task::Task;
use crate::trace::TraceFactory;
use crate::BoxFuture;

/// Errors a source reports.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// An I/O failure reaching what the source reads (a directory, a server).
    #[error("source {source_id}: {message}")]
    Io {
        /// The source's id.
        source_id: String,
        /// What failed.
        message: String,
    },
    /// The task's pointer is not one this source understands.
    #[error("source {source_id}: invalid pointer: {message}")]
    InvalidPointer {
        /// The source's id.
        source_id: String,
        /// What is wrong with it.
        message: String,
    },
    /// The content behind the pointer is larger than the source allows.
    #[error("source {source_id}: content of {size} bytes is above the {limit}-byte limit")]
    TooLarge {
        /// The source's id.
        source_id: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The content behind the pointer is no longer there, for a reason the source knows
    /// (`Ok(None)` from [`TaskSource::load_content`] is the same with [`GoneReason::Deleted`]).
    #[error("source {source_id}: {reason}")]
    Gone {
        /// The source's id.
        source_id: String,
        /// Why it is gone.
        reason: GoneReason,
    },
}

impl SourceError {
    /// Why the content is gone, if this error says it is.
    pub fn gone(&self) -> Option<GoneReason> {
        match self {
            Self::Gone { reason, .. } => Some(*reason),
            _ => None,
        }
    }
}

/// Why the content a task points at is gone: the task is then skipped, never retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum GoneReason {
    /// Deleted (or expunged) since it was published.
    Deleted,
    /// Moved out of the folder the source watches.
    Moved,
    /// The IMAP mailbox's UIDVALIDITY changed: the UID names nothing any more.
    UidValidityChanged,
}

impl GoneReason {
    /// The reason as recorded: `message gone`, `moved` or `uidvalidity changed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deleted => "message gone",
            Self::Moved => "moved",
            Self::UidValidityChanged => "uidvalidity changed",
        }
    }
}

impl fmt::Display for GoneReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Lifecycle state of a source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceState {
    /// Created, not started.
    Idle,
    /// Running and publishing.
    Running,
    /// Running but unable to reach what it reads; retrying.
    Degraded,
    /// Stopped.
    Stopped,
}

/// A snapshot of a source's progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceStatus {
    /// Lifecycle state.
    pub state: SourceState,
    /// Tasks published since start.
    pub published: u64,
    /// Tasks completed since start.
    pub completed: u64,
    /// Tasks published and not yet completed or released.
    pub pending: u64,
    /// Time since the last successful scan, poll or event.
    pub last_event_age: Option<Duration>,
    /// The last error, if the source is degraded.
    pub last_error: Option<String>,
    /// When the source next fires on its own (a schedule's next slot), RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_due: Option<String>,
    /// Its lease, when replicas share what it watches and one of them watches at a time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<SourceLease>,
}

/// A source's lease on what it watches ([`crate::Leases`]), for operators.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceLease {
    /// The leased resource.
    pub resource: String,
    /// Whether this process holds it and watches.
    pub held: bool,
    /// The holder, as last seen: this process's name when it holds the lease.
    pub holder: Option<String>,
    /// The holder's fencing token, as last seen.
    pub token: Option<u64>,
    /// How long this process has held it.
    pub held_for: Option<Duration>,
    /// Times this process took the lease.
    pub acquired: u64,
    /// Publishes the queue refused because this process's lease was no longer current.
    pub fenced_publishes: u64,
}

/// What happened to a task that will not be completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// It was dead-lettered; the source must not publish it again on its own. Told at
    /// least once: right after the dead-lettering, and again at every start for each dead
    /// letter its queue still holds, so a source must treat a repeat as a no-op.
    DeadLettered,
    /// It went back to a queue that outlives this process, or was dropped with an
    /// in-memory queue at shutdown; the source may publish it again after a restart.
    Returned,
}

/// What a source did with a changed configuration ([`TaskSource::reconfigure`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reconfigure {
    /// In effect now, while the source runs.
    Applied,
    /// Taken, and in effect once the source is started again: the runtime stops the
    /// running source and starts it through the same supervised path that first started it.
    Restart,
    /// Not taken: the source runs on as before, and the reason says why (the change needs
    /// a process restart).
    Refused(String),
}

/// Tells a source whether the pool behind its queue can take more work.
pub trait Backpressure: Send + Sync {
    /// Resolves once in-flight plus queued work is below the pool's high watermark.
    /// Cancel safe.
    fn wait_for_capacity(&self) -> BoxFuture<'_, ()>;
}

/// Asks the sources of this process to look for work now: a notification that says that
/// something changed without saying what (a Dovecot push without a UID) wakes the source
/// that reads it.
pub trait SourceWaker: Send + Sync {
    /// Wakes the source `id` ([`TaskSource::wake`]); false when there is none.
    fn wake(&self, id: &str) -> bool;
}

/// A [`SourceWaker`] that knows no source (for a source started outside a runtime).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoSources;

impl SourceWaker for NoSources {
    fn wake(&self, _id: &str) -> bool {
        false
    }
}

/// What the runtime hands a source when it starts it.
#[derive(Clone)]
pub struct SourceContext {
    /// The queue to publish to.
    pub queue: Arc<dyn TaskQueue>,
    /// Fires when the source must stop.
    pub shutdown: Shutdown,
    /// The pool's backpressure: wait for capacity before fetching more.
    pub backpressure: Arc<dyn Backpressure>,
    /// Writes trace context into the headers of published tasks.
    pub tracer: Arc<dyn TraceFactory>,
    /// The other sources of the process, to wake.
    pub sources: Arc<dyn SourceWaker>,
}

impl fmt::Debug for SourceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceContext")
            .field("queue", &self.queue.name())
            .field("shutdown", &self.shutdown.is_cancelled())
            .finish_non_exhaustive()
    }
}

/// A source of tasks: a mailbox, a directory, a webhook, a schedule.
///
/// Rules:
/// - `start` is called once by the runtime; its future *is* the running source: it scans or
///   listens, publishes pointer tasks, and returns when `ctx.shutdown` fires. It returns an
///   error only when it cannot run at all; transient failures are retried inside with
///   backoff and shown in `status`. Stopping is cancelling `ctx.shutdown` and awaiting.
/// - Publishing: one task per unit of work, never again while that task is pending, in
///   flight or dead-lettered. Before fetching more, the source waits on `ctx.backpressure`.
///   If publishing fails, the work stays where it is (mail stays unread).
/// - `complete` is called by a worker only after the handler succeeded (the outcome is
///   committed). It performs the source-side action (for mail: set `\Seen`), must be
///   idempotent, and if it fails the runtime retries the task; the handler then sees its
///   own earlier result.
/// - `load_content` is called by handlers through their context to read what a pointer
///   points at; `Ok(None)` means it is gone.
/// - Batches: `load_batch` and `complete_batch` do the same for several tasks at once and
///   answer one result per task, in order: one task's failure (gone, too large, a refused
///   store) never fails the others. A source that can serve a batch for the price of one
///   round trip (IMAP: one `UID FETCH` / `UID STORE` of a UID set) overrides them; the
///   defaults call `load_content` and `complete` one task after another. `complete_batch`
///   is called only with tasks whose outcomes are committed, like `complete`.
/// - `release` is called when a task will not be completed (dead-lettered or returned).
/// - `reconfigure` takes a changed configuration of the source while it runs (a reload).
///   `start` may be called again after it returned (the runtime restarts a source whose
///   start failed, whose task panicked, or that asked for a restart to apply a change), so
///   a source keeps what must outlive one run (its counts, what it published) outside it.
/// - `unsettled` lists the work the source still holds unfinished, for the runtime's
///   reconciliation sweep (none by default).
///
/// ```
/// use runtime_contracts::*;
/// struct Empty;
/// impl TaskSource for Empty {
///     fn id(&self) -> &str { "empty" }
///     fn start(&self, ctx: SourceContext) -> BoxFuture<'_, Result<(), SourceError>> {
///         Box::pin(async move { ctx.shutdown.cancelled().await; Ok(()) })
///     }
///     fn status(&self) -> SourceStatus {
///         SourceStatus { state: SourceState::Idle, published: 0, completed: 0, pending: 0,
///                        last_event_age: None, last_error: None, next_due: None,
///                        lease: None }
///     }
///     fn load_content<'a>(&'a self, _t: &'a Task) -> BoxFuture<'a, Result<Option<Vec<u8>>, SourceError>> {
///         Box::pin(async { Ok(None) })
///     }
///     fn complete<'a>(&'a self, _t: &'a Task) -> BoxFuture<'a, Result<(), SourceError>> {
///         Box::pin(async { Ok(()) })
///     }
/// }
/// ```
pub trait TaskSource: Send + Sync {
    /// The source's id, unique within the runtime; tasks carry it in [`Task::source`].
    fn id(&self) -> &str;

    /// Runs the source until `ctx.shutdown` fires.
    fn start(&self, ctx: SourceContext) -> BoxFuture<'_, Result<(), SourceError>>;

    /// A snapshot of its progress.
    fn status(&self) -> SourceStatus;

    /// Reads the content the task points at; `Ok(None)` if it is gone (deleted), or
    /// [`SourceError::Gone`] when the source knows another reason.
    fn load_content<'a>(
        &'a self,
        task: &'a Task,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, SourceError>>;

    /// The source-side completion, after the handler succeeded.
    fn complete<'a>(&'a self, task: &'a Task) -> BoxFuture<'a, Result<(), SourceError>>;

    /// Reads the content of several tasks: one result per task, in order, each as
    /// `load_content` would answer it. Not cancel safe in general (a source may have a
    /// round trip on the wire); dropping it loses nothing but the read. The default reads
    /// one task after another.
    fn load_batch<'a>(
        &'a self,
        tasks: &'a [Arc<Task>],
    ) -> BoxFuture<'a, Vec<Result<Option<Vec<u8>>, SourceError>>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(tasks.len());
            for task in tasks {
                out.push(self.load_content(task).await);
            }
            out
        })
    }

    /// Completes several tasks whose outcomes are committed: one result per task, in order,
    /// each as `complete` would answer it. Must be idempotent, like `complete`. The default
    /// completes one task after another.
    fn complete_batch<'a>(
        &'a self,
        tasks: &'a [Arc<Task>],
    ) -> BoxFuture<'a, Vec<Result<(), SourceError>>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(tasks.len());
            for task in tasks {
                out.push(self.complete(task).await);
            }
            out
        })
    }

    /// Whether what the source reads can be reached now (for IMAP: a `NOOP` on a session),
    /// with why not. The runtime asks when one of the source's tasks failed: while it
    /// answers `Err`, the failure is the server's, not the task's, so the attempt is not
    /// counted and the pool waits. Must answer within a few seconds. The default answers
    /// `Ok`.
    fn reachable(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }

    /// Asked to look for work now rather than at its next scan (another source was told
    /// that something changed here; see [`SourceWaker`]). Never blocks. The default does
    /// nothing: the next scan finds the work.
    fn wake(&self) {}

    /// Takes the source's changed configuration (its whole section, `type` included, already
    /// validated) while it runs: [`Reconfigure::Applied`] when it is in effect now,
    /// [`Reconfigure::Restart`] when it is taken and needs the source started again, or
    /// [`Reconfigure::Refused`] with the reason. Must never claim a change it does not
    /// apply. The default refuses every change.
    fn reconfigure(&self, section: &serde_json::Value) -> Reconfigure {
        let _ = section;
        Reconfigure::Refused(format!(
            "source {} cannot change its settings while it runs",
            self.id()
        ))
    }

    /// Tells the source a task will not be completed. The default does nothing.
    fn release(&self, task: &Task, disposition: Disposition) {
        let _ = (task, disposition);
    }

    /// The work this source still holds unfinished (unread mail, not marked failed) that
    /// arrived at least `older_than` ago, at most `max` items, each as the task the source
    /// publishes for it. A reconciliation sweep publishes again those no queue holds (work
    /// whose task was lost). The default: none (a webhook or a schedule holds no work).
    fn unsettled(
        &self,
        older_than: Duration,
        max: usize,
    ) -> BoxFuture<'_, Result<Vec<Task>, SourceError>> {
        let _ = (older_than, max);
        Box::pin(std::future::ready(Ok(Vec::new())))
    }
}
