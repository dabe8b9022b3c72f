//! The bot as an application module: its configuration section, its handler, its health.
//!
//! Like `domain`, this uses no runtime crate but `runtime-contracts`.

use std::path::PathBuf;
use std::sync::Arc;

use runtime_contracts::config::{parse_section_with_unknown, require_positive};
use runtime_contracts::{
    ApplicationModule, AttemptFailure, BoxFuture, ConfigProblem, ConfigProvider, HandlerContext,
    HandlerError, HealthContributor, HealthStatus, ModuleError, ModuleRegistry, Outcome, Probe,
    SourceError, Task, TaskHandler,
};
use serde::Deserialize;

use crate::domain::clients::{ClientDirectory, ClientEntry};
use crate::domain::extract::CsvLimits;
use crate::domain::message::{identity_of, read_mail, rfc822_parts, sha256_hex, MailFacts};
use crate::domain::store::{NewOrder, OrderStore, Recorded, Recording};
use crate::domain::OutcomeKind;

/// The module's configuration key.
pub const SECTION: &str = "apps.mail_order_bot";

/// `[apps.mail_order_bot]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct BotConfig {
    /// Where orders and outcomes are stored: `sqlite://PATH`.
    pub store_url: String,
    /// The worker pool whose tasks the bot handles.
    #[serde(default = "default_pool")]
    pub pool: String,
    /// The task kind the bot handles.
    #[serde(default = "default_kind")]
    pub task_kind: String,
    /// Most data rows read from one CSV attachment.
    #[serde(default = "default_csv_max_rows")]
    pub csv_max_rows: usize,
    /// Most `message/rfc822` parts a message may declare (forwarded mail); beyond, it is
    /// `rejected` unparsed, because the parser aborts the process on very deep nesting.
    #[serde(default = "default_max_rfc822_nesting")]
    pub max_rfc822_nesting: usize,
    /// Demo only: copy the bundled sample mail into this Maildir before starting (a
    /// sample already there, seen or not, is not copied again).
    #[serde(default)]
    pub seed_samples_into: Option<PathBuf>,
    /// The client directory.
    #[serde(default)]
    pub clients: Vec<ClientEntry>,
}

fn default_pool() -> String {
    "orders".to_owned()
}
fn default_kind() -> String {
    "mail.message".to_owned()
}
fn default_max_rfc822_nesting() -> usize {
    64
}
fn default_csv_max_rows() -> usize {
    CsvLimits::default().max_rows
}

impl BotConfig {
    /// Every problem in the section.
    pub fn check(section: Option<&serde_json::Value>) -> Result<Self, Vec<ConfigProblem>> {
        let Some(section) = section else {
            return Err(vec![ConfigProblem::new(SECTION, "missing section")]);
        };
        let (config, mut problems) = parse_section_with_unknown::<Self>(section, SECTION);
        let Some(config) = config else {
            return Err(problems);
        };
        problems.extend(ClientDirectory::problems(
            &config.clients,
            &format!("{SECTION}.clients"),
        ));
        if !config.store_url.starts_with("sqlite:") {
            problems.push(ConfigProblem::new(
                format!("{SECTION}.store_url"),
                format!("{:?} is not supported; use sqlite://PATH", config.store_url),
            ));
        }
        problems.extend(require_positive(
            SECTION,
            &[
                ("csv_max_rows", config.csv_max_rows as u64),
                ("max_rfc822_nesting", config.max_rfc822_nesting as u64),
            ],
        ));
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems)
        }
    }
}

/// The mail-order-bot module.
#[derive(Debug, Default)]
pub struct MailOrderModule;

impl ApplicationModule for MailOrderModule {
    fn name(&self) -> &str {
        "mail-order-bot"
    }

    fn config_section(&self) -> &str {
        SECTION
    }

    fn validate_config(&self, section: Option<&serde_json::Value>) -> Vec<ConfigProblem> {
        BotConfig::check(section).err().unwrap_or_default()
    }

    fn register<'a>(
        &'a self,
        registry: &'a mut dyn ModuleRegistry,
        config: &'a dyn ConfigProvider,
    ) -> BoxFuture<'a, Result<(), ModuleError>> {
        Box::pin(async move {
            let cfg = BotConfig::check(config.section(SECTION).as_ref()).map_err(|p| {
                ModuleError::Config {
                    module: self.name().to_owned(),
                    message: p
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; "),
                }
            })?;
            let store = OrderStore::open(&cfg.store_url)
                .await
                .map_err(|e| ModuleError::Init {
                    module: self.name().to_owned(),
                    message: e.to_string(),
                })?;
            let handler = OrderHandler::new(store.clone(), &cfg);
            registry.handler(&cfg.pool, &cfg.task_kind, Arc::new(handler));
            registry.health(Arc::new(StoreHealth(store.clone())));
            registry.service(Arc::new(store));
            Ok(())
        })
    }
}

/// Turns one mail task into one recorded outcome.
#[derive(Debug, Clone)]
pub struct OrderHandler {
    store: OrderStore,
    clients: Arc<ClientDirectory>,
    csv_limits: CsvLimits,
    max_rfc822_nesting: usize,
}

impl OrderHandler {
    /// A handler writing to `store`, resolving clients from `cfg`.
    pub fn new(store: OrderStore, cfg: &BotConfig) -> Self {
        Self {
            store,
            clients: Arc::new(ClientDirectory::new(&cfg.clients)),
            csv_limits: CsvLimits {
                max_rows: cfg.csv_max_rows,
                ..CsvLimits::default()
            },
            max_rfc822_nesting: cfg.max_rfc822_nesting,
        }
    }

    async fn load(
        &self,
        task: &Task,
        ctx: &HandlerContext,
    ) -> Result<Option<Vec<u8>>, HandlerError> {
        match ctx.load_content(task).await {
            Ok(content) => Ok(content),
            Err(e @ (SourceError::TooLarge { .. } | SourceError::InvalidPointer { .. })) => {
                Err(HandlerError::Permanent(e.to_string()))
            }
            Err(e) => Err(HandlerError::retry(format!("reading the message: {e}"))),
        }
    }

    /// Decides the outcome of a parsed message.
    fn decide(&self, facts: &MailFacts, task: &Task) -> Recording {
        let mut rec = Recording {
            identity: facts.identity.clone(),
            content_sha256: facts.content_sha256.clone(),
            sender: facts.sender.clone(),
            subject: facts.subject.clone(),
            task_id: task.id.to_string(),
            outcome: OutcomeKind::Created,
            reason: None,
            order: None,
        };
        let invalid = (!facts.extraction.invalid.is_empty())
            .then(|| format!("invalid lines: {}", facts.extraction.invalid.join("; ")));
        let Some(sender) = facts.sender.as_deref() else {
            rec.outcome = OutcomeKind::UnknownClient;
            rec.reason = Some("the message has no usable From address".into());
            return rec;
        };
        let Some(client) = self.clients.resolve(sender) else {
            rec.outcome = OutcomeKind::UnknownClient;
            rec.reason = Some(format!("no client for sender {sender}"));
            return rec;
        };
        if facts.extraction.lines.is_empty() {
            rec.outcome = OutcomeKind::NoLines;
            rec.reason = Some(invalid.unwrap_or_else(|| "no order lines found".into()));
            return rec;
        }
        rec.reason = invalid;
        rec.order = Some(NewOrder {
            client_id: client.id.clone(),
            client_name: client.name.clone(),
            lines: facts.extraction.lines.clone(),
        });
        rec
    }

    /// Records a `rejected` outcome for a message that is never parsed.
    async fn reject(
        &self,
        task: &Task,
        raw: &[u8],
        reason: String,
    ) -> Result<Outcome, HandlerError> {
        let rec = Recording {
            identity: format!("sha256:{}", sha256_hex(raw)),
            content_sha256: sha256_hex(raw),
            sender: None,
            subject: None,
            task_id: task.id.to_string(),
            outcome: OutcomeKind::Rejected,
            reason: Some(reason.clone()),
            order: None,
        };
        let recorded = self
            .store
            .record(&rec)
            .await
            .map_err(|e| HandlerError::retry(format!("recording the outcome: {e}")))?;
        Ok(match recorded {
            Recorded::New { .. } => {
                Outcome::new(OutcomeKind::Rejected.as_str()).with_detail(reason)
            }
            Recorded::Duplicate { earlier, .. } => Outcome::new(OutcomeKind::Duplicate.as_str())
                .with_detail(format!("{} already recorded as {earlier}", rec.identity)),
        })
    }

    async fn handle_task(
        &self,
        task: &Task,
        ctx: &HandlerContext,
    ) -> Result<Outcome, HandlerError> {
        let Some(raw) = self.load(task, ctx).await? else {
            return Ok(Outcome::new("skipped").with_detail("message gone"));
        };
        let parts = rfc822_parts(&raw);
        if parts > self.max_rfc822_nesting {
            return self
                .reject(
                    task,
                    &raw,
                    format!(
                        "max_rfc822_nesting: {parts} message/rfc822 parts, above the limit of {}",
                        self.max_rfc822_nesting
                    ),
                )
                .await;
        }
        let limits = self.csv_limits;
        // Parsing is CPU work on untrusted input: keep it off the async worker threads.
        let facts = tokio::task::spawn_blocking(move || read_mail(&raw, limits))
            .await
            .map_err(|e| HandlerError::retry(format!("parsing the message: {e}")))?;
        let rec = self.decide(&facts, task);
        let recorded = self
            .store
            .record(&rec)
            .await
            .map_err(|e| HandlerError::retry(format!("recording the outcome: {e}")))?;
        let outcome = match recorded {
            Recorded::New { order_id: Some(id) } => {
                Outcome::new(OutcomeKind::Created.as_str()).with_detail(format!("order {id}"))
            }
            Recorded::New { order_id: None } => Outcome::new(rec.outcome.as_str())
                .with_detail(rec.reason.clone().unwrap_or_default()),
            Recorded::Duplicate { earlier, order_id } => {
                Outcome::new(OutcomeKind::Duplicate.as_str()).with_detail(match order_id {
                    Some(id) => format!("{} already {earlier} as order {id}", rec.identity),
                    None => format!("{} already recorded as {earlier}", rec.identity),
                })
            }
        };
        Ok(outcome)
    }
}

impl TaskHandler for OrderHandler {
    fn handle<'a>(
        &'a self,
        task: &'a Task,
        ctx: &'a HandlerContext,
    ) -> BoxFuture<'a, Result<Outcome, HandlerError>> {
        Box::pin(self.handle_task(task, ctx))
    }

    fn on_dead_letter<'a>(
        &'a self,
        task: &'a Task,
        ctx: &'a HandlerContext,
        failure: &'a AttemptFailure,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let (identity, sha) = match ctx.load_content(task).await {
                Ok(Some(raw)) => (identity_of(&raw), sha256_hex(&raw)),
                _ => (format!("task:{}", task.id), String::new()),
            };
            if let Err(e) = self
                .store
                .record_failure(&identity, &sha, task.id.as_str(), &failure.reason)
                .await
            {
                tracing::error!(task = %task.id, error = %e, "could not record the failed outcome");
            }
        })
    }
}

struct StoreHealth(OrderStore);

impl HealthContributor for StoreHealth {
    fn name(&self) -> &str {
        "order-store"
    }

    fn check(&self, probe: Probe) -> BoxFuture<'_, HealthStatus> {
        Box::pin(async move {
            if probe == Probe::Liveness {
                return HealthStatus::Up;
            }
            match self.0.ping().await {
                Ok(()) => HealthStatus::Up,
                Err(e) => HealthStatus::Down {
                    reason: e.to_string(),
                },
            }
        })
    }
}
