//! Reloading the configuration: validate everything, then apply what is safe live and
//! report what needs a restart.

use std::collections::BTreeMap;

use runtime_contracts::Reconfigure;
use serde::{Deserialize, Serialize};

use super::{RejectedChange, RuntimeManager};
use crate::config::{ConfigReport, Overrides};

/// What a reload did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    /// Every key whose value changed.
    pub changed: Vec<String>,
    /// Changed keys now in effect.
    pub applied: Vec<String>,
    /// Changed keys that take effect only after a restart.
    pub needs_restart: Vec<String>,
    /// Why, for the keys of `needs_restart` whose owner said (a source refusing a change).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub reasons: BTreeMap<String, String>,
    /// Sources started again to apply their changed keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restarted: Vec<String>,
}

/// Keys the core applies live (for pools that already run).
const CORE_LIVE_KEYS: &[&str] = &[
    "runtime.log",
    "runtime.shutdown_deadline_ms",
    "runtime.source_progress_bound_ms",
    "runtime.pool_progress_bound_ms",
    "pools.*.workers",
    "pools.*.handler_timeout_ms",
    "pools.*.max_attempts",
    "pools.*.high_watermark",
    "pools.*.prefetch",
    "pools.*.retry.**",
];

/// Whether dotted `key` matches `pattern` (`*` is one segment, a final `**` the rest).
pub(crate) fn key_matches(pattern: &str, key: &str) -> bool {
    let mut pattern = pattern.split('.');
    let mut key = key.split('.');
    loop {
        match (pattern.next(), key.next()) {
            (Some("**"), _) => return true,
            (Some("*"), Some(_)) => {}
            (Some(p), Some(k)) if p == k => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

impl RuntimeManager {
    /// Reads the configuration again. If it has any problem, nothing changes and every
    /// problem is returned. Otherwise the new configuration replaces the old, what is safe
    /// live (pool sizes and policies, log filter, bounds, and keys registered with
    /// [`super::RuntimeBuilder::live_keys`]) takes effect now, a running source's changed
    /// keys go to the source ([`runtime_contracts::TaskSource::reconfigure`]: applied, applied
    /// by starting it again, or refused with its reason), and the rest is reported as
    /// needing a restart.
    pub fn reload(&self) -> Result<ReloadReport, ConfigReport> {
        self.reload_with(self.config.overrides())
    }

    /// [`RuntimeManager::reload`] with `overrides` (a database's, just read) in place of
    /// the current ones. A refused change is counted (`plba_config_rejected_total`) and
    /// shown in `/status` until a change is applied.
    pub fn reload_with(&self, overrides: Option<Overrides>) -> Result<ReloadReport, ConfigReport> {
        if let Err(e) = crate::fault("config.reload") {
            return Err(ConfigReport {
                origin: self.config.origin().to_string(),
                problems: vec![runtime_contracts::ConfigProblem::new("reload", e)],
            });
        }
        let changed = match self.config.reload_with(overrides) {
            Ok(changed) => changed,
            Err(report) => {
                self.metrics.config_rejected.inc();
                tracing::error!(%report, "configuration change refused; the one in force stays");
                *self.rejected.lock().unwrap_or_else(|e| e.into_inner()) = Some(RejectedChange {
                    at_unix_ms: crate::now_unix_ms(),
                    origin: report.origin.clone(),
                    problems: report.problems.iter().map(ToString::to_string).collect(),
                });
                return Err(report);
            }
        };
        *self.rejected.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let platform = self.config.platform();
        let mut report = ReloadReport {
            changed: changed.clone(),
            ..ReloadReport::default()
        };
        let mut pools_to_update = std::collections::BTreeSet::new();
        // A running source's changed keys go to the source, which applies them, takes them
        // for a restart, or refuses them with its reason.
        let mut by_source: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut rest = Vec::new();
        for key in changed {
            match key
                .strip_prefix("sources.")
                .and_then(|k| k.split_once('.'))
                .filter(|(id, _)| self.source_controls.contains_key(*id))
            {
                Some((id, _)) => by_source.entry(id.to_owned()).or_default().push(key),
                None => rest.push(key),
            }
        }
        let root = self.config.root();
        for (id, keys) in by_source {
            let section = root.get("sources").and_then(|s| s.get(&id));
            let source = self.sources.iter().find(|(s, _)| s.id() == id);
            let answer = match (section, source) {
                (Some(section), Some((source, _))) => source.reconfigure(section),
                _ => Reconfigure::Refused(format!("source {id} was removed")),
            };
            match answer {
                Reconfigure::Applied => report.applied.extend(keys),
                Reconfigure::Restart => {
                    if let Some(control) = self.source_controls.get(&id) {
                        control.request_restart();
                    }
                    tracing::info!(source = %id, keys = ?keys, "restarting the source to apply its changed settings");
                    report.restarted.push(id);
                    report.applied.extend(keys);
                }
                Reconfigure::Refused(reason) => {
                    tracing::warn!(source = %id, keys = ?keys, %reason, "source change not applied");
                    for key in keys {
                        report.reasons.insert(key.clone(), reason.clone());
                        report.needs_restart.push(key);
                    }
                }
            }
        }
        for key in rest {
            let running_pool = key
                .strip_prefix("pools.")
                .and_then(|rest| rest.split('.').next())
                .filter(|pool| {
                    self.pools.contains_key(*pool) && platform.pools.contains_key(*pool)
                });
            let core_live = CORE_LIVE_KEYS.iter().any(|p| key_matches(p, &key))
                && (!key.starts_with("pools.") || running_pool.is_some());
            let elsewhere_live = self.live_keys.iter().any(|p| key_matches(p, &key));
            if key == "runtime.log" && self.logs.is_none() {
                report.needs_restart.push(key);
                continue;
            }
            if core_live || elsewhere_live {
                if let Some(pool) = running_pool {
                    pools_to_update.insert(pool.to_owned());
                }
                report.applied.push(key);
            } else {
                report.needs_restart.push(key);
            }
        }
        for pool in pools_to_update {
            if let Some(config) = self.effective_pool(&platform, &pool) {
                self.supervisor.update_pool(&pool, config);
            }
        }
        if report.applied.iter().any(|k| k == "runtime.log") {
            if let Some(logs) = &self.logs {
                // Validated with the configuration, so this cannot fail in practice.
                if let Err(e) = logs.set(&platform.runtime.log) {
                    tracing::error!(error = %e, "log filter not applied");
                }
            }
        }
        tracing::info!(
            applied = ?report.applied,
            needs_restart = ?report.needs_restart,
            "configuration reloaded"
        );
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::key_matches;

    #[test]
    fn patterns() {
        assert!(key_matches("pools.*.workers", "pools.orders.workers"));
        assert!(!key_matches("pools.*.workers", "pools.orders.retry.jitter"));
        assert!(key_matches("pools.*.retry.**", "pools.orders.retry.jitter"));
        assert!(key_matches("runtime.log", "runtime.log"));
        assert!(!key_matches("runtime.log", "runtime.logs"));
        assert!(!key_matches("sources.*.poll_interval_ms", "sources.inbox"));
    }
}
