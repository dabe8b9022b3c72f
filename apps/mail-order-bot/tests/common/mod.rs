//! Test kit shared by the bot's integration tests: a temp workspace with a Maildir and a
//! SQLite store, mail generators, and assertions over both.
#![allow(dead_code)]

pub mod plane;
pub mod relay;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use std::sync::Arc;

use mail_order_bot::domain::store::OrderStore;
use mail_order_bot::module::WrappedModule;
use runtime_adapters::sources::maildir::deliver;
use runtime_contracts::{
    ApplicationModule, AttemptFailure, BoxFuture, HandlerContext, HandlerError, Outcome, Task,
    TaskHandler,
};

/// A temp folder holding `maildir/` and `orders.db`, and a config pointing at them.
pub struct Workspace {
    pub dir: tempfile::TempDir,
    /// The store URL, when not the workspace's own SQLite file.
    pub store: Option<String>,
}

pub const CLIENTS: &str = r#"
[[apps.mail_order_bot.clients]]
id = "C-1"
name = "Acme"
domains = ["acme.example"]

[[apps.mail_order_bot.clients]]
id = "C-2"
name = "Nordic"
addresses = ["buyer@nordic.example"]
"#;

impl Workspace {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        for sub in ["tmp", "new", "cur"] {
            std::fs::create_dir_all(dir.path().join("maildir").join(sub)).expect("maildir");
        }
        Self { dir, store: None }
    }

    /// A workspace whose orders go to the database at `store_url` (e.g. PostgreSQL).
    pub fn with_store(store_url: String) -> Self {
        Self {
            store: Some(store_url),
            ..Self::new()
        }
    }

    pub fn maildir(&self) -> PathBuf {
        self.dir.path().join("maildir")
    }

    pub fn store_url(&self) -> String {
        if let Some(url) = &self.store {
            return url.clone();
        }
        format!("sqlite://{}", self.dir.path().join("orders.db").display())
    }

    /// A config for this workspace; `max_attempts` and fast retries for tests.
    pub fn config(&self, workers: usize, max_attempts: u32) -> PathBuf {
        self.config_with(workers, max_attempts, "")
    }

    /// The text of [`Workspace::config`] with `extra` appended (e.g. a `[control]` section).
    pub fn config_text(&self, workers: usize, max_attempts: u32, extra: &str) -> String {
        let path = self.config_with(workers, max_attempts, extra);
        std::fs::read_to_string(path).expect("read config")
    }

    /// A config whose queue is the Redis Streams queue at `url`; work pending for more than
    /// `claim_ms` is taken over (handler timeouts are 1 s below it).
    pub fn config_redis(&self, url: &str, workers: usize, claim_ms: u64, extra: &str) -> PathBuf {
        let text = self
            .config_text(workers, 3, extra)
            .replace(
                "type = \"memory\"\ncapacity = 100000\nlease_timeout_ms = 60000",
                &format!(
                    "type = \"redis\"\nurl = \"{url}\"\nclaim_min_idle_ms = {claim_ms}\nreclaim_interval_ms = 100\nmax_deliveries = 3"
                ),
            )
            .replace("handler_timeout_ms = 20000", &format!("handler_timeout_ms = {}", claim_ms - 1000));
        assert!(
            text.contains("type = \"redis\""),
            "the queue section was replaced"
        );
        let path = self.dir.path().join("bot-redis.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }

    /// [`Workspace::config`] on the AMQP queue at `url` (quorum queues under `prefix`).
    pub fn config_amqp(&self, url: &str, workers: usize, prefix: &str) -> PathBuf {
        let text = self.config_text(workers, 3, "").replace(
            "type = \"memory\"\ncapacity = 100000\nlease_timeout_ms = 60000",
            &format!(
                "type = \"amqp\"\nurl = \"{url}\"\nqueue_prefix = \"{prefix}\"\nmax_deliveries = 3"
            ),
        );
        assert!(
            text.contains("type = \"amqp\""),
            "the queue section was replaced"
        );
        let path = self.dir.path().join("bot-amqp.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }

    /// [`Workspace::config`] with `extra` appended.
    pub fn config_with(&self, workers: usize, max_attempts: u32, extra: &str) -> PathBuf {
        let text = format!(
            r#"
[runtime]
shutdown_deadline_ms = 5000
log = "info"

[queue]
type = "memory"
capacity = 100000
lease_timeout_ms = 60000

[pools.orders]
workers = {workers}
handler_timeout_ms = 20000
max_attempts = {max_attempts}
high_watermark = 64

[pools.orders.retry]
initial_backoff_ms = 10
max_backoff_ms = 50
jitter = 0.1

[sources.inbox]
type = "maildir"
path = "{maildir}"
pool = "orders"
poll_interval_ms = 50

[apps.mail_order_bot]
store_url = "{store}"
sender_auth = {{ mode = "off" }}
{CLIENTS}
{extra}
"#,
            maildir = self.maildir().display(),
            store = self.store_url(),
        );
        let path = self.dir.path().join("bot.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }

    pub fn deliver(&self, unique: &str, mail: &str) {
        deliver(&self.maildir(), unique, mail.as_bytes()).expect("deliver");
    }

    pub fn deliver_bytes(&self, unique: &str, mail: &[u8]) {
        deliver(&self.maildir(), unique, mail).expect("deliver");
    }

    pub async fn store(&self) -> OrderStore {
        OrderStore::open(&self.store_url())
            .await
            .expect("open store")
    }

    /// Waits (up to a minute) until the store holds `n` orders.
    pub async fn wait_for_orders(&self, n: usize) {
        wait_for(Duration::from_secs(60), &format!("{n} orders"), || async {
            self.store()
                .await
                .orders_after(0)
                .await
                .expect("orders")
                .len()
                == n
        })
        .await;
    }

    /// Unique name → whether the file is marked seen, for every message in the Maildir.
    pub fn seen_flags(&self) -> BTreeMap<String, bool> {
        let mut out = BTreeMap::new();
        for sub in ["new", "cur"] {
            for entry in std::fs::read_dir(self.maildir().join(sub)).expect("read") {
                let name = entry
                    .expect("entry")
                    .file_name()
                    .into_string()
                    .expect("utf-8");
                let (unique, flags) = match name.split_once(":2,") {
                    Some((u, f)) => (u.to_owned(), f.to_owned()),
                    None => (name.clone(), String::new()),
                };
                out.insert(unique, sub == "cur" && flags.contains('S'));
            }
        }
        out
    }

    /// The Message-ID of every message file, by unique name.
    pub fn message_ids(&self) -> HashMap<String, String> {
        let mut out = HashMap::new();
        for sub in ["new", "cur"] {
            for entry in std::fs::read_dir(self.maildir().join(sub)).expect("read") {
                let entry = entry.expect("entry");
                let name = entry.file_name().into_string().expect("utf-8");
                let unique = name.split(":2,").next().unwrap_or(&name).to_owned();
                let text = String::from_utf8_lossy(&std::fs::read(entry.path()).expect("read"))
                    .into_owned();
                if let Some(id) = text
                    .lines()
                    .find_map(|l| l.strip_prefix("Message-ID: <"))
                    .and_then(|l| l.strip_suffix('>'))
                {
                    out.insert(unique, format!("mid:{id}"));
                }
            }
        }
        out
    }
}

/// A plain-text order from `from` with Message-ID `<{id}@test.example>`.
pub fn order_mail(id: &str, from: &str, lines: &[(&str, u32)]) -> String {
    let body: Vec<String> = lines.iter().map(|(s, q)| format!("{s} x {q}")).collect();
    format!(
        "From: Buyer <{from}>\r\nTo: orders@supplier.example\r\nSubject: Order {id}\r\n\
         Message-ID: <{id}@test.example>\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\r\nHello,\r\n\r\n{}\r\n\r\nThanks\r\n",
        body.join("\r\n")
    )
}

/// What a generated mailbox should end up as.
#[derive(Debug, Default)]
pub struct Expected {
    /// Message identities that must have exactly one order.
    pub orders: Vec<String>,
    /// Message identities that must have an outcome but no order, with the outcome.
    pub other: Vec<(String, &'static str)>,
}

/// Fills the workspace's Maildir with [`mixed_mail`]`(n)`.
pub fn fill_mailbox(ws: &Workspace, n: usize) -> Expected {
    let (mails, expected) = mixed_mail(n);
    for (i, mail) in mails.iter().enumerate() {
        ws.deliver(&format!("{:06}.M{i}P1.test", 1_700_000_000 + i), mail);
    }
    expected
}

/// `n` messages: mostly valid orders from both clients, every tenth from an unknown
/// sender, every fifteenth with no lines, and every twentieth a resend of an earlier order
/// (same Message-ID, same bytes).
pub fn mixed_mail(n: usize) -> (Vec<String>, Expected) {
    let mut expected = Expected::default();
    let mut mails = Vec::with_capacity(n);
    let mut orders_sent: Vec<String> = Vec::new();
    for i in 0..n {
        let id = format!("order-{i}");
        if i % 20 == 19 {
            // A resend: the same bytes as an earlier order.
            let earlier = orders_sent[orders_sent.len() / 2].clone();
            mails.push(earlier);
            continue;
        }
        if i % 10 == 9 {
            mails.push(order_mail(&id, "someone@unknown.example", &[("SKU-1", 1)]));
            expected
                .other
                .push((format!("mid:{id}@test.example"), "unknown_client"));
            continue;
        }
        if i % 15 == 14 {
            mails.push(order_mail(&id, "x@acme.example", &[]));
            expected
                .other
                .push((format!("mid:{id}@test.example"), "no_lines"));
            continue;
        }
        let from = if i % 2 == 0 {
            "purchasing@acme.example"
        } else {
            "buyer@nordic.example"
        };
        let sku = format!("SKU-{}", 1000 + i);
        let mail = order_mail(&id, from, &[(&sku, (i % 7 + 1) as u32), ("SKU-42", 2)]);
        mails.push(mail.clone());
        orders_sent.push(mail);
        expected.orders.push(format!("mid:{id}@test.example"));
    }
    (mails, expected)
}

/// Waits for `condition` up to `limit`, checking every few milliseconds.
pub async fn wait_for<F, Fut>(limit: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !condition().await {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Asserts the promises over a store and a Maildir: every expected order exists exactly
/// once with one order per identity, and every message marked seen has a recorded outcome.
pub async fn assert_exactly_once(ws: &Workspace, expected: &Expected) {
    let outcomes = assert_store_exactly_once(ws, expected).await;
    assert_seen_only_with_outcome(ws, &outcomes);
}

/// The store part of [`assert_exactly_once`]; returns identity → outcome.
pub async fn assert_store_exactly_once(
    ws: &Workspace,
    expected: &Expected,
) -> HashMap<String, String> {
    let store = ws.store().await;
    let orders = store.orders_after(0).await.expect("orders");
    let mut per_identity: HashMap<&str, usize> = HashMap::new();
    for o in &orders {
        *per_identity.entry(o.message_identity.as_str()).or_default() += 1;
    }
    assert!(
        per_identity.values().all(|n| *n == 1),
        "an order was created twice"
    );
    assert_eq!(orders.len(), expected.orders.len(), "order count");
    for id in &expected.orders {
        assert_eq!(per_identity.get(id.as_str()), Some(&1), "order for {id}");
    }
    let outcomes: HashMap<String, String> = store
        .outcomes()
        .await
        .expect("outcomes")
        .into_iter()
        .map(|o| (o.message_identity, o.outcome))
        .collect();
    for (id, outcome) in &expected.other {
        assert_eq!(
            outcomes.get(id).map(String::as_str),
            Some(*outcome),
            "outcome of {id}"
        );
    }
    outcomes
}

/// Nothing is marked seen that has no recorded outcome.
pub fn assert_seen_only_with_outcome(ws: &Workspace, outcomes: &HashMap<String, String>) {
    let ids = ws.message_ids();
    for (unique, seen) in ws.seen_flags() {
        if seen {
            let id = ids.get(&unique).expect("message id");
            let outcome = outcomes.get(id).map(String::as_str);
            assert!(
                outcome.is_some_and(|o| o != "failed"),
                "{unique} is seen but its outcome is {outcome:?}"
            );
        }
    }
}

/// A bot process whose output goes to files in the workspace (a pipe nobody reads would fill
/// up and stall it).
pub struct BotProcess {
    pub child: std::process::Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl BotProcess {
    /// Starts `mail-order-bot run --config CONFIG [--once]` in the workspace.
    pub fn spawn(ws: &Workspace, config: &std::path::Path, once: bool) -> Self {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let stdout = ws.dir.path().join(format!("bot-{n}.out"));
        let stderr = ws.dir.path().join(format!("bot-{n}.err"));
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_mail-order-bot"));
        cmd.arg("run").arg("--config").arg(config);
        if once {
            cmd.arg("--once");
        }
        let child = cmd
            .current_dir(ws.dir.path())
            .env_remove("RUST_LOG")
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn the bot");
        Self {
            child,
            stdout,
            stderr,
        }
    }

    /// Sends a signal.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        nix::sys::signal::kill(pid, sig).expect("send signal");
    }

    /// Waits for the exit: the exit code (-1 when killed by a signal), stdout and stderr.
    pub fn finish(mut self) -> (i32, String, String) {
        let status = self.child.wait().expect("wait");
        let read = |p: &PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        (
            status.code().unwrap_or(-1),
            read(&self.stdout),
            read(&self.stderr),
        )
    }
}

/// A test that fails before it stops its bots leaves none running (they would retry their
/// servers, which the test's end stopped, for ever).
impl Drop for BotProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Orders in the workspace's store so far (0 before the bot created it).
pub async fn orders_so_far(ws: &Workspace) -> usize {
    if !ws.dir.path().join("orders.db").exists() {
        return 0;
    }
    ws.store()
        .await
        .orders_after(0)
        .await
        .map(|o| o.len())
        .unwrap_or(0)
}

/// Messages not marked seen.
pub fn unseen(ws: &Workspace) -> usize {
    ws.seen_flags().values().filter(|s| !**s).count()
}

/// Test-only module: the real bot, with its handler wrapped so that messages carrying
/// `X-Test-Fault: error` always fail, `X-Test-Fault: panic` always panic and
/// `X-Test-Fault: once` fail their first attempt only.
pub struct FaultyBot;

struct Faulty(Arc<dyn TaskHandler>);

impl TaskHandler for Faulty {
    fn handle<'a>(
        &'a self,
        task: &'a Task,
        ctx: &'a HandlerContext,
    ) -> BoxFuture<'a, Result<Outcome, HandlerError>> {
        Box::pin(async move {
            let raw = ctx
                .load_content(task)
                .await
                .ok()
                .flatten()
                .unwrap_or_default();
            let text = String::from_utf8_lossy(&raw);
            if text.contains("X-Test-Fault: error")
                || (text.contains("X-Test-Fault: once") && task.attempt == 0)
            {
                return Err(HandlerError::retry("injected fault: the ERP is down"));
            }
            if text.contains("X-Test-Fault: panic") {
                panic!("injected panic");
            }
            self.0.handle(task, ctx).await
        })
    }

    /// The bot's own batch for the messages without a fault; the faulty ones fail (or
    /// panic, failing the whole call) as they do alone.
    fn handle_batch<'a>(
        &'a self,
        tasks: &'a [Arc<Task>],
        ctx: &'a HandlerContext,
    ) -> BoxFuture<'a, Vec<Result<Outcome, HandlerError>>> {
        Box::pin(async move {
            let contents = ctx.load_batch(tasks).await;
            let faults: Vec<Option<&str>> = contents
                .iter()
                .map(|c| {
                    let raw = c
                        .as_ref()
                        .ok()
                        .and_then(Option::as_deref)
                        .unwrap_or_default();
                    let text = String::from_utf8_lossy(raw);
                    // A batch holds first attempts only: `once` fails here.
                    [
                        "X-Test-Fault: error",
                        "X-Test-Fault: panic",
                        "X-Test-Fault: once",
                    ]
                    .into_iter()
                    .find(|f| text.contains(f))
                })
                .collect();
            if faults.contains(&Some("X-Test-Fault: panic")) {
                panic!("injected panic");
            }
            let clean: Vec<Arc<Task>> = tasks
                .iter()
                .zip(&faults)
                .filter(|(_, f)| f.is_none())
                .map(|(t, _)| Arc::clone(t))
                .collect();
            let mut handled = self.0.handle_batch(&clean, ctx).await.into_iter();
            faults
                .iter()
                .map(|f| match f {
                    Some(_) => Err(HandlerError::retry("injected fault: the ERP is down")),
                    None => handled
                        .next()
                        .unwrap_or_else(|| Err(HandlerError::retry("missing result"))),
                })
                .collect()
        })
    }

    fn on_dead_letter<'a>(
        &'a self,
        task: &'a Task,
        ctx: &'a HandlerContext,
        failure: &'a AttemptFailure,
    ) -> BoxFuture<'a, ()> {
        self.0.on_dead_letter(task, ctx, failure)
    }
}

/// Test-only module: the real bot whose handler, once a task or batch is committed,
/// appends a line to `marker` and never returns, so the source never completes it: the
/// state a crash between the commit and the `\\Seen` store leaves.
pub struct StallAfterCommit {
    pub marker: PathBuf,
}

struct Stall(Arc<dyn TaskHandler>, PathBuf);

impl Stall {
    async fn committed(&self, n: usize) {
        use std::io::Write as _;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.1)
        {
            let _ = writeln!(f, "{n}");
        }
        std::future::pending::<()>().await;
    }
}

impl TaskHandler for Stall {
    fn handle<'a>(
        &'a self,
        task: &'a Task,
        ctx: &'a HandlerContext,
    ) -> BoxFuture<'a, Result<Outcome, HandlerError>> {
        Box::pin(async move {
            let outcome = self.0.handle(task, ctx).await;
            self.committed(1).await;
            outcome
        })
    }

    fn handle_batch<'a>(
        &'a self,
        tasks: &'a [Arc<Task>],
        ctx: &'a HandlerContext,
    ) -> BoxFuture<'a, Vec<Result<Outcome, HandlerError>>> {
        Box::pin(async move {
            let outcomes = self.0.handle_batch(tasks, ctx).await;
            self.committed(tasks.len()).await;
            outcomes
        })
    }
}

/// Test-only module: the real bot whose handler first runs `delete` on each task (before
/// the message is fetched), so that a message can vanish between publish and fetch.
pub struct DeleteBeforeFetch<F>(pub F);

impl<F: Fn(&Task) + Send + Sync + 'static> DeleteBeforeFetch<F> {
    /// The module to hand `build_runtime`.
    pub fn module(self) -> Arc<dyn ApplicationModule> {
        let delete: Arc<dyn Fn(&Task) + Send + Sync> = Arc::new(self.0);
        Arc::new(WrappedModule::new("delete-before-fetch", move |h| {
            Arc::new(plba_testkit::BeforeEach::new(h, Arc::clone(&delete))) as Arc<dyn TaskHandler>
        }))
    }
}

/// Asserts that the run whose status is `status` dead-lettered nothing and that the store
/// holds exactly one `skipped` outcome, `message gone`, named by a task id starting with
/// `identity_prefix`; gives every outcome.
pub async fn assert_one_skipped(
    ws: &Workspace,
    status: &runtime_core::RuntimeStatus,
    identity_prefix: &str,
) -> Vec<mail_order_bot::domain::store::OutcomeRow> {
    assert_eq!(
        status.pools[0].dead_lettered, 0,
        "a gone message is no failure"
    );
    let outcomes = ws.store().await.outcomes().await.expect("outcomes");
    let skipped: Vec<_> = outcomes.iter().filter(|o| o.outcome == "skipped").collect();
    assert_eq!(skipped.len(), 1, "{outcomes:?}");
    assert_eq!(skipped[0].reason.as_deref(), Some("message gone"));
    assert!(
        skipped[0].message_identity.starts_with(identity_prefix),
        "{:?}",
        skipped[0]
    );
    outcomes
}

impl FaultyBot {
    /// The module to hand `build_runtime`.
    pub fn module() -> Arc<dyn ApplicationModule> {
        Arc::new(WrappedModule::new("faulty-bot", |h| {
            Arc::new(Faulty(h)) as Arc<dyn TaskHandler>
        }))
    }
}

impl StallAfterCommit {
    /// The module to hand `build_runtime`.
    pub fn module(self) -> Arc<dyn ApplicationModule> {
        let marker = self.marker;
        Arc::new(WrappedModule::new("stall-after-commit", move |h| {
            Arc::new(Stall(h, marker.clone())) as Arc<dyn TaskHandler>
        }))
    }
}

/// A bot on a durable queue killed (SIGKILL) mid-run over 1,000 mails, then another process
/// run with `--once`: the queue gives it what the dead one held and it finds the rest.
/// Every order exactly once, every message seen.
pub async fn killed_process_then_another(ws: &Workspace, config: &std::path::Path) {
    let expected = fill_mailbox(ws, 1000);
    let first = BotProcess::spawn(ws, config, false);
    wait_for(Duration::from_secs(120), "the first orders", || async {
        orders_so_far(ws).await >= 30
    })
    .await;
    first.signal(nix::sys::signal::Signal::SIGKILL);
    first.finish();
    assert!(unseen(ws) > 0, "the kill came mid-run");
    let (code, _, stderr) = BotProcess::spawn(ws, config, true).finish();
    assert_eq!(code, 0, "{stderr}");
    assert_exactly_once(ws, &expected).await;
    assert_eq!(unseen(ws), 0, "every message is seen");
}

/// A bot on a durable queue over 1,000 mails whose server `restart` restarts mid-run: the
/// bot recovers by itself, loses nothing and doubles nothing.
pub async fn server_restarted_mid_run(
    ws: &Workspace,
    config: &std::path::Path,
    restart: impl FnOnce(),
) {
    let expected = fill_mailbox(ws, 1000);
    let bot = BotProcess::spawn(ws, config, false);
    wait_for(Duration::from_secs(120), "the first orders", || async {
        orders_so_far(ws).await >= 30
    })
    .await;
    restart();
    wait_for(
        Duration::from_secs(180),
        "every message to be handled",
        || async { unseen(ws) == 0 },
    )
    .await;
    bot.signal(nix::sys::signal::Signal::SIGTERM);
    let (code, _, stderr) = bot.finish();
    assert_eq!(code, 0, "{stderr}");
    assert_exactly_once(ws, &expected).await;
}

/// A consumer of the `orders` queue on the Redis at `url` that the test drives by hand
/// (one that takes a task and dies, or loses it).
#[allow(dead_code)]
pub fn ghost_consumer(url: &str, name: &str) -> runtime_adapters::queue::redis::RedisQueue {
    runtime_adapters::queue::redis::RedisQueue::new(
        "orders",
        runtime_adapters::queue::redis::RedisQueueConfig {
            url: url.to_owned(),
            consumer: name.into(),
            ..runtime_adapters::queue::redis::RedisQueueConfig::default()
        },
    )
    .expect("queue")
}

/// `GET /status` of a bot's control plane; `None` while it does not answer.
pub async fn try_status(port: u16) -> Option<serde_json::Value> {
    let answer = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/status"))
        .bearer_auth("read-token-1-7c1f0e9b2d4a6f835e21")
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .ok()?;
    answer.json().await.ok()
}

/// Stops each replica once its `pool`'s queue has marked all `total` rows settled; how
/// many of them each replica's pool processed itself (both must have worked, and together
/// exactly `total`).
pub async fn stop_replicas_counting(
    replicas: &[Arc<runtime_core::RuntimeManager>],
    pool: &str,
    total: u64,
) -> Vec<u64> {
    let mut processed = Vec::new();
    for runtime in replicas {
        wait_for(Duration::from_secs(10), "the marks", || async {
            let queue = runtime.queue(pool).expect("the pool's queue");
            queue.stats().await.is_ok_and(|s| s.processed == total)
        })
        .await;
        let status = runtime
            .pool_status()
            .into_iter()
            .find(|p| p.name == pool)
            .expect("the pool");
        processed.push(status.processed);
        runtime.shutdown().await;
    }
    assert_eq!(processed.iter().sum::<u64>(), total, "{processed:?}");
    assert!(
        processed.iter().all(|p| *p > 0),
        "every replica worked: {processed:?}"
    );
    processed
}
