//! The bot fed by a webhook: a provider-shaped notification pointing at a mail becomes the
//! order (loaded and completed by the mailbox's own source), once; a webhook on the
//! in-memory queue is refused by the configuration check.

mod common;

use std::time::Duration;

use common::{order_mail, orders_so_far, unseen, wait_for, BotProcess, Workspace};
use plba_testkit::{free_port, RedisServer};

fn webhook(port: u16, extra: &str) -> String {
    format!(
        "\n[sources.hook]\ntype = \"webhook\"\nbind = \"127.0.0.1:{port}\"\npath = \"/hooks/mail\"\npool = \"orders\"\nkind = \"mail.message\"\ntask_source = \"inbox\"\nid_pointer = \"/unique\"\n{extra}\n[sources.hook.auth]\ntype = \"shared_secret\"\nheader = \"x-hook-token\"\nsecret_env = \"PLBA_TEST_HOOK_TOKEN\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_becomes_the_order_once_and_the_mail_is_seen() {
    std::env::set_var("PLBA_TEST_HOOK_TOKEN", "hook-token-3c9e1a7f5b2d8e40");
    let redis = RedisServer::start(false);
    let ws = Workspace::new();
    let port = free_port();
    // The Maildir is scanned once at start (empty then) and not again within the test:
    // only the notification can bring the new mail in.
    let path = ws.config_redis(&redis.url(), 2, 5000, &webhook(port, ""));
    let text = std::fs::read_to_string(&path)
        .expect("config")
        .replace("poll_interval_ms = 50", "poll_interval_ms = 600000");
    std::fs::write(&path, text).expect("write");
    let bot = BotProcess::spawn(&ws, &path, false);
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/hooks/mail");
    wait_for(Duration::from_secs(60), "the webhook listening", || {
        let client = client.clone();
        let url = url.clone();
        async move { client.post(&url).send().await.is_ok() }
    })
    .await;
    ws.deliver(
        "1700000000.hook1.host",
        &order_mail("hooked", "purchasing@acme.example", &[("SKU-5", 3)]),
    );
    let notify = || {
        client
            .post(&url)
            .header("content-type", "application/json")
            .header("x-hook-token", "hook-token-3c9e1a7f5b2d8e40")
            .body(r#"{"unique":"1700000000.hook1.host","event":"MessageNew"}"#)
            .send()
    };
    let first = notify().await.expect("notify");
    assert_eq!(first.status(), 202);
    wait_for(
        Duration::from_secs(60),
        "the order, the mail seen",
        || async { orders_so_far(&ws).await == 1 && unseen(&ws) == 0 },
    )
    .await;
    // The provider retries the same notification after the work is done: the queue still
    // knows the delivery id, so the retry is answered 2xx and makes no second task.
    let again = notify().await.expect("notify");
    assert_eq!(again.status(), 202);
    let answer: serde_json::Value = again.json().await.expect("json");
    assert_eq!(answer["status"], "already_known", "{answer}");
    let outcomes = ws.store().await.outcomes().await.expect("outcomes");
    assert_eq!(outcomes.len(), 1);
    assert_eq!(outcomes[0].deliveries, 1, "no second delivery of the mail");
    assert_eq!(orders_so_far(&ws).await, 1);
    let wrong = client
        .post(&url)
        .header("content-type", "application/json")
        .header("x-hook-token", "guess")
        .body("{}")
        .send()
        .await
        .expect("notify");
    assert_eq!(wrong.status(), 401);
    bot.signal(nix::sys::signal::Signal::SIGTERM);
    let (code, _, stderr) = bot.finish();
    assert_eq!(code, 0, "{stderr}");
    assert!(
        !stderr.contains("hook-token-3c9e1a7f5b2d8e40"),
        "the secret is never logged"
    );
}

#[test]
fn a_webhook_on_the_in_memory_queue_is_refused_unless_said_so() {
    std::env::set_var("PLBA_TEST_HOOK_TOKEN", "hook-token-3c9e1a7f5b2d8e40");
    let ws = Workspace::new();
    let bin = env!("CARGO_BIN_EXE_mail-order-bot");
    let check = |extra: &str| {
        let path = ws.config_with(2, 3, &webhook(free_port(), extra));
        std::process::Command::new(bin)
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .expect("check-config")
    };
    let refused = check("");
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("sources.hook.type: a webhook answers 2xx once its task is enqueued"),
        "{stderr}"
    );
    let allowed = check("allow_volatile_queue = true");
    assert_eq!(
        allowed.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&allowed.stderr)
    );
}
