//! Running mail again after a fix (`outcomes replay`): the messages recorded as
//! `unknown_client` or `no_lines` are published again, each as the task that first carried
//! it with a replay header, so the handler reads and decides it afresh (the client now
//! known, the lines now readable). The store replaces only an outcome of the replayed kind
//! (`OrderStore::record_replay`), so the order is made once and the reply now due is
//! written once; replaying again finds nothing of that kind and does nothing.
//!
//! Offered to operators as the action `outcomes.replay` (`POST /actions/outcomes.replay`,
//! the CLI's `outcomes replay`, the console's Outcomes page), with a dry run.

use runtime_contracts::{
    ActionError, ActionParam, ActionReport, ActionSpec, BoxFuture, OperatorActions, Task,
};

use super::store::{OrderStore, ReplayCandidate};
use super::OutcomeKind;

/// The outcome kinds an operator can replay: the ones a fix of the configuration (a
/// client added, an extraction option) can change.
pub const REPLAYABLE: [OutcomeKind; 2] = [OutcomeKind::UnknownClient, OutcomeKind::NoLines];

/// The action's name.
pub const ACTION: &str = "outcomes.replay";

/// Most messages one replay runs again (ask again for more).
pub const MAX_REPLAY: i64 = 10_000;

/// The bot's operator actions.
#[derive(Clone, Debug)]
pub struct ReplayActions {
    store: OrderStore,
    pool: String,
}

impl ReplayActions {
    /// Replays from `store` into the bot's `pool`.
    pub fn new(store: OrderStore, pool: impl Into<String>) -> Self {
        Self {
            store,
            pool: pool.into(),
        }
    }
}

/// A replay's parameters, checked.
#[derive(Debug, PartialEq, Eq)]
struct Params {
    kind: OutcomeKind,
    since: Option<String>,
    sender: Option<String>,
    limit: i64,
}

fn kinds() -> String {
    REPLAYABLE
        .iter()
        .map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join(" or ")
}

impl Params {
    fn of(params: &serde_json::Value) -> Result<Self, ActionError> {
        let bad = |m: String| ActionError::BadRequest(m);
        let map = params
            .as_object()
            .ok_or_else(|| bad("the parameters must be a JSON object".into()))?;
        if let Some(unknown) = map
            .keys()
            .find(|k| !["kind", "since", "sender", "limit"].contains(&k.as_str()))
        {
            return Err(bad(format!(
                "{unknown:?} is not a parameter of {ACTION} (kind, since, sender, limit)"
            )));
        }
        let text = |name: &str| -> Result<Option<String>, ActionError> {
            match map.get(name) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) if s.trim().is_empty() => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.trim().to_owned())),
                Some(other) => Err(bad(format!("{name}: {other} is not a string"))),
            }
        };
        let kind = text("kind")?.ok_or_else(|| bad(format!("kind is required: {}", kinds())))?;
        let kind = REPLAYABLE
            .iter()
            .copied()
            .find(|k| k.as_str() == kind)
            .ok_or_else(|| bad(format!("kind: {kind:?} cannot be replayed; {}", kinds())))?;
        let since = text("since")?;
        if let Some(s) = &since {
            let b = s.as_bytes();
            let shaped = b.len() == 10
                && b.iter().enumerate().all(|(i, c)| match i {
                    4 | 7 => *c == b'-',
                    _ => c.is_ascii_digit(),
                });
            if !shaped {
                return Err(bad(format!(
                    "since: {s:?} is not a date such as 2026-12-04"
                )));
            }
        }
        let limit = match map.get("limit") {
            None | Some(serde_json::Value::Null) => 1_000,
            // A number, or the text of one (a console form's field).
            Some(v) => v
                .as_i64()
                .or_else(|| v.as_str().and_then(|t| t.trim().parse().ok()))
                .filter(|n| (1..=MAX_REPLAY).contains(n))
                .ok_or_else(|| bad(format!("limit: {v} is not a number from 1 to {MAX_REPLAY}")))?,
        };
        Ok(Self {
            kind,
            since,
            sender: text("sender")?,
            limit,
        })
    }
}

/// The task that runs `candidate`'s message again.
fn replay_task(candidate: &ReplayCandidate, kind: OutcomeKind, at_ms: u128) -> Option<Task> {
    let stored: serde_json::Value = serde_json::from_str(&candidate.task).ok()?;
    let text = |name: &str| stored.get(name).and_then(|v| v.as_str());
    let first = text("id")?;
    let id = format!("{first}~replay~{at_ms}");
    // Caused by the task that first carried the message, in the message's flow.
    let mut task = Task::new(
        id,
        text("kind")?,
        text("source")?,
        stored.get("payload")?.clone(),
    )
    .ok()?
    .caused_by(first, text("correlation_id").unwrap_or(first));
    task.headers.insert(
        crate::module::REPLAY_HEADER.to_owned(),
        kind.as_str().to_owned(),
    );
    Some(task)
}

fn item(c: &ReplayCandidate) -> serde_json::Value {
    serde_json::json!({
        "message_identity": c.message_identity,
        "sender": c.sender,
        "subject": c.subject,
        "recorded_at": c.recorded_at,
    })
}

impl OperatorActions for ReplayActions {
    fn actions(&self) -> Vec<ActionSpec> {
        let param = |name: &str, help: &str, required: bool| ActionParam {
            name: name.to_owned(),
            help: help.to_owned(),
            required,
        };
        vec![ActionSpec {
            name: ACTION.to_owned(),
            summary: "Run the mail recorded as unknown_client or no_lines again through the handler (after a client was added or a fix): it makes the order once and sends the reply now due".to_owned(),
            params: vec![
                param("kind", &format!("the outcome to replay: {}", kinds()), true),
                param("since", "only outcomes recorded on or after this day (YYYY-MM-DD, UTC)", false),
                param("sender", "only mail from this address", false),
                param("limit", &format!("at most this many messages, oldest first (1000; up to {MAX_REPLAY})"), false),
            ],
        }]
    }

    fn run<'a>(
        &'a self,
        name: &'a str,
        params: &'a serde_json::Value,
        dry_run: bool,
    ) -> BoxFuture<'a, Result<Option<ActionReport>, ActionError>> {
        Box::pin(async move {
            if name != ACTION {
                return Ok(None);
            }
            let p = Params::of(params)?;
            let candidates = self
                .store
                .replay_candidates(p.kind, p.since.as_deref(), p.sender.as_deref(), p.limit)
                .await
                .map_err(|e| ActionError::Unavailable(format!("the order store: {e}")))?;
            let at_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or_default();
            let mut report = ActionReport::default();
            let mut unreadable = 0usize;
            for c in &candidates {
                match replay_task(c, p.kind, at_ms) {
                    Some(task) => {
                        report.items.push(item(c));
                        report.publish.push((self.pool.clone(), task));
                    }
                    None => unreadable += 1,
                }
            }
            let n = report.items.len();
            report.message = format!(
                "{} {n} message{} recorded as {} through the handler again{}",
                if dry_run { "would run" } else { "running" },
                if n == 1 { "" } else { "s" },
                p.kind.as_str(),
                if unreadable > 0 {
                    format!(" ({unreadable} left out: their task could not be read)")
                } else {
                    String::new()
                }
            );
            Ok(Some(report))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_checked_and_named() {
        let ok = Params::of(&serde_json::json!({"kind": "unknown_client", "since": "2026-12-01", "sender": " a@b.example "})).expect("ok");
        assert_eq!(ok.kind, OutcomeKind::UnknownClient);
        assert_eq!(ok.sender.as_deref(), Some("a@b.example"));
        assert_eq!(ok.limit, 1_000);
        let text_limit = Params::of(&serde_json::json!({"kind": "no_lines", "limit": "25"}));
        assert_eq!(text_limit.expect("ok").limit, 25);
        for (params, words) in [
            (serde_json::json!({}), "kind is required"),
            (serde_json::json!({"kind": "created"}), "cannot be replayed"),
            (
                serde_json::json!({"kind": "no_lines", "since": "yesterday"}),
                "since",
            ),
            (serde_json::json!({"kind": "no_lines", "limit": 0}), "limit"),
            (
                serde_json::json!({"kind": "no_lines", "force": true}),
                "\"force\"",
            ),
            (serde_json::json!([1]), "JSON object"),
        ] {
            let e = Params::of(&params).expect_err("refused");
            assert!(e.to_string().contains(words), "{params}: {e}");
        }
    }

    #[test]
    fn a_replay_task_is_the_first_task_with_its_header() {
        let c = ReplayCandidate {
            message_identity: "mid:a@b".into(),
            sender: None,
            subject: None,
            recorded_at: "2026-12-01T00:00:00.000Z".into(),
            task: r#"{"source":"inbox","kind":"mail.received","payload":{"unique":"u1"},"id":"maildir:inbox:u1"}"#.into(),
        };
        let t = replay_task(&c, OutcomeKind::NoLines, 7).expect("task");
        assert_eq!(t.id.as_str(), "maildir:inbox:u1~replay~7");
        assert_eq!(&*t.source, "inbox");
        assert_eq!(t.payload["unique"], "u1");
        assert_eq!(t.headers[crate::module::REPLAY_HEADER], "no_lines");
        assert_eq!(
            t.causation_id.as_deref(),
            Some("maildir:inbox:u1"),
            "caused by the first task"
        );
        assert_eq!(
            &*t.correlation_id, "maildir:inbox:u1",
            "in the message's flow"
        );
        let broken = ReplayCandidate {
            task: "{".into(),
            ..c
        };
        assert!(replay_task(&broken, OutcomeKind::NoLines, 7).is_none());
    }
}
