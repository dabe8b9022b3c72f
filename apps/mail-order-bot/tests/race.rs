//! Two workers (here: two stores, as two processes would have) recording the same message at
//! the same moment: the database's unique identity lets exactly one create the order; the
//! other sees a duplicate. On SQLite and on a private PostgreSQL.

use std::sync::Arc;

use mail_order_bot::domain::clients::ClientEntry;
use mail_order_bot::domain::message::{read_mail, MailLimits};
use mail_order_bot::domain::store::{OrderStore, Recorded};
use mail_order_bot::module::{BotConfig, OrderHandler};
use plba_testkit::PostgresServer;
use tokio::sync::Barrier;

const ROUNDS: usize = 25;

fn mail(n: usize) -> String {
    format!(
        "From: buyer@acme.example\r\nMessage-ID: <race-{n}@acme.example>\r\nSubject: PO {n}\r\n\r\nSKU-{n} x 2\r\nSKU-9 x 1\r\n"
    )
}

async fn race(url: &str) {
    let clients = vec![ClientEntry {
        id: "C-1".into(),
        name: "Acme".into(),
        addresses: vec![],
        domains: vec!["acme.example".into()],
        attachments: None,
        read_body: true,
        allow_unauthenticated: false,
    }];
    let cfg: BotConfig = serde_json::from_value(
        serde_json::json!({ "store_url": url, "sender_auth": { "mode": "off" } }),
    )
    .expect("config");
    // Each worker has its own connection pool, as two processes would.
    let mut workers: Vec<(OrderHandler, OrderStore)> = Vec::new();
    for _ in 0..2 {
        let store = OrderStore::open(url).await.expect("open");
        workers.push((OrderHandler::new(store.clone(), &cfg, &clients), store));
    }
    for n in 0..ROUNDS {
        let raw = mail(n);
        let barrier = Arc::new(Barrier::new(2));
        let mut tasks = Vec::new();
        for (w, (handler, store)) in workers.iter().enumerate() {
            let (handler, store, barrier, raw) =
                (handler.clone(), store.clone(), barrier.clone(), raw.clone());
            tasks.push(tokio::spawn(async move {
                let facts = read_mail(raw.as_bytes(), &MailLimits::default());
                let rec = handler.decide(&facts, &format!("worker-{w}"));
                barrier.wait().await;
                store.record(&rec).await.expect("record")
            }));
        }
        let mut created = 0;
        let mut duplicates = 0;
        for t in tasks {
            match t.await.expect("join") {
                Recorded::New { order_id: Some(_) } => created += 1,
                Recorded::Duplicate { earlier, .. } if earlier == "created" => duplicates += 1,
                other => panic!("round {n}: unexpected {other:?}"),
            }
        }
        assert_eq!((created, duplicates), (1, 1), "round {n}");
    }
    let store = &workers[0].1;
    let orders = store.orders_after(0).await.expect("orders");
    assert_eq!(orders.len(), ROUNDS, "exactly one order per message");
    assert!(orders.iter().all(|o| o.lines.len() == 2));
    let outcomes = store.outcomes().await.expect("outcomes");
    assert_eq!(outcomes.len(), ROUNDS);
    assert!(outcomes.iter().all(|o| o.deliveries == 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_one_message_one_order_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    race(&format!(
        "sqlite://{}",
        dir.path().join("orders.db").display()
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_one_message_one_order_on_postgres() {
    let server = PostgresServer::start();
    race(&server.create_database()).await;
}
