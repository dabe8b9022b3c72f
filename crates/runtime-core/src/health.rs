use std::sync::{Arc, RwLock};

use runtime_contracts::{HealthContributor, HealthStatus, Probe};
use serde::{Deserialize, Serialize};

/// One contributor's answer in a report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// The contributor.
    pub name: String,
    /// Its answer.
    #[serde(flatten)]
    pub status: HealthStatus,
}

/// The aggregated answer to one probe: healthy only when every contributor is up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    /// The probe asked.
    pub probe: Probe,
    /// Whether every contributor is up.
    pub healthy: bool,
    /// Every contributor's answer.
    pub checks: Vec<HealthCheck>,
}

/// Aggregates health contributors into liveness and readiness views.
#[derive(Clone, Default)]
pub struct HealthRegistry {
    contributors: Arc<RwLock<Vec<Arc<dyn HealthContributor>>>>,
}

impl std::fmt::Debug for HealthRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self
            .contributors
            .read()
            .map(|c| c.iter().map(|c| c.name().to_owned()).collect())
            .unwrap_or_default();
        f.debug_struct("HealthRegistry")
            .field("contributors", &names)
            .finish()
    }
}

impl HealthRegistry {
    /// Adds a contributor.
    pub fn register(&self, contributor: Arc<dyn HealthContributor>) {
        self.contributors
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(contributor);
    }

    /// Asks every contributor.
    pub async fn check(&self, probe: Probe) -> HealthReport {
        let contributors: Vec<_> = self
            .contributors
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut checks = Vec::with_capacity(contributors.len());
        for c in contributors {
            let status = c.check(probe).await;
            checks.push(HealthCheck {
                name: c.name().to_owned(),
                status,
            });
        }
        HealthReport {
            probe,
            healthy: checks.iter().all(|c| c.status == HealthStatus::Up),
            checks,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runtime_contracts::BoxFuture;

    struct Fixed(&'static str, Option<&'static str>);
    impl HealthContributor for Fixed {
        fn name(&self) -> &str {
            self.0
        }
        fn check(&self, probe: Probe) -> BoxFuture<'_, HealthStatus> {
            let down = self.1.filter(|_| probe == Probe::Readiness);
            Box::pin(async move {
                match down {
                    Some(reason) => HealthStatus::Down {
                        reason: reason.into(),
                    },
                    None => HealthStatus::Up,
                }
            })
        }
    }

    #[tokio::test]
    async fn readiness_fails_with_the_reason_while_liveness_holds() {
        let registry = HealthRegistry::default();
        registry.register(Arc::new(Fixed("db", None)));
        registry.register(Arc::new(Fixed("inbox", Some("maildir unreadable"))));
        let live = registry.check(Probe::Liveness).await;
        assert!(live.healthy);
        let ready = registry.check(Probe::Readiness).await;
        assert!(!ready.healthy);
        assert_eq!(
            ready.checks[1].status,
            HealthStatus::Down {
                reason: "maildir unreadable".into()
            }
        );
    }
}
