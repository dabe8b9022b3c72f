//! An IMAP mailbox as a task source, by polling (`type = "imap_poll"`) or IDLE
//! (`type = "imap_idle"`) behind one contract: same settings, same pointer tasks, same
//! completion.
//!
//! - Tasks are pointers (account, mailbox, UIDVALIDITY, UID): the MIME bytes never travel
//!   through the queue. Workers fetch `BODY.PEEK[]` (which does not set `\Seen`) through a
//!   bounded pool of logged-in connections.
//! - `complete` sets `\Seen` (`UID STORE +FLAGS.SILENT`) after the outcome is committed. A
//!   dead-lettered task gets the configured keyword (`$OrderBotFailed`) and stays unseen;
//!   searches exclude that keyword, so it is not published again, even after a restart.
//! - `on_success = { move = "Processed" }` / `on_failure = { move = "Failed" }` file the
//!   message after those flags (with `$OrderBotDone` on success): `UID MOVE`, or `UID COPY`,
//!   `\Deleted`, `UID EXPUNGE` without MOVE. The watcher's pass finishes a move cut short.
//! - A pointer is published once: the source remembers what is pending, in flight or
//!   dead-lettered, and publishing is idempotent by task id as well.
//! - UIDVALIDITY changes drop the old pointers (they load as gone) and the messages are
//!   found again under their new UIDs; the store's unique message identity prevents a
//!   second order.
//! - Every I/O error reconnects with exponential backoff and jitter. A refused login makes
//!   the source degraded (not ready) with the server's words, and is retried slowly.

mod config;
mod connection;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use runtime_contracts::{
    BoxFuture, Disposition, GoneReason, SourceContext, SourceError, SourceStatus, Task, TaskSource,
};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};
use tokio_rustls::rustls::ClientConfig;

pub use config::{AuthMethod, Filing, ImapConfig, ImapMode, Provider, TlsMode};
use connection::{connect, tls_config, ConnectError, Credential, ImapSession, Pool, Pooled};

/// The `watchers_down` entry of the workers' connections.
const WORKERS: &str = "(workers)";

/// An IMAP UID set (`1:5,7,9:10`) of ascending UIDs.
/// How long a message's task id stays known after its ack (see `task_for`).
const KEEP_AFTER_ACK: Duration = Duration::from_secs(30);

fn uid_set(uids: &[u32]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < uids.len() {
        let start = uids[i];
        let mut end = start;
        while i + 1 < uids.len() && uids[i + 1] == end + 1 {
            i += 1;
            end = uids[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}:{end}")
        });
        i += 1;
    }
    parts.join(",")
}

/// Where a task points.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Pointer {
    mailbox: String,
    uid_validity: u32,
    uid: u32,
}

#[derive(Default)]
struct Inner {
    /// Pending task ids, counts and health.
    progress: super::Progress,
    /// UIDVALIDITY last seen per mailbox.
    validity: HashMap<String, u32>,
    /// When recent tasks were completed: a search may still list a completed message as
    /// unseen, and must not publish it again. Kept until a search that began after the
    /// completion no longer lists it.
    completed_at: HashMap<String, Instant>,
    /// Login attempts (watcher and workers).
    connects: u64,
    /// Every mailbox the source was configured to read since it was made: a task that
    /// points into one a reload removed still loads and completes.
    mailboxes: BTreeSet<String>,
    /// Watchers (by their mailboxes) whose connection fails now, with the error: the
    /// source is degraded while any is.
    watchers_down: BTreeMap<String, String>,
    /// What the server offers for filing (MOVE, UIDPLUS), learnt at the first move.
    caps: Option<Caps>,
    /// Messages (mailbox, UID) a worker is filing now: the watcher's pass that finishes
    /// filing cut short leaves them alone.
    filing: std::collections::HashSet<(String, u32)>,
}

/// Marks messages as being filed by this worker until dropped.
struct FilingNow<'a> {
    source: &'a ImapSource,
    keys: Vec<(String, u32)>,
}

impl<'a> FilingNow<'a> {
    fn new(source: &'a ImapSource, mailbox: &str, uids: &[u32]) -> Self {
        let keys: Vec<(String, u32)> = uids.iter().map(|&u| (mailbox.to_owned(), u)).collect();
        source.lock().filing.extend(keys.iter().cloned());
        Self { source, keys }
    }
}

impl Drop for FilingNow<'_> {
    fn drop(&mut self) {
        let mut inner = self.source.lock();
        for key in &self.keys {
            inner.filing.remove(key);
        }
    }
}

/// What a worker does on a selected mailbox.
enum Step<'a> {
    /// `UID STORE` these flags.
    Store(&'a str),
    /// File into this folder.
    File(&'a str),
}

/// The server's extensions that filing uses.
#[derive(Clone, Copy, Debug)]
struct Caps {
    /// RFC 6851 `MOVE`.
    moves: bool,
    /// RFC 4315 `UIDPLUS` (`UID EXPUNGE`).
    uidplus: bool,
}

/// What a source's configuration makes of it, swapped whole by a reload.
struct Settings {
    config: ImapConfig,
    mode: ImapMode,
    account: String,
    tls: Option<Arc<ClientConfig>>,
    /// What the source logs in with, or why it cannot.
    credentials: Result<Login, String>,
    /// Counts the swaps: a pooled session logged in under earlier settings is not reused.
    generation: u64,
}

impl Settings {
    fn of(config: ImapConfig, mode: ImapMode, generation: u64) -> Self {
        let config = config.resolved();
        let tls = tls_config(&config);
        let credentials = match &tls {
            Err(e) => Err(e.to_string()),
            Ok(_) => Login::of(&config),
        };
        Self {
            account: format!("{}@{}", config.user, config.host),
            tls: tls.ok().flatten(),
            credentials,
            mode,
            config,
            generation,
        }
    }
}

/// The IMAP source. See the module docs.
pub struct ImapSource {
    id: String,
    shared_id: Arc<str>,
    kind: Arc<str>,
    settings: std::sync::RwLock<Arc<Settings>>,
    pool: Pool,
    inner: Mutex<Inner>,
    keywords: mpsc::UnboundedSender<Pointer>,
    /// Held by the running start's keyword worker; the next start takes it again.
    keyword_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Pointer>>,
    seen: SeenBatch,
    /// While this replica holds the watcher's lease: the resource, the token its tasks
    /// carry, and the signal that makes the watcher step down.
    fence: Mutex<Option<(String, u64, StepDown)>>,
    /// Wakes a polling watcher's pause when a reload changed its interval, or when it was
    /// asked to search now (`nudged`).
    retuned: tokio::sync::Notify,
    /// Set by [`TaskSource::wake`]: the pause under way (or the next one) ends at once.
    nudged: std::sync::atomic::AtomicBool,
}

/// Stops the watcher when the process shuts down or when this replica loses the lease.
#[derive(Clone)]
struct StepDown {
    parent: runtime_contracts::Shutdown,
    fired: Arc<std::sync::atomic::AtomicBool>,
    wake: Arc<tokio::sync::Notify>,
}

impl StepDown {
    fn new(parent: runtime_contracts::Shutdown) -> Self {
        Self {
            parent,
            fired: Arc::default(),
            wake: Arc::default(),
        }
    }

    fn fire(&self) {
        self.fired.store(true, std::sync::atomic::Ordering::SeqCst);
        self.wake.notify_waiters();
    }
}

impl runtime_contracts::CancelSignal for StepDown {
    fn is_cancelled(&self) -> bool {
        self.fired.load(std::sync::atomic::Ordering::SeqCst) || self.parent.is_cancelled()
    }

    fn cancelled(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            loop {
                // Created before the check: a fire() in between still wakes it.
                let woken = self.wake.notified();
                if self.is_cancelled() {
                    return;
                }
                tokio::select! {
                    _ = woken => {}
                    _ = self.parent.cancelled() => return,
                }
            }
        })
    }
}

/// How long a stopping watcher waits to release its lease.
const RELEASE_WAIT: Duration = Duration::from_secs(2);

/// This process's name as a lease holder: host and process id.
fn holder_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".to_owned());
    format!("{host}-{}", std::process::id())
}

type SeenWaiter = (Pointer, oneshot::Sender<Result<(), String>>);

/// `\Seen` stores waiting to be sent: while one `UID STORE` is on the wire, the completions
/// that arrive meanwhile gather, and go out together as one UID set. Each completion is
/// answered only after its own store succeeded, so `\Seen` still follows the commit.
#[derive(Default)]
struct SeenBatch {
    /// Whether the flusher runs, and what waits for it.
    state: Mutex<(bool, Vec<SeenWaiter>)>,
    wake: tokio::sync::Notify,
}

impl std::fmt::Debug for ImapSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let settings = self.settings();
        f.debug_struct("ImapSource")
            .field("id", &self.id)
            .field("mode", &settings.mode)
            .field("config", &settings.config)
            .finish_non_exhaustive()
    }
}

fn jittered(base: Duration) -> Duration {
    let factor = 0.75 + fastrand::f64() * 0.5;
    base.mul_f64(factor)
}

impl ImapSource {
    /// A source reading `config`'s mailboxes; the password is read now (from the
    /// environment or the file) and never printed.
    pub fn new(id: impl Into<String>, config: ImapConfig, mode: ImapMode) -> Self {
        let id: String = id.into();
        let (keywords, keyword_rx) = mpsc::unbounded_channel();
        let settings = Settings::of(config, mode, 0);
        let inner = Inner {
            mailboxes: settings.config.mailboxes.iter().cloned().collect(),
            ..Inner::default()
        };
        Self {
            shared_id: id.as_str().into(),
            kind: settings.config.kind.as_str().into(),
            pool: Pool::new(settings.config.connections),
            settings: std::sync::RwLock::new(Arc::new(settings)),
            id,
            inner: Mutex::new(inner),
            keywords,
            keyword_rx: tokio::sync::Mutex::new(keyword_rx),
            seen: SeenBatch::default(),
            fence: Mutex::new(None),
            retuned: tokio::sync::Notify::new(),
            nudged: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Takes a reloaded section: a changed `poll_interval_ms` alone is swapped in and
    /// applies to the pause under way; changed mailboxes, credentials, OAuth2 settings or
    /// the server replace the settings (sessions logged in under the old ones are not used
    /// again) and ask for a restart; the pool, the kind, the connection count and the
    /// source's type stay as they are for the process.
    fn reconfigure_with(&self, section: &serde_json::Value) -> runtime_contracts::Reconfigure {
        use runtime_contracts::Reconfigure;
        let (kind, new) = match super::typed_section::<ImapConfig>(section) {
            Ok(read) => read,
            Err(e) => return Reconfigure::Refused(e),
        };
        let mode = match kind.as_str() {
            "imap_poll" => ImapMode::Poll,
            "imap_idle" => ImapMode::Idle,
            other => {
                return Reconfigure::Refused(format!(
                    "source {} cannot change its type to {other} while it runs",
                    self.id
                ))
            }
        };
        // Compared as the running settings are: with the provider's preset and the port's
        // default filled in.
        let new = new.resolved();
        let old = self.settings();
        let fixed = |c: &ImapConfig| (c.pool.clone(), c.kind.clone(), c.connections, c.replicas);
        if fixed(&new) != fixed(&old.config) {
            return Reconfigure::Refused(format!(
                "source {}: pool, kind, connections and replicas take effect after a process restart",
                self.id
            ));
        }
        let only_interval = mode == old.mode
            && ImapConfig {
                poll_interval_ms: old.config.poll_interval_ms,
                ..new.clone()
            } == old.config;
        let settings = Settings::of(new, mode, old.generation + u64::from(!only_interval));
        if let Err(e) = &settings.credentials {
            return Reconfigure::Refused(format!("source {}: {e}", self.id));
        }
        let only_interval = only_interval.then_some(settings.config.poll_interval_ms);
        let mailboxes = settings.config.mailboxes.clone();
        {
            let mut current = self.settings.write().unwrap_or_else(|e| e.into_inner());
            match only_interval {
                // The credentials (and their token cache) stay; only the interval is new.
                Some(ms) => {
                    let mut config = current.config.clone();
                    config.poll_interval_ms = ms;
                    *current = Arc::new(Settings {
                        config,
                        mode: current.mode,
                        account: current.account.clone(),
                        tls: current.tls.clone(),
                        credentials: current.credentials.clone(),
                        generation: current.generation,
                    });
                }
                None => *current = Arc::new(settings),
            }
        }
        if only_interval.is_some() {
            self.retuned.notify_waiters();
            return Reconfigure::Applied;
        }
        self.lock().mailboxes.extend(mailboxes);
        self.pool.clear();
        Reconfigure::Restart
    }

    /// Whether a pooled session may serve another command: its token is not due, and it
    /// logged in under the settings in force.
    fn reusable(&self, pooled: &Pooled) -> bool {
        pooled.current() && pooled.generation == self.settings().generation
    }

    /// The settings in force now.
    fn settings(&self) -> Arc<Settings> {
        Arc::clone(&self.settings.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn io(&self, message: impl Into<String>) -> SourceError {
        SourceError::Io {
            source_id: self.id.clone(),
            message: message.into(),
        }
    }

    fn task_id(&self, p: &Pointer) -> String {
        format!(
            "imap:{}:{}:{}:{}",
            self.id, p.mailbox, p.uid_validity, p.uid
        )
    }

    fn pointer_of(&self, task: &Task) -> Result<Pointer, SourceError> {
        let field = |k: &str| task.payload.get(k);
        let number = |k: &str| {
            field(k)
                .and_then(serde_json::Value::as_u64)
                .and_then(|n| u32::try_from(n).ok())
        };
        match (
            field("mailbox").and_then(serde_json::Value::as_str),
            number("uid_validity"),
            number("uid"),
        ) {
            (Some(mailbox), Some(uid_validity), Some(uid))
                if uid > 0 && self.lock().mailboxes.contains(mailbox) =>
            {
                Ok(Pointer {
                    mailbox: mailbox.to_owned(),
                    uid_validity,
                    uid,
                })
            }
            _ => Err(SourceError::InvalidPointer {
                source_id: self.id.clone(),
                message: format!(
                    "task {} does not point at a message of a configured mailbox",
                    task.id
                ),
            }),
        }
    }

    /// Logs a new connection in: the session, and when it should log in again (its token's
    /// renewal time; `None` for a password). A token the server refuses is replaced once
    /// (unless another connection already did) and tried again.
    async fn login(&self) -> Result<(ImapSession, Option<Instant>, u64), ConnectError> {
        let settings = self.settings();
        let generation = settings.generation;
        let (config, tls) = (&settings.config, settings.tls.as_ref());
        let credentials = settings
            .credentials
            .as_ref()
            .map_err(|e| ConnectError::Tls(e.clone()))?;
        self.lock().connects += 1;
        let (method, tokens) = match credentials {
            Login::Password(password) => {
                let session = connect(config, tls, Credential::Password(password)).await?;
                return Ok((session, None, generation));
            }
            Login::Token(method, tokens) => (*method, tokens),
        };
        let token = tokens.token().await?;
        let first = connect(
            config,
            tls,
            Credential::Token(method, token.secret.expose()),
        )
        .await;
        match first {
            Ok(session) => Ok((session, token.renew_at, generation)),
            Err(ConnectError::Login { message, .. }) => {
                tracing::info!(source = %self.id, server = %message, "the server refused the token; asking for a new one");
                let token = tokens.refused(&token).await?;
                self.lock().connects += 1;
                let session = connect(
                    config,
                    tls,
                    Credential::Token(method, token.secret.expose()),
                )
                .await?;
                Ok((session, token.renew_at, generation))
            }
            Err(e) => Err(e),
        }
    }

    /// The token provider's counts, for a source that logs in with OAuth2.
    pub fn token_stats(&self) -> Option<crate::oauth2::TokenStats> {
        match &self.settings().credentials {
            Ok(Login::Token(_, tokens)) => Some(tokens.stats()),
            _ => None,
        }
    }

    /// Logs the worker pool's sessions in, all at once, and with one mailbox selects it, so
    /// that the first batches start with a FETCH; a session that cannot log in (or select)
    /// is left for a worker's checkout to try again.
    async fn warm_pool(&self) {
        let settings = self.settings();
        let only_mailbox = match settings.config.mailboxes.as_slice() {
            [one] => Some(one.as_str()),
            _ => None,
        };
        let logins = (0..self.settings().config.connections).map(|_| async {
            let (idle, permit) = self.pool.checkout().await;
            let pooled = match idle {
                Some(pooled) => pooled,
                None => {
                    let Ok((mut session, retire_at, generation)) = self.login().await else {
                        return;
                    };
                    let mut selected = None;
                    if let Some(mailbox) = only_mailbox {
                        let Ok(mbox) = session.select(mailbox).await else {
                            return;
                        };
                        let (v, next) = (mbox.uid_validity.unwrap_or(0), mbox.uid_next);
                        selected = Some((mailbox.to_owned(), v, next.unwrap_or(u32::MAX)));
                    }
                    tracing::debug!(source = %self.id, "pooled session logged in");
                    Pooled {
                        session,
                        selected,
                        retire_at,
                        generation,
                    }
                }
            };
            self.pool.checkin(pooled, permit);
        });
        futures::future::join_all(logins).await;
    }

    // ---- the watcher: search, publish, wait --------------------------------------------

    async fn run(&self, ctx: SourceContext) -> Result<(), SourceError> {
        if let Err(e) = &self.settings().credentials {
            return Err(self.io(format!("cannot start: {e}")));
        }
        // Waits for an earlier start's keyword worker to let go (a restart).
        let mut keyword_rx = self.keyword_rx.lock().await;
        {
            let mut inner = self.lock();
            inner.watchers_down.clear();
            inner.caps = None;
        }
        tokio::join!(
            self.watch_leased(&ctx),
            self.keyword_worker(&mut keyword_rx, &ctx),
            self.seen_flusher(&ctx)
        );
        self.lock().progress.stopped();
        Ok(())
    }

    /// One watcher per mailbox across replicas: on a queue that hands out leases (Redis),
    /// this replica watches only while it holds the mailbox's lease, renewed every third
    /// of `lease_ttl_ms`; its tasks carry the lease's fencing token, so once another
    /// replica has taken the lease the queue refuses them. It steps down when a renewal
    /// finds the lease gone, when it could not renew before the lease would end (counted
    /// from when the last successful request was sent, less a fifth of the TTL: before any
    /// other replica can take it), or when a publish is fenced; a replica
    /// without the lease tries to take it every third of the TTL. Workers, `\Seen` and
    /// keywords run on every replica regardless.
    async fn watch_leased(&self, ctx: &SourceContext) {
        let leases = match ctx.queue.leases() {
            Some(leases) if self.settings().config.exclusive => leases,
            _ => return self.watch(ctx).await,
        };
        let resource = format!(
            "imap/{}@{}:{}/{}",
            self.settings().config.user,
            self.settings().config.host,
            self.settings().config.port,
            self.id
        );
        let owner = holder_name();
        let ttl = Duration::from_millis(self.settings().config.lease_ttl_ms);
        let every = ttl / 3;
        self.lock().progress.lease = Some(runtime_contracts::SourceLease {
            resource: resource.clone(),
            held: false,
            holder: None,
            token: None,
            held_for: None,
            acquired: 0,
            fenced_publishes: 0,
        });
        let lease_status = |f: &mut dyn FnMut(&mut runtime_contracts::SourceLease)| {
            if let Some(lease) = self.lock().progress.lease.as_mut() {
                f(lease);
            }
        };
        // The lease is ours until the TTL has passed since the request that took or renewed
        // it was *sent*: Redis starts its own TTL later, so this replica stops before any
        // other can take the lease. It stops a margin earlier still, for the time stopping
        // takes.
        let margin = ttl / 5;
        while !ctx.shutdown.is_cancelled() {
            let sent = Instant::now();
            match leases.acquire(&resource, &owner, ttl).await {
                Ok(Some(token)) => {
                    tracing::info!(source = %self.id, %resource, token, "took the mailbox's lease; watching");
                    self.lock().progress.lease_since = Some(Instant::now());
                    lease_status(&mut |l| {
                        l.held = true;
                        l.holder = Some(owner.clone());
                        l.token = Some(token);
                        l.acquired += 1;
                    });
                    let stop = StepDown::new(ctx.shutdown.clone());
                    *self.fence.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some((resource.clone(), token, stop.clone()));
                    let watching = SourceContext {
                        shutdown: Arc::new(stop.clone()),
                        ..ctx.clone()
                    };
                    let keep = async {
                        let mut stop_at = sent + ttl - margin;
                        loop {
                            let wait = every.min(stop_at.saturating_duration_since(Instant::now()));
                            tokio::select! {
                                _ = runtime_contracts::CancelSignal::cancelled(&stop) => break,
                                _ = tokio::time::sleep(wait) => {}
                            }
                            if Instant::now() >= stop_at {
                                tracing::warn!(source = %self.id, %resource, token, "could not renew the mailbox's lease before it ends; stepping down");
                                break;
                            }
                            let sent = Instant::now();
                            // A Redis that does not answer must not hold the renewals up.
                            let renewal = tokio::time::timeout(
                                stop_at.saturating_duration_since(sent),
                                leases.renew(&resource, &owner, token, ttl),
                            )
                            .await
                            .unwrap_or_else(|_| {
                                Err(runtime_contracts::QueueError::Unavailable(
                                    "lease renewal timed out".into(),
                                ))
                            });
                            match renewal {
                                Ok(true) => stop_at = sent + ttl - margin,
                                Ok(false) => {
                                    tracing::warn!(source = %self.id, %resource, token, "lost the mailbox's lease; stepping down");
                                    break;
                                }
                                // The lease may still be ours until `stop_at`.
                                Err(e) => {
                                    tracing::debug!(source = %self.id, error = %e, "lease renewal failed; trying again")
                                }
                            }
                        }
                        stop.fire();
                    };
                    tokio::join!(self.watch(&watching), keep);
                    *self.fence.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    self.lock().progress.lease_since = None;
                    lease_status(&mut |l| {
                        l.held = false;
                        // Who holds it now is known at the next attempt to take it.
                        l.holder = None;
                        l.token = None;
                    });
                    if ctx.shutdown.is_cancelled() {
                        // Bounded: an unreachable Redis must not hold the shutdown up; the
                        // lease then expires by itself.
                        let released = tokio::time::timeout(
                            RELEASE_WAIT,
                            leases.release(&resource, &owner, token),
                        )
                        .await;
                        if !matches!(released, Ok(Ok(()))) {
                            tracing::debug!(source = %self.id, "could not release the mailbox's lease; it expires");
                        }
                        return;
                    }
                }
                Ok(None) => {
                    if let Ok(holder) = leases.holder(&resource).await {
                        lease_status(&mut |l| {
                            l.holder = holder.as_ref().map(|h| h.owner.clone());
                            l.token = holder.as_ref().map(|h| h.token);
                        });
                    }
                    // A standby replica has nothing to watch: it is running.
                    self.lock().progress.progressed();
                }
                Err(e) => {
                    tracing::warn!(source = %self.id, error = %e, "could not take the mailbox's lease; trying again");
                    self.lock().progress.degraded(format!("lease: {e}"));
                }
            }
            tokio::select! {
                _ = ctx.shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }

    /// Watches the configured mailboxes: by polling, all of them on one connection; by
    /// IDLE, each on a connection of its own (a session IDLEs on one mailbox only).
    async fn watch(&self, ctx: &SourceContext) {
        let settings = self.settings();
        let mailboxes = &settings.config.mailboxes;
        match settings.mode {
            ImapMode::Idle if mailboxes.len() > 1 => {
                let watchers = mailboxes.iter().enumerate().map(|(n, mailbox)| {
                    self.watch_these(ctx, std::slice::from_ref(mailbox), n == 0)
                });
                futures::future::join_all(watchers).await;
            }
            _ => self.watch_these(ctx, mailboxes, true).await,
        }
    }

    /// A watcher reached its server (and searched: `progressed`); the source runs again
    /// once no other watcher is failing.
    fn watcher_up(&self, mailboxes: &[String], progressed: bool) {
        let mut inner = self.lock();
        inner.watchers_down.remove(&mailboxes.join(","));
        let still_down = inner.watchers_down.values().next().cloned();
        if progressed {
            inner.progress.progressed();
        } else {
            inner.progress.running();
        }
        if let Some(error) = still_down {
            inner.progress.degraded(error);
        }
    }

    /// A worker's command failed on its connection (a timeout, a lost connection, a refused
    /// login): the source is degraded with the reason until a worker's command succeeds, so
    /// a server that stops answering shows even while the watcher waits (the queue full of
    /// the very work that cannot be fetched).
    fn worker_down(&self, error: &str) {
        let mut inner = self.lock();
        let error = format!("the workers' connection: {error}");
        inner
            .watchers_down
            .insert(WORKERS.to_owned(), error.clone());
        inner.progress.degraded(error);
    }

    /// A worker's command succeeded.
    fn worker_up(&self) {
        let mut inner = self.lock();
        if inner.watchers_down.remove(WORKERS).is_some() {
            match inner.watchers_down.values().next().cloned() {
                Some(error) => inner.progress.degraded(error),
                None => inner.progress.running(),
            }
        }
    }

    /// A watcher's connection failed; it reconnects with backoff.
    fn watcher_down(&self, mailboxes: &[String], error: String) {
        let mut inner = self.lock();
        inner
            .watchers_down
            .insert(mailboxes.join(","), error.clone());
        inner.progress.degraded(error);
    }

    /// One watcher connection for `mailboxes`: logs in, searches and waits, and reconnects
    /// with backoff; `warm`: it also logs the workers' pool in, the first time.
    async fn watch_these(&self, ctx: &SourceContext, mailboxes: &[String], warm: bool) {
        let mut failures = 0u32;
        let mut warmed = !warm;
        while !ctx.shutdown.is_cancelled() {
            let error = match self.login().await {
                Ok((session, retire_at, _)) => {
                    tracing::debug!(source = %self.id, "watcher logged in");
                    failures = 0;
                    self.watcher_up(mailboxes, false);
                    // The first time the server takes the login, the workers' sessions log in
                    // while the watcher searches, not after the first tasks are published.
                    let warm = async {
                        if !std::mem::replace(&mut warmed, true) {
                            self.warm_pool().await;
                        }
                    };
                    let (looped, ()) =
                        tokio::join!(self.session_loop(session, retire_at, mailboxes, ctx), warm);
                    match looped {
                        Ok(Ended::Shutdown) => return,
                        // Its token is due for renewal: log in again, no failure.
                        Ok(Ended::Renew) => {
                            tracing::debug!(source = %self.id, "watcher logs in again with a renewed token");
                            continue;
                        }
                        Err(e) => e,
                    }
                }
                Err(e) => e.to_string(),
            };
            failures = failures.saturating_add(1);
            // Exponential backoff with jitter: 0.5 s, 1 s, 2 s ... up to max_backoff_ms.
            let base = Duration::from_millis(250u64 << failures.min(16))
                .min(Duration::from_millis(self.settings().config.max_backoff_ms));
            let pause = jittered(base);
            tracing::warn!(source = %self.id, error = %error, ?pause, "imap connection failed; reconnecting");
            self.watcher_down(mailboxes, error);
            self.pool.clear();
            tokio::select! {
                _ = ctx.shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Searches and waits on one logged-in session until shutdown, until the session's
    /// token is due for renewal (`retire_at`), or an error.
    async fn session_loop(
        &self,
        mut session: ImapSession,
        retire_at: Option<Instant>,
        mailboxes: &[String],
        ctx: &SourceContext,
    ) -> Result<Ended, String> {
        // Searches left before idling again (IDLE mode): mail is arriving.
        let mut follow_ups = 0;
        loop {
            if retire_at.is_some_and(|at| Instant::now() >= at) {
                let _ = tokio::time::timeout(RETIRE_WAIT, session.logout()).await;
                return Ok(Ended::Renew);
            }
            let mut found = 0;
            for mailbox in mailboxes {
                match self.search_and_publish(&mut session, mailbox, ctx).await? {
                    Some(fresh) => found += fresh,
                    None => {
                        let _ = session.logout().await;
                        return Ok(Ended::Shutdown);
                    }
                }
            }
            self.watcher_up(mailboxes, true);
            while session.unsolicited_responses.try_recv().is_ok() {}
            match self.settings().mode {
                // Mail is arriving: Dovecot sends the next IDLE notification only after
                // about half a second, so after a search that found new mail, search again
                // every 100 ms for as long as that delay instead of idling; a message that
                // arrives meanwhile waits 100 ms, not the notification's 500. Only searches
                // that find nothing for that long return to IDLE.
                ImapMode::Idle if found > 0 || follow_ups > 0 => {
                    follow_ups = if found > 0 {
                        IDLE_FOLLOW_UPS
                    } else {
                        follow_ups - 1
                    };
                    tokio::select! {
                        _ = ctx.shutdown.cancelled() => {
                            let _ = session.logout().await;
                            return Ok(Ended::Shutdown);
                        }
                        _ = tokio::time::sleep(IDLE_FOLLOW_UP) => {}
                    }
                }
                ImapMode::Poll => {
                    // A reload that changes the interval applies to this pause: it is
                    // measured again from when the pause began.
                    let began = Instant::now();
                    loop {
                        let retuned = self.retuned.notified();
                        if self.nudged.swap(false, std::sync::atomic::Ordering::SeqCst) {
                            break;
                        }
                        let pause = until_retire(
                            Duration::from_millis(self.settings().config.poll_interval_ms),
                            retire_at,
                        )
                        .saturating_sub(began.elapsed());
                        tokio::select! {
                            _ = ctx.shutdown.cancelled() => {
                                let _ = session.logout().await;
                                return Ok(Ended::Shutdown);
                            }
                            _ = tokio::time::sleep(pause) => break,
                            _ = retuned => {}
                        }
                    }
                    // A cheap check that the connection still answers.
                    session.noop().await.map_err(|e| format!("NOOP: {e}"))?;
                }
                ImapMode::Idle => {
                    // IDLE watches the first of its mailboxes (each watcher has one); with
                    // one mailbox it is still selected.
                    if let [first, _, ..] = mailboxes {
                        session
                            .select(first)
                            .await
                            .map_err(|e| format!("SELECT {first}: {e}"))?;
                    }
                    session = match self.idle(session, retire_at, ctx).await? {
                        Some(session) => session,
                        None => return Ok(Ended::Shutdown),
                    };
                }
            }
        }
    }

    /// One IDLE: returns the session after a wake-up, a re-issue or a dead connection
    /// check; `None` at shutdown.
    async fn idle(
        &self,
        session: ImapSession,
        retire_at: Option<Instant>,
        ctx: &SourceContext,
    ) -> Result<Option<ImapSession>, String> {
        let mut handle = session.idle();
        handle.init().await.map_err(|e| format!("IDLE: {e}"))?;
        let reissue = until_retire(
            Duration::from_secs(
                self.settings()
                    .config
                    .idle_reissue_secs
                    .min(self.settings().config.idle_check_secs),
            ),
            retire_at,
        );
        let limit = Duration::from_millis(self.settings().config.connect_timeout_ms);
        let dead_after = Duration::from_secs(self.settings().config.idle_dead_after_secs);
        let woke = {
            // The inner timeout restarts with every response the server sends (Dovecot says
            // "Still here" every two minutes); the outer one re-issues IDLE in time.
            let (wait, interrupt) = handle.wait_with_timeout(dead_after);
            tokio::select! {
                _ = ctx.shutdown.cancelled() => { drop(interrupt); None }
                r = connection::patiently(tokio::time::timeout(reissue, wait)) => Some(r),
            }
        };
        match woke {
            None => {
                if let Ok(mut session) = handle.done().await {
                    let _ = session.logout().await;
                }
                Ok(None)
            }
            Some(Ok(Ok(async_imap::extensions::idle::IdleResponse::Timeout))) => Err(format!(
                "the IDLE connection sent nothing for {} s; taken for dead",
                dead_after.as_secs()
            )),
            Some(Ok(Err(e))) => Err(format!("IDLE: {e}")),
            // New data, or time to re-issue: end IDLE, search again. A connection that does
            // not answer DONE in time is dead.
            Some(_) => match tokio::time::timeout(limit, handle.done()).await {
                Ok(done) => done.map(Some).map_err(|e| format!("DONE: {e}")),
                Err(_) => Err("the IDLE connection did not answer DONE; taken for dead".into()),
            },
        }
    }

    /// Searches one mailbox and publishes what is new: how many were new; `None` when
    /// shutdown came first.
    async fn search_and_publish(
        &self,
        session: &mut ImapSession,
        mailbox: &str,
        ctx: &SourceContext,
    ) -> Result<Option<usize>, String> {
        // Taken before SELECT: only a search that began after a completion can show that
        // completion's `\Seen`.
        let searched_at = Instant::now();
        let (uid_validity, _) = select(session, mailbox).await?;
        {
            let mut inner = self.lock();
            let previous = inner.validity.insert(mailbox.to_owned(), uid_validity);
            if previous.is_some_and(|v| v != uid_validity) {
                // Old pointers are dropped: they load as gone; the messages come back below
                // under their new UIDs.
                let prefix = format!("imap:{}:{mailbox}:", self.id);
                inner.progress.pending.retain(|id| !id.starts_with(&prefix));
                tracing::warn!(source = %self.id, mailbox, uid_validity, "UIDVALIDITY changed; searching the mailbox again");
            }
        }
        tracing::debug!(source = %self.id, mailbox, uid_validity, "mailbox selected");
        let settings = self.settings();
        let config = &settings.config;
        if config.on_success.folder().is_some() || config.on_failure.folder().is_some() {
            self.finish_filing(session, mailbox).await?;
        }
        let query = format!(
            "{} NOT KEYWORD {} NOT KEYWORD {}",
            config.search, config.failed_keyword, config.done_keyword
        );
        let uids: BTreeSet<u32> = session
            .uid_search(&query)
            .await
            .map_err(|e| format!("UID SEARCH {query}: {e}"))?
            .into_iter()
            .collect();
        let listed: Vec<(u32, String)> = uids
            .into_iter()
            .map(|uid| {
                let id = self.task_id(&Pointer {
                    mailbox: mailbox.to_owned(),
                    uid_validity,
                    uid,
                });
                (uid, id)
            })
            .collect();
        tracing::debug!(source = %self.id, mailbox, listed = listed.len(), "searched");
        let fresh: Vec<u32> = {
            let mut inner = self.lock();
            // A completed message is forgotten only once a search that began after its
            // completion no longer lists it: the server has shown its `\Seen`. Until then
            // it is never published again, however stale the server's answer (Dovecot can
            // list a message as unseen for a while after another connection stored `\Seen`).
            let prefix = format!("imap:{}:{mailbox}:", self.id);
            let still_listed: std::collections::HashSet<&str> =
                listed.iter().map(|(_, id)| id.as_str()).collect();
            inner.completed_at.retain(|id, at| {
                !id.starts_with(&prefix) || *at >= searched_at || still_listed.contains(id.as_str())
            });
            listed
                .iter()
                .filter(|(_, id)| {
                    !inner.progress.pending.contains(id) && !inner.completed_at.contains_key(id)
                })
                .map(|(uid, _)| *uid)
                .collect()
        };
        for uids in fresh.chunks(self.settings().config.batch_size) {
            // Sizes of the whole chunk in one command: the pointer carries the size, so a
            // worker can refuse an oversized message before downloading it.
            let set = uid_set(uids);
            let sizes: HashMap<u32, u32> = read_fetches(
                session
                    .uid_fetch(&set, "RFC822.SIZE")
                    .await
                    .map_err(|e| format!("UID FETCH {set} RFC822.SIZE: {e}"))?,
                |f| Some((f.uid?, f.size?)),
            )
            .await
            .map_err(|e| format!("UID FETCH {set} RFC822.SIZE: {e}"))?
            .into_iter()
            .collect();
            let mut chunk = Vec::with_capacity(uids.len());
            let mut traces = Vec::with_capacity(uids.len());
            let trigger = match self.settings().mode {
                ImapMode::Poll => "poll",
                ImapMode::Idle => "idle",
            };
            for &uid in uids {
                let Some(size) = sizes.get(&uid) else {
                    continue; // expunged since the search
                };
                let pointer = Pointer {
                    mailbox: mailbox.to_owned(),
                    uid_validity,
                    uid,
                };
                let mut task = self.task_for(&pointer, *size)?;
                let id = task.id.to_string();
                traces.push(ctx.tracer.start_trace(&mut task, trigger, &*ctx.queue));
                chunk.push((id, task));
            }
            let published = self.publish(ctx, &mut chunk).await?;
            drop(traces);
            if !published {
                return Ok(None);
            }
        }
        Ok(Some(fresh.len()))
    }

    /// The pointer task of a message.
    fn task_for(&self, pointer: &Pointer, size: u32) -> Result<Task, String> {
        let payload = serde_json::json!({
            "account": self.settings().account,
            "mailbox": pointer.mailbox,
            "uid_validity": pointer.uid_validity,
            "uid": pointer.uid,
            "size": size,
        });
        Task::new(
            self.task_id(pointer),
            Arc::clone(&self.kind),
            Arc::clone(&self.shared_id),
            payload,
        )
        // A new-mail notification (a Dovecot push) may arrive after the search's task is
        // done: the id stays known a while, so the notification makes no second task.
        .map(|task| task.keep_id_after_ack_for(KEEP_AFTER_ACK))
        .map_err(|e| e.to_string())
    }

    /// [`TaskSource::unsettled`] on one session: each mailbox searched for unseen
    /// messages not marked failed whose INTERNALDATE is at least `older_than` ago
    /// (`OLDER`, RFC 5032).
    async fn unsettled_in(
        &self,
        pooled: &mut Pooled,
        older_than: Duration,
        max: usize,
    ) -> Result<Vec<Task>, String> {
        let mut tasks = Vec::new();
        for mailbox in &self.settings().config.mailboxes {
            let (uid_validity, uid_next) = select(&mut pooled.session, mailbox).await?;
            pooled.selected = Some((mailbox.clone(), uid_validity, uid_next));
            let query = format!(
                "{} NOT KEYWORD {} OLDER {}",
                self.settings().config.search,
                self.settings().config.failed_keyword,
                older_than.as_secs().max(1)
            );
            let uids: BTreeSet<u32> = pooled
                .session
                .uid_search(&query)
                .await
                .map_err(|e| format!("UID SEARCH {query}: {e}"))?
                .into_iter()
                .collect();
            let uids: Vec<u32> = uids.into_iter().take(max - tasks.len()).collect();
            for chunk in uids.chunks(self.settings().config.batch_size) {
                let set = uid_set(chunk);
                let sizes: Vec<(u32, u32)> = read_fetches(
                    pooled
                        .session
                        .uid_fetch(&set, "RFC822.SIZE")
                        .await
                        .map_err(|e| format!("UID FETCH {set} RFC822.SIZE: {e}"))?,
                    |f| Some((f.uid?, f.size?)),
                )
                .await
                .map_err(|e| format!("UID FETCH {set} RFC822.SIZE: {e}"))?;
                for (uid, size) in sizes {
                    let pointer = Pointer {
                        mailbox: mailbox.clone(),
                        uid_validity,
                        uid,
                    };
                    tasks.push(self.task_for(&pointer, size)?);
                }
            }
            if tasks.len() >= max {
                break;
            }
        }
        Ok(tasks)
    }

    async fn publish(
        &self,
        ctx: &SourceContext,
        chunk: &mut Vec<(String, Task)>,
    ) -> Result<bool, String> {
        let fence = self
            .fence
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(resource, token, stop)| (format!("{token} {resource}"), stop.clone()));
        if let Some((value, _)) = &fence {
            for (_, task) in chunk.iter_mut() {
                task.headers
                    .insert(Task::FENCE_HEADER.to_owned(), value.clone());
            }
        }
        match super::publish_reserved(ctx, chunk, |f| f(&mut self.lock().progress)).await {
            Ok(published) => Ok(published),
            Err(e @ runtime_contracts::QueueError::Fenced { .. }) => {
                tracing::warn!(source = %self.id, error = %e, "the queue refused this replica's publish: another replica holds the mailbox's lease; stepping down");
                if let Some(lease) = self.lock().progress.lease.as_mut() {
                    lease.fenced_publishes += 1;
                }
                if let Some((_, stop)) = fence {
                    stop.fire();
                }
                Err(format!("publishing refused, messages left unseen: {e}"))
            }
            Err(e) => Err(format!("publishing failed, messages left unseen: {e}")),
        }
    }

    // ---- worker connections: fetch and flag ---------------------------------------------

    /// A pooled session with `pointer`'s mailbox selected and in view up to UID
    /// `max_uid`; `None` when the mailbox's UIDVALIDITY is no longer the pointer's (the
    /// session goes back to the pool).
    async fn checkout(
        &self,
        pointer: &Pointer,
        max_uid: u32,
    ) -> Result<Option<(Pooled, OwnedSemaphorePermit)>, SourceError> {
        let (pooled, permit) = self.pool.checkout().await;
        let mut pooled = match pooled.filter(|p| self.reusable(p)) {
            Some(p) => p,
            None => self.fresh_pooled().await?,
        };
        // The cached selection is trusted only when it is the pointer's mailbox and
        // UIDVALIDITY and already holds the UIDs asked for; otherwise the mailbox is
        // selected again (it may have been recreated, or mail may have arrived since).
        let current = pooled
            .selected
            .as_ref()
            .filter(|(m, v, next)| {
                *m == pointer.mailbox && *v == pointer.uid_validity && max_uid < *next
            })
            .map(|(_, v, _)| *v);
        let validity = match current {
            Some(v) => v,
            None => {
                let selected = pooled.session.select(&pointer.mailbox).await.map_err(|e| {
                    let e = format!("SELECT {}: {e}", pointer.mailbox);
                    self.worker_down(&e);
                    self.io(e)
                })?;
                let v = selected.uid_validity.unwrap_or(0);
                let next = selected.uid_next.unwrap_or(u32::MAX);
                pooled.selected = Some((pointer.mailbox.clone(), v, next));
                v
            }
        };
        if validity != pointer.uid_validity {
            self.pool.checkin(pooled, permit);
            return Ok(None);
        }
        Ok(Some((pooled, permit)))
    }

    /// A newly logged-in worker session.
    async fn fresh_pooled(&self) -> Result<Pooled, SourceError> {
        let (session, retire_at, generation) = self.login().await.map_err(|e| {
            self.worker_down(&e.to_string());
            self.io(e.to_string())
        })?;
        Ok(Pooled {
            session,
            selected: None,
            retire_at,
            generation,
        })
    }

    /// Puts a session back after a successful command; a failed one is dropped (the next
    /// checkout connects anew).
    fn checkin<T>(
        &self,
        pooled: Pooled,
        permit: OwnedSemaphorePermit,
        result: Result<T, String>,
    ) -> Result<T, SourceError> {
        while pooled.session.unsolicited_responses.try_recv().is_ok() {}
        match result {
            Ok(value) => {
                self.pool.checkin(pooled, permit);
                self.worker_up();
                Ok(value)
            }
            Err(e) => {
                self.worker_down(&e);
                Err(self.io(e))
            }
        }
    }

    /// Settles messages whose outcomes are committed, as `on_success` says: `\Seen`; or
    /// `\Seen` with the done keyword, then the move (the keyword lets the next pass finish
    /// a move cut short).
    async fn settle_set(&self, pointer: &Pointer, uids: &[u32]) -> Result<(), SourceError> {
        let settings = self.settings();
        let Some(folder) = settings.config.on_success.folder() else {
            return self
                .store_set(pointer, uids, "+FLAGS.SILENT (\\Seen)")
                .await;
        };
        let flags = format!("+FLAGS.SILENT (\\Seen {})", settings.config.done_keyword);
        let _filing = FilingNow::new(self, &pointer.mailbox, uids);
        self.store_set(pointer, uids, &flags).await?;
        self.fault("imap.before_move")?;
        self.move_set(pointer, uids, folder).await
    }

    /// A named fault point (only in a `failpoints` build) as this source's error.
    fn fault(&self, name: &str) -> Result<(), SourceError> {
        crate::queue::fault(name).map_err(|e| self.io(e.to_string()))
    }

    /// Moves messages of `pointer`'s mailbox (and UIDVALIDITY) into `folder` on a pooled
    /// session.
    async fn move_set(
        &self,
        pointer: &Pointer,
        uids: &[u32],
        folder: &str,
    ) -> Result<(), SourceError> {
        self.on_selected(pointer, uids, Step::File(folder)).await
    }

    /// What the server offers for filing, asked once per start.
    async fn caps(&self, session: &mut ImapSession) -> Result<Caps, String> {
        if let Some(caps) = self.lock().caps {
            return Ok(caps);
        }
        let offered = session
            .capabilities()
            .await
            .map_err(|e| format!("CAPABILITY: {e}"))?;
        let caps = Caps {
            moves: offered.has_str("MOVE"),
            uidplus: offered.has_str("UIDPLUS"),
        };
        tracing::debug!(source = %self.id, ?caps, "server capabilities for filing");
        self.lock().caps = Some(caps);
        Ok(caps)
    }

    /// Moves `uids` of the selected mailbox into `folder`, creating it when missing:
    /// `UID MOVE` where the server has it; else `UID COPY`, `\Deleted`, then `UID EXPUNGE`
    /// of those UIDs (plain `EXPUNGE` without UIDPLUS). UIDs no longer there are skipped
    /// by the server. A crash after the copy leaves the message flagged in place, and the
    /// next pass files it again (a second copy in the folder, never a second order).
    async fn file_into(
        &self,
        session: &mut ImapSession,
        uids: &[u32],
        folder: &str,
    ) -> Result<(), String> {
        if uids.is_empty() {
            return Ok(());
        }
        let caps = self.caps(session).await?;
        let set = uid_set(uids);
        let mut created = false;
        loop {
            let moved = if caps.moves {
                session.uid_mv(&set, folder).await
            } else {
                session.uid_copy(&set, folder).await
            };
            match moved {
                Ok(()) => break,
                // The folder is missing (Dovecot: NO [TRYCREATE]): create it, once.
                Err(async_imap::error::Error::No(why)) if !created => {
                    tracing::info!(source = %self.id, folder, server = %why, "creating the folder to file mail into");
                    if let Err(e) = session.create(folder).await {
                        tracing::debug!(source = %self.id, folder, error = %e, "CREATE (it may exist)");
                    }
                    created = true;
                }
                Err(e) => {
                    let verb = if caps.moves { "MOVE" } else { "COPY" };
                    return Err(format!("UID {verb} {set} {folder}: {e}"));
                }
            }
        }
        if caps.moves {
            return Ok(());
        }
        self.fault("imap.after_copy").map_err(|e| e.to_string())?;
        let deleted = session
            .uid_store(&set, "+FLAGS.SILENT (\\Deleted)")
            .await
            .map_err(|e| format!("UID STORE {set} \\Deleted: {e}"))?;
        read_fetches(deleted, |_| None::<()>)
            .await
            .map_err(|e| format!("UID STORE {set} \\Deleted: {e}"))?;
        self.fault("imap.after_delete").map_err(|e| e.to_string())?;
        self.expunge(session, &set, caps).await
    }

    /// Expunges `set` (`UID EXPUNGE`; plain `EXPUNGE` without UIDPLUS).
    async fn expunge(
        &self,
        session: &mut ImapSession,
        set: &str,
        caps: Caps,
    ) -> Result<(), String> {
        use futures::TryStreamExt;
        if caps.uidplus {
            let gone = session
                .uid_expunge(set)
                .await
                .map_err(|e| format!("UID EXPUNGE {set}: {e}"))?;
            gone.try_collect::<Vec<_>>()
                .await
                .map_err(|e| format!("UID EXPUNGE {set}: {e}"))?;
        } else {
            let gone = session
                .expunge()
                .await
                .map_err(|e| format!("EXPUNGE: {e}"))?;
            gone.try_collect::<Vec<_>>()
                .await
                .map_err(|e| format!("EXPUNGE: {e}"))?;
        }
        Ok(())
    }

    /// Finishes filing cut short in the selected `mailbox`: messages that carry the done
    /// (or failure) keyword are settled, and are moved where `on_success` (or
    /// `on_failure`) says; a copy already flagged `\Deleted` is only expunged.
    async fn finish_filing(&self, session: &mut ImapSession, mailbox: &str) -> Result<(), String> {
        let settings = self.settings();
        let config = &settings.config;
        for (keyword, filing) in [
            (&config.done_keyword, &config.on_success),
            (&config.failed_keyword, &config.on_failure),
        ] {
            let Some(folder) = filing.folder() else {
                continue;
            };
            let copied = self
                .settled_uids(session, mailbox, &format!("KEYWORD {keyword} DELETED"))
                .await?;
            if !copied.is_empty() {
                let caps = self.caps(session).await?;
                self.expunge(session, &uid_set(&copied), caps).await?;
            }
            let left = self
                .settled_uids(session, mailbox, &format!("KEYWORD {keyword} UNDELETED"))
                .await?;
            if !left.is_empty() {
                tracing::info!(source = %self.id, folder, messages = left.len(), "filing settled mail whose move was cut short");
                self.file_into(session, &left, folder).await?;
            }
        }
        Ok(())
    }

    /// The UIDs `query` finds in the selected `mailbox`, ascending, without those a worker
    /// is filing now.
    async fn settled_uids(
        &self,
        session: &mut ImapSession,
        mailbox: &str,
        query: &str,
    ) -> Result<Vec<u32>, String> {
        let mut uids: Vec<u32> = session
            .uid_search(query)
            .await
            .map_err(|e| format!("UID SEARCH {query}: {e}"))?
            .into_iter()
            .filter(|&uid| !self.being_filed(mailbox, uid))
            .collect();
        uids.sort_unstable();
        Ok(uids)
    }

    /// Whether a worker is filing this message now.
    fn being_filed(&self, mailbox: &str, uid: u32) -> bool {
        self.lock().filing.contains(&(mailbox.to_owned(), uid))
    }

    /// `UID STORE` on ascending UIDs of `pointer`'s mailbox (and UIDVALIDITY).
    async fn store_set(
        &self,
        pointer: &Pointer,
        uids: &[u32],
        flags: &str,
    ) -> Result<(), SourceError> {
        self.on_selected(pointer, uids, Step::Store(flags)).await
    }

    /// Runs `step` on a pooled session with `pointer`'s mailbox selected, for `uids`;
    /// nothing when its UIDVALIDITY changed (the UIDs mean nothing any more).
    async fn on_selected(
        &self,
        pointer: &Pointer,
        uids: &[u32],
        step: Step<'_>,
    ) -> Result<(), SourceError> {
        let max_uid = uids.iter().copied().max().unwrap_or(pointer.uid);
        let Some((mut pooled, permit)) = self.checkout(pointer, max_uid).await? else {
            return Ok(());
        };
        let session = &mut pooled.session;
        let result = match step {
            Step::Store(flags) => {
                let uid = uid_set(uids);
                match session.uid_store(&uid, flags).await {
                    Ok(responses) => read_fetches(responses, |_| None::<()>)
                        .await
                        .map(|_| ())
                        .map_err(|e| format!("UID STORE {uid} {flags}: {e}")),
                    Err(e) => Err(format!("UID STORE {uid} {flags}: {e}")),
                }
            }
            Step::File(folder) => self.file_into(session, uids, folder).await,
        };
        self.checkin(pooled, permit, result)
    }

    async fn fetch(
        &self,
        pointer: &Pointer,
        known_size: Option<u64>,
    ) -> Result<Fetched, SourceError> {
        let max = self.settings().config.max_message_bytes;
        if let Some(size) = known_size.filter(|s| *s > max) {
            return Ok(Fetched::TooLarge(size));
        }
        let Some((mut pooled, permit)) = self.checkout(pointer, pointer.uid).await? else {
            return Ok(Fetched::Stale);
        };
        let uid = pointer.uid.to_string();
        let session = &mut pooled.session;
        let result = async {
            if known_size.is_some() {
                return fetch_body(session, &uid, max).await;
            }
            let sizes = read_fetches(
                session
                    .uid_fetch(&uid, "RFC822.SIZE")
                    .await
                    .map_err(|e| format!("UID FETCH {uid} RFC822.SIZE: {e}"))?,
                |f| f.size,
            )
            .await
            .map_err(|e| format!("UID FETCH {uid} RFC822.SIZE: {e}"))?;
            let Some(&size) = sizes.first() else {
                return Ok(Fetched::Gone);
            };
            if u64::from(size) > max {
                return Ok(Fetched::TooLarge(u64::from(size)));
            }
            fetch_body(session, &uid, max).await
        }
        .await;
        self.checkin(pooled, permit, result)
    }

    /// Sends gathered `\Seen` stores, one `UID STORE` per mailbox and round.
    async fn seen_flusher(&self, ctx: &SourceContext) {
        self.seen.state.lock().unwrap_or_else(|e| e.into_inner()).0 = true;
        loop {
            tokio::select! {
                _ = ctx.shutdown.cancelled() => break,
                _ = self.seen.wake.notified() => {}
            }
            let waiting =
                std::mem::take(&mut self.seen.state.lock().unwrap_or_else(|e| e.into_inner()).1);
            self.flush_seen(waiting).await;
        }
        // From now on completions store directly; answer what is already here.
        let waiting = {
            let mut state = self.seen.state.lock().unwrap_or_else(|e| e.into_inner());
            state.0 = false;
            std::mem::take(&mut state.1)
        };
        self.flush_seen(waiting).await;
    }

    async fn flush_seen(&self, waiting: Vec<SeenWaiter>) {
        let mut groups: HashMap<(String, u32), Vec<SeenWaiter>> = HashMap::new();
        for waiter in waiting {
            groups
                .entry((waiter.0.mailbox.clone(), waiter.0.uid_validity))
                .or_default()
                .push(waiter);
        }
        for (_, mut group) in groups {
            group.sort_by_key(|(p, _)| p.uid);
            let uids: Vec<u32> = group.iter().map(|(p, _)| p.uid).collect();
            let result = self
                .settle_set(&group[0].0, &uids)
                .await
                .map_err(|e| e.to_string());
            for (_, answer) in group {
                let _ = answer.send(result.clone());
            }
        }
    }

    /// Sets `\Seen` on several messages: queued for the flusher together (one `UID STORE`
    /// per mailbox), else stored directly, one set per mailbox. One result per pointer.
    async fn mark_seen_all(&self, pointers: &[Pointer]) -> Vec<Result<(), SourceError>> {
        let mut answers = Vec::with_capacity(pointers.len());
        let queued = {
            let mut state = self.seen.state.lock().unwrap_or_else(|e| e.into_inner());
            if state.0 {
                for pointer in pointers {
                    let (tx, rx) = oneshot::channel();
                    state.1.push((pointer.clone(), tx));
                    answers.push(rx);
                }
            }
            state.0
        };
        if !queued {
            let mut results = Vec::with_capacity(pointers.len());
            for (pointer, uids) in group_by_mailbox(pointers) {
                let result = self
                    .settle_set(&pointer, &uids)
                    .await
                    .map_err(|e| e.to_string());
                results.push(((pointer.mailbox, pointer.uid_validity), result));
            }
            return pointers
                .iter()
                .map(|p| {
                    results
                        .iter()
                        .find(|(k, _)| k.0 == p.mailbox && k.1 == p.uid_validity)
                        .map_or(Ok(()), |(_, r)| r.clone().map_err(|e| self.io(e)))
                })
                .collect();
        }
        self.seen.wake.notify_one();
        let mut out = Vec::with_capacity(pointers.len());
        for (pointer, answer) in pointers.iter().zip(answers) {
            out.push(match answer.await {
                Ok(result) => result.map_err(|e| self.io(e)),
                Err(_) => self.settle_set(pointer, &[pointer.uid]).await,
            });
        }
        out
    }

    /// Reads several messages with one `UID FETCH … BODY.PEEK[]` per mailbox and up to
    /// [`FETCH_CHUNK_BYTES`] of declared sizes: one result per pointer, in order.
    async fn fetch_batch(
        &self,
        pointers: &[(Pointer, Option<u64>)],
    ) -> Vec<Result<Fetched, SourceError>> {
        let max = self.settings().config.max_message_bytes;
        let mut out: Vec<Option<Result<Fetched, SourceError>>> =
            (0..pointers.len()).map(|_| None).collect();
        // Chunks of one mailbox and UIDVALIDITY whose declared sizes fit one command.
        let mut chunks: Vec<FetchChunk> = Vec::new();
        for (i, (pointer, size)) in pointers.iter().enumerate() {
            match size {
                Some(size) if *size > max => out[i] = Some(Ok(Fetched::TooLarge(*size))),
                // A pointer without a size (an older task): fetched alone, size first.
                None => out[i] = Some(self.fetch(pointer, None).await),
                Some(size) => {
                    let chunk = chunks.iter_mut().find(|(p, members, bytes)| {
                        p.mailbox == pointer.mailbox
                            && p.uid_validity == pointer.uid_validity
                            && (members.is_empty() || bytes + size <= FETCH_CHUNK_BYTES)
                    });
                    match chunk {
                        Some((_, members, bytes)) => {
                            members.push((i, pointer.uid));
                            *bytes += size;
                        }
                        None => chunks.push((pointer.clone(), vec![(i, pointer.uid)], *size)),
                    }
                }
            }
        }
        for (pointer, members, _) in chunks {
            let mut uids: Vec<u32> = members.iter().map(|(_, uid)| *uid).collect();
            uids.sort_unstable();
            uids.dedup();
            match self.fetch_set(&pointer, &uids).await {
                Ok(None) => {
                    for (i, _) in members {
                        out[i] = Some(Ok(Fetched::Stale));
                    }
                }
                Ok(Some(mut bodies)) => {
                    for (j, &(i, uid)) in members.iter().enumerate() {
                        // A UID asked for twice gets its body twice.
                        let again = members[j + 1..].iter().any(|(_, u)| *u == uid);
                        let body = if again {
                            bodies.get(&uid).cloned()
                        } else {
                            bodies.remove(&uid)
                        };
                        out[i] = Some(Ok(body.map_or(Fetched::Gone, |b| bounded(b, max))));
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    for (i, _) in members {
                        out[i] = Some(Err(self.io(message.clone())));
                    }
                }
            }
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(self.io("not fetched"))))
            .collect()
    }

    /// `UID FETCH set BODY.PEEK[]` on one pooled session: UID → body; `None` when the
    /// mailbox's UIDVALIDITY is no longer the pointer's.
    async fn fetch_set(
        &self,
        pointer: &Pointer,
        uids: &[u32],
    ) -> Result<Option<HashMap<u32, Vec<u8>>>, SourceError> {
        let max_uid = uids.iter().copied().max().unwrap_or(pointer.uid);
        let Some((mut pooled, permit)) = self.checkout(pointer, max_uid).await? else {
            return Ok(None);
        };
        let set = uid_set(uids);
        let query = body_query(self.settings().config.max_message_bytes);
        let result = async {
            let stream = pooled
                .session
                .uid_fetch(&set, &query)
                .await
                .map_err(|e| format!("UID FETCH {set} {query}: {e}"))?;
            read_fetches(stream, |f| Some((f.uid?, f.body()?.to_vec())))
                .await
                .map(|bodies| bodies.into_iter().collect::<HashMap<_, _>>())
                .map_err(|e| format!("UID FETCH {set} {query}: {e}"))
        }
        .await;
        self.checkin(pooled, permit, result).map(Some)
    }

    /// Sets `\Seen` on one message: through the flusher while it runs, else directly.
    async fn mark_seen(&self, pointer: Pointer) -> Result<(), SourceError> {
        let (tx, rx) = oneshot::channel();
        let queued = {
            let mut state = self.seen.state.lock().unwrap_or_else(|e| e.into_inner());
            if state.0 {
                state.1.push((pointer.clone(), tx));
            }
            state.0
        };
        if !queued {
            return self.settle_set(&pointer, &[pointer.uid]).await;
        }
        self.seen.wake.notify_one();
        match rx.await {
            Ok(result) => result.map_err(|e| self.io(e)),
            Err(_) => self.settle_set(&pointer, &[pointer.uid]).await,
        }
    }

    /// Sets the failure keyword on dead-lettered messages, off the worker's path: one
    /// `UID STORE` per mailbox for what has arrived. What could not be stored (the server
    /// is down) is tried again with a growing pause until it is stored or the source stops;
    /// the runtime hands every dead letter over again at its next start, so a keyword lost
    /// with the process is set then.
    async fn keyword_worker(&self, rx: &mut mpsc::UnboundedReceiver<Pointer>, ctx: &SourceContext) {
        let flags = format!("+FLAGS.SILENT ({})", self.settings().config.failed_keyword);
        let mut waiting: Vec<Pointer> = Vec::new();
        let mut pause = KEYWORD_RETRY_FIRST;
        loop {
            let retry = !waiting.is_empty();
            tokio::select! {
                _ = ctx.shutdown.cancelled() => break,
                p = rx.recv() => match p {
                    Some(p) => waiting.push(p),
                    None => break,
                },
                _ = tokio::time::sleep(pause), if retry => {}
            }
            while let Ok(p) = rx.try_recv() {
                waiting.push(p);
            }
            let before = waiting.len();
            waiting = self.store_keywords(waiting, &flags).await;
            if waiting.is_empty() {
                pause = KEYWORD_RETRY_FIRST;
            } else if waiting.len() == before && retry {
                pause = (pause * 2).min(KEYWORD_RETRY_MAX);
            }
        }
        // At shutdown, flag what is already here, once, without waiting for more.
        while let Ok(p) = rx.try_recv() {
            waiting.push(p);
        }
        let left = self.store_keywords(waiting, &flags).await;
        if !left.is_empty() {
            tracing::warn!(source = %self.id, messages = left.len(),
                "stopping with failure keywords not set; they are set at the next start");
        }
    }

    /// Stores `flags` on `pointers`, a mailbox at a time; returns the ones not stored.
    async fn store_keywords(&self, pointers: Vec<Pointer>, flags: &str) -> Vec<Pointer> {
        let mut left = Vec::new();
        for (pointer, uids) in group_by_mailbox(&pointers) {
            for chunk in uids.chunks(KEYWORD_CHUNK) {
                let settled = async {
                    let _filing = self
                        .settings()
                        .config
                        .on_failure
                        .folder()
                        .map(|_| FilingNow::new(self, &pointer.mailbox, chunk));
                    self.store_set(&pointer, chunk, flags).await?;
                    match self.settings().config.on_failure.folder() {
                        Some(folder) => {
                            self.fault("imap.before_failed_move")?;
                            self.move_set(&pointer, chunk, folder).await
                        }
                        None => Ok(()),
                    }
                };
                if let Err(e) = settled.await {
                    tracing::error!(source = %self.id, mailbox = %pointer.mailbox, messages = chunk.len(),
                        error = %e, "could not set the failure keyword; trying again");
                    left.extend(chunk.iter().map(|&uid| Pointer {
                        uid,
                        ..pointer.clone()
                    }));
                }
            }
        }
        left
    }
}

/// The first pause before a failure keyword is stored again, and the longest.
const KEYWORD_RETRY_FIRST: Duration = Duration::from_millis(500);
const KEYWORD_RETRY_MAX: Duration = Duration::from_secs(30);
/// How long [`TaskSource::reachable`] waits for a session, and for its `NOOP`.
const REACHABLE_WITHIN: Duration = Duration::from_secs(2);
/// UIDs per `UID STORE` of failure keywords.
const KEYWORD_CHUNK: usize = 500;

impl ImapSource {
    /// The pointers of a batch's tasks with their places in it, and the answers so far:
    /// a task that is no pointer of this source already has its error at its place.
    #[allow(clippy::type_complexity)]
    fn pointers_of<T>(
        &self,
        tasks: &[Arc<Task>],
    ) -> (
        Vec<usize>,
        Vec<Pointer>,
        Vec<Option<Result<T, SourceError>>>,
    ) {
        let mut out: Vec<Option<Result<T, SourceError>>> = (0..tasks.len()).map(|_| None).collect();
        let (mut index, mut pointers) = (Vec::new(), Vec::new());
        for (i, task) in tasks.iter().enumerate() {
            match self.pointer_of(task) {
                Ok(pointer) => {
                    index.push(i);
                    pointers.push(pointer);
                }
                Err(e) => out[i] = Some(Err(e)),
            }
        }
        (index, pointers, out)
    }

    /// What a fetch means for `load_content`: the bytes, `None` when expunged, gone with
    /// its reason when the UIDVALIDITY changed, or too large.
    fn content(&self, fetched: Fetched) -> Result<Option<Vec<u8>>, SourceError> {
        match fetched {
            Fetched::Gone => Ok(None),
            Fetched::Stale => Err(SourceError::Gone {
                source_id: self.id.clone(),
                reason: GoneReason::UidValidityChanged,
            }),
            Fetched::Body(bytes) => Ok(Some(bytes)),
            Fetched::TooLarge(size) => Err(SourceError::TooLarge {
                source_id: self.id.clone(),
                size,
                limit: self.settings().config.max_message_bytes,
            }),
        }
    }

    /// One answer per task, in order (a place left empty is an error, never a gap).
    fn answers<T>(&self, out: Vec<Option<Result<T, SourceError>>>) -> Vec<Result<T, SourceError>> {
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(self.io("no answer for this task"))))
            .collect()
    }
}

impl TaskSource for ImapSource {
    fn id(&self) -> &str {
        &self.id
    }

    fn start(&self, ctx: SourceContext) -> BoxFuture<'_, Result<(), SourceError>> {
        Box::pin(self.run(ctx))
    }

    /// A polling watcher searches now (an IDLE watcher hears of new mail by itself).
    fn wake(&self) {
        self.nudged.store(true, std::sync::atomic::Ordering::SeqCst);
        self.retuned.notify_waiters();
    }

    fn reconfigure(&self, section: &serde_json::Value) -> runtime_contracts::Reconfigure {
        self.reconfigure_with(section)
    }

    fn status(&self) -> SourceStatus {
        self.lock().progress.status()
    }

    fn load_content<'a>(
        &'a self,
        task: &'a Task,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, SourceError>> {
        Box::pin(async move {
            let pointer = self.pointer_of(task)?;
            let known_size = task.payload.get("size").and_then(serde_json::Value::as_u64);
            self.content(self.fetch(&pointer, known_size).await?)
        })
    }

    fn complete<'a>(&'a self, task: &'a Task) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            let pointer = self.pointer_of(task)?;
            // After a UIDVALIDITY change the old UID means nothing: nothing to flag.
            self.mark_seen(pointer).await?;
            // One lock: the watcher never sees the task neither pending nor completed.
            let mut inner = self.lock();
            inner.progress.completed(task.id.as_str());
            inner
                .completed_at
                .insert(task.id.to_string(), Instant::now());
            Ok(())
        })
    }

    fn load_batch<'a>(
        &'a self,
        tasks: &'a [Arc<Task>],
    ) -> BoxFuture<'a, Vec<Result<Option<Vec<u8>>, SourceError>>> {
        Box::pin(async move {
            let (index, pointers, mut out) = self.pointers_of(tasks);
            let wanted: Vec<(Pointer, Option<u64>)> = index
                .iter()
                .zip(pointers)
                .map(|(&i, p)| {
                    let size = tasks[i]
                        .payload
                        .get("size")
                        .and_then(serde_json::Value::as_u64);
                    (p, size)
                })
                .collect();
            for (i, fetched) in index.into_iter().zip(self.fetch_batch(&wanted).await) {
                out[i] = Some(fetched.and_then(|f| self.content(f)));
            }
            self.answers(out)
        })
    }

    fn complete_batch<'a>(
        &'a self,
        tasks: &'a [Arc<Task>],
    ) -> BoxFuture<'a, Vec<Result<(), SourceError>>> {
        Box::pin(async move {
            let (index, pointers, mut out) = self.pointers_of(tasks);
            let stored = self.mark_seen_all(&pointers).await;
            {
                // One lock: the watcher never sees a task neither pending nor completed.
                let mut inner = self.lock();
                let now = Instant::now();
                for (i, result) in index.iter().zip(&stored) {
                    if result.is_ok() {
                        let id = tasks[*i].id.as_str();
                        inner.progress.completed(id);
                        inner.completed_at.insert(id.to_owned(), now);
                    }
                }
            }
            for (i, result) in index.into_iter().zip(stored) {
                out[i] = Some(result);
            }
            self.answers(out)
        })
    }

    fn unsettled(
        &self,
        older_than: Duration,
        max: usize,
    ) -> BoxFuture<'_, Result<Vec<Task>, SourceError>> {
        Box::pin(async move {
            let (pooled, permit) = self.pool.checkout().await;
            let mut pooled = match pooled.filter(|p| self.reusable(p)) {
                Some(p) => p,
                None => self.fresh_pooled().await?,
            };
            let result = self.unsettled_in(&mut pooled, older_than, max).await;
            self.checkin(pooled, permit, result)
        })
    }

    /// A `NOOP` on a pooled session (a fresh one when that fails), within
    /// [`REACHABLE_WITHIN`]. A pool whose sessions are all busy counts as reachable.
    fn reachable(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let Ok((pooled, permit)) =
                tokio::time::timeout(REACHABLE_WITHIN, self.pool.checkout()).await
            else {
                return Ok(());
            };
            let noop = async {
                if let Some(mut pooled) = pooled {
                    if pooled.session.noop().await.is_ok() {
                        return Ok(pooled);
                    }
                }
                let (mut session, retire_at, generation) =
                    self.login().await.map_err(|e| e.to_string())?;
                session.noop().await.map_err(|e| format!("NOOP: {e}"))?;
                Ok(Pooled {
                    session,
                    selected: None,
                    retire_at,
                    generation,
                })
            };
            match tokio::time::timeout(REACHABLE_WITHIN, noop).await {
                Ok(Ok(pooled)) => {
                    self.pool.checkin(pooled, permit);
                    Ok(())
                }
                Ok(Err(e)) => Err(e),
                Err(_) => Err(format!(
                    "no answer within {} ms",
                    REACHABLE_WITHIN.as_millis()
                )),
            }
        })
    }

    fn release(&self, task: &Task, disposition: Disposition) {
        match disposition {
            // Stays pending (never published again by this process) and gets the keyword
            // (never searched again, even after a restart); it stays unseen for a person.
            Disposition::DeadLettered => {
                if let Ok(pointer) = self.pointer_of(task) {
                    let _ = self.keywords.send(pointer);
                }
            }
            Disposition::Returned => {
                self.lock().progress.pending.remove(task.id.as_str());
            }
        }
    }
}

/// Selects `mailbox`: its UIDVALIDITY and UIDNEXT (`u32::MAX` when the server gives none).
async fn select(session: &mut ImapSession, mailbox: &str) -> Result<(u32, u32), String> {
    let selected = session
        .select(mailbox)
        .await
        .map_err(|e| format!("SELECT {mailbox}: {e}"))?;
    let uid_validity = selected
        .uid_validity
        .ok_or_else(|| format!("SELECT {mailbox}: no UIDVALIDITY"))?;
    Ok((uid_validity, selected.uid_next.unwrap_or(u32::MAX)))
}

/// The FETCH item of a message body: `BODY.PEEK[]` (never sets `\Seen`) cut one byte past
/// `max`, so that a server whose `RFC822.SIZE` is wrong (or lies) still sends no more than
/// the limit and a byte, and the byte says the message is too large.
fn body_query(max: u64) -> String {
    format!(
        "BODY.PEEK[]<0.{}>",
        max.saturating_add(1).min(u64::from(u32::MAX))
    )
}

/// A fetched body, or too large when the server sent more than `max` (it declared less).
fn bounded(body: Vec<u8>, max: u64) -> Fetched {
    if body.len() as u64 > max {
        Fetched::TooLarge(body.len() as u64)
    } else {
        Fetched::Body(body)
    }
}

async fn fetch_body(session: &mut ImapSession, uid: &str, max: u64) -> Result<Fetched, String> {
    let query = body_query(max);
    let bodies = read_fetches(
        session
            .uid_fetch(uid, &query)
            .await
            .map_err(|e| format!("UID FETCH {uid} {query}: {e}"))?,
        |f| f.body().map(<[u8]>::to_vec),
    )
    .await
    .map_err(|e| format!("UID FETCH {uid} {query}: {e}"))?;
    Ok(bodies
        .into_iter()
        .next()
        .map_or(Fetched::Gone, |b| bounded(b, max)))
}

/// Reads a `UID FETCH` or `UID STORE` answer to its end one response at a time, keeping
/// only what `keep` takes from each.
///
/// The server mixes into any answer FETCH responses about flags that other sessions changed
/// (every `\Seen` the other pooled sessions set: thousands during a backlog), and each
/// response async-imap yields owns a read buffer of at least 4 KiB. Collecting the responses
/// held thousands of buffers at once (a transient 17 MiB in a 10,000-message drain);
/// dropping each as it is read holds one.
async fn read_fetches<S, T>(
    stream: S,
    mut keep: impl FnMut(&async_imap::types::Fetch) -> Option<T>,
) -> Result<Vec<T>, async_imap::error::Error>
where
    S: futures::Stream<Item = Result<async_imap::types::Fetch, async_imap::error::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    let mut kept = Vec::new();
    while let Some(fetch) = stream.try_next().await? {
        if let Some(value) = keep(&fetch) {
            kept.push(value);
        }
    }
    Ok(kept)
}

/// How the watcher's session ended without an error.
enum Ended {
    /// The source stops.
    Shutdown,
    /// The session's token is due for renewal: log in again.
    Renew,
}

/// How long a retired session may take to log out.
const RETIRE_WAIT: Duration = Duration::from_secs(2);

/// `wait`, or less when the session must log in again before it has passed.
fn until_retire(wait: Duration, retire_at: Option<Instant>) -> Duration {
    match retire_at {
        Some(at) => wait.min(at.saturating_duration_since(Instant::now())),
        None => wait,
    }
}

/// What a source logs in with.
#[derive(Clone)]
enum Login {
    /// A password (`auth = "password"`).
    Password(String),
    /// OAuth2 tokens from a provider shared by every connection of the source.
    Token(AuthMethod, Arc<crate::oauth2::TokenProvider>),
}

impl Login {
    fn of(config: &ImapConfig) -> Result<Self, String> {
        let method = config.auth_method();
        if !method.uses_token() {
            return config.password().map(Self::Password);
        }
        let oauth2 = config
            .oauth2
            .clone()
            .ok_or_else(|| "a token login needs [oauth2]".to_owned())?;
        crate::oauth2::TokenProvider::new(oauth2).map(|p| Self::Token(method, Arc::new(p)))
    }
}

/// How soon an IDLE source searches again after a search that found new mail, instead of
/// idling (Dovecot delays IDLE notifications by about half a second).
const IDLE_FOLLOW_UP: Duration = Duration::from_millis(100);

/// Searches that find nothing, after one that found new mail, before an IDLE source idles
/// again: together they span Dovecot's notification delay.
const IDLE_FOLLOW_UPS: u32 = 5;

/// Most bytes (by the pointers' declared sizes) one batched `UID FETCH` asks for; a larger
/// message is fetched alone. Bounds what a batch holds in memory at once.
const FETCH_CHUNK_BYTES: u64 = 8 * 1024 * 1024;

/// One batched `UID FETCH`: a pointer naming its mailbox and UIDVALIDITY, the (index in the
/// batch, UID) of its members, and the bytes their pointers declare.
type FetchChunk = (Pointer, Vec<(usize, u32)>, u64);

/// The UIDs of `pointers` grouped by mailbox and UIDVALIDITY (ascending, without repeats).
fn group_by_mailbox(pointers: &[Pointer]) -> Vec<(Pointer, Vec<u32>)> {
    let mut groups: Vec<(Pointer, Vec<u32>)> = Vec::new();
    for p in pointers {
        match groups
            .iter_mut()
            .find(|(g, _)| g.mailbox == p.mailbox && g.uid_validity == p.uid_validity)
        {
            Some((_, uids)) => uids.push(p.uid),
            None => groups.push((p.clone(), vec![p.uid])),
        }
    }
    for (_, uids) in &mut groups {
        uids.sort_unstable();
        uids.dedup();
    }
    groups
}

enum Fetched {
    Body(Vec<u8>),
    TooLarge(u64),
    /// Not in the mailbox any more (expunged).
    Gone,
    /// The mailbox's UIDVALIDITY is no longer the pointer's.
    Stale,
}

impl ImapSource {
    /// How many times the source has tried to log in (watcher and workers).
    pub fn login_attempts(&self) -> u64 {
        self.lock().connects
    }
}

#[cfg(test)]
mod tests {
    use runtime_contracts::{Reconfigure, TaskSource};

    use super::*;

    /// A Gmail source's section as a reload hands it over (the preset unresolved).
    fn section(poll_interval_ms: u64, mailboxes: &[&str], connections: usize) -> serde_json::Value {
        serde_json::json!({
            "type": "imap_poll", "provider": "gmail", "user": "orders@example.com",
            "pool": "orders", "poll_interval_ms": poll_interval_ms, "mailboxes": mailboxes,
            "connections": connections,
            "oauth2": {"client_id": "app", "client_secret_env": "PATH", "refresh_token_env": "HOME"},
        })
    }

    fn source() -> ImapSource {
        let mut config = section(5000, &["INBOX"], 4);
        config.as_object_mut().expect("table").remove("type");
        let config: ImapConfig = serde_json::from_value(config).expect("config");
        ImapSource::new("inbox", config, ImapMode::Poll)
    }

    #[test]
    fn a_reload_applies_the_interval_restarts_for_mailboxes_and_refuses_the_pool_size() {
        let imap = source();
        let generation = imap.settings().generation;
        // The preset is filled in before comparing: only the interval differs.
        assert_eq!(
            imap.reconfigure(&section(250, &["INBOX"], 4)),
            Reconfigure::Applied
        );
        assert_eq!(imap.settings().config.poll_interval_ms, 250);
        assert_eq!(imap.settings().generation, generation, "the sessions stay");

        assert_eq!(
            imap.reconfigure(&section(250, &["INBOX", "Orders"], 4)),
            Reconfigure::Restart
        );
        assert_eq!(imap.settings().config.mailboxes, ["INBOX", "Orders"]);
        assert_eq!(imap.settings().generation, generation + 1, "new sessions");
        assert!(imap.lock().mailboxes.contains("Orders"));

        let Reconfigure::Refused(why) = imap.reconfigure(&section(250, &["INBOX"], 2)) else {
            panic!("the connection count is fixed");
        };
        assert!(why.contains("connections"), "{why}");
        assert_eq!(imap.settings().config.connections, 4);

        let mut idle = section(250, &["INBOX", "Orders"], 4);
        idle["type"] = serde_json::json!("imap_idle");
        assert_eq!(imap.reconfigure(&idle), Reconfigure::Restart);
        assert_eq!(imap.settings().mode, ImapMode::Idle);
    }
}
