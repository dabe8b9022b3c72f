//! Replies to senders over SMTP: a confirmation of each new order, a rejection of mail
//! the bot could not take, sent from the outbox's `reply:<outcome>` rows by the `replies`
//! pool (`[apps.mail_order_bot.reply]`).
//!
//! What a reply is, and what it never does:
//!
//! - It answers only mail that may be answered (RFC 3834 §2, decided when the message is
//!   read: `MailFacts::no_reply`): never automatic mail (`Auto-Submitted`, bounces, DSNs,
//!   out-of-office), mailing lists (`List-Id`, …), `Precedence: bulk|list|junk`, the null
//!   sender or a no-reply address. It goes to the message's From address, the one the
//!   client was resolved by.
//! - It says what it is (`Auto-Submitted: auto-replied`, RFC 3834 §5), so that other
//!   responders, and this bot reading its own reply, leave it unanswered; it is threaded
//!   under the message (`In-Reply-To`, `References`).
//! - Its `Message-ID` is derived from the message's identity and the outcome it answers, so
//!   a reply sent again after a crash between the relay's acceptance and the row's mark is
//!   recognisably the same message.
//! - At most `per_sender_max` replies go to one address in `per_sender_window_s`: two bots
//!   that answer each other stop there, and a flood of mail from one sender earns a few
//!   answers, not one each. A reply over the limit is settled unsent, with the reason.
//!
//! What the relay's answer means: accepted → sent; a 4xx (greylisting, a full queue) or no
//! connection → retried with backoff (no connection, a timeout or a TLS failure also mark
//! the relay down for readiness, and the pool waits without counting attempts); a 5xx →
//! a dead letter with the relay's words.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::PoolConfig;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use runtime_contracts::config::secret_from;
use runtime_contracts::{
    BoxFuture, ConfigProblem, HandlerContext, HandlerError, Outcome, Task, TaskHandler,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::outbox::row_of;
use super::peer::{PeerHealth, HOLD_DOWN};
use super::store::{Answered, OrderStore, ReplyFacts};

/// How the connection to the relay is secured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SmtpTls {
    /// Plain text, then `STARTTLS`, required (port 587 by default).
    #[default]
    Starttls,
    /// TLS from the first byte (port 465 by default).
    Implicit,
    /// No TLS at all: only for a relay on the same host or a trusted network (port 25).
    None,
}

/// `[apps.mail_order_bot.reply]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplyConfig {
    /// The replies' sender, `Order desk <orders@example.com>` or a bare address.
    pub from: String,
    /// The SMTP relay (submission server) the replies go through.
    pub host: String,
    /// Its port; by default 587 (`starttls`), 465 (`implicit`) or 25 (`none`).
    #[serde(default)]
    pub port: Option<u16>,
    /// `starttls` (the default), `implicit` or `none`.
    #[serde(default)]
    pub tls: SmtpTls,
    /// The login at the relay, if it wants one.
    #[serde(default)]
    pub username: Option<String>,
    /// The environment variable holding the password...
    #[serde(default)]
    pub password_env: Option<String>,
    /// ... or a file whose first line is the password.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// A PEM file with a certificate authority to trust beside the WebPKI roots (a relay
    /// with a private CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// How long one reply may take at the relay, connection included.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Which outcomes are answered; by default all four (`created`, `no_lines`,
    /// `unsupported_content`, `unknown_client`). A table names those that are on.
    #[serde(default = "Answered::all")]
    pub answer: Answered,
    /// Most replies to one address within `per_sender_window_s`.
    #[serde(default = "default_per_sender_max")]
    pub per_sender_max: u32,
    /// The window of the per-sender limit, in seconds.
    #[serde(default = "default_per_sender_window_s")]
    pub per_sender_window_s: u64,
    /// The texts (MiniJinja templates).
    #[serde(default)]
    pub templates: Templates,
}

fn default_timeout_ms() -> u64 {
    30_000
}
fn default_per_sender_max() -> u32 {
    5
}
fn default_per_sender_window_s() -> u64 {
    3_600
}

/// The replies' texts, as MiniJinja templates. Each sees `subject` (the message's),
/// `sender`, `outcome`, `reason` (what the bot could not read, for a rejection) and, for a
/// confirmation, `order` (`number`, `key`, `client`, `lines`: each `sku` and `quantity`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Templates {
    /// The confirmation's subject.
    #[serde(default = "default_confirmation_subject")]
    pub confirmation_subject: String,
    /// The confirmation's text.
    #[serde(default = "default_confirmation_body")]
    pub confirmation_body: String,
    /// The rejection's subject.
    #[serde(default = "default_rejection_subject")]
    pub rejection_subject: String,
    /// The rejection's text.
    #[serde(default = "default_rejection_body")]
    pub rejection_body: String,
}

impl Default for Templates {
    fn default() -> Self {
        Self {
            confirmation_subject: default_confirmation_subject(),
            confirmation_body: default_confirmation_body(),
            rejection_subject: default_rejection_subject(),
            rejection_body: default_rejection_body(),
        }
    }
}

fn default_confirmation_subject() -> String {
    "Re: {{ subject or 'your order' }} [order {{ order.number }}]".to_owned()
}
fn default_confirmation_body() -> String {
    "Hello,

thank you for your order. We have recorded it as order {{ order.number }} for {{ order.client }}, with these lines:

{% for line in order.lines %}  {{ line.quantity }} x {{ line.sku }}
{% endfor %}
If a line is missing or wrong, answer this message and we will correct it.

--
This is an automatic reply to your message{% if subject %} \"{{ subject }}\"{% endif %}.
"
    .to_owned()
}
fn default_rejection_subject() -> String {
    "Re: {{ subject or 'your message' }} [not processed]".to_owned()
}
fn default_rejection_body() -> String {
    "Hello,

we could not take an order from your message{% if subject %} \"{{ subject }}\"{% endif %}.
{% if outcome == 'unknown_client' %}
The address {{ sender }} is not one of our clients' order addresses. If you are a client, please send your orders from the address we know, or ask us to add this one.
{% elif outcome == 'no_lines' %}
We found no order lines in it ({{ reason }}). Please write one line per item, the article number and then the quantity (for example: ABC-123 4), in the text or in a CSV or XLSX attachment.
{% elif outcome == 'unsupported_content' %}
We could not read its content ({{ reason }}). Please send it again without encryption, in the text or as a CSV or XLSX attachment.
{% endif %}
--
This is an automatic reply; nothing was ordered.
"
    .to_owned()
}

/// Template execution budget: a template cannot loop for ever.
const FUEL: u64 = 200_000;
/// Longest rendered subject, in characters.
const MAX_SUBJECT_CHARS: usize = 200;

impl ReplyConfig {
    /// Problems with these values, keyed under `prefix`; `lease_ms` is the outbox's lease,
    /// which a reply must fit in.
    pub fn problems(&self, prefix: &str, lease_ms: u64) -> Vec<ConfigProblem> {
        let key = |k: &str| format!("{prefix}.{k}");
        let mut problems = Vec::new();
        if let Err(e) = self.from.parse::<Mailbox>() {
            problems.push(ConfigProblem::new(
                key("from"),
                format!("not a mail address: {e}"),
            ));
        }
        if self.host.trim().is_empty() {
            problems.push(ConfigProblem::new(key("host"), "must name the SMTP relay"));
        }
        if self.port == Some(0) {
            problems.push(ConfigProblem::new(key("port"), "must be at least 1"));
        }
        if self.password_env.is_some() && self.password_file.is_some() {
            problems.push(ConfigProblem::new(
                key("password_env"),
                "name password_env or password_file, not both",
            ));
        }
        match self.password() {
            Ok(Some(_)) if self.username.is_none() => problems.push(ConfigProblem::new(
                key("username"),
                "a password needs the username it belongs to",
            )),
            Ok(_) => {}
            Err(e) => problems.push(ConfigProblem::new(key("password_env"), e)),
        }
        if let Some(path) = &self.ca_file {
            match std::fs::read(path) {
                Ok(pem) => {
                    if let Err(e) = Certificate::from_pem(&pem) {
                        problems.push(ConfigProblem::new(
                            key("ca_file"),
                            format!("{}: not a PEM certificate: {e}", path.display()),
                        ));
                    }
                }
                Err(e) => problems.push(ConfigProblem::new(
                    key("ca_file"),
                    format!("{}: {e}", path.display()),
                )),
            }
        }
        if self.timeout_ms == 0 {
            problems.push(ConfigProblem::new(key("timeout_ms"), "must be at least 1"));
        } else if self.timeout_ms >= lease_ms {
            problems.push(ConfigProblem::new(
                key("timeout_ms"),
                format!(
                    "must be below the outbox's lease_ms ({lease_ms}): a reply still under way when its lease ends is sent again elsewhere"
                ),
            ));
        }
        if self.per_sender_max == 0 {
            problems.push(ConfigProblem::new(
                key("per_sender_max"),
                "must be at least 1 (switch answers off in `answer` instead)",
            ));
        }
        if self.per_sender_window_s == 0 {
            problems.push(ConfigProblem::new(
                key("per_sender_window_s"),
                "must be at least 1",
            ));
        }
        if let Err((which, e)) = Texts::new(&self.templates).and_then(|t| t.check()) {
            problems.push(ConfigProblem::new(key(&format!("templates.{which}")), e));
        }
        problems
    }

    fn password(&self) -> Result<Option<String>, String> {
        secret_from(
            self.password_env.as_deref(),
            self.password_file.as_deref(),
            "the SMTP password",
        )
    }

    fn port(&self) -> u16 {
        self.port.unwrap_or(match self.tls {
            SmtpTls::Starttls => 587,
            SmtpTls::Implicit => 465,
            SmtpTls::None => 25,
        })
    }
}

/// The compiled templates.
#[derive(Debug)]
struct Texts {
    env: minijinja::Environment<'static>,
}

const CONFIRMATION_SUBJECT: &str = "confirmation_subject";
const CONFIRMATION_BODY: &str = "confirmation_body";
const REJECTION_SUBJECT: &str = "rejection_subject";
const REJECTION_BODY: &str = "rejection_body";

impl Texts {
    fn new(t: &Templates) -> Result<Self, (&'static str, String)> {
        let mut env = minijinja::Environment::new();
        env.set_fuel(Some(FUEL));
        // Plain text: nothing is HTML-escaped.
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        for (name, source) in [
            (CONFIRMATION_SUBJECT, &t.confirmation_subject),
            (CONFIRMATION_BODY, &t.confirmation_body),
            (REJECTION_SUBJECT, &t.rejection_subject),
            (REJECTION_BODY, &t.rejection_body),
        ] {
            env.add_template_owned(name, source.clone())
                .map_err(|e| (name, format!("does not compile: {e}")))?;
        }
        Ok(Self { env })
    }

    /// Renders each template with a sample, so that a template that fails on every reply
    /// fails the configuration instead.
    fn check(self) -> Result<(), (&'static str, String)> {
        let order = serde_json::json!({
            "number": 1, "key": "order-0", "client": "Sample client",
            "lines": [{"sku": "ABC-1", "quantity": 2}],
        });
        for (subject, body, outcome) in [
            (CONFIRMATION_SUBJECT, CONFIRMATION_BODY, "created"),
            (REJECTION_SUBJECT, REJECTION_BODY, "no_lines"),
        ] {
            let ctx = serde_json::json!({
                "subject": "Order", "sender": "buyer@example.com", "outcome": outcome,
                "reason": "no order lines found", "order": order,
            });
            for name in [subject, body] {
                self.render(name, &ctx).map_err(|e| (name, e))?;
            }
        }
        Ok(())
    }

    fn render(&self, name: &str, ctx: &serde_json::Value) -> Result<String, String> {
        self.env
            .get_template(name)
            .and_then(|t| t.render(minijinja::value::Serde(ctx)))
            .map_err(|e| format!("{e:#}"))
    }
}

/// The `Message-ID` of the reply that answers `effect` (`reply:<outcome>`) of the message
/// `identity`, at `domain`: the same for every send of that reply.
pub fn reply_message_id(identity: &str, effect: &str, domain: &str) -> String {
    let digest = Sha256::digest(format!("{identity}\n{effect}").as_bytes());
    format!("<reply-{}@{domain}>", &hex::encode(digest)[..32])
}

/// Sends the outbox's reply rows.
pub struct ReplyHandler {
    store: OrderStore,
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    texts: Texts,
    per_sender_max: u32,
    window: Duration,
    /// Replies this process sent or is sending, per recipient, within the window: the
    /// database's count sees the other dispatchers' sent replies, this sees the ones under
    /// way here.
    recent: Mutex<HashMap<String, VecDeque<Instant>>>,
    health: Arc<PeerHealth>,
}

impl std::fmt::Debug for ReplyHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyHandler")
            .field("from", &self.from.to_string())
            .finish_non_exhaustive()
    }
}

/// What one send came to.
/// What one reply came to.
enum Done {
    /// Settled without a send (skipped, withheld, sent before).
    Settled(Outcome),
    /// Handed to the relay: its row is to be noted.
    Handed(i64, Outcome),
    /// Over the per-sender limit: the reason is to be noted on its row.
    Withheld(i64, String),
}

impl Done {
    fn outcome(self) -> Outcome {
        match self {
            Self::Settled(o) | Self::Handed(_, o) => o,
            Self::Withheld(_, why) => Outcome::new("withheld").with_detail(why),
        }
    }
}

enum Sent {
    Accepted,
    Retry(String, bool),
    Refused(String),
}

impl ReplyHandler {
    /// A handler for `config` (checked by [`ReplyConfig::problems`]).
    pub fn new(store: OrderStore, config: &ReplyConfig) -> Result<Self, String> {
        let from: Mailbox = config
            .from
            .parse()
            .map_err(|e| format!("reply.from: not a mail address: {e}"))?;
        let texts = Texts::new(&config.templates)
            .map_err(|(which, e)| format!("reply.templates.{which}: {e}"))?;
        let port = config.port();
        let tls = match config.tls {
            SmtpTls::None => Tls::None,
            mode => {
                let mut params = TlsParameters::builder(config.host.clone());
                if let Some(path) = &config.ca_file {
                    let pem = std::fs::read(path)
                        .map_err(|e| format!("reply.ca_file: {}: {e}", path.display()))?;
                    let cert = Certificate::from_pem(&pem)
                        .map_err(|e| format!("reply.ca_file: {}: {e}", path.display()))?;
                    params = params.add_root_certificate(cert);
                }
                let params = params
                    .build()
                    .map_err(|e| format!("reply: the TLS settings: {e}"))?;
                if mode == SmtpTls::Implicit {
                    Tls::Wrapper(params)
                } else {
                    Tls::Required(params)
                }
            }
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&config.host)
            .port(port)
            .tls(tls)
            .timeout(Some(Duration::from_millis(config.timeout_ms)))
            .pool_config(
                PoolConfig::new()
                    .max_size(4)
                    .idle_timeout(Duration::from_secs(30)),
            );
        if let Some(user) = &config.username {
            builder = builder.credentials(Credentials::new(
                user.clone(),
                config.password()?.unwrap_or_default(),
            ));
        }
        Ok(Self {
            store,
            transport: builder.build(),
            from,
            texts,
            per_sender_max: config.per_sender_max,
            window: Duration::from_secs(config.per_sender_window_s),
            recent: Mutex::new(HashMap::new()),
            health: Arc::new(PeerHealth::new(
                "smtp",
                "the SMTP relay",
                &config.host,
                port,
            )),
        })
    }

    /// The relay's reachability, for readiness and the `replies` pool's gate.
    pub fn health(&self) -> Arc<PeerHealth> {
        Arc::clone(&self.health)
    }

    fn domain(&self) -> &str {
        self.from.email.domain()
    }

    /// Takes a place under `to`'s limit, given `sent` replies the database knows of; the
    /// reason when there is none.
    fn reserve(&self, to: &str, sent: u64) -> Result<(), String> {
        let mut recent = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        // Forget whom nobody has been answered for a window.
        if recent.len() > 10_000 {
            recent.retain(|_, times| {
                times
                    .back()
                    .is_some_and(|t| now.duration_since(*t) < self.window)
            });
        }
        let times = recent.entry(to.to_owned()).or_default();
        while times
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.window)
        {
            times.pop_front();
        }
        let count = sent.max(times.len() as u64);
        if count >= u64::from(self.per_sender_max) {
            return Err(format!(
                "not sent: {count} replies to {to} within {} s already (per_sender_max = {})",
                self.window.as_secs(),
                self.per_sender_max
            ));
        }
        times.push_back(now);
        Ok(())
    }

    /// Gives back a place taken by [`ReplyHandler::reserve`] for a reply that was not sent.
    fn release(&self, to: &str) {
        let mut recent = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(times) = recent.get_mut(to) {
            times.pop_back();
        }
    }

    /// The reply as a message.
    fn message(&self, facts: &ReplyFacts) -> Result<Message, String> {
        let outcome = facts.effect.strip_prefix("reply:").unwrap_or_default();
        let (subject_t, body_t) = if outcome == "created" {
            (CONFIRMATION_SUBJECT, CONFIRMATION_BODY)
        } else {
            (REJECTION_SUBJECT, REJECTION_BODY)
        };
        let order = facts.order.as_ref().map(|o| {
            serde_json::json!({
                "number": o.id,
                "key": super::erp::order_key(&o.message_identity),
                "client": o.client_name,
                "lines": o.lines.iter().map(|l| serde_json::json!({
                    "sku": l.sku, "quantity": l.quantity,
                })).collect::<Vec<_>>(),
            })
        });
        let ctx = serde_json::json!({
            "subject": facts.subject.as_deref().map(one_line),
            "sender": facts.to.to,
            "outcome": outcome,
            "reason": facts.reason,
            "order": order,
        });
        let subject: String = one_line(&self.texts.render(subject_t, &ctx)?)
            .chars()
            .take(MAX_SUBJECT_CHARS)
            .collect();
        let body = self.texts.render(body_t, &ctx)?;
        let to: Mailbox =
            facts.to.to.parse().map_err(|e| {
                format!("the recipient {:?} is not a mail address: {e}", facts.to.to)
            })?;
        let mut builder = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(subject)
            .message_id(Some(reply_message_id(
                &facts.message_identity,
                &facts.effect,
                self.domain(),
            )))
            .date_now();
        if let Some(id) = &facts.to.in_reply_to {
            builder = builder.in_reply_to(id.clone());
        }
        if !facts.to.references.is_empty() {
            builder = builder.references(facts.to.references.join(" "));
        }
        let mut message = builder
            .header(lettre::message::header::ContentType::TEXT_PLAIN)
            .body(body)
            .map_err(|e| format!("the reply does not build: {e}"))?;
        let headers = message.headers_mut();
        headers.insert_raw(HeaderValue::new(
            HeaderName::new_from_ascii_str("Auto-Submitted"),
            "auto-replied".to_owned(),
        ));
        // Exchange and Outlook: no out-of-office or other automatic answer to this one.
        headers.insert_raw(HeaderValue::new(
            HeaderName::new_from_ascii_str("X-Auto-Response-Suppress"),
            "All".to_owned(),
        ));
        Ok(message)
    }

    async fn send(&self, message: &Message) -> Sent {
        match self.transport.send(message.clone()).await {
            Ok(_) => Sent::Accepted,
            Err(e) => {
                let words = error_text(&e);
                if e.is_permanent() {
                    Sent::Refused(format!("the SMTP relay refused the reply: {words}"))
                } else if e.is_transient() {
                    Sent::Retry(format!("the SMTP relay deferred the reply: {words}"), false)
                } else {
                    // No connection, a timeout, a TLS or protocol failure: the relay is
                    // not there as it should be.
                    Sent::Retry(
                        format!("the SMTP relay could not be reached: {words}"),
                        true,
                    )
                }
            }
        }
    }

    /// One reply sent, or settled without sending; the row to note as handed to the
    /// relay when the relay took it.
    async fn send_one(&self, task: &Task) -> Result<Done, HandlerError> {
        let Some(row) = row_of(task) else {
            return Err(HandlerError::Permanent(format!(
                "task {} names no outbox row",
                task.id
            )));
        };
        let facts = match self.store.reply_facts(row).await {
            Ok(Some(facts)) => facts,
            Ok(None) => {
                return Ok(Done::Settled(
                    Outcome::new("skipped").with_detail("the outbox row or its outcome is gone"),
                ))
            }
            Err(e) => {
                return Err(HandlerError::retry(format!(
                    "reading outbox row {row}: {e}"
                )))
            }
        };
        if let Some(at) = facts.sent_ms {
            // Handed to the relay by a dispatcher that died before marking the row: not
            // sent twice.
            return Ok(Done::Settled(Outcome::new("sent").with_detail(format!(
                "already handed to the relay at {at} (unix ms)"
            ))));
        }
        let answers = facts.effect.strip_prefix("reply:").unwrap_or_default();
        if answers != facts.outcome {
            // A replay changed the outcome since: the reply now due is another row's.
            return Ok(Done::Settled(Outcome::new("skipped").with_detail(format!(
                "the message is now {}, not {answers}",
                facts.outcome
            ))));
        }
        let message = self.message(&facts).map_err(HandlerError::Permanent)?;
        let to = facts.to.to.as_str();
        let sent = self
            .store
            .replies_sent_to(
                to,
                u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX),
            )
            .await
            .map_err(|e| HandlerError::retry(format!("counting the replies to {to}: {e}")))?;
        if let Err(why) = self.reserve(to, sent) {
            return Ok(Done::Withheld(row, why));
        }
        let answer = self.send(&message).await;
        match answer {
            Sent::Accepted => {
                self.health.reached();
                Ok(Done::Handed(
                    row,
                    Outcome::new("sent").with_detail(to.to_owned()),
                ))
            }
            Sent::Retry(reason, away) => {
                self.release(to);
                if away {
                    self.health.unreachable(reason.clone(), HOLD_DOWN);
                } else {
                    self.health.reached();
                }
                Err(HandlerError::retry(reason))
            }
            Sent::Refused(reason) => {
                self.release(to);
                self.health.reached();
                Err(HandlerError::Permanent(reason))
            }
        }
    }

    /// One reply, its row noted at once when the relay took it.
    async fn handle_one(&self, task: &Task) -> Result<Outcome, HandlerError> {
        let done = self.send_one(task).await;
        self.settle(vec![done])
            .await
            .pop()
            .unwrap_or_else(|| Err(HandlerError::retry("no result")))
    }

    /// Notes what `done` came to, in one statement or transaction each for the whole
    /// batch: the rows handed to the relay, then the reasons of those withheld.
    async fn settle(
        &self,
        done: Vec<Result<Done, HandlerError>>,
    ) -> Vec<Result<Outcome, HandlerError>> {
        let handed: Vec<i64> = done
            .iter()
            .filter_map(|d| match d {
                Ok(Done::Handed(row, _)) => Some(*row),
                _ => None,
            })
            .collect();
        self.note_sent(&handed).await;
        let withheld: Vec<(i64, String)> = done
            .iter()
            .filter_map(|d| match d {
                Ok(Done::Withheld(row, why)) => Some((*row, why.clone())),
                _ => None,
            })
            .collect();
        let noted = self
            .store
            .replies_withheld(&withheld)
            .await
            .map_err(|e| format!("noting why replies are withheld: {e}"));
        done.into_iter()
            .map(|d| {
                let d = d?;
                if let (Done::Withheld(..), Err(e)) = (&d, &noted) {
                    return Err(HandlerError::retry(e.clone()));
                }
                crate::module::fault("outbox.after_send")?;
                Ok(d.outcome())
            })
            .collect()
    }

    /// Counted for the limit at once, in one statement for a batch; a crash before it
    /// sends those replies again (with the same Message-ID).
    async fn note_sent(&self, rows: &[i64]) {
        if let Err(e) = self.store.replies_sent(rows).await {
            tracing::warn!(rows = rows.len(), error = %e, "replies were sent but could not be noted");
        }
    }
}

/// `text` on one line, its runs of white space (line breaks included) one space.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The error and its causes, on one line.
fn error_text(e: &dyn std::error::Error) -> String {
    one_line(&super::erp::error_chain(e))
}

impl TaskHandler for ReplyHandler {
    fn handle<'a>(
        &'a self,
        task: &'a Task,
        _ctx: &'a HandlerContext,
    ) -> BoxFuture<'a, Result<Outcome, HandlerError>> {
        Box::pin(self.handle_one(task))
    }

    fn handle_batch<'a>(
        &'a self,
        tasks: &'a [Arc<Task>],
        _ctx: &'a HandlerContext,
    ) -> BoxFuture<'a, Vec<Result<Outcome, HandlerError>>> {
        Box::pin(async move {
            let done =
                futures::future::join_all(tasks.iter().map(|task| self.send_one(task))).await;
            self.settle(done).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ReplyConfig {
        toml::from_str(
            r#"
from = "Order desk <orders@example.com>"
host = "smtp.example.com"
"#,
        )
        .expect("config")
    }

    #[test]
    fn the_defaults_answer_everything_through_a_starttls_relay() {
        let c = config();
        assert_eq!(c.tls, SmtpTls::Starttls);
        assert_eq!(c.port(), 587);
        assert_eq!(c.answer, Answered::all());
        assert!(
            c.problems("reply", 60_000).is_empty(),
            "{:?}",
            c.problems("reply", 60_000)
        );
    }

    #[test]
    fn bad_settings_are_named() {
        let mut c = config();
        c.from = "not an address".into();
        c.timeout_ms = 90_000;
        c.per_sender_max = 0;
        c.templates.confirmation_body = "{% for x in %}".into();
        c.password_env = Some("PLBA_TEST_SURELY_UNSET_VARIABLE".into());
        let keys: Vec<String> = c
            .problems("reply", 60_000)
            .into_iter()
            .map(|p| p.key)
            .collect();
        for key in [
            "reply.from",
            "reply.timeout_ms",
            "reply.per_sender_max",
            "reply.templates.confirmation_body",
            "reply.password_env",
        ] {
            assert!(keys.iter().any(|k| k == key), "{key} not in {keys:?}");
        }
    }

    #[test]
    fn a_template_that_loops_for_ever_runs_out_of_fuel() {
        let mut c = config();
        c.templates.rejection_body =
            "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}"
                .into();
        let problems = c.problems("reply", 60_000);
        assert!(
            problems
                .iter()
                .any(|p| p.key == "reply.templates.rejection_body"),
            "{problems:?}"
        );
    }

    #[test]
    fn the_message_id_is_stable_per_message_and_outcome() {
        let a = reply_message_id("mid:x@y", "reply:created", "example.com");
        assert_eq!(
            a,
            reply_message_id("mid:x@y", "reply:created", "example.com")
        );
        assert_ne!(
            a,
            reply_message_id("mid:x@y", "reply:unknown_client", "example.com")
        );
        assert!(
            a.starts_with("<reply-") && a.ends_with("@example.com>"),
            "{a}"
        );
    }
}
