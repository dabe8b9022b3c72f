//! The IMAP source's worker side against a private Dovecot, without a runtime: what a
//! pointer loads, what completion flags, and pointers that no longer point at anything.

use plba_testkit::DovecotServer;
use runtime_adapters::sources::imap::{ImapConfig, ImapMode, ImapSource};
use runtime_contracts::{GoneReason, SourceError, Task, TaskSource};

fn source(server: &DovecotServer, dir: &std::path::Path, max_message_bytes: u64) -> ImapSource {
    let pw = dir.join("pw");
    std::fs::write(&pw, "pass\n").expect("pw");
    let config: ImapConfig = serde_json::from_value(serde_json::json!({
        "host": "127.0.0.1", "port": server.port(), "tls": "none", "user": "u",
        "password_file": pw, "pool": "orders", "max_message_bytes": max_message_bytes,
    }))
    .expect("config");
    assert!(config.problems("sources.inbox").is_empty());
    ImapSource::new("inbox", config, ImapMode::Poll)
}

fn pointer(uid_validity: u64, uid: u64, size: Option<u64>) -> Task {
    let mut payload = serde_json::json!({
        "account": "u@127.0.0.1", "mailbox": "INBOX", "uid_validity": uid_validity, "uid": uid,
    });
    if let Some(size) = size {
        payload["size"] = serde_json::json!(size);
    }
    Task::new(
        format!("imap:inbox:INBOX:{uid_validity}:{uid}"),
        "mail.message",
        "inbox",
        payload,
    )
    .expect("task")
}

#[tokio::test]
async fn pointers_load_complete_and_go_stale_safely() {
    let server = DovecotServer::start(&[("u", "pass")]);
    let message = b"Subject: hi\r\nMessage-ID: <a@b>\r\n\r\nSKU-1 x 1\r\n".to_vec();
    let mut client = server.client("u", "pass");
    let uid = u64::from(client.append_one("INBOX", &message).expect("APPENDUID"));
    let dir = tempfile::tempdir().expect("tempdir");
    let imap = source(&server, dir.path(), 1024);
    // The UIDVALIDITY of the mailbox, learnt the way the watcher does.
    let validity = {
        let flags = server.flags("u", "pass", "INBOX");
        assert_eq!(flags.len(), 1);
        let probe = pointer(0, uid, None);
        assert_eq!(
            imap.load_content(&probe).await.expect_err("stale").gone(),
            Some(GoneReason::UidValidityChanged),
            "wrong UIDVALIDITY loads as gone, with the reason"
        );
        server.uid_validity("u", "pass", "INBOX")
    };

    let task = pointer(validity, uid, None);
    let loaded = imap.load_content(&task).await.expect("load");
    assert_eq!(loaded.as_deref(), Some(&message[..]));
    assert!(
        server.flags("u", "pass", "INBOX")[&(uid as u32)].is_empty(),
        "BODY.PEEK[] leaves \\Seen unset"
    );

    let gone = pointer(validity, uid + 100, None);
    assert_eq!(
        imap.load_content(&gone).await.expect("gone"),
        None,
        "a deleted message loads as gone"
    );
    imap.complete(&gone)
        .await
        .expect("completing a gone message is a no-op");

    let big = pointer(validity, uid, Some(4096));
    assert!(matches!(
        imap.load_content(&big).await,
        Err(SourceError::TooLarge {
            size: 4096,
            limit: 1024,
            ..
        })
    ));

    imap.complete(&task).await.expect("complete");
    assert!(server.flags("u", "pass", "INBOX")[&(uid as u32)]
        .iter()
        .any(|f| f == "\\Seen"));

    let foreign = Task::new(
        "x",
        "mail.message",
        "inbox",
        serde_json::json!({"mailbox": "Other", "uid_validity": 1, "uid": 1}),
    )
    .expect("task");
    assert!(matches!(
        imap.load_content(&foreign).await,
        Err(SourceError::InvalidPointer { .. })
    ));
}

/// The size in a pointer is the server's `RFC822.SIZE`, which the limit does not trust: a
/// message larger than it declared is fetched no further than the limit and a byte, alone
/// or in a batch, and is too large.
#[tokio::test]
async fn a_message_larger_than_its_declared_size_is_cut_at_the_limit() {
    let server = DovecotServer::start(&[("u", "pass")]);
    let mut client = server.client("u", "pass");
    let big = format!(
        "Subject: big\r\nMessage-ID: <big@b>\r\n\r\n{}",
        "SKU-1 x 1\r\n".repeat(2000)
    )
    .into_bytes();
    let small = b"Subject: small\r\nMessage-ID: <small@b>\r\n\r\nSKU-2 x 2\r\n".to_vec();
    let big_uid = u64::from(client.append_one("INBOX", &big).expect("APPENDUID"));
    let small_uid = u64::from(client.append_one("INBOX", &small).expect("APPENDUID"));
    let validity = server.uid_validity("u", "pass", "INBOX");
    let dir = tempfile::tempdir().expect("tempdir");
    let imap = source(&server, dir.path(), 1024);
    // The server said 100 bytes (a lie, or a size the index got wrong).
    let lying = pointer(validity, big_uid, Some(100));
    assert!(
        matches!(
            imap.load_content(&lying).await,
            Err(SourceError::TooLarge {
                size: 1025,
                limit: 1024,
                ..
            })
        ),
        "alone"
    );
    let batch: Vec<std::sync::Arc<Task>> = vec![
        pointer(validity, small_uid, Some(small.len() as u64)),
        pointer(validity, big_uid, Some(100)),
    ]
    .into_iter()
    .map(std::sync::Arc::new)
    .collect();
    let loaded = imap.load_batch(&batch).await;
    assert_eq!(
        loaded[0].as_ref().expect("small").as_deref(),
        Some(&small[..])
    );
    assert!(
        matches!(loaded[1], Err(SourceError::TooLarge { size: 1025, .. })),
        "in a batch: {:?}",
        loaded[1].as_ref().map(|b| b.as_ref().map(Vec::len))
    );
    // A message exactly at the limit is whole.
    let exact = {
        let head = "Subject: exact\r\nMessage-ID: <exact@b>\r\n\r\n";
        let mut m = head.as_bytes().to_vec();
        m.resize(1024, b'x');
        m
    };
    let exact_uid = u64::from(client.append_one("INBOX", &exact).expect("APPENDUID"));
    assert_eq!(
        imap.load_content(&pointer(validity, exact_uid, Some(1024)))
            .await
            .expect("exact")
            .as_deref(),
        Some(&exact[..])
    );
}

/// A batch of pointers loads with one answer per pointer, in order, whatever each one is;
/// completing a batch flags exactly its messages.
#[tokio::test]
async fn batches_load_and_complete_each_pointer_for_itself() {
    let server = DovecotServer::start(&[("u", "pass")]);
    let mut client = server.client("u", "pass");
    let messages: Vec<Vec<u8>> = (0..5)
        .map(|i| {
            format!("Subject: {i}\r\nMessage-ID: <m{i}@b>\r\n\r\nSKU-{i} x 1\r\n").into_bytes()
        })
        .collect();
    let uids: Vec<u64> = messages
        .iter()
        .map(|m| u64::from(client.append_one("INBOX", m).expect("APPENDUID")))
        .collect();
    let validity = server.uid_validity("u", "pass", "INBOX");
    let dir = tempfile::tempdir().expect("tempdir");
    let imap = source(&server, dir.path(), 1024);
    let size = |i: usize| Some(messages[i].len() as u64);
    let batch: Vec<std::sync::Arc<Task>> = vec![
        pointer(validity, uids[3], size(3)),
        pointer(validity, uids[0], size(0)),
        pointer(validity, uids[0] + 100, Some(10)), // gone
        pointer(validity, uids[1], Some(4096)),     // too large by its pointer
        pointer(validity + 1, uids[2], size(2)),    // stale UIDVALIDITY
        pointer(validity, uids[4], None),           // no size: fetched alone
        pointer(validity, uids[3], size(3)),        // the same message twice
    ]
    .into_iter()
    .map(std::sync::Arc::new)
    .collect();
    let loaded = imap.load_batch(&batch).await;
    assert_eq!(loaded.len(), batch.len());
    assert_eq!(
        loaded[0].as_ref().expect("3").as_deref(),
        Some(&messages[3][..])
    );
    assert_eq!(
        loaded[1].as_ref().expect("0").as_deref(),
        Some(&messages[0][..])
    );
    assert_eq!(loaded[2].as_ref().expect("gone"), &None);
    assert!(matches!(
        loaded[3],
        Err(SourceError::TooLarge { size: 4096, .. })
    ));
    assert_eq!(
        loaded[4].as_ref().expect_err("stale").gone(),
        Some(GoneReason::UidValidityChanged)
    );
    assert_eq!(
        loaded[5].as_ref().expect("4").as_deref(),
        Some(&messages[4][..])
    );
    assert_eq!(
        loaded[6].as_ref().expect("3 again").as_deref(),
        Some(&messages[3][..])
    );
    assert!(
        server
            .flags("u", "pass", "INBOX")
            .values()
            .all(|f| f.is_empty()),
        "loading sets no flag"
    );

    let done = [
        batch[0].clone(),
        batch[1].clone(),
        batch[2].clone(),
        batch[5].clone(),
    ];
    let completed = imap.complete_batch(&done).await;
    assert!(completed.iter().all(Result::is_ok), "{completed:?}");
    let flags = server.flags("u", "pass", "INBOX");
    let seen: Vec<u64> = flags
        .iter()
        .filter(|(_, f)| f.iter().any(|x| x == "\\Seen"))
        .map(|(uid, _)| u64::from(*uid))
        .collect();
    assert_eq!(seen, vec![uids[0], uids[3], uids[4]]);
}

mod race {
    //! A message is never published again while its task is pending, in flight or just
    //! completed: hundreds of completions race the watcher's searches (with IDLE every
    //! `\Seen` store wakes the watcher into a new search; polling searches back to back).

    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use plba_testkit::source_context;
    use plba_testkit::DovecotServer;
    use runtime_adapters::queue::memory::{MemoryQueue, MemoryQueueConfig};
    use runtime_adapters::sources::imap::{ImapConfig, ImapMode, ImapSource};
    use runtime_contracts::{
        AttemptFailure, BoxFuture, CancelSignal, Lease, PublishResult, QueueError, QueueStats,
        Task, TaskQueue, TaskSource,
    };

    /// The memory queue, counting how often each task id was enqueued.
    struct Counting {
        inner: MemoryQueue,
        enqueued: Mutex<HashMap<String, usize>>,
    }

    impl Counting {
        fn count(&self, tasks: &[String], results: &[PublishResult]) {
            let mut enqueued = self.enqueued.lock().expect("lock");
            for (id, r) in tasks.iter().zip(results) {
                if *r == PublishResult::Enqueued {
                    *enqueued.entry(id.clone()).or_default() += 1;
                }
            }
        }
    }

    impl TaskQueue for Counting {
        fn name(&self) -> &str {
            self.inner.name()
        }
        fn publish(&self, task: Task) -> BoxFuture<'_, Result<PublishResult, QueueError>> {
            Box::pin(async move {
                let id = task.id.to_string();
                let r = self.inner.publish(task).await?;
                self.count(&[id], &[r]);
                Ok(r)
            })
        }
        fn publish_batch(
            &self,
            tasks: Vec<Task>,
        ) -> BoxFuture<'_, Result<Vec<PublishResult>, QueueError>> {
            Box::pin(async move {
                let ids: Vec<String> = tasks.iter().map(|t| t.id.to_string()).collect();
                let results = self.inner.publish_batch(tasks).await?;
                self.count(&ids, &results);
                Ok(results)
            })
        }
        fn consume(&self, wait: Duration) -> BoxFuture<'_, Result<Option<Lease>, QueueError>> {
            self.inner.consume(wait)
        }
        fn consume_batch(
            &self,
            max: usize,
            wait: Duration,
        ) -> BoxFuture<'_, Result<Vec<Lease>, QueueError>> {
            self.inner.consume_batch(max, wait)
        }
        fn ack<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<(), QueueError>> {
            self.inner.ack(lease)
        }
        fn ack_batch<'a>(&'a self, leases: &'a [Lease]) -> BoxFuture<'a, Result<(), QueueError>> {
            self.inner.ack_batch(leases)
        }
        fn nack<'a>(
            &'a self,
            lease: &'a Lease,
            retry_delay: Duration,
            failure: Option<AttemptFailure>,
        ) -> BoxFuture<'a, Result<(), QueueError>> {
            self.inner.nack(lease, retry_delay, failure)
        }
        fn dead_letter<'a>(
            &'a self,
            lease: &'a Lease,
            failure: AttemptFailure,
        ) -> BoxFuture<'a, Result<(), QueueError>> {
            self.inner.dead_letter(lease, failure)
        }
        fn stats(&self) -> BoxFuture<'_, Result<QueueStats, QueueError>> {
            self.inner.stats()
        }
    }

    async fn completions_race_searches(mode: ImapMode) {
        const WAVES: usize = 6;
        const PER_WAVE: usize = 100;
        let server = DovecotServer::start(&[("u", "pass")]);
        let dir = tempfile::tempdir().expect("tempdir");
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "pass\n").expect("pw");
        let config: ImapConfig = serde_json::from_value(serde_json::json!({
            "host": "127.0.0.1", "port": server.port(), "tls": "none", "user": "u",
            "password_file": pw, "pool": "orders", "poll_interval_ms": 1, "batch_size": 16,
        }))
        .expect("config");
        let source = Arc::new(ImapSource::new("inbox", config, mode));
        let queue = Arc::new(Counting {
            inner: MemoryQueue::new("orders", MemoryQueueConfig::default()),
            enqueued: Mutex::default(),
        });
        let (ctx, stop) = source_context(queue.clone());
        let run = {
            let source = Arc::clone(&source);
            tokio::spawn(async move { source.start(ctx).await.expect("source runs") })
        };
        // Workers: lease, complete (\Seen) at once, acknowledge; batches and single tasks.
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let (source, queue, stop) = (source.clone(), queue.clone(), stop.clone());
                tokio::spawn(async move {
                    while !stop.is_cancelled() {
                        let leases = queue
                            .consume_batch(
                                if w % 2 == 0 { 1 } else { 8 },
                                Duration::from_millis(20),
                            )
                            .await
                            .expect("consume");
                        if leases.is_empty() {
                            continue;
                        }
                        let tasks: Vec<Arc<Task>> = leases.iter().map(|l| l.task.clone()).collect();
                        for r in source.complete_batch(&tasks).await {
                            r.expect("complete");
                        }
                        queue.ack_batch(&leases).await.expect("ack");
                    }
                })
            })
            .collect();
        let mut appender = server.client("u", "pass");
        for wave in 0..WAVES {
            for i in 0..PER_WAVE {
                let m = format!("Subject: {wave}-{i}\r\n\r\nSKU-1 x 1\r\n");
                appender.append_one("INBOX", m.as_bytes()).expect("append");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let total = (WAVES * PER_WAVE) as u64;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while source.status().completed < total {
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} of {total} completed",
                source.status().completed
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Searches go on while nothing is left: none may find a completed message again.
        tokio::time::sleep(Duration::from_millis(700)).await;
        stop.stop();
        for w in workers {
            w.await.expect("worker");
        }
        run.await.expect("source");
        let enqueued = queue.enqueued.lock().expect("lock").clone();
        let twice: Vec<_> = enqueued.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "published more than once: {twice:?}");
        assert_eq!(enqueued.len() as u64, total, "every message published");
        let status = source.status();
        assert_eq!((status.completed, status.pending), (total, 0), "{status:?}");
        assert_eq!(server.client("u", "pass").unseen_count("INBOX"), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn completions_race_idle_searches_without_a_second_publish() {
        completions_race_searches(ImapMode::Idle).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn completions_race_polling_searches_without_a_second_publish() {
        completions_race_searches(ImapMode::Poll).await;
    }
}

#[tokio::test]
async fn unsettled_lists_unseen_mail_older_than_the_bound() {
    let server = DovecotServer::start(&[("u", "pass")]);
    let mut client = server.client("u", "pass");
    let uids: Vec<u32> = (0..3)
        .map(|i| {
            let message = format!("Subject: m{i}\r\nMessage-ID: <m{i}@b>\r\n\r\nSKU-1 x 1\r\n");
            client
                .append_one("INBOX", message.as_bytes())
                .expect("APPENDUID")
        })
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let imap = source(&server, dir.path(), 1024);
    let validity = server.uid_validity("u", "pass", "INBOX");
    imap.complete(&pointer(validity, u64::from(uids[0]), None))
        .await
        .expect("complete");
    let young = imap
        .unsettled(std::time::Duration::from_secs(3600), 10)
        .await
        .expect("unsettled");
    assert!(
        young.is_empty(),
        "mail younger than the bound is left alone"
    );
    // INTERNALDATE has whole seconds: two of them make the mail older than one.
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let old = imap
        .unsettled(std::time::Duration::from_secs(1), 10)
        .await
        .expect("unsettled");
    let ids: Vec<String> = old.iter().map(|t| t.id.to_string()).collect();
    assert_eq!(
        ids,
        [1, 2].map(|i| format!("imap:inbox:INBOX:{validity}:{}", uids[i])),
        "the unseen ones, as the watcher would publish them"
    );
    assert!(old.iter().all(|t| t.payload["size"].as_u64() > Some(0)));
    let capped = imap
        .unsettled(std::time::Duration::from_secs(1), 1)
        .await
        .expect("unsettled");
    assert_eq!(capped.len(), 1);
}

/// A dead-lettered message whose failure keyword cannot be stored (the server is down)
/// gets it once the server is back: the source keeps trying, so the message is neither
/// searched again nor left looking like new mail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_keyword_refused_during_an_outage_is_set_after_it() {
    use runtime_adapters::queue::memory::{MemoryQueue, MemoryQueueConfig};
    use runtime_contracts::Disposition;
    use std::time::{Duration, Instant};

    let mut server = DovecotServer::start(&[("u", "pass")]);
    let mut client = server.client("u", "pass");
    let uid = client
        .append_one("INBOX", b"Subject: bad\r\n\r\nSKU-666 x 1\r\n")
        .expect("APPENDUID");
    drop(client);
    let validity = server.uid_validity("u", "pass", "INBOX");
    let dir = tempfile::tempdir().expect("tempdir");
    let source = std::sync::Arc::new(source(&server, dir.path(), 1024));
    let queue = std::sync::Arc::new(MemoryQueue::new("orders", MemoryQueueConfig::default()));
    let (ctx, stop) = plba_testkit::source_context(queue);
    let run = {
        let source = std::sync::Arc::clone(&source);
        tokio::spawn(async move { source.start(ctx).await })
    };
    server.stop();
    source.release(
        &pointer(validity, u64::from(uid), None),
        Disposition::DeadLettered,
    );
    // Long enough for the first attempts to fail against the stopped server.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.restart();
    let start = Instant::now();
    loop {
        let flags = server.flags("u", "pass", "INBOX");
        let flags = &flags[&uid];
        if flags.iter().any(|f| f == "$OrderBotFailed") {
            assert!(
                !flags.iter().any(|f| f == "\\Seen"),
                "a dead letter stays unseen: {flags:?}"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "the keyword never came after the outage: {flags:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.stop();
    run.await.expect("join").expect("source stops cleanly");
}

/// `reachable` answers whether the server takes a command: yes, no while it is stopped
/// (with why), and yes again once it is back, although the pooled session died with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reachable_follows_the_server() {
    let mut server = DovecotServer::start(&[("u", "pass")]);
    let dir = tempfile::tempdir().expect("tempdir");
    let imap = source(&server, dir.path(), 1024);
    imap.reachable().await.expect("up");
    // A pooled session now exists; the stop kills it.
    server.stop();
    let down = imap.reachable().await.expect_err("down");
    assert!(!down.is_empty());
    server.restart();
    imap.reachable()
        .await
        .expect("up again, on a fresh session");
}

/// A server that stops answering mid-command (a proxy that stops forwarding, the
/// connection left open) makes the FETCH and the completion's STORE fail as timed out
/// within `command_timeout_ms`, never hang; once it answers again, the message loads and
/// is flagged on a fresh session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_answering_mid_command_times_out_and_recovers() {
    let server = DovecotServer::start(&[("u", "pass")]);
    let proxy = plba_testkit::StallProxy::start(server.port());
    let message = b"Subject: hi\r\nMessage-ID: <stall@b>\r\n\r\nSKU-1 x 1\r\n".to_vec();
    let uid = u64::from(
        server
            .client("u", "pass")
            .append_one("INBOX", &message)
            .expect("APPENDUID"),
    );
    let validity = server.uid_validity("u", "pass", "INBOX");
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "pass\n").expect("pw");
    let config: ImapConfig = serde_json::from_value(serde_json::json!({
        "host": "127.0.0.1", "port": proxy.port(), "tls": "none", "user": "u",
        "password_file": pw, "pool": "orders", "command_timeout_ms": 1000,
    }))
    .expect("config");
    assert!(config.problems("sources.inbox").is_empty());
    let imap = ImapSource::new("inbox", config, ImapMode::Poll);
    let task = pointer(validity, uid, None);
    // A pooled, logged-in session first.
    assert_eq!(
        imap.load_content(&task).await.expect("load").as_deref(),
        Some(&message[..])
    );

    proxy.stall();
    let started = std::time::Instant::now();
    let load = tokio::time::timeout(std::time::Duration::from_secs(20), imap.load_content(&task))
        .await
        .expect("the load returned instead of hanging");
    let failed = load.expect_err("a stalled FETCH is an error");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(proxy.held() > 0, "the command was cut mid-way");
    let complete = tokio::time::timeout(std::time::Duration::from_secs(20), imap.complete(&task))
        .await
        .expect("the STORE returned instead of hanging");
    assert!(complete.is_err(), "a stalled completion is an error");
    assert!(
        server.flags("u", "pass", "INBOX")[&(uid as u32)].is_empty(),
        "nothing was flagged"
    );
    eprintln!("stalled: {failed}");

    proxy.resume();
    assert_eq!(
        imap.load_content(&task)
            .await
            .expect("load again")
            .as_deref(),
        Some(&message[..])
    );
    imap.complete(&task).await.expect("complete");
    assert!(server.flags("u", "pass", "INBOX")[&(uid as u32)]
        .iter()
        .any(|f| f == "\\Seen"));
}
