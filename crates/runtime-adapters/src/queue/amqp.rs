//! An AMQP 0-9-1 queue (RabbitMQ) with lapin.
//!
//! Topology, per pool `P` (names under `queue_prefix`, default exchange):
//! - `plba.P`: the work queue, durable; a quorum queue by default (`queue_kind = "classic"`
//!   for a classic one). Workers consume it with manual acknowledgements and a prefetch
//!   (`basic.qos`) of the pool's workers × its batch size.
//! - `plba.P.delay.MS`: one queue per retry delay, whose messages expire after `MS` and are
//!   dead-lettered by the broker back to the work queue. No plugin is needed (Debian's
//!   RabbitMQ has no delayed-message exchange). Delays are rounded up to the next of
//!   1, 2, 3, 5 and 7 × 10^k ms (at most 24 h), so that a handful of queues serve every
//!   backoff; a retry is never earlier than asked. Quorum delay queues dead-letter
//!   at-least-once (`x-dead-letter-strategy`), so a broker crash cannot drop a retry.
//! - `plba.P.dead`: the dead letters, with the reason, the time and the attempt history in
//!   headers (`plba-reason`, `plba-dead-at-ms`, `plba-attempts`, `plba-history`) and the
//!   task envelope as the body; listed, replayed and purged through [`DeadLetterStore`].
//!
//! Guarantees:
//! - `publish` returns only after the broker confirmed the message (publisher confirms):
//!   the task is on disk (quorum: on a majority) before a source marks anything published.
//! - Redelivery counting: a quorum queue counts deliveries (`x-delivery-count`); a task
//!   delivered more than `max_deliveries` times (its workers kept dying) is dead-lettered as
//!   `worker_lost`. Classic queues do not count, so this needs the quorum kind.
//! - An undecodable message is dead-lettered as `undecodable` and the consumer goes on.
//! - Idempotent publish: RabbitMQ has no deduplication. The adapter remembers the ids this
//!   process published and has not settled (and the ids it dead-lettered), so a pointer
//!   already pending is not published twice by the same process; across processes a
//!   duplicate is possible (a source in another replica, a publish whose confirm was lost),
//!   and the handler's unique key makes it harmless. Ids published here but settled by
//!   another process are forgotten after `dedupe_window_secs`.
//! - Retries and dead letters are published (confirmed) before the delivery is
//!   acknowledged: a crash in between delivers the task once more, never zero times.
//! - Connection loss: operations fail with [`QueueError::Unavailable`] (a source keeps its
//!   mail unread), leases of the lost channel become unknown (the broker redelivers their
//!   tasks), and the next operation reconnects, no more often than a doubling backoff
//!   allows. [`AmqpHealth`] turns readiness down meanwhile.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Acker, BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use runtime_contracts::{
    AttemptFailure, BoxFuture, ConfigProblem, DeadLetter, DeadLetterPage, DeadLetterStore,
    HealthContributor, HealthStatus, Lease, Probe, PublishResult, QueueError, QueueStats, Task,
    TaskQueue,
};
use serde::Deserialize;

use super::signing::{self, Refusal, Signer};
use crate::now_unix_ms;

/// The kind of RabbitMQ queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueKind {
    /// Replicated, durable, counts deliveries (the default).
    #[default]
    Quorum,
    /// A classic durable queue (no delivery counting).
    Classic,
}

impl QueueKind {
    fn argument(self) -> &'static str {
        match self {
            Self::Quorum => "quorum",
            Self::Classic => "classic",
        }
    }
}

/// `[queue]` with `type = "amqp"`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default)]
pub struct AmqpQueueConfig {
    /// Broker URL, e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`; `amqps://` is TLS (rustls),
    /// the broker's certificate checked against the public roots or `ca_file`.
    pub url: String,
    /// PEM file of the CAs trusted for an `amqps://` broker (a private CA); unset: the
    /// public (WebPKI) roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// Prefix of every queue name.
    pub queue_prefix: String,
    /// `quorum` (default) or `classic`.
    pub queue_kind: QueueKind,
    /// Unacknowledged deliveries the broker pushes to this process; 0 means the pool's
    /// workers × its batch size.
    pub prefetch: u16,
    /// Deliveries after which a task whose workers keep dying is dead-lettered as
    /// `worker_lost` (quorum queues).
    pub max_deliveries: u64,
    /// Largest envelope accepted from the broker, in bytes; larger is `undecodable`.
    pub max_entry_bytes: usize,
    /// Longest wait for any answer of the broker (ms): a publish confirm, a declare, a
    /// get, a new channel. A broker that stops answering is an error, never a hang.
    pub confirm_timeout_ms: u64,
    /// Longest wait for a connection (ms).
    pub connect_timeout_ms: u64,
    /// Most time between reconnection attempts (ms); the backoff doubles from 100 ms.
    pub reconnect_max_ms: u64,
    /// How long an id published here, and settled elsewhere, is still refused (s).
    pub dedupe_window_secs: u64,
    /// The environment variable holding this queue's signing key (at least 32 bytes, the
    /// same in every process): every envelope is then signed, and one delivered without a
    /// valid signature is dead-lettered as `unauthenticated` (see `queue::signing`).
    pub signing_key_env: Option<String>,
}

impl Default for AmqpQueueConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
            ca_file: None,
            queue_prefix: "plba".to_owned(),
            queue_kind: QueueKind::Quorum,
            prefetch: 0,
            max_deliveries: 5,
            max_entry_bytes: 64 * 1024,
            confirm_timeout_ms: 10_000,
            connect_timeout_ms: 5_000,
            reconnect_max_ms: 5_000,
            dedupe_window_secs: 3_600,
            signing_key_env: None,
        }
    }
}

impl AmqpQueueConfig {
    /// Problems with these values, keyed under `prefix`.
    pub fn problems(&self, prefix: &str) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        if !(self.url.starts_with("amqp://") || self.url.starts_with("amqps://"))
            || self.url.parse::<lapin::uri::AMQPUri>().is_err()
        {
            problems.push(ConfigProblem::new(
                format!("{prefix}.url"),
                "not an amqp:// or amqps:// URL",
            ));
        }
        problems.extend(super::link_problems(
            prefix,
            &self.url,
            "amqps://",
            self.ca_file.as_deref(),
        ));
        if self.queue_prefix.is_empty()
            || !self
                .queue_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            problems.push(ConfigProblem::new(
                format!("{prefix}.queue_prefix"),
                "must be letters, digits, '.', '_' or '-'",
            ));
        }
        problems.extend(runtime_contracts::config::require_positive(
            prefix,
            &[
                ("max_deliveries", self.max_deliveries),
                ("max_entry_bytes", self.max_entry_bytes as u64),
                ("confirm_timeout_ms", self.confirm_timeout_ms),
                ("connect_timeout_ms", self.connect_timeout_ms),
                ("reconnect_max_ms", self.reconnect_max_ms),
                ("dedupe_window_secs", self.dedupe_window_secs),
            ],
        ));
        if let Some(var) = &self.signing_key_env {
            if let Err(why) = Signer::from_env(var, "") {
                problems.push(ConfigProblem::new(format!("{prefix}.signing_key_env"), why));
            }
        }
        problems
    }
}

const REASON_WORKER_LOST: &str = "worker_lost";
const REASON_UNDECODABLE: &str = "undecodable";
const REASON_UNAUTHENTICATED: &str = "unauthenticated";
const HEADER_REASON: &str = "plba-reason";
const HEADER_DEAD_AT: &str = "plba-dead-at-ms";
const HEADER_ATTEMPTS: &str = "plba-attempts";
const HEADER_HISTORY: &str = "plba-history";
/// Longest delay queue; longer retry delays wait this long.
const MAX_DELAY_MS: u64 = 24 * 3600 * 1000;

/// The delay queue a retry after `delay` goes to: the next of 1, 2, 3, 5, 7 × 10^k ms.
fn delay_bucket(delay: Duration) -> u64 {
    let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX).max(1);
    let mut decade = 1u64;
    loop {
        for step in [1, 2, 3, 5, 7] {
            let bucket = step * decade;
            if bucket >= ms {
                return bucket.min(MAX_DELAY_MS);
            }
        }
        if decade >= MAX_DELAY_MS {
            return MAX_DELAY_MS;
        }
        decade *= 10;
    }
}

fn unavailable(e: impl std::fmt::Display) -> QueueError {
    QueueError::Unavailable(e.to_string())
}

fn encode(task: &Task, signer: Option<&Signer>) -> Result<Vec<u8>, QueueError> {
    let json =
        serde_json::to_vec(task).map_err(|e| unavailable(format!("encoding the envelope: {e}")))?;
    Ok(signing::seal(signer, json))
}

fn text_header(headers: &FieldTable, name: &str) -> Option<String> {
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn number_header(headers: &FieldTable, name: &str) -> Option<u64> {
    match headers.inner().get(name)? {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::Timestamp(n) => Some(*n),
        _ => None,
    }
}

fn persistent(id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/json"))
        .with_message_id(ShortString::from(id))
}

/// Queue names of one pool.
#[derive(Debug)]
struct Names {
    work: String,
    dead: String,
}

/// The connection and the channels every operation shares.
struct Link {
    connection: Connection,
    /// Publishes (confirm mode) and declares.
    publisher: Channel,
    /// Delay queues declared on this connection.
    delays: HashSet<u64>,
    generation: u64,
}

/// The consumer side: its own channel, so a slow handler never blocks publishing. A pump
/// task moves deliveries from lapin's consumer into `deliveries` as they arrive and counts
/// them, so that `stats` sees work this process holds before any worker leased it.
struct Consuming {
    deliveries: tokio::sync::mpsc::UnboundedReceiver<Result<Delivery, String>>,
    /// Deliveries arrived and not yet leased.
    buffered: Arc<AtomicU64>,
    generation: u64,
    pump: tokio::task::JoinHandle<()>,
}

impl Drop for Consuming {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

/// A delivery held by a worker.
struct Held {
    acker: Acker,
    generation: u64,
    since: Instant,
}

/// What this process knows about a task id, for idempotent publishing.
#[derive(Clone, Copy, Debug)]
enum Known {
    /// Published or leased here, not settled here yet.
    Pending(Instant),
    /// Dead-lettered here: refused until replayed or purged.
    Dead,
}

/// The AMQP queue of one pool. See the module docs.
pub struct AmqpQueue {
    name: String,
    /// Signs what is published and checks what is delivered, when `signing_key_env` is set.
    signer: Option<Signer>,
    config: AmqpQueueConfig,
    names: Names,
    prefetch: u16,
    link: tokio::sync::Mutex<Option<Link>>,
    consuming: tokio::sync::Mutex<Option<Consuming>>,
    /// The current consumer's count of deliveries arrived and not yet leased.
    buffered: Mutex<Arc<AtomicU64>>,
    /// Dead-letter operations take messages off the dead queue for a moment; one at a time.
    dead_ops: tokio::sync::Mutex<()>,
    leases: Mutex<HashMap<u64, (Held, Arc<str>)>>,
    known: Mutex<HashMap<Arc<str>, Known>>,
    next_receipt: AtomicU64,
    generation: AtomicU64,
    /// Earliest time of the next connection attempt, and the current backoff.
    retry_at: Mutex<(Option<Instant>, Duration)>,
    published: AtomicU64,
    processed: AtomicU64,
    failed: AtomicU64,
}

impl std::fmt::Debug for AmqpQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpQueue")
            .field("name", &self.name)
            .field("work", &self.names.work)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl AmqpQueue {
    /// The queue of pool `name`, whose workers lease up to `pool_prefetch` tasks in all
    /// (workers × batch size: the `basic.qos` when the config leaves it 0). Connects
    /// lazily: an unreachable broker is an error of the first operation and of readiness.
    ///
    /// Fails only when `signing_key_env` names no usable key.
    pub fn new(
        name: impl Into<String>,
        config: AmqpQueueConfig,
        pool_prefetch: usize,
    ) -> Result<Self, QueueError> {
        let name = name.into();
        let signer = Signer::of_queue(config.signing_key_env.as_deref(), &name)?;
        let prefetch = if config.prefetch > 0 {
            config.prefetch
        } else {
            u16::try_from(pool_prefetch.max(1)).unwrap_or(u16::MAX)
        };
        let work = format!("{}.{name}", config.queue_prefix);
        Ok(Self {
            signer,
            names: Names {
                dead: format!("{work}.dead"),
                work,
            },
            name,
            config,
            prefetch,
            link: tokio::sync::Mutex::new(None),
            consuming: tokio::sync::Mutex::new(None),
            buffered: Mutex::default(),
            dead_ops: tokio::sync::Mutex::new(()),
            leases: Mutex::default(),
            known: Mutex::default(),
            next_receipt: AtomicU64::new(1),
            generation: AtomicU64::new(0),
            retry_at: Mutex::new((None, Duration::from_millis(100))),
            published: AtomicU64::new(0),
            processed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        })
    }

    /// The work queue's name on the broker.
    pub fn queue_name(&self) -> &str {
        &self.names.work
    }

    /// Closes the connection: deliveries this process holds go back to the queue (the
    /// broker redelivers them elsewhere). The next operation connects again.
    pub async fn close(&self) {
        self.consuming.lock().await.take();
        *lock(&self.buffered) = Arc::default();
        let link = self.link.lock().await.take();
        if let Some(link) = link {
            let _ = self
                .answer(
                    "connection.close",
                    link.connection.close(200, "closed".into()),
                )
                .await;
        }
    }

    /// The dead-letter queue's name on the broker.
    pub fn dead_queue_name(&self) -> &str {
        &self.names.dead
    }

    fn queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString(self.config.queue_kind.argument().into()),
        );
        args
    }

    fn delay_queue(&self, ms: u64) -> String {
        format!("{}.delay.{ms}", self.names.work)
    }

    fn delay_arguments(&self, ms: u64) -> FieldTable {
        let mut args = self.queue_arguments();
        let mut put = |k: &str, v: AMQPValue| {
            args.insert(ShortString::from(k), v);
        };
        put(
            "x-message-ttl",
            AMQPValue::LongLongInt(i64::try_from(ms).unwrap_or(i64::MAX)),
        );
        put("x-dead-letter-exchange", AMQPValue::LongString("".into()));
        put(
            "x-dead-letter-routing-key",
            AMQPValue::LongString(self.names.work.as_str().into()),
        );
        if self.config.queue_kind == QueueKind::Quorum {
            put(
                "x-dead-letter-strategy",
                AMQPValue::LongString("at-least-once".into()),
            );
            put("x-overflow", AMQPValue::LongString("reject-publish".into()));
        }
        args
    }

    /// Records a failure of the link: the next operation reconnects (after the backoff).
    async fn broken(&self, e: impl std::fmt::Display) -> QueueError {
        let error = unavailable(e);
        let old = self.link.lock().await.take();
        if let Some(old) = old {
            tracing::warn!(queue = %self.name, %error, "AMQP connection lost");
            let _ = self
                .answer("close", old.connection.close(320, "reconnecting".into()))
                .await;
        }
        error
    }

    /// One exchange with the broker, bounded by `confirm_timeout_ms`. A broker killed
    /// mid-exchange, or a connection that died without a word, leaves a lapin future
    /// pending for ever; here it becomes an [`QueueError::Unavailable`] instead.
    async fn answer<T, E: std::fmt::Display>(
        &self,
        what: &str,
        exchange: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, QueueError> {
        let bound = Duration::from_millis(self.config.confirm_timeout_ms);
        match tokio::time::timeout(bound, exchange).await {
            Ok(result) => result.map_err(unavailable),
            Err(_) => Err(unavailable(format!(
                "the broker did not answer {what} within {bound:?}"
            ))),
        }
    }

    /// The shared link, connected (and the topology declared) when needed.
    async fn link(&self) -> Result<tokio::sync::MappedMutexGuard<'_, Link>, QueueError> {
        let mut guard = self.link.lock().await;
        if guard.as_ref().is_some_and(|l| {
            !l.connection.status().connected() || !l.publisher.status().connected()
        }) {
            guard.take();
        }
        if guard.is_none() {
            {
                let (at, _) = *lock(&self.retry_at);
                if at.is_some_and(|at| Instant::now() < at) {
                    return Err(unavailable("broker unreachable; reconnecting with backoff"));
                }
            }
            match self.connect().await {
                Ok(link) => {
                    *lock(&self.retry_at) = (None, Duration::from_millis(100));
                    tracing::info!(queue = %self.name, generation = link.generation, "AMQP connected");
                    *guard = Some(link);
                }
                Err(e) => {
                    let mut retry = lock(&self.retry_at);
                    let backoff = retry.1;
                    *retry = (
                        Some(Instant::now() + backoff),
                        (backoff * 2).min(Duration::from_millis(self.config.reconnect_max_ms)),
                    );
                    return Err(e);
                }
            }
        }
        Ok(tokio::sync::MutexGuard::map(guard, |l| {
            l.as_mut().expect("connected above")
        }))
    }

    async fn connect(&self) -> Result<Link, QueueError> {
        let tls = OwnedTLSConfig {
            identity: None,
            cert_chain: match &self.config.ca_file {
                Some(path) => Some(super::read_ca_file(path).map_err(unavailable)?),
                None => None,
            },
        };
        let builder = lapin::DefaultConnectionBuilder::new()
            .map_err(unavailable)?
            .with_uri_str(self.config.url.clone())
            .with_properties(ConnectionProperties::default())
            .with_tls_config(tls);
        let connect = builder.connect();
        let connection = tokio::time::timeout(
            Duration::from_millis(self.config.connect_timeout_ms),
            connect,
        )
        .await
        .map_err(|_| unavailable("connecting to the broker timed out"))?
        .map_err(unavailable)?;
        let publisher = self
            .answer("channel.open", connection.create_channel())
            .await?;
        self.answer(
            "confirm.select",
            publisher.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        for queue in [&self.names.work, &self.names.dead] {
            let declare = publisher.queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                self.queue_arguments(),
            );
            self.answer("queue.declare", declare).await?;
        }
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(Link {
            connection,
            publisher,
            delays: HashSet::new(),
            generation,
        })
    }

    /// Publishes envelopes to `queue` and waits for every confirm; true per confirmed one.
    async fn publish_to(
        &self,
        queue: &str,
        messages: &[(&str, Vec<u8>, Option<FieldTable>)],
    ) -> Result<(), QueueError> {
        let confirms = {
            let link = self.link().await?;
            let mut confirms = Vec::with_capacity(messages.len());
            for (id, body, headers) in messages {
                let mut properties = persistent(id);
                if let Some(headers) = headers {
                    properties = properties.with_headers(headers.clone());
                }
                let publish = link.publisher.basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    body,
                    properties,
                );
                let sent = self.answer("basic.publish", publish).await;
                match sent {
                    Ok(confirm) => confirms.push(confirm),
                    Err(e) => {
                        drop(link);
                        return Err(self.broken(e).await);
                    }
                }
            }
            confirms
        };
        let all = futures::future::join_all(confirms);
        let results =
            tokio::time::timeout(Duration::from_millis(self.config.confirm_timeout_ms), all)
                .await
                .map_err(|_| unavailable("the broker did not confirm in time"))?;
        for result in results {
            match result {
                Ok(Confirmation::Ack(_) | Confirmation::NotRequested) => {}
                Ok(Confirmation::Nack(_)) => {
                    return Err(unavailable("the broker refused the message (nack)"))
                }
                Err(e) => return Err(self.broken(e).await),
            }
        }
        Ok(())
    }

    /// Declares the delay queue for `delay` on the current link once; returns its name.
    async fn delay_queue_for(&self, delay: Duration) -> Result<String, QueueError> {
        let ms = delay_bucket(delay);
        let name = self.delay_queue(ms);
        let mut link = self.link().await?;
        if link.delays.contains(&ms) {
            return Ok(name);
        }
        let declare = link.publisher.queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            self.delay_arguments(ms),
        );
        let declared = self.answer("queue.declare", declare).await;
        match declared {
            Ok(_) => {
                link.delays.insert(ms);
                Ok(name)
            }
            Err(e) => {
                drop(link);
                Err(self.broken(e).await)
            }
        }
    }

    /// Whether `id` may be published now (and marks it pending if so).
    fn admit_id(&self, id: &Arc<str>) -> bool {
        let window = Duration::from_secs(self.config.dedupe_window_secs);
        let mut known = lock(&self.known);
        match known.get(id) {
            Some(Known::Dead) => false,
            Some(Known::Pending(at)) if at.elapsed() < window => false,
            _ => {
                known.insert(Arc::clone(id), Known::Pending(Instant::now()));
                true
            }
        }
    }

    fn forget(&self, id: &str) {
        lock(&self.known).remove(id);
    }

    /// Starts consuming on a fresh channel of the current link.
    async fn start_consuming(&self) -> Result<Consuming, QueueError> {
        let (channel, generation, _) = self.new_channel().await?;
        let setup = async {
            channel
                .basic_qos(self.prefetch, BasicQosOptions::default())
                .await?;
            channel
                .basic_consume(
                    self.names.work.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
        };
        let mut consumer = match self.answer("basic.consume", setup).await {
            Ok(consumer) => consumer,
            Err(e) => return Err(self.broken(e).await),
        };
        let buffered = Arc::new(AtomicU64::new(0));
        *lock(&self.buffered) = Arc::clone(&buffered);
        let (tx, deliveries) = tokio::sync::mpsc::unbounded_channel();
        let counted = Arc::clone(&buffered);
        let pump = tokio::spawn(async move {
            loop {
                let next = match consumer.next().await {
                    Some(Ok(delivery)) => {
                        counted.fetch_add(1, Ordering::Relaxed);
                        Ok(delivery)
                    }
                    Some(Err(e)) => Err(e.to_string()),
                    None => Err("the broker cancelled the consumer".to_owned()),
                };
                let end = next.is_err();
                if tx.send(next).is_err() || end {
                    return;
                }
            }
        });
        Ok(Consuming {
            deliveries,
            buffered,
            generation,
            pump,
        })
    }

    /// Turns a delivery into a lease, or settles it here: dead-lettered as `undecodable`,
    /// or as `worker_lost` after too many deliveries.
    async fn admit(&self, delivery: Delivery, generation: u64) -> Option<Lease> {
        let deliveries = delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| number_header(h, "x-delivery-count"))
            .unwrap_or(0)
            + 1;
        let decoded = signing::decode(
            &delivery.data,
            self.config.max_entry_bytes,
            self.signer.as_ref(),
        );
        let task = match decoded {
            Ok(task) => task,
            Err(refusal) => {
                let (kind, why) = match refusal {
                    Refusal::Undecodable(why) => (REASON_UNDECODABLE, why),
                    Refusal::Unauthenticated(why) => (REASON_UNAUTHENTICATED, why),
                };
                tracing::error!(queue = %self.name, %why, kind, "message refused and dead-lettered");
                let id = format!(
                    "{kind}:{}",
                    delivery
                        .properties
                        .message_id()
                        .as_ref()
                        .map(|m| m.as_str().to_owned())
                        .unwrap_or_else(|| format!("{}-{}", now_unix_ms(), delivery.delivery_tag))
                );
                let body = delivery.data.clone();
                let reason = format!("{kind}: {why}");
                self.bury_raw(&delivery.acker, &id, body, &reason, &[])
                    .await;
                return None;
            }
        };
        if deliveries > self.config.max_deliveries {
            let mut task = task;
            let failure = AttemptFailure {
                attempt: task.attempt.saturating_add(1),
                reason: format!(
                    "{REASON_WORKER_LOST}: delivered {deliveries} times without being settled"
                ),
                at_unix_ms: now_unix_ms(),
                next_attempt_at_unix_ms: None,
            };
            tracing::error!(queue = %self.name, task = %task.id, deliveries, "task dead-lettered as worker_lost");
            task.attempt = failure.attempt;
            task.history.push(failure.clone());
            let id = task.id.to_string();
            if let Ok(body) = encode(&task, self.signer.as_ref()) {
                self.bury_raw(&delivery.acker, &id, body, &failure.reason, &task.history)
                    .await;
                lock(&self.known).insert(Arc::from(id.as_str()), Known::Dead);
            }
            return None;
        }
        let receipt = self.next_receipt.fetch_add(1, Ordering::Relaxed);
        let id: Arc<str> = Arc::from(task.id.as_str());
        lock(&self.known)
            .entry(Arc::clone(&id))
            .or_insert(Known::Pending(Instant::now()));
        lock(&self.leases).insert(
            receipt,
            (
                Held {
                    acker: delivery.acker,
                    generation,
                    since: Instant::now(),
                },
                id,
            ),
        );
        Some(Lease {
            task: Arc::new(task),
            receipt,
        })
    }

    /// Publishes a dead letter and then acknowledges the delivery; on failure the delivery
    /// is returned to the queue (it comes back, nothing is lost).
    async fn bury_raw(
        &self,
        acker: &Acker,
        id: &str,
        body: Vec<u8>,
        reason: &str,
        history: &[AttemptFailure],
    ) -> bool {
        let headers = dead_headers(reason, history);
        match self
            .publish_to(&self.names.dead, &[(id, body, Some(headers))])
            .await
        {
            Ok(()) => {
                let _ = self
                    .answer("basic.ack", acker.ack(BasicAckOptions::default()))
                    .await;
                true
            }
            Err(e) => {
                tracing::warn!(queue = %self.name, error = %e, "dead letter not written; the message goes back");
                self.requeue(acker).await;
                false
            }
        }
    }

    fn take(&self, lease: &Lease) -> Result<(Held, Arc<str>), QueueError> {
        let held = lock(&self.leases)
            .remove(&lease.receipt)
            .ok_or(QueueError::UnknownLease(lease.receipt))?;
        if held.0.generation != self.generation.load(Ordering::Relaxed) {
            // Its channel is gone: the broker has already put the task back.
            return Err(QueueError::UnknownLease(lease.receipt));
        }
        Ok(held)
    }

    /// Publishes `task` again (after `delay`) and then acknowledges the held delivery.
    async fn republish(&self, held: Held, task: &Task, delay: Duration) -> Result<(), QueueError> {
        let target = if delay.is_zero() {
            self.names.work.clone()
        } else {
            match self.delay_queue_for(delay).await {
                Ok(q) => q,
                Err(e) => {
                    self.requeue(&held.acker).await;
                    return Err(e);
                }
            }
        };
        let body = encode(task, self.signer.as_ref())?;
        match self
            .publish_to(&target, &[(task.id.as_str(), body, None)])
            .await
        {
            Ok(()) => self
                .answer("basic.ack", held.acker.ack(BasicAckOptions::default()))
                .await
                .map(|_| ()),
            Err(e) => {
                self.requeue(&held.acker).await;
                Err(e)
            }
        }
    }

    /// Returns a delivery to its queue (best effort: if the channel is gone, the broker
    /// has returned it already).
    async fn requeue(&self, acker: &Acker) {
        let reject = acker.reject(BasicRejectOptions { requeue: true });
        let _ = self.answer("basic.reject", reject).await;
    }

    /// Ends the consumer (its channel is gone or going): what it held is the broker's again.
    fn drop_consumer(&self, consuming: &mut Option<Consuming>) {
        consuming.take();
        *lock(&self.buffered) = Arc::default();
    }

    /// Takes up to `max` deliveries, waiting until `deadline` for the first.
    async fn read(&self, max: usize, wait: Duration) -> Result<Vec<Lease>, QueueError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut consuming = self.consuming.lock().await;
        let current = self.generation.load(Ordering::Relaxed);
        if consuming.as_ref().is_some_and(|c| c.generation != current) {
            self.drop_consumer(&mut consuming);
        }
        if consuming.is_none() {
            *consuming = Some(self.start_consuming().await?);
        }
        let Some(c) = consuming.as_mut() else {
            return Ok(Vec::new());
        };
        let generation = c.generation;
        let mut deliveries = Vec::new();
        let first = match tokio::time::timeout_at(deadline, c.deliveries.recv()).await {
            Err(_) => return Ok(Vec::new()),
            Ok(first) => first,
        };
        let mut next = first;
        loop {
            match next {
                Some(Ok(d)) => {
                    c.buffered.fetch_sub(1, Ordering::Relaxed);
                    deliveries.push(d);
                }
                Some(Err(e)) => {
                    self.drop_consumer(&mut consuming);
                    let error = self.broken(e).await;
                    if deliveries.is_empty() {
                        return Err(error);
                    }
                    // Their channel is gone: the broker gives them to someone else.
                    return Ok(Vec::new());
                }
                None => {
                    self.drop_consumer(&mut consuming);
                    return Err(self.broken("the consumer stopped").await);
                }
            }
            if deliveries.len() >= max {
                break;
            }
            match c.deliveries.try_recv() {
                Ok(d) => next = Some(d),
                Err(_) => break,
            }
        }
        drop(consuming);
        let mut leases = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            if let Some(lease) = self.admit(delivery, generation).await {
                leases.push(lease);
            }
        }
        Ok(leases)
    }
}

fn dead_headers(reason: &str, history: &[AttemptFailure]) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from(HEADER_REASON),
        AMQPValue::LongString(reason.into()),
    );
    headers.insert(
        ShortString::from(HEADER_DEAD_AT),
        AMQPValue::LongLongInt(i64::try_from(now_unix_ms()).unwrap_or(i64::MAX)),
    );
    headers.insert(
        ShortString::from(HEADER_ATTEMPTS),
        AMQPValue::LongLongInt(i64::try_from(history.len()).unwrap_or(i64::MAX)),
    );
    headers.insert(
        ShortString::from(HEADER_HISTORY),
        AMQPValue::LongString(
            serde_json::to_string(history)
                .unwrap_or_default()
                .as_str()
                .into(),
        ),
    );
    headers
}

impl TaskQueue for AmqpQueue {
    fn name(&self) -> &str {
        &self.name
    }

    fn system(&self) -> &'static str {
        "rabbitmq"
    }

    fn publish(&self, task: Task) -> BoxFuture<'_, Result<PublishResult, QueueError>> {
        Box::pin(async move {
            let mut results = self.publish_batch(vec![task]).await?;
            Ok(results.pop().unwrap_or(PublishResult::AlreadyKnown))
        })
    }

    fn publish_batch(
        &self,
        tasks: Vec<Task>,
    ) -> BoxFuture<'_, Result<Vec<PublishResult>, QueueError>> {
        Box::pin(async move {
            let mut results = Vec::with_capacity(tasks.len());
            let mut fresh = Vec::new();
            for task in &tasks {
                let id: Arc<str> = Arc::from(task.id.as_str());
                if self.admit_id(&id) {
                    results.push(PublishResult::Enqueued);
                    fresh.push((task, id));
                } else {
                    results.push(PublishResult::AlreadyKnown);
                }
            }
            if fresh.is_empty() {
                // Every id is known here: nothing to send, and no broker needed to say so.
                return Ok(results);
            }
            let mut messages = Vec::with_capacity(fresh.len());
            for (task, _) in &fresh {
                messages.push((task.id.as_str(), encode(task, self.signer.as_ref())?, None));
            }
            if let Err(e) = self.publish_to(&self.names.work, &messages).await {
                for (_, id) in &fresh {
                    self.forget(id);
                }
                return Err(e);
            }
            self.published
                .fetch_add(fresh.len() as u64, Ordering::Relaxed);
            Ok(results)
        })
    }

    fn consume(&self, wait: Duration) -> BoxFuture<'_, Result<Option<Lease>, QueueError>> {
        Box::pin(async move { Ok(self.read(1, wait).await?.pop()) })
    }

    fn consume_batch(
        &self,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<Lease>, QueueError>> {
        Box::pin(self.read(max.max(1), wait))
    }

    fn ack<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let (held, id) = self.take(lease)?;
            self.answer("basic.ack", held.acker.ack(BasicAckOptions::default()))
                .await
                .map_err(|_| QueueError::UnknownLease(lease.receipt))?;
            // A task that keeps its id stays known for the dedupe window, or the shorter
            // window it asks for (its entry dated so that it ends then).
            if !lease.task.keeps_id_after_ack() {
                self.forget(&id);
            } else if let Some(keep) = lease.task.kept_for() {
                let window = Duration::from_secs(self.config.dedupe_window_secs);
                if let Some(at) = window
                    .checked_sub(keep)
                    .and_then(|early| Instant::now().checked_sub(early))
                {
                    lock(&self.known).insert(id, Known::Pending(at));
                }
            }
            self.processed.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
    }

    fn ack_batch<'a>(&'a self, leases: &'a [Lease]) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            // Acknowledgements have no reply: sending them back to back costs no round trip.
            let mut first_error = None;
            for lease in leases {
                if let Err(e) = self.ack(lease).await {
                    first_error.get_or_insert(e);
                }
            }
            first_error.map_or(Ok(()), Err)
        })
    }

    fn nack<'a>(
        &'a self,
        lease: &'a Lease,
        retry_delay: Duration,
        failure: Option<AttemptFailure>,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let (held, _) = self.take(lease)?;
            let mut task = (*lease.task).clone();
            let counted = failure.is_some();
            if let Some(failure) = failure {
                task.attempt = task.attempt.saturating_add(1);
                task.history.push(failure);
            }
            // Republished rather than rejected with requeue: the broker would count a
            // requeue as a delivery, and the history must travel with the task.
            self.republish(held, &task, retry_delay).await?;
            if counted {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })
    }

    fn dead_letter<'a>(
        &'a self,
        lease: &'a Lease,
        failure: AttemptFailure,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let (held, id) = self.take(lease)?;
            let mut task = (*lease.task).clone();
            task.attempt = task.attempt.saturating_add(1);
            task.history.push(failure.clone());
            let body = encode(&task, self.signer.as_ref())?;
            if !self
                .bury_raw(&held.acker, &id, body, &failure.reason, &task.history)
                .await
            {
                return Err(unavailable(
                    "the dead letter was not confirmed; the task goes back",
                ));
            }
            lock(&self.known).insert(id, Known::Dead);
            self.failed.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
    }

    fn stats(&self) -> BoxFuture<'_, Result<QueueStats, QueueError>> {
        Box::pin(async move {
            let (channel, _, delays) = self.new_channel().await?;
            let count = |queue: String| {
                let channel = channel.clone();
                async move {
                    let declare = channel.queue_declare(
                        queue.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    );
                    self.answer("queue.declare", declare)
                        .await
                        .map(|q| u64::from(q.message_count()))
                }
            };
            let counted = async {
                let depth = count(self.names.work.clone()).await?;
                let dead = count(self.names.dead.clone()).await?;
                let mut scheduled = 0;
                for ms in delays {
                    scheduled += count(self.delay_queue(ms)).await?;
                }
                Ok::<_, QueueError>((depth, dead, scheduled))
            };
            let result = counted.await;
            let _ = self
                .answer("channel.close", channel.close(200, "stats".into()))
                .await;
            let (depth, dead, scheduled) = result?;
            // In flight here: leased, and arrived but not yet leased.
            let buffered = lock(&self.buffered).load(Ordering::Relaxed);
            let (in_flight, oldest) = {
                let leases = lock(&self.leases);
                let oldest = leases.values().map(|(h, _)| h.since).min();
                (leases.len() as u64 + buffered, oldest)
            };
            Ok(QueueStats {
                depth,
                scheduled,
                in_flight,
                published: self.published.load(Ordering::Relaxed),
                processed: self.processed.load(Ordering::Relaxed),
                failed: self.failed.load(Ordering::Relaxed),
                dead,
                lag: None,
                oldest_pending_age_ms: oldest
                    .map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)),
            })
        })
    }

    /// Only what this process published or saw die is known here: an id it does not know
    /// may be on the broker from another process, so the answer is then "cannot tell".
    fn holds<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<bool>, QueueError>> {
        let known = lock(&self.known).contains_key(id);
        Box::pin(std::future::ready(Ok(known.then_some(true))))
    }

    fn dead_letters(&self) -> Option<&dyn DeadLetterStore> {
        Some(self)
    }
}

/// A dead letter taken off the dead queue for a moment (returned when its channel closes).
struct Taken {
    letter: DeadLetter,
    acker: Acker,
}

/// A dead letter as the dead queue holds it; an envelope that does not decode, or whose
/// signature is not valid on a queue that signs, is a placeholder task holding its raw
/// text, so that a replay can never turn an injected message into a signed task.
fn to_dead_letter(queue: &str, delivery: &Delivery, signer: Option<&Signer>) -> DeadLetter {
    let headers = delivery.properties.headers().clone().unwrap_or_default();
    let id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_default();
    let task = match signing::decode(&delivery.data, usize::MAX / 2, signer) {
        Ok(task) => task,
        Err(_) => {
            // An undecodable message: its raw text, as far as it goes, in a placeholder.
            let raw: String = String::from_utf8_lossy(&delivery.data)
                .chars()
                .take(1024)
                .collect();
            Task::new(
                if id.is_empty() {
                    "undecodable"
                } else {
                    id.as_str()
                },
                REASON_UNDECODABLE,
                queue,
                serde_json::json!({ "raw": raw }),
            )
            .unwrap_or_else(|_| unreachable_task())
        }
    };
    DeadLetter {
        id: if id.is_empty() {
            task.id.to_string()
        } else {
            id
        },
        reason: text_header(&headers, HEADER_REASON).unwrap_or_default(),
        dead_at_unix_ms: number_header(&headers, HEADER_DEAD_AT).unwrap_or(0),
        task,
    }
}

fn unreachable_task() -> Task {
    Task::new(
        "undecodable",
        REASON_UNDECODABLE,
        "amqp",
        serde_json::Value::Null,
    )
    .unwrap_or_else(|_| unreachable!("a literal id and kind are valid"))
}

impl AmqpQueue {
    /// Takes up to `limit` dead letters off the dead queue onto a new channel,
    /// unacknowledged, for [`AmqpQueue::put_back`] or an acknowledgement each.
    async fn take_dead(&self, limit: usize) -> Result<(Channel, Vec<Taken>), QueueError> {
        let (channel, _, _) = self.new_channel().await?;
        let mut taken = Vec::new();
        match self.take_dead_on(&channel, limit, &mut taken).await {
            Ok(()) => Ok((channel, taken)),
            Err(e) => {
                self.put_back(channel, &taken.iter().collect::<Vec<_>>())
                    .await;
                Err(e)
            }
        }
    }

    /// Returns taken dead letters to the dead queue, in order, and closes their channel.
    /// Rejected explicitly: a quorum queue returns what a closed channel held only
    /// asynchronously, after which a get from another channel could miss them.
    async fn put_back(&self, channel: Channel, taken: &[&Taken]) {
        for t in taken {
            self.requeue(&t.acker).await;
        }
        let _ = self
            .answer("channel.close", channel.close(200, "done".into()))
            .await;
    }

    /// A new channel on the link, with the link's generation and its declared delay queues.
    async fn new_channel(&self) -> Result<(Channel, u64, Vec<u64>), QueueError> {
        let link = self.link().await?;
        match self
            .answer("channel.open", link.connection.create_channel())
            .await
        {
            Ok(ch) => Ok((ch, link.generation, link.delays.iter().copied().collect())),
            Err(e) => {
                drop(link);
                Err(self.broken(e).await)
            }
        }
    }

    async fn take_dead_on(
        &self,
        channel: &Channel,
        limit: usize,
        taken: &mut Vec<Taken>,
    ) -> Result<(), QueueError> {
        // Each get bounded in time: a quorum queue just recovered from a crash was seen to
        // hold a get for a minute.
        while taken.len() < limit {
            let get = channel.basic_get(
                self.names.dead.as_str().into(),
                BasicGetOptions { no_ack: false },
            );
            let got = self.answer("basic.get", get).await?;
            let Some(got) = got else { break };
            let letter = to_dead_letter(&self.name, &got.delivery, self.signer.as_ref());
            taken.push(Taken {
                letter,
                acker: got.delivery.acker,
            });
        }
        Ok(())
    }

    async fn replay_taken(&self, taken: &Taken) -> Result<(), QueueError> {
        let mut task = taken.letter.task.clone();
        task.replayed_from_dead_letter();
        let id: Arc<str> = Arc::from(task.id.as_str());
        lock(&self.known).insert(Arc::clone(&id), Known::Pending(Instant::now()));
        self.publish_to(
            &self.names.work,
            &[(task.id.as_str(), encode(&task, self.signer.as_ref())?, None)],
        )
        .await?;
        self.answer("basic.ack", taken.acker.ack(BasicAckOptions::default()))
            .await?;
        Ok(())
    }
}

impl DeadLetterStore for AmqpQueue {
    fn list(
        &self,
        cursor: Option<String>,
        limit: usize,
    ) -> BoxFuture<'_, Result<DeadLetterPage, QueueError>> {
        Box::pin(async move {
            let skip: usize = cursor.as_deref().and_then(|c| c.parse().ok()).unwrap_or(0);
            let _one = self.dead_ops.lock().await;
            let (channel, taken) = self.take_dead(skip + limit + 1).await?;
            self.put_back(channel, &taken.iter().collect::<Vec<_>>())
                .await;
            let more = taken.len() > skip + limit;
            let items = taken
                .into_iter()
                .skip(skip)
                .take(limit)
                .map(|t| t.letter)
                .collect();
            Ok(DeadLetterPage {
                items,
                next_cursor: more.then(|| (skip + limit).to_string()),
            })
        })
    }

    fn replay<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(self.settle_dead(id, Settle::Replay))
    }

    fn replay_all(&self) -> BoxFuture<'_, Result<usize, QueueError>> {
        Box::pin(async move {
            let _one = self.dead_ops.lock().await;
            let (channel, taken) = self.take_dead(usize::MAX).await?;
            let mut replayed = 0;
            let mut result = Ok(());
            for t in &taken {
                if let Err(e) = self.replay_taken(t).await {
                    result = Err(e);
                    break;
                }
                replayed += 1;
            }
            self.put_back(channel, &taken[replayed..].iter().collect::<Vec<_>>())
                .await;
            result.map(|()| replayed)
        })
    }

    fn purge<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(self.settle_dead(id, Settle::Purge))
    }
}

/// What becomes of one dead letter.
#[derive(Clone, Copy, Debug)]
enum Settle {
    /// Back on the work queue with a full set of attempts.
    Replay,
    /// Gone for good.
    Purge,
}

impl AmqpQueue {
    /// Finds dead letter `id`, replays or purges it, and puts every other one back.
    async fn settle_dead(&self, id: &str, settle: Settle) -> Result<(), QueueError> {
        let _one = self.dead_ops.lock().await;
        let (channel, taken) = self.take_dead(usize::MAX).await?;
        let found = taken.iter().position(|t| t.letter.id == id);
        let result = match (found, settle) {
            (Some(i), Settle::Replay) => self.replay_taken(&taken[i]).await,
            (Some(i), Settle::Purge) => self
                .answer("basic.ack", taken[i].acker.ack(BasicAckOptions::default()))
                .await
                .map(|_| self.forget(id)),
            (None, _) => Err(QueueError::DeadLetterNotFound(id.to_owned())),
        };
        let settled = found.filter(|_| result.is_ok());
        let rest: Vec<&Taken> = taken
            .iter()
            .enumerate()
            .filter_map(|(i, t)| (Some(i) != settled).then_some(t))
            .collect();
        self.put_back(channel, &rest).await;
        result
    }
}

/// Readiness of the broker behind a queue: connected (or reconnected) within 2 s.
pub struct AmqpHealth(pub Arc<AmqpQueue>);

impl std::fmt::Debug for AmqpHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("AmqpHealth").field(&self.0.name).finish()
    }
}

impl HealthContributor for AmqpHealth {
    fn name(&self) -> &str {
        "amqp"
    }

    fn check(&self, probe: Probe) -> BoxFuture<'_, HealthStatus> {
        let connected = async { self.0.link().await.map(|_| ()) };
        Box::pin(super::server_readiness(probe, "amqp broker", connected))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_round_up_to_a_few_buckets() {
        let ms = |n| delay_bucket(Duration::from_millis(n));
        assert_eq!(
            [
                ms(0),
                ms(1),
                ms(2),
                ms(4),
                ms(6),
                ms(8),
                ms(100),
                ms(101),
                ms(250),
                ms(999)
            ],
            [1, 1, 2, 5, 7, 10, 100, 200, 300, 1000]
        );
        assert_eq!(ms(3_000_000), 3_000_000);
        assert_eq!(ms(u64::MAX / 2), MAX_DELAY_MS);
        assert_eq!(ms(MAX_DELAY_MS + 1), MAX_DELAY_MS);
    }

    #[test]
    fn config_problems_name_their_keys() {
        let config = AmqpQueueConfig {
            url: "redis://x".into(),
            queue_prefix: "a b".into(),
            max_deliveries: 0,
            ..AmqpQueueConfig::default()
        };
        let keys: Vec<String> = config
            .problems("queue")
            .into_iter()
            .map(|p| p.key)
            .collect();
        assert_eq!(
            keys,
            ["queue.url", "queue.queue_prefix", "queue.max_deliveries"]
        );
        assert!(AmqpQueueConfig::default().problems("queue").is_empty());
    }
}
