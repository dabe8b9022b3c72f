//! The order store: orders, their lines and one outcome per message, in SQLite or
//! PostgreSQL through sqlx (`sqlite://PATH` or `postgres://…`), with the same schema and the
//! same statements on both.
//!
//! Exactly-once is the database's job: `message_outcomes.message_identity` is the primary
//! key and `orders.message_identity` is UNIQUE, and an order is written in the same
//! transaction as its outcome.

use std::collections::HashMap;
use std::sync::Once;
use std::time::Duration;

use serde::Serialize;
use sqlx::any::AnyPoolOptions;
use sqlx::AnyPool;
use sqlx::{Executor, Row};

use super::clients::ClientEntry;
use super::extract::OrderLine;
use super::OutcomeKind;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The URL is not one the store understands.
    #[error("store url {0:?} is not supported (use sqlite://PATH or postgres://…)")]
    Url(String),
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A migration failed.
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database folder could not be created.
    #[error("creating {path}: {source}")]
    Folder {
        /// The folder.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// An order to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewOrder {
    /// Client id.
    pub client_id: String,
    /// Client name.
    pub client_name: String,
    /// The lines, in order.
    pub lines: Vec<OrderLine>,
}

/// One message's outcome to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recording {
    /// Message identity.
    pub identity: String,
    /// Hash of the raw bytes.
    pub content_sha256: String,
    /// Hash of what the message says (see `MailFacts::fingerprint`).
    pub fingerprint: String,
    /// Sender address.
    pub sender: Option<String>,
    /// Subject.
    pub subject: Option<String>,
    /// The runtime task that carried it.
    pub task_id: String,
    /// The outcome.
    pub outcome: OutcomeKind,
    /// Why, for outcomes other than `created`.
    pub reason: Option<String>,
    /// The order, for `created`.
    pub order: Option<NewOrder>,
    /// Where a reply to this message goes and what it answers, when the message may be
    /// answered at all (not a list, bulk or automatic mail; see `MailFacts::reply`). The
    /// store writes a reply effect when its effects answer this outcome.
    pub reply: Option<ReplyTo>,
    /// The task that carried the message (source, kind and pointer, as JSON), kept with
    /// the outcome so that an operator can run the mail again (`outcomes replay`).
    pub task: Option<String>,
}

/// An outcome whose message can be run again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayCandidate {
    /// Message identity.
    pub message_identity: String,
    /// Sender.
    pub sender: Option<String>,
    /// Subject.
    pub subject: Option<String>,
    /// When the outcome was recorded.
    pub recorded_at: String,
    /// The task that carried it (JSON: source, kind, pointer).
    pub task: String,
}

/// Where a reply goes and what it answers (RFC 3834 §3.1.3, RFC 5322 §3.6.4).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplyTo {
    /// The address the reply goes to (the message's From address).
    pub to: String,
    /// The message's `Message-ID`, with its angle brackets.
    #[serde(default)]
    pub in_reply_to: Option<String>,
    /// The message's `References` (its last few), then its `Message-ID`.
    #[serde(default)]
    pub references: Vec<String>,
}

/// What `record` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// The outcome (and its order) were written.
    New {
        /// The new order's id, for `created`.
        order_id: Option<i64>,
    },
    /// An outcome already existed for this identity with different content: the message
    /// was recorded as `conflicting_duplicate` under `identity`.
    Conflict {
        /// The identity the conflicting message was recorded under.
        identity: String,
        /// The earlier outcome of the Message-ID.
        earlier: String,
        /// The earlier order, if one was created.
        order_id: Option<i64>,
    },
    /// An outcome already existed for this identity; nothing new was written.
    Duplicate {
        /// The earlier outcome.
        earlier: String,
        /// The earlier order, if one was created.
        order_id: Option<i64>,
    },
}

/// An order as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StoredOrder {
    /// Order id.
    pub id: i64,
    /// Message identity.
    pub message_identity: String,
    /// Client id.
    pub client_id: String,
    /// Client name.
    pub client_name: String,
    /// Sender address.
    pub sender: String,
    /// Subject.
    pub subject: Option<String>,
    /// When, UTC.
    pub created_at: String,
    /// Lines.
    pub lines: Vec<OrderLine>,
}

/// What a reply is about (see [`OrderStore::reply_facts`]).
#[derive(Clone, Debug)]
pub struct ReplyFacts {
    /// `reply:<outcome>`: the outcome the reply answers.
    pub effect: String,
    /// The message's identity.
    pub message_identity: String,
    /// Where it goes, and what it answers.
    pub to: ReplyTo,
    /// The message's outcome now (a replay may have changed it since the row was written).
    pub outcome: String,
    /// Why, for outcomes other than `created`.
    pub reason: Option<String>,
    /// The message's subject.
    pub subject: Option<String>,
    /// Its order, for `created`.
    pub order: Option<StoredOrder>,
    /// When the reply was handed to the relay, if it was (a dispatcher that died before
    /// marking the row done).
    pub sent_ms: Option<i64>,
}

/// The columns of an [`OutcomeRow`]: an outcome with its order's client, sender and subject.
const OUTCOME_ROW: &str =
    "SELECT m.message_identity, m.outcome, m.reason, m.order_id, o.client_name,
        COALESCE(m.sender, o.sender) AS sender, COALESCE(m.subject, o.subject) AS subject,
        m.deliveries, m.recorded_at
     FROM message_outcomes m LEFT JOIN orders o ON o.id = m.order_id";

fn outcome_row(r: &sqlx::any::AnyRow) -> Result<OutcomeRow, sqlx::Error> {
    Ok(OutcomeRow {
        message_identity: r.try_get("message_identity")?,
        outcome: r.try_get("outcome")?,
        reason: r.try_get("reason")?,
        order_id: r.try_get("order_id")?,
        client_name: r.try_get("client_name")?,
        sender: r.try_get("sender")?,
        subject: r.try_get("subject")?,
        deliveries: r.try_get("deliveries")?,
        recorded_at: r.try_get("recorded_at")?,
    })
}

/// Which outcomes or orders an operator asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordFilter {
    /// Only this outcome.
    pub outcome: Option<String>,
    /// Only clients whose id or name contains this (any case).
    pub client: Option<String>,
    /// From this day on, `YYYY-MM-DD` (UTC).
    pub from: Option<String>,
    /// Up to this day included, `YYYY-MM-DD` (UTC).
    pub to: Option<String>,
    /// At most this many rows.
    pub limit: i64,
}

impl RecordFilter {
    /// The `LIKE` pattern of the client filter (escaped with `\\`), its own `%` and `_`
    /// taken literally.
    fn client_pattern(&self) -> Option<String> {
        self.client.as_deref().map(|c| {
            let mut pattern = String::from("%");
            for ch in c.to_lowercase().chars() {
                if matches!(ch, '%' | '_' | '\\') {
                    pattern.push('\\');
                }
                pattern.push(ch);
            }
            pattern.push('%');
            pattern
        })
    }
}

/// An outcome with the client of its order, for operators.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OutcomeRow {
    /// Message identity.
    pub message_identity: String,
    /// Outcome name.
    pub outcome: String,
    /// Reason.
    pub reason: Option<String>,
    /// Order id, for `created`.
    pub order_id: Option<i64>,
    /// The order's client name.
    pub client_name: Option<String>,
    /// Sender.
    pub sender: Option<String>,
    /// Subject.
    pub subject: Option<String>,
    /// Deliveries of this message seen.
    pub deliveries: i64,
    /// When first recorded, UTC.
    pub recorded_at: String,
}

/// The database behind the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// SQLite (the embedded default).
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

impl Backend {
    /// The backend of a store URL.
    pub fn of(url: &str) -> Option<Self> {
        if url.starts_with("sqlite:") {
            Some(Self::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Self::Postgres)
        } else {
            None
        }
    }

    /// The current time in milliseconds since the Unix epoch, in SQL (the database's clock,
    /// which every replica shares).
    pub(crate) fn now_ms(self) -> &'static str {
        match self {
            Self::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
            Self::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        }
    }

    /// The current time as an ISO 8601 UTC string with milliseconds, in SQL.
    fn now(self) -> &'static str {
        match self {
            Self::Sqlite => "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
            Self::Postgres => {
                r#"to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')"#
            }
        }
    }
}

/// How an outcome row is claimed when its identity has one already: only a `failed` one is
/// replaced (the message was retried after its fault was fixed).
const CLAIM_FAILED: &str = "outcome = excluded.outcome, reason = excluded.reason,
     content_sha256 = excluded.content_sha256,
     content_fingerprint = excluded.content_fingerprint, task_id = excluded.task_id,
     task = COALESCE(excluded.task, message_outcomes.task),
     deliveries = message_outcomes.deliveries + 1, updated_at = excluded.updated_at
     WHERE message_outcomes.outcome = 'failed'";

/// [`CLAIM_FAILED`] for a replay of an outcome of one kind: that kind is replaced too (the
/// message is decided again; its order, if any now, is written once by its unique key).
fn claim_replayed(kind: OutcomeKind) -> String {
    CLAIM_FAILED.replace(
        "WHERE message_outcomes.outcome = 'failed'",
        &format!(
            "WHERE message_outcomes.outcome IN ('failed', '{}')",
            kind.as_str()
        ),
    )
}

/// Rows of one multi-row statement (8 parameters each: well below SQLite's 32,766 and
/// PostgreSQL's 65,535 bound parameters).
const ROWS_PER_STATEMENT: usize = 256;
/// Order lines of one multi-row statement (5 parameters each).
const LINES_PER_STATEMENT: usize = 1000;

/// `($1, …, $k<tail>), ($k+1, …)`: `rows` tuples of `columns` parameters, each followed by
/// `tail` (SQL expressions such as the current time). SQLite gets anonymous `?` instead:
/// it resolves every named `$n` by a linear search of the statement's names, so a
/// statement of a batch's 500 parameters spent more time in that search than in the insert.
fn placeholders(backend: Backend, rows: usize, columns: usize, tail: &str) -> String {
    let mut out = String::with_capacity(rows * (columns * 5 + tail.len() + 4));
    for r in 0..rows {
        if r > 0 {
            out.push_str(", ");
        }
        out.push('(');
        out.push_str(&parameter_list(backend, r * columns, columns));
        out.push_str(tail);
        out.push(')');
    }
    out
}

/// `$first+1, …, $first+count` (PostgreSQL) or `?, …, ?` (SQLite, bound in order).
fn parameter_list(backend: Backend, first: usize, count: usize) -> String {
    let mut out = String::with_capacity(count * 5);
    for n in first + 1..=first + count {
        if n > first + 1 {
            out.push_str(", ");
        }
        match backend {
            Backend::Sqlite => out.push('?'),
            Backend::Postgres => {
                out.push('$');
                out.push_str(&n.to_string());
            }
        }
    }
    out
}

/// Which effects of a recorded outcome the store writes into the outbox, in the outcome's
/// transaction (see `domain::outbox`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// Each new order is delivered to the ERP (`erp` rows).
    pub erp: bool,
    /// The outcomes answered with a reply to the sender (`reply:<outcome>` rows).
    pub reply: Answered,
}

/// The outcomes that get a reply: a confirmation for `created`, a rejection for the others.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Answered {
    /// A confirmation of each new order.
    #[serde(default)]
    pub created: bool,
    /// A rejection when no order lines were found.
    #[serde(default)]
    pub no_lines: bool,
    /// A rejection when the content could not be read (encrypted, TNEF).
    #[serde(default)]
    pub unsupported_content: bool,
    /// A rejection when the sender is no known client.
    #[serde(default)]
    pub unknown_client: bool,
}

impl Answered {
    /// Every outcome that can be answered.
    pub fn all() -> Self {
        Self {
            created: true,
            no_lines: true,
            unsupported_content: true,
            unknown_client: true,
        }
    }

    /// Whether any outcome is answered.
    pub fn any(self) -> bool {
        self.created || self.no_lines || self.unsupported_content || self.unknown_client
    }

    /// Whether `outcome` is answered.
    pub fn answers(self, outcome: OutcomeKind) -> bool {
        match outcome {
            OutcomeKind::Created => self.created,
            OutcomeKind::NoLines => self.no_lines,
            OutcomeKind::UnsupportedContent => self.unsupported_content,
            OutcomeKind::UnknownClient => self.unknown_client,
            _ => false,
        }
    }
}

/// A reply's outbox row: its effect (`reply:<outcome>`), recipient and payload (JSON).
type ReplyRow<'a> = (String, &'a str, String);

impl Effects {
    /// Whether any effect is on.
    pub fn any(self) -> bool {
        self.erp || self.reply.any()
    }

    /// The reply effect `rec` gets (`reply:<outcome>`) and its row's recipient and payload,
    /// if it gets one: its outcome is answered, it may be answered, and a `created` outcome
    /// made an order.
    fn reply_of(self, rec: &Recording, order_id: Option<i64>) -> Option<ReplyRow<'_>> {
        let to = rec.reply.as_ref()?;
        if !self.reply.answers(rec.outcome)
            || (rec.outcome == OutcomeKind::Created && order_id.is_none())
        {
            return None;
        }
        let payload = serde_json::to_string(to).ok()?;
        Some((
            format!("reply:{}", rec.outcome.as_str()),
            to.to.as_str(),
            payload,
        ))
    }
}

/// The store.
#[derive(Clone, Debug)]
pub struct OrderStore {
    pool: AnyPool,
    backend: Backend,
    effects: Effects,
    /// Woken after a commit that wrote outbox rows, so that the dispatcher of this process
    /// does not wait for its next poll.
    outbox_written: std::sync::Arc<tokio::sync::Notify>,
}

fn install_drivers() {
    static DRIVERS: Once = Once::new();
    DRIVERS.call_once(sqlx::any::install_default_drivers);
}

/// `sqlite://PATH` with the file created when missing.
fn sqlite_url(url: &str) -> Result<String, StoreError> {
    let path = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .ok_or_else(|| StoreError::Url(url.to_owned()))?;
    let (file, query) = path.split_once('?').unwrap_or((path, ""));
    if file == ":memory:" || file.is_empty() {
        return Err(StoreError::Url(url.to_owned()));
    }
    if let Some(parent) = std::path::Path::new(file).parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent).map_err(|source| StoreError::Folder {
                path: parent.display().to_string(),
                source,
            })?;
        }
    }
    let mode = if query.contains("mode=") {
        ""
    } else {
        "mode=rwc"
    };
    let sep = if query.is_empty() || mode.is_empty() {
        ""
    } else {
        "&"
    };
    Ok(format!("sqlite://{file}?{query}{sep}{mode}"))
}

impl OrderStore {
    /// Opens the database at `url` (`sqlite://PATH`, created when missing, or
    /// `postgres://…`) and applies the migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        install_drivers();
        let backend = Backend::of(url).ok_or_else(|| StoreError::Url(url.to_owned()))?;
        let connect_url = match backend {
            Backend::Sqlite => sqlite_url(url)?,
            Backend::Postgres => url.to_owned(),
        };
        // Processes starting together on a fresh database can find it locked while another
        // one migrates it: try again a few times before giving up.
        let mut attempt = 0u64;
        let started = std::time::Instant::now();
        loop {
            let opened = async {
                // SQLite has one writer at a time: four connections keep the workers'
                // batches queued at the database, and each keeps a small page cache.
                let connections = match backend {
                    Backend::Sqlite => 4,
                    Backend::Postgres => 8,
                };
                // One connection migrates; then the others open all at once, in the
                // background: not by the first batches (an SQLite connection's set-up took
                // 10-40 ms on that path), and not one after another before the migrations
                // (sqlx's eager `connect` does that: 8 PostgreSQL connections took ~40 ms).
                let pool = AnyPoolOptions::new()
                    .max_connections(connections)
                    .min_connections(connections)
                    .acquire_timeout(Duration::from_secs(30))
                    .after_connect(move |conn, _| {
                        Box::pin(async move {
                            if backend == Backend::Sqlite {
                                conn.execute(
                                    "PRAGMA busy_timeout = 30000; PRAGMA journal_mode = WAL; \
                                     PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON; \
                                     PRAGMA cache_size = -1024;",
                                )
                                .await?;
                            }
                            Ok(())
                        })
                    })
                    .connect_lazy(&connect_url)?;
                Self::migrate(&pool, backend).await?;
                // After the migrations: an SQLite connection switching to WAL while another
                // one migrates finds the database locked.
                let warm = pool.clone();
                tokio::spawn(async move {
                    let opened = (0..connections).map(|_| warm.acquire());
                    // Errors show up where the connections are used.
                    drop(futures::future::join_all(opened).await);
                });
                Ok::<_, StoreError>(pool)
            };
            match opened.await {
                Ok(pool) => {
                    tracing::debug!(?backend, elapsed = ?started.elapsed(), "store opened and migrated");
                    return Ok(Self {
                        pool,
                        backend,
                        effects: Effects::default(),
                        outbox_written: std::sync::Arc::default(),
                    });
                }
                Err(e) if attempt < 5 => {
                    attempt += 1;
                    tracing::debug!(error = %e, attempt, "opening the store raced another process; retrying");
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// This store, writing an outbox row for each of `effects` with every outcome that has
    /// one.
    #[must_use]
    pub fn with_effects(mut self, effects: Effects) -> Self {
        self.effects = effects;
        self
    }

    /// The effects written with each outcome.
    pub fn effects(&self) -> Effects {
        self.effects
    }

    /// The database's connections (for the outbox, which shares the store's database).
    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Notified after a commit that wrote outbox rows.
    pub(crate) fn outbox_written(&self) -> &tokio::sync::Notify {
        &self.outbox_written
    }

    fn wrote_outbox(&self, recorded: &[&Recorded]) {
        let wrote = |r: &&Recorded| match r {
            Recorded::New { order_id: Some(_) } => self.effects.any(),
            Recorded::New { order_id: None } => self.effects.reply.any(),
            _ => false,
        };
        if recorded.iter().any(wrote) {
            self.outbox_written.notify_waiters();
        }
    }

    /// Applies the migrations. Two processes starting at once may race on a fresh
    /// database; the loser retries and then finds the migration applied.
    async fn migrate(pool: &AnyPool, backend: Backend) -> Result<(), StoreError> {
        let migrator = match backend {
            Backend::Sqlite => sqlx::migrate!("./migrations/sqlite"),
            Backend::Postgres => sqlx::migrate!("./migrations/postgres"),
        };
        let mut attempt = 0;
        loop {
            match migrator.run(pool).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt < 5 => {
                    attempt += 1;
                    tracing::debug!(error = %e, attempt, "migration raced; retrying");
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Records one outcome, and its order when there is one, in one transaction.
    ///
    /// If this identity already has an outcome other than `failed`, nothing is written for
    /// it: with the same content fingerprint the message is a duplicate (its `deliveries`
    /// count goes up); with a different one it is a different message reusing the
    /// Message-ID, recorded as `conflicting_duplicate` under `identity#fingerprint` for an
    /// operator. A `failed` outcome is replaced: the message was retried after its fault
    /// was fixed.
    pub async fn record(&self, rec: &Recording) -> Result<Recorded, StoreError> {
        let mut tx = self.pool.begin().await?;
        let recorded = self.record_in(&mut tx, rec, CLAIM_FAILED).await?;
        tx.commit().await?;
        self.wrote_outbox(&[&recorded]);
        Ok(recorded)
    }

    /// Records a message run again by an operator (`outcomes replay`) whose outcome was
    /// `replayed`: like [`OrderStore::record`], except that an outcome of that kind is
    /// replaced by the new decision, with its order and effects. An outcome of any other
    /// kind (the message was replayed already, or recorded otherwise since) stays: the
    /// replay is a duplicate. The orders' unique message key keeps a second order out.
    pub async fn record_replay(
        &self,
        rec: &Recording,
        replayed: OutcomeKind,
    ) -> Result<Recorded, StoreError> {
        let mut tx = self.pool.begin().await?;
        let recorded = self
            .record_in(&mut tx, rec, &claim_replayed(replayed))
            .await?;
        tx.commit().await?;
        self.wrote_outbox(&[&recorded]);
        Ok(recorded)
    }

    /// The outcomes of `kind` that can be run again (their task is known), oldest first:
    /// recorded on or after `since` (`YYYY-MM-DD`, UTC) and from `sender`, when given; at
    /// most `limit`.
    pub async fn replay_candidates(
        &self,
        kind: OutcomeKind,
        since: Option<&str>,
        sender: Option<&str>,
        limit: i64,
    ) -> Result<Vec<ReplayCandidate>, StoreError> {
        let rows = sqlx::query(
            "SELECT message_identity, sender, subject, recorded_at, task FROM message_outcomes
             WHERE outcome = $1 AND task IS NOT NULL
               AND (CAST($2 AS TEXT) IS NULL OR recorded_at >= CAST($2 AS TEXT))
               AND (CAST($3 AS TEXT) IS NULL OR LOWER(sender) = LOWER(CAST($3 AS TEXT)))
             ORDER BY recorded_at, message_identity LIMIT $4",
        )
        .bind(kind.as_str())
        .bind(since)
        .bind(sender)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ReplayCandidate {
                    message_identity: r.try_get("message_identity")?,
                    sender: r.try_get("sender")?,
                    subject: r.try_get("subject")?,
                    recorded_at: r.try_get("recorded_at")?,
                    task: r.try_get("task")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Records several outcomes in one transaction (group commit): one result per
    /// recording, in order, each as [`OrderStore::record`] would give it; every message
    /// still gets its own row under its own unique identity, and two recordings of one
    /// identity in a batch are recorded as the first and its duplicate. If the batch's
    /// transaction fails, nothing of it is kept and each recording is tried again in its
    /// own transaction, so one bad row never fails the others.
    pub async fn record_batch(&self, recs: &[&Recording]) -> Vec<Result<Recorded, StoreError>> {
        if recs.len() > 1 && self.backend == Backend::Postgres {
            match self.record_all_postgres(recs).await {
                Ok(recorded) => {
                    self.wrote_outbox(&recorded.iter().flatten().collect::<Vec<_>>());
                    return recorded;
                }
                Err(e) => tracing::warn!(
                    recordings = recs.len(),
                    error = %e,
                    "the batch's statement failed; recording each message alone"
                ),
            }
        } else if recs.len() > 1 {
            let batch = async {
                let mut tx = self.pool.begin().await?;
                let recorded = self.record_all_in(&mut tx, recs).await?;
                tx.commit().await?;
                Ok::<_, StoreError>(recorded)
            };
            match batch.await {
                Ok(recorded) => {
                    self.wrote_outbox(&recorded.iter().collect::<Vec<_>>());
                    return recorded.into_iter().map(Ok).collect();
                }
                Err(e) => tracing::warn!(
                    recordings = recs.len(),
                    error = %e,
                    "the batch's transaction failed; recording each message alone"
                ),
            }
        }
        let mut out = Vec::with_capacity(recs.len());
        for rec in recs {
            out.push(self.record(rec).await);
        }
        out
    }

    /// PostgreSQL: a batch's new outcomes, their orders and the orders' lines in one
    /// statement (one round trip, prepared once per connection: its text never changes),
    /// the batch carried as two JSON parameters. Order ids are drawn from the sequence
    /// before the outcome rows are claimed, so each claimed outcome is written with its
    /// order id and no second pass links them; an identity whose outcome exists already
    /// (and is not `failed`) claims nothing, its drawn id is a gap, and no order is written
    /// for it. The statement is atomic: all of its rows or none. Recordings it did not
    /// claim (duplicates, conflicts, an identity repeated in the batch) are then recorded
    /// one by one, each in its own transaction, after the rows they may repeat.
    async fn record_all_postgres(
        &self,
        recs: &[&Recording],
    ) -> Result<Vec<Result<Recorded, StoreError>>, StoreError> {
        let mut firsts: Vec<usize> = Vec::with_capacity(recs.len());
        {
            let mut identities = std::collections::HashSet::with_capacity(recs.len());
            for (i, rec) in recs.iter().enumerate() {
                if identities.insert(rec.identity.as_str()) {
                    firsts.push(i);
                }
            }
        }
        let mut outcomes = Vec::with_capacity(firsts.len());
        let mut lines = Vec::new();
        for &i in &firsts {
            let rec = recs[i];
            outcomes.push(serde_json::json!({
                "identity": rec.identity,
                "outcome": rec.outcome.as_str(),
                "reason": rec.reason,
                "sha": rec.content_sha256,
                "fingerprint": rec.fingerprint,
                "sender": rec.sender,
                "subject": rec.subject,
                "task_id": rec.task_id,
                "task": rec.task,
                "client_id": rec.order.as_ref().map(|o| &o.client_id),
                "client_name": rec.order.as_ref().map(|o| &o.client_name),
                // The reply's row, when its outcome is answered (a `created` one only if
                // the statement writes its order: `claimed.order_id` below).
                "reply_effect": self.effects.reply_of(rec, Some(0)).map(|r| r.0),
                "recipient": rec.reply.as_ref().map(|r| &r.to),
                "reply": self.effects.reply_of(rec, Some(0)).map(|r| r.2),
            }));
            for (n, line) in rec.order.iter().flat_map(|o| o.lines.iter()).enumerate() {
                lines.push(serde_json::json!({
                    "identity": rec.identity,
                    "line_no": n + 1,
                    "sku": line.sku,
                    "quantity": line.quantity,
                    "origin": line.origin,
                }));
            }
        }
        let now = self.backend.now();
        let now_ms = self.backend.now_ms();
        let sql = format!(
            "WITH input AS (
                 SELECT x.*, CASE WHEN x.client_id IS NOT NULL
                     THEN nextval(pg_get_serial_sequence('orders', 'id')) END AS order_id
                 FROM json_to_recordset($1::json) AS x(identity TEXT, outcome TEXT, reason TEXT,
                     sha TEXT, fingerprint TEXT, sender TEXT, subject TEXT, task_id TEXT,
                     task TEXT, client_id TEXT, client_name TEXT, reply_effect TEXT, recipient TEXT,
                     reply TEXT)
             ), claimed AS (
                 INSERT INTO message_outcomes
                     (message_identity, outcome, reason, content_sha256, content_fingerprint,
                      sender, subject, task_id, task, order_id, recorded_at, updated_at)
                 SELECT identity, outcome, reason, sha, fingerprint, sender, subject, task_id,
                     task, order_id, {now}, {now}
                 FROM input
                 ON CONFLICT (message_identity) DO UPDATE SET order_id = excluded.order_id,
                     {CLAIM_FAILED}
                 RETURNING message_identity, order_id
             ), new_orders AS (
                 INSERT INTO orders
                     (id, message_identity, client_id, client_name, sender, subject, created_at)
                 SELECT input.order_id, input.identity, input.client_id, input.client_name,
                     COALESCE(input.sender, ''), input.subject, {now}
                 FROM claimed JOIN input ON input.identity = claimed.message_identity
                 WHERE input.order_id IS NOT NULL
                 RETURNING id, message_identity
             ), new_lines AS (
                 INSERT INTO order_lines (order_id, line_no, sku, quantity, origin)
                 SELECT new_orders.id, l.line_no, l.sku, l.quantity, l.origin
                 FROM json_to_recordset($2::json) AS l(identity TEXT, line_no BIGINT,
                     sku TEXT, quantity BIGINT, origin TEXT)
                 JOIN new_orders ON new_orders.message_identity = l.identity
             ), new_effects AS (
                 INSERT INTO outbox (effect, message_identity, order_id, due_ms, created_ms)
                 SELECT 'erp', new_orders.message_identity, new_orders.id, {now_ms}, {now_ms}
                 FROM new_orders WHERE $3
             ), new_replies AS (
                 INSERT INTO outbox
                     (effect, message_identity, order_id, recipient, payload, due_ms, created_ms)
                 SELECT input.reply_effect, input.identity, claimed.order_id, input.recipient,
                     input.reply, {now_ms}, {now_ms}
                 FROM claimed JOIN input ON input.identity = claimed.message_identity
                 WHERE input.reply_effect IS NOT NULL
                   AND (input.outcome <> 'created' OR claimed.order_id IS NOT NULL)
                 ON CONFLICT (effect, message_identity) DO NOTHING
             )
             SELECT message_identity, order_id FROM claimed"
        );
        let rows = sqlx::query(&sql)
            .bind(serde_json::Value::Array(outcomes).to_string())
            .bind(serde_json::Value::Array(lines).to_string())
            .bind(self.effects.erp)
            .fetch_all(&self.pool)
            .await?;
        let mut claimed: HashMap<String, Option<i64>> = HashMap::with_capacity(rows.len());
        for row in rows {
            claimed.insert(row.try_get("message_identity")?, row.try_get("order_id")?);
        }
        let mut out = Vec::with_capacity(recs.len());
        let mut firsts = firsts.into_iter().peekable();
        for (i, rec) in recs.iter().enumerate() {
            let first = firsts.next_if_eq(&i).is_some();
            match claimed.get(&rec.identity) {
                Some(&order_id) if first => out.push(Ok(Recorded::New { order_id })),
                _ => out.push(self.record(rec).await),
            }
        }
        Ok(out)
    }

    /// A batch's recordings in `tx` with a few statements for the whole batch: one
    /// multi-row claim of the outcome rows, one insert of the new orders, their lines in
    /// chunks, one update linking outcomes to orders. Recordings whose identity already has
    /// an outcome (duplicates, conflicts) or repeats one earlier in the batch take the
    /// one-message path, in the same transaction.
    async fn record_all_in(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        recs: &[&Recording],
    ) -> Result<Vec<Recorded>, StoreError> {
        let now = self.backend.now();
        let mut firsts: Vec<usize> = Vec::with_capacity(recs.len());
        {
            let mut identities = std::collections::HashSet::with_capacity(recs.len());
            for (i, rec) in recs.iter().enumerate() {
                if identities.insert(rec.identity.as_str()) {
                    firsts.push(i);
                }
            }
        }
        // 1. Claim the outcome rows: new identities, and `failed` ones (replaced).
        let mut claimed: std::collections::HashSet<String> =
            std::collections::HashSet::with_capacity(recs.len());
        for chunk in firsts.chunks(ROWS_PER_STATEMENT) {
            let values = placeholders(self.backend, chunk.len(), 9, &format!(", {now}, {now}"));
            let sql = format!(
                "INSERT INTO message_outcomes
                    (message_identity, outcome, reason, content_sha256, content_fingerprint,
                     sender, subject, task_id, task, recorded_at, updated_at)
                 VALUES {values}
                 ON CONFLICT (message_identity) DO UPDATE SET {CLAIM_FAILED}
                 RETURNING message_identity"
            );
            // Not kept prepared: the text differs with the batch's row counts, and a cache
            // of every variant on every connection grows with the backlog.
            let mut query = sqlx::query(&sql).persistent(false);
            for &i in chunk {
                let rec = recs[i];
                query = query
                    .bind(&rec.identity)
                    .bind(rec.outcome.as_str())
                    .bind(&rec.reason)
                    .bind(&rec.content_sha256)
                    .bind(&rec.fingerprint)
                    .bind(&rec.sender)
                    .bind(&rec.subject)
                    .bind(&rec.task_id)
                    .bind(&rec.task);
            }
            for row in query.fetch_all(&mut **tx).await? {
                claimed.insert(row.try_get("message_identity")?);
            }
        }
        // 2. The claimed recordings' orders, then their lines, then the links.
        let with_orders: Vec<usize> = firsts
            .iter()
            .copied()
            .filter(|&i| recs[i].order.is_some() && claimed.contains(&recs[i].identity))
            .collect();
        let mut order_ids: HashMap<String, i64> = HashMap::with_capacity(with_orders.len());
        for chunk in with_orders.chunks(ROWS_PER_STATEMENT) {
            let values = placeholders(self.backend, chunk.len(), 5, &format!(", {now}"));
            let sql = format!(
                "INSERT INTO orders (message_identity, client_id, client_name, sender, subject, created_at)
                 VALUES {values} RETURNING id, message_identity"
            );
            // Not kept prepared: the text differs with the batch's row counts, and a cache
            // of every variant on every connection grows with the backlog.
            let mut query = sqlx::query(&sql).persistent(false);
            for &i in chunk {
                let (rec, order) = (recs[i], recs[i].order.as_ref());
                let order = order.ok_or_else(|| StoreError::Url("no order".into()))?;
                query = query
                    .bind(&rec.identity)
                    .bind(&order.client_id)
                    .bind(&order.client_name)
                    .bind(rec.sender.as_deref().unwrap_or(""))
                    .bind(&rec.subject);
            }
            for row in query.fetch_all(&mut **tx).await? {
                order_ids.insert(row.try_get("message_identity")?, row.try_get("id")?);
            }
        }
        let lines: Vec<(i64, i64, &OrderLine)> = with_orders
            .iter()
            .filter_map(|&i| {
                let id = *order_ids.get(&recs[i].identity)?;
                Some((id, recs[i].order.as_ref()?))
            })
            .flat_map(|(id, order)| {
                order
                    .lines
                    .iter()
                    .enumerate()
                    .map(move |(n, line)| (id, n as i64 + 1, line))
            })
            .collect();
        for chunk in lines.chunks(LINES_PER_STATEMENT) {
            let values = placeholders(self.backend, chunk.len(), 5, "");
            let sql = format!(
                "INSERT INTO order_lines (order_id, line_no, sku, quantity, origin) VALUES {values}"
            );
            // Not kept prepared: the text differs with the batch's row counts, and a cache
            // of every variant on every connection grows with the backlog.
            let mut query = sqlx::query(&sql).persistent(false);
            for (id, n, line) in chunk {
                query = query
                    .bind(*id)
                    .bind(*n)
                    .bind(&line.sku)
                    .bind(i64::from(line.quantity))
                    .bind(&line.origin);
            }
            query.execute(&mut **tx).await?;
        }
        for chunk in with_orders.chunks(ROWS_PER_STATEMENT) {
            let list = parameter_list(self.backend, 0, chunk.len());
            let sql = format!(
                "UPDATE message_outcomes SET order_id =
                    (SELECT id FROM orders WHERE orders.message_identity = message_outcomes.message_identity)
                 WHERE message_identity IN ({list})"
            );
            // Not kept prepared: the text differs with the batch's row counts, and a cache
            // of every variant on every connection grows with the backlog.
            let mut query = sqlx::query(&sql).persistent(false);
            for &i in chunk {
                query = query.bind(&recs[i].identity);
            }
            query.execute(&mut **tx).await?;
        }
        // The new orders' effects.
        if self.effects.erp {
            let ordered: Vec<(&String, &i64)> = order_ids.iter().collect();
            for chunk in ordered.chunks(ROWS_PER_STATEMENT) {
                let now_ms = self.backend.now_ms();
                let values = placeholders(
                    self.backend,
                    chunk.len(),
                    2,
                    &format!(", 'erp', {now_ms}, {now_ms}"),
                );
                let sql = format!(
                    "INSERT INTO outbox (message_identity, order_id, effect, due_ms, created_ms) VALUES {values}"
                );
                let mut query = sqlx::query(&sql).persistent(false);
                for (identity, id) in chunk {
                    query = query.bind(*identity).bind(**id);
                }
                query.execute(&mut **tx).await?;
            }
        }
        // The claimed recordings' replies.
        let replies: Vec<(&String, Option<i64>, ReplyRow<'_>)> = firsts
            .iter()
            .filter(|&&i| claimed.contains(&recs[i].identity))
            .filter_map(|&i| {
                let order_id = order_ids.get(&recs[i].identity).copied();
                let reply = self.effects.reply_of(recs[i], order_id)?;
                Some((&recs[i].identity, order_id, reply))
            })
            .collect();
        for chunk in replies.chunks(ROWS_PER_STATEMENT) {
            let now_ms = self.backend.now_ms();
            let values = placeholders(
                self.backend,
                chunk.len(),
                5,
                &format!(", {now_ms}, {now_ms}"),
            );
            let sql = format!(
                "INSERT INTO outbox (effect, message_identity, order_id, recipient, payload, due_ms, created_ms)
                 VALUES {values} ON CONFLICT (effect, message_identity) DO NOTHING"
            );
            let mut query = sqlx::query(&sql).persistent(false);
            for (identity, order_id, (effect, to, payload)) in chunk {
                query = query
                    .bind(effect.as_str())
                    .bind(identity.as_str())
                    .bind(*order_id)
                    .bind(*to)
                    .bind(payload.as_str());
            }
            query.execute(&mut **tx).await?;
        }
        // 3. Everything else, one by one, in order: it sees the rows written above.
        let mut out: Vec<Option<Recorded>> = vec![None; recs.len()];
        for &i in &firsts {
            if claimed.contains(&recs[i].identity) {
                out[i] = Some(Recorded::New {
                    order_id: order_ids.get(&recs[i].identity).copied(),
                });
            }
        }
        for (i, rec) in recs.iter().enumerate() {
            if out[i].is_none() {
                out[i] = Some(self.record_in(tx, rec, CLAIM_FAILED).await?);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    async fn record_in(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        rec: &Recording,
        claim: &str,
    ) -> Result<Recorded, StoreError> {
        let now = self.backend.now();
        // The first statement writes, so the database takes the row (SQLite: the write
        // lock) at once and two workers racing on one message are serialised by it.
        let claimed = self
            .insert_outcome(
                tx,
                rec,
                &rec.identity,
                rec.outcome,
                rec.reason.as_deref(),
                claim,
            )
            .await?;
        if claimed == 0 {
            let earlier = sqlx::query(
                "SELECT outcome, order_id, content_fingerprint FROM message_outcomes
                 WHERE message_identity = $1",
            )
            .bind(&rec.identity)
            .fetch_one(&mut **tx)
            .await?;
            let outcome: String = earlier.try_get("outcome")?;
            let order_id: Option<i64> = earlier.try_get("order_id")?;
            let fingerprint: Option<String> = earlier.try_get("content_fingerprint")?;
            let conflicting = rec.identity.starts_with("mid:")
                && fingerprint.as_deref().is_some_and(|f| f != rec.fingerprint);
            if conflicting {
                let identity = format!("{}#{}", rec.identity, rec.fingerprint);
                let reason = match order_id {
                    Some(id) => format!(
                        "the Message-ID was first recorded as {outcome} (order {id}) for different content; kept for an operator"
                    ),
                    None => format!(
                        "the Message-ID was first recorded as {outcome} for different content; kept for an operator"
                    ),
                };
                self.insert_outcome(
                    tx,
                    rec,
                    &identity,
                    OutcomeKind::ConflictingDuplicate,
                    Some(&reason),
                    "deliveries = message_outcomes.deliveries + 1, updated_at = excluded.updated_at",
                )
                .await?;
                return Ok(Recorded::Conflict {
                    identity,
                    earlier: outcome,
                    order_id,
                });
            }
            sqlx::query(&format!(
                "UPDATE message_outcomes SET deliveries = deliveries + 1, updated_at = {now}
                 WHERE message_identity = $1"
            ))
            .bind(&rec.identity)
            .execute(&mut **tx)
            .await?;
            return Ok(Recorded::Duplicate {
                earlier: outcome,
                order_id,
            });
        }
        let mut order_id = None;
        if let Some(order) = &rec.order {
            let id: i64 = sqlx::query_scalar(&format!(
                "INSERT INTO orders (message_identity, client_id, client_name, sender, subject, created_at)
                 VALUES ($1, $2, $3, $4, $5, {now}) RETURNING id"
            ))
            .bind(&rec.identity)
            .bind(&order.client_id)
            .bind(&order.client_name)
            .bind(rec.sender.as_deref().unwrap_or(""))
            .bind(&rec.subject)
            .fetch_one(&mut **tx)
            .await?;
            for (n, line) in order.lines.iter().enumerate() {
                sqlx::query(
                    "INSERT INTO order_lines (order_id, line_no, sku, quantity, origin)
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(id)
                .bind(n as i64 + 1)
                .bind(&line.sku)
                .bind(i64::from(line.quantity))
                .bind(&line.origin)
                .execute(&mut **tx)
                .await?;
            }
            sqlx::query("UPDATE message_outcomes SET order_id = $1 WHERE message_identity = $2")
                .bind(id)
                .bind(&rec.identity)
                .execute(&mut **tx)
                .await?;
            if self.effects.erp {
                let now_ms = self.backend.now_ms();
                sqlx::query(&format!(
                    "INSERT INTO outbox (effect, message_identity, order_id, due_ms, created_ms)
                     VALUES ('erp', $1, $2, {now_ms}, {now_ms})"
                ))
                .bind(&rec.identity)
                .bind(id)
                .execute(&mut **tx)
                .await?;
            }
            order_id = Some(id);
        }
        if let Some((effect, to, payload)) = self.effects.reply_of(rec, order_id) {
            let now_ms = self.backend.now_ms();
            sqlx::query(&format!(
                "INSERT INTO outbox
                    (effect, message_identity, order_id, recipient, payload, due_ms, created_ms)
                 VALUES ($1, $2, $3, $4, $5, {now_ms}, {now_ms})
                 ON CONFLICT (effect, message_identity) DO NOTHING"
            ))
            .bind(effect)
            .bind(&rec.identity)
            .bind(order_id)
            .bind(to)
            .bind(payload)
            .execute(&mut **tx)
            .await?;
        }
        Ok(Recorded::New { order_id })
    }

    /// Inserts an outcome row for `identity` with `rec`'s facts; on an existing row, applies
    /// `on_conflict` (a `DO UPDATE SET …` clause). Returns the rows written.
    async fn insert_outcome(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        rec: &Recording,
        identity: &str,
        outcome: OutcomeKind,
        reason: Option<&str>,
        on_conflict: &str,
    ) -> Result<u64, StoreError> {
        let now = self.backend.now();
        Ok(sqlx::query(&format!(
            "INSERT INTO message_outcomes
                (message_identity, outcome, reason, content_sha256, content_fingerprint,
                 sender, subject, task_id, task, recorded_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, {now}, {now})
             ON CONFLICT (message_identity) DO UPDATE SET {on_conflict}"
        ))
        .bind(identity)
        .bind(outcome.as_str())
        .bind(reason)
        .bind(&rec.content_sha256)
        .bind(&rec.fingerprint)
        .bind(&rec.sender)
        .bind(&rec.subject)
        .bind(&rec.task_id)
        .bind(&rec.task)
        .execute(&mut **tx)
        .await?
        .rows_affected())
    }

    /// Records that a message failed for good; never replaces another outcome.
    pub async fn record_failure(
        &self,
        identity: &str,
        content_sha256: &str,
        task_id: &str,
        reason: &str,
    ) -> Result<(), StoreError> {
        let now = self.backend.now();
        sqlx::query(&format!(
            "INSERT INTO message_outcomes
                (message_identity, outcome, reason, content_sha256, task_id, recorded_at, updated_at)
             VALUES ($1, 'failed', $2, $3, $4, {now}, {now})
             ON CONFLICT (message_identity) DO UPDATE SET reason = excluded.reason, updated_at = {now}
             WHERE message_outcomes.outcome = 'failed'"
        ))
        .bind(identity)
        .bind(reason)
        .bind(content_sha256)
        .bind(task_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Orders with an id above `after`, oldest first, with their lines.
    pub async fn orders_after(&self, after: i64) -> Result<Vec<StoredOrder>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, message_identity, client_id, client_name, sender, subject, created_at
             FROM orders WHERE id > $1 ORDER BY id",
        )
        .bind(after)
        .fetch_all(&self.pool)
        .await?;
        let mut orders = Vec::with_capacity(rows.len());
        for row in rows {
            orders.push(self.order_of_row(&row).await?);
        }
        Ok(orders)
    }

    /// The order `id` with its lines, if there is one.
    pub async fn order(&self, id: i64) -> Result<Option<StoredOrder>, StoreError> {
        let row = sqlx::query(
            "SELECT id, message_identity, client_id, client_name, sender, subject, created_at
             FROM orders WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => Ok(Some(self.order_of_row(&row).await?)),
            None => Ok(None),
        }
    }

    /// What the reply of outbox row `row` is about: the row's effect, recipient and
    /// threading, the message's outcome as it stands now, and its order.
    pub async fn reply_facts(&self, row: i64) -> Result<Option<ReplyFacts>, StoreError> {
        let found = sqlx::query(
            "SELECT outbox.effect, outbox.message_identity, outbox.recipient, outbox.payload,
                    outbox.sent_ms, m.outcome, m.reason, m.subject, m.order_id
             FROM outbox JOIN message_outcomes m ON m.message_identity = outbox.message_identity
             WHERE outbox.id = $1",
        )
        .bind(row)
        .fetch_optional(&self.pool)
        .await?;
        let Some(found) = found else {
            return Ok(None);
        };
        let order_id: Option<i64> = found.try_get("order_id")?;
        let order = match order_id {
            Some(id) => self.order(id).await?,
            None => None,
        };
        let payload: Option<String> = found.try_get("payload")?;
        Ok(Some(ReplyFacts {
            effect: found.try_get("effect")?,
            message_identity: found.try_get("message_identity")?,
            to: payload
                .as_deref()
                .and_then(|p| serde_json::from_str(p).ok())
                .unwrap_or_default(),
            outcome: found.try_get("outcome")?,
            reason: found.try_get("reason")?,
            subject: found.try_get("subject")?,
            order,
            sent_ms: found.try_get("sent_ms")?,
        }))
    }

    /// Replies handed to the relay for `recipient` in the last `window_ms` (for the
    /// per-sender rate limit).
    pub async fn replies_sent_to(
        &self,
        recipient: &str,
        window_ms: u64,
    ) -> Result<u64, StoreError> {
        let now = self.backend.now_ms();
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM outbox
             WHERE recipient = $1 AND sent_ms IS NOT NULL AND sent_ms > {now} - $2"
        ))
        .bind(recipient)
        .bind(i64::try_from(window_ms).unwrap_or(i64::MAX))
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Notes, in one transaction, that reading the messages of tasks `starting` begins and
    /// that reading those of `finished` ended; returns, for each of `starting`, how many
    /// times its reading began before without ending (the process died reading it).
    pub async fn handling(
        &self,
        starting: &[String],
        finished: &[String],
    ) -> Result<HashMap<String, i64>, StoreError> {
        let mut tx = self.pool.begin().await?;
        for chunk in finished.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "DELETE FROM handling WHERE task_id IN ({})",
                parameter_list(self.backend, 0, chunk.len())
            );
            let mut q = sqlx::query(&sql).persistent(false);
            for id in chunk {
                q = q.bind(id.as_str());
            }
            q.execute(&mut *tx).await?;
        }
        let mut before = HashMap::new();
        let now = self.backend.now_ms();
        for chunk in starting.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO handling (task_id, starts, updated_ms) VALUES {} \
                 ON CONFLICT (task_id) DO UPDATE SET starts = handling.starts + 1, \
                 updated_ms = excluded.updated_ms RETURNING task_id, starts",
                placeholders(self.backend, chunk.len(), 1, &format!(", 1, {now}"))
            );
            let mut q = sqlx::query(&sql).persistent(false);
            for id in chunk {
                q = q.bind(id.as_str());
            }
            for row in q.fetch_all(&mut *tx).await? {
                let id: String = row.try_get("task_id")?;
                let starts: i64 = row.try_get("starts")?;
                before.insert(id, starts - 1);
            }
        }
        tx.commit().await?;
        Ok(before)
    }

    /// Notes that the replies of outbox rows `rows` were handed to the relay (one
    /// statement for a batch: the rate limit counts them, and a row claimed again after a
    /// crash is not sent twice).
    pub async fn replies_sent(&self, rows: &[i64]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let now = self.backend.now_ms();
        let list: Vec<String> = rows.iter().map(i64::to_string).collect();
        sqlx::query(&format!(
            "UPDATE outbox SET sent_ms = {now} WHERE id IN ({})",
            list.join(", ")
        ))
        .persistent(false)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Notes on each outbox row why its reply is not sent (each is then settled as done),
    /// in one transaction.
    pub async fn replies_withheld(&self, rows: &[(i64, String)]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for (row, why) in rows {
            sqlx::query("UPDATE outbox SET last_error = $2 WHERE id = $1")
                .bind(*row)
                .bind(why)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The orders `ids` with their lines (two statements for all of them); an id with no
    /// order is left out.
    pub async fn orders(&self, ids: &[i64]) -> Result<HashMap<i64, StoredOrder>, StoreError> {
        let mut out = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            let list = parameter_list(self.backend, 0, chunk.len());
            let sql = format!(
                "SELECT id, message_identity, client_id, client_name, sender, subject, created_at
                 FROM orders WHERE id IN ({list})"
            );
            let mut query = sqlx::query(&sql).persistent(false);
            for id in chunk {
                query = query.bind(*id);
            }
            for row in query.fetch_all(&self.pool).await? {
                let id: i64 = row.try_get("id")?;
                out.insert(
                    id,
                    StoredOrder {
                        id,
                        message_identity: row.try_get("message_identity")?,
                        client_id: row.try_get("client_id")?,
                        client_name: row.try_get("client_name")?,
                        sender: row.try_get("sender")?,
                        subject: row.try_get("subject")?,
                        created_at: row.try_get("created_at")?,
                        lines: Vec::new(),
                    },
                );
            }
            let sql = format!(
                "SELECT order_id, sku, quantity, origin FROM order_lines
                 WHERE order_id IN ({list}) ORDER BY order_id, line_no"
            );
            let mut query = sqlx::query(&sql).persistent(false);
            for id in chunk {
                query = query.bind(*id);
            }
            for l in query.fetch_all(&self.pool).await? {
                let id: i64 = l.try_get("order_id")?;
                if let Some(order) = out.get_mut(&id) {
                    order.lines.push(OrderLine {
                        sku: l.try_get("sku")?,
                        quantity: u32::try_from(l.try_get::<i64, _>("quantity")?).unwrap_or(0),
                        origin: l.try_get("origin")?,
                    });
                }
            }
        }
        Ok(out)
    }

    async fn order_of_row(&self, row: &sqlx::any::AnyRow) -> Result<StoredOrder, StoreError> {
        let id: i64 = row.try_get("id")?;
        let lines = sqlx::query(
            "SELECT sku, quantity, origin FROM order_lines WHERE order_id = $1 ORDER BY line_no",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|l| {
            Ok(OrderLine {
                sku: l.try_get("sku")?,
                quantity: u32::try_from(l.try_get::<i64, _>("quantity")?).unwrap_or(0),
                origin: l.try_get("origin")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok(StoredOrder {
            id,
            message_identity: row.try_get("message_identity")?,
            client_id: row.try_get("client_id")?,
            client_name: row.try_get("client_name")?,
            sender: row.try_get("sender")?,
            subject: row.try_get("subject")?,
            created_at: row.try_get("created_at")?,
            lines,
        })
    }

    /// The highest order id, 0 when there is none.
    /// How many orders have an id above `after` (0: all of them).
    pub async fn order_count_after(&self, after: i64) -> Result<u64, StoreError> {
        let count: i64 =
            sqlx::query_scalar("SELECT CAST(COUNT(*) AS BIGINT) FROM orders WHERE id > $1")
                .bind(after)
                .fetch_one(&self.pool)
                .await?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    pub async fn last_order_id(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT CAST(COALESCE(MAX(id), 0) AS BIGINT) FROM orders")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// For each task id, whether an outcome was recorded by a delivery with that id.
    pub async fn recorded(&self, task_ids: &[String]) -> Result<Vec<bool>, StoreError> {
        let mut out = Vec::with_capacity(task_ids.len());
        for id in task_ids {
            let found: Option<String> =
                sqlx::query_scalar("SELECT task_id FROM message_outcomes WHERE task_id = $1")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?;
            out.push(found.is_some());
        }
        Ok(out)
    }

    /// Every outcome, oldest first.
    pub async fn outcomes(&self) -> Result<Vec<OutcomeRow>, StoreError> {
        let sql = format!("{OUTCOME_ROW} ORDER BY m.recorded_at, m.message_identity");
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter()
            .map(outcome_row)
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Outcomes matching `filter`, newest first, with the client of their order.
    pub async fn find_outcomes(
        &self,
        filter: &RecordFilter,
    ) -> Result<Vec<OutcomeRow>, StoreError> {
        let sql = format!(
            "{OUTCOME_ROW}
             WHERE ($1 IS NULL OR m.outcome = $1)
               AND ($2 IS NULL OR LOWER(o.client_name) LIKE $2 ESCAPE '\\' OR LOWER(o.client_id) LIKE $2 ESCAPE '\\')
               AND ($3 IS NULL OR SUBSTR(m.recorded_at, 1, 10) >= $3)
               AND ($4 IS NULL OR SUBSTR(m.recorded_at, 1, 10) <= $4)
             ORDER BY m.recorded_at DESC, m.message_identity
             LIMIT $5"
        );
        let rows = sqlx::query(&sql)
            .bind(filter.outcome.as_deref())
            .bind(filter.client_pattern())
            .bind(filter.from.as_deref())
            .bind(filter.to.as_deref())
            .bind(filter.limit)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|r| outcome_row(&r))
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Orders matching `filter` (its outcome is ignored), newest first, without their lines;
    /// the second value of each is its line count.
    pub async fn find_orders(
        &self,
        filter: &RecordFilter,
    ) -> Result<Vec<(StoredOrder, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT o.id, o.message_identity, o.client_id, o.client_name, o.sender, o.subject,
                    o.created_at,
                    (SELECT CAST(COUNT(*) AS BIGINT) FROM order_lines l WHERE l.order_id = o.id) AS line_count
             FROM orders o
             WHERE ($1 IS NULL OR LOWER(o.client_name) LIKE $1 ESCAPE '\\' OR LOWER(o.client_id) LIKE $1 ESCAPE '\\')
               AND ($2 IS NULL OR SUBSTR(o.created_at, 1, 10) >= $2)
               AND ($3 IS NULL OR SUBSTR(o.created_at, 1, 10) <= $3)
             ORDER BY o.id DESC
             LIMIT $4",
        )
        .bind(filter.client_pattern())
        .bind(filter.from.as_deref())
        .bind(filter.to.as_deref())
        .bind(filter.limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                Ok((
                    StoredOrder {
                        id: row.try_get("id")?,
                        message_identity: row.try_get("message_identity")?,
                        client_id: row.try_get("client_id")?,
                        client_name: row.try_get("client_name")?,
                        sender: row.try_get("sender")?,
                        subject: row.try_get("subject")?,
                        created_at: row.try_get("created_at")?,
                        lines: Vec::new(),
                    },
                    row.try_get("line_count")?,
                ))
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// One message: its outcome and, if it made one, its order with the lines.
    pub async fn message(
        &self,
        identity: &str,
    ) -> Result<(Option<OutcomeRow>, Option<StoredOrder>), StoreError> {
        let outcome = self.find_outcome(identity).await?;
        let order_id: Option<i64> =
            sqlx::query_scalar("SELECT id FROM orders WHERE message_identity = $1")
                .bind(identity)
                .fetch_optional(&self.pool)
                .await?;
        let order = match order_id {
            Some(id) => self
                .orders_after(id - 1)
                .await?
                .into_iter()
                .find(|o| o.id == id),
            None => None,
        };
        Ok((outcome, order))
    }

    async fn find_outcome(&self, identity: &str) -> Result<Option<OutcomeRow>, StoreError> {
        let sql = format!("{OUTCOME_ROW} WHERE m.message_identity = $1");
        let row = sqlx::query(&sql)
            .bind(identity)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(outcome_row).transpose()?)
    }

    /// The clients of the `clients` table (lists are separated by `;`; `attachments` NULL
    /// means all kinds).
    pub async fn clients(&self) -> Result<Vec<ClientEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, addresses, domains, attachments, read_body FROM clients ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        let list = |s: String| -> Vec<String> {
            s.split(';')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        };
        rows.into_iter()
            .map(|r| {
                let attachments: Option<String> = r.try_get("attachments")?;
                Ok(ClientEntry {
                    id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    addresses: list(r.try_get("addresses")?),
                    domains: list(r.try_get("domains")?),
                    attachments: attachments.map(|a| {
                        list(a)
                            .into_iter()
                            .filter_map(|k| {
                                serde_json::from_value(serde_json::Value::String(k.to_lowercase()))
                                    .ok()
                            })
                            .collect()
                    }),
                    read_body: r.try_get::<i64, _>("read_body")? != 0,
                    allow_unauthenticated: false,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

/// For the reconciliation sweep: unread mail whose outcome is recorded lost only its `\Seen`.
impl runtime_contracts::OutcomeLookup for OrderStore {
    fn recorded<'a>(
        &'a self,
        task_ids: &'a [String],
    ) -> runtime_contracts::BoxFuture<'a, Result<Vec<bool>, String>> {
        Box::pin(async move {
            OrderStore::recorded(self, task_ids)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// `t` as the stored timestamps write it (ISO 8601 UTC with milliseconds), which sort as
/// text in time order.
fn stored_time(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

impl OrderStore {
    /// Deletes what `policy` no longer keeps; what was removed, by table. Never deleted:
    /// an effect still pending, an order with one, the outcome of an order that is kept
    /// (it is what recognises the order's mail when it is sent again).
    pub async fn sweep_old(
        &self,
        policy: &runtime_contracts::RetentionPolicy,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let ago = |age: Duration| {
            chrono::Utc::now() - chrono::Duration::from_std(age).unwrap_or(chrono::Duration::MAX)
        };
        let mut removed = Vec::new();
        if let Some(age) = policy.effects {
            let cutoff = ago(age).timestamp_millis();
            let done = sqlx::query("DELETE FROM outbox WHERE state = 'done' AND settled_ms < $1")
                .bind(cutoff)
                .execute(&self.pool)
                .await?;
            removed.push(("outbox".to_owned(), done.rows_affected()));
        }
        if let Some(age) = policy.records {
            let cutoff = stored_time(ago(age));
            let mut orders = 0;
            loop {
                let ids: Vec<i64> = sqlx::query_scalar(
                    "SELECT id FROM orders WHERE created_at < $1 AND NOT EXISTS
                         (SELECT 1 FROM outbox WHERE outbox.order_id = orders.id AND outbox.state = 'pending')
                     ORDER BY id LIMIT 500",
                )
                .bind(&cutoff)
                .fetch_all(&self.pool)
                .await?;
                if ids.is_empty() {
                    break;
                }
                let list = parameter_list(self.backend, 0, ids.len());
                let mut tx = self.pool.begin().await?;
                for table in [
                    "DELETE FROM outbox WHERE order_id IN",
                    "DELETE FROM message_outcomes WHERE order_id IN",
                    "DELETE FROM order_lines WHERE order_id IN",
                    "DELETE FROM orders WHERE id IN",
                ] {
                    let sql = format!("{table} ({list})");
                    let mut query = sqlx::query(&sql).persistent(false);
                    for id in &ids {
                        query = query.bind(*id);
                    }
                    let done = query.execute(&mut *tx).await?;
                    if table.starts_with("DELETE FROM orders") {
                        orders += done.rows_affected();
                    }
                }
                tx.commit().await?;
            }
            removed.push(("orders".to_owned(), orders));
        }
        if let Some(age) = policy.outcomes {
            let cutoff = stored_time(ago(age));
            let done = sqlx::query(
                "DELETE FROM message_outcomes WHERE recorded_at < $1 AND order_id IS NULL",
            )
            .bind(&cutoff)
            .execute(&self.pool)
            .await?;
            removed.push(("outcomes".to_owned(), done.rows_affected()));
        }
        Ok(removed)
    }
}

impl runtime_contracts::RetentionSweep for OrderStore {
    fn sweep<'a>(
        &'a self,
        policy: &'a runtime_contracts::RetentionPolicy,
    ) -> runtime_contracts::BoxFuture<'a, Result<Vec<(String, u64)>, String>> {
        Box::pin(async move {
            self.sweep_old(policy)
                .await
                .map_err(|e| format!("the order store: {e}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{
        placeholders, Answered, Backend, Effects, NewOrder, OrderStore, Recorded, Recording,
        ReplyTo,
    };
    use crate::domain::extract::OrderLine;
    use crate::domain::OutcomeKind;
    use sqlx::Row as _;

    fn recording(identity: &str, lines: &[(&str, u32)], fingerprint: &str) -> Recording {
        Recording {
            identity: identity.to_owned(),
            content_sha256: format!("sha-{identity}"),
            fingerprint: fingerprint.to_owned(),
            sender: Some("buyer@example.com".to_owned()),
            subject: Some(format!("order {identity}")),
            task_id: format!("task-{identity}"),
            outcome: if lines.is_empty() {
                OutcomeKind::NoLines
            } else {
                OutcomeKind::Created
            },
            reason: lines.is_empty().then(|| "no lines".to_owned()),
            order: (!lines.is_empty()).then(|| NewOrder {
                client_id: "acme".to_owned(),
                client_name: "ACME".to_owned(),
                lines: lines
                    .iter()
                    .map(|(sku, quantity)| OrderLine {
                        sku: (*sku).to_owned(),
                        quantity: *quantity,
                        origin: "body".to_owned(),
                    })
                    .collect(),
            }),
            reply: Some(ReplyTo {
                to: "buyer@example.com".to_owned(),
                in_reply_to: Some(format!("<{identity}>")),
                references: vec![format!("<{identity}>")],
            }),
            task: Some(format!(r#"{{"id":"task-{identity}"}}"#)),
        }
    }

    /// The operators' queries (the console's outcomes, orders and message pages) on one
    /// backend: filters by outcome, client (any case, `%` and `_` literal) and day.
    async fn operator_queries(store: &OrderStore) {
        use super::RecordFilter;
        for rec in [
            recording("mid:a", &[("SKU-1", 2), ("SKU-2", 1)], "f-a"),
            recording("mid:b", &[], "f-b"),
        ] {
            store.record(&rec).await.expect("record");
        }
        let all = RecordFilter {
            limit: 50,
            ..RecordFilter::default()
        };
        let outcomes = store.find_outcomes(&all).await.expect("outcomes");
        assert_eq!(outcomes.len(), 2);
        let created = store
            .find_outcomes(&RecordFilter {
                outcome: Some("created".into()),
                ..all.clone()
            })
            .await
            .expect("created");
        assert_eq!(created.len(), 1);
        assert_eq!(created[0].client_name.as_deref(), Some("ACME"));
        assert_eq!(created[0].sender.as_deref(), Some("buyer@example.com"));
        let today = created[0].recorded_at[..10].to_owned();
        for (client, from, to, expected) in [
            (Some("acm"), None, None, 1),
            (Some("Ac%"), None, None, 0),
            (Some("a_me"), None, None, 0),
            (None, Some(today.clone()), Some(today.clone()), 1),
            (None, Some("2999-01-01".to_owned()), None, 0),
            (None, None, Some("2000-01-01".to_owned()), 0),
        ] {
            let filter = RecordFilter {
                client: client.map(str::to_owned),
                from,
                to,
                ..all.clone()
            };
            let orders = store.find_orders(&filter).await.expect("orders");
            assert_eq!(orders.len(), expected, "{filter:?}");
            if expected == 1 {
                assert_eq!(orders[0].1, 2, "two lines");
            }
        }
        let (outcome, order) = store.message("mid:a").await.expect("message");
        assert_eq!(outcome.map(|o| o.outcome).as_deref(), Some("created"));
        assert_eq!(order.map(|o| o.lines.len()), Some(2));
        let (outcome, order) = store.message("mid:b").await.expect("message");
        assert_eq!(outcome.and_then(|o| o.reason).as_deref(), Some("no lines"));
        assert!(order.is_none());
        let (outcome, _) = store.message("mid:none").await.expect("message");
        assert!(outcome.is_none());
    }

    /// The reply rows: (effect, identity, recipient), in identity order.
    async fn reply_rows(store: &OrderStore) -> Vec<(String, String, String)> {
        sqlx::query(
            "SELECT effect, message_identity, recipient FROM outbox
             WHERE effect LIKE 'reply:%' ORDER BY message_identity, effect",
        )
        .fetch_all(store.pool())
        .await
        .expect("rows")
        .iter()
        .map(|r| {
            (
                r.get::<String, _>("effect"),
                r.get::<String, _>("message_identity"),
                r.get::<String, _>("recipient"),
            )
        })
        .collect()
    }

    /// Replies are written with their outcome on every path (one message, a batch, and on
    /// PostgreSQL the batch statement): once per message and answered outcome, none for a
    /// duplicate, an outcome not answered, or mail that may not be answered.
    async fn replies_are_written_with_their_outcome(store: OrderStore) {
        let store = store.with_effects(Effects {
            erp: false,
            reply: Answered {
                created: true,
                no_lines: true,
                unsupported_content: false,
                unknown_client: false,
            },
        });
        let mut unanswerable = recording("mid:list", &[("L-1", 1)], "fp-list");
        unanswerable.reply = None;
        let mut unknown = recording("mid:stranger", &[], "fp-stranger");
        unknown.outcome = OutcomeKind::UnknownClient;
        store
            .record(&recording("mid:one", &[("A-1", 1)], "fp-one"))
            .await
            .expect("one");
        let batch = [
            recording("mid:two", &[("B-1", 2)], "fp-two"),
            recording("mid:three", &[], "fp-three"),
            recording("mid:one", &[("A-1", 1)], "fp-one"),
            unanswerable,
            unknown,
        ];
        let refs: Vec<&Recording> = batch.iter().collect();
        for r in store.record_batch(&refs).await {
            r.expect("recorded");
        }
        let to = "buyer@example.com".to_owned();
        assert_eq!(
            reply_rows(&store).await,
            vec![
                ("reply:created".into(), "mid:one".into(), to.clone()),
                ("reply:no_lines".into(), "mid:three".into(), to.clone()),
                ("reply:created".into(), "mid:two".into(), to),
            ]
        );
        let row: i64 =
            sqlx::query_scalar("SELECT id FROM outbox WHERE message_identity = 'mid:two'")
                .fetch_one(store.pool())
                .await
                .expect("row");
        let facts = store.reply_facts(row).await.expect("facts").expect("found");
        assert_eq!(facts.outcome, "created");
        assert_eq!(facts.to.in_reply_to.as_deref(), Some("<mid:two>"));
        assert_eq!(facts.order.expect("order").lines[0].sku, "B-1");
        assert_eq!(
            store
                .replies_sent_to("buyer@example.com", 60_000)
                .await
                .expect("n"),
            0
        );
        store.replies_sent(&[row]).await.expect("sent");
        assert_eq!(
            store
                .replies_sent_to("buyer@example.com", 60_000)
                .await
                .expect("n"),
            1
        );
    }

    /// A replay replaces only an outcome of the replayed kind: the order once, then
    /// nothing; the candidates are that kind's outcomes with a known task, by sender.
    async fn replays_replace_only_the_replayed_kind(store: OrderStore) {
        let store = store.with_effects(Effects {
            erp: true,
            reply: Answered::all(),
        });
        let mut unknown = recording("mid:r1@x", &[], "fp-r1");
        unknown.outcome = OutcomeKind::UnknownClient;
        unknown.reason = Some("not a client".into());
        store.record(&unknown).await.expect("recorded");
        store
            .record(&recording("mid:r2@x", &[("SKU-1", 1)], "fp-r2"))
            .await
            .expect("recorded");
        let found = store
            .replay_candidates(
                OutcomeKind::UnknownClient,
                Some("2000-01-01"),
                Some("BUYER@example.com"),
                10,
            )
            .await
            .expect("candidates");
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].message_identity, "mid:r1@x");
        assert!(found[0].task.contains("task-mid:r1@x"));
        for (since, sender) in [
            (Some("2999-01-01"), None),
            (None, Some("other@example.com")),
        ] {
            let none = store
                .replay_candidates(OutcomeKind::UnknownClient, since, sender, 10)
                .await
                .expect("candidates");
            assert!(none.is_empty(), "{since:?} {sender:?}: {none:?}");
        }
        // Decided again: an order now.
        let now = recording("mid:r1@x", &[("SKU-2", 2)], "fp-r1");
        let first = store
            .record_replay(&now, OutcomeKind::UnknownClient)
            .await
            .expect("replayed");
        assert!(
            matches!(first, Recorded::New { order_id: Some(_) }),
            "{first:?}"
        );
        let again = store
            .record_replay(&now, OutcomeKind::UnknownClient)
            .await
            .expect("replayed");
        assert!(matches!(again, Recorded::Duplicate { .. }), "{again:?}");
        // A replay never replaces another kind's outcome.
        let other = store
            .record_replay(
                &recording("mid:r2@x", &[("SKU-9", 9)], "fp-r2"),
                OutcomeKind::UnknownClient,
            )
            .await
            .expect("replayed");
        assert!(matches!(other, Recorded::Duplicate { .. }), "{other:?}");
        assert_eq!(store.orders_after(0).await.expect("orders").len(), 2);
        assert!(store
            .replay_candidates(OutcomeKind::UnknownClient, None, None, 10)
            .await
            .expect("candidates")
            .is_empty());
        let effects: Vec<String> = sqlx::query_scalar(
            "SELECT effect FROM outbox WHERE message_identity = 'mid:r1@x' ORDER BY effect",
        )
        .fetch_all(&store.pool)
        .await
        .expect("effects");
        assert_eq!(effects, ["erp", "reply:created", "reply:unknown_client"]);
    }

    #[tokio::test]
    async fn replays_replace_only_the_replayed_kind_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("o.db").display());
        replays_replace_only_the_replayed_kind(OrderStore::open(&url).await.expect("store")).await;
    }

    #[tokio::test]
    async fn replays_replace_only_the_replayed_kind_on_postgres() {
        let pg = plba_testkit::PostgresServer::start();
        replays_replace_only_the_replayed_kind(
            OrderStore::open(&pg.create_database())
                .await
                .expect("store"),
        )
        .await;
    }

    #[tokio::test]
    async fn replies_are_written_with_their_outcome_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("o.db").display());
        replies_are_written_with_their_outcome(OrderStore::open(&url).await.expect("store")).await;
    }

    #[tokio::test]
    async fn replies_are_written_with_their_outcome_on_postgres() {
        let pg = plba_testkit::PostgresServer::start();
        replies_are_written_with_their_outcome(
            OrderStore::open(&pg.create_database())
                .await
                .expect("store"),
        )
        .await;
    }

    #[tokio::test]
    async fn operator_queries_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("o.db").display());
        operator_queries(&OrderStore::open(&url).await.expect("store")).await;
    }

    #[tokio::test]
    async fn operator_queries_on_postgres() {
        let pg = plba_testkit::PostgresServer::start();
        operator_queries(
            &OrderStore::open(&pg.create_database())
                .await
                .expect("store"),
        )
        .await;
    }

    /// The one-statement batch on a real PostgreSQL, called directly (`record_batch` would
    /// hide its failure behind the one-by-one fallback): new outcomes with and without
    /// orders, a `failed` outcome replaced, an identity repeated in the batch, one recorded
    /// before, and one reusing a Message-ID for other content.
    #[tokio::test]
    async fn the_postgres_batch_statement_writes_outcomes_orders_and_lines_at_once() {
        let pg = plba_testkit::PostgresServer::start();
        let store = OrderStore::open(&pg.create_database())
            .await
            .expect("store");
        store
            .record_failure("mid:a", "sha-mid:a", "task-old", "handler failed")
            .await
            .expect("failure");
        let earlier = recording("mid:d", &[("D-1", 1)], "fp-d");
        assert!(matches!(
            store.record(&earlier).await.expect("record"),
            Recorded::New { order_id: Some(_) }
        ));
        let recs = [
            recording("mid:b", &[("B-1", 2), ("B-2", 5)], "fp-b"),
            recording("mid:c", &[], "fp-c"),
            recording("mid:a", &[("A-1", 3)], "fp-a"),
            recording("mid:b", &[("B-1", 2), ("B-2", 5)], "fp-b"),
            recording("mid:d", &[("D-1", 1)], "fp-d"),
            recording("mid:d", &[("X-9", 9)], "fp-other"),
        ];
        let refs: Vec<&Recording> = recs.iter().collect();
        let out = store
            .record_all_postgres(&refs)
            .await
            .expect("the statement");
        let out: Vec<Recorded> = out.into_iter().map(|r| r.expect("recorded")).collect();
        let order_of = |r: &Recorded| match r {
            Recorded::New { order_id } => *order_id,
            other => panic!("not new: {other:?}"),
        };
        let (b, a) = (order_of(&out[0]), order_of(&out[2]));
        assert!(b.is_some() && a.is_some() && b != a);
        assert_eq!(order_of(&out[1]), None);
        assert!(
            matches!(&out[3], Recorded::Duplicate { earlier, order_id } if earlier == "created" && *order_id == b),
            "{:?}",
            out[3]
        );
        assert!(
            matches!(&out[4], Recorded::Duplicate { .. }),
            "{:?}",
            out[4]
        );
        assert!(
            matches!(&out[5], Recorded::Conflict { identity, .. } if identity == "mid:d#fp-other"),
            "{:?}",
            out[5]
        );
        let orders = store.orders_after(0).await.expect("orders");
        let summary: Vec<(String, Vec<(String, u32)>)> = orders
            .iter()
            .map(|o| {
                let lines = o
                    .lines
                    .iter()
                    .map(|l| (l.sku.clone(), l.quantity))
                    .collect();
                (o.message_identity.clone(), lines)
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("mid:d".to_owned(), vec![("D-1".to_owned(), 1)]),
                (
                    "mid:b".to_owned(),
                    vec![("B-1".to_owned(), 2), ("B-2".to_owned(), 5)]
                ),
                ("mid:a".to_owned(), vec![("A-1".to_owned(), 3)]),
            ]
        );
        let outcomes = store.outcomes().await.expect("outcomes");
        let get = |id: &str| {
            outcomes
                .iter()
                .find(|o| o.message_identity == id)
                .unwrap_or_else(|| panic!("no outcome for {id}"))
        };
        assert_eq!(
            (get("mid:a").outcome.as_str(), get("mid:a").order_id),
            ("created", a)
        );
        assert_eq!(
            get("mid:a").deliveries,
            2,
            "the failed delivery and this one"
        );
        assert_eq!((get("mid:b").order_id, get("mid:b").deliveries), (b, 2));
        assert_eq!(
            (get("mid:c").outcome.as_str(), get("mid:c").order_id),
            ("no_lines", None)
        );
        assert_eq!(get("mid:d").deliveries, 2);
        assert_eq!(get("mid:d#fp-other").outcome, "conflicting_duplicate");
    }

    #[test]
    fn placeholders_are_numbered_for_postgres_and_positional_for_sqlite() {
        assert_eq!(
            placeholders(Backend::Postgres, 2, 2, ", 7"),
            "($1, $2, 7), ($3, $4, 7)"
        );
        assert_eq!(placeholders(Backend::Sqlite, 2, 2, ""), "(?, ?), (?, ?)");
    }
}
