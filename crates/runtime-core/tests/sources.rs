//! Supervised sources: a source whose start panics or fails is started again with backoff
//! and its restarts are counted; a reload hands a running source its changed section, and
//! a source that asks for a restart is started again through the same path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plba_testkit::OneHandler;
use runtime_adapters::queue::memory::{MemoryQueue, MemoryQueueConfig};
use runtime_contracts::*;
use runtime_core::config::ConfigOrigin;
use runtime_core::{ConfigurationManager, RuntimeBuilder, RuntimeManager};

/// What the source's n-th start (from 0) does.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Start {
    Panic,
    Fail,
    /// Publishes one task, then runs until stopped.
    Run,
}

struct Crashy {
    script: Vec<Start>,
    starts: AtomicUsize,
    /// When each start began.
    began: Mutex<Vec<Instant>>,
    /// The sections `reconfigure` was given.
    sections: Mutex<Vec<serde_json::Value>>,
    /// What `reconfigure` answers.
    answer: Mutex<Reconfigure>,
}

impl Crashy {
    fn new(script: Vec<Start>) -> Arc<Self> {
        Arc::new(Self {
            script,
            starts: AtomicUsize::new(0),
            began: Mutex::default(),
            sections: Mutex::default(),
            answer: Mutex::new(Reconfigure::Applied),
        })
    }
}

impl TaskSource for Crashy {
    fn id(&self) -> &str {
        "crashy"
    }
    fn start(&self, ctx: SourceContext) -> BoxFuture<'_, Result<(), SourceError>> {
        Box::pin(async move {
            let n = self.starts.fetch_add(1, Ordering::SeqCst);
            self.began.lock().expect("lock").push(Instant::now());
            match self.script.get(n).copied().unwrap_or(Start::Run) {
                Start::Panic => panic!("start {n} blew up"),
                Start::Fail => Err(SourceError::Io {
                    source_id: "crashy".into(),
                    message: format!("start {n} could not reach its server"),
                }),
                Start::Run => {
                    let task = Task::new(
                        format!("t{n}"),
                        "job",
                        "crashy",
                        serde_json::json!({ "run": n }),
                    )
                    .expect("task");
                    ctx.queue.publish(task).await.expect("publish");
                    ctx.shutdown.cancelled().await;
                    Ok(())
                }
            }
        })
    }
    fn reconfigure(&self, section: &serde_json::Value) -> Reconfigure {
        self.sections.lock().expect("lock").push(section.clone());
        self.answer.lock().expect("lock").clone()
    }
    fn status(&self) -> SourceStatus {
        SourceStatus {
            state: SourceState::Running,
            published: 0,
            completed: 0,
            pending: 0,
            last_event_age: Some(Duration::ZERO),
            last_error: None,
            next_due: None,
            lease: None,
        }
    }
    fn load_content<'a>(
        &'a self,
        _task: &'a Task,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, SourceError>> {
        Box::pin(async { Ok(None) })
    }
    fn complete<'a>(&'a self, _task: &'a Task) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async { Ok(()) })
    }
}

/// Counts the tasks it handles.
#[derive(Default)]
struct Counting(AtomicUsize);

impl TaskHandler for Counting {
    fn handle<'a>(
        &'a self,
        _task: &'a Task,
        _ctx: &'a HandlerContext,
    ) -> BoxFuture<'a, Result<Outcome, HandlerError>> {
        Box::pin(async move {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(Outcome::new("done"))
        })
    }
}

async fn runtime(
    source: Arc<Crashy>,
    config: ConfigurationManager,
) -> (RuntimeManager, Arc<Counting>) {
    let handler = Arc::new(Counting::default());
    let mut runtime = RuntimeBuilder::new(Arc::new(config))
        .queue(
            "jobs",
            Arc::new(MemoryQueue::new("jobs", MemoryQueueConfig::default())),
        )
        .source(source, "jobs")
        .module(Arc::new(OneHandler {
            pool: "jobs",
            kind: "job",
            handler: handler.clone(),
            source: None,
        }))
        .build()
        .await
        .expect("build");
    runtime.start().expect("start");
    (runtime, handler)
}

async fn until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn restarts_metric(text: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with("plba_source_restarts_total{") && l.contains("crashy"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_panics_or_fails_at_start_is_started_again_with_backoff() {
    let config = ConfigurationManager::builder()
        .env(HashMap::new())
        .load(ConfigOrigin::Embedded {
            name: "test".into(),
            text: String::new(),
        })
        .expect("config");
    let source = Crashy::new(vec![Start::Panic, Start::Fail, Start::Run]);
    let (runtime, handler) = runtime(source.clone(), config).await;

    // Between the panic and the next start, the source is down with the reason, and
    // readiness says so.
    until("the first start's panic", async || {
        source.starts.load(Ordering::SeqCst) >= 1
            && runtime.status().await.sources["crashy"]
                .last_error
                .is_some()
    })
    .await;
    let status = runtime.status().await;
    let report = &status.sources["crashy"];
    if source.starts.load(Ordering::SeqCst) == 1 {
        assert_eq!(report.state, SourceState::Degraded, "{report:?}");
        let why = report.last_error.as_deref().unwrap_or_default();
        assert!(why.contains("panicked: start 0 blew up"), "{why}");
        let ready = runtime.health().check(Probe::Readiness).await;
        assert!(!ready.healthy, "{ready:?}");
    }

    // The failed start is tried again too, and the third start runs and publishes.
    until("the third start's task", async || {
        handler.0.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(source.starts.load(Ordering::SeqCst), 3);
    let began = source.began.lock().expect("lock").clone();
    let (first, second) = (began[1] - began[0], began[2] - began[1]);
    assert!(
        first >= Duration::from_millis(750) && second >= Duration::from_millis(1_500),
        "backoff grows from about a second: {first:?}, {second:?}"
    );
    until("readiness after the restarts", async || {
        runtime.health().check(Probe::Readiness).await.healthy
    })
    .await;
    let status = runtime.status().await;
    assert_eq!(status.sources["crashy"].restarts, 2);
    assert_eq!(status.sources["crashy"].state, SourceState::Running);
    assert_eq!(restarts_metric(&runtime.metrics_text().await), Some(2));
    runtime.shutdown().await;
    assert_eq!(
        source.starts.load(Ordering::SeqCst),
        3,
        "not started again at shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_hands_the_source_its_section_and_restarts_it_when_it_asks() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("config.toml");
    let write = |interval: u64, folder: &str| {
        std::fs::write(
            &path,
            format!("[sources.crashy]\ntype = \"test\"\ninterval = {interval}\nfolder = \"{folder}\"\n[pools.jobs]\nworkers = 1\n"),
        )
        .expect("write");
    };
    write(100, "INBOX");
    let config = ConfigurationManager::builder()
        .env(HashMap::new())
        .claim("sources", |_| Vec::new())
        .load(ConfigOrigin::File(path.clone()))
        .expect("config");
    let source = Crashy::new(vec![Start::Run]);
    let (runtime, handler) = runtime(source.clone(), config).await;
    until("the first task", async || {
        handler.0.load(Ordering::SeqCst) == 1
    })
    .await;

    // Applied: the source got its whole section, and was not started again.
    write(200, "INBOX");
    let report = runtime.reload().expect("valid");
    assert_eq!(report.applied, vec!["sources.crashy.interval"]);
    assert!(report.needs_restart.is_empty() && report.restarted.is_empty());
    assert_eq!(
        source.sections.lock().expect("lock").last(),
        Some(&serde_json::json!({ "type": "test", "interval": 200, "folder": "INBOX" }))
    );

    // Refused: reported as needing a restart, with the source's reason.
    *source.answer.lock().expect("lock") = Reconfigure::Refused("the folder is fixed".into());
    write(200, "Orders");
    let report = runtime.reload().expect("valid");
    assert_eq!(report.needs_restart, vec!["sources.crashy.folder"]);
    assert_eq!(
        report
            .reasons
            .get("sources.crashy.folder")
            .map(String::as_str),
        Some("the folder is fixed")
    );
    assert_eq!(source.starts.load(Ordering::SeqCst), 1);

    // Restart: the running start is stopped and the source started again at once.
    *source.answer.lock().expect("lock") = Reconfigure::Restart;
    write(300, "Orders");
    let report = runtime.reload().expect("valid");
    assert_eq!(report.restarted, vec!["crashy"]);
    assert_eq!(report.applied, vec!["sources.crashy.interval"]);
    until("the restarted start's task", async || {
        handler.0.load(Ordering::SeqCst) == 2
    })
    .await;
    assert_eq!(source.starts.load(Ordering::SeqCst), 2);
    let status = runtime.status().await;
    assert_eq!(status.sources["crashy"].restarts, 1);
    assert!(status.sources["crashy"].last_error.is_none());
    runtime.shutdown().await;
}
