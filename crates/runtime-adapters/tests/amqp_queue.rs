//! What only the AMQP queue has: an outage of the broker. The semantics every queue shares
//! are in `queue_contract.rs`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use plba_testkit::RabbitServer;
use runtime_adapters::queue::amqp::{AmqpHealth, AmqpQueue, AmqpQueueConfig};
use runtime_contracts::{HealthContributor, HealthStatus, Probe, QueueError, Task, TaskQueue};

fn task(id: &str) -> Task {
    Task::new(id, "job", "test", serde_json::json!({ "n": id })).expect("task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_means_errors_and_not_ready_then_recovery_with_nothing_lost() {
    let mut server = RabbitServer::start();
    let config = AmqpQueueConfig {
        url: server.url(),
        reconnect_max_ms: 500,
        ..AmqpQueueConfig::default()
    };
    let q = Arc::new(AmqpQueue::new("jobs", config, 8).expect("queue"));
    let health = AmqpHealth(Arc::clone(&q));
    assert_eq!(health.check(Probe::Readiness).await, HealthStatus::Up);
    q.publish(task("a")).await.expect("publish");
    server.stop();
    assert!(matches!(
        q.publish(task("b")).await,
        Err(QueueError::Unavailable(_))
    ));
    assert!(q.consume(Duration::from_millis(50)).await.is_err());
    let down = Instant::now();
    loop {
        match health.check(Probe::Readiness).await {
            HealthStatus::Down { reason } => {
                assert!(reason.contains("amqp broker unavailable"), "{reason}");
                break;
            }
            HealthStatus::Up => {
                assert!(down.elapsed() < Duration::from_secs(5), "still ready");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert_eq!(
        health.check(Probe::Liveness).await,
        HealthStatus::Up,
        "liveness never depends on the broker"
    );
    server.start_again();
    let start = Instant::now();
    while health.check(Probe::Readiness).await != HealthStatus::Up {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never ready again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The confirmed task survived the broker's death (a quorum queue on disk); the refused
    // one was never enqueued, and may be published again.
    q.publish(task("b")).await.expect("publish after recovery");
    let mut ids = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ids.len() < 2 && Instant::now() < deadline {
        if let Some(lease) = q
            .consume(Duration::from_millis(200))
            .await
            .expect("consume")
        {
            ids.push(lease.task.id.to_string());
            q.ack(&lease).await.expect("ack");
        }
    }
    ids.sort();
    assert_eq!(ids, ["a", "b"]);
}
