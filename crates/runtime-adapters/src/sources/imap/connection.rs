//! Connecting and logging in (plain, STARTTLS or implicit TLS with rustls), and a bounded
//! pool of logged-in sessions for the workers.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_imap::{Client, Session};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::TlsConnector;

use super::config::{AuthMethod, ImapConfig, TlsMode};

/// A byte stream: TCP, or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + fmt::Debug {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + fmt::Debug> Io for T {}

tokio::task_local! {
    /// Set while the task waits in IDLE, where a quiet server is the normal case (IDLE has
    /// its own bounds: the re-issue, the dead-connection check).
    static PATIENT: ();
}

/// Runs `future` with the stall guard relaxed: reads may wait as long as they like.
pub async fn patiently<F: std::future::Future>(future: F) -> F::Output {
    PATIENT.scope((), future).await
}

/// A TCP stream that fails a read or a write which has made no progress for `limit`:
/// every handshake, command and answer of a connection is bounded this way (a server that
/// stops answering mid-command turns into an error, never a hang), whatever the call site.
/// The wait for a read starts again with every write (a new command) and every byte read;
/// inside [`patiently`] reads may wait.
#[derive(Debug)]
pub struct Guarded {
    inner: TcpStream,
    limit: Duration,
    read_since: Option<tokio::time::Instant>,
    write_since: Option<tokio::time::Instant>,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Guarded {
    /// Guards `inner` with `limit`, and turns on TCP keepalive (a peer that vanished
    /// without a word is noticed by the kernel).
    pub fn new(inner: TcpStream, limit: Duration) -> Self {
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(60))
            .with_interval(Duration::from_secs(10))
            .with_retries(6);
        let _ = socket2::SockRef::from(&inner).set_tcp_keepalive(&keepalive);
        Self {
            inner,
            limit,
            read_since: None,
            write_since: None,
            timer: Box::pin(tokio::time::sleep(limit)),
        }
    }

    /// Whether a wait that began at `since` has lasted too long; registers the wake-up.
    fn stalled(
        timer: &mut std::pin::Pin<Box<tokio::time::Sleep>>,
        since: tokio::time::Instant,
        limit: Duration,
        cx: &mut std::task::Context<'_>,
    ) -> bool {
        let deadline = since + limit;
        if tokio::time::Instant::now() >= deadline {
            return true;
        }
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        let _ = timer.as_mut().poll(cx);
        false
    }

    fn timed_out(&self, what: &str) -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "the server {what} for {} ms (command_timeout_ms)",
                self.limit.as_millis()
            ),
        )
    }
}

use std::future::Future as _;
use std::task::Poll;

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.read_since = None;
                Poll::Ready(r)
            }
            Poll::Pending if PATIENT.try_with(|_| ()).is_ok() => {
                this.read_since = None;
                Poll::Pending
            }
            Poll::Pending => {
                let since = *this
                    .read_since
                    .get_or_insert_with(tokio::time::Instant::now);
                if Self::stalled(&mut this.timer, since, this.limit, cx) {
                    this.read_since = None;
                    Poll::Ready(Err(this.timed_out("sent nothing")))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(r) => {
                // A new command: the wait for its answer starts now.
                this.write_since = None;
                this.read_since = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let since = *this
                    .write_since
                    .get_or_insert_with(tokio::time::Instant::now);
                if Self::stalled(&mut this.timer, since, this.limit, cx) {
                    this.write_since = None;
                    Poll::Ready(Err(this.timed_out("took nothing we wrote")))
                } else {
                    Poll::Pending
                }
            }
        }
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A logged-in session.
pub type ImapSession = Session<Box<dyn Io>>;

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The server refused the login: retrying soon will not help.
    #[error("login as {user} refused: {message}")]
    Login {
        /// The user.
        user: String,
        /// The server's words.
        message: String,
    },
    /// TLS could not be set up (certificate not trusted, wrong name, bad CA file).
    #[error("tls: {0}")]
    Tls(String),
    /// The network or the protocol failed.
    #[error("{0}")]
    Io(String),
    /// No OAuth2 token could be had.
    #[error("{0}")]
    Token(#[from] crate::oauth2::TokenError),
}

/// Builds the TLS client configuration: the CA file's certificates, else the public roots.
pub fn tls_config(config: &ImapConfig) -> Result<Option<Arc<ClientConfig>>, ConnectError> {
    if config.tls == TlsMode::None {
        return Ok(None);
    }
    crate::tls::client_config(config.ca_file.as_deref())
        .map(Some)
        .map_err(ConnectError::Tls)
}

async fn upgrade(
    tls: &Arc<ClientConfig>,
    host: &str,
    stream: Box<dyn Io>,
) -> Result<Box<dyn Io>, ConnectError> {
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| ConnectError::Tls(format!("{host:?} is not a server name: {e}")))?;
    let stream = TlsConnector::from(Arc::clone(tls))
        .connect(name, stream)
        .await
        .map_err(|e| ConnectError::Tls(format!("handshake with {host}: {e}")))?;
    Ok(Box::new(stream))
}

/// What a connection logs in with.
#[derive(Clone, Copy)]
pub enum Credential<'a> {
    /// `LOGIN user password`.
    Password(&'a str),
    /// `AUTHENTICATE XOAUTH2` or `OAUTHBEARER` with this access token.
    Token(AuthMethod, &'a str),
}

/// The SASL exchange of XOAUTH2 or OAUTHBEARER (RFC 7628): the initial response carries the
/// token; a second challenge is the server's error (JSON), answered with the empty (XOAUTH2)
/// or `%x01` (OAUTHBEARER) response the mechanisms prescribe, after which the server says NO.
struct Bearer {
    initial: Option<Vec<u8>>,
    method: AuthMethod,
}

impl Bearer {
    fn new(method: AuthMethod, user: &str, host: &str, port: u16, token: &str) -> Self {
        let initial = match method {
            AuthMethod::Oauthbearer => {
                // RFC 5801 saslname: ',' and '=' escaped.
                let name = user.replace('=', "=3D").replace(',', "=2C");
                format!("n,a={name},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01")
            }
            _ => format!("user={user}\x01auth=Bearer {token}\x01\x01"),
        };
        Self {
            initial: Some(initial.into_bytes()),
            method,
        }
    }
}

impl async_imap::Authenticator for Bearer {
    type Response = Vec<u8>;

    fn process(&mut self, _challenge: &[u8]) -> Vec<u8> {
        match self.initial.take() {
            Some(initial) => initial,
            None if self.method == AuthMethod::Oauthbearer => vec![1],
            None => Vec::new(),
        }
    }
}

/// Connects, secures the connection as configured and logs in.
pub async fn connect(
    config: &ImapConfig,
    tls: Option<&Arc<ClientConfig>>,
    credential: Credential<'_>,
) -> Result<ImapSession, ConnectError> {
    let limit = Duration::from_millis(config.connect_timeout_ms);
    let io = |e: String| ConnectError::Io(e);
    let address = format!("{}:{}", config.host, config.port);
    let tcp = tokio::time::timeout(limit, TcpStream::connect(&address))
        .await
        .map_err(|_| io(format!("connecting to {address}: timed out")))?
        .map_err(|e| io(format!("connecting to {address}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let mut stream: Box<dyn Io> = Box::new(Guarded::new(
        tcp,
        Duration::from_millis(config.command_timeout_ms),
    ));
    let tls_needed = |mode| {
        tls.ok_or_else(|| ConnectError::Tls(format!("{mode:?} without a TLS configuration")))
    };
    if config.tls == TlsMode::Implicit {
        stream = upgrade(tls_needed(config.tls)?, &config.host, stream).await?;
    }
    let mut client = Client::new(stream);
    tokio::time::timeout(limit, client.read_response())
        .await
        .map_err(|_| io(format!("{address}: no greeting")))?
        .map_err(|e| io(format!("{address}: reading the greeting: {e}")))?
        .ok_or_else(|| io(format!("{address}: closed before the greeting")))?;
    if config.tls == TlsMode::Starttls {
        client
            .run_command_and_check_ok("STARTTLS", None)
            .await
            .map_err(|e| ConnectError::Tls(format!("STARTTLS refused: {e}")))?;
        let upgraded = upgrade(tls_needed(config.tls)?, &config.host, client.into_inner()).await?;
        client = Client::new(upgraded);
    }
    let answer = match credential {
        Credential::Password(password) => {
            tokio::time::timeout(limit, client.login(&config.user, password)).await
        }
        Credential::Token(method, token) => {
            let mechanism = if method == AuthMethod::Oauthbearer {
                "OAUTHBEARER"
            } else {
                "XOAUTH2"
            };
            let bearer = Bearer::new(method, &config.user, &config.host, config.port, token);
            tokio::time::timeout(limit, client.authenticate(mechanism, bearer)).await
        }
    };
    answer
        .map_err(|_| {
            io(format!(
                "{address}: no answer to the login within {} ms",
                limit.as_millis()
            ))
        })?
        .map_err(|(e, _)| match e {
            async_imap::error::Error::No(message) | async_imap::error::Error::Bad(message) => {
                ConnectError::Login {
                    user: config.user.clone(),
                    message,
                }
            }
            other => io(format!("logging in: {other}")),
        })
}

/// A worker connection and the mailbox it has selected: (name, UIDVALIDITY, UIDNEXT as of
/// the SELECT). A UID at or above that UIDNEXT arrived after the SELECT: the session's view
/// does not hold it yet (Dovecot answers a `UID FETCH` or `UID STORE` of it with OK and
/// nothing done), so the mailbox is selected again first.
pub struct Pooled {
    pub session: ImapSession,
    pub selected: Option<(String, u32, u32)>,
    /// When its login token is due for renewal: from then on the session is replaced by one
    /// logged in with the new token (a server such as Exchange Online ends sessions whose
    /// token expired).
    pub retire_at: Option<std::time::Instant>,
    /// The source's settings generation it logged in under.
    pub generation: u64,
}

impl Pooled {
    /// Whether it may still be used (its token is not due for renewal).
    pub fn current(&self) -> bool {
        self.retire_at
            .is_none_or(|at| std::time::Instant::now() < at)
    }
}

/// At most `size` logged-in sessions, shared by the workers; a session that failed is
/// dropped, and the next checkout connects anew.
pub struct Pool {
    idle: Mutex<Vec<Pooled>>,
    permits: Arc<Semaphore>,
}

impl Pool {
    /// A pool of at most `size` sessions.
    pub fn new(size: usize) -> Self {
        Self {
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(size)),
        }
    }

    /// Waits for a free slot; returns an idle session if there is one.
    pub async fn checkout(&self) -> (Option<Pooled>, OwnedSemaphorePermit) {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .unwrap_or_else(|_| unreachable_closed());
        let session = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        (session, permit)
    }

    /// Returns a healthy session for the next checkout.
    pub fn checkin(&self, session: Pooled, permit: OwnedSemaphorePermit) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(session);
        drop(permit);
    }

    /// Drops every idle session (after the server restarted, for instance).
    pub fn clear(&self) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// The pool's semaphore is never closed.
fn unreachable_closed() -> OwnedSemaphorePermit {
    panic!("the IMAP connection pool's semaphore was closed")
}
