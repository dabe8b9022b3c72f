//! Configuration overrides from a database table, on SQLite and on a private PostgreSQL:
//! file < database < environment; `config set` validates before it writes; a running bot
//! applies a valid change live, and refuses an invalid one as a whole (reported in
//! `/status` and a metric) while the configuration before it stays in force.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{wait_for, FaultyBot, Workspace};
use mail_order_bot::compose::{
    build_runtime, config_store_config, control_config, load_layered_config, watch_config_store,
};
use plba_testkit::PostgresServer;
use runtime_adapters::config_store::SqlConfigStore;
use runtime_adapters::control::ControlServer;
use runtime_core::RuntimeManager;

fn cli(path: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mail-order-bot"));
    command.arg("config").args(args).arg("--config").arg(path);
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output().expect("mail-order-bot config");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn workers(status: &runtime_core::RuntimeStatus) -> usize {
    status
        .pools
        .iter()
        .find(|p| p.name == "orders")
        .map(|p| p.workers)
        .expect("the orders pool")
}

async fn scenario(store_url: &str) {
    let ws = Workspace::new();
    let port = plba_testkit::free_port();
    let path = ws.config_with(
        2,
        3,
        &format!("\n[config_store]\nurl = \"{store_url}\"\npoll_interval_ms = 100\n\n[control]\nenabled = true\nbind = \"127.0.0.1:{port}\"\nread_tokens = [\"read-token-1-7c1f0e9b2d4a6f835e21\"]\n"),
    );

    // file < database < environment
    assert_eq!(cli(&path, &["get", "pools.orders.workers"], &[]).1, "2");
    let (code, out, err) = cli(&path, &["set", "pools.orders.workers", "3"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(cli(&path, &["get", "pools.orders.workers"], &[]).1, "3");
    let env = [("PLBA__POOLS__ORDERS__WORKERS", "4")];
    assert_eq!(cli(&path, &["get", "pools.orders.workers"], &env).1, "4");

    // `config set` validates the whole configuration first, and writes nothing when wrong.
    for bad in ["\"many\"", "-1", "not toml"] {
        let (code, _, err) = cli(&path, &["set", "pools.orders.workers", bad], &[]);
        assert_eq!(code, 2, "{bad}: {err}");
        assert!(err.contains("pools.orders.workers"), "{bad}: {err}");
        assert!(err.contains("nothing was written"), "{err}");
    }
    let (code, err_out, err) = cli(&path, &["set", "pools.orders.wokers", "3"], &[]);
    assert_eq!(code, 2, "a misspelt key: {err_out}{err}");
    assert!(
        err.contains("pools.orders.wokers: may not be set from the database"),
        "{err}"
    );
    // Only tuning keys: a row that points the IMAP host elsewhere (the bot would log in
    // there with the real password), sets a token, a bind address or a path is refused.
    for (key, value) in [
        ("sources.inbox.host", "\"imap.attacker.example\""),
        ("sources.inbox.path", "\"/tmp/elsewhere\""),
        (
            "control.admin_tokens",
            "[\"a-token-of-the-attackers-choice-0123456789\"]",
        ),
        ("control.bind", "\"0.0.0.0:8080\""),
        (
            "apps.mail_order_bot.store_url",
            "\"sqlite:///tmp/other.db\"",
        ),
        ("apps.mail_order_bot.seed_samples_into", "\"/tmp/x\""),
    ] {
        let (code, _, err) = cli(&path, &["set", key, value], &[]);
        assert_eq!(code, 2, "{key}: {err}");
        assert!(
            err.contains(&format!("{key}: may not be set from the database")),
            "{err}"
        );
    }
    let (_, listed, _) = cli(&path, &["list"], &[]);
    assert!(
        listed.starts_with("pools.orders.workers = 3")
            && listed.ends_with(", config_version 1)")
            && listed.lines().count() == 1,
        "{listed}"
    );

    // A running bot starts with the merged configuration and follows the table.
    let (manager, store) = load_layered_config(Some(&path), Some(HashMap::new()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let manager = Arc::new(manager);
    let store = store.expect("the store");
    let mut runtime = build_runtime(Arc::clone(&manager), FaultyBot::module(), None)
        .await
        .expect("runtime");
    runtime.start().expect("start");
    let runtime = Arc::new(runtime);
    let watcher = watch_config_store(&runtime, Arc::clone(&store));
    let control = ControlServer::start(
        Arc::clone(&runtime),
        &control_config(manager.root().get("control")).expect("control"),
    )
    .await
    .expect("control plane");
    let status = runtime.status().await;
    assert_eq!(workers(&status), 3, "the database's value");
    assert!(
        status
            .config
            .overrides
            .as_deref()
            .is_some_and(|o| o.starts_with("database ")),
        "{:?}",
        status.config
    );

    // A valid change, made by another process, is applied live.
    assert_eq!(cli(&path, &["set", "pools.orders.workers", "5"], &[]).0, 0);
    wait_for(Duration::from_secs(30), "5 workers", || {
        let runtime = Arc::clone(&runtime);
        async move { workers(&runtime.status().await) == 5 }
    })
    .await;

    // An invalid change written straight into the table is refused as a whole.
    let raw = SqlConfigStore::open(
        &config_store_config(&manager.root()["config_store"]).expect("section"),
    )
    .await
    .expect("store");
    raw.set("pools.orders.workers", "-1").await.expect("write");
    raw.set("runtime.log", "\"debug\"").await.expect("write");
    wait_for(Duration::from_secs(30), "the change refused", || {
        let runtime = Arc::clone(&runtime);
        async move { runtime.status().await.config.rejected.is_some() }
    })
    .await;
    let status = runtime.status().await;
    let rejected = status.config.rejected.clone().expect("rejected");
    assert!(
        rejected
            .problems
            .iter()
            .any(|p| p.starts_with("pools.orders.workers")),
        "{rejected:?}"
    );
    assert_eq!(
        workers(&status),
        5,
        "the configuration before stays in force"
    );
    assert_eq!(
        runtime_core::config::lookup(&runtime.config().root(), "runtime.log")
            .and_then(|v| v.as_str()),
        Some("info"),
        "nothing of the refused change was applied"
    );
    let metrics = runtime.metrics_text().await;
    assert!(
        metrics.contains("plba_config_rejected_total 1"),
        "{metrics}"
    );
    // What an operator sees: GET /status.
    let seen: serde_json::Value = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/status"))
        .bearer_auth("read-token-1-7c1f0e9b2d4a6f835e21")
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .expect("GET /status")
        .json()
        .await
        .expect("JSON");
    assert!(
        seen["config"]["rejected"]["problems"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p
                .as_str()
                .is_some_and(|p| p.starts_with("pools.orders.workers")))),
        "{seen}"
    );
    assert!(
        seen["config"]["overrides"]
            .as_str()
            .is_some_and(|o| o.contains("(version ")),
        "{seen}"
    );

    // Fixing it applies the whole change and clears the report.
    raw.set("pools.orders.workers", "2").await.expect("write");
    wait_for(Duration::from_secs(30), "the fixed change applied", || {
        let runtime = Arc::clone(&runtime);
        async move {
            let status = runtime.status().await;
            status.config.rejected.is_none() && workers(&status) == 2
        }
    })
    .await;
    assert_eq!(
        runtime_core::config::lookup(&runtime.config().root(), "runtime.log")
            .and_then(|v| v.as_str()),
        Some("debug")
    );
    watcher.abort();
    control.stop().await;
    shutdown(runtime).await;
}

async fn shutdown(runtime: Arc<RuntimeManager>) {
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overrides_from_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    scenario(&format!(
        "sqlite://{}",
        dir.path().join("config.db").display()
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overrides_from_postgres() {
    let server = PostgresServer::start();
    scenario(&server.create_database()).await;
}
