//! Semantics of the Redis Streams queue against a real redis-server, one behaviour per test.

use std::sync::Arc;
use std::time::Duration;

use plba_testkit::RedisServer;
use runtime_adapters::queue::redis::{RedisHealth, RedisQueue, RedisQueueConfig};
use runtime_contracts::{
    AttemptFailure, HealthContributor, HealthStatus, Probe, PublishResult, QueueError, Task,
    TaskQueue,
};

fn config(server: &RedisServer, consumer: &str) -> RedisQueueConfig {
    RedisQueueConfig {
        url: server.url(),
        consumer: consumer.into(),
        claim_min_idle_ms: 200,
        reclaim_interval_ms: 10,
        max_deliveries: 2,
        ..RedisQueueConfig::default()
    }
}

fn queue(server: &RedisServer, consumer: &str) -> RedisQueue {
    RedisQueue::new("jobs", config(server, consumer)).expect("queue")
}

fn task(id: &str) -> Task {
    Task::new(id, "job", "test", serde_json::json!({ "n": id })).expect("task")
}

fn failure(n: u32) -> AttemptFailure {
    AttemptFailure {
        attempt: n,
        reason: format!("boom {n}"),
        at_unix_ms: 0,
    }
}

const SHORT: Duration = Duration::from_millis(20);

#[tokio::test]
async fn publish_consume_ack() {
    let server = RedisServer::start(false);
    let q = queue(&server, "c1");
    assert_eq!(
        q.publish(task("a")).await.expect("publish"),
        PublishResult::Enqueued
    );
    let stats = q.stats().await.expect("stats");
    assert_eq!((stats.depth, stats.in_flight, stats.lag), (1, 0, Some(1)));
    let lease = q.consume(SHORT).await.expect("consume").expect("lease");
    assert_eq!(lease.task.id.as_str(), "a");
    let stats = q.stats().await.expect("stats");
    assert_eq!((stats.depth, stats.in_flight), (0, 1));
    assert!(stats.oldest_pending_age_ms.is_some());
    q.ack(&lease).await.expect("ack");
    let stats = q.stats().await.expect("stats");
    assert_eq!((stats.depth, stats.in_flight, stats.processed), (0, 0, 1));
    assert!(matches!(
        q.ack(&lease).await,
        Err(QueueError::UnknownLease(_))
    ));
    assert!(q.consume(SHORT).await.expect("consume").is_none());
}

#[tokio::test]
async fn publishing_the_same_id_again_adds_nothing_until_it_is_done() {
    let server = RedisServer::start(false);
    let q = queue(&server, "c1");
    q.publish(task("a")).await.expect("publish");
    assert_eq!(
        q.publish(task("a")).await.expect("pending"),
        PublishResult::AlreadyKnown
    );
    let lease = q.consume(SHORT).await.expect("consume").expect("lease");
    assert_eq!(
        q.publish(task("a")).await.expect("in flight"),
        PublishResult::AlreadyKnown
    );
    q.nack(&lease, Duration::from_secs(60), Some(failure(1)))
        .await
        .expect("nack");
    assert_eq!(
        q.publish(task("a")).await.expect("scheduled"),
        PublishResult::AlreadyKnown
    );
    let other = queue(&server, "c2");
    assert_eq!(
        other.publish(task("a")).await.expect("another process"),
        PublishResult::AlreadyKnown
    );
    assert_eq!(q.stats().await.expect("stats").depth, 0);
}

#[tokio::test]
async fn nack_with_delay_schedules_the_retry_and_keeps_the_history() {
    let server = RedisServer::start(false);
    let q = queue(&server, "c1");
    q.publish(task("a")).await.expect("publish");
    let lease = q.consume(SHORT).await.expect("consume").expect("lease");
    q.nack(&lease, Duration::from_millis(300), Some(failure(1)))
        .await
        .expect("nack");
    let stats = q.stats().await.expect("stats");
    assert_eq!(
        (stats.scheduled, stats.depth, stats.in_flight, stats.failed),
        (1, 0, 0, 1)
    );
    assert!(
        q.consume(SHORT).await.expect("consume").is_none(),
        "not before it is due"
    );
    let start = std::time::Instant::now();
    let again = loop {
        if let Some(l) = q.consume(SHORT).await.expect("consume") {
            break l;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the retry never came back"
        );
    };
    assert!(start.elapsed() >= Duration::from_millis(200));
    assert_eq!(again.task.attempt, 1);
    assert_eq!(again.task.history, vec![failure(1)]);
    assert_eq!(q.stats().await.expect("stats").scheduled, 0);
}

#[tokio::test]
async fn nack_without_failure_returns_the_task_at_once_untouched() {
    let server = RedisServer::start(false);
    let q = queue(&server, "c1");
    q.publish(task("a")).await.expect("publish");
    let lease = q.consume(SHORT).await.expect("consume").expect("lease");
    q.nack(&lease, Duration::ZERO, None).await.expect("nack");
    let again = q.consume(SHORT).await.expect("consume").expect("lease");
    assert_eq!((again.task.attempt, again.task.history.len()), (0, 0));
}

#[tokio::test]
async fn dead_letters_are_listed_read_replayed_and_purged() {
    let server = RedisServer::start(false);
    let q = queue(&server, "c1");
    for id in ["a", "b", "c"] {
        q.publish(task(id)).await.expect("publish");
        let lease = q.consume(SHORT).await.expect("consume").expect("lease");
        q.dead_letter(&lease, failure(3))
            .await
            .expect("dead letter");
    }
    assert_eq!(q.stats().await.expect("stats").dead, 3);
    assert_eq!(
        q.publish(task("a")).await.expect("dead is known"),
        PublishResult::AlreadyKnown
    );
    let store = q.dead_letters().expect("capability");
    let first = store.list(None, 2).await.expect("list");
    assert_eq!(
        first
            .items
            .iter()
            .map(|d| d.id.as_str())
            .collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert_eq!(first.items[0].reason, "boom 3");
    assert_eq!(first.items[0].task.history, vec![failure(3)]);
    let second = store.list(first.next_cursor, 2).await.expect("list");
    assert_eq!(second.items.len(), 1);
    assert!(second.next_cursor.is_none());
    assert_eq!(store.get("b").await.expect("get").expect("b").id, "b");
    assert!(store.get("zzz").await.expect("get").is_none());

    store.replay("b").await.expect("replay");
    let lease = q.consume(SHORT).await.expect("consume").expect("replayed");
    assert_eq!(
        (
            lease.task.id.as_str(),
            lease.task.attempt,
            lease.task.history.len()
        ),
        ("b", 0, 1)
    );
    q.ack(&lease).await.expect("ack");

    store.purge("c").await.expect("purge");
    assert!(matches!(
        store.purge("c").await,
        Err(QueueError::DeadLetterNotFound(_))
    ));
    assert_eq!(
        q.publish(task("c")).await.expect("purged is forgotten"),
        PublishResult::Enqueued
    );
    assert_eq!(store.replay_all().await.expect("replay all"), 1);
    assert_eq!(q.stats().await.expect("stats").dead, 0);
}

#[tokio::test]
async fn an_undecodable_entry_is_dead_lettered_and_the_consumer_goes_on() {
    let server = RedisServer::start(false);
    let q = queue(&server, "c1");
    q.publish(task("first"))
        .await
        .expect("publish creates the stream");
    let redis = redis::Client::open(server.url()).expect("client");
    let mut conn = redis
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    for (field, value) in [
        ("env", b"{not json".to_vec()),
        ("env", vec![0xff, 0xfe]),
        ("env", br#"{"schema_version":99,"id":"x","kind":"k","source":"s","payload":null,"headers":{},"correlation_id":"x","causation_id":null,"attempt":0,"history":[]}"#.to_vec()),
        ("other", b"x".to_vec()),
        ("env", vec![b'a'; 70 * 1024]),
    ] {
        let _: String = redis::cmd("XADD")
            .arg("plba:jobs:stream").arg("*").arg(field).arg(value)
            .query_async(&mut conn).await.expect("xadd");
    }
    q.publish(task("last")).await.expect("publish");
    let mut got = Vec::new();
    while let Some(lease) = q.consume(SHORT).await.expect("the consumer goes on") {
        got.push(lease.task.id.to_string());
        q.ack(&lease).await.expect("ack");
    }
    assert_eq!(got, ["first", "last"]);
    let stats = q.stats().await.expect("stats");
    assert_eq!((stats.dead, stats.in_flight, stats.depth), (5, 0, 0));
    let dead = q
        .dead_letters()
        .expect("dlq")
        .list(None, 10)
        .await
        .expect("list");
    let reasons: Vec<&str> = dead.items.iter().map(|d| d.reason.as_str()).collect();
    assert!(
        reasons.iter().all(|r| r.starts_with("undecodable")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.contains("schema version 99")));
    assert!(reasons.iter().any(|r| r.contains("not UTF-8")));
    assert!(reasons.iter().any(|r| r.contains("above the")));
}

#[tokio::test]
async fn work_of_a_dead_consumer_is_taken_over_and_poison_is_dead_lettered_as_worker_lost() {
    let server = RedisServer::start(false);
    let crashed = queue(&server, "crashed");
    crashed.publish(task("a")).await.expect("publish");
    let _lost = crashed
        .consume(SHORT)
        .await
        .expect("consume")
        .expect("lease");
    drop(crashed); // the process died holding the lease

    let rescuer = queue(&server, "rescuer");
    let start = std::time::Instant::now();
    let taken = loop {
        if let Some(l) = rescuer.consume(SHORT).await.expect("consume") {
            break l;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "never reclaimed");
    };
    assert!(
        start.elapsed() >= Duration::from_millis(150),
        "not before claim_min_idle"
    );
    assert_eq!(taken.task.id.as_str(), "a");

    // The rescuer dies too: the third delivery would exceed max_deliveries (2).
    drop(rescuer);
    let third = queue(&server, "third");
    let start = std::time::Instant::now();
    while third.stats().await.expect("stats").dead == 0 {
        assert!(
            third.consume(SHORT).await.expect("consume").is_none(),
            "poison must not be delivered again"
        );
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "poison never dead-lettered"
        );
    }
    let dead = third
        .dead_letters()
        .expect("dlq")
        .get("a")
        .await
        .expect("get")
        .expect("a");
    assert!(dead.reason.starts_with("worker_lost"), "{}", dead.reason);
    let stats = third.stats().await.expect("stats");
    assert_eq!(
        (stats.in_flight, stats.depth),
        (0, 0),
        "acknowledged on the main stream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_moving_due_retries_at_once_move_each_once() {
    let server = RedisServer::start(false);
    let q = queue(&server, "c1");
    for i in 0..200 {
        q.publish(task(&format!("t{i}"))).await.expect("publish");
    }
    let mut leases = Vec::new();
    while leases.len() < 200 {
        leases.extend(q.consume_batch(32, SHORT).await.expect("consume"));
    }
    for lease in &leases {
        q.nack(lease, Duration::from_millis(100), Some(failure(1)))
            .await
            .expect("nack");
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (a, b) = (
        Arc::new(queue(&server, "mover-a")),
        Arc::new(queue(&server, "mover-b")),
    );
    let run = |q: Arc<RedisQueue>| {
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..100 {
                for lease in q.consume_batch(64, SHORT).await.expect("consume") {
                    ids.push(lease.task.id.to_string());
                    q.ack(&lease).await.expect("ack");
                }
            }
            ids
        })
    };
    let (ja, jb) = (run(a), run(b));
    let mut all = ja.await.expect("a");
    all.extend(jb.await.expect("b"));
    all.sort();
    let before = all.len();
    all.dedup();
    assert_eq!(before, all.len(), "a retry ran twice");
    assert_eq!(all.len(), 200, "a retry was lost");
}

#[tokio::test]
async fn redis_down_means_errors_and_not_ready_then_recovery() {
    let mut server = RedisServer::start(true);
    let q = Arc::new(queue(&server, "c1"));
    let health = RedisHealth(Arc::clone(&q));
    assert_eq!(health.check(Probe::Readiness).await, HealthStatus::Up);
    q.publish(task("a")).await.expect("publish");
    server.stop();
    assert!(matches!(
        q.publish(task("b")).await,
        Err(QueueError::Unavailable(_))
    ));
    assert!(q.consume(SHORT).await.is_err());
    assert!(matches!(
        health.check(Probe::Readiness).await,
        HealthStatus::Down { .. }
    ));
    assert_eq!(
        health.check(Probe::Liveness).await,
        HealthStatus::Up,
        "liveness never depends on redis"
    );
    server.restart();
    let start = std::time::Instant::now();
    while health.check(Probe::Readiness).await != HealthStatus::Up {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never ready again"
        );
    }
    let lease = q
        .consume(SHORT)
        .await
        .expect("consume")
        .expect("the AOF kept the task");
    assert_eq!(lease.task.id.as_str(), "a");
}

#[tokio::test]
async fn a_batch_publishes_in_one_call_and_says_which_were_new() {
    let server = RedisServer::start(false);
    let q = queue(&server, "c1");
    q.publish(task("b")).await.expect("publish");
    let results = q
        .publish_batch(vec![task("a"), task("b"), task("c")])
        .await
        .expect("batch");
    assert_eq!(
        results,
        [
            PublishResult::Enqueued,
            PublishResult::AlreadyKnown,
            PublishResult::Enqueued
        ]
    );
    assert_eq!(q.stats().await.expect("stats").depth, 3);
}
