//! Health contributions.

use serde::{Deserialize, Serialize};

use crate::BoxFuture;

/// The two questions an orchestrator asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Probe {
    /// Is the process alive (restart it if not)? Must never depend on shared dependencies,
    /// so that an outage of Redis or IMAP does not get healthy processes restarted.
    Liveness,
    /// Can it do useful work now (route traffic or work to it)?
    Readiness,
}

/// The answer of one contributor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum HealthStatus {
    /// Healthy.
    Up,
    /// Not healthy, and why.
    Down {
        /// The reason, for an operator.
        reason: String,
    },
}

/// A part of the system that reports its own health.
///
/// Called by the health registry whenever a probe is asked; must answer quickly from state
/// it already has (no network round trip per probe). Cancel safe.
///
/// ```
/// use runtime_contracts::{BoxFuture, HealthContributor, HealthStatus, Probe};
/// struct AlwaysUp;
/// impl HealthContributor for AlwaysUp {
///     fn name(&self) -> &str { "always-up" }
///     fn check(&self, _probe: Probe) -> BoxFuture<'_, HealthStatus> {
///         Box::pin(async { HealthStatus::Up })
///     }
/// }
/// ```
pub trait HealthContributor: Send + Sync {
    /// A stable name, shown in the health report.
    fn name(&self) -> &str;
    /// Answers one probe. A contributor with nothing to say about liveness answers `Up`.
    fn check(&self, probe: Probe) -> BoxFuture<'_, HealthStatus>;
}
