//! The command line: `run`, `check-config`, `diagnose`, `config get|set|unset|list`,
//! `orders list`, `outcomes list`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use runtime_core::{ConfigReport, RuntimeManager};

use crate::compose::{
    build_traced_runtime, config_store_config, control_config, load_config, load_layered_config,
    watch_config_store, LayeredError,
};
use crate::domain::store::{OrderStore, OutcomeRow, StoredOrder};
use crate::module::{BotConfig, MailOrderModule, SECTION};
use runtime_adapters::control::ControlServer;

/// Exit code for an invalid configuration.
pub const EXIT_CONFIG: u8 = 2;

/// mail-order-bot: turns purchase-order emails into orders, each exactly once.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the bot until SIGINT or SIGTERM (or, with --once, until the mailbox is drained).
    Run {
        /// TOML configuration file; the embedded config/default.toml when omitted.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Process what is there, then exit once every queue has drained.
        #[arg(long)]
        once: bool,
    },
    /// Validate a configuration and print every problem with its key (and every old key
    /// read under its new name); with --explain, print the documentation of a key instead.
    CheckConfig {
        /// TOML configuration file; the embedded config/default.toml when omitted.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// A dotted key (`pools.orders.max_attempts`, `sources.inbox.poll_interval_ms`):
        /// print what it does and its default, from the README's configuration table.
        #[arg(long, value_name = "KEY")]
        explain: Option<String>,
    },
    /// Ask a running bot (its control plane) for stuck work, poison candidates and
    /// sources without progress, each with what to do. Exits 0 when nothing was found, 4
    /// when something was, 1 when the bot could not be asked.
    Diagnose {
        /// The bot's TOML configuration: its `[control]` gives the address and a read token.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The control plane's base URL (default: from `[control].bind`).
        #[arg(long)]
        url: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// List, replay and purge the dead letters of a running bot's queues (the mail pool's,
    /// and the outbox's: ERP deliveries that were refused), through its control plane.
    DeadLetters {
        /// What to do.
        #[command(subcommand)]
        action: DeadLetterAction,
    },
    /// Read and change the configuration overrides kept in the database that
    /// `[config_store]` names (merged over the file, under the environment).
    Config {
        /// What to do.
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Read the orders in the store.
    Orders {
        /// What to do with them.
        #[command(subcommand)]
        action: ListAction,
    },
    /// Read the recorded outcome of every message, or run the mail of some again.
    Outcomes {
        /// What to do with them.
        #[command(subcommand)]
        action: OutcomeAction,
    },
}

/// `outcomes` subcommands.
#[derive(Debug, Subcommand)]
pub enum OutcomeAction {
    /// List them.
    List {
        /// TOML configuration file; the embedded config/default.toml when omitted.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Run the mail recorded as `unknown_client` or `no_lines` again through a running
    /// bot's handler (after a client was added or a fix), through its control plane: each
    /// message makes its order once and gets the reply now due.
    Replay {
        /// The outcome to replay: `unknown_client` or `no_lines`.
        #[arg(long)]
        kind: String,
        /// Only outcomes recorded on or after this day (YYYY-MM-DD, UTC).
        #[arg(long)]
        since: Option<String>,
        /// Only mail from this address.
        #[arg(long)]
        sender: Option<String>,
        /// At most this many messages, oldest first.
        #[arg(long)]
        limit: Option<u32>,
        /// Say what would be run again; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        plane: Plane,
    },
}

/// How the CLI reaches a running bot's control plane.
#[derive(Debug, clap::Args)]
pub struct Plane {
    /// The bot's TOML configuration: its `[control]` gives the address and a token.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The control plane's base URL (default: from `[control].bind`).
    #[arg(long)]
    url: Option<String>,
}

/// `dead-letters` subcommands.
#[derive(Debug, Subcommand)]
pub enum DeadLetterAction {
    /// List a queue's dead letters with their reasons.
    List {
        /// The queue (its pool's name): `orders`, `outbox`, ...
        #[arg(long, default_value = "orders")]
        queue: String,
        #[command(flatten)]
        plane: Plane,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Put dead letters back on their queue: one by id, or all of them (`--all`).
    Replay {
        /// The queue.
        #[arg(long, default_value = "orders")]
        queue: String,
        /// The dead letter's id.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Every dead letter of the queue.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        plane: Plane,
    },
    /// Delete one dead letter for good.
    Purge {
        /// The queue.
        #[arg(long, default_value = "orders")]
        queue: String,
        /// The dead letter's id.
        id: String,
        #[command(flatten)]
        plane: Plane,
    },
}

/// A read-only listing.
#[derive(Debug, Subcommand)]
pub enum ListAction {
    /// List them.
    List {
        /// TOML configuration file; the embedded config/default.toml when omitted.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
}

/// `config` subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Print the value in force at a dotted key (file, database and environment merged).
    Get {
        /// The dotted key, e.g. `pools.orders.workers`.
        key: String,
        /// TOML configuration file; the embedded config/default.toml when omitted.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Set a key in the database, after validating the whole configuration with it.
    Set {
        /// The dotted key, e.g. `pools.orders.workers`.
        key: String,
        /// A TOML value: `8`, `true`, `"text"`, `["a", "b"]`.
        #[arg(allow_hyphen_values = true)]
        value: String,
        /// TOML configuration file; the embedded config/default.toml when omitted.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Remove a key from the database, after validating the configuration without it.
    Unset {
        /// The dotted key.
        key: String,
        /// TOML configuration file; the embedded config/default.toml when omitted.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// List the keys set in the database.
    List {
        /// TOML configuration file; the embedded config/default.toml when omitted.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned text for people.
    Table,
    /// JSON for programs.
    Json,
}

/// Runs a parsed command line; returns the process exit code.
pub async fn execute(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::CheckConfig {
            explain: Some(key),
            config,
        } => Ok(explain_key(&key, config.as_deref())),
        Command::CheckConfig {
            config,
            explain: None,
        } => match load_config(config.as_deref(), None) {
            Ok(manager) => {
                for warning in manager.warnings() {
                    eprintln!("warning: {warning}");
                }
                println!("configuration is valid");
                Ok(0)
            }
            Err(report) => {
                eprintln!("{report}");
                Ok(EXIT_CONFIG)
            }
        },
        Command::Run { config, once } => run(config, once).await,
        Command::Diagnose {
            config,
            url,
            format,
        } => diagnose(config, url, format).await,
        Command::Config { action } => config_command(action).await,
        Command::DeadLetters { action } => dead_letters(action).await,
        Command::Orders {
            action: ListAction::List { config, format },
        } => {
            let store = open_store(config).await?;
            let orders = store.orders_after(0).await?;
            print_orders(&orders, format)?;
            Ok(0)
        }
        Command::Outcomes {
            action: OutcomeAction::List { config, format },
        } => {
            let store = open_store(config).await?;
            print_outcomes(&store.outcomes().await?, format)?;
            Ok(0)
        }
        Command::Outcomes {
            action:
                OutcomeAction::Replay {
                    kind,
                    since,
                    sender,
                    limit,
                    dry_run,
                    plane,
                },
        } => {
            let (base, token) = match plane_of(&plane, true) {
                Ok(found) => found,
                Err(code) => return Ok(code),
            };
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()?;
            let body = serde_json::json!({
                "kind": kind, "since": since, "sender": sender, "limit": limit, "dry_run": dry_run,
            });
            let answer = call_plane(
                client
                    .post(format!("{base}/actions/outcomes.replay"))
                    .json(&body),
                token.as_deref(),
                &base,
            )
            .await?;
            println!("{}", answer["message"].as_str().unwrap_or_default());
            for item in answer["items"].as_array().into_iter().flatten() {
                println!(
                    "  {}  {}  {}  {}",
                    item["recorded_at"].as_str().unwrap_or(""),
                    item["sender"].as_str().unwrap_or("—"),
                    truncate(item["subject"].as_str().unwrap_or("—"), 60),
                    item["message_identity"].as_str().unwrap_or("")
                );
            }
            Ok(0)
        }
    }
}

fn config_or_exit(
    config: Option<&std::path::Path>,
) -> Result<runtime_core::ConfigurationManager, u8> {
    load_config(config, None).map_err(|report: ConfigReport| {
        eprintln!("{report}");
        EXIT_CONFIG
    })
}

/// Exit code of `diagnose` when it found something.
pub const EXIT_FINDINGS: u8 = 4;

async fn diagnose(
    config: Option<PathBuf>,
    url: Option<String>,
    format: Format,
) -> anyhow::Result<u8> {
    let manager = match config_or_exit(config.as_deref()) {
        Ok(m) => m,
        Err(code) => return Ok(code),
    };
    let cfg = control_config(manager.root().get("control"))
        .map_err(|_| anyhow::anyhow!("invalid [control] section"))?;
    let base = url.unwrap_or_else(|| {
        let bind = cfg
            .bind
            .replace("0.0.0.0", "127.0.0.1")
            .replace("[::]", "[::1]");
        format!("http://{bind}")
    });
    let token = std::env::var("PLBA_CONTROL_TOKEN")
        .ok()
        .or_else(|| cfg.read_tokens.first().cloned())
        .or_else(|| cfg.admin_tokens.first().cloned());
    let mut request = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?
        .get(format!("{}/diagnostics", base.trim_end_matches('/')));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let answer = request
        .send()
        .await
        .with_context(|| format!("asking the bot at {base} (is it running with [control] enabled?)"))?
        .error_for_status()
        .with_context(|| format!("the control plane at {base} refused (a read token: PLBA_CONTROL_TOKEN or [control].read_tokens)"))?;
    let report: runtime_core::Diagnostics =
        answer.json().await.context("reading the diagnostics")?;
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Format::Table => print_diagnostics(&report),
    }
    Ok(if report.findings.is_empty() {
        0
    } else {
        EXIT_FINDINGS
    })
}

/// The control plane's base URL and the token to use (`admin`: an admin token first).
fn plane_of(plane: &Plane, admin: bool) -> Result<(String, Option<String>), u8> {
    let manager = config_or_exit(plane.config.as_deref())?;
    let cfg = control_config(manager.root().get("control")).map_err(|_| EXIT_CONFIG)?;
    let base = plane.url.clone().unwrap_or_else(|| {
        let bind = cfg
            .bind
            .replace("0.0.0.0", "127.0.0.1")
            .replace("[::]", "[::1]");
        format!("http://{bind}")
    });
    let configured = if admin {
        cfg.admin_tokens.first().cloned()
    } else {
        cfg.read_tokens
            .first()
            .cloned()
            .or_else(|| cfg.admin_tokens.first().cloned())
    };
    let token = std::env::var("PLBA_CONTROL_TOKEN").ok().or(configured);
    Ok((base.trim_end_matches('/').to_owned(), token))
}

/// Sends `request` to the control plane at `base` with `token`; its JSON answer, or what
/// the plane said when it refused.
async fn call_plane(
    request: reqwest::RequestBuilder,
    token: Option<&str>,
    base: &str,
) -> anyhow::Result<serde_json::Value> {
    let request = match token {
        Some(t) => request.bearer_auth(t),
        None => request,
    };
    let answer = request.send().await.with_context(|| {
        format!("asking the bot at {base} (is it running with [control] enabled?)")
    })?;
    let status = answer.status();
    let body: serde_json::Value = answer.json().await.unwrap_or_default();
    if !status.is_success() {
        let message = body["error"]["message"].as_str().unwrap_or("");
        anyhow::bail!("the control plane at {base} answered {status}: {message} (an admin token replays and purges: PLBA_CONTROL_TOKEN or [control].admin_tokens)");
    }
    Ok(body)
}

async fn dead_letters(action: DeadLetterAction) -> anyhow::Result<u8> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let (plane, admin) = match &action {
        DeadLetterAction::List { plane, .. } => (plane, false),
        DeadLetterAction::Replay { plane, .. } | DeadLetterAction::Purge { plane, .. } => {
            (plane, true)
        }
    };
    let (base, token) = match plane_of(plane, admin) {
        Ok(found) => found,
        Err(code) => return Ok(code),
    };
    let send =
        |request: reqwest::RequestBuilder| call_plane(request, token.as_deref(), base.as_str());
    match action {
        DeadLetterAction::List { queue, format, .. } => {
            let mut items = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let mut request = client
                    .get(format!("{base}/queues/{queue}/dead-letters"))
                    .query(&[("limit", "200")]);
                if let Some(c) = &cursor {
                    request = request.query(&[("cursor", c)]);
                }
                let page = send(request).await?;
                items.extend(page["items"].as_array().cloned().unwrap_or_default());
                match page["next_cursor"].as_str() {
                    Some(next) => cursor = Some(next.to_owned()),
                    None => break,
                }
            }
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&items)?),
                Format::Table => {
                    if items.is_empty() {
                        println!("no dead letters in {queue}");
                    }
                    for d in &items {
                        println!(
                            "{}  {}  {}",
                            d["id"].as_str().unwrap_or(""),
                            d["task"]["kind"].as_str().unwrap_or(""),
                            truncate(d["reason"].as_str().unwrap_or(""), 160)
                        );
                    }
                }
            }
        }
        DeadLetterAction::Replay { queue, id, all, .. } => {
            let request = match (&id, all) {
                (Some(id), false) => {
                    client.post(format!("{base}/queues/{queue}/dead-letters/{id}/replay"))
                }
                _ => client
                    .post(format!("{base}/queues/{queue}/dead-letters/replay"))
                    .json(&serde_json::json!({})),
            };
            let answer = send(request).await?;
            println!("{}", serde_json::to_string(&answer)?);
        }
        DeadLetterAction::Purge { queue, id, .. } => {
            send(client.delete(format!("{base}/queues/{queue}/dead-letters/{id}"))).await?;
            println!("dead letter {id} of {queue} purged");
        }
    }
    Ok(0)
}

fn print_diagnostics(report: &runtime_core::Diagnostics) {
    if report.findings.is_empty() {
        println!("nothing found: no stuck work, no poison candidate, every source progressing");
    }
    for f in &report.findings {
        let task = f
            .task
            .as_deref()
            .map_or_else(String::new, |t| format!(" task {t}"));
        println!("{} [{}]{task}: {}", f.kind, f.subject, f.detail);
        println!("    what to do: {}", f.action);
    }
    for q in &report.not_inspected {
        println!("queue {q}: its leases cannot be listed (the broker does not show them)");
    }
}

async fn open_store(config: Option<PathBuf>) -> anyhow::Result<OrderStore> {
    let manager = match config_or_exit(config.as_deref()) {
        Ok(m) => m,
        Err(_) => anyhow::bail!("invalid configuration"),
    };
    let root = manager.root();
    let bot = BotConfig::check(runtime_core::config::lookup(&root, SECTION))
        .map_err(|_| anyhow::anyhow!("invalid [{SECTION}] section"))?;
    OrderStore::open(&bot.store_url)
        .await
        .with_context(|| format!("opening the order store {}", bot.store_url))
}

/// `config get|set|unset|list`.
async fn config_command(action: ConfigAction) -> anyhow::Result<u8> {
    if let ConfigAction::Get { key, config } = &action {
        let (manager, _) = match load_layered_config(config.as_deref(), None).await {
            Ok(loaded) => loaded,
            Err(e) => return layered_failure(&e),
        };
        return Ok(match runtime_core::config::lookup(&manager.root(), key) {
            Some(value) => {
                println!("{value}");
                0
            }
            None => {
                eprintln!("{key} is not set");
                1
            }
        });
    }
    let path = match &action {
        ConfigAction::Set { config, .. }
        | ConfigAction::Unset { config, .. }
        | ConfigAction::List { config } => config.clone(),
        ConfigAction::Get { .. } => None,
    };
    let manager = match config_or_exit(path.as_deref()) {
        Ok(m) => m,
        Err(code) => return Ok(code),
    };
    let Some(section) = runtime_core::config::lookup(&manager.root(), "config_store").cloned()
    else {
        eprintln!(
            "no [config_store] in {}: the configuration has no database overrides",
            manager.origin()
        );
        return Ok(EXIT_CONFIG);
    };
    let cfg = config_store_config(&section).map_err(|p| {
        anyhow::anyhow!(
            "invalid [config_store]: {}",
            p.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        )
    })?;
    let store = runtime_adapters::config_store::SqlConfigStore::open(&cfg).await?;
    let mut overrides = store.read().await?;
    match action {
        ConfigAction::List { .. } => {
            for row in store.list().await? {
                println!(
                    "{} = {}    (version {}, config_version {})",
                    row.key, row.value, row.version, row.config_version
                );
            }
            Ok(0)
        }
        ConfigAction::Set { key, value, .. } => {
            overrides.entries.retain(|(k, _)| *k != key);
            overrides.entries.push((key.clone(), value.clone()));
            if let Err(report) = manager.check_with(Some(&overrides)) {
                eprintln!("{report}\nnothing was written");
                return Ok(EXIT_CONFIG);
            }
            store.set(&key, &value).await?;
            println!(
                "{key} = {value} (in {}; running bots reload it)",
                store.name()
            );
            Ok(0)
        }
        ConfigAction::Unset { key, .. } => {
            overrides.entries.retain(|(k, _)| *k != key);
            if let Err(report) = manager.check_with(Some(&overrides)) {
                eprintln!("{report}\nnothing was removed");
                return Ok(EXIT_CONFIG);
            }
            if store.unset(&key).await? {
                println!("{key} removed from {}", store.name());
                Ok(0)
            } else {
                eprintln!("{key} is not set in {}", store.name());
                Ok(1)
            }
        }
        ConfigAction::Get { .. } => Ok(0),
    }
}

/// `check-config --explain KEY`: the key's documentation (for the `type` its section has
/// in the configuration, when that loads); the exit code.
fn explain_key(key: &str, config: Option<&std::path::Path>) -> u8 {
    let loaded = load_config(config, None).ok();
    let root = loaded.as_ref().map(|m| m.root());
    let section: Vec<&str> = key.split('.').collect();
    let table = match section.as_slice() {
        ["sources", id, ..] => Some(format!("sources.{id}")),
        ["queue", ..] => Some("queue".to_owned()),
        _ => None,
    };
    let kind = root.as_deref().zip(table).and_then(|(root, table)| {
        runtime_core::config::lookup(root, &table)
            .and_then(|t| t.get("type"))
            .and_then(|t| t.as_str())
            .map(str::to_owned)
    });
    let changes = loaded
        .as_ref()
        .map_or(runtime_adapters::KEY_CHANGES, |m| m.key_changes());
    match crate::explain::explain(key, kind.as_deref(), changes) {
        Ok(text) => {
            print!("{text}");
            0
        }
        Err(why) => {
            eprintln!("{why}");
            EXIT_CONFIG
        }
    }
}

/// Prints why the layered configuration could not be loaded; the exit code.
fn layered_failure(e: &LayeredError) -> anyhow::Result<u8> {
    match e {
        LayeredError::Config(report) => {
            eprintln!("{report}");
            Ok(EXIT_CONFIG)
        }
        LayeredError::Store(message) => Err(anyhow::anyhow!("{message}")),
    }
}

async fn run(config: Option<PathBuf>, once: bool) -> anyhow::Result<u8> {
    let (manager, config_store) = match load_layered_config(config.as_deref(), None).await {
        Ok((m, store)) => (Arc::new(m), store),
        Err(e) => return layered_failure(&e),
    };
    let platform = manager.platform();
    let (logs, telemetry) = runtime_core::install_subscriber_with(
        &platform.runtime.log,
        platform.runtime.log_format,
        &platform.telemetry,
        "mail-order-bot",
    )?;
    for warning in manager.warnings() {
        tracing::warn!(key = %warning.key, "configuration: {}", warning.message);
    }
    let mut runtime = build_traced_runtime(
        Arc::clone(&manager),
        Arc::new(MailOrderModule),
        logs,
        Arc::new(telemetry),
    )
    .await
    .context("composing the runtime")?;
    let store = runtime
        .services()
        .get::<OrderStore>()
        .context("the bot registered no order store")?;
    let before = store.last_order_id().await?;
    runtime.start()?;
    let runtime = Arc::new(runtime);
    let watcher = config_store.map(|store| watch_config_store(&runtime, store));
    let control = start_control(&manager, &runtime).await?;
    let interrupted = wait(&runtime, once).await?;
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    let report = runtime.shutdown().await;
    if let Some(control) = control {
        control.stop().await;
    }
    // A long run can create many thousands of orders: they are counted in the database and
    // listed only when few (`orders list` shows them all).
    let new_orders = store.order_count_after(before).await?;
    let created = if new_orders <= SUMMARY_MAX_ORDERS {
        store.orders_after(before).await?
    } else {
        Vec::new()
    };
    let summary = RunSummary {
        new_orders,
        listed: &created,
        total: store.order_count_after(0).await?,
    };
    print_run_summary(&runtime, &summary).await;
    if !report.drained_in_time {
        eprintln!(
            "shutdown deadline passed: unfinished tasks went back to their queue and stay unread"
        );
    }
    Ok(if interrupted && once { 130 } else { 0 })
}

async fn start_control(
    manager: &runtime_core::ConfigurationManager,
    runtime: &Arc<RuntimeManager>,
) -> anyhow::Result<Option<ControlServer>> {
    let cfg = control_config(manager.root().get("control")).map_err(|p| {
        anyhow::anyhow!(
            "invalid [control]: {}",
            p.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        )
    })?;
    if !cfg.enabled {
        return Ok(None);
    }
    let server = ControlServer::start(Arc::clone(runtime), &cfg)
        .await
        .with_context(|| format!("starting the control plane on {}", cfg.bind))?;
    eprintln!("control plane listening on http://{}", server.local_addr());
    Ok(Some(server))
}

/// Waits for the end of the run; true when a signal ended it. SIGHUP reloads the
/// configuration and goes on.
async fn wait(runtime: &RuntimeManager, once: bool) -> anyhow::Result<bool> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let drained = async {
        if once {
            runtime.wait_until_idle(Duration::from_millis(50)).await
        } else {
            std::future::pending::<()>().await
        }
    };
    tokio::pin!(drained);
    loop {
        tokio::select! {
            _ = &mut drained => return Ok(false),
            _ = term.recv() => { tracing::info!("SIGTERM received"); return Ok(true) }
            _ = int.recv() => { tracing::info!("SIGINT received"); return Ok(true) }
            _ = hup.recv() => match runtime.reload() {
                Ok(report) => tracing::info!(?report, "SIGHUP: configuration reloaded"),
                Err(report) => tracing::error!(%report, "SIGHUP: configuration rejected; nothing changed"),
            },
        }
    }
}

/// The most new orders the end-of-run summary lists one by one.
const SUMMARY_MAX_ORDERS: u64 = 50;

/// The orders a run created: how many, those listed (all of them when few), and how many
/// the store holds.
struct RunSummary<'a> {
    new_orders: u64,
    listed: &'a [StoredOrder],
    total: u64,
}

async fn print_run_summary(runtime: &RuntimeManager, summary: &RunSummary<'_>) {
    let status = runtime.status().await;
    for pool in &status.pools {
        println!(
            "pool {}: {} processed, {} failed attempts, {} retried, {} dead-lettered",
            pool.name, pool.processed, pool.failed, pool.retried, pool.dead_lettered
        );
    }
    for pool in status.pools.iter().map(|p| p.name.as_str()) {
        let Some(dead) = runtime.queue(pool).and_then(|q| q.dead_letters()) else {
            continue;
        };
        if let Ok(page) = dead.list(None, 100).await {
            for d in page.items {
                println!("dead letter {}: {} (left unread)", d.id, d.reason);
            }
        }
    }
    let (new_orders, total) = (summary.new_orders, summary.total);
    if new_orders == 0 {
        println!("no new orders ({total} in the store)");
    } else if summary.listed.is_empty() {
        println!(
            "created {new_orders} new orders ({total} in the store; `orders list` shows them)"
        );
    } else {
        println!("created {new_orders} new orders ({total} in the store):");
        print_order_table(summary.listed);
    }
}

fn print_orders(orders: &[StoredOrder], format: Format) -> anyhow::Result<()> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(orders)?),
        Format::Table => print_order_table(orders),
    }
    Ok(())
}

fn print_order_table(orders: &[StoredOrder]) {
    println!(
        "{:>5}  {:<8}  {:<24}  {:<32}  LINES",
        "ORDER", "CLIENT", "NAME", "SENDER"
    );
    for o in orders {
        let lines: Vec<String> = o
            .lines
            .iter()
            .map(|l| format!("{} x{}", l.sku, l.quantity))
            .collect();
        println!(
            "{:>5}  {:<8}  {:<24}  {:<32}  {}",
            o.id,
            o.client_id,
            truncate(&o.client_name, 24),
            truncate(&o.sender, 32),
            lines.join(", ")
        );
    }
}

fn print_outcomes(outcomes: &[OutcomeRow], format: Format) -> anyhow::Result<()> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(outcomes)?),
        Format::Table => {
            println!(
                "{:<16}  {:>5}  {:>5}  {:<40}  REASON",
                "OUTCOME", "ORDER", "SEEN", "MESSAGE"
            );
            for o in outcomes {
                println!(
                    "{:<16}  {:>5}  {:>5}  {:<40}  {}",
                    o.outcome,
                    o.order_id.map(|i| i.to_string()).unwrap_or_default(),
                    o.deliveries,
                    truncate(&o.message_identity, 40),
                    o.reason.as_deref().unwrap_or("")
                );
            }
        }
    }
    Ok(())
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}
