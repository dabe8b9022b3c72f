//! Mail from a private Dovecot to committed outcomes with `\Seen`, beside what a classic
//! one-connection script and IMAP alone do in the same run on the same server.
//!
//! `cargo bench -p mail-order-bot --bench imap` (part of `just bench`):
//! - backlogs of 2,000 and 10,000 messages (a mix made from the mail corpus: plain text in
//!   legacy charsets, HTML, CSV, XLSX, XLS, ODS, forwards, auto-replies, unknown senders,
//!   malformed MIME; each with its own Message-ID), on SQLite and on a private PostgreSQL.
//!   The bot runs as its own process (the release binary, `imap_poll`, in-memory queue,
//!   4 workers, `prefetch` 32), timed from its start until the mailbox has no unseen message;
//!   its peak RSS is its `VmHWM`. Beside it, on a copy of the same messages: (a) the loop of
//!   a classic script over one connection (`UID FETCH n BODY.PEEK[]`, `UID STORE n +FLAGS
//!   (\Seen)` per message, no parsing, no database) and (b) the batched FETCH-only ceiling
//!   (`UID FETCH 1:* BODY.PEEK[]`). The same bot with `prefetch = 1` (one message per
//!   FETCH, transaction and STORE) is the "before" row.
//! - where the time goes, each stage alone on the same mix: parse + extract on one core,
//!   commits one transaction per message vs one per 32, `\Seen` one STORE per message vs
//!   one per 32.
//! - live arrival at 200 messages/s for `PLBA_BENCH_IMAP_LIVE_SECS` (10) seconds: append →
//!   `\Seen` latency p50/p99/max with IDLE and with 5 s polling. Dovecot batches IDLE
//!   notifications for about half a second.
//!
//! - the largest backlog drained with XOAUTH2 logins (tokens of an hour, and of one second
//!   so that sessions log in again during the drain) beside the same drain with a
//!   password, taking turns.
//!
//! - the largest backlog with the ERP and reply effects on (an outbox row per order and per
//!   answerable message in its transaction; deliveries and replies sent meanwhile by the
//!   `outbox` and `replies` pools, the replies to a private Postfix that discards them)
//!   beside it without.
//!
//! Sizes: `PLBA_BENCH_IMAP_BACKLOGS` (`2000,10000`); `PLBA_BENCH_IMAP_PG=0` skips nothing
//! silently: it is printed that PostgreSQL rows were not asked for.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mail_order_bot::domain::clients::load_clients_file;
use mail_order_bot::domain::message::read_mail;
use mail_order_bot::domain::store::{OrderStore, Recording};
use mail_order_bot::module::{BotConfig, OrderHandler};
use plba_testkit::{DovecotServer, PostgresServer};

const USER: &str = "orders";
const BASE: &str = "script";
const PASSWORD: &str = "bench-pass";
const BOT: &str = env!("CARGO_BIN_EXE_mail-order-bot");

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

/// The corpus cases a realistic mailbox holds (the limit and bomb cases are left out: they
/// measure the limits, not the mail job).
fn templates() -> Vec<Vec<u8>> {
    let mut names: Vec<String> = std::fs::read_dir(corpus())
        .expect("corpus")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".eml"))
        .filter(|n| {
            let number: u32 = n[..3].parse().unwrap_or(0);
            !(53..=61).contains(&number) && number < 68
        })
        .collect();
    names.sort();
    names
        .iter()
        .map(|n| std::fs::read(corpus().join(n)).expect("eml"))
        .collect()
}

/// `template` with its own Message-ID (the top-level header's, added when missing).
fn with_message_id(template: &[u8], i: usize) -> Vec<u8> {
    let id = format!("Message-ID: <bench-{i}@bench.example>");
    let head_end = template
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .or_else(|| template.windows(2).position(|w| w == b"\n\n"))
        .unwrap_or(template.len());
    let head = &template[..head_end];
    let mut out = Vec::with_capacity(template.len() + 64);
    let mut replaced = false;
    let mut rest = template;
    let mut offset = 0;
    while offset < head.len() {
        let line_end = head[offset..]
            .iter()
            .position(|b| *b == b'\n')
            .map_or(head.len(), |p| offset + p + 1);
        let line = &head[offset..line_end];
        if !replaced && line.len() > 11 && line[..11].eq_ignore_ascii_case(b"message-id:") {
            out.extend_from_slice(&template[..offset]);
            out.extend_from_slice(id.as_bytes());
            out.extend_from_slice(b"\r\n");
            rest = &template[line_end..];
            replaced = true;
            break;
        }
        offset = line_end;
    }
    if !replaced {
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(rest);
    out
}

fn mix(n: usize) -> Vec<Vec<u8>> {
    let templates = templates();
    (0..n)
        .map(|i| with_message_id(&templates[i % templates.len()], i))
        .collect()
}

fn config(
    dir: &Path,
    server: &DovecotServer,
    store_url: &str,
    kind: &str,
    prefetch: usize,
    poll_ms: u64,
    login: Option<&str>,
) -> PathBuf {
    std::fs::write(dir.join("pw"), PASSWORD).expect("pw");
    // A password from its file, or `login`'s lines (which end the source's section).
    let (password, login) = match login {
        None => (
            format!("password_file = \"{}\"\n", dir.join("pw").display()),
            String::new(),
        ),
        Some(lines) => (String::new(), lines.to_owned()),
    };
    let text = format!(
        r#"
[runtime]
shutdown_deadline_ms = 5000
log = "error"

[queue]
type = "memory"
capacity = 100000

[pools.orders]
workers = 4
prefetch = {prefetch}

[sources.inbox]
type = "{kind}"
host = "127.0.0.1"
port = {port}
tls = "none"
user = "{USER}"
{password}pool = "orders"
poll_interval_ms = {poll_ms}
connections = 4
{login}

[apps.mail_order_bot]
sender_auth = {{ mode = "off" }}
store_url = "{store_url}"
clients_file = "{clients}"
"#,
        port = server.port(),
        clients = corpus().join("clients.toml").display(),
    );
    let path = dir.join("bot.toml");
    std::fs::write(&path, text).expect("config");
    path
}

/// The bot's command; `PLBA_BENCH_IMAP_WRAP` puts a profiler in front of it (for example
/// `heaptrack -o /tmp/bot`).
fn spawn_bot(config: &Path) -> Child {
    let wrap = std::env::var("PLBA_BENCH_IMAP_WRAP").unwrap_or_default();
    let mut words = wrap.split_whitespace();
    let mut command = match words.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(words).arg(BOT);
            c
        }
        None => Command::new(BOT),
    };
    command
        .args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the bot")
}

/// Peak resident set of a live process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

/// Resident set of a live process now, in KiB.
fn current_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

fn rate(n: usize, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64()
}

/// The bot drains `USER`'s INBOX: (messages/s, peak RSS MiB).
async fn bot_drain(
    server: &DovecotServer,
    store_url: &str,
    n: usize,
    prefetch: usize,
    login: Option<&str>,
) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(
        dir.path(),
        server,
        store_url,
        "imap_poll",
        prefetch,
        1000,
        login,
    );
    let mut watcher = server.client(USER, PASSWORD);
    assert_eq!(watcher.unseen_count("INBOX"), n);
    // The mailbox as the script loop finds it in its median run: selected once before, so
    // Dovecot has moved the appended messages from new/ to cur/ (the first SELECT of 10,000
    // fresh messages renames 10,000 files, which is the server's work, not the bot's).
    {
        let mut client = server.client(USER, PASSWORD);
        client.run("SELECT INBOX");
    }
    let started = Instant::now();
    let mut bot = spawn_bot(&config);
    let deadline = started + Duration::from_secs(600);
    let trace = std::env::var("PLBA_BENCH_IMAP_RSS_TRACE").is_ok();
    let mut samples = Vec::new();
    let sampler = trace.then(|| {
        let pid = bot.id();
        let start = started;
        std::thread::spawn(move || {
            let mut max = (0u64, 0u128, String::new());
            // PLBA_BENCH_IMAP_RSS_TRACE=FILE also writes every sample (µs, RSS, anon, file
            // KiB, threads) to FILE.
            let mut trace_file = std::env::var("PLBA_BENCH_IMAP_RSS_TRACE")
                .ok()
                .filter(|v| v.contains('/'))
                .and_then(|path| std::fs::File::create(path).ok())
                .map(std::io::BufWriter::new);
            while let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                let field = |name: &str| -> u64 {
                    status
                        .lines()
                        .find_map(|l| l.strip_prefix(name))
                        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
                        .unwrap_or(0)
                };
                let rss = field("VmRSS:");
                if let Some(file) = trace_file.as_mut() {
                    use std::io::Write;
                    let _ = writeln!(
                        file,
                        "{},{},{},{},{}",
                        start.elapsed().as_micros(),
                        rss,
                        field("RssAnon:"),
                        field("RssFile:"),
                        field("Threads:")
                    );
                }
                if rss > max.0 {
                    let parts = format!(
                        "anon {} KiB, file {} KiB, shmem {} KiB, threads {}",
                        field("RssAnon:"),
                        field("RssFile:"),
                        field("RssShmem:"),
                        field("Threads:")
                    );
                    max = (rss, start.elapsed().as_millis(), parts);
                }
                if rss == 0 {
                    break;
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            max
        })
    });
    let mut first_seen = None;
    loop {
        let unseen = watcher.unseen_count("INBOX");
        if unseen == 0 {
            break;
        }
        if unseen < n && first_seen.is_none() {
            first_seen = Some(started.elapsed());
        }
        if trace {
            samples.push((
                started.elapsed().as_millis(),
                current_rss_kib(bot.id()) / 1024,
            ));
        }
        if let Ok(Some(status)) = bot.try_wait() {
            panic!("the bot exited with {status} before the mailbox was drained");
        }
        assert!(
            Instant::now() < deadline,
            "the bot did not drain {n} messages in 600 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let rss = peak_rss_kib(bot.id()) as f64 / 1024.0;
    if trace {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", bot.id())).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        println!(
            "  bot CPU: user {} ms, system {} ms in {} ms wall",
            ticks(11) * 10,
            ticks(12) * 10,
            elapsed.as_millis()
        );
        println!(
            "  first \\Seen after {} ms (start-up: process, store, login, search, first batch)",
            first_seen.unwrap_or_default().as_millis()
        );
        let step = (samples.len() / 12).max(1);
        let curve: Vec<String> = samples
            .iter()
            .step_by(step)
            .map(|(ms, mib)| format!("{ms} ms {mib} MiB"))
            .collect();
        println!("  RSS over the drain: {}", curve.join(", "));
    }
    stop(bot);
    if let Some(sampler) = sampler {
        let (kib, at, parts) = sampler.join().unwrap_or_default();
        println!(
            "  highest RSS sampled every 0.5 ms: {} MiB at {at} ms ({parts})",
            kib / 1024
        );
    }
    let store = OrderStore::open(store_url).await.expect("store");
    let outcomes = store.outcomes().await.expect("outcomes");
    let deliveries: i64 = outcomes.iter().map(|o| o.deliveries).sum();
    assert_eq!(deliveries, n as i64, "every message recorded once");
    assert!(
        outcomes.iter().all(|o| o.outcome != "failed"),
        "no message failed"
    );
    (rate(n, elapsed), rss)
}

async fn backlog(n: usize, backend: &str, pg: Option<&PostgresServer>) {
    let server = DovecotServer::start(&[(USER, PASSWORD), (BASE, PASSWORD)]);
    let messages = mix(n);
    let bytes: usize = messages.iter().map(Vec::len).sum();
    server.append(BASE, PASSWORD, "INBOX", &messages);
    let started = Instant::now();
    let (count, _) = server.client(BASE, PASSWORD).fetch_all("INBOX");
    let ceiling = rate(count, started.elapsed());
    let store_url = |dir: &Path| match pg {
        Some(pg) => pg.create_database(),
        None => format!("sqlite://{}", dir.join("orders.db").display()),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    server.append(USER, PASSWORD, "INBOX", &messages);
    drop(messages);
    let unseen_again = |user: &str| {
        let mut client = server.client(user, PASSWORD);
        client.run("SELECT INBOX");
        client.run("UID STORE 1:* -FLAGS.SILENT (\\Seen)");
    };
    let before = if part("before") {
        let (before, _) = bot_drain(&server, &store_url(&dir.path().join("a")), n, 1, None).await;
        unseen_again(USER);
        before
    } else {
        f64::NAN
    };
    // Both swing between runs on this shared machine (the script loop 1:2.5 at 2,000), so
    // the script loop and the bot take turns, three times each, on the same messages made
    // unseen again (the bot with a new database each time), and each row is a median.
    let prefetch = plba_testkit::env_number("PLBA_BENCH_IMAP_PREFETCH", 64) as usize;
    let (mut scripts, mut bots, mut rss) = (Vec::new(), Vec::new(), 0f64);
    for round in 0..3 {
        if round > 0 {
            unseen_again(BASE);
            unseen_again(USER);
        }
        let mut client = server.client(BASE, PASSWORD);
        let started = Instant::now();
        let handled = client.fetch_and_flag_each("INBOX");
        assert_eq!((count, handled), (n, n));
        scripts.push(rate(handled, started.elapsed()));
        drop(client);
        let store = store_url(&dir.path().join(format!("b{round}")));
        let (bot, peak) = bot_drain(&server, &store, n, prefetch, None).await;
        bots.push(bot);
        rss = rss.max(peak);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[1]
    };
    let (script, after) = (median(scripts), median(bots));
    println!(
        "backlog {n:>6} {backend:<10} ({:.1} MiB): bot {after:>6.0} msg/s (median of 3; prefetch 1: {before:>5.0}), peak RSS {rss:>5.1} MiB | \
         script loop {script:>5.0} msg/s (median of 3), FETCH-only ceiling {ceiling:>6.0} msg/s | \
         bot/script {:.2}, bot/ceiling {:.2}, batched/prefetch 1 {:.2}",
        bytes as f64 / (1 << 20) as f64,
        after / script,
        after / ceiling,
        after / before,
    );
}

/// The same backlog drained with a password and with XOAUTH2 logins (tokens of
/// `lifetime` from testkit's endpoint; each login is introspected by Dovecot), taking turns
/// three times each on one server. With tokens of an hour's kind, token work happens at the
/// first login only; with tokens of one second, sessions log in again every 0.8 s during
/// the drain, which shows what a renewal costs.
async fn backlog_oauth2(n: usize, lifetime: Duration) {
    let tokens = plba_testkit::TokenServer::start(USER, lifetime);
    tokens.add_client("bench-app", "bench-client-secret-0123456789");
    let server = DovecotServer::start_with(
        &[(USER, PASSWORD)],
        plba_testkit::DovecotOptions {
            oauth2_introspection_url: Some(tokens.introspection_url()),
            ..Default::default()
        },
    );
    server.append(USER, PASSWORD, "INBOX", &mix(n));
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("client-secret");
    std::fs::write(&secret, "bench-client-secret-0123456789\n").expect("secret");
    let login = format!(
        "auth = \"xoauth2\"\n[sources.inbox.oauth2]\ntoken_url = \"{}\"\nclient_id = \"bench-app\"\n\
         client_secret_file = \"{}\"\ngrant = \"client_credentials\"\n",
        tokens.token_url(),
        secret.display()
    );
    let prefetch = plba_testkit::env_number("PLBA_BENCH_IMAP_PREFETCH", 64) as usize;
    let (mut passwords, mut oauth2) = (Vec::new(), Vec::new());
    for round in 0..3 {
        for (rates, login) in [(&mut passwords, None), (&mut oauth2, Some(login.as_str()))] {
            let store = format!(
                "sqlite://{}",
                dir.path()
                    .join(format!(
                        "{round}-{}.db",
                        rates.len() + login.map_or(0, |_| 10)
                    ))
                    .display()
            );
            let (rate, _) = bot_drain(&server, &store, n, prefetch, login).await;
            rates.push(rate);
            let mut client = server.client(USER, PASSWORD);
            client.run("SELECT INBOX");
            client.run("UID STORE 1:* -FLAGS.SILENT (\\Seen)");
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[1]
    };
    let counts = tokens.counts();
    let (password, token) = (median(passwords), median(oauth2));
    println!(
        "backlog {n:>6} SQLite     login by XOAUTH2 ({:>4} s tokens): {token:>6.0} msg/s vs password {password:>6.0} msg/s (medians of 3, taking turns) | \
         {} tokens issued, {} introspections (one per login) | xoauth2/password {:.2}",
        lifetime.as_secs(),
        counts.issued_total(),
        counts.introspections,
        token / password,
    );
}

/// The largest backlog with the ERP and reply effects on (each order's delivery and each
/// answerable message's reply written to the outbox in its transaction, sent by the
/// `outbox` and `replies` pools meanwhile, the replies through a private Postfix that
/// discards them) beside the same drain without, taking turns; the drain is timed to the
/// last `\Seen`, and the ERP must then have every order it got once.
async fn backlog_erp(n: usize) {
    let relay = plba_testkit::PostfixServer::start_discarding();
    let server = DovecotServer::start(&[(USER, PASSWORD)]);
    server.append(USER, PASSWORD, "INBOX", &mix(n));
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("pw"), PASSWORD).expect("pw");
    let prefetch = plba_testkit::env_number("PLBA_BENCH_IMAP_PREFETCH", 64) as usize;
    let (mut plain, mut with_erp, mut sent) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..3 {
        for erp_on in [false, true] {
            let erp = plba_testkit::ErpServer::start();
            let lines = format!(
                "password_file = \"{}\"\n{}",
                dir.path().join("pw").display(),
                if erp_on {
                    format!(
                        "\n[apps.mail_order_bot.erp]\nurl = \"{}\"\n\n[apps.mail_order_bot.reply]\nfrom = \"orders@plba.test\"\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n",
                        erp.url(),
                        relay.port()
                    )
                } else {
                    String::new()
                }
            );
            let db = dir.path().join(format!("erp-{round}-{erp_on}.db"));
            let store = format!("sqlite://{}", db.display());
            let (rate, _) = bot_drain(&server, &store, n, prefetch, Some(&lines)).await;
            if erp_on {
                let orders = OrderStore::open(&store)
                    .await
                    .expect("store")
                    .order_count_after(0)
                    .await
                    .expect("orders") as usize;
                // The bot was stopped at the last \Seen: what it had not sent yet waits in
                // the outbox for the next start, so only what it sent is checked here.
                let applied = erp.applied().len();
                assert!(applied <= orders);
                assert!(erp.requests_by_key().values().all(|c| *c == 1));
                sent.push((applied, orders));
                with_erp.push(rate);
            } else {
                plain.push(rate);
            }
            let mut client = server.client(USER, PASSWORD);
            client.run("SELECT INBOX");
            client.run("UID STORE 1:* -FLAGS.SILENT (\\Seen)");
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[1]
    };
    let (without, with) = (median(plain), median(with_erp));
    println!(
        "backlog {n:>6} SQLite     with the ERP and reply effects: {with:>6.0} msg/s vs without {without:>6.0} msg/s (medians of 3, taking turns) | \
         orders sent by the last \\Seen (sent/created): {sent:?} | with/without {:.2}",
        with / without,
    );
}

/// Each stage alone, on the same mix: where the time goes.
async fn stages(n: usize, pg: Option<&PostgresServer>) {
    let messages = mix(n);
    let clients = load_clients_file(&corpus().join("clients.toml")).expect("clients");
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = mail_order_bot::domain::message::MailLimits::default();
    let started = Instant::now();
    let facts: Vec<_> = messages.iter().map(|m| read_mail(m, &limits)).collect();
    let parse = rate(n, started.elapsed());
    let mut line = format!("stages on {n} messages: parse + extract (one core) {parse:>6.0} msg/s");
    let backends: Vec<(&str, String, String)> = {
        let mut b = vec![(
            "SQLite",
            format!("sqlite://{}", dir.path().join("one.db").display()),
            format!("sqlite://{}", dir.path().join("batch.db").display()),
        )];
        if let Some(pg) = pg {
            b.push(("PostgreSQL", pg.create_database(), pg.create_database()));
        }
        b
    };
    for (name, one_url, batch_url) in backends {
        let one = OrderStore::open(&one_url).await.expect("store");
        let cfg: BotConfig = serde_json::from_value(
            serde_json::json!({ "store_url": one_url, "sender_auth": { "mode": "off" } }),
        )
        .expect("cfg");
        let handler = OrderHandler::new(one.clone(), &cfg, &clients);
        let recs: Vec<Recording> = facts
            .iter()
            .enumerate()
            .map(|(i, f)| handler.decide(f, &format!("t{i}")))
            .collect();
        let started = Instant::now();
        for rec in &recs {
            one.record(rec).await.expect("record");
        }
        let single = rate(n, started.elapsed());
        let batch = OrderStore::open(&batch_url).await.expect("store");
        let started = Instant::now();
        for chunk in recs.chunks(32) {
            let refs: Vec<&Recording> = chunk.iter().collect();
            for r in batch.record_batch(&refs).await {
                r.expect("record");
            }
        }
        let batched = rate(n, started.elapsed());
        line += &format!(
            " | {name} commit: one tx a message {single:>6.0} msg/s, one per 32 {batched:>6.0} msg/s"
        );
    }
    let server = DovecotServer::start(&[(USER, PASSWORD)]);
    server.append(USER, PASSWORD, "INBOX", &messages);
    let uids: Vec<u32> = (1..=n as u32).collect();
    let mut client = server.client(USER, PASSWORD);
    let started = Instant::now();
    client.store_flags("INBOX", &uids, 1, "\\Seen");
    let one = rate(n, started.elapsed());
    let started = Instant::now();
    client.store_flags("INBOX", &uids, 32, "$Bench");
    let sets = rate(n, started.elapsed());
    println!("{line} | \\Seen: one STORE a message {one:>6.0} msg/s, one per 32 {sets:>6.0} msg/s");
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn live(kind: &str, poll_ms: u64, rate: u64, secs: u64) {
    let server = DovecotServer::start(&[(USER, PASSWORD)]);
    let dir = tempfile::tempdir().expect("tempdir");
    let store_url = format!("sqlite://{}", dir.path().join("orders.db").display());
    let bot = spawn_bot(&config(
        dir.path(),
        &server,
        &store_url,
        kind,
        32,
        poll_ms,
        None,
    ));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let total = (rate * secs) as usize;
    let messages = mix(total);
    let appended: Arc<Mutex<HashMap<u32, Instant>>> = Arc::default();
    let appender = {
        let appended = Arc::clone(&appended);
        let mut client = server.client(USER, PASSWORD);
        std::thread::spawn(move || {
            let start = Instant::now();
            for (i, message) in messages.iter().enumerate() {
                let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let at = Instant::now();
                if let Some(uid) = client.append_one("INBOX", message) {
                    appended.lock().expect("lock").insert(uid, at);
                }
            }
        })
    };
    let mut watcher = server.client(USER, PASSWORD);
    let mut latencies: HashMap<u32, Duration> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(secs + 30);
    while latencies.len() < total && Instant::now() < deadline {
        let now = Instant::now();
        let seen = watcher.seen_uids("INBOX");
        let appended = appended.lock().expect("lock").clone();
        for uid in seen {
            if let (false, Some(at)) = (latencies.contains_key(&uid), appended.get(&uid)) {
                latencies.insert(uid, now.saturating_duration_since(*at));
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = appender.join();
    stop(bot);
    let mut sorted: Vec<Duration> = latencies.into_values().collect();
    sorted.sort();
    let mode = if kind == "imap_idle" {
        "IDLE        ".to_owned()
    } else {
        format!("poll {:>2} s   ", poll_ms / 1000)
    };
    println!(
        "live {rate:>3}/s {mode}: {}/{total} seen; append -> \\Seen p50 {:>5} ms, p99 {:>5} ms, max {:>5} ms (checked every 10 ms)",
        sorted.len(),
        percentile(&sorted, 0.5).as_millis(),
        percentile(&sorted, 0.99).as_millis(),
        sorted.last().copied().unwrap_or_default().as_millis(),
    );
}

/// Whether `PLBA_BENCH_IMAP_PARTS` (`backlog,before,stages,live`: all by default) asks for
/// `name`; a part left out is printed as not asked for (NaN), never silently.
fn part(name: &str) -> bool {
    std::env::var("PLBA_BENCH_IMAP_PARTS")
        .map(|parts| parts.split(',').any(|p| p.trim() == name))
        .unwrap_or(true)
}

fn main() {
    let secs = plba_testkit::env_number("PLBA_BENCH_IMAP_LIVE_SECS", 10);
    let backlogs: Vec<usize> = std::env::var("PLBA_BENCH_IMAP_BACKLOGS")
        .unwrap_or_else(|_| "2000,10000".into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    let with_pg = plba_testkit::env_number("PLBA_BENCH_IMAP_PG", 1) != 0;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "imap: private Dovecot on loopback; the bot as its own process (release), imap_poll, 4 workers, prefetch {}, \
         4 IMAP connections, in-memory queue; a mix of {} corpus messages",
        plba_testkit::env_number("PLBA_BENCH_IMAP_PREFETCH", 64),
        templates().len()
    );
    let pg = with_pg.then(PostgresServer::start);
    if pg.is_none() {
        println!("PostgreSQL rows not asked for (PLBA_BENCH_IMAP_PG=0)");
    }
    if let Ok(parts) = std::env::var("PLBA_BENCH_IMAP_PARTS") {
        println!("parts asked for (PLBA_BENCH_IMAP_PARTS): {parts}");
    }
    rt.block_on(async {
        for &n in backlogs.iter().filter(|_| part("backlog")) {
            backlog(n, "SQLite", None).await;
            if let Some(pg) = &pg {
                backlog(n, "PostgreSQL", Some(pg)).await;
            }
        }
        if part("oauth2") {
            let n = backlogs.last().copied().unwrap_or(10_000);
            backlog_oauth2(n, Duration::from_secs(3600)).await;
            backlog_oauth2(n, Duration::from_secs(1)).await;
        }
        if part("erp") {
            backlog_erp(backlogs.last().copied().unwrap_or(10_000)).await;
        }
        if part("stages") {
            stages(backlogs.first().copied().unwrap_or(2000), pg.as_ref()).await;
        }
        if part("live") {
            live("imap_idle", 5000, 200, secs).await;
            live("imap_poll", 5000, 200, secs).await;
        }
    });
}
