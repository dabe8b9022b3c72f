//! The IMAP watcher's lease on a shared (Redis) queue, against a private Dovecot and a real
//! redis-server: a watcher whose lease was taken over while it was not looking (a pause
//! past its TTL, simulated by expiring its lease and letting another holder take it) has
//! its next publish refused by the queue, counts it, steps down, and watches again once it
//! gets the lease back.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_redis::redis;
use plba_testkit::{source_context, DovecotServer, RedisServer};
use runtime_adapters::queue::redis::{RedisQueue, RedisQueueConfig};
use runtime_adapters::sources::imap::{ImapConfig, ImapMode, ImapSource};
use runtime_contracts::{SourceLease, TaskQueue, TaskSource};

fn queue(redis: &RedisServer, consumer: &str) -> Arc<RedisQueue> {
    Arc::new(
        RedisQueue::new(
            "orders",
            RedisQueueConfig {
                url: redis.url(),
                consumer: consumer.into(),
                ..RedisQueueConfig::default()
            },
        )
        .expect("queue"),
    )
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
    let (a, b) = (queue(&redis, "a"), queue(&redis, "b"));
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
