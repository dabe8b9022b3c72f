//! Business handlers: the only place where an application's logic runs.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::source::{SourceError, TaskSource};
use crate::task::{AttemptFailure, Task};
use crate::trace::{SpanGuard, StageTracer};
use crate::BoxFuture;

/// A recorded business outcome: the handler finished, and what happened is written down
/// (an order was created, the sender is unknown, ...). Every outcome is a *success* for the
/// runtime: the source completes the task (for mail: `\Seen`) and the queue acknowledges it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Short machine-readable name, e.g. `created` or `unknown_client`.
    pub kind: Cow<'static, str>,
    /// Optional human-readable detail.
    pub detail: Option<String>,
}

impl Outcome {
    /// An outcome with no detail.
    pub fn new(kind: impl Into<Cow<'static, str>>) -> Self {
        Self {
            kind: kind.into(),
            detail: None,
        }
    }

    /// Adds a human-readable detail.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

/// Why a handler did not produce an outcome. The variant is the retry intent: the runtime,
/// not the handler, decides when to try again, using the pool's retry policy.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandlerError {
    /// A transient failure (database busy, content not readable yet). The runtime retries
    /// after `after` if given, else after its backoff, until the pool's `max_attempts`.
    #[error("retriable failure: {reason}")]
    Retry {
        /// Why the attempt failed.
        reason: String,
        /// A delay the handler asks for, overriding the backoff for this attempt.
        after: Option<Duration>,
    },
    /// A failure that no retry can fix: the task is dead-lettered at once.
    #[error("permanent failure: {0}")]
    Permanent(String),
}

impl HandlerError {
    /// A retriable failure that lets the runtime choose the delay.
    pub fn retry(reason: impl Into<String>) -> Self {
        Self::Retry {
            reason: reason.into(),
            after: None,
        }
    }
}

/// What a handler can reach besides its task: the content behind the task's pointer.
#[derive(Clone)]
pub struct HandlerContext {
    source: Arc<dyn TaskSource>,
    stages: Option<Arc<dyn StageTracer>>,
}

impl fmt::Debug for HandlerContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerContext")
            .field("source", &self.source.id())
            .finish()
    }
}

impl HandlerContext {
    /// A context whose content comes from `source`, the source that published the task.
    pub fn new(source: Arc<dyn TaskSource>) -> Self {
        Self {
            source,
            stages: None,
        }
    }

    /// The same context whose [`HandlerContext::stage`] spans go to `stages`.
    pub fn with_stages(mut self, stages: Arc<dyn StageTracer>) -> Self {
        self.stages = Some(stages);
        self
    }

    /// Opens a span named `name` in the trace of every task this context was given (the
    /// one task of [`TaskHandler::handle`], or the whole batch of
    /// [`TaskHandler::handle_batch`]); it ends when the guard drops.
    pub fn stage(&self, name: &'static str) -> SpanGuard {
        self.stages
            .as_ref()
            .map_or_else(SpanGuard::none, |s| s.stage(None, name))
    }

    /// Opens a span named `name` in the trace of each of `tasks` (a handler that passes
    /// part of its batch on names that part).
    pub fn batch_stage(&self, tasks: &[Arc<Task>], name: &'static str) -> SpanGuard {
        self.stages
            .as_ref()
            .map_or_else(SpanGuard::none, |s| s.stage(Some(tasks), name))
    }

    /// Opens a span named `name` in the trace of `task` alone.
    pub fn task_stage(&self, task: &Task, name: &'static str) -> SpanGuard {
        self.stages
            .as_ref()
            .map_or_else(SpanGuard::none, |s| s.task_stage(&task.id, name))
    }

    /// Loads the bytes the task points at from its source; `Ok(None)` when the thing
    /// pointed at was deleted since it was published, [`SourceError::Gone`] when it is
    /// gone for another reason the source knows (moved, UIDVALIDITY changed).
    pub async fn load_content(&self, task: &Task) -> Result<Option<Vec<u8>>, SourceError> {
        self.source.load_content(task).await
    }

    /// Loads the bytes of several tasks from their source, one result per task, in order
    /// (one round trip where the source can: [`TaskSource::load_batch`]).
    pub async fn load_batch(
        &self,
        tasks: &[Arc<Task>],
    ) -> Vec<Result<Option<Vec<u8>>, SourceError>> {
        self.source.load_batch(tasks).await
    }
}

/// Handles tasks of one kind.
///
/// Rules:
/// - Called by a worker of the pool the handler is registered on, once per delivery, possibly
///   concurrently for different tasks and, after a crash or a race between processes, more
///   than once for the same task: a handler must be idempotent (the mail bot relies on a
///   unique key in its database).
/// - Returns `Ok(Outcome)` when the result is recorded; only then does the source complete
///   the task (for mail: set `\Seen`) and the queue acknowledge it.
/// - Never retries by itself: it returns [`HandlerError::Retry`] or
///   [`HandlerError::Permanent`] and the runtime applies the pool's policy.
/// - Cancellation: the future may be dropped at an `.await` when the pool's handler timeout
///   expires or the shutdown deadline passes; the task then goes back to the queue. Work
///   must therefore be committed atomically (one transaction), never half-way.
/// - A panic is caught at the worker boundary and recorded as a failed attempt.
/// - Batches: when a worker leased several first deliveries of one kind from one source,
///   it calls `handle_batch` with all of them and expects one result per task, in order.
///   Each result counts for its own task alone: an `Err` retries or dead-letters that task
///   only, and the others are completed at once. A handler that can commit a batch's work
///   in one transaction (group commit) overrides it; each task must still get its own
///   record, as if handled alone. If the batch call panics or exceeds the pool's handler
///   timeout, the worker handles each of its tasks again alone with `handle` (work it had
///   committed is then found again: idempotence). Retries are always handled alone. The
///   default calls `handle` for one task after another.
///
/// ```
/// use runtime_contracts::{BoxFuture, HandlerContext, HandlerError, Outcome, Task, TaskHandler};
/// struct Echo;
/// impl TaskHandler for Echo {
///     fn handle<'a>(&'a self, task: &'a Task, _ctx: &'a HandlerContext)
///         -> BoxFuture<'a, Result<Outcome, HandlerError>> {
///         Box::pin(async move {
///             if task.payload.is_null() {
///                 return Err(HandlerError::Permanent("empty pointer".into()));
///             }
///             Ok(Outcome::new("echoed"))
///         })
///     }
/// }
/// ```
pub trait TaskHandler: Send + Sync {
    /// Handles one delivery of `task`.
    fn handle<'a>(
        &'a self,
        task: &'a Task,
        ctx: &'a HandlerContext,
    ) -> BoxFuture<'a, Result<Outcome, HandlerError>>;

    /// Handles one delivery each of several tasks of this handler's kind from one source:
    /// one result per task, in order (see the rules above). Cancellation as for `handle`.
    fn handle_batch<'a>(
        &'a self,
        tasks: &'a [Arc<Task>],
        ctx: &'a HandlerContext,
    ) -> BoxFuture<'a, Vec<Result<Outcome, HandlerError>>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(tasks.len());
            for task in tasks {
                out.push(self.handle(task, ctx).await);
            }
            out
        })
    }

    /// Called once when the runtime dead-letters `task`, so the application can record the
    /// failure where its users look (the bot writes a `failed` outcome). Must not fail:
    /// problems are logged. The default does nothing.
    fn on_dead_letter<'a>(
        &'a self,
        task: &'a Task,
        ctx: &'a HandlerContext,
        failure: &'a AttemptFailure,
    ) -> BoxFuture<'a, ()> {
        let _ = (task, ctx, failure);
        Box::pin(async {})
    }
}
