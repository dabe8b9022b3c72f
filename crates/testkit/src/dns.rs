//! A private DNS server: Debian's dnsmasq on a free loopback port, answering only for the
//! TXT records it was given (DKIM keys, DMARC policies) and refusing to recurse.

use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{find, free_port};

const INSTALL: &str = "apt-get install dnsmasq-base";

/// dnsmasq serving `records` on `127.0.0.1:port` (UDP and TCP); stopped when dropped.
pub struct DnsServer {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer")
            .field("port", &self.port)
            .finish()
    }
}

impl DnsServer {
    /// Serves each (name, text) as a TXT record; a text longer than 255 bytes is split
    /// into several strings of one record, as DNS requires (a 2048-bit RSA key is ~400).
    /// Every other name is NXDOMAIN: nothing is forwarded.
    pub fn start(records: &[(&str, &str)]) -> Self {
        let program = find("dnsmasq", INSTALL);
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let mut conf = String::from(
            "no-resolv\nno-hosts\nno-poll\nbind-interfaces\nlisten-address=127.0.0.1\n\
             local=/#/\ncache-size=0\nlog-queries\n",
        );
        conf.push_str(&format!("port={port}\n"));
        for (name, text) in records {
            let strings: Vec<String> = text
                .as_bytes()
                .chunks(255)
                .map(|c| format!("\"{}\"", String::from_utf8_lossy(c).replace('"', "\\\"")))
                .collect();
            conf.push_str(&format!("txt-record={name},{}\n", strings.join(",")));
        }
        let conf_path = dir.path().join("dnsmasq.conf");
        std::fs::write(&conf_path, conf).expect("dnsmasq.conf");
        let log = std::fs::File::create(dir.path().join("dnsmasq.log")).expect("log");
        let child = Command::new(&program)
            .arg("--keep-in-foreground")
            .arg(format!("--conf-file={}", conf_path.display()))
            .arg("--pid-file=")
            .arg("--user=root")
            .arg("--log-facility=-")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        let server = Self {
            port,
            child,
            _dir: dir,
        };
        server.wait_ready();
        server
    }

    /// `127.0.0.1:port`, as the bot's `sender_auth.resolver`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Waits until a query is answered (any answer: the server is up).
    fn wait_ready(&self) {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("udp");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        // A query for the root's SOA: id 0x1234, recursion desired.
        let query = [
            0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 6, 0, 1,
        ];
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut buf = [0u8; 512];
        while Instant::now() < deadline {
            let _ = socket.send_to(&query, self.addr());
            if matches!(socket.recv_from(&mut buf), Ok((n, _)) if n >= 2 && buf[..2] == [0x12, 0x34])
            {
                return;
            }
        }
        let log = std::fs::read_to_string(self._dir.path().join("dnsmasq.log")).unwrap_or_default();
        panic!(
            "dnsmasq did not answer on {} within 20 s:\n{log}",
            self.addr()
        );
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
