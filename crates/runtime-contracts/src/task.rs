//! The unit of work and its envelope.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Trace context and other string headers carried with a task (W3C `traceparent`,
/// `tracestate`, ...). Ordered so that an envelope serialises the same way every time.
pub type Headers = BTreeMap<String, String>;

/// Stable identity of a task. A source derives it from what the task points at (for a
/// Maildir message: the source id and the file's unique name), so publishing the same
/// pointer twice yields the same id and a queue can refuse the second copy.
///
/// Cheap to clone: queues keep it in their indexes without copying the text.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(Arc<str>);

impl TaskId {
    /// An id from text.
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        Self(id.into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::borrow::Borrow<str> for TaskId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// One failed attempt, kept in the task's history so that a dead letter shows every reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptFailure {
    /// The attempt number that failed, starting at 1.
    pub attempt: u32,
    /// Why it failed, in words an operator can act on.
    pub reason: String,
    /// When it failed, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// When the next attempt was scheduled for, milliseconds since the Unix epoch; `None`
    /// when there was none (the task was dead-lettered) or it was not recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at_unix_ms: Option<u64>,
}

/// Errors raised when building a task.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TaskError {
    /// The payload is larger than [`Task::MAX_PAYLOAD_BYTES`]: tasks carry pointers, not content.
    #[error("task payload is {actual} bytes, above the {limit}-byte limit for pointer payloads")]
    PayloadTooLarge {
        /// Serialised size of the payload.
        actual: usize,
        /// The limit.
        limit: usize,
    },
    /// The id or kind is empty.
    #[error("task {0} must not be empty")]
    Empty(&'static str),
}

struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A unit of work: a small *pointer* to something a source owns (a mail file, an IMAP UID),
/// never the content itself, plus the envelope the runtime needs to route, trace and retry it.
///
/// ```
/// use runtime_contracts::Task;
/// let task = Task::new("maildir:inbox:1700000000.M1P1.host", "mail.message", "inbox",
///     serde_json::json!({"file": "1700000000.M1P1.host"})).unwrap();
/// assert_eq!(task.attempt, 0);
/// assert_eq!(task.schema_version, Task::SCHEMA_VERSION);
/// assert_eq!(&*task.correlation_id, task.id.as_str());
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// Envelope schema version; a consumer refuses versions it does not know.
    pub schema_version: u16,
    /// Stable identity derived from the pointer.
    pub id: TaskId,
    /// What kind of work this is; selects the handler within a pool.
    pub kind: Arc<str>,
    /// Id of the source that published the task and will complete it.
    pub source: Arc<str>,
    /// The pointer: small JSON the source understands.
    pub payload: serde_json::Value,
    /// Trace context and other headers, carried unchanged across retries.
    pub headers: Headers,
    /// Id shared by every task that belongs to the same business flow.
    pub correlation_id: Arc<str>,
    /// Id of the task or event that caused this one, if any.
    pub causation_id: Option<String>,
    /// How many attempts have failed so far (0 on the first delivery).
    pub attempt: u32,
    /// Every failed attempt, oldest first.
    pub history: Vec<AttemptFailure>,
}

impl Task {
    /// The envelope version this crate writes.
    pub const SCHEMA_VERSION: u16 = 1;
    /// The largest pointer payload a task may carry, serialised.
    pub const MAX_PAYLOAD_BYTES: usize = 4096;

    /// Builds a first-attempt task; the correlation id starts as the task id. Sources that
    /// publish many tasks pass `kind` and `source` as shared `Arc<str>` to avoid copies.
    pub fn new(
        id: impl Into<Arc<str>>,
        kind: impl Into<Arc<str>>,
        source: impl Into<Arc<str>>,
        payload: serde_json::Value,
    ) -> Result<Self, TaskError> {
        let id: Arc<str> = id.into();
        let kind = kind.into();
        if id.is_empty() {
            return Err(TaskError::Empty("id"));
        }
        if kind.is_empty() {
            return Err(TaskError::Empty("kind"));
        }
        let mut counter = ByteCounter(0);
        // Writing to a counter cannot fail; a failure would only undercount.
        let _ = serde_json::to_writer(&mut counter, &payload);
        let actual = counter.0;
        if actual > Self::MAX_PAYLOAD_BYTES {
            return Err(TaskError::PayloadTooLarge {
                actual,
                limit: Self::MAX_PAYLOAD_BYTES,
            });
        }
        Ok(Self {
            schema_version: Self::SCHEMA_VERSION,
            correlation_id: Arc::clone(&id),
            id: TaskId(id),
            kind,
            source: source.into(),
            payload,
            headers: Headers::new(),
            causation_id: None,
            attempt: 0,
            history: Vec::new(),
        })
    }

    /// Makes a dead letter a task again, for a replay: its attempts start over, and its
    /// `causation_id` is the dead letter it came from (its own id), so that a replay can be
    /// told from a first delivery; its correlation and history stay.
    ///
    /// ```
    /// let mut task = runtime_contracts::Task::new("t1", "k", "s", serde_json::Value::Null).unwrap();
    /// task.attempt = 3;
    /// task.replayed_from_dead_letter();
    /// assert_eq!((task.attempt, task.causation_id.as_deref()), (0, Some("t1")));
    /// ```
    pub fn replayed_from_dead_letter(&mut self) {
        self.attempt = 0;
        self.causation_id = Some(self.id.to_string());
    }

    /// A task that `cause` made (an effect of its outcome, a run again after a fix): it
    /// joins `cause`'s business flow (its correlation id) and names it as its cause.
    #[must_use]
    pub fn caused_by(mut self, cause_id: &str, correlation_id: &str) -> Self {
        self.causation_id = Some(cause_id.to_owned());
        self.correlation_id = correlation_id.into();
        self
    }

    /// The reason of the latest failed attempt, if any.
    pub fn last_failure(&self) -> Option<&AttemptFailure> {
        self.history.last()
    }

    /// The header that asks a queue to keep refusing the task's id after the task is
    /// acknowledged, for the queue's dedupe window (`dedupe_ttl_secs`).
    pub const KEEP_ID_HEADER: &'static str = "plba-keep-id";

    /// Marks the task so that its id stays known after it is acknowledged: a second
    /// publish of the same id (a provider retrying a delivery that was already done, a
    /// schedule slot fired again by a restart or a second replica) is
    /// [`AlreadyKnown`](crate::PublishResult::AlreadyKnown) for the queue's dedupe window.
    /// A pointer whose work can come back (a Maildir message marked unread again) keeps its
    /// id for a short window at most ([`Task::keep_id_after_ack_for`]), or not at all.
    ///
    /// ```
    /// use runtime_contracts::Task;
    /// let task = Task::new("webhook:graph:42", "k", "s", serde_json::Value::Null).unwrap();
    /// assert!(!task.keeps_id_after_ack());
    /// assert!(task.keep_id_after_ack().keeps_id_after_ack());
    /// ```
    #[must_use]
    pub fn keep_id_after_ack(mut self) -> Self {
        self.headers
            .insert(Self::KEEP_ID_HEADER.to_owned(), String::new());
        self
    }

    /// [`Task::keep_id_after_ack`] for at most `window` (never beyond the queue's own dedupe
    /// window): long enough to close a race between two publishers of one pointer, short
    /// enough that the pointer can be published again afterwards.
    ///
    /// ```
    /// use std::time::Duration;
    /// use runtime_contracts::Task;
    /// let task = Task::new("imap:inbox:INBOX:7:42", "k", "s", serde_json::Value::Null).unwrap();
    /// let kept = task.keep_id_after_ack_for(Duration::from_secs(300));
    /// assert_eq!(kept.kept_for(), Some(Duration::from_secs(300)));
    /// ```
    #[must_use]
    pub fn keep_id_after_ack_for(mut self, window: std::time::Duration) -> Self {
        self.headers.insert(
            Self::KEEP_ID_HEADER.to_owned(),
            window.as_secs().max(1).to_string(),
        );
        self
    }

    /// The header that carries a task's fence: `<token> <resource>`.
    pub const FENCE_HEADER: &'static str = "plba-fence";

    /// Marks the task as published under the lease on `resource` with fencing `token`
    /// ([`Leases`](crate::Leases)). A queue that hands out leases refuses it with
    /// [`QueueError::Fenced`](crate::QueueError::Fenced) once a later lease on `resource`
    /// has a larger token: a publisher that was paused past its lease cannot publish
    /// what it saw before it lost the lease.
    ///
    /// ```
    /// use runtime_contracts::Task;
    /// let task = Task::new("imap:inbox:INBOX:7:42", "k", "s", serde_json::Value::Null).unwrap();
    /// assert_eq!(task.fence(), None);
    /// let task = task.fenced("imap/orders@mail:993/inbox", 12);
    /// assert_eq!(task.fence(), Some(("imap/orders@mail:993/inbox", 12)));
    /// ```
    #[must_use]
    pub fn fenced(mut self, resource: &str, token: u64) -> Self {
        self.headers
            .insert(Self::FENCE_HEADER.to_owned(), format!("{token} {resource}"));
        self
    }

    /// The resource and token the task was published under ([`Task::fenced`]).
    pub fn fence(&self) -> Option<(&str, u64)> {
        let (token, resource) = self.headers.get(Self::FENCE_HEADER)?.split_once(' ')?;
        Some((resource, token.parse().ok()?))
    }

    /// Whether the queue keeps the id after the ack (see [`Task::keep_id_after_ack`]).
    pub fn keeps_id_after_ack(&self) -> bool {
        self.headers.contains_key(Self::KEEP_ID_HEADER)
    }

    /// How long the id is kept after the ack when the task says
    /// ([`Task::keep_id_after_ack_for`]); `None`: the queue's dedupe window, or not kept.
    pub fn kept_for(&self) -> Option<std::time::Duration> {
        self.headers
            .get(Self::KEEP_ID_HEADER)
            .and_then(|v| v.parse::<u64>().ok())
            .map(std::time::Duration::from_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_content_sized_payloads() {
        let big = "x".repeat(Task::MAX_PAYLOAD_BYTES);
        let err = Task::new("t", "k", "s", serde_json::json!({ "body": big }))
            .expect_err("payload above the limit");
        assert!(matches!(err, TaskError::PayloadTooLarge { .. }));
    }

    #[test]
    fn refuses_empty_id_and_kind() {
        assert_eq!(
            Task::new("", "k", "s", serde_json::Value::Null),
            Err(TaskError::Empty("id"))
        );
        assert_eq!(
            Task::new("t", "", "s", serde_json::Value::Null),
            Err(TaskError::Empty("kind"))
        );
    }

    #[test]
    fn envelope_round_trips_through_json() {
        let mut task = Task::new("t1", "k", "s", serde_json::json!({"uid": 7})).expect("task");
        task.headers
            .insert("traceparent".into(), "00-abc-def-01".into());
        let text = serde_json::to_string(&task).expect("serialise");
        let back: Task = serde_json::from_str(&text).expect("deserialise");
        assert_eq!(back, task);
    }
}
