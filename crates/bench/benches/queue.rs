//! No-op tasks through publish → consume → handler → ack with 4 workers, on plba's
//! in-memory queue and worker pool, beside two baselines measured in the same run:
//! (a) a plain tokio mpsc channel shared by 4 workers, the in-process limit, and
//! (b) apalis 1.0's in-memory backend with the same handler and a concurrency of 4.
//!
//! Prints tasks/s for each (median of several interleaved rounds) and plba's ratio to each baseline.
//! `PLBA_BENCH_TASKS` sets the task count (default 200000).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apalis::prelude::*;
use runtime_adapters::queue::memory::{MemoryQueue, MemoryQueueConfig};
use runtime_contracts::{
    BoxFuture, HandlerContext, HandlerError, Outcome, Task, TaskHandler, TaskQueue,
};

const WORKERS: usize = 4;
const ROUNDS: usize = 5;

fn noop(n: u64) -> u64 {
    std::hint::black_box(n)
}

async fn mpsc_round(n: u64) -> Duration {
    let (tx, rx) = tokio::sync::mpsc::channel::<u64>(n as usize);
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    for i in 0..n {
        tx.send(i).await.expect("send");
    }
    drop(tx);
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let rx = Arc::clone(&rx);
        let done = Arc::clone(&done);
        workers.push(tokio::spawn(async move {
            loop {
                let item = rx.lock().await.recv().await;
                let Some(item) = item else { break };
                noop(item);
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for w in workers {
        w.await.expect("join");
    }
    assert_eq!(done.load(Ordering::Relaxed), n);
    start.elapsed()
}

static APALIS_DONE: AtomicU64 = AtomicU64::new(0);
static APALIS_TARGET: AtomicU64 = AtomicU64::new(0);

async fn apalis_handler(item: u64, worker: WorkerContext) {
    noop(item);
    if APALIS_DONE.fetch_add(1, Ordering::Relaxed) + 1 == APALIS_TARGET.load(Ordering::Relaxed) {
        let _ = worker.stop();
    }
}

async fn apalis_round(n: u64) -> Duration {
    APALIS_DONE.store(0, Ordering::Relaxed);
    APALIS_TARGET.store(n, Ordering::Relaxed);
    let mut storage = MemoryStorage::new();
    let start = Instant::now();
    for i in 0..n {
        storage.push(i).await.expect("push");
    }
    let worker = WorkerBuilder::new("bench")
        .backend(storage)
        .concurrency(WORKERS)
        .build(apalis_handler);
    worker.run().await.expect("apalis worker");
    assert_eq!(APALIS_DONE.load(Ordering::Relaxed), n);
    start.elapsed()
}

struct Noop;
impl TaskHandler for Noop {
    fn handle<'a>(
        &'a self,
        task: &'a Task,
        _ctx: &'a HandlerContext,
    ) -> BoxFuture<'a, Result<Outcome, HandlerError>> {
        noop(task.attempt.into());
        Box::pin(async { Ok(Outcome::new("noop")) })
    }
}

async fn plba_round(n: u64, prefetch: usize) -> Duration {
    let queue = Arc::new(MemoryQueue::new(
        "bench",
        MemoryQueueConfig {
            capacity: n as usize,
            lease_timeout_ms: 600_000,
            ..MemoryQueueConfig::default()
        },
    ));
    let (kind, source): (Arc<str>, Arc<str>) = ("noop".into(), "bench".into());
    let start = Instant::now();
    for i in 0..n {
        let task = Task::new(
            format!("t{i}"),
            Arc::clone(&kind),
            Arc::clone(&source),
            serde_json::Value::Null,
        )
        .expect("task");
        queue.publish(task).await.expect("publish");
    }
    let supervisor = plba_bench::start_pool(queue.clone(), WORKERS, prefetch, Arc::new(Noop));
    loop {
        let stats = queue.stats().await.expect("stats");
        if stats.processed == n {
            break;
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let elapsed = start.elapsed();
    supervisor.shutdown(Duration::from_secs(5)).await;
    elapsed
}

fn median(rounds: &[Duration]) -> Duration {
    let mut sorted = rounds.to_vec();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

fn rate(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn main() {
    let n = plba_testkit::env_number("PLBA_BENCH_TASKS", 200_000);
    // One runtime thread per core, as a service would run; WORKERS is the concurrency.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (mut plba, mut plba16, mut apalis, mut mpsc) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    if std::env::var("PLBA_BENCH_ONLY").as_deref() == Ok("plba") {
        // For profiling the runtime alone.
        let d = runtime.block_on(plba_round(n, 1));
        println!("plba only: {:.0} tasks/s", rate(n, d));
        return;
    }
    runtime.block_on(async {
        // Interleaved rounds, so that noise from the shared machine hits all three alike.
        for _ in 0..ROUNDS {
            mpsc.push(mpsc_round(n).await);
            apalis.push(apalis_round(n).await);
            plba.push(plba_round(n, 1).await);
            plba16.push(plba_round(n, 16).await);
        }
    });
    let (p, p16) = (rate(n, median(&plba)), rate(n, median(&plba16)));
    let (a, m) = (rate(n, median(&apalis)), rate(n, median(&mpsc)));
    println!("no-op tasks: {n}, workers: {WORKERS}, median of {ROUNDS} interleaved rounds");
    println!("  (a) tokio mpsc, 4 workers (in-process limit)  {m:>10.0} tasks/s");
    println!("  (b) apalis 1.0 MemoryStorage, concurrency 4   {a:>10.0} tasks/s");
    println!("  plba, prefetch 1 (default)                    {p:>10.0} tasks/s");
    println!("  plba, prefetch 16                             {p16:>10.0} tasks/s");
    println!("  (plba does leases, acks, idempotent publish, retries, timeouts, panic capture, stats, spans)");
    println!(
        "  ratio plba / apalis:  prefetch 1 {:.2}   prefetch 16 {:.2}",
        p / a,
        p16 / a
    );
    println!(
        "  ratio plba / mpsc:    prefetch 1 {:.2}   prefetch 16 {:.2}",
        p / m,
        p16 / m
    );
}
