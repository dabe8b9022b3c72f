//! The bot as an application module: its configuration section, its handler, its health.
//!
//! Like `domain`, this uses no runtime crate but `runtime-contracts`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use runtime_contracts::config::{parse_section_with_unknown, require_positive};
use runtime_contracts::{
    ApplicationModule, AttemptFailure, BoxFuture, ConfigProblem, ConfigProvider, GoneReason,
    HandlerContext, HandlerError, HealthContributor, HealthStatus, ModuleError, ModuleRegistry,
    Outcome, Probe, SourceError, SpanGuard, Task, TaskHandler,
};
use serde::Deserialize;

use crate::domain::clients::{load_clients_file, ClientDirectory, ClientEntry};
use crate::domain::erp::{ErpConfig, ErpHandler};
use crate::domain::extract::CsvLimits;
use crate::domain::message::{identity_of, read_mail_in_stages, sha256_hex, MailFacts, MailLimits};
use crate::domain::outbox::{self, OutboxQueue, OutboxSource, Scope};
use crate::domain::reply::{ReplyConfig, ReplyHandler};
use crate::domain::sender_auth::{Checker, SenderAuthConfig, Verdict};
use crate::domain::sheets::SheetLimits;
use crate::domain::store::{Backend, Effects, NewOrder, OrderStore, Recorded, Recording, ReplyTo};
use crate::domain::{clip, OutcomeKind, MAX_NAMED_INVALID, MAX_STORED_REASON};
use crate::helper::{HelperFailure, HelperSettings, ParserPool};

/// The module's configuration key.
pub const SECTION: &str = "apps.mail_order_bot";

/// `[apps.mail_order_bot]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct BotConfig {
    /// Where orders and outcomes are stored: `sqlite://PATH` or `postgres://…`.
    pub store_url: String,
    /// The worker pool whose tasks the bot handles.
    #[serde(default = "default_pool")]
    pub pool: String,
    /// The task kind the bot handles.
    #[serde(default = "default_kind")]
    pub task_kind: String,
    /// Largest message read, in bytes; larger ones are `rejected` unparsed.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Most data rows read from one table (CSV, spreadsheet, HTML).
    #[serde(default = "default_csv_max_rows")]
    pub csv_max_rows: usize,
    /// Longest CSV record, in bytes; longer ones are reported as invalid.
    #[serde(default = "default_csv_max_line_bytes")]
    pub csv_max_line_bytes: usize,
    /// Most uncompressed bytes an XLSX or ODS attachment (a zip) may declare.
    #[serde(default = "default_xlsx_max_uncompressed_bytes")]
    pub xlsx_max_uncompressed_bytes: u64,
    /// Highest compression ratio of a zip entry above 1 MiB in an XLSX or ODS attachment.
    #[serde(default = "default_zip_max_ratio")]
    pub zip_max_ratio: u64,
    /// Most cells a spreadsheet sheet may span (rows × columns).
    #[serde(default = "default_sheet_max_cells")]
    pub sheet_max_cells: u64,
    /// Most message parts a message may hold, of any kind (`message/rfc822`,
    /// `message/global`, `multipart/digest` children, those inside transfer-encoded ones;
    /// forwarded mail); beyond, it is `rejected` unparsed, because the parser aborts the
    /// process on very deep nesting.
    #[serde(default = "default_max_rfc822_nesting")]
    pub max_rfc822_nesting: usize,
    /// Most `multipart/*` parts a message may hold; beyond, it is `rejected` unparsed
    /// (the parser's time grows with the square of their nesting).
    #[serde(default = "default_max_multipart_parts")]
    pub max_multipart_parts: usize,
    /// Most MIME entities (parts and nested messages) a message may hold.
    #[serde(default = "default_max_mime_parts")]
    pub max_mime_parts: usize,
    /// How many times reading one message may stop the process (an abort, an
    /// out-of-memory kill) before it is rejected unread (`max_handling_deaths`), on any
    /// queue: a poison message must not crash every start.
    #[serde(default = "default_max_handling_deaths")]
    pub max_handling_deaths: u32,
    /// Most transfer-encoded (base64, quoted-printable) message parts a message may hold:
    /// the parser decodes each and parses what it holds.
    #[serde(default = "default_max_encoded_message_parts")]
    pub max_encoded_message_parts: usize,
    /// Demo only: copy the bundled sample mail into this Maildir before starting (a
    /// sample already there, seen or not, is not copied again).
    #[serde(default)]
    pub seed_samples_into: Option<PathBuf>,
    /// Clients listed in the configuration.
    #[serde(default)]
    pub clients: Vec<ClientEntry>,
    /// A file with more clients: TOML (`[[clients]]` tables) or CSV (columns `id`, `name`,
    /// `addresses`, `domains`, optional `attachments`, `read_body`; lists separated by `;`).
    #[serde(default)]
    pub clients_file: Option<PathBuf>,
    /// Also read clients from the store's `clients` table.
    #[serde(default)]
    pub clients_from_store: bool,
    /// Deliver each new order to an ERP over HTTP, from the outbox.
    #[serde(default)]
    pub erp: Option<ErpConfig>,
    /// Reply to senders over SMTP (a confirmation of each order, a rejection of mail the
    /// bot could not take), from the outbox.
    #[serde(default)]
    pub reply: Option<ReplyConfig>,
    /// How the outbox's effects are dispatched.
    #[serde(default)]
    pub outbox: OutboxConfig,
    /// How a sender is authenticated before its client is resolved (`mode` must be chosen).
    #[serde(default)]
    pub sender_auth: SenderAuthConfig,
    /// Where messages are read: `auto` (helper processes when running as the
    /// mail-order-bot binary, a blocking thread when the module is embedded elsewhere),
    /// `process` or `thread`.
    #[serde(default)]
    pub parse_isolation: ParseIsolation,
    /// Longest reading of one message in a helper; beyond, the helper is killed and the
    /// message `rejected`.
    #[serde(default = "default_parse_timeout_ms")]
    pub parse_timeout_ms: u64,
    /// A helper's memory limit (its data segment), in MiB; a message whose reading needs
    /// more ends its helper and is `rejected`.
    #[serde(default = "default_parse_memory_mb")]
    pub parse_memory_mb: u64,
    /// The helper program (the mail-order-bot binary); this program when unset.
    #[serde(default)]
    pub parse_helper: Option<PathBuf>,
}

/// `parse_isolation`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParseIsolation {
    /// Helper processes when this program can serve them, else a thread.
    #[default]
    Auto,
    /// Helper processes (limited in memory, stack and CPU; killed on a timeout).
    Process,
    /// A blocking thread of the bot's own process.
    Thread,
}

/// `[apps.mail_order_bot.outbox]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct OutboxConfig {
    /// How long a dispatcher holds a claimed effect; a dispatcher that dies holding it
    /// (kill -9, a lost host) leaves it to another claim after this long.
    #[serde(default = "default_outbox_lease_ms")]
    pub lease_ms: u64,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            lease_ms: default_outbox_lease_ms(),
        }
    }
}

fn default_parse_timeout_ms() -> u64 {
    10_000
}
fn default_parse_memory_mb() -> u64 {
    1024
}

fn default_outbox_lease_ms() -> u64 {
    60_000
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
fn default_csv_max_line_bytes() -> usize {
    CsvLimits::default().max_record_bytes
}
fn default_max_multipart_parts() -> usize {
    MailLimits::default().max_multipart_parts
}
fn default_max_handling_deaths() -> u32 {
    3
}
fn default_max_mime_parts() -> usize {
    MailLimits::default().max_mime_parts
}
fn default_max_encoded_message_parts() -> usize {
    MailLimits::default().max_encoded_message_parts
}
fn default_max_message_bytes() -> usize {
    MailLimits::default().max_message_bytes
}
fn default_xlsx_max_uncompressed_bytes() -> u64 {
    SheetLimits::default().max_uncompressed_bytes
}
fn default_zip_max_ratio() -> u64 {
    SheetLimits::default().max_zip_ratio
}
fn default_sheet_max_cells() -> u64 {
    SheetLimits::default().max_cells
}

impl BotConfig {
    /// The limits applied to each message.
    pub fn limits(&self) -> MailLimits {
        MailLimits {
            max_message_bytes: self.max_message_bytes,
            max_rfc822_nesting: self.max_rfc822_nesting,
            max_multipart_parts: self.max_multipart_parts,
            max_mime_parts: self.max_mime_parts,
            max_encoded_message_parts: self.max_encoded_message_parts,
            csv: CsvLimits {
                max_rows: self.csv_max_rows,
                max_record_bytes: self.csv_max_line_bytes,
            },
            sheets: SheetLimits {
                max_uncompressed_bytes: self.xlsx_max_uncompressed_bytes,
                max_zip_ratio: self.zip_max_ratio,
                max_cells: self.sheet_max_cells,
                max_rows: self.csv_max_rows,
            },
        }
    }

    /// How helpers are started, when messages are read in them.
    pub fn parser_settings(&self) -> Option<HelperSettings> {
        let process = match self.parse_isolation {
            ParseIsolation::Thread => false,
            ParseIsolation::Process => true,
            ParseIsolation::Auto => self.parse_helper.is_some() || crate::helper::serves_helpers(),
        };
        if !process {
            return None;
        }
        let program = match &self.parse_helper {
            Some(path) => path.clone(),
            None => std::env::current_exe().ok()?,
        };
        Some(HelperSettings {
            program,
            limits: self.limits(),
            timeout: std::time::Duration::from_millis(self.parse_timeout_ms),
            memory_bytes: self.parse_memory_mb.saturating_mul(1024 * 1024),
        })
    }

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
        if let Some(path) = &config.clients_file {
            match load_clients_file(path) {
                Ok(entries) => problems.extend(ClientDirectory::problems(
                    &[config.clients.clone(), entries].concat(),
                    &format!("{SECTION}.clients_file"),
                )),
                Err(e) => problems.push(ConfigProblem::new(format!("{SECTION}.clients_file"), e)),
            }
        }
        if let Some(erp) = &config.erp {
            problems.extend(erp.problems(&format!("{SECTION}.erp"), config.outbox.lease_ms));
        }
        if let Some(reply) = &config.reply {
            problems.extend(reply.problems(&format!("{SECTION}.reply"), config.outbox.lease_ms));
        }
        for (key, problem) in config.sender_auth.problems() {
            problems.push(ConfigProblem::new(
                format!("{SECTION}.sender_auth.{key}"),
                problem,
            ));
        }
        if Backend::of(&config.store_url).is_none() {
            problems.push(ConfigProblem::new(
                format!("{SECTION}.store_url"),
                format!(
                    "{:?} is not supported; use sqlite://PATH or postgres://USER@HOST/DB",
                    config.store_url
                ),
            ));
        }
        problems.extend(require_positive(
            SECTION,
            &[
                ("max_message_bytes", config.max_message_bytes as u64),
                ("csv_max_rows", config.csv_max_rows as u64),
                ("csv_max_line_bytes", config.csv_max_line_bytes as u64),
                ("max_rfc822_nesting", config.max_rfc822_nesting as u64),
                ("max_multipart_parts", config.max_multipart_parts as u64),
                ("max_mime_parts", config.max_mime_parts as u64),
                ("max_handling_deaths", u64::from(config.max_handling_deaths)),
                (
                    "xlsx_max_uncompressed_bytes",
                    config.xlsx_max_uncompressed_bytes,
                ),
                ("zip_max_ratio", config.zip_max_ratio),
                ("sheet_max_cells", config.sheet_max_cells),
                ("outbox.lease_ms", config.outbox.lease_ms),
                ("parse_timeout_ms", config.parse_timeout_ms),
            ],
        ));
        // The helper itself (the binary, its libraries) needs some room before any mail.
        if config.parse_memory_mb < 64 {
            problems.push(ConfigProblem::new(
                format!("{SECTION}.parse_memory_mb"),
                format!(
                    "{} MiB is too little for a helper; at least 64",
                    config.parse_memory_mb
                ),
            ));
        }
        if let Some(path) = &config.parse_helper {
            if !path.is_file() {
                problems.push(ConfigProblem::new(
                    format!("{SECTION}.parse_helper"),
                    format!("{} is not a file", path.display()),
                ));
            }
        }
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
            let effects = Effects {
                erp: cfg.erp.is_some(),
                reply: cfg.reply.as_ref().map(|r| r.answer).unwrap_or_default(),
            };
            let store = OrderStore::open(&cfg.store_url)
                .await
                .map_err(|e| ModuleError::Init {
                    module: self.name().to_owned(),
                    message: e.to_string(),
                })?
                .with_effects(effects);
            let mut clients = cfg.clients.clone();
            if let Some(path) = &cfg.clients_file {
                clients.extend(
                    load_clients_file(path).map_err(|message| ModuleError::Config {
                        module: self.name().to_owned(),
                        message,
                    })?,
                );
            }
            if cfg.clients_from_store {
                let from_store = store.clients().await.map_err(|e| ModuleError::Init {
                    module: self.name().to_owned(),
                    message: format!("reading the clients table: {e}"),
                })?;
                clients.extend(from_store);
            }
            let problems = ClientDirectory::problems(&clients, &format!("{SECTION}.clients"));
            if !problems.is_empty() {
                return Err(ModuleError::Config {
                    module: self.name().to_owned(),
                    message: problems
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; "),
                });
            }
            let handler = OrderHandler::new(store.clone(), &cfg, &clients);
            // A helper program that is not one is refused at start, not at the first mail.
            if let Some(pool) = &handler.parser {
                pool.check().await.map_err(|e| ModuleError::Config {
                    module: self.name().to_owned(),
                    message: format!("{SECTION}.parse_helper: {e}"),
                })?;
            }
            registry.handler(&cfg.pool, &cfg.task_kind, Arc::new(handler));
            // Without its database the handler can do nothing: while the store is not
            // ready the pool waits, and outages dead-letter no mail.
            let store_health = Arc::new(StoreHealth(store.clone()));
            registry.health(store_health.clone());
            registry.needs(&cfg.pool, store_health.clone());
            let lease = std::time::Duration::from_millis(cfg.outbox.lease_ms);
            // Each effect is the queue of a pool of its own, so it is retried,
            // dead-lettered and replayed like any task, and a party that is away holds back
            // only its own effect.
            let dispatch = |registry: &mut dyn ModuleRegistry, scope: Scope, defaults| {
                registry.pool_with(scope.pool(), defaults);
                registry.queue(
                    scope.pool(),
                    Arc::new(OutboxQueue::new(store.clone(), lease, scope)),
                );
                registry.source(Arc::new(OutboxSource::new(scope)), scope.pool());
                registry.needs(scope.pool(), store_health.clone());
            };
            if let Some(erp) = &cfg.erp {
                dispatch(&mut *registry, Scope::Erp, outbox::pool_defaults());
                let handler =
                    ErpHandler::new(store.clone(), erp).map_err(|message| ModuleError::Config {
                        module: self.name().to_owned(),
                        message,
                    })?;
                let health = handler.health();
                registry.handler(outbox::POOL, outbox::ERP_KIND, Arc::new(handler));
                registry.health(health.clone());
                registry.needs(outbox::POOL, health);
            }
            if let Some(reply) = cfg.reply.as_ref().filter(|_| effects.reply.any()) {
                dispatch(
                    &mut *registry,
                    Scope::Replies,
                    outbox::reply_pool_defaults(),
                );
                let handler = ReplyHandler::new(store.clone(), reply).map_err(|message| {
                    ModuleError::Config {
                        module: self.name().to_owned(),
                        message,
                    }
                })?;
                let health = handler.health();
                registry.handler(outbox::REPLY_POOL, outbox::REPLY_KIND, Arc::new(handler));
                registry.health(health.clone());
                registry.needs(outbox::REPLY_POOL, health);
            }
            registry.outcome_lookup(Arc::new(store.clone()));
            registry.retention(Arc::new(store.clone()));
            registry.console(Arc::new(crate::pages::BotPages::new(store.clone())));
            registry.actions(Arc::new(crate::domain::replay::ReplayActions::new(
                store.clone(),
                cfg.pool.clone(),
            )));
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
    limits: MailLimits,
    sender_auth: Arc<Checker>,
    /// `sender_auth.mode = "verify"`: the bot's own DKIM and DMARC check.
    verifier: Option<Arc<crate::dkim::Verifier>>,
    max_handling_deaths: i64,
    /// Helper processes that read the messages; `None`: a blocking thread does.
    parser: Option<Arc<ParserPool>>,
    /// Tasks whose reading ended since the last batch began (cleared with the next one).
    handled: Arc<std::sync::Mutex<Vec<String>>>,
}

impl OrderHandler {
    /// A handler writing to `store`, with the limits of `cfg`, resolving `clients`.
    pub fn new(store: OrderStore, cfg: &BotConfig, clients: &[ClientEntry]) -> Self {
        Self {
            store,
            clients: Arc::new(ClientDirectory::new(clients)),
            limits: cfg.limits(),
            sender_auth: Arc::new(cfg.sender_auth.checker()),
            verifier: (cfg.sender_auth.checker() == Checker::Verify)
                .then(|| Arc::new(crate::dkim::Verifier::new(cfg.sender_auth.resolver_addr()))),
            max_handling_deaths: i64::from(cfg.max_handling_deaths),
            parser: cfg
                .parser_settings()
                .map(|settings| Arc::new(ParserPool::new(settings))),
            handled: Arc::default(),
        }
    }

    async fn load(&self, task: &Task, ctx: &HandlerContext) -> Result<Loaded, HandlerError> {
        Self::loaded(ctx.load_content(task).await)
    }

    /// What a source's answer for one task means for the bot.
    fn loaded(answer: Result<Option<Vec<u8>>, SourceError>) -> Result<Loaded, HandlerError> {
        match answer {
            Ok(Some(content)) => Ok(Loaded::Mail(content)),
            Ok(None) => Ok(Loaded::Gone(GoneReason::Deleted)),
            Err(SourceError::Gone { reason, .. }) => Ok(Loaded::Gone(reason)),
            // The source refused to read it whole: a recorded outcome, never a retry.
            Err(SourceError::TooLarge { size, limit, .. }) => Ok(Loaded::TooLarge(format!(
                "max_message_bytes: the message has {size} bytes, above the source's limit of {limit}"
            ))),
            Err(e @ SourceError::InvalidPointer { .. }) => {
                Err(HandlerError::Permanent(e.to_string()))
            }
            Err(e) => Err(HandlerError::retry(format!("reading the message: {e}"))),
        }
    }

    /// Where a reply to the message goes, if it may be answered: to its From address (the
    /// one resolved as the client; a Reply-To elsewhere would let anyone make the bot mail
    /// a third party), threaded under its Message-ID.
    fn reply_to(facts: &MailFacts) -> Option<ReplyTo> {
        if facts.no_reply.is_some() {
            return None;
        }
        let mut references = facts.references.clone();
        if let Some(id) = &facts.message_id {
            if !references.contains(id) {
                references.push(id.clone());
            }
        }
        Some(ReplyTo {
            to: facts.sender.clone()?,
            in_reply_to: facts.message_id.clone(),
            references,
        })
    }

    /// Decides the outcome of a read message: a limit hit, then an automatic message, then
    /// the client, then the lines of the parts that client's options read.
    pub fn decide(&self, facts: &MailFacts, task_id: &str) -> Recording {
        let mut rec = Recording {
            identity: facts.identity.clone(),
            content_sha256: facts.content_sha256.clone(),
            fingerprint: facts.fingerprint.clone(),
            sender: facts.sender.clone(),
            subject: facts.subject.clone(),
            task_id: task_id.to_owned(),
            outcome: OutcomeKind::Created,
            reason: None,
            order: None,
            reply: Self::reply_to(facts),
            task: None,
        };
        let mut outcome = |kind: OutcomeKind, reason: String| {
            rec.outcome = kind;
            rec.reason = Some(clip(&reason, MAX_STORED_REASON).into_owned());
        };
        if let Some(limit) = &facts.rejected {
            outcome(OutcomeKind::Rejected, limit.clone());
            return rec;
        }
        if let Some(why) = &facts.auto_reply {
            outcome(OutcomeKind::AutoReply, why.clone());
            return rec;
        }
        let Some(sender) = facts.sender.as_deref() else {
            outcome(
                OutcomeKind::UnknownClient,
                "the message has no usable From address".into(),
            );
            return rec;
        };
        let client = self.clients.resolve(sender);
        // Forged mail never makes an order and is never answered (an answer would go to the
        // address it forged); a client whose senders cannot sign may be let through.
        if let Err(why) =
            self.sender_auth
                .check_with(sender, &facts.auth_results, facts.verified.as_ref())
        {
            if !client.is_some_and(|c| c.allow_unauthenticated) {
                rec.reply = None;
                outcome(
                    OutcomeKind::UnauthenticatedSender,
                    format!("sender {sender} not authenticated: {why}"),
                );
                return rec;
            }
        }
        let Some(client) = client else {
            outcome(
                OutcomeKind::UnknownClient,
                format!("no client for sender {sender}"),
            );
            return rec;
        };
        let extraction = facts.extraction(|kind| client.reads(kind));
        let invalid = (!extraction.invalid.is_empty()).then(|| invalid_reason(&extraction.invalid));
        if extraction.lines.is_empty() {
            match (&facts.unsupported, invalid) {
                (Some(what), _) => outcome(
                    OutcomeKind::UnsupportedContent,
                    format!("{what}; no order lines in readable parts"),
                ),
                (None, invalid) => outcome(
                    OutcomeKind::NoLines,
                    invalid.unwrap_or_else(|| "no order lines found".into()),
                ),
            }
            return rec;
        }
        rec.reason = invalid;
        rec.order = Some(NewOrder {
            client_id: client.id.clone(),
            client_name: client.name.clone(),
            lines: extraction.lines,
        });
        rec
    }

    /// What a task that needs no parsing comes to; `Err` gives back the bytes to parse.
    fn unparsed(task: &Task, loaded: Loaded) -> Result<Prepared, Vec<u8>> {
        match loaded {
            Loaded::Mail(raw) => Err(raw),
            // Nothing was read, so the task names the message.
            Loaded::Gone(why) => Ok(unread_task(task, OutcomeKind::Skipped, why.to_string())),
            Loaded::TooLarge(reason) => Ok(unread_task(task, OutcomeKind::Rejected, reason)),
        }
    }

    /// Reads and decides messages, one after another: in helper processes (see
    /// [`crate::helper`]: a message too slow or too big to read is `rejected`, its helper
    /// killed or dead), or with `parse_isolation = "thread"` on one blocking thread (never
    /// on the async worker threads; the workers of a pool parse their batches side by
    /// side). The reading checks the size and the nesting before the parser sees the bytes
    /// and records a parser panic as `rejected`; a panic that still escapes fails that
    /// message alone, for good: it is dead-lettered at once and recorded as `failed`,
    /// still unread.
    async fn parse(
        &self,
        tasks: Vec<(Arc<Task>, Vec<u8>)>,
        ctx: &HandlerContext,
    ) -> Vec<Result<Prepared, HandlerError>> {
        let n = tasks.len();
        let limits = self.limits;
        let this = self.clone();
        let ctx = ctx.clone();
        // Reading these begins (and that of the last batch's ended): a message that stopped
        // the process while it was read is known when it comes again. A store that cannot
        // note it does not stop the reading (recording would fail the same way).
        let ids: Vec<String> = tasks.iter().map(|(t, _)| t.id.to_string()).collect();
        let finished = std::mem::take(&mut *self.handled.lock().unwrap_or_else(|e| e.into_inner()));
        let deaths = match self.store.handling(&ids, &finished).await {
            Ok(deaths) => deaths,
            Err(e) => {
                tracing::warn!(error = %e, "could not note the messages being read");
                HashMap::new()
            }
        };
        let max_deaths = self.max_handling_deaths;
        // mode = "verify": the signatures are checked first (DNS lookups, side by side); a
        // lookup that failed for now makes the message a retry, never a verdict.
        let verdicts: Vec<Option<Verdict>> = match &self.verifier {
            Some(verifier) => {
                futures::future::join_all(tasks.iter().map(|(_, raw)| verifier.verify(raw)))
                    .await
                    .into_iter()
                    .map(Some)
                    .collect()
            }
            None => vec![None; n],
        };
        if let Some(pool) = self.parser.clone() {
            // In helper processes, one message after another (a pool's workers read their
            // batches side by side, each in its own helper).
            let mut out = Vec::with_capacity(n);
            for ((task, raw), verified) in tasks.into_iter().zip(verdicts) {
                let died = deaths.get(task.id.as_str()).copied().unwrap_or(0);
                if let Some(early) = before_reading(&task, &raw, died, max_deaths, &verified) {
                    out.push(early);
                    continue;
                }
                let _ = fault("mail.in_parse");
                let mut span = SpanGuard::none();
                let read = pool
                    .read(&raw, &mut |stage| {
                        span = SpanGuard::none();
                        span = ctx.task_stage(&task, stage);
                    })
                    .await;
                drop(span);
                let mut facts = match read {
                    Ok(facts) => facts,
                    Err(failure) => match failure.rejection() {
                        Some(reason) => {
                            tracing::warn!(task = %task.id, %reason, "a message could not be read");
                            MailFacts::rejected_unread(&raw, reason)
                        }
                        None => {
                            out.push(Err(match failure {
                                HelperFailure::Panicked(_) => {
                                    HandlerError::Permanent(failure.to_string())
                                }
                                other => HandlerError::retry(other.to_string()),
                            }));
                            continue;
                        }
                    },
                };
                facts.verified = verified;
                drop(raw);
                let span = ctx.task_stage(&task, "decide");
                let mut decided = this.decide(&facts, task.id.as_str());
                decided.task = Some(task_pointer(&task));
                drop(span);
                out.push(Ok(Box::new(decided)));
            }
            self.handled
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(ids);
            return out;
        }
        let parsed = tokio::task::spawn_blocking(move || {
            tasks
                .into_iter()
                .zip(verdicts)
                .map(|((task, raw), verified)| {
                    let died = deaths.get(task.id.as_str()).copied().unwrap_or(0);
                    if let Some(early) = before_reading(&task, &raw, died, max_deaths, &verified) {
                        return early;
                    }
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        let _ = fault("mail.in_parse");
                        let mut span = SpanGuard::none();
                        let mut facts = read_mail_in_stages(&raw, &limits, &mut |stage| {
                            span = SpanGuard::none();
                            span = ctx.task_stage(&task, stage);
                        });
                        facts.verified = verified.clone();
                        drop(raw);
                        span = ctx.task_stage(&task, "decide");
                        let mut decided = this.decide(&facts, task.id.as_str());
                        decided.task = Some(task_pointer(&task));
                        drop(span);
                        Box::new(decided)
                    }))
                    .map_err(|panic| {
                        HandlerError::Permanent(format!(
                            "the mail parser failed: {}",
                            crate::domain::message::panic_text(&*panic)
                        ))
                    })
                })
                .collect::<Vec<_>>()
        })
        .await;
        self.handled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(ids);
        parsed.unwrap_or_else(|e| {
            (0..n)
                .map(|_| {
                    Err(HandlerError::Permanent(format!(
                        "the mail parser failed: {e}"
                    )))
                })
                .collect()
        })
    }

    async fn handle_task(
        &self,
        task: &Task,
        ctx: &HandlerContext,
    ) -> Result<Outcome, HandlerError> {
        let fetching = ctx.stage("fetch");
        let loaded = self.load(task, ctx).await;
        drop(fetching);
        fault("mail.after_fetch")?;
        let prepared = match Self::unparsed(task, loaded?) {
            Ok(prepared) => prepared,
            Err(raw) => {
                let parsed = self.parse(vec![(Arc::new(task.clone()), raw)], ctx).await;
                parsed
                    .into_iter()
                    .next()
                    .unwrap_or_else(|| Err(HandlerError::retry("not parsed")))?
            }
        };
        fault("mail.after_parse")?;
        let rec = prepared;
        let committing = ctx.stage("store commit");
        let recorded = match replayed(task) {
            Some(kind) => self.store.record_replay(&rec, kind).await,
            None => self.store.record(&rec).await,
        };
        drop(committing);
        let recorded = recorded.map_err(recording_failed)?;
        fault("mail.after_commit")?;
        Ok(outcome_of(&rec, &recorded))
    }

    /// A batch: one load from the source (IMAP: one `UID FETCH` of a UID set), the
    /// messages parsed on one blocking thread, one transaction for all their outcomes.
    /// Each message keeps its own result: one that cannot be read, parsed or recorded
    /// fails alone.
    async fn handle_tasks(
        &self,
        tasks: &[Arc<Task>],
        ctx: &HandlerContext,
    ) -> Vec<Result<Outcome, HandlerError>> {
        let fetching = ctx.batch_stage(tasks, "fetch");
        let answers = ctx.load_batch(tasks).await;
        drop(fetching);
        if let Err(e) = fault("mail.after_fetch") {
            return tasks.iter().map(|_| Err(e.clone())).collect();
        }
        let mut prepared: Vec<Option<Result<Prepared, HandlerError>>> =
            (0..tasks.len()).map(|_| None).collect();
        let mut to_parse = Vec::new();
        let mut parsed_at = Vec::new();
        for (i, (task, answer)) in tasks.iter().zip(answers).enumerate() {
            match Self::loaded(answer) {
                Err(e) => prepared[i] = Some(Err(e)),
                Ok(loaded) => match Self::unparsed(task, loaded) {
                    Ok(done) => prepared[i] = Some(Ok(done)),
                    Err(raw) => {
                        to_parse.push((Arc::clone(task), raw));
                        parsed_at.push(i);
                    }
                },
            }
        }
        for (i, result) in parsed_at.into_iter().zip(self.parse(to_parse, ctx).await) {
            prepared[i] = Some(result);
        }
        let prepared: Vec<Result<Prepared, HandlerError>> = prepared
            .into_iter()
            .map(|p| p.unwrap_or_else(|| Err(HandlerError::retry("not prepared"))))
            .collect();
        if let Err(e) = fault("mail.after_parse") {
            return tasks.iter().map(|_| Err(e.clone())).collect();
        }
        let recs: Vec<&Recording> = prepared.iter().filter_map(|p| p.as_deref().ok()).collect();
        let committing = ctx.batch_stage(tasks, "store commit");
        let mut recorded = self.store.record_batch(&recs).await.into_iter();
        drop(committing);
        if let Err(e) = fault("mail.after_commit") {
            return tasks.iter().map(|_| Err(e.clone())).collect();
        }
        prepared
            .into_iter()
            .map(|p| {
                let rec = p?;
                match recorded.next() {
                    Some(Ok(recorded)) => Ok(outcome_of(&rec, &recorded)),
                    Some(Err(e)) => Err(recording_failed(e)),
                    None => Err(HandlerError::retry("the store answered too few results")),
                }
            })
            .collect()
    }
}

/// The header of a task an operator published to run a message again
/// (`outcomes replay`): the outcome kind it replays.
pub const REPLAY_HEADER: &str = "plba-replay";

/// The outcome kind `task` replays, if it is a replay.
/// The reason that names a message's invalid lines: the first [`MAX_NAMED_INVALID`], each
/// cut short, then how many more there were; never longer than [`MAX_STORED_REASON`].
fn invalid_reason(invalid: &[String]) -> String {
    let named: Vec<_> = invalid
        .iter()
        .take(MAX_NAMED_INVALID)
        .map(|line| clip(line, 160))
        .collect();
    let mut reason = format!("invalid lines: {}", named.join("; "));
    if invalid.len() > named.len() {
        reason.push_str(&format!("; and {} more", invalid.len() - named.len()));
    }
    clip(&reason, MAX_STORED_REASON).into_owned()
}

fn replayed(task: &Task) -> Option<OutcomeKind> {
    let kind = task.headers.get(REPLAY_HEADER)?;
    crate::domain::replay::REPLAYABLE
        .iter()
        .copied()
        .find(|k| k.as_str() == kind)
}

/// What the store keeps of the task that carried a message, to run it again and to join
/// what follows from it to its flow: its source, kind, pointer, id and correlation id.
fn task_pointer(task: &Task) -> String {
    serde_json::json!({
        "source": &*task.source,
        "kind": &*task.kind,
        "payload": task.payload,
        "id": task.id.as_str(),
        "correlation_id": &*task.correlation_id,
    })
    .to_string()
}

/// A named fault point of the fault suite (`failpoints` feature; nothing without it).
/// Its actions are the `fail` crate's (`panic`, `sleep(ms)`, `pause`, ...), and `return`
/// fails the message like an error the runtime retries, `return(abort)` aborts the process
/// at this step, as `kill -9` would.
/// The outcome of a message whose reading stopped the process `died` times: rejected
/// unread (its identity is the hash of its bytes, so a resent copy is its duplicate).
/// What a message comes to before it is read, if it does not get that far: rejected unread
/// after it stopped the process `max_deaths` times, or a retry while its senders' keys cannot
/// be looked up.
fn before_reading(
    task: &Task,
    raw: &[u8],
    died: i64,
    max_deaths: i64,
    verified: &Option<Verdict>,
) -> Option<Result<Prepared, HandlerError>> {
    if died >= max_deaths {
        tracing::error!(task = %task.id, deaths = died, "a message stopped the process while it was read; rejected unread");
        let reason = format!(
            "max_handling_deaths: the process stopped {died} times while reading this message; it is not read again"
        );
        return Some(Ok(Box::new(unread(task, raw, reason))));
    }
    if let Some(Verdict::Unavailable(why)) = verified {
        return Some(Err(HandlerError::retry(format!(
            "sender_auth verify: {why}"
        ))));
    }
    None
}

/// A message rejected without being read, for `reason`: named by its bytes' hash.
fn unread(task: &Task, raw: &[u8], reason: String) -> Recording {
    let hash = sha256_hex(raw);
    Recording {
        identity: format!("sha256:{hash}"),
        fingerprint: hash.clone(),
        content_sha256: hash,
        sender: None,
        subject: None,
        task_id: task.id.to_string(),
        outcome: OutcomeKind::Rejected,
        reason: Some(reason),
        order: None,
        reply: None,
        task: Some(task_pointer(task)),
    }
}

pub(crate) fn fault(name: &str) -> Result<(), HandlerError> {
    let _ = name;
    fail::fail_point!(name, |arg| {
        if arg.as_deref() == Some("abort") {
            std::process::abort();
        }
        Err(HandlerError::retry(format!("fault point {name}")))
    });
    Ok(())
}

fn recording_failed(e: crate::domain::store::StoreError) -> HandlerError {
    HandlerError::retry(format!("recording the outcome: {e}"))
}

/// A message read and decided (or known unread), before its outcome is recorded.
type Prepared = Box<Recording>;

/// What loading a task's message gave.
enum Loaded {
    Mail(Vec<u8>),
    Gone(GoneReason),
    TooLarge(String),
}

/// The outcome of a task whose message was never read (gone, or too large to read): the
/// task names it, as `task:ID`.
fn unread_task(task: &Task, outcome: OutcomeKind, reason: String) -> Prepared {
    let identity = format!("task:{}", task.id);
    Box::new(Recording {
        fingerprint: identity.clone(),
        content_sha256: String::new(),
        identity,
        sender: None,
        subject: None,
        task_id: task.id.to_string(),
        outcome,
        reason: Some(reason),
        order: None,
        reply: None,
        task: None,
    })
}

/// What the runtime reports for a recorded message.
pub fn outcome_of(rec: &Recording, recorded: &Recorded) -> Outcome {
    match recorded {
        Recorded::New { order_id: Some(id) } => {
            Outcome::new(OutcomeKind::Created.as_str()).with_detail(format!("order {id}"))
        }
        Recorded::New { order_id: None } => {
            Outcome::new(rec.outcome.as_str()).with_detail(rec.reason.clone().unwrap_or_default())
        }
        Recorded::Conflict {
            identity, earlier, ..
        } => Outcome::new(OutcomeKind::ConflictingDuplicate.as_str()).with_detail(format!(
            "{} was first recorded as {earlier} for different content; kept for an operator as {identity}",
            rec.identity
        )),
        Recorded::Duplicate { earlier, order_id } => {
            Outcome::new(OutcomeKind::Duplicate.as_str()).with_detail(match order_id {
                Some(id) => format!("{} already {earlier} as order {id}", rec.identity),
                None => format!("{} already recorded as {earlier}", rec.identity),
            })
        }
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

    fn handle_batch<'a>(
        &'a self,
        tasks: &'a [Arc<Task>],
        ctx: &'a HandlerContext,
    ) -> BoxFuture<'a, Vec<Result<Outcome, HandlerError>>> {
        Box::pin(async move {
            if tasks.iter().any(|t| replayed(t).is_some()) {
                // An operator's replay (rare): each message on its own.
                let mut out = Vec::with_capacity(tasks.len());
                for task in tasks {
                    out.push(self.handle_task(task, ctx).await);
                }
                return out;
            }
            self.handle_tasks(tasks, ctx).await
        })
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

/// Longest a readiness probe waits for the order store.
const STORE_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(1_000);

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
            // A database that does not answer must not hold the probe up: a new connection
            // to a server that is down can wait for the pool's whole acquire timeout.
            match tokio::time::timeout(STORE_PROBE_TIMEOUT, self.0.ping()).await {
                Ok(Ok(())) => HealthStatus::Up,
                Ok(Err(e)) => HealthStatus::Down {
                    reason: e.to_string(),
                },
                Err(_) => HealthStatus::Down {
                    reason: format!(
                        "the order store did not answer within {} ms",
                        STORE_PROBE_TIMEOUT.as_millis()
                    ),
                },
            }
        })
    }
}

/// The bot's module with every handler it registers wrapped by `wrap`: for tests,
/// benchmarks and deployments that put behaviour around the bot's handler (an injected
/// fault, a simulated slow service, a measurement) without touching the bot.
///
/// ```
/// use std::sync::Arc;
/// use mail_order_bot::module::WrappedModule;
/// use runtime_contracts::{ApplicationModule, TaskHandler};
/// let module = WrappedModule::new("plain-bot", |h: Arc<dyn TaskHandler>| h);
/// assert_eq!(module.name(), "plain-bot");
/// assert_eq!(module.config_section(), "apps.mail_order_bot");
/// ```
pub struct WrappedModule<W> {
    name: &'static str,
    wrap: W,
}

impl<W> std::fmt::Debug for WrappedModule<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WrappedModule")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<W> WrappedModule<W>
where
    W: Fn(Arc<dyn TaskHandler>) -> Arc<dyn TaskHandler> + Clone + Send + Sync,
{
    /// The bot, named `name`, each handler wrapped by `wrap`.
    pub fn new(name: &'static str, wrap: W) -> Self {
        Self { name, wrap }
    }
}

impl<W> ApplicationModule for WrappedModule<W>
where
    W: Fn(Arc<dyn TaskHandler>) -> Arc<dyn TaskHandler> + Clone + Send + Sync,
{
    fn name(&self) -> &str {
        self.name
    }
    fn config_section(&self) -> &str {
        MailOrderModule.config_section()
    }
    fn validate_config(&self, section: Option<&serde_json::Value>) -> Vec<ConfigProblem> {
        MailOrderModule.validate_config(section)
    }
    fn register<'a>(
        &'a self,
        registry: &'a mut dyn ModuleRegistry,
        config: &'a dyn ConfigProvider,
    ) -> BoxFuture<'a, Result<(), ModuleError>> {
        Box::pin(async move {
            let mut wrapping = Wrapping(registry, self.wrap.clone());
            MailOrderModule.register(&mut wrapping, config).await
        })
    }
}

/// Registers what the bot registers, with its handlers wrapped by `.1`.
struct Wrapping<'r, W: Fn(Arc<dyn TaskHandler>) -> Arc<dyn TaskHandler>>(
    &'r mut dyn ModuleRegistry,
    W,
);

impl<W: Fn(Arc<dyn TaskHandler>) -> Arc<dyn TaskHandler> + Send> ModuleRegistry
    for Wrapping<'_, W>
{
    fn handler(&mut self, pool: &str, kind: &str, handler: Arc<dyn TaskHandler>) {
        // Only the mail handler: the outbox's effects are not the bot's messages.
        if pool == outbox::POOL || pool == outbox::REPLY_POOL {
            self.0.handler(pool, kind, handler);
        } else {
            self.0.handler(pool, kind, (self.1)(handler));
        }
    }
    fn pool(&mut self, name: &str) {
        self.0.pool(name);
    }
    fn pool_with(&mut self, name: &str, defaults: runtime_contracts::PoolDefaults) {
        self.0.pool_with(name, defaults);
    }
    fn retention(&mut self, sweep: Arc<dyn runtime_contracts::RetentionSweep>) {
        self.0.retention(sweep);
    }
    fn queue(&mut self, pool: &str, queue: Arc<dyn runtime_contracts::TaskQueue>) {
        self.0.queue(pool, queue);
    }
    fn source(&mut self, source: Arc<dyn runtime_contracts::TaskSource>, pool: &str) {
        self.0.source(source, pool);
    }
    fn health(&mut self, contributor: Arc<dyn HealthContributor>) {
        self.0.health(contributor);
    }
    fn service(&mut self, service: Arc<dyn std::any::Any + Send + Sync>) {
        self.0.service(service);
    }
    fn outcome_lookup(&mut self, lookup: Arc<dyn runtime_contracts::OutcomeLookup>) {
        self.0.outcome_lookup(lookup);
    }
    fn console(&mut self, pages: Arc<dyn runtime_contracts::ConsolePages>) {
        self.0.console(pages);
    }
    fn actions(&mut self, actions: Arc<dyn runtime_contracts::OperatorActions>) {
        self.0.actions(actions);
    }
    fn needs(&mut self, pool: &str, dependency: Arc<dyn HealthContributor>) {
        self.0.needs(pool, dependency);
    }
}
