//! Worker pools: how many workers consume each queue, and what happens when one fails.

mod pool_worker;

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::FutureExt;
use runtime_contracts::{TaskHandler, TaskQueue, TaskSource, Worker, WorkerContext};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::PoolConfig;
use crate::shutdown::TokenSignal;
use crate::trace::TraceService;

pub use pool_worker::PoolWorker;

/// Counters of one pool, shared by its workers.
#[derive(Debug, Default)]
pub struct PoolCounters {
    pub(crate) busy: AtomicU64,
    pub(crate) processed: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) returned: AtomicU64,
    pub(crate) restarts: AtomicU64,
}

/// A snapshot of one pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStatus {
    /// Pool name (also its queue's name).
    pub name: String,
    /// Configured workers.
    pub workers: usize,
    /// Workers handling a task now.
    pub busy: u64,
    /// Workers waiting for a task.
    pub idle: u64,
    /// Tasks that ended with an outcome.
    pub processed: u64,
    /// Failed attempts (errors, timeouts, panics).
    pub failed: u64,
    /// Failed attempts that were scheduled again.
    pub retried: u64,
    /// Tasks given up and dead-lettered.
    pub dead_lettered: u64,
    /// Tasks given back to the queue at shutdown.
    pub returned: u64,
    /// Worker loops restarted after dying.
    pub restarts: u64,
}

/// What one pool is made of.
pub struct PoolSpec {
    /// Pool name; it consumes the queue of the same name.
    pub name: String,
    /// Its settings.
    pub config: PoolConfig,
    /// Its queue.
    pub queue: Arc<dyn TaskQueue>,
    /// Handlers by task kind.
    pub handlers: HashMap<String, Arc<dyn TaskHandler>>,
    /// Sources by id, to complete and release tasks.
    pub sources: HashMap<String, Arc<dyn TaskSource>>,
}

impl std::fmt::Debug for PoolSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolSpec")
            .field("name", &self.name)
            .field("handlers", &self.handlers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

struct RunningPool {
    name: String,
    config: Arc<RwLock<PoolConfig>>,
    counters: Arc<PoolCounters>,
}

/// Runs named pools of workers. Each pool has its own concurrency, handler timeout and
/// retry policy. A worker loop that dies (returns or panics before it was told to stop) is
/// started again after a short backoff; a handler panic never reaches it (the worker catches
/// it and records a failed attempt).
pub struct WorkerSupervisor {
    tracker: TaskTracker,
    stop_consuming: CancellationToken,
    abandon_in_flight: CancellationToken,
    pools: Vec<RunningPool>,
}

impl std::fmt::Debug for WorkerSupervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerSupervisor")
            .field(
                "pools",
                &self.pools.iter().map(|p| &p.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Default for WorkerSupervisor {
    fn default() -> Self {
        Self::new()
    }
}

impl WorkerSupervisor {
    /// A supervisor with no pools.
    pub fn new() -> Self {
        Self {
            tracker: TaskTracker::new(),
            stop_consuming: CancellationToken::new(),
            abandon_in_flight: CancellationToken::new(),
            pools: Vec::new(),
        }
    }

    /// Starts a pool of [`PoolWorker`]s. Must be called inside a tokio runtime.
    pub fn start_pool(&mut self, spec: PoolSpec, trace: TraceService) {
        let counters = Arc::new(PoolCounters::default());
        let config = Arc::new(RwLock::new(spec.config.clone()));
        let worker = Arc::new(PoolWorker::new(
            spec,
            Arc::clone(&config),
            Arc::clone(&counters),
            trace,
            (self.stop_consuming.clone(), self.abandon_in_flight.clone()),
        ));
        let workers = worker.concurrency();
        let name = worker.pool_name().to_owned();
        self.start_workers(&name, worker, workers, Arc::clone(&counters));
        self.pools.push(RunningPool {
            name,
            config,
            counters,
        });
    }

    /// Starts `count` copies of any [`Worker`] under supervision, counted under `pool`.
    pub fn start_workers(
        &self,
        pool: &str,
        worker: Arc<dyn Worker>,
        count: usize,
        counters: Arc<PoolCounters>,
    ) {
        for index in 0..count {
            let ctx = WorkerContext {
                index,
                stop_consuming: Arc::new(TokenSignal(self.stop_consuming.clone())),
                abandon_in_flight: Arc::new(TokenSignal(self.abandon_in_flight.clone())),
            };
            let stop = self.stop_consuming.clone();
            let worker = Arc::clone(&worker);
            let counters = Arc::clone(&counters);
            let pool = pool.to_owned();
            self.tracker.spawn(async move {
                supervise(pool, worker, ctx, stop, counters).await;
            });
        }
    }

    /// A snapshot of every pool.
    pub fn status(&self) -> Vec<PoolStatus> {
        self.pools
            .iter()
            .map(|p| {
                let c = &p.counters;
                let workers = p.config.read().map(|c| c.workers).unwrap_or_default();
                let busy = c.busy.load(Ordering::Relaxed);
                PoolStatus {
                    name: p.name.clone(),
                    workers,
                    busy,
                    idle: (workers as u64).saturating_sub(busy),
                    processed: c.processed.load(Ordering::Relaxed),
                    failed: c.failed.load(Ordering::Relaxed),
                    retried: c.retried.load(Ordering::Relaxed),
                    dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
                    returned: c.returned.load(Ordering::Relaxed),
                    restarts: c.restarts.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// Replaces the retry policy, timeout and attempt limit of a pool at run time (the
    /// worker count needs a restart).
    pub fn update_pool(&self, name: &str, config: PoolConfig) -> bool {
        let Some(pool) = self.pools.iter().find(|p| p.name == name) else {
            return false;
        };
        if let Ok(mut current) = pool.config.write() {
            let workers = current.workers;
            *current = PoolConfig { workers, ..config };
        }
        true
    }

    /// Stops taking new work, waits up to `deadline` for in-flight tasks to settle, then
    /// gives what is left back to its queues. Returns whether everything finished in time.
    pub async fn shutdown(&self, deadline: Duration) -> bool {
        self.stop_consuming.cancel();
        self.tracker.close();
        if tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_ok()
        {
            return true;
        }
        self.abandon_in_flight.cancel();
        self.tracker.wait().await;
        false
    }
}

async fn supervise(
    pool: String,
    worker: Arc<dyn Worker>,
    ctx: WorkerContext,
    stop: CancellationToken,
    counters: Arc<PoolCounters>,
) {
    let mut consecutive = 0u32;
    loop {
        let outcome = AssertUnwindSafe(worker.run(ctx.clone()))
            .catch_unwind()
            .await;
        if stop.is_cancelled() {
            return;
        }
        let why = match outcome {
            Ok(Ok(())) => "returned before shutdown".to_owned(),
            Ok(Err(e)) => e.to_string(),
            Err(panic) => format!("panicked: {}", panic_message(&*panic)),
        };
        counters.restarts.fetch_add(1, Ordering::Relaxed);
        consecutive = consecutive.saturating_add(1);
        let backoff = Duration::from_millis(50u64 << consecutive.min(6));
        tracing::error!(pool, worker = ctx.index, %why, ?backoff, "worker died; restarting");
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
    }
}

/// The message of a caught panic.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}
