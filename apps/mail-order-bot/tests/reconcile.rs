//! The reconciliation sweep on a real Redis: a mail whose task was lost (a consumer
//! acknowledged it without completing it) stays unread and pending at its source, which
//! never publishes it again on its own; the scheduled sweep finds it, publishes it again,
//! and reports it in the metrics and the diagnostics.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::{order_mail, unseen, wait_for, FaultyBot, Workspace};
use mail_order_bot::compose::{build_runtime, load_config};
use plba_testkit::RedisServer;
use runtime_adapters::queue::redis::{RedisQueue, RedisQueueConfig};
use runtime_contracts::TaskQueue;

const SWEEP: &str = r#"
[pools.sweeps]
workers = 1
handler_timeout_ms = 5000

[sources.sweep]
type = "schedule"
cron = "* * * * * *"
time_zone = "Asia/Tokyo"
pool = "sweeps"
kind = "plba.reconcile"

[reconcile]
older_than_secs = 1
sources = ["inbox"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mail_whose_task_was_lost_is_found_by_the_sweep_and_published_again() {
    let redis = RedisServer::start(false);
    let ws = Workspace::new();
    // The orders pool has no workers here: what reaches its queue stays there, so the test
    // can play the consumer that loses a task.
    let path = ws.config_redis(&redis.url(), 0, 60_000, SWEEP);
    for n in [1, 2] {
        ws.deliver(
            &format!("1700000000.lost{n}.host"),
            &order_mail(
                &format!("lost-{n}"),
                "purchasing@acme.example",
                &[("SKU-5", 3)],
            ),
        );
    }
    let manager = Arc::new(load_config(Some(&path), Some(HashMap::new())).expect("config"));
    let mut runtime = build_runtime(Arc::clone(&manager), FaultyBot::module(), None)
        .await
        .expect("runtime");
    runtime.start().expect("start");
    let reconciler = Arc::clone(runtime.reconciler().expect("[reconcile] is configured"));

    let ghost = common::ghost_consumer(&redis.url(), "ghost-1");
    let (lost, completed) = (
        "maildir:inbox:1700000000.lost1.host",
        "maildir:inbox:1700000000.lost2.host",
    );
    // While the tasks are in the queue, a sweep finds the mail unfinished but held.
    wait_for(
        Duration::from_secs(30),
        "a sweep that sees the tasks held",
        || {
            let last = reconciler.last();
            async move {
                last.is_some_and(|r| {
                    r.sources
                        .iter()
                        .any(|s| s.held == 2 && s.republished.is_empty())
                })
            }
        },
    )
    .await;
    // The losses: a consumer takes both tasks and acknowledges them without completing
    // them; for the second, its outcome had been recorded (only its \Seen was lost).
    let leases = ghost
        .consume_batch(2, Duration::from_secs(10))
        .await
        .expect("consume");
    let mut taken: Vec<&str> = leases.iter().map(|l| l.task.id.as_str()).collect();
    taken.sort_unstable();
    assert_eq!(taken, [lost, completed]);
    ghost.ack_batch(&leases).await.expect("ack");
    ws.store()
        .await
        .record_failure(
            "<lost-2@example>",
            "0",
            completed,
            "recorded before the loss",
        )
        .await
        .expect("outcome");
    assert_eq!(ghost.holds(lost).await.expect("holds"), Some(false));

    wait_for(
        Duration::from_secs(30),
        "the sweep publishing them again",
        || {
            let last = reconciler.last();
            async move { last.is_some_and(|r| r.sources.iter().any(|s| s.republished.len() == 2)) }
        },
    )
    .await;
    let sweep = reconciler.last().expect("a sweep");
    let inbox = &sweep.sources[0];
    assert_eq!(inbox.outcome_recorded, [completed], "{inbox:?}");
    for id in [lost, completed] {
        assert_eq!(ghost.holds(id).await.expect("holds"), Some(true));
    }
    let again = ghost
        .consume_batch(2, Duration::from_secs(10))
        .await
        .expect("consume");
    assert_eq!(again.len(), 2, "both tasks are back");
    for lease in &again {
        let cause = lease.task.causation_id.as_deref().unwrap_or_default();
        assert!(
            cause.starts_with("schedule:"),
            "caused by the sweep's schedule task: {:?}",
            lease.task
        );
    }
    assert_eq!(
        unseen(&ws),
        2,
        "the mail is still unread: nothing completed it"
    );

    let metrics = runtime.metrics_text().await;
    assert!(
        metrics.contains("plba_reconcile_republished_total{name=\"inbox\"} 2"),
        "{metrics}"
    );
    let findings = runtime.diagnostics().await.findings;
    let finding = |kind: &str| {
        findings
            .iter()
            .find(|f| f.kind == kind)
            .unwrap_or_else(|| panic!("a {kind} finding: {findings:?}"))
    };
    assert_eq!(finding("stranded_work").subject, "inbox");
    assert_eq!(finding("stranded_work").task.as_deref(), Some(lost));
    assert_eq!(finding("completion_lost").task.as_deref(), Some(completed));
    // While the task is held again, later sweeps publish nothing more.
    let before = reconciler.last().map(|r| r.at_unix_ms);
    wait_for(Duration::from_secs(30), "a later sweep", || {
        let last = reconciler.last();
        async move { last.map(|r| r.at_unix_ms) > before }
    })
    .await;
    assert_eq!(reconciler.last().map(|r| r.republished()), Some(0));
    let status = runtime.status().await;
    assert!(
        status.sources["sweep"]
            .next_due
            .as_deref()
            .is_some_and(|n| n.ends_with("+09:00")),
        "/status shows the next slot in the schedule's zone: {:?}",
        status.sources["sweep"]
    );
    runtime.shutdown().await;
}

async fn status(port: u16) -> serde_json::Value {
    common::try_status(port).await.expect("GET /status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_bot_processes_on_one_redis_fire_each_slot_once() {
    use chrono::{Datelike, Timelike};
    let redis = RedisServer::start(false);
    let ws = Workspace::new();
    // Three slots a few seconds ahead, within one minute, and no other: a cron expression
    // with its year.
    let mut now = chrono::Utc::now();
    if now.second() > 50 {
        tokio::time::sleep(Duration::from_secs(u64::from(61 - now.second()))).await;
        now = chrono::Utc::now();
    }
    let seconds: Vec<u32> = (3..6).map(|d| now.second() + d).collect();
    let cron = format!(
        "{} {} {} {} {} * {}",
        seconds
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
        now.minute(),
        now.hour(),
        now.day(),
        now.month(),
        now.year()
    );
    let slot_ids: Vec<String> = seconds
        .iter()
        .map(|s| {
            format!(
                "schedule:sweep:{}",
                now.with_second(*s)
                    .and_then(|t| t.with_nanosecond(0))
                    .expect("slot")
                    .format("%Y-%m-%dT%H:%M:%SZ")
            )
        })
        .collect();
    let ports = [plba_testkit::free_port(), plba_testkit::free_port()];
    let bots: Vec<common::BotProcess> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            // A late start still fires what it missed (catch_up), and the other process's
            // slots are known to the queue: each fires once.
            let extra = format!(
                "{}\n[control]\nenabled = true\nbind = \"127.0.0.1:{port}\"\nread_tokens = [\"read-token-1-7c1f0e9b2d4a6f835e21\"]\n",
                SWEEP
                    .replace("cron = \"* * * * * *\"", &format!("cron = \"{cron}\""))
                    .replace("time_zone = \"Asia/Tokyo\"", "time_zone = \"UTC\"\nmisfire = \"catch_up\"")
            );
            let shared = ws.config_redis(&redis.url(), 2, 60_000, &extra);
            let own = ws.dir.path().join(format!("bot-{i}.toml"));
            std::fs::copy(shared, &own).expect("config");
            common::BotProcess::spawn(&ws, &own, false)
        })
        .collect();
    let published =
        |s: &serde_json::Value| s["sources"]["sweep"]["published"].as_u64().unwrap_or(0);
    let processed = |s: &serde_json::Value| {
        s["pools"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["name"] == "sweeps"))
            .and_then(|p| p["processed"].as_u64())
            .unwrap_or(0)
    };
    wait_for(
        Duration::from_secs(60),
        "three slots fired and handled",
        || async {
            let mut sums = (0, 0);
            for port in ports {
                let Some(s) = common::try_status(port).await else {
                    return false;
                };
                sums.0 += published(&s);
                sums.1 += processed(&s);
            }
            sums == (3, 3)
        },
    )
    .await;
    // A little longer: no slot comes a second time.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (a, b) = (status(ports[0]).await, status(ports[1]).await);
    assert_eq!(published(&a) + published(&b), 3, "{a}\n{b}");
    assert_eq!(processed(&a) + processed(&b), 3, "each slot handled once");
    let sweeps = RedisQueue::new(
        "sweeps",
        RedisQueueConfig {
            url: redis.url(),
            ..RedisQueueConfig::default()
        },
    )
    .expect("queue");
    for id in &slot_ids {
        assert_eq!(
            sweeps.holds(id).await.expect("holds"),
            Some(true),
            "{id} fired and is still known"
        );
    }
    for bot in bots {
        bot.signal(nix::sys::signal::Signal::SIGTERM);
        let (code, _, stderr) = bot.finish();
        assert_eq!(code, 0, "{stderr}");
    }
}
