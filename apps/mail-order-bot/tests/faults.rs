//! The fault suite: the bot is made to die at every named step of a message's life, started
//! again, and the mailbox and the store are checked against a ledger of what was put in.
//!
//! Built only with `--features failpoints` (`scripts/test.sh` passes it); a release build
//! has no fault points. Each run:
//! 1. puts mixed mail in (orders, unknown senders, no lines, resends, malformed and hostile
//!    MIME) and two orders whose handler always fails (the order database refuses SKU-666);
//! 2. starts the bot with `FAILPOINTS=<point>=<n>*off->return(abort)`: the n+1-th time the
//!    step is reached the process aborts there, as `kill -9` at that step would;
//! 3. starts it again without faults and waits until the work settles;
//! 4. checks the ledger: every valid order exactly once and its mail seen; every always-
//!    failing mail unseen with a dead letter; every other mail exactly one outcome and seen;
//!    nothing seen without an outcome.
//!
//! Two stacks: Maildir with the in-memory queue and SQLite, and IMAP (a private Dovecot)
//! with Redis Streams and PostgreSQL, where the always-failing mail must also carry the
//! failure keyword. It prints one line per run and a summary.

mod common;

use std::time::{Duration, Instant};

use common::plane::{refuse_sku_666, spawn_with_control};
use common::{assert_store_exactly_once, mixed_mail, order_mail, Expected, Workspace};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Every step where the Maildir + in-memory stack can die, in a message's order.
const POINTS: &[&str] = &[
    "queue.publish_batch",
    "mail.after_fetch",
    "mail.after_parse",
    "mail.after_commit",
    "worker.after_complete",
    "queue.ack_batch",
    "config.reload",
    "outbox.after_claim",
    "outbox.after_send",
    "outbox.before_mark",
];

/// Runs of each point.
const RUNS: usize = 3;

/// Mail whose handler always fails: the order database refuses SKU-666.
fn always_failing() -> Vec<(String, String)> {
    ["doomed-1", "doomed-2"]
        .iter()
        .map(|id| {
            (
                format!("mid:{id}@test.example"),
                order_mail(id, "purchasing@acme.example", &[("SKU-666", 1)]),
            )
        })
        .collect()
}

/// Malformed and hostile mail: each must end with exactly one recorded outcome.
fn bad_mail() -> Vec<String> {
    let unclosed = "From: purchasing@acme.example\r\nMessage-ID: <unclosed@test.example>\r\n\
        Subject: broken\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n\
        --b\r\nContent-Type: text/plain; charset=x-unknown-charset\r\n\r\nSKU-77 x 2\r\n--b\r\n\
        Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64"
        .to_owned();
    let mut nested = String::from(
        "From: purchasing@acme.example\r\nMessage-ID: <nested@test.example>\r\nSubject: deep\r\n\
         MIME-Version: 1.0\r\nContent-Type: message/rfc822\r\n\r\n",
    );
    for _ in 0..200 {
        nested.push_str("Content-Type: message/rfc822\r\n\r\n");
    }
    nested.push_str("body\r\n");
    let headers_only = "From: \r\nMessage-ID: <empty@test.example>\r\n\r\n".to_owned();
    vec![unclosed, nested, headers_only]
}

struct Ledger {
    /// The mail to deliver: (Maildir unique name, bytes), resends included.
    mails: Vec<(String, String)>,
    expected: Expected,
    doomed: Vec<String>,
}

impl Ledger {
    /// Messages whose bytes repeat an earlier one (a resend: one identity, one outcome).
    fn resends(&self) -> usize {
        let distinct: std::collections::HashSet<&str> =
            self.mails.iter().map(|(_, m)| m.as_str()).collect();
        self.mails.len() - distinct.len()
    }
}

fn ledger() -> Ledger {
    let (mut mails, mut expected) = mixed_mail(30);
    mails.extend(bad_mail());
    // Its first part still reads, leniently, as an order.
    expected.orders.push("mid:unclosed@test.example".to_owned());
    expected
        .other
        .push(("mid:nested@test.example".to_owned(), "rejected"));
    // Automatic mail from somebody who is not a client: recorded, never answered.
    for (id, header, outcome) in NOT_ANSWERED {
        let mut mail = order_mail(id, "someone@unknown.example", &[("SKU-1", 1)]);
        mail.insert_str(0, &format!("{header}\r\n"));
        mails.push(mail);
        expected
            .other
            .push((format!("mid:{id}@test.example"), outcome));
    }
    let doomed = always_failing();
    mails.extend(doomed.iter().map(|(_, m)| m.clone()));
    Ledger {
        mails: mails
            .into_iter()
            .enumerate()
            .map(|(i, m)| (format!("{:06}.M{i}P1.test", 1_700_000_000 + i), m))
            .collect(),
        expected,
        doomed: doomed.into_iter().map(|(id, _)| id).collect(),
    }
}

/// Mail that must get no reply: (id, header, its outcome).
const NOT_ANSWERED: [(&str, &str, &str); 3] = [
    ("auto", "Auto-Submitted: auto-replied", "auto_reply"),
    ("bulk", "Precedence: bulk", "unknown_client"),
    ("bounce", "Return-Path: <>", "auto_reply"),
];

/// Every mailbox a reply of the ledger can land in: the senders', and the bot's own (where
/// a bounce would go).
const REPLY_USERS: [&str; 5] = [
    "purchasing@acme.example",
    "buyer@nordic.example",
    "someone@unknown.example",
    "x@acme.example",
    common::relay::BOT,
];

fn start_relay() -> common::relay::Relay {
    common::relay::Relay::start(
        &REPLY_USERS,
        &[
            "acme.example",
            "nordic.example",
            "unknown.example",
            "plba.test",
        ],
    )
}

/// The reply section of a fault run: no per-sender limit to speak of (the ledger's
/// clients send dozens of orders), the relay's answer bounded within the 2 s lease.
fn reply_section(relay: &common::relay::Relay) -> String {
    relay
        .section(100_000)
        .replace("timeout_ms = 5000", "timeout_ms = 1500")
}

/// Every message that should be answered got exactly one reply, found in its sender's
/// mailbox by the Message-ID derived from its identity and outcome; nothing else got one
/// (automatic, bulk and null-sender mail, the always-failing mail, bounces to the bot).
///
/// A reply the relay accepted just before the process died, before the store noted it,
/// is sent again with the same Message-ID, which makes it recognisable as a repeat: such
/// repeats are counted (the return value) and bounded by what the replies pool can have
/// in flight at one crash.
async fn assert_reply_ledger(relay: &common::relay::Relay, ledger: &Ledger, label: &str) -> usize {
    let no_answer: Vec<String> = NOT_ANSWERED
        .iter()
        .map(|(id, _, _)| format!("mid:{id}@test.example"))
        .collect();
    let mut due: Vec<String> = ledger
        .expected
        .orders
        .iter()
        .map(|identity| (identity.as_str(), "created"))
        .chain(
            ledger
                .expected
                .other
                .iter()
                .filter(|(identity, outcome)| {
                    matches!(*outcome, "unknown_client" | "no_lines")
                        && !no_answer.contains(identity)
                })
                .map(|(identity, outcome)| (identity.as_str(), *outcome)),
        )
        .map(|(identity, outcome)| {
            mail_order_bot::domain::reply::reply_message_id(
                identity,
                &format!("reply:{outcome}"),
                "plba.test",
            )
            .trim_matches(['<', '>'])
            .to_owned()
        })
        .collect();
    due.sort_unstable();
    let deadline = Instant::now() + Duration::from_secs(60);
    // Wait on the distinct replies: a repeat must not stand in for a reply still on its way.
    let distinct = |ids: &[String]| ids.iter().collect::<std::collections::BTreeSet<_>>().len();
    let mut got = relay.message_ids(&REPLY_USERS);
    while distinct(&got) < due.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        got = relay.message_ids(&REPLY_USERS);
    }
    let sent = got.len();
    got.sort_unstable();
    got.dedup();
    assert_eq!(
        got, due,
        "{label}: one reply per answerable message, none for the rest"
    );
    let repeats = sent - got.len();
    assert!(
        repeats <= REPLIES_IN_FLIGHT,
        "{label}: {repeats} replies repeated after one crash"
    );
    repeats
}

/// The most replies the `replies` pool has in flight (its default prefetch, 8, for each
/// of its 2 workers).
const REPLIES_IN_FLIGHT: usize = 16;

/// Mail arrives in waves, each found by its own scan (so a source publishes several
/// batches): the first before the bot starts, the others 150 ms apart.
const WAVES: usize = 5;

fn deliver_waves(ws: &Workspace, mails: &[(String, String)]) -> std::thread::JoinHandle<()> {
    let per_wave = mails.len().div_ceil(WAVES);
    let mut waves = mails.chunks(per_wave).map(<[_]>::to_vec);
    for (name, mail) in waves.next().unwrap_or_default() {
        ws.deliver(&name, &mail);
    }
    let rest: Vec<Vec<(String, String)>> = waves.collect();
    let maildir = ws.maildir();
    std::thread::spawn(move || {
        for wave in rest {
            std::thread::sleep(Duration::from_millis(150));
            for (name, mail) in wave {
                let tmp = maildir.join("tmp").join(&name);
                std::fs::write(&tmp, mail).expect("write");
                std::fs::rename(&tmp, maildir.join("new").join(&name)).expect("deliver");
            }
        }
    })
}

/// Every dead letter of the `orders` queue (all pages): its id and its reason.
async fn dead_letter_reasons(addr: &str) -> Option<Vec<(String, String)>> {
    let client = reqwest::Client::new();
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("http://{addr}/queues/orders/dead-letters?limit=500");
        if let Some(c) = &cursor {
            let encoded: String = c
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            url.push_str(&format!("&cursor={encoded}"));
        }
        let page: serde_json::Value = client
            .get(url)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        out.extend(page["items"].as_array()?.iter().filter_map(|d| {
            Some((
                d["id"].as_str()?.to_owned(),
                d["reason"].as_str().unwrap_or_default().to_owned(),
            ))
        }));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return Some(out),
        }
    }
}

/// The ids of every dead letter of the `orders` queue.
async fn dead_letters(addr: &str) -> Option<Vec<String>> {
    Some(
        dead_letter_reasons(addr)
            .await?
            .into_iter()
            .map(|(id, _)| id)
            .collect(),
    )
}

fn wait_exit(child: &mut std::process::Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// The ERP section of a fault run: a 2 s lease, so a killed dispatcher's claims come back
/// quickly.
fn erp_section(erp: &plba_testkit::ErpServer) -> String {
    format!(
        "\n[apps.mail_order_bot.erp]\nurl = \"{}\"\ntimeout_ms = 1000\n\n[apps.mail_order_bot.outbox]\nlease_ms = 2000\n",
        erp.url()
    )
}

/// Every order reached the ERP and was applied once by its key; every request the ERP got
/// was for one of them.
async fn assert_erp_ledger(
    erp: &plba_testkit::ErpServer,
    orders: &[mail_order_bot::domain::store::StoredOrder],
    label: &str,
) {
    let keys: std::collections::BTreeSet<String> = orders
        .iter()
        .map(|o| mail_order_bot::domain::erp::order_key(&o.message_identity))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while erp.applied().len() < keys.len() {
        assert!(
            Instant::now() < deadline,
            "{label}: {} of {} orders reached the ERP",
            erp.applied().len(),
            keys.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let applied: std::collections::BTreeSet<String> = erp.applied().into_keys().collect();
    assert_eq!(applied, keys, "{label}: the ERP applied exactly the orders");
    for request in erp.requests() {
        let key = request.key.unwrap_or_default();
        assert!(
            keys.contains(&key),
            "{label}: a request for no order: {key}"
        );
        assert!(
            matches!(request.status, 201 | 409),
            "{label}: the ERP answered {} to {key}",
            request.status
        );
    }
}

/// What one run found.
struct RunReport {
    fired: bool,
    orders: usize,
    outcomes: usize,
    dead: usize,
    /// Replies sent again after the crash (same Message-ID).
    repeats: usize,
    /// When the first process was gone.
    died: Duration,
    took: Duration,
}

impl RunReport {
    /// Its line; a run whose fault point was never reached proved nothing and fails.
    fn print(&self, stack: &str, point: &str, run: usize) {
        println!(
            "faults {stack} {point:<22} run {run}: {} | {} orders, {} outcomes, {} dead letters, {} replies repeated | ledger ok | died at {:.1} s, settled at {:.1} s",
            if self.fired { "aborted at the step" } else { "never reached; killed" },
            self.orders,
            self.outcomes,
            self.dead,
            self.repeats,
            self.died.as_secs_f64(),
            self.took.as_secs_f64()
        );
        assert!(
            self.fired,
            "{stack} {point} run {run}: the fault point was never reached, so the run proved nothing"
        );
    }
}

/// The first process of a run, with `faults` set. For a reload the bot must be up (its
/// SIGHUP handler installed) before the signal; otherwise its address is not waited for:
/// it may die before it listens.
fn spawn_first(config: &std::path::Path, point: &str, faults: &str) -> std::process::Child {
    if point == "config.reload" {
        spawn_with_control(config, &[("FAILPOINTS", faults)]).0
    } else {
        spawn_bot(config, Some(faults))
    }
}

/// Asks `bot` to reload its configuration `times` times, 50 ms apart.
async fn reload_times(bot: &std::process::Child, times: usize) {
    let pid = Pid::from_raw(i32::try_from(bot.id()).expect("pid"));
    for _ in 0..times {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = kill(pid, Signal::SIGHUP);
    }
}

/// Waits up to 30 s for the first process to die at its fault point, and kills it if it
/// never gets there. Whether the fault fired (the process aborted).
fn reap_first(first: &mut std::process::Child) -> bool {
    let exit = wait_exit(first, Duration::from_secs(30));
    if exit.is_none() {
        let pid = Pid::from_raw(i32::try_from(first.id()).expect("pid"));
        let _ = kill(pid, Signal::SIGKILL);
        let _ = first.wait();
    }
    exit.is_some_and(|s| {
        use std::os::unix::process::ExitStatusExt;
        s.signal() == Some(Signal::SIGABRT as i32)
    })
}

async fn one_run(relay: &common::relay::Relay, point: &str, run: usize) -> RunReport {
    relay.clear(&REPLY_USERS).await;
    let started = Instant::now();
    let ws = Workspace::new();
    ws.store().await;
    let db = refuse_sku_666(&ws).await;
    let ledger = ledger();
    // Every order also goes to the ERP, from the outbox; a killed dispatcher's claims
    // come back after the 2 s lease.
    let erp = plba_testkit::ErpServer::start();
    let control = format!(
        "{}{}\n[control]\nenabled = true\nbind = \"127.0.0.1:0\"\n",
        erp_section(&erp),
        reply_section(relay)
    );
    let config = ws.config_with(2, 2, &control);

    // The first process dies at the step (or is killed if it never gets there).
    let skip = run * 2;
    let faults = format!("{point}={skip}*off->return(abort)");
    let mut first = spawn_first(&config, point, &faults);
    let delivering = deliver_waves(&ws, &ledger.mails);
    if point == "config.reload" {
        reload_times(&first, skip + 1).await;
    }
    let fired = reap_first(&mut first);
    let died = started.elapsed();
    delivering.join().expect("delivered");

    // The second runs without faults until the work settles.
    let (mut second, addr) = spawn_with_control(&config, &[]);
    let deadline = Instant::now() + Duration::from_secs(90);
    let doomed_tasks = loop {
        let flags = ws.seen_flags();
        let unseen = flags.values().filter(|s| !**s).count();
        let dead = dead_letters(&addr).await.unwrap_or_default();
        if unseen == ledger.doomed.len() && dead.len() == ledger.doomed.len() {
            break dead;
        }
        assert!(
            Instant::now() < deadline,
            "{point} run {run}: never settled: {unseen} unseen, dead letters {dead:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // The ledger.
    let outcomes = assert_store_exactly_once(&ws, &ledger.expected).await;
    let ids = ws.message_ids();
    for (unique, seen) in ws.seen_flags() {
        let id = ids.get(&unique).map(String::as_str).unwrap_or("?");
        let outcome = outcomes.get(id).map(String::as_str);
        if ledger.doomed.iter().any(|d| d == id) {
            assert!(
                !seen,
                "{point} run {run}: {id} always fails, yet it is seen"
            );
            assert!(
                outcome.is_none_or(|o| o == "failed"),
                "{point} run {run}: {id} always fails, yet its outcome is {outcome:?}"
            );
            assert!(
                doomed_tasks.iter().any(|t| t.ends_with(&unique)),
                "{point} run {run}: no dead letter for {unique}: {doomed_tasks:?}"
            );
        } else {
            assert!(seen, "{point} run {run}: {unique} ({id}) was left unread");
            assert!(
                outcome.is_some_and(|o| o != "failed"),
                "{point} run {run}: {unique} ({id}) is seen with outcome {outcome:?}"
            );
        }
    }
    assert_eq!(
        ws.seen_flags().len(),
        ledger.mails.len(),
        "{point} run {run}: a message file went missing"
    );
    let orders = ws.store().await.orders_after(0).await.expect("orders");
    assert_erp_ledger(&erp, &orders, &format!("{point} run {run}")).await;
    let repeats = assert_reply_ledger(relay, &ledger, &format!("{point} run {run}")).await;
    let orders = orders.len();

    kill(
        Pid::from_raw(i32::try_from(second.id()).expect("pid")),
        Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let status = wait_exit(&mut second, Duration::from_secs(30)).expect("the bot stops");
    assert!(status.success(), "{point} run {run}: {status:?}");
    drop(db);
    RunReport {
        fired,
        orders,
        outcomes: outcomes.len(),
        dead: doomed_tasks.len(),
        repeats,
        died,
        took: started.elapsed(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bot_aborted_at_every_step_loses_no_mail_and_doubles_no_order() {
    let relay = start_relay();
    let mut fired = 0;
    let mut runs = 0;
    let only = std::env::var("PLBA_FAULT_POINT").ok();
    for point in POINTS
        .iter()
        .filter(|p| only.as_deref().is_none_or(|o| o == **p))
    {
        for run in 0..RUNS {
            let r = one_run(&relay, point, run).await;
            runs += 1;
            fired += usize::from(r.fired);
            r.print("maildir+memory", point, run);
        }
    }
    println!("faults maildir+memory: {runs} runs, {fired} aborted at their step, every ledger ok");
}

/// Every step where the IMAP + Redis stack can die: the Maildir stack's, and the Redis
/// retry mover (which moves due retries back to the stream).
const IMAP_POINTS: &[&str] = &[
    "queue.publish_batch",
    "mail.after_fetch",
    "mail.after_parse",
    "mail.after_commit",
    "worker.after_complete",
    "queue.ack_batch",
    "redis.retry_mover",
    "config.reload",
    "outbox.after_claim",
    "outbox.after_send",
    "outbox.before_mark",
];

const PASSWORD: &str = "fault-Pa55";

/// The servers of the IMAP stack, shared by its runs; each run has its own mailbox user,
/// Redis key prefix and database.
struct ImapStack {
    dovecot: plba_testkit::DovecotServer,
    redis: plba_testkit::RedisServer,
    pg: plba_testkit::PostgresServer,
    /// Where the replies go.
    relay: common::relay::Relay,
    /// Settled mail is filed: `on_success = { move = "Processed" }`, `on_failure =
    /// { move = "Failed" }`.
    filing: bool,
}

fn user(n: usize) -> String {
    format!("faults{n}")
}

impl ImapStack {
    fn start(runs: usize) -> Self {
        Self::start_with(runs, false, plba_testkit::DovecotOptions::default())
    }

    /// [`ImapStack::start`] with settled mail filed into folders (`filing`), on a Dovecot
    /// with `options`.
    fn start_with(runs: usize, filing: bool, options: plba_testkit::DovecotOptions) -> Self {
        let users: Vec<(String, &str)> = (0..runs).map(|n| (user(n), PASSWORD)).collect();
        let users: Vec<(&str, &str)> = users.iter().map(|(u, p)| (u.as_str(), *p)).collect();
        Self {
            filing,
            dovecot: plba_testkit::DovecotServer::start_with(&users, options),
            // A queue's Redis keeps its data (the AOF, synced before each answer), as a
            // production one must: a restart loses no pointer.
            redis: plba_testkit::RedisServer::start(true),
            pg: plba_testkit::PostgresServer::start(),
            relay: start_relay(),
        }
    }

    /// A workspace on a new database whose `order_lines` refuse SKU-666, and its config:
    /// mailbox user `n`, Redis keys under `run<n>`, leases taken over after 2 s.
    async fn workspace(
        &self,
        n: usize,
        erp: Option<&plba_testkit::ErpServer>,
    ) -> (Workspace, std::path::PathBuf) {
        let ws = Workspace::with_store(self.pg.create_database());
        ws.store().await;
        let db = sqlx::PgPool::connect(&ws.store_url()).await.expect("db");
        sqlx::raw_sql(
            "CREATE FUNCTION erp_down() RETURNS trigger AS $$ BEGIN
                 IF NEW.sku = 'SKU-666' THEN RAISE EXCEPTION 'ERP rejected SKU-666'; END IF;
                 RETURN NEW; END $$ LANGUAGE plpgsql;
             CREATE TRIGGER erp_down BEFORE INSERT ON order_lines
                 FOR EACH ROW EXECUTE FUNCTION erp_down();",
        )
        .execute(&db)
        .await
        .expect("the SKU-666 trigger");
        let password_file = ws.dir.path().join("imap-password");
        std::fs::write(&password_file, format!("{PASSWORD}\n")).expect("password file");
        let mut control = "\n[control]\nenabled = true\nbind = \"127.0.0.1:0\"\n".to_owned();
        if let Some(erp) = erp {
            control.push_str(&erp_section(erp));
            control.push_str(&reply_section(&self.relay));
        }
        let text = std::fs::read_to_string(ws.config_redis(&self.redis.url(), 2, 2_000, &control))
            .expect("config")
            .replace(
                "max_deliveries = 3",
                &format!("max_deliveries = 3\nkey_prefix = \"run{n}\""),
            )
            .replace("max_attempts = 3", "max_attempts = 2");
        let source = format!(
            "[sources.inbox]\ntype = \"imap_poll\"\npool = \"orders\"\nuser = \"{}\"\npassword_file = \"{}\"\n\
             host = \"127.0.0.1\"\nport = {}\ntls = \"none\"\npoll_interval_ms = 100\nmax_backoff_ms = 1000\nlease_ttl_ms = 3000\n{}\n",
            user(n),
            password_file.display(),
            self.dovecot.port(),
            if self.filing {
                "on_success = { move = \"Processed\" }\non_failure = { move = \"Failed\" }\n"
            } else {
                ""
            }
        );
        let start = text.find("[sources.inbox]").expect("source section");
        let end = text.find("[apps.mail_order_bot]").expect("app section");
        let path = ws.dir.path().join("faults-imap.toml");
        std::fs::write(&path, format!("{}{source}{}", &text[..start], &text[end..]))
            .expect("config");
        (ws, path)
    }

    /// The mailbox's messages: (is seen, carries the failure keyword).
    fn flags(&self, n: usize) -> Vec<(bool, bool)> {
        self.flags_in(n, "INBOX")
    }

    /// [`ImapStack::flags`] of `folder` (none while it does not exist).
    fn flags_in(&self, n: usize, folder: &str) -> Vec<(bool, bool)> {
        if !self.dovecot.client(&user(n), PASSWORD).has_mailbox(folder) {
            return Vec::new();
        }
        self.dovecot
            .flags(&user(n), PASSWORD, folder)
            .values()
            .map(|f| {
                (
                    f.iter().any(|x| x == "\\Seen"),
                    f.iter().any(|x| x == "$OrderBotFailed"),
                )
            })
            .collect()
    }
}

fn spawn_bot(config: &std::path::Path, faults: Option<&str>) -> std::process::Child {
    let mut bot = std::process::Command::new(env!("CARGO_BIN_EXE_mail-order-bot"));
    bot.args(["run", "--config"])
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    if let Some(f) = faults {
        bot.env("FAILPOINTS", f);
    }
    bot.spawn().expect("spawn the bot")
}

async fn one_imap_run(stack: &ImapStack, n: usize, point: &str, run: usize) -> RunReport {
    stack.relay.clear(&REPLY_USERS).await;
    let started = Instant::now();
    let erp = plba_testkit::ErpServer::start();
    let (ws, config) = stack.workspace(n, Some(&erp)).await;
    let ledger = ledger();
    // A filing point is reached a few times per run only (the failed mail is two
    // messages): it fires at its first reach.
    let skip = if stack.filing { 0 } else { run * 2 };
    let faults = format!("{point}={skip}*off->return(abort)");
    let mut first = spawn_first(&config, point, &faults);
    // Mail arrives in waves while the first process runs.
    let per_wave = ledger.mails.len().div_ceil(WAVES);
    for (i, wave) in ledger.mails.chunks(per_wave).enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        let bytes: Vec<Vec<u8>> = wave.iter().map(|(_, m)| m.clone().into_bytes()).collect();
        stack.dovecot.append(&user(n), PASSWORD, "INBOX", &bytes);
        if point == "config.reload" {
            reload_times(&first, 1).await;
        }
    }
    if point == "config.reload" {
        reload_times(&first, skip + 1).await;
    }
    let fired = reap_first(&mut first);
    let died = started.elapsed();

    let (second, addr) = spawn_with_control(&config, &[]);
    let settled = settle_imap(
        stack,
        n,
        &ws,
        &ledger,
        &addr,
        &format!("imap {point} run {run}"),
    )
    .await;
    let orders = ws.store().await.orders_after(0).await.expect("orders");
    assert_erp_ledger(&erp, &orders, &format!("imap {point} run {run}")).await;
    let repeats =
        assert_reply_ledger(&stack.relay, &ledger, &format!("imap {point} run {run}")).await;
    stop_bot(second, &format!("imap {point} run {run}"));
    RunReport {
        fired,
        orders: settled.orders,
        outcomes: settled.outcomes,
        dead: settled.dead,
        repeats,
        died,
        took: started.elapsed(),
    }
}

/// What a settled IMAP run holds.
struct Settled {
    orders: usize,
    outcomes: usize,
    dead: usize,
}

/// Waits until the IMAP stack's work settles, then checks the ledger: every valid order
/// once and seen, every always-failing mail unseen with the failure keyword and a dead
/// letter, every other mail one outcome and seen.
async fn settle_imap(
    stack: &ImapStack,
    n: usize,
    ws: &Workspace,
    ledger: &Ledger,
    addr: &str,
    label: &str,
) -> Settled {
    // A long soak leaves a backlog: two minutes, plus a second per 50 messages.
    let deadline = Instant::now() + Duration::from_secs(120 + (ledger.mails.len() / 50) as u64);
    let dead = loop {
        let flags = stack.flags(n);
        let unseen = flags.iter().filter(|(seen, _)| !seen).count();
        let marked = flags.iter().filter(|(seen, kw)| !seen && *kw).count();
        let dead = dead_letters(addr).await.unwrap_or_default();
        let settled = if stack.filing {
            // The INBOX empties: settled mail in Processed (a crash between a copy and
            // its delete may leave a second copy there), the failing mail in Failed.
            flags.is_empty()
                && stack.flags_in(n, "Processed").len() >= ledger.mails.len() - ledger.doomed.len()
                && stack.flags_in(n, "Failed").len() >= ledger.doomed.len()
        } else {
            flags.len() == ledger.mails.len() && unseen == ledger.doomed.len() && marked == unseen
        };
        if settled && dead.len() == ledger.doomed.len() {
            break dead;
        }
        if Instant::now() >= deadline {
            let reasons = dead_letter_reasons(addr).await.unwrap_or_default();
            let mut by_reason: std::collections::BTreeMap<String, usize> = Default::default();
            for (_, reason) in &reasons {
                let head: String = reason.chars().take(80).collect();
                *by_reason.entry(head).or_default() += 1;
            }
            // The attempt history of the first few dead letters that are not the
            // always-failing mail: when and why each attempt failed.
            let mut histories = Vec::new();
            for (id, _) in reasons
                .iter()
                .filter(|(_, r)| !r.contains("SKU-666"))
                .take(3)
            {
                let detail: Option<serde_json::Value> = async {
                    reqwest::Client::new()
                        .get(format!("http://{addr}/queues/orders/dead-letters/{id}"))
                        .send()
                        .await
                        .ok()?
                        .json()
                        .await
                        .ok()
                }
                .await;
                let attempts: Vec<String> = detail
                    .as_ref()
                    .and_then(|d| d["task"]["history"].as_array().cloned())
                    .unwrap_or_default()
                    .iter()
                    .map(|h| format!("{} @{}: {}", h["attempt"], h["at_unix_ms"], h["reason"]))
                    .collect();
                histories.push(format!("{id}:\n  {}", attempts.join("\n  ")));
            }
            panic!(
                "{label}: never settled: {} messages, {unseen} unseen ({marked} with the failure keyword), {} dead letters for {} always-failing mails; dead letters by reason: {by_reason:#?}\n{}",
                flags.len(),
                reasons.len(),
                ledger.doomed.len(),
                histories.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut flags = stack.flags(n);
    if stack.filing {
        let processed = stack.flags_in(n, "Processed");
        assert!(
            processed.iter().all(|(seen, kw)| *seen && !kw),
            "{label}: Processed holds settled mail only"
        );
        let failed = stack.flags_in(n, "Failed");
        assert!(
            failed.iter().all(|(seen, kw)| !seen && *kw),
            "{label}: Failed holds unseen mail with the failure keyword only"
        );
        flags.extend(processed);
        flags.extend(failed);
    }
    assert!(
        flags.iter().all(|(seen, kw)| !(*seen && *kw)),
        "{label}: a seen message carries the failure keyword"
    );
    let outcomes = assert_store_exactly_once(ws, &ledger.expected).await;
    for id in &ledger.doomed {
        let outcome = outcomes.get(id).map(String::as_str);
        assert!(
            outcome.is_none_or(|o| o == "failed"),
            "{label}: {id} always fails, yet its outcome is {outcome:?}"
        );
    }
    let recorded = outcomes.values().filter(|o| *o != "failed").count();
    let distinct_valid = ledger.mails.len() - ledger.doomed.len() - ledger.resends();
    assert_eq!(
        recorded, distinct_valid,
        "{label}: every message but the failing ones has one outcome"
    );
    let orders = ws
        .store()
        .await
        .orders_after(0)
        .await
        .expect("orders")
        .len();
    Settled {
        orders,
        outcomes: outcomes.len(),
        dead: dead.len(),
    }
}

fn stop_bot(mut bot: std::process::Child, label: &str) {
    kill(
        Pid::from_raw(i32::try_from(bot.id()).expect("pid")),
        Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let status = wait_exit(&mut bot, Duration::from_secs(30)).expect("the bot stops");
    assert!(status.success(), "{label}: {status:?}");
    let _ = bot.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_redis_postgres_aborted_at_every_step_lose_no_mail_and_double_no_order() {
    let stack = ImapStack::start(IMAP_POINTS.len() * RUNS);
    let mut fired = 0;
    let mut runs = 0;
    let only = std::env::var("PLBA_FAULT_POINT").ok();
    for point in IMAP_POINTS
        .iter()
        .filter(|p| only.as_deref().is_none_or(|o| o == **p))
    {
        for run in 0..RUNS {
            let r = one_imap_run(&stack, runs, point, run).await;
            runs += 1;
            fired += usize::from(r.fired);
            r.print("imap+redis+postgres", point, run);
        }
    }
    println!(
        "faults imap+redis+postgres: {runs} runs, {fired} aborted at their step, every ledger ok"
    );
}

/// The filing steps, on a Dovecot with MOVE and on one without it: a message's flags
/// are set, then it is moved (or copied, flagged `\\Deleted` and expunged).
const FILING_POINTS: [(&str, bool); 5] = [
    ("imap.before_move", false),
    ("imap.before_failed_move", false),
    ("imap.before_move", true),
    ("imap.after_copy", true),
    ("imap.after_delete", true),
];

/// Runs of each filing point.
const FILING_RUNS: usize = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filing_into_folders_aborted_at_every_step_loses_no_mail_and_doubles_no_order() {
    let only = std::env::var("PLBA_FAULT_POINT").ok();
    let mut runs = 0;
    for without_move in [false, true] {
        let points: Vec<&str> = FILING_POINTS
            .iter()
            .filter(|(p, w)| *w == without_move && only.as_deref().is_none_or(|o| o == *p))
            .map(|(p, _)| *p)
            .collect();
        let stack = ImapStack::start_with(
            points.len() * FILING_RUNS,
            true,
            plba_testkit::DovecotOptions {
                without_move,
                ..Default::default()
            },
        );
        let label = if without_move {
            "imap filing by copy"
        } else {
            "imap filing by move"
        };
        for (i, point) in points.iter().enumerate() {
            for run in 0..FILING_RUNS {
                let r = one_imap_run(&stack, i * FILING_RUNS + run, point, run).await;
                runs += 1;
                r.print(label, point, run);
            }
        }
    }
    println!("faults imap filing: {runs} runs, every one aborted at its step, every ledger ok");
}

/// Whether the bot says it is ready (`None` while it does not answer).
async fn ready(addr: &str) -> Option<bool> {
    let answer = reqwest::Client::new()
        .get(format!("http://{addr}/health/ready"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    Some(answer.status().is_success())
}

/// Polls readiness until it is `want`; how long that took.
async fn readiness_becomes(addr: &str, want: bool, limit: Duration, label: &str) -> Duration {
    let started = Instant::now();
    loop {
        if ready(addr).await == Some(want) {
            return started.elapsed();
        }
        if started.elapsed() >= limit {
            let status = reqwest::Client::new()
                .get(format!("http://{addr}/status"))
                .send()
                .await
                .ok();
            let text = match status {
                Some(r) => r.text().await.unwrap_or_default(),
                None => String::new(),
            };
            panic!(
                "{label}: readiness did not turn {} within {limit:?}: {text}",
                if want { "ready" } else { "not ready" }
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[derive(Clone, Copy, Debug)]
enum Dependency {
    Redis,
    Dovecot,
    Postgres,
}

/// Each dependency of the IMAP stack stopped under a running bot and started again
/// (PostgreSQL for 30 s): readiness turns not ready within 5 s of the outage and ready
/// within 30 s of the recovery; mail that arrives meanwhile is handled once; the ledger
/// holds. The retry policy here outlasts an outage (up to 30 attempts, 2 s apart at most),
/// as a production one should; the always-failing mail is left to the abort runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_dependency_outage_turns_readiness_and_loses_nothing() {
    let outages = [
        (Dependency::Redis, Duration::from_secs(3)),
        (Dependency::Dovecot, Duration::from_secs(3)),
        (Dependency::Postgres, Duration::from_secs(30)),
    ];
    let mut stack = ImapStack::start(outages.len());
    let only = std::env::var("PLBA_FAULT_POINT").ok();
    for (n, (dependency, down_for)) in outages.into_iter().enumerate() {
        let label = format!("outage {dependency:?}");
        if only
            .as_deref()
            .is_some_and(|o| o != format!("{dependency:?}"))
        {
            continue;
        }
        let started = Instant::now();
        let (ws, config) = stack.workspace(n, None).await;
        // The order store is one the pool needs: while PostgreSQL is down the pool waits and
        // failed attempts are not counted, so the test policy (2 attempts, 10-50 ms apart)
        // loses nothing to 30 s of it. A mailbox coming back can answer the gate's NOOP just
        // after an attempt failed to connect, and that attempt counts: the Redis and Dovecot
        // runs retry for longer than their outage.
        if matches!(dependency, Dependency::Postgres) {
            let text = std::fs::read_to_string(&config).expect("config");
            assert!(text.contains("max_attempts = 2"), "{text}");
        } else {
            edit_config(&config, &OUTLAST_OUTAGES);
        }
        let mut ledger = ledger();
        let doomed = std::mem::take(&mut ledger.doomed);
        ledger
            .mails
            .retain(|(_, m)| !doomed.iter().any(|d| m.contains(&d["mid:".len()..])));
        let half = ledger.mails.len() / 2;
        let bytes = |mails: &[(String, String)]| -> Vec<Vec<u8>> {
            mails.iter().map(|(_, m)| m.clone().into_bytes()).collect()
        };

        let (bot, addr) = spawn_with_control(&config, &[]);
        stack
            .dovecot
            .append(&user(n), PASSWORD, "INBOX", &bytes(&ledger.mails[..half]));
        readiness_becomes(&addr, true, Duration::from_secs(30), &label).await;
        match dependency {
            Dependency::Redis => stack.redis.stop(),
            Dependency::Dovecot => stack.dovecot.stop(),
            Dependency::Postgres => stack.pg.stop(),
        }
        let to_down = readiness_becomes(&addr, false, Duration::from_secs(5), &label).await;
        if !matches!(dependency, Dependency::Dovecot) {
            stack
                .dovecot
                .append(&user(n), PASSWORD, "INBOX", &bytes(&ledger.mails[half..]));
        }
        tokio::time::sleep(down_for.saturating_sub(to_down)).await;
        assert_eq!(ready(&addr).await, Some(false), "{label}: still down");
        match dependency {
            Dependency::Redis => stack.redis.restart(),
            Dependency::Dovecot => stack.dovecot.restart(),
            Dependency::Postgres => stack.pg.restart(),
        }
        let to_up = readiness_becomes(&addr, true, Duration::from_secs(30), &label).await;
        if matches!(dependency, Dependency::Dovecot) {
            stack
                .dovecot
                .append(&user(n), PASSWORD, "INBOX", &bytes(&ledger.mails[half..]));
        }
        let settled = settle_imap(&stack, n, &ws, &ledger, &addr, &label).await;
        stop_bot(bot, &label);
        println!(
            "faults imap+redis+postgres outage {:<8} down {:>2} s: not ready after {:.1} s, ready {:.1} s after recovery | {} orders, {} outcomes | ledger ok | {:.1} s",
            format!("{dependency:?}"),
            down_for.as_secs(),
            to_down.as_secs_f64(),
            to_up.as_secs_f64(),
            settled.orders,
            settled.outcomes,
            started.elapsed().as_secs_f64()
        );
    }
}

/// A retry policy that outlasts a few seconds of a mailbox or queue outage: 30 attempts,
/// 200 ms to 2 s apart (the test default is 2 attempts, 10-50 ms apart).
const OUTLAST_OUTAGES: [(&str, &str); 2] = [
    ("max_attempts = 2", "max_attempts = 30"),
    (
        "initial_backoff_ms = 10\nmax_backoff_ms = 50",
        "initial_backoff_ms = 200\nmax_backoff_ms = 2000",
    ),
];

/// Replaces each `(from, to)` in the config file at `path`; every `from` must be there.
fn edit_config(path: &std::path::Path, edits: &[(&str, &str)]) {
    let mut text = std::fs::read_to_string(path).expect("config");
    for (from, to) in edits {
        assert!(
            text.contains(from),
            "{from:?} is not in the config:\n{text}"
        );
        text = text.replace(from, to);
    }
    std::fs::write(path, text).expect("config");
}

/// The soak's own mail: unique ids from `from`, every tenth from an unknown sender, every
/// fifteenth with no lines, every fiftieth always failing (SKU-666), every twentieth a
/// resend of an earlier order.
fn soak_mail(
    from: usize,
    count: usize,
    ledger: &mut Ledger,
    sent: &mut Vec<String>,
) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(count);
    for i in from..from + count {
        let id = format!("soak-{i}");
        let mid = format!("mid:{id}@test.example");
        let mail = if i % 20 == 19 && !sent.is_empty() {
            sent[i % sent.len()].clone()
        } else if i % 50 == 25 {
            ledger.doomed.push(mid);
            order_mail(&id, "purchasing@acme.example", &[("SKU-666", 1)])
        } else if i % 10 == 9 {
            ledger.expected.other.push((mid, "unknown_client"));
            order_mail(&id, "someone@unknown.example", &[("SKU-1", 1)])
        } else if i % 15 == 14 {
            ledger.expected.other.push((mid, "no_lines"));
            order_mail(&id, "x@acme.example", &[])
        } else {
            ledger.expected.orders.push(mid);
            let m = order_mail(
                &id,
                "purchasing@acme.example",
                &[("SKU-9", (i % 5 + 1) as u32)],
            );
            sent.push(m.clone());
            m
        };
        ledger.mails.push((id, mail.clone()));
        out.push(mail.into_bytes());
    }
    out
}

/// A fault the soak injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum SoakFault {
    /// The bot aborts at a named fault point.
    Point(&'static str),
    /// `kill -9` of the bot at a random moment.
    Kill,
    /// A dependency stopped for a few seconds and started again.
    Outage(&'static str),
}

/// Random faults under a continuous stream of mail for `PLBA_SOAK_MINUTES` (0.5 in the
/// suite; `just soak 30` for half an hour), then the ledger over everything that arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_random_faults_under_a_stream_of_mail() {
    let minutes: f64 = std::env::var("PLBA_SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0.5);
    let mut stack = ImapStack::start(1);
    let (ws, config) = stack.workspace(0, None).await;
    // Retries outlast a mailbox outage (see the outage runs); and the poison guard (a task
    // whose worker died with it `max_deliveries` times is given up) allows for a crash
    // every few seconds, which may catch one task in flight several times without the task
    // being the cause.
    edit_config(&config, &OUTLAST_OUTAGES);
    edit_config(&config, &[("max_deliveries = 3", "max_deliveries = 20")]);
    let mut ledger = Ledger {
        mails: Vec::new(),
        expected: Expected::default(),
        doomed: Vec::new(),
    };
    let mut sent = Vec::new();
    let faults: Vec<SoakFault> = IMAP_POINTS
        .iter()
        .filter(|p| **p != "config.reload")
        .map(|p| SoakFault::Point(p))
        .chain([
            SoakFault::Kill,
            SoakFault::Outage("redis"),
            SoakFault::Outage("dovecot"),
            SoakFault::Outage("postgres"),
        ])
        .collect();
    let mut injected: std::collections::BTreeMap<SoakFault, usize> = Default::default();
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(minutes * 60.0);
    let mut bot = spawn_bot(&config, None);
    while Instant::now() < until {
        let fault = faults[fastrand::usize(..faults.len())];
        *injected.entry(fault).or_default() += 1;
        // Mail keeps arriving: five messages every 200 ms, for one to three seconds.
        for _ in 0..fastrand::usize(5..15) {
            let batch = soak_mail(ledger.mails.len(), 5, &mut ledger, &mut sent);
            stack.dovecot.append(&user(0), PASSWORD, "INBOX", &batch);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        match fault {
            SoakFault::Point(point) => {
                let pid = Pid::from_raw(i32::try_from(bot.id()).expect("pid"));
                let _ = kill(pid, Signal::SIGKILL);
                let _ = bot.wait();
                bot = spawn_bot(
                    &config,
                    Some(&format!(
                        "{point}={}*off->return(abort)",
                        fastrand::usize(0..5)
                    )),
                );
                for _ in 0..10 {
                    let batch = soak_mail(ledger.mails.len(), 5, &mut ledger, &mut sent);
                    stack.dovecot.append(&user(0), PASSWORD, "INBOX", &batch);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if let Ok(Some(_)) = bot.try_wait() {
                        break;
                    }
                }
                let _ = kill(
                    Pid::from_raw(i32::try_from(bot.id()).expect("pid")),
                    Signal::SIGKILL,
                );
                let _ = bot.wait();
                bot = spawn_bot(&config, None);
            }
            SoakFault::Kill => {
                let _ = kill(
                    Pid::from_raw(i32::try_from(bot.id()).expect("pid")),
                    Signal::SIGKILL,
                );
                let _ = bot.wait();
                bot = spawn_bot(&config, None);
            }
            SoakFault::Outage(which) => {
                match which {
                    "redis" => stack.redis.stop(),
                    "dovecot" => stack.dovecot.stop(),
                    _ => stack.pg.stop(),
                }
                tokio::time::sleep(Duration::from_secs(fastrand::u64(2..6))).await;
                match which {
                    "redis" => stack.redis.restart(),
                    "dovecot" => stack.dovecot.restart(),
                    _ => stack.pg.restart(),
                }
            }
        }
    }
    // The stream stops; the last process runs until the work settles.
    let _ = kill(
        Pid::from_raw(i32::try_from(bot.id()).expect("pid")),
        Signal::SIGKILL,
    );
    let _ = bot.wait();
    let (last, addr) = spawn_with_control(&config, &[]);
    let settled = settle_imap(&stack, 0, &ws, &ledger, &addr, "soak").await;
    stop_bot(last, "soak");
    let kinds: Vec<String> = injected
        .iter()
        .map(|(f, n)| format!("{f:?} x{n}"))
        .collect();
    println!(
        "soak imap+redis+postgres {:.1} min: {} faults ({}) | {} mails appended, {} orders, {} outcomes, {} dead letters | 0 lost, 0 doubled: ledger ok",
        started.elapsed().as_secs_f64() / 60.0,
        injected.values().sum::<usize>(),
        kinds.join(", "),
        ledger.mails.len(),
        settled.orders,
        settled.outcomes,
        settled.dead
    );
}

/// A message whose reading aborts the process (a fault point that aborts in the middle of
/// every read stands for the parser overflowing its stack or the kernel's OOM killer) is
/// recognised when it comes again, on the in-memory queue where nothing else counts its
/// deliveries: after `max_handling_deaths` (3) deaths it is rejected unread and seen, and
/// the process runs on; the order beside it, delivered later, is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_kills_the_process_is_rejected_after_three_deaths() {
    let ws = Workspace::new();
    ws.deliver(
        "poison",
        &order_mail("poison", "buyer@acme.example", &[("SKU-1", 1)]),
    );
    let config = ws.config(1, 3);
    for death in 1..=3 {
        let mut bot = spawn_bot(&config, Some("mail.in_parse=return(abort)"));
        let status = wait_exit(&mut bot, Duration::from_secs(60)).expect("the bot died reading");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(Signal::SIGABRT as i32),
            "death {death}"
        );
        assert!(
            !ws.seen_flags().values().any(|s| *s),
            "still unread after death {death}"
        );
    }
    // The fourth start never reads it (the fault point is still armed: reading it would
    // abort again) and goes on to the next mail, which the fault point spares.
    ws.deliver(
        "good",
        &order_mail("good", "buyer@acme.example", &[("SKU-2", 2)]),
    );
    let mut bot = std::process::Command::new(env!("CARGO_BIN_EXE_mail-order-bot"));
    let output = bot
        .args(["run", "--once", "--config"])
        .arg(&config)
        .env("FAILPOINTS", "mail.in_parse=1*off->return(abort)")
        .output()
        .expect("run --once");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        ws.seen_flags().values().all(|s| *s),
        "{:?}",
        ws.seen_flags()
    );
    let outcomes = ws.store().await.outcomes().await.expect("outcomes");
    let poison = outcomes
        .iter()
        .find(|o| o.outcome == "rejected")
        .unwrap_or_else(|| panic!("{outcomes:#?}"));
    assert!(
        poison
            .reason
            .as_deref()
            .is_some_and(|r| r.starts_with("max_handling_deaths: the process stopped 3 times")),
        "{poison:?}"
    );
    assert_eq!(
        outcomes.iter().filter(|o| o.outcome == "created").count(),
        1,
        "{outcomes:#?}"
    );
}
