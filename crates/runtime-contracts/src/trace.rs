//! Trace context propagation from source to handler.

use crate::task::Headers;

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
}
