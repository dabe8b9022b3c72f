use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runtime_contracts::{
    ApplicationModule, Backpressure, BoxFuture, HealthContributor, HealthStatus, ModuleRegistry,
    Probe, QueueStats, SourceContext, SourceState, SourceStatus, TaskHandler, TaskQueue,
    TaskSource,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ConfigurationManager;
use crate::container::ServiceContainer;
use crate::error::CoreError;
use crate::health::HealthRegistry;
use crate::shutdown::TokenSignal;
use crate::supervisor::{PoolSpec, PoolStatus, WorkerSupervisor};
use crate::trace::TraceService;

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

/// A snapshot of the whole runtime.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RuntimeStatus {
    /// Lifecycle state.
    pub state: RuntimeState,
    /// Hosted modules.
    pub modules: Vec<String>,
    /// Sources by id.
    pub sources: BTreeMap<String, SourceStatus>,
    /// Pools.
    pub pools: Vec<PoolStatus>,
    /// Queues by name.
    pub queues: BTreeMap<String, QueueStats>,
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
    queues: &'a mut BTreeMap<String, Arc<dyn TaskQueue>>,
    sources: &'a mut Vec<(Arc<dyn TaskSource>, String)>,
    health: &'a HealthRegistry,
    services: &'a ServiceContainer,
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
        }
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
        let services = Arc::new(ServiceContainer::default());
        let mut handlers = HashMap::new();
        let mut declared = std::collections::BTreeSet::new();
        for module in &self.modules {
            let mut registrar = Registrar {
                handlers: &mut handlers,
                pools: &mut declared,
                queues: &mut self.queues,
                sources: &mut self.sources,
                health: &health,
                services: &services,
            };
            module.register(&mut registrar, &*self.config).await?;
        }
        // Configured pools keep their settings; pools only declared by a module get defaults.
        let mut pools = self.config.platform().pools;
        for name in declared {
            pools.entry(name).or_default();
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
            if !handlers.contains_key(pool) {
                problems.push(format!("pool {pool} has no handler"));
            }
        }
        for (source, pool) in &self.sources {
            if !pools.contains_key(pool) {
                problems.push(format!(
                    "source {} publishes to pool {pool}, which is neither configured nor declared by a module",
                    source.id()
                ));
            }
            health.register(Arc::new(SourceHealth(Arc::clone(source))));
        }
        if !problems.is_empty() {
            return Err(CoreError::Composition(problems.join("; ")));
        }
        Ok(RuntimeManager {
            config: self.config,
            pools,
            queues: self.queues,
            sources: self.sources,
            modules: self.modules.iter().map(|m| m.name().to_owned()).collect(),
            handlers,
            supervisor: WorkerSupervisor::new(),
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
    queues: BTreeMap<String, Arc<dyn TaskQueue>>,
    sources: Vec<(Arc<dyn TaskSource>, String)>,
    modules: Vec<String>,
    handlers: HashMap<String, HashMap<String, Arc<dyn TaskHandler>>>,
    supervisor: WorkerSupervisor,
    health: HealthRegistry,
    services: Arc<ServiceContainer>,
    trace: TraceService,
    source_stop: CancellationToken,
    source_tasks: TaskTracker,
    source_ended: Arc<Mutex<HashMap<String, Option<String>>>>,
    state: Mutex<RuntimeState>,
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
                },
                self.trace.clone(),
            );
            tracing::info!(pool, workers = pool_config.workers, "pool started");
        }
        for (source, pool) in &self.sources {
            let (Some(queue), Some(pool_config)) = (self.queues.get(pool), self.pools.get(pool))
            else {
                continue;
            };
            let ctx = SourceContext {
                queue: Arc::clone(queue),
                shutdown: Arc::new(TokenSignal(self.source_stop.child_token())),
                backpressure: Arc::new(QueueBackpressure {
                    queue: Arc::clone(queue),
                    high_watermark: pool_config.high_watermark as u64,
                }),
                tracer: Arc::new(self.trace.clone()),
            };
            let source = Arc::clone(source);
            let ended = Arc::clone(&self.source_ended);
            tracing::info!(source = source.id(), pool, "source started");
            self.source_tasks.spawn(async move {
                let result = source.start(ctx).await;
                let error = result.err().map(|e| e.to_string());
                if let Some(e) = &error {
                    tracing::error!(source = source.id(), error = %e, "source stopped with an error");
                }
                ended
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(source.id().to_owned(), error);
            });
        }
        self.set_state(RuntimeState::Running);
        Ok(())
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
                .map(|(s, _)| (s.id().to_owned(), s.status()))
                .collect(),
            pools: self.supervisor.status(),
            queues,
        }
    }

    /// Resolves once every source has scanned at least once (or ended) and every queue is
    /// empty: nothing ready, scheduled or in flight. For `run --once`.
    pub async fn wait_until_idle(&self, poll: Duration) {
        loop {
            if self.is_idle().await {
                return;
            }
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
        self.set_state(RuntimeState::Stopped);
        ShutdownReport {
            drained_in_time,
            pools: status.pools,
            queues: status.queues,
        }
    }
}

struct QueueBackpressure {
    queue: Arc<dyn TaskQueue>,
    high_watermark: u64,
}

impl Backpressure for QueueBackpressure {
    fn wait_for_capacity(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            loop {
                match self.queue.stats().await {
                    Ok(s) if s.depth + s.scheduled + s.in_flight < self.high_watermark => return,
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        })
    }
}

struct SourceHealth(Arc<dyn TaskSource>);

impl HealthContributor for SourceHealth {
    fn name(&self) -> &str {
        self.0.id()
    }

    fn check(&self, probe: Probe) -> BoxFuture<'_, HealthStatus> {
        Box::pin(async move {
            if probe == Probe::Liveness {
                return HealthStatus::Up;
            }
            let status = self.0.status();
            match status.state {
                SourceState::Running => HealthStatus::Up,
                state => HealthStatus::Down {
                    reason: status
                        .last_error
                        .unwrap_or_else(|| format!("source is {state:?}").to_lowercase()),
                },
            }
        })
    }
}
