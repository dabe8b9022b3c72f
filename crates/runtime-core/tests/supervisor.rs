//! Worker supervision, retries, dead letters, backpressure and shutdown, on the real
//! in-memory queue with a scripted source and handler.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use plba_testkit::OneHandler;
use runtime_adapters::queue::memory::{MemoryQueue, MemoryQueueConfig};
use runtime_contracts::*;
use runtime_core::config::ConfigOrigin;
use runtime_core::supervisor::PoolCounters;
use runtime_core::{ConfigurationManager, RuntimeBuilder, RuntimeManager, WorkerSupervisor};

/// Publishes one task per script entry at start; records completions and releases.
#[derive(Default)]
struct ScriptSource {
    script: Vec<&'static str>,
    published: AtomicU64,
    completed: Mutex<Vec<String>>,
    released: Mutex<Vec<(String, Disposition)>>,
    waiting_for_capacity: AtomicBool,
    scanned: AtomicBool,
    /// What it reads, when the test switches it off and on.
    server: Option<Arc<Switch>>,
}

impl TaskSource for ScriptSource {
    fn id(&self) -> &str {
        "script"
    }
    fn start(&self, ctx: SourceContext) -> BoxFuture<'_, Result<(), SourceError>> {
        Box::pin(async move {
            for (i, mode) in self.script.iter().enumerate() {
                self.waiting_for_capacity.store(true, Ordering::SeqCst);
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return Ok(()),
                    _ = ctx.backpressure.wait_for_capacity() => {}
                }
                self.waiting_for_capacity.store(false, Ordering::SeqCst);
                let mut task = Task::new(
                    format!("t{i}"),
                    "job",
                    "script",
                    serde_json::json!({ "mode": mode }),
                )
                .expect("task");
                ctx.tracer.inject_current(&mut task.headers);
                ctx.queue.publish(task).await.expect("publish");
                self.published.fetch_add(1, Ordering::SeqCst);
            }
            self.scanned.store(true, Ordering::SeqCst);
            ctx.shutdown.cancelled().await;
            Ok(())
        })
    }
    fn status(&self) -> SourceStatus {
        SourceStatus {
            state: SourceState::Running,
            published: self.published.load(Ordering::SeqCst),
            completed: self.completed.lock().expect("lock").len() as u64,
            pending: 0,
            last_event_age: self
                .scanned
                .load(Ordering::SeqCst)
                .then_some(Duration::ZERO),
            last_error: None,
            next_due: None,
            lease: None,
        }
    }
    fn load_content<'a>(
        &'a self,
        task: &'a Task,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, SourceError>> {
        Box::pin(async move { Ok(Some(task.payload.to_string().into_bytes())) })
    }
    fn complete<'a>(&'a self, task: &'a Task) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            self.completed
                .lock()
                .expect("lock")
                .push(task.id.to_string());
            Ok(())
        })
    }
    fn reachable(&self) -> BoxFuture<'_, Result<(), String>> {
        let up = self
            .server
            .as_ref()
            .is_none_or(|s| s.0.load(Ordering::SeqCst));
        Box::pin(async move {
            if up {
                Ok(())
            } else {
                Err("connection refused".to_owned())
            }
        })
    }
    fn release(&self, task: &Task, disposition: Disposition) {
        self.released
            .lock()
            .expect("lock")
            .push((task.id.to_string(), disposition));
    }
}

/// Acts out the task's `mode`: ok, retry, permanent, panic, slow, or block (until the gate opens).
struct ScriptHandler {
    gate: tokio::sync::Semaphore,
    attempts: Mutex<HashMap<String, u32>>,
    dead: Mutex<Vec<(String, String)>>,
}

impl TaskHandler for ScriptHandler {
    fn handle<'a>(
        &'a self,
        task: &'a Task,
        ctx: &'a HandlerContext,
    ) -> BoxFuture<'a, Result<Outcome, HandlerError>> {
        Box::pin(async move {
            *self
                .attempts
                .lock()
                .expect("lock")
                .entry(task.id.to_string())
                .or_default() += 1;
            let content = ctx
                .load_content(task)
                .await
                .expect("content")
                .expect("present");
            let payload: serde_json::Value = serde_json::from_slice(&content).expect("json");
            match payload["mode"].as_str().expect("mode") {
                "ok" => Ok(Outcome::new("done")),
                "retry" => Err(HandlerError::retry("not yet")),
                "permanent" => Err(HandlerError::Permanent("never".into())),
                "panic" => panic!("handler exploded"),
                "slow" => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Ok(Outcome::new("late"))
                }
                "block" => {
                    let _permit = self.gate.acquire().await.expect("gate");
                    Ok(Outcome::new("released"))
                }
                other => Err(HandlerError::Permanent(format!("unknown mode {other}"))),
            }
        })
    }
    fn on_dead_letter<'a>(
        &'a self,
        task: &'a Task,
        _ctx: &'a HandlerContext,
        failure: &'a AttemptFailure,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.dead
                .lock()
                .expect("lock")
                .push((task.id.to_string(), failure.reason.clone()));
        })
    }
}

struct Rig {
    runtime: RuntimeManager,
    source: Arc<ScriptSource>,
    handler: Arc<ScriptHandler>,
    queue: Arc<MemoryQueue>,
}

async fn rig(script: Vec<&'static str>, pool_toml: &str, deadline_ms: u64) -> Rig {
    rig_with(script, pool_toml, deadline_ms, |h| h).await
}

/// [`rig`] with the registered handler made from the script handler by `wrap`.
async fn rig_with(
    script: Vec<&'static str>,
    pool_toml: &str,
    deadline_ms: u64,
    wrap: impl FnOnce(Arc<ScriptHandler>) -> Arc<dyn TaskHandler>,
) -> Rig {
    let queue = Arc::new(MemoryQueue::new("jobs", MemoryQueueConfig::default()));
    rig_on(
        queue,
        script,
        pool_toml,
        deadline_ms,
        wrap,
        Vec::new(),
        None,
    )
    .await
}

/// A module that registers [`OneHandler`]'s handler and declares what its pool needs.
struct Needing {
    inner: OneHandler,
    needs: Vec<Arc<dyn HealthContributor>>,
}

impl ApplicationModule for Needing {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn config_section(&self) -> &str {
        self.inner.config_section()
    }
    fn validate_config(&self, section: Option<&serde_json::Value>) -> Vec<ConfigProblem> {
        self.inner.validate_config(section)
    }
    fn register<'a>(
        &'a self,
        registry: &'a mut dyn ModuleRegistry,
        config: &'a dyn ConfigProvider,
    ) -> BoxFuture<'a, Result<(), ModuleError>> {
        Box::pin(async move {
            self.inner.register(registry, config).await?;
            for need in &self.needs {
                registry.needs(self.inner.pool, Arc::clone(need));
            }
            Ok(())
        })
    }
}

/// [`rig_with`] on a queue that may already hold work.
async fn rig_on(
    queue: Arc<MemoryQueue>,
    script: Vec<&'static str>,
    pool_toml: &str,
    deadline_ms: u64,
    wrap: impl FnOnce(Arc<ScriptHandler>) -> Arc<dyn TaskHandler>,
    needs: Vec<Arc<dyn HealthContributor>>,
    server: Option<Arc<Switch>>,
) -> Rig {
    // Short backoffs, unless the test gives the pool its own retry table.
    let retry = if pool_toml.contains("[pools.jobs.retry]") {
        ""
    } else {
        "[pools.jobs.retry]\ninitial_backoff_ms = 5\nmax_backoff_ms = 20\n"
    };
    let text = format!(
        "[runtime]\nshutdown_deadline_ms = {deadline_ms}\n[pools.jobs]\n{pool_toml}\n{retry}"
    );
    let config = ConfigurationManager::builder()
        .env(HashMap::new())
        .load(ConfigOrigin::Embedded {
            name: "test".into(),
            text,
        })
        .expect("config");
    let source = Arc::new(ScriptSource {
        script,
        server,
        ..Default::default()
    });
    let handler = Arc::new(ScriptHandler {
        gate: tokio::sync::Semaphore::new(0),
        attempts: Mutex::default(),
        dead: Mutex::default(),
    });
    let mut runtime = RuntimeBuilder::new(Arc::new(config))
        .queue("jobs", queue.clone())
        .source(source.clone(), "jobs")
        .module(Arc::new(Needing {
            inner: OneHandler {
                pool: "jobs",
                kind: "job",
                handler: wrap(handler.clone()),
                source: None,
            },
            needs,
        }))
        .build()
        .await
        .expect("build");
    runtime.start().expect("start");
    Rig {
        runtime,
        source,
        handler,
        queue,
    }
}

/// The first `limit` dead letters of the rig's queue.
async fn dead_page(rig: &Rig, limit: usize) -> DeadLetterPage {
    rig.queue
        .dead_letters()
        .expect("dlq")
        .list(None, limit)
        .await
        .expect("list")
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `[pools.NAME.retry] schedule = ["1m", "5m", "30m"]` on tokio's paused clock: each retry
/// begins exactly its step after the failure before it, the history says when the next
/// attempt was due, and after the last step the task is dead-lettered (attempt 4 of 4).
#[tokio::test(start_paused = true)]
async fn a_stepped_schedule_retries_after_each_step_then_dead_letters() {
    let times = Arc::new(Mutex::new(Vec::new()));
    let recorder = Arc::clone(&times);
    let rig = rig_with(
        vec!["retry"],
        "workers = 1\nhandler_timeout_ms = 1000\n[pools.jobs.retry]\nschedule = [\"1m\", \"5m\", \"30m\"]",
        1000,
        move |h| {
            // Notes when each attempt begins (tokio's clock).
            let note: Arc<dyn Fn(&Task) + Send + Sync> = Arc::new(move |_: &Task| {
                recorder.lock().expect("lock").push(tokio::time::Instant::now());
            });
            Arc::new(plba_testkit::BeforeEach::new(h, note)) as Arc<dyn TaskHandler>
        },
    )
    .await;
    tokio::time::timeout(
        Duration::from_secs(3 * 3600),
        rig.runtime.wait_until_idle(Duration::from_millis(50)),
    )
    .await
    .expect("idle");
    let times = times.lock().expect("lock").clone();
    assert_eq!(times.len(), 4, "the first attempt and one after each step");
    let gaps: Vec<u64> = times.windows(2).map(|w| (w[1] - w[0]).as_secs()).collect();
    assert_eq!(gaps, [60, 300, 1800], "each retry waits its step exactly");
    let dead = rig.handler.dead.lock().expect("lock").clone();
    assert_eq!(dead.len(), 1);
    assert!(dead[0].1.contains("(attempt 4 of 4)"), "{dead:?}");
    let page = dead_page(&rig, 10).await;
    let history = &page.items[0].task.history;
    assert_eq!(history.len(), 4, "{history:?}");
    for (h, step) in history.iter().zip([60_000, 300_000, 1_800_000]) {
        assert_eq!(
            h.next_attempt_at_unix_ms.map(|next| next - h.at_unix_ms),
            Some(step),
            "{h:?}"
        );
    }
    assert_eq!(
        history[3].next_attempt_at_unix_ms, None,
        "no attempt after the last"
    );
    rig.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_failure_kind_gets_its_policy() {
    let rig = rig(
        vec!["ok", "retry", "permanent", "panic", "slow", "ok"],
        "workers = 3\nmax_attempts = 3\nhandler_timeout_ms = 50",
        1000,
    )
    .await;
    tokio::time::timeout(
        Duration::from_secs(30),
        rig.runtime.wait_until_idle(Duration::from_millis(5)),
    )
    .await
    .expect("idle");
    let status = rig.runtime.status().await;
    let pool = &status.pools[0];
    assert_eq!(pool.processed, 2);
    assert_eq!(pool.dead_lettered, 4);
    assert_eq!(pool.failed, 3 + 1 + 3 + 3);
    assert_eq!(pool.retried, 2 + 2 + 2);

    let attempts = rig.handler.attempts.lock().expect("lock").clone();
    assert_eq!(attempts["t1"], 3, "retry: up to max_attempts");
    assert_eq!(attempts["t2"], 1, "permanent: dead-lettered at once");
    assert_eq!(
        attempts["t3"], 3,
        "a panic is a failed attempt, and the worker lives on"
    );
    assert_eq!(attempts["t4"], 3, "a timeout is a failed attempt");

    let mut completed = rig.source.completed.lock().expect("lock").clone();
    completed.sort();
    assert_eq!(
        completed,
        ["t0", "t5"],
        "only successes are completed at the source"
    );
    // Told at least once: a task dead-lettered while the start's hand-back reads the dead
    // letters may be told twice.
    let released = rig.source.released.lock().expect("lock").clone();
    let ids: std::collections::BTreeSet<_> = released.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        ids.into_iter().collect::<Vec<_>>(),
        ["t1", "t2", "t3", "t4"]
    );
    assert!(released
        .iter()
        .all(|(_, d)| *d == Disposition::DeadLettered));

    let page = dead_page(&rig, 10).await;
    let by_id: HashMap<_, _> = page.items.iter().map(|d| (d.id.as_str(), d)).collect();
    assert_eq!(
        by_id["t1"].task.history.len(),
        3,
        "the attempt history is kept"
    );
    assert!(by_id["t1"].reason.contains("not yet (attempt 3 of 3)"));
    assert_eq!(by_id["t2"].task.history.len(), 1);
    assert!(by_id["t3"]
        .reason
        .contains("handler panicked: handler exploded"));
    assert!(by_id["t4"].reason.contains("timed out after 50 ms"));
    assert_eq!(
        rig.handler.dead.lock().expect("lock").len(),
        4,
        "the module heard of each"
    );

    // The same, in the metrics: retries and dead letters by what failed, and the latency
    // of the two that completed.
    // Counted just after the queue settles each task: read until the last has landed.
    let mut text = rig.runtime.metrics_text().await;
    let started = std::time::Instant::now();
    let dead_letters = |text: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with("plba_dead_letters_by_class_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    while dead_letters(&text) < 4 && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(10)).await;
        text = rig.runtime.metrics_text().await;
    }
    let value = |family: &str, class: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(family) && l.contains(&format!("class=\"{class}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    for (class, retried, dead) in [
        ("error", 2, 1),
        ("panic", 2, 1),
        ("timeout", 2, 1),
        ("permanent", 0, 1),
    ] {
        assert_eq!(
            value("plba_retries_by_class_total", class),
            retried,
            "{class}:\n{text}"
        );
        assert_eq!(
            value("plba_dead_letters_by_class_total", class),
            dead,
            "{class}:\n{text}"
        );
    }
    let completed = text
        .lines()
        .find(|l| l.starts_with("plba_task_latency_seconds_count"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok());
    assert_eq!(completed, Some(2), "{text}");
    rig.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_join_the_trace_of_the_first_attempt() {
    let rig = rig(vec!["retry"], "workers = 1\nmax_attempts = 2", 1000).await;
    tokio::time::timeout(
        Duration::from_secs(30),
        rig.runtime.wait_until_idle(Duration::from_millis(5)),
    )
    .await
    .expect("idle");
    let page = dead_page(&rig, 1).await;
    let task = &page.items[0].task;
    assert_eq!(task.attempt, 2);
    let trace = runtime_core::TraceService::new();
    assert!(
        trace.trace_id(&task.headers).is_some(),
        "the source wrote a trace context and retries kept it"
    );
    rig.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_stops_fetching_above_the_high_watermark() {
    let rig = rig(vec!["block"; 40], "workers = 2\nhigh_watermark = 5", 5000).await;
    until("the source to wait for capacity", || {
        rig.source.waiting_for_capacity.load(Ordering::SeqCst)
            && rig.source.published.load(Ordering::SeqCst) == 5
    })
    .await;
    let stats = rig.queue.stats().await.expect("stats");
    assert_eq!(stats.depth + stats.in_flight, 5, "{stats:?}");
    assert_eq!(rig.source.published.load(Ordering::SeqCst), 5);
    rig.handler.gate.add_permits(1000);
    tokio::time::timeout(
        Duration::from_secs(30),
        rig.runtime.wait_until_idle(Duration::from_millis(5)),
    )
    .await
    .expect("idle");
    assert_eq!(rig.source.completed.lock().expect("lock").len(), 40);
    rig.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_returns_what_outlives_the_deadline_to_the_queue() {
    let rig = rig(vec!["block", "block", "ok"], "workers = 2", 100).await;
    until("two tasks in flight", || {
        rig.runtime.pool_status()[0].busy == 2
    })
    .await;
    let report = rig.runtime.shutdown().await;
    assert!(!report.drained_in_time);
    assert_eq!(report.pools[0].returned, 2);
    assert_eq!(
        report.queues["jobs"].depth, 3,
        "both in-flight tasks went back, the third never left"
    );
    assert_eq!(report.queues["jobs"].in_flight, 0);
    let released = rig.source.released.lock().expect("lock").clone();
    assert_eq!(released.len(), 2);
    assert!(released.iter().all(|(_, d)| *d == Disposition::Returned));
    assert!(
        rig.source.completed.lock().expect("lock").is_empty(),
        "nothing returned was completed"
    );
}

/// A worker that panics on its first run and then idles until told to stop.
struct Flaky {
    runs: AtomicUsize,
}
impl Worker for Flaky {
    fn run(&self, ctx: WorkerContext) -> BoxFuture<'_, Result<(), WorkerError>> {
        Box::pin(async move {
            if self.runs.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("worker died");
            }
            ctx.stop_consuming.cancelled().await;
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_worker_is_restarted() {
    let mut supervisor = WorkerSupervisor::new();
    let worker = Arc::new(Flaky {
        runs: AtomicUsize::new(0),
    });
    let counters = Arc::new(PoolCounters::default());
    supervisor.start_workers("flaky", worker.clone(), 1, counters);
    until("the restart", || worker.runs.load(Ordering::SeqCst) >= 2).await;
    assert!(supervisor.shutdown(Duration::from_secs(5)).await);
    assert_eq!(worker.runs.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_can_bring_its_source_and_an_unconfigured_pool_runs_with_defaults() {
    let config = ConfigurationManager::builder()
        .env(HashMap::new())
        .load(ConfigOrigin::Embedded {
            name: "empty".into(),
            text: String::new(),
        })
        .expect("an empty config is valid");
    let source = Arc::new(ScriptSource {
        script: vec!["ok", "ok", "ok"],
        ..Default::default()
    });
    let handler = Arc::new(ScriptHandler {
        gate: tokio::sync::Semaphore::new(0),
        attempts: Mutex::default(),
        dead: Mutex::default(),
    });
    let made = Arc::new(AtomicUsize::new(0));
    let counter = made.clone();
    let mut runtime = RuntimeBuilder::new(Arc::new(config))
        // A module that brings its own source and declares its pool without configuring it.
        .module(Arc::new(OneHandler {
            pool: "jobs",
            kind: "job",
            handler,
            source: Some(source.clone()),
        }))
        .queue_factory(move |pool| -> Arc<dyn TaskQueue> {
            counter.fetch_add(1, Ordering::SeqCst);
            Arc::new(MemoryQueue::new(pool, MemoryQueueConfig::default()))
        })
        .build()
        .await
        .expect("build");
    runtime.start().expect("start");
    tokio::time::timeout(
        Duration::from_secs(30),
        runtime.wait_until_idle(Duration::from_millis(5)),
    )
    .await
    .expect("idle");
    assert_eq!(
        made.load(Ordering::SeqCst),
        1,
        "one queue for the declared pool"
    );
    let pools = runtime.pool_status();
    assert_eq!(
        pools[0].workers,
        runtime_core::PoolConfig::default().workers
    );
    assert_eq!(source.completed.lock().expect("lock").len(), 3);
    runtime.shutdown().await;
}

#[tokio::test]
async fn a_pool_without_a_handler_or_queue_is_refused_before_anything_starts() {
    let config = ConfigurationManager::builder()
        .env(HashMap::new())
        .load(ConfigOrigin::Embedded {
            name: "t".into(),
            text: "[pools.lonely]\n".into(),
        })
        .expect("valid");
    let err = RuntimeBuilder::new(Arc::new(config))
        .build()
        .await
        .expect_err("incomplete");
    let text = err.to_string();
    assert!(text.contains("pool lonely has no queue"), "{text}");
    assert!(text.contains("pool lonely has no handler"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_grows_and_shrinks_while_it_runs() {
    let rig = rig(vec!["block"; 6], "workers = 1", 5000).await;
    until("one worker busy", || rig.runtime.pool_status()[0].busy == 1).await;
    assert!(rig.runtime.resize_pool("jobs", 3));
    until("three workers busy", || {
        rig.runtime.pool_status()[0].busy == 3
    })
    .await;
    assert!(rig.runtime.resize_pool("jobs", 1));
    assert_eq!(rig.runtime.pool_status()[0].workers, 1);
    rig.handler.gate.add_permits(1000);
    tokio::time::timeout(
        Duration::from_secs(30),
        rig.runtime.wait_until_idle(Duration::from_millis(5)),
    )
    .await
    .expect("idle");
    assert_eq!(rig.source.completed.lock().expect("lock").len(), 6);
    assert!(!rig.runtime.resize_pool("nope", 2));
    rig.runtime.shutdown().await;
}

/// Records how the worker called it: batches (task, attempt) and single deliveries; acts
/// out each task's mode with the script handler.
struct Batching {
    script: Arc<ScriptHandler>,
    batches: Mutex<Vec<Vec<(String, u32)>>>,
    singles: Mutex<Vec<(String, u32)>>,
}

impl TaskHandler for Batching {
    fn handle<'a>(
        &'a self,
        task: &'a Task,
        ctx: &'a HandlerContext,
    ) -> BoxFuture<'a, Result<Outcome, HandlerError>> {
        self.singles
            .lock()
            .expect("lock")
            .push((task.id.to_string(), task.attempt));
        self.script.handle(task, ctx)
    }
    fn handle_batch<'a>(
        &'a self,
        tasks: &'a [Arc<Task>],
        ctx: &'a HandlerContext,
    ) -> BoxFuture<'a, Vec<Result<Outcome, HandlerError>>> {
        self.batches.lock().expect("lock").push(
            tasks
                .iter()
                .map(|t| (t.id.to_string(), t.attempt))
                .collect(),
        );
        Box::pin(async move {
            let mut out = Vec::new();
            for task in tasks {
                out.push(self.script.handle(task, ctx).await);
            }
            out
        })
    }
    fn on_dead_letter<'a>(
        &'a self,
        task: &'a Task,
        ctx: &'a HandlerContext,
        failure: &'a AttemptFailure,
    ) -> BoxFuture<'a, ()> {
        self.script.on_dead_letter(task, ctx, failure)
    }
}

async fn batched(script: Vec<&'static str>) -> (Rig, Arc<Batching>) {
    let recorder: Arc<Mutex<Option<Arc<Batching>>>> = Arc::default();
    let slot = recorder.clone();
    let rig = rig_with(
        script,
        "workers = 1\nprefetch = 16\nmax_attempts = 3\nhandler_timeout_ms = 5000",
        1000,
        move |script| {
            let b = Arc::new(Batching {
                script,
                batches: Mutex::default(),
                singles: Mutex::default(),
            });
            *slot.lock().expect("lock") = Some(b.clone());
            b
        },
    )
    .await;
    let batching = recorder.lock().expect("lock").clone().expect("registered");
    // The first task blocks the only worker until every task is queued behind it.
    until("all published", || {
        rig.source.published.load(Ordering::SeqCst) == 8
    })
    .await;
    rig.handler.gate.add_permits(1);
    tokio::time::timeout(
        Duration::from_secs(30),
        rig.runtime.wait_until_idle(Duration::from_millis(5)),
    )
    .await
    .expect("idle");
    (rig, batching)
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// First deliveries leased together are handled as one batch, each result settled for its
/// own task: successes completed, a retry retried alone, a permanent failure dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_settles_each_task_for_itself_and_retries_alone() {
    let script = vec!["block", "ok", "retry", "ok", "permanent", "ok", "ok", "ok"];
    let (rig, b) = batched(script).await;
    let batches = b.batches.lock().expect("lock").clone();
    let singles = b.singles.lock().expect("lock").clone();
    assert!(batches.iter().any(|b| b.len() >= 2), "{batches:?}");
    assert!(
        batches.iter().flatten().all(|(_, a)| *a == 0),
        "only first deliveries batch"
    );
    let mut first: Vec<String> = batches.iter().flatten().map(|(id, _)| id.clone()).collect();
    first.extend(
        singles
            .iter()
            .filter(|(_, a)| *a == 0)
            .map(|(id, _)| id.clone()),
    );
    assert_eq!(
        sorted(first),
        ["t0", "t1", "t2", "t3", "t4", "t5", "t6", "t7"],
        "each handled once first"
    );
    let retries: Vec<&(String, u32)> = singles.iter().filter(|(_, a)| *a > 0).collect();
    assert_eq!(
        retries,
        [&("t2".into(), 1), &("t2".into(), 2)],
        "retries, each alone"
    );
    assert_eq!(
        sorted(rig.source.completed.lock().expect("lock").clone()),
        ["t0", "t1", "t3", "t5", "t6", "t7"]
    );
    let dead: Vec<String> = rig
        .handler
        .dead
        .lock()
        .expect("lock")
        .iter()
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(sorted(dead), ["t2", "t4"]);
    rig.runtime.shutdown().await;
}

/// A batch call that panics is trusted for none of its tasks: each is handled again alone,
/// so the panicking task fails by itself and the others are completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_batch_is_handled_again_task_by_task() {
    let script = vec!["block", "ok", "ok", "panic", "ok", "ok", "ok", "ok"];
    let (rig, b) = batched(script).await;
    let batches = b.batches.lock().expect("lock").clone();
    let singles = b.singles.lock().expect("lock").clone();
    let panicked = batches
        .iter()
        .find(|b| b.iter().any(|(id, _)| id == "t3"))
        .expect("t3 came in a batch");
    assert!(panicked.len() >= 2, "{batches:?}");
    // Every task of the panicking batch was handled again alone, as a first delivery.
    for (id, _) in panicked {
        assert!(
            singles.contains(&(id.clone(), 0)),
            "{id} again alone: {singles:?}"
        );
    }
    let retries: Vec<&(String, u32)> = singles.iter().filter(|(_, a)| *a > 0).collect();
    assert_eq!(retries, [&("t3".into(), 1), &("t3".into(), 2)]);
    assert_eq!(
        sorted(rig.source.completed.lock().expect("lock").clone()),
        ["t0", "t1", "t2", "t4", "t5", "t6", "t7"]
    );
    let dead = rig.handler.dead.lock().expect("lock").clone();
    assert_eq!(dead.len(), 1);
    assert!(dead[0].1.contains("handler panicked"), "{dead:?}");
    rig.runtime.shutdown().await;
}

/// A task of a kind no handler of its pool knows is dead-lettered at once as unroutable,
/// with the kind in the reason; the pool goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_no_handler_knows_is_dead_lettered_as_unroutable() {
    let rig = rig(vec!["ok"], "workers = 1\nmax_attempts = 3", 1000).await;
    rig.queue
        .publish(
            Task::new(
                "stray-1",
                "nobody-handles-this",
                "script",
                serde_json::json!({}),
            )
            .expect("task"),
        )
        .await
        .expect("publish");
    let start = std::time::Instant::now();
    while rig.queue.stats().await.expect("stats").dead == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let dead = rig
        .queue
        .dead_letters()
        .expect("dead letters")
        .get("stray-1")
        .await
        .expect("get")
        .expect("the stray task is a dead letter");
    assert!(
        dead.reason
            .contains("no handler for kind nobody-handles-this"),
        "{}",
        dead.reason
    );
    assert_eq!(dead.task.history.len(), 1, "one attempt, no retries");
    let status = rig.runtime.status().await;
    assert_eq!(status.pools[0].dead_lettered, 1);
    assert_eq!(status.pools[0].retried, 0);
}

/// At start, every dead letter of a pool's queue is handed back to its source as
/// dead-lettered (a process that died right after dead-lettering never told the source);
/// dead letters of other sources are left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_letters_a_queue_holds_at_start_are_handed_back_to_their_source() {
    let queue = Arc::new(MemoryQueue::new("jobs", MemoryQueueConfig::default()));
    for (id, source) in [("d1", "script"), ("d2", "elsewhere"), ("d3", "script")] {
        let task = Task::new(id, "job", source, serde_json::json!({})).expect("task");
        queue.publish(task).await.expect("publish");
        let lease = queue
            .consume(Duration::from_secs(1))
            .await
            .expect("consume")
            .expect("a task");
        queue
            .dead_letter(
                &lease,
                AttemptFailure {
                    attempt: 1,
                    reason: "never".into(),
                    at_unix_ms: 0,
                    next_attempt_at_unix_ms: None,
                },
            )
            .await
            .expect("dead letter");
    }
    let rig = rig_on(queue, vec![], "workers = 1", 1000, |h| h, Vec::new(), None).await;
    until("two dead letters handed back", || {
        rig.source.released.lock().expect("lock").len() >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut released = rig.source.released.lock().expect("lock").clone();
    released.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        released,
        vec![
            ("d1".to_owned(), Disposition::DeadLettered),
            ("d3".to_owned(), Disposition::DeadLettered),
        ]
    );
}

/// A dependency switched on and off by the test.
struct Switch(AtomicBool);

impl HealthContributor for Switch {
    fn name(&self) -> &str {
        "db"
    }
    fn check(&self, _probe: Probe) -> BoxFuture<'_, HealthStatus> {
        let up = self.0.load(Ordering::SeqCst);
        Box::pin(async move {
            if up {
                HealthStatus::Up
            } else {
                HealthStatus::Down {
                    reason: "switched off".into(),
                }
            }
        })
    }
}

/// Fails (retryably) while the switch is off, as a handler whose database is down does.
struct Dependent {
    db: Arc<Switch>,
    calls: AtomicUsize,
}

impl TaskHandler for Dependent {
    fn handle<'a>(
        &'a self,
        _task: &'a Task,
        _ctx: &'a HandlerContext,
    ) -> BoxFuture<'a, Result<Outcome, HandlerError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let up = self.db.0.load(Ordering::SeqCst);
        Box::pin(async move {
            if up {
                Ok(Outcome::new("done"))
            } else {
                Err(HandlerError::retry("connection refused"))
            }
        })
    }
}

/// While a dependency the pool needs is down, the pool takes no new work and failed
/// attempts are not counted: with two attempts allowed, an outage that outlasts every
/// backoff dead-letters nothing, and the work is done once the dependency is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_waits_while_a_dependency_it_needs_is_down_and_counts_no_attempts() {
    waits_while_down(false, "db: switched off").await;
}

/// The same when what is down is the server the failed task's source reads (for IMAP, the
/// mailbox), which no module names: the source answers that it cannot reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_waits_while_the_source_of_a_failed_task_is_unreachable() {
    waits_while_down(true, "source script: connection refused").await;
}

async fn waits_while_down(through_source: bool, why: &str) {
    let db = Arc::new(Switch(AtomicBool::new(false)));
    let dependent = Arc::new(Dependent {
        db: Arc::clone(&db),
        calls: AtomicUsize::new(0),
    });
    let handler: Arc<dyn TaskHandler> = dependent.clone();
    let rig = rig_on(
        Arc::new(MemoryQueue::new("jobs", MemoryQueueConfig::default())),
        vec!["ok"; 6],
        "workers = 2\nmax_attempts = 2",
        1000,
        move |_| handler,
        if through_source {
            Vec::new()
        } else {
            vec![db.clone() as Arc<dyn HealthContributor>]
        },
        through_source.then(|| db.clone()),
    )
    .await;
    until("the pool waits for the dependency", || {
        dependent.calls.load(Ordering::SeqCst) > 0
    })
    .await;
    // Far longer than every backoff (5-20 ms) of both attempts.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = rig.runtime.status().await;
    let pool = &status.pools[0];
    assert_eq!(pool.dead_lettered, 0, "{pool:?}");
    assert_eq!(pool.waiting_for.as_deref(), Some(why), "{pool:?}");
    let calls = dependent.calls.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        dependent.calls.load(Ordering::SeqCst),
        calls,
        "a waiting pool takes no work"
    );
    assert!(calls <= 6, "only the attempts in flight failed: {calls}");

    db.0.store(true, Ordering::SeqCst);
    until("every task done", || {
        rig.source.completed.lock().expect("lock").len() == 6
    })
    .await;
    let status = rig.runtime.status().await;
    let pool = &status.pools[0];
    assert_eq!((pool.dead_lettered, pool.processed), (0, 6), "{pool:?}");
    assert_eq!(pool.waiting_for, None);
    assert_eq!(rig.queue.stats().await.expect("stats").dead, 0);
}
