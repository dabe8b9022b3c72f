//! Whether a party the outbox talks to (the ERP, the SMTP relay) can be reached, as the
//! last attempts found it: the readiness contributor and the gate of the pool that talks
//! to it (`ModuleRegistry::needs`), so an outage of any length dead-letters nothing.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use runtime_contracts::{BoxFuture, HealthContributor, HealthStatus, Probe};

/// How long a party counts as unreachable after it failed, before it is tried again.
pub const HOLD_DOWN: Duration = Duration::from_secs(2);

/// The reachability of one party at `host:port`.
#[derive(Debug)]
pub struct PeerHealth {
    /// The readiness check's name (`erp`, `smtp`).
    name: &'static str,
    /// How messages name it (`the ERP`, `the SMTP relay`).
    what: &'static str,
    host: String,
    port: u16,
    down: Mutex<Option<(String, Instant)>>,
    /// Attempts in a row that timed out: one may be a slow request, two say the party is
    /// not answering.
    timeouts: AtomicU32,
}

impl PeerHealth {
    /// The health of `what`, reached at `host:port`, reported as `name`.
    pub fn new(name: &'static str, what: &'static str, host: &str, port: u16) -> Self {
        Self {
            name,
            what,
            host: host.trim_matches(['[', ']']).to_owned(),
            port,
            down: Mutex::new(None),
            timeouts: AtomicU32::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(String, Instant)>> {
        self.down
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// It cannot be reached, for `reason`; it is not tried for `hold`.
    pub fn unreachable(&self, reason: String, hold: Duration) {
        *self.lock() = Some((reason, Instant::now() + hold));
    }

    /// It answered.
    pub fn reached(&self) {
        self.timeouts.store(0, Ordering::Relaxed);
        *self.lock() = None;
    }

    /// An attempt timed out: the party counts as away from the second in a row on.
    pub fn timed_out(&self, reason: String) {
        let n = self.timeouts.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= 2 {
            self.unreachable(reason, HOLD_DOWN);
        }
    }

    /// Whether a TCP connection to it opens.
    async fn connects(&self) -> Result<(), String> {
        let (host, port, what) = (&self.host, self.port, self.what);
        match tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect((host.as_str(), port)),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("{what} at {host}:{port} refuses connections: {e}")),
            Err(_) => Err(format!(
                "{what} at {host}:{port} did not accept a connection within 2 s"
            )),
        }
    }
}

impl HealthContributor for PeerHealth {
    fn name(&self) -> &str {
        self.name
    }

    fn check(&self, probe: Probe) -> BoxFuture<'_, HealthStatus> {
        Box::pin(async move {
            if probe == Probe::Liveness {
                return HealthStatus::Up;
            }
            let Some((reason, until)) = self.lock().clone() else {
                return HealthStatus::Up;
            };
            if Instant::now() < until {
                return HealthStatus::Down { reason };
            }
            // The hold-down is over: let the next attempt find out, unless the party does
            // not even accept a connection.
            match self.connects().await {
                Ok(()) => {
                    self.reached();
                    HealthStatus::Up
                }
                Err(why) => {
                    self.unreachable(why.clone(), HOLD_DOWN);
                    HealthStatus::Down { reason: why }
                }
            }
        })
    }
}
