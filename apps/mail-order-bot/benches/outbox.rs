//! Outbox dispatch to the local ERP (the testkit's, on loopback): deliveries/s of the bot's
//! `outbox` pool on SQLite and on PostgreSQL, beside a plain loop of HTTP POSTs of the same
//! bodies to the same server in the same run (the baseline; the target is at least 0.5x of
//! it, and 2,000 deliveries/s).
//!
//! The bot runs on a configuration written from the README's ERP section: an `erp` URL and
//! nothing tuned (the `outbox` pool has the platform's defaults). Each run checks the
//! ledger: every order applied once, one request per order.
//!
//! Knob: `PLBA_BENCH_OUTBOX_ORDERS` (5000).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mail_order_bot::compose::{build_runtime, load_config};
use mail_order_bot::domain::extract::OrderLine;
use mail_order_bot::domain::store::{Effects, NewOrder, OrderStore, Recording};
use mail_order_bot::domain::OutcomeKind;
use mail_order_bot::module::MailOrderModule;
use plba_testkit::{ErpServer, PostgresServer};

fn recordings(n: usize) -> Vec<Recording> {
    (0..n)
        .map(|i| Recording {
            identity: format!("mid:bench-{i}@test.example"),
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
                lines: (1..=3)
                    .map(|l| OrderLine {
                        sku: format!("SKU-{l}"),
                        quantity: l,
                        origin: "body".into(),
                    })
                    .collect(),
            }),
            reply: None,
            task: None,
        })
        .collect()
}

/// The baseline: the same bodies POSTed one after another with one client.
async fn plain_loop(erp: &ErpServer, n: usize) -> f64 {
    let client = reqwest::Client::new();
    let body = serde_json::json!({
        "version": 1, "number": 1, "client": {"id": "C-1", "name": "Acme"},
        "sender": "purchasing@acme.example", "subject": "Order",
        "message_identity": "mid:x", "created_at": "2026-01-01T00:00:00.000Z",
        "lines": [{"line": 1, "sku": "SKU-1", "quantity": 1, "origin": "body"},
                  {"line": 2, "sku": "SKU-2", "quantity": 2, "origin": "body"},
                  {"line": 3, "sku": "SKU-3", "quantity": 3, "origin": "body"}],
    });
    let started = Instant::now();
    for i in 0..n {
        let answer = client
            .post(erp.url())
            .header("content-type", "application/json")
            .header("idempotency-key", format!("baseline-{i}"))
            .body(body.to_string())
            .send()
            .await
            .expect("POST");
        assert!(answer.status().is_success());
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// The bot's outbox on the store at `url`, holding `n` orders to deliver.
async fn outbox(erp: &ErpServer, url: &str, dir: &std::path::Path, n: usize) -> f64 {
    let store = OrderStore::open(url)
        .await
        .expect("store")
        .with_effects(Effects {
            erp: true,
            ..Effects::default()
        });
    let recs = recordings(n);
    for chunk in recs.chunks(256) {
        let refs: Vec<&Recording> = chunk.iter().collect();
        for r in store.record_batch(&refs).await {
            r.expect("recorded");
        }
    }
    let maildir = dir.join("maildir");
    for sub in ["tmp", "new", "cur"] {
        std::fs::create_dir_all(maildir.join(sub)).expect("maildir");
    }
    // From the README: the ERP's URL, nothing tuned.
    let config = dir.join("bench.toml");
    std::fs::write(
        &config,
        format!(
            "[runtime]\nlog = \"warn\"\n\n[sources.inbox]\ntype = \"maildir\"\npath = \"{}\"\npool = \"orders\"\n\n\
             [apps.mail_order_bot]\nstore_url = \"{url}\"\nsender_auth = {{ mode = \"off\" }}\n\n[apps.mail_order_bot.erp]\nurl = \"{}\"\n",
            maildir.display(),
            erp.url()
        ),
    )
    .expect("config");
    let config = Arc::new(load_config(Some(&config), Some(HashMap::new())).expect("config"));
    let mut runtime = build_runtime(config, Arc::new(MailOrderModule), None)
        .await
        .expect("runtime");
    let started = Instant::now();
    runtime.start().expect("start");
    let queue = Arc::clone(runtime.queue("outbox").expect("the outbox pool"));
    loop {
        let stats = queue.stats().await.expect("stats");
        if stats.processed as usize == n {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "not drained: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    runtime.shutdown().await;
    rate
}

fn main() {
    let n = plba_testkit::env_number("PLBA_BENCH_OUTBOX_ORDERS", 5000) as usize;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let pg = PostgresServer::start();
        for backend in ["sqlite", "postgres"] {
            let erp = ErpServer::start();
            let dir = tempfile::tempdir().expect("tempdir");
            let baseline = plain_loop(&erp, n).await;
            let url = match backend {
                "sqlite" => format!("sqlite://{}", dir.path().join("orders.db").display()),
                _ => pg.create_database(),
            };
            let rate = outbox(&erp, &url, dir.path(), n).await;
            let applied = erp.applied();
            let orders = applied.keys().filter(|k| k.starts_with("order-")).count();
            assert_eq!(orders, n, "every order applied");
            let by_key = erp.requests_by_key();
            assert!(
                by_key
                    .iter()
                    .filter(|(k, _)| k.starts_with("order-"))
                    .all(|(_, c)| *c == 1),
                "one request per order"
            );
            println!(
                "outbox {backend:<8} {n} orders: {rate:>7.0} deliveries/s | plain POST loop {baseline:>7.0}/s | ratio {:.2}",
                rate / baseline
            );
        }
    });
}
