//! Semantics of the in-memory queue, one behaviour per test.

use std::time::Duration;

use runtime_adapters::queue::memory::{MemoryQueue, MemoryQueueConfig};
use runtime_contracts::{AttemptFailure, PublishResult, QueueError, Task, TaskQueue};

fn task(id: &str) -> Task {
    Task::new(id, "k", "s", serde_json::json!({ "n": id })).expect("task")
}

fn queue(capacity: usize) -> MemoryQueue {
    MemoryQueue::new(
        "q",
        MemoryQueueConfig {
            capacity,
            lease_timeout_ms: 60_000,
        },
    )
}

fn failure(n: u32) -> AttemptFailure {
    AttemptFailure {
        attempt: n,
        reason: format!("boom {n}"),
        at_unix_ms: 0,
    }
}

const NOW: Duration = Duration::from_millis(1);

#[tokio::test]
async fn publish_consume_ack_removes_the_task() {
    let q = queue(10);
    assert_eq!(
        q.publish(task("a")).await.expect("publish"),
        PublishResult::Enqueued
    );
    let lease = q.consume(NOW).await.expect("consume").expect("a lease");
    assert_eq!(lease.task.id.as_str(), "a");
    let stats = q.stats().await.expect("stats");
    assert_eq!((stats.depth, stats.in_flight), (0, 1));
    q.ack(&lease).await.expect("ack");
    let stats = q.stats().await.expect("stats");
    assert_eq!((stats.in_flight, stats.processed), (0, 1));
    assert!(q.consume(NOW).await.expect("consume").is_none());
    assert!(matches!(
        q.ack(&lease).await,
        Err(QueueError::UnknownLease(_))
    ));
}

#[tokio::test]
async fn the_same_id_is_not_published_twice_while_known() {
    let q = queue(10);
    q.publish(task("a")).await.expect("publish");
    assert_eq!(
        q.publish(task("a")).await.expect("again"),
        PublishResult::AlreadyKnown
    );
    let lease = q.consume(NOW).await.expect("consume").expect("lease");
    assert_eq!(
        q.publish(task("a")).await.expect("in flight"),
        PublishResult::AlreadyKnown
    );
    q.ack(&lease).await.expect("ack");
    assert_eq!(
        q.publish(task("a")).await.expect("after ack"),
        PublishResult::Enqueued
    );
}

#[tokio::test]
async fn it_is_bounded() {
    let q = queue(2);
    q.publish(task("a")).await.expect("a");
    q.publish(task("b")).await.expect("b");
    assert!(matches!(
        q.publish(task("c")).await,
        Err(QueueError::Full { capacity: 2, .. })
    ));
}

#[tokio::test]
async fn nack_with_delay_hides_the_task_until_due_and_counts_the_attempt() {
    let q = queue(10);
    q.publish(task("a")).await.expect("publish");
    let lease = q.consume(NOW).await.expect("consume").expect("lease");
    q.nack(&lease, Duration::from_millis(300), Some(failure(1)))
        .await
        .expect("nack");
    let stats = q.stats().await.expect("stats");
    assert_eq!((stats.depth, stats.scheduled, stats.failed), (0, 1, 1));
    assert!(
        q.consume(NOW).await.expect("consume").is_none(),
        "not before its delay"
    );
    let again = q
        .consume(Duration::from_secs(10))
        .await
        .expect("consume")
        .expect("visible after the delay");
    assert_eq!(again.task.attempt, 1);
    assert_eq!(again.task.history, vec![failure(1)]);
}

#[tokio::test]
async fn nack_without_failure_returns_the_task_untouched() {
    let q = queue(10);
    q.publish(task("a")).await.expect("publish");
    let lease = q.consume(NOW).await.expect("consume").expect("lease");
    q.nack(&lease, Duration::ZERO, None).await.expect("nack");
    let again = q.consume(NOW).await.expect("consume").expect("lease");
    assert_eq!(again.task.attempt, 0);
    assert!(again.task.history.is_empty());
}

#[tokio::test]
async fn dead_letters_keep_their_history_and_can_be_listed_replayed_and_purged() {
    let q = queue(10);
    for id in ["a", "b", "c"] {
        q.publish(task(id)).await.expect("publish");
        let lease = q.consume(NOW).await.expect("consume").expect("lease");
        q.dead_letter(&lease, failure(1))
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
    assert_eq!(first.items[0].reason, "boom 1");
    assert_eq!(first.items[0].task.history.len(), 1);
    let second = store.list(first.next_cursor, 2).await.expect("list");
    assert_eq!(second.items.len(), 1);
    assert!(second.next_cursor.is_none());

    store.replay("b").await.expect("replay");
    let lease = q.consume(NOW).await.expect("consume").expect("replayed");
    assert_eq!(lease.task.id.as_str(), "b");
    assert_eq!(
        lease.task.attempt, 0,
        "a replay gets a full set of attempts"
    );
    assert_eq!(lease.task.history.len(), 1, "but keeps its history");

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
async fn an_expired_lease_makes_the_task_visible_again() {
    let q = MemoryQueue::new(
        "q",
        MemoryQueueConfig {
            capacity: 10,
            lease_timeout_ms: 50,
        },
    );
    q.publish(task("a")).await.expect("publish");
    let lost = q.consume(NOW).await.expect("consume").expect("lease");
    let again = q
        .consume(Duration::from_secs(10))
        .await
        .expect("consume")
        .expect("reappears after the lease timeout");
    assert_eq!(again.task.id, lost.task.id);
    assert!(q.ack(&lost).await.is_err(), "the old lease is void");
    q.ack(&again).await.expect("the new lease settles");
}

#[tokio::test]
async fn a_waiting_consumer_wakes_on_publish() {
    let q = std::sync::Arc::new(queue(10));
    let waiter = {
        let q = std::sync::Arc::clone(&q);
        tokio::spawn(async move { q.consume(Duration::from_secs(30)).await })
    };
    tokio::task::yield_now().await;
    q.publish(task("a")).await.expect("publish");
    let lease = waiter
        .await
        .expect("join")
        .expect("consume")
        .expect("woken with the task");
    assert_eq!(lease.task.id.as_str(), "a");
}

#[tokio::test]
async fn a_batch_leases_up_to_max_with_one_receipt_each() {
    let q = queue(10);
    for id in ["a", "b", "c"] {
        q.publish(task(id)).await.expect("publish");
    }
    let batch = q.consume_batch(2, NOW).await.expect("batch");
    assert_eq!(
        batch.iter().map(|l| l.task.id.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert_ne!(batch[0].receipt, batch[1].receipt);
    assert_eq!(q.stats().await.expect("stats").in_flight, 2);
    for lease in &batch {
        q.ack(lease).await.expect("ack");
    }
    let rest = q.consume_batch(16, NOW).await.expect("batch");
    assert_eq!(rest.len(), 1);
    assert!(q.consume_batch(16, NOW).await.expect("empty").is_empty());
}
