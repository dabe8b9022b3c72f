//! OAuth2 access tokens for sources that log in with one (IMAP's XOAUTH2 and OAUTHBEARER):
//! `[sources.ID.oauth2]`.
//!
//! - `grant = "client_credentials"` (an application's own access, Microsoft 365 app-only) or
//!   `grant = "refresh_token"` (delegated access: Gmail, a Microsoft 365 user) against an
//!   RFC 6749 token endpoint; a refresh token the endpoint rotates is kept in memory and, when
//!   `refresh_token_store` (or `refresh_token_file`) names a file, written there.
//! - `token_file` (read at each login) or `token_command` (run when a token is needed) for
//!   tokens that something else manages.
//!
//! A token is cached and fetched again a fifth of its lifetime (at most five minutes) before
//! `expires_in` runs out. The provider holds one lock across a request to the endpoint, so all
//! connections of a source share one refresh in flight. [`TokenProvider::refused`] asks again
//! after a login refused a token, unless another caller has already replaced that token.
//!
//! No token, secret or refresh token is ever printed: [`Secret`] has no `Display`, its
//! `Debug` is `[redacted]`, and errors carry only the endpoint's `error` and
//! `error_description`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, Limited};
use runtime_contracts::ConfigProblem;
use serde::Deserialize;
use tokio::io::AsyncReadExt;

/// A secret value (an access token, a client secret, a refresh token): compared, handed to the
/// wire, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the wire only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// How the token is obtained from the endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grant {
    /// The application's own credentials (RFC 6749 section 4.4).
    ClientCredentials,
    /// A long-lived refresh token from a user's consent (RFC 6749 section 6).
    RefreshToken,
}

/// `[sources.ID.oauth2]`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
pub struct OAuth2Config {
    /// The token endpoint (https; http only to a loopback host). A provider preset fills it.
    #[serde(default)]
    pub token_url: Option<String>,
    /// The application (client) id.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Environment variable holding the client secret.
    #[serde(default)]
    pub client_secret_env: Option<String>,
    /// File holding the client secret (its first line).
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// Scopes asked for, space-separated. A provider preset fills it.
    #[serde(default)]
    pub scope: Option<String>,
    /// `client_credentials` or `refresh_token`.
    #[serde(default)]
    pub grant: Option<Grant>,
    /// Environment variable holding the refresh token.
    #[serde(default)]
    pub refresh_token_env: Option<String>,
    /// File holding the refresh token; a rotated one is written back to it unless
    /// `refresh_token_store` names another file.
    #[serde(default)]
    pub refresh_token_file: Option<PathBuf>,
    /// File where a rotated refresh token is kept (mode 0600); at start a token there wins
    /// over `refresh_token_env` / `refresh_token_file`.
    #[serde(default)]
    pub refresh_token_store: Option<PathBuf>,
    /// A file holding an access token that something else keeps fresh, read at each login.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// A program (and its arguments) that prints an access token, or a JSON object with
    /// `access_token` and `expires_in`, on its standard output.
    #[serde(default)]
    pub token_command: Option<Vec<String>>,
    /// PEM file of the CA(s) to trust for the token endpoint instead of the public roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Bounds one token request (or the token command), in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    10_000
}

impl fmt::Debug for OAuth2Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Secrets only by where they live.
        f.debug_struct("OAuth2Config")
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .field("grant", &self.grant)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// Reads the first line of a secret file; the error names the file, never its content.
fn first_line(path: &Path, what: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading the {what} file {}: {e}", path.display()))?;
    let line = text.lines().next().unwrap_or("").trim().to_owned();
    if line.is_empty() {
        return Err(format!("the {what} file {} is empty", path.display()));
    }
    Ok(line)
}

fn from_env(var: &str) -> Result<String, String> {
    std::env::var(var)
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| format!("environment variable {var} is not set"))
}

/// Whether `host` (of a URL) is a loopback name or address.
pub(crate) fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl OAuth2Config {
    /// Problems with these values, keyed under `prefix` (`sources.ID.oauth2`).
    pub fn problems(&self, prefix: &str) -> Vec<ConfigProblem> {
        let key = |k: &str| format!("{prefix}.{k}");
        let mut problems = Vec::new();
        let external =
            usize::from(self.token_file.is_some()) + usize::from(self.token_command.is_some());
        let ways = external + usize::from(self.grant.is_some());
        if ways != 1 {
            problems.push(ConfigProblem::new(
                key("grant"),
                "set exactly one of grant (\"client_credentials\" or \"refresh_token\"), token_file or token_command",
            ));
            return problems;
        }
        if self.timeout_ms == 0 {
            problems.push(ConfigProblem::new(key("timeout_ms"), "must be positive"));
        }
        if let Some(command) = &self.token_command {
            if command.first().is_none_or(|c| c.trim().is_empty()) {
                problems.push(ConfigProblem::new(
                    key("token_command"),
                    "needs a program (and its arguments) as a list",
                ));
            }
        }
        if let Some(path) = &self.token_file {
            if !path.is_file() {
                problems.push(ConfigProblem::new(
                    key("token_file"),
                    format!("{} is not a file", path.display()),
                ));
            }
        }
        let Some(grant) = self.grant else {
            return problems;
        };
        match self.token_url.as_deref().map(Endpoint::parse) {
            None => problems.push(ConfigProblem::new(
                key("token_url"),
                "needed with a grant (a provider preset fills it)",
            )),
            Some(Err(e)) => problems.push(ConfigProblem::new(key("token_url"), e)),
            Some(Ok(_)) => {}
        }
        if self
            .client_id
            .as_deref()
            .is_none_or(|c| c.trim().is_empty())
        {
            problems.push(ConfigProblem::new(key("client_id"), "needed with a grant"));
        }
        if self.client_secret_env.is_some() && self.client_secret_file.is_some() {
            problems.push(ConfigProblem::new(
                key("client_secret_env"),
                "set client_secret_env or client_secret_file, not both",
            ));
        } else if let Err(e) = self.client_secret() {
            // A public client (refresh token without a secret) is allowed.
            if grant == Grant::ClientCredentials || self.has_client_secret() {
                problems.push(ConfigProblem::new(key("client_secret_env"), e));
            }
        }
        if grant == Grant::RefreshToken {
            match (&self.refresh_token_env, &self.refresh_token_file) {
                (Some(_), Some(_)) => problems.push(ConfigProblem::new(
                    key("refresh_token_env"),
                    "set refresh_token_env or refresh_token_file, not both",
                )),
                (None, None) => problems.push(ConfigProblem::new(
                    key("refresh_token_env"),
                    "the refresh_token grant needs refresh_token_env or refresh_token_file",
                )),
                _ => {
                    if let Err(e) = self.initial_refresh_token() {
                        problems.push(ConfigProblem::new(key("refresh_token_env"), e));
                    }
                }
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
        problems
    }

    fn has_client_secret(&self) -> bool {
        self.client_secret_env.is_some() || self.client_secret_file.is_some()
    }

    /// The client secret, read now; `Err` names where it was looked for.
    fn client_secret(&self) -> Result<Secret, String> {
        if let Some(var) = &self.client_secret_env {
            return from_env(var).map(Secret);
        }
        if let Some(path) = &self.client_secret_file {
            return first_line(path, "client secret").map(Secret);
        }
        Err("set client_secret_env or client_secret_file".to_owned())
    }

    /// The refresh token to start from: the store's (a rotated one), else the configured one.
    fn initial_refresh_token(&self) -> Result<Secret, String> {
        if let Some(store) = &self.refresh_token_store {
            if let Ok(token) = first_line(store, "refresh token store") {
                return Ok(Secret(token));
            }
        }
        if let Some(var) = &self.refresh_token_env {
            return from_env(var).map(Secret);
        }
        if let Some(path) = &self.refresh_token_file {
            return first_line(path, "refresh token").map(Secret);
        }
        Err("no refresh token configured".to_owned())
    }

    /// Where a rotated refresh token is written.
    fn rotation_file(&self) -> Option<&Path> {
        self.refresh_token_store
            .as_deref()
            .or(self.refresh_token_file.as_deref())
    }
}

/// Why no token could be had.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The endpoint answered with an OAuth2 error (`invalid_client`, `invalid_grant`, ...):
    /// the configuration or the consent must change; asking again soon will not help.
    #[error("token endpoint {endpoint} refused: {error}{}", description.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Refused {
        /// The endpoint's URL.
        endpoint: String,
        /// Its `error` code.
        error: String,
        /// Its `error_description`, when it gave one.
        description: Option<String>,
    },
    /// The endpoint could not be reached, timed out, or failed (5xx, a body that is not a
    /// token): asking again later may work.
    #[error("token endpoint {endpoint}: {message}")]
    Unavailable {
        /// The endpoint's URL (or the token file or command).
        endpoint: String,
        /// What went wrong.
        message: String,
    },
    /// The local configuration cannot give a token (a secret that is not set, a file that
    /// cannot be read).
    #[error("{0}")]
    Config(String),
}

/// An access token and when it runs out (`None`: not known).
#[derive(Clone, Debug)]
pub struct AccessToken {
    /// The token.
    pub secret: Secret,
    /// When it expires, by the endpoint's `expires_in`.
    pub expires_at: Option<Instant>,
    /// When the provider fetches a new one (a fifth of its lifetime early, at most 5 min):
    /// a session logged in with it logs in again from then on, with the new one.
    pub renew_at: Option<Instant>,
}

impl AccessToken {
    fn fresh(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|at| now < at)
    }
}

#[derive(Default)]
struct State {
    current: Option<Cached>,
    refresh_token: Option<Secret>,
}

struct Cached {
    token: AccessToken,
}

/// What the provider has done, for tests and `/status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenStats {
    /// Requests to the endpoint (or runs of the command, reads of the file).
    pub requests: u64,
    /// Of them, the ones that failed.
    pub failures: u64,
    /// Refresh tokens the endpoint rotated.
    pub rotations: u64,
}

/// Gets, caches and refreshes the access tokens of one source. See the module docs.
pub struct TokenProvider {
    config: OAuth2Config,
    endpoint: Option<Endpoint>,
    tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    state: tokio::sync::Mutex<State>,
    stats: Mutex<TokenStats>,
}

impl fmt::Debug for TokenProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenProvider")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl TokenProvider {
    /// A provider for `config` (checked with [`OAuth2Config::problems`]).
    pub fn new(config: OAuth2Config) -> Result<Self, String> {
        let endpoint = match &config.token_url {
            Some(url) if config.grant.is_some() => Some(Endpoint::parse(url)?),
            _ => None,
        };
        let tls = match &endpoint {
            Some(e) if e.https => Some(
                crate::tls::client_config(config.ca_file.as_deref())
                    .map_err(|e| format!("token endpoint TLS: {e}"))?,
            ),
            _ => None,
        };
        let refresh_token = match config.grant {
            Some(Grant::RefreshToken) => Some(config.initial_refresh_token()?),
            _ => None,
        };
        Ok(Self {
            config,
            endpoint,
            tls,
            state: tokio::sync::Mutex::new(State {
                current: None,
                refresh_token,
            }),
            stats: Mutex::new(TokenStats::default()),
        })
    }

    /// What it has done so far.
    pub fn stats(&self) -> TokenStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A token that is still valid: the cached one, or a new one (one request at a time).
    pub async fn token(&self) -> Result<AccessToken, TokenError> {
        let mut state = self.state.lock().await;
        let now = Instant::now();
        if let Some(cached) = &state.current {
            if cached.token.renew_at.is_none_or(|at| now < at) && cached.token.fresh(now) {
                return Ok(cached.token.clone());
            }
        }
        self.fetch(&mut state).await
    }

    /// A token after a login refused `refused`: a newer one another caller already got, or a
    /// new one from the endpoint.
    pub async fn refused(&self, refused: &AccessToken) -> Result<AccessToken, TokenError> {
        let mut state = self.state.lock().await;
        if let Some(cached) = &state.current {
            if cached.token.secret != refused.secret && cached.token.fresh(Instant::now()) {
                return Ok(cached.token.clone());
            }
        }
        state.current = None;
        self.fetch(&mut state).await
    }

    async fn fetch(&self, state: &mut State) -> Result<AccessToken, TokenError> {
        let limit = Duration::from_millis(self.config.timeout_ms);
        let result = if let Some(path) = &self.config.token_file {
            first_line(path, "token")
                .map(|t| (Secret(t), None, None))
                .map_err(TokenError::Config)
        } else if let Some(command) = &self.config.token_command {
            run_command(command, limit).await
        } else {
            self.request(state, limit).await
        };
        {
            let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
            stats.requests += 1;
            if result.is_err() {
                stats.failures += 1;
            }
        }
        let (secret, expires_in, rotated) = result?;
        if let Some(rotated) = rotated {
            if state.refresh_token.as_ref() != Some(&rotated) {
                self.stats
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .rotations += 1;
                if let Some(path) = self.config.rotation_file() {
                    if let Err(e) = write_private(path, rotated.expose()) {
                        tracing::error!(file = %path.display(), error = %e,
                            "could not keep the rotated refresh token; it is kept in memory only");
                    }
                }
                state.refresh_token = Some(rotated);
            }
        }
        let now = Instant::now();
        let expires_at = expires_in.map(|d| now + d);
        let renew_at = expires_in.map(|d| now + d - (d / 5).min(Duration::from_secs(300)));
        let token = AccessToken {
            secret,
            expires_at,
            renew_at,
        };
        // A file's token is read at each login (its keeper may replace it at any time).
        if self.config.token_file.is_none() {
            state.current = Some(Cached {
                token: token.clone(),
            });
        }
        Ok(token)
    }

    /// The request's form: the grant, the client and the scope.
    fn form(&self, state: &State) -> Result<String, TokenError> {
        let mut form = form_urlencoded::Serializer::new(String::new());
        match self.config.grant {
            Some(Grant::RefreshToken) => {
                let refresh = state
                    .refresh_token
                    .as_ref()
                    .ok_or_else(|| TokenError::Config("no refresh token".to_owned()))?;
                form.append_pair("grant_type", "refresh_token");
                form.append_pair("refresh_token", refresh.expose());
            }
            _ => {
                form.append_pair("grant_type", "client_credentials");
            }
        }
        if let Some(id) = &self.config.client_id {
            form.append_pair("client_id", id);
        }
        if self.config.has_client_secret() {
            let secret = self.config.client_secret().map_err(TokenError::Config)?;
            form.append_pair("client_secret", secret.expose());
        }
        if let Some(scope) = &self.config.scope {
            form.append_pair("scope", scope);
        }
        Ok(form.finish())
    }

    /// One request to the token endpoint: the token, its lifetime and a rotated refresh token.
    async fn request(
        &self,
        state: &State,
        limit: Duration,
    ) -> Result<(Secret, Option<Duration>, Option<Secret>), TokenError> {
        let endpoint = self
            .endpoint
            .as_ref()
            .ok_or_else(|| TokenError::Config("no token_url".to_owned()))?;
        let body = self.form(state)?;
        let unavailable = |message: String| TokenError::Unavailable {
            endpoint: endpoint.url.clone(),
            message,
        };
        let (status, bytes) = tokio::time::timeout(limit, endpoint.post(self.tls.as_ref(), body))
            .await
            .map_err(|_| unavailable(format!("no answer within {} ms", limit.as_millis())))?
            .map_err(unavailable)?;
        let answer: TokenAnswer = serde_json::from_slice(&bytes).unwrap_or_default();
        if let Some(error) = answer.error.filter(|_| !(200..300).contains(&status)) {
            // 4xx with an OAuth2 error: permanent. A 5xx that names one is still the server's.
            if status < 500 {
                return Err(TokenError::Refused {
                    endpoint: endpoint.url.clone(),
                    error: clip(&error),
                    description: answer.error_description.map(|d| clip(&d)),
                });
            }
        }
        if !(200..300).contains(&status) {
            return Err(unavailable(format!("HTTP {status}")));
        }
        let access = answer
            .access_token
            .filter(|t| !t.is_empty())
            .ok_or_else(|| unavailable("the answer holds no access_token".to_owned()))?;
        Ok((
            Secret(access),
            answer.expires_in.map(Duration::from_secs),
            answer.refresh_token.filter(|t| !t.is_empty()).map(Secret),
        ))
    }
}

/// At most 300 characters of the endpoint's words.
fn clip(text: &str) -> String {
    let clean: String = text.chars().filter(|c| !c.is_control()).take(300).collect();
    clean
}

#[derive(Default, Deserialize)]
struct TokenAnswer {
    access_token: Option<String>,
    expires_in: Option<u64>,
    refresh_token: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// Runs the token command: its standard output is the token, or a JSON token answer.
async fn run_command(
    command: &[String],
    limit: Duration,
) -> Result<(Secret, Option<Duration>, Option<Secret>), TokenError> {
    let name = command.first().cloned().unwrap_or_default();
    let failed = |message: String| TokenError::Unavailable {
        endpoint: format!("token_command {name}"),
        message,
    };
    let mut child = tokio::process::Command::new(&name)
        .args(&command[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| failed(format!("could not start: {e}")))?;
    let mut out = Vec::new();
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| failed("no standard output".to_owned()))?;
    let run = async {
        (&mut stdout)
            .take(MAX_ANSWER_BYTES as u64)
            .read_to_end(&mut out)
            .await
            .map_err(|e| e.to_string())?;
        child.wait().await.map_err(|e| e.to_string())
    };
    let status = tokio::time::timeout(limit, run)
        .await
        .map_err(|_| failed(format!("did not finish within {} ms", limit.as_millis())))?
        .map_err(failed)?;
    if !status.success() {
        return Err(failed(format!("exited with {status}")));
    }
    let text = String::from_utf8_lossy(&out).trim().to_owned();
    if text.starts_with('{') {
        let answer: TokenAnswer = serde_json::from_str(&text)
            .map_err(|e| failed(format!("printed JSON that is no token answer: {e}")))?;
        let access = answer
            .access_token
            .filter(|t| !t.is_empty())
            .ok_or_else(|| failed("printed no access_token".to_owned()))?;
        return Ok((
            Secret(access),
            answer.expires_in.map(Duration::from_secs),
            None,
        ));
    }
    if text.is_empty() || text.contains(char::is_whitespace) {
        return Err(failed("printed no token".to_owned()));
    }
    Ok((Secret(text), None, None))
}

/// Writes `value` to `path` through a temporary file in the same folder, mode 0600.
fn write_private(path: &Path, value: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(value.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = dir {
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

/// Largest token answer read.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// A token endpoint URL, split.
#[derive(Clone, Debug)]
struct Endpoint {
    url: String,
    https: bool,
    host: String,
    port: u16,
    path: String,
}

impl Endpoint {
    fn parse(url: &str) -> Result<Self, String> {
        let (https, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(format!("{url:?} is not an http(s) URL"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err("a token_url carries no credentials".to_owned());
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                match p.parse::<u16>() {
                    Ok(port) => (h.to_owned(), port),
                    Err(_) if authority.starts_with('[') && authority.ends_with(']') => {
                        (authority.to_owned(), if https { 443 } else { 80 })
                    }
                    Err(_) => return Err(format!("{url:?} has a bad port")),
                }
            }
            _ => (authority.to_owned(), if https { 443 } else { 80 }),
        };
        if host.is_empty() {
            return Err(format!("{url:?} names no host"));
        }
        if !https && !is_loopback_host(&host) {
            return Err(format!(
                "{url:?}: plain http only to a loopback host; use https"
            ));
        }
        Ok(Self {
            url: url.to_owned(),
            https,
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            path: path.to_owned(),
        })
    }

    /// POSTs a form; the status and at most [`MAX_ANSWER_BYTES`] of the body.
    async fn post(
        &self,
        tls: Option<&Arc<tokio_rustls::rustls::ClientConfig>>,
        form: String,
    ) -> Result<(u16, Vec<u8>), String> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("connecting to {}:{}: {e}", self.host, self.port))?;
        let _ = tcp.set_nodelay(true);
        let request = hyper::Request::post(self.path.as_str())
            .header(hyper::header::HOST, self.host_header())
            .header(
                hyper::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(hyper::header::ACCEPT, "application/json")
            .header(hyper::header::USER_AGENT, "plba")
            .body(Full::new(hyper::body::Bytes::from(form)))
            .map_err(|e| e.to_string())?;
        match tls {
            Some(tls) => {
                let name = rustls_pki_types::ServerName::try_from(self.host.clone())
                    .map_err(|e| format!("{:?} is not a server name: {e}", self.host))?;
                let stream = tokio_rustls::TlsConnector::from(Arc::clone(tls))
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS handshake with {}: {e}", self.host))?;
                exchange(stream, request).await
            }
            None => exchange(tcp, request).await,
        }
    }

    fn host_header(&self) -> String {
        let default = if self.https { 443 } else { 80 };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

async fn exchange<S>(
    stream: S,
    request: hyper::Request<Full<hyper::body::Bytes>>,
) -> Result<(u16, Vec<u8>), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(connection);
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes()
            .to_vec();
        Ok((status, body))
    }
    .await;
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_plain_http_is_loopback_only() {
        let e =
            Endpoint::parse("https://login.microsoftonline.com/t/oauth2/v2.0/token").expect("url");
        assert_eq!(
            (e.host.as_str(), e.port, e.https),
            ("login.microsoftonline.com", 443, true)
        );
        assert_eq!(e.path, "/t/oauth2/v2.0/token");
        let e = Endpoint::parse("http://127.0.0.1:8123/token").expect("url");
        assert_eq!((e.port, e.host_header().as_str()), (8123, "127.0.0.1:8123"));
        assert!(Endpoint::parse("http://idp.example/token").is_err());
        assert!(Endpoint::parse("https://user:pw@idp.example/token").is_err());
        assert!(Endpoint::parse("ftp://idp.example/token").is_err());
    }

    #[test]
    fn a_secret_never_prints() {
        let s = Secret::new("very-secret");
        assert_eq!(format!("{s:?}"), "[redacted]");
        let t = AccessToken {
            secret: s,
            expires_at: None,
            renew_at: None,
        };
        assert!(!format!("{t:?}").contains("very-secret"));
    }

    #[test]
    fn exactly_one_way_to_a_token() {
        let none = OAuth2Config::default();
        assert!(none.problems("p")[0].to_string().contains("exactly one"));
        let both = OAuth2Config {
            grant: Some(Grant::ClientCredentials),
            token_command: Some(vec!["x".into()]),
            ..OAuth2Config::default()
        };
        assert!(both.problems("p")[0].to_string().contains("exactly one"));
        let no_secret = OAuth2Config {
            grant: Some(Grant::ClientCredentials),
            token_url: Some("https://idp.example/token".into()),
            client_id: Some("app".into()),
            client_secret_env: Some("PLBA_TEST_UNSET_SECRET_VAR".into()),
            ..OAuth2Config::default()
        };
        let problems: Vec<String> = no_secret
            .problems("p")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("PLBA_TEST_UNSET_SECRET_VAR is not set")),
            "{problems:?}"
        );
    }
}
