//! Replicas sharing one mailbox: 1, 2 and 3 bot processes (release build) on one private
//! Dovecot, one redis-server and one private PostgreSQL, each with 4 workers whose handler
//! spends 20 ms on simulated I/O per message (a slow ERP), draining the same backlog.
//! Prints messages/s per replica count and the ratio to one replica, and checks each run:
//! every message recorded once, every message seen, never two watchers at once.
//!
//! Knobs: `PLBA_BENCH_REPLICAS_MESSAGES` (3000), `PLBA_BENCH_REPLICAS_DELAY_MS` (20),
//! `PLBA_BENCH_REPLICAS` (`1,2,3`).
//!
//! A replica is this benchmark's own executable run again with
//! `PLBA_BENCH_REPLICA_CONFIG` set: the bot's module with its handler wrapped by the delay.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mail_order_bot::compose::{build_runtime, load_config};
use mail_order_bot::domain::store::OrderStore;
use mail_order_bot::module::WrappedModule;
use plba_testkit::{DovecotServer, PostgresServer, RedisServer};
use runtime_contracts::{BoxFuture, HandlerContext, HandlerError, Outcome, Task, TaskHandler};

const USER: &str = "orders";
const PASSWORD: &str = "bench-pass";
const REPLICA_CONFIG: &str = "PLBA_BENCH_REPLICA_CONFIG";

/// The bot's handler behind `delay` of simulated I/O per message.
struct Slow(Arc<dyn TaskHandler>, Duration);

impl TaskHandler for Slow {
    fn handle<'a>(
        &'a self,
        task: &'a Task,
        ctx: &'a HandlerContext,
    ) -> BoxFuture<'a, Result<Outcome, HandlerError>> {
        Box::pin(async move {
            tokio::time::sleep(self.1).await;
            self.0.handle(task, ctx).await
        })
    }
}

/// Runs as one replica until killed.
fn replica(config: &str) {
    let delay = Duration::from_millis(plba_testkit::env_number("PLBA_BENCH_REPLICAS_DELAY_MS", 20));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let config =
            Arc::new(load_config(Some(Path::new(config)), Some(HashMap::new())).expect("config"));
        let module = Arc::new(WrappedModule::new("slow-bot", move |h| {
            Arc::new(Slow(h, delay)) as Arc<dyn TaskHandler>
        }));
        let mut runtime = build_runtime(config, module, None).await.expect("runtime");
        runtime.start().expect("start");
        std::future::pending::<()>().await;
    });
}

fn mail(i: usize) -> Vec<u8> {
    format!(
        "From: buyer@acme.example\r\nTo: orders@example.com\r\nSubject: order {i}\r\n\
         Message-ID: <replica-{i}@bench.example>\r\nContent-Type: text/plain\r\n\r\n\
         Please deliver:\r\nSKU-{} x {}\r\n",
        1000 + i,
        i % 9 + 1
    )
    .into_bytes()
}

#[allow(clippy::too_many_arguments)]
fn config(
    dir: &Path,
    i: usize,
    server: &DovecotServer,
    redis: &RedisServer,
    prefix: &str,
    store_url: &str,
    replicas: usize,
    port: u16,
) -> std::path::PathBuf {
    let pw = dir.join("pw");
    let text = format!(
        r#"
[runtime]
log = "error"

[control]
enabled = true
bind = "127.0.0.1:{port}"
read_tokens = ["read-token-1-7c1f0e9b2d4a6f835e21"]

[queue]
type = "redis"
url = "{redis}"
key_prefix = "{prefix}"
claim_min_idle_ms = 30000

[pools.orders]
workers = 4
prefetch = 1
handler_timeout_ms = 20000

[sources.inbox]
type = "imap_poll"
host = "127.0.0.1"
port = {imap}
tls = "none"
user = "{USER}"
password_file = "{pw}"
pool = "orders"
poll_interval_ms = 200
connections = 2
replicas = {replicas}
lease_ttl_ms = 3000

[apps.mail_order_bot]
sender_auth = {{ mode = "off" }}
store_url = "{store_url}"

[[apps.mail_order_bot.clients]]
id = "C-1"
name = "Acme"
domains = ["acme.example"]
"#,
        redis = redis.url(),
        imap = server.port(),
        pw = pw.display(),
    );
    let path = dir.join(format!("replica-{i}.toml"));
    std::fs::write(&path, text).expect("config");
    path
}

/// Replicas holding the mailbox's lease now, from their control planes.
async fn holders(ports: &[u16]) -> usize {
    let mut n = 0;
    for port in ports {
        let answer = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{port}/status"))
            .bearer_auth("read-token-1-7c1f0e9b2d4a6f835e21")
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        if let Ok(r) = answer {
            if let Ok(s) = r.json::<serde_json::Value>().await {
                n += usize::from(s["sources"]["inbox"]["lease"]["held"] == true);
            }
        }
    }
    n
}

/// One run: `replicas` processes drain the (unseen again) backlog of `n`: messages/s from
/// their start, and from the first `\Seen` (start-up left out: process, store, lease).
async fn run(
    server: &DovecotServer,
    redis: &RedisServer,
    pg: &PostgresServer,
    n: usize,
    replicas: usize,
) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store_url = pg.create_database();
    let prefix = format!("bench{replicas}");
    let ports: Vec<u16> = (0..replicas).map(|_| plba_testkit::free_port()).collect();
    std::fs::write(dir.path().join("pw"), PASSWORD).expect("pw");
    let exe = std::env::current_exe().expect("exe");
    let started = Instant::now();
    let mut children: Vec<Child> = ports
        .iter()
        .enumerate()
        .map(|(i, &port)| {
            let path = config(
                dir.path(),
                i,
                server,
                redis,
                &prefix,
                &store_url,
                replicas,
                port,
            );
            Command::new(&exe)
                .env(REPLICA_CONFIG, &path)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("replica")
        })
        .collect();
    let mut watcher = server.client(USER, PASSWORD);
    let mut most_watchers = 0;
    let mut first_seen = None;
    loop {
        let unseen = watcher.unseen_count("INBOX");
        if unseen == 0 {
            break;
        }
        if unseen < n && first_seen.is_none() {
            first_seen = Some(Instant::now());
        }
        most_watchers = most_watchers.max(holders(&ports).await);
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "not drained in 600 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    let draining = first_seen.map_or(elapsed, |t| t.elapsed());
    for child in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert!(
        most_watchers <= 1,
        "{most_watchers} replicas watched at once"
    );
    let outcomes = OrderStore::open(&store_url)
        .await
        .expect("store")
        .outcomes()
        .await
        .expect("outcomes");
    let deliveries: i64 = outcomes.iter().map(|o| o.deliveries).sum();
    assert_eq!(
        (outcomes.len(), deliveries),
        (n, n as i64),
        "every message recorded once"
    );
    assert!(
        outcomes.iter().all(|o| o.outcome == "created"),
        "all orders"
    );
    let mut client = server.client(USER, PASSWORD);
    client.run("SELECT INBOX");
    client.run("UID STORE 1:* -FLAGS.SILENT (\\Seen)");
    (
        n as f64 / elapsed.as_secs_f64(),
        n as f64 / draining.as_secs_f64(),
    )
}

fn main() {
    if let Ok(config) = std::env::var(REPLICA_CONFIG) {
        replica(&config);
        return;
    }
    let n = plba_testkit::env_number("PLBA_BENCH_REPLICAS_MESSAGES", 3000) as usize;
    let delay = plba_testkit::env_number("PLBA_BENCH_REPLICAS_DELAY_MS", 20);
    let counts: Vec<usize> = std::env::var("PLBA_BENCH_REPLICAS")
        .unwrap_or_else(|_| "1,2,3".into())
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    println!(
        "replicas: {n} messages, 4 workers per replica (prefetch 1), {delay} ms of simulated I/O per \
         message, Redis queue, PostgreSQL store, one private Dovecot; the lease holder watches"
    );
    let server = DovecotServer::start(&[(USER, PASSWORD)]);
    let redis = RedisServer::start(false);
    let pg = PostgresServer::start();
    server.append(
        USER,
        PASSWORD,
        "INBOX",
        &(0..n).map(mail).collect::<Vec<_>>(),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut base = None;
        for replicas in counts {
            let (total, draining) = run(&server, &redis, &pg, n, replicas).await;
            let (base_total, base_draining) = *base.get_or_insert((total, draining));
            println!(
                "replicas {replicas}: {draining:>6.0} msg/s draining (x{:.2} of one replica), {total:>6.0} msg/s from start (x{:.2}) \
                 | one watcher at every sample, every message once and seen",
                draining / base_draining,
                total / base_total,
            );
        }
    });
}
