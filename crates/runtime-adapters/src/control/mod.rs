//! The operators' HTTP control plane (`control-http` feature): health with progress,
//! status, Prometheus metrics, dead-letter operations, source pause/resume, log levels and
//! configuration reload, with bearer tokens, limits and JSON errors; and the operators' web
//! console under `/ui` on the same data.
//!
//! Safe by default: it binds 127.0.0.1, refuses a non-loopback address without tokens,
//! answers every error as JSON with a stable code, and never echoes a secret.

mod auth;
mod error;
mod extract;
mod openapi;
mod routes;
mod ui;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use runtime_contracts::ConfigProblem;
use runtime_core::RuntimeManager;
use serde::Deserialize;
use tower::ServiceBuilder;

pub use auth::{Role, Tokens};
pub use error::ApiError;
pub use openapi::openapi_document;

/// Environment variables that add tokens (comma-separated), so that tokens need not be
/// written in the configuration file.
pub const READ_TOKENS_ENV: &str = "PLBA_CONTROL_READ_TOKENS";
/// See [`READ_TOKENS_ENV`].
pub const ADMIN_TOKENS_ENV: &str = "PLBA_CONTROL_ADMIN_TOKENS";

/// The fewest characters a control-plane token may have.
pub const MIN_TOKEN_CHARS: usize = 32;

/// `[control]`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ControlConfig {
    /// Serve the control plane.
    pub enabled: bool,
    /// Address to listen on; loopback unless tokens are configured.
    pub bind: String,
    /// Tokens allowed to read (GET routes).
    pub read_tokens: Vec<String>,
    /// Tokens allowed to read and to act.
    pub admin_tokens: Vec<String>,
    /// Leave `/health/live` and `/health/ready` open to callers without a token (probes).
    pub open_health: bool,
    /// Largest request body, in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Longest a request may take, in milliseconds (408 beyond).
    pub request_timeout_ms: u64,
    /// Requests served at once; more get 503 with `Retry-After`.
    pub max_concurrent_requests: usize,
    /// Serve the operator web console under `/ui` (it needs a token to log in).
    pub ui: bool,
    /// A console session ends after this many seconds without a request.
    pub ui_session_idle_secs: u64,
    /// Mark the console's cookies `Secure` (set it when a TLS proxy fronts the console; they
    /// are whenever `bind` is not a loopback address).
    pub ui_secure_cookie: bool,
}

impl std::fmt::Debug for ControlConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlConfig")
            .field("enabled", &self.enabled)
            .field("bind", &self.bind)
            .field("read_tokens", &self.read_tokens.len())
            .field("admin_tokens", &self.admin_tokens.len())
            .field("open_health", &self.open_health)
            .field("ui", &self.ui)
            .finish_non_exhaustive()
    }
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            bind: "127.0.0.1:8080".to_owned(),
            read_tokens: Vec::new(),
            admin_tokens: Vec::new(),
            open_health: true,
            max_body_bytes: 64 * 1024,
            request_timeout_ms: 10_000,
            max_concurrent_requests: 64,
            ui: true,
            ui_session_idle_secs: 1800,
            ui_secure_cookie: false,
        }
    }
}

fn env_tokens(var: &str) -> Vec<String> {
    std::env::var(var)
        .map(|v| {
            v.split(',')
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

impl ControlConfig {
    /// The configured tokens plus those from the environment.
    pub fn tokens(&self) -> Tokens {
        let mut read = self.read_tokens.clone();
        read.extend(env_tokens(READ_TOKENS_ENV));
        let mut admin = self.admin_tokens.clone();
        admin.extend(env_tokens(ADMIN_TOKENS_ENV));
        Tokens::new(&read, &admin)
    }

    /// Every problem, keyed under `prefix` (`control`).
    pub fn problems(&self, prefix: &str) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        match self.bind.parse::<SocketAddr>() {
            Err(_) => problems.push(ConfigProblem::new(
                format!("{prefix}.bind"),
                format!("{:?} is not an address such as 127.0.0.1:8080", self.bind),
            )),
            Ok(addr) if self.enabled && !addr.ip().is_loopback() && !self.tokens().any() => {
                problems.push(ConfigProblem::new(
                    format!("{prefix}.bind"),
                    format!(
                        "refusing to listen on non-loopback {addr} without tokens; set admin_tokens/read_tokens or {ADMIN_TOKENS_ENV}"
                    ),
                ))
            }
            Ok(_) => {}
        }
        let from_env = [
            ("read_tokens", READ_TOKENS_ENV, &self.read_tokens),
            ("admin_tokens", ADMIN_TOKENS_ENV, &self.admin_tokens),
        ];
        for (key, var, listed) in from_env {
            let listed = listed
                .iter()
                .map(|t| (format!("{prefix}.{key}"), t.clone()));
            let env = env_tokens(var).into_iter().map(|t| (var.to_owned(), t));
            for (n, (at, token)) in listed.chain(env).enumerate() {
                if let Some(why) = crate::secret::weakness(token.trim().as_bytes(), MIN_TOKEN_CHARS)
                {
                    problems.push(ConfigProblem::new(at, format!("token {} {why}", n + 1)));
                }
            }
        }
        problems.extend(runtime_contracts::config::require_positive(
            prefix,
            &[
                ("max_body_bytes", self.max_body_bytes as u64),
                ("request_timeout_ms", self.request_timeout_ms),
                (
                    "max_concurrent_requests",
                    self.max_concurrent_requests as u64,
                ),
                ("ui_session_idle_secs", self.ui_session_idle_secs),
            ],
        ));
        problems
    }
}

/// What an operator action did (or, in a dry run, would do).
pub(crate) struct ActionDone {
    pub(crate) message: String,
    pub(crate) items: Vec<serde_json::Value>,
    pub(crate) published: usize,
}

/// Why an operator action did not run.
pub(crate) enum ActionFailure {
    /// No module offers it.
    NotFound,
    /// The module refused it.
    Refused(runtime_contracts::ActionError),
    /// A task it asked for could not be published (after `published` were).
    Publish(String),
}

/// Runs operator action `name` (the API's and the console's one path): the module that
/// offers it decides; unless this is a dry run, the tasks it asks for are published.
pub(crate) async fn run_action(
    runtime: &RuntimeManager,
    name: &str,
    params: &serde_json::Value,
    dry_run: bool,
) -> Result<ActionDone, ActionFailure> {
    let mut report = None;
    for module in runtime.operator_actions() {
        if let Some(r) = module
            .run(name, params, dry_run)
            .await
            .map_err(ActionFailure::Refused)?
        {
            report = Some(r);
            break;
        }
    }
    let report = report.ok_or(ActionFailure::NotFound)?;
    let mut published = 0usize;
    if !dry_run {
        for (pool, task) in report.publish {
            let queue = runtime.queue(&pool).ok_or_else(|| {
                ActionFailure::Publish(format!(
                    "the action published to pool {pool:?}, which has no queue"
                ))
            })?;
            queue.publish(task).await.map_err(|e| {
                ActionFailure::Publish(format!(
                    "{published} task(s) published, then the queue refused: {e}"
                ))
            })?;
            published += 1;
        }
        tracing::info!(action = %name, published, message = %report.message, "action run by an operator");
    }
    Ok(ActionDone {
        message: report.message,
        items: report.items,
        published,
    })
}

/// What the handlers share.
#[derive(Clone)]
pub(crate) struct Ctl {
    pub(crate) runtime: Arc<RuntimeManager>,
    /// The configured tokens (open health shows reasons only to their holders).
    pub(crate) tokens: Arc<Tokens>,
}

/// The control plane's router, with its limits, auth and JSON errors, ready to serve or to
/// test in-process with `tower::ServiceExt::oneshot`.
pub fn router(runtime: Arc<RuntimeManager>, config: &ControlConfig) -> Router {
    let tokens = Arc::new(config.tokens());
    // Health is served beside the shared limit, not under it: slow requests holding every
    // slot must not make `/health/live` fail and get the process restarted.
    let (health, api): (Vec<_>, Vec<_>) = routes::table(config.open_health)
        .into_iter()
        .partition(|route| route.path.starts_with("/health/"));
    let throttle = Arc::new(auth::Throttle::default());
    let health = guarded(health, &tokens, &throttle)
        .with_state(Ctl {
            runtime: Arc::clone(&runtime),
            tokens: Arc::clone(&tokens),
        })
        .layer(
            ServiceBuilder::new()
                .map_response(json_errors)
                .layer(tower_http::catch_panic::CatchPanicLayer::custom(on_panic))
                .layer(tower_http::timeout::TimeoutLayer::with_status_code(
                    StatusCode::REQUEST_TIMEOUT,
                    Duration::from_millis(config.request_timeout_ms),
                )),
        );
    let routes = guarded(api, &tokens, &throttle)
        .fallback(|uri: axum::http::Uri| async move {
            if uri.path() == "/ui" || uri.path().starts_with("/ui/") {
                ui::not_found()
            } else {
                ApiError::not_found("no such route").into_response()
            }
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method",
            )
        })
        .with_state(Ctl {
            runtime: Arc::clone(&runtime),
            tokens: Arc::clone(&tokens),
        });
    let routes = if config.ui {
        routes.merge(ui::router(
            runtime,
            Arc::clone(&tokens),
            Arc::clone(&throttle),
            Duration::from_secs(config.ui_session_idle_secs),
            // Off this machine the session cookie must only travel over TLS (a proxy in
            // front): a browser will not send a `Secure` cookie over plain HTTP.
            config.ui_secure_cookie
                || config
                    .bind
                    .parse::<SocketAddr>()
                    .is_ok_and(|addr| !addr.ip().is_loopback()),
        ))
    } else {
        routes
    };
    let limits = ServiceBuilder::new()
        .map_response(json_errors)
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(on_panic))
        .layer(HandleErrorLayer::new(on_overload))
        .layer(tower::load_shed::LoadShedLayer::new())
        // Global: one semaphore for every route (`Router::layer` wraps each route apart).
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            config.max_concurrent_requests,
        ))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_millis(config.request_timeout_ms),
        ))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(
            config.max_body_bytes,
        ));
    let boundary = Boundary {
        tokens: tokens.any(),
    };
    health
        .merge(routes.layer(limits))
        .layer(axum::middleware::from_fn_with_state(
            boundary,
            request_boundary,
        ))
}

/// `routes`, each behind the token check of its role.
fn guarded(
    routes: Vec<routes::Route>,
    tokens: &Arc<Tokens>,
    throttle: &Arc<auth::Throttle>,
) -> Router<Ctl> {
    routes.into_iter().fold(Router::new(), |router, route| {
        let guard = auth::Guard {
            tokens: Arc::clone(tokens),
            throttle: Arc::clone(throttle),
            role: route.role,
        };
        let method_router = (route.handler)()
            .route_layer(axum::middleware::from_fn_with_state(guard, auth::require));
        router.route(route.path, method_router)
    })
}

/// What every request is checked against before any route sees it.
#[derive(Clone, Copy, Debug)]
struct Boundary {
    /// Whether tokens are configured (without, the loopback address is the boundary).
    tokens: bool,
}

/// Whether `host` (a `Host` header: a name or address, maybe with a port) names this
/// machine's loopback.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The host and port of an `Origin` value (`http://127.0.0.1:8080`), lower-cased.
fn origin_authority(origin: &str) -> Option<String> {
    let rest = origin.split_once("://")?.1;
    Some(rest.trim_end_matches('/').to_ascii_lowercase())
}

/// The request's boundary:
/// - without tokens, only a loopback `Host` is answered: a web page that rebinds its own
///   name to 127.0.0.1 sends its name, not a loopback one (DNS rebinding);
/// - a request that changes state (any method but GET, HEAD and OPTIONS) from a browser
///   must be same-origin: a cross-site `Sec-Fetch-Site`, or an `Origin` other than the
///   `Host`, is refused (a bodiless POST is a "simple" cross-site request that any page
///   can make, tokens or not, when a cookie or loopback would admit it).
async fn request_boundary(
    axum::extract::State(boundary): axum::extract::State<Boundary>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let headers = request.headers();
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let host = text(header::HOST)
        .map(str::to_owned)
        .or_else(|| request.uri().authority().map(|a| a.to_string()));
    if !boundary.tokens {
        if let Some(host) = host.as_deref().filter(|h| !is_loopback_host(h)) {
            tracing::warn!(host = %host.chars().take(100).collect::<String>(), "control plane: a request for a non-loopback host was refused (no tokens are configured)");
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden_host",
                "without tokens the control plane answers only requests for localhost, 127.0.0.1 or [::1]",
            )
            .into_response();
        }
    }
    let safe = matches!(
        *request.method(),
        axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
    );
    if !safe {
        let site = text(header::HeaderName::from_static("sec-fetch-site"));
        // A browser that sends `Sec-Fetch-Site` says where the request comes from; its
        // `Origin` may then be `null` (the console's `Referrer-Policy: no-referrer`). An
        // older browser is judged by its `Origin` against the `Host`.
        let cross_site = match site {
            Some(site) => !matches!(site, "same-origin" | "none"),
            None => text(header::ORIGIN).is_some_and(|origin| {
                origin_authority(origin)
                    .zip(host.as_deref())
                    .is_none_or(|(o, h)| o != h.to_ascii_lowercase())
            }),
        };
        if cross_site {
            let clip = |v: Option<&str>| v.unwrap_or("-").chars().take(100).collect::<String>();
            tracing::warn!(
                method = %request.method(),
                path = %request.uri().path(),
                origin = %clip(text(header::ORIGIN)),
                host = %clip(host.as_deref()),
                sec_fetch_site = %clip(site),
                "control plane: a cross-site request was refused"
            );
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "cross_site",
                "requests that change state must come from the console itself or from a client that is not a browser",
            )
            .into_response();
        }
    }
    next.run(request).await
}

#[cfg(test)]
mod boundary_tests {
    use super::{is_loopback_host, origin_authority};

    #[test]
    fn loopback_hosts_and_origins_are_read() {
        for host in [
            "localhost",
            "LOCALHOST:8080",
            "127.0.0.1",
            "127.0.0.1:9",
            "[::1]:8080",
            "[::1]",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "attacker.example",
            "attacker.example:8080",
            "10.0.0.1:8080",
            "localhost.attacker.example",
            "[2001:db8::1]:80",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
        assert_eq!(
            origin_authority("http://127.0.0.1:8080").as_deref(),
            Some("127.0.0.1:8080")
        );
        assert_eq!(origin_authority("null"), None);
    }
}

async fn on_overload(error: tower::BoxError) -> ApiError {
    if error.is::<tower::load_shed::error::Overloaded>() {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "too many requests at once; retry shortly",
        )
    } else {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "request failed",
        )
    }
}

fn on_panic(_panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a control-plane handler panicked");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        "the request failed",
    )
    .into_response()
}

/// Gives every error response a JSON body, whatever layer produced it (timeouts, body
/// limits, method errors).
fn json_errors<B>(response: axum::http::Response<B>) -> Response
where
    B: axum::body::HttpBody<Data = axum::body::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    let status = response.status();
    // JSON already, or a console page (HTML for a browser).
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| {
            v.as_bytes().starts_with(b"application/json") || v.as_bytes().starts_with(b"text/html")
        });
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response.map(axum::body::Body::new);
    }
    let message = status.canonical_reason().unwrap_or("error").to_lowercase();
    let mut replaced = ApiError::new(status, error::code_for(status), message).into_response();
    for name in [header::ALLOW, header::RETRY_AFTER, header::WWW_AUTHENTICATE] {
        if let Some(value) = response.headers().get(&name) {
            replaced.headers_mut().insert(name, value.clone());
        }
    }
    if status == StatusCode::SERVICE_UNAVAILABLE
        && !replaced.headers().contains_key(header::RETRY_AFTER)
    {
        replaced
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    replaced
}

/// A running control plane.
#[derive(Debug)]
pub struct ControlServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl ControlServer {
    /// Binds `config.bind` and serves until [`ControlServer::stop`].
    pub async fn start(
        runtime: Arc<RuntimeManager>,
        config: &ControlConfig,
    ) -> std::io::Result<Self> {
        let problems = config.problems("control");
        if let Some(p) = problems.first() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                p.to_string(),
            ));
        }
        let listener = tokio::net::TcpListener::bind(&config.bind).await?;
        let addr = listener.local_addr()?;
        let app = router(runtime, config);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            // The peer's address feeds the wrong-token throttle.
            let served = axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "control plane stopped with an error");
            }
        });
        tracing::info!(%addr, "control plane listening");
        Ok(Self {
            addr,
            stop: Some(stop),
            task,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets open requests finish, and waits.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}
