//! A schedule source (`source-schedule` feature): one task per slot of a cron expression.
//!
//! The expression has a seconds field (`sec min hour day-of-month month day-of-week
//! [year]`, as the `cron` crate reads it; a classic five-field expression gets `0` seconds)
//! and is read in a time zone (`time_zone`, IANA, UTC by default), so `0 0 9 * * Mon-Fri`
//! in `Europe/Berlin` fires at nine in Berlin in summer and in winter.
//!
//! The task of a slot has the id `schedule:<source>:<slot in UTC>` and keeps that id known
//! after its ack ([`Task::keep_id_after_ack`]): a restart, or a second replica sharing a
//! Redis or AMQP queue, that fires the same slot again gets `AlreadyKnown`, so a slot runs
//! once. (On the in-memory queue that memory dies with the process.)
//!
//! A slot is on time when it is published within `misfire_grace_ms` of its time. Later
//! slots (the process was down, or the queue was) are misfires: `misfire = "skip"` drops
//! them (and says so in the log), `misfire = "catch_up"` fires the newest `catch_up_max`
//! of them, looking back at most `catch_up_window_secs` when the source starts. With `skip`
//! the source fires at start the latest slot of the last grace period, so a slot that falls
//! into a restart is fired by the new process (and deduplicated if the old one had fired
//! it).
//!
//! A publish that fails is retried every second until it succeeds or its slots become
//! misfires; `/status` shows the next slot (`next_due`) and the last error.

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use chrono_tz::Tz;
use runtime_contracts::{
    BoxFuture, ConfigProblem, PublishResult, SourceContext, SourceError, SourceState, SourceStatus,
    Task, TaskSource,
};
use serde::Deserialize;
use serde_json::json;

/// What happens to slots that could not fire on time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Misfire {
    /// Drop them; fire the next slot on time.
    #[default]
    Skip,
    /// Fire the newest `catch_up_max` of them, then go on.
    CatchUp,
}

/// `[sources.<id>]` with `type = "schedule"`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ScheduleConfig {
    /// The cron expression, with seconds: `0 */5 * * * *` is every five minutes.
    pub cron: String,
    /// The IANA time zone the expression is read in (`Europe/Berlin`).
    #[serde(default = "default_time_zone")]
    pub time_zone: String,
    /// The pool whose queue receives the tasks.
    pub pool: String,
    /// Kind of the published tasks.
    #[serde(default = "default_kind")]
    pub kind: String,
    /// `skip` or `catch_up`.
    #[serde(default)]
    pub misfire: Misfire,
    /// How late a slot may be published and still be on time, in milliseconds.
    #[serde(default = "default_grace")]
    pub misfire_grace_ms: u64,
    /// Most misfired slots fired at once by `catch_up` (the newest ones).
    #[serde(default = "default_catch_up_max")]
    pub catch_up_max: usize,
    /// How far back `catch_up` looks when the source starts, in seconds. Keep it within
    /// the queue's dedupe window, or a restart could fire a slot a second time.
    #[serde(default = "default_catch_up_window")]
    pub catch_up_window_secs: u64,
}

fn default_time_zone() -> String {
    "UTC".into()
}
fn default_kind() -> String {
    "schedule.slot".into()
}
fn default_grace() -> u64 {
    60_000
}
fn default_catch_up_max() -> usize {
    10
}
fn default_catch_up_window() -> u64 {
    24 * 3600
}

/// A cron expression with its time zone.
#[derive(Clone, Debug)]
pub struct Slots {
    schedule: cron::Schedule,
    zone: Tz,
}

impl Slots {
    /// Reads an expression (six or seven fields; five get `0` seconds) in a time zone.
    pub fn new(expression: &str, zone: &str) -> Result<Self, String> {
        let zone = Tz::from_str(zone.trim())
            .map_err(|_| format!("{zone:?} is not an IANA time zone (Europe/Berlin, UTC)"))?;
        let fields = expression.split_whitespace().count();
        let expression = if fields == 5 {
            format!("0 {expression}")
        } else {
            expression.to_owned()
        };
        let schedule = cron::Schedule::from_str(&expression)
            .map_err(|e| format!("{expression:?} is not a cron expression: {e}"))?;
        Ok(Self { schedule, zone })
    }

    /// The first slot strictly after `t`.
    pub fn after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.schedule
            .after(&t.with_timezone(&self.zone))
            .next()
            .map(|s| s.with_timezone(&Utc))
    }

    /// Slots in `(from, to]`, oldest first, at most `limit` of the newest.
    fn between(&self, from: DateTime<Utc>, to: DateTime<Utc>, limit: usize) -> Vec<DateTime<Utc>> {
        let mut slots = std::collections::VecDeque::new();
        let mut t = from;
        while let Some(slot) = self.after(t).filter(|s| *s <= to) {
            if slots.len() == limit {
                slots.pop_front();
            }
            slots.push_back(slot);
            t = slot;
        }
        slots.into()
    }

    /// A slot as the expression's zone writes it.
    fn local(&self, slot: DateTime<Utc>) -> String {
        slot.with_timezone(&self.zone)
            .to_rfc3339_opts(SecondsFormat::Secs, false)
    }
}

impl ScheduleConfig {
    /// Problems with these values, keyed under `prefix`.
    pub fn problems(&self, prefix: &str) -> Vec<ConfigProblem> {
        let mut problems = runtime_contracts::config::require_positive(
            prefix,
            &[
                ("catch_up_max", self.catch_up_max as u64),
                ("catch_up_window_secs", self.catch_up_window_secs),
            ],
        );
        if Tz::from_str(self.time_zone.trim()).is_err() {
            problems.push(ConfigProblem::new(
                format!("{prefix}.time_zone"),
                format!(
                    "{:?} is not an IANA time zone (Europe/Berlin, UTC)",
                    self.time_zone
                ),
            ));
        } else if let Err(why) = Slots::new(&self.cron, &self.time_zone) {
            problems.push(ConfigProblem::new(format!("{prefix}.cron"), why));
        }
        if self.kind.is_empty() {
            problems.push(ConfigProblem::new(
                format!("{prefix}.kind"),
                "must not be empty",
            ));
        }
        problems
    }
}

/// Where the source reads the time: the system clock, or a test's.
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// The schedule source. See the module docs.
pub struct ScheduleSource {
    id: String,
    config: ScheduleConfig,
    clock: Clock,
    state: Mutex<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    state: Option<SourceState>,
    published: u64,
    completed: u64,
    misfired: u64,
    next_due: Option<String>,
    error: Option<String>,
    last_tick: Option<std::time::Instant>,
}

impl std::fmt::Debug for ScheduleSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScheduleSource")
            .field("id", &self.id)
            .field("cron", &self.config.cron)
            .field("time_zone", &self.config.time_zone)
            .finish_non_exhaustive()
    }
}

/// The longest sleep between two looks at the clock: a clock that jumps (NTP, a suspended
/// host) is noticed within this, and each look is progress for readiness, so a source
/// whose next slot is hours away stays ready under any `source_progress_bound_ms`.
const MAX_SLEEP: Duration = Duration::from_secs(1);
/// The wait before a failed publish is tried again.
const RETRY: Duration = Duration::from_secs(1);

impl ScheduleSource {
    /// A source named `id` on the system clock.
    pub fn new(id: impl Into<String>, config: ScheduleConfig) -> Self {
        Self::with_clock(id, config, Arc::new(Utc::now))
    }

    /// A source reading the time from `clock` (tests drive it with tokio's paused clock).
    pub fn with_clock(id: impl Into<String>, config: ScheduleConfig, clock: Clock) -> Self {
        Self {
            id: id.into(),
            config,
            clock,
            state: Mutex::default(),
        }
    }

    /// A clock that starts at `start` and runs with tokio's clock (paused in tests).
    pub fn tokio_clock(start: DateTime<Utc>) -> Clock {
        let base = tokio::time::Instant::now();
        Arc::new(move || {
            start + chrono::Duration::from_std(base.elapsed()).unwrap_or(chrono::Duration::zero())
        })
    }

    /// Misfired slots dropped (`skip`) since start.
    pub fn misfired(&self) -> u64 {
        self.counters().misfired
    }

    fn counters(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The tasks of `slots`.
    fn tasks(&self, slots: &Slots, fire: &[(DateTime<Utc>, bool)]) -> Result<Vec<Task>, String> {
        fire.iter()
            .map(|&(slot, misfired)| {
                let at = slot.to_rfc3339_opts(SecondsFormat::Secs, true);
                Task::new(
                    format!("schedule:{}:{at}", self.id),
                    self.config.kind.as_str(),
                    self.id.as_str(),
                    json!({
                        "source": self.id,
                        "slot": at,
                        "local": slots.local(slot),
                        "misfired": misfired,
                    }),
                )
                .map(Task::keep_id_after_ack)
                .map_err(|e| e.to_string())
            })
            .collect()
    }

    /// Publishes the tasks of `fire`; false when shutdown came first.
    async fn publish(&self, ctx: &SourceContext, tasks: Vec<Task>) -> Result<bool, String> {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(false),
            _ = ctx.backpressure.wait_for_capacity() => {}
        }
        let mut tasks = tasks;
        let traces: Vec<_> = tasks
            .iter_mut()
            .map(|t| ctx.tracer.start_trace(t, "schedule", &*ctx.queue))
            .collect();
        let ids: Vec<String> = tasks.iter().map(|t| t.id.to_string()).collect();
        let results = ctx
            .queue
            .publish_batch(tasks)
            .await
            .map_err(|e| e.to_string())?;
        drop(traces);
        let mut counters = self.counters();
        for (id, result) in ids.iter().zip(results) {
            if result == PublishResult::Enqueued {
                counters.published += 1;
                tracing::info!(source = %self.id, task = %id, "slot fired");
            } else {
                tracing::debug!(source = %self.id, task = %id, "slot already fired");
            }
        }
        Ok(true)
    }

    async fn run(&self, ctx: SourceContext) -> Result<(), SourceError> {
        let slots = Slots::new(&self.config.cron, &self.config.time_zone).map_err(|why| {
            SourceError::Io {
                source_id: self.id.clone(),
                message: why,
            }
        })?;
        let grace = chrono::Duration::milliseconds(
            i64::try_from(self.config.misfire_grace_ms).unwrap_or(i64::MAX / 2),
        );
        let start = (self.clock)();
        let lookback = match self.config.misfire {
            Misfire::Skip => grace,
            Misfire::CatchUp => chrono::Duration::seconds(
                i64::try_from(self.config.catch_up_window_secs).unwrap_or(i64::MAX / 2),
            )
            .max(grace),
        };
        // Every slot up to `done` has been fired or given up.
        let mut done = start - lookback;
        let mut first = true;
        self.counters().state = Some(SourceState::Running);
        loop {
            let now = (self.clock)();
            let due = slots.between(done, now, usize::MAX);
            let (mut on_time, late): (Vec<_>, Vec<_>) =
                due.iter().partition(|slot| now - **slot <= grace);
            if std::mem::take(&mut first) && self.config.misfire == Misfire::Skip {
                // At start only the latest slot of the grace period is one a restart may
                // have missed; the older ones were before it.
                on_time.drain(..on_time.len().saturating_sub(1));
            }
            let mut fire: Vec<(DateTime<Utc>, bool)> = Vec::new();
            match self.config.misfire {
                Misfire::Skip => {
                    if !late.is_empty() {
                        tracing::warn!(source = %self.id, skipped = late.len(), first = %late[0], "slots missed their time and are skipped (misfire = skip)");
                        self.counters().misfired += late.len() as u64;
                    }
                }
                Misfire::CatchUp => {
                    let keep = late.len().saturating_sub(self.config.catch_up_max);
                    if keep > 0 {
                        tracing::warn!(source = %self.id, dropped = keep, "more slots missed than catch_up_max: the oldest are dropped");
                        self.counters().misfired += keep as u64;
                    }
                    fire.extend(late[keep..].iter().map(|s| (*s, true)));
                }
            }
            fire.extend(on_time.iter().map(|s| (*s, false)));
            let mut retry = false;
            if !fire.is_empty() {
                let tasks = self
                    .tasks(&slots, &fire)
                    .map_err(|message| SourceError::Io {
                        source_id: self.id.clone(),
                        message,
                    })?;
                match self.publish(&ctx, tasks).await {
                    Ok(true) => self.counters().error = None,
                    Ok(false) => break,
                    Err(e) => {
                        tracing::warn!(source = %self.id, error = %e, "slots not published; trying again");
                        self.counters().error = Some(e);
                        retry = true;
                    }
                }
            }
            if !retry {
                // Misfires of `skip` are given up with the rest.
                done = due.last().copied().unwrap_or(done).max(done);
                self.counters().last_tick = Some(std::time::Instant::now());
            } else if let Some(last_late) =
                late.last().filter(|_| self.config.misfire == Misfire::Skip)
            {
                done = done.max(*last_late);
            }
            let next = slots.after(done.max(now));
            self.counters().next_due = next.map(|n| slots.local(n));
            let wait = if retry {
                RETRY
            } else {
                next.map_or(MAX_SLEEP, |n| {
                    (n - (self.clock)())
                        .to_std()
                        .unwrap_or(Duration::ZERO)
                        .min(MAX_SLEEP)
                })
            };
            tokio::select! {
                _ = ctx.shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        self.counters().state = Some(SourceState::Stopped);
        Ok(())
    }
}

impl TaskSource for ScheduleSource {
    fn id(&self) -> &str {
        &self.id
    }

    fn start(&self, ctx: SourceContext) -> BoxFuture<'_, Result<(), SourceError>> {
        Box::pin(self.run(ctx))
    }

    fn status(&self) -> SourceStatus {
        let c = self.counters();
        SourceStatus {
            state: c.state.unwrap_or(SourceState::Idle),
            published: c.published,
            completed: c.completed,
            pending: 0,
            // The loop looks at the clock at least every 30 s: an age far above that is a
            // stuck source, a quiet schedule is not.
            last_event_age: c.last_tick.map(|t| t.elapsed()),
            last_error: c.error.clone(),
            next_due: c.next_due.clone(),
            lease: None,
        }
    }

    /// The slot's payload (source, slot in UTC and local time, misfired).
    fn load_content<'a>(
        &'a self,
        task: &'a Task,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, SourceError>> {
        Box::pin(std::future::ready(super::payload_content(&self.id, task)))
    }

    /// Counts the slot done; there is nothing to mark.
    fn complete<'a>(&'a self, _task: &'a Task) -> BoxFuture<'a, Result<(), SourceError>> {
        self.counters().completed += 1;
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .expect("time")
            .with_timezone(&Utc)
    }

    #[test]
    fn slots_follow_the_time_zone_across_daylight_saving() {
        let nine = Slots::new("0 0 9 * * *", "Europe/Berlin").expect("slots");
        // Winter: UTC+1; summer: UTC+2.
        assert_eq!(
            nine.after(at("2026-01-10T00:00:00Z")),
            Some(at("2026-01-10T08:00:00Z"))
        );
        assert_eq!(
            nine.after(at("2026-07-10T00:00:00Z")),
            Some(at("2026-07-10T07:00:00Z"))
        );
        assert_eq!(
            nine.local(at("2026-07-10T07:00:00Z")),
            "2026-07-10T09:00:00+02:00"
        );
    }

    #[test]
    fn five_fields_get_zero_seconds_and_bad_input_is_named() {
        let every_minute = Slots::new("* * * * *", "UTC").expect("slots");
        assert_eq!(
            every_minute.after(at("2026-01-10T00:00:30Z")),
            Some(at("2026-01-10T00:01:00Z"))
        );
        assert!(Slots::new("61 * * * * *", "UTC")
            .expect_err("bad seconds")
            .contains("not a cron expression"));
        assert!(Slots::new("0 * * * * *", "Mars/Olympus")
            .expect_err("bad zone")
            .contains("IANA"));
    }

    #[test]
    fn between_keeps_the_newest_slots() {
        let every_second = Slots::new("* * * * * *", "UTC").expect("slots");
        let from = at("2026-01-10T00:00:00Z");
        let to = at("2026-01-10T00:00:10Z");
        let all = every_second.between(from, to, usize::MAX);
        assert_eq!(all.len(), 10, "(from, to]: the first second is not in");
        let newest = every_second.between(from, to, 3);
        assert_eq!(newest, all[7..].to_vec());
    }
}
