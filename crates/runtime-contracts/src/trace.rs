//! Trace context propagation from source to handler, and the spans of a task's stages.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use crate::queue::TaskQueue;
use crate::task::{Headers, Task, TaskId};

/// Writes the current trace context into task headers, so that the handler's span (and
/// every retry of it) joins the trace that published the task.
///
/// Called by sources when they build a task, before `publish`. The runtime core implements
/// it with OpenTelemetry's W3C trace-context propagator (`traceparent`, `tracestate`).
///
/// ```
/// use runtime_contracts::{Headers, TraceFactory};
/// struct Fixed;
/// impl TraceFactory for Fixed {
///     fn inject_current(&self, headers: &mut Headers) {
///         headers.insert("traceparent".into(),
///             "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
///     }
/// }
/// let mut headers = Headers::new();
/// Fixed.inject_current(&mut headers);
/// assert!(headers.contains_key("traceparent"));
/// ```
pub trait TraceFactory: Send + Sync {
    /// Writes the trace context of the current span (a new root when there is none).
    fn inject_current(&self, headers: &mut Headers);

    /// Starts the trace of one unit of work where the source first saw it: a root span
    /// (`trigger` says what woke the source: `poll`, `idle`, `scan`, `webhook`) and its
    /// publish span towards `queue`, whose context goes into the task's
    /// headers. Keep the guard until the publish returned: dropping it ends both spans.
    /// The default writes the current context, as [`TraceFactory::inject_current`].
    fn start_trace(
        &self,
        task: &mut Task,
        trigger: &'static str,
        queue: &dyn TaskQueue,
    ) -> SpanGuard {
        let _ = (trigger, queue);
        self.inject_current(&mut task.headers);
        SpanGuard::none()
    }
}

/// Keeps spans open; they end when it is dropped. Empty when nothing is traced.
#[derive(Default)]
pub struct SpanGuard(Option<Box<dyn Any + Send + Sync>>);

impl SpanGuard {
    /// A guard that holds nothing.
    pub fn none() -> Self {
        Self(None)
    }

    /// A guard that holds `spans` (any value whose drop ends them).
    pub fn new(spans: impl Any + Send + Sync) -> Self {
        Self(Some(Box::new(spans)))
    }

    /// True when it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }
}

impl fmt::Debug for SpanGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_empty() {
            "SpanGuard(none)"
        } else {
            "SpanGuard(open)"
        })
    }
}

/// Child spans of the tasks a handler was given, one per task, for the stages of its
/// work (`fetch`, `parse`, `store commit`...): a stage of a batch is a span in every
/// task's trace, so each task's trace shows all that was done for it. The runtime gives
/// one to each [`HandlerContext`](crate::HandlerContext); without one, stages cost
/// nothing.
pub trait StageTracer: Send + Sync {
    /// A stage that works for `tasks` at once (every task of the context when `None`).
    fn stage(&self, tasks: Option<&[Arc<Task>]>, name: &'static str) -> SpanGuard;
    /// A stage of the task `id` alone.
    fn task_stage(&self, id: &TaskId, name: &'static str) -> SpanGuard;
}
