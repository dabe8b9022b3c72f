//! Workers: the loops a pool runs.

use crate::shutdown::Shutdown;
use crate::BoxFuture;

/// Why a worker loop ended on its own.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// The loop hit a failure it cannot continue past (e.g. its queue is gone).
    #[error("worker failed: {0}")]
    Failed(String),
}

/// What the supervisor hands a worker.
#[derive(Clone)]
pub struct WorkerContext {
    /// Index of this worker within its pool.
    pub index: usize,
    /// Fires when the worker must stop taking new work.
    pub stop_consuming: Shutdown,
    /// Fires when in-flight work must be abandoned (the shutdown deadline passed).
    pub abandon_in_flight: Shutdown,
}

impl std::fmt::Debug for WorkerContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerContext")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

/// One concurrent loop of a pool: consume, handle, complete, settle.
///
/// Rules:
/// - The supervisor starts `concurrency` copies of `run` per pool. If `run` returns an error
///   or panics before `stop_consuming` fired, the supervisor starts it again after a backoff.
/// - When `stop_consuming` fires, the worker takes no new lease and returns once its
///   current task is settled. When `abandon_in_flight` fires, it gives the current task back
///   to the queue without counting an attempt and returns.
/// - Handler panics and timeouts are the worker's to catch; they count as failed attempts.
///
/// ```
/// use runtime_contracts::{BoxFuture, Worker, WorkerContext, WorkerError};
/// struct Idle;
/// impl Worker for Idle {
///     fn run(&self, ctx: WorkerContext) -> BoxFuture<'_, Result<(), WorkerError>> {
///         Box::pin(async move { ctx.stop_consuming.cancelled().await; Ok(()) })
///     }
/// }
/// ```
pub trait Worker: Send + Sync {
    /// Runs the loop until told to stop.
    fn run(&self, ctx: WorkerContext) -> BoxFuture<'_, Result<(), WorkerError>>;
}
