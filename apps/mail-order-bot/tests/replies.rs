//! Replies to the sender through a real relay: the bot hands its replies to a private
//! Postfix, which delivers them over LMTP into the private Dovecot, where the test reads
//! them back over IMAP: one per message and outcome (by the derived Message-ID), threaded
//! under the order mail, with the RFC 3834 headers and the template's text; none for
//! automatic, bulk, list or null-sender mail; no loop and no flood of answers; and a relay
//! that is away holds the replies back until it is back.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::relay::{Relay, Reply, BOT, PASSWORD};
use common::{order_mail, wait_for, Workspace};
use mail_order_bot::compose::{build_runtime, load_config};
use mail_order_bot::domain::reply::reply_message_id;
use mail_order_bot::module::MailOrderModule;
use runtime_contracts::{HealthStatus, Probe};
use runtime_core::RuntimeManager;

const DOMAINS: &[&str] = &[
    "plba.test",
    "acme.example",
    "nordic.example",
    "elsewhere.example",
];
const USERS: &[&str] = &[
    BOT,
    "purchasing@acme.example",
    "buyer@nordic.example",
    "stranger@elsewhere.example",
    "auto@elsewhere.example",
    "bulk@elsewhere.example",
    "list@elsewhere.example",
    "bounce@elsewhere.example",
    "flood@elsewhere.example",
    "s1@elsewhere.example",
    "s2@elsewhere.example",
    "s3@elsewhere.example",
    "s4@elsewhere.example",
];

/// A mail from `from` with Message-ID `<{id}@mail.example>` and `headers` (each ending
/// with CRLF).
fn mail(id: &str, from: &str, headers: &str, body: &str) -> String {
    format!(
        "From: {from}\r\nTo: {BOT}\r\nSubject: Order {id}\r\nMessage-ID: <{id}@mail.example>\r\n\
         {headers}MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
    )
}

async fn start(path: &std::path::Path) -> Arc<RuntimeManager> {
    let manager = Arc::new(load_config(Some(path), Some(HashMap::new())).expect("config"));
    let mut runtime = build_runtime(manager, Arc::new(MailOrderModule), None)
        .await
        .expect("runtime");
    runtime.start().expect("start");
    Arc::new(runtime)
}

/// Waits until `runtime` is idle, a moment more for anything that should not come, then
/// stops it.
async fn settle_and_stop(runtime: &RuntimeManager) {
    tokio::time::timeout(
        Duration::from_secs(60),
        runtime.wait_until_idle(Duration::from_millis(50)),
    )
    .await
    .expect("idle");
    tokio::time::sleep(Duration::from_secs(2)).await;
    runtime.shutdown().await;
}

async fn replies_stats(runtime: &RuntimeManager) -> runtime_contracts::QueueStats {
    runtime
        .queue("replies")
        .expect("the replies pool")
        .stats()
        .await
        .expect("stats")
}

/// The derived Message-ID (without its angle brackets) of the reply to the message whose
/// outcome names `sender`.
async fn expected_id(ws: &Workspace, sender: &str) -> String {
    let outcome = ws
        .store()
        .await
        .outcomes()
        .await
        .expect("outcomes")
        .into_iter()
        .find(|o| o.sender.as_deref() == Some(sender))
        .unwrap_or_else(|| panic!("an outcome for {sender}"));
    reply_message_id(
        &outcome.message_identity,
        &format!("reply:{}", outcome.outcome),
        "plba.test",
    )
    .trim_matches(['<', '>'])
    .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_sender_hears_back_once_threaded_and_automatic_mail_gets_no_answer() {
    let relay = Relay::start(USERS, DOMAINS);
    let ws = Workspace::new();
    let config = ws.config_with(2, 3, &relay.section(5));
    let lines = "Hello,\r\n\r\nSKU-1 x 2\r\nSKU-2 x 1\r\n\r\nThanks";
    let mails = [
        (
            "created",
            mail(
                "created",
                "Buyer <purchasing@acme.example>",
                "References: <earlier@acme.example>\r\nIn-Reply-To: <earlier@acme.example>\r\n",
                lines,
            ),
        ),
        (
            "nolines",
            mail(
                "nolines",
                "buyer@nordic.example",
                "",
                "Please send us your catalogue.",
            ),
        ),
        (
            "unknown",
            mail("unknown", "stranger@elsewhere.example", "", lines),
        ),
        (
            "auto",
            mail(
                "auto",
                "auto@elsewhere.example",
                "Auto-Submitted: auto-replied\r\n",
                lines,
            ),
        ),
        (
            "bulk",
            mail(
                "bulk",
                "bulk@elsewhere.example",
                "Precedence: bulk\r\n",
                lines,
            ),
        ),
        (
            "list",
            mail(
                "list",
                "list@elsewhere.example",
                "List-Id: <buyers.elsewhere.example>\r\n",
                lines,
            ),
        ),
        (
            "null",
            mail(
                "null",
                "bounce@elsewhere.example",
                "Return-Path: <>\r\n",
                lines,
            ),
        ),
    ];
    for (id, m) in &mails {
        ws.deliver(id, m);
    }
    let runtime = start(&config).await;
    let confirmation = relay.expect("purchasing@acme.example", 1).await;
    let no_lines = relay.expect("buyer@nordic.example", 1).await;
    let unknown = relay.expect("stranger@elsewhere.example", 1).await;
    wait_for(Duration::from_secs(30), "the replies settled", || async {
        let s = replies_stats(&runtime).await;
        s.processed == 3 && s.depth == 0 && s.in_flight == 0
    })
    .await;
    for user in [
        "auto@elsewhere.example",
        "bulk@elsewhere.example",
        "list@elsewhere.example",
        "bounce@elsewhere.example",
    ] {
        relay.expect(user, 0).await;
    }

    // The confirmation: threaded under the order mail and what it referred to.
    let c = &confirmation[0];
    let order = ws.store().await.orders_after(0).await.expect("orders");
    assert_eq!(order.len(), 1, "one order");
    let number = order[0].id;
    assert_eq!(c.from, BOT);
    assert_eq!(c.to, "purchasing@acme.example");
    assert_eq!(c.subject, format!("Re: Order created [order {number}]"));
    assert_eq!(c.in_reply_to.as_deref(), Some("created@mail.example"));
    assert_eq!(
        c.references,
        vec![
            "earlier@acme.example".to_owned(),
            "created@mail.example".to_owned()
        ]
    );
    assert_eq!(c.auto_submitted.as_deref(), Some("auto-replied"));
    assert!(
        c.body.contains(&format!("order {number} for Acme")),
        "{}",
        c.body
    );
    assert!(c.body.contains("2 x SKU-1") && c.body.contains("1 x SKU-2"));
    assert_eq!(
        c.message_id,
        expected_id(&ws, "purchasing@acme.example").await
    );

    // The rejections say what the bot could not read.
    let n = &no_lines[0];
    assert_eq!(n.subject, "Re: Order nolines [not processed]");
    assert!(n.body.contains("We found no order lines"), "{}", n.body);
    assert_eq!(n.in_reply_to.as_deref(), Some("nolines@mail.example"));
    assert_eq!(n.message_id, expected_id(&ws, "buyer@nordic.example").await);
    let u = &unknown[0];
    assert!(
        u.body
            .contains("stranger@elsewhere.example is not one of our clients"),
        "{}",
        u.body
    );
    assert_eq!(u.auto_submitted.as_deref(), Some("auto-replied"));
    assert_eq!(
        u.message_id,
        expected_id(&ws, "stranger@elsewhere.example").await
    );
    runtime.shutdown().await;

    // A second run over the same store and mail answers nothing again.
    for (id, m) in &mails {
        ws.deliver(&format!("{id}-again"), m);
    }
    let runtime = start(&config).await;
    settle_and_stop(&runtime).await;
    for user in [
        "purchasing@acme.example",
        "buyer@nordic.example",
        "stranger@elsewhere.example",
    ] {
        relay.expect(user, 1).await;
    }
}

/// The workspace's configuration reading the bot's own mailbox on the relay's Dovecot by
/// IDLE, with `extra`.
fn imap_config(ws: &Workspace, relay: &Relay, extra: &str) -> std::path::PathBuf {
    let text = ws.config_text(2, 3, extra);
    let start = text.find("[sources.inbox]").expect("source section");
    let end = text.find("[apps.mail_order_bot]").expect("app section");
    let password_file = ws.dir.path().join("imap-password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).expect("password file");
    let section = format!(
        "[sources.inbox]\ntype = \"imap_idle\"\npool = \"orders\"\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\nuser = \"{BOT}\"\npassword_file = \"{}\"\nmax_backoff_ms = 2000\n\n",
        relay.dovecot.port(),
        password_file.display()
    );
    let text = format!("{}{section}{}", &text[..start], &text[end..]);
    let path = ws.dir.path().join("bot-imap.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mail_loop_and_a_flooding_sender_get_no_endless_answers() {
    let relay = Relay::start(USERS, DOMAINS);
    let ws = Workspace::new();
    let config = imap_config(&ws, &relay, &relay.section(3));
    let lines = "SKU-1 x 2";
    // A sender that is nobody's client writes eight times; and the bot's own address
    // writes to the bot (a forwarding rule pointing back, a forged sender): its answer
    // lands in the bot's own mailbox.
    let mut mails: Vec<Vec<u8>> = (0..8)
        .map(|i| mail(&format!("flood-{i}"), "flood@elsewhere.example", "", lines).into_bytes())
        .collect();
    mails.push(mail("loop", &format!("Order desk <{BOT}>"), "", lines).into_bytes());
    relay.dovecot.append(BOT, PASSWORD, "INBOX", &mails);
    let runtime = start(&config).await;

    // The limit holds: three answers to the flooding sender, not eight.
    let flood = relay.expect("flood@elsewhere.example", 3).await;
    let mut ids: Vec<&str> = flood.iter().map(|r| r.message_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(
        ids.len(),
        3,
        "three different messages answered: {flood:#?}"
    );
    // The loop ends after one answer: the reply came back and was read, and as an
    // automatic message it is not answered.
    wait_for(
        Duration::from_secs(60),
        "the reply in the bot's mailbox read",
        || async {
            let flags = relay.dovecot.flags(BOT, PASSWORD, "INBOX");
            flags.len() == 10 && flags.values().all(|f| f.iter().any(|x| x == "\\Seen"))
        },
    )
    .await;
    wait_for(Duration::from_secs(30), "the replies settled", || async {
        let s = replies_stats(&runtime).await;
        s.processed == 9 && s.depth == 0 && s.in_flight == 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    runtime.shutdown().await;
    let own = relay.inbox(BOT);
    let answers: Vec<&Reply> = own.iter().filter(|r| r.auto_submitted.is_some()).collect();
    assert_eq!(answers.len(), 1, "one answer came back: {own:#?}");
    assert_eq!(answers[0].in_reply_to.as_deref(), Some("loop@mail.example"));
    let outcomes = ws.store().await.outcomes().await.expect("outcomes");
    assert_eq!(outcomes.len(), 10, "{outcomes:#?}");
    let answer = outcomes
        .iter()
        .find(|o| {
            o.subject
                .as_deref()
                .is_some_and(|s| s.starts_with("Re: Order loop"))
        })
        .expect("the answer's outcome");
    assert_eq!(answer.outcome, "auto_reply", "{answer:?}");
    relay.expect("flood@elsewhere.example", 3).await;
    assert_eq!(relay.inbox(BOT).len(), 10, "no reply answered a reply");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_stopped_for_30_s_turns_readiness_and_the_replies_go_out_after() {
    let mut relay = Relay::start(USERS, DOMAINS);
    relay.postfix.stop();
    let ws = Workspace::new();
    let config = ws.config_with(2, 3, &relay.section(5));
    let senders = [
        "s1@elsewhere.example",
        "s2@elsewhere.example",
        "s3@elsewhere.example",
        "s4@elsewhere.example",
    ];
    for (i, sender) in senders.iter().enumerate() {
        ws.deliver(
            &format!("away-{i}"),
            &order_mail(&format!("away-{i}"), sender, &[("SKU-1", 1)]),
        );
    }
    let runtime = start(&config).await;
    wait_for(
        Duration::from_secs(30),
        "readiness down for the relay",
        || async {
            let report = runtime.health().check(Probe::Readiness).await;
            report
                .checks
                .iter()
                .any(|c| c.name == "smtp" && c.status != HealthStatus::Up)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let during = replies_stats(&runtime).await;
    assert_eq!(during.dead, 0, "an outage dead-letters nothing: {during:?}");
    assert_eq!(during.processed, 0, "{during:?}");
    assert_eq!(
        ws.store().await.outcomes().await.expect("outcomes").len(),
        4,
        "the mail itself was read"
    );
    relay.postfix.start_again();
    for sender in senders {
        let got = relay.expect(sender, 1).await;
        assert_eq!(got[0].message_id, expected_id(&ws, sender).await);
    }
    wait_for(Duration::from_secs(30), "readiness up again", || async {
        runtime.health().check(Probe::Readiness).await.healthy
    })
    .await;
    let after = replies_stats(&runtime).await;
    assert_eq!((after.processed, after.dead), (4, 0), "{after:?}");
    runtime.shutdown().await;
}

/// `n` unknown-client outcomes written straight into the store at `url`, each with its
/// reply row, to the four `s*` senders in turn.
async fn recorded_rejections(url: &str, n: usize) -> Vec<String> {
    use mail_order_bot::domain::store::{Answered, Effects, OrderStore, Recording, ReplyTo};
    use mail_order_bot::domain::OutcomeKind;
    let store = OrderStore::open(url)
        .await
        .expect("store")
        .with_effects(Effects {
            reply: Answered::all(),
            ..Effects::default()
        });
    let recordings: Vec<Recording> = (0..n)
        .map(|i| Recording {
            identity: format!("mid:replica-{i}@mail.example"),
            content_sha256: format!("sha-{i}"),
            fingerprint: format!("fp-{i}"),
            sender: Some(format!("s{}@elsewhere.example", i % 4 + 1)),
            subject: Some(format!("Order {i}")),
            task_id: format!("task-{i}"),
            outcome: OutcomeKind::UnknownClient,
            reason: Some("not a client".into()),
            order: None,
            reply: Some(ReplyTo {
                to: format!("s{}@elsewhere.example", i % 4 + 1),
                in_reply_to: Some(format!("<replica-{i}@mail.example>")),
                references: vec![format!("<replica-{i}@mail.example>")],
            }),
            task: None,
        })
        .collect();
    for chunk in recordings.chunks(50) {
        let refs: Vec<&Recording> = chunk.iter().collect();
        for r in store.record_batch(&refs).await {
            r.expect("recorded");
        }
    }
    recordings
        .iter()
        .map(|r| {
            reply_message_id(&r.identity, "reply:unknown_client", "plba.test")
                .trim_matches(['<', '>'])
                .to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_send_one_postgres_outboxs_replies_each_once() {
    let relay = Relay::start(USERS, DOMAINS);
    let pg = plba_testkit::PostgresServer::start();
    let url = pg.create_database();
    let (a, b) = (
        Workspace::with_store(url.clone()),
        Workspace::with_store(url.clone()),
    );
    let mut replicas = Vec::new();
    for ws in [&a, &b] {
        replicas.push(start(&ws.config_with(1, 3, &relay.section(1_000))).await);
    }
    // Both are running when the rows appear (written by a third process, as it were).
    let mut due = recorded_rejections(&url, 200).await;
    due.sort_unstable();
    let senders = [
        "s1@elsewhere.example",
        "s2@elsewhere.example",
        "s3@elsewhere.example",
        "s4@elsewhere.example",
    ];
    wait_for(
        Duration::from_secs(120),
        "every reply delivered",
        || async { relay.message_ids(&senders).len() >= 200 },
    )
    .await;
    common::stop_replicas_counting(&replicas, "replies", 200).await;
    let mut got = relay.message_ids(&senders);
    got.sort_unstable();
    assert_eq!(got, due, "every reply once, none sent twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_once_exits_after_the_orders_reached_the_erp_and_the_replies_went_out() {
    let relay = Relay::start(USERS, DOMAINS);
    let erp = plba_testkit::ErpServer::start();
    let ws = Workspace::new();
    let erp_section = format!(
        "\n[apps.mail_order_bot.erp]\nurl = \"{}\"\ntimeout_ms = 2000\n",
        erp.url()
    );
    let config = ws.config_with(2, 3, &format!("{}{erp_section}", relay.section(100)));
    let senders = [
        "s1@elsewhere.example",
        "purchasing@acme.example",
        "buyer@nordic.example",
    ];
    for (i, sender) in senders.iter().enumerate() {
        ws.deliver(
            &format!("once-{i}"),
            &order_mail(&format!("once-{i}"), sender, &[("SKU-1", 1)]),
        );
    }
    let bot = common::BotProcess::spawn(&ws, &config, true);
    let (code, stdout, stderr) = tokio::task::spawn_blocking(move || bot.finish())
        .await
        .expect("the bot");
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    // Everything was handed on before the process exited: nothing is left to wait for.
    assert_eq!(
        erp.applied().len(),
        2,
        "both orders reached the ERP: {stdout}"
    );
    assert_eq!(
        relay.postfix.queued() + relay.message_ids(&senders).len(),
        3,
        "{stdout}"
    );
    for sender in senders {
        let got = relay.expect(sender, 1).await;
        assert_eq!(got[0].message_id, expected_id(&ws, sender).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_client_mail_replayed_after_the_client_is_added_makes_one_order_and_one_confirmation(
) {
    use common::plane::{call, ADMIN, READ};
    let relay = Relay::start(USERS, DOMAINS);
    let erp = plba_testkit::ErpServer::start();
    let ws = Workspace::new();
    let extra = format!(
        "{}\n[apps.mail_order_bot.erp]\nurl = \"{}\"\ntimeout_ms = 2000\n\n[control]\nenabled = true\nbind = \"127.0.0.1:0\"\nread_tokens = [\"read-token-1-7c1f0e9b2d4a6f835e21\"]\nadmin_tokens = [\"admin-token-1-4b8e2d6f0a3c9e17b5d2\"]\n",
        relay.section(100),
        erp.url()
    );
    let config = ws.config_with(2, 3, &extra);
    let lines = "SKU-7 x 3";
    for i in 0..2 {
        let id = format!("stranger-{i}");
        ws.deliver(&id, &mail(&id, "stranger@elsewhere.example", "", lines));
    }
    ws.deliver("s1", &mail("s1", "s1@elsewhere.example", "", lines));
    let runtime = start(&config).await;
    relay.expect("stranger@elsewhere.example", 2).await;
    relay.expect("s1@elsewhere.example", 1).await;
    runtime.shutdown().await;
    assert_eq!(
        ws.store()
            .await
            .orders_after(0)
            .await
            .expect("orders")
            .len(),
        0
    );

    // The sender becomes a client; the bot is started again with it.
    let text = std::fs::read_to_string(&config).expect("config")
        + "\n[[apps.mail_order_bot.clients]]\nid = \"C-3\"\nname = \"Elsewhere\"\naddresses = [\"stranger@elsewhere.example\"]\n";
    std::fs::write(&config, text).expect("config");
    let runtime = start(&config).await;
    let manager = load_config(Some(&config), Some(HashMap::new())).expect("config");
    let cfg =
        mail_order_bot::compose::control_config(manager.root().get("control")).expect("control");
    let app = runtime_adapters::control::router(Arc::clone(&runtime), &cfg);
    let replay = |body: serde_json::Value, token| {
        let app = app.clone();
        async move {
            call(
                &app,
                "POST",
                "/actions/outcomes.replay",
                token,
                Some(("application/json", body.to_string().into_bytes())),
            )
            .await
        }
    };
    let listed = call(&app, "GET", "/actions", READ, None).await;
    assert!(listed.text.contains("outcomes.replay"), "{}", listed.text);
    let kind =
        serde_json::json!({"kind": "unknown_client", "sender": "stranger@elsewhere.example"});
    assert_eq!(replay(kind.clone(), READ).await.status, 403, "admins only");
    let bad = replay(serde_json::json!({"kind": "created"}), ADMIN).await;
    assert_eq!(bad.status, 400, "{}", bad.text);
    assert!(bad.text.contains("cannot be replayed"), "{}", bad.text);

    // A dry run says what would happen and changes nothing.
    let mut dry = kind.clone();
    dry["dry_run"] = true.into();
    let answer = replay(dry, ADMIN).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.json()["items"].as_array().map(Vec::len), Some(2));
    assert_eq!(answer.json()["published"], 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        ws.store()
            .await
            .orders_after(0)
            .await
            .expect("orders")
            .len(),
        0
    );

    // The replay: one order and one confirmation per message.
    let answer = replay(kind.clone(), ADMIN).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.json()["published"], 2, "{}", answer.text);
    let replies = relay.expect("stranger@elsewhere.example", 4).await;
    wait_for(
        Duration::from_secs(30),
        "both orders at the ERP",
        || async { erp.applied().len() == 2 },
    )
    .await;
    let orders = ws.store().await.orders_after(0).await.expect("orders");
    assert_eq!(orders.len(), 2);
    assert!(orders.iter().all(|o| o.client_id == "C-3"));
    let mut confirmations: Vec<String> = replies
        .iter()
        .filter(|r| r.subject.contains("[order "))
        .map(|r| r.message_id.clone())
        .collect();
    confirmations.sort_unstable();
    let mut due: Vec<String> = orders
        .iter()
        .map(|o| {
            reply_message_id(&o.message_identity, "reply:created", "plba.test")
                .trim_matches(['<', '>'])
                .to_owned()
        })
        .collect();
    due.sort_unstable();
    assert_eq!(confirmations, due, "one confirmation per replayed message");

    // Again: nothing is left of that kind, nothing happens.
    let again = replay(kind, ADMIN).await;
    assert_eq!(again.json()["published"], 0, "{}", again.text);
    // A sender still unknown is decided the same: no order, no second rejection.
    let rest = replay(serde_json::json!({"kind": "unknown_client"}), ADMIN).await;
    assert_eq!(rest.json()["published"], 1, "{}", rest.text);
    settle_and_stop(&runtime).await;
    assert_eq!(
        ws.store()
            .await
            .orders_after(0)
            .await
            .expect("orders")
            .len(),
        2
    );
    relay.expect("stranger@elsewhere.example", 4).await;
    relay.expect("s1@elsewhere.example", 1).await;
    assert_eq!(erp.applied().len(), 2);
}
