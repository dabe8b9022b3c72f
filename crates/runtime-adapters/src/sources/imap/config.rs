//! `[sources.<id>]` with `type = "imap_poll"` or `type = "imap_idle"`: the same settings for
//! both, so that switching from polling to IDLE is changing `type` and nothing else.

use std::path::PathBuf;

use runtime_contracts::ConfigProblem;
use serde::Deserialize;

/// How the source learns of new mail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImapMode {
    /// `UID SEARCH` every `poll_interval_ms`.
    Poll,
    /// IMAP IDLE (RFC 2177) on the first mailbox, searching again after every wake-up.
    Idle,
}

/// Transport security.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plain TCP (loopback and tests only).
    None,
    /// Plain TCP upgraded with `STARTTLS` before logging in.
    Starttls,
    /// TLS from the first byte (IMAPS, port 993).
    Implicit,
}

/// The settings of an IMAP source.
#[derive(Clone, PartialEq, Eq, Deserialize)]
pub struct ImapConfig {
    /// Server host name (also the name its certificate must carry).
    pub host: String,
    /// Server port (143 or 993 usually).
    pub port: u16,
    /// `none`, `starttls` or `implicit`.
    pub tls: TlsMode,
    /// PEM file with the CA certificate(s) to trust instead of the public roots (for a
    /// self-signed server).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The account's login name.
    pub user: String,
    /// Environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// File holding the password (its first line).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Mailboxes read, in order; IDLE watches the first.
    #[serde(default = "default_mailboxes")]
    pub mailboxes: Vec<String>,
    /// IMAP search criteria selecting the messages to process.
    #[serde(default = "default_search")]
    pub search: String,
    /// The pool whose queue receives the tasks.
    pub pool: String,
    /// Kind of the published tasks.
    #[serde(default = "default_kind")]
    pub kind: String,
    /// Pause between searches when polling, in milliseconds.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// Pointers published per call to the queue.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// IDLE is re-issued after this many seconds (RFC 2177: below 29 minutes).
    #[serde(default = "default_idle_reissue_secs")]
    pub idle_reissue_secs: u64,
    /// IDLE is ended, the mailboxes searched and IDLE started again at least this often: a
    /// round trip that proves the connection alive and keeps the source's progress fresh
    /// for readiness (keep it below `runtime.source_progress_bound_ms`).
    #[serde(default = "default_idle_check_secs")]
    pub idle_check_secs: u64,
    /// An IDLE connection that has sent nothing (not even Dovecot's "Still here", every
    /// two minutes by default) for this long is taken for dead and reconnected.
    #[serde(default = "default_idle_dead_after_secs")]
    pub idle_dead_after_secs: u64,
    /// Connections used by workers to fetch and flag messages.
    #[serde(default = "default_connections")]
    pub connections: usize,
    /// The server's limit of connections per user and IP (Dovecot:
    /// `mail_max_userip_connections`, 10): `connections` plus the watcher must stay within.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Keyword set on a message whose task is dead-lettered (it stays unseen, and is not
    /// searched again).
    #[serde(default = "default_failed_keyword")]
    pub failed_keyword: String,
    /// Largest message handed to a handler, in bytes.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: u64,
    /// Connect and greeting timeout, in milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Longest wait between reconnection attempts, in milliseconds.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
    /// On a queue shared by several processes (Redis), only the replica holding the
    /// mailbox's lease watches it; the others run workers and take over when the lease
    /// expires. `false`: every replica watches (safe, since publishing is idempotent, but
    /// each search costs the server).
    #[serde(default = "default_exclusive")]
    pub exclusive: bool,
    /// The watcher's lease lasts this long unless renewed (every third of it), in
    /// milliseconds: a replica that dies is replaced as watcher within about this time.
    #[serde(default = "default_lease_ttl_ms")]
    pub lease_ttl_ms: u64,
    /// Replicas sharing this mailbox: each opens up to `connections` worker connections,
    /// so `replicas` x `connections` plus one watcher must stay within `max_connections`.
    #[serde(default = "default_replicas")]
    pub replicas: usize,
}

impl std::fmt::Debug for ImapConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No password here, and the environment variable or file only by name.
        f.debug_struct("ImapConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("user", &self.user)
            .field("mailboxes", &self.mailboxes)
            .finish_non_exhaustive()
    }
}

fn default_mailboxes() -> Vec<String> {
    vec!["INBOX".to_owned()]
}
fn default_search() -> String {
    "UNSEEN".to_owned()
}
fn default_kind() -> String {
    "mail.message".to_owned()
}
fn default_poll_interval_ms() -> u64 {
    5_000
}
fn default_batch_size() -> usize {
    200
}
fn default_idle_reissue_secs() -> u64 {
    25 * 60
}
fn default_idle_check_secs() -> u64 {
    30
}
fn default_idle_dead_after_secs() -> u64 {
    6 * 60
}
fn default_connections() -> usize {
    4
}
fn default_max_connections() -> usize {
    10
}
fn default_failed_keyword() -> String {
    "$OrderBotFailed".to_owned()
}
fn default_max_message_bytes() -> u64 {
    25 * 1024 * 1024
}
fn default_connect_timeout_ms() -> u64 {
    10_000
}
fn default_max_backoff_ms() -> u64 {
    60_000
}
fn default_exclusive() -> bool {
    true
}
fn default_lease_ttl_ms() -> u64 {
    10_000
}
fn default_replicas() -> usize {
    1
}

/// RFC 2177: clients re-issue IDLE at least every 29 minutes.
const IDLE_LIMIT_SECS: u64 = 29 * 60;

impl ImapConfig {
    /// Problems with these values, keyed under `prefix`.
    pub fn problems(&self, prefix: &str) -> Vec<ConfigProblem> {
        let mut problems = runtime_contracts::config::require_positive(
            prefix,
            &[
                ("poll_interval_ms", self.poll_interval_ms),
                ("batch_size", self.batch_size as u64),
                ("idle_reissue_secs", self.idle_reissue_secs),
                ("idle_check_secs", self.idle_check_secs),
                ("idle_dead_after_secs", self.idle_dead_after_secs),
                ("connections", self.connections as u64),
                ("max_message_bytes", self.max_message_bytes),
                ("connect_timeout_ms", self.connect_timeout_ms),
                ("max_backoff_ms", self.max_backoff_ms),
                ("lease_ttl_ms", self.lease_ttl_ms),
                ("replicas", self.replicas as u64),
            ],
        );
        let key = |k: &str| format!("{prefix}.{k}");
        if self.host.trim().is_empty() {
            problems.push(ConfigProblem::new(key("host"), "must not be empty"));
        }
        if self.idle_reissue_secs >= IDLE_LIMIT_SECS {
            problems.push(ConfigProblem::new(
                key("idle_reissue_secs"),
                format!(
                    "{} is not below 29 minutes ({IDLE_LIMIT_SECS} s); servers may drop an older IDLE (RFC 2177)",
                    self.idle_reissue_secs
                ),
            ));
        }
        if self.replicas.max(1) * self.connections + 1 > self.max_connections {
            problems.push(ConfigProblem::new(
                key("connections"),
                format!(
                    "{} replicas x {} worker connections plus the watcher exceed max_connections = {} (the server's limit per user and IP)",
                    self.replicas.max(1), self.connections, self.max_connections
                ),
            ));
        }
        if self.lease_ttl_ms > 0 && self.lease_ttl_ms < 1_000 {
            problems.push(ConfigProblem::new(
                key("lease_ttl_ms"),
                "must be at least 1000 (it is renewed every third of it)",
            ));
        }
        if self.mailboxes.is_empty() || self.mailboxes.iter().any(|m| m.trim().is_empty()) {
            problems.push(ConfigProblem::new(
                key("mailboxes"),
                "needs at least one mailbox name, none empty",
            ));
        }
        if self.failed_keyword.is_empty()
            || self
                .failed_keyword
                .chars()
                .any(|c| c.is_whitespace() || "(){%*\"\\]".contains(c) || c.is_control())
        {
            problems.push(ConfigProblem::new(
                key("failed_keyword"),
                format!("{:?} is not an IMAP keyword", self.failed_keyword),
            ));
        }
        if let Some(path) = &self.ca_file {
            if !path.is_file() {
                problems.push(ConfigProblem::new(
                    key("ca_file"),
                    format!("{} is not a file", path.display()),
                ));
            }
        }
        match (&self.password_env, &self.password_file) {
            (Some(_), Some(_)) => problems.push(ConfigProblem::new(
                key("password_env"),
                "set password_env or password_file, not both",
            )),
            (None, None) => problems.push(ConfigProblem::new(
                key("password_env"),
                "set password_env (a variable name) or password_file",
            )),
            _ => {
                if let Err(e) = self.password() {
                    problems.push(ConfigProblem::new(key("password_env"), e));
                }
            }
        }
        problems
    }

    /// The password, from the environment or the file. The error names the variable or the
    /// file, never the password.
    pub fn password(&self) -> Result<String, String> {
        if let Some(var) = &self.password_env {
            return std::env::var(var)
                .ok()
                .filter(|p| !p.is_empty())
                .ok_or_else(|| format!("environment variable {var} is not set"));
        }
        if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("reading the password file {}: {e}", path.display()))?;
            let line = text.lines().next().unwrap_or("").trim_end().to_owned();
            if line.is_empty() {
                return Err(format!("the password file {} is empty", path.display()));
            }
            return Ok(line);
        }
        Err("no password_env or password_file".to_owned())
    }
}
