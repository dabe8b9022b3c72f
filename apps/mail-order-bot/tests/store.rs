//! The store's client table, on SQLite and on a private PostgreSQL: what an operator inserts
//! there is what the bot resolves senders with (`clients_from_store = true`).

use mail_order_bot::domain::clients::ClientDirectory;
use mail_order_bot::domain::message::PartKind;
use mail_order_bot::domain::store::OrderStore;
use plba_testkit::PostgresServer;

async fn clients_table(url: &str) {
    let store = OrderStore::open(url).await.expect("open");
    assert!(store.clients().await.expect("empty table").is_empty());
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(url).await.expect("connect");
    sqlx::query(
        "INSERT INTO clients (id, name, addresses, domains, attachments, read_body)
         VALUES ('C-1', 'Acme', 'a@acme.example; b@acme.example', '', NULL, 1),
                ('C-2', 'Nordic', '', 'nordic.example', 'csv;xlsx', 0)",
    )
    .execute(&pool)
    .await
    .expect("insert");
    let clients = store.clients().await.expect("clients");
    assert_eq!(clients.len(), 2);
    assert_eq!(clients[0].addresses, ["a@acme.example", "b@acme.example"]);
    assert_eq!(
        clients[1].attachments,
        Some(vec![PartKind::Csv, PartKind::Xlsx])
    );
    assert!(ClientDirectory::problems(&clients, "clients").is_empty());
    let directory = ClientDirectory::new(&clients);
    let nordic = directory.resolve("x@nordic.example").expect("by domain");
    assert!(!nordic.reads(PartKind::Body) && nordic.reads(PartKind::Csv));
    assert_eq!(
        directory.resolve("b@acme.example").map(|c| c.id.as_str()),
        Some("C-1")
    );
}

#[tokio::test]
async fn clients_from_the_sqlite_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    clients_table(&format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("o.db").display()
    ))
    .await;
}

#[tokio::test]
async fn clients_from_the_postgres_table() {
    let server = PostgresServer::start();
    clients_table(&server.create_database()).await;
}
