//! Diagnostics on a real Redis queue: a lease held by a consumer that died and an email
//! that keeps failing are both reported, with what to do, by `GET /diagnostics` and by
//! `mail-order-bot diagnose`.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::{order_mail, FaultyBot, Workspace};
use mail_order_bot::compose::{build_runtime, control_config, load_config};
use plba_testkit::{free_port, RedisServer};
use runtime_adapters::control::ControlServer;
use runtime_contracts::{Task, TaskQueue};
use runtime_core::{Diagnostics, RuntimeManager};

/// The bot (with the faults of the tests) and its control plane, as `path` configures them.
async fn start(path: &std::path::Path) -> (Arc<RuntimeManager>, ControlServer) {
    let manager = Arc::new(load_config(Some(path), Some(HashMap::new())).expect("config"));
    let mut runtime = build_runtime(Arc::clone(&manager), FaultyBot::module(), None)
        .await
        .expect("runtime");
    runtime.start().expect("start");
    let runtime = Arc::new(runtime);
    let cfg = control_config(manager.root().get("control")).expect("control");
    let control = ControlServer::start(Arc::clone(&runtime), &cfg)
        .await
        .expect("control plane");
    (runtime, control)
}

async fn diagnostics(port: u16) -> Diagnostics {
    reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/diagnostics"))
        .bearer_auth("read-token-1-7c1f0e9b2d4a6f835e21")
        .send()
        .await
        .expect("GET /diagnostics")
        .error_for_status()
        .expect("200")
        .json()
        .await
        .expect("diagnostics JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_lease_and_a_poison_email_are_reported_with_what_to_do() {
    let redis = RedisServer::start(false);
    let ws = Workspace::new();
    // A consumer that took a task and died: its lease is never settled, and nobody takes it
    // over within the test (claim_min_idle_ms is a minute).
    let ghost = common::ghost_consumer(&redis.url(), "ghost-1");
    let held = Task::new(
        "held-by-ghost",
        "mail.message",
        "inbox",
        serde_json::json!({}),
    )
    .expect("task");
    ghost.publish(held).await.expect("publish");
    let lease = ghost
        .consume(Duration::from_secs(5))
        .await
        .expect("consume")
        .expect("the task");
    assert_eq!(lease.task.id.as_str(), "held-by-ghost");

    // An email whose every attempt fails the same way, retried slowly enough to be seen
    // waiting for its retry.
    ws.deliver(
        "poison",
        &order_mail("poison", "purchasing@acme.example", &[("SKU-6", 1)]).replacen(
            "MIME-Version",
            "X-Test-Fault: error\r\nMIME-Version",
            1,
        ),
    );
    let port = free_port();
    let extra = format!(
        "[control]\nenabled = true\nbind = \"127.0.0.1:{port}\"\nread_tokens = [\"read-token-1-7c1f0e9b2d4a6f835e21\"]\n"
    );
    let text = std::fs::read_to_string(ws.config_redis(&redis.url(), 2, 60_000, &extra))
        .expect("config")
        .replace("handler_timeout_ms = 59000", "handler_timeout_ms = 300")
        .replace("max_attempts = 3", "max_attempts = 20")
        .replace("initial_backoff_ms = 10", "initial_backoff_ms = 300")
        .replace("max_backoff_ms = 50", "max_backoff_ms = 1000");
    assert!(text.contains("handler_timeout_ms = 300\n"), "{text}");
    assert!(text.contains("max_attempts = 20"), "{text}");
    let path = ws.dir.path().join("diagnose.toml");
    std::fs::write(&path, &text).expect("write");
    let (runtime, control) = start(&path).await;

    let mut report;
    let started = std::time::Instant::now();
    loop {
        report = diagnostics(port).await;
        let found = |kind: &str, task: &str| {
            report
                .findings
                .iter()
                .any(|f| f.kind == kind && f.task.as_deref() == Some(task))
        };
        if found("stuck_lease", "held-by-ghost")
            && found("poison_candidate", "maildir:inbox:poison")
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not both reported within 30 s: {report:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stuck = report
        .findings
        .iter()
        .find(|f| f.kind == "stuck_lease")
        .expect("stuck lease");
    assert_eq!(stuck.subject, "orders");
    assert!(stuck.detail.contains("ghost-1"), "{stuck:#?}");
    assert!(stuck.action.contains("claim_min_idle_ms"), "{stuck:#?}");
    let poison = report
        .findings
        .iter()
        .find(|f| f.kind == "poison_candidate")
        .expect("poison");
    assert!(poison.detail.contains("injected fault"), "{poison:#?}");
    assert!(poison.action.contains("max_attempts"), "{poison:#?}");
    assert!(
        report
            .findings
            .iter()
            .any(|f| f.kind == "idle_consumer" && f.detail.contains("ghost-1")),
        "the dead consumer itself: {report:#?}"
    );
    assert!(
        !report.findings.iter().any(|f| f.kind.starts_with("source")),
        "the source is fine: {report:#?}"
    );

    // The same from the command line, as an operator would ask.
    let bin = env!("CARGO_BIN_EXE_mail-order-bot");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin)
            .args(["diagnose", "--config"])
            .arg(&path)
            .output()
            .expect("run diagnose")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("stuck_lease [orders] task held-by-ghost"),
        "{stdout}"
    );
    assert!(
        stdout.contains("poison_candidate [orders] task maildir:inbox:poison"),
        "{stdout}"
    );
    assert!(stdout.contains("what to do:"), "{stdout}");

    control.stop().await;
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_bot_has_nothing_to_report_and_an_unreachable_one_is_an_error() {
    let ws = Workspace::new();
    let port = free_port();
    let extra = format!(
        "[control]\nenabled = true\nbind = \"127.0.0.1:{port}\"\nread_tokens = [\"read-token-1-7c1f0e9b2d4a6f835e21\"]\n"
    );
    let path = ws.config_with(2, 3, &extra);
    let bin = env!("CARGO_BIN_EXE_mail-order-bot");
    let ask = |path: std::path::PathBuf| {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(bin)
                .args(["diagnose", "--config"])
                .arg(&path)
                .output()
                .expect("run diagnose")
        })
    };
    let down = ask(path.clone()).await.expect("join");
    assert_eq!(down.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&down.stderr).contains("is it running with [control] enabled?"),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    let (runtime, control) = start(&path).await;
    let report = diagnostics(port).await;
    assert_eq!(report, Diagnostics::default(), "nothing to report");
    let fine = ask(path).await.expect("join");
    assert_eq!(fine.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&fine.stdout).contains("nothing found"));
    control.stop().await;
    runtime.shutdown().await;
}
