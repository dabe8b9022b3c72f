//! Worker pools: how many workers consume each queue, and what happens when one fails.

mod gate;
mod pool_worker;

use std::collections::{BTreeSet, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::FutureExt;
use runtime_contracts::{
    HealthContributor, TaskHandler, TaskQueue, TaskSource, Worker, WorkerContext,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::PoolConfig;
use crate::metrics::Metrics;
use crate::now_unix_ms;
use crate::shutdown::TokenSignal;
use crate::trace::TraceService;

pub use pool_worker::PoolWorker;

/// Counters of one pool, shared by its workers.
#[derive(Debug)]
pub struct PoolCounters {
    pub(crate) busy: AtomicU64,
    pub(crate) processed: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) returned: AtomicU64,
    pub(crate) restarts: AtomicU64,
    /// When a task of the pool last settled (or the pool started), ms since the epoch.
    pub(crate) last_progress_unix_ms: AtomicU64,
    /// The dependency the pool waits for, and why it is not ready.
    pub(crate) waiting_for: std::sync::Mutex<Option<String>>,
}

impl Default for PoolCounters {
    fn default() -> Self {
        Self {
            busy: AtomicU64::new(0),
            processed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            returned: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            last_progress_unix_ms: AtomicU64::new(now_unix_ms()),
            waiting_for: std::sync::Mutex::new(None),
        }
    }
}

impl PoolCounters {
    pub(crate) fn progressed(&self) {
        self.last_progress_unix_ms
            .store(now_unix_ms(), Ordering::Relaxed);
    }

    /// Time since a task of the pool last settled (or the pool started).
    pub fn since_progress(&self) -> Duration {
        let last = self.last_progress_unix_ms.load(Ordering::Relaxed);
        Duration::from_millis(now_unix_ms().saturating_sub(last))
    }
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
    /// Milliseconds since a task of the pool last settled (or the pool started).
    pub ms_since_progress: u64,
    /// While the pool takes no work because a dependency is not ready: which, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
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
    /// Dependencies without which its handlers cannot work: while one is not ready, the
    /// pool takes no new work and failed attempts are not counted.
    pub needs: Vec<Arc<dyn HealthContributor>>,
}

impl std::fmt::Debug for PoolSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolSpec")
            .field("name", &self.name)
            .field("handlers", &self.handlers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// The live worker loops of a pool and how many it should have.
#[derive(Default)]
pub(crate) struct Roster {
    desired: AtomicUsize,
    live: Mutex<BTreeSet<usize>>,
}

struct RunningPool {
    name: String,
    config: Arc<RwLock<PoolConfig>>,
    counters: Arc<PoolCounters>,
    worker: Arc<dyn Worker>,
    roster: Arc<Roster>,
}

/// Runs named pools of workers. Each pool has its own concurrency, handler timeout and
/// retry policy; the concurrency can change while it runs. A worker loop that dies (errors
/// or panics before it was told to stop) is started again after a short backoff; a handler
/// panic never reaches it (the worker catches it and records a failed attempt).
pub struct WorkerSupervisor {
    tracker: TaskTracker,
    stop_consuming: CancellationToken,
    abandon_in_flight: CancellationToken,
    pools: Vec<RunningPool>,
    metrics: Arc<Metrics>,
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
        Self::with_metrics(Arc::new(Metrics::default()))
    }

    /// A supervisor recording into `metrics`.
    pub fn with_metrics(metrics: Arc<Metrics>) -> Self {
        Self {
            tracker: TaskTracker::new(),
            stop_consuming: CancellationToken::new(),
            abandon_in_flight: CancellationToken::new(),
            pools: Vec::new(),
            metrics,
        }
    }

    /// Starts a pool of [`PoolWorker`]s. Must be called inside a tokio runtime.
    pub fn start_pool(&mut self, spec: PoolSpec, trace: TraceService) {
        let counters = Arc::new(PoolCounters::default());
        let config = Arc::new(RwLock::new(spec.config.clone()));
        let roster = Arc::new(Roster::default());
        let worker = Arc::new(PoolWorker::new(
            spec,
            pool_worker::Shared {
                config: Arc::clone(&config),
                counters: Arc::clone(&counters),
                trace,
                metrics: Arc::clone(&self.metrics),
                desired: Arc::clone(&roster),
                stop_consuming: self.stop_consuming.clone(),
                abandon_in_flight: self.abandon_in_flight.clone(),
            },
        ));
        let workers = worker.concurrency();
        let name = worker.pool_name().to_owned();
        self.pools.push(RunningPool {
            name: name.clone(),
            config,
            counters,
            worker,
            roster,
        });
        self.resize(&name, workers);
    }

    /// Starts `count` copies of any [`Worker`] under supervision, counted under `pool`.
    pub fn start_workers(
        &mut self,
        pool: &str,
        worker: Arc<dyn Worker>,
        count: usize,
        counters: Arc<PoolCounters>,
    ) {
        self.pools.push(RunningPool {
            name: pool.to_owned(),
            config: Arc::new(RwLock::new(PoolConfig {
                workers: count,
                ..PoolConfig::default()
            })),
            counters,
            worker,
            roster: Arc::new(Roster::default()),
        });
        self.resize(pool, count);
    }

    /// Sets how many workers a pool runs: new ones start at once, surplus ones finish their
    /// current task and retire. Returns false for an unknown pool.
    pub fn resize(&self, pool: &str, workers: usize) -> bool {
        let Some(p) = self.pools.iter().find(|p| p.name == pool) else {
            return false;
        };
        if let Ok(mut config) = p.config.write() {
            config.workers = workers;
        }
        let mut live = p.roster.live.lock().unwrap_or_else(|e| e.into_inner());
        p.roster.desired.store(workers, Ordering::SeqCst);
        for index in 0..workers {
            if live.insert(index) {
                self.spawn(p, index);
            }
        }
        true
    }

    fn spawn(&self, pool: &RunningPool, index: usize) {
        let ctx = WorkerContext {
            index,
            stop_consuming: Arc::new(TokenSignal(self.stop_consuming.clone())),
            abandon_in_flight: Arc::new(TokenSignal(self.abandon_in_flight.clone())),
        };
        let stop = self.stop_consuming.clone();
        let worker = Arc::clone(&pool.worker);
        let counters = Arc::clone(&pool.counters);
        let roster = Arc::clone(&pool.roster);
        let name = pool.name.clone();
        self.tracker.spawn(async move {
            supervise(name, worker, ctx, stop, counters, roster).await;
        });
    }

    /// A snapshot of every pool.
    pub fn status(&self) -> Vec<PoolStatus> {
        self.pools
            .iter()
            .map(|p| {
                let c = &p.counters;
                let workers = p.roster.desired.load(Ordering::SeqCst);
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
                    ms_since_progress: u64::try_from(c.since_progress().as_millis())
                        .unwrap_or(u64::MAX),
                    waiting_for: c
                        .waiting_for
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone(),
                }
            })
            .collect()
    }

    /// The live settings of a pool (shared with its workers and its sources' backpressure).
    pub fn pool_config(&self, name: &str) -> Option<Arc<RwLock<PoolConfig>>> {
        self.pools
            .iter()
            .find(|p| p.name == name)
            .map(|p| Arc::clone(&p.config))
    }

    /// The counters of a pool.
    pub fn counters(&self, name: &str) -> Option<Arc<PoolCounters>> {
        self.pools
            .iter()
            .find(|p| p.name == name)
            .map(|p| Arc::clone(&p.counters))
    }

    /// Applies new settings to a running pool: retry policy, timeout, attempt limit,
    /// watermark and prefetch at once, the worker count by [`WorkerSupervisor::resize`].
    pub fn update_pool(&self, name: &str, config: PoolConfig) -> bool {
        let Some(pool) = self.pools.iter().find(|p| p.name == name) else {
            return false;
        };
        let workers = config.workers;
        if let Ok(mut current) = pool.config.write() {
            *current = config;
        }
        self.resize(name, workers)
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
    roster: Arc<Roster>,
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
            Ok(Ok(())) => {
                // Retired: the pool shrank below this worker's index. Checked under the
                // roster lock, so a resize that raced with the retirement is not lost.
                let mut live = roster.live.lock().unwrap_or_else(|e| e.into_inner());
                if ctx.index >= roster.desired.load(Ordering::SeqCst) {
                    live.remove(&ctx.index);
                    tracing::info!(pool, worker = ctx.index, "worker retired");
                    return;
                }
                "returned before shutdown".to_owned()
            }
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
