use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runtime_contracts::{
    ApplicationModule, ConsolePages, HealthContributor, HealthStatus, ModuleRegistry,
    OutcomeLookup, Probe, QueueStats, SourceContext, SourceState, TaskHandler, TaskQueue,
    TaskSource,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ConfigurationManager;
use crate::container::ServiceContainer;
use crate::error::CoreError;
use crate::health::HealthRegistry;
use crate::metrics::Metrics;
use crate::reconcile::Reconciler;
use crate::shutdown::TokenSignal;
use crate::supervisor::{PoolSpec, PoolStatus, WorkerSupervisor};
use crate::telemetry::Telemetry;
use crate::trace::{LogControl, TraceService};

mod diagnostics;
mod parts;
mod reload;
mod supervised;

pub use diagnostics::{Diagnostics, Finding, PendingRetry};
use parts::{MeteredQueue, PoolHealth, QueueBackpressure, SourceControl, SourceHealth};
pub use reload::ReloadReport;

/// Lifecycle state of the runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeState {
    /// Built, not started.
    Built,
    /// Pools and sources running.
    Running,
    /// Shutting down.
    Stopping,
    /// Stopped.
    Stopped,
}

/// A snapshot of one source, for operators.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceReport {
    /// The pool it feeds.
    pub pool: String,
    /// Lifecycle state.
    pub state: SourceState,
    /// Whether an operator paused it.
    pub paused: bool,
    /// Tasks published since start.
    pub published: u64,
    /// Tasks completed since start.
    pub completed: u64,
    /// Tasks published and not yet completed or released.
    pub pending: u64,
    /// Milliseconds since its last successful scan, poll or event.
    pub last_event_age_ms: Option<u64>,
    /// Its last error, if degraded.
    pub last_error: Option<String>,
    /// When it next fires on its own (a schedule's next slot), RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_due: Option<String>,
    /// Its lease, when replicas share what it watches (one watches at a time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseReport>,
    /// Times the runtime started it again: after its start failed or its task panicked
    /// (with backoff), or to apply a changed configuration.
    #[serde(default)]
    pub restarts: u64,
}

/// A source's lease, for operators.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseReport {
    /// The leased resource.
    pub resource: String,
    /// Whether this replica holds it and watches.
    pub held: bool,
    /// The holder, as last seen.
    pub holder: Option<String>,
    /// The holder's fencing token, as last seen.
    pub token: Option<u64>,
    /// Milliseconds this replica has held it.
    pub held_for_ms: Option<u64>,
    /// Times this replica took the lease.
    pub acquired: u64,
    /// Publishes refused because this replica's lease was no longer current.
    pub fenced_publishes: u64,
}

/// A snapshot of the whole runtime.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RuntimeStatus {
    /// Lifecycle state.
    pub state: RuntimeState,
    /// Hosted modules.
    pub modules: Vec<String>,
    /// Sources by id.
    pub sources: BTreeMap<String, SourceReport>,
    /// Pools.
    pub pools: Vec<PoolStatus>,
    /// Queues by name.
    pub queues: BTreeMap<String, QueueStats>,
    /// Where the configuration in force comes from, and the last change refused.
    pub config: ConfigStatus,
}

/// Where the configuration in force comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigStatus {
    /// The file (or embedded text).
    pub origin: String,
    /// The database overrides in force: their store and version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overrides: Option<String>,
    /// The last change refused as invalid since the last one applied; the configuration
    /// before it stays in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<RejectedChange>,
}

/// A configuration change refused as invalid.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedChange {
    /// When, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// What was read.
    pub origin: String,
    /// Every problem, `key: message`.
    pub problems: Vec<String>,
}

/// What a shutdown did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShutdownReport {
    /// Whether every in-flight task settled before the deadline.
    pub drained_in_time: bool,
    /// Pools as they ended.
    pub pools: Vec<PoolStatus>,
    /// Queues as they ended (what is left in an in-memory queue is dropped, and stays
    /// unread at its source).
    pub queues: BTreeMap<String, QueueStats>,
}

/// Makes the queue of a pool that has none registered.
pub type QueueFactory = Box<dyn Fn(&str) -> Arc<dyn TaskQueue> + Send + Sync>;

/// Composes a runtime: configuration, queues, sources and modules.
pub struct RuntimeBuilder {
    config: Arc<ConfigurationManager>,
    queues: BTreeMap<String, Arc<dyn TaskQueue>>,
    queue_factory: Option<QueueFactory>,
    sources: Vec<(Arc<dyn TaskSource>, String)>,
    modules: Vec<Arc<dyn ApplicationModule>>,
    trace: TraceService,
    live_keys: Vec<String>,
    logs: Option<Arc<LogControl>>,
    health: Vec<Arc<dyn HealthContributor>>,
    telemetry: Arc<Telemetry>,
}

impl std::fmt::Debug for RuntimeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeBuilder")
            .field("queues", &self.queues.keys().collect::<Vec<_>>())
            .field(
                "sources",
                &self
                    .sources
                    .iter()
                    .map(|(s, p)| (s.id(), p))
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

struct Registrar<'a> {
    handlers: &'a mut HashMap<String, HashMap<String, Arc<dyn TaskHandler>>>,
    pools: &'a mut std::collections::BTreeSet<String>,
    pool_defaults: &'a mut HashMap<String, runtime_contracts::PoolDefaults>,
    queues: &'a mut BTreeMap<String, Arc<dyn TaskQueue>>,
    sources: &'a mut Vec<(Arc<dyn TaskSource>, String)>,
    health: &'a HealthRegistry,
    services: &'a ServiceContainer,
    outcomes: &'a mut Option<Arc<dyn OutcomeLookup>>,
    console: &'a mut Vec<Arc<dyn ConsolePages>>,
    actions: &'a mut Vec<Arc<dyn runtime_contracts::OperatorActions>>,
    needs: &'a mut HashMap<String, Vec<Arc<dyn HealthContributor>>>,
    retention: &'a mut Vec<Arc<dyn runtime_contracts::RetentionSweep>>,
}

impl ModuleRegistry for Registrar<'_> {
    fn handler(&mut self, pool: &str, kind: &str, handler: Arc<dyn TaskHandler>) {
        self.pool(pool);
        self.handlers
            .entry(pool.to_owned())
            .or_default()
            .insert(kind.to_owned(), handler);
    }

    fn pool(&mut self, name: &str) {
        self.pools.insert(name.to_owned());
    }

    fn retention(&mut self, sweep: Arc<dyn runtime_contracts::RetentionSweep>) {
        self.retention.push(sweep);
    }

    fn pool_with(&mut self, name: &str, defaults: runtime_contracts::PoolDefaults) {
        self.pool(name);
        self.pool_defaults.insert(name.to_owned(), defaults);
    }

    fn queue(&mut self, pool: &str, queue: Arc<dyn TaskQueue>) {
        self.queues.insert(pool.to_owned(), queue);
    }

    fn source(&mut self, source: Arc<dyn TaskSource>, pool: &str) {
        self.sources.push((source, pool.to_owned()));
    }

    fn health(&mut self, contributor: Arc<dyn HealthContributor>) {
        self.health.register(contributor);
    }

    fn service(&mut self, service: Arc<dyn std::any::Any + Send + Sync>) {
        self.services.insert_dyn(service);
    }

    fn outcome_lookup(&mut self, lookup: Arc<dyn OutcomeLookup>) {
        *self.outcomes = Some(lookup);
    }

    fn console(&mut self, pages: Arc<dyn ConsolePages>) {
        self.console.push(pages);
    }

    fn actions(&mut self, actions: Arc<dyn runtime_contracts::OperatorActions>) {
        self.actions.push(actions);
    }

    fn needs(&mut self, pool: &str, dependency: Arc<dyn HealthContributor>) {
        self.pool(pool);
        self.needs
            .entry(pool.to_owned())
            .or_default()
            .push(dependency);
    }
}

impl RuntimeBuilder {
    /// Starts composing a runtime on a validated configuration.
    pub fn new(config: Arc<ConfigurationManager>) -> Self {
        Self {
            config,
            queues: BTreeMap::new(),
            queue_factory: None,
            sources: Vec::new(),
            modules: Vec::new(),
            trace: TraceService::new(),
            live_keys: Vec::new(),
            logs: None,
            health: Vec::new(),
            telemetry: Arc::new(Telemetry::disabled()),
        }
    }

    /// The process's trace export: when it exports, sources and workers make a full trace
    /// tree per task; its span counters join the metrics, and shutdown flushes it.
    pub fn telemetry(mut self, telemetry: Arc<Telemetry>) -> Self {
        self.trace = TraceService::exporting(telemetry.is_exporting());
        self.telemetry = telemetry;
        self
    }

    /// Configuration keys (patterns: `*` is one segment, a final `**` the rest) that
    /// something outside the core applies live on reload, through a
    /// [`runtime_contracts::ConfigProvider::subscribe`] callback.
    pub fn live_keys<I: IntoIterator<Item = S>, S: Into<String>>(mut self, keys: I) -> Self {
        self.live_keys.extend(keys.into_iter().map(Into::into));
        self
    }

    /// The handle that changes the log filter, so that reload and operators can.
    pub fn log_control(mut self, logs: Option<LogControl>) -> Self {
        self.logs = logs.map(Arc::new);
        self
    }

    /// A health contributor of the composition itself (a queue's server, say).
    pub fn health(mut self, contributor: Arc<dyn HealthContributor>) -> Self {
        self.health.push(contributor);
        self
    }

    /// Makes the queue of every pool that has none registered (the configured queue type).
    pub fn queue_factory(
        mut self,
        factory: impl Fn(&str) -> Arc<dyn TaskQueue> + Send + Sync + 'static,
    ) -> Self {
        self.queue_factory = Some(Box::new(factory));
        self
    }

    /// The queue consumed by the pool named `pool`.
    pub fn queue(mut self, pool: &str, queue: Arc<dyn TaskQueue>) -> Self {
        self.queues.insert(pool.to_owned(), queue);
        self
    }

    /// A source publishing to the queue of `pool`.
    pub fn source(mut self, source: Arc<dyn TaskSource>, pool: &str) -> Self {
        self.sources.push((source, pool.to_owned()));
        self
    }

    /// A hosted application module.
    pub fn module(mut self, module: Arc<dyn ApplicationModule>) -> Self {
        self.modules.push(module);
        self
    }

    /// Registers the modules and checks that the parts fit. Nothing runs yet.
    pub async fn build(mut self) -> Result<RuntimeManager, CoreError> {
        let health = HealthRegistry::default();
        for contributor in self.health.drain(..) {
            health.register(contributor);
        }
        let services = Arc::new(ServiceContainer::default());
        let mut handlers = HashMap::new();
        let mut declared = std::collections::BTreeSet::new();
        let mut outcomes = None;
        let mut console = Vec::new();
        let mut actions = Vec::new();
        let mut needs = HashMap::new();
        let mut pool_defaults = HashMap::new();
        let mut sweeps = Vec::new();
        for module in &self.modules {
            let mut registrar = Registrar {
                handlers: &mut handlers,
                pools: &mut declared,
                pool_defaults: &mut pool_defaults,
                queues: &mut self.queues,
                sources: &mut self.sources,
                health: &health,
                services: &services,
                outcomes: &mut outcomes,
                console: &mut console,
                actions: &mut actions,
                needs: &mut needs,
                retention: &mut sweeps,
            };
            module.register(&mut registrar, &*self.config).await?;
        }
        // Configured pools keep their settings; pools only declared by a module get defaults.
        let mut pools = self.config.platform().pools;
        for name in declared {
            pools.entry(name).or_default();
        }
        for (name, defaults) in &pool_defaults {
            if let Some(pool) = pools.get_mut(name) {
                *pool = with_defaults(&self.config.root(), name, pool.clone(), defaults);
            }
        }
        let mut problems = Vec::new();
        for pool in pools.keys() {
            if !self.queues.contains_key(pool) {
                match &self.queue_factory {
                    Some(make) => {
                        let queue = make(pool);
                        self.queues.insert(pool.clone(), queue);
                    }
                    None => problems.push(format!("pool {pool} has no queue")),
                }
            }
        }
        let metrics = Arc::new(Metrics::with_span_counters(self.telemetry.counters()));
        let reconciler = self.config.platform().reconcile.map(|cfg| {
            let targets = self
                .sources
                .iter()
                .filter(|(s, _)| cfg.sources.is_empty() || cfg.sources.iter().any(|n| n == s.id()))
                .filter_map(|(source, pool)| {
                    self.queues.get(pool).map(|queue| crate::reconcile::Target {
                        source: Arc::clone(source),
                        queue: Arc::clone(queue),
                    })
                })
                .collect();
            let reconciler = Arc::new(Reconciler::new(
                cfg.clone(),
                targets,
                outcomes.clone(),
                Arc::clone(&metrics),
            ));
            // Its tasks come from a schedule source in whichever pool it publishes to.
            for pool in pools.keys() {
                handlers
                    .entry(pool.clone())
                    .or_default()
                    .entry(cfg.kind.clone())
                    .or_insert_with(|| Arc::clone(&reconciler) as Arc<dyn TaskHandler>);
            }
            health.register(Arc::new(crate::reconcile::ReconcileHealth(Arc::clone(
                &reconciler,
            ))));
            reconciler
        });
        let retention = {
            let cfg = self.config.platform().retention;
            let queues = self
                .queues
                .iter()
                .map(|(name, queue)| (name.clone(), Arc::clone(queue)))
                .collect();
            let retention = Arc::new(crate::retention::Retention::new(
                cfg.clone(),
                queues,
                sweeps,
                Arc::clone(&metrics),
            ));
            // Its tasks come from a schedule source in whichever pool it publishes to.
            for pool in pools.keys() {
                if let Some(kinds) = handlers.get_mut(pool) {
                    kinds
                        .entry(cfg.kind.clone())
                        .or_insert_with(|| Arc::clone(&retention) as Arc<dyn TaskHandler>);
                }
            }
            retention
        };
        for pool in pools.keys() {
            if !handlers.contains_key(pool) {
                problems.push(format!("pool {pool} has no handler"));
            }
        }
        let mut source_controls = HashMap::new();
        for (source, pool) in &self.sources {
            if !pools.contains_key(pool) {
                problems.push(format!(
                    "source {} publishes to pool {pool}, which is neither configured nor declared by a module",
                    source.id()
                ));
            }
            let control = Arc::new(SourceControl::default());
            source_controls.insert(source.id().to_owned(), Arc::clone(&control));
            health.register(Arc::new(SourceHealth {
                source: Arc::clone(source),
                control,
                config: Arc::clone(&self.config),
            }));
        }
        if !problems.is_empty() {
            return Err(CoreError::Composition(problems.join("; ")));
        }
        Ok(RuntimeManager {
            console,
            actions,
            activity: Arc::new(crate::activity::Activity::default()),
            reconciler,
            retention,
            rejected: Mutex::new(None),
            telemetry: self.telemetry,
            config: self.config,
            pools,
            pool_defaults,
            source_controls,
            live_keys: self.live_keys,
            logs: self.logs,
            metrics: Arc::clone(&metrics),
            queues: self.queues,
            sources: self.sources,
            modules: self.modules.iter().map(|m| m.name().to_owned()).collect(),
            handlers,
            needs,
            supervisor: WorkerSupervisor::with_metrics(metrics),
            health,
            services,
            trace: self.trace,
            source_stop: CancellationToken::new(),
            source_tasks: TaskTracker::new(),
            source_ended: Arc::new(Mutex::new(HashMap::new())),
            state: Mutex::new(RuntimeState::Built),
        })
    }
}

/// Owns the lifecycle: starts pools, then sources; reports status; shuts down in order.
pub struct RuntimeManager {
    config: Arc<ConfigurationManager>,
    pools: BTreeMap<String, crate::config::PoolConfig>,
    /// What modules proposed for their pools ([`ModuleRegistry::pool_with`]).
    pool_defaults: HashMap<String, runtime_contracts::PoolDefaults>,
    source_controls: HashMap<String, Arc<SourceControl>>,
    live_keys: Vec<String>,
    logs: Option<Arc<LogControl>>,
    metrics: Arc<Metrics>,
    queues: BTreeMap<String, Arc<dyn TaskQueue>>,
    sources: Vec<(Arc<dyn TaskSource>, String)>,
    modules: Vec<String>,
    handlers: HashMap<String, HashMap<String, Arc<dyn TaskHandler>>>,
    /// What each pool cannot work without ([`ModuleRegistry::needs`]).
    needs: HashMap<String, Vec<Arc<dyn HealthContributor>>>,
    supervisor: WorkerSupervisor,
    health: HealthRegistry,
    services: Arc<ServiceContainer>,
    trace: TraceService,
    telemetry: Arc<Telemetry>,
    source_stop: CancellationToken,
    source_tasks: TaskTracker,
    source_ended: Arc<Mutex<HashMap<String, Option<String>>>>,
    state: Mutex<RuntimeState>,
    reconciler: Option<Arc<Reconciler>>,
    retention: Arc<crate::retention::Retention>,
    rejected: Mutex<Option<RejectedChange>>,
    console: Vec<Arc<dyn ConsolePages>>,
    actions: Vec<Arc<dyn runtime_contracts::OperatorActions>>,
    activity: Arc<crate::activity::Activity>,
}

impl std::fmt::Debug for RuntimeManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeManager")
            .field("modules", &self.modules)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl RuntimeManager {
    /// Current lifecycle state.
    pub fn state(&self) -> RuntimeState {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_state(&self, state: RuntimeState) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = state;
    }

    /// The health registry (sources are registered automatically).
    pub fn health(&self) -> &HealthRegistry {
        &self.health
    }

    /// Shared services registered by modules.
    pub fn services(&self) -> &Arc<ServiceContainer> {
        &self.services
    }

    /// The configuration manager.
    pub fn config(&self) -> &Arc<ConfigurationManager> {
        &self.config
    }

    /// The queue of a pool.
    pub fn queue(&self, pool: &str) -> Option<&Arc<dyn TaskQueue>> {
        self.queues.get(pool)
    }

    /// Starts every pool, then every source. Must be called inside a tokio runtime.
    pub fn start(&mut self) -> Result<(), CoreError> {
        if self.state() != RuntimeState::Built {
            return Err(CoreError::State("already started"));
        }
        for (pool, pool_config) in &self.pools {
            let (Some(queue), Some(handlers)) = (self.queues.get(pool), self.handlers.get(pool))
            else {
                continue;
            };
            let sources = self
                .sources
                .iter()
                .map(|(s, _)| (s.id().to_owned(), Arc::clone(s)))
                .collect();
            self.supervisor.start_pool(
                PoolSpec {
                    name: pool.clone(),
                    config: pool_config.clone(),
                    queue: Arc::clone(queue),
                    handlers: handlers.clone(),
                    sources,
                    needs: self.needs.get(pool).cloned().unwrap_or_default(),
                },
                self.trace.clone(),
            );
            if let (Some(counters), Some(live_config)) = (
                self.supervisor.counters(pool),
                self.supervisor.pool_config(pool),
            ) {
                let _ = live_config;
                self.health.register(Arc::new(PoolHealth {
                    name: pool.clone(),
                    queue: Arc::clone(queue),
                    counters,
                    config: Arc::clone(&self.config),
                }));
            }
            tracing::info!(pool, workers = pool_config.workers, "pool started");
        }
        let waker: Arc<dyn runtime_contracts::SourceWaker> = Arc::new(Waker(
            self.sources
                .iter()
                .map(|(s, _)| (s.id().to_owned(), Arc::clone(s)))
                .collect(),
        ));
        for (source, pool) in &self.sources {
            let (Some(queue), Some(pool_config), Some(control)) = (
                self.queues.get(pool),
                self.supervisor.pool_config(pool),
                self.source_controls.get(source.id()),
            ) else {
                continue;
            };
            let ctx = SourceContext {
                queue: Arc::new(MeteredQueue {
                    inner: Arc::clone(queue),
                    metrics: Arc::clone(&self.metrics),
                }),
                shutdown: Arc::new(TokenSignal(self.source_stop.child_token())),
                backpressure: Arc::new(QueueBackpressure {
                    queue: Arc::clone(queue),
                    pool: pool_config,
                    control: Arc::clone(control),
                }),
                tracer: Arc::new(self.trace.clone()),
                sources: Arc::clone(&waker),
            };
            tracing::info!(source = source.id(), pool, "source started");
            self.source_tasks
                .spawn(supervised::run_supervised(supervised::Supervised {
                    source: Arc::clone(source),
                    ctx,
                    control: Arc::clone(control),
                    metrics: Arc::clone(&self.metrics),
                    ended: Arc::clone(&self.source_ended),
                    stop: self.source_stop.child_token(),
                }));
        }
        for (pool, queue) in &self.queues {
            let sources: Vec<Arc<dyn TaskSource>> = self
                .sources
                .iter()
                .filter(|(_, p)| p == pool)
                .map(|(s, _)| Arc::clone(s))
                .collect();
            if !sources.is_empty() {
                self.source_tasks
                    .spawn(crate::reconcile::hand_back_dead_letters(
                        Arc::clone(queue),
                        sources,
                        self.source_stop.child_token(),
                    ));
            }
        }
        self.activity.watch(
            self.pools
                .keys()
                .filter_map(|p| self.supervisor.counters(p))
                .collect(),
            self.metrics.latency_all.clone(),
        );
        let activity = Arc::clone(&self.activity);
        let stop = self.source_stop.child_token();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(crate::activity::SAMPLE_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            every.tick().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = every.tick() => activity.sample(),
                }
            }
        });
        self.set_state(RuntimeState::Running);
        Ok(())
    }

    /// The work of the last 15 minutes in 10-second intervals, oldest first; the last one is
    /// the interval still open.
    pub fn activity(&self) -> Vec<crate::activity::ActivitySample> {
        self.activity.history()
    }

    /// The actions modules offer operators.
    pub fn operator_actions(&self) -> &[Arc<dyn runtime_contracts::OperatorActions>] {
        &self.actions
    }

    /// The pages modules added to the operator console.
    pub fn console_pages(&self) -> &[Arc<dyn ConsolePages>] {
        &self.console
    }

    fn source_report(&self, source: &dyn TaskSource, pool: &str) -> SourceReport {
        let mut status = source.status();
        let control = self.source_controls.get(source.id());
        // Between a failed run and the next, the supervisor knows better than the source.
        if let Some(down) = control.and_then(|c| c.down_reason()) {
            status.state = SourceState::Degraded;
            status.last_error = Some(down);
        }
        SourceReport {
            restarts: control.map_or(0, |c| c.restarts.load(std::sync::atomic::Ordering::Relaxed)),
            pool: pool.to_owned(),
            state: status.state,
            paused: self
                .source_controls
                .get(source.id())
                .is_some_and(|c| c.is_paused()),
            published: status.published,
            completed: status.completed,
            pending: status.pending,
            last_event_age_ms: status
                .last_event_age
                .map(|a| u64::try_from(a.as_millis()).unwrap_or(u64::MAX)),
            last_error: status.last_error,
            next_due: status.next_due,
            lease: status.lease.map(|l| LeaseReport {
                resource: l.resource,
                held: l.held,
                holder: l.holder,
                token: l.token,
                held_for_ms: l
                    .held_for
                    .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                acquired: l.acquired,
                fenced_publishes: l.fenced_publishes,
            }),
        }
    }

    /// The retention sweep (`[retention]`).
    pub fn retention(&self) -> &Arc<crate::retention::Retention> {
        &self.retention
    }

    /// The reconciliation sweep, when `[reconcile]` is configured.
    pub fn reconciler(&self) -> Option<&Arc<Reconciler>> {
        self.reconciler.as_ref()
    }

    /// Stops a source from fetching more work (what it published goes on); false for an
    /// unknown source. Readiness reports the pause.
    pub fn pause_source(&self, id: &str) -> bool {
        self.source_controls.get(id).is_some_and(|c| {
            c.set_paused(true);
            tracing::info!(source = id, "source paused");
            true
        })
    }

    /// Lets a paused source fetch again; false for an unknown source.
    pub fn resume_source(&self, id: &str) -> bool {
        self.source_controls.get(id).is_some_and(|c| {
            c.set_paused(false);
            tracing::info!(source = id, "source resumed");
            true
        })
    }

    /// Sets a pool's worker count now (reload does this from the configuration); false for
    /// an unknown pool.
    pub fn resize_pool(&self, pool: &str, workers: usize) -> bool {
        workers > 0 && self.supervisor.resize(pool, workers)
    }

    /// The ids of the sources.
    pub fn source_ids(&self) -> Vec<String> {
        self.sources
            .iter()
            .map(|(s, _)| s.id().to_owned())
            .collect()
    }

    /// The names of the pools (and their queues).
    pub fn pool_names(&self) -> Vec<String> {
        self.pools.keys().cloned().collect()
    }

    /// The log filter control, when the runtime owns the process's subscriber.
    pub fn logs(&self) -> Option<&Arc<LogControl>> {
        self.logs.as_ref()
    }

    /// Prometheus text: counters as recorded, gauges read now.
    pub async fn metrics_text(&self) -> String {
        use crate::metrics::NameLabel;
        for (name, queue) in &self.queues {
            if let Ok(stats) = queue.stats().await {
                let label = NameLabel { name: name.clone() };
                let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
                self.metrics
                    .queue_depth
                    .get_or_create(&label)
                    .set(gauge(stats.depth));
                self.metrics
                    .queue_in_flight
                    .get_or_create(&label)
                    .set(gauge(stats.in_flight));
                self.metrics
                    .queue_scheduled
                    .get_or_create(&label)
                    .set(gauge(stats.scheduled));
                self.metrics
                    .queue_dead
                    .get_or_create(&label)
                    .set(gauge(stats.dead));
                let oldest = stats.oldest_pending_age_ms.unwrap_or(0);
                self.metrics
                    .queue_oldest_pending_age
                    .get_or_create(&label)
                    .set(oldest as f64 / 1000.0);
                // Consumer lag: what no consumer has been given yet. A Redis group knows it;
                // for the other queues it is what is ready.
                self.metrics
                    .queue_lag
                    .get_or_create(&label)
                    .set(gauge(stats.lag.unwrap_or(stats.depth)));
            }
        }
        let readiness = self.health.check(Probe::Readiness).await;
        self.metrics.ready.set(i64::from(readiness.healthy));
        for check in &readiness.checks {
            self.metrics
                .readiness_checks
                .get_or_create(&NameLabel {
                    name: check.name.clone(),
                })
                .set(i64::from(check.status == HealthStatus::Up));
        }
        for (source, _) in &self.sources {
            if let Some(age) = source.status().last_event_age {
                self.metrics
                    .source_age
                    .get_or_create(&NameLabel {
                        name: source.id().to_owned(),
                    })
                    .set(age.as_secs_f64());
            }
        }
        self.metrics.encode()
    }

    /// A snapshot of the pools alone (no queue round trip).
    pub fn pool_status(&self) -> Vec<PoolStatus> {
        self.supervisor.status()
    }

    /// A snapshot of modules, sources, pools and queues.
    pub async fn status(&self) -> RuntimeStatus {
        let mut queues = BTreeMap::new();
        for (name, queue) in &self.queues {
            if let Ok(stats) = queue.stats().await {
                queues.insert(name.clone(), stats);
            }
        }
        RuntimeStatus {
            state: self.state(),
            modules: self.modules.clone(),
            sources: self
                .sources
                .iter()
                .map(|(s, pool)| (s.id().to_owned(), self.source_report(s.as_ref(), pool)))
                .collect(),
            pools: self.supervisor.status(),
            queues,
            config: ConfigStatus {
                origin: self.config.origin().to_string(),
                overrides: self
                    .config
                    .overrides()
                    .map(|o| format!("{} (version {})", o.name, o.version)),
                rejected: self
                    .rejected
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone(),
            },
        }
    }

    /// Resolves once every source has scanned at least once (or ended) and every queue is
    /// empty: nothing ready, scheduled or in flight. For `run --once`.
    pub async fn wait_until_idle(&self, poll: Duration) {
        // Idle twice in a row, a poll apart: a broker that pushes deliveries counts one
        // as neither ready nor held while it travels to this process.
        let mut idle_before = false;
        loop {
            let idle = self.is_idle().await;
            if idle && idle_before {
                return;
            }
            idle_before = idle;
            tokio::time::sleep(poll).await;
        }
    }

    async fn is_idle(&self) -> bool {
        let ended = self
            .source_ended
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let sources_scanned = self
            .sources
            .iter()
            .all(|(s, _)| ended.contains_key(s.id()) || s.status().last_event_age.is_some());
        if !sources_scanned {
            return false;
        }
        for queue in self.queues.values() {
            match queue.stats().await {
                Ok(s) if s.depth == 0 && s.scheduled == 0 && s.in_flight == 0 => {}
                _ => return false,
            }
        }
        true
    }

    /// Stops sources first, then lets in-flight work finish until the configured deadline;
    /// what is still running then goes back to its queue (and stays unread at its source).
    pub async fn shutdown(&self) -> ShutdownReport {
        self.set_state(RuntimeState::Stopping);
        let deadline = Duration::from_millis(self.config.platform().runtime.shutdown_deadline_ms);
        tracing::info!(?deadline, "shutdown: stopping sources");
        self.source_stop.cancel();
        self.source_tasks.close();
        if tokio::time::timeout(deadline, self.source_tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("shutdown: a source did not stop within the deadline");
        }
        for pool in self.supervisor.status() {
            tracing::info!(
                pool = pool.name,
                in_flight = pool.busy,
                "shutdown: draining in-flight tasks"
            );
        }
        let drained_in_time = self.supervisor.shutdown(deadline).await;
        let status = self.status().await;
        for (name, q) in &status.queues {
            tracing::info!(
                queue = name,
                left_ready = q.depth,
                left_scheduled = q.scheduled,
                dead = q.dead,
                "shutdown: queue state at stop; tasks left in an in-memory queue stay unread at their source"
            );
        }
        self.telemetry.shutdown().await;
        self.set_state(RuntimeState::Stopped);
        ShutdownReport {
            drained_in_time,
            pools: status.pools,
            queues: status.queues,
        }
    }
}

/// The runtime's sources by id, for a source that wakes another.
struct Waker(HashMap<String, Arc<dyn TaskSource>>);

impl runtime_contracts::SourceWaker for Waker {
    fn wake(&self, id: &str) -> bool {
        match self.0.get(id) {
            Some(source) => {
                source.wake();
                true
            }
            None => false,
        }
    }
}

/// `pool` (as the configuration gives it) with a module's `defaults` for each key that the
/// configuration's `[pools.NAME]` does not set itself.
fn with_defaults(
    root: &serde_json::Value,
    name: &str,
    mut pool: crate::config::PoolConfig,
    defaults: &runtime_contracts::PoolDefaults,
) -> crate::config::PoolConfig {
    let raw = root.get("pools").and_then(|p| p.get(name));
    let set = |key: &str| raw.and_then(|r| r.get(key)).is_some();
    let retry_set = |key: &str| {
        raw.and_then(|r| r.get("retry"))
            .and_then(|r| r.get(key))
            .is_some()
    };
    if let (false, Some(v)) = (set("workers"), defaults.workers) {
        pool.workers = v;
    }
    if let (false, Some(v)) = (set("prefetch"), defaults.prefetch) {
        pool.prefetch = v;
    }
    // A retry schedule decides the attempts and the delays: no default replaces them.
    let scheduled = retry_set("schedule");
    if let (false, Some(v)) = (set("max_attempts") || scheduled, defaults.max_attempts) {
        pool.max_attempts = v;
    }
    if let (false, Some(v)) = (
        retry_set("initial_backoff_ms") || scheduled,
        defaults.initial_backoff_ms,
    ) {
        pool.retry.initial_backoff_ms = v;
    }
    if let (false, Some(v)) = (
        retry_set("max_backoff_ms") || scheduled,
        defaults.max_backoff_ms,
    ) {
        pool.retry.max_backoff_ms = v;
    }
    pool
}

impl RuntimeManager {
    /// The settings of `pool` in `platform`, with its module's proposals where the
    /// configuration is silent.
    pub(crate) fn effective_pool(
        &self,
        platform: &crate::config::PlatformConfig,
        pool: &str,
    ) -> Option<crate::config::PoolConfig> {
        let configured = platform
            .pools
            .get(pool)
            .cloned()
            .or_else(|| self.pools.contains_key(pool).then(Default::default))?;
        Some(match self.pool_defaults.get(pool) {
            Some(defaults) => with_defaults(&self.config.root(), pool, configured, defaults),
            None => configured,
        })
    }
}
