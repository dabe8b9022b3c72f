//! Replicas sharing one mailbox (separate bot processes, a real Dovecot, Redis and
//! PostgreSQL): exactly one of them watches the mailbox, the one holding its lease; when it
//! is killed (SIGKILL) another takes over within 15 s; nothing is lost or doubled.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{assert_store_exactly_once, mixed_mail, BotProcess, Workspace};
use plba_testkit::{DovecotServer, PostgresServer, RedisServer};

const USER: &str = "orders";
const PASSWORD: &str = "s3cret-Pa55";

/// The replicas (by index) whose status says they hold the mailbox's lease, with its token.
async fn holders(ports: &[(usize, u16)]) -> Vec<(usize, u64)> {
    let mut out = Vec::new();
    for &(i, port) in ports {
        if let Some(s) = common::try_status(port).await {
            let lease = &s["sources"]["inbox"]["lease"];
            if lease["held"] == true {
                out.push((i, lease["token"].as_u64().unwrap_or(0)));
            }
        }
    }
    out
}

fn unseen(server: &DovecotServer) -> usize {
    server
        .flags(USER, PASSWORD, "INBOX")
        .values()
        .filter(|f| !f.iter().any(|x| x == "\\Seen"))
        .count()
}

/// Polls until `done`, checking at every step that at most one replica holds the lease,
/// and records every holder seen.
async fn watch_holders(
    ports: &[(usize, u16)],
    limit: Duration,
    what: &str,
    seen: &mut Vec<(usize, u64)>,
    mut done: impl FnMut(&[(usize, u64)]) -> bool,
) {
    let started = Instant::now();
    loop {
        let now = holders(ports).await;
        assert!(now.len() <= 1, "two replicas watch at once: {now:?}");
        seen.extend(now.iter().copied());
        if done(&now) {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_one_watcher_and_a_takeover_after_sigkill() {
    let server = DovecotServer::start(&[(USER, PASSWORD)]);
    let redis = RedisServer::start(false);
    let pg = PostgresServer::start();
    let ws = Workspace::with_store(pg.create_database());
    let password_file = ws.dir.path().join("imap-password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).expect("password file");
    let source = format!(
        "[sources.inbox]\ntype = \"imap_poll\"\npool = \"orders\"\nuser = \"{USER}\"\npassword_file = \"{}\"\n\
         host = \"127.0.0.1\"\nport = {}\ntls = \"none\"\npoll_interval_ms = 200\nmax_backoff_ms = 2000\n\
         connections = 2\nreplicas = 3\nlease_ttl_ms = 3000\n\n",
        password_file.display(),
        server.port()
    );
    let mut bots: Vec<Option<BotProcess>> = Vec::new();
    let mut ports = Vec::new();
    for i in 0..3 {
        let port = plba_testkit::free_port();
        let control = format!(
            "[control]\nenabled = true\nbind = \"127.0.0.1:{port}\"\nread_tokens = [\"read-token-1\"]\n"
        );
        let text = std::fs::read_to_string(ws.config_redis(&redis.url(), 2, 60_000, &control))
            .expect("config");
        let start = text.find("[sources.inbox]").expect("source section");
        let end = text.find("[apps.mail_order_bot]").expect("app section");
        let path = ws.dir.path().join(format!("replica-{i}.toml"));
        std::fs::write(&path, format!("{}{source}{}", &text[..start], &text[end..]))
            .expect("config");
        bots.push(Some(BotProcess::spawn(&ws, &path, false)));
        ports.push((i, port));
    }
    let (mails, expected) = mixed_mail(300);
    let bytes: Vec<Vec<u8>> = mails.iter().map(|m| m.clone().into_bytes()).collect();
    server.append(USER, PASSWORD, "INBOX", &bytes[..150]);
    let mut seen = Vec::new();
    watch_holders(
        &ports,
        Duration::from_secs(60),
        "a watcher and the first half drained",
        &mut seen,
        |now| !now.is_empty() && unseen(&server) == 0,
    )
    .await;
    let (owner, first_token) = holders(&ports).await[0];
    // The owner dies without releasing its lease; more mail arrives meanwhile.
    let mut killed = bots[owner].take().expect("owner");
    killed.child.kill().expect("SIGKILL");
    let _ = killed.child.wait();
    let killed_at = Instant::now();
    server.append(USER, PASSWORD, "INBOX", &bytes[150..]);
    let alive: Vec<(usize, u16)> = ports.iter().copied().filter(|(i, _)| *i != owner).collect();
    watch_holders(
        &alive,
        Duration::from_secs(15),
        "another replica taking the lease",
        &mut seen,
        |now| now.iter().any(|(i, t)| *i != owner && *t > first_token),
    )
    .await;
    let took_over = killed_at.elapsed();
    watch_holders(
        &alive,
        Duration::from_secs(60),
        "the second half drained",
        &mut seen,
        |_| unseen(&server) == 0,
    )
    .await;
    let holders_seen: BTreeSet<usize> = seen.iter().map(|(i, _)| *i).collect();
    assert_eq!(
        holders_seen.len(),
        2,
        "the first owner, then one other: {seen:?}"
    );
    assert!(took_over < Duration::from_secs(15), "{took_over:?}");
    // Standby replicas know who watches.
    for &(i, port) in &alive {
        let s = common::try_status(port).await.expect("status");
        let lease = &s["sources"]["inbox"]["lease"];
        assert!(lease["holder"].is_string(), "replica {i}: {lease}");
        assert!(
            lease["resource"]
                .as_str()
                .is_some_and(|r| r.contains("orders@127.0.0.1")),
            "{lease}"
        );
    }
    for bot in bots.iter_mut().filter_map(Option::take) {
        bot.signal(nix::sys::signal::Signal::SIGTERM);
        let (code, _, err) = bot.finish();
        assert_eq!(code, 0, "{err}");
    }
    assert_store_exactly_once(&ws, &expected).await;
    assert_eq!(unseen(&server), 0, "every message seen");
}
