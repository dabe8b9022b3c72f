//! `[sources.<id>]` with `type = "imap_poll"` or `type = "imap_idle"`: the same settings for
//! both, so that switching from polling to IDLE is changing `type` and nothing else.

use std::path::PathBuf;

use runtime_contracts::ConfigProblem;
use serde::Deserialize;

use crate::oauth2::{Grant, OAuth2Config};

/// How the source learns of new mail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImapMode {
    /// `UID SEARCH` every `poll_interval_ms`.
    Poll,
    /// IMAP IDLE (RFC 2177) on every mailbox (a connection each), searching a mailbox
    /// again after its wake-up.
    Idle,
}

/// How the source logs in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMethod {
    /// `LOGIN` with the password of `password_env` / `password_file`.
    #[default]
    Password,
    /// `AUTHENTICATE XOAUTH2` with a token of `[oauth2]` (Microsoft 365, Gmail).
    Xoauth2,
    /// `AUTHENTICATE OAUTHBEARER` (RFC 7628) with a token of `[oauth2]`.
    Oauthbearer,
}

impl AuthMethod {
    /// Whether it logs in with an OAuth2 token.
    pub fn uses_token(self) -> bool {
        self != Self::Password
    }
}

/// A mailbox provider whose settings a preset fills.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// Exchange Online: `outlook.office365.com:993`, the Microsoft identity platform's token
    /// endpoint of `tenant`.
    Microsoft365,
    /// Gmail: `imap.gmail.com:993`, Google's token endpoint, scope `https://mail.google.com/`.
    Gmail,
}

/// Transport security.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plain TCP (loopback and tests only).
    None,
    /// Plain TCP upgraded with `STARTTLS` before logging in.
    Starttls,
    /// TLS from the first byte (IMAPS, port 993): the default.
    #[default]
    Implicit,
}

/// The settings of an IMAP source.
#[derive(Clone, PartialEq, Eq, Deserialize)]
pub struct ImapConfig {
    /// `microsoft365` or `gmail`: fills host, port, TLS, the login method, the token
    /// endpoint and the scope that are not set.
    #[serde(default)]
    pub provider: Option<Provider>,
    /// The Microsoft 365 tenant (its id or a domain such as `contoso.onmicrosoft.com`).
    #[serde(default)]
    pub tenant: Option<String>,
    /// Server host name (also the name its certificate must carry); a provider fills it.
    #[serde(default)]
    pub host: String,
    /// Server port; 0 (the default): 993 with implicit TLS, else 143.
    #[serde(default)]
    pub port: u16,
    /// `none`, `starttls` or `implicit` (the default).
    #[serde(default)]
    pub tls: TlsMode,
    /// `password` (the default without a provider), `xoauth2` (with a provider) or
    /// `oauthbearer`.
    #[serde(default)]
    pub auth: Option<AuthMethod>,
    /// Where OAuth2 tokens come from, for `xoauth2` and `oauthbearer`.
    #[serde(default)]
    pub oauth2: Option<OAuth2Config>,
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
    /// Mailboxes read, in order; IDLE watches each on a connection of its own.
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
    /// What happens to a message once its outcome is committed: `"seen"` (the default:
    /// `\Seen` is set and it stays) or `{ move = "Processed" }` (`\Seen` and
    /// `done_keyword` are set, then it is moved there).
    #[serde(default, deserialize_with = "on_success")]
    pub on_success: Filing,
    /// What happens to a message whose task is dead-lettered: `"keyword"` (the default:
    /// `failed_keyword` is set and it stays unseen) or `{ move = "Failed" }` (the keyword is
    /// set, then it is moved there).
    #[serde(default, deserialize_with = "on_failure")]
    pub on_failure: Filing,
    /// Keyword set with `\Seen` before a message is moved by `on_success`: a move cut short
    /// (a crash) is finished by the watcher's next pass, which moves what carries it.
    #[serde(default = "default_done_keyword")]
    pub done_keyword: String,
    /// Largest message handed to a handler, in bytes.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: u64,
    /// Connect and greeting timeout, in milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Longest a connection may go without progress while it waits for the server (a TLS
    /// handshake, STARTTLS, the login, SELECT, SEARCH, FETCH, STORE, MOVE, LOGOUT; IDLE has
    /// its own bounds): beyond, the command fails as timed out and the connection is
    /// dropped, so a stalled server degrades the source instead of hanging it.
    #[serde(default = "default_command_timeout_ms")]
    pub command_timeout_ms: u64,
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
            .field("auth", &self.auth)
            .field("user", &self.user)
            .field("mailboxes", &self.mailboxes)
            .finish_non_exhaustive()
    }
}

/// Where a settled message goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Filing {
    /// It stays in its mailbox, flagged (`\Seen`, or the failure keyword).
    #[default]
    Stay,
    /// It is flagged, then moved to this folder (created when missing): `UID MOVE` where
    /// the server has it, else `UID COPY`, `\Deleted` and `UID EXPUNGE`.
    Move(String),
}

impl Filing {
    /// The folder it is moved to, if any.
    pub fn folder(&self) -> Option<&str> {
        match self {
            Self::Stay => None,
            Self::Move(folder) => Some(folder),
        }
    }
}

/// `word` or `{ move = "Folder" }`.
fn filing<'de, D: serde::Deserializer<'de>>(d: D, word: &str) -> Result<Filing, D::Error> {
    let value = serde_json::Value::deserialize(d)?;
    match &value {
        serde_json::Value::String(s) if s == word => return Ok(Filing::Stay),
        serde_json::Value::Object(map) if map.len() == 1 => {
            if let Some(serde_json::Value::String(folder)) = map.get("move") {
                return Ok(Filing::Move(folder.clone()));
            }
        }
        _ => {}
    }
    Err(serde::de::Error::custom(format!(
        "expected \"{word}\" or {{ move = \"Folder\" }}, found {value}"
    )))
}

fn on_success<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Filing, D::Error> {
    filing(d, "seen")
}

fn on_failure<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Filing, D::Error> {
    filing(d, "keyword")
}

fn default_done_keyword() -> String {
    "$OrderBotDone".to_owned()
}

/// Whether `word` can be an IMAP keyword (an atom, no `\`).
fn is_keyword(word: &str) -> bool {
    !word.is_empty()
        && !word
            .chars()
            .any(|c| c.is_whitespace() || "(){%*\"\\]".contains(c) || c.is_control())
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
fn default_command_timeout_ms() -> u64 {
    30_000
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
    /// The login method in force.
    pub fn auth_method(&self) -> AuthMethod {
        self.auth.unwrap_or(match self.provider {
            Some(_) => AuthMethod::Xoauth2,
            None => AuthMethod::Password,
        })
    }

    /// The settings with the provider's preset and the port's default filled in where they
    /// were not set.
    pub fn resolved(mut self) -> Self {
        match self.provider {
            Some(Provider::Microsoft365) => {
                if self.host.is_empty() {
                    self.host = "outlook.office365.com".to_owned();
                }
                if let Some(oauth2) = self.oauth2.as_mut() {
                    if oauth2.token_url.is_none() {
                        let tenant = self.tenant.as_deref().unwrap_or("organizations");
                        oauth2.token_url = Some(format!(
                            "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"
                        ));
                    }
                    if oauth2.scope.is_none() {
                        oauth2.scope = Some(match oauth2.grant {
                            // Delegated access: the user's consent to IMAP, and a refresh token.
                            Some(Grant::RefreshToken) => {
                                "https://outlook.office.com/IMAP.AccessAsUser.All offline_access"
                                    .to_owned()
                            }
                            // App-only access: the IMAP.AccessAsApp application permission.
                            _ => "https://outlook.office365.com/.default".to_owned(),
                        });
                    }
                }
            }
            Some(Provider::Gmail) => {
                if self.host.is_empty() {
                    self.host = "imap.gmail.com".to_owned();
                }
                if let Some(oauth2) = self.oauth2.as_mut() {
                    if oauth2.token_url.is_none() {
                        oauth2.token_url = Some("https://oauth2.googleapis.com/token".to_owned());
                    }
                    if oauth2.scope.is_none() {
                        oauth2.scope = Some("https://mail.google.com/".to_owned());
                    }
                    if oauth2.grant.is_none()
                        && oauth2.token_file.is_none()
                        && oauth2.token_command.is_none()
                    {
                        oauth2.grant = Some(Grant::RefreshToken);
                    }
                }
            }
            None => {}
        }
        if self.port == 0 {
            self.port = if self.tls == TlsMode::Implicit {
                993
            } else {
                143
            };
        }
        self
    }

    /// Problems with these values, keyed under `prefix`, for a polling source.
    pub fn problems(&self, prefix: &str) -> Vec<ConfigProblem> {
        self.problems_for(prefix, ImapMode::Poll)
    }

    /// Problems with these values for a source in `mode` (IDLE holds one watcher
    /// connection per mailbox).
    pub fn problems_for(&self, prefix: &str, mode: ImapMode) -> Vec<ConfigProblem> {
        self.clone().resolved().problems_resolved(prefix, mode)
    }

    /// Connections the watcher holds: one, or one per mailbox when it IDLEs.
    pub fn watchers(&self, mode: ImapMode) -> usize {
        match mode {
            ImapMode::Poll => 1,
            ImapMode::Idle => self.mailboxes.len().max(1),
        }
    }

    fn problems_resolved(&self, prefix: &str, mode: ImapMode) -> Vec<ConfigProblem> {
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
                ("command_timeout_ms", self.command_timeout_ms),
                ("max_backoff_ms", self.max_backoff_ms),
                ("lease_ttl_ms", self.lease_ttl_ms),
                ("replicas", self.replicas as u64),
            ],
        );
        let key = |k: &str| format!("{prefix}.{k}");
        // Without TLS the password (or token) and every mail cross the network in clear
        // text: only to this machine.
        let loopback = self.host.eq_ignore_ascii_case("localhost")
            || self
                .host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if self.tls == TlsMode::None && !loopback {
            problems.push(ConfigProblem::new(
                key("tls"),
                format!(
                    "\"none\" sends the password and the mail in clear text; it is allowed only to a loopback host, not {:?}: use \"implicit\" or \"starttls\"",
                    self.host
                ),
            ));
        }
        if self.host.trim().is_empty() {
            problems.push(ConfigProblem::new(
                key("host"),
                "must not be empty (or set provider = \"microsoft365\" or \"gmail\")",
            ));
        }
        if self.provider == Some(Provider::Microsoft365)
            && self.tenant.as_deref().is_none_or(|t| t.trim().is_empty())
            && self
                .oauth2
                .as_ref()
                .is_some_and(|o| o.grant == Some(Grant::ClientCredentials))
        {
            problems.push(ConfigProblem::new(
                key("tenant"),
                "app-only access to Microsoft 365 needs the tenant (its id or domain)",
            ));
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
        let watchers = self.watchers(mode);
        if self.replicas.max(1) * self.connections + watchers > self.max_connections {
            let watching = match watchers {
                1 => "the watcher".to_owned(),
                n => format!("{n} IDLE watchers (one per mailbox)"),
            };
            problems.push(ConfigProblem::new(
                key("connections"),
                format!(
                    "{} replicas x {} worker connections plus {watching} exceed max_connections = {} (the server's limit per user and IP)",
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
        for (name, word) in [
            ("failed_keyword", &self.failed_keyword),
            ("done_keyword", &self.done_keyword),
        ] {
            if !is_keyword(word) {
                problems.push(ConfigProblem::new(
                    key(name),
                    format!("{word:?} is not an IMAP keyword"),
                ));
            }
        }
        if self.failed_keyword == self.done_keyword {
            problems.push(ConfigProblem::new(
                key("done_keyword"),
                "must differ from failed_keyword",
            ));
        }
        for (name, filing) in [
            ("on_success", &self.on_success),
            ("on_failure", &self.on_failure),
        ] {
            let Some(folder) = filing.folder() else {
                continue;
            };
            if folder.trim().is_empty() || folder.chars().any(|c| c.is_control() || c == '"') {
                problems.push(ConfigProblem::new(
                    key(name),
                    format!("{folder:?} is not a folder name"),
                ));
            } else if self
                .mailboxes
                .iter()
                .any(|m| m.eq_ignore_ascii_case(folder))
            {
                problems.push(ConfigProblem::new(
                    key(name),
                    format!("moves into {folder:?}, which is one of the mailboxes it reads: its mail would be read again"),
                ));
            }
        }
        if let Some(path) = &self.ca_file {
            if !path.is_file() {
                problems.push(ConfigProblem::new(
                    key("ca_file"),
                    format!("{} is not a file", path.display()),
                ));
            }
        }
        let auth = self.auth_method();
        match (&self.oauth2, auth.uses_token()) {
            (Some(oauth2), true) => problems.extend(oauth2.problems(&key("oauth2"))),
            (None, true) => problems.push(ConfigProblem::new(
                key("oauth2"),
                format!("auth = \"{}\" needs an [oauth2] table (token_url, client_id, client_secret_env, grant ...)", if auth == AuthMethod::Xoauth2 { "xoauth2" } else { "oauthbearer" }),
            )),
            (Some(_), false) => problems.push(ConfigProblem::new(
                key("oauth2"),
                "is used only with auth = \"xoauth2\" or \"oauthbearer\"",
            )),
            (None, false) => {}
        }
        if auth.uses_token() {
            if self.password_env.is_some() || self.password_file.is_some() {
                problems.push(ConfigProblem::new(
                    key("password_env"),
                    "a token login uses no password; remove password_env / password_file",
                ));
            }
            return problems;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(value: serde_json::Value) -> ImapConfig {
        serde_json::from_value(value).expect("config")
    }

    #[test]
    fn provider_presets_fill_what_is_not_set() {
        let m365 = parse(serde_json::json!({
            "provider": "microsoft365", "tenant": "contoso.onmicrosoft.com",
            "user": "orders@contoso.com", "pool": "orders",
            "oauth2": {"client_id": "app", "client_secret_env": "PATH", "grant": "client_credentials"},
        }))
        .resolved();
        assert_eq!(
            (m365.host.as_str(), m365.port, m365.tls),
            ("outlook.office365.com", 993, TlsMode::Implicit)
        );
        assert_eq!(m365.auth_method(), AuthMethod::Xoauth2);
        let oauth2 = m365.oauth2.as_ref().expect("oauth2");
        assert_eq!(
            oauth2.token_url.as_deref(),
            Some("https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token")
        );
        assert_eq!(
            oauth2.scope.as_deref(),
            Some("https://outlook.office365.com/.default")
        );
        assert!(
            m365.problems("sources.inbox").is_empty(),
            "{:?}",
            m365.problems("sources.inbox")
        );

        let gmail = parse(serde_json::json!({
            "provider": "gmail", "user": "orders@example.com", "pool": "orders",
            "oauth2": {"client_id": "app", "client_secret_env": "PATH", "refresh_token_env": "HOME"},
        }))
        .resolved();
        assert_eq!((gmail.host.as_str(), gmail.port), ("imap.gmail.com", 993));
        let oauth2 = gmail.oauth2.as_ref().expect("oauth2");
        assert_eq!(
            oauth2.token_url.as_deref(),
            Some("https://oauth2.googleapis.com/token")
        );
        assert_eq!(oauth2.scope.as_deref(), Some("https://mail.google.com/"));
        assert_eq!(oauth2.grant, Some(Grant::RefreshToken));
        assert!(
            gmail.problems("sources.inbox").is_empty(),
            "{:?}",
            gmail.problems("sources.inbox")
        );
    }

    #[test]
    fn clear_text_is_only_allowed_to_this_machine() {
        let with = |host: &str, tls: &str| {
            parse(serde_json::json!({
                "host": host, "tls": tls, "user": "u", "pool": "orders", "password_env": "HOME",
            }))
            .problems("sources.inbox")
            .into_iter()
            .filter(|p| p.key == "sources.inbox.tls")
            .count()
        };
        for host in ["127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"] {
            assert_eq!(with(host, "none"), 0, "{host}");
        }
        for host in ["imap.example.com", "10.0.0.5", "dovecot"] {
            assert_eq!(with(host, "none"), 1, "{host}");
            assert_eq!(with(host, "starttls"), 0, "{host}");
        }
    }

    #[test]
    fn filing_is_a_word_or_a_move_into_another_folder() {
        let config = parse(serde_json::json!({
            "host": "imap.example", "user": "u", "pool": "orders", "password_env": "HOME",
            "on_success": {"move": "Processed"}, "on_failure": "keyword",
        }));
        assert_eq!(config.on_success, Filing::Move("Processed".into()));
        assert_eq!(config.on_failure, Filing::Stay);
        assert!(
            config.problems("s").is_empty(),
            "{:?}",
            config.problems("s")
        );
        let wrong: Result<ImapConfig, _> = serde_json::from_value(serde_json::json!({
            "host": "imap.example", "user": "u", "pool": "orders", "on_success": "moved",
        }));
        let why = wrong.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            why.contains("expected \"seen\" or { move = \"Folder\" }"),
            "{why}"
        );
        let into_itself = parse(serde_json::json!({
            "host": "imap.example", "user": "u", "pool": "orders", "password_env": "HOME",
            "on_failure": {"move": "inbox"},
        }));
        let problems: Vec<String> = into_itself
            .problems("s")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("one of the mailboxes it reads")),
            "{problems:?}"
        );
    }

    #[test]
    fn idle_counts_one_watcher_connection_per_mailbox() {
        let config = parse(serde_json::json!({
            "host": "imap.example", "user": "u", "pool": "orders", "password_env": "HOME",
            "mailboxes": ["INBOX", "Orders", "Returns"], "connections": 8,
        }));
        assert!(config.problems_for("s", ImapMode::Poll).is_empty());
        let problems: Vec<String> = config
            .problems_for("s", ImapMode::Idle)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert!(
            problems.iter().any(|p| p
                .contains("plus 3 IDLE watchers (one per mailbox) exceed max_connections = 10")),
            "{problems:?}"
        );
    }

    #[test]
    fn a_token_login_needs_its_table_and_no_password() {
        let config = parse(serde_json::json!({
            "host": "imap.example", "user": "u", "pool": "orders", "auth": "oauthbearer",
            "password_env": "HOME",
        }));
        let problems: Vec<String> = config
            .problems("s")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("needs an [oauth2] table")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("uses no password")),
            "{problems:?}"
        );
        let m365 = parse(serde_json::json!({
            "provider": "microsoft365", "user": "u", "pool": "orders",
            "oauth2": {"client_id": "app", "client_secret_env": "PATH", "grant": "client_credentials"},
        }));
        let problems: Vec<String> = m365.problems("s").iter().map(ToString::to_string).collect();
        assert!(
            problems.iter().any(|p| p.contains("needs the tenant")),
            "{problems:?}"
        );
    }
}
