use std::sync::Arc;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use runtime_contracts::{Headers, SpanGuard, StageTracer, Task, TaskId, TaskQueue, TraceFactory};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::LogFormat;
use crate::telemetry::{Telemetry, TelemetryConfig, TelemetryError};

/// One span per task attempt, whose parent is the trace context the source wrote into the
/// task's headers: every attempt of a task, retries included, joins the same trace.
///
/// When traces are exported ([`TraceService::exporting`]), a source starts each task's
/// trace with a root span and a publish span, attempts carry OpenTelemetry's messaging
/// attributes, and the stages of a handler and the completion at the source are child
/// spans of each sampled task's attempt. Without export none of these extra spans is made.
#[derive(Clone, Debug, Default)]
pub struct TraceService {
    propagator: Arc<TraceContextPropagator>,
    exporting: bool,
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

    /// A trace service that makes the spans of a full trace tree when `exporting` (spans
    /// leave the process), and only the attempt spans otherwise.
    pub fn exporting(exporting: bool) -> Self {
        Self {
            exporting,
            ..Self::default()
        }
    }

    /// True when it makes the full trace tree.
    pub fn is_exporting(&self) -> bool {
        self.exporting
    }

    /// The span of one attempt of `task` on `pool`, parented on the task's trace context;
    /// `system` is the queue's messaging system.
    pub fn task_span(&self, task: &Task, pool: &str, system: &'static str) -> tracing::Span {
        let span = if self.exporting {
            tracing::info_span!(
                "task",
                otel.name = %format_args!("process {pool}"),
                otel.kind = "consumer",
                otel.status_code = tracing::field::Empty,
                otel.status_description = tracing::field::Empty,
                "error.type" = tracing::field::Empty,
                messaging.system = system,
                "messaging.operation.type" = "process",
                messaging.operation.name = "process",
                messaging.destination.name = pool,
                messaging.message.id = %task.id,
                messaging.message.conversation_id = %task.correlation_id,
                plba.task.kind = %task.kind,
                plba.task.source = %task.source,
                task = %task.id,
                kind = %task.kind,
                attempt = task.attempt + 1,
                pool,
                correlation_id = %task.correlation_id,
                causation_id = task.causation_id.as_deref().unwrap_or(""),
                source = %task.source,
                pointer = %task.payload,
            )
        } else {
            tracing::info_span!(
                "task",
                task = %task.id,
                kind = %task.kind,
                attempt = task.attempt + 1,
                pool,
                correlation_id = %task.correlation_id,
                causation_id = task.causation_id.as_deref().unwrap_or(""),
                source = %task.source,
                pointer = %task.payload,
            )
        };
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

    /// Marks an attempt span as failed, with the class of the failure (`error`,
    /// `timeout`, `panic`...) as `error.type`.
    pub fn record_failure(span: &tracing::Span, class: &str, reason: &str) {
        span.record("error.type", class);
        span.record("otel.status_description", reason);
    }

    /// The stage spans of the tasks whose attempt spans are `spans`: `None` when nothing
    /// is exported or none of the tasks is sampled.
    pub fn stages<'a>(
        &self,
        tasks: impl IntoIterator<Item = &'a Task>,
        spans: &[tracing::Span],
    ) -> Option<Arc<dyn StageTracer>> {
        if !self.exporting {
            return None;
        }
        let sampled: Vec<(TaskId, tracing::Span)> = tasks
            .into_iter()
            .zip(spans)
            .filter(|(_, s)| is_sampled(s))
            .map(|(t, s)| (t.id.clone(), s.clone()))
            .collect();
        (!sampled.is_empty()).then(|| Arc::new(StageSpans(sampled)) as Arc<dyn StageTracer>)
    }

    /// Spans named `name` under each sampled span of `spans` (none when not exporting);
    /// they end when the returned vector drops.
    pub fn children<'a>(
        &self,
        spans: impl IntoIterator<Item = &'a tracing::Span>,
        name: &'static str,
    ) -> Vec<tracing::Span> {
        if !self.exporting {
            return Vec::new();
        }
        spans
            .into_iter()
            .filter(|s| is_sampled(s))
            .map(|s| stage_span(s, name))
            .collect()
    }

    /// The trace id carried in `headers`, if any.
    pub fn trace_id(&self, headers: &Headers) -> Option<TraceId> {
        let cx = self.propagator.extract(&HeaderExtractor(headers));
        let sc = cx.span().span_context().clone();
        sc.is_valid().then(|| sc.trace_id())
    }
}

fn is_sampled(span: &tracing::Span) -> bool {
    span.context().span().span_context().is_sampled()
}

fn stage_span(parent: &tracing::Span, name: &'static str) -> tracing::Span {
    tracing::info_span!(parent: parent, "stage", otel.name = name, stage = name)
}

/// The attempt spans of a handler's sampled tasks.
struct StageSpans(Vec<(TaskId, tracing::Span)>);

impl StageSpans {
    fn span_of(&self, id: &TaskId) -> Option<&tracing::Span> {
        self.0.iter().find(|(t, _)| t == id).map(|(_, s)| s)
    }
}

impl StageTracer for StageSpans {
    fn stage(&self, tasks: Option<&[Arc<Task>]>, name: &'static str) -> SpanGuard {
        let spans: Vec<tracing::Span> = match tasks {
            None => self.0.iter().map(|(_, s)| stage_span(s, name)).collect(),
            Some(tasks) => tasks
                .iter()
                .filter_map(|t| self.span_of(&t.id))
                .map(|s| stage_span(s, name))
                .collect(),
        };
        if spans.is_empty() {
            SpanGuard::none()
        } else {
            SpanGuard::new(spans)
        }
    }

    fn task_stage(&self, id: &TaskId, name: &'static str) -> SpanGuard {
        self.span_of(id)
            .map_or_else(SpanGuard::none, |s| SpanGuard::new(stage_span(s, name)))
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

/// Crates whose logs are capped at `debug` whatever filter is set (`RUST_LOG`, the config,
/// an admin's `PUT /log-level`): at `trace`, the IMAP client logs every command it writes,
/// `LOGIN "user" "password"` included, and every byte it reads, whole mail bodies included;
/// the AMQP and Redis clients log frames and commands with their payloads.
pub const CAPPED_AT_DEBUG: &[&str] =
    &["async_imap", "imap_proto", "lapin", "amq_protocol", "redis"];

/// The fixed filter under the reloadable one: [`CAPPED_AT_DEBUG`] at `debug` at most,
/// everything else as the reloadable filter says.
pub fn dependency_cap() -> tracing_subscriber::filter::Targets {
    use tracing_subscriber::filter::LevelFilter;
    CAPPED_AT_DEBUG.iter().fold(
        tracing_subscriber::filter::Targets::new().with_default(LevelFilter::TRACE),
        |targets, name| targets.with_target(*name, LevelFilter::DEBUG),
    )
}

/// [`install_subscriber_as`] with human-readable lines.
pub fn install_subscriber(filter: &str) -> Option<LogControl> {
    install_subscriber_as(filter, LogFormat::Text)
}

/// [`install_subscriber_with`] without trace export.
pub fn install_subscriber_as(filter: &str, format: LogFormat) -> Option<LogControl> {
    install_subscriber_with(filter, format, &TelemetryConfig::default(), "plba")
        .ok()
        .and_then(|(logs, _)| logs)
}

/// Installs the process-wide subscriber: logs on stderr (in `format`) filtered by
/// `RUST_LOG` or else `filter`, plus an OpenTelemetry layer so that spans carry trace ids,
/// exported over OTLP as `telemetry` says (without an endpoint, ids only join logs and
/// task headers; `service` is the default `service.name`). The log filter applies to the
/// logs only: task spans reach the OpenTelemetry layer whatever the log level, so a quiet
/// log never breaks a trace. Returns the handle that changes the log filter at run time
/// (`None` when a subscriber was already installed) and the export's handle. Must run
/// inside a Tokio runtime when exporting.
pub fn install_subscriber_with(
    filter: &str,
    format: LogFormat,
    telemetry: &TelemetryConfig,
    service: &str,
) -> Result<(Option<LogControl>, Telemetry), TelemetryError> {
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
    let (provider, export) = Telemetry::build(telemetry, service)?;
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
    .with_filter(log_filter)
    .with_filter(dependency_cap());
    let traces = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(LevelFilter::INFO);
    if tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .is_err()
    {
        return Ok((None, Telemetry::disabled()));
    }
    let logs = LogControl {
        current: std::sync::Mutex::new(initial),
        apply: Box::new(move |f| handle.reload(f).map_err(|e| e.to_string())),
    };
    Ok((Some(logs), export))
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

    fn start_trace(
        &self,
        task: &mut Task,
        trigger: &'static str,
        queue: &dyn TaskQueue,
    ) -> SpanGuard {
        if !self.exporting {
            self.inject_current(&mut task.headers);
            return SpanGuard::none();
        }
        let system = queue.system();
        let root = tracing::info_span!(
            parent: None,
            "receive",
            otel.name = %format_args!("{trigger} {}", task.source),
            otel.kind = "consumer",
            messaging.system = system,
            "messaging.operation.type" = "receive",
            messaging.operation.name = trigger,
            messaging.message.id = %task.id,
            plba.source = %task.source,
            plba.trigger = trigger,
        );
        let publish = tracing::info_span!(
            parent: &root,
            "publish",
            otel.name = %format_args!("send {}", queue.name()),
            otel.kind = "producer",
            messaging.system = system,
            "messaging.operation.type" = "send",
            messaging.operation.name = "send",
            messaging.destination.name = queue.name(),
            messaging.message.id = %task.id,
        );
        let cx = publish.context();
        if cx.span().span_context().is_valid() {
            self.propagator
                .inject_context(&cx, &mut HeaderInjector(&mut task.headers));
        } else {
            // No OpenTelemetry layer: the task still carries a trace id for its logs.
            self.inject_current(&mut task.headers);
        }
        SpanGuard::new((publish, root))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_crates_never_log_below_debug() {
        use tracing::Level;
        let cap = dependency_cap();
        for target in [
            "async_imap",
            "async_imap::client",
            "imap_proto::parser",
            "lapin::channel",
            "redis::aio",
        ] {
            assert!(!cap.would_enable(target, &Level::TRACE), "{target}");
            assert!(cap.would_enable(target, &Level::DEBUG), "{target}");
        }
        for target in [
            "runtime_core::supervisor",
            "mail_order_bot",
            "runtime_adapters",
        ] {
            assert!(cap.would_enable(target, &Level::TRACE), "{target}");
        }
    }

    #[test]
    fn published_tasks_carry_a_trace_that_survives_retries() {
        let trace = TraceService::new();
        let mut task = Task::new("t", "k", "s", serde_json::Value::Null).expect("task");
        trace.inject_current(&mut task.headers);
        let first = trace.trace_id(&task.headers).expect("traceparent written");
        task.attempt = 3;
        let _span = trace.task_span(&task, "pool", "plba");
        assert_eq!(trace.trace_id(&task.headers), Some(first));
        let mut other = Task::new("u", "k", "s", serde_json::Value::Null).expect("task");
        trace.inject_current(&mut other.headers);
        assert_ne!(trace.trace_id(&other.headers), Some(first));
    }
}
