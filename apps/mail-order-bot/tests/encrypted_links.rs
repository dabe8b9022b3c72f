//! The bot over encrypted links only: its queue on `rediss://` or `amqps://`, its orders in a
//! PostgreSQL that admits TLS alone, checked with `sslmode=verify-full` against a private CA.
//! Every link is rustls; a certificate that does not check out is refused.

mod common;

use common::{assert_exactly_once, fill_mailbox, unseen, BotProcess, Workspace};
use mail_order_bot::domain::store::OrderStore;
use plba_testkit::{make_certificates, PostgresServer, RabbitServer, RedisServer};

/// A database of `pg` reached with `sslmode=verify-full`, trusting `ca`.
fn verify_full(pg: &PostgresServer, ca: &std::path::Path) -> String {
    let url = pg.create_database();
    format!("{url}?sslmode=verify-full&sslrootcert={}", ca.display())
}

/// Adds `ca_file` to the `[queue]` section of a config written by the workspace.
fn trusting(config: &std::path::Path, url: &str, ca: &std::path::Path) {
    let text = std::fs::read_to_string(config).expect("read config");
    let line = format!("url = \"{url}\"");
    assert!(text.contains(&line), "{text}");
    let text = text.replace(&line, &format!("{line}\nca_file = \"{}\"", ca.display()));
    std::fs::write(config, text).expect("write config");
}

/// Runs the bot once over the workspace's mailbox: every order once, every mail seen.
async fn drains_exactly_once(ws: &Workspace, config: &std::path::Path) {
    let expected = fill_mailbox(ws, 20);
    let (code, _, stderr) = BotProcess::spawn(ws, config, true).finish();
    assert_eq!(code, 0, "the bot failed: {stderr}");
    assert_exactly_once(ws, &expected).await;
    assert_eq!(unseen(ws), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bot_on_rediss_and_a_tls_only_postgres_with_verify_full_creates_every_order_once() {
    let redis = RedisServer::start_tls();
    let pg = PostgresServer::start_tls();
    let ws = Workspace::with_store(verify_full(&pg, &pg.ca_file()));
    let config = ws.config_redis(&redis.tls_url(), 2, 5000, "");
    trusting(&config, &redis.tls_url(), &redis.ca_file());
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_mail-order-bot"))
        .arg("check-config")
        .arg("--config")
        .arg(&config)
        .output()
        .expect("check-config");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    drains_exactly_once(&ws, &config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_only_postgres_refuses_a_plain_link_and_verify_full_refuses_an_unknown_ca() {
    let pg = PostgresServer::start_tls();
    let trusted = verify_full(&pg, &pg.ca_file());
    OrderStore::open(&trusted)
        .await
        .expect("verify-full with the server's CA");

    let plain = pg.create_database() + "?sslmode=disable";
    let Err(refused) = OrderStore::open(&plain).await else {
        panic!("the server admits TLS only");
    };
    assert!(refused.to_string().contains("no encryption"), "{refused}");

    let other = tempfile::tempdir().expect("tempdir");
    make_certificates(other.path());
    let unknown = verify_full(&pg, &other.path().join("ca.pem"));
    let Err(refused) = OrderStore::open(&unknown).await else {
        panic!("a certificate of a CA not trusted is refused");
    };
    assert!(
        refused.to_string().to_lowercase().contains("certificate"),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bot_on_amqps_with_a_private_ca_creates_every_order_once() {
    let rabbit = RabbitServer::start_tls();
    let ws = Workspace::new();
    let config = ws.config_amqp(&rabbit.tls_url(), 2, "tls");
    trusting(&config, &rabbit.tls_url(), &rabbit.ca_file());
    drains_exactly_once(&ws, &config).await;
}
