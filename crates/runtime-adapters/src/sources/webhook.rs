//! A webhook source (`source-webhook` feature): providers announce work by HTTP `POST`, and
//! each accepted delivery becomes one pointer task.
//!
//! The answer is `202` only once the task is enqueued (or the queue already knew its id): a
//! delivery that was answered 2xx is never lost, and a provider's retry of it (the same
//! delivery id) creates no second task. When the queue cannot take it (unavailable, or the
//! pool at its high watermark) the answer is `503` with `Retry-After` and nothing is
//! enqueued, so the sender tries again. Bad requests get a JSON error and enqueue nothing.
//!
//! The source listens on its own address (`bind`, `path`), apart from the control plane:
//! providers reach it from outside while operators' routes stay private.
//!
//! Authentication: the Standard Webhooks scheme (`webhook-id`, `webhook-timestamp`,
//! `webhook-signature` = `v1,<base64 HMAC-SHA256 of id.timestamp.body>`, several secrets
//! for rotation, a timestamp tolerance against replay), or a shared secret in a header,
//! compared in constant time. Secrets come from the environment or a file, never the config
//! text, and are never logged.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use runtime_contracts::{
    BoxFuture, ConfigProblem, PublishResult, SourceContext, SourceError, SourceState, SourceStatus,
    Task, TaskSource,
};
use serde::Deserialize;
use serde_json::{json, Value};

/// How deliveries prove where they come from.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum WebhookAuth {
    /// Standard Webhooks signatures. Each secret (`whsec_<base64>` or raw text) is read from
    /// an environment variable named in `secrets_env`, or from the lines of `secrets_file`.
    Standard {
        /// Environment variables holding the secrets (more than one while rotating).
        #[serde(default)]
        secrets_env: Vec<String>,
        /// A file whose non-empty lines are the secrets.
        #[serde(default)]
        secrets_file: Option<std::path::PathBuf>,
        /// Largest difference between `webhook-timestamp` and now, in seconds.
        #[serde(default = "default_tolerance")]
        tolerance_secs: u64,
    },
    /// A header (or, for senders that cannot set one, such as Google Pub/Sub push, a query
    /// parameter of the push URL) that must carry the secret held in `secret_env`.
    SharedSecret {
        /// The header (`x-webhook-token`, say).
        #[serde(default)]
        header: Option<String>,
        /// The query parameter (`token`, say), instead of a header.
        #[serde(default)]
        query: Option<String>,
        /// The environment variable holding the secret...
        #[serde(default)]
        secret_env: Option<String>,
        /// ...or a file holding it (its first non-empty line).
        #[serde(default)]
        secret_file: Option<std::path::PathBuf>,
    },
    /// Microsoft Graph change notifications (`format = "graph"`): every notification's
    /// `clientState` must equal the secret held in `client_state_env` (the value given when
    /// the subscription was created).
    GraphClientState {
        /// The environment variable holding the client state...
        #[serde(default)]
        client_state_env: Option<String>,
        /// ...or a file holding it (its first non-empty line).
        #[serde(default)]
        client_state_file: Option<std::path::PathBuf>,
    },
}

/// How a delivery's body is read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookFormat {
    /// Any JSON object: one task whose payload is the body; the delivery id comes from
    /// `id_header` or `id_pointer`.
    #[default]
    Json,
    /// A Google Pub/Sub push envelope (`message.data` base64, `message.attributes`,
    /// `message.messageId`): one task whose id is the `messageId` and whose payload holds
    /// the decoded data (as JSON when it is JSON), the attributes and the subscription.
    Pubsub,
    /// Microsoft Graph change notifications (`{"value": [...]}`): the `validationToken`
    /// handshake is answered, every notification's `clientState` is checked, and each
    /// notification becomes one task (its `clientState` removed).
    Graph,
    /// Dovecot's `push_notification` OX driver (`PUT`, `{"user", "event": "messageNew",
    /// "folder", "imap-uidvalidity", "imap-uid", ...}`): a `messageNew` becomes one IMAP
    /// pointer task (`account`, `mailbox`, `uid_validity`, `uid`) for the `task_source`
    /// to load and complete; other events are answered and ignored.
    Dovecot,
}

fn default_tolerance() -> u64 {
    300
}

/// `[sources.<id>]` with `type = "webhook"`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct WebhookConfig {
    /// Address of the listener, e.g. `0.0.0.0:8443` behind a TLS proxy.
    pub bind: String,
    /// The path deliveries are posted to.
    #[serde(default = "default_path")]
    pub path: String,
    /// The pool whose queue receives the tasks.
    pub pool: String,
    /// Kind of the published tasks.
    #[serde(default = "default_kind")]
    pub kind: String,
    /// The source whose worker side loads and completes the tasks (an IMAP source for a
    /// new-mail notification); this webhook source itself when unset (the content is then
    /// the delivery's JSON body).
    #[serde(default)]
    pub task_source: Option<String>,
    /// Where the delivery id is: a header (`webhook-id` by default)...
    #[serde(default = "default_id_header")]
    pub id_header: String,
    /// ...or, when set, a JSON pointer into the body (`/message/messageId`).
    #[serde(default)]
    pub id_pointer: Option<String>,
    /// Largest body accepted, in bytes.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Connections open at once; one more is closed at once (load shedding at the door).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Longest a client may take to send a request's headers (slow senders hold nothing).
    #[serde(default = "default_header_timeout_ms")]
    pub header_timeout_ms: u64,
    /// Longest one request may take, its body included (`408` beyond).
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Requests handled at once; more get `503` with `Retry-After`.
    #[serde(default = "default_max_concurrent_requests")]
    pub max_concurrent_requests: usize,
    /// How long a delivery may wait for room in the pool before it is refused with 503,
    /// in milliseconds.
    #[serde(default = "default_capacity_wait")]
    pub capacity_wait_ms: u64,
    /// The `Retry-After` given with a 503, in seconds.
    #[serde(default = "default_retry_after")]
    pub retry_after_secs: u64,
    /// Accept the in-memory queue although an enqueue there is lost with the process.
    #[serde(default)]
    pub allow_volatile_queue: bool,
    /// How the body is read (`json`, `pubsub`, `graph`, `dovecot`).
    #[serde(default)]
    pub format: WebhookFormat,
    /// For `format = "dovecot"`: the Dovecot user whose mailbox `task_source` reads. A
    /// notification for any other user is answered and ignored: its UIDs are another
    /// mailbox's.
    #[serde(default)]
    pub dovecot_user: Option<String>,
    /// How deliveries authenticate.
    pub auth: WebhookAuth,
}

fn default_path() -> String {
    "/webhook".into()
}
fn default_kind() -> String {
    "webhook.delivery".into()
}
fn default_id_header() -> String {
    "webhook-id".into()
}
fn default_max_connections() -> usize {
    256
}
fn default_header_timeout_ms() -> u64 {
    10_000
}
fn default_request_timeout_ms() -> u64 {
    10_000
}
fn default_max_concurrent_requests() -> usize {
    64
}
fn default_max_body() -> usize {
    256 * 1024
}
fn default_capacity_wait() -> u64 {
    1_000
}
fn default_retry_after() -> u64 {
    5
}

impl WebhookConfig {
    /// Problems with these values, keyed under `prefix`.
    pub fn problems(&self, prefix: &str) -> Vec<ConfigProblem> {
        let mut problems = runtime_contracts::config::require_positive(
            prefix,
            &[
                ("max_body_bytes", self.max_body_bytes as u64),
                ("retry_after_secs", self.retry_after_secs),
                ("max_connections", self.max_connections as u64),
                ("header_timeout_ms", self.header_timeout_ms),
                ("request_timeout_ms", self.request_timeout_ms),
                (
                    "max_concurrent_requests",
                    self.max_concurrent_requests as u64,
                ),
            ],
        );
        if self.bind.parse::<SocketAddr>().is_err() {
            problems.push(ConfigProblem::new(
                format!("{prefix}.bind"),
                format!("{:?} is not an address and port", self.bind),
            ));
        }
        if !self.path.starts_with('/') {
            problems.push(ConfigProblem::new(
                format!("{prefix}.path"),
                "must start with /",
            ));
        }
        if self
            .id_pointer
            .as_deref()
            .is_some_and(|p| !p.starts_with('/'))
        {
            problems.push(ConfigProblem::new(
                format!("{prefix}.id_pointer"),
                "must be a JSON pointer starting with /",
            ));
        }
        let graph_auth = matches!(self.auth, WebhookAuth::GraphClientState { .. });
        if graph_auth != (self.format == WebhookFormat::Graph) {
            problems.push(ConfigProblem::new(
                format!("{prefix}.auth"),
                "graph_client_state goes with format = \"graph\", and a graph endpoint needs it",
            ));
        }
        if let WebhookAuth::SharedSecret { header, query, .. } = &self.auth {
            if header.is_some() == query.is_some() {
                problems.push(ConfigProblem::new(
                    format!("{prefix}.auth"),
                    "a shared secret is in a header or in a query parameter: name exactly one",
                ));
            }
        }
        if self.format != WebhookFormat::Json && self.id_pointer.is_some() {
            problems.push(ConfigProblem::new(
                format!("{prefix}.id_pointer"),
                "the pubsub, graph and dovecot formats take their ids from the body themselves",
            ));
        }
        if self.format == WebhookFormat::Dovecot {
            if self.task_source.is_none() {
                problems.push(ConfigProblem::new(
                    format!("{prefix}.task_source"),
                    "a dovecot notification points at an IMAP message: name the IMAP source that loads it",
                ));
            }
            if self.dovecot_user.as_deref().is_none_or(str::is_empty) {
                problems.push(ConfigProblem::new(
                    format!("{prefix}.dovecot_user"),
                    "name the Dovecot user whose mailbox task_source reads: another user's UIDs point elsewhere",
                ));
            }
        } else if self.dovecot_user.is_some() {
            problems.push(ConfigProblem::new(
                format!("{prefix}.dovecot_user"),
                "only for format = \"dovecot\"",
            ));
        }
        match self.auth.secrets() {
            Ok(secrets) if secrets.is_empty() => problems.push(ConfigProblem::new(
                format!("{prefix}.auth"),
                "no secret: name secrets_env or secrets_file",
            )),
            Ok(_) => {}
            Err(why) => problems.push(ConfigProblem::new(format!("{prefix}.auth"), why)),
        }
        problems
    }
}

/// The fewest bytes a webhook secret (or its decoded `whsec_` key) may have.
pub const MIN_SECRET_BYTES: usize = 16;

/// A secret from the environment variable `env`, else from the first non-empty line of
/// `file`; an error names what is missing (never the secret).
fn one_secret(env: Option<&str>, file: Option<&std::path::Path>) -> Result<String, String> {
    match (env, file) {
        (Some(var), _) => {
            std::env::var(var).map_err(|_| format!("the environment variable {var} is not set"))
        }
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| format!("{} holds no secret", path.display())),
        (None, None) => Err("name the secret's environment variable or file".into()),
    }
}

impl WebhookAuth {
    /// The secrets' key bytes; an error names what is missing (never a secret).
    fn secrets(&self) -> Result<Vec<Vec<u8>>, String> {
        let texts: Vec<String> = match self {
            Self::Standard {
                secrets_env,
                secrets_file,
                ..
            } => {
                let mut texts = Vec::new();
                for var in secrets_env {
                    texts.push(
                        std::env::var(var)
                            .map_err(|_| format!("the environment variable {var} is not set"))?,
                    );
                }
                if let Some(path) = secrets_file {
                    let text = std::fs::read_to_string(path)
                        .map_err(|e| format!("reading {}: {e}", path.display()))?;
                    texts.extend(
                        text.lines()
                            .map(str::trim)
                            .filter(|l| !l.is_empty())
                            .map(str::to_owned),
                    );
                }
                texts
            }
            Self::SharedSecret {
                secret_env: env,
                secret_file: file,
                ..
            }
            | Self::GraphClientState {
                client_state_env: env,
                client_state_file: file,
            } => vec![one_secret(env.as_deref(), file.as_deref())?],
        };
        let keys: Vec<Vec<u8>> = texts
            .iter()
            .map(|t| match (self, t.strip_prefix("whsec_")) {
                (Self::Standard { .. }, Some(b64)) => {
                    use base64::Engine as _;
                    base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .map_err(|_| "a whsec_ secret is not base64".to_owned())
                }
                _ => Ok(t.as_bytes().to_vec()),
            })
            .collect::<Result<_, _>>()?;
        // An empty secret matches a missing header and keys an HMAC anyone can compute; a
        // short one or a placeholder is guessed.
        for (n, key) in keys.iter().enumerate() {
            if let Some(why) = crate::secret::weakness(key, MIN_SECRET_BYTES) {
                return Err(format!("secret {} {why}", n + 1));
            }
        }
        Ok(keys)
    }
}

async fn overloaded(_: tower::BoxError) -> axum::response::Response {
    let mut response = refuse(
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
        "too many requests at once; retry shortly",
    )
    .into_response();
    response.headers_mut().insert(
        axum::http::header::RETRY_AFTER,
        axum::http::HeaderValue::from_static("1"),
    );
    response
}

/// Serves `app` on `listener` until `shutdown`, facing the internet: at most
/// `max_connections` connections (one more is closed at once), each given
/// `header_timeout_ms` to send its headers (a client trickling them holds nothing for
/// long), HTTP/1.1 only (what providers and Dovecot speak); open requests finish at
/// shutdown.
async fn serve_bounded(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    config: &WebhookConfig,
    shutdown: runtime_contracts::Shutdown,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(config.max_connections));
    let header_timeout = Duration::from_millis(config.header_timeout_ms);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let Ok((tcp, peer)) = accepted else {
            // Out of file descriptors, say: try again shortly rather than spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            tracing::warn!(%peer, "webhook: too many connections; one more was closed");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout);
            let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            drop(permit);
        });
    }
}

/// The webhook source. See the module docs.
pub struct WebhookSource {
    id: String,
    config: Arc<WebhookConfig>,
    shared_id: Arc<str>,
    state: Arc<Mutex<Counters>>,
    bound: Mutex<Option<SocketAddr>>,
    ready: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Counters {
    state: Option<SourceState>,
    published: u64,
    error: Option<String>,
}

impl std::fmt::Debug for WebhookSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSource")
            .field("id", &self.id)
            .field("bind", &self.config.bind)
            .field("path", &self.config.path)
            .finish_non_exhaustive()
    }
}

type HmacSha256 = Hmac<sha2::Sha256>;

/// A refusal: status and a stable error code with a message.
fn refuse(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let message = message.into();
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

/// How long the id of a Dovecot notification's task stays known after its ack: longer than
/// any search of the mailbox takes, short enough that a message marked unread again is read
/// again by the mailbox's source.
const DOVECOT_KEEP: Duration = Duration::from_secs(300);

/// A refusal not yet made into a response: status, error code, message.
struct Refusal(StatusCode, &'static str, String);

/// What serving a delivery needs of the source.
struct Handler {
    id: String,
    config: Arc<WebhookConfig>,
    shared_id: Arc<str>,
    state: Arc<Mutex<Counters>>,
    ctx: SourceContext,
    secrets: Vec<Vec<u8>>,
}

impl WebhookSource {
    /// A source named `id`.
    pub fn new(id: impl Into<String>, config: WebhookConfig) -> Self {
        let id = id.into();
        let shared_id: Arc<str> =
            Arc::from(config.task_source.clone().unwrap_or_else(|| id.clone()));
        Self {
            id,
            config: Arc::new(config),
            shared_id,
            state: Arc::default(),
            bound: Mutex::new(None),
            ready: tokio::sync::Notify::new(),
        }
    }

    /// The address it listens on, once it does (for a `bind` on port 0).
    pub async fn local_addr(&self) -> SocketAddr {
        loop {
            let notified = self.ready.notified();
            if let Some(addr) = *self.bound.lock().unwrap_or_else(|e| e.into_inner()) {
                return addr;
            }
            notified.await;
        }
    }

    fn counters(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Handler {
    fn counters(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `given` is one of the secrets, in constant time.
    fn is_secret(&self, given: &[u8]) -> bool {
        use subtle::ConstantTimeEq as _;
        self.secrets
            .iter()
            .fold(false, |ok, s| ok | bool::from(s.as_slice().ct_eq(given)))
    }

    /// Checks a delivery's proof of origin; a refusal's error code and message (401).
    /// Graph's `clientState` is checked per notification, once the body is read.
    fn authenticate(
        &self,
        headers: &HeaderMap,
        query: &HashMap<String, String>,
        body: &[u8],
    ) -> Result<(), (&'static str, String)> {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        match &self.config.auth {
            WebhookAuth::GraphClientState { .. } => Ok(()),
            WebhookAuth::SharedSecret {
                header,
                query: param,
                ..
            } => {
                let (given, name) = match (header, param) {
                    (Some(header), _) => (
                        headers.get(header.as_str()).map(|v| v.as_bytes()),
                        format!("header {header}"),
                    ),
                    (None, Some(param)) => (
                        query.get(param).map(String::as_bytes),
                        format!("query parameter {param}"),
                    ),
                    (None, None) => (None, "secret".to_owned()),
                };
                if self.is_secret(given.unwrap_or_default()) {
                    Ok(())
                } else {
                    Err(("bad_secret", format!("missing or wrong {name}")))
                }
            }
            WebhookAuth::Standard { tolerance_secs, .. } => {
                let (Some(id), Some(timestamp), Some(signatures)) = (
                    text("webhook-id"),
                    text("webhook-timestamp"),
                    text("webhook-signature"),
                ) else {
                    return Err((
                        "missing_signature",
                        "webhook-id, webhook-timestamp and webhook-signature are required".into(),
                    ));
                };
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let stale = timestamp
                    .parse::<u64>()
                    .map_or(true, |t| t.abs_diff(now) > *tolerance_secs);
                if stale {
                    return Err((
                        "stale_timestamp",
                        format!("webhook-timestamp is not within {tolerance_secs} s of now"),
                    ));
                }
                use base64::Engine as _;
                let given: Vec<Vec<u8>> = signatures
                    .split(' ')
                    .filter_map(|s| s.strip_prefix("v1,"))
                    .filter_map(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
                    .collect();
                let ok = self.secrets.iter().any(|secret| {
                    given.iter().any(|sig| {
                        let Ok(mut mac) = HmacSha256::new_from_slice(secret) else {
                            return false;
                        };
                        mac.update(id.as_bytes());
                        mac.update(b".");
                        mac.update(timestamp.as_bytes());
                        mac.update(b".");
                        mac.update(body);
                        mac.verify_slice(sig).is_ok()
                    })
                });
                if ok {
                    Ok(())
                } else {
                    Err(("bad_signature", "no signature matches".into()))
                }
            }
        }
    }

    /// The delivery id a JSON delivery names (header or pointer).
    fn json_delivery_id(&self, headers: &HeaderMap, payload: &Value) -> Result<String, Refusal> {
        let config = &self.config;
        let delivery = match &config.id_pointer {
            Some(pointer) => payload.pointer(pointer).and_then(id_text),
            None => headers
                .get(config.id_header.as_str())
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        };
        delivery.filter(|d| !d.is_empty()).ok_or_else(|| {
            Refusal(
                StatusCode::BAD_REQUEST,
                "missing_delivery_id",
                format!(
                    "the delivery id ({}) is missing",
                    config.id_pointer.as_deref().unwrap_or(&config.id_header)
                ),
            )
        })
    }

    /// The tasks a delivery announces (delivery id and payload each), or its refusal.
    fn announced(
        &self,
        headers: &HeaderMap,
        payload: Value,
    ) -> Result<Vec<(String, Value)>, Refusal> {
        let bad =
            |code: &'static str, message: String| Refusal(StatusCode::BAD_REQUEST, code, message);
        match self.config.format {
            WebhookFormat::Json => {
                let id = self.json_delivery_id(headers, &payload)?;
                Ok(vec![(id, payload)])
            }
            WebhookFormat::Pubsub => {
                let message = payload
                    .get("message")
                    .filter(|m| m.is_object())
                    .ok_or_else(|| {
                        bad(
                            "invalid_envelope",
                            "a Pub/Sub push envelope has a message object".into(),
                        )
                    })?;
                let id = message
                    .get("messageId")
                    .or_else(|| message.get("message_id"))
                    .and_then(id_text)
                    .filter(|id| !id.is_empty())
                    .ok_or_else(|| {
                        bad(
                            "missing_delivery_id",
                            "the delivery id (message.messageId) is missing".into(),
                        )
                    })?;
                let data = match message.get("data") {
                    None | Some(Value::Null) => Value::Null,
                    Some(Value::String(b64)) => {
                        use base64::Engine as _;
                        let bytes = base64::engine::general_purpose::STANDARD
                            .decode(b64)
                            .map_err(|_| {
                                bad("invalid_envelope", "message.data is not base64".into())
                            })?;
                        match serde_json::from_slice::<Value>(&bytes) {
                            Ok(json) => json,
                            Err(_) => String::from_utf8(bytes)
                                .map(Value::String)
                                .unwrap_or_else(|_| Value::String(b64.clone())),
                        }
                    }
                    Some(_) => {
                        return Err(bad(
                            "invalid_envelope",
                            "message.data is not a string".into(),
                        ))
                    }
                };
                let pick = |v: Option<&Value>| v.cloned().unwrap_or(Value::Null);
                Ok(vec![(
                    id,
                    json!({
                        "data": data,
                        "attributes": pick(message.get("attributes")),
                        "publish_time": pick(message.get("publishTime").or_else(|| message.get("publish_time"))),
                        "subscription": pick(payload.get("subscription")),
                    }),
                )])
            }
            WebhookFormat::Dovecot => {
                if payload.get("event").and_then(Value::as_str) != Some("messageNew") {
                    return Ok(Vec::new());
                }
                let text = |k: &str| payload.get(k).and_then(Value::as_str);
                let number = |k: &str| payload.get(k).and_then(Value::as_u64).filter(|n| *n > 0);
                if text("user") != self.config.dovecot_user.as_deref() {
                    tracing::debug!(source = %self.id, user = ?text("user"), "notification for another user ignored");
                    return Ok(Vec::new());
                }
                let (Some(user), Some(folder)) = (text("user"), text("folder")) else {
                    return Err(bad(
                        "missing_delivery_id",
                        "a messageNew names user, folder, imap-uidvalidity and imap-uid".into(),
                    ));
                };
                let (Some(validity), Some(uid)) = (number("imap-uidvalidity"), number("imap-uid"))
                else {
                    // Dovecot sends `imap-uid: 0` when the delivery's UID is not assigned
                    // yet (a Maildir whose UID list another session holds locked): the mail
                    // is there, its UID unknown. The mailbox's own source searches now.
                    let woke = self.ctx.sources.wake(&self.shared_id);
                    tracing::debug!(source = %self.id, folder, woke, "a notification without a UID; the mailbox's source searches now");
                    return Ok(Vec::new());
                };
                Ok(vec![(
                    format!("{folder}:{validity}:{uid}"),
                    json!({
                        "account": user,
                        "mailbox": folder,
                        "uid_validity": validity,
                        "uid": uid,
                    }),
                )])
            }
            WebhookFormat::Graph => {
                let Some(Value::Array(notifications)) = payload.get("value") else {
                    return Err(bad(
                        "invalid_envelope",
                        "Graph notifications come as {\"value\": [...]}".into(),
                    ));
                };
                let mut tasks = Vec::with_capacity(notifications.len());
                for notification in notifications {
                    let Value::Object(fields) = notification else {
                        return Err(bad(
                            "invalid_envelope",
                            "a notification is not an object".into(),
                        ));
                    };
                    let state = fields
                        .get("clientState")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    if !self.is_secret(state.as_bytes()) {
                        return Err(Refusal(
                            StatusCode::UNAUTHORIZED,
                            "bad_client_state",
                            "a notification's clientState is missing or wrong".into(),
                        ));
                    }
                    let field = |name: &str| fields.get(name).and_then(Value::as_str);
                    let Some(subscription) = field("subscriptionId") else {
                        return Err(bad(
                            "missing_delivery_id",
                            "a notification has no subscriptionId".into(),
                        ));
                    };
                    // Graph gives no delivery id: a retry repeats the notification, so its
                    // subscription, change and resource (and the version, when given) name it.
                    let what = field("lifecycleEvent")
                        .map(|event| {
                            format!(
                                "lifecycle:{event}:{}",
                                field("subscriptionExpirationDateTime").unwrap_or_default()
                            )
                        })
                        .or_else(|| {
                            field("resource").map(|resource| {
                                let version = notification
                                    .pointer("/resourceData/@odata.etag")
                                    .and_then(Value::as_str)
                                    .map(|etag| format!(":{etag}"))
                                    .unwrap_or_default();
                                format!(
                                    "{}:{resource}{version}",
                                    field("changeType").unwrap_or("changed")
                                )
                            })
                        });
                    let Some(what) = what else {
                        return Err(bad(
                            "missing_delivery_id",
                            "a notification has neither resource nor lifecycleEvent".into(),
                        ));
                    };
                    let mut fields = fields.clone();
                    fields.remove("clientState");
                    tasks.push((format!("{subscription}:{what}"), Value::Object(fields)));
                }
                Ok(tasks)
            }
        }
    }

    async fn accept(
        &self,
        headers: HeaderMap,
        query: HashMap<String, String>,
        body: Bytes,
    ) -> Response {
        let config = &self.config;
        if config.format == WebhookFormat::Graph {
            if let Some(token) = query.get("validationToken") {
                return validation_answer(token);
            }
        }
        let json_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !json_type {
            return refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "deliveries are application/json",
            );
        }
        if let Err((code, message)) = self.authenticate(&headers, &query, &body) {
            return refuse(StatusCode::UNAUTHORIZED, code, message);
        }
        let payload: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return refuse(StatusCode::BAD_REQUEST, "invalid_json", e.to_string()),
        };
        let announced = match self.announced(&headers, payload) {
            Ok(announced) => announced,
            Err(Refusal(status, code, message)) => return refuse(status, code, message),
        };
        let mut tasks = Vec::with_capacity(announced.len());
        for (delivery, payload) in announced {
            // A Dovecot notification gets the id the IMAP source gives the same message, so
            // the notification and the source's own search publish one task between them.
            let dovecot = config.format == WebhookFormat::Dovecot;
            let id = if dovecot {
                format!("imap:{}:{delivery}", self.shared_id)
            } else {
                format!("webhook:{}:{delivery}", self.id)
            };
            match Task::new(
                id,
                config.kind.as_str(),
                Arc::clone(&self.shared_id),
                payload,
            ) {
                // The source's own search may have listed the message just before this task
                // completed: the id stays known a while, so that search publishes nothing.
                Ok(task) if dovecot => tasks.push(task.keep_id_after_ack_for(DOVECOT_KEEP)),
                // A provider's retry after the task was done must not make a second one.
                Ok(task) => tasks.push(task.keep_id_after_ack()),
                Err(e @ runtime_contracts::TaskError::PayloadTooLarge { .. }) => {
                    return refuse(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "payload_too_large",
                        e.to_string(),
                    )
                }
                Err(e) => {
                    return refuse(StatusCode::BAD_REQUEST, "invalid_delivery", e.to_string())
                }
            }
        }
        if tasks.is_empty() {
            return (
                StatusCode::ACCEPTED,
                axum::Json(json!({"tasks": [], "status": "ignored"})),
            )
                .into_response();
        }
        let unavailable = |why: String| {
            let mut answer = refuse(StatusCode::SERVICE_UNAVAILABLE, "unavailable", why);
            answer.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from(config.retry_after_secs),
            );
            answer
        };
        let wait = Duration::from_millis(config.capacity_wait_ms);
        if tokio::time::timeout(wait, self.ctx.backpressure.wait_for_capacity())
            .await
            .is_err()
        {
            return unavailable(format!("pool {} is at its high watermark", config.pool));
        }
        let traces: Vec<_> = tasks
            .iter_mut()
            .map(|task| {
                self.ctx
                    .tracer
                    .start_trace(task, "webhook", &*self.ctx.queue)
            })
            .collect();
        let ids: Vec<String> = tasks.iter().map(|t| t.id.to_string()).collect();
        let published = match tasks.len() {
            1 => match tasks.pop() {
                Some(task) => self.ctx.queue.publish(task).await.map(|r| vec![r]),
                None => Ok(Vec::new()),
            },
            _ => self.ctx.queue.publish_batch(tasks).await,
        };
        drop(traces);
        match published {
            Ok(results) => {
                let mut counters = self.counters();
                counters.state = Some(SourceState::Running);
                counters.error = None;
                let answers: Vec<Value> = ids
                    .iter()
                    .zip(&results)
                    .map(|(id, result)| {
                        let status = if *result == PublishResult::Enqueued {
                            counters.published += 1;
                            "enqueued"
                        } else {
                            "already_known"
                        };
                        json!({"task": id, "status": status})
                    })
                    .collect();
                let body = match (config.format, <[Value; 1]>::try_from(answers)) {
                    (WebhookFormat::Graph, Ok([one])) => json!({"tasks": [one]}),
                    (_, Ok([one])) => one,
                    (_, Err(answers)) => json!({"tasks": answers}),
                };
                (StatusCode::ACCEPTED, axum::Json(body)).into_response()
            }
            Err(e) => {
                tracing::warn!(source = %self.id, tasks = ?ids, error = %e, "delivery refused: the queue did not take it");
                self.counters().error = Some(e.to_string());
                unavailable(format!("the queue did not take the delivery: {e}"))
            }
        }
    }
}

/// A JSON id: text, or a number written as text.
fn id_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Graph's subscription handshake: the token echoed as plain text within 10 seconds.
fn validation_answer(token: &str) -> Response {
    if token.is_empty() || token.len() > 4096 || token.chars().any(char::is_control) {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid_validation_token",
            "validationToken is empty, too long or not text",
        );
    }
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        token.to_owned(),
    )
        .into_response()
}

async fn post(
    State(handler): State<Arc<Handler>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // An unreadable query string is as good as none: the secret or token is then missing.
    let query = axum::extract::Query::<HashMap<String, String>>::try_from_uri(&uri)
        .map(|q| q.0)
        .unwrap_or_default();
    handler.accept(headers, query, body).await
}

impl TaskSource for WebhookSource {
    fn id(&self) -> &str {
        &self.id
    }

    fn start(&self, ctx: SourceContext) -> BoxFuture<'_, Result<(), SourceError>> {
        Box::pin(async move {
            let io = |message: String| SourceError::Io {
                source_id: self.id.clone(),
                message,
            };
            let secrets = self.config.auth.secrets().map_err(io)?;
            let listener = tokio::net::TcpListener::bind(&self.config.bind)
                .await
                .map_err(|e| io(format!("listening on {}: {e}", self.config.bind)))?;
            let addr = listener.local_addr().map_err(|e| io(e.to_string()))?;
            *self.bound.lock().unwrap_or_else(|e| e.into_inner()) = Some(addr);
            self.ready.notify_waiters();
            self.counters().state = Some(SourceState::Running);
            tracing::info!(source = %self.id, %addr, path = %self.config.path, "webhook listening");
            let shutdown = ctx.shutdown.clone();
            let handler = Arc::new(Handler {
                id: self.id.clone(),
                config: Arc::clone(&self.config),
                shared_id: Arc::clone(&self.shared_id),
                state: Arc::clone(&self.state),
                ctx,
                secrets,
            });
            let app = axum::Router::new()
                // Dovecot's push driver PUTs; most providers POST.
                .route(&self.config.path, axum::routing::post(post).put(post))
                .fallback(|| async {
                    refuse(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
                })
                .method_not_allowed_fallback(|| async {
                    refuse(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "method_not_allowed",
                        "deliveries are POSTed (or PUT)",
                    )
                })
                .layer(axum::extract::DefaultBodyLimit::max(
                    self.config.max_body_bytes,
                ))
                .with_state(handler)
                .layer(
                    tower::ServiceBuilder::new()
                        .layer(axum::error_handling::HandleErrorLayer::new(overloaded))
                        .layer(tower::load_shed::LoadShedLayer::new())
                        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                            self.config.max_concurrent_requests,
                        ))
                        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
                            StatusCode::REQUEST_TIMEOUT,
                            Duration::from_millis(self.config.request_timeout_ms),
                        )),
                );
            serve_bounded(listener, app, &self.config, shutdown).await;
            self.counters().state = Some(SourceState::Stopped);
            Ok(())
        })
    }

    fn status(&self) -> SourceStatus {
        let c = self.counters();
        SourceStatus {
            state: c.state.unwrap_or(SourceState::Idle),
            published: c.published,
            completed: 0,
            pending: 0,
            // Listening is its progress: a quiet provider is not a stalled source.
            last_event_age: matches!(c.state, Some(SourceState::Running)).then_some(Duration::ZERO),
            last_error: c.error.clone(),
            next_due: None,
            lease: None,
        }
    }

    /// The delivery's JSON body (for tasks this source loads itself).
    fn load_content<'a>(
        &'a self,
        task: &'a Task,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, SourceError>> {
        Box::pin(std::future::ready(super::payload_content(&self.id, task)))
    }

    /// Nothing to mark: the provider was answered when the task was enqueued.
    fn complete<'a>(&'a self, _task: &'a Task) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async { Ok(()) })
    }
}
