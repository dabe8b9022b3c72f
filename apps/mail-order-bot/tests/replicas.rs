//! Replicas sharing one mailbox (separate bot processes, a real Dovecot, Redis and
//! PostgreSQL): exactly one of them watches the mailbox, the one holding its lease; when it
//! is killed (SIGKILL) another takes over within 15 s; an owner paused past its lease
//! (SIGSTOP) is replaced and steps down when it wakes; a Redis restart under them is
//! survived; nothing is lost or doubled.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{assert_store_exactly_once, mixed_mail, BotProcess, Workspace};
use plba_testkit::{DovecotServer, PostgresServer, RedisServer};

const USER: &str = "orders";
const PASSWORD: &str = "s3cret-Pa55";

/// A replica that says it holds the mailbox's lease.
#[derive(Debug)]
struct Holder {
    index: usize,
    token: u64,
    /// When its status was asked for: its answer describes a later moment.
    asked: Instant,
    /// When it took the lease, at the latest: its answer's arrival less `held_for_ms`.
    took_by: Instant,
}

async fn holders_now(ports: &[(usize, u16)]) -> Vec<Holder> {
    let mut out = Vec::new();
    for &(index, port) in ports {
        let asked = Instant::now();
        if let Some(s) = common::try_status(port).await {
            let lease = &s["sources"]["inbox"]["lease"];
            if lease["held"] == true {
                let held_for = Duration::from_millis(lease["held_for_ms"].as_u64().unwrap_or(0));
                out.push(Holder {
                    index,
                    token: lease["token"].as_u64().unwrap_or(0),
                    asked,
                    took_by: Instant::now().checked_sub(held_for).unwrap_or(asked),
                });
            }
        }
    }
    out
}

/// The replicas (by index) whose status says they hold the mailbox's lease, with its token.
async fn holders(ports: &[(usize, u16)]) -> Vec<(usize, u64)> {
    holders_now(ports)
        .await
        .iter()
        .map(|h| (h.index, h.token))
        .collect()
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
        let holders = holders_now(ports).await;
        // The answers come one after another: two replicas both saying they hold the lease
        // watched at once only if one of them still held it after the other took it.
        if let Some(latest) = holders.iter().max_by_key(|h| h.took_by) {
            for earlier in holders.iter().filter(|h| h.index != latest.index) {
                assert!(
                    earlier.asked <= latest.took_by,
                    "two replicas watched at once: {earlier:?} still held the lease after {latest:?} took it"
                );
            }
        }
        let now: Vec<(usize, u64)> = holders.iter().map(|h| (h.index, h.token)).collect();
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

/// Bot processes on one Dovecot mailbox, one Redis and one PostgreSQL database.
struct Replicas {
    server: DovecotServer,
    redis: RedisServer,
    _pg: PostgresServer,
    ws: Workspace,
    bots: Vec<Option<BotProcess>>,
    ports: Vec<(usize, u16)>,
}

impl Replicas {
    /// `n` replicas; Redis with AOF when `durable_redis`. Work a paused or dead replica
    /// held is taken over after 5 s.
    fn start(n: usize, durable_redis: bool) -> Self {
        Self::start_with_ttl(n, durable_redis, 3_000)
    }

    /// [`Replicas::start`] with a lease of `ttl_ms`.
    fn start_with_ttl(n: usize, durable_redis: bool, ttl_ms: u64) -> Self {
        let server = DovecotServer::start(&[(USER, PASSWORD)]);
        let redis = RedisServer::start(durable_redis);
        let pg = PostgresServer::start();
        let ws = Workspace::with_store(pg.create_database());
        let password_file = ws.dir.path().join("imap-password");
        std::fs::write(&password_file, format!("{PASSWORD}\n")).expect("password file");
        let source = format!(
            "[sources.inbox]\ntype = \"imap_poll\"\npool = \"orders\"\nuser = \"{USER}\"\npassword_file = \"{}\"\n\
             host = \"127.0.0.1\"\nport = {}\ntls = \"none\"\npoll_interval_ms = 200\nmax_backoff_ms = 2000\n\
             connections = 2\nreplicas = {n}\nlease_ttl_ms = {ttl_ms}\n\n",
            password_file.display(),
            server.port()
        );
        let mut bots = Vec::new();
        let mut ports = Vec::new();
        for i in 0..n {
            let port = plba_testkit::free_port();
            let control = format!(
                "[control]\nenabled = true\nbind = \"127.0.0.1:{port}\"\nread_tokens = [\"read-token-1-7c1f0e9b2d4a6f835e21\"]\n"
            );
            let text = std::fs::read_to_string(ws.config_redis(&redis.url(), 2, 5_000, &control))
                .expect("config");
            let start = text.find("[sources.inbox]").expect("source section");
            let end = text.find("[apps.mail_order_bot]").expect("app section");
            let path = ws.dir.path().join(format!("replica-{i}.toml"));
            std::fs::write(&path, format!("{}{source}{}", &text[..start], &text[end..]))
                .expect("config");
            bots.push(Some(BotProcess::spawn(&ws, &path, false)));
            ports.push((i, port));
        }
        Self {
            server,
            redis,
            _pg: pg,
            ws,
            bots,
            ports,
        }
    }

    /// Three replicas, `total` mixed mails of which the first half is drained.
    async fn first_half_drained(
        total: usize,
        durable_redis: bool,
    ) -> (Self, Vec<String>, common::Expected, Vec<(usize, u64)>) {
        let r = Self::start(3, durable_redis);
        let (mails, expected) = mixed_mail(total);
        r.append(&mails[..total / 2]);
        let mut seen = Vec::new();
        r.drained(&r.ports, "a watcher and the first half drained", &mut seen)
            .await;
        (r, mails, expected, seen)
    }

    fn append(&self, mails: &[String]) {
        let bytes: Vec<Vec<u8>> = mails.iter().map(|m| m.clone().into_bytes()).collect();
        self.server.append(USER, PASSWORD, "INBOX", &bytes);
    }

    /// Waits until the mailbox has no unseen message and a replica watches, checking at
    /// every step that no two replicas watch at once.
    async fn drained(&self, ports: &[(usize, u16)], what: &str, seen: &mut Vec<(usize, u64)>) {
        watch_holders(ports, Duration::from_secs(240), what, seen, |now| {
            !now.is_empty() && unseen(&self.server) == 0
        })
        .await;
    }

    /// Stops the live replicas (SIGTERM, exit 0) and checks every order once, all seen.
    async fn finish(mut self, expected: &common::Expected) {
        for bot in self.bots.iter_mut().filter_map(Option::take) {
            bot.signal(nix::sys::signal::Signal::SIGTERM);
            let (code, _, err) = bot.finish();
            assert_eq!(code, 0, "{err}");
        }
        assert_store_exactly_once(&self.ws, expected).await;
        assert_eq!(unseen(&self.server), 0, "every message seen");
    }
}

/// Three replicas drain a backlog of 5,000 (half before the owner's SIGKILL, half after):
/// one watcher at every sample, a new one within 15 s, every order once, all seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_drain_5000_with_one_watcher_and_a_takeover_after_sigkill() {
    let (mut r, mails, expected, mut seen) = Replicas::first_half_drained(5_000, false).await;
    let (owner, first_token) = holders(&r.ports).await[0];
    // The owner dies without releasing its lease; more mail arrives meanwhile.
    let mut killed = r.bots[owner].take().expect("owner");
    killed.child.kill().expect("SIGKILL");
    let _ = killed.child.wait();
    let killed_at = Instant::now();
    r.append(&mails[2_500..]);
    let alive: Vec<(usize, u16)> = r
        .ports
        .iter()
        .copied()
        .filter(|(i, _)| *i != owner)
        .collect();
    // Observed through status requests that a loaded machine answers slowly; the takeover
    // itself is dated by the new holder's own `held_for_ms`.
    watch_holders(
        &alive,
        Duration::from_secs(60),
        "another replica taking the lease",
        &mut seen,
        |now| now.iter().any(|(i, t)| *i != owner && *t > first_token),
    )
    .await;
    let (new_owner, _) = holders(&alive).await[0];
    let asked = Instant::now();
    let status = common::try_status(r.ports[new_owner].1)
        .await
        .expect("status");
    let held_for = status["sources"]["inbox"]["lease"]["held_for_ms"]
        .as_u64()
        .expect("held_for_ms");
    let took_over = asked
        .duration_since(killed_at)
        .saturating_sub(Duration::from_millis(held_for));
    eprintln!("another replica took the lease {took_over:?} after the SIGKILL");
    r.drained(&alive, "the second half drained", &mut seen)
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
    r.finish(&expected).await;
}

/// SIGSTOP the owner past its lease: another replica takes over and drains what arrives;
/// SIGCONT: the old owner finds its lease gone (a failed renewal, or a publish the queue
/// refuses under its old fencing token) and steps down by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_owner_is_replaced_and_steps_down_when_it_wakes() {
    let r = Replicas::start(2, false);
    let (mails, expected) = mixed_mail(240);
    r.append(&mails[..80]);
    let mut seen = Vec::new();
    r.drained(&r.ports, "a watcher and the first part drained", &mut seen)
        .await;
    let (owner, first_token) = holders(&r.ports).await[0];
    let other = r
        .ports
        .iter()
        .copied()
        .find(|(i, _)| *i != owner)
        .expect("other");
    let paused = r.bots[owner].as_ref().expect("owner");
    paused.signal(nix::sys::signal::Signal::SIGSTOP);
    r.append(&mails[80..160]);
    // Only the other replica answers while the owner is stopped.
    watch_holders(
        &[other],
        Duration::from_secs(15),
        "the other replica taking the lease",
        &mut seen,
        |now| now.iter().any(|(_, t)| *t > first_token),
    )
    .await;
    r.drained(
        &[other],
        "the paused owner's share drained by the other",
        &mut seen,
    )
    .await;
    let (_, second_token) = holders(&[other]).await[0];
    paused.signal(nix::sys::signal::Signal::SIGCONT);
    r.append(&mails[160..]);
    let woke = Instant::now();
    loop {
        let s = common::try_status(r.ports[owner].1).await;
        let lease = s.as_ref().map(|s| s["sources"]["inbox"]["lease"].clone());
        if let Some(lease) = lease.clone().filter(|l| l["held"] == false) {
            eprintln!("the woken owner stepped down: {lease}");
            break;
        }
        assert!(
            woke.elapsed() < Duration::from_secs(5),
            "the woken owner did not step down: {lease:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    r.drained(&r.ports, "the rest drained", &mut seen).await;
    assert_eq!(
        holders(&r.ports).await,
        vec![(other.0, second_token)],
        "the new owner kept the lease"
    );
    r.finish(&expected).await;
}

/// The owner's lease is taken from under it while it still counts it as its own (its key
/// lost in a Redis failover without persistence, then taken by another holder): the owner's
/// next publish carries the old fencing token, the queue refuses it inside the publish
/// script, the refusal is counted in `/status` and on the console, and the owner steps down
/// by itself. When the other holder lets go, the owner takes the lease back with a newer
/// token and handles the mail it could not publish, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_whose_lease_was_taken_has_its_publish_refused_and_steps_down() {
    // A long lease, renewed every 10 s: the owner cannot notice the theft by a renewal
    // before its next poll (every 200 ms) finds the new mail.
    let r = Replicas::start_with_ttl(1, false, 30_000);
    let (mails, expected) = mixed_mail(40);
    r.append(&mails[..20]);
    let mut seen = Vec::new();
    r.drained(
        &r.ports,
        "the owner watching and the first part drained",
        &mut seen,
    )
    .await;
    let port = r.ports[0].1;
    let status = common::try_status(port).await.expect("status");
    let lease = status["sources"]["inbox"]["lease"].clone();
    let resource = lease["resource"].as_str().expect("resource").to_owned();
    let first_token = lease["token"].as_u64().expect("token");
    assert_eq!(lease["fenced_publishes"], 0);

    let client = redis::Client::open(r.redis.url()).expect("redis");
    let mut redis = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");
    let key = format!("plba:lease:{resource}");
    // Right after a renewal, so that the next one is seconds away.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .expect("PTTL");
        if ttl > 27_000 {
            break;
        }
        assert!(Instant::now() < deadline, "no renewal seen ({key}: {ttl})");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _: i64 = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .expect("DEL");
    let intruder = common::ghost_consumer(&r.redis.url(), "intruder");
    let leases = runtime_contracts::TaskQueue::leases(&intruder).expect("leases");
    let stolen = leases
        .acquire(&resource, "intruder", Duration::from_secs(60))
        .await
        .expect("acquire")
        .expect("the lease was free");
    assert!(stolen > first_token);
    r.append(&mails[20..]);

    let started = Instant::now();
    let lease = loop {
        let s = common::try_status(port).await.expect("status");
        let lease = s["sources"]["inbox"]["lease"].clone();
        if lease["held"] == false && lease["fenced_publishes"].as_u64() >= Some(1) {
            break lease;
        }
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "the owner's publish was not refused, or it did not step down: {lease}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("the owner was fenced and stepped down: {lease}");
    // Nothing it found was queued under its stale token: the new mail waits, unread.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(unseen(&r.server), 20, "no stale publish got through");
    // It learns who holds the lease now.
    let started = Instant::now();
    loop {
        let s = common::try_status(port).await.expect("status");
        if s["sources"]["inbox"]["lease"]["holder"] == "intruder" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "{s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The intruder lets go: the owner takes the lease back, newer token, and drains.
    leases
        .release(&resource, "intruder", stolen)
        .await
        .expect("release");
    r.drained(&r.ports, "the owner back, the rest drained", &mut seen)
        .await;
    let s = common::try_status(port).await.expect("status");
    let lease = &s["sources"]["inbox"]["lease"];
    assert_eq!(lease["held"], true);
    assert!(lease["token"].as_u64() > Some(stolen), "{lease}");
    assert!(lease["fenced_publishes"].as_u64() >= Some(1), "{lease}");
    r.finish(&expected).await;
}

/// Redis restarts (with its AOF) under three replicas: they reconnect by themselves, one
/// of them watches, and the mail that arrived around the restart is handled once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_survive_a_redis_restart() {
    let (mut r, mails, expected, mut seen) = Replicas::first_half_drained(300, true).await;
    r.redis.stop();
    r.append(&mails[150..225]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    r.redis.restart();
    r.append(&mails[225..]);
    r.drained(
        &r.ports.clone(),
        "everything drained after the restart",
        &mut seen,
    )
    .await;
    r.finish(&expected).await;
}
