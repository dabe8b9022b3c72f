use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Exponential backoff with jitter and a cap: the delay before retry `n` (1-based) is
/// `initial * multiplier^(n-1)`, capped at `max`, then spread by ±`jitter` (a fraction) so
/// that tasks that failed together do not retry together.
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
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_backoff_ms: 500,
            max_backoff_ms: 60_000,
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// The delay before retry number `attempt` (1 after the first failure).
    pub fn backoff(&self, attempt: u32) -> Duration {
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
                "pools.a.retry.jitter"
            ]
        );
    }
}
