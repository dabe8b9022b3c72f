//! Composition: the configuration's choices turned into a running runtime. This is the only
//! part of the bot that knows the runtime core and the adapters.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use runtime_adapters::config_store::{ConfigStoreConfig, SqlConfigStore};
use runtime_adapters::control::ControlConfig;
use runtime_adapters::queue::amqp::{AmqpHealth, AmqpQueue, AmqpQueueConfig};
use runtime_adapters::queue::memory::{MemoryQueue, MemoryQueueConfig};
use runtime_adapters::queue::redis::{RedisHealth, RedisQueue, RedisQueueConfig};
use runtime_adapters::sources::imap::{ImapConfig, ImapMode, ImapSource};
use runtime_adapters::sources::maildir::{self, MaildirConfig, MaildirSource};
use runtime_adapters::sources::schedule::{ScheduleConfig, ScheduleSource};
use runtime_adapters::sources::webhook::{WebhookConfig, WebhookSource};
use runtime_contracts::{ApplicationModule, ConfigProblem, TaskQueue};
use runtime_core::config::{lookup, parse_section_with_unknown};
use runtime_core::{
    ConfigOrigin, ConfigReport, ConfigurationManager, LogControl, RuntimeBuilder, RuntimeManager,
    Telemetry,
};

use crate::module::{BotConfig, MailOrderModule, SECTION};

/// The default configuration, compiled in: runs with no server at all.
pub const DEFAULT_CONFIG: &str = include_str!("../../../config/default.toml");

/// The sample mail the default configuration seeds its Maildir with.
static SAMPLES: include_dir::Dir<'_> = include_dir::include_dir!("$CARGO_MANIFEST_DIR/samples");

/// Where the configuration comes from: a file, or the embedded default.
pub fn origin(path: Option<&Path>) -> ConfigOrigin {
    match path {
        Some(p) => ConfigOrigin::File(p.to_owned()),
        None => ConfigOrigin::Embedded {
            name: "embedded config/default.toml".into(),
            text: DEFAULT_CONFIG.into(),
        },
    }
}

/// The `type` of a tagged section and the rest of it.
fn split_type(
    value: &serde_json::Value,
    key: &str,
) -> Result<(String, serde_json::Value), ConfigProblem> {
    let Some(map) = value.as_object() else {
        return Err(ConfigProblem::new(key, "must be a table"));
    };
    let Some(kind) = map.get("type").and_then(|t| t.as_str()) else {
        return Err(ConfigProblem::new(
            format!("{key}.type"),
            "missing or not a string",
        ));
    };
    let mut rest = map.clone();
    rest.remove("type");
    Ok((kind.to_owned(), serde_json::Value::Object(rest)))
}

/// The configured queue type.
#[derive(Clone, Debug)]
pub enum QueueChoice {
    /// `type = "memory"`.
    Memory(MemoryQueueConfig),
    /// `type = "redis"`.
    Redis(RedisQueueConfig),
    /// `type = "amqp"`.
    Amqp(AmqpQueueConfig),
}

/// The handler timeout of every pool that leases from the main queue (not the outbox
/// pools), the bot's pool included when only declared.
fn handler_timeouts(root: &serde_json::Value) -> Vec<(String, u64)> {
    let default = runtime_core::PoolConfig::default().handler_timeout_ms;
    let mut timeouts: Vec<(String, u64)> = root
        .get("pools")
        .and_then(|p| p.as_object())
        .map(|pools| {
            pools
                .iter()
                // The outbox pools lease their rows from the order store, not from this
                // queue.
                .filter(|(name, _)| {
                    ![
                        crate::domain::outbox::POOL,
                        crate::domain::outbox::REPLY_POOL,
                    ]
                    .contains(&name.as_str())
                })
                .map(|(name, pool)| {
                    let t = pool.get("handler_timeout_ms").and_then(|t| t.as_u64());
                    (name.clone(), t.unwrap_or(default))
                })
                .collect()
        })
        .unwrap_or_default();
    let bot_pool = lookup(root, SECTION)
        .and_then(|s| s.get("pool"))
        .and_then(|p| p.as_str())
        .unwrap_or("orders");
    if !timeouts.iter().any(|(n, _)| n == bot_pool) {
        timeouts.push((bot_pool.to_owned(), default));
    }
    timeouts
}

/// Every configured pool with its settings, the bot's own pool included when only named.
fn pools(config: &ConfigurationManager, bot_pool: &str) -> Vec<(String, runtime_core::PoolConfig)> {
    let mut pools: Vec<(String, runtime_core::PoolConfig)> = config
        .platform()
        .pools
        .iter()
        .map(|(name, pool)| (name.clone(), pool.clone()))
        .collect();
    if !pools.iter().any(|(name, _)| name == bot_pool) {
        pools.push((bot_pool.to_owned(), runtime_core::PoolConfig::default()));
    }
    pools
}

/// The queue settings (`[queue]`), checked against the pools' handler timeouts; the
/// in-memory queue when absent.
pub fn queue_config(root: &serde_json::Value) -> Result<QueueChoice, Vec<ConfigProblem>> {
    let choice = choose_queue(root)?;
    if matches!(choice, QueueChoice::Memory(_)) {
        // A pool without workers only publishes: other processes must share its queue.
        let idle: Vec<ConfigProblem> = root
            .get("pools")
            .and_then(serde_json::Value::as_object)
            .into_iter()
            .flatten()
            .filter(|(_, p)| p.get("workers").and_then(serde_json::Value::as_u64) == Some(0))
            .map(|(name, _)| {
                ConfigProblem::new(
                    format!("pools.{name}.workers"),
                    "0 workers needs a queue other processes share (queue.type = \"redis\" or \"amqp\"): with the in-memory queue nothing would ever handle the work",
                )
            })
            .collect();
        // A webhook answers 2xx once its task is enqueued: an in-memory enqueue dies with
        // the process, so it needs saying so.
        let volatile: Vec<ConfigProblem> = root
            .get("sources")
            .and_then(serde_json::Value::as_object)
            .into_iter()
            .flatten()
            .filter(|(_, s)| {
                s.get("type").and_then(serde_json::Value::as_str) == Some("webhook")
                    && s.get("allow_volatile_queue").and_then(serde_json::Value::as_bool) != Some(true)
            })
            .map(|(id, _)| {
                ConfigProblem::new(
                    format!("sources.{id}.type"),
                    "a webhook answers 2xx once its task is enqueued, and the in-memory queue loses what it holds when the process ends: use queue.type = \"redis\" or \"amqp\", or set allow_volatile_queue = true",
                )
            })
            .collect();
        let idle: Vec<ConfigProblem> = idle.into_iter().chain(volatile).collect();
        if !idle.is_empty() {
            return Err(idle);
        }
    }
    Ok(choice)
}

fn choose_queue(root: &serde_json::Value) -> Result<QueueChoice, Vec<ConfigProblem>> {
    let Some(section) = root.get("queue") else {
        return Ok(QueueChoice::Memory(MemoryQueueConfig::default()));
    };
    let (kind, rest) = split_type(section, "queue").map_err(|p| vec![p])?;
    let timeouts = handler_timeouts(root);
    match kind.as_str() {
        "memory" => {
            let (cfg, mut problems) =
                parse_section_with_unknown::<MemoryQueueConfig>(&rest, "queue");
            if let Some(c) = &cfg {
                problems.extend(c.problems("queue"));
                for (pool, timeout) in &timeouts {
                    if c.lease_timeout_ms <= *timeout {
                        problems.push(ConfigProblem::new(
                            "queue.lease_timeout_ms",
                            format!("must exceed pools.{pool}.handler_timeout_ms ({timeout})"),
                        ));
                    }
                }
            }
            match cfg {
                Some(cfg) if problems.is_empty() => Ok(QueueChoice::Memory(cfg)),
                _ => Err(problems),
            }
        }
        "redis" => {
            let (cfg, mut problems) =
                parse_section_with_unknown::<RedisQueueConfig>(&rest, "queue");
            problems.extend(cfg.iter().flat_map(|c| c.problems("queue", &timeouts)));
            match cfg {
                Some(cfg) if problems.is_empty() => Ok(QueueChoice::Redis(cfg)),
                _ => Err(problems),
            }
        }
        "amqp" => {
            let (cfg, mut problems) = parse_section_with_unknown::<AmqpQueueConfig>(&rest, "queue");
            problems.extend(cfg.iter().flat_map(|c| c.problems("queue")));
            match cfg {
                Some(cfg) if problems.is_empty() => Ok(QueueChoice::Amqp(cfg)),
                _ => Err(problems),
            }
        }
        other => Err(vec![ConfigProblem::new(
            "queue.type",
            format!("unknown queue type {other:?}; supported: \"memory\", \"redis\", \"amqp\""),
        )]),
    }
}

/// The control plane's settings (`[control]`), checked; disabled when absent.
pub fn control_config(
    section: Option<&serde_json::Value>,
) -> Result<ControlConfig, Vec<ConfigProblem>> {
    let Some(section) = section else {
        return Ok(ControlConfig::default());
    };
    let (cfg, mut problems) = parse_section_with_unknown::<ControlConfig>(section, "control");
    problems.extend(cfg.iter().flat_map(|c| c.problems("control")));
    match cfg {
        Some(cfg) if problems.is_empty() => Ok(cfg),
        _ => Err(problems),
    }
}

/// One source's settings, by type.
#[derive(Debug)]
pub enum SourceConfig {
    /// `type = "maildir"`.
    Maildir(MaildirConfig),
    /// `type = "imap_poll"` or `type = "imap_idle"`: the same settings.
    Imap(Box<ImapConfig>, ImapMode),
    /// `type = "webhook"`.
    Webhook(Box<WebhookConfig>),
    /// `type = "schedule"`.
    Schedule(Box<ScheduleConfig>),
}

impl SourceConfig {
    /// The pool the source feeds.
    pub fn pool(&self) -> &str {
        match self {
            Self::Maildir(c) => &c.pool,
            Self::Imap(c, _) => &c.pool,
            Self::Webhook(c) => &c.pool,
            Self::Schedule(c) => &c.pool,
        }
    }
}

fn checked<T: serde::de::DeserializeOwned>(
    rest: &serde_json::Value,
    key: &str,
    problems_of: impl Fn(&T, &str) -> Vec<ConfigProblem>,
) -> Result<T, Vec<ConfigProblem>> {
    let (cfg, mut problems) = parse_section_with_unknown::<T>(rest, key);
    problems.extend(cfg.iter().flat_map(|c| problems_of(c, key)));
    match cfg {
        Some(cfg) if problems.is_empty() => Ok(cfg),
        _ => Err(problems),
    }
}

/// One source's settings (`[sources.<id>]`), checked.
pub fn source_config(
    id: &str,
    value: &serde_json::Value,
) -> Result<SourceConfig, Vec<ConfigProblem>> {
    let key = format!("sources.{id}");
    let (kind, rest) = split_type(value, &key).map_err(|p| vec![p])?;
    match kind.as_str() {
        "maildir" => checked(&rest, &key, MaildirConfig::problems).map(SourceConfig::Maildir),
        "imap_poll" | "imap_idle" => {
            let mode = if kind == "imap_idle" {
                ImapMode::Idle
            } else {
                ImapMode::Poll
            };
            checked(&rest, &key, |c: &ImapConfig, k: &str| c.problems_for(k, mode))
                .map(|c| SourceConfig::Imap(Box::new(c), mode))
        }
        "webhook" => checked(&rest, &key, WebhookConfig::problems)
            .map(|c| SourceConfig::Webhook(Box::new(c))),
        "schedule" => checked(&rest, &key, ScheduleConfig::problems)
            .map(|c| SourceConfig::Schedule(Box::new(c))),
        other => Err(vec![ConfigProblem::new(
            format!("{key}.type"),
            format!(
                "unknown source type {other:?}; supported: \"maildir\", \"imap_poll\", \"imap_idle\", \"webhook\", \"schedule\""
            ),
        )]),
    }
}

fn check_sources(section: Option<&serde_json::Value>) -> Vec<ConfigProblem> {
    let Some(section) = section else {
        return vec![ConfigProblem::new(
            "sources",
            "at least one source is needed",
        )];
    };
    let Some(map) = section.as_object() else {
        return vec![ConfigProblem::new("sources", "must be a table of sources")];
    };
    if map.is_empty() {
        return vec![ConfigProblem::new(
            "sources",
            "at least one source is needed",
        )];
    }
    map.iter()
        .filter_map(|(id, v)| source_config(id, v).err())
        .flatten()
        .collect()
}

/// Relations between sections: sources publish to a known pool; leases outlive handler
/// timeouts.
fn cross_check(root: &serde_json::Value) -> Vec<ConfigProblem> {
    let mut problems = Vec::new();
    let pools = root.get("pools").and_then(|p| p.as_object());
    // The bot declares its pool; without a [pools.<name>] it runs with default settings.
    let bot_pool = lookup(root, SECTION)
        .and_then(|s| s.get("pool"))
        .and_then(|p| p.as_str())
        .unwrap_or("orders");
    let pool_exists = |name: &str| name == bot_pool || pools.is_some_and(|p| p.contains_key(name));
    if let Some(sources) = root.get("sources").and_then(|s| s.as_object()) {
        for (id, source) in sources {
            if let Some(pool) = source.get("pool").and_then(|p| p.as_str()) {
                if !pool_exists(pool) {
                    problems.push(ConfigProblem::new(
                        format!("sources.{id}.pool"),
                        format!(
                            "pool {pool:?} is neither configured under [pools] nor the bot's pool"
                        ),
                    ));
                }
            }
        }
    }
    if let Some(Err(p)) = retention_source(root, bot_pool) {
        problems.extend(p);
    }
    problems
}

/// The schedule source the bot adds for the retention sweep (`[retention].schedule`, on
/// the bot's pool) when no configured source publishes the sweep's kind: its id and
/// settings. `None` when one does, or when the schedule is `off`.
fn retention_source(
    root: &serde_json::Value,
    bot_pool: &str,
) -> Option<Result<(String, ScheduleConfig), Vec<ConfigProblem>>> {
    let retention: runtime_core::retention::RetentionConfig = root
        .get("retention")
        .and_then(|r| serde_json::from_value(r.clone()).ok())
        .unwrap_or_default();
    let cron = retention.own_schedule()?;
    let sources = root.get("sources").and_then(|s| s.as_object());
    let published = sources.is_some_and(|sources| {
        sources.values().any(|s| {
            s.get("type").and_then(|t| t.as_str()) == Some("schedule")
                && s.get("kind").and_then(|k| k.as_str()) == Some(retention.kind.as_str())
        })
    });
    if published {
        return None;
    }
    let id = ["retention", "plba-retention"]
        .into_iter()
        .find(|id| !sources.is_some_and(|s| s.contains_key(*id)))
        .unwrap_or("plba-retention-sweep");
    let settings = serde_json::json!({ "cron": cron, "pool": bot_pool, "kind": retention.kind });
    Some(
        checked(&settings, "retention.schedule", ScheduleConfig::problems)
            .map(|c| (id.to_owned(), c))
            .map_err(|problems| {
                problems
                    .into_iter()
                    .map(|p| {
                        ConfigProblem::new("retention.schedule", format!("{cron:?}: {}", p.message))
                    })
                    .collect()
            }),
    )
}

/// Loads and validates the whole configuration; `env` replaces the process environment.
pub fn load_config(
    path: Option<&Path>,
    env: Option<HashMap<String, String>>,
) -> Result<ConfigurationManager, ConfigReport> {
    config_builder(env).load(origin(path))
}

/// The bot's claims and checks, for every way of loading its configuration.
fn config_builder(env: Option<HashMap<String, String>>) -> runtime_core::config::ConfigBuilder {
    let module = MailOrderModule;
    let mut builder = ConfigurationManager::builder()
        .claim("queue", |_| Vec::new())
        .claim("sources", check_sources)
        .claim("control", |v| control_config(v).err().unwrap_or_default())
        .claim("config_store", |v| {
            v.map(|v| config_store_config(v).err().unwrap_or_default())
                .unwrap_or_default()
        })
        .claim(SECTION, move |v| module.validate_config(v))
        .key_changes(runtime_adapters::KEY_CHANGES)
        .cross_check(cross_check)
        .cross_check(|root| queue_config(root).err().unwrap_or_default());
    if let Some(env) = env {
        builder = builder.env(env);
    }
    builder
}

/// The configuration store's settings (`[config_store]`), checked.
pub fn config_store_config(
    section: &serde_json::Value,
) -> Result<ConfigStoreConfig, Vec<ConfigProblem>> {
    checked(section, "config_store", ConfigStoreConfig::problems)
}

/// Why the layered configuration could not be loaded.
#[derive(Debug)]
pub enum LayeredError {
    /// The file, the database overrides or the environment has problems.
    Config(ConfigReport),
    /// The configuration store could not be read.
    Store(String),
}

impl std::fmt::Display for LayeredError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Config(report) => report.fmt(f),
            Self::Store(message) => f.write_str(message),
        }
    }
}

/// The configuration merged from the file, the database named by its `[config_store]`
/// (when there is one) and the environment, validated as a whole; and the store, for the
/// watcher. The file with the environment must be valid on its own.
pub async fn load_layered_config(
    path: Option<&Path>,
    env: Option<HashMap<String, String>>,
) -> Result<(ConfigurationManager, Option<Arc<SqlConfigStore>>), LayeredError> {
    let manager = load_config(path, env.clone()).map_err(LayeredError::Config)?;
    let Some(section) = lookup(&manager.root(), "config_store").cloned() else {
        return Ok((manager, None));
    };
    let cfg = config_store_config(&section).map_err(|problems| {
        LayeredError::Config(ConfigReport {
            origin: manager.origin().to_string(),
            problems,
        })
    })?;
    let store = SqlConfigStore::open(&cfg)
        .await
        .map_err(|e| LayeredError::Store(e.to_string()))?;
    let overrides = store
        .read()
        .await
        .map_err(|e| LayeredError::Store(e.to_string()))?;
    let layered = config_builder(env)
        .overrides(overrides)
        .load(origin(path))
        .map_err(LayeredError::Config)?;
    Ok((layered, Some(Arc::new(store))))
}

/// Reloads the configuration whenever the store's table changes, until the runtime is
/// dropped. A change that does not validate is refused as a whole (the runtime reports
/// it); a store that cannot be read is retried at the next poll.
pub fn watch_config_store(
    runtime: &Arc<RuntimeManager>,
    store: Arc<SqlConfigStore>,
) -> tokio::task::JoinHandle<()> {
    let runtime = Arc::downgrade(runtime);
    tokio::spawn(async move {
        let mut seen = runtime
            .upgrade()
            .and_then(|r| r.config().overrides())
            .map(|o| o.version);
        loop {
            tokio::time::sleep(store.poll_interval()).await;
            let Some(runtime) = runtime.upgrade() else {
                return;
            };
            let version = match store.version().await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "configuration store not readable; the configuration in force stays");
                    continue;
                }
            };
            if seen.as_deref() == Some(version.as_str()) {
                continue;
            }
            match store.read().await {
                Ok(overrides) => {
                    seen = Some(version);
                    // A refused change is reported by the runtime (log, metric, /status).
                    if let Ok(report) = runtime.reload_with(Some(overrides)) {
                        tracing::info!(?report, "configuration store changed: reloaded");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "configuration store not readable; the configuration in force stays")
                }
            }
        }
    })
}

/// Copies the bundled samples into `maildir`, skipping any already there. Returns how many
/// were copied.
pub fn seed_samples(maildir: &Path) -> std::io::Result<usize> {
    let mut copied = 0;
    let mut files: Vec<_> = SAMPLES.files().collect();
    files.sort_by_key(|f| f.path());
    for file in files {
        let Some(stem) = file.path().file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let unique = format!("sample.{stem}");
        if maildir::holds(maildir, &unique) {
            continue;
        }
        maildir::deliver(maildir, &unique, file.contents())?;
        copied += 1;
    }
    Ok(copied)
}

/// Builds the runtime the configuration describes, hosting `module` (the bot, or a test's
/// wrapper around it).
pub async fn build_runtime(
    config: Arc<ConfigurationManager>,
    module: Arc<dyn ApplicationModule>,
    logs: Option<LogControl>,
) -> anyhow::Result<RuntimeManager> {
    build_traced_runtime(config, module, logs, Arc::new(Telemetry::disabled())).await
}

/// [`build_runtime`] whose tasks are traced through `telemetry` (see `[telemetry]`).
pub async fn build_traced_runtime(
    config: Arc<ConfigurationManager>,
    module: Arc<dyn ApplicationModule>,
    logs: Option<LogControl>,
    telemetry: Arc<Telemetry>,
) -> anyhow::Result<RuntimeManager> {
    let root = config.root();
    let bot = BotConfig::check(lookup(&root, SECTION)).map_err(|p| ConfigReport {
        origin: config.origin().to_string(),
        problems: p,
    })?;
    if let Some(maildir) = &bot.seed_samples_into {
        let n = seed_samples(maildir)?;
        if n > 0 {
            tracing::info!(count = n, maildir = %maildir.display(), "seeded sample mail");
        }
    }
    let queue_choice = queue_config(&root).map_err(|p| ConfigReport {
        origin: config.origin().to_string(),
        problems: p,
    })?;
    let mut builder = RuntimeBuilder::new(Arc::clone(&config))
        .module(module)
        .log_control(logs)
        .telemetry(telemetry);
    builder = match queue_choice {
        QueueChoice::Memory(cfg) => builder.queue_factory(move |pool| -> Arc<dyn TaskQueue> {
            Arc::new(MemoryQueue::new(pool, cfg.clone()))
        }),
        QueueChoice::Redis(cfg) => {
            for (pool, _) in pools(&config, &bot.pool) {
                let queue = Arc::new(RedisQueue::new(pool.clone(), cfg.clone())?);
                builder = builder
                    .health(Arc::new(RedisHealth(Arc::clone(&queue))))
                    .queue(&pool, queue);
            }
            builder
        }
        QueueChoice::Amqp(cfg) => {
            for (pool, settings) in pools(&config, &bot.pool) {
                // The broker pushes as many deliveries as the pool's workers lease at once.
                let prefetch = settings.workers.saturating_mul(settings.prefetch);
                let queue = Arc::new(AmqpQueue::new(pool.clone(), cfg.clone(), prefetch)?);
                builder = builder
                    .health(Arc::new(AmqpHealth(Arc::clone(&queue))))
                    .queue(&pool, queue);
            }
            builder
        }
    };
    if let Some(sources) = root.get("sources").and_then(|s| s.as_object()) {
        for (id, value) in sources {
            let cfg = source_config(id, value).map_err(|p| ConfigReport {
                origin: config.origin().to_string(),
                problems: p,
            })?;
            let pool = cfg.pool().to_owned();
            let source: Arc<dyn runtime_contracts::TaskSource> = match cfg {
                SourceConfig::Maildir(cfg) => Arc::new(MaildirSource::new(id.clone(), cfg)),
                SourceConfig::Imap(cfg, mode) => Arc::new(ImapSource::new(id.clone(), *cfg, mode)),
                SourceConfig::Webhook(cfg) => Arc::new(WebhookSource::new(id.clone(), *cfg)),
                SourceConfig::Schedule(cfg) => Arc::new(ScheduleSource::new(id.clone(), *cfg)),
            };
            builder = builder.source(source, &pool);
        }
    }
    if let Some(Ok((id, cfg))) = retention_source(&root, &bot.pool) {
        tracing::info!(source = %id, cron = %cfg.cron, "the retention sweep runs on its own schedule ([retention].schedule)");
        builder = builder.source(Arc::new(ScheduleSource::new(id, cfg)), &bot.pool);
    }
    Ok(builder.build().await?)
}
