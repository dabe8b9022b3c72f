//! Leases with fencing tokens on the Redis queue (a real redis-server): one holder at a
//! time, tokens that only grow (across a restart that loses Redis's data too), and
//! publishes under an older token refused inside the publish script.

use std::time::Duration;

use plba_testkit::RedisServer;
use runtime_adapters::queue::redis::{RedisQueue, RedisQueueConfig};
use runtime_contracts::{PublishResult, QueueError, Task, TaskQueue};

const MAILBOX: &str = "imap/orders@mail:993/inbox";

fn queue(redis: &RedisServer, consumer: &str) -> RedisQueue {
    RedisQueue::new(
        "orders",
        RedisQueueConfig {
            url: redis.url(),
            consumer: consumer.into(),
            ..RedisQueueConfig::default()
        },
    )
    .expect("queue")
}

fn task(id: &str) -> Task {
    Task::new(id, "mail.message", "inbox", serde_json::json!({ "uid": 1 })).expect("task")
}

#[tokio::test]
async fn one_holder_at_a_time_and_a_new_holder_gets_a_larger_token() {
    let redis = RedisServer::start(false);
    let (a, b) = (queue(&redis, "a"), queue(&redis, "b"));
    let (la, lb) = (a.leases().expect("leases"), b.leases().expect("leases"));
    let ttl = Duration::from_millis(600);
    let first = la.acquire(MAILBOX, "a", ttl).await.expect("acquire");
    let first = first.expect("a free lease is taken");
    assert_eq!(lb.acquire(MAILBOX, "b", ttl).await.expect("acquire"), None);
    let holder = lb.holder(MAILBOX).await.expect("holder").expect("held");
    assert_eq!((holder.owner.as_str(), holder.token), ("a", first));
    assert!(holder.expires_in <= ttl && holder.expires_in > Duration::ZERO);
    // Renewals keep it past its first TTL.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(la.renew(MAILBOX, "a", first, ttl).await.expect("renew"));
    }
    assert_eq!(lb.acquire(MAILBOX, "b", ttl).await.expect("acquire"), None);
    assert!(
        !lb.renew(MAILBOX, "b", first, ttl).await.expect("renew"),
        "only the holder renews"
    );
    // Unrenewed, it expires and the next holder's token is larger.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let second = lb.acquire(MAILBOX, "b", ttl).await.expect("acquire");
    let second = second.expect("an expired lease is taken");
    assert!(second > first, "{second} > {first}");
    assert!(
        !la.renew(MAILBOX, "a", first, ttl).await.expect("renew"),
        "the old holder's renewal fails"
    );
    // Releasing as the old holder does nothing; the holder's release frees it.
    la.release(MAILBOX, "a", first).await.expect("release");
    assert_eq!(
        la.holder(MAILBOX).await.expect("holder").map(|h| h.token),
        Some(second)
    );
    lb.release(MAILBOX, "b", second).await.expect("release");
    assert_eq!(la.holder(MAILBOX).await.expect("holder"), None);
    let third = la.acquire(MAILBOX, "a", ttl).await.expect("acquire");
    assert!(third.expect("free again") > second);
}

#[tokio::test]
async fn a_publish_under_an_older_token_is_refused_and_adds_nothing() {
    let redis = RedisServer::start(false);
    let (a, b) = (queue(&redis, "a"), queue(&redis, "b"));
    let ttl = Duration::from_millis(300);
    let old = a.leases().expect("leases").acquire(MAILBOX, "a", ttl).await;
    let old = old.expect("acquire").expect("free");
    assert_eq!(
        a.publish(task("m1").fenced(MAILBOX, old))
            .await
            .expect("publish"),
        PublishResult::Enqueued
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let new = b.leases().expect("leases").acquire(MAILBOX, "b", ttl).await;
    let new = new.expect("acquire").expect("expired");
    // The paused old holder wakes up and publishes what it saw: one task, then a batch.
    match a.publish(task("m2").fenced(MAILBOX, old)).await {
        Err(QueueError::Fenced {
            resource,
            token,
            current,
        }) => assert_eq!((resource.as_str(), token, current), (MAILBOX, old, new)),
        other => panic!("expected a fenced refusal, got {other:?}"),
    }
    let batch = vec![
        task("m3").fenced(MAILBOX, old),
        task("m4").fenced(MAILBOX, old),
    ];
    assert!(matches!(
        a.publish_batch(batch).await,
        Err(QueueError::Fenced { current, .. }) if current == new
    ));
    assert_eq!(a.stats().await.expect("stats").published, 1, "only m1");
    // The new holder publishes the same messages; unfenced tasks are not checked.
    let batch = vec![
        task("m2").fenced(MAILBOX, new),
        task("m3").fenced(MAILBOX, new),
        task("m4"),
    ];
    let results = b.publish_batch(batch).await.expect("publish");
    assert_eq!(results, vec![PublishResult::Enqueued; 3]);
    let ids = plba_testkit::drain_ids(&b).await;
    assert_eq!(
        ids,
        ["m1", "m2", "m3", "m4"],
        "nothing from the fenced publishes"
    );
}

#[tokio::test]
async fn tokens_keep_growing_when_redis_restarts_without_its_data() {
    let mut redis = RedisServer::start(false);
    let q = queue(&redis, "a");
    let ttl = Duration::from_secs(5);
    let before = q.leases().expect("leases").acquire(MAILBOX, "a", ttl).await;
    let before = before.expect("acquire").expect("free");
    redis.restart();
    let q = queue(&redis, "b");
    let leases = q.leases().expect("leases");
    let mut after = None;
    for _ in 0..50 {
        match leases.acquire(MAILBOX, "b", ttl).await {
            Ok(token) => {
                after = token;
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let after = after.expect("the lease was lost with the data, so it is free");
    assert!(after > before, "{after} > {before}");
    assert!(matches!(
        q.publish(task("late").fenced(MAILBOX, before)).await,
        Err(QueueError::Fenced { .. })
    ));
}
