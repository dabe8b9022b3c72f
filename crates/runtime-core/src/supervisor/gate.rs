//! What a pool cannot work without ([`ModuleRegistry::needs`]): while one of its
//! dependencies answers readiness `Down`, the pool's workers take no new work, and an attempt
//! that fails meanwhile goes back to the queue uncounted.
//!
//! The gate is asked when an attempt fails (so an outage costs at most the attempts already
//! in flight, each of them uncounted) and, while it is shut, twice a second before a worker
//! would consume. A working pool never probes. Probes are shared: one answer serves every
//! worker for [`FRESH`].
//!
//! [`ModuleRegistry::needs`]: runtime_contracts::ModuleRegistry::needs

use std::sync::Arc;
use std::time::{Duration, Instant};

use runtime_contracts::{HealthContributor, HealthStatus, Probe};

use super::PoolCounters;

/// How long one probe's answer stands for every worker.
const FRESH: Duration = Duration::from_millis(250);
/// How often a shut gate is probed again.
pub(crate) const RECHECK: Duration = Duration::from_millis(500);

pub(crate) struct Gate {
    needs: Vec<Arc<dyn HealthContributor>>,
    counters: Arc<PoolCounters>,
    /// The last probe: when, and the first dependency that was not ready with why.
    last: tokio::sync::Mutex<Option<(Instant, Option<String>)>>,
}

impl Gate {
    pub(crate) fn new(needs: Vec<Arc<dyn HealthContributor>>, counters: Arc<PoolCounters>) -> Self {
        Self {
            needs,
            counters,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// Whether the pool depends on anything.
    pub(crate) fn guards(&self) -> bool {
        !self.needs.is_empty()
    }

    /// Whether the last probe found a dependency not ready.
    pub(crate) fn is_shut(&self) -> bool {
        self.guards()
            && self
                .counters
                .waiting_for
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
    }

    /// Asks the dependencies (or takes an answer younger than [`FRESH`]): the first one not
    /// ready, with why, or `None` when all are. Shuts or opens the gate accordingly.
    pub(crate) async fn probe(&self) -> Option<String> {
        if !self.guards() {
            return None;
        }
        let mut last = self.last.lock().await;
        if let Some((at, answer)) = &*last {
            if at.elapsed() < FRESH {
                return answer.clone();
            }
        }
        let mut answer = None;
        for need in &self.needs {
            if let HealthStatus::Down { reason } = need.check(Probe::Readiness).await {
                answer = Some(format!("{}: {reason}", need.name()));
                break;
            }
        }
        *last = Some((Instant::now(), answer.clone()));
        let mut waiting = self
            .counters
            .waiting_for
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match (&*waiting, &answer) {
            (None, Some(why)) => {
                tracing::warn!(%why, "a dependency of the pool is not ready: it takes no new work until it is")
            }
            (Some(_), None) => {
                tracing::info!("the pool's dependencies are ready again: it takes work")
            }
            _ => {}
        }
        waiting.clone_from(&answer);
        answer
    }
}
