//! Mail from a private Dovecot to committed orders with `\Seen`, beside what IMAP alone can
//! do in the same run.
//!
//! `cargo bench -p mail-order-bot --bench imap` (part of `just bench`):
//! - backlogs of 2,000 and 10,000 orders: messages/s from the mailbox to committed orders
//!   with `\Seen` (IDLE source, 4 workers, SQLite), beside the IMAP-only ceiling: one
//!   `UID FETCH 1:* BODY.PEEK[]` of the same messages with no processing;
//! - live arrival at 20 and 200 messages/s for `PLBA_BENCH_IMAP_LIVE_SECS` (10) seconds:
//!   append → `\Seen` latency p50/p99 with IDLE and with 5 s polling. Dovecot batches IDLE
//!   notifications for about half a second, which is the floor.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mail_order_bot::compose::{build_runtime, load_config};
use mail_order_bot::module::MailOrderModule;
use plba_testkit::DovecotServer;

const USER: &str = "orders";
const PASSWORD: &str = "bench-pass";

fn order(i: usize) -> Vec<u8> {
    format!(
        "From: Buyer <purchasing@acme.example>\r\nTo: orders@supplier.example\r\nSubject: Order {i}\r\n\
         Message-ID: <bench-{i}@test.example>\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\r\nHello,\r\n\r\nSKU-{} x 3\r\nSKU-42 x 1\r\n\r\nThanks\r\n",
        1000 + i
    )
    .into_bytes()
}

fn config(
    dir: &std::path::Path,
    server: &DovecotServer,
    kind: &str,
    poll_ms: u64,
) -> std::path::PathBuf {
    std::fs::write(dir.join("pw"), PASSWORD).expect("pw");
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
prefetch = 4

[sources.inbox]
type = "{kind}"
host = "127.0.0.1"
port = {port}
tls = "none"
user = "{USER}"
password_file = "{pw}"
pool = "orders"
poll_interval_ms = {poll_ms}
batch_size = 500
connections = 4

[apps.mail_order_bot]
store_url = "sqlite://{db}"

[[apps.mail_order_bot.clients]]
id = "C-1"
name = "Acme"
domains = ["acme.example"]
"#,
        port = server.port(),
        pw = dir.join("pw").display(),
        db = dir.join("orders.db").display(),
    );
    let path = dir.join("bot.toml");
    std::fs::write(&path, text).expect("config");
    path
}

async fn runtime(path: &std::path::Path) -> runtime_core::RuntimeManager {
    let config = Arc::new(load_config(Some(path), Some(HashMap::new())).expect("config"));
    let mut runtime = build_runtime(config, Arc::new(MailOrderModule), None)
        .await
        .expect("runtime");
    runtime.start().expect("start");
    runtime
}

async fn backlog(n: usize) {
    let server = DovecotServer::start(&[(USER, PASSWORD)]);
    let messages: Vec<Vec<u8>> = (0..n).map(order).collect();
    server.append(USER, PASSWORD, "INBOX", &messages);
    let started = Instant::now();
    let (count, bytes) = server.client(USER, PASSWORD).fetch_all("INBOX");
    let ceiling = count as f64 / started.elapsed().as_secs_f64();
    assert_eq!(count, n);

    let dir = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let rt = runtime(&config(dir.path(), &server, "imap_idle", 5000)).await;
    // The source counts a message completed once its \Seen is stored (after the commit).
    while rt.status().await.sources["inbox"].completed < n as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    rt.shutdown().await;
    assert_eq!(server.client(USER, PASSWORD).seen_uids("INBOX").len(), n);
    let rate = n as f64 / elapsed.as_secs_f64();
    println!(
        "backlog {n:>6} ({:.1} MiB): bot {rate:>8.0} messages/s to committed orders with \\Seen; \
         IMAP-only FETCH ceiling {ceiling:>8.0} messages/s; ratio {:.2}",
        bytes as f64 / (1 << 20) as f64,
        rate / ceiling
    );
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
    let rt = runtime(&config(dir.path(), &server, kind, poll_ms)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let total = (rate * secs) as usize;
    let appended: Arc<Mutex<HashMap<u32, Instant>>> = Arc::default();
    let appender = {
        let appended = Arc::clone(&appended);
        let mut client = server.client(USER, PASSWORD);
        std::thread::spawn(move || {
            let start = Instant::now();
            for i in 0..total {
                let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let at = Instant::now();
                if let Some(uid) = client.append_one("INBOX", &order(i)) {
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
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let _ = appender.join();
    rt.shutdown().await;
    let mut sorted: Vec<Duration> = latencies.into_values().collect();
    sorted.sort();
    let mode = if kind == "imap_idle" {
        "IDLE        ".to_owned()
    } else {
        format!("poll {:>2} s   ", poll_ms / 1000)
    };
    println!(
        "live {rate:>3}/s {mode}: {}/{total} seen; append -> \\Seen p50 {:>6} ms, p99 {:>6} ms (checked every 25 ms)",
        sorted.len(),
        percentile(&sorted, 0.5).as_millis(),
        percentile(&sorted, 0.99).as_millis()
    );
}

fn main() {
    let secs = plba_testkit::env_number("PLBA_BENCH_IMAP_LIVE_SECS", 10);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!("imap: private Dovecot on loopback, bot with the IMAP source, 4 workers, 4 IMAP connections, SQLite, in-memory queue");
    rt.block_on(async {
        for n in [2_000, 10_000] {
            backlog(n).await;
        }
        for rate in [20, 200] {
            live("imap_idle", 5000, rate, secs).await;
            live("imap_poll", 5000, rate, secs).await;
        }
    });
}
