//! The transactional outbox and the ERP delivery, against the testkit's ERP on loopback:
//! every order reaches the ERP and is applied once by its key, through 500s, timeouts, a
//! lost answer (409 on the retry) and an ERP that goes away; a refused order becomes a dead
//! letter that an operator lists and replays like any other.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::plane::{call, ADMIN, READ};
use common::{order_mail, wait_for, Workspace};
use mail_order_bot::compose::{build_runtime, control_config, load_config};
use mail_order_bot::domain::erp::order_key;
use mail_order_bot::module::MailOrderModule;
use plba_testkit::{ErpMode, ErpServer, PostgresServer};
use runtime_contracts::Probe;
use runtime_core::RuntimeManager;

const CONTROL: &str = r#"
[control]
enabled = true
bind = "127.0.0.1:0"
read_tokens = ["read-token-1-7c1f0e9b2d4a6f835e21"]
admin_tokens = ["admin-token-1-4b8e2d6f0a3c9e17b5d2"]
"#;

/// The ERP section and a quick outbox pool (short backoff, a 3 s lease).
fn erp_section(erp: &ErpServer, max_attempts: u32) -> String {
    format!(
        r#"
[apps.mail_order_bot.erp]
url = "{url}"
timeout_ms = 1000
auth_env = "PLBA_TEST_ERP_AUTH"

[apps.mail_order_bot.outbox]
lease_ms = 3000

[pools.outbox]
workers = 4
max_attempts = {max_attempts}

[pools.outbox.retry]
initial_backoff_ms = 20
max_backoff_ms = 200
jitter = 0.1
"#,
        url = erp.url()
    )
}

async fn start(path: &std::path::Path) -> (Arc<RuntimeManager>, axum::Router) {
    std::env::set_var("PLBA_TEST_ERP_AUTH", "Bearer erp-token-7");
    let manager = Arc::new(load_config(Some(path), Some(HashMap::new())).expect("config"));
    let cfg = control_config(manager.root().get("control")).expect("control config");
    let mut runtime = build_runtime(Arc::clone(&manager), Arc::new(MailOrderModule), None)
        .await
        .expect("runtime");
    runtime.start().expect("start");
    let runtime = Arc::new(runtime);
    let app = runtime_adapters::control::router(Arc::clone(&runtime), &cfg);
    (runtime, app)
}

fn mails(n: usize, prefix: &str) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            let id = format!("{prefix}-{i}");
            let mail = order_mail(
                &id,
                "purchasing@acme.example",
                &[("SKU-1", 2), ("SKU-2", 1)],
            );
            (id, mail)
        })
        .collect()
}

/// The keys of every order in the store.
async fn order_keys(ws: &Workspace) -> Vec<(String, i64)> {
    let store = ws.store().await;
    store
        .orders_after(0)
        .await
        .expect("orders")
        .into_iter()
        .map(|o| (order_key(&o.message_identity), o.id))
        .collect()
}

async fn outbox_stats(runtime: &RuntimeManager) -> runtime_contracts::QueueStats {
    runtime
        .queue("outbox")
        .expect("the outbox pool")
        .stats()
        .await
        .expect("stats")
}

/// Every order applied once by its key, with its lines; the bodies are what the store has.
async fn assert_ledger(ws: &Workspace, erp: &ErpServer, orders: usize) {
    let keys = order_keys(ws).await;
    assert_eq!(keys.len(), orders, "one order per mail");
    let applied = erp.applied();
    assert_eq!(applied.len(), orders, "every order reached the ERP");
    let store = ws.store().await;
    for (key, id) in &keys {
        let body = applied
            .get(key)
            .unwrap_or_else(|| panic!("order {id} ({key}) was not applied"));
        let order = store.order(*id).await.expect("order").expect("stored");
        assert_eq!(body["id"], key.as_str());
        assert_eq!(body["number"], *id);
        assert_eq!(body["client"]["id"], order.client_id.as_str());
        let lines = body["lines"].as_array().expect("lines");
        assert_eq!(lines.len(), order.lines.len());
        for (sent, kept) in lines.iter().zip(&order.lines) {
            assert_eq!(sent["sku"], kept.sku.as_str());
            assert_eq!(sent["quantity"], kept.quantity);
        }
    }
    for request in erp.requests() {
        assert_eq!(
            request.authorization.as_deref(),
            Some("Bearer erp-token-7"),
            "the credential from the environment"
        );
        let key = request.key.expect("every request has its key");
        assert!(applied.contains_key(&key), "a request for an order: {key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_order_reaches_the_erp_once_through_failures_timeouts_and_a_lost_answer() {
    let ws = Workspace::new();
    let erp = ErpServer::start();
    // The first answers: a 500, a hang (the client times out), an answer lost after the
    // ERP applied the order (its retry gets 409), a 503 with Retry-After and a 429.
    erp.script(&[
        ErpMode::ServerError,
        ErpMode::Hang,
        ErpMode::AppliedButLost,
        ErpMode::Unavailable(1),
        ErpMode::TooMany(1),
        ErpMode::ServerError,
    ]);
    let config = ws.config_with(4, 3, &format!("{}{CONTROL}", erp_section(&erp, 8)));
    for (id, mail) in mails(30, "erp") {
        ws.deliver(&id, &mail);
    }
    // And two that make no order: nothing goes to the ERP for them.
    ws.deliver(
        "nobody",
        &order_mail("nobody", "x@unknown.example", &[("SKU-1", 1)]),
    );
    ws.deliver(
        "nolines",
        &order_mail("nolines", "purchasing@acme.example", &[]),
    );
    let (runtime, app) = start(&config).await;
    wait_for(Duration::from_secs(60), "every order applied", || async {
        erp.applied().len() == 30 && outbox_stats(&runtime).await.processed == 30
    })
    .await;
    let stats = outbox_stats(&runtime).await;
    let status = call(&app, "GET", "/status", READ, None).await.json();
    runtime.shutdown().await;
    assert_ledger(&ws, &erp, 30).await;
    assert_eq!(stats.dead, 0, "nothing dead-lettered: {stats:?}");
    assert_eq!(stats.depth + stats.scheduled + stats.in_flight, 0);
    // The 500s, the 429 and a lone timeout count, unless the ERP was away when they failed
    // (a 503 says so, and the deliveries run side by side): never more than the failures.
    let failures = erp
        .requests()
        .iter()
        .filter(|r| !matches!(r.status, 201 | 409))
        .count() as u64;
    assert!(
        stats.failed <= failures,
        "the failed attempts are counted: {stats:?}, {failures} failed answers"
    );
    let by_key = erp.requests_by_key();
    let repeated = by_key.values().filter(|n| **n > 1).count();
    assert!(
        repeated >= 3,
        "the failed deliveries were repeated: {by_key:?}"
    );
    assert!(
        erp.requests().iter().any(|r| r.status == 409),
        "the lost answer's retry got 409 and counted as delivered"
    );
    let queues = status["queues"].to_string();
    assert!(
        queues.contains("outbox"),
        "the outbox is in /status: {status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_500_is_retried_and_its_attempts_are_counted() {
    let ws = Workspace::new();
    let erp = ErpServer::start();
    erp.script(&[ErpMode::ServerError, ErpMode::ServerError]);
    let config = ws.config_with(2, 3, &format!("{}{CONTROL}", erp_section(&erp, 8)));
    ws.deliver(
        "flaky",
        &order_mail("flaky", "purchasing@acme.example", &[("SKU-3", 4)]),
    );
    let (runtime, _app) = start(&config).await;
    wait_for(Duration::from_secs(30), "the delivery", || async {
        outbox_stats(&runtime).await.processed == 1
    })
    .await;
    let stats = outbox_stats(&runtime).await;
    runtime.shutdown().await;
    assert_eq!(stats.failed, 2, "two failed attempts: {stats:?}");
    let statuses: Vec<u16> = erp.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [500, 500, 201]);
    assert_ledger(&ws, &erp, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_order_is_a_dead_letter_with_the_erps_answer_and_replays() {
    let ws = Workspace::new();
    let erp = ErpServer::start();
    erp.script(&[ErpMode::BadRequest]);
    let config = ws.config_with(2, 3, &format!("{}{CONTROL}", erp_section(&erp, 8)));
    ws.deliver(
        "refused",
        &order_mail("refused", "purchasing@acme.example", &[("SKU-9", 1)]),
    );
    let (runtime, app) = start(&config).await;
    wait_for(Duration::from_secs(30), "the dead letter", || async {
        outbox_stats(&runtime).await.dead == 1
    })
    .await;
    assert_eq!(erp.requests().len(), 1, "a 400 is not retried");
    let listed = call(&app, "GET", "/queues/outbox/dead-letters", READ, None).await;
    assert_eq!(listed.status, 200, "{}", listed.text);
    let items = listed.json()["items"].as_array().cloned().expect("items");
    assert_eq!(items.len(), 1, "{}", listed.text);
    let reason = items[0]["reason"].as_str().unwrap_or_default().to_owned();
    assert!(
        reason.contains("400") && reason.contains("unknown article"),
        "the status and an excerpt of the ERP's answer: {reason}"
    );
    let id = items[0]["id"].as_str().expect("id").to_owned();
    // The ERP's catalogue is fixed: the operator replays it.
    let replayed = call(
        &app,
        "POST",
        &format!("/queues/outbox/dead-letters/{id}/replay"),
        ADMIN,
        None,
    )
    .await;
    assert!(replayed.status.is_success(), "{}", replayed.text);
    wait_for(Duration::from_secs(30), "the replayed delivery", || async {
        erp.applied().len() == 1 && outbox_stats(&runtime).await.processed == 1
    })
    .await;
    let stats = outbox_stats(&runtime).await;
    runtime.shutdown().await;
    assert_eq!(stats.dead, 0);
    assert_ledger(&ws, &erp, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_erp_away_turns_readiness_and_the_outbox_drains_when_it_is_back() {
    let ws = Workspace::new();
    let mut erp = ErpServer::start();
    erp.down();
    // Two attempts at most: only an outage that counted attempts could dead-letter.
    let config = ws.config_with(2, 3, &format!("{}{CONTROL}", erp_section(&erp, 2)));
    for (id, mail) in mails(10, "away") {
        ws.deliver(&id, &mail);
    }
    let (runtime, _app) = start(&config).await;
    wait_for(
        Duration::from_secs(30),
        "readiness down for the ERP",
        || async {
            let report = runtime.health().check(Probe::Readiness).await;
            report
                .checks
                .iter()
                .any(|c| c.name == "erp" && c.status != runtime_contracts::HealthStatus::Up)
        },
    )
    .await;
    // Away for a minute, with the mail still coming in.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let during = outbox_stats(&runtime).await;
    assert_eq!(during.dead, 0, "an outage dead-letters nothing: {during:?}");
    assert_eq!(during.processed, 0);
    erp.up();
    wait_for(Duration::from_secs(60), "the outbox drained", || async {
        outbox_stats(&runtime).await.processed == 10
    })
    .await;
    wait_for(Duration::from_secs(30), "readiness up again", || async {
        runtime.health().check(Probe::Readiness).await.healthy
    })
    .await;
    runtime.shutdown().await;
    assert_ledger(&ws, &erp, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_postgres_the_batch_statement_writes_the_outbox_rows() {
    let pg = PostgresServer::start();
    let ws = Workspace::with_store(pg.create_database());
    let erp = ErpServer::start();
    let config = ws.config_with(4, 3, &format!("{}{CONTROL}", erp_section(&erp, 8)));
    let text = std::fs::read_to_string(&config)
        .expect("config")
        .replace("[pools.orders]\n", "[pools.orders]\nprefetch = 32\n");
    std::fs::write(&config, text).expect("config");
    for (id, mail) in mails(60, "pg") {
        ws.deliver(&id, &mail);
    }
    let (runtime, _app) = start(&config).await;
    wait_for(Duration::from_secs(60), "every order applied", || async {
        erp.applied().len() == 60 && outbox_stats(&runtime).await.processed == 60
    })
    .await;
    runtime.shutdown().await;
    assert_ledger(&ws, &erp, 60).await;
    assert!(
        erp.requests_by_key().values().all(|n| *n == 1),
        "no fault: one request per order"
    );
}

/// `n` created orders written straight into the store at `url`, with their ERP rows.
async fn recorded_orders(url: &str, n: usize) {
    use mail_order_bot::domain::extract::OrderLine;
    use mail_order_bot::domain::store::{Effects, NewOrder, OrderStore, Recording};
    use mail_order_bot::domain::OutcomeKind;
    let store = OrderStore::open(url)
        .await
        .expect("store")
        .with_effects(Effects {
            erp: true,
            ..Effects::default()
        });
    let recordings: Vec<Recording> = (0..n)
        .map(|i| Recording {
            identity: format!("mid:replica-{i}@test.example"),
            content_sha256: format!("sha-{i}"),
            fingerprint: format!("fp-{i}"),
            sender: Some("purchasing@acme.example".into()),
            subject: Some(format!("Order {i}")),
            task_id: format!("task-{i}"),
            outcome: OutcomeKind::Created,
            reason: None,
            order: Some(NewOrder {
                client_id: "C-1".into(),
                client_name: "Acme".into(),
                lines: vec![OrderLine {
                    sku: "SKU-1".into(),
                    quantity: 3,
                    origin: "body".into(),
                }],
            }),
            reply: None,
            task: None,
        })
        .collect();
    for chunk in recordings.chunks(50) {
        let refs: Vec<&Recording> = chunk.iter().collect();
        for r in store.record_batch(&refs).await {
            r.expect("recorded");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_dispatch_one_postgres_outbox_and_send_no_row_twice() {
    let pg = PostgresServer::start();
    let url = pg.create_database();
    let erp = ErpServer::start();
    let (a, b) = (
        Workspace::with_store(url.clone()),
        Workspace::with_store(url.clone()),
    );
    let mut replicas = Vec::new();
    for ws in [&a, &b] {
        let config = ws.config_with(1, 3, &erp_section(&erp, 8));
        replicas.push(start(&config).await.0);
    }
    // Both are running when the rows appear (written by a third process, as it were).
    recorded_orders(&url, 400).await;
    wait_for(Duration::from_secs(60), "every order applied", || async {
        erp.applied().len() == 400
    })
    .await;
    common::stop_replicas_counting(&replicas, "outbox", 400).await;
    assert_ledger(&a, &erp, 400).await;
    assert!(
        erp.requests_by_key().values().all(|n| *n == 1),
        "no row sent twice: {:?}",
        erp.requests_by_key().values().filter(|n| **n > 1).count()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delivery_failing_again_and_again_is_a_poison_candidate_in_diagnostics() {
    let ws = Workspace::new();
    let erp = ErpServer::start();
    erp.set_mode(ErpMode::ServerError);
    let section = erp_section(&erp, 50).replace("max_backoff_ms = 200", "max_backoff_ms = 100");
    let config = ws.config_with(2, 3, &format!("{section}{CONTROL}"));
    ws.deliver(
        "stuck",
        &order_mail("stuck", "purchasing@acme.example", &[("SKU-4", 1)]),
    );
    let (runtime, app) = start(&config).await;
    wait_for(Duration::from_secs(30), "three failed attempts", || async {
        outbox_stats(&runtime).await.failed >= 3
    })
    .await;
    let findings = runtime.diagnostics().await.findings;
    let status = call(&app, "GET", "/status", READ, None).await.json();
    runtime.shutdown().await;
    let poison = findings
        .iter()
        .find(|f| f.kind == "poison_candidate" && f.subject == "outbox")
        .unwrap_or_else(|| panic!("no outbox poison candidate: {findings:?}"));
    assert!(poison.detail.contains("the ERP answered 500"), "{poison:?}");
    let outbox = &status["queues"]["outbox"];
    assert!(outbox["failed"].as_u64() >= Some(3), "{status}");
    assert!(outbox["oldest_pending_age_ms"].is_u64(), "{status}");
}

/// The CLI against a running bot's control plane: list the outbox's dead letters, replay one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_lists_and_replays_the_outboxs_dead_letters() {
    let ws = Workspace::new();
    let erp = ErpServer::start();
    erp.set_mode(ErpMode::BadRequest);
    let control = "\n[control]\nenabled = true\nbind = \"127.0.0.1:0\"\nread_tokens = [\"read-token-1-7c1f0e9b2d4a6f835e21\"]\nadmin_tokens = [\"admin-token-1-4b8e2d6f0a3c9e17b5d2\"]\n";
    let config = ws.config_with(2, 3, &format!("{}{control}", erp_section(&erp, 8)));
    ws.deliver(
        "cli",
        &order_mail("cli", "purchasing@acme.example", &[("SKU-5", 1)]),
    );
    let (mut bot, addr) =
        common::plane::spawn_with_control(&config, &[("PLBA_TEST_ERP_AUTH", "Bearer erp-token-7")]);
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mail-order-bot"))
            .args(args)
            .arg("--config")
            .arg(&config)
            .args(["--url", &format!("http://{addr}")])
            .env("PLBA_TEST_ERP_AUTH", "Bearer erp-token-7")
            .output()
            .expect("the CLI");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let mut listed = String::new();
    wait_for(
        Duration::from_secs(30),
        "the dead letter, by the CLI",
        || {
            let (code, out, err) = cli(&[
                "dead-letters",
                "list",
                "--queue",
                "outbox",
                "--format",
                "json",
            ]);
            assert_eq!(code, Some(0), "{err}");
            listed = out;
            let found = listed.contains("unknown article");
            async move { found }
        },
    )
    .await;
    let items: serde_json::Value = serde_json::from_str(&listed).expect("JSON");
    let id = items[0]["id"].as_str().expect("id").to_owned();
    assert!(items[0]["reason"]
        .as_str()
        .unwrap_or_default()
        .contains("400"));
    erp.set_mode(ErpMode::Normal);
    let (code, out, err) = cli(&["dead-letters", "replay", "--queue", "outbox", &id]);
    assert_eq!(code, Some(0), "{out}{err}");
    wait_for(Duration::from_secs(30), "the replayed delivery", || async {
        erp.applied().len() == 1
    })
    .await;
    let (code, out, _) = cli(&["dead-letters", "list", "--queue", "outbox"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("no dead letters in outbox"), "{out}");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(bot.id()).expect("pid")),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = bot.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_previews_and_runs_an_outcome_replay() {
    let ws = Workspace::new();
    let control = "\n[control]\nenabled = true\nbind = \"127.0.0.1:0\"\nread_tokens = [\"read-token-1-7c1f0e9b2d4a6f835e21\"]\nadmin_tokens = [\"admin-token-1-4b8e2d6f0a3c9e17b5d2\"]\n";
    let config = ws.config_with(2, 3, control);
    ws.deliver(
        "stranger",
        &order_mail("stranger", "someone@unknown.example", &[("SKU-5", 1)]),
    );
    let (mut bot, addr) = common::plane::spawn_with_control(&config, &[]);
    wait_for(Duration::from_secs(30), "the outcome", || async {
        common::orders_so_far(&ws).await == 0
            && ws
                .store()
                .await
                .outcomes()
                .await
                .map(|o| o.len() == 1)
                .unwrap_or(false)
    })
    .await;
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mail-order-bot"))
            .args(["outcomes", "replay", "--config"])
            .arg(&config)
            .args(["--url", &format!("http://{addr}")])
            .args(args)
            .output()
            .expect("the CLI");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = cli(&["--kind", "unknown_client", "--dry-run"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("would run 1 message recorded as unknown_client"),
        "{out}"
    );
    assert!(out.contains("someone@unknown.example"), "{out}");
    let (code, out, err) = cli(&["--kind", "created"]);
    assert_ne!(code, Some(0), "{out}");
    assert!(err.contains("cannot be replayed"), "{err}");
    let (code, out, err) = cli(&[
        "--kind",
        "unknown_client",
        "--sender",
        "someone@unknown.example",
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("running 1 message"), "{out}");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(bot.id()).expect("pid")),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = bot.wait();
}

/// One mail followed through its whole flow in the JSON logs: its first attempt fails (the
/// database refuses the order) and it is dead-lettered; an operator lifts the fault and
/// replays it; the order is made and its ERP delivery sent. Every step logs the task with
/// the mail's correlation id, the replay names the dead letter as its cause, and the ERP
/// effect names the mail's task as its cause, so the chain can be found from one id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mail_is_followed_through_a_dead_letter_its_replay_and_its_effect() {
    let ws = Workspace::new();
    let erp = ErpServer::start();
    let config = ws.config_with(2, 2, &format!("{}{CONTROL}", erp_section(&erp, 8)));
    let text = std::fs::read_to_string(&config).expect("config").replacen(
        "log = \"info\"",
        "log = \"info,runtime_core=debug\"\nlog_format = \"json\"",
        1,
    );
    assert!(text.contains("log_format = \"json\""));
    std::fs::write(&config, text).expect("config");
    ws.store().await;
    let db = common::plane::refuse_sku_666(&ws).await;
    ws.deliver(
        "chain",
        &order_mail("chain", "purchasing@acme.example", &[("SKU-666", 2)]),
    );
    let mail = "maildir:inbox:chain";
    let logs = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let (mut bot, addr) = common::plane::spawn_with_control_logs(
        &config,
        &[("PLBA_TEST_ERP_AUTH", "Bearer erp-token-7")],
        Some(Arc::clone(&logs)),
    );
    let lines = || logs.lock().expect("logs").clone();
    wait_for(Duration::from_secs(60), "the dead letter", || async {
        lines().iter().any(|l| l.contains("task dead-lettered"))
    })
    .await;
    sqlx::query("DROP TRIGGER erp_down")
        .execute(&db)
        .await
        .expect("the fault lifted");
    let replayed = reqwest::Client::new()
        .post(format!(
            "http://{addr}/queues/orders/dead-letters/maildir%3Ainbox%3Achain/replay"
        ))
        .bearer_auth(ADMIN.expect("admin"))
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .expect("replay");
    assert!(
        replayed.status().is_success(),
        "{:?}",
        replayed.text().await
    );
    wait_for(Duration::from_secs(60), "the order at the ERP", || async {
        erp.applied().len() == 1
    })
    .await;
    wait_for(
        Duration::from_secs(30),
        "the effect's completion",
        || async {
            lines()
                .iter()
                .any(|l| l.contains("task completed") && l.contains("outbox:"))
        },
    )
    .await;
    let _ = bot.kill();
    let _ = bot.wait();

    // Every line of the flow, by its correlation id (an event's own fields).
    let flow: Vec<serde_json::Value> = lines()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["fields"]["correlation_id"] == mail)
        .collect();
    let step = |message: &str, task: &str, cause: &str| {
        flow.iter().any(|e| {
            e["message"] == message
                && e["fields"]["task"]
                    .as_str()
                    .is_some_and(|t| t.starts_with(task))
                && e["fields"]["causation_id"] == cause
                && e["fields"]["source"].is_string()
        })
    };
    let messages: Vec<String> = flow
        .iter()
        .map(|e| {
            format!(
                "{} {} <- {}",
                e["message"], e["fields"]["task"], e["fields"]["causation_id"]
            )
        })
        .collect();
    for (message, task, cause) in [
        ("published", mail, ""),
        ("leased", mail, ""),
        ("attempt failed; retry scheduled", mail, ""),
        ("task dead-lettered; left unread at its source", mail, ""),
        ("leased", mail, mail),
        ("task completed", mail, mail),
        ("acknowledged", mail, mail),
        ("leased", "outbox:", mail),
        ("task completed", "outbox:", mail),
    ] {
        assert!(
            step(message, task, cause),
            "no {message:?} of {task} caused by {cause:?} in the flow:\n{}",
            messages.join("\n")
        );
    }
    assert!(
        lines().iter().any(|l| l.contains("\"pointer\"")),
        "the task's pointer is in its lines"
    );
}
