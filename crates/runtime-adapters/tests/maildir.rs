//! The Maildir source against real directories.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use plba_testkit::{source_context, StopSignal};
use runtime_adapters::queue::memory::{MemoryQueue, MemoryQueueConfig};
use runtime_adapters::sources::maildir::{deliver, MaildirConfig, MaildirSource};
use runtime_contracts::{Disposition, TaskQueue, TaskSource};

fn config(path: &Path) -> MaildirConfig {
    MaildirConfig {
        path: path.to_owned(),
        pool: "p".into(),
        kind: "mail.message".into(),
        poll_interval_ms: 20,
        create_if_missing: true,
        max_message_bytes: 1024,
    }
}

struct Harness {
    source: Arc<MaildirSource>,
    queue: Arc<MemoryQueue>,
    stop: Arc<StopSignal>,
    run: tokio::task::JoinHandle<()>,
}

impl Harness {
    fn start(dir: &Path) -> Self {
        let source = Arc::new(MaildirSource::new("inbox", config(dir)));
        let queue = Arc::new(MemoryQueue::new("p", MemoryQueueConfig::default()));
        let (ctx, stop) = source_context(queue.clone());
        let run = {
            let source = Arc::clone(&source);
            tokio::spawn(async move {
                source.start(ctx).await.expect("source runs");
            })
        };
        Self {
            source,
            queue,
            stop,
            run,
        }
    }

    async fn wait_scans(&self, n: u64) {
        // Each scan after the first proves the previous state was looked at again.
        for _ in 0..n {
            let before = self.source.status().last_event_age;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let now = self.source.status().last_event_age;
                if now.is_some() && (before.is_none() || now < before) {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no scan within 10 s"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }

    async fn stop(self) {
        self.stop.stop();
        self.run.await.expect("join");
    }
}

fn names(dir: &Path, sub: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join(sub))
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn publishes_unseen_messages_once_and_marks_seen_only_on_completion() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    deliver(dir, "1.A.host", b"Subject: a\r\n\r\nbody").expect("deliver");
    std::fs::create_dir_all(dir.join("cur")).expect("cur");
    std::fs::write(dir.join("cur/2.B.host:2,F"), b"Subject: b\r\n\r\n").expect("flagged unseen");
    std::fs::write(dir.join("cur/3.C.host:2,RS"), b"Subject: c\r\n\r\n").expect("already seen");

    let h = Harness::start(dir);
    h.wait_scans(3).await;
    let stats = h.queue.stats().await.expect("stats");
    assert_eq!(
        stats.published, 2,
        "new/ and unseen cur/ only, once each across scans"
    );

    let mut leases = Vec::new();
    while let Some(lease) = h
        .queue
        .consume(Duration::from_millis(1))
        .await
        .expect("consume")
    {
        leases.push(lease);
    }
    let mut ids: Vec<String> = leases.iter().map(|l| l.task.id.to_string()).collect();
    ids.sort();
    assert_eq!(ids, ["maildir:inbox:1.A.host", "maildir:inbox:2.B.host"]);

    let content = h.source.load_content(&leases[0].task).await.expect("load");
    assert!(content.expect("present").starts_with(b"Subject:"));

    // Only the first one succeeds; the second is dead-lettered and must stay unseen.
    let (ok, failed) = if leases[0].task.id.as_str().ends_with("1.A.host") {
        (&leases[0], &leases[1])
    } else {
        (&leases[1], &leases[0])
    };
    h.source.complete(&ok.task).await.expect("complete");
    h.source
        .complete(&ok.task)
        .await
        .expect("completion is idempotent");
    h.source.release(&failed.task, Disposition::DeadLettered);
    h.wait_scans(2).await;
    assert_eq!(
        h.queue.stats().await.expect("stats").published,
        2,
        "nothing republished"
    );
    assert!(names(dir, "new").is_empty());
    assert_eq!(
        names(dir, "cur"),
        ["1.A.host:2,S", "2.B.host:2,F", "3.C.host:2,RS"]
    );
    h.stop().await;
}

#[tokio::test]
async fn a_vanished_message_reads_as_gone_and_oversized_ones_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    deliver(dir, "1.A.host", b"x").expect("deliver");
    deliver(dir, "2.B.host", &vec![b'y'; 4096]).expect("deliver big");
    let h = Harness::start(dir);
    h.wait_scans(1).await;
    let a = h
        .queue
        .consume(Duration::from_millis(1))
        .await
        .expect("c")
        .expect("a");
    let b = h
        .queue
        .consume(Duration::from_millis(1))
        .await
        .expect("c")
        .expect("b");
    std::fs::remove_file(dir.join("new/1.A.host")).expect("remove");
    assert_eq!(h.source.load_content(&a.task).await.expect("load"), None);
    h.source
        .complete(&a.task)
        .await
        .expect("completing a gone message is not an error");
    let err = h.source.load_content(&b.task).await.expect_err("too large");
    assert!(
        err.to_string().contains("above the 1024-byte limit"),
        "{err}"
    );
    h.stop().await;
}

#[tokio::test]
async fn hostile_pointers_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let source = MaildirSource::new("inbox", config(tmp.path()));
    for unique in ["../../etc/passwd", "", "..", "a/b"] {
        let task =
            runtime_contracts::Task::new("t", "k", "inbox", serde_json::json!({"unique": unique}))
                .expect("task");
        assert!(source.load_content(&task).await.is_err(), "{unique:?}");
        assert!(source.complete(&task).await.is_err(), "{unique:?}");
    }
}
