//! The `TaskQueue` contract, written once and run against every backend: the in-memory
//! queue, Redis Streams (a private redis-server) and AMQP (a private RabbitMQ broker).
//!
//! Each case gets a queue name of its own, so the backends share one server each. A case
//! that a backend cannot meet by design says so in its line ("n/a: why"); none is skipped
//! silently. Output follows libtest's format, so the suite's summary counts these cases.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plba_testkit::{RabbitServer, RedisServer};
use runtime_adapters::queue::amqp::{AmqpQueue, AmqpQueueConfig};
use runtime_adapters::queue::memory::{MemoryQueue, MemoryQueueConfig};
use runtime_adapters::queue::redis::{RedisQueue, RedisQueueConfig};
use runtime_contracts::{
    AttemptFailure, BoxFuture, Lease, PublishResult, QueueError, Task, TaskQueue,
};

/// Ends a consumer as a crash would: its unsettled leases are left to the backend.
type Kill = Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>;

/// One backend under the contract.
trait Backend: Send + Sync {
    /// A consumer of queue `name`: a new connection and consumer where the backend has
    /// them, the same queue otherwise.
    fn open(&self, name: &str) -> (Arc<dyn TaskQueue>, Kill);
    /// Writes `bytes` onto queue `name` as another writer of the server would; None for
    /// queues that hold typed tasks in memory.
    fn inject(&self, name: &str, bytes: Vec<u8>) -> Option<BoxFuture<'static, ()>>;
    /// A consumer of queue `name` that signs with the key in [`SIGNING_ENV`]; None for
    /// queues that nothing outside the process can write to.
    fn open_signed(&self, name: &str) -> Option<Arc<dyn TaskQueue>>;
    /// Deliveries after which a task whose consumers keep dying is dead-lettered as
    /// `worker_lost`; None when the backend lives and dies with its consumers.
    fn max_deliveries(&self) -> Option<u32>;
}

struct Memory(Mutex<HashMap<String, Arc<MemoryQueue>>>);

impl Backend for Memory {
    fn open(&self, name: &str) -> (Arc<dyn TaskQueue>, Kill) {
        let queue = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(MemoryQueue::new(
                    name,
                    MemoryQueueConfig {
                        capacity: 1000,
                        lease_timeout_ms: 300,
                        ..MemoryQueueConfig::default()
                    },
                ))
            })
            .clone();
        (queue, Box::new(|| Box::pin(async {})))
    }
    fn inject(&self, _: &str, _: Vec<u8>) -> Option<BoxFuture<'static, ()>> {
        None
    }
    fn open_signed(&self, _: &str) -> Option<Arc<dyn TaskQueue>> {
        None
    }
    fn max_deliveries(&self) -> Option<u32> {
        None
    }
}

struct Redis {
    server: RedisServer,
    consumers: std::sync::atomic::AtomicU32,
}

impl Backend for Redis {
    fn open(&self, name: &str) -> (Arc<dyn TaskQueue>, Kill) {
        let n = self
            .consumers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let config = RedisQueueConfig {
            url: self.server.url(),
            consumer: format!("c{n}"),
            claim_min_idle_ms: 300,
            reclaim_interval_ms: 10,
            max_deliveries: 2,
            ..RedisQueueConfig::default()
        };
        let queue = Arc::new(RedisQueue::new(name, config).expect("redis queue"));
        (queue, Box::new(|| Box::pin(async {})))
    }
    fn open_signed(&self, name: &str) -> Option<Arc<dyn TaskQueue>> {
        let config = RedisQueueConfig {
            url: self.server.url(),
            consumer: "signed".into(),
            signing_key_env: Some(SIGNING_ENV.into()),
            ..RedisQueueConfig::default()
        };
        Some(Arc::new(
            RedisQueue::new(name, config).expect("redis queue"),
        ))
    }
    fn inject(&self, name: &str, bytes: Vec<u8>) -> Option<BoxFuture<'static, ()>> {
        let url = self.server.url();
        let stream = format!("plba:{name}:stream");
        Some(Box::pin(async move {
            let client = redis::Client::open(url).expect("client");
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .expect("connect");
            let _: String = redis::cmd("XADD")
                .arg(&stream)
                .arg("*")
                .arg("env")
                .arg(bytes)
                .query_async(&mut conn)
                .await
                .expect("XADD");
        }))
    }
    fn max_deliveries(&self) -> Option<u32> {
        Some(2)
    }
}

struct Amqp {
    server: RabbitServer,
}

impl Backend for Amqp {
    fn open(&self, name: &str) -> (Arc<dyn TaskQueue>, Kill) {
        let config = AmqpQueueConfig {
            url: self.server.url(),
            max_deliveries: 2,
            ..AmqpQueueConfig::default()
        };
        let queue = Arc::new(AmqpQueue::new(name, config, 16).expect("queue"));
        let killed = Arc::clone(&queue);
        (
            queue,
            Box::new(move || Box::pin(async move { killed.close().await })),
        )
    }
    fn open_signed(&self, name: &str) -> Option<Arc<dyn TaskQueue>> {
        let config = AmqpQueueConfig {
            url: self.server.url(),
            signing_key_env: Some(SIGNING_ENV.into()),
            ..AmqpQueueConfig::default()
        };
        Some(Arc::new(AmqpQueue::new(name, config, 16).expect("queue")))
    }
    fn inject(&self, name: &str, bytes: Vec<u8>) -> Option<BoxFuture<'static, ()>> {
        let url = self.server.url();
        let queue = format!("plba.{name}");
        Some(Box::pin(async move {
            use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
            let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
                .await
                .expect("connect");
            let ch = conn.create_channel().await.expect("channel");
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .expect("confirms");
            ch.basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &bytes,
                lapin::BasicProperties::default(),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
            let _ = conn.close(200, "done".into()).await;
        }))
    }
    fn max_deliveries(&self) -> Option<u32> {
        Some(2)
    }
}

fn task(id: &str) -> Task {
    Task::new(id, "job", "test", serde_json::json!({ "n": id })).expect("task")
}

fn failure(n: u32) -> AttemptFailure {
    AttemptFailure {
        attempt: n,
        reason: format!("boom {n}"),
        at_unix_ms: 0,
        next_attempt_at_unix_ms: None,
    }
}

/// How long a task that is there may take to reach a consumer (a broker pushes it).
const ARRIVES: Duration = Duration::from_secs(5);
/// How long a consumer waits to show that nothing is there.
const NOTHING: Duration = Duration::from_millis(200);

/// Consumes until a lease comes or `within` passes (queues that take work over from
/// dead consumers do it while consumers ask).
async fn next(q: &dyn TaskQueue, within: Duration) -> Option<Lease> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if let Some(lease) = q
            .consume(left.min(Duration::from_millis(100)))
            .await
            .expect("consume")
        {
            return Some(lease);
        }
        if left.is_zero() {
            return None;
        }
    }
}

async fn expect_next(q: &dyn TaskQueue, id: &str) -> Lease {
    let lease = next(q, ARRIVES)
        .await
        .unwrap_or_else(|| panic!("task {id} was not delivered within {ARRIVES:?}"));
    assert_eq!(lease.task.id.as_str(), id);
    lease
}

/// Waits until the queue's stats satisfy `ok` (brokers count asynchronously).
async fn stats_until(
    q: &dyn TaskQueue,
    what: &str,
    ok: impl Fn(&runtime_contracts::QueueStats) -> bool,
) {
    let deadline = Instant::now() + ARRIVES;
    loop {
        let stats = q.stats().await.expect("stats");
        if ok(&stats) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: stats stayed {stats:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

type Case = fn(Arc<dyn Backend>, String) -> BoxFuture<'static, Outcome>;

/// What a case did: passed, or cannot apply to this backend (and why).
enum Outcome {
    Passed,
    NotApplicable(&'static str),
}

async fn publish_consume_ack(b: Arc<dyn Backend>, name: String) -> Outcome {
    let (q, _) = b.open(&name);
    assert_eq!(
        q.publish(task("a")).await.expect("publish"),
        PublishResult::Enqueued
    );
    stats_until(&*q, "one ready", |s| s.depth == 1 && s.published == 1).await;
    let lease = expect_next(&*q, "a").await;
    assert_eq!((lease.task.attempt, lease.task.history.len()), (0, 0));
    stats_until(&*q, "one in flight", |s| s.in_flight == 1 && s.depth == 0).await;
    q.ack(&lease).await.expect("ack");
    stats_until(&*q, "settled", |s| {
        (s.depth, s.in_flight, s.processed) == (0, 0, 1)
    })
    .await;
    assert!(matches!(
        q.ack(&lease).await,
        Err(QueueError::UnknownLease(_))
    ));
    assert!(next(&*q, NOTHING).await.is_none(), "nothing is left");
    Outcome::Passed
}

async fn same_id_is_published_once_until_done(b: Arc<dyn Backend>, name: String) -> Outcome {
    let (q, _) = b.open(&name);
    assert_eq!(
        q.publish(task("a")).await.expect("publish"),
        PublishResult::Enqueued
    );
    assert_eq!(
        q.publish(task("a")).await.expect("pending"),
        PublishResult::AlreadyKnown
    );
    let lease = expect_next(&*q, "a").await;
    assert_eq!(
        q.publish(task("a")).await.expect("in flight"),
        PublishResult::AlreadyKnown
    );
    q.ack(&lease).await.expect("ack");
    assert_eq!(
        q.publish(task("a")).await.expect("done"),
        PublishResult::Enqueued,
        "a finished id may be published again"
    );
    let lease = expect_next(&*q, "a").await;
    q.ack(&lease).await.expect("ack");
    assert!(
        next(&*q, NOTHING).await.is_none(),
        "published twice, delivered twice"
    );
    Outcome::Passed
}

async fn a_kept_id_is_refused_after_its_ack(b: Arc<dyn Backend>, name: String) -> Outcome {
    let (q, _) = b.open(&name);
    let kept = || task("k").keep_id_after_ack();
    assert_eq!(
        q.publish_batch(vec![kept(), task("plain")])
            .await
            .expect("publish"),
        vec![PublishResult::Enqueued, PublishResult::Enqueued]
    );
    let first = expect_next(&*q, "k").await;
    let second = expect_next(&*q, "plain").await;
    q.ack_batch(&[first, second]).await.expect("ack");
    assert_eq!(
        q.publish(kept()).await.expect("done"),
        PublishResult::AlreadyKnown,
        "a task that keeps its id is not published again after its ack"
    );
    assert_eq!(
        q.publish(task("plain")).await.expect("done"),
        PublishResult::Enqueued,
        "the other in the same ack batch is forgotten"
    );
    let lease = expect_next(&*q, "plain").await;
    q.ack(&lease).await.expect("ack");
    assert!(next(&*q, NOTHING).await.is_none(), "the kept id came once");
    // A task that asks for a shorter window is known for that long only.
    let brief = || task("brief").keep_id_after_ack_for(Duration::from_secs(1));
    assert_eq!(
        q.publish(brief()).await.expect("publish"),
        PublishResult::Enqueued
    );
    let lease = expect_next(&*q, "brief").await;
    q.ack(&lease).await.expect("ack");
    assert_eq!(
        q.publish(brief()).await.expect("kept"),
        PublishResult::AlreadyKnown
    );
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(
        q.publish(brief()).await.expect("window over"),
        PublishResult::Enqueued,
        "known no longer than the task asked"
    );
    let lease = expect_next(&*q, "brief").await;
    q.ack(&lease).await.expect("ack");
    Outcome::Passed
}

async fn nack_with_delay_retries_later_with_history(b: Arc<dyn Backend>, name: String) -> Outcome {
    let (q, _) = b.open(&name);
    q.publish(task("a")).await.expect("publish");
    let lease = expect_next(&*q, "a").await;
    let delay = Duration::from_millis(700);
    let nacked = Instant::now();
    q.nack(&lease, delay, Some(failure(1))).await.expect("nack");
    stats_until(&*q, "scheduled", |s| s.failed == 1 && s.in_flight == 0).await;
    let retry = expect_next(&*q, "a").await;
    assert!(
        nacked.elapsed() >= delay,
        "the retry came after {:?}, before its delay",
        nacked.elapsed()
    );
    assert_eq!(retry.task.attempt, 1);
    assert_eq!(retry.task.history, vec![failure(1)]);
    q.nack(&retry, Duration::ZERO, Some(failure(2)))
        .await
        .expect("nack");
    let again = expect_next(&*q, "a").await;
    assert_eq!(again.task.attempt, 2);
    assert_eq!(again.task.history, vec![failure(1), failure(2)]);
    q.ack(&again).await.expect("ack");
    Outcome::Passed
}

async fn nack_without_failure_returns_the_task_untouched(
    b: Arc<dyn Backend>,
    name: String,
) -> Outcome {
    let (q, _) = b.open(&name);
    q.publish(task("a")).await.expect("publish");
    let lease = expect_next(&*q, "a").await;
    q.nack(&lease, Duration::ZERO, None).await.expect("nack");
    let again = expect_next(&*q, "a").await;
    assert_eq!((again.task.attempt, again.task.history.len()), (0, 0));
    stats_until(&*q, "no failure counted", |s| s.failed == 0).await;
    q.ack(&again).await.expect("ack");
    Outcome::Passed
}

async fn dead_letters_are_listed_read_replayed_and_purged(
    b: Arc<dyn Backend>,
    name: String,
) -> Outcome {
    let (q, _) = b.open(&name);
    let dlq = q.dead_letters().expect("the dead-letter capability");
    for id in ["a", "b", "c"] {
        q.publish(task(id)).await.expect("publish");
        let lease = expect_next(&*q, id).await;
        q.nack(&lease, Duration::ZERO, Some(failure(1)))
            .await
            .expect("nack");
        let lease = expect_next(&*q, id).await;
        q.dead_letter(&lease, failure(2))
            .await
            .expect("dead letter");
    }
    stats_until(&*q, "three dead", |s| s.dead == 3 && s.in_flight == 0).await;
    assert_eq!(
        q.publish(task("a")).await.expect("publish"),
        PublishResult::AlreadyKnown,
        "a dead id is known"
    );
    let first = dlq.list(None, 2).await.expect("list");
    assert_eq!(first.items.len(), 2);
    let cursor = first.next_cursor.clone().expect("a second page");
    let second = dlq.list(Some(cursor), 2).await.expect("list");
    assert_eq!(second.items.len(), 1);
    assert!(second.next_cursor.is_none());
    let mut ids: Vec<String> = first
        .items
        .iter()
        .chain(&second.items)
        .map(|d| d.id.clone())
        .collect();
    ids.sort();
    assert_eq!(ids, ["a", "b", "c"]);
    let a = dlq.get("a").await.expect("get").expect("a is dead");
    assert_eq!(a.reason, "boom 2");
    assert_eq!(a.task.attempt, 2);
    assert_eq!(a.task.history, vec![failure(1), failure(2)]);
    assert!(a.dead_at_unix_ms > 0);
    dlq.replay("a").await.expect("replay");
    let replayed = expect_next(&*q, "a").await;
    assert_eq!(
        replayed.task.attempt, 0,
        "a replay gets a full set of attempts"
    );
    assert_eq!(replayed.task.history.len(), 2, "and keeps its history");
    q.ack(&replayed).await.expect("ack");
    dlq.purge("b").await.expect("purge");
    assert!(dlq.get("b").await.expect("get").is_none());
    assert_eq!(
        q.publish(task("b")).await.expect("publish"),
        PublishResult::Enqueued,
        "a purged id is forgotten"
    );
    let b = expect_next(&*q, "b").await;
    q.ack(&b).await.expect("ack");
    assert!(matches!(
        dlq.replay("b").await,
        Err(QueueError::DeadLetterNotFound(_))
    ));
    assert!(matches!(
        dlq.purge("nope").await,
        Err(QueueError::DeadLetterNotFound(_))
    ));
    assert_eq!(dlq.replay_all().await.expect("replay all"), 1);
    let c = expect_next(&*q, "c").await;
    q.ack(&c).await.expect("ack");
    stats_until(&*q, "all settled", |s| {
        (s.dead, s.depth, s.in_flight, s.scheduled) == (0, 0, 0, 0)
    })
    .await;
    Outcome::Passed
}

async fn batches_publish_and_lease_together(b: Arc<dyn Backend>, name: String) -> Outcome {
    let (q, _) = b.open(&name);
    q.publish(task("t0")).await.expect("publish");
    let tasks = (0..6).map(|i| task(&format!("t{i}"))).collect();
    let results = q.publish_batch(tasks).await.expect("publish batch");
    assert_eq!(
        results[0],
        PublishResult::AlreadyKnown,
        "t0 was already there"
    );
    assert!(results[1..].iter().all(|r| *r == PublishResult::Enqueued));
    let mut leases = Vec::new();
    let deadline = Instant::now() + ARRIVES;
    while leases.len() < 6 {
        assert!(
            Instant::now() < deadline,
            "only {} of 6 leased",
            leases.len()
        );
        let batch = q
            .consume_batch(4, Duration::from_millis(200))
            .await
            .expect("consume batch");
        assert!(batch.len() <= 4, "a batch holds at most max");
        leases.extend(batch);
    }
    let mut ids: Vec<&str> = leases.iter().map(|l| l.task.id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["t0", "t1", "t2", "t3", "t4", "t5"]);
    let mut receipts: Vec<u64> = leases.iter().map(|l| l.receipt).collect();
    receipts.sort_unstable();
    receipts.dedup();
    assert_eq!(receipts.len(), 6, "one receipt per lease");
    q.ack_batch(&leases).await.expect("ack batch");
    stats_until(&*q, "all processed", |s| {
        s.processed == 6 && s.in_flight == 0
    })
    .await;
    assert!(next(&*q, NOTHING).await.is_none());
    Outcome::Passed
}

async fn a_waiting_consumer_wakes_on_publish(b: Arc<dyn Backend>, name: String) -> Outcome {
    let (q, _) = b.open(&name);
    // A first consume connects and subscribes where the backend does.
    assert!(next(&*q, NOTHING).await.is_none());
    let waiter = {
        let q = Arc::clone(&q);
        tokio::spawn(async move { q.consume(ARRIVES).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let published = Instant::now();
    q.publish(task("a")).await.expect("publish");
    let lease = waiter
        .await
        .expect("join")
        .expect("consume")
        .expect("the waiter got the task");
    assert!(
        published.elapsed() < ARRIVES,
        "the waiter woke at its deadline, not on publish"
    );
    q.ack(&lease).await.expect("ack");
    Outcome::Passed
}

async fn work_of_a_dead_consumer_comes_back(b: Arc<dyn Backend>, name: String) -> Outcome {
    let (first, kill) = b.open(&name);
    first.publish(task("a")).await.expect("publish");
    let lease = expect_next(&*first, "a").await;
    drop(lease);
    kill().await;
    drop(first);
    let (second, _) = b.open(&name);
    let again = expect_next(&*second, "a").await;
    assert_eq!(again.task.attempt, 0, "a lost worker is no failed attempt");
    second.ack(&again).await.expect("ack");
    assert!(next(&*second, NOTHING).await.is_none());
    Outcome::Passed
}

async fn a_task_whose_consumers_keep_dying_is_dead_lettered_as_worker_lost(
    b: Arc<dyn Backend>,
    name: String,
) -> Outcome {
    let Some(max) = b.max_deliveries() else {
        return Outcome::NotApplicable("the queue dies with its consumers");
    };
    let (publisher, _) = b.open(&name);
    publisher.publish(task("poison")).await.expect("publish");
    publisher.publish(task("fine")).await.expect("publish");
    let mut fine_done = false;
    for _ in 0..max {
        let (q, kill) = b.open(&name);
        loop {
            let lease = next(&*q, ARRIVES).await.expect("a delivery");
            if lease.task.id.as_str() == "fine" && !fine_done {
                q.ack(&lease).await.expect("ack");
                fine_done = true;
                continue;
            }
            assert_eq!(lease.task.id.as_str(), "poison");
            break;
        }
        kill().await;
    }
    let (q, _) = b.open(&name);
    if let Some(lease) = next(&*q, Duration::from_secs(2)).await {
        assert_eq!(lease.task.id.as_str(), "fine");
        q.ack(&lease).await.expect("ack");
    }
    assert!(
        next(&*q, Duration::from_secs(1)).await.is_none(),
        "the poison is gone"
    );
    let dead = q
        .dead_letters()
        .expect("dlq")
        .get("poison")
        .await
        .expect("get")
        .expect("the poison is a dead letter");
    assert!(dead.reason.starts_with("worker_lost"), "{}", dead.reason);
    Outcome::Passed
}

async fn an_undecodable_message_is_dead_lettered_and_consuming_goes_on(
    b: Arc<dyn Backend>,
    name: String,
) -> Outcome {
    let Some(inject) = b.inject(&name, b"{not an envelope".to_vec()) else {
        return Outcome::NotApplicable("it holds typed tasks, never bytes");
    };
    let (q, _) = b.open(&name);
    // Create the queue the way its consumers do, then write garbage onto it.
    assert!(next(&*q, NOTHING).await.is_none());
    inject.await;
    q.publish(task("good")).await.expect("publish");
    let lease = expect_next(&*q, "good").await;
    q.ack(&lease).await.expect("ack");
    stats_until(&*q, "the garbage is dead", |s| s.dead == 1).await;
    let page = q
        .dead_letters()
        .expect("dlq")
        .list(None, 10)
        .await
        .expect("list");
    assert_eq!(page.items.len(), 1);
    assert!(
        page.items[0].reason.starts_with("undecodable"),
        "{}",
        page.items[0].reason
    );
    Outcome::Passed
}

/// The environment variable of the signing key (set by `main`).
const SIGNING_ENV: &str = "PLBA_TEST_QUEUE_SIGNING_KEY";

async fn a_signed_queue_dead_letters_what_it_did_not_sign(
    b: Arc<dyn Backend>,
    name: String,
) -> Outcome {
    let Some(q) = b.open_signed(&name) else {
        return Outcome::NotApplicable("nothing outside the process can write to it");
    };
    assert!(next(&*q, NOTHING).await.is_none());
    // A well-formed envelope from a writer without the key, and one with a made-up seal.
    let forged = serde_json::to_vec(&task("forged")).expect("json");
    let mut sealed = format!("plba-sig1:{}:", "0".repeat(64)).into_bytes();
    sealed.extend_from_slice(&forged);
    for bytes in [forged, sealed] {
        b.inject(&name, bytes).expect("inject").await;
    }
    // What the queue writes itself is signed, its retries too.
    q.publish(task("signed")).await.expect("publish");
    let lease = expect_next(&*q, "signed").await;
    q.nack(&lease, Duration::ZERO, Some(failure(1)))
        .await
        .expect("nack");
    let lease = expect_next(&*q, "signed").await;
    assert_eq!(lease.task.attempt, 1, "the retry kept its history");
    q.ack(&lease).await.expect("ack");
    stats_until(&*q, "both forgeries are dead", |s| s.dead == 2).await;
    let dlq = q.dead_letters().expect("dlq");
    let page = dlq.list(None, 10).await.expect("list");
    assert_eq!(page.items.len(), 2);
    for dead in &page.items {
        assert!(
            dead.reason.starts_with("unauthenticated"),
            "{}",
            dead.reason
        );
    }
    // A replayed forgery is not laundered into a signed task of its claimed kind.
    dlq.replay(&page.items[0].id).await.expect("replay");
    let lease = next(&*q, Duration::from_secs(10))
        .await
        .expect("the replayed letter is delivered");
    assert_ne!(&*lease.task.kind, "job", "{:?}", lease.task);
    assert_ne!(lease.task.id.as_str(), "forged");
    q.ack(&lease).await.expect("ack");
    Outcome::Passed
}

/// A case as the runner calls it: its name and the boxed future of its body.
macro_rules! cases {
    ($($case:ident),* $(,)?) => {
        &[$((stringify!($case), |b, name| Box::pin($case(b, name)))),*]
    };
}

const CASES: &[(&str, Case)] = cases![
    publish_consume_ack,
    same_id_is_published_once_until_done,
    a_kept_id_is_refused_after_its_ack,
    nack_with_delay_retries_later_with_history,
    nack_without_failure_returns_the_task_untouched,
    dead_letters_are_listed_read_replayed_and_purged,
    batches_publish_and_lease_together,
    a_waiting_consumer_wakes_on_publish,
    work_of_a_dead_consumer_comes_back,
    a_task_whose_consumers_keep_dying_is_dead_lettered_as_worker_lost,
    an_undecodable_message_is_dead_lettered_and_consuming_goes_on,
    a_signed_queue_dead_letters_what_it_did_not_sign,
];

fn main() {
    // Before any thread starts.
    std::env::set_var(SIGNING_ENV, "3b9f1c7e5a2d8f4b6e0c9a1d3f5b7e2c");
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let selected: Vec<(String, Case)> = ["memory", "redis", "amqp"]
        .iter()
        .flat_map(|backend| {
            CASES
                .iter()
                .map(move |(name, case)| (format!("{backend}::{name}"), *case))
        })
        .filter(|(name, _)| filter.is_empty() || filter.iter().any(|f| name.contains(f)))
        .collect();
    println!("\nrunning {} tests", selected.len());
    if std::env::args().any(|a| a == "--list") {
        for (name, _) in &selected {
            println!("{name}: test");
        }
        return;
    }
    // One line per failed case (its message and place), not a backtrace per panic.
    std::panic::set_hook(Box::new(|info| {
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("panicked at {at}");
    }));
    let needs = |b: &str| selected.iter().any(|(n, _)| n.starts_with(b));
    // The servers start side by side (RabbitMQ takes seconds to boot).
    let rabbit = needs("amqp").then(|| std::thread::spawn(RabbitServer::start));
    let redis = needs("redis").then(|| RedisServer::start(false));
    let rabbit = rabbit.map(|h| h.join().expect("start RabbitMQ"));
    let mut backends: HashMap<&str, Arc<dyn Backend>> = HashMap::new();
    backends.insert("memory", Arc::new(Memory(Mutex::default())));
    if let Some(server) = redis {
        backends.insert(
            "redis",
            Arc::new(Redis {
                server,
                consumers: std::sync::atomic::AtomicU32::new(0),
            }),
        );
    }
    if let Some(server) = rabbit {
        backends.insert("amqp", Arc::new(Amqp { server }));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (mut passed, mut failed) = (0, Vec::new());
    for (n, (name, case)) in selected.iter().enumerate() {
        let backend_name = name.split("::").next().unwrap_or_default();
        let backend = Arc::clone(&backends[backend_name]);
        let queue = format!("contract{n}");
        let started = Instant::now();
        let result = rt.block_on(async {
            let run = tokio::spawn(case(backend, queue));
            tokio::time::timeout(Duration::from_secs(60), run).await
        });
        match result {
            Ok(Ok(Outcome::Passed)) => {
                passed += 1;
                println!("test {name} ... ok ({} ms)", started.elapsed().as_millis());
            }
            Ok(Ok(Outcome::NotApplicable(why))) => {
                passed += 1;
                println!("test {name} ... ok (n/a: {why})");
            }
            Ok(Err(panic)) => {
                println!("test {name} ... FAILED ({panic})");
                failed.push(name.clone());
            }
            Err(_) => {
                println!("test {name} ... FAILED (did not finish within 60 s)");
                failed.push(name.clone());
            }
        }
    }
    drop(rt);
    drop(backends);
    if failed.is_empty() {
        println!(
            "\ntest result: ok. {passed} passed; 0 failed; 0 ignored; 0 measured; 0 filtered out"
        );
    } else {
        println!("\nfailures:\n    {}", failed.join("\n    "));
        println!(
            "\ntest result: FAILED. {passed} passed; {} failed; 0 ignored; 0 measured; 0 filtered out",
            failed.len()
        );
        std::process::exit(101);
    }
}
