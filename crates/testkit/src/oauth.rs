//! A small OAuth2 authorization server on loopback: an RFC 6749 token endpoint
//! (`client_credentials` and `refresh_token` grants) and RFC 7662 introspection, which a
//! private Dovecot's `oauth2` passdb asks about every token login.
//!
//! It issues short-lived tokens, counts its requests, and can be told to answer
//! `invalid_client`, 500, nothing at all, or to go away (its port refuses connections) and
//! come back on the same port.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Form, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};

/// How the token endpoint answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenMode {
    /// As a token endpoint does.
    Normal,
    /// `400 {"error": "invalid_client"}` to every token request.
    InvalidClient,
    /// `500` to every token request.
    ServerError,
    /// Never answers a token request (the client's timeout must end it).
    Hang,
}

/// What the server has seen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenCounts {
    /// Token requests that got a token, by grant type.
    pub issued: HashMap<String, u64>,
    /// Every token request, answered or not.
    pub token_requests: u64,
    /// Introspection requests.
    pub introspections: u64,
    /// Introspections that found the token active.
    pub active: u64,
}

impl TokenCounts {
    /// Tokens issued, over both grants.
    pub fn issued_total(&self) -> u64 {
        self.issued.values().sum()
    }
}

struct Issued {
    user: String,
    expires: Instant,
    revoked: bool,
}

struct Inner {
    /// The mailbox every token opens.
    user: String,
    mode: TokenMode,
    lifetime: Duration,
    clients: HashMap<String, String>,
    refresh_tokens: HashMap<String, String>,
    rotate: bool,
    tokens: HashMap<String, Issued>,
    counts: TokenCounts,
    next: u64,
    /// Every secret value the server handed out or accepted (for the tests' log greps).
    secrets: Vec<String>,
}

type Shared = Arc<Mutex<Inner>>;

/// The server. See the module docs. Stopped when dropped.
pub struct TokenServer {
    shared: Shared,
    addr: SocketAddr,
    running: Option<(
        tokio::sync::oneshot::Sender<()>,
        std::thread::JoinHandle<()>,
    )>,
}

impl std::fmt::Debug for TokenServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl TokenServer {
    /// Starts on a free loopback port, issuing tokens for `user` (the mailbox the tokens
    /// open) that live `lifetime`.
    pub fn start(user: &str, lifetime: Duration) -> Self {
        let port = crate::free_port();
        let shared = Arc::new(Mutex::new(Inner {
            user: user.to_owned(),
            mode: TokenMode::Normal,
            lifetime,
            clients: HashMap::new(),
            refresh_tokens: HashMap::new(),
            rotate: false,
            tokens: HashMap::new(),
            counts: TokenCounts::default(),
            next: 0,
            secrets: Vec::new(),
        }));
        let mut server = Self {
            shared,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            running: None,
        };
        server.up();
        server
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a confidential client.
    pub fn add_client(&self, id: &str, secret: &str) {
        let mut inner = self.lock();
        inner.clients.insert(id.to_owned(), secret.to_owned());
        inner.secrets.push(secret.to_owned());
    }

    /// Registers a refresh token for the server's user.
    pub fn add_refresh_token(&self, token: &str) {
        let mut inner = self.lock();
        let user = inner.user.clone();
        inner.refresh_tokens.insert(token.to_owned(), user);
        inner.secrets.push(token.to_owned());
    }

    /// Whether each refresh-token grant answers with a new refresh token (the old one then
    /// stops working), as Microsoft's endpoint does.
    pub fn rotate_refresh_tokens(&self, rotate: bool) {
        self.lock().rotate = rotate;
    }

    /// How token requests are answered from now on.
    pub fn set_mode(&self, mode: TokenMode) {
        self.lock().mode = mode;
    }

    /// Makes every token issued so far inactive (introspection says `active: false`).
    pub fn revoke_all(&self) {
        for issued in self.lock().tokens.values_mut() {
            issued.revoked = true;
        }
    }

    /// What the server has seen so far.
    pub fn counts(&self) -> TokenCounts {
        self.lock().counts.clone()
    }

    /// Every token, client secret and refresh token it issued or knows: none may appear in
    /// a log or an answer of the bot.
    pub fn secrets(&self) -> Vec<String> {
        self.lock().secrets.clone()
    }

    /// The token endpoint's URL.
    pub fn token_url(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// The introspection endpoint's URL (for Dovecot's `introspection_url`).
    pub fn introspection_url(&self) -> String {
        format!("http://{}/introspect", self.addr)
    }

    /// Stops listening: the port refuses connections until [`TokenServer::up`].
    pub fn down(&mut self) {
        if let Some((stop, thread)) = self.running.take() {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }

    /// Listens again on the same port.
    pub fn up(&mut self) {
        if self.running.is_some() {
            return;
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel::<()>();
        let shared = Arc::clone(&self.shared);
        let addr = self.addr;
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("token server runtime");
            runtime.block_on(async move {
                let listener = bind(addr).await;
                let _ = ready_tx.send(());
                let app = Router::new()
                    .route("/token", post(token))
                    .route("/introspect", post(introspect))
                    .with_state(shared);
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await;
            });
            // Requests left hanging end with the runtime.
            runtime.shutdown_timeout(Duration::from_millis(100));
        });
        ready
            .recv_timeout(Duration::from_secs(10))
            .expect("the token server listens");
        self.running = Some((stop, thread));
    }
}

async fn bind(addr: SocketAddr) -> tokio::net::TcpListener {
    let start = Instant::now();
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => return listener,
            Err(e) if start.elapsed() < Duration::from_secs(10) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("binding the token server to {addr}: {e}"),
        }
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.down();
    }
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        Json(serde_json::json!({"error": error, "error_description": description})),
    )
        .into_response()
}

async fn token(
    State(shared): State<Shared>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let mode = {
        let mut inner = shared.lock().unwrap_or_else(|e| e.into_inner());
        inner.counts.token_requests += 1;
        inner.mode
    };
    match mode {
        TokenMode::Normal => {}
        TokenMode::InvalidClient => {
            return oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "AADSTS7000215: Invalid client secret provided.",
            )
        }
        TokenMode::ServerError => {
            return (StatusCode::INTERNAL_SERVER_ERROR, "temporarily unavailable").into_response()
        }
        TokenMode::Hang => {
            std::future::pending::<()>().await;
        }
    }
    let mut inner = shared.lock().unwrap_or_else(|e| e.into_inner());
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    let grant = field("grant_type").to_owned();
    let client_ok = inner
        .clients
        .get(field("client_id"))
        .is_some_and(|secret| secret == field("client_secret"));
    let user = match grant.as_str() {
        "client_credentials" => {
            if !client_ok {
                return oauth_error(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    "unknown client or wrong secret",
                );
            }
            inner.user.clone()
        }
        "refresh_token" => {
            let known_client = inner.clients.contains_key(field("client_id"));
            if known_client && !client_ok {
                return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", "wrong secret");
            }
            let refresh = field("refresh_token");
            match inner
                .refresh_tokens
                .get(refresh)
                .filter(|_| !refresh.is_empty())
            {
                Some(user) => user.clone(),
                None => {
                    return oauth_error(
                        StatusCode::BAD_REQUEST,
                        "invalid_grant",
                        "the refresh token is unknown, expired or revoked",
                    )
                }
            }
        }
        _ => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "only client_credentials and refresh_token",
            )
        }
    };
    inner.next += 1;
    let access = format!("at{}x{:016x}", inner.next, fastish_random(inner.next));
    let lifetime = inner.lifetime;
    inner.tokens.insert(
        access.clone(),
        Issued {
            user,
            expires: Instant::now() + lifetime,
            revoked: false,
        },
    );
    inner.secrets.push(access.clone());
    *inner.counts.issued.entry(grant.clone()).or_default() += 1;
    let mut answer = serde_json::json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": lifetime.as_secs().max(1),
    });
    if grant == "refresh_token" && inner.rotate {
        let old = field("refresh_token").to_owned();
        let user = inner.refresh_tokens.remove(&old).unwrap_or_default();
        let new = format!("rt{}x{:016x}", inner.next, fastish_random(inner.next + 7));
        inner.refresh_tokens.insert(new.clone(), user);
        inner.secrets.push(new.clone());
        answer["refresh_token"] = serde_json::Value::String(new);
    }
    Json(answer).into_response()
}

async fn introspect(
    State(shared): State<Shared>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let mut inner = shared.lock().unwrap_or_else(|e| e.into_inner());
    inner.counts.introspections += 1;
    let now = Instant::now();
    let active = form
        .get("token")
        .and_then(|t| inner.tokens.get(t))
        .filter(|t| !t.revoked && t.expires > now)
        .map(|t| t.user.clone());
    match active {
        Some(user) => {
            inner.counts.active += 1;
            Json(serde_json::json!({"active": true, "username": user, "scope": "imap"}))
                .into_response()
        }
        None => Json(serde_json::json!({"active": false})).into_response(),
    }
}

/// Unpredictable enough for test tokens, without a random crate.
fn fastish_random(n: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(n);
    h.finish()
}
