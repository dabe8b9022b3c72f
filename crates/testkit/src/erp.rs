//! A small ERP on loopback: it takes orders POSTed as JSON, applies each `Idempotency-Key`
//! once (a repeat gets `409 Conflict`, as an idempotent API answers a key it has applied),
//! and counts every request by its key.
//!
//! On demand it answers 500, 400 or 429, never answers (the client's timeout must end the
//! request), or goes away (its port refuses connections) and comes back on the same port.
//! With a signing secret it checks the Standard Webhooks signature and refuses a bad one
//! with 401.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;

/// How the ERP answers an order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ErpMode {
    /// As an ERP does: 201 for a new key, 409 for one applied already.
    Normal,
    /// `500` without applying anything.
    ServerError,
    /// `503` with `Retry-After: N` seconds, without applying anything.
    Unavailable(u64),
    /// `429` with `Retry-After: N` seconds.
    TooMany(u64),
    /// `400` with a body naming the problem, without applying anything.
    BadRequest,
    /// Never answers (the request hangs until the client gives up).
    Hang,
    /// Applies the order (a new key), then never answers: the answer is lost, as when the
    /// connection breaks after the ERP committed. The client's retry then gets 409.
    AppliedButLost,
}

/// One request the ERP received.
#[derive(Clone, Debug, PartialEq)]
pub struct ErpRequest {
    /// Its `Idempotency-Key`, if it had one.
    pub key: Option<String>,
    /// Its `Authorization` header.
    pub authorization: Option<String>,
    /// Its body, parsed (`Null` when it was not JSON).
    pub body: serde_json::Value,
    /// What the ERP answered.
    pub status: u16,
}

struct Inner {
    mode: ErpMode,
    /// Modes for the next requests, before `mode` applies again.
    script: Vec<ErpMode>,
    /// The orders applied, by key, with their bodies.
    applied: BTreeMap<String, serde_json::Value>,
    requests: Vec<ErpRequest>,
    signing_key: Option<Vec<u8>>,
    expected_auth: Option<String>,
}

type Shared = Arc<Mutex<Inner>>;

/// The server. See the module docs. Stopped when dropped.
pub struct ErpServer {
    shared: Shared,
    addr: SocketAddr,
    running: Option<(
        tokio::sync::oneshot::Sender<()>,
        std::thread::JoinHandle<()>,
    )>,
}

impl std::fmt::Debug for ErpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ErpServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl ErpServer {
    /// Starts on a free loopback port.
    pub fn start() -> Self {
        let shared = Arc::new(Mutex::new(Inner {
            mode: ErpMode::Normal,
            script: Vec::new(),
            applied: BTreeMap::new(),
            requests: Vec::new(),
            signing_key: None,
            expected_auth: None,
        }));
        let mut server = Self {
            shared,
            addr: SocketAddr::from(([127, 0, 0, 1], crate::free_port())),
            running: None,
        };
        server.up();
        server
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The orders endpoint.
    pub fn url(&self) -> String {
        format!("http://{}/orders", self.addr)
    }

    /// How requests are answered from now on.
    pub fn set_mode(&self, mode: ErpMode) {
        self.lock().mode = mode;
    }

    /// The next requests get these answers, one each, before the mode applies again.
    pub fn script(&self, modes: &[ErpMode]) {
        self.lock().script = modes.iter().rev().cloned().collect();
    }

    /// Checks the Standard Webhooks signature with this HMAC key from now on.
    pub fn require_signature(&self, key: &[u8]) {
        self.lock().signing_key = Some(key.to_vec());
    }

    /// Refuses (401) requests whose `Authorization` is not exactly this.
    pub fn require_authorization(&self, value: &str) {
        self.lock().expected_auth = Some(value.to_owned());
    }

    /// The orders applied, by key: each key at most once, by construction.
    pub fn applied(&self) -> BTreeMap<String, serde_json::Value> {
        self.lock().applied.clone()
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<ErpRequest> {
        self.lock().requests.clone()
    }

    /// Requests by key.
    pub fn requests_by_key(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for r in self.lock().requests.iter() {
            *counts.entry(r.key.clone().unwrap_or_default()).or_insert(0) += 1;
        }
        counts
    }

    /// Stops listening: the port refuses connections until [`ErpServer::up`]; requests
    /// under way are cut.
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
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("ERP runtime");
            runtime.block_on(async move {
                let listener = bind(addr).await;
                let _ = ready_tx.send(());
                let app = Router::new()
                    .route("/orders", post(order))
                    .with_state(shared);
                tokio::select! {
                    _ = axum::serve(listener, app) => {}
                    _ = stopped => {}
                }
            });
            runtime.shutdown_timeout(Duration::from_millis(100));
        });
        ready
            .recv_timeout(Duration::from_secs(10))
            .expect("the ERP listens");
        self.running = Some((stop, thread));
    }
}

impl Drop for ErpServer {
    fn drop(&mut self) {
        self.down();
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
            Err(e) => panic!("binding the ERP to {addr}: {e}"),
        }
    }
}

/// The Standard Webhooks check: `v1,<base64 HMAC-SHA256(key, id.timestamp.body)>`.
fn signed(headers: &HeaderMap, body: &[u8], key: &[u8]) -> bool {
    use base64::Engine as _;
    use hmac::Mac as _;
    let text = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("");
    let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(key) else {
        return false;
    };
    mac.update(text("webhook-id").as_bytes());
    mac.update(b".");
    mac.update(text("webhook-timestamp").as_bytes());
    mac.update(b".");
    mac.update(body);
    let want = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    text("webhook-signature")
        .split(' ')
        .any(|s| s.strip_prefix("v1,") == Some(want.as_str()))
}

async fn order(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let text = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let key = text("idempotency-key");
    let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let mode = {
        let mut inner = shared.lock().unwrap_or_else(|e| e.into_inner());
        let mode = inner.script.pop().unwrap_or_else(|| inner.mode.clone());
        let refused = match (&inner.signing_key, &inner.expected_auth) {
            (Some(k), _) if !signed(&headers, &body, k) => Some("bad signature"),
            (_, Some(a)) if text("authorization").as_deref() != Some(a) => Some("bad credential"),
            _ => None,
        };
        let (status, answer): (u16, Response) = if let Some(why) = refused {
            (401, (StatusCode::UNAUTHORIZED, why).into_response())
        } else {
            match (&mode, &key) {
                (ErpMode::Hang, _) => (0, StatusCode::OK.into_response()),
                (ErpMode::AppliedButLost, Some(k)) => {
                    if !inner.applied.contains_key(k) {
                        inner.applied.insert(k.clone(), parsed.clone());
                    }
                    (0, StatusCode::OK.into_response())
                }
                (ErpMode::ServerError, _) => (
                    500,
                    (StatusCode::INTERNAL_SERVER_ERROR, "database is locked").into_response(),
                ),
                (ErpMode::Unavailable(s), _) => (
                    503,
                    (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", s.to_string())], "maintenance")
                        .into_response(),
                ),
                (ErpMode::TooMany(s), _) => (
                    429,
                    (StatusCode::TOO_MANY_REQUESTS, [("retry-after", s.to_string())], "slow down")
                        .into_response(),
                ),
                (ErpMode::BadRequest, _)
                | (ErpMode::Normal | ErpMode::AppliedButLost, None) => (
                    400,
                    (
                        StatusCode::BAD_REQUEST,
                        axum::Json(serde_json::json!({"error": "unknown article", "detail": "SKU not in the catalogue"})),
                    )
                        .into_response(),
                ),
                (ErpMode::Normal, Some(k)) if inner.applied.contains_key(k) => (
                    409,
                    (StatusCode::CONFLICT, "already applied").into_response(),
                ),
                (ErpMode::Normal, Some(k)) => {
                    inner.applied.insert(k.clone(), parsed.clone());
                    (
                        201,
                        (StatusCode::CREATED, axum::Json(serde_json::json!({"erp_id": k})))
                            .into_response(),
                    )
                }
            }
        };
        inner.requests.push(ErpRequest {
            key: key.clone(),
            authorization: text("authorization"),
            body: parsed,
            status,
        });
        if status != 0 {
            return answer;
        }
        mode
    };
    let _ = mode;
    std::future::pending::<()>().await;
    StatusCode::OK.into_response()
}
