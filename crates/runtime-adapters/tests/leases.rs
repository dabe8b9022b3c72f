//! Leases with fencing tokens on the Redis queue (a real redis-server): one holder at a
//! time, tokens that only grow (across a restart that loses Redis's data too), and
//! publishes under an older token refused inside the publish script. And the IMAP
//! watcher's lease against a private Dovecot: a watcher whose lease was taken over while it
//! was not looking (a pause past its TTL, simulated by expiring its lease and letting
//! another holder take it) has its next publish refused, counts it, steps down, and
//! watches again once it gets the lease back.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_redis::redis;
use plba_testkit::{source_context, DovecotServer, RedisServer};
use runtime_adapters::queue::redis::{RedisQueue, RedisQueueConfig};
use runtime_adapters::sources::imap::{ImapConfig, ImapMode, ImapSource};
use runtime_contracts::{PublishResult, QueueError, SourceLease, Task, TaskQueue, TaskSource};

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

fn mail(n: usize) -> Vec<u8> {
    format!(
        "From: buyer@example.com\r\nTo: orders@example.com\r\nSubject: order {n}\r\n\
         Message-ID: <lease-{n}@test.example>\r\n\r\nSKU-{n} x 1\r\n"
    )
    .into_bytes()
}

async fn wait_for_lease(
    source: &ImapSource,
    what: &str,
    mut done: impl FnMut(&SourceLease) -> bool,
) -> SourceLease {
    let started = Instant::now();
    loop {
        if let Some(lease) = source.status().lease {
            if done(&lease) {
                return lease;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}: {:?}",
            source.status().lease
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_whose_lease_was_taken_is_fenced_steps_down_and_comes_back() {
    let server = DovecotServer::start(&[("u", "pass")]);
    let redis = RedisServer::start(false);
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "pass\n").expect("pw");
    // Renewals every 2 s, searches every 50 ms: after the takeover, a search publishes
    // long before the next renewal could notice the loss.
    let config: ImapConfig = serde_json::from_value(serde_json::json!({
        "host": "127.0.0.1", "port": server.port(), "tls": "none", "user": "u",
        "password_file": pw, "pool": "orders", "poll_interval_ms": 50, "lease_ttl_ms": 6000,
    }))
    .expect("config");
    let source = Arc::new(ImapSource::new("inbox", config, ImapMode::Poll));
    let (a, b) = (Arc::new(queue(&redis, "a")), Arc::new(queue(&redis, "b")));
    let (ctx, stop) = source_context(a.clone());
    let run = {
        let source = Arc::clone(&source);
        tokio::spawn(async move { source.start(ctx).await.expect("source runs") })
    };
    let first = wait_for_lease(&source, "the lease", |l| l.held).await;
    let first_token = first.token.expect("token");
    server.append("u", "pass", "INBOX", &(1..=3).map(mail).collect::<Vec<_>>());
    let started = Instant::now();
    while source.status().published < 3 {
        assert!(started.elapsed() < Duration::from_secs(30), "published 3");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The watcher "sleeps" past its lease: the lease expires and replica b takes it.
    let client = redis::Client::open(redis.url()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let _: i64 = redis::cmd("DEL")
        .arg(format!("plba:lease:{}", first.resource))
        .query_async(&mut conn)
        .await
        .expect("DEL");
    let leases = b.leases().expect("leases");
    let taken = leases
        .acquire(&first.resource, "replica-b", Duration::from_secs(60))
        .await
        .expect("acquire");
    let second_token = taken.expect("the expired lease is free");
    assert!(second_token > first_token);

    // New mail: the old watcher's search finds it, and the queue refuses its publish.
    server.append("u", "pass", "INBOX", &(4..=5).map(mail).collect::<Vec<_>>());
    let fenced = wait_for_lease(&source, "a fenced publish and a step-down", |l| {
        l.fenced_publishes >= 1 && !l.held
    })
    .await;
    assert_eq!(fenced.acquired, 1);
    assert_eq!(
        source.status().published,
        3,
        "nothing published after the takeover"
    );
    let standby = wait_for_lease(&source, "the standby seeing b", |l| l.holder.is_some()).await;
    assert_eq!(standby.holder.as_deref(), Some("replica-b"));
    assert_eq!(standby.token, Some(second_token));
    let ids: BTreeSet<String> = plba_testkit::drain_ids(&*b).await.into_iter().collect();
    assert_eq!(ids.len(), 3, "only the first three: {ids:?}");

    // b gives the lease up: the watcher takes it back with a newer token and publishes the
    // two messages it could not.
    leases
        .release(&first.resource, "replica-b", second_token)
        .await
        .expect("release");
    let back = wait_for_lease(&source, "the lease again", |l| l.held).await;
    assert!(back.token.expect("token") > second_token);
    assert_eq!(back.acquired, 2);
    let started = Instant::now();
    while source.status().published < 5 {
        assert!(started.elapsed() < Duration::from_secs(30), "published 5");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let more: BTreeSet<String> = plba_testkit::drain_ids(&*b).await.into_iter().collect();
    assert_eq!(more.len(), 2, "{more:?}");
    assert!(ids.is_disjoint(&more));
    stop.stop();
    run.await.expect("source task");
    assert_eq!(
        leases.holder(&first.resource).await.expect("holder"),
        None,
        "released at shutdown"
    );
}
