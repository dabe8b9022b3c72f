use std::sync::Arc;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use runtime_contracts::{Headers, Task, TraceFactory};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::LogFormat;

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

/// [`install_subscriber_as`] with human-readable lines.
pub fn install_subscriber(filter: &str) -> Option<LogControl> {
    install_subscriber_as(filter, LogFormat::Text)
}

/// Installs the process-wide subscriber: logs on stderr (in `format`) filtered by
/// `RUST_LOG` or else `filter`, plus an OpenTelemetry layer so that spans carry trace ids
/// (no exporter is configured: ids join logs and task headers). The log filter applies to
/// the logs only: task spans reach the OpenTelemetry layer whatever the log level, so a
/// quiet log never breaks a trace. Returns the handle that changes the log filter at run
/// time, or `None` when a subscriber was already installed.
pub fn install_subscriber_as(filter: &str, format: LogFormat) -> Option<LogControl> {
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
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(JsonLines)
            .boxed(),
    }
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

/// One JSON object per event (see [`LogFormat::Json`]). Span fields come from
/// `JsonFields`, which stores each span's fields as a JSON object when the span is created.
struct JsonLines;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for JsonLines
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        use serde_json::{Map, Value};
        use tracing_subscriber::fmt::time::FormatTime;

        let meta = event.metadata();
        let mut fields = JsonVisitor(Map::new());
        event.record(&mut fields);
        let mut fields = fields.0;
        let message = fields
            .remove("message")
            .unwrap_or_else(|| Value::String(String::new()));
        let mut timestamp = String::new();
        tracing_subscriber::fmt::time::SystemTime.format_time(
            &mut tracing_subscriber::fmt::format::Writer::new(&mut timestamp),
        )?;
        let mut line = Map::new();
        line.insert("timestamp".into(), Value::String(timestamp));
        line.insert("level".into(), Value::String(meta.level().as_str().into()));
        line.insert("target".into(), Value::String(meta.target().into()));
        line.insert("message".into(), message);
        line.insert("fields".into(), Value::Object(fields));
        let mut spans = Vec::new();
        let mut ids = None;
        for span in ctx.event_scope().into_iter().flat_map(|s| s.from_root()) {
            let extensions = span.extensions();
            let mut entry = Map::new();
            entry.insert("name".into(), Value::String(span.name().into()));
            if let Some(Value::Object(recorded)) = extensions
                .get::<tracing_subscriber::fmt::FormattedFields<N>>()
                .and_then(|f| serde_json::from_str(f).ok())
            {
                entry.extend(recorded);
            }
            if let Some(otel) = extensions.get::<tracing_opentelemetry::OtelData>() {
                if let (Some(trace), Some(span)) = (otel.trace_id(), otel.span_id()) {
                    ids = Some((trace, span));
                }
            }
            spans.push(Value::Object(entry));
        }
        if !spans.is_empty() {
            line.insert("spans".into(), Value::Array(spans));
        }
        if let Some((trace, span)) = ids.filter(|(t, _)| *t != TraceId::INVALID) {
            line.insert("trace_id".into(), Value::String(trace.to_string()));
            line.insert("span_id".into(), Value::String(span.to_string()));
        }
        writeln!(writer, "{}", Value::Object(line))
    }
}

/// An event's fields as JSON values (numbers and booleans kept, the rest as text).
struct JsonVisitor(serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for JsonVisitor {
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
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
