//! What a pool cannot work without: the dependencies a module names
//! ([`ModuleRegistry::needs`]), and the source of a task that failed
//! ([`TaskSource::reachable`]). While one of them is down, the pool's workers take no new
//! work, and an attempt that fails meanwhile goes back to the queue uncounted: the failure
//! is the dependency's, not the task's.
//!
//! The gate is asked when an attempt fails (so an outage costs at most the attempts already
//! in flight, each of them uncounted) and, while it is shut, twice a second before a worker
//! would consume. A working pool never asks. Answers are shared: one serves every worker
//! for [`FRESH`].
//!
//! [`ModuleRegistry::needs`]: runtime_contracts::ModuleRegistry::needs
//! [`TaskSource::reachable`]: runtime_contracts::TaskSource::reachable

use std::sync::Arc;
use std::time::{Duration, Instant};

use runtime_contracts::{HealthContributor, HealthStatus, Probe, TaskSource};

use super::PoolCounters;

/// How long one answer stands for every worker.
const FRESH: Duration = Duration::from_millis(250);
/// How often a shut gate is asked again.
pub(crate) const RECHECK: Duration = Duration::from_millis(500);

pub(crate) struct Gate {
    needs: Vec<Arc<dyn HealthContributor>>,
    counters: Arc<PoolCounters>,
    state: tokio::sync::Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The last answer: when, and the first thing down with why.
    last: Option<(Instant, Option<String>)>,
    /// Sources a task failed from: asked with the dependencies from then on.
    sources: Vec<Arc<dyn TaskSource>>,
}

impl Gate {
    pub(crate) fn new(needs: Vec<Arc<dyn HealthContributor>>, counters: Arc<PoolCounters>) -> Self {
        Self {
            needs,
            counters,
            state: tokio::sync::Mutex::default(),
        }
    }

    /// Whether the last answer found something down.
    pub(crate) fn is_shut(&self) -> bool {
        self.counters
            .waiting_for
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Asks the dependencies, and `failed_from` (the source of a task that just failed)
    /// with the sources asked since the gate shut, or takes an answer younger than
    /// [`FRESH`] about the same: the first one down, with why, or `None` when all are up.
    /// Shuts or opens the gate accordingly.
    pub(crate) async fn ask(&self, failed_from: Option<&Arc<dyn TaskSource>>) -> Option<String> {
        let mut state = self.state.lock().await;
        let new_source = failed_from.filter(|s| !state.sources.iter().any(|k| k.id() == s.id()));
        if let Some(source) = new_source {
            state.sources.push(Arc::clone(source));
        } else if let Some((at, answer)) = &state.last {
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
        if answer.is_none() {
            for source in &state.sources {
                if let Err(reason) = source.reachable().await {
                    answer = Some(format!("source {}: {reason}", source.id()));
                    break;
                }
            }
        }
        state.last = Some((Instant::now(), answer.clone()));
        let mut waiting = self
            .counters
            .waiting_for
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match (&*waiting, &answer) {
            (None, Some(why)) => {
                tracing::warn!(%why, "a dependency of the pool is down: it takes no new work until it is back")
            }
            (Some(_), None) => tracing::info!("the pool's dependencies are back: it takes work"),
            _ => {}
        }
        waiting.clone_from(&answer);
        answer
    }
}
