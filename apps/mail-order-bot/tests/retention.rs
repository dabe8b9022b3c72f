//! The retention sweep (`[retention]`), run by a schedule source's tasks: it removes
//! exactly what is older than each limit, and nothing that keeps work from being done
//! twice (a pending effect, the outcome of a kept order).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::{order_mail, wait_for, Workspace};
use mail_order_bot::compose::{build_runtime, load_config};
use mail_order_bot::module::MailOrderModule;
use plba_testkit::ErpServer;

const DAY_MS: i64 = 24 * 60 * 60 * 1000;

fn days_ago(days: i64) -> String {
    (chrono::Utc::now() - chrono::Duration::days(days))
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

async fn count(db: &sqlx::SqlitePool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(db).await.expect(sql)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sweep_removes_exactly_what_is_older_than_each_limit() {
    let ws = Workspace::new();
    let erp = ErpServer::start();
    for i in 0..6 {
        ws.deliver(
            &format!("o{i}"),
            &order_mail(&format!("o{i}"), "purchasing@acme.example", &[("SKU-1", 1)]),
        );
    }
    for i in 0..4 {
        ws.deliver(
            &format!("u{i}"),
            &order_mail(&format!("u{i}"), "x@unknown.example", &[("SKU-1", 1)]),
        );
    }
    let extra = format!(
        "\n[apps.mail_order_bot.erp]\nurl = \"{}\"\ntimeout_ms = 1000\n\n[retention]\noutcomes_days = 30\noutbox_days = 30\ndead_letters_days = 30\norders_days = 365\n",
        erp.url()
    );
    let config = ws.config_with(2, 3, &extra);
    let runtime = {
        let manager = Arc::new(load_config(Some(&config), Some(HashMap::new())).expect("config"));
        let mut runtime = build_runtime(manager, Arc::new(MailOrderModule), None)
            .await
            .expect("runtime");
        runtime.start().expect("start");
        runtime
    };
    wait_for(Duration::from_secs(30), "every order delivered", || async {
        erp.applied().len() == 6
            && runtime
                .queue("outbox")
                .expect("outbox")
                .stats()
                .await
                .is_ok_and(|s| s.processed == 6)
    })
    .await;
    runtime.shutdown().await;

    // Age the records.
    let db = sqlx::SqlitePool::connect(&ws.store_url())
        .await
        .expect("db");
    let now_ms = chrono::Utc::now().timestamp_millis();
    let exec = |sql: String| {
        let db = db.clone();
        async move {
            sqlx::query(&sql).execute(&db).await.expect(&sql);
        }
    };
    // Two unknown-client outcomes 40 days old (removed), one 20 days old (kept).
    exec(format!("UPDATE message_outcomes SET recorded_at = '{}' WHERE message_identity IN ('mid:u0@test.example', 'mid:u1@test.example')", days_ago(40))).await;
    exec(format!("UPDATE message_outcomes SET recorded_at = '{}' WHERE message_identity = 'mid:u2@test.example'", days_ago(20))).await;
    // Order o0 is 400 days old (removed with its lines, outcome and effect); o1 is 100 days
    // old: its outcome is older than outcomes_days but stays with its order.
    exec(format!(
        "UPDATE orders SET created_at = '{}' WHERE message_identity = 'mid:o0@test.example'",
        days_ago(400)
    ))
    .await;
    exec(format!("UPDATE message_outcomes SET recorded_at = '{}' WHERE message_identity IN ('mid:o0@test.example', 'mid:o1@test.example')", days_ago(400))).await;
    exec(format!(
        "UPDATE orders SET created_at = '{}' WHERE message_identity = 'mid:o1@test.example'",
        days_ago(100)
    ))
    .await;
    // Effects: o2's and o3's delivered 40 days ago (removed); o4's 40 days old but still
    // pending (kept); o5's a dead letter 40 days old (purged), o1's delivered yesterday.
    exec(format!("UPDATE outbox SET settled_ms = {} WHERE message_identity IN ('mid:o2@test.example', 'mid:o3@test.example')", now_ms - 40 * DAY_MS)).await;
    exec(format!("UPDATE outbox SET state = 'pending', settled_ms = NULL, created_ms = {0}, due_ms = {0} + 1000 * {1} WHERE message_identity = 'mid:o4@test.example'", now_ms - 40 * DAY_MS, DAY_MS)).await;
    exec(format!("UPDATE outbox SET state = 'dead', last_error = 'refused', settled_ms = {} WHERE message_identity = 'mid:o5@test.example'", now_ms - 40 * DAY_MS)).await;
    exec(format!(
        "UPDATE outbox SET settled_ms = {} WHERE message_identity = 'mid:o1@test.example'",
        now_ms - DAY_MS
    ))
    .await;
    assert_eq!(count(&db, "SELECT COUNT(*) FROM outbox").await, 6);

    // A schedule fires the sweep every second.
    let text = std::fs::read_to_string(&config).expect("config")
        + "\n[sources.retention]\ntype = \"schedule\"\ncron = \"* * * * * *\"\npool = \"orders\"\nkind = \"plba.retention\"\n";
    std::fs::write(&config, text).expect("config");
    let manager = Arc::new(load_config(Some(&config), Some(HashMap::new())).expect("config"));
    let mut runtime = build_runtime(manager, Arc::new(MailOrderModule), None)
        .await
        .expect("runtime");
    runtime.start().expect("start");
    wait_for(Duration::from_secs(30), "a sweep", || async {
        runtime.retention().last().is_some()
    })
    .await;
    let report = runtime.retention().last().expect("report");
    let metrics = runtime.metrics_text().await;
    runtime.shutdown().await;
    let removed: HashMap<String, u64> = report.removed.iter().cloned().collect();
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(removed["orders"], 1, "{report:?}");
    assert_eq!(removed["outcomes"], 2, "{report:?}");
    assert_eq!(removed["outbox"], 2, "{report:?}");
    assert_eq!(removed["dead_letters:outbox"], 1, "{report:?}");
    assert!(
        metrics.contains("plba_retention_removed_total{what=\"orders\"} 1"),
        "{metrics}"
    );

    let identities = |table: &'static str| {
        let db = db.clone();
        async move {
            let mut ids: Vec<String> =
                sqlx::query_scalar(&format!("SELECT message_identity FROM {table}"))
                    .fetch_all(&db)
                    .await
                    .expect(table);
            ids.sort();
            ids
        }
    };
    let mid = |ids: &[&str]| -> Vec<String> {
        ids.iter()
            .map(|i| format!("mid:{i}@test.example"))
            .collect()
    };
    assert_eq!(
        identities("orders").await,
        mid(&["o1", "o2", "o3", "o4", "o5"])
    );
    assert_eq!(
        identities("message_outcomes").await,
        mid(&["o1", "o2", "o3", "o4", "o5", "u2", "u3"])
    );
    assert_eq!(identities("outbox").await, mid(&["o1", "o4"]));
    assert_eq!(count(&db, "SELECT COUNT(*) FROM order_lines").await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_schedule_source_the_sweep_runs_on_its_own_schedule_unless_it_is_off() {
    let start = |extra: &str| {
        let ws = Workspace::new();
        let config = ws.config_with(2, 3, extra);
        async move {
            let manager =
                Arc::new(load_config(Some(&config), Some(HashMap::new())).expect("config"));
            let mut runtime = build_runtime(manager, Arc::new(MailOrderModule), None)
                .await
                .expect("runtime");
            runtime.start().expect("start");
            (ws, runtime)
        }
    };
    // A configuration that says nothing of a schedule gets the daily one; here every
    // second, to see it run.
    let (_ws, runtime) = start("\n[retention]\nschedule = \"* * * * * *\"\n").await;
    let sources: Vec<String> = runtime.status().await.sources.into_keys().collect();
    assert!(sources.contains(&"retention".to_owned()), "{sources:?}");
    wait_for(Duration::from_secs(30), "a sweep", || async {
        runtime.retention().last().is_some()
    })
    .await;
    runtime.shutdown().await;

    let (_ws, runtime) = start("").await;
    let status = runtime.status().await;
    assert!(
        status.sources.contains_key("retention"),
        "the default schedule: {:?}",
        status.sources.keys().collect::<Vec<_>>()
    );
    runtime.shutdown().await;

    let (_ws, runtime) = start("\n[retention]\nschedule = \"off\"\n").await;
    let status = runtime.status().await;
    assert!(
        !status.sources.contains_key("retention"),
        "off: no sweep of its own"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(runtime.retention().last().is_none());
    runtime.shutdown().await;
}
