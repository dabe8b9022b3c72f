use std::sync::Arc;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use runtime_contracts::{Headers, Task, TraceFactory};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// One span per task attempt, whose parent is the trace context the source wrote into the
/// task's headers: every attempt of a task, retries included, joins the same trace.
#[derive(Clone, Debug, Default)]
pub struct TraceService {
    propagator: Arc<TraceContextPropagator>,
}

struct HeaderInjector<'a>(&'a mut Headers);
impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct HeaderExtractor<'a>(&'a Headers);
impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

impl TraceService {
    /// A trace service with the W3C trace-context propagator.
    pub fn new() -> Self {
        Self::default()
    }

    /// The span of one attempt of `task` on `pool`, parented on the task's trace context.
    pub fn task_span(&self, task: &Task, pool: &str) -> tracing::Span {
        let span = tracing::info_span!(
            "task",
            task = %task.id,
            kind = %task.kind,
            attempt = task.attempt + 1,
            pool,
            correlation_id = %task.correlation_id,
        );
        if task.headers.is_empty() {
            return span;
        }
        let parent = self.propagator.extract(&HeaderExtractor(&task.headers));
        if parent.span().span_context().is_valid() {
            // An error only means no OpenTelemetry layer is installed: nothing to join.
            let _ = span.set_parent(parent);
        }
        span
    }

    /// The trace id carried in `headers`, if any.
    pub fn trace_id(&self, headers: &Headers) -> Option<TraceId> {
        let cx = self.propagator.extract(&HeaderExtractor(headers));
        let sc = cx.span().span_context().clone();
        sc.is_valid().then(|| sc.trace_id())
    }
}

/// Reads and changes the log filter of the running process.
pub struct LogControl {
    current: std::sync::Mutex<String>,
    apply: Box<dyn Fn(tracing_subscriber::EnvFilter) -> Result<(), String> + Send + Sync>,
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogControl")
            .field("current", &self.current())
            .finish()
    }
}

impl LogControl {
    /// The filter in force, in `tracing` syntax.
    pub fn current(&self) -> String {
        self.current.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Replaces the filter; an invalid one is refused and nothing changes.
    pub fn set(&self, filter: &str) -> Result<(), String> {
        let parsed = tracing_subscriber::EnvFilter::try_new(filter)
            .map_err(|e| format!("invalid log filter {filter:?}: {e}"))?;
        (self.apply)(parsed)?;
        if let Ok(mut current) = self.current.lock() {
            *current = filter.to_owned();
        }
        Ok(())
    }
}

/// Installs the process-wide subscriber: human-readable logs on stderr filtered by
/// `RUST_LOG` or else `filter`, plus an OpenTelemetry layer so that spans carry trace ids
/// (no exporter is configured: ids join logs and task headers). The log filter applies to
/// the logs only: task spans reach the OpenTelemetry layer whatever the log level, so a
/// quiet log never breaks a trace. Returns the handle that changes the log filter at run
/// time, or `None` when a subscriber was already installed.
pub fn install_subscriber(filter: &str) -> Option<LogControl> {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::filter::LevelFilter;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{reload, EnvFilter, Layer};

    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| EnvFilter::try_new(v).is_ok());
    let initial = from_env.unwrap_or_else(|| filter.to_owned());
    let log_filter = EnvFilter::try_new(&initial).unwrap_or_else(|_| EnvFilter::new("info"));
    let (log_filter, handle) = reload::Layer::new(log_filter);
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let tracer = provider.tracer("plba");
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(log_filter);
    let traces = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(LevelFilter::INFO);
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .ok()?;
    Some(LogControl {
        current: std::sync::Mutex::new(initial),
        apply: Box::new(move |f| handle.reload(f).map_err(|e| e.to_string())),
    })
}

impl TraceFactory for TraceService {
    fn inject_current(&self, headers: &mut Headers) {
        let current = tracing::Span::current().context();
        let cx = if current.span().span_context().is_valid() {
            current
        } else {
            let root = SpanContext::new(
                TraceId::from_bytes(fastrand::u128(1..).to_be_bytes()),
                SpanId::from_bytes(fastrand::u64(1..).to_be_bytes()),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            );
            Context::new().with_remote_span_context(root)
        };
        self.propagator
            .inject_context(&cx, &mut HeaderInjector(headers));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_tasks_carry_a_trace_that_survives_retries() {
        let trace = TraceService::new();
        let mut task = Task::new("t", "k", "s", serde_json::Value::Null).expect("task");
        trace.inject_current(&mut task.headers);
        let first = trace.trace_id(&task.headers).expect("traceparent written");
        task.attempt = 3;
        let _span = trace.task_span(&task, "pool");
        assert_eq!(trace.trace_id(&task.headers), Some(first));
        let mut other = Task::new("u", "k", "s", serde_json::Value::Null).expect("task");
        trace.inject_current(&mut other.headers);
        assert_ne!(trace.trace_id(&other.headers), Some(first));
    }
}
