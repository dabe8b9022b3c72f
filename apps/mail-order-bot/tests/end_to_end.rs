//! The whole flow in one process: Maildir → in-memory queue → worker pool → SQLite, and the
//! same flow into a private PostgreSQL.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::{assert_exactly_once, fill_mailbox, order_mail, FaultyBot, Workspace};
use mail_order_bot::compose::{build_runtime, load_config};
use plba_testkit::PostgresServer;
use runtime_core::RuntimeManager;

async fn run_once(ws: &Workspace, workers: usize, max_attempts: u32) -> RuntimeManager {
    run_config(&ws.config(workers, max_attempts)).await
}

async fn run_config(path: &std::path::Path) -> RuntimeManager {
    let runtime = drained(path, FaultyBot::module()).await;
    let report = runtime.shutdown().await;
    assert!(report.drained_in_time);
    runtime
}

/// `module` run on the configuration at `path` until its work is done (still running).
async fn drained(
    path: &std::path::Path,
    module: Arc<dyn runtime_contracts::ApplicationModule>,
) -> RuntimeManager {
    let config = Arc::new(load_config(Some(path), Some(HashMap::new())).expect("config"));
    let mut runtime = build_runtime(config, module, None).await.expect("runtime");
    runtime.start().expect("start");
    tokio::time::timeout(
        Duration::from_secs(120),
        runtime.wait_until_idle(Duration::from_millis(10)),
    )
    .await
    .expect("drained within 120 s");
    runtime
}

fn faulty_mail(id: &str, fault: &str) -> String {
    order_mail(id, "purchasing@acme.example", &[("SKU-7", 1)]).replacen(
        "MIME-Version",
        &format!("X-Test-Fault: {fault}\r\nMIME-Version"),
        1,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_messages_make_every_order_exactly_once() {
    two_hundred_messages(Workspace::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_messages_make_every_order_exactly_once_on_postgres() {
    let server = PostgresServer::start();
    two_hundred_messages(Workspace::with_store(server.create_database())).await;
}

async fn two_hundred_messages(ws: Workspace) {
    let expected = fill_mailbox(&ws, 200);
    ws.deliver("fault.1", &faulty_mail("fault-1", "error"));
    ws.deliver("fault.2", &faulty_mail("fault-2", "panic"));

    let runtime = run_once(&ws, 4, 3).await;
    assert_exactly_once(&ws, &expected).await;

    let seen = ws.seen_flags();
    let unseen: Vec<&String> = seen.iter().filter(|(_, s)| !**s).map(|(u, _)| u).collect();
    assert_eq!(
        unseen,
        ["fault.1", "fault.2"],
        "only the failing messages stay unseen"
    );
    let status = runtime.status().await;
    assert_eq!(status.pools[0].dead_lettered, 2);
    assert_eq!(status.pools[0].failed, 6, "three attempts each");
    assert_eq!(status.pools[0].processed, 200);

    let dead = runtime
        .queue("orders")
        .and_then(|q| q.dead_letters())
        .expect("dead letters")
        .list(None, 10)
        .await
        .expect("list");
    let reasons: HashMap<String, String> = dead
        .items
        .into_iter()
        .map(|d| (d.task.id.to_string(), d.reason))
        .collect();
    assert!(reasons["maildir:inbox:fault.1"]
        .contains("injected fault: the ERP is down (attempt 3 of 3)"));
    assert!(reasons["maildir:inbox:fault.2"].contains("handler panicked: injected panic"));

    let outcomes = ws.store().await.outcomes().await.expect("outcomes");
    let failed: Vec<_> = outcomes.iter().filter(|o| o.outcome == "failed").collect();
    assert_eq!(
        failed.len(),
        2,
        "the failures are recorded in the store too"
    );
    assert!(failed
        .iter()
        .any(|o| o.message_identity == "mid:fault-1@test.example"
            && o.reason
                .as_deref()
                .is_some_and(|r| r.contains("ERP is down"))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_creates_nothing_and_a_fixed_fault_is_picked_up_on_restart() {
    let ws = Workspace::new();
    let expected = fill_mailbox(&ws, 40);
    ws.deliver("fault.1", &faulty_mail("fault-1", "error"));
    run_once(&ws, 2, 2).await;
    assert_exactly_once(&ws, &expected).await;

    // The operator fixes the fault (here: the message no longer triggers it) and restarts.
    let path = ws.maildir().join("new/fault.1");
    let fixed = std::fs::read_to_string(&path)
        .expect("still unread")
        .replace("X-Test-Fault: error\r\n", "");
    std::fs::write(&path, fixed).expect("fix");
    let runtime = run_once(&ws, 2, 2).await;
    assert_eq!(
        runtime.status().await.pools[0].processed,
        1,
        "only the unread message is read again"
    );
    let mut expected = expected;
    expected.orders.push("mid:fault-1@test.example".into());
    assert_exactly_once(&ws, &expected).await;
    assert!(ws.seen_flags().values().all(|s| *s));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_mail_gets_a_recorded_outcome_never_a_panic() {
    let ws = Workspace::new();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", b"".to_vec(), "unknown_client"),
        ("garbage", vec![0xff, 0xfe, 0x00, 0x13, 0x37, b'\n', 0x80], "unknown_client"),
        (
            "no-from",
            b"Message-ID: <nofrom@test.example>\r\nSubject: order\r\n\r\nSKU-1 x 1\r\n".to_vec(),
            "unknown_client",
        ),
        (
            "invalid-utf8-headers",
            b"From: \xff\xfe <purchasing@acme.example>\r\nSubject: \xc3\x28 \xa0\xa1\r\nMessage-ID: <badutf@test.example>\r\n\r\nSKU-1 x 2\r\n".to_vec(),
            "created",
        ),
        (
            "broken-mime",
            b"From: purchasing@acme.example\r\nMessage-ID: <broken@test.example>\r\nContent-Type: multipart/mixed; boundary=\"zzz\"\r\n\r\n--zzz\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64!!!\r\n--zzz\r\nContent-Type: text/csv; name=\"o.csv\"\r\n\r\nsku,qty\r\nSKU-5,\"unterminated\r\n".to_vec(),
            "no_lines",
        ),
        (
            "header-only",
            b"From: purchasing@acme.example\r\nMessage-ID: <hdr@test.example>\r\nSubject: x".to_vec(),
            "no_lines",
        ),
        (
            // ~30,000 nested forwards: mail-parser 0.11 aborts the process on this (stack
            // overflow in Drop), so it must be rejected before parsing.
            "nested-rfc822",
            format!(
                "From: purchasing@acme.example\r\nMessage-ID: <deep@test.example>\r\nContent-Type: message/rfc822\r\n\r\n{}Subject: x\r\n\r\nSKU-1 x 1\r\n",
                "Content-Type: message/rfc822\r\n\r\n".repeat(30_000)
            )
            .into_bytes(),
            "rejected",
        ),
        (
            "no-blank-line-huge-header",
            format!("From: purchasing@acme.example\r\nX-Long: {}\r\n", "a".repeat(200_000)).into_bytes(),
            "no_lines",
        ),
    ];
    for (unique, bytes, _) in &cases {
        ws.deliver_bytes(unique, bytes);
    }
    let runtime = run_once(&ws, 2, 2).await;
    let status = runtime.status().await;
    assert_eq!(status.pools[0].dead_lettered, 0);
    assert_eq!(status.pools[0].processed, cases.len() as u64);
    assert!(
        ws.seen_flags().values().all(|s| *s),
        "every message has an outcome and is seen"
    );

    let outcomes = ws.store().await.outcomes().await.expect("outcomes");
    assert_eq!(outcomes.len(), cases.len());
    let by_id: HashMap<&str, &str> = outcomes
        .iter()
        .map(|o| (o.message_identity.as_str(), o.outcome.as_str()))
        .collect();
    assert_eq!(
        by_id.get("mid:nofrom@test.example"),
        Some(&"unknown_client")
    );
    assert_eq!(by_id.get("mid:badutf@test.example"), Some(&"created"));
    assert_eq!(by_id.get("mid:broken@test.example"), Some(&"no_lines"));
    assert_eq!(by_id.get("mid:hdr@test.example"), Some(&"no_lines"));
    let mut kinds: Vec<&str> = outcomes.iter().map(|o| o.outcome.as_str()).collect();
    let mut want: Vec<&str> = cases.iter().map(|(_, _, o)| *o).collect();
    kinds.sort_unstable();
    want.sort_unstable();
    assert_eq!(kinds, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_above_the_sources_size_limit_is_rejected_and_completed() {
    let ws = Workspace::new();
    let text = ws.config_text(2, 3, "").replace(
        "poll_interval_ms = 50",
        "poll_interval_ms = 50\nmax_message_bytes = 4096",
    );
    let path = ws.dir.path().join("small.toml");
    std::fs::write(&path, text).expect("write config");
    let big = order_mail("big-1", "purchasing@acme.example", &[("SKU-1", 1)]).replacen(
        "MIME-Version",
        &format!("X-Padding: {}\r\nMIME-Version", "p".repeat(8000)),
        1,
    );
    ws.deliver("big.1", &big);
    ws.deliver(
        "small.1",
        &order_mail("small-1", "purchasing@acme.example", &[("SKU-2", 2)]),
    );
    let runtime = run_config(&path).await;
    let status = runtime.status().await;
    assert_eq!(
        status.pools[0].dead_lettered, 0,
        "a limit is an outcome, not a failure"
    );
    let outcomes = ws.store().await.outcomes().await.expect("outcomes");
    let rejected: Vec<_> = outcomes
        .iter()
        .filter(|o| o.outcome == "rejected")
        .collect();
    assert_eq!(rejected.len(), 1, "{outcomes:?}");
    assert!(rejected[0]
        .reason
        .as_deref()
        .is_some_and(|r| r.contains("max_message_bytes") && r.contains("4096")));
    assert_eq!(rejected[0].message_identity, "task:maildir:inbox:big.1");
    assert!(outcomes.iter().any(|o| o.outcome == "created"));
    assert!(
        ws.seen_flags().values().all(|s| *s),
        "both have an outcome, so both are seen"
    );
}

/// A message deleted between its publish and its fetch: `skipped` with `message gone`,
/// recorded under its task and counted; no order, no failure, and the mail beside it made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_deleted_before_its_fetch_is_recorded_as_skipped() {
    let ws = Workspace::new();
    ws.deliver(
        "doomed.1",
        &order_mail("doomed-1", "purchasing@acme.example", &[("SKU-1", 1)]),
    );
    ws.deliver(
        "kept.1",
        &order_mail("kept-1", "purchasing@acme.example", &[("SKU-2", 2)]),
    );
    let maildir = ws.maildir();
    let module = common::DeleteBeforeFetch(move |task: &runtime_contracts::Task| {
        if task.payload["unique"] == "doomed.1" {
            for sub in ["new", "cur"] {
                for entry in std::fs::read_dir(maildir.join(sub))
                    .expect("read")
                    .flatten()
                {
                    if entry.file_name().to_string_lossy().starts_with("doomed.1") {
                        std::fs::remove_file(entry.path()).expect("delete");
                    }
                }
            }
        }
    })
    .module();
    let runtime = drained(&ws.config(2, 3), module).await;
    let metrics = runtime.metrics_text().await;
    let status = runtime.status().await;
    runtime.shutdown().await;
    let outcomes = common::assert_one_skipped(&ws, &status, "task:").await;
    let created: Vec<_> = outcomes.iter().filter(|o| o.outcome == "created").collect();
    assert_eq!(created.len(), 1, "the mail beside it is made: {outcomes:?}");
    assert_eq!(common::orders_so_far(&ws).await, 1);
    let counted = metrics
        .lines()
        .find(|l| l.starts_with("plba_outcomes_total") && l.contains("outcome=\"skipped\""))
        .unwrap_or_else(|| panic!("no skipped count in:\n{metrics}"));
    assert!(counted.ends_with(" 1"), "{counted}");
}
