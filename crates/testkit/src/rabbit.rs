//! A private RabbitMQ broker: its own node name, data and log folders, AMQP port,
//! distribution port and epmd, all in a short temp dir on free loopback ports. Never the
//! machine's broker.

use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

/// How long a cold broker may take to boot (Erlang start, Mnesia, Ra for quorum queues).
const BOOT_LIMIT: Duration = Duration::from_secs(90);

/// A private rabbitmq-server, killed (with its epmd) when dropped.
pub struct RabbitServer {
    port: u16,
    dist_port: u16,
    epmd_port: u16,
    /// The AMQPS listener (`start_tls`), certificates in the folder.
    tls_port: Option<u16>,
    dir: tempfile::TempDir,
    epmd: Option<Child>,
    broker: Option<Child>,
}

impl std::fmt::Debug for RabbitServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitServer")
            .field("port", &self.port)
            .field("node", &self.node())
            .finish()
    }
}

fn server_script() -> PathBuf {
    let script = PathBuf::from("/usr/lib/rabbitmq/bin/rabbitmq-server");
    assert!(
        script.is_file(),
        "rabbitmq-server is not installed: run `bash scripts/test.sh`, which installs it \
         (apt-get install rabbitmq-server)"
    );
    script
}

impl RabbitServer {
    /// Starts a broker on free ports and waits until it accepts AMQP connections.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// A broker with an AMQPS (TLS) listener as well: a test CA's certificate for
    /// `localhost` and `127.0.0.1`, no client certificates asked for.
    pub fn start_tls() -> Self {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("plba-rmq")
            .tempdir()
            .expect("tempdir");
        let mut server = Self {
            port: free_port(),
            dist_port: free_port(),
            epmd_port: free_port(),
            tls_port: tls.then(free_port),
            dir,
            epmd: None,
            broker: None,
        };
        server.write_config();
        let epmd = Command::new(crate::find("epmd", "apt-get install erlang-base"))
            .args([
                "-port",
                &server.epmd_port.to_string(),
                "-address",
                "127.0.0.1",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start epmd");
        server.epmd = Some(epmd);
        server.spawn();
        server
    }

    fn write_config(&self) {
        let d = self.dir.path();
        let mut conf = format!(
            "listeners.tcp.1 = 127.0.0.1:{}\nloopback_users = none\n\
             log.file.level = info\nlog.console = false\n",
            self.port
        );
        if let Some(port) = self.tls_port {
            crate::make_certificates(d);
            let file = |name: &str| d.join(name).display().to_string();
            conf.push_str(&format!(
                "listeners.ssl.1 = 127.0.0.1:{port}\nssl_options.cacertfile = {}\n\
                 ssl_options.certfile = {}\nssl_options.keyfile = {}\n\
                 ssl_options.verify = verify_none\nssl_options.fail_if_no_peer_cert = false\n",
                file("ca.pem"),
                file("server.pem"),
                file("server.key"),
            ));
        }
        std::fs::write(d.join("rabbitmq.conf"), conf).expect("write rabbitmq.conf");
        std::fs::write(d.join("enabled_plugins"), "[].\n").expect("write enabled_plugins");
        std::fs::write(d.join("rabbitmq-env.conf"), "").expect("write rabbitmq-env.conf");
        // Nodes and CLI tools authenticate with the cookie in $HOME.
        let cookie = d.join(".erlang.cookie");
        std::fs::write(&cookie, format!("PLBATEST{}", self.port)).expect("write cookie");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400))
            .expect("chmod cookie");
    }

    fn node(&self) -> String {
        format!("plba{}@localhost", self.port)
    }

    fn env(&self, command: &mut Command) {
        let d = self.dir.path();
        command
            .env("HOME", d)
            .env("RABBITMQ_NODENAME", self.node())
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_PID_FILE", d.join("rabbit.pid"))
            .env_remove("ERL_FLAGS")
            .env_remove("RABBITMQ_SERVER_START_ARGS");
    }

    fn spawn(&mut self) {
        let mut command = Command::new(server_script());
        self.env(&mut command);
        // Its own process group: the script, erl and beam are stopped together.
        command
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let broker = command.spawn().expect("start rabbitmq-server");
        self.broker = Some(broker);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            if self.accepts() {
                return;
            }
            if let Some(Ok(Some(status))) = self.broker.as_mut().map(Child::try_wait) {
                panic!(
                    "rabbitmq-server exited with {status} before it listened; log: {}",
                    self.log_tail()
                );
            }
            assert!(
                start.elapsed() < BOOT_LIMIT,
                "rabbitmq-server on port {} did not listen within {BOOT_LIMIT:?}; log: {}",
                self.port,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the broker answers an AMQP protocol header with its `connection.start`.
    pub fn accepts(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"AMQP\x00\x00\x09\x01").is_err() {
            return false;
        }
        let mut frame = [0u8; 1];
        s.read_exact(&mut frame).is_ok() && frame[0] == 1
    }

    fn log_tail(&self) -> String {
        let dir = self.dir.path().join("log");
        let mut text = String::new();
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if let Ok(body) = std::fs::read_to_string(entry.path()) {
                let tail: Vec<&str> = body.lines().rev().take(30).collect();
                text.push_str(&format!("\n== {} ==\n", entry.path().display()));
                for line in tail.into_iter().rev() {
                    text.push_str(line);
                    text.push('\n');
                }
            }
        }
        text
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// `amqps://guest:guest@localhost:TLS_PORT/%2f` of a [`RabbitServer::start_tls`] broker.
    pub fn tls_url(&self) -> String {
        let port = self.tls_port.expect("started with start_tls");
        format!("amqps://guest:guest@localhost:{port}/%2f")
    }

    /// The PEM file of the CA that signed the AMQPS listener's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Its AMQP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its data folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the broker (SIGKILL to its process group: no clean shutdown), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.broker.take() {
            let group = format!("-{}", child.id());
            let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
            let _ = child.kill();
            let _ = child.wait();
            // The listener is gone once the group is; wait so a restart can bind the ports.
            let start = Instant::now();
            while self.accepts() && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Starts it again on the same ports and data folder (durable queues come back).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Starts it again after [`RabbitServer::stop`].
    pub fn start_again(&mut self) {
        if self.broker.is_none() {
            self.spawn();
        }
    }
}

impl Drop for RabbitServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(mut epmd) = self.epmd.take() {
            let _ = epmd.kill();
            let _ = epmd.wait();
        }
    }
}
