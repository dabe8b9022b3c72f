//! The bot on a real, private Dovecot: the IMAP source by polling and by IDLE from the same
//! configuration (only `type` differs), failures, restarts, a wrong password and TLS.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::{assert_store_exactly_once, mixed_mail, order_mail, wait_for, FaultyBot, Workspace};
use mail_order_bot::compose::{build_runtime, load_config};
use plba_testkit::{DovecotServer, PostgresServer};
use runtime_contracts::{Probe, SourceState};
use runtime_core::RuntimeManager;

const USER: &str = "orders";
const PASSWORD: &str = "s3cret-Pa55";

/// The workspace's configuration with its Maildir source replaced by an IMAP source on
/// `server`; `source` is the body of `[sources.inbox]` after `type`.
fn imap_config(ws: &Workspace, kind: &str, source: &str, max_attempts: u32) -> std::path::PathBuf {
    let text = ws.config_text(4, max_attempts, "");
    let start = text.find("[sources.inbox]").expect("source section");
    let end = text.find("[apps.mail_order_bot]").expect("app section");
    let password_file = ws.dir.path().join("imap-password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).expect("password file");
    let section = format!(
        "[sources.inbox]\ntype = \"{kind}\"\npool = \"orders\"\nuser = \"{USER}\"\npassword_file = \"{}\"\nmax_backoff_ms = 2000\n{source}\n\n",
        password_file.display()
    );
    let text = format!("{}{section}{}", &text[..start], &text[end..]);
    let path = ws.dir.path().join(format!("bot-{kind}.toml"));
    std::fs::write(&path, text).expect("write config");
    path
}

fn plain(server: &DovecotServer) -> String {
    format!(
        "host = \"127.0.0.1\"\nport = {}\ntls = \"none\"\npoll_interval_ms = 200",
        server.port()
    )
}

async fn start(path: &std::path::Path) -> RuntimeManager {
    let config = Arc::new(load_config(Some(path), Some(HashMap::new())).expect("config"));
    let mut runtime = build_runtime(config, FaultyBot::module(), None)
        .await
        .expect("runtime");
    runtime.start().expect("start");
    runtime
}

async fn drain(runtime: &RuntimeManager) {
    tokio::time::timeout(
        Duration::from_secs(180),
        runtime.wait_until_idle(Duration::from_millis(20)),
    )
    .await
    .expect("drained within 180 s");
}

fn bytes(mails: &[String]) -> Vec<Vec<u8>> {
    mails.iter().map(|m| m.clone().into_bytes()).collect()
}

/// UIDs of messages with and without `\Seen`.
fn seen_split(server: &DovecotServer) -> (usize, usize) {
    let flags = server.flags(USER, PASSWORD, "INBOX");
    let seen = flags
        .values()
        .filter(|f| f.iter().any(|x| x == "\\Seen"))
        .count();
    (seen, flags.len() - seen)
}

/// `path`'s pool leasing `prefetch` tasks at once (a batch).
fn with_prefetch(path: std::path::PathBuf, prefetch: usize) -> std::path::PathBuf {
    let text = std::fs::read_to_string(&path).expect("config");
    let text = text.replacen(
        "high_watermark = 64",
        &format!("high_watermark = 64\nprefetch = {prefetch}"),
        1,
    );
    assert!(text.contains("prefetch ="), "the pool section was changed");
    std::fs::write(&path, text).expect("config");
    path
}

/// 500 mixed messages (orders, unknown senders, no lines, resends): every order once,
/// every message seen, because every message has a committed outcome.
async fn backlog(kind: &str) {
    backlog_in(Workspace::new(), kind, 1).await;
}

/// [`backlog`] into `ws`'s store, workers leasing `prefetch` messages at once.
async fn backlog_in(ws: Workspace, kind: &str, prefetch: usize) {
    let server = DovecotServer::start(&[(USER, PASSWORD)]);
    let (mails, expected) = mixed_mail(500);
    server.append(USER, PASSWORD, "INBOX", &bytes(&mails));
    let config = with_prefetch(imap_config(&ws, kind, &plain(&server), 3), prefetch);
    let runtime = start(&config).await;
    drain(&runtime).await;
    runtime.shutdown().await;
    let outcomes = assert_store_exactly_once(&ws, &expected).await;
    assert_eq!(seen_split(&server), (500, 0), "every message seen");
    let store = ws.store().await;
    let deliveries: i64 = store
        .outcomes()
        .await
        .expect("outcomes")
        .iter()
        .map(|o| o.deliveries)
        .sum();
    assert_eq!(
        deliveries,
        500,
        "each message recorded once ({} identities)",
        outcomes.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_of_500_by_polling() {
    backlog("imap_poll").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_of_500_by_idle() {
    backlog("imap_idle").await;
}

/// Batches: one `UID FETCH` of a UID set per batch, the batch's outcomes in one
/// transaction, one `UID STORE` of the committed ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_of_500_in_batches_by_idle_on_sqlite() {
    backlog_in(Workspace::new(), "imap_idle", 32).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_of_500_in_batches_by_polling_on_postgres() {
    let pg = PostgresServer::start();
    backlog_in(Workspace::with_store(pg.create_database()), "imap_poll", 32).await;
}

/// One message of a batch fails every attempt: the others are committed and seen at once,
/// each delivered once; the failing one is retried alone until `max_attempts`, then
/// dead-lettered with the keyword, recorded `failed` and left unseen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failing_message_does_not_fail_its_batch() {
    let server = DovecotServer::start(&[(USER, PASSWORD)]);
    let ws = Workspace::new();
    let mut mails: Vec<String> = (0..40)
        .map(|i| order_mail(&format!("b{i}"), "purchasing@acme.example", &[("SKU-7", 1)]))
        .collect();
    mails[7] = mails[7].replacen("MIME-Version", "X-Test-Fault: error\r\nMIME-Version", 1);
    server.append(USER, PASSWORD, "INBOX", &bytes(&mails));
    let config = with_prefetch(imap_config(&ws, "imap_poll", &plain(&server), 3), 64);
    let runtime = start(&config).await;
    drain(&runtime).await;
    wait_for(Duration::from_secs(20), "the keyword", || async {
        server.flags(USER, PASSWORD, "INBOX")[&8]
            .iter()
            .any(|f| f == "$OrderBotFailed")
    })
    .await;
    runtime.shutdown().await;
    let flags = server.flags(USER, PASSWORD, "INBOX");
    for (uid, f) in &flags {
        let seen = f.iter().any(|x| x == "\\Seen");
        assert_eq!(seen, *uid != 8, "UID {uid}: {f:?}");
    }
    let outcomes = ws.store().await.outcomes().await.expect("outcomes");
    assert_eq!(outcomes.len(), 40);
    for o in &outcomes {
        if o.message_identity == "mid:b7@test.example" {
            assert_eq!(o.outcome, "failed");
            let reason = o.reason.clone().unwrap_or_default();
            assert!(reason.contains("attempt 3 of 3"), "{reason}");
        } else {
            assert_eq!((o.outcome.as_str(), o.deliveries), ("created", 1), "{o:?}");
        }
    }
}

/// SIGKILL after a batch's outcomes are committed and before its `UID STORE`, then a
/// restart: the messages are still unseen, are found again, and come out as duplicates of
/// their recorded outcomes: no second order, every message seen. The killed process is
/// this test binary run again as the bot (`PLBA_TEST_CRASH_CONFIG`), whose batches stall
/// forever once committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_a_batch_commit_and_its_store_then_restart() {
    if let (Ok(config), Ok(marker)) = (
        std::env::var("PLBA_TEST_CRASH_CONFIG"),
        std::env::var("PLBA_TEST_CRASH_MARKER"),
    ) {
        let config =
            Arc::new(load_config(Some(config.as_ref()), Some(HashMap::new())).expect("config"));
        let module = common::StallAfterCommit {
            marker: marker.into(),
        }
        .module();
        let mut runtime = build_runtime(config, module, None).await.expect("runtime");
        runtime.start().expect("start");
        std::future::pending::<()>().await;
    }
    let server = DovecotServer::start(&[(USER, PASSWORD)]);
    let ws = Workspace::new();
    let (mails, expected) = mixed_mail(300);
    server.append(USER, PASSWORD, "INBOX", &bytes(&mails));
    let config = with_prefetch(imap_config(&ws, "imap_poll", &plain(&server), 3), 32);
    let marker = ws.dir.path().join("committed");
    let out = std::fs::File::create(ws.dir.path().join("child.out")).expect("out");
    let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "sigkill_between_a_batch_commit_and_its_store_then_restart",
            "--nocapture",
        ])
        .env("PLBA_TEST_CRASH_CONFIG", &config)
        .env("PLBA_TEST_CRASH_MARKER", &marker)
        .stdout(out.try_clone().expect("out"))
        .stderr(out)
        .spawn()
        .expect("spawn the crashing bot");
    wait_for(Duration::from_secs(120), "a committed batch", || async {
        std::fs::read_to_string(&marker).is_ok_and(|m| !m.is_empty())
    })
    .await;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("SIGKILL");
    let status = child.wait().expect("wait");
    assert!(!status.success(), "killed: {status:?}");
    let deliveries = |o: Vec<mail_order_bot::domain::store::OutcomeRow>| {
        o.iter().map(|o| o.deliveries).sum::<i64>()
    };
    let committed = deliveries(ws.store().await.outcomes().await.expect("outcomes"));
    assert!(committed > 0, "outcomes were committed before the kill");
    assert_eq!(
        seen_split(&server),
        (0, 300),
        "no \\Seen was stored before the kill"
    );

    let runtime = start(&config).await;
    drain(&runtime).await;
    runtime.shutdown().await;
    assert_store_exactly_once(&ws, &expected).await;
    assert_eq!(seen_split(&server), (300, 0), "every message seen");
    // Each message committed before the kill was delivered once more, as a duplicate.
    let after = deliveries(ws.store().await.outcomes().await.expect("outcomes"));
    assert_eq!(
        after,
        300 + committed,
        "{committed} committed before the kill"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_message_stays_unseen_and_gets_the_keyword() {
    let server = DovecotServer::start(&[(USER, PASSWORD)]);
    let ws = Workspace::new();
    let failing = order_mail("fails", "purchasing@acme.example", &[("SKU-1", 1)]).replacen(
        "MIME-Version",
        "X-Test-Fault: error\r\nMIME-Version",
        1,
    );
    let fine = order_mail("fine", "purchasing@acme.example", &[("SKU-2", 2)]);
    server.append(USER, PASSWORD, "INBOX", &bytes(&[failing, fine]));
    let runtime = start(&imap_config(&ws, "imap_poll", &plain(&server), 3)).await;
    drain(&runtime).await;
    let flags = server.flags(USER, PASSWORD, "INBOX");
    wait_for(Duration::from_secs(20), "the keyword", || async {
        server.flags(USER, PASSWORD, "INBOX")[&1]
            .iter()
            .any(|f| f == "$OrderBotFailed")
    })
    .await;
    // Still published once: the dead-lettered message is not searched again.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let status = runtime.status().await;
    runtime.shutdown().await;
    let flags_after = server.flags(USER, PASSWORD, "INBOX");
    assert!(!flags_after[&1].iter().any(|f| f == "\\Seen"), "{flags:?}");
    assert!(flags_after[&2].iter().any(|f| f == "\\Seen"));
    assert_eq!(status.pools[0].dead_lettered, 1);
    assert_eq!(status.pools[0].failed, 3, "three attempts, then no more");
    assert_eq!(status.sources["inbox"].published, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dovecot_restarted_mid_run_loses_and_doubles_nothing() {
    let mut server = DovecotServer::start(&[(USER, PASSWORD)]);
    let ws = Workspace::new();
    let (mails, expected) = mixed_mail(300);
    server.append(USER, PASSWORD, "INBOX", &bytes(&mails));
    let runtime = start(&imap_config(&ws, "imap_idle", &plain(&server), 5)).await;
    wait_for(Duration::from_secs(60), "some orders", || async {
        common::orders_so_far(&ws).await >= 20
    })
    .await;
    server.restart();
    drain(&runtime).await;
    runtime.shutdown().await;
    assert_store_exactly_once(&ws, &expected).await;
    assert_eq!(seen_split(&server), (300, 0));
}

/// The server stops answering mid-run (a proxy stops forwarding, connections left open):
/// the watcher's commands time out within `command_timeout_ms`, the source is degraded
/// with the reason, and when the server answers again every message is handled once and
/// seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_server_degrades_the_source_and_loses_and_doubles_nothing() {
    let server = DovecotServer::start(&[(USER, PASSWORD)]);
    let proxy = plba_testkit::StallProxy::start(server.port());
    let ws = Workspace::new();
    let (mails, expected) = mixed_mail(300);
    server.append(USER, PASSWORD, "INBOX", &bytes(&mails));
    let source = format!(
        "host = \"127.0.0.1\"\nport = {}\ntls = \"none\"\npoll_interval_ms = 200\ncommand_timeout_ms = 1000",
        proxy.port()
    );
    let runtime = start(&imap_config(&ws, "imap_poll", &source, 50)).await;
    wait_for(Duration::from_secs(60), "some orders", || async {
        common::orders_so_far(&ws).await >= 20
    })
    .await;
    proxy.stall();
    let stalled_at = std::time::Instant::now();
    wait_for(
        Duration::from_secs(15),
        "the source to be degraded",
        || async {
            let status = runtime.status().await;
            let inbox = &status.sources["inbox"];
            inbox.state == runtime_contracts::SourceState::Degraded
                && inbox
                    .last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("command_timeout_ms"))
        },
    )
    .await;
    eprintln!("degraded {:?} after the stall", stalled_at.elapsed());
    proxy.resume();
    drain(&runtime).await;
    runtime.shutdown().await;
    assert_store_exactly_once(&ws, &expected).await;
    assert_eq!(seen_split(&server), (300, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_picks_up_mail_appended_while_busy() {
    let server = DovecotServer::start(&[(USER, PASSWORD)]);
    let ws = Workspace::new();
    let runtime = start(&imap_config(&ws, "imap_idle", &plain(&server), 3)).await;
    drain(&runtime).await;
    let (mails, expected) = mixed_mail(120);
    for chunk in mails.chunks(20) {
        server.append(USER, PASSWORD, "INBOX", &bytes(chunk));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for(Duration::from_secs(60), "every message seen", || async {
        seen_split(&server) == (120, 0)
    })
    .await;
    runtime.shutdown().await;
    assert_store_exactly_once(&ws, &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_a_clear_error_without_a_hot_loop() {
    let server = DovecotServer::start(&[(USER, "another-password")]);
    let ws = Workspace::new();
    let runtime = start(&imap_config(&ws, "imap_poll", &plain(&server), 3)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = runtime.status().await;
    let ready = runtime.health().check(Probe::Readiness).await;
    runtime.shutdown().await;
    let source = &status.sources["inbox"];
    assert_eq!(source.state, SourceState::Degraded);
    let error = source.last_error.clone().unwrap_or_default();
    assert!(
        error.contains("login as orders refused") && error.contains("AUTHENTICATIONFAILED"),
        "{error}"
    );
    assert!(!error.contains(PASSWORD), "the password is never shown");
    assert!(!ready.healthy, "not ready: {ready:?}");
    let attempts = server.log().matches("auth failed").count()
        + server.log().matches("Authentication failed").count();
    assert!(
        (1..=6).contains(&attempts),
        "{attempts} login attempts in 3 s: backoff, not a hot loop\n{}",
        server.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_works_with_the_custom_ca_and_fails_clearly_without_it() {
    let server = DovecotServer::start(&[(USER, PASSWORD)]);
    server.append(
        USER,
        PASSWORD,
        "INBOX",
        &bytes(&[order_mail(
            "tls-1",
            "purchasing@acme.example",
            &[("SKU-9", 9)],
        )]),
    );
    let tls = |ca: &str| {
        format!(
            "host = \"localhost\"\nport = {}\ntls = \"implicit\"\npoll_interval_ms = 200\n{ca}",
            server.tls_port()
        )
    };

    let without = Workspace::new();
    let runtime = start(&imap_config(&without, "imap_poll", &tls(""), 3)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = runtime.status().await;
    runtime.shutdown().await;
    let error = status.sources["inbox"]
        .last_error
        .clone()
        .unwrap_or_default();
    assert!(
        error.starts_with("tls: handshake with localhost"),
        "{error}"
    );
    assert!(error.contains("UnknownIssuer"), "{error}");

    let with = Workspace::new();
    let ca = format!("ca_file = \"{}\"", server.ca_file().display());
    let runtime = start(&imap_config(&with, "imap_poll", &tls(&ca), 3)).await;
    drain(&runtime).await;
    runtime.shutdown().await;
    assert_eq!(common::orders_so_far(&with).await, 1);
    assert_eq!(seen_split(&server), (1, 0));

    // STARTTLS on the plain port, with the same CA.
    server.append(
        USER,
        PASSWORD,
        "INBOX",
        &bytes(&[order_mail(
            "tls-2",
            "purchasing@acme.example",
            &[("SKU-8", 8)],
        )]),
    );
    let starttls = Workspace::new();
    let source = format!(
        "host = \"localhost\"\nport = {}\ntls = \"starttls\"\npoll_interval_ms = 200\n{ca}",
        server.port()
    );
    let runtime = start(&imap_config(&starttls, "imap_poll", &source, 3)).await;
    drain(&runtime).await;
    runtime.shutdown().await;
    assert_eq!(common::orders_so_far(&starttls).await, 1);
    assert_eq!(seen_split(&server), (2, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_source_with_no_mail_stays_ready() {
    let server = DovecotServer::start(&[(USER, PASSWORD)]);
    let ws = Workspace::new();
    let path = imap_config(
        &ws,
        "imap_idle",
        &format!("{}\nidle_check_secs = 1", plain(&server)),
        3,
    );
    let text = std::fs::read_to_string(&path).expect("config").replacen(
        "[runtime]\n",
        "[runtime]\nsource_progress_bound_ms = 1500\n",
        1,
    );
    std::fs::write(&path, text).expect("config");
    let runtime = start(&path).await;
    drain(&runtime).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let ready = runtime.health().check(Probe::Readiness).await;
    runtime.shutdown().await;
    assert!(ready.healthy, "{ready:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_uidvalidity_finds_the_messages_again_without_second_orders() {
    let server = DovecotServer::start(&[(USER, PASSWORD)]);
    server.client(USER, PASSWORD).run("CREATE Orders");
    let ws = Workspace::new();
    let source = format!("{}\nmailboxes = [\"Orders\"]", plain(&server));
    let runtime = start(&imap_config(&ws, "imap_poll", &source, 3)).await;
    let first: Vec<String> = (0..10)
        .map(|i| {
            order_mail(
                &format!("uv-{i}"),
                "purchasing@acme.example",
                &[("SKU-5", 1)],
            )
        })
        .collect();
    server.append(USER, PASSWORD, "Orders", &bytes(&first));
    wait_for(Duration::from_secs(30), "ten orders", || async {
        common::orders_so_far(&ws).await == 10
    })
    .await;
    // The mailbox is rebuilt (as after a server migration): same messages, unseen again,
    // under a new UIDVALIDITY, plus two new ones.
    let mut admin = server.client(USER, PASSWORD);
    admin.run("RENAME Orders Archive");
    admin.run("CREATE Orders");
    drop(admin);
    // Sessions that had the old mailbox selected notice the rename on their next command;
    // Dovecot answers an APPEND racing that with an internal error, so it waits a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut again = first.clone();
    again.extend((10..12).map(|i| {
        order_mail(
            &format!("uv-{i}"),
            "purchasing@acme.example",
            &[("SKU-6", 2)],
        )
    }));
    server.append(USER, PASSWORD, "Orders", &bytes(&again));
    wait_for(Duration::from_secs(30), "every message seen", || async {
        server.client(USER, PASSWORD).seen_uids("Orders").len() == 12
    })
    .await;
    drain(&runtime).await;
    runtime.shutdown().await;
    assert_eq!(
        common::orders_so_far(&ws).await,
        12,
        "one order per message"
    );
    let outcomes = ws.store().await.outcomes().await.expect("outcomes");
    let duplicates: i64 = outcomes.iter().map(|o| o.deliveries - 1).sum();
    assert_eq!(
        duplicates, 10,
        "the ten old messages were recorded as duplicates"
    );
}

/// A private Dovecot whose push plugin notifies the bot's `dovecot` webhook, and the bot
/// with its IMAP source polling every `poll_ms`.
async fn pushed_bot(ws: &Workspace, poll_ms: u64) -> (DovecotServer, RuntimeManager, u16) {
    // The webhook's port is chosen before the bot binds it (Dovecot's config names it), so
    // another test's server may take it first: then the webhook source stops with the bind
    // error, and the bot is started again on another port.
    for _ in 0..5 {
        if let Some(started) = pushed_bot_once(ws, poll_ms).await {
            return started;
        }
    }
    panic!("the webhook could not bind a free port in 5 tries");
}

async fn pushed_bot_once(
    ws: &Workspace,
    poll_ms: u64,
) -> Option<(DovecotServer, RuntimeManager, u16)> {
    std::env::set_var("PLBA_TEST_PUSH_TOKEN", "push-token-9-b4e2a8c6d1f3");
    let hook_port = plba_testkit::free_port();
    let server = DovecotServer::start_with_push(
        &[(USER, PASSWORD)],
        Some(&format!(
            "http://127.0.0.1:{hook_port}/hooks/dovecot?token=push-token-9-b4e2a8c6d1f3"
        )),
    );
    let source = format!(
        "host = \"127.0.0.1\"\nport = {}\ntls = \"none\"\npoll_interval_ms = {poll_ms}",
        server.port()
    );
    let path = imap_config(ws, "imap_poll", &source, 3);
    let mut text = std::fs::read_to_string(&path).expect("config");
    text.push_str(&format!(
        "\n[sources.push]\ntype = \"webhook\"\nbind = \"127.0.0.1:{hook_port}\"\npath = \"/hooks/dovecot\"\npool = \"orders\"\nkind = \"mail.message\"\ntask_source = \"inbox\"\nformat = \"dovecot\"\ndovecot_user = \"{USER}\"\nallow_volatile_queue = true\n\n[sources.push.auth]\ntype = \"shared_secret\"\nquery = \"token\"\nsecret_env = \"PLBA_TEST_PUSH_TOKEN\"\n"
    ));
    std::fs::write(&path, text).expect("config");
    let runtime = start(&path).await;
    wait_for(
        Duration::from_secs(30),
        "the first search and the listener",
        || async {
            let status = runtime.status().await;
            status.sources["inbox"].last_event_age_ms.is_some()
                && match status.sources["push"].state {
                    SourceState::Running => {
                        std::net::TcpStream::connect(("127.0.0.1", hook_port)).is_ok()
                    }
                    SourceState::Stopped | SourceState::Degraded => true,
                    SourceState::Idle => false,
                }
        },
    )
    .await;
    if runtime.status().await.sources["push"].state != SourceState::Running {
        runtime.shutdown().await;
        return None;
    }
    Some((server, runtime, hook_port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dovecot_push_notification_becomes_the_order_and_the_mail_is_seen() {
    let ws = Workspace::new();
    // One search at start (the mailbox is empty then) and none again within the test: only
    // Dovecot's notification can bring the mail in.
    let (server, runtime, _) = pushed_bot(&ws, 600_000).await;
    server.deliver(
        USER,
        order_mail("pushed", "purchasing@acme.example", &[("SKU-7", 2)]).as_bytes(),
    );
    wait_for(
        Duration::from_secs(60),
        "the order, the mail seen",
        || async { common::orders_so_far(&ws).await == 1 && seen_split(&server) == (1, 0) },
    )
    .await;
    let status = runtime.status().await;
    runtime.shutdown().await;
    // The notification names the message's UID and becomes its task; when Dovecot has not
    // assigned the UID yet (it then sends `imap-uid: 0`), it wakes the mailbox's search.
    // Either way one task, and well before the next search was due.
    assert_eq!(
        status.sources["push"].published + status.sources["inbox"].published,
        1,
        "one task: {:?}",
        status.sources
    );
    assert_eq!(status.pools[0].processed, 1);
}

/// Dovecot sends `imap-uid: 0` when it has not assigned the delivery's UID yet (a Maildir
/// whose UID list another session holds): the notification wakes the mailbox's search.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_without_a_uid_wakes_the_mailboxs_search() {
    let ws = Workspace::new();
    let (server, runtime, hook_port) = pushed_bot(&ws, 600_000).await;
    // Appended over IMAP: no notification of its own.
    server.append(
        USER,
        PASSWORD,
        "INBOX",
        &bytes(&[order_mail(
            "no-uid",
            "purchasing@acme.example",
            &[("SKU-7", 2)],
        )]),
    );
    let answer = reqwest::Client::new()
        .put(format!("http://127.0.0.1:{hook_port}/hooks/dovecot?token=push-token-9-b4e2a8c6d1f3"))
        .header("content-type", "application/json; charset=utf-8")
        .body(format!(
            r#"{{"user":"{USER}","event":"messageNew","folder":"INBOX","imap-uidvalidity":1796607957,"imap-uid":0,"from":"purchasing@acme.example","subject":"Order no-uid","unseen":1}}"#
        ))
        .send()
        .await
        .expect("the webhook answers");
    assert_eq!(answer.status().as_u16(), 202, "accepted, not refused");
    wait_for(
        Duration::from_secs(30),
        "the order, the mail seen",
        || async { common::orders_so_far(&ws).await == 1 && seen_split(&server) == (1, 0) },
    )
    .await;
    let status = runtime.status().await;
    runtime.shutdown().await;
    assert_eq!(status.sources["inbox"].published, 1, "the woken search");
    assert_eq!(status.sources["push"].published, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_and_the_mailboxs_own_search_make_one_task_per_mail() {
    let ws = Workspace::new();
    // Both race for every mail: the notification and a search every 50 ms.
    let (server, runtime, _) = pushed_bot(&ws, 50).await;
    for n in 0..20 {
        server.deliver(
            USER,
            order_mail(
                &format!("raced-{n}"),
                "purchasing@acme.example",
                &[("SKU-7", 2)],
            )
            .as_bytes(),
        );
    }
    wait_for(Duration::from_secs(60), "every mail seen", || async {
        seen_split(&server) == (20, 0)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = runtime.status().await;
    runtime.shutdown().await;
    assert_eq!(common::orders_so_far(&ws).await, 20);
    assert_eq!(
        status.pools[0].processed, 20,
        "one task per mail, whichever published it: {:?}",
        status.sources
    );
    let outcomes = ws.store().await.outcomes().await.expect("outcomes");
    assert!(
        outcomes.iter().all(|o| o.deliveries == 1),
        "no mail handled twice: {outcomes:?}"
    );
}

/// Messages in `folder` with `\Seen`, and without.
fn seen_in(server: &DovecotServer, folder: &str) -> (usize, usize) {
    let flags = server.flags(USER, PASSWORD, folder);
    let seen = flags
        .values()
        .filter(|f| f.iter().any(|x| x == "\\Seen"))
        .count();
    (seen, flags.len() - seen)
}

/// A reload of a running IMAP source, checked by what the source does next: a shorter
/// `poll_interval_ms` applies to the pause under way (the next search comes at once, without
/// a restart), and a second mailbox is searched after the source is started again with it.
/// A change of the source's pool is refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_of_the_poll_interval_and_the_mailboxes_takes_effect() {
    let server = DovecotServer::start(&[(USER, PASSWORD)]);
    server.client(USER, PASSWORD).run("CREATE Orders");
    let ws = Workspace::new();
    let settings = |interval: u64, mailboxes: &str| {
        format!(
            "host = \"127.0.0.1\"\nport = {}\ntls = \"none\"\npoll_interval_ms = {interval}\nmailboxes = {mailboxes}",
            server.port()
        )
    };
    let path = imap_config(&ws, "imap_poll", &settings(600_000, "[\"INBOX\"]"), 3);
    let rewrite = |interval: u64, mailboxes: &str| {
        let text = std::fs::read_to_string(&path).expect("config");
        let start = text.find("host = \"127.0.0.1\"").expect("settings");
        let end = start + text[start..].find("\n\n").expect("end of the section");
        let text = format!(
            "{}{}{}",
            &text[..start],
            settings(interval, mailboxes),
            &text[end..]
        );
        std::fs::write(&path, text).expect("config");
    };
    let runtime = start(&path).await;
    drain(&runtime).await;
    let (mails, expected) = mixed_mail(20);
    let mails = bytes(&mails);

    // A ten-minute interval: mail appended after the first search waits.
    server.append(USER, PASSWORD, "INBOX", &mails[..10]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        seen_in(&server, "INBOX"),
        (0, 10),
        "no search before the interval"
    );
    rewrite(200, "[\"INBOX\"]");
    let report = runtime.reload().expect("valid");
    assert_eq!(report.applied, vec!["sources.inbox.poll_interval_ms"]);
    assert!(report.restarted.is_empty(), "{report:?}");
    wait_for(
        Duration::from_secs(20),
        "the INBOX searched at once",
        || async { seen_in(&server, "INBOX") == (10, 0) },
    )
    .await;
    assert_eq!(runtime.status().await.sources["inbox"].restarts, 0);

    // Orders is not searched until the reload names it; then it is, after one restart.
    server.append(USER, PASSWORD, "Orders", &mails[10..]);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        seen_in(&server, "Orders"),
        (0, 10),
        "Orders is not configured yet"
    );
    rewrite(200, "[\"INBOX\", \"Orders\"]");
    let report = runtime.reload().expect("valid");
    assert_eq!(report.applied, vec!["sources.inbox.mailboxes"]);
    assert_eq!(report.restarted, vec!["inbox"]);
    wait_for(Duration::from_secs(20), "Orders searched", || async {
        seen_in(&server, "Orders") == (10, 0)
    })
    .await;
    let status = runtime.status().await;
    assert_eq!(status.sources["inbox"].restarts, 1);
    assert_eq!(status.sources["inbox"].state, SourceState::Running);

    // The connection count is fixed for the process: refused, with the reason, and
    // nothing restarts.
    let text = std::fs::read_to_string(&path).expect("config");
    std::fs::write(
        &path,
        text.replacen(
            "pool = \"orders\"\nuser",
            "pool = \"orders\"\nconnections = 2\nuser",
            1,
        ),
    )
    .expect("config");
    let report = runtime.reload().expect("valid");
    assert_eq!(report.needs_restart, vec!["sources.inbox.connections"]);
    let why = &report.reasons["sources.inbox.connections"];
    assert!(why.contains("after a process restart"), "{why}");
    assert!(report.restarted.is_empty());
    assert_eq!(runtime.status().await.sources["inbox"].restarts, 1);
    runtime.shutdown().await;
    assert_store_exactly_once(&ws, &expected).await;
}

/// IDLE on two folders, each on a connection of its own: mail appended to either arrives
/// live (well before the periodic check would search), and is handled once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_on_two_folders_picks_up_mail_in_either() {
    let server = DovecotServer::start(&[(USER, PASSWORD)]);
    server.client(USER, PASSWORD).run("CREATE Orders");
    let ws = Workspace::new();
    let settings = format!(
        "host = \"127.0.0.1\"\nport = {}\ntls = \"none\"\nmailboxes = [\"INBOX\", \"Orders\"]\nidle_check_secs = 120",
        server.port()
    );
    let runtime = start(&imap_config(&ws, "imap_idle", &settings, 3)).await;
    drain(&runtime).await;
    let (mails, expected) = mixed_mail(40);
    let mails = bytes(&mails);
    // Let both watchers reach IDLE after their first search.
    tokio::time::sleep(Duration::from_millis(700)).await;
    for (n, chunk) in mails.chunks(10).enumerate() {
        let folder = if n % 2 == 0 { "Orders" } else { "INBOX" };
        server.append(USER, PASSWORD, folder, chunk);
        wait_for(
            Duration::from_secs(20),
            &format!("batch {n} in {folder} seen live"),
            || async { seen_in(&server, folder).0 == 10 * (n / 2 + 1) },
        )
        .await;
    }
    assert_eq!(seen_in(&server, "INBOX"), (20, 0));
    assert_eq!(seen_in(&server, "Orders"), (20, 0));
    runtime.shutdown().await;
    assert_store_exactly_once(&ws, &expected).await;
}

/// `on_success = { move = "Processed" }` and `on_failure = { move = "Failed" }`: settled
/// mail leaves the INBOX for its folder (created when missing) once its outcome is
/// committed, by `UID MOVE` on a server that has it and by `UID COPY`, `\Deleted` and
/// `UID EXPUNGE` on one that does not; every order once, nothing left behind.
async fn filing_into_folders(without_move: bool) {
    let server = DovecotServer::start_with(
        &[(USER, PASSWORD)],
        plba_testkit::DovecotOptions {
            without_move,
            ..Default::default()
        },
    );
    let ws = Workspace::new();
    let settings = format!(
        "{}\non_success = {{ move = \"Processed\" }}\non_failure = {{ move = \"Failed\" }}",
        plain(&server)
    );
    let (mut mails, expected) = mixed_mail(60);
    for n in 0..2 {
        mails.push(
            order_mail(
                &format!("fails-{n}"),
                "purchasing@acme.example",
                &[("SKU-1", 1)],
            )
            .replacen("MIME-Version", "X-Test-Fault: error\r\nMIME-Version", 1),
        );
    }
    server.append(USER, PASSWORD, "INBOX", &bytes(&mails[..30]));
    let runtime = start(&imap_config(&ws, "imap_poll", &settings, 2)).await;
    server.append(USER, PASSWORD, "INBOX", &bytes(&mails[30..]));
    wait_for(Duration::from_secs(60), "the INBOX emptied", || async {
        server.flags(USER, PASSWORD, "INBOX").is_empty()
    })
    .await;
    drain(&runtime).await;
    let status = runtime.status().await;
    runtime.shutdown().await;
    assert_store_exactly_once(&ws, &expected).await;
    let processed = server.flags(USER, PASSWORD, "Processed");
    assert_eq!(processed.len(), 60, "every settled message filed once");
    assert!(
        processed
            .values()
            .all(|f| f.iter().any(|x| x == "\\Seen") && f.iter().any(|x| x == "$OrderBotDone")),
        "{processed:?}"
    );
    let failed = server.flags(USER, PASSWORD, "Failed");
    assert_eq!(failed.len(), 2);
    assert!(
        failed
            .values()
            .all(|f| !f.iter().any(|x| x == "\\Seen") && f.iter().any(|x| x == "$OrderBotFailed")),
        "{failed:?}"
    );
    assert_eq!(status.pools[0].dead_lettered, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_mail_is_moved_into_its_folder_with_move() {
    filing_into_folders(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_mail_is_moved_into_its_folder_by_copy_and_expunge_without_move() {
    filing_into_folders(true).await;
}

/// A message expunged by another client between its publish and its fetch, in a batch:
/// `skipped` with `message gone` under its task; the other messages of the batch are made
/// and seen, nothing is dead-lettered. (`uidvalidity changed` is the source's other reason:
/// `adapters/tests/imap_source.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_expunged_before_its_fetch_is_recorded_as_skipped() {
    let server = Arc::new(DovecotServer::start(&[(USER, PASSWORD)]));
    let ws = Workspace::new();
    let mails: Vec<String> = (0..6)
        .map(|i| order_mail(&format!("x{i}"), "purchasing@acme.example", &[("SKU-7", 1)]))
        .collect();
    server.append(USER, PASSWORD, "INBOX", &bytes(&mails));
    let config = with_prefetch(imap_config(&ws, "imap_poll", &plain(&server), 3), 8);
    let other = Arc::clone(&server);
    let module = common::DeleteBeforeFetch(move |task: &runtime_contracts::Task| {
        if task.payload["uid"] == 3 {
            let mut client = other.client(USER, PASSWORD);
            client.run("SELECT INBOX");
            client.run("UID STORE 3 +FLAGS.SILENT (\\Deleted)");
            client.run("UID EXPUNGE 3");
        }
    })
    .module();
    let loaded = Arc::new(load_config(Some(&config), Some(HashMap::new())).expect("config"));
    let mut runtime = build_runtime(loaded, module, None).await.expect("runtime");
    runtime.start().expect("start");
    drain(&runtime).await;
    let status = runtime.status().await;
    runtime.shutdown().await;
    let outcomes = common::assert_one_skipped(&ws, &status, "task:imap:inbox:INBOX:").await;
    assert_eq!(
        outcomes.iter().filter(|o| o.outcome == "created").count(),
        5,
        "{outcomes:?}"
    );
    assert_eq!(
        seen_split(&server),
        (5, 0),
        "the five left are seen, one is gone"
    );
}
