//! The workspace's test harness: real servers started on free loopback ports from a private
//! temp dir, stopped when dropped. A test that needs a server and cannot get one fails with
//! a clear message; it never skips. `scripts/test.sh` installs the servers when missing.
//!
//! Also the two parts many runtime tests need around the part they test: a source that
//! publishes a fixed list of tasks, or none ([`StaticSource`]), and a module that registers
//! one handler ([`OneHandler`]).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod dns;
mod erp;
mod oauth;
mod otlp;
mod postfix;
mod proxy;
mod rabbit;
pub use dns::DnsServer;
pub use erp::{ErpMode, ErpRequest, ErpServer};
pub use oauth::{TokenCounts, TokenMode, TokenServer};
pub use otlp::{OtlpReceiver, ReceivedSpan};
pub use postfix::PostfixServer;
pub use proxy::StallProxy;
pub use rabbit::RabbitServer;

use runtime_contracts::{
    ApplicationModule, Backpressure, BoxFuture, CancelSignal, ConfigProblem, ConfigProvider,
    Headers, ModuleError, ModuleRegistry, SourceContext, SourceError, SourceState, SourceStatus,
    Task, TaskHandler, TaskQueue, TaskSource, TraceFactory,
};

/// The stop signal of a source under test: [`StopSignal::stop`] fires it.
#[derive(Debug, Default)]
pub struct StopSignal(std::sync::atomic::AtomicBool, tokio::sync::Notify);

impl StopSignal {
    /// Fires the signal: the source's `start` returns.
    pub fn stop(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        self.1.notify_waiters();
    }
}

impl CancelSignal for StopSignal {
    fn is_cancelled(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn cancelled(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            loop {
                // Registered before the flag is checked, so a stop in between still wakes it.
                let notified = self.1.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.is_cancelled() {
                    return;
                }
                notified.await;
            }
        })
    }
}

struct NoBackpressure;
impl Backpressure for NoBackpressure {
    fn wait_for_capacity(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

struct NoTrace;
impl TraceFactory for NoTrace {
    fn inject_current(&self, _headers: &mut Headers) {}
}

/// What a source under test is started with, without a runtime: `queue`, a stop signal,
/// no backpressure and no tracing.
pub fn source_context(queue: Arc<dyn TaskQueue>) -> (SourceContext, Arc<StopSignal>) {
    let stop = Arc::new(StopSignal::default());
    let ctx = SourceContext {
        queue,
        shutdown: stop.clone(),
        backpressure: Arc::new(NoBackpressure),
        tracer: Arc::new(NoTrace),
        sources: Arc::new(runtime_contracts::NoSources),
    };
    (ctx, stop)
}

/// A source that publishes a fixed list of tasks when started (with the trace context
/// written into each, as a real source does), then waits for shutdown. It has nothing to
/// load, completes without doing anything, and reports its scan once its tasks are
/// published (an empty one at once), so that `wait_until_idle` cannot find the queues idle
/// before the tasks are in them.
pub struct StaticSource {
    id: &'static str,
    tasks: std::sync::Mutex<Vec<Task>>,
    scanned: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for StaticSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticSource")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl StaticSource {
    /// A source that publishes nothing (the test publishes itself).
    pub fn empty(id: &'static str) -> Self {
        Self::publishing(id, Vec::new())
    }

    /// A source that publishes `tasks` once, when started.
    pub fn publishing(id: &'static str, tasks: Vec<Task>) -> Self {
        Self {
            id,
            scanned: std::sync::atomic::AtomicBool::new(tasks.is_empty()),
            tasks: std::sync::Mutex::new(tasks),
        }
    }
}

impl TaskSource for StaticSource {
    fn id(&self) -> &str {
        self.id
    }
    fn start(&self, ctx: SourceContext) -> BoxFuture<'_, Result<(), SourceError>> {
        Box::pin(async move {
            let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
            for mut task in tasks {
                ctx.tracer.inject_current(&mut task.headers);
                ctx.queue.publish(task).await.map_err(|e| SourceError::Io {
                    source_id: self.id.to_owned(),
                    message: e.to_string(),
                })?;
            }
            self.scanned
                .store(true, std::sync::atomic::Ordering::SeqCst);
            ctx.shutdown.cancelled().await;
            Ok(())
        })
    }
    fn status(&self) -> SourceStatus {
        SourceStatus {
            state: SourceState::Running,
            published: 0,
            completed: 0,
            pending: 0,
            last_event_age: self
                .scanned
                .load(std::sync::atomic::Ordering::SeqCst)
                .then_some(Duration::ZERO),
            last_error: None,
            next_due: None,
            lease: None,
        }
    }
    fn load_content<'a>(
        &'a self,
        _t: &'a Task,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, SourceError>> {
        Box::pin(async { Ok(None) })
    }
    fn complete<'a>(&'a self, _t: &'a Task) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async { Ok(()) })
    }
}

/// A handler that runs a hook on each task, then hands the task unchanged to the handler
/// it wraps (every method forwarded): for tests that act between a task's publish and its
/// handling (delete the message it points at, note the time of each attempt).
pub struct BeforeEach {
    inner: Arc<dyn TaskHandler>,
    hook: Arc<dyn Fn(&Task) + Send + Sync>,
}

impl std::fmt::Debug for BeforeEach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BeforeEach").finish_non_exhaustive()
    }
}

impl BeforeEach {
    /// `inner`, with `hook` run on each task first.
    pub fn new(inner: Arc<dyn TaskHandler>, hook: Arc<dyn Fn(&Task) + Send + Sync>) -> Self {
        Self { inner, hook }
    }
}

impl TaskHandler for BeforeEach {
    fn handle<'a>(
        &'a self,
        task: &'a Task,
        ctx: &'a runtime_contracts::HandlerContext,
    ) -> BoxFuture<'a, Result<runtime_contracts::Outcome, runtime_contracts::HandlerError>> {
        (self.hook)(task);
        self.inner.handle(task, ctx)
    }

    fn handle_batch<'a>(
        &'a self,
        tasks: &'a [Arc<Task>],
        ctx: &'a runtime_contracts::HandlerContext,
    ) -> BoxFuture<'a, Vec<Result<runtime_contracts::Outcome, runtime_contracts::HandlerError>>>
    {
        for task in tasks {
            (self.hook)(task);
        }
        self.inner.handle_batch(tasks, ctx)
    }

    fn on_dead_letter<'a>(
        &'a self,
        task: &'a Task,
        ctx: &'a runtime_contracts::HandlerContext,
        failure: &'a runtime_contracts::AttemptFailure,
    ) -> BoxFuture<'a, ()> {
        self.inner.on_dead_letter(task, ctx, failure)
    }
}

/// A module that registers one handler for `kind` on `pool` (declaring the pool), and
/// optionally a source of its own publishing to it; it has no configuration.
pub struct OneHandler {
    /// The pool.
    pub pool: &'static str,
    /// The task kind.
    pub kind: &'static str,
    /// The handler.
    pub handler: Arc<dyn TaskHandler>,
    /// A source the module brings, if any.
    pub source: Option<Arc<dyn TaskSource>>,
}

impl std::fmt::Debug for OneHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OneHandler")
            .field("pool", &self.pool)
            .field("kind", &self.kind)
            .finish()
    }
}

impl ApplicationModule for OneHandler {
    fn name(&self) -> &str {
        "test-module"
    }
    fn config_section(&self) -> &str {
        "apps.test"
    }
    fn validate_config(&self, _section: Option<&serde_json::Value>) -> Vec<ConfigProblem> {
        Vec::new()
    }
    fn register<'a>(
        &'a self,
        registry: &'a mut dyn ModuleRegistry,
        _config: &'a dyn ConfigProvider,
    ) -> BoxFuture<'a, Result<(), ModuleError>> {
        Box::pin(async move {
            registry.pool(self.pool);
            registry.handler(self.pool, self.kind, Arc::clone(&self.handler));
            if let Some(source) = &self.source {
                registry.source(Arc::clone(source), self.pool);
            }
            Ok(())
        })
    }
}

/// A free TCP port on 127.0.0.1 (free when asked; the server binds it right after).
/// Consumes and acknowledges every task `queue` hands out until none comes for 300 ms:
/// their ids, sorted.
pub async fn drain_ids(queue: &dyn TaskQueue) -> Vec<String> {
    let mut ids = Vec::new();
    while let Some(lease) = queue
        .consume(Duration::from_millis(300))
        .await
        .expect("consume")
    {
        ids.push(lease.task.id.as_str().to_owned());
        queue.ack(&lease).await.expect("ack");
    }
    ids.sort();
    ids
}

/// A loopback port for a private server, free now and held for this process: it is drawn
/// below the kernel's ephemeral range (32768 and up here), so no outbound connection can take
/// it while its server is stopped for an outage test and started again on it, and a lock file
/// (`flock`, released when the process ends) keeps every other process of the machine
/// (a second test run) and every later call in this one from handing it out too.
pub fn free_port() -> u16 {
    static HELD: Mutex<Vec<nix::fcntl::Flock<std::fs::File>>> = Mutex::new(Vec::new());
    let dir = std::env::temp_dir().join("plba-ports");
    std::fs::create_dir_all(&dir).expect("the port lock directory");
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    let random = std::collections::hash_map::RandomState::new();
    for attempt in 0u32..10_000 {
        let draw = std::hash::BuildHasher::hash_one(&random, (attempt, std::process::id()));
        let port = 20_000 + (draw % 12_000) as u16;
        let Ok(file) = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(port.to_string()))
        else {
            continue;
        };
        // Held by another process, or by this one (a second flock on a new descriptor of
        // the same file is refused too).
        let Ok(lock) = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        held.push(lock);
        return port;
    }
    panic!("no free loopback port between 20000 and 32000");
}

/// The path of `program` on the PATH (or in /usr/sbin, /usr/bin); panics with how to install
/// it when it is missing: a test that needs a program never skips.
pub fn find(program: &str, install_hint: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path).chain(["/usr/sbin".into(), "/usr/bin".into()]) {
        let candidate = dir.join(program);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("{program} is not installed: run `bash scripts/test.sh`, which installs it ({install_hint})");
}

/// A test CA and a server certificate signed by it, for `localhost` and `127.0.0.1`, in `d`:
/// `ca.pem`, `server.pem` and `server.key` (P-256, valid three days; the key readable by all,
/// for servers that run as another user).
pub fn make_certificates(d: &Path) {
    let p = |name: &str| d.join(name).display().to_string();
    std::fs::write(
        d.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext");
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut args = vec!["req", "-x509"];
    args.extend(ec);
    let (ca_key, ca_pem) = (p("ca.key"), p("ca.pem"));
    args.extend([
        "-keyout",
        &ca_key,
        "-out",
        &ca_pem,
        "-days",
        "3",
        "-subj",
        "/CN=plba test CA",
    ]);
    run("openssl", &args);
    let mut args = vec!["req"];
    args.extend(ec);
    let (key, csr) = (p("server.key"), p("server.csr"));
    args.extend(["-keyout", &key, "-out", &csr, "-subj", "/CN=localhost"]);
    run("openssl", &args);
    let (pem, ext) = (p("server.pem"), p("server.ext"));
    run(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "3",
            "-extfile",
            &ext,
        ],
    );
    run("chmod", &["0644", &key]);
}

/// A private redis-server.
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    /// `appendfsync` of the append-only file; none: no AOF.
    aof: Option<&'static str>,
    /// The TLS port (`start_tls`), certificates in the data folder.
    tls_port: Option<u16>,
    child: Option<Child>,
}

impl std::fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisServer")
            .field("port", &self.port)
            .field("aof", &self.aof)
            .finish()
    }
}

impl RedisServer {
    /// Starts redis-server on a free port; with `aof`, every write is logged and synced
    /// before Redis answers (`appendfsync always`), so that a write acknowledged before a
    /// kill is there after the restart. (With `everysec`, Redis answers while it holds a
    /// write back behind a slow sync: a SIGKILL loses up to two seconds of writes, and a
    /// test that kills it would fail on a busy disk.)
    pub fn start(aof: bool) -> Self {
        Self::start_with(aof.then_some("always"))
    }

    /// Starts redis-server with an AOF synced as `appendfsync` says (`always`, `everysec`,
    /// `no`), or none.
    pub fn start_with(appendfsync: Option<&'static str>) -> Self {
        Self::launch(appendfsync, false)
    }

    fn launch(aof: Option<&'static str>, tls: bool) -> Self {
        let mut server = Self {
            port: free_port(),
            dir: tempfile::Builder::new()
                .prefix("plba-redis")
                .tempdir()
                .expect("tempdir"),
            aof,
            tls_port: tls.then(free_port),
            child: None,
        };
        if tls {
            make_certificates(server.dir.path());
        }
        server.spawn();
        server
    }

    /// Starts redis-server with a TLS port as well (a test CA's certificate for `localhost`
    /// and `127.0.0.1`; clients need no certificate). The plain port stays for readiness.
    pub fn start_tls() -> Self {
        Self::launch(None, true)
    }

    /// `rediss://localhost:TLS_PORT` of a [`RedisServer::start_tls`] server.
    pub fn tls_url(&self) -> String {
        format!(
            "rediss://localhost:{}",
            self.tls_port.expect("started with start_tls")
        )
    }

    /// The PEM file of the CA that signed the TLS certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn spawn(&mut self) {
        let binary = find("redis-server", "apt-get install redis-server");
        let child = Command::new(binary)
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--daemonize", "no"])
            .args([
                "--appendonly",
                if self.aof.is_some() { "yes" } else { "no" },
            ])
            .args(["--appendfsync", self.aof.unwrap_or("everysec")])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.dir.path().join("redis.log"))
            .args(self.tls_args())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        self.wait_ready();
    }

    fn tls_args(&self) -> Vec<String> {
        let Some(port) = self.tls_port else {
            return Vec::new();
        };
        let d = self.dir.path();
        let file = |name: &str| d.join(name).display().to_string();
        vec![
            "--tls-port".into(),
            port.to_string(),
            "--tls-cert-file".into(),
            file("server.pem"),
            "--tls-key-file".into(),
            file("server.key"),
            "--tls-ca-cert-file".into(),
            file("ca.pem"),
            "--tls-auth-clients".into(),
            "no".into(),
        ]
    }

    fn wait_ready(&self) {
        let start = Instant::now();
        loop {
            if self.ping() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "redis-server on port {} did not answer within 20 s; log: {}",
                self.port,
                std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the server answers `PING`.
    pub fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Its data folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops the server (SIGKILL: no final save), keeping its data folder.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and folder (with AOF, the data comes back).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The folder of PostgreSQL's server programs (`initdb`, `pg_ctl`): Debian keeps them out of
/// `PATH`, under `/usr/lib/postgresql/VERSION/bin`; the newest version wins.
fn postgres_bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return bin;
    }
    find("initdb", "apt-get install postgresql")
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// A private PostgreSQL cluster: `initdb` into a temp dir and a server on a free loopback
/// port, trust authentication, stopped (immediately) when dropped. PostgreSQL refuses to
/// run as root, so as root the cluster belongs to, and runs as, the `postgres` user.
pub struct PostgresServer {
    port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
    run_as: Option<String>,
    databases: std::sync::atomic::AtomicUsize,
    /// TLS only (`start_tls`): certificates in the folder, `hostssl` rules alone.
    tls: bool,
}

impl std::fmt::Debug for PostgresServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresServer")
            .field("port", &self.port)
            .finish()
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl PostgresServer {
    /// Creates and starts the cluster. Panics with the server's log when it cannot.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// A cluster that accepts TCP connections over TLS only (`ssl = on`, `hostssl` rules
    /// alone; a test CA's certificate for `localhost` and `127.0.0.1`, see
    /// [`PostgresServer::ca_file`]).
    pub fn start_tls() -> Self {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Self {
        let bin = postgres_bin_dir();
        let run_as = is_root().then(|| "postgres".to_owned());
        let dir = tempfile::Builder::new()
            .prefix("plba-pg")
            .tempdir()
            .expect("tempdir");
        if let Some(user) = &run_as {
            let status = Command::new("chown")
                .arg(format!("{user}:"))
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(
                status.success(),
                "chown {user} {}: is the postgres user there? (apt-get install postgresql)",
                dir.path().display()
            );
        }
        let server = Self {
            port: free_port(),
            dir,
            bin,
            run_as,
            databases: std::sync::atomic::AtomicUsize::new(0),
            tls,
        };
        let data = server.dir.path().join("data");
        server.run_checked(
            "initdb",
            &[
                "-D",
                &data.display().to_string(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        );
        if tls {
            server.use_tls(&data);
        }
        server.start_server();
        server
    }

    /// Certificates beside the data (the key the server's own, 0600, as PostgreSQL wants)
    /// and an `hba` file that admits TCP over TLS only.
    fn use_tls(&self, data: &Path) {
        let d = self.dir.path();
        make_certificates(d);
        let key = d.join("server.key");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
        if let Some(user) = &self.run_as {
            let status = Command::new("chown")
                .arg(format!("{user}:"))
                .arg(&key)
                .status()
                .expect("chown");
            assert!(status.success(), "chown {user} {}", key.display());
        }
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
        )
        .expect("write pg_hba.conf");
    }

    /// The PEM file of the CA that signed a [`PostgresServer::start_tls`] server's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn start_server(&self) {
        let data = self.dir.path().join("data");
        let d = self.dir.path().display();
        let mut options = format!(
            "-p {} -k {d} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
        );
        if self.tls {
            options.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={d}/server.pem -c ssl_key_file={d}/server.key"
            ));
        }
        self.run_checked(
            "pg_ctl",
            &[
                "-D",
                &data.display().to_string(),
                "-l",
                &self.dir.path().join("server.log").display().to_string(),
                "-o",
                &options,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    /// Stops the server at once (`-m immediate`: connections are cut, as in a crash); its
    /// data stays for [`PostgresServer::restart`].
    pub fn stop(&self) {
        let data = self.dir.path().join("data").display().to_string();
        self.run_checked("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
    }

    /// Starts the stopped server again on the same port, with its data.
    pub fn restart(&self) {
        self.start_server();
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(path);
                c
            }
            None => Command::new(path),
        }
    }

    fn run_checked(&self, program: &str, args: &[&str]) {
        let out = self
            .command(program)
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("running {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} failed: {}{}\nserver log: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
        );
    }

    /// A new, empty database; its URL (`postgres://postgres@127.0.0.1:PORT/NAME`).
    pub fn create_database(&self) -> String {
        let n = self
            .databases
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("plba_test_{n}");
        self.run_checked(
            "createdb",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                &name,
            ],
        );
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        let data = self.dir.path().join("data").display().to_string();
        let _ = self
            .command("pg_ctl")
            .args(["-D", &data, "-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs a command, panicking with its output when it fails.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The system user that owns the test mailboxes: Dovecot refuses mail access as root.
const MAIL_USER: &str = "plbamail";

fn mail_user_ids() -> (String, String) {
    let exists = Command::new("id")
        .arg("-u")
        .arg(MAIL_USER)
        .output()
        .is_ok_and(|o| o.status.success());
    if !exists {
        assert!(
            is_root(),
            "the {MAIL_USER} user is missing and only root can create it"
        );
        run(
            "useradd",
            &[
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                MAIL_USER,
            ],
        );
    }
    let uid = run("id", &["-u", MAIL_USER]).trim().to_owned();
    let gid = run("id", &["-g", MAIL_USER]).trim().to_owned();
    (uid, gid)
}

/// What a private Dovecot offers beyond passwords.
#[derive(Clone, Debug, Default)]
pub struct DovecotOptions {
    /// The push plugin's OX driver notifies this URL of every delivery.
    pub push_url: Option<String>,
    /// XOAUTH2 and OAUTHBEARER logins, checked by RFC 7662 introspection at this URL (the
    /// `oauth2` passdb); passwords keep working for PLAIN and LOGIN.
    pub oauth2_introspection_url: Option<String>,
    /// The server does not announce MOVE (RFC 6851).
    pub without_move: bool,
    /// An LMTP listener (`dovecot-lmtpd`) on a free loopback port, for a mail relay to
    /// deliver into the users' INBOXes; the recipient is the user name (e.g.
    /// `buyer@nordic.example`).
    pub lmtp: bool,
}

/// A private Dovecot (IMAP only): its own configuration in a short temp dir, passwd-file
/// users, maildir mailboxes owned by a dedicated system user, a plain listener and an
/// implicit-TLS listener on free loopback ports, with a certificate from its own test CA.
/// Stopped when dropped.
pub struct DovecotServer {
    dir: tempfile::TempDir,
    port: u16,
    tls_port: u16,
    lmtp_port: Option<u16>,
    child: Option<Child>,
}

impl std::fmt::Debug for DovecotServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DovecotServer")
            .field("port", &self.port)
            .field("tls_port", &self.tls_port)
            .finish()
    }
}

impl DovecotServer {
    /// Starts Dovecot with these `(user, password)` accounts; each gets an empty INBOX.
    pub fn start(users: &[(&str, &str)]) -> Self {
        Self::start_with_push(users, None)
    }

    /// [`DovecotServer::start`] with the `push_notification` plugin's OX driver sending each
    /// new delivery ([`DovecotServer::deliver`]) to `push_url` (an HTTP `PUT` of JSON).
    pub fn start_with_push(users: &[(&str, &str)], push_url: Option<&str>) -> Self {
        Self::start_with(
            users,
            DovecotOptions {
                push_url: push_url.map(str::to_owned),
                ..DovecotOptions::default()
            },
        )
    }

    /// [`DovecotServer::start`] with `options`.
    pub fn start_with(users: &[(&str, &str)], options: DovecotOptions) -> Self {
        let push_url = options.push_url.as_deref();
        let binary = find("dovecot", "apt-get install dovecot-imapd");
        let (uid, gid) = mail_user_ids();
        // Socket paths must stay under 107 bytes: a short folder in /tmp.
        let dir = tempfile::Builder::new()
            .prefix("dc")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let d = dir.path().to_path_buf();
        run("chmod", &["0755", &d.display().to_string()]);
        let passwd: String = users
            .iter()
            .map(|(u, p)| format!("{u}:{{PLAIN}}{p}::::::\n"))
            .collect();
        std::fs::write(d.join("passwd"), passwd).expect("passwd");
        for (user, _) in users {
            std::fs::create_dir_all(d.join("home").join(user).join("Maildir")).expect("maildir");
        }
        run(
            "chown",
            &[
                "-R",
                &format!("{uid}:{gid}"),
                &d.join("home").display().to_string(),
            ],
        );
        make_certificates(&d);
        if options.lmtp {
            find("/usr/lib/dovecot/lmtp", "apt-get install dovecot-lmtpd");
        }
        let server = Self {
            port: free_port(),
            tls_port: free_port(),
            lmtp_port: options.lmtp.then(free_port),
            dir,
            child: None,
        };
        let conf = format!(
            r#"protocols = imap{lmtp_protocol}
listen = 127.0.0.1
base_dir = {d}/run
state_dir = {d}/state
instance_name = plba-{port}
log_path = {d}/dovecot.log
info_log_path = {d}/dovecot.log
ssl = yes
ssl_cert = <{d}/server.pem
ssl_key = <{d}/server.key
auth_mechanisms = plain login{mechanisms}
disable_plaintext_auth = no
mail_location = maildir:~/Maildir
# A throwaway test server, like the PostgreSQL one (fsync=off): no fsync of mail or
# indexes, so a neighbour's disk load on a shared machine does not time Dovecot's writes.
# A killed Dovecot loses nothing this way; only a crash of the whole machine would.
mail_fsync = never
mail_max_userip_connections = 20
first_valid_uid = {uid}
default_internal_user = dovecot
default_login_user = dovenull
passdb {{
  driver = passwd-file
{password_mechanisms}  args = username_format=%u {d}/passwd
}}
{oauth2}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={d}/home/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {tls_port}
    ssl = yes
  }}
}}
service stats {{
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
{capability}
{lmtp}
{push}"#,
            d = d.display(),
            lmtp_protocol = if options.lmtp { " lmtp" } else { "" },
            lmtp = server.lmtp_port.map_or(String::new(), |port| format!(
                "service lmtp {{\n  inet_listener lmtp {{\n    address = 127.0.0.1\n    port = {port}\n  }}\n}}\n"
            )),
            mechanisms = if options.oauth2_introspection_url.is_some() { " xoauth2 oauthbearer" } else { "" },
            // Only beside the oauth2 passdb: a passdb limited to mechanisms is skipped by the
            // user lookups of doveadm and the LDA.
            password_mechanisms = if options.oauth2_introspection_url.is_some() { "  mechanisms = plain login\n" } else { "" },
            oauth2 = if options.oauth2_introspection_url.is_some() {
                format!("passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n  args = {}/oauth2.conf\n}}\n", d.display())
            } else {
                String::new()
            },
            // The capabilities of imapd 2.3.19 after login, less MOVE (RFC 6851).
            capability = if options.without_move {
                "protocol imap {\n  imap_capability = IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT SORT=DISPLAY THREAD=REFERENCES THREAD=REFS THREAD=ORDEREDSUBJECT MULTIAPPEND URL-PARTIAL CATENATE UNSELECT CHILDREN NAMESPACE UIDPLUS LIST-EXTENDED I18NLEVEL=1 CONDSTORE QRESYNC ESEARCH ESORT SEARCHRES WITHIN CONTEXT=SEARCH LIST-STATUS BINARY SPECIAL-USE LITERAL+ NOTIFY\n}\n"
            } else {
                ""
            },
            port = server.port,
            tls_port = server.tls_port,
            // The OX driver notifies only users whose http-notify metadata is set (below).
            // Its default 2 s timeout gave up on a loaded CI machine before the bot answered.
            push = push_url.map_or(String::new(), |url| format!(
                "mail_plugins = $mail_plugins notify push_notification\nmail_attribute_dict = file:%h/dovecot-attributes\nplugin {{\n  push_notification_driver = ox:url={url} timeout_msecs=15000 max_retries=3\n}}\n"
            )),
        );
        std::fs::write(d.join("dovecot.conf"), conf).expect("dovecot.conf");
        if let Some(url) = &options.oauth2_introspection_url {
            // Every token login is introspected (no auth cache); the token's username must be
            // the login's, and it must be active.
            std::fs::write(
                d.join("oauth2.conf"),
                format!("introspection_mode = post\nintrospection_url = {url}\nforce_introspection = yes\nusername_attribute = username\nactive_attribute = active\nactive_value = true\ntimeout_msecs = 5000\n"),
            )
            .expect("oauth2.conf");
        }
        let mut server = server;
        server.spawn(&binary);
        if push_url.is_some() {
            let conf = server.dir.path().join("dovecot.conf").display().to_string();
            for (user, _) in users {
                run(
                    "doveadm",
                    &[
                        "-c",
                        &conf,
                        "mailbox",
                        "metadata",
                        "set",
                        "-u",
                        user,
                        "-s",
                        "",
                        "/private/vendor/vendor.dovecot/http-notify",
                        &format!("user={user}"),
                    ],
                );
            }
        }
        server
    }

    /// Delivers `message` to `user`'s INBOX as a mail server would (`dovecot-lda`), so
    /// that the delivery is a new-mail event for the push plugin.
    pub fn deliver(&self, user: &str, message: &[u8]) {
        use std::io::Write as _;
        let mut child = Command::new("/usr/lib/dovecot/dovecot-lda")
            .arg("-c")
            .arg(self.dir.path().join("dovecot.conf"))
            .args(["-d", user])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("dovecot-lda");
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(message)
                .expect("write the message to dovecot-lda");
        }
        let out = child.wait_with_output().expect("dovecot-lda");
        assert!(
            out.status.success(),
            "dovecot-lda failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    fn spawn(&mut self, binary: &Path) {
        use std::os::unix::process::CommandExt;
        // Its own process group, so that a stop can end its mail processes too.
        let child = Command::new(binary)
            .arg("-F")
            .arg("-c")
            .arg(self.dir.path().join("dovecot.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start dovecot");
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if self.greets() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "dovecot on port {} did not greet within 20 s; log: {}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn greets(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).is_ok() && &buf == b"* OK"
    }

    /// Its log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dovecot.log")).unwrap_or_default()
    }

    /// The plain IMAP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The LMTP port ([`DovecotOptions::lmtp`]).
    pub fn lmtp_port(&self) -> u16 {
        self.lmtp_port
            .expect("this Dovecot was started without its LMTP listener")
    }

    /// The implicit-TLS (IMAPS) port.
    pub fn tls_port(&self) -> u16 {
        self.tls_port
    }

    /// The PEM file of the CA that signed the server's certificate (for `localhost`).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Stops Dovecot: SIGTERM to the master, then SIGKILL to whatever is left of its process
    /// group (mail processes still serving open connections), as in a crash of the server.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            // Clients' mail processes may outlive the master, still serving their open
            // connections: an outage ends them too.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .stderr(Stdio::null())
                .status();
            // Its login and mail processes may outlive the master for a moment.
            let start = Instant::now();
            while self.greets() && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Starts it again on the same ports with the same mailboxes.
    pub fn restart(&mut self) {
        self.stop();
        let binary = find("dovecot", "apt-get install dovecot-imapd");
        self.spawn(&binary);
    }

    /// A logged-in line client on the plain port.
    pub fn client(&self, user: &str, password: &str) -> ImapLine {
        ImapLine::login(self.port, user, password)
    }

    /// Appends `messages` to `mailbox` over IMAP, in one pipelined exchange (`LITERAL+`).
    pub fn append(&self, user: &str, password: &str, mailbox: &str, messages: &[Vec<u8>]) {
        let mut imap = ImapLine::login(self.port, user, password);
        for (n, message) in messages.iter().enumerate() {
            let mut command =
                format!("A{n} APPEND {mailbox} {{{}+}}\r\n", message.len()).into_bytes();
            command.extend_from_slice(message);
            command.extend_from_slice(b"\r\n");
            imap.send(&command);
        }
        for n in 0..messages.len() {
            imap.expect_ok(&format!("A{n}"));
        }
    }

    /// The UIDVALIDITY of `mailbox`.
    pub fn uid_validity(&self, user: &str, password: &str, mailbox: &str) -> u64 {
        let mut imap = ImapLine::login(self.port, user, password);
        imap.send(format!("V EXAMINE {mailbox}\r\n").as_bytes());
        imap.until_tagged("V")
            .iter()
            .find_map(|l| {
                l.split("[UIDVALIDITY ")
                    .nth(1)
                    .and_then(|r| r.split(']').next())
                    .and_then(|v| v.parse().ok())
            })
            .expect("UIDVALIDITY in the EXAMINE answer")
    }

    /// UID → flags of every message in `mailbox`.
    pub fn flags(&self, user: &str, password: &str, mailbox: &str) -> BTreeMap<u32, Vec<String>> {
        let mut imap = ImapLine::login(self.port, user, password);
        imap.send(format!("S EXAMINE {mailbox}\r\n").as_bytes());
        imap.expect_ok("S");
        imap.send(b"F UID FETCH 1:* (FLAGS)\r\n");
        let mut out = BTreeMap::new();
        for line in imap.until_tagged("F") {
            let Some(rest) = line.split_once("FETCH (").map(|(_, r)| r) else {
                continue;
            };
            let uid = rest
                .split("UID ")
                .nth(1)
                .and_then(|r| r.split([' ', ')']).next())
                .and_then(|u| u.parse().ok());
            let flags = rest
                .split("FLAGS (")
                .nth(1)
                .and_then(|r| r.split(')').next())
                .map(|f| f.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default();
            if let Some(uid) = uid {
                out.insert(uid, flags);
            }
        }
        out
    }
}

impl Drop for DovecotServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A line-oriented IMAP client for test set-up, checks and benchmark baselines (plain TCP,
/// blocking).
pub struct ImapLine {
    stream: std::io::BufReader<TcpStream>,
    tags: u64,
}

impl std::fmt::Debug for ImapLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImapLine").finish_non_exhaustive()
    }
}

impl ImapLine {
    /// Appends one message; its UID (from Dovecot's `APPENDUID`).
    pub fn append_one(&mut self, mailbox: &str, message: &[u8]) -> Option<u32> {
        self.tags += 1;
        let tag = format!("P{}", self.tags);
        let mut command = format!("{tag} APPEND {mailbox} {{{}+}}\r\n", message.len()).into_bytes();
        command.extend_from_slice(message);
        command.extend_from_slice(b"\r\n");
        self.send(&command);
        let done = self.tagged_line(&tag);
        done.split("APPENDUID ")
            .nth(1)
            .and_then(|r| r.split([' ', ']']).nth(1))
            .and_then(|u| u.parse().ok())
    }

    /// Whether `mailbox` exists (`LIST`).
    pub fn has_mailbox(&mut self, mailbox: &str) -> bool {
        self.tags += 1;
        let tag = format!("L{}", self.tags);
        self.send(format!("{tag} LIST \"\" \"{mailbox}\"\r\n").as_bytes());
        self.until_tagged(&tag)
            .iter()
            .any(|l| l.starts_with("* LIST"))
    }

    /// Runs one command (e.g. `CREATE Orders`), panicking unless it succeeds.
    pub fn run(&mut self, command: &str) {
        self.tags += 1;
        let tag = format!("R{}", self.tags);
        self.send(format!("{tag} {command}\r\n").as_bytes());
        self.expect_ok(&tag);
    }

    /// UIDs of the messages in `mailbox` that carry `\Seen`.
    pub fn seen_uids(&mut self, mailbox: &str) -> Vec<u32> {
        self.tags += 1;
        let tag = format!("Q{}", self.tags);
        self.send(format!("{tag} EXAMINE {mailbox}\r\n").as_bytes());
        self.expect_ok(&tag);
        let tag = format!("{tag}f");
        self.send(format!("{tag} UID SEARCH SEEN\r\n").as_bytes());
        self.until_tagged(&tag)
            .iter()
            .filter_map(|l| l.strip_prefix("* SEARCH"))
            .flat_map(|l| {
                l.split_whitespace()
                    .filter_map(|u| u.parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect()
    }

    /// Fetches every message of `mailbox` with `BODY.PEEK[]` in one command: (messages,
    /// bytes). The ceiling a client can reach reading this mailbox.
    pub fn fetch_all(&mut self, mailbox: &str) -> (usize, usize) {
        self.send(format!("E EXAMINE {mailbox}\r\n").as_bytes());
        self.expect_ok("E");
        self.send(b"F UID FETCH 1:* (BODY.PEEK[])\r\n");
        let (messages, bytes) = self.read_literals("F", |_| {});
        (messages, bytes)
    }

    /// Every message of `mailbox`, whole (`BODY.PEEK[]`, so no flag changes), in UID order.
    pub fn messages(&mut self, mailbox: &str) -> Vec<Vec<u8>> {
        self.tags += 1;
        let tag = format!("M{}", self.tags);
        self.send(format!("{tag} EXAMINE {mailbox}\r\n").as_bytes());
        let exists = self
            .until_tagged(&tag)
            .iter()
            .find_map(|l| {
                l.strip_prefix("* ")?
                    .strip_suffix(" EXISTS\r\n")?
                    .parse()
                    .ok()
            })
            .unwrap_or(0usize);
        let mut out = Vec::new();
        if exists > 0 {
            let tag = format!("{tag}f");
            self.send(format!("{tag} UID FETCH 1:* (BODY.PEEK[])\r\n").as_bytes());
            self.read_literals(&tag, |body| out.push(body));
        }
        out
    }

    /// How many messages of `mailbox` lack `\Seen` (`STATUS … (UNSEEN)`).
    pub fn unseen_count(&mut self, mailbox: &str) -> usize {
        self.tags += 1;
        let tag = format!("U{}", self.tags);
        self.send(format!("{tag} STATUS {mailbox} (UNSEEN)\r\n").as_bytes());
        self.until_tagged(&tag)
            .iter()
            .find_map(|l| {
                l.split("UNSEEN ")
                    .nth(1)
                    .and_then(|r| r.split(')').next())
                    .and_then(|n| n.trim().parse().ok())
            })
            .expect("UNSEEN in the STATUS answer")
    }

    /// The classic loop of a one-connection mail script, without its parsing and its
    /// database: `UID SEARCH UNSEEN`, then for each message `UID FETCH n BODY.PEEK[]` and
    /// `UID STORE n +FLAGS (\Seen)`, one command at a time. Returns the messages handled.
    pub fn fetch_and_flag_each(&mut self, mailbox: &str) -> usize {
        self.send(format!("S SELECT {mailbox}\r\n").as_bytes());
        self.expect_ok("S");
        self.send(b"Q UID SEARCH UNSEEN\r\n");
        let uids: Vec<u32> = self
            .until_tagged("Q")
            .iter()
            .filter_map(|l| l.strip_prefix("* SEARCH"))
            .flat_map(|l| {
                l.split_whitespace()
                    .filter_map(|u| u.parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect();
        for uid in &uids {
            self.send(format!("F UID FETCH {uid} (BODY.PEEK[])\r\n").as_bytes());
            let (fetched, _) = self.read_literals("F", |_| {});
            assert_eq!(fetched, 1, "UID {uid} fetched");
            self.send(format!("W UID STORE {uid} +FLAGS.SILENT (\\Seen)\r\n").as_bytes());
            self.expect_ok("W");
        }
        uids.len()
    }

    /// Sets `flags` on `uids` of `mailbox`, `per_command` UIDs a `UID STORE`.
    pub fn store_flags(&mut self, mailbox: &str, uids: &[u32], per_command: usize, flags: &str) {
        self.send(format!("S SELECT {mailbox}\r\n").as_bytes());
        self.expect_ok("S");
        for chunk in uids.chunks(per_command.max(1)) {
            let set: Vec<String> = chunk.iter().map(u32::to_string).collect();
            self.send(
                format!("W UID STORE {} +FLAGS.SILENT ({flags})\r\n", set.join(",")).as_bytes(),
            );
            self.expect_ok("W");
        }
    }

    /// Reads the answer of `tag`, counting its literals and handing each to `keep`:
    /// (literals, bytes).
    fn read_literals(&mut self, tag: &str, mut keep: impl FnMut(Vec<u8>)) -> (usize, usize) {
        use std::io::Read as _;
        let (mut messages, mut bytes) = (0, 0);
        loop {
            let line = self.line();
            assert!(!line.is_empty(), "dovecot closed the connection");
            if line.starts_with(&format!("{tag} ")) {
                assert!(line.starts_with(&format!("{tag} OK")), "{line}");
                return (messages, bytes);
            }
            if let Some(size) = line
                .trim_end()
                .strip_suffix('}')
                .and_then(|l| l.rsplit_once('{'))
                .and_then(|(_, n)| n.parse::<usize>().ok())
            {
                let mut body = vec![0u8; size];
                self.stream.read_exact(&mut body).expect("literal");
                messages += 1;
                bytes += size;
                keep(body);
            }
        }
    }

    fn tagged_line(&mut self, tag: &str) -> String {
        loop {
            let line = self.line();
            assert!(!line.is_empty(), "dovecot closed the connection");
            if line.starts_with(&format!("{tag} ")) {
                assert!(line.starts_with(&format!("{tag} OK")), "{line}");
                return line;
            }
        }
    }

    /// Connects to `127.0.0.1:port` and logs in.
    pub fn login(port: u16, user: &str, password: &str) -> Self {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to dovecot");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let mut imap = Self {
            stream: std::io::BufReader::new(stream),
            tags: 0,
        };
        let greeting = imap.line();
        assert!(greeting.starts_with("* OK"), "greeting: {greeting}");
        imap.send(format!("L LOGIN {user} {password}\r\n").as_bytes());
        imap.expect_ok("L");
        imap
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream
            .get_mut()
            .write_all(bytes)
            .expect("write to dovecot");
    }

    fn line(&mut self) -> String {
        use std::io::BufRead;
        let mut line = String::new();
        self.stream.read_line(&mut line).expect("read from dovecot");
        line
    }

    fn until_tagged(&mut self, tag: &str) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let line = self.line();
            assert!(!line.is_empty(), "dovecot closed the connection");
            if line.starts_with(&format!("{tag} ")) {
                assert!(line.starts_with(&format!("{tag} OK")), "{line}");
                return lines;
            }
            lines.push(line);
        }
    }

    fn expect_ok(&mut self, tag: &str) {
        self.until_tagged(tag);
    }
}

/// A number from the environment (benchmark sizes), else `default`.
pub fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
