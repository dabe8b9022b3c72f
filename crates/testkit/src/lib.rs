//! The workspace's test harness: real servers started on free loopback ports from a private
//! temp dir, stopped when dropped. A test that needs a server and cannot get one fails with
//! a clear message; it never skips. `scripts/test.sh` installs the servers when missing.
//!
//! Also the two parts many runtime tests need around the part they test: a source that
//! publishes a fixed list of tasks, or none ([`StaticSource`]), and a module that registers
//! one handler ([`OneHandler`]).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use runtime_contracts::{
    ApplicationModule, BoxFuture, ConfigProblem, ConfigProvider, ModuleError, ModuleRegistry,
    SourceContext, SourceError, SourceState, SourceStatus, Task, TaskHandler, TaskSource,
};

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
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

fn find(program: &str, install_hint: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path).chain(["/usr/sbin".into(), "/usr/bin".into()]) {
        let candidate = dir.join(program);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("{program} is not installed: run `bash scripts/test.sh`, which installs it ({install_hint})");
}

/// A private redis-server.
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    aof: bool,
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
    /// Starts redis-server on a free port; with `aof`, every write is logged
    /// (`appendfsync everysec`) so that a restart keeps the data.
    pub fn start(aof: bool) -> Self {
        let mut server = Self {
            port: free_port(),
            dir: tempfile::Builder::new()
                .prefix("plba-redis")
                .tempdir()
                .expect("tempdir"),
            aof,
            child: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let binary = find("redis-server", "apt-get install redis-server");
        let child = Command::new(binary)
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--daemonize", "no"])
            .args(["--appendonly", if self.aof { "yes" } else { "no" }])
            .args(["--appendfsync", "everysec"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.dir.path().join("redis.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        self.wait_ready();
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
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            server.port,
            server.dir.path().display()
        );
        server.run_checked(
            "pg_ctl",
            &[
                "-D",
                &data.display().to_string(),
                "-l",
                &server.dir.path().join("server.log").display().to_string(),
                "-o",
                &options,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        server
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
