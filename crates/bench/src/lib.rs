//! Benchmarks of the plba runtime against baselines measured in the same run. Run them with
//! `cargo bench -p plba-bench` (or `just bench`); see `benches/`.
//!
//! What the broker benches share: a no-op handler, a worker pool draining a queue while
//! an optional producer publishes, and the process's peak RSS.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use plba_testkit::StaticSource;
use runtime_contracts::{
    BoxFuture, HandlerContext, HandlerError, Outcome, Task, TaskHandler, TaskQueue, TaskSource,
};
use runtime_core::supervisor::PoolSpec;
use runtime_core::{PoolConfig, TraceService, WorkerSupervisor};

/// Counts what it handles and does nothing else.
#[derive(Debug)]
pub struct Noop(pub Arc<AtomicU64>);

impl TaskHandler for Noop {
    fn handle<'a>(
        &'a self,
        _task: &'a Task,
        _ctx: &'a HandlerContext,
    ) -> BoxFuture<'a, Result<Outcome, HandlerError>> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Box::pin(async { Ok(Outcome::new("noop")) })
    }
}

/// The no-op task number `i` (kind `noop`, source `bench`).
pub fn noop_task(i: u64) -> Task {
    Task::new(format!("t{i}"), "noop", "bench", serde_json::Value::Null).expect("task")
}

/// Its envelope as a broker carries it.
pub fn envelope(i: u64) -> String {
    serde_json::to_string(&noop_task(i)).expect("json")
}

/// Runs a pool of `consumers` workers (each leasing up to `prefetch`) on `queue` until `n`
/// tasks are handled and acknowledged; with `produce`, publishes them meanwhile in chunks
/// of 1,000 (`publish_batch`, as sources do). Returns the time from start to the last ack.
pub async fn drain_with_pool(
    queue: Arc<dyn TaskQueue>,
    n: u64,
    consumers: usize,
    prefetch: usize,
    produce: bool,
) -> Duration {
    let handled = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let producer = produce.then(|| {
        let queue = Arc::clone(&queue);
        tokio::spawn(async move {
            let mut i = 0;
            while i < n {
                let chunk = (i..(i + 1000).min(n)).map(noop_task).collect();
                queue.publish_batch(chunk).await.expect("publish");
                i += 1000;
            }
        })
    });
    let supervisor = start_pool(
        Arc::clone(&queue),
        consumers,
        prefetch,
        Arc::new(Noop(Arc::clone(&handled))),
    );
    while handled.load(Ordering::Relaxed) < n
        || queue.stats().await.map(|s| s.processed).unwrap_or(0) < n
    {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = start.elapsed();
    if let Some(p) = producer {
        p.await.expect("producer");
    }
    supervisor.shutdown(Duration::from_secs(5)).await;
    elapsed
}

/// Starts pool `bench` on `queue`: `workers` workers leasing up to `prefetch` each, every
/// task of kind `noop` (from source `bench`) handled by `handler`.
pub fn start_pool(
    queue: Arc<dyn TaskQueue>,
    workers: usize,
    prefetch: usize,
    handler: Arc<dyn TaskHandler>,
) -> WorkerSupervisor {
    let mut supervisor = WorkerSupervisor::new();
    let handlers: HashMap<String, Arc<dyn TaskHandler>> =
        HashMap::from([("noop".to_owned(), handler)]);
    let sources: HashMap<String, Arc<dyn TaskSource>> = HashMap::from([(
        "bench".to_owned(),
        Arc::new(StaticSource::empty("bench")) as _,
    )]);
    supervisor.start_pool(
        PoolSpec {
            name: "bench".into(),
            config: PoolConfig {
                workers,
                prefetch,
                ..PoolConfig::default()
            },
            queue,
            handlers,
            sources,
            needs: Vec::new(),
        },
        TraceService::new(),
    );
    supervisor
}

/// Peak RSS of this process (VmHWM), MiB.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_owned)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
