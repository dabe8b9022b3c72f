//! A private Postfix: the mail relay the bot's replies go through, delivering into the
//! private Dovecot over LMTP.

use std::io::Read as _;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{find, free_port, run};

const INSTALL: &str = "apt-get install postfix";

/// The services of the private instance: Debian's `master.cf` without chroot (the instance
/// has no chroot tree), without TLS, and with its SMTP listener on one loopback port.
const MASTER_CF: &str = "\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
smtp      unix  -       -       n       -       -       smtp
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
";

/// A private Postfix (the Debian package) on a free loopback port: its own `main.cf`,
/// `master.cf`, queue and log in a temp dir. It accepts mail from loopback for
/// `domains` and hands every message to an LMTP server on `127.0.0.1:lmtp_port` (the
/// private Dovecot's), or discards what it accepted ([`PostfixServer::start_discarding`]). Its queue is kept across [`PostfixServer::stop`] and
/// [`PostfixServer::start_again`]; it is stopped when dropped.
pub struct PostfixServer {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl std::fmt::Debug for PostfixServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostfixServer")
            .field("port", &self.port)
            .finish()
    }
}

impl PostfixServer {
    /// Starts Postfix for `domains`, delivering to the LMTP server on `lmtp_port`.
    pub fn start(lmtp_port: u16, domains: &[&str]) -> Self {
        Self::start_with(&format!(
            "virtual_mailbox_domains = {}\nvirtual_transport = lmtp:inet:127.0.0.1:{lmtp_port}\n",
            domains.join(" ")
        ))
    }

    /// Starts a Postfix that accepts mail for any address from loopback and discards it
    /// after queueing it (its `discard` transport): a relay for benchmarks.
    pub fn start_discarding() -> Self {
        Self::start_with("default_transport = discard:\nrelay_transport = discard:\n")
    }

    fn start_with(delivery: &str) -> Self {
        find("postfix", INSTALL);
        let dir = tempfile::Builder::new()
            .prefix("pf")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let d = dir.path().display().to_string();
        run("chmod", &["0755", &d]);
        for sub in ["queue", "data"] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("postfix dirs");
        }
        run("chown", &["postfix", &format!("{d}/data")]);
        let port = free_port();
        let main_cf = format!(
            "compatibility_level = 3.6
config_directory = {d}
queue_directory = {d}/queue
data_directory = {d}/data
mail_owner = postfix
maillog_file = {d}/maillog
maillog_file_prefixes = /tmp
myhostname = relay.plba.test
mydomain = plba.test
myorigin = $mydomain
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
relay_domains =
mynetworks = 127.0.0.0/8
{delivery}alias_maps =
alias_database =
local_recipient_maps =
smtputf8_enable = no
smtp_dns_support_level = disabled
lmtp_host_lookup = native
biff = no
# A test relay: a deferred message is tried again within seconds, not minutes.
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
",
        );
        std::fs::write(dir.path().join("main.cf"), main_cf).expect("main.cf");
        std::fs::write(
            dir.path().join("master.cf"),
            format!("127.0.0.1:{port} inet n - n - - smtpd\n{MASTER_CF}"),
        )
        .expect("master.cf");
        let mut server = Self {
            dir,
            port,
            child: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = Command::new(find("postfix", INSTALL))
            .arg("-c")
            .arg(self.dir.path())
            .arg("start-fg")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start postfix");
        self.child = Some(child);
        let start = Instant::now();
        while !self.greets() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("postfix exited with {status}; its log: {}", self.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "postfix on port {} did not greet within 30 s; its log: {}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn greets(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut buf = [0u8; 3];
        s.read_exact(&mut buf).is_ok() && &buf == b"220"
    }

    /// The SMTP port on 127.0.0.1 (no TLS, no login: loopback is a trusted network).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its log (`maillog_file`).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }

    /// How many messages are still in its queue (`postqueue -j`: one JSON line each).
    pub fn queued(&self) -> usize {
        let out = Command::new(find("postqueue", INSTALL))
            .arg("-c")
            .arg(self.dir.path())
            .arg("-j")
            .output()
            .expect("postqueue");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with('{'))
            .count()
    }

    /// Stops it (`postfix stop`); its queue stays.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new(find("postfix", INSTALL))
            .arg("-c")
            .arg(self.dir.path())
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(15) {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if child.try_wait().ok().flatten().is_none() {
            let _ = Command::new(find("postfix", INSTALL))
                .arg("-c")
                .arg(self.dir.path())
                .arg("abort")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
        let start = Instant::now();
        while self.greets() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts it again on the same port with the same queue.
    pub fn start_again(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Where its files are.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PostfixServer {
    fn drop(&mut self) {
        self.stop();
    }
}
