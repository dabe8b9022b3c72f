//! Application modules: how a business application plugs into the runtime.

use std::sync::Arc;

use crate::config::{ConfigProblem, ConfigProvider};
use crate::console::ConsolePages;
use crate::handler::TaskHandler;
use crate::health::HealthContributor;
use crate::queue::TaskQueue;
use crate::source::TaskSource;
use crate::BoxFuture;

/// Why a module could not register.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModuleError {
    /// Its configuration is unusable.
    #[error("module {module}: invalid configuration: {message}")]
    Config {
        /// Module name.
        module: String,
        /// What is wrong.
        message: String,
    },
    /// A resource it needs (a database) could not be opened.
    #[error("module {module}: {message}")]
    Init {
        /// Module name.
        module: String,
        /// What failed.
        message: String,
    },
}

/// Settings a module proposes for a pool it declares ([`ModuleRegistry::pool_with`]);
/// `None` leaves the platform's default. The configuration's own keys always win.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolDefaults {
    /// Workers.
    pub workers: Option<usize>,
    /// Tasks each worker leases and hands its handler at once.
    pub prefetch: Option<usize>,
    /// Attempts before a task is dead-lettered.
    pub max_attempts: Option<u32>,
    /// The first retry's delay.
    pub initial_backoff_ms: Option<u64>,
    /// The longest retry delay.
    pub max_backoff_ms: Option<u64>,
}

/// Where a module registers its parts. Implemented by the runtime core's builder.
///
/// Sources, queues and pools usually come from the configuration, composed by the binary; a
/// module registers its own only for what the configuration cannot describe (a schedule it
/// owns, a queue it needs apart).
pub trait ModuleRegistry: Send {
    /// Registers `handler` for tasks of `kind` on the worker pool named `pool` (which
    /// declares the pool, see [`ModuleRegistry::pool`]).
    fn handler(&mut self, pool: &str, kind: &str, handler: Arc<dyn TaskHandler>);
    /// Declares a worker pool the module needs. When the configuration has no
    /// `[pools.<name>]`, the pool runs with the platform's default settings.
    fn pool(&mut self, name: &str);
    /// [`ModuleRegistry::pool`] with settings the module proposes for it: each applies
    /// where the configuration's `[pools.<name>]` does not set that key. The default
    /// ignores them.
    fn pool_with(&mut self, name: &str, defaults: PoolDefaults) {
        let _ = defaults;
        self.pool(name);
    }
    /// Registers a queue the module brings for the pool `pool`, instead of the configured
    /// queue type.
    fn queue(&mut self, pool: &str, queue: Arc<dyn TaskQueue>);
    /// Registers a source the module brings, publishing to the queue of `pool`.
    fn source(&mut self, source: Arc<dyn TaskSource>, pool: &str);
    /// Registers a health contributor.
    fn health(&mut self, contributor: Arc<dyn HealthContributor>);
    /// Registers a shared service others can look up by type (e.g. the database pool).
    fn service(&mut self, service: Arc<dyn std::any::Any + Send + Sync>);
    /// Registers where the module records outcomes, for the reconciliation sweep. The
    /// default ignores it.
    fn outcome_lookup(&mut self, lookup: Arc<dyn OutcomeLookup>) {
        let _ = lookup;
    }
    /// Declares that the handlers of `pool` cannot work while `dependency` is not ready
    /// (its database, say). While its readiness answers `Down`, the pool takes no new work,
    /// and an attempt that fails meanwhile goes back to its queue without counting against
    /// `max_attempts`: an outage of the dependency dead-letters nothing, however long it
    /// lasts. Register the contributor with [`ModuleRegistry::health`] too to have it in the
    /// readiness report. The default ignores it.
    fn needs(&mut self, pool: &str, dependency: Arc<dyn HealthContributor>) {
        let _ = (pool, dependency);
    }
    /// Registers what the module deletes in the retention sweep (`[retention]`). The
    /// default ignores it.
    fn retention(&mut self, sweep: Arc<dyn RetentionSweep>) {
        let _ = sweep;
    }
    /// Registers pages the module adds to the operator console (read-only views of its
    /// own records). The default ignores them.
    fn console(&mut self, pages: Arc<dyn ConsolePages>) {
        let _ = pages;
    }
    /// Registers actions the module offers operators (`POST /actions/{name}`). The default
    /// ignores them.
    fn actions(&mut self, actions: Arc<dyn crate::OperatorActions>) {
        let _ = actions;
    }
}

/// How long records are kept, as `[retention]` says: each age applies to what a module
/// keeps under that name; `None` keeps them for good.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Recorded outcomes (a record that something was done, not the thing itself).
    pub outcomes: Option<std::time::Duration>,
    /// Effects already performed (delivered outbox rows).
    pub effects: Option<std::time::Duration>,
    /// The business records themselves (orders); kept unless the operator says otherwise.
    pub records: Option<std::time::Duration>,
    /// Dead letters (the runtime purges its queues' own).
    pub dead_letters: Option<std::time::Duration>,
}

/// A module's part of the retention sweep: deletes what is older than the policy allows
/// and says how much, by what (`outcomes`, `orders`, ...). Never deletes anything whose
/// absence would let work be done twice.
pub trait RetentionSweep: Send + Sync {
    /// One sweep; `Err` names what failed.
    fn sweep<'a>(
        &'a self,
        policy: &'a RetentionPolicy,
    ) -> BoxFuture<'a, Result<Vec<(String, u64)>, String>>;
}

/// Which tasks already have a recorded outcome, as the module's store knows it. The
/// runtime's reconciliation sweep uses it to tell work lost before its handler ran from
/// work whose completion (for mail: `\Seen`) was lost after its outcome was recorded.
pub trait OutcomeLookup: Send + Sync {
    /// For each id, whether an outcome is recorded for it; an error in words.
    fn recorded<'a>(&'a self, task_ids: &'a [String]) -> BoxFuture<'a, Result<Vec<bool>, String>>;
}

/// A business application hosted by the runtime.
///
/// Rules:
/// - The runtime calls `validate_config` with the module's section before anything starts,
///   together with its own validation, and reports every problem at once.
/// - Then it calls `register` once; the module opens what it needs (its database) and
///   registers handlers, the pools they run on, health contributors and shared services,
///   and any source or queue of its own. Nothing runs until every module has registered.
/// - A module never sees the queue or the source types: its handlers reach content through
///   their [`crate::HandlerContext`].
///
/// ```
/// use std::sync::Arc;
/// use runtime_contracts::*;
/// struct Noop;
/// impl TaskHandler for Noop {
///     fn handle<'a>(&'a self, _t: &'a Task, _c: &'a HandlerContext)
///         -> BoxFuture<'a, Result<Outcome, HandlerError>> { Box::pin(async { Ok(Outcome::new("noop")) }) }
/// }
/// struct App;
/// impl ApplicationModule for App {
///     fn name(&self) -> &str { "app" }
///     fn config_section(&self) -> &str { "apps.app" }
///     fn validate_config(&self, _section: Option<&serde_json::Value>) -> Vec<ConfigProblem> { vec![] }
///     fn register<'a>(&'a self, registry: &'a mut dyn ModuleRegistry, _c: &'a dyn ConfigProvider)
///         -> BoxFuture<'a, Result<(), ModuleError>> {
///         Box::pin(async move { registry.handler("default", "noop", Arc::new(Noop)); Ok(()) })
///     }
/// }
/// ```
pub trait ApplicationModule: Send + Sync {
    /// The module's name.
    fn name(&self) -> &str;
    /// The dotted key of its configuration section, e.g. `apps.mail_order_bot`.
    fn config_section(&self) -> &str;
    /// Every problem in its section (`None` when the section is absent), keys in full.
    fn validate_config(&self, section: Option<&serde_json::Value>) -> Vec<ConfigProblem>;
    /// Opens its resources and registers its parts.
    fn register<'a>(
        &'a self,
        registry: &'a mut dyn ModuleRegistry,
        config: &'a dyn ConfigProvider,
    ) -> BoxFuture<'a, Result<(), ModuleError>>;
}
