//! A durable queue on Redis Streams (`queue-redis` feature): a stream and a consumer group
//! per queue, delayed retries in a sorted set moved back atomically by a Lua script, dead
//! letters in a stream of their own, idempotent publish by task id, and reclaiming of work
//! whose consumer died (`XAUTOCLAIM`), with a delivery count that dead-letters poison.
//!
//! Keys of queue `Q` under prefix `P`: `P:Q:stream` (group `plba`), `P:Q:scheduled` (sorted
//! set of task ids by due time) with `P:Q:scheduled:env` (their envelopes), `P:Q:dead`
//! (stream) with `P:Q:dead:index` (task id → dead entry id), and `P:Q:known:<task id>`
//! (`SET NX` with a TTL) for publish idempotency.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_redis::redis::{self, Value};
use deadpool_redis::{Pool, Runtime};
use runtime_contracts::{
    AttemptFailure, BoxFuture, ConfigProblem, ConsumerInfo, DeadLetter, DeadLetterPage,
    DeadLetterStore, HealthContributor, HealthStatus, Inspection, Lease, LeaseHolder, LeaseInfo,
    Leases, Probe, PublishResult, QueueError, QueueStats, RetryInfo, Task, TaskQueue,
};
use serde::Deserialize;

use super::signing::{self, Refusal, Signer};
use crate::now_unix_ms;

/// A multiplexed connection: many requests in flight on one socket.
type Conn = redis::aio::MultiplexedConnection;

/// `[queue]` with `type = "redis"`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct RedisQueueConfig {
    /// Redis URL, e.g. `redis://127.0.0.1:6379/0`; `rediss://` is TLS (rustls), the server's
    /// certificate checked against the public roots or `ca_file`.
    pub url: String,
    /// PEM file of the CAs trusted for a `rediss://` server (a private CA); unset: the
    /// public (WebPKI) roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// Prefix of every key.
    pub key_prefix: String,
    /// Consumer name in the group; host name and process id when empty.
    pub consumer: String,
    /// Connections in the pool.
    pub pool_size: usize,
    /// Entries read per `XREADGROUP`.
    pub batch_size: usize,
    /// Work pending longer than this (ms) is taken over from its consumer. Must exceed every
    /// pool's handler timeout, or live work would be stolen.
    pub claim_min_idle_ms: u64,
    /// How often a consumer looks for work to take over and for due retries (ms).
    pub reclaim_interval_ms: u64,
    /// Deliveries after which an entry whose consumers keep dying is dead-lettered as
    /// `worker_lost`.
    pub max_deliveries: u64,
    /// Largest envelope accepted from the stream, in bytes; larger is `undecodable`.
    pub max_entry_bytes: usize,
    /// How long a published task id is remembered for idempotent publishing (s).
    pub dedupe_ttl_secs: u64,
    /// The environment variable holding this queue's signing key (at least 32 bytes, the
    /// same in every process): every envelope is then signed, and one read without a valid
    /// signature is dead-lettered as `unauthenticated` (see `queue::signing`). Unset: none.
    pub signing_key_env: Option<String>,
}

impl Default for RedisQueueConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".to_owned(),
            ca_file: None,
            key_prefix: "plba".to_owned(),
            consumer: String::new(),
            pool_size: 8,
            batch_size: 32,
            claim_min_idle_ms: 120_000,
            reclaim_interval_ms: 5_000,
            max_deliveries: 5,
            max_entry_bytes: 64 * 1024,
            dedupe_ttl_secs: 7 * 24 * 3600,
            signing_key_env: None,
        }
    }
}

impl RedisQueueConfig {
    /// Problems with these values, keyed under `prefix`; `handler_timeouts` are the pools'.
    pub fn problems(&self, prefix: &str, handler_timeouts: &[(String, u64)]) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        if redis::parse_redis_url(&self.url).is_none() {
            problems.push(ConfigProblem::new(
                format!("{prefix}.url"),
                "not a redis:// or rediss:// URL",
            ));
        }
        problems.extend(super::link_problems(
            prefix,
            &self.url,
            "rediss://",
            self.ca_file.as_deref(),
        ));
        problems.extend(runtime_contracts::config::require_positive(
            prefix,
            &[
                ("pool_size", self.pool_size as u64),
                ("batch_size", self.batch_size as u64),
                ("claim_min_idle_ms", self.claim_min_idle_ms),
                ("reclaim_interval_ms", self.reclaim_interval_ms),
                ("max_deliveries", self.max_deliveries),
                ("max_entry_bytes", self.max_entry_bytes as u64),
                ("dedupe_ttl_secs", self.dedupe_ttl_secs),
            ],
        ));
        if let Some(var) = &self.signing_key_env {
            if let Err(why) = Signer::from_env(var, "") {
                problems.push(ConfigProblem::new(format!("{prefix}.signing_key_env"), why));
            }
        }
        for (pool, timeout) in handler_timeouts {
            if self.claim_min_idle_ms <= *timeout {
                problems.push(ConfigProblem::new(
                    format!("{prefix}.claim_min_idle_ms"),
                    format!("must exceed pools.{pool}.handler_timeout_ms ({timeout}), or live work would be taken over"),
                ));
            }
        }
        problems
    }

    fn consumer_name(&self) -> String {
        if !self.consumer.is_empty() {
            return self.consumer.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "host".to_owned());
        format!("{host}-{}", std::process::id())
    }
}

const GROUP: &str = "plba";
const REASON_WORKER_LOST: &str = "worker_lost";
const REASON_UNDECODABLE: &str = "undecodable";
const REASON_UNAUTHENTICATED: &str = "unauthenticated";

/// Publishes unless the id is known: the check and the append are one step, so a crash
/// between them cannot leave an id marked known with no entry.
/// With a fence (KEYS[3], ARGV[3]: the task's lease token), a token older than the
/// resource's current one is refused with the current token, negated.
const PUBLISH: &str = r"
if ARGV[3] then
  local current = tonumber(redis.call('GET', KEYS[3]) or '0')
  if tonumber(ARGV[3]) < current then return -current end
end
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', tonumber(ARGV[2])) then
  return redis.call('XADD', KEYS[2], '*', 'env', ARGV[1])
end
return false
";

/// `PUBLISH` for a batch: KEYS[1] is the stream, KEYS[2] the chunk's fence key, KEYS[3..]
/// the tasks' known keys; ARGV[1] the TTL, ARGV[2] the chunk's lease token (`0`: not
/// fenced) and ARGV[3..] the envelopes. One call per chunk instead of one per task. A
/// fenced chunk whose token is older than the resource's current one adds nothing and
/// answers the current token, negated.
const PUBLISH_BATCH: &str = r"
local ttl = tonumber(ARGV[1])
local token = tonumber(ARGV[2])
if token > 0 then
  local current = tonumber(redis.call('GET', KEYS[2]) or '0')
  if token < current then return -current end
end
local added = {}
for i = 3, #KEYS do
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', ttl) then
    redis.call('XADD', KEYS[1], '*', 'env', ARGV[i])
    added[i - 2] = 1
  else
    added[i - 2] = 0
  end
end
return added
";

/// Takes a free lease (KEYS[1]) for ARGV[1] for ARGV[2] ms with a new fencing token
/// (KEYS[2]): larger than every token before it, and than the server's clock in ms, so
/// that tokens keep growing even if the server restarts without its data.
const LEASE_ACQUIRE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local now = redis.call('TIME')
local clock = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local token = math.max(tonumber(redis.call('GET', KEYS[2]) or '0') + 1, clock)
redis.call('SET', KEYS[2], string.format('%d', token))
redis.call('SET', KEYS[1], string.format('%d', token) .. ' ' .. ARGV[1], 'PX', tonumber(ARGV[2]))
return token
";

/// Extends the lease (KEYS[1]) to ARGV[2] ms while it is still ARGV[1] (`token owner`).
const LEASE_RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
  return 1
end
return 0
";

/// Deletes the lease (KEYS[1]) while it is still ARGV[1] (`token owner`).
const LEASE_RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Tasks per `PUBLISH_BATCH` call: long enough to amortise the call, short enough not to
/// hold Redis (scripts run alone) for more than about a millisecond.
const PUBLISH_CHUNK: usize = 128;

/// Moves due retries back onto the stream; one script, so two processes moving at once
/// never move the same retry twice.
const MOVE_DUE: &str = r"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(due) do
  local env = redis.call('HGET', KEYS[2], id)
  if env then
    redis.call('XADD', KEYS[3], '*', 'env', env)
    redis.call('HDEL', KEYS[2], id)
  end
  redis.call('ZREM', KEYS[1], id)
end
return #due
";

struct Keys {
    stream: String,
    scheduled: String,
    scheduled_env: String,
    dead: String,
    dead_index: String,
    known_prefix: String,
    /// Leases and fencing tokens belong to the key prefix, not to one queue: every queue
    /// under the prefix honours the same fences.
    lease_prefix: String,
    fence_prefix: String,
}

impl Keys {
    fn new(prefix: &str, queue: &str) -> Self {
        let base = format!("{prefix}:{queue}");
        Self {
            stream: format!("{base}:stream"),
            scheduled: format!("{base}:scheduled"),
            scheduled_env: format!("{base}:scheduled:env"),
            dead: format!("{base}:dead"),
            dead_index: format!("{base}:dead:index"),
            known_prefix: format!("{base}:known:"),
            lease_prefix: format!("{prefix}:lease:"),
            fence_prefix: format!("{prefix}:fence:"),
        }
    }

    fn lease(&self, resource: &str) -> String {
        format!("{}{resource}", self.lease_prefix)
    }

    fn fence(&self, resource: &str) -> String {
        format!("{}{resource}", self.fence_prefix)
    }

    fn known(&self, id: &str) -> String {
        format!("{}{id}", self.known_prefix)
    }
}

/// The refusal of a fenced task whose token is older than `current` (negated by the script).
fn fenced(task: &Task, current: i64) -> QueueError {
    let (resource, token) = task.fence().unwrap_or(("", 0));
    QueueError::Fenced {
        resource: resource.to_owned(),
        token,
        current: current.unsigned_abs(),
    }
}

fn unavailable(e: impl std::fmt::Display) -> QueueError {
    QueueError::Unavailable(e.to_string())
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// One field of a stream entry.
type Field = (String, Vec<u8>);
/// A stream entry: its id and fields.
type Entry = (String, Vec<Field>);

/// `[id, [field, value, ...]]` entries of a stream reply.
fn entries(v: &Value) -> Vec<Entry> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let Value::Array(pair) = item else {
                return None;
            };
            let id = text(pair.first()?)?;
            let fields = match pair.get(1) {
                Some(Value::Array(kv)) => kv
                    .chunks(2)
                    .filter_map(|c| {
                        let k = text(c.first()?)?;
                        let v = match c.get(1)? {
                            Value::BulkString(b) => b.clone(),
                            other => text(other)?.into_bytes(),
                        };
                        Some((k, v))
                    })
                    .collect(),
                _ => Vec::new(),
            };
            Some((id, fields))
        })
        .collect()
}

fn field<'a>(fields: &'a [Field], name: &str) -> Option<&'a [u8]> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_slice())
}

/// What became of an entry read from the stream.
enum Decoded {
    Task(Task),
    /// Dead-lettered under this reason (`undecodable: …`, `unauthenticated: …`).
    Refused(String),
}

fn decode(fields: &[Field], max_bytes: usize, signer: Option<&Signer>) -> Decoded {
    let Some(raw) = field(fields, "env") else {
        return Decoded::Refused(format!("{REASON_UNDECODABLE}: entry has no `env` field"));
    };
    match signing::decode(raw, max_bytes, signer) {
        Ok(task) => Decoded::Task(task),
        Err(Refusal::Undecodable(why)) => Decoded::Refused(format!("{REASON_UNDECODABLE}: {why}")),
        Err(Refusal::Unauthenticated(why)) => {
            Decoded::Refused(format!("{REASON_UNAUTHENTICATED}: {why}"))
        }
    }
}

fn encode(task: &Task, signer: Option<&Signer>) -> Result<String, QueueError> {
    let json = serde_json::to_vec(task)
        .map_err(|e| QueueError::Unavailable(format!("encoding the envelope: {e}")))?;
    // JSON and the seal's prefix are UTF-8.
    String::from_utf8(signing::seal(signer, json))
        .map_err(|e| QueueError::Unavailable(format!("encoding the envelope: {e}")))
}

/// The Redis Streams queue. See the module docs.
pub struct RedisQueue {
    name: String,
    /// Signs what is written and checks what is read, when `signing_key_env` is set.
    signer: Option<Signer>,
    config: RedisQueueConfig,
    consumer: String,
    keys: Keys,
    pool: Pool,
    /// Lease receipt → stream entry id.
    leases: Mutex<HashMap<u64, String>>,
    next_receipt: AtomicU64,
    last_maintenance: Mutex<Option<Instant>>,
    published: AtomicU64,
    processed: AtomicU64,
    failed: AtomicU64,
    move_due: redis::Script,
    publish: redis::Script,
    publish_batch: redis::Script,
    /// The connection shared by every non-blocking command (publish, ack, stats, ...);
    /// blocking reads take their own from the pool. Dropped on any error, so that the next
    /// command reconnects.
    shared: Mutex<Option<Conn>>,
    group_ready: std::sync::atomic::AtomicBool,
    publish_loaded: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for RedisQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisQueue")
            .field("name", &self.name)
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

impl RedisQueue {
    /// A queue named `name`; connects lazily (an unreachable server is an error of the
    /// first operation, and of readiness, not of construction).
    pub fn new(name: impl Into<String>, config: RedisQueueConfig) -> Result<Self, QueueError> {
        let name = name.into();
        let manager = match &config.ca_file {
            Some(path) => {
                let pem = super::read_ca_file(path).map_err(unavailable)?;
                let certificates = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.into_bytes()),
                };
                let client = redis::Client::build_with_tls(config.url.as_str(), certificates)
                    .map_err(unavailable)?;
                deadpool_redis::Manager::new(client.get_connection_info().clone())
            }
            None => deadpool_redis::Manager::new(config.url.as_str()),
        }
        .map_err(unavailable)?;
        let pool = Pool::builder(manager)
            .config(deadpool_redis::PoolConfig::new(config.pool_size))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(unavailable)?;
        let signer = Signer::of_queue(config.signing_key_env.as_deref(), &name)?;
        Ok(Self {
            signer,
            keys: Keys::new(&config.key_prefix, &name),
            consumer: config.consumer_name(),
            name,
            config,
            pool,
            leases: Mutex::default(),
            next_receipt: AtomicU64::new(1),
            last_maintenance: Mutex::default(),
            published: AtomicU64::new(0),
            processed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            move_due: redis::Script::new(MOVE_DUE),
            publish: redis::Script::new(PUBLISH),
            publish_batch: redis::Script::new(PUBLISH_BATCH),
            shared: Mutex::new(None),
            group_ready: std::sync::atomic::AtomicBool::new(false),
            publish_loaded: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The consumer name this process uses in the group.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    async fn conn(&self) -> Result<Conn, QueueError> {
        if let Some(c) = self
            .shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Ok(c);
        }
        let pooled = self.pool.get().await.map_err(|e| self.broken(e))?;
        let conn = deadpool_redis::Connection::take(pooled);
        *self.shared.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
        Ok(conn)
    }

    /// Records a failed command: the shared connection is dropped (the next command
    /// reconnects) and the group is checked again (a restarted server may have lost it).
    fn broken(&self, e: impl std::fmt::Display) -> QueueError {
        self.shared.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.group_ready.store(false, Ordering::Relaxed);
        self.publish_loaded.store(false, Ordering::Relaxed);
        unavailable(e)
    }

    async fn ensure_group(&self, conn: &mut Conn) -> Result<(), QueueError> {
        if self.group_ready.load(Ordering::Relaxed) {
            return Ok(());
        }
        let created: redis::RedisResult<Value> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.keys.stream)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(conn)
            .await;
        match created {
            Ok(_) => {}
            Err(e) if e.to_string().contains("BUSYGROUP") => {}
            Err(e) => return Err(self.broken(e)),
        }
        self.group_ready.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn lease(&self, task: Task, entry: String) -> Lease {
        let receipt = self.next_receipt.fetch_add(1, Ordering::Relaxed);
        self.leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(receipt, entry);
        Lease {
            task: Arc::new(task),
            receipt,
        }
    }

    fn take_entry(&self, lease: &Lease) -> Result<String, QueueError> {
        self.leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&lease.receipt)
            .ok_or(QueueError::UnknownLease(lease.receipt))
    }

    /// Writes a dead letter and removes the entry from the main stream, atomically.
    async fn bury(
        &self,
        conn: &mut Conn,
        entry: &str,
        task_id: &str,
        envelope: &str,
        reason: &str,
    ) -> Result<(), QueueError> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("XADD")
            .arg(&self.keys.dead)
            .arg("*")
            .arg("env")
            .arg(envelope)
            .arg("reason")
            .arg(reason)
            .arg("task")
            .arg(task_id)
            .arg("at")
            .arg(now_unix_ms())
            .cmd("XACK")
            .arg(&self.keys.stream)
            .arg(GROUP)
            .arg(entry)
            .ignore()
            .cmd("XDEL")
            .arg(&self.keys.stream)
            .arg(entry)
            .ignore();
        let (dead_id,): (String,) = pipe.query_async(conn).await.map_err(|e| self.broken(e))?;
        let _: () = redis::cmd("HSET")
            .arg(&self.keys.dead_index)
            .arg(task_id)
            .arg(&dead_id)
            .query_async(conn)
            .await
            .map_err(|e| self.broken(e))?;
        Ok(())
    }

    /// Turns read entries into leases; undecodable ones are dead-lettered and acknowledged.
    async fn admit(&self, conn: &mut Conn, read: Vec<Entry>) -> Result<Vec<Lease>, QueueError> {
        let mut leases = Vec::with_capacity(read.len());
        for (entry, fields) in read {
            match decode(&fields, self.config.max_entry_bytes, self.signer.as_ref()) {
                Decoded::Task(task) => leases.push(self.lease(task, entry)),
                Decoded::Refused(reason) => {
                    tracing::error!(queue = %self.name, entry, %reason, "entry refused and dead-lettered");
                    let raw = field(&fields, "env")
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                        .unwrap_or_default();
                    let kind = reason.split(':').next().unwrap_or(REASON_UNDECODABLE);
                    let id = format!("{kind}:{entry}");
                    self.bury(conn, &entry, &id, &raw, &reason).await?;
                }
            }
        }
        Ok(leases)
    }

    /// Moves due retries and takes over work of dead consumers, at most once per
    /// `reclaim_interval_ms` per process.
    async fn maintain(&self, conn: &mut Conn, max: usize) -> Result<Vec<Lease>, QueueError> {
        {
            let mut last = self
                .last_maintenance
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let interval = Duration::from_millis(self.config.reclaim_interval_ms);
            if last.is_some_and(|t| t.elapsed() < interval) {
                return Ok(Vec::new());
            }
            *last = Some(Instant::now());
        }
        self.move_due_retries(conn).await?;
        self.reclaim(conn, max).await
    }

    async fn move_due_retries(&self, conn: &mut Conn) -> Result<u64, QueueError> {
        super::fault("redis.retry_mover")?;
        let moved: u64 = self
            .move_due
            .key(&self.keys.scheduled)
            .key(&self.keys.scheduled_env)
            .key(&self.keys.stream)
            .arg(now_unix_ms())
            .arg(1000)
            .invoke_async(conn)
            .await
            .map_err(|e| self.broken(e))?;
        Ok(moved)
    }

    async fn reclaim(&self, conn: &mut Conn, max: usize) -> Result<Vec<Lease>, QueueError> {
        let reply: Value = redis::cmd("XAUTOCLAIM")
            .arg(&self.keys.stream)
            .arg(GROUP)
            .arg(&self.consumer)
            .arg(self.config.claim_min_idle_ms)
            .arg("0-0")
            .arg("COUNT")
            .arg(max.min(self.config.batch_size).max(1))
            .query_async(conn)
            .await
            .map_err(|e| self.broken(e))?;
        let claimed = match &reply {
            Value::Array(parts) => parts.get(1).map(entries).unwrap_or_default(),
            _ => Vec::new(),
        };
        if claimed.is_empty() {
            return Ok(Vec::new());
        }
        let counts = self.delivery_counts(conn).await?;
        let mut keep = Vec::new();
        for (entry, fields) in claimed {
            let deliveries = counts.get(&entry).copied().unwrap_or(1);
            if deliveries > self.config.max_deliveries {
                let raw = field(&fields, "env")
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                let task_id =
                    match decode(&fields, self.config.max_entry_bytes, self.signer.as_ref()) {
                        Decoded::Task(t) => t.id.to_string(),
                        Decoded::Refused(reason) => format!(
                            "{}:{entry}",
                            reason.split(':').next().unwrap_or(REASON_UNDECODABLE)
                        ),
                    };
                tracing::error!(queue = %self.name, entry, deliveries, "consumers kept dying on this entry; dead-lettered as worker_lost");
                self.bury(
                    conn,
                    &entry,
                    &task_id,
                    &raw,
                    &format!("{REASON_WORKER_LOST}: {deliveries} deliveries without a result"),
                )
                .await?;
            } else {
                tracing::warn!(queue = %self.name, entry, deliveries, "took over work whose consumer stopped answering");
                keep.push((entry, fields));
            }
        }
        self.admit(conn, keep).await
    }

    async fn delivery_counts(&self, conn: &mut Conn) -> Result<HashMap<String, u64>, QueueError> {
        let reply: Value = redis::cmd("XPENDING")
            .arg(&self.keys.stream)
            .arg(GROUP)
            .arg("-")
            .arg("+")
            .arg(10_000)
            .arg(&self.consumer)
            .query_async(conn)
            .await
            .map_err(|e| self.broken(e))?;
        let mut counts = HashMap::new();
        if let Value::Array(rows) = reply {
            for row in rows {
                if let Value::Array(cols) = row {
                    if let (Some(id), Some(Value::Int(n))) =
                        (cols.first().and_then(text), cols.get(3))
                    {
                        counts.insert(id, u64::try_from(*n).unwrap_or(0));
                    }
                }
            }
        }
        Ok(counts)
    }

    async fn read(&self, max: usize, wait: Duration) -> Result<Vec<Lease>, QueueError> {
        let mut conn = self.conn().await?;
        self.ensure_group(&mut conn).await?;
        let reclaimed = self.maintain(&mut conn, max).await?;
        if !reclaimed.is_empty() {
            return Ok(reclaimed);
        }
        // A blocking read holds its connection until it returns: never the shared one.
        let mut pooled = self.pool.get().await.map_err(|e| self.broken(e))?;
        let blocking: &mut Conn = &mut pooled;
        let mut block = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
        loop {
            let read = self.read_new(blocking, max, block).await?;
            if read.is_empty() {
                return Ok(Vec::new());
            }
            let leases = self.admit(&mut conn, read).await?;
            if !leases.is_empty() {
                return Ok(leases);
            }
            // Everything read was undecodable and is dead-lettered: read on, without waiting.
            block = 1;
        }
    }

    async fn read_new(
        &self,
        conn: &mut Conn,
        max: usize,
        block_ms: u64,
    ) -> Result<Vec<Entry>, QueueError> {
        let reply: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(max.min(self.config.batch_size).max(1))
            .arg("BLOCK")
            .arg(block_ms)
            .arg("STREAMS")
            .arg(&self.keys.stream)
            .arg(">")
            .query_async(conn)
            .await
            .map_err(|e| self.broken(e))?;
        Ok(match &reply {
            Value::Array(streams) => streams
                .iter()
                .filter_map(|s| match s {
                    Value::Array(pair) => pair.get(1).map(entries),
                    _ => None,
                })
                .flatten()
                .collect(),
            Value::Map(streams) => streams.iter().flat_map(|(_, v)| entries(v)).collect(),
            _ => Vec::new(),
        })
    }
}

impl TaskQueue for RedisQueue {
    fn name(&self) -> &str {
        &self.name
    }

    fn system(&self) -> &'static str {
        "redis"
    }

    fn publish(&self, task: Task) -> BoxFuture<'_, Result<PublishResult, QueueError>> {
        Box::pin(async move {
            let envelope = encode(&task, self.signer.as_ref())?;
            let mut conn = self.conn().await?;
            self.ensure_group(&mut conn).await?;
            let mut invocation = self.publish.prepare_invoke();
            invocation
                .key(self.keys.known(task.id.as_str()))
                .key(&self.keys.stream)
                .arg(&envelope)
                .arg(self.config.dedupe_ttl_secs);
            if let Some((resource, token)) = task.fence() {
                invocation.key(self.keys.fence(resource)).arg(token);
            }
            let added: Value = invocation
                .invoke_async(&mut conn)
                .await
                .map_err(|e| self.broken(e))?;
            match added {
                Value::Nil => Ok(PublishResult::AlreadyKnown),
                Value::Int(current) if current < 0 => Err(fenced(&task, current)),
                _ => {
                    self.published.fetch_add(1, Ordering::Relaxed);
                    Ok(PublishResult::Enqueued)
                }
            }
        })
    }

    fn publish_batch(
        &self,
        tasks: Vec<Task>,
    ) -> BoxFuture<'_, Result<Vec<PublishResult>, QueueError>> {
        Box::pin(async move {
            if tasks.is_empty() {
                return Ok(Vec::new());
            }
            let envelopes = tasks
                .iter()
                .map(|t| encode(t, self.signer.as_ref()))
                .collect::<Result<Vec<_>, _>>()?;
            let mut conn = self.conn().await?;
            self.ensure_group(&mut conn).await?;
            if !self.publish_loaded.load(Ordering::Relaxed) {
                self.publish_batch
                    .load_async(&mut conn)
                    .await
                    .map_err(|e| self.broken(e))?;
                self.publish_loaded.store(true, Ordering::Relaxed);
            }
            // Chunks of at most PUBLISH_CHUNK tasks that share one fence (a source's
            // tasks all do).
            let mut chunks: Vec<std::ops::Range<usize>> = Vec::new();
            for (i, task) in tasks.iter().enumerate() {
                match chunks.last_mut() {
                    Some(r)
                        if r.len() < PUBLISH_CHUNK && tasks[r.start].fence() == task.fence() =>
                    {
                        r.end = i + 1;
                    }
                    _ => chunks.push(i..i + 1),
                }
            }
            let mut pipe = redis::pipe();
            for range in &chunks {
                let fence = tasks[range.start].fence();
                pipe.cmd("EVALSHA")
                    .arg(self.publish_batch.get_hash())
                    .arg(range.len() + 2)
                    .arg(&self.keys.stream)
                    .arg(
                        fence.map_or_else(|| self.keys.stream.clone(), |(r, _)| self.keys.fence(r)),
                    );
                for task in &tasks[range.clone()] {
                    pipe.arg(self.keys.known(task.id.as_str()));
                }
                pipe.arg(self.config.dedupe_ttl_secs)
                    .arg(fence.map_or(0, |(_, token)| token));
                for envelope in &envelopes[range.clone()] {
                    pipe.arg(envelope);
                }
            }
            let added: Vec<Value> = pipe
                .query_async(&mut conn)
                .await
                .map_err(|e| self.broken(e))?;
            // Added, and the publisher not yet told.
            super::fault("queue.publish_batch")?;
            let mut results: Vec<PublishResult> = Vec::with_capacity(tasks.len());
            let mut refused = None;
            for (range, answer) in chunks.iter().zip(&added) {
                match answer {
                    Value::Int(current) if *current < 0 => {
                        refused.get_or_insert_with(|| fenced(&tasks[range.start], *current));
                    }
                    Value::Array(flags) => results.extend(flags.iter().map(|a| match a {
                        Value::Int(1) => PublishResult::Enqueued,
                        _ => PublishResult::AlreadyKnown,
                    })),
                    other => {
                        return Err(self.broken(format!("unexpected publish answer {other:?}")))
                    }
                }
            }
            let enqueued = results
                .iter()
                .filter(|r| **r == PublishResult::Enqueued)
                .count();
            self.published.fetch_add(enqueued as u64, Ordering::Relaxed);
            match refused {
                // Chunks under a current lease may have been added; publishing is
                // idempotent, so the caller treats the whole batch as not published.
                Some(e) => Err(e),
                None => Ok(results),
            }
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
        Box::pin(self.read(max, wait))
    }

    fn ack<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<(), QueueError>> {
        self.ack_batch(std::slice::from_ref(lease))
    }

    fn ack_batch<'a>(&'a self, leases: &'a [Lease]) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let mut entries = Vec::with_capacity(leases.len());
            let mut unknown = None;
            for lease in leases {
                match self.take_entry(lease) {
                    Ok(entry) => entries.push((entry, &*lease.task)),
                    Err(e) => unknown = Some(e),
                }
            }
            if !entries.is_empty() {
                // Taken off this consumer's leases, not yet acknowledged in Redis.
                super::fault("queue.ack_batch")?;
                let mut conn = self.conn().await?;
                let mut pipe = redis::pipe();
                pipe.atomic();
                pipe.cmd("XACK").arg(&self.keys.stream).arg(GROUP);
                for (entry, _) in &entries {
                    pipe.arg(entry);
                }
                pipe.ignore().cmd("XDEL").arg(&self.keys.stream);
                for (entry, _) in &entries {
                    pipe.arg(entry);
                }
                pipe.ignore();
                // A task that keeps its id stays known until its key's TTL ends.
                let forget: Vec<String> = entries
                    .iter()
                    .filter(|(_, task)| !task.keeps_id_after_ack())
                    .map(|(_, task)| self.keys.known(task.id.as_str()))
                    .collect();
                if !forget.is_empty() {
                    pipe.cmd("DEL").arg(forget).ignore();
                }
                // A shorter window than the publish TTL: the key expires sooner.
                for (_, task) in &entries {
                    if let Some(window) = task.kept_for() {
                        if window.as_secs() < self.config.dedupe_ttl_secs {
                            pipe.cmd("EXPIRE")
                                .arg(self.keys.known(task.id.as_str()))
                                .arg(window.as_secs().max(1))
                                .ignore();
                        }
                    }
                }
                let _: () = pipe
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| self.broken(e))?;
                self.processed
                    .fetch_add(entries.len() as u64, Ordering::Relaxed);
            }
            unknown.map_or(Ok(()), Err)
        })
    }

    fn nack<'a>(
        &'a self,
        lease: &'a Lease,
        retry_delay: Duration,
        failure: Option<AttemptFailure>,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let entry = self.take_entry(lease)?;
            let mut task = (*lease.task).clone();
            if let Some(failure) = failure {
                task.attempt = task.attempt.saturating_add(1);
                task.history.push(failure);
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
            let envelope = encode(&task, self.signer.as_ref())?;
            let mut conn = self.conn().await?;
            let mut pipe = redis::pipe();
            pipe.atomic();
            if retry_delay.is_zero() {
                pipe.cmd("XADD")
                    .arg(&self.keys.stream)
                    .arg("*")
                    .arg("env")
                    .arg(&envelope)
                    .ignore();
            } else {
                let due =
                    now_unix_ms() + u64::try_from(retry_delay.as_millis()).unwrap_or(u64::MAX / 2);
                pipe.cmd("HSET")
                    .arg(&self.keys.scheduled_env)
                    .arg(task.id.as_str())
                    .arg(&envelope)
                    .ignore()
                    .cmd("ZADD")
                    .arg(&self.keys.scheduled)
                    .arg(due)
                    .arg(task.id.as_str())
                    .ignore();
            }
            pipe.cmd("XACK")
                .arg(&self.keys.stream)
                .arg(GROUP)
                .arg(&entry)
                .ignore()
                .cmd("XDEL")
                .arg(&self.keys.stream)
                .arg(&entry)
                .ignore();
            let _: () = pipe
                .query_async(&mut conn)
                .await
                .map_err(|e| self.broken(e))?;
            Ok(())
        })
    }

    fn dead_letter<'a>(
        &'a self,
        lease: &'a Lease,
        failure: AttemptFailure,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let entry = self.take_entry(lease)?;
            let mut task = (*lease.task).clone();
            task.attempt = task.attempt.saturating_add(1);
            task.history.push(failure.clone());
            self.failed.fetch_add(1, Ordering::Relaxed);
            let envelope = encode(&task, self.signer.as_ref())?;
            let mut conn = self.conn().await?;
            self.bury(
                &mut conn,
                &entry,
                task.id.as_str(),
                &envelope,
                &failure.reason,
            )
            .await
        })
    }

    fn inspect(&self, max: usize) -> BoxFuture<'_, Result<Option<Inspection>, QueueError>> {
        Box::pin(async move { self.inspection(max).await.map(Some) })
    }

    fn stats(&self) -> BoxFuture<'_, Result<QueueStats, QueueError>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            self.ensure_group(&mut conn).await?;
            let (length, pending, scheduled, dead): (u64, Value, u64, u64) = redis::pipe()
                .cmd("XLEN")
                .arg(&self.keys.stream)
                .cmd("XPENDING")
                .arg(&self.keys.stream)
                .arg(GROUP)
                .cmd("ZCARD")
                .arg(&self.keys.scheduled)
                .cmd("XLEN")
                .arg(&self.keys.dead)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.broken(e))?;
            let (in_flight, oldest) = match &pending {
                Value::Array(p) => (
                    p.first()
                        .and_then(text)
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0),
                    p.get(1).and_then(text),
                ),
                _ => (0, None),
            };
            let oldest_pending_age_ms = oldest
                .and_then(|id| id.split('-').next().and_then(|ms| ms.parse::<u64>().ok()))
                .map(|ms| now_unix_ms().saturating_sub(ms));
            let lag = self.group_lag(&mut conn).await;
            Ok(QueueStats {
                depth: length.saturating_sub(in_flight),
                scheduled,
                in_flight,
                published: self.published.load(Ordering::Relaxed),
                processed: self.processed.load(Ordering::Relaxed),
                failed: self.failed.load(Ordering::Relaxed),
                dead,
                lag,
                oldest_pending_age_ms,
            })
        })
    }

    /// The id's known key: set at publish, kept while the task is ready, in flight,
    /// scheduled or dead (and after the ack for a task that keeps its id).
    fn holds<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<bool>, QueueError>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            let exists: bool = redis::cmd("EXISTS")
                .arg(self.keys.known(id))
                .query_async(&mut conn)
                .await
                .map_err(|e| self.broken(e))?;
            Ok(Some(exists))
        })
    }

    fn leases(&self) -> Option<&dyn Leases> {
        Some(self)
    }

    fn dead_letters(&self) -> Option<&dyn DeadLetterStore> {
        Some(self)
    }
}

impl RedisQueue {
    /// `XPENDING` (oldest entries, with consumer, idle time and delivery count), the task
    /// of each (`XRANGE`), the scheduled retries with their envelopes, and the group's
    /// consumers (`XINFO CONSUMERS`).
    async fn inspection(&self, max: usize) -> Result<Inspection, QueueError> {
        let mut conn = self.conn().await?;
        self.ensure_group(&mut conn).await?;
        let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(&self.keys.stream)
            .arg(GROUP)
            .arg("-")
            .arg("+")
            .arg(max)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        let mut ranges = redis::pipe();
        for (id, ..) in &pending {
            ranges.cmd("XRANGE").arg(&self.keys.stream).arg(id).arg(id);
        }
        let bodies: Vec<Value> = if pending.is_empty() {
            Vec::new()
        } else {
            ranges
                .query_async(&mut conn)
                .await
                .map_err(|e| self.broken(e))?
        };
        let mut leases: Vec<LeaseInfo> = pending
            .iter()
            .zip(bodies.iter().map(Some).chain(std::iter::repeat(None)))
            .map(|((id, consumer, idle, deliveries), body)| {
                let task = body
                    .map(entries)
                    .and_then(|e| e.into_iter().next())
                    .and_then(|(_, fields)| {
                        match decode(&fields, self.config.max_entry_bytes, self.signer.as_ref()) {
                            Decoded::Task(t) => Some(t),
                            Decoded::Refused(_) => None,
                        }
                    });
                LeaseInfo {
                    task: task
                        .as_ref()
                        .map_or_else(|| format!("stream entry {id}"), |t| t.id.to_string()),
                    kind: task.map(|t| t.kind.to_string()),
                    consumer: Some(consumer.clone()),
                    held_ms: *idle,
                    deliveries: u32::try_from(*deliveries).unwrap_or(u32::MAX),
                }
            })
            .collect();
        leases.sort_by_key(|l| std::cmp::Reverse(l.held_ms));
        let due: Vec<String> = redis::cmd("ZRANGE")
            .arg(&self.keys.scheduled)
            .arg(0)
            .arg(max.saturating_sub(1))
            .query_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        let envelopes: Vec<Option<Vec<u8>>> = if due.is_empty() {
            Vec::new()
        } else {
            redis::cmd("HMGET")
                .arg(&self.keys.scheduled_env)
                .arg(&due)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.broken(e))?
        };
        let retrying = envelopes
            .into_iter()
            .flatten()
            .filter_map(|env| super::decode_envelope(&env, self.config.max_entry_bytes).ok())
            .map(|t| RetryInfo {
                task: t.id.to_string(),
                kind: t.kind.to_string(),
                history: t.history,
            })
            .collect();
        let infos: Value = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(&self.keys.stream)
            .arg(GROUP)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        let consumers = match infos {
            Value::Array(items) => items
                .iter()
                .filter_map(|item| {
                    let Value::Array(kv) = item else { return None };
                    let get = |key: &str| {
                        kv.chunks(2)
                            .find(|c| c.first().and_then(text).as_deref() == Some(key))
                            .and_then(|c| c.get(1))
                            .and_then(text)
                    };
                    Some(ConsumerInfo {
                        name: get("name")?,
                        pending: get("pending")?.parse().ok()?,
                        // Redis 7.2 tells the time since the last successful read apart.
                        idle_ms: get("inactive")
                            .filter(|v| v != "-1")
                            .or_else(|| get("idle"))?
                            .parse()
                            .ok()?,
                    })
                })
                .take(max)
                .collect(),
            _ => Vec::new(),
        };
        Ok(Inspection {
            leases,
            retrying,
            consumers,
        })
    }

    async fn group_lag(&self, conn: &mut Conn) -> Option<u64> {
        let groups: Value = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&self.keys.stream)
            .query_async(conn)
            .await
            .ok()?;
        let Value::Array(groups) = groups else {
            return None;
        };
        for g in groups {
            let pairs: Vec<(String, Value)> = match g {
                Value::Array(kv) => kv
                    .chunks(2)
                    .filter_map(|c| Some((text(c.first()?)?, c.get(1)?.clone())))
                    .collect(),
                Value::Map(kv) => kv
                    .into_iter()
                    .filter_map(|(k, v)| Some((text(&k)?, v)))
                    .collect(),
                _ => continue,
            };
            let is_ours = pairs
                .iter()
                .any(|(k, v)| k == "name" && text(v).as_deref() == Some(GROUP));
            if is_ours {
                return pairs
                    .iter()
                    .find(|(k, _)| k == "lag")
                    .and_then(|(_, v)| text(v))
                    .and_then(|l| l.parse().ok());
            }
        }
        None
    }

    /// Adds to `pipe` the removal of a dead letter (its entry and its index by task id).
    fn forget_dead<'p>(
        &self,
        pipe: &'p mut redis::Pipeline,
        entry: &str,
        id: &str,
    ) -> &'p mut redis::Pipeline {
        pipe.cmd("XDEL")
            .arg(&self.keys.dead)
            .arg(entry)
            .ignore()
            .cmd("HDEL")
            .arg(&self.keys.dead_index)
            .arg(id)
            .ignore()
    }

    async fn dead_entry(
        &self,
        conn: &mut Conn,
        id: &str,
    ) -> Result<Option<(String, DeadLetter)>, QueueError> {
        let entry: Option<String> = redis::cmd("HGET")
            .arg(&self.keys.dead_index)
            .arg(id)
            .query_async(conn)
            .await
            .map_err(|e| self.broken(e))?;
        let Some(entry) = entry else { return Ok(None) };
        let reply: Value = redis::cmd("XRANGE")
            .arg(&self.keys.dead)
            .arg(&entry)
            .arg(&entry)
            .query_async(conn)
            .await
            .map_err(|e| self.broken(e))?;
        Ok(entries(&reply)
            .into_iter()
            .next()
            .and_then(|(e, f)| to_dead_letter(&f, self.signer.as_ref()).map(|d| (e, d))))
    }
}

/// A dead letter as stored; an envelope that does not decode, or whose signature is not
/// valid on a queue that signs, is a placeholder task of kind `undecodable` holding its raw
/// text, so that a replay can never turn an injected entry into a signed task.
fn to_dead_letter(fields: &[Field], signer: Option<&Signer>) -> Option<DeadLetter> {
    let id = String::from_utf8(field(fields, "task")?.to_vec()).ok()?;
    let reason = String::from_utf8_lossy(field(fields, "reason").unwrap_or_default()).into_owned();
    let at = std::str::from_utf8(field(fields, "at").unwrap_or_default())
        .ok()
        .and_then(|a| a.parse().ok())
        .unwrap_or(0);
    let env = field(fields, "env").unwrap_or_default();
    let opened = signing::open(env, signer).ok();
    let task = opened
        .and_then(|json| serde_json::from_slice::<Task>(json).ok())
        .unwrap_or_else(|| {
            // An undecodable envelope is kept as a task whose payload is the raw text.
            let raw = String::from_utf8_lossy(env).into_owned();
            Task::new(
                id.clone(),
                "undecodable",
                "redis",
                serde_json::json!({ "raw": raw.chars().take(1024).collect::<String>() }),
            )
            .unwrap_or_else(|_| {
                Task::new(
                    "undecodable",
                    "undecodable",
                    "redis",
                    serde_json::Value::Null,
                )
                .unwrap_or_else(|_| unreachable_task())
            })
        });
    Some(DeadLetter {
        id,
        task,
        reason,
        dead_at_unix_ms: at,
    })
}

fn unreachable_task() -> Task {
    // Task::new only fails on empty ids and kinds or big payloads; the literals above are neither.
    Task {
        schema_version: Task::SCHEMA_VERSION,
        id: runtime_contracts::TaskId::new("undecodable"),
        kind: "undecodable".into(),
        source: "redis".into(),
        payload: serde_json::Value::Null,
        headers: Default::default(),
        correlation_id: "undecodable".into(),
        causation_id: None,
        attempt: 0,
        history: Vec::new(),
    }
}

/// Leases live beside the queue's keys: `<prefix>:lease:<resource>` holds `token owner`
/// with the lease's expiry, `<prefix>:fence:<resource>` the last token handed out.
impl Leases for RedisQueue {
    fn acquire<'a>(
        &'a self,
        resource: &'a str,
        owner: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<u64>, QueueError>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            let token: Option<u64> = redis::Script::new(LEASE_ACQUIRE)
                .key(self.keys.lease(resource))
                .key(self.keys.fence(resource))
                .arg(owner)
                .arg(millis(ttl))
                .invoke_async(&mut conn)
                .await
                .map_err(|e| self.broken(e))?;
            Ok(token)
        })
    }

    fn renew<'a>(
        &'a self,
        resource: &'a str,
        owner: &'a str,
        token: u64,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, QueueError>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            let renewed: i64 = redis::Script::new(LEASE_RENEW)
                .key(self.keys.lease(resource))
                .arg(format!("{token} {owner}"))
                .arg(millis(ttl))
                .invoke_async(&mut conn)
                .await
                .map_err(|e| self.broken(e))?;
            Ok(renewed == 1)
        })
    }

    fn release<'a>(
        &'a self,
        resource: &'a str,
        owner: &'a str,
        token: u64,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            let _: i64 = redis::Script::new(LEASE_RELEASE)
                .key(self.keys.lease(resource))
                .arg(format!("{token} {owner}"))
                .invoke_async(&mut conn)
                .await
                .map_err(|e| self.broken(e))?;
            Ok(())
        })
    }

    fn holder<'a>(
        &'a self,
        resource: &'a str,
    ) -> BoxFuture<'a, Result<Option<LeaseHolder>, QueueError>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            let key = self.keys.lease(resource);
            let (value, ttl_ms): (Option<String>, i64) = redis::pipe()
                .get(&key)
                .pttl(&key)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.broken(e))?;
            Ok(value.and_then(|v| {
                let (token, owner) = v.split_once(' ')?;
                Some(LeaseHolder {
                    owner: owner.to_owned(),
                    token: token.parse().ok()?,
                    expires_in: Duration::from_millis(u64::try_from(ttl_ms).unwrap_or(0)),
                })
            }))
        })
    }
}

/// A lease's time to live in whole milliseconds, at least one.
fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl DeadLetterStore for RedisQueue {
    fn list(
        &self,
        cursor: Option<String>,
        limit: usize,
    ) -> BoxFuture<'_, Result<DeadLetterPage, QueueError>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            let start = cursor
                .map(|c| format!("({c}"))
                .unwrap_or_else(|| "-".to_owned());
            let reply: Value = redis::cmd("XRANGE")
                .arg(&self.keys.dead)
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(limit.saturating_add(1))
                .query_async(&mut conn)
                .await
                .map_err(|e| self.broken(e))?;
            let mut rows: Vec<(String, DeadLetter)> = entries(&reply)
                .into_iter()
                .filter_map(|(e, f)| to_dead_letter(&f, self.signer.as_ref()).map(|d| (e, d)))
                .collect();
            let next_cursor = if rows.len() > limit {
                rows.truncate(limit);
                rows.last().map(|(e, _)| e.clone())
            } else {
                None
            };
            Ok(DeadLetterPage {
                items: rows.into_iter().map(|(_, d)| d).collect(),
                next_cursor,
            })
        })
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<DeadLetter>, QueueError>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            Ok(self.dead_entry(&mut conn, id).await?.map(|(_, d)| d))
        })
    }

    fn replay<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            let Some((entry, mut dead)) = self.dead_entry(&mut conn, id).await? else {
                return Err(QueueError::DeadLetterNotFound(id.to_owned()));
            };
            dead.task.replayed_from_dead_letter();
            let envelope = encode(&dead.task, self.signer.as_ref())?;
            let mut pipe = redis::pipe();
            pipe.atomic()
                .cmd("XADD")
                .arg(&self.keys.stream)
                .arg("*")
                .arg("env")
                .arg(&envelope)
                .ignore();
            let _: () = self
                .forget_dead(&mut pipe, &entry, id)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.broken(e))?;
            Ok(())
        })
    }

    fn replay_all(&self) -> BoxFuture<'_, Result<usize, QueueError>> {
        Box::pin(async move {
            let mut count = 0;
            loop {
                let page = self.list(None, 500).await?;
                if page.items.is_empty() {
                    return Ok(count);
                }
                for d in page.items {
                    match self.replay(&d.id).await {
                        Ok(()) => count += 1,
                        Err(QueueError::DeadLetterNotFound(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        })
    }

    fn purge<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            let Some((entry, _)) = self.dead_entry(&mut conn, id).await? else {
                return Err(QueueError::DeadLetterNotFound(id.to_owned()));
            };
            let mut pipe = redis::pipe();
            pipe.atomic();
            let _: () = self
                .forget_dead(&mut pipe, &entry, id)
                .cmd("DEL")
                .arg(self.keys.known(id))
                .ignore()
                .query_async(&mut conn)
                .await
                .map_err(|e| self.broken(e))?;
            Ok(())
        })
    }
}

/// Readiness of the Redis server behind a queue: one `PING` per probe, bounded in time.
pub struct RedisHealth(pub Arc<RedisQueue>);

impl std::fmt::Debug for RedisHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("RedisHealth").field(&self.0.name).finish()
    }
}

impl HealthContributor for RedisHealth {
    fn name(&self) -> &str {
        "redis"
    }

    fn check(&self, probe: Probe) -> BoxFuture<'_, HealthStatus> {
        let ping = async {
            let mut conn = self.0.conn().await?;
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .map(|_| ())
                .map_err(|e| self.0.broken(e))
        };
        Box::pin(super::server_readiness(probe, "redis", ping))
    }
}
