//! Every attempt of a task runs in a span of the trace its source started, retries included.
//! (Own test binary: it installs the process-wide subscriber.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::trace::TraceContextExt;
use plba_testkit::{OneHandler, StaticSource};
use runtime_adapters::queue::memory::{MemoryQueue, MemoryQueueConfig};
use runtime_contracts::*;
use runtime_core::config::ConfigOrigin;
use runtime_core::{ConfigurationManager, RuntimeBuilder, TraceService};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Fails twice, then succeeds; records the trace id it ran under and the task's header.
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<(String, Option<String>)>>,
}
impl TaskHandler for Recorder {
    fn handle<'a>(
        &'a self,
        task: &'a Task,
        _ctx: &'a HandlerContext,
    ) -> BoxFuture<'a, Result<Outcome, HandlerError>> {
        let trace_id = tracing::Span::current()
            .context()
            .span()
            .span_context()
            .trace_id()
            .to_string();
        let header = TraceService::new()
            .trace_id(&task.headers)
            .map(|t| t.to_string());
        let attempt = {
            let mut seen = self.seen.lock().expect("lock");
            seen.push((trace_id, header));
            seen.len()
        };
        Box::pin(async move {
            if attempt < 3 {
                Err(HandlerError::retry("again"))
            } else {
                Ok(Outcome::new("done"))
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_run_in_the_trace_the_source_started() {
    let logs = runtime_core::install_subscriber("warn").expect("first subscriber");
    assert_eq!(logs.current(), "warn");
    assert!(logs.set("not a [valid filter").is_err());
    assert_eq!(logs.current(), "warn");
    let text = "[pools.jobs]\nmax_attempts = 5\n[pools.jobs.retry]\ninitial_backoff_ms = 1\nmax_backoff_ms = 5\n";
    let config = ConfigurationManager::builder()
        .env(HashMap::new())
        .load(ConfigOrigin::Embedded {
            name: "t".into(),
            text: text.into(),
        })
        .expect("config");
    let recorder = Arc::new(Recorder::default());
    let mut runtime = RuntimeBuilder::new(Arc::new(config))
        .queue(
            "jobs",
            Arc::new(MemoryQueue::new("jobs", MemoryQueueConfig::default())),
        )
        .source(
            Arc::new(StaticSource::publishing(
                "one",
                vec![Task::new("t", "job", "one", serde_json::Value::Null).expect("task")],
            )),
            "jobs",
        )
        .module(Arc::new(OneHandler {
            pool: "jobs",
            kind: "job",
            handler: recorder.clone(),
            source: None,
        }))
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
    runtime.shutdown().await;

    let seen = recorder.seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 3, "two failures and a success");
    let header = seen[0].1.clone().expect("the source wrote a traceparent");
    for (trace_id, h) in &seen {
        assert_eq!(
            h.as_deref(),
            Some(header.as_str()),
            "the header survives retries"
        );
        assert_eq!(
            trace_id, &header,
            "the attempt's span belongs to the source's trace"
        );
    }
}
