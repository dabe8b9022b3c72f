//! What only the Redis Streams queue has (retries moved by several processes, an outage); the
//! semantics every queue shares are in `queue_contract.rs`.

use std::sync::Arc;
use std::time::Duration;

use plba_testkit::RedisServer;
use runtime_adapters::queue::redis::{RedisHealth, RedisQueue, RedisQueueConfig};
use runtime_contracts::{
    AttemptFailure, HealthContributor, HealthStatus, Probe, QueueError, Task, TaskQueue,
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
        next_attempt_at_unix_ms: None,
    }
}

const SHORT: Duration = Duration::from_millis(20);

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
