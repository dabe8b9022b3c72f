//! ERP delivery: each new order, as JSON (`docs/erp-order.schema.json`), POSTed once to the
//! endpoint of `[apps.mail_order_bot.erp]` from the outbox.
//!
//! The `Idempotency-Key` header (and the body's `id`) is the order's stable id, derived from
//! the message's identity: a delivery repeated after a crash carries the same key, so the
//! ERP applies it once. What an answer means:
//!
//! | answer                              | the row                                   |
//! |-------------------------------------|-------------------------------------------|
//! | 2xx                                 | delivered                                 |
//! | 409 (the key was applied already)   | delivered                                 |
//! | 408, 429, 5xx, a timeout, no answer | retried with backoff (429/503: `Retry-After`) |
//! | any other status                    | a dead letter with the status and an excerpt of the body |
//!
//! While the endpoint cannot be reached (no connection, a timeout, 502, 503 or 504) the
//! ERP's health is down: readiness says so, and the outbox pool's failed attempts go back
//! uncounted, so an outage of any length dead-letters nothing.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use runtime_contracts::config::secret_from;
use runtime_contracts::{
    BoxFuture, ConfigProblem, HandlerContext, HandlerError, Outcome, Task, TaskHandler,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::outbox::row_of;
use super::peer::{PeerHealth, HOLD_DOWN};
use super::store::{OrderStore, StoredOrder};

/// `[apps.mail_order_bot.erp]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ErpConfig {
    /// The endpoint each order is POSTed to (`http://` or `https://`).
    pub url: String,
    /// The header that carries the credential.
    #[serde(default = "default_auth_header")]
    pub auth_header: String,
    /// The environment variable holding the header's value (e.g. `Bearer …`).
    #[serde(default)]
    pub auth_env: Option<String>,
    /// Or a file whose first line is the header's value.
    #[serde(default)]
    pub auth_file: Option<PathBuf>,
    /// How long one delivery may take, connection included.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Signs each delivery with the Standard Webhooks scheme (`webhook-id`,
    /// `webhook-timestamp`, `webhook-signature`): the secret (`whsec_<base64>` or raw text)
    /// from this environment variable...
    #[serde(default)]
    pub signing_secret_env: Option<String>,
    /// ... or from the first line of this file.
    #[serde(default)]
    pub signing_secret_file: Option<PathBuf>,
    /// The longest `Retry-After` honoured; a longer one waits this long.
    #[serde(default = "default_max_retry_after_ms")]
    pub max_retry_after_ms: u64,
}

fn default_auth_header() -> String {
    "Authorization".to_owned()
}
fn default_timeout_ms() -> u64 {
    10_000
}
fn default_max_retry_after_ms() -> u64 {
    600_000
}

/// Most bytes of an answer's body kept for an operator.
const EXCERPT_BYTES: usize = 512;

impl ErpConfig {
    /// Problems with these values, keyed under `prefix`; `lease_ms` is the outbox's lease,
    /// which a delivery must fit in.
    pub fn problems(&self, prefix: &str, lease_ms: u64) -> Vec<ConfigProblem> {
        let key = |k: &str| format!("{prefix}.{k}");
        let mut problems = Vec::new();
        match reqwest::Url::parse(&self.url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {}
            Ok(_) => problems.push(ConfigProblem::new(
                key("url"),
                "must be an http:// or https:// URL with a host",
            )),
            Err(e) => problems.push(ConfigProblem::new(key("url"), format!("not a URL: {e}"))),
        }
        if reqwest::header::HeaderName::from_bytes(self.auth_header.as_bytes()).is_err() {
            problems.push(ConfigProblem::new(
                key("auth_header"),
                "not a valid header name",
            ));
        }
        if self.auth_env.is_some() && self.auth_file.is_some() {
            problems.push(ConfigProblem::new(
                key("auth_env"),
                "name auth_env or auth_file, not both",
            ));
        }
        match self.auth_value() {
            Ok(Some(v)) if reqwest::header::HeaderValue::from_str(&v).is_err() => {
                problems.push(ConfigProblem::new(
                    key("auth_env"),
                    "the credential is not a valid header value",
                ))
            }
            Ok(_) => {}
            Err(e) => problems.push(ConfigProblem::new(key("auth_env"), e)),
        }
        if self.signing_secret_env.is_some() && self.signing_secret_file.is_some() {
            problems.push(ConfigProblem::new(
                key("signing_secret_env"),
                "name signing_secret_env or signing_secret_file, not both",
            ));
        }
        if let Err(e) = self.signing_key() {
            problems.push(ConfigProblem::new(key("signing_secret_env"), e));
        }
        if self.timeout_ms == 0 {
            problems.push(ConfigProblem::new(key("timeout_ms"), "must be at least 1"));
        } else if self.timeout_ms >= lease_ms {
            problems.push(ConfigProblem::new(
                key("timeout_ms"),
                format!(
                    "must be below the outbox's lease_ms ({lease_ms}): a delivery still under way when its lease ends is started again elsewhere"
                ),
            ));
        }
        problems
    }

    fn auth_value(&self) -> Result<Option<String>, String> {
        secret_from(
            self.auth_env.as_deref(),
            self.auth_file.as_deref(),
            "ERP credential",
        )
    }

    /// The HMAC key of the signature, if deliveries are signed.
    fn signing_key(&self) -> Result<Option<Vec<u8>>, String> {
        let secret = secret_from(
            self.signing_secret_env.as_deref(),
            self.signing_secret_file.as_deref(),
            "ERP signing secret",
        )?;
        Ok(match secret {
            None => None,
            Some(s) => Some(match s.strip_prefix("whsec_") {
                Some(b64) => base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|_| "the whsec_ signing secret is not base64".to_owned())?,
                None => s.into_bytes(),
            }),
        })
    }
}

/// The order's stable id: the same for every delivery of it, from any replica, across
/// restarts and restores (it derives from the message, not from a database sequence).
pub fn order_key(message_identity: &str) -> String {
    let digest = Sha256::digest(message_identity.as_bytes());
    format!("order-{}", &hex::encode(digest)[..32])
}

/// The body of a delivery (`docs/erp-order.schema.json`).
#[derive(Clone, Debug, Serialize)]
pub struct ErpOrder<'a> {
    /// The document's version.
    pub version: u32,
    /// The stable id (also the `Idempotency-Key`).
    pub id: String,
    /// The order's number in the bot's store.
    pub number: i64,
    /// The client.
    pub client: ErpClient<'a>,
    /// Who sent the order.
    pub sender: &'a str,
    /// The mail's subject.
    pub subject: Option<&'a str>,
    /// The message's identity in the bot (`mid:<Message-ID>` or a content hash).
    pub message_identity: &'a str,
    /// When the order was recorded, UTC.
    pub created_at: &'a str,
    /// The lines, in the order they were read.
    pub lines: Vec<ErpLine<'a>>,
}

/// The client of an [`ErpOrder`].
#[derive(Clone, Debug, Serialize)]
pub struct ErpClient<'a> {
    /// The client's id in the directory.
    pub id: &'a str,
    /// Its name.
    pub name: &'a str,
}

/// One line of an [`ErpOrder`].
#[derive(Clone, Debug, Serialize)]
pub struct ErpLine<'a> {
    /// 1-based position.
    pub line: usize,
    /// Article number.
    pub sku: &'a str,
    /// How many.
    pub quantity: u32,
    /// Where it was read (`body`, `attachment:NAME`, ...).
    pub origin: &'a str,
}

impl<'a> ErpOrder<'a> {
    /// The delivery of `order`.
    pub fn of(order: &'a StoredOrder) -> Self {
        Self {
            version: 1,
            id: order_key(&order.message_identity),
            number: order.id,
            client: ErpClient {
                id: &order.client_id,
                name: &order.client_name,
            },
            sender: &order.sender,
            subject: order.subject.as_deref(),
            message_identity: &order.message_identity,
            created_at: &order.created_at,
            lines: order
                .lines
                .iter()
                .enumerate()
                .map(|(n, l)| ErpLine {
                    line: n + 1,
                    sku: &l.sku,
                    quantity: l.quantity,
                    origin: &l.origin,
                })
                .collect(),
        }
    }
}

/// The ERP's reachability (`erp` in readiness), at the host and port of `url`.
fn erp_health(url: &str) -> PeerHealth {
    let parsed = reqwest::Url::parse(url).ok();
    let host = parsed
        .as_ref()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_default();
    let port = parsed
        .as_ref()
        .and_then(reqwest::Url::port_or_known_default)
        .unwrap_or(80);
    PeerHealth::new("erp", "the ERP", &host, port)
}

/// Delivers the outbox's `erp` rows.
#[derive(Debug, Clone)]
pub struct ErpHandler {
    store: OrderStore,
    client: reqwest::Client,
    url: String,
    auth: Option<(reqwest::header::HeaderName, reqwest::header::HeaderValue)>,
    signing_key: Option<Arc<Vec<u8>>>,
    max_retry_after: Duration,
    health: Arc<PeerHealth>,
}

/// What one delivery came to.
enum Answer {
    Delivered(String),
    Retry(String, Option<Duration>, Away),
    Refused(String),
}

/// What a failed delivery says about the ERP.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Away {
    /// It answered: it is there.
    No,
    /// No connection, or 502/503/504: it is not there.
    Yes,
    /// No answer in time: maybe a slow order, maybe the ERP is gone.
    Maybe,
}

impl ErpHandler {
    /// A handler for `config` (checked by [`ErpConfig::problems`]) reading orders from
    /// `store`.
    pub fn new(store: OrderStore, config: &ErpConfig) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .connect_timeout(Duration::from_millis(config.timeout_ms.min(5_000)))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("the ERP's HTTP client: {e}"))?;
        let auth = match config.auth_value()? {
            None => None,
            Some(value) => Some((
                reqwest::header::HeaderName::from_bytes(config.auth_header.as_bytes())
                    .map_err(|e| format!("auth_header: {e}"))?,
                reqwest::header::HeaderValue::from_str(&value)
                    .map(|mut v| {
                        v.set_sensitive(true);
                        v
                    })
                    .map_err(|_| "the ERP credential is not a valid header value".to_owned())?,
            )),
        };
        Ok(Self {
            store,
            client,
            url: config.url.clone(),
            auth,
            signing_key: config.signing_key()?.map(Arc::new),
            max_retry_after: Duration::from_millis(config.max_retry_after_ms),
            health: Arc::new(erp_health(&config.url)),
        })
    }

    /// The ERP's reachability, for readiness and the outbox pool's gate.
    pub fn health(&self) -> Arc<PeerHealth> {
        Arc::clone(&self.health)
    }

    fn retry_after(&self, headers: &reqwest::header::HeaderMap) -> Option<Duration> {
        let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
        let wait = match value.trim().parse::<u64>() {
            Ok(secs) => Duration::from_secs(secs),
            Err(_) => {
                let at = chrono::DateTime::parse_from_rfc2822(value.trim()).ok()?;
                let secs = at.timestamp() - chrono::Utc::now().timestamp();
                Duration::from_secs(u64::try_from(secs).unwrap_or(0))
            }
        };
        Some(wait.min(self.max_retry_after))
    }

    async fn deliver(&self, order: &StoredOrder) -> Answer {
        let document = ErpOrder::of(order);
        let body = match serde_json::to_vec(&document) {
            Ok(body) => body,
            Err(e) => return Answer::Refused(format!("the order does not serialise: {e}")),
        };
        let mut request = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", &document.id);
        if let Some((name, value)) = &self.auth {
            request = request.header(name.clone(), value.clone());
        }
        if let Some(key) = &self.signing_key {
            let timestamp = chrono::Utc::now().timestamp().to_string();
            let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
                Ok(mac) => mac,
                Err(e) => return Answer::Refused(format!("the signing key: {e}")),
            };
            mac.update(document.id.as_bytes());
            mac.update(b".");
            mac.update(timestamp.as_bytes());
            mac.update(b".");
            mac.update(&body);
            let signature =
                base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
            request = request
                .header("webhook-id", &document.id)
                .header("webhook-timestamp", timestamp)
                .header("webhook-signature", format!("v1,{signature}"));
        }
        let response = match request.body(body).send().await {
            Ok(response) => response,
            Err(e) => {
                let (what, away) = if e.is_connect() {
                    ("could not connect", Away::Yes)
                } else if e.is_timeout() {
                    ("timed out", Away::Maybe)
                } else {
                    ("failed", Away::Maybe)
                };
                return Answer::Retry(
                    format!("the ERP delivery {what}: {}", error_chain(&e)),
                    None,
                    away,
                );
            }
        };
        let status = response.status();
        let retry_after = self.retry_after(response.headers());
        let excerpt = excerpt(response).await;
        let code = status.as_u16();
        let said = |what: &str| {
            if excerpt.is_empty() {
                format!("the ERP answered {code} {what}")
            } else {
                format!("the ERP answered {code} {what}: {excerpt}")
            }
        };
        if status.is_success() {
            Answer::Delivered(format!("{code}"))
        } else if code == 409 {
            Answer::Delivered("409: the key was applied already".to_owned())
        } else if code == 408 || code == 429 || status.is_server_error() {
            // 502, 503 and 504 say the ERP itself is not there.
            let away = if matches!(code, 502..=504) {
                Away::Yes
            } else {
                Away::No
            };
            Answer::Retry(said("(retried)"), retry_after, away)
        } else {
            Answer::Refused(said("(not retried)"))
        }
    }
}

/// The error and its causes, on one line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// The first [`EXCERPT_BYTES`] of an answer's body, on one line; the rest is not read.
async fn excerpt(mut response: reqwest::Response) -> String {
    let mut bytes = Vec::new();
    while bytes.len() < EXCERPT_BYTES {
        match tokio::time::timeout(Duration::from_secs(2), response.chunk()).await {
            Ok(Ok(Some(chunk))) => bytes.extend_from_slice(&chunk),
            _ => break,
        }
    }
    let mut text: String = String::from_utf8_lossy(&bytes[..bytes.len().min(EXCERPT_BYTES)])
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    if bytes.len() >= EXCERPT_BYTES {
        text.push('…');
    }
    text
}

impl ErpHandler {
    /// The order a task names, from `loaded` (read for its batch) or else the store.
    async fn handle_one(
        &self,
        task: &Task,
        loaded: Option<&std::collections::HashMap<i64, StoredOrder>>,
    ) -> Result<Outcome, HandlerError> {
        let Some(order_id) = order_of(task) else {
            return Err(HandlerError::Permanent(format!(
                "outbox row {:?} names no order",
                row_of(task)
            )));
        };
        let fetched;
        let order = match loaded.and_then(|l| l.get(&order_id)) {
            Some(order) => order,
            None => match self.store.order(order_id).await {
                Ok(Some(order)) => {
                    fetched = order;
                    &fetched
                }
                Ok(None) => {
                    return Err(HandlerError::Permanent(format!(
                        "order {order_id} is not in the store"
                    )))
                }
                Err(e) => {
                    return Err(HandlerError::retry(format!(
                        "reading order {order_id}: {e}"
                    )))
                }
            },
        };
        let answer = self.deliver(order).await;
        crate::module::fault("outbox.after_send")?;
        match answer {
            Answer::Delivered(detail) => {
                self.health.reached();
                Ok(Outcome::new("delivered").with_detail(detail))
            }
            Answer::Retry(reason, after, away) => {
                match away {
                    Away::Yes => self
                        .health
                        .unreachable(reason.clone(), after.unwrap_or(HOLD_DOWN).max(HOLD_DOWN)),
                    Away::Maybe => self.health.timed_out(reason.clone()),
                    Away::No => self.health.reached(),
                }
                Err(HandlerError::Retry { reason, after })
            }
            Answer::Refused(reason) => {
                self.health.reached();
                Err(HandlerError::Permanent(reason))
            }
        }
    }
}

fn order_of(task: &Task) -> Option<i64> {
    task.payload
        .get("order_id")
        .and_then(serde_json::Value::as_i64)
}

impl TaskHandler for ErpHandler {
    fn handle<'a>(
        &'a self,
        task: &'a Task,
        _ctx: &'a HandlerContext,
    ) -> BoxFuture<'a, Result<Outcome, HandlerError>> {
        Box::pin(self.handle_one(task, None))
    }

    fn handle_batch<'a>(
        &'a self,
        tasks: &'a [Arc<Task>],
        _ctx: &'a HandlerContext,
    ) -> BoxFuture<'a, Vec<Result<Outcome, HandlerError>>> {
        Box::pin(async move {
            // The batch's orders in two statements; then the deliveries side by side.
            let ids: Vec<i64> = tasks.iter().filter_map(|t| order_of(t)).collect();
            let loaded = self.store.orders(&ids).await.ok();
            futures::future::join_all(
                tasks
                    .iter()
                    .map(|task| self.handle_one(task, loaded.as_ref())),
            )
            .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_stable_and_header_safe() {
        let a = order_key("mid:<1@acme.example>");
        assert_eq!(a, order_key("mid:<1@acme.example>"));
        assert_ne!(a, order_key("mid:<2@acme.example>"));
        assert!(a.starts_with("order-") && a.len() == 38);
        assert!(reqwest::header::HeaderValue::from_str(&a).is_ok());
    }

    fn config(url: &str) -> ErpConfig {
        ErpConfig {
            url: url.to_owned(),
            auth_header: default_auth_header(),
            auth_env: None,
            auth_file: None,
            timeout_ms: 10_000,
            signing_secret_env: None,
            signing_secret_file: None,
            max_retry_after_ms: default_max_retry_after_ms(),
        }
    }

    #[test]
    fn bad_settings_are_named() {
        let keys = |c: &ErpConfig| -> Vec<String> {
            c.problems("erp", 60_000)
                .into_iter()
                .map(|p| p.key)
                .collect()
        };
        assert!(keys(&config("http://127.0.0.1:9/orders")).is_empty());
        assert_eq!(keys(&config("ftp://erp.example/")), ["erp.url"]);
        assert_eq!(keys(&config("not a url")), ["erp.url"]);
        let mut slow = config("https://erp.example/orders");
        slow.timeout_ms = 60_000;
        assert_eq!(keys(&slow), ["erp.timeout_ms"]);
        let mut missing = config("https://erp.example/orders");
        missing.auth_env = Some("PLBA_TEST_NO_SUCH_ERP_TOKEN".into());
        let problems = missing.problems("erp", 60_000);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].message.contains("PLBA_TEST_NO_SUCH_ERP_TOKEN"));
    }
}
