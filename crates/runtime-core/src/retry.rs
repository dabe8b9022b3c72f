//! The delays between a task's attempts: [`RetryPolicy`] and its stepped schedule.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The delays between attempts: exponential backoff with jitter and a cap, or a stepped
/// schedule.
///
/// Exponential: the delay before retry `n` (1-based) is `initial * multiplier^(n-1)`,
/// capped at `max`, then spread by ±`jitter` (a fraction) so that tasks that failed
/// together do not retry together.
///
/// Stepped (`schedule = ["1m", "5m", "30m"]`): retry `n` waits the `n`-th step exactly,
/// and the task is dead-lettered after the last (the pool's attempts are the steps plus
/// one). The due time is the queue's (the Redis scheduled set, an AMQP delay queue), so
/// a restart keeps it, and the attempt number travels with the task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RetryPolicy {
    /// Delay before the first retry, in milliseconds.
    pub initial_backoff_ms: u64,
    /// Upper bound of any delay, in milliseconds.
    pub max_backoff_ms: u64,
    /// Growth factor per attempt (at least 1).
    pub multiplier: f64,
    /// Relative spread, between 0 and 1.
    pub jitter: f64,
    /// A stepped schedule instead of the exponential fields: each retry's delay, as
    /// `500ms`, `30s`, `5m` or `1h` (at most 24 h a step).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub schedule: Vec<String>,
}

/// The longest step of a schedule (the longest delay an AMQP delay queue holds).
pub const MAX_STEP: Duration = Duration::from_secs(24 * 3600);

/// One step of a schedule: a whole number and a unit, `ms`, `s`, `m` or `h`.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(runtime_core::retry::parse_step("5m"), Ok(Duration::from_secs(300)));
/// assert_eq!(runtime_core::retry::parse_step("250ms"), Ok(Duration::from_millis(250)));
/// assert!(runtime_core::retry::parse_step("5 minutes").is_err());
/// ```
pub fn parse_step(step: &str) -> Result<Duration, String> {
    let digits = step.trim().len()
        - step
            .trim()
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .len();
    let (number, unit) = step.trim().split_at(digits);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{step:?} is not a duration such as \"30s\", \"5m\" or \"1h\""))?;
    let step_ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => None,
    }
    .ok_or_else(|| {
        format!("{step:?} is not a duration such as \"30s\", \"5m\" or \"1h\" (units: ms, s, m, h)")
    })?;
    let delay = Duration::from_millis(step_ms);
    if delay.is_zero() || delay > MAX_STEP {
        return Err(format!("{step:?} must be above 0 and at most 24h"));
    }
    Ok(delay)
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_backoff_ms: 500,
            max_backoff_ms: 60_000,
            multiplier: 2.0,
            jitter: 0.2,
            schedule: Vec::new(),
        }
    }
}

impl RetryPolicy {
    /// The schedule's steps, when it has one (and each step reads).
    pub fn steps(&self) -> Option<Vec<Duration>> {
        if self.schedule.is_empty() {
            return None;
        }
        self.schedule.iter().map(|s| parse_step(s).ok()).collect()
    }

    /// The delay before retry number `attempt` (1 after the first failure).
    pub fn backoff(&self, attempt: u32) -> Duration {
        if let Some(steps) = self.steps() {
            let index = usize::try_from(attempt.saturating_sub(1)).unwrap_or(usize::MAX);
            return steps[index.min(steps.len() - 1)];
        }
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let raw = self.initial_backoff_ms as f64 * self.multiplier.max(1.0).powi(exponent);
        let capped = raw.min(self.max_backoff_ms as f64);
        let spread = capped * self.jitter.clamp(0.0, 1.0) * (fastrand::f64() * 2.0 - 1.0);
        let millis = (capped + spread).clamp(0.0, self.max_backoff_ms as f64);
        Duration::from_millis(millis as u64)
    }

    /// Problems with the policy's values, keyed under `prefix`.
    pub fn problems(&self, prefix: &str) -> Vec<runtime_contracts::ConfigProblem> {
        use runtime_contracts::ConfigProblem;
        let mut problems = runtime_contracts::config::require_positive(
            prefix,
            &[("initial_backoff_ms", self.initial_backoff_ms)],
        );
        if self.max_backoff_ms < self.initial_backoff_ms {
            problems.push(ConfigProblem::new(
                format!("{prefix}.max_backoff_ms"),
                "must not be below initial_backoff_ms",
            ));
        }
        if !(self.multiplier >= 1.0 && self.multiplier.is_finite()) {
            problems.push(ConfigProblem::new(
                format!("{prefix}.multiplier"),
                "must be a finite number of at least 1",
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            problems.push(ConfigProblem::new(
                format!("{prefix}.jitter"),
                "must be between 0 and 1",
            ));
        }
        for (i, step) in self.schedule.iter().enumerate() {
            if let Err(why) = parse_step(step) {
                problems.push(ConfigProblem::new(format!("{prefix}.schedule[{i}]"), why));
            }
        }
        problems
    }

    /// Problems of a pool's raw `retry` table (as written) that the typed policy cannot
    /// see: a schedule beside the exponential fields, or one that is empty.
    pub fn raw_problems(
        prefix: &str,
        raw: &serde_json::Value,
    ) -> Vec<runtime_contracts::ConfigProblem> {
        use runtime_contracts::ConfigProblem;
        let Some(schedule) = raw.get("schedule") else {
            return Vec::new();
        };
        let mut problems = Vec::new();
        let exponential: Vec<&str> = [
            "initial_backoff_ms",
            "max_backoff_ms",
            "multiplier",
            "jitter",
        ]
        .into_iter()
        .filter(|k| raw.get(*k).is_some())
        .collect();
        if !exponential.is_empty() {
            problems.push(ConfigProblem::new(
                format!("{prefix}.schedule"),
                format!(
                    "a schedule replaces the exponential backoff; remove {} or the schedule",
                    exponential.join(", ")
                ),
            ));
        }
        if schedule.as_array().is_some_and(Vec::is_empty) {
            problems.push(ConfigProblem::new(
                format!("{prefix}.schedule"),
                "must name at least one step (\"1m\"), or be left out",
            ));
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(jitter: f64) -> RetryPolicy {
        RetryPolicy {
            initial_backoff_ms: 100,
            max_backoff_ms: 1_000,
            multiplier: 2.0,
            jitter,
            schedule: Vec::new(),
        }
    }

    #[test]
    fn grows_exponentially_until_the_cap() {
        let p = policy(0.0);
        let delays: Vec<u128> = (1..=6).map(|n| p.backoff(n).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn jitter_stays_within_its_spread_and_the_cap() {
        let p = policy(0.5);
        for _ in 0..200 {
            let d = p.backoff(2).as_millis();
            assert!((100..=300).contains(&d), "{d}");
            assert!(p.backoff(30).as_millis() <= 1000);
        }
    }

    #[test]
    fn huge_attempt_numbers_do_not_overflow() {
        assert_eq!(policy(0.0).backoff(u32::MAX).as_millis(), 1000);
    }

    #[test]
    fn reports_every_bad_value() {
        let p = RetryPolicy {
            initial_backoff_ms: 0,
            max_backoff_ms: 0,
            multiplier: 0.5,
            jitter: 2.0,
            schedule: vec!["5m".into(), "soon".into(), "0s".into(), "2d".into()],
        };
        let keys: Vec<String> = p
            .problems("pools.a.retry")
            .into_iter()
            .map(|p| p.key)
            .collect();
        assert_eq!(
            keys,
            [
                "pools.a.retry.initial_backoff_ms",
                "pools.a.retry.multiplier",
                "pools.a.retry.jitter",
                "pools.a.retry.schedule[1]",
                "pools.a.retry.schedule[2]",
                "pools.a.retry.schedule[3]"
            ]
        );
    }

    #[test]
    fn a_schedule_gives_each_retry_its_step_and_repeats_none() {
        let p = RetryPolicy {
            schedule: vec!["1m".into(), "5m".into(), "30m".into()],
            ..policy(0.5)
        };
        let delays: Vec<u64> = (1..=3).map(|n| p.backoff(n).as_secs()).collect();
        assert_eq!(delays, [60, 300, 1800], "exact: no jitter on a schedule");
    }

    #[test]
    fn a_schedule_is_not_mixed_with_the_exponential_fields() {
        let raw = serde_json::json!({"schedule": ["1m"], "initial_backoff_ms": 5, "jitter": 0.1});
        let problems = RetryPolicy::raw_problems("pools.a.retry", &raw);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].key, "pools.a.retry.schedule");
        assert!(
            problems[0].message.contains("initial_backoff_ms, jitter"),
            "{problems:?}"
        );
        let empty =
            RetryPolicy::raw_problems("pools.a.retry", &serde_json::json!({"schedule": []}));
        assert_eq!(empty.len(), 1);
        assert!(
            RetryPolicy::raw_problems("pools.a.retry", &serde_json::json!({"jitter": 0.1}))
                .is_empty()
        );
    }
}
